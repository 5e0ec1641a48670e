"""A worker whose database is down or not migrated starts anyway, says so in one line per
backoff (no tracebacks), says what to run, reports itself not ready, and recovers by
itself; a pool child forked while the coordinator waits on the database never hangs
(finding 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from tests import services
from tests.e2e.conftest import REPO_ROOT, wait_for
from tests.proxy import Proxy

pytestmark = pytest.mark.e2e


def log_text(worker) -> str:
    return worker.log.read_bytes().decode("utf-8", "replace")


def pool_children(worker) -> list[psutil.Process]:
    return psutil.Process(worker.pid).children()


def test_a_worker_whose_database_is_away_waits_quietly_and_recovers(e2e, database_url):
    proxy = Proxy.for_database(database_url, mode="blackhole")
    try:
        worker = e2e.worker("prefork", 1, env={"E2E_DATABASE_URL": proxy.url_for(database_url)})
        # The worker is up although its coordinator waits for the database.
        time.sleep(2.0)
        (child,) = pool_children(worker)
        # Finding 2: a pool child forked while the coordinator thread is inside its database
        # wait (here: a connect that gets no answer) must not inherit any held lock.
        child.send_signal(signal.SIGKILL)
        wait_for(lambda: [c for c in pool_children(worker) if c.pid != child.pid],
                 timeout=20, what="a replacement pool child")
        proxy.mode = "forward"
        ids = [e2e.start("pipeline", {"x": n}) for n in range(4)]
        for wid in ids:
            e2e.wait_status(wid, "done", timeout=40)
        text = log_text(worker)
        assert "durable_celery is not ready: the database does not answer" in text, text[-3000:]
        assert "Traceback" not in text, text[-6000:]
    finally:
        proxy.close()


def test_an_unmigrated_database_says_what_to_run(make_e2e, redis_url, admin_url, tmp_path):
    name = f"dct_bare_{uuid.uuid4().hex[:8]}"
    bare = services.create_database(admin_url, name)
    e2e_made: list = []
    try:
        e2e = make_e2e(redis_url)
        e2e_made.append(e2e)
        worker = e2e.worker("prefork", 1, env={"E2E_DATABASE_URL": bare,
                                               "DURABLE_CELERY_AUTO_MIGRATE": "false"})
        wait_for(lambda: "durable-celery migrate" in log_text(worker), timeout=20,
                 what="the hint to migrate")
        nodename = worker.nodename.replace("%h", _hostname())
        replies = e2e.client.app.control.broadcast(
            "durable_status", reply=True, destination=[nodename], timeout=5)
        [reply] = [r[nodename] for r in replies if nodename in r]
        [state] = reply["durable_celery"]
        assert state["ready"] is False and "durable-celery migrate" in state["reason"]
        time.sleep(3.0)
        text = log_text(worker)
        assert "Traceback" not in text, text[-6000:]
        assert text.count("durable_celery is not ready") <= 4, text[-3000:]

        done = subprocess.run(
            [sys.executable, "-m", "durable_celery.cli", "migrate", "--database-url", bare],
            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        import psycopg

        from tests.e2e import workerapp

        with psycopg.connect(workerapp.psycopg_url(bare), autocommit=True) as conn:
            conn.execute(workerapp.EFFECTS_DDL)  # what the test workflow records into
        client = _client_on(bare, e2e)
        try:
            wid = client.get_definition("pipeline").start({"x": 1})
            wait_for(lambda: client.get_workflow(wid).status == "done", timeout=40,
                     what="the run on the freshly migrated database")
        finally:
            client.close()
            client.app.close()
    finally:
        for harness in _harnesses(e2e_made):
            harness.close()
        services.drop_database(admin_url, name)


def _harnesses(made):
    """Stop the workers before the database goes (the fixture would, after the drop)."""
    return made


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _client_on(database_url, e2e):
    from tests.e2e import workerapp

    return workerapp.build(e2e.broker_url, database_url, e2e.queue,
                           set_as_current=False).durable
