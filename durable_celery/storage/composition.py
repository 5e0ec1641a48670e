"""The SQL of composition: inserting a Spawn's children, and the join.

The join is a counter on the parent row (``children_pending``). Every transition that
makes a child terminal runs :func:`children_finished` in its own transaction, after the
guarded statement that finished the child: the child row is locked first, then the parent
(always this order). The decrement is guarded by the parent's status and by the spawn the
child belongs to (``spawn_seq`` = the parent's ``visit`` while it waits), so a child is
counted once, and only by the spawn that started it. The statement that takes the counter
to zero makes the parent runnable at its next step; the caller publishes it after commit.

foreach's concurrency cap: children past the cap are inserted ``held`` (never claimed,
never dispatched). A child that finishes while it was not held releases the next held
sibling in spawn order, in the same transaction (under the parent's row lock, so two
children finishing at once release two different siblings).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from durable_celery.storage.records import Dispatch
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
  dispatch_at = CASE WHEN p.children_pending = 1
                     THEN now() + make_interval(secs => :redispatch) ELSE p.dispatch_at END,
  dispatched_at = CASE WHEN p.children_pending = 1 THEN now() ELSE p.dispatched_at END,
  dispatch_count = CASE WHEN p.children_pending = 1 THEN 1 ELSE p.dispatch_count END,
  updated_at = now()
WHERE p.id = :parent_id AND p.status = 'awaiting_children' AND p.visit = :spawn_seq
  AND p.children_pending > 0
RETURNING p.id, p.workflow, p.step, p.seq, p.queue, p.priority, p.status
""")

RELEASE_HELD = _q("""
UPDATE {S}.runs AS c SET
  held = false, eligible_at = now(), dispatch_at = now() + make_interval(secs => :redispatch),
  dispatched_at = now(), dispatch_count = 1, updated_at = now()
WHERE c.id = (SELECT h.id FROM {S}.runs AS h
              WHERE h.parent_id = :parent_id AND h.held AND h.spawn_seq = :spawn_seq
                AND h.status = 'runnable'
              ORDER BY h.child_index
              LIMIT 1
              FOR UPDATE SKIP LOCKED)
RETURNING c.id, c.workflow, c.step, c.seq, c.queue, c.priority
""")


@dataclass(frozen=True, slots=True)
class Finished:
    """A child that just became terminal (its row is locked by the caller's transaction)."""

    parent_id: str
    spawn_seq: int | None
    held: bool = False    # it never started (held behind the cap): it frees no slot


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
        if parent["status"] == "runnable":
            wakes.append(Dispatch.from_row(parent))
        elif not child.held:
            released = conn.execute(RELEASE_HELD, params).mappings().first()
            if released is not None:
                wakes.append(Dispatch.from_row(released))
    return wakes
