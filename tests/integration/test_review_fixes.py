"""Races and failure paths found in review, each pinned by a test."""

from __future__ import annotations

import time

import pytest

from durable_celery import Await, Done, errors
from durable_celery.runtime import executor
from durable_celery.storage.listener import Listener
from durable_celery.testing import drain
from tests.integration.support import execute_sql, run_row


class Interrupted(BaseException):
    """Like KeyboardInterrupt or a cancellation: not an Exception."""


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


def test_a_step_raising_a_base_exception_hands_the_run_back(durable, published, db_engine):
    wf = durable.workflow("interrupted")
    attempts = []

    @wf.step
    def only(ctx):
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            raise Interrupted()
        return Done("ok")

    wid = wf.start()
    with pytest.raises(Interrupted):
        durable.executor.execute(wid, 0)
    row = run_row(db_engine, wid)
    assert (row["status"], row["owner"], row["lease"]) == ("runnable", None, None)
    drain(durable)
    assert durable.wait_result(wid, timeout=1) == "ok"


def test_timed_out_survives_a_retry_of_the_woken_step(durable, published):
    wf = durable.workflow("timeout_retry")
    seen = []

    @wf.step
    def park(ctx):
        return Await("never", timeout=60)

    @wf.step(retry={"max_attempts": 2, "delay": 0, "jitter": False})
    def after(ctx):
        seen.append(ctx.timed_out)
        if len(seen) == 1:
            raise RuntimeError("flaky")
        return Done(ctx.timed_out)

    wid = wf.start()
    drain(durable, expire_awaits=True)
    assert durable.wait_result(wid, timeout=1) is True
    assert seen == [True, True]


def test_a_signal_by_key_reaches_the_live_run_not_a_finished_namesake(durable, published):
    wf = durable.workflow("namesake")

    @wf.step
    def park(ctx):
        return Await("go")

    @wf.step
    def finish(ctx):
        return Done(ctx.signals[0].payload)

    finished = wf.start(workflow_id="order:42", key="order:42", key_reuse="after_finish")
    durable.signal("order:42", "go", "first")
    drain(durable)
    assert durable.wait_result(finished, timeout=1) == "first"
    live = wf.start(key="order:42")
    drain(durable)
    assert durable.signal("order:42", "go", "second").workflow_id == live
    drain(durable)
    assert durable.wait_result(live, timeout=1) == "second"


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


def test_the_dispatcher_stops_at_the_first_broker_failure(durable, db_engine, monkeypatch):
    wf = durable.workflow("broker_down")

    @wf.step
    def only(ctx):
        return Done()

    monkeypatch.setattr(durable.publisher, "publish", lambda dispatch: True)  # started, never sent
    ids = [wf.start() for _ in range(5)]
    execute_sql(db_engine, "UPDATE {S}.runs SET dispatch_at = now() - interval '1 second'")
    calls = []

    def broker_down(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(durable.app, "send_task", broker_down)
    assert durable.coordinator().dispatcher.run_once() == 0
    assert len(calls) == 1  # not one slow failure per due run
    due_later = [run_row(db_engine, wid)["dispatch_at"] for wid in ids]
    assert len(due_later) == 5


def test_drain_ends_when_nothing_can_progress(durable, make_durable, published):
    other = make_durable()
    wf = other.workflow("elsewhere")

    @wf.step
    def only(ctx):
        return Done()

    wf.start()  # runnable, but `durable` has no such workflow registered
    tally = drain(durable)
    assert tally["released"] >= 1
    assert tally["steps"] == 0


def test_the_listener_never_spins_without_a_database():
    from durable_celery.storage.engine import EngineHolder

    listener = Listener(EngineHolder("postgresql+psycopg://postgres@127.0.0.1:1/none"))
    began = time.monotonic()
    assert listener.wait(0) is False
    assert time.monotonic() - began >= 0.2
    listener.close()
