"""A worker process frozen inside one of our transactions (SIGSTOP, a debugger, swapping) holds
the run's row lock. The server ends such a session after ``stale_after``, so the reaper (which
skips locked rows) and signals reach the run again, and the frozen commit never lands."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from durable_celery import Await, Done
from tests.integration.support import q, run_row
from tests.integration.test_recovery import DEAD, add_worker, age_claims


def test_a_session_frozen_in_a_transaction_is_ended_and_its_run_reclaimed(
        durable, published, db_engine):
    wf = durable.workflow("frozen")

    @wf.step
    def park(ctx):
        return Await("go")

    @wf.step
    def finish(ctx):
        return Done(ctx.signals[0].payload)

    wid = wf.start()
    add_worker(durable, db_engine, DEAD, heartbeat_age=3600)
    durable.store.claim(wid, 0, DEAD)
    age_claims(db_engine, DEAD)

    # The frozen process: a library connection inside a transaction that locked the run row
    # (as the commit statement does), then nothing.
    frozen = durable.store.db.engine.connect()
    tx = frozen.begin()
    frozen.execute(q("UPDATE {S}.runs SET updated_at = now() WHERE id = :id"), {"id": wid})

    # While the lock is held, the reaper skips the row.
    assert durable.coordinator().reaper.run_once() == 0
    assert run_row(db_engine, wid)["status"] == "executing"

    # After stale_after (2 s here) the server ends the idle-in-transaction session.
    deadline = time.monotonic() + 10
    reaped = 0
    while time.monotonic() < deadline and not reaped:
        time.sleep(0.25)
        reaped = durable.coordinator().reaper.run_once()
    assert reaped == 1
    assert run_row(db_engine, wid)["status"] == "runnable"

    # The frozen process wakes up: its commit fails, nothing it did lands.
    with pytest.raises(sa.exc.DBAPIError):
        tx.commit()
    frozen.close()
    row = run_row(db_engine, wid)
    assert (row["status"], row["attempt"], row["owner"]) == ("runnable", 1, None)


def test_connections_of_other_tools_are_not_limited(durable, db_engine):
    # The limit is set on durable_celery's own sessions only, and follows stale_after.
    with durable.store.db.engine.connect() as conn:
        ours = conn.execute(sa.text("SHOW idle_in_transaction_session_timeout")).scalar()
    with db_engine.connect() as conn:
        theirs = conn.execute(sa.text("SHOW idle_in_transaction_session_timeout")).scalar()
    assert ours == "2s"
    assert theirs == "0"
