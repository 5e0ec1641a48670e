"""Workflow and step definitions, retry policies, and the outcome records steps return."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypedDict, overload

from durable_celery import errors

if TYPE_CHECKING:
    from durable_celery.app import Durable
    from durable_celery.runtime.context import Context

StepFunction = Callable[["Context"], Any]


class _Keep:
    """Marker: the outcome keeps the state as the step left it."""

    def __repr__(self) -> str:
        return "KEEP"

    def __reduce__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()

# The longest timer, delay or timeout we accept (100 years): far beyond any real schedule,
# well inside what Postgres intervals and timestamps hold.
MAX_SECONDS = 100 * 366 * 24 * 3600.0


def check_seconds(value: Any, what: str, error: type[errors.DurableCeleryError] = errors.InvalidArgument,
                  ) -> float:
    """A finite number of seconds in ``[0, MAX_SECONDS]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) \
            or not 0 <= value <= MAX_SECONDS:
        raise error(f"{what} must be a finite number of seconds >= 0 (at most {MAX_SECONDS:.0f}), "
                    f"got {value!r}")
    return float(value)

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


@dataclass(frozen=True, slots=True)
class Await:
    """Park until a signal with one of ``names`` arrives (or ``timeout`` seconds pass)."""

    names: str | Iterable[str]
    next: str | Callable[..., Any] | None = None
    timeout: float | None = None
    state: Any = KEEP


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


Outcome = Next | Retry | Sleep | Await | Done | Fail
OUTCOME_TYPES = (Next, Retry, Sleep, Await, Done, Fail)

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

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,99}$")


def check_run_ahead(value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise errors.InvalidArgument(f"run_ahead must be True, False or None, got {value!r}"[:300])


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise errors.InvalidArgument(
            f"{what} must be 1-100 characters of letters, digits, '_', '.', ':' or '-', "
            f"starting with a letter or '_'; got {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    name: str
    fn: StepFunction
    index: int
    retry: RetryPolicy
    queue: str | None = None
    run_ahead: bool | None = None

    def __call__(self, ctx: Context) -> Any:
        return self.fn(ctx)


@dataclass(eq=False)
class Workflow:
    """A named, versioned, ordered set of steps. Create with ``durable.workflow(...)``."""

    durable: Durable
    name: str
    version: int = 1
    queue: str | None = None
    run_ahead: bool | None = None
    steps: dict[str, Step] = field(default_factory=dict)

    # -- declaring steps

    @overload
    def step(self, fn: StepFunction) -> StepFunction: ...

    @overload
    def step(self, fn: None = None, *, name: str | None = None,
             retry: RetryOptions | RetryPolicy | None = None, queue: str | None = None,
             run_ahead: bool | None = None) -> Callable[[StepFunction], StepFunction]: ...

    def step(self, fn: StepFunction | None = None, *, name: str | None = None,
             retry: RetryOptions | RetryPolicy | None = None, queue: str | None = None,
             run_ahead: bool | None = None) -> Any:
        """Declare a step. The first declared step is the initial one.

        Use bare (``@wf.step``) or with options (``@wf.step(retry={...}, queue=...)``).
        The function is returned unchanged, so it can still be called directly in tests.
        """
        policy = RetryPolicy.parse(retry)
        if queue is not None:
            check_name(queue, "queue")
        check_run_ahead(run_ahead)

        def register(func: StepFunction) -> StepFunction:
            if not callable(func):
                raise errors.InvalidArgument(f"a step must be callable, not {func!r}")
            step_name = check_name(func.__name__ if name is None else name, "step name")
            if step_name in self.steps:
                raise errors.InvalidArgument(
                    f"workflow {self.name!r} v{self.version} already has a step {step_name!r}"
                )
            step = Step(name=step_name, fn=func, index=len(self.steps), retry=policy,
                        queue=queue, run_ahead=run_ahead)
            self.steps[step_name] = step
            self.durable._register_step(self, step)
            return func

        if fn is not None:
            return register(fn)
        return register

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
        return step.queue or run_queue or self.queue or self.durable.default_queue

    def task_name(self, step: Step | str) -> str:
        name = step.name if isinstance(step, Step) else step
        return f"durable.{self.name}.{name}"

    # -- starting runs

    def start(self, state: Any = None, *, workflow_id: str | None = None, key: str | None = None,
              delay: float | None = None, at: datetime | None = None,
              queue: str | None = None) -> str:
        """Start a run and return its workflow_id.

        ``key`` is a business key unique among live runs (and a signal address);
        ``delay`` (seconds) or ``at`` (an aware datetime) start it later, durably.
        Raises ``DuplicateWorkflow`` when the key or workflow_id is taken.
        """
        return self.durable._start(self, state, workflow_id=workflow_id, key=key, delay=delay,
                                   at=at, queue=queue)

    def start_many(self, states: Iterable[Any], *, keys: Iterable[str | None] | None = None,
                   workflow_ids: Iterable[str | None] | None = None, delay: float | None = None,
                   at: datetime | None = None, queue: str | None = None,
                   on_conflict: Literal["raise", "existing"] = "raise") -> list[str]:
        """Start one run per item of ``states`` in one transaction; returns their
        workflow_ids in order.

        ``keys`` and ``workflow_ids`` (optional, one per state, ``None`` for none) work as
        in :meth:`start`; a key or id may appear only once in a batch. When a key or id is
        already taken, ``on_conflict="raise"`` raises ``DuplicateWorkflow`` and starts
        nothing (all or nothing); ``"existing"`` starts the others and returns the id of
        the run that holds it in its place.
        """
        return self.durable._start_many(self, states, keys=keys, workflow_ids=workflow_ids,
                                        delay=delay, at=at, queue=queue,
                                        on_conflict=on_conflict)

    def __repr__(self) -> str:
        return f"<Workflow {self.name} v{self.version} steps={list(self.steps)}>"
