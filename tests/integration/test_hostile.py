"""Hostile input against the public entry points, on the real database.

Each call either works or raises a typed error (a DurableCeleryError); afterwards a canary
run started before is exactly as it was (row, history, inbox), a step that returned garbage
has failed its run with a clear error instead of looping, and nothing is left executing.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from durable_celery import (
    Await,
    ConfigurationError,
    Done,
    Durable,
    Fail,
    InvalidArgument,
    InvalidPayload,
    Next,
    Retry,
    Sleep,
)
from durable_celery.errors import DurableCeleryError
from durable_celery.runtime import executor
from durable_celery.testing import WorkerProcess, drain
from tests.integration.support import redis_lists, rows, run_row, scalar

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

ODD_TEXT = st.sampled_from(["", " ", "x" * 201, "a\x00b", "a\ud800b", "é✓", "order:42",
                            "'; DROP TABLE runs; --", "\u202e", "x" * 200])
ODD_NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, 10**400, 2**63, -1, 0, 1e300,
                               1e-320, 0.5])
SCALARS = st.one_of(ODD_TEXT, ODD_NUMBERS, st.none(), st.booleans(), st.integers(),
                    st.floats(), st.text(max_size=20), st.binary(max_size=6),
                    st.sampled_from([object(), {1, 2}, datetime(2030, 1, 1), len]))
HOSTILE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(), ODD_TEXT), inner,
                        max_size=3)),
    max_leaves=8)
DEEP = st.integers(min_value=90, max_value=130).map(
    lambda depth: {"deep": _nest(depth)})
HUGE = st.integers(min_value=0, max_value=3).map(lambda n: {"blob": "x" * (10 ** (n + 3))})
STATES = st.one_of(HOSTILE, DEEP, HUGE)
IDS = st.one_of(st.none(), ODD_TEXT, st.text(max_size=30), st.integers(), st.binary(max_size=4))


def _nest(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def same_json(stored: Any, given_: Any) -> bool:
    """Equal as JSON values: tuples are lists, numbers compare by value (jsonb keeps
    numbers as decimals, so 1e23 comes back as the integer 10**23)."""
    if isinstance(given_, bool) or given_ is None or isinstance(stored, bool):
        return stored is given_ or (stored == given_ and type(stored) is type(given_))
    if isinstance(given_, (int, float)):
        return isinstance(stored, (int, float)) and float(stored) == float(given_)
    if isinstance(given_, (list, tuple)):
        return isinstance(stored, list) and len(stored) == len(given_) and all(
            same_json(a, b) for a, b in zip(stored, given_, strict=True))
    if isinstance(given_, dict):
        return isinstance(stored, dict) and stored.keys() == given_.keys() and all(
            same_json(stored[k], given_[k]) for k in given_)
    return bool(stored == given_)


# ---------------------------------------------------------------------------- canary


class Canary:
    """A run parked on a signal, with history and an inbox: must never change."""

    def __init__(self, durable: Durable, engine: Any) -> None:
        self.engine = engine
        wf = durable.workflow("canary")

        @wf.step
        def count(ctx):
            return {**ctx.state, "n": ctx.state["n"] + 1}

        @wf.step
        def park(ctx):
            return Await("poke")

        @wf.step
        def end(ctx):
            return Done(ctx.state)

        self.id = wf.start({"n": 1, "text": "é✓", "nested": {"list": [1, 2.5, None]}},
                           key=f"canary:{uuid.uuid4().hex}")
        drain(durable)
        durable.signal(self.id, "unrelated", {"kept": True}, dedup_key="canary-1")
        self.snapshot = self.read()
        assert self.snapshot[0]["status"] == "awaiting"

    def read(self) -> tuple[Any, ...]:
        return (run_row(self.engine, self.id),
                rows(self.engine, "SELECT * FROM {S}.steps WHERE run_id = :id ORDER BY seq",
                     id=self.id),
                rows(self.engine, "SELECT * FROM {S}.signals WHERE run_id = :id ORDER BY id",
                     id=self.id))

    def check(self) -> None:
        assert self.read() == self.snapshot, "the canary run changed"


@pytest.fixture
def canary(durable, published, db_engine) -> Canary:
    return Canary(durable, db_engine)


def nothing_stuck(engine) -> None:
    assert scalar(engine, "SELECT count(*) FROM {S}.runs WHERE status = 'executing'") == 0


# ---------------------------------------------------------------------------- entry points


@EXAMPLES
@example(state=None, key=None, workflow_id=None, queue=None, delay=None)
@example(state={"k": "a\ud800b"}, key=None, workflow_id=None, queue=None, delay=None)
@example(state={}, key="a\ud800b", workflow_id=None, queue=None, delay=None)
@example(state={}, key=None, workflow_id="a\ud800b", queue=None, delay=None)
@example(state={}, key=None, workflow_id=None, queue=None, delay=10**400)
@given(state=STATES, key=IDS, workflow_id=IDS, queue=st.one_of(st.none(), ODD_TEXT, st.text()),
       delay=st.one_of(st.none(), ODD_NUMBERS, st.floats(), st.integers()))
def test_start_with_hostile_arguments(durable, published, db_engine, canary, state, key,
                                      workflow_id, queue, delay):
    wf = durable.get_definition("canary")
    before = scalar(db_engine, "SELECT count(*) FROM {S}.runs")
    try:
        wid = wf.start(state, key=key, workflow_id=workflow_id, queue=queue, delay=delay)
    except DurableCeleryError:
        assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == before
    else:
        run = durable.get_workflow(wid)
        assert (run.status, run.key) == ("runnable", key)
        expected = {} if state is None else state  # start(None) starts with an empty state
        assert same_json(run.state, expected) and same_json(run.input, expected)
    canary.check()
    nothing_stuck(db_engine)


@EXAMPLES
@example(target=None, name="a\ud800b", payload=None, dedup_key=None)
@example(target="a\ud800b", name="go", payload=None, dedup_key=None)
@example(target=None, name="go", payload=None, dedup_key="a\ud800b")
@example(target=None, name="go", payload={"deep": _nest(120)}, dedup_key=None)
@given(target=st.one_of(st.none(), IDS), name=st.one_of(st.just("go"), IDS),
       payload=STATES, dedup_key=IDS)
def test_signal_with_hostile_arguments(durable, published, db_engine, canary, target, name,
                                       payload, dedup_key):
    """``target=None`` addresses a parked sink run (so hostile payloads reach the store)."""
    sink = durable.get_definition("canary").start({"n": 0})
    drain(durable)
    address = sink if target is None else target
    before = scalar(db_engine, "SELECT count(*) FROM {S}.signals")
    try:
        result = durable.signal(address, name, payload, dedup_key=dedup_key)
    except DurableCeleryError:
        assert scalar(db_engine, "SELECT count(*) FROM {S}.signals") == before
    else:
        assert result.workflow_id == sink
        stored = scalar(db_engine, "SELECT payload FROM {S}.signals WHERE id = :id",
                        id=result.signal_id)
        assert same_json(stored, payload)
    canary.check()
    nothing_stuck(db_engine)


@EXAMPLES
@example(workflow_id="a\ud800b", name=None, status=None, limit=1, timeout=0)
@example(workflow_id=None, name=None, status=None, limit=1, timeout=10**400)
@given(workflow_id=st.one_of(st.none(), IDS), name=st.one_of(st.none(), ODD_TEXT, st.text()),
       status=st.one_of(st.none(), ODD_TEXT, st.sampled_from(["done", "awaiting"])),
       limit=st.one_of(st.integers(), ODD_NUMBERS, SCALARS),
       timeout=st.one_of(st.none(), ODD_NUMBERS, st.floats(max_value=0.01), SCALARS))
def test_queries_with_hostile_arguments(durable, published, db_engine, canary, workflow_id,
                                        name, status, limit, timeout):
    """``workflow_id=None`` stands for a finished run, so a valid wait returns at once."""
    target = workflow_id
    if target is None:
        target = durable.get_definition("canary").start({"n": 0}, delay=3600)
        drain(durable, collapse_timers=True)
        durable.signal(target, "poke")
        drain(durable)
    # A run that does not exist is waited for as long as the timeout says (it may be on
    # its way): valid long waits on ids that name no run are cut short here.
    wait = timeout
    if workflow_id is not None and (timeout is None or (
            isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
            and timeout > 0.05)):
        wait = 0.05
    calls = [
        lambda: durable.get_workflow(target),
        lambda: durable.workflow_steps(target),
        lambda: durable.wait_result(target, timeout=wait),
        lambda: durable.list_workflows(name=name, status=status, limit=limit),
        lambda: durable.get_definition(name, None),
    ]
    for call in calls:
        with contextlib.suppress(DurableCeleryError):
            call()
    canary.check()


@EXAMPLES
@example(name="versioned", version=2**31, queue=None)
@given(name=st.one_of(ODD_TEXT, st.text(max_size=12), SCALARS),
       version=st.one_of(st.integers(), ODD_NUMBERS, SCALARS),
       queue=st.one_of(st.none(), ODD_TEXT, st.text(max_size=12)))
def test_a_declared_workflow_can_start(durable, published, db_engine, canary, name, version,
                                       queue):
    """A declaration is refused (InvalidArgument) or usable: its runs start and finish."""
    try:
        wf = durable.workflow(name, version=version, queue=queue)

        @wf.step
        def only(ctx):
            return Done(ctx.state)
    except DurableCeleryError as exc:
        assert isinstance(exc, InvalidArgument), exc
        return
    wid = wf.start({"v": 1})
    drain(durable)
    assert durable.wait_result(wid, timeout=1) == {"v": 1}
    canary.check()


OUTCOMES = st.one_of(
    HOSTILE,
    st.builds(Next, st.one_of(st.sampled_from(["count", "park", "end", "nope"]), HOSTILE),
              state=HOSTILE),
    st.builds(Retry, delay=st.one_of(ODD_NUMBERS, HOSTILE)),
    st.builds(Sleep, seconds=st.one_of(ODD_NUMBERS, HOSTILE),
              until=st.one_of(st.none(), st.just(datetime(9999, 12, 31, tzinfo=timezone.utc)),
                              st.just(datetime(1, 1, 2, tzinfo=timezone.utc)), HOSTILE)),
    st.builds(Await, st.one_of(ODD_TEXT, st.lists(ODD_TEXT, max_size=2), HOSTILE),
              timeout=st.one_of(st.none(), ODD_NUMBERS)),
    st.builds(Done, STATES), st.builds(Fail, STATES), st.builds(Done, state=STATES),
)


@EXAMPLES
@example(returned=Retry(delay=10**400))
@example(returned=Await("a\ud800b"))
@example(returned=Sleep(seconds=10**400))
@given(returned=OUTCOMES)
def test_a_step_returning_garbage_ends_its_run_and_nothing_else(durable, published, db_engine,
                                                                canary, monkeypatch, returned):
    monkeypatch.setattr(executor, "COMMIT_RETRIES", (0.0,))
    wf = durable.workflow(f"garbage_{uuid.uuid4().hex[:8]}")
    calls: list[int] = []

    @wf.step
    def head(ctx):
        calls.append(ctx.attempt)
        return returned if len(calls) == 1 else Done("second call")

    @wf.step
    def tail(ctx):
        return Done("tail")

    wid = wf.start({"n": 0})
    tally = drain(durable, max_steps=20, expire_awaits=True)
    run = durable.get_workflow(wid)
    if run.status == "awaiting":  # a valid Await: wake it with every name it waits for
        for name in run.await_names or ():
            durable.signal(wid, name)
        tally = drain(durable, max_steps=20, expire_awaits=True)
        run = durable.get_workflow(wid)
    assert run.status in ("done", "failed"), (run.status, run.error, tally)
    assert len(calls) <= 3, f"the step ran {len(calls)} times: {calls}"
    if run.status == "failed":
        assert run.error["type"] in ("InvalidOutcome", "Fail"), run.error
        # A Fail carries the user's reason as given (even ""); ours always explain.
        assert run.error["type"] == "Fail" or run.error["message"]
    nothing_stuck(db_engine)
    canary.check()


# ---------------------------------------------------------------------------- limits


def test_the_payload_limit_is_enforced_everywhere_with_a_clear_error(make_durable, db_engine,
                                                                     monkeypatch):
    durable = make_durable(max_payload_bytes=200)
    monkeypatch.setattr(durable.app, "send_task", lambda *a, **k: None)
    wf = durable.workflow("limited")

    @wf.step
    def grow(ctx):
        return {**ctx.state, "blob": "x" * ctx.state["grow_to"]}

    @wf.step
    def park(ctx):
        return Await("go")

    @wf.step
    def finish(ctx):
        return Done("y" * ctx.state["result_size"])

    with pytest.raises(InvalidPayload, match="over the limit of 200") as too_big:
        wf.start({"blob": "x" * 300})
    assert too_big.value.details["limit"] == 200
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == 0

    grows = wf.start({"grow_to": 500, "result_size": 1})
    ok = wf.start({"grow_to": 10, "result_size": 1})
    big_result = wf.start({"grow_to": 10, "result_size": 500})
    drain(durable)
    failed = durable.get_workflow(grows)
    assert (failed.status, failed.error["type"]) == ("failed", "InvalidOutcome")
    assert "over the limit of 200" in failed.error["message"]
    assert failed.state == {"grow_to": 500, "result_size": 1}  # the last committed state

    with pytest.raises(InvalidPayload, match="over the limit of 200"):
        durable.signal(ok, "go", "z" * 300)
    assert scalar(db_engine, "SELECT count(*) FROM {S}.signals") == 0
    durable.signal(ok, "go", "small")
    durable.signal(big_result, "go", "small")
    drain(durable)
    assert durable.wait_result(ok, timeout=1) == "y"
    bad = durable.get_workflow(big_result)
    assert (bad.status, bad.error["type"]) == ("failed", "InvalidOutcome")
    assert "over the limit of 200" in bad.error["message"]
    nothing_stuck(db_engine)


@pytest.mark.parametrize("limit", [0, -1, "lots", math.nan])
def test_a_bad_payload_limit_is_a_configuration_error(database_url, redis_url, limit):
    app = Celery("limits", broker=redis_url, set_as_current=False)
    try:
        with pytest.raises(ConfigurationError):
            Durable(app, database_url=database_url, max_payload_bytes=limit)
    finally:
        app.close()


# ---------------------------------------------------------------------------- no pickle


@pytest.mark.parametrize("accept", [["pickle"], ["application/x-python-serialize"],
                                    ("json", "PICKLE"), {"json", "pickle"}])
def test_an_app_that_would_unpickle_is_refused(database_url, redis_url, accept):
    app = Celery("pickly", broker=redis_url, set_as_current=False)
    app.conf.accept_content = accept
    try:
        with pytest.raises(ConfigurationError, match="pickle"):
            Durable(app, database_url=database_url)
    finally:
        app.close()


class Unpickled:
    """Unpickling this creates a file: the proof that a worker unpickled a message."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


@pytest.mark.e2e
def test_a_worker_never_unpickles_and_survives_malformed_messages(
        database_url, redis_url, queue, clean_db, tmp_path):
    """A real ``celery worker`` with durable tasks gets a pickled message, messages with
    wrong-type or missing arguments, and garbage for the by-name tasks: none runs code,
    none wedges the worker; a run started afterwards completes."""
    from tests.e2e import workerapp

    with clean_db.begin() as conn:
        conn.exec_driver_sql(workerapp.EFFECTS_DDL)
    built = workerapp.build(redis_url, database_url, queue, set_as_current=False)
    log = tmp_path / "worker.log"
    marker = tmp_path / "unpickled"
    worker = WorkerProcess("tests.e2e.workerapp", queues=[queue], pool="solo", concurrency=1,
                           log_path=str(log), cwd=str(REPO_ROOT),
                           env={"E2E_BROKER_URL": redis_url, "E2E_DATABASE_URL": database_url,
                                "E2E_QUEUE": queue, "PYTHONPATH": str(REPO_ROOT)})
    client = redis.Redis.from_url(redis_url)
    try:
        worker.start()
        deadline = time.monotonic() + 45
        while b" ready." not in (log.read_bytes() if log.exists() else b""):
            assert worker.alive(), log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "worker not ready"
            time.sleep(0.1)
        before = built.durable.get_definition("pipeline").start({"x": 1})
        app = built.app
        app.send_task("durable.pipeline.s1", args=[Unpickled(str(marker)), 0],
                      serializer="pickle", queue=queue)
        for args in ([before, "0"], [], [before], [{"id": before}, 0], [before, 0, 1],
                     ["missing-run", 0]):
            app.send_task("durable.pipeline.s1", args=args, queue=queue)
        app.send_task("durable.pipeline.s1", kwargs={"evil": True}, queue=queue)
        app.send_task("durable_celery.signal", kwargs={"target": [1], "name": {"x": 1}},
                      queue=queue)
        app.send_task("durable_celery.start", kwargs={"workflow": "pipeline", "state": [1]},
                      queue=queue)
        app.send_task("durable.no_such.step", args=["x", 0], queue=queue)
        after = built.durable.get_definition("pipeline").start({"x": 2})
        assert built.durable.wait_result(after, timeout=30)["x"] == 2
        assert built.durable.wait_result(before, timeout=30)["x"] == 1
        assert worker.alive()
        assert not marker.exists(), "the worker unpickled a message"
        text = log.read_text(errors="replace")
        assert "Refusing to deserialize untrusted content of type pickle" in text
        effects = scalar(clean_db, "SELECT count(*) FROM public.e2e_effects "
                                   "WHERE workflow_id = ANY(:ids)", ids=[before, after])
        assert effects == 10  # five steps each, once
    finally:
        worker.stop()
        built.close()
        client.delete(*redis_lists(client, queue))
        client.close()


def test_hostile_json_survives_the_round_trip(durable, published, db_engine):
    """What jsonb cannot tell apart is documented here: numbers are decimals."""
    wf = durable.workflow("round_trip")

    @wf.step
    def only(ctx):
        return Done(ctx.state)

    state = {"big": 1e23, "tiny": 5e-324, "neg_zero": -0.0, "int": 2**70, "text": "\u202eé✓",
             "empty": {"": [[], {}]}, "deep": _nest(99)}
    wid = wf.start(state)
    drain(durable)
    result = durable.wait_result(wid, timeout=1)
    assert same_json(result, state)
    assert json.loads(json.dumps(result)) == result
    assert timedelta(0) <= durable.get_workflow(wid).finished_at - durable.get_workflow(
        wid).created_at
