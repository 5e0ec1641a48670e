"""Timers are published ``timer_lead`` seconds ahead with a Celery eta, so the worker claims
just before the due time and starts the step on the dot; a message that arrives before the
step is due by the database's clock waits out a short remainder, and is sent again for a long
one. A step never starts early."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from durable_celery import Done, Sleep, errors, settings
from durable_celery.runtime import executor
from durable_celery.runtime.executor import execute
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
    durable = make_durable(timer_lead=0.5)
    published = recorder(durable)
    near, far = declare(durable, 0.3, []), declare(durable, 3, [])
    near_id, far_id = near.start(), far.start()
    assert execute(durable, near_id, 0) == "committed"
    assert execute(durable, far_id, 0) == "committed"
    published.clear()

    assert durable.coordinator().dispatcher.run_once() == 1
    [sent] = published.sent
    assert sent.args == [near_id, 1]
    # Taken up just before the due time (the claim may come that early; the step may not).
    ahead = (sent.options["eta"] - datetime.now(timezone.utc)).total_seconds()
    assert 0.1 < ahead <= 0.3 - TAKE_UP_EARLY
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
    assert execute(durable, wid, 0) == "committed"
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
    assert execute(durable, wid, 0) == "committed"
    assert due_in(db_engine, wid) > 0.2
    due = run_row(db_engine, wid)["eligible_at"]

    # Without the early flag (an ordinary message) it is refused, as before.
    assert execute(durable, wid, 1) == "stale"
    assert execute(durable, wid, 1, early=True) == "committed"
    assert started[0] >= due.timestamp()  # the database runs on this host in the tests
    history = rows(db_engine, "SELECT step, started_at FROM {S}.steps WHERE run_id = :id "
                              "ORDER BY seq", id=wid)
    assert [h["step"] for h in history] == ["nap", "woke"]
    assert history[1]["started_at"] >= due  # the database's clock: never before due
    assert run_row(db_engine, wid)["status"] == "done"
    assert len(started) == 1


def test_a_message_far_ahead_of_the_database_clock_is_sent_again_for_later(
        make_durable, recorder, db_engine):
    durable = make_durable(timer_lead=0.05)
    published = recorder(durable)
    wf = declare(durable, 30, [])
    wid = wf.start()
    assert execute(durable, wid, 0) == "committed"
    published.clear()
    before = executor.counters["early"]

    assert execute(durable, wid, 1, early=True) == "early"
    assert executor.counters["early"] == before + 1
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
    assert execute(durable, wid, 0) == "committed"
    published.clear()
    assert execute(durable, wid, 0, early=True) == "stale"   # an old seq
    durable.cancel_workflow(wid, request_key=f"cancel-{wid}")
    assert execute(durable, wid, 1, early=True) == "stale"   # cancelled while it waited
    assert published.for_run(wid) == []


@pytest.mark.parametrize("bad", [-0.1, 5.5, float("nan"), float("inf"), "soon"])
def test_timer_lead_is_validated(bad):
    with pytest.raises(errors.ConfigurationError, match="timer_lead"):
        settings.build({"timer_lead": bad})


def test_a_claim_just_before_the_due_time_starts_the_step_on_the_dot(make_durable, recorder,
                                                                     db_engine):
    durable = make_durable(timer_lead=0.5)
    recorder(durable)
    started: list[float] = []
    wf = declare(durable, 0.3, started)
    wid = wf.start()
    assert execute(durable, wid, 0) == "committed"
    # An ordinary message: the claim is taken within CLAIM_AHEAD of the due time.
    while due_in(db_engine, wid) > CLAIM_AHEAD * 0.8:
        time.sleep(0.002)
    due = run_row(db_engine, wid)["eligible_at"]
    assert execute(durable, wid, 1) == "committed"
    [_, woke] = rows(db_engine, "SELECT step, started_at FROM {S}.steps WHERE run_id = :id "
                                  "ORDER BY seq", id=wid)
    assert woke["step"] == "woke" and woke["started_at"] >= due
    assert started[0] >= due.timestamp()  # the step function too (one host's clock here)


@pytest.mark.parametrize(("wait", "lead", "expected"), [
    (None, 0.05, None), (0.0, 0.05, None), (TAKE_UP_EARLY, 0.05, None),
    (0.03, 0.05, 100.03 - TAKE_UP_EARLY), (0.05, 0.05, 100.05 - TAKE_UP_EARLY),
    (7.0, 0.05, 100.05 - TAKE_UP_EARLY),   # never held longer than the lead
])
def test_eta_for(wait, lead, expected):
    got = eta_for(100.0, wait, lead)
    assert got == (None if expected is None else pytest.approx(expected))
