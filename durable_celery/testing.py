"""Public test kit: run workflows inline, synchronously, through the real claim/commit code."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from durable_celery.app import Durable


def drain(durable: Durable, *, max_steps: int = 10_000, collapse_timers: bool = True,
          expire_awaits: bool = False) -> dict[str, int]:
    """Run everything runnable now, inline, until nothing is left; returns a tally.

    ``collapse_timers`` makes ``Sleep`` and ``Retry(delay)`` due at once; ``expire_awaits``
    also fires every ``Await`` deadline (otherwise awaiting runs stay parked, so a test can
    signal them and drain again). Nothing is published to the broker meanwhile.
    """
    durable.ensure_ready()
    tally: Counter[str] = Counter()

    def steps() -> int:
        return durable.stats().get("steps", 0)

    before = steps()
    with durable.publisher.inline():
        while steps() - before < max_steps:
            if collapse_timers:
                durable.store.collapse_timers(expire_awaits=expire_awaits)
            if expire_awaits:
                tally["expired"] += len(durable.store.expire_awaits(1000))
            batch = durable.store.runnable_now(100)
            if not batch:
                break
            outcomes = [durable.executor.execute(d.workflow_id, d.seq) for d in batch]
            tally.update(outcomes)
            if "committed" not in outcomes:
                break  # nothing here can progress (e.g. workflows not registered here)
    tally["steps"] = steps() - before
    return dict(tally)


class WorkerProcess:
    """A real ``celery worker`` subprocess, for end-to-end tests and the demo.

    ``app`` is the ``-A`` argument (a module whose Celery app has a Durable). ``env`` is
    added to the current environment. The worker's output goes to ``log_path`` if given.
    """

    def __init__(self, app: str, *, queues: list[str], pool: str = "prefork",
                 concurrency: int = 2, env: dict[str, str] | None = None,
                 log_path: str | None = None, nodename: str | None = None,
                 extra_args: list[str] | None = None, cwd: str | None = None) -> None:
        self.app = app
        self.queues = queues
        self.pool = pool
        self.concurrency = concurrency
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.nodename = nodename or f"w{uuid.uuid4().hex[:8]}@%h"
        self.extra_args = extra_args or []
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> WorkerProcess:
        cmd = [sys.executable, "-m", "celery", "-A", self.app, "worker",
               "-P", self.pool, "-c", str(self.concurrency), "-Q", ",".join(self.queues),
               "-n", self.nodename, "--loglevel", "INFO",
               "--without-gossip", "--without-mingle", "--without-heartbeat",
               *self.extra_args]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # Own process group: kill() takes the pool children down with the parent.
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.cwd)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker and every process of its group (pool children too)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._close_log()

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not exit in time."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def _close_log(self) -> None:
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
