"""Deterministic crash recovery: a worker whose heartbeat is stale loses its runs to the
reaper (attempt + 1, error WorkerLost); its late commit is refused and changes nothing."""

from __future__ import annotations

import threading
import time

import pytest

from durable_celery import Done, WorkflowFailed
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

DEAD = "dead-host:4242:deadbeef"
LIVE = "live-host:4343:cafef00d"


def declare_work(durable, attempts_seen):
    wf = durable.workflow("work")

    @wf.step
    def charge(ctx):
        attempts_seen.append(ctx.attempt)
        return Done({"attempt": ctx.attempt})

    return wf


def add_worker(durable, engine, worker_id, *, heartbeat_age):
    durable.store.register_worker(worker_id, hostname="h", pid=1, nodename=None)
    execute_sql(engine, "UPDATE {S}.workers SET heartbeat_at = now() - make_interval(secs => :age)"
                        " WHERE id = :id", id=worker_id, age=heartbeat_age)


def age_claims(engine, worker_id, age=3600):
    """Claims prove liveness too: make this worker's claims as old as its heartbeat."""
    execute_sql(engine, "UPDATE {S}.runs SET started_at = now() - make_interval(secs => :age)"
                        " WHERE owner = :id", id=worker_id, age=age)


def late_done(queue):
    """What the dead worker was about to commit when it froze."""
    return Transition(status="done", step="charge", queue=queue, attempt=0,
                      state='{"late": true}', result='"late result"', outcome="done",
                      next_step=None)


def test_reaper_recovers_a_dead_workers_run_and_refuses_its_late_commit(
        durable, published, db_engine, queue):
    attempts: list = []
    wf = declare_work(durable, attempts)
    wid = wf.start({"order": 1})
    published.clear()
    add_worker(durable, db_engine, DEAD, heartbeat_age=3600)
    claim, started_at = durable.store.claim(wid, 0, DEAD)
    age_claims(db_engine, DEAD)
    assert run_row(db_engine, wid)["status"] == "executing"

    assert durable.coordinator().reaper.run_once() == 1

    row = run_row(db_engine, wid)
    assert row["status"] == "runnable"
    assert (row["attempt"], row["seq"], row["step"]) == (1, 0, "charge")
    assert (row["owner"], row["lease"]) == (None, None)
    assert row["error"]["type"] == "WorkerLost"
    assert row["error"]["worker"] == DEAD
    assert row["state"] == {"order": 1}
    assert scalar(db_engine, "SELECT count(*) FROM {S}.workers WHERE id = :id", id=DEAD) == 0
    assert [(m.name, m.args) for m in published.sent] == [("durable.work.charge", [wid, 0])]

    # The dead worker wakes up (a long GC pause, a SIGSTOP) and tries to commit.
    assert durable.store.commit(claim, late_done(queue), worker=DEAD,
                                started_at=started_at) is None
    assert run_row(db_engine, wid) == row
    assert scalar(db_engine, "SELECT count(*) FROM {S}.steps WHERE run_id = :id", id=wid) == 0

    drain(durable)
    assert attempts == [1]
    assert durable.wait_result(wid, timeout=1) == {"attempt": 1}


def test_late_commit_after_another_worker_reclaimed_is_refused(durable, published, db_engine,
                                                               queue):
    wf = declare_work(durable, [])
    wid = wf.start()
    add_worker(durable, db_engine, DEAD, heartbeat_age=3600)
    old_claim, old_started = durable.store.claim(wid, 0, DEAD)
    age_claims(db_engine, DEAD)
    assert durable.coordinator().reaper.run_once() == 1

    add_worker(durable, db_engine, LIVE, heartbeat_age=0)
    new_claim, _ = durable.store.claim(wid, 0, LIVE)
    assert new_claim.lease != old_claim.lease
    before = run_row(db_engine, wid)

    assert durable.store.commit(old_claim, late_done(queue), worker=DEAD,
                                started_at=old_started) is None
    assert run_row(db_engine, wid) == before
    assert (before["status"], before["owner"]) == ("executing", LIVE)
    assert scalar(db_engine, "SELECT count(*) FROM {S}.steps WHERE run_id = :id", id=wid) == 0


def test_too_many_worker_losses_fail_the_run(make_durable, db_engine, monkeypatch):
    durable = make_durable(max_recoveries=2)
    wf = declare_work(durable, [])
    published = Recorder().install(durable, monkeypatch)
    wid = wf.start()
    reaper = durable.coordinator().reaper

    # Loss 1 of 2: recovered.
    add_worker(durable, db_engine, DEAD, heartbeat_age=3600)
    assert durable.store.claim(wid, 0, DEAD) is not None
    age_claims(db_engine, DEAD)
    assert reaper.run_once() == 1
    assert run_row(db_engine, wid)["status"] == "runnable"

    # Loss 2 of 2: the step keeps killing its worker; the run fails instead of looping.
    published.clear()
    add_worker(durable, db_engine, DEAD, heartbeat_age=3600)
    assert durable.store.claim(wid, 0, DEAD) is not None
    age_claims(db_engine, DEAD)
    assert reaper.run_once() == 1
    row = run_row(db_engine, wid)
    # The end is the attempt that ran (as for a step that raised), committed like one.
    assert (row["status"], row["attempt"], row["seq"]) == ("failed", 1, 1)
    assert row["finished_at"] is not None
    assert row["owner"] is None
    assert (row["error"]["type"], row["error"]["message"], row["error"]["attempts"]) == (
        "WorkerLost", "worker lost (2 times)", 2)
    assert [(s.step, s.outcome, s.worker) for s in durable.workflow_steps(wid)] == [
        ("charge", "fail", DEAD)]
    assert len(published) == 0
    with pytest.raises(WorkflowFailed):
        durable.wait_result(wid, timeout=1)
    assert drain(durable)["steps"] == 0


@pytest.mark.parametrize("heartbeat_age", [0, 1.0])
def test_a_live_worker_is_never_reaped(durable, published, db_engine, heartbeat_age):
    wf = declare_work(durable, [])
    wid = wf.start()
    add_worker(durable, db_engine, LIVE, heartbeat_age=heartbeat_age)  # stale_after is 2s
    assert durable.store.claim(wid, 0, LIVE) is not None
    before = run_row(db_engine, wid)
    reaper = durable.coordinator().reaper

    for _ in range(3):
        assert reaper.run_once() == 0
    assert run_row(db_engine, wid) == before
    assert (before["status"], before["owner"]) == ("executing", LIVE)
    assert scalar(db_engine, "SELECT count(*) FROM {S}.workers WHERE id = :id", id=LIVE) == 1

    # The same worker, once its heartbeat is older than stale_after, is reaped.
    execute_sql(db_engine, "UPDATE {S}.workers SET heartbeat_at = now() - interval '3 seconds'")
    age_claims(db_engine, LIVE, age=3)
    assert reaper.run_once() == 1


def test_two_reapers_recover_each_run_once(make_durable, db_engine, recorder):
    one, two = make_durable(), make_durable()
    published = recorder(one, two)
    wf = declare_work(one, [])
    declare_work(two, [])
    wids = [wf.start({"i": i}) for i in range(40)]
    add_worker(one, db_engine, DEAD, heartbeat_age=3600)
    for wid in wids:
        assert one.store.claim(wid, 0, DEAD) is not None
    age_claims(db_engine, DEAD)
    published.clear()

    barrier = threading.Barrier(2)

    def reap(durable):
        barrier.wait(5)
        return durable.coordinator().reaper.run_once()

    done = [t.value() for t in start_threads([lambda: reap(one), lambda: reap(two)])]
    assert sum(done) == 40
    assert sorted(m.args[0] for m in published.sent) == sorted(wids)
    state = rows(db_engine, "SELECT status, attempt, recoveries FROM {S}.runs")
    assert {(r["status"], r["attempt"], r["recoveries"]) for r in state} == {("runnable", 1, 1)}
    assert scalar(db_engine, "SELECT count(*) FROM {S}.workers WHERE id = :id", id=DEAD) == 0


def test_close_leaves_no_worker_row_and_no_connection_behind(make_durable, db_engine,
                                                             monkeypatch):
    """A heartbeat that is under way while the process shuts down must not re-register
    the worker or reopen the database (the beat is held at the database call here)."""
    durable = make_durable()
    Recorder().install(durable, monkeypatch)
    wf = declare_work(durable, [])
    assert durable.get_workflow(wf.start()).status == "runnable"
    identity = durable._identity.get()
    worker_id = identity.ensure()

    in_beat, release = threading.Event(), threading.Event()
    real_heartbeat = identity._line.beat

    def slow_heartbeat(wid):
        in_beat.set()
        release.wait(5)
        return real_heartbeat(wid)

    monkeypatch.setattr(identity._line, "beat", slow_heartbeat)
    assert in_beat.wait(5)  # the heartbeat thread is inside a beat
    releaser = threading.Timer(0.2, release.set)
    releaser.start()
    try:
        durable.close()
        release.set()
        for thread in identity._threads:
            thread.join(2)

        ghosts = scalar(db_engine, "SELECT count(*) FROM {S}.workers WHERE id = :id",
                        id=worker_id)
        connections = scalar(db_engine, "SELECT count(*) FROM pg_stat_activity WHERE "
                                        "datname = current_database() "
                                        "AND application_name = 'durable_celery'")
    finally:
        releaser.cancel()
        durable._holder.dispose()  # do not leak a re-created engine into later tests
    assert (ghosts, connections) == (0, 0), (
        "after close(): worker rows for this process, open durable_celery connections")


def declare_trip(durable):
    """book (compensated by refund, on queue "payments") -> pay."""
    from durable_celery import Next

    wf = durable.workflow("trip", run_ahead=False)

    @wf.step(compensate="refund")
    def book(ctx):
        return Next("pay")

    @wf.step
    def pay(ctx):
        return Done("paid")

    @wf.compensation(queue="payments")
    def refund(ctx):
        return None

    return wf


def lose_step(durable, engine, wid):
    """The current step's worker dies holding it."""
    run = durable.get_workflow(wid)
    add_worker(durable, engine, DEAD, heartbeat_age=3600)
    assert durable.store.claim(wid, run.seq, DEAD) is not None
    age_claims(engine, DEAD)


def test_a_compensation_the_reaper_starts_goes_to_its_own_queue(make_durable, db_engine,
                                                                recorder):
    """Finding 12 and 13: after max_recoveries the reaper starts compensating, on the
    compensation's queue, and writes the 'fail' history row like a commit does; fork by
    step number then counts the forward history only."""
    durable = make_durable(max_recoveries=1)
    published = recorder(durable)
    wf = declare_trip(durable)
    wid = wf.start({})
    drain(durable, max_steps=1)  # book done; pay next
    lose_step(durable, db_engine, wid)
    published.clear()
    durable.coordinator().reaper.run_once()
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["queue"]) == ("compensating", "refund", "payments")
    assert [m.options["queue"] for m in published.for_run(wid)] == ["payments"]
    history = [(s.seq, s.step, s.outcome, s.next_step) for s in durable.workflow_steps(wid)]
    assert history == [(1, "book", "next", "pay"), (2, "pay", "fail", "refund")]
    assert row["seq"] == 2
    drain(durable)
    assert durable.get_workflow(wid).status == "compensated"
    history = [(s.seq, s.step, s.outcome) for s in durable.workflow_steps(wid)]
    assert history == [(1, "book", "next"), (2, "pay", "fail"), (3, "refund", "compensated")]
    fork = durable.fork_workflow(wid, "fork-2", start_step=2)
    assert durable.get_workflow(fork["workflow_id"]).step == "pay"


def test_a_run_the_reaper_fails_gets_its_history_row(make_durable, db_engine, recorder):
    durable = make_durable(max_recoveries=1)
    recorder(durable)
    attempts: list = []
    wf = declare_work(durable, attempts)
    wid = wf.start({})
    lose_step(durable, db_engine, wid)
    durable.coordinator().reaper.run_once()
    run = durable.get_workflow(wid)
    assert (run.status, run.seq, run.error["type"]) == ("failed", 1, "WorkerLost")
    [entry] = durable.workflow_steps(wid)
    assert (entry.seq, entry.step, entry.outcome, entry.worker) == (1, "charge", "fail", DEAD)


def test_a_locked_parent_never_blocks_the_reaper(make_durable, db_engine, recorder):
    """P2: a child's end must be counted on its parent in the reaper's transaction; while a
    caller's transaction holds the parent's row, that child waits for the next pass and the
    rest of the pass goes on."""
    from durable_celery import Spawn

    durable = make_durable(max_recoveries=1)
    recorder(durable)
    attempts: list = []
    leaf = declare_work(durable, attempts)
    other = durable.workflow("other")

    @other.step
    def solo(ctx):
        return Done()

    root = durable.workflow("root")

    @root.step
    def fan(ctx):
        return Spawn([leaf.child({})])

    @root.step
    def join(ctx):
        return Done([c.status for c in ctx.children])

    wid = root.start({})
    drain(durable, max_steps=1)
    [child] = [r["id"] for r in rows(db_engine, "SELECT id FROM {S}.runs WHERE parent_id = :p",
                                     p=wid)]
    lone = other.start({})
    lose_step(durable, db_engine, child)
    assert durable.store.claim(lone, 0, DEAD) is not None
    age_claims(db_engine, DEAD)
    with db_engine.connect() as locker:
        tx = locker.begin()
        locker.execute(q_("SELECT id FROM {S}.runs WHERE id = :id FOR UPDATE"), {"id": wid})
        (pass_,) = start_threads([lambda: durable.coordinator().reaper.run_once()])
        assert pass_.value(timeout=5) == 1  # the other run only
        assert run_row(db_engine, lone)["status"] == "failed"  # no parent to count it
        tx.commit()
    assert run_row(db_engine, child)["status"] == "executing"
    durable.coordinator().reaper.run_once()
    assert run_row(db_engine, child)["status"] == "failed"
    assert run_row(db_engine, wid)["status"] == "runnable"
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == ["failed"]


def q_(sql):
    from tests.integration.support import q

    return q(sql)


def test_heartbeats_go_on_while_an_orphan_release_waits_on_a_lock(make_durable, db_engine,
                                                                  recorder):
    """Finding 5: the release of an orphaned lease waits on a run row a caller's
    transaction holds; the heartbeats do not wait with it, and the reaper leaves the
    process's other run alone. Once the lock is gone the lease is handed back."""
    import time

    durable = make_durable(heartbeat_interval=0.5, stale_after=2.0)
    recorder(durable)
    wf = declare_work(durable, [])
    x, y = wf.start({}), wf.start({})
    identity = durable._identity.get()
    me = identity.ensure()
    claim_x, _ = durable.store.claim(x, 0, me)
    assert durable.store.claim(y, 0, me) is not None
    with db_engine.connect() as locker:
        tx = locker.begin()
        locker.execute(q_("SELECT id FROM {S}.runs WHERE id = :id FOR UPDATE"), {"id": x})
        identity.orphan(claim_x)
        time.sleep(3.0)
        age = scalar(db_engine, "SELECT EXTRACT(EPOCH FROM now() - heartbeat_at) "
                                "FROM {S}.workers WHERE id = :id", id=me)
        assert age < 1.5, f"heartbeat stalled for {age:.1f}s behind the orphan release"
        assert durable.store.reap(stale_after=2.0, max_recoveries=10, limit=100).publish == []
        assert run_row(db_engine, y)["owner"] == me
        tx.commit()
    deadline = time.monotonic() + 5
    while run_row(db_engine, x)["status"] != "runnable" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (run_row(db_engine, x)["status"], run_row(db_engine, x)["owner"]) == ("runnable", None)
    assert run_row(db_engine, y)["status"] == "executing"


def test_a_run_ended_by_the_reaper_hands_on_its_concurrency_key_at_once(make_durable,
                                                                        db_engine, recorder):
    """A run lost max_recoveries times ends through the step commit: the next run waiting
    for its concurrency key is handed the key by that commit and dispatched by the next
    pass, not KEY_QUIET seconds later by the safety net."""
    durable = make_durable(max_recoveries=1)
    published = recorder(durable)
    wf = declare_work(durable, [])
    first = wf.start(concurrency_key="acct:1")
    second = wf.start(concurrency_key="acct:1")
    lose_step(durable, db_engine, first)
    assert durable.executor.execute(second, 0) == "stale"  # the key is held
    published.clear()
    assert durable.coordinator().reaper.run_once() == 1
    assert run_row(db_engine, first)["status"] == "failed"
    assert durable.coordinator().dispatcher.run_once() == 1
    assert [s.args[0] for s in published.sent] == [second]
    drain(durable)
    assert durable.wait_result(second, timeout=5) == {"attempt": 0}


def test_the_reaper_waits_for_heartbeats_after_its_own_outage(durable, published, db_engine):
    wf = durable.workflow("grace")

    @wf.step
    def only(ctx):
        return Done()

    wid = wf.start()
    durable.store.register_worker("stalled", hostname="h", pid=1, nodename=None)
    assert durable.store.claim(wid, 0, "stalled") is not None
    execute_sql(db_engine, "UPDATE {S}.workers SET heartbeat_at = now() - interval '1 hour'")
    execute_sql(db_engine, "UPDATE {S}.runs SET started_at = now() - interval '1 hour'")
    reaper = durable.coordinator().reaper
    # Its last successful pass was long ago (the database was away): no judgement yet.
    reaper._last_pass = time.monotonic() - 3600
    assert reaper.run_once() == 0
    assert run_row(db_engine, wid)["status"] == "executing"
    # After one stale_after with still no heartbeat, the worker is dead.
    reaper._grace_until = time.monotonic() - 1
    assert reaper.run_once() == 1
    assert run_row(db_engine, wid)["status"] == "runnable"
