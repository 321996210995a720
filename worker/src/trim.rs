//! Deleting from Kafka what was applied: the records a destination committed (records
//! topics) and the inputs a live lane turned into records (inputs topics). One task per
//! worker does it for every pipeline: a lane says how far its topic may be trimmed, and
//! the task trims every topic asked for in one DeleteRecords request, a few seconds
//! after the first ask (so a busy lane costs one request per interval, and an idle
//! pipeline costs nothing).
//!
//! Safe because every reader of a records topic starts at the destination's committed
//! offset or later (a new owner, a resumed or changed pipeline), and that offset never
//! goes back; a live lane reads its inputs topic from the input after the last one it
//! applied, which never goes back either. A stale owner can only ask for less than
//! the real one has committed. A topic deleted meanwhile (its pipeline was) is
//! forgotten.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;
use sluice_infra::kafka::Admin;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long asks gather before a request, at least.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// What the worker is asked to trim: topic and partition → delete below this offset.
#[derive(Debug, Default)]
pub struct Trimmer {
    asked: Mutex<HashMap<(String, i32), i64>>,
    wake: Notify,
}

impl Trimmer {
    /// Asks for the records of `topic`'s `partition` below `offset` to be deleted.
    pub fn below(&self, topic: &str, partition: i32, offset: i64) {
        if offset > 0 {
            self.ask(topic.to_owned(), partition, offset);
        }
    }

    fn ask(&self, topic: String, partition: i32, offset: i64) {
        let mut asked = self.lock();
        let at = asked.entry((topic, partition)).or_insert(0);
        *at = (*at).max(offset);
        drop(asked);
        self.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), i64>> {
        self.asked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Trims what is asked for until `stop`.
    pub async fn run(&self, admin: Admin, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(TRIM_INTERVAL) => {}
            }
            let due: Vec<(String, i32, i64)> = std::mem::take(&mut *self.lock())
                .into_iter()
                .map(|((topic, partition), offset)| (topic, partition, offset))
                .collect();
            if due.is_empty() {
                continue;
            }
            let failed = match admin.delete_records_before(&due).await {
                Ok(failed) => failed,
                Err(e) => {
                    tracing::warn!(topics = due.len(), error = %e, "could not delete applied records from Kafka; will retry");
                    for (topic, partition, offset) in due {
                        self.ask(topic, partition, offset);
                    }
                    continue;
                }
            };
            for (topic, partition, offset) in due {
                let failure = failed
                    .iter()
                    .find(|(t, p, _)| *t == topic && *p == partition)
                    .map(|(_, _, code)| *code);
                match failure {
                    None => {
                        tracing::debug!(
                            topic,
                            before = offset,
                            "applied records deleted from Kafka"
                        )
                    }
                    // The pipeline was deleted, and its topics with it.
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {}
                    Some(code) => {
                        tracing::warn!(topic, error = %code, "could not delete applied records from Kafka; will retry");
                        self.ask(topic, partition, offset);
                    }
                }
            }
        }
    }
}
