//! The Sluice processes of a [`Deployment`] run by `deploy/local/stack.sh`, as an
//! operator of the local stack runs them: the runbooks' commands (`stack.sh restart
//! worker-1`, ...) then act on the test's processes. Everything stack.sh keeps (its
//! env file, pid files, process logs, sluicectl's config) lives in a directory of its
//! own under the deployment's log directory, so the suite's secret check reads the
//! logs too.

use std::path::PathBuf;
use std::process::Output;

use anyhow::{ensure, Context, Result};

use crate::{workspace_root, Deployment};

pub struct LocalStack {
    /// SLUICE_LOCAL_DIR of the stack.
    pub local_dir: PathBuf,
    /// CARGO_TARGET_DIR whose debug binaries the stack runs (default: the workspace's).
    pub target_dir: Option<PathBuf>,
    /// What the stack's env file sets. The same values go into the environment of
    /// every command run on the stack, so that variables the test itself inherited
    /// (test.sh's DATABASE_URL, SLUICE_SECRETS_KEY_FILE, ...) cannot override them.
    file_env: Vec<(String, String)>,
    pub addr: String,
    pub token: String,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl LocalStack {
    /// Writes the stack's env file for `d` (its database, topics, group and secrets
    /// key; short test timings) and runs `stack.sh start --no-build` with `workers`
    /// workers (worker-1 ...). Points `d`'s clients at the stack's control plane.
    pub async fn start(d: &mut Deployment, workers: usize) -> Result<Self> {
        Self::start_from(d, workers, None).await
    }

    /// [`LocalStack::start`] running the binaries of `target_dir`/debug.
    pub async fn start_from(
        d: &mut Deployment,
        workers: usize,
        target_dir: Option<PathBuf>,
    ) -> Result<Self> {
        ensure!(
            d.process_kafka.is_none() && d.kafka_properties_file.is_none(),
            "the local stack runs on plain Kafka"
        );
        let local_dir = d.log_dir.join("stack");
        std::fs::create_dir_all(&local_dir)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let key = d
            .secrets_key_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let env = [
            ("DATABASE_URL", d.database_url.as_str()),
            (
                "KAFKA_BOOTSTRAP_SERVERS",
                d.infra.kafka_bootstrap_servers.as_str(),
            ),
            ("SLUICE_SECRETS_KEY_FILE", key.as_str()),
            ("SLUICE_SIGNALS_TOPIC", d.signals_topic.as_str()),
            ("SLUICE_WORKER_GROUP", d.group.as_str()),
            ("SLUICE_TOPIC_NAMESPACE", d.topic_namespace.as_str()),
            ("SLUICE_SIGNAL_PARTITIONS", "4"),
            ("SLUICE_LISTEN", addr.as_str()),
            ("SLUICE_SESSION_TIMEOUT_MS", "6000"),
            ("SLUICE_RESYNC_INTERVAL_MS", "2000"),
            ("SLUICE_RETRY_INITIAL_MS", "200"),
        ];
        let mut text = String::from("# written by the test (LocalStack)\n");
        for (k, v) in env {
            text.push_str(&format!("export {k}='{v}'\n"));
        }
        let file_env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        std::fs::write(local_dir.join("env"), text)?;
        let mut stack = Self {
            local_dir,
            target_dir,
            file_env,
            addr: addr.clone(),
            token: String::new(),
        };
        stack
            .run(
                &["start", "--no-build"],
                &[("SLUICE_LOCAL_WORKERS", &workers.to_string())],
            )
            .await?;
        stack.token = std::fs::read_to_string(stack.local_dir.join("token"))
            .context("stack.sh wrote no token")?
            .trim()
            .to_owned();
        d.control_plane_addr = Some(addr);
        d.token = Some(stack.token.clone());
        Ok(stack)
    }

    /// The environment a shell needs to run `deploy/local/stack.sh` on this stack.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = self.file_env.clone();
        env.push((
            "SLUICE_LOCAL_DIR".to_owned(),
            self.local_dir.display().to_string(),
        ));
        if let Some(dir) = &self.target_dir {
            env.push(("CARGO_TARGET_DIR".to_owned(), dir.display().to_string()));
        }
        env
    }

    /// Runs `stack.sh ARGS` (with extra environment); fails unless it succeeds.
    pub async fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let out = tokio::process::Command::new(stack_sh())
            .args(args)
            .envs(self.env())
            .envs(env.iter().copied())
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "stack.sh {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// The pid of a running process of the stack (`worker-1`, `control-plane`).
    pub fn pid(&self, name: &str) -> Result<u32> {
        let text = std::fs::read_to_string(self.local_dir.join("run").join(format!("{name}.pid")))
            .with_context(|| format!("{name} has no pid file"))?;
        Ok(text.trim().parse()?)
    }

    /// The log of one process of the stack.
    pub fn log(&self, name: &str) -> Result<String> {
        Ok(std::fs::read_to_string(
            self.local_dir.join("run").join(format!("{name}.log")),
        )?)
    }

    /// Stops every process of the stack.
    pub async fn stop(mut self) -> Result<()> {
        let result = self.run(&["stop"], &[]).await.map(|_| ());
        self.local_dir = PathBuf::new();
        result
    }
}

impl Drop for LocalStack {
    /// A failed test leaves no process behind.
    fn drop(&mut self) {
        if self.local_dir.as_os_str().is_empty() {
            return;
        }
        let _ = std::process::Command::new(stack_sh())
            .arg("stop")
            .envs(self.env())
            .env("SLUICE_STOP_TIMEOUT", "5")
            .status();
    }
}

fn stack_sh() -> PathBuf {
    workspace_root().join("deploy/local/stack.sh")
}
