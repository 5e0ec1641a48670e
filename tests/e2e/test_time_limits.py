"""Celery's time limits are per step (finding 7): a task that could run several steps
ahead runs one under a time limit, so every step gets a fresh limit; a step longer than
the limit is still cut off, and goes through its retry policy like any failure."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_a_soft_limit_covers_each_step_not_the_chain(e2e):
    e2e.worker("prefork", 2, extra_args=["--soft-time-limit", "2"])
    # Five steps of 0.8 s: 4 s in all, each one well inside the 2 s limit.
    wid = e2e.start("pipeline", {"x": 1, "pause": 0.8})
    run = e2e.wait_status(wid, "done", timeout=60)
    assert run.result == {"x": 1, "trail": ["s1", "s2", "s3", "s4", "s5"]}
    history = [(h.step, h.outcome, h.error) for h in e2e.durable.workflow_steps(wid)]
    assert [h[:2] for h in history] == [("s1", "next"), ("s2", "next"), ("s3", "next"),
                                        ("s4", "next"), ("s5", "done")]


def test_a_step_longer_than_the_limit_is_still_cut_off(e2e):
    e2e.worker("prefork", 1, extra_args=["--soft-time-limit", "1"])
    wid = e2e.start("pipeline", {"x": 2, "pause": 1.5})
    run = e2e.wait_status(wid, "failed", timeout=60)
    assert run.error["type"] == "SoftTimeLimitExceeded"
    assert [h.step for h in e2e.durable.workflow_steps(wid)] == ["s1"]


def test_a_steps_own_soft_limit_fails_the_attempt_and_the_retry_succeeds(e2e):
    e2e.worker("prefork", 2)  # no worker-wide limit: the step declares its own
    wid = e2e.start("bounded", {"pause": 3})
    run = e2e.wait_status(wid, "done", timeout=60)
    assert run.result == {"attempt": 1}
    history = [(h.step, h.outcome, (h.error or {}).get("type"))
               for h in e2e.durable.workflow_steps(wid)]
    # lead_in did not run ahead into capped (published as its own task, with its limits);
    # the first attempt was cut off by the soft limit after 1 s, not the 3 s it wanted.
    assert history == [("lead_in", "next", None), ("capped", "retry", "SoftTimeLimitExceeded"),
                       ("capped", "done", None)]
    first = e2e.durable.workflow_steps(wid)[1]
    assert (first.finished_at - first.started_at).total_seconds() < 2.5
