"""Plug durable_celery into ``celery worker``: a bootstep runs the coordinator in every
worker; process signals keep worker identities fork-safe and release them on shutdown.

Order matters on a warm shutdown. The bootstep requires the Pool, so it starts after the
pool (pool children are forked before the coordinator thread exists) and stops before it;
stopping only stops the coordinator. The runs this process executes are released on
``worker_shutdown``, which Celery sends once the pool has drained: a step still running
in a pool thread finishes and commits first, and nothing it holds is handed to another
worker meanwhile. Prefork children release theirs when they exit
(``worker_process_shutdown``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import bootsteps
from celery import signals as celery_signals
from celery.worker import control

from durable_celery import errors
from durable_celery.coordinator import redis_broker
from durable_celery.coordinator.loop import Coordinator
from durable_celery.runtime import limits
from durable_celery.runtime.readiness import Readiness
from durable_celery.settings import Settings

log = logging.getLogger("durable_celery.coordinator")


@dataclass(frozen=True, slots=True)
class Installed:
    """What the worker's hooks need of one Durable: handed down by app.py."""

    app: Any
    settings: Settings
    readiness: Readiness
    check_definitions: Callable[[], None]
    coordinator: Callable[[], Coordinator]
    release: Callable[[], int]   # this process's worker identity: release held runs


_instances: list[Installed] = []


def install(parts: Installed) -> None:
    class DurableCoordinator(bootsteps.StartStopStep):
        """Migrates the schema (if auto_migrate) and runs the coordinator sweeps."""

        label = "durable_celery coordinator"
        requires = ("celery.worker.components:Pool",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.coordinator: Coordinator | None = None
            # Created before the pool forks its children: they see the worker's limits.
            limits.worker_limits(getattr(parent, "time_limit", None),
                                 getattr(parent, "soft_time_limit", None))

        def start(self, parent: Any) -> None:
            parts.check_definitions()  # a definition error stops the worker at start
            # A failure is logged by readiness in one line (what is wrong, what to do). The
            # worker starts anyway: steps wait in the broker, the coordinator retries.
            with contextlib.suppress(errors.DurableCeleryError):
                parts.readiness.ensure()
            if parts.settings.coordinator:
                coordinator = self.coordinator = parts.coordinator()
                if redis_broker.is_redis(parent.app):
                    consumed = parent.app.amqp.queues.consume_from or parent.app.amqp.queues
                    coordinator.redis = redis_broker.RedisUpkeep(
                        parent.app, list(consumed.values()), after=parts.settings.stale_after)
                coordinator.start()
                log.info("durable_celery coordinator started")

        def stop(self, parent: Any) -> None:
            if self.coordinator is not None:
                self.coordinator.stop()
                self.coordinator = None

    parts.app.steps["worker"].add(DurableCoordinator)
    _instances.append(parts)


@celery_signals.worker_shutdown.connect(weak=False)
def _release_after_drain(**_: Any) -> None:
    """The pool has drained (threads, solo): release what this process still holds."""
    for parts in _instances:
        parts.release()


@celery_signals.worker_process_shutdown.connect(weak=False)
def _release_on_shutdown(**_: Any) -> None:
    for parts in _instances:
        parts.release()


@control.inspect_command()
def durable_status(state: Any, **_: Any) -> dict[str, Any]:
    """``celery -A app inspect durable_status``: whether this worker can use its database
    (and what to do if not), per Durable of its app."""
    app = state.consumer.app
    found = [d for d in _instances if d.app is app]
    return {"durable_celery": [d.readiness.state() for d in found]}
