//! The process's secrets key (one per deployment, shared by the control plane and the
//! workers). The control plane seals secret connector settings with it before storing a
//! spec; every process opens them when it loads a pipeline row.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;
use sluice_protocol::secrets::{
    has_plain_secrets, reseal_spec, seal_spec, SecretBox, SecretFields,
};
use sluice_protocol::spec::PipelineSpec;

static KEY: OnceLock<SecretBox> = OnceLock::new();

fn read_key_file(path: &Path) -> Result<SecretBox, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read secrets key file {}: {e}", path.display()))?;
    SecretBox::from_base64(&text).map_err(|e| format!("secrets key file {}: {e}", path.display()))
}

/// Reads the key files (32 bytes, base64 each) and makes them the process's keys: the
/// current key, which seals, and the previous keys of a rotation, which only open.
pub fn install_key_files(current: &Path, previous: &[PathBuf]) -> Result<(), String> {
    let mut secrets = read_key_file(current)?;
    for path in previous {
        secrets = secrets.with_previous(read_key_file(path)?);
    }
    let ids = secrets.key_ids();
    tracing::info!(
        key_id = ids[0],
        previous_key_ids = ids[1..].join(","),
        "secrets key loaded"
    );
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
        (Some(secrets), Some(_)) => {
            let mut sealed = seal_spec(spec, fields, secrets, pipeline_key);
            // A secret kept from the stored spec (sent back redacted) that a previous key
            // sealed is sealed again with the current one; one that cannot be opened
            // stays as it is (validation reports it).
            let _ = reseal_spec(&mut sealed, secrets, pipeline_key);
            Ok(sealed.to_json())
        }
        (None, Some(field)) => Err(NoSecretsKey { field }),
    }
}

/// What `reseal_stored` found and did.
#[derive(Debug, Default)]
pub struct ResealReport {
    pub pipelines: usize,
    /// Sealed values per key id, before the reseal.
    pub by_key: std::collections::BTreeMap<String, usize>,
    /// Values sealed again with the current key (or, in a dry run, to be).
    pub resealed: usize,
    pub resealed_pipelines: usize,
    /// Pipelines with a value no installed key opens: (pipeline key, why).
    pub failures: Vec<(String, String)>,
}

/// Seals every stored secret that a previous key sealed again with the current key
/// (`dry_run`: only counts). Each pipeline row changes in its own compare-and-set
/// update, so the control plane may keep serving meanwhile: a row changed by an API
/// call in between is read again.
pub async fn reseal_stored(
    pool: &sqlx::PgPool,
    secrets: &SecretBox,
    dry_run: bool,
) -> Result<ResealReport, sqlx::Error> {
    use sluice_protocol::secrets::sealed_key_ids;
    use sqlx::Row;

    let mut report = ResealReport::default();
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM pipelines ORDER BY id")
        .fetch_all(pool)
        .await?;
    for id in ids {
        let mut first_read = true;
        loop {
            let Some(row) = sqlx::query("SELECT spec FROM pipelines WHERE id = $1")
                .bind(&id)
                .fetch_optional(pool)
                .await?
            else {
                break; // removed meanwhile
            };
            let stored: Value = row.try_get("spec")?;
            let mut spec = match PipelineSpec::from_json(stored.clone()) {
                Ok(spec) => spec,
                Err(e) => {
                    report
                        .failures
                        .push((id.clone(), format!("stored spec: {e}")));
                    break;
                }
            };
            if first_read {
                report.pipelines += 1;
                for key_id in sealed_key_ids(&spec) {
                    *report.by_key.entry(key_id).or_default() += 1;
                }
                first_read = false;
            }
            let count = match reseal_spec(&mut spec, secrets, &id) {
                Ok(count) => count,
                Err(e) => {
                    report.failures.push((id.clone(), e.to_string()));
                    break;
                }
            };
            if count == 0 {
                break;
            }
            if dry_run {
                report.resealed += count;
                report.resealed_pipelines += 1;
                break;
            }
            let updated = sqlx::query("UPDATE pipelines SET spec = $1 WHERE id = $2 AND spec = $3")
                .bind(spec.to_json())
                .bind(&id)
                .bind(&stored)
                .execute(pool)
                .await?
                .rows_affected();
            if updated == 1 {
                report.resealed += count;
                report.resealed_pipelines += 1;
                break;
            }
            // Changed by an API call since it was read: read it again.
        }
    }
    Ok(report)
}
