"""Sleep, Retry(delay) and Await(timeout) hold no worker and no broker message while they
wait; the dispatcher publishes them exactly when due."""

from __future__ import annotations

import pytest

from durable_celery import Await, Done, Retry, Sleep
from durable_celery.testing import drain
from tests.integration.support import execute_sql, run_row, seconds


def declare_waiter(durable, kind, seen):
    wf = durable.workflow(f"wait_{kind}", run_ahead=False)

    @wf.step
    def begin(ctx):
        if kind == "sleep":
            return Sleep(seconds=30)
        if kind == "retry":
            if ctx.attempt == 0:
                return Retry(delay=30)
            return Done({"attempt": ctx.attempt})
        return Await("approved", timeout=30)

    @wf.step
    def after(ctx):
        seen.append({"timed_out": ctx.timed_out, "signals": list(ctx.signals)})
        return Done({"timed_out": ctx.timed_out})

    return wf


@pytest.mark.parametrize("kind", ["sleep", "retry"])
def test_timer_holds_nothing_until_due(durable, published, db_engine, kind):
    seen: list = []
    wf = declare_waiter(durable, kind, seen)
    dispatcher = durable.coordinator().dispatcher
    wid = wf.start()
    published.clear()

    assert durable.executor.execute(wid, 0) == "committed"
    row = run_row(db_engine, wid)
    assert row["status"] == "runnable"
    assert (row["owner"], row["lease"], row["started_at"]) == (None, None, None)
    assert seconds(row["eligible_at"] - row["updated_at"]) == pytest.approx(30, abs=1e-3)
    assert len(published) == 0  # no broker message sits there for 30 seconds
    assert dispatcher.seconds_to_next() == pytest.approx(30, abs=2)

    # A message for it arriving early (a redelivery, a hand-crafted call) is refused.
    assert durable.executor.execute(wid, 1) == "stale"
    assert dispatcher.run_once() == 0
    assert len(published) == 0
    assert run_row(db_engine, wid)["status"] == "runnable"

    # Due now: the dispatcher publishes it exactly once.
    execute_sql(db_engine, "UPDATE {S}.runs SET eligible_at = now() - interval '1 second', "
                           "dispatch_at = now() - interval '1 second' WHERE id = :id", id=wid)
    assert dispatcher.run_once() == 1
    expected_step = "after" if kind == "sleep" else "begin"
    assert [(m.name, m.args) for m in published.sent] == [
        (f"durable.wait_{kind}.{expected_step}", [wid, 1])]
    assert dispatcher.run_once() == 0  # not re-sent at once: redispatch waits for backoff
    assert len(published) == 1

    assert durable.executor.execute(wid, 1) == "committed"
    assert durable.get_workflow(wid).status == "done"


def test_await_deadline_wakes_with_timed_out(durable, published, db_engine):
    seen: list = []
    wf = declare_waiter(durable, "await", seen)
    dispatcher = durable.coordinator().dispatcher
    wid = wf.start()
    published.clear()

    assert durable.executor.execute(wid, 0) == "committed"
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["await_names"]) == ("awaiting", "after",
                                                                 ["approved"])
    assert (row["owner"], row["lease"]) == (None, None)
    assert seconds(row["await_deadline"] - row["updated_at"]) == pytest.approx(30, abs=1e-3)
    assert len(published) == 0

    assert durable.executor.execute(wid, 1) == "stale"
    assert dispatcher.run_once() == 0
    assert len(published) == 0

    execute_sql(db_engine, "UPDATE {S}.runs SET await_deadline = now() - interval '1 second' "
                           "WHERE id = :id", id=wid)
    assert dispatcher.run_once() == 1
    assert [(m.name, m.args) for m in published.sent] == [("durable.wait_await.after", [wid, 1])]
    assert dispatcher.run_once() == 0
    assert len(published) == 1

    assert durable.executor.execute(wid, 1) == "committed"
    assert seen == [{"timed_out": True, "signals": []}]
    assert durable.wait_result(wid, timeout=1) == {"timed_out": True}
    assert run_row(db_engine, wid)["timed_out"] is False  # reset once the step has seen it


def test_a_delayed_start_holds_nothing_until_due(durable, published, db_engine):
    wf = declare_waiter(durable, "sleep", [])
    dispatcher = durable.coordinator().dispatcher
    wid = wf.start(delay=30)

    row = run_row(db_engine, wid)
    assert (row["status"], row["owner"], row["dispatched_at"]) == ("runnable", None, None)
    assert seconds(row["eligible_at"] - row["created_at"]) == pytest.approx(30, abs=1e-3)
    assert len(published) == 0
    assert durable.executor.execute(wid, 0) == "stale"
    assert dispatcher.run_once() == 0

    execute_sql(db_engine, "UPDATE {S}.runs SET eligible_at = now(), dispatch_at = now() "
                           "WHERE id = :id", id=wid)
    assert dispatcher.run_once() == 1
    assert [(m.name, m.args) for m in published.sent] == [("durable.wait_sleep.begin", [wid, 0])]


def test_timed_out_survives_a_retry_of_the_woken_step(durable, published):
    wf = durable.workflow("timeout_retry")
    seen = []

    @wf.step
    def park(ctx):
        return Await("never", timeout=60)

    @wf.step(retry={"max_attempts": 2, "delay": 0, "jitter": False})
    def after(ctx):
        seen.append(ctx.timed_out)
        if len(seen) == 1:
            raise RuntimeError("flaky")
        return Done(ctx.timed_out)

    wid = wf.start()
    drain(durable, expire_awaits=True)
    assert durable.wait_result(wid, timeout=1) is True
    assert seen == [True, True]
