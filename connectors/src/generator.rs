//! The `generator` source: `count` deterministic records (see
//! [`sluice_protocol::catalog::generator_record`]) in one stream, `records`, read in
//! slices by id, optionally rate-limited. Every run and every retry can recompute
//! exactly what a destination must hold, which is what tests and demos need.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use sluice_protocol::catalog::{generator_record, generator_stream, StreamSchema};
use sluice_protocol::spec::ConfigReader;
use sluice_protocol::FieldViolation;

use crate::registry::SourceKind;
use crate::{ActivityError, Context, Position, ReadMode, Slice, Source, SourceRecord};

/// Largest count accepted: bounded so a typo cannot ask for a year of work.
pub const MAX_GENERATOR_COUNT: u64 = 1_000_000_000;

/// Configuration of the `generator` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratorConfig {
    pub count: u64,
    pub seed: u64,
    /// Records read per slice; the cursor is checkpointed after each slice.
    pub slice_size: u64,
    /// Upper bound on the read rate; 0 means unlimited.
    pub records_per_second: u64,
}

pub struct GeneratorKind;

impl SourceKind for GeneratorKind {
    fn name(&self) -> &'static str {
        "generator"
    }

    fn summary(&self) -> &'static str {
        "deterministic test records (id, name, amount, score, active), one stream \"records\""
    }

    fn config_schema(&self) -> Value {
        json!({
            "type": "object",
            "required": ["count"],
            "additionalProperties": false,
            "properties": {
                "count": {"type": "integer", "minimum": 0, "maximum": MAX_GENERATOR_COUNT, "description": "records to generate"},
                "seed": {"type": "integer", "minimum": 0, "default": 0, "description": "the records' values depend on it"},
                "slice_size": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 1000, "description": "records per checkpointed slice"},
                "records_per_second": {"type": "integer", "minimum": 0, "default": 0, "description": "rate limit, 0 = none"}
            }
        })
    }

    fn build(
        &self,
        config: &Map<String, Value>,
        path: &str,
    ) -> Result<Box<dyn Source>, FieldViolation> {
        Ok(Box::new(Generator {
            config: parse(config, path)?,
        }))
    }
}

pub fn parse(config: &Map<String, Value>, path: &str) -> Result<GeneratorConfig, FieldViolation> {
    let mut reader = ConfigReader::new(config, path.to_owned());
    let count = reader.u64("count", None)?;
    if count > MAX_GENERATOR_COUNT {
        return Err(reader.violation("count", &format!("must be at most {MAX_GENERATOR_COUNT}")));
    }
    let seed = reader.u64("seed", Some(0))?;
    let slice_size = reader.u64("slice_size", Some(1000))?;
    if !(1..=100_000).contains(&slice_size) {
        return Err(reader.violation("slice_size", "must be between 1 and 100000"));
    }
    let records_per_second = reader.u64("records_per_second", Some(0))?;
    reader.reject_unknown()?;
    Ok(GeneratorConfig {
        count,
        seed,
        slice_size,
        records_per_second,
    })
}

#[derive(Debug)]
pub struct Generator {
    pub config: GeneratorConfig,
}

/// The records of the slice after `after` (ids are positions), at most `limit`.
pub fn read_slice(config: &GeneratorConfig, after: Option<u64>, limit: u64) -> Slice {
    let start = after.map_or(0, |a| a.saturating_add(1));
    let end = start.saturating_add(limit).min(config.count);
    let records = (start..end)
        .map(|id| SourceRecord {
            data: generator_record(config.seed, id),
            position: Position::int(i64::try_from(id).unwrap_or(i64::MAX)),
        })
        .collect();
    Slice {
        records,
        done: end >= config.count,
    }
}

#[async_trait]
impl Source for Generator {
    async fn discover(&self, _ctx: &Context) -> Result<Vec<StreamSchema>, ActivityError> {
        Ok(vec![generator_stream()])
    }

    async fn read(
        &self,
        _ctx: &Context,
        _stream: &StreamSchema,
        mode: ReadMode,
        after: Option<&Position>,
        limit: usize,
    ) -> Result<Slice, ActivityError> {
        if mode == ReadMode::Sync {
            // The records never change: a sync finds nothing new.
            return Ok(Slice {
                records: Vec::new(),
                done: true,
            });
        }
        let after = after.and_then(|p| p.0.first()).and_then(Value::as_u64);
        Ok(read_slice(&self.config, after, limit as u64))
    }

    fn pace(&self, records: usize) -> Duration {
        if self.config.records_per_second == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(records as f64 / self.config.records_per_second as f64)
    }

    fn slice_size(&self) -> usize {
        self.config.slice_size as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_every_record_once() {
        let config = GeneratorConfig {
            count: 25,
            seed: 3,
            slice_size: 10,
            records_per_second: 0,
        };
        let mut after = None;
        let mut ids = Vec::new();
        loop {
            let slice = read_slice(&config, after, config.slice_size);
            ids.extend(
                slice
                    .records
                    .iter()
                    .map(|r| r.data["id"].as_u64().expect("id")),
            );
            after = slice.records.last().and_then(|r| r.position.0[0].as_u64());
            if slice.done {
                break;
            }
        }
        assert_eq!(ids, (0..25).collect::<Vec<_>>());
        assert!(read_slice(&config, Some(24), 10).records.is_empty());
        let empty = GeneratorConfig { count: 0, ..config };
        assert!(read_slice(&empty, None, 10).done);
    }

    #[test]
    fn configs_are_validated_with_defaults() {
        let config: Map<String, Value> =
            serde_json::from_value(json!({"count": 10000.0})).expect("test config");
        assert_eq!(
            parse(&config, "s").expect("valid"),
            GeneratorConfig {
                count: 10_000,
                seed: 0,
                slice_size: 1000,
                records_per_second: 0,
            }
        );
        for (bad, field) in [
            (json!({}), "s.count"),
            (json!({"count": 1.5}), "s.count"),
            (json!({"count": -1}), "s.count"),
            (json!({"count": 5, "cuont": 5}), "s.cuont"),
            (json!({"count": 5, "slice_size": 0}), "s.slice_size"),
            (json!({"count": 2_000_000_000u64}), "s.count"),
        ] {
            let config: Map<String, Value> = serde_json::from_value(bad).expect("test config");
            assert_eq!(parse(&config, "s").expect_err("invalid").field, field);
        }
    }
}
