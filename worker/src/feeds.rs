//! One Kafka consumer per worker for every records and inputs topic its pipelines
//! read, whatever their number. Each lane that reads a topic opens a [`Feed`]: the
//! topic's partition is split off the shared consumer into a queue of its own (so
//! librdkafka itself routes each partition's records, and errors such as an offset the
//! topic no longer holds, to that lane alone) and added to the consumer's assignment at
//! the lane's start offset; dropping the feed takes it out again.
//!
//! Memory is bounded per partition by the consumer's pre-fetch window (from the
//! records budget, crate::budget): a lane that is
//! busy writing leaves its queue full and librdkafka stops fetching that partition. A
//! lane that is not running holds no partition. Offsets are never committed to Kafka:
//! they live in the destination, so the consumer joins no group.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{Consumer, DefaultConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use sluice_infra::kafka::KafkaSettings;

use crate::activity::ActivityError;

pub type SharedConsumer = Arc<StreamConsumer>;

/// The worker's consumer for lane feeds. `worker_id` names its (never joined) group.
pub fn shared_consumer(
    kafka: &KafkaSettings,
    worker_id: &str,
    window_kib: u64,
) -> Result<SharedConsumer, KafkaError> {
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", format!("sluice-lanes-{worker_id}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Backfill slices are transactions: only committed ones are written.
        .set("isolation.level", "read_committed")
        // An offset the topic does not have is an error, not a silent jump.
        .set("auto.offset.reset", "error")
        .set("allow.auto.create.topics", "false")
        .set("enable.partition.eof", "false")
        // Per partition (each is a queue of its own): what a lane may have fetched
        // ahead of its writes.
        .set("queued.max.messages.kbytes", window_kib.to_string())
        // An idle partition costs one entry of a fetch request every half second;
        // records that arrive are returned at once, whatever this is.
        .set("fetch.wait.max.ms", "500")
        // With so small a queue, the default backoff (1 s) after the queue fills would
        // stall a backlog's consumption for a second each time it does.
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let consumer = Arc::new(consumer);
    // Every assigned partition has a queue of its own; the main queue must still be
    // served (events, errors that concern no partition).
    let main = Arc::clone(&consumer);
    tokio::spawn(async move {
        let mut last_warning: Option<tokio::time::Instant> = None;
        loop {
            match main.recv().await {
                // A partition's leftovers after its feed was dropped: its lane is gone,
                // and whoever reads it next starts from the destination's offset.
                Ok(m) => tracing::debug!(
                    topic = m.topic(),
                    offset = m.offset(),
                    "record of a closed feed dropped"
                ),
                Err(e) => {
                    let now = tokio::time::Instant::now();
                    if last_warning.is_none_or(|t| now - t > Duration::from_secs(10)) {
                        last_warning = Some(now);
                        tracing::warn!(error = %e, "lane consumer error");
                    }
                }
            }
        }
    });
    Ok(consumer)
}

/// One lane's view of one topic partition of the shared consumer. At most one feed
/// per partition may be open: the partition queue and the assignment are the
/// consumer's, so a feed dropped after another was opened for the same partition would
/// close that one's. Lanes close their feed before they end.
pub struct Feed {
    queue: StreamPartitionQueue<DefaultConsumerContext>,
    consumer: SharedConsumer,
    topic: String,
    partition: i32,
}

impl Feed {
    /// Starts reading `partition` of `topic` at `start`.
    pub fn open(
        consumer: &SharedConsumer,
        topic: &str,
        partition: i32,
        start: i64,
    ) -> Result<Self, ActivityError> {
        // Split first, so that nothing of the partition lands in the main queue.
        let queue = consumer
            .split_partition_queue(topic, partition)
            .ok_or_else(|| {
                ActivityError::transient(format!("no queue for {topic} [{partition}]"))
            })?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(start.max(0)))?;
        consumer.incremental_assign(&assignment)?;
        Ok(Self {
            queue,
            consumer: Arc::clone(consumer),
            topic: topic.to_owned(),
            partition,
        })
    }

    pub async fn recv(&self) -> Result<BorrowedMessage<'_>, KafkaError> {
        self.queue.recv().await
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition(&self.topic, self.partition);
        if let Err(e) = self.consumer.incremental_unassign(&assignment) {
            tracing::warn!(topic = %self.topic, error = %e, "could not close a lane feed");
        }
    }
}
