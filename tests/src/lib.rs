//! Harness for end-to-end tests: every test gets its own database, signals topic and
//! worker group on the shared PostgreSQL and Kafka that `deploy/local/up.sh` started,
//! and starts the real `sluice-control-plane` and `sluice-worker` binaries.

#![forbid(unsafe_code)]

pub mod audit;
pub mod local_stack;
pub mod procstat;
pub mod stack;

use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sluice_protocol::auth::BearerToken;
use sluice_protocol::conversions::json_to_struct;
use sluice_protocol::pb;
use sluice_protocol::pb::pipeline_service_client::PipelineServiceClient;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Client = PipelineServiceClient<InterceptedService<Channel, BearerToken>>;

/// The tenant of the operator token every deployment's default client uses.
pub const TEST_TENANT: &str = "t1";

/// The internal key (topics, events, outbox) of a pipeline of [`TEST_TENANT`].
pub fn key(id: &str) -> String {
    sluice_protocol::ids::pipeline_key(TEST_TENANT, id)
}

/// Where the shared infrastructure listens: the environment, else `.local/env`.
pub struct Infra {
    pub database_url: String,
    pub kafka_bootstrap_servers: String,
    /// The CA of the local PostgreSQL's and Kafka's certificates (set by up.sh).
    pub local_ca: Option<String>,
    /// The local Kafka's TLS listener (set by up.sh).
    pub kafka_ssl: Option<String>,
    /// The local Kafka's SASL_SSL listener and the file with user "sluice"'s password.
    pub kafka_sasl: Option<(String, String)>,
}

impl Infra {
    pub fn from_env() -> Result<Self> {
        let mut database_url = std::env::var("DATABASE_URL").ok();
        let mut kafka = std::env::var("KAFKA_BOOTSTRAP_SERVERS").ok();
        let mut local_ca = std::env::var("SLUICE_LOCAL_CA").ok();
        let mut kafka_ssl = std::env::var("SLUICE_LOCAL_KAFKA_SSL").ok();
        let mut kafka_sasl = std::env::var("SLUICE_LOCAL_KAFKA_SASL").ok();
        let mut sasl_password_file = std::env::var("SLUICE_LOCAL_KAFKA_SASL_PASSWORD_FILE").ok();
        if database_url.is_none() || kafka.is_none() {
            let env_file = workspace_root().join(".local/env");
            let text = std::fs::read_to_string(&env_file).with_context(|| {
                format!(
                    "DATABASE_URL/KAFKA_BOOTSTRAP_SERVERS unset and {} missing: run deploy/local/up.sh",
                    env_file.display()
                )
            })?;
            for line in text.lines() {
                let Some(rest) = line.strip_prefix("export ") else {
                    continue;
                };
                if let Some((k, v)) = rest.split_once('=') {
                    let v = v.trim_matches('\'').trim_matches('"').to_owned();
                    match k {
                        "DATABASE_URL" => database_url = database_url.or(Some(v)),
                        "KAFKA_BOOTSTRAP_SERVERS" => kafka = kafka.or(Some(v)),
                        "SLUICE_LOCAL_CA" => local_ca = local_ca.or(Some(v)),
                        "SLUICE_LOCAL_KAFKA_SSL" => kafka_ssl = kafka_ssl.or(Some(v)),
                        "SLUICE_LOCAL_KAFKA_SASL" => kafka_sasl = kafka_sasl.or(Some(v)),
                        "SLUICE_LOCAL_KAFKA_SASL_PASSWORD_FILE" => {
                            sasl_password_file = sasl_password_file.or(Some(v))
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(Self {
            database_url: database_url.context("DATABASE_URL not found")?,
            kafka_bootstrap_servers: kafka.context("KAFKA_BOOTSTRAP_SERVERS not found")?,
            local_ca,
            kafka_ssl,
            kafka_sasl: kafka_sasl.zip(sasl_password_file),
        })
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// The directory holding the workspace's binaries (next to this test executable).
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>  or  target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "binary {name} not found next to {}: run `cargo build --bins` first",
        exe.display()
    )
}

/// A unique suffix for names of one test's resources.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// One isolated Sluice deployment: its own database, signals topic and worker group.
pub struct Deployment {
    pub infra: Infra,
    pub db_name: String,
    pub database_url: String,
    /// Where the processes' logs go (one file each), kept after the test so a run's
    /// logs can be searched (deploy/local/test.sh greps them for secrets).
    pub log_dir: PathBuf,
    /// The deployment's secrets key file, given to the control plane and workers
    /// (None: they run without a secrets key).
    pub secrets_key_file: Option<PathBuf>,
    pub signals_topic: String,
    pub group: String,
    /// The workers' topic namespace: records topics of different deployments on the
    /// shared broker never meet.
    pub topic_namespace: String,
    pub pool: PgPool,
    control_plane: Option<Process>,
    pub control_plane_addr: Option<String>,
    /// Operator token of [`TEST_TENANT`], used by [`Deployment::client`].
    pub token: Option<String>,
    /// The database URL the control plane and workers get, when not `database_url`
    /// (e.g. the same database with TLS parameters).
    pub process_database_url: Option<String>,
    /// Kafka as the control plane and workers see it, when not the plaintext listener:
    /// bootstrap servers plus librdkafka properties (e.g. the TLS listener).
    pub process_kafka: Option<(String, Vec<(String, String)>)>,
    /// A librdkafka properties file for the control plane and workers
    /// (SLUICE_KAFKA_PROPERTIES_FILE).
    pub kafka_properties_file: Option<PathBuf>,
    /// Extra flags for the control plane (set before starting it).
    pub control_plane_args: Vec<String>,
    /// Partitions of the signals topic the control plane creates (default 4).
    pub signal_partitions: u32,
    workers: Vec<Process>,
}

pub struct Process {
    pub name: String,
    child: Child,
}

impl Process {
    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(mut self) -> Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let status = tokio::time::timeout(Duration::from_secs(40), self.child.wait())
            .await
            .with_context(|| format!("{} did not exit after SIGTERM", self.name))??;
        Ok(status)
    }

    /// SIGKILL: a crash.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().context("process already exited")?;
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// SIGSTOP: the process stops in the middle of whatever it was doing, as a worker
    /// does in a long GC-like stall or when its VM is suspended.
    pub fn suspend(&self) -> Result<()> {
        self.signal("STOP")
    }

    /// SIGCONT after [`Process::suspend`].
    pub fn resume(&self) -> Result<()> {
        self.signal("CONT")
    }
}

impl Deployment {
    pub async fn new() -> Result<Self> {
        Self::on(Infra::from_env()?).await
    }

    /// A deployment on the given PostgreSQL and Kafka (e.g. a private stack).
    pub async fn on(infra: Infra) -> Result<Self> {
        let db_name = unique("sluice_t");
        let mut admin = PgConnection::connect(&infra.database_url).await?;
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&mut admin)
            .await?;
        let database_url = replace_db(&infra.database_url, &db_name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&database_url)
            .await?;
        let log_dir = std::env::var_os("SLUICE_E2E_LOG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/e2e-logs"))
            .join(&db_name);
        std::fs::create_dir_all(&log_dir)?;
        eprintln!("process logs: {}", log_dir.display());
        let secrets_key_file = log_dir.join("secrets.key");
        let key: [u8; 32] = rand::random();
        std::fs::write(&secrets_key_file, base64_key(&key))?;
        Ok(Self {
            log_dir,
            secrets_key_file: Some(secrets_key_file),
            signals_topic: unique("sluice.signals.t").replace('_', "."),
            group: unique("sluice-workers-t"),
            topic_namespace: unique("sluice-t"),
            infra,
            db_name,
            database_url,
            pool,
            control_plane: None,
            control_plane_addr: None,
            token: None,
            process_database_url: None,
            process_kafka: None,
            kafka_properties_file: None,
            control_plane_args: Vec::new(),
            signal_partitions: 4,
            workers: Vec::new(),
        })
    }

    pub async fn start_control_plane(&mut self) -> Result<Client> {
        self.start_control_plane_process().await?;
        self.client().await
    }

    /// Starts the control plane and creates the operator token, without connecting
    /// (for a control plane that serves TLS); returns its address.
    pub async fn start_control_plane_process(&mut self) -> Result<String> {
        let (addr, process) = self.spawn_control_plane("control-plane").await?;
        self.control_plane = Some(process);
        self.control_plane_addr = Some(addr.clone());
        if self.token.is_none() {
            self.token = Some(self.create_token(TEST_TENANT, "operator").await?);
        }
        Ok(addr)
    }

    /// Starts one more control-plane replica of the deployment (same database, topics
    /// and settings), logging as `name`; returns its address and process.
    pub async fn start_control_plane_replica(&self, name: &str) -> Result<(String, Process)> {
        self.spawn_control_plane(name).await
    }

    async fn spawn_control_plane(&self, name: &str) -> Result<(String, Process)> {
        let mut command = Command::new(bin_path("sluice-control-plane")?);
        command.args(["--listen", "127.0.0.1:0", "--signal-partitions"]);
        command.arg(self.signal_partitions.to_string());
        self.with_secrets_key(&mut command);
        self.with_kafka(&mut command);
        let mut child = command
            .args(&self.control_plane_args)
            .env("DATABASE_URL", self.process_database_url())
            .env("SLUICE_SIGNALS_TOPIC", &self.signals_topic)
            .env("SLUICE_TOPIC_NAMESPACE", &self.topic_namespace)
            .stdout(Stdio::piped())
            .stderr(self.log_file(name)?)
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return Ok::<_, anyhow::Error>(addr.to_owned());
                }
            }
            bail!("control plane exited before listening")
        })
        .await
        .context("control plane did not start listening")??;
        Ok((
            addr,
            Process {
                name: name.into(),
                child,
            },
        ))
    }

    /// KAFKA_BOOTSTRAP_SERVERS and `--kafka-property` flags for a process.
    fn with_kafka<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        match &self.kafka_properties_file {
            Some(path) => command.env("SLUICE_KAFKA_PROPERTIES_FILE", path),
            None => command.env_remove("SLUICE_KAFKA_PROPERTIES_FILE"),
        };
        match &self.process_kafka {
            None => command.env(
                "KAFKA_BOOTSTRAP_SERVERS",
                &self.infra.kafka_bootstrap_servers,
            ),
            Some((bootstrap, properties)) => {
                command.env("KAFKA_BOOTSTRAP_SERVERS", bootstrap);
                for (k, v) in properties {
                    command.arg("--kafka-property").arg(format!("{k}={v}"));
                }
                command
            }
        }
    }

    fn process_database_url(&self) -> &str {
        self.process_database_url
            .as_deref()
            .unwrap_or(&self.database_url)
    }

    /// Sets SLUICE_SECRETS_KEY_FILE for a process, or removes an inherited one.
    fn with_secrets_key<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        match &self.secrets_key_file {
            Some(path) => command.env("SLUICE_SECRETS_KEY_FILE", path),
            None => command.env_remove("SLUICE_SECRETS_KEY_FILE"),
        }
    }

    /// An append-mode log file for process `name`.
    pub fn log_file(&self, name: &str) -> Result<Stdio> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("{name}.log")))?;
        Ok(Stdio::from(file))
    }

    /// Everything the deployment's processes logged so far.
    pub fn logs(&self) -> Result<String> {
        let mut all = String::new();
        for entry in std::fs::read_dir(&self.log_dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "log") {
                all.push_str(&std::fs::read_to_string(&path)?);
            }
        }
        Ok(all)
    }

    /// Creates a token through `sluice-control-plane tokens create`, as an admin would.
    pub async fn create_token(&self, tenant: &str, role: &str) -> Result<String> {
        let out = Command::new(bin_path("sluice-control-plane")?)
            .args(["tokens", "create", "--tenant", tenant, "--role", role])
            .args(["--name", &format!("{role}-{tenant}")])
            .env("DATABASE_URL", &self.database_url)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "tokens create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// A client with the deployment's operator token.
    pub async fn client(&self) -> Result<Client> {
        self.client_with(self.token.as_deref()).await
    }

    /// A client of the control plane at `addr` with the deployment's operator token.
    pub async fn client_at(&self, addr: &str) -> Result<Client> {
        self.client_at_with(addr, self.token.as_deref()).await
    }

    /// A client of the control plane (replica) at `addr` that sends `token`.
    pub async fn client_at_with(&self, addr: &str, token: Option<&str>) -> Result<Client> {
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        Ok(PipelineServiceClient::with_interceptor(
            channel,
            BearerToken::new(token)?,
        ))
    }

    /// A client sending `token` (None: no authorization header at all).
    pub async fn client_with(&self, token: Option<&str>) -> Result<Client> {
        let addr = self
            .control_plane_addr
            .as_ref()
            .context("no control plane")?;
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        Ok(PipelineServiceClient::with_interceptor(
            channel,
            BearerToken::new(token)?,
        ))
    }

    /// Starts a worker with test-friendly timings; returns its index.
    pub async fn start_worker(&mut self, worker_id: &str) -> Result<usize> {
        self.start_worker_with(worker_id, &[]).await
    }

    /// Starts a worker with extra (or overriding) environment variables.
    pub async fn start_worker_with(
        &mut self,
        worker_id: &str,
        env: &[(&str, &str)],
    ) -> Result<usize> {
        let mut command = Command::new(bin_path("sluice-worker")?);
        self.with_secrets_key(&mut command);
        self.with_kafka(&mut command);
        let child = command
            .env("DATABASE_URL", self.process_database_url())
            .env("SLUICE_SIGNALS_TOPIC", &self.signals_topic)
            .env("SLUICE_WORKER_GROUP", &self.group)
            .env("SLUICE_WORKER_ID", worker_id)
            .env("SLUICE_TOPIC_NAMESPACE", &self.topic_namespace)
            .env("SLUICE_SESSION_TIMEOUT_MS", "6000")
            .env("SLUICE_RESYNC_INTERVAL_MS", "2000")
            .env("SLUICE_RETRY_INITIAL_MS", "200")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(self.log_file(worker_id)?)
            .kill_on_drop(true)
            .spawn()?;
        self.workers.push(Process {
            name: worker_id.to_owned(),
            child,
        });
        Ok(self.workers.len() - 1)
    }

    pub fn take_worker(&mut self, index: usize) -> Process {
        self.workers.remove(index)
    }

    /// The running worker called `worker_id`.
    pub fn worker(&self, worker_id: &str) -> Result<&Process> {
        self.workers
            .iter()
            .find(|w| w.name == worker_id)
            .with_context(|| format!("no worker {worker_id}"))
    }

    /// Removes the worker called `worker_id` from the deployment and returns it.
    pub fn take_worker_named(&mut self, worker_id: &str) -> Result<Process> {
        let index = self
            .workers
            .iter()
            .position(|w| w.name == worker_id)
            .with_context(|| format!("no worker {worker_id}"))?;
        Ok(self.workers.remove(index))
    }

    /// A destination config writing into this deployment's database.
    pub fn destination(&self, table: &str, drop_table_on_delete: bool) -> Value {
        json!({"url": self.database_url, "table": table, "drop_table_on_delete": drop_table_on_delete})
    }

    pub async fn row_count(&self, table: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar(&format!("SELECT count(*) FROM public.{table}"))
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn table_exists(&self, table: &str) -> Result<bool> {
        Ok(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("public.{table}"))
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn shutdown(mut self) -> Result<()> {
        for w in self.workers.drain(..) {
            w.stop().await?;
        }
        if let Some(cp) = self.control_plane.take() {
            cp.stop().await?;
        }
        self.pool.close().await;
        let mut admin = PgConnection::connect(&self.infra.database_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.db_name
        ))
        .execute(&mut admin)
        .await?;
        let admin =
            sluice_infra::kafka::KafkaSettings::new(&self.infra.kafka_bootstrap_servers).admin()?;
        admin.delete_topic(&self.signals_topic).await?;
        Ok(())
    }
}

fn base64_key(key: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A create request for a generator → postgres pipeline.
pub fn generator_pipeline(
    id: &str,
    count: u64,
    seed: u64,
    destination: Value,
    desired: pb::DesiredStatus,
) -> pb::CreatePipelineRequest {
    pb::CreatePipelineRequest {
        pipeline_id: id.to_owned(),
        pipeline: Some(pb::Pipeline {
            spec: Some(pb::PipelineSpec {
                source: Some(connector(
                    "generator",
                    json!({"count": count, "seed": seed, "slice_size": 500}),
                )),
                destination: Some(connector("postgres", destination)),
                ..Default::default()
            }),
            desired_status: desired as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn connector(kind: &str, config: Value) -> pb::ConnectorSpec {
    let Value::Object(map) = config else {
        panic!("connector config must be a JSON object");
    };
    pb::ConnectorSpec {
        r#type: kind.to_owned(),
        config: Some(json_to_struct(&map)),
    }
}

pub fn set_desired(id: &str, desired: pb::DesiredStatus) -> pb::UpdatePipelineRequest {
    pb::UpdatePipelineRequest {
        pipeline: Some(pb::Pipeline {
            id: id.to_owned(),
            desired_status: desired as i32,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["desired_status".into()],
        }),
        ..Default::default()
    }
}

pub async fn get(client: &mut Client, id: &str) -> Result<pb::Pipeline, tonic::Status> {
    client
        .get_pipeline(pb::GetPipelineRequest { id: id.to_owned() })
        .await
        .map(tonic::Response::into_inner)
}

/// Creates ACTIVE generator pipelines `<prefix>-<i>` for every i of `range`, each of
/// `count` records into a table of its own (dropped with the pipeline); reports every
/// thousandth on stderr.
pub async fn create_generator_fleet(
    d: &Deployment,
    client: &mut Client,
    prefix: &str,
    range: std::ops::Range<usize>,
    count: u64,
) -> Result<()> {
    for i in range {
        client
            .create_pipeline(generator_pipeline(
                &format!("{prefix}-{i}"),
                count,
                1,
                d.destination(&unique(&format!("{prefix}_{i}")), true),
                pb::DesiredStatus::Active,
            ))
            .await?;
        if (i + 1) % 1000 == 0 {
            eprintln!("created {}", i + 1);
        }
    }
    Ok(())
}

/// Polls `check` until it returns Some or `timeout` passes.
/// Waits until `n` pipelines of the deployment are READY, owned, for their current
/// generation (read from the database: one query for a whole fleet).
pub async fn wait_fleet_ready(pool: &PgPool, n: usize, timeout: Duration) -> Result<()> {
    wait_for("the fleet to be READY", timeout, || async {
        let ready: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pipelines WHERE status = 'READY' \
             AND observed_generation >= generation AND owner IS NOT NULL",
        )
        .fetch_one(pool)
        .await?;
        Ok((ready == n as i64).then_some(()))
    })
    .await
}

pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the worker has acted on the latest generation and reports `status`.
pub async fn wait_converged(
    client: &mut Client,
    id: &str,
    status: pb::PipelineStatus,
    timeout: Duration,
) -> Result<pb::Pipeline> {
    let deadline = Instant::now() + timeout;
    loop {
        let p = get(client, id).await?;
        if p.status == status as i32 && p.observed_generation >= p.generation {
            return Ok(p);
        }
        // An ERROR the worker reported for an older generation is what a retry replaces.
        if p.status == pb::PipelineStatus::Error as i32
            && status != pb::PipelineStatus::Error
            && p.observed_generation >= p.generation
        {
            bail!("{id} went to ERROR: {}", p.last_error);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {id} to reach {status:?}; last seen: {p:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pipeline's history as `to_status` names, oldest first.
pub async fn history(client: &mut Client, id: &str) -> Result<Vec<String>> {
    Ok(client
        .list_pipeline_events(pb::ListPipelineEventsRequest {
            pipeline_id: id.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.to_status)
        .collect())
}

/// Waits until `GetPipeline` answers NOT_FOUND: teardown finished and the row is gone.
pub async fn wait_removed(client: &Client, id: &str, timeout: Duration) -> Result<()> {
    wait_for(&format!("{id} to be removed"), timeout, || {
        let mut client = client.clone();
        async move {
            match get(&mut client, id).await {
                Err(s) if s.code() == tonic::Code::NotFound => Ok(Some(())),
                Err(s) => Err(s.into()),
                Ok(_) => Ok(None),
            }
        }
    })
    .await
}

/// An update that replaces the pipeline's destination (mask `spec.destination`).
pub fn set_destination(id: &str, config: Value) -> pb::UpdatePipelineRequest {
    pb::UpdatePipelineRequest {
        pipeline: Some(pb::Pipeline {
            id: id.to_owned(),
            spec: Some(pb::PipelineSpec {
                source: None,
                destination: Some(connector("postgres", config)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["spec.destination".into()],
        }),
        ..Default::default()
    }
}

/// A login role whose password is the secret, so the destination really needs it.
pub struct SecretRole {
    pub name: String,
    pub password: String,
}

impl SecretRole {
    pub async fn create(d: &Deployment) -> Result<Self> {
        let name = unique("secret_role");
        // Distinctive, so a grep of the logs cannot match anything by accident;
        // deploy/local/test.sh greps a whole run's logs for "e2e-secret-".
        let password = format!("e2e-secret-{}", &unique("p")[2..]);
        sqlx::query(&format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
            .execute(&d.pool)
            .await?;
        for grant in [
            format!("GRANT ALL ON DATABASE {} TO {name}", d.db_name),
            format!("GRANT ALL ON SCHEMA public TO {name}"),
        ] {
            sqlx::query(&grant).execute(&d.pool).await?;
        }
        Ok(Self { name, password })
    }

    pub fn url(&self, d: &Deployment) -> String {
        let (scheme, rest) = d.database_url.split_once("://").expect("a URL");
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        format!("{scheme}://{}:{}@{host}", self.name, self.password)
    }

    pub async fn drop(self, admin_url: &str) -> Result<()> {
        let mut admin = PgConnection::connect(admin_url).await?;
        sqlx::query(&format!("DROP ROLE IF EXISTS {}", self.name))
            .execute(&mut admin)
            .await?;
        Ok(())
    }
}

/// A generator source config: `count` records of `seed`, `slice_size` per slice and at
/// most `records_per_second` (0: unlimited).
pub fn generator_config(count: u64, seed: u64, slice_size: u64, records_per_second: u64) -> Value {
    json!({"count": count, "seed": seed, "slice_size": slice_size, "records_per_second": records_per_second})
}

/// A create request with explicit source and destination configs.
pub fn pipeline_request(
    id: &str,
    source: Value,
    destination: Value,
    desired: pb::DesiredStatus,
) -> pb::CreatePipelineRequest {
    pb::CreatePipelineRequest {
        pipeline_id: id.to_owned(),
        pipeline: Some(pb::Pipeline {
            spec: Some(pb::PipelineSpec {
                source: Some(connector("generator", source)),
                destination: Some(connector("postgres", destination)),
                ..Default::default()
            }),
            desired_status: desired as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An update that replaces the pipeline's source (mask `spec.source`).
pub fn set_source(id: &str, config: Value) -> pb::UpdatePipelineRequest {
    pb::UpdatePipelineRequest {
        pipeline: Some(pb::Pipeline {
            id: id.to_owned(),
            spec: Some(pb::PipelineSpec {
                source: Some(connector("generator", config)),
                destination: None,
                ..Default::default()
            }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["spec.source".into()],
        }),
        ..Default::default()
    }
}

/// Waits until pipeline `id` is owned by `worker_id`.
pub async fn wait_owner(
    client: &Client,
    id: &str,
    worker_id: &str,
    timeout: Duration,
) -> Result<()> {
    wait_for(&format!("{id} to be owned by {worker_id}"), timeout, || {
        let mut client = client.clone();
        async move { Ok((get(&mut client, id).await?.owner == worker_id).then_some(())) }
    })
    .await
}

impl Deployment {
    /// The records topic the pipeline's setup created (as its checkpoint records it).
    pub async fn records_topic(&self, id: &str) -> Result<String> {
        let topic: Option<String> =
            sqlx::query_scalar("SELECT checkpoint->>'records_topic' FROM pipelines WHERE id = $1")
                .bind(key(id))
                .fetch_one(&self.pool)
                .await?;
        topic.with_context(|| format!("{id} has no records topic yet"))
    }

    /// Whether process `name`'s log contains `needle` within `timeout` (false after it).
    pub async fn log_mentions(&self, name: &str, needle: &str, timeout: Duration) -> bool {
        let path = self.log_dir.join(format!("{name}.log"));
        wait_for(&format!("{name} to log {needle:?}"), timeout, || {
            let path = path.clone();
            async move {
                Ok(std::fs::read_to_string(&path)
                    .unwrap_or_default()
                    .contains(needle)
                    .then_some(()))
            }
        })
        .await
        .is_ok()
    }
}

/// stripe-mock (Stripe's mock of its API, installed by deploy/local/stripe-mock.sh) on
/// a port of its own; stopped when dropped.
pub struct StripeMock {
    pub url: String,
    _child: Child,
}

impl StripeMock {
    pub async fn start(d: &Deployment) -> Result<Self> {
        let bin = std::env::var_os("SLUICE_STRIPE_MOCK")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join(".local/bin/stripe-mock"));
        if !bin.exists() {
            bail!(
                "{} is missing: run deploy/local/stripe-mock.sh",
                bin.display()
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(bin)
            .args(["-http-port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(d.log_file("stripe-mock")?)
            .kill_on_drop(true)
            .spawn()?;
        let addr = format!("127.0.0.1:{port}");
        wait_for("stripe-mock to listen", Duration::from_secs(30), || {
            let addr = addr.clone();
            async move { Ok(tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ())) }
        })
        .await?;
        Ok(Self {
            url: format!("http://{addr}"),
            _child: child,
        })
    }

    /// GETs `path` (e.g. "/v1/customers") and returns the JSON body.
    pub async fn get(&self, path: &str) -> Result<Value> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.url.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!(
                    "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer sk_test_e2e\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let text = String::from_utf8(response)?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .context("an HTTP response")?;
        Ok(serde_json::from_str(body)?)
    }
}

/// A plain HTTP/1.0 GET of `path` on 127.0.0.1:`port` (the metrics server), waiting up
/// to 30 s for the port to open; returns the status line and headers, and the body.
pub async fn http_get(port: u16, path: &str) -> Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => break s,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => bail!("port {port}: {e}"),
        }
    };
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("an HTTP response")?;
    Ok((head.to_owned(), body.to_owned()))
}
