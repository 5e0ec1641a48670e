"""Durable signals to runs (not Celery's signals), and the built-in tasks other Celery apps
call by name with JSON kwargs: ``durable_celery.signal`` and ``durable_celery.start``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from durable_celery import errors, payloads
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


# The by-name tasks are themselves at-least-once: acknowledged after they ran, re-queued if
# the worker dies, retried while the database is away; and idempotent on redelivery, because
# the Celery message id stands in for a missing dedup_key / workflow_id.
TASK_OPTIONS: dict[str, Any] = {
    "ignore_result": True, "serializer": "json", "typing": False, "shared": False,
    "bind": True, "acks_late": True, "reject_on_worker_lost": True,
    "autoretry_for": (errors.StorageError,), "retry_backoff": True, "retry_backoff_max": 60,
    "max_retries": None,
}


def register_tasks(durable: Durable) -> None:
    """Tasks callable by name from any Celery app, without importing workflow code."""
    app = durable.app

    @app.task(name="durable_celery.signal", **TASK_OPTIONS)
    def signal_task(self: Any, target: Any = None, name: Any = None, payload: Any = None,
                    dedup_key: Any = None) -> dict[str, Any] | None:
        if dedup_key is None and self.request.id:
            dedup_key = f"celery:{self.request.id}"
        try:
            result = send(durable, target, name, payload, dedup_key=dedup_key)
        except (errors.InvalidArgument, errors.NoTarget) as exc:
            log.error("durable_celery.signal refused: %s", exc)
            return None
        return {"workflow_id": result.workflow_id, "duplicate": result.duplicate,
                "woke": result.woke}

    @app.task(name="durable_celery.start", **TASK_OPTIONS)
    def start_task(self: Any, workflow: Any = None, state: Any = None, key: Any = None,
                   workflow_id: Any = None, version: Any = None,
                   key_reuse: Any = None) -> str | None:
        # The message id names the run unless the sender did: a redelivered message finds
        # its run, also after that run finished (its key may be free again by then).
        if workflow_id is None and self.request.id:
            workflow_id = str(self.request.id)
        try:
            wf = durable.get_definition(workflow, version)
            return wf.start(state, key=key, workflow_id=workflow_id, key_reuse=key_reuse)
        except errors.DuplicateWorkflow as exc:
            # Idempotent by key / id: the run the caller meant already exists.
            log.info("durable_celery.start: %s", exc)
            return exc.existing_id
        except errors.InvalidArgument as exc:
            log.error("durable_celery.start refused: %s", exc)
            return None
