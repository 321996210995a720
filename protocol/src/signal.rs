//! The signal the control plane sends (through the outbox and the signals topic) when a
//! pipeline's desired state changes. It only wakes the owning workflow, which then
//! re-reads the row: Postgres stays the source of truth, so a signal carries no state.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub pipeline_id: String,
    /// The generation the change produced, for tracing and tests.
    pub generation: i64,
}

impl Signal {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("signals are plain JSON")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
