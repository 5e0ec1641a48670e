"""The coordinator thread: runs the sweeps, sleeping until the nearest due time."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from durable_celery import errors
from durable_celery.coordinator.cron import CronSweep
from durable_celery.coordinator.redis_broker import RedisUpkeep
from durable_celery.coordinator.sweeps import Collector, Deadlines, Dispatcher, Reaper
from durable_celery.definitions import Registry
from durable_celery.runtime.publisher import Publisher
from durable_celery.runtime.readiness import Readiness
from durable_celery.settings import Settings
from durable_celery.storage.engine import EngineHolder
from durable_celery.storage.listener import Listener
from durable_celery.storage.schedules import ScheduleStore
from durable_celery.storage.store import Store

log = logging.getLogger("durable_celery.coordinator")

GC_INTERVAL = 60.0
WAKE_MARGIN = 0.0005


class Coordinator:
    """Dispatcher at every wake-up; reaper every ``sweep_interval``; GC every minute.

    Between passes it sleeps until the nearest due timer, the next reaper pass, or a
    NOTIFY from a commit that set a nearer timer, whichever comes first.
    """

    def __init__(self, *, holder: EngineHolder, store: Store, schedules: ScheduleStore,
                 registry: Registry, publisher: Publisher, readiness: Readiness,
                 settings: Settings, cleanup: Callable[[], int]) -> None:
        self.holder = holder
        self.readiness = readiness
        self.settings = settings
        self.dispatcher = Dispatcher(store, publisher, settings)
        self.deadlines = Deadlines(store, publisher, settings)
        self.reaper = Reaper(store, publisher, settings)
        self.collector = Collector(store, settings, cleanup)
        self.cron = CronSweep(schedules, registry, publisher, settings)
        self.redis: RedisUpkeep | None = None  # a Redis broker's queues and unacked messages
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None

    def run_once(self) -> int:
        """One pass of every sweep (tests; ``durable-celery coordinator --once``)."""
        return (self.reaper.run_once() + self.cron.run_once() + self.dispatcher.run_once()
                + self.deadlines.run_once() + self.collector.run_once())

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="durable-coordinator",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.redis is not None:
            self.redis.close()

    def run_forever(self) -> None:
        listener = self._listener = Listener(self.holder)
        try:
            while not self._stop.is_set():
                listener.wait(self._pass())
        finally:
            listener.close()

    _next_reap = 0.0
    _next_gc = 0.0
    _stalled = 0  # consecutive passes that found due rows they could not take

    def _pass(self) -> float:
        """Run what is due; return how long to sleep."""
        interval = self.settings.sweep_interval
        try:
            # Migrations once per process (a no-op after); while the database is away or
            # not migrated, one log line per backoff, no traceback, no spinning.
            self.readiness.ensure(wait=False)
            # Due timers first: the other sweeps' statements would add to every overshoot.
            done = self.dispatcher.run_once()
            now = time.monotonic()
            deadline = self.dispatcher.deadline_at
            if deadline is not None and now >= deadline:
                done += self.deadlines.run_once()  # a run deadline passed (planned for it)
            if now >= self._next_reap:
                self._next_reap = now + interval
                self.reaper.run_once()
                self.deadlines.run_once()  # and every sweep_interval, whatever was planned
                if self.redis is not None:
                    self.redis.run_once()
            if now >= self._next_gc:
                self._next_gc = now + GC_INTERVAL
                self.collector.run_once()
            cron_done, cron_due = self._cron_pass()
            done += cron_done
            due = self.dispatcher.seconds_to_next()
            wait = min(interval, self._next_reap - time.monotonic())
            for nearest in (due, cron_due):
                if nearest is not None:
                    wait = min(wait, nearest)
            if wait <= 0 and not done:
                # Due rows we could not take: they became due between our two statements
                # (try again at once), or another coordinator holds them (back off).
                self._stalled += 1
                return float(min(0.0005 * 2 ** self._stalled, 0.05))
            self._stalled = 0
            # Wake just after the due time, not just before it (a pass that finds the timer
            # not yet due costs a round trip and the timer its overshoot).
            return max(wait, 0.0) + WAKE_MARGIN
        except errors.NotReady as exc:
            return max(exc.retry_in, interval)
        except (errors.StorageError, errors.ConfigurationError) as exc:
            # The database went away (or refused us): readiness logs it once and backs off.
            return max(self.readiness.failed(exc), interval)
        except Exception:
            log.warning("coordinator sweep failed; retrying", exc_info=True)
            return interval

    def _cron_pass(self) -> tuple[int, float | None]:
        """The cron sweep, isolated: a failure there never holds up dispatching."""
        try:
            return self.cron.run_once(), self.cron.seconds_to_next()
        except Exception:
            log.warning("cron sweep failed; retrying", exc_info=True)
            return 0, None
