"""The hooks seam, as pure logic: around_step composes (first added outermost), events reach
every listener, a failing listener never fails the step, and bad hooks are refused."""

from __future__ import annotations

from typing import Any

import pytest

from durable_celery.errors import InvalidArgument
from durable_celery.runtime.hooks import Counters, Hooks


class Around:
    def __init__(self, name: str, trail: list[str]) -> None:
        self.name, self.trail = name, trail

    def around_step(self, claim: Any, call: Any) -> Any:
        self.trail.append(f"{self.name} in")
        try:
            return call()
        finally:
            self.trail.append(f"{self.name} out")


def test_around_step_composes_first_added_outermost() -> None:
    trail: list[str] = []
    hooks = Hooks(Around("a", trail))
    hooks.add(Around("b", trail))
    assert hooks.run_step(None, lambda: trail.append("step") or 42) == 42  # type: ignore[arg-type]
    assert trail == ["a in", "b in", "step", "b out", "a out"]


def test_events_reach_every_listener_and_a_failing_one_is_ignored() -> None:
    counters = Counters()

    class Broken:
        def on_event(self, name: str, claim: Any) -> None:
            raise RuntimeError("metrics backend down")

    hooks = Hooks(Broken(), counters)
    hooks.event("steps")
    hooks.event("steps")
    hooks.event("stale")
    assert dict(counters.counts) == {"steps": 2, "stale": 1}


def test_a_step_error_passes_through_every_hook() -> None:
    trail: list[str] = []
    hooks = Hooks(Around("a", trail))

    def boom() -> Any:
        raise ValueError("step failed")

    with pytest.raises(ValueError, match="step failed"):
        hooks.run_step(None, boom)  # type: ignore[arg-type]
    assert trail == ["a in", "a out"]


@pytest.mark.parametrize("bad", [object(), 3, "hook", None])
def test_something_that_is_not_a_hook_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="around_step"):
        Hooks().add(bad)
