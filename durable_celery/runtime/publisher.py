"""Publish step messages: the hints "run step S of run W at seq N".

A publish that fails is not an error for the caller: the run's row says it is runnable, so
the coordinator's dispatcher sends it again (soon, because the failure marks it). The test
kit switches a publisher to inline mode, where nothing reaches the broker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from durable_celery import errors
from durable_celery.settings import Settings
from durable_celery.storage.records import Dispatch
from durable_celery.storage.store import Store

log = logging.getLogger("durable_celery")

REDIS_SCHEMES = ("redis", "rediss", "sentinel", "redis-socket")


def is_redis(app: Any) -> bool:
    url = str(app.conf.broker_url or "")
    return url.split("://", 1)[0].split("+")[0] in REDIS_SCHEMES


class Publisher:
    """Sends step messages through a Celery app; on a broker failure marks the rest for
    the dispatcher."""

    def __init__(self, app: Any, store: Store, settings: Settings) -> None:
        self.app = app
        self.store = store
        self.settings = settings
        self._redis: bool | None = None
        self._inline = threading.local()

    @contextlib.contextmanager
    def inline(self) -> Iterator[None]:
        """Publish nothing in this thread meanwhile (``testing.drain`` runs steps itself)."""
        before = getattr(self._inline, "active", False)
        self._inline.active = True
        try:
            yield
        finally:
            self._inline.active = before

    def publish(self, dispatch: Dispatch) -> bool:
        """Send the hint "run this step at this seq"; on failure the sweep re-sends it."""
        return self.publish_many([dispatch]) == 1

    def publish_many(self, dispatches: list[Dispatch]) -> int:
        """Publish in order; at the first broker failure stop, and let the dispatcher
        re-send the rest a little later. Returns how many were published."""
        if getattr(self._inline, "active", False):
            return len(dispatches)
        for index, dispatch in enumerate(dispatches):
            args = [dispatch.workflow_id, dispatch.seq]
            try:
                # argsrepr/kwargsrepr given: Celery's saferepr of them is a tenth of a publish.
                self.app.send_task(
                    f"durable.{dispatch.workflow}.{dispatch.step}",
                    args=args, argsrepr=repr(args), kwargsrepr="{}", queue=dispatch.queue,
                    serializer="json", ignore_result=True,
                    priority=self.broker_priority(dispatch.priority),
                    eta=None if dispatch.eta is None else datetime.fromtimestamp(
                        dispatch.eta, timezone.utc),
                )
            except Exception:
                rest = dispatches[index:]
                log.warning("publishing failed (broker unreachable?); %d run(s) will be "
                            "re-sent by the coordinator", len(rest), exc_info=True)
                try:
                    self.store.mark_unpublished([d.workflow_id for d in rest],
                                                after=min(self.settings.redispatch_after, 5.0))
                except errors.StorageError:
                    log.warning("could not mark %d run(s) unpublished; they are re-sent after "
                                "redispatch_after", len(rest))
                return index
        return len(dispatches)

    def broker_priority(self, priority: int) -> int:
        """Our priorities run 0 (default) .. 9 (first), as on RabbitMQ; Redis (kombu) serves
        0 first, so the value is mirrored there."""
        if self._redis is None:
            self._redis = is_redis(self.app)
        return 9 - priority if self._redis else priority
