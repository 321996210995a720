//! The `postgres` destination: one table per stream, typed columns from the catalog.
//!
//! - **Setup** derives each table from its stream's schema. A table the pipeline
//!   creates is registered to its incarnation in `_sluice_tables`; only such a table is
//!   ever altered (new fields become new nullable columns) or dropped. A table that
//!   existed before is written into only if it already has the needed columns. Setup
//!   reads the catalog first and takes no lock beyond a schema lookup when nothing
//!   needs to change.
//! - **Writes**: each batch locks the pipeline's `_sluice_offsets` row for the claim's
//!   epoch first (none: a newer owner or incarnation holds it, the batch is fenced),
//!   drops what must not be written ([`crate::records::select`]: old-spec records and
//!   replays), upserts the rest as one array per column (no bind-parameter limit) and
//!   moves the offsets and positions, all in one transaction. The upsert's newer-than
//!   guard compares `(_sluice_incarnation, _sluice_version)`: the pipeline incarnation,
//!   then the record's records-topic offset.
//! - A record the destination refuses (SQLSTATE 22/23) fails the batch as a data error
//!   naming the record's key and offset.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use sluice_protocol::catalog::{FieldType, StreamSchema};
use sluice_protocol::message::FailureType;
use sluice_protocol::secrets::{SecretField, SecretKind};
use sluice_protocol::spec::{check_identifier, url_parameter, ConfigReader};
use sluice_protocol::FieldViolation;
use sqlx::{PgConnection, PgPool, Row};

use crate::pg::{check_url, ident, Database};
use crate::records::{select, PendingRecord, Refusal, WriteState};
use crate::registry::DestinationKind;
use crate::{ActivityError, Claim, Context, Destination, Position, WriteTarget, Written};

const OFFSETS_TABLE: &str = "_sluice_offsets";
/// Which pipeline incarnation created which table of the schema.
const TABLES_TABLE: &str = "_sluice_tables";
/// A human-readable mark on the tables Sluice creates (ownership is in `_sluice_tables`).
const CREATED_BY_SLUICE: &str = "created by Sluice";

/// Largest destination batch. Rows travel as one array per column, so no bind-parameter
/// limit applies; the bound keeps a batch's memory and transaction short.
pub const MAX_BATCH_SIZE: u64 = 10_000;

/// Tables of Sluice's own database: a destination in the same database must not write
/// into (or drop) them.
const RESERVED_TABLES: &[&str] = &[
    "pipelines",
    "pipeline_events",
    "pipeline_runs",
    "signal_outbox",
    "request_log",
    "api_tokens",
    "_sqlx_migrations",
];

/// Configuration of the `postgres` destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresDestinationConfig {
    pub url: String,
    pub schema: String,
    /// The table of a one-stream source; None: `table_prefix` + each stream's name.
    pub table: Option<String>,
    pub table_prefix: String,
    /// Drop the tables the pipeline created when it is deleted; kept by default.
    pub drop_table_on_delete: bool,
    pub batch_size: u64,
    /// CA certificate(s) to verify the server with, inline (PEM). The other way is
    /// `sslrootcert=<name>` in the URL: a file of the worker's operator-set CA directory.
    pub ssl_ca_pem: Option<String>,
}

impl PostgresDestinationConfig {
    /// The name the offsets row is kept under: the table, or the prefix of the tables.
    fn target_name(&self) -> String {
        match &self.table {
            Some(table) => table.clone(),
            None => format!("{}*", self.table_prefix),
        }
    }

    /// The table of `stream`, among `streams` selected streams.
    pub fn table_for(&self, stream: &str, streams: usize) -> Result<String, ActivityError> {
        match &self.table {
            Some(table) if streams <= 1 => Ok(table.clone()),
            Some(table) => Err(ActivityError::config(format!(
                "table {table:?} names one table, but the source has {streams} streams; \
                 give table_prefix instead (tables are named <prefix><stream>)"
            ))),
            None => {
                let name = format!("{}{}", self.table_prefix, identifier_of(stream));
                check_identifier(&name).map_err(|why| {
                    ActivityError::config(format!(
                        "table name {name:?} for stream {stream:?}: {why}"
                    ))
                })?;
                Ok(name)
            }
        }
    }
}

/// A stream name as an SQL identifier: lowercase, anything but letters, digits and
/// `_` replaced by `_`.
fn identifier_of(stream: &str) -> String {
    stream
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub struct PostgresDestinationKind;

impl DestinationKind for PostgresDestinationKind {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn summary(&self) -> &'static str {
        "PostgreSQL tables, one per stream, upserted by primary key exactly once"
    }

    fn config_schema(&self) -> Value {
        json!({
            "type": "object",
            "required": ["url"],
            "additionalProperties": false,
            "properties": {
                "url": {"type": "string", "description": "postgres://user:password@host:port/database (secret); parameters: sslmode, sslrootcert (a file name in the workers' CA directory), application_name, user, password, statement-cache-capacity"},
                "schema": {"type": "string", "default": "public"},
                "table": {"type": "string", "description": "the table of a one-stream source"},
                "table_prefix": {"type": "string", "default": "", "description": "tables are named <prefix><stream> when table is not given"},
                "drop_table_on_delete": {"type": "boolean", "default": false, "description": "drop the tables this pipeline created when it is deleted"},
                "batch_size": {"type": "integer", "minimum": 1, "maximum": MAX_BATCH_SIZE, "default": 500},
                "ssl_ca_pem": {"type": "string", "description": "the server's CA certificate(s), PEM"}
            }
        })
    }

    fn secret_fields(&self) -> &'static [SecretField] {
        &[SecretField {
            key: "url",
            kind: SecretKind::UrlPassword,
        }]
    }

    fn build(
        &self,
        config: &Map<String, Value>,
        path: &str,
    ) -> Result<Box<dyn Destination>, FieldViolation> {
        Ok(Box::new(PostgresDestination {
            config: parse(config, path)?,
        }))
    }
}

/// The refusal of a name as a destination table.
fn check_table(name: &str, schema: &str) -> Result<(), &'static str> {
    check_identifier(name)?;
    if name.starts_with("_sluice_") {
        return Err("names a Sluice bookkeeping table (_sluice_*)");
    }
    if schema == "public" && RESERVED_TABLES.contains(&name) {
        return Err("is the name of one of Sluice's own tables");
    }
    Ok(())
}

pub fn parse(
    config: &Map<String, Value>,
    path: &str,
) -> Result<PostgresDestinationConfig, FieldViolation> {
    let mut reader = ConfigReader::new(config, path.to_owned());
    let url = reader.string("url", None)?;
    if sluice_protocol::secrets::is_sealed(&url) {
        return Err(reader.violation(
            "url",
            "is encrypted and this process has no (or another) secrets key; \
             start it with --secrets-key-file",
        ));
    }
    check_url(&url).map_err(|d| reader.violation("url", &d))?;
    let schema = reader.string("schema", Some("public"))?;
    check_identifier(&schema).map_err(|d| reader.violation("schema", d))?;
    let table = reader.optional_string("table")?;
    if let Some(table) = &table {
        check_table(table, &schema).map_err(|d| reader.violation("table", d))?;
    }
    let table_prefix = match reader.optional_string("table_prefix")? {
        Some(prefix) => {
            check_identifier(&prefix).map_err(|d| reader.violation("table_prefix", d))?;
            if prefix.starts_with("_sluice_") {
                return Err(reader.violation("table_prefix", "names Sluice's bookkeeping tables"));
            }
            prefix
        }
        None => String::new(),
    };
    let drop_table_on_delete = reader.bool("drop_table_on_delete", Some(false))?;
    let batch_size = reader.u64("batch_size", Some(500))?;
    if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
        return Err(reader.violation(
            "batch_size",
            &format!("must be between 1 and {MAX_BATCH_SIZE}"),
        ));
    }
    let ssl_ca_pem = reader.optional_string("ssl_ca_pem")?;
    if let Some(pem) = &ssl_ca_pem {
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(reader.violation(
                "ssl_ca_pem",
                "must hold PEM certificates (-----BEGIN CERTIFICATE-----)",
            ));
        }
        if url_parameter(&url, "sslrootcert").is_some() {
            return Err(reader.violation(
                "ssl_ca_pem",
                "and sslrootcert in the url both name a CA; give one",
            ));
        }
    }
    reader.reject_unknown()?;
    Ok(PostgresDestinationConfig {
        url,
        schema,
        table,
        table_prefix,
        drop_table_on_delete,
        batch_size,
        ssl_ca_pem,
    })
}

#[derive(Debug)]
pub struct PostgresDestination {
    pub config: PostgresDestinationConfig,
}

impl PostgresDestination {
    async fn database(&self, ctx: &Context) -> Result<Database, ActivityError> {
        ctx.pg_pools
            .get(ctx, &self.config.url, self.config.ssl_ca_pem.as_deref())
            .await
    }
}

#[async_trait]
impl Destination for PostgresDestination {
    async fn setup(
        &self,
        ctx: &Context,
        streams: &[StreamSchema],
        claim: &Claim,
    ) -> Result<(), ActivityError> {
        let db = self.database(ctx).await?;
        db.explained(setup(&db, &self.config, streams, claim).await)
            .await
    }

    async fn fence(
        &self,
        ctx: &Context,
        target: &WriteTarget<'_>,
        start: i64,
    ) -> Result<WriteState, ActivityError> {
        let db = self.database(ctx).await?;
        db.explained(fence_offsets(&db, &self.config, target, start).await)
            .await
    }

    async fn committed(
        &self,
        ctx: &Context,
        target: &WriteTarget<'_>,
    ) -> Result<Option<i64>, ActivityError> {
        let db = self.database(ctx).await?;
        db.explained(committed_offset(&db, &self.config, target).await)
            .await
    }

    async fn write(
        &self,
        ctx: &Context,
        target: &WriteTarget<'_>,
        streams: &[StreamSchema],
        batch: &[PendingRecord],
    ) -> Result<Written, ActivityError> {
        let db = self.database(ctx).await?;
        db.explained(write_batch(&db, &self.config, streams, target, batch).await)
            .await
    }

    async fn teardown(
        &self,
        ctx: &Context,
        streams: &[StreamSchema],
        claim: &Claim,
    ) -> Result<(), ActivityError> {
        let db = self.database(ctx).await?;
        db.explained(teardown(&db, &self.config, streams, claim).await)
            .await
    }

    fn batch_size(&self) -> usize {
        self.config.batch_size as usize
    }

    fn hosts(&self) -> Vec<String> {
        crate::pg::url_host(&self.config.url)
    }
}

fn sql_type(t: FieldType) -> &'static str {
    match t {
        FieldType::Integer => "bigint",
        FieldType::Number => "double precision",
        FieldType::Decimal => "numeric",
        FieldType::String => "text",
        FieldType::Boolean => "boolean",
        FieldType::Timestamp => "timestamp with time zone",
        FieldType::Date => "date",
        FieldType::Json => "jsonb",
    }
}

/// Whether an existing column of type `found` (as `format_type` prints it) can take a
/// field of type `t`.
fn accepts(t: FieldType, found: &str) -> bool {
    let any = |names: &[&str]| {
        names
            .iter()
            .any(|n| found == *n || found.starts_with(&format!("{n}(")))
    };
    match t {
        FieldType::Integer => any(&["bigint", "integer", "smallint", "numeric"]),
        FieldType::Number => any(&["double precision", "real", "numeric"]),
        FieldType::Decimal => any(&["numeric"]),
        FieldType::String => any(&["text", "character varying", "character"]),
        FieldType::Boolean => any(&["boolean"]),
        FieldType::Timestamp => any(&["timestamp with time zone", "timestamp without time zone"]),
        FieldType::Date => any(&["date"]),
        FieldType::Json => any(&["jsonb", "json"]),
    }
}

fn qualified(config: &PostgresDestinationConfig, table: &str) -> String {
    format!("{}.{}", ident(&config.schema), ident(table))
}

/// Columns of `schema.table` and their types as `format_type` prints them; None if
/// the table does not exist. A catalog read: it takes no lock on the table.
async fn columns_of(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<Option<HashMap<String, String>>, ActivityError> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p'))",
    )
    .bind(schema)
    .bind(table)
    .fetch_one(&mut *conn)
    .await?;
    if !exists {
        return Ok(None);
    }
    let rows = sqlx::query(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(
        rows.iter()
            .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
            .collect(),
    ))
}

/// The columns a destination table needs for `stream`, with their types (the
/// bookkeeping columns last).
fn required_columns(stream: &StreamSchema) -> Vec<(String, Option<FieldType>, &'static str)> {
    let mut columns: Vec<(String, Option<FieldType>, &'static str)> = stream
        .fields
        .iter()
        .map(|f| (f.name.clone(), Some(f.field_type), sql_type(f.field_type)))
        .collect();
    columns.push(("_sluice_incarnation".into(), None, "bigint"));
    columns.push(("_sluice_version".into(), None, "bigint"));
    columns.push(("_sluice_synced_at".into(), None, "timestamp with time zone"));
    columns
}

/// Creates or checks every stream's table and the schema's bookkeeping, in one
/// transaction under the database's DDL lock.
pub async fn setup(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    streams: &[StreamSchema],
    claim: &Claim,
) -> Result<(), ActivityError> {
    let mut tx = pool.begin().await?;
    // Pipelines sharing a database set up one at a time: concurrent CREATE ... of the
    // same objects can fail on PostgreSQL's catalog, and the ownership check below
    // must not race another pipeline's.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('sluice.destination.ddl', 0))")
        .execute(&mut *tx)
        .await?;
    let schema_exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&config.schema)
            .fetch_one(&mut *tx)
            .await?;
    if !schema_exists {
        sqlx::query(&format!("CREATE SCHEMA {}", ident(&config.schema)))
            .execute(&mut *tx)
            .await?;
    }
    ensure_bookkeeping(&mut tx, config).await?;
    for stream in streams {
        let table = config.table_for(&stream.name, streams.len())?;
        check_table(&table, &config.schema).map_err(|why| {
            ActivityError::config(format!(
                "table {table:?} for stream {:?} {why}",
                stream.name
            ))
        })?;
        setup_table(&mut tx, config, stream, &table, claim).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn setup_table(
    tx: &mut PgConnection,
    config: &PostgresDestinationConfig,
    stream: &StreamSchema,
    table_name: &str,
    claim: &Claim,
) -> Result<(), ActivityError> {
    let table = qualified(config, table_name);
    let required = required_columns(stream);
    let registry = qualified(config, TABLES_TABLE);
    let Some(existing) = columns_of(&mut *tx, &config.schema, table_name).await? else {
        let mut columns: Vec<String> = required
            .iter()
            .map(|(name, _, ty)| {
                let constraint = match name.as_str() {
                    n if stream.primary_key.iter().any(|k| k == n) => " NOT NULL",
                    "_sluice_incarnation" | "_sluice_version" => " NOT NULL",
                    "_sluice_synced_at" => " NOT NULL DEFAULT now()",
                    _ => "",
                };
                format!("{} {ty}{constraint}", ident(name))
            })
            .collect();
        let key: Vec<String> = stream.primary_key.iter().map(|k| ident(k)).collect();
        columns.push(format!("PRIMARY KEY ({})", key.join(", ")));
        sqlx::query(&format!("CREATE TABLE {table} ({})", columns.join(", ")))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "COMMENT ON TABLE {table} IS '{CREATED_BY_SLUICE}'"
        ))
        .execute(&mut *tx)
        .await?;
        // A registration left by a table dropped behind Sluice's back is replaced.
        sqlx::query(&format!(
            "INSERT INTO {registry} (table_name, pipeline_id, incarnation) VALUES ($1, $2, $3) \
             ON CONFLICT (table_name) DO UPDATE SET pipeline_id = EXCLUDED.pipeline_id, \
             incarnation = EXCLUDED.incarnation, create_time = now()"
        ))
        .bind(table_name)
        .bind(&claim.key)
        .bind(claim.incarnation)
        .execute(&mut *tx)
        .await?;
        return Ok(());
    };
    let owner: Option<(String, i64)> = sqlx::query_as(&format!(
        "SELECT pipeline_id, incarnation FROM {registry} WHERE table_name = $1"
    ))
    .bind(table_name)
    .fetch_optional(&mut *tx)
    .await?;
    let ours = match owner {
        Some((key, incarnation)) if key == claim.key && incarnation == claim.incarnation => true,
        // Made by an earlier incarnation of this pipeline that is gone now: the table is
        // kept data, no longer anyone's to alter or drop.
        Some((key, incarnation)) if key == claim.key && incarnation < claim.incarnation => {
            sqlx::query(&format!("DELETE FROM {registry} WHERE table_name = $1"))
                .bind(table_name)
                .execute(&mut *tx)
                .await?;
            false
        }
        Some(_) => {
            return Err(ActivityError::config(format!(
                "table {}.{table_name} belongs to another Sluice pipeline, and two pipelines \
                 cannot write one table (if that pipeline no longer exists, delete its row \
                 from {}.{TABLES_TABLE})",
                config.schema, config.schema
            )));
        }
        None => false,
    };
    let mut missing = Vec::new();
    for (name, field_type, ty) in &required {
        let fits = |found: &str| match field_type {
            Some(t) if !ours => accepts(*t, found),
            _ => found == *ty,
        };
        match existing.get(name) {
            Some(found) if fits(found) => {}
            Some(found) => {
                let hint = if name == "_sluice_incarnation" {
                    format!(
                        " (a table made by an earlier Sluice version: \
                         ALTER TABLE {table} ALTER COLUMN _sluice_incarnation DROP DEFAULT, \
                         ALTER COLUMN _sluice_incarnation TYPE bigint USING 0)"
                    )
                } else {
                    String::new()
                };
                return Err(ActivityError::config(format!(
                    "column {name} of {}.{table_name} is {found}, not {ty}{hint}",
                    config.schema
                )));
            }
            None => missing.push((name.clone(), *ty)),
        }
    }
    if !missing.is_empty() && !ours {
        let names: Vec<String> = missing.iter().map(|(n, ty)| format!("{n} {ty}")).collect();
        return Err(ActivityError::config(format!(
            "table {}.{table_name} existed before this pipeline and lacks the columns {}; \
             Sluice never alters a table it did not create: add them or choose another table",
            config.schema,
            names.join(", ")
        )));
    }
    // Additive schema evolution of the pipeline's own table: new catalog fields become
    // new nullable columns. Only when something is missing, so an unchanged setup never
    // waits for an exclusive lock.
    for (name, ty) in missing {
        let default = match name.as_str() {
            "_sluice_incarnation" | "_sluice_version" => " NOT NULL DEFAULT 0",
            "_sluice_synced_at" => " NOT NULL DEFAULT now()",
            _ => "",
        };
        sqlx::query(&format!(
            "ALTER TABLE {table} ADD COLUMN {} {ty}{default}",
            ident(&name)
        ))
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Creates the schema's offsets and ownership tables, or brings an offsets table of an
/// earlier format up to date, reading the catalog first so nothing is locked when they
/// are current.
async fn ensure_bookkeeping(
    conn: &mut PgConnection,
    config: &PostgresDestinationConfig,
) -> Result<(), ActivityError> {
    let offsets = qualified(config, OFFSETS_TABLE);
    match columns_of(conn, &config.schema, OFFSETS_TABLE).await? {
        None => {
            sqlx::query(&format!(
                "CREATE TABLE {offsets} (pipeline_id TEXT NOT NULL, table_name TEXT NOT NULL, \
                 topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset BIGINT NOT NULL, \
                 owner_epoch BIGINT NOT NULL, incarnation BIGINT NOT NULL, \
                 spec_version BIGINT NOT NULL DEFAULT 0, \
                 positions JSONB NOT NULL DEFAULT '{{}}'::jsonb, \
                 update_time TIMESTAMPTZ NOT NULL DEFAULT now(), \
                 PRIMARY KEY (pipeline_id, table_name, topic, partition))"
            ))
            .execute(&mut *conn)
            .await?;
        }
        Some(columns) => {
            let mut changes = Vec::new();
            // Rows of the earlier format name topics no pipeline uses any more; their
            // incarnation (a timestamp then) carries no meaning.
            if columns.get("incarnation").map(String::as_str) != Some("bigint") {
                if columns.contains_key("incarnation") {
                    changes.push("ALTER COLUMN incarnation DROP DEFAULT".to_owned());
                    changes.push("ALTER COLUMN incarnation TYPE BIGINT USING 0".to_owned());
                } else {
                    changes.push("ADD COLUMN incarnation BIGINT NOT NULL DEFAULT 0".to_owned());
                }
            }
            if !columns.contains_key("spec_version") {
                changes.push("ADD COLUMN spec_version BIGINT NOT NULL DEFAULT 0".to_owned());
            }
            if !columns.contains_key("positions") {
                changes.push("ADD COLUMN positions JSONB NOT NULL DEFAULT '{}'::jsonb".to_owned());
            }
            if !changes.is_empty() {
                sqlx::query(&format!("ALTER TABLE {offsets} {}", changes.join(", ")))
                    .execute(&mut *conn)
                    .await?;
            }
        }
    }
    if columns_of(conn, &config.schema, TABLES_TABLE)
        .await?
        .is_none()
    {
        sqlx::query(&format!(
            "CREATE TABLE {} (table_name TEXT PRIMARY KEY, pipeline_id TEXT NOT NULL, \
             incarnation BIGINT NOT NULL, create_time TIMESTAMPTZ NOT NULL DEFAULT now())",
            qualified(config, TABLES_TABLE)
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The next offset the destination has committed for this incarnation's topic, if any
/// batch was committed (or a write lane fenced the row).
pub async fn committed_offset(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    target: &WriteTarget<'_>,
) -> Result<Option<i64>, ActivityError> {
    let next: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT next_offset FROM {} WHERE pipeline_id = $1 AND table_name = $2 AND topic = $3 \
         AND partition = $4 AND incarnation = $5",
        qualified(config, OFFSETS_TABLE)
    ))
    .bind(&target.claim.key)
    .bind(config.target_name())
    .bind(target.topic)
    .bind(target.partition)
    .bind(target.claim.incarnation)
    .fetch_optional(pool)
    .await?;
    Ok(next)
}

fn state_from_row(row: &sqlx::postgres::PgRow) -> Result<WriteState, ActivityError> {
    let positions: Value = row.try_get(2)?;
    let positions: BTreeMap<String, Position> = serde_json::from_value(positions)
        .map_err(|e| ActivityError::Invariant(format!("stored positions are corrupt: {e}")))?;
    Ok(WriteState {
        next_offset: row.try_get(0)?,
        spec_version: row.try_get(1)?,
        positions,
    })
}

/// Takes the offsets row over for the claim's epoch and returns what was committed.
/// From then on a previous owner's write lane, which holds an older epoch, can no
/// longer commit a batch; the rows of older incarnations of the pipeline are removed,
/// so their write lanes cannot either. The committed offset moves up to `start` (where
/// the current spec's records begin) if it is below.
pub async fn fence_offsets(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    target: &WriteTarget<'_>,
    start: i64,
) -> Result<WriteState, ActivityError> {
    let offsets = qualified(config, OFFSETS_TABLE);
    let claim = target.claim;
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "DELETE FROM {offsets} WHERE pipeline_id = $1 AND incarnation < $2"
    ))
    .bind(&claim.key)
    .bind(claim.incarnation)
    .execute(&mut *tx)
    .await?;
    let row = sqlx::query(&format!(
        "INSERT INTO {offsets} AS o (pipeline_id, table_name, topic, partition, next_offset, \
         owner_epoch, incarnation, spec_version) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (pipeline_id, table_name, topic, partition) DO UPDATE \
         SET owner_epoch = EXCLUDED.owner_epoch, \
             next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset), update_time = now() \
         WHERE o.owner_epoch <= EXCLUDED.owner_epoch AND o.incarnation = EXCLUDED.incarnation \
         RETURNING next_offset, spec_version, positions"
    ))
    .bind(&claim.key)
    .bind(config.target_name())
    .bind(target.topic)
    .bind(target.partition)
    .bind(start.max(0))
    .bind(claim.epoch)
    .bind(claim.incarnation)
    .bind(target.spec_version)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(ActivityError::Fenced);
    };
    let state = state_from_row(&row)?;
    tx.commit().await?;
    Ok(state)
}

/// One column of a batch, as a typed array (text for the types cast in SQL).
enum ColumnValues {
    Integer(Vec<Option<i64>>),
    Number(Vec<Option<f64>>),
    Boolean(Vec<Option<bool>>),
    Text(Vec<Option<String>>),
}

/// The array type a column is bound as, and the cast that makes it the column's type.
fn array_cast(t: FieldType) -> &'static str {
    match t {
        FieldType::Integer => "bigint[]",
        FieldType::Number => "double precision[]",
        FieldType::Boolean => "boolean[]",
        FieldType::String => "text[]",
        FieldType::Decimal => "text[]::numeric[]",
        FieldType::Timestamp => "text[]::timestamptz[]",
        FieldType::Date => "text[]::date[]",
        FieldType::Json => "text[]::jsonb[]",
    }
}

/// A record value that does not fit its column's type.
fn type_mismatch(
    stream: &StreamSchema,
    record: &PendingRecord,
    field: &str,
    value: &Value,
) -> ActivityError {
    ActivityError::Failed {
        failure_type: FailureType::DataError,
        message: format!(
            "record {} of stream {} (records-topic offset {}): field {field} is {value}, which does not fit its column",
            key_of(stream, record),
            stream.name,
            record.offset
        ),
    }
}

/// "id=42" (or "a=1,b=x"): the record's primary key, as last_error names a refused
/// record.
fn key_of(stream: &StreamSchema, record: &PendingRecord) -> String {
    stream
        .primary_key
        .iter()
        .map(|k| {
            let value = record.data.get(k).map_or_else(
                || "null".to_owned(),
                |v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
            );
            format!("{k}={value}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One field of every row, converted to its column's type.
fn column<T>(
    stream: &StreamSchema,
    rows: &[&PendingRecord],
    field: &str,
    convert: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<Option<T>>, ActivityError> {
    rows.iter()
        .map(|r| match r.data.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => convert(v)
                .map(Some)
                .ok_or_else(|| type_mismatch(stream, r, field, v)),
        })
        .collect()
}

fn columns(
    stream: &StreamSchema,
    rows: &[&PendingRecord],
) -> Result<Vec<ColumnValues>, ActivityError> {
    stream
        .fields
        .iter()
        .map(|f| {
            let name = f.name.as_str();
            let text = |v: &Value| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            };
            Ok(match f.field_type {
                FieldType::Integer => {
                    ColumnValues::Integer(column(stream, rows, name, Value::as_i64)?)
                }
                FieldType::Number => {
                    ColumnValues::Number(column(stream, rows, name, Value::as_f64)?)
                }
                FieldType::Boolean => {
                    ColumnValues::Boolean(column(stream, rows, name, Value::as_bool)?)
                }
                FieldType::String | FieldType::Timestamp | FieldType::Date => {
                    ColumnValues::Text(column(stream, rows, name, |v| {
                        v.as_str().map(str::to_owned)
                    })?)
                }
                FieldType::Decimal => ColumnValues::Text(column(stream, rows, name, text)?),
                FieldType::Json => {
                    ColumnValues::Text(column(stream, rows, name, |v| Some(v.to_string()))?)
                }
            })
        })
        .collect()
}

/// The upsert of a batch of one stream: one array per column, unnested into rows.
fn upsert_sql(config: &PostgresDestinationConfig, table: &str, stream: &StreamSchema) -> String {
    let table = qualified(config, table);
    let names: Vec<String> = stream.fields.iter().map(|f| ident(&f.name)).collect();
    let n = stream.fields.len();
    let arrays: Vec<String> = stream
        .fields
        .iter()
        .enumerate()
        .map(|(i, f)| format!("${}::{}", i + 1, array_cast(f.field_type)))
        .collect();
    let aliases: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let updates: String = stream
        .fields
        .iter()
        .filter(|f| !stream.primary_key.contains(&f.name))
        .map(|f| format!("{0} = EXCLUDED.{0}, ", ident(&f.name)))
        .collect();
    let key: Vec<String> = stream.primary_key.iter().map(|k| ident(k)).collect();
    format!(
        "INSERT INTO {table} ({names}, _sluice_incarnation, _sluice_version) \
         SELECT {aliases}, ${incarnation}::bigint, v \
         FROM UNNEST({arrays}, ${versions}::bigint[]) AS u({aliases}, v) \
         ON CONFLICT ({key}) DO UPDATE SET {updates}_sluice_incarnation = EXCLUDED._sluice_incarnation, \
         _sluice_version = EXCLUDED._sluice_version, _sluice_synced_at = now() \
         WHERE ({table}._sluice_incarnation, {table}._sluice_version) \
             < (EXCLUDED._sluice_incarnation, EXCLUDED._sluice_version)",
        names = names.join(", "),
        aliases = aliases.join(", "),
        arrays = arrays.join(", "),
        versions = n + 1,
        incarnation = n + 2,
        key = key.join(", "),
    )
}

async fn upsert(
    conn: &mut PgConnection,
    sql: &str,
    stream: &StreamSchema,
    rows: &[&PendingRecord],
    incarnation: i64,
) -> Result<(), ActivityError> {
    let mut query = sqlx::query(sql);
    for column in columns(stream, rows)? {
        query = match column {
            ColumnValues::Integer(v) => query.bind(v),
            ColumnValues::Number(v) => query.bind(v),
            ColumnValues::Boolean(v) => query.bind(v),
            ColumnValues::Text(v) => query.bind(v),
        };
    }
    let versions: Vec<i64> = rows.iter().map(|r| r.offset).collect();
    query
        .bind(versions)
        .bind(incarnation)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Writes one batch and its offsets in a single transaction.
pub async fn write_batch(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    streams: &[StreamSchema],
    target: &WriteTarget<'_>,
    batch: &[PendingRecord],
) -> Result<Written, ActivityError> {
    let offsets = qualified(config, OFFSETS_TABLE);
    let claim = target.claim;
    let mut tx = pool.begin().await?;
    // The fence first: the row is locked for this epoch before anything is written.
    let row = sqlx::query(&format!(
        "SELECT next_offset, spec_version, positions FROM {offsets} \
         WHERE pipeline_id = $1 AND table_name = $2 AND topic = $3 AND partition = $4 \
           AND owner_epoch = $5 AND incarnation = $6 FOR UPDATE"
    ))
    .bind(&claim.key)
    .bind(config.target_name())
    .bind(target.topic)
    .bind(target.partition)
    .bind(claim.epoch)
    .bind(claim.incarnation)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(ActivityError::Fenced);
    };
    let committed = state_from_row(&row)?;
    let (picked, next) =
        select(committed, claim.incarnation, target.spec_version, batch).map_err(|refusal| {
            match refusal {
                Refusal::Superseded { .. } => ActivityError::Fenced,
                other => ActivityError::Invariant(other.to_string()),
            }
        })?;

    // Per stream, the newest version of each key (ON CONFLICT cannot touch one row
    // twice in a statement), in offset order.
    let mut by_stream: BTreeMap<&str, HashMap<String, &PendingRecord>> = BTreeMap::new();
    for record in picked.iter().map(|i| &batch[*i]) {
        let stream = streams
            .iter()
            .find(|s| s.name == record.stream)
            .ok_or_else(|| {
                ActivityError::transient(format!(
                    "record of stream {:?} (records-topic offset {}) is not in the catalog yet",
                    record.stream, record.offset
                ))
            })?;
        by_stream
            .entry(stream.name.as_str())
            .or_default()
            .insert(key_of(stream, record), record);
    }
    for (name, newest) in by_stream {
        let stream = streams
            .iter()
            .find(|s| s.name == name)
            .expect("looked up above");
        let table = config.table_for(name, streams.len())?;
        let mut rows: Vec<&PendingRecord> = newest.into_values().collect();
        rows.sort_by_key(|r| r.offset);
        let sql = upsert_sql(config, &table, stream);
        if let Err(e) = upsert(&mut tx, &sql, stream, &rows, claim.incarnation).await {
            drop(tx);
            return Err(match e {
                ActivityError::Failed {
                    failure_type: FailureType::DataError,
                    message,
                } => refused_record(pool, &sql, stream, &rows, claim.incarnation)
                    .await
                    .unwrap_or(ActivityError::Failed {
                        failure_type: FailureType::DataError,
                        message,
                    }),
                other => other,
            });
        }
    }
    let positions = serde_json::to_value(&next.positions).expect("positions are plain JSON");
    sqlx::query(&format!(
        "UPDATE {offsets} SET next_offset = $5, spec_version = $6, positions = $7, update_time = now() \
         WHERE pipeline_id = $1 AND table_name = $2 AND topic = $3 AND partition = $4"
    ))
    .bind(&claim.key)
    .bind(config.target_name())
    .bind(target.topic)
    .bind(target.partition)
    .bind(next.next_offset)
    .bind(next.spec_version)
    .bind(positions)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Written {
        next_offset: next.next_offset,
        records: picked,
    })
}

/// Finds the record of a refused batch that the destination refuses, writing them one
/// by one in a transaction that is rolled back; the error names its key and offset.
async fn refused_record(
    pool: &PgPool,
    sql: &str,
    stream: &StreamSchema,
    rows: &[&PendingRecord],
    incarnation: i64,
) -> Option<ActivityError> {
    let mut tx = pool.begin().await.ok()?;
    for record in rows {
        sqlx::query("SAVEPOINT one_record")
            .execute(&mut *tx)
            .await
            .ok()?;
        match upsert(&mut tx, sql, stream, &[record], incarnation).await {
            Ok(()) => {}
            Err(ActivityError::Failed {
                failure_type,
                message,
            }) => {
                return Some(ActivityError::Failed {
                    failure_type,
                    message: format!(
                        "record {} of stream {} (records-topic offset {}) was refused by the destination: {message}",
                        key_of(stream, record),
                        stream.name,
                        record.offset
                    ),
                })
            }
            Err(other) => return Some(other),
        }
        sqlx::query("ROLLBACK TO SAVEPOINT one_record")
            .execute(&mut *tx)
            .await
            .ok()?;
    }
    None
}

/// Removes what this incarnation of the pipeline keeps in the destination: its offsets
/// (and any older incarnation's), its tables only when the spec asks for it and a
/// table is registered to this incarnation, and its table registrations otherwise (a
/// kept table is the user's from then on).
pub async fn teardown(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    streams: &[StreamSchema],
    claim: &Claim,
) -> Result<(), ActivityError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('sluice.destination.ddl', 0))")
        .execute(&mut *tx)
        .await?;
    if columns_of(&mut tx, &config.schema, OFFSETS_TABLE)
        .await?
        .is_some()
    {
        sqlx::query(&format!(
            "DELETE FROM {} WHERE pipeline_id = $1 AND incarnation <= $2",
            qualified(config, OFFSETS_TABLE)
        ))
        .bind(&claim.key)
        .bind(claim.incarnation)
        .execute(&mut *tx)
        .await?;
    }
    if columns_of(&mut tx, &config.schema, TABLES_TABLE)
        .await?
        .is_some()
    {
        let registry = qualified(config, TABLES_TABLE);
        for stream in streams {
            let Ok(table) = config.table_for(&stream.name, streams.len()) else {
                continue;
            };
            let owner: Option<(String, i64)> = sqlx::query_as(&format!(
                "SELECT pipeline_id, incarnation FROM {registry} WHERE table_name = $1"
            ))
            .bind(&table)
            .fetch_optional(&mut *tx)
            .await?;
            let ours = owner.is_some_and(|(k, i)| k == claim.key && i == claim.incarnation);
            if config.drop_table_on_delete && ours {
                sqlx::query(&format!(
                    "DROP TABLE IF EXISTS {}",
                    qualified(config, &table)
                ))
                .execute(&mut *tx)
                .await?;
            } else if config.drop_table_on_delete {
                tracing::warn!(
                    pipeline_id = %claim.key,
                    table = %format!("{}.{table}", config.schema),
                    "not dropping a destination table this pipeline did not create"
                );
            }
        }
        sqlx::query(&format!(
            "DELETE FROM {registry} WHERE pipeline_id = $1 AND incarnation <= $2"
        ))
        .bind(&claim.key)
        .bind(claim.incarnation)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::catalog::generator_stream;

    fn config() -> PostgresDestinationConfig {
        PostgresDestinationConfig {
            url: "postgres://db/x".into(),
            schema: "public".into(),
            table: Some("orders".into()),
            table_prefix: String::new(),
            drop_table_on_delete: false,
            batch_size: 10,
            ssl_ca_pem: None,
        }
    }

    #[test]
    fn the_upsert_binds_one_array_per_column() {
        let sql = upsert_sql(&config(), "orders", &generator_stream());
        // Five fields, the versions and the incarnation: seven parameters, whatever the
        // batch size.
        assert!(sql.contains("$7::bigint") && !sql.contains("$8"), "{sql}");
        assert!(sql.contains("UNNEST($1::bigint[], $2::text[]"), "{sql}");
        assert!(sql.contains(") < (EXCLUDED._sluice_incarnation"), "{sql}");
    }

    #[test]
    fn values_that_do_not_fit_are_data_errors_naming_the_key() {
        let stream = generator_stream();
        let mut data = serde_json::Map::new();
        data.insert("id".into(), serde_json::json!(42));
        data.insert("amount".into(), serde_json::json!("lots"));
        let record = PendingRecord {
            offset: 7,
            stream: "records".into(),
            tags: None,
            data,
        };
        let Err(ActivityError::Failed {
            failure_type: FailureType::DataError,
            message,
        }) = columns(&stream, &[&record])
        else {
            panic!("a string in an integer column must be refused");
        };
        assert!(
            message.contains("id=42") && message.contains("offset 7"),
            "{message}"
        );
    }

    #[test]
    fn tables_are_named_per_stream() {
        let one = config();
        assert_eq!(one.table_for("records", 1).expect("one stream"), "orders");
        assert!(
            one.table_for("customers", 3).is_err(),
            "one table, three streams"
        );
        let many = PostgresDestinationConfig {
            table: None,
            table_prefix: "stripe_".into(),
            ..config()
        };
        assert_eq!(
            many.table_for("Invoice-Items", 3).expect("named"),
            "stripe_invoice_items"
        );
        assert_eq!(many.target_name(), "stripe_*");
    }

    #[test]
    fn configs_are_validated_naming_the_field() {
        let parse_json = |v: Value| {
            let config: Map<String, Value> = serde_json::from_value(v).expect("test config");
            parse(&config, "d")
        };
        let ok = parse_json(json!({"url": "postgres://db/x", "table": "orders"})).expect("valid");
        assert_eq!(ok.schema, "public");
        assert!(!ok.drop_table_on_delete);
        for (bad, field) in [
            (json!({"table": "t"}), "d.url"),
            (
                json!({"url": "postgres://x/y", "table": "Robert'); drop"}),
                "d.table",
            ),
            (json!({"url": "http://x", "table": "t"}), "d.url"),
            (
                json!({"url": "postgres://x/y", "table": "api_tokens"}),
                "d.table",
            ),
            (
                json!({"url": "postgres://x/y", "table": "_sluice_offsets", "schema": "s"}),
                "d.table",
            ),
            (
                json!({"url": "postgres://x/y", "batch_size": 10001}),
                "d.batch_size",
            ),
            (
                json!({"url": "postgres://x/y", "ssl_ca_pem": "nope"}),
                "d.ssl_ca_pem",
            ),
            (
                json!({"url": "postgres://x/y?sslrootcert=ca.pem", "ssl_ca_pem": "-----BEGIN CERTIFICATE-----"}),
                "d.ssl_ca_pem",
            ),
            (
                json!({"url": "postgres://x/y", "table_prefix": "Bad-"}),
                "d.table_prefix",
            ),
            (json!({"url": "postgres://x/y", "tabel": "t"}), "d.tabel"),
        ] {
            assert_eq!(
                parse_json(bad.clone()).expect_err("invalid").field,
                field,
                "{bad}"
            );
        }
        // Sluice's table names are fine outside the public schema.
        assert!(parse_json(
            json!({"url": "postgres://db/x", "table": "pipelines", "schema": "analytics"})
        )
        .is_ok());
    }

    #[test]
    fn existing_columns_of_compatible_types_are_accepted() {
        assert!(accepts(FieldType::String, "character varying(20)"));
        assert!(accepts(FieldType::Decimal, "numeric(10,2)"));
        assert!(accepts(FieldType::Integer, "integer"));
        assert!(!accepts(FieldType::Integer, "text"));
        assert!(!accepts(FieldType::Timestamp, "date"));
    }
}
