//! Pipeline specs: the stored shape (`{"source": {"type", "config"}, "destination":
//! {...}}`) and the pure helpers connectors validate their configs with. Which types
//! exist and what their configs may say is the connectors' business
//! (`sluice-connectors`, one file per connector, behind one registry); every violation
//! names the field as a client spelled it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::FieldViolation;

/// Largest spec accepted, as stored JSON: a spec is configuration, not data, and every
/// change of it is stored, signalled and re-read by a worker.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

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
    /// The source's streams to read; empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<String>,
    /// When sync runs start after the backfill (see [`crate::schedule::Schedule`]);
    /// None: only on request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Overrides of the worker's retry policy for this pipeline's activities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
}

/// Temporal's retry options, each optional (None: the worker's default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_coefficient: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_interval_ms: Option<u64>,
    /// Attempts before the pipeline goes to ERROR; None (or 0): unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_attempts: Option<u32>,
}

impl RetrySpec {
    /// The worker's policy with these overrides.
    pub fn apply(&self, base: crate::retry::RetryPolicy) -> crate::retry::RetryPolicy {
        crate::retry::RetryPolicy {
            initial_interval: self
                .initial_interval_ms
                .map_or(base.initial_interval, std::time::Duration::from_millis),
            multiplier: self.backoff_coefficient.unwrap_or(base.multiplier),
            max_interval: self
                .maximum_interval_ms
                .map_or(base.max_interval, std::time::Duration::from_millis),
            max_attempts: self
                .maximum_attempts
                .filter(|n| *n > 0)
                .or(base.max_attempts),
            ..base
        }
    }
}

impl PipelineSpec {
    pub fn new(source: ConnectorSpec, destination: ConnectorSpec) -> Self {
        Self {
            source,
            destination,
            streams: Vec::new(),
            schedule: None,
            retry: None,
        }
    }

    /// The size rule every spec obeys, whatever its connectors; `prefix` is the path
    /// of the spec in the request (e.g. `pipeline.spec`).
    pub fn check_size(&self, prefix: &str) -> Result<(), FieldViolation> {
        let size = self.to_json().to_string().len();
        if size > MAX_SPEC_BYTES {
            return Err(FieldViolation::new(
                prefix,
                format!("is {size} bytes as JSON; the limit is {MAX_SPEC_BYTES} bytes"),
            ));
        }
        Ok(())
    }

    /// The rules of the connector-independent fields: size, stream names, schedule,
    /// retry policy.
    pub fn check_common(&self, prefix: &str) -> Result<(), FieldViolation> {
        self.check_size(prefix)?;
        let mut seen = std::collections::BTreeSet::new();
        for name in &self.streams {
            if name.is_empty() || name.len() > 255 {
                return Err(FieldViolation::new(
                    format!("{prefix}.streams"),
                    "names must be 1-255 characters",
                ));
            }
            if !seen.insert(name) {
                return Err(FieldViolation::new(
                    format!("{prefix}.streams"),
                    format!("names {name:?} twice"),
                ));
            }
        }
        if let Some(schedule) = &self.schedule {
            crate::schedule::Schedule::parse(schedule)
                .map_err(|why| FieldViolation::new(format!("{prefix}.schedule"), why))?;
        }
        if let Some(retry) = &self.retry {
            let field = |name: &str| format!("{prefix}.retry.{name}");
            if let Some(ms) = retry.initial_interval_ms {
                if !(1..=3_600_000).contains(&ms) {
                    return Err(FieldViolation::new(
                        field("initial_interval_ms"),
                        "must be 1 ms to 1 hour",
                    ));
                }
            }
            if let Some(c) = retry.backoff_coefficient {
                if !(1.0..=10.0).contains(&c) {
                    return Err(FieldViolation::new(
                        field("backoff_coefficient"),
                        "must be between 1 and 10",
                    ));
                }
            }
            if let Some(ms) = retry.maximum_interval_ms {
                if !(1..=86_400_000).contains(&ms)
                    || retry.initial_interval_ms.is_some_and(|i| ms < i)
                {
                    return Err(FieldViolation::new(
                        field("maximum_interval_ms"),
                        "must be 1 ms to 1 day, and not below initial_interval_ms",
                    ));
                }
            }
        }
        Ok(())
    }

    /// What defines the data a pipeline moves (its connectors and streams), without
    /// when it syncs or how it retries: a change here reads the source again.
    pub fn data_spec(&self) -> Value {
        serde_json::json!({
            "source": self.source,
            "destination": self.destination,
            "streams": self.streams,
        })
    }

    /// SHA-256 of everything the spec says (secrets included, as held): what a holder
    /// of many specs keeps to tell whether one changed, instead of a copy.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::Digest;
        let bytes = serde_json::to_vec(self).expect("a spec is plain JSON and always serializes");
        sha2::Sha256::digest(bytes).into()
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a spec is plain JSON and always serializes")
    }

    pub fn from_json(value: Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(value)
    }
}

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

/// SQL identifiers are restricted to lowercase names so they never need quoting
/// games: `[a-z_][a-z0-9_]*`, at most 63 bytes (PostgreSQL's limit).
pub fn check_identifier(name: &str) -> Result<(), &'static str> {
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
pub struct ConfigReader<'a> {
    config: &'a Map<String, Value>,
    path: String,
    seen: Vec<&'static str>,
}

impl<'a> ConfigReader<'a> {
    pub fn new(config: &'a Map<String, Value>, path: String) -> Self {
        Self {
            config,
            path,
            seen: Vec::new(),
        }
    }

    pub fn violation(&self, key: &str, description: &str) -> FieldViolation {
        FieldViolation::new(format!("{}.{key}", self.path), description)
    }

    pub fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.push(key);
        self.config.get(key).filter(|v| !v.is_null())
    }

    fn missing(&self, key: &str) -> FieldViolation {
        self.violation(key, "is required")
    }

    pub fn u64(&mut self, key: &'static str, default: Option<u64>) -> Result<u64, FieldViolation> {
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

    pub fn string(
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

    pub fn optional_string(&mut self, key: &'static str) -> Result<Option<String>, FieldViolation> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(Value::String(_)) => Err(self.violation(key, "must not be empty")),
            Some(_) => Err(self.violation(key, "must be a string")),
        }
    }

    /// A list of non-empty strings; None when absent.
    pub fn string_list(
        &mut self,
        key: &'static str,
    ) -> Result<Option<Vec<String>>, FieldViolation> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    _ => Err(self.violation(key, "must be a list of non-empty strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(self.violation(key, "must be a list of non-empty strings")),
        }
    }

    pub fn bool(
        &mut self,
        key: &'static str,
        default: Option<bool>,
    ) -> Result<bool, FieldViolation> {
        match self.get(key) {
            None => default.ok_or_else(|| self.missing(key)),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.violation(key, "must be true or false")),
        }
    }

    pub fn reject_unknown(&self) -> Result<(), FieldViolation> {
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

    #[test]
    fn hosts_and_file_names() {
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
    }

    #[test]
    fn unknown_keys_are_named_and_typed_reads_check_types() {
        let config: Map<String, Value> =
            serde_json::from_str(r#"{"count": 1.5, "cuont": 1}"#).expect("test config");
        let mut reader = ConfigReader::new(&config, "s.config".into());
        assert_eq!(
            reader.u64("count", None).expect_err("fraction").field,
            "s.config.count"
        );
        assert_eq!(
            reader.reject_unknown().expect_err("typo").field,
            "s.config.cuont"
        );
    }

    #[test]
    fn oversized_specs_are_rejected_with_the_limit_named() {
        let s: PipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {"type": "generator", "config": {"count": 1}},
            "destination": {"type": "postgres", "config": {"url": format!("postgres://x/{}", "y".repeat(MAX_SPEC_BYTES)), "table": "t"}}
        }))
        .expect("well-formed");
        let err = s.check_size("pipeline.spec").expect_err("too large");
        assert_eq!(err.field, "pipeline.spec");
        assert!(
            err.description.contains(&MAX_SPEC_BYTES.to_string()),
            "{err}"
        );
    }
}
