"""Starting runs and signalling inside the caller's own transaction (Connection or Session)."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

from durable_celery import Await, Done, DuplicateWorkflow, InvalidArgument
from durable_celery.storage import outbox
from durable_celery.testing import drain
from tests.integration.support import execute_sql, run_row, scalar, seconds, wait_for


@pytest.fixture
def orders(db_engine):
    """The caller's own table, in the same database."""
    with db_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS public.tx_orders (id text PRIMARY KEY)"))
        conn.execute(sa.text("TRUNCATE public.tx_orders"))
    return db_engine


@pytest.fixture
def ship(durable):
    @durable.task(name="tx.ship")
    def ship_order(order_id):
        return {"shipped": order_id}

    return ship_order


def count_orders(engine):
    return scalar(engine, "SELECT count(*) FROM public.tx_orders")


def test_session_commit_runs_and_publishes_after_commit(durable, published, orders, ship):
    with orm.Session(orders) as session:
        session.execute(sa.text("INSERT INTO public.tx_orders VALUES ('o1')"))
        handle = ship.apply_async(("o1",), connection=session)
        assert published.sent == []  # nothing before the commit
        assert scalar(orders, "SELECT count(*) FROM {S}.runs") == 0  # not visible yet
        session.commit()
    assert [m.args for m in published.sent] == [[handle.id, 0]]
    assert count_orders(orders) == 1
    drain(durable)
    assert handle.get(timeout=5) == {"shipped": "o1"}


def test_session_rollback_leaves_nothing(durable, published, orders, ship, db_engine):
    with orm.Session(orders) as session:
        session.execute(sa.text("INSERT INTO public.tx_orders VALUES ('o2')"))
        ship.apply_async(("o2",), connection=session)
        session.rollback()
        session.execute(sa.text("SELECT 1"))
        session.commit()  # a later commit of the same session publishes nothing
    assert count_orders(orders) == 0
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs") == 0
    time.sleep(0.1)
    assert published.sent == []


def test_connection_commit_and_rollback(durable, published, orders, ship, db_engine):
    with orders.connect() as conn:
        conn.execute(sa.text("INSERT INTO public.tx_orders VALUES ('o3')"))
        handle = ship.apply_async(("o3",), connection=conn)
        assert published.sent == []
        conn.commit()
    wait_for(lambda: len(published) == 1, what="the publish after commit")
    assert [m.args for m in published.sent] == [[handle.id, 0]]

    with orders.connect() as conn:
        with conn.begin():  # commits at the end of the block
            conn.execute(sa.text("INSERT INTO public.tx_orders VALUES ('o4')"))
            block = ship.apply_async(("o4",), connection=conn)
            conn.execute(sa.text("SELECT 1"))
        assert conn.in_transaction() is False
    with orders.connect() as conn:
        tx = conn.begin()
        conn.execute(sa.text("INSERT INTO public.tx_orders VALUES ('o5')"))
        lost = ship.apply_async(("o5",), connection=conn)
        tx.rollback()
    time.sleep(0.3)
    assert count_orders(orders) == 2  # o3, o4
    assert scalar(db_engine, "SELECT count(*) FROM {S}.runs WHERE id = :id", id=lost.id) == 0
    assert {m.args[0] for m in published.sent} == {handle.id, block.id}


def test_workflow_start_with_a_connection(durable, published, orders):
    wf = durable.workflow("tx_flow")

    @wf.step
    def only(ctx):
        return Done(ctx.state)

    with orders.begin() as conn:
        wid = wf.start({"n": 1}, connection=conn, priority=3, concurrency_key="acct:1")
    wait_for(lambda: len(published) == 1, what="publish")
    assert published.sent[0].options["priority"] == 6  # mirrored for Redis
    row = run_row(orders, wid)
    assert (row["priority"], row["concurrency_key"]) == (3, "acct:1")


def test_the_coordinator_publishes_if_the_caller_never_does(durable, published, orders, ship,
                                                            monkeypatch):
    """The caller's process stops between its commit and the publish (a deterministic
    stand-in for a crash; the e2e test kills a real process)."""
    monkeypatch.setattr(outbox.Bound, "after_commit", lambda *a, **k: None)
    with orm.Session(orders) as session:
        handle = ship.apply_async(("o6",), connection=session)
        session.commit()
    assert published.sent == []
    row = run_row(orders, handle.id)
    assert 0 < seconds(row["dispatch_at"] - row["created_at"]) <= outbox.OUTBOX_DELAY + 0.5
    dispatcher = durable.coordinator().dispatcher
    assert dispatcher.run_once() == 0  # the caller still has its chance first
    execute_sql(orders, "UPDATE {S}.runs SET dispatch_at = now() WHERE id = :id", id=handle.id)
    assert dispatcher.run_once() == 1
    assert [m.args for m in published.sent] == [[handle.id, 0]]


def test_duplicate_in_the_callers_transaction_keeps_it_usable(durable, published, orders, ship):
    ship.apply_async(("o7",), key="order:7")
    published.clear()
    with orm.Session(orders) as session:
        session.execute(sa.text("INSERT INTO public.tx_orders VALUES ('o7')"))
        with pytest.raises(DuplicateWorkflow):
            ship.apply_async(("o7",), key="order:7", connection=session)
        session.commit()
    assert count_orders(orders) == 1
    assert published.sent == []


def test_signal_in_the_callers_transaction(durable, published, orders):
    wf = durable.workflow("tx_signal")

    @wf.step
    def park(ctx):
        return Await("paid")

    @wf.step
    def done(ctx):
        return Done(ctx.signals[0].payload)

    wid = wf.start(key="pay:1")
    drain(durable)
    published.clear()
    with orm.Session(orders) as session:
        durable.signal("pay:1", "paid", {"amount": 1}, connection=session)
        session.rollback()
    assert durable.get_workflow(wid).status == "awaiting"
    assert scalar(orders, "SELECT count(*) FROM {S}.signals") == 0
    with orm.Session(orders) as session:
        result = durable.signal("pay:1", "paid", {"amount": 2}, connection=session)
        assert result.woke and published.sent == []
        session.commit()
    assert [m.args[0] for m in published.sent] == [wid]
    drain(durable)
    assert durable.wait_result(wid, timeout=5) == {"amount": 2}


def test_a_connection_to_another_database_is_refused(durable, published, admin_url, ship):
    other = sa.create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with other.connect() as conn, pytest.raises(InvalidArgument, match="own database"):
            ship.apply_async(("x",), connection=conn)
    finally:
        other.dispose()


def test_bad_connections_are_typed_errors(durable, published, orders, ship):
    for bad in ("postgresql://", object(), orders, 42):
        with pytest.raises(InvalidArgument):
            ship.apply_async(("x",), connection=bad)
        with pytest.raises(InvalidArgument):
            durable.signal("nobody", "x", connection=bad)
    conn = orders.connect()
    conn.close()
    with pytest.raises(InvalidArgument, match="closed"):
        ship.apply_async(("x",), connection=conn)
