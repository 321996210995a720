//! Group membership: every worker joins one consumer group on the signals topic. The
//! partitions Kafka assigns decide which pipelines this worker owns; the records on
//! them are wake-up signals for those pipelines' workflows.

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientContext, TopicPartitionList};
use sluice_protocol::signal::Signal;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::supervisor::SupervisorEvent;

/// The signals-topic partitions this worker is assigned right now. The rebalance
/// callbacks update it before the supervisor hears of a change, so a workflow about
/// to claim a pipeline can tell that its partition was just revoked.
#[derive(Debug, Default)]
pub struct Assignment(std::sync::RwLock<std::collections::BTreeSet<i32>>);

impl Assignment {
    pub fn contains(&self, partition: i32) -> bool {
        self.0
            .read()
            .expect("assignment lock is never poisoned")
            .contains(&partition)
    }

    pub fn add(&self, partitions: &[i32]) {
        let mut set = self.0.write().expect("assignment lock is never poisoned");
        set.extend(partitions.iter().copied());
    }

    pub fn remove(&self, partitions: &[i32]) {
        let mut set = self.0.write().expect("assignment lock is never poisoned");
        for p in partitions {
            set.remove(p);
        }
    }
}

/// Forwards assignment changes to the supervisor. With the cooperative-sticky
/// strategy librdkafka reports incremental changes; with an eager strategy a revoke of
/// everything precedes each assign. Treating Assign as "add" and Revoke as "remove" is
/// correct for both.
pub struct MembershipContext {
    pub events: mpsc::UnboundedSender<SupervisorEvent>,
    pub assignment: std::sync::Arc<Assignment>,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for MembershipContext {}

impl ConsumerContext for MembershipContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.assignment.remove(&partitions(tpl));
            // Hold the rebalance until this worker's workflows on those partitions have
            // stopped at a safe point and released their pipelines, so the next owner
            // starts after them rather than beside them. Bounded: fencing covers a
            // worker too slow to finish.
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let sent = self
                .events
                .send(SupervisorEvent::Revoked(partitions(tpl), Some(done_tx)));
            // The callback runs inside the consumer's poll on a runtime thread; only a
            // multi-threaded runtime lets it block there.
            let can_block = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            if sent.is_ok() && can_block {
                tokio::task::block_in_place(|| {
                    let _ = done_rx.recv_timeout(REVOKE_WAIT);
                });
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.assignment.add(&partitions(tpl));
                let _ = self.events.send(SupervisorEvent::Assigned(partitions(tpl)));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// How long a revocation may wait for the workflows to stop.
const REVOKE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

pub type SignalConsumer = StreamConsumer<MembershipContext>;

/// Polls the signals topic until `stop` fires, turning records into wake-ups. Polling
/// also drives the rebalance callbacks above.
pub async fn poll_signals(
    consumer: &SignalConsumer,
    events: mpsc::UnboundedSender<SupervisorEvent>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            m = consumer.recv() => m,
        };
        match message {
            Ok(m) => {
                match m.payload().map(Signal::from_bytes) {
                    Some(Ok(signal)) => {
                        let trace = m.headers().and_then(|headers| {
                            rdkafka::message::Headers::iter(headers)
                                .find(|h| h.key == "traceparent")
                                .and_then(|h| h.value)
                                .and_then(|v| std::str::from_utf8(v).ok())
                                .map(str::to_owned)
                        });
                        let _ = events.send(SupervisorEvent::Signal {
                            pipeline_id: signal.pipeline_id,
                            partition: m.partition(),
                            trace,
                        });
                    }
                    _ => tracing::warn!(
                        partition = m.partition(),
                        offset = m.offset(),
                        "ignoring malformed signal"
                    ),
                }
                // Signals only wake workflows that re-read Postgres, so committing right
                // after the hand-off loses nothing; it just avoids replaying old signals.
                if let Err(e) = consumer.commit_message(&m, rdkafka::consumer::CommitMode::Async) {
                    tracing::debug!(error = %e, "signal offset commit failed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "signals consumer error");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}
