"""Durable signals: before, during or after the park, a signal wakes the run exactly once;
non-matching names wait in the inbox; re-awaiting does not spin; bad targets are refused."""

from __future__ import annotations

import threading

import pytest

from durable_celery import Await, Done, NoTarget
from durable_celery.testing import drain
from tests.integration.support import (
    Worker,
    lock_waiters,
    q,
    rows,
    run_row,
    scalar,
    start_threads,
    wait_for,
)


def declare_parker(durable, seen, *, gate=None, entered=None):
    wf = durable.workflow("parker", run_ahead=False)

    @wf.step
    def park(ctx):
        if entered is not None:
            entered.set()
        if gate is not None:
            assert gate.wait(10)
        return Await("go")

    @wf.step
    def after(ctx):
        seen.append([(s.name, s.payload) for s in ctx.signals])
        return Done([s.payload for s in ctx.signals])

    return wf


def signal_rows(engine, wid):
    return rows(engine, "SELECT name, payload, dedup_key, delivered_at IS NOT NULL AS delivered, "
                        "consumed_at IS NOT NULL AS consumed, consumed_seq FROM {S}.signals "
                        "WHERE run_id = :id ORDER BY id", id=wid)


def test_signal_sent_before_the_park_wakes_at_the_park(durable, published, db_engine):
    seen: list = []
    wf = declare_parker(durable, seen)
    wid = wf.start()
    published.clear()

    result = durable.signal(wid, "go", {"early": True})
    assert (result.workflow_id, result.duplicate, result.woke) == (wid, False, False)
    assert run_row(db_engine, wid)["status"] == "runnable"

    assert durable.executor.execute(wid, 0) == "committed"
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["seq"]) == ("runnable", "after", 1)
    assert [(m.name, m.args) for m in published.sent] == [("durable.parker.after", [wid, 1])]

    assert durable.executor.execute(wid, 1) == "committed"
    assert seen == [[("go", {"early": True})]]
    assert durable.wait_result(wid, timeout=1) == [{"early": True}]
    assert [(s["consumed"], s["consumed_seq"]) for s in signal_rows(db_engine, wid)] == [(True, 2)]


def test_signal_after_the_park_wakes_with_one_message(durable, published, db_engine):
    seen: list = []
    wf = declare_parker(durable, seen)
    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    assert run_row(db_engine, wid)["status"] == "awaiting"
    published.clear()

    first = durable.signal(wid, "go", 1)
    second = durable.signal(wid, "go", 2)  # the run is already woken: stored, no new message
    assert (first.woke, second.woke) == (True, False)
    assert [(m.name, m.args) for m in published.sent] == [("durable.parker.after", [wid, 1])]
    assert durable.coordinator().dispatcher.run_once() == 0
    assert len(published) == 1

    assert durable.executor.execute(wid, 1) == "committed"
    assert seen == [[("go", 1)]]
    # The second signal was not part of the wake-up: still in the inbox, not lost.
    inbox = signal_rows(db_engine, wid)
    assert [(s["payload"], s["delivered"], s["consumed"]) for s in inbox] == [
        (1, True, True), (2, False, False)]


def test_duplicate_dedup_key_is_stored_once(durable, published, db_engine):
    seen: list = []
    wf = declare_parker(durable, seen)
    wid = wf.start()
    drain(durable)
    published.clear()

    first = durable.signal(wid, "go", {"amount": 100}, dedup_key="evt-7")
    again = durable.signal(wid, "go", {"amount": 999}, dedup_key="evt-7")
    assert (first.duplicate, first.woke) == (False, True)
    assert (again.duplicate, again.woke, again.signal_id) == (True, False, None)
    assert len(published.for_run(wid)) == 1

    drain(durable)
    assert durable.wait_result(wid, timeout=1) == [{"amount": 100}]
    assert [s["payload"] for s in signal_rows(db_engine, wid)] == [{"amount": 100}]


def test_non_matching_names_wait_in_the_inbox(durable, published, db_engine):
    seen: list = []
    wf = durable.workflow("two_names", run_ahead=False)

    @wf.step
    def want_a(ctx):
        return Await("a")

    @wf.step
    def want_b(ctx):
        seen.append([s.name for s in ctx.signals])
        return Await("b")

    @wf.step
    def end(ctx):
        seen.append([s.name for s in ctx.signals])
        return Done([s.payload for s in ctx.signals])

    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    published.clear()

    assert durable.signal(wid, "b", "bee").woke is False
    assert run_row(db_engine, wid)["status"] == "awaiting"
    assert len(published) == 0

    assert durable.signal(wid, "a", "ay").woke is True
    assert durable.executor.execute(wid, 1) == "committed"
    # The Await("b") finds "b" already in the inbox and wakes at once.
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"]) == ("runnable", "end")
    assert durable.executor.execute(wid, 2) == "committed"

    assert seen == [["a"], ["b"]]
    assert durable.wait_result(wid, timeout=1) == ["bee"]
    assert [(s["name"], s["consumed_seq"]) for s in signal_rows(db_engine, wid)] == [
        ("b", 3), ("a", 2)]


def test_reawaiting_a_consumed_name_does_not_spin(durable, published, db_engine):
    seen: list = []
    wf = durable.workflow("reawait", run_ahead=False)

    @wf.step
    def first(ctx):
        return Await("tick")

    @wf.step
    def again(ctx):
        seen.append([s.payload for s in ctx.signals])
        return Await("tick", next="last")

    @wf.step
    def last(ctx):
        seen.append([s.payload for s in ctx.signals])
        return Done()

    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    durable.signal(wid, "tick", 1)
    published.clear()
    assert durable.executor.execute(wid, 1) == "committed"

    # Parked again on the same name: the consumed signal must not wake it.
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["seq"]) == ("awaiting", "last", 2)
    assert len(published) == 0
    assert durable.coordinator().dispatcher.run_once() == 0
    assert durable.executor.execute(wid, 2) == "stale"
    assert drain(durable)["steps"] == 0
    assert run_row(db_engine, wid)["seq"] == 2

    assert durable.signal(wid, "tick", 2).woke is True
    drain(durable)
    assert seen == [[1], [2]]
    assert durable.get_workflow(wid).status == "done"


def test_signal_to_a_missing_or_finished_run_is_refused(durable, published, db_engine):
    seen: list = []
    wf = declare_parker(durable, seen)
    wid = wf.start(key="order:1")
    drain(durable)
    durable.signal(wid, "go", "x")
    drain(durable)
    assert durable.get_workflow(wid).status == "done"
    before = scalar(db_engine, "SELECT count(*) FROM {S}.signals")

    with pytest.raises(NoTarget) as missing:
        durable.signal("no-such-run", "go")
    assert missing.value.details["reason"] == "missing"
    with pytest.raises(NoTarget) as finished:
        durable.signal(wid, "go")
    assert finished.value.details["reason"] == "finished"
    with pytest.raises(NoTarget):  # the key of a finished run addresses nothing
        durable.signal("order:1", "go")
    assert scalar(db_engine, "SELECT count(*) FROM {S}.signals") == before


def test_signal_by_key_reaches_the_live_run(durable, published, db_engine):
    seen: list = []
    wf = declare_parker(durable, seen)
    old = wf.start(key="order:9", key_reuse="after_finish")
    drain(durable)
    durable.signal("order:9", "go", "first")
    drain(durable)
    assert durable.get_workflow(old).status == "done"

    new = wf.start(key="order:9")  # after_finish: the key is free once the old run finished
    drain(durable)
    result = durable.signal("order:9", "go", "second")
    assert (result.workflow_id, result.woke) == (new, True)
    drain(durable)
    assert durable.wait_result(new, timeout=1) == ["second"]
    assert durable.wait_result(old, timeout=1) == ["first"]


@pytest.mark.parametrize("order", ["park_first", "signal_first"])
def test_park_and_signal_racing_wake_the_run_once(durable, published, db_engine, order):
    """Both the park (the Await commit) and the signal queue up behind a third
    transaction holding the run row lock; whichever goes first, one wake-up."""
    seen: list = []
    gate, entered = threading.Event(), threading.Event()
    wf = declare_parker(durable, seen, gate=gate, entered=entered)
    wid = wf.start()
    published.clear()

    executing = Worker(lambda: durable.executor.execute(wid, 0), name="park")
    executing.start()
    assert entered.wait(5)  # claimed; the step is running

    signalling = Worker(lambda: durable.signal(wid, "go", "raced"), name="signal")
    with db_engine.connect() as locker:
        tx = locker.begin()
        locker.execute(q("SELECT id FROM {S}.runs WHERE id = :id FOR UPDATE"), {"id": wid})
        if order == "park_first":
            gate.set()
            wait_for(lambda: lock_waiters(db_engine) >= 1, what="the park to block")
            signalling.start()
        else:
            signalling.start()
            wait_for(lambda: lock_waiters(db_engine) >= 1, what="the signal to block")
            gate.set()
        wait_for(lambda: lock_waiters(db_engine) >= 2, what="both to block")
        tx.rollback()

    assert executing.value() == "committed"
    result = signalling.value()
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["seq"]) == ("runnable", "after", 1)
    assert [(m.name, m.args) for m in published.sent] == [("durable.parker.after", [wid, 1])]
    assert result.woke is (order == "park_first")

    assert durable.executor.execute(wid, 1) == "committed"
    assert seen == [[("go", "raced")]]
    assert [s["consumed"] for s in signal_rows(db_engine, wid)] == [True]


def test_concurrent_signals_wake_the_run_once_and_none_is_lost(durable, published, db_engine):
    seen: list = []
    wf = declare_parker(durable, seen)
    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    published.clear()

    barrier = threading.Barrier(8)

    def send(i):
        barrier.wait(5)
        return durable.signal(wid, "go", i, dedup_key=f"evt-{i}")

    results = [t.value() for t in start_threads([lambda i=i: send(i) for i in range(8)])]
    assert sum(r.woke for r in results) == 1
    assert not any(r.duplicate for r in results)
    assert [(m.name, m.args) for m in published.sent] == [("durable.parker.after", [wid, 1])]
    assert scalar(db_engine, "SELECT count(*) FROM {S}.signals WHERE run_id = :id", id=wid) == 8

    assert durable.executor.execute(wid, 1) == "committed"
    assert len(seen) == 1 and len(seen[0]) >= 1
    inbox = signal_rows(db_engine, wid)
    consumed = sorted(s["payload"] for s in inbox if s["consumed"])
    waiting = sorted(s["payload"] for s in inbox if not s["consumed"])
    assert consumed == sorted(payload for _, payload in seen[0])
    assert sorted(consumed + waiting) == list(range(8))
    assert all(not s["delivered"] for s in inbox if not s["consumed"])


def test_a_signal_by_key_reaches_the_live_run_not_a_finished_namesake(durable, published):
    wf = durable.workflow("namesake")

    @wf.step
    def park(ctx):
        return Await("go")

    @wf.step
    def finish(ctx):
        return Done(ctx.signals[0].payload)

    finished = wf.start(workflow_id="order:42", key="order:42", key_reuse="after_finish")
    durable.signal("order:42", "go", "first")
    drain(durable)
    assert durable.wait_result(finished, timeout=1) == "first"
    live = wf.start(key="order:42")
    drain(durable)
    assert durable.signal("order:42", "go", "second").workflow_id == live
    drain(durable)
    assert durable.wait_result(live, timeout=1) == "second"
