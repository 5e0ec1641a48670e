"""The SQL of composition: inserting a Spawn's children, and the join.

The join is a counter on the parent row (``children_pending``). Every transition that
makes a child terminal runs :func:`children_finished` in its own transaction, after the
guarded statement that finished the child: the child row is locked first, then the parent
(always this order). The decrement is guarded by the parent's status and by the spawn the
child belongs to (``spawn_seq`` = the parent's ``visit`` while it waits), so a child is
counted once, and only by the spawn that started it. The statement that takes the counter
to zero makes the parent runnable at its next step; the caller publishes it after commit.

foreach's concurrency cap: children past the cap are inserted ``held`` (never claimed,
never dispatched); the parent keeps the cap (``spawn_cap``). Under the parent's row lock,
:func:`release_slots` counts the started children that are not finished and releases held
ones, in spawn order, up to the cap: after a child finishes, after a child is resumed, and
when a cancelled parent is resumed. The count is derived, never stored, so a release cannot
be lost: a held child whose row is locked at that moment (a signal to it, a caller's
transaction) is skipped, and the parent records that it is owed a release
(``spawn_owed``); the reaper's pass pays it off as soon as the row is free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from durable_celery.storage.records import Dispatch, Status
from durable_celery.storage.sql import q as _q

INSERT_CHILDREN = _q("""
INSERT INTO {S}.runs (id, workflow, version, queue, run_queue, priority, status, step, state,
                      input, key, eligible_at, dispatch_at, dispatched_at, dispatch_count,
                      parent_id, child_index, spawn_seq, held, single_step, app_version,
                      key_reuse)
SELECT c.id, c.workflow, c.version, c.queue, c.run_queue, :priority, 'runnable', c.step,
       c.state, c.state, c.key, now(),
       CASE WHEN c.held THEN NULL ELSE now() + make_interval(secs => :redispatch) END,
       CASE WHEN c.held THEN NULL ELSE now() END,
       CASE WHEN c.held THEN 0 ELSE 1 END,
       :parent_id, c.idx, :spawn_seq, c.held, c.single, :app_version,
       COALESCE(c.key_reuse, 'reject')
FROM jsonb_to_recordset(CAST(:children AS jsonb))
     AS c(id text, workflow text, version integer, queue text, run_queue text, step text,
          state jsonb, key text, idx integer, held boolean, single boolean, key_reuse text)
ORDER BY c.idx
RETURNING id, workflow, step, seq, queue, priority, held
""")

# The parent of a child that just became terminal: one less pending child; the last one
# makes it runnable at its next step (already in ``step`` since the Spawn committed).
JOIN = _q("""
UPDATE {S}.runs AS p SET
  children_pending = p.children_pending - 1,
  status = CASE WHEN p.children_pending = 1 THEN 'runnable' ELSE p.status END,
  eligible_at = CASE WHEN p.children_pending = 1 THEN now() ELSE p.eligible_at END,
  dispatch_at = CASE WHEN p.children_pending = 1 AND NOT p.held
                     THEN now() + make_interval(secs => :redispatch) ELSE p.dispatch_at END,
  dispatched_at = CASE WHEN p.children_pending = 1 AND NOT p.held
                       THEN now() ELSE p.dispatched_at END,
  dispatch_count = CASE WHEN p.children_pending = 1 AND NOT p.held
                        THEN 1 ELSE p.dispatch_count END,
  updated_at = now()
WHERE p.id = :parent_id AND p.status = 'awaiting_children' AND p.visit = :spawn_seq
  AND p.children_pending > 0
RETURNING p.id, p.workflow, p.step, p.seq, p.queue, p.priority, p.status, p.spawn_cap, p.held
""")

# The parent (locked by the caller) waits on spawn :spawn_seq with a cap: release held
# children in spawn order while fewer than the cap are started and not finished. Held rows
# locked by someone else are skipped; what could not be released is owed (spawn_owed).
RELEASE_SLOTS = _q("""
WITH p AS (
  SELECT id, spawn_cap FROM {S}.runs
  WHERE id = :parent_id AND status = 'awaiting_children' AND visit = :spawn_seq
    AND spawn_cap IS NOT NULL
), used AS (
  SELECT count(*) AS n FROM {S}.runs AS c
  WHERE c.parent_id = :parent_id AND c.spawn_seq = :spawn_seq AND NOT c.held
    AND c.finished_at IS NULL
), waiting AS (
  SELECT count(*) AS n FROM {S}.runs AS c
  WHERE c.parent_id = :parent_id AND c.spawn_seq = :spawn_seq AND c.held
    AND c.finished_at IS NULL
), free AS (
  SELECT LEAST(GREATEST(p.spawn_cap - used.n, 0), waiting.n) AS n FROM p, used, waiting
), pick AS (
  SELECT c.id FROM {S}.runs AS c
  WHERE c.parent_id = :parent_id AND c.spawn_seq = :spawn_seq AND c.held
    AND c.finished_at IS NULL
  ORDER BY c.child_index
  LIMIT (SELECT n FROM free)
  FOR UPDATE OF c SKIP LOCKED
), released AS (
  -- A runnable child is dispatched; one that waits (a resumed child back in its Await or
  -- its own join) just takes its slot and continues when its wait ends.
  UPDATE {S}.runs AS c SET
    held = false,
    eligible_at = CASE WHEN c.status = 'runnable' THEN GREATEST(c.eligible_at, now())
                       ELSE c.eligible_at END,
    dispatch_at = CASE WHEN c.status = 'runnable' THEN
                    CASE WHEN c.eligible_at > now() THEN c.eligible_at
                         ELSE now() + make_interval(secs => :redispatch) END END,
    dispatched_at = CASE WHEN c.status = 'runnable' AND c.eligible_at <= now() THEN now() END,
    dispatch_count = CASE WHEN c.status = 'runnable' AND c.eligible_at <= now() THEN 1
                          ELSE 0 END,
    updated_at = now()
  FROM pick WHERE c.id = pick.id
  RETURNING c.id, c.workflow, c.step, c.seq, c.queue, c.priority,
            c.status = 'runnable' AND c.dispatched_at IS NOT NULL AS publish
), owed AS (
  UPDATE {S}.runs SET spawn_owed = (SELECT n FROM free) - (SELECT count(*) FROM released)
  WHERE id = :parent_id AND EXISTS (SELECT 1 FROM p)
)
SELECT * FROM released
""")

# Parents owed a release (see RELEASE_SLOTS): locked in turn, skipping busy ones.
OWED = _q("""
SELECT id, visit FROM {S}.runs
WHERE spawn_owed > 0 AND status = 'awaiting_children'
ORDER BY id LIMIT :limit
FOR UPDATE SKIP LOCKED
""")
CLEAR_OWED = _q("""
UPDATE {S}.runs SET spawn_owed = 0 WHERE spawn_owed > 0 AND status <> 'awaiting_children'
""")


@dataclass(frozen=True, slots=True)
class Finished:
    """A child that just became terminal (its row is locked by the caller's transaction)."""

    parent_id: str
    spawn_seq: int | None


def insert_children(conn: sa.Connection, *, parent_id: str, spawn_seq: int, priority: int,
                    children: str, redispatch: float, app_version: str | None = None,
                    ) -> list[Dispatch]:
    """Insert a Spawn's children (JSON array text); returns those to publish now."""
    rows = conn.execute(INSERT_CHILDREN, {
        "children": children, "parent_id": parent_id, "spawn_seq": spawn_seq,
        "priority": priority, "redispatch": redispatch, "app_version": app_version,
    }).mappings().all()
    return [Dispatch.from_row(r) for r in rows if not r["held"]]


def children_finished(conn: sa.Connection, finished: Iterable[Finished], *,
                      redispatch: float) -> list[Dispatch]:
    """Count terminal children on their parents; returns the runs to publish (woken
    parents, released held siblings). Parents are locked in id order."""
    wakes: list[Dispatch] = []
    for child in sorted(finished, key=lambda f: f.parent_id):
        if child.spawn_seq is None:
            continue  # a run started with a parent_id by other means: nothing to count
        params = {"parent_id": child.parent_id, "spawn_seq": child.spawn_seq,
                  "redispatch": redispatch}
        parent = conn.execute(JOIN, params).mappings().first()
        if parent is None:
            continue  # the parent no longer waits for this spawn (cancelled, say)
        if parent["status"] == Status.RUNNABLE:
            if not parent["held"]:  # a held parent (a nested foreach child) waits its turn
                wakes.append(Dispatch.from_row(parent))
        elif parent["spawn_cap"] is not None:
            wakes += release_slots(conn, child.parent_id, child.spawn_seq, redispatch=redispatch)
    return wakes


def release_slots(conn: sa.Connection, parent_id: str, spawn_seq: int, *,
                  redispatch: float) -> list[Dispatch]:
    """Start held children of the parent's capped spawn while slots are free (the caller
    holds the parent's row lock); returns them, to publish after commit."""
    rows = conn.execute(RELEASE_SLOTS, {"parent_id": parent_id, "spawn_seq": spawn_seq,
                                        "redispatch": redispatch}).mappings().all()
    return [Dispatch.from_row(r) for r in rows if r["publish"]]


def pay_owed(conn: sa.Connection, *, limit: int, redispatch: float) -> list[Dispatch]:
    """The reaper's pass: releases owed to parents whose held child was locked before."""
    wakes: list[Dispatch] = []
    for parent_id, visit in conn.execute(OWED, {"limit": limit}).all():
        wakes += release_slots(conn, parent_id, visit, redispatch=redispatch)
    conn.execute(CLEAR_OWED)
    return wakes


# The run and every live descendant, locked deepest first: the order every other path takes
# (a child's terminal commit locks the child, then its parent, to count on it). What the
# run was doing is kept for resume: the status it had (cancelled_from), its awaited names
# and deadline, its due time, its join counter.
CANCEL_TREE = _q("""
WITH RECURSIVE tree AS (
  SELECT id, 0 AS depth FROM {S}.runs WHERE id = :id
  UNION
  SELECT c.id, t.depth + 1 FROM {S}.runs AS c JOIN tree AS t ON c.parent_id = t.id
  WHERE t.depth < 100
), locked AS (
  SELECT r.id FROM {S}.runs AS r JOIN tree USING (id)
  WHERE r.finished_at IS NULL
  ORDER BY tree.depth DESC, r.id
  FOR UPDATE OF r
)
UPDATE {S}.runs AS r SET
  status = 'cancelled', cancelled_from = r.status, finished_at = now(), updated_at = now(),
  error = jsonb_build_object('type', 'Cancelled',
                             'message', COALESCE(CAST(:reason AS text), 'cancelled'),
                             'reason', CAST(:reason AS text), 'cancelled_by', CAST(:root AS text)),
  owner = NULL, lease = NULL, started_at = NULL, dispatch_at = NULL, spawn_owed = 0
FROM locked WHERE r.id = locked.id AND r.finished_at IS NULL
RETURNING r.id, r.parent_id, r.spawn_seq
""")


def cancel_tree(conn: sa.Connection, workflow_id: str, reason: str | None, *,
                redispatch: float) -> tuple[list[str], list[Dispatch]]:
    """Cancel the run and its live descendants; returns the ids that changed and the
    runs to publish (a parent waiting for the cancelled run wakes like for any
    terminal child; a cancelled child frees a foreach slot). Used by the cancel control,
    a singleton's ``replace`` and a passed deadline (its children)."""
    params = {"id": workflow_id, "reason": reason, "root": workflow_id}
    rows: list[Any] = []
    for _ in range(10):
        # A Spawn committing while we cancel: its parent is cancelled now (it waited
        # for the row lock), so no new child can appear; the next pass, a new statement
        # with a new snapshot, cancels the children that Spawn inserted.
        found = conn.execute(CANCEL_TREE, params).mappings().all()
        rows += found
        if not found:
            break
    wakes = children_finished(conn, [
        Finished(r["parent_id"], r["spawn_seq"])
        for r in rows if r["parent_id"] is not None], redispatch=redispatch)
    return [str(r["id"]) for r in rows], wakes
