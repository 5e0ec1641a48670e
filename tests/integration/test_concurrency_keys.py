"""Concurrency keys and priority against real Postgres: one executing run per key, hand-off
on commit, parked runs release the key, no key never waits; priority ordering and range."""

from __future__ import annotations

import threading

import pytest

from durable_celery import Await, Done, Fail, InvalidArgument, Sleep
from durable_celery.testing import drain
from tests.integration.support import execute_sql, run_row, scalar, start_threads, wait_for


@pytest.fixture
def gate():
    return threading.Event()


@pytest.fixture
def blocking(durable, gate):
    wf = durable.workflow("blocking")
    entered = threading.Semaphore(0)

    @wf.step
    def hold(ctx):
        entered.release()
        assert gate.wait(10)
        return Done(ctx.workflow_id)

    wf.entered = entered
    return wf


def test_a_busy_key_holds_the_second_run_until_the_holder_commits(durable, published,
                                                                  blocking, gate, db_engine):
    a = blocking.start(concurrency_key="acct:7")
    b = blocking.start(concurrency_key="acct:7")
    free = blocking.start(concurrency_key="acct:8")
    none = blocking.start()
    holder = start_threads([lambda: durable.executor.execute(a, 0)])[0]
    assert blocking.entered.acquire(timeout=10)
    assert durable.executor.execute(b, 0) == "stale"  # key busy: dropped, still runnable
    assert run_row(db_engine, b)["status"] == "runnable"
    # Other keys and runs without a key are never held.
    others = start_threads([lambda: durable.executor.execute(free, 0),
                            lambda: durable.executor.execute(none, 0)])
    assert blocking.entered.acquire(timeout=10) and blocking.entered.acquire(timeout=10)
    # b is not re-sent while it waits (no polling): its next publish is the lost-message floor.
    execute_sql(db_engine, "UPDATE {S}.runs SET dispatch_at = now() + interval '1 hour' "
                "WHERE id = :id", id=b)
    published.clear()
    assert durable.coordinator().dispatcher.run_once() == 0
    gate.set()
    assert holder.value() == "committed"
    assert [t.value() for t in others] == ["committed", "committed"]
    # The holder's commit handed the key to b: due for the dispatcher now.
    assert durable.coordinator().dispatcher.run_once() == 1
    assert [m.args for m in published.sent] == [[b, 0]]
    assert durable.executor.execute(b, 0) == "committed"
    assert durable.wait_result(b, timeout=5) == b


def test_racing_claims_for_one_key_never_both_win(durable, published, db_engine):
    wf = durable.workflow("racy")

    @wf.step
    def only(ctx):
        return Done()

    owner = durable._identity.get().ensure()
    for round_ in range(15):
        ids = [wf.start(concurrency_key=f"race:{round_}") for _ in range(4)]
        barrier = threading.Barrier(len(ids))

        def claim(wid, barrier=barrier):
            barrier.wait()
            return durable.store.claim(wid, 0, owner)

        results = [t.value() for t in start_threads([lambda w=w: claim(w) for w in ids])]
        assert sum(r is not None for r in results) == 1, results


def test_await_and_sleep_release_the_key(durable, published, db_engine):
    wf = durable.workflow("parks")

    @wf.step
    def first(ctx):
        if ctx.state.get("mode") == "sleep":
            return Sleep(seconds=3600)
        return Await("go")

    @wf.step
    def second(ctx):
        return Done(ctx.state.get("mode"))

    awaiting = wf.start({"mode": "await"}, concurrency_key="k")
    sleeping = wf.start({"mode": "sleep"}, concurrency_key="k")
    third = wf.start({"mode": "await"}, concurrency_key="k")
    for wid in (awaiting, sleeping, third):
        assert durable.executor.execute(wid, 0) == "committed"
    statuses = [durable.get_workflow(w).status for w in (awaiting, sleeping, third)]
    assert statuses == ["awaiting", "runnable", "awaiting"]


def test_drain_serializes_runs_of_one_key(durable, published):
    @durable.task(name="keyed.task")
    def keyed(n):
        return n

    handles = [keyed.apply_async((n,), concurrency_key="one") for n in range(5)]
    drain(durable)
    assert [h.get(timeout=5) for h in handles] == list(range(5))


def test_priority_orders_the_dispatch_sweep(durable, published, db_engine):
    wf = durable.workflow("prio")

    @wf.step
    def only(ctx):
        return Done()

    ids = {p: wf.start(priority=p) for p in (0, 9, 4)}
    published.clear()
    execute_sql(db_engine, "UPDATE {S}.runs SET dispatch_at = now() - interval '1 second'")
    assert durable.coordinator().dispatcher.run_once() == 3
    assert [m.args[0] for m in published.sent] == [ids[9], ids[4], ids[0]]
    # Redis (kombu) serves priority 0 first: the published priority is mirrored.
    assert [m.options["priority"] for m in published.sent] == [0, 5, 9]


@pytest.mark.parametrize("bad", [-1, 10, 1.5, "9", True])
def test_priority_out_of_range_is_a_typed_error(durable, published, bad, db_engine):
    wf = durable.workflow("prio_bad")

    @wf.step
    def only(ctx):
        return Done()

    with pytest.raises(InvalidArgument, match="priority"):
        wf.start(priority=bad)
    assert published.sent == []


def test_rabbitmq_priority_is_not_mirrored(make_durable):
    durable = make_durable(broker="amqp://guest:guest@127.0.0.1:5672//")
    assert durable.publisher.broker_priority(9) == 9 and durable.publisher.broker_priority(0) == 0


def test_a_busy_run_is_woken_once_the_key_frees(durable, published, blocking, gate, db_engine):
    """End to end through the dispatcher: the waiter is published by the hand-off."""
    a = blocking.start(concurrency_key="acct:9")
    b = blocking.start(concurrency_key="acct:9")
    holder = start_threads([lambda: durable.executor.execute(a, 0)])[0]
    assert blocking.entered.acquire(timeout=10)
    assert durable.executor.execute(b, 0) == "stale"
    gate.set()
    holder.value()
    published.clear()
    wait_for(lambda: durable.coordinator().dispatcher.run_once() > 0, what="hand-off")
    assert published.for_run(b)


def test_a_key_freed_by_a_cancel_wakes_its_waiter(durable, published, blocking, gate,
                                                   db_engine):
    a = blocking.start(concurrency_key="acct:10")
    b = blocking.start(concurrency_key="acct:10")
    holder = start_threads([lambda: durable.executor.execute(a, 0)])[0]
    assert blocking.entered.acquire(timeout=10)
    assert durable.executor.execute(b, 0) == "stale"
    assert durable.cancel_workflow(a, "cancel-a")["changed"] is True
    # b was published moments ago: the safety net leaves it alone for `quiet` seconds...
    assert durable.store.wake_free_keys(100, quiet=5.0) == 0
    # ...then makes it due (no run holds the key, nobody was sent for it).
    assert durable.store.wake_free_keys(100, quiet=0.0) == 1
    published.clear()
    assert durable.coordinator().dispatcher.run_once() == 1
    assert [m.args for m in published.sent] == [[b, 0]]
    # Just dispatched: the net does not fire again (no storm).
    assert durable.store.wake_free_keys(100, quiet=5.0) == 0
    gate.set()
    assert holder.value() == "lease_lost"
    assert durable.executor.execute(b, 0) == "committed"


def test_the_net_ignores_keys_that_are_held_or_already_due(durable, published, blocking, gate,
                                                           db_engine):
    a = blocking.start(concurrency_key="acct:11")
    b = blocking.start(concurrency_key="acct:11")
    holder = start_threads([lambda: durable.executor.execute(a, 0)])[0]
    assert blocking.entered.acquire(timeout=10)
    assert durable.store.wake_free_keys(100, quiet=0.0) == 0  # held by a
    gate.set()
    holder.value()
    # a's commit handed the key to b already (due now): nothing for the net to do.
    assert run_row(db_engine, b)["dispatch_at"] <= run_row(db_engine, b)["updated_at"]
    assert durable.store.wake_free_keys(100, quiet=0.0) == 0


def test_waiters_take_the_key_in_order_no_newcomer_jumps_the_queue(durable, published,
                                                                  db_engine):
    wf = durable.workflow("fifo")

    @wf.step
    def only(ctx):
        return Done(ctx.workflow_id)

    a, b, c = (wf.start(concurrency_key="q") for _ in range(3))
    urgent = wf.start(concurrency_key="q", priority=9)
    assert durable.executor.execute(a, 0) == "stale"  # urgent is ahead of everyone
    assert durable.executor.execute(urgent, 0) == "committed"
    # c's message arrives first, but a and b have waited longer.
    assert durable.executor.execute(c, 0) == "stale"
    assert durable.executor.execute(b, 0) == "stale"
    assert durable.executor.execute(a, 0) == "committed"
    assert durable.executor.execute(c, 0) == "stale"
    assert durable.executor.execute(b, 0) == "committed"
    assert durable.executor.execute(c, 0) == "committed"
    assert {durable.get_workflow(w).status for w in (a, b, c, urgent)} == {"done"}


def declare_saga(durable):
    wf = durable.workflow("keyed_saga", run_ahead=False)

    @wf.step(compensate="undo")
    def reserve(ctx):
        return None

    @wf.step
    def pay(ctx):
        return Done("paid")

    @wf.compensation
    def undo(ctx):
        return None

    return wf


def make_compensating(engine, wid):
    """As a failed step (or the reaper) leaves a saga: compensating, waiting for a claim,
    its message long gone (dispatch in an hour)."""
    execute_sql(engine, "UPDATE {S}.runs SET status = 'compensating', step = 'undo', seq = 2, "
                        "failure = '{\"type\": \"Fail\"}', compensations = "
                        "'[{\"step\": \"reserve\", \"compensation\": \"undo\", \"seq\": 1}]', "
                        "eligible_at = now(), dispatch_at = now() + interval '1 hour' "
                        "WHERE id = :id", id=wid)


def test_a_key_holders_end_hands_the_key_to_a_waiting_compensation(durable, published,
                                                                   blocking, gate, db_engine):
    """Finding 10: H holds the key; a runnable newcomer N (older) and a compensating saga A
    wait for it. H's commit hands the key to A's compensation, which goes first."""
    saga = declare_saga(durable)
    h = blocking.start(concurrency_key="acct:3")
    holder = start_threads([lambda: durable.executor.execute(h, 0)])[0]
    assert blocking.entered.acquire(timeout=10)
    n = saga.start({}, concurrency_key="acct:3")
    a = saga.start({}, concurrency_key="acct:3")
    make_compensating(db_engine, a)
    execute_sql(db_engine, "UPDATE {S}.runs SET dispatch_at = now() + interval '1 hour' "
                           "WHERE id = :id", id=n)
    gate.set()
    assert holder.value() == "committed"
    assert run_row(db_engine, a)["dispatch_at"] <= run_row(db_engine, a)["updated_at"]
    assert run_row(db_engine, n)["dispatch_at"] > run_row(db_engine, n)["updated_at"]
    assert durable.executor.execute(n, 0) == "stale"  # the compensation is ahead
    assert durable.executor.execute(a, 2) == "committed"
    assert durable.get_workflow(a).status == "compensated"
    drain(durable)
    assert durable.wait_result(n, timeout=5) == "paid"


def test_a_waiting_compensation_is_woken_when_a_cancel_frees_the_key(durable, published,
                                                                     blocking, gate, db_engine):
    saga = declare_saga(durable)
    h = blocking.start(concurrency_key="acct:4")
    holder = start_threads([lambda: durable.executor.execute(h, 0)])[0]
    assert blocking.entered.acquire(timeout=10)
    a = saga.start({}, concurrency_key="acct:4")
    make_compensating(db_engine, a)
    execute_sql(db_engine, "UPDATE {S}.runs SET dispatched_at = now() - interval '1 hour' "
                           "WHERE id = :id", id=a)
    durable.cancel_workflow(h, "cancel-h")  # frees the key without a hand-off
    assert durable.store.wake_free_keys(100, quiet=0.0) == 1
    assert run_row(db_engine, a)["dispatch_at"] <= run_row(db_engine, a)["updated_at"]
    gate.set()
    assert holder.value() == "lease_lost"
    drain(durable)
    assert durable.get_workflow(a).status == "compensated"


def test_a_locked_waiter_never_blocks_a_coordinator_pass(durable, published, blocking, gate,
                                                         db_engine, monkeypatch):
    """Finding 9: the head waiter of a freed key is row-locked by a caller's open
    transaction; every sweep of the pass still runs (here: a timer is published)."""
    from sqlalchemy import orm

    from durable_celery.coordinator import sweeps

    monkeypatch.setattr(sweeps, "KEY_QUIET", 0.0)
    a = blocking.start(concurrency_key="acct:12")
    b = blocking.start(concurrency_key="acct:12")
    holder = start_threads([lambda: durable.executor.execute(a, 0)])[0]
    assert blocking.entered.acquire(timeout=10)
    assert durable.executor.execute(b, 0) == "stale"
    durable.cancel_workflow(a, "cancel-a")
    gate.set()
    holder.value()
    execute_sql(db_engine, "UPDATE {S}.runs SET dispatch_at = now() + interval '1 hour', "
                           "dispatched_at = now() - interval '1 hour' WHERE id = :id", id=b)
    wf = durable.workflow("timer")

    @wf.step
    def only(ctx):
        return Done()

    with orm.Session(db_engine) as session, session.begin():
        durable.signal(b, "note", connection=session)  # locks b's row until commit
        timer = wf.start({}, delay=0.2)
        published.clear()
        import time

        time.sleep(0.3)
        (pass_,) = start_threads([lambda: durable.coordinator().run_once()])
        pass_.value(timeout=5)  # would hang while the session holds b's row
        assert published.for_run(timer)
    durable.coordinator().dispatcher.run_once()  # lock gone: b is woken now
    assert published.for_run(b)


def live_executing_with_key(engine, key):
    """Runs whose step is being executed right now (claimed) under concurrency key ``key``."""
    return scalar(engine, "SELECT count(*) FROM {S}.runs WHERE concurrency_key = :k "
                          "AND owner IS NOT NULL AND status IN ('executing', 'compensating')",
                  k=key)


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
