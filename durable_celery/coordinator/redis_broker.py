"""What the coordinator does for a Redis broker: queues routable again after a restart, and
messages sent by name delivered again when the worker that received them died.

**Queues.** kombu's Redis transport keeps the binding of each queue
(``_kombu.binding.<exchange>``) in Redis itself. A Redis without persistence that restarts
has forgotten them, and until a consumer declares its queue again every message published
to it is routed nowhere (kombu drops it as undeliverable). Celery's consumer declares its
queues only when it reconnects, which its retry backoff may delay by many seconds after the
broker is back. Step messages survive that (the coordinator sends them again from Postgres),
but a message another app sends by name would be lost before any worker could apply it. So
each pass watches Redis's ``run_id`` (it changes when the server restarts) and declares the
worker's queues again as soon as it sees a new one.

**Messages sent by name.** They carry data (``receipt.py``) and are applied the moment a
worker receives them, then acknowledged; kombu keeps each received message in its
``unacked`` hash until then. One still there ``stale_after`` seconds after it was received
(or after its eta) was received by a worker that died before applying it (killed in the
milliseconds until the commit, or holding it on Celery's ordinary path while its database
was away). kombu would deliver it again only after the visibility timeout (one hour by
default); each pass puts such messages back on their queue at once, with kombu's own
atomic restore (one coordinator wins; the others find nothing). Applying a message twice
changes nothing, so a worker that was merely slow costs a duplicate that is refused. Step
messages are never touched: they are hints, sent again from Postgres.

Nothing is done for other brokers (RabbitMQ keeps durable declarations and redelivers what
a dead connection held at once).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from datetime import datetime
from typing import Any

from durable_celery.runtime.publisher import is_redis as is_redis  # re-exported

log = logging.getLogger("durable_celery.coordinator")

# One quick attempt per pass, never kombu's retry loop (its sleeps would hold up timers).
QUICK = {"max_retries": 0, "interval_start": 0, "interval_step": 0, "interval_max": 0,
         "socket_timeout": 1.0, "socket_connect_timeout": 1.0}
# Received messages looked at per pass, oldest first (a page is one ZRANGE and one HMGET).
PAGE = 500
PAGES = 10


def carries_data(app: Any, name: Any) -> bool:
    """True for a task applied as it is received (``receipt.TASK_OPTIONS``)."""
    task = app.tasks.get(name) if isinstance(name, str) else None
    return bool(getattr(task, "durable_by_name", False))


def due_at(message: dict[str, Any], received: float) -> float:
    """When a received message should have been applied: when it was received, or its eta."""
    eta = (message.get("headers") or {}).get("eta")
    if isinstance(eta, str):
        with contextlib.suppress(ValueError):
            return max(received, datetime.fromisoformat(eta).timestamp())
    return received


class RedisUpkeep:
    """``run_once()``: declares ``queues`` again when the Redis broker restarted, and puts
    back on their queues the messages sent by name that a dead worker held for longer than
    ``after`` seconds."""

    def __init__(self, app: Any, queues: list[Any], *, after: float) -> None:
        self.app = app
        self.queues = queues
        self.after = after
        self._conn: Any = None
        self._run_id: str | None = None

    def run_once(self) -> tuple[int, int]:
        """Returns (queues declared again, messages delivered again)."""
        try:
            if self._conn is None:
                # The app's transport options too (a key prefix names the bindings).
                self._conn = self.app.connection_for_write(transport_options=QUICK)
                self._conn.ensure_connection(max_retries=0)
            channel = self._conn.default_channel
            return self._declare(channel), self._redeliver(channel)
        except Exception as exc:  # the broker is away: the next pass tries again
            log.debug("could not look after the Redis broker: %r", exc)
            self.close()
            return 0, 0

    def _declare(self, channel: Any) -> int:
        if not self.queues:
            return 0
        run_id = str(channel.client.info("server").get("run_id"))
        if run_id == self._run_id:
            return 0
        for queue in self.queues:
            queue.bind(channel).declare()
        restarted, self._run_id = self._run_id is not None, run_id
        if restarted:
            log.warning("the Redis broker restarted: declared this worker's queues again "
                        "(%s)", ", ".join(q.name for q in self.queues))
        return len(self.queues)

    def _redeliver(self, channel: Any) -> int:
        client = channel.client
        cutoff = time.time() - self.after
        restored: list[str] = []
        for page in range(PAGES):
            entries = client.zrangebyscore(channel.unacked_index_key, "-inf", cutoff,
                                           start=page * PAGE, num=PAGE, withscores=True)
            if not entries:
                break
            tags = [tag for tag, _ in entries]
            for (tag, received), raw in zip(entries, client.hmget(channel.unacked_key, tags),
                                            strict=True):
                if raw is None:
                    continue  # acknowledged meanwhile
                try:
                    message = json.loads(raw)[0]
                except (ValueError, TypeError, IndexError, KeyError):
                    continue
                headers = message.get("headers") or {}
                if not carries_data(self.app, headers.get("task")) \
                        or due_at(message, received) > cutoff:
                    continue
                channel.qos.restore_by_tag(tag, client)
                restored.append(f"{headers.get('task')}[{headers.get('id')}]")
            if len(entries) < PAGE:
                break
        if restored:
            log.warning("delivered again %d message(s) sent by name that a worker received "
                        "but did not acknowledge within %ss (it died?): %s", len(restored),
                        self.after, ", ".join(restored[:10]))
        return len(restored)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()
