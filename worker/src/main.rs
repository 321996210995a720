//! `sluice-worker`: parses configuration, sets up logging and runs the worker.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sluice_infra::metrics::MetricsArgs;
use sluice_infra::process::{
    init_tracing, parse_cli, shutdown_signal, ConfigFileArgs, ConnectionArgs, DestinationHostArgs,
    LogArgs,
};
use sluice_protocol::retry::RetryPolicy;
use sluice_worker::{run, Config};

/// Every record is a handful of small allocations in each lane; glibc's allocator
/// spent a quarter of the worker's CPU on them in the throughput benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sluice worker: owns the pipelines of the signals-topic partitions Kafka assigns it
/// and runs their workflows. Start more workers to spread the load.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    config_file: ConfigFileArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    destination_hosts: DestinationHostArgs,
    /// Directory of CA certificates (PEM files) destinations may name by file name in
    /// their URL (`?sslmode=verify-full&sslrootcert=<name>`). A tenant's spec can only
    /// name a file directly inside it; without it, such URLs fail (inline `ssl_ca_pem`
    /// in the destination config always works).
    #[arg(long, env = "SLUICE_DESTINATION_CA_DIR", value_name = "DIR")]
    destination_ca_dir: Option<std::path::PathBuf>,
    /// Directory the file connectors (jsonl source and destination) read and write
    /// in: a spec names files relative to it and can reach nothing outside it. Without
    /// it, pipelines with file connectors go to ERROR.
    #[arg(long, env = "SLUICE_FILES_DIR", value_name = "DIR")]
    files_dir: Option<std::path::PathBuf>,

    /// Unique id of this worker, shown as a pipeline's owner (default: random).
    #[arg(long, env = "SLUICE_WORKER_ID")]
    worker_id: Option<String>,
    /// Consumer group all workers of one deployment join.
    #[arg(long, env = "SLUICE_WORKER_GROUP", default_value = "sluice-workers")]
    group_id: String,
    /// Group session timeout in milliseconds: how long a crashed worker keeps its
    /// pipelines before the survivors take them over.
    #[arg(long, env = "SLUICE_SESSION_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1000..=300_000))]
    session_timeout_ms: u64,
    /// How often each workflow re-reads its pipeline without a signal, in milliseconds.
    #[arg(long, env = "SLUICE_RESYNC_INTERVAL_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    resync_interval_ms: u64,
    /// First retry interval of a failed activity in milliseconds (doubles up to 100 s).
    #[arg(long, env = "SLUICE_RETRY_INITIAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    retry_initial_ms: u64,
    /// Timeout of one activity attempt in milliseconds.
    #[arg(long, env = "SLUICE_ATTEMPT_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    attempt_timeout_ms: u64,
    /// The most pipelines this worker owns at once (0: no limit). A worker at capacity
    /// takes no more: the pipelines of its partitions that it cannot take show as
    /// UNASSIGNED with the reason until it has room (a pipeline removed, or the limit
    /// raised).
    #[arg(long, env = "SLUICE_MAX_PIPELINES", default_value_t = 0)]
    max_pipelines: usize,
    /// Memory for records in flight, in MiB: source slices being read and produced,
    /// and batches being written. Lanes wait when it is spent; what they would read
    /// waits in the source or the records topic. Records fetched ahead of a write lane
    /// come on top: at most a window of a 256th of this (64 KiB to 2 MiB) per
    /// pipeline with unwritten records.
    #[arg(long, env = "SLUICE_RECORDS_MEMORY_MB", default_value_t = sluice_worker::budget::DEFAULT_MB,
          value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
    records_memory_mb: u64,
    /// The most connections this worker keeps open to tenants' PostgreSQL databases
    /// (sources and destinations) all together. Each database gets a pool of up to 4;
    /// past the cap, a database takes over the least recently used pool that no
    /// operation is using, and an operation that finds every pool in use waits (then
    /// fails and is retried).
    #[arg(long, env = "SLUICE_MAX_DATABASE_CONNECTIONS",
          default_value_t = sluice_connectors::pg::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(4..=1_000_000))]
    max_database_connections: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match parse_cli::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let _telemetry = match init_tracing(&cli.log, "sluice-worker") {
        Ok(t) => t,
        Err(code) => return code,
    };
    if let Err(code) = cli.connection.install_secrets_key() {
        return code;
    }

    let worker_id = cli
        .worker_id
        .unwrap_or_else(|| format!("worker-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let kafka = match cli.connection.kafka() {
        Ok(kafka) => kafka,
        Err(code) => return code,
    };
    let destination_hosts = match cli.destination_hosts.policy() {
        Ok(policy) => policy,
        Err(code) => return code,
    };
    let config = Config {
        worker_id,
        database_url: cli.connection.database_url,
        kafka,
        signals_topic: cli.connection.signals_topic,
        group_id: cli.group_id,
        session_timeout: Duration::from_millis(cli.session_timeout_ms),
        resync_interval: Duration::from_millis(cli.resync_interval_ms),
        replication_factor: cli.connection.replication_factor,
        retry: RetryPolicy {
            initial_interval: Duration::from_millis(cli.retry_initial_ms),
            ..RetryPolicy::default()
        },
        attempt_timeout: Duration::from_millis(cli.attempt_timeout_ms),
        destination_ca_dir: cli.destination_ca_dir.filter(|d| !d.as_os_str().is_empty()),
        files_dir: cli.files_dir.filter(|d| !d.as_os_str().is_empty()),
        destination_hosts,
        topic_namespace: cli.connection.topic_namespace.clone(),
        max_pipelines: (cli.max_pipelines > 0).then_some(cli.max_pipelines),
        records_memory: cli.records_memory_mb << 20,
        max_database_connections: cli.max_database_connections,
    };
    let _metrics = match cli.metrics.metrics_listen {
        Some(addr) => {
            let registry = std::sync::Arc::clone(&sluice_worker::metrics::WORKER.registry);
            match sluice_infra::metrics::serve(addr, registry).await {
                Ok((_, task)) => Some(task),
                Err(e) => {
                    eprintln!("error: --metrics-listen {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    match run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            ExitCode::FAILURE
        }
    }
}
