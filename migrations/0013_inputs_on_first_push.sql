-- The incarnation whose inputs topic exists: the control plane makes the topic on the
-- first PushSourceInput and sets this in the statement that signals the owner, which
-- only then starts the pipeline's live lane. A pipeline nobody pushes to holds no
-- inputs topic, no partition and no live lane.
ALTER TABLE pipelines ADD COLUMN inputs_incarnation bigint;
-- Pipelines made before this column had their inputs topic made at setup (a setup
-- still to come makes it for them).
UPDATE pipelines SET inputs_incarnation = incarnation;
