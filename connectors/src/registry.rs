//! Every connector Sluice knows, and the one validation of a spec: each side's type
//! must be known and its config must parse. The control plane validates create and
//! update requests here; workers build their connectors here.

use serde_json::{Map, Value};
use sluice_protocol::secrets::{SecretField, SecretFields, Side};
use sluice_protocol::spec::PipelineSpec;
use sluice_protocol::FieldViolation;

use crate::{Destination, Source};

/// A kind of source: what it is called, what its config says, and how to build one.
pub trait SourceKind: Sync {
    /// The `type` of a spec's source, e.g. "postgres".
    fn name(&self) -> &'static str;
    /// One line for `sluicectl connectors`.
    fn summary(&self) -> &'static str;
    /// The JSON schema of the config.
    fn config_schema(&self) -> Value;
    /// The config keys that hold secrets.
    fn secret_fields(&self) -> &'static [SecretField] {
        &[]
    }
    /// Parses and validates a config (no I/O); violations name fields under `path`.
    fn build(
        &self,
        config: &Map<String, Value>,
        path: &str,
    ) -> Result<Box<dyn Source>, FieldViolation>;
}

/// A kind of destination.
pub trait DestinationKind: Sync {
    fn name(&self) -> &'static str;
    fn summary(&self) -> &'static str;
    fn config_schema(&self) -> Value;
    fn secret_fields(&self) -> &'static [SecretField] {
        &[]
    }
    fn build(
        &self,
        config: &Map<String, Value>,
        path: &str,
    ) -> Result<Box<dyn Destination>, FieldViolation>;
}

/// A spec whose connectors were built from their configs.
#[derive(Debug)]
pub struct ValidatedSpec {
    pub source: Box<dyn Source>,
    pub destination: Box<dyn Destination>,
}

pub struct Registry {
    sources: &'static [&'static dyn SourceKind],
    destinations: &'static [&'static dyn DestinationKind],
}

static REGISTRY: Registry = Registry {
    sources: &[
        &crate::generator::GeneratorKind,
        &crate::postgres_source::PostgresSourceKind,
        &crate::stripe_source::StripeSourceKind,
        &crate::jsonl::JsonlSourceKind,
        &crate::kafka_topic::KafkaSourceKind,
    ],
    destinations: &[
        &crate::postgres_destination::PostgresDestinationKind,
        &crate::jsonl::JsonlDestinationKind,
        &crate::kafka_topic::KafkaDestinationKind,
    ],
};

/// The registry of every connector.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

impl Registry {
    pub fn sources(&self) -> impl Iterator<Item = &'static dyn SourceKind> + '_ {
        self.sources.iter().copied()
    }

    pub fn destinations(&self) -> impl Iterator<Item = &'static dyn DestinationKind> + '_ {
        self.destinations.iter().copied()
    }

    fn source_kind(&self, name: &str) -> Option<&'static dyn SourceKind> {
        self.sources().find(|k| k.name() == name)
    }

    fn destination_kind(&self, name: &str) -> Option<&'static dyn DestinationKind> {
        self.destinations().find(|k| k.name() == name)
    }

    /// Validates a whole spec, the one gate of create and update alike; `prefix` is
    /// the spec's path in the request (e.g. `pipeline.spec`).
    pub fn validate(
        &self,
        spec: &PipelineSpec,
        prefix: &str,
    ) -> Result<ValidatedSpec, FieldViolation> {
        spec.check_common(prefix)?;
        let source_path = format!("{prefix}.source");
        let source = match spec.source.connector_type.as_str() {
            "" => {
                return Err(FieldViolation::new(
                    format!("{source_path}.type"),
                    "is required",
                ))
            }
            name => self.source_kind(name).ok_or_else(|| {
                FieldViolation::new(
                    format!("{source_path}.type"),
                    format!(
                        "unknown source type {name:?}; known: {}",
                        self.sources()
                            .map(|k| k.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?,
        };
        let destination_path = format!("{prefix}.destination");
        let destination = match spec.destination.connector_type.as_str() {
            "" => {
                return Err(FieldViolation::new(
                    format!("{destination_path}.type"),
                    "is required",
                ))
            }
            name => self.destination_kind(name).ok_or_else(|| {
                FieldViolation::new(
                    format!("{destination_path}.type"),
                    format!(
                        "unknown destination type {name:?}; known: {}",
                        self.destinations()
                            .map(|k| k.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?,
        };
        Ok(ValidatedSpec {
            source: source.build(&spec.source.config, &format!("{source_path}.config"))?,
            destination: destination.build(
                &spec.destination.config,
                &format!("{destination_path}.config"),
            )?,
        })
    }
}

impl SecretFields for Registry {
    fn secret_fields(&self, side: Side, connector_type: &str) -> &'static [SecretField] {
        match side {
            Side::Source => self
                .source_kind(connector_type)
                .map_or(&[], |k| k.secret_fields()),
            Side::Destination => self
                .destination_kind(connector_type)
                .map_or(&[], |k| k.secret_fields()),
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

    #[test]
    fn unknown_and_missing_types_are_named() {
        let good_destination =
            json!({"type": "postgres", "config": {"url": "postgres://x/y", "table": "t"}});
        let cases = [
            (
                json!({"type": "kafkaa", "config": {}}),
                good_destination.clone(),
                "pipeline.spec.source.type",
            ),
            (
                json!({"type": "", "config": {}}),
                good_destination,
                "pipeline.spec.source.type",
            ),
            (
                json!({"type": "generator", "config": {"count": 5}}),
                json!({"type": "mysql", "config": {}}),
                "pipeline.spec.destination.type",
            ),
        ];
        for (source, destination, field) in cases {
            let err = registry()
                .validate(&spec(source, destination), "pipeline.spec")
                .expect_err("must be rejected");
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn every_connector_has_a_schema_and_a_unique_name() {
        let mut names = std::collections::BTreeSet::new();
        for k in registry().sources() {
            assert!(names.insert(("source", k.name())), "{}", k.name());
            assert_eq!(k.config_schema()["type"], "object", "{}", k.name());
            assert!(!k.summary().is_empty());
        }
        for k in registry().destinations() {
            assert!(names.insert(("destination", k.name())), "{}", k.name());
            assert_eq!(k.config_schema()["type"], "object", "{}", k.name());
        }
    }

    #[test]
    fn secret_fields_come_from_the_connectors() {
        let url = registry().secret_fields(Side::Destination, "postgres");
        assert_eq!(url.iter().map(|f| f.key).collect::<Vec<_>>(), ["url"]);
        assert!(registry()
            .secret_fields(Side::Source, "generator")
            .is_empty());
        assert!(registry().secret_fields(Side::Source, "nope").is_empty());
    }
}
