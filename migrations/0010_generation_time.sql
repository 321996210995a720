-- When the current generation was made (a create, or a change that bumped it): workers
-- measure "change committed -> status persisted for it" against it, on the database's
-- clock (the sluice_change_applied_seconds metric).
ALTER TABLE pipelines ADD COLUMN generation_time timestamptz NOT NULL DEFAULT now();
