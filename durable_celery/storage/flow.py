"""The statements of flow control: token buckets (rate limits, throttles), debounce,
singletons and run deadlines. See docs/flow-control.md for what each guarantees.

A token bucket is one row per (limit, key), updated by the generic cell rate algorithm
in one upsert: a start takes the earliest slot the limit allows (now, or later) and moves
the bucket on. A start whose slot is later waits for it as a timer (the run is runnable
with ``eligible_at`` at the slot): it holds no worker and no broker message, and nobody
polls. Slots are handed out in the order starts ask for them, so a key's backlog only
pushes back that key's own slots.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from psycopg.rows import dict_row

from durable_celery import errors
from durable_celery.storage import composition
from durable_celery.storage.engine import EngineHolder, driver_sql
from durable_celery.storage.records import Claim
from durable_celery.storage.sql import WAKEUP_CHANNEL
from durable_celery.storage.sql import q as _q


@dataclass(frozen=True, slots=True, kw_only=True)
class Bucket:
    """A token to take: bucket ``name``/``key`` with its spacing and tolerance (seconds)."""

    name: str
    key: str
    interval: float
    tolerance: float

    def describe(self) -> str:
        return self.name if not self.key else f"{self.name}[{self.key}]"


@dataclass(frozen=True, slots=True, kw_only=True)
class StartPolicy:
    """The flow control one start goes through, computed from the workflow's policies and
    the start's state (``durable_celery.flow.start_policy``)."""

    tokens: tuple[Bucket, ...] = ()       # the first step's rate limits, taken at the start
    throttle: Bucket | None = None
    drop: bool = False                    # the throttle refuses instead of delaying
    deadline: float | None = None         # seconds from now
    deadline_at: datetime | None = None
    debounce_key: str | None = None
    debounce_seconds: float = 0.0
    debounce_max_wait: float | None = None
    merge: Callable[[Any, str], str] | None = None   # (pending state, new state text) -> text
    singleton_key: str | None = None
    singleton: str = "reject"


NO_POLICY = StartPolicy()


@dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    """What the policies decided for the row to insert."""

    pending: str | None = None   # folded into this pending run: insert nothing
    delay: float = 0.0
    at: datetime | None = None
    held: bool = False
    token_seq: int | None = None
    waiting: str | None = None   # JSON for waiting_for

# The upsert every token takes. ``t`` = when the start wants to go (now, or its due time);
# slot = max(t, tat - tolerance); tat moves to max(tat, t) + interval.
_WANTED = ("GREATEST(now(), COALESCE(CAST(:not_before AS timestamptz), "
           "now() + make_interval(secs => CAST(:delay AS float8))))")
_TAKE = f"""
  INSERT INTO {{S}}.rate_buckets AS b (name, key, tat, last_slot, interval_s, tolerance_s)
  SELECT i.name, i.key, {_WANTED} + make_interval(secs => i.interval_s),
         {_WANTED}, i.interval_s, i.tolerance_s
  FROM unnest(CAST(:names AS text[]), CAST(:keys AS text[]),
              CAST(:intervals AS float8[]), CAST(:tolerances AS float8[]))
       AS i(name, key, interval_s, tolerance_s)
  ON CONFLICT (name, key) DO UPDATE SET
    last_slot = GREATEST(EXCLUDED.last_slot,
                         b.tat - make_interval(secs => EXCLUDED.tolerance_s)),
    tat = GREATEST(b.tat, EXCLUDED.last_slot) + make_interval(secs => EXCLUDED.interval_s),
    interval_s = EXCLUDED.interval_s, tolerance_s = EXCLUDED.tolerance_s
"""

# A claimed step takes its tokens: one statement (autocommit, one round trip). The run
# records that this seq holds them (a claim of the same attempt again takes none); when
# the slot is more than :park_after seconds away, the run is handed back to wait for it
# as a timer (a wake-up tells the dispatchers to plan for it).
TAKE_FOR_STEP = _q(f"""
WITH res AS ({_TAKE} RETURNING b.name, b.key, b.last_slot
), slot AS (
  SELECT max(last_slot) AS at, max(last_slot) > now() + make_interval(secs => :park_after)
         AS parked
  FROM res
), woken AS (
  SELECT pg_notify('{WAKEUP_CHANNEL}', '') FROM slot WHERE slot.parked
)
UPDATE {{S}}.runs AS r SET
  token_seq = r.seq,
  status = CASE WHEN slot.parked THEN 'runnable' ELSE r.status END,
  owner = CASE WHEN slot.parked THEN NULL ELSE r.owner END,
  lease = CASE WHEN slot.parked THEN NULL ELSE r.lease END,
  started_at = CASE WHEN slot.parked THEN NULL ELSE r.started_at END,
  eligible_at = CASE WHEN slot.parked THEN slot.at ELSE r.eligible_at END,
  dispatch_at = CASE WHEN slot.parked THEN slot.at ELSE r.dispatch_at END,
  dispatched_at = CASE WHEN slot.parked THEN NULL ELSE r.dispatched_at END,
  dispatch_count = CASE WHEN slot.parked THEN 0 ELSE r.dispatch_count END,
  -- the limits whose slot it waits for (the latest of them)
  waiting_for = CASE WHEN slot.parked THEN jsonb_build_object(
      'kind', 'rate_limit', 'until', slot.at,
      'limits', (SELECT jsonb_agg(jsonb_build_object('name', res.name, 'key', res.key))
                 FROM res WHERE res.last_slot = slot.at)) END,
  updated_at = CASE WHEN slot.parked THEN now() ELSE r.updated_at END
FROM slot, (SELECT count(*) FROM woken) AS w
WHERE r.id = :id AND r.lease = :lease AND r.seq = :seq AND r.status = 'executing'
RETURNING EXTRACT(EPOCH FROM slot.at - clock_timestamp())::float8 AS wait, slot.parked
""")
TAKE_FOR_STEP_SQL = driver_sql(TAKE_FOR_STEP)

# A start takes its tokens in its own transaction, before its row is inserted; returns
# each bucket's slot.
TAKE_FOR_START = _q(f"{_TAKE} RETURNING b.name, b.key, b.last_slot")

# A dropping throttle takes a token only if one is free at the start's due time.
TAKE_IF_FREE = _q(f"""{_TAKE}
    WHERE b.tat - make_interval(secs => EXCLUDED.tolerance_s) <= EXCLUDED.last_slot
RETURNING b.last_slot""")

RETRY_AFTER = _q("""
SELECT GREATEST(EXTRACT(EPOCH FROM tat - make_interval(secs => tolerance_s) - now()), 0)::float8
FROM {S}.rate_buckets WHERE name = :name AND key = :key
""")

# --- debounce

# The pending run of a debounce key (not started yet), locked: a start that finds it
# updates it instead of inserting. A claim that got there first makes it not pending
# (the re-check after the lock wait sees that), and the start inserts a new one.
PENDING = _q("""
SELECT id, state FROM {S}.runs
WHERE debounce_key = :key AND status = 'runnable' AND seq = 0 AND owner IS NULL
FOR UPDATE
""")

EXTEND = _q("""
UPDATE {S}.runs SET state = CAST(:state AS jsonb), input = CAST(:state AS jsonb),
    eligible_at = LEAST(now() + make_interval(secs => :seconds),
                        created_at + make_interval(secs => CAST(:max_wait AS float8))),
    dispatch_at = LEAST(now() + make_interval(secs => :seconds),
                        created_at + make_interval(secs => CAST(:max_wait AS float8))),
    dispatched_at = NULL, dispatch_count = 0, updated_at = now(),
    waiting_for = jsonb_build_object('kind', 'debounce', 'key', CAST(:key AS text),
                                     'starts', COALESCE((waiting_for ->> 'starts')::int, 1) + 1)
WHERE id = :id AND status = 'runnable' AND seq = 0 AND owner IS NULL
RETURNING id
""")

# --- singletons

LOCK_SINGLETON = _q(
    "SELECT pg_advisory_xact_lock(hashtextextended('durable_celery.singleton:' || :key, 0))")

LIVE_HOLDERS = _q("""
SELECT id, status FROM {S}.runs
WHERE singleton_key = :key AND finished_at IS NULL AND NOT held
ORDER BY created_at, id
""")

# replace: the live runs' rows are locked before the advisory lock, the order a finishing
# run takes (its row, then the lock in the release trigger).
LOCK_HOLDERS = _q("""
SELECT id FROM {S}.runs
WHERE singleton_key = :key AND finished_at IS NULL AND NOT held
ORDER BY id FOR UPDATE
""")

LOCK_NOWAIT = _q("SELECT id FROM {S}.runs WHERE id = ANY(CAST(:ids AS text[])) FOR UPDATE NOWAIT")

# A start that met a busy singleton row (see singleton_holders) starts over.
LOCK_NOT_AVAILABLE = "55P03"

# --- deadlines

# A run whose deadline passed, taken over under a new lease (a worker executing it loses
# its lease: its outcome is dropped, as after a cancel). The deadline is cleared: it fires
# once. A compensating run is left to its compensations.
TAKE_EXPIRED = _q("""
WITH due AS (
  SELECT id, status AS was, deadline_at FROM {S}.runs
  WHERE deadline_at <= now() AND finished_at IS NULL
  ORDER BY deadline_at
  LIMIT 1
  FOR UPDATE SKIP LOCKED
)
UPDATE {S}.runs AS r SET
  deadline_at = NULL,
  status = CASE WHEN due.was = 'compensating' THEN r.status ELSE 'executing' END,
  lease = CASE WHEN due.was = 'compensating' THEN r.lease ELSE :lease END,
  owner = CASE WHEN due.was = 'compensating' THEN r.owner END,
  started_at = CASE WHEN due.was = 'compensating' THEN r.started_at ELSE now() END,
  held = CASE WHEN due.was = 'compensating' THEN r.held ELSE false END
FROM due WHERE r.id = due.id
RETURNING r.id, r.workflow, r.version, r.step, r.seq, r.visit, r.attempt, r.state, r.key,
          r.run_queue, r.queue, r.priority, r.timed_out, r.concurrency_key, r.parent_id,
          r.status, r.compensations, r.compensation_errors, r.failure, r.single_step,
          due.was, due.deadline_at, NULL::jsonb AS children, NULL::jsonb AS signals
""")

LIVE_CHILDREN = _q("""
SELECT id FROM {S}.runs WHERE parent_id = :id AND finished_at IS NULL ORDER BY id
""")


def _bucket_params(buckets: Sequence[Bucket]) -> dict[str, Any]:
    return {"names": [b.name for b in buckets], "keys": [b.key for b in buckets],
            "intervals": [float(b.interval) for b in buckets],
            "tolerances": [float(b.tolerance) for b in buckets]}


def take_for_step(holder: EngineHolder, claim: Claim, buckets: Sequence[Bucket], *,
                  park_after: float) -> tuple[float, bool] | None:
    """Take a token from each bucket for the claimed step: ``(seconds until the slot,
    parked)``, or None when the claim's lease no longer holds the run."""
    params = {**_bucket_params(buckets), "not_before": None, "delay": 0.0,
              "id": claim.workflow_id,
              "lease": claim.lease, "seq": claim.seq, "park_after": park_after}
    with holder.raw() as conn:
        row = conn.cursor(row_factory=dict_row).execute(TAKE_FOR_STEP_SQL, params).fetchone()
    if row is None:
        return None
    return float(row["wait"]), bool(row["parked"])


def take_for_start(conn: sa.Connection, buckets: Sequence[Bucket], *,
                   not_before: datetime | None, delay: float,
                   ) -> list[tuple[str, str, datetime]]:
    """Take a token from each bucket for a start due at ``not_before`` (None: in
    ``delay`` seconds); returns each bucket's (name, key, slot)."""
    rows = conn.execute(TAKE_FOR_START, {**_bucket_params(buckets), "not_before": not_before,
                                         "delay": delay}).all()
    return [(str(r[0]), str(r[1]), r[2]) for r in rows]


def take_if_free(conn: sa.Connection, bucket: Bucket, *, not_before: datetime | None,
                 delay: float) -> bool:
    """A dropping throttle: take the token only if it is free at the due time."""
    row = conn.execute(TAKE_IF_FREE, {**_bucket_params([bucket]), "not_before": not_before,
                                      "delay": delay}).first()
    return row is not None


def apply_start_policy(conn: sa.Connection, policy: StartPolicy, *, state: str, delay: float,
                       at: datetime | None, redispatch: float) -> Applied:
    """Run a start through its flow control, in its transaction, before its row is
    inserted: debounce (fold into the pending run), singleton (reject, queue held, or
    cancel the live run), throttle (drop, or a later slot), the first step's rate limits
    (their tokens, taken now: the run waits for its slot as a timer, in the order starts
    came, so a backlog never fills the broker)."""
    if policy is NO_POLICY:
        return Applied(delay=delay, at=at)
    waiting: dict[str, Any] | None = None
    held = False
    if policy.debounce_key is not None:
        merge = policy.merge or (lambda _pending, new: new)
        pending = debounce(conn, key=policy.debounce_key, state=state,
                           seconds=policy.debounce_seconds, max_wait=policy.debounce_max_wait,
                           merge=merge)
        if pending is not None:
            return Applied(pending=pending)
        delay, at = max(delay, policy.debounce_seconds), None
        waiting = {"kind": "debounce", "key": policy.debounce_key, "starts": 1}
    if policy.singleton_key is not None:
        live = singleton_holders(conn, policy.singleton_key,
                                 replace=policy.singleton == "replace")
        if live and policy.singleton == "reject":
            raise errors.DuplicateWorkflow(
                f"singleton key {policy.singleton_key!r} is held by live run {live[0]!r}",
                existing_id=live[0], key=None, singleton_key=policy.singleton_key)
        if live and policy.singleton == "queue":
            held = True
            waiting = {"kind": "singleton", "key": policy.singleton_key, "behind": live[0]}
        elif live:
            for holder in live:
                composition.cancel_tree(
                    conn, holder, f"replaced by a new run of singleton key "
                    f"{policy.singleton_key!r}", redispatch=redispatch)
    slots: list[tuple[str, str, datetime]] = []
    if policy.throttle is not None:
        if policy.drop:
            if not take_if_free(conn, policy.throttle, not_before=at, delay=delay):
                wait = retry_after(conn, policy.throttle)
                raise errors.Throttled(
                    f"throttled: {policy.throttle.describe()} allows no start now; try again "
                    f"in {wait:.3f}s", retry_after=wait, key=policy.throttle.key)
        else:
            slots += take_for_start(conn, [policy.throttle], not_before=at, delay=delay)
    token_seq = None
    if policy.tokens:
        slots += take_for_start(conn, policy.tokens, not_before=at, delay=delay)
        token_seq = 0
    if slots:
        latest = max(slot for _, _, slot in slots)
        later = conn.execute(_q("SELECT CAST(:slot AS timestamptz) > "
                                "COALESCE(CAST(:at AS timestamptz), "
                                "now() + make_interval(secs => :delay))"),
                             {"slot": latest, "at": at, "delay": delay}).scalar()
        if later:
            binding = [{"name": name, "key": key} for name, key, slot in slots
                       if slot == latest]
            throttled = policy.throttle is not None and binding[0]["name"] == policy.throttle.name
            waiting = {"kind": "throttle" if throttled else "rate_limit", "limits": binding,
                       "until": latest.isoformat()}
            at = latest
    return Applied(delay=delay, at=at, held=held, token_seq=token_seq,
                   waiting=None if waiting is None else json.dumps(waiting))


def retry_after(conn: sa.Connection, bucket: Bucket) -> float:
    value = conn.execute(RETRY_AFTER, {"name": bucket.name, "key": bucket.key}).scalar()
    return float(value or 0.0)


def debounce(conn: sa.Connection, *, key: str, state: str, seconds: float,
             max_wait: float | None, merge: Callable[[Any, Any], str]) -> str | None:
    """Fold a start into the pending run of ``key``; its id, or None when there is none
    (the caller inserts one). ``merge(pending_state, new_state_text)`` returns the text of
    the state the run will start with."""
    found = conn.execute(PENDING, {"key": key}).mappings().first()
    if found is None:
        return None
    merged = merge(found["state"], state)
    row = conn.execute(EXTEND, {"id": found["id"], "state": merged, "seconds": seconds,
                                "max_wait": max_wait if max_wait is not None else 1e9,
                                "key": key}).first()
    if row is None:
        return None
    return str(row[0])


def singleton_holders(conn: sa.Connection, key: str, *, replace: bool) -> list[str]:
    """Take the singleton's lock for ``key`` (held to the end of the transaction) and
    return its live runs (normally at most one).

    With ``replace`` (the live runs are cancelled next), their rows are locked first: the
    order a finishing run takes (its row, then this lock, in the release trigger). A live
    run that appeared between the two is locked without waiting: if its row is busy, the
    start fails with ``lock_not_available`` (55P03) and its caller starts over, so a
    start never waits on a row while holding the lock."""
    locked: set[str] = set()
    if replace:
        locked = {str(r[0]) for r in conn.execute(LOCK_HOLDERS, {"key": key}).all()}
    conn.execute(LOCK_SINGLETON, {"key": key})
    live = [str(r[0]) for r in conn.execute(LIVE_HOLDERS, {"key": key}).all()]
    extra = [i for i in live if i not in locked]
    if replace and extra:
        conn.execute(LOCK_NOWAIT, {"ids": extra}).all()
    return live


def take_expired(conn: sa.Connection, lease: str) -> tuple[Claim, str, datetime] | None:
    """The next run whose deadline passed, taken under ``lease``: ``(claim, the status it
    had, its deadline)``, or None when none is due."""
    row = conn.execute(TAKE_EXPIRED, {"lease": lease}).mappings().first()
    if row is None:
        return None
    return Claim.from_row(row, lease), str(row["was"]), row["deadline_at"]


def live_children(conn: sa.Connection, workflow_id: str) -> list[str]:
    return [str(r[0]) for r in conn.execute(LIVE_CHILDREN, {"id": workflow_id}).all()]




# --- explain: what a run waits for

EXPLAIN = _q("""
SELECT r.id, r.workflow, r.version, r.status, r.step, r.seq, r.attempt, r.queue, r.held,
       r.eligible_at, r.eligible_at > now() AS later, r.dispatch_at, r.dispatched_at,
       r.dispatch_count, r.await_names, r.await_all, r.await_deadline, r.updated_at,
       r.children_pending, r.spawn_cap, r.parent_id, r.owner, r.started_at,
       r.concurrency_key, r.singleton_key, r.debounce_key, r.waiting_for, r.deadline_at,
       r.finished_at, r.error, now() AS now,
       (SELECT h.outcome FROM {S}.steps AS h WHERE h.run_id = r.id ORDER BY h.seq DESC
         LIMIT 1) AS last_outcome,
       (SELECT e.id FROM {S}.runs AS e
         WHERE r.concurrency_key IS NOT NULL AND e.concurrency_key = r.concurrency_key
           AND e.id <> r.id
           AND (e.status = 'executing' OR (e.status = 'compensating' AND e.owner IS NOT NULL))
         LIMIT 1) AS key_holder,
       (SELECT o.id FROM {S}.runs AS o
         WHERE r.singleton_key IS NOT NULL AND o.singleton_key = r.singleton_key
           AND o.finished_at IS NULL AND NOT o.held AND o.id <> r.id
         ORDER BY o.created_at LIMIT 1) AS singleton_holder,
       (SELECT count(*) FROM {S}.runs AS c WHERE c.parent_id = r.id AND c.spawn_seq = r.visit)
         AS children_total,
       (SELECT array_agg(DISTINCT s.name) FROM {S}.signals AS s
         WHERE s.run_id = r.id AND s.consumed_at IS NULL) AS pending_signals,
       (SELECT count(*) FROM {S}.workers AS w
         WHERE w.heartbeat_at >= now() - make_interval(secs => :stale)) AS live_workers,
       EXISTS (SELECT 1 FROM {S}.workers AS w WHERE w.id = r.owner
                 AND w.heartbeat_at >= now() - make_interval(secs => :stale)) AS owner_alive
FROM {S}.runs AS r WHERE r.id = :id
""")


def explain_row(holder: EngineHolder, workflow_id: str, *, stale_after: float,
                ) -> dict[str, Any] | None:
    with holder.connect() as conn:
        row = conn.execute(EXPLAIN, {"id": workflow_id, "stale": stale_after}).mappings().first()
    return None if row is None else dict(row)
