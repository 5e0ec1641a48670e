"""Cancel and resume against real runs: the cancel tree, a cancel racing a step's commit,
cancelled awaiting and sleeping runs that never wake, resume of failed and cancelled runs
through to normal completion, and the statuses both leave alone."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from durable_celery import Await, Done, Fail, Next, Sleep
from durable_celery.errors import (
    ControlError,
    DuplicateWorkflow,
    IdempotencyConflict,
    NoTarget,
)
from durable_celery.testing import drain
from tests.integration.support import Worker, execute_sql, rows, run_row, scalar


def declare_chain(durable: Any, calls: list, *, fail_b_times: int = 0, retry: Any = None) -> Any:
    """a -> b -> c -> Done; b raises its first ``fail_b_times`` visits."""
    wf = durable.workflow("chain", run_ahead=False)
    failures = [fail_b_times]

    @wf.step
    def a(ctx):
        calls.append((ctx.workflow_id, "a", ctx.attempt))
        ctx.state["trail"] = [*ctx.state.get("trail", []), "a"]
        return Next("b")

    @wf.step(retry=retry or {"max_attempts": 1})
    def b(ctx):
        calls.append((ctx.workflow_id, "b", ctx.attempt))
        if failures[0] > 0:
            failures[0] -= 1
            raise RuntimeError("b is not ready")
        ctx.state["trail"] = [*ctx.state.get("trail", []), "b"]
        return Next("c")

    @wf.step
    def c(ctx):
        calls.append((ctx.workflow_id, "c", ctx.attempt))
        ctx.state["trail"] = [*ctx.state.get("trail", []), "c"]
        return Done(ctx.state["trail"])

    return wf


def history(engine: Any, wid: str) -> list[tuple[int, str, str]]:
    return [(r["seq"], r["step"], r["outcome"]) for r in rows(
        engine, "SELECT seq, step, outcome FROM {S}.steps WHERE run_id = :id ORDER BY seq",
        id=wid)]


# ---------------------------------------------------------------------------- cancel


def test_cancel_a_runnable_run(durable, published, db_engine):
    calls: list = []
    wid = declare_chain(durable, calls).start({"n": 1})
    published.clear()
    answer = durable.cancel_workflow(wid, "c-1", reason="operator said so")
    assert answer == {"ok": True, "changed": True, "idempotency_key": "c-1",
                      "idempotency_replayed": False}
    row = run_row(db_engine, wid)
    assert row["status"] == "cancelled" and row["finished_at"] is not None
    assert row["error"] == {"type": "Cancelled", "message": "operator said so",
                            "reason": "operator said so", "cancelled_by": wid}
    assert (row["owner"], row["lease"], row["dispatch_at"]) == (None, None, None)
    assert len(published) == 0
    assert durable.get_workflow(wid).status == "cancelled"

    assert durable.executor.execute(wid, 0) == "stale"  # the message already in the broker
    drain(durable)
    assert calls == [] and history(db_engine, wid) == []
    assert run_row(db_engine, wid)["status"] == "cancelled"


def test_cancel_without_reason(durable, published, db_engine):
    wid = declare_chain(durable, []).start({})
    durable.cancel_workflow(wid, "c-noreason")
    assert run_row(db_engine, wid)["error"] == {"type": "Cancelled", "message": "cancelled",
                                                "reason": None, "cancelled_by": wid}


def test_cancel_of_a_missing_or_terminal_run_changes_nothing(durable, published, db_engine):
    calls: list = []
    wf = declare_chain(durable, calls, fail_b_times=1)
    failed = wf.start({})
    drain(durable)  # b fails once with max_attempts=1: the run fails
    assert run_row(db_engine, failed)["status"] == "failed"
    done = wf.start({})
    drain(durable)
    assert run_row(db_engine, done)["status"] == "done"
    cancelled = wf.start({})
    durable.cancel_workflow(cancelled, "first-cancel", reason="first")

    before = {w: run_row(db_engine, w) for w in (failed, done, cancelled)}
    for i, wid in enumerate((failed, done, cancelled, "never-existed")):
        answer = durable.cancel_workflow(wid, f"noop-{i}", reason="late")
        assert answer == {"ok": True, "changed": False, "idempotency_key": f"noop-{i}",
                          "idempotency_replayed": False}
    for wid, row in before.items():
        assert run_row(db_engine, wid) == row


def test_cancel_cancels_live_descendants(durable, published, db_engine):
    wf = declare_chain(durable, [])
    root, child, grandchild, done_child, other = (wf.start({}) for _ in range(5))
    execute_sql(db_engine, "UPDATE {S}.runs SET parent_id = :p WHERE id IN (:c, :d)",
                p=root, c=child, d=done_child)
    execute_sql(db_engine, "UPDATE {S}.runs SET parent_id = :p WHERE id = :c",
                p=child, c=grandchild)
    execute_sql(db_engine, "UPDATE {S}.runs SET status = 'done', finished_at = now(), "
                           "result = '1' WHERE id = :id", id=done_child)
    done_before = run_row(db_engine, done_child)

    answer = durable.cancel_workflow(root, "tree", reason="whole tree")
    assert answer["changed"] is True
    for wid in (root, child, grandchild):
        row = run_row(db_engine, wid)
        assert row["status"] == "cancelled", wid
        assert row["error"]["cancelled_by"] == root
        assert row["error"]["reason"] == "whole tree"
    assert run_row(db_engine, done_child) == done_before
    assert run_row(db_engine, other)["status"] == "runnable"

    # Cancelling a child cancels only its own subtree.
    a2, b2, c2 = (wf.start({}) for _ in range(3))
    execute_sql(db_engine, "UPDATE {S}.runs SET parent_id = :p WHERE id = :c", p=a2, c=b2)
    execute_sql(db_engine, "UPDATE {S}.runs SET parent_id = :p WHERE id = :c", p=b2, c=c2)
    durable.cancel_workflow(b2, "subtree")
    assert [run_row(db_engine, w)["status"] for w in (a2, b2, c2)] == \
        ["runnable", "cancelled", "cancelled"]
    assert run_row(db_engine, c2)["error"]["cancelled_by"] == b2


def test_cancel_racing_a_step_commit_the_commit_loses(durable, published, db_engine):
    entered, gate = threading.Event(), threading.Event()
    wf = durable.workflow("slow", run_ahead=False)

    @wf.step
    def work(ctx):
        entered.set()
        assert gate.wait(10)
        ctx.state["touched"] = True
        return Done("late result")

    wid = wf.start({"v": 0})
    lost_before = durable.stats().get("lease_lost", 0)
    steps_before = durable.stats().get("steps", 0)
    runner = Worker(lambda: durable.executor.execute(wid, 0))
    runner.start()
    assert entered.wait(10)
    assert run_row(db_engine, wid)["status"] == "executing"

    answer = durable.cancel_workflow(wid, "race", reason="mid-step")
    assert answer["changed"] is True
    gate.set()
    assert runner.value(15) == "lease_lost"

    row = run_row(db_engine, wid)
    assert row["status"] == "cancelled"
    assert row["state"] == {"v": 0}
    assert row["result"] is None and row["seq"] == 0
    assert row["error"]["reason"] == "mid-step"
    assert history(db_engine, wid) == []
    assert durable.stats()["lease_lost"] == lost_before + 1
    assert durable.stats().get("steps", 0) == steps_before


def test_cancelled_awaiting_run_never_wakes(durable, published, db_engine):
    calls: list = []
    wf = durable.workflow("waiter", run_ahead=False)

    @wf.step
    def park(ctx):
        return Await("go", timeout=3600)

    @wf.step
    def after(ctx):
        calls.append(ctx.workflow_id)
        return Done("woke")

    wid = wf.start({})
    drain(durable)
    assert run_row(db_engine, wid)["status"] == "awaiting"
    durable.cancel_workflow(wid, "c-await", reason="no more waiting")
    row = run_row(db_engine, wid)
    assert (row["status"], row["cancelled_from"]) == ("cancelled", "awaiting")
    # Kept for a resume, inert while cancelled: no deadline fires, no signal is taken.
    assert row["await_names"] == ["go"] and row["await_deadline"] is not None
    published.clear()

    with pytest.raises(NoTarget):  # a finished run takes no signals
        durable.signal(wid, "go", {"late": True})
    assert scalar(db_engine, "SELECT count(*) FROM {S}.signals WHERE run_id = :id", id=wid) == 0
    drain(durable, expire_awaits=True)
    durable.coordinator().run_once()
    assert calls == []
    assert published.for_run(wid) == []
    after_row = run_row(db_engine, wid)
    assert after_row["status"] == "cancelled" and after_row["seq"] == row["seq"]
    assert after_row["result"] is None


def test_cancelled_sleeping_run_never_wakes(durable, published, db_engine):
    calls: list = []
    wf = durable.workflow("sleeper", run_ahead=False)

    @wf.step
    def nap(ctx):
        return Sleep(3600, next="wake")

    @wf.step
    def wake(ctx):
        calls.append(ctx.workflow_id)
        return Done("woke")

    wid = wf.start({})
    drain(durable, collapse_timers=False)
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["seq"]) == ("runnable", "wake", 1)
    durable.cancel_workflow(wid, "c-sleep")
    published.clear()

    # Its due time passes: timers collapsed, the dispatcher sweeps, the old message arrives.
    drain(durable, collapse_timers=True)
    durable.coordinator().run_once()
    assert durable.executor.execute(wid, 1) == "stale"
    assert calls == [] and published.for_run(wid) == []
    after = run_row(db_engine, wid)
    assert (after["status"], after["seq"]) == ("cancelled", 1)


# ---------------------------------------------------------------------------- resume


def test_resume_a_failed_run_then_it_completes(durable, published, db_engine):
    calls: list = []
    wf = declare_chain(durable, calls, fail_b_times=3, retry={"max_attempts": 3, "delay": 0})
    wid = wf.start({"input": 1})
    drain(durable)
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["attempt"]) == ("failed", "b", 2)
    assert row["error"] is not None and row["finished_at"] is not None
    seq_before = row["seq"]
    published.clear()

    answer = durable.resume_workflow(wid, "r-1")
    assert answer == {"ok": True, "changed": True, "idempotency_key": "r-1",
                      "idempotency_replayed": False}
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["attempt"], row["seq"]) == \
        ("runnable", "b", 0, seq_before)
    assert (row["finished_at"], row["result"], row["error"], row["await_deadline"]) == \
        (None, None, None, None)
    sent = published.for_run(wid)
    assert [(m.name, m.args) for m in sent] == [("durable.chain.b", [wid, seq_before])]

    assert durable.executor.execute(wid, seq_before) == "committed"
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == ["a", "b", "c"]
    assert [c for c in calls if c[0] == wid][-2:] == [(wid, "b", 0), (wid, "c", 0)]


def test_resume_a_cancelled_awaiting_run_awaits_again(durable, published, db_engine):
    """Resume goes back to the wait the cancel interrupted: the same names, the same
    deadline; the next step runs only with its signal (never without one and not timed
    out)."""
    calls: list = []
    wf = durable.workflow("waiter", run_ahead=False)

    @wf.step
    def park(ctx):
        calls.append("park")
        return Await("go", timeout=3600, next="after")

    @wf.step
    def after(ctx):
        calls.append(("after", [s.payload for s in ctx.signals], ctx.timed_out))
        return Done("finished")

    wid = wf.start({})
    drain(durable)
    stopped = run_row(db_engine, wid)
    assert (stopped["status"], stopped["step"]) == ("awaiting", "after")
    assert stopped["await_deadline"] is not None
    durable.cancel_workflow(wid, "c-w")
    published.clear()

    assert durable.resume_workflow(wid, "r-w")["changed"] is True
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["attempt"]) == ("awaiting", stopped["step"], 0)
    assert (row["await_names"], row["await_deadline"]) == (["go"], stopped["await_deadline"])
    assert (row["finished_at"], row["error"], row["cancelled_from"]) == (None, None, None)
    assert published.for_run(wid) == []  # nothing to run until the signal comes
    drain(durable)
    assert calls == ["park"]
    durable.signal(wid, "go", {"paid": 1})
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == "finished"
    assert calls == ["park", ("after", [{"paid": 1}], False)]


def test_resume_leaves_other_statuses_alone(durable, published, db_engine):
    wf = declare_chain(durable, [])
    done = wf.start({})
    drain(durable)
    awaiting_wf = durable.workflow("parker", run_ahead=False)

    @awaiting_wf.step
    def park(ctx):
        return Await("go")

    @awaiting_wf.step
    def fin(ctx):
        return Done(1)

    awaiting = awaiting_wf.start({})
    drain(durable)
    runnable = wf.start({})
    executing = wf.start({})
    execute_sql(db_engine, "UPDATE {S}.runs SET status = 'executing', owner = 'x', "
                           "lease = 'y', started_at = now() WHERE id = :id", id=executing)
    before = {w: run_row(db_engine, w) for w in (runnable, done, awaiting, executing)}
    assert [r["status"] for r in before.values()] == ["runnable", "done", "awaiting",
                                                      "executing"]
    published.clear()
    for i, wid in enumerate([*before, "no-such-run"]):
        answer = durable.resume_workflow(wid, f"r-noop-{i}")
        assert (answer["ok"], answer["changed"], answer["idempotency_replayed"]) == \
            (True, False, False)
    for wid, row in before.items():
        assert run_row(db_engine, wid) == row
    assert len(published) == 0


def test_resume_when_the_key_is_held_by_another_live_run_is_a_409(durable, published,
                                                                    db_engine):
    wf = declare_chain(durable, [])
    # after_failure: a cancelled run gives its key back, so another run can take it.
    first = wf.start({}, key="order-7", key_reuse="after_failure")
    durable.cancel_workflow(first, "c-key")
    second = wf.start({}, key="order-7", key_reuse="after_failure")
    published.clear()
    with pytest.raises(DuplicateWorkflow) as info:
        durable.resume_workflow(first, "r-key")
    assert isinstance(info.value, ControlError)
    assert info.value.status == 409 and info.value.body["error"] == "DuplicateWorkflow"
    assert run_row(db_engine, first)["status"] == "cancelled"
    assert run_row(db_engine, second)["status"] == "runnable"
    assert len(published) == 0
    stored = rows(db_engine, "SELECT status, error FROM {S}.control_requests "
                             "WHERE request_key = 'r-key'")
    assert stored[0]["status"] == "failed"
    assert stored[0]["error"]["error"] == "DuplicateWorkflow"
    with pytest.raises(IdempotencyConflict) as again:
        durable.resume_workflow(first, "r-key")
    assert again.value.body["failure"]["error"] == "DuplicateWorkflow"

    # Once the other run finishes, a new key resumes it.
    durable.cancel_workflow(second, "c-key-2")
    assert durable.resume_workflow(first, "r-key-2")["changed"] is True
    assert run_row(db_engine, first)["status"] == "runnable"


def test_resume_a_run_failed_by_fail_outcome(durable, published, db_engine):
    wf = durable.workflow("failer", run_ahead=False)
    tries: list = []

    @wf.step
    def only(ctx):
        tries.append(ctx.attempt)
        if len(tries) == 1:
            return Fail("first time")
        return Done(len(tries))

    wid = wf.start({})
    drain(durable)
    assert run_row(db_engine, wid)["status"] == "failed"
    assert durable.resume_workflow(wid, "r-fail")["changed"] is True
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == 2
    assert scalar(db_engine, "SELECT count(*) FROM {S}.steps WHERE run_id = :id",
                  id=wid) == 2


def test_cancel_terminates_on_a_parent_cycle(durable, published, db_engine):
    wf = declare_chain(durable, [])
    one, two = wf.start({}), wf.start({})
    execute_sql(db_engine, "UPDATE {S}.runs SET parent_id = :p WHERE id = :c", p=one, c=two)
    execute_sql(db_engine, "UPDATE {S}.runs SET parent_id = :p WHERE id = :c", p=two, c=one)
    assert durable.cancel_workflow(one, "cycle")["changed"] is True
    assert [run_row(db_engine, w)["status"] for w in (one, two)] == ["cancelled"] * 2
    assert run_row(db_engine, two)["error"]["cancelled_by"] == one
