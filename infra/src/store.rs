//! Postgres: connecting, the embedded migrations, and reading pipeline rows and their
//! event history. Queries that only one process runs live with that process.

use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use sluice_protocol::conversions::PipelineRecord;
use sluice_protocol::spec::PipelineSpec;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgExecutor, PgPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

/// The columns [`record_from_row`] expects, in a form that can be spliced into queries.
pub const PIPELINE_COLUMNS: &str = "id, tenant, name, spec, desired_status, status, generation, \
     observed_generation, owner, owner_epoch, last_error, partition, incarnation, \
     pending_activity, sync_requests, reset_request, create_time, update_time, \
     unassigned_reason, inputs_incarnation";

/// Limits on every session of Sluice's own database, so that no session waits for ever
/// behind another: a process stopped in the middle of a transaction (SIGSTOP, a VM
/// pause) loses that transaction and its locks after the idle timeout, and a statement
/// that waits for a lock gives up after the lock timeout (the caller retries, or the
/// API answers UNAVAILABLE).
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub idle_in_transaction_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            idle_in_transaction_timeout: Duration::from_secs(30),
        }
    }
}

/// Connection options for `url` with the session limits applied.
pub fn connect_options(url: &str, limits: SessionLimits) -> Result<PgConnectOptions, StoreError> {
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    Ok(PgConnectOptions::from_str(url)?.options([
        ("lock_timeout", ms(limits.lock_timeout)),
        ("statement_timeout", ms(limits.statement_timeout)),
        (
            "idle_in_transaction_session_timeout",
            ms(limits.idle_in_transaction_timeout),
        ),
    ]))
}

/// How long a pooled connection may sit idle before it is pinged on its next use.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// Connects, retrying until `deadline` elapses so a process may start before Postgres.
pub async fn connect(
    url: &str,
    max_connections: u32,
    deadline: Duration,
) -> Result<PgPool, StoreError> {
    let options = connect_options(url, SessionLimits::default())?;
    let started = Instant::now();
    loop {
        match PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            // A connection in steady use goes out without a ping: the ping was one more
            // round trip per query (half the database time of a GetPipeline). One that
            // sat idle is pinged first, so a database restart is noticed before a
            // caller's query fails on a dead connection.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > PING_WHEN_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone())
            .await
        {
            Ok(pool) => return Ok(pool),
            Err(e) if started.elapsed() < deadline => {
                tracing::warn!(error = %e, "postgres not reachable yet, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Applies the embedded migrations. sqlx holds a Postgres advisory lock while it
/// migrates, so several processes starting together apply each migration once.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::migrate!("../migrations").run(pool).await?;
    Ok(())
}

/// Applies the migrations over a connection of its own, without the session limits
/// (a migration may rewrite a table for longer than a statement may normally take).
pub async fn migrate_url(url: &str, deadline: Duration) -> Result<(), StoreError> {
    let started = Instant::now();
    let pool = loop {
        match PgPoolOptions::new().max_connections(1).connect(url).await {
            Ok(pool) => break pool,
            Err(e) if started.elapsed() < deadline => {
                tracing::warn!(error = %e, "postgres not reachable yet, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    migrate(&pool).await?;
    pool.close().await;
    Ok(())
}

pub fn record_from_row(row: &PgRow) -> Result<PipelineRecord, StoreError> {
    let corrupt =
        |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("{what}: {e}"));
    let spec_json: serde_json::Value = row.try_get("spec")?;
    let mut spec = PipelineSpec::from_json(spec_json).map_err(|e| corrupt("spec", &e))?;
    let key: String = row.try_get("id")?;
    if let Some(e) =
        sluice_protocol::secrets::open_spec(&mut spec, crate::secrets::installed(), &key)
    {
        // The value stays sealed; validation reports it where the spec is used.
        tracing::warn!(error = %e, "cannot open a secret of a stored spec");
    }
    let desired: String = row.try_get("desired_status")?;
    let status: Option<String> = row.try_get("status")?;
    let create_time: DateTime<Utc> = row.try_get("create_time")?;
    let update_time: DateTime<Utc> = row.try_get("update_time")?;
    let incarnation: i64 = row.try_get("incarnation")?;
    let inputs_incarnation: Option<i64> = row.try_get("inputs_incarnation")?;
    Ok(PipelineRecord {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        name: row.try_get("name")?,
        spec,
        desired_status: desired.parse().map_err(|e| corrupt("desired_status", &e))?,
        status: status
            .map(|s| s.parse())
            .transpose()
            .map_err(|e| corrupt("status", &e))?,
        generation: row.try_get("generation")?,
        observed_generation: row.try_get("observed_generation")?,
        owner: row.try_get("owner")?,
        owner_epoch: row.try_get("owner_epoch")?,
        last_error: row.try_get("last_error")?,
        partition: row.try_get("partition")?,
        incarnation,
        inputs_open: inputs_incarnation == Some(incarnation),
        pending_activity: row
            .try_get::<Option<serde_json::Value>, _>("pending_activity")?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| corrupt("pending_activity", &e))?,
        sync_requests: row.try_get("sync_requests")?,
        reset_request: row
            .try_get::<Option<serde_json::Value>, _>("reset_request")?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| corrupt("reset_request", &e))?,
        create_time: SystemTime::from(create_time),
        update_time: SystemTime::from(update_time),
        unassigned_reason: row.try_get("unassigned_reason")?,
    })
}

pub async fn get_pipeline<'e>(
    executor: impl PgExecutor<'e>,
    id: &str,
) -> Result<Option<PipelineRecord>, StoreError> {
    let sql = format!("SELECT {PIPELINE_COLUMNS} FROM pipelines WHERE id = $1");
    let row = sqlx::query(&sql).bind(id).fetch_optional(executor).await?;
    row.as_ref().map(record_from_row).transpose()
}

/// One row of the event history.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineEvent {
    /// Position in the event log (ascending in time).
    pub id: i64,
    pub pipeline_id: String,
    pub time: SystemTime,
    pub actor: String,
    pub from_status: Option<String>,
    pub to_status: String,
    pub generation: i64,
    pub reason: String,
}

/// A pipeline's events after the one numbered `after` (from the first when None),
/// oldest first, at most `limit`.
pub async fn list_events(
    pool: &PgPool,
    pipeline_id: &str,
    after: Option<i64>,
    limit: i64,
) -> Result<Vec<PipelineEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, pipeline_id, time, actor, from_status, to_status, generation, reason \
         FROM pipeline_events WHERE pipeline_id = $1 AND id > coalesce($2, 0) \
         ORDER BY id LIMIT $3",
    )
    .bind(pipeline_id)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let time: DateTime<Utc> = r.try_get("time")?;
            Ok(PipelineEvent {
                id: r.try_get("id")?,
                pipeline_id: r.try_get("pipeline_id")?,
                time: time.into(),
                actor: r.try_get("actor")?,
                from_status: r.try_get("from_status")?,
                to_status: r.try_get("to_status")?,
                generation: r.try_get("generation")?,
                reason: r.try_get("reason")?,
            })
        })
        .collect()
}
