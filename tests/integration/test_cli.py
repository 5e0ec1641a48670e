"""The durable-celery CLI: JSON out, typed errors with a non-zero exit, nothing half-done."""

from __future__ import annotations

import json

import pytest
from celery import Celery
from click.testing import CliRunner

from durable_celery import ConfigurationError, Done, Durable
from durable_celery.cli import main
from durable_celery.testing import drain


@pytest.fixture
def cli(database_url, redis_url, monkeypatch):
    monkeypatch.setenv("DURABLE_CELERY_DATABASE_URL", database_url)
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_status_list_and_signal(cli, durable, published):
    wf = durable.workflow("cli_flow")

    @wf.step
    def park(ctx):
        from durable_celery import Await

        return Await("go")

    @wf.step
    def finish(ctx):
        return Done(ctx.signals[0].payload)

    wid = wf.start(key="cli:1")
    drain(durable)

    listed = cli("list", "--workflow", "cli_flow")
    assert listed.exit_code == 0, listed.output
    assert [r["workflow_id"] for r in json.loads(listed.output)] == [wid]

    sent = cli("signal", "cli:1", "go", "--payload", '{"ok": true}', "--dedup-key", "d1")
    assert sent.exit_code == 0, sent.output
    assert json.loads(sent.output)["workflow_id"] == wid
    drain(durable)
    assert durable.wait_result(wid, timeout=1) == {"ok": True}

    shown = cli("status", wid, "--history")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["run"]["status"] == "done"
    assert [s["step"] for s in data["steps"]] == ["park", "finish"]


@pytest.mark.parametrize(("args", "error", "code"), [
    (("status", "no-such-run"), "WorkflowNotFound", 2),
    (("signal", "no-such-run", "go"), "NoTarget", 2),
    (("signal", "x", "go", "--payload", "{not json"), "InvalidPayload", 2),
    (("signal", "x", "", "--payload", "1"), "InvalidArgument", 2),
    (("list", "--status", "sleeping"), "InvalidArgument", 2),
    (("list", "--limit", "0"), "InvalidArgument", 2),
    (("explain", "no-such-run"), "WorkflowNotFound", 2),
])
def test_bad_input_is_a_json_error_and_a_non_zero_exit(cli, clean_db, args, error, code):
    result = cli(*args)
    assert result.exit_code == code, result.output
    assert json.loads(result.stderr)["error"] == error


def test_migrate_and_a_coordinator_pass(cli, clean_db):
    migrated = cli("migrate")
    assert migrated.exit_code == 0, migrated.output
    assert json.loads(migrated.output) == {"applied": []}
    once = cli("coordinator", "--once")
    assert once.exit_code == 0, once.output
    assert json.loads(once.output) == {"work_done": 0}


def test_an_unknown_app_path_is_a_usage_error(cli):
    result = cli("list", "-A", "no_such_module_here")
    assert result.exit_code == 2
    assert "cannot import" in result.output


def test_no_database_url_is_a_configuration_error(redis_url, monkeypatch):
    monkeypatch.delenv("DURABLE_CELERY_DATABASE_URL", raising=False)
    app = Celery("nodb", broker=redis_url, set_as_current=False)
    try:
        with pytest.raises(ConfigurationError, match="no database URL"):
            Durable(app)
    finally:
        app.close()


def test_explain_prints_what_a_run_waits_for(cli, durable, published):
    from durable_celery import Await

    wf = durable.workflow("cli_explain")

    @wf.step
    def park(ctx):
        return Await("approved", timeout=600)

    @wf.step
    def finish(ctx):
        return Done()

    wid = wf.start()
    drain(durable)
    shown = cli("explain", wid)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].startswith(f"{wid}  cli_explain v1  awaiting at finish (attempt 0")
    assert "waiting for one of signals ['approved'] since" in lines[1]
    data = json.loads(cli("explain", wid, "--json").output)
    assert data["reasons"][0]["kind"] == "signal" and data["reasons"][0]["deadline"]
