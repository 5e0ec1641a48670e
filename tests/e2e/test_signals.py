"""Durable timers and signals, and the by-name tasks other Celery apps call."""

from __future__ import annotations

import uuid

import pytest
from celery import Celery

from tests.e2e.conftest import Harness, wait_for
from tests.e2e.workerapp import PIPELINE_STEPS

pytestmark = pytest.mark.e2e


def test_sleep_then_await_answered_by_a_plain_celery_app(e2e: Harness) -> None:
    e2e.worker("prefork", 2)
    key = f"order:{uuid.uuid4().hex[:8]}"
    wid = e2e.start("timer", {"x": 1, "sleep": 1}, key=key)
    run = e2e.wait_status(wid, "awaiting", timeout=30)
    assert run.step == "finish" and run.await_names == ("go",)

    # The durable timer held the run for its full second between the two steps.
    (slept,) = e2e.db.rows(
        "SELECT max(at) FILTER (WHERE step = 'wait_go') - max(at) FILTER (WHERE step = 'nap') "
        "FROM public.e2e_effects WHERE workflow_id = %s", wid)[0]
    assert slept.total_seconds() >= 0.95

    payload = {"amount": 100, "by": "plain celery"}
    with Celery("plain", broker=e2e.broker_url, set_as_current=False) as plain:
        for _ in range(2):  # the second one is a duplicate: same dedup_key
            plain.send_task("durable_celery.signal", queue=e2e.queue, kwargs={
                "target": key, "name": "go", "payload": payload, "dedup_key": "x"})
        assert e2e.durable.wait_result(wid, timeout=30) == {
            "go": payload, "timed_out": False, "x": 1}

        # durable_celery.start by name, addressed by key; the same key again is a no-op
        # while the first run lives, and a new run once it is finished.
        key2 = f"start:{uuid.uuid4().hex[:8]}"
        plain.send_task("durable_celery.start", queue=e2e.queue, kwargs={
            "workflow": "pipeline", "state": {"x": 7}, "key": key2})
        started = wait_for(lambda: e2e.db.rows(
            "SELECT id FROM durable_celery.runs WHERE key = %s", key2), timeout=30,
            what="durable_celery.start to insert the run")
        assert len(started) == 1
        wid2 = started[0][0]
        assert e2e.durable.wait_result(wid2, timeout=30) == {
            "x": 7, "trail": list(PIPELINE_STEPS)}

    signals = e2e.db.rows(
        "SELECT name, payload, dedup_key, consumed_at IS NOT NULL FROM durable_celery.signals "
        "WHERE run_id = %s", wid)
    assert signals == [("go", payload, "x", True)]
    effects = e2e.db.effects([wid, wid2])
    assert effects == {
        (wid, "nap"): [0], (wid, "wait_go"): [0], (wid, "finish"): [0],
        **{(wid2, step): [0] for step in PIPELINE_STEPS}}
    assert [(h.step, h.outcome) for h in e2e.durable.workflow_steps(wid)] == [
        ("nap", "sleep"), ("wait_go", "await"), ("finish", "done")]


def test_signal_sent_before_the_await_is_kept_in_the_inbox(e2e: Harness) -> None:
    """A signal that arrives while the run sleeps is consumed by the later Await."""
    e2e.worker("threads", 2)
    wid = e2e.start("timer", {"x": 2, "sleep": 1.5})
    wait_for(lambda: e2e.db.rows(
        "SELECT 1 FROM public.e2e_effects WHERE workflow_id = %s AND step = 'nap'", wid),
        timeout=30, what="the nap step")
    result = e2e.durable.signal(wid, "go", {"early": True}, dedup_key="early")
    assert not result.woke and not result.duplicate
    assert e2e.durable.wait_result(wid, timeout=30) == {
        "go": {"early": True}, "timed_out": False, "x": 2}
