//! One durable workflow per owned pipeline. It claims the pipeline (bumping the owner
//! epoch), then loops: re-read the row from Postgres (the source of truth), reconcile
//! desired against actual state, and sleep until a signal, a lane event or the resync
//! timer wakes it. Being level-triggered, a lost signal only delays convergence.

use std::sync::Arc;

use sluice_infra::store::get_pipeline;
use sluice_protocol::conversions::PipelineRecord;
use sluice_protocol::message::FailureType;
use sluice_protocol::spec::{DestinationConfig, ValidatedSpec};
use sluice_protocol::status::{DesiredStatus, PipelineStatus};
use sluice_protocol::topics::records_topic;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::activity::{run_activity, ActivityError};
use crate::connectors::postgres as pg;
use crate::lanes::{LaneEvent, LaneParams, Lanes};
use crate::store::{self, Checkpoint, StatusWrite};
use crate::WorkerContext;

/// What the supervisor keeps for each running workflow.
pub struct WorkflowHandle {
    pub wake: Arc<Notify>,
    pub stop: CancellationToken,
    pub partition: i32,
    pub seq: u64,
    pub task: JoinHandle<()>,
}

/// Spawns the workflow of `pipeline_id`; `exited` receives `(id, seq)` when it ends.
pub fn spawn(
    ctx: Arc<WorkerContext>,
    pipeline_id: String,
    partition: i32,
    seq: u64,
    exited: mpsc::UnboundedSender<(String, u64)>,
) -> WorkflowHandle {
    let wake = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let wake = Arc::clone(&wake);
        let stop = stop.clone();
        async move {
            run(ctx, &pipeline_id, wake, stop).await;
            let _ = exited.send((pipeline_id, seq));
        }
    });
    WorkflowHandle {
        wake,
        stop,
        partition,
        seq,
        task,
    }
}

enum Flow {
    Continue,
    Removed,
}

struct Workflow {
    ctx: Arc<WorkerContext>,
    id: String,
    epoch: i64,
    checkpoint: Checkpoint,
    lanes: Option<Lanes>,
    /// Numbers each start of the lanes, so events of lanes already stopped are ignored.
    lanes_seq: u64,
    lane_events_tx: mpsc::UnboundedSender<(u64, LaneEvent)>,
    lane_failure: Option<ActivityError>,
    /// Cancels the activities of the current reconcile pass: fired when the worker
    /// stops, or when a signal arrives while an activity is retrying.
    pass: CancellationToken,
    /// Creation time of the pipeline row: tells this incarnation's destination
    /// bookkeeping from that of a deleted pipeline that had the same id.
    incarnation: std::time::SystemTime,
    /// Status and observed generation as this workflow last wrote or read them.
    status: Option<PipelineStatus>,
    observed: i64,
}

async fn run(ctx: Arc<WorkerContext>, id: &str, wake: Arc<Notify>, stop: CancellationToken) {
    let claimed = run_activity("claim", id, &ctx.retry, ctx.attempt_timeout, &stop, || {
        store::claim(&ctx.pool, id, &ctx.worker_id)
    })
    .await;
    let epoch = match claimed {
        Ok(Some(epoch)) => epoch,
        Ok(None) | Err(ActivityError::Cancelled) => return,
        Err(e) => {
            tracing::warn!(pipeline_id = id, error = %e, "could not claim pipeline");
            return;
        }
    };
    let checkpoint = match run_activity(
        "load-checkpoint",
        id,
        &ctx.retry,
        ctx.attempt_timeout,
        &stop,
        || store::load_checkpoint(&ctx.pool, id),
    )
    .await
    {
        Ok(c) => c,
        Err(_) => return,
    };
    tracing::info!(pipeline_id = id, epoch, "pipeline claimed");
    let (lane_events_tx, mut lane_events) = mpsc::unbounded_channel();
    let mut wf = Workflow {
        ctx: Arc::clone(&ctx),
        id: id.to_owned(),
        epoch,
        checkpoint,
        lanes: None,
        lanes_seq: 0,
        incarnation: std::time::SystemTime::UNIX_EPOCH,
        lane_events_tx,
        lane_failure: None,
        pass: stop.child_token(),
        status: None,
        observed: 0,
    };

    loop {
        let row = run_activity(
            "load",
            id,
            &ctx.retry,
            ctx.attempt_timeout,
            &stop,
            || async { Ok(get_pipeline(&ctx.pool, id).await?) },
        )
        .await;
        let row = match row {
            Ok(Some(row)) => row,
            Ok(None) => {
                wf.stop_lanes().await;
                return;
            }
            Err(ActivityError::Cancelled) => break,
            Err(e) => {
                tracing::warn!(pipeline_id = id, error = %e, "could not load pipeline");
                break;
            }
        };
        if row.owner_epoch != epoch {
            tracing::info!(
                pipeline_id = id,
                epoch,
                newer = row.owner_epoch,
                "fenced by a newer owner"
            );
            wf.stop_lanes().await;
            return;
        }
        wf.status = row.status;
        wf.observed = row.observed_generation;
        wf.incarnation = row.create_time;
        wf.pass = stop.child_token();
        let pass = wf.pass.clone();
        let mut interrupted = false;
        let outcome = {
            let reconcile = wf.reconcile(&row);
            tokio::pin!(reconcile);
            loop {
                tokio::select! {
                    r = &mut reconcile => break r,
                    // A change made while an activity keeps retrying must not wait for
                    // it: cancel the pass and reconcile again from the fresh row. The
                    // resync branch covers a lost signal the same way.
                    _ = wake.notified(), if !interrupted => {
                        if generation_changed(&ctx, id, row.generation).await {
                            interrupted = true;
                            pass.cancel();
                        }
                    }
                    _ = tokio::time::sleep(ctx.resync_interval), if !interrupted => {
                        if generation_changed(&ctx, id, row.generation).await {
                            interrupted = true;
                            pass.cancel();
                        }
                    }
                }
            }
        };
        match outcome {
            Ok(Flow::Removed) => {
                tracing::info!(pipeline_id = id, "pipeline torn down and removed");
                return;
            }
            Ok(Flow::Continue) => {}
            Err(ActivityError::Cancelled) if stop.is_cancelled() => break,
            Err(ActivityError::Cancelled) => {}
            Err(ActivityError::Fenced) => {
                tracing::info!(pipeline_id = id, epoch, "fenced by a newer owner");
                wf.stop_lanes().await;
                return;
            }
            Err(e) => {
                let message = e.to_string();
                tracing::warn!(pipeline_id = id, error = %message, "pipeline failed");
                wf.stop_lanes().await;
                wf.pass = stop.child_token();
                let write = StatusWrite {
                    to: PipelineStatus::Error,
                    observed_generation: row.generation,
                    last_error: Some(&message),
                    reason: "activity failed",
                };
                if let Err(e) = wf.write_status(&write).await {
                    tracing::warn!(pipeline_id = id, error = %e, "could not record ERROR");
                }
            }
        }
        if interrupted {
            continue;
        }

        let awaiting_destination = wf.status == Some(PipelineStatus::Backfill)
            && wf.checkpoint.backfill_done
            && wf.lanes.is_some();
        let woke = {
            let committed = async {
                match wf.lanes.as_mut() {
                    Some(lanes) if awaiting_destination => {
                        let _ = lanes.committed.changed().await;
                    }
                    _ => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wake.notified() => None,
                _ = tokio::time::sleep(ctx.resync_interval) => None,
                Some(event) = lane_events.recv() => Some(event),
                _ = committed => None,
                _ = stop.cancelled() => break,
            }
        };
        match woke {
            Some((seq, LaneEvent::BackfillDone(cp))) if seq == wf.lanes_seq => wf.checkpoint = cp,
            Some((seq, LaneEvent::Failed(e))) if seq == wf.lanes_seq => wf.lane_failure = Some(e),
            _ => {}
        }
    }

    // Graceful stop (revocation or shutdown): lanes halt at a safe point with their
    // progress committed, then ownership is released for the next worker.
    wf.stop_lanes().await;
    let release_window = CancellationToken::new();
    let released = tokio::time::timeout(ctx.attempt_timeout, async {
        run_activity(
            "release",
            id,
            &ctx.retry,
            ctx.attempt_timeout,
            &release_window,
            || store::release(&ctx.pool, id, epoch),
        )
        .await
    })
    .await;
    if !matches!(released, Ok(Ok(()))) {
        tracing::warn!(
            pipeline_id = id,
            "could not release pipeline; the next owner will fence it"
        );
    }
    tracing::info!(pipeline_id = id, "pipeline released");
}

/// Whether the stored generation moved past `seen` (or the row is gone). Errors count
/// as no change: the caller simply looks again later.
async fn generation_changed(ctx: &WorkerContext, id: &str, seen: i64) -> bool {
    // Bounded: the reconcile pass is not polled while this runs.
    let stored = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        sqlx::query_scalar::<_, i64>("SELECT generation FROM pipelines WHERE id = $1")
            .bind(id)
            .fetch_optional(&ctx.pool),
    )
    .await;
    match stored {
        Ok(Ok(Some(generation))) => generation != seen,
        Ok(Ok(None)) => true,
        _ => false,
    }
}

impl Workflow {
    async fn reconcile(&mut self, row: &PipelineRecord) -> Result<Flow, ActivityError> {
        let generation = row.generation;
        if let Some(failure) = self.lane_failure.take() {
            return Err(failure);
        }
        let spec = row
            .spec
            .validate("spec")
            .map_err(|v| ActivityError::Failed {
                failure_type: FailureType::ConfigError,
                message: format!("stored spec is invalid: {v}"),
            })?;

        if row.desired_status == DesiredStatus::Deleted {
            self.stop_lanes().await;
            self.set_status(PipelineStatus::Teardown, generation, "deletion requested")
                .await?;
            let reason = self.teardown(&spec).await?;
            let (ctx, id, epoch) = (&self.ctx, self.id.as_str(), self.epoch);
            let never = CancellationToken::new();
            run_activity(
                "remove",
                id,
                &ctx.retry,
                ctx.attempt_timeout,
                &never,
                || {
                    store::remove_pipeline(
                        &ctx.pool,
                        id,
                        epoch,
                        &ctx.worker_id,
                        generation,
                        &reason,
                    )
                },
            )
            .await?;
            return Ok(Flow::Removed);
        }
        // A failed pipeline waits for its generation to change (any update) to retry.
        if self.status == Some(PipelineStatus::Error) && self.observed >= generation {
            return Ok(Flow::Continue);
        }
        let spec_json = row.spec.to_json();
        let needs_setup = matches!(
            self.status,
            None | Some(PipelineStatus::Setup) | Some(PipelineStatus::Error)
        ) || self.checkpoint.setup_spec.as_ref() != Some(&spec_json);

        match row.desired_status {
            DesiredStatus::Paused => {
                self.stop_lanes().await;
                if needs_setup {
                    self.setup(&spec, spec_json, generation).await?;
                }
                self.set_status(PipelineStatus::Paused, generation, "paused by request")
                    .await?;
            }
            DesiredStatus::Active => {
                if needs_setup {
                    self.stop_lanes().await;
                    self.setup(&spec, spec_json, generation).await?;
                }
                match self.status {
                    // SETUP only ever moves on to BACKFILL; BACKFILL → READY below
                    // once the destination has everything.
                    Some(PipelineStatus::Setup) => {
                        self.set_status(PipelineStatus::Backfill, generation, "setup finished")
                            .await?;
                    }
                    // Back to whichever it left.
                    Some(PipelineStatus::Paused) => {
                        let to = if self.backfill_complete(&spec).await? {
                            PipelineStatus::Ready
                        } else {
                            PipelineStatus::Backfill
                        };
                        self.set_status(to, generation, "resumed by request")
                            .await?;
                    }
                    _ => {}
                }
                if self.lanes.is_none() {
                    // The lanes resume from the stored checkpoint, which the backfill
                    // lane advanced while it ran.
                    self.checkpoint = self.load_checkpoint().await?;
                    self.lanes_seq += 1;
                    self.lanes = Some(Lanes::start(
                        Arc::clone(&self.ctx),
                        LaneParams {
                            pipeline_id: self.id.clone(),
                            epoch: self.epoch,
                            spec: spec.clone(),
                            checkpoint: self.checkpoint.clone(),
                            incarnation: self.incarnation,
                        },
                        self.lanes_seq,
                        self.lane_events_tx.clone(),
                    ));
                }
                if self.status == Some(PipelineStatus::Backfill)
                    && self.backfill_complete(&spec).await?
                {
                    self.set_status(PipelineStatus::Ready, generation, "backfill complete")
                        .await?;
                } else if let Some(status) = self.status {
                    // Records that this generation has been acted on; never a transition,
                    // so a periodic reconcile of a READY pipeline cannot flap.
                    self.set_status(status, generation, "").await?;
                }
            }
            DesiredStatus::Deleted => unreachable!("handled above"),
        }
        Ok(Flow::Continue)
    }

    /// Backfill is complete once every backfilled record is committed at the
    /// destination, not merely produced.
    async fn backfill_complete(&self, spec: &ValidatedSpec) -> Result<bool, ActivityError> {
        if !self.checkpoint.backfill_done {
            return Ok(false);
        }
        let running = self
            .lanes
            .as_ref()
            .map(|l| *l.committed.borrow())
            .filter(|c| *c >= 0);
        let committed = match running {
            Some(c) => c,
            None => {
                let (ctx, id) = (&self.ctx, self.id.as_str());
                let DestinationConfig::Postgres(destination) = &spec.destination;
                let topic = records_topic(id);
                run_activity(
                    "read-offsets",
                    id,
                    &ctx.retry,
                    ctx.attempt_timeout,
                    &self.pass,
                    || async {
                        let pool = ctx.destinations.get(&destination.url)?;
                        let target = pg::BatchTarget {
                            pipeline_id: id,
                            topic: &topic,
                            partition: crate::lanes::RECORDS_PARTITION,
                            epoch: self.epoch,
                            incarnation: self.incarnation,
                        };
                        pg::committed_offset(&pool, destination, &target).await
                    },
                )
                .await?
                .unwrap_or(0)
            }
        };
        Ok(committed >= self.checkpoint.backfill_end_offset)
    }

    async fn setup(
        &mut self,
        spec: &ValidatedSpec,
        spec_json: serde_json::Value,
        generation: i64,
    ) -> Result<(), ActivityError> {
        self.set_status(PipelineStatus::Setup, generation, "setting up")
            .await?;
        let (ctx, id) = (&self.ctx, self.id.as_str());
        let DestinationConfig::Postgres(destination) = &spec.destination;
        let topic = records_topic(id);
        run_activity(
            "setup",
            id,
            &ctx.retry,
            ctx.attempt_timeout,
            &self.pass,
            || async {
                // Records are kept until the pipeline is deleted: a long pause must not
                // let unwritten records expire.
                ctx.admin
                    .ensure_topic(&topic, 1, ctx.replication_factor, &[("retention.ms", "-1")])
                    .await?;
                let pool = ctx.destinations.get(&destination.url)?;
                pg::setup(
                    &pool,
                    destination,
                    &sluice_protocol::catalog::generator_stream(),
                )
                .await
            },
        )
        .await?;

        // The lanes may have advanced the stored checkpoint since it was last read.
        let mut checkpoint = self.load_checkpoint().await?;
        if checkpoint.setup_spec.is_some() && checkpoint.setup_spec.as_ref() != Some(&spec_json) {
            // A changed spec reads the source again from the start; records the old
            // spec left in the topic are skipped by the write lane.
            let end = run_activity(
                "records-end",
                id,
                &ctx.retry,
                ctx.attempt_timeout,
                &self.pass,
                || async {
                    // Old-spec records still queued in the producer must land below
                    // the start offset, so flush before reading the end.
                    let producer = ctx.producer.clone();
                    tokio::task::spawn_blocking(move || {
                        rdkafka::producer::Producer::flush(
                            &producer,
                            std::time::Duration::from_secs(30),
                        )
                    })
                    .await
                    .expect("flush task does not panic")?;
                    Ok(ctx
                        .admin
                        .end_offset(&topic, crate::lanes::RECORDS_PARTITION)
                        .await?)
                },
            )
            .await?;
            tracing::info!(
                pipeline_id = id,
                records_start_offset = end,
                "spec changed, backfill restarts"
            );
            checkpoint.cursor = 0;
            checkpoint.backfill_done = false;
            checkpoint.records_start_offset = end;
            checkpoint.backfill_end_offset = end;
        }
        checkpoint.setup_spec = Some(spec_json);
        run_activity(
            "checkpoint",
            id,
            &ctx.retry,
            ctx.attempt_timeout,
            &self.pass,
            || store::save_checkpoint(&ctx.pool, id, self.epoch, &checkpoint),
        )
        .await?;
        self.checkpoint = checkpoint;
        Ok(())
    }

    /// Deletes the pipeline's topics, then cleans the destination. Destination cleanup
    /// is best effort once it fails permanently (the database is gone, credentials
    /// revoked): a deleted pipeline must not be kept alive by its destination. Returns
    /// the reason recorded with the removal.
    async fn teardown(&self, spec: &ValidatedSpec) -> Result<String, ActivityError> {
        let (ctx, id) = (&self.ctx, self.id.as_str());
        let DestinationConfig::Postgres(destination) = &spec.destination;
        let topic = records_topic(id);
        run_activity(
            "delete-topics",
            id,
            &ctx.retry,
            ctx.attempt_timeout,
            &self.pass,
            || async { Ok(ctx.admin.delete_topic(&topic).await?) },
        )
        .await?;
        if self.checkpoint.setup_spec.is_none() {
            return Ok("teardown finished (setup never completed; destination untouched)".into());
        }
        let cleaned = run_activity(
            "teardown",
            id,
            &ctx.retry,
            ctx.attempt_timeout,
            &self.pass,
            || async {
                let pool = ctx.destinations.get(&destination.url)?;
                pg::teardown(&pool, destination, id).await
            },
        )
        .await;
        match cleaned {
            Ok(()) => Ok("teardown finished; pipeline removed".into()),
            Err(ActivityError::Failed {
                failure_type,
                message,
            }) if !failure_type.is_retryable() => {
                tracing::warn!(pipeline_id = id, error = %message, "destination cleanup failed; removing the pipeline anyway");
                Ok(format!(
                    "topics deleted; destination cleanup failed: {message}"
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// The update-status activity; a no-op when nothing would change.
    async fn set_status(
        &mut self,
        to: PipelineStatus,
        generation: i64,
        reason: &str,
    ) -> Result<(), ActivityError> {
        if self.status == Some(to) && self.observed >= generation {
            return Ok(());
        }
        let write = StatusWrite {
            to,
            observed_generation: generation,
            last_error: None,
            reason,
        };
        self.write_status(&write).await
    }

    async fn write_status(&mut self, write: &StatusWrite<'_>) -> Result<(), ActivityError> {
        let (ctx, id, epoch) = (&self.ctx, self.id.as_str(), self.epoch);
        run_activity(
            "update-status",
            id,
            &ctx.retry,
            ctx.attempt_timeout,
            &self.pass,
            || store::write_status(&ctx.pool, id, epoch, &ctx.worker_id, write),
        )
        .await?;
        if self.status != Some(write.to) {
            tracing::info!(pipeline_id = id, from = ?self.status, to = %write.to, "status changed");
        }
        self.status = Some(write.to);
        self.observed = self.observed.max(write.observed_generation);
        Ok(())
    }

    /// Reads the stored checkpoint, which the backfill lane advances as it runs.
    async fn load_checkpoint(&self) -> Result<Checkpoint, ActivityError> {
        let (ctx, id) = (&self.ctx, self.id.as_str());
        run_activity(
            "load-checkpoint",
            id,
            &ctx.retry,
            ctx.attempt_timeout,
            &self.pass,
            || store::load_checkpoint(&ctx.pool, id),
        )
        .await
    }

    async fn stop_lanes(&mut self) {
        if let Some(lanes) = self.lanes.take() {
            lanes.stop().await;
            // Whatever the stopped lanes still report no longer applies.
            self.lanes_seq += 1;
        }
    }
}
