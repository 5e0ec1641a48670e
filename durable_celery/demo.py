"""``durable-celery demo``: embedded Postgres + Redis, a real worker, killed mid-run.

The demo starts example runs (checkouts that wait for a payment signal, a report that
sleeps, an ETL whose slow step is interrupted by SIGKILL), kills the worker in the middle
of a step, starts a fresh worker, and shows every run finishing.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import Celery

from durable_celery import Await, Done, Durable, Sleep, embedded, errors
from durable_celery.runtime.context import Context
from durable_celery.testing import WorkerProcess

QUEUE = "durable-demo"
BROKER_ENV = "DURABLE_CELERY_DEMO_BROKER_URL"
SLOW_STEP_SECONDS = 4.0


def build(database_url: str, broker_url: str) -> Durable:
    """The demo's Celery app and workflows (the worker imports them via demo_worker)."""
    app = Celery("durable_demo", broker=broker_url)
    app.conf.task_default_queue = QUEUE
    app.conf.worker_hijack_root_logger = False
    durable = Durable(app, database_url=database_url, heartbeat_interval=0.5, stale_after=3.0,
                      sweep_interval=0.2, redispatch_after=5.0)

    checkout = durable.workflow("checkout")

    @checkout.step
    def reserve(ctx: Context) -> Any:
        ctx.state["reserved"] = True
        return ctx.state

    @checkout.step(retry={"max_attempts": 3, "delay": 0.2})
    def authorize(ctx: Context) -> Any:
        if ctx.attempt == 0:  # the card processor times out once
            raise TimeoutError("card processor timed out")
        ctx.state["auth"] = f"auth-{ctx.idempotency_key[-12:]}"
        return ctx.state

    @checkout.step
    def wait_payment(ctx: Context) -> Any:
        return Await("payment_confirmed", timeout=60)

    @checkout.step
    def ship(ctx: Context) -> Any:
        if ctx.timed_out:
            return Done({"shipped": False, "reason": "payment never came"})
        return Done({"shipped": True, "paid": ctx.signals[0].payload["amount"]})

    report = durable.workflow("report")

    @report.step
    def collect(ctx: Context) -> Any:
        return Sleep(seconds=2)

    @report.step
    def publish(ctx: Context) -> Any:
        return Done({"published": True})

    etl = durable.workflow("etl")

    @etl.step
    def extract(ctx: Context) -> Any:
        ctx.state["rows"] = 1000
        return ctx.state

    @etl.step
    def transform(ctx: Context) -> Any:
        time.sleep(SLOW_STEP_SECONDS)  # the demo kills the worker in here
        ctx.state["rows_ok"] = ctx.state["rows"] - 3
        return ctx.state

    @etl.step
    def load(ctx: Context) -> Any:
        return Done({"loaded": ctx.state["rows_ok"]})

    return durable


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _wait_for(predicate: Any, timeout: float, what: str, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if not worker.alive():
            raise TimeoutError(f"the worker exited while waiting for {what}")
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def main(*, data_dir: str | None = None, runs: int = 6) -> int:
    root = Path(data_dir) if data_dir else embedded.default_data_dir() / "demo"
    _say(f"starting embedded Postgres and Redis under {root}")
    servers = embedded.start(root)
    durable = build(servers.database_url, servers.broker_url)
    durable.migrate()
    logs = Path(tempfile.mkdtemp(prefix="durable-demo-"))
    env = {"DURABLE_CELERY_DATABASE_URL": servers.database_url,
           BROKER_ENV: servers.broker_url}
    workers: list[WorkerProcess] = []

    def start_worker(n: int) -> WorkerProcess:
        worker = WorkerProcess("durable_celery.demo_worker", queues=[QUEUE], pool="prefork",
                               concurrency=2, env=env, log_path=str(logs / f"worker{n}.log"),
                               nodename=f"demo{n}@%h")
        workers.append(worker.start())
        _say(f"worker {n} started (pid {worker.pid}, log {logs / f'worker{n}.log'})")
        return worker

    try:
        first = start_worker(1)
        stamp = int(time.time())
        ids: dict[str, str] = {}
        for i in range(max(runs - 2, 1)):
            key = f"order:{stamp}-{i}"
            ids[key] = durable.get_definition("checkout").start({"order": i}, key=key)
        ids["report"] = durable.get_definition("report").start()
        ids["etl"] = durable.get_definition("etl").start()
        _say(f"started {len(ids)} runs: {len(ids) - 2} checkouts (they wait for a payment "
             "signal), a report (sleeps 2s), an ETL (slow transform step)")

        _wait_for(lambda: durable.get_workflow(ids["etl"]).step == "transform"
                  and durable.get_workflow(ids["etl"]).status == "executing", 60,
                  "the ETL to enter its slow step", first)
        time.sleep(0.5)
        _say("the ETL is in the middle of 'transform': SIGKILL the worker now")
        first.kill()
        _say("worker 1 killed; its heartbeat goes stale, the reaper will reclaim the step")

        for key, wid in ids.items():
            if key.startswith("order:"):
                result = durable.signal(key, "payment_confirmed", {"amount": 100},
                                        dedup_key=f"pay-{key}")
                durable.signal(key, "payment_confirmed", {"amount": 100},
                               dedup_key=f"pay-{key}")  # a retried webhook: stored once
                assert result.workflow_id == wid
        _say("sent payment signals (each twice, deduplicated) while no worker runs")

        start_worker(2)
        results = {}
        for key, wid in ids.items():
            results[key] = durable.wait_result(wid, timeout=90)
        _say("every run finished:")
        for key, wid in ids.items():
            run = durable.get_workflow(wid)
            steps = durable.workflow_steps(wid)
            print(f"    {key:<24} {run.status:<6} steps={len(steps):<2} "
                  f"attempt={run.attempt} result={results[key]}")
        etl_steps = durable.workflow_steps(ids["etl"])
        transform_runs = [s for s in etl_steps if s.step == "transform"]
        _say(f"the ETL's transform step committed once, at attempt {transform_runs[0].attempt} "
             "(attempt 0 died with worker 1)")
        return 0
    except (errors.DurableCeleryError, TimeoutError) as exc:
        _say(f"demo failed: {exc}")
        for worker_log in sorted(logs.glob("*.log")):
            print(f"--- {worker_log.name} (last lines)")
            print("\n".join(worker_log.read_text(errors="replace").splitlines()[-30:]))
        return 1
    finally:
        for worker in workers:
            worker.stop(timeout=10)
        durable.close()
        servers.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(data_dir=os.environ.get("DURABLE_CELERY_DEMO_DIR")))
