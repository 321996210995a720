//! Turning `sluicectl create` input — a spec file, connector flags, or both kinds of
//! override flags — into one `CreatePipelineRequest`. Pure: reading the file happens in
//! the caller, so every rule here is testable without a filesystem or a server.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};
use sluice_protocol::conversions::json_to_struct;
use sluice_protocol::pb;

/// Why the create input cannot become a request. All of these are usage errors.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{origin}: invalid JSON: {source}")]
    Json {
        origin: String,
        source: serde_json::Error,
    },
    #[error("{origin}: invalid YAML: {source}")]
    Yaml {
        origin: String,
        source: serde_yaml::Error,
    },
    #[error("{origin}: neither valid JSON ({json}) nor valid YAML ({yaml})")]
    Unrecognised {
        origin: String,
        json: serde_json::Error,
        yaml: serde_yaml::Error,
    },
    #[error("{flag}: not a JSON object: {reason}")]
    ConfigFlag { flag: &'static str, reason: String },
    #[error("{0} is required when no spec file is given")]
    MissingFlag(&'static str),
}

/// The file format, chosen by extension; anything else is sniffed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Json,
    Yaml,
    /// Unknown extension or stdin: try JSON first (it is strict, so a YAML file never
    /// parses as JSON by accident), then YAML.
    Detect,
}

impl FileFormat {
    pub fn from_path(path: &Path) -> Self {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("json") => Self::Json,
            Some("yaml" | "yml") => Self::Yaml,
            _ => Self::Detect,
        }
    }
}

/// The spec file as written by an operator.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub desired_status: Option<InitialStatus>,
    pub spec: SpecFile,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    pub source: ConnectorFile,
    pub destination: ConnectorFile,
    /// The source's streams to read; empty: all.
    #[serde(default)]
    pub streams: Vec<String>,
    /// "every 15m" or a cron expression.
    #[serde(default)]
    pub schedule: Option<String>,
    #[serde(default)]
    pub retry: Option<RetryFile>,
}

/// Retry overrides, as in the API's RetryPolicy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    #[serde(default)]
    pub initial_interval_ms: i64,
    #[serde(default)]
    pub backoff_coefficient: f64,
    #[serde(default)]
    pub maximum_interval_ms: i64,
    #[serde(default)]
    pub maximum_attempts: i32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorFile {
    #[serde(rename = "type")]
    pub connector_type: String,
    #[serde(default)]
    pub config: Map<String, Value>,
}

/// The statuses a pipeline may be created in; DELETED makes no sense at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InitialStatus {
    Active,
    Paused,
}

impl InitialStatus {
    fn to_pb(self) -> pb::DesiredStatus {
        match self {
            Self::Active => pb::DesiredStatus::Active,
            Self::Paused => pb::DesiredStatus::Paused,
        }
    }
}

/// Parses a spec file. `origin` names it in error messages (a path or "<stdin>").
pub fn parse_file(text: &str, format: FileFormat, origin: &str) -> Result<PipelineFile, SpecError> {
    let origin = origin.to_owned();
    match format {
        FileFormat::Json => {
            serde_json::from_str(text).map_err(|source| SpecError::Json { origin, source })
        }
        FileFormat::Yaml => {
            serde_yaml::from_str(text).map_err(|source| SpecError::Yaml { origin, source })
        }
        FileFormat::Detect => match serde_json::from_str(text) {
            Ok(file) => Ok(file),
            // Valid JSON with a schema problem (unknown key, missing field) is reported
            // as such rather than hidden behind a less precise YAML error.
            Err(json) if !json.is_syntax() && !json.is_eof() => Err(SpecError::Json {
                origin,
                source: json,
            }),
            Err(json) => serde_yaml::from_str(text).map_err(|yaml| {
                // Well-formed YAML that does not fit the schema is a YAML file with a
                // mistake in it; the JSON syntax error would only distract.
                if serde_yaml::from_str::<serde_yaml::Value>(text).is_ok() {
                    SpecError::Yaml {
                        origin,
                        source: yaml,
                    }
                } else {
                    SpecError::Unrecognised { origin, json, yaml }
                }
            }),
        },
    }
}

/// The override and connector flags of `sluicectl create`, minus the file itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreateFlags {
    pub id: Option<String>,
    pub paused: bool,
    pub source_type: Option<String>,
    pub source_config: Option<String>,
    pub destination_type: Option<String>,
    pub destination_config: Option<String>,
}

/// What create will ask for, kept alongside the request so `--wait` knows its target.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatePlan {
    pub request: pb::CreatePipelineRequest,
    pub paused: bool,
}

/// Builds the request from the file (if any) and the flags; flags win over the file.
pub fn build_create(
    file: Option<PipelineFile>,
    flags: CreateFlags,
) -> Result<CreatePlan, SpecError> {
    let (file_id, file_status, spec) = match file {
        Some(f) => (f.id, f.desired_status, f.spec),
        None => {
            let spec = SpecFile {
                source: ConnectorFile {
                    connector_type: flags
                        .source_type
                        .ok_or(SpecError::MissingFlag("--source-type"))?,
                    config: parse_config_flag("--source-config", flags.source_config.as_deref())?,
                },
                destination: ConnectorFile {
                    connector_type: flags
                        .destination_type
                        .ok_or(SpecError::MissingFlag("--destination-type"))?,
                    config: parse_config_flag(
                        "--destination-config",
                        flags.destination_config.as_deref(),
                    )?,
                },
                streams: Vec::new(),
                schedule: None,
                retry: None,
            };
            (None, None, spec)
        }
    };
    let status = if flags.paused {
        InitialStatus::Paused
    } else {
        file_status.unwrap_or(InitialStatus::Active)
    };
    let pipeline = pb::Pipeline {
        spec: Some(pb::PipelineSpec {
            source: Some(connector_to_pb(&spec.source)),
            destination: Some(connector_to_pb(&spec.destination)),
            streams: spec.streams.clone(),
            schedule: spec.schedule.clone().unwrap_or_default(),
            retry: spec.retry.as_ref().map(|r| pb::RetryPolicy {
                initial_interval_ms: r.initial_interval_ms,
                backoff_coefficient: r.backoff_coefficient,
                maximum_interval_ms: r.maximum_interval_ms,
                maximum_attempts: r.maximum_attempts,
            }),
        }),
        desired_status: status.to_pb() as i32,
        ..Default::default()
    };
    Ok(CreatePlan {
        request: pb::CreatePipelineRequest {
            // An empty id asks the server to generate one.
            pipeline_id: flags.id.or(file_id).unwrap_or_default(),
            pipeline: Some(pipeline),
            ..Default::default()
        },
        paused: status == InitialStatus::Paused,
    })
}

fn connector_to_pb(c: &ConnectorFile) -> pb::ConnectorSpec {
    pb::ConnectorSpec {
        r#type: c.connector_type.clone(),
        config: Some(json_to_struct(&c.config)),
    }
}

fn parse_config_flag(
    flag: &'static str,
    text: Option<&str>,
) -> Result<Map<String, Value>, SpecError> {
    let Some(text) = text else {
        return Ok(Map::new());
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(SpecError::ConfigFlag {
            flag,
            reason: format!("got {}", json_kind(&other)),
        }),
        Err(e) => Err(SpecError::ConfigFlag {
            flag,
            reason: e.to_string(),
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_protocol::conversions::struct_to_json;

    const YAML: &str = "\
id: orders
desired_status: PAUSED
spec:
  source:
    type: generator
    config:
      count: 10
  destination:
    type: postgres
    config: {table: orders}
";

    fn source_config(plan: &CreatePlan) -> Value {
        let config = plan
            .request
            .pipeline
            .as_ref()
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.source.as_ref())
            .and_then(|c| c.config.as_ref())
            .expect("built requests always carry a source config");
        Value::Object(struct_to_json(config))
    }

    fn desired(plan: &CreatePlan) -> i32 {
        plan.request
            .pipeline
            .as_ref()
            .expect("built requests always carry a pipeline")
            .desired_status
    }

    #[test]
    fn format_follows_extension() {
        assert_eq!(FileFormat::from_path(Path::new("a.json")), FileFormat::Json);
        assert_eq!(FileFormat::from_path(Path::new("a.YML")), FileFormat::Yaml);
        assert_eq!(FileFormat::from_path(Path::new("a.yaml")), FileFormat::Yaml);
        assert_eq!(FileFormat::from_path(Path::new("-")), FileFormat::Detect);
        assert_eq!(
            FileFormat::from_path(Path::new("spec.txt")),
            FileFormat::Detect
        );
    }

    #[test]
    fn yaml_file_becomes_request() {
        let file = parse_file(YAML, FileFormat::Yaml, "p.yaml").expect("valid yaml");
        let plan = build_create(Some(file), CreateFlags::default()).expect("valid");
        assert_eq!(plan.request.pipeline_id, "orders");
        assert!(plan.paused);
        assert_eq!(desired(&plan), pb::DesiredStatus::Paused as i32);
        assert_eq!(source_config(&plan), json!({"count": 10}));
    }

    #[test]
    fn detection_accepts_json_and_yaml() {
        let json_text = r#"{"spec": {"source": {"type": "g"}, "destination": {"type": "p"}}}"#;
        let file = parse_file(json_text, FileFormat::Detect, "<stdin>").expect("json");
        assert_eq!(file.id, None);
        assert!(file.spec.source.config.is_empty());
        let file = parse_file(YAML, FileFormat::Detect, "<stdin>").expect("yaml");
        assert_eq!(file.id.as_deref(), Some("orders"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        for text in [
            "spec: {source: {type: g}, destination: {type: p}}\nextra: 1\n",
            "spec: {source: {type: g, configg: {}}, destination: {type: p}}\n",
            "spec: {source: {type: g}, destination: {type: p}, sink: {}}\n",
        ] {
            let err = parse_file(text, FileFormat::Yaml, "f.yaml").expect_err(text);
            assert!(err.to_string().contains("unknown field"), "{err}");
        }
        let err = parse_file(
            "spec: {source: {type: g}, destination: {type: p}}\nx: 1\n",
            FileFormat::Detect,
            "<stdin>",
        )
        .expect_err("unknown key");
        assert!(matches!(err, SpecError::Yaml { .. }), "{err}");
        let err = parse_file(
            r#"{"spec": {"source": {"type": "g"}, "destination": {"type": "p"}}, "x": 1}"#,
            FileFormat::Detect,
            "<stdin>",
        )
        .expect_err("unknown key");
        assert!(matches!(err, SpecError::Json { .. }), "{err}");
    }

    #[test]
    fn bad_desired_status_and_missing_spec_are_rejected() {
        let deleted =
            "desired_status: DELETED\nspec: {source: {type: g}, destination: {type: p}}\n";
        assert!(parse_file(deleted, FileFormat::Yaml, "f").is_err());
        assert!(parse_file("id: x\n", FileFormat::Yaml, "f").is_err());
        assert!(matches!(
            parse_file("{{{ not: [valid", FileFormat::Detect, "f"),
            Err(SpecError::Unrecognised { .. })
        ));
    }

    #[test]
    fn flags_override_file() {
        let file = parse_file(YAML, FileFormat::Yaml, "p.yaml").expect("valid yaml");
        let flags = CreateFlags {
            id: Some("other".into()),
            ..Default::default()
        };
        let plan = build_create(Some(file.clone()), flags).expect("valid");
        assert_eq!(plan.request.pipeline_id, "other");

        let active_file = PipelineFile {
            desired_status: Some(InitialStatus::Active),
            ..file
        };
        let flags = CreateFlags {
            paused: true,
            ..Default::default()
        };
        let plan = build_create(Some(active_file), flags).expect("valid");
        assert!(plan.paused);
        assert_eq!(desired(&plan), pb::DesiredStatus::Paused as i32);
    }

    #[test]
    fn connector_flags_build_a_spec() {
        let flags = CreateFlags {
            source_type: Some("generator".into()),
            source_config: Some(r#"{"count": 5, "nested": {"a": [1, "b"]}}"#.into()),
            destination_type: Some("postgres".into()),
            ..Default::default()
        };
        let plan = build_create(None, flags).expect("valid");
        assert_eq!(plan.request.pipeline_id, "");
        assert!(!plan.paused);
        assert_eq!(desired(&plan), pb::DesiredStatus::Active as i32);
        assert_eq!(
            source_config(&plan),
            json!({"count": 5, "nested": {"a": [1, "b"]}})
        );
    }

    #[test]
    fn config_flags_must_be_objects() {
        for bad in ["[1]", "3", "{", "\"x\""] {
            let flags = CreateFlags {
                source_type: Some("g".into()),
                source_config: Some(bad.into()),
                destination_type: Some("p".into()),
                ..Default::default()
            };
            let err = build_create(None, flags).expect_err(bad);
            assert!(err.to_string().starts_with("--source-config"), "{err}");
        }
        let err = build_create(None, CreateFlags::default()).expect_err("no types");
        assert!(matches!(err, SpecError::MissingFlag("--source-type")));
    }
}
