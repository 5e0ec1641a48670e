-- durable_celery schema, version 3: drop-in Celery tasks. Concurrency keys on runs, and cron
-- schedules.

-- At most one run per concurrency key executes a step at a time: the unique index covers
-- executing rows only, so runnable, awaiting (Await/Sleep parked) and finished rows never
-- hold the key.
ALTER TABLE durable_celery.runs ADD COLUMN concurrency_key text;
CREATE UNIQUE INDEX runs_concurrency_key_idx ON durable_celery.runs (concurrency_key)
    WHERE status = 'executing' AND concurrency_key IS NOT NULL;
-- The hand-off: the next runnable run waiting for a key, by priority, then age.
CREATE INDEX runs_concurrency_wait_idx ON durable_celery.runs (concurrency_key, priority, eligible_at)
    WHERE status = 'runnable' AND concurrency_key IS NOT NULL;
ALTER TABLE durable_celery.runs ADD CONSTRAINT runs_priority_check CHECK (priority BETWEEN 0 AND 9);

CREATE TABLE durable_celery.schedules (
    name           text        PRIMARY KEY,
    workflow       text        NOT NULL,
    version        integer     NOT NULL,
    step           text        NOT NULL,              -- first step, for coordinators without the code
    queue          text        NOT NULL,
    cron           text        NOT NULL,
    timezone       text        NOT NULL,              -- an IANA zone name
    state          jsonb       NOT NULL,              -- the input of every run
    catchup        text        NOT NULL CHECK (catchup IN ('latest', 'all', 'none')),
    priority       smallint    NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    paused         boolean     NOT NULL DEFAULT false,
    next_fire_at   timestamptz NOT NULL,              -- the first occurrence not yet fired
    last_fired_at  timestamptz,                       -- the last occurrence fired
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_due_idx ON durable_celery.schedules (next_fire_at) WHERE NOT paused;
