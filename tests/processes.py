"""What the e2e and chaos suites share: worker subprocesses that know their label and log
file, and per-process, per-thread psycopg connections (for the effect rows steps record)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import psycopg

from durable_celery.testing import WorkerProcess


def psycopg_url(database_url: str) -> str:
    """The SQLAlchemy ``postgresql+psycopg://`` URL as a libpq URL for plain psycopg."""
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql://" + database_url[len(prefix):]
    return database_url


class ThreadConnections:
    """One autocommit connection per process and thread, opened again after a fork or an
    error (a closed connection)."""

    def __init__(self, database_url: str, *, connect_timeout: int = 10) -> None:
        self.dsn = psycopg_url(database_url)
        self.connect_timeout = connect_timeout
        self._local = threading.local()

    def _conn(self) -> psycopg.Connection[Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or getattr(self._local, "pid", None) != os.getpid():
            conn = psycopg.connect(self.dsn, autocommit=True,
                                   connect_timeout=self.connect_timeout)
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn


class LabelledWorker(WorkerProcess):
    """A WorkerProcess that knows its label (``DURABLE_CELERY_NODENAME``) and log file."""

    def __init__(self, *args: Any, label: str, log: Path, **kwargs: Any) -> None:
        super().__init__(*args, log_path=str(log), **kwargs)
        self.label = label
        self.log = log
