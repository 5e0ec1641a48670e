"""The plain-Celery twin: the same trivial work as Celery tasks, no durability
(``celery -A benchmarks.plain_app worker``), configured by ``BENCH_*`` environment variables.

No result backend: every task ignores its result; the last task of a chain records its
completion time in a Redis list (one RPUSH), which is what the client waits on.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, chain
from celery import signals as celery_signals

from benchmarks import marks

STEPS = 10


def build(broker_url: str, redis_url: str, queue: str, prefix: str, *, label: str = "client",
          visibility_timeout: float | None = None, set_as_current: bool = True) -> Celery:
    app = Celery("bench_plain", broker=broker_url, set_as_current=set_as_current)
    app.conf.task_default_queue = queue
    app.conf.broker_connection_retry_on_startup = True
    app.conf.worker_hijack_root_logger = False
    app.conf.task_ignore_result = True
    app.conf.task_serializer = "json"
    app.conf.accept_content = ["json"]
    if visibility_timeout is not None:
        app.conf.broker_transport_options = {"visibility_timeout": visibility_timeout}

    @app.task(name="bench.step", ignore_result=True, shared=False)
    def step() -> None:
        return None

    @app.task(name="bench.mark", ignore_result=True, shared=False)
    def mark(key: str) -> None:
        marks.mark(redis_url, key)

    @app.task(name="bench.eta", ignore_result=True, shared=False)
    def eta(key: str, due: float) -> None:
        marks.mark(redis_url, key, repr(time.time() - due))

    @app.task(name="bench.hold", ignore_result=True, shared=False, acks_late=True,
              reject_on_worker_lost=True)
    def hold(key: str, victim: str) -> None:
        marks.mark(redis_url, key, f"{label} {time.time()!r}")
        if victim == label:
            time.sleep(3600)

    return app


def chain10(app: Celery, done_key: str) -> Any:
    """Nine trivial tasks, then the tenth records completion in ``done_key``."""
    step, mark = app.tasks["bench.step"], app.tasks["bench.mark"]
    return chain(*[step.si() for _ in range(STEPS - 1)], mark.si(done_key))


if os.environ.get("BENCH_SIDE") == "plain":
    _label = os.environ["BENCH_LABEL"]
    _vt = os.environ.get("BENCH_VISIBILITY_TIMEOUT")
    app = build(os.environ["BENCH_BROKER_URL"], os.environ["BENCH_REDIS_URL"],
                os.environ["BENCH_QUEUE"], os.environ["BENCH_PREFIX"], label=_label,
                visibility_timeout=float(_vt) if _vt else None)

    @celery_signals.worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        marks.mark(os.environ["BENCH_REDIS_URL"],
                   marks.ready_key(os.environ["BENCH_PREFIX"], _label))
