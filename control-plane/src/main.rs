//! `sluice-control-plane`: parses configuration, sets up logging and runs the server.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use sluice_control_plane::{run, Config};
use sluice_infra::kafka::KafkaSettings;
use sluice_infra::process::{init_tracing, parse_cli, parse_property, shutdown_signal};

/// Sluice control plane: the gRPC API that stores desired pipeline state and signals
/// workers.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Address the gRPC server listens on (port 0 picks a free port; the chosen address
    /// is printed as "listening on ADDR" on stdout).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// PostgreSQL URL of the control-plane database.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    kafka_bootstrap_servers: String,
    /// Extra librdkafka property for every Kafka client, KEY=VALUE (repeatable), e.g.
    /// security.protocol=SASL_SSL.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE", value_parser = parse_property)]
    kafka_properties: Vec<(String, String)>,
    /// Topic that carries change signals to the workers.
    #[arg(long, env = "SLUICE_SIGNALS_TOPIC", default_value = sluice_protocol::topics::DEFAULT_SIGNALS_TOPIC)]
    signals_topic: String,
    /// Partitions of the signals topic if it must be created (upper bound on workers).
    #[arg(long, env = "SLUICE_SIGNAL_PARTITIONS", default_value_t = 12,
          value_parser = clap::value_parser!(i32).range(1..=10_000))]
    signal_partitions: i32,
    /// Replication factor of topics the control plane creates.
    #[arg(long, env = "SLUICE_REPLICATION_FACTOR", default_value_t = 1,
          value_parser = clap::value_parser!(i32).range(1..=16))]
    replication_factor: i32,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match parse_cli::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_tracing();

    let mut kafka = KafkaSettings::new(cli.kafka_bootstrap_servers);
    kafka.properties = cli.kafka_properties;
    let config = Config {
        listen: cli.listen,
        database_url: cli.database_url,
        kafka,
        signals_topic: cli.signals_topic,
        signal_partitions: cli.signal_partitions,
        replication_factor: cli.replication_factor,
    };
    let result = run(config, shutdown_signal(), |addr| {
        println!("listening on {addr}");
    })
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "control plane failed");
            ExitCode::FAILURE
        }
    }
}
