"""Finding 2: a process forked while another thread waits on the database inside
durable_celery (the coordinator migrating against a database that does not answer) gives
its child no lock that nobody will ever release."""

from __future__ import annotations

import os
import threading
import time

import pytest
from celery import Celery

from durable_celery import Durable, errors
from tests.proxy import Proxy


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # Python 3.12+: on purpose
def test_a_child_forked_during_a_database_wait_can_work(database_url):
    proxy = Proxy.for_database(database_url, mode="blackhole")
    app = Celery("fork", broker="memory://", set_as_current=False)
    durable = Durable(app, database_url=proxy.url_for(database_url))
    coordinator = durable.coordinator()
    try:
        coordinator.start()  # its first pass waits on the black-holed connect
        time.sleep(1.0)
        # A thread inside a locked section at the moment of the fork, as the heartbeat or
        # the engine factory may be.
        held = threading.Event()
        done = threading.Event()

        def hold_locks() -> None:
            with durable._identity._lock, durable._holder._lock:
                held.set()
                done.wait(10)

        holder = threading.Thread(target=hold_locks, daemon=True)
        holder.start()
        assert held.wait(5)
        pid = os.fork()
        if pid == 0:  # the child: every lock free, the database usable once it answers
            code = 1
            try:
                proxy_ok = durable._identity._lock.acquire(timeout=2) and \
                    durable._holder._lock.acquire(timeout=2)
                if proxy_ok:
                    durable._identity._lock.release()
                    durable._holder._lock.release()
                    os.environ["DURABLE_TEST_CHILD"] = "1"
                    code = 0
            finally:
                os._exit(code)
        done.set()
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0, "the child waited on a lock held at the fork"

        # And the child uses the database as soon as it answers (in a second fork, after
        # the proxy opens: its own readiness, its own engine).
        proxy.mode = "forward"
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                durable.ensure_ready()
                durable._identity.get().ensure()
                durable._identity.release()
                code = 0
            except errors.DurableCeleryError:
                code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        coordinator.stop()
        durable.close()
        app.close()
        proxy.close()
