//! The error every activity returns, and how database and Kafka errors are classified:
//! which failures a retry can fix and which need a person. Each connector classifies
//! its own errors into these types.

use sluice_protocol::message::FailureType;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ActivityError {
    /// Another worker took the pipeline over: this workflow must stop writing.
    #[error("fenced: the pipeline is owned by a newer epoch")]
    Fenced,
    #[error("cancelled")]
    Cancelled,
    /// A rule of the status model would be broken: retrying cannot help.
    #[error("invariant violated: {0}")]
    Invariant(String),
    #[error("{failure_type:?}: {message}")]
    Failed {
        failure_type: FailureType,
        message: String,
    },
}

impl ActivityError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Failed {
            failure_type: FailureType::TransientError,
            message: message.into(),
        }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self::Failed {
            failure_type: FailureType::ConfigError,
            message: message.into(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Failed { failure_type, .. } if failure_type.is_retryable())
    }
}

/// The failure type of a PostgreSQL error code (SQLSTATE).
pub fn sqlstate_failure_type(code: &str) -> FailureType {
    match code {
        c if c.starts_with("28") => FailureType::AuthError,
        "3D000" | "3F000" | "42501" => FailureType::ConfigError,
        // duplicate_table/_object/_schema: a concurrent CREATE ... IF NOT EXISTS.
        "42P07" | "42710" | "42P06" => FailureType::TransientError,
        c if c.starts_with("42") => FailureType::ConfigError,
        // Data exceptions (a value out of range, bad text) and integrity violations (a
        // CHECK, NOT NULL, foreign or unique key): the same record fails every time.
        c if c.starts_with("22") || c.starts_with("23") => FailureType::DataError,
        // Everything else (connection loss, timeouts, lock waits, serialization
        // failures, shutdowns, resource exhaustion) may pass on a later attempt.
        _ => FailureType::TransientError,
    }
}

/// Classifies Postgres errors: bad credentials are auth errors, a missing database or
/// a malformed object are config errors, a refused record is a data error, a broken
/// protocol exchange (e.g. too many bind parameters) is a bug that no retry fixes, and
/// everything else (connection refused, timeouts, serialization failures, races on
/// CREATE ... IF NOT EXISTS) is worth retrying.
impl From<sqlx::Error> for ActivityError {
    fn from(e: sqlx::Error) -> Self {
        let failure_type = match &e {
            sqlx::Error::Database(db) => db
                .code()
                .as_deref()
                .map_or(FailureType::TransientError, sqlstate_failure_type),
            sqlx::Error::Configuration(_) => FailureType::ConfigError,
            // A TLS handshake that fails (untrusted or mismatched certificate, server
            // without TLS under sslmode=require) fails the same way on every retry.
            sqlx::Error::Tls(_) => FailureType::ConfigError,
            sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
                FailureType::ConfigError
            }
            sqlx::Error::Protocol(_)
            | sqlx::Error::Encode(_)
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. } => {
                return Self::Invariant(format!("database protocol: {e}"));
            }
            _ => FailureType::TransientError,
        };
        Self::Failed {
            failure_type,
            message: e.to_string(),
        }
    }
}

impl From<sluice_infra::store::StoreError> for ActivityError {
    fn from(e: sluice_infra::store::StoreError) -> Self {
        match e {
            sluice_infra::store::StoreError::Database(e) => e.into(),
            other => Self::Failed {
                failure_type: FailureType::SystemError,
                message: other.to_string(),
            },
        }
    }
}

impl From<sluice_infra::kafka::KafkaAdminError> for ActivityError {
    fn from(e: sluice_infra::kafka::KafkaAdminError) -> Self {
        Self::transient(e.to_string())
    }
}

impl From<rdkafka::error::KafkaError> for ActivityError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        Self::transient(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_are_config_errors_and_refusals_transient() {
        let io = |kind, msg| sqlx::Error::Io(std::io::Error::new(kind, msg));
        let tls: ActivityError =
            io(std::io::ErrorKind::InvalidData, "invalid peer certificate").into();
        assert!(!tls.is_retryable());
        let refused: ActivityError = io(std::io::ErrorKind::ConnectionRefused, "refused").into();
        assert!(refused.is_retryable());
    }

    #[test]
    fn refused_records_and_protocol_errors_are_not_retried() {
        for (code, kind) in [
            ("23514", FailureType::DataError),
            ("22003", FailureType::DataError),
            ("23505", FailureType::DataError),
            ("28P01", FailureType::AuthError),
            ("42P01", FailureType::ConfigError),
            ("40001", FailureType::TransientError),
            ("55P03", FailureType::TransientError),
            ("57014", FailureType::TransientError),
            ("08006", FailureType::TransientError),
        ] {
            assert_eq!(sqlstate_failure_type(code), kind, "{code}");
        }
        let protocol: ActivityError =
            sqlx::Error::Protocol("too many arguments for query: 70000".into()).into();
        assert!(
            matches!(protocol, ActivityError::Invariant(_)),
            "{protocol:?}"
        );
        assert!(!protocol.is_retryable());
    }
}
