//! The data lanes of an ACTIVE pipeline: the backfill lane (source slices → records
//! topic, cursor persisted only after Kafka acknowledged the slice) and the write lane
//! (records topic → destination, rows and offsets committed together). Both stop at a
//! safe point when their cancellation token fires.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use sluice_protocol::catalog::{generator_stream, StreamSchema};
use sluice_protocol::message::ConnectorMessage;
use sluice_protocol::spec::{
    DestinationConfig, GeneratorConfig, PostgresDestinationConfig, SourceConfig, ValidatedSpec,
};
use sluice_protocol::topics::records_topic;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::activity::{run_activity, ActivityError};
use crate::connectors::generator;
use crate::connectors::postgres::{self as pg, BatchTarget, PendingRecord};
use crate::store::{save_checkpoint, Checkpoint};
use crate::WorkerContext;

/// Records topics have one partition: ordering per pipeline is total, and the
/// destination offset bookkeeping stays a single row.
pub const RECORDS_PARTITION: i32 = 0;

/// How long the write lane waits to fill a batch after its first record.
const BATCH_LINGER: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub enum LaneEvent {
    BackfillDone(Checkpoint),
    Failed(ActivityError),
}

/// Running lanes of one pipeline.
pub struct Lanes {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Next records-topic offset the destination has committed (-1 until known).
    pub committed: watch::Receiver<i64>,
}

pub struct LaneParams {
    pub pipeline_id: String,
    pub epoch: i64,
    pub spec: ValidatedSpec,
    pub checkpoint: Checkpoint,
    /// When the pipeline was created: rows of a newer pipeline incarnation win over
    /// an older one's in a kept destination table, whatever their offsets.
    pub incarnation: std::time::SystemTime,
}

impl Lanes {
    /// Starts the lanes; their events are tagged with `seq`.
    pub fn start(
        ctx: Arc<WorkerContext>,
        params: LaneParams,
        seq: u64,
        events: mpsc::UnboundedSender<(u64, LaneEvent)>,
    ) -> Self {
        let (lane_tx, mut lane_rx) = mpsc::unbounded_channel();
        let forward = tokio::spawn(async move {
            while let Some(event) = lane_rx.recv().await {
                if events.send((seq, event)).is_err() {
                    return;
                }
            }
        });
        let events = lane_tx;
        let cancel = CancellationToken::new();
        let (committed_tx, committed) = watch::channel(-1);
        let topic = records_topic(&params.pipeline_id);
        let SourceConfig::Generator(source) = params.spec.source.clone();
        let DestinationConfig::Postgres(destination) = params.spec.destination.clone();
        let stream = generator_stream();
        let records_start_offset = params.checkpoint.records_start_offset;

        let backfill = tokio::spawn(backfill_lane(
            Arc::clone(&ctx),
            BackfillLane {
                pipeline_id: params.pipeline_id.clone(),
                epoch: params.epoch,
                topic: topic.clone(),
                source,
                checkpoint: params.checkpoint,
            },
            cancel.clone(),
            events.clone(),
        ));
        let write = tokio::spawn(write_lane(
            ctx,
            WriteLane {
                pipeline_id: params.pipeline_id,
                epoch: params.epoch,
                topic,
                destination,
                stream,
                records_start_offset,
                incarnation: params.incarnation,
            },
            cancel.clone(),
            events,
            committed_tx,
        ));
        Self {
            cancel,
            tasks: vec![backfill, write, forward],
            committed,
        }
    }

    /// Stops both lanes at their next safe point and waits for them.
    pub async fn stop(self) {
        self.cancel.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

struct BackfillLane {
    pipeline_id: String,
    epoch: i64,
    topic: String,
    source: GeneratorConfig,
    checkpoint: Checkpoint,
}

async fn backfill_lane(
    ctx: Arc<WorkerContext>,
    mut lane: BackfillLane,
    cancel: CancellationToken,
    events: mpsc::UnboundedSender<LaneEvent>,
) {
    if lane.checkpoint.backfill_done {
        return;
    }
    let id = lane.pipeline_id.clone();
    loop {
        // Safe point: between slices nothing is in flight.
        if cancel.is_cancelled() {
            return;
        }
        // A worker that lost the pipeline must not produce another slice (Kafka writes
        // are not fenced by the epoch, so check before each one).
        let owned = run_activity(
            "check-owner",
            &id,
            &ctx.retry,
            ctx.attempt_timeout,
            &cancel,
            || crate::store::check_epoch(&ctx.pool, &id, lane.epoch),
        )
        .await;
        match owned {
            Ok(()) => {}
            Err(ActivityError::Cancelled) => return,
            Err(e) => {
                let _ = events.send(LaneEvent::Failed(e));
                return;
            }
        }
        let slice_started = tokio::time::Instant::now();
        let (records, next_cursor) = generator::read_slice(&lane.source, lane.checkpoint.cursor);
        let pace = generator::slice_duration(&lane.source, records.len());
        let produced = run_activity(
            "read-slice",
            &id,
            &ctx.retry,
            ctx.attempt_timeout,
            &cancel,
            || produce_slice(&ctx, &lane.topic, &records),
        )
        .await;
        let end_offset = match produced {
            Ok(end) => end,
            Err(ActivityError::Cancelled) => return,
            Err(e) => {
                let _ = events.send(LaneEvent::Failed(e));
                return;
            }
        };
        let mut checkpoint = lane.checkpoint.clone();
        checkpoint.cursor = next_cursor;
        if let Some(end) = end_offset {
            checkpoint.backfill_end_offset = checkpoint.backfill_end_offset.max(end);
        }
        checkpoint.backfill_done = next_cursor >= lane.source.count;
        // The cursor moves only now that Kafka has acknowledged the whole slice. The
        // save is not cancellable: an acknowledged slice is always recorded.
        let never = CancellationToken::new();
        let saved = run_activity(
            "checkpoint",
            &id,
            &ctx.retry,
            ctx.attempt_timeout,
            &never,
            || save_checkpoint(&ctx.pool, &id, lane.epoch, &checkpoint),
        )
        .await;
        if let Err(e) = saved {
            let _ = events.send(LaneEvent::Failed(e));
            return;
        }
        lane.checkpoint = checkpoint;
        if !lane.checkpoint.backfill_done {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(slice_started + pace) => {}
            }
        }
        if lane.checkpoint.backfill_done {
            tracing::info!(pipeline_id = %id, records = lane.source.count, "backfill produced every record");
            let _ = events.send(LaneEvent::BackfillDone(lane.checkpoint));
            return;
        }
    }
}

/// Produces one slice and waits for every acknowledgement; returns the offset just
/// past the last record (None for an empty slice).
async fn produce_slice(
    ctx: &WorkerContext,
    topic: &str,
    records: &[serde_json::Map<String, serde_json::Value>],
) -> Result<Option<i64>, ActivityError> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let encoded: Vec<(String, Vec<u8>)> = records
        .iter()
        .map(|r| {
            let key = r.get("id").map(|v| v.to_string()).unwrap_or_default();
            let payload = ConnectorMessage::record("records", r.clone(), now_ms).to_bytes();
            (key, payload)
        })
        .collect();
    let sends = encoded.iter().map(|(key, payload)| {
        ctx.producer.send(
            FutureRecord::to(topic)
                .partition(RECORDS_PARTITION)
                .key(key)
                .payload(payload),
            Timeout::After(Duration::from_secs(30)),
        )
    });
    let mut end = None;
    for result in futures::future::join_all(sends).await {
        let delivery = result.map_err(|(e, _)| ActivityError::from(e))?;
        end = end.max(Some(delivery.offset + 1));
    }
    Ok(end)
}

struct WriteLane {
    pipeline_id: String,
    epoch: i64,
    topic: String,
    destination: PostgresDestinationConfig,
    stream: StreamSchema,
    records_start_offset: i64,
    incarnation: std::time::SystemTime,
}

impl WriteLane {
    fn target(&self) -> BatchTarget<'_> {
        BatchTarget {
            pipeline_id: &self.pipeline_id,
            topic: &self.topic,
            partition: RECORDS_PARTITION,
            epoch: self.epoch,
            incarnation: self.incarnation,
        }
    }
}

async fn write_lane(
    ctx: Arc<WorkerContext>,
    lane: WriteLane,
    cancel: CancellationToken,
    events: mpsc::UnboundedSender<LaneEvent>,
    committed: watch::Sender<i64>,
) {
    let id = lane.pipeline_id.as_str();
    let fail = |e: ActivityError| {
        if !matches!(e, ActivityError::Cancelled) {
            let _ = events.send(LaneEvent::Failed(e));
        }
    };
    let pool = match ctx.destinations.get(&lane.destination.url) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let target = lane.target();
    let start = run_activity(
        "read-offsets",
        id,
        &ctx.retry,
        ctx.attempt_timeout,
        &cancel,
        // Taking the offsets row over with this epoch first fences a previous owner's
        // write lane before this one reads where to start.
        || pg::fence_offsets(&pool, &lane.destination, &target),
    )
    .await;
    let start = match start {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    committed.send_replace(start.unwrap_or(0));
    let start = start
        .max(Some(lane.records_start_offset))
        .filter(|s| *s > 0);

    let consumer = match records_consumer(&ctx, &lane, start) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let result = consume_and_write(&ctx, &lane, &consumer, &pool, &cancel, &committed).await;
    // Closing a consumer blocks while librdkafka stops its threads. The lane has
    // already stopped writing, so close it off the async threads and let a pause
    // complete without waiting for it.
    tokio::task::spawn_blocking(move || drop(consumer));
    if let Err(e) = result {
        fail(e);
    }
}

/// The write loop; returns Ok when cancelled at a safe point.
async fn consume_and_write(
    ctx: &WorkerContext,
    lane: &WriteLane,
    consumer: &StreamConsumer,
    pool: &sqlx::PgPool,
    cancel: &CancellationToken,
    committed: &watch::Sender<i64>,
) -> Result<(), ActivityError> {
    let id = lane.pipeline_id.as_str();
    let target = lane.target();
    let batch_size = lane.destination.batch_size as usize;
    loop {
        // Safe point: no batch is open while waiting for the first record.
        let first = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = consumer.recv() => m,
        };
        let mut batch = Vec::with_capacity(batch_size);
        match first {
            Ok(m) => push_record(&mut batch, &m, lane.records_start_offset),
            Err(e) => {
                tracing::warn!(pipeline_id = id, error = %e, "records consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let linger = tokio::time::sleep(BATCH_LINGER);
        tokio::pin!(linger);
        while batch.len() < batch_size {
            tokio::select! {
                _ = &mut linger => break,
                m = consumer.recv() => match m {
                    Ok(m) => push_record(&mut batch, &m, lane.records_start_offset),
                    Err(_) => break,
                },
            }
        }
        if batch.is_empty() {
            continue;
        }
        // Rows and offset commit atomically; cancelling mid-attempt rolls the
        // transaction back, and the batch is read again from the stored offset.
        let written = run_activity(
            "write-batch",
            id,
            &ctx.retry,
            ctx.attempt_timeout,
            cancel,
            || pg::write_batch(pool, &lane.destination, &lane.stream, &target, &batch),
        )
        .await;
        match written {
            Ok(next) => {
                committed.send_replace(next);
            }
            Err(ActivityError::Cancelled) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn push_record(
    batch: &mut Vec<PendingRecord>,
    message: &rdkafka::message::BorrowedMessage<'_>,
    records_start_offset: i64,
) {
    // Records an earlier spec left in the topic are not this spec's data.
    if message.offset() < records_start_offset {
        return;
    }
    let Some(payload) = message.payload() else {
        return;
    };
    match ConnectorMessage::from_bytes(payload) {
        Ok(ConnectorMessage::Record { record }) => batch.push(PendingRecord {
            offset: message.offset(),
            data: record.data,
        }),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(offset = message.offset(), error = %e, "skipping undecodable record")
        }
    }
}

fn records_consumer(
    ctx: &WorkerContext,
    lane: &WriteLane,
    start: Option<i64>,
) -> Result<StreamConsumer, ActivityError> {
    // Offsets live in the destination, never in Kafka: this consumer is assigned its
    // partition by hand, never joins a group and never commits. librdkafka still wants
    // a group.id for a consumer handle.
    let consumer: StreamConsumer = ctx
        .kafka
        .client_config()
        .set("group.id", format!("sluice-writer-{}", lane.pipeline_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // The default pre-fetch buffer (64 MiB per consumer) is far too much for a
        // worker that runs many pipelines.
        .set("queued.max.messages.kbytes", "2048")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    let offset = start.map_or(Offset::Beginning, Offset::Offset);
    assignment.add_partition_offset(&lane.topic, RECORDS_PARTITION, offset)?;
    consumer.assign(&assignment)?;
    Ok(consumer)
}
