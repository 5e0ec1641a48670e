"""LISTEN for wake-ups: a committed timer nearer than the dispatcher's planned sleep."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import psycopg

from durable_celery import errors
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
