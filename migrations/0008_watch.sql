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
    -- What a client sees of a pipeline; checkpoint saves (the worker's bookkeeping,
    -- once per slice) change none of it and stay cheap. A column clients see, added
    -- later, belongs in this list.
    IF ROW(NEW.tenant, NEW.name, NEW.spec, NEW.desired_status, NEW.status, NEW.generation,
           NEW.observed_generation, NEW.owner, NEW.owner_epoch, NEW.last_error,
           NEW.incarnation, NEW.pending_activity, NEW.sync_requests, NEW.reset_request)
       IS DISTINCT FROM
       ROW(OLD.tenant, OLD.name, OLD.spec, OLD.desired_status, OLD.status, OLD.generation,
           OLD.observed_generation, OLD.owner, OLD.owner_epoch, OLD.last_error,
           OLD.incarnation, OLD.pending_activity, OLD.sync_requests, OLD.reset_request) THEN
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
