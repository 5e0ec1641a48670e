"""Seams between controls, composition, drop-in and the performance work.

Each test proves an invariant holds across two features; those marked "Regression" in their
docstring failed before the fix they describe.
"""

from __future__ import annotations

import threading

import psycopg
import pytest

from durable_celery import Await, Done, Fail, Next, Retry, Spawn, errors, foreach
from durable_celery.runtime import executor
from durable_celery.storage.sql import WAKEUP_CHANNEL
from durable_celery.testing import drain
from tests.integration.support import rows, run_row, scalar


def live_executing_with_key(engine, key):
    """Runs whose step is being executed right now (claimed) under concurrency key ``key``."""
    return scalar(engine, "SELECT count(*) FROM {S}.runs WHERE concurrency_key = :k "
                          "AND owner IS NOT NULL AND status IN ('executing', 'compensating')",
                  k=key)


# ------------------------------------------------------------------ concurrency keys x saga


def test_a_running_compensation_holds_its_concurrency_key(durable, published, db_engine):
    """Regression: a compensation claimed under a concurrency key does not exclude other runs of
    the key. The claim keeps status 'compensating', and both the CLAIM's NOT EXISTS and the
    unique index only look at status = 'executing'."""
    wf = durable.workflow("keyed_saga")

    @wf.step(compensate="undo")
    def reserve(ctx):
        return None

    @wf.step
    def pay(ctx):
        return Fail("declined")

    @wf.compensation
    def undo(ctx):
        return None

    a = wf.start(concurrency_key="acct:1")
    drain(durable, max_steps=2)
    row = run_row(db_engine, a)
    assert row["status"] == "compensating" and row["owner"] is None
    b = wf.start(concurrency_key="acct:1")
    # a's compensation is claimed first (its message arrives), then b's first step.
    claimed_a = durable.store.claim(a, row["seq"], "worker-a")
    assert claimed_a is not None and claimed_a[0].compensating
    claimed_b = durable.store.claim(b, 0, "worker-b")
    assert live_executing_with_key(db_engine, "acct:1") <= 1, (
        "two runs of one concurrency key execute at once (a compensation and a step)")
    assert claimed_b is None


def test_a_waiting_compensation_goes_first_in_its_key_queue(durable, published, db_engine):
    """Finding 10: a compensation waiting for its concurrency key is ahead of runs that
    arrive later: a newcomer's claim is refused, the compensation claims the key, and its
    end hands the key on to the newcomer."""
    wf = durable.workflow("keyed_saga2")

    @wf.step(compensate="undo")
    def reserve(ctx):
        return None

    @wf.step
    def pay(ctx):
        return Fail("declined") if ctx.state.get("decline") else Done("paid")

    @wf.compensation
    def undo(ctx):
        return None

    a = wf.start({"decline": True}, concurrency_key="acct:2")
    drain(durable, max_steps=2)
    seq_a = run_row(db_engine, a)["seq"]
    assert run_row(db_engine, a)["status"] == "compensating"
    b = wf.start({}, concurrency_key="acct:2")
    assert durable.store.claim(b, 0, "worker-b") is None  # the compensation is ahead
    claimed_a = durable.store.claim(a, seq_a, "worker-a")
    assert claimed_a is not None and claimed_a[0].compensating
    assert durable.store.release(claimed_a[0], after=0.0)
    published.clear()
    drain(durable)
    assert durable.get_workflow(a).status == "compensated"
    assert durable.wait_result(b, timeout=5) == "paid"


# ------------------------------------------------------------------ foreach cap x resume


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


# ------------------------------------------------------------------ resume x join counter


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


# ------------------------------------------------------------------ fork x composition


def test_forking_a_child_started_from_a_step_function_runs_only_that_step(durable, published,
                                                                          db_engine):
    """Regression: a child spawned from a step function runs that one step (single_step). A fork
    of it starts at the workflow's FIRST step (not the step the child ran), without
    single_step, so it runs the whole workflow."""
    ran: list[str] = []
    tools = durable.workflow("seam_tools")

    @tools.step
    def first(ctx):
        ran.append("first")

    @tools.step
    def middle(ctx):
        ran.append("middle")
        return {"m": True}

    @tools.step
    def last(ctx):
        ran.append("last")
        return Done("last")

    parent = durable.workflow("seam_parent")

    @parent.step
    def fan(ctx):
        return Spawn([middle])

    @parent.step
    def join(ctx):
        return Done([c.result for c in ctx.children])

    wid = parent.start()
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == [{"m": True}]
    assert ran == ["middle"]
    child = scalar(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p", p=wid)
    ran.clear()
    fork = durable.fork_workflow(child, "fork-child")["workflow_id"]
    drain(durable)
    assert ran == ["middle"], f"the fork of a one-step child ran {ran}"
    assert durable.wait_result(fork, timeout=5) == {"m": True}


# ------------------------------------------------------------------ landed() x leases


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


# ------------------------------------------------------------------ fast path x timers


def test_a_delayed_compensation_retry_wakes_the_dispatchers(durable, published, db_engine,
                                                            database_url):
    """Regression: a compensation's Retry(delay) commits status 'compensating' with a future
    eligible_at. Store.commit's fast-path test only excludes ``status == 'runnable' and not
    publish`` as a timer, so this timer commits without the NOTIFY that makes sleeping
    dispatchers re-plan: it fires only when some dispatcher happens to wake."""
    wf = durable.workflow("seam_comp_retry")

    @wf.step(compensate="undo")
    def reserve(ctx):
        return None

    @wf.step
    def pay(ctx):
        return Fail("declined")

    @wf.compensation
    def undo(ctx):
        if ctx.attempt == 0:
            return Retry(delay=30)
        return None

    wid = wf.start()
    drain(durable, max_steps=2)
    assert durable.get_workflow(wid).status == "compensating"
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {WAKEUP_CHANNEL}")
        seq = run_row(db_engine, wid)["seq"]
        assert durable.executor.execute(wid, seq) == "committed"
        row = run_row(db_engine, wid)
        assert row["status"] == "compensating" and row["attempt"] == 1
        notified = list(listener.notifies(timeout=1.0, stop_after=1))
    assert notified, "a durable timer was committed without waking the dispatchers"


# ------------------------------------------------------------------ drop-in x controls


def test_a_resumed_durable_task_hands_its_concurrency_key_on(durable, published, db_engine):
    """Invariant (holds): a @durable.task run with a concurrency key that is cancelled while
    executing, then resumed, runs once the key is free, and a waiter of the key runs too."""
    gate = threading.Event()
    entered = threading.Event()

    @durable.task(name="seam.keyed_task")
    def keyed(x):
        if x == "first" and not gate.is_set():
            entered.set()
            assert gate.wait(10)
        return x

    a = keyed.apply_async(["first"], concurrency_key="k:t").id
    b = keyed.apply_async(["second"], concurrency_key="k:t").id
    t = threading.Thread(target=lambda: durable.executor.execute(a, 0))
    t.start()
    assert entered.wait(10)
    durable.cancel_workflow(a, "cancel-a")
    gate.set()
    t.join(10)
    assert durable.get_workflow(a).status == "cancelled"
    durable.resume_workflow(a, "resume-a")
    drain(durable)
    assert durable.wait_result(a, timeout=5) == "first"
    assert durable.wait_result(b, timeout=5) == "second"
    assert live_executing_with_key(db_engine, "k:t") == 0


def test_await_all_survives_the_fast_path(durable, published, db_engine):
    """Invariant (holds): Await(mode='all') commits through the transaction (parking), a
    partial set of signals does not wake it, the full set does, and the next step's Next
    (fast path) consumes them all."""
    wf = durable.workflow("seam_all")

    @wf.step
    def park(ctx):
        return Await({"a", "b"}, mode="all")

    @wf.step
    def seen(ctx):
        return Next("end", state={"names": sorted(s.name for s in ctx.signals)})

    @wf.step
    def end(ctx):
        return Done(ctx.state["names"])

    wid = wf.start()
    drain(durable)
    durable.signal(wid, "a")
    drain(durable)
    assert durable.get_workflow(wid).status == "awaiting"
    durable.signal(wid, "b")
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == ["a", "b"]
    assert scalar(db_engine, "SELECT count(*) FROM {S}.signals WHERE run_id = :id "
                             "AND consumed_at IS NULL", id=wid) == 0


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


# ------------------------------------------------------------------ resume x ctx.children


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


# ------------------------------------------------------------------ reaper x join x keys


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


# ------------------------------------------------------------------ fork x saga


def test_forking_a_compensated_saga_from_its_last_step(durable, published):
    """Regression: a compensated run's history ends with compensation rows ('undo', outcome
    'compensated'). A fork "past the end" (the last completed step, as _fork documents)
    picks that row and is refused with InvalidRequest "has no step 'undo'"; forking at the
    compensation's number is refused the same way. Compensation rows should not count as
    completed steps to fork from."""
    ran: list[str] = []
    wf = durable.workflow("seam_fork_saga")

    @wf.step(compensate="undo")
    def reserve(ctx):
        ran.append("reserve")

    @wf.step
    def pay(ctx):
        ran.append("pay")
        if ctx.state.get("forked"):
            return Done("paid")
        return Fail("declined")

    @wf.compensation
    def undo(ctx):
        ran.append("undo")

    wid = wf.start()
    drain(durable)
    assert durable.get_workflow(wid).status == "compensated"
    assert [s.step for s in durable.workflow_steps(wid)] == ["reserve", "pay", "undo"]
    ran.clear()
    fork = durable.fork_workflow(wid, "fork-saga-end", start_step=99)["workflow_id"]
    drain(durable)
    assert ran[:1] == ["pay"] and durable.get_workflow(fork).forked_from == wid
