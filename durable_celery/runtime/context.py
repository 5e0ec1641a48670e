"""The ``ctx`` a step function receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from durable_celery.storage.records import Child, Signal


@dataclass(slots=True, kw_only=True)
class Context:
    """What a step sees: its run, its state (mutable), its attempt and delivered signals.

    After a ``Spawn``, ``children`` holds the child runs in spawn order (workflow_id,
    workflow, status, result, error); failed and cancelled children are there too.

    ``idempotency_key`` is the same for every execution of this visit to the step: re-runs
    after a crash and retries after an exception share it; a later visit to the same step
    (a loop) gets a new one. Pass it to external services to make effects idempotent.
    """

    workflow_id: str
    workflow: str
    version: int
    step: str
    state: Any
    attempt: int
    seq: int
    key: str | None
    timed_out: bool = False
    signals: tuple[Signal, ...] = field(default_factory=tuple)
    idempotency_key: str = ""
    children: tuple[Child, ...] = field(default_factory=tuple)
    compensating: bool = False   # this is a compensation, undoing a completed step
    failure: Any = None          # while compensating: the failure that started it

    def signal(self, name: str) -> Signal | None:
        """The first delivered signal called ``name``, if any."""
        return next((s for s in self.signals if s.name == name), None)
