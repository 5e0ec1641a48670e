"""Pure parts of the coordinator's Redis upkeep: which received messages it may deliver
again, and from when."""

from __future__ import annotations

from datetime import datetime, timezone

from celery import Celery

from durable_celery.coordinator.redis_broker import carries_data, due_at, is_redis
from durable_celery.receipt import TASK_OPTIONS


def test_only_tasks_applied_on_receipt_carry_data() -> None:
    app = Celery("t", set_as_current=False)

    @app.task(name="by.name", **TASK_OPTIONS)
    def by_name(self) -> None: ...

    @app.task(name="plain.task")
    def plain() -> None: ...

    assert carries_data(app, "by.name")
    assert not carries_data(app, "plain.task")
    assert not carries_data(app, "unknown.task")
    assert not carries_data(app, None)


def test_a_message_is_due_when_received_or_at_its_eta() -> None:
    received = 1_000_000.0
    assert due_at({"headers": {}}, received) == received
    assert due_at({}, received) == received
    later = datetime.fromtimestamp(received + 60, tz=timezone.utc).isoformat()
    assert due_at({"headers": {"eta": later}}, received) == received + 60
    earlier = datetime.fromtimestamp(received - 60, tz=timezone.utc).isoformat()
    assert due_at({"headers": {"eta": earlier}}, received) == received
    assert due_at({"headers": {"eta": "not a date"}}, received) == received


def test_redis_urls_are_recognised() -> None:
    for url, expected in (("redis://h/0", True), ("rediss://h/0", True),
                          ("sentinel://h:26379", True), ("amqp://g@h//", False),
                          ("memory://", False)):
        app = Celery("t", broker=url, set_as_current=False)
        assert is_redis(app) is expected, url
