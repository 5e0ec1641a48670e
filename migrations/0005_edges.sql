-- durable_celery schema, version 5: the promise at the edges. Business keys that stay used
-- after a run ends, resume that restores the wait a cancel interrupted, a foreach cap that
-- never drops a release, compensations first in a concurrency key's queue, and signals sent
-- by name to a run that does not exist yet.

ALTER TABLE durable_celery.runs
    -- What a finished run does to its business key: 'reject' keeps it (no run starts again
    -- with that key while this one is retained), 'after_failure' keeps it only if the run
    -- ended done, 'after_finish' frees it at any end. Rows from before this migration keep
    -- the behaviour they were started with; new rows get the code's choice.
    ADD COLUMN key_reuse text NOT NULL DEFAULT 'after_finish'
        CONSTRAINT runs_key_reuse_check
        CHECK (key_reuse IN ('reject', 'after_failure', 'after_finish')),
    -- The status a cancel interrupted (awaiting, awaiting_children, runnable, executing,
    -- compensating): resume goes back to it.
    ADD COLUMN cancelled_from text,
    -- On a parent: foreach's concurrency cap of its current spawn (NULL: no cap), and the
    -- releases of held children it is owed (a finishing child could not lock the next held
    -- sibling); the dispatcher pays them off.
    ADD COLUMN spawn_cap integer,
    ADD COLUMN spawn_owed integer NOT NULL DEFAULT 0;
ALTER TABLE durable_celery.runs ALTER COLUMN key_reuse SET DEFAULT 'reject';

-- One run per key among the runs that hold it: every live run, and finished runs whose
-- policy keeps the key. A start meets this index atomically, however starts race.
DROP INDEX durable_celery.runs_live_key_idx;
CREATE UNIQUE INDEX runs_key_idx ON durable_celery.runs (key)
    WHERE key IS NOT NULL AND (finished_at IS NULL OR key_reuse = 'reject'
                               OR (key_reuse = 'after_failure' AND status = 'done'));

-- A compensation waiting for its concurrency key is in the key's queue too (first).
DROP INDEX durable_celery.runs_concurrency_wait_idx;
CREATE INDEX runs_concurrency_wait_idx
    ON durable_celery.runs (concurrency_key, priority, eligible_at)
    WHERE concurrency_key IS NOT NULL
      AND (status = 'runnable' OR (status = 'compensating' AND owner IS NULL));

CREATE INDEX runs_spawn_owed_idx ON durable_celery.runs (id) WHERE spawn_owed > 0;

-- Signals sent by name (durable_celery.signal) to a workflow_id or key that no run has
-- yet: kept until ``expires_at``, delivered to the run once it starts.
CREATE TABLE durable_celery.early_signals (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target      text        NOT NULL,
    name        text        NOT NULL,
    payload     jsonb,
    dedup_key   text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CONSTRAINT early_signals_dedup_key UNIQUE (target, dedup_key)
);
CREATE INDEX early_signals_expires_idx ON durable_celery.early_signals (expires_at);

-- A run that ends (finished_at set, by any path: a commit, the reaper, a cancel) notifies
-- the channel durable_celery_done with its id: wait_result wakes at once, without polling.
CREATE FUNCTION durable_celery.notify_done() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('durable_celery_done', NEW.id);
    RETURN NULL;
END
$$;
CREATE TRIGGER runs_notify_done AFTER UPDATE OF finished_at ON durable_celery.runs
    FOR EACH ROW WHEN (OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL)
    EXECUTE FUNCTION durable_celery.notify_done();
