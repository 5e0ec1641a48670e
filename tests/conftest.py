"""Shared fixtures: a fresh, migrated database per test session (tables emptied before each
test that uses it), a Redis broker, and a factory for Durable instances on a private queue.

Servers come from tests/services.py: env URLs, else local defaults, else embedded servers.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from durable_celery import Durable
from durable_celery.storage import migrate
from durable_celery.storage.engine import EngineHolder
from tests import services

TABLES = ("signals", "steps", "runs", "workers", "control_requests", "schedules", "early_signals",
          "rate_buckets")

# Short timings so that recovery and redispatch are observable within a test.
FAST = {"heartbeat_interval": 0.5, "stale_after": 2.0, "sweep_interval": 0.2,
        "redispatch_after": 2.0}


def pytest_report_header(config: pytest.Config) -> str:
    return services.describe()


@pytest.fixture(scope="session")
def admin_url() -> str:
    return services.postgres_admin_url()


@pytest.fixture(scope="session")
def database_url(admin_url: str) -> Iterator[str]:
    name = f"dct_{uuid.uuid4().hex[:12]}"
    url = services.create_database(admin_url, name)
    holder = EngineHolder(url)
    migrate.migrate(holder)
    holder.dispose()
    yield url
    services.drop_database(admin_url, name)


@pytest.fixture(scope="session")
def db_engine(database_url: str) -> Iterator[sa.Engine]:
    """An engine for tests to inspect or tamper with rows directly."""
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    yield engine
    engine.dispose()


@pytest.fixture
def clean_db(db_engine: sa.Engine) -> sa.Engine:
    with db_engine.begin() as conn:
        conn.execute(sa.text(
            "TRUNCATE " + ", ".join(f"{migrate.SCHEMA}.{t}" for t in TABLES) + " CASCADE"))
    return db_engine


@pytest.fixture(scope="session")
def redis_url() -> str:
    return services.redis_url()


@pytest.fixture
def queue() -> str:
    """A queue name private to this test, so that tests never see each other's messages."""
    return f"dct-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_durable(database_url: str, redis_url: str, clean_db: sa.Engine,
                 queue: str) -> Iterator[Callable[..., Durable]]:
    created: list[Durable] = []

    def factory(broker: str | None = None, **settings: Any) -> Durable:
        app = Celery(f"test-{uuid.uuid4().hex[:6]}", broker=broker or redis_url,
                     set_as_current=False)
        app.conf.task_default_queue = queue
        app.conf.broker_connection_retry_on_startup = True
        options = {"database_url": database_url, **FAST, **settings}
        durable = Durable(app, **options)
        created.append(durable)
        return durable

    yield factory
    for durable in created:
        durable.close()
        durable.app.close()


@pytest.fixture
def durable(make_durable: Callable[..., Durable]) -> Durable:
    return make_durable()
