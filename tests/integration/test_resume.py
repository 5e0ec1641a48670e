"""Resume goes back to what was interrupted: a wait for a signal waits again, a sleep sleeps
until its due time, a failed step runs again as the same visit with the signals (and the
timeout) it saw. A resumed step never runs with no signal and ``timed_out=False``."""

from __future__ import annotations

from datetime import timedelta

from durable_celery import Await, Done, Sleep
from durable_celery.testing import drain
from tests.integration.support import execute_sql, run_row, scalar


def declare_payment(durable, seen, broken):
    """park -> Await("paid") -> ship (raises while ``broken``)."""
    wf = durable.workflow("pay", run_ahead=False)

    @wf.step
    def park(ctx):
        return Await("paid", timeout=3600)

    @wf.step
    def ship(ctx):
        seen.append(([s.payload for s in ctx.signals], ctx.timed_out, ctx.idempotency_key))
        if broken:
            raise RuntimeError("carrier down")
        if not ctx.signals and not ctx.timed_out:
            return Done("neither a payment nor a timeout?!")
        return Done({"paid": ctx.signals[0].payload if ctx.signals else None,
                     "timed_out": ctx.timed_out})

    return wf


def test_a_failed_step_sees_its_signals_again_after_resume(durable, published, db_engine):
    """Finding 6: the terminal failure no longer consumes the signals the step saw."""
    seen: list = []
    broken = [True]
    wf = declare_payment(durable, seen, broken)
    wid = wf.start({})
    drain(durable)
    durable.signal(wid, "paid", {"amount": 100})
    drain(durable)
    assert durable.get_workflow(wid).status == "failed"
    assert scalar(db_engine, "SELECT count(*) FROM {S}.signals WHERE run_id = :id "
                             "AND consumed_at IS NULL AND delivered_at IS NOT NULL", id=wid) == 1
    broken.clear()
    assert durable.resume_workflow(wid, "r1")["changed"] is True
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == {"paid": {"amount": 100}, "timed_out": False}
    assert [s[:2] for s in seen] == [([{"amount": 100}], False), ([{"amount": 100}], False)]
    assert seen[0][2] == seen[1][2]  # the same visit: the same idempotency key
    # Consumed once, by the commit that finally used it.
    consumed = scalar(db_engine, "SELECT consumed_seq FROM {S}.signals WHERE run_id = :id",
                      id=wid)
    assert consumed == run_row(db_engine, wid)["seq"]


def test_a_failed_step_that_timed_out_times_out_again_after_resume(durable, published):
    seen: list = []
    broken = [True]
    wf = declare_payment(durable, seen, broken)
    wid = wf.start({})
    drain(durable, expire_awaits=True)
    assert durable.get_workflow(wid).status == "failed"
    broken.clear()
    durable.resume_workflow(wid, "r1")
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == {"paid": None, "timed_out": True}
    assert [s[:2] for s in seen] == [([], True), ([], True)]


def test_a_run_cancelled_after_its_signal_woke_it_sees_the_signal(durable, published,
                                                                   db_engine):
    seen: list = []
    wf = declare_payment(durable, seen, [])
    wid = wf.start({})
    drain(durable)
    durable.signal(wid, "paid", {"amount": 5})  # woken: runnable, the step not run yet
    durable.cancel_workflow(wid, "c1")
    assert run_row(db_engine, wid)["cancelled_from"] == "runnable"
    durable.resume_workflow(wid, "r1")
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == {"paid": {"amount": 5}, "timed_out": False}


def test_a_deadline_that_passed_while_cancelled_times_out_after_resume(durable, published,
                                                                       db_engine):
    """The deadline is absolute: kept across cancel and resume (documented)."""
    seen: list = []
    wf = declare_payment(durable, seen, [])
    wid = wf.start({})
    drain(durable)
    durable.cancel_workflow(wid, "c1")
    execute_sql(db_engine, "UPDATE {S}.runs SET await_deadline = now() - interval '1 second' "
                           "WHERE id = :id", id=wid)
    durable.resume_workflow(wid, "r1")
    assert run_row(db_engine, wid)["status"] == "awaiting"
    durable.coordinator().run_once()  # the dispatcher expires it
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == {"paid": None, "timed_out": True}


def test_await_all_resumes_with_what_already_arrived(durable, published, db_engine):
    wf = durable.workflow("both", run_ahead=False)

    @wf.step
    def park(ctx):
        return Await(["a", "b"], mode="all")

    @wf.step
    def end(ctx):
        return Done(sorted(s.name for s in ctx.signals))

    wid = wf.start({})
    drain(durable)
    durable.signal(wid, "a")
    durable.cancel_workflow(wid, "c1")
    durable.resume_workflow(wid, "r1")
    assert run_row(db_engine, wid)["status"] == "awaiting"
    drain(durable)
    assert durable.get_workflow(wid).status == "awaiting"
    durable.signal(wid, "b")
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == ["a", "b"]


def test_a_resumed_sleep_keeps_its_due_time(durable, published, db_engine):
    ran: list = []
    wf = durable.workflow("sleeper", run_ahead=False)

    @wf.step
    def nap(ctx):
        return Sleep(seconds=3600)

    @wf.step
    def wake(ctx):
        ran.append(True)
        return Done()

    wid = wf.start({})
    drain(durable, collapse_timers=False)
    due = run_row(db_engine, wid)["eligible_at"]
    durable.cancel_workflow(wid, "c1")
    published.clear()
    durable.resume_workflow(wid, "r1")
    row = run_row(db_engine, wid)
    assert (row["status"], row["eligible_at"], row["dispatch_at"]) == ("runnable", due, due)
    assert published.for_run(wid) == []  # not published before its time
    drain(durable, collapse_timers=False)
    assert ran == []
    # A sleep that ended while cancelled is due at once.
    durable.cancel_workflow(wid, "c2")
    execute_sql(db_engine, "UPDATE {S}.runs SET eligible_at = now() - interval '1 minute' "
                           "WHERE id = :id", id=wid)
    durable.resume_workflow(wid, "r2")
    assert [m.args for m in published.for_run(wid)] == [[wid, row["seq"]]]
    drain(durable, collapse_timers=False)
    assert ran == [True]


def test_a_resumed_executing_step_runs_again_at_its_step(durable, published, db_engine):
    wf = durable.workflow("stuck", run_ahead=False)

    @wf.step
    def one(ctx):
        return Done(ctx.attempt)

    wid = wf.start({})
    execute_sql(db_engine, "UPDATE {S}.runs SET status = 'executing', owner = 'gone', "
                           "lease = 'x', started_at = now() WHERE id = :id", id=wid)
    durable.cancel_workflow(wid, "c1")
    assert run_row(db_engine, wid)["cancelled_from"] == "executing"
    durable.resume_workflow(wid, "r1")
    assert run_row(db_engine, wid)["status"] == "runnable"
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == 0


def test_resume_restores_nothing_twice_under_concurrent_requests(durable, published, db_engine):
    seen: list = []
    wf = declare_payment(durable, seen, [])
    wid = wf.start({})
    drain(durable)
    durable.cancel_workflow(wid, "c1")
    from tests.integration.support import start_threads

    results = [t.value() for t in start_threads(
        [lambda i=i: durable.resume_workflow(wid, f"r{i}") for i in range(6)])]
    assert sum(r["changed"] for r in results) == 1
    assert run_row(db_engine, wid)["status"] == "awaiting"
    assert (run_row(db_engine, wid)["await_deadline"] - run_row(db_engine, wid)["created_at"]
            ) > timedelta(minutes=59)
