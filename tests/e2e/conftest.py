"""End-to-end fixtures: real ``celery worker`` subprocesses on a private queue.

``e2e`` (Redis) and ``make_e2e(broker_url)`` give a :class:`Harness`: it starts workers
(``tests.e2e.workerapp``) and coordinator processes, always stops them at teardown, and
holds an in-process Durable built from the same ``workerapp.build()`` -- used only to start
runs, signal and query (its coordinator never runs here; the workers run it).

When a test fails, the tail of every subprocess log is attached to the report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from durable_celery import Durable
from tests.e2e import workerapp
from tests.processes import LabelledWorker

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_APP = "tests.e2e.workerapp"
READY_TIMEOUT = 45.0
LOG_TAIL_BYTES = 12_000


# ------------------------------------------------------------------ failure reports


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for path in getattr(item, "_e2e_logs", ()):
            report.sections.append((f"e2e log tail: {path.name}", log_tail(path)))
    return report


def log_tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - size, 0))
            return fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


# ------------------------------------------------------------------ helpers


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.1,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; return that, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class DB:
    """Plain psycopg (autocommit) access to the test database, for assertions."""

    def __init__(self, database_url: str) -> None:
        self.conn = psycopg.connect(workerapp.psycopg_url(database_url), autocommit=True)

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def scalar(self, sql: str, *params: Any) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def effects(self, ids: list[str]) -> dict[tuple[str, str], list[int]]:
        """``(workflow_id, step) -> [attempt, ...]`` in execution order."""
        found: dict[tuple[str, str], list[int]] = {}
        for wid, step, attempt in self.rows(
                "SELECT workflow_id, step, attempt FROM public.e2e_effects "
                "WHERE workflow_id = ANY(%s) ORDER BY at, attempt", list(ids)):
            found.setdefault((wid, step), []).append(attempt)
        return found

    def close(self) -> None:
        self.conn.close()


class Worker(LabelledWorker):

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Worker:
        """Wait for Celery's "<nodename> ready." log line."""
        def ready() -> bool:
            if not self.alive():
                pytest.fail(f"worker {self.label} exited with {self.proc and self.proc.returncode}"
                            f"; log tail:\n{log_tail(self.log)}")
            return self.log.exists() and b" ready." in self.log.read_bytes()

        wait_for(ready, timeout=timeout, interval=0.05, what=f"worker {self.label} ready")
        return self


class CoordinatorProcess:
    """``python -m durable_celery.cli coordinator -A tests.e2e.workerapp`` in its own group."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log = open(log, "ab")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "durable_celery.cli", "-v", "coordinator", "-A", WORKER_APP],
            env=env, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()


class Harness:
    """Workers, coordinators and an in-process client Durable for one test and one broker."""

    def __init__(self, *, broker_url: str, database_url: str, queue: str, tmp_path: Path,
                 item: pytest.Item, db: DB) -> None:
        self.broker_url = broker_url
        self.database_url = database_url
        self.queue = queue
        self.tmp_path = tmp_path
        self.item = item
        self.db = db
        self.workers: list[Worker] = []
        self.coordinators: list[CoordinatorProcess] = []
        self.client = workerapp.build(broker_url, database_url, queue, set_as_current=False)
        self.settings = workerapp.SETTINGS
        self._count = 0

    @property
    def durable(self) -> Durable:
        return self.client.durable

    def start(self, workflow: str, state: Any = None, **kwargs: Any) -> str:
        return self.durable.get_definition(workflow).start(state, **kwargs)

    def env(self, label: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        pythonpath = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {"E2E_BROKER_URL": self.broker_url, "E2E_DATABASE_URL": self.database_url,
                "E2E_QUEUE": self.queue, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1",
                "DURABLE_CELERY_NODENAME": label, **(extra or {})}

    def _log_path(self, label: str) -> Path:
        path = self.tmp_path / f"{label}.log"
        logs = self.item.__dict__.setdefault("_e2e_logs", [])
        logs.append(path)
        return path

    def worker(self, pool: str = "prefork", concurrency: int = 2, *, label: str | None = None,
               env: dict[str, str] | None = None, extra_args: list[str] | None = None,
               ready: bool = True) -> Worker:
        """Start a ``celery worker`` on this test's queue (and wait for it to be ready)."""
        self._count += 1
        label = label or f"w{self._count}"
        worker = Worker(WORKER_APP, queues=[self.queue], pool=pool, concurrency=concurrency,
                        env=self.env(label, env), label=label, log=self._log_path(label),
                        nodename=f"{label}-{uuid.uuid4().hex[:6]}@%h", extra_args=extra_args)
        self.workers.append(worker)
        worker.start()
        return worker.wait_ready() if ready else worker

    def coordinator(self, env: dict[str, str] | None = None) -> CoordinatorProcess:
        self._count += 1
        label = f"coordinator{self._count}"
        proc = CoordinatorProcess({**os.environ, **self.env(label, env)}, self._log_path(label))
        self.coordinators.append(proc)
        return proc

    def coordinator_once(self) -> dict[str, Any]:
        """``durable-celery coordinator --once``: one pass of every sweep; its JSON output."""
        done = subprocess.run(
            [sys.executable, "-m", "durable_celery.cli", "coordinator", "-A", WORKER_APP,
             "--once"], env={**os.environ, **self.env("once")}, cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"exit {done.returncode}: {done.stdout}\n{done.stderr}"
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    # -- queries

    def run(self, wid: str) -> Any:
        return self.durable.get_workflow(wid)

    def wait_status(self, wid: str, status: str, timeout: float = 30.0) -> Any:
        return wait_for(lambda: (r := self.run(wid)).status == status and r, timeout=timeout,
                        what=f"run {wid} to be {status}")

    def worker_rows(self) -> list[tuple[Any, ...]]:
        """``(id, pid, nodename)`` of every row in ``durable_celery.workers``."""
        return self.db.rows(
            "SELECT id, pid, nodename FROM durable_celery.workers ORDER BY started_at")

    def close(self) -> None:
        for proc in self.coordinators:
            proc.stop()
        for worker in self.workers:
            worker.stop(timeout=20)
        self.client.close()


def _purge_broker(broker_url: str, queue: str) -> None:
    """Remove this test's queue (and, on Redis, messages a SIGKILLed worker left unacked)."""
    if broker_url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(broker_url)
        try:
            # Celery's default exchange for a queue is named after it: these are all ours.
            client.delete(queue, f"_kombu.binding.{queue}",
                          f"_kombu.binding_permanent.{queue}",
                          *client.scan_iter(match=f"{queue}\x06\x16*"))  # priority lists
            for tag, raw in client.hgetall("unacked").items():
                try:
                    routing_key = json.loads(raw)[2]
                except (ValueError, IndexError, TypeError):
                    continue
                if routing_key == queue:
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)
        finally:
            client.close()
    else:
        import kombu

        with kombu.Connection(broker_url, connect_timeout=5) as conn:
            conn.default_channel.queue_delete(queue)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def effects_table(database_url: str) -> str:
    with psycopg.connect(workerapp.psycopg_url(database_url), autocommit=True) as conn:
        conn.execute(workerapp.EFFECTS_DDL)
    return "public.e2e_effects"


@pytest.fixture
def e2e_db(clean_db: Any, effects_table: str, database_url: str) -> Iterator[DB]:
    db = DB(database_url)
    db.conn.execute(f"TRUNCATE {effects_table}")
    yield db
    db.close()


@pytest.fixture
def make_e2e(request: pytest.FixtureRequest, database_url: str, queue: str, tmp_path: Path,
             e2e_db: DB, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Harness]]:
    monkeypatch.chdir(REPO_ROOT)  # the workers import tests.e2e.workerapp from here
    made: list[Harness] = []

    def factory(broker_url: str) -> Harness:
        harness = Harness(broker_url=broker_url, database_url=database_url, queue=queue,
                          tmp_path=tmp_path, item=request.node, db=e2e_db)
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        harness.close()
    for harness in made:
        try:
            _purge_broker(harness.broker_url, harness.queue)
        except Exception as exc:  # cleanup only; never mask the test's own outcome
            print(f"could not purge queue {harness.queue}: {exc!r}")


@pytest.fixture
def e2e(make_e2e: Callable[[str], Harness], redis_url: str) -> Harness:
    """A harness on the Redis broker."""
    return make_e2e(redis_url)
