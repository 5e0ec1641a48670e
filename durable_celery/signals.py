"""Durable signals to runs (not Celery's signals): the inbox, deduplicated by ``dedup_key``,
that wakes a run awaiting the signal's name.

Handed what it uses (store, publisher, readiness, settings, the database URL for the
caller's-transaction check); the by-name task ``durable_celery.signal`` is in
:mod:`durable_celery.integration`.
"""

from __future__ import annotations

import logging
from typing import Any

from durable_celery import errors, payloads
from durable_celery.checks import check_identifier, check_signal_name
from durable_celery.runs import in_callers_transaction
from durable_celery.runtime.publisher import Publisher
from durable_celery.runtime.readiness import Readiness
from durable_celery.settings import Settings
from durable_celery.storage import outbox
from durable_celery.storage.records import SignalResult
from durable_celery.storage.store import Store

log = logging.getLogger("durable_celery.signals")


class Signals:
    """Sends signals to the runs of one Durable."""

    def __init__(self, *, store: Store, publisher: Publisher, readiness: Readiness,
                 settings: Settings, url: Any) -> None:
        self.store = store
        self.publisher = publisher
        self.readiness = readiness
        self.settings = settings
        self.url = url

    def send(self, target: Any, name: Any, payload: Any = None, *, dedup_key: Any = None,
             connection: Any = None) -> SignalResult:
        check_identifier(target, "target")
        check_signal_name(name)
        if dedup_key is not None:
            check_identifier(dedup_key, "dedup_key")
        text = payloads.check(payload, what="payload", max_bytes=self.settings.max_payload_bytes)
        bound = None if connection is None else outbox.Bound(connection, self.url)
        self.readiness.ensure()
        if bound is None:
            result, dispatch = self.store.signal(target=target, name=name, payload=text,
                                                 dedup_key=dedup_key)
            if dispatch is not None:
                self.publisher.publish(dispatch)
            return result
        # In the caller's transaction: the wake-up is published after its commit, or by the
        # coordinator a moment later if the caller dies first.
        found: list[SignalResult] = []

        def insert(conn: Any) -> Any:
            result, dispatch = self.store.signal_on(
                conn, target=target, name=name, payload=text, dedup_key=dedup_key,
                redispatch=outbox.OUTBOX_DELAY)
            found.append(result)
            return dispatch

        in_callers_transaction(
            bound, insert, publish=self.publisher.publish,
            visible=lambda _: lambda: self.store.signal_visible(found[0].signal_id))
        return found[0]

    def apply_by_name(self, message_id: str | None, target: Any = None, name: Any = None,
                      payload: Any = None, dedup_key: Any = None) -> dict[str, Any] | None:
        """``durable_celery.signal``: the message id stands in for a missing dedup_key. A
        target that has no run yet keeps the signal ``early_signal_ttl`` seconds for it."""
        if dedup_key is None and message_id:
            dedup_key = f"celery:{message_id}"
        try:
            result = self.send(target, name, payload, dedup_key=dedup_key)
        except errors.NoTarget as exc:
            ttl = self.settings.early_signal_ttl
            if exc.details.get("reason") == "missing" and ttl > 0:
                kept = self.store.keep_early_signal(
                    target=target, name=name, dedup_key=dedup_key, ttl=ttl,
                    payload=payloads.check(payload, what="payload",
                                           max_bytes=self.settings.max_payload_bytes))
                log.info("durable_celery.signal %r to %r: no run has this id or key yet; kept "
                         "for it %.0fs", name, target, ttl)
                return {"workflow_id": None, "early": True, "duplicate": not kept, "woke": False}
            # A finished run (say, a webhook delivered again): nothing to do, not an error.
            log.info("durable_celery.signal %r to %r not delivered: %s", name, target, exc)
            return None
        except errors.InvalidArgument as exc:
            log.error("durable_celery.signal refused: %s", exc)
            return None
        return {"workflow_id": result.workflow_id, "duplicate": result.duplicate,
                "woke": result.woke}
