"""``durable-celery``: thin commands over the public API. JSON out, non-zero exit on error."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import signal as os_signal
import sys
import threading
from datetime import datetime
from typing import Any

import click

from durable_celery import errors


def _json(value: Any) -> str:
    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        if isinstance(obj, datetime):
            return obj.isoformat()
        return repr(obj)

    return json.dumps(value, default=default, indent=2, sort_keys=True)


def load_durable(app_path: str | None, database_url: str | None, broker_url: str | None) -> Any:
    """Find the Durable of ``module[:attr]``, or build a bare one from URLs.

    A bare Durable (no workflow code) is enough for the coordinator and for signals: it
    publishes by task name and never runs steps.
    """
    from celery import Celery

    from durable_celery.app import Durable

    if app_path:
        module_name, _, attr = app_path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise click.UsageError(f"cannot import {module_name!r}: {exc}") from exc
        candidates = [getattr(module, attr)] if attr else list(vars(module).values())
        for obj in candidates:
            if isinstance(obj, Durable):
                return obj
            found = getattr(obj, "_durable_celery", None) if isinstance(obj, Celery) else None
            if found is not None:
                return found
        raise click.UsageError(f"no Durable (or Celery app with one) found in {app_path!r}")
    app = Celery("durable_celery", broker=broker_url, set_as_current=False)
    durable = Durable(app, database_url=database_url)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # release connections when the command ends (matters in-process)
        ctx.call_on_close(durable.close)
        ctx.call_on_close(app.close)
    return durable


def _fail(exc: errors.DurableCeleryError) -> None:
    click.echo(_json(exc.body), err=True)
    sys.exit(2 if exc.status < 500 else 1)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.DurableCeleryError as exc:
            _fail(exc)


app_option = click.option("-A", "--app", "app_path", envvar="DURABLE_CELERY_APP",
                          help="module[:attr] holding your Durable or Celery app.")
db_option = click.option("--database-url", envvar="DURABLE_CELERY_DATABASE_URL",
                         help="Postgres URL (when no --app).")
broker_option = click.option("--broker-url", envvar="CELERY_BROKER_URL",
                             help="Celery broker URL (when no --app).")


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """Durable workflows on Celery and Postgres."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@app_option
@db_option
@broker_option
def migrate(app_path: str | None, database_url: str | None, broker_url: str | None) -> None:
    """Apply pending schema migrations."""
    durable = load_durable(app_path, database_url, broker_url)
    click.echo(_json({"applied": durable.migrate()}))


@main.command()
@app_option
@db_option
@broker_option
@click.option("--once", is_flag=True, help="Run every sweep once and exit.")
def coordinator(app_path: str | None, database_url: str | None, broker_url: str | None,
                once: bool) -> None:
    """Run the coordinator sweeps alone (they also run inside every celery worker)."""
    durable = load_durable(app_path, database_url, broker_url)
    durable.ensure_ready()
    coord = durable.coordinator()
    if once:
        click.echo(_json({"work_done": coord.run_once()}))
        return
    stop = threading.Event()
    for sig in (os_signal.SIGINT, os_signal.SIGTERM):
        os_signal.signal(sig, lambda *_: stop.set())
    coord.start()
    click.echo("durable_celery coordinator running; Ctrl-C to stop", err=True)
    stop.wait()
    coord.stop()


@main.command()
@app_option
@db_option
@broker_option
@click.argument("workflow_id")
@click.option("--history", is_flag=True, help="Also print the committed steps.")
def status(app_path: str | None, database_url: str | None, broker_url: str | None,
           workflow_id: str, history: bool) -> None:
    """Show one run."""
    durable = load_durable(app_path, database_url, broker_url)
    out: dict[str, Any] = {"run": durable.get_workflow(workflow_id)}
    if history:
        out["steps"] = durable.workflow_steps(workflow_id)
    click.echo(_json(out))


@main.command()
@app_option
@db_option
@broker_option
@click.argument("workflow_id")
@click.option("--json", "as_json", is_flag=True, help="Print the explain object as JSON.")
def explain(app_path: str | None, database_url: str | None, broker_url: str | None,
            workflow_id: str, as_json: bool) -> None:
    """Say why a run is not running (what it waits for, and until when)."""
    durable = load_durable(app_path, database_url, broker_url)
    found = durable.explain(workflow_id)
    if as_json:
        click.echo(_json(found))
        return
    click.echo(f"{found['workflow_id']}  {found['workflow']} v{found['version']}  "
               f"{found['status']} at {found['step']} (attempt {found['attempt']}, "
               f"queue {found['queue']})")
    for reason in found["reasons"]:
        click.echo(f"  - {reason['message']}")


@main.command(name="list")
@app_option
@db_option
@broker_option
@click.option("--workflow", default=None)
@click.option("--status", "status_", default=None)
@click.option("--limit", default=100, type=int)
def list_(app_path: str | None, database_url: str | None, broker_url: str | None,
          workflow: str | None, status_: str | None, limit: int) -> None:
    """List runs, newest first."""
    durable = load_durable(app_path, database_url, broker_url)
    runs = durable.list_workflows(workflow, status_, limit)
    click.echo(_json([{"workflow_id": r.workflow_id, "workflow": r.workflow, "status": r.status,
                       "step": r.step, "key": r.key, "created_at": r.created_at} for r in runs]))


@main.command(name="signal")
@app_option
@db_option
@broker_option
@click.argument("target")
@click.argument("name")
@click.option("--payload", default="null", help="JSON payload.")
@click.option("--dedup-key", default=None)
def signal_(app_path: str | None, database_url: str | None, broker_url: str | None,
            target: str, name: str, payload: str, dedup_key: str | None) -> None:
    """Send a durable signal to a run (by workflow_id or key)."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise errors.InvalidPayload(f"--payload is not JSON: {exc}") from exc
    durable = load_durable(app_path, database_url, broker_url)
    click.echo(_json(durable.signal(target, name, data, dedup_key=dedup_key)))


@main.group()
def schedule() -> None:
    """Cron schedules: list, add, pause, resume, delete."""


@schedule.command(name="list")
@app_option
@db_option
@broker_option
def schedule_list(app_path: str | None, database_url: str | None, broker_url: str | None) -> None:
    """List schedules."""
    durable = load_durable(app_path, database_url, broker_url)
    click.echo(_json(durable.list_schedules()))


@schedule.command(name="add")
@app_option
@db_option
@broker_option
@click.argument("name")
@click.argument("workflow")
@click.option("--cron", required=True, help='A cron expression, e.g. "0 9 * * *".')
@click.option("--timezone", default="UTC", help="An IANA time zone name.")
@click.option("--state", default="{}", help="JSON input of every run.")
@click.option("--catchup", default="latest", help="latest, all or none.")
def schedule_add(app_path: str | None, database_url: str | None, broker_url: str | None,
                 name: str, workflow: str, cron: str, timezone: str, state: str,
                 catchup: str) -> None:
    """Create or update a schedule (needs -A: the workflow's code)."""
    try:
        data = json.loads(state)
    except json.JSONDecodeError as exc:
        raise errors.InvalidPayload(f"--state is not JSON: {exc}") from exc
    durable = load_durable(app_path, database_url, broker_url)
    click.echo(_json(durable.schedule(name, workflow, cron=cron, timezone=timezone,
                                      state=data, catchup=catchup)))


def _schedule_command(action: str, doc: str) -> None:
    @schedule.command(name=action, help=doc)
    @app_option
    @db_option
    @broker_option
    @click.argument("name")
    def command(app_path: str | None, database_url: str | None, broker_url: str | None,
                name: str) -> None:
        durable = load_durable(app_path, database_url, broker_url)
        result = getattr(durable, f"{action}_schedule")(name)
        click.echo(_json(result if result is not None else {"deleted": name}))


_schedule_command("pause", "Stop firing a schedule.")
_schedule_command("resume", "Fire again from the next occurrence (missed ones are skipped).")
_schedule_command("delete", "Remove a schedule.")


def _control_options(func: Any) -> Any:
    for option in reversed((
        app_option, db_option, broker_option, click.argument("workflow_id"),
        click.option("--request-key", required=True,
                     help="Idempotency key: a retry with the same key replays the answer."),
        click.option("--ttl-days", default=7.0, type=float, show_default=True,
                     help="How long the request key is remembered."),
        click.option("--cleanup-interval-seconds", default=300.0, type=float,
                     show_default=True, help="Minimum seconds between expired-key cleanups."),
    )):
        func = option(func)
    return func


@main.command()
@_control_options
@click.option("--reason", default=None, help="Why; stored in the run's error.")
def cancel(app_path: str | None, database_url: str | None, broker_url: str | None,
           workflow_id: str, request_key: str, ttl_days: float,
           cleanup_interval_seconds: float, reason: str | None) -> None:
    """Cancel a run (and its live children)."""
    durable = load_durable(app_path, database_url, broker_url)
    click.echo(_json(durable.cancel_workflow(
        workflow_id, request_key, reason=reason, ttl_days=ttl_days,
        cleanup_interval_seconds=cleanup_interval_seconds)))


@main.command()
@_control_options
def resume(app_path: str | None, database_url: str | None, broker_url: str | None,
           workflow_id: str, request_key: str, ttl_days: float,
           cleanup_interval_seconds: float) -> None:
    """Resume a cancelled or failed run at the step where it stopped."""
    durable = load_durable(app_path, database_url, broker_url)
    click.echo(_json(durable.resume_workflow(
        workflow_id, request_key, ttl_days=ttl_days,
        cleanup_interval_seconds=cleanup_interval_seconds)))


@main.command()
@_control_options
@click.option("--start-step", default=None,
              help="Completed-step number to fork from (1-based); default: from the input.")
@click.option("--new-workflow-id", default=None, help="Id of the new run (default: a uuid).")
@click.option("--application-version", default=None,
              help="Registered workflow version that runs the fork (default: the source's).")
def fork(app_path: str | None, database_url: str | None, broker_url: str | None,
         workflow_id: str, request_key: str, ttl_days: float, cleanup_interval_seconds: float,
         start_step: str | None, new_workflow_id: str | None,
         application_version: str | None) -> None:
    """Start a new run from a run's history."""
    durable = load_durable(app_path, database_url, broker_url)
    click.echo(_json(durable.fork_workflow(
        workflow_id, request_key, start_step=start_step, new_workflow_id=new_workflow_id,
        application_version=application_version, ttl_days=ttl_days,
        cleanup_interval_seconds=cleanup_interval_seconds)))


@main.command()
@app_option
@db_option
@broker_option
def health(app_path: str | None, database_url: str | None, broker_url: str | None) -> None:
    """Check that the database answers."""
    durable = load_durable(app_path, database_url, broker_url)
    click.echo(_json(durable.health()))


@main.command()
@app_option
@db_option
@broker_option
@click.option("--strict/--no-strict", default=False,
              help="Exit non-zero (with the failed check) when a check fails.")
@click.option("--skip-idempotency-table", is_flag=True,
              help="Do not check the control requests table.")
@click.option("--require-table", "required_tables", multiple=True,
              help="A table that must exist (repeatable; default: the durable_celery tables).")
def bootstrap(app_path: str | None, database_url: str | None, broker_url: str | None,
              strict: bool, skip_idempotency_table: bool,
              required_tables: tuple[str, ...]) -> None:
    """Preflight checks: connection, schema version, tables. Exit 1 if any fails."""
    durable = load_durable(app_path, database_url, broker_url)
    report = durable.bootstrap(check_idempotency_table=not skip_idempotency_table,
                               required_tables=list(required_tables) or None, strict=strict)
    click.echo(_json(report))
    if not report["ok"]:
        sys.exit(1)


@main.command()
@click.option("--data-dir", default=None, help="Where the embedded servers keep data.")
@click.option("--runs", default=6, type=int, help="How many example runs to start.")
def demo(data_dir: str | None, runs: int) -> None:
    """Run the demo on embedded Postgres + Redis with a real worker, killed mid-run."""
    from durable_celery import demo as demo_mod

    sys.exit(demo_mod.main(data_dir=data_dir, runs=runs))


if __name__ == "__main__":  # pragma: no cover
    main()
