"""What every benchmark shares: the servers, the worker subprocesses of both sides, the
clients, statistics, printing and the JSON-lines results."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
from celery import Celery

from benchmarks import durable_app, marks, plain_app, services
from durable_celery.testing import WorkerProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 60.0


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class Worker:
    """A ``celery worker`` subprocess of one side, with its label and log file."""

    side: str
    label: str
    process: WorkerProcess
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        """Resident memory of the worker and all its pool processes, in bytes."""
        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop(timeout=20)


@dataclass
class Bench:
    """One invocation: servers, a private database, queues, clients and results."""

    admin_url: str
    broker_url: str
    redis_url: str
    out: Path
    quick: bool
    repeats: int
    database: services.Database = field(init=False)
    prefix: str = field(default_factory=lambda: f"dcbench:{uuid.uuid4().hex[:8]}")
    workers: list[Worker] = field(default_factory=list)
    queues: set[str] = field(default_factory=set)
    logs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dcbench-logs-")))
    _clients: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.database = services.Database(self.admin_url)
        self.redis = redis.Redis.from_url(self.redis_url, socket_timeout=300)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.invocation = uuid.uuid4().hex[:12]
        self.calibration = self.calibrate()
        self.write({"kind": "invocation", "invocation": self.invocation,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "python": sys.version.split()[0], "platform": platform.platform(),
                    "cpus": os.cpu_count(), "broker": self.broker_url.split("://")[0],
                    "quick": self.quick, "repeats": self.repeats, **self.calibration})

    def calibrate(self, seconds: float = 1.0) -> dict[str, Any]:
        """What the machine gives right now: single-row commits per second on one
        connection (the floor under every durable step) and the load average."""
        with self.database.connect() as conn:
            # A logged table: every commit waits for its WAL flush, like a step's commit.
            conn.execute("CREATE TABLE public.calibrate (n int)")
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                conn.execute("INSERT INTO public.calibrate VALUES (%s)", (count,))
                count += 1
            rate = count / (time.perf_counter() - t0)
            conn.execute("DROP TABLE public.calibrate")
        return {"postgres_commits_per_s": round(rate), "load_average": os.getloadavg()}

    # ------------------------------------------------------------------ names

    def queue(self, name: str) -> str:
        queue = f"dcbench-{self.prefix.split(':')[1]}-{name}"
        self.queues.add(queue)
        return queue

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}:{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------ clients

    def ours(self, queue: str, settings: dict[str, Any] | None = None) -> durable_app.Built:
        """An in-process client Durable (never runs steps; the workers do)."""
        cache = f"ours:{queue}:{json.dumps(settings or {}, sort_keys=True)}"
        if cache not in self._clients:
            self._clients[cache] = durable_app.build(
                self.broker_url, self.database.sqlalchemy_url, self.redis_url, queue,
                self.prefix, settings={**(settings or {}), "coordinator": False},
                set_as_current=False)
        return self._clients[cache]  # type: ignore[no-any-return]

    def theirs(self, queue: str) -> Celery:
        cache = f"theirs:{queue}"
        if cache not in self._clients:
            self._clients[cache] = plain_app.build(self.broker_url, self.redis_url, queue,
                                                   self.prefix, set_as_current=False)
        return self._clients[cache]

    # ------------------------------------------------------------------ workers

    def worker(self, side: str, queue: str, *, pool: str = "prefork", concurrency: int = 2,
               label: str | None = None, settings: dict[str, Any] | None = None,
               env: dict[str, str] | None = None, wait: bool = True) -> Worker:
        label = label or f"{side}-{pool}-{len(self.workers) + 1}"
        log = self.logs / f"{label}.log"
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                     if p)
        app = "benchmarks.durable_app" if side == "ours" else "benchmarks.plain_app"
        process = WorkerProcess(
            app, queues=[queue], pool=pool, concurrency=concurrency, log_path=str(log),
            nodename=f"{label}-{uuid.uuid4().hex[:6]}@%h", cwd=str(REPO_ROOT),
            extra_args=["--loglevel", "WARNING"],
            env={"BENCH_SIDE": "durable" if side == "ours" else "plain",
                 "BENCH_BROKER_URL": self.broker_url,
                 "BENCH_DATABASE_URL": self.database.sqlalchemy_url,
                 "BENCH_REDIS_URL": self.redis_url, "BENCH_QUEUE": queue,
                 "BENCH_PREFIX": self.prefix, "BENCH_LABEL": label,
                 "BENCH_SETTINGS": json.dumps(settings or {}), "PYTHONPATH": pythonpath,
                 "DURABLE_CELERY_NODENAME": label, **(env or {})})
        worker = Worker(side=side, label=label, process=process, log=log)
        self.workers.append(worker)
        process.start()
        if wait:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, worker: Worker) -> None:
        key = marks.ready_key(self.prefix, worker.label)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.redis.llen(key):
            if not worker.process.alive():
                raise RuntimeError(f"worker {worker.label} exited; log: {worker.log}\n"
                                   + worker.log.read_text(errors="replace")[-4000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker.label} not ready; log: {worker.log}")
            time.sleep(0.05)

    @contextlib.contextmanager
    def pair(self, name: str, *, pool: str, concurrency: int,
             settings: dict[str, Any] | None = None) -> Iterator[tuple[str, str]]:
        """A worker of each side on its own queue; yields ``(our queue, their queue)``."""
        ours_q, theirs_q = self.queue(f"{name}-d"), self.queue(f"{name}-p")
        started = [self.worker("ours", ours_q, pool=pool, concurrency=concurrency,
                               settings=settings),
                   self.worker("theirs", theirs_q, pool=pool, concurrency=concurrency)]
        try:
            yield ours_q, theirs_q
        finally:
            for worker in started:
                worker.stop()

    # ------------------------------------------------------------------ database

    def sql(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.database.connect() as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def truncate(self) -> None:
        """Empty the run tables between benchmarks (the workers table stays)."""
        self.ours(self.queue("setup")).durable.migrate()
        self.sql("TRUNCATE durable_celery.signals, durable_celery.steps, durable_celery.runs")

    # ------------------------------------------------------------------ results

    def write(self, record: dict[str, Any]) -> None:
        with self.out.open("a") as fh:
            fh.write(json.dumps(_finite(record), default=str) + "\n")

    def report(self, benchmark: str, metric: str, unit: str, *, ours: list[float],
               theirs: list[float] | None = None, variant: str = "", pool: str = "",
               higher_is_better: bool = True, target: str = "",
               check: Callable[[float], bool] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Print one line and append one JSON record; returns the record."""
        o = summary(ours)
        record: dict[str, Any] = {
            "kind": "result", "invocation": self.invocation, "benchmark": benchmark,
            "metric": metric, "unit": unit, "variant": variant, "pool": pool,
            "higher_is_better": higher_is_better, "ours": {**o, "values": ours}}
        line = (f"{benchmark:<11} {metric:<28} {pool:<11} {variant:<14} ours "
                f"{_fmt(o['median'])} [{_fmt(o['min'])}..{_fmt(o['max'])}] {unit}")
        value = o["median"]
        if theirs:
            t = summary(theirs)
            finite = math.isfinite(o["median"]) and math.isfinite(t["median"])
            ratio = o["median"] / t["median"] if finite and t["median"] else float("nan")
            record["theirs"] = {**t, "values": theirs}
            record["ratio"] = ratio
            value = ratio
            line += (f" | theirs {_fmt(t['median'])} [{_fmt(t['min'])}..{_fmt(t['max'])}]"
                     f" | ours/theirs {ratio:.2f}")
        if check is not None:
            record["target"] = target
            record["target_met"] = bool(check(value))
            line += f" | target {target}: {'met' if record['target_met'] else 'MISSED'}"
        if extra:
            record.update(extra)
        print(line, flush=True)
        self.write(record)
        return record

    # ------------------------------------------------------------------ cleanup

    def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.stop()
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.close()
        for queue in self.queues:
            with contextlib.suppress(Exception):
                services.purge_queue(self.broker_url, queue)
        with contextlib.suppress(Exception):
            keys = list(self.redis.scan_iter(match=f"{self.prefix}:*"))
            if keys:
                self.redis.delete(*keys)
        self.redis.close()
        self.database.drop()


def _finite(value: Any) -> Any:
    """JSON has no infinity or NaN: they become null (e.g. "never recovered")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fmt(value: float) -> str:
    if value != value:  # nan
        return "nan"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"
