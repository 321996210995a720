//! The control plane's queries. Every change of desired state happens in one
//! transaction together with its outbox row, so a change and its signal are never
//! separated (no dual write).

use sluice_infra::store::{get_pipeline, record_from_row, StoreError, PIPELINE_COLUMNS};
use sluice_protocol::conversions::PipelineRecord;
use sluice_protocol::signal::Signal;
use sluice_protocol::spec::PipelineSpec;
use sluice_protocol::status::DesiredStatus;
use sqlx::{PgPool, Postgres, Row, Transaction};

pub struct NewPipeline<'a> {
    pub id: &'a str,
    pub spec: &'a PipelineSpec,
    pub desired_status: DesiredStatus,
    pub partition: i32,
}

/// Inserts a pipeline and its first signal; None if the id is taken.
pub async fn insert_pipeline(
    tx: &mut Transaction<'_, Postgres>,
    new: &NewPipeline<'_>,
) -> Result<Option<PipelineRecord>, StoreError> {
    let sql = format!(
        "INSERT INTO pipelines (id, spec, desired_status, partition) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (id) DO NOTHING RETURNING {PIPELINE_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(new.id)
        .bind(new.spec.to_json())
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

/// Registers `request_id` inside the request's transaction. A concurrent duplicate
/// waits on the unique key until the first commits, then sees its response.
pub async fn claim_request(
    tx: &mut Transaction<'_, Postgres>,
    request_id: uuid::Uuid,
    method: &str,
    target: &str,
) -> Result<RequestClaim, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO request_log (request_id, method, target) VALUES ($1, $2, $3) \
         ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(request_id)
    .bind(method)
    .bind(target)
    .execute(&mut **tx)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(RequestClaim::New);
    }
    let row = sqlx::query("SELECT method, target, response FROM request_log WHERE request_id = $1")
        .bind(request_id)
        .fetch_one(&mut **tx)
        .await?;
    let (m, t, response): (String, String, Option<Vec<u8>>) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    match response {
        Some(bytes) if m == method && t == target => Ok(RequestClaim::Replay(bytes)),
        _ => Ok(RequestClaim::Mismatch),
    }
}

pub async fn save_response(
    tx: &mut Transaction<'_, Postgres>,
    request_id: uuid::Uuid,
    response: Vec<u8>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE request_log SET response = $2 WHERE request_id = $1")
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

/// Locks a pipeline row for a read-modify-write.
pub async fn lock_pipeline(
    tx: &mut Transaction<'_, Postgres>,
    id: &str,
) -> Result<Option<PipelineRecord>, StoreError> {
    let sql = format!("SELECT {PIPELINE_COLUMNS} FROM pipelines WHERE id = $1 FOR UPDATE");
    let row = sqlx::query(&sql).bind(id).fetch_optional(&mut **tx).await?;
    row.as_ref().map(record_from_row).transpose()
}

/// Writes a new desired state, bumps the generation and queues the signal.
pub async fn write_desired(
    tx: &mut Transaction<'_, Postgres>,
    id: &str,
    desired: DesiredStatus,
    spec: &PipelineSpec,
) -> Result<PipelineRecord, StoreError> {
    let sql = format!(
        "UPDATE pipelines SET desired_status = $2, spec = $3, generation = generation + 1, \
         update_time = now() WHERE id = $1 RETURNING {PIPELINE_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(desired.as_str())
        .bind(spec.to_json())
        .fetch_one(&mut **tx)
        .await?;
    let record = record_from_row(&row)?;
    insert_signal(tx, &record).await?;
    Ok(record)
}

async fn insert_signal(
    tx: &mut Transaction<'_, Postgres>,
    record: &PipelineRecord,
) -> Result<(), StoreError> {
    let signal = Signal {
        pipeline_id: record.id.clone(),
        generation: record.generation,
    };
    sqlx::query("INSERT INTO signal_outbox (pipeline_id, partition, payload) VALUES ($1, $2, $3)")
        .bind(&record.id)
        .bind(record.partition)
        .bind(signal.to_bytes())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn fetch_pipeline(pool: &PgPool, id: &str) -> Result<Option<PipelineRecord>, StoreError> {
    get_pipeline(pool, id).await
}

/// One page of pipelines ordered by id, starting after `after`.
pub async fn list_pipelines(
    pool: &PgPool,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<PipelineRecord>, StoreError> {
    let sql = format!(
        "SELECT {PIPELINE_COLUMNS} FROM pipelines WHERE ($1::text IS NULL OR id > $1) \
         ORDER BY id LIMIT $2"
    );
    let rows = sqlx::query(&sql)
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(record_from_row).collect()
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
