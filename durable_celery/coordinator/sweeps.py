"""Each sweep is ``run_once() -> int`` (work done); the loop around them only sleeps.

All are safe to run on many nodes at once: they pick rows with ``FOR UPDATE SKIP LOCKED``
and every transition is guarded, so two sweeps never dispatch or reclaim one row twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime

from durable_celery import errors
from durable_celery.runtime import outcomes
from durable_celery.runtime.publisher import Publisher
from durable_celery.settings import Settings
from durable_celery.storage.records import Claim, Dispatch, Transition
from durable_celery.storage.store import Store
from durable_celery.storage.sweeps import Lost

log = logging.getLogger("durable_celery.coordinator")


# Seconds without any publish for a free concurrency key before its waiter is woken anyway.
KEY_QUIET = 5.0
# How long the reaper's commit of a lost run's end waits on a locked row (the run, its
# parent) before leaving it for the next pass.
END_LOCK_TIMEOUT = 1.0


class Dispatcher:
    """Publishes due runnable rows (timers, lost or overdue messages) and expires awaits."""

    def __init__(self, store: Store, publisher: Publisher, settings: Settings) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings

    def run_once(self) -> int:
        store, limit = self.store, self.settings.sweep_batch_size
        done = 0
        # A concurrency key freed without a hand-off (a cancel, a run failed by the reaper):
        # its next waiter becomes due now.
        store.wake_free_keys(limit, quiet=KEY_QUIET)
        for _ in range(100):  # bounded: never starve the other sweeps
            batch = store.expire_awaits(limit) + store.dispatch_due(
                limit, lead=self.settings.timer_lead)
            published = self.publisher.publish_many(batch)
            done += published
            if published < len(batch) or len(batch) < limit:
                break  # the broker failed (retry later), or nothing more is due
        return done

    # When (monotonic) the nearest run deadline passes, as the last seconds_to_next() saw.
    deadline_at: float | None = None

    def seconds_to_next(self) -> float | None:
        """Seconds until the next pass has work (a timer counts ``timer_lead`` early)."""
        due, deadline = self.store.seconds_to_next_due(lead=self.settings.timer_lead)
        self.deadline_at = None if deadline is None else time.monotonic() + deadline
        return due


class Deadlines:
    """Ends runs whose deadline passed: the run fails with ``DeadlineExceeded`` (or, with
    completed steps to undo, compensates: the compensation transition decides), whatever
    it was doing; a worker executing its step loses the lease (its outcome is dropped, as
    after a cancel), and its live children are cancelled."""

    def __init__(self, store: Store, publisher: Publisher, settings: Settings) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings

    def run_once(self) -> int:
        ended = 0
        for _ in range(self.settings.sweep_batch_size):
            try:
                due, committed = self.store.end_expired(self._decide,
                                                        lock_timeout=END_LOCK_TIMEOUT)
            except errors.StorageError as exc:
                log.info("a passed deadline waits for the next pass (%s)", exc.message)
                break
            if not due:
                break
            if committed is None:
                continue
            ended += 1
            wakes = list(committed.wakes)
            if committed.dispatch is not None:
                wakes.append(committed.dispatch)
            self.publisher.publish_many(wakes)
        return ended

    @staticmethod
    def _decide(claim: Claim, deadline: datetime) -> Transition:
        error = {"type": "DeadlineExceeded",
                 "message": f"the run's deadline ({deadline.isoformat()}) passed at step "
                            f"{claim.step!r}", "deadline": deadline.isoformat(),
                 "step": claim.step}
        log.error("run %s: deadline %s passed at step %s", claim.workflow_id,
                  deadline.isoformat(), claim.step)
        position = outcomes.Position(
            step=claim.step, attempt=claim.attempt, queue=claim.queue,
            compensations=claim.compensations, compensation_errors=claim.compensation_errors,
            failure=claim.failure)
        return outcomes.failed(position, json.dumps(claim.state), error)


class Reaper:
    """Returns runs held by dead worker processes (stale heartbeat) to runnable."""

    def __init__(self, store: Store, publisher: Publisher, settings: Settings) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings
        self._last_pass: float | None = None
        self._grace_until = 0.0

    def run_once(self, now: float | None = None) -> int:
        """``now``: this process's monotonic clock (tests pass it to step through time)."""
        s = self.settings
        now = time.monotonic() if now is None else now
        if self._last_pass is not None and now - self._last_pass > s.stale_after:
            # This coordinator could not reach the database (or was frozen) for longer than
            # stale_after: every worker's heartbeat looks stale for the same reason. Give
            # them one stale_after to beat again before judging anyone dead.
            log.warning("reaper: no pass for %.0fs; waiting %.0fs for heartbeats before "
                        "reclaiming", now - self._last_pass, s.stale_after)
            self._grace_until = now + s.stale_after
        if now < self._grace_until:
            self._last_pass = now
            return 0
        reaped = self.store.reap(
            stale_after=s.stale_after, max_recoveries=s.max_recoveries, limit=s.sweep_batch_size)
        self._last_pass = now  # only a pass that reached the database counts
        for dispatch in reaped.publish:
            log.warning("run %s: worker lost; step %s will run again", dispatch.workflow_id,
                        dispatch.step)
        ended, wakes = self._end(reaped.lost)
        owed = self.store.pay_owed_slots(s.sweep_batch_size)
        delivered, woken = self.store.deliver_early_signals(s.sweep_batch_size)
        if delivered:
            log.info("%d signal(s) sent before their run existed delivered to it", delivered)
        self.publisher.publish_many(reaped.publish + wakes + owed + woken)
        return len(reaped.publish) + ended + len(owed) + delivered

    def _end(self, lost: list[Lost]) -> tuple[int, list[Dispatch]]:
        """Steps lost ``max_recoveries`` times: the step failed for good (the compensation
        transition decides what follows: compensate, fail, the next compensation...),
        committed under the dead lease like a worker's outcome. A run whose row (or parent
        row) stays locked, or that the database refuses now, is left for the next pass."""
        ended, wakes = 0, []
        for item in lost:
            claim = item.claim
            error = {"type": "WorkerLost", "message": f"worker lost ({item.losses} times)",
                     "worker": item.owner, "attempts": claim.attempt + 1}
            position = outcomes.Position(
                step=claim.step, attempt=claim.attempt, queue=claim.queue,
                compensating=claim.compensating, compensations=claim.compensations,
                compensation_errors=claim.compensation_errors, failure=claim.failure)
            transition = outcomes.failed(position, json.dumps(claim.state), error)
            try:
                committed = self.store.commit(claim, transition, worker=item.owner,
                                              started_at=item.started_at,
                                              lock_timeout=END_LOCK_TIMEOUT)
            except errors.StorageError as exc:
                log.info("run %s: its end waits for the next reaper pass (%s)",
                         claim.workflow_id, exc.message)
                continue
            if committed is None:
                continue  # cancelled, or another coordinator ended it first
            ended += 1
            wakes += list(committed.wakes)
            if committed.dispatch is not None:
                wakes.append(committed.dispatch)
            log.error("run %s: step %s lost its worker %d times; %s", claim.workflow_id,
                      claim.step, item.losses,
                      f"now {committed.status}" + (f" (next: {transition.step})"
                                                  if committed.dispatch else ""))
        return ended, wakes


class Collector:
    """Deletes finished runs (with history and signals) older than ``retention``, and
    expired idempotency records of control requests."""

    def __init__(self, store: Store, settings: Settings, cleanup: Callable[[], int]) -> None:
        self.store = store
        self.settings = settings
        self.cleanup = cleanup  # expired control requests (Controls.cleanup)

    def run_once(self) -> int:
        s = self.settings
        total = 0
        for _ in range(100):
            n = self.store.collect_garbage(
                retention_seconds=s.retention.total_seconds(), limit=s.gc_batch_size)
            total += n
            if n < s.gc_batch_size:
                break
        expired = self.store.expire_early_signals(s.gc_batch_size)
        if expired:
            log.warning("%d signal(s) sent by name to a run that never started expired "
                        "(early_signal_ttl) and were dropped", expired)
        return total + expired + int(self.cleanup())
