//! The Sluice protocol crate: the generated gRPC API plus the domain model every process
//! shares — statuses and their transition rules, pipeline specs and their validation,
//! update masks, the connector message envelope, signals, topic names, partitioning and
//! retry policy. Pure: nothing here does I/O.

#![forbid(unsafe_code)]

pub mod auth;
pub mod catalog;
pub mod conversions;
pub mod hosts;
pub mod ids;
pub mod mask;
pub mod message;
pub mod partition;
pub mod retry;
pub mod schedule;
pub mod secrets;
pub mod signal;
pub mod spec;
pub mod status;
pub mod topics;

/// Code generated from `proto/sluice/v1`.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::unwrap_used)]
    tonic::include_proto!("sluice.v1");

    /// Encoded descriptor set of the API, served through gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));
}

/// A request field that failed validation: the path of the field (as a client spelled
/// it, e.g. `pipeline.spec.source.config.count`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {description}")]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}
