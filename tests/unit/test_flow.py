"""Flow-control declarations (pure): Celery's rate strings, the spacing arithmetic, policy
keys, and the explain reasons built from a row."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from durable_celery import Debounce, InvalidArgument, RateLimit
from durable_celery.flow import policy_key, rate_limits
from durable_celery.runtime import explain


@pytest.mark.parametrize("text,limit,period", [
    ("10/s", 10, 1.0), ("100/m", 100, 60.0), ("5/h", 5, 3600.0), ("7", 7, 1.0),
    (" 3 / m ", 3, 60.0), ("0.5/s", 1, 2.0), (12, 12, 1.0)])
def test_celery_rate_strings(text, limit, period):
    rl = RateLimit.parse(text)
    assert (rl.limit, rl.period) == (limit, period)
    assert rl.interval == pytest.approx(period / limit)
    assert rl.tolerance == 0.0


def test_burst_widens_the_tolerance():
    rl = RateLimit(limit=10, period=1.0, burst=4)
    assert rl.tolerance == pytest.approx(0.3)


@pytest.mark.parametrize("bad", ["0/s", "1/d", "-1/s", "", "1.5/m", "x", None, True])
def test_bad_rate_strings(bad):
    with pytest.raises(InvalidArgument):
        RateLimit.parse(bad)


def test_rate_limit_lists():
    assert rate_limits(None, "rate_limit") == ()
    assert [r.limit for r in rate_limits(["1/s", RateLimit(3)], "rate_limit")] == [1, 3]
    with pytest.raises(InvalidArgument):
        rate_limits({"limit": 1}, "rate_limit")


def test_policy_keys():
    assert policy_key(None, {}, "x") == ""
    assert policy_key(lambda s: s["t"], {"t": 5}, "x") == "5"
    assert policy_key(lambda s: None, {}, "x") == ""
    with pytest.raises(InvalidArgument, match="raised KeyError"):
        policy_key(lambda s: s["t"], {}, "x")
    with pytest.raises(InvalidArgument, match="at most 200"):
        policy_key(lambda s: "k" * 201, {}, "x")
    with pytest.raises(InvalidArgument, match="str or an int"):
        policy_key(lambda s: 1.5, {}, "x")


def test_debounce_keep():
    assert Debounce(1).merged({"a": 1}, {"a": 2}) == {"a": 2}
    assert Debounce(1, keep="first").merged({"a": 1}, {"a": 2}) == {"a": 1}
    summed = Debounce(1, keep=lambda old, new: {"n": old["n"] + new["n"]})
    assert summed.merged({"n": 1}, {"n": 2}) == {"n": 3}
    with pytest.raises(InvalidArgument, match="merge function raised"):
        Debounce(1, keep=lambda old, new: old["missing"]).merged({}, {})


NOW = datetime(2026, 12, 8, 12, 0, tzinfo=timezone.utc)


def row(**over):
    base = {"id": "r1", "workflow": "w", "version": 1, "status": "runnable", "step": "s",
            "seq": 0, "attempt": 0, "queue": "q", "held": False, "eligible_at": NOW,
            "later": False, "dispatch_at": NOW, "dispatched_at": NOW, "dispatch_count": 1,
            "await_names": None, "await_all": False, "await_deadline": None,
            "updated_at": NOW, "children_pending": 0, "spawn_cap": None, "parent_id": None,
            "owner": None, "started_at": None, "concurrency_key": None, "singleton_key": None,
            "debounce_key": None, "waiting_for": None, "deadline_at": None,
            "finished_at": None, "error": None, "now": NOW, "last_outcome": None,
            "key_holder": None, "singleton_holder": None, "children_total": 0,
            "pending_signals": None, "live_workers": 1, "owner_alive": False}
    return {**base, **over}


def kinds(**over):
    return [r["kind"] for r in explain.reasons(row(**over))]


def test_explain_reasons():
    later = NOW + timedelta(seconds=5)
    assert kinds() == ["queued"]
    assert kinds(dispatch_count=3)[0] == "queued"
    assert "overdue" in explain.reasons(row(dispatch_count=3))[0]["message"]
    assert kinds(dispatched_at=None) == ["dispatch"]
    assert kinds(key_holder="r2", concurrency_key="k") == ["concurrency_key"]
    assert kinds(later=True, eligible_at=later) == ["timer"]
    assert kinds(later=True, eligible_at=later, attempt=2, last_outcome="retry") == ["retry"]
    assert kinds(later=True, waiting_for={"kind": "rate_limit", "limits": [
        {"name": "p", "key": "a"}]}) == ["rate_limit"]
    assert "p[a]" in explain.explain(row(later=True, waiting_for={
        "kind": "rate_limit", "limits": [{"name": "p", "key": "a"}]}))["summary"]
    assert kinds(later=True, waiting_for={"kind": "debounce", "key": "k", "starts": 3}) == [
        "debounce"]
    assert kinds(held=True, singleton_key="w:k", singleton_holder="r0") == ["singleton"]
    assert kinds(held=True, parent_id="p1") == ["foreach_cap"]
    assert kinds(status="awaiting", await_names=["go"]) == ["signal"]
    assert kinds(status="awaiting_children", children_total=3, children_pending=2) == [
        "children"]
    assert kinds(status="executing", owner="w1", owner_alive=True) == ["executing"]
    assert kinds(status="executing", owner="w1") == ["worker_lost"]
    assert kinds(live_workers=0) == ["queued", "no_worker"]
    assert kinds(deadline_at=later) == ["queued", "deadline"]
    assert kinds(status="done", finished_at=NOW, deadline_at=later) == ["finished"]
