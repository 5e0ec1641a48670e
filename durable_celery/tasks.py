"""``@durable.task``: a drop-in for ``@app.task`` whose calls are durable one-step runs.

A decorated function becomes a workflow named like the Celery task (``module.function``,
or ``name=``) with one step, ``run``. ``f.delay(...)`` stores the arguments as the run's
state (``{"args": [...], "kwargs": {...}}``, checked as JSON at call time) and returns a
:class:`TaskHandle`; the function's return value becomes the run's result. ``f(...)`` calls
the function inline, without durability, as Celery does.

Two Celery tasks are registered per function: ``durable.<name>.run`` (the step, what
workers execute) and ``<name>`` itself, so that ``app.send_task("<name>", args=[...])`` from
code that does not import the function still works: that message starts a durable run
whose workflow_id is the Celery message id (a redelivery starts nothing new).
"""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

from celery import exceptions as celery_exceptions

from durable_celery import errors, payloads, receipt
from durable_celery.checks import check_name, check_priority, check_seconds
from durable_celery.definitions import Done, Fail, Retry, RetryPolicy, Workflow
from durable_celery.runtime.readiness import Readiness
from durable_celery.settings import Settings
from durable_celery.storage.records import Status

if TYPE_CHECKING:
    from durable_celery.runtime.context import Context
    from durable_celery.storage.records import Run


class TaskOwner(Protocol):
    """What a durable task uses: the public API of the Durable that declared it (a task
    is a one-step workflow, started, awaited and cancelled as any run)."""

    app: Any
    settings: Settings

    def workflow(self, name: str, *, version: int = 1, queue: str | None = None,
                 run_ahead: bool | None = None, rate_limit: Any = None) -> Workflow: ...

    def get_workflow(self, workflow_id: str) -> Run: ...

    def wait_result(self, workflow_id: str, timeout: float | None = None) -> Any: ...

    def cancel_workflow(self, workflow_id: str, request_key: str, *,
                        reason: str | None = None) -> dict[str, Any]: ...

    def schedule(self, name: str, wf: Workflow | str, cron: str, *, timezone: str = "UTC",
                 state: Any = None, catchup: str = "latest", priority: int | None = None,
                 ) -> Any: ...

log = logging.getLogger("durable_celery.tasks")

STEP = "run"
_UNSET: Any = object()

# Celery decorator options that durable_celery accepts and ignores: results are always
# stored (in Postgres), messages are always JSON, acknowledgement is irrelevant (the claim
# decides), and time limits belong to the worker. (``rate_limit`` is honoured, globally:
# docs/flow-control.md.)
IGNORED_OPTIONS = frozenset({
    "ignore_result", "acks_late", "acks_on_failure_or_timeout", "reject_on_worker_lost",
    "track_started", "typing", "shared", "store_errors_even_if_ignored",
    "time_limit", "soft_time_limit", "expires", "trail", "send_events", "serializer",
})
OPTIONS = frozenset({
    "name", "queue", "retry", "bind", "max_retries", "default_retry_delay", "autoretry_for",
    "dont_autoretry_for", "retry_backoff", "retry_backoff_max", "retry_jitter", "priority",
    "rate_limit",
}) | IGNORED_OPTIONS
# apply_async options accepted and ignored (durable runs always store results, JSON only;
# publishing is retried by the coordinator).
IGNORED_CALL_OPTIONS = frozenset({"serializer", "ignore_result", "retry", "retry_policy"})

CELERY_STATES: dict[str, str] = {Status.RUNNABLE: "PENDING", Status.AWAITING: "PENDING",
                 Status.EXECUTING: "STARTED", Status.DONE: "SUCCESS", Status.FAILED: "FAILURE",
                 Status.CANCELLED: "REVOKED"}


def decorate(durable: TaskOwner, fn: Any, options: dict[str, Any], *,
             readiness: Readiness) -> Any:
    unknown = set(options) - OPTIONS
    if unknown:
        raise errors.InvalidArgument(
            f"unsupported @durable.task option(s) {sorted(unknown)}; supported: "
            f"{sorted(OPTIONS)}")
    if options.get("serializer", "json") != "json":
        raise errors.InvalidArgument("durable tasks only use the JSON serializer")

    def wrap(func: Any) -> DurableTask:
        if not callable(func) or isinstance(func, DurableTask):
            raise errors.InvalidArgument(f"@durable.task decorates a function, not {func!r}"[:300])
        return DurableTask(durable, func, readiness=readiness, **{k: v for k, v in options.items()
                                              if k not in IGNORED_OPTIONS})

    if fn is None:
        return wrap
    if isinstance(fn, str):
        raise errors.InvalidArgument("use @durable.task(name=...) to name a task")
    return wrap(fn)


class TaskRetry(celery_exceptions.Retry):  # type: ignore[misc]
    """Raised by ``self.retry()`` in a bound durable task: a durable Retry outcome."""

    def __init__(self, countdown: float, exc: BaseException | None = None) -> None:
        super().__init__(exc=exc, when=countdown)
        self.countdown = countdown


class DurableTask:
    """What ``@durable.task`` returns: callable inline, ``.delay()``/``.apply_async()``
    start durable runs."""

    def __init__(self, durable: TaskOwner, fn: Any, *, readiness: Readiness,
                 name: str | None = None,
                 queue: str | None = None, retry: Any = None, bind: bool = False,
                 max_retries: Any = _UNSET, default_retry_delay: float = 180.0,
                 autoretry_for: Any = (), dont_autoretry_for: Any = (),
                 retry_backoff: Any = False, retry_backoff_max: float = 600.0,
                 retry_jitter: bool = True, priority: int | None = None,
                 rate_limit: Any = None) -> None:
        self.durable = durable
        self.readiness = readiness
        self.run = self.__wrapped__ = fn
        self.name = check_name(
            durable.app.gen_task_name(fn.__name__, fn.__module__) if name is None else name,
            "task name")
        if not isinstance(bind, bool):
            raise errors.InvalidArgument(f"bind must be a bool, got {bind!r}")
        self.bind = bind
        self.autoretry_for = _exception_types(autoretry_for, "autoretry_for")
        self.dont_autoretry_for = _exception_types(dont_autoretry_for, "dont_autoretry_for")
        if max_retries is not _UNSET and max_retries is not None and (
                isinstance(max_retries, bool) or not isinstance(max_retries, int)
                or max_retries < 0):
            raise errors.InvalidArgument(f"max_retries must be an int >= 0 or None, "
                                         f"got {max_retries!r}")
        self.max_retries: int | None = 3 if max_retries is _UNSET else max_retries
        self.default_retry_delay = check_seconds(default_retry_delay, "default_retry_delay")
        self.priority = check_priority(priority)
        policy = RetryPolicy.parse(retry) if retry is not None else self._celery_policy(
            retry_backoff, retry_backoff_max, retry_jitter)
        # Celery's rate_limit ("10/s", "100/m") holds across every worker, not per worker.
        self.rate_limit = rate_limit
        self.workflow = durable.workflow(self.name, queue=queue, rate_limit=rate_limit)
        self.workflow.step(name=STEP, retry=policy)(self._step)
        self._register_entry()
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self.__module__ = fn.__module__

    def _celery_policy(self, backoff: Any, backoff_max: Any, jitter: Any) -> RetryPolicy:
        """Celery's automatic retries: only with ``autoretry_for`` (else none)."""
        if not self.autoretry_for:
            return RetryPolicy(max_attempts=1)
        attempts = 1_000_000 if self.max_retries is None else self.max_retries + 1
        if backoff is False or backoff is None:
            return RetryPolicy.parse({"max_attempts": attempts, "backoff": "constant",
                                      "delay": self.default_retry_delay, "jitter": False,
                                      "max_delay": max(self.default_retry_delay, 300.0)})
        base = 1.0 if backoff is True else backoff
        return RetryPolicy.parse({"max_attempts": attempts, "backoff": "exponential",
                                  "delay": base, "max_delay": backoff_max, "jitter": jitter})

    def _register_entry(self) -> None:
        """``<name>`` itself, for ``app.send_task("<name>", args=[...])`` from code that does
        not import the function: the message starts a durable run named by its id (a
        redelivery starts nothing new), applied as it is received (its countdown becomes
        a durable timer); see :mod:`durable_celery.receipt`."""
        task = self

        def on_receipt(call: receipt.Call) -> str | None:
            return task._start_by_name(call.id, call.args, call.kwargs, call.eta)

        def entry(celery_task: Any, *args: Any, **kwargs: Any) -> str | None:
            wid = str(celery_task.request.id) if celery_task.request.id else None
            return task._start_by_name(wid, args, kwargs, None)

        entry.__name__ = entry.__qualname__ = re.sub(r"\W", "_", self.name)
        self.durable.app.task(
            name=self.name, Strategy=receipt.strategy(self.readiness, on_receipt, keeps_eta=True),
            **receipt.TASK_OPTIONS)(entry)

    def _start_by_name(self, message_id: str | None, args: Any, kwargs: Any,
                       eta: datetime | None) -> str | None:
        try:
            return self.apply_async(args, kwargs, workflow_id=message_id, eta=eta).id
        except errors.DuplicateWorkflow as exc:
            return exc.existing_id  # a redelivered message: the run exists
        except errors.InvalidArgument as exc:
            log.error("task %s refused: %s", self.name, exc)
            return None

    # ------------------------------------------------------------------ inside the worker

    def _step(self, ctx: Context) -> Any:
        args = ctx.state.get("args", [])
        kwargs = ctx.state.get("kwargs", {})
        head = [BoundTask(self, ctx, args, kwargs)] if self.bind else []
        try:
            result = self.run(*head, *args, **kwargs)
        except TaskRetry as requested:
            return Retry(delay=requested.countdown)
        except Exception as exc:
            if self.autoretry_for and (not isinstance(exc, self.autoretry_for)
                                       or isinstance(exc, self.dont_autoretry_for or ())):
                return Fail(f"{type(exc).__name__}: {exc}")
            raise  # the step's retry policy decides
        return Done(result)

    # ------------------------------------------------------------------ calling

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function inline (no durability), like calling a Celery task."""
        if self.bind:
            return self.run(BoundTask(self, None, list(args), kwargs), *args, **kwargs)
        return self.run(*args, **kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> TaskHandle:
        """Start a durable run with these arguments (JSON); returns its handle."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Any = None, kwargs: Any = None, *, countdown: Any = None,
                    eta: Any = None, queue: str | None = None, key: str | None = None,
                    workflow_id: str | None = None, task_id: str | None = None,
                    priority: int | None = None, concurrency_key: str | None = None,
                    connection: Any = None, key_reuse: str | None = None,
                    **options: Any) -> TaskHandle:
        """Start a durable run. ``countdown`` (seconds) / ``eta`` (a datetime; naive means
        UTC) become a durable timer: no broker message and no worker holds it meanwhile.
        ``key`` / ``key_reuse``: a business key, as in ``Workflow.start``."""
        unknown = set(options) - IGNORED_CALL_OPTIONS
        if unknown:
            raise errors.InvalidArgument(
                f"unsupported apply_async option(s) {sorted(unknown)} for durable task "
                f"{self.name}")
        if options.get("serializer", "json") != "json":
            raise errors.InvalidArgument("durable tasks only use the JSON serializer")
        if args is None:
            args = ()
        if kwargs is None:
            kwargs = {}
        if not isinstance(args, (list, tuple)):
            raise errors.InvalidArgument(f"args must be a list or tuple, got {type(args).__name__}")
        if not isinstance(kwargs, dict):
            raise errors.InvalidArgument(f"kwargs must be a dict, got {type(kwargs).__name__}")
        limit = self.durable.settings.max_payload_bytes
        payloads.check(list(args), what=f"the arguments of task {self.name}", max_bytes=limit)
        payloads.check(kwargs, what=f"the keyword arguments of task {self.name}", max_bytes=limit)
        if workflow_id is not None and task_id is not None and workflow_id != task_id:
            raise errors.InvalidArgument("pass workflow_id= or task_id=, not both")
        if countdown is not None and eta is not None:
            raise errors.InvalidArgument("pass countdown= or eta=, not both")
        delay = None if countdown is None else check_seconds(countdown, "countdown")
        at = None
        if eta is not None:
            if not isinstance(eta, datetime):
                raise errors.InvalidArgument(f"eta must be a datetime, got {eta!r}"[:300])
            at = eta if eta.tzinfo is not None else eta.replace(tzinfo=timezone.utc)
        wid = self.workflow.start(
            {"args": list(args), "kwargs": kwargs}, workflow_id=workflow_id or task_id,
            key=key, delay=delay, at=at, queue=queue,
            priority=self.priority if priority is None else priority,
            concurrency_key=concurrency_key, connection=connection, key_reuse=key_reuse)
        return TaskHandle(self.durable, wid)

    def schedule(self, name: str, cron: str, *, args: Any = (), kwargs: Any = None,
                 timezone: str = "UTC", catchup: str = "latest") -> Any:
        """Call this task on a cron schedule with fixed arguments."""
        state = {"args": list(args) if isinstance(args, (list, tuple)) else args,
                 "kwargs": {} if kwargs is None else kwargs}
        return self.durable.schedule(name, self.workflow, cron=cron, timezone=timezone,
                                     state=state, catchup=catchup)

    def __repr__(self) -> str:
        return f"<@durable.task {self.name}>"


class BoundTask:
    """``self`` of a ``bind=True`` task: ``self.request``, ``self.retry()``, ``self.name``."""

    def __init__(self, task: DurableTask, ctx: Context | None, args: Any, kwargs: Any) -> None:
        self.task = task
        self.ctx = ctx
        self.name = task.name
        self.app = task.durable.app
        self.max_retries = task.max_retries
        self.default_retry_delay = task.default_retry_delay
        self.request = SimpleNamespace(
            id=None if ctx is None else ctx.workflow_id, task=task.name, args=args,
            kwargs=kwargs, retries=0 if ctx is None else ctx.attempt,
            called_directly=ctx is None, delivery_info={}, eta=None, hostname=None,
            idempotency_key=None if ctx is None else ctx.idempotency_key)

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None,
              throw: bool = True, eta: datetime | None = None, countdown: float | None = None,
              max_retries: int | None = None, **_options: Any) -> TaskRetry:
        """Retry this call durably after ``countdown`` (default ``default_retry_delay``)."""
        if args is not None or kwargs is not None:
            raise errors.InvalidArgument("durable tasks retry with the same arguments")
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and self.request.retries >= limit:
            if exc is not None:
                raise exc
            raise celery_exceptions.MaxRetriesExceededError(
                f"Can't retry {self.name}[{self.request.id}] args:{self.request.args} "
                f"kwargs:{self.request.kwargs}")
        if eta is not None:
            aware = eta if eta.tzinfo is not None else eta.replace(tzinfo=timezone.utc)
            delay = max((aware - datetime.now(timezone.utc)).total_seconds(), 0.0)
        else:
            delay = self.default_retry_delay if countdown is None else countdown
        delay = check_seconds(delay, "countdown")
        raise TaskRetry(delay, exc)


class TaskHandle:
    """What ``.delay()`` returns: like Celery's ``AsyncResult``, backed by the run."""

    def __init__(self, durable: TaskOwner, workflow_id: str) -> None:
        self.durable = durable
        self.id = self.task_id = self.workflow_id = workflow_id

    def run(self) -> Run:
        """The run's snapshot (``durable.get_workflow``)."""
        return self.durable.get_workflow(self.id)

    @property
    def status(self) -> str:
        """Celery's names: PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED."""
        run = self.run()
        if run.status == Status.RUNNABLE and run.attempt > 0:
            return "RETRY"
        return CELERY_STATES.get(run.status, run.status.upper())

    state = status

    def ready(self) -> bool:
        return self.run().is_terminal

    def successful(self) -> bool:
        return self.run().status == Status.DONE

    def failed(self) -> bool:
        return self.run().status == Status.FAILED

    @property
    def result(self) -> Any:
        """The return value once done, the error once failed, else None (like Celery)."""
        run = self.run()
        return run.result if run.status == Status.DONE else run.error

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float | None = None, **_celery: Any) -> Any:
        """Wait for the result; raises like ``durable.wait_result`` (``WorkflowFailed``,
        ``WorkflowCancelled``, ``WaitTimeout``), or with ``propagate=False`` returns the
        error of a failed run."""
        try:
            return self.durable.wait_result(self.id, timeout=timeout)
        except (errors.WorkflowFailed, errors.WorkflowCancelled) as exc:
            if propagate:
                raise
            return exc.details.get("error")

    wait = get

    def revoke(self, request_key: str | None = None, **_celery: Any) -> dict[str, Any]:
        """Cancel the run durably (``durable.cancel_workflow``); ``request_key`` makes a
        retried revoke idempotent (default: a fresh key)."""
        key = request_key or f"revoke:{self.id}:{time.time_ns()}"
        return self.durable.cancel_workflow(self.id, key)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TaskHandle):
            return other.id == self.id
        return isinstance(other, str) and other == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id}>"


def _exception_types(value: Any, what: str) -> tuple[type[BaseException], ...]:
    items = value if isinstance(value, (list, tuple)) else (value,) if value else ()
    for item in items:
        if not (isinstance(item, type) and issubclass(item, Exception)):
            raise errors.InvalidArgument(f"{what} must list exception classes, got {item!r}"[:300])
    return tuple(items)


__all__ = ["BoundTask", "DurableTask", "TaskHandle", "TaskRetry", "decorate"]
