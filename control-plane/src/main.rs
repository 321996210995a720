//! `sluice-control-plane`: parses configuration, sets up logging and runs the server.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use sluice_control_plane::{run, Config};
use sluice_infra::process::{init_tracing, parse_cli, shutdown_signal, ConnectionArgs};

/// Sluice control plane: the gRPC API that stores desired pipeline state and signals
/// workers.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,
    /// Address the gRPC server listens on (port 0 picks a free port; the chosen address
    /// is printed as "listening on ADDR" on stdout).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Partitions of the signals topic if it must be created (upper bound on workers).
    #[arg(long, env = "SLUICE_SIGNAL_PARTITIONS", default_value_t = 12,
          value_parser = clap::value_parser!(i32).range(1..=10_000))]
    signal_partitions: i32,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match parse_cli::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_tracing();

    let kafka = cli.connection.kafka();
    let config = Config {
        listen: cli.listen,
        database_url: cli.connection.database_url,
        kafka,
        signals_topic: cli.connection.signals_topic,
        signal_partitions: cli.signal_partitions,
        replication_factor: cli.connection.replication_factor,
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
