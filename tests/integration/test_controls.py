"""Control requests, idempotency: replays, conflicts, trimmed keys, failures recorded, one
transaction per request (no key left "in progress"), TTL expiry and cleanup, and duplicate
requests racing from threads. Real Postgres throughout."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from durable_celery import Done, Next
from durable_celery.errors import (
    ControlError,
    DuplicateWorkflow,
    IdempotencyConflict,
    WorkflowNotFound,
)
from durable_celery.storage.controls import ControlStore
from durable_celery.testing import drain
from tests.integration.support import execute_sql, q, rows, run_row, scalar, start_threads

THREADS = 8


def declare_chain(durable: Any, calls: list | None = None) -> Any:
    wf = durable.workflow("chain", run_ahead=False)

    @wf.step
    def a(ctx):
        if calls is not None:
            calls.append((ctx.workflow_id, "a"))
        ctx.state["trail"] = [*ctx.state.get("trail", []), "a"]
        return Next("b")

    @wf.step
    def b(ctx):
        if calls is not None:
            calls.append((ctx.workflow_id, "b"))
        ctx.state["trail"] = [*ctx.state.get("trail", []), "b"]
        return Done(ctx.state["trail"])

    return wf


def record(engine: Any, key: str) -> dict | None:
    found = rows(engine, "SELECT action, target, status, response, error, "
                         "expires_at - created_at AS ttl FROM {S}.control_requests "
                         "WHERE request_key = :k", k=key)
    return found[0] if found else None


def forks_of(engine: Any, source: str) -> list[str]:
    return [r["id"] for r in rows(engine, "SELECT id FROM {S}.runs WHERE forked_from = :s",
                                  s=source)]


def expire(engine: Any, key: str) -> None:
    assert execute_sql(engine, "UPDATE {S}.control_requests SET expires_at = now() - "
                               "interval '1 second', created_at = now() - interval '8 days' "
                               "WHERE request_key = :k", k=key) == 1


# ---------------------------------------------------------------------------- replay


def test_same_key_same_request_replays_the_stored_response(durable, published, db_engine):
    wf = declare_chain(durable)
    wid = wf.start({"n": 1})
    first = durable.cancel_workflow(wid, "cancel-1", reason="stop")
    assert first == {"ok": True, "changed": True, "idempotency_key": "cancel-1",
                     "idempotency_replayed": False}
    stored = record(db_engine, "cancel-1")
    assert (stored["action"], stored["target"], stored["status"]) == ("cancel", wid, "succeeded")
    assert stored["response"]["changed"] is True
    assert stored["ttl"].total_seconds() == pytest.approx(7 * 86400, abs=5)

    # The run is cancelled now: a fresh request would answer changed=False; the replay
    # answers what the first request answered.
    again = durable.cancel_workflow(wid, "cancel-1", reason="another reason")
    assert again == {**first, "idempotency_replayed": True}
    assert run_row(db_engine, wid)["error"]["reason"] == "stop"
    fresh = durable.cancel_workflow(wid, "cancel-2")
    assert (fresh["changed"], fresh["idempotency_replayed"]) == (False, False)


def test_replayed_fork_runs_nothing_again(durable, published, db_engine):
    calls: list = []
    wf = declare_chain(durable, calls)
    wid = wf.start({})
    drain(durable)
    published.clear()

    first = durable.fork_workflow(wid, "fork-1")
    assert first["idempotency_replayed"] is False
    new_id = first["workflow_id"]
    assert len(published.for_run(new_id)) == 1
    again = durable.fork_workflow(wid, "fork-1")
    assert again == {**first, "idempotency_replayed": True}
    assert forks_of(db_engine, wid) == [new_id]
    assert len(published.for_run(new_id)) == 1  # the replay publishes nothing

    drain(durable)
    ran = [c for c in calls if c[0] == new_id]
    assert ran == [(new_id, "a"), (new_id, "b")]
    durable.fork_workflow(wid, "fork-1")
    drain(durable)
    assert [c for c in calls if c[0] == new_id] == ran
    assert forks_of(db_engine, wid) == [new_id]


def test_the_key_is_trimmed(durable, published, db_engine):
    wf = declare_chain(durable)
    wid = wf.start({})
    first = durable.cancel_workflow(wid, "  padded-key \t")
    assert first["idempotency_key"] == "padded-key"
    assert record(db_engine, "padded-key") is not None
    assert scalar(db_engine, "SELECT count(*) FROM {S}.control_requests") == 1
    again = durable.cancel_workflow(wid, "padded-key")
    assert again == {**first, "idempotency_replayed": True}
    with pytest.raises(IdempotencyConflict):
        durable.resume_workflow(wid, " padded-key")


def test_same_key_for_another_action_or_workflow_is_a_409(durable, published, db_engine):
    wf = declare_chain(durable)
    one, two = wf.start({}), wf.start({})
    durable.cancel_workflow(one, "k-1")
    for call in (lambda: durable.resume_workflow(one, "k-1"),
                 lambda: durable.fork_workflow(one, "k-1"),
                 lambda: durable.cancel_workflow(two, "k-1")):
        with pytest.raises(IdempotencyConflict) as info:
            call()
        assert isinstance(info.value, ControlError)
        assert info.value.status == 409
        assert info.value.body["error"] == "IdempotencyConflict"
        assert info.value.body["idempotency_key"] == "k-1"
        assert (info.value.body["action"], info.value.body["target"]) == ("cancel", one)
    # Nothing ran: the other run is untouched, the first one was not resumed or forked.
    assert run_row(db_engine, two)["status"] == "runnable"
    assert run_row(db_engine, one)["status"] == "cancelled"
    assert forks_of(db_engine, one) == []
    assert record(db_engine, "k-1")["action"] == "cancel"


def test_a_key_whose_request_failed_is_a_409_with_the_failure(durable, published, db_engine):
    with pytest.raises(WorkflowNotFound) as info:
        durable.fork_workflow("no-such-run", "fork-missing")
    assert (info.value.status, info.value.body["error"]) == (404, "WorkflowNotFound")
    stored = record(db_engine, "fork-missing")
    assert stored["status"] == "failed"
    assert stored["error"]["error"] == "WorkflowNotFound"
    assert stored["response"] is None

    with pytest.raises(IdempotencyConflict) as again:
        durable.fork_workflow("no-such-run", "fork-missing")
    assert again.value.status == 409
    assert again.value.body["failure"]["error"] == "WorkflowNotFound"
    assert again.value.body["failure"]["workflow_id"] == "no-such-run"
    # Even once the run exists, the failed key stays failed (until it expires).
    wf = declare_chain(durable)
    wf.start({}, workflow_id="no-such-run")
    with pytest.raises(IdempotencyConflict):
        durable.fork_workflow("no-such-run", "fork-missing")
    assert forks_of(db_engine, "no-such-run") == []


def test_a_request_that_rolls_back_leaves_no_record_and_no_mutation(
        durable, published, db_engine, monkeypatch):
    """The mutation and its record share one transaction: an unexpected error after the
    fork's INSERT rolls both back, and the key is free for the retry."""
    wf = declare_chain(durable)
    wid = wf.start({})
    drain(durable)
    real = ControlStore.fork

    def fork_then_crash(self, conn, **kwargs):
        real(self, conn, **kwargs)
        inserted = conn.execute(q("SELECT count(*) FROM {S}.runs WHERE forked_from = :s"),
                                {"s": wid}).scalar()
        assert inserted == 1  # inside the request's open transaction
        raise RuntimeError("crash after the insert")

    published.clear()
    monkeypatch.setattr(ControlStore, "fork", fork_then_crash)
    with pytest.raises(RuntimeError):
        durable.fork_workflow(wid, "fork-crash")
    assert forks_of(db_engine, wid) == []
    assert record(db_engine, "fork-crash") is None
    assert len(published) == 0

    monkeypatch.setattr(ControlStore, "fork", real)
    done = durable.fork_workflow(wid, "fork-crash")
    assert done["idempotency_replayed"] is False
    assert forks_of(db_engine, wid) == [done["workflow_id"]]
    assert record(db_engine, "fork-crash")["status"] == "succeeded"


# ---------------------------------------------------------------------------- TTL, cleanup


def test_replay_after_the_ttl_expired_is_a_new_execution(durable, published, db_engine):
    wf = declare_chain(durable)
    wid = wf.start({})
    drain(durable)
    first = durable.fork_workflow(wid, "fork-ttl", ttl_days=1)
    assert record(db_engine, "fork-ttl")["ttl"].total_seconds() == pytest.approx(86400, abs=5)
    expire(db_engine, "fork-ttl")

    second = durable.fork_workflow(wid, "fork-ttl", cleanup_interval_seconds=3600)
    assert second["idempotency_replayed"] is False
    assert second["workflow_id"] != first["workflow_id"]
    assert sorted(forks_of(db_engine, wid)) == sorted([first["workflow_id"],
                                                       second["workflow_id"]])
    stored = record(db_engine, "fork-ttl")
    assert stored["response"]["workflow_id"] == second["workflow_id"]
    assert stored["ttl"].total_seconds() == pytest.approx(7 * 86400, abs=5)
    assert durable.fork_workflow(wid, "fork-ttl") == {**second, "idempotency_replayed": True}


def test_an_expired_key_may_be_reused_for_another_action(durable, published, db_engine):
    wf = declare_chain(durable)
    one, two = wf.start({}), wf.start({})
    durable.cancel_workflow(one, "reused")
    expire(db_engine, "reused")
    answer = durable.cancel_workflow(two, "reused", cleanup_interval_seconds=3600)
    assert (answer["changed"], answer["idempotency_replayed"]) == (True, False)
    assert record(db_engine, "reused")["target"] == two
    expire(db_engine, "reused")
    answer = durable.resume_workflow(two, "reused", cleanup_interval_seconds=3600)
    assert (answer["changed"], answer["idempotency_replayed"]) == (True, False)
    assert record(db_engine, "reused")["action"] == "resume"


def test_failed_record_expires_too(durable, published, db_engine):
    with pytest.raises(WorkflowNotFound):
        durable.fork_workflow("x", "k-f")
    expire(db_engine, "k-f")
    declare_chain(durable).start({}, workflow_id="x")
    answer = durable.fork_workflow("x", "k-f", cleanup_interval_seconds=3600)
    assert answer["idempotency_replayed"] is False
    assert forks_of(db_engine, "x") == [answer["workflow_id"]]


def test_expired_records_are_deleted_at_most_once_per_interval(make_durable, db_engine):
    durable = make_durable()
    declare_chain(durable)
    # The first request of this Durable cleans up (there is nothing to clean yet).
    durable.cancel_workflow("absent-1", "first", cleanup_interval_seconds=3600)
    durable.cancel_workflow("absent-2", "old")
    expire(db_engine, "old")
    durable.cancel_workflow("absent-3", "live")

    durable.cancel_workflow("absent-4", "within-interval", cleanup_interval_seconds=3600)
    assert record(db_engine, "old") is not None  # not yet: the interval has not passed

    durable.cancel_workflow("absent-5", "interval-zero", cleanup_interval_seconds=0)
    assert record(db_engine, "old") is None
    for key in ("first", "live", "within-interval", "interval-zero"):
        assert record(db_engine, key) is not None, key

    # Another Durable (another process's view) has its own clock: its first request cleans.
    other = make_durable()
    durable.cancel_workflow("absent-6", "old-2")
    expire(db_engine, "old-2")
    other.cancel_workflow("absent-7", "other-first", cleanup_interval_seconds=3600)
    assert record(db_engine, "old-2") is None


def test_the_collector_sweep_deletes_expired_records(durable, db_engine):
    declare_chain(durable)
    for key in ("sweep-a", "sweep-b", "sweep-live"):
        durable.cancel_workflow(f"absent-{key}", key)
    expire(db_engine, "sweep-a")
    expire(db_engine, "sweep-b")
    coordinator = durable.coordinator()
    assert coordinator.collector.run_once() >= 2
    assert record(db_engine, "sweep-a") is None and record(db_engine, "sweep-b") is None
    assert record(db_engine, "sweep-live") is not None
    assert coordinator.collector.run_once() == 0


# ---------------------------------------------------------------------------- concurrency


def race(n: int, call: Any) -> list[tuple[str, Any]]:
    """Run ``call(i)`` in n threads released together; ("ok", response) or ("error", exc)."""
    barrier = threading.Barrier(n)

    def body(i: int) -> Any:
        barrier.wait(10)
        try:
            return ("ok", call(i))
        except ControlError as exc:
            return ("error", exc)

    threads = start_threads([lambda i=i: body(i) for i in range(n)])
    return [t.value(30) for t in threads]


def split(results: list[tuple[str, Any]]) -> tuple[list[dict], list[dict], list[Any]]:
    fresh = [r for kind, r in results if kind == "ok" and not r["idempotency_replayed"]]
    replays = [r for kind, r in results if kind == "ok" and r["idempotency_replayed"]]
    errs = [r for kind, r in results if kind == "error"]
    for exc in errs:
        assert isinstance(exc, IdempotencyConflict), exc
    return fresh, replays, errs


def test_concurrent_forks_with_one_key_fork_once(durable, published, db_engine):
    wf = declare_chain(durable)
    wid = wf.start({})
    drain(durable)
    published.clear()
    fresh, replays, _ = split(race(THREADS, lambda i: durable.fork_workflow(wid, "same-fork")))
    assert len(fresh) == 1
    new_id = fresh[0]["workflow_id"]
    assert forks_of(db_engine, wid) == [new_id]
    for r in replays:
        assert r == {**fresh[0], "idempotency_replayed": True}
    assert len(published.for_run(new_id)) == 1


def test_concurrent_cancels_with_one_key_cancel_once(durable, published, db_engine):
    wf = declare_chain(durable)
    wid = wf.start({})
    fresh, replays, _ = split(race(THREADS, lambda i: durable.cancel_workflow(
        wid, "same-cancel", reason=f"thread {i}")))
    assert len(fresh) == 1 and fresh[0]["changed"] is True
    for r in replays:
        assert r == {**fresh[0], "idempotency_replayed": True}
    assert run_row(db_engine, wid)["status"] == "cancelled"


def test_concurrent_resumes_with_one_key_resume_once(durable, published, db_engine):
    wf = declare_chain(durable)
    wid = wf.start({})
    durable.cancel_workflow(wid, "setup")
    published.clear()
    fresh, replays, _ = split(race(THREADS, lambda i: durable.resume_workflow(wid, "same-res")))
    assert len(fresh) == 1 and fresh[0]["changed"] is True
    for r in replays:
        assert r == {**fresh[0], "idempotency_replayed": True}
    assert len(published.for_run(wid)) == 1
    assert run_row(db_engine, wid)["dispatch_count"] == 1


def test_different_keys_racing_on_one_run_change_it_once(durable, published, db_engine):
    wf = declare_chain(durable)
    wid = wf.start({})
    results = race(THREADS, lambda i: durable.cancel_workflow(wid, f"cancel-{i}"))
    assert all(kind == "ok" for kind, _ in results)
    changed = [r for _, r in results if r["changed"]]
    assert len(changed) == 1
    assert all(not r["idempotency_replayed"] for _, r in results)
    assert scalar(db_engine, "SELECT count(*) FROM {S}.control_requests") == THREADS

    published.clear()
    results = race(THREADS, lambda i: durable.resume_workflow(wid, f"resume-{i}"))
    assert all(kind == "ok" for kind, _ in results)
    assert sum(r["changed"] for _, r in results) == 1
    assert len(published.for_run(wid)) == 1
    assert run_row(db_engine, wid)["status"] == "runnable"


def test_cancel_and_resume_racing_with_distinct_keys_end_consistent(durable, published,
                                                                     db_engine):
    wf = declare_chain(durable)
    wid = wf.start({})
    durable.cancel_workflow(wid, "pre")
    published.clear()
    results = race(THREADS, lambda i: (durable.resume_workflow if i % 2 else
                                       durable.cancel_workflow)(wid, f"mixed-{i}"))
    assert all(kind == "ok" for kind, _ in results)
    row = run_row(db_engine, wid)
    assert row["status"] in ("cancelled", "runnable")
    assert (row["finished_at"] is None) == (row["status"] == "runnable")
    resumed = sum(r["changed"] for i, (_, r) in enumerate(results) if i % 2)
    assert len(published.for_run(wid)) == resumed


def test_fork_into_a_taken_id_is_a_recorded_409(durable, published, db_engine):
    wf = declare_chain(durable)
    wid = wf.start({})
    taken = wf.start({}, workflow_id="taken-id")
    published.clear()
    with pytest.raises(DuplicateWorkflow) as info:
        durable.fork_workflow(wid, "fork-taken", new_workflow_id="taken-id")
    assert isinstance(info.value, ControlError)
    assert info.value.status == 409 and info.value.body["error"] == "DuplicateWorkflow"
    assert forks_of(db_engine, wid) == []
    assert run_row(db_engine, taken)["forked_from"] is None
    assert len(published) == 0
    stored = record(db_engine, "fork-taken")
    assert stored["status"] == "failed" and stored["error"]["error"] == "DuplicateWorkflow"
    with pytest.raises(IdempotencyConflict) as again:
        durable.fork_workflow(wid, "fork-taken", new_workflow_id="taken-id")
    assert again.value.status == 409
    assert again.value.body["failure"]["error"] == "DuplicateWorkflow"


def test_concurrent_requests_on_an_expired_key_execute_once(durable, published, db_engine):
    wf = declare_chain(durable)
    wid = wf.start({})
    drain(durable)
    first = durable.fork_workflow(wid, "expired-race")
    expire(db_engine, "expired-race")
    fresh, replays, _ = split(race(THREADS, lambda i: durable.fork_workflow(
        wid, "expired-race", cleanup_interval_seconds=3600)))
    assert len(fresh) == 1
    assert fresh[0]["workflow_id"] != first["workflow_id"]
    assert sorted(forks_of(db_engine, wid)) == sorted([first["workflow_id"],
                                                       fresh[0]["workflow_id"]])
    for r in replays:
        assert r == {**fresh[0], "idempotency_replayed": True}


def test_forks_racing_for_one_new_id_create_one_run(durable, published, db_engine):
    wf = declare_chain(durable)
    wid = wf.start({})
    drain(durable)
    results = race(THREADS, lambda i: durable.fork_workflow(
        wid, f"fork-{i}", new_workflow_id="contested"))
    won = [r for kind, r in results if kind == "ok"]
    lost = [r for kind, r in results if kind == "error"]
    assert len(won) == 1 and won[0]["workflow_id"] == "contested"
    assert len(lost) == THREADS - 1
    assert all(isinstance(e, DuplicateWorkflow) and e.status == 409 for e in lost)
    assert forks_of(db_engine, wid) == ["contested"]
    statuses = [r["status"] for r in rows(
        db_engine, "SELECT status FROM {S}.control_requests ORDER BY request_key")]
    assert sorted(statuses) == ["failed"] * (THREADS - 1) + ["succeeded"]
