-- WatchPipelines: every change a client can see stamps the row with the id of the
-- transaction that made it, and a removed row leaves a tombstone. A watcher delivers the
-- changes of transactions older than the oldest one still running (they can no longer
-- be joined by others), so it never misses a change that commits late.
ALTER TABLE pipelines ADD COLUMN write_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX pipelines_write_xid_idx ON pipelines (write_xid);

CREATE TABLE pipeline_tombstones (
    id          TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    incarnation BIGINT NOT NULL,
    write_xid   xid8 NOT NULL DEFAULT pg_current_xact_id(),
    time        TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX pipeline_tombstones_write_xid_idx ON pipeline_tombstones (write_xid);

CREATE FUNCTION sluice_pipeline_watch_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.write_xid := pg_current_xact_id();
        PERFORM pg_notify('sluice_pipelines', '');
        RETURN NEW;
    END IF;
    -- Checkpoint saves are the worker's bookkeeping, not a change anyone watches.
    IF (to_jsonb(NEW) - 'checkpoint' - 'update_time' - 'write_xid')
       IS DISTINCT FROM (to_jsonb(OLD) - 'checkpoint' - 'update_time' - 'write_xid') THEN
        NEW.write_xid := pg_current_xact_id();
        PERFORM pg_notify('sluice_pipelines', '');
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER pipelines_watch_stamp BEFORE INSERT OR UPDATE ON pipelines
    FOR EACH ROW EXECUTE FUNCTION sluice_pipeline_watch_stamp();

CREATE FUNCTION sluice_pipeline_tombstone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pipeline_tombstones (id, tenant, name, incarnation)
    VALUES (OLD.id, OLD.tenant, OLD.name, OLD.incarnation);
    PERFORM pg_notify('sluice_pipelines', '');
    RETURN OLD;
END $$;

CREATE TRIGGER pipelines_tombstone AFTER DELETE ON pipelines
    FOR EACH ROW EXECUTE FUNCTION sluice_pipeline_tombstone();
