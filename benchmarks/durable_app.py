"""Our side: the Celery app + Durable the benchmark workers load
(``celery -A benchmarks.durable_app worker``), configured by ``BENCH_*`` environment variables.

The client process calls :func:`build` with the same arguments to start runs and query.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery import signals as celery_signals

from benchmarks import marks
from durable_celery import Await, Done, Durable, RateLimit, Sleep

STEPS = 10


@dataclass
class Built:
    app: Celery
    durable: Durable
    prefix: str

    def close(self) -> None:
        self.durable.close()
        self.app.close()


def build(broker_url: str, database_url: str, redis_url: str, queue: str, prefix: str, *,
          settings: dict[str, Any] | None = None, label: str = "client",
          set_as_current: bool = True) -> Built:
    app = Celery("bench_durable", broker=broker_url, set_as_current=set_as_current)
    app.conf.task_default_queue = queue
    app.conf.broker_connection_retry_on_startup = True
    app.conf.worker_hijack_root_logger = False
    durable = Durable(app, database_url=database_url, **(settings or {}))

    def trivial(name: str) -> Any:
        def step(ctx: Any) -> Any:
            return None  # keep the state; the next declared step (or done on the last)

        step.__name__ = name
        return step

    # Benchmarks 1, 2 and 6: ten trivial steps, with run-ahead (default) and without.
    for name, ahead in (("chain10", None), ("chain10_hop", False)):
        wf = durable.workflow(name, run_ahead=ahead)
        for i in range(STEPS):
            wf.step(trivial(f"s{i}"))

    # Benchmark 9 (flow control): the same ten steps, each taking a token of a limit too
    # high to ever bind (what a limit costs); one step under a saturated limit; one step
    # limited per tenant (fairness).
    limited = durable.workflow("chain10_limited", rate_limit=RateLimit(
        limit=1_000_000, name="bench-idle"))
    for i in range(STEPS):
        limited.step(trivial(f"s{i}"))
    saturated = durable.workflow("saturated", rate_limit=RateLimit(limit=50, name="bench-sat"))

    @saturated.step
    def call(ctx: Any) -> Any:
        return Done({"started": time.time()})

    tenants = durable.workflow("tenant", rate_limit=RateLimit(
        limit=100, name="bench-tenant", key=lambda state: state["tenant"]))

    @tenants.step
    def serve(ctx: Any) -> Any:
        return Done({"started": time.time()})

    # Benchmark 3: park on a signal; the next step marks when it starts.
    resume = durable.workflow("resume")

    @resume.step
    def park(ctx: Any) -> Any:
        return Await("go")

    @resume.step
    def resumed(ctx: Any) -> Any:
        marks.mark(redis_url, f"{prefix}:resumed:{ctx.workflow_id}")
        return Done()

    # Benchmark 4: a durable timer; the next step returns when it started.
    timer = durable.workflow("timer")

    @timer.step
    def nap(ctx: Any) -> Any:
        return Sleep(seconds=float(ctx.state.get("sleep", 1.0)))

    @timer.step
    def woke(ctx: Any) -> Any:
        return Done({"started": time.time()})

    # Benchmark 5: a step that blocks on the victim worker; marks every start.
    hold = durable.workflow("hold")

    @hold.step
    def grip(ctx: Any) -> Any:
        marks.mark(redis_url, f"{prefix}:hold:{ctx.workflow_id}", f"{label} {time.time()!r}")
        if ctx.state.get("victim") == label:
            time.sleep(3600)
        return Done()

    return Built(app=app, durable=durable, prefix=prefix)


if os.environ.get("BENCH_SIDE") == "durable":
    _label = os.environ["BENCH_LABEL"]
    _built = build(os.environ["BENCH_BROKER_URL"], os.environ["BENCH_DATABASE_URL"],
                   os.environ["BENCH_REDIS_URL"], os.environ["BENCH_QUEUE"],
                   os.environ["BENCH_PREFIX"],
                   settings=json.loads(os.environ.get("BENCH_SETTINGS") or "{}"), label=_label)
    app = _built.app
    durable = _built.durable

    @celery_signals.worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        marks.mark(os.environ["BENCH_REDIS_URL"], marks.ready_key(_built.prefix, _label))
