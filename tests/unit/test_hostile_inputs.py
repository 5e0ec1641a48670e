"""Hostile input to the pure entry points: settings, identifiers, signal names, durations,
retry options, declarations and the outcomes a step returns. Each either works or raises
the documented typed error (a DurableCeleryError); nothing else escapes."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import fields
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from durable_celery import checks, errors
from durable_celery import settings as settings_mod
from durable_celery.checks import check_identifier
from durable_celery.definitions import (
    MAX_SECONDS,
    Await,
    Done,
    Fail,
    Next,
    Retry,
    RetryPolicy,
    Sleep,
    Workflow,
    check_name,
    check_seconds,
)
from durable_celery.runtime import outcomes
from tests.unit.fakes import FakeDurable

FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


class Exploding:
    """A user object whose conversions and comparisons raise (its repr works)."""

    def _explode(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("exploding object")

    __iter__ = __str__ = __float__ = __index__ = __len__ = __bool__ = _explode  # type: ignore
    __lt__ = __gt__ = __le__ = __ge__ = _explode  # type: ignore

    def __repr__(self) -> str:
        return "<Exploding>"


ODD_TEXT = st.sampled_from(["", " ", "\t\n", "x" * 201, "a\x00b", "a\ud800b", "\udfff",
                            "é✓", "order:42", "DROP TABLE runs; --", "${jndi}", "\u202e"])
ODD_NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -10**400, 2**63,
                               -1, 0, 1e-320, 1e300, MAX_SECONDS, MAX_SECONDS * 2])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
                    st.binary(max_size=8), ODD_TEXT, ODD_NUMBERS,
                    st.sampled_from([object(), {1, 2}, datetime(2030, 1, 1),
                                     datetime(9999, 12, 31, tzinfo=timezone.utc),
                                     timedelta(days=1), len]))
HOSTILE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(), st.none(), ODD_TEXT),
                        inner, max_size=3)),
    max_leaves=8)


ODD = st.one_of(ODD_TEXT, ODD_NUMBERS, HOSTILE)


def storable_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ----------------------------------------------------------------------------- settings

SETTING_NAMES = [f.name for f in fields(settings_mod.Settings)]
DURATIONS = ("heartbeat_interval", "stale_after", "sweep_interval", "redispatch_after",
             "redispatch_max_backoff")
COUNTS = ("gc_batch_size", "sweep_batch_size", "max_recoveries", "max_payload_bytes",
          "run_ahead_limit", "pool_size")


@FAST
@given(st.dictionaries(st.sampled_from(SETTING_NAMES),
                       st.one_of(SCALARS, st.timedeltas()), max_size=4))
@example({"retention": math.inf})
@example({"stale_after": 1e300})
@example({"gc_batch_size": math.inf})
def test_settings_build_or_raise_configuration_error(overrides: dict[str, Any]) -> None:
    try:
        built = settings_mod.build(overrides, env={})
    except errors.ConfigurationError:
        return
    # Accepted settings are usable: every duration is a finite number of seconds that
    # Postgres intervals hold, so no later statement fails because of a setting.
    for name in DURATIONS:
        value = getattr(built, name)
        assert isinstance(value, float) and math.isfinite(value) and 0 < value <= MAX_SECONDS, \
            (name, value)
    assert 0 < built.retention.total_seconds() <= MAX_SECONDS, built.retention
    for name in COUNTS:
        value = getattr(built, name)
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, (name, value)


@FAST
@given(st.dictionaries(st.sampled_from(SETTING_NAMES).map(lambda n: f"DURABLE_CELERY_{n.upper()}"),
                       st.one_of(st.text(max_size=12), ODD_TEXT.filter(storable_utf8),
                                 ODD_NUMBERS.map(str)), max_size=4))
@example({"DURABLE_CELERY_RETENTION": "inf"})
def test_settings_from_the_environment_build_or_raise_configuration_error(
        env: dict[str, str]) -> None:
    with contextlib.suppress(errors.ConfigurationError):
        settings_mod.build({}, env=env)


# ----------------------------------------------------------------------------- checks


@FAST
@given(ODD)
@example("a\ud800b")
def test_identifiers_are_storable_strings_or_refused(value: Any) -> None:
    try:
        checked = check_identifier(value, "key")
    except errors.InvalidArgument:
        return
    assert isinstance(checked, str) and checked.strip() and len(checked) <= 200
    assert "\x00" not in checked
    assert storable_utf8(checked), f"accepted {checked!r}, which the database cannot store"


@FAST
@given(ODD)
@example("a\ud800b")
def test_signal_names_are_storable_strings_or_refused(value: Any) -> None:
    try:
        checked = checks.check_signal_name(value)
    except errors.InvalidArgument:
        return
    assert isinstance(checked, str) and storable_utf8(checked), \
        f"accepted {checked!r}, which the database cannot store"


@FAST
@given(ODD)
@example(10**400)
def test_durations_are_bounded_numbers_or_refused(value: Any) -> None:
    try:
        seconds = check_seconds(value, "delay")
    except errors.InvalidArgument:
        return
    assert math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS


@FAST
@given(ODD)
def test_names_are_checked(value: Any) -> None:
    try:
        check_name(value, "queue")
    except errors.InvalidArgument:
        return
    assert isinstance(value, str) and value.isascii() and 1 <= len(value) <= 100


@FAST
@given(st.one_of(HOSTILE, st.dictionaries(
    st.sampled_from(["max_attempts", "backoff", "delay", "max_delay", "jitter", "other"]),
    HOSTILE, max_size=4)))
@example({"": None, None: None})
def test_retry_options_parse_or_raise_invalid_argument(options: Any) -> None:
    try:
        policy = RetryPolicy.parse(options)
    except errors.InvalidArgument:
        return
    for attempts in (1, 2, 10, 10**6):
        delay = policy.delay_after(attempts)
        assert math.isfinite(delay) and 0 <= delay <= MAX_SECONDS


@FAST
@given(name=ODD, retry=ODD, queue=ODD, run_ahead=ODD)
@example(name=None, retry=None, queue=None, run_ahead="no")
@example(name=None, retry={"delay": 1, 0: 1}, queue=None, run_ahead=None)
def test_step_options_are_accepted_or_refused_with_invalid_argument(
        name: Any, retry: Any, queue: Any, run_ahead: Any) -> None:
    wf = Workflow(owner=FakeDurable(), name="hostile")  # type: ignore[arg-type]

    def fn(ctx: Any) -> Any:
        return None

    try:
        wf.step(name=name, retry=retry, queue=queue, run_ahead=run_ahead)(fn)
    except errors.InvalidArgument:
        assert wf.steps == {}
        return
    [step] = wf.steps.values()
    assert step.run_ahead is None or isinstance(step.run_ahead, bool), (
        f"run_ahead={run_ahead!r} was accepted; it must be a bool or None")


# ----------------------------------------------------------------------------- outcomes


def build_workflow() -> Workflow:
    wf = Workflow(owner=FakeDurable(), name="shop")  # type: ignore[arg-type]

    @wf.step
    def reserve(ctx: Any) -> Any: ...

    @wf.step
    def pay(ctx: Any) -> Any: ...

    return wf


WF = build_workflow()
STEP_REF = st.one_of(st.sampled_from(["reserve", "pay", "missing"]), ODD)
OUTCOMES = st.one_of(
    ODD,
    st.builds(Next, STEP_REF, state=ODD),
    st.builds(Retry, delay=ODD, state=ODD),
    st.builds(Retry, delay=ODD),
    st.builds(Sleep, seconds=ODD, until=ODD, next=st.one_of(st.none(), STEP_REF)),
    st.builds(Sleep, seconds=ODD),
    st.builds(Await, ODD, next=st.one_of(st.none(), STEP_REF), timeout=ODD),
    st.builds(Await, st.one_of(ODD_TEXT, st.lists(ODD_TEXT, max_size=3))),
    st.builds(Done, ODD),
    st.builds(Done, ODD, state=ODD),
    st.builds(Fail, ODD),
)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(returned=OUTCOMES, state_after=HOSTILE, step=st.sampled_from(["reserve", "pay"]))
@example(returned=Await("a\ud800b"), state_after={}, step="reserve")
def test_any_returned_value_becomes_a_storable_transition(returned: Any, state_after: Any,
                                                          step: str) -> None:
    """Whatever a step returns, deciding never raises: garbage fails the run with a clear
    error (never hands the run back to be re-run with the same garbage)."""
    visit = outcomes.Visit(workflow=WF, step=WF.steps[step], attempt=0, queue="default",
                           run_queue=None, original_state={"committed": True},
                           max_payload_bytes=100_000, run_ahead=False)
    t = outcomes.decide(visit, returned, state_after)
    for text in (t.state, t.result, t.error):
        if text is not None:
            text.encode("utf-8")
            json.loads(text)
    assert isinstance(json.loads(t.state), dict)
    assert math.isfinite(t.delay) and 0 <= t.delay <= MAX_SECONDS
    for name in t.await_names or ():
        assert isinstance(name, str) and storable_utf8(name) and "\x00" not in name
    if t.status == "failed":
        error = json.loads(t.error or "null")
        assert error["type"] in ("InvalidOutcome", "Fail") and error["message"]


@pytest.mark.parametrize("returned", [
    Retry(delay=10**400), Sleep(seconds=10**400), Await("go", timeout=10**400),
    Await("a\ud800b"), Await(["go", "\udfff"]), Await(Exploding()), Next(Exploding()),
    Sleep(seconds=Exploding()), Done({"k": "\ud800"}),
], ids=["retry-huge-int", "sleep-huge-int", "await-timeout-huge-int", "await-surrogate",
        "await-surrogate-in-list", "await-exploding-names", "next-exploding-step",
        "sleep-exploding-seconds", "done-surrogate"])
def test_hostile_outcomes_fail_the_run_instead_of_escaping(returned: Any) -> None:
    """Anything that escapes ``decide`` hands the run back to be run again with the same
    result: an endless loop. Each of these must fail the run with InvalidOutcome."""
    visit = outcomes.Visit(workflow=WF, step=WF.steps["reserve"], attempt=0, queue="default",
                           run_queue=None, original_state={"committed": True},
                           max_payload_bytes=100_000, run_ahead=False)
    t = outcomes.decide(visit, returned, {})
    assert t.status == "failed"
    assert json.loads(t.error or "null")["type"] == "InvalidOutcome"
