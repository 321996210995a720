-- Why no worker owns a pipeline, when the worker assigned its partition declined it
-- (at capacity); cleared by the next claim.
ALTER TABLE pipelines ADD COLUMN unassigned_reason text;
