//! The data lanes of an ACTIVE pipeline: the backfill lane (source slices → records
//! topic, each slice in one Kafka transaction, the stream's position persisted only
//! after the transaction committed) and the write lane (records topic → destination,
//! rows and offsets committed together). Both stop at a safe point when their
//! cancellation token fires. The lanes know connectors only by their traits.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use sluice_connectors::records::{Lane, PendingRecord, RecordTags};
use sluice_connectors::{Destination, ReadMode, Source, SourceRecord, WriteTarget};
use sluice_protocol::catalog::StreamSchema;
use sluice_protocol::message::{ConnectorMessage, FailureType};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::activity::ActivityError;
use crate::claim::Activities;
use crate::store::{save_checkpoint, Checkpoint};
use crate::WorkerContext;

/// Records topics have one partition: ordering per pipeline is total, and the
/// destination offset bookkeeping stays a single row.
pub const RECORDS_PARTITION: i32 = 0;

/// How long the write lane waits for the next record of a batch before writing what it
/// has: a batch fills while records keep arriving...
const BATCH_LINGER: Duration = Duration::from_millis(50);
/// ... for at most this long after its first record.
const BATCH_MAX_WAIT: Duration = Duration::from_secs(1);

/// Longest a backfill transaction may stay open before the broker aborts it: bounds
/// how long a stopped owner's open transaction can hold back the write lane (which
/// reads committed records only).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

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
    pub source: Arc<dyn Source>,
    pub destination: Arc<dyn Destination>,
    pub checkpoint: Checkpoint,
    /// The records topic setup created.
    pub topic: String,
}

impl Lanes {
    /// Starts the lanes; their events are tagged with `seq`.
    pub fn start(
        activities: Activities,
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
        let write = WriteLane {
            destination: params.destination,
            topic: params.topic.clone(),
            catalog: params.checkpoint.catalog.clone(),
            records_start_offset: params.checkpoint.records_start_offset,
            spec_version: params.checkpoint.spec_version,
        };
        let backfill = tokio::spawn(backfill_lane(
            activities.clone(),
            BackfillLane {
                source: params.source,
                topic: params.topic,
                checkpoint: params.checkpoint,
            },
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
    source: Arc<dyn Source>,
    topic: String,
    checkpoint: Checkpoint,
}

/// Reads every stream of the catalog after its checkpointed position, slice by slice;
/// each slice goes to the records topic in one transaction, and the stream's position
/// is saved only once the transaction committed.
async fn backfill_lane(
    activities: Activities,
    mut lane: BackfillLane,
    cancel: CancellationToken,
    events: mpsc::UnboundedSender<LaneEvent>,
) {
    if lane.checkpoint.backfill_done {
        return;
    }
    let fail = |e: ActivityError| {
        if !matches!(e, ActivityError::Cancelled) {
            let _ = events.send(LaneEvent::Failed(e));
        }
    };
    let claim = activities.claim().clone();
    let ctx = Arc::clone(activities.ctx());
    // One producer for the lane's life; the mutex only lets the retried activity
    // closure reach it.
    let producer = tokio::sync::Mutex::new(SliceProducer::new(Arc::clone(&ctx), &claim));
    let never = CancellationToken::new();
    let save = |checkpoint: Checkpoint| {
        let (activities, ctx, claim, never) = (&activities, &ctx, &claim, &never);
        async move {
            // Not cancellable: a committed slice is always recorded.
            activities
                .run("checkpoint", never, || {
                    save_checkpoint(&ctx.pool, claim, &checkpoint)
                })
                .await
        }
    };
    for stream in lane.checkpoint.catalog.clone() {
        let mut progress = lane.checkpoint.progress(&stream.name);
        if progress.backfill_done {
            continue;
        }
        if !progress.sync_started {
            // Where the first sync starts, taken before the backfill reads anything,
            // so changes made while it runs are synced afterwards.
            let start = activities
                .run("sync-start", &cancel, || {
                    lane.source.sync_start(&ctx.connectors, &stream)
                })
                .await;
            progress.sync_after = match start {
                Ok(start) => start,
                Err(e) => return fail(e),
            };
            progress.sync_started = true;
            lane.checkpoint
                .streams
                .insert(stream.name.clone(), progress.clone());
            if let Err(e) = save(lane.checkpoint.clone()).await {
                return fail(e);
            }
        }
        while !progress.backfill_done {
            // Safe point: between slices nothing is in flight.
            if cancel.is_cancelled() {
                return;
            }
            // A worker that lost the pipeline must not produce another slice. (Should
            // it still, its transaction is fenced once the new owner's producer
            // starts, and the write lane drops a replayed slice.)
            if let Err(e) = activities
                .run("check-owner", &cancel, || {
                    crate::store::check_epoch(&ctx.pool, &claim)
                })
                .await
            {
                return fail(e);
            }
            let slice_started = tokio::time::Instant::now();
            let slice = activities
                .run("read-slice", &cancel, || {
                    lane.source.read(
                        &ctx.connectors,
                        &stream,
                        ReadMode::Backfill,
                        progress.backfill_after.as_ref(),
                        lane.source.slice_size(),
                    )
                })
                .await;
            let slice = match slice {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            let tags = RecordTags {
                incarnation: claim.incarnation,
                epoch: claim.epoch,
                spec_version: lane.checkpoint.spec_version,
                lane: Lane::Backfill,
                position: None,
            };
            let encoded: Vec<EncodedRecord> = slice
                .records
                .iter()
                .map(|r| encode_record(&stream, r, &tags))
                .collect();
            let produced = activities
                .run("produce-slice", &cancel, || async {
                    producer.lock().await.produce(&lane.topic, &encoded).await
                })
                .await;
            let end_offset = match produced {
                Ok(end) => end,
                Err(e) => return fail(e),
            };
            if let Some(last) = slice.records.last() {
                progress.backfill_after = Some(last.position.clone());
            }
            progress.backfill_done = slice.done;
            let mut checkpoint = lane.checkpoint.clone();
            checkpoint
                .streams
                .insert(stream.name.clone(), progress.clone());
            if let Some(end) = end_offset {
                checkpoint.backfill_end_offset = checkpoint.backfill_end_offset.max(end);
            }
            if let Err(e) = save(checkpoint.clone()).await {
                return fail(e);
            }
            lane.checkpoint = checkpoint;
            if !progress.backfill_done {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(slice_started + lane.source.pace(slice.records.len())) => {}
                }
            }
        }
    }
    lane.checkpoint.backfill_done = true;
    if let Err(e) = save(lane.checkpoint.clone()).await {
        return fail(e);
    }
    tracing::info!(pipeline_id = %claim.key, "backfill produced every record");
    let _ = events.send(LaneEvent::BackfillDone(lane.checkpoint));
}

/// A record ready to be produced: key, connector-message payload and tags.
struct EncodedRecord {
    key: String,
    payload: Vec<u8>,
    tags: RecordTags,
}

fn encode_record(stream: &StreamSchema, record: &SourceRecord, tags: &RecordTags) -> EncodedRecord {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let key = stream
        .primary_key
        .iter()
        .map(|k| match record.data.get(k) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        })
        .collect::<Vec<_>>()
        .join("\u{1f}");
    EncodedRecord {
        key,
        payload: ConnectorMessage::record(&stream.name, record.data.clone(), now_ms).to_bytes(),
        tags: RecordTags {
            position: Some(record.position.clone()),
            ..tags.clone()
        },
    }
}

/// The transactional producer of one pipeline incarnation's backfill. Its
/// transactional id names the incarnation, so the producer a new owner starts fences
/// this one: Kafka aborts its open transaction and refuses its later commits.
struct SliceProducer {
    ctx: Arc<WorkerContext>,
    transactional_id: String,
    producer: Option<FutureProducer>,
}

impl SliceProducer {
    fn new(ctx: Arc<WorkerContext>, claim: &sluice_connectors::Claim) -> Self {
        let transactional_id = format!(
            "{}.backfill.{}.i{}",
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
    let mut deliveries = Vec::with_capacity(records.len());
    for r in records {
        let mut record = FutureRecord::to(topic)
            .partition(RECORDS_PARTITION)
            .key(&r.key)
            .payload(&r.payload)
            .headers(r.tags.to_headers());
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
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
    let mut end = -1;
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(d)) => end = end.max(d.offset + 1),
            Ok(Err((e, _))) => return Err(e),
            Err(_) => return Err(KafkaError::Canceled),
        }
    }
    Ok(end)
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
    destination: Arc<dyn Destination>,
    topic: String,
    catalog: Vec<StreamSchema>,
    records_start_offset: i64,
    spec_version: i64,
}

async fn write_lane(
    activities: Activities,
    lane: WriteLane,
    cancel: CancellationToken,
    events: mpsc::UnboundedSender<LaneEvent>,
    committed: watch::Sender<i64>,
) {
    let fail = |e: ActivityError| {
        if !matches!(e, ActivityError::Cancelled) {
            let _ = events.send(LaneEvent::Failed(e));
        }
    };
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
    let consumer = activities
        .run("open-records-consumer", &cancel, || async {
            records_consumer(&ctx, &lane.topic, state.next_offset)
        })
        .await;
    let consumer = match consumer {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let result =
        consume_and_write(&activities, &lane, &target, &consumer, &cancel, &committed).await;
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
    activities: &Activities,
    lane: &WriteLane,
    target: &WriteTarget<'_>,
    consumer: &StreamConsumer,
    cancel: &CancellationToken,
    committed: &watch::Sender<i64>,
) -> Result<(), ActivityError> {
    let ctx = activities.ctx();
    let id = target.claim.key.as_str();
    let batch_size = lane.destination.batch_size();
    loop {
        // Safe point: no batch is open while waiting for the first record.
        let first = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = consumer.recv() => m,
        };
        let mut batch = Vec::with_capacity(batch_size);
        match first {
            Ok(m) => batch.push(pending_record(&m)?),
            Err(e) => {
                consumer_error(id, &lane.topic, e)?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let deadline = tokio::time::Instant::now() + BATCH_MAX_WAIT;
        while batch.len() < batch_size {
            let linger = deadline.min(tokio::time::Instant::now() + BATCH_LINGER);
            tokio::select! {
                biased;
                m = consumer.recv() => match m {
                    Ok(m) => batch.push(pending_record(&m)?),
                    Err(e) => {
                        consumer_error(id, &lane.topic, e)?;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(linger) => break,
            }
        }
        // Rows and offset commit atomically; cancelling mid-attempt rolls the
        // transaction back, and the batch is read again from the stored offset.
        let written = activities
            .run("write-batch", cancel, || {
                lane.destination
                    .write(&ctx.connectors, target, &lane.catalog, &batch)
            })
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
    match ConnectorMessage::from_bytes(payload) {
        Ok(ConnectorMessage::Record { record }) => Ok(PendingRecord {
            offset: message.offset(),
            stream: record.stream,
            tags,
            data: record.data,
        }),
        Ok(other) => Err(poison(format!("not a record message: {other:?}"))),
        Err(e) => Err(poison(e.to_string())),
    }
}

fn records_consumer(
    ctx: &WorkerContext,
    topic: &str,
    start: i64,
) -> Result<StreamConsumer, ActivityError> {
    // Offsets live in the destination, never in Kafka: this consumer is assigned its
    // partition by hand, never joins a group and never commits. librdkafka still wants
    // a group.id for a consumer handle.
    let consumer: StreamConsumer = ctx
        .kafka
        .client_config()
        .set("group.id", format!("sluice-writer-{topic}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Backfill slices are transactions: only committed ones are written.
        .set("isolation.level", "read_committed")
        // An offset the topic does not have is an error, not a silent jump.
        .set("auto.offset.reset", "error")
        .set("allow.auto.create.topics", "false")
        .set("enable.partition.eof", "false")
        // The default pre-fetch buffer (64 MiB per consumer) is far too much for a
        // worker that runs many pipelines.
        .set("queued.max.messages.kbytes", "2048")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, RECORDS_PARTITION, Offset::Offset(start.max(0)))?;
    consumer.assign(&assignment)?;
    Ok(consumer)
}
