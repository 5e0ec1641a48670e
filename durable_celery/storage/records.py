"""Frozen records returned by the store; never raw rows."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class Status(str, enum.Enum):
    """A run's status (the ``runs.status`` column). A ``str``: equal to its value, so it
    compares with, and is stored as, the plain text. docs/statuses.md says which statement
    moves a run from one to another, under which guard."""

    RUNNABLE = "runnable"                # due now, or at eligible_at
    EXECUTING = "executing"              # claimed by a worker process (owner + lease)
    AWAITING = "awaiting"                # parked until a signal (or its deadline)
    AWAITING_CHILDREN = "awaiting_children"  # parked until its children are terminal
    COMPENSATING = "compensating"        # running its compensations after a failure
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: frozenset[str] = frozenset({Status.DONE, Status.FAILED, Status.CANCELLED,
                                      Status.COMPENSATED, Status.COMPENSATION_FAILED})
STATUSES: frozenset[str] = frozenset(Status)


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """A snapshot of one run, as ``durable.get_workflow`` returns it."""

    workflow_id: str
    workflow: str
    version: int
    status: Status
    step: str
    seq: int
    attempt: int
    state: Any
    input: Any
    result: Any
    error: Any
    key: str | None
    queue: str
    priority: int
    parent_id: str | None
    eligible_at: datetime
    await_names: tuple[str, ...] | None
    await_deadline: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    forked_from: str | None
    children_pending: int = 0   # children of the current Spawn not yet terminal

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def id(self) -> str:
        """Alias of ``workflow_id``."""
        return self.workflow_id

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Run:
        names = row["await_names"]
        return cls(
            workflow_id=row["id"], workflow=row["workflow"], version=row["version"],
            status=Status(row["status"]), step=row["step"], seq=row["seq"], attempt=row["attempt"],
            state=row["state"], input=row["input"], result=row["result"], error=row["error"],
            key=row["key"], queue=row["queue"], priority=row["priority"],
            parent_id=row["parent_id"], eligible_at=row["eligible_at"],
            await_names=tuple(names) if names is not None else None,
            await_deadline=row["await_deadline"], created_at=row["created_at"],
            updated_at=row["updated_at"], finished_at=row["finished_at"],
            forked_from=row["forked_from"], children_pending=row["children_pending"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    """One committed outcome in a run's history."""

    workflow_id: str
    seq: int
    step: str
    attempt: int
    outcome: str
    next_step: str | None
    state: Any
    error: Any
    started_at: datetime | None
    finished_at: datetime
    worker: str | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> StepRecord:
        return cls(
            workflow_id=row["run_id"], seq=row["seq"], step=row["step"], attempt=row["attempt"],
            outcome=row["outcome"], next_step=row["next_step"], state=row["state"],
            error=row["error"], started_at=row["started_at"], finished_at=row["finished_at"],
            worker=row["worker"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Signal:
    """A signal as a step sees it in ``ctx.signals``."""

    id: int
    name: str
    payload: Any
    dedup_key: str | None
    created_at: datetime | None = None

    @classmethod
    def from_json(cls, data: Mapping[Any, Any]) -> Signal:
        created = data.get("created_at")
        return cls(id=int(data["id"]), name=data["name"], payload=data.get("payload"),
                   dedup_key=data.get("dedup_key"),
                   created_at=datetime.fromisoformat(created) if isinstance(created, str) else created)


@dataclass(frozen=True, slots=True, kw_only=True)
class Child:
    """A child run as the parent's next step sees it in ``ctx.children``."""

    index: int
    workflow_id: str
    workflow: str
    status: Status
    result: Any
    error: Any
    key: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, data: Mapping[Any, Any]) -> Child:
        return cls(index=int(data["index"]), workflow_id=data["workflow_id"],
                   workflow=data["workflow"], status=Status(data["status"]), result=data.get("result"),
                   error=data.get("error"), key=data.get("key"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """What a successful claim hands the executor."""

    workflow_id: str
    workflow: str
    version: int
    step: str
    seq: int
    visit: int
    attempt: int
    state: Any
    key: str | None
    run_queue: str | None
    queue: str
    priority: int
    timed_out: bool
    lease: str
    signals: tuple[Signal, ...]
    concurrency_key: str | None = None
    parent_id: str | None = None   # a parent waits on this run's ending
    children: tuple[Child, ...] = ()
    compensating: bool = False
    compensations: tuple[dict[str, Any], ...] = ()    # the stack, top last
    compensation_errors: tuple[Any, ...] = ()
    failure: Any = None
    single_step: bool = False   # a child started from a step function: that step only
    due_in: float = 0.0   # claimed this many seconds before the step is due (a timer)
    token_seq: int | None = None  # the seq whose start holds its rate-limit tokens

    @property
    def has_tokens(self) -> bool:
        """This attempt already took its rate-limit tokens (claimed again after a park)."""
        return self.token_seq is not None and self.token_seq == self.seq

    @classmethod
    def from_row(cls, row: Mapping[Any, Any], lease: str) -> Claim:
        return cls(
            due_in=float(row.get("due_in") or 0.0),
            token_seq=row.get("token_seq"),
            single_step=bool(row["single_step"]),
            children=tuple(Child.from_json(c) for c in (row["children"] or ())),
            compensating=row["status"] == Status.COMPENSATING,
            compensations=tuple(row["compensations"] or ()),
            compensation_errors=tuple(row["compensation_errors"] or ()),
            failure=row["failure"],
            workflow_id=row["id"], workflow=row["workflow"], version=row["version"],
            step=row["step"], seq=row["seq"], visit=row["visit"], attempt=row["attempt"],
            state=row["state"], key=row["key"], run_queue=row["run_queue"], queue=row["queue"],
            priority=row["priority"], timed_out=row["timed_out"], lease=lease,
            signals=tuple(Signal.from_json(s) for s in (row["signals"] or ())),
            concurrency_key=row.get("concurrency_key"), parent_id=row.get("parent_id"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Dispatch:
    """A message to publish: run ``step`` of ``workflow_id`` at ``seq``."""

    workflow_id: str
    workflow: str
    step: str
    seq: int
    queue: str
    priority: int
    # A timer published ahead of its due time (``timer_lead``): when (this host's epoch
    # seconds) the worker should take the message up; a Celery eta.
    eta: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Dispatch:
        return cls(workflow_id=row["id"], workflow=row["workflow"], step=row["step"],
                   seq=row["seq"], queue=row["queue"], priority=row["priority"])


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalResult:
    """What ``durable.signal`` returns."""

    workflow_id: str
    signal_id: int | None
    duplicate: bool
    woke: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """A step's outcome, ready to commit."""

    status: Status                # runnable | executing (run-ahead) | awaiting | done | failed
    step: str                     # the step to run next (the same step for terminal)
    queue: str
    attempt: int
    state: str                    # JSON text
    result: str | None = None     # JSON text
    error: str | None = None      # JSON text
    delay: float = 0.0
    until: datetime | None = None
    publish: bool = False         # runnable and due now: the caller publishes after commit
    await_names: Sequence[str] | None = None
    deadline: float | None = None
    outcome: str                  # history label
    next_step: str | None
    consume: bool = True          # the signals this step saw are consumed
    await_all: bool = False       # Await(mode="all")
    children: str | None = None   # Spawn: JSON array of child rows to insert
    children_count: int = 0
    spawn_cap: int | None = None  # Spawn: foreach's concurrency cap
    comp_push: str | None = None  # JSON: a completed step's compensation, pushed
    compensations: str | None = None        # JSON: the new compensation stack (replaces)
    compensation_errors: str | None = None  # JSON: replaces
    failure: str | None = None              # JSON: the failure that started compensating

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True, slots=True, kw_only=True)
class Committed:
    """A commit that took effect; ``dispatch`` is set when a message must be published."""

    seq: int
    status: str
    dispatch: Dispatch | None
    wakes: tuple[Dispatch, ...] = ()  # children started, parents woken, siblings released
