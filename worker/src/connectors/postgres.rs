//! The `postgres` destination.
//!
//! - **Setup** derives the table from the stream catalog. A table the pipeline creates
//!   is registered to its incarnation in `_sluice_tables`; only such a table is ever
//!   altered (additive columns) or dropped. A table that existed before is written
//!   into only if it already has the needed columns. Setup reads the catalog first and
//!   takes no lock beyond a schema lookup when nothing needs to change.
//! - **Writes**: each batch locks the pipeline's `_sluice_offsets` row for the claim's
//!   epoch first (none: a newer owner or incarnation holds it, the batch is fenced),
//!   drops what must not be written ([`crate::records::select`]: old-spec records and
//!   replays), upserts the rest as one array per column (no bind-parameter limit) and
//!   moves the offsets, all in one transaction. The upsert's newer-than guard compares
//!   `(_sluice_incarnation, _sluice_version)`: the pipeline incarnation, then the
//!   record's records-topic offset.
//! - A record the destination refuses (SQLSTATE 22/23) fails the batch as a data error
//!   naming the record's key and offset.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use sluice_protocol::catalog::{FieldType, StreamSchema};
use sluice_protocol::hosts::HostPolicy;
use sluice_protocol::message::FailureType;
use sluice_protocol::spec::{is_bare_file_name, is_network_host, PostgresDestinationConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};

use crate::activity::ActivityError;
use crate::claim::Claim;
use crate::records::{select, PendingRecord, Refusal, WriteState};

const OFFSETS_TABLE: &str = "_sluice_offsets";
/// Which pipeline incarnation created which table of the schema.
const TABLES_TABLE: &str = "_sluice_tables";
/// A human-readable mark on the tables Sluice creates (ownership is in `_sluice_tables`).
const CREATED_BY_SLUICE: &str = "created by Sluice";
/// Largest CA file read from the worker's CA directory.
const MAX_CA_FILE_BYTES: u64 = 1 << 20;
/// How long a destination session may sit idle inside a transaction before the server
/// ends it: a worker stopped mid-transaction must not hold its locks for ever.
const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a destination statement waits for a lock before failing (and retrying).
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the operator of a worker decides about destinations.
#[derive(Debug, Clone, Default)]
pub struct DestinationSettings {
    /// Names the worker's sessions (`application_name`) unless the URL does.
    pub worker_id: String,
    /// Where `sslrootcert=<name>` CA files are looked up (None: such URLs are refused).
    pub ca_dir: Option<PathBuf>,
    /// Which hosts destinations may connect to.
    pub hosts: HostPolicy,
    /// Longest statement (the activity attempt timeout).
    pub statement_timeout: Duration,
}

/// Connection pools per destination, shared by all pipelines of a worker so that
/// thousands of pipelines writing to one database do not open thousands of pools.
pub struct DestinationPools {
    settings: DestinationSettings,
    pools: Mutex<HashMap<String, Destination>>,
}

/// A destination's pool, and the options it connects with.
#[derive(Clone)]
pub struct Destination {
    pool: PgPool,
    options: PgConnectOptions,
}

impl std::ops::Deref for Destination {
    type Target = PgPool;

    fn deref(&self) -> &PgPool {
        &self.pool
    }
}

/// What a pool reports when it could not connect before its acquire timeout; the
/// reason why is lost on the way.
const POOL_TIMED_OUT: &str = "pool timed out while waiting for an open connection";

impl Destination {
    /// Passes `result` through, except a pool that timed out waiting for a connection:
    /// that is replaced by the error of one direct connection attempt, so the pipeline
    /// shows why (connection refused, unknown host, bad password) and the failure is
    /// classified by it (a bad password is not retried).
    pub async fn explained<T>(&self, result: Result<T, ActivityError>) -> Result<T, ActivityError> {
        match result {
            Err(ActivityError::Failed { message, .. }) if message.ends_with(POOL_TIMED_OUT) => {
                let attempt = tokio::time::timeout(
                    Duration::from_secs(5),
                    PgConnection::connect_with(&self.options),
                )
                .await;
                Err(match attempt {
                    Ok(Err(e)) => e.into(),
                    Ok(Ok(conn)) => {
                        let _ = conn.close().await;
                        ActivityError::transient(format!("destination: {POOL_TIMED_OUT}"))
                    }
                    Err(_) => ActivityError::transient(
                        "connecting to the destination timed out".to_owned(),
                    ),
                })
            }
            other => other,
        }
    }
}

impl DestinationPools {
    pub fn new(settings: DestinationSettings) -> Self {
        Self {
            settings,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// The pool for a destination; the host policy is checked (and the CA file read)
    /// when the pool is made.
    pub async fn get(
        &self,
        config: &PostgresDestinationConfig,
    ) -> Result<Destination, ActivityError> {
        let key = format!(
            "{}\n{}",
            config.url,
            config.ssl_ca_pem.as_deref().unwrap_or_default()
        );
        if let Some(destination) = self.lock().get(&key) {
            return Ok(destination.clone());
        }
        let options = connect_options(&self.settings, config).await?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options.clone());
        let destination = Destination { pool, options };
        Ok(self.lock().entry(key).or_insert(destination).clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Destination>> {
        self.pools.lock().expect("pool map lock is never poisoned")
    }
}

/// Connection options from the destination config alone. Nothing the config says may
/// make the worker use its own identity or files: a URL without a password gets an
/// empty one (not the worker's PGPASSWORD or ~/.pgpass), a CA comes inline or by bare
/// name from the operator's CA directory, and the host must pass the host policy.
async fn connect_options(
    settings: &DestinationSettings,
    config: &PostgresDestinationConfig,
) -> Result<PgConnectOptions, ActivityError> {
    let mut url = url::Url::parse(&config.url)
        .map_err(|_| ActivityError::config("destination url is not a URL"))?;
    let host = url.host_str().unwrap_or_default().to_owned();
    if !is_network_host(&host) {
        return Err(ActivityError::config(format!(
            "destination host {host:?} is not a DNS name or IP address"
        )));
    }
    if !settings.hosts.is_empty() {
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port().unwrap_or(5432);
        // A name that does not resolve is checked by name alone; connecting fails later.
        let addrs: Vec<IpAddr> = tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map(|found| found.map(|a| a.ip()).collect())
            .unwrap_or_default();
        settings
            .hosts
            .check(&host, &addrs)
            .map_err(ActivityError::config)?;
    }
    // sslrootcert would make the driver read a path of the worker's choosing; it is
    // taken out of the URL and resolved in the CA directory instead.
    let root_cert = url
        .query_pairs()
        .find(|(k, _)| k == "sslrootcert")
        .map(|(_, v)| v.into_owned());
    let has_password = url.password().is_some() || url.query_pairs().any(|(k, _)| k == "password");
    let has_application_name = url.query_pairs().any(|(k, _)| k == "application_name");
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "sslrootcert")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    let mut options = PgConnectOptions::from_str(url.as_str())
        .map_err(|e| ActivityError::config(format!("destination url: {e}")))?;
    if !has_password {
        options = options.password("");
    }
    if let Some(name) = root_cert {
        let dir = settings.ca_dir.clone();
        let pem = tokio::task::spawn_blocking(move || read_ca_file(dir.as_deref(), &name))
            .await
            .expect("reading a CA file does not panic")?;
        options = options.ssl_root_cert_from_pem(pem);
    }
    if let Some(pem) = &config.ssl_ca_pem {
        options = options.ssl_root_cert_from_pem(pem.as_bytes().to_vec());
    }
    if !has_application_name {
        options = options.application_name(&format!("sluice-worker/{}", settings.worker_id));
    }
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    Ok(options.options([
        ("lock_timeout", ms(LOCK_TIMEOUT)),
        ("statement_timeout", ms(settings.statement_timeout)),
        (
            "idle_in_transaction_session_timeout",
            ms(IDLE_IN_TRANSACTION_TIMEOUT),
        ),
    ]))
}

/// Reads CA file `name` of the worker's CA directory: a regular file directly inside
/// it (no path, no symlink out of it), of bounded size.
fn read_ca_file(dir: Option<&Path>, name: &str) -> Result<Vec<u8>, ActivityError> {
    use std::io::Read;
    let dir = dir.ok_or_else(|| {
        ActivityError::config(format!(
            "sslrootcert={name} names a CA file of the workers' CA directory, and this worker \
             has none (--destination-ca-dir); or give the certificate inline as ssl_ca_pem"
        ))
    })?;
    let missing =
        || ActivityError::config(format!("no CA file {name:?} in the workers' CA directory"));
    if !is_bare_file_name(name) {
        return Err(missing());
    }
    let dir = std::fs::canonicalize(dir).map_err(|_| missing())?;
    let path = std::fs::canonicalize(dir.join(name)).map_err(|_| missing())?;
    if path.parent() != Some(dir.as_path()) {
        return Err(missing());
    }
    let file = std::fs::File::open(&path).map_err(|_| missing())?;
    let metadata = file.metadata().map_err(|_| missing())?;
    if !metadata.is_file() {
        return Err(missing());
    }
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE_BYTES + 1)
        .read_to_end(&mut pem)
        .map_err(|_| missing())?;
    if pem.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(ActivityError::config(format!(
            "CA file {name:?} is larger than {MAX_CA_FILE_BYTES} bytes"
        )));
    }
    Ok(pem)
}

fn sql_type(t: FieldType) -> &'static str {
    match t {
        FieldType::Integer => "bigint",
        FieldType::Number => "double precision",
        FieldType::String => "text",
        FieldType::Boolean => "boolean",
    }
}

/// Identifiers were validated as `[a-z_][a-z0-9_]*` (spec validation and catalog), so
/// quoting them is enough to splice them into SQL.
fn ident(name: &str) -> String {
    format!("\"{name}\"")
}

fn qualified(config: &PostgresDestinationConfig, table: &str) -> String {
    format!("{}.{}", ident(&config.schema), ident(table))
}

fn table_name(config: &PostgresDestinationConfig) -> String {
    qualified(config, &config.table)
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

/// The columns a destination table needs for `stream`, with their types.
fn required_columns(stream: &StreamSchema) -> Vec<(String, &'static str)> {
    let mut columns: Vec<(String, &'static str)> = stream
        .fields
        .iter()
        .map(|f| (f.name.clone(), sql_type(f.field_type)))
        .collect();
    columns.push(("_sluice_incarnation".into(), "bigint"));
    columns.push(("_sluice_version".into(), "bigint"));
    columns.push(("_sluice_synced_at".into(), "timestamp with time zone"));
    columns
}

pub async fn setup(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    stream: &StreamSchema,
    claim: &Claim,
) -> Result<(), ActivityError> {
    let table = table_name(config);
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

    let required = required_columns(stream);
    let registry = qualified(config, TABLES_TABLE);
    match columns_of(&mut tx, &config.schema, &config.table).await? {
        None => {
            let mut columns: Vec<String> = required
                .iter()
                .map(|(name, ty)| {
                    let constraint = match name.as_str() {
                        n if n == stream.primary_key => " NOT NULL",
                        "_sluice_incarnation" | "_sluice_version" => " NOT NULL",
                        "_sluice_synced_at" => " NOT NULL DEFAULT now()",
                        _ => "",
                    };
                    format!("{} {ty}{constraint}", ident(name))
                })
                .collect();
            columns.push(format!("PRIMARY KEY ({})", ident(&stream.primary_key)));
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
            .bind(&config.table)
            .bind(&claim.key)
            .bind(claim.incarnation)
            .execute(&mut *tx)
            .await?;
        }
        Some(existing) => {
            let owner: Option<(String, i64)> = sqlx::query_as(&format!(
                "SELECT pipeline_id, incarnation FROM {registry} WHERE table_name = $1"
            ))
            .bind(&config.table)
            .fetch_optional(&mut *tx)
            .await?;
            let ours = match owner {
                Some((key, incarnation))
                    if key == claim.key && incarnation == claim.incarnation =>
                {
                    true
                }
                // Made by an earlier incarnation of this pipeline that is gone now: the
                // table is kept data, no longer anyone's to alter or drop.
                Some((key, incarnation)) if key == claim.key && incarnation < claim.incarnation => {
                    sqlx::query(&format!("DELETE FROM {registry} WHERE table_name = $1"))
                        .bind(&config.table)
                        .execute(&mut *tx)
                        .await?;
                    false
                }
                Some(_) => {
                    return Err(ActivityError::config(format!(
                        "table {}.{} belongs to another Sluice pipeline, and two pipelines \
                         cannot write one table (if that pipeline no longer exists, delete \
                         its row from {}.{TABLES_TABLE})",
                        config.schema, config.table, config.schema
                    )));
                }
                None => false,
            };
            let mut missing = Vec::new();
            for (name, ty) in &required {
                match existing.get(name) {
                    Some(found) if found == ty => {}
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
                            "column {name} of {}.{} is {found}, not {ty}{hint}",
                            config.schema, config.table
                        )));
                    }
                    None => missing.push((name.clone(), *ty)),
                }
            }
            if !missing.is_empty() && !ours {
                let names: Vec<String> =
                    missing.iter().map(|(n, ty)| format!("{n} {ty}")).collect();
                return Err(ActivityError::config(format!(
                    "table {}.{} existed before this pipeline and lacks the columns {}; Sluice \
                     never alters a table it did not create: add them or choose another table",
                    config.schema,
                    config.table,
                    names.join(", ")
                )));
            }
            // Additive schema evolution of the pipeline's own table: new catalog fields
            // become new nullable columns. Only when something is missing, so an
            // unchanged setup never waits for an exclusive lock.
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
        }
    }
    tx.commit().await?;
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
                 spec_version BIGINT NOT NULL DEFAULT 0, position BIGINT NOT NULL DEFAULT -1, \
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
            if !columns.contains_key("position") {
                changes.push("ADD COLUMN position BIGINT NOT NULL DEFAULT -1".to_owned());
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

/// Where a write lane writes: its claim, topic and spec version.
pub struct WriteTarget<'a> {
    pub claim: &'a Claim,
    pub topic: &'a str,
    pub partition: i32,
    pub spec_version: i64,
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
    .bind(&config.table)
    .bind(target.topic)
    .bind(target.partition)
    .bind(target.claim.incarnation)
    .fetch_optional(pool)
    .await?;
    Ok(next)
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
         owner_epoch, incarnation, spec_version, position) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, -1) \
         ON CONFLICT (pipeline_id, table_name, topic, partition) DO UPDATE \
         SET owner_epoch = EXCLUDED.owner_epoch, \
             next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset), update_time = now() \
         WHERE o.owner_epoch <= EXCLUDED.owner_epoch AND o.incarnation = EXCLUDED.incarnation \
         RETURNING next_offset, spec_version, position"
    ))
    .bind(&claim.key)
    .bind(&config.table)
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
    tx.commit().await?;
    Ok(WriteState {
        next_offset: row.try_get(0)?,
        spec_version: row.try_get(1)?,
        position: row.try_get(2)?,
    })
}

/// One column of a batch, as a typed array.
enum ColumnValues {
    Integer(Vec<Option<i64>>),
    Number(Vec<Option<f64>>),
    String(Vec<Option<String>>),
    Boolean(Vec<Option<bool>>),
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
            "record {} (records-topic offset {}): field {field} is {value}, which does not fit its column",
            key_of(stream, record),
            record.offset
        ),
    }
}

/// "id=42": the record's primary key, as last_error names a refused record.
fn key_of(stream: &StreamSchema, record: &PendingRecord) -> String {
    let value = record.data.get(&stream.primary_key).map_or_else(
        || "null".to_owned(),
        |v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        },
    );
    format!("{}={value}", stream.primary_key)
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
            Ok(match f.field_type {
                FieldType::Integer => {
                    ColumnValues::Integer(column(stream, rows, name, Value::as_i64)?)
                }
                FieldType::Number => {
                    ColumnValues::Number(column(stream, rows, name, Value::as_f64)?)
                }
                FieldType::String => ColumnValues::String(column(stream, rows, name, |v| {
                    v.as_str().map(str::to_owned)
                })?),
                FieldType::Boolean => {
                    ColumnValues::Boolean(column(stream, rows, name, Value::as_bool)?)
                }
            })
        })
        .collect()
}

/// The upsert of a batch: one array per column, unnested into rows.
fn upsert_sql(config: &PostgresDestinationConfig, stream: &StreamSchema) -> String {
    let table = table_name(config);
    let names: Vec<String> = stream.fields.iter().map(|f| ident(&f.name)).collect();
    let n = stream.fields.len();
    let arrays: Vec<String> = stream
        .fields
        .iter()
        .enumerate()
        .map(|(i, f)| format!("${}::{}[]", i + 1, sql_type(f.field_type)))
        .collect();
    let aliases: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let updates: Vec<String> = stream
        .fields
        .iter()
        .filter(|f| f.name != stream.primary_key)
        .map(|f| format!("{0} = EXCLUDED.{0}", ident(&f.name)))
        .collect();
    format!(
        "INSERT INTO {table} ({names}, _sluice_incarnation, _sluice_version) \
         SELECT {aliases}, ${incarnation}::bigint, v \
         FROM UNNEST({arrays}, ${versions}::bigint[]) AS u({aliases}, v) \
         ON CONFLICT ({pk}) DO UPDATE SET {updates}_sluice_incarnation = EXCLUDED._sluice_incarnation, \
         _sluice_version = EXCLUDED._sluice_version, _sluice_synced_at = now() \
         WHERE ({table}._sluice_incarnation, {table}._sluice_version) \
             < (EXCLUDED._sluice_incarnation, EXCLUDED._sluice_version)",
        names = names.join(", "),
        aliases = aliases.join(", "),
        arrays = arrays.join(", "),
        versions = n + 1,
        incarnation = n + 2,
        pk = ident(&stream.primary_key),
        updates = updates.iter().map(|u| format!("{u}, ")).collect::<String>(),
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
            ColumnValues::String(v) => query.bind(v),
            ColumnValues::Boolean(v) => query.bind(v),
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

/// Writes one batch and its offsets in a single transaction. Returns the committed
/// next offset.
pub async fn write_batch(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    stream: &StreamSchema,
    target: &WriteTarget<'_>,
    batch: &[PendingRecord],
) -> Result<i64, ActivityError> {
    let offsets = qualified(config, OFFSETS_TABLE);
    let claim = target.claim;
    let mut tx = pool.begin().await?;
    // The fence first: the row is locked for this epoch before anything is written.
    let row = sqlx::query(&format!(
        "SELECT next_offset, spec_version, position FROM {offsets} \
         WHERE pipeline_id = $1 AND table_name = $2 AND topic = $3 AND partition = $4 \
           AND owner_epoch = $5 AND incarnation = $6 FOR UPDATE"
    ))
    .bind(&claim.key)
    .bind(&config.table)
    .bind(target.topic)
    .bind(target.partition)
    .bind(claim.epoch)
    .bind(claim.incarnation)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(ActivityError::Fenced);
    };
    let committed = WriteState {
        next_offset: row.try_get(0)?,
        spec_version: row.try_get(1)?,
        position: row.try_get(2)?,
    };
    let (picked, next) =
        select(committed, claim.incarnation, target.spec_version, batch).map_err(|refusal| {
            match refusal {
                Refusal::Superseded { .. } => ActivityError::Fenced,
                other => ActivityError::Invariant(other.to_string()),
            }
        })?;

    // ON CONFLICT cannot touch one row twice in a statement: keep the newest version
    // of each key in the batch.
    let mut newest: HashMap<String, &PendingRecord> = HashMap::new();
    for record in picked.iter().map(|i| &batch[*i]) {
        newest.insert(key_of(stream, record), record);
    }
    let mut rows: Vec<&PendingRecord> = newest.into_values().collect();
    rows.sort_by_key(|r| r.offset);
    if !rows.is_empty() {
        let sql = upsert_sql(config, stream);
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
    sqlx::query(&format!(
        "UPDATE {offsets} SET next_offset = $5, spec_version = $6, position = $7, update_time = now() \
         WHERE pipeline_id = $1 AND table_name = $2 AND topic = $3 AND partition = $4"
    ))
    .bind(&claim.key)
    .bind(&config.table)
    .bind(target.topic)
    .bind(target.partition)
    .bind(next.next_offset)
    .bind(next.spec_version)
    .bind(next.position)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(next.next_offset)
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
                    "record {} (records-topic offset {}) was refused by the destination: {message}",
                    key_of(stream, record),
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
/// (and any older incarnation's), its table only when the spec asks for it and the
/// table is registered to this incarnation, and its table registrations otherwise
/// (a kept table is the user's from then on).
pub async fn teardown(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
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
        let owner: Option<(String, i64)> = sqlx::query_as(&format!(
            "SELECT pipeline_id, incarnation FROM {registry} WHERE table_name = $1"
        ))
        .bind(&config.table)
        .fetch_optional(&mut *tx)
        .await?;
        let ours = owner.is_some_and(|(k, i)| k == claim.key && i == claim.incarnation);
        if config.drop_table_on_delete && ours {
            sqlx::query(&format!("DROP TABLE IF EXISTS {}", table_name(config)))
                .execute(&mut *tx)
                .await?;
        } else if config.drop_table_on_delete {
            tracing::warn!(
                pipeline_id = %claim.key,
                table = %format!("{}.{}", config.schema, config.table),
                "not dropping a destination table this pipeline did not create"
            );
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
            table: "orders".into(),
            drop_table_on_delete: false,
            batch_size: 10,
            ssl_ca_pem: None,
        }
    }

    #[test]
    fn the_upsert_binds_one_array_per_column() {
        let sql = upsert_sql(&config(), &generator_stream());
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
    fn ca_files_come_only_from_the_ca_directory() {
        let dir = std::env::temp_dir().join(format!("sluice-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("ca.pem"), "-----BEGIN CERTIFICATE-----").expect("write");
        assert!(read_ca_file(Some(&dir), "ca.pem").is_ok());
        assert!(
            read_ca_file(None, "ca.pem").is_err(),
            "no directory configured"
        );
        assert!(read_ca_file(Some(&dir), "../ca.pem").is_err());
        assert!(read_ca_file(Some(&dir), "missing.pem").is_err());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/dev/zero", dir.join("zero.pem")).expect("symlink");
            assert!(
                read_ca_file(Some(&dir), "zero.pem").is_err(),
                "a link out of the directory"
            );
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
