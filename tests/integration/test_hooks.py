"""Hooks in a real step path: a hook wraps each step attempt with the claim in hand, sees
every decision, and can never fail a step by failing itself."""

from __future__ import annotations

from typing import Any

from durable_celery import Done, Next, Retry
from durable_celery.testing import drain


class Tracer:
    def __init__(self) -> None:
        self.spans: list[tuple[str, str, int]] = []
        self.events: list[tuple[str, str | None]] = []

    def around_step(self, claim: Any, call: Any) -> Any:
        self.spans.append((claim.workflow_id, claim.step, claim.attempt))
        return call()

    def on_event(self, name: str, claim: Any) -> None:
        self.events.append((name, None if claim is None else claim.step))


def test_a_hook_wraps_every_step_attempt_and_sees_each_commit(durable, published):
    tracer = Tracer()
    durable.add_hook(tracer)
    wf = durable.workflow("hooked")

    @wf.step
    def first(ctx):
        return Next("second")

    @wf.step
    def second(ctx):
        if ctx.attempt == 0:
            return Retry(delay=0)
        return Done("ok")

    wid = wf.start()
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == "ok"
    assert tracer.spans == [(wid, "first", 0), (wid, "second", 0), (wid, "second", 1)]
    assert [e for e in tracer.events if e[0] == "steps"] == [
        ("steps", "first"), ("steps", "second"), ("steps", "second")]
    assert ("run_ahead", "first") in tracer.events
    assert durable.stats()["steps"] == 3  # the built-in counters are a hook too


def test_a_hook_that_raises_on_events_never_fails_the_run(durable, published):
    class Broken:
        def on_event(self, name: str, claim: Any) -> None:
            raise RuntimeError("exporter down")

    durable.add_hook(Broken())
    wf = durable.workflow("hooked_broken")

    @wf.step
    def only(ctx):
        return Done(1)

    wid = wf.start()
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == 1
