//! One durable workflow per owned pipeline. It claims the pipeline (drawing a new owner
//! epoch), then loops: re-read the row from Postgres (the source of truth), reconcile
//! desired against actual state, and sleep until a signal, a lane event or the resync
//! timer wakes it. Being level-triggered, a lost signal only delays convergence.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use sluice_connectors::{registry, ValidatedSpec, WriteTarget};
use sluice_infra::store::get_pipeline;
use sluice_protocol::conversions::PipelineRecord;
use sluice_protocol::schedule::Schedule;
use sluice_protocol::secrets::spec_fingerprint;
use sluice_protocol::status::PipelineStatus;
use sluice_protocol::topics::{inputs_topic, legacy_records_topic, records_topic};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::activity::{run_activity, ActivityError};
use crate::claim::{Activities, Claim};
use crate::lanes::{select_streams, LaneEvent, LaneParams, Lanes, RECORDS_PARTITION};
use crate::plan::{plan, LanesState, Observed, Step};
use crate::store::{self, Checkpoint, StatusWrite, LEGACY_FINGERPRINT};
use crate::WorkerContext;
use tracing::Instrument;

/// What the supervisor keeps for each running workflow.
pub struct WorkflowHandle {
    pub wake: Arc<Notify>,
    /// The trace of the signal that woke the workflow last, for its next pass.
    pub trace: Arc<std::sync::Mutex<Option<String>>>,
    pub stop: CancellationToken,
    /// The signals-topic partition the pipeline is on; the workflow follows a move to
    /// another partition this worker is also assigned.
    pub partition: Arc<AtomicI32>,
    /// What the workflow last read of its row (None before its first read).
    pub seen: Arc<std::sync::Mutex<Option<store::RowVersion>>>,
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
    let trace = Arc::new(std::sync::Mutex::new(None));
    let stop = CancellationToken::new();
    let partition = Arc::new(AtomicI32::new(partition));
    let seen = Arc::new(std::sync::Mutex::new(None));
    let task = tokio::spawn({
        let wake = Arc::clone(&wake);
        let trace = Arc::clone(&trace);
        let stop = stop.clone();
        let partition = Arc::clone(&partition);
        let seen = Arc::clone(&seen);
        async move {
            let cells = Cells {
                partition: &partition,
                seen: &seen,
            };
            run(ctx, &pipeline_id, cells, wake, trace, stop).await;
            let _ = exited.send((pipeline_id, seq));
        }
    });
    WorkflowHandle {
        wake,
        trace,
        stop,
        partition,
        seen,
        seq,
        task,
    }
}

/// What a workflow shares with the supervisor besides its wake-ups.
#[derive(Clone, Copy)]
struct Cells<'a> {
    partition: &'a AtomicI32,
    seen: &'a std::sync::Mutex<Option<store::RowVersion>>,
}

enum Flow {
    Continue,
    Removed,
}

struct Workflow {
    activities: Activities,
    checkpoint: Checkpoint,
    lanes: Option<Lanes>,
    /// The digest of the spec the running lanes were started with: any other spec (a
    /// changed password, say, which leaves the fingerprint alone) restarts them.
    lanes_spec: Option<[u8; 32]>,
    /// Numbers each start of the lanes, so events of lanes already stopped are ignored.
    lanes_seq: u64,
    lane_events_tx: mpsc::UnboundedSender<(u64, LaneEvent)>,
    lane_failure: Option<ActivityError>,
    /// Cancels the activities of the current reconcile pass: fired when the worker
    /// stops, or when a signal arrives while an activity is retrying.
    pass: CancellationToken,
    /// Status and observed generation as this workflow last wrote or read them.
    status: Option<PipelineStatus>,
    observed: i64,
    /// Setup ran successfully in this claim.
    setup_ran: bool,
    /// Teardown progress of a deletion, and the reason its removal records.
    topics_deleted: bool,
    destination_cleaned: bool,
    teardown_reason: Option<String>,
}

async fn run(
    ctx: Arc<WorkerContext>,
    id: &str,
    cells: Cells<'_>,
    wake: Arc<Notify>,
    trace: Arc<std::sync::Mutex<Option<String>>>,
    stop: CancellationToken,
) {
    let partition = cells.partition.load(Ordering::Relaxed);
    // The partition may have been revoked while this workflow waited to start: a
    // worker that no longer owns it must not take the pipeline from its new owner.
    if !ctx.assignment.contains(partition) {
        return;
    }
    let claimed = run_activity("claim", id, &ctx.retry, ctx.attempt_timeout, &stop, || {
        store::claim(&ctx.pool, id, partition, &ctx.worker_id)
    })
    .await;
    let claim = match claimed {
        Ok(Some(claim)) => claim,
        Ok(None) | Err(ActivityError::Cancelled) => return,
        Err(e) => {
            tracing::warn!(pipeline_id = id, error = %e, "could not claim pipeline");
            return;
        }
    };
    let ended = own(&ctx, id, &claim, cells, &wake, &trace, &stop).await;
    // The ownership history's row of this claim ends once the lanes have halted (release
    // has ended it already on a graceful stop). Best effort: a row left open reads as an
    // owner that never said it stopped.
    let recorded = tokio::time::timeout(
        ctx.attempt_timeout,
        store::end_ownership(&ctx.pool, &claim, ended),
    )
    .await;
    if !matches!(recorded, Ok(Ok(()))) {
        tracing::warn!(pipeline_id = id, "could not record the end of ownership");
    }
}

/// Runs the claimed pipeline until the workflow ends; returns why it ended, for the
/// ownership history.
async fn own(
    ctx: &Arc<WorkerContext>,
    id: &str,
    claim: &Claim,
    cells: Cells<'_>,
    wake: &Notify,
    trace: &std::sync::Mutex<Option<String>>,
    stop: &CancellationToken,
) -> &'static str {
    let _owned = crate::metrics::Owned::new(&claim.key);
    let activities = Activities::new(Arc::clone(ctx), claim.clone());
    let checkpoint = match activities
        .run("load-checkpoint", stop, || {
            store::load_checkpoint(&ctx.pool, claim)
        })
        .await
    {
        Ok(c) => c,
        Err(_) => return "stopped",
    };
    tracing::info!(
        pipeline_id = id,
        epoch = claim.epoch,
        incarnation = claim.incarnation,
        "pipeline claimed"
    );
    let (lane_events_tx, mut lane_events) = mpsc::unbounded_channel();
    let mut wf = Workflow {
        activities: activities.clone(),
        checkpoint,
        lanes: None,
        lanes_spec: None,
        lanes_seq: 0,
        lane_events_tx,
        lane_failure: None,
        pass: stop.child_token(),
        status: None,
        observed: 0,
        setup_ran: false,
        topics_deleted: false,
        destination_cleaned: false,
        teardown_reason: None,
    };
    let mut fenced_early = false;

    loop {
        // One span per pass, in the trace of the signal that woke it, if any: the
        // activities of the pass (the status it persists among them) are its children.
        let pass_span = tracing::info_span!(
            "reconcile",
            otel.name = "reconcile",
            pipeline_id = id,
            trace_id = tracing::field::Empty
        );
        let parent = trace.lock().unwrap_or_else(|e| e.into_inner()).take();
        sluice_infra::telemetry::set_parent(&pass_span, parent.as_deref());
        sluice_infra::telemetry::record_trace_id(&pass_span);
        let row = activities
            .run("load", stop, || async {
                Ok(get_pipeline(&ctx.pool, id).await?)
            })
            .instrument(pass_span.clone())
            .await;
        let row = match row {
            Ok(Some(row)) => row,
            Ok(None) => {
                wf.stop_lanes().await;
                return "removed";
            }
            Err(ActivityError::Cancelled) => break,
            Err(e) => {
                tracing::warn!(pipeline_id = id, error = %e, "could not load pipeline");
                break;
            }
        };
        if row.owner_epoch != claim.epoch {
            tracing::info!(
                pipeline_id = id,
                epoch = claim.epoch,
                newer = row.owner_epoch,
                "fenced by a newer owner"
            );
            wf.stop_lanes().await;
            return "fenced";
        }
        *cells.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(store::RowVersion::of(&row));
        let partition_cell = cells.partition;
        if row.partition != partition_cell.load(Ordering::Relaxed) {
            // Moved to another signals-topic partition (`signals-topic
            // --move-pipelines`). On a partition this worker is assigned too, it stays
            // here; otherwise that partition's owner takes it over.
            if ctx.assignment.contains(row.partition) {
                partition_cell.store(row.partition, Ordering::Relaxed);
            } else {
                tracing::info!(
                    pipeline_id = id,
                    from = partition_cell.load(Ordering::Relaxed),
                    to = row.partition,
                    "pipeline moved to another signals partition; releasing it"
                );
                wf.stop_lanes().await;
                let _ = store::release(&ctx.pool, claim).await;
                return "moved";
            }
        }
        if !fenced_early {
            fenced_early = true;
            Box::pin(
                wf.fence_destination_early(&row)
                    .instrument(pass_span.clone()),
            )
            .await;
        }
        wf.status = row.status;
        wf.observed = row.observed_generation;
        wf.pass = stop.child_token();
        let pass = wf.pass.clone();
        let mut interrupted = false;
        // A signal that changed no generation (the first pushed input opened the inputs
        // topic) is acted on by another pass once this one ends.
        let mut woken = false;
        let outcome = {
            // Boxed, like the other large steps of this loop: the workflow's future is
            // as large as its largest step, and stays that large while it idles.
            let mut reconcile = Box::pin(wf.reconcile(&row).instrument(pass_span.clone()));
            loop {
                tokio::select! {
                    r = &mut reconcile => break r,
                    // A change made while an activity keeps retrying must not wait for
                    // it: cancel the pass and reconcile again from the fresh row. The
                    // resync branch covers a lost signal the same way.
                    _ = wake.notified(), if !interrupted => {
                        if generation_changed(ctx, id, row.generation).await {
                            interrupted = true;
                            pass.cancel();
                        } else {
                            woken = true;
                        }
                    }
                    _ = tokio::time::sleep(ctx.resync_interval), if !interrupted => {
                        if generation_changed(ctx, id, row.generation).await {
                            interrupted = true;
                            pass.cancel();
                        }
                    }
                }
            }
        };
        let again = interrupted || (woken && matches!(outcome, Ok(Flow::Continue)));
        match outcome {
            Ok(Flow::Removed) => {
                tracing::info!(pipeline_id = id, "pipeline torn down and removed");
                return "removed";
            }
            Ok(Flow::Continue) => {}
            Err(ActivityError::Cancelled) if stop.is_cancelled() => break,
            Err(ActivityError::Cancelled) => {}
            Err(ActivityError::Fenced) => {
                tracing::info!(
                    pipeline_id = id,
                    epoch = claim.epoch,
                    "fenced by a newer owner"
                );
                wf.stop_lanes().await;
                return "fenced";
            }
            Err(e) => {
                let message = e.to_string();
                tracing::warn!(pipeline_id = id, error = %message, "pipeline failed");
                wf.stop_lanes().await;
                wf.pass = stop.child_token();
                // A run in progress ends with the pipeline (best effort: the status
                // write below is what matters).
                let _ = store::fail_running_runs(&ctx.pool, claim, &message).await;
                let write = StatusWrite {
                    to: PipelineStatus::Error,
                    observed_generation: row.generation,
                    last_error: Some(&message),
                    reason: "activity failed",
                };
                match Box::pin(wf.write_status(&write).instrument(pass_span.clone())).await {
                    Err(ActivityError::Fenced) => {
                        wf.stop_lanes().await;
                        return "fenced";
                    }
                    Err(e) => {
                        tracing::warn!(pipeline_id = id, error = %e, "could not record ERROR")
                    }
                    Ok(()) => {}
                }
            }
        }
        if again {
            continue;
        }
        // The pass is over: its span ends, and nothing of the row is kept while idle.
        drop(pass_span);
        drop(row);

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
            // No timer: the supervisor's resync wakes a workflow whose row changed
            // unannounced (a lost signal).
            tokio::select! {
                _ = wake.notified() => None,
                Some(event) = lane_events.recv() => Some(event),
                _ = committed => None,
                _ = stop.cancelled() => break,
            }
        };
        match woke {
            Some((seq, LaneEvent::BackfillDone(cp))) if seq == wf.lanes_seq => wf.checkpoint = *cp,
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
            || store::release(&ctx.pool, claim),
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
    "stopped"
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
    fn claim(&self) -> &Claim {
        self.activities.claim()
    }

    fn ctx(&self) -> &Arc<WorkerContext> {
        self.activities.ctx()
    }

    /// The records topic of this incarnation: the one setup recorded, else the one
    /// setup will create (or the legacy name of a pipeline set up before topics were
    /// named per incarnation).
    fn records_topic(&self) -> String {
        let claim = self.claim();
        match &self.checkpoint.records_topic {
            Some(topic) => topic.clone(),
            None if self.checkpoint.spec_fingerprint.as_deref() == Some(LEGACY_FINGERPRINT) => {
                legacy_records_topic(&claim.key)
            }
            None => records_topic(&self.ctx().topic_namespace, &claim.key, claim.incarnation),
        }
    }

    /// Takes the destination's bookkeeping over for this claim at once, before setup
    /// or anything else: a previous owner that was stopped (SIGSTOP, a VM pause) and
    /// does not know yet that it lost the pipeline cannot land another batch, even of
    /// records of a spec that was changed meanwhile, while this owner sets up. Best
    /// effort, one attempt: a pipeline never set up has nothing to fence, and the write
    /// lane fences again before it writes.
    async fn fence_destination_early(&self, row: &PipelineRecord) {
        if self.checkpoint.records_topic.is_none()
            && self.checkpoint.spec_fingerprint.as_deref() != Some(LEGACY_FINGERPRINT)
        {
            return;
        }
        let Ok(valid) = registry().validate(&row.spec, "spec") else {
            return;
        };
        let ctx = self.ctx();
        let topic = self.records_topic();
        let target = WriteTarget {
            claim: self.claim(),
            topic: &topic,
            partition: RECORDS_PARTITION,
            spec_version: self.checkpoint.spec_version,
        };
        let fenced = tokio::time::timeout(
            ctx.attempt_timeout,
            valid.destination.fence(&ctx.connectors, &target, 0),
        )
        .await;
        match fenced {
            Ok(Ok(_)) => {
                tracing::debug!(pipeline_id = %target.claim.key, "destination fenced on claim")
            }
            Ok(Err(e)) => {
                tracing::debug!(pipeline_id = %target.claim.key, error = %e, "destination not fenced on claim")
            }
            Err(_) => {
                tracing::debug!(pipeline_id = %target.claim.key, "destination fence on claim timed out")
            }
        }
    }

    /// One reconcile pass: observe, ask [`plan`] for the next step, apply it, until
    /// the plan says to wait (or the pipeline is gone).
    async fn reconcile(&mut self, row: &PipelineRecord) -> Result<Flow, ActivityError> {
        let generation = row.generation;
        // Deleting and pausing never need a valid spec: whatever the stored spec has
        // become (a key the worker lacks, stricter rules), the pipeline can be stopped
        // and removed.
        let spec = registry()
            .validate(&row.spec, "spec")
            .map_err(|v| format!("stored spec is invalid: {v}"));
        let fingerprint = spec_fingerprint(&row.spec, registry());
        let digest = row.spec.digest();
        self.activities.set_retry(row.spec.retry.as_ref());
        if let Some(lanes) = &mut self.lanes {
            lanes.request_syncs(row.sync_requests);
            if row.inputs_open {
                lanes.open_inputs();
            }
        }
        let mut backfill_complete = None;
        let mut reset_pending = row.reset_request.is_some();
        // Far more than any path needs: a plan that keeps asking is a bug, not a wait.
        for _ in 0..32 {
            let observed = Observed {
                desired: row.desired_status,
                status: self.status,
                observed_current: self.observed >= generation,
                spec_valid: spec.is_ok(),
                set_up: self.checkpoint.is_set_up_for(&fingerprint),
                setup_ran: self.setup_ran,
                lanes: match (&self.lanes, &self.lanes_spec) {
                    (None, _) => LanesState::Stopped,
                    (Some(_), Some(running)) if running == &digest => LanesState::Current,
                    (Some(_), _) => LanesState::Stale,
                },
                backfill_complete,
                lane_failed: self.lane_failure.is_some(),
                topics_deleted: self.topics_deleted,
                destination_cleaned: self.destination_cleaned,
                reset_pending,
            };
            let step = plan(&observed);
            tracing::debug!(pipeline_id = %self.claim().key, ?step, "reconcile step");
            match step {
                Step::Wait => return Ok(Flow::Continue),
                Step::Fail => {
                    return Err(self
                        .lane_failure
                        .take()
                        .unwrap_or_else(|| ActivityError::Invariant("a lane failed".into())))
                }
                Step::RejectSpec => {
                    let why = spec.as_ref().err().cloned().unwrap_or_default();
                    return Err(ActivityError::config(why));
                }
                Step::StopLanes => self.stop_lanes().await,
                Step::Setup => {
                    let valid = spec
                        .as_ref()
                        .map_err(|why| ActivityError::config(why.clone()))?;
                    self.setup(valid, row, &fingerprint).await?;
                    self.setup_ran = true;
                }
                Step::CheckBackfill => {
                    let valid = spec
                        .as_ref()
                        .map_err(|why| ActivityError::config(why.clone()))?;
                    backfill_complete = Some(self.backfill_complete(valid).await?);
                }
                Step::StartLanes => {
                    let valid = registry().validate(&row.spec, "spec").map_err(|v| {
                        ActivityError::config(format!("stored spec is invalid: {v}"))
                    })?;
                    // The lanes resume from the stored checkpoint, which the backfill lane
                    // advanced while it ran.
                    self.checkpoint = self.load_checkpoint().await?;
                    let schedule = row
                        .spec
                        .schedule
                        .as_deref()
                        .map(Schedule::parse)
                        .transpose()
                        .map_err(|why| ActivityError::config(format!("spec.schedule: {why}")))?;
                    self.lanes_seq += 1;
                    let claim = self.claim();
                    self.lanes = Some(Lanes::start(
                        self.activities.clone(),
                        LaneParams {
                            source: Arc::from(valid.source),
                            destination: Arc::from(valid.destination),
                            checkpoint: self.checkpoint.clone(),
                            topic: self.records_topic(),
                            inputs_topic: inputs_topic(
                                &self.ctx().topic_namespace,
                                &claim.key,
                                claim.incarnation,
                            ),
                            inputs_open: row.inputs_open,
                            streams: row.spec.streams.clone(),
                            schedule,
                            sync_requests: row.sync_requests,
                        },
                        self.lanes_seq,
                        self.lane_events_tx.clone(),
                    ));
                    self.lanes_spec = Some(digest);
                }
                Step::WriteStatus(to, reason) => self.set_status(to, generation, reason).await?,
                Step::PauseUnset => {
                    let why = spec.as_ref().err().cloned().unwrap_or_default();
                    let write = StatusWrite {
                        to: PipelineStatus::Paused,
                        observed_generation: generation,
                        last_error: Some(&why),
                        reason: "paused by request; setup skipped",
                    };
                    self.write_status(&write).await?;
                }
                Step::Observe => {
                    let status = self.status.ok_or_else(|| {
                        ActivityError::Invariant("observing without a status".into())
                    })?;
                    // Records that this generation has been acted on; never a
                    // transition, so a periodic reconcile of a READY pipeline cannot flap.
                    self.set_status(status, generation, "").await?;
                }
                Step::Reset => {
                    let streams = row.reset_request.clone().unwrap_or_default();
                    self.reset(&streams).await?;
                    // The reset is acted on; the pass goes on from the new checkpoint.
                    reset_pending = false;
                    backfill_complete = None;
                }
                Step::DeleteTopics => {
                    self.delete_topics().await?;
                    self.topics_deleted = true;
                }
                Step::CleanDestination => {
                    self.teardown_reason = Some(self.clean_destination(spec.as_ref()).await?);
                    self.destination_cleaned = true;
                }
                Step::Remove => {
                    let reason = self
                        .teardown_reason
                        .clone()
                        .unwrap_or_else(|| "teardown finished; pipeline removed".into());
                    let (ctx, claim) = (self.ctx(), self.claim());
                    let never = CancellationToken::new();
                    self.activities
                        .run("remove", &never, || {
                            store::remove_pipeline(
                                &ctx.pool,
                                claim,
                                &ctx.worker_id,
                                generation,
                                &reason,
                            )
                        })
                        .await?;
                    return Ok(Flow::Removed);
                }
            }
        }
        Err(ActivityError::Invariant(
            "the reconcile plan did not converge within 32 steps".into(),
        ))
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
                let (ctx, claim) = (self.ctx(), self.claim());
                let topic = self.records_topic();
                let target = WriteTarget {
                    claim,
                    topic: &topic,
                    partition: RECORDS_PARTITION,
                    spec_version: self.checkpoint.spec_version,
                };
                self.activities
                    .run("read-offsets", &self.pass, || {
                        spec.destination.committed(&ctx.connectors, &target)
                    })
                    .await?
                    .unwrap_or(0)
            }
        };
        // The current spec's records start at records_start_offset: below it there is
        // nothing of this spec to wait for.
        Ok(committed.max(self.checkpoint.records_start_offset)
            >= self.checkpoint.backfill_end_offset)
    }

    /// Setup: discovers the streams, creates the records topic and what the
    /// destination needs for them, and records both in the checkpoint. A changed spec
    /// starts a new spec version: the backfill reads everything again. The inputs
    /// topic is the control plane's to make, on the first push; setup only makes sure
    /// of it once it was made.
    async fn setup(
        &mut self,
        spec: &ValidatedSpec,
        row: &PipelineRecord,
        fingerprint: &str,
    ) -> Result<(), ActivityError> {
        let (selected, generation) = (&row.spec.streams, row.generation);
        if self.status != Some(PipelineStatus::Setup) {
            self.set_status(PipelineStatus::Setup, generation, "setting up")
                .await?;
        }
        let (ctx, claim) = (Arc::clone(self.ctx()), self.claim().clone());
        let topic = self.records_topic();
        let inputs = inputs_topic(&ctx.topic_namespace, &claim.key, claim.incarnation);
        let first_setup = self.checkpoint.spec_fingerprint.is_none();
        // Waiting for a slot is not part of the attempt (its timeout): a change to the
        // pipeline still interrupts it.
        let _slot = tokio::select! {
            slot = ctx.setup_slots.acquire() => slot.map_err(|_| ActivityError::Cancelled)?,
            _ = self.pass.cancelled() => return Err(ActivityError::Cancelled),
        };
        let catalog = self
            .activities
            .run("setup", &self.pass, || async {
                let streams =
                    select_streams(spec.source.discover(&ctx.connectors).await?, selected)?;
                if streams.is_empty() {
                    return Err(ActivityError::config("the source offers no stream to read"));
                }
                // Records (and pushed inputs) are kept until the pipeline is deleted: a
                // long pause must not let unwritten records expire.
                let made = if row.inputs_open {
                    &[&topic, &inputs][..]
                } else {
                    &[&topic][..]
                };
                for t in made {
                    ctx.admin
                        .ensure_topic(t, 1, ctx.replication_factor, &[("retention.ms", "-1")])
                        .await?;
                }
                // A topic this incarnation has not recorded yet holds nothing of it; one
                // with records belongs to someone else (a deployment sharing the Kafka
                // cluster under the same topic namespace) and is never written to.
                if first_setup && ctx.admin.end_offset(&topic, RECORDS_PARTITION).await? > 0 {
                    return Err(ActivityError::config(format!(
                        "records topic {topic} already exists and holds records this pipeline \
                         did not produce; give each deployment sharing the Kafka cluster its \
                         own --topic-namespace"
                    )));
                }
                spec.destination
                    .setup(&ctx.connectors, &streams, &claim)
                    .await?;
                Ok(streams)
            })
            .await?;

        // The lanes may have advanced the stored checkpoint since it was last read.
        let mut checkpoint = self.load_checkpoint().await?;
        match checkpoint.spec_fingerprint.as_deref() {
            // First setup of this incarnation.
            None => checkpoint.spec_version = checkpoint.spec_version.max(1),
            Some(f) if f == fingerprint || f == LEGACY_FINGERPRINT => {}
            Some(_) => {
                // A changed spec reads the source again from the start. Records the old
                // spec left in the topic (or still has in flight, should its owner be
                // stale) carry the old spec version, and the write lane drops them.
                let end = self
                    .activities
                    .run("records-end", &self.pass, || async {
                        Ok(ctx.admin.end_offset(&topic, RECORDS_PARTITION).await?)
                    })
                    .await?;
                tracing::info!(
                    pipeline_id = %claim.key,
                    records_start_offset = end,
                    "spec changed, backfill restarts"
                );
                if let Some(run) = checkpoint.run.take() {
                    self.activities
                        .run("end-run", &self.pass, || {
                            store::end_run(
                                &ctx.pool,
                                &claim,
                                run.number,
                                "cancelled",
                                Some("the spec changed"),
                            )
                        })
                        .await?;
                }
                checkpoint.spec_version += 1;
                checkpoint.next_trigger = Some("spec-change".into());
                checkpoint.streams.clear();
                checkpoint.cursor = 0;
                checkpoint.backfill_done = false;
                checkpoint.records_start_offset = end;
                checkpoint.backfill_end_offset = end;
            }
        }
        // A stream new to the catalog (the source gained a table) starts its backfill;
        // the others keep their progress.
        checkpoint.catalog = catalog;
        if checkpoint
            .catalog
            .iter()
            .any(|s| !checkpoint.progress(&s.name).backfill_done)
        {
            checkpoint.backfill_done = false;
        }
        checkpoint.spec_fingerprint = Some(fingerprint.to_owned());
        checkpoint.records_topic = Some(topic);
        self.activities
            .run("checkpoint", &self.pass, || {
                store::save_checkpoint(&ctx.pool, &claim, &checkpoint)
            })
            .await?;
        self.checkpoint = checkpoint;
        Ok(())
    }

    /// Deletes this incarnation's topics (never another incarnation's).
    async fn delete_topics(&self) -> Result<(), ActivityError> {
        let (ctx, claim) = (self.ctx(), self.claim());
        let topic = self.records_topic();
        let inputs = inputs_topic(&ctx.topic_namespace, &claim.key, claim.incarnation);
        self.activities
            .run("delete-topics", &self.pass, || async {
                store::check_epoch(&ctx.pool, claim).await?;
                ctx.admin.delete_topic(&topic).await?;
                Ok(ctx.admin.delete_topic(&inputs).await?)
            })
            .await
    }

    /// Applies a reset: the named streams (all, when none is named) read again from
    /// the start, their sync positions taken anew; a run in progress is cancelled.
    /// Rows at the destination stay and are overwritten as the backfill reaches them.
    async fn reset(&mut self, streams: &[String]) -> Result<(), ActivityError> {
        let (ctx, claim) = (Arc::clone(self.ctx()), self.claim().clone());
        let mut checkpoint = self.load_checkpoint().await?;
        let names: Vec<String> = if streams.is_empty() {
            checkpoint.catalog.iter().map(|s| s.name.clone()).collect()
        } else {
            streams.to_vec()
        };
        for name in &names {
            let progress = checkpoint.progress(name);
            checkpoint.streams.insert(
                name.clone(),
                store::StreamProgress {
                    resets: progress.resets + 1,
                    ..store::StreamProgress::default()
                },
            );
        }
        if !names.is_empty() {
            checkpoint.backfill_done = false;
        }
        let cancelled = checkpoint.run.take();
        checkpoint.next_trigger = Some("reset".into());
        self.activities
            .run("reset", &self.pass, || async {
                if let Some(run) = &cancelled {
                    store::end_run(
                        &ctx.pool,
                        &claim,
                        run.number,
                        "cancelled",
                        Some("reset by request"),
                    )
                    .await?;
                }
                store::save_checkpoint(&ctx.pool, &claim, &checkpoint).await?;
                store::clear_reset(&ctx.pool, &claim).await
            })
            .await?;
        tracing::info!(pipeline_id = %claim.key, streams = ?names, "reset applied");
        self.checkpoint = checkpoint;
        Ok(())
    }

    /// Cleans the destination. Best effort once it fails permanently (the database is
    /// gone, credentials revoked, the stored spec no longer opens): a deleted pipeline
    /// must not be kept alive by its destination. Returns the reason recorded with the
    /// removal.
    async fn clean_destination(
        &self,
        spec: Result<&ValidatedSpec, &String>,
    ) -> Result<String, ActivityError> {
        let (ctx, claim) = (self.ctx(), self.claim());
        if self.checkpoint.spec_fingerprint.is_none() {
            return Ok("teardown finished (setup never completed; destination untouched)".into());
        }
        let spec = match spec {
            Ok(spec) => spec,
            Err(why) => {
                tracing::warn!(pipeline_id = %claim.key, error = %why, "destination cleanup skipped");
                return Ok(format!(
                    "topics deleted; destination cleanup skipped: {why}"
                ));
            }
        };
        let catalog = &self.checkpoint.catalog;
        let cleaned = self
            .activities
            .run("teardown", &self.pass, || async {
                store::check_epoch(&ctx.pool, claim).await?;
                spec.destination
                    .teardown(&ctx.connectors, catalog, claim)
                    .await
            })
            .await;
        match cleaned {
            Ok(()) => Ok("teardown finished; pipeline removed".into()),
            Err(ActivityError::Failed {
                failure_type,
                message,
            }) if !failure_type.is_retryable() => {
                tracing::warn!(pipeline_id = %claim.key, error = %message, "destination cleanup failed; removing the pipeline anyway");
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
        let (ctx, claim) = (Arc::clone(self.ctx()), self.claim().clone());
        self.activities
            .run("update-status", &self.pass, || {
                store::write_status(&ctx.pool, &claim, &ctx.worker_id, write)
            })
            .await?;
        if self.status != Some(write.to) {
            tracing::info!(pipeline_id = %claim.key, from = ?self.status, to = %write.to, "status changed");
        }
        self.status = Some(write.to);
        crate::metrics::WORKER.status(&claim.key, write.to.as_str());
        self.observed = self.observed.max(write.observed_generation);
        Ok(())
    }

    /// Reads the stored checkpoint, which the backfill lane advances as it runs.
    async fn load_checkpoint(&self) -> Result<Checkpoint, ActivityError> {
        let (ctx, claim) = (self.ctx(), self.claim());
        self.activities
            .run("load-checkpoint", &self.pass, || {
                store::load_checkpoint(&ctx.pool, claim)
            })
            .await
    }

    async fn stop_lanes(&mut self) {
        if let Some(lanes) = self.lanes.take() {
            lanes.stop().await;
            // Whatever the stopped lanes still report no longer applies.
            self.lanes_seq += 1;
        }
        self.lanes_spec = None;
    }
}
