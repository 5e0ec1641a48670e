"""The Celery app the end-to-end ``celery worker`` subprocesses load (``-A tests.e2e.workerapp``).

``build()`` declares the test workflows on a fresh Celery app + Durable. The worker gets its
app at import time from the ``E2E_*`` environment variables; the test process calls
``build()`` itself (with the same arguments) to start runs, send signals and query, and never
sets those variables, so importing this module there builds nothing.

Steps record their side effects in ``public.e2e_effects`` (created by the test fixture) with
plain psycopg, one row per execution, so tests can count how often each step really ran.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery

from durable_celery import Await, Done, Durable, Fail, RateLimit, Sleep, Spawn, foreach
from tests.processes import ThreadConnections
from tests.processes import psycopg_url as psycopg_url  # tests use workerapp.psycopg_url

SETTINGS: dict[str, float] = {"heartbeat_interval": 0.5, "stale_after": 3.0,
                              "sweep_interval": 0.2, "redispatch_after": 3.0}

PIPELINE_STEPS = ("s1", "s2", "s3", "s4", "s5")

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS public.e2e_effects (
    workflow_id text        NOT NULL,
    step        text        NOT NULL,
    attempt     int         NOT NULL,
    pid         int         NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class Effects(ThreadConnections):
    """Records step executions; one autocommit connection per process and thread."""

    def record(self, ctx: Any, step: str) -> None:
        self._conn().execute(
            "INSERT INTO public.e2e_effects (workflow_id, step, attempt, pid) "
            "VALUES (%s, %s, %s, %s)", (ctx.workflow_id, step, ctx.attempt, os.getpid()))


def _block(ctx: Any) -> None:
    """Sleep ``state["block"]`` seconds: only in the worker labelled ``state["block_on"]``
    (its ``DURABLE_CELERY_NODENAME``) if given, else while ``attempt < block_attempts`` (1)."""
    seconds = float(ctx.state.get("block", 0))
    if not seconds:
        return
    if "block_on" in ctx.state:
        blocked = os.environ.get("DURABLE_CELERY_NODENAME") == ctx.state["block_on"]
    else:
        blocked = ctx.attempt < int(ctx.state.get("block_attempts", 1))
    if blocked:
        time.sleep(seconds)


@dataclass
class E2EApp:
    app: Celery
    durable: Durable
    effects: Effects

    def close(self) -> None:
        self.durable.close()
        self.app.close()


def build(broker_url: str, database_url: str, queue: str, *,
          set_as_current: bool = True) -> E2EApp:
    """A Celery app (default queue ``queue``) with a Durable and the e2e workflows."""
    app = Celery("e2e", broker=broker_url, set_as_current=set_as_current)
    app.conf.task_default_queue = queue
    app.conf.broker_connection_retry_on_startup = True
    durable = Durable(app, database_url=database_url, **SETTINGS)
    effects = Effects(database_url)

    # -- a 5-step pipeline: plain return values, run ahead in one task
    pipeline = durable.workflow("pipeline")

    def pipeline_step(name: str, last: bool) -> None:
        def step(ctx: Any) -> Any:
            effects.record(ctx, name)
            pause = float(ctx.state.get("pause", 0))
            if pause:
                time.sleep(pause)
            trail = [*ctx.state.get("trail", []), name]
            if last:
                return {"x": ctx.state["x"], "trail": trail}
            return {**ctx.state, "trail": trail}

        step.__name__ = name
        pipeline.step(step)

    for i, name in enumerate(PIPELINE_STEPS):
        pipeline_step(name, last=i == len(PIPELINE_STEPS) - 1)

    # -- a durable timer, then a signal
    timer = durable.workflow("timer")

    @timer.step
    def nap(ctx: Any) -> Any:
        effects.record(ctx, "nap")
        return Sleep(seconds=float(ctx.state.get("sleep", 1)))

    @timer.step
    def wait_go(ctx: Any) -> Any:
        effects.record(ctx, "wait_go")
        return Await("go", timeout=30)

    @timer.step
    def finish(ctx: Any) -> Any:
        effects.record(ctx, "finish")
        go = ctx.signal("go")
        return Done({"go": go.payload if go is not None else None,
                     "timed_out": ctx.timed_out, "x": ctx.state.get("x")})

    # -- a step that blocks long enough to be SIGKILLed mid-way
    slow = durable.workflow("slow")

    @slow.step
    def before(ctx: Any) -> Any:
        effects.record(ctx, "before")
        return None

    @slow.step
    def middle(ctx: Any) -> Any:
        effects.record(ctx, "middle:start")  # the marker tests wait for
        _block(ctx)
        effects.record(ctx, "middle:done")
        return None

    @slow.step
    def after(ctx: Any) -> Any:
        effects.record(ctx, "after")
        return {"x": ctx.state.get("x")}

    # -- a first step that blocks (prefetch tests)
    blocker = durable.workflow("blocker")

    @blocker.step
    def first(ctx: Any) -> Any:
        effects.record(ctx, "first:start")
        _block(ctx)
        effects.record(ctx, "first:done")
        return None

    @blocker.step
    def second(ctx: Any) -> Any:
        effects.record(ctx, "second")
        return {"x": ctx.state.get("x")}

    # -- a step that fails twice, then succeeds on its third attempt
    flaky = durable.workflow("flaky")

    @flaky.step(retry={"max_attempts": 3, "delay": 0.2})
    def wobble(ctx: Any) -> Any:
        effects.record(ctx, "wobble")
        if ctx.attempt < 2:
            raise RuntimeError(f"flaky failure at attempt {ctx.attempt}")
        return None

    @flaky.step
    def settle(ctx: Any) -> Any:
        effects.record(ctx, "settle")
        return {"ok": True, "x": ctx.state.get("x")}

    # -- fan-out / fan-in: children that finish at the same wall-clock moment
    fanout_child = durable.workflow("fanout_child")

    @fanout_child.step
    def converge(ctx: Any) -> Any:
        time.sleep(max(float(ctx.state["go_at"]) - time.time(), 0))
        return Done({"n": ctx.state["n"], "pid": os.getpid()})

    fanout = durable.workflow("fanout")

    @fanout.step
    def spread(ctx: Any) -> Any:
        go_at = time.time() + float(ctx.state.get("lead", 3))
        return Spawn([fanout_child.child({"n": n, "go_at": go_at})
                      for n in range(int(ctx.state["children"]))], next="gather")

    @fanout.step
    def gather(ctx: Any) -> Any:
        effects.record(ctx, "gather")
        return Done({"statuses": [c.status for c in ctx.children],
                     "ns": [c.result["n"] for c in ctx.children],
                     "pids": sorted({c.result["pid"] for c in ctx.children})})

    # -- foreach with a concurrency cap
    bulk_item = durable.workflow("bulk_item")

    @bulk_item.step
    def handle(ctx: Any) -> Any:
        time.sleep(float(ctx.state.get("pause", 0)))
        return Done(ctx.state["item"])

    bulk = durable.workflow("bulk")

    @bulk.step
    def fan(ctx: Any) -> Any:
        return foreach([{"item": i, "pause": ctx.state.get("pause", 0)}
                        for i in range(int(ctx.state["count"]))], bulk_item,
                       concurrency=int(ctx.state["cap"]), next="tally")

    @bulk.step
    def tally(ctx: Any) -> Any:
        return Done({"done": sum(c.status == "done" for c in ctx.children),
                     "items": [c.result for c in ctx.children]})

    # -- a saga whose middle compensation blocks long enough to be SIGKILLed
    saga = durable.workflow("saga")

    def undo(name: str, block: bool) -> None:
        def compensation(ctx: Any) -> Any:
            effects.record(ctx, f"{name}:start")
            if block:
                _block(ctx)
            effects.record(ctx, f"{name}:done")
            return None

        compensation.__name__ = name
        saga.compensation(compensation)

    for letter in "abc":
        def book(ctx: Any, letter: str = letter) -> Any:
            effects.record(ctx, f"book_{letter}")
            return None

        book.__name__ = f"book_{letter}"
        saga.step(compensate=f"undo_{letter}")(book)
        undo(f"undo_{letter}", block=letter == "b")

    @saga.step
    def pay(ctx: Any) -> Any:
        effects.record(ctx, "pay")
        return Fail("payment failed")

    # -- flow control: a provider that takes 10 calls a second, across every worker
    limited = durable.workflow("limited", rate_limit=RateLimit(
        limit=10, period=1.0, name="e2e-provider", key=lambda state: state.get("bucket")))

    @limited.step
    def call_provider(ctx: Any) -> Any:
        effects.record(ctx, "call")
        _block(ctx)
        return Done(ctx.state.get("n"))

    # -- a run with a deadline, waiting for a signal that never comes
    deadlined = durable.workflow("deadlined")

    @deadlined.step
    def wait_approval(ctx: Any) -> Any:
        effects.record(ctx, "wait_approval")
        return Await("approved")

    @deadlined.step
    def approved(ctx: Any) -> Any:
        return Done("approved")

    # -- a step with its own time limits, reached from a step without (no run-ahead into it)
    bounded = durable.workflow("bounded")

    @bounded.step
    def lead_in(ctx: Any) -> Any:
        effects.record(ctx, "lead_in")
        return None

    @bounded.step(soft_time_limit=1.0, time_limit=5.0, retry={"max_attempts": 2, "delay": 0.1})
    def capped(ctx: Any) -> Any:
        effects.record(ctx, "capped")
        if ctx.attempt == 0:
            time.sleep(float(ctx.state.get("pause", 0)))
        return Done({"attempt": ctx.attempt})

    return E2EApp(app=app, durable=durable, effects=effects)


if os.environ.get("E2E_BROKER_URL"):
    _built = build(os.environ["E2E_BROKER_URL"], os.environ["E2E_DATABASE_URL"],
                   os.environ["E2E_QUEUE"])
    app = _built.app
    durable = _built.durable
