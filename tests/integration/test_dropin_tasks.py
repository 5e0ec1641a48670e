"""@durable.task against real Postgres: calls, results, retries, timers, typed errors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from celery.exceptions import MaxRetriesExceededError

from durable_celery import (
    DuplicateWorkflow,
    InvalidArgument,
    InvalidPayload,
    TaskHandle,
    WaitTimeout,
    WorkflowCancelled,
    WorkflowFailed,
)
from durable_celery.testing import drain
from tests.integration.support import run_row, scalar, seconds


def test_delay_runs_durably_and_get_returns_the_result(durable, published):
    @durable.task
    def add(x, y):
        return x + y

    assert add.name == f"{__name__}.add"
    handle = add.delay(2, 3)
    assert isinstance(handle, TaskHandle)
    assert handle.status == "PENDING" and not handle.ready()
    assert [m.name for m in published.sent] == [f"durable.{__name__}.add.run"]
    drain(durable)
    assert handle.get(timeout=5) == 5
    assert handle.status == "SUCCESS" and handle.ready() and handle.successful()
    assert handle.result == 5
    run = durable.get_workflow(handle.id)
    assert run.workflow == add.name and run.input == {"args": [2, 3], "kwargs": {}}
    assert [r.workflow_id for r in durable.list_workflows(add.name)] == [handle.id]


def test_calling_the_function_runs_it_inline(durable, published, db_engine):
    calls = []

    @durable.task(name="inline.task")
    def record(value, *, times=1):
        calls.append(value)
        return value * times

    assert record("ab", times=2) == "abab"
    assert calls == ["ab"]
    assert published.sent == []
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == 0


def test_apply_async_options(durable, published):
    @durable.task(name="opts.task", queue="special")
    def echo(*args, **kwargs):
        return {"args": list(args), "kwargs": kwargs}

    handle = echo.apply_async(args=(1, [2]), kwargs={"k": {"n": None}}, workflow_id="wid-1",
                              key="echo:1", priority=7, queue="other")
    assert handle.id == "wid-1"
    run = durable.get_workflow("wid-1")
    assert (run.key, run.priority, run.queue) == ("echo:1", 7, "other")
    with pytest.raises(DuplicateWorkflow):
        echo.apply_async(key="echo:1")
    assert echo.apply_async(task_id="wid-2").id == "wid-2"
    drain(durable)
    assert handle.get(timeout=5) == {"args": [1, [2]], "kwargs": {"k": {"n": None}}}


def test_countdown_is_a_durable_timer(durable, published, db_engine):
    @durable.task(name="later.task")
    def later():
        return "ran"

    handle = later.apply_async(countdown=3600)
    eta_handle = later.apply_async(eta=datetime.now(timezone.utc) + timedelta(hours=2))
    naive = later.apply_async(eta=datetime.now(timezone.utc).replace(tzinfo=None)
                              + timedelta(hours=3))
    assert published.sent == []  # nothing in the broker
    row = run_row(db_engine, handle.id)
    assert row["status"] == "runnable"
    assert 3590 < seconds(row["eligible_at"] - row["created_at"]) <= 3600.5
    assert 7190 < seconds(run_row(db_engine, eta_handle.id)["eligible_at"]
                          - row["created_at"]) < 7210
    assert 10790 < seconds(run_row(db_engine, naive.id)["eligible_at"]
                           - row["created_at"]) < 10810
    coordinator = durable.coordinator()
    coordinator.dispatcher.run_once()
    assert published.sent == []  # not due: the sweep publishes nothing either
    with pytest.raises(WaitTimeout):
        handle.get(timeout=0.05)
    drain(durable)  # collapses timers: as if the hour had passed
    assert handle.get(timeout=5) == "ran"


def test_bound_task_retries_with_self_retry(durable, published):
    @durable.task(bind=True, max_retries=2, default_retry_delay=0)
    def flaky(self, n):
        if self.request.retries < n:
            raise self.retry(countdown=0)
        return {"retries": self.request.retries, "id": self.request.id}

    ok = flaky.delay(2)
    too_many = flaky.delay(5)
    drain(durable)
    assert ok.get(timeout=5) == {"retries": 2, "id": ok.id}
    with pytest.raises(WorkflowFailed) as failed:
        too_many.get(timeout=5)
    assert failed.value.error["type"] == "MaxRetriesExceededError"
    assert too_many.status == "FAILURE"
    # Inline, self.request is empty and retry() past the limit raises Celery's error.
    assert flaky(0) == {"retries": 0, "id": None}
    with pytest.raises(MaxRetriesExceededError):
        flaky.run(flaky_self_with_retries(flaky, 2), 5)


def flaky_self_with_retries(task, retries):
    from durable_celery.tasks import BoundTask

    bound = BoundTask(task, None, [], {})
    bound.request.retries = retries
    return bound


def test_autoretry_for_retries_listed_errors_only(durable, published):
    attempts = {"io": 0, "value": 0}

    @durable.task(autoretry_for=(OSError,), max_retries=3, default_retry_delay=0)
    def io_task(kind):
        attempts[kind] += 1
        if kind == "io" and attempts[kind] < 3:
            raise OSError("disk hiccup")
        if kind == "value":
            raise ValueError("bad input")
        return attempts[kind]

    io, value = io_task.delay("io"), io_task.delay("value")
    drain(durable)
    assert io.get(timeout=5) == 3
    with pytest.raises(WorkflowFailed, match="ValueError: bad input"):
        value.get(timeout=5)
    assert attempts["value"] == 1


def test_retry_policy_option(durable, published):
    tries = []

    @durable.task(retry={"max_attempts": 3, "delay": 0, "jitter": False})
    def wobbly():
        tries.append(1)
        if len(tries) < 3:
            raise RuntimeError("again")
        return len(tries)

    handle = wobbly.delay()
    drain(durable)
    assert handle.get(timeout=5) == 3
    assert [s.outcome for s in durable.workflow_steps(handle.id)] == ["retry", "retry", "done"]


def test_without_retry_options_an_error_fails_the_run(durable, published):
    @durable.task
    def boom():
        raise KeyError("nope")

    handle = boom.delay()
    drain(durable)
    with pytest.raises(WorkflowFailed):
        handle.get(timeout=5)
    assert handle.get(timeout=5, propagate=False)["type"] == "KeyError"
    assert handle.failed() and handle.result["type"] == "KeyError"


def test_non_json_arguments_are_refused_at_call_time(durable, published, db_engine):
    @durable.task
    def takes(value):
        return value

    for bad in (object(), {1: "int key"}, float("nan"), b"bytes", {"s": {1, 2}}):
        with pytest.raises(InvalidPayload, match="arguments of task"):
            takes.delay(bad)
    with pytest.raises(InvalidPayload, match="keyword arguments"):
        takes.delay(value=datetime.now())
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == 0
    assert published.sent == []


def test_a_non_json_result_fails_the_run_clearly(durable, published):
    @durable.task
    def returns_a_set():
        return {1, 2}

    handle = returns_a_set.delay()
    drain(durable)
    with pytest.raises(WorkflowFailed, match="not JSON"):
        handle.get(timeout=5)


def test_bad_options_are_typed_errors(durable, published):
    def f():
        return None

    bad_decorators = [
        {"unknown_option": 1}, {"name": "has space"}, {"name": ""}, {"queue": "a b"},
        {"retry": {"max_attempts": 0}}, {"bind": "yes"}, {"max_retries": -1},
        {"autoretry_for": ("not an exception",)}, {"priority": 10}, {"priority": -1},
        {"serializer": "pickle"}, {"default_retry_delay": -5},
    ]
    for options in bad_decorators:
        with pytest.raises(InvalidArgument):
            durable.task(**options)(f)
    with pytest.raises(InvalidArgument):
        durable.task("a-name")

    @durable.task(name="ok.task")
    def ok():
        return None

    with pytest.raises(InvalidArgument):
        durable.task(name="ok.task")(f)  # the name is taken
    bad_calls = [
        {"args": "not a list"}, {"kwargs": [1]}, {"countdown": -1}, {"countdown": "soon"},
        {"countdown": float("inf")}, {"eta": "tomorrow"}, {"countdown": 1, "eta": datetime.now()},
        {"priority": 10}, {"priority": True}, {"queue": "bad queue"}, {"key": ""},
        {"workflow_id": "x" * 300}, {"concurrency_key": ""}, {"link": "other"},
        {"serializer": "pickle"}, {"connection": "not a connection"},
        {"workflow_id": "a", "task_id": "b"},
    ]
    for options in bad_calls:
        with pytest.raises(InvalidArgument):
            ok.apply_async(**options)
    assert published.sent == []


def test_send_task_by_name_starts_a_durable_run(durable, published):
    @durable.task(name="by.name")
    def by_name(x):
        return x * 10

    entry = durable.app.tasks["by.name"]
    assert f"durable.by.name.{'run'}" in durable.app.tasks
    # What a worker does with app.send_task("by.name", args=[4]): the message id becomes
    # the workflow_id, so a redelivery starts nothing new.
    first = entry.apply(args=[4], task_id="celery-msg-1").get()
    again = entry.apply(args=[4], task_id="celery-msg-1").get()
    assert first == again == "celery-msg-1"
    drain(durable)
    assert durable.wait_result("celery-msg-1", timeout=5) == 40
    assert len(durable.list_workflows("by.name")) == 1


def test_handle_compares_like_an_async_result(durable, published):
    @durable.task(name="cmp.task")
    def noop():
        return None

    handle = noop.delay()
    assert handle == handle.id and str(handle) == handle.id and handle.task_id == handle.id
    assert handle == TaskHandle(durable, handle.id) and len({handle, TaskHandle(durable, handle.id)}) == 1


def test_revoke_cancels_the_run_durably(durable, published):
    @durable.task(name="revocable.task")
    def revocable():
        return "ran"

    handle = revocable.apply_async(countdown=3600)
    assert handle.revoke(request_key="rk-1")["changed"] is True
    assert handle.revoke(request_key="rk-1")["idempotency_replayed"] is True
    assert handle.status == "REVOKED" and handle.ready()
    drain(durable)
    with pytest.raises(WorkflowCancelled):
        handle.get(timeout=5)
