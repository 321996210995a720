-- Owner epochs come from one sequence for every pipeline, so an epoch is never handed
-- out twice: a worker that held a pipeline before it was deleted and created again
-- under the same id cannot pass the new pipeline's fences with an epoch that restarted.
CREATE SEQUENCE pipeline_owner_epoch_seq;
SELECT setval('pipeline_owner_epoch_seq', COALESCE((SELECT max(owner_epoch) FROM pipelines), 0) + 1, false);

-- Each pipeline row is one incarnation of its id: deleting and creating again under the
-- same id makes a new one. Topics, destination offsets, table ownership and the
-- destination's newer-than guard are keyed by it.
CREATE SEQUENCE pipeline_incarnation_seq;
ALTER TABLE pipelines ADD COLUMN incarnation BIGINT NOT NULL DEFAULT nextval('pipeline_incarnation_seq');

-- The activity the owning worker is retrying, if any: name, attempt, last failure and
-- the time of the next attempt (JSON), shown by GetPipeline.
ALTER TABLE pipelines ADD COLUMN pending_activity JSONB;

-- Checkpoints used to keep the whole spec, opened secrets included. They keep a
-- fingerprint of the redacted spec now; "legacy" marks one that predates it.
UPDATE pipelines
SET checkpoint = (checkpoint - 'setup_spec') || '{"spec_fingerprint": "legacy"}'::jsonb
WHERE checkpoint ? 'setup_spec';

-- A signal that cannot be sent is retried later with backoff instead of holding back
-- the signals queued behind it.
ALTER TABLE signal_outbox
    ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    ADD COLUMN last_error TEXT;
DROP INDEX signal_outbox_unsent_idx;
CREATE INDEX signal_outbox_due_idx ON signal_outbox (next_attempt_at, id) WHERE sent_at IS NULL;

-- Idempotency keys remember what the request said, so a key reused for another request
-- is refused rather than answered with the first request's result.
ALTER TABLE request_log ADD COLUMN request_hash BYTEA;
