//! The worker's queries. Every write is conditional on the owner epoch of the claim the
//! workflow holds, so a stale ("zombie") worker cannot overwrite its successor: zero
//! rows affected means [`ActivityError::Fenced`]. Epochs come from one sequence, so a
//! matching epoch also means the same incarnation of the pipeline.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_connectors::Position;
use sluice_protocol::catalog::StreamSchema;
use sluice_protocol::conversions::PendingActivity;
use sluice_protocol::status::{can_transition, PipelineStatus};
use sqlx::{PgPool, Row};

use crate::activity::ActivityError;
use crate::claim::Claim;

/// Marks a checkpoint written before fingerprints: its setup is taken as current.
pub const LEGACY_FINGERPRINT: &str = "legacy";

/// Source progress and setup bookkeeping, stored in `pipelines.checkpoint`. It never
/// holds the spec itself (which has opened secrets in the worker), only a fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Fingerprint of the redacted spec that setup last ran for; another fingerprint
    /// means the spec changed and setup runs again.
    #[serde(default)]
    pub spec_fingerprint: Option<String>,
    /// Counts the changed specs this incarnation has set up. Records carry it, and the
    /// write lane drops records of an older spec version.
    #[serde(default)]
    pub spec_version: i64,
    /// The records topic setup created (None: pipelines set up before topics were
    /// named per incarnation, which keep the legacy name).
    #[serde(default)]
    pub records_topic: Option<String>,
    /// The streams read, as setup discovered them (the destination was set up for
    /// them).
    #[serde(default)]
    pub catalog: Vec<StreamSchema>,
    /// Each stream's progress.
    #[serde(default)]
    pub streams: BTreeMap<String, StreamProgress>,
    /// Every stream's backfill produced everything.
    #[serde(default)]
    pub backfill_done: bool,
    /// Records-topic offset just past the last backfilled record; the backfill counts
    /// as complete at the destination once the write lane has committed up to it.
    #[serde(default)]
    pub backfill_end_offset: i64,
    /// Records-topic offset where the current spec's records begin: the write lane
    /// starts there (records of an earlier spec below it are not read at all).
    #[serde(default)]
    pub records_start_offset: i64,
    /// The next offset of the inputs topic the live lane applies.
    #[serde(default)]
    pub live_after: i64,
    /// How many sync requests (TriggerSync) have been served.
    #[serde(default)]
    pub syncs_served: i64,
    /// When the last sync run started (ms since the epoch): the schedule counts from it.
    #[serde(default)]
    pub last_sync_ms: Option<i64>,
    /// The run in progress, if any.
    #[serde(default)]
    pub run: Option<RunState>,
    /// The trigger of the next run, set by what makes one necessary ("reset",
    /// "spec-change", "retry" after ERROR); None: the first backfill is "initial".
    #[serde(default)]
    pub next_trigger: Option<String>,
    /// The generator's cursor in checkpoints written before streams had their own
    /// progress (the next record id); read once, then kept in `streams`.
    #[serde(default, skip_serializing)]
    pub cursor: u64,
}

/// A run in progress: which one, and (once its reading ended) the records-topic offset
/// the destination must reach for it to have succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    pub number: i64,
    pub trigger: String,
    #[serde(default)]
    pub end_offset: Option<i64>,
}

/// Where one stream's reads are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamProgress {
    /// The position the backfill resumes after (None: from the start).
    #[serde(default)]
    pub backfill_after: Option<Position>,
    #[serde(default)]
    pub backfill_done: bool,
    /// The position the next sync resumes after (None: the stream has no sync).
    #[serde(default)]
    pub sync_after: Option<Position>,
    /// Whether the sync start was taken (before the backfill began).
    #[serde(default)]
    pub sync_started: bool,
    /// How often the stream was reset: positions carry it first, so a stream read
    /// again after a reset is never taken for a replay of its earlier reads.
    #[serde(default)]
    pub resets: u32,
}

impl Checkpoint {
    /// Whether setup has run for the spec with `fingerprint`.
    pub fn is_set_up_for(&self, fingerprint: &str) -> bool {
        matches!(self.spec_fingerprint.as_deref(), Some(f) if f == fingerprint || f == LEGACY_FINGERPRINT)
    }

    /// The progress of `stream`, taking a legacy generator cursor over.
    pub fn progress(&self, stream: &str) -> StreamProgress {
        match self.streams.get(stream) {
            Some(p) => p.clone(),
            None if self.cursor > 0 => StreamProgress {
                backfill_after: Some(Position::int(
                    i64::try_from(self.cursor).unwrap_or(i64::MAX) - 1,
                )),
                backfill_done: self.backfill_done,
                ..StreamProgress::default()
            },
            None => StreamProgress::default(),
        }
    }
}

/// Takes ownership: draws a new epoch and returns the claim, or None if the row is gone.
pub async fn claim(
    pool: &PgPool,
    key: &str,
    partition: i32,
    worker_id: &str,
) -> Result<Option<Claim>, ActivityError> {
    // Only while the pipeline is on the partition this worker was assigned: a signal
    // that was sent before the pipeline moved to another partition must not take it
    // back from the new partition's owner.
    // The claim and its row in the ownership history are one statement.
    let row = sqlx::query(
        "WITH claimed AS (UPDATE pipelines SET owner = $2, \
             owner_epoch = nextval('pipeline_owner_epoch_seq'), \
             pending_activity = NULL, unassigned_reason = NULL, update_time = now() \
           WHERE id = $1 AND partition = $3 RETURNING id, owner_epoch, incarnation), \
         logged AS (INSERT INTO pipeline_ownership (epoch, pipeline_id, incarnation, worker) \
           SELECT owner_epoch, id, incarnation, $2 FROM claimed) \
         SELECT owner_epoch, incarnation FROM claimed",
    )
    .bind(key)
    .bind(worker_id)
    .bind(partition)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| Claim {
        key: key.to_owned(),
        epoch: r.get(0),
        incarnation: r.get(1),
    }))
}

/// Records why this worker, assigned the pipeline's partition, does not take it: the
/// pipeline shows UNASSIGNED with the reason until a worker claims it. A pipeline that
/// moved to another partition meanwhile is left alone.
pub async fn decline(
    pool: &PgPool,
    key: &str,
    partition: i32,
    reason: &str,
) -> Result<(), ActivityError> {
    sqlx::query(
        "UPDATE pipelines SET owner = NULL, unassigned_reason = $3 \
         WHERE id = $1 AND partition = $2 \
         AND unassigned_reason IS DISTINCT FROM $3",
    )
    .bind(key)
    .bind(partition)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Gives ownership up so the phase shows UNASSIGNED until another worker claims it.
/// The claim's ownership-history row ends in the same statement, so it ends before any
/// next owner's row can begin ("fenced" if a newer claim holds the pipeline already).
pub async fn release(pool: &PgPool, claim: &Claim) -> Result<(), ActivityError> {
    sqlx::query(
        "WITH released AS (UPDATE pipelines SET owner = NULL, update_time = now() \
             WHERE id = $1 AND owner_epoch = $2 RETURNING id) \
         UPDATE pipeline_ownership SET ended_at = clock_timestamp(), \
             end_reason = CASE WHEN EXISTS (SELECT 1 FROM released) \
                               THEN 'released' ELSE 'fenced' END \
         WHERE epoch = $2 AND ended_at IS NULL",
    )
    .bind(&claim.key)
    .bind(claim.epoch)
    .execute(pool)
    .await?;
    Ok(())
}

/// Ends the claim's ownership-history row (if release has not): the workflow stopped,
/// its lanes halted, for `reason` ("fenced", "removed", "moved", "stopped").
pub async fn end_ownership(
    pool: &PgPool,
    claim: &Claim,
    reason: &str,
) -> Result<(), ActivityError> {
    sqlx::query(
        "UPDATE pipeline_ownership SET ended_at = clock_timestamp(), end_reason = $2 \
         WHERE epoch = $1 AND ended_at IS NULL",
    )
    .bind(claim.epoch)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// The checkpoint of the claimed pipeline; Fenced once another claim holds the row.
pub async fn load_checkpoint(pool: &PgPool, claim: &Claim) -> Result<Checkpoint, ActivityError> {
    let value: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT checkpoint FROM pipelines WHERE id = $1 AND owner_epoch = $2")
            .bind(&claim.key)
            .bind(claim.epoch)
            .fetch_optional(pool)
            .await?;
    let Some(value) = value else {
        return Err(ActivityError::Fenced);
    };
    serde_json::from_value(value).map_err(|e| ActivityError::Failed {
        failure_type: sluice_protocol::message::FailureType::SystemError,
        message: format!("stored checkpoint is corrupt: {e}"),
    })
}

pub async fn save_checkpoint(
    pool: &PgPool,
    claim: &Claim,
    checkpoint: &Checkpoint,
) -> Result<(), ActivityError> {
    let value = serde_json::to_value(checkpoint).expect("a checkpoint is plain JSON");
    let done =
        sqlx::query("UPDATE pipelines SET checkpoint = $3 WHERE id = $1 AND owner_epoch = $2")
            .bind(&claim.key)
            .bind(claim.epoch)
            .bind(value)
            .execute(pool)
            .await?;
    if done.rows_affected() == 0 {
        return Err(ActivityError::Fenced);
    }
    Ok(())
}

/// Merges `patch` (top-level keys of the checkpoint) into the stored checkpoint,
/// leaving the other keys as they are: lanes that run side by side each write their
/// own part. Fenced like every write.
pub async fn merge_checkpoint(
    pool: &PgPool,
    claim: &Claim,
    patch: serde_json::Value,
) -> Result<(), ActivityError> {
    let done = sqlx::query(
        "UPDATE pipelines SET checkpoint = checkpoint || $3::jsonb WHERE id = $1 AND owner_epoch = $2",
    )
    .bind(&claim.key)
    .bind(claim.epoch)
    .bind(patch)
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(ActivityError::Fenced);
    }
    Ok(())
}

/// Saves one stream's progress without touching the others'.
pub async fn save_stream_progress(
    pool: &PgPool,
    claim: &Claim,
    stream: &str,
    progress: &StreamProgress,
    patch: serde_json::Value,
) -> Result<(), ActivityError> {
    let value = serde_json::to_value(progress).expect("progress is plain JSON");
    let done = sqlx::query(
        "UPDATE pipelines SET checkpoint = jsonb_set(checkpoint || $5::jsonb,            ARRAY['streams', $3], $4::jsonb, true)          WHERE id = $1 AND owner_epoch = $2",
    )
    .bind(&claim.key)
    .bind(claim.epoch)
    .bind(stream)
    .bind(value)
    .bind(patch)
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(ActivityError::Fenced);
    }
    Ok(())
}

/// Starts run number max + 1 of the claim's incarnation.
pub async fn start_run(pool: &PgPool, claim: &Claim, trigger: &str) -> Result<i64, ActivityError> {
    let number: Option<i64> = sqlx::query_scalar(
        "INSERT INTO pipeline_runs (pipeline_id, incarnation, number, trigger)          SELECT $1, $2, COALESCE((SELECT max(number) FROM pipeline_runs                                   WHERE pipeline_id = $1 AND incarnation = $2), 0) + 1, $4          WHERE EXISTS (SELECT 1 FROM pipelines WHERE id = $1 AND owner_epoch = $3)          RETURNING number",
    )
    .bind(&claim.key)
    .bind(claim.incarnation)
    .bind(claim.epoch)
    .bind(trigger)
    .fetch_optional(pool)
    .await?;
    number.ok_or(ActivityError::Fenced)
}

/// Adds to a run's counts (best effort: a metric, not bookkeeping).
pub async fn count_run(
    pool: &PgPool,
    claim: &Claim,
    number: i64,
    read: i64,
    written: i64,
) -> Result<(), ActivityError> {
    sqlx::query(
        "UPDATE pipeline_runs SET records_read = records_read + $4,            records_written = records_written + $5          WHERE pipeline_id = $1 AND incarnation = $2 AND number = $3",
    )
    .bind(&claim.key)
    .bind(claim.incarnation)
    .bind(number)
    .bind(read)
    .bind(written)
    .execute(pool)
    .await?;
    Ok(())
}

/// Ends a run (succeeded, failed or cancelled) unless it ended already.
pub async fn end_run(
    pool: &PgPool,
    claim: &Claim,
    number: i64,
    outcome: &str,
    error: Option<&str>,
) -> Result<(), ActivityError> {
    let ended: Vec<(String, f64)> = sqlx::query_as(
        "UPDATE pipeline_runs SET outcome = $4, error = $5, end_time = clock_timestamp() \
         WHERE pipeline_id = $1 AND incarnation = $2 AND number = $3 AND outcome = 'running' \
         RETURNING trigger, extract(epoch FROM end_time - start_time)::float8",
    )
    .bind(&claim.key)
    .bind(claim.incarnation)
    .bind(number)
    .bind(outcome)
    .bind(error)
    .fetch_all(pool)
    .await?;
    for (trigger, seconds) in ended {
        crate::metrics::WORKER.run_ended(&trigger, outcome, seconds);
    }
    Ok(())
}

/// Fails every running run of the claim's incarnation (the pipeline went to ERROR).
pub async fn fail_running_runs(
    pool: &PgPool,
    claim: &Claim,
    error: &str,
) -> Result<(), ActivityError> {
    let failed: Vec<(String, f64)> = sqlx::query_as(
        "UPDATE pipeline_runs SET outcome = 'failed', error = $3, end_time = clock_timestamp() \
         WHERE pipeline_id = $1 AND incarnation = $2 AND outcome = 'running' \
         RETURNING trigger, extract(epoch FROM end_time - start_time)::float8",
    )
    .bind(&claim.key)
    .bind(claim.incarnation)
    .bind(error)
    .fetch_all(pool)
    .await?;
    for (trigger, seconds) in &failed {
        crate::metrics::WORKER.run_ended(trigger, "failed", *seconds);
    }
    if !failed.is_empty() {
        merge_checkpoint(
            pool,
            claim,
            serde_json::json!({ "run": null, "next_trigger": "retry" }),
        )
        .await?;
    }
    Ok(())
}

/// Clears the reset request the worker has applied (fenced).
pub async fn clear_reset(pool: &PgPool, claim: &Claim) -> Result<(), ActivityError> {
    let done =
        sqlx::query("UPDATE pipelines SET reset_request = NULL WHERE id = $1 AND owner_epoch = $2")
            .bind(&claim.key)
            .bind(claim.epoch)
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
/// only updates observed_generation / last_error and records no event. ERROR replaces
/// the pending activity: last_error says what failed.
pub async fn write_status(
    pool: &PgPool,
    claim: &Claim,
    actor: &str,
    write: &StatusWrite<'_>,
) -> Result<(), ActivityError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT status, observed_generation, generation FROM pipelines \
         WHERE id = $1 AND owner_epoch = $2 FOR UPDATE",
    )
    .bind(&claim.key)
    .bind(claim.epoch)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(ActivityError::Fenced);
    };
    let from: Option<String> = row.try_get(0)?;
    let observed_before: i64 = row.try_get(1)?;
    let generation: i64 = row.try_get(2)?;
    let from_status: Option<PipelineStatus> = from.as_deref().and_then(|s| s.parse().ok());
    let changes_status = from_status != Some(write.to);
    if changes_status && !can_transition(from_status, write.to) {
        return Err(ActivityError::Invariant(format!(
            "illegal status transition {from:?} -> {}",
            write.to
        )));
    }
    // Seconds since the current generation was made, on the database's clock.
    let since_change: f64 = sqlx::query_scalar(
        "UPDATE pipelines SET status = $3, observed_generation = GREATEST(observed_generation, $4), \
         last_error = $5, \
         pending_activity = CASE WHEN $3 = 'ERROR' THEN NULL ELSE pending_activity END, \
         update_time = now() WHERE id = $1 AND owner_epoch = $2 \
         RETURNING extract(epoch FROM clock_timestamp() - generation_time)::float8",
    )
    .bind(&claim.key)
    .bind(claim.epoch)
    .bind(write.to.as_str())
    .bind(write.observed_generation)
    .bind(write.last_error)
    .fetch_one(&mut *tx)
    .await?;
    if changes_status {
        sqlx::query(
            "INSERT INTO pipeline_events (pipeline_id, actor, from_status, to_status, generation, reason) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&claim.key)
        .bind(actor)
        .bind(from)
        .bind(write.to.as_str())
        .bind(write.observed_generation)
        .bind(write.reason)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    // The first status persisted for the current generation: the change is applied.
    if observed_before < generation && write.observed_generation >= generation {
        crate::metrics::WORKER.change_applied(write.to.as_str(), since_change);
    }
    Ok(())
}

/// The finalizer step of a deletion: removes the row once teardown has finished and
/// records the removal in the history.
pub async fn remove_pipeline(
    pool: &PgPool,
    claim: &Claim,
    actor: &str,
    generation: i64,
    reason: &str,
) -> Result<(), ActivityError> {
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query(
        "DELETE FROM pipelines WHERE id = $1 AND owner_epoch = $2 AND desired_status = 'DELETED' \
         AND status = 'TEARDOWN'",
    )
    .bind(&claim.key)
    .bind(claim.epoch)
    .execute(&mut *tx)
    .await?;
    if deleted.rows_affected() == 0 {
        return Err(ActivityError::Fenced);
    }
    sqlx::query(
        "INSERT INTO pipeline_events (pipeline_id, actor, from_status, to_status, generation, reason) \
         VALUES ($1, $2, 'TEARDOWN', 'REMOVED', $3, $4)",
    )
    .bind(&claim.key)
    .bind(actor)
    .bind(generation)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Whether the claim still owns the pipeline.
pub async fn check_epoch(pool: &PgPool, claim: &Claim) -> Result<(), ActivityError> {
    let owned: Option<i64> = sqlx::query_scalar("SELECT owner_epoch FROM pipelines WHERE id = $1")
        .bind(&claim.key)
        .fetch_optional(pool)
        .await?;
    match owned {
        Some(e) if e == claim.epoch => Ok(()),
        _ => Err(ActivityError::Fenced),
    }
}

/// Records the activity the claim is retrying.
pub async fn report_pending(
    pool: &PgPool,
    claim: &Claim,
    pending: &PendingActivity,
) -> Result<(), ActivityError> {
    let value = serde_json::to_value(pending).expect("a pending activity is plain JSON");
    sqlx::query("UPDATE pipelines SET pending_activity = $3 WHERE id = $1 AND owner_epoch = $2")
        .bind(&claim.key)
        .bind(claim.epoch)
        .bind(value)
        .execute(pool)
        .await?;
    Ok(())
}

/// Clears the pending activity once activity `name` has succeeded.
pub async fn clear_pending(pool: &PgPool, claim: &Claim, name: &str) -> Result<(), ActivityError> {
    sqlx::query(
        "UPDATE pipelines SET pending_activity = NULL \
         WHERE id = $1 AND owner_epoch = $2 AND pending_activity->>'name' = $3",
    )
    .bind(&claim.key)
    .bind(claim.epoch)
    .bind(name)
    .execute(pool)
    .await?;
    Ok(())
}

/// Ids of the pipelines stored on the given signals-topic partitions.
/// What the supervisor's periodic resync compares with what each workflow last read of
/// its row: a difference (or a row gone) means a change the workflow has not seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowVersion {
    pub incarnation: i64,
    pub generation: i64,
    pub owner_epoch: i64,
    pub partition: i32,
    pub inputs_open: bool,
}

impl RowVersion {
    pub fn of(row: &sluice_protocol::conversions::PipelineRecord) -> Self {
        Self {
            incarnation: row.incarnation,
            generation: row.generation,
            owner_epoch: row.owner_epoch,
            partition: row.partition,
            inputs_open: row.inputs_open,
        }
    }
}

/// The pipelines on `partitions`, with their row versions.
pub async fn pipelines_on_partitions(
    pool: &PgPool,
    partitions: &[i32],
) -> Result<Vec<(String, RowVersion)>, ActivityError> {
    let rows = sqlx::query(
        "SELECT id, incarnation, generation, owner_epoch, partition, \
                COALESCE(inputs_incarnation = incarnation, false) AS inputs_open \
         FROM pipelines WHERE partition = ANY($1) ORDER BY id",
    )
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("id")?,
                RowVersion {
                    incarnation: r.try_get("incarnation")?,
                    generation: r.try_get("generation")?,
                    owner_epoch: r.try_get("owner_epoch")?,
                    partition: r.try_get("partition")?,
                    inputs_open: r.try_get("inputs_open")?,
                },
            ))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}
