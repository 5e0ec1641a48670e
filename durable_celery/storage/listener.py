"""LISTEN for wake-ups: a committed timer nearer than the dispatcher's planned sleep."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from durable_celery import errors, forksafe
from durable_celery.storage.engine import EngineHolder
from durable_celery.storage.sql import WAKEUP_CHANNEL

log = logging.getLogger("durable_celery.coordinator")


class Listener:
    """A dedicated autocommit connection; reconnects by itself after errors."""

    def __init__(self, holder: EngineHolder, channel: str = WAKEUP_CHANNEL) -> None:
        self.holder = holder
        self.channel = channel
        self._conn: psycopg.Connection[Any] | None = None
        self._lost = False  # logged once per outage

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self.holder.dedicated()
            self._conn.execute(f"LISTEN {self.channel}")
            if self._lost:
                log.info("wake-up listener reconnected")
                self._lost = False
        return self._conn

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True if woken by a notification."""
        try:
            conn = self._connect()
            woke = False
            for _ in conn.notifies(timeout=max(timeout, 0.0), stop_after=1):
                woke = True
            return woke
        except (psycopg.Error, errors.StorageError) as exc:
            if not self._lost:
                log.warning("wake-up listener lost its connection (%s); it reconnects by "
                            "itself", str(exc).strip().splitlines()[0] if str(exc) else exc)
                self._lost = True
            self.close()
            # Sleep as asked (at least a little): never spin while the database is away.
            time.sleep(min(max(timeout, 0.2), 5.0))
            return False

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None


DONE_CHANNEL = "durable_celery_done"  # a run ended: its id (the runs_notify_done trigger)
LISTEN_WAIT = 2.0  # seconds a waiter gives the listener to start before it polls instead


class Endings:
    """Who waits for which run to end, in this process: one LISTEN connection, one thread,
    started by the first wait and re-created in a forked child.

    ``watch(run_id)`` hands out an Event that is set when that run's ending is notified --
    or when the listener lost its connection (notifications may have been missed, so every
    waiter checks again). Waiters register *before* they read the run's status, so an end
    committed in between is never missed.
    """

    def __init__(self, holder: EngineHolder) -> None:
        self.holder = holder
        self._lock = forksafe.Lock()
        self._pid = 0
        self._waiting: dict[str, set[threading.Event]] = {}
        self._listening = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, run_id: str) -> Iterator[threading.Event | None]:
        """An Event set when ``run_id`` ends (check its status then); None when no listener
        is up (poll instead)."""
        self._start()
        event = threading.Event()
        with self._lock:
            self._waiting.setdefault(run_id, set()).add(event)
        try:
            yield event if self._listening.wait(LISTEN_WAIT) else None
        finally:
            with self._lock:
                waiting = self._waiting.get(run_id)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._waiting[run_id]

    def _start(self) -> None:
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._pid == os.getpid() and self._thread is not None \
                    and self._thread.is_alive():
                return
            # A forked child (or the first wait): fresh state, a thread of its own.
            self._pid, self._waiting = os.getpid(), {}
            self._listening, self._stop = threading.Event(), threading.Event()
            self._thread = threading.Thread(target=self._run, name="durable-endings",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        stop, listening = self._stop, self._listening
        while not stop.is_set():
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = self.holder.dedicated()
                conn.execute(f"LISTEN {DONE_CHANNEL}")
                listening.set()
                self._wake_all()  # anything that ended while we were not listening
                while not stop.is_set():
                    for note in conn.notifies(timeout=1.0):
                        self._wake(note.payload)
            except (psycopg.Error, errors.StorageError):
                listening.clear()
                self._wake_all()
                stop.wait(1.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()

    def _wake(self, run_id: str) -> None:
        with self._lock:
            events = list(self._waiting.get(run_id, ()))
        for event in events:
            event.set()

    def _wake_all(self) -> None:
        with self._lock:
            events = [e for waiting in self._waiting.values() for e in waiting]
        for event in events:
            event.set()

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread is not threading.current_thread():
            thread.join(3)
