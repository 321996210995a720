//! What every Sluice binary's `main` does the same way: parse flags (bad configuration
//! exits with EX_USAGE), set up logging, and turn SIGINT/SIGTERM into a shutdown future.

use std::process::ExitCode;

/// EX_USAGE from sysexits.h: the configuration is wrong.
pub const EX_USAGE: u8 = 64;

/// Parses the command line; `--help`/`--version` exit 0, bad flags exit 64.
pub fn parse_cli<T: clap::Parser>() -> Result<T, ExitCode> {
    parse_cli_from(std::env::args_os())
}

/// [`parse_cli`] over the given arguments (the first is the program name).
pub fn parse_cli_from<T: clap::Parser>(
    args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
) -> Result<T, ExitCode> {
    let mut args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    if let Err(e) = crate::config_file::apply(T::command(), &mut args) {
        eprintln!("error: {e}");
        return Err(ExitCode::from(EX_USAGE));
    }
    match T::try_parse_from(args) {
        Ok(cli) => Ok(cli),
        Err(e) => {
            let _ = e.print();
            Err(if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Where a Sluice process finds PostgreSQL and Kafka: the flags every binary shares.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// PostgreSQL URL of the control-plane database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: String,
    /// Extra librdkafka property for every Kafka client, KEY=VALUE (repeatable), e.g.
    /// security.protocol=SASL_SSL.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE", value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
    /// File of librdkafka properties, one KEY=VALUE per line ('#' starts a comment): the
    /// place for credentials such as sasl.password, which a flag would show in `ps`.
    /// --kafka-property flags override it.
    #[arg(long, env = "SLUICE_KAFKA_PROPERTIES_FILE", value_name = "FILE")]
    pub kafka_properties_file: Option<std::path::PathBuf>,
    /// Topic that carries change signals from the control plane to the workers.
    #[arg(long, env = "SLUICE_SIGNALS_TOPIC", default_value = sluice_protocol::topics::DEFAULT_SIGNALS_TOPIC)]
    pub signals_topic: String,
    #[command(flatten)]
    pub secrets: SecretsKeyArgs,
    /// Prefix of the topics and Kafka transactional ids Sluice creates per pipeline
    /// (records and inputs topics). All processes of a deployment use the same;
    /// deployments sharing a Kafka cluster need different ones (like their signals
    /// topics and worker groups).
    #[arg(long, env = "SLUICE_TOPIC_NAMESPACE", default_value = sluice_protocol::topics::DEFAULT_TOPIC_NAMESPACE,
          value_parser = parse_namespace)]
    pub topic_namespace: String,
    /// Replication factor of the topics this process creates.
    #[arg(long, env = "SLUICE_REPLICATION_FACTOR", default_value_t = 1,
          value_parser = clap::value_parser!(i32).range(1..=16))]
    pub replication_factor: i32,
}

/// The deployment's secrets key files.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecretsKeyArgs {
    /// File holding the deployment's secrets key (32 random bytes, base64): connector
    /// secrets are stored encrypted with it. Control plane and workers need the same.
    #[arg(long, env = "SLUICE_SECRETS_KEY_FILE", value_name = "FILE")]
    pub secrets_key_file: Option<std::path::PathBuf>,
    /// Files of earlier secrets keys, comma-separated or repeated: during a key rotation
    /// they open what they sealed, and the current key seals everything new (see
    /// `sluice-control-plane reseal-secrets`).
    #[arg(
        long,
        env = "SLUICE_PREVIOUS_SECRETS_KEY_FILES",
        value_name = "FILE",
        value_delimiter = ',',
        requires = "secrets_key_file"
    )]
    pub previous_secrets_key_file: Vec<std::path::PathBuf>,
}

impl SecretsKeyArgs {
    /// Loads the secrets key, if one is configured; a bad key file is a usage error.
    pub fn install(&self) -> Result<(), ExitCode> {
        match self
            .secrets_key_file
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            None => Ok(()),
            Some(path) => crate::secrets::install_key_files(path, &self.previous_secrets_key_file)
                .map_err(|e| {
                    eprintln!("error: {e}");
                    ExitCode::from(EX_USAGE)
                }),
        }
    }
}

impl ConnectionArgs {
    /// Loads the secrets key, if one is configured; a bad key file is a usage error.
    pub fn install_secrets_key(&self) -> Result<(), ExitCode> {
        self.secrets.install()
    }

    /// The Kafka settings: the properties file first, then the flags. An unreadable or
    /// malformed file is a usage error.
    pub fn kafka(&self) -> Result<crate::kafka::KafkaSettings, ExitCode> {
        let mut kafka = crate::kafka::KafkaSettings::new(&self.kafka_bootstrap_servers);
        if let Some(path) = self
            .kafka_properties_file
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|text| parse_properties_file(&text));
            match parsed {
                Ok(properties) => kafka.properties = properties,
                Err(e) => {
                    eprintln!("error: kafka properties file {}: {e}", path.display());
                    return Err(ExitCode::from(EX_USAGE));
                }
            }
        }
        kafka
            .properties
            .extend(self.kafka_properties.iter().cloned());
        Ok(kafka)
    }
}

/// Where postgres destinations may connect: the operator's allow-list and deny-list.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DestinationHostArgs {
    /// Destination hosts allowed, comma-separated: host names, *.domain suffixes and
    /// address ranges (10.0.0.0/8). Empty: every host not denied. Ranges also match
    /// the addresses a host name resolves to.
    #[arg(
        long,
        env = "SLUICE_DESTINATION_HOSTS_ALLOW",
        value_name = "PATTERNS",
        default_value = ""
    )]
    pub destination_hosts_allow: String,
    /// Destination hosts refused, in the same form; a deny match wins over the
    /// allow-list (e.g. 127.0.0.0/8,::1/128,169.254.0.0/16 keeps tenants off the
    /// machine itself and the cloud metadata service).
    #[arg(
        long,
        env = "SLUICE_DESTINATION_HOSTS_DENY",
        value_name = "PATTERNS",
        default_value = ""
    )]
    pub destination_hosts_deny: String,
}

impl DestinationHostArgs {
    /// The parsed policy; a malformed pattern is a usage error.
    pub fn policy(&self) -> Result<sluice_protocol::hosts::HostPolicy, ExitCode> {
        sluice_protocol::hosts::HostPolicy::parse(
            &self.destination_hosts_allow,
            &self.destination_hosts_deny,
        )
        .map_err(|e| {
            eprintln!("error: destination host patterns: {e}");
            ExitCode::from(EX_USAGE)
        })
    }
}

/// How a process writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans), for log
    /// collectors.
    Json,
}

/// The configuration file flag both services share (read before the other flags; see
/// [`crate::config_file`]).
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigFileArgs {
    /// TOML file of settings: keys are the long flag names (database-url = "...",
    /// signal-partitions = 24). Environment variables and flags override it.
    #[arg(
        long = "config",
        env = "SLUICE_CONFIG_FILE",
        value_name = "FILE",
        global = true
    )]
    pub config_file: Option<std::path::PathBuf>,
}

/// The logging and tracing flags every binary shares.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format on stderr. The level filter comes from SLUICE_LOG
    /// (tracing-subscriber syntax, default "info,sqlx=warn").
    #[arg(
        long,
        env = "SLUICE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this collector, e.g. http://otel-collector:4317
    /// (W3C trace context is taken from and passed to gRPC calls and signals). Off when
    /// unset. OTEL_BSP_* variables tune the batching.
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT", value_name = "URL", global = true)]
    pub otlp_endpoint: Option<String>,
}

/// Logs to stderr in the chosen format (the filter comes from `SLUICE_LOG`) and, with an
/// OTLP endpoint, exports spans as `service`. Keep the returned value until exit: its
/// drop flushes the last spans. A bad endpoint is a usage error.
pub fn init_tracing(
    args: &LogArgs,
    service: &'static str,
) -> Result<crate::telemetry::Telemetry, ExitCode> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| "info,sqlx=warn".into());
    // Colours only for a person at a terminal, never into a log file or collector.
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let lines = match args.log_format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(lines);
    match args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        None => {
            registry.init();
            Ok(crate::telemetry::Telemetry::off())
        }
        Some(endpoint) => match crate::telemetry::otlp_layer(endpoint, service) {
            Ok((layer, telemetry)) => {
                registry.with(layer).init();
                tracing::info!(endpoint, "exporting traces");
                Ok(telemetry)
            }
            Err(e) => {
                eprintln!("error: --otlp-endpoint: {e}");
                Err(ExitCode::from(EX_USAGE))
            }
        },
    }
}

/// Parses a properties file: `KEY=VALUE` lines; blank lines and `#` comments skipped.
/// Errors name the line but never echo it (it may hold a password).
pub fn parse_properties_file(text: &str) -> Result<Vec<(String, String)>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(n, l)| {
            l.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("line {} is not KEY=VALUE", n + 1))
        })
        .collect()
}

fn parse_namespace(s: &str) -> Result<String, String> {
    sluice_protocol::topics::validate_topic_namespace(s).map(|()| s.to_owned())
}

/// Parses a `KEY=VALUE` flag value (librdkafka pass-through properties).
pub fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Resolves on SIGINT or SIGTERM; a second signal exits at once.
pub async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutdown requested, draining (signal again to exit at once)");
    tokio::spawn(async {
        wait_for_signal().await;
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler succeeds on unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties() {
        assert_eq!(
            parse_property("security.protocol=SSL"),
            Ok(("security.protocol".into(), "SSL".into()))
        );
        assert_eq!(parse_property("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_property("novalue").is_err());
        assert!(parse_property("=x").is_err());
    }

    #[test]
    fn properties_files() {
        let parsed = parse_properties_file(
            "# credentials\nsecurity.protocol = SASL_SSL\n\nsasl.password=a=b\n",
        )
        .expect("valid");
        assert_eq!(
            parsed,
            vec![
                ("security.protocol".into(), "SASL_SSL".into()),
                ("sasl.password".into(), "a=b".into())
            ]
        );
        let err = parse_properties_file("ok=1\nhunter2\n").expect_err("bad line");
        assert!(err.contains("line 2") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn kafka_settings_never_print_credentials() {
        let mut kafka = crate::kafka::KafkaSettings::new("b:1");
        kafka.properties = vec![
            ("sasl.password".into(), "hunter2".into()),
            ("security.protocol".into(), "SSL".into()),
            (
                "ssl.key.pem".into(),
                "-----BEGIN PRIVATE KEY-----hunter3".into(),
            ),
            (
                "sasl.oauthbearer.config".into(),
                "principal=a clientSecret=hunter4".into(),
            ),
            ("sasl.oauthbearer.client.secret".into(), "hunter5".into()),
            ("ssl.keystore.password".into(), "hunter6".into()),
            ("ssl.key.location".into(), "/etc/kafka/client.key".into()),
        ];
        let shown = format!("{kafka:?}");
        for secret in ["hunter2", "hunter3", "hunter4", "hunter5", "hunter6"] {
            assert!(!shown.contains(secret), "{secret} shown: {shown}");
        }
        assert!(
            shown.contains("SSL") && shown.contains("/etc/kafka/client.key"),
            "{shown}"
        );
    }
}
