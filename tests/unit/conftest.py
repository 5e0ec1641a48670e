"""Unit tests: pure logic only. No database, no broker, no network.

Every test here runs with outgoing connections refused, so a test that reaches for a server
by accident fails at once instead of passing on a developer machine with Postgres running.
"""

from __future__ import annotations

import socket
from typing import Any

import psycopg
import pytest

from tests.unit.fakes import FakeDurable


class NetworkUsed(AssertionError):
    """A unit test tried to open a network connection."""


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise NetworkUsed(f"unit tests must not do network I/O (tried to connect to {args[1:]!r})")


def _refuse_db(*args: Any, **kwargs: Any) -> Any:
    raise NetworkUsed("unit tests must not connect to a database")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    # libpq opens its own sockets, below Python's socket module.
    monkeypatch.setattr(psycopg, "connect", _refuse_db)
    monkeypatch.setattr(psycopg.Connection, "connect", _refuse_db)


@pytest.fixture
def fake_durable() -> FakeDurable:
    return FakeDurable()
