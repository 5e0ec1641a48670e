"""The identity of a worker process: its ``workers`` row, its heartbeat, its orphaned leases."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from durable_celery import forksafe
from durable_celery.storage.records import Claim
from durable_celery.storage.store import Store
from durable_celery.storage.sweeps import HeartbeatLine

log = logging.getLogger("durable_celery.worker")

# A beat must finish well within the interval: the next one then comes on time.
BEAT_TIMEOUT_SHARE = 0.8
# How long releasing an orphaned lease waits on the run's row lock before trying later.
ORPHAN_LOCK_TIMEOUT = 1.0


class WorkerIdentity:
    """Registered lazily in the process that executes steps; re-created after a fork.

    Two daemon threads. The heartbeat thread only beats, every ``interval`` seconds, on a
    connection of its own with every statement bounded: nothing else can delay it, so a
    live process is never reaped (a beat that fails is tried again at the next interval).
    If its row disappeared (the reaper judged the process dead, e.g. after a long SIGSTOP),
    it registers again: its old claims are gone and their late commits are refused by the
    lease guard. The orphan thread hands back leases this process may hold without knowing
    how far they got, waiting at most ``ORPHAN_LOCK_TIMEOUT`` on a locked run and trying
    again later.
    """

    def __init__(self, store: Store, *, interval: float, nodename: str | None = None) -> None:
        self.store = store
        self.interval = interval
        self.nodename = nodename
        self.pid = os.getpid()
        self.id = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._orphaned = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = forksafe.Lock()
        self._registered = False
        self._line = HeartbeatLine(store.db, timeout=interval * BEAT_TIMEOUT_SHARE)
        # Leases (workflow id, lease) this process may hold without knowing how far they
        # got: a claim whose commit could not reach the database, or a claim whose answer was
        # lost. Released once the database answers, so the run does not wait for this
        # (live) process to die; a lease that never landed releases nothing.
        # ``resend``: the run's message was consumed by the failed claim, so a run the lease
        # never held is marked for the dispatcher's next pass instead of its redispatch.
        self._orphans: list[tuple[str, str, bool]] = []

    def orphan(self, claim: Claim) -> None:
        self.orphan_lease(claim.workflow_id, claim.lease)

    def orphan_lease(self, workflow_id: str, lease: str, *, resend: bool = False) -> None:
        with self._lock:
            self._orphans.append((workflow_id, lease, resend))
        self._orphaned.set()

    def _release_orphans(self) -> None:
        with self._lock:
            pending, self._orphans = self._orphans, []
        for index, (workflow_id, lease, resend) in enumerate(pending):
            try:
                released = self.store.release_lease(workflow_id, lease, after=0.0,
                                                    lock_timeout=ORPHAN_LOCK_TIMEOUT)
                if not released and resend:
                    self.store.mark_unpublished([workflow_id], after=0.0)
            except Exception:
                with self._lock:
                    self._orphans.extend(pending[index:])
                raise

    def ensure(self) -> str:
        """Register (once) and start beating; returns the worker id."""
        if self._registered:
            return self.id
        with self._lock:
            if not self._registered:
                self._register()
                self._threads = [
                    threading.Thread(target=self._beat, name="durable-heartbeat", daemon=True),
                    threading.Thread(target=self._tend_orphans, name="durable-orphans",
                                     daemon=True)]
                for thread in self._threads:
                    thread.start()
                self._registered = True
        return self.id

    def _register(self) -> None:
        self.store.register_worker(self.id, hostname=socket.gethostname(), pid=self.pid,
                                   nodename=self.nodename)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self._line.beat(self.id) and not self._stop.is_set():
                    log.warning("worker row %s was reaped; registering again", self.id)
                    self._register()
            except Exception as exc:  # keep beating through database blips
                log.warning("heartbeat failed (%s); the next one tries again",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self._line.close()

    def _tend_orphans(self) -> None:
        while not self._stop.is_set():
            self._orphaned.wait(self.interval)
            if self._stop.is_set():
                return
            self._orphaned.clear()
            if not self._orphans:
                continue
            try:
                self._release_orphans()
            except Exception as exc:  # a locked run or the database away: next interval
                log.info("could not hand back an orphaned lease yet (%s)",
                         str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def close(self) -> int:
        """Stop beating, release held runs at once, remove the row. Returns runs released."""
        self._stop.set()
        self._orphaned.set()
        if not self._registered or self.pid != os.getpid():
            return 0
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=30)  # a beat in flight must not re-register after us
        self._registered = False
        try:
            return self.store.deregister_worker(self.id)
        except Exception:
            log.warning("could not deregister worker %s", self.id, exc_info=True)
            return 0


class ProcessIdentity:
    """This process's :class:`WorkerIdentity`, created on first use and again after a fork
    (a forked child gets its own row and heartbeat; threads share one)."""

    def __init__(self, store: Store, *, interval: float) -> None:
        self.store = store
        self.interval = interval
        self._lock = forksafe.Lock()
        self._ident: WorkerIdentity | None = None

    def get(self) -> WorkerIdentity:
        ident = self._ident
        if ident is not None and ident.pid == os.getpid():
            return ident
        with self._lock:  # threads pool: one identity per process
            ident = self._ident
            if ident is None or ident.pid != os.getpid():
                ident = self._ident = WorkerIdentity(
                    self.store, interval=self.interval,
                    nodename=os.environ.get("DURABLE_CELERY_NODENAME"))
            return ident

    def release(self) -> int:
        """Stop beating and release the runs this process holds; returns how many."""
        ident = self._ident
        if ident is None or ident.pid != os.getpid():
            return 0
        self._ident = None
        return ident.close()
