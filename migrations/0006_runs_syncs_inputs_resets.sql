-- Runs: every backfill and every sync of a pipeline, kept after the pipeline is gone
-- (like its events). The worker that owns the pipeline writes them.
CREATE TABLE pipeline_runs (
    pipeline_id     TEXT NOT NULL,
    incarnation     BIGINT NOT NULL,
    number          BIGINT NOT NULL,
    trigger         TEXT NOT NULL CHECK (trigger IN ('initial', 'schedule', 'manual', 'reset')),
    start_time      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    end_time        TIMESTAMPTZ,
    records_read    BIGINT NOT NULL DEFAULT 0,
    records_written BIGINT NOT NULL DEFAULT 0,
    outcome         TEXT NOT NULL DEFAULT 'running'
                    CHECK (outcome IN ('running', 'succeeded', 'failed', 'cancelled')),
    error           TEXT,
    -- The records-topic offset past the run's last record: the run has succeeded once
    -- the destination committed up to it.
    end_offset      BIGINT,
    PRIMARY KEY (pipeline_id, incarnation, number)
);

-- TriggerSync counts requests up; the owning worker serves them with sync runs.
ALTER TABLE pipelines ADD COLUMN sync_requests BIGINT NOT NULL DEFAULT 0;

-- ResetPipeline asks the worker, while the pipeline is paused, to forget the progress
-- of some streams (a JSON array of names; empty: all).
ALTER TABLE pipelines ADD COLUMN reset_request JSONB;
