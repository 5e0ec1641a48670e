"""Durable: binds a Celery app to a Postgres database; declares workflows; starts runs."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime, timedelta
from datetime import timezone as tz
from typing import Any

from celery import Celery

from durable_celery import errors, forksafe, payloads
from durable_celery import settings as settings_mod
from durable_celery import signals as signals_mod
from durable_celery.definitions import Workflow, check_name, check_run_ahead, check_seconds
from durable_celery.runtime import executor, limits
from durable_celery.runtime.readiness import Readiness
from durable_celery.runtime.worker import WorkerIdentity
from durable_celery.storage import migrate as migrate_mod
from durable_celery.storage import outbox
from durable_celery.storage.engine import EngineHolder
from durable_celery.storage.listener import Endings
from durable_celery.storage.records import (
    STATUSES,
    TERMINAL,
    Dispatch,
    Run,
    SignalResult,
    StepRecord,
)
from durable_celery.storage.schedules import Schedule, ScheduleStore
from durable_celery.storage.store import Store

log = logging.getLogger("durable_celery")

MAX_ID = 200
MAX_VERSION = 2**31 - 1
_inline = threading.local()  # testing.drain runs steps without publishing


def check_identifier(value: Any, what: str) -> str:
    """workflow ids, keys, dedup keys: 1-200 characters, not blank, no NUL."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID \
            or not payloads.storable(value):
        raise errors.InvalidArgument(
            f"{what} must be a non-blank string of at most {MAX_ID} characters without NUL or "
            f"lone surrogates; got {value!r}"[:400]
        )
    return value


class Durable:
    """Durable workflows for a Celery app.

    ``database_url`` falls back to the Celery setting ``durable_database_url`` and the
    environment variable ``DURABLE_CELERY_DATABASE_URL``. Other settings (``**more``) are
    listed in :class:`durable_celery.settings.Settings`.
    """

    def __init__(self, app: Celery, database_url: str | None = None, *,
                 heartbeat_interval: float | None = None, stale_after: float | None = None,
                 sweep_interval: float | None = None, redispatch_after: float | None = None,
                 retention: timedelta | None = None, **more: Any) -> None:
        if not isinstance(app, Celery):
            raise errors.ConfigurationError(f"Durable needs a Celery app, got {app!r}")
        self.app = app
        self.settings = settings_mod.build(
            {"database_url": database_url, "heartbeat_interval": heartbeat_interval,
             "stale_after": stale_after, "sweep_interval": sweep_interval,
             "redispatch_after": redispatch_after, "retention": retention, **more},
            celery_conf=app.conf,
        )
        if not self.settings.database_url:
            raise errors.ConfigurationError(
                "no database URL: pass Durable(app, database_url=...), set the Celery setting "
                "durable_database_url, or the environment variable DURABLE_CELERY_DATABASE_URL"
            )
        accepted = {str(c).lower() for c in (app.conf.accept_content or ())}
        if accepted & {"pickle", "application/x-python-serialize"}:
            raise errors.ConfigurationError(
                "this Celery app accepts pickle messages (accept_content); durable_celery "
                "only works with apps that never unpickle: set accept_content=['json']"
            )
        self._holder = EngineHolder(self.settings.database_url, pool_size=self.settings.pool_size,
                                    liveness=self.settings.stale_after)
        self.store = Store(self._holder, redispatch_after=self.settings.redispatch_after,
                           redispatch_max_backoff=self.settings.redispatch_max_backoff)
        self.schedules = ScheduleStore(self._holder, self.store)
        self._endings = Endings(self._holder)
        self._workflows: dict[tuple[str, int], Workflow] = {}
        self._latest: dict[str, Workflow] = {}
        self._tasks: set[str] = set()
        self._readiness = Readiness(self._prepare)
        self._ident_lock = forksafe.Lock()
        self._ident: WorkerIdentity | None = None
        self._coordinator: Any = None
        self._redis_broker: bool | None = None
        self._controls: Any = None
        app._durable_celery = self  # found by the CLI
        self._install()

    # ------------------------------------------------------------------ declaring

    def workflow(self, name: str, *, version: int = 1, queue: str | None = None,
                 run_ahead: bool | None = None) -> Workflow:
        """Declare a workflow; add steps with ``@wf.step``."""
        check_name(name, "workflow name")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
            raise errors.InvalidArgument(f"version must be an int in 1..{MAX_VERSION}, got {version!r}")
        check_run_ahead(run_ahead)
        if queue is not None:
            check_name(queue, "queue")
        if (name, version) in self._workflows:
            raise errors.InvalidArgument(f"workflow {name!r} v{version} is already declared")
        wf = Workflow(durable=self, name=name, version=version, queue=queue, run_ahead=run_ahead)
        self._workflows[(name, version)] = wf
        latest = self._latest.get(name)
        if latest is None or latest.version < version:
            self._latest[name] = wf
        return wf

    def check_definitions(self) -> None:
        """Raise ``InvalidArgument`` if a declared workflow is incomplete (a step's
        ``compensate=`` naming no compensation). Workers check at start."""
        for wf in self._workflows.values():
            wf.check()

    def get_definition(self, name: str, version: int | None = None) -> Workflow:
        """The registered workflow ``name`` (its highest version unless ``version``)."""
        if not isinstance(name, str):
            raise errors.UnknownWorkflow(f"a workflow name is a string, got {name!r}"[:300])
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise errors.InvalidArgument(f"version must be an int, got {version!r}"[:300])
        wf = self._latest.get(name) if version is None else self._workflows.get((name, version))
        if wf is None:
            known = sorted({n for n, _ in self._workflows})
            raise errors.UnknownWorkflow(
                f"no workflow {name!r}{'' if version is None else f' v{version}'} is registered;"
                f" known: {known}", workflow=str(name))
        return wf

    def task(self, fn: Any = None, **options: Any) -> Any:
        """Drop-in for ``@app.task``: a one-step durable workflow per function.

        ``f(...)`` runs inline; ``f.delay(...)`` / ``f.apply_async(...)`` start a durable
        run and return a :class:`~durable_celery.tasks.TaskHandle`. Options: ``name``,
        ``queue``, ``retry={...}`` and Celery's ``bind``, ``max_retries``,
        ``default_retry_delay``, ``autoretry_for``, ``retry_backoff``... (see docs/drop-in.md).
        """
        from durable_celery import tasks

        return tasks.decorate(self, fn, options)

    # ------------------------------------------------------------------ cron

    def schedule(self, name: str, wf: Workflow | str, cron: str, *, timezone: str = "UTC",
                 state: Any = None, catchup: str = "latest",
                 priority: int | None = None) -> Schedule:
        """Start ``wf`` at every occurrence of ``cron`` in ``timezone`` (an IANA name).

        Idempotent: declaring the same schedule again (every process start) updates it and
        keeps its place in time. Every occurrence fires exactly once however many
        coordinators run; ``catchup`` ("latest", "all" or "none") says what happens to
        occurrences missed while no coordinator ran.
        """
        from durable_celery.coordinator import cron as cron_mod

        return cron_mod.schedule(self, name, wf, cron=cron, timezone=timezone, state=state,
                                 catchup=catchup, priority=priority)

    def list_schedules(self) -> list[Schedule]:
        self._ensure_ready()
        return self.schedules.all()

    def pause_schedule(self, name: str) -> Schedule:
        """Stop firing (until ``resume_schedule``); raises ``ScheduleNotFound``."""
        check_name(name, "schedule name")
        self._ensure_ready()
        return self.schedules.pause(name)

    def resume_schedule(self, name: str) -> Schedule:
        """Fire again from the next occurrence; those missed while paused are skipped."""
        from durable_celery.coordinator import cron as cron_mod

        return cron_mod.resume(self, name)

    def delete_schedule(self, name: str) -> None:
        """Remove a schedule (runs it started are untouched); raises ``ScheduleNotFound``."""
        check_name(name, "schedule name")
        self._ensure_ready()
        self.schedules.delete(name)

    @property
    def default_queue(self) -> str:
        return str(self.app.conf.task_default_queue or "celery")

    def _register_step(self, wf: Workflow, step: Any) -> None:
        name = wf.task_name(step)
        if name in self._tasks:
            return
        self._tasks.add(name)
        durable = self

        def run_step(task: Any, workflow_id: Any, seq: Any) -> None:
            try:
                # A timer published ahead of its due time comes with an eta (timer_lead).
                # Under a Celery time limit, every step is its own task (no run-ahead).
                executor.execute(durable, workflow_id, seq, early=task.request.eta is not None,
                                 run_ahead=not limits.applies(task))
            except (errors.StorageError, errors.ConfigurationError) as exc:
                if isinstance(exc, errors.StorageError) and not exc.transient:
                    raise
                # The database is away or not migrated: readiness logged it (one line, no
                # traceback); this message, a hint, waits in the broker for the backoff.
                wait = exc.retry_in if isinstance(exc, errors.NotReady) \
                    else durable._readiness.failed(exc)
                raise task.retry(countdown=max(wait, 0.5), max_retries=None) from None

        run_step.__name__ = run_step.__qualname__ = re.sub(r"\W", "_", f"{wf.name}__{step.name}")
        # shared=False: the task belongs to this app only. No queue= option (deprecated in
        # Celery 5.7): every publish names its queue explicitly.
        self.app.task(name=name, ignore_result=True, serializer="json", acks_late=False,
                      typing=False, shared=False, bind=True)(run_step)

    def _install(self) -> None:
        from durable_celery import controls
        from durable_celery.coordinator import bootstep

        bootstep.install(self)
        signals_mod.register_tasks(self)
        controls.register_tasks(self)

    # ------------------------------------------------------------------ schema

    def migrate(self) -> list[int]:
        """Apply pending migrations (safe to call concurrently); returns versions applied."""
        applied = migrate_mod.migrate(self._holder)
        self._readiness.succeeded()
        return applied

    def _prepare(self) -> None:
        """Make this process's database usable: migrate, or (auto_migrate off) check."""
        if self.settings.auto_migrate:
            migrate_mod.migrate(self._holder)
        else:
            migrate_mod.check(self._holder)

    def _ensure_ready(self, *, wait: bool = True) -> None:
        # No lock around the migration (a forked child must never inherit a held lock):
        # concurrent migrations serialize on the database's advisory lock.
        self._readiness.ensure(wait=wait)

    def readiness(self) -> dict[str, Any]:
        """Whether this process can use the database: ``{"ready", "reason", "retry_in"}``.
        ``reason`` says what is wrong and what to do (a worker also logs it)."""
        return self._readiness.state()

    # ------------------------------------------------------------------ runs

    def _start(self, wf: Workflow, state: Any, *, workflow_id: str | None, key: str | None,
               delay: float | None, at: datetime | None, queue: str | None,
               priority: int | None = None, concurrency_key: str | None = None,
               connection: Any = None, what: str = "state",
               key_reuse: str | None = None) -> str:
        if self._workflows.get((wf.name, wf.version)) is not wf:
            raise errors.UnknownWorkflow(f"workflow {wf.name!r} is not registered here")
        first = wf.first
        state = {} if state is None else state
        text = payloads.check_object(state, what=what, max_bytes=self.settings.max_payload_bytes)
        if workflow_id is not None:
            check_identifier(workflow_id, "workflow_id")
        if key is not None:
            check_identifier(key, "key")
        if concurrency_key is not None:
            check_identifier(concurrency_key, "concurrency_key")
        policy = check_key_reuse(key_reuse, self.settings.key_reuse)
        prio = check_priority(priority)
        if queue is not None:
            check_name(queue, "queue")
        if delay is not None and at is not None:
            raise errors.InvalidArgument("pass delay= or at=, not both")
        if delay is not None:
            check_seconds(delay, "delay")
        if at is not None and (not isinstance(at, datetime) or at.tzinfo is None):
            raise errors.InvalidArgument("at must be a timezone-aware datetime")
        bound = None if connection is None else outbox.Bound(connection, self._holder.url)
        self._ensure_ready()
        options: dict[str, Any] = {
            "workflow": wf.name, "version": wf.version, "step": first.name,
            "queue": wf.queue_for(first, queue), "run_queue": queue, "state": text, "key": key,
            "delay": float(delay or 0.0), "at": at, "priority": prio,
            "concurrency_key": concurrency_key, "key_reuse": policy}
        dispatch = Dispatch(workflow_id="", workflow=wf.name, step=first.name, seq=0,
                            queue=wf.queue_for(first, queue), priority=prio)
        if bound is None:
            run_id, publish = self.store.start(workflow_id=workflow_id, **options)
            if publish:
                self._publish(replace(dispatch, workflow_id=run_id))
            return run_id
        # In the caller's transaction: published after its commit (or by the coordinator).
        run_id = workflow_id or str(uuid.uuid4())
        with bound.execute() as conn:
            found = self.store.start_on(conn, run_id, parent_id=None, forked_from=None,
                                        app_version=None, redispatch=outbox.OUTBOX_DELAY,
                                        **options)
        if found is None:
            raise errors.DuplicateWorkflow(f"key {key!r} is contended", existing_id=None, key=key)
        if found:
            bound.after_commit(lambda: self._publish(replace(dispatch, workflow_id=run_id)),
                               visible=lambda: self.store.exists(run_id))
        return run_id

    def _start_many(self, wf: Workflow, states: Any, *, keys: Any, workflow_ids: Any,
                    delay: float | None, at: datetime | None, queue: str | None,
                    on_conflict: str, key_reuse: str | None = None) -> list[str]:
        if self._workflows.get((wf.name, wf.version)) is not wf:
            raise errors.UnknownWorkflow(f"workflow {wf.name!r} is not registered here")
        first = wf.first
        if on_conflict not in ("raise", "existing"):
            raise errors.InvalidArgument(
                f"on_conflict must be 'raise' or 'existing', got {on_conflict!r}"[:300])
        items = _batch(states, "states")
        if len(items) > MAX_BATCH:
            raise errors.InvalidArgument(f"at most {MAX_BATCH} runs per start_many call, "
                                         f"got {len(items)}")
        texts = [payloads.check_object({} if st is None else st, what=f"state #{i}",
                                       max_bytes=self.settings.max_payload_bytes)
                 for i, st in enumerate(items)]
        key_list = _batch_identifiers(keys, "keys", len(items))
        policy = check_key_reuse(key_reuse, self.settings.key_reuse)
        id_list = _batch_identifiers(workflow_ids, "workflow_ids", len(items))
        if queue is not None:
            check_name(queue, "queue")
        if delay is not None and at is not None:
            raise errors.InvalidArgument("pass delay= or at=, not both")
        if delay is not None:
            check_seconds(delay, "delay")
        if at is not None and (not isinstance(at, datetime) or at.tzinfo is None):
            raise errors.InvalidArgument("at must be a timezone-aware datetime")
        if not items:
            return []
        self._ensure_ready()
        target_queue = wf.queue_for(first, queue)
        run_ids, new, publish = self.store.start_many(
            workflow=wf.name, version=wf.version, step=first.name, queue=target_queue,
            run_queue=queue, states=texts, keys=key_list, workflow_ids=id_list,
            delay=float(delay or 0.0), at=at, existing=on_conflict == "existing",
            key_reuse=policy)
        if publish:
            self._publish_many([Dispatch(workflow_id=run_id, workflow=wf.name, step=first.name,
                                         seq=0, queue=target_queue, priority=0)
                                for run_id in new])
        return run_ids

    def _publish(self, dispatch: Dispatch) -> bool:
        """Send the hint "run this step at this seq"; on failure the sweep re-sends it."""
        return self._publish_many([dispatch]) == 1

    def _publish_many(self, dispatches: list[Dispatch]) -> int:
        """Publish in order; at the first broker failure stop, and let the dispatcher
        re-send the rest a little later. Returns how many were published."""
        if getattr(_inline, "active", False):
            return len(dispatches)
        for index, dispatch in enumerate(dispatches):
            args = [dispatch.workflow_id, dispatch.seq]
            try:
                # argsrepr/kwargsrepr given: Celery's saferepr of them is a tenth of a publish.
                self.app.send_task(
                    f"durable.{dispatch.workflow}.{dispatch.step}",
                    args=args, argsrepr=repr(args), kwargsrepr="{}", queue=dispatch.queue,
                    serializer="json", ignore_result=True,
                    priority=self._broker_priority(dispatch.priority),
                    eta=None if dispatch.eta is None else datetime.fromtimestamp(
                        dispatch.eta, tz.utc),
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

    def _broker_priority(self, priority: int) -> int:
        """Our priorities run 0 (default) .. 9 (first), as on RabbitMQ; Redis (kombu) serves
        0 first, so the value is mirrored there."""
        if self._redis_broker is None:
            from durable_celery.coordinator.redis_broker import is_redis

            self._redis_broker = is_redis(self.app)
        return 9 - priority if self._redis_broker else priority

    def signal(self, target: str, name: str, payload: Any = None, *,
               dedup_key: str | None = None, connection: Any = None) -> SignalResult:
        """Send a durable signal to a run, by workflow_id or business key.

        The signal is stored in the run's inbox (once per ``dedup_key``) and wakes the run
        if it awaits ``name``; otherwise it waits there for a later ``Await``. Raises
        ``NoTarget`` when no live run has this id or key. With ``connection=`` (a SQLAlchemy
        Connection or Session of your transaction) it commits or rolls back with your data.
        """
        return signals_mod.send(self, target, name, payload, dedup_key=dedup_key,
                                connection=connection)

    # ------------------------------------------------------------------ queries

    def get_workflow(self, workflow_id: str) -> Run:
        """A snapshot of the run; raises ``WorkflowNotFound``."""
        check_identifier(workflow_id, "workflow_id")
        self._ensure_ready()
        run = self.store.get(workflow_id)
        if run is None:
            raise errors.WorkflowNotFound(f"no run {workflow_id!r}", workflow_id=workflow_id)
        return run

    def list_workflows(self, name: str | None = None, status: str | None = None,
                       limit: int = 100) -> list[Run]:
        """Runs, newest first, optionally of one workflow and/or one status."""
        if name is not None:
            check_name(name, "workflow name")
        if status is not None and status not in STATUSES:
            raise errors.InvalidArgument(f"unknown status {status!r}; one of {sorted(STATUSES)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise errors.InvalidArgument(f"limit must be an int in 1..10000, got {limit!r}")
        self._ensure_ready()
        return self.store.list_runs(workflow=name, status=status, limit=limit)

    def workflow_steps(self, workflow_id: str) -> list[StepRecord]:
        """The committed history of a run, in order (``seq`` 1, 2, ...)."""
        check_identifier(workflow_id, "workflow_id")
        self._ensure_ready()
        steps = self.store.history(workflow_id)
        if not steps and self.store.get(workflow_id) is None:
            raise errors.WorkflowNotFound(f"no run {workflow_id!r}", workflow_id=workflow_id)
        return steps

    def wait_result(self, workflow_id: str, timeout: float | None = None) -> Any:
        """Block until the run is terminal: its result if ``done``; raises ``WorkflowFailed``
        (also for ``compensated`` and ``compensation_failed``; ``run_status`` tells which),
        ``WorkflowCancelled``, or ``WaitTimeout`` (a ``TimeoutError``).

        A run that does not exist yet (started by a message still on its way) is waited for
        too, within ``timeout``: ``WorkflowNotFound`` if it never appears. The end of a run
        wakes the wait at once (LISTEN/NOTIFY: one connection per waiting process); a run
        not there yet is looked for every 5 to 250 ms.
        """
        check_identifier(workflow_id, "workflow_id")
        if timeout is not None:
            check_seconds(timeout, "timeout")
        self._ensure_ready()
        deadline = None if timeout is None else time.monotonic() + timeout
        found = self.store.status(workflow_id)
        pause = 0.005
        while True:
            if found is not None and found[0] in TERMINAL:
                return _outcome(workflow_id, *found)
            with self._endings.watch(workflow_id) as ended:
                # Registered before this read: an end committed after it is not missed.
                found = self.store.status(workflow_id)
                if found is not None and found[0] in TERMINAL:
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    if found is None:
                        raise errors.WorkflowNotFound(
                            f"no run {workflow_id!r}" + (
                                f" (none appeared within {timeout}s)" if timeout else ""),
                            workflow_id=workflow_id)
                    raise errors.WaitTimeout(
                        f"run {workflow_id} is still {found[0]} after {timeout}s",
                        workflow_id=workflow_id, status=found[0])
                if found is None or ended is None:
                    # Not started yet, or no listener: look again soon.
                    time.sleep(pause if left is None else min(pause, left))
                    pause = min(pause * 1.5, 0.25)
                else:
                    # Woken by the run's end (or a listener reconnect); a notification
                    # lost anyway costs at most SAFETY_POLL.
                    ended.wait(SAFETY_POLL if left is None else min(left, SAFETY_POLL))
            found = self.store.status(workflow_id)

    # ------------------------------------------------------------------ controls

    @property
    def controls(self) -> Any:
        """The :class:`~durable_celery.controls.Controls` of this Durable."""
        if self._controls is None:
            from durable_celery.controls import Controls

            self._controls = Controls(self)
        return self._controls

    def cancel_workflow(self, workflow_id: str, request_key: str, *, reason: str | None = None,
                        ttl_days: float = 7, cleanup_interval_seconds: float = 300,
                        ) -> dict[str, Any]:
        """Cancel a run and its live children, idempotently by ``request_key``.

        A step running now finishes, but its commit is refused. A missing or finished run is
        a success with ``"changed": False``. Returns ``{"ok", "changed", "idempotency_key",
        "idempotency_replayed"}``; raises ``ControlError`` subclasses (``.status``, ``.body``).
        """
        return self.controls.cancel(  # type: ignore[no-any-return]
            workflow_id, request_key, reason=reason, ttl_days=ttl_days,
            cleanup_interval_seconds=cleanup_interval_seconds)

    def resume_workflow(self, workflow_id: str, request_key: str, *, ttl_days: float = 7,
                        cleanup_interval_seconds: float = 300) -> dict[str, Any]:
        """Make a ``cancelled`` or ``failed`` run runnable again at the step where it stopped
        (attempt 0, deadline cleared); any other status is a success with ``changed: False``."""
        return self.controls.resume(  # type: ignore[no-any-return]
            workflow_id, request_key, ttl_days=ttl_days,
            cleanup_interval_seconds=cleanup_interval_seconds)

    def fork_workflow(self, workflow_id: str, request_key: str, *, start_step: Any = None,
                      new_workflow_id: str | None = None, application_version: Any = None,
                      ttl_days: float = 7, cleanup_interval_seconds: float = 300,
                      ) -> dict[str, Any]:
        """Start a new run from completed-step number ``start_step`` of ``workflow_id``
        (history before it copied; ``None``/``<= 1``/not an integer: from the input).
        The response adds ``"workflow_id"``: the new run's id."""
        return self.controls.fork(  # type: ignore[no-any-return]
            workflow_id, request_key, start_step=start_step, new_workflow_id=new_workflow_id,
            application_version=application_version, ttl_days=ttl_days,
            cleanup_interval_seconds=cleanup_interval_seconds)

    def health(self) -> dict[str, str]:
        """``{"status": "ok"}`` after a ``SELECT 1``; raises ``StorageError`` otherwise."""
        return self.controls.health()  # type: ignore[no-any-return]

    def bootstrap(self, *, check_idempotency_table: bool = True,
                  required_tables: list[str] | None = None, strict: bool = False,
                  ) -> dict[str, Any]:
        """Preflight: database connection, schema version, required tables, idempotency
        table, in that order. ``strict=True`` raises ``BootstrapError`` on the first failure."""
        return self.controls.bootstrap(  # type: ignore[no-any-return]
            check_idempotency_table=check_idempotency_table, required_tables=required_tables,
            strict=strict)

    def stats(self) -> dict[str, int]:
        """Per-process counters: steps committed, stale messages dropped, leases lost..."""
        return dict(executor.counters)

    # ------------------------------------------------------------------ processes

    def _identity(self) -> WorkerIdentity:
        ident = self._ident
        if ident is not None and ident.pid == os.getpid():
            return ident
        with self._ident_lock:  # threads pool: one identity per process
            ident = self._ident
            if ident is None or ident.pid != os.getpid():
                ident = self._ident = WorkerIdentity(
                    self.store, interval=self.settings.heartbeat_interval,
                    nodename=os.environ.get("DURABLE_CELERY_NODENAME"))
            return ident

    def _release_identity(self) -> int:
        ident = self._ident
        if ident is None or ident.pid != os.getpid():
            return 0
        self._ident = None
        return ident.close()

    def coordinator(self) -> Any:
        """A :class:`~durable_celery.coordinator.loop.Coordinator` bound to this Durable."""
        from durable_celery.coordinator.loop import Coordinator

        return Coordinator(self)

    def close(self) -> None:
        """Release this process's worker row and database connections."""
        self._release_identity()
        self._endings.close()
        self._holder.dispose()


def check_key_reuse(value: Any, default: str) -> str:
    """A start's key reuse policy: ``value``, else ``default`` (the ``key_reuse`` setting)."""
    if value is None:
        return default
    if value not in settings_mod.KEY_REUSE:
        raise errors.InvalidArgument(
            f"key_reuse must be one of {list(settings_mod.KEY_REUSE)}, got {value!r}"[:300])
    return str(value)


def check_priority(priority: Any) -> int:
    """None (0) or an int in 0..9; 9 runs first."""
    if priority is None:
        return 0
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise errors.InvalidArgument(f"priority must be an int in 0..9 (9 runs first), "
                                     f"got {priority!r}"[:300])
    return priority
MAX_BATCH = 100_000


def _batch(values: Any, what: str) -> list[Any]:
    """A list from an iterable argument; a string, bytes or mapping is refused."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise errors.InvalidArgument(f"{what} must be a list (or another iterable) of items, "
                                     f"got {type(values).__name__}")
    return list(values)


def _batch_identifiers(values: Any, what: str, count: int) -> list[str | None]:
    """One identifier (or None) per run, unique within the batch."""
    if values is None:
        return [None] * count
    found = _batch(values, what)
    if len(found) != count:
        raise errors.InvalidArgument(f"{what} has {len(found)} items for {count} states")
    seen: set[str] = set()
    for value in found:
        if value is None:
            continue
        check_identifier(value, what[:-1])
        if value in seen:
            raise errors.InvalidArgument(f"{what[:-1]} {value!r} appears twice in the batch"[:300])
        seen.add(value)
    return found


SAFETY_POLL = 5.0  # seconds: a waiter reads the status at least this often


def _outcome(workflow_id: str, status: str, result: Any, error: Any) -> Any:
    """A terminal run's result, or its failure raised."""
    if status == "done":
        return result
    if status == "cancelled":
        raise errors.WorkflowCancelled(f"run {workflow_id} was cancelled",
                                       workflow_id=workflow_id, error=error)
    what = "failed" if status == "failed" else f"failed ({status})"
    raise errors.WorkflowFailed(f"run {workflow_id} {what}: {_describe(error)}",
                                workflow_id=workflow_id, error=error, run_status=status)


def _describe(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)
    return str(error)
