"""Messages sent by name carry data: a worker applies them as it receives them, so a
worker SIGKILLed with a busy pool loses none, even when a Redis without persistence
restarts right after (item 1). A blind sender (each message sent once) is enough."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests import services
from tests.chaos.servers import PrivateRedis
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    root = tmp_path / "redis"
    root.mkdir()
    server = PrivateRedis(root, persistent=False)
    server.start()
    yield server
    server.close()


def test_by_name_messages_survive_a_killed_worker_and_a_redis_that_forgets(
        make_e2e, volatile_redis):
    e2e = make_e2e(volatile_redis.url)
    w1 = e2e.worker("prefork", 1, label="W1")
    target = e2e.start("timer", {"x": 1, "sleep": 0.1})
    doomed = e2e.start("timer", {"x": 2, "sleep": 0.1})
    e2e.wait_status(target, "awaiting", timeout=30)
    e2e.wait_status(doomed, "awaiting", timeout=30)
    # The only pool process is busy for 60 s: nothing more runs in W1's pool.
    busy = e2e.start("blocker", {"x": 3, "block": 60})
    wait_for(lambda: e2e.db.scalar("SELECT count(*) FROM public.e2e_effects WHERE "
                                   "workflow_id = %s AND step = 'first:start'", busy),
             timeout=30, what="the pool to be busy")

    with Celery("plain", broker=volatile_redis.url, set_as_current=False) as plain:
        plain.send_task("durable_celery.signal", queue=e2e.queue, kwargs={
            "target": target, "name": "go", "payload": {"v": 1}, "dedup_key": "evt-1"})
        plain.send_task("durable_celery.start", queue=e2e.queue, kwargs={
            "workflow": "pipeline", "state": {"x": 5}, "key": "order:5"})
        plain.send_task("durable_celery.cancel_workflow", queue=e2e.queue, kwargs={
            "workflow_id": doomed, "request_key": "ops-1"})
    # Applied as received, although no pool process is free.
    wait_for(lambda: e2e.db.scalar(
        "SELECT count(*) FROM durable_celery.signals WHERE dedup_key = 'evt-1'"),
        timeout=15, what="the signal to be stored")
    wait_for(lambda: e2e.db.scalar(
        "SELECT count(*) FROM durable_celery.runs WHERE key = 'order:5'"),
        timeout=15, what="the run to be started")
    assert e2e.run(doomed).status == "cancelled"

    w1.kill()                        # SIGKILL, pool child included
    volatile_redis.shutdown_nosave()  # ...and the broker forgets everything it held
    volatile_redis.start()
    e2e.worker("prefork", 2, label="W2")

    assert e2e.durable.wait_result(target, timeout=40) == {
        "go": {"v": 1}, "timed_out": False, "x": 1}
    [started] = [r[0] for r in e2e.db.rows(
        "SELECT id FROM durable_celery.runs WHERE key = 'order:5'")]
    assert e2e.durable.wait_result(started, timeout=40)["x"] == 5
    assert e2e.durable.wait_result(busy, timeout=40) == {"x": 3}
    assert e2e.run(doomed).status == "cancelled"
    log = w1.log.read_text(errors="replace")
    assert log.count("applied as received") == 3, log[-4000:]


def test_by_name_messages_are_applied_as_received_on_rabbitmq(make_e2e):
    url = services.amqp_url()
    if url is None:
        pytest.skip(services.amqp_unavailable_reason() or "no RabbitMQ")
    e2e = make_e2e(url)
    worker = e2e.worker("prefork", 1)
    target = e2e.start("timer", {"x": 4, "sleep": 0.1})
    e2e.wait_status(target, "awaiting", timeout=30)
    with Celery("plain", broker=url, set_as_current=False) as plain:
        plain.send_task("durable_celery.signal", queue=e2e.queue, kwargs={
            "target": target, "name": "go", "payload": {"v": 4}})
    assert e2e.durable.wait_result(target, timeout=30)["go"] == {"v": 4}
    assert "applied as received" in worker.log.read_text(errors="replace")


def test_a_redis_that_restarts_empty_routes_to_the_queue_again_at_once(make_e2e,
                                                                       volatile_redis):
    """kombu keeps queue bindings in Redis; one that restarts empty drops what is published
    to it until a consumer declares its queue again -- Celery's consumer only when it
    reconnects, seconds later. The coordinator declares them again as soon as it sees the
    restart, so a signal a plain app sends right after is applied."""
    import time

    import redis as redis_lib

    e2e = make_e2e(volatile_redis.url)
    worker = e2e.worker("prefork", 1)
    target = e2e.start("timer", {"x": 6, "sleep": 0.1})
    e2e.wait_status(target, "awaiting", timeout=30)
    binding = f"_kombu.binding.{e2e.queue}"
    client = redis_lib.Redis(host="127.0.0.1", port=volatile_redis.port)
    try:
        assert client.exists(binding)
        # Down 7 s: Celery's consumer retries after 2, then 4, then 6 s, so it reconnects
        # (and declares its queue) about 5 s after the restart.
        volatile_redis.shutdown_nosave()
        time.sleep(7.0)
        volatile_redis.start()
        back = time.monotonic()
        wait_for(lambda: client.exists(binding), timeout=3.0,
                 what="the queue's binding to be declared again")
        assert time.monotonic() - back < 3.0
    finally:
        client.close()
    with Celery("plain", broker=volatile_redis.url, set_as_current=False) as plain:
        plain.send_task("durable_celery.signal", queue=e2e.queue, kwargs={
            "target": target, "name": "go", "payload": {"v": 6}})
    assert e2e.durable.wait_result(target, timeout=40)["go"] == {"v": 6}
    assert "the Redis broker restarted: declared this worker's queues again" in \
        worker.log.read_text(errors="replace")


def test_a_message_a_dead_worker_held_unacknowledged_is_delivered_again(make_e2e, redis_url,
                                                                         database_url):
    """On Redis a received message waits in kombu's ``unacked`` hash until it is
    acknowledged, and kombu delivers it again only after the visibility timeout (one hour).
    A worker whose database is away holds a by-name message on Celery's ordinary path
    (retried with backoff, each retry held until its eta); SIGKILLed then, the message would
    wait an hour. The coordinator of another worker delivers it again after stale_after."""
    import json
    import time

    import redis as redis_lib

    from tests.proxy import Proxy

    e2e = make_e2e(redis_url)
    proxy = Proxy.for_database(database_url, mode="refuse")
    client = redis_lib.Redis.from_url(redis_url)
    key = f"order:{e2e.queue}"

    def held() -> list[dict]:
        messages = [json.loads(raw)[0] for raw in client.hvals("unacked")]
        return [m for m in messages if m["headers"].get("task") == "durable_celery.start"
                and m["properties"]["delivery_info"]["routing_key"] == e2e.queue]

    try:
        w1 = e2e.worker("prefork", 1, label="W1",
                        env={"E2E_DATABASE_URL": proxy.url_for(database_url)})
        with Celery("plain", broker=redis_url, set_as_current=False) as plain:
            plain.send_task("durable_celery.start", queue=e2e.queue, kwargs={
                "workflow": "pipeline", "state": {"x": 7}, "key": key})
        # W1 cannot apply it: it retries, and holds each retry until its eta.
        wait_for(lambda: any(m["headers"].get("retries") for m in held()), timeout=30,
                 what="W1 to hold a retry of the start")
        w1.kill()
        messages = held()
        assert messages, "the retry W1 held is in the unacked hash"
        eta = messages[0]["headers"].get("eta")
        assert e2e.db.scalar("SELECT count(*) FROM durable_celery.runs WHERE key = %s",
                             key) == 0
    finally:
        proxy.close()

    killed = time.monotonic()
    w2 = e2e.worker("prefork", 1, label="W2")
    wait_for(lambda: e2e.db.scalar(
        "SELECT count(*) FROM durable_celery.runs WHERE key = %s", key), timeout=40,
        what=f"the start W1 held (eta {eta}) to be delivered again and applied")
    # stale_after is 3 s here; the retry's eta is at most a few seconds away.
    assert time.monotonic() - killed < 30
    [started] = [r[0] for r in e2e.db.rows(
        "SELECT id FROM durable_celery.runs WHERE key = %s", key)]
    assert e2e.durable.wait_result(started, timeout=40)["x"] == 7
    assert not held()
    assert "delivered again 1 message(s) sent by name" in w2.log.read_text(errors="replace")
    client.close()
