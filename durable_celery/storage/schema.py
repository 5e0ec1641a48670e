"""The schema the code expects; tests/migration checks that the migrations produce exactly this.

SQLAlchemy Core tables mirroring ``migrations/*.sql`` (applied in order) plus the
``schema_version`` table that :mod:`durable_celery.storage.migrate` creates. The migrations
stay the source of truth for the database; this module is the reviewed, declarative picture
of their result. Change both together: a new migration and the matching edit here.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from durable_celery.storage.migrate import SCHEMA

metadata = sa.MetaData(schema=SCHEMA)

TIMESTAMPTZ = sa.DateTime(timezone=True)
NOW = sa.text("now()")
ZERO = sa.text("0")

RUN_STATUSES = ("runnable", "executing", "awaiting", "awaiting_children", "compensating",
                "done", "failed", "cancelled", "compensated", "compensation_failed")

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("applied_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("workflow", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("queue", sa.Text, nullable=False),
    sa.Column("run_queue", sa.Text, nullable=True),
    sa.Column("priority", sa.SmallInteger, nullable=False, server_default=ZERO),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("step", sa.Text, nullable=False),
    sa.Column("seq", sa.Integer, nullable=False, server_default=ZERO),
    sa.Column("visit", sa.Integer, nullable=False, server_default=ZERO),
    sa.Column("attempt", sa.Integer, nullable=False, server_default=ZERO),
    sa.Column("recoveries", sa.Integer, nullable=False, server_default=ZERO),
    sa.Column("state", postgresql.JSONB, nullable=False),
    sa.Column("input", postgresql.JSONB, nullable=False),
    sa.Column("result", postgresql.JSONB, nullable=True),
    sa.Column("error", postgresql.JSONB, nullable=True),
    sa.Column("key", sa.Text, nullable=True),
    sa.Column("parent_id", sa.Text, nullable=True),
    sa.Column("eligible_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    sa.Column("dispatch_at", TIMESTAMPTZ, nullable=True),
    sa.Column("dispatched_at", TIMESTAMPTZ, nullable=True),
    sa.Column("dispatch_count", sa.Integer, nullable=False, server_default=ZERO),
    sa.Column("await_names", postgresql.ARRAY(sa.Text), nullable=True),
    sa.Column("await_deadline", TIMESTAMPTZ, nullable=True),
    sa.Column("timed_out", sa.Boolean, nullable=False, server_default=sa.text("false")),
    sa.Column("owner", sa.Text, nullable=True),
    sa.Column("lease", sa.Text, nullable=True),
    sa.Column("started_at", TIMESTAMPTZ, nullable=True),
    sa.Column("created_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    sa.Column("updated_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    sa.Column("finished_at", TIMESTAMPTZ, nullable=True),
    sa.Column("forked_from", sa.Text, nullable=True),
    sa.Column("app_version", sa.Text, nullable=True),
    sa.Column("concurrency_key", sa.Text, nullable=True),
    # migration 4: composition
    sa.Column("children_pending", sa.Integer, nullable=False, server_default=ZERO),
    sa.Column("child_index", sa.Integer, nullable=True),
    sa.Column("spawn_seq", sa.Integer, nullable=True),
    sa.Column("held", sa.Boolean, nullable=False, server_default=sa.text("false")),
    sa.Column("single_step", sa.Boolean, nullable=False, server_default=sa.text("false")),
    sa.Column("await_all", sa.Boolean, nullable=False, server_default=sa.text("false")),
    sa.Column("compensations", postgresql.JSONB, nullable=False,
              server_default=sa.text("'[]'::jsonb")),
    sa.Column("compensation_errors", postgresql.JSONB, nullable=False,
              server_default=sa.text("'[]'::jsonb")),
    sa.Column("failure", postgresql.JSONB, nullable=True),
    # migration 5: the edges
    sa.Column("key_reuse", sa.Text, nullable=False, server_default=sa.text("'reject'::text")),
    sa.Column("cancelled_from", sa.Text, nullable=True),
    sa.Column("spawn_cap", sa.Integer, nullable=True),
    sa.Column("spawn_owed", sa.Integer, nullable=False, server_default=ZERO),
    # migration 6: flow control
    sa.Column("token_seq", sa.Integer, nullable=True),
    sa.Column("waiting_for", postgresql.JSONB, nullable=True),
    sa.Column("deadline_at", TIMESTAMPTZ, nullable=True),
    sa.Column("debounce_key", sa.Text, nullable=True),
    sa.Column("singleton_key", sa.Text, nullable=True),
    sa.CheckConstraint("key_reuse IN ('reject', 'after_failure', 'after_finish')",
                       name="runs_key_reuse_check"),
    sa.CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in RUN_STATUSES) + ")",
        name="runs_status_check",
    ),
    sa.CheckConstraint("priority BETWEEN 0 AND 9", name="runs_priority_check"),
)

sa.Index("runs_dispatch_idx", runs.c.dispatch_at,
         postgresql_where=sa.text("status = ANY (ARRAY['runnable', 'compensating'])"))
sa.Index("runs_owner_idx", runs.c.owner,
         postgresql_where=sa.text("status = ANY (ARRAY['executing', 'compensating'])"))
sa.Index("runs_deadline_idx", runs.c.await_deadline,
         postgresql_where=sa.text("status = 'awaiting' AND await_deadline IS NOT NULL"))
sa.Index("runs_key_idx", runs.c.key, unique=True,
         postgresql_where=sa.text("key IS NOT NULL AND (finished_at IS NULL OR "
                                  "key_reuse = 'reject' OR "
                                  "(key_reuse = 'after_failure' AND status = 'done'))"))
sa.Index("runs_parent_idx", runs.c.parent_id,
         postgresql_where=sa.text("parent_id IS NOT NULL"))
sa.Index("runs_finished_idx", runs.c.finished_at,
         postgresql_where=sa.text("finished_at IS NOT NULL"))
sa.Index("runs_workflow_created_idx", runs.c.workflow, runs.c.created_at)
sa.Index("runs_concurrency_key_idx", runs.c.concurrency_key, unique=True,
         postgresql_where=sa.text("concurrency_key IS NOT NULL AND (status = 'executing' "
                                  "OR (status = 'compensating' AND owner IS NOT NULL))"))
sa.Index("runs_concurrency_wait_idx", runs.c.concurrency_key, runs.c.priority, runs.c.eligible_at,
         postgresql_where=sa.text("concurrency_key IS NOT NULL AND (status = 'runnable' "
                                  "OR (status = 'compensating' AND owner IS NULL))"))
sa.Index("runs_spawn_owed_idx", runs.c.id, postgresql_where=sa.text("spawn_owed > 0"))
sa.Index("runs_held_idx", runs.c.parent_id, runs.c.child_index, postgresql_where=sa.text("held"))
sa.Index("runs_run_deadline_idx", runs.c.deadline_at,
         postgresql_where=sa.text("deadline_at IS NOT NULL AND finished_at IS NULL"))
sa.Index("runs_debounce_idx", runs.c.debounce_key, unique=True,
         postgresql_where=sa.text("debounce_key IS NOT NULL AND status = 'runnable' AND seq = 0 "
                                  "AND owner IS NULL"))
sa.Index("runs_singleton_idx", runs.c.singleton_key, runs.c.created_at,
         postgresql_where=sa.text("singleton_key IS NOT NULL AND finished_at IS NULL"))

# migration 5: a run that ends notifies durable_celery_done with its id (wait_result).
NOTIFY_DONE = f"""
CREATE FUNCTION {SCHEMA}.notify_done() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('durable_celery_done', NEW.id);
    RETURN NULL;
END
$$;
CREATE TRIGGER runs_notify_done AFTER UPDATE OF finished_at ON {SCHEMA}.runs
    FOR EACH ROW WHEN (OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL)
    EXECUTE FUNCTION {SCHEMA}.notify_done();
"""
sa.event.listen(runs, "after_create",
                sa.DDL(NOTIFY_DONE.replace("%", "%%")))  # type: ignore[no-untyped-call]

# migration 6: a singleton run that ends releases the oldest run queued behind its key.
RELEASE_SINGLETON = f"""
CREATE FUNCTION {SCHEMA}.release_singleton() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('durable_celery.singleton:' || NEW.singleton_key, 0));
    UPDATE {SCHEMA}.runs SET held = false, eligible_at = GREATEST(eligible_at, now()),
        dispatch_at = GREATEST(eligible_at, now()), dispatched_at = NULL, dispatch_count = 0,
        waiting_for = NULL, updated_at = now()
    WHERE id = (SELECT q.id FROM {SCHEMA}.runs AS q
                WHERE q.singleton_key = NEW.singleton_key AND q.held AND q.parent_id IS NULL
                  AND q.finished_at IS NULL
                ORDER BY q.created_at, q.id LIMIT 1)
      AND NOT EXISTS (SELECT 1 FROM {SCHEMA}.runs AS o
                      WHERE o.singleton_key = NEW.singleton_key AND o.finished_at IS NULL
                        AND NOT o.held AND o.id <> NEW.id);
    IF FOUND THEN
        PERFORM pg_notify('durable_celery_wakeup', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER runs_release_singleton AFTER UPDATE OF finished_at ON {SCHEMA}.runs
    FOR EACH ROW WHEN (OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL
                       AND NEW.singleton_key IS NOT NULL)
    EXECUTE FUNCTION {SCHEMA}.release_singleton();
"""
sa.event.listen(runs, "after_create",
                sa.DDL(RELEASE_SINGLETON.replace("%", "%%")))  # type: ignore[no-untyped-call]

steps = sa.Table(
    "steps", metadata,
    sa.Column("run_id", sa.Text, sa.ForeignKey(runs.c.id, ondelete="CASCADE"),
              primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("step", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("next_step", sa.Text, nullable=True),
    sa.Column("state", postgresql.JSONB, nullable=False),
    sa.Column("error", postgresql.JSONB, nullable=True),
    sa.Column("started_at", TIMESTAMPTZ, nullable=True),
    sa.Column("finished_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    sa.Column("worker", sa.Text, nullable=True),
)

signals = sa.Table(
    "signals", metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("run_id", sa.Text, sa.ForeignKey(runs.c.id, ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("payload", postgresql.JSONB, nullable=True),
    sa.Column("dedup_key", sa.Text, nullable=True),
    sa.Column("created_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    sa.Column("delivered_at", TIMESTAMPTZ, nullable=True),
    sa.Column("consumed_at", TIMESTAMPTZ, nullable=True),
    sa.Column("consumed_seq", sa.Integer, nullable=True),
    sa.UniqueConstraint("run_id", "dedup_key", name="signals_dedup_key"),
)

sa.Index("signals_pending_idx", signals.c.run_id, signals.c.name,
         postgresql_where=sa.text("consumed_at IS NULL"))

workers = sa.Table(
    "workers", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("hostname", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("nodename", sa.Text, nullable=True),
    sa.Column("started_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    sa.Column("heartbeat_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
)

control_requests = sa.Table(
    "control_requests", metadata,
    sa.Column("request_key", sa.Text, primary_key=True),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("response", postgresql.JSONB, nullable=True),
    sa.Column("error", postgresql.JSONB, nullable=True),
    sa.Column("created_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    sa.Column("expires_at", TIMESTAMPTZ, nullable=False),
    sa.CheckConstraint("status IN ('succeeded', 'failed')", name="control_requests_status_check"),
)

sa.Index("control_requests_expires_idx", control_requests.c.expires_at)

schedules = sa.Table(
    "schedules", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("workflow", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("step", sa.Text, nullable=False),
    sa.Column("queue", sa.Text, nullable=False),
    sa.Column("cron", sa.Text, nullable=False),
    sa.Column("timezone", sa.Text, nullable=False),
    sa.Column("state", postgresql.JSONB, nullable=False),
    sa.Column("catchup", sa.Text, nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False, server_default=ZERO),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.text("false")),
    sa.Column("next_fire_at", TIMESTAMPTZ, nullable=False),
    sa.Column("last_fired_at", TIMESTAMPTZ, nullable=True),
    sa.Column("created_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    sa.Column("updated_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    sa.CheckConstraint("catchup IN ('latest', 'all', 'none')", name="schedules_catchup_check"),
    sa.CheckConstraint("priority BETWEEN 0 AND 9", name="schedules_priority_check"),
)

sa.Index("schedules_due_idx", schedules.c.next_fire_at, postgresql_where=sa.text("NOT paused"))

early_signals = sa.Table(
    "early_signals", metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("payload", postgresql.JSONB, nullable=True),
    sa.Column("dedup_key", sa.Text, nullable=True),
    sa.Column("created_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    sa.Column("expires_at", TIMESTAMPTZ, nullable=False),
    sa.UniqueConstraint("target", "dedup_key", name="early_signals_dedup_key"),
)

sa.Index("early_signals_expires_idx", early_signals.c.expires_at)

rate_buckets = sa.Table(
    "rate_buckets", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("tat", TIMESTAMPTZ, nullable=False),
    sa.Column("last_slot", TIMESTAMPTZ, nullable=False),
    sa.Column("interval_s", postgresql.DOUBLE_PRECISION, nullable=False),
    sa.Column("tolerance_s", postgresql.DOUBLE_PRECISION, nullable=False),
)
