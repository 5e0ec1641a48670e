"""The statements of a run's life (start, claim, commit, signals, reads), behind one small
class; the coordinator's and the worker registry's are in ``sweeps``, composition's in
``composition``, the controls' in ``controls``.

Each state transition is one guarded statement; zero rows back means "lost the race or
nothing to do", and the caller decides. Locks are always taken in the same order: the run
row first, then its signals.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from psycopg.rows import dict_row

from durable_celery import errors
from durable_celery.storage import composition, flow
from durable_celery.storage.engine import EngineHolder, driver_sql
from durable_celery.storage.records import (
    TERMINAL,
    Claim,
    Committed,
    Dispatch,
    Run,
    SignalResult,
    Status,
    StepRecord,
    Transition,
)
from durable_celery.storage.sql import DISPATCH_COLUMNS, KEY_HELD, NOTIFY
from durable_celery.storage.sql import q as _q
from durable_celery.storage.sweeps import (
    SweepStore,
)

RUN_COLUMNS = (
    "id, workflow, version, status, step, seq, attempt, state, input, result, error, key, "
    "queue, priority, parent_id, eligible_at, await_names, await_deadline, created_at, "
    "updated_at, finished_at, forked_from, children_pending"
)

# ---------------------------------------------------------------------------- statements

START = _q("""
INSERT INTO {S}.runs (id, workflow, version, queue, run_queue, priority, status, step, state,
                      input, key, eligible_at, dispatch_at, dispatched_at, dispatch_count,
                      parent_id, forked_from, app_version, concurrency_key, key_reuse,
                      token_seq, waiting_for, deadline_at, debounce_key, singleton_key, held)
SELECT :id, :workflow, :version, :queue, :run_queue, :priority, 'runnable', :step,
       CAST(:state AS jsonb), CAST(:state AS jsonb), :key, t.due,
       CASE WHEN :held THEN NULL WHEN t.due > now() THEN t.due
            ELSE now() + make_interval(secs => :redispatch) END,
       CASE WHEN t.due > now() OR :held THEN NULL ELSE now() END,
       CASE WHEN t.due > now() OR :held THEN 0 ELSE 1 END,
       :parent_id, :forked_from, :app_version, :concurrency_key, :key_reuse,
       CAST(:token_seq AS integer), CAST(:waiting AS jsonb),
       COALESCE(CAST(:deadline_at AS timestamptz),
                now() + make_interval(secs => CAST(:deadline AS float8))),
       :debounce_key, :singleton_key, :held
FROM (SELECT GREATEST(now(), COALESCE(CAST(:at AS timestamptz),
                                      now() + make_interval(secs => :delay))) AS due) AS t
ON CONFLICT DO NOTHING
RETURNING id, eligible_at > now() AS delayed, held
""")

# Who holds the id or the key a start could not take (the key: as runs_key_idx says).
FIND_CONFLICT = _q(f"""
SELECT id, status, key_reuse FROM {{S}}.runs
WHERE id = :id OR (CAST(:key AS text) IS NOT NULL AND key = :key AND {KEY_HELD})
ORDER BY (id = :id) DESC, (finished_at IS NULL) DESC LIMIT 1
""")

START_MANY = _q("""
INSERT INTO {S}.runs (id, workflow, version, queue, run_queue, priority, status, step, state,
                      input, key, eligible_at, dispatch_at, dispatched_at, dispatch_count,
                      key_reuse)
SELECT i.id, :workflow, :version, :queue, :run_queue, 0, 'runnable', :step,
       CAST(i.state AS jsonb), CAST(i.state AS jsonb), i.key, t.due,
       CASE WHEN t.due > now() THEN t.due ELSE now() + make_interval(secs => :redispatch) END,
       CASE WHEN t.due > now() THEN NULL ELSE now() END,
       CASE WHEN t.due > now() THEN 0 ELSE 1 END, :key_reuse
FROM unnest(CAST(:ids AS text[]), CAST(:states AS text[]), CAST(:keys AS text[]))
         WITH ORDINALITY AS i(id, state, key, n),
     (SELECT GREATEST(now(), COALESCE(CAST(:at AS timestamptz),
                                      now() + make_interval(secs => :delay))) AS due) AS t
ORDER BY i.n
ON CONFLICT DO NOTHING
RETURNING id, eligible_at > now() AS delayed
""")

FIND_CONFLICTS = _q(f"""
SELECT id, key, status, key_reuse FROM {{S}}.runs
WHERE id = ANY(CAST(:ids AS text[]))
   OR (key = ANY(CAST(:keys AS text[])) AND {KEY_HELD})
""")

UNPUBLISHED = _q("""
UPDATE {S}.runs SET dispatch_at = now() + make_interval(secs => :after), dispatched_at = NULL
WHERE id = ANY(CAST(:ids AS text[]))
  AND (status = 'runnable' OR (status = 'compensating' AND owner IS NULL))
""")

# A compensating run keeps its status while a compensation executes (the owner tells).
# A timer's message, published ahead (timer_lead), may claim up to :ahead seconds before the
# step is due; the executor then sleeps out ``due_in`` and starts the step on the dot.
# A claim (and a heartbeat) commits with synchronous_commit off, set inside the statement so
# it costs no round trip: losing one in a server crash only makes the step run again. The
# outcome commit that follows is fully durable, and flushes the claim's WAL with it.
CLAIM = _q("""
UPDATE {S}.runs AS r
SET status = CASE WHEN r.status = 'compensating' THEN 'compensating' ELSE 'executing' END,
    owner = :owner, lease = :lease, started_at = GREATEST(now(), r.eligible_at), updated_at = now()
FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
WHERE r.id = :id AND r.seq = :seq AND NOT r.held
  AND r.eligible_at <= now() + make_interval(secs => :ahead)
  AND (r.status = 'runnable' OR (r.status = 'compensating' AND r.owner IS NULL))
  -- A concurrency key held by an executing run, or a due run ahead of this one in the key's
  -- queue (compensations first, then priority, then age: first come, first served): stay
  -- runnable; the holder's commit hands the key to the head (HANDOFF). Racing claims meet
  -- the unique index.
  AND (r.concurrency_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM {S}.runs AS e
        WHERE e.concurrency_key = r.concurrency_key AND e.id <> r.id
          AND (e.status = 'executing' OR (e.status = 'compensating' AND e.owner IS NOT NULL)
               OR (((e.status = 'runnable' AND NOT e.held)
                    OR (e.status = 'compensating' AND e.owner IS NULL))
                   AND e.eligible_at <= now() + make_interval(secs => :ahead)
                   AND ((e.status = 'compensating') > (r.status = 'compensating')
                        OR ((e.status = 'compensating') = (r.status = 'compensating')
                            AND (e.priority > r.priority
                                 OR (e.priority = r.priority
                                     AND (e.eligible_at, e.created_at, e.id)
                                         < (r.eligible_at, r.created_at, r.id)))))))))
RETURNING r.id, r.workflow, r.version, r.step, r.seq, r.visit, r.attempt, r.state, r.key, r.run_queue,
          r.queue, r.priority, r.timed_out, r.started_at, r.concurrency_key, r.parent_id,
          r.status, r.token_seq,
          r.compensations, r.compensation_errors, r.failure, r.single_step,
          EXTRACT(EPOCH FROM r.eligible_at - clock_timestamp())::float8 AS due_in,
          (SELECT jsonb_agg(jsonb_build_object('index', c.child_index, 'workflow_id', c.id,
                                               'workflow', c.workflow, 'status', c.status,
                                               'result', c.result, 'error', c.error,
                                               'key', c.key) ORDER BY c.child_index)
             FROM {S}.runs AS c
            WHERE c.parent_id = r.id AND c.spawn_seq = r.visit) AS children,
          (SELECT jsonb_agg(jsonb_build_object('id', s.id, 'name', s.name, 'payload', s.payload,
                                               'dedup_key', s.dedup_key,
                                               'created_at', s.created_at) ORDER BY s.id)
             FROM {S}.signals AS s
            WHERE s.run_id = r.id AND s.delivered_at IS NOT NULL
              AND s.consumed_at IS NULL) AS signals
""")

RELEASE = _q("""
UPDATE {S}.runs
SET status = CASE WHEN status = 'compensating' THEN 'compensating' ELSE 'runnable' END,
    owner = NULL, lease = NULL, started_at = NULL, updated_at = now(),
    dispatch_at = now() + make_interval(secs => :after), dispatched_at = NULL, dispatch_count = 0
WHERE id = :id AND lease = :lease AND status IN ('executing', 'compensating')
""")

SET_LOCK_TIMEOUT = _q("SELECT set_config('lock_timeout', :ms, true)")

COMMIT = _q("""
WITH r AS (
  UPDATE {S}.runs SET
    status = :status, step = :step, queue = :queue, seq = seq + 1, attempt = :attempt,
    -- A retry or an ending keeps the visit: a resumed step is the same visit (its
    -- idempotency key and, for a join step, its children stay the same).
    visit = CASE WHEN :outcome = 'retry' OR :terminal THEN visit ELSE seq + 1 END,
    recoveries = 0,
    state = CAST(:state AS jsonb), result = CAST(:result AS jsonb), error = CAST(:error AS jsonb),
    eligible_at = COALESCE(CAST(:until AS timestamptz), now() + make_interval(secs => :delay)),
    dispatch_at = CASE WHEN :status IN ('runnable', 'compensating') THEN
        CASE WHEN :publish THEN now() + make_interval(secs => :redispatch)
             ELSE COALESCE(CAST(:until AS timestamptz), now() + make_interval(secs => :delay))
        END END,
    dispatched_at = CASE WHEN :publish THEN now() END,
    dispatch_count = CASE WHEN :publish THEN 1 ELSE 0 END,
    await_names = CAST(:await_names AS text[]), await_all = :await_all,
    children_pending = :children_pending, spawn_cap = :spawn_cap, spawn_owed = 0,
    compensations = CASE
        WHEN CAST(:compensations AS jsonb) IS NOT NULL THEN CAST(:compensations AS jsonb)
        WHEN CAST(:comp_push AS jsonb) IS NOT NULL
          THEN compensations || jsonb_build_array(CAST(:comp_push AS jsonb)
                                                  || jsonb_build_object('seq', seq + 1))
        ELSE compensations END,
    compensation_errors = COALESCE(CAST(:compensation_errors AS jsonb), compensation_errors),
    failure = COALESCE(CAST(:failure AS jsonb), failure),
    waiting_for = NULL,
    await_deadline = now() + make_interval(secs => CAST(:deadline AS double precision)),
    -- A retry or a failure keeps the visit's signals (not consumed) and its timeout: the
    -- next attempt, or a resume, sees what this one saw.
    timed_out = CASE WHEN :consume THEN false ELSE timed_out END,
    owner = CASE WHEN :status = 'executing' THEN owner END,
    lease = CASE WHEN :status = 'executing' THEN lease END,
    started_at = CASE WHEN :status = 'executing' THEN now() END,
    finished_at = CASE WHEN :terminal THEN now() END,
    updated_at = now()
  WHERE id = :id AND lease = :lease AND status IN ('executing', 'compensating') AND seq = :seq
  RETURNING id, workflow, step, seq, queue, priority, status, parent_id, spawn_seq, app_version
), h AS (
  INSERT INTO {S}.steps (run_id, seq, step, attempt, outcome, next_step, state, error,
                         started_at, worker)
  SELECT r.id, r.seq, :ran_step, :ran_attempt, :outcome, :next_step, CAST(:state AS jsonb),
         CAST(:error AS jsonb), :started_at, :worker
  FROM r
), c AS (
  UPDATE {S}.signals AS s SET consumed_at = now(), consumed_seq = r.seq
  FROM r
  WHERE :consume AND s.run_id = r.id AND s.delivered_at IS NOT NULL AND s.consumed_at IS NULL
)
SELECT * FROM r
""")

# The per-step statements, run on the driver directly (EngineHolder.raw).
CLAIM_SQL = driver_sql(CLAIM)
COMMIT_SQL = driver_sql(COMMIT)

# Parking re-checks the inbox under the row lock the commit holds: a signal committed
# before the park is delivered now; one committed after finds the run awaiting. A held run
# (a foreach child queued behind the cap) wakes but is not dispatched until released.
WAKE_FROM_INBOX = _q("""
WITH d AS (
  UPDATE {S}.signals SET delivered_at = now()
  WHERE run_id = :id AND delivered_at IS NULL AND name = ANY(CAST(:names AS text[]))
  RETURNING id
)
UPDATE {S}.runs AS r SET status = 'runnable', await_names = NULL, await_deadline = NULL,
    await_all = false, eligible_at = now(),
    dispatch_at = CASE WHEN r.held THEN NULL ELSE now() + make_interval(secs => :redispatch) END,
    dispatched_at = CASE WHEN r.held THEN NULL ELSE now() END,
    dispatch_count = CASE WHEN r.held THEN 0 ELSE 1 END, updated_at = now()
WHERE r.id = :id AND r.status = 'awaiting' AND CASE
    WHEN r.await_all THEN NOT EXISTS (  -- every name has a pending signal
        SELECT 1 FROM unnest(r.await_names) AS n(name)
        WHERE NOT EXISTS (SELECT 1 FROM {S}.signals AS s WHERE s.run_id = r.id
                          AND s.name = n.name AND s.consumed_at IS NULL))
    ELSE EXISTS (SELECT 1 FROM d) END
RETURNING r.id, r.workflow, r.step, r.seq, r.queue, r.priority, r.held""")

LANDED = _q("""
SELECT r.id, r.workflow, r.step, r.seq, r.queue, r.priority,
       -- Executing under another claim (it was reclaimed since): not ours to continue.
       CASE WHEN r.owner IS NOT NULL AND r.lease IS DISTINCT FROM :lease THEN 'taken'
            ELSE r.status END AS status,
       (r.status IN ('runnable', 'compensating') AND r.owner IS NULL AND NOT r.held
        AND r.eligible_at <= now()) AS publish, r.parent_id
FROM {S}.runs AS r
JOIN {S}.steps AS h ON h.run_id = r.id AND h.seq = :seq AND h.worker = :worker AND h.step = :step
WHERE r.id = :id AND r.seq = :seq
""")

# After a commit proven by LANDED: the runs it may have made runnable (the children it
# spawned, a parent it woke, a held sibling it released), to publish again. A duplicate
# message is harmless: the claim is guarded by seq.
LANDED_WAKES = _q(f"""
SELECT {DISPATCH_COLUMNS} FROM {{S}}.runs AS w
WHERE w.status IN ('runnable', 'compensating') AND w.owner IS NULL AND NOT w.held
  AND w.eligible_at <= now()
  AND ((w.parent_id = :id AND w.spawn_seq = :seq)
       OR w.id = :parent_id OR w.parent_id = :parent_id)
LIMIT 10000
""")


# A run released a concurrency key: the next run waiting for it (a compensation first, then
# by priority, then age) becomes due for the dispatcher now (woken by NOTIFY). Waiters are
# never polled.
HANDOFF = _q("""
UPDATE {S}.runs SET dispatch_at = now(), dispatch_count = 0, updated_at = now()
WHERE id = (SELECT id FROM {S}.runs
            WHERE concurrency_key = :key AND eligible_at <= now() AND NOT held
              AND (status = 'runnable' OR (status = 'compensating' AND owner IS NULL))
            ORDER BY (status = 'compensating') DESC, priority DESC, eligible_at, created_at, id
            LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id
""")

UNIQUE_VIOLATION = "23505"

# --- signals

LOCK_TARGET = _q("""
SELECT id, status, await_names, finished_at FROM {S}.runs
WHERE id = :target OR (key = :target AND finished_at IS NULL)
ORDER BY (finished_at IS NULL) DESC, (id = :target) DESC
LIMIT 1
FOR UPDATE
""")

# No live run has the target as id or key: is it the key of a finished run that keeps it?
FINISHED_KEY = _q(f"""
SELECT id FROM {{S}}.runs WHERE key = :target AND finished_at IS NOT NULL AND {KEY_HELD}
LIMIT 1
""")

INSERT_SIGNAL = _q("""
INSERT INTO {S}.signals (run_id, name, payload, dedup_key)
VALUES (:run_id, :name, CAST(:payload AS jsonb), :dedup_key)
ON CONFLICT ON CONSTRAINT signals_dedup_key DO NOTHING
RETURNING id
""")

# A signal sent by name to a target no run has yet: kept until it expires.
KEEP_EARLY = _q("""
INSERT INTO {S}.early_signals (target, name, payload, dedup_key, expires_at)
VALUES (:target, :name, CAST(:payload AS jsonb), :dedup_key,
        now() + make_interval(secs => :ttl))
ON CONFLICT ON CONSTRAINT early_signals_dedup_key DO NOTHING
RETURNING id
""")

# Kept signals whose target now has a run (delivered, or refused if it already ended).
EARLY_DUE = _q("""
SELECT e.id, e.target, e.name, e.payload, e.dedup_key FROM {S}.early_signals AS e
WHERE e.expires_at > now()
  AND EXISTS (SELECT 1 FROM {S}.runs AS r
              WHERE r.id = e.target OR (r.key = e.target AND r.finished_at IS NULL))
ORDER BY e.id LIMIT :limit
FOR UPDATE OF e SKIP LOCKED
""")
DROP_EARLY = _q("DELETE FROM {S}.early_signals WHERE id = :id")

# --- reads

GET_RUN = _q(f"SELECT {RUN_COLUMNS} FROM {{S}}.runs WHERE id = :id")

# Named columns, never ``*``: a statement prepared server-side keeps its result type, and
# a migration that adds a column must not break it on live connections.
STEP_COLUMNS = ("run_id, seq, step, attempt, outcome, next_step, state, error, started_at, "
                "finished_at, worker")
HISTORY = _q(f"SELECT {STEP_COLUMNS} FROM {{S}}.steps WHERE run_id = :id ORDER BY seq")

STATUS = _q("SELECT status, result, error FROM {S}.runs WHERE id = :id")


def duplicate(run_id: str, key: str | None, holder: str, status: str, policy: str,
              ) -> errors.DuplicateWorkflow:
    """The error of a start whose workflow_id or business key another run holds."""
    if holder == run_id:
        what = f"workflow_id {run_id!r} is already used by run {holder!r} ({status})"
    elif status in TERMINAL:
        what = (f"key {key!r} is held by run {holder!r}, which ended {status} and keeps its "
                f"key (key_reuse={policy!r}) while it is retained")
    else:
        what = f"key {key!r} is held by live run {holder!r} ({status})"
    return errors.DuplicateWorkflow(what, existing_id=holder, key=key, existing_status=status)


class _HolderGone(Exception):
    """start_many: a conflicting run finished before we could name it."""


class Store(SweepStore):
    """All database access. Safe to share between threads; engines are per process."""

    def __init__(self, holder: EngineHolder, *, redispatch_after: float,
                 redispatch_max_backoff: float) -> None:
        self.db = holder
        self.redispatch_after = redispatch_after
        self.redispatch_max_backoff = redispatch_max_backoff

    # ------------------------------------------------------------------ runs

    def start(self, *, workflow_id: str | None, workflow: str, version: int, step: str,
              queue: str, run_queue: str | None, state: str, key: str | None, delay: float,
              at: datetime | None, priority: int = 0, parent_id: str | None = None,
              forked_from: str | None = None, app_version: str | None = None,
              concurrency_key: str | None = None, key_reuse: str = "reject",
              policy: flow.StartPolicy = flow.NO_POLICY) -> tuple[str, bool]:
        """Insert a runnable run; returns ``(workflow_id, publish_now)`` (the id is a
        pending run's when a debounce folded the start into it)."""
        run_id = workflow_id or str(uuid.uuid4())
        options: dict[str, Any] = {
            "workflow": workflow, "version": version, "step": step, "queue": queue,
            "run_queue": run_queue, "state": state, "key": key, "delay": delay, "at": at,
            "priority": priority, "parent_id": parent_id, "forked_from": forked_from,
            "app_version": app_version, "concurrency_key": concurrency_key,
            "key_reuse": key_reuse, "policy": policy}
        tries = busy = 0
        while tries < 3:
            tries += 1
            try:
                with self.db.begin() as conn:
                    found = self.start_on(conn, run_id, redispatch=self.redispatch_after,
                                          **options)
            except errors.StorageError as exc:
                # A singleton's replace met a busy row of a run that just went live: it
                # rolled back (freeing the singleton's lock); start over.
                busy += 1
                if exc.details.get("sqlstate") != flow.LOCK_NOT_AVAILABLE or busy > 50:
                    raise
                tries -= 1
                time.sleep(random.uniform(0.001, 0.01))
                continue
            if found is not None:
                return found
            # The conflicting run finished between the insert and the lookup (or a
            # debounce key's pending run was inserted by a racing start): try again.
        raise errors.DuplicateWorkflow(f"key {key!r} is contended", existing_id=None, key=key)

    def start_on(self, conn: sa.Connection, run_id: str, *, workflow: str, version: int,
                 step: str, queue: str, run_queue: str | None, state: str, key: str | None,
                 delay: float, at: datetime | None, priority: int, parent_id: str | None,
                 forked_from: str | None, app_version: str | None,
                 concurrency_key: str | None, redispatch: float,
                 key_reuse: str = "reject", policy: flow.StartPolicy = flow.NO_POLICY,
                 ) -> tuple[str, bool] | None:
        """Insert a run on ``conn`` (the caller's transaction); returns ``(id,
        publish_now)``, or None when a conflicting run vanished meanwhile. ``redispatch``:
        seconds until the dispatcher publishes it if nobody does (the outbox floor).
        ``policy``: the flow control the start goes through first (debounce, singleton,
        throttle, the first step's rate limits, the deadline)."""
        applied = flow.apply_start_policy(conn, policy, state=state, delay=delay, at=at,
                                          redispatch=redispatch)
        if applied.pending is not None:
            return applied.pending, False  # folded into a debounce key's pending run
        params = {"id": run_id, "workflow": workflow, "version": version, "queue": queue,
                  "run_queue": run_queue, "priority": priority, "step": step, "state": state,
                  "key": key, "delay": float(applied.delay), "at": applied.at,
                  "redispatch": redispatch, "parent_id": parent_id, "forked_from": forked_from,
                  "app_version": app_version, "concurrency_key": concurrency_key,
                  "key_reuse": key_reuse, "token_seq": applied.token_seq,
                  "waiting": applied.waiting, "deadline": policy.deadline,
                  "deadline_at": policy.deadline_at, "debounce_key": policy.debounce_key,
                  "singleton_key": policy.singleton_key, "held": applied.held}
        row = conn.execute(START, params).mappings().first()
        if row is not None:
            if row["delayed"] or policy.deadline is not None or policy.deadline_at is not None:
                conn.execute(NOTIFY)  # a timer or a deadline: the dispatchers plan for it
            return run_id, not row["delayed"] and not row["held"]
        holder = conn.execute(FIND_CONFLICT, {"id": run_id, "key": key}).mappings().first()
        if holder is not None:
            raise duplicate(run_id, key, holder["id"], holder["status"], holder["key_reuse"])
        return None

    def exists(self, workflow_id: str) -> bool:
        with self.db.connect() as conn:
            return conn.execute(STATUS, {"id": workflow_id}).first() is not None

    def signal_visible(self, signal_id: int | None) -> bool:
        with self.db.connect() as conn:
            return conn.execute(_q("SELECT 1 FROM {S}.signals WHERE id = :id"),
                                {"id": signal_id}).first() is not None

    def start_many(self, *, workflow: str, version: int, step: str, queue: str,
                   run_queue: str | None, states: Sequence[str], keys: Sequence[str | None],
                   workflow_ids: Sequence[str | None], delay: float, at: datetime | None,
                   existing: bool, key_reuse: str = "reject",
                   ) -> tuple[list[str], list[str], bool]:
        """Insert runnable runs in one transaction.

        Returns ``(ids in input order, ids inserted, publish_now)``. A taken key or id
        raises ``DuplicateWorkflow`` and inserts nothing, unless ``existing``: then the
        holder's id stands in for that item and the rest is inserted.
        """
        ids = [wid or str(uuid.uuid4()) for wid in workflow_ids]
        params = {"workflow": workflow, "version": version, "queue": queue,
                  "run_queue": run_queue, "step": step, "ids": ids, "states": list(states),
                  "keys": list(keys), "delay": float(delay), "at": at,
                  "redispatch": self.redispatch_after, "key_reuse": key_reuse}
        for _ in range(3):
            try:
                return self._start_many(params, ids, keys, existing)
            except _HolderGone:
                continue  # the holder finished between the insert and the lookup
        raise errors.DuplicateWorkflow("start_many: keys are contended", existing_id=None,
                                       key=None)

    def start_each(self, *, workflow: str, version: int, step: str, queue: str,
                   run_queue: str | None, states: Sequence[str], keys: Sequence[str | None],
                   workflow_ids: Sequence[str | None], delay: float, at: datetime | None,
                   existing: bool, key_reuse: str, policies: Sequence[flow.StartPolicy],
                   ) -> tuple[list[str], list[str], list[str]]:
        """start_many through flow control: one insert per run, in order, in one
        transaction. Returns ``(ids in input order, ids inserted, ids to publish now)``."""
        ids = [wid or str(uuid.uuid4()) for wid in workflow_ids]
        result: list[str] = []
        inserted: list[str] = []
        publish: list[str] = []
        with self.db.begin() as conn:
            for run_id, state, key, policy in zip(ids, states, keys, policies, strict=True):
                try:
                    with conn.begin_nested():  # a taken key or id takes no token either
                        found = self.start_on(
                            conn, run_id, workflow=workflow, version=version, step=step,
                            queue=queue, run_queue=run_queue, state=state, key=key, delay=delay,
                            at=at, priority=0, parent_id=None, forked_from=None,
                            app_version=None, concurrency_key=None,
                            redispatch=self.redispatch_after, key_reuse=key_reuse,
                            policy=policy)
                except errors.DuplicateWorkflow as exc:
                    if not existing or exc.existing_id is None:
                        exc.message += "; no run was started"
                        exc.args = (exc.message,)
                        raise
                    result.append(exc.existing_id)
                    continue
                if found is None:
                    raise errors.DuplicateWorkflow("start_many: keys are contended",
                                                   existing_id=None, key=key)
                result.append(found[0])
                inserted.append(found[0])
                if found[1]:
                    publish.append(found[0])
        return result, inserted, publish

    def _start_many(self, params: dict[str, Any], ids: list[str], keys: Sequence[str | None],
                    existing: bool) -> tuple[list[str], list[str], bool]:
        with self.db.begin() as conn:
            rows = conn.execute(START_MANY, params).all()
            inserted = {row[0] for row in rows}
            delayed = bool(rows) and bool(rows[0][1])
            if len(inserted) == len(ids):
                if delayed:
                    conn.execute(NOTIFY)
                return ids, ids, not delayed
            holders = conn.execute(FIND_CONFLICTS, {
                "ids": [i for i in ids if i not in inserted],
                "keys": [k for i, k in zip(ids, keys, strict=True) if k is not None and i not in inserted],
            }).all()
            by_id = {row[0]: row for row in holders}
            by_key = {row[1]: row for row in holders if row[1] is not None}
            result: list[str] = []
            for run_id, key in zip(ids, keys, strict=True):
                if run_id in inserted:
                    result.append(run_id)
                    continue
                found = by_id.get(run_id) or (by_key.get(key) if key is not None else None)
                if found is None:
                    raise _HolderGone  # rolls the batch back; the caller tries again
                if not existing:
                    # Raising inside the transaction rolls the whole batch back.
                    error = duplicate(run_id, key, found[0], found[2], found[3])
                    error.message += "; no run was started"
                    error.args = (error.message,)
                    raise error
                result.append(found[0])
            if delayed:
                conn.execute(NOTIFY)
            return result, [i for i in ids if i in inserted], not delayed

    def mark_unpublished(self, workflow_ids: Sequence[str], after: float) -> None:
        """Publishing failed: the dispatcher publishes these again in ``after`` seconds."""
        with self.db.begin() as conn:
            conn.execute(UNPUBLISHED, {"ids": list(workflow_ids), "after": after})

    def claim(self, workflow_id: str, seq: int, owner: str, *, ahead: float = 0.0,
              lease: str | None = None) -> tuple[Claim, datetime] | None:
        """Claim the step at ``seq``; ``ahead``: it may be due in up to that many seconds
        (the claim's ``due_in`` says how many). ``lease``: the new lease (default: random)."""
        lease = lease or uuid.uuid4().hex
        try:
            with self.db.raw() as conn:  # one statement: autocommit, one round trip
                row = conn.cursor(row_factory=dict_row).execute(CLAIM_SQL, {
                    "id": workflow_id, "seq": seq, "owner": owner, "lease": lease,
                    "ahead": ahead}).fetchone()
        except errors.StorageError as exc:
            if exc.details.get("sqlstate") == UNIQUE_VIOLATION:
                return None  # lost a race for a concurrency key: the winner hands it on
            raise
        if row is None:
            return None
        return Claim.from_row(row, lease), row["started_at"]

    def release(self, claim: Claim, after: float) -> bool:
        return self.release_lease(claim.workflow_id, claim.lease, after)

    def release_lease(self, workflow_id: str, lease: str, after: float, *,
                      lock_timeout: float | None = None) -> bool:
        """Hand a run back to runnable if ``lease`` still holds it (else nothing).
        ``lock_timeout``: give up (a transient StorageError) rather than wait longer on
        the run's row lock."""
        params = {"id": workflow_id, "lease": lease, "after": after}
        if lock_timeout is None:
            with self.db.connect() as conn:
                return bool(conn.execute(RELEASE, params).rowcount)
        with self.db.begin() as conn:
            conn.execute(SET_LOCK_TIMEOUT, {"ms": f"{max(int(lock_timeout * 1000), 1)}ms"})
            return bool(conn.execute(RELEASE, params).rowcount)

    def commit(self, claim: Claim, transition: Transition, *, worker: str | None,
               started_at: datetime | None, lock_timeout: float | None = None,
               ) -> Committed | None:
        """Commit an outcome under the claim's lease; None when the lease was lost.

        ``lock_timeout`` (seconds): wait at most that long on a locked row (the run, its
        parent), else raise a transient ``StorageError``; the coordinator commits so."""
        t = transition
        params = self._commit_params(claim, t, worker=worker, started_at=started_at)
        # A Next, Retry or ending is one statement: autocommit, one round trip. Parking
        # (re-check the inbox), timers (NOTIFY), spawning, the ending of a child (its parent
        # counts it) and handing on a concurrency key take a transaction.
        if lock_timeout is None and t.status not in (Status.AWAITING, Status.AWAITING_CHILDREN) \
                and not (t.terminal and claim.parent_id is not None) \
                and t.children is None and claim.concurrency_key is None \
                and not (t.status in (Status.RUNNABLE, Status.COMPENSATING) and not t.publish):
            with self.db.raw() as raw:
                found = raw.cursor(row_factory=dict_row).execute(COMMIT_SQL, params).fetchone()
            if found is None:
                return None
            return Committed(seq=found["seq"], status=found["status"],
                             dispatch=Dispatch.from_row(found) if t.publish else None)
        with self.db.begin() as conn:
            if lock_timeout is not None:
                conn.execute(SET_LOCK_TIMEOUT, {"ms": f"{max(int(lock_timeout * 1000), 1)}ms"})
            return self._commit_in(conn, claim, t, params)

    def _commit_params(self, claim: Claim, t: Transition, *, worker: str | None,
                       started_at: datetime | None) -> dict[str, Any]:
        return {
            "id": claim.workflow_id, "lease": claim.lease, "seq": claim.seq,
            "status": t.status, "step": t.step, "queue": t.queue, "attempt": t.attempt,
            "state": t.state, "result": t.result, "error": t.error, "delay": float(t.delay),
            "until": t.until, "publish": t.publish, "redispatch": self.redispatch_after,
            "await_names": list(t.await_names) if t.await_names is not None else None,
            "deadline": t.deadline, "terminal": t.terminal, "ran_step": claim.step,
            "ran_attempt": claim.attempt, "outcome": t.outcome, "next_step": t.next_step,
            "started_at": started_at, "worker": worker, "consume": t.consume,
            "await_all": t.await_all, "children_pending": t.children_count,
            "spawn_cap": t.spawn_cap,
            "comp_push": t.comp_push, "compensations": t.compensations,
            "compensation_errors": t.compensation_errors, "failure": t.failure,
        }

    def _commit_in(self, conn: sa.Connection, claim: Claim, t: Transition,
                   params: dict[str, Any]) -> Committed | None:
        """The commit's transaction: COMMIT, then what the outcome needs in the same
        transaction (children, the parent's count, the inbox re-check, the key hand-off)."""
        row = conn.execute(COMMIT, params).mappings().first()
        if row is None:
            return None
        dispatch = Dispatch.from_row(row) if t.publish else None
        status = row["status"]
        wakes: list[Dispatch] = []
        if t.children is not None:
            wakes += self._insert_children(conn, row, t.children)
        if t.terminal and row["parent_id"] is not None:
            wakes += composition.children_finished(
                conn, [composition.Finished(row["parent_id"], row["spawn_seq"])],
                redispatch=self.redispatch_after)
        if t.status == Status.AWAITING:
            woke = conn.execute(WAKE_FROM_INBOX, {
                "id": claim.workflow_id, "names": list(t.await_names or ()),
                "redispatch": self.redispatch_after}).mappings().first()
            if woke is not None:  # (an executing run is never held)
                dispatch, status = Dispatch.from_row(woke), Status.RUNNABLE
        timer = (t.status in (Status.RUNNABLE, Status.COMPENSATING) and not t.publish) or (
            t.deadline is not None and status == Status.AWAITING)
        if claim.concurrency_key is not None and t.status != Status.EXECUTING:
            timer |= conn.execute(HANDOFF, {"key": claim.concurrency_key}).first() is not None
        if timer:  # wake the dispatchers so they re-plan their sleep
            conn.execute(NOTIFY)
        return Committed(seq=row["seq"], status=status, dispatch=dispatch, wakes=tuple(wakes))

    def end_expired(self, decide: Callable[[Claim, datetime], Transition], *,
                    lock_timeout: float) -> tuple[bool, Committed | None]:
        """End one run whose deadline passed: taken over under a new lease, ended with
        ``decide(claim, deadline)`` (fail, or compensate) through the step COMMIT, its live
        children cancelled, in one transaction. Returns (one was due, what committed)."""
        lease = uuid.uuid4().hex
        with self.db.begin() as conn:
            conn.execute(SET_LOCK_TIMEOUT, {"ms": f"{max(int(lock_timeout * 1000), 1)}ms"})
            taken = flow.take_expired(conn, lease)
            if taken is None:
                return False, None
            claim, was, deadline = taken
            if was == Status.COMPENSATING:
                return True, None  # its compensations run on; the deadline has fired
            t = decide(claim, deadline)
            committed = self._commit_in(conn, claim, t, self._commit_params(
                claim, t, worker=None, started_at=None))
            wakes: list[Dispatch] = []
            for child in flow.live_children(conn, claim.workflow_id):
                wakes += composition.cancel_tree(
                    conn, child, "the parent's deadline passed",
                    redispatch=self.redispatch_after)[1]
        if committed is not None and wakes:
            committed = Committed(seq=committed.seq, status=committed.status,
                                  dispatch=committed.dispatch, wakes=committed.wakes + tuple(wakes))
        return True, committed

    def take_tokens(self, claim: Claim, buckets: Sequence[flow.Bucket], *,
                    park_after: float) -> tuple[float, bool] | None:
        """The claimed step's rate-limit tokens (``storage.flow.take_for_step``)."""
        return flow.take_for_step(self.db, claim, buckets, park_after=park_after)

    def hand_off(self, concurrency_key: str) -> None:
        """A run parked while it held a concurrency key: the next waiter is due now."""
        with self.db.begin() as conn:
            if conn.execute(HANDOFF, {"key": concurrency_key}).first() is not None:
                conn.execute(NOTIFY)

    def _insert_children(self, conn: sa.Connection, parent: Any, children: str,
                         ) -> list[Dispatch]:
        """A Spawn's children, in the transaction that parks the parent."""
        try:
            return composition.insert_children(
                conn, parent_id=parent["id"], spawn_seq=parent["seq"],
                priority=parent["priority"], children=children,
                redispatch=self.redispatch_after, app_version=parent["app_version"])
        except sa.exc.IntegrityError as exc:  # a unique violation: a taken id or live key
            detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else ""
            raise errors.DuplicateWorkflow(
                f"a child's workflow_id or key is already used by another run ({detail})",
                existing_id=None, key=None) from exc

    def landed(self, claim: Claim, worker: str) -> Committed | None:
        """After a commit whose result is unknown (the connection dropped): did it apply?

        Our history row at ``seq + 1`` is the proof; then the run's current row says what
        to do next (continue run-ahead, publish, or nothing).
        """
        with self.db.connect() as conn:
            row = conn.execute(LANDED, {"id": claim.workflow_id, "seq": claim.seq + 1,
                                        "worker": worker, "step": claim.step,
                                        "lease": claim.lease}).mappings().first()
            if row is None:
                return None
            wakes = tuple(Dispatch.from_row(w) for w in conn.execute(LANDED_WAKES, {
                "id": claim.workflow_id, "seq": claim.seq + 1,
                "parent_id": row["parent_id"]}).mappings())
        dispatch = Dispatch.from_row(row) if row["publish"] else None
        return Committed(seq=row["seq"], status=row["status"], dispatch=dispatch, wakes=wakes)

    def get(self, workflow_id: str) -> Run | None:
        with self.db.connect() as conn:
            row = conn.execute(GET_RUN, {"id": workflow_id}).mappings().first()
        return Run.from_row(row) if row is not None else None

    def status(self, workflow_id: str) -> tuple[str, Any, Any] | None:
        with self.db.connect() as conn:
            row = conn.execute(STATUS, {"id": workflow_id}).first()
        return (row[0], row[1], row[2]) if row is not None else None

    def list_runs(self, *, workflow: str | None, status: str | None, limit: int) -> list[Run]:
        clauses, params = [], {"limit": limit}
        if workflow is not None:
            clauses.append("workflow = :workflow")
            params["workflow"] = workflow  # type: ignore[assignment]
        if status is not None:
            clauses.append("status = :status")
            params["status"] = status  # type: ignore[assignment]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = _q(f"SELECT {RUN_COLUMNS} FROM {{S}}.runs {where} "
                 "ORDER BY created_at DESC, id LIMIT :limit")
        with self.db.connect() as conn:
            return [Run.from_row(r) for r in conn.execute(sql, params).mappings()]

    def history(self, workflow_id: str) -> list[StepRecord]:
        with self.db.connect() as conn:
            return [StepRecord.from_row(r)
                    for r in conn.execute(HISTORY, {"id": workflow_id}).mappings()]

    # ------------------------------------------------------------------ signals

    def signal(self, *, target: str, name: str, payload: str, dedup_key: str | None,
               ) -> tuple[SignalResult, Dispatch | None]:
        with self.db.begin() as conn:
            return self.signal_on(conn, target=target, name=name, payload=payload,
                                  dedup_key=dedup_key, redispatch=self.redispatch_after)

    def signal_on(self, conn: sa.Connection, *, target: str, name: str, payload: str,
                  dedup_key: str | None, redispatch: float,
                  ) -> tuple[SignalResult, Dispatch | None]:
        """Store a signal on ``conn`` (possibly the caller's transaction)."""
        run = conn.execute(LOCK_TARGET, {"target": target}).mappings().first()
        if run is None or run["finished_at"] is not None:
            finished = run is not None or conn.execute(
                FINISHED_KEY, {"target": target}).first() is not None
            state = "finished" if finished else "missing"
            raise errors.NoTarget(
                f"no live run has workflow_id or key {target!r} ({state})",
                target=target, reason=state,
            )
        run_id = run["id"]
        signal_id = conn.execute(INSERT_SIGNAL, {
            "run_id": run_id, "name": name, "payload": payload, "dedup_key": dedup_key,
        }).scalar()
        if signal_id is None:
            return SignalResult(workflow_id=run_id, signal_id=None, duplicate=True,
                                woke=False), None
        dispatch, woke = None, False
        if run["status"] == Status.AWAITING and name in (run["await_names"] or ()):
            row = conn.execute(WAKE_FROM_INBOX, {
                "id": run_id, "names": list(run["await_names"]),
                "redispatch": redispatch}).mappings().first()
            if row is not None:
                woke = True
                dispatch = None if row["held"] else Dispatch.from_row(row)
        return SignalResult(workflow_id=run_id, signal_id=int(signal_id), duplicate=False,
                            woke=woke), dispatch

    def keep_early_signal(self, *, target: str, name: str, payload: str,
                          dedup_key: str | None, ttl: float) -> bool:
        """Keep a signal for a target that has no run yet (``ttl`` seconds); False when
        this dedup_key is kept already."""
        with self.db.connect() as conn:
            return conn.execute(KEEP_EARLY, {
                "target": target, "name": name, "payload": payload, "dedup_key": dedup_key,
                "ttl": ttl}).first() is not None

    def deliver_early_signals(self, limit: int) -> tuple[int, list[Dispatch]]:
        """Deliver kept signals whose target has a run now; returns (delivered, runs to
        publish). A target whose run already ended refuses them (dropped)."""
        delivered, wakes = 0, []
        with self.db.begin() as conn:
            for row in conn.execute(EARLY_DUE, {"limit": limit}).mappings().all():
                try:
                    with conn.begin_nested():
                        result, dispatch = self.signal_on(
                            conn, target=row["target"], name=row["name"],
                            payload=json.dumps(row["payload"]), dedup_key=row["dedup_key"],
                            redispatch=self.redispatch_after)
                except errors.NoTarget:
                    pass  # it ended before the signal could reach it
                else:
                    delivered += not result.duplicate
                    if dispatch is not None:
                        wakes.append(dispatch)
                conn.execute(DROP_EARLY, {"id": row["id"]})
        return delivered, wakes
