"""Everything Celery sees: the step tasks, and the tasks other Celery apps call by name
with JSON kwargs (``durable_celery.start``, ``durable_celery.signal``, the controls).

One Celery task per step, named ``durable.<workflow>.<step>``; the by-name tasks are applied
as they are received (:mod:`durable_celery.receipt`). The worker bootstep is in
:mod:`durable_celery.coordinator.bootstep`. Each function is handed the parts it wires.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import Any

from durable_celery import errors, receipt
from durable_celery.controls import Controls
from durable_celery.definitions import Registry, Step, Workflow
from durable_celery.runtime import limits
from durable_celery.runtime.executor import Executor
from durable_celery.runtime.readiness import Readiness
from durable_celery.signals import Signals

log = logging.getLogger("durable_celery.signals")
control_log = logging.getLogger("durable_celery.controls")


def register_step(app: Any, wf: Workflow, step: Step, *, executor: Executor,
                  readiness: Readiness) -> None:
    """The Celery task of one step (the caller registers each name once)."""
    name = wf.task_name(step)

    def run_step(task: Any, workflow_id: Any, seq: Any) -> None:
        try:
            # A timer published ahead of its due time comes with an eta (timer_lead).
            # Under a Celery time limit, every step is its own task (no run-ahead).
            executor.execute(workflow_id, seq, early=task.request.eta is not None,
                             run_ahead=not limits.applies(task))
        except (errors.StorageError, errors.ConfigurationError) as exc:
            if isinstance(exc, errors.StorageError) and not exc.transient:
                raise
            # The database is away or not migrated: readiness logged it (one line, no
            # traceback); this message, a hint, waits in the broker for the backoff.
            wait = exc.retry_in if isinstance(exc, errors.NotReady) else readiness.failed(exc)
            raise task.retry(countdown=max(wait, 0.5), max_retries=None) from None

    run_step.__name__ = run_step.__qualname__ = re.sub(r"\W", "_", f"{wf.name}__{step.name}")
    # shared=False: the task belongs to this app only. No queue= option (deprecated in
    # Celery 5.7): every publish names its queue explicitly.
    # A step's own time limits are its task's (Celery enforces them in the prefork pool).
    app.task(name=name, ignore_result=True, serializer="json", acks_late=False,
             typing=False, shared=False, bind=True, time_limit=step.time_limit,
             soft_time_limit=step.soft_time_limit)(run_step)


def apply_start(registry: Registry, message_id: str | None, workflow: Any = None,
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
        wf = registry.get(workflow, version)
        return wf.start(state, key=key, workflow_id=workflow_id, key_reuse=key_reuse, at=at)
    except errors.DuplicateWorkflow as exc:
        # Idempotent by key / id: the run the caller meant already exists.
        log.info("durable_celery.start: %s", exc)
        return exc.existing_id
    except errors.InvalidArgument as exc:
        log.error("durable_celery.start refused: %s", exc)
        return None


def register_by_name(app: Any, *, registry: Registry, signals: Signals, controls: Controls,
                     readiness: Readiness) -> None:
    """Tasks callable by name from any Celery app, without importing workflow code."""

    def signal_now(call: receipt.Call) -> Any:
        return signals.apply_by_name(call.id, *call.args, **call.kwargs)

    def start_now(call: receipt.Call) -> Any:
        return apply_start(registry, call.id, *call.args, **call.kwargs, at=call.eta)

    @app.task(name="durable_celery.signal", Strategy=receipt.strategy(readiness, signal_now),
              **receipt.TASK_OPTIONS)
    def signal_task(self: Any, target: Any = None, name: Any = None, payload: Any = None,
                    dedup_key: Any = None) -> dict[str, Any] | None:
        return signals.apply_by_name(self.request.id, target, name, payload, dedup_key)

    @app.task(name="durable_celery.start",
              Strategy=receipt.strategy(readiness, start_now, keeps_eta=True),
              **receipt.TASK_OPTIONS)
    def start_task(self: Any, workflow: Any = None, state: Any = None, key: Any = None,
                   workflow_id: Any = None, version: Any = None,
                   key_reuse: Any = None) -> str | None:
        return apply_start(registry, self.request.id, workflow, state, key, workflow_id,
                           version, key_reuse)

    _register_controls(app, controls, readiness)


def _register_controls(app: Any, controls: Controls, readiness: Readiness) -> None:
    """``durable_celery.cancel_workflow`` / ``resume_workflow`` / ``fork_workflow``: call by
    name from any Celery app with JSON kwargs, applied as they are received. A refused
    request is logged and its error body returned (it is not retried); a database outage
    is retried."""
    options = {**receipt.TASK_OPTIONS, "ignore_result": False}

    def guarded(call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return dict(call(*args, **kwargs))
        except errors.ControlError as exc:
            control_log.error("%s refused: %s", call.__name__, exc)
            return {"ok": False, **exc.body, "status": exc.status}

    def cancel(workflow_id: Any = None, request_key: Any = None, reason: Any = None,
               ttl_days: Any = 7, cleanup_interval_seconds: Any = 300) -> dict[str, Any]:
        return guarded(controls.cancel, workflow_id, request_key, reason=reason,
                       ttl_days=ttl_days, cleanup_interval_seconds=cleanup_interval_seconds)

    def resume(workflow_id: Any = None, request_key: Any = None, ttl_days: Any = 7,
               cleanup_interval_seconds: Any = 300) -> dict[str, Any]:
        return guarded(controls.resume, workflow_id, request_key, ttl_days=ttl_days,
                       cleanup_interval_seconds=cleanup_interval_seconds)

    def fork(workflow_id: Any = None, request_key: Any = None, start_step: Any = None,
             new_workflow_id: Any = None, application_version: Any = None, ttl_days: Any = 7,
             cleanup_interval_seconds: Any = 300) -> dict[str, Any]:
        return guarded(controls.fork, workflow_id, request_key, start_step=start_step,
                       new_workflow_id=new_workflow_id,
                       application_version=application_version, ttl_days=ttl_days,
                       cleanup_interval_seconds=cleanup_interval_seconds)

    for name, apply in (("cancel_workflow", cancel), ("resume_workflow", resume),
                        ("fork_workflow", fork)):
        def on_receipt(call: receipt.Call, apply: Any = apply) -> Any:
            return apply(*call.args, **call.kwargs)

        def task(self: Any, *args: Any, apply: Any = apply, **kwargs: Any) -> Any:
            return apply(*args, **kwargs)

        task.__name__ = task.__qualname__ = f"{name}_task"
        app.task(name=f"durable_celery.{name}", Strategy=receipt.strategy(readiness, on_receipt),
                 **options)(task)
