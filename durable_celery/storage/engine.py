"""Engine factory: one SQLAlchemy engine per process, created after fork, never shared."""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Iterator
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg

from durable_celery import errors, forksafe


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
    """Creates the engine lazily in the process that uses it; re-creates it after a fork.

    ``liveness`` (the ``stale_after`` setting, seconds) bounds how long a session of ours may
    sit idle inside a transaction and how long a dead peer goes unnoticed (TCP keepalives,
    ``tcp_user_timeout``), unless the URL sets those itself.
    """

    def __init__(self, url: str, *, pool_size: int = 4, liveness: float | None = None) -> None:
        self.url = normalize_url(url)
        self.pool_size = pool_size
        # The server ends a session of ours that sits idle inside a transaction this long (a
        # process frozen mid-commit by SIGSTOP, a debugger, swapping): its row locks would
        # otherwise keep the reaper (SKIP LOCKED) and signals away from the run for ever.
        # durable_celery never waits on anything but the database inside a transaction.
        self.liveness = liveness
        self._engine: sa.Engine | None = None
        self._pid = 0
        self._lock = forksafe.Lock()

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
                # No pool_pre_ping (a ``SELECT 1`` round trip per transaction): a pooled
                # connection the server closed (restart, pg_terminate_backend, idle timeout)
                # has the server's goodbye waiting in its socket, which a zero-timeout poll
                # at checkout sees for free; one that dies in use fails that transaction
                # with a transient StorageError, and SQLAlchemy then recycles the pool.
                # psycopg prepares a statement server-side after ``prepare_threshold`` uses.
                self._engine = sa.create_engine(
                    self.url,
                    pool_size=self.pool_size,
                    max_overflow=self.pool_size * 4,
                    pool_recycle=1800,
                    connect_args={"connect_timeout": 10, "application_name": "durable_celery",
                                  "prepare_threshold": PREPARE_THRESHOLD,
                                  **self.connect_args()},
                )
                event.listen(self._engine, "checkout", _check_alive)
                self._pid = pid
            return self._engine

    def connect_args(self, *, settings: dict[str, str] | None = None,
                     liveness: float | None = None) -> dict[str, Any]:
        """libpq parameters of our connections, merged with the URL's: server settings
        (``options=-c name=value``) appended to the URL's own ``options`` (a setting the URL
        names wins), and keepalives for a dead peer, unless the URL sets them.
        ``liveness`` overrides the holder's (a connection that must notice sooner)."""
        query = sa.engine.make_url(self.url).query
        given = query.get("options") or ""
        given = given if isinstance(given, str) else " ".join(given)
        ours = dict(settings or {})
        if self.liveness:
            ours.setdefault("idle_in_transaction_session_timeout",
                            f"{max(int(self.liveness * 1000), 1)}")
        extra = [f"-c {name}={value}" for name, value in ours.items()
                 if f"{name}=" not in given]
        args: dict[str, Any] = {}
        if extra:
            args["options"] = " ".join(part for part in (given, *extra) if part)
        bound = liveness or self.liveness
        if bound:
            idle = max(int(bound / 3), 1)
            keepalive = {"keepalives": 1, "keepalives_idle": idle,
                         "keepalives_interval": max(idle // 2, 1), "keepalives_count": 3,
                         "tcp_user_timeout": max(int(bound * 1000), 1000)}
            args.update({k: v for k, v in keepalive.items() if k not in query})
        return args

    def dedicated(self, *, statement_timeout: float | None = None,
                  connect_timeout: float = 10) -> psycopg.Connection[Any]:
        """A psycopg connection of its own (autocommit, outside the pool): the heartbeat's
        and the wake-up listener's. ``statement_timeout`` (seconds) bounds every statement,
        and then TCP notices a dead peer within about as long too."""
        settings = {} if statement_timeout is None else {
            "statement_timeout": f"{max(int(statement_timeout * 1000), 1)}"}
        conninfo = sa.engine.make_url(self.url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        with translate_errors():
            return psycopg.connect(conninfo, autocommit=True,
                                   connect_timeout=max(int(connect_timeout), 1),
                                   application_name="durable_celery",
                                   **self.connect_args(settings=settings,
                                                       liveness=statement_timeout))

    def dispose(self) -> None:
        with self._lock:
            if self._engine is not None and self._pid == os.getpid():
                self._engine.dispose()
            self._engine = None

    @contextlib.contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A transaction; driver errors surface as ``StorageError`` with the cause kept."""
        with self._fresh_after_schema_change(), translate_errors(), \
                self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _fresh_after_schema_change(self) -> Iterator[None]:
        """A statement prepared before a schema change can fail with "cached plan must not
        change result type" (0A000) on every pooled connection that prepared it: drop the
        pool, so that the retry (the error is transient) prepares afresh."""
        try:
            yield
        except errors.StorageError as exc:
            if exc.details.get("sqlstate") == FEATURE_NOT_SUPPORTED:
                with self._lock:
                    if self._engine is not None and self._pid == os.getpid():
                        self._engine.dispose()
            raise

    @contextlib.contextmanager
    def raw(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled psycopg connection in autocommit, for the per-step hot statements.

        It skips SQLAlchemy's per-statement work (about a third of the client's time per
        step); statements come from :func:`driver_sql`. Errors surface as ``StorageError``
        like :meth:`begin`'s; a broken connection is dropped from the pool.
        """
        with translate_errors():
            fairy = self.engine.raw_connection()
        conn: psycopg.Connection[Any] = fairy.driver_connection  # type: ignore[assignment]
        healthy = True
        try:
            conn.autocommit = True
            yield conn
        except psycopg.Error as exc:
            healthy = not (conn.closed or conn.broken) and exc.sqlstate != FEATURE_NOT_SUPPORTED
            if not healthy:
                fairy.invalidate(exc)
            raise _storage_error(exc, exc, invalidated=not healthy) from exc
        finally:
            if healthy:
                try:
                    conn.autocommit = False  # the pool's other users expect transactions
                except psycopg.Error as exc:
                    fairy.invalidate(exc)
            fairy.close()

    @contextlib.contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        """A connection in autocommit: each statement is its own transaction.

        For reads and single-statement writes: one round trip each, where a transaction
        costs three (BEGIN, the statement, COMMIT). A statement is atomic on its own.
        """
        with self._fresh_after_schema_change(), translate_errors(), \
                self.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn


PREPARE_THRESHOLD = 2
FEATURE_NOT_SUPPORTED = "0A000"  # e.g. "cached plan must not change result type"


def _check_alive(dbapi_conn: Any, record: Any, proxy: Any) -> None:
    """Refuse a pooled connection that is closed, broken, or has unread bytes while idle.

    An idle connection receives nothing unless the server is saying goodbye (FATAL
    "terminating connection", then EOF). Raising ``DisconnectionError`` makes the pool
    discard it and hand out a fresh one, without a round trip on the healthy path.
    """
    if getattr(dbapi_conn, "closed", False) or getattr(dbapi_conn, "broken", False):
        raise sa_exc.DisconnectionError("connection closed")
    try:
        readable = _readable(dbapi_conn.fileno())
    except (OSError, ValueError, AttributeError) as exc:
        raise sa_exc.DisconnectionError(f"connection unusable: {exc}") from exc
    if readable:
        raise sa_exc.DisconnectionError("the server closed the connection")


def _readable(fileno: int) -> bool:
    """Bytes (or EOF) are waiting on ``fileno``; poll() has no FD_SETSIZE limit."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fileno, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fileno], [], [], 0)
    return bool(readable)


PERMANENT_CLASSES = frozenset({"22", "23", "42"})


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:  # a dedicated connection (no SQLAlchemy around it)
        raise _storage_error(exc, exc, invalidated=exc.sqlstate is None) from exc
    except sa_exc.DBAPIError as exc:
        raise _storage_error(exc, exc.orig, invalidated=bool(exc.connection_invalidated)) \
            from exc
    except sa_exc.SQLAlchemyError as exc:  # e.g. the pool timed out waiting for a connection
        raise errors.StorageError(f"database error: {exc}", transient=True) from exc


def _storage_error(exc: BaseException, orig: Any, *, invalidated: bool) -> errors.StorageError:
    # Only data and integrity errors (SQLSTATE classes 22, 23) and statement errors
    # (42: a schema that is missing or not migrated) can never succeed when tried again;
    # everything else (lost connections, shutdowns, failovers, timeouts) may.
    sqlstate = str(getattr(orig, "sqlstate", "") or "")
    transient = invalidated or sqlstate[:2] not in PERMANENT_CLASSES
    return errors.StorageError(f"database error: {_first_line(exc)}", transient=transient,
                               sqlstate=sqlstate or None)


_DIALECT = postgresql_psycopg.dialect()  # type: ignore[no-untyped-call]


def driver_sql(statement: sa.TextClause) -> str:
    """``statement`` with psycopg's ``%(name)s`` placeholders, for :meth:`EngineHolder.raw`."""
    return str(statement.compile(dialect=_DIALECT))


def _first_line(exc: Any) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
