"""Crash recovery with real workers: SIGKILL mid-step, lost messages, prefetched messages."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from tests.e2e.conftest import Harness, wait_for
from tests.e2e.workerapp import PIPELINE_STEPS, SETTINGS

pytestmark = pytest.mark.e2e

STALE = SETTINGS["stale_after"]
BEAT = SETTINGS["heartbeat_interval"]
SWEEP = SETTINGS["sweep_interval"]
REDISPATCH = SETTINGS["redispatch_after"]
# Starting a replacement worker and its coordinator runs in parallel with the stale wait;
# on a loaded 2-CPU box it can take several seconds.
STARTUP_SLACK = 10.0


def marker(e2e: Harness, wid: str, step: str, attempt: int) -> Any:
    """The (pid, at) of the effect row ``step`` at ``attempt`` of run ``wid``, if any."""
    rows = e2e.db.rows("SELECT pid, at FROM public.e2e_effects WHERE workflow_id = %s "
                       "AND step = %s AND attempt = %s", wid, step, attempt)
    return rows[0] if rows else None


def redis_unacked(redis_url: str, queue: str) -> int:
    """Messages of ``queue`` delivered to a consumer and not acknowledged (kombu's hash)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(1 for raw in client.hvals("unacked") if json.loads(raw)[2] == queue)
    finally:
        client.close()


def redis_queue_length(redis_url: str, queue: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_worker_killed_mid_step_is_recovered(e2e: Harness, pool: str) -> None:
    first = e2e.worker(pool, 1, label="killed")
    wid = e2e.start("slow", {"x": 11, "block": 60})
    pid, _ = wait_for(lambda: marker(e2e, wid, "middle:start", 0), timeout=30,
                      what="the middle step to start")
    run = e2e.run(wid)
    assert run.status == "executing" and run.step == "middle" and run.attempt == 0
    rows = e2e.worker_rows()
    assert [(p, n) for _, p, n in rows] == [(pid, "killed")], rows
    killed_id = rows[0][0]

    first.kill()
    killed_at = time.monotonic()
    e2e.worker(pool, 1, label="rescuer", ready=False)
    wait_for(lambda: marker(e2e, wid, "middle:start", 1), timeout=STALE + STARTUP_SLACK + 10,
             what="the middle step to run again")
    recovery = time.monotonic() - killed_at
    assert e2e.durable.wait_result(wid, timeout=30) == {"x": 11}

    # The reaper waited for the heartbeat to go stale (the last beat is at most one interval
    # before the kill), then re-dispatched; the rescuer then ran the step at attempt 1.
    assert STALE - BEAT - 0.3 <= recovery <= STALE + SWEEP + STARTUP_SLACK, recovery
    assert e2e.db.effects([wid]) == {
        (wid, "before"): [0], (wid, "middle:start"): [0, 1], (wid, "middle:done"): [1],
        (wid, "after"): [0]}
    history = e2e.durable.workflow_steps(wid)
    assert [(h.step, h.attempt, h.outcome) for h in history] == [
        ("before", 0, "next"), ("middle", 1, "next"), ("after", 0, "done")]
    assert history[0].worker == killed_id
    assert history[1].worker != killed_id and history[2].worker != killed_id
    # The killed process's row is gone (the reaper removed it); only the rescuer is left.
    wait_for(lambda: all(r[0] != killed_id for r in e2e.worker_rows()), timeout=10,
             what="the reaper to remove the killed worker's row")
    assert {n for _, _, n in e2e.worker_rows()} == {"rescuer"}


def test_message_lost_after_commit_is_republished(e2e: Harness,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The run row commits but its message never reaches the broker (the publishing process
    died in between): the coordinator of a worker started later re-sends it."""
    dropped: list[Any] = []
    monkeypatch.setattr(e2e.durable, "_publish", dropped.append)
    started = time.monotonic()
    wid = e2e.start("pipeline", {"x": 3})
    assert [d.workflow_id for d in dropped] == [wid]
    assert redis_queue_length(e2e.broker_url, e2e.queue) == 0

    e2e.worker("prefork", 2)
    assert e2e.durable.wait_result(wid, timeout=REDISPATCH + 30) == {
        "x": 3, "trail": list(PIPELINE_STEPS)}
    assert time.monotonic() - started >= REDISPATCH - 0.5
    waited = e2e.db.scalar(
        "SELECT min(e.at) - r.created_at FROM public.e2e_effects AS e "
        "JOIN durable_celery.runs AS r ON r.id = e.workflow_id WHERE r.id = %s "
        "GROUP BY r.created_at", wid)
    assert waited.total_seconds() >= REDISPATCH - 0.1, waited
    assert e2e.db.effects([wid]) == {(wid, step): [0] for step in PIPELINE_STEPS}


def test_messages_prefetched_by_a_killed_worker_are_recovered(e2e: Harness) -> None:
    """Redis: a SIGKILLed worker held one run executing and several messages prefetched
    (unacknowledged until the visibility timeout, an hour). The reaper recovers the running
    one; the redispatch floor re-sends the others; each step still commits exactly once."""
    first = e2e.worker("prefork", 1, label="hoarder", extra_args=["--prefetch-multiplier", "4"])
    ids = [e2e.start("blocker", {"x": i, "block": 60, "block_on": "hoarder"}) for i in range(6)]
    running = wait_for(lambda: e2e.db.scalar(
        "SELECT workflow_id FROM public.e2e_effects WHERE step = 'first:start'"), timeout=30,
        what="a first step to start")
    held = wait_for(lambda: redis_unacked(e2e.broker_url, e2e.queue) >= 3 and
                    redis_unacked(e2e.broker_url, e2e.queue), timeout=10,
                    what="the worker to prefetch messages")
    statuses = {r.workflow_id: r.status for r in (e2e.run(w) for w in ids)}
    assert statuses[running] == "executing"
    assert sorted(s for w, s in statuses.items() if w != running) == ["runnable"] * 5

    first.kill()
    killed_at = time.monotonic()
    e2e.worker("prefork", 4, label="rescuer", ready=False)
    for i, wid in enumerate(ids):
        assert e2e.durable.wait_result(wid, timeout=60) == {"x": i}, wid
    elapsed = time.monotonic() - killed_at

    effects = e2e.db.effects(ids)
    for wid in ids:
        if wid == running:
            assert effects[(wid, "first:start")] == [0, 1]
            assert effects[(wid, "first:done")] == [1]
        else:
            assert effects[(wid, "first:start")] == [0], wid
            assert effects[(wid, "first:done")] == [0], wid
        assert effects[(wid, "second")] == [0], wid
        history = e2e.durable.workflow_steps(wid)
        attempt = 1 if wid == running else 0
        assert [(h.step, h.attempt) for h in history] == [("first", attempt), ("second", 0)]
    # Still within a few redispatch rounds (3 s, then 6 s: per-run backoff).
    assert elapsed <= STALE + 3 * REDISPATCH + STARTUP_SLACK, (elapsed, held)
