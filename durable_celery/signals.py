"""Durable signals to runs (not Celery's signals), and the built-in tasks other Celery apps
call by name with JSON kwargs: ``durable_celery.signal`` and ``durable_celery.start``."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from durable_celery import errors, payloads, receipt
from durable_celery.runtime.outcomes import check_signal_name
from durable_celery.storage import outbox
from durable_celery.storage.records import SignalResult

if TYPE_CHECKING:
    from durable_celery.app import Durable

log = logging.getLogger("durable_celery.signals")


def send(durable: Durable, target: Any, name: Any, payload: Any = None, *,
         dedup_key: Any = None, connection: Any = None) -> SignalResult:
    from durable_celery.app import check_identifier

    check_identifier(target, "target")
    check_signal_name(name)
    if dedup_key is not None:
        check_identifier(dedup_key, "dedup_key")
    text = payloads.check(payload, what="payload", max_bytes=durable.settings.max_payload_bytes)
    bound = None if connection is None else outbox.Bound(connection, durable._holder.url)
    durable._ensure_ready()
    if bound is None:
        result, dispatch = durable.store.signal(target=target, name=name, payload=text,
                                                dedup_key=dedup_key)
        if dispatch is not None:
            durable._publish(dispatch)
        return result
    # In the caller's transaction: the wake-up is published after its commit, or by the
    # coordinator a moment later if the caller dies first.
    with bound.execute() as conn:
        result, dispatch = durable.store.signal_on(
            conn, target=target, name=name, payload=text, dedup_key=dedup_key,
            redispatch=outbox.OUTBOX_DELAY)
    if dispatch is not None:
        woken = dispatch
        bound.after_commit(lambda: durable._publish(woken),
                           visible=lambda: durable.store.signal_visible(result.signal_id))
    return result


def apply_signal(durable: Durable, message_id: str | None, target: Any = None,
                 name: Any = None, payload: Any = None, dedup_key: Any = None,
                 ) -> dict[str, Any] | None:
    """``durable_celery.signal``: the message id stands in for a missing dedup_key. A
    target that has no run yet keeps the signal ``early_signal_ttl`` seconds for it."""
    if dedup_key is None and message_id:
        dedup_key = f"celery:{message_id}"
    try:
        result = send(durable, target, name, payload, dedup_key=dedup_key)
    except errors.NoTarget as exc:
        ttl = durable.settings.early_signal_ttl
        if exc.details.get("reason") == "missing" and ttl > 0:
            kept = durable.store.keep_early_signal(
                target=target, name=name, dedup_key=dedup_key, ttl=ttl,
                payload=payloads.check(payload, what="payload",
                                       max_bytes=durable.settings.max_payload_bytes))
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


def apply_start(durable: Durable, message_id: str | None, workflow: Any = None,
                state: Any = None, key: Any = None, workflow_id: Any = None,
                version: Any = None, key_reuse: Any = None, *,
                at: datetime | None = None) -> str | None:
    """``durable_celery.start``: the message id names the run unless the sender did, so a
    redelivered message finds its run, also after that run finished. ``at``: the
    message's eta (a countdown), kept as a durable timer."""
    if workflow_id is None and message_id:
        workflow_id = str(message_id)
    if at is not None and at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    try:
        wf = durable.get_definition(workflow, version)
        return wf.start(state, key=key, workflow_id=workflow_id, key_reuse=key_reuse, at=at)
    except errors.DuplicateWorkflow as exc:
        # Idempotent by key / id: the run the caller meant already exists.
        log.info("durable_celery.start: %s", exc)
        return exc.existing_id
    except errors.InvalidArgument as exc:
        log.error("durable_celery.start refused: %s", exc)
        return None


def register_tasks(durable: Durable) -> None:
    """Tasks callable by name from any Celery app, without importing workflow code; applied
    as they are received (see :mod:`durable_celery.receipt`)."""
    app = durable.app

    def signal_now(call: receipt.Call) -> Any:
        return apply_signal(durable, call.id, *call.args, **call.kwargs)

    def start_now(call: receipt.Call) -> Any:
        return apply_start(durable, call.id, *call.args, **call.kwargs, at=call.eta)

    @app.task(name="durable_celery.signal", Strategy=receipt.strategy(durable, signal_now),
              **receipt.TASK_OPTIONS)
    def signal_task(self: Any, target: Any = None, name: Any = None, payload: Any = None,
                    dedup_key: Any = None) -> dict[str, Any] | None:
        return apply_signal(durable, self.request.id, target, name, payload, dedup_key)

    @app.task(name="durable_celery.start",
              Strategy=receipt.strategy(durable, start_now, keeps_eta=True),
              **receipt.TASK_OPTIONS)
    def start_task(self: Any, workflow: Any = None, state: Any = None, key: Any = None,
                   workflow_id: Any = None, version: Any = None,
                   key_reuse: Any = None) -> str | None:
        return apply_start(durable, self.request.id, workflow, state, key, workflow_id,
                           version, key_reuse)
