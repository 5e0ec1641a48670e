"""Hostile input to the controls: every request key, workflow id, start_step, version and
option either works or raises the documented ControlError, and committed data is intact."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durable_celery import (
    ControlError,
    Done,
    DuplicateWorkflow,
    IdempotencyConflict,
    InvalidRequest,
)
from durable_celery.controls import parse_start_step
from durable_celery.testing import drain
from tests.integration.support import run_row

HOSTILE = settings(max_examples=60, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])

anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300), st.binary(max_size=20), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.just("\x00"), st.just("x" * 201), st.just("   "), st.just("\ud800"))


@given(anything)
@settings(max_examples=500)
def test_start_step_is_an_int_at_least_one_for_any_value(value: Any) -> None:
    number = parse_start_step(value)
    assert isinstance(number, int) and number >= 1
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        assert number == value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and value > 1:
        assert number == int(value)


@pytest.fixture
def canary(durable: Any) -> tuple[Any, str, dict[str, Any]]:
    wf = durable.workflow("canary")

    @wf.step
    def one(ctx: Any) -> Any:
        return {"n": ctx.state["n"] + 1}

    @wf.step
    def two(ctx: Any) -> Any:
        return Done({"n": ctx.state["n"] * 10})

    wid = wf.start({"n": 1})
    drain(durable)
    return durable, wid, dict(run_row(durable.store.db.engine, wid))


@HOSTILE
@given(key=anything, wid=anything, reason=anything, ttl=anything, interval=anything)
def test_cancel_and_resume_with_hostile_arguments(canary: Any, key: Any, wid: Any, reason: Any,
                                                  ttl: Any, interval: Any) -> None:
    durable, canary_id, before = canary
    for call in (
        lambda: durable.cancel_workflow(wid, key, reason=reason, ttl_days=ttl,
                                        cleanup_interval_seconds=interval),
        lambda: durable.resume_workflow(wid, key, ttl_days=ttl,
                                        cleanup_interval_seconds=interval),
    ):
        try:
            out = call()
        except ControlError as exc:
            assert exc.status in (400, 404, 409)
            assert isinstance(exc.body, dict) and exc.body["error"]
        else:
            assert out["ok"] is True and isinstance(out["changed"], bool)
    assert dict(run_row(durable.store.db.engine, canary_id)) == before


@HOSTILE
@given(key=st.text(min_size=1, max_size=40).filter(lambda s: s.strip() and "\x00" not in s),
       start_step=anything, new_id=anything, version=anything)
def test_fork_with_hostile_arguments(canary: Any, key: str, start_step: Any, new_id: Any,
                                     version: Any) -> None:
    durable, canary_id, before = canary
    try:
        out = durable.fork_workflow(canary_id, key, start_step=start_step,
                                    new_workflow_id=new_id, application_version=version)
    except ControlError as exc:
        assert exc.status in (400, 404, 409)
        assert isinstance(exc.body, dict) and exc.body["error"]
        # Examples share the database: an id or key an earlier example used is a conflict.
        assert isinstance(exc, (InvalidRequest, DuplicateWorkflow, IdempotencyConflict))
    else:
        fork = durable.get_workflow(out["workflow_id"])
        assert fork.forked_from == canary_id and fork.status == "runnable"
        assert fork.version == 1
        history = durable.workflow_steps(out["workflow_id"])
        assert [h.seq for h in history] == list(range(1, fork.seq + 1))
    assert dict(run_row(durable.store.db.engine, canary_id)) == before


@pytest.mark.parametrize("bad", ["\ud800", "a\x00b", "", "   ", "x" * 201])
def test_identifiers_that_postgres_cannot_store_are_refused(durable: Any, bad: str) -> None:
    from durable_celery import InvalidArgument

    wf = durable.workflow("ids")

    @wf.step
    def only(ctx: Any) -> Any:
        return Done(None)

    for call in (lambda: wf.start({}, workflow_id=bad), lambda: wf.start({}, key=bad),
                 lambda: durable.signal(bad, "go"), lambda: durable.get_workflow(bad)):
        with pytest.raises(InvalidArgument):
            call()
    assert durable.list_workflows() == []
