"""SQL of the control plane: idempotency records, cancel, resume, fork, preflight checks.

A control request runs in ONE transaction: it first claims its request key (an insert that
a concurrent request with the same key waits on, then sees), then applies the mutation
inside a savepoint, then stores the response -- or, when the mutation is refused, rolls the
savepoint back and stores the failure. Nothing is ever left "in progress": an uncommitted
record is invisible, and a crashed transaction leaves no record at all.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from durable_celery import errors
from durable_celery.storage import composition, migrate
from durable_celery.storage.engine import EngineHolder
from durable_celery.storage.records import Dispatch, Status
from durable_celery.storage.sql import DISPATCH_COLUMNS, NOTIFY
from durable_celery.storage.sql import q as _q
from durable_celery.storage.store import WAKE_FROM_INBOX

S = migrate.SCHEMA

# Claims the key, or takes over an expired record; returns nothing while a live record holds
# the key (a concurrent transaction inserting the same key makes this wait for its outcome).
CLAIM_KEY = _q("""
INSERT INTO {S}.control_requests (request_key, action, target, status, expires_at)
VALUES (:key, :action, :target, 'succeeded', now() + make_interval(secs => :ttl))
ON CONFLICT (request_key) DO UPDATE SET
    action = EXCLUDED.action, target = EXCLUDED.target, status = 'succeeded',
    response = NULL, error = NULL, created_at = now(), expires_at = EXCLUDED.expires_at
  WHERE {S}.control_requests.expires_at <= now()
RETURNING request_key
""")

GET_KEY = _q("""
SELECT action, target, status, response, error FROM {S}.control_requests
WHERE request_key = :key
""")

FINISH_KEY = _q("""
UPDATE {S}.control_requests SET status = :status, response = CAST(:response AS jsonb),
    error = CAST(:error AS jsonb)
WHERE request_key = :key
""")

DELETE_EXPIRED = _q("""
DELETE FROM {S}.control_requests WHERE request_key IN (
  SELECT request_key FROM {S}.control_requests WHERE expires_at <= now()
  ORDER BY expires_at LIMIT :limit FOR UPDATE SKIP LOCKED
)
""")

# Resume puts a cancelled or failed run back where it was:
# - cancelled while awaiting a signal: awaiting the same names again, with the same
#   (absolute) deadline -- a deadline that passed meanwhile expires at the next sweep;
# - cancelled while awaiting children: waiting for them again (the caller resumes the
#   children the same cancel cancelled, then recounts);
# - cancelled while compensating (or failed with compensations to run): compensating;
# - otherwise (runnable, sleeping, retrying, executing, failed): runnable at the step where
#   it stopped, as the same visit, due when it was due (a sleep keeps its wake-up time).
# A child of a capped spawn its parent still waits on goes back in the queue (held); the
# caller releases what the cap allows.
RESUME = _q("""
WITH t AS (
  SELECT r.id,
         CASE WHEN r.status = 'cancelled'
                   AND r.cancelled_from IN ('awaiting', 'awaiting_children')
              THEN r.cancelled_from
              WHEN r.failure IS NOT NULL AND jsonb_array_length(r.compensations) > 0
              THEN 'compensating'
              ELSE 'runnable' END AS next_status,
         EXISTS (SELECT 1 FROM {S}.runs AS p WHERE p.id = r.parent_id
                    AND p.status = 'awaiting_children' AND p.visit = r.spawn_seq
                    AND (r.held OR p.spawn_cap IS NOT NULL))
         -- a singleton whose key another live run holds now waits behind it (released
         -- by that run's end, as a queued start is)
         OR (r.singleton_key IS NOT NULL AND r.parent_id IS NULL AND EXISTS (
               SELECT 1 FROM {S}.runs AS o WHERE o.singleton_key = r.singleton_key
                  AND o.finished_at IS NULL AND NOT o.held AND o.id <> r.id)) AS keep_held,
         GREATEST(r.eligible_at, now()) AS due
  FROM {S}.runs AS r WHERE r.id = :id AND r.status IN ('cancelled', 'failed')
), u AS (
  SELECT t.*, t.next_status IN ('runnable', 'compensating') AND NOT t.keep_held AS dispatch
  FROM t
)
UPDATE {S}.runs SET
  status = u.next_status, cancelled_from = NULL,
  attempt = 0, recoveries = 0, finished_at = NULL, result = NULL, error = NULL,
  await_names = CASE WHEN u.next_status = 'awaiting' THEN await_names END,
  await_deadline = CASE WHEN u.next_status = 'awaiting' THEN await_deadline END,
  await_all = u.next_status = 'awaiting' AND await_all,
  owner = NULL, lease = NULL, started_at = NULL, eligible_at = u.due,
  children_pending = 0, spawn_owed = 0,
  held = u.keep_held,
  dispatch_at = CASE WHEN u.dispatch THEN
                  CASE WHEN u.due > now() THEN u.due
                       ELSE now() + make_interval(secs => :redispatch) END END,
  dispatched_at = CASE WHEN u.dispatch AND u.due <= now() THEN now() END,
  dispatch_count = CASE WHEN u.dispatch AND u.due <= now() THEN 1 ELSE 0 END,
  updated_at = now()
-- Re-checked on the row's latest version: of two racing resumes, one changes it.
FROM u WHERE runs.id = u.id AND runs.status IN ('cancelled', 'failed')
RETURNING runs.id, runs.workflow, runs.step, runs.seq, runs.queue, runs.priority,
          runs.parent_id, runs.spawn_seq, runs.status, runs.visit, runs.await_names,
          runs.await_deadline IS NOT NULL AS has_deadline,
          u.dispatch AND u.due <= now() AS publish, u.due > now() AS delayed
""")

# The children a resumed parent waits on again: those of its current spawn that the same
# cancel cancelled (an earlier, separate cancel of a child stays).
CASCADED = _q("""
SELECT id FROM {S}.runs
WHERE parent_id = :id AND spawn_seq = :visit AND status = 'cancelled'
  AND error ->> 'cancelled_by' = :cancelled_by
ORDER BY child_index
""")

CANCELLED_BY = _q("SELECT error ->> 'cancelled_by' FROM {S}.runs WHERE id = :id")

# A resumed parent counts its live children again; with none, it continues at once.
RECOUNT = _q("""
UPDATE {S}.runs AS p SET
  children_pending = c.n,
  status = CASE WHEN c.n = 0 THEN 'runnable' ELSE 'awaiting_children' END,
  eligible_at = now(),
  dispatch_at = CASE WHEN c.n = 0 THEN now() + make_interval(secs => :redispatch) END,
  dispatched_at = CASE WHEN c.n = 0 THEN now() END,
  dispatch_count = CASE WHEN c.n = 0 THEN 1 ELSE 0 END
FROM (SELECT count(*) AS n FROM {S}.runs
      WHERE parent_id = :id AND spawn_seq = :visit AND finished_at IS NULL) AS c
WHERE p.id = :id AND p.status = 'awaiting_children'
RETURNING p.id, p.workflow, p.step, p.seq, p.queue, p.priority, p.status, p.visit
""")

# A resumed child is pending again for a parent still waiting on its spawn (it was counted
# when it was cancelled or failed). A parent its end already woke, whose join step has not
# run yet (same seq, not claimed), waits again: the join step must see the child's end.
# Child row first, then the parent, as everywhere.
UNCOUNT = _q("""
UPDATE {S}.runs SET children_pending = children_pending + 1, status = 'awaiting_children',
    dispatch_at = NULL, dispatched_at = NULL, dispatch_count = 0, updated_at = now()
WHERE id = :parent_id AND visit = :spawn_seq AND seq = :spawn_seq
  AND (status = 'awaiting_children' OR (status = 'runnable' AND owner IS NULL))
RETURNING id, spawn_cap
""")

LOCK_RUN = _q("""
SELECT id, workflow, version, status, step, seq, queue, run_queue, priority, key, input,
       single_step
FROM {S}.runs WHERE id = :id FOR SHARE
""")

HISTORY_ROWS = _q("""
SELECT seq, step, state, outcome FROM {S}.steps AS s
WHERE run_id = :id
  -- The forward history only: rows after the failure that started compensating are the
  -- compensations'.
  AND NOT EXISTS (SELECT 1 FROM {S}.steps AS f
                  WHERE f.run_id = s.run_id AND f.seq < s.seq AND f.outcome = 'fail'
                    AND f.next_step IS NOT NULL)
ORDER BY seq
""")

FORK = _q("""
INSERT INTO {S}.runs (id, workflow, version, queue, run_queue, priority, status, step, seq,
                      visit, state, input, eligible_at, dispatch_at, dispatched_at,
                      dispatch_count, forked_from, app_version, concurrency_key, compensations,
                      single_step)
SELECT :new_id, workflow, :version, :queue, run_queue, priority, 'runnable', :step, :seq,
       :seq, COALESCE(CAST(:state AS jsonb), input), input, now(), now() + make_interval(secs => :redispatch),
       now(), 1, id, :app_version, concurrency_key, CAST(:compensations AS jsonb), single_step
FROM {S}.runs WHERE id = :id
ON CONFLICT DO NOTHING
RETURNING """ + DISPATCH_COLUMNS)

COPY_HISTORY = _q("""
INSERT INTO {S}.steps (run_id, seq, step, attempt, outcome, next_step, state, error,
                       started_at, finished_at, worker)
SELECT :new_id, seq, step, attempt, outcome, next_step, state, error, started_at,
       finished_at, worker
FROM {S}.steps WHERE run_id = :id AND seq < :before
""")

TABLE_EXISTS = _q("SELECT to_regclass(:name) IS NOT NULL")


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlOutcome:
    """What a mutation returns: the response to store and the messages to publish."""

    response: dict[str, Any]
    dispatches: Sequence[Dispatch] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ForkSource:
    """The parts of a source run a fork needs, and its history (seq, step, state)."""

    workflow: str
    version: int
    step: str
    queue: str
    run_queue: str | None
    history: Sequence[tuple[int, str, Any]]
    outcomes: Sequence[str] = ()   # the history's outcome labels, in the same order
    single_step: bool = False      # a child started from a step function: that step only


Mutation = Callable[[sa.Connection], ControlOutcome]


class ControlStore:
    """Idempotent control requests. Engines are per process (see EngineHolder)."""

    def __init__(self, holder: EngineHolder, *, redispatch_after: float) -> None:
        self.db = holder
        self.redispatch_after = redispatch_after

    # ------------------------------------------------------------------ idempotency

    def request(self, *, key: str, action: str, target: str, ttl_seconds: float,
                mutation: Mutation) -> tuple[ControlOutcome, bool]:
        """Run ``mutation`` at most once per live ``key``: ``(outcome, replayed)``.

        Raises ``IdempotencyConflict`` when the key belongs to another action or target, or to
        a request that failed; re-raises (after recording it) a ``ControlError`` the mutation
        raised.
        """
        params = {"key": key, "action": action, "target": target, "ttl": ttl_seconds}
        failure: errors.ControlError | None = None
        with self.db.begin() as conn:
            if conn.execute(CLAIM_KEY, params).first() is None:
                row = conn.execute(GET_KEY, {"key": key}).mappings().one()
                return ControlOutcome(response=_replay(key, action, target, row)), True
            savepoint = conn.begin_nested()
            try:
                outcome = mutation(conn)
            except errors.ControlError as exc:
                savepoint.rollback()
                conn.execute(FINISH_KEY, {"key": key, "status": "failed", "response": None,
                                          "error": json.dumps(exc.body, default=str)})
                failure = exc
            else:
                savepoint.commit()
                conn.execute(FINISH_KEY, {"key": key, "status": "succeeded",
                                          "response": json.dumps(outcome.response),
                                          "error": None})
                if outcome.dispatches:
                    conn.execute(NOTIFY)
        if failure is not None:
            raise failure
        return outcome, False

    def delete_expired(self, limit: int = 1000) -> int:
        with self.db.begin() as conn:
            return int(conn.execute(DELETE_EXPIRED, {"limit": limit}).rowcount)

    # ------------------------------------------------------------------ mutations

    def cancel(self, conn: sa.Connection, workflow_id: str, reason: str | None,
               ) -> tuple[list[str], list[Dispatch]]:
        """Cancel the run and its live descendants (``composition.cancel_tree``)."""
        return composition.cancel_tree(conn, workflow_id, reason,
                                       redispatch=self.redispatch_after)

    def resume(self, conn: sa.Connection, workflow_id: str) -> list[Dispatch] | None:
        """Resume a cancelled or failed run (see RESUME); None when it is neither. Returns
        the runs to publish: the run itself, children a resumed join releases, ..."""
        try:
            with conn.begin_nested():
                dispatches = self._resume(conn, workflow_id, cascaded=False)
        except sa.exc.IntegrityError:  # runs_key_idx: another run holds the key now
            raise errors.DuplicateWorkflow(
                f"run {workflow_id!r} cannot resume: its key is held by another run",
                workflow_id=workflow_id) from None
        if dispatches is not None:
            conn.execute(NOTIFY)  # a sleep or a deadline back: the dispatchers re-plan
        return dispatches

    def _resume(self, conn: sa.Connection, workflow_id: str, *, cascaded: bool,
                depth: int = 0) -> list[Dispatch] | None:
        cancelled_by = conn.execute(CANCELLED_BY, {"id": workflow_id}).scalar()
        row = conn.execute(RESUME, {"id": workflow_id, "redispatch": self.redispatch_after}
                           ).mappings().first()
        if row is None:
            return None
        out = [Dispatch.from_row(row)] if row["publish"] else []
        if row["status"] == Status.AWAITING:
            # Signals that came while it was held, or were delivered but not consumed.
            woke = conn.execute(WAKE_FROM_INBOX, {
                "id": workflow_id, "names": list(row["await_names"] or ()),
                "redispatch": self.redispatch_after}).mappings().first()
            if woke is not None and not woke["held"]:
                out.append(Dispatch.from_row(woke))
        elif row["status"] == Status.AWAITING_CHILDREN:
            # The children the same cancel cancelled wait with it again (deepest last).
            if cancelled_by is not None and depth < 100:
                for (child_id,) in conn.execute(CASCADED, {
                        "id": workflow_id, "visit": row["visit"],
                        "cancelled_by": cancelled_by}).all():
                    out += self._resume(conn, child_id, cascaded=True, depth=depth + 1) or []
            counted = conn.execute(RECOUNT, {"id": workflow_id, "visit": row["visit"],
                                             "redispatch": self.redispatch_after}
                                   ).mappings().first()
            if counted is not None and counted["status"] == Status.RUNNABLE:
                out.append(Dispatch.from_row(counted))
            else:
                out += composition.release_slots(conn, workflow_id, row["visit"],
                                                 redispatch=self.redispatch_after)
        if not cascaded and row["parent_id"] is not None and row["spawn_seq"] is not None:
            parent = conn.execute(UNCOUNT, {"parent_id": row["parent_id"],
                                            "spawn_seq": row["spawn_seq"]}).mappings().first()
            if parent is not None and parent["spawn_cap"] is not None:
                out += composition.release_slots(conn, row["parent_id"], row["spawn_seq"],
                                                 redispatch=self.redispatch_after)
        return out

    def fork_source(self, conn: sa.Connection, workflow_id: str) -> ForkSource | None:
        run = conn.execute(LOCK_RUN, {"id": workflow_id}).mappings().first()
        if run is None:
            return None
        rows = conn.execute(HISTORY_ROWS, {"id": workflow_id}).mappings().all()
        history = [(int(h["seq"]), str(h["step"]), h["state"]) for h in rows]
        return ForkSource(workflow=run["workflow"], version=run["version"], step=run["step"],
                          queue=run["queue"], run_queue=run["run_queue"], history=history,
                          outcomes=[str(h["outcome"]) for h in rows],
                          single_step=bool(run["single_step"]))

    def fork(self, conn: sa.Connection, *, source_id: str, new_id: str | None, version: int,
             step: str, queue: str, seq: int, state: str | None, app_version: str | None,
             compensations: str = "[]") -> Dispatch | None:
        """Insert the fork (runnable at ``step`` after ``seq`` copied history rows, with
        ``state``, or the source's input when None); None when ``new_id`` is taken.
        ``compensations`` is the stack of the copied completed steps. A fork copies no
        children: a parent forked before its Spawn spawns children of its own."""
        row = conn.execute(FORK, {
            "id": source_id, "new_id": new_id or str(uuid.uuid4()), "version": version,
            "queue": queue, "step": step, "seq": seq, "state": state,
            "app_version": app_version, "redispatch": self.redispatch_after,
            "compensations": compensations,
        }).mappings().first()
        if row is None:
            return None
        if seq:
            conn.execute(COPY_HISTORY, {"id": source_id, "new_id": row["id"], "before": seq + 1})
        return Dispatch.from_row(row)

    # ------------------------------------------------------------------ preflight

    def ping(self) -> None:
        with self.db.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def applied_versions(self) -> list[int]:
        with self.db.connect() as conn:
            return migrate.applied_versions(conn)

    def missing_tables(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` (``table`` in our schema or ``schema.table``) that do not exist."""
        missing = []
        with self.db.connect() as conn:
            for name in names:
                qualified = name if "." in name else f"{S}.{name}"
                if not conn.execute(TABLE_EXISTS, {"name": qualified}).scalar():
                    missing.append(name)
        return missing


def _replay(key: str, action: str, target: str, row: Any) -> dict[str, Any]:
    if row["action"] != action or row["target"] != target:
        raise errors.IdempotencyConflict(
            f"request key {key!r} was used for {row['action']} of {row['target']!r}, "
            f"not {action} of {target!r}",
            idempotency_key=key, action=row["action"], target=row["target"])
    if row["status"] == Status.FAILED:
        failure = row["error"] or {}
        raise errors.IdempotencyConflict(
            f"request key {key!r} belongs to a {action} of {target!r} that failed: "
            f"{failure.get('message', failure)}",
            idempotency_key=key, action=action, target=target, failure=failure)
    response = dict(row["response"] or {})
    response["idempotency_replayed"] = True
    return response
