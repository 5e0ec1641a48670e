"""Keep a worker's queues routable on a Redis broker that restarted empty.

kombu's Redis transport keeps the binding of each queue (``_kombu.binding.<exchange>``) in
Redis itself. A Redis without persistence that restarts has forgotten them, and until a
consumer declares its queue again every message published to it is routed nowhere (kombu
drops it as undeliverable). Celery's consumer declares its queues only when it reconnects,
which its retry backoff may delay by many seconds after the broker is back. Step messages
survive that (the coordinator sends them again from Postgres), but a message another app
sends by name would be lost before any worker could apply it.

So the coordinator of each worker watches Redis's ``run_id`` (it changes when the server
restarts) once per reaper pass, and declares the worker's queues again as soon as it sees a
new one. Nothing is done for other brokers (RabbitMQ keeps durable declarations).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

log = logging.getLogger("durable_celery.coordinator")

REDIS_SCHEMES = ("redis", "rediss", "sentinel", "redis-socket")
# One quick attempt per pass, never kombu's retry loop (its sleeps would hold up timers).
QUICK = {"max_retries": 0, "interval_start": 0, "interval_step": 0, "interval_max": 0,
         "socket_timeout": 1.0, "socket_connect_timeout": 1.0}


def is_redis(app: Any) -> bool:
    url = str(app.conf.broker_url or "")
    return url.split("://", 1)[0].split("+")[0] in REDIS_SCHEMES


class Bindings:
    """``run_once()`` declares ``queues`` again when the Redis broker restarted."""

    def __init__(self, app: Any, queues: list[Any]) -> None:
        self.app = app
        self.queues = queues
        self._conn: Any = None
        self._run_id: str | None = None

    def run_once(self) -> int:
        """Returns the number of queues declared again (0 when nothing changed)."""
        if not self.queues:
            return 0
        try:
            if self._conn is None:
                # The app's transport options too (a key prefix names the bindings).
                self._conn = self.app.connection_for_write(transport_options=QUICK)
                self._conn.ensure_connection(max_retries=0)
            channel = self._conn.default_channel
            run_id = str(channel.client.info("server").get("run_id"))
            if run_id == self._run_id:
                return 0
            for queue in self.queues:
                queue.bind(channel).declare()
            restarted, self._run_id = self._run_id is not None, run_id
            if restarted:
                log.warning("the Redis broker restarted: declared this worker's queues "
                            "again (%s)", ", ".join(q.name for q in self.queues))
            return len(self.queues)
        except Exception as exc:  # the broker is away: the next pass tries again
            log.debug("could not check the broker's queues: %r", exc)
            self.close()
            return 0

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()
