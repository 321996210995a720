//! The Sluice worker: joins the workers' consumer group on the signals topic, owns the
//! pipelines of its assigned partitions and runs one durable workflow for each.
//!
//! The binary is a thin shell around [`run`], which tests can start in-process.

#![forbid(unsafe_code)]

pub mod activity;
pub mod budget;
pub mod claim;
pub mod feeds;
pub mod lanes;
pub mod membership;
pub mod metrics;
pub mod plan;
pub mod store;
pub mod supervisor;
pub mod trim;
pub mod workflow;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use sluice_infra::kafka::{Admin, KafkaSettings};
use sluice_protocol::retry::RetryPolicy;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::membership::{Assignment, MembershipContext, SignalConsumer};
use crate::supervisor::Supervisor;

#[derive(Debug, Clone)]
pub struct Config {
    pub worker_id: String,
    pub database_url: String,
    pub kafka: KafkaSettings,
    pub signals_topic: String,
    pub group_id: String,
    /// Kafka group session timeout: how long a dead worker keeps its pipelines.
    pub session_timeout: Duration,
    /// How often every workflow re-reads its row even without a signal.
    pub resync_interval: Duration,
    pub replication_factor: i32,
    pub retry: RetryPolicy,
    pub attempt_timeout: Duration,
    /// Where destination CA files (`sslrootcert=<name>`) are looked up.
    pub destination_ca_dir: Option<std::path::PathBuf>,
    /// Where the file connectors read and write.
    pub files_dir: Option<std::path::PathBuf>,
    /// Which hosts destinations may connect to.
    pub destination_hosts: sluice_protocol::hosts::HostPolicy,
    /// Prefix of the records topics and Kafka transactional ids this deployment's
    /// workers create: deployments sharing a Kafka cluster need different ones.
    pub topic_namespace: String,
    /// The most pipelines this worker owns at once (None: no limit).
    pub max_pipelines: Option<usize>,
    /// Bytes of records in flight this worker may hold (see [`budget`]).
    pub records_memory: u64,
    /// Connections to tenants' databases, all pools together.
    pub max_database_connections: u32,
}

/// What every workflow of this worker shares.
pub struct WorkerContext {
    pub worker_id: String,
    pub pool: PgPool,
    pub admin: Admin,
    pub kafka: KafkaSettings,
    /// What every connector of this worker shares (settings, database pools).
    pub connectors: sluice_connectors::Context,
    /// The signals-topic partitions this worker is assigned right now.
    pub assignment: Arc<Assignment>,
    pub topic_namespace: String,
    pub retry: RetryPolicy,
    pub attempt_timeout: Duration,
    pub resync_interval: Duration,
    pub replication_factor: i32,
    pub max_pipelines: Option<usize>,
    /// The one consumer every lane of this worker reads its topics through.
    pub feeds: feeds::SharedConsumer,
    /// Setups that may run at once (topic creation, destination DDL): a burst of new
    /// pipelines queues here instead of timing out against the store pool and Kafka.
    pub setup_slots: Arc<tokio::sync::Semaphore>,
    /// Runs that may read at once (each with a transactional producer open).
    pub read_slots: Arc<tokio::sync::Semaphore>,
    /// The budgets for records in flight: half of `--records-memory-mb` for the read
    /// lanes, half for the write lanes, so a slow destination (write lanes waiting
    /// with full batches) never holds reads back: its backlog waits in Kafka.
    pub read_records: budget::RecordsBudget,
    pub write_records: budget::RecordsBudget,
    /// Deletes applied records and inputs from Kafka, for every pipeline.
    pub trimmer: trim::Trimmer,
}

/// How many runs of one worker read their sources at the same time.
pub const READ_CONCURRENCY: usize = 32;

/// How many pipelines one worker sets up at the same time.
pub const SETUP_CONCURRENCY: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("postgres: {0}")]
    Store(#[from] sluice_infra::store::StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] sluice_infra::kafka::KafkaAdminError),
    #[error("kafka client: {0}")]
    KafkaClient(#[from] rdkafka::error::KafkaError),
}

/// Runs the worker until `shutdown` resolves, then stops every workflow at a safe
/// point, releases ownership and leaves the group.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    sluice_infra::store::migrate_url(&config.database_url, Duration::from_secs(60)).await?;
    let pool =
        sluice_infra::store::connect(&config.database_url, 16, Duration::from_secs(60)).await?;
    let admin = config.kafka.admin()?;
    // The control plane normally creates the signals topic; a worker started first
    // waits for it rather than guessing a partition count.
    loop {
        if admin
            .partition_count(&config.signals_topic)
            .await?
            .is_some()
        {
            break;
        }
        tracing::info!(topic = %config.signals_topic, "waiting for the signals topic");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let assignment = Arc::new(Assignment::default());
    let ctx = Arc::new(WorkerContext {
        worker_id: config.worker_id.clone(),
        pool: pool.clone(),
        admin,
        kafka: config.kafka.clone(),
        connectors: sluice_connectors::Context {
            worker_id: config.worker_id.clone(),
            ca_dir: config.destination_ca_dir.clone(),
            files_dir: config.files_dir.clone(),
            hosts: config.destination_hosts.clone(),
            statement_timeout: config.attempt_timeout,
            // A third of the group session: gone well before another worker can take
            // the pipelines of a stopped one over.
            idle_in_transaction_timeout: (config.session_timeout / 3)
                .clamp(Duration::from_secs(1), Duration::from_secs(30)),
            pg_pools: sluice_connectors::pg::Pools::new(config.max_database_connections),
        },
        assignment: Arc::clone(&assignment),
        topic_namespace: config.topic_namespace.clone(),
        retry: config.retry,
        attempt_timeout: config.attempt_timeout,
        resync_interval: config.resync_interval,
        replication_factor: config.replication_factor,
        max_pipelines: config.max_pipelines,
        feeds: feeds::shared_consumer(
            &config.kafka,
            &config.worker_id,
            budget::prefetch_window_kib(config.records_memory),
        )?,
        setup_slots: Arc::new(tokio::sync::Semaphore::new(SETUP_CONCURRENCY)),
        read_slots: Arc::new(tokio::sync::Semaphore::new(READ_CONCURRENCY)),
        read_records: budget::RecordsBudget::new("read", config.records_memory / 2),
        write_records: budget::RecordsBudget::new("write", config.records_memory / 2),
        trimmer: trim::Trimmer::default(),
    });
    let stop_trimming = CancellationToken::new();
    let trimming = tokio::spawn({
        let ctx = Arc::clone(&ctx);
        let stop = stop_trimming.clone();
        async move { ctx.trimmer.run(ctx.admin.clone(), stop).await }
    });

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let session_ms = config.session_timeout.as_millis().max(1000);
    let consumer: SignalConsumer = config
        .kafka
        .client_config()
        .set("group.id", &config.group_id)
        .set("client.id", &config.worker_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        // A new group starts from the oldest retained signal: replaying old signals
        // only causes extra wake-ups, while starting at "latest" could skip a signal
        // sent between the assignment and the offset lookup.
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session_ms.to_string())
        .set(
            "heartbeat.interval.ms",
            (session_ms / 4).max(250).to_string(),
        )
        .create_with_context(MembershipContext {
            events: events_tx.clone(),
            assignment,
        })?;
    consumer.subscribe(&[&config.signals_topic])?;
    tracing::info!(worker_id = %config.worker_id, group = %config.group_id, "worker joined the group");

    let stop_supervisor = CancellationToken::new();
    let supervisor =
        tokio::spawn(Supervisor::new(Arc::clone(&ctx)).run(events_rx, stop_supervisor.clone()));
    let stop_polling = CancellationToken::new();
    {
        let polling = membership::poll_signals(&consumer, events_tx, stop_polling.clone());
        tokio::pin!(polling);
        tokio::pin!(shutdown);
        tokio::select! {
            _ = &mut polling => {}
            _ = &mut shutdown => {}
        }
        tracing::info!("worker draining");
        // Stop workflows first (they checkpoint and release) while still a group
        // member; polling goes on meanwhile so rebalance callbacks stay served.
        stop_supervisor.cancel();
        tokio::select! {
            _ = &mut polling => {}
            _ = supervisor => {}
        }
    }
    stop_polling.cancel();
    stop_trimming.cancel();
    let _ = trimming.await;
    // Leave the group so the partitions move to the other workers at once.
    consumer.unsubscribe();
    drop(consumer);
    pool.close().await;
    tracing::info!("worker stopped");
    Ok(())
}
