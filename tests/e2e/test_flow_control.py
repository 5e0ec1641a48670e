"""Flow control with real workers: a rate limit held across three worker processes and a
worker SIGKILLed mid-step; a deadline that fires while no worker runs, from a coordinator
process alone."""

from __future__ import annotations

import uuid

import pytest

from tests.e2e.conftest import Harness, wait_for
from tests.e2e.workerapp import SETTINGS

pytestmark = pytest.mark.e2e

LIMIT = 10  # the "limited" workflow's RateLimit: 10 starts a second
RUNS = 40


def most_in_any_second(times: list[float]) -> int:
    """The most starts inside any window of one second."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_a_rate_limit_holds_across_three_workers_and_a_kill(e2e: Harness) -> None:
    workers = [e2e.worker("threads", 4, label=f"w{n}") for n in range(3)]
    bucket = uuid.uuid4().hex  # this test's own budget (the key of the limit)
    # Run 5's first attempt blocks (10 s): the worker running it is killed then.
    ids = [e2e.start("limited", {"n": n, "bucket": bucket, "block": 10 if n == 5 else 0})
           for n in range(RUNS)]
    pid = wait_for(lambda: e2e.db.scalar(
        "SELECT pid FROM public.e2e_effects WHERE workflow_id = %s", ids[5]),
        timeout=30, what="run 5 to start")
    victim = next(w for w in workers if w.pid == pid)
    victim.kill()
    for wid in ids:
        e2e.wait_status(wid, "done", timeout=60 + SETTINGS["stale_after"])
    rows = e2e.db.rows(
        "SELECT workflow_id, extract(epoch FROM at)::float8 FROM public.e2e_effects "
        "WHERE workflow_id = ANY(%s) AND step = 'call' ORDER BY at", ids)
    starts = [at for _, at in rows]
    # Every run called once, and the one the kill interrupted once more (its own token).
    assert sorted({wid for wid, _ in rows}) == sorted(ids)
    assert len(starts) == RUNS + 1
    # 41 starts at 10 a second take 4 s at least. The slots handed out are never more
    # than the limit in any second, and no step starts before its slot; a start that a
    # worker took up late can land next to the one after it (the tolerance: 2).
    assert starts[-1] - starts[0] >= (RUNS - 1) / LIMIT - 0.05
    assert most_in_any_second(starts) <= LIMIT + 2, starts
    # The committed attempt started (its claim's start: the slot, for a timer claimed
    # just ahead) before the step's first line ran, never after.
    early = e2e.db.rows(
        "SELECT e.workflow_id FROM public.e2e_effects AS e JOIN durable_celery.steps AS s "
        "ON s.run_id = e.workflow_id AND s.attempt = e.attempt AND s.outcome = 'done' "
        "WHERE e.workflow_id = ANY(%s) AND e.step = 'call' "
        "AND e.at < s.started_at - interval '5 milliseconds'", ids)
    assert early == []
    # The limit was held by parking runs as timers, not by workers sleeping.
    assert e2e.db.scalar("SELECT count(*) FROM durable_celery.rate_buckets WHERE key = %s",
                         bucket) == 1


def test_a_deadline_fires_while_no_worker_runs(e2e: Harness) -> None:
    coordinator = e2e.coordinator()
    wid = e2e.start("deadlined", deadline=2.0)
    # No worker consumes the queue: the run never starts, and explain says so.
    explained = e2e.durable.explain(wid)
    assert explained["reasons"][0]["kind"] in ("queued", "dispatch")
    run = e2e.wait_status(wid, "failed", timeout=20)
    assert coordinator.alive()
    assert run.error["type"] == "DeadlineExceeded"
    assert e2e.db.scalar("SELECT count(*) FROM public.e2e_effects WHERE workflow_id = %s",
                         wid) == 0
