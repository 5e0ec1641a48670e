"""Lost messages: a committed run whose message never reached the broker is re-published by
the dispatcher sweep, with backoff per run, and never twice in one round."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from durable_celery import Done
from durable_celery.testing import drain
from tests.integration.support import execute_sql, rows, run_row, seconds, start_threads


def declare_one_step(durable):
    wf = durable.workflow("lost")

    @wf.step
    def only(ctx):
        return Done(ctx.state)

    return wf


def start_unpublished(durable, wf, monkeypatch, count=1):
    """Start runs whose first message is lost between the commit and the broker."""
    with monkeypatch.context() as patch:
        patch.setattr(durable.publisher, "publish", lambda dispatch: None)
        return [wf.start({"i": i}) for i in range(count)]


def overdue(engine, wid=None):
    where = "" if wid is None else " AND id = :id"
    execute_sql(engine, "UPDATE {S}.runs SET dispatch_at = now() - interval '1 second' "
                        "WHERE status = 'runnable'" + where, id=wid)


def test_a_lost_message_is_republished_when_overdue(durable, published, db_engine,
                                                    monkeypatch, queue):
    wf = declare_one_step(durable)
    [wid] = start_unpublished(durable, wf, monkeypatch)
    dispatcher = durable.coordinator().dispatcher
    row = run_row(db_engine, wid)
    assert (row["status"], row["dispatch_count"]) == ("runnable", 1)
    assert seconds(row["dispatch_at"] - row["dispatched_at"]) == pytest.approx(2.0, abs=1e-3)

    assert dispatcher.run_once() == 0  # not overdue yet: the message may still be in flight
    assert len(published) == 0

    overdue(db_engine, wid)
    assert dispatcher.run_once() == 1
    assert [(m.name, m.args, m.options["queue"]) for m in published.sent] == [
        ("durable.lost.only", [wid, 0], queue)]
    assert run_row(db_engine, wid)["dispatch_count"] == 2
    assert dispatcher.run_once() == 0

    drain(durable)
    assert durable.wait_result(wid, timeout=1) == {"i": 0}


def test_a_failed_publish_is_sent_by_the_next_sweep(durable, db_engine, monkeypatch):
    wf = declare_one_step(durable)

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(durable.app, "send_task", broker_down)
    wid = wf.start()  # the commit stands; the caller is not told to retry
    row = run_row(db_engine, wid)
    # Re-sent soon (not at once: the broker just failed), the per-run backoff count kept.
    assert (row["status"], row["dispatched_at"], row["dispatch_count"]) == ("runnable", None, 1)

    sent = []
    monkeypatch.setattr(durable.app, "send_task", lambda name, args=None, **kw: sent.append(args))
    dispatcher = durable.coordinator().dispatcher
    assert dispatcher.run_once() == 0  # not in a tight loop against a failing broker
    execute_sql(db_engine, "UPDATE {S}.runs SET dispatch_at = now() WHERE id = :id", id=wid)
    assert dispatcher.run_once() == 1
    assert sent == [[wid, 0]]


def test_redispatch_backs_off_per_run(make_durable, db_engine, monkeypatch, recorder):
    durable = make_durable(redispatch_after=2.0, redispatch_max_backoff=10.0)
    published = recorder(durable)
    wf = declare_one_step(durable)
    [wid] = start_unpublished(durable, wf, monkeypatch)
    dispatcher = durable.coordinator().dispatcher

    intervals, counts = [], []
    row = run_row(db_engine, wid)
    intervals.append(seconds(row["dispatch_at"] - row["dispatched_at"]))
    counts.append(row["dispatch_count"])
    for _ in range(4):
        overdue(db_engine, wid)
        assert dispatcher.run_once() == 1
        row = run_row(db_engine, wid)
        intervals.append(seconds(row["dispatch_at"] - row["dispatched_at"]))
        counts.append(row["dispatch_count"])

    assert counts == [1, 2, 3, 4, 5]
    assert intervals == pytest.approx([2, 4, 8, 10, 10], abs=1e-3)
    assert [m.args for m in published.sent] == [[wid, 0]] * 4


def test_two_dispatchers_never_publish_a_due_row_twice(make_durable, db_engine, monkeypatch,
                                                      recorder):
    one = make_durable(sweep_batch_size=25)
    two = make_durable(sweep_batch_size=25)
    published = recorder(one, two)
    wf = declare_one_step(one)
    declare_one_step(two)
    wids = start_unpublished(one, wf, monkeypatch, count=200)
    overdue(db_engine)

    barrier = threading.Barrier(2)

    def sweep(durable):
        barrier.wait(5)
        return durable.coordinator().dispatcher.run_once()

    done = [t.value() for t in start_threads([lambda: sweep(one), lambda: sweep(two)])]
    assert sum(done) == 200
    per_run = Counter(m.args[0] for m in published.sent)
    assert set(per_run) == set(wids)
    assert max(per_run.values()) == 1
    assert {r["dispatch_count"] for r in rows(db_engine, "SELECT dispatch_count FROM {S}.runs")} \
        == {2}


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
