"""Messages sent by name carry data: apply them as they are received.

A step's message is a hint ("run step S of run W at seq N"): lost, the coordinator sends it
again from the run's row. A message another app sends by name -- ``durable_celery.start``,
``durable_celery.signal``, the controls, a ``@durable.task`` called by its name -- is the
only copy of what it carries until it is applied. Celery prefetches messages into a
worker's memory long before a pool process runs them; on Redis a prefetched message that
a SIGKILLed worker held comes back only after the visibility timeout (one hour by
default), and never if Redis restarts without persistence meanwhile.

So these tasks have their own Celery *strategy*: the worker's consumer applies the message
the moment it receives it -- the start, the signal or the control commits in Postgres --
and only then acknowledges it. Nothing by name waits unapplied in a worker's memory. A
message that is received twice (a redelivery, a duplicate send) is applied once: the
message id names the run, deduplicates the signal, keys the control.

When the database cannot be used (the worker is not ready, or the apply fails for lack of
it), the message takes Celery's ordinary path instead: a pool process runs the task,
which is acknowledged late and retried while the database is away. Messages with an eta
(a countdown) also take that path, except starts, which become durable timers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from durable_celery import errors
from durable_celery.runtime.readiness import Readiness

log = logging.getLogger("durable_celery.receipt")

# The by-name tasks on Celery's ordinary path (the fallback): acknowledged after they ran,
# re-queued if the worker dies, retried while the database is away; idempotent on
# redelivery, because the Celery message id stands in for a missing dedup_key,
# workflow_id or request key.
TASK_OPTIONS: dict[str, Any] = {
    "ignore_result": True, "serializer": "json", "typing": False, "shared": False,
    "bind": True, "acks_late": True, "reject_on_worker_lost": True,
    "autoretry_for": (errors.StorageError,), "retry_backoff": True, "retry_backoff_max": 60,
    "max_retries": None,
    # Marks the task for the coordinator (coordinator/redis_broker.py): a received message
    # of it that no worker acknowledged within stale_after is delivered again.
    "durable_by_name": True,
}


@dataclass(frozen=True, slots=True)
class Call:
    """A received by-name message: its id, arguments and eta."""

    id: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    eta: datetime | None = None


Apply = Callable[[Call], Any]


def decode(message: Any, body: Any) -> Call | None:
    """The call in a task message of protocol 2; None for what the ordinary path must
    handle (protocol 1, an expiring message, anything unexpected)."""
    payload = getattr(message, "payload", None)
    if isinstance(payload, dict) and "args" in payload:
        return None  # protocol 1
    headers = message.headers or {}
    if headers.get("expires") or not headers.get("id"):
        return None
    decoded = message.decode() if body is None else body
    args, kwargs = decoded[0], decoded[1]
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        return None
    eta = headers.get("eta")
    when = datetime.fromisoformat(eta) if isinstance(eta, str) else None
    return Call(id=str(headers["id"]), args=tuple(args), kwargs=dict(kwargs), eta=when)


def strategy(readiness: Readiness, apply: Apply, *, keeps_eta: bool = False) -> Any:
    """A Celery task ``Strategy`` that applies each message as it is received (see above).

    ``keeps_eta``: ``apply`` honours ``Call.eta`` itself (a start becomes a durable timer);
    otherwise a message with an eta takes the ordinary path.
    """

    def make(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
        from celery.worker.strategy import default

        ordinary = default(task, app, consumer, **kwargs)
        connection_errors = consumer.connection_errors

        def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                    **more: Any) -> Any:
            try:
                call = decode(message, body)
            except Exception:
                call = None
            if call is None or (call.eta is not None and not keeps_eta) \
                    or not readiness.ready:
                return ordinary(message, body, ack, reject, callbacks, **more)
            try:
                result = apply(call)
            except (errors.StorageError, errors.ConfigurationError) as exc:
                readiness.failed(exc)
                return ordinary(message, body, ack, reject, callbacks, **more)
            except Exception:
                log.warning("%s[%s] could not be applied as received; it runs as an "
                            "ordinary task", task.name, call.id, exc_info=True)
                return ordinary(message, body, ack, reject, callbacks, **more)
            if not task.ignore_result:
                try:
                    task.backend.mark_as_done(call.id, result, request=None)
                except Exception:
                    log.warning("%s[%s]: applied, but its result could not be stored",
                                task.name, call.id, exc_info=True)
            log.info("%s[%s] applied as received: %r", task.name, call.id, result)
            ack(log, connection_errors)  # as Celery's Request acknowledges: after the commit
            return None

        return handler

    # A class attribute of the task (``Task.Strategy``): kept a plain function.
    return staticmethod(make)
