"""Cron schedules: their rows, and firing due occurrences.

Firing is one transaction per batch: the due schedule rows are locked with ``FOR UPDATE
SKIP LOCKED`` (a second coordinator skips them), each occurrence's run is inserted under the
workflow_id ``cron:<name>:<occurrence>`` (a second insert of one occurrence is a no-op, even
without the lock), and ``next_fire_at`` advances -- all committed together.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from durable_celery import errors
from durable_celery.storage import flow
from durable_celery.storage.engine import EngineHolder
from durable_celery.storage.records import Dispatch
from durable_celery.storage.sql import NOTIFY
from durable_celery.storage.sql import q as _q
from durable_celery.storage.store import Store

COLUMNS = ("name, workflow, version, step, queue, cron, timezone, state, catchup, priority, "
           "paused, next_fire_at, last_fired_at, created_at, updated_at")

UPSERT = _q(f"""
INSERT INTO {{S}}.schedules (name, workflow, version, step, queue, cron, timezone, state,
                             catchup, priority, next_fire_at)
VALUES (:name, :workflow, :version, :step, :queue, :cron, :timezone, CAST(:state AS jsonb),
        :catchup, :priority, :next_fire_at)
ON CONFLICT (name) DO UPDATE SET
  workflow = EXCLUDED.workflow, version = EXCLUDED.version, step = EXCLUDED.step,
  queue = EXCLUDED.queue, state = EXCLUDED.state, catchup = EXCLUDED.catchup,
  priority = EXCLUDED.priority,
  -- Re-declaring an unchanged schedule (every process start) keeps its place in time.
  next_fire_at = CASE WHEN schedules.cron = EXCLUDED.cron
                       AND schedules.timezone = EXCLUDED.timezone
                      THEN schedules.next_fire_at ELSE EXCLUDED.next_fire_at END,
  cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, updated_at = now()
RETURNING {COLUMNS}
""")

GET = _q(f"SELECT {COLUMNS} FROM {{S}}.schedules WHERE name = :name")
LIST = _q(f"SELECT {COLUMNS} FROM {{S}}.schedules ORDER BY name")
PAUSE = _q(f"""
UPDATE {{S}}.schedules SET paused = true, updated_at = now() WHERE name = :name
RETURNING {COLUMNS}""")
RESUME = _q(f"""
UPDATE {{S}}.schedules SET paused = false, next_fire_at = :next_fire_at, updated_at = now()
WHERE name = :name AND paused
RETURNING {COLUMNS}""")
DELETE = _q("DELETE FROM {S}.schedules WHERE name = :name")

# The database's clock decides what is due (``:now`` only in tests): a coordinator whose
# host clock runs ahead never fires early.
DUE = _q(f"""
SELECT {COLUMNS}, COALESCE(CAST(:now AS timestamptz), now()) AS at FROM {{S}}.schedules
WHERE NOT paused AND next_fire_at <= COALESCE(CAST(:now AS timestamptz), now())
ORDER BY priority DESC, next_fire_at
LIMIT :limit
FOR UPDATE SKIP LOCKED
""")

ADVANCE = _q("""
UPDATE {S}.schedules SET next_fire_at = :next_fire_at,
    last_fired_at = COALESCE(CAST(:last_fired_at AS timestamptz), last_fired_at),
    updated_at = now()
WHERE name = :name
""")

NEXT = _q("SELECT EXTRACT(EPOCH FROM min(next_fire_at) - COALESCE(CAST(:now AS timestamptz), "
           "now()))::float8 FROM {S}.schedules WHERE NOT paused")


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """A cron schedule, as ``durable.list_schedules()`` returns it."""

    name: str
    workflow: str
    version: int
    step: str
    queue: str
    cron: str
    timezone: str
    state: Any
    catchup: str
    priority: int
    paused: bool
    next_fire_at: datetime
    last_fired_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Schedule:
        return cls(**{k: row[k] for k in COLUMNS.replace(" ", "").split(",")})


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What to do with one due schedule: the occurrences to fire (UTC), and the next one."""

    fire: Sequence[datetime]
    next_fire_at: datetime


def run_id(name: str, occurrence: datetime) -> str:
    """The workflow_id (and key) of one occurrence's run."""
    return f"cron:{name}:{occurrence.strftime('%Y-%m-%dT%H:%M:%SZ')}"


class ScheduleStore:
    def __init__(self, holder: EngineHolder, store: Store) -> None:
        self.db = holder
        self.store = store

    def upsert(self, *, name: str, workflow: str, version: int, step: str, queue: str,
               cron: str, timezone: str, state: str, catchup: str, priority: int,
               next_fire_at: datetime) -> Schedule:
        with self.db.begin() as conn:
            row = conn.execute(UPSERT, {
                "name": name, "workflow": workflow, "version": version, "step": step,
                "queue": queue, "cron": cron, "timezone": timezone, "state": state,
                "catchup": catchup, "priority": priority, "next_fire_at": next_fire_at,
            }).mappings().one()
            conn.execute(NOTIFY)  # coordinators re-plan their sleep
        return Schedule.from_row(row)

    def get(self, name: str) -> Schedule | None:
        with self.db.connect() as conn:
            row = conn.execute(GET, {"name": name}).mappings().first()
        return None if row is None else Schedule.from_row(row)

    def all(self) -> list[Schedule]:
        with self.db.connect() as conn:
            return [Schedule.from_row(r) for r in conn.execute(LIST).mappings()]

    def pause(self, name: str) -> Schedule:
        with self.db.begin() as conn:
            row = conn.execute(PAUSE, {"name": name}).mappings().first()
        if row is None:
            raise errors.ScheduleNotFound(f"no schedule {name!r}", name=name)
        return Schedule.from_row(row)

    def resume(self, name: str, next_fire_at: Callable[[Schedule], datetime]) -> Schedule:
        """Unpause; the occurrences missed while paused are skipped (``next_fire_at``)."""
        with self.db.begin() as conn:
            row = conn.execute(_q(GET.text + " FOR UPDATE"), {"name": name}).mappings().first()
            if row is None:
                raise errors.ScheduleNotFound(f"no schedule {name!r}", name=name)
            current = Schedule.from_row(row)
            if not current.paused:
                return current
            row = conn.execute(RESUME, {"name": name, "next_fire_at": next_fire_at(current)},
                               ).mappings().one()
            conn.execute(NOTIFY)
        return Schedule.from_row(row)

    def delete(self, name: str) -> None:
        with self.db.begin() as conn:
            if not conn.execute(DELETE, {"name": name}).rowcount:
                raise errors.ScheduleNotFound(f"no schedule {name!r}", name=name)

    def seconds_to_next(self, now: datetime | None = None) -> float | None:
        """Seconds until the next occurrence, by the database's clock (or ``now``)."""
        with self.db.connect() as conn:
            value = conn.execute(NEXT, {"now": now}).scalar()
        return None if value is None else float(value)

    def fire_due(self, now: datetime | None, plan: Callable[[Schedule, datetime], Plan],
                 target: Callable[[Schedule], tuple[str, str]], *, limit: int,
                 policy: Callable[[Schedule], flow.StartPolicy] | None = None,
                 ) -> tuple[list[Dispatch], int]:
        """Fire what is due at ``now`` (None: the database's clock); returns (messages to
        publish after commit, runs started). ``plan(schedule, at)`` decides the
        occurrences; ``target`` gives a schedule's (first step, queue)."""
        dispatches: list[Dispatch] = []
        started = 0
        with self.db.begin() as conn:
            for row in conn.execute(DUE, {"now": now, "limit": limit}).mappings().all():
                schedule = Schedule.from_row(row)
                decided = plan(schedule, row["at"])
                step, queue = target(schedule)
                for occurrence in decided.fire:
                    wid = run_id(schedule.name, occurrence)
                    try:
                        found = self.store.start_on(
                            conn, wid, workflow=schedule.workflow, version=schedule.version,
                            step=step, queue=queue, run_queue=None,
                            state=_json_text(schedule.state), key=wid, delay=0.0, at=None,
                            priority=schedule.priority, parent_id=None, forked_from=None,
                            app_version=None, concurrency_key=None,
                            redispatch=self.store.redispatch_after,
                            policy=flow.NO_POLICY if policy is None else policy(schedule))
                    except errors.DuplicateWorkflow:
                        continue  # this occurrence already fired (or a singleton is live)
                    except errors.Throttled:
                        continue  # a dropping throttle refused this occurrence
                    if found is None:
                        continue
                    publish = found[1]
                    started += 1
                    if publish:
                        dispatches.append(Dispatch(workflow_id=wid, workflow=schedule.workflow,
                                                   step=step, seq=0, queue=queue,
                                                   priority=schedule.priority))
                conn.execute(ADVANCE, {
                    "name": schedule.name, "next_fire_at": decided.next_fire_at,
                    "last_fired_at": max(decided.fire) if decided.fire else None})
        return dispatches, started


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
