"""Crash recovery with real workers: SIGKILL mid-step, lost messages, prefetched messages."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
import redis

from tests.e2e.conftest import Harness, wait_for
from tests.e2e.workerapp import PIPELINE_STEPS, SETTINGS

pytestmark = pytest.mark.e2e

STALE = SETTINGS["stale_after"]
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
    """Messages waiting in ``queue``, over kombu's per-priority lists too."""
    client = redis.Redis.from_url(redis_url)
    try:
        lists = [queue, *client.scan_iter(match=f"{queue}\x06\x16*")]
        return sum(int(client.llen(name)) for name in lists)
    finally:
        client.close()


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
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
    beat_before_kill = e2e.db.scalar(
        "SELECT heartbeat_at FROM durable_celery.workers WHERE id = %s", killed_id)

    first.kill()
    killed_at = time.monotonic()
    e2e.worker(pool, 1, label="rescuer", ready=False)
    _, rerun_at = wait_for(lambda: marker(e2e, wid, "middle:start", 1),
                           timeout=STALE + STARTUP_SLACK + 10,
                           what="the middle step to run again")
    recovery = time.monotonic() - killed_at
    assert e2e.durable.wait_result(wid, timeout=30) == {"x": 11}

    # The reaper waited for the heartbeat to go stale (never before stale_after since a beat
    # we saw; database clock), then re-dispatched at once: the rescuer ran the step at
    # attempt 1 about stale_after + a sweep after the kill.
    assert (rerun_at - beat_before_kill).total_seconds() >= STALE
    assert recovery <= STALE + SWEEP + STARTUP_SLACK, recovery
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
    monkeypatch.setattr(e2e.durable.publisher, "publish", dropped.append)
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


def test_pool_child_killed_alone_is_recovered_by_its_own_worker(e2e: Harness) -> None:
    """Only the prefork child dies (say, the OOM killer): the parent replaces it, and the
    coordinator in the parent reaps the run, which the new child then finishes."""
    worker = e2e.worker("prefork", 1, label="parent")
    wid = e2e.start("slow", {"x": 12, "block": 60})
    child, _ = wait_for(lambda: marker(e2e, wid, "middle:start", 0), timeout=30,
                        what="the middle step to start")
    assert child != worker.pid
    os.kill(child, signal.SIGKILL)
    assert e2e.durable.wait_result(wid, timeout=STALE + 30) == {"x": 12}
    assert worker.alive()
    effects = e2e.db.effects([wid])
    assert effects[(wid, "middle:start")] == [0, 1] and effects[(wid, "middle:done")] == [1]
    new_child = marker(e2e, wid, "middle:start", 1)[0]
    assert new_child not in (child, worker.pid)
    wait_for(lambda: [p for _, p, _ in e2e.worker_rows()] == [new_child], timeout=10,
             what="only the new child's row to be left")


def test_paused_worker_late_commit_is_refused(e2e: Harness) -> None:
    """A worker frozen (SIGSTOP) mid-step looks dead: its run is recovered elsewhere. When it
    wakes up, its late commit is refused by the lease guard and changes nothing."""
    frozen = e2e.worker("prefork", 1, label="frozen")
    wid = e2e.start("slow", {"x": 13, "block": 2.0, "block_on": "frozen"})
    wait_for(lambda: marker(e2e, wid, "middle:start", 0), timeout=30,
             what="the middle step to start")
    os.killpg(frozen.pid, signal.SIGSTOP)
    try:
        e2e.worker("prefork", 1, label="rescuer", ready=False)
        assert e2e.durable.wait_result(wid, timeout=STALE + 30) == {"x": 13}
        history_before = e2e.durable.workflow_steps(wid)
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    # The frozen step's sleep is over as soon as it resumes: it finishes and tries to commit.
    wait_for(lambda: marker(e2e, wid, "middle:done", 0), timeout=15,
             what="the resumed step to finish")
    wait_for(lambda: "lease lost" in frozen.log.read_text(), timeout=15,
             what="the resumed worker to report its lost lease")
    assert e2e.durable.workflow_steps(wid) == history_before
    assert [(h.step, h.attempt) for h in history_before] == [
        ("before", 0), ("middle", 1), ("after", 0)]
    run = e2e.run(wid)
    assert (run.status, run.result, run.seq) == ("done", {"x": 13}, 3)
    effects = e2e.db.effects([wid])
    assert sorted(effects[(wid, "middle:done")]) == [0, 1]
    assert effects[(wid, "after")] == [0]
    # The resumed worker notices that its row was reaped and registers again.
    wait_for(lambda: "frozen" in {n for _, _, n in e2e.worker_rows()}, timeout=10,
             what="the resumed worker to register again")
