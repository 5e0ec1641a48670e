"""definitions: names, declaring steps, and looking them up."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery import _state as celery_state
from celery.exceptions import DuplicateTaskNameWarning

from durable_celery import Durable
from durable_celery.checks import check_name
from durable_celery.coordinator import bootstep
from durable_celery.definitions import RetryPolicy, Step, Workflow
from durable_celery.errors import InvalidArgument, UnknownStep
from tests.unit.fakes import FakeDurable

# ----------------------------------------------------------------------------- check_name


@pytest.mark.parametrize("name", [
    "a", "_", "checkout", "Checkout_2", "orders.v2", "ns:step", "with-dash", "a" * 100,
    "_private.x:y-z",
])
def test_valid_names(name: str) -> None:
    assert check_name(name, "workflow name") == name


@pytest.mark.parametrize("name", [
    "", "1abc", "-x", ".x", ":x", "has space", "slash/name", "a" * 101, "é", "tab\there",
    "star*", "nul\x00",
])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="step name must be 1-100 characters"):
        check_name(name, "step name")


@pytest.mark.parametrize("name", ["abc\n", "abc\r\n", "\nabc"])
def test_names_with_newlines_are_invalid(name: str) -> None:
    # A trailing newline must not slip through ('$' in a regex matches before a final '\n').
    with pytest.raises(InvalidArgument, match="must be 1-100 characters"):
        check_name(name, "workflow name")


@pytest.mark.parametrize("name", [None, 5, b"bytes", ["x"]])
def test_non_string_names(name: Any) -> None:
    with pytest.raises(InvalidArgument, match=f"queue must be .*got {re.escape(repr(name))}"):
        check_name(name, "queue")


# ----------------------------------------------------------------------------- declaring


@pytest.fixture
def wf(fake_durable: FakeDurable) -> Workflow:
    return Workflow(owner=fake_durable, name="shop", queue="orders")  # type: ignore[arg-type]


def test_steps_are_declared_in_order_and_registered(wf: Workflow,
                                                   fake_durable: FakeDurable) -> None:
    @wf.step
    def reserve(ctx: Any) -> Any:
        return "reserved"

    @wf.step(name="charge-card", retry={"max_attempts": 3}, queue="payments", run_ahead=False)
    def charge(ctx: Any) -> Any: ...

    assert list(wf.steps) == ["reserve", "charge-card"]
    assert reserve(None) == "reserved"  # returned unchanged, callable directly in tests
    first, second = wf.steps.values()
    assert (first.index, first.fn, first.retry, first.queue) == (0, reserve, RetryPolicy(), None)
    assert (second.index, second.fn, second.queue, second.run_ahead) == (
        1, charge, "payments", False)
    assert second.retry == RetryPolicy(max_attempts=3)
    assert fake_durable.registered == [("shop", "reserve"), ("shop", "charge-card")]


def test_duplicate_step_names_are_rejected(wf: Workflow, fake_durable: FakeDurable) -> None:
    @wf.step
    def pay(ctx: Any) -> Any: ...

    def other(ctx: Any) -> Any: ...

    with pytest.raises(InvalidArgument, match="workflow 'shop' v1 already has a step 'pay'"):
        wf.step(name="pay")(other)
    assert wf.steps["pay"].fn is pay  # the first declaration stands
    assert fake_durable.registered == [("shop", "pay")]


@pytest.mark.parametrize("name", ["bad name", "9lives", "x" * 101])
def test_bad_step_names_are_rejected(wf: Workflow, name: str) -> None:
    def fn(ctx: Any) -> Any: ...

    with pytest.raises(InvalidArgument, match="step name must be"):
        wf.step(name=name)(fn)
    assert wf.steps == {}


def test_lambda_steps_need_a_name(wf: Workflow) -> None:
    with pytest.raises(InvalidArgument, match="got '<lambda>'"):
        wf.step(lambda ctx: None)
    wf.step(name="anon")(lambda ctx: None)
    assert list(wf.steps) == ["anon"]


def test_bad_step_options_are_rejected_at_declaration(wf: Workflow) -> None:
    with pytest.raises(InvalidArgument, match="unknown retry option"):
        wf.step(retry={"retries": 3})  # type: ignore[call-overload]
    with pytest.raises(InvalidArgument, match="queue must be"):
        wf.step(queue="no spaces")


def test_non_callables_are_rejected(wf: Workflow) -> None:
    with pytest.raises(InvalidArgument, match="a step must be callable"):
        wf.step(name="x")(42)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- lookups


@pytest.fixture
def three(wf: Workflow) -> Workflow:
    @wf.step
    def a(ctx: Any) -> Any: ...

    @wf.step(queue="special")
    def b(ctx: Any) -> Any: ...

    @wf.step
    def c(ctx: Any) -> Any: ...

    return wf


def test_first_is_the_first_declared_step(three: Workflow) -> None:
    assert three.first.name == "a"


def test_first_of_an_empty_workflow(wf: Workflow) -> None:
    with pytest.raises(InvalidArgument, match="workflow 'shop' has no steps"):
        _ = wf.first


def test_resolve_by_name_function_or_step(three: Workflow) -> None:
    b = three.steps["b"]
    assert three.resolve("b") is b
    assert three.resolve(b.fn) is b
    assert three.resolve(b) is b


def test_resolve_unknown_name(three: Workflow) -> None:
    with pytest.raises(UnknownStep, match=r"workflow 'shop' v1 has no step 'z'; "
                                          r"steps: \['a', 'b', 'c'\]") as info:
        three.resolve("z")
    assert info.value.details == {"workflow": "shop", "step": "z"}
    assert info.value.status == 404


def test_resolve_unknown_function(three: Workflow) -> None:
    def stranger(ctx: Any) -> Any: ...

    with pytest.raises(UnknownStep, match="has no step 'stranger'"):
        three.resolve(stranger)


def test_resolve_is_per_workflow(three: Workflow, fake_durable: FakeDurable) -> None:
    other = Workflow(owner=fake_durable, name="other")  # type: ignore[arg-type]

    @other.step
    def a(ctx: Any) -> Any: ...

    with pytest.raises(UnknownStep):
        three.resolve(a)  # same name, different function


def test_after(three: Workflow) -> None:
    a, b, c = three.steps.values()
    assert three.after(a) is b
    assert three.after(b) is c
    assert three.after(c) is None


def test_queue_for_precedence(three: Workflow, fake_durable: FakeDurable) -> None:
    a, b = three.steps["a"], three.steps["b"]
    assert three.queue_for(b, "vip") == "special"  # the step's own queue
    assert three.queue_for(a, "vip") == "vip"      # then the run's
    assert three.queue_for(a) == "orders"          # then the workflow's
    bare = Workflow(owner=fake_durable, name="bare")  # type: ignore[arg-type]
    assert bare.queue_for(a) == "default"          # then the app's default


def test_task_name(three: Workflow) -> None:
    assert three.task_name(three.steps["a"]) == "durable.shop.a"
    assert three.task_name("b") == "durable.shop.b"


def test_step_calls_its_function() -> None:
    step = Step(name="s", fn=lambda ctx: ctx * 2, index=0, retry=RetryPolicy())
    assert step(21) == 42


# ----------------------------------------------------------------------------- Durable.workflow


@pytest.fixture
def celery_apps() -> Iterator[Callable[[str], Celery]]:
    """Celery apps for Durable. The process-wide registries (Celery's shared tasks, the
    bootstep's Durable instances) are restored afterwards, so nothing made here leaks into
    later tests."""
    saved = set(celery_state._on_app_finalizers)
    saved_instances = list(bootstep._instances)
    apps: list[Celery] = []

    def make(name: str) -> Celery:
        app = Celery(name, broker="memory://", set_as_current=False)
        app.conf.task_default_queue = name
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
    celery_state._on_app_finalizers.clear()
    celery_state._on_app_finalizers.update(saved)
    bootstep._instances[:] = saved_instances


@pytest.fixture
def durable(celery_apps: Callable[[str], Celery]) -> Durable:
    # Constructing a Durable opens no connection (the engine is created on first use).
    return Durable(celery_apps("unit"), database_url="postgresql://nobody@127.0.0.1:1/none")


@pytest.mark.parametrize("name", ["bad name", "", "1st", "x" * 101, "trailing\n"])
def test_workflow_names_are_checked(durable: Durable, name: str) -> None:
    with pytest.raises(InvalidArgument, match="workflow name must be"):
        durable.workflow(name)


@pytest.mark.parametrize("version", [0, -1, "1", True, 1.0])
def test_workflow_versions_are_checked(durable: Durable, version: Any) -> None:
    with pytest.raises(InvalidArgument, match="version must be an int in 1"):
        durable.workflow("shop", version=version)


def test_workflow_declared_twice_is_rejected(durable: Durable) -> None:
    durable.workflow("shop")
    durable.workflow("shop", version=2)
    with pytest.raises(InvalidArgument, match="workflow 'shop' v1 is already declared"):
        durable.workflow("shop")


def test_queues_fall_back_to_the_celery_default_queue(durable: Durable) -> None:
    wf = durable.workflow("shop", queue="orders")

    @wf.step
    def reserve(ctx: Any) -> Any: ...

    assert wf.queue_for(wf.first) == "orders"
    assert durable.workflow("bare").queue_for(wf.first) == "unit"


def test_step_tasks_stay_in_their_own_celery_app(celery_apps: Callable[[str], Celery]) -> None:
    # Two Durable instances in one process (two Celery apps, e.g. two tenants, or a test
    # suite). Each app must run its own steps with its own Durable (its own database).
    durable_a = Durable(celery_apps("a"), database_url="postgresql://nobody@127.0.0.1:1/a")

    @durable_a.workflow("shop").step
    def reserve(ctx: Any) -> Any: ...

    durable_b = Durable(celery_apps("b"), database_url="postgresql://nobody@127.0.0.1:1/b")
    with warnings.catch_warnings(record=True) as caught:
        # Only duplicate-task warnings matter here (finalizing may warn about other things).
        warnings.simplefilter("always")
        tasks_b = set(durable_b.app.tasks)  # finalizes app b
        tasks_a = set(durable_a.app.tasks)
    assert "durable.shop.reserve" not in tasks_b, (
        "app b received app a's step task, bound to durable_a and its database"
    )
    assert "durable.shop.reserve" in tasks_a
    assert {"durable_celery.signal", "durable_celery.start"} <= tasks_a & tasks_b
    duplicates = [str(w.message).splitlines()[0] for w in caught
                  if issubclass(w.category, DuplicateTaskNameWarning)]
    assert duplicates == []
