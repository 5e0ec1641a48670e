"""What every module of statements shares: the schema name, ``q()`` and the wake-up NOTIFY."""

from __future__ import annotations

import sqlalchemy as sa

from durable_celery.storage import migrate

S = migrate.SCHEMA
WAKEUP_CHANNEL = "durable_celery_wakeup"
DISPATCH_COLUMNS = "id, workflow, step, seq, queue, priority"

# The runs that hold their business key (the predicate of the unique index runs_key_idx):
# every live run, and the finished runs whose key_reuse policy keeps it.
KEY_HELD = ("(finished_at IS NULL OR key_reuse = 'reject' "
            "OR (key_reuse = 'after_failure' AND status = 'done'))")


def q(sql: str) -> sa.TextClause:
    """A statement with ``{S}`` naming our schema."""
    return sa.text(sql.replace("{S}", S))


# Wakes every coordinator (LISTEN): a nearer timer, or runs handed back to runnable.
NOTIFY = q(f"SELECT pg_notify('{WAKEUP_CHANNEL}', '')")
