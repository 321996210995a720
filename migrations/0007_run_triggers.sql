-- A run also starts because the spec changed (the backfill restarts under the new
-- spec) or to retry a sync that failed with the pipeline, once it recovers.
ALTER TABLE pipeline_runs DROP CONSTRAINT pipeline_runs_trigger_check;
ALTER TABLE pipeline_runs ADD CONSTRAINT pipeline_runs_trigger_check
    CHECK (trigger IN ('initial', 'schedule', 'manual', 'reset', 'spec-change', 'retry'));
