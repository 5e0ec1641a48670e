"""Plug durable_celery into ``celery worker``: a bootstep runs the coordinator in every
worker; process signals keep worker identities fork-safe and release them on shutdown."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery import signals as celery_signals

if TYPE_CHECKING:
    from durable_celery.app import Durable

log = logging.getLogger("durable_celery.coordinator")

_instances: list[Durable] = []


def install(durable: Durable) -> None:
    class DurableCoordinator(bootsteps.StartStopStep):
        """Migrates the schema (if auto_migrate) and runs the coordinator sweeps."""

        label = "durable_celery coordinator"

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.coordinator: Any = None

        def start(self, parent: Any) -> None:
            durable.check_definitions()  # a definition error stops the worker at start
            try:
                durable._ensure_ready()
            except Exception:  # the database may come later: the worker must still start
                log.error("durable_celery: database not ready at worker start; will retry",
                          exc_info=True)
            if durable.settings.coordinator:
                self.coordinator = durable.coordinator()
                self.coordinator.start()
                log.info("durable_celery coordinator started")

        def stop(self, parent: Any) -> None:
            if self.coordinator is not None:
                self.coordinator.stop()
                self.coordinator = None
            durable._release_identity()

    durable.app.steps["worker"].add(DurableCoordinator)
    _instances.append(durable)


@celery_signals.worker_process_shutdown.connect(weak=False)
def _release_on_shutdown(**_: Any) -> None:
    for durable in _instances:
        durable._release_identity()
