//! Stream catalogs: what a source emits, described well enough for a destination to
//! derive its tables (JSON-schema types → typed columns).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The type of a field, as a record carries it (JSON) and as a destination stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// A JSON integer (64 bits).
    Integer,
    /// A JSON number (a double).
    Number,
    /// An exact decimal, carried as a string so no digit is lost.
    Decimal,
    String,
    Boolean,
    /// An instant, carried as an RFC 3339 string.
    Timestamp,
    /// A calendar date, carried as `YYYY-MM-DD`.
    Date,
    /// Any JSON value.
    Json,
}

impl FieldType {
    /// The JSON schema of a value of this type.
    pub fn json_schema(self) -> Value {
        match self {
            Self::Integer => json!({"type": "integer"}),
            Self::Number => json!({"type": "number"}),
            Self::Decimal => json!({"type": "string", "format": "decimal"}),
            Self::String => json!({"type": "string"}),
            Self::Boolean => json!({"type": "boolean"}),
            Self::Timestamp => json!({"type": "string", "format": "date-time"}),
            Self::Date => json!({"type": "string", "format": "date"}),
            Self::Json => json!({}),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    pub name: String,
    pub field_type: FieldType,
}

/// One stream of a source: its name, fields and primary key, and the field a sync
/// reads changes by, if it has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSchema {
    pub name: String,
    pub fields: Vec<Field>,
    /// The fields that identify a record (one or more).
    pub primary_key: Vec<String>,
    /// The field whose value grows when a record changes (e.g. `updated_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor_field: Option<String>,
}

impl StreamSchema {
    /// The JSON schema of a record, as in the connector protocol's `catalog` message.
    pub fn json_schema(&self) -> Value {
        let properties: Map<String, Value> = self
            .fields
            .iter()
            .map(|f| (f.name.clone(), f.field_type.json_schema()))
            .collect();
        json!({"type": "object", "properties": properties, "required": self.primary_key})
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// The single stream of the `generator` source.
pub fn generator_stream() -> StreamSchema {
    let field = |name: &str, field_type| Field {
        name: name.to_owned(),
        field_type,
    };
    StreamSchema {
        name: "records".to_owned(),
        fields: vec![
            field("id", FieldType::Integer),
            field("name", FieldType::String),
            field("amount", FieldType::Integer),
            field("score", FieldType::Number),
            field("active", FieldType::Boolean),
        ],
        primary_key: vec!["id".to_owned()],
        cursor_field: None,
    }
}

/// The generator's record number `id` for `seed`: a pure function, so every run, every
/// retry and every test can recompute exactly what the destination must hold.
pub fn generator_record(seed: u64, id: u64) -> Map<String, Value> {
    let h = splitmix64(seed ^ splitmix64(id));
    let mut record = Map::new();
    record.insert("id".into(), json!(id));
    record.insert(
        "name".into(),
        json!(format!("item-{id}-{:04x}", h & 0xffff)),
    );
    record.insert("amount".into(), json!((h >> 16) % 100_000));
    record.insert("score".into(), json!(((h >> 40) % 10_000) as f64 / 100.0));
    record.insert("active".into(), json!(h & 1 == 1));
    record
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_seed_dependent() {
        assert_eq!(generator_record(7, 42), generator_record(7, 42));
        assert_ne!(generator_record(7, 42), generator_record(8, 42));
        let r = generator_record(0, 5);
        let schema = generator_stream();
        for f in &schema.fields {
            assert!(r.contains_key(&f.name), "missing {}", f.name);
        }
        assert_eq!(r["id"], json!(5));
    }

    #[test]
    fn json_schema_lists_fields() {
        let s = generator_stream().json_schema();
        assert_eq!(s["properties"]["amount"]["type"], "integer");
        assert_eq!(s["required"][0], "id");
    }
}
