//! The process's secrets key (one per deployment, shared by the control plane and the
//! workers). The control plane seals secret connector settings with it before storing a
//! spec; every process opens them when it loads a pipeline row.

use std::path::Path;
use std::sync::OnceLock;

use serde_json::Value;
use sluice_protocol::secrets::{has_plain_secrets, seal_spec, SecretBox, SecretFields};
use sluice_protocol::spec::PipelineSpec;

static KEY: OnceLock<SecretBox> = OnceLock::new();

/// Reads the key file (32 bytes, base64) and makes it the process's key.
pub fn install_key_file(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read secrets key file {}: {e}", path.display()))?;
    let secrets = SecretBox::from_base64(&text)
        .map_err(|e| format!("secrets key file {}: {e}", path.display()))?;
    tracing::info!(key_id = secrets.key_id(), "secrets key loaded");
    let _ = KEY.set(secrets);
    Ok(())
}

pub fn installed() -> Option<&'static SecretBox> {
    KEY.get()
}

/// A spec holds a secret but the process has no key to seal it with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} holds a secret, and secrets are stored only encrypted: the control plane needs --secrets-key-file")]
pub struct NoSecretsKey {
    pub field: String,
}

/// The JSON to store for the spec of pipeline `pipeline_key`: the secrets (the fields
/// `fields` says are secret) sealed with the process's key.
pub fn stored_spec_json(
    spec: &PipelineSpec,
    fields: &dyn SecretFields,
    pipeline_key: &str,
) -> Result<Value, NoSecretsKey> {
    match (installed(), has_plain_secrets(spec, fields)) {
        (_, None) => Ok(spec.to_json()),
        (Some(secrets), Some(_)) => Ok(seal_spec(spec, fields, secrets, pipeline_key).to_json()),
        (None, Some(field)) => Err(NoSecretsKey { field }),
    }
}
