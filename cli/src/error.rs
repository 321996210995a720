//! Everything that can make `sluicectl` fail, its exit status, and how it is shown:
//! gRPC failures are printed with their code name plus the AIP-193 details the control
//! plane attaches (ErrorInfo reason, BadRequest field violations).

use std::error::Error as _;

use tonic::Code;
use tonic_types::StatusExt;

use crate::args::{EXIT_FAILURE, EXIT_USAGE};
use crate::spec_file::SpecError;
use crate::wait::WaitError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Apply(#[from] crate::apply::ApplyError),
    #[error("cannot read {origin}: {source}")]
    ReadSpec {
        origin: String,
        source: std::io::Error,
    },
    #[error("cannot use config file {origin}: {message}")]
    ReadConfig { origin: String, message: String },
    #[error("{origin}: {message}")]
    BadInput { origin: String, message: String },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("invalid --server url {url:?}: {source}")]
    InvalidServer {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("the control plane at {url} is unreachable: {}", source_chain(.source))]
    Unreachable {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("{}", rpc_headline(.0))]
    Rpc(tonic::Status),
    #[error("the server returned page token {0:?} twice; stopping to avoid an endless listing")]
    RepeatedPageToken(String),
    #[error(transparent)]
    Wait(WaitError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        Self::Rpc(status)
    }
}

impl From<WaitError> for CliError {
    fn from(err: WaitError) -> Self {
        match err {
            // RPC failures while waiting look exactly like any other RPC failure.
            WaitError::Rpc(status) => Self::Rpc(status),
            other => Self::Wait(other),
        }
    }
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Spec(_)
            | Self::Apply(_)
            | Self::ReadSpec { .. }
            | Self::InvalidServer { .. }
            | Self::ReadConfig { .. }
            | Self::BadInput { .. }
            | Self::Tls(_) => EXIT_USAGE,
            Self::Unreachable { .. }
            | Self::Rpc(_)
            | Self::RepeatedPageToken(_)
            | Self::Wait(_)
            | Self::Runtime(_) => EXIT_FAILURE,
        }
    }

    /// The lines to print on stderr: `error: ...` first, then any structured details.
    pub fn report(&self) -> Vec<String> {
        let mut lines = vec![format!("error: {self}")];
        if let Self::Rpc(status) = self {
            lines.extend(rpc_details(status));
        }
        lines
    }
}

/// `NOT_FOUND: pipeline "x" not found`.
fn rpc_headline(status: &tonic::Status) -> String {
    let message = status.message();
    if message.is_empty() {
        code_name(status.code()).to_owned()
    } else {
        format!("{}: {message}", code_name(status.code()))
    }
}

fn rpc_details(status: &tonic::Status) -> Vec<String> {
    let details = status.get_error_details();
    let mut lines = Vec::new();
    if let Some(info) = details.error_info() {
        if !info.reason.is_empty() {
            lines.push(format!("reason: {}", info.reason));
        }
    }
    match status.code() {
        Code::Unauthenticated => lines.push(
            "hint: set SLUICE_TOKEN, or token: in the config file (see sluicectl --help)".into(),
        ),
        Code::PermissionDenied => {
            lines.push("hint: this token's role may not do that; ask for an operator token".into())
        }
        _ => {}
    }
    if let Some(bad_request) = details.bad_request() {
        lines.extend(
            bad_request
                .field_violations
                .iter()
                .map(|v| format!("field {}: {}", v.field, v.description)),
        );
    }
    lines
}

/// The canonical gRPC name of a code, as grpcurl and the other gRPC tools print it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// tonic's transport errors say only "transport error" at the top; the cause (connection
/// refused, DNS failure, timeout) is further down the source chain.
fn source_chain(err: &tonic::transport::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut next = err.source();
    while let Some(cause) = next {
        // hyper-util repeats its own message one level down; print it once.
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        next = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

    #[test]
    fn rpc_error_shows_code_reason_and_fields() {
        let mut details = ErrorDetails::with_error_info(
            "INVALID_ARGUMENT",
            "sluice.v1",
            [("field".to_owned(), "pipeline.spec.source.type".to_owned())],
        );
        details.add_bad_request_violation("pipeline.spec.source.type", "is required");
        let status = tonic::Status::with_error_details(
            Code::InvalidArgument,
            "pipeline.spec.source.type: is required",
            details,
        );
        let err = CliError::from(status);
        assert_eq!(err.exit_code(), EXIT_FAILURE);
        assert_eq!(
            err.report(),
            [
                "error: INVALID_ARGUMENT: pipeline.spec.source.type: is required",
                "reason: INVALID_ARGUMENT",
                "field pipeline.spec.source.type: is required",
            ]
        );
    }

    #[test]
    fn plain_status_has_only_the_headline() {
        let err = CliError::from(tonic::Status::not_found("pipeline \"x\" not found"));
        assert_eq!(err.report(), ["error: NOT_FOUND: pipeline \"x\" not found"]);
    }

    #[test]
    fn rpc_failures_during_wait_are_reported_as_rpc_failures() {
        let err = CliError::from(WaitError::Rpc(tonic::Status::internal("internal error")));
        assert!(matches!(err, CliError::Rpc(_)));
        assert_eq!(err.report(), ["error: INTERNAL: internal error"]);
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        let err = CliError::from(SpecError::MissingFlag("--source-type"));
        assert_eq!(err.exit_code(), EXIT_USAGE);
    }
}
