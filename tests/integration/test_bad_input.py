"""Bad input gets a typed error and changes nothing; a step returning garbage fails only its
own run, with error type InvalidOutcome, and never wedges the worker."""

from __future__ import annotations

import math
from datetime import datetime

import pytest
from celery import Celery

from durable_celery import (
    Await,
    ConfigurationError,
    Done,
    DuplicateWorkflow,
    Durable,
    InvalidArgument,
    InvalidPayload,
    Next,
    Retry,
    Sleep,
    UnknownWorkflow,
    WaitTimeout,
    WorkflowFailed,
    WorkflowNotFound,
)
from durable_celery.testing import drain
from tests.integration.support import Worker, execute_sql, run_row, scalar


def count_runs(engine):
    return scalar(engine, "SELECT count(*) FROM {S}.runs")


def declare_simple(durable, name="simple"):
    wf = durable.workflow(name)

    @wf.step
    def only(ctx):
        return Done(ctx.state)

    return wf


def test_start_task_refuses_an_unknown_workflow(durable, published, db_engine):
    declare_simple(durable)
    start = durable.app.tasks["durable_celery.start"]

    assert start.run(workflow="no_such_workflow", state={"a": 1}) is None
    assert start.run(workflow=None, state={}) is None
    assert start.run(workflow="simple", state={}, version=7) is None
    assert count_runs(db_engine) == 0
    assert len(published) == 0
    # The same task with a known name works.
    wid = start.run(workflow="simple", state={"a": 1})
    drain(durable)
    assert durable.wait_result(wid, timeout=1) == {"a": 1}


@pytest.mark.parametrize("name", [["simple"], {"name": "simple"}, 42, "", "no_such_workflow"])
def test_get_definition_with_a_bad_name_is_a_typed_error(durable, name):
    declare_simple(durable)
    with pytest.raises(InvalidArgument) as info:
        durable.get_definition(name)
    if name == "no_such_workflow":
        assert isinstance(info.value, UnknownWorkflow)
        assert info.value.status == 404


@pytest.mark.parametrize("state", [
    {"tags": {"a", "b"}},
    {"blob": b"bytes"},
    {"x": math.nan},
    {"x": [1.0, math.inf]},
    {1: "int key"},
    {("a", "b"): "tuple key"},
    {"obj": object()},
    {"nul": "a\x00b"},
    ["not", "an", "object"],
    "just a string",
], ids=["set", "bytes", "nan", "inf", "int-key", "tuple-key", "object", "nul", "list", "str"])
def test_state_that_is_not_json_is_refused(durable, published, db_engine, state):
    wf = declare_simple(durable)
    with pytest.raises(InvalidPayload):
        wf.start(state)
    assert count_runs(db_engine) == 0
    assert len(published) == 0


@pytest.mark.parametrize("value", ["", "   ", "x" * 201, 123, b"bytes", "a\x00b", ["id"]],
                         ids=["empty", "blank", "too-long", "int", "bytes", "nul", "list"])
def test_bad_keys_and_workflow_ids_are_refused(durable, published, db_engine, value):
    wf = declare_simple(durable)
    with pytest.raises(InvalidArgument):
        wf.start({}, workflow_id=value)
    with pytest.raises(InvalidArgument):
        wf.start({}, key=value)
    assert count_runs(db_engine) == 0
    wid = wf.start({}, workflow_id="x" * 200, key="k" * 200)  # the limit itself is fine
    assert durable.get_workflow(wid).key == "k" * 200


@pytest.mark.parametrize("kwargs", [
    {"delay": -1}, {"delay": math.nan}, {"delay": math.inf}, {"delay": "5"}, {"delay": True},
    {"at": datetime(2030, 1, 1)}, {"at": "2030-01-01T00:00:00Z"},
    {"delay": 1, "at": datetime.now().astimezone()},
], ids=["negative", "nan", "inf", "str", "bool", "naive-at", "str-at", "both"])
def test_bad_delays_are_refused(durable, published, db_engine, kwargs):
    wf = declare_simple(durable)
    with pytest.raises(InvalidArgument):
        wf.start({}, **kwargs)
    assert count_runs(db_engine) == 0


def test_a_delay_beyond_the_calendar_is_an_invalid_argument(durable, published, db_engine):
    wf = declare_simple(durable)
    with pytest.raises(InvalidArgument):
        wf.start({}, delay=1e300)
    assert count_runs(db_engine) == 0


GARBAGE = {
    "object": lambda ctx: object(),
    "set": lambda ctx: {1, 2},
    "int-not-last": lambda ctx: 42,
    "list-not-last": lambda ctx: [1, 2],
    "bad-state-key": lambda ctx: {1: "x"},
    "state-with-set": lambda ctx: Next("tail", state={"s": {1}}),
    "unknown-next": lambda ctx: Next("no_such_step"),
    "negative-sleep": lambda ctx: Sleep(seconds=-1),
    "blank-await": lambda ctx: Await(""),
    "nan-retry": lambda ctx: Retry(delay=math.nan),
    "done-with-bytes": lambda ctx: Done(b"raw"),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_a_step_returning_garbage_fails_only_its_run(durable, published, db_engine, kind):
    wf = durable.workflow("garbage")

    @wf.step
    def head(ctx):
        if ctx.state.get("good"):
            return None
        return GARBAGE[kind](ctx)

    @wf.step
    def tail(ctx):
        return Done("fine")

    bad = wf.start({"good": False})
    assert durable.executor.execute(bad, 0) == "committed"
    run = durable.get_workflow(bad)
    assert run.status == "failed"
    assert run.error["type"] == "InvalidOutcome"
    assert run.error["message"]
    assert run.state == {"good": False}
    assert run_row(db_engine, bad)["owner"] is None

    good = wf.start({"good": True})
    drain(durable)
    assert durable.wait_result(good, timeout=1) == "fine"
    assert durable.get_workflow(bad).status == "failed"


@pytest.mark.parametrize("outcome", [
    Sleep(seconds=1e300), Retry(delay=1e300), Await("x", timeout=1e300),
], ids=["sleep", "retry", "await"])
def test_an_out_of_range_timer_fails_the_run_instead_of_wedging_it(durable, published,
                                                                   db_engine, outcome):
    wf = durable.workflow("far_future")

    @wf.step
    def head(ctx):
        return outcome

    @wf.step
    def tail(ctx):
        return Done()

    wid = wf.start()
    try:
        result = durable.executor.execute(wid, 0)
    except Exception as exc:  # reported below together with the state it left behind
        result = f"raised {type(exc).__name__}: {exc}"
    row = run_row(db_engine, wid)
    assert (result, row["status"], row["owner"]) == ("committed", "failed", None), (
        f"execute -> {result!r}; the run is left {row['status']!r} owned by the live worker "
        f"{row['owner']!r}, which the reaper never reclaims")
    assert row["error"]["type"] == "InvalidOutcome"


def test_duplicate_workflows(durable, published, db_engine):
    wf = declare_simple(durable)
    first = wf.start({"n": 1}, key="order:1")

    with pytest.raises(DuplicateWorkflow) as by_key:
        wf.start({"n": 2}, key="order:1")
    assert by_key.value.existing_id == first
    assert by_key.value.status == 409

    explicit = wf.start({"n": 3}, workflow_id="wf-explicit")
    with pytest.raises(DuplicateWorkflow) as by_id:
        wf.start({"n": 4}, workflow_id="wf-explicit")
    assert by_id.value.existing_id == explicit
    assert durable.get_workflow(explicit).state == {"n": 3}
    assert count_runs(db_engine) == 2

    drain(durable)  # both finish
    with pytest.raises(DuplicateWorkflow, match="ended done") as kept:
        wf.start({"n": 5}, key="order:1")  # key_reuse="reject": a finished run keeps it
    assert kept.value.existing_id == first and kept.value.status == 409
    loose = wf.start({"n": 6}, key="order:2", key_reuse="after_finish")
    drain(durable)
    second = wf.start({"n": 7}, key="order:2")  # after_finish: free again once finished
    assert second != loose
    with pytest.raises(DuplicateWorkflow):  # an id is never reused, even once finished
        wf.start({}, workflow_id="wf-explicit")
    assert durable.get_workflow(first).state == {"n": 1}


def test_query_arguments_are_checked(durable, published):
    wf = declare_simple(durable)
    wid = wf.start()
    for kwargs in ({"name": ""}, {"name": 5}, {"status": "bogus"}, {"limit": 0},
                   {"limit": 10_001}, {"limit": True}, {"limit": "5"}):
        with pytest.raises(InvalidArgument):
            durable.list_workflows(**kwargs)
    assert [r.workflow_id for r in durable.list_workflows(name="simple", status="runnable")] \
        == [wid]

    for bad in ("", 5, None, "x" * 201):
        with pytest.raises(InvalidArgument):
            durable.get_workflow(bad)
        with pytest.raises(InvalidArgument):
            durable.wait_result(bad, timeout=0)
    for timeout in (-1, "1", True):
        with pytest.raises(InvalidArgument):
            durable.wait_result(wid, timeout=timeout)
    with pytest.raises(WorkflowNotFound):
        durable.get_workflow("missing")
    with pytest.raises(WorkflowNotFound):
        durable.workflow_steps("missing")


def test_wait_result_errors(durable, published):
    wf = durable.workflow("outcomes")

    @wf.step
    def only(ctx):
        if ctx.state["fail"]:
            raise KeyError("no such order")
        return Done("ok")

    failing = wf.start({"fail": True})
    waiting = wf.start({"fail": False})

    with pytest.raises(WaitTimeout) as timeout:
        durable.wait_result(waiting, timeout=0.05)
    assert isinstance(timeout.value, TimeoutError)
    assert timeout.value.details["status"] == "runnable"

    drain(durable)
    with pytest.raises(WorkflowFailed) as failed:
        durable.wait_result(failing, timeout=1)
    assert failed.value.error["type"] == "KeyError"
    assert "no such order" in failed.value.error["message"]
    assert durable.wait_result(waiting, timeout=1) == "ok"
    with pytest.raises(WorkflowNotFound):
        durable.wait_result("never-started", timeout=1)


def test_wait_result_with_a_nan_timeout_is_refused(durable, published, db_engine):
    wf = declare_simple(durable)
    wid = wf.start()
    waiter = Worker(lambda: durable.wait_result(wid, timeout=math.nan), name="nan-waiter")
    waiter.start()
    waiter.join(1.0)
    hung = waiter.is_alive()
    # Let a hung waiter go before asserting, so it does not outlive the test.
    execute_sql(db_engine, "UPDATE {S}.runs SET status = 'done', result = 'null', "
                           "finished_at = now() WHERE id = :id", id=wid)
    waiter.join(5)
    assert not hung, "wait_result(timeout=nan) waited forever instead of refusing the timeout"
    assert isinstance(waiter.error, InvalidArgument)


def test_an_app_that_accepts_pickle_is_refused(database_url, redis_url):
    app = Celery("pickly", broker=redis_url, set_as_current=False)
    app.conf.accept_content = ["json", "pickle"]
    try:
        with pytest.raises(ConfigurationError):
            Durable(app, database_url=database_url)
    finally:
        app.close()


def test_bad_signals_change_nothing(durable, published, db_engine):
    wf = durable.workflow("sig_input")

    @wf.step
    def park(ctx):
        return Await("go")

    @wf.step
    def end(ctx):
        return Done()

    wid = wf.start()
    drain(durable)
    before = run_row(db_engine, wid)
    with pytest.raises(InvalidPayload):
        durable.signal(wid, "go", {"x": {1, 2}})
    with pytest.raises(InvalidPayload):
        durable.signal(wid, "go", math.nan)
    for name in ("", "  ", None, 5, "n" * 201):
        with pytest.raises(InvalidArgument):
            durable.signal(wid, name)
    for dedup in ("", 5, "d" * 201):
        with pytest.raises(InvalidArgument):
            durable.signal(wid, "go", dedup_key=dedup)
    with pytest.raises(InvalidArgument):
        durable.signal("", "go")
    assert scalar(db_engine, "SELECT count(*) FROM {S}.signals") == 0
    assert run_row(db_engine, wid) == before
