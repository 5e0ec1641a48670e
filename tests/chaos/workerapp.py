"""The Celery app the chaos ``celery worker`` subprocesses load (``-A tests.chaos.workerapp``).

One workflow, ``chaos``, mixes every kind of step::

    a (effect) -> b (raises on attempt 0 for "flaky" runs: durable retry) -> c (holds the
    worker a little for some runs, then Sleep ~1 s) -> d (Await "go", no timeout)
    -> e (reads the signal payload, Done with a result computed from input and payload)

Every execution of a step inserts one row into ``chaos.effects`` (workflow_id, step,
attempt, idempotency key, pid, process group) with its own plain psycopg connection, and
commits it before the step returns; the accounting matches those rows to the committed
history. The insert retries while the database is away (a restart scenario): the effect
is the step's own business, and an external write that gives up at the first connection
error would fail the run for reasons that have nothing to do with durable_celery. Each
execution carries a fresh token, so a retried insert never counts twice.

``CHAOS_FAULTS=dup-drop`` makes this process publish every durable message twice and drop
about one in ten (the message is reported as sent but never reaches the broker), and logs
each fault on the ``chaos.faults`` logger.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from celery import Celery

from durable_celery import Await, Done, Durable, Fail, Sleep, foreach
from tests.processes import ThreadConnections

SETTINGS: dict[str, float] = {"heartbeat_interval": 0.5, "stale_after": 3.0,
                              "sweep_interval": 0.2, "redispatch_after": 2.0}
WORKFLOW = "chaos"
STEPS = ("a", "b", "c", "d", "e")
SIGNAL = "go"
SHIPPED = "shipped"
NOTIFY_TASK = "chaos.notify"
DROP_RATE = 0.1
EFFECT_RETRY_SECONDS = 90.0

EFFECTS_DDL = """
CREATE SCHEMA IF NOT EXISTS chaos;
CREATE TABLE IF NOT EXISTS chaos.effects (
    token           text        PRIMARY KEY,
    workflow_id     text        NOT NULL,
    step            text        NOT NULL,
    attempt         int         NOT NULL,
    idempotency_key text        NOT NULL,
    pid             int         NOT NULL,
    pgid            int         NOT NULL,
    at              timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

faults_log = logging.getLogger("chaos.faults")


def expected_result(state: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """What step ``e`` returns: a function of the run's input and the signal's payload."""
    return {"i": state["i"], "total": state["x"] * 1000 + payload["v"]}


class Effects(ThreadConnections):
    """One autocommit connection per process and thread; reconnects after errors."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url, connect_timeout=5)

    def record(self, ctx: Any, step: str) -> None:
        self.record_raw(ctx.workflow_id, step, ctx.attempt, ctx.idempotency_key)

    def record_raw(self, workflow_id: str, step: str, attempt: int, key: str) -> None:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + EFFECT_RETRY_SECONDS
        while True:
            try:
                self._conn().execute(
                    "INSERT INTO chaos.effects (token, workflow_id, step, attempt, "
                    "idempotency_key, pid, pgid) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (token) DO NOTHING",
                    (token, workflow_id, step, attempt, key, os.getpid(), os.getpgid(0)))
                return
            except psycopg.OperationalError:
                conn = getattr(self._local, "conn", None)
                if conn is not None:
                    conn.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def install_message_faults(durable: Durable, rng: random.Random | None = None) -> dict[str, int]:
    """Publish every durable message twice; silently drop about ``DROP_RATE`` of them.

    Wraps this Durable's publish path (``publisher.publish_many``, used by starts, commits, signals
    and every sweep). Returns the live tally of faults injected in this process.
    """
    rng = rng or random.Random()
    original = durable.publisher.publish_many
    tally = {"published": 0, "duplicated": 0, "dropped": 0}
    lock = threading.Lock()

    def publish_many(dispatches: list[Any]) -> int:
        sent: list[Any] = []
        with lock:
            for dispatch in dispatches:
                tally["published"] += 1
                if rng.random() < DROP_RATE:
                    tally["dropped"] += 1
                    faults_log.warning("chaos fault: dropped %s seq %s", dispatch.workflow_id,
                                       dispatch.seq)
                    continue
                tally["duplicated"] += 1
                faults_log.warning("chaos fault: duplicated %s seq %s", dispatch.workflow_id,
                                   dispatch.seq)
                sent += [dispatch, dispatch]
        done = original(sent)
        return len(dispatches) if done == len(sent) else 0

    durable.publisher.publish_many = publish_many  # type: ignore[method-assign]
    return tally


@dataclass
class ChaosApp:
    app: Celery
    durable: Durable
    effects: Effects
    notify: Any = None  # the @durable.task of the mixed workload
    faults: dict[str, int] | None = None

    def close(self) -> None:
        self.durable.close()
        self.app.close()


def build(broker_url: str, database_url: str, queue: str, *, faults: str = "",
          set_as_current: bool = True) -> ChaosApp:
    app = Celery("chaos", broker=broker_url, set_as_current=set_as_current)
    app.conf.task_default_queue = queue
    app.conf.broker_connection_retry_on_startup = True
    app.conf.broker_connection_max_retries = None  # a Redis restart must never stop a worker
    durable = Durable(app, database_url=database_url, **SETTINGS)
    effects = Effects(database_url)
    wf = durable.workflow(WORKFLOW)

    @wf.step
    def a(ctx: Any) -> Any:
        effects.record(ctx, "a")
        return None

    @wf.step(retry={"max_attempts": 3, "delay": 0.3, "backoff": "constant", "jitter": False})
    def b(ctx: Any) -> Any:
        effects.record(ctx, "b")
        if ctx.state.get("flaky") and ctx.attempt == 0:
            raise RuntimeError("flaky step b fails its first attempt")
        return None

    @wf.step
    def c(ctx: Any) -> Any:
        effects.record(ctx, "c")
        hold = float(ctx.state.get("hold", 0))
        if hold:
            time.sleep(hold)  # a step that takes a while: kills and pauses catch it mid-way
        return Sleep(seconds=float(ctx.state.get("sleep", 1.0)))

    @wf.step
    def d(ctx: Any) -> Any:
        effects.record(ctx, "d")
        return Await(SIGNAL, timeout=None)

    @wf.step
    def e(ctx: Any) -> Any:
        effects.record(ctx, "e")
        go = ctx.signal(SIGNAL)
        if go is None:
            return Fail("step e ran without its signal")
        return Done(expected_result(ctx.state, go.payload))

    notify = declare_mixed(durable, effects)
    chaos = ChaosApp(app=app, durable=durable, effects=effects, notify=notify)
    if faults == "dup-drop":
        chaos.faults = install_message_faults(durable)
    elif faults:
        raise ValueError(f"unknown CHAOS_FAULTS {faults!r}")
    return chaos


def expected_order(state: dict[str, Any], payload: dict[str, Any] | None) -> Any:
    """An order's end: compensated when its card is declined, else shipped."""
    if state["decline"]:
        return None
    assert payload is not None
    return {"order": state["n"], "tracking": payload["tracking"]}


def declare_mixed(durable: Durable, effects: Effects) -> Any:
    """The mixed workload: a saga, foreach with a cap, and a drop-in task (returned)."""
    # -- a saga: reserve (undone by release) -> charge (declines some cards) -> wait for
    #    the "shipped" signal (sent by name, blindly) -> ship
    order = durable.workflow("order")

    @order.step(compensate="release")
    def reserve(ctx: Any) -> Any:
        effects.record(ctx, "reserve")
        return None

    @order.step
    def charge(ctx: Any) -> Any:
        effects.record(ctx, "charge")
        hold = float(ctx.state.get("hold", 0))
        if hold:
            time.sleep(hold)
        if ctx.state.get("decline"):
            return Fail("card declined")
        return None

    @order.step
    def wait_ship(ctx: Any) -> Any:
        effects.record(ctx, "wait_ship")
        return Await(SHIPPED)

    @order.step
    def ship(ctx: Any) -> Any:
        effects.record(ctx, "ship")
        shipped = ctx.signal(SHIPPED)
        if shipped is None:
            return Fail("ship ran without its signal")
        return Done(expected_order(ctx.state, shipped.payload))

    @order.compensation
    def release(ctx: Any) -> Any:
        effects.record(ctx, "release")
        return None

    # -- foreach with a cap: items picked (a short durable sleep) and packed
    item = durable.workflow("item")

    @item.step
    def pick(ctx: Any) -> Any:
        effects.record(ctx, "pick")
        return Sleep(seconds=0.3)

    @item.step
    def pack(ctx: Any) -> Any:
        effects.record(ctx, "pack")
        hold = float(ctx.state.get("hold", 0))
        if hold:
            time.sleep(hold)
        return Done(ctx.state["item"] * 10)

    batch = durable.workflow("batch")

    @batch.step
    def fan(ctx: Any) -> Any:
        effects.record(ctx, "fan")
        items = [{"item": i, "hold": 0.3 if i % 3 == 0 else 0}
                 for i in range(int(ctx.state["items"]))]
        return foreach(items, item, concurrency=2)

    @batch.step
    def total(ctx: Any) -> Any:
        effects.record(ctx, "total")
        if any(c.status != "done" for c in ctx.children):
            return Fail(f"children ended {[c.status for c in ctx.children]}")
        return Done(sum(c.result for c in ctx.children))

    # -- a drop-in task, started with a countdown
    @durable.task(name=NOTIFY_TASK, bind=True)
    def notify(self: Any, n: int) -> int:
        effects.record_raw(self.request.id, "run", self.request.retries,
                           self.request.idempotency_key)
        return n * 2

    return notify


if os.environ.get("CHAOS_BROKER_URL"):
    _built = build(os.environ["CHAOS_BROKER_URL"], os.environ["CHAOS_DATABASE_URL"],
                   os.environ["CHAOS_QUEUE"], faults=os.environ.get("CHAOS_FAULTS", ""))
    app = _built.app
    durable = _built.durable
