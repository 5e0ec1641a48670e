"""Workflow and step definitions, retry policies, and the outcome records steps return."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict, overload

from durable_celery import errors, flow, payloads
from durable_celery.checks import (
    MAX_SECONDS,
    check_concurrency,
    check_identifier,
    check_key_reuse,
    check_name,
    check_run_ahead,
    check_seconds,
)
from durable_celery.storage.flow import NO_POLICY, Bucket, StartPolicy

if TYPE_CHECKING:
    from durable_celery.runtime.context import Context


StepFunction = Callable[["Context"], Any]


class _Keep:
    """Marker: the outcome keeps the state as the step left it."""

    def __repr__(self) -> str:
        return "KEEP"

    def __reduce__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()

# ----------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Next:
    """Go to ``step`` (a name or a step function) now, with ``attempt`` reset to 0.

    ``run_ahead`` (when not None) overrides the step's and the workflow's choice for this
    transition: ``False`` always publishes a message for ``step``; ``True`` continues in the
    same task when ``step`` is on the same queue (and the ``run_ahead`` setting is on).
    """

    step: str | Callable[..., Any]
    state: Any = KEEP
    run_ahead: bool | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """Run the same step again after ``delay`` seconds, with ``attempt + 1``."""

    delay: float = 0.0
    state: Any = KEEP


@dataclass(frozen=True, slots=True)
class Sleep:
    """A durable timer: continue at ``next`` after ``seconds`` or at ``until``."""

    seconds: float | None = None
    until: datetime | None = None
    next: str | Callable[..., Any] | None = None
    state: Any = KEEP


AWAIT_MODES = ("any", "all")


@dataclass(frozen=True, slots=True)
class Await:
    """Park until a signal with one of ``names`` arrives (or ``timeout`` seconds pass).

    ``mode="all"`` waits until every name has a signal; on timeout the next step sees the
    ones that did arrive (``ctx.signals``) and ``ctx.timed_out``.
    """

    names: str | Iterable[str]
    next: str | Callable[..., Any] | None = None
    timeout: float | None = None
    state: Any = KEEP
    mode: str = "any"

    def __post_init__(self) -> None:
        if self.mode not in AWAIT_MODES:
            raise errors.InvalidArgument(f"Await mode must be 'any' or 'all', got {self.mode!r}"
                                         [:300])


@dataclass(frozen=True, slots=True)
class Done:
    """Finish the run successfully with ``result``."""

    result: Any = None
    state: Any = KEEP


@dataclass(frozen=True, slots=True)
class Fail:
    """Finish the run as failed with ``reason``."""

    reason: Any = None
    state: Any = KEEP


# The most children one Spawn may start (foreach over more: split the items in batches).
MAX_CHILDREN = 10_000
# The largest child state accepted when a spec is built; the configured payload limit is
# applied again when the Spawn is committed.
SPEC_MAX_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildSpec:
    """One child run of a :class:`Spawn`: build it with ``wf.child(state, ...)``.

    ``target`` is a workflow, or a step function of a registered workflow (the child then
    starts at that step). ``state`` KEEP means "a copy of the parent's state".
    """

    target: Workflow | Callable[..., Any]
    state: Any = KEEP
    key: str | None = None
    workflow_id: str | None = None
    queue: str | None = None
    key_reuse: str | None = None    # None: the key_reuse setting


def _as_spec(item: Any) -> ChildSpec:
    if isinstance(item, ChildSpec):
        return item
    if isinstance(item, Workflow) or callable(item):
        return ChildSpec(target=item)
    raise errors.InvalidArgument(
        f"a child is wf.child(...), a workflow or a step function; got {item!r}"[:300])


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start ``children`` and park until every one is terminal; then continue at ``next``.

    The children are inserted in the same transaction that parks this run. The next step
    sees them in ``ctx.children`` (spawn order). With ``concurrency``, at most that many
    children are started at once; each one that finishes starts the next.
    """

    children: Iterable[ChildSpec | Workflow | Callable[..., Any]]
    next: str | Callable[..., Any] | None = None
    state: Any = KEEP
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.children, (str, bytes, dict)):
            raise errors.InvalidArgument("Spawn children must be a list of wf.child(...) specs")
        try:
            specs = tuple(_as_spec(c) for c in self.children)
        except TypeError:
            raise errors.InvalidArgument(
                f"Spawn children must be a list, got {self.children!r}"[:300]) from None
        if len(specs) > MAX_CHILDREN:
            raise errors.InvalidArgument(
                f"a Spawn starts at most {MAX_CHILDREN} children, got {len(specs)}")
        object.__setattr__(self, "children", specs)
        check_concurrency(self.concurrency)


def parallel(*branches: ChildSpec | Workflow | Callable[..., Any],
             next: str | Callable[..., Any] | None = None, state: Any = KEEP,
             concurrency: int | None = None) -> Spawn:
    """Run ``branches`` (workflows, step functions or ``wf.child`` specs) as child runs,
    each starting from a copy of this run's state, and continue at ``next`` when all are
    terminal."""
    return Spawn([_as_spec(b) for b in branches], next=next, state=state,
                 concurrency=concurrency)


def foreach(items: Iterable[Any], wf: Workflow | Callable[..., Any], *,
            concurrency: int | None = None, next: str | Callable[..., Any] | None = None,
            state: Any = KEEP) -> Spawn:
    """One child run of ``wf`` per item, at most ``concurrency`` executing at once.

    A dict item is the child's state; any other JSON value ``v`` becomes ``{"item": v}``.
    """
    check_concurrency(concurrency)
    if not (isinstance(wf, Workflow) or callable(wf)):
        raise errors.InvalidArgument(f"foreach needs a workflow or a step function, got {wf!r}"
                                     [:300])
    if isinstance(items, (str, bytes, dict)):
        raise errors.InvalidArgument("foreach items must be a list (or another iterable)")
    try:
        listed = list(items)
    except TypeError:
        raise errors.InvalidArgument(f"foreach items must be iterable, got {items!r}"[:300]) \
            from None
    specs = []
    for item in listed:
        child_state = item if isinstance(item, dict) else {"item": item}
        payloads.check_object(child_state, what="foreach item", max_bytes=SPEC_MAX_BYTES)
        specs.append(ChildSpec(target=wf, state=child_state))
    return Spawn(specs, next=next, state=state, concurrency=concurrency)


Outcome = Next | Retry | Sleep | Await | Spawn | Done | Fail
OUTCOME_TYPES = (Next, Retry, Sleep, Await, Spawn, Done, Fail)

# ----------------------------------------------------------------------------- retry policy

Backoff = Literal["exponential", "linear", "constant"]


class RetryOptions(TypedDict, total=False):
    max_attempts: int
    backoff: Backoff
    delay: float
    max_delay: float
    jitter: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a step that raised is retried. ``max_attempts`` counts the first run too.

    The delay before attempt ``n + 1`` (``n`` = attempts so far, from 1) is ``delay``
    (constant), ``delay * n`` (linear) or ``delay * 2 ** (n - 1)`` (exponential), capped at
    ``max_delay``. With ``jitter`` the delay is drawn uniformly from ``[d/2, d]`` so retries
    of many runs spread out while keeping half the delay as a floor.
    """

    max_attempts: int = 1
    backoff: Backoff = "exponential"
    delay: float = 1.0
    max_delay: float = 300.0
    jitter: bool = True

    @classmethod
    def parse(cls, options: RetryOptions | RetryPolicy | None) -> RetryPolicy:
        if options is None:
            return cls()
        if isinstance(options, RetryPolicy):
            options.validate()
            return options
        if not isinstance(options, dict):
            raise errors.InvalidArgument(f"retry must be a dict, not {type(options).__name__}")
        allowed = set(RetryOptions.__annotations__)
        unknown = set(options) - allowed
        if unknown:
            raise errors.InvalidArgument(
                f"unknown retry option(s) [{', '.join(sorted(map(repr, unknown)))}]; "
                f"allowed: {sorted(allowed)}"
            )
        policy = cls(**options)
        policy.validate()
        return policy

    def validate(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or self.max_attempts < 1:
            raise errors.InvalidArgument(f"retry max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if self.backoff not in ("exponential", "linear", "constant"):
            raise errors.InvalidArgument(
                f"retry backoff must be 'exponential', 'linear' or 'constant', got {self.backoff!r}"
            )
        for name in ("delay", "max_delay"):
            check_seconds(getattr(self, name), f"retry {name}")
        if not isinstance(self.jitter, bool):
            raise errors.InvalidArgument(f"retry jitter must be a bool, got {self.jitter!r}")

    def delay_after(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next attempt, after ``attempts`` failed attempts."""
        n = max(attempts, 1)
        if self.backoff == "constant":
            base = self.delay
        elif self.backoff == "linear":
            base = self.delay * n
        else:
            base = self.delay * 2.0 ** min(n - 1, 62)
        capped = min(base, self.max_delay, MAX_SECONDS)
        if self.jitter and capped > 0:
            return (rng or random).uniform(capped / 2, capped)
        return float(capped)


# ----------------------------------------------------------------------------- definitions

@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    name: str
    fn: StepFunction
    index: int
    retry: RetryPolicy
    queue: str | None = None
    run_ahead: bool | None = None
    compensate: str | None = None      # the compensation undoing this step once completed
    is_compensation: bool = False
    rate_limits: tuple[flow.RateLimit, ...] = ()   # its own (the workflow's come too)
    schedule_to_start: float | None = None  # seconds a due step may wait for a worker
    on_late: str = "fail"                   # past schedule_to_start: "fail" or "skip"
    time_limit: float | None = None         # Celery's, on this step's task (prefork pool)
    soft_time_limit: float | None = None

    def __call__(self, ctx: Context) -> Any:
        return self.fn(ctx)


@dataclass(eq=False)
class Workflow:
    """A named, versioned, ordered set of steps. Create with ``durable.workflow(...)``."""

    owner: WorkflowOwner
    name: str
    version: int = 1
    queue: str | None = None
    run_ahead: bool | None = None
    steps: dict[str, Step] = field(default_factory=dict)
    compensations: dict[str, Step] = field(default_factory=dict)
    # flow control (docs/flow-control.md)
    rate_limits: tuple[flow.RateLimit, ...] = ()   # every step start takes a token
    throttle: flow.Throttle | None = None
    debounce: flow.Debounce | None = None
    singleton: flow.Singleton | None = None
    deadline: float | None = None   # seconds from the start: the run fails after that

    def limits_of(self, step: Step) -> list[tuple[flow.RateLimit, str]]:
        """The rate limits a start of ``step`` takes a token from, each with the bucket
        name it has when unnamed (the workflow's, the step's)."""
        if step.is_compensation:
            return []  # undoing work is never held back
        return [(rl, self.name) for rl in self.rate_limits] + [
            (rl, f"{self.name}.{step.name}") for rl in step.rate_limits]

    def buckets_for(self, step: Step, state: Any) -> list[Bucket]:
        """The token buckets a start of ``step`` takes from, for a run in ``state`` (a
        bucket named twice counts once)."""
        found: dict[tuple[str, str], Bucket] = {}
        for rl, default in self.limits_of(step):
            bucket = flow.buckets((rl,), state, default)[0]
            found.setdefault((bucket.name, bucket.key), bucket)
        return list(found.values())

    def start_policy(self, state: Any, *, deadline: Any = None, step: Step | None = None,
                     max_payload_bytes: int) -> StartPolicy:
        """The flow control a start of this workflow in ``state`` goes through (the
        policies' keys computed now, from the start's state)."""
        first = step or self.first
        seconds, at = None, None
        if deadline is None:
            seconds = self.deadline
        elif isinstance(deadline, datetime):
            if deadline.tzinfo is None:
                raise errors.InvalidArgument("deadline must be a timezone-aware datetime")
            at = deadline
        else:
            seconds = flow.check_deadline(deadline)
        tokens = tuple(self.buckets_for(first, state))
        if (not tokens and seconds is None and at is None and self.throttle is None
                and self.debounce is None and self.singleton is None):
            return NO_POLICY
        options: dict[str, Any] = {"tokens": tokens, "deadline": seconds, "deadline_at": at}
        if self.throttle is not None:
            t = self.throttle
            options["throttle"] = Bucket(name=f"throttle:{self.name}",
                                         key=flow.policy_key(t.key, state, "Throttle"),
                                         interval=t.interval, tolerance=t.tolerance)
            options["drop"] = t.drop
        if self.debounce is not None:
            d = self.debounce
            key = flow.policy_key(d.key, state, "Debounce")

            def merge(pending: Any, new: str) -> str:
                return payloads.check_object(d.merged(pending, json.loads(new)),
                                             what="debounced state", max_bytes=max_payload_bytes)

            # A debounced run's tokens are taken when it starts (its due time moves).
            options.update(tokens=(), debounce_key=f"{self.name}:{key}",
                           debounce_seconds=d.seconds, debounce_max_wait=d.max_wait, merge=merge)
        if self.singleton is not None:
            key = flow.policy_key(self.singleton.key, state, "Singleton")
            options.update(singleton_key=f"{self.name}:{key}",
                           singleton=self.singleton.on_conflict)
        return StartPolicy(**options)

    # -- declaring steps

    @overload
    def step(self, fn: StepFunction) -> StepFunction: ...

    @overload
    def step(self, fn: None = None, *, name: str | None = None,
             retry: RetryOptions | RetryPolicy | None = None, queue: str | None = None,
             run_ahead: bool | None = None, compensate: str | Callable[..., Any] | None = None,
             rate_limit: Any = None, schedule_to_start: float | None = None,
             on_late: str = "fail", time_limit: float | None = None,
             soft_time_limit: float | None = None,
             ) -> Callable[[StepFunction], StepFunction]: ...

    def step(self, fn: StepFunction | None = None, *, name: str | None = None,
             retry: RetryOptions | RetryPolicy | None = None, queue: str | None = None,
             run_ahead: bool | None = None, compensate: str | Callable[..., Any] | None = None,
             rate_limit: Any = None, schedule_to_start: float | None = None,
             on_late: str = "fail", time_limit: float | None = None,
             soft_time_limit: float | None = None,
             ) -> Any:
        """Declare a step. The first declared step is the initial one.

        Use bare (``@wf.step``) or with options (``@wf.step(retry={...}, queue=...)``).
        ``compensate`` names the compensation (``@wf.compensation``) that undoes this step
        if the run fails after the step completed. ``rate_limit``: a ``RateLimit`` (or
        Celery's "10/s"), or a list, that each start of this step takes a token from.
        ``schedule_to_start``: seconds the step may wait, once due, for a worker to start
        it; later, the attempt fails (``on_late="fail"``, through the retry policy) or the
        step is skipped (``"skip"``: the run goes on as if it returned None).
        ``time_limit`` / ``soft_time_limit``: Celery's time limits on this step's task
        (the soft one raises ``SoftTimeLimitExceeded`` in the step: a failure for the retry
        policy; the hard one ends the pool process: the step is recovered as after a
        crash); the step always runs as a task of its own (never reached by run-ahead).
        The prefork pool enforces them; the threads and solo pools do not (Celery's
        rule). The function is returned unchanged, so it can still be called directly in
        tests.
        """
        policy = RetryPolicy.parse(retry)
        limits = flow.rate_limits(rate_limit, "rate_limit")
        late = None if schedule_to_start is None else check_seconds(
            schedule_to_start, "schedule_to_start")
        flow.check_on_late(on_late)
        hard = None if time_limit is None else flow.check_limit_seconds(time_limit, "time_limit")
        soft = None if soft_time_limit is None else flow.check_limit_seconds(
            soft_time_limit, "soft_time_limit")
        if hard is not None and soft is not None and soft >= hard:
            raise errors.InvalidArgument(
                f"soft_time_limit ({soft}) must be less than time_limit ({hard})")
        if queue is not None:
            check_name(queue, "queue")
        undo = None
        if compensate is not None:
            undo = check_name(compensate if isinstance(compensate, str)
                              else getattr(compensate, "__name__", compensate), "compensate")
            if undo in self.steps:
                raise errors.InvalidArgument(
                    f"compensate={undo!r} names a step of workflow {self.name!r}; it must name "
                    "a compensation declared with @wf.compensation")
        check_run_ahead(run_ahead)

        def register(func: StepFunction) -> StepFunction:
            if not callable(func):
                raise errors.InvalidArgument(f"a step must be callable, not {func!r}")
            step_name = check_name(func.__name__ if name is None else name, "step name")
            self._check_free(step_name)
            step = Step(name=step_name, fn=func, index=len(self.steps), retry=policy,
                        queue=queue, run_ahead=run_ahead, compensate=undo,
                        rate_limits=limits, schedule_to_start=late, on_late=on_late,
                        time_limit=hard, soft_time_limit=soft)
            self.steps[step_name] = step
            self.owner.register_step(self, step)
            return func

        if fn is not None:
            return register(fn)
        return register

    def _check_free(self, name: str) -> None:
        for kind, taken in (("step", self.steps), ("compensation", self.compensations)):
            if name in taken:
                raise errors.InvalidArgument(
                    f"workflow {self.name!r} v{self.version} already has a {kind} {name!r}")

    @overload
    def compensation(self, fn: StepFunction) -> StepFunction: ...

    @overload
    def compensation(self, fn: None = None, *, name: str | None = None,
                     retry: RetryOptions | RetryPolicy | None = None, queue: str | None = None,
                     ) -> Callable[[StepFunction], StepFunction]: ...

    def compensation(self, fn: StepFunction | None = None, *, name: str | None = None,
                     retry: RetryOptions | RetryPolicy | None = None,
                     queue: str | None = None) -> Any:
        """Declare a compensation: the undo of a step declared with ``compensate=``.

        It runs as a durable step (own retry policy, own history row) when the run fails
        after that step completed. It may change ``ctx.state`` (or return a dict, the new
        state), return ``Retry(delay)``, or fail (raise after its retries, or ``Fail``).
        """
        policy = RetryPolicy.parse(retry)
        if queue is not None:
            check_name(queue, "queue")

        def register(func: StepFunction) -> StepFunction:
            if not callable(func):
                raise errors.InvalidArgument(f"a compensation must be callable, not {func!r}")
            comp_name = check_name(func.__name__ if name is None else name, "compensation name")
            self._check_free(comp_name)
            step = Step(name=comp_name, fn=func, index=-1, retry=policy, queue=queue,
                        run_ahead=False, is_compensation=True)
            self.compensations[comp_name] = step
            self.owner.register_step(self, step)
            return func

        if fn is not None:
            return register(fn)
        return register

    def check(self) -> None:
        """Raise ``InvalidArgument`` if a step's ``compensate=`` names no compensation."""
        missing = sorted({s.compensate for s in self.steps.values()
                          if s.compensate is not None and s.compensate not in self.compensations})
        if missing:
            raise errors.InvalidArgument(
                f"workflow {self.name!r} v{self.version}: compensate= names no declared "
                f"compensation: {missing}; declare them with @wf.compensation")

    def child(self, state: Any = KEEP, key: str | None = None, workflow_id: str | None = None,
              *, queue: str | None = None, key_reuse: str | None = None) -> ChildSpec:
        """A child run of this workflow, for ``Spawn``. ``state`` defaults to a copy of the
        parent's state; ``key``, ``key_reuse`` and ``workflow_id`` work as in ``start``."""
        if state is not KEEP:
            payloads.check_object(state, what="child state", max_bytes=SPEC_MAX_BYTES)
        if key is not None:
            check_identifier(key, "key")
        if workflow_id is not None:
            check_identifier(workflow_id, "workflow_id")
        if queue is not None:
            check_name(queue, "queue")
        if key_reuse is not None:
            check_key_reuse(key_reuse, "reject")
        return ChildSpec(target=self, state=state, key=key, workflow_id=workflow_id, queue=queue,
                         key_reuse=key_reuse)

    # -- lookups

    @property
    def first(self) -> Step:
        if not self.steps:
            raise errors.InvalidArgument(f"workflow {self.name!r} has no steps")
        return next(iter(self.steps.values()))

    def resolve(self, target: str | Callable[..., Any] | Step) -> Step:
        """The step named by ``target`` (a name, a step function or a Step)."""
        if isinstance(target, Step):
            return target
        if isinstance(target, str):
            found = self.steps.get(target)
        else:
            found = next((s for s in self.steps.values() if s.fn is target), None)
        if found is None:
            label = target if isinstance(target, str) else getattr(target, "__name__", target)
            raise errors.UnknownStep(
                f"workflow {self.name!r} v{self.version} has no step {label!r}; "
                f"steps: {list(self.steps)}", workflow=self.name, step=str(label),
            )
        return found

    def after(self, step: Step) -> Step | None:
        """The step declared after ``step``, or None for the last one."""
        order = list(self.steps.values())
        return order[step.index + 1] if step.index + 1 < len(order) else None

    def queue_for(self, step: Step, run_queue: str | None = None) -> str:
        return step.queue or run_queue or self.queue or self.owner.registry.default_queue

    def task_name(self, step: Step | str) -> str:
        name = step.name if isinstance(step, Step) else step
        return f"durable.{self.name}.{name}"

    # -- starting runs

    def start(self, state: Any = None, *, workflow_id: str | None = None, key: str | None = None,
              delay: float | None = None, at: datetime | None = None,
              queue: str | None = None, priority: int | None = None,
              concurrency_key: str | None = None, connection: Any = None,
              key_reuse: str | None = None, deadline: float | datetime | None = None) -> str:
        """Start a run and return its workflow_id.

        ``key`` is a business key (and a signal address): one run per key. ``key_reuse``
        says whether a finished run gives its key back: ``"reject"`` (the default setting:
        never, while the finished run is retained), ``"after_failure"`` (only if it did not
        end ``done``) or ``"after_finish"`` (at any end);
        ``delay`` (seconds) or ``at`` (an aware datetime) start it later, durably.
        ``priority`` 0..9 (9 first) orders the broker queue and the coordinator's sweeps.
        ``concurrency_key``: at most one run per key executes a step at a time.
        ``connection``: a SQLAlchemy Connection or Session of your own transaction on the
        same database; the run commits or rolls back with it.
        ``deadline`` (seconds from now, or an aware datetime; default: the workflow's
        ``deadline``): the run fails, or compensates, once it passes.
        Raises ``DuplicateWorkflow`` when the key or workflow_id is taken (or a
        ``Singleton`` key is live), ``Throttled`` when a ``Throttle(drop=True)`` refuses it.
        """
        self.check()
        return self.owner.start_run(self, state, workflow_id=workflow_id, key=key, delay=delay,
                                   at=at, queue=queue, priority=priority,
                                   concurrency_key=concurrency_key, connection=connection,
                                   key_reuse=key_reuse, deadline=deadline)

    def schedule(self, name: str, cron: str, *, timezone: str = "UTC", state: Any = None,
                 catchup: str = "latest", priority: int | None = None) -> Any:
        """Start this workflow on a cron schedule (see ``Durable.schedule``)."""
        return self.owner.schedule(name, self, cron=cron, timezone=timezone, state=state,
                                   catchup=catchup, priority=priority)

    def start_many(self, states: Iterable[Any], *, keys: Iterable[str | None] | None = None,
                   workflow_ids: Iterable[str | None] | None = None, delay: float | None = None,
                   at: datetime | None = None, queue: str | None = None,
                   on_conflict: Literal["raise", "existing"] = "raise",
                   key_reuse: str | None = None) -> list[str]:
        """Start one run per item of ``states`` in one transaction; returns their
        workflow_ids in order.

        ``keys`` and ``workflow_ids`` (optional, one per state, ``None`` for none) work as
        in :meth:`start`; a key or id may appear only once in a batch. When a key or id is
        already taken, ``on_conflict="raise"`` raises ``DuplicateWorkflow`` and starts
        nothing (all or nothing); ``"existing"`` starts the others and returns the id of
        the run that holds it in its place.
        """
        return self.owner.start_runs(self, states, keys=keys, workflow_ids=workflow_ids,
                                     delay=delay, at=at, queue=queue,
                                     on_conflict=on_conflict, key_reuse=key_reuse)

    def __repr__(self) -> str:
        return f"<Workflow {self.name} v{self.version} steps={list(self.steps)}>"


# ----------------------------------------------------------------------------- registry


class WorkflowOwner(Protocol):
    """What a Workflow needs from whoever declared it (the Durable's parts, wired in
    app.py): the registry, a way to register a step's Celery task, to start runs, and to
    schedule them."""

    registry: Registry

    def register_step(self, wf: Workflow, step: Step) -> None: ...

    def start_run(self, wf: Workflow, state: Any, **options: Any) -> str: ...

    def start_runs(self, wf: Workflow, states: Any, **options: Any) -> list[str]: ...

    def schedule(self, name: str, wf: Workflow, **options: Any) -> Any: ...


class Registry:
    """The workflows one Durable declared, by (name, version); the latest version by name.

    ``default_queue`` is read when needed (a Celery app may be configured after the Durable
    is created)."""

    def __init__(self, default_queue: Callable[[], str]) -> None:
        self._default_queue = default_queue
        self._workflows: dict[tuple[str, int], Workflow] = {}
        self._latest: dict[str, Workflow] = {}

    @property
    def default_queue(self) -> str:
        return self._default_queue()

    def add(self, wf: Workflow) -> None:
        if (wf.name, wf.version) in self._workflows:
            raise errors.InvalidArgument(f"workflow {wf.name!r} v{wf.version} is already declared")
        self._workflows[(wf.name, wf.version)] = wf
        latest = self._latest.get(wf.name)
        if latest is None or latest.version < wf.version:
            self._latest[wf.name] = wf

    def find(self, name: str, version: int) -> Workflow | None:
        """The workflow ``name`` v``version``, or None if this process does not know it."""
        return self._workflows.get((name, version))

    def owns(self, wf: Workflow) -> bool:
        return self._workflows.get((wf.name, wf.version)) is wf

    def versions(self, name: str) -> list[int]:
        return sorted(v for (n, v) in self._workflows if n == name)

    def get(self, name: Any, version: Any = None) -> Workflow:
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

    def step_of(self, fn: Any) -> tuple[Workflow, Step] | None:
        """The workflow and step whose function is ``fn``."""
        for wf in self._workflows.values():
            for step in wf.steps.values():
                if step.fn is fn:
                    return wf, step
        return None

    def check(self) -> None:
        """Raise ``InvalidArgument`` if a declared workflow is incomplete."""
        for wf in self._workflows.values():
            wf.check()

    def __iter__(self) -> Any:
        return iter(list(self._workflows.values()))
