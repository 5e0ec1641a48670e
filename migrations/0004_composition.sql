-- durable_celery schema, version 4: composition. Child runs and their join counter,
-- foreach concurrency, saga compensation, and Await(mode="all").

ALTER TABLE durable_celery.runs DROP CONSTRAINT runs_status_check;
ALTER TABLE durable_celery.runs ADD CONSTRAINT runs_status_check CHECK (status IN (
    'runnable', 'executing', 'awaiting', 'awaiting_children', 'compensating',
    'done', 'failed', 'cancelled', 'compensated', 'compensation_failed'));

ALTER TABLE durable_celery.runs
    -- The join: children of the current Spawn not yet terminal. Decremented by each
    -- child's terminal transition, in the same transaction; 0 makes the parent runnable.
    ADD COLUMN children_pending    integer NOT NULL DEFAULT 0,
    -- On a child: its place in the parent's Spawn, and the parent's seq at that Spawn
    -- (the parent's `visit` while it waits), so a counter only ever counts its own spawn.
    ADD COLUMN child_index         integer,
    ADD COLUMN spawn_seq           integer,
    -- On a child: queued behind foreach's concurrency cap; not claimable, not dispatched.
    -- A sibling's terminal commit releases the next held child in spawn order.
    ADD COLUMN held                boolean NOT NULL DEFAULT false,
    -- On a child started from a step function (parallel/foreach): it runs that one step;
    -- a plain return value is its result.
    ADD COLUMN single_step         boolean NOT NULL DEFAULT false,
    -- Await(mode="all"): wake once every awaited name has a pending signal.
    ADD COLUMN await_all           boolean NOT NULL DEFAULT false,
    -- Saga: compensations of completed steps, in completion order (a stack:
    -- [{"step", "compensation", "seq"}, ...]); while compensating, the top one runs next.
    ADD COLUMN compensations       jsonb   NOT NULL DEFAULT '[]',
    ADD COLUMN compensation_errors jsonb   NOT NULL DEFAULT '[]',
    ADD COLUMN failure             jsonb;  -- the failure that started compensating

-- A compensating run is claimable (owner NULL) or executing a compensation (owner set).
DROP INDEX durable_celery.runs_dispatch_idx;
CREATE INDEX runs_dispatch_idx ON durable_celery.runs (dispatch_at)
    WHERE status IN ('runnable', 'compensating');
DROP INDEX durable_celery.runs_owner_idx;
CREATE INDEX runs_owner_idx ON durable_celery.runs (owner)
    WHERE status IN ('executing', 'compensating');
-- The next held child of a parent, in spawn order.
CREATE INDEX runs_held_idx ON durable_celery.runs (parent_id, child_index) WHERE held;

-- A compensation that is executing holds its run's concurrency key, as an executing step does.
DROP INDEX durable_celery.runs_concurrency_key_idx;
CREATE UNIQUE INDEX runs_concurrency_key_idx ON durable_celery.runs (concurrency_key)
    WHERE concurrency_key IS NOT NULL
      AND (status = 'executing' OR (status = 'compensating' AND owner IS NOT NULL));
