//! Rendering API responses for people (tables) and scripts (JSON). The JSON shapes are
//! serde mirrors of the proto messages with readable enums and RFC 3339 timestamps, so
//! scripts get a stable contract without depending on protobuf's JSON mapping.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;
use serde_json::{Map, Value};
use sluice_protocol::conversions::struct_to_json;
use sluice_protocol::pb;

use crate::args::OutputFormat;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineView {
    pub id: String,
    pub tenant: String,
    pub phase: String,
    pub desired_status: String,
    pub status: String,
    pub generation: i64,
    pub observed_generation: i64,
    pub owner: String,
    /// Why no worker owns it, when the worker of its partition declined it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub unassigned_reason: String,
    pub last_error: String,
    /// The activity the worker is retrying, if one keeps failing.
    pub pending_activity: Option<PendingActivityView>,
    pub etag: String,
    pub spec: Option<SpecView>,
    pub create_time: Option<String>,
    pub update_time: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PendingActivityView {
    pub name: String,
    pub attempt: i32,
    pub last_failure: String,
    pub failure_type: String,
    pub first_failure_time: Option<String>,
    pub last_failure_time: Option<String>,
    pub next_attempt_time: Option<String>,
}

impl PendingActivityView {
    /// "setup, attempt 4 (transient_error), next at ...: connection refused".
    fn summary(&self) -> String {
        format!(
            "{}, attempt {} ({}), next at {}: {}",
            self.name,
            self.attempt,
            self.failure_type,
            self.next_attempt_time.as_deref().unwrap_or("?"),
            self.last_failure
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpecView {
    pub source: Option<ConnectorView>,
    pub destination: Option<ConnectorView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectorView {
    #[serde(rename = "type")]
    pub connector_type: String,
    pub config: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventView {
    pub pipeline_id: String,
    pub time: Option<String>,
    pub actor: String,
    pub from_status: String,
    pub to_status: String,
    pub generation: i64,
    pub reason: String,
}

/// Printed by `delete --wait` once the pipeline is gone; there is no pipeline left to show.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemovedView {
    pub id: String,
    pub removed: bool,
}

/// "ACTIVE" for `DESIRED_STATUS_ACTIVE`; numbers the client does not know stay visible.
pub fn desired_status_name(v: i32) -> String {
    match pb::DesiredStatus::try_from(v) {
        Ok(s) => short_name(s.as_str_name(), "DESIRED_STATUS_"),
        Err(_) => format!("UNKNOWN({v})"),
    }
}

/// "READY" for `PIPELINE_STATUS_READY`.
pub fn status_name(v: i32) -> String {
    match pb::PipelineStatus::try_from(v) {
        Ok(s) => short_name(s.as_str_name(), "PIPELINE_STATUS_"),
        Err(_) => format!("UNKNOWN({v})"),
    }
}

fn short_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_owned()
}

fn timestamp(t: Option<&prost_types::Timestamp>) -> Option<String> {
    // prost-types formats timestamps as RFC 3339 in UTC.
    t.map(ToString::to_string)
}

fn connector_view(c: &pb::ConnectorSpec) -> ConnectorView {
    ConnectorView {
        connector_type: c.r#type.clone(),
        config: c.config.as_ref().map(struct_to_json).unwrap_or_default(),
    }
}

impl From<&pb::Pipeline> for PipelineView {
    fn from(p: &pb::Pipeline) -> Self {
        Self {
            id: p.id.clone(),
            tenant: p.tenant.clone(),
            phase: p.phase.clone(),
            desired_status: desired_status_name(p.desired_status),
            status: status_name(p.status),
            generation: p.generation,
            observed_generation: p.observed_generation,
            owner: p.owner.clone(),
            unassigned_reason: p.unassigned_reason.clone(),
            last_error: p.last_error.clone(),
            pending_activity: p.pending_activity.as_ref().map(|a| PendingActivityView {
                name: a.name.clone(),
                attempt: a.attempt,
                last_failure: a.last_failure.clone(),
                failure_type: a.failure_type.clone(),
                first_failure_time: timestamp(a.first_failure_time.as_ref()),
                last_failure_time: timestamp(a.last_failure_time.as_ref()),
                next_attempt_time: timestamp(a.next_attempt_time.as_ref()),
            }),
            etag: p.etag.clone(),
            spec: p.spec.as_ref().map(|s| SpecView {
                source: s.source.as_ref().map(connector_view),
                destination: s.destination.as_ref().map(connector_view),
            }),
            create_time: timestamp(p.create_time.as_ref()),
            update_time: timestamp(p.update_time.as_ref()),
        }
    }
}

impl From<&pb::PipelineEvent> for EventView {
    fn from(e: &pb::PipelineEvent) -> Self {
        Self {
            pipeline_id: e.pipeline_id.clone(),
            time: timestamp(e.time.as_ref()),
            actor: e.actor.clone(),
            from_status: e.from_status.clone(),
            to_status: e.to_status.clone(),
            generation: e.generation,
            reason: e.reason.clone(),
        }
    }
}

impl PipelineView {
    fn source_type(&self) -> &str {
        self.connector_type(|s| s.source.as_ref())
    }

    fn destination_type(&self) -> &str {
        self.connector_type(|s| s.destination.as_ref())
    }

    fn connector_type(&self, pick: impl Fn(&SpecView) -> Option<&ConnectorView>) -> &str {
        self.spec
            .as_ref()
            .and_then(pick)
            .map_or("", |c| c.connector_type.as_str())
    }
}

/// Empty values print as "-" so table columns never look shifted.
fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn new_table() -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    table
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> String {
    // Serialising these plain structs of strings, numbers and JSON maps cannot fail.
    serde_json::to_string_pretty(value).expect("views contain only JSON-representable data")
}

pub fn render_pipeline(p: &pb::Pipeline, format: OutputFormat) -> String {
    let view = PipelineView::from(p);
    match format {
        OutputFormat::Json => to_json(&view),
        OutputFormat::Table => {
            let mut table = new_table();
            let gen = format!(
                "{} (observed {})",
                view.generation, view.observed_generation
            );
            let retrying = view
                .pending_activity
                .as_ref()
                .map(PendingActivityView::summary)
                .unwrap_or_default();
            let rows: [(&str, &str); 14] = [
                ("ID", &view.id),
                ("TENANT", &view.tenant),
                ("PHASE", &view.phase),
                ("DESIRED STATUS", &view.desired_status),
                ("STATUS", &view.status),
                ("GENERATION", &gen),
                ("OWNER", &view.owner),
                ("UNASSIGNED", &view.unassigned_reason),
                ("LAST ERROR", &view.last_error),
                ("RETRYING", &retrying),
                ("SOURCE", view.source_type()),
                ("DESTINATION", view.destination_type()),
                ("CREATED", view.create_time.as_deref().unwrap_or("")),
                ("UPDATED", view.update_time.as_deref().unwrap_or("")),
            ];
            for (key, value) in rows {
                table.add_row([key, or_dash(value)]);
            }
            table.to_string()
        }
    }
}

pub fn render_pipelines(pipelines: &[pb::Pipeline], format: OutputFormat) -> String {
    let views: Vec<PipelineView> = pipelines.iter().map(PipelineView::from).collect();
    match format {
        OutputFormat::Json => to_json(&views),
        OutputFormat::Table => {
            let mut table = new_table();
            table.set_header([
                "TENANT",
                "ID",
                "PHASE",
                "DESIRED",
                "STATUS",
                "GEN",
                "OBSERVED",
                "OWNER",
                "SOURCE",
                "DESTINATION",
            ]);
            for v in &views {
                table.add_row([
                    or_dash(&v.tenant),
                    v.id.as_str(),
                    or_dash(&v.phase),
                    or_dash(&v.desired_status),
                    or_dash(&v.status),
                    &v.generation.to_string(),
                    &v.observed_generation.to_string(),
                    or_dash(&v.owner),
                    or_dash(v.source_type()),
                    or_dash(v.destination_type()),
                ]);
            }
            table.to_string()
        }
    }
}

pub fn render_events(events: &[pb::PipelineEvent], format: OutputFormat) -> String {
    let views: Vec<EventView> = events.iter().map(EventView::from).collect();
    match format {
        OutputFormat::Json => to_json(&views),
        OutputFormat::Table => {
            let mut table = new_table();
            table.set_header(["TIME", "FROM", "TO", "GENERATION", "ACTOR", "REASON"]);
            for e in &views {
                table.add_row([
                    or_dash(e.time.as_deref().unwrap_or("")),
                    or_dash(&e.from_status),
                    or_dash(&e.to_status),
                    &e.generation.to_string(),
                    or_dash(&e.actor),
                    or_dash(&e.reason),
                ]);
            }
            table.to_string()
        }
    }
}

#[derive(Serialize)]
struct ConnectorInfo {
    side: String,
    r#type: String,
    summary: String,
    secret_fields: Vec<String>,
    config_schema: serde_json::Map<String, serde_json::Value>,
}

pub fn render_connectors(connectors: &[pb::Connector], format: OutputFormat) -> String {
    let views: Vec<ConnectorInfo> = connectors
        .iter()
        .map(|c| ConnectorInfo {
            side: c.side.clone(),
            r#type: c.r#type.clone(),
            summary: c.summary.clone(),
            secret_fields: c.secret_fields.clone(),
            config_schema: c
                .config_schema
                .as_ref()
                .map(sluice_protocol::conversions::struct_to_json)
                .unwrap_or_default(),
        })
        .collect();
    match format {
        OutputFormat::Json => to_json(&views),
        OutputFormat::Table => {
            let mut table = new_table();
            table.set_header(["SIDE", "TYPE", "CONFIG KEYS", "SECRETS", "SUMMARY"]);
            for c in &views {
                let keys = c
                    .config_schema
                    .get("properties")
                    .and_then(|p| p.as_object())
                    .map(|p| p.keys().cloned().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                table.add_row([
                    c.side.as_str(),
                    c.r#type.as_str(),
                    or_dash(&keys),
                    or_dash(&c.secret_fields.join(", ")),
                    or_dash(&c.summary),
                ]);
            }
            table.to_string()
        }
    }
}

#[derive(Serialize)]
struct RunView {
    number: i64,
    trigger: String,
    start_time: Option<String>,
    end_time: Option<String>,
    records_read: i64,
    records_written: i64,
    outcome: String,
    error: String,
}

pub fn render_runs(runs: &[pb::Run], format: OutputFormat) -> String {
    let views: Vec<RunView> = runs
        .iter()
        .map(|r| RunView {
            number: r.number,
            trigger: r.trigger.clone(),
            start_time: timestamp(r.start_time.as_ref()),
            end_time: timestamp(r.end_time.as_ref()),
            records_read: r.records_read,
            records_written: r.records_written,
            outcome: r.outcome.clone(),
            error: r.error.clone(),
        })
        .collect();
    match format {
        OutputFormat::Json => to_json(&views),
        OutputFormat::Table => {
            let mut table = new_table();
            table.set_header([
                "RUN", "TRIGGER", "STARTED", "ENDED", "READ", "WRITTEN", "OUTCOME", "ERROR",
            ]);
            for r in &views {
                table.add_row([
                    r.number.to_string().as_str(),
                    &r.trigger,
                    or_dash(r.start_time.as_deref().unwrap_or("")),
                    or_dash(r.end_time.as_deref().unwrap_or("")),
                    &r.records_read.to_string(),
                    &r.records_written.to_string(),
                    &r.outcome,
                    or_dash(&r.error),
                ]);
            }
            table.to_string()
        }
    }
}

pub fn render_pushed(id: &str, sequences: &[i64], format: OutputFormat) -> String {
    match format {
        OutputFormat::Json => {
            to_json(&serde_json::json!({ "pipeline": id, "sequences": sequences }))
        }
        OutputFormat::Table => match sequences {
            [] => format!("no input to push to {id}"),
            [one] => format!("input stored for {id} as sequence {one}"),
            [first, .., last] => format!(
                "{} inputs stored for {id}, sequences {first} to {last}",
                sequences.len()
            ),
        },
    }
}

pub fn render_removed(id: &str, format: OutputFormat) -> String {
    match format {
        OutputFormat::Json => to_json(&RemovedView {
            id: id.to_owned(),
            removed: true,
        }),
        OutputFormat::Table => format!("pipeline {id} deleted"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_protocol::conversions::json_to_struct;

    fn sample() -> pb::Pipeline {
        let Value::Object(config) = json!({"count": 10, "nested": {"a": [1, "b"]}}) else {
            unreachable!("literal is an object")
        };
        pb::Pipeline {
            id: "orders".into(),
            tenant: "acme".into(),
            spec: Some(pb::PipelineSpec {
                source: Some(pb::ConnectorSpec {
                    r#type: "generator".into(),
                    config: Some(json_to_struct(&config)),
                }),
                destination: Some(pb::ConnectorSpec {
                    r#type: "postgres".into(),
                    config: None,
                }),
                ..Default::default()
            }),
            desired_status: pb::DesiredStatus::Paused as i32,
            status: pb::PipelineStatus::Ready as i32,
            phase: "PAUSING".into(),
            generation: 3,
            observed_generation: 2,
            owner: "worker-1".into(),
            unassigned_reason: String::new(),
            last_error: String::new(),
            pending_activity: Some(pb::PendingActivity {
                name: "write-batch".into(),
                attempt: 3,
                last_failure: "TransientError: connection refused".into(),
                failure_type: "transient_error".into(),
                first_failure_time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                last_failure_time: None,
                next_attempt_time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_004,
                    nanos: 0,
                }),
            }),
            etag: "W/\"3\"".into(),
            create_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            update_time: None,
        }
    }

    #[test]
    fn enum_names_are_short() {
        assert_eq!(
            desired_status_name(pb::DesiredStatus::Active as i32),
            "ACTIVE"
        );
        assert_eq!(status_name(pb::PipelineStatus::Ready as i32), "READY");
        assert_eq!(status_name(0), "UNSPECIFIED");
        assert_eq!(status_name(99), "UNKNOWN(99)");
    }

    #[test]
    fn pipeline_json_mirrors_the_message() {
        let value: Value =
            serde_json::from_str(&render_pipeline(&sample(), OutputFormat::Json)).expect("json");
        assert_eq!(
            value,
            json!({
                "id": "orders",
                "tenant": "acme",
                "phase": "PAUSING",
                "desired_status": "PAUSED",
                "status": "READY",
                "generation": 3,
                "observed_generation": 2,
                "owner": "worker-1",
                "last_error": "",
                "pending_activity": {
                    "name": "write-batch",
                    "attempt": 3,
                    "last_failure": "TransientError: connection refused",
                    "failure_type": "transient_error",
                    "first_failure_time": "2023-11-14T22:13:20Z",
                    "last_failure_time": null,
                    "next_attempt_time": "2023-11-14T22:13:24Z"
                },
                "etag": "W/\"3\"",
                "spec": {
                    "source": {"type": "generator", "config": {"count": 10, "nested": {"a": [1, "b"]}}},
                    "destination": {"type": "postgres", "config": {}}
                },
                "create_time": "2023-11-14T22:13:20Z",
                "update_time": null
            })
        );
    }

    #[test]
    fn pipeline_table_has_every_key() {
        let text = render_pipeline(&sample(), OutputFormat::Table);
        for needle in [
            "ID",
            "orders",
            "PAUSING",
            "DESIRED STATUS",
            "READY",
            "3 (observed 2)",
            "worker-1",
            "LAST ERROR",
            "RETRYING",
            "write-batch, attempt 3 (transient_error), next at 2023-11-14T22:13:24Z: TransientError: connection refused",
            "generator",
            "postgres",
            "2023-11-14T22:13:20Z",
            "UPDATED",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn list_table_has_header_and_rows() {
        let text = render_pipelines(&[sample()], OutputFormat::Table);
        for needle in [
            "ID",
            "DESIRED",
            "OBSERVED",
            "DESTINATION",
            "orders",
            "generator",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert_eq!(render_pipelines(&[], OutputFormat::Json), "[]");
    }

    #[test]
    fn events_render_with_placeholders() {
        let event = pb::PipelineEvent {
            pipeline_id: "orders".into(),
            time: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 500_000_000,
            }),
            actor: "worker-1".into(),
            from_status: String::new(),
            to_status: "SETUP".into(),
            generation: 1,
            reason: String::new(),
        };
        let text = render_events(std::slice::from_ref(&event), OutputFormat::Table);
        assert!(text.contains("1970-01-01T00:00:00.500Z"), "{text}");
        assert!(
            text.contains("┆ - "),
            "empty from_status shows as a dash:\n{text}"
        );
        let value: Value =
            serde_json::from_str(&render_events(&[event], OutputFormat::Json)).expect("json");
        assert_eq!(value[0]["to_status"], "SETUP");
        assert_eq!(value[0]["from_status"], "");
    }
}
