"""Warm shutdown never runs a step twice (finding 3): a worker told to stop (SIGTERM)
finishes the step it is running and commits it; another worker on the same queue never
gets that step. The bootstep's place is fixed (after the pool), whatever the hash seed;
the runs a process holds are released only once its pool has drained."""

from __future__ import annotations

import os
import signal

import pytest

from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("seed", ["0", "1"])
@pytest.mark.parametrize(("pool", "concurrency"), [("threads", 2), ("solo", 1), ("prefork", 1)])
def test_a_warm_shutdown_finishes_the_running_step_and_never_doubles_it(e2e, seed, pool,
                                                                        concurrency):
    a = e2e.worker(pool, concurrency, label="A", env={"PYTHONHASHSEED": seed})
    wid = e2e.start("slow", {"x": 7, "block": 3.0, "block_on": "A"})
    wait_for(lambda: e2e.db.scalar(
        "SELECT count(*) FROM public.e2e_effects WHERE workflow_id = %s AND step = "
        "'middle:start'", wid), timeout=20, what="the step to start on A")
    b = e2e.worker(pool, concurrency, label="B", env={"PYTHONHASHSEED": seed})
    # Warm shutdown while "middle" runs on A: SIGTERM to the worker's main process, as
    # Docker, Kubernetes and `celery multi stop` send it.
    os.kill(a.pid, signal.SIGTERM)
    run = e2e.wait_status(wid, "done", timeout=40)
    assert run.result == {"x": 7}
    executions = e2e.db.rows(
        "SELECT step, pid FROM public.e2e_effects WHERE workflow_id = %s ORDER BY at", wid)
    steps = [step for step, _ in executions]
    assert steps.count("middle:start") == 1 and steps.count("middle:done") == 1, executions
    history = [(s.step, s.outcome) for s in e2e.durable.workflow_steps(wid)]
    assert history == [("before", "next"), ("middle", "next"), ("after", "done")]
    a.proc.wait(30)
    assert b"lease lost" not in a.log.read_bytes()
    assert b.alive()
