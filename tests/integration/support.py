"""Helpers shared by the integration tests: a broker-publish recorder, SQL shortcuts and
threads that report their exceptions instead of raising them in the background."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from durable_celery import Durable
from durable_celery.storage.sql import q


@dataclass(frozen=True)
class Sent:
    """One ``app.send_task`` call, as the broker would have received it."""

    name: str
    args: Any
    kwargs: Any
    options: dict[str, Any]


@dataclass
class Recorder:
    """Replaces ``app.send_task``: records what would have been published (thread-safe)."""

    sent: list[Sent] = field(default_factory=list)
    on_send: Callable[[Sent], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        message = Sent(name=name, args=args, kwargs=kwargs, options=options)
        if self.on_send is not None:
            self.on_send(message)
        with self._lock:
            self.sent.append(message)

    def install(self, durable: Durable, monkeypatch: Any) -> Recorder:
        monkeypatch.setattr(durable.app, "send_task", self)
        return self

    def clear(self) -> None:
        with self._lock:
            self.sent.clear()

    def for_run(self, workflow_id: str) -> list[Sent]:
        with self._lock:
            return [m for m in self.sent if m.args and m.args[0] == workflow_id]

    def names(self) -> list[str]:
        with self._lock:
            return [m.name for m in self.sent]

    def __len__(self) -> int:
        with self._lock:
            return len(self.sent)


def run_row(engine: sa.Engine, workflow_id: str) -> dict[str, Any]:
    """Every column of one run row (the storage view, not the public snapshot)."""
    with engine.connect() as conn:
        row = conn.execute(q("SELECT * FROM {S}.runs WHERE id = :id"),
                           {"id": workflow_id}).mappings().one()
    return dict(row)


def scalar(engine: sa.Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(q(sql), params).scalar()


def rows(engine: sa.Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(q(sql), params).mappings()]


def execute_sql(engine: sa.Engine, sql: str, **params: Any) -> int:
    with engine.begin() as conn:
        return int(conn.execute(q(sql), params).rowcount)


def seconds(delta: Any) -> float:
    return float(delta.total_seconds())


class Worker(threading.Thread):
    """A thread that keeps its target's result or exception for the test to inspect."""

    def __init__(self, target: Callable[[], Any], name: str = "test-thread") -> None:
        super().__init__(name=name, daemon=True)
        self._fn = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # reported by value(); never raised in the background
            self.error = exc

    def value(self, timeout: float = 10.0) -> Any:
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} did not finish within {timeout}s"
        if self.error is not None:
            raise self.error
        return self.result


def start_threads(targets: Iterable[Callable[[], Any]]) -> list[Worker]:
    threads = [Worker(t, name=f"test-thread-{i}") for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    return threads


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition",
             ) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def lock_waiters(engine: sa.Engine) -> int:
    """Backends of this database blocked on a heavyweight lock (e.g. a row lock)."""
    return int(scalar(engine, """
        SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND wait_event_type = 'Lock'
          AND pid <> pg_backend_pid()"""))


def redis_lists(client: Any, queue: str) -> list[Any]:
    """The Redis lists of ``queue``: kombu keeps one per priority step (durable messages
    always carry a priority; the default one lands in ``<queue>\x06\x169``)."""
    return [queue, *client.scan_iter(match=f"{queue}\x06\x16*")]
