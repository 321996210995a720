//! The Sluice worker: joins the workers' consumer group on the signals topic, owns the
//! pipelines of its assigned partitions and runs one durable workflow for each.
//!
//! The binary is a thin shell around [`run`], which tests can start in-process.

#![forbid(unsafe_code)]

pub mod activity;
pub mod connectors;
pub mod lanes;
pub mod membership;
pub mod store;
pub mod supervisor;
pub mod workflow;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureProducer;
use sluice_infra::kafka::{Admin, KafkaSettings};
use sluice_protocol::retry::RetryPolicy;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::connectors::postgres::DestinationPools;
use crate::membership::{MembershipContext, SignalConsumer};
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
}

/// What every workflow of this worker shares.
pub struct WorkerContext {
    pub worker_id: String,
    pub pool: PgPool,
    pub admin: Admin,
    /// One producer for all pipelines of this worker.
    pub producer: FutureProducer,
    pub kafka: KafkaSettings,
    pub destinations: DestinationPools,
    pub retry: RetryPolicy,
    pub attempt_timeout: Duration,
    pub resync_interval: Duration,
    pub replication_factor: i32,
}

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
    let pool =
        sluice_infra::store::connect(&config.database_url, 16, Duration::from_secs(60)).await?;
    sluice_infra::store::migrate(&pool).await?;
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
    let producer: FutureProducer = config
        .kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()?;

    let ctx = Arc::new(WorkerContext {
        worker_id: config.worker_id.clone(),
        pool: pool.clone(),
        admin,
        producer,
        kafka: config.kafka.clone(),
        destinations: DestinationPools::default(),
        retry: config.retry,
        attempt_timeout: config.attempt_timeout,
        resync_interval: config.resync_interval,
        replication_factor: config.replication_factor,
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
    // Leave the group so the partitions move to the other workers at once.
    consumer.unsubscribe();
    drop(consumer);
    pool.close().await;
    tracing::info!("worker stopped");
    Ok(())
}
