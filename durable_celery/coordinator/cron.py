"""Cron schedules: parsing and planning (pure), the public calls, and the sweep that fires.

Occurrences come from ``cronsim`` (5 fields, or 6 with seconds first) evaluated in an IANA
time zone (``zoneinfo``). Across daylight-saving changes it behaves like Debian cron: a
fixed time that falls in a gap (02:30 on a spring-forward night) fires once at the end of
the gap (03:00); a fixed time in a repeated hour fires once (the first pass); schedules with
a ``*`` or step in the minute or hour field follow real elapsed time (both passes of a
repeated hour fire).

Catch-up after downtime (the coordinator was not running when occurrences came due):
``"latest"`` fires the most recent missed occurrence once, ``"all"`` fires each missed one
(at most :data:`CATCHUP_BATCH` per pass, continuing on the next pass), ``"none"`` fires only an
occurrence that is at most :data:`MISFIRE_GRACE` seconds late and skips older ones.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from durable_celery import errors, payloads
from durable_celery.checks import check_name, check_priority
from durable_celery.definitions import Registry, Workflow
from durable_celery.runtime.publisher import Publisher
from durable_celery.runtime.readiness import Readiness
from durable_celery.settings import Settings
from durable_celery.storage.flow import NO_POLICY, StartPolicy
from durable_celery.storage.schedules import Plan, Schedule, ScheduleStore

log = logging.getLogger("durable_celery.coordinator")

UTC = timezone.utc
CATCHUP = ("latest", "all", "none")
MISFIRE_GRACE = 60.0
CATCHUP_BATCH = 100
MAX_CRON = 200

# ----------------------------------------------------------------------------- pure logic


def check_zone(name: Any) -> ZoneInfo:
    if not isinstance(name, str) or not name or len(name) > 100 or "\x00" in name:
        raise errors.InvalidSchedule(f"timezone must be an IANA zone name, got {name!r}"[:300])
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise errors.InvalidSchedule(
            f"unknown time zone {name!r}; use an IANA name such as 'UTC' or "
            "'Europe/Berlin'"[:300]) from None


def check_cron(expr: Any, zone: ZoneInfo | None = None) -> str:
    """A valid 5-field (or 6-field, seconds first) cron expression, normalized."""
    if not isinstance(expr, str) or not expr.strip() or len(expr) > MAX_CRON or "\x00" in expr:
        raise errors.InvalidSchedule(f"cron must be a cron expression string, got {expr!r}"[:300])
    text = " ".join(expr.split())
    try:
        probe = CronSim(text, datetime(2000, 1, 1, tzinfo=zone or UTC))
        next(probe)
    except (CronSimError, ValueError, KeyError, IndexError, StopIteration) as exc:
        raise errors.InvalidSchedule(f"invalid cron expression {expr!r}: {exc}"[:300]) from None
    return text


def check_catchup(value: Any) -> str:
    if value not in CATCHUP:
        raise errors.InvalidSchedule(f"catchup must be one of {list(CATCHUP)}, got {value!r}"[:300])
    return str(value)


def next_after(cron: str, zone: ZoneInfo, after: datetime) -> datetime:
    """The first occurrence strictly after ``after`` (an aware datetime), in UTC."""
    return next(CronSim(cron, after.astimezone(zone))).astimezone(UTC)


def latest_until(cron: str, zone: ZoneInfo, now: datetime) -> datetime:
    """The latest occurrence at or before ``now``, in UTC."""
    start = (now.replace(microsecond=0) + timedelta(seconds=1)).astimezone(zone)
    return next(CronSim(cron, start, reverse=True)).astimezone(UTC)


def plan(cron: str, zone: ZoneInfo, next_fire_at: datetime, now: datetime, catchup: str,
         *, batch: int = CATCHUP_BATCH, grace: float = MISFIRE_GRACE) -> Plan:
    """What a schedule whose first unfired occurrence is ``next_fire_at`` does at ``now``."""
    if next_fire_at > now:
        return Plan(fire=(), next_fire_at=next_fire_at)
    if catchup == "all":
        fire: list[datetime] = []
        at = next_fire_at
        while at <= now and len(fire) < batch:
            fire.append(at)
            at = next_after(cron, zone, at)
        return Plan(fire=tuple(fire), next_fire_at=at)
    latest = max(latest_until(cron, zone, now), next_fire_at)
    following = next_after(cron, zone, now)
    if catchup == "none" and (now - latest).total_seconds() > grace:
        return Plan(fire=(), next_fire_at=following)
    return Plan(fire=(latest,), next_fire_at=following)


# ----------------------------------------------------------------------------- public calls


class Schedules:
    """Declare, list, pause, resume and delete cron schedules (``durable.schedule`` ...)."""

    def __init__(self, *, store: ScheduleStore, registry: Registry, readiness: Readiness,
                 settings: Settings) -> None:
        self.store = store
        self.registry = registry
        self.readiness = readiness
        self.settings = settings

    def declare(self, name: Any, wf: Any, *, cron: Any, timezone: Any = "UTC",
                state: Any = None, catchup: Any = "latest", priority: Any = None,
                now: datetime | None = None) -> Schedule:
        check_name(name, "schedule name")
        if isinstance(wf, str):
            wf = self.registry.get(wf)
        if not isinstance(wf, Workflow) or not self.registry.owns(wf):
            raise errors.UnknownWorkflow(
                f"schedule needs a workflow registered here, got {wf!r}"[:300])
        zone = check_zone(timezone)
        expr = check_cron(cron, zone)
        mode = check_catchup(catchup)
        prio = check_priority(priority)
        text = payloads.check_object({} if state is None else state, what="schedule state",
                                     max_bytes=self.settings.max_payload_bytes)
        first = wf.first
        self.readiness.ensure()
        return self.store.upsert(
            name=name, workflow=wf.name, version=wf.version, step=first.name,
            queue=wf.queue_for(first), cron=expr, timezone=str(timezone), state=text,
            catchup=mode, priority=prio, next_fire_at=next_after(expr, zone, now or _now()))

    def all(self) -> list[Schedule]:
        self.readiness.ensure()
        return self.store.all()

    def pause(self, name: Any) -> Schedule:
        check_name(name, "schedule name")
        self.readiness.ensure()
        return self.store.pause(name)

    def resume(self, name: Any, now: datetime | None = None) -> Schedule:
        check_name(name, "schedule name")
        self.readiness.ensure()
        at = now or _now()
        return self.store.resume(name, lambda s: next_after(s.cron, ZoneInfo(s.timezone), at))

    def delete(self, name: Any) -> None:
        check_name(name, "schedule name")
        self.readiness.ensure()
        self.store.delete(name)


def _now() -> datetime:
    return datetime.now(UTC)


# ----------------------------------------------------------------------------- the sweep


class CronSweep:
    """Fires due schedule occurrences; safe on many coordinators at once."""

    def __init__(self, store: ScheduleStore, registry: Registry, publisher: Publisher,
                 settings: Settings) -> None:
        self.store = store
        self.registry = registry
        self.publisher = publisher
        self.settings = settings

    def run_once(self, now: datetime | None = None) -> int:
        """Start the runs of every occurrence due at ``now`` (default: the database's
        clock, never this host's); returns runs started."""
        dispatches, started = self.store.fire_due(
            now, lambda s, at: plan(s.cron, ZoneInfo(s.timezone), s.next_fire_at, at, s.catchup),
            self._target, limit=self.settings.sweep_batch_size, policy=self._policy)
        self.publisher.publish_many(dispatches)
        return started

    def seconds_to_next(self, now: datetime | None = None) -> float | None:
        return self.store.seconds_to_next(now)

    def _policy(self, schedule: Schedule) -> StartPolicy:
        """The workflow's flow control (a singleton skips an occurrence while the last one
        runs; a throttle or rate limit delays it), if the code is registered here. The
        schedule's own run id keeps an occurrence from firing twice either way."""
        wf = self.registry.find(schedule.workflow, schedule.version)
        if wf is None or not wf.steps:
            return NO_POLICY
        try:
            return wf.start_policy(schedule.state, max_payload_bytes=self.settings.max_payload_bytes)
        except errors.InvalidArgument as exc:
            log.error("schedule %s: its workflow's flow control could not be applied (%s); "
                      "starting without it", schedule.name, exc)
            return NO_POLICY

    def _target(self, schedule: Schedule) -> tuple[str, str]:
        """The first step and queue: from the code if registered here, else as stored."""
        wf = self.registry.find(schedule.workflow, schedule.version)
        if wf is None or not wf.steps:
            return schedule.step, schedule.queue
        return wf.first.name, wf.queue_for(wf.first)
