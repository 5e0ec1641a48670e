"""Composition meets the controls: cancelling a parent cancels its live children
(recursively); a cancelled child wakes its parent like any terminal child; resume counts a
child again; a fork copies no children and spawns its own."""

from __future__ import annotations

import threading

import pytest

from durable_celery import Await, Done, Fail, Retry, Spawn, foreach
from durable_celery.testing import drain
from tests.integration.support import Recorder, rows, run_row, scalar, start_threads


def declare_tree(durable):
    """root -> 2 mids -> 2 leaves each; leaves await "go"."""
    leaf = durable.workflow("leaf")

    @leaf.step
    def wait(ctx):
        return Await("go")

    @leaf.step
    def leaf_done(ctx):
        return Done("leaf")

    mid = durable.workflow("mid")

    @mid.step
    def mid_spawn(ctx):
        return Spawn([leaf.child({}), leaf.child({})])

    @mid.step
    def mid_join(ctx):
        return Done([c.status for c in ctx.children])

    root = durable.workflow("root")

    @root.step
    def root_spawn(ctx):
        return Spawn([mid.child({}), mid.child({})])

    @root.step
    def root_join(ctx):
        return Done([(c.status, c.error and c.error["type"]) for c in ctx.children])

    return root, mid, leaf


def descendants(engine, wid):
    return rows(engine, """
        WITH RECURSIVE t AS (SELECT id FROM {S}.runs WHERE parent_id = :id
                             UNION SELECT r.id FROM {S}.runs r JOIN t ON r.parent_id = t.id)
        SELECT r.id, r.status, r.parent_id FROM {S}.runs r JOIN t USING (id)""", id=wid)


def test_cancelling_a_parent_cancels_its_tree(durable, published, db_engine):
    root, _, _ = declare_tree(durable)
    wid = root.start()
    drain(durable)
    tree = descendants(db_engine, wid)
    assert len(tree) == 6 and {r["status"] for r in tree} == {"awaiting", "awaiting_children"}
    response = durable.cancel_workflow(wid, "cancel-root", reason="customer left")
    assert response["changed"] is True
    assert durable.get_workflow(wid).status == "cancelled"
    assert {r["status"] for r in descendants(db_engine, wid)} == {"cancelled"}
    drain(durable)
    assert durable.get_workflow(wid).status == "cancelled"


def test_a_cancelled_child_wakes_its_parent(durable, published, db_engine):
    """Semantic 4, second half: cancelling a mid-level child cancels its leaves and counts
    on the root like any terminal child."""
    root, _, _ = declare_tree(durable)
    wid = root.start()
    drain(durable)
    mids = [r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p "
                                             "ORDER BY child_index", p=wid)]
    published.clear()
    durable.cancel_workflow(mids[0], "cancel-mid")
    assert run_row(db_engine, wid)["children_pending"] == 1
    assert published.for_run(wid) == []
    leaves = rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p", p=mids[1])
    for leaf in leaves:
        durable.signal(leaf["id"], "go")
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [["cancelled", "Cancelled"], ["done", None]]
    assert durable.get_workflow(mids[1]).result == ["done", "done"]


def test_cancelling_the_last_pending_child_publishes_the_parent(durable, published, db_engine):
    root, _, _ = declare_tree(durable)
    wid = root.start()
    drain(durable)
    mids = [r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p",
                                  p=wid)]
    durable.cancel_workflow(mids[0], "c1")
    published.clear()
    durable.cancel_workflow(mids[1], "c2")
    assert [m.args for m in published.for_run(wid)] == [[wid, 1]]
    assert durable.cancel_workflow(mids[1], "c2")["idempotency_replayed"] is True
    assert run_row(db_engine, wid)["children_pending"] == 0
    drain(durable)
    assert [s for s, _ in durable.wait_result(wid, timeout=5)] == ["cancelled", "cancelled"]


def test_a_resumed_child_is_pending_again(durable, published, db_engine):
    root, _, _ = declare_tree(durable)
    wid = root.start()
    drain(durable)
    mids = [r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p "
                                             "ORDER BY child_index", p=wid)]
    durable.cancel_workflow(mids[0], "c")
    assert run_row(db_engine, wid)["children_pending"] == 1
    durable.resume_workflow(mids[0], "r")
    assert run_row(db_engine, wid)["children_pending"] == 2
    # The resumed mid waits for its leaves again (the same cancel had cancelled them).
    assert run_row(db_engine, mids[0])["status"] == "awaiting_children"
    assert run_row(db_engine, mids[0])["children_pending"] == 2
    drain(durable)
    assert durable.get_workflow(mids[0]).status == "awaiting_children"
    assert durable.get_workflow(wid).status == "awaiting_children"
    for mid in mids:
        for leaf in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p", p=mid):
            durable.signal(leaf["id"], "go")
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [["done", None], ["done", None]]
    assert durable.get_workflow(mids[0]).result == ["done", "done"]


def test_cancelling_a_held_foreach_child_frees_no_slot(durable, published, db_engine):
    item = durable.workflow("slow_item")

    @item.step
    def wait(ctx):
        return Await("go")

    @item.step
    def end(ctx):
        return Done(ctx.state["item"])

    bulk = durable.workflow("capped")

    @bulk.step
    def fan(ctx):
        return foreach(range(5), item, concurrency=2)

    @bulk.step
    def report(ctx):
        return Done([c.status for c in ctx.children])

    wid = bulk.start()
    drain(durable)
    kids = rows(db_engine, "SELECT id, held FROM {S}.runs WHERE parent_id = :p "
                           "ORDER BY child_index", p=wid)
    assert [k["held"] for k in kids] == [False, False, True, True, True]
    durable.cancel_workflow(kids[4]["id"], "c-held")
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE parent_id = :p AND NOT held "
                             "AND finished_at IS NULL", p=wid) == 2
    durable.cancel_workflow(kids[0]["id"], "c-live")  # a started child frees its slot
    assert [r["held"] for r in rows(db_engine, "SELECT held FROM {S}.runs WHERE parent_id = :p"
                                               " ORDER BY child_index", p=wid)] == [
        False, False, False, True, True]
    for kid in kids[1:4]:
        drain(durable)
        durable.signal(kid["id"], "go")
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == ["cancelled", "done", "done", "done",
                                                   "cancelled"]


@pytest.mark.parametrize("round_", range(3))
def test_cancel_racing_children_commits_neither_deadlocks_nor_double_counts(
        make_durable, db_engine, monkeypatch, round_):
    durable = make_durable(pool_size=12)
    Recorder().install(durable, monkeypatch)
    barrier = threading.Barrier(7)
    child = durable.workflow("racer")

    @child.step
    def run(ctx):
        barrier.wait(timeout=20)
        return Done(ctx.state["n"])

    parent = durable.workflow("raced")

    @parent.step
    def fan(ctx):
        return Spawn([child.child({"n": n}) for n in range(6)])

    @parent.step
    def join(ctx):
        return Done([c.status for c in ctx.children])

    grand = durable.workflow("grand")

    @grand.step
    def top(ctx):
        return Spawn([parent.child({})])

    @grand.step
    def top_join(ctx):
        return Done([c.status for c in ctx.children])

    gid = grand.start()
    durable.executor.execute(gid, 0)
    [pid] = [r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p",
                                   p=gid)]
    durable.executor.execute(pid, 0)
    kids = [r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p",
                                  p=pid)]

    def cancel():
        barrier.wait(timeout=20)
        return durable.cancel_workflow(pid, f"race-{round_}")

    threads = start_threads([*(lambda k=k: durable.executor.execute(k, 0) for k in kids),
                             cancel])
    results = [t.value(timeout=60) for t in threads]
    assert results[-1]["ok"] is True
    assert set(results[:-1]) <= {"committed", "lease_lost"}
    assert durable.get_workflow(pid).status == "cancelled"
    # The grandparent counted its (cancelled) child once, whatever the children did.
    row = run_row(db_engine, gid)
    assert (row["status"], row["children_pending"]) == ("runnable", 0)
    drain(durable)
    assert durable.wait_result(gid, timeout=5) == ["cancelled"]


def test_a_fork_copies_no_children_and_spawns_its_own(durable, published, db_engine):
    """Semantic 8."""
    kid = durable.workflow("kid")

    @kid.step
    def work(ctx):
        return Done(ctx.state["n"] * 2)

    parent = durable.workflow("forked_parent")

    @parent.step
    def fan(ctx):
        return Spawn([kid.child({"n": n}) for n in ctx.state["ns"]])

    @parent.step
    def join(ctx):
        return Done([c.result for c in ctx.children])

    wid = parent.start({"ns": [1, 2, 3]})
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [2, 4, 6]
    source_kids = {r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs "
                                                     "WHERE parent_id = :p", p=wid)}
    fork = durable.fork_workflow(wid, "fork-1", start_step=1)["workflow_id"]
    assert rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p", p=fork) == []
    drain(durable)
    assert durable.wait_result(fork, timeout=5) == [2, 4, 6]
    fork_kids = {r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs "
                                                   "WHERE parent_id = :p", p=fork)}
    assert len(fork_kids) == 3 and not fork_kids & source_kids
    assert {r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p",
                                  p=wid)} == source_kids
    # Forked past the Spawn, the run has no children of its own to see.
    late = durable.fork_workflow(wid, "fork-2", start_step=2)["workflow_id"]
    drain(durable)
    assert durable.wait_result(late, timeout=5) == []


def test_a_fork_keeps_the_compensations_of_copied_steps(durable, published):
    log = []
    wf = durable.workflow("forked_saga")

    @wf.step(compensate="undo_reserve")
    def reserve(ctx):
        return None

    @wf.step
    def pay(ctx):
        return Fail("declined") if ctx.state.get("fail", True) else Done("paid")

    @wf.compensation
    def undo_reserve(ctx):
        log.append(ctx.workflow_id)

    wid = wf.start()
    drain(durable)
    assert durable.get_workflow(wid).status == "compensated"
    fork = durable.fork_workflow(wid, "fork-saga", start_step=2)["workflow_id"]
    drain(durable)
    assert durable.get_workflow(fork).status == "compensated"
    assert log == [wid, fork]


def test_a_run_cancelled_while_compensating_resumes_compensating(durable, published):
    wf = durable.workflow("stopped_saga")
    log = []

    @wf.step(compensate="undo")
    def reserve(ctx):
        return None

    @wf.step
    def pay(ctx):
        return Fail("declined")

    @wf.compensation
    def undo(ctx):
        log.append(ctx.attempt)

    wid = wf.start()
    drain(durable, max_steps=2)
    assert durable.get_workflow(wid).status == "compensating"
    durable.cancel_workflow(wid, "stop")
    drain(durable)
    assert log == []
    durable.resume_workflow(wid, "go-on")
    assert durable.get_workflow(wid).status == "compensating"
    drain(durable)
    assert durable.get_workflow(wid).status == "compensated"
    assert log == [0]


def test_a_resumed_parent_waits_for_its_children_again(durable, published, db_engine):
    """A parent cancelled while awaiting its children (the cancel cascades to them) resumes
    waiting for them: the children the same cancel cancelled resume their own waits, the
    join counter counts them again, and the join step sees how they really ended."""
    leaf = durable.workflow("seam_leaf")

    @leaf.step
    def wait(ctx):
        return Await("go")

    @leaf.step
    def after_go(ctx):
        return Done("went")

    root = durable.workflow("seam_root")

    @root.step
    def fan(ctx):
        return Spawn([leaf.child({}), leaf.child({})])

    @root.step
    def join(ctx):
        return Done([c.status for c in ctx.children])

    wid = root.start()
    drain(durable)
    assert run_row(db_engine, wid)["children_pending"] == 2
    durable.cancel_workflow(wid, "c")
    children = [r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p "
                                                 "ORDER BY child_index", p=wid)]
    assert [durable.get_workflow(c).status for c in children] == ["cancelled"] * 2
    durable.resume_workflow(wid, "r")
    run = durable.get_workflow(wid)
    assert (run.status, run.children_pending) == ("awaiting_children", 2)
    assert [durable.get_workflow(c).status for c in children] == ["awaiting"] * 2
    drain(durable)
    assert durable.get_workflow(wid).status == "awaiting_children"
    for child in children:
        durable.signal(child, "go")
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == ["done", "done"]


def _join_tree(durable, name, join):
    leaf = durable.workflow(f"{name}_leaf")

    @leaf.step
    def only(ctx):
        return Done(ctx.state["n"])

    root = durable.workflow(name)

    @root.step
    def fan(ctx):
        return Spawn([leaf.child({"n": 1}), leaf.child({"n": 2})])

    root.step(name="join", retry={"max_attempts": 1})(join)
    return root


def test_a_resumed_failed_join_step_still_sees_its_children(durable, published):
    """Regression: COMMIT advances ``visit`` to the new seq on a terminal outcome, and RESUME sets
    ``visit = seq``; ctx.children is read by ``spawn_seq = visit``. So a join step that
    failed and is resumed sees no children at all."""
    seen: list[list] = []

    def join(ctx):
        seen.append([c.result for c in ctx.children])
        if len(seen) == 1:
            raise RuntimeError("join crashed")
        return Done(seen[-1])

    root = _join_tree(durable, "seam_join_fail", join)
    wid = root.start()
    drain(durable)
    assert durable.get_workflow(wid).status == "failed"
    assert seen == [[1, 2]]
    durable.resume_workflow(wid, "resume-join")
    drain(durable)
    assert seen[1] == [1, 2], f"the resumed join step saw children {seen[1]}"
    assert durable.wait_result(wid, timeout=5) == [1, 2]


def test_a_resumed_cancelled_join_step_after_a_retry_still_sees_its_children(
        durable, published, db_engine):
    """Regression: same root cause through cancel: a join step that retried (visit stays, seq
    advances) and was then cancelled resumes with ``visit = seq``, losing its children."""
    seen: list[list] = []

    def join(ctx):
        seen.append([c.result for c in ctx.children])
        if len(seen) == 1:
            return Retry(delay=3600)
        return Done(seen[-1])

    root = _join_tree(durable, "seam_join_cancel", join)
    wid = root.start()
    drain(durable, collapse_timers=False)
    assert durable.get_workflow(wid).status == "runnable" and seen == [[1, 2]]
    durable.cancel_workflow(wid, "cancel-join")
    durable.resume_workflow(wid, "resume-join")
    drain(durable)
    assert seen[1] == [1, 2], f"the resumed join step saw children {seen[1]}"
