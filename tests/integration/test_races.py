"""The race catalogue: signals against parks, re-awaits and finishing runs; claims against
claims, the reaper and late commits; sweeps of two coordinators at once.

Each interleaving is forced rather than hoped for: a second connection holds the run row
lock, or a hook runs between two statements of one flow (its transaction still open, its
row locks held) while the racing operation queues up behind it. The real SQL always runs
against the real database.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from durable_celery import Await, Done
from durable_celery.errors import NoTarget
from durable_celery.storage import store as store_mod
from durable_celery.storage import sweeps as sweeps_mod
from durable_celery.testing import drain
from tests.integration.support import (
    Worker,
    execute_sql,
    lock_waiters,
    q,
    redis_lists,
    rows,
    run_row,
    scalar,
    start_threads,
    wait_for,
)

DEAD = "dead-host:1:race"
LATE = "late-host:2:race"

# ---------------------------------------------------------------------------- hooks


class _HookedConnection:
    def __init__(self, conn: Any, hooks: StatementHooks) -> None:
        self._conn = conn
        self._hooks = hooks

    def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        result = self._conn.execute(statement, *args, **kwargs)
        self._hooks.fire(statement)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class StatementHooks:
    """Wraps a Store's engine holder: right after a chosen statement has run (its
    transaction still open, its row locks still held), call a function once."""

    def __init__(self, holder: Any) -> None:
        self.real = holder
        self._after: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()

    def after(self, statement: Any, fn: Callable[[], None]) -> None:
        with self._lock:
            self._after[id(statement)] = fn

    def fire(self, statement: Any) -> None:
        with self._lock:
            fn = self._after.pop(id(statement), None)
        if fn is not None:
            fn()

    @contextlib.contextmanager
    def begin(self) -> Iterator[Any]:
        with self.real.begin() as conn:
            yield _HookedConnection(conn, self)

    @contextlib.contextmanager
    def connect(self) -> Iterator[Any]:
        with self.real.connect() as conn:
            yield _HookedConnection(conn, self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def hooks_on(durable, monkeypatch) -> StatementHooks:
    hooks = StatementHooks(durable.store.db)
    monkeypatch.setattr(durable.store, "db", hooks)
    return hooks


def blocked_behind_lock(engine, racer: Worker, what: str, waiters: int = 1) -> Callable[[], None]:
    """A hook that starts ``racer`` and returns once it waits for a row lock."""

    def hook() -> None:
        racer.start()
        wait_for(lambda: lock_waiters(engine) >= waiters, what=what)

    return hook


@contextlib.contextmanager
def row_locked(engine, workflow_id: str) -> Iterator[None]:
    """Hold the run row lock from a second connection until the block ends."""
    with engine.connect() as locker:
        tx = locker.begin()
        locker.execute(q("SELECT id FROM {S}.runs WHERE id = :id FOR UPDATE"),
                       {"id": workflow_id})
        try:
            yield
        finally:
            tx.rollback()


def signal_rows(engine, wid):
    return rows(engine, "SELECT name, payload, dedup_key, delivered_at IS NOT NULL AS delivered, "
                        "consumed_at IS NOT NULL AS consumed, consumed_seq FROM {S}.signals "
                        "WHERE run_id = :id ORDER BY id", id=wid)


def sent(published):
    return [(m.name, m.args) for m in published.sent]


# ---------------------------------------------------------------------------- signals


def declare_parker(durable, seen, *, timeout=None):
    wf = durable.workflow("parker", run_ahead=False)

    @wf.step
    def park(ctx):
        return Await("go", timeout=timeout)

    @wf.step
    def after(ctx):
        seen.append(([(s.name, s.payload) for s in ctx.signals], ctx.timed_out))
        return Done([s.payload for s in ctx.signals])

    return wf


def test_a_signal_arriving_inside_the_park_transaction_wakes_the_run(durable, published,
                                                                      db_engine, monkeypatch):
    """The park's commit has updated the run (its row lock held) but not yet looked at the
    inbox when the signal comes: the signal waits for the lock, then finds the run awaiting."""
    seen: list = []
    wf = declare_parker(durable, seen)
    wid = wf.start()
    published.clear()
    signalling = Worker(lambda: durable.signal(wid, "go", "mid-park"), name="signal")
    hooks_on(durable, monkeypatch).after(
        store_mod.COMMIT, blocked_behind_lock(db_engine, signalling, "the signal to block"))

    assert durable.executor.execute(wid, 0) == "committed"
    result = signalling.value()
    assert (result.duplicate, result.woke) == (False, True)
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["seq"]) == ("runnable", "after", 1)
    assert sent(published) == [("durable.parker.after", [wid, 1])]
    assert durable.coordinator().dispatcher.run_once() == 0

    assert durable.executor.execute(wid, 1) == "committed"
    assert seen == [([("go", "mid-park")], False)]
    assert [(s["consumed"], s["consumed_seq"]) for s in signal_rows(db_engine, wid)] == [(True, 2)]


def declare_reawaiter(durable, seen, entered, gate):
    wf = durable.workflow("reawait_race", run_ahead=False)

    @wf.step
    def first(ctx):
        return Await("tick")

    @wf.step
    def again(ctx):
        seen.append([s.payload for s in ctx.signals])
        entered.set()
        assert gate.wait(10)
        return Await("tick", next="last")

    @wf.step
    def last(ctx):
        seen.append([s.payload for s in ctx.signals])
        return Done([s.payload for s in ctx.signals])

    return wf


def test_a_reawait_wakes_on_a_signal_sent_while_the_step_ran_and_not_on_a_seen_one(
        durable, published, db_engine):
    seen: list = []
    entered, gate = threading.Event(), threading.Event()
    wf = declare_reawaiter(durable, seen, entered, gate)
    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    assert durable.signal(wid, "tick", 1, dedup_key="t1").woke is True
    published.clear()

    running = Worker(lambda: durable.executor.execute(wid, 1), name="again")
    running.start()
    assert entered.wait(5)  # `again` runs, having seen tick 1
    redelivered = durable.signal(wid, "tick", 1, dedup_key="t1")  # a sender's retry
    fresh = durable.signal(wid, "tick", 2, dedup_key="t2")
    assert (redelivered.duplicate, redelivered.woke) == (True, False)
    assert (fresh.duplicate, fresh.woke) == (False, False)  # executing: stored, not delivered
    gate.set()
    assert running.value() == "committed"

    # The re-await found tick 2 in the inbox under the row lock and woke at once.
    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["seq"]) == ("runnable", "last", 2)
    assert sent(published) == [("durable.reawait_race.last", [wid, 2])]
    assert durable.executor.execute(wid, 2) == "committed"
    assert seen == [[1], [2]]
    assert durable.wait_result(wid, timeout=1) == [2]
    assert [(s["payload"], s["consumed_seq"]) for s in signal_rows(db_engine, wid)] == [
        (1, 2), (2, 3)]


def test_a_seen_signal_resent_inside_the_reawait_transaction_does_not_wake_it(
        durable, published, db_engine, monkeypatch):
    seen: list = []
    entered, gate = threading.Event(), threading.Event()
    gate.set()
    wf = declare_reawaiter(durable, seen, entered, gate)
    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    assert durable.signal(wid, "tick", 1, dedup_key="t1").woke is True
    published.clear()

    # Between the commit that consumed tick 1 and the inbox check of the re-await, the
    # sender retries tick 1: it queues behind the row lock and must stay a duplicate.
    resent = Worker(lambda: durable.signal(wid, "tick", 1, dedup_key="t1"), name="resend")
    hooks_on(durable, monkeypatch).after(
        store_mod.COMMIT, blocked_behind_lock(db_engine, resent, "the resend to block"))
    assert durable.executor.execute(wid, 1) == "committed"
    result = resent.value()
    assert (result.duplicate, result.woke) == (True, False)

    row = run_row(db_engine, wid)
    assert (row["status"], row["step"], row["seq"]) == ("awaiting", "last", 2)
    assert published.sent == []
    assert durable.coordinator().dispatcher.run_once() == 0
    assert durable.executor.execute(wid, 2) == "stale"
    assert seen == [[1]]

    assert durable.signal(wid, "tick", 2, dedup_key="t2").woke is True
    assert durable.executor.execute(wid, 2) == "committed"
    assert seen == [[1], [2]]
    assert [(s["payload"], s["consumed_seq"]) for s in signal_rows(db_engine, wid)] == [
        (1, 2), (2, 3)]


def declare_finisher(durable, entered=None, gate=None):
    wf = durable.workflow("finisher", run_ahead=False)

    @wf.step
    def only(ctx):
        if entered is not None:
            entered.set()
            assert gate.wait(10)
        return Done({"n": ctx.state["n"]})

    return wf


def test_a_signal_to_a_run_running_its_last_step_is_kept_and_the_result_is_intact(
        durable, published, db_engine):
    entered, gate = threading.Event(), threading.Event()
    wf = declare_finisher(durable, entered, gate)
    wid = wf.start({"n": 7}, key="order:7")
    running = Worker(lambda: durable.executor.execute(wid, 0), name="last-step")
    running.start()
    assert entered.wait(5)

    result = durable.signal("order:7", "go", "late")
    assert (result.workflow_id, result.duplicate, result.woke) == (wid, False, False)
    gate.set()
    assert running.value() == "committed"

    assert durable.wait_result(wid, timeout=1) == {"n": 7}
    run = durable.get_workflow(wid)
    assert (run.status, run.state, run.seq) == ("done", {"n": 7}, 1)
    # Accepted while the run was live: stored, never delivered, never consumed.
    assert [(s["payload"], s["delivered"], s["consumed"]) for s in signal_rows(db_engine, wid)] \
        == [("late", False, False)]
    with pytest.raises(NoTarget):
        durable.signal(wid, "go", "too late")


@pytest.mark.parametrize("by", ["workflow_id", "key"])
def test_a_signal_queued_behind_the_final_commit_is_refused(durable, published, db_engine, by):
    """The Done commit and then the signal queue up behind a third transaction holding the
    run row; released, the commit goes first and the finished run refuses the signal
    (NoTarget), storing nothing."""
    entered, gate = threading.Event(), threading.Event()
    wf = declare_finisher(durable, entered, gate)
    wid = wf.start({"n": 1}, key="order:1")
    target = wid if by == "workflow_id" else "order:1"
    finishing = Worker(lambda: durable.executor.execute(wid, 0), name="final-commit")
    signalling = Worker(lambda: durable.signal(target, "go", "raced"), name="signal")
    finishing.start()
    assert entered.wait(5)  # claimed; the last step is running
    with row_locked(db_engine, wid):
        gate.set()
        wait_for(lambda: lock_waiters(db_engine) >= 1, what="the final commit to block")
        signalling.start()
        wait_for(lambda: lock_waiters(db_engine) >= 2, what="the signal to block")

    assert finishing.value() == "committed"
    with pytest.raises(NoTarget) as refused:
        signalling.value()
    assert refused.value.details["reason"] in ("finished", "missing")
    assert scalar(db_engine, "SELECT count(*) FROM {S}.signals") == 0
    assert durable.wait_result(wid, timeout=1) == {"n": 1}


@pytest.mark.parametrize("order", ["signal_first", "deadline_first"])
def test_a_signal_racing_the_await_deadline_wakes_the_run_once(durable, published, db_engine,
                                                               order):
    seen: list = []
    wf = declare_parker(durable, seen, timeout=60)
    wid = wf.start()
    assert durable.executor.execute(wid, 0) == "committed"
    execute_sql(db_engine, "UPDATE {S}.runs SET await_deadline = now() - interval '1 second' "
                           "WHERE id = :id", id=wid)
    published.clear()
    dispatcher = durable.coordinator().dispatcher

    if order == "signal_first":
        signalling = Worker(lambda: durable.signal(wid, "go", "in time"), name="signal")
        with row_locked(db_engine, wid):
            signalling.start()
            wait_for(lambda: lock_waiters(db_engine) >= 1, what="the signal to block")
            # The sweep skips the locked row instead of waiting for it.
            assert dispatcher.run_once() == 0
        assert signalling.value().woke is True
    else:
        assert dispatcher.run_once() == 1
        result = durable.signal(wid, "go", "too late")
        assert (result.duplicate, result.woke) == (False, False)
    assert dispatcher.run_once() == 0
    assert sent(published) == [("durable.parker.after", [wid, 1])]

    assert durable.executor.execute(wid, 1) == "committed"
    inbox = signal_rows(db_engine, wid)
    if order == "signal_first":
        assert seen == [([("go", "in time")], False)]
        assert [(s["delivered"], s["consumed"]) for s in inbox] == [(True, True)]
    else:
        assert seen == [([], True)]
        # Not lost: it waits in the inbox for a later Await of that name.
        assert [(s["delivered"], s["consumed"]) for s in inbox] == [(False, False)]


# ---------------------------------------------------------------------------- claims


def declare_counted(durable, effects, *, gate=None, entered=None):
    wf = durable.workflow("counted", run_ahead=False)

    @wf.step
    def charge(ctx):
        effects.append((ctx.workflow_id, ctx.attempt))
        if entered is not None:
            entered.set()
            assert gate.wait(10)
        return {"charged_at_attempt": ctx.attempt}

    @wf.step
    def finish(ctx):
        return Done(ctx.state)

    return wf


def test_two_claims_of_one_message_run_the_step_once(make_durable, db_engine, recorder):
    one, two = make_durable(), make_durable()
    published = recorder(one, two)
    effects: list = []
    wf = declare_counted(one, effects)
    declare_counted(two, effects)
    wid = wf.start()
    published.clear()

    # The message was delivered twice (a redelivery after a visibility timeout): both
    # workers' claims queue behind the row lock and are let go together.
    with row_locked(db_engine, wid):
        claims = start_threads([lambda: one.executor.execute(wid, 0), lambda: two.executor.execute(wid, 0)])
        wait_for(lambda: lock_waiters(db_engine) >= 2, what="both claims to block")
    outcomes = sorted(t.value() for t in claims)

    assert outcomes == ["committed", "stale"]
    assert effects == [(wid, 0)]
    assert [(s.seq, s.step) for s in one.workflow_steps(wid)] == [(1, "charge")]
    assert sent(published) == [("durable.counted.finish", [wid, 1])]
    row = run_row(db_engine, wid)
    assert (row["status"], row["seq"], row["owner"]) == ("runnable", 1, None)


def test_many_simultaneous_claims_of_one_message_grant_one(durable, published, db_engine):
    wf = declare_counted(durable, [])
    wid = wf.start()
    for worker in range(8):
        durable.store.register_worker(f"w{worker}", hostname="h", pid=worker, nodename=None)
    barrier = threading.Barrier(8)

    def claim(worker):
        barrier.wait(5)
        return durable.store.claim(wid, 0, f"w{worker}")

    granted = [c for c in (t.value() for t in start_threads(
        [lambda w=w: claim(w) for w in range(8)])) if c is not None]
    assert len(granted) == 1
    claim_, _ = granted[0]
    row = run_row(db_engine, wid)
    assert (row["status"], row["lease"]) == ("executing", claim_.lease)
    assert row["owner"] in {f"w{i}" for i in range(8)}


def test_a_claim_racing_the_redispatch_of_its_message_runs_the_step_once(
        durable, published, db_engine, monkeypatch):
    """The original message of an overdue run is being claimed (the claim waits on the row)
    while the dispatcher sweeps: the sweep skips the row instead of re-sending it, the
    claim wins, and later sweeps find nothing to re-send."""
    effects: list = []
    wf = declare_counted(durable, effects)
    with monkeypatch.context() as patch:
        patch.setattr(durable.publisher, "publish", lambda dispatch: None)  # the first message is slow
        wid = wf.start()
    execute_sql(db_engine, "UPDATE {S}.runs SET dispatch_at = now() - interval '1 second' "
                           "WHERE id = :id", id=wid)
    dispatcher = durable.coordinator().dispatcher
    claiming = Worker(lambda: durable.executor.execute(wid, 0), name="original-message")
    with row_locked(db_engine, wid):
        claiming.start()
        wait_for(lambda: lock_waiters(db_engine) >= 1, what="the claim to block")
        assert dispatcher.run_once() == 0
    assert claiming.value() == "committed"
    assert dispatcher.run_once() == 0
    assert sent(published) == [("durable.counted.finish", [wid, 1])]
    assert effects == [(wid, 0)]
    assert [(s.seq, s.step) for s in durable.workflow_steps(wid)] == [(1, "charge")]


def add_worker(durable, engine, worker_id, *, heartbeat_age):
    durable.store.register_worker(worker_id, hostname="h", pid=1, nodename=None)
    execute_sql(engine, "UPDATE {S}.workers SET heartbeat_at = now() - make_interval(secs => :age)"
                        " WHERE id = :id", id=worker_id, age=heartbeat_age)


def age_claims(engine, worker_id, age=3600):
    execute_sql(engine, "UPDATE {S}.runs SET started_at = now() - make_interval(secs => :age)"
                        " WHERE owner = :id", id=worker_id, age=age)


def test_a_redelivered_claim_during_the_reclaim_is_dropped_and_the_step_runs_once(
        make_durable, db_engine, recorder, monkeypatch):
    """The old message comes back while the reaper's reclaim is under way (updated, row
    lock held, not committed): the claim sees the run still executing and drops the
    message; the reaper's own message then runs the step, once, at attempt 1."""
    one, two = make_durable(), make_durable()
    published = recorder(one, two)
    effects: list = []
    wf = declare_counted(one, effects)
    declare_counted(two, effects)
    wid = wf.start()
    add_worker(one, db_engine, DEAD, heartbeat_age=3600)
    assert one.store.claim(wid, 0, DEAD) is not None
    age_claims(db_engine, DEAD)
    published.clear()
    during: list[str] = []
    hooks_on(one, monkeypatch).after(sweeps_mod.REAP,
                                     lambda: during.append(two.executor.execute(wid, 0)))

    assert one.coordinator().reaper.run_once() == 1
    assert during == ["stale"]
    assert effects == []
    assert sent(published) == [("durable.counted.charge", [wid, 0])]  # the reaper's message

    assert two.executor.execute(wid, 0) == "committed"
    assert one.executor.execute(wid, 0) == "stale"  # any further copy of it
    assert one.executor.execute(wid, 1) == "committed"
    assert effects == [(wid, 1)]
    assert one.wait_result(wid, timeout=1) == {"charged_at_attempt": 1}
    assert [(s.seq, s.attempt) for s in one.workflow_steps(wid)] == [(1, 1), (2, 0)]


def test_a_claim_in_flight_is_not_taken_by_the_reaper(make_durable, db_engine, recorder):
    """A worker whose heartbeat is late claims a run while reaper passes run: neither the
    pass during the claim (which waits on the row) nor the one right after it takes the
    fresh claim; the claim itself proves the worker alive."""
    one, two = make_durable(), make_durable()
    recorder(one, two)
    wf = declare_counted(one, [])
    declare_counted(two, [])
    wid = wf.start()
    add_worker(one, db_engine, LATE, heartbeat_age=3600)
    reaper = one.coordinator().reaper

    claiming = Worker(lambda: two.store.claim(wid, 0, LATE), name="claim")
    with row_locked(db_engine, wid):
        claiming.start()
        wait_for(lambda: lock_waiters(db_engine) >= 1, what="the claim to block")
        assert reaper.run_once() == 0
    claim, started_at = claiming.value()
    assert reaper.run_once() == 0
    assert run_row(db_engine, wid)["owner"] == LATE

    assert two.executor.run_claimed(claim, LATE, started_at) == "committed"
    assert [(s.seq, s.attempt, s.worker) for s in two.workflow_steps(wid)] == [(1, 0, LATE)]


def test_a_late_commit_waiting_on_the_reaper_is_dropped(make_durable, db_engine, recorder,
                                                        monkeypatch):
    """A frozen worker wakes and commits while the reaper holds its run: the commit waits,
    then finds its lease gone and changes nothing; the step runs again elsewhere."""
    one, two = make_durable(), make_durable()
    published = recorder(one, two)
    effects: list = []
    entered, gate = threading.Event(), threading.Event()
    wf = declare_counted(one, effects)
    declare_counted(two, effects, gate=gate, entered=entered)
    wid = wf.start({"order": 5})
    add_worker(two, db_engine, DEAD, heartbeat_age=3600)
    claim, started_at = two.store.claim(wid, 0, DEAD)
    frozen = Worker(lambda: two.executor.run_claimed(claim, DEAD, started_at), name="frozen")
    frozen.start()
    assert entered.wait(5)
    age_claims(db_engine, DEAD)
    lost_before = two.stats().get("lease_lost", 0)
    published.clear()

    def wake_the_frozen_worker():
        gate.set()
        wait_for(lambda: lock_waiters(db_engine) >= 1, what="the late commit to block")

    hooks_on(one, monkeypatch).after(sweeps_mod.REAP, wake_the_frozen_worker)
    assert one.coordinator().reaper.run_once() == 1
    assert frozen.value() == "lease_lost"
    assert two.stats().get("lease_lost", 0) - lost_before == 1

    row = run_row(db_engine, wid)
    assert (row["status"], row["seq"], row["attempt"], row["owner"]) == ("runnable", 0, 1, None)
    assert row["state"] == {"order": 5}
    assert one.workflow_steps(wid) == []
    assert sent(published) == [("durable.counted.charge", [wid, 0])]

    assert one.executor.execute(wid, 0) == "committed"
    assert one.executor.execute(wid, 1) == "committed"
    assert effects == [(wid, 0), (wid, 1)]
    assert one.wait_result(wid, timeout=1) == {"charged_at_attempt": 1}
    history = one.workflow_steps(wid)
    assert [(s.seq, s.attempt) for s in history] == [(1, 1), (2, 0)]
    assert DEAD not in {s.worker for s in history}


# ---------------------------------------------------------------------------- sweeps


def broker_messages(client, queue):
    """``[(task name, args)]`` of every message waiting in the Redis queue."""
    found = []
    for raw in (m for name in redis_lists(client, queue) for m in client.lrange(name, 0, -1)):
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        found.append((envelope["headers"]["task"], args))
    return found


def declare_sweepable(durable):
    lost = durable.workflow("lost")

    @lost.step
    def only(ctx):
        return Done()

    parked = durable.workflow("parked")

    @parked.step
    def wait(ctx):
        return Await("never", timeout=600)

    @parked.step
    def woke(ctx):
        return Done(ctx.timed_out)

    return lost, parked


@pytest.mark.parametrize("round_", range(3))
def test_two_coordinators_sweeping_at_once_dispatch_reclaim_and_collect_each_row_once(
        make_durable, db_engine, redis_url, queue, monkeypatch, round_):
    """Two workers' coordinators run every sweep at the same moment over many due rows:
    lost messages, expired awaits, runs of a dead worker, finished runs past retention.
    Messages go to the real broker; each run gets exactly one."""
    one, two = make_durable(sweep_batch_size=16), make_durable(sweep_batch_size=16)
    lost, parked = declare_sweepable(one)
    declare_sweepable(two)
    with monkeypatch.context() as patch:  # set the rows up without any message
        patch.setattr(one.publisher, "publish_many", lambda dispatches: len(dispatches))
        expired = [parked.start() for _ in range(30)]
        collectable = [lost.start() for _ in range(30)]
        drain(one)
        overdue = [lost.start() for _ in range(60)]
        orphaned = [lost.start() for _ in range(30)]
    execute_sql(db_engine, "UPDATE {S}.runs SET await_deadline = now() - interval '1 second' "
                           "WHERE id = ANY(:ids)", ids=expired)
    execute_sql(db_engine, "UPDATE {S}.runs SET finished_at = now() - interval '30 days' "
                           "WHERE id = ANY(:ids)", ids=collectable)
    execute_sql(db_engine, "UPDATE {S}.runs SET dispatch_at = now() - interval '1 second' "
                           "WHERE id = ANY(:ids)", ids=overdue)
    add_worker(one, db_engine, DEAD, heartbeat_age=3600)
    for wid in orphaned:
        assert one.store.claim(wid, 0, DEAD) is not None
    age_claims(db_engine, DEAD)

    client = redis.Redis.from_url(redis_url)
    client.delete(*redis_lists(client, queue))
    try:
        coordinators = [one.coordinator(), two.coordinator()]
        barrier = threading.Barrier(2)

        def sweep(coordinator):
            barrier.wait(5)
            return coordinator.run_once()

        done = [t.value(30) for t in start_threads([lambda c=c: sweep(c) for c in coordinators])]
        messages = broker_messages(client, queue)
        again = [t.value(30) for t in start_threads([lambda c=c: sweep(c)
                                                      for c in coordinators])]
        assert sum(client.llen(n) for n in redis_lists(client, queue)) == len(messages)
    finally:
        client.delete(*redis_lists(client, queue))
        client.close()

    assert sum(done) == 60 + 30 + 30 + 30
    assert again == [0, 0]
    per_run = Counter(args[0] for _, args in messages)
    assert max(per_run.values()) == 1
    assert set(per_run) == set(overdue) | set(expired) | set(orphaned)
    assert {(name, args[1]) for name, args in messages if args[0] in expired} == {
        ("durable.parked.woke", 1)}
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE id = ANY(:ids)",
                  ids=collectable) == 0
    recovered = rows(db_engine, "SELECT status, attempt, recoveries FROM {S}.runs "
                                "WHERE id = ANY(:ids)", ids=orphaned)
    assert [(r["status"], r["attempt"], r["recoveries"]) for r in recovered] == \
        [("runnable", 1, 1)] * 30
    woken = rows(db_engine, "SELECT status, timed_out FROM {S}.runs WHERE id = ANY(:ids)",
                 ids=expired)
    assert {(r["status"], r["timed_out"]) for r in woken} == {("runnable", True)}
    assert {r["dispatch_count"] for r in rows(db_engine, "SELECT dispatch_count FROM {S}.runs "
                                                         "WHERE id = ANY(:ids)", ids=overdue)} \
        == {2}
