"""``wait_result`` (and ``TaskHandle.get``): a run that does not exist yet is waited for
within the timeout (item 8); the end of a run wakes the wait through LISTEN/NOTIFY, not by
polling; a listener that loses its connection misses nothing."""

from __future__ import annotations

import time

import pytest

from durable_celery import Await, Done, WaitTimeout, WorkflowNotFound
from durable_celery.tasks import TaskHandle
from durable_celery.testing import drain
from tests.integration.support import execute_sql, start_threads


def declare(durable):
    wf = durable.workflow("awaited", run_ahead=False)

    @wf.step
    def park(ctx):
        return Await("go")

    @wf.step
    def end(ctx):
        return Done(ctx.signals[0].payload)

    return wf


def test_a_run_that_does_not_exist_yet_is_waited_for(durable, published):
    wf = declare(durable)
    (waiter,) = start_threads([lambda: durable.wait_result("later-1", timeout=20)])
    time.sleep(0.5)
    assert waiter.is_alive()  # not WorkflowNotFound at once
    wf.start({}, workflow_id="later-1")
    drain(durable)
    durable.signal("later-1", "go", 42)
    drain(durable)
    assert waiter.value(timeout=10) == 42


def test_a_run_that_never_appears_is_not_found_at_the_timeout(durable, published):
    began = time.monotonic()
    with pytest.raises(WorkflowNotFound, match=r"none appeared within 0\.4s"):
        durable.wait_result("never", timeout=0.4)
    assert 0.35 <= time.monotonic() - began < 5
    with pytest.raises(WorkflowNotFound):
        durable.wait_result("never", timeout=0)


def test_the_end_of_a_run_wakes_the_wait_without_polling(durable, published, monkeypatch):
    wf = declare(durable)
    wid = wf.start({})
    drain(durable)
    reads: list[float] = []
    real = durable.store.status

    def counting(workflow_id):
        reads.append(time.monotonic())
        return real(workflow_id)

    monkeypatch.setattr(durable.store, "status", counting)
    began = time.monotonic()
    (waiter,) = start_threads([lambda: durable.wait_result(wid, timeout=20)])
    time.sleep(2.0)
    # A few reads as the wait (and its listener) starts, then none: it listens.
    idle = [t for t in reads if t > began + 0.5]
    assert len(reads) <= 6 and not idle, f"status read at {[t - began for t in reads]}"
    durable.signal(wid, "go", "paid")
    committed_at = None
    drain(durable)
    committed_at = time.monotonic()
    assert waiter.value(timeout=10) == "paid"
    assert reads[-1] - committed_at < 1.0  # woken by the notification, not a 5 s poll


def test_a_waiter_survives_its_listener_losing_the_connection(durable, published, db_engine):
    wf = declare(durable)
    wid = wf.start({})
    drain(durable)
    (waiter,) = start_threads([lambda: durable.wait_result(wid, timeout=30)])
    time.sleep(0.5)
    execute_sql(db_engine, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                           "datname = current_database() AND query LIKE 'LISTEN durable_celery_done%'")
    time.sleep(0.3)
    durable.signal(wid, "go", "after")
    drain(durable)
    assert waiter.value(timeout=20) == "after"


def test_a_handle_for_a_start_still_on_its_way_waits(durable, published):
    @durable.task
    def double(n):
        return n * 2

    handle = TaskHandle(durable, "msg-77")
    (waiter,) = start_threads([lambda: handle.get(timeout=20)])
    time.sleep(0.3)
    double.apply_async((21,), task_id="msg-77")
    drain(durable)
    assert waiter.value(timeout=10) == 42
    with pytest.raises(WaitTimeout):
        declare(durable)
        parked = durable.get_definition("awaited").start({})
        drain(durable)
        durable.wait_result(parked, timeout=0.2)
