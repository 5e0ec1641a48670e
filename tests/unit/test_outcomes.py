"""runtime.outcomes: what a step returned (or raised) becomes a Transition. Pure logic."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from durable_celery.definitions import (
    Await,
    Done,
    Fail,
    Next,
    Retry,
    RetryPolicy,
    Sleep,
    Workflow,
)
from durable_celery.errors import InvalidArgument
from durable_celery.runtime import outcomes
from durable_celery.storage.records import Transition
from tests.unit.fakes import FakeDurable

ORIGINAL = {"committed": True}


def build_workflow(durable: FakeDurable, *, run_ahead: bool | None = None) -> Workflow:
    wf = Workflow(owner=durable, name="shop", run_ahead=run_ahead)  # type: ignore[arg-type]

    @wf.step(retry={"max_attempts": 3, "backoff": "linear", "delay": 2.0, "jitter": False})
    def reserve(ctx: Any) -> Any: ...

    @wf.step
    def pay(ctx: Any) -> Any: ...

    @wf.step(queue="shipping")
    def ship(ctx: Any) -> Any: ...

    @wf.step
    def notify(ctx: Any) -> Any: ...

    return wf


@pytest.fixture
def wf(fake_durable: FakeDurable) -> Workflow:
    return build_workflow(fake_durable)


def visit(wf: Workflow, step: str = "reserve", **changes: Any) -> outcomes.Visit:
    v = outcomes.Visit(workflow=wf, step=wf.steps[step], attempt=0, queue="default",
                       run_queue=None, original_state=ORIGINAL, max_payload_bytes=100_000,
                       run_ahead=False)
    return replace(v, **changes)


def error_of(t: Transition) -> dict[str, Any]:
    assert t.error is not None
    error: dict[str, Any] = json.loads(t.error)
    return error


def assert_failed(t: Transition, *, step: str, message: str,
                  error_type: str = "InvalidOutcome") -> dict[str, Any]:
    """The run fails at ``step``, with the committed state kept and a clear message."""
    assert t.status == "failed"
    assert t.terminal
    assert t.outcome == "fail"
    assert t.next_step is None
    assert t.step == step
    assert not t.publish
    error = error_of(t)
    assert error["type"] == error_type
    assert message in error["message"], error["message"]
    return error


# ----------------------------------------------------------------------------- plain values


def test_plain_dict_goes_to_the_next_declared_step(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), {"n": 1}, {"ignored": True})
    assert t.status == "runnable"
    assert (t.step, t.next_step, t.queue) == ("pay", "pay", "default")
    assert t.attempt == 0
    assert json.loads(t.state) == {"n": 1}
    assert t.publish is True
    assert t.outcome == "next"
    assert t.consume is True
    assert (t.result, t.error, t.delay, t.until) == (None, None, 0.0, None)


def test_plain_dict_resets_the_attempt(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, attempt=2), {"n": 1}, {})
    assert t.attempt == 0


def test_run_ahead_on_the_same_queue_keeps_the_claim(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, run_ahead=True), {"n": 1}, {})
    assert t.status == "executing"
    assert t.step == "pay"
    assert t.publish is False


def test_run_ahead_to_another_queue_is_published(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "pay", run_ahead=True), {"n": 1}, {})
    assert (t.step, t.queue) == ("ship", "shipping")
    assert t.status == "runnable"
    assert t.publish is True


def test_run_ahead_disabled_by_the_workflow(fake_durable: FakeDurable) -> None:
    wf = build_workflow(fake_durable, run_ahead=False)
    t = outcomes.decide(visit(wf, run_ahead=True), {"n": 1}, {})
    assert (t.status, t.publish) == ("runnable", True)


def test_run_ahead_disabled_by_the_target_step(wf: Workflow) -> None:
    @wf.step(run_ahead=False)
    def audit(ctx: Any) -> Any: ...

    t = outcomes.decide(visit(wf, "notify", run_ahead=True), {"n": 1}, {})
    assert (t.step, t.status, t.publish) == ("audit", "runnable", True)


def test_none_keeps_the_state_as_the_step_left_it(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), None, {"mutated": 2})
    assert t.status == "runnable"
    assert t.step == "pay"
    assert json.loads(t.state) == {"mutated": 2}


def test_plain_value_on_the_last_step_is_done_with_that_result(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "notify", attempt=1), [1, "two"], {"final": True})
    assert t.status == "done"
    assert t.terminal
    assert t.outcome == "done"
    assert t.next_step is None
    assert t.step == "notify"
    assert json.loads(t.result or "") == [1, "two"]
    assert json.loads(t.state) == {"final": True}
    assert t.publish is False


def test_dict_on_the_last_step_is_both_the_result_and_the_state(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "notify"), {"total": 3}, {"old": 1})
    assert t.status == "done"
    assert json.loads(t.result or "") == {"total": 3}
    assert json.loads(t.state) == {"total": 3}


def test_none_on_the_last_step_is_done_with_a_null_result(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "notify"), None, {"kept": 1})
    assert t.status == "done"
    assert json.loads(t.result or "") is None
    assert json.loads(t.state) == {"kept": 1}


@pytest.mark.parametrize("returned", [42, "text", [1, 2], True, 1.5])
def test_non_dict_plain_value_on_a_middle_step_fails(wf: Workflow, returned: Any) -> None:
    t = outcomes.decide(visit(wf), returned, {"mutated": True})
    assert_failed(t, step="reserve",
                  message=f"step 'reserve' returned a {type(returned).__name__}")
    assert json.loads(t.state) == ORIGINAL


def test_non_json_plain_value_on_the_last_step_fails(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "notify"), {1, 2}, {})
    # The plain value is not a dict, so it is the result, and a set is not JSON.
    assert_failed(t, step="notify", message="result is a set")


# ----------------------------------------------------------------------------- Next


def test_next_by_name(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, attempt=2), Next("ship"), {"s": 1})
    assert (t.status, t.step, t.next_step, t.queue) == ("runnable", "ship", "ship", "shipping")
    assert t.attempt == 0
    assert t.publish
    assert json.loads(t.state) == {"s": 1}


def test_next_by_function(wf: Workflow) -> None:
    notify = wf.steps["notify"].fn
    t = outcomes.decide(visit(wf), Next(notify), {})
    assert t.step == "notify"


def test_next_backwards_is_allowed(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "notify"), Next("reserve"), {})
    assert (t.status, t.step) == ("runnable", "reserve")


def test_next_with_state_replaces_the_state(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Next("pay", state={"new": 1}), {"old": 1})
    assert json.loads(t.state) == {"new": 1}


def test_next_uses_the_run_queue_override(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, run_queue="vip"), Next("pay"), {})
    assert t.queue == "vip"
    t = outcomes.decide(visit(wf, run_queue="vip"), Next("ship"), {})
    assert t.queue == "shipping"  # a step's own queue wins


def test_next_to_an_unknown_step_fails_clearly(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Next("refund"), {"mutated": True})
    assert_failed(t, step="reserve", message="workflow 'shop' v1 has no step 'refund'")
    assert "['reserve', 'pay', 'ship', 'notify']" in error_of(t)["message"]
    assert json.loads(t.state) == ORIGINAL


def test_next_to_a_foreign_function_fails_clearly(wf: Workflow) -> None:
    def elsewhere(ctx: Any) -> None: ...

    t = outcomes.decide(visit(wf), Next(elsewhere), {})
    assert_failed(t, step="reserve", message="has no step 'elsewhere'")


# ----------------------------------------------------------------------------- Retry


def test_retry_runs_the_same_step_with_attempt_plus_one(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "pay", attempt=2), Retry(delay=5), {"s": 1})
    assert (t.status, t.step, t.next_step, t.outcome) == ("runnable", "pay", "pay", "retry")
    assert t.attempt == 3
    assert t.delay == 5.0
    assert t.publish is False  # a timer: the dispatcher publishes it when due
    assert t.consume is False  # the retry must see the same signals again
    assert json.loads(t.state) == {"s": 1}


def test_retry_without_delay_is_published_now(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "pay"), Retry(), {})
    assert (t.delay, t.publish, t.attempt) == (0.0, True, 1)


@pytest.mark.parametrize("delay", [-1, math.nan, math.inf, "5", True])
def test_retry_with_a_bad_delay_fails(wf: Workflow, delay: Any) -> None:
    t = outcomes.decide(visit(wf, "pay"), Retry(delay=delay), {})
    assert_failed(t, step="pay", message="Retry delay must be a finite number of seconds >= 0")


# ----------------------------------------------------------------------------- Sleep


def test_sleep_seconds_is_a_timer_to_the_next_step(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, attempt=1), Sleep(seconds=30), {"s": 1})
    assert (t.status, t.step, t.next_step, t.outcome) == ("runnable", "pay", "pay", "sleep")
    assert t.delay == 30.0
    assert t.until is None
    assert t.attempt == 0
    assert t.publish is False
    assert json.loads(t.state) == {"s": 1}


def test_sleep_zero_seconds_is_published_now(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Sleep(seconds=0), {})
    assert (t.delay, t.publish) == (0.0, True)


def test_sleep_until_an_aware_datetime(wf: Workflow) -> None:
    when = datetime(2030, 1, 1, tzinfo=timezone.utc)
    t = outcomes.decide(visit(wf), Sleep(until=when, next="ship"), {})
    assert (t.status, t.step, t.queue) == ("runnable", "ship", "shipping")
    assert t.until == when
    assert t.delay == 0.0
    assert t.publish is False


def test_sleep_until_a_naive_datetime_fails(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Sleep(until=datetime(2030, 1, 1)), {})
    assert_failed(t, step="reserve", message="Sleep until= must be a timezone-aware datetime")


def test_sleep_until_something_else_fails(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Sleep(until="2030-01-01T00:00:00Z"), {})  # type: ignore[arg-type]
    assert_failed(t, step="reserve", message="timezone-aware datetime")


@pytest.mark.parametrize("sleep", [
    Sleep(),
    Sleep(seconds=5, until=datetime.now(timezone.utc) + timedelta(hours=1)),
])
def test_sleep_needs_exactly_one_of_seconds_or_until(wf: Workflow, sleep: Sleep) -> None:
    t = outcomes.decide(visit(wf), sleep, {})
    assert_failed(t, step="reserve", message="Sleep needs exactly one of seconds= or until=")


@pytest.mark.parametrize("seconds", [-0.001, math.inf, math.nan, "10"])
def test_sleep_with_bad_seconds_fails(wf: Workflow, seconds: Any) -> None:
    t = outcomes.decide(visit(wf), Sleep(seconds=seconds), {})
    assert_failed(t, step="reserve", message="Sleep seconds must be a finite number")


def test_sleep_from_the_last_step_needs_next(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "notify"), Sleep(seconds=1), {})
    assert_failed(t, step="notify",
                  message="Sleep from the last step 'notify' needs next= (no step follows it)")


def test_sleep_from_the_last_step_with_next_is_fine(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "notify"), Sleep(seconds=1, next="reserve"), {})
    assert (t.status, t.step) == ("runnable", "reserve")


def test_sleep_to_an_unknown_step_fails(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Sleep(seconds=1, next="nope"), {})
    assert_failed(t, step="reserve", message="has no step 'nope'")


# ----------------------------------------------------------------------------- Await


def test_await_one_name(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, attempt=1), Await("paid"), {"s": 1})
    assert (t.status, t.step, t.next_step, t.outcome) == ("awaiting", "pay", "pay", "await")
    assert list(t.await_names or ()) == ["paid"]
    assert t.deadline is None
    assert t.attempt == 0
    assert t.publish is False
    assert json.loads(t.state) == {"s": 1}


def test_await_a_set_of_names_is_sorted_and_unique(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Await({"refused", "paid"}), {})
    assert list(t.await_names or ()) == ["paid", "refused"]
    t = outcomes.decide(visit(wf), Await(["b", "a", "b"]), {})
    assert list(t.await_names or ()) == ["a", "b"]


def test_await_with_timeout_and_next(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Await("paid", next="ship", timeout=3600), {})
    assert (t.step, t.queue, t.deadline) == ("ship", "shipping", 3600.0)


@pytest.mark.parametrize("names, message", [
    (set(), "Await needs at least one signal name"),
    ([], "Await needs at least one signal name"),
    ([1], "a signal name must be a non-blank string"),
    (["ok", None], "a signal name must be a non-blank string"),
    ("   ", "a signal name must be a non-blank string"),
    ("a\x00b", "without NUL"),
    ("x" * 201, "at most 200 characters"),
    (5, "signal names must be a string or strings"),
])
def test_await_with_bad_names_fails(wf: Workflow, names: Any, message: str) -> None:
    t = outcomes.decide(visit(wf), Await(names), {})
    assert_failed(t, step="reserve", message=message)


@pytest.mark.parametrize("timeout", [-1, math.nan, math.inf, "60"])
def test_await_with_a_bad_timeout_fails(wf: Workflow, timeout: Any) -> None:
    t = outcomes.decide(visit(wf), Await("paid", timeout=timeout), {})
    assert_failed(t, step="reserve", message="Await timeout must be a finite number")


def test_await_from_the_last_step_needs_next(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "notify"), Await("paid"), {})
    assert_failed(t, step="notify", message="Await from the last step 'notify' needs next=")


def test_signal_names_helper() -> None:
    assert outcomes.signal_names("a") == ["a"]
    assert outcomes.signal_names(("c", "a")) == ["a", "c"]
    assert outcomes.signal_names("x" * 200) == ["x" * 200]
    with pytest.raises(InvalidArgument):
        outcomes.signal_names(iter(()))


# ----------------------------------------------------------------------------- Done / Fail


def test_done_with_a_result(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "pay", attempt=1), Done({"shipped": True}), {"s": 1})
    assert (t.status, t.step, t.outcome, t.next_step) == ("done", "pay", "done", None)
    assert json.loads(t.result or "") == {"shipped": True}
    assert json.loads(t.state) == {"s": 1}
    assert t.publish is False


def test_done_with_state(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Done(1, state={"final": 1}), {"old": 1})
    assert json.loads(t.state) == {"final": 1}


@pytest.mark.parametrize("result, problem", [
    (object(), "result is a object"),
    ({1: "a"}, "result has a int key"),
    (math.nan, "result is nan"),
    ("a\x00", "result holds a NUL"),
])
def test_done_with_a_non_json_result_fails(wf: Workflow, result: Any, problem: str) -> None:
    t = outcomes.decide(visit(wf), Done(result), {"mutated": 1})
    assert_failed(t, step="reserve", message=problem)
    assert json.loads(t.state) == ORIGINAL


def test_done_with_an_oversized_result_fails(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, max_payload_bytes=50), Done("x" * 100), {})
    assert_failed(t, step="reserve", message="over the limit of 50")


def test_fail_with_a_reason(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, "pay"), Fail("card declined"), {"s": 1})
    error = assert_failed(t, step="pay", message="card declined", error_type="Fail")
    assert error == {"type": "Fail", "message": "card declined", "reason": "card declined"}
    assert json.loads(t.state) == {"s": 1}


@pytest.mark.parametrize("reason", [None, "", "   "])
def test_fail_without_a_reason_still_says_what_happened(wf: Workflow, reason: Any) -> None:
    t = outcomes.decide(visit(wf, "pay"), Fail(reason), {})
    error = json.loads(t.error or "null")
    assert error["type"] == "Fail"
    assert error["message"] == "step 'pay' returned Fail without a reason"


def test_fail_with_a_json_reason_keeps_it(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Fail({"code": 402}), {})
    assert error_of(t)["reason"] == {"code": 402}


def test_fail_with_a_non_json_reason_stores_its_repr(wf: Workflow) -> None:
    class Reason:
        def __repr__(self) -> str:
            return "<Reason declined>"

    t = outcomes.decide(visit(wf), Fail(Reason()), {})
    error = assert_failed(t, step="reserve", message="<Reason declined>", error_type="Fail")
    assert error["reason"] == "<Reason declined>"


def test_fail_with_a_nul_reason_is_still_storable(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Fail("bad\x00byte"), {})
    assert t.status == "failed"
    assert "\\x00" in error_of(t)["reason"]


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("state", [[1, 2], "text", 3, None])
def test_state_that_is_not_a_dict_fails(wf: Workflow, state: Any) -> None:
    t = outcomes.decide(visit(wf), None, state)
    assert_failed(t, step="reserve", message="state must be a JSON object")
    assert json.loads(t.state) == ORIGINAL


def test_outcome_state_that_is_not_a_dict_fails(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), Next("pay", state=["x"]), {})
    assert_failed(t, step="reserve", message="state must be a JSON object (dict), not list")


def test_state_that_is_not_json_fails(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf), None, {"when": datetime(2030, 1, 1)})
    assert_failed(t, step="reserve", message="state['when'] is a datetime")
    assert json.loads(t.state) == ORIGINAL


def test_oversized_state_fails(wf: Workflow) -> None:
    t = outcomes.decide(visit(wf, max_payload_bytes=40), {"big": "x" * 100}, {})
    assert_failed(t, step="reserve", message="over the limit of 40")


# ----------------------------------------------------------------------------- exceptions


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_exception_is_retried_per_the_policy(wf: Workflow) -> None:
    # reserve: max_attempts=3, linear, delay=2, no jitter.
    t = outcomes.from_exception(visit(wf, attempt=0), raised(KeyError("sku")))
    assert (t.status, t.step, t.next_step, t.outcome) == ("runnable", "reserve", "reserve",
                                                         "retry")
    assert t.attempt == 1
    assert t.delay == 2.0
    assert t.publish is False
    assert t.consume is False
    assert json.loads(t.state) == ORIGINAL  # the step's own changes are rolled back
    error = error_of(t)
    assert error["type"] == "KeyError"
    assert error["message"] == "'sku'"
    assert "KeyError" in error["traceback"]
    assert "attempts" not in error

    t = outcomes.from_exception(visit(wf, attempt=1), raised(KeyError("sku")))
    assert (t.status, t.attempt, t.delay) == ("runnable", 2, 4.0)


def test_exception_after_max_attempts_fails_with_the_count(wf: Workflow) -> None:
    t = outcomes.from_exception(visit(wf, attempt=2), raised(ValueError("still broken")))
    error = assert_failed(t, step="reserve", message="still broken", error_type="ValueError")
    assert error["attempts"] == 3
    assert json.loads(t.state) == ORIGINAL


def test_exception_with_the_default_policy_fails_at_once(wf: Workflow) -> None:
    assert wf.steps["pay"].retry == RetryPolicy()
    t = outcomes.from_exception(visit(wf, "pay"), raised(RuntimeError("boom")))
    error = assert_failed(t, step="pay", message="boom", error_type="RuntimeError")
    assert error["attempts"] == 1


def test_exception_messages_with_nul_are_stored_escaped(wf: Workflow) -> None:
    t = outcomes.from_exception(visit(wf, "pay"), raised(RuntimeError("a\x00b")))
    assert error_of(t)["message"] == "a\\0b"


def test_long_tracebacks_are_truncated(wf: Workflow) -> None:
    def deep(n: int) -> None:
        if n == 0:
            raise RuntimeError("bottom")
        deep(n - 1)

    try:
        deep(300)
    except RuntimeError as exc:
        t = outcomes.from_exception(visit(wf, "pay"), exc)
    error = error_of(t)
    assert len(error["traceback"]) <= outcomes.MAX_TRACEBACK
    assert error["traceback"].rstrip().endswith("RuntimeError: bottom")


def test_invalid_fails_with_the_message_and_original_state(wf: Workflow) -> None:
    t = outcomes.invalid(visit(wf, "ship", attempt=1), "returned garbage")
    error = assert_failed(t, step="ship", message="returned garbage")
    assert error == {"type": "InvalidOutcome", "message": "returned garbage"}
    assert json.loads(t.state) == ORIGINAL
    assert t.attempt == 1


class Unprintable(Exception):
    """An exception whose str() itself raises (lazy formatting gone wrong)."""

    def __str__(self) -> str:
        raise RuntimeError("cannot format this error")


def test_an_exception_that_cannot_be_printed_still_gives_a_transition(wf: Workflow) -> None:
    # The executor calls from_exception outside any try: if it raises, the run stays
    # 'executing' under a live owner whose heartbeat keeps the reaper away (wedged).
    t = outcomes.from_exception(visit(wf, "pay"), raised(Unprintable()))
    error = assert_failed(t, step="pay", message="", error_type="Unprintable")
    assert error["attempts"] == 1


def test_a_step_with_time_limits_is_never_reached_by_run_ahead(fake_durable: FakeDurable) -> None:
    wf = Workflow(owner=fake_durable, name="bounded")  # type: ignore[arg-type]

    @wf.step
    def first(ctx: Any) -> Any: ...

    @wf.step(soft_time_limit=1.0, time_limit=2.0)
    def second(ctx: Any) -> Any: ...

    plain = outcomes.decide(visit(wf, "first", run_ahead=True), None, {})
    forced = outcomes.decide(visit(wf, "first", run_ahead=True), Next("second", run_ahead=True),
                             {})
    for t in (plain, forced):
        assert (t.status, t.step, t.publish) == ("runnable", "second", True)


@pytest.mark.parametrize("options", [
    {"time_limit": 0}, {"soft_time_limit": -1}, {"time_limit": "1"},
    {"time_limit": 1.0, "soft_time_limit": 1.0}, {"time_limit": 1.0, "soft_time_limit": 2.0}])
def test_bad_step_time_limits(fake_durable: FakeDurable, options: dict[str, Any]) -> None:
    wf = Workflow(owner=fake_durable, name="bad")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        wf.step(**options)(lambda ctx: None)
