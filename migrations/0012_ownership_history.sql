-- Who owned each pipeline when: one row per claim (keyed by the owner epoch it drew),
-- from the claim to the moment that owner's workflow stopped with its lanes halted.
-- A handover without overlap shows the previous row ended before the next one was
-- claimed; a row left open behind a later claim is an owner that never said it stopped
-- (it crashed, or was fenced while frozen and had not woken yet).
CREATE TABLE pipeline_ownership (
    epoch bigint PRIMARY KEY,
    pipeline_id text NOT NULL,
    incarnation bigint NOT NULL,
    worker text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at timestamptz,
    end_reason text
);
CREATE INDEX pipeline_ownership_by_pipeline ON pipeline_ownership (pipeline_id, claimed_at);
