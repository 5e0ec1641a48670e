"""migrate(): files, ordering, idempotence, concurrency, and a schema newer than the code."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from durable_celery.errors import ConfigurationError, StorageError
from durable_celery.storage import migrate
from durable_celery.storage.engine import EngineHolder

S = migrate.SCHEMA
REPO = Path(__file__).resolve().parents[2]

HolderFactory = Callable[[str], EngineHolder]


def all_versions() -> list[int]:
    return [m.version for m in migrate.load()]


def recorded(holder: EngineHolder) -> list[tuple[int, str]]:
    with holder.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT version, name FROM {S}.schema_version "
                                    "ORDER BY version")).all()
    return [(int(v), str(n)) for v, n in rows]


def schema_exists(holder: EngineHolder) -> bool:
    with holder.connect() as conn:
        return bool(conn.execute(sa.text(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = :s"),
            {"s": S}).scalar())


# ----------------------------------------------------------------------------- files


def test_migrations_dir_finds_the_sql_files() -> None:
    folder = migrate.migrations_dir()
    assert folder.is_dir()
    assert (folder / "0001_initial.sql").is_file()
    # A source checkout uses the repository's folder (the wheel ships a copy in the package).
    assert folder.resolve() in {(REPO / "migrations").resolve(),
                                (REPO / "durable_celery" / "migrations").resolve()}


def test_load_returns_every_file_in_order() -> None:
    files = sorted(migrate.migrations_dir().glob("*.sql"))
    loaded = migrate.load()
    assert len(loaded) == len(files) >= 1
    assert [m.version for m in loaded] == list(range(1, len(files) + 1))
    for migration, path in zip(loaded, files, strict=True):
        assert path.name == f"{migration.version:04d}_{migration.name}.sql"
        assert migration.sql == path.read_text()
        assert migration.sql.strip()
    assert loaded[0].name == "initial"
    assert migrate.latest_version() == len(files)


def test_load_sorts_by_file_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("0003_c.sql", "0001_a.sql", "0002_b.sql"):
        (tmp_path / name).write_text(f"-- {name}")
    monkeypatch.setattr(migrate, "migrations_dir", lambda: tmp_path)
    assert [(m.version, m.name) for m in migrate.load()] == [(1, "a"), (2, "b"), (3, "c")]


@pytest.mark.parametrize("names, problem", [
    (["0001_a.sql", "0003_c.sql"], r"migrations must be numbered 1..N, found \[1, 3\]"),
    (["0002_b.sql"], r"migrations must be numbered 1..N, found \[2\]"),
    (["0001_a.sql", "1_b.sql"], "bad migration file name 1_b.sql"),
    (["0001_a.sql", "0002_has space.sql"], "bad migration file name 0002_has space.sql"),
])
def test_load_rejects_bad_sets_of_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        names: list[str], problem: str) -> None:
    for name in names:
        (tmp_path / name).write_text("SELECT 1;")
    monkeypatch.setattr(migrate, "migrations_dir", lambda: tmp_path)
    with pytest.raises(ConfigurationError, match=problem):
        migrate.load()


# ----------------------------------------------------------------------------- applying


def test_applying_twice_is_a_no_op(empty_database_url: str, holders: HolderFactory) -> None:
    holder = holders(empty_database_url)
    assert migrate.migrate(holder) == all_versions()
    assert migrate.migrate(holder) == []
    assert migrate.migrate(holders(empty_database_url)) == []  # another process, same answer
    assert recorded(holder) == [(m.version, m.name) for m in migrate.load()]
    assert [v for v, _ in recorded(holder)] == list(range(1, migrate.latest_version() + 1))


def test_applied_versions_of_an_empty_database(empty_database_url: str,
                                               holders: HolderFactory) -> None:
    holder = holders(empty_database_url)
    with holder.connect() as conn:
        assert migrate.applied_versions(conn) == []
    migrate.migrate(holder)
    with holder.connect() as conn:
        assert migrate.applied_versions(conn) == all_versions()


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_application_is_safe(new_database: Callable[[], str], holders: HolderFactory,
                                        attempt: int) -> None:
    url = new_database()
    threads_n = 4
    barrier = threading.Barrier(threads_n)
    results: dict[int, list[int]] = {}
    failures: dict[int, BaseException] = {}
    own = [holders(url) for _ in range(threads_n)]  # each thread its own engine
    for holder in own:  # connect up front so that the threads really start together
        with holder.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = migrate.migrate(own[i])
        except BaseException as exc:
            failures[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "migrate() hung"
    assert failures == {}
    applied = sorted(results.values(), key=len, reverse=True)
    assert applied == [all_versions()] + [[]] * (threads_n - 1)
    assert [v for v, _ in recorded(own[0])] == all_versions()


def test_a_schema_newer_than_the_code_is_refused(empty_database_url: str,
                                                 holders: HolderFactory) -> None:
    holder = holders(empty_database_url)
    migrate.migrate(holder)
    future = migrate.latest_version() + 1
    with holder.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {S}.schema_version (version, name) "
                             "VALUES (:v, 'from_the_future')"), {"v": future})
    with pytest.raises(ConfigurationError, match=f"the database schema is at version {future}, "
                                                 "newer than this code"):
        migrate.migrate(holder)
    assert [v for v, _ in recorded(holder)] == [*all_versions(), future]  # nothing touched


def test_only_a_newer_version_is_refused_even_without_the_others(
        empty_database_url: str, holders: HolderFactory) -> None:
    # A database whose only record is a version this code does not know.
    holder = holders(empty_database_url)
    future = migrate.latest_version() + 5
    with holder.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {S}"))
        conn.execute(sa.text(f"CREATE TABLE {S}.schema_version (version integer PRIMARY KEY, "
                             "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"))
        conn.execute(sa.text(f"INSERT INTO {S}.schema_version VALUES (:v, 'x')"), {"v": future})
    with pytest.raises(ConfigurationError, match="upgrade durable_celery"):
        migrate.migrate(holder)
    assert recorded(holder) == [(future, "x")]


def test_a_failing_migration_leaves_nothing_behind(empty_database_url: str,
                                                   holders: HolderFactory,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = migrate.load()
    broken = migrate.Migration(version=len(real) + 1, name="broken",
                               sql=f"CREATE TABLE {S}.half_done (x int); SELECT 1 / 0;")
    monkeypatch.setattr(migrate, "load", lambda: [*real, broken])
    holder = holders(empty_database_url)
    with pytest.raises(StorageError, match="division by zero") as info:
        migrate.migrate(holder)
    assert info.value.__cause__ is not None  # the driver error is kept
    assert not schema_exists(holder)  # one transaction: even the good migrations rolled back
    monkeypatch.setattr(migrate, "load", lambda: real)
    assert migrate.migrate(holder) == all_versions()
