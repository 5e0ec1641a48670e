"""Spawn and the join: children start in the transaction that parks the parent; each child's
terminal transition counts on the parent in the same transaction; the last one wakes it
exactly once (real Postgres, inline execution through the real claim/commit code)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from durable_celery import Await, Done, Fail, Spawn, foreach, parallel
from durable_celery.storage.records import Transition
from durable_celery.testing import drain
from tests.integration.support import (
    Recorder,
    execute_sql,
    rows,
    run_row,
    scalar,
    start_threads,
)

DEAD = "dead-host:1:spawn"


def children_of(engine, parent):
    return rows(engine, "SELECT id, status, held, child_index, spawn_seq FROM {S}.runs "
                        "WHERE parent_id = :p ORDER BY child_index", p=parent)


def declare_family(durable, child_step=None):
    """``parent`` spawns one ``child`` per entry of state["items"], then reports them."""
    child = durable.workflow("child")

    @child.step
    def work(ctx):
        if child_step is not None:
            return child_step(ctx)
        if ctx.state.get("fail"):
            return Fail(f"child {ctx.state['n']} refused")
        return Done({"n": ctx.state["n"] * 10})

    parent = durable.workflow("parent")

    @parent.step
    def fan_out(ctx):
        return Spawn([child.child({"n": n, "fail": n in ctx.state.get("fail", [])})
                      for n in ctx.state["items"]], next="join")

    @parent.step
    def join(ctx):
        return Done([{"index": c.index, "workflow_id": c.workflow_id, "workflow": c.workflow,
                      "status": c.status, "result": c.result,
                      "error": c.error and c.error["message"]} for c in ctx.children])

    return parent, child


def test_children_are_reported_in_spawn_order_with_failures(durable, published, db_engine):
    parent, _ = declare_family(durable)
    wid = parent.start({"items": [3, 1, 2], "fail": [1]})
    drain(durable)
    result = durable.wait_result(wid, timeout=5)
    assert [(c["index"], c["workflow"], c["status"], c["result"], c["error"]) for c in result] \
        == [(0, "child", "done", {"n": 30}, None), (1, "child", "failed", None,
                                                     "child 1 refused"),
            (2, "child", "done", {"n": 20}, None)]
    kids = children_of(db_engine, wid)
    assert [k["id"] for k in kids] == [c["workflow_id"] for c in result]
    assert {k["spawn_seq"] for k in kids} == {1}
    assert run_row(db_engine, wid)["children_pending"] == 0
    assert [s.outcome for s in durable.workflow_steps(wid)] == ["spawn", "done"]


def test_the_counter_counts_down_and_the_last_child_wakes_the_parent(durable, published,
                                                                     db_engine):
    parent, _ = declare_family(durable, child_step=lambda ctx: Await("go", next="finish"))
    child = durable.get_definition("child")

    @child.step
    def finish(ctx):
        return Done(ctx.signals[0].payload)

    wid = parent.start({"items": [1, 2, 3]})
    drain(durable)
    run = durable.get_workflow(wid)
    assert (run.status, run.step, run.children_pending) == ("awaiting_children", "join", 3)
    kids = [k["id"] for k in children_of(db_engine, wid)]
    for i, kid in enumerate(kids):
        published.clear()
        durable.signal(kid, "go", i)
        drain(durable)
        run = durable.get_workflow(wid)
        if i < 2:
            assert (run.status, run.children_pending) == ("awaiting_children", 2 - i)
    assert run.status == "done"
    assert [c["result"] for c in run.result] == [0, 1, 2]


def test_zero_children_continue_at_once(durable, published):
    wf = durable.workflow("empty")

    @wf.step
    def fan_out(ctx):
        return Spawn([])

    @wf.step
    def join(ctx):
        return Done({"children": list(ctx.children)})

    wid = wf.start()
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == {"children": []}


def test_spawn_and_park_commit_together(durable, published, db_engine, monkeypatch):
    """Semantic 1: while the parking transaction is open, nobody sees a child; a crash
    between the park and the inserts leaves neither."""
    parent, _ = declare_family(durable)
    wid = parent.start({"items": [1, 2]})
    real = durable.store._insert_children
    seen = []

    def insert_then_look(conn, row, children):
        out = real(conn, row, children)
        with db_engine.connect() as other:  # another session: the transaction is not visible
            seen.append((other.execute(sa.text(
                "SELECT status FROM durable_celery.runs WHERE id = :id"), {"id": wid}).scalar(),
                other.execute(sa.text("SELECT count(*) FROM durable_celery.runs "
                                      "WHERE parent_id = :id"), {"id": wid}).scalar()))
        return out

    monkeypatch.setattr(durable.store, "_insert_children", insert_then_look)
    published.clear()
    durable.executor.execute(wid, 0)
    assert seen == [("executing", 0)]
    assert run_row(db_engine, wid)["status"] == "awaiting_children"
    assert len(children_of(db_engine, wid)) == 2
    # The children were published after the commit, the parent not at all.
    assert sorted(m.args[0] for m in published.sent) == sorted(
        k["id"] for k in children_of(db_engine, wid))


def test_a_crash_between_park_and_insert_leaves_neither(durable, published, db_engine,
                                                        monkeypatch):
    parent, _ = declare_family(durable)
    wid = parent.start({"items": [1, 2, 3]})

    def crash(conn, row, children):
        raise KeyboardInterrupt("killed between the park and the children")

    monkeypatch.setattr(durable.store, "_insert_children", crash)
    with pytest.raises(KeyboardInterrupt):
        durable.executor.execute(wid, 0)
    row = run_row(db_engine, wid)
    assert (row["status"], row["seq"], row["children_pending"]) == ("runnable", 0, 0)
    assert children_of(db_engine, wid) == []
    assert durable.workflow_steps(wid) == []
    monkeypatch.undo()
    Recorder().install(durable, monkeypatch)
    drain(durable)
    assert [c["result"] for c in durable.wait_result(wid, timeout=5)] == [
        {"n": 10}, {"n": 20}, {"n": 30}]
    assert len(children_of(db_engine, wid)) == 3


@pytest.mark.parametrize("round_", range(3))
def test_children_finishing_at_once_wake_the_parent_exactly_once(make_durable, db_engine,
                                                                 monkeypatch, round_):
    """Semantic 2: N children commit at the same moment from N threads (each its own
    connection); the parent is woken once, counted to zero, and published once."""
    n = 8
    barrier = threading.Barrier(n)

    def at_once(ctx):
        barrier.wait(timeout=20)
        if ctx.state["n"] == 3:
            return Fail("one child fails")
        return Done(ctx.state["n"])

    durable = make_durable(pool_size=n + 2)
    sent = Recorder().install(durable, monkeypatch)
    parent, _ = declare_family(durable, child_step=at_once)
    wid = parent.start({"items": list(range(n))})
    assert durable.executor.execute(wid, 0) == "committed"
    kids = [k["id"] for k in children_of(db_engine, wid)]
    assert len(kids) == n and run_row(db_engine, wid)["children_pending"] == n
    sent.clear()
    threads = start_threads([lambda k=k: durable.executor.execute(k, 0) for k in kids])
    assert [t.value(timeout=60) for t in threads] == ["committed"] * n
    row = run_row(db_engine, wid)
    assert (row["status"], row["children_pending"], row["step"]) == ("runnable", 0, "join")
    assert [m.args for m in sent.for_run(wid)] == [[wid, 1]]  # one wake, one message
    drain(durable)
    statuses = [c["status"] for c in durable.wait_result(wid, timeout=5)]
    assert statuses == ["done"] * 3 + ["failed"] + ["done"] * (n - 4)


def test_a_stale_workers_late_commit_changes_no_parent_counter(durable, published, db_engine,
                                                               queue):
    """Semantic 3."""
    parent, _ = declare_family(durable)
    wid = parent.start({"items": [1, 2]})
    drain(durable, max_steps=1)
    kid = children_of(db_engine, wid)[0]["id"]
    durable.store.register_worker(DEAD, hostname="h", pid=1, nodename=None)
    claim, _ = durable.store.claim(kid, 0, DEAD)
    execute_sql(db_engine, "UPDATE {S}.workers SET heartbeat_at = now() - interval '1 hour'")
    execute_sql(db_engine, "UPDATE {S}.runs SET started_at = now() - interval '1 hour' "
                           "WHERE id = :id", id=kid)
    durable.coordinator().reaper.run_once()
    assert run_row(db_engine, kid)["status"] == "runnable"
    # The rescuer runs the child to the end: the parent counts it once.
    assert durable.executor.execute(kid, 0) == "committed"
    assert run_row(db_engine, wid)["children_pending"] == 1
    late = Transition(status="done", step="work", queue=queue, attempt=0, state="{}",
                      result='"late"', outcome="done", next_step=None)
    assert durable.store.commit(claim, late, worker=DEAD, started_at=None) is None
    assert run_row(db_engine, wid)["children_pending"] == 1
    assert run_row(db_engine, kid)["result"] == {"n": 10}
    drain(durable)
    assert durable.get_workflow(wid).status == "done"


def test_a_child_failed_by_the_reaper_counts(make_durable, db_engine, monkeypatch):
    durable = make_durable(max_recoveries=1)
    Recorder().install(durable, monkeypatch)
    parent, _ = declare_family(durable)
    wid = parent.start({"items": [1]})
    drain(durable, max_steps=1)
    kid = children_of(db_engine, wid)[0]["id"]
    durable.store.register_worker(DEAD, hostname="h", pid=1, nodename=None)
    durable.store.claim(kid, 0, DEAD)
    execute_sql(db_engine, "UPDATE {S}.workers SET heartbeat_at = now() - interval '1 hour'")
    execute_sql(db_engine, "UPDATE {S}.runs SET started_at = now() - interval '1 hour' "
                           "WHERE id = :id", id=kid)
    sent = Recorder().install(durable, monkeypatch)
    assert durable.coordinator().reaper.run_once() == 1
    assert run_row(db_engine, kid)["status"] == "failed"
    row = run_row(db_engine, wid)
    assert (row["status"], row["children_pending"]) == ("runnable", 0)
    assert [m.args for m in sent.for_run(wid)] == [[wid, 1]]
    drain(durable)
    [report] = durable.wait_result(wid, timeout=5)
    assert report["status"] == "failed" and "worker lost" in report["error"]


def test_parallel_runs_step_functions_and_workflows_as_children(durable, published):
    fetch = durable.workflow("fetch")

    @fetch.step
    def sales(ctx):
        # As a one-step child this is its result; in a full run, the next state.
        return {"sales": ctx.state["region"], "region": ctx.state["region"]}

    @fetch.step
    def users(ctx):
        return Done({"users": ctx.state["region"]})

    board = durable.workflow("board")

    @board.step
    def fan_out(ctx):
        return parallel(sales, users, fetch, next="render")

    @board.step
    def render(ctx):
        return Done([c.result for c in ctx.children])

    wid = board.start({"region": "eu"})
    drain(durable)
    # The bare workflow runs from its first step (sales, then users).
    assert durable.wait_result(wid, timeout=5) == [{"sales": "eu", "region": "eu"},
                                                   {"users": "eu"}, {"users": "eu"}]


def test_foreach_keeps_the_cap_and_releases_in_order(durable, published, db_engine):
    item = durable.workflow("item")

    @item.step
    def handle(ctx):
        live = scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE parent_id = :p "
                                 "AND finished_at IS NULL AND NOT held", p=ctx.state["parent"])
        return Done({"item": ctx.state["item"], "live": live})

    bulk = durable.workflow("bulk")

    @bulk.step
    def fan_out(ctx):
        return foreach([{"item": i, "parent": ctx.workflow_id} for i in range(25)], item,
                       concurrency=4, next="report")

    @bulk.step
    def report(ctx):
        return Done([c.result for c in ctx.children])

    wid = bulk.start()
    drain(durable, max_steps=1)
    kids = children_of(db_engine, wid)
    assert [k["held"] for k in kids] == [False] * 4 + [True] * 21
    drain(durable)
    results = durable.wait_result(wid, timeout=5)
    assert [r["item"] for r in results] == list(range(25))
    assert max(r["live"] for r in results) <= 4
    order = [r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p "
                                              "ORDER BY finished_at", p=wid)]
    assert order == [k["id"] for k in kids]  # released in spawn order


def test_retention_keeps_finished_children_of_a_live_parent(make_durable, db_engine,
                                                            monkeypatch):
    """Semantic 7."""
    durable = make_durable(retention=timedelta(hours=1))
    Recorder().install(durable, monkeypatch)
    parent, _ = declare_family(durable, child_step=lambda ctx: (
        Done("ok") if ctx.state["n"] else Await("go", next="finish")))
    child = durable.get_definition("child")

    @child.step
    def finish(ctx):
        return Done("late")

    wid = parent.start({"items": [1, 2, 0]})
    drain(durable)
    kids = [k["id"] for k in children_of(db_engine, wid)]
    execute_sql(db_engine, "UPDATE {S}.runs SET finished_at = now() - interval '2 hours' "
                           "WHERE id = ANY(:ids) AND finished_at IS NOT NULL", ids=kids)
    assert durable.coordinator().collector.run_once() == 0
    assert len(children_of(db_engine, wid)) == 3
    durable.signal(kids[2], "go")
    drain(durable)
    assert [c["result"] for c in durable.wait_result(wid, timeout=5)] == ["ok", "ok", "late"]
    execute_sql(db_engine, "UPDATE {S}.runs SET finished_at = now() - interval '2 hours'")
    assert durable.coordinator().collector.run_once() == 4
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == 0


def test_a_taken_child_key_fails_the_parent_and_starts_nothing(durable, published, db_engine):
    child = durable.workflow("keyed")

    @child.step
    def wait(ctx):
        return Await("never")

    @child.step
    def end(ctx):
        return Done()

    parent = durable.workflow("spawner")

    @parent.step
    def fan_out(ctx):
        return Spawn([child.child({}, key="k-free"), child.child({}, key="k-taken")])

    @parent.step
    def join(ctx):
        return Done()

    holder = child.start({}, key="k-taken")
    wid = parent.start()
    drain(durable)
    run = durable.get_workflow(wid)
    assert run.status == "failed"
    assert "already used by another run" in run.error["message"]
    assert children_of(db_engine, wid) == []
    assert durable.get_workflow(holder).status == "awaiting"


@pytest.mark.parametrize("how", ["fail", "cancel"])
def test_every_terminal_child_counts_once(durable, published, db_engine, how):
    """Invariant (holds): a child ending by commit (Fail, transaction path) or by cancel
    decrements its parent exactly once; the parent's counter never goes below zero."""
    leaf = durable.workflow(f"seam_leaf_{how}")

    @leaf.step
    def wait(ctx):
        return Await("go")

    @leaf.step
    def end(ctx):
        return Fail("no")

    root = durable.workflow(f"seam_root_{how}")

    @root.step
    def fan(ctx):
        return Spawn([leaf.child({}), leaf.child({})])

    @root.step
    def join(ctx):
        return Done(sorted(c.status for c in ctx.children))

    wid = root.start()
    drain(durable)
    kids = [r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p "
                                             "ORDER BY child_index", p=wid)]
    for kid in kids:
        if how == "fail":
            durable.signal(kid, "go")
        else:
            durable.cancel_workflow(kid, f"c-{kid}")
    drain(durable)
    assert run_row(db_engine, wid)["children_pending"] == 0
    expected = ["failed", "failed"] if how == "fail" else ["cancelled", "cancelled"]
    assert durable.wait_result(wid, timeout=5) == expected
