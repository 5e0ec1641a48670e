"""The test kit: drain and friends."""

from __future__ import annotations

from durable_celery import Done
from durable_celery.testing import drain


def test_drain_ends_when_nothing_can_progress(durable, make_durable, published):
    other = make_durable()
    wf = other.workflow("elsewhere")

    @wf.step
    def only(ctx):
        return Done()

    wf.start()  # runnable, but `durable` has no such workflow registered
    tally = drain(durable)
    assert tally["released"] >= 1
    assert tally["steps"] == 0
