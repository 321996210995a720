//! The `postgres` destination. Setup derives the table from the stream catalog
//! (additive changes only); each batch upserts rows AND records the consumed
//! records-topic offset in one transaction, so the table holds each record exactly
//! once across crashes. Upserts carry a newer-than guard on `_sluice_version` (the
//! record's topic offset) so an older version never overwrites a newer one, and the
//! offsets row carries the owner epoch so a fenced worker cannot commit.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Map, Value};
use sluice_protocol::catalog::{FieldType, StreamSchema};
use sluice_protocol::spec::PostgresDestinationConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, QueryBuilder, Row};

use crate::activity::ActivityError;

/// Whether `schema.table` exists.
async fn table_exists<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    schema: &str,
    table: &str,
) -> Result<bool, ActivityError> {
    Ok(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{schema}.{table}"))
        .fetch_one(executor)
        .await?)
}

/// Connection pools per destination URL, shared by all pipelines of a worker so that
/// thousands of pipelines writing to one database do not open thousands of pools.
#[derive(Default)]
pub struct DestinationPools {
    pools: Mutex<HashMap<String, PgPool>>,
}

impl DestinationPools {
    pub fn get(&self, url: &str) -> Result<PgPool, ActivityError> {
        let mut pools = self.pools.lock().expect("pool map lock is never poisoned");
        if let Some(pool) = pools.get(url) {
            return Ok(pool.clone());
        }
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(destination_options(url)?);
        pools.insert(url.to_owned(), pool.clone());
        Ok(pool)
    }
}

/// Connection options from the destination URL alone. The driver would fill a missing
/// password from the worker's PGPASSWORD or ~/.pgpass; a destination must never use the
/// worker's own credentials, so a URL without a password gets an empty one.
fn destination_options(url: &str) -> Result<PgConnectOptions, ActivityError> {
    let parsed =
        url::Url::parse(url).map_err(|_| ActivityError::config("destination url is not a URL"))?;
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| ActivityError::config(format!("destination url: {e}")))?;
    let has_password =
        parsed.password().is_some() || parsed.query_pairs().any(|(k, _)| k == "password");
    Ok(if has_password {
        options
    } else {
        options.password("")
    })
}

/// A record read from the records topic, ready to be written.
#[derive(Debug, Clone)]
pub struct PendingRecord {
    pub offset: i64,
    pub data: Map<String, Value>,
}

const OFFSETS_TABLE: &str = "_sluice_offsets";
/// The comment of destination tables Sluice created (and so may drop).
const CREATED_BY_SLUICE: &str = "created by Sluice";

/// A time as PostgreSQL stores it (microseconds), so values read back compare equal.
fn db_time(t: std::time::SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t).trunc_subsecs(6)
}

fn sql_type(t: FieldType) -> &'static str {
    match t {
        FieldType::Integer => "BIGINT",
        FieldType::Number => "DOUBLE PRECISION",
        FieldType::String => "TEXT",
        FieldType::Boolean => "BOOLEAN",
    }
}

/// Identifiers were validated as `[a-z_][a-z0-9_]*` (spec validation and catalog), so
/// quoting them is enough to splice them into SQL.
fn ident(name: &str) -> String {
    format!("\"{name}\"")
}

fn table_name(config: &PostgresDestinationConfig) -> String {
    format!("{}.{}", ident(&config.schema), ident(&config.table))
}

fn offsets_table(config: &PostgresDestinationConfig) -> String {
    format!("{}.{}", ident(&config.schema), ident(OFFSETS_TABLE))
}

pub async fn setup(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    stream: &StreamSchema,
) -> Result<(), ActivityError> {
    let table = table_name(config);
    let mut columns: Vec<String> = stream
        .fields
        .iter()
        .map(|f| {
            let not_null = if f.name == stream.primary_key {
                " NOT NULL"
            } else {
                ""
            };
            format!("{} {}{not_null}", ident(&f.name), sql_type(f.field_type))
        })
        .collect();
    columns.push("_sluice_incarnation TIMESTAMPTZ NOT NULL DEFAULT '-infinity'".into());
    columns.push("_sluice_version BIGINT NOT NULL".into());
    columns.push("_sluice_synced_at TIMESTAMPTZ NOT NULL DEFAULT now()".into());
    columns.push(format!("PRIMARY KEY ({})", ident(&stream.primary_key)));

    // The table and its "created by Sluice" mark are made in one transaction, so a
    // failed attempt leaves neither and the retry still knows the table is Sluice's.
    let mut tx = pool.begin().await?;
    // Concurrent CREATE ... IF NOT EXISTS of the same objects (pipelines sharing a
    // database set up at once) can fail on PostgreSQL's catalog; one at a time.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('sluice.destination.ddl', 0))")
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        ident(&config.schema)
    ))
    .execute(&mut *tx)
    .await?;
    let existed = table_exists(&mut *tx, &config.schema, &config.table).await?;
    if !existed {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} ({})",
            columns.join(", ")
        ))
        .execute(&mut *tx)
        .await?;
        // Marks the table as Sluice's: only such tables are ever dropped.
        sqlx::query(&format!(
            "COMMENT ON TABLE {table} IS '{CREATED_BY_SLUICE}'"
        ))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {} (pipeline_id TEXT NOT NULL, table_name TEXT NOT NULL, \
         topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset BIGINT NOT NULL, \
         owner_epoch BIGINT NOT NULL, \
         incarnation TIMESTAMPTZ NOT NULL DEFAULT '-infinity', \
         update_time TIMESTAMPTZ NOT NULL DEFAULT now(), \
         PRIMARY KEY (pipeline_id, table_name, topic, partition))",
        offsets_table(config)
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    for statement in [
        format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS _sluice_incarnation TIMESTAMPTZ NOT NULL DEFAULT '-infinity'"),
        format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS incarnation TIMESTAMPTZ NOT NULL DEFAULT '-infinity'",
            offsets_table(config)
        ),
    ] {
        sqlx::query(&statement).execute(pool).await?;
    }
    // Additive schema evolution: new catalog fields become new nullable columns.
    for f in &stream.fields {
        sqlx::query(&format!(
            "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} {}",
            ident(&f.name),
            sql_type(f.field_type)
        ))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// The next offset to consume for this pipeline and table, if any batch was committed.
pub async fn committed_offset(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    target: &BatchTarget<'_>,
) -> Result<Option<i64>, ActivityError> {
    let incarnation = db_time(target.incarnation);
    let row = sqlx::query(&format!(
        "SELECT next_offset FROM {} WHERE pipeline_id = $1 AND table_name = $2 AND topic = $3 \
         AND partition = $4 AND incarnation = $5",
        offsets_table(config)
    ))
    .bind(target.pipeline_id)
    .bind(&config.table)
    .bind(target.topic)
    .bind(target.partition)
    .bind(incarnation)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| r.get::<i64, _>(0)).filter(|o| *o >= 0))
}

/// Takes the offsets row over for `target.epoch` and returns the next offset to
/// consume (None if nothing was committed yet). From then on a previous owner's write
/// lane, which still holds an older epoch, can no longer commit a batch.
pub async fn fence_offsets(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    target: &BatchTarget<'_>,
) -> Result<Option<i64>, ActivityError> {
    let offsets = offsets_table(config);
    let incarnation = db_time(target.incarnation);
    // A row left by an older incarnation of the pipeline (deleted and created again
    // with the same id) is taken over and restarted; within one incarnation the epoch
    // decides.
    let row = sqlx::query(&format!(
        "INSERT INTO {offsets} (pipeline_id, table_name, topic, partition, next_offset, owner_epoch, incarnation) \
         VALUES ($1, $2, $3, $4, -1, $5, $6) \
         ON CONFLICT (pipeline_id, table_name, topic, partition) DO UPDATE \
         SET owner_epoch = EXCLUDED.owner_epoch, \
             next_offset = CASE WHEN {offsets}.incarnation < EXCLUDED.incarnation THEN -1 \
                                ELSE {offsets}.next_offset END, \
             incarnation = EXCLUDED.incarnation, update_time = now() \
         WHERE {offsets}.incarnation < EXCLUDED.incarnation \
            OR ({offsets}.incarnation = EXCLUDED.incarnation AND {offsets}.owner_epoch <= EXCLUDED.owner_epoch) \
         RETURNING next_offset"
    ))
    .bind(target.pipeline_id)
    .bind(&config.table)
    .bind(target.topic)
    .bind(target.partition)
    .bind(target.epoch)
    .bind(incarnation)
    .fetch_optional(pool)
    .await?;
    match row {
        None => Err(ActivityError::Fenced),
        Some(row) => Ok(Some(row.get::<i64, _>(0)).filter(|o| *o >= 0)),
    }
}

pub struct BatchTarget<'a> {
    pub pipeline_id: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub epoch: i64,
    /// Creation time of the pipeline: offsets restart when a deleted pipeline is
    /// created again, so the newer-than guard compares (incarnation, offset).
    pub incarnation: std::time::SystemTime,
}

/// Writes one batch and its offset in a single transaction. Returns the committed
/// next offset.
pub async fn write_batch(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    stream: &StreamSchema,
    target: &BatchTarget<'_>,
    batch: &[PendingRecord],
) -> Result<i64, ActivityError> {
    let Some(last) = batch.last() else {
        return Err(ActivityError::transient("empty batch"));
    };
    let next_offset = last.offset + 1;
    // ON CONFLICT cannot touch one row twice in a statement: keep the newest version
    // of each key in the batch.
    let mut newest: HashMap<String, &PendingRecord> = HashMap::new();
    for record in batch {
        let key = record
            .data
            .get(&stream.primary_key)
            .map(Value::to_string)
            .unwrap_or_default();
        newest.insert(key, record);
    }
    let mut rows: Vec<&PendingRecord> = newest.into_values().collect();
    rows.sort_by_key(|r| r.offset);

    let table = table_name(config);
    let mut tx = pool.begin().await?;
    let mut insert = QueryBuilder::new(format!("INSERT INTO {table} ("));
    for f in &stream.fields {
        insert.push(ident(&f.name)).push(", ");
    }
    insert.push("_sluice_incarnation, _sluice_version) ");
    let incarnation = db_time(target.incarnation);
    insert.push_values(rows, |mut b, record| {
        for f in &stream.fields {
            let v = record.data.get(&f.name);
            match f.field_type {
                FieldType::Integer => b.push_bind(v.and_then(Value::as_i64)),
                FieldType::Number => b.push_bind(v.and_then(Value::as_f64)),
                FieldType::String => b.push_bind(v.and_then(Value::as_str).map(str::to_owned)),
                FieldType::Boolean => b.push_bind(v.and_then(Value::as_bool)),
            };
        }
        b.push_bind(incarnation);
        b.push_bind(record.offset);
    });
    insert.push(format!(
        " ON CONFLICT ({}) DO UPDATE SET ",
        ident(&stream.primary_key)
    ));
    for f in stream
        .fields
        .iter()
        .filter(|f| f.name != stream.primary_key)
    {
        insert.push(format!("{0} = EXCLUDED.{0}, ", ident(&f.name)));
    }
    insert.push(format!(
        "_sluice_incarnation = EXCLUDED._sluice_incarnation, \
         _sluice_version = EXCLUDED._sluice_version, _sluice_synced_at = now() \
         WHERE ({table}._sluice_incarnation, {table}._sluice_version) \
            <= (EXCLUDED._sluice_incarnation, EXCLUDED._sluice_version)"
    ));
    insert.build().execute(&mut *tx).await?;

    let offsets = offsets_table(config);
    let committed = sqlx::query(&format!(
        "INSERT INTO {offsets} (pipeline_id, table_name, topic, partition, next_offset, owner_epoch, incarnation) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (pipeline_id, table_name, topic, partition) DO UPDATE \
         SET next_offset = EXCLUDED.next_offset, owner_epoch = EXCLUDED.owner_epoch, update_time = now() \
         WHERE {offsets}.incarnation = EXCLUDED.incarnation \
           AND {offsets}.owner_epoch <= EXCLUDED.owner_epoch \
           AND {offsets}.next_offset <= EXCLUDED.next_offset"
    ))
    .bind(target.pipeline_id)
    .bind(&config.table)
    .bind(target.topic)
    .bind(target.partition)
    .bind(next_offset)
    .bind(target.epoch)
    .bind(incarnation)
    .execute(&mut *tx)
    .await?;
    if committed.rows_affected() == 0 {
        // Roll back; then tell a stale writer (a newer owner or incarnation holds the
        // row) from a batch that would move the offsets back, which is a bug.
        drop(tx);
        let holder: Option<(i64, DateTime<Utc>, i64)> = sqlx::query_as(&format!(
            "SELECT owner_epoch, incarnation, next_offset FROM {offsets} \
             WHERE pipeline_id = $1 AND table_name = $2 AND topic = $3 AND partition = $4"
        ))
        .bind(target.pipeline_id)
        .bind(&config.table)
        .bind(target.topic)
        .bind(target.partition)
        .fetch_optional(pool)
        .await?;
        return Err(match holder {
            Some((epoch, inc, stored)) if epoch <= target.epoch && inc == incarnation => {
                ActivityError::Invariant(format!(
                    "batch ending at offset {next_offset} would move the committed offset back from {stored}"
                ))
            }
            _ => ActivityError::Fenced,
        });
    }
    tx.commit().await?;
    Ok(next_offset)
}

/// Drops what the pipeline created in the destination: its offsets always, the table
/// only when the spec asks for it.
pub async fn teardown(
    pool: &PgPool,
    config: &PostgresDestinationConfig,
    pipeline_id: &str,
) -> Result<(), ActivityError> {
    if table_exists(pool, &config.schema, OFFSETS_TABLE).await? {
        sqlx::query(&format!(
            "DELETE FROM {} WHERE pipeline_id = $1",
            offsets_table(config)
        ))
        .bind(pipeline_id)
        .execute(pool)
        .await?;
    }
    if config.drop_table_on_delete {
        let comment: Option<String> =
            sqlx::query_scalar("SELECT obj_description(to_regclass($1), 'pg_class')")
                .bind(format!("{}.{}", config.schema, config.table))
                .fetch_one(pool)
                .await?;
        if comment.as_deref() == Some(CREATED_BY_SLUICE) {
            sqlx::query(&format!("DROP TABLE IF EXISTS {}", table_name(config)))
                .execute(pool)
                .await?;
        } else if comment.is_some() || table_exists(pool, &config.schema, &config.table).await? {
            // A table that existed before the pipeline is never dropped by it.
            tracing::warn!(
                pipeline_id,
                table = %format!("{}.{}", config.schema, config.table),
                "not dropping a destination table that Sluice did not create"
            );
        }
    }
    Ok(())
}
