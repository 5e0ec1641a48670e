-- durable_celery schema, version 6: flow control. Rate limits and throttles (one token
-- bucket row per limit and key), debounce, singletons and deadlines (columns on the run).

-- A rate limit's bucket, per key: the generic cell rate algorithm. ``tat`` (theoretical
-- arrival time) moves on by period/limit with each token taken; ``last_slot`` is when the
-- last token taken may be used (a start waits until then, parked as a timer).
CREATE TABLE durable_celery.rate_buckets (
    name        text        NOT NULL,
    key         text        NOT NULL,
    tat         timestamptz NOT NULL,
    last_slot   timestamptz NOT NULL,
    -- The limit as the code declared it when the last token was taken (seconds between
    -- two starts, and how far ahead of that spacing a burst may come).
    interval_s  double precision NOT NULL,
    tolerance_s double precision NOT NULL,
    PRIMARY KEY (name, key)
);

ALTER TABLE durable_celery.runs
    -- The seq whose step start already holds its rate-limit tokens: a claim at that seq
    -- (the same attempt, claimed again after a park or a lost worker) takes none again.
    ADD COLUMN token_seq integer,
    -- Why a runnable run is not due yet, when a policy decided it (explain): e.g.
    -- {"kind": "rate_limit", "limit": "payments", "key": "acme", "until": "..."}.
    ADD COLUMN waiting_for jsonb,
    -- The whole run fails (or compensates) once this passes.
    ADD COLUMN deadline_at timestamptz,
    -- Debounce: a start with this key while this run has not started yet updates it.
    ADD COLUMN debounce_key text,
    -- Singleton: at most one live, not held, run per key; the others wait held.
    ADD COLUMN singleton_key text;

CREATE INDEX runs_run_deadline_idx ON durable_celery.runs (deadline_at)
    WHERE deadline_at IS NOT NULL AND finished_at IS NULL;
-- One pending (not yet started) run per debounce key.
CREATE UNIQUE INDEX runs_debounce_idx ON durable_celery.runs (debounce_key)
    WHERE debounce_key IS NOT NULL AND status = 'runnable' AND seq = 0 AND owner IS NULL;
CREATE INDEX runs_singleton_idx ON durable_celery.runs (singleton_key, created_at)
    WHERE singleton_key IS NOT NULL AND finished_at IS NULL;

-- A singleton run that ends (by any path: a commit, the reaper, a cancel, a deadline)
-- releases the oldest run queued behind its key, unless another live run holds it.
-- Starts take the same advisory lock, so a start and an end never miss each other.
CREATE FUNCTION durable_celery.release_singleton() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('durable_celery.singleton:' || NEW.singleton_key, 0));
    UPDATE durable_celery.runs SET held = false, eligible_at = GREATEST(eligible_at, now()),
        dispatch_at = GREATEST(eligible_at, now()), dispatched_at = NULL, dispatch_count = 0,
        waiting_for = NULL, updated_at = now()
    WHERE id = (SELECT q.id FROM durable_celery.runs AS q
                WHERE q.singleton_key = NEW.singleton_key AND q.held AND q.parent_id IS NULL
                  AND q.finished_at IS NULL
                ORDER BY q.created_at, q.id LIMIT 1)
      AND NOT EXISTS (SELECT 1 FROM durable_celery.runs AS o
                      WHERE o.singleton_key = NEW.singleton_key AND o.finished_at IS NULL
                        AND NOT o.held AND o.id <> NEW.id);
    IF FOUND THEN
        PERFORM pg_notify('durable_celery_wakeup', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER runs_release_singleton AFTER UPDATE OF finished_at ON durable_celery.runs
    FOR EACH ROW WHEN (OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL
                       AND NEW.singleton_key IS NOT NULL)
    EXECUTE FUNCTION durable_celery.release_singleton();
