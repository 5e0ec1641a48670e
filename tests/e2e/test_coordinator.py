"""The coordinator run alone (``durable-celery coordinator``), next to workers that run none."""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import Harness, wait_for

pytestmark = pytest.mark.e2e

NO_COORDINATOR = {"DURABLE_CELERY_COORDINATOR": "false"}


def test_standalone_coordinator_wakes_sleeping_runs(e2e: Harness) -> None:
    worker = e2e.worker("prefork", 2, env=NO_COORDINATOR)
    wid = e2e.start("timer", {"x": 1, "sleep": 0.5})
    wait_for(lambda: e2e.db.rows(
        "SELECT 1 FROM public.e2e_effects WHERE workflow_id = %s AND step = 'nap'", wid),
        timeout=30, what="the nap step")
    # Nothing wakes the timer: the worker runs no coordinator.
    time.sleep(0.5 + 1.5)
    run = e2e.run(wid)
    assert (run.status, run.step) == ("runnable", "wait_go")
    assert "durable_celery coordinator started" not in worker.log.read_text()

    # `--once`: one pass of every sweep, JSON on stdout; it publishes the due timer.
    out = e2e.coordinator_once()
    assert out == {"work_done": 1}
    e2e.wait_status(wid, "awaiting", timeout=30)
    assert e2e.coordinator_once() == {"work_done": 0}

    # A long-running standalone coordinator wakes timers as they come due.
    coordinator = e2e.coordinator()
    later = [e2e.start("timer", {"x": i, "sleep": 1}) for i in (2, 3)]
    for other in later:
        e2e.wait_status(other, "awaiting", timeout=30)
    for i, target in enumerate([wid, *later], start=1):
        e2e.durable.signal(target, "go", {"n": i})
    for i, target in enumerate([wid, *later], start=1):
        assert e2e.durable.wait_result(target, timeout=30) == {
            "go": {"n": i}, "timed_out": False, "x": i}
    assert coordinator.alive()
    assert "Traceback" not in coordinator.log.read_text()


def test_timers_published_ahead_start_on_time_and_never_early(e2e: Harness) -> None:
    # A large lead: each timer's message reaches the worker about 0.5 s before it is due
    # (a Celery eta); the worker holds it and claims when it is due.
    e2e.worker("prefork", 2, env={"DURABLE_CELERY_TIMER_LEAD": "0.5"})
    runs = [e2e.start("timer", {"x": i, "sleep": 1}) for i in range(4)]
    for wid in runs:
        e2e.wait_status(wid, "awaiting", timeout=30)
    for wid in runs:
        # The nap's commit made the next step due 1 s after its own transaction time; the
        # next step's first effect carries the database's clock when the step ran.
        [(napped, woke)] = e2e.db.rows(
            "SELECT n.finished_at, e.at FROM durable_celery.steps n "
            "JOIN public.e2e_effects e ON e.workflow_id = n.run_id AND e.step = 'wait_go' "
            "WHERE n.run_id = %s AND n.step = 'nap'", wid)
        assert (woke - napped).total_seconds() >= 1.0  # never before it is due
        # ...and not left for the dispatcher's redispatch (60 s) either.
        assert (woke - napped).total_seconds() < 30
