-- Idempotency keys belong to a tenant: a request_id used by one tenant is never
-- matched against another tenant's requests.
ALTER TABLE request_log ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
ALTER TABLE request_log DROP CONSTRAINT request_log_pkey;
ALTER TABLE request_log ADD PRIMARY KEY (tenant, request_id);
ALTER TABLE request_log ALTER COLUMN tenant DROP DEFAULT;
