"""A commit that cannot reach the database, or that Postgres refuses, never wedges a run."""

from __future__ import annotations

from durable_celery import Done, Next, Spawn, errors
from durable_celery.runtime import executor
from durable_celery.testing import drain
from tests.integration.support import rows, run_row, scalar, wait_for


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


def test_landed_does_not_run_ahead_on_a_claim_someone_else_holds(durable, published,
                                                                monkeypatch, db_engine):
    """Regression: after a commit whose result is unknown, landed() proves the commit by the
    history row but reads the run's *current* status without checking the lease. If the
    committed Next (published, runnable) was claimed by another worker meanwhile (a
    redispatch during the outage, a duplicate message), landed() reports 'executing' and
    the executor runs the next step ahead on a lease it does not hold -- concurrently with
    the real owner."""
    ran: list[str] = []
    wf = durable.workflow("seam_landed")

    @wf.step
    def one(ctx):
        ran.append("one")
        return Next("two", run_ahead=False)

    @wf.step
    def two(ctx):
        ran.append("two")
        return Done()

    wid = wf.start()
    real = durable.store.commit
    calls = []

    def flaky(claim, transition, **kw):
        calls.append(transition.status)
        if len(calls) == 1:
            committed = real(claim, transition, **kw)  # the server commits...
            assert committed is not None and committed.status == "runnable"
            # ...another worker claims the run at its next step (a redispatched message)...
            assert durable.store.claim(wid, committed.seq, "other-worker") is not None
            # ...and our connection dropped before the answer came back.
            raise errors.StorageError("database error: connection lost", transient=True)
        return real(claim, transition, **kw)

    monkeypatch.setattr(durable.store, "commit", flaky)
    monkeypatch.setattr(executor, "COMMIT_RETRIES", (0.0,))
    outcome = durable.executor.execute(wid, 0)
    assert ran == ["one"], f"this worker also ran {ran[1:]} under another worker's claim"
    assert outcome == "committed"
    assert run_row(db_engine, wid)["owner"] == "other-worker"


def test_landed_after_a_spawn_commit_does_not_double_insert_or_double_count(
        durable, published, monkeypatch, db_engine):
    """Invariant (holds): a Spawn commit that landed but whose answer was lost is not
    applied twice on the retry (the guard drops it, landed() proves it)."""
    leaf = durable.workflow("seam_leaf3")

    @leaf.step
    def only(ctx):
        return Done(ctx.state.get("n"))

    root = durable.workflow("seam_root3")

    @root.step
    def fan(ctx):
        return Spawn([leaf.child({"n": 1}), leaf.child({"n": 2})])

    @root.step
    def join(ctx):
        return Done(sorted(c.result for c in ctx.children))

    wid = root.start()
    real = durable.store.commit
    calls = []

    def flaky(claim, transition, **kw):
        calls.append(1)
        committed = real(claim, transition, **kw)
        if len(calls) == 1:
            raise errors.StorageError("database error: connection lost", transient=True)
        return committed

    monkeypatch.setattr(durable.store, "commit", flaky)
    monkeypatch.setattr(executor, "COMMIT_RETRIES", (0.0,))
    assert durable.executor.execute(wid, 0) == "committed"
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE parent_id = :p", p=wid) == 2
    assert run_row(db_engine, wid)["children_pending"] == 2
    monkeypatch.setattr(durable.store, "commit", real)
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [1, 2]
    assert run_row(db_engine, wid)["children_pending"] == 0


def test_children_of_a_landed_spawn_commit_are_published(durable, published, monkeypatch,
                                                         db_engine):
    """Regression (liveness): when a Spawn commit landed but its answer was lost, landed()
    returns ``wakes=()``: the children inserted by that commit are not published. Their row
    says dispatched_at = now(), so the dispatcher re-sends them only after
    ``redispatch_after`` (60 s by default). Same for a parent woken by a child's terminal
    commit, and for a released held sibling."""
    leaf = durable.workflow("seam_leaf4")

    @leaf.step
    def only(ctx):
        return Done(ctx.state.get("n"))

    root = durable.workflow("seam_root4")

    @root.step
    def fan(ctx):
        return Spawn([leaf.child({"n": 1}), leaf.child({"n": 2})])

    @root.step
    def join(ctx):
        return Done(sorted(c.result for c in ctx.children))

    wid = root.start()
    real = durable.store.commit
    calls = []

    def flaky(claim, transition, **kw):
        calls.append(1)
        committed = real(claim, transition, **kw)
        if len(calls) == 1:
            raise errors.StorageError("database error: connection lost", transient=True)
        return committed

    monkeypatch.setattr(durable.store, "commit", flaky)
    monkeypatch.setattr(executor, "COMMIT_RETRIES", (0.0,))
    published.clear()
    assert durable.executor.execute(wid, 0) == "committed"
    kids = [r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p "
                                             "ORDER BY child_index", p=wid)]
    assert [bool(published.for_run(k)) for k in kids] == [True, True], (
        "children of a landed Spawn wait for the redispatch floor")


def test_a_commit_that_landed_before_the_connection_dropped_carries_on(durable, published,
                                                                        monkeypatch):
    wf = durable.workflow("landing")
    effects: list[str] = []

    @wf.step
    def first(ctx):
        effects.append("first")
        return {"n": 1}

    @wf.step
    def second(ctx):
        effects.append("second")
        return Done(ctx.state["n"])

    wid = wf.start()
    real_commit = durable.store.commit
    calls = []

    def commits_then_drops(*args, **kwargs):
        calls.append(1)
        result = real_commit(*args, **kwargs)
        if len(calls) == 1:  # applied on the server, but the client never hears back
            raise errors.StorageError("database error: connection lost", transient=True)
        return result

    monkeypatch.setattr(executor, "COMMIT_RETRIES", (0.0,))
    monkeypatch.setattr(durable.store, "commit", commits_then_drops)
    # first -> second is a run-ahead: the commit kept our claim; we must carry on with it.
    assert durable.executor.execute(wid, 0) == "committed"
    assert durable.wait_result(wid, timeout=1) == 1
    assert effects == ["first", "second"]
    assert [s.step for s in durable.workflow_steps(wid)] == ["first", "second"]
