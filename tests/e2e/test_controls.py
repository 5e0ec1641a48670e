"""The controls end to end: by-name Celery tasks and CLI commands, against a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from celery import Celery

from tests.e2e.conftest import REPO_ROOT, WORKER_APP, Harness, wait_for

pytestmark = pytest.mark.e2e


def cli(e2e: Harness, *args: str) -> tuple[int, Any, str]:
    """``durable-celery <args> -A tests.e2e.workerapp``: (exit code, JSON stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "durable_celery.cli", *args, "-A", WORKER_APP],
        env={**os.environ, **e2e.env("cli")}, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=60, check=False)
    out = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, out, done.stderr


def requests(e2e: Harness, key: str) -> list[tuple[Any, ...]]:
    return e2e.db.rows("SELECT action, target, status FROM durable_celery.control_requests "
                       "WHERE request_key = %s", key)


def test_controls_as_celery_tasks_by_name(e2e: Harness) -> None:
    e2e.worker("prefork", 2)
    # A run sleeping for an hour: cancelled by name, the cancel delivered twice.
    wid = e2e.start("timer", {"x": 3, "sleep": 3600})
    e2e.wait_status(wid, "runnable")
    wait_for(lambda: e2e.run(wid).step == "wait_go", timeout=30, what="the nap to commit")
    with Celery("plain", broker=e2e.broker_url, set_as_current=False) as plain:
        for _ in range(2):
            plain.send_task("durable_celery.cancel_workflow", queue=e2e.queue, kwargs={
                "workflow_id": wid, "request_key": "ops-cancel-1", "reason": "by ops"})
        run = e2e.wait_status(wid, "cancelled", timeout=30)
        assert run.error["reason"] == "by ops"
        assert requests(e2e, "ops-cancel-1") == [("cancel", wid, "succeeded")]

        # Resume by name: the run sleeps again until its due time (an hour after the nap),
        # then continues at the step it stopped at, and completes.
        due = e2e.run(wid).eligible_at
        plain.send_task("durable_celery.resume_workflow", queue=e2e.queue, kwargs={
            "workflow_id": wid, "request_key": "ops-resume-1"})
        resumed = e2e.wait_status(wid, "runnable", timeout=30)
        assert (resumed.step, resumed.eligible_at) == ("wait_go", due)
        e2e.db.conn.execute("UPDATE durable_celery.runs SET eligible_at = now(), "
                            "dispatch_at = now() WHERE id = %s", (wid,))  # the hour passes
        e2e.wait_status(wid, "awaiting", timeout=30)
        e2e.durable.signal(wid, "go", {"ok": 1})
        assert e2e.durable.wait_result(wid, timeout=30) == {
            "go": {"ok": 1}, "timed_out": False, "x": 3}

        # Fork by name from completed step 2 (wait_go): nap is not run again.
        new_id = f"fork-{uuid.uuid4().hex[:8]}"
        plain.send_task("durable_celery.fork_workflow", queue=e2e.queue, kwargs={
            "workflow_id": wid, "request_key": "ops-fork-1", "start_step": "2",
            "new_workflow_id": new_id})
        forked = wait_for(lambda: e2e.db.rows(
            "SELECT status, forked_from FROM durable_celery.runs WHERE id = %s", new_id),
            timeout=30, what="the fork to exist")
        assert forked[0][1] == wid
        e2e.wait_status(new_id, "awaiting", timeout=30)
        e2e.durable.signal(new_id, "go", {"ok": 2})
        assert e2e.durable.wait_result(new_id, timeout=30)["go"] == {"ok": 2}

        # A refused request (bad key) is not retried forever and changes nothing.
        plain.send_task("durable_celery.cancel_workflow", queue=e2e.queue, kwargs={
            "workflow_id": new_id, "request_key": "   "})
    steps = [(h.step, h.outcome) for h in e2e.durable.workflow_steps(new_id)]
    assert steps == [("nap", "sleep"), ("wait_go", "await"), ("finish", "done")]
    assert e2e.db.effects([new_id]) == {(new_id, "wait_go"): [0], (new_id, "finish"): [0]}
    assert e2e.run(new_id).status == "done"


def test_controls_from_the_cli(e2e: Harness) -> None:
    e2e.worker("prefork", 2)
    assert cli(e2e, "health")[:2] == (0, {"status": "ok"})
    code, report, _ = cli(e2e, "bootstrap")
    assert code == 0 and report["ok"] is True
    assert [c["name"] for c in report["checks"]] == [
        "database_connection", "schema_version", "required_tables", "idempotency_table"]
    code, _, err = cli(e2e, "bootstrap", "--strict", "--require-table", "public.nope")
    assert code != 0 and json.loads(err)["check"] == "required_tables"

    # Cancel a step while it runs: it finishes, but its commit is refused.
    wid = e2e.start("slow", {"x": 1, "block": 4})
    wait_for(lambda: (wid, "middle:start") in e2e.db.effects([wid]), timeout=30,
             what="the middle step to start")
    code, out, err = cli(e2e, "cancel", wid, "--request-key", "cli-c1", "--reason", "stop")
    assert code == 0, err
    assert out == {"ok": True, "changed": True, "idempotency_key": "cli-c1",
                   "idempotency_replayed": False}
    code, again, _ = cli(e2e, "cancel", wid, "--request-key", "cli-c1")
    assert code == 0 and again["idempotency_replayed"] is True and again["changed"] is True
    wait_for(lambda: (wid, "middle:done") in e2e.db.effects([wid]), timeout=30,
             what="the blocked step to finish")
    wait_for(lambda: e2e.db.scalar(
        "SELECT count(*) FROM durable_celery.runs WHERE id = %s AND status = 'cancelled' "
        "AND owner IS NULL", wid) == 1, timeout=10, what="the run to stay cancelled")
    assert [h.step for h in e2e.durable.workflow_steps(wid)] == ["before"]
    assert (wid, "after") not in e2e.db.effects([wid])

    # The same key for another action is a conflict; errors are JSON on stderr, exit 2.
    code, _, err = cli(e2e, "resume", wid, "--request-key", "cli-c1")
    assert code == 2 and json.loads(err)["error"] == "IdempotencyConflict"
    code, _, err = cli(e2e, "fork", "no-such-run", "--request-key", "cli-f0")
    assert code == 2 and json.loads(err)["error"] == "WorkflowNotFound"
    code, _, err = cli(e2e, "cancel", wid, "--request-key", " ")
    assert code == 2 and json.loads(err)["error"] == "InvalidRequest"

    # Resume: the interrupted step runs again (attempt 0) and the run completes.
    code, out, err = cli(e2e, "resume", wid, "--request-key", "cli-r1")
    assert code == 0 and out["changed"] is True, err
    assert e2e.durable.wait_result(wid, timeout=30) == {"x": 1}
    code, out, _ = cli(e2e, "fork", wid, "--request-key", "cli-f1", "--start-step", "1",
                       "--new-workflow-id", f"{wid}-again")
    assert code == 0 and out["workflow_id"] == f"{wid}-again"
    code, _, err = cli(e2e, "fork", wid, "--request-key", "cli-f2",
                       "--new-workflow-id", f"{wid}-again")
    assert code == 2 and json.loads(err)["error"] == "DuplicateWorkflow"
