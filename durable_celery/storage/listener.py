"""LISTEN for wake-ups: a committed timer nearer than the dispatcher's planned sleep."""

from __future__ import annotations

import contextlib
import logging
import time

import psycopg
from sqlalchemy.engine import make_url

from durable_celery.storage.sql import WAKEUP_CHANNEL

log = logging.getLogger("durable_celery.coordinator")


class Listener:
    """A dedicated autocommit connection; reconnects by itself after errors."""

    def __init__(self, sqlalchemy_url: str) -> None:
        url = make_url(sqlalchemy_url).set(drivername="postgresql")
        self.dsn = url.render_as_string(hide_password=False)
        self._conn: psycopg.Connection | None = None

    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
            self._conn.execute(f"LISTEN {WAKEUP_CHANNEL}")
        return self._conn

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True if woken by a notification."""
        try:
            conn = self._connect()
            woke = False
            for _ in conn.notifies(timeout=max(timeout, 0.0), stop_after=1):
                woke = True
            return woke
        except psycopg.Error:
            log.warning("wake-up listener lost its connection; will reconnect", exc_info=True)
            self.close()
            # Sleep as asked (at least a little): never spin while the database is away.
            time.sleep(min(max(timeout, 0.2), 5.0))
            return False

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
