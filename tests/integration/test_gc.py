"""Retention: finished runs older than ``retention`` are deleted with their history and
signals, in bounded batches; live runs and recently finished ones are kept."""

from __future__ import annotations

from datetime import timedelta

from durable_celery import Await, Done, Fail
from durable_celery.testing import drain
from tests.integration.support import Recorder, execute_sql, scalar


def test_gc_deletes_old_finished_runs_in_batches(make_durable, db_engine, monkeypatch):
    durable = make_durable(retention=timedelta(hours=1), gc_batch_size=10)
    Recorder().install(durable, monkeypatch)
    wf = durable.workflow("gc")

    @wf.step
    def wait(ctx):
        return Await("go")

    @wf.step
    def finish(ctx):
        if ctx.signals[0].payload == "fail":
            return Fail("asked to")
        return Done(ctx.signals[0].payload)

    old = [wf.start({"i": i}) for i in range(25)]
    young = [wf.start({"i": i}) for i in range(3)]
    awaiting, runnable = wf.start(), wf.start()
    drain(durable)
    for i, wid in enumerate(old + young):
        durable.signal(wid, "go", "fail" if i % 5 == 0 else "ok")
    durable.signal(awaiting, "unrelated", "kept in the inbox")
    drain(durable)
    execute_sql(db_engine, "UPDATE {S}.runs SET status = 'runnable', eligible_at = now() "
                           "+ interval '1 hour', dispatch_at = now() + interval '1 hour', "
                           "created_at = now() - interval '3 hours' WHERE id = :id",
                id=runnable)
    assert {durable.get_workflow(w).status for w in old} == {"done", "failed"}
    assert durable.get_workflow(awaiting).status == "awaiting"

    # Age the 25 "old" runs past retention (and the live ones too: age alone is not enough).
    execute_sql(db_engine, "UPDATE {S}.runs SET finished_at = now() - interval '2 hours' "
                           "WHERE id = ANY(:ids)", ids=old)
    execute_sql(db_engine, "UPDATE {S}.runs SET created_at = now() - interval '3 hours' "
                           "WHERE id = ANY(:ids)", ids=[awaiting])

    batches = []
    real = durable.store.collect_garbage

    def counting(**kwargs):
        n = real(**kwargs)
        batches.append((kwargs["limit"], n))
        return n

    monkeypatch.setattr(durable.store, "collect_garbage", counting)
    assert durable.coordinator().collector.run_once() == 25
    assert batches == [(10, 10), (10, 10), (10, 5)]

    def count(table, column, ids):
        return scalar(db_engine, f"SELECT count(*) FROM {{S}}.{table} WHERE {column} = ANY(:ids)",
                      ids=ids)

    kept = [*young, awaiting, runnable]
    assert count("runs", "id", old) == 0
    assert count("steps", "run_id", old) == 0
    assert count("signals", "run_id", old) == 0
    assert count("runs", "id", kept) == 5
    assert count("steps", "run_id", young) == 6
    assert count("signals", "run_id", young) == 3
    assert count("signals", "run_id", [awaiting]) == 1
    assert durable.get_workflow(awaiting).status == "awaiting"
    assert durable.get_workflow(runnable).status == "runnable"

    assert durable.coordinator().collector.run_once() == 0


def declare_tree(durable, broken):
    from durable_celery import Spawn

    leaf = durable.workflow("gc_leaf")

    @leaf.step
    def work(ctx):
        return Done("leaf-result")

    root = durable.workflow("gc_root")

    @root.step
    def fan(ctx):
        return Spawn([leaf.child({}), leaf.child({})])

    @root.step
    def join(ctx):
        if broken:
            raise RuntimeError("join broken")
        return Done([c.result for c in ctx.children])

    return root


def test_gc_deletes_a_finished_tree_whole_and_keeps_children_of_live_parents(
        make_durable, db_engine, monkeypatch):
    durable = make_durable(retention=timedelta(hours=1))
    Recorder().install(durable, monkeypatch)
    root = declare_tree(durable, [])
    done = root.start()
    drain(durable)
    assert durable.wait_result(done, timeout=1) == ["leaf-result"] * 2
    every = [done] + [r for (r,) in rows_(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p",
                                         p=done)]
    execute_sql(db_engine, "UPDATE {S}.runs SET finished_at = now() - interval '2 hours' "
                           "WHERE id = ANY(:ids)", ids=every)
    assert durable.store.collect_garbage(retention_seconds=3600, limit=100) == 3
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == 0


def test_gc_never_deletes_the_children_of_a_parent_being_resumed(make_durable, db_engine,
                                                                 monkeypatch):
    """Finding 11: the parent's join step failed; past retention, a resume of the parent is
    in flight (its transaction not committed) while a GC pass runs. The children stay, and
    the resumed join step reads them."""
    import threading

    durable = make_durable(retention=timedelta(hours=1))
    Recorder().install(durable, monkeypatch)
    broken = [True]
    root = declare_tree(durable, broken)
    wid = root.start()
    drain(durable)
    assert durable.get_workflow(wid).status == "failed"
    execute_sql(db_engine, "UPDATE {S}.runs SET finished_at = now() - interval '2 hours'")
    controls = durable.controls
    with durable._holder.begin() as conn:
        assert controls.store.resume(conn, wid) is not None
        result: list = []
        gc = threading.Thread(target=lambda: result.append(
            durable.store.collect_garbage(retention_seconds=3600, limit=100)))
        gc.start()
        gc.join(10)
        assert not gc.is_alive() and result == [0]
    broken.clear()
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == ["leaf-result"] * 2


def rows_(engine, sql, **params):
    from tests.integration.support import q

    with engine.connect() as conn:
        return conn.execute(q(sql), params).all()
