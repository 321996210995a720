//! The `generator` source: `count` deterministic records (see
//! [`sluice_protocol::catalog::generator_record`]), read in slices after a cursor.

use serde_json::{Map, Value};
use sluice_protocol::catalog::generator_record;
use sluice_protocol::spec::GeneratorConfig;

/// How long a slice of `records` should take at the configured rate.
pub fn slice_duration(config: &GeneratorConfig, records: usize) -> std::time::Duration {
    if config.records_per_second == 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::from_secs_f64(records as f64 / config.records_per_second as f64)
}

/// The records of the slice starting at `cursor`, and the cursor after it.
pub fn read_slice(config: &GeneratorConfig, cursor: u64) -> (Vec<Map<String, Value>>, u64) {
    let end = cursor.saturating_add(config.slice_size).min(config.count);
    let records = (cursor..end)
        .map(|id| generator_record(config.seed, id))
        .collect();
    (records, end)
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
        let mut cursor = 0;
        let mut ids = Vec::new();
        while cursor < config.count {
            let (records, next) = read_slice(&config, cursor);
            ids.extend(records.iter().map(|r| r["id"].as_u64().expect("id")));
            cursor = next;
        }
        assert_eq!(ids, (0..25).collect::<Vec<_>>());
        assert!(read_slice(&config, 25).0.is_empty());
    }
}
