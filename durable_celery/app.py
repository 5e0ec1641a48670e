"""Durable: binds a Celery app to a Postgres database; builds the parts and wires them.

The one façade users see. Every part below it (runs, signals, controls, schedules, the
executor, the coordinator, the Celery integration) is handed the small collaborators it
uses, and none imports this module: see docs/architecture.md.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Celery

from durable_celery import errors, flow, integration, tasks
from durable_celery import settings as settings_mod
from durable_celery.checks import check_name, check_run_ahead, check_version
from durable_celery.controls import Controls
from durable_celery.coordinator import bootstep
from durable_celery.coordinator.cron import Schedules
from durable_celery.coordinator.loop import Coordinator
from durable_celery.definitions import Registry, Step, Workflow
from durable_celery.runs import Runs
from durable_celery.runtime.executor import Executor
from durable_celery.runtime.hooks import Counters, Hooks
from durable_celery.runtime.publisher import Publisher
from durable_celery.runtime.readiness import Readiness
from durable_celery.runtime.worker import ProcessIdentity
from durable_celery.signals import Signals
from durable_celery.storage import migrate as migrate_mod
from durable_celery.storage.engine import EngineHolder
from durable_celery.storage.listener import Endings
from durable_celery.storage.records import Run, SignalResult, StepRecord
from durable_celery.storage.schedules import Schedule, ScheduleStore
from durable_celery.storage.store import Store

log = logging.getLogger("durable_celery")


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
        self.settings = settings = settings_mod.build(
            {"database_url": database_url, "heartbeat_interval": heartbeat_interval,
             "stale_after": stale_after, "sweep_interval": sweep_interval,
             "redispatch_after": redispatch_after, "retention": retention, **more},
            celery_conf=app.conf,
        )
        if not settings.database_url:
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
        # --- the parts, bottom up; each is handed what it uses
        holder = self._holder = EngineHolder(settings.database_url, pool_size=settings.pool_size,
                                             liveness=settings.stale_after)
        self.store = Store(holder, redispatch_after=settings.redispatch_after,
                           redispatch_max_backoff=settings.redispatch_max_backoff)
        self.schedules = ScheduleStore(holder, self.store)
        self._endings = Endings(holder)
        self.registry = Registry(lambda: str(app.conf.task_default_queue or "celery"))
        self._readiness = readiness = Readiness(self._prepare)
        self.publisher = Publisher(app, self.store, settings)
        self._identity = ProcessIdentity(self.store, interval=settings.heartbeat_interval)
        self._counters = Counters()
        self.hooks = Hooks(self._counters)
        self.executor = Executor(store=self.store, registry=self.registry,
                                 publisher=self.publisher, identity=self._identity,
                                 readiness=readiness, settings=settings, hooks=self.hooks)
        self._runs = Runs(store=self.store, registry=self.registry, publisher=self.publisher,
                          readiness=readiness, settings=settings, endings=self._endings,
                          url=holder.url)
        self._signals = Signals(store=self.store, publisher=self.publisher,
                                readiness=readiness, settings=settings, url=holder.url)
        self.controls = Controls(holder=holder, registry=self.registry,
                                 publisher=self.publisher, readiness=readiness,
                                 redispatch_after=settings.redispatch_after)
        self._schedules = Schedules(store=self.schedules, registry=self.registry,
                                    readiness=readiness, settings=settings)
        self._owner = _Owner(self)
        app._durable_celery = self  # found by the CLI
        integration.register_by_name(app, registry=self.registry, signals=self._signals,
                                     controls=self.controls, readiness=readiness)
        bootstep.install(bootstep.Installed(
            app=app, settings=settings, readiness=readiness,
            check_definitions=self.registry.check, coordinator=self.coordinator,
            release=self._identity.release))

    # ------------------------------------------------------------------ declaring

    def workflow(self, name: str, *, version: int = 1, queue: str | None = None,
                 run_ahead: bool | None = None, rate_limit: Any = None,
                 throttle: flow.Throttle | None = None, debounce: flow.Debounce | None = None,
                 singleton: flow.Singleton | None = None,
                 deadline: float | None = None) -> Workflow:
        """Declare a workflow; add steps with ``@wf.step``.

        Flow control (docs/flow-control.md): ``rate_limit`` (a ``RateLimit``, Celery's
        "10/s", or a list) is taken by every step start of the workflow; ``throttle``,
        ``debounce`` and ``singleton`` apply to its starts; ``deadline`` (seconds) is each
        run's time to finish, from its start.
        """
        check_name(name, "workflow name")
        check_version(version)
        check_run_ahead(run_ahead)
        if queue is not None:
            check_name(queue, "queue")
        limits = flow.rate_limits(rate_limit, "rate_limit")
        flow.check_policy(throttle, flow.Throttle, "throttle")
        flow.check_policy(debounce, flow.Debounce, "debounce")
        flow.check_policy(singleton, flow.Singleton, "singleton")
        if debounce is not None and singleton is not None:
            raise errors.InvalidArgument("a workflow takes debounce= or singleton=, not both")
        if deadline is not None:
            deadline = flow.check_deadline(deadline)
        wf = Workflow(owner=self._owner, name=name, version=version, queue=queue,
                      run_ahead=run_ahead, rate_limits=limits, throttle=throttle,
                      debounce=debounce, singleton=singleton, deadline=deadline)
        self.registry.add(wf)
        return wf

    def check_definitions(self) -> None:
        """Raise ``InvalidArgument`` if a declared workflow is incomplete (a step's
        ``compensate=`` naming no compensation). Workers check at start."""
        self.registry.check()

    def get_definition(self, name: str, version: int | None = None) -> Workflow:
        """The registered workflow ``name`` (its highest version unless ``version``)."""
        return self.registry.get(name, version)

    def task(self, fn: Any = None, **options: Any) -> Any:
        """Drop-in for ``@app.task``: a one-step durable workflow per function.

        ``f(...)`` runs inline; ``f.delay(...)`` / ``f.apply_async(...)`` start a durable
        run and return a :class:`~durable_celery.tasks.TaskHandle`. Options: ``name``,
        ``queue``, ``retry={...}`` and Celery's ``bind``, ``max_retries``,
        ``default_retry_delay``, ``autoretry_for``, ``retry_backoff``... (see docs/drop-in.md).
        """
        return tasks.decorate(self, fn, options, readiness=self._readiness)

    def add_hook(self, hook: Any) -> None:
        """Run ``hook`` around every step and on every transition in this process (see
        :mod:`durable_celery.runtime.hooks`)."""
        self.hooks.add(hook)

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
        return self._schedules.declare(name, wf, cron=cron, timezone=timezone, state=state,
                                       catchup=catchup, priority=priority)

    def list_schedules(self) -> list[Schedule]:
        return self._schedules.all()

    def pause_schedule(self, name: str) -> Schedule:
        """Stop firing (until ``resume_schedule``); raises ``ScheduleNotFound``."""
        return self._schedules.pause(name)

    def resume_schedule(self, name: str) -> Schedule:
        """Fire again from the next occurrence; those missed while paused are skipped."""
        return self._schedules.resume(name)

    def delete_schedule(self, name: str) -> None:
        """Remove a schedule (runs it started are untouched); raises ``ScheduleNotFound``."""
        self._schedules.delete(name)

    @property
    def default_queue(self) -> str:
        return self.registry.default_queue

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

    def ensure_ready(self, *, wait: bool = True) -> None:
        """Migrate (or check) the schema once per process; raises ``StorageError`` /
        ``ConfigurationError`` if the database cannot be used (``NotReady`` while a
        backoff runs, with ``wait=False``)."""
        self._readiness.ensure(wait=wait)

    def readiness(self) -> dict[str, Any]:
        """Whether this process can use the database: ``{"ready", "reason", "retry_in"}``.
        ``reason`` says what is wrong and what to do (a worker also logs it)."""
        return self._readiness.state()

    # ------------------------------------------------------------------ runs

    def signal(self, target: str, name: str, payload: Any = None, *,
               dedup_key: str | None = None, connection: Any = None) -> SignalResult:
        """Send a durable signal to a run, by workflow_id or business key.

        The signal is stored in the run's inbox (once per ``dedup_key``) and wakes the run
        if it awaits ``name``; otherwise it waits there for a later ``Await``. Raises
        ``NoTarget`` when no live run has this id or key. With ``connection=`` (a SQLAlchemy
        Connection or Session of your transaction) it commits or rolls back with your data.
        """
        return self._signals.send(target, name, payload, dedup_key=dedup_key,
                                  connection=connection)

    def get_workflow(self, workflow_id: str) -> Run:
        """A snapshot of the run; raises ``WorkflowNotFound``."""
        return self._runs.get(workflow_id)

    def explain(self, workflow_id: str) -> dict[str, Any]:
        """Why the run is where it is: ``summary`` (one line) and ``reasons`` (what holds
        it now first: a signal, a timer, a retry backoff, a rate-limit token, a debounce,
        a singleton or concurrency key held by another run, its children, a foreach cap,
        its message on a queue, no live worker; then its deadline). See docs/flow-control.md."""
        return self._runs.explain(workflow_id)

    def list_workflows(self, name: str | None = None, status: str | None = None,
                       limit: int = 100) -> list[Run]:
        """Runs, newest first, optionally of one workflow and/or one status."""
        return self._runs.list_runs(name, status, limit)

    def workflow_steps(self, workflow_id: str) -> list[StepRecord]:
        """The committed history of a run, in order (``seq`` 1, 2, ...)."""
        return self._runs.history(workflow_id)

    def wait_result(self, workflow_id: str, timeout: float | None = None) -> Any:
        """Block until the run is terminal: its result if ``done``; raises ``WorkflowFailed``
        (also for ``compensated`` and ``compensation_failed``; ``run_status`` tells which),
        ``WorkflowCancelled``, or ``WaitTimeout`` (a ``TimeoutError``).

        A run that does not exist yet (started by a message still on its way) is waited for
        too, within ``timeout``: ``WorkflowNotFound`` if it never appears. The end of a run
        wakes the wait at once (LISTEN/NOTIFY: one connection per waiting process); a run
        not there yet is looked for every 5 to 250 ms.
        """
        return self._runs.wait_result(workflow_id, timeout)

    # ------------------------------------------------------------------ controls

    def cancel_workflow(self, workflow_id: str, request_key: str, *, reason: str | None = None,
                        ttl_days: float = 7, cleanup_interval_seconds: float = 300,
                        ) -> dict[str, Any]:
        """Cancel a run and its live children, idempotently by ``request_key``.

        A step running now finishes, but its commit is refused. A missing or finished run is
        a success with ``"changed": False``. Returns ``{"ok", "changed", "idempotency_key",
        "idempotency_replayed"}``; raises ``ControlError`` subclasses (``.status``, ``.body``).
        """
        return self.controls.cancel(
            workflow_id, request_key, reason=reason, ttl_days=ttl_days,
            cleanup_interval_seconds=cleanup_interval_seconds)

    def resume_workflow(self, workflow_id: str, request_key: str, *, ttl_days: float = 7,
                        cleanup_interval_seconds: float = 300) -> dict[str, Any]:
        """Make a ``cancelled`` or ``failed`` run runnable again at the step where it stopped
        (attempt 0, deadline cleared); any other status is a success with ``changed: False``."""
        return self.controls.resume(
            workflow_id, request_key, ttl_days=ttl_days,
            cleanup_interval_seconds=cleanup_interval_seconds)

    def fork_workflow(self, workflow_id: str, request_key: str, *, start_step: Any = None,
                      new_workflow_id: str | None = None, application_version: Any = None,
                      ttl_days: float = 7, cleanup_interval_seconds: float = 300,
                      ) -> dict[str, Any]:
        """Start a new run from completed-step number ``start_step`` of ``workflow_id``
        (history before it copied; ``None``/``<= 1``/not an integer: from the input).
        The response adds ``"workflow_id"``: the new run's id."""
        return self.controls.fork(
            workflow_id, request_key, start_step=start_step, new_workflow_id=new_workflow_id,
            application_version=application_version, ttl_days=ttl_days,
            cleanup_interval_seconds=cleanup_interval_seconds)

    def health(self) -> dict[str, str]:
        """``{"status": "ok"}`` after a ``SELECT 1``; raises ``StorageError`` otherwise."""
        return self.controls.health()

    def bootstrap(self, *, check_idempotency_table: bool = True,
                  required_tables: list[str] | None = None, strict: bool = False,
                  ) -> dict[str, Any]:
        """Preflight: database connection, schema version, required tables, idempotency
        table, in that order. ``strict=True`` raises ``BootstrapError`` on the first failure."""
        return self.controls.bootstrap(
            check_idempotency_table=check_idempotency_table, required_tables=required_tables,
            strict=strict)

    def stats(self) -> dict[str, int]:
        """Per-process counters: steps committed, stale messages dropped, leases lost..."""
        return dict(self._counters.counts)

    # ------------------------------------------------------------------ processes

    def coordinator(self) -> Coordinator:
        """A :class:`~durable_celery.coordinator.loop.Coordinator` over this Durable's parts."""
        return Coordinator(holder=self._holder, store=self.store, schedules=self.schedules,
                           registry=self.registry, publisher=self.publisher,
                           readiness=self._readiness, settings=self.settings,
                           cleanup=self.controls.cleanup)

    def close(self) -> None:
        """Release this process's worker row and database connections."""
        self._identity.release()
        self._endings.close()
        self._holder.dispose()


class _Owner:
    """What the workflows of one Durable use from it (``definitions.WorkflowOwner``): the
    registry, step registration with Celery, starts and schedules. Holds parts, not the
    Durable."""

    def __init__(self, durable: Durable) -> None:
        self.registry = durable.registry
        self._app = durable.app
        self._executor = durable.executor
        self._readiness = durable._readiness
        self._runs = durable._runs
        self._schedules = durable._schedules
        self._tasks: set[str] = set()

    def register_step(self, wf: Workflow, step: Step) -> None:
        name = wf.task_name(step)
        if name not in self._tasks:
            self._tasks.add(name)
            integration.register_step(self._app, wf, step, executor=self._executor,
                                      readiness=self._readiness)

    def start_run(self, wf: Workflow, state: Any, **options: Any) -> str:
        return self._runs.start(wf, state, **options)

    def start_runs(self, wf: Workflow, states: Any, **options: Any) -> list[str]:
        return self._runs.start_many(wf, states, **options)

    def schedule(self, name: str, wf: Workflow, **options: Any) -> Any:
        return self._schedules.declare(name, wf, **options)
