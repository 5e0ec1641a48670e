"""Pipelines, retries and several workers: real ``celery worker`` subprocesses, no kills."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests import services
from tests.e2e.conftest import Harness, wait_for
from tests.e2e.workerapp import PIPELINE_STEPS

pytestmark = pytest.mark.e2e

POOLS = [("prefork", 2), ("threads", 4), ("solo", 1)]


def run_pipelines(e2e: Harness, count: int, *, pause: float = 0.0) -> list[str]:
    """Start ``count`` pipelines, wait for all, check results and exactly-once effects."""
    ids = [e2e.start("pipeline", {"x": i, "pause": pause}) for i in range(count)]
    for i, wid in enumerate(ids):
        assert e2e.durable.wait_result(wid, timeout=60) == {"x": i, "trail": list(PIPELINE_STEPS)}
    effects = e2e.db.effects(ids)
    expected = {(wid, step): [0] for wid in ids for step in PIPELINE_STEPS}
    assert effects == expected, "every step of every run must have run exactly once"
    for wid in ids:
        history = e2e.durable.workflow_steps(wid)
        assert [(h.seq, h.step, h.attempt, h.outcome) for h in history] == [
            (1, "s1", 0, "next"), (2, "s2", 0, "next"), (3, "s3", 0, "next"),
            (4, "s4", 0, "next"), (5, "s5", 0, "done")]
    return ids


@pytest.mark.parametrize(("pool", "concurrency"), POOLS, ids=[p for p, _ in POOLS])
def test_pipeline_on_redis(e2e: Harness, pool: str, concurrency: int) -> None:
    worker = e2e.worker(pool, concurrency)
    run_pipelines(e2e, 20)
    log = worker.log.read_text()
    assert "durable_celery coordinator started" in log
    assert "Traceback" not in log


@pytest.mark.rabbitmq
@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 2), ("threads", 4)],
                         ids=["prefork", "threads"])
def test_pipeline_on_rabbitmq(make_e2e: Callable[[str], Harness], pool: str,
                              concurrency: int) -> None:
    reason = services.amqp_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    url = services.amqp_url()
    assert url is not None
    e2e = make_e2e(url)
    worker = e2e.worker(pool, concurrency)
    run_pipelines(e2e, 20)
    assert "Traceback" not in worker.log.read_text()


def test_retrying_step_fails_twice_then_succeeds(e2e: Harness) -> None:
    e2e.worker("threads", 4)
    ids = [e2e.start("flaky", {"x": i}) for i in range(5)]
    for i, wid in enumerate(ids):
        assert e2e.durable.wait_result(wid, timeout=30) == {"ok": True, "x": i}
    effects = e2e.db.effects(ids)
    for wid in ids:
        assert effects[(wid, "wobble")] == [0, 1, 2]
        assert effects[(wid, "settle")] == [0]
        history = e2e.durable.workflow_steps(wid)
        assert [(h.step, h.attempt, h.outcome) for h in history] == [
            ("wobble", 0, "retry"), ("wobble", 1, "retry"), ("wobble", 2, "next"),
            ("settle", 0, "done")]
        assert history[0].error["type"] == "RuntimeError"
        # The durable retry delay (0.2 s with jitter: 0.1-0.2 s) is honoured between attempts.
        assert (history[1].started_at - history[0].finished_at).total_seconds() >= 0.09


def test_two_workers_share_one_queue(e2e: Harness) -> None:
    first = e2e.worker("prefork", 2, label="h1")
    second = e2e.worker("prefork", 2, label="h2")
    ids = run_pipelines(e2e, 50, pause=0.01)
    rows = e2e.worker_rows()
    assert {nodename for _, _, nodename in rows} == {"h1", "h2"}, rows
    assert len({pid for _, pid, _ in rows}) >= 2
    pids = {pid for (pid,) in e2e.db.rows(
        "SELECT DISTINCT pid FROM public.e2e_effects WHERE workflow_id = ANY(%s)", ids)}
    assert pids <= {pid for _, pid, _ in rows}
    assert first.alive() and second.alive()
    # Warm shutdown removes each process's row.
    first.stop()
    second.stop()
    wait_for(lambda: not e2e.worker_rows(), timeout=10, what="worker rows to be removed")
