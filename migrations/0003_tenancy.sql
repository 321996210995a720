-- Tenancy and API tokens. Every pipeline belongs to a tenant; its API id (name) is unique
-- within the tenant. The primary key `id` stays the internal key the workers, topics and
-- destinations use: "<tenant>.<name>" for pipelines created from now on. Rows that exist
-- already are attributed to tenant "default" and keep their key.
ALTER TABLE pipelines ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE pipelines ADD COLUMN name TEXT;
UPDATE pipelines SET name = id;
ALTER TABLE pipelines ALTER COLUMN name SET NOT NULL;
ALTER TABLE pipelines ALTER COLUMN tenant DROP DEFAULT;
CREATE UNIQUE INDEX pipelines_tenant_name_idx ON pipelines (tenant, name);

-- Bearer tokens. Only the SHA-256 of a token is stored; the token itself is shown once,
-- when it is created. Tokens carry 256 random bits, so a plain hash (no salt, no KDF)
-- is enough to make the stored value useless to whoever reads the table.
CREATE TABLE api_tokens (
    id          UUID PRIMARY KEY,
    name        TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    token_hash  BYTEA NOT NULL UNIQUE,
    create_time TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoke_time TIMESTAMPTZ
);
