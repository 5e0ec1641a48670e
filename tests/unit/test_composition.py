"""Composition as pure logic: Spawn / parallel / foreach specs, what a Spawn commits, the
compensation stack, and the typed errors of bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from durable_celery.definitions import (
    KEEP,
    Await,
    ChildSpec,
    Done,
    Fail,
    Next,
    Retry,
    Spawn,
    Workflow,
    foreach,
    parallel,
)
from durable_celery.errors import InvalidArgument, InvalidPayload
from durable_celery.runtime import outcomes
from tests.unit.fakes import FakeDurable


def declare(durable: FakeDurable, name: str = "trip") -> Workflow:
    wf = Workflow(owner=durable, name=name)  # type: ignore[arg-type]
    durable.registry.add(wf)
    return wf


@pytest.fixture
def trip(fake_durable: FakeDurable) -> Workflow:
    wf = declare(fake_durable)

    @wf.step(compensate="cancel_flight")
    def book_flight(ctx: Any) -> Any: ...

    @wf.step(compensate="cancel_hotel")
    def book_hotel(ctx: Any) -> Any: ...

    @wf.step
    def pay(ctx: Any) -> Any: ...

    @wf.step
    def join(ctx: Any) -> Any: ...

    @wf.compensation
    def cancel_flight(ctx: Any) -> Any: ...

    @wf.compensation(queue="undo")
    def cancel_hotel(ctx: Any) -> Any: ...

    return wf


def visit(wf: Workflow, step: str, **changes: Any) -> outcomes.Visit:
    steps = wf.compensations if changes.get("compensating") else wf.steps
    v = outcomes.Visit(workflow=wf, step=steps[step], attempt=0, queue="default",
                       run_queue=None, original_state={"s": 1}, max_payload_bytes=100_000,
                       run_ahead=False)
    return replace(v, **changes)


STACK = ({"step": "book_flight", "compensation": "cancel_flight", "seq": 1},
         {"step": "book_hotel", "compensation": "cancel_hotel", "seq": 2})

# ----------------------------------------------------------------------------- specs


def test_bad_concurrency_is_refused(trip: Workflow) -> None:
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(InvalidArgument, match="concurrency must be None or an int >= 1"):
            foreach([1], trip, concurrency=bad)
        with pytest.raises(InvalidArgument, match="concurrency must be None or an int >= 1"):
            Spawn([], concurrency=bad)


def test_children_must_be_a_list_of_specs(trip: Workflow) -> None:
    with pytest.raises(InvalidArgument, match="Spawn children must be"):
        Spawn("not a list")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"a child is wf\.child"):
        Spawn([42])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="foreach items must be"):
        foreach("abc", trip)
    with pytest.raises(InvalidArgument, match="foreach needs a workflow"):
        foreach([1], "trip")  # type: ignore[arg-type]


def test_child_state_must_be_a_json_object(trip: Workflow) -> None:
    with pytest.raises(InvalidPayload):
        trip.child({"when": object()})
    with pytest.raises(InvalidPayload):
        trip.child([1, 2])
    with pytest.raises(InvalidPayload):
        foreach([{"x": {1, 2}}], trip)
    with pytest.raises(InvalidArgument, match="key must be"):
        trip.child({}, key="")


def test_foreach_items_become_states(trip: Workflow) -> None:
    spawn = foreach([{"to": "a@x"}, 7], trip, concurrency=1, next="join")
    states = [c.state for c in spawn.children]  # type: ignore[union-attr]
    assert states == [{"to": "a@x"}, {"item": 7}]
    assert spawn.concurrency == 1 and spawn.next == "join"


def test_parallel_children_copy_the_parent_state(trip: Workflow) -> None:
    spawn = parallel(trip, trip.child({"own": 1}), next="join")
    assert [c.state for c in spawn.children] == [KEEP, {"own": 1}]  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- Spawn


def test_a_spawn_commits_children_in_order_with_the_cap(trip: Workflow) -> None:
    spawn = Spawn([trip.child({"n": i}, key=f"k{i}") for i in range(3)] + [trip.child()],
                  next="join", concurrency=2)
    t = outcomes.decide(visit(trip, "pay"), spawn, {"s": 2})
    assert (t.status, t.step, t.outcome, t.children_count) == ("awaiting_children", "join",
                                                               "spawn", 4)
    rows = json.loads(t.children or "")
    assert [(r["idx"], r["held"], r["step"], r["key"], r["state"]) for r in rows] == [
        (0, False, "book_flight", "k0", {"n": 0}), (1, False, "book_flight", "k1", {"n": 1}),
        (2, True, "book_flight", "k2", {"n": 2}), (3, True, "book_flight", None, {"s": 2})]
    assert len({r["id"] for r in rows}) == 4


def test_zero_children_continue_at_once(trip: Workflow) -> None:
    t = outcomes.decide(visit(trip, "pay"), Spawn([], next="join"), {"s": 2})
    assert (t.status, t.step, t.children, t.publish) == ("runnable", "join", None, True)


def test_spawning_an_unregistered_workflow_fails_the_run(trip: Workflow) -> None:
    stranger = Workflow(owner=FakeDurable(), name="elsewhere")  # type: ignore[arg-type]

    @stranger.step
    def only(ctx: Any) -> Any: ...

    t = outcomes.decide(visit(trip, "pay"), Spawn([stranger.child({})]), {})
    assert t.status == "failed"
    assert "not registered with this Durable" in json.loads(t.error or "")["message"]
    t = outcomes.decide(visit(trip, "pay"), parallel(lambda ctx: None), {})
    assert "not a step of a registered workflow" in json.loads(t.error or "")["message"]


def test_duplicate_child_ids_or_keys_are_refused(trip: Workflow) -> None:
    for spawn in (Spawn([trip.child({}, workflow_id="a"), trip.child({}, workflow_id="a")]),
                  Spawn([trip.child({}, key="k"), trip.child({}, key="k")])):
        t = outcomes.decide(visit(trip, "pay"), spawn, {})
        assert t.status == "failed" and "twice" in json.loads(t.error or "")["message"]


# ----------------------------------------------------------------------------- compensation


def test_compensate_must_name_a_declared_compensation(fake_durable: FakeDurable) -> None:
    wf = declare(fake_durable, "partial")

    @wf.step(compensate="undo_missing")
    def first(ctx: Any) -> Any: ...

    with pytest.raises(InvalidArgument, match=r"compensate= names no declared compensation: "
                                              r"\['undo_missing'\]"):
        wf.check()
    with pytest.raises(InvalidArgument, match="names a step"):
        wf.step(compensate="first")
    with pytest.raises(InvalidArgument, match="already has a step 'first'"):
        wf.compensation(name="first")(lambda ctx: None)


def test_a_completed_step_pushes_its_compensation(trip: Workflow) -> None:
    t = outcomes.decide(visit(trip, "book_flight"), None, {"s": 2})
    assert json.loads(t.comp_push or "") == {"step": "book_flight",
                                             "compensation": "cancel_flight",
                                             "queue": "default"}
    assert outcomes.decide(visit(trip, "book_flight"), Retry(1), {}).comp_push is None
    assert outcomes.decide(visit(trip, "pay"), Next("join"), {}).comp_push is None


def test_a_failure_with_compensations_starts_the_newest(trip: Workflow) -> None:
    t = outcomes.decide(visit(trip, "pay", compensations=STACK), Fail("declined"), {})
    assert (t.status, t.step, t.queue, t.publish, t.outcome) == (
        "compensating", "cancel_hotel", "undo", True, "fail")
    assert json.loads(t.failure or "")["message"] == "declined"
    t = outcomes.decide(visit(trip, "pay"), Fail("declined"), {})
    assert t.status == "failed"


def test_compensations_pop_until_compensated(trip: Workflow) -> None:
    failure = {"type": "Fail", "message": "declined"}
    v = visit(trip, "cancel_hotel", compensating=True, compensations=STACK, failure=failure)
    t = outcomes.decide(v, None, {"s": 3})
    assert (t.status, t.step, t.outcome) == ("compensating", "cancel_flight", "compensated")
    assert json.loads(t.compensations or "") == [STACK[0]]
    v = visit(trip, "cancel_flight", compensating=True, compensations=STACK[:1],
              failure=failure)
    t = outcomes.decide(v, Done(), {"s": 4})
    assert (t.status, json.loads(t.error or ""), t.terminal) == ("compensated", failure, True)


def test_a_failed_compensation_is_recorded_and_the_next_follows(trip: Workflow) -> None:
    failure = {"type": "Fail", "message": "declined"}
    v = visit(trip, "cancel_hotel", compensating=True, compensations=STACK, failure=failure)
    t = outcomes.from_exception(v, RuntimeError("nope"))  # max_attempts 1: exhausted
    assert (t.status, t.step, t.outcome) == ("compensating", "cancel_flight",
                                             "compensation_failed")
    [err] = json.loads(t.compensation_errors or "")
    assert (err["compensation"], err["message"]) == ("cancel_hotel", "nope")
    v = visit(trip, "cancel_flight", compensating=True, compensations=STACK[:1],
              failure=failure, compensation_errors=(err,))
    t = outcomes.decide(v, None, {})
    final = json.loads(t.error or "")
    assert (t.status, final["type"], final["failure"]) == ("compensation_failed",
                                                           "CompensationFailed", failure)


def test_a_compensation_may_not_branch(trip: Workflow) -> None:
    v = visit(trip, "cancel_hotel", compensating=True, compensations=STACK,
              failure={"message": "x"})
    t = outcomes.decide(v, Await("x"), {})
    assert t.status == "compensating" and t.step == "cancel_flight"
    [err] = json.loads(t.compensation_errors or "")
    assert "a compensation returns None" in err["message"]


def test_child_spec_is_public_and_frozen(trip: Workflow) -> None:
    spec = trip.child({"a": 1})
    assert isinstance(spec, ChildSpec)
    with pytest.raises(AttributeError):
        spec.key = "x"  # type: ignore[misc]
