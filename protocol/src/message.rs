//! The connector message envelope: `{"type": "<kind>", "<kind>": payload}`, the same
//! shape as the connector protocol Sluice's lifecycle model comes from. Records travel
//! through the pipeline's records topic in this form.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConnectorMessage {
    Record {
        record: RecordMessage,
    },
    /// An input pushed to a pipeline (`PushSourceInput`), as the source takes it.
    SourceInput {
        source_input: Value,
    },
    SourceState {
        source_state: SourceStateMessage,
    },
    Log {
        log: LogMessage,
    },
    Trace {
        trace: TraceMessage,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordMessage {
    pub stream: String,
    pub data: Map<String, Value>,
    /// Milliseconds since the Unix epoch at which the source emitted the record.
    pub emitted_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStateMessage {
    /// Stream name, or None for global state.
    pub stream: Option<String>,
    pub state: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogMessage {
    pub level: String,
    pub message: String,
}

/// Whether an error may be retried: config and auth errors need a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureType {
    ConfigError,
    AuthError,
    /// A record the destination refuses (a constraint, a value out of range): the same
    /// record fails the same way on every attempt.
    DataError,
    TransientError,
    SystemError,
}

impl FailureType {
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::TransientError | Self::SystemError)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConfigError => "config_error",
            Self::AuthError => "auth_error",
            Self::DataError => "data_error",
            Self::TransientError => "transient_error",
            Self::SystemError => "system_error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceMessage {
    pub failure_type: FailureType,
    pub message: String,
}

impl ConnectorMessage {
    pub fn record(stream: &str, data: Map<String, Value>, emitted_at: i64) -> Self {
        Self::Record {
            record: RecordMessage {
                stream: stream.to_owned(),
                data,
                emitted_at,
            },
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("connector messages are plain JSON")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape() {
        let mut data = Map::new();
        data.insert("id".into(), Value::from(1));
        let m = ConnectorMessage::record("records", data, 5);
        let v: Value = serde_json::from_slice(&m.to_bytes()).expect("json");
        assert_eq!(v["type"], "record");
        assert_eq!(v["record"]["stream"], "records");
        assert_eq!(v["record"]["data"]["id"], 1);
        assert_eq!(
            ConnectorMessage::from_bytes(&m.to_bytes()).expect("parse"),
            m
        );
    }

    #[test]
    fn retryable_failures() {
        assert!(!FailureType::ConfigError.is_retryable());
        assert!(!FailureType::AuthError.is_retryable());
        assert!(!FailureType::DataError.is_retryable());
        assert!(FailureType::TransientError.is_retryable());
        assert!(FailureType::SystemError.is_retryable());
    }
}
