//! Kafka topic names.

/// Default name of the topic that carries change signals from control plane to workers.
pub const DEFAULT_SIGNALS_TOPIC: &str = "sluice.signals";

/// The topic a pipeline's source records are produced to and its destination reads.
pub fn records_topic(pipeline_id: &str) -> String {
    format!("sluice.pipeline.{pipeline_id}.records")
}
