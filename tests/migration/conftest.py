"""Migration tests: each gets EMPTY databases of its own (never the session's migrated one)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from durable_celery.storage.engine import EngineHolder
from tests import services


@pytest.fixture
def new_database(admin_url: str) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty databases; all are dropped when the test ends."""
    names: list[str] = []

    def make() -> str:
        name = f"dcm_{uuid.uuid4().hex[:12]}"
        url = services.create_database(admin_url, name)
        names.append(name)
        return url

    yield make
    for name in names:
        services.drop_database(admin_url, name)


@pytest.fixture
def empty_database_url(new_database: Callable[[], str]) -> str:
    return new_database()


@pytest.fixture
def holders() -> Iterator[Callable[[str], EngineHolder]]:
    """A factory of EngineHolders, all disposed when the test ends."""
    made: list[EngineHolder] = []

    def make(url: str) -> EngineHolder:
        holder = EngineHolder(url)
        made.append(holder)
        return holder

    yield make
    for holder in made:
        holder.dispose()
