//! Where a record is in its source: the value a source resumes after, and what the
//! write lane compares to drop a replay. A position is a tuple of JSON scalars compared
//! element by element — numbers by value, strings by their bytes (the order of
//! PostgreSQL's "C" collation), null before everything — so a source that pages by a
//! key orders its reads exactly as positions compare.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(pub Vec<Value>);

impl Position {
    pub fn of(values: impl IntoIterator<Item = Value>) -> Self {
        Self(values.into_iter().collect())
    }

    /// A position of one integer (the generator's record id, a topic offset).
    pub fn int(n: i64) -> Self {
        Self(vec![Value::from(n)])
    }

    /// The compact JSON form carried in a Kafka header.
    pub fn to_header(&self) -> String {
        serde_json::to_string(&self.0).expect("a position is plain JSON")
    }

    pub fn from_header(text: &str) -> Result<Self, String> {
        let values: Vec<Value> =
            serde_json::from_str(text).map_err(|e| format!("position {text:?}: {e}"))?;
        if values
            .iter()
            .any(|v| matches!(v, Value::Array(_) | Value::Object(_)))
        {
            return Err(format!("position {text:?} holds a non-scalar"));
        }
        Ok(Self(values))
    }
}

fn rank(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Number(_) => 2,
        Value::String(_) => 3,
        Value::Array(_) => 4,
        Value::Object(_) => 5,
    }
}

fn compare_scalar(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x.cmp(&y),
            _ => x
                .as_f64()
                .unwrap_or(f64::NAN)
                .total_cmp(&y.as_f64().unwrap_or(f64::NAN)),
        },
        (Value::String(x), Value::String(y)) => x.as_bytes().cmp(y.as_bytes()),
        _ => rank(a).cmp(&rank(b)),
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(
            self.0
                .iter()
                .zip(&other.0)
                .map(|(a, b)| compare_scalar(a, b))
                .find(|o| o.is_ne())
                .unwrap_or_else(|| self.0.len().cmp(&other.0.len())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Position {
        Position(v.as_array().expect("test arrays").clone())
    }

    #[test]
    fn positions_order_like_a_keyset_scan() {
        let ordered = [
            p(json!([null])),
            p(json!([2])),
            p(json!([10])),
            p(json!([10.5])),
            p(json!(["B"])),
            p(json!(["a"])),
            p(json!(["a", 1])),
            p(json!(["a", 2])),
            p(json!(["é"])),
        ];
        for w in ordered.windows(2) {
            assert!(w[0] < w[1], "{:?} < {:?}", w[0], w[1]);
        }
        assert_eq!(
            Position::int(5).partial_cmp(&Position::int(5)),
            Some(Ordering::Equal)
        );
    }

    #[test]
    fn headers_round_trip_and_refuse_nested_values() {
        let pos = p(json!(["2026-11-30T01:00:00Z", 42]));
        assert_eq!(Position::from_header(&pos.to_header()), Ok(pos));
        assert!(Position::from_header("[[1]]").is_err());
        assert!(Position::from_header("nope").is_err());
    }
}
