"""Retries are durable: the attempt and the next due time are committed (never held in a
worker), survive a worker restart, follow the backoff policy, and end in ``failed``."""

from __future__ import annotations

import pytest

from durable_celery import Done, Retry, WorkflowFailed
from durable_celery.testing import drain
from tests.integration.support import execute_sql, rows, run_row, seconds


def declare_flaky(durable, effects, *, fail_until, retry):
    """A one-step workflow whose step raises until ``ctx.attempt`` reaches ``fail_until``."""
    wf = durable.workflow("flaky")

    @wf.step(retry=retry)
    def charge(ctx):
        effects.append(ctx.attempt)
        dirty_before = "dirty" in ctx.state
        ctx.state["dirty"] = True  # dropped when the step raises
        if ctx.attempt < fail_until:
            raise ConnectionError(f"gateway down (attempt {ctx.attempt})")
        return Done({"charged": ctx.state["order"], "attempt": ctx.attempt,
                     "dirty_before": dirty_before})

    return wf


def make_due(engine, wid):
    execute_sql(engine, "UPDATE {S}.runs SET eligible_at = now(), dispatch_at = now() "
                        "WHERE id = :id", id=wid)


def test_retry_is_committed_and_survives_a_worker_restart(durable, make_durable, published,
                                                          db_engine):
    effects: list = []
    policy = {"max_attempts": 3, "delay": 10, "jitter": False}
    wf = declare_flaky(durable, effects, fail_until=1, retry=policy)
    wid = wf.start({"order": 42})
    published.clear()

    assert durable.executor.execute(wid, 0) == "committed"
    row = run_row(db_engine, wid)
    assert row["status"] == "runnable"
    assert row["attempt"] == 1
    assert row["owner"] is None
    assert seconds(row["eligible_at"] - row["updated_at"]) == pytest.approx(10.0, abs=1e-3)
    assert row["error"]["type"] == "ConnectionError"
    assert row["state"] == {"order": 42}  # the failed attempt's state changes are dropped
    assert len(published) == 0  # nothing waits in the broker for 10 seconds
    assert [(h["attempt"], h["outcome"]) for h in rows(
        db_engine, "SELECT attempt, outcome FROM {S}.steps WHERE run_id = :id", id=wid)] \
        == [(0, "retry")]

    # The worker process goes away; a new one (new Durable, same database) picks it up.
    durable.close()
    effects2: list = []
    restarted = make_durable()
    declare_flaky(restarted, effects2, fail_until=1, retry=policy)
    tally = drain(restarted)
    assert tally["steps"] == 1
    assert effects2 == [1]
    assert restarted.wait_result(wid, timeout=1) == {"charged": 42, "attempt": 1,
                                                     "dirty_before": False}


@pytest.mark.parametrize(("backoff", "max_delay", "expected"), [
    ("exponential", 300, [10, 20, 40]),
    ("exponential", 25, [10, 20, 25]),
    ("linear", 300, [10, 20, 30]),
    ("constant", 300, [10, 10, 10]),
])
def test_backoff_is_visible_in_eligible_at(durable, published, db_engine, backoff, max_delay,
                                           expected):
    effects: list = []
    wf = declare_flaky(durable, effects, fail_until=99, retry={
        "max_attempts": 4, "backoff": backoff, "delay": 10, "max_delay": max_delay,
        "jitter": False})
    wid = wf.start({"order": 1})

    delays = []
    for seq in range(3):
        assert durable.executor.execute(wid, seq) == "committed"
        row = run_row(db_engine, wid)
        assert (row["status"], row["attempt"]) == ("runnable", seq + 1)
        delays.append(seconds(row["eligible_at"] - row["updated_at"]))
        make_due(db_engine, wid)
    assert delays == pytest.approx(expected, abs=1e-3)


def test_jitter_stays_between_half_and_full_delay(durable, published, db_engine):
    effects: list = []
    wf = declare_flaky(durable, effects, fail_until=99, retry={
        "max_attempts": 10, "backoff": "constant", "delay": 100, "jitter": True})
    wids = [wf.start({"order": i}) for i in range(8)]
    for wid in wids:
        assert durable.executor.execute(wid, 0) == "committed"
    delays = [seconds(r["eligible_at"] - r["updated_at"]) for r in map(
        lambda w: run_row(db_engine, w), wids)]
    assert all(50 <= d <= 100 for d in delays), delays
    assert len({round(d, 3) for d in delays}) > 1, "jitter should spread the retries"


def test_max_attempts_then_failed_with_the_error_recorded(durable, published, db_engine):
    effects: list = []
    wf = declare_flaky(durable, effects, fail_until=99, retry={
        "max_attempts": 3, "delay": 1, "jitter": False})
    wid = wf.start({"order": 7})

    tally = drain(durable)
    assert tally["steps"] == 3
    assert effects == [0, 1, 2]
    run = durable.get_workflow(wid)
    assert run.status == "failed"
    assert run.finished_at is not None
    assert run.error["type"] == "ConnectionError"
    assert run.error["message"] == "gateway down (attempt 2)"
    assert run.error["attempts"] == 3
    assert "ConnectionError" in run.error["traceback"]
    with pytest.raises(WorkflowFailed) as info:
        durable.wait_result(wid, timeout=1)
    assert info.value.error["type"] == "ConnectionError"
    history = rows(db_engine, "SELECT attempt, outcome FROM {S}.steps WHERE run_id = :id "
                              "ORDER BY seq", id=wid)
    assert [(h["attempt"], h["outcome"]) for h in history] == [(0, "retry"), (1, "retry"),
                                                               (2, "fail")]
    # Nothing is left to run: the failed run is not picked up again.
    assert drain(durable)["steps"] == 0


def test_retry_outcome_with_delay(durable, published, db_engine):
    seen: list = []
    wf = durable.workflow("poll")

    @wf.step
    def check(ctx):
        seen.append((ctx.attempt, dict(ctx.state)))
        if ctx.attempt < 2:
            return Retry(delay=7, state={"polls": ctx.attempt + 1})
        return Done(ctx.state)

    wid = wf.start()
    published.clear()
    assert durable.executor.execute(wid, 0) == "committed"
    row = run_row(db_engine, wid)
    assert (row["status"], row["attempt"], row["state"]) == ("runnable", 1, {"polls": 1})
    assert seconds(row["eligible_at"] - row["updated_at"]) == pytest.approx(7.0, abs=1e-3)
    assert row["owner"] is None
    assert len(published) == 0

    drain(durable)
    assert durable.wait_result(wid, timeout=1) == {"polls": 2}
    assert seen == [(0, {}), (1, {"polls": 1}), (2, {"polls": 2})]
