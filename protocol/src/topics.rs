//! Kafka topic names.

/// Default name of the topic that carries change signals from control plane to workers.
pub const DEFAULT_SIGNALS_TOPIC: &str = "sluice.signals";

/// Default namespace of the topics (and Kafka transactional ids) workers create.
pub const DEFAULT_TOPIC_NAMESPACE: &str = "sluice";

/// The topic an incarnation of a pipeline produces its source records to and its
/// destination reads. A pipeline deleted and created again under the same key gets a
/// new topic: nothing an old incarnation still had in flight can land in it. The
/// namespace keeps deployments that share a Kafka cluster apart (incarnations are
/// numbered per deployment).
pub fn records_topic(namespace: &str, pipeline_key: &str, incarnation: i64) -> String {
    format!("{namespace}.pipeline.{pipeline_key}.i{incarnation}.records")
}

/// The topic that keeps the inputs pushed to an incarnation of a pipeline
/// (`PushSourceInput`) until its live lane applies them.
pub fn inputs_topic(namespace: &str, pipeline_key: &str, incarnation: i64) -> String {
    format!("{namespace}.pipeline.{pipeline_key}.i{incarnation}.inputs")
}

/// The records topic of pipelines set up before topics were named per incarnation.
pub fn legacy_records_topic(pipeline_key: &str) -> String {
    format!("sluice.pipeline.{pipeline_key}.records")
}

/// Longest topic namespace: with the longest key and incarnation a records topic stays
/// within Kafka's 249 characters.
pub const MAX_TOPIC_NAMESPACE_LEN: usize = 80;

/// Checks a topic namespace: Kafka's topic characters, at most
/// [`MAX_TOPIC_NAMESPACE_LEN`] long.
pub fn validate_topic_namespace(namespace: &str) -> Result<(), String> {
    let ok = !namespace.is_empty()
        && namespace.len() <= MAX_TOPIC_NAMESPACE_LEN
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "topic namespace {namespace:?} must be 1-{MAX_TOPIC_NAMESPACE_LEN} of [A-Za-z0-9._-]"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incarnations_and_deployments_never_share_a_records_topic() {
        assert_ne!(
            records_topic("sluice", "t.p", 1),
            records_topic("sluice", "t.p", 2)
        );
        assert_ne!(
            records_topic("sluice", "t.p", 1),
            records_topic("staging", "t.p", 1)
        );
        assert_ne!(
            records_topic("sluice", "t.p", 1),
            legacy_records_topic("t.p")
        );
        // The longest key (63 + 1 + 63 characters) with the largest incarnation and the
        // longest namespace stays within Kafka's 249-character limit.
        let key = format!("{}.{}", "a".repeat(63), "b".repeat(63));
        let namespace = "n".repeat(MAX_TOPIC_NAMESPACE_LEN);
        assert!(validate_topic_namespace(&namespace).is_ok());
        assert!(records_topic(&namespace, &key, i64::MAX).len() <= 249);
        for bad in ["", "a b", "x/y", &"n".repeat(MAX_TOPIC_NAMESPACE_LEN + 1)] {
            assert!(validate_topic_namespace(bad).is_err(), "{bad}");
        }
    }
}
