//! The worker's queries. Every write is conditional on the owner epoch the workflow
//! holds, so a stale ("zombie") worker cannot overwrite its successor: zero rows
//! affected means [`ActivityError::Fenced`].

use serde::{Deserialize, Serialize};
use sluice_protocol::status::{can_transition, PipelineStatus};
use sqlx::{PgPool, Row};

use crate::activity::ActivityError;

/// Source progress and setup bookkeeping, stored in `pipelines.checkpoint`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The spec (as JSON) setup last ran for; a different spec re-runs setup.
    #[serde(default)]
    pub setup_spec: Option<serde_json::Value>,
    /// Next source position to read (for the generator: the next record id).
    #[serde(default)]
    pub cursor: u64,
    #[serde(default)]
    pub backfill_done: bool,
    /// Records-topic offset just past the last backfilled record; the backfill counts
    /// as complete at the destination once the write lane has committed up to it.
    #[serde(default)]
    pub backfill_end_offset: i64,
    /// Records-topic offset where the current spec's records begin: records of an
    /// earlier spec below it are never written to the destination.
    #[serde(default)]
    pub records_start_offset: i64,
}

/// Takes ownership: bumps the epoch and returns it, or None if the row is gone.
pub async fn claim(pool: &PgPool, id: &str, worker_id: &str) -> Result<Option<i64>, ActivityError> {
    let row = sqlx::query(
        "UPDATE pipelines SET owner = $2, owner_epoch = owner_epoch + 1, update_time = now() \
         WHERE id = $1 RETURNING owner_epoch",
    )
    .bind(id)
    .bind(worker_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| r.get::<i64, _>(0)))
}

/// Gives ownership up so the phase shows UNASSIGNED until another worker claims it.
pub async fn release(pool: &PgPool, id: &str, epoch: i64) -> Result<(), ActivityError> {
    sqlx::query(
        "UPDATE pipelines SET owner = NULL, update_time = now() WHERE id = $1 AND owner_epoch = $2",
    )
    .bind(id)
    .bind(epoch)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn load_checkpoint(pool: &PgPool, id: &str) -> Result<Checkpoint, ActivityError> {
    let row = sqlx::query("SELECT checkpoint FROM pipelines WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else {
        return Ok(Checkpoint::default());
    };
    let value: serde_json::Value = row.try_get(0)?;
    serde_json::from_value(value).map_err(|e| ActivityError::Failed {
        failure_type: sluice_protocol::message::FailureType::SystemError,
        message: format!("stored checkpoint is corrupt: {e}"),
    })
}

pub async fn save_checkpoint(
    pool: &PgPool,
    id: &str,
    epoch: i64,
    checkpoint: &Checkpoint,
) -> Result<(), ActivityError> {
    let value = serde_json::to_value(checkpoint).expect("a checkpoint is plain JSON");
    let done =
        sqlx::query("UPDATE pipelines SET checkpoint = $3 WHERE id = $1 AND owner_epoch = $2")
            .bind(id)
            .bind(epoch)
            .bind(value)
            .execute(pool)
            .await?;
    if done.rows_affected() == 0 {
        return Err(ActivityError::Fenced);
    }
    Ok(())
}

/// What a status write should record.
#[derive(Debug, Clone)]
pub struct StatusWrite<'a> {
    pub to: PipelineStatus,
    pub observed_generation: i64,
    pub last_error: Option<&'a str>,
    pub reason: &'a str,
}

/// The update-status activity: writes the status (checked against the transition
/// rules), observed_generation and last_error, and appends the transition to the event
/// history — all in one transaction, fenced by the epoch. Re-writing the current status
/// only updates observed_generation / last_error and records no event.
pub async fn write_status(
    pool: &PgPool,
    id: &str,
    epoch: i64,
    actor: &str,
    write: &StatusWrite<'_>,
) -> Result<(), ActivityError> {
    let mut tx = pool.begin().await?;
    let row =
        sqlx::query("SELECT status FROM pipelines WHERE id = $1 AND owner_epoch = $2 FOR UPDATE")
            .bind(id)
            .bind(epoch)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(row) = row else {
        return Err(ActivityError::Fenced);
    };
    let from: Option<String> = row.try_get(0)?;
    let from_status: Option<PipelineStatus> = from.as_deref().and_then(|s| s.parse().ok());
    let changes_status = from_status != Some(write.to);
    if changes_status && !can_transition(from_status, write.to) {
        return Err(ActivityError::Invariant(format!(
            "illegal status transition {from:?} -> {}",
            write.to
        )));
    }
    sqlx::query(
        "UPDATE pipelines SET status = $3, observed_generation = GREATEST(observed_generation, $4), \
         last_error = $5, update_time = now() WHERE id = $1 AND owner_epoch = $2",
    )
    .bind(id)
    .bind(epoch)
    .bind(write.to.as_str())
    .bind(write.observed_generation)
    .bind(write.last_error)
    .execute(&mut *tx)
    .await?;
    if changes_status {
        sqlx::query(
            "INSERT INTO pipeline_events (pipeline_id, actor, from_status, to_status, generation, reason) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(actor)
        .bind(from)
        .bind(write.to.as_str())
        .bind(write.observed_generation)
        .bind(write.reason)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The finalizer step of a deletion: removes the row once teardown has finished and
/// records the removal in the history.
pub async fn remove_pipeline(
    pool: &PgPool,
    id: &str,
    epoch: i64,
    actor: &str,
    generation: i64,
    reason: &str,
) -> Result<(), ActivityError> {
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query(
        "DELETE FROM pipelines WHERE id = $1 AND owner_epoch = $2 AND desired_status = 'DELETED' \
         AND status = 'TEARDOWN'",
    )
    .bind(id)
    .bind(epoch)
    .execute(&mut *tx)
    .await?;
    if deleted.rows_affected() == 0 {
        return Err(ActivityError::Fenced);
    }
    sqlx::query(
        "INSERT INTO pipeline_events (pipeline_id, actor, from_status, to_status, generation, reason) \
         VALUES ($1, $2, 'TEARDOWN', 'REMOVED', $3, $4)",
    )
    .bind(id)
    .bind(actor)
    .bind(generation)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Whether `epoch` still owns the pipeline.
pub async fn check_epoch(pool: &PgPool, id: &str, epoch: i64) -> Result<(), ActivityError> {
    let owned: Option<i64> = sqlx::query_scalar("SELECT owner_epoch FROM pipelines WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    match owned {
        Some(e) if e == epoch => Ok(()),
        _ => Err(ActivityError::Fenced),
    }
}

/// Ids of the pipelines stored on the given signals-topic partitions.
pub async fn pipelines_on_partitions(
    pool: &PgPool,
    partitions: &[i32],
) -> Result<Vec<(String, i32)>, ActivityError> {
    let rows =
        sqlx::query("SELECT id, partition FROM pipelines WHERE partition = ANY($1) ORDER BY id")
            .bind(partitions)
            .fetch_all(pool)
            .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
