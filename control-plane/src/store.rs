//! The control plane's queries. Every change of desired state happens in one
//! transaction together with its outbox row, so a change and its signal are never
//! separated (no dual write).

use sluice_infra::store::{record_from_row, StoreError, PIPELINE_COLUMNS};
use sluice_protocol::conversions::PipelineRecord;
use sluice_protocol::signal::Signal;
use sluice_protocol::status::DesiredStatus;
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::auth::PipelineRef;

pub struct NewPipeline<'a> {
    pub pipeline: &'a PipelineRef,
    /// The spec as stored (secrets sealed).
    pub spec: &'a serde_json::Value,
    pub desired_status: DesiredStatus,
    pub partition: i32,
}

/// Inserts a pipeline and its first signal; None if the id is taken.
pub async fn insert_pipeline(
    tx: &mut Transaction<'_, Postgres>,
    new: &NewPipeline<'_>,
) -> Result<Option<PipelineRecord>, StoreError> {
    let sql = format!(
        "INSERT INTO pipelines (id, tenant, name, spec, desired_status, partition) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING {PIPELINE_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(new.pipeline.key())
        .bind(&new.pipeline.tenant)
        .bind(&new.pipeline.name)
        .bind(new.spec)
        .bind(new.desired_status.as_str())
        .bind(new.partition)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let record = record_from_row(&row)?;
    insert_signal(tx, &record).await?;
    Ok(Some(record))
}

/// Outcome of registering an idempotency key.
pub enum RequestClaim {
    /// First use: proceed, then [`save_response`].
    New,
    /// A retry of a completed request: replay this response.
    Replay(Vec<u8>),
    /// The key was used for another request.
    Mismatch,
}

/// Registers `request_id` inside the request's transaction, with a digest of the whole
/// request. A concurrent duplicate waits on the unique key until the first commits,
/// then sees its response; the same id with another method, target or body is a
/// mismatch.
pub async fn claim_request(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    request_id: uuid::Uuid,
    method: &str,
    target: &str,
    request_hash: &[u8],
) -> Result<RequestClaim, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO request_log (tenant, request_id, method, target, request_hash) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, request_id) DO NOTHING",
    )
    .bind(tenant)
    .bind(request_id)
    .bind(method)
    .bind(target)
    .bind(request_hash)
    .execute(&mut **tx)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(RequestClaim::New);
    }
    let row = sqlx::query(
        "SELECT method, target, response, request_hash FROM request_log \
         WHERE tenant = $1 AND request_id = $2",
    )
    .bind(tenant)
    .bind(request_id)
    .fetch_one(&mut **tx)
    .await?;
    let (m, t, response, hash): (String, String, Option<Vec<u8>>, Option<Vec<u8>>) = (
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    );
    // Keys stored before digests were kept compare by method and target only.
    let same_body = hash.is_none_or(|h| h == request_hash);
    match response {
        Some(bytes) if m == method && t == target && same_body => Ok(RequestClaim::Replay(bytes)),
        _ => Ok(RequestClaim::Mismatch),
    }
}

pub async fn save_response(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    request_id: uuid::Uuid,
    response: Vec<u8>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE request_log SET response = $3 WHERE tenant = $1 AND request_id = $2")
        .bind(tenant)
        .bind(request_id)
        .bind(response)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn purge_request_log(pool: &PgPool) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM request_log WHERE create_time < now() - interval '1 day'")
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// The ownership history is kept for a week; each existing pipeline's latest row stays
/// whatever its age (it tells who owns the pipeline now, or who owned it last).
pub async fn purge_ownership_history(pool: &PgPool) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM pipeline_ownership o WHERE claimed_at < now() - interval '7 days' \
         AND (EXISTS (SELECT 1 FROM pipeline_ownership n \
                      WHERE n.pipeline_id = o.pipeline_id AND n.epoch > o.epoch) \
              OR NOT EXISTS (SELECT 1 FROM pipelines p WHERE p.id = o.pipeline_id))",
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Serialises creates within a tenant (for the pipelines-per-tenant limit) and returns
/// how many pipelines the tenant has.
pub async fn lock_tenant_and_count(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
) -> Result<i64, StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('sluice.tenant:' || $1, 0))")
        .bind(tenant)
        .execute(&mut **tx)
        .await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM pipelines WHERE tenant = $1")
        .bind(tenant)
        .fetch_one(&mut **tx)
        .await?;
    Ok(count)
}

/// Locks a pipeline row for a read-modify-write.
pub async fn lock_pipeline(
    tx: &mut Transaction<'_, Postgres>,
    pipeline: &PipelineRef,
) -> Result<Option<PipelineRecord>, StoreError> {
    let sql = format!(
        "SELECT {PIPELINE_COLUMNS} FROM pipelines WHERE tenant = $1 AND name = $2 FOR UPDATE"
    );
    let row = sqlx::query(&sql)
        .bind(&pipeline.tenant)
        .bind(&pipeline.name)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(record_from_row).transpose()
}

/// Writes a new desired state if `current` is still what the row holds (same
/// incarnation, same generation), bumps the generation and queues the signal, in one
/// statement; None if the row changed since `current` was read.
pub async fn write_desired_at<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    current: &PipelineRecord,
    desired: DesiredStatus,
    spec: &serde_json::Value,
) -> Result<Option<PipelineRecord>, StoreError> {
    let signal = Signal {
        pipeline_id: current.id.clone(),
        generation: current.generation + 1,
    };
    // The change's trace goes along with its signal.
    let traceparent = sluice_infra::telemetry::traceparent(&tracing::Span::current());
    let sql = format!(
        "WITH changed AS ( \
             UPDATE pipelines SET desired_status = $2, spec = $3, generation = generation + 1, \
                 generation_time = now(), update_time = now() \
             WHERE id = $1 AND incarnation = $4 AND generation = $5 \
             RETURNING {PIPELINE_COLUMNS}), \
         signal AS ( \
             INSERT INTO signal_outbox (pipeline_id, partition, payload, traceparent) \
             SELECT id, partition, $6, $7 FROM changed) \
         SELECT * FROM changed"
    );
    let row = sqlx::query(&sql)
        .bind(&current.id)
        .bind(desired.as_str())
        .bind(spec)
        .bind(current.incarnation)
        .bind(current.generation)
        .bind(signal.to_bytes())
        .bind(traceparent)
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(record_from_row).transpose()
}

async fn insert_signal(
    tx: &mut Transaction<'_, Postgres>,
    record: &PipelineRecord,
) -> Result<(), StoreError> {
    let signal = Signal {
        pipeline_id: record.id.clone(),
        generation: record.generation,
    };
    // The change's trace goes along with its signal.
    let traceparent = sluice_infra::telemetry::traceparent(&tracing::Span::current());
    sqlx::query(
        "INSERT INTO signal_outbox (pipeline_id, partition, payload, traceparent) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(&record.id)
    .bind(record.partition)
    .bind(signal.to_bytes())
    .bind(traceparent)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Records that `record`'s incarnation has its inputs topic and signals the owner, which
/// starts the live lane; true if this call did (an incarnation opens its inputs once).
pub async fn open_inputs(pool: &PgPool, record: &PipelineRecord) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let sql = format!(
        "UPDATE pipelines SET inputs_incarnation = incarnation \
         WHERE id = $1 AND incarnation = $2 AND inputs_incarnation IS DISTINCT FROM incarnation \
         RETURNING {PIPELINE_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(&record.id)
        .bind(record.incarnation)
        .fetch_optional(&mut *tx)
        .await?;
    let opened = match row {
        Some(row) => {
            insert_signal(&mut tx, &record_from_row(&row)?).await?;
            true
        }
        None => false,
    };
    tx.commit().await?;
    Ok(opened)
}

pub async fn fetch_pipeline(
    pool: &PgPool,
    pipeline: &PipelineRef,
) -> Result<Option<PipelineRecord>, StoreError> {
    let sql = format!("SELECT {PIPELINE_COLUMNS} FROM pipelines WHERE tenant = $1 AND name = $2");
    let row = sqlx::query(&sql)
        .bind(&pipeline.tenant)
        .bind(&pipeline.name)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(record_from_row).transpose()
}

/// One page of pipelines ordered by (tenant, id), starting after `after`; `tenant`
/// None lists every tenant.
/// Which pipelines a listing returns besides the caller's scope.
#[derive(Debug, Default)]
pub struct ListFilter {
    /// Reported statuses; "" stands for none reported yet. None: any.
    pub status: Option<Vec<String>>,
    /// Desired statuses. None: any.
    pub desired_status: Option<Vec<String>>,
}

pub async fn list_pipelines(
    pool: &PgPool,
    tenant: Option<&str>,
    filter: &ListFilter,
    after: Option<&PipelineRef>,
    limit: i64,
) -> Result<Vec<PipelineRecord>, StoreError> {
    let sql = format!(
        "SELECT {PIPELINE_COLUMNS} FROM pipelines \
         WHERE ($1::text IS NULL OR tenant = $1) \
           AND ($2::text IS NULL OR (tenant, name) > ($2, $3)) \
           AND ($5::text[] IS NULL OR coalesce(status, '') = ANY($5)) \
           AND ($6::text[] IS NULL OR desired_status = ANY($6)) \
         ORDER BY tenant, name LIMIT $4"
    );
    let rows = sqlx::query(&sql)
        .bind(tenant)
        .bind(after.map(|a| a.tenant.as_str()))
        .bind(after.map(|a| a.name.as_str()))
        .bind(limit)
        .bind(filter.status.as_deref())
        .bind(filter.desired_status.as_deref())
        .fetch_all(pool)
        .await?;
    rows.iter().map(record_from_row).collect()
}

/// The internal key of a pipeline: the stored one while the row exists (rows created
/// before tenancy keep their old key), else the key it would have had.
pub async fn key_of(pool: &PgPool, pipeline: &PipelineRef) -> Result<String, StoreError> {
    let stored: Option<String> =
        sqlx::query_scalar("SELECT id FROM pipelines WHERE tenant = $1 AND name = $2")
            .bind(&pipeline.tenant)
            .bind(&pipeline.name)
            .fetch_optional(pool)
            .await?;
    Ok(stored.unwrap_or_else(|| pipeline.key()))
}

pub async fn pipeline_has_history(pool: &PgPool, id: &str) -> Result<bool, StoreError> {
    let row = sqlx::query(
        "SELECT EXISTS (SELECT 1 FROM pipelines WHERE id = $1) \
             OR EXISTS (SELECT 1 FROM pipeline_events WHERE pipeline_id = $1)",
    )
    .bind(id)
    .fetch_one(pool)
    .await?;
    Ok(row.try_get::<bool, _>(0)?)
}

/// Counts a sync request up and queues the signal that wakes the owner.
pub async fn request_sync(
    tx: &mut Transaction<'_, Postgres>,
    record: &PipelineRecord,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE pipelines SET sync_requests = sync_requests + 1 WHERE id = $1")
        .bind(&record.id)
        .execute(&mut **tx)
        .await?;
    insert_signal(tx, record).await
}

/// The names of the streams the pipeline's last setup discovered (its checkpoint's
/// catalog); empty before the first setup.
pub async fn catalog_streams(
    tx: &mut Transaction<'_, Postgres>,
    id: &str,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT s->>'name' FROM pipelines,          jsonb_array_elements(COALESCE(checkpoint->'catalog', '[]'::jsonb)) s WHERE id = $1",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?)
}

/// Adds streams to the pipeline's pending reset (None: all streams), bumping the
/// generation so that a client can wait for the worker to have applied it.
pub async fn request_reset(
    tx: &mut Transaction<'_, Postgres>,
    id: &str,
    streams: Option<&[String]>,
) -> Result<PipelineRecord, StoreError> {
    let current: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT reset_request FROM pipelines WHERE id = $1")
            .bind(id)
            .fetch_one(&mut **tx)
            .await?;
    // An empty list means every stream; a request for all streams absorbs any other.
    let merged = match (current, streams) {
        (_, None) => serde_json::json!([]),
        (Some(serde_json::Value::Array(a)), _) if a.is_empty() => serde_json::json!([]),
        (Some(serde_json::Value::Array(a)), Some(new)) => {
            let mut names: std::collections::BTreeSet<String> = a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            names.extend(new.iter().cloned());
            serde_json::json!(names)
        }
        (_, Some(new)) => serde_json::json!(new),
    };
    let sql = format!(
        "UPDATE pipelines SET reset_request = $2, generation = generation + 1, generation_time = now(), \
         update_time = now() WHERE id = $1 RETURNING {PIPELINE_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(merged)
        .fetch_one(&mut **tx)
        .await?;
    let record = record_from_row(&row)?;
    insert_signal(tx, &record).await?;
    Ok(record)
}

/// One run of a pipeline, as ListRuns shows it.
pub struct RunRow {
    pub number: i64,
    pub trigger: String,
    pub start_time: chrono::DateTime<chrono::Utc>,
    pub end_time: Option<chrono::DateTime<chrono::Utc>>,
    pub records_read: i64,
    pub records_written: i64,
    pub outcome: String,
    pub error: Option<String>,
}

/// Runs of an incarnation of a pipeline, newest first, before run `before`.
pub async fn list_runs(
    pool: &PgPool,
    id: &str,
    incarnation: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<RunRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT number, trigger, start_time, end_time, records_read, records_written, outcome, error \
         FROM pipeline_runs WHERE pipeline_id = $1 AND incarnation = $2 \
           AND ($3::bigint IS NULL OR number < $3) ORDER BY number DESC LIMIT $4",
    )
    .bind(id)
    .bind(incarnation)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(RunRow {
                number: r.try_get(0)?,
                trigger: r.try_get(1)?,
                start_time: r.try_get(2)?,
                end_time: r.try_get(3)?,
                records_read: r.try_get(4)?,
                records_written: r.try_get(5)?,
                outcome: r.try_get(6)?,
                error: r.try_get(7)?,
            })
        })
        .collect()
}

/// Which pipelines a watch sees: the caller's tenant (None: all) and, if given, only
/// these internal keys.
#[derive(Debug, Clone, Default)]
pub struct WatchScope {
    pub tenant: Option<String>,
    pub keys: Option<Vec<String>>,
}

/// A change a watcher delivers, with the transaction id (xid8) that made it.
#[derive(Debug)]
pub enum WatchChange {
    Changed(Box<PipelineRecord>),
    Removed { tenant: String, name: String },
}

/// The pipelines in scope as one consistent snapshot, and its horizon: every change
/// not in the snapshot comes from a transaction at or after the horizon.
pub async fn watch_snapshot(
    pool: &PgPool,
    scope: &WatchScope,
) -> Result<(Vec<PipelineRecord>, u64), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    // The first statement takes the transaction's snapshot; its xmin is the horizon.
    let horizon: String =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
            .fetch_one(&mut *tx)
            .await?;
    let sql = format!(
        "SELECT {PIPELINE_COLUMNS} FROM pipelines \
         WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text[] IS NULL OR id = ANY($2)) \
         ORDER BY tenant, name"
    );
    let rows = sqlx::query(&sql)
        .bind(scope.tenant.as_deref())
        .bind(scope.keys.as_deref())
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    let records = rows.iter().map(record_from_row).collect::<Result<_, _>>()?;
    Ok((records, parse_xid(&horizon)?))
}

/// Changes made by transactions in [from, horizon), oldest transaction first, and the
/// horizon: the oldest transaction still running, before which nothing can change any
/// more. Rows that changed again later appear once, as they are now.
pub async fn watch_changes(
    pool: &PgPool,
    scope: &WatchScope,
    from: u64,
) -> Result<(Vec<(u64, WatchChange)>, u64), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let horizon: String =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
            .fetch_one(&mut *tx)
            .await?;
    let horizon = parse_xid(&horizon)?;
    let mut changes = Vec::new();
    if horizon > from {
        let sql = format!(
            "SELECT {PIPELINE_COLUMNS}, write_xid::text AS xid FROM pipelines \
             WHERE write_xid >= $3::text::xid8 AND write_xid < $4::text::xid8 \
               AND ($1::text IS NULL OR tenant = $1) AND ($2::text[] IS NULL OR id = ANY($2))"
        );
        for row in sqlx::query(&sql)
            .bind(scope.tenant.as_deref())
            .bind(scope.keys.as_deref())
            .bind(from.to_string())
            .bind(horizon.to_string())
            .fetch_all(&mut *tx)
            .await?
        {
            let xid: String = row.try_get("xid")?;
            changes.push((
                parse_xid(&xid)?,
                WatchChange::Changed(Box::new(record_from_row(&row)?)),
            ));
        }
        let removed = sqlx::query(
            "SELECT tenant, name, write_xid::text AS xid FROM pipeline_tombstones \
             WHERE write_xid >= $3::text::xid8 AND write_xid < $4::text::xid8 \
               AND ($1::text IS NULL OR tenant = $1) AND ($2::text[] IS NULL OR id = ANY($2))",
        )
        .bind(scope.tenant.as_deref())
        .bind(scope.keys.as_deref())
        .bind(from.to_string())
        .bind(horizon.to_string())
        .fetch_all(&mut *tx)
        .await?;
        for row in removed {
            let xid: String = row.try_get("xid")?;
            changes.push((
                parse_xid(&xid)?,
                WatchChange::Removed {
                    tenant: row.try_get("tenant")?,
                    name: row.try_get("name")?,
                },
            ));
        }
    }
    tx.commit().await?;
    // A row removed and created again in one poll: the removal comes first when its
    // transaction is older.
    changes.sort_by_key(|(xid, _)| *xid);
    Ok((changes, horizon.max(from)))
}

/// Tombstones older than `keep` are no longer needed by any resumable watch.
pub async fn delete_old_tombstones(
    pool: &PgPool,
    keep: std::time::Duration,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM pipeline_tombstones WHERE time < clock_timestamp() - make_interval(secs => $1)",
    )
    .bind(keep.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

fn parse_xid(text: &str) -> Result<u64, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt(format!("transaction id {text:?} is not a number")))
}

/// Every pipeline's key and stored signals-topic partition.
pub async fn pipeline_partitions(pool: &PgPool) -> Result<Vec<(String, i32)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT id, partition FROM pipelines ORDER BY id")
            .fetch_all(pool)
            .await?,
    )
}

/// Moves a pipeline to another signals-topic partition, with a signal on the new one
/// (its consumer claims the pipeline; the owner on the old partition lets it go). False
/// if the pipeline is gone or no longer on `from`.
pub async fn move_partition(
    pool: &PgPool,
    key: &str,
    from: i32,
    to: i32,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let sql = format!(
        "UPDATE pipelines SET partition = $3 WHERE id = $1 AND partition = $2 \
         RETURNING {PIPELINE_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(key)
        .bind(from)
        .bind(to)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    let record = record_from_row(&row)?;
    insert_signal(&mut tx, &record).await?;
    tx.commit().await?;
    Ok(true)
}
