//! The lanes of an ACTIVE pipeline, all through the connector traits:
//!
//! - the **read lane** backfills every stream, then runs syncs on the pipeline's
//!   schedule or when asked (TriggerSync); each slice goes to the records topic in one
//!   Kafka transaction, and the stream's position is saved only after it committed;
//! - the **live lane** applies the inputs pushed to the pipeline (PushSourceInput),
//!   stored in its inputs topic, the same way;
//! - the **write lane** writes the records topic to the destination, rows and offsets
//!   committed together.
//!
//! Every lane stops at a safe point when its cancellation token fires. The write and
//! live lanes read through the worker's shared consumer ([`crate::feeds`]); the read
//! and live lanes close their producers when idle, so an idle pipeline holds no Kafka
//! client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::{json, Value};
use sluice_connectors::records::{Lane, PendingRecord, RecordTags};
use sluice_connectors::{Destination, Position, ReadMode, Source, SourceRecord, WriteTarget};
use sluice_protocol::catalog::StreamSchema;
use sluice_protocol::message::{ConnectorMessage, FailureType};
use sluice_protocol::schedule::Schedule;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::activity::ActivityError;
use crate::claim::Activities;
use crate::feeds::Feed;
use crate::store::{self, Checkpoint, RunState, StreamProgress};
use crate::WorkerContext;

/// Records topics have one partition: ordering per pipeline is total, and the
/// destination offset bookkeeping stays a single row.
pub const RECORDS_PARTITION: i32 = 0;

/// How long the write lane waits for the next record of a batch before writing what it
/// has: a batch fills while records keep arriving...
const BATCH_LINGER: Duration = Duration::from_millis(50);
/// ... for at most this long after its first record.
const BATCH_MAX_WAIT: Duration = Duration::from_secs(1);

/// Inputs the live lane applies in one transaction, at most.
const LIVE_BATCH: usize = 500;
/// How long a live lane keeps its producer without inputs.
const LIVE_IDLE_CLOSE: Duration = Duration::from_secs(10);

/// Longest a lane's transaction may stay open before the broker aborts it: bounds how
/// long a stopped owner's open transaction can hold back the write lane (which reads
/// committed records only).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Time the lanes spent per stage, for the run log: reading the source, producing to
/// Kafka (transactions included), consuming records (waiting included) and writing
/// to the destination.
#[derive(Debug, Default)]
pub struct Stages {
    read: AtomicU64,
    produce: AtomicU64,
    consume: AtomicU64,
    write: AtomicU64,
}

impl Stages {
    fn add(counter: &AtomicU64, since: tokio::time::Instant) {
        let nanos = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        counter.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Seconds per stage: read, produce, consume, write.
    fn seconds(&self) -> [f64; 4] {
        [&self.read, &self.produce, &self.consume, &self.write]
            .map(|c| c.load(Ordering::Relaxed) as f64 / 1e9)
    }
}

#[derive(Debug)]
pub enum LaneEvent {
    BackfillDone(Box<Checkpoint>),
    Failed(ActivityError),
}

/// Running lanes of one pipeline.
pub struct Lanes {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The live lane, until it is started (on the pipeline's first pushed input).
    live: Option<(Activities, LiveLane, LaneEvents)>,
    /// Next records-topic offset the destination has committed (-1 until known).
    pub committed: watch::Receiver<i64>,
    /// How many syncs were asked for (TriggerSync), all told.
    sync_requests: watch::Sender<i64>,
}

pub struct LaneParams {
    pub source: Arc<dyn Source>,
    pub destination: Arc<dyn Destination>,
    pub checkpoint: Checkpoint,
    /// The records topic setup created.
    pub topic: String,
    /// The topic pushed inputs wait in.
    pub inputs_topic: String,
    /// Whether that topic exists (an input was pushed): the live lane starts only then.
    pub inputs_open: bool,
    /// The streams the spec selects (empty: all).
    pub streams: Vec<String>,
    pub schedule: Option<Schedule>,
    pub sync_requests: i64,
}

/// The streams of `discovered` the spec selects, in the spec's order (all, when it
/// names none); a name the source does not offer is a configuration error.
pub fn select_streams(
    discovered: Vec<StreamSchema>,
    selected: &[String],
) -> Result<Vec<StreamSchema>, ActivityError> {
    if selected.is_empty() {
        return Ok(discovered);
    }
    selected
        .iter()
        .map(|name| {
            discovered
                .iter()
                .find(|s| &s.name == name)
                .cloned()
                .ok_or_else(|| {
                    ActivityError::config(format!(
                        "spec.streams names {name:?}, which the source does not offer (it offers: {})",
                        discovered.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                    ))
                })
        })
        .collect()
}

impl Lanes {
    /// Starts the lanes; their events are tagged with `seq`.
    pub fn start(
        activities: Activities,
        params: LaneParams,
        seq: u64,
        events: mpsc::UnboundedSender<(u64, LaneEvent)>,
    ) -> Self {
        let events = LaneEvents { seq, tx: events };
        let cancel = CancellationToken::new();
        let (committed_tx, committed) = watch::channel(-1);
        let (sync_requests, requests) = watch::channel(params.sync_requests);
        let catalog = Arc::new(RwLock::new(params.checkpoint.catalog.clone()));
        let stages = Arc::new(Stages::default());
        let write = WriteLane {
            stages: Arc::clone(&stages),
            destination: Arc::clone(&params.destination),
            topic: params.topic.clone(),
            catalog: Arc::clone(&catalog),
            records_start_offset: params.checkpoint.records_start_offset,
            spec_version: params.checkpoint.spec_version,
        };
        let live = LiveLane {
            source: Arc::clone(&params.source),
            inputs_topic: params.inputs_topic,
            records_topic: params.topic.clone(),
            catalog: Arc::clone(&catalog),
            spec_version: params.checkpoint.spec_version,
            after: params.checkpoint.live_after,
        };
        let live = Some((activities.clone(), live, events.clone()));
        let read = tokio::spawn(read_lane(
            activities.clone(),
            ReadLane {
                source: params.source,
                destination: params.destination,
                topic: params.topic,
                checkpoint: params.checkpoint,
                catalog,
                streams: params.streams,
                schedule: params.schedule,
                stages,
            },
            requests,
            committed.clone(),
            cancel.clone(),
            events.clone(),
        ));
        let write = tokio::spawn(write_lane(
            activities,
            write,
            cancel.clone(),
            events,
            committed_tx,
        ));
        let mut lanes = Self {
            cancel,
            tasks: vec![read, write],
            live,
            committed,
            sync_requests,
        };
        if params.inputs_open {
            lanes.open_inputs();
        }
        lanes
    }

    /// Starts the live lane, unless it runs already: the pipeline's inputs topic
    /// exists.
    pub fn open_inputs(&mut self) {
        if let Some((activities, lane, events)) = self.live.take() {
            let cancel = self.cancel.clone();
            self.tasks
                .push(tokio::spawn(live_lane(activities, lane, cancel, events)));
        }
    }

    /// Tells the read lane how many syncs were asked for, all told.
    pub fn request_syncs(&self, requests: i64) {
        self.sync_requests.send_if_modified(|current| {
            let changed = *current != requests;
            *current = requests;
            changed
        });
    }

    /// Stops every lane at its next safe point and waits for them.
    pub async fn stop(self) {
        self.cancel.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Where a start of the lanes reports: the workflow's channel, each event tagged with
/// the start's number.
#[derive(Clone)]
struct LaneEvents {
    seq: u64,
    tx: mpsc::UnboundedSender<(u64, LaneEvent)>,
}

impl LaneEvents {
    fn send(&self, event: LaneEvent) -> Result<(), mpsc::error::SendError<(u64, LaneEvent)>> {
        self.tx.send((self.seq, event))
    }
}

fn failing(events: &LaneEvents) -> impl Fn(ActivityError) + '_ {
    move |e: ActivityError| {
        if !matches!(e, ActivityError::Cancelled) {
            let _ = events.send(LaneEvent::Failed(e));
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

struct ReadLane {
    source: Arc<dyn Source>,
    destination: Arc<dyn Destination>,
    topic: String,
    checkpoint: Checkpoint,
    /// Shared with the write lane, which writes by it.
    catalog: Arc<RwLock<Vec<StreamSchema>>>,
    streams: Vec<String>,
    schedule: Option<Schedule>,
    stages: Arc<Stages>,
}

/// What the read lane's activities need.
struct Reader<'a> {
    stages: &'a Stages,
    activities: &'a Activities,
    ctx: &'a WorkerContext,
    claim: &'a sluice_connectors::Claim,
    producer: &'a tokio::sync::Mutex<SliceProducer>,
    cancel: &'a CancellationToken,
    never: CancellationToken,
}

impl Reader<'_> {
    /// Saves a part of the checkpoint; not cancellable (a committed slice is always
    /// recorded).
    async fn save(&self, patch: Value) -> Result<(), ActivityError> {
        self.activities
            .run("checkpoint", &self.never, || {
                store::merge_checkpoint(&self.ctx.pool, self.claim, patch.clone())
            })
            .await
    }

    /// Starts a run and records it as the one in progress.
    async fn start_run(&self, trigger: &str) -> Result<RunState, ActivityError> {
        let number = self
            .activities
            .run("start-run", self.cancel, || {
                store::start_run(&self.ctx.pool, self.claim, trigger)
            })
            .await?;
        let run = RunState {
            number,
            trigger: trigger.to_owned(),
            end_offset: None,
        };
        self.save(json!({ "run": run, "next_trigger": null }))
            .await?;
        tracing::info!(pipeline_id = %self.claim.key, run = number, trigger, "run started");
        Ok(run)
    }

    /// Reads one stream in `mode` from its saved position to the end, a transaction
    /// per slice; returns the offset past the last record produced, if any.
    async fn read_stream(
        &self,
        source: &dyn Source,
        topic: &str,
        stream: &StreamSchema,
        progress: &mut StreamProgress,
        mode: ReadMode,
        tags: &RecordTags,
    ) -> Result<Option<i64>, ActivityError> {
        let mut end = None;
        // What a record of this stream costs in flight: a guess until a slice was read.
        let mut per_record = crate::budget::FIRST_GUESS;
        loop {
            let (after, done) = match mode {
                ReadMode::Backfill => (progress.backfill_after.clone(), progress.backfill_done),
                ReadMode::Sync => (progress.sync_after.clone(), false),
            };
            if done {
                return Ok(end);
            }
            // Safe point: between slices nothing is in flight.
            if self.cancel.is_cancelled() {
                return Err(ActivityError::Cancelled);
            }
            // The slice's part of the records budget, held until its transaction
            // committed (an attempt that fails gives it back: a source or broker that
            // keeps failing must not hold it through its retries). A slice is read
            // smaller than the source's size when that would take more than a quarter
            // of the budget.
            let limit = source
                .slice_size()
                .min(self.ctx.read_records.records_in_share(per_record));
            let held = std::sync::Mutex::new(Some(
                self.ctx
                    .read_records
                    .reserve(limit * per_record, self.cancel)
                    .await?,
            ));
            let give_back = || drop(held.lock().unwrap_or_else(|e| e.into_inner()).take());
            // A worker that lost the pipeline must not produce another slice. (Should it
            // still, its transaction is fenced once the new owner's producer starts,
            // and the write lane drops a replayed slice.)
            self.activities
                .run("check-owner", self.cancel, || {
                    store::check_epoch(&self.ctx.pool, self.claim)
                })
                .await?;
            let started = tokio::time::Instant::now();
            let slice = self
                .activities
                .run("read-slice", self.cancel, || async {
                    let read = source
                        .read(&self.ctx.connectors, stream, mode, after.as_ref(), limit)
                        .await;
                    if read.is_err() {
                        give_back();
                    }
                    read
                })
                .await?;
            Stages::add(&self.stages.read, started);
            // Positions carry the stream's reset count first: a stream read again
            // after a reset is never taken for a replay of its earlier reads.
            let encoded: Vec<EncodedRecord> = slice
                .records
                .iter()
                .map(|r| {
                    let mut position = vec![Value::from(progress.resets)];
                    position.extend(r.position.0.iter().cloned());
                    encode_record(stream, r, Position(position), tags)
                })
                .collect();
            let cost = encoded
                .iter()
                .map(|r| r.key.len() + r.payload.len())
                .sum::<usize>()
                * crate::budget::MEMORY_FACTOR;
            if !encoded.is_empty() {
                per_record = (cost / encoded.len()).max(1);
            }
            let mut reservation = held.into_inner().unwrap_or_else(|e| e.into_inner());
            match reservation.as_mut() {
                Some(r) => r.resize(cost, self.cancel).await?,
                None => reservation = Some(self.ctx.read_records.reserve(cost, self.cancel).await?),
            }
            let held = std::sync::Mutex::new(reservation);
            let producing = tokio::time::Instant::now();
            let produced = self
                .activities
                .run("produce-slice", self.cancel, || async {
                    let produced = self.producer.lock().await.produce(topic, &encoded).await;
                    if produced.is_err() {
                        drop(held.lock().unwrap_or_else(|e| e.into_inner()).take());
                    }
                    produced
                })
                .await?;
            Stages::add(&self.stages.produce, producing);
            if let Some(produced_end) = produced {
                crate::metrics::WORKER.produced(
                    &self.claim.key,
                    encoded.len() as u64,
                    produced_end,
                );
            }
            end = end.max(produced);
            if let Some(last) = slice.records.last() {
                match mode {
                    ReadMode::Backfill => progress.backfill_after = Some(last.position.clone()),
                    ReadMode::Sync => progress.sync_after = Some(last.position.clone()),
                }
            }
            if mode == ReadMode::Backfill {
                progress.backfill_done = slice.done;
                if slice.done && source.sync_follows_backfill() {
                    progress.sync_after =
                        Some(progress.backfill_after.clone().unwrap_or(Position::int(0)));
                }
            }
            let patch = match produced {
                Some(end) if mode == ReadMode::Backfill => json!({ "backfill_end_offset": end }),
                _ => json!({}),
            };
            let progress_now = progress.clone();
            self.activities
                .run("checkpoint", &self.never, || {
                    store::save_stream_progress(
                        &self.ctx.pool,
                        self.claim,
                        &stream.name,
                        &progress_now,
                        patch.clone(),
                    )
                })
                .await?;
            if let Some(run) = tags.run {
                // A metric: a failure to count is not a failure to read.
                let _ = store::count_run(
                    &self.ctx.pool,
                    self.claim,
                    run,
                    slice.records.len() as i64,
                    0,
                )
                .await;
            }
            if slice.done || (mode == ReadMode::Sync && slice.records.is_empty()) {
                return Ok(end);
            }
            let pace = source.pace(slice.records.len());
            drop((slice, encoded, held));
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(ActivityError::Cancelled),
                _ = tokio::time::sleep_until(started + pace) => {}
            }
        }
    }
}

/// Backfills every stream, then runs syncs: on the schedule, and whenever one is
/// asked for. A run ends once the destination has committed everything it read.
async fn read_lane(
    activities: Activities,
    mut lane: ReadLane,
    mut requests: watch::Receiver<i64>,
    mut committed: watch::Receiver<i64>,
    cancel: CancellationToken,
    events: LaneEvents,
) {
    let fail = failing(&events);
    let claim = activities.claim().clone();
    let ctx = Arc::clone(activities.ctx());
    let producer = tokio::sync::Mutex::new(SliceProducer::new(Arc::clone(&ctx), &claim, "read"));
    let reader = Reader {
        stages: &lane.stages,
        activities: &activities,
        ctx: &ctx,
        claim: &claim,
        producer: &producer,
        cancel: &cancel,
        never: CancellationToken::new(),
    };
    let result: Result<(), ActivityError> = async {
        if !lane.checkpoint.backfill_done {
            let _slot = read_slot(&ctx, &cancel).await?;
            let run = match lane.checkpoint.run.clone() {
                Some(run) => run,
                None => {
                    // Whoever made a backfill necessary said why (a reset, a changed
                    // spec, a retry after ERROR); otherwise it is the first.
                    let trigger = lane.checkpoint.next_trigger.take();
                    reader.start_run(trigger.as_deref().unwrap_or("initial")).await?
                }
            };
            lane.checkpoint.run = Some(run.clone());
            let tags = RecordTags {
                incarnation: claim.incarnation,
                epoch: claim.epoch,
                spec_version: lane.checkpoint.spec_version,
                lane: Lane::Backfill,
                position: None,
                run: Some(run.number),
            };
            let streams = lane.checkpoint.catalog.clone();
            for stream in &streams {
                let mut progress = lane.checkpoint.progress(&stream.name);
                if progress.backfill_done {
                    continue;
                }
                if !progress.sync_started {
                    // Where the first sync starts, taken before the backfill reads
                    // anything, so changes made while it runs are synced afterwards.
                    progress.sync_after = activities
                        .run("sync-start", &cancel, || {
                            lane.source.sync_start(&ctx.connectors, stream)
                        })
                        .await?;
                    progress.sync_started = true;
                }
                // Boxed (here and below): the lane's future would otherwise keep the
                // size of a read while it idles.
                let end = Box::pin(reader.read_stream(lane.source.as_ref(), &lane.topic, stream, &mut progress, ReadMode::Backfill, &tags)).await?;
                if let Some(end) = end {
                    lane.checkpoint.backfill_end_offset = lane.checkpoint.backfill_end_offset.max(end);
                }
                lane.checkpoint.streams.insert(stream.name.clone(), progress);
            }
            lane.checkpoint.backfill_done = true;
            let run = RunState {
                end_offset: Some(lane.checkpoint.backfill_end_offset),
                ..run
            };
            lane.checkpoint.run = Some(run.clone());
            reader
                .save(json!({ "backfill_done": true, "run": run }))
                .await?;
            tracing::info!(pipeline_id = %claim.key, "backfill produced every record");
            let _ = events.send(LaneEvent::BackfillDone(Box::new(lane.checkpoint.clone())));
        }
        loop {
            // A run whose reading ended succeeds once the destination has it all.
            if let Some(run) = lane.checkpoint.run.clone() {
                if let Some(end) = run.end_offset {
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(ActivityError::Cancelled),
                        r = committed.wait_for(|c| *c >= end) => { r.map_err(|_| ActivityError::Cancelled)?; }
                    }
                    activities
                        .run("end-run", &reader.never, || {
                            store::end_run(&ctx.pool, &claim, run.number, "succeeded", None)
                        })
                        .await?;
                    lane.checkpoint.run = None;
                    reader.save(json!({ "run": null })).await?;
                    let [read_s, produce_s, consume_s, write_s] = lane.stages.seconds();
                    tracing::info!(
                        pipeline_id = %claim.key,
                        run = run.number,
                        read_s = format!("{read_s:.2}"),
                        produce_s = format!("{produce_s:.2}"),
                        consume_s = format!("{consume_s:.2}"),
                        write_s = format!("{write_s:.2}"),
                        "run succeeded (stage times since the lanes started)"
                    );
                }
            }
            // The next sync: a run left half done, one asked for, or the schedule's.
            let trigger = match lane.checkpoint.run.clone() {
                Some(run) => run.trigger,
                // A sync that failed with the pipeline runs again once it recovers.
                None if lane.checkpoint.next_trigger.is_some() => {
                    lane.checkpoint.next_trigger.take().unwrap_or_default()
                }
                None => {
                    // Idle until the next sync: no Kafka client is kept for it (the
                    // next run makes its producer again).
                    producer.lock().await.close();
                    let last = lane.checkpoint.last_sync_ms.unwrap_or_else(now_ms);
                    let due = lane.schedule.as_ref().and_then(|s| {
                        let last = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(last)?;
                        s.next_after(last)
                    });
                    let sleep = due.map(|d| {
                        (d - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO)
                    });
                    let asked = |r: &i64| *r > lane.checkpoint.syncs_served;
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(ActivityError::Cancelled),
                        r = requests.wait_for(asked) => { r.map_err(|_| ActivityError::Cancelled)?; "manual".to_owned() }
                        _ = tokio::time::sleep(sleep.unwrap_or(Duration::MAX)), if sleep.is_some() => "schedule".to_owned(),
                    }
                }
            };
            let slot = read_slot(&ctx, &cancel).await?;
            let run = match lane.checkpoint.run.clone() {
                Some(run) => run,
                None => reader.start_run(&trigger).await?,
            };
            let served = (*requests.borrow()).max(lane.checkpoint.syncs_served);
            lane.checkpoint.syncs_served = if trigger == "manual" { served } else { lane.checkpoint.syncs_served };
            lane.checkpoint.last_sync_ms = Some(now_ms());
            lane.checkpoint.run = Some(run.clone());
            reader
                .save(json!({
                    "syncs_served": lane.checkpoint.syncs_served,
                    "last_sync_ms": lane.checkpoint.last_sync_ms,
                    "run": run,
                }))
                .await?;
            // The source may have changed its shape: new streams (read from the start)
            // and new fields (new columns at the destination) are taken up first.
            let discovered = activities
                .run("discover", &cancel, || lane.source.discover(&ctx.connectors))
                .await?;
            let streams = select_streams(discovered, &lane.streams)?;
            if streams != lane.checkpoint.catalog {
                activities
                    .run("setup", &cancel, || {
                        lane.destination.setup(&ctx.connectors, &streams, &claim)
                    })
                    .await?;
                reader.save(json!({ "catalog": streams })).await?;
                *lane.catalog.write().expect("catalog lock is never poisoned") = streams.clone();
                lane.checkpoint.catalog = streams.clone();
                tracing::info!(pipeline_id = %claim.key, "the source's catalog changed; destination updated");
            }
            let mut end: Option<i64> = None;
            for stream in &streams {
                let mut progress = lane.checkpoint.progress(&stream.name);
                let mut tags = RecordTags {
                    incarnation: claim.incarnation,
                    epoch: claim.epoch,
                    spec_version: lane.checkpoint.spec_version,
                    lane: Lane::Backfill,
                    position: None,
                    run: Some(run.number),
                };
                if !progress.backfill_done {
                    if !progress.sync_started {
                        progress.sync_after = activities
                            .run("sync-start", &cancel, || {
                                lane.source.sync_start(&ctx.connectors, stream)
                            })
                            .await?;
                        progress.sync_started = true;
                    }
                    end = end.max(
                        Box::pin(reader.read_stream(lane.source.as_ref(), &lane.topic, stream, &mut progress, ReadMode::Backfill, &tags)).await?,
                    );
                }
                tags.lane = Lane::Sync;
                if progress.sync_after.is_some() {
                    end = end.max(
                        Box::pin(reader.read_stream(lane.source.as_ref(), &lane.topic, stream, &mut progress, ReadMode::Sync, &tags)).await?,
                    );
                }
                lane.checkpoint.streams.insert(stream.name.clone(), progress);
            }
            // Nothing new: the run has succeeded as soon as the destination is where
            // it already was.
            let end = end.unwrap_or_else(|| *committed.borrow());
            let run = RunState {
                end_offset: Some(end),
                ..run
            };
            lane.checkpoint.run = Some(run.clone());
            reader.save(json!({ "run": run })).await?;
            drop(slot);
        }
    }
    .await;
    if let Err(e) = result {
        fail(e);
    }
}

/// A slot of the worker's concurrent reads, held while a run reads its source and
/// produces (its transactional producer open): a burst of new pipelines backfills a
/// bounded number at a time instead of opening a Kafka client each at once.
async fn read_slot<'a>(
    ctx: &'a WorkerContext,
    cancel: &CancellationToken,
) -> Result<tokio::sync::SemaphorePermit<'a>, ActivityError> {
    tokio::select! {
        slot = ctx.read_slots.acquire() => slot.map_err(|_| ActivityError::Cancelled),
        _ = cancel.cancelled() => Err(ActivityError::Cancelled),
    }
}

struct LiveLane {
    source: Arc<dyn Source>,
    inputs_topic: String,
    records_topic: String,
    catalog: Arc<RwLock<Vec<StreamSchema>>>,
    spec_version: i64,
    /// The next inputs-topic offset to apply.
    after: i64,
}

/// Applies pushed inputs in order: each batch of inputs becomes records in one
/// transaction, and the next input's offset is saved only after it committed. Inputs
/// pushed while the pipeline was paused wait in the topic and are applied after it
/// resumes; a batch produced again after a crash is dropped by the write lane (its
/// positions, the inputs' offsets, are not new).
async fn live_lane(
    activities: Activities,
    mut lane: LiveLane,
    cancel: CancellationToken,
    events: LaneEvents,
) {
    let fail = failing(&events);
    let claim = activities.claim().clone();
    let ctx = Arc::clone(activities.ctx());
    let consumer = activities
        .run("open-inputs-consumer", &cancel, || async {
            Feed::open(
                &ctx.feeds,
                &lane.inputs_topic,
                RECORDS_PARTITION,
                lane.after,
            )
        })
        .await;
    let consumer = match consumer {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let producer = tokio::sync::Mutex::new(SliceProducer::new(Arc::clone(&ctx), &claim, "live"));
    let never = CancellationToken::new();
    // Whether the producer may be open (no timer runs for a lane that has none).
    let mut producing = false;
    let result: Result<(), ActivityError> = async {
        loop {
            // Safe point: no input is open while waiting for the first. A lane that
            // has had no input for a while gives its producer up.
            let idle = async {
                if producing {
                    tokio::time::sleep(LIVE_IDLE_CLOSE).await
                } else {
                    std::future::pending().await
                }
            };
            let first = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                m = consumer.recv() => m,
                _ = idle => {
                    producer.lock().await.close();
                    producing = false;
                    continue;
                }
            };
            let mut inputs = Vec::new();
            match first {
                Ok(m) => inputs.push(pending_input(&m)?),
                Err(e) => {
                    consumer_error(&claim.key, &lane.inputs_topic, e)?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let deadline = tokio::time::Instant::now() + BATCH_LINGER;
            while inputs.len() < LIVE_BATCH {
                tokio::select! {
                    biased;
                    m = consumer.recv() => match m {
                        Ok(m) => inputs.push(pending_input(&m)?),
                        Err(e) => { consumer_error(&claim.key, &lane.inputs_topic, e)?; break; }
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            let tags = RecordTags {
                incarnation: claim.incarnation,
                epoch: claim.epoch,
                spec_version: lane.spec_version,
                lane: Lane::Live,
                position: None,
                run: None,
            };
            let catalog = lane.catalog.read().expect("catalog lock is never poisoned").clone();
            let mut encoded = Vec::new();
            for (offset, input) in &inputs {
                let records = lane.source.input_records(input).map_err(|why| ActivityError::Failed {
                    failure_type: FailureType::DataError,
                    message: format!("input at inputs-topic offset {offset} cannot be applied: {why}"),
                })?;
                for (i, (stream_name, data)) in records.into_iter().enumerate() {
                    // Inputs for a stream the pipeline does not read (a webhook relays
                    // every event) change nothing.
                    let Some(stream) = catalog.iter().find(|s| s.name == stream_name) else {
                        tracing::debug!(pipeline_id = %claim.key, offset, stream = %stream_name, "input for a stream not read; skipped");
                        continue;
                    };
                    let position = Position::of([Value::from(*offset), Value::from(i as i64)]);
                    let record = SourceRecord { data, position: position.clone() };
                    encoded.push(encode_record(stream, &record, position, &tags));
                }
            }
            producing = true;
            let produced = activities
                .run("produce-inputs", &cancel, || async {
                    producer.lock().await.produce(&lane.records_topic, &encoded).await
                })
                .await?;
            if let Some(end) = produced {
                crate::metrics::WORKER.produced(&claim.key, encoded.len() as u64, end);
            }
            let next = inputs.last().map_or(lane.after, |(o, _)| o + 1);
            activities
                .run("checkpoint", &never, || {
                    store::merge_checkpoint(&ctx.pool, &claim, json!({ "live_after": next }))
                })
                .await?;
            lane.after = next;
            // Inputs applied are deleted from the inputs topic (its lane reads from
            // `live_after` on, which never goes back).
            ctx.trimmer.below(&lane.inputs_topic, RECORDS_PARTITION, next);
        }
    }
    .await;
    // The feed is closed before the lane ends: lanes started next for this pipeline
    // open the same partition, and must not have it closed under them.
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    if let Err(e) = result {
        fail(e);
    }
}

/// A pushed input as stored in the inputs topic: its offset and the input.
fn pending_input(
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<(i64, Value), ActivityError> {
    let poison = |why: String| ActivityError::Failed {
        failure_type: FailureType::DataError,
        message: format!(
            "input at inputs-topic offset {} cannot be read: {why}",
            message.offset()
        ),
    };
    match ConnectorMessage::from_bytes(message.payload().unwrap_or_default()) {
        Ok(ConnectorMessage::SourceInput { source_input }) => Ok((message.offset(), source_input)),
        Ok(other) => Err(poison(format!("not a source input: {other:?}"))),
        Err(e) => Err(poison(e.to_string())),
    }
}

/// A record ready to be produced: key, connector-message payload and tags.
struct EncodedRecord {
    key: String,
    payload: Vec<u8>,
    tags: RecordTags,
}

fn encode_record(
    stream: &StreamSchema,
    record: &SourceRecord,
    position: Position,
    tags: &RecordTags,
) -> EncodedRecord {
    let key = stream
        .primary_key
        .iter()
        .map(|k| match record.data.get(k) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        })
        .collect::<Vec<_>>()
        .join("\u{1f}");
    EncodedRecord {
        key,
        payload: ConnectorMessage::record_bytes(&stream.name, &record.data, now_ms()),
        tags: RecordTags {
            position: Some(position),
            ..tags.clone()
        },
    }
}

/// The transactional producer of one lane of a pipeline incarnation. Its transactional
/// id names the incarnation, so the producer a new owner starts fences this one: Kafka
/// aborts its open transaction and refuses its later commits.
struct SliceProducer {
    ctx: Arc<WorkerContext>,
    transactional_id: String,
    producer: Option<FutureProducer>,
}

impl SliceProducer {
    /// `lane` names the lane ("read", "live"): each lane of an incarnation has its
    /// own transactional id, so the lanes never fence each other.
    fn new(ctx: Arc<WorkerContext>, claim: &sluice_connectors::Claim, lane: &str) -> Self {
        let transactional_id = format!(
            "{}.{lane}.{}.i{}",
            ctx.topic_namespace, claim.key, claim.incarnation
        );
        Self {
            ctx,
            transactional_id,
            producer: None,
        }
    }

    /// The producer, created and registered with the transaction coordinator first.
    async fn open(&mut self) -> Result<FutureProducer, ActivityError> {
        if let Some(p) = &self.producer {
            return Ok(p.clone());
        }
        let producer: FutureProducer = self
            .ctx
            .kafka
            .client_config()
            .set("transactional.id", &self.transactional_id)
            .set("enable.idempotence", "true")
            .set(
                "transaction.timeout.ms",
                TRANSACTION_TIMEOUT.as_millis().to_string(),
            )
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "5")
            // A topic deleted under the pipeline must not come back empty because a
            // late produce asked for it.
            .set("allow.auto.create.topics", "false")
            .create()?;
        let p = producer.clone();
        blocking(move || p.init_transactions(Duration::from_secs(30)))
            .await
            .map_err(kafka_transaction_error)?;
        self.producer = Some(producer.clone());
        Ok(producer)
    }

    /// Produces one slice in one transaction and returns the offset just past its last
    /// record (None for an empty slice). On any failure the transaction is aborted, so
    /// a retry produces the slice again from scratch.
    async fn produce(
        &mut self,
        topic: &str,
        records: &[EncodedRecord],
    ) -> Result<Option<i64>, ActivityError> {
        if records.is_empty() {
            return Ok(None);
        }
        let producer = self.open().await?;
        let p = producer.clone();
        if let Err(e) = blocking(move || p.begin_transaction()).await {
            return Err(self.failed(e).await);
        }
        match produce_in_order(&producer, topic, records).await {
            Ok(end) => {
                let p = producer.clone();
                match blocking(move || p.commit_transaction(Duration::from_secs(30))).await {
                    Ok(()) => Ok(Some(end)),
                    Err(e) => Err(self.failed(e).await),
                }
            }
            Err(e) => Err(self.failed(e).await),
        }
    }

    /// Aborts the open transaction after `e`; a producer that cannot go on (fenced, or
    /// in a fatal state) is dropped and made anew on the next attempt.
    async fn failed(&mut self, e: KafkaError) -> ActivityError {
        let error = kafka_transaction_error(e);
        if let Some(p) = self.producer.clone() {
            let aborted = blocking(move || p.abort_transaction(Duration::from_secs(10))).await;
            if aborted.is_err() || matches!(error, ActivityError::Fenced) {
                self.close();
            }
        }
        error
    }

    fn close(&mut self) {
        if let Some(p) = self.producer.take() {
            // Closing a librdkafka client blocks while its threads stop.
            tokio::task::spawn_blocking(move || drop(p));
        }
    }
}

impl Drop for SliceProducer {
    fn drop(&mut self) {
        self.close();
    }
}

/// Enqueues every record in order (waiting when the local queue is full, so that no
/// record overtakes another), then waits for all deliveries.
async fn produce_in_order(
    producer: &FutureProducer,
    topic: &str,
    records: &[EncodedRecord],
) -> Result<i64, KafkaError> {
    // Only the last delivery is awaited: with idempotence the partition keeps the
    // produce order, so its offset + 1 ends the slice, and the transaction's commit
    // fails unless every record of it was delivered.
    let mut last = None;
    for r in records {
        let mut record = FutureRecord::to(topic)
            .partition(RECORDS_PARTITION)
            .key(&r.key)
            .payload(&r.payload)
            .headers(r.tags.to_headers());
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    last = Some(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    match last {
        None => Ok(-1),
        Some(delivery) => match delivery.await {
            Ok(Ok(d)) => Ok(d.offset + 1),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(KafkaError::Canceled),
        },
    }
}

/// Runs a blocking librdkafka call (transactions block the calling thread).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

/// Fenced when a newer producer of the same transactional id took over; every other
/// Fenced when a newer producer of the same transactional id took over; every other
/// Kafka failure is retried.
fn kafka_transaction_error(e: KafkaError) -> ActivityError {
    let code = match &e {
        KafkaError::Transaction(t) => Some(t.code()),
        other => other.rdkafka_error_code(),
    };
    match code {
        Some(
            RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch,
        ) => ActivityError::Fenced,
        _ => ActivityError::transient(format!("kafka: {e}")),
    }
}

struct WriteLane {
    stages: Arc<Stages>,
    destination: Arc<dyn Destination>,
    topic: String,
    /// Shared with the read lane, which updates it when the source's shape changes.
    catalog: Arc<RwLock<Vec<StreamSchema>>>,
    records_start_offset: i64,
    spec_version: i64,
}

async fn write_lane(
    activities: Activities,
    lane: WriteLane,
    cancel: CancellationToken,
    events: LaneEvents,
    committed: watch::Sender<i64>,
) {
    let fail = failing(&events);
    let ctx = Arc::clone(activities.ctx());
    let claim = activities.claim().clone();
    let target = WriteTarget {
        claim: &claim,
        topic: &lane.topic,
        partition: RECORDS_PARTITION,
        spec_version: lane.spec_version,
    };
    // Taking the destination's bookkeeping over with this epoch first fences a
    // previous owner's write lane before this one reads where to start.
    let state = activities
        .run("read-offsets", &cancel, || {
            lane.destination
                .fence(&ctx.connectors, &target, lane.records_start_offset)
        })
        .await;
    let state = match state {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    committed.send_replace(state.next_offset);
    crate::metrics::WORKER.committed(&claim.key, state.next_offset);
    // Kafka keeps only what the destination has not committed yet (what was committed
    // before this lane started included).
    ctx.trimmer
        .below(&lane.topic, RECORDS_PARTITION, state.next_offset);
    let consumer = activities
        .run("open-records-consumer", &cancel, || async {
            Feed::open(
                &ctx.feeds,
                &lane.topic,
                RECORDS_PARTITION,
                state.next_offset,
            )
        })
        .await;
    let consumer = match consumer {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let result =
        consume_and_write(&activities, &lane, &target, &consumer, &cancel, &committed).await;
    // The feed is closed (unassigned, off the async threads: librdkafka answers the
    // call from its own thread) before the lane ends: lanes started next for this
    // pipeline open the same partition, and must not have it closed under them.
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    if let Err(e) = result {
        fail(e);
    }
}

/// The write loop; returns Ok when cancelled at a safe point. While a batch is being
/// written, the next one is consumed and decoded, so the destination's round trips
/// and the consumer's work overlap.
async fn consume_and_write(
    activities: &Activities,
    lane: &WriteLane,
    target: &WriteTarget<'_>,
    consumer: &Feed,
    cancel: &CancellationToken,
    committed: &watch::Sender<i64>,
) -> Result<(), ActivityError> {
    let ctx = activities.ctx();
    let id = target.claim.key.as_str();
    let batch_size = lane.destination.batch_size();
    // Batches get their room when records arrive: an idle lane holds none.
    let mut batch: Vec<PendingRecord> = Vec::new();
    let mut batch_bytes = 0;
    let mut batch_cap = batch_size;
    // The lane's part of the records budget for one batch and the next one, consumed
    // while the first is written; taken again for every batch. An idle lane holds none.
    let mut reservation = None;
    loop {
        let consuming = tokio::time::Instant::now();
        if batch.is_empty() {
            batch = Vec::new();
            // Safe point: no batch is open while waiting for the first record.
            let first = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                m = consumer.recv() => m,
            };
            match first {
                Ok(m) => take(&m, &mut batch, &mut batch_bytes)?,
                Err(e) => {
                    consumer_error(id, &lane.topic, e)?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        if reservation.is_none() {
            // Two batches of records the size of the first; a batch smaller than the
            // destination's size when two would take more than half the budget.
            let per_record =
                (batch_bytes.div_ceil(batch.len()) * crate::budget::MEMORY_FACTOR).max(1);
            batch_cap = batch_size.min(ctx.write_records.records_in_share(per_record));
            batch.reserve(batch_cap.saturating_sub(batch.len()));
            let guess = 2 * batch_cap * per_record;
            match ctx.write_records.reserve(guess, cancel).await {
                Ok(r) => reservation = Some(r),
                Err(ActivityError::Cancelled) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        let deadline = tokio::time::Instant::now() + BATCH_MAX_WAIT;
        while batch.len() < batch_cap {
            // Records already fetched are taken without arming a timer.
            match consumer.recv().now_or_never() {
                Some(Ok(m)) => {
                    take(&m, &mut batch, &mut batch_bytes)?;
                    continue;
                }
                Some(Err(e)) => {
                    consumer_error(id, &lane.topic, e)?;
                    break;
                }
                None => {}
            }
            let linger = deadline.min(tokio::time::Instant::now() + BATCH_LINGER);
            tokio::select! {
                biased;
                m = consumer.recv() => match m {
                    Ok(m) => take(&m, &mut batch, &mut batch_bytes)?,
                    Err(e) => {
                        consumer_error(id, &lane.topic, e)?;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(linger) => break,
            }
        }
        Stages::add(&lane.stages.consume, consuming);
        // Now that the batch's size is known: room for it and one more like it.
        if let Some(r) = reservation.as_mut() {
            match r
                .resize(2 * batch_bytes * crate::budget::MEMORY_FACTOR, cancel)
                .await
            {
                Ok(()) => {}
                Err(ActivityError::Cancelled) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        let writing = tokio::time::Instant::now();
        // Rows and offset commit atomically; cancelling mid-attempt rolls the
        // transaction back, and the batch is read again from the stored offset.
        let mut next = Vec::new();
        let mut next_bytes = 0;
        // A failing attempt gives the lane's part of the budget back: a destination
        // that keeps failing must not hold it through its retries while the other
        // lanes wait for it.
        let held = std::sync::Mutex::new(reservation.take());
        let written = {
            // Boxed: the lane's future would otherwise keep a write's size while idle.
            let mut write = Box::pin(activities.run("write-batch", cancel, || async {
                let catalog = lane
                    .catalog
                    .read()
                    .expect("catalog lock is never poisoned")
                    .clone();
                let result = lane
                    .destination
                    .write(&ctx.connectors, target, &catalog, &batch)
                    .await;
                if result.is_err() {
                    drop(held.lock().unwrap_or_else(|e| e.into_inner()).take());
                }
                result
            }));
            loop {
                tokio::select! {
                    biased;
                    r = &mut write => break r,
                    m = consumer.recv(), if next.len() < batch_cap => match m {
                        Ok(m) => take(&m, &mut next, &mut next_bytes)?,
                        Err(e) => consumer_error(id, &lane.topic, e)?,
                    },
                }
            }
        };
        Stages::add(&lane.stages.write, writing);
        match written {
            Ok(written) => {
                committed.send_replace(written.next_offset);
                ctx.trimmer
                    .below(&lane.topic, RECORDS_PARTITION, written.next_offset);
                crate::metrics::WORKER.committed(&target.claim.key, written.next_offset);
                crate::metrics::WORKER.written(&target.claim.key, written.records.len() as u64);
                // Runs count what they wrote (a metric: best effort).
                let mut per_run: std::collections::BTreeMap<i64, i64> = Default::default();
                for i in &written.records {
                    if let Some(run) = batch[*i].tags.as_ref().and_then(|t| t.run) {
                        *per_run.entry(run).or_default() += 1;
                    }
                }
                for (run, n) in per_run {
                    let _ = store::count_run(&ctx.pool, target.claim, run, 0, n).await;
                }
            }
            Err(ActivityError::Cancelled) => return Ok(()),
            Err(e) => return Err(e),
        }
        // Back in line for the next batch: lanes with long backlogs take turns.
        drop(held);
        batch = next;
        batch_bytes = next_bytes;
    }
}

/// Decodes a fetched record onto `batch`, counting its encoded bytes.
fn take(
    message: &rdkafka::message::BorrowedMessage<'_>,
    batch: &mut Vec<PendingRecord>,
    bytes: &mut usize,
) -> Result<(), ActivityError> {
    batch.push(pending_record(message)?);
    *bytes += message.payload_len() + message.key_len();
    Ok(())
}

/// A consumer error is logged and retried, except one that means the topic does not
/// hold what the destination committed (deleted and created again, truncated): that
/// is refused, never papered over by starting somewhere else.
fn consumer_error(pipeline_id: &str, topic: &str, e: KafkaError) -> Result<(), ActivityError> {
    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) {
        return Err(ActivityError::Invariant(format!(
            "records topic {topic} does not hold the offset the destination committed \
             (deleted or created again?): {e}"
        )));
    }
    tracing::warn!(pipeline_id, error = %e, "records consumer error");
    Ok(())
}

fn pending_record(
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<PendingRecord, ActivityError> {
    let poison = |why: String| ActivityError::Failed {
        failure_type: FailureType::DataError,
        message: format!(
            "record at records-topic offset {} cannot be read: {why}",
            message.offset()
        ),
    };
    let tags = RecordTags::from_headers(message.headers()).map_err(poison)?;
    let payload = message.payload().unwrap_or_default();
    match ConnectorMessage::record_from_bytes(payload) {
        Ok(Ok(record)) => Ok(PendingRecord {
            offset: message.offset(),
            stream: record.stream,
            tags,
            data: record.data,
        }),
        Ok(Err(other)) => Err(poison(format!("not a record message: {other:?}"))),
        Err(e) => Err(poison(e.to_string())),
    }
}
