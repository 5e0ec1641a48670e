"""foreach's concurrency cap holds and never strands its parent: a release skipped because
the next held child was locked is owed and paid by the coordinator (finding 1); a resumed
child goes back in the queue instead of over the cap (finding 8); a child resumed after its
parent woke makes the parent wait for it again (P5)."""

from __future__ import annotations

from sqlalchemy import orm

from durable_celery import Await, Done, Fail, foreach
from durable_celery.testing import drain
from tests.integration.support import q, rows, run_row, scalar


def declare(durable, cap, n, *, fail_items=()):
    item = durable.workflow("item")

    @item.step
    def wait(ctx):
        return Await("go")

    @item.step
    def end(ctx):
        if ctx.state["item"] in fail_items and not ctx.state.get("fixed"):
            return Fail("bad item")
        return Done(ctx.state["item"])

    bulk = durable.workflow("bulk")

    @bulk.step
    def fan(ctx):
        return foreach(range(n), item, concurrency=cap)

    @bulk.step
    def report(ctx):
        return Done([(c.status, c.result) for c in ctx.children])

    return bulk


def children(engine, parent):
    return [r["id"] for r in rows(engine, "SELECT id FROM {S}.runs WHERE parent_id = :p "
                                          "ORDER BY child_index", p=parent)]


def started(engine, parent):
    """Children that hold a slot: released (not held) and not finished."""
    return len(rows(engine, "SELECT id FROM {S}.runs WHERE parent_id = :p AND NOT held "
                            "AND finished_at IS NULL", p=parent))


def test_a_release_skipped_on_a_locked_child_is_paid_later(durable, published, db_engine):
    bulk = declare(durable, cap=1, n=2)
    wid = bulk.start()
    drain(durable)
    c0, c1 = children(db_engine, wid)
    assert run_row(db_engine, c1)["held"] is True
    with db_engine.connect() as locker:
        tx = locker.begin()
        locker.execute(q("SELECT id FROM {S}.runs WHERE id = :id FOR UPDATE"), {"id": c1})
        durable.signal(c0, "go")
        drain(durable)  # C0 finishes while C1's row is locked: its release is skipped
        assert durable.get_workflow(c0).status == "done"
        assert run_row(db_engine, c1)["held"] is True
        tx.commit()
    assert run_row(db_engine, wid)["spawn_owed"] == 1
    published.clear()
    durable.coordinator().run_once()  # the reaper's pass pays the release
    assert [m.args[0] for m in published.sent if m.args] == [c1]
    assert run_row(db_engine, wid)["spawn_owed"] == 0
    drain(durable)
    durable.signal(c1, "go")
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [["done", 0], ["done", 1]]


def test_a_signal_in_the_callers_transaction_does_not_strand_the_parent(durable, published,
                                                                        db_engine):
    """The same, through the public outbox API: the held child is signalled inside the
    caller's transaction while its running sibling finishes."""
    bulk = declare(durable, cap=1, n=2)
    wid = bulk.start()
    drain(durable)
    c0, c1 = children(db_engine, wid)
    with orm.Session(db_engine) as session, session.begin():
        durable.signal(c1, "go", {"early": True}, connection=session)
        durable.signal(c0, "go")
        drain(durable)
    durable.coordinator().run_once()
    drain(durable)  # C1 is released, parks on its Await, finds the signal: done
    assert durable.wait_result(wid, timeout=5) == [["done", 0], ["done", 1]]


def test_a_resumed_started_child_waits_its_turn(durable, published, db_engine):
    """Finding 8: C0 is cancelled (C1 starts), then resumed: it goes back in the queue
    behind the cap, in spawn order, into the wait it had."""
    bulk = declare(durable, cap=1, n=3)
    wid = bulk.start()
    drain(durable)
    c0, c1, c2 = children(db_engine, wid)
    durable.cancel_workflow(c0, "c0")
    drain(durable)
    assert durable.get_workflow(c1).status == "awaiting"
    durable.resume_workflow(c0, "r0")
    drain(durable)
    assert started(db_engine, wid) == 1
    assert (run_row(db_engine, c0)["held"], run_row(db_engine, c0)["status"]) == (True, "awaiting")
    durable.signal(c0, "go")  # it may receive its signal while it waits its turn
    drain(durable)
    assert durable.get_workflow(c0).status == "runnable" and started(db_engine, wid) == 1
    durable.signal(c1, "go")
    drain(durable)  # C1 done: C0 (first in spawn order) takes the slot, and ends
    assert durable.get_workflow(c0).status == "done"
    assert started(db_engine, wid) == 1 and run_row(db_engine, c2)["held"] is False
    durable.signal(c2, "go")
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [["done", 0], ["done", 1], ["done", 2]]


def test_a_resumed_failed_child_waits_its_turn(durable, published, db_engine):
    bulk = declare(durable, cap=1, n=2, fail_items=(0,))
    wid = bulk.start()
    drain(durable)
    c0, c1 = children(db_engine, wid)
    durable.signal(c0, "go")
    drain(durable)
    assert durable.get_workflow(c0).status == "failed"
    assert durable.get_workflow(c1).status == "awaiting"  # C1 took the slot
    durable.resume_workflow(c0, "r0")
    drain(durable)
    assert started(db_engine, wid) == 1 and run_row(db_engine, c0)["held"] is True
    durable.signal(c1, "go")
    drain(durable)
    # C0's resumed step runs again with the signal it saw (not consumed by the failure).
    assert durable.wait_result(wid, timeout=5) == [["failed", None], ["done", 1]]


def test_resuming_a_cancelled_capped_parent_restarts_its_children_in_order(durable, published,
                                                                          db_engine):
    bulk = declare(durable, cap=2, n=4)
    wid = bulk.start()
    drain(durable)
    kids = children(db_engine, wid)
    durable.cancel_workflow(wid, "c")
    durable.resume_workflow(wid, "r")
    assert run_row(db_engine, wid)["status"] == "awaiting_children"
    assert run_row(db_engine, wid)["children_pending"] == 4
    assert [run_row(db_engine, k)["held"] for k in kids] == [False, False, True, True]
    drain(durable)
    assert started(db_engine, wid) == 2
    for kid in kids:
        durable.signal(kid, "go")
        drain(durable)
        assert started(db_engine, wid) <= 2
    assert durable.wait_result(wid, timeout=5) == [["done", i] for i in range(4)]


def test_a_child_resumed_after_its_parent_woke_is_waited_for(durable, published, db_engine):
    """P5: the parent woke (every child terminal) but its join step has not run: resuming
    a child makes it wait again, so the join step sees how that child really ended."""
    bulk = declare(durable, cap=None, n=2, fail_items=(1,))
    wid = bulk.start()
    drain(durable)
    c0, c1 = children(db_engine, wid)
    durable.signal(c0, "go")
    durable.signal(c1, "go")
    drain(durable, max_steps=2)  # both children end; the parent is woken, not yet run
    assert durable.get_workflow(c1).status == "failed"
    assert run_row(db_engine, wid)["status"] == "runnable"
    published.clear()
    durable.resume_workflow(c1, "r1")
    assert run_row(db_engine, wid)["status"] == "awaiting_children"
    assert run_row(db_engine, wid)["children_pending"] == 1
    execute_fix(db_engine, c1)
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [["done", 0], ["done", 1]]


def execute_fix(engine, wid):
    from tests.integration.support import execute_sql

    execute_sql(engine, "UPDATE {S}.runs SET state = state || '{\"fixed\": true}' "
                        "WHERE id = :id", id=wid)


def test_resuming_a_cancelled_held_child_respects_the_foreach_cap(durable, published,
                                                                   db_engine):
    """Regression: RESUME clears ``held``: a child cancelled while held behind the foreach cap
    starts at once when resumed, and the cap is exceeded."""
    item = durable.workflow("seam_item")

    @item.step
    def wait(ctx):
        return Await("go")

    @item.step
    def end(ctx):
        return Done(ctx.state["item"])

    bulk = durable.workflow("seam_capped")

    @bulk.step
    def fan(ctx):
        return foreach(range(3), item, concurrency=1)

    @bulk.step
    def report(ctx):
        return Done([c.status for c in ctx.children])

    wid = bulk.start()
    drain(durable)
    kids = rows(db_engine, "SELECT id, held FROM {S}.runs WHERE parent_id = :p "
                           "ORDER BY child_index", p=wid)
    assert [k["held"] for k in kids] == [False, True, True]
    durable.cancel_workflow(kids[2]["id"], "c-held")
    durable.resume_workflow(kids[2]["id"], "r-held")
    assert run_row(db_engine, wid)["children_pending"] == 3
    started = scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE parent_id = :p "
                                "AND NOT held AND finished_at IS NULL", p=wid)
    assert started <= 1, f"{started} children started under concurrency=1"


def test_foreach_cap_with_cancel_of_a_started_child_and_resume_of_the_parent_tree(
        durable, published, db_engine):
    """Invariant (holds): cancelling the parent cancels held children too, GC-proofing:
    no held child is left live under a finished parent."""
    item = durable.workflow("seam_item2")

    @item.step
    def wait(ctx):
        return Await("go")

    @item.step
    def after_go(ctx):
        return Done("went")

    bulk = durable.workflow("seam_capped2")

    @bulk.step
    def fan(ctx):
        return foreach(range(4), item, concurrency=2)

    @bulk.step
    def report(ctx):
        return Done(len(ctx.children))

    wid = bulk.start()
    drain(durable)
    assert [r["held"] for r in rows(db_engine, "SELECT held FROM {S}.runs WHERE parent_id = :p"
                                               " AND status = 'awaiting' OR held AND "
                                               "parent_id = :p ORDER BY child_index",
                                    p=wid)] == [False, False, True, True]
    durable.cancel_workflow(wid, "c-root")
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE parent_id = :p "
                             "AND finished_at IS NULL", p=wid) == 0
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE "
                             "(finished_at IS NULL) <> (status NOT IN ('done', 'failed', "
                             "'cancelled', 'compensated', 'compensation_failed'))") == 0


def test_a_child_failed_by_the_reaper_counts_once_and_frees_its_slot(make_durable, queue,
                                                                     monkeypatch, db_engine):
    """Invariant (holds): a child whose worker died max_recoveries times ends failed with
    finished_at, decrements its parent exactly once, and releases the next held sibling."""
    from tests.integration.support import Recorder

    durable = make_durable(max_recoveries=1)
    Recorder().install(durable, monkeypatch)
    item = durable.workflow("seam_reaped_item")

    @item.step
    def work(ctx):
        return Done(ctx.state["item"])

    bulk = durable.workflow("seam_reaped_bulk")

    @bulk.step
    def fan(ctx):
        return foreach(range(3), item, concurrency=1)

    @bulk.step
    def report(ctx):
        return Done([c.status for c in ctx.children])

    wid = bulk.start()
    durable.executor.execute(wid, 0)
    kids = [r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p "
                                             "ORDER BY child_index", p=wid)]
    assert durable.store.claim(kids[0], 0, "ghost-worker") is not None
    with db_engine.begin() as conn:
        from tests.integration.support import q
        conn.execute(q("UPDATE {S}.runs SET started_at = now() - interval '1 hour' "
                       "WHERE id = :id"), {"id": kids[0]})
    reaper = durable.coordinator().reaper
    assert reaper.run_once() == 1
    assert reaper.run_once() == 0  # a second pass must not count the child again
    row = run_row(db_engine, kids[0])
    assert row["status"] == "failed" and row["finished_at"] is not None
    assert run_row(db_engine, wid)["children_pending"] == 2
    assert [r["held"] for r in rows(db_engine, "SELECT held FROM {S}.runs WHERE parent_id = :p "
                                               "ORDER BY child_index", p=wid)] == [
        False, False, True]
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == ["failed", "done", "done"]
