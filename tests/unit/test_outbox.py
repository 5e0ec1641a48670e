"""The caller's connection must point at durable_celery's database (loopback spellings equal)."""

from __future__ import annotations

from sqlalchemy.engine import make_url

from durable_celery.storage.outbox import _where


def test_loopback_spellings_are_one_place() -> None:
    a = make_url("postgresql+psycopg://u@localhost/shop")
    b = make_url("postgresql+psycopg://v@127.0.0.1:5432/shop")
    assert _where(a) == _where(b)


def test_other_database_host_or_port_differ() -> None:
    base = _where(make_url("postgresql+psycopg://localhost/shop"))
    assert _where(make_url("postgresql+psycopg://localhost/other")) != base
    assert _where(make_url("postgresql+psycopg://db.internal/shop")) != base
    assert _where(make_url("postgresql+psycopg://localhost:5433/shop")) != base
