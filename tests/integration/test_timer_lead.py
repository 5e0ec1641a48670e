"""Timers are published ``timer_lead`` seconds ahead with a Celery eta, so the worker claims
just before the due time and starts the step on the dot; a message that arrives before the
step is due by the database's clock waits out a short remainder, and is sent again for a long
one. A step never starts early."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from durable_celery import Done, Sleep, errors, settings
from durable_celery.storage.sweeps import CLAIM_AHEAD, TAKE_UP_EARLY, eta_for
from tests.integration.support import rows, run_row, scalar


def declare(durable, seconds, started):
    wf = durable.workflow(f"nap_{str(seconds).replace('.', '_')}", run_ahead=False)

    @wf.step
    def nap(ctx):
        return Sleep(seconds=seconds)

    @wf.step
    def woke(ctx):
        started.append(time.time())
        return Done()

    return wf


def due_in(engine, wid):
    return float(scalar(engine, "SELECT EXTRACT(EPOCH FROM eligible_at - now()) "
                                "FROM {S}.runs WHERE id = :id", id=wid))


def test_dispatcher_publishes_a_timer_due_within_the_lead_with_its_countdown(
        make_durable, recorder, db_engine):
    durable = make_durable(timer_lead=1.5)
    published = recorder(durable)
    near, far = declare(durable, 1.0, []), declare(durable, 4, [])
    near_id, far_id = near.start(), far.start()
    assert durable.executor.execute(near_id, 0) == "committed"
    assert durable.executor.execute(far_id, 0) == "committed"
    published.clear()

    assert durable.coordinator().dispatcher.run_once() == 1
    [sent] = published.sent
    assert sent.args == [near_id, 1]
    # Taken up just before the due time (the claim may come that early; the step may not).
    ahead = (sent.options["eta"] - datetime.now(timezone.utc)).total_seconds()
    assert 0.3 < ahead <= 1.0 - TAKE_UP_EARLY
    row = run_row(db_engine, near_id)
    assert row["status"] == "runnable" and row["dispatch_count"] == 1
    # The redispatch of a lost message counts from the due time, not from the publish.
    assert row["dispatch_at"] > row["eligible_at"]
    assert published.for_run(far_id) == []
    # Published once: a second pass inside the lead finds nothing.
    assert durable.coordinator().dispatcher.run_once() == 0


def test_without_a_lead_nothing_is_published_before_it_is_due(make_durable, recorder):
    durable = make_durable(timer_lead=0.0)
    published = recorder(durable)
    wf = declare(durable, 0.4, [])
    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    published.clear()
    assert durable.coordinator().dispatcher.run_once() == 0
    time.sleep(0.45)
    assert durable.coordinator().dispatcher.run_once() == 1
    assert published.for_run(wid)[0].options["eta"] is None


def test_an_early_message_waits_for_the_due_time_and_never_starts_the_step_before(
        make_durable, recorder, db_engine):
    durable = make_durable(timer_lead=0.5)
    recorder(durable)
    started: list[float] = []
    wf = declare(durable, 0.4, started)
    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    assert due_in(db_engine, wid) > 0.2
    due = run_row(db_engine, wid)["eligible_at"]

    # Without the early flag (an ordinary message) it is refused, as before.
    assert durable.executor.execute(wid, 1) == "stale"
    # An early one (the eta fired ahead of the database's clock) by less than 4 x CLAIM_AHEAD:
    # the pool process waits out the remainder and runs the step on time.
    while due_in(db_engine, wid) > 3 * CLAIM_AHEAD:
        time.sleep(0.002)
    assert due_in(db_engine, wid) > CLAIM_AHEAD  # too early for the claim itself
    assert durable.executor.execute(wid, 1, early=True) == "committed"
    assert started[0] >= due.timestamp()  # the database runs on this host in the tests
    history = rows(db_engine, "SELECT step, started_at FROM {S}.steps WHERE run_id = :id "
                              "ORDER BY seq", id=wid)
    assert [h["step"] for h in history] == ["nap", "woke"]
    assert run_row(db_engine, wid)["status"] == "done"
    assert len(started) == 1


def test_a_message_far_ahead_of_the_database_clock_is_sent_again_for_later(
        make_durable, recorder, db_engine):
    durable = make_durable(timer_lead=0.05)
    published = recorder(durable)
    wf = declare(durable, 30, [])
    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    published.clear()
    before = durable.stats().get("early", 0)

    assert durable.executor.execute(wid, 1, early=True) == "early"
    assert durable.stats().get("early", 0) == before + 1
    [sent] = published.for_run(wid)
    assert sent.args == [wid, 1]
    ahead = (sent.options["eta"] - datetime.now(timezone.utc)).total_seconds()
    assert 29 < ahead <= 30
    row = run_row(db_engine, wid)
    assert (row["status"], row["owner"], row["seq"]) == ("runnable", None, 1)


def test_an_early_message_for_a_cancelled_or_moved_run_is_dropped(make_durable, recorder):
    durable = make_durable(timer_lead=0.5)
    published = recorder(durable)
    wf = declare(durable, 0.3, [])
    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    published.clear()
    assert durable.executor.execute(wid, 0, early=True) == "stale"   # an old seq
    durable.cancel_workflow(wid, request_key=f"cancel-{wid}")
    assert durable.executor.execute(wid, 1, early=True) == "stale"   # cancelled while it waited
    assert published.for_run(wid) == []


@pytest.mark.parametrize("bad", [-0.1, 5.5, float("nan"), float("inf"), "soon"])
def test_timer_lead_is_validated(bad):
    with pytest.raises(errors.ConfigurationError, match="timer_lead"):
        settings.build({"timer_lead": bad})


def test_timer_lead_must_be_shorter_than_redispatch_after():
    # Otherwise the redispatch of a timer published ahead would fall inside the lead again.
    with pytest.raises(errors.ConfigurationError, match="redispatch_after"):
        settings.build({"timer_lead": 2.0, "redispatch_after": 1.0})
    assert settings.build({"timer_lead": 0.5, "redispatch_after": 1.0}).timer_lead == 0.5


def test_the_coordinator_wakes_a_lead_early_for_timers_but_not_for_await_deadlines(
        make_durable, recorder):
    from durable_celery import Await

    durable = make_durable(timer_lead=0.5)
    recorder(durable)
    waits = durable.workflow("deadline_only", run_ahead=False)

    @waits.step
    def park(ctx):
        return Await("never", timeout=3)

    @waits.step
    def after(ctx):
        return Done()

    wid = waits.start()
    assert durable.executor.execute(wid, 0) == "committed"
    dispatcher = durable.coordinator().dispatcher
    assert dispatcher.seconds_to_next() == pytest.approx(3.0, abs=0.3)  # the deadline itself
    timer = declare(durable, 2, [])
    tid = timer.start()
    assert durable.executor.execute(tid, 0) == "committed"
    assert dispatcher.seconds_to_next() == pytest.approx(1.5, abs=0.3)  # 2 s less the lead


def napping_until_claimable(make_durable, recorder, db_engine, started):
    """A run whose next step is due within CLAIM_AHEAD (an ordinary claim may take it)."""
    durable = make_durable(timer_lead=0.5)
    recorder(durable)
    wid = declare(durable, 0.3, started).start()
    assert durable.executor.execute(wid, 0) == "committed"
    while due_in(db_engine, wid) > CLAIM_AHEAD * 0.8:
        time.sleep(0.002)
    return durable, wid


def test_a_claim_just_before_the_due_time_starts_the_step_on_the_dot(make_durable, recorder,
                                                                     db_engine):
    started: list[float] = []
    durable, wid = napping_until_claimable(make_durable, recorder, db_engine, started)
    due = run_row(db_engine, wid)["eligible_at"]
    assert durable.executor.execute(wid, 1) == "committed"
    [_, woke] = rows(db_engine, "SELECT step, started_at FROM {S}.steps WHERE run_id = :id "
                                  "ORDER BY seq", id=wid)
    assert woke["step"] == "woke"
    assert started[0] >= due.timestamp()  # the step function ran after (one host's clock)


def test_a_run_cancelled_while_its_early_claim_waits_does_not_run_the_step(
        make_durable, recorder, db_engine):
    started: list[float] = []
    durable, wid = napping_until_claimable(make_durable, recorder, db_engine, started)
    real_claim = durable.store.claim

    def claim_then_cancel(*args, **kwargs):
        claimed = real_claim(*args, **kwargs)
        assert claimed is not None and claimed[0].due_in > 0  # claimed ahead of the due time
        durable.cancel_workflow(wid, request_key=f"cancel-{wid}")  # ...then cancelled
        return claimed

    durable.store.claim = claim_then_cancel
    try:
        assert durable.executor.execute(wid, 1) == "lease_lost"
    finally:
        durable.store.claim = real_claim
    assert started == []  # the step never ran
    assert run_row(db_engine, wid)["status"] == "cancelled"


@pytest.mark.parametrize(("wait", "lead", "expected"), [
    (None, 0.05, None), (0.0, 0.05, None), (TAKE_UP_EARLY, 0.05, None),
    (0.03, 0.05, 100.03 - TAKE_UP_EARLY), (0.05, 0.05, 100.05 - TAKE_UP_EARLY),
    (7.0, 0.05, 100.05 - TAKE_UP_EARLY),   # never held longer than the lead
])
def test_eta_for(wait, lead, expected):
    got = eta_for(100.0, wait, lead)
    assert got == (None if expected is None else pytest.approx(expected))
