"""Versioned SQL migrations, applied in order under an advisory lock.

Files are ``NNNN_name.sql``: in the installed package under ``durable_celery/migrations``,
or in a source checkout under ``migrations/`` at the repository root. Each applies inside
the same transaction that records it, so a failed migration leaves nothing behind, and
concurrent ``migrate()`` calls serialize on the lock (the second finds nothing to do).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from durable_celery import errors
from durable_celery.storage.engine import EngineHolder

SCHEMA = "durable_celery"
# Any constant shared by all processes works; this one spells "durcel" in ASCII.
LOCK_ID = 0x647572636565


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations_dir() -> Path:
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if candidate.is_dir() and any(candidate.glob("*.sql")):
            return candidate
    raise errors.ConfigurationError("durable_celery migrations folder not found")


def load() -> list[Migration]:
    found = []
    for path in sorted(migrations_dir().glob("*.sql")):
        match = re.match(r"^(\d{4})_(\w+)\.sql$", path.name)
        if not match:
            raise errors.ConfigurationError(f"bad migration file name {path.name}")
        found.append(Migration(version=int(match[1]), name=match[2], sql=path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise errors.ConfigurationError(f"migrations must be numbered 1..N, found {versions}")
    return found


def latest_version() -> int:
    return len(load())


def applied_versions(conn: sa.Connection) -> list[int]:
    exists = conn.execute(sa.text("SELECT to_regclass(:t)"),
                          {"t": f"{SCHEMA}.schema_version"}).scalar()
    if exists is None:
        return []
    rows = conn.execute(sa.text(f"SELECT version FROM {SCHEMA}.schema_version ORDER BY version"))
    return [int(r[0]) for r in rows]


def check(holder: EngineHolder) -> int:
    """Without auto_migrate: the schema must be exactly the code's; returns its version."""
    expected = latest_version()
    with holder.connect() as conn:
        done = applied_versions(conn)
    current = max(done, default=0)
    if done == list(range(1, expected + 1)):
        return current
    if current > expected:
        raise errors.ConfigurationError(
            f"the database schema is at version {current}, newer than this code "
            f"({expected}); upgrade durable_celery")
    raise errors.ConfigurationError(
        f"the database schema is at version {current}, this code expects {expected} "
        "(auto_migrate is off): run `durable-celery migrate -A your_module` (or with "
        "--database-url)", current=current, expected=expected)


def migrate(holder: EngineHolder) -> list[int]:
    """Apply missing migrations; return the versions applied now (empty if up to date)."""
    todo = load()
    with holder.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_ID})
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        conn.execute(sa.text(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        done = set(applied_versions(conn))
        newer = [v for v in done if v > len(todo)]
        if newer:
            raise errors.ConfigurationError(
                f"the database schema is at version {max(done)}, newer than this code "
                f"({len(todo)}); upgrade durable_celery"
            )
        applied = []
        for migration in todo:
            if migration.version in done:
                continue
            conn.exec_driver_sql(migration.sql)
            conn.execute(
                sa.text(f"INSERT INTO {SCHEMA}.schema_version (version, name) VALUES (:v, :n)"),
                {"v": migration.version, "n": migration.name},
            )
            applied.append(migration.version)
        return applied
