"""Flow control against real Postgres: rate limits (start-time and claim-time tokens, per
key, parked as timers), throttles (delay and drop), debounce, singletons (reject, queue,
replace, concurrent starts), run deadlines, schedule_to_start, explain, and bad input."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from durable_celery import (
    Await,
    Debounce,
    Done,
    DuplicateWorkflow,
    InvalidArgument,
    Next,
    RateLimit,
    Singleton,
    Throttle,
    Throttled,
    WorkflowFailed,
)
from tests.integration.support import execute_sql, run_row, scalar, start_threads


def eligible_gaps(db_engine, ids):
    times = [run_row(db_engine, i)["eligible_at"] for i in ids]
    return [(b - a).total_seconds() for a, b in itertools.pairwise(times)]


def bucket_count(db_engine):
    return scalar(db_engine, "SELECT count(*) FROM {S}.rate_buckets")


# ----------------------------------------------------------------------------- rate limits


def test_a_limited_first_step_takes_its_tokens_at_the_start(durable, published, db_engine):
    wf = durable.workflow("limited", rate_limit=RateLimit(limit=4, period=1.0))

    @wf.step
    def only(ctx):
        return Done(ctx.state["n"])

    ids = [wf.start({"n": n}) for n in range(6)]
    # Spaced a quarter second apart, in start order; only the first is published now.
    gaps = eligible_gaps(db_engine, ids)
    assert all(0.249 <= g <= 0.26 for g in gaps), gaps
    assert [m.args[0] for m in published.sent] == ids[:1]
    late = run_row(db_engine, ids[-1])
    assert late["token_seq"] == 0 and late["waiting_for"]["kind"] == "rate_limit"
    # Claimed at its slot, it takes no second token: the bucket does not move.
    tat = scalar(db_engine, "SELECT tat FROM {S}.rate_buckets")
    execute_sql(db_engine, "UPDATE {S}.runs SET eligible_at = now() WHERE id = :id", id=ids[-1])
    assert durable.executor.execute(ids[-1], 0) == "committed"
    assert scalar(db_engine, "SELECT tat FROM {S}.rate_buckets") == tat
    assert durable.wait_result(ids[-1], timeout=5) == 5


def test_a_limited_later_step_parks_as_a_timer_and_runs_at_its_slot(durable, published,
                                                                      db_engine):
    wf = durable.workflow("later")

    @wf.step
    def prepare(ctx):
        return Next("charge", run_ahead=False)

    @wf.step(rate_limit=RateLimit(limit=2, period=1.0, name="provider"))
    def charge(ctx):
        return Done(ctx.attempt)

    ids = [wf.start() for _ in range(3)]
    for wid in ids:
        assert durable.executor.execute(wid, 0) == "committed"
    results = [durable.executor.execute(wid, 1) for wid in ids]
    # The first takes the free token; the second's slot (0.5 s on) is too far to sleep
    # out: it is handed back as a timer, and so is the third (1 s on).
    assert results == ["committed", "rate_limited", "rate_limited"]
    parked = [run_row(db_engine, w) for w in ids[1:]]
    assert [r["status"] for r in parked] == ["runnable", "runnable"]
    assert all(r["owner"] is None and r["token_seq"] == 1 for r in parked)
    gap = (parked[1]["eligible_at"] - parked[0]["eligible_at"]).total_seconds()
    assert 0.49 <= gap <= 0.51
    assert parked[0]["waiting_for"]["limits"] == [{"name": "provider", "key": ""}]
    explained = durable.explain(ids[2])
    assert explained["reasons"][0]["kind"] == "rate_limit"
    assert "rate-limit token of provider" in explained["summary"]
    # Before its slot the claim does not take it (a timer is claimed just ahead, at most).
    assert durable.executor.execute(ids[2], 1) == "stale"
    time.sleep(max((parked[1]["eligible_at"] - datetime.now(timezone.utc)).total_seconds(), 0) + 0.05)
    assert durable.executor.execute(ids[2], 1) == "committed"
    assert durable.wait_result(ids[2], timeout=5) == 0  # the same attempt: no new token


def test_each_key_has_its_own_budget(durable, published, db_engine):
    per_tenant = RateLimit(limit=2, period=10.0, key=lambda state: state["tenant"])
    wf = durable.workflow("tenants", rate_limit=per_tenant)

    @wf.step
    def only(ctx):
        return Done()

    a = [wf.start({"tenant": "a"}) for _ in range(20)]
    b = wf.start({"tenant": "b"})
    # Tenant a's backlog reaches 95 s out; tenant b starts now, and is published now.
    assert eligible_gaps(db_engine, [a[0], a[-1]])[0] == pytest.approx(95.0, abs=0.1)
    assert run_row(db_engine, b)["waiting_for"] is None
    assert b in [m.args[0] for m in published.sent]
    assert bucket_count(db_engine) == 2


def test_a_key_function_that_raises_stores_nothing(durable, published, db_engine):
    wf = durable.workflow("badkey", rate_limit=RateLimit(limit=1, key=lambda s: s["missing"]))

    @wf.step
    def only(ctx):
        return Done()

    with pytest.raises(InvalidArgument, match="key function raised KeyError"):
        wf.start({})
    other = durable.workflow("badkey2", rate_limit=RateLimit(limit=1, key=lambda s: {"x": 1}))
    other.step(name="only")(lambda ctx: None)
    with pytest.raises(InvalidArgument, match="must return a str or an int"):
        other.start({})
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == 0
    assert bucket_count(db_engine) == 0


def test_celery_rate_limit_on_a_durable_task_holds_across_workers(durable, published, db_engine):
    @durable.task(name="limited.task", rate_limit="5/s")
    def limited(n):
        return n

    handles = [limited.delay(n) for n in range(5)]
    gaps = eligible_gaps(db_engine, [h.id for h in handles])
    assert all(0.199 <= g <= 0.21 for g in gaps), gaps
    assert scalar(db_engine, "SELECT name FROM {S}.rate_buckets") == "limited.task"


@pytest.mark.parametrize("bad", [
    lambda: RateLimit(limit=0), lambda: RateLimit(limit=True), lambda: RateLimit(limit=3, period=0),
    lambda: RateLimit(limit=2, burst=3), lambda: RateLimit(limit=1, key="tenant"),
    lambda: RateLimit.parse("ten per second"), lambda: RateLimit.parse("1.5/s"),
    lambda: RateLimit.parse({"limit": 1}), lambda: Throttle(limit=-1),
    lambda: Throttle(limit=1, drop="yes"), lambda: Debounce(seconds=0),
    lambda: Debounce(seconds=5, max_wait=1), lambda: Debounce(seconds=1, keep="middle"),
    lambda: Singleton(on_conflict="wait"),
])
def test_bad_policies_are_refused_with_a_typed_error(bad):
    with pytest.raises(InvalidArgument):
        bad()


def test_bad_policy_options_are_refused_at_declaration(durable):
    with pytest.raises(InvalidArgument, match="throttle must be a Throttle"):
        durable.workflow("w1", throttle=5)
    with pytest.raises(InvalidArgument, match="debounce= or singleton=, not both"):
        durable.workflow("w2", debounce=Debounce(1), singleton=Singleton())
    with pytest.raises(InvalidArgument, match="deadline"):
        durable.workflow("w3", deadline=-1)
    wf = durable.workflow("w4")
    with pytest.raises(InvalidArgument, match="schedule_to_start"):
        wf.step(schedule_to_start="soon")(lambda ctx: None)
    with pytest.raises(InvalidArgument, match="on_late"):
        wf.step(schedule_to_start=1, on_late="never")(lambda ctx: None)
    with pytest.raises(InvalidArgument, match=r"unsupported @durable\.task"):
        durable.task(name="t", rate_limits="1/s")(lambda: None)


# ----------------------------------------------------------------------------- throttle


def test_a_dropping_throttle_refuses_and_stores_nothing(durable, published, db_engine):
    wf = durable.workflow("drop", throttle=Throttle(limit=2, period=30, burst=2, drop=True,
                                                    key=lambda s: s["user"]))

    @wf.step
    def only(ctx):
        return Done()

    first, second = wf.start({"user": 1}), wf.start({"user": 1})
    with pytest.raises(Throttled) as refused:
        wf.start({"user": 1})
    assert 0 < refused.value.retry_after <= 15.01
    other = wf.start({"user": 2})
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == 3
    assert {first, second, other} == {m.args[0] for m in published.sent}


def test_a_delaying_throttle_starts_the_rest_later(durable, published, db_engine):
    wf = durable.workflow("delay", throttle=Throttle(limit=1, period=5))

    @wf.step
    def only(ctx):
        return Done()

    ids = [wf.start() for _ in range(3)]
    assert eligible_gaps(db_engine, ids) == [pytest.approx(5.0, abs=0.05)] * 2
    assert durable.explain(ids[2])["reasons"][0]["kind"] == "throttle"


def test_start_many_takes_tokens_in_order(durable, published, db_engine):
    wf = durable.workflow("many", rate_limit="10/s")

    @wf.step
    def only(ctx):
        return Done()

    ids = wf.start_many([{} for _ in range(5)])
    assert eligible_gaps(db_engine, ids) == [pytest.approx(0.1, abs=0.005)] * 4
    assert [m.args[0] for m in published.sent] == ids[:1]


# ----------------------------------------------------------------------------- debounce


def test_starts_within_the_window_make_one_run_with_the_last_input(durable, published,
                                                                   db_engine):
    wf = durable.workflow("sync", debounce=Debounce(seconds=30, key=lambda s: s["user"]))

    @wf.step
    def only(ctx):
        return Done(ctx.state)

    first = wf.start({"user": 7, "v": 1})
    before = run_row(db_engine, first)["eligible_at"]
    again = [wf.start({"user": 7, "v": v}) for v in (2, 3)]
    other = wf.start({"user": 8, "v": 9})
    assert again == [first, first] and other != first
    row = run_row(db_engine, first)
    assert row["state"] == {"user": 7, "v": 3} and row["eligible_at"] > before
    assert durable.explain(first)["reasons"][0]["starts"] == 3
    assert published.sent == []  # nothing goes to the broker before the window ends
    # Once it started, a new start makes a new run.
    execute_sql(db_engine, "UPDATE {S}.runs SET eligible_at = now() WHERE id = :id", id=first)
    assert durable.executor.execute(first, 0) == "committed"
    assert wf.start({"user": 7, "v": 4}) not in (first, other)
    assert durable.wait_result(first, timeout=5) == {"user": 7, "v": 3}


def test_a_merge_function_accumulates_and_max_wait_caps_the_delay(durable, published, db_engine):
    wf = durable.workflow("merge", debounce=Debounce(
        seconds=10, max_wait=12, keep=lambda old, new: {"events": old["events"] + new["events"]}))

    @wf.step
    def only(ctx):
        return Done()

    wid = wf.start({"events": [1]})
    created = run_row(db_engine, wid)["created_at"]
    for n in (2, 3):
        assert wf.start({"events": [n]}) == wid
    row = run_row(db_engine, wid)
    assert row["state"] == {"events": [1, 2, 3]}
    assert (row["eligible_at"] - created).total_seconds() <= 12.0


def test_concurrent_debounced_starts_make_one_run(durable, published, db_engine):
    wf = durable.workflow("race", debounce=Debounce(seconds=60))

    @wf.step
    def only(ctx):
        return Done()

    barrier = threading.Barrier(8)

    def start(n):
        barrier.wait()
        return wf.start({"n": n})

    ids = {t.value() for t in start_threads([lambda n=n: start(n) for n in range(8)])}
    assert len(ids) == 1
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == 1


# ----------------------------------------------------------------------------- singleton


def singleton_workflow(durable, policy):
    wf = durable.workflow(f"report_{policy}", singleton=Singleton(
        key=lambda s: s.get("report"), on_conflict=policy))

    @wf.step
    def build(ctx):
        return Await("go")

    @wf.step
    def publish(ctx):
        return Done(ctx.workflow_id)

    return wf


def test_a_singleton_rejects_a_second_live_run(durable, published, db_engine):
    wf = singleton_workflow(durable, "reject")
    first = wf.start({"report": "daily"})
    with pytest.raises(DuplicateWorkflow) as refused:
        wf.start({"report": "daily"})
    assert refused.value.existing_id == first
    wf.start({"report": "weekly"})  # another key
    durable.cancel_workflow(first, "stop")
    assert wf.start({"report": "daily"}) != first  # the key is free once it ended


def test_a_queued_singleton_starts_when_the_live_one_ends(durable, published, db_engine):
    wf = singleton_workflow(durable, "queue")
    first = wf.start({"report": "daily"})
    second = wf.start({"report": "daily"})
    third = wf.start({"report": "daily"})
    assert [run_row(db_engine, w)["held"] for w in (first, second, third)] == [False, True, True]
    assert durable.explain(second)["reasons"][0] == {
        "kind": "singleton", "key": "report_queue:daily", "behind": first,
        "message": f"queued behind live run {first} of singleton key 'report_queue:daily'"}
    assert durable.executor.execute(second, 0) == "stale"  # held: never claimed
    assert durable.executor.execute(first, 0) == "committed"
    durable.signal(first, "go")
    assert durable.executor.execute(first, 1) == "committed"
    # Its end released the oldest queued run (a trigger: any end path), and only that one.
    assert [run_row(db_engine, w)["held"] for w in (second, third)] == [False, True]
    assert durable.coordinator().dispatcher.run_once() == 1
    assert published.sent[-1].args == [second, 0]
    durable.cancel_workflow(second, "stop")  # a cancel releases the next one too
    assert run_row(db_engine, third)["held"] is False


def test_replace_cancels_the_live_run(durable, published, db_engine):
    wf = singleton_workflow(durable, "replace")
    first = wf.start({"report": "daily"})
    assert durable.executor.execute(first, 0) == "committed"  # awaiting
    second = wf.start({"report": "daily"})
    assert durable.get_workflow(first).status == "cancelled"
    assert "replaced by a new run" in durable.get_workflow(first).error["message"]
    assert run_row(db_engine, second)["held"] is False


@pytest.mark.parametrize("policy", ["reject", "queue", "replace"])
def test_concurrent_singleton_starts_leave_one_live_run(durable, published, db_engine, policy):
    wf = singleton_workflow(durable, policy)
    barrier = threading.Barrier(8)

    def start():
        barrier.wait()
        try:
            return wf.start({"report": "daily"})
        except DuplicateWorkflow as exc:
            return exc

    results = [t.value() for t in start_threads([start] * 8)]
    live = scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE finished_at IS NULL "
                  "AND NOT held")
    assert live == 1
    if policy == "reject":
        assert sum(isinstance(r, str) for r in results) == 1
    if policy == "queue":
        assert scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE held") == 7


# ----------------------------------------------------------------------------- deadlines


def test_a_deadline_fails_a_waiting_run(durable, published, db_engine):
    wf = durable.workflow("approval", deadline=0.3)

    @wf.step
    def ask(ctx):
        return Await("approved")

    @wf.step
    def go(ctx):
        return Done()

    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    assert durable.explain(wid)["reasons"][-1]["kind"] == "deadline"
    assert durable.coordinator().deadlines.run_once() == 0  # not yet
    time.sleep(0.35)
    assert durable.coordinator().deadlines.run_once() == 1
    with pytest.raises(WorkflowFailed) as failed:
        durable.wait_result(wid, timeout=5)
    assert failed.value.error["type"] == "DeadlineExceeded"
    assert durable.workflow_steps(wid)[-1].outcome == "fail"
    assert durable.coordinator().deadlines.run_once() == 0  # fires once


def test_a_deadline_compensates_completed_steps(durable, published, db_engine):
    wf = durable.workflow("booking")

    @wf.step(compensate="release")
    def reserve(ctx):
        return Next("pay", state={"seat": 12})

    @wf.step
    def pay(ctx):
        return Await("paid")

    @wf.step
    def ship(ctx):
        return Done()

    @wf.compensation
    def release(ctx):
        ctx.state["released"] = True

    wid = wf.start(deadline=datetime.now(timezone.utc) + timedelta(seconds=0.3))
    assert durable.executor.execute(wid, 0) == "committed"  # reserve, run ahead into pay
    time.sleep(0.35)
    assert durable.coordinator().deadlines.run_once() == 1
    assert durable.get_workflow(wid).status == "compensating"
    assert durable.executor.execute(wid, durable.get_workflow(wid).seq) == "committed"
    assert durable.get_workflow(wid).status == "compensated"


def test_a_deadline_takes_the_lease_of_an_executing_step(durable, published, db_engine):
    wf = durable.workflow("slow", deadline=0.3)
    entered, release = threading.Event(), threading.Event()

    @wf.step
    def work(ctx):
        entered.set()
        assert release.wait(10)
        return Done("late")

    wid = wf.start()
    worker = start_threads([lambda: durable.executor.execute(wid, 0)])[0]
    assert entered.wait(10)
    time.sleep(0.35)
    assert durable.coordinator().deadlines.run_once() == 1
    release.set()
    assert worker.value() == "lease_lost"  # its outcome is dropped
    assert durable.get_workflow(wid).status == "failed"


# ----------------------------------------------------------------------------- schedule_to_start


@pytest.mark.parametrize("on_late,expected", [("fail", "failed"), ("skip", "done")])
def test_a_step_not_started_in_time_does_not_run(durable, published, db_engine, on_late,
                                                 expected):
    wf = durable.workflow(f"late_{on_late}")
    ran = []

    @wf.step(schedule_to_start=0.2, on_late=on_late)
    def quote(ctx):
        ran.append(ctx.workflow_id)
        return Next("done_step")

    @wf.step
    def done_step(ctx):
        return Done("went on")

    fresh, stale = wf.start(), wf.start()
    assert durable.executor.execute(fresh, 0) == "committed"
    time.sleep(0.25)
    assert durable.executor.execute(stale, 0) == "committed"
    assert ran == [fresh]
    run = durable.get_workflow(stale)
    assert run.status == expected
    if on_late == "fail":
        assert run.error["type"] == "ScheduleToStartTimeout"


# ----------------------------------------------------------------------------- explain


def test_explain_names_what_holds_each_run(durable, published, db_engine):
    wf = durable.workflow("explained")

    @wf.step
    def first(ctx):
        return Await("go", timeout=60)

    @wf.step
    def second(ctx):
        return Done()

    wid = wf.start()
    assert durable.explain(wid)["reasons"][0]["kind"] == "queued"
    assert durable.executor.execute(wid, 0) == "committed"
    found = durable.explain(wid)
    assert found["reasons"][0]["kind"] == "signal" and found["reasons"][0]["names"] == ["go"]
    # This process registered as a worker when it executed: a live worker exists.
    assert "no_worker" not in [r["kind"] for r in found["reasons"]]
    durable.cancel_workflow(wid, "k1")
    assert durable.explain(wid)["reasons"] == [
        {"kind": "finished", "status": "cancelled", "at": run_row(db_engine, wid)[
            "finished_at"].isoformat(), "message": "the run ended cancelled"}]
    with pytest.raises(InvalidArgument):
        durable.explain("")


def test_a_resumed_singleton_waits_behind_the_live_run(durable, published, db_engine):
    wf = singleton_workflow(durable, "queue")
    first = wf.start({"report": "daily"})
    durable.cancel_workflow(first, "c1")
    second = wf.start({"report": "daily"})  # live now
    durable.resume_workflow(first, "r1")
    assert run_row(db_engine, first)["held"] is True
    assert durable.explain(first)["reasons"][0]["behind"] == second
    durable.cancel_workflow(second, "c2")
    assert run_row(db_engine, first)["held"] is False
