"""The identity of a worker process: its ``workers`` row and the heartbeat thread."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from durable_celery.storage.records import Claim
from durable_celery.storage.store import Store

log = logging.getLogger("durable_celery.worker")


class WorkerIdentity:
    """Registered lazily in the process that executes steps; re-created after a fork.

    The heartbeat thread beats every ``interval`` seconds. If its row disappeared (the
    reaper judged the process dead, e.g. after a long SIGSTOP), it registers again: its
    old claims are gone and their late commits are refused by the lease guard.
    """

    def __init__(self, store: Store, *, interval: float, nodename: str | None = None) -> None:
        self.store = store
        self.interval = interval
        self.nodename = nodename
        self.pid = os.getpid()
        self.id = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._registered = False
        # Leases (workflow id, lease) this process may hold without knowing how far they
        # got: a claim whose commit could not reach the database, or a claim whose answer was
        # lost. The heartbeat thread releases them once the database answers, so the run does
        # not wait for this (live) process to die; a lease that never landed releases nothing.
        # ``resend``: the run's message was consumed by the failed claim, so a run the lease
        # never held is marked for the dispatcher's next pass instead of its redispatch.
        self._orphans: list[tuple[str, str, bool]] = []

    def orphan(self, claim: Claim) -> None:
        self.orphan_lease(claim.workflow_id, claim.lease)

    def orphan_lease(self, workflow_id: str, lease: str, *, resend: bool = False) -> None:
        with self._lock:
            self._orphans.append((workflow_id, lease, resend))

    def _release_orphans(self) -> None:
        with self._lock:
            pending, self._orphans = self._orphans, []
        for index, (workflow_id, lease, resend) in enumerate(pending):
            try:
                if not self.store.release_lease(workflow_id, lease, after=0.0) and resend:
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
                self._thread = threading.Thread(target=self._beat, name="durable-heartbeat",
                                                daemon=True)
                self._thread.start()
                self._registered = True
        return self.id

    def _register(self) -> None:
        self.store.register_worker(self.id, hostname=socket.gethostname(), pid=self.pid,
                                   nodename=self.nodename)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.store.heartbeat(self.id) and not self._stop.is_set():
                    log.warning("worker row %s was reaped; registering again", self.id)
                    self._register()
                if self._orphans:
                    self._release_orphans()
            except Exception:  # keep beating through database blips
                log.warning("heartbeat failed", exc_info=True)

    def close(self) -> int:
        """Stop beating, release held runs at once, remove the row. Returns runs released."""
        self._stop.set()
        if not self._registered or self.pid != os.getpid():
            return 0
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)  # a beat in flight must not re-register after us
        self._registered = False
        try:
            return self.store.deregister_worker(self.id)
        except Exception:
            log.warning("could not deregister worker %s", self.id, exc_info=True)
            return 0
