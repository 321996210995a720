-- Pipelines: desired state (written by the control plane) and actual state (written by
-- the owning worker, fenced by owner_epoch) side by side.
CREATE TABLE pipelines (
    id                  TEXT PRIMARY KEY,
    spec                JSONB NOT NULL,
    desired_status      TEXT NOT NULL CHECK (desired_status IN ('ACTIVE', 'PAUSED', 'DELETED')),
    status              TEXT CHECK (status IN ('SETUP', 'BACKFILL', 'READY', 'PAUSED', 'TEARDOWN', 'ERROR')),
    generation          BIGINT NOT NULL DEFAULT 1,
    observed_generation BIGINT NOT NULL DEFAULT 0,
    owner               TEXT,
    owner_epoch         BIGINT NOT NULL DEFAULT 0,
    last_error          TEXT,
    -- Signals-topic partition, computed once from the id; decides the owning worker.
    partition           INTEGER NOT NULL,
    -- Source progress, written by the worker after Kafka acknowledged a slice.
    checkpoint          JSONB NOT NULL DEFAULT '{}'::jsonb,
    create_time         TIMESTAMPTZ NOT NULL DEFAULT now(),
    update_time         TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX pipelines_partition_idx ON pipelines (partition);

-- Every status transition, kept after the pipeline row is removed.
CREATE TABLE pipeline_events (
    id          BIGSERIAL PRIMARY KEY,
    pipeline_id TEXT NOT NULL,
    time        TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    actor       TEXT NOT NULL,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    generation  BIGINT NOT NULL,
    reason      TEXT NOT NULL DEFAULT ''
);

CREATE INDEX pipeline_events_pipeline_idx ON pipeline_events (pipeline_id, id);

-- Transactional outbox: written in the same transaction as the pipeline change, relayed
-- to the signals topic, then marked sent.
CREATE TABLE signal_outbox (
    id          BIGSERIAL PRIMARY KEY,
    pipeline_id TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    payload     BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    sent_at     TIMESTAMPTZ
);

CREATE INDEX signal_outbox_unsent_idx ON signal_outbox (id) WHERE sent_at IS NULL;
