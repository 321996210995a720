//! `sluicectl apply`: the pure parts. A file holds one or more pipeline documents (YAML
//! documents separated by `---`, or JSON: one object or an array of them); each names
//! its pipeline by id. What a pipeline would become is shown as a line diff of its
//! desired state (desired status and spec, as the server returns them, secrets
//! redacted by the server).

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use sluice_protocol::conversions::struct_to_json;
use sluice_protocol::pb;

use crate::output::desired_status_name;
use crate::spec_file::{FileFormat, PipelineFile, SpecError};

/// Why a file cannot be applied; nothing is sent when any document is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{origin}: document {index}: invalid: {message}")]
    Document {
        origin: String,
        index: usize,
        message: String,
    },
    #[error("{origin}: document {index} has no id (apply matches pipelines by id)")]
    MissingId { origin: String, index: usize },
    #[error("{origin}: pipeline {id:?} appears in documents {first} and {second}")]
    DuplicateId {
        origin: String,
        id: String,
        first: usize,
        second: usize,
    },
    #[error("{origin}: no pipeline document in it")]
    Empty { origin: String },
}

/// Every pipeline document of a file, in order (numbered from 1 in errors).
pub fn parse_documents(
    text: &str,
    format: FileFormat,
    origin: &str,
) -> Result<Vec<PipelineFile>, ApplyError> {
    let trimmed = text.trim_start();
    let json_like = trimmed.starts_with('{') || trimmed.starts_with('[');
    let docs = match format {
        FileFormat::Json => json_documents(text, origin)?,
        FileFormat::Detect if json_like => json_documents(text, origin)?,
        FileFormat::Yaml | FileFormat::Detect => yaml_documents(text, origin)?,
    };
    if docs.is_empty() {
        return Err(ApplyError::Empty {
            origin: origin.to_owned(),
        });
    }
    let mut seen: Vec<(String, usize)> = Vec::new();
    let mut ids = HashSet::new();
    for (i, doc) in docs.iter().enumerate() {
        let index = i + 1;
        let id = doc.id.clone().ok_or_else(|| ApplyError::MissingId {
            origin: origin.to_owned(),
            index,
        })?;
        if !ids.insert(id.clone()) {
            let first = seen
                .iter()
                .find(|(s, _)| *s == id)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            return Err(ApplyError::DuplicateId {
                origin: origin.to_owned(),
                id,
                first,
                second: index,
            });
        }
        seen.push((id, index));
    }
    Ok(docs)
}

fn json_documents(text: &str, origin: &str) -> Result<Vec<PipelineFile>, ApplyError> {
    let value: Value = serde_json::from_str(text).map_err(|source| SpecError::Json {
        origin: origin.to_owned(),
        source,
    })?;
    let items = match value {
        Value::Array(items) => items,
        other => vec![other],
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            serde_json::from_value(item).map_err(|e| ApplyError::Document {
                origin: origin.to_owned(),
                index: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

fn yaml_documents(text: &str, origin: &str) -> Result<Vec<PipelineFile>, ApplyError> {
    let mut docs = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document).map_err(|source| SpecError::Yaml {
            origin: origin.to_owned(),
            source,
        })?;
        // An empty document (a trailing `---`) is no pipeline.
        if value.is_null() {
            continue;
        }
        let doc = serde_yaml::from_value(value).map_err(|e| ApplyError::Document {
            origin: origin.to_owned(),
            index: i + 1,
            message: e.to_string(),
        })?;
        docs.push(doc);
    }
    Ok(docs)
}

/// The part of a pipeline an operator writes: desired status and spec.
pub fn desired_view(p: &pb::Pipeline) -> Value {
    let connector = |c: &Option<pb::ConnectorSpec>| match c {
        Some(c) => json!({
            "type": c.r#type,
            "config": c.config.as_ref().map(struct_to_json).unwrap_or_default(),
        }),
        None => Value::Null,
    };
    let mut spec = Map::new();
    if let Some(s) = &p.spec {
        spec.insert("source".into(), connector(&s.source));
        spec.insert("destination".into(), connector(&s.destination));
        if !s.streams.is_empty() {
            spec.insert("streams".into(), json!(s.streams));
        }
        if !s.schedule.is_empty() {
            spec.insert("schedule".into(), json!(s.schedule));
        }
        if let Some(r) = &s.retry {
            spec.insert(
                "retry".into(),
                json!({
                    "initial_interval_ms": r.initial_interval_ms,
                    "backoff_coefficient": r.backoff_coefficient,
                    "maximum_interval_ms": r.maximum_interval_ms,
                    "maximum_attempts": r.maximum_attempts,
                }),
            );
        }
    }
    json!({
        "desired_status": desired_status_name(p.desired_status),
        "spec": spec,
    })
}

/// YAML lines of a value (keys sorted, as serde_json's map keeps them).
pub fn yaml_lines(value: &Value) -> Vec<String> {
    serde_yaml::to_string(value)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A line diff of `old` → `new`: changed lines marked "-"/"+" with `context` unchanged
/// lines around each change, "…" where lines are skipped. Empty when they are equal.
pub fn diff(old: &[String], new: &[String], context: usize) -> String {
    // Longest common subsequence by dynamic programming: specs are a few dozen lines.
    let (n, m) = (old.len(), new.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if old[i] == new[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && old[i] == new[j] {
            ops.push((' ', &old[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', &old[i]));
            i += 1;
        } else {
            ops.push(('+', &new[j]));
            j += 1;
        }
    }
    if ops.iter().all(|(op, _)| *op == ' ') {
        return String::new();
    }
    let near_change = |k: usize| {
        let lo = k.saturating_sub(context);
        let hi = (k + context).min(ops.len() - 1);
        ops[lo..=hi].iter().any(|(op, _)| *op != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (op, line)) in ops.iter().enumerate() {
        if *op == ' ' && !near_change(k) {
            skipped = true;
            continue;
        }
        if skipped {
            out.push_str("  …\n");
            skipped = false;
        }
        out.push(*op);
        out.push(' ');
        out.push_str(line);
        out.push('\n');
    }
    if skipped {
        out.push_str("  …\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    const TWO: &str = "\
id: a
spec:
  source: {type: generator, config: {count: 1}}
  destination: {type: postgres, config: {table: a}}
---
id: b
desired_status: PAUSED
spec:
  source: {type: generator, config: {count: 2}}
  destination: {type: postgres, config: {table: b}}
---
";

    #[test]
    fn yaml_files_hold_many_documents_json_one_or_an_array() {
        let docs = parse_documents(TWO, FileFormat::Yaml, "f.yaml").expect("two documents");
        let ids: Vec<_> = docs
            .iter()
            .map(|d| d.id.clone().unwrap_or_default())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        let one = r#"{"id": "j", "spec": {"source": {"type": "generator"}, "destination": {"type": "postgres"}}}"#;
        assert_eq!(
            parse_documents(one, FileFormat::Detect, "-")
                .expect("json")
                .len(),
            1
        );
        let many = format!("[{one}, {}]", one.replace("\"j\"", "\"k\""));
        assert_eq!(
            parse_documents(&many, FileFormat::Json, "f.json")
                .expect("array")
                .len(),
            2
        );
    }

    #[test]
    fn a_document_without_id_a_repeated_id_or_a_typo_refuses_the_whole_file() {
        let no_id = TWO.replace("id: b\n", "");
        assert!(matches!(
            parse_documents(&no_id, FileFormat::Yaml, "f"),
            Err(ApplyError::MissingId { index: 2, .. })
        ));
        let twice = TWO.replace("id: b", "id: a");
        assert!(matches!(
            parse_documents(&twice, FileFormat::Yaml, "f"),
            Err(ApplyError::DuplicateId {
                first: 1,
                second: 2,
                ..
            })
        ));
        let typo = TWO.replace("desired_status:", "desired_stauts:");
        let err = parse_documents(&typo, FileFormat::Yaml, "f").expect_err("unknown key");
        assert!(
            err.to_string().contains("document 2") && err.to_string().contains("desired_stauts"),
            "{err}"
        );
        assert!(matches!(
            parse_documents("---\n", FileFormat::Yaml, "f"),
            Err(ApplyError::Empty { .. })
        ));
    }

    #[test]
    fn diff_marks_changes_with_context_and_is_empty_for_equal_input() {
        let old = lines("a\nb\nc\nd\ne\nf\ng");
        let new = lines("a\nb\nc\nD\ne\nf\ng\nh");
        assert_eq!(
            diff(&old, &new, 1),
            "  …\n  c\n- d\n+ D\n  e\n  …\n  g\n+ h\n"
        );
        assert_eq!(diff(&old, &old, 3), "");
        assert_eq!(diff(&[], &lines("x"), 3), "+ x\n");
    }

    #[test]
    fn the_desired_view_shows_status_and_spec_only() {
        let p = pb::Pipeline {
            id: "a".into(),
            desired_status: pb::DesiredStatus::Paused as i32,
            generation: 7,
            spec: Some(pb::PipelineSpec {
                schedule: "every 1h".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = yaml_lines(&desired_view(&p)).join("\n");
        assert!(text.contains("desired_status: PAUSED"), "{text}");
        assert!(text.contains("schedule: every 1h"), "{text}");
        assert!(!text.contains("generation"), "{text}");
    }
}
