"""Run-ahead opt-outs: per workflow, per step, per transition (``Next(..., run_ahead=)``);
the transition's choice wins. Every opt-out publishes a message for the next step."""

from __future__ import annotations

from durable_celery import Done, Next
from tests.integration.support import run_row


def declare(durable, *, wf_ahead=None, step_ahead=None, next_ahead=None):
    wf = durable.workflow("hop", run_ahead=wf_ahead)

    @wf.step
    def first(ctx):
        return Next("second", run_ahead=next_ahead)

    @wf.step(run_ahead=step_ahead)
    def second(ctx):
        return Done(ctx.attempt)

    return wf


def hops(durable, published, wid) -> list[str]:
    """Run the first message; the names of the messages published after it."""
    published.clear()
    assert durable.executor.execute(wid, 0) == "committed"
    return published.names()


def test_default_runs_ahead(durable, published, db_engine):
    wid = declare(durable).start()
    assert hops(durable, published, wid) == []
    assert run_row(db_engine, wid)["status"] == "done"


def test_next_run_ahead_false_publishes(durable, published, db_engine):
    wid = declare(durable, next_ahead=False).start()
    assert hops(durable, published, wid) == ["durable.hop.second"]
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["seq"]) == ("runnable", "second", 1)
    assert durable.executor.execute(wid, 1) == "committed"
    assert durable.wait_result(wid, timeout=1) == 0


def test_step_run_ahead_false_publishes(durable, published, db_engine):
    wid = declare(durable, step_ahead=False).start()
    assert hops(durable, published, wid) == ["durable.hop.second"]


def test_next_run_ahead_true_overrides_the_workflow(durable, published, db_engine):
    wid = declare(durable, wf_ahead=False, next_ahead=True).start()
    assert hops(durable, published, wid) == []
    assert run_row(db_engine, wid)["status"] == "done"


def test_setting_off_beats_next_run_ahead_true(make_durable, db_engine):
    from tests.integration.support import Recorder

    durable = make_durable(run_ahead=False)
    recorder = Recorder()
    durable.app.send_task = recorder  # instance attribute, dropped with the app
    wid = declare(durable, next_ahead=True).start()
    recorder.clear()
    assert durable.executor.execute(wid, 0) == "committed"
    assert recorder.names() == ["durable.hop.second"]


def test_a_bad_run_ahead_value_fails_the_run(durable, published):
    wf = durable.workflow("bad")

    @wf.step
    def first(ctx):
        return Next("second", run_ahead="yes")

    @wf.step
    def second(ctx):
        return None

    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    run = durable.get_workflow(wid)
    assert run.status == "failed" and "run_ahead" in run.error["message"]
