//! Which signals-topic partition (and so which worker) a pipeline belongs to. Computed
//! once at create time and stored with the pipeline, so the hash must never change.

/// FNV-1a 64-bit: tiny, stable across releases and platforms (unlike std's hasher).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

pub fn partition_for(pipeline_id: &str, partitions: u32) -> i32 {
    assert!(
        partitions > 0,
        "the signals topic has at least one partition"
    );
    (fnv1a64(pipeline_id.as_bytes()) % u64::from(partitions)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stable_values() {
        // Pinned: a change here would move every stored pipeline to another worker.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            partition_for("a", 12),
            (0xaf63_dc4c_8601_ec8c_u64 % 12) as i32
        );
    }

    proptest! {
        #[test]
        fn always_in_range(id in "[a-z0-9-]{1,63}", n in 1u32..512) {
            let p = partition_for(&id, n);
            prop_assert!(p >= 0 && (p as u32) < n);
        }
    }
}
