"""Pooled connections the server closed are replaced without a ping per transaction:
``pg_terminate_backend`` on every pooled connection, then the next calls just work."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from durable_celery import errors
from durable_celery.testing import drain


def pooled_backends(durable, n: int) -> set[int]:
    """Check out ``n`` connections at once (so the pool holds ``n``); their backend pids."""
    conns = [durable._holder.engine.connect() for _ in range(n)]
    try:
        return {c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() for c in conns}
    finally:
        for c in conns:
            c.close()


def terminate(db_engine, pids: set[int]) -> None:
    with db_engine.connect() as conn:
        killed = conn.execute(sa.text("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                                      "FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                              {"pids": sorted(pids)}).scalar_one()
    assert killed == len(pids)
    deadline = time.monotonic() + 10
    while True:  # until the backends are gone (their goodbye is then in the sockets)
        with db_engine.connect() as conn:
            left = conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity "
                                        "WHERE pid = ANY(:pids)"),
                                {"pids": sorted(pids)}).scalar_one()
        if not left:
            return
        assert time.monotonic() < deadline, "terminated backends did not exit"
        time.sleep(0.01)


def test_terminated_pool_connections_are_replaced_at_checkout(durable, published, db_engine):
    wf = durable.workflow("recon")

    @wf.step
    def one(ctx):
        return {"n": 1}

    @wf.step
    def two(ctx):
        return {"n": 2}

    wf.start()
    old = pooled_backends(durable, 3)
    terminate(db_engine, old)

    # Every call below checks out a terminated connection first: none may fail.
    wid = wf.start()
    assert drain(durable)["steps"] == 4
    assert durable.wait_result(wid, timeout=1) == {"n": 2}
    assert pooled_backends(durable, 3).isdisjoint(old)


def test_a_connection_lost_mid_transaction_is_a_transient_error(durable, db_engine):
    durable.ensure_ready()
    with pytest.raises(errors.StorageError) as caught, durable._holder.begin() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        terminate(db_engine, {pid})
        conn.execute(sa.text("SELECT 1"))
    assert caught.value.transient
    # The next transaction gets a fresh connection.
    with durable._holder.begin() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1


def test_a_connection_lost_under_a_claim_is_transient_and_replaced(durable, published,
                                                                    db_engine):
    wf = durable.workflow("lost")

    @wf.step
    def only(ctx):
        return {"ok": True}

    wid = wf.start()
    worker = durable._identity.get().ensure()
    with durable._holder.raw() as conn:  # the connection the claim will check out next
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        # Terminated while checked out: the checkout poll cannot see it; the claim fails.
        terminate(db_engine, {pid})
    # Between the kill and the claim the socket turned readable: the pool replaces it.
    claimed = durable.store.claim(wid, 0, worker)
    assert claimed is not None

    with pytest.raises(errors.StorageError) as caught, durable._holder.raw() as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        terminate(db_engine, {pid})
        conn.execute("SELECT 1")
    assert caught.value.transient
    with durable._holder.raw() as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1
    with durable._holder.begin() as conn:  # the pool hands out transactional connections
        assert conn.connection.driver_connection.autocommit is False


def test_a_claim_whose_answer_is_lost_is_released_by_its_lease(durable, published, db_engine,
                                                                monkeypatch):
    from tests.integration.support import run_row

    wf = durable.workflow("lost_answer")

    @wf.step
    def only(ctx):
        return {"ok": True}

    wid, other = wf.start(), wf.start()
    real_claim = durable.store.claim
    # This test hands the leases back itself, step by step: no background orphan thread.
    monkeypatch.setattr(durable._identity.get(), "_tend_orphans", lambda: None)

    def lands_then_fails(*args, **kwargs):
        real_claim(*args, **kwargs)  # committed on the server...
        raise errors.StorageError("connection lost", transient=True)  # ...answer lost

    monkeypatch.setattr(durable.store, "claim", lands_then_fails)
    with pytest.raises(errors.StorageError):
        durable.executor.execute(wid, 0)
    monkeypatch.setattr(durable.store, "claim", real_claim)
    row = run_row(db_engine, wid)
    assert row["status"] == "executing"  # held by this live process, which knows nothing
    assert row["owner"] == durable._identity.get().id

    # A claim that failed before landing: its lease releases nothing.
    def fails(*args, **kwargs):
        raise errors.StorageError("connection refused", transient=True)

    monkeypatch.setattr(durable.store, "claim", fails)
    with pytest.raises(errors.StorageError):
        durable.executor.execute(other, 0)
    monkeypatch.setattr(durable.store, "claim", real_claim)

    durable._identity.get()._release_orphans()  # what the orphan thread does next
    row = run_row(db_engine, wid)
    assert (row["status"], row["owner"], row["lease"]) == ("runnable", None, None)
    assert run_row(db_engine, other)["status"] == "runnable"
    published.clear()
    # Both messages were consumed by the failed claims: both runs are sent again at the
    # dispatcher's next pass, not after redispatch_after.
    assert durable.coordinator().dispatcher.run_once() == 2
    assert published.for_run(wid) and published.for_run(other)
    assert durable.executor.execute(wid, 0) == "committed"
    assert run_row(db_engine, wid)["status"] == "done"
