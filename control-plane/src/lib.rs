//! The Sluice control plane: a tonic server that validates requests, stores pipelines in
//! Postgres and signals workers through a transactional outbox relayed to Kafka.
//!
//! The binary is a thin shell around [`run`], which tests can start in-process.

#![forbid(unsafe_code)]

pub mod auth;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod service;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use sluice_infra::kafka::KafkaSettings;
use sluice_protocol::pb::pipeline_service_server::PipelineServiceServer;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::outbox::OutboxRelay;
pub use crate::service::Limits;
use crate::service::PipelineApi;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: String,
    pub kafka: KafkaSettings,
    pub signals_topic: String,
    /// Partitions of the signals topic when the control plane has to create it. An
    /// existing topic keeps its own count.
    pub signal_partitions: i32,
    pub replication_factor: i32,
    pub limits: Limits,
    /// Largest request message accepted, in bytes.
    pub max_request_bytes: usize,
    /// Serve TLS instead of plaintext gRPC.
    pub tls: Option<TlsFiles>,
    /// Destination hosts the deployment allows; specs naming others are refused.
    pub destination_hosts: sluice_protocol::hosts::HostPolicy,
    /// Prefix of the per-pipeline topics (the inputs topics made here).
    pub topic_namespace: String,
    /// How long a token found valid is trusted without a lookup (see
    /// [`auth::TokenCache`]); zero looks every call's token up.
    pub token_cache_ttl: std::time::Duration,
}

/// PEM files of the gRPC listener's TLS identity; with `client_ca`, clients must
/// present a certificate signed by it (mutual TLS).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn server_config(&self) -> Result<ServerTlsConfig, RunError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| RunError::Tls {
                path: path.clone(),
                source,
            })
        };
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?));
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("postgres: {0}")]
    Store(#[from] sluice_infra::store::StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] sluice_infra::kafka::KafkaAdminError),
    #[error("kafka client: {0}")]
    KafkaClient(#[from] rdkafka::error::KafkaError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read TLS file {path}: {source}")]
    Tls {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("grpc server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Runs the control plane until `shutdown` resolves. `on_listening` receives the bound
/// address (useful with port 0).
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), RunError> {
    sluice_infra::store::migrate_url(&config.database_url, Duration::from_secs(60)).await?;
    let pool =
        sluice_infra::store::connect(&config.database_url, 16, Duration::from_secs(60)).await?;

    let admin = config.kafka.admin()?;
    let partitions = admin
        .ensure_topic(
            &config.signals_topic,
            config.signal_partitions,
            config.replication_factor,
            // Signals are wake-ups, not data: a day is plenty for a worker group that
            // starts fresh and replays from the oldest one.
            &[("retention.ms", "86400000")],
        )
        .await?;
    tracing::info!(topic = %config.signals_topic, partitions, "signals topic ready");

    let producer: FutureProducer = config
        .kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "10000")
        .create()?;

    let wakeup = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let relay = OutboxRelay {
        pool: pool.clone(),
        producer: producer.clone(),
        signals_topic: config.signals_topic.clone(),
        wakeup: Arc::clone(&wakeup),
    };
    let relay_task = tokio::spawn(relay.run(stop_rx));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<PipelineServiceServer<PipelineApi>>()
        .await;
    // Both reflection versions: grpcurl and newer clients ask v1, many others
    // (Python's grpcio-reflection, Postman, older tools) still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sluice_protocol::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| RunError::Bind {
        addr: config.listen,
        source,
    })?;
    tracing::info!(addr = %local, "control plane listening");
    on_listening(local);

    let inputs = crate::service::Inputs {
        producer: producer.clone(),
        admin,
        namespace: config.topic_namespace.clone(),
        replication_factor: config.replication_factor,
        ready: Default::default(),
    };
    let (changes_tx, changes_rx) = tokio::sync::watch::channel(0u64);
    // Open watch streams end when shutdown begins, or the server would wait for them.
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    };
    let tokens = Arc::new(auth::TokenCache::new(config.token_cache_ttl));
    let listener_task = tokio::spawn(listen_for_changes(
        pool.clone(),
        changes_tx,
        Arc::clone(&tokens),
    ));
    let api = PipelineApi::new(
        pool.clone(),
        partitions as u32,
        wakeup,
        config.limits,
        config.destination_hosts.clone(),
        inputs,
        crate::service::WatchSignals {
            changes: changes_rx,
            closing: closing_rx,
        },
    )
    .with_token_cache(tokens);
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        server = server.tls_config(tls.server_config()?)?;
        tracing::info!(mutual = tls.client_ca.is_some(), "serving gRPC over TLS");
    }
    let too_large = limits::RequestTooLarge::new(config.max_request_bytes);
    let served = server
        .layer(metrics::GrpcMetricsLayer)
        .layer(tower::util::MapResponseLayer::new(move |r| {
            too_large.rewrite(r)
        }))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            PipelineServiceServer::new(api).max_decoding_message_size(config.max_request_bytes),
            auth::require_authorization_header,
        ))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY small responses wait on delayed ACKs (~40 ms each).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;

    // Drain: stop the relay (unsent signals stay in the outbox), then close the pool.
    let _ = stop_tx.send(true);
    let _ = relay_task.await;
    listener_task.abort();
    pool.close().await;
    tracing::info!("control plane stopped");
    served.map_err(RunError::from)
}

/// Counts the pipelines table's change notifications, so that WatchPipelines streams
/// look for changes at once instead of at their next poll, and evicts revoked tokens
/// from the token cache. Lost notifications (the connection drops) only delay a
/// watcher until that poll; the token cache is emptied then, since a revocation may
/// have been among them.
async fn listen_for_changes(
    pool: sqlx::PgPool,
    changes: tokio::sync::watch::Sender<u64>,
    tokens: Arc<auth::TokenCache>,
) {
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener
                .listen_all(["sluice_pipelines", auth::REVOKED_CHANNEL])
                .await?;
            // Listening now: whatever was revoked before is seen by the lookups.
            tokens.listening();
            loop {
                let Some(notification) = listener.try_recv().await? else {
                    // The connection dropped: subscribe again on a new one (below).
                    changes.send_modify(|n| *n += 1);
                    return Ok(());
                };
                if notification.channel() == auth::REVOKED_CHANNEL {
                    match notification.payload().parse() {
                        Ok(id) => tokens.evict(id),
                        Err(_) => tokens.clear(),
                    }
                } else {
                    changes.send_modify(|n| *n += 1);
                }
            }
        };
        let result: Result<(), sqlx::Error> = listener.await;
        tokens.deaf();
        if let Err(e) = result {
            tracing::warn!(error = %e, "change notifications interrupted; watchers poll meanwhile");
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
