"""health() and bootstrap() against a healthy, an empty and an unreachable database; and
the validation every control request does before touching anything."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from durable_celery import Durable, Next
from durable_celery.errors import BootstrapError, ControlError, InvalidRequest, StorageError
from durable_celery.storage import migrate
from durable_celery.storage.engine import normalize_url
from tests import services
from tests.integration.support import execute_sql, run_row, scalar

CHECKS = ["database_connection", "schema_version", "required_tables", "idempotency_table"]
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"


def standalone(url: str, **settings: Any) -> Durable:
    app = Celery(f"pre-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    return Durable(app, database_url=url, **settings)


@pytest.fixture
def unreachable() -> Iterator[Durable]:
    d = standalone(UNREACHABLE)
    yield d
    d.close()
    d.app.close()


@pytest.fixture
def empty_database(admin_url: str) -> Iterator[Durable]:
    name = f"dct_empty_{uuid.uuid4().hex[:10]}"
    url = services.create_database(admin_url, name)
    d = standalone(url, auto_migrate=False)
    yield d
    d.close()
    d.app.close()
    services.drop_database(admin_url, name)


def sql_engine(durable: Durable) -> sa.Engine:
    """A separate engine on the Durable's database, to tamper with its schema."""
    return sa.create_engine(normalize_url(durable.settings.database_url),
                            poolclass=sa.pool.NullPool)


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


# ---------------------------------------------------------------------------- health


def test_health_ok(durable):
    assert durable.health() == {"status": "ok"}


def test_health_on_an_unreachable_database_raises_storage_error(unreachable):
    with pytest.raises(StorageError):
        unreachable.health()


# ---------------------------------------------------------------------------- bootstrap


def test_bootstrap_on_a_healthy_database(durable):
    report = durable.bootstrap()
    assert report["ok"] is True and report["status"] == "ok"
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert all(c["ok"] is True and c["status"] == "ok" for c in report["checks"])
    version = by_name(report)["schema_version"]["details"]
    assert version["expected"] == version["current"] == migrate.latest_version() >= 2
    assert by_name(report)["required_tables"]["details"]["missing"] == []
    assert durable.bootstrap(strict=True) == report


def test_bootstrap_without_the_idempotency_check(durable):
    report = durable.bootstrap(check_idempotency_table=False)
    assert [c["name"] for c in report["checks"]] == CHECKS[:3]
    assert report["ok"] is True


def test_bootstrap_reports_missing_required_tables(durable):
    report = durable.bootstrap(required_tables=["runs", "public.no_such_table",
                                                "durable_celery.steps", "nope"])
    assert report["ok"] is False and report["status"] == "failed"
    tables = by_name(report)["required_tables"]
    assert tables["ok"] is False and tables["status"] == "failed"
    assert tables["details"]["missing"] == ["public.no_such_table", "nope"]
    assert "public.no_such_table" in tables["message"]
    assert [c["ok"] for c in report["checks"]] == [True, True, False, True]

    with pytest.raises(BootstrapError) as info:
        durable.bootstrap(required_tables=["public.no_such_table"], strict=True)
    assert info.value.check == "required_tables"
    assert info.value.details["details"]["missing"] == ["public.no_such_table"]
    assert "required_tables" in info.value.message
    assert info.value.body["error"] == "BootstrapError"
    assert info.value.body["check"] == "required_tables"


@pytest.mark.parametrize("bad", ["runs", [""], ["  "], [1], [None], 5])
def test_bootstrap_refuses_bad_required_tables(durable, bad):
    with pytest.raises(InvalidRequest):
        durable.bootstrap(required_tables=bad)


def test_bootstrap_on_an_unreachable_database(unreachable):
    report = unreachable.bootstrap()
    assert [c["name"] for c in report["checks"]] == CHECKS
    first, *rest = report["checks"]
    assert (first["ok"], first["status"]) == (False, "failed")
    assert "connect" in first["message"]
    assert all(c["ok"] is None and c["status"] == "skipped" for c in rest)
    assert report["ok"] is False

    with pytest.raises(BootstrapError) as info:
        unreachable.bootstrap(strict=True)
    assert info.value.check == "database_connection"
    assert info.value.status == 503
    assert info.value.body["check"] == "database_connection"


def test_bootstrap_on_a_database_without_schema(empty_database, db_engine):
    report = empty_database.bootstrap()
    checks = by_name(report)
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert checks["database_connection"]["ok"] is True
    assert checks["schema_version"]["ok"] is False
    assert checks["schema_version"]["details"]["current"] == 0
    assert checks["schema_version"]["details"]["expected"] == migrate.latest_version()
    assert "migrate" in checks["schema_version"]["message"]
    assert checks["required_tables"]["ok"] is False
    assert checks["required_tables"]["details"]["missing"] == \
        ["schema_version", "runs", "steps", "signals", "workers"]
    assert checks["idempotency_table"]["ok"] is False
    with pytest.raises(BootstrapError) as info:
        empty_database.bootstrap(strict=True)
    assert info.value.check == "schema_version"
    # Bootstrap only checks: it created nothing.
    assert empty_database.bootstrap()["checks"] == report["checks"]

    assert empty_database.migrate() == list(range(1, migrate.latest_version() + 1))
    assert empty_database.bootstrap(strict=True)["ok"] is True


def test_bootstrap_on_an_older_schema(empty_database):
    empty_database.migrate()
    engine = sql_engine(empty_database)
    try:
        execute_sql(engine, "DROP TABLE {S}.control_requests")
        execute_sql(engine, "DELETE FROM {S}.schema_version WHERE version >= 2")
    finally:
        engine.dispose()
    report = empty_database.bootstrap()
    checks = by_name(report)
    assert checks["schema_version"]["ok"] is False
    assert checks["schema_version"]["details"]["current"] == 1
    assert checks["required_tables"]["ok"] is True
    assert checks["idempotency_table"]["ok"] is False
    assert "control_requests" in checks["idempotency_table"]["message"]
    with pytest.raises(BootstrapError) as info:
        empty_database.bootstrap(strict=True)
    assert info.value.check == "schema_version"


# ---------------------------------------------------------------------------- validation


def declare(durable: Any) -> Any:
    wf = durable.workflow("v", run_ahead=False)

    @wf.step
    def a(ctx):
        return Next("b")

    @wf.step
    def b(ctx):
        return None

    return wf


def requests(durable: Any, wid: str) -> list[Any]:
    return [
        lambda **kw: durable.cancel_workflow(wid, **kw),
        lambda **kw: durable.resume_workflow(wid, **kw),
        lambda **kw: durable.fork_workflow(wid, **kw),
    ]


def assert_refused(call: Any, field: str, **kwargs: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        call(**kwargs)
    assert isinstance(info.value, ControlError)
    assert info.value.status == 400
    assert info.value.body["error"] == "InvalidRequest"
    assert info.value.body["field"] == field
    assert info.value.body["message"]


@pytest.mark.parametrize("key", [None, 5, "", "   ", "\t\n", "k" * 201, b"key", ["k"],
                                 "a\x00b", "lone \udc00"])
def test_bad_request_keys_are_400(durable, db_engine, key):
    wid = declare(durable).start({})
    before = run_row(db_engine, wid)
    for call in requests(durable, wid):
        assert_refused(call, "request_key", request_key=key)
    assert run_row(db_engine, wid) == before
    assert scalar(db_engine, "SELECT count(*) FROM {S}.control_requests") == 0


def test_a_key_of_200_characters_after_trimming_is_accepted(durable, db_engine):
    wid = declare(durable).start({})
    key = "k" * 200
    assert durable.cancel_workflow(wid, f"  {key}  ")["idempotency_key"] == key


@pytest.mark.parametrize("wid", [None, "", "  ", "w" * 201, 3, "a\x00b", "lone \ud800"])
def test_bad_workflow_ids_are_400(durable, db_engine, wid):
    for call in (durable.cancel_workflow, durable.resume_workflow, durable.fork_workflow):
        with pytest.raises(InvalidRequest) as info:
            call(wid, "k")
        assert info.value.status == 400 and info.value.body["field"] == "workflow_id"
    assert scalar(db_engine, "SELECT count(*) FROM {S}.control_requests") == 0


@pytest.mark.parametrize("ttl", [0, -1, 3650.001, 10**6, "7", None, True, math.nan, math.inf])
def test_bad_ttl_days_are_400(durable, db_engine, ttl):
    wid = declare(durable).start({})
    for call in requests(durable, wid):
        assert_refused(call, "ttl_days", request_key="k", ttl_days=ttl)
    assert run_row(db_engine, wid)["status"] == "runnable"
    assert scalar(db_engine, "SELECT count(*) FROM {S}.control_requests") == 0


@pytest.mark.parametrize("ttl", [3650, 0.01, 1])
def test_ttl_days_bounds_accepted(durable, db_engine, ttl):
    wid = declare(durable).start({})
    durable.cancel_workflow(wid, "k", ttl_days=ttl)
    seconds = scalar(db_engine, "SELECT EXTRACT(EPOCH FROM expires_at - created_at) "
                                "FROM {S}.control_requests WHERE request_key = 'k'")
    assert float(seconds) == pytest.approx(ttl * 86400, abs=5)


@pytest.mark.parametrize("interval", [-1, -0.5, "300", None, True, math.nan, math.inf])
def test_bad_cleanup_intervals_are_400(durable, db_engine, interval):
    wid = declare(durable).start({})
    for call in requests(durable, wid):
        assert_refused(call, "cleanup_interval_seconds", request_key="k",
                       cleanup_interval_seconds=interval)
    assert scalar(db_engine, "SELECT count(*) FROM {S}.control_requests") == 0


@pytest.mark.parametrize("reason", [5, b"x", ["r"], {"r": 1}, "r" * 2001, "a\x00b", "lone \ud800"])
def test_bad_reasons_are_400(durable, db_engine, reason):
    wid = declare(durable).start({})
    assert_refused(lambda **kw: durable.cancel_workflow(wid, **kw), "reason",
                   request_key="k", reason=reason)
    assert run_row(db_engine, wid)["status"] == "runnable"
    assert scalar(db_engine, "SELECT count(*) FROM {S}.control_requests") == 0


@pytest.mark.parametrize("interval", [0, 0.5, 86400 * 365, 10**9])
def test_cleanup_intervals_of_any_number_from_zero_are_accepted(durable, interval):
    wid = declare(durable).start({})
    assert durable.cancel_workflow(wid, f"k-{interval}",
                                   cleanup_interval_seconds=interval)["ok"] is True


def test_a_reason_of_2000_characters_is_kept(durable, db_engine):
    wid = declare(durable).start({})
    durable.cancel_workflow(wid, "k", reason="r" * 2000)
    assert run_row(db_engine, wid)["error"]["reason"] == "r" * 2000


def test_bootstrap_on_a_schema_newer_than_the_code(empty_database):
    empty_database.migrate()
    engine = sql_engine(empty_database)
    future = migrate.latest_version() + 1
    try:
        execute_sql(engine, "INSERT INTO {S}.schema_version (version, name) "
                            "VALUES (:v, 'future')", v=future)
    finally:
        engine.dispose()
    check = by_name(empty_database.bootstrap())["schema_version"]
    assert check["ok"] is False and check["details"]["current"] == future
    assert "older" in check["message"]
