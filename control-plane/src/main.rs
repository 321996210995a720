//! `sluice-control-plane`: parses configuration, sets up logging and runs the server, or
//! manages API tokens (`tokens create|list|revoke`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sluice_control_plane::auth::{self, Role};
use sluice_control_plane::{run, Config, Limits, TlsFiles};
use sluice_infra::metrics::MetricsArgs;
use sluice_infra::process::{
    init_tracing, parse_cli_from, shutdown_signal, ConfigFileArgs, ConnectionArgs,
    DestinationHostArgs, LogArgs, SecretsKeyArgs,
};
use sluice_protocol::ids::validate_tenant;

const AFTER_HELP: &str = "\
Without a subcommand the control plane serves (same as `serve`).

Examples:
  sluice-control-plane --listen 0.0.0.0:50051 --tls-cert cp.pem --tls-key cp.key
  sluice-control-plane tokens create --tenant acme --role operator --name ci
  sluice-control-plane tokens list
  sluice-control-plane tokens revoke 0192f3a4-1111-7222-8333-444455556666
  sluice-control-plane migrate
  sluice-control-plane reseal-secrets --dry-run
  sluice-control-plane signals-topic --partitions 24
  sluice-control-plane signals-topic --move-pipelines";

/// Sluice control plane: the gRPC API that stores desired pipeline state and signals
/// workers.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    config_file: ConfigFileArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gRPC API (the default).
    Serve(Box<ServeArgs>),
    /// Manage the bearer tokens clients authenticate with.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Apply the database migrations and exit (serve and the workers also apply them
    /// at start; run this first in a rolling upgrade or a Kubernetes Job).
    Migrate {
        #[command(flatten)]
        db: DatabaseArgs,
        /// Give up when the database does not answer within this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// After a secrets-key rotation: seal every stored connector secret that a
    /// previous key sealed again with the current key (--secrets-key-file), opening it
    /// with the previous keys (--previous-secrets-key-file). Safe while serving; run
    /// again until it reports nothing left, then drop the previous keys.
    ResealSecrets {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        secrets: SecretsKeyArgs,
        /// Only count what would be sealed again.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show the signals topic's partitions and how pipelines spread over them; grow the
    /// topic (--partitions) and move existing pipelines onto the partitions their ids
    /// hash to (--move-pipelines). See docs/runbooks/signals-partitions.md.
    SignalsTopic(Box<SignalsTopicArgs>),
}

#[derive(Debug, Args)]
struct SignalsTopicArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    /// Grow the topic to this many partitions. Kafka cannot take partitions away; a
    /// smaller number is refused.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=10_000))]
    partitions: Option<i32>,
    /// Move every pipeline whose stored partition is not the one its id hashes to under
    /// the topic's partition count (each move signals the new partition; its owner
    /// takes the pipeline over at a safe point, fenced like any handover).
    #[arg(long)]
    move_pipelines: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    /// Specs whose destination host these refuse are INVALID_ARGUMENT at once; workers
    /// enforce the same lists (with DNS) when they connect, so give both the same.
    #[command(flatten)]
    destination_hosts: DestinationHostArgs,
    /// Address the gRPC server listens on (port 0 picks a free port; the chosen address
    /// is printed as "listening on ADDR" on stdout).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Partitions of the signals topic if it must be created (upper bound on workers).
    #[arg(long, env = "SLUICE_SIGNAL_PARTITIONS", default_value_t = 12,
          value_parser = clap::value_parser!(i32).range(1..=10_000))]
    signal_partitions: i32,
    /// PEM certificate (chain) of the gRPC listener; with --tls-key, serve TLS.
    #[arg(
        long,
        env = "SLUICE_TLS_CERT",
        requires = "tls_key",
        value_name = "FILE"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the gRPC listener.
    #[arg(
        long,
        env = "SLUICE_TLS_KEY",
        requires = "tls_cert",
        value_name = "FILE"
    )]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle that client certificates must chain to (mutual TLS).
    #[arg(
        long,
        env = "SLUICE_TLS_CLIENT_CA",
        requires = "tls_cert",
        value_name = "FILE"
    )]
    tls_client_ca: Option<PathBuf>,
    /// Largest request message accepted; larger ones are RESOURCE_EXHAUSTED.
    #[arg(long, env = "SLUICE_MAX_REQUEST_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=64 * 1024 * 1024))]
    max_request_bytes: u32,
    /// Pipelines one tenant may have; creating more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "SLUICE_MAX_PIPELINES_PER_TENANT", default_value_t = Limits::default().max_pipelines_per_tenant,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_pipelines_per_tenant: u64,
    /// How long, in milliseconds, a token found valid is trusted without looking it up
    /// again (0: every call looks its token up). `tokens revoke` evicts the token from
    /// every running control plane at once; this bounds how long one that missed the
    /// announcement (its database connection dropping at that moment) may still accept it.
    #[arg(long, env = "SLUICE_TOKEN_CACHE_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    token_cache_ms: u64,
}

#[derive(Debug, Args)]
struct DatabaseArgs {
    /// PostgreSQL URL of the control-plane database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Create a token and print it once (it is stored only as a hash).
    Create {
        #[command(flatten)]
        db: DatabaseArgs,
        /// The tenant the token acts for.
        #[arg(long, value_parser = parse_tenant)]
        tenant: String,
        /// admin (every tenant), operator (its tenant) or viewer (read only).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["admin", "operator", "viewer"]))]
        role: String,
        /// A label to recognise the token by in `tokens list`.
        #[arg(long)]
        name: String,
    },
    /// List tokens (ids, tenants, roles; never the tokens themselves).
    List {
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Revoke a token by id; calls with it are refused at once.
    Revoke {
        #[command(flatten)]
        db: DatabaseArgs,
        /// Id shown by `tokens create` or `tokens list`.
        id: uuid::Uuid,
    },
}

fn parse_tenant(s: &str) -> Result<String, String> {
    validate_tenant(s, "tenant")
        .map(|()| s.to_owned())
        .map_err(|v| v.description)
}

/// `sluice-control-plane [flags]` means `sluice-control-plane serve [flags]`.
fn with_default_subcommand(mut args: Vec<String>) -> Vec<String> {
    let first = args.get(1).map(String::as_str);
    let explicit = matches!(
        first,
        Some(
            "serve"
                | "tokens"
                | "migrate"
                | "reseal-secrets"
                | "signals-topic"
                | "help"
                | "-h"
                | "--help"
                | "-V"
                | "--version"
        )
    );
    if !explicit {
        args.insert(1, "serve".to_owned());
    }
    args
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match parse_cli_from::<Cli>(with_default_subcommand(std::env::args().collect())) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let _telemetry = match init_tracing(&cli.log, "sluice-control-plane") {
        Ok(t) => t,
        Err(code) => return code,
    };
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Migrate { db, timeout } => {
            match sluice_infra::store::migrate_url(&db.database_url, Duration::from_secs(timeout))
                .await
            {
                Ok(()) => {
                    println!("migrations applied");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ResealSecrets {
            db,
            secrets,
            dry_run,
        } => reseal_secrets(&db, &secrets, dry_run).await,
        Command::SignalsTopic(args) => signals_topic(*args).await,
        Command::Tokens(command) => match tokens(command).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn serve(cli: ServeArgs) -> ExitCode {
    if let Err(code) = cli.connection.install_secrets_key() {
        return code;
    }
    let kafka = match cli.connection.kafka() {
        Ok(kafka) => kafka,
        Err(code) => return code,
    };
    let tls = match (cli.tls_cert, cli.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert,
            key,
            client_ca: cli.tls_client_ca,
        }),
        _ => None,
    };
    let destination_hosts = match cli.destination_hosts.policy() {
        Ok(policy) => policy,
        Err(code) => return code,
    };
    let config = Config {
        listen: cli.listen,
        database_url: cli.connection.database_url,
        kafka,
        signals_topic: cli.connection.signals_topic,
        signal_partitions: cli.signal_partitions,
        replication_factor: cli.connection.replication_factor,
        topic_namespace: cli.connection.topic_namespace.clone(),
        limits: Limits {
            max_pipelines_per_tenant: cli.max_pipelines_per_tenant,
        },
        max_request_bytes: cli.max_request_bytes as usize,
        tls,
        destination_hosts,
        token_cache_ttl: std::time::Duration::from_millis(cli.token_cache_ms),
    };
    let _metrics = match cli.metrics.metrics_listen {
        Some(addr) => {
            let registry = std::sync::Arc::clone(&sluice_control_plane::metrics::API.registry);
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

async fn reseal_secrets(db: &DatabaseArgs, args: &SecretsKeyArgs, dry_run: bool) -> ExitCode {
    if args.secrets_key_file.is_none() {
        eprintln!("error: reseal-secrets needs the current key: --secrets-key-file (or SLUICE_SECRETS_KEY_FILE)");
        return ExitCode::from(64);
    }
    if let Err(code) = args.install() {
        return code;
    }
    let Some(secrets) = sluice_infra::secrets::installed() else {
        return ExitCode::FAILURE;
    };
    let result = async {
        sluice_infra::store::migrate_url(&db.database_url, Duration::from_secs(10)).await?;
        let pool =
            sluice_infra::store::connect(&db.database_url, 2, Duration::from_secs(10)).await?;
        Ok::<_, anyhow::Error>(sluice_infra::secrets::reseal_stored(&pool, secrets, dry_run).await?)
    }
    .await;
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let ids = secrets.key_ids();
    println!(
        "current key {}; previous keys: {}",
        ids[0],
        if ids.len() > 1 {
            ids[1..].join(", ")
        } else {
            "none".into()
        }
    );
    let by_key: Vec<String> = report
        .by_key
        .iter()
        .map(|(id, n)| {
            let role = if id == ids[0] { " (current)" } else { "" };
            format!("{id}{role}: {n}")
        })
        .collect();
    println!(
        "{} pipelines; sealed values by key: {}",
        report.pipelines,
        if by_key.is_empty() {
            "none".into()
        } else {
            by_key.join(", ")
        }
    );
    let verb = if dry_run { "to reseal" } else { "resealed" };
    println!(
        "{verb}: {} values in {} pipelines",
        report.resealed, report.resealed_pipelines
    );
    for (pipeline, why) in &report.failures {
        eprintln!("error: pipeline {pipeline}: {why}");
    }
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "error: {} pipelines hold values no given key opens: add the key that sealed them with --previous-secrets-key-file, or send those secrets again with UpdatePipeline",
            report.failures.len()
        );
        ExitCode::FAILURE
    }
}

async fn signals_topic(args: SignalsTopicArgs) -> ExitCode {
    let kafka = match args.connection.kafka() {
        Ok(kafka) => kafka,
        Err(code) => return code,
    };
    let topic = args.connection.signals_topic.clone();
    let result = async {
        let admin = kafka.admin()?;
        let mut count = admin
            .partition_count(&topic)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the signals topic {topic} does not exist (the control plane creates it when it starts)"))?;
        if let Some(want) = args.partitions {
            if want < count {
                eprintln!("error: --partitions {want}: the signals topic {topic} has {count} partitions, and Kafka cannot remove partitions");
                return Ok(ExitCode::from(64));
            }
            if want > count {
                admin.grow_partitions(&topic, want).await?;
                println!("signals topic {topic}: grown from {count} to {want} partitions");
                count = want;
            }
        }
        let url = &args.connection.database_url;
        sluice_infra::store::migrate_url(url, Duration::from_secs(10)).await?;
        let pool = sluice_infra::store::connect(url, 2, Duration::from_secs(10)).await?;
        let spread = |stored: &[(String, i32)]| {
            let mut per_partition = vec![0usize; usize::try_from(count).unwrap_or(0)];
            let mut misplaced = Vec::new();
            for (key, partition) in stored {
                if let Some(n) = usize::try_from(*partition).ok().and_then(|p| per_partition.get_mut(p)) {
                    *n += 1;
                }
                let home = sluice_protocol::partition::partition_for(key, count as u32);
                if home != *partition {
                    misplaced.push((key.clone(), *partition, home));
                }
            }
            (per_partition, misplaced)
        };
        let (mut per_partition, misplaced) =
            spread(&sluice_control_plane::store::pipeline_partitions(&pool).await?);
        let mut moved = 0;
        if args.move_pipelines {
            for (key, from, to) in &misplaced {
                if sluice_control_plane::store::move_partition(&pool, key, *from, *to).await? {
                    moved += 1;
                }
            }
            per_partition = spread(&sluice_control_plane::store::pipeline_partitions(&pool).await?).0;
        }
        println!("signals topic {topic}: {count} partitions (the most workers that own pipelines at once)");
        println!("pipelines per partition: {}", per_partition.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "));
        if args.move_pipelines {
            println!("moved: {moved} pipelines to the partition their id hashes to");
        } else {
            println!("to move: {} pipelines (--move-pipelines moves them)", misplaced.len());
        }
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    }
    .await;
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn tokens(command: TokensCommand) -> anyhow::Result<()> {
    let db = match &command {
        TokensCommand::Create { db, .. }
        | TokensCommand::List { db }
        | TokensCommand::Revoke { db, .. } => db,
    };
    sluice_infra::store::migrate_url(&db.database_url, Duration::from_secs(10)).await?;
    let pool = sluice_infra::store::connect(&db.database_url, 2, Duration::from_secs(10)).await?;
    match command {
        TokensCommand::Create {
            tenant, role, name, ..
        } => {
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            let (id, token) = auth::create_token(&pool, &name, &tenant, role).await?;
            // The token alone on stdout, so scripts can capture it; the rest on stderr.
            eprintln!("created token {id} ({role} of tenant {tenant}); it is shown only once:");
            println!("{token}");
        }
        TokensCommand::List { .. } => {
            println!(
                "{:<36}  {:<16}  {:<16}  {:<8}  {:<20}  REVOKED",
                "ID", "NAME", "TENANT", "ROLE", "CREATED"
            );
            for t in auth::list_tokens(&pool).await? {
                println!(
                    "{:<36}  {:<16}  {:<16}  {:<8}  {:<20}  {}",
                    t.id,
                    t.name,
                    t.tenant,
                    t.role,
                    t.create_time.format("%Y-%m-%dT%H:%M:%SZ"),
                    t.revoke_time
                        .map(|r| r.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .unwrap_or_else(|| "-".into())
                );
            }
        }
        TokensCommand::Revoke { id, .. } => {
            if !auth::revoke_token(&pool, id).await? {
                anyhow::bail!("no active token with id {id}");
            }
            eprintln!("revoked token {id}");
        }
    }
    pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn serve_is_the_default_subcommand() {
        assert_eq!(
            with_default_subcommand(args(&["cp", "--listen", "x"])),
            args(&["cp", "serve", "--listen", "x"])
        );
        assert_eq!(
            with_default_subcommand(args(&["cp"])),
            args(&["cp", "serve"])
        );
        assert_eq!(
            with_default_subcommand(args(&["cp", "tokens", "list"])),
            args(&["cp", "tokens", "list"])
        );
        assert_eq!(
            with_default_subcommand(args(&["cp", "--help"])),
            args(&["cp", "--help"])
        );
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
