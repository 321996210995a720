//! The one table from domain errors to gRPC statuses. Every status carries an AIP-193
//! `ErrorInfo` with a stable reason; database and Kafka details are logged, never sent.

use sluice_infra::store::StoreError;
use sluice_protocol::FieldViolation;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub const ERROR_DOMAIN: &str = "sluice.v1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(FieldViolation),
    #[error("pipeline {0:?} not found")]
    NotFound(String),
    #[error("pipeline {0:?} already exists")]
    AlreadyExists(String),
    #[error("pipeline {0:?} is deleted; it can no longer be changed")]
    Deleted(String),
    #[error("pipeline {id:?} changed since etag {sent} was read (current etag {current})")]
    EtagMismatch {
        id: String,
        sent: String,
        current: String,
    },
    #[error("{why}")]
    Unauthenticated {
        reason: &'static str,
        why: &'static str,
    },
    #[error("{method} is not allowed for role {role}: {why}")]
    PermissionDenied {
        method: &'static str,
        role: crate::auth::Role,
        why: &'static str,
    },
    /// A configured limit was reached (`limit` names it, as in the flag).
    #[error("limit {limit} ({max}) reached: {what}")]
    LimitExceeded {
        limit: &'static str,
        max: u64,
        what: String,
    },
    #[error("{0}")]
    NoSecretsKey(#[from] sluice_infra::secrets::NoSecretsKey),
    /// The call is valid but the pipeline is not in a state that allows it.
    #[error("{why}")]
    Precondition { reason: &'static str, why: String },
    /// Kafka did not take a pushed input in time: nothing was stored.
    #[error("the input could not be stored (Kafka: {0}); retry later")]
    KafkaUnavailable(String),
    /// The database did not serve the call in time (a row locked by another
    /// transaction, a statement timeout, a lost connection): retrying later may work.
    #[error("{why}; retry later")]
    Unavailable {
        reason: &'static str,
        why: &'static str,
    },
    #[error("internal error")]
    Internal(StoreError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let StoreError::Database(db) = &e else {
            return Self::Internal(e);
        };
        let busy = match db {
            sqlx::Error::Database(d) => match d.code().as_deref() {
                Some("55P03") => Some((
                    "PIPELINE_BUSY",
                    "the pipeline is locked by another transaction",
                )),
                Some("57014") => Some(("DATABASE_TIMEOUT", "the database did not answer in time")),
                Some(c) if c.starts_with("08") || c.starts_with("57P") => {
                    Some(("DATABASE_UNAVAILABLE", "the database is unavailable"))
                }
                _ => None,
            },
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Some(("DATABASE_UNAVAILABLE", "the database is unavailable"))
            }
            _ => None,
        };
        match busy {
            Some((reason, why)) => {
                tracing::warn!(error = %e, "request could not be served by the database");
                Self::Unavailable { reason, why }
            }
            None => Self::Internal(e),
        }
    }
}

impl From<FieldViolation> for ApiError {
    fn from(v: FieldViolation) -> Self {
        Self::InvalidArgument(v)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(e).into()
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        let message = err.to_string();
        let (code, reason, metadata): (Code, &str, Vec<(String, String)>) = match &err {
            ApiError::InvalidArgument(v) => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "INVALID_ARGUMENT",
                    ERROR_DOMAIN,
                    [("field".to_owned(), v.field.clone())],
                );
                details.add_bad_request_violation(v.field.clone(), v.description.clone());
                return Status::with_error_details(Code::InvalidArgument, message, details);
            }
            ApiError::NotFound(id) => (
                Code::NotFound,
                "PIPELINE_NOT_FOUND",
                vec![("pipeline_id".into(), id.clone())],
            ),
            ApiError::AlreadyExists(id) => (
                Code::AlreadyExists,
                "PIPELINE_ALREADY_EXISTS",
                vec![("pipeline_id".into(), id.clone())],
            ),
            ApiError::Deleted(id) => (
                Code::FailedPrecondition,
                "PIPELINE_DELETED",
                vec![("pipeline_id".into(), id.clone())],
            ),
            ApiError::EtagMismatch { id, current, .. } => (
                Code::Aborted,
                "ETAG_MISMATCH",
                vec![
                    ("pipeline_id".into(), id.clone()),
                    ("current_etag".into(), current.clone()),
                ],
            ),
            ApiError::Unauthenticated { reason, .. } => {
                (Code::Unauthenticated, *reason, Vec::new())
            }
            ApiError::PermissionDenied { method, role, .. } => (
                Code::PermissionDenied,
                "PERMISSION_DENIED",
                vec![
                    ("method".into(), (*method).to_owned()),
                    ("role".into(), role.to_string()),
                ],
            ),
            ApiError::LimitExceeded { limit, max, .. } => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "LIMIT_EXCEEDED",
                    ERROR_DOMAIN,
                    [
                        ("limit".to_owned(), (*limit).to_owned()),
                        ("max".to_owned(), max.to_string()),
                    ],
                );
                details.add_quota_failure_violation(*limit, message.clone());
                return Status::with_error_details(Code::ResourceExhausted, message, details);
            }
            ApiError::NoSecretsKey(e) => (
                Code::FailedPrecondition,
                "SECRETS_KEY_MISSING",
                vec![("field".into(), format!("pipeline.spec.{}", e.field))],
            ),
            ApiError::Unavailable { reason, .. } => (Code::Unavailable, *reason, Vec::new()),
            ApiError::Precondition { reason, .. } => {
                (Code::FailedPrecondition, *reason, Vec::new())
            }
            ApiError::KafkaUnavailable(e) => {
                tracing::warn!(error = %e, "an input could not be stored");
                (Code::Unavailable, "KAFKA_UNAVAILABLE", Vec::new())
            }
            ApiError::Internal(e) => {
                tracing::error!(error = %e, "request failed");
                (Code::Internal, "INTERNAL", Vec::new())
            }
        };
        let metadata: std::collections::HashMap<String, String> = metadata.into_iter().collect();
        let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
        Status::with_error_details(code, message, details)
    }
}
