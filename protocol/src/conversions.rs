//! Conversions between protobuf messages and domain types. Handlers work on domain
//! types only; every missing or malformed field is reported here with its path.

use std::time::SystemTime;

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};

use crate::mask::PipelinePatch;
use crate::pb;
use crate::spec::{ConnectorSpec, PipelineSpec, RetrySpec};
use crate::status::{derive_phase, DesiredStatus, PipelineStatus};
use crate::FieldViolation;

/// A pipeline as stored, the domain shape every API response is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineRecord {
    /// Internal key (see [`crate::ids::pipeline_key`]); never shown to clients.
    pub id: String,
    pub tenant: String,
    /// The id clients know the pipeline by, unique within its tenant.
    pub name: String,
    pub spec: PipelineSpec,
    pub desired_status: DesiredStatus,
    pub status: Option<PipelineStatus>,
    pub generation: i64,
    pub observed_generation: i64,
    pub owner: Option<String>,
    pub owner_epoch: i64,
    pub last_error: Option<String>,
    pub partition: i32,
    /// Which life of this key the row is: a new value every time the pipeline is
    /// created, so an id deleted and created again is a new incarnation.
    pub incarnation: i64,
    /// Whether this incarnation's inputs topic exists (made on the first
    /// PushSourceInput); its live lane runs only then.
    pub inputs_open: bool,
    /// The activity the owning worker is retrying, if any.
    pub pending_activity: Option<PendingActivity>,
    /// Why no worker owns the pipeline, when the worker of its partition declined it.
    pub unassigned_reason: Option<String>,
    /// Sync runs asked for with TriggerSync, all told.
    pub sync_requests: i64,
    /// Streams to read again from the start once applied (empty: all), if a reset is
    /// pending.
    pub reset_request: Option<Vec<String>>,
    pub create_time: SystemTime,
    pub update_time: SystemTime,
}

/// A failing activity that the owning worker will retry (stored as JSON in
/// `pipelines.pending_activity`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingActivity {
    pub name: String,
    pub attempt: u32,
    pub last_failure: String,
    pub failure_type: String,
    /// Milliseconds since the Unix epoch.
    pub first_failure_ms: i64,
    pub last_failure_ms: i64,
    pub next_attempt_ms: i64,
}

fn timestamp_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn pending_activity_to_pb(a: &PendingActivity) -> pb::PendingActivity {
    pb::PendingActivity {
        name: a.name.clone(),
        attempt: i32::try_from(a.attempt).unwrap_or(i32::MAX),
        last_failure: a.last_failure.clone(),
        failure_type: a.failure_type.clone(),
        first_failure_time: Some(timestamp_ms(a.first_failure_ms)),
        last_failure_time: Some(timestamp_ms(a.last_failure_ms)),
        next_attempt_time: Some(timestamp_ms(a.next_attempt_ms)),
    }
}

impl PipelineRecord {
    /// Version tag of the desired state. Only the control plane's writes (which bump
    /// the generation) change it, so worker progress never invalidates a client's etag.
    pub fn etag(&self) -> String {
        format!("\"g{}\"", self.generation)
    }
}

pub fn struct_to_json(s: &prost_types::Struct) -> Map<String, Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

pub fn value_to_json(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => {
            // Integral doubles become JSON integers so stored specs read naturally.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::Number(Number::from(*n as i64))
            } else {
                Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
    }
}

pub fn json_to_struct(map: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

pub fn json_to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn connector_from_pb(c: &pb::ConnectorSpec) -> ConnectorSpec {
    ConnectorSpec {
        connector_type: c.r#type.clone(),
        config: c.config.as_ref().map(struct_to_json).unwrap_or_default(),
    }
}

pub fn connector_to_pb(c: &ConnectorSpec) -> pb::ConnectorSpec {
    pb::ConnectorSpec {
        r#type: c.connector_type.clone(),
        config: Some(json_to_struct(&c.config)),
    }
}

pub fn spec_from_pb(
    spec: Option<&pb::PipelineSpec>,
    path: &str,
) -> Result<PipelineSpec, FieldViolation> {
    let spec = spec.ok_or_else(|| FieldViolation::new(path, "is required"))?;
    let source = spec
        .source
        .as_ref()
        .ok_or_else(|| FieldViolation::new(format!("{path}.source"), "is required"))?;
    let destination = spec
        .destination
        .as_ref()
        .ok_or_else(|| FieldViolation::new(format!("{path}.destination"), "is required"))?;
    Ok(PipelineSpec {
        source: connector_from_pb(source),
        destination: connector_from_pb(destination),
        streams: spec.streams.clone(),
        schedule: Some(spec.schedule.clone()).filter(|s| !s.is_empty()),
        retry: spec
            .retry
            .as_ref()
            .map(|r| retry_from_pb(r, path))
            .transpose()?,
    })
}

pub fn retry_from_pb(r: &pb::RetryPolicy, path: &str) -> Result<RetrySpec, FieldViolation> {
    let positive = |v: i64, name: &str| -> Result<Option<u64>, FieldViolation> {
        match v {
            0 => Ok(None),
            v if v > 0 => Ok(Some(v as u64)),
            _ => Err(FieldViolation::new(
                format!("{path}.retry.{name}"),
                "must not be negative",
            )),
        }
    };
    Ok(RetrySpec {
        initial_interval_ms: positive(r.initial_interval_ms, "initial_interval_ms")?,
        backoff_coefficient: Some(r.backoff_coefficient).filter(|c| *c != 0.0),
        maximum_interval_ms: positive(r.maximum_interval_ms, "maximum_interval_ms")?,
        maximum_attempts: match r.maximum_attempts {
            0 => None,
            n if n > 0 => Some(n as u32),
            _ => {
                return Err(FieldViolation::new(
                    format!("{path}.retry.maximum_attempts"),
                    "must not be negative",
                ))
            }
        },
    })
}

pub fn spec_to_pb(spec: &PipelineSpec) -> pb::PipelineSpec {
    pb::PipelineSpec {
        source: Some(connector_to_pb(&spec.source)),
        destination: Some(connector_to_pb(&spec.destination)),
        streams: spec.streams.clone(),
        schedule: spec.schedule.clone().unwrap_or_default(),
        retry: spec.retry.as_ref().map(|r| pb::RetryPolicy {
            initial_interval_ms: r.initial_interval_ms.map_or(0, |v| v as i64),
            backoff_coefficient: r.backoff_coefficient.unwrap_or(0.0),
            maximum_interval_ms: r.maximum_interval_ms.map_or(0, |v| v as i64),
            maximum_attempts: r.maximum_attempts.map_or(0, |v| v as i32),
        }),
    }
}

/// Reads an enum field; UNSPECIFIED is None, an out-of-range number is an error.
pub fn desired_status_from_pb(
    v: i32,
    field: &str,
) -> Result<Option<DesiredStatus>, FieldViolation> {
    match pb::DesiredStatus::try_from(v) {
        Ok(pb::DesiredStatus::Unspecified) => Ok(None),
        Ok(pb::DesiredStatus::Active) => Ok(Some(DesiredStatus::Active)),
        Ok(pb::DesiredStatus::Paused) => Ok(Some(DesiredStatus::Paused)),
        Ok(pb::DesiredStatus::Deleted) => Ok(Some(DesiredStatus::Deleted)),
        Err(_) => Err(FieldViolation::new(field, format!("unknown value {v}"))),
    }
}

pub fn desired_status_to_pb(d: DesiredStatus) -> pb::DesiredStatus {
    match d {
        DesiredStatus::Active => pb::DesiredStatus::Active,
        DesiredStatus::Paused => pb::DesiredStatus::Paused,
        DesiredStatus::Deleted => pb::DesiredStatus::Deleted,
    }
}

pub fn status_to_pb(s: Option<PipelineStatus>) -> pb::PipelineStatus {
    match s {
        None => pb::PipelineStatus::Unspecified,
        Some(PipelineStatus::Setup) => pb::PipelineStatus::Setup,
        Some(PipelineStatus::Backfill) => pb::PipelineStatus::Backfill,
        Some(PipelineStatus::Ready) => pb::PipelineStatus::Ready,
        Some(PipelineStatus::Paused) => pb::PipelineStatus::Paused,
        Some(PipelineStatus::Teardown) => pb::PipelineStatus::Teardown,
        Some(PipelineStatus::Error) => pb::PipelineStatus::Error,
    }
}

pub fn status_from_pb(s: pb::PipelineStatus) -> Option<PipelineStatus> {
    match s {
        pb::PipelineStatus::Unspecified => None,
        pb::PipelineStatus::Setup => Some(PipelineStatus::Setup),
        pb::PipelineStatus::Backfill => Some(PipelineStatus::Backfill),
        pb::PipelineStatus::Ready => Some(PipelineStatus::Ready),
        pb::PipelineStatus::Paused => Some(PipelineStatus::Paused),
        pb::PipelineStatus::Teardown => Some(PipelineStatus::Teardown),
        pb::PipelineStatus::Error => Some(PipelineStatus::Error),
    }
}

/// Reads the updatable fields of an `UpdatePipelineRequest.pipeline`.
pub fn patch_from_pb(p: &pb::Pipeline) -> Result<PipelinePatch, FieldViolation> {
    Ok(PipelinePatch {
        desired_status: desired_status_from_pb(p.desired_status, "pipeline.desired_status")?,
        source: p
            .spec
            .as_ref()
            .and_then(|s| s.source.as_ref())
            .map(connector_from_pb),
        destination: p
            .spec
            .as_ref()
            .and_then(|s| s.destination.as_ref())
            .map(connector_from_pb),
        streams: p
            .spec
            .as_ref()
            .map(|s| s.streams.clone())
            .unwrap_or_default(),
        schedule: p
            .spec
            .as_ref()
            .map(|s| s.schedule.clone())
            .filter(|s| !s.is_empty()),
        retry: p
            .spec
            .as_ref()
            .and_then(|s| s.retry.as_ref())
            .map(|r| retry_from_pb(r, "pipeline.spec"))
            .transpose()?,
    })
}

pub fn record_to_pb(r: &PipelineRecord, fields: &dyn crate::secrets::SecretFields) -> pb::Pipeline {
    pb::Pipeline {
        id: r.name.clone(),
        tenant: r.tenant.clone(),
        // Secrets never leave the server.
        spec: Some(spec_to_pb(&crate::secrets::redact_spec(&r.spec, fields))),
        desired_status: desired_status_to_pb(r.desired_status) as i32,
        status: status_to_pb(r.status) as i32,
        phase: derive_phase(r.desired_status, r.status, r.owner.as_deref()).to_string(),
        generation: r.generation,
        observed_generation: r.observed_generation,
        owner: r.owner.clone().unwrap_or_default(),
        last_error: r.last_error.clone().unwrap_or_default(),
        etag: r.etag(),
        create_time: Some(r.create_time.into()),
        update_time: Some(r.update_time.into()),
        pending_activity: r.pending_activity.as_ref().map(pending_activity_to_pb),
        // Only while nobody owns it: a claim clears it, but an owner shown with an
        // old reason would contradict itself.
        unassigned_reason: if r.owner.as_deref().is_none_or(str::is_empty) {
            r.unassigned_reason.clone().unwrap_or_default()
        } else {
            String::new()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn struct_json_round_trip() {
        let v = json!({"count": 10, "ratio": 0.5, "name": "x", "on": true, "nested": {"a": [1, "b", null]}});
        let Value::Object(map) = v else {
            unreachable!()
        };
        assert_eq!(struct_to_json(&json_to_struct(&map)), map);
    }

    #[test]
    fn missing_spec_parts_are_named() {
        let err = spec_from_pb(None, "pipeline.spec").expect_err("missing");
        assert_eq!(err.field, "pipeline.spec");
        let partial = pb::PipelineSpec {
            source: Some(pb::ConnectorSpec::default()),
            destination: None,
            ..Default::default()
        };
        let err = spec_from_pb(Some(&partial), "pipeline.spec").expect_err("missing");
        assert_eq!(err.field, "pipeline.spec.destination");
    }

    #[test]
    fn out_of_range_enum_is_rejected() {
        assert!(desired_status_from_pb(42, "pipeline.desired_status").is_err());
        assert_eq!(desired_status_from_pb(0, "x"), Ok(None));
    }
}
