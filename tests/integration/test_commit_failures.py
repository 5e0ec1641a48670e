"""A commit that cannot reach the database, or that Postgres refuses, never wedges a run."""

from __future__ import annotations

from durable_celery import Done, errors
from durable_celery.runtime import executor
from tests.integration.support import run_row, wait_for


def _declare(durable, effects):
    wf = durable.workflow("fragile")

    @wf.step
    def only(ctx):
        effects.append(ctx.attempt)
        return Done({"ok": True})

    return wf


def test_an_unreachable_database_at_commit_hands_the_claim_back(durable, published, db_engine,
                                                                 monkeypatch):
    effects: list[int] = []
    wid = _declare(durable, effects).start()
    real_commit = durable.store.commit

    def down(*args, **kwargs):
        raise errors.StorageError("database error: connection refused", transient=True)

    monkeypatch.setattr(executor, "COMMIT_RETRIES", (0.0, 0.0))
    monkeypatch.setattr(durable.store, "commit", down)
    assert durable.executor.execute(wid, 0) == "commit_failed"
    row = run_row(db_engine, wid)
    assert (row["status"], row["owner"] is not None) == ("executing", True)

    # The database is back: the orphan thread hands the run back at once, without
    # waiting for this live process to be reaped.
    monkeypatch.setattr(durable.store, "commit", real_commit)
    wait_for(lambda: run_row(db_engine, wid)["status"] == "runnable", timeout=5,
             what="the orphaned lease to be released")
    row = run_row(db_engine, wid)
    assert (row["status"], row["owner"]) == ("runnable", None)

    # The step runs again and commits once.
    assert durable.executor.execute(wid, 0) == "committed"
    assert durable.wait_result(wid, timeout=1) == {"ok": True}
    assert effects == [0, 0]


def test_a_commit_that_succeeds_on_retry_applies_once(durable, published, monkeypatch):
    effects: list[int] = []
    wid = _declare(durable, effects).start()
    real_commit = durable.store.commit
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise errors.StorageError("database error: server closed the connection",
                                      transient=True)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(executor, "COMMIT_RETRIES", (0.0,))
    monkeypatch.setattr(durable.store, "commit", flaky)
    assert durable.executor.execute(wid, 0) == "committed"
    assert len(calls) == 2
    assert durable.wait_result(wid, timeout=1) == {"ok": True}
    assert len(durable.workflow_steps(wid)) == 1


def test_an_outcome_postgres_refuses_fails_the_run(durable, published, db_engine, monkeypatch):
    effects: list[int] = []
    wid = _declare(durable, effects).start()
    real_commit = durable.store.commit
    calls = []

    def refuse_first(claim, transition, **kwargs):
        calls.append(transition.status)
        if len(calls) == 1:
            raise errors.StorageError("database error: value out of range", transient=False)
        return real_commit(claim, transition, **kwargs)

    monkeypatch.setattr(durable.store, "commit", refuse_first)
    assert durable.executor.execute(wid, 0) == "committed"
    row = run_row(db_engine, wid)
    assert row["status"] == "failed"
    assert row["error"]["type"] == "InvalidOutcome"
    assert "value out of range" in row["error"]["message"]
    assert calls == ["done", "failed"]


def test_a_taken_child_key_after_the_last_retry_fails_the_run_cleanly(durable, published,
                                                                      monkeypatch):
    """P1: four transient failures, then the commit finds a Spawn's child key taken. The
    run fails with a clear error; the Spawn step's body ran once; nothing is left held."""
    from durable_celery import Spawn
    from durable_celery.testing import drain

    leaf = durable.workflow("leaf")

    @leaf.step
    def only(ctx):
        return Done()

    spawned: list[int] = []
    parent = durable.workflow("parent")

    @parent.step
    def fan(ctx):
        spawned.append(ctx.attempt)
        return Spawn([leaf.child({}, key="taken")])

    @parent.step
    def join(ctx):
        return Done()

    leaf.start({}, key="taken")
    wid = parent.start()
    real_commit = durable.store.commit
    calls: list[int] = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 4:
            raise errors.StorageError("database error: server closed the connection",
                                      transient=True)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(executor, "COMMIT_RETRIES", (0.0, 0.0, 0.0, 0.0))
    monkeypatch.setattr(durable.store, "commit", flaky)
    assert durable.executor.execute(wid, 0) == "committed"
    monkeypatch.setattr(durable.store, "commit", real_commit)
    drain(durable)
    run = durable.get_workflow(wid)
    assert run.status == "failed" and run.error["type"] == "InvalidOutcome"
    assert "already used" in run.error["message"]
    assert spawned == [0]
