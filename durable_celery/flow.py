"""Flow-control policies: what a workflow, a step or a durable task declares to protect
what it calls. Pure declarations and arithmetic; the statements that hold them across
workers are in :mod:`durable_celery.storage.flow` (docs/flow-control.md).

- :class:`RateLimit`: at most ``limit`` step starts per ``period`` seconds, globally or per
  key; a limited step waits (parked as a timer: no worker, no broker message) for its slot.
- :class:`Throttle`: at most ``limit`` run starts per ``period`` per key; the rest start
  later (``drop=False``) or are refused with :class:`~durable_celery.errors.Throttled`.
- :class:`Debounce`: starts with the same key within ``seconds`` make one run.
- :class:`Singleton`: at most one live run per key; a new start is rejected, queued behind
  it, or replaces it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from durable_celery import errors
from durable_celery.checks import check_name, check_seconds
from durable_celery.storage.flow import Bucket

KeyFunction = Callable[[Any], Any]

# The longest key a policy may compute (it is stored in an index).
MAX_POLICY_KEY = 200
# Celery's rate strings: "10/s", "100/m", "1000/h" (a bare number is per second).
CELERY_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*$")
PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _check_limit(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.InvalidArgument(f"{what} must be an int >= 1, got {value!r}"[:300])
    return value


def _check_period(value: Any, what: str) -> float:
    seconds = check_seconds(value, what)
    if seconds <= 0:
        raise errors.InvalidArgument(f"{what} must be more than 0 seconds, got {value!r}")
    return seconds


def _check_key_function(key: Any, what: str) -> None:
    if key is not None and not callable(key):
        raise errors.InvalidArgument(
            f"{what} key must be a function of the run's state (or None), got {key!r}"[:300])


def policy_key(fn: KeyFunction | None, state: Any, what: str) -> str:
    """The key ``fn`` computes from ``state`` ('' for a global policy); a clear error when
    it raises or returns something that cannot be a key."""
    if fn is None:
        return ""
    try:
        value = fn(state)
    except Exception as exc:
        raise errors.InvalidArgument(
            f"the {what} key function raised {type(exc).__name__}: {exc}"[:300]) from exc
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise errors.InvalidArgument(
            f"the {what} key function must return a str or an int, got {value!r}"[:300])
    text = str(value)
    if len(text) > MAX_POLICY_KEY or "\x00" in text:
        raise errors.InvalidArgument(
            f"the {what} key must be at most {MAX_POLICY_KEY} characters, without NUL")
    return text


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``limit`` starts per ``period`` seconds, spread evenly (a start every
    ``period / limit`` seconds); ``burst`` lets that many start at once after a quiet spell.

    ``key`` computes a key from the run's state (a durable task's state is
    ``{"args": [...], "kwargs": {...}}``): each key has its own budget (per tenant, say),
    and one key's backlog never delays another's. ``name`` names the bucket: limits with
    the same name share it (one provider called from several steps or workflows); without
    one, the bucket is named after where the limit is declared.
    """

    limit: int
    period: float = 1.0
    key: KeyFunction | None = None
    name: str | None = None
    burst: int = 1

    def __post_init__(self) -> None:
        _check_limit(self.limit, "RateLimit limit")
        object.__setattr__(self, "period", _check_period(self.period, "RateLimit period"))
        _check_limit(self.burst, "RateLimit burst")
        if self.burst > self.limit:
            raise errors.InvalidArgument(
                f"RateLimit burst ({self.burst}) cannot exceed its limit ({self.limit})")
        _check_key_function(self.key, "RateLimit")
        if self.name is not None:
            check_name(self.name, "RateLimit name")

    @classmethod
    def parse(cls, value: Any, *, name: str | None = None) -> RateLimit:
        """A RateLimit, or Celery's ``rate_limit`` string ("10/s", "100/m", "5/h")."""
        if isinstance(value, RateLimit):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise errors.InvalidArgument(
                f"a rate limit is a RateLimit or a string like '10/s', got {value!r}"[:300])
        match = CELERY_RATE.match(value)
        if match is None:
            raise errors.InvalidArgument(
                f"rate limit {value!r} is not like '10/s', '100/m' or '5/h'"[:300])
        rate = float(match[1])
        if rate <= 0:
            raise errors.InvalidArgument(f"rate limit {value!r} must be more than 0")
        period = PERIODS[match[2] or "s"]
        # Celery's limit is a rate: "0.5/s" is one start every two seconds.
        if rate < 1:
            return cls(limit=1, period=period / rate, name=name)
        if rate != int(rate):
            raise errors.InvalidArgument(
                f"rate limit {value!r}: use a whole number of starts (or a longer period)")
        return cls(limit=int(rate), period=period, name=name)

    @property
    def interval(self) -> float:
        """Seconds between two starts at the full rate."""
        return self.period / self.limit

    @property
    def tolerance(self) -> float:
        """How far ahead of the even spacing a start may come (the burst)."""
        return (self.burst - 1) * self.interval

    def bucket(self, default_name: str) -> str:
        return self.name or default_name


@dataclass(frozen=True, slots=True)
class Throttle:
    """At most ``limit`` run starts per ``period`` seconds per key. A start over the
    limit starts later, at the next free slot (``drop=False``), or is refused with
    ``Throttled`` (``drop=True``; nothing is stored)."""

    limit: int
    period: float = 1.0
    key: KeyFunction | None = None
    drop: bool = False
    burst: int = 1

    def __post_init__(self) -> None:
        _check_limit(self.limit, "Throttle limit")
        object.__setattr__(self, "period", _check_period(self.period, "Throttle period"))
        _check_limit(self.burst, "Throttle burst")
        if self.burst > self.limit:
            raise errors.InvalidArgument(
                f"Throttle burst ({self.burst}) cannot exceed its limit ({self.limit})")
        _check_key_function(self.key, "Throttle")
        if not isinstance(self.drop, bool):
            raise errors.InvalidArgument(f"Throttle drop must be a bool, got {self.drop!r}")

    @property
    def interval(self) -> float:
        return self.period / self.limit

    @property
    def tolerance(self) -> float:
        return (self.burst - 1) * self.interval


Keep = Literal["last", "first"] | Callable[[Any, Any], Any]


@dataclass(frozen=True, slots=True)
class Debounce:
    """Starts with the same key less than ``seconds`` apart make one run, which starts
    ``seconds`` after the last of them (never later than ``max_wait`` after the first).

    ``keep`` says which input it runs with: ``"last"`` (the latest start's state),
    ``"first"``, or a function ``merge(pending_state, new_state) -> state`` (accumulate).
    """

    seconds: float
    key: KeyFunction | None = None
    keep: Keep = "last"
    max_wait: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "seconds", _check_period(self.seconds, "Debounce seconds"))
        _check_key_function(self.key, "Debounce")
        if not (self.keep in ("last", "first") or callable(self.keep)):
            raise errors.InvalidArgument(
                f"Debounce keep must be 'last', 'first' or a merge function, got "
                f"{self.keep!r}"[:300])
        if self.max_wait is not None:
            wait = _check_period(self.max_wait, "Debounce max_wait")
            if wait < self.seconds:
                raise errors.InvalidArgument(
                    f"Debounce max_wait ({wait}) must be at least seconds ({self.seconds})")
            object.__setattr__(self, "max_wait", wait)

    def merged(self, pending: Any, new: Any) -> Any:
        if self.keep == "last":
            return new
        if self.keep == "first":
            return pending
        try:
            return self.keep(pending, new)
        except Exception as exc:
            raise errors.InvalidArgument(
                f"the Debounce merge function raised {type(exc).__name__}: {exc}"[:300]) from exc


SINGLETON_POLICIES = ("reject", "queue", "replace")


@dataclass(frozen=True, slots=True)
class Singleton:
    """At most one live run per key. A start while one is live: ``"reject"`` raises
    ``DuplicateWorkflow`` (naming the live run), ``"queue"`` stores it held until every
    run before it ended (first come, first served), ``"replace"`` cancels the live run
    and starts the new one."""

    key: KeyFunction | None = None
    on_conflict: Literal["reject", "queue", "replace"] = "reject"

    def __post_init__(self) -> None:
        _check_key_function(self.key, "Singleton")
        if self.on_conflict not in SINGLETON_POLICIES:
            raise errors.InvalidArgument(
                f"Singleton on_conflict must be one of {SINGLETON_POLICIES}, got "
                f"{self.on_conflict!r}"[:300])


def rate_limits(value: Any, what: str) -> tuple[RateLimit, ...]:
    """A ``rate_limit=`` option: None, one limit (a RateLimit or a Celery string) or a
    list of them."""
    if value is None:
        return ()
    if isinstance(value, (RateLimit, str)):
        return (RateLimit.parse(value),)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        return tuple(RateLimit.parse(v) for v in value)
    raise errors.InvalidArgument(
        f"{what} must be a RateLimit, a string like '10/s', or a list of them; got "
        f"{value!r}"[:300])


def check_policy(value: Any, kind: type, what: str) -> Any:
    if value is not None and not isinstance(value, kind):
        raise errors.InvalidArgument(
            f"{what} must be a {kind.__name__}(...), got {value!r}"[:300])
    return value


ON_LATE = ("fail", "skip")


def check_on_late(value: Any) -> str:
    if value not in ON_LATE:
        raise errors.InvalidArgument(f"on_late must be 'fail' or 'skip', got {value!r}"[:300])
    return str(value)


def buckets(limits: Iterable[RateLimit], state: Any, default_name: str) -> list[Bucket]:
    """The buckets a step start takes a token from, for a run in ``state``."""
    return [Bucket(name=rl.bucket(default_name), key=policy_key(rl.key, state, "RateLimit"),
                   interval=rl.interval, tolerance=rl.tolerance) for rl in limits]


def check_deadline(value: Any) -> float:
    """A workflow's ``deadline``: seconds (more than 0) from each run's start."""
    return _check_period(value, "deadline")


def check_limit_seconds(value: Any, what: str) -> float:
    """A step's ``time_limit`` / ``soft_time_limit``: seconds, more than 0."""
    return _check_period(value, what)
