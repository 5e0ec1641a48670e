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
