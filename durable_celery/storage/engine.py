"""Engine factory: one SQLAlchemy engine per process, created after fork, never shared."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from durable_celery import errors


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for plain ``postgresql://`` / ``postgres://`` URLs."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if not url.startswith("postgresql+psycopg://"):
        raise errors.ConfigurationError(
            f"database_url must be a PostgreSQL URL (postgresql+psycopg://...), got "
            f"{url.split('://', 1)[0]}://..."
        )
    return url


class EngineHolder:
    """Creates the engine lazily in the process that uses it; re-creates it after a fork."""

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        self.url = normalize_url(url)
        self.pool_size = pool_size
        self._engine: sa.Engine | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def engine(self) -> sa.Engine:
        pid = os.getpid()
        engine = self._engine
        if engine is not None and self._pid == pid:
            return engine
        with self._lock:
            if self._engine is not None and self._pid != pid:
                # Inherited from the parent: drop its connections without closing them
                # (they belong to the parent's sockets).
                self._engine.dispose(close=False)
                self._engine = None
            if self._engine is None:
                self._engine = sa.create_engine(
                    self.url,
                    pool_size=self.pool_size,
                    max_overflow=self.pool_size * 4,
                    pool_pre_ping=True,
                    pool_recycle=1800,
                    connect_args={"connect_timeout": 10, "application_name": "durable_celery"},
                )
                self._pid = pid
            return self._engine

    def dispose(self) -> None:
        with self._lock:
            if self._engine is not None and self._pid == os.getpid():
                self._engine.dispose()
            self._engine = None

    @contextlib.contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A transaction; driver errors surface as ``StorageError`` with the cause kept."""
        with translate_errors(), self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        with translate_errors(), self.engine.connect() as conn:
            yield conn


PERMANENT_CLASSES = frozenset({"22", "23", "42"})


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    try:
        yield
    except sa_exc.DBAPIError as exc:
        # Only data and integrity errors (SQLSTATE classes 22, 23) and statement errors
        # (42: a schema that is missing or not migrated) can never succeed when tried again;
        # everything else (lost connections, shutdowns, failovers, timeouts) may.
        sqlstate = str(getattr(exc.orig, "sqlstate", "") or "")
        transient = bool(exc.connection_invalidated) or sqlstate[:2] not in PERMANENT_CLASSES
        raise errors.StorageError(f"database error: {_first_line(exc)}",
                                  transient=transient, sqlstate=sqlstate or None) from exc
    except sa_exc.SQLAlchemyError as exc:  # e.g. the pool timed out waiting for a connection
        raise errors.StorageError(f"database error: {exc}", transient=True) from exc


def _first_line(exc: Any) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
