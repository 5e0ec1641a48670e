"""Which database errors are worth retrying: classified by SQLSTATE."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc

from durable_celery import errors
from durable_celery.storage.engine import translate_errors


class FakeDriverError(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(f"driver error {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(("sqlstate", "transient"), [
    ("22003", False),   # numeric value out of range: data the database will never accept
    ("23505", False),   # unique violation
    ("42P01", False),   # undefined table: schema not migrated
    ("57P01", True),    # admin shutdown
    ("25006", True),    # read-only transaction (a failover in progress)
    ("25P03", True),    # idle-in-transaction timeout
    ("40001", True),    # serialization failure
    (None, True),       # no SQLSTATE: the connection broke
])
def test_transient_is_decided_by_sqlstate(sqlstate, transient):
    with pytest.raises(errors.StorageError) as caught, translate_errors():
        raise sa_exc.DBAPIError("SELECT 1", {}, FakeDriverError(sqlstate))
    assert caught.value.transient is transient
    assert isinstance(caught.value.__cause__, sa_exc.DBAPIError)


def test_a_pool_timeout_is_transient():
    with pytest.raises(errors.StorageError) as caught, translate_errors():
        raise sa_exc.TimeoutError("QueuePool limit reached")
    assert caught.value.transient
