//! Pipeline specs and their validation.
//!
//! A spec is stored as JSON (`{"source": {"type", "config"}, "destination": {...}}`).
//! [`PipelineSpec::validate`] is the one gate for both create and update, and parses the
//! connector configs into typed structs the worker uses. Every violation names the
//! field as a client spelled it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::FieldViolation;

pub const SOURCE_TYPES: &[&str] = &["generator"];
pub const DESTINATION_TYPES: &[&str] = &["postgres"];

/// Largest spec accepted, as stored JSON: a spec is configuration, not data, and every
/// change of it is stored, signalled and re-read by a worker.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

/// Largest generator count accepted: bounded so a typo cannot ask for a year of work.
pub const MAX_GENERATOR_COUNT: u64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectorSpec {
    #[serde(rename = "type")]
    pub connector_type: String,
    #[serde(default)]
    pub config: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineSpec {
    pub source: ConnectorSpec,
    pub destination: ConnectorSpec,
}

/// Configuration of the `generator` source: `count` deterministic records whose
/// content depends only on `seed` and the record's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratorConfig {
    pub count: u64,
    pub seed: u64,
    /// Records read per slice; the cursor is checkpointed after each slice.
    pub slice_size: u64,
    /// Upper bound on the read rate; 0 means unlimited.
    pub records_per_second: u64,
}

/// Configuration of the `postgres` destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresDestinationConfig {
    pub url: String,
    pub schema: String,
    pub table: String,
    /// Drop the table when the pipeline is deleted; kept by default.
    pub drop_table_on_delete: bool,
    pub batch_size: u64,
    /// CA certificate(s) to verify the server with, inline (PEM). The other way is
    /// `sslrootcert=<name>` in the URL: a file of the worker's operator-set CA directory.
    pub ssl_ca_pem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    Generator(GeneratorConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationConfig {
    Postgres(PostgresDestinationConfig),
}

/// A spec that passed validation, with typed connector configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedSpec {
    pub source: SourceConfig,
    pub destination: DestinationConfig,
}

impl PipelineSpec {
    /// Validates the spec; `prefix` is the path of the spec in the request (e.g.
    /// `pipeline.spec`), used to name the offending field.
    pub fn validate(&self, prefix: &str) -> Result<ValidatedSpec, FieldViolation> {
        let size = self.to_json().to_string().len();
        if size > MAX_SPEC_BYTES {
            return Err(FieldViolation::new(
                prefix,
                format!("is {size} bytes as JSON; the limit is {MAX_SPEC_BYTES} bytes"),
            ));
        }
        let source = validate_source(&self.source, &format!("{prefix}.source"))?;
        let destination =
            validate_destination(&self.destination, &format!("{prefix}.destination"))?;
        Ok(ValidatedSpec {
            source,
            destination,
        })
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a spec is plain JSON and always serializes")
    }

    pub fn from_json(value: Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(value)
    }
}

fn validate_source(spec: &ConnectorSpec, path: &str) -> Result<SourceConfig, FieldViolation> {
    let mut config = ConfigReader::new(&spec.config, format!("{path}.config"));
    let parsed = match spec.connector_type.as_str() {
        "generator" => {
            let count = config.u64("count", None)?;
            if count > MAX_GENERATOR_COUNT {
                return Err(
                    config.violation("count", &format!("must be at most {MAX_GENERATOR_COUNT}"))
                );
            }
            let seed = config.u64("seed", Some(0))?;
            let slice_size = config.u64("slice_size", Some(1000))?;
            if !(1..=100_000).contains(&slice_size) {
                return Err(config.violation("slice_size", "must be between 1 and 100000"));
            }
            let records_per_second = config.u64("records_per_second", Some(0))?;
            SourceConfig::Generator(GeneratorConfig {
                count,
                seed,
                slice_size,
                records_per_second,
            })
        }
        "" => return Err(FieldViolation::new(format!("{path}.type"), "is required")),
        other => {
            return Err(FieldViolation::new(
                format!("{path}.type"),
                format!(
                    "unknown source type {other:?}; known: {}",
                    SOURCE_TYPES.join(", ")
                ),
            ))
        }
    };
    config.reject_unknown()?;
    Ok(parsed)
}

fn validate_destination(
    spec: &ConnectorSpec,
    path: &str,
) -> Result<DestinationConfig, FieldViolation> {
    let mut config = ConfigReader::new(&spec.config, format!("{path}.config"));
    let parsed = match spec.connector_type.as_str() {
        "postgres" => {
            let url = config.string("url", None)?;
            if crate::secrets::is_sealed(&url) {
                return Err(config.violation(
                    "url",
                    "is encrypted and this process has no (or another) secrets key; \
                     start it with --secrets-key-file",
                ));
            }
            check_postgres_url(&url).map_err(|d| config.violation("url", &d))?;
            let schema = config.string("schema", Some("public"))?;
            check_identifier(&schema).map_err(|d| config.violation("schema", d))?;
            let table = config.string("table", None)?;
            check_identifier(&table).map_err(|d| config.violation("table", d))?;
            if schema == "public" && RESERVED_TABLES.contains(&table.as_str()) {
                return Err(config.violation("table", "is the name of one of Sluice's own tables"));
            }
            let drop_table_on_delete = config.bool("drop_table_on_delete", Some(false))?;
            let batch_size = config.u64("batch_size", Some(500))?;
            if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
                return Err(config.violation(
                    "batch_size",
                    &format!("must be between 1 and {MAX_BATCH_SIZE}"),
                ));
            }
            let ssl_ca_pem = config.optional_string("ssl_ca_pem")?;
            if let Some(pem) = &ssl_ca_pem {
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(config.violation(
                        "ssl_ca_pem",
                        "must hold PEM certificates (-----BEGIN CERTIFICATE-----)",
                    ));
                }
                if url_parameter(&url, "sslrootcert").is_some() {
                    return Err(config.violation(
                        "ssl_ca_pem",
                        "and sslrootcert in the url both name a CA; give one",
                    ));
                }
            }
            DestinationConfig::Postgres(PostgresDestinationConfig {
                url,
                schema,
                table,
                drop_table_on_delete,
                batch_size,
                ssl_ca_pem,
            })
        }
        "" => return Err(FieldViolation::new(format!("{path}.type"), "is required")),
        other => {
            return Err(FieldViolation::new(
                format!("{path}.type"),
                format!(
                    "unknown destination type {other:?}; known: {}",
                    DESTINATION_TYPES.join(", ")
                ),
            ))
        }
    };
    config.reject_unknown()?;
    Ok(parsed)
}

/// Tables of Sluice's own database (and the destination offsets table): a destination
/// in the same database must not write into (or drop) them.
const RESERVED_TABLES: &[&str] = &[
    "pipelines",
    "pipeline_events",
    "signal_outbox",
    "request_log",
    "api_tokens",
    "_sqlx_migrations",
    "_sluice_offsets",
];

/// Largest destination batch. Rows travel as one array per column, so no bind-parameter
/// limit applies; the bound keeps a batch's memory and transaction short.
pub const MAX_BATCH_SIZE: u64 = 10_000;

/// URL query parameters a destination may use. Everything else is refused: parameters
/// that name files or sockets on the worker (sslcert, sslkey, host=/path, passfile)
/// would let a spec use the worker's own credentials, and unknown ones are logged by
/// the driver with their values. `sslrootcert` is allowed only as a bare file name,
/// which the worker looks up in its operator-set CA directory.
const POSTGRES_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "application_name",
    "user",
    "password",
    "statement-cache-capacity",
];

const SSL_MODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// The (decoded) value of query parameter `key` in `url`, if the URL parses and has it.
pub fn url_parameter(url: &str, key: &str) -> Option<String> {
    url::Url::parse(url)
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Whether `host` is a DNS name or an IP address, as a destination host must be:
/// letters, digits, '-' and '.', or a bracketed IPv6 address. Percent-encoding (which
/// the driver decodes into a Unix socket path), '/', ',' and anything else are refused.
pub fn is_network_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Whether `name` can only name a file directly inside a directory: no separator, no
/// leading dot (so neither `..` nor hidden files), printable ASCII.
pub fn is_bare_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_postgres_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|_| "is not a valid URL".to_owned())?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err("must be a postgres:// or postgresql:// URL".into());
    }
    match parsed.host_str() {
        None | Some("") => {
            return Err("must name a host (postgres://user:password@host:port/database)".into())
        }
        Some(host) if !is_network_host(host) => {
            return Err(format!(
                "host {host:?} is not a DNS name or IP address (Unix sockets and \
                 percent-encoded hosts are not allowed)"
            ))
        }
        Some(_) => {}
    }
    for (key, value) in parsed.query_pairs() {
        if !POSTGRES_URL_PARAMETERS.contains(&key.as_ref()) {
            return Err(format!(
                "parameter {key:?} is not allowed; allowed: {}",
                POSTGRES_URL_PARAMETERS.join(", ")
            ));
        }
        if key == "sslrootcert" && !is_bare_file_name(&value) {
            return Err(format!(
                "sslrootcert {value:?} must be the bare name of a CA file in the workers' \
                 --destination-ca-dir (no path), or give the certificate inline as ssl_ca_pem"
            ));
        }
        if key == "sslmode" && !SSL_MODES.contains(&value.as_ref()) {
            return Err(format!(
                "sslmode {value:?} is not one of {}",
                SSL_MODES.join(", ")
            ));
        }
    }
    Ok(())
}

/// SQL identifiers are restricted to lowercase names so they never need quoting
/// games: `[a-z_][a-z0-9_]*`, at most 63 bytes (PostgreSQL's limit).
fn check_identifier(name: &str) -> Result<(), &'static str> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !first_ok
        || name.len() > 63
        || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err("must be a lowercase SQL identifier: [a-z_][a-z0-9_]*, at most 63 characters");
    }
    Ok(())
}

/// Reads typed keys out of a connector config, remembering which keys were consumed
/// so that unknown keys (usually typos) are rejected rather than silently ignored.
struct ConfigReader<'a> {
    config: &'a Map<String, Value>,
    path: String,
    seen: Vec<&'static str>,
}

impl<'a> ConfigReader<'a> {
    fn new(config: &'a Map<String, Value>, path: String) -> Self {
        Self {
            config,
            path,
            seen: Vec::new(),
        }
    }

    fn violation(&self, key: &str, description: &str) -> FieldViolation {
        FieldViolation::new(format!("{}.{key}", self.path), description)
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.push(key);
        self.config.get(key).filter(|v| !v.is_null())
    }

    fn missing(&self, key: &str) -> FieldViolation {
        self.violation(key, "is required")
    }

    fn u64(&mut self, key: &'static str, default: Option<u64>) -> Result<u64, FieldViolation> {
        match self.get(key) {
            None => default.ok_or_else(|| self.missing(key)),
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| {
                    // protobuf Struct carries every number as a double.
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
                        .map(|f| f as u64)
                })
                .ok_or_else(|| self.violation(key, "must be a non-negative integer")),
            Some(_) => Err(self.violation(key, "must be a non-negative integer")),
        }
    }

    fn string(
        &mut self,
        key: &'static str,
        default: Option<&str>,
    ) -> Result<String, FieldViolation> {
        match self.get(key) {
            None => default.map(str::to_owned).ok_or_else(|| self.missing(key)),
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(self.violation(key, "must not be empty")),
            Some(_) => Err(self.violation(key, "must be a string")),
        }
    }

    fn optional_string(&mut self, key: &'static str) -> Result<Option<String>, FieldViolation> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(Value::String(_)) => Err(self.violation(key, "must not be empty")),
            Some(_) => Err(self.violation(key, "must be a string")),
        }
    }

    fn bool(&mut self, key: &'static str, default: Option<bool>) -> Result<bool, FieldViolation> {
        match self.get(key) {
            None => default.ok_or_else(|| self.missing(key)),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.violation(key, "must be true or false")),
        }
    }

    fn reject_unknown(&self) -> Result<(), FieldViolation> {
        match self
            .config
            .keys()
            .find(|k| !self.seen.contains(&k.as_str()))
        {
            Some(unknown) => Err(FieldViolation::new(
                format!("{}.{unknown}", self.path),
                format!("unknown key; accepted: {}", self.seen.join(", ")),
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(source: Value, destination: Value) -> PipelineSpec {
        serde_json::from_value(json!({"source": source, "destination": destination}))
            .expect("test spec is well-formed")
    }

    fn good_destination() -> Value {
        json!({"type": "postgres", "config": {"url": "postgres://localhost/db", "table": "orders"}})
    }

    #[test]
    fn accepts_a_minimal_spec_with_defaults() {
        let s = spec(
            json!({"type": "generator", "config": {"count": 10000.0}}),
            good_destination(),
        );
        let v = s.validate("pipeline.spec").expect("valid");
        assert_eq!(
            v.source,
            SourceConfig::Generator(GeneratorConfig {
                count: 10_000,
                seed: 0,
                slice_size: 1000,
                records_per_second: 0,
            })
        );
        let DestinationConfig::Postgres(pg) = v.destination;
        assert_eq!(pg.schema, "public");
        assert!(!pg.drop_table_on_delete);
    }

    #[test]
    fn violations_name_the_field() {
        let cases = [
            (
                json!({"type": "kafka", "config": {}}),
                good_destination(),
                "pipeline.spec.source.type",
            ),
            (
                json!({"type": "", "config": {}}),
                good_destination(),
                "pipeline.spec.source.type",
            ),
            (
                json!({"type": "generator", "config": {}}),
                good_destination(),
                "pipeline.spec.source.config.count",
            ),
            (
                json!({"type": "generator", "config": {"count": 1.5}}),
                good_destination(),
                "pipeline.spec.source.config.count",
            ),
            (
                json!({"type": "generator", "config": {"count": -1}}),
                good_destination(),
                "pipeline.spec.source.config.count",
            ),
            (
                json!({"type": "generator", "config": {"count": 5, "cuont": 5}}),
                good_destination(),
                "pipeline.spec.source.config.cuont",
            ),
            (
                json!({"type": "generator", "config": {"count": 5}}),
                json!({"type": "mysql", "config": {}}),
                "pipeline.spec.destination.type",
            ),
            (
                json!({"type": "generator", "config": {"count": 5}}),
                json!({"type": "postgres", "config": {"table": "t"}}),
                "pipeline.spec.destination.config.url",
            ),
            (
                json!({"type": "generator", "config": {"count": 5}}),
                json!({"type": "postgres", "config": {"url": "postgres://x/y"}}),
                "pipeline.spec.destination.config.table",
            ),
            (
                json!({"type": "generator", "config": {"count": 5}}),
                json!({"type": "postgres", "config": {"url": "postgres://x/y", "table": "Robert'); drop"}}),
                "pipeline.spec.destination.config.table",
            ),
            (
                json!({"type": "generator", "config": {"count": 5}}),
                json!({"type": "postgres", "config": {"url": "http://x", "table": "t"}}),
                "pipeline.spec.destination.config.url",
            ),
        ];
        let mut cases = cases.to_vec();
        for (url, table) in [
            ("postgres://x/y?sslcert=/etc/worker.pem", "t"),
            ("postgres://x/y?sslkey=/etc/worker.key", "t"),
            ("postgres://x/y?ssl%6Bey=/etc/worker.key", "t"),
            ("postgres://x/y?host=/var/run/postgresql", "t"),
            ("postgres://x/y?sslpassword=p", "t"),
            ("postgres:///y", "t"),
            ("not a url", "t"),
            (
                "postgres://x/y?sslmode=verify-ca&sslrootcert=/dev/zero",
                "t",
            ),
            ("postgres://x/y?sslrootcert=../ca.pem", "t"),
            ("postgres://x/y?sslrootcert=.hidden", "t"),
            ("postgres://x/y?sslrootcert=a%2Fb.pem", "t"),
            ("postgres://x/y?sslmode=sometimes", "t"),
            ("postgres://u@%2Fvar%2Frun%2Fpostgresql/db", "t"),
            ("postgres://u@%2fvar%2frun%2fpostgresql:5432/db", "t"),
            ("postgres://u@db,other/db", "t"),
            ("postgres://u@[not-v6]/db", "t"),
        ] {
            cases.push((
                json!({"type": "generator", "config": {"count": 5}}),
                json!({"type": "postgres", "config": {"url": url, "table": table}}),
                "pipeline.spec.destination.config.url",
            ));
        }
        cases.push((
            json!({"type": "generator", "config": {"count": 5}}),
            json!({"type": "postgres", "config": {"url": "postgres://x/y", "table": "api_tokens"}}),
            "pipeline.spec.destination.config.table",
        ));
        for (source, destination, field) in cases {
            let err = spec(source.clone(), destination)
                .validate("pipeline.spec")
                .expect_err("must be rejected");
            assert_eq!(err.field, field, "{source}: {err}");
        }
    }

    #[test]
    fn allowed_url_parameters_pass() {
        let ok = spec(
            json!({"type": "generator", "config": {"count": 5}}),
            json!({"type": "postgres", "config": {
                "url": "postgresql://app:pw@db:5432/x?sslmode=verify-full&sslrootcert=ca.pem&application_name=sluice",
                "table": "t", "schema": "analytics"}}),
        );
        assert!(ok.validate("pipeline.spec").is_ok());
        // Sluice's table names are fine outside the public schema.
        let other_schema = spec(
            json!({"type": "generator", "config": {"count": 5}}),
            json!({"type": "postgres", "config": {"url": "postgres://db/x", "table": "pipelines", "schema": "analytics"}}),
        );
        assert!(other_schema.validate("pipeline.spec").is_ok());
    }

    #[test]
    fn hosts_and_ca_files() {
        for ok in ["db", "db-1.internal", "10.0.0.5", "[::1]", "[fe80::1]"] {
            assert!(is_network_host(ok), "{ok}");
        }
        for bad in ["", "%2Fvar%2Frun", "/tmp", "a,b", "-x", "[x]", "h\u{e9}"] {
            assert!(!is_network_host(bad), "{bad}");
        }
        assert!(is_bare_file_name("pg-ca.pem"));
        for bad in ["", "..", ".ca", "a/b", "/dev/zero", "c:\\x"] {
            assert!(!is_bare_file_name(bad), "{bad}");
        }
        let inline = |pem: &str, url: &str| {
            spec(
                json!({"type": "generator", "config": {"count": 5}}),
                json!({"type": "postgres", "config": {"url": url, "table": "t", "ssl_ca_pem": pem}}),
            )
            .validate("s")
        };
        let pem = "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n";
        let DestinationConfig::Postgres(pg) = inline(pem, "postgres://db/x?sslmode=verify-full")
            .expect("inline CA")
            .destination;
        assert_eq!(pg.ssl_ca_pem.as_deref(), Some(pem));
        assert_eq!(
            inline("not pem", "postgres://db/x")
                .expect_err("not PEM")
                .field,
            "s.destination.config.ssl_ca_pem"
        );
        assert!(inline(pem, "postgres://db/x?sslrootcert=ca.pem").is_err());
    }

    #[test]
    fn oversized_specs_are_rejected_with_the_limit_named() {
        let s = spec(
            json!({"type": "generator", "config": {"count": 1}}),
            json!({"type": "postgres", "config": {"url": format!("postgres://x/{}", "y".repeat(MAX_SPEC_BYTES)), "table": "t"}}),
        );
        let err = s.validate("pipeline.spec").expect_err("too large");
        assert_eq!(err.field, "pipeline.spec");
        assert!(
            err.description.contains(&MAX_SPEC_BYTES.to_string()),
            "{err}"
        );
    }

    #[test]
    fn json_round_trip() {
        let s = spec(
            json!({"type": "generator", "config": {"count": 3}}),
            good_destination(),
        );
        assert_eq!(PipelineSpec::from_json(s.to_json()).expect("round trip"), s);
    }
}
