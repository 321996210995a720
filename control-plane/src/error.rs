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
    #[error("internal error")]
    Internal(#[from] StoreError),
}

impl From<FieldViolation> for ApiError {
    fn from(v: FieldViolation) -> Self {
        Self::InvalidArgument(v)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::Internal(StoreError::Database(e))
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
