-- durable_celery schema, version 2: idempotency records of control requests (cancel, resume,
-- fork). A record commits in the same transaction as the mutation it describes, so there is
-- no "in progress" state to get stuck in: a concurrent request with the same key waits on the
-- primary key, then replays the committed record (or runs, if the first one rolled back).

CREATE TABLE durable_celery.control_requests (
    request_key   text        PRIMARY KEY,
    action        text        NOT NULL,              -- cancel, resume, fork
    target        text        NOT NULL,              -- the workflow id the request names
    status        text        NOT NULL CHECK (status IN ('succeeded', 'failed')),
    response      jsonb,                             -- the response of a succeeded request
    error         jsonb,                             -- the typed error of a failed one
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX control_requests_expires_idx ON durable_celery.control_requests (expires_at);
