"""Saga compensation: a failed run undoes its completed steps, newest first, each undo a
durable step with its own retry policy and history row; then ``compensated`` or
``compensation_failed``."""

from __future__ import annotations

import psycopg
import pytest

from durable_celery import Done, Fail, Retry, Spawn, WorkflowFailed
from durable_celery.storage.sql import WAKEUP_CHANNEL
from durable_celery.testing import drain
from tests.integration.support import Recorder, execute_sql, run_row, scalar

DEAD = "dead-host:2:saga"


def declare_trip(durable, log, *, pay=None, hotel_undo=None, hotel_retry=None):
    trip = durable.workflow("trip")

    @trip.step(compensate="cancel_flight")
    def book_flight(ctx):
        log.append("book_flight")
        ctx.state["flight"] = "F1"
        return ctx.state

    @trip.step(compensate="cancel_hotel")
    def book_hotel(ctx):
        log.append("book_hotel")
        ctx.state["hotel"] = "H1"
        return ctx.state

    @trip.step
    def charge(ctx):
        log.append("charge")
        if pay is not None:
            return pay(ctx)
        return Fail("card declined")

    @trip.step
    def confirm(ctx):
        return Done("booked")

    @trip.compensation
    def cancel_flight(ctx):
        log.append(("cancel_flight", ctx.attempt, ctx.compensating, ctx.failure["message"]))
        ctx.state["flight"] = None

    @trip.compensation(retry=hotel_retry)
    def cancel_hotel(ctx):
        log.append(("cancel_hotel", ctx.attempt))
        if hotel_undo is not None:
            return hotel_undo(ctx)
        return {**ctx.state, "hotel": None}

    return trip


def test_compensations_run_in_reverse_once_each(durable, published):
    log: list = []
    trip = declare_trip(durable, log)
    wid = trip.start({"who": "ada"})
    drain(durable)
    run = durable.get_workflow(wid)
    assert run.status == "compensated"
    assert run.error["type"] == "Fail" and run.error["message"] == "card declined"
    assert run.state == {"who": "ada", "flight": None, "hotel": None}
    assert log == ["book_flight", "book_hotel", "charge", ("cancel_hotel", 0),
                   ("cancel_flight", 0, True, "card declined")]
    history = [(s.seq, s.step, s.outcome, s.next_step) for s in durable.workflow_steps(wid)]
    assert history == [(1, "book_flight", "next", "book_hotel"),
                       (2, "book_hotel", "next", "charge"),
                       (3, "charge", "fail", "cancel_hotel"),
                       (4, "cancel_hotel", "compensated", "cancel_flight"),
                       (5, "cancel_flight", "compensated", None)]
    with pytest.raises(WorkflowFailed) as info:
        durable.wait_result(wid, timeout=1)
    assert info.value.run_status == "compensated"
    assert info.value.error["message"] == "card declined"


def test_a_run_that_fails_before_any_compensable_step_just_fails(durable, published):
    log: list = []
    wf = durable.workflow("plain")

    @wf.step
    def first(ctx):
        return Fail("no")

    @wf.step(compensate="undo")
    def second(ctx):
        return Done()

    @wf.compensation
    def undo(ctx):
        log.append("undo")

    wid = wf.start()
    drain(durable)
    assert durable.get_workflow(wid).status == "failed"
    assert log == []


def test_the_run_is_compensating_while_compensations_run(durable, published):
    seen = []
    log: list = []

    def hotel_undo(ctx):
        seen.append(durable.get_workflow(ctx.workflow_id).status)
        return None

    trip = declare_trip(durable, log, hotel_undo=hotel_undo)
    wid = trip.start()
    drain(durable, max_steps=3)
    run = durable.get_workflow(wid)
    assert (run.status, run.step, run.finished_at) == ("compensating", "cancel_hotel", None)
    drain(durable)
    assert seen == ["compensating"]
    assert durable.get_workflow(wid).status == "compensated"


def test_exhausted_retries_start_compensation_and_compensations_retry(durable, published):
    log: list = []
    tries = []

    def pay(ctx):
        raise RuntimeError("gateway down")

    def hotel_undo(ctx):
        tries.append(ctx.attempt)
        if ctx.attempt == 0:
            raise ConnectionError("hotel API timeout")
        return None

    trip = declare_trip(durable, log, pay=pay, hotel_undo=hotel_undo,
                        hotel_retry={"max_attempts": 3, "delay": 0.01})
    wid = trip.start()
    drain(durable)
    run = durable.get_workflow(wid)
    assert run.status == "compensated"
    assert run.error["type"] == "RuntimeError" and run.error["message"] == "gateway down"
    assert tries == [0, 1]
    outcomes = [(s.step, s.outcome, s.attempt) for s in durable.workflow_steps(wid)][2:]
    assert outcomes == [("charge", "fail", 0), ("cancel_hotel", "retry", 0),
                        ("cancel_hotel", "compensated", 1), ("cancel_flight", "compensated", 0)]


def test_a_failing_compensation_does_not_stop_the_others(durable, published):
    log: list = []

    def hotel_undo(ctx):
        raise ValueError("hotel refuses to cancel")

    trip = declare_trip(durable, log, hotel_undo=hotel_undo,
                        hotel_retry={"max_attempts": 2, "delay": 0.01})
    wid = trip.start()
    drain(durable)
    run = durable.get_workflow(wid)
    assert run.status == "compensation_failed"
    assert run.error["type"] == "CompensationFailed"
    assert run.error["failure"]["message"] == "card declined"
    [err] = run.error["compensation_errors"]
    assert (err["compensation"], err["type"], err["message"], err["attempts"]) == (
        "cancel_hotel", "ValueError", "hotel refuses to cancel", 2)
    assert [e for e in log if isinstance(e, tuple)] == [
        ("cancel_hotel", 0), ("cancel_hotel", 1), ("cancel_flight", 0, True, "card declined")]
    with pytest.raises(WorkflowFailed) as info:
        durable.wait_result(wid, timeout=1)
    assert info.value.run_status == "compensation_failed"


def test_a_compensation_returning_fail_is_recorded(durable, published):
    log: list = []
    trip = declare_trip(durable, log, hotel_undo=lambda ctx: Fail("already checked in"))
    wid = trip.start()
    drain(durable)
    run = durable.get_workflow(wid)
    assert run.status == "compensation_failed"
    assert [e["message"] for e in run.error["compensation_errors"]] == ["already checked in"]


def test_a_compensation_retry_outcome_runs_it_again(durable, published):
    log: list = []
    trip = declare_trip(durable, log, hotel_undo=lambda ctx: Retry(0) if ctx.attempt < 2
                        else None)
    wid = trip.start()
    drain(durable)
    assert durable.get_workflow(wid).status == "compensated"
    assert [e for e in log if isinstance(e, tuple) and e[0] == "cancel_hotel"] == [
        ("cancel_hotel", 0), ("cancel_hotel", 1), ("cancel_hotel", 2)]


def test_a_lost_compensation_runs_again_and_finished_ones_do_not(durable, published,
                                                                db_engine):
    """Semantic 6, deterministic: the worker running a compensation dies; the reaper hands
    the same compensation back; the one that already finished is not run again."""
    log: list = []
    trip = declare_trip(durable, log)
    wid = trip.start()
    drain(durable, max_steps=4)  # ... charge failed, cancel_hotel committed
    run = durable.get_workflow(wid)
    assert (run.status, run.step) == ("compensating", "cancel_flight")
    durable.store.register_worker(DEAD, hostname="h", pid=1, nodename=None)
    assert durable.store.claim(wid, run.seq, DEAD) is not None
    assert run_row(db_engine, wid)["owner"] == DEAD
    assert durable.get_workflow(wid).status == "compensating"
    execute_sql(db_engine, "UPDATE {S}.workers SET heartbeat_at = now() - interval '1 hour'")
    execute_sql(db_engine, "UPDATE {S}.runs SET started_at = now() - interval '1 hour' "
                           "WHERE id = :id", id=wid)
    assert durable.coordinator().reaper.run_once() == 1
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["owner"], row["attempt"]) == (
        "compensating", "cancel_flight", None, 1)
    drain(durable)
    assert durable.get_workflow(wid).status == "compensated"
    assert [e[:2] for e in log if isinstance(e, tuple)] == [("cancel_hotel", 0),
                                                           ("cancel_flight", 1)]


def test_the_reaper_starts_compensation_when_a_step_runs_out_of_recoveries(
        make_durable, db_engine, monkeypatch):
    durable = make_durable(max_recoveries=1, run_ahead=False)
    Recorder().install(durable, monkeypatch)
    log: list = []
    trip = declare_trip(durable, log)
    wid = trip.start()
    drain(durable, max_steps=2)
    durable.store.register_worker(DEAD, hostname="h", pid=1, nodename=None)
    assert durable.store.claim(wid, 2, DEAD) is not None  # charge, on a worker that dies
    execute_sql(db_engine, "UPDATE {S}.workers SET heartbeat_at = now() - interval '1 hour'")
    execute_sql(db_engine, "UPDATE {S}.runs SET started_at = now() - interval '1 hour'")
    durable.coordinator().reaper.run_once()
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["attempt"], row["failure"]["type"]) == (
        "compensating", "cancel_hotel", 0, "WorkerLost")
    drain(durable)
    run = durable.get_workflow(wid)
    assert run.status == "compensated" and run.error["type"] == "WorkerLost"


def test_a_compensation_out_of_recoveries_is_recorded_and_the_rest_run(
        make_durable, db_engine, monkeypatch):
    durable = make_durable(max_recoveries=1, run_ahead=False)
    Recorder().install(durable, monkeypatch)
    log: list = []
    trip = declare_trip(durable, log)
    wid = trip.start()
    drain(durable, max_steps=3)
    durable.store.register_worker(DEAD, hostname="h", pid=1, nodename=None)
    assert durable.store.claim(wid, 3, DEAD) is not None  # cancel_hotel; the worker dies
    execute_sql(db_engine, "UPDATE {S}.workers SET heartbeat_at = now() - interval '1 hour'")
    execute_sql(db_engine, "UPDATE {S}.runs SET started_at = now() - interval '1 hour'")
    durable.coordinator().reaper.run_once()
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"]) == ("compensating", "cancel_flight")
    drain(durable)
    run = durable.get_workflow(wid)
    assert run.status == "compensation_failed"
    assert [(e["compensation"], e["type"]) for e in run.error["compensation_errors"]] == [
        ("cancel_hotel", "WorkerLost")]
    assert [e[0] for e in log if isinstance(e, tuple)] == ["cancel_flight"]


def test_a_compensated_child_counts_for_its_parent(durable, published):
    log: list = []
    trip = declare_trip(durable, log)
    agency = durable.workflow("agency")

    @agency.step
    def book(ctx):
        return Spawn([trip.child({"n": 1}), trip.child({"n": 2})])

    @agency.step
    def report(ctx):
        return Done([(c.status, c.error["message"]) for c in ctx.children])

    wid = agency.start()
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [["compensated", "card declined"]] * 2


def test_a_lease_lost_during_compensation_drops_the_late_commit(durable, published, db_engine):
    log: list = []
    trip = declare_trip(durable, log)
    wid = trip.start()
    drain(durable, max_steps=3)
    seq = durable.get_workflow(wid).seq
    claimed = durable.store.claim(wid, seq, "w-1:1:x")
    assert claimed is not None
    # Another claim at the same seq is refused while the compensation is held.
    assert durable.store.claim(wid, seq, "w-2:2:y") is None
    assert durable.executor.execute(wid, seq) == "stale"


def test_a_missing_compensation_is_refused_before_anything_runs(durable, db_engine):
    wf = durable.workflow("half")

    @wf.step(compensate="undo_it")
    def do_it(ctx):
        return Done()

    from durable_celery import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"compensate= names no declared compensation"):
        wf.start()
    with pytest.raises(InvalidArgument, match=r"\['undo_it'\]"):
        durable.check_definitions()

    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == 0

    @wf.compensation
    def undo_it(ctx):
        return None

    durable.check_definitions()


def test_a_delayed_compensation_retry_wakes_the_dispatchers(durable, published, db_engine,
                                                            database_url):
    """Regression: a compensation's Retry(delay) commits status 'compensating' with a future
    eligible_at. Store.commit's fast-path test only excludes ``status == 'runnable' and not
    publish`` as a timer, so this timer commits without the NOTIFY that makes sleeping
    dispatchers re-plan: it fires only when some dispatcher happens to wake."""
    wf = durable.workflow("seam_comp_retry")

    @wf.step(compensate="undo")
    def reserve(ctx):
        return None

    @wf.step
    def pay(ctx):
        return Fail("declined")

    @wf.compensation
    def undo(ctx):
        if ctx.attempt == 0:
            return Retry(delay=30)
        return None

    wid = wf.start()
    drain(durable, max_steps=2)
    assert durable.get_workflow(wid).status == "compensating"
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {WAKEUP_CHANNEL}")
        seq = run_row(db_engine, wid)["seq"]
        assert durable.executor.execute(wid, seq) == "committed"
        row = run_row(db_engine, wid)
        assert row["status"] == "compensating" and row["attempt"] == 1
        notified = list(listener.notifies(timeout=1.0, stop_after=1))
    assert notified, "a durable timer was committed without waking the dispatchers"
