"""Run-ahead: a Next to a step on the same queue continues under the same claim (one commit
per step, no broker hop); ``run_ahead=False`` publishes every step."""

from __future__ import annotations

from tests.integration.support import rows, run_row


def declare_pipeline(durable, *, run_ahead=None):
    wf = durable.workflow("five", run_ahead=run_ahead)
    names = ["s1", "s2", "s3", "s4", "s5"]

    def make(name):
        def step(ctx):
            ctx.state.setdefault("trail", []).append(name)
            return ctx.state["trail"] if name == "s5" else None

        step.__name__ = name
        return step

    for name in names:
        wf.step(make(name))
    return wf


def test_pipeline_runs_as_one_claim(durable, published, db_engine):
    wf = declare_pipeline(durable)
    wid = wf.start()
    ahead_before = durable.stats().get("run_ahead", 0)

    assert durable.executor.execute(wid, 0) == "committed"

    assert [(m.name, m.args) for m in published.sent] == [("durable.five.s1", [wid, 0])]
    history = rows(db_engine, "SELECT seq, step, outcome, worker FROM {S}.steps "
                              "WHERE run_id = :id ORDER BY seq", id=wid)
    assert [(h["seq"], h["step"], h["outcome"]) for h in history] == [
        (1, "s1", "next"), (2, "s2", "next"), (3, "s3", "next"), (4, "s4", "next"),
        (5, "s5", "done")]
    assert len({h["worker"] for h in history}) == 1
    assert durable.stats().get("run_ahead", 0) - ahead_before == 4
    assert run_row(db_engine, wid)["seq"] == 5
    assert durable.wait_result(wid, timeout=1) == ["s1", "s2", "s3", "s4", "s5"]


def test_run_ahead_false_publishes_every_step(durable, published, db_engine):
    wf = declare_pipeline(durable, run_ahead=False)
    wid = wf.start()

    for seq in range(5):
        assert durable.executor.execute(wid, seq) == "committed"
        row = run_row(db_engine, wid)  # one step per message, never two
        assert (row["seq"], row["status"]) == (seq + 1, "runnable" if seq < 4 else "done")

    assert [(m.name, m.args) for m in published.sent] == [
        (f"durable.five.s{i + 1}", [wid, i]) for i in range(5)]
    assert durable.wait_result(wid, timeout=1) == ["s1", "s2", "s3", "s4", "s5"]
