"""When a Celery task may run steps ahead (several steps in one task).

Celery's ``time_limit`` / ``soft_time_limit`` bound one *task*. A task that ran a chain of
steps would share one limit among them: a short, innocent step late in the chain would be
cut off by the time its predecessors used. So while a time limit applies to the task, it
runs one step and publishes the next: every step gets a fresh limit, as a step of its own
task. Run-ahead also stops while the worker shuts down (a warm shutdown waits for the task,
not for a chain of a hundred steps).

The limits come from the message (``timelimit`` header), the task (its options or
``task_annotations``), the app (``task_time_limit`` / ``task_soft_time_limit``) and the
worker (``--time-limit`` / ``--soft-time-limit``, captured by the bootstep before the pool
forks its children).
"""

from __future__ import annotations

from typing import Any

_worker: tuple[float | None, float | None] = (None, None)


def worker_limits(hard: float | None, soft: float | None) -> None:
    """The worker's own limits (command line or config), as the bootstep found them."""
    global _worker
    _worker = (hard, soft)


def applies(task: Any) -> bool:
    """True when a Celery time limit covers this execution of ``task``."""
    request = getattr(task, "request", None)
    header = getattr(request, "timelimit", None) or (None, None)
    conf = task.app.conf
    values = (*header, getattr(task, "time_limit", None), getattr(task, "soft_time_limit", None),
              conf.task_time_limit, conf.task_soft_time_limit, *_worker)
    return any(value for value in values)


def stopping() -> bool:
    """True once this worker process began a shutdown (threads and solo pools see it)."""
    from celery.worker import state

    return bool(state.should_stop or state.should_terminate)
