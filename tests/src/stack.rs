//! A private PostgreSQL and Kafka for one test, started by the project's own
//! `deploy/local/up.sh` in a directory and on ports of their own, so that a test can
//! stop and start them (an outage drill) without touching the shared services every
//! other test uses.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::{unique, workspace_root, Infra};

/// One of the two services of a [`PrivateStack`].
#[derive(Debug, Clone, Copy)]
pub enum Service {
    Kafka,
    Postgres,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Self::Kafka => "kafka",
            Self::Postgres => "postgres",
        }
    }
}

pub struct PrivateStack {
    dir: PathBuf,
    ports: Vec<(&'static str, u16)>,
}

/// A port nothing listens on right now (the OS picks it).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl PrivateStack {
    /// Starts PostgreSQL and Kafka under `target/private-stacks/<unique>`.
    pub async fn start() -> Result<Self> {
        let root = workspace_root();
        let dir = root.join("target/private-stacks").join(unique("stack"));
        std::fs::create_dir_all(dir.join("kafka"))?;
        // The shared stack's Kafka jars, if resolved already: Maven need not run again.
        let shared_libs = root.join(".local/kafka/libs");
        if shared_libs.join(".sluice-resolved").exists() {
            let status = tokio::process::Command::new("cp")
                .arg("-r")
                .arg(&shared_libs)
                .arg(dir.join("kafka/libs"))
                .status()
                .await?;
            if !status.success() {
                bail!("copying the Kafka jars failed");
            }
        }
        let mut ports = Vec::new();
        for var in [
            "SLUICE_PG_PORT",
            "SLUICE_KAFKA_PORT",
            "SLUICE_KAFKA_CONTROLLER_PORT",
            "SLUICE_KAFKA_SSL_PORT",
            "SLUICE_KAFKA_SASL_PORT",
        ] {
            ports.push((var, free_port()?));
        }
        let stack = Self { dir, ports };
        stack.script("up.sh", &[]).await?;
        Ok(stack)
    }

    async fn script(&self, script: &str, args: &[&str]) -> Result<()> {
        let mut command =
            tokio::process::Command::new(workspace_root().join("deploy/local").join(script));
        command
            .args(args)
            .env("SLUICE_LOCAL_DIR", &self.dir)
            // up.sh starts nothing for services these name.
            .env_remove("DATABASE_URL")
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (var, port) in &self.ports {
            command.env(var, port.to_string());
        }
        let out = command.output().await?;
        if !out.status.success() {
            bail!(
                "{script} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Where the private services listen, read from the env file up.sh wrote.
    pub fn infra(&self) -> Result<Infra> {
        let text = std::fs::read_to_string(self.dir.join("env"))
            .with_context(|| format!("{}/env", self.dir.display()))?;
        let value = |key: &str| {
            text.lines()
                .filter_map(|l| l.strip_prefix("export "))
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.trim_matches('\'').trim_matches('"').to_owned())
        };
        Ok(Infra {
            database_url: value("DATABASE_URL").context("DATABASE_URL")?,
            kafka_bootstrap_servers: value("KAFKA_BOOTSTRAP_SERVERS")
                .context("KAFKA_BOOTSTRAP_SERVERS")?,
            local_ca: value("SLUICE_LOCAL_CA"),
            kafka_ssl: None,
            kafka_sasl: None,
        })
    }

    /// Stops one service (`down.sh --only`), as an outage.
    pub async fn stop(&self, service: Service) -> Result<()> {
        self.script("down.sh", &["--only", service.name()]).await
    }

    /// Starts whatever is stopped again (`up.sh` is idempotent).
    pub async fn restart_stopped(&self) -> Result<()> {
        self.script("up.sh", &[]).await
    }
}

impl Drop for PrivateStack {
    fn drop(&mut self) {
        let mut command = std::process::Command::new(workspace_root().join("deploy/local/down.sh"));
        command
            .arg("--purge")
            .env("SLUICE_LOCAL_DIR", &self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (var, port) in &self.ports {
            command.env(var, port.to_string());
        }
        let _ = command.status();
    }
}
