"""The coordinator's statements (dispatch, await deadlines, reaper, GC), the worker registry
and the test kit's shortcuts: a mixin of :class:`~durable_celery.storage.store.Store`."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import psycopg

from durable_celery.storage import composition
from durable_celery.storage.engine import EngineHolder, driver_sql, translate_errors
from durable_celery.storage.records import Claim, Dispatch
from durable_celery.storage.sql import DISPATCH_COLUMNS, NOTIFY
from durable_celery.storage.sql import q as _q

# --- sweeps

# A timer's message is taken up by the worker TAKE_UP_EARLY seconds before the step is due;
# any claim may come up to CLAIM_AHEAD seconds early, and the executor sleeps out the rest,
# so the step starts on the dot, never before (both by the database's clock).
TAKE_UP_EARLY = 0.015
CLAIM_AHEAD = 0.025


def eta_for(now: float, wait: float | None, lead: float) -> float | None:
    """When (epoch seconds, this host) a worker should take up a message for a step due in
    ``wait`` seconds; None: at once. Never more than ``lead`` ahead of ``now``."""
    if wait is None or wait <= TAKE_UP_EARLY:
        return None
    return now + min(wait, lead) - TAKE_UP_EARLY


# Rows due within ``:lead`` seconds are published now, each with the seconds it has left
# (``wait``, made a Celery eta): the worker holds the message and claims just before the due
# time, so a timer's overshoot is not this statement, the publish and the delivery.
DISPATCH_DUE = _q("""
WITH due AS (
  SELECT id, dispatch_at FROM {S}.runs
  WHERE status IN ('runnable', 'compensating') AND owner IS NULL
    AND dispatch_at <= now() + make_interval(secs => :lead)
  ORDER BY priority DESC, dispatch_at
  LIMIT :limit
  FOR UPDATE SKIP LOCKED
), sent AS (
  UPDATE {S}.runs AS r SET
    dispatched_at = now(), dispatch_count = r.dispatch_count + 1, updated_at = now(),
    dispatch_at = GREATEST(r.eligible_at, now()) + make_interval(secs => LEAST(
        :redispatch * power(2, LEAST(r.dispatch_count, 30)), :max_backoff))
  FROM due WHERE r.id = due.id
  RETURNING r.id, r.workflow, r.step, r.seq, r.queue, r.priority, due.dispatch_at AS due_at,
            EXTRACT(EPOCH FROM r.eligible_at - clock_timestamp())::float8 AS wait
)
-- UPDATE ... RETURNING keeps no order: publish the highest priority first, as picked.
SELECT id, workflow, step, seq, queue, priority, wait FROM sent
ORDER BY priority DESC, due_at
""")

# Does this lease still hold the run (a claim taken ahead of the due time, before its step)?
HOLDS = _q("""
SELECT 1 FROM {S}.runs
WHERE id = :id AND lease = :lease AND (status = 'executing' OR status = 'compensating')
""")

# How long a runnable step at this seq has until it is due (a claim that came early).
UNTIL_ELIGIBLE = _q("""
SELECT EXTRACT(EPOCH FROM eligible_at - now())::float8 FROM {S}.runs
WHERE id = :id AND seq = :seq AND NOT held AND eligible_at > now()
  AND (status = 'runnable' OR (status = 'compensating' AND owner IS NULL))
""")

EXPIRE_AWAITS = _q("""
WITH due AS (
  SELECT id FROM {S}.runs
  WHERE status = 'awaiting' AND await_deadline <= now()
  ORDER BY await_deadline
  LIMIT :limit
  FOR UPDATE SKIP LOCKED
)
UPDATE {S}.runs AS r SET
  status = 'runnable', timed_out = true, await_names = NULL, await_deadline = NULL,
  await_all = false, eligible_at = now(),
  dispatch_at = CASE WHEN r.held THEN NULL ELSE now() + make_interval(secs => :redispatch) END,
  dispatched_at = CASE WHEN r.held THEN NULL ELSE now() END,
  dispatch_count = CASE WHEN r.held THEN 0 ELSE 1 END, updated_at = now()
FROM due WHERE r.id = due.id
RETURNING r.id, r.workflow, r.step, r.seq, r.queue, r.priority, r.held
""")

# When the dispatcher has work next: a timer ``:lead`` seconds before it is due (it is
# published that far ahead), an await deadline or a run deadline when it passes.
NEXT_DUE = _q("""
SELECT LEAST(
  (SELECT min(dispatch_at) FROM {S}.runs
    WHERE status IN ('runnable', 'compensating') AND owner IS NULL)
    - make_interval(secs => :lead),
  (SELECT min(await_deadline) FROM {S}.runs
    WHERE status = 'awaiting' AND await_deadline IS NOT NULL),
  d.at
) - now(), d.at - now()
FROM (SELECT min(deadline_at) AS at FROM {S}.runs
      WHERE deadline_at IS NOT NULL AND finished_at IS NULL) AS d
""")

# A lost step (its worker's heartbeat is stale) runs again: runnable (a compensation stays
# compensating) at attempt + 1, error WorkerLost. One lost max_recoveries times is left
# as it is (still held by the dead lease) and named in the result: the reaper decides its
# end with the compensation transition (runtime/outcomes.py, the one owner of it) and
# commits it through COMMIT under that lease, as a worker would have.
# Never waits on a lock: lost runs are taken with SKIP LOCKED.
REAP = _q("""
WITH lost AS (
  SELECT r.id, r.recoveries + 1 >= :max_recoveries AS exhausted
  FROM {S}.runs AS r
  WHERE r.status IN ('executing', 'compensating')
    -- The claim itself proves the owner was alive then: a worker re-registering after a
    -- stall is not reaped for claims it made since. (A compensating run waiting for a
    -- claim has no started_at.)
    AND r.started_at < now() - make_interval(secs => :stale)
    AND NOT EXISTS (SELECT 1 FROM {S}.workers AS w
                    WHERE w.id = r.owner
                      AND w.heartbeat_at >= now() - make_interval(secs => :stale))
  LIMIT :limit
  FOR UPDATE OF r SKIP LOCKED
), upd AS (
  UPDATE {S}.runs AS r SET
    status = CASE WHEN r.status = 'compensating' THEN 'compensating' ELSE 'runnable' END,
    attempt = r.attempt + 1, recoveries = r.recoveries + 1,
    token_seq = NULL,  -- running the step again is a new start: it takes new tokens
    error = jsonb_build_object('type', 'WorkerLost',
                               'message', 'worker lost (' || (r.recoveries + 1) || ' times)',
                               'worker', r.owner),
    owner = NULL, lease = NULL, started_at = NULL, updated_at = now(), eligible_at = now(),
    dispatch_at = now() + make_interval(secs => :redispatch),
    dispatched_at = now(), dispatch_count = 1
  FROM lost WHERE r.id = lost.id AND NOT lost.exhausted
  RETURNING r.id, r.workflow, r.step, r.seq, r.queue, r.priority, r.status, r.parent_id,
            r.spawn_seq
)
SELECT id, workflow, step, seq, queue, priority, status, parent_id, spawn_seq,
       false AS exhausted FROM upd
UNION ALL
SELECT id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true FROM lost WHERE exhausted
""")

# A run lost max_recoveries times, as a claim under its dead owner's lease (see REAP).
LOST_FOR_GOOD = _q("""
SELECT r.id, r.workflow, r.version, r.step, r.seq, r.visit, r.attempt, r.state, r.key,
       r.run_queue, r.queue, r.priority, r.timed_out, r.concurrency_key, r.parent_id,
       r.status, r.compensations, r.compensation_errors, r.failure, r.single_step,
       r.lease, r.owner, r.started_at, r.recoveries + 1 AS losses, r.token_seq,
       NULL::jsonb AS children, NULL::jsonb AS signals
FROM {S}.runs AS r WHERE r.id = ANY(:ids) AND r.lease IS NOT NULL
""")

DELETE_DEAD_WORKERS = _q("""
DELETE FROM {S}.workers
WHERE heartbeat_at < now() - make_interval(secs => :stale)
  AND NOT EXISTS (SELECT 1 FROM {S}.runs AS r WHERE r.status IN ('executing', 'compensating')
                  AND r.owner = workers.id)
""")

# Retention deletes whole finished trees: a run without a parent (or whose parent is gone)
# finished longer than :retention ago, with every descendant (history and signals go by
# cascade). A tree is left alone while any of its runs is live or locked: a resume of the
# root or of a child in flight (its row is locked, then live) keeps the children its join
# step reads, and a child resumed after its parent ended keeps its tree.
GC = _q("""
WITH RECURSIVE roots AS (
  SELECT r.id FROM {S}.runs AS r
  WHERE r.finished_at < now() - make_interval(secs => :retention)
    AND (r.parent_id IS NULL
         OR NOT EXISTS (SELECT 1 FROM {S}.runs AS p WHERE p.id = r.parent_id))
  ORDER BY r.finished_at
  LIMIT :limit
  FOR UPDATE SKIP LOCKED
), tree AS (
  SELECT id AS root, id, 0 AS depth FROM roots
  UNION ALL
  SELECT t.root, c.id, t.depth + 1 FROM {S}.runs AS c JOIN tree AS t ON c.parent_id = t.id
  WHERE t.depth < 100
), locked AS (
  SELECT c.id FROM {S}.runs AS c
  WHERE c.id IN (SELECT id FROM tree WHERE depth > 0) AND c.finished_at IS NOT NULL
  FOR UPDATE SKIP LOCKED
), doomed AS (
  SELECT t.root FROM tree AS t LEFT JOIN locked AS l ON l.id = t.id
  GROUP BY t.root
  HAVING bool_and(t.depth = 0 OR l.id IS NOT NULL)
)
DELETE FROM {S}.runs WHERE id IN (SELECT t.id FROM tree AS t JOIN doomed USING (root))
""")

EXPIRE_EARLY_SIGNALS = _q("""
DELETE FROM {S}.early_signals WHERE id IN (
  SELECT id FROM {S}.early_signals WHERE expires_at <= now()
  ORDER BY expires_at LIMIT :limit FOR UPDATE SKIP LOCKED
)
""")

# --- workers

REGISTER_WORKER = _q("""
INSERT INTO {S}.workers (id, hostname, pid, nodename) VALUES (:id, :hostname, :pid, :nodename)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()
""")

HEARTBEAT = _q("""
UPDATE {S}.workers SET heartbeat_at = now()
FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
WHERE id = :id
""")
HEARTBEAT_SQL = driver_sql(HEARTBEAT)

RELEASE_OWNED = _q("""
UPDATE {S}.runs
SET status = CASE WHEN status = 'compensating' THEN 'compensating' ELSE 'runnable' END,
    owner = NULL, lease = NULL, started_at = NULL,
    -- A run claimed just ahead of its due time stays due then (never earlier).
    updated_at = now(), eligible_at = GREATEST(eligible_at, now()), dispatch_at = now(),
    dispatched_at = NULL,
    dispatch_count = 0
WHERE status IN ('executing', 'compensating') AND owner = :id
""")

DELETE_WORKER = _q("DELETE FROM {S}.workers WHERE id = :id")

# The safety net of HANDOFF: keys that no run executes, whose waiters nobody was sent for
# ``quiet`` seconds (a cancel or the reaper freed the key): the head waiter (compensations
# first, as HANDOFF) is due now. A head whose row is locked is left for the next pass: this
# runs first in every dispatcher pass and must never wait on a lock.
WAKE_FREE_KEYS = _q("""
UPDATE {S}.runs SET dispatch_at = now(), dispatch_count = 0, updated_at = now()
WHERE id IN (
  SELECT r.id FROM {S}.runs AS r
  WHERE r.id IN (
    SELECT DISTINCT ON (w.concurrency_key) w.id FROM {S}.runs AS w
    WHERE w.concurrency_key IS NOT NULL AND w.eligible_at <= now() AND w.dispatch_at > now()
      AND ((w.status = 'runnable' AND NOT w.held)
           OR (w.status = 'compensating' AND w.owner IS NULL))
      AND NOT EXISTS (SELECT 1 FROM {S}.runs AS e WHERE e.concurrency_key = w.concurrency_key
                      AND (e.status = 'executing'
                           OR (e.status = 'compensating' AND e.owner IS NOT NULL)
                           OR (e.status IN ('runnable', 'compensating') AND e.owner IS NULL
                               AND (e.dispatch_at <= now()
                                    OR e.dispatched_at > now() - make_interval(secs => :quiet)))))
    ORDER BY w.concurrency_key, (w.status = 'compensating') DESC, w.priority DESC,
             w.eligible_at, w.created_at, w.id
    LIMIT :limit)
  FOR UPDATE SKIP LOCKED
)
""")


@dataclass(frozen=True, slots=True, kw_only=True)
class Reaped:
    """What a reaper statement did: runs to publish again (they run again), and runs lost
    once too often, whose end the reaper decides and commits (``Store.commit``)."""

    publish: list[Dispatch]
    lost: list[Lost]


@dataclass(frozen=True, slots=True, kw_only=True)
class Lost:
    """A run whose worker died ``losses`` times: the step it held, as a claim."""

    claim: Claim
    owner: str | None
    started_at: Any
    losses: int


class SweepStore:
    """Sweeps, workers and test shortcuts (``Store`` inherits them)."""

    db: EngineHolder
    redispatch_after: float
    redispatch_max_backoff: float

    # ------------------------------------------------------------------ sweeps

    def dispatch_due(self, limit: int, *, lead: float = 0.0) -> list[Dispatch]:
        """Mark due rows dispatched (and rows due within ``lead`` seconds, with their
        countdown); the caller publishes them."""
        with self.db.connect() as conn:
            rows = conn.execute(DISPATCH_DUE, {
                "limit": limit, "lead": lead, "redispatch": self.redispatch_after,
                "max_backoff": self.redispatch_max_backoff}).mappings().all()
        now = time.time()
        return [replace(Dispatch.from_row(r), eta=eta_for(now, r["wait"], lead))
                for r in rows]

    def seconds_until_eligible(self, workflow_id: str, seq: int) -> float | None:
        """Seconds until the runnable step at ``seq`` is due; None if it is not waiting."""
        with self.db.connect() as conn:
            value = conn.execute(UNTIL_ELIGIBLE, {"id": workflow_id, "seq": seq}).scalar()
        return None if value is None else float(value)

    def holds(self, workflow_id: str, lease: str) -> bool:
        """True while ``lease`` holds the run (not cancelled, released or reclaimed)."""
        with self.db.connect() as conn:
            return conn.execute(HOLDS, {"id": workflow_id, "lease": lease}).first() is not None

    def wake_free_keys(self, limit: int, *, quiet: float) -> int:
        with self.db.begin() as conn:
            return int(conn.execute(WAKE_FREE_KEYS, {"limit": limit, "quiet": quiet}).rowcount)

    def expire_awaits(self, limit: int) -> list[Dispatch]:
        with self.db.connect() as conn:
            rows = conn.execute(EXPIRE_AWAITS, {
                "limit": limit, "redispatch": self.redispatch_after}).mappings().all()
        return [Dispatch.from_row(r) for r in rows if not r["held"]]

    def seconds_to_next_due(self, *, lead: float = 0.0) -> tuple[float | None, float | None]:
        """Seconds until the dispatcher has work (timers count ``lead`` seconds early), and
        until the nearest run deadline (the deadline sweep's work)."""
        with self.db.connect() as conn:
            row = conn.execute(NEXT_DUE, {"lead": lead}).one()
        return tuple(None if v is None else v.total_seconds() for v in row)  # type: ignore[return-value]

    def reap(self, *, stale_after: float, max_recoveries: int, limit: int) -> Reaped:
        """Return runs of dead workers to runnable (or compensating); the ones that ran out
        of recoveries end failed and count on their parents."""
        with self.db.begin() as conn:
            rows = conn.execute(REAP, {"stale": stale_after, "max_recoveries": max_recoveries,
                                       "limit": limit, "redispatch": self.redispatch_after,
                                       }).mappings().all()
            ids = [r["id"] for r in rows if r["exhausted"]]
            lost = [Lost(claim=Claim.from_row(r, lease=r["lease"]), owner=r["owner"],
                         started_at=r["started_at"], losses=r["losses"])
                    for r in (conn.execute(LOST_FOR_GOOD, {"ids": ids}).mappings().all()
                              if ids else ())]
            conn.execute(DELETE_DEAD_WORKERS, {"stale": stale_after})
        return Reaped(publish=[Dispatch.from_row(r) for r in rows if not r["exhausted"]],
                      lost=lost)

    def pay_owed_slots(self, limit: int) -> list[Dispatch]:
        """Release held foreach children whose release was skipped (their row was locked);
        returns the children to publish."""
        with self.db.begin() as conn:
            return composition.pay_owed(conn, limit=limit, redispatch=self.redispatch_after)

    def collect_garbage(self, *, retention_seconds: float, limit: int) -> int:
        with self.db.begin() as conn:
            return int(conn.execute(GC, {"retention": retention_seconds,
                                         "limit": limit}).rowcount)

    def expire_early_signals(self, limit: int) -> int:
        """Drop signals kept for a target that never got a run; returns how many."""
        with self.db.connect() as conn:
            return int(conn.execute(EXPIRE_EARLY_SIGNALS, {"limit": limit}).rowcount)

    # ------------------------------------------------------------------ workers

    def register_worker(self, worker_id: str, *, hostname: str, pid: int,
                        nodename: str | None) -> None:
        with self.db.begin() as conn:
            conn.execute(REGISTER_WORKER, {"id": worker_id, "hostname": hostname, "pid": pid,
                                           "nodename": nodename})

    def deregister_worker(self, worker_id: str) -> int:
        """Release what this worker holds at once and remove its row."""
        with self.db.begin() as conn:
            released = conn.execute(RELEASE_OWNED, {"id": worker_id}).rowcount
            conn.execute(DELETE_WORKER, {"id": worker_id})
            if released:
                conn.execute(NOTIFY)
        return int(released)

    # ------------------------------------------------------------------ test kit

    def collapse_timers(self, *, expire_awaits: bool) -> int:
        """Make every timer due now (testing.drain)."""
        sql = "UPDATE {S}.runs SET eligible_at = now(), dispatch_at = now() " \
              "WHERE status IN ('runnable', 'compensating') AND owner IS NULL AND NOT held " \
              "AND eligible_at > now()"
        with self.db.begin() as conn:
            n = conn.execute(_q(sql)).rowcount
            if expire_awaits:
                n += conn.execute(_q(
                    "UPDATE {S}.runs SET await_deadline = now() "
                    "WHERE status = 'awaiting' AND await_deadline > now()")).rowcount
        return int(n)

    def runnable_now(self, limit: int) -> list[Dispatch]:
        with self.db.connect() as conn:
            rows = conn.execute(_q(
                f"SELECT {DISPATCH_COLUMNS} FROM {{S}}.runs "
                "WHERE status IN ('runnable', 'compensating') AND owner IS NULL AND NOT held "
                "AND eligible_at <= now() ORDER BY priority DESC, eligible_at LIMIT :limit"),
                {"limit": limit}).mappings().all()
        return [Dispatch.from_row(r) for r in rows]


class HeartbeatLine:
    """A worker process's heartbeats, on a connection of their own.

    Never queued behind the pool, and every beat bounded (``statement_timeout``, TCP
    keepalives, ``tcp_user_timeout``): a beat that cannot finish fails within the interval
    and the next one tries a fresh connection, so a live process never looks dead because
    one statement waited (on a lock, a half-open socket after a failover).
    """

    def __init__(self, holder: EngineHolder, *, timeout: float) -> None:
        self.holder = holder
        self.timeout = timeout
        self._conn: psycopg.Connection[Any] | None = None

    def beat(self, worker_id: str) -> bool:
        """Beat; False when the row is gone (the process was reaped: register again)."""
        with translate_errors():
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self.holder.dedicated(statement_timeout=self.timeout,
                                                       connect_timeout=self.timeout)
                return self._conn.execute(HEARTBEAT_SQL, {"id": worker_id}).rowcount > 0
            except psycopg.Error:
                self.close()
                raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
