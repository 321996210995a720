-- Idempotency keys (AIP-155): the first response to a request_id is kept and replayed
-- to retries of the same request. Rows older than a day are purged by the control plane.
CREATE TABLE request_log (
    request_id  UUID PRIMARY KEY,
    method      TEXT NOT NULL,
    -- What the request addressed (the client-chosen pipeline id, possibly empty), so a
    -- request_id reused for a different request is refused.
    target      TEXT NOT NULL,
    response    BYTEA,
    create_time TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX request_log_create_time_idx ON request_log (create_time);
