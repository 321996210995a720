//! Where `sluicectl` finds its control plane and credentials. Each setting comes from
//! the first of: its flag, its environment variable, the config file, the default.
//!
//! The config file is YAML: `--config FILE` or `$SLUICE_CONFIG` names it; otherwise
//! `$XDG_CONFIG_HOME/sluice/config.yaml` (or `~/.config/sluice/config.yaml`) is read
//! when it exists.
//!
//! ```yaml
//! server: https://cp.internal:50051
//! token: sluice_...
//! ca_file: /etc/sluice/ca.pem          # CA that signed the control plane's certificate
//! client_cert: /etc/sluice/me.pem      # for mutual TLS
//! client_key: /etc/sluice/me.key
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::CliError;

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub server: Option<String>,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Everything needed to reach the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub server: String,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Settings given on the command line or in the environment (they win over the file).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub server: Option<String>,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("sluice").join("config.yaml"))
}

fn read_file(path: &Path) -> Result<ConfigFile, CliError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| CliError::ReadConfig {
        origin: origin.clone(),
        message: source.to_string(),
    })?;
    if text.trim().is_empty() {
        return Ok(ConfigFile::default());
    }
    let file: ConfigFile = serde_yaml::from_str(&text).map_err(|e| CliError::ReadConfig {
        origin: origin.clone(),
        message: e.to_string(),
    })?;
    warn_if_readable_by_others(path, &file);
    Ok(file)
}

/// A token in a file others can read is a leaked token (as ssh says of its keys).
fn warn_if_readable_by_others(path: &Path, file: &ConfigFile) {
    use std::os::unix::fs::PermissionsExt;
    if file.token.is_none() {
        return;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: {} holds a token and is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            );
        }
    }
}

pub fn resolve(overrides: Overrides) -> Result<Connection, CliError> {
    let file = match &overrides.config {
        // Named explicitly: it must exist.
        Some(path) => read_file(path)?,
        None => match default_path().filter(|p| p.is_file()) {
            Some(path) => read_file(&path)?,
            None => ConfigFile::default(),
        },
    };
    Ok(merge(overrides, file))
}

fn merge(o: Overrides, f: ConfigFile) -> Connection {
    Connection {
        server: o
            .server
            .or(f.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned()),
        token: o.token.or(f.token).filter(|t| !t.trim().is_empty()),
        ca_file: o.ca_file.or(f.ca_file),
        client_cert: o.client_cert.or(f.client_cert),
        client_key: o.client_key.or(f.client_key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_environment_win_over_the_file() {
        let file: ConfigFile =
            serde_yaml::from_str("server: https://cp:1\ntoken: from-file\nca_file: /ca.pem\n")
                .expect("valid");
        let merged = merge(
            Overrides {
                token: Some("from-env".into()),
                ..Overrides::default()
            },
            file.clone(),
        );
        assert_eq!(merged.server, "https://cp:1");
        assert_eq!(merged.token.as_deref(), Some("from-env"));
        assert_eq!(merged.ca_file, Some(PathBuf::from("/ca.pem")));
        let defaults = merge(Overrides::default(), ConfigFile::default());
        assert_eq!(defaults.server, DEFAULT_SERVER);
        assert_eq!(defaults.token, None);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(serde_yaml::from_str::<ConfigFile>("tokn: x\n").is_err());
    }

    #[test]
    fn an_explicit_missing_file_is_an_error() {
        let err = resolve(Overrides {
            config: Some("/nonexistent/sluice.yaml".into()),
            ..Overrides::default()
        })
        .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/sluice.yaml"));
    }
}
