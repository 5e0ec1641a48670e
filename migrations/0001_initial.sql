-- durable_celery schema, version 1: runs, their step history, signal inbox, worker heartbeats.
-- Applied by durable_celery.storage.migrate under an advisory lock, inside one transaction.

CREATE TABLE durable_celery.runs (
    id                text        PRIMARY KEY,
    workflow          text        NOT NULL,
    version           integer     NOT NULL,
    queue             text        NOT NULL,            -- queue of the step to run next
    run_queue         text,                            -- per-run queue override from start()
    priority          smallint    NOT NULL DEFAULT 0,
    status            text        NOT NULL CHECK (status IN (
                          'runnable', 'executing', 'awaiting', 'done', 'failed', 'cancelled')),
    step              text        NOT NULL,            -- the step to run next (or the last one)
    seq               integer     NOT NULL DEFAULT 0,  -- committed outcomes so far; fences messages
    visit             integer     NOT NULL DEFAULT 0,  -- seq when the current step was entered
    attempt           integer     NOT NULL DEFAULT 0,
    recoveries        integer     NOT NULL DEFAULT 0,  -- consecutive "worker lost" of this step
    state             jsonb       NOT NULL,
    input             jsonb       NOT NULL,
    result            jsonb,
    error             jsonb,
    key               text,
    parent_id         text,
    eligible_at       timestamptz NOT NULL DEFAULT now(),  -- a claim before this is refused
    dispatch_at       timestamptz,                     -- when the dispatcher (re)publishes it
    dispatched_at     timestamptz,                     -- last publish
    dispatch_count    integer     NOT NULL DEFAULT 0,  -- publishes for this eligibility
    await_names       text[],
    await_deadline    timestamptz,
    timed_out         boolean     NOT NULL DEFAULT false,
    owner             text,                            -- workers.id of the executing process
    lease             text,                            -- fencing token of the current claim
    started_at        timestamptz,                     -- claim time of the executing step
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,                     -- set exactly when the status is terminal
    forked_from       text,
    app_version       text
);

-- The dispatcher: due runnable rows (timers and overdue messages).
CREATE INDEX runs_dispatch_idx ON durable_celery.runs (dispatch_at) WHERE status = 'runnable';
-- The reaper: executing rows by owner.
CREATE INDEX runs_owner_idx ON durable_celery.runs (owner) WHERE status = 'executing';
-- Await deadlines.
CREATE INDEX runs_deadline_idx ON durable_celery.runs (await_deadline)
    WHERE status = 'awaiting' AND await_deadline IS NOT NULL;
-- A business key is unique among live (not finished) runs.
CREATE UNIQUE INDEX runs_live_key_idx ON durable_celery.runs (key)
    WHERE key IS NOT NULL AND finished_at IS NULL;
CREATE INDEX runs_parent_idx ON durable_celery.runs (parent_id) WHERE parent_id IS NOT NULL;
-- Retention: finished rows by age.
CREATE INDEX runs_finished_idx ON durable_celery.runs (finished_at) WHERE finished_at IS NOT NULL;
-- Listing.
CREATE INDEX runs_workflow_created_idx ON durable_celery.runs (workflow, created_at);

CREATE TABLE durable_celery.steps (
    run_id       text        NOT NULL REFERENCES durable_celery.runs (id) ON DELETE CASCADE,
    seq          integer     NOT NULL,   -- 1-based, one per committed outcome
    step         text        NOT NULL,
    attempt      integer     NOT NULL,
    outcome      text        NOT NULL,   -- next, retry, sleep, await, done, fail
    next_step    text,
    state        jsonb       NOT NULL,   -- state after the step
    error        jsonb,
    started_at   timestamptz,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    worker       text,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE durable_celery.signals (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id        text        NOT NULL REFERENCES durable_celery.runs (id) ON DELETE CASCADE,
    name          text        NOT NULL,
    payload       jsonb,
    dedup_key     text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz,           -- matched an Await; the next step sees it
    consumed_at   timestamptz,           -- the step that saw it committed
    consumed_seq  integer,
    CONSTRAINT signals_dedup_key UNIQUE (run_id, dedup_key)
);
CREATE INDEX signals_pending_idx ON durable_celery.signals (run_id, name) WHERE consumed_at IS NULL;

CREATE TABLE durable_celery.workers (
    id            text        PRIMARY KEY,
    hostname      text        NOT NULL,
    pid           integer     NOT NULL,
    nodename      text,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
