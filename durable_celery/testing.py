"""Public test kit: run workflows inline, synchronously, through the real claim/commit code."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from durable_celery import app as app_mod
from durable_celery.runtime import executor

if TYPE_CHECKING:
    from durable_celery.app import Durable


def drain(durable: Durable, *, max_steps: int = 10_000, collapse_timers: bool = True,
          expire_awaits: bool = False) -> dict[str, int]:
    """Run everything runnable now, inline, until nothing is left; returns a tally.

    ``collapse_timers`` makes ``Sleep`` and ``Retry(delay)`` due at once; ``expire_awaits``
    also fires every ``Await`` deadline (otherwise awaiting runs stay parked, so a test can
    signal them and drain again). Nothing is published to the broker meanwhile.
    """
    durable._ensure_ready()
    tally: Counter[str] = Counter()
    before = executor.counters["steps"]
    app_mod._inline.active = True
    try:
        while executor.counters["steps"] - before < max_steps:
            if collapse_timers:
                durable.store.collapse_timers(expire_awaits=expire_awaits)
            if expire_awaits:
                tally["expired"] += len(durable.store.expire_awaits(1000))
            batch = durable.store.runnable_now(100)
            if not batch:
                break
            for dispatch in batch:
                tally[executor.execute(durable, dispatch.workflow_id, dispatch.seq)] += 1
    finally:
        app_mod._inline.active = False
    tally["steps"] = executor.counters["steps"] - before
    return dict(tally)
