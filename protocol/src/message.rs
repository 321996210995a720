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

    /// The bytes of a record message, serialized from borrowed parts (the same bytes
    /// as `record(..).to_bytes()`, without copying the data first).
    pub fn record_bytes(stream: &str, data: &Map<String, Value>, emitted_at: i64) -> Vec<u8> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            record: Borrowed<'a>,
        }
        #[derive(Serialize)]
        struct Borrowed<'a> {
            stream: &'a str,
            data: &'a Map<String, Value>,
            emitted_at: i64,
        }
        serde_json::to_vec(&Envelope {
            kind: "record",
            record: Borrowed {
                stream,
                data,
                emitted_at,
            },
        })
        .expect("connector messages are plain JSON")
    }

    /// Reads a record message, the hot path of the write lane: a plain struct parse
    /// (an internally tagged enum buffers the whole message first). Anything else is
    /// returned as the message it is.
    pub fn record_from_bytes(
        bytes: &[u8],
    ) -> Result<Result<RecordMessage, Self>, serde_json::Error> {
        #[derive(Deserialize)]
        struct Envelope {
            #[serde(rename = "type")]
            kind: String,
            record: Option<RecordMessage>,
        }
        if let Ok(Envelope {
            kind,
            record: Some(record),
        }) = serde_json::from_slice::<Envelope>(bytes)
        {
            if kind == "record" {
                return Ok(Ok(record));
            }
        }
        Self::from_bytes(bytes).map(Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_fast_paths_agree_with_the_envelope() {
        let mut data = Map::new();
        data.insert("id".into(), Value::from(7));
        data.insert("name".into(), Value::from("a \"quoted\" name"));
        let message = ConnectorMessage::record("s", data.clone(), 42);
        assert_eq!(
            ConnectorMessage::record_bytes("s", &data, 42),
            message.to_bytes()
        );
        let Ok(Ok(record)) = ConnectorMessage::record_from_bytes(&message.to_bytes()) else {
            panic!("a record");
        };
        assert_eq!(ConnectorMessage::Record { record }, message);
        let log = br#"{"type": "log", "log": {"level": "INFO", "message": "m"}}"#;
        assert!(matches!(
            ConnectorMessage::record_from_bytes(log),
            Ok(Err(ConnectorMessage::Log { .. }))
        ));
        assert!(ConnectorMessage::record_from_bytes(b"{").is_err());
    }

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
