"""The Celery side: every step is a task named ``durable.<workflow>.<step>`` with the JSON
serializer; the built-in tasks of one app belong to that app's Durable only."""

from __future__ import annotations

import pytest

from durable_celery import Done
from durable_celery.testing import drain


def declare(durable, name):
    wf = durable.workflow(name, queue=f"{name}-queue")

    @wf.step
    def first(ctx):
        return None

    @wf.step
    def second(ctx):
        return Done(name)

    return wf


def test_the_app_finalizes_with_steps_declared(durable):
    """A ``celery worker`` finalizes the app: that must work (pytest turns warnings into
    errors here, so a deprecated task option fails this test too)."""
    declare(durable, "registered")

    tasks = durable.app.tasks
    for step in ("first", "second"):
        task = tasks[f"durable.registered.{step}"]
        assert task.serializer == "json"
        assert task.ignore_result is True
    assert "durable_celery.start" in tasks
    assert "durable_celery.signal" in tasks


@pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")
def test_each_app_gets_only_its_own_tasks(make_durable, recorder):
    one, two = make_durable(), make_durable()
    declare(one, "only_in_one")
    declare(two, "only_in_two")
    recorder(one, two)

    tasks = two.app.tasks
    assert not [name for name in tasks if name.startswith("durable.only_in_one.")]
    wid = tasks["durable_celery.start"].run(workflow="only_in_two", state={})
    assert wid is not None
    drain(two)
    assert two.wait_result(wid, timeout=1) == "only_in_two"
