//! Pipeline ids: lowercase letters, digits and '-', 1–63 characters, starting with a
//! letter or digit and not ending with '-'. They appear in Kafka topic names and URLs,
//! so nothing else is allowed.

use crate::FieldViolation;

pub fn validate_pipeline_id(id: &str, field: &str) -> Result<(), FieldViolation> {
    let bytes = id.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if ok {
        Ok(())
    } else if id.is_empty() {
        Err(FieldViolation::new(field, "is required"))
    } else {
        Err(FieldViolation::new(
            field,
            "must be 1-63 lowercase letters, digits or '-', starting with a letter or digit",
        ))
    }
}

/// Tenant names follow the same rules as pipeline ids (they appear in topic names too).
pub fn validate_tenant(tenant: &str, field: &str) -> Result<(), FieldViolation> {
    validate_pipeline_id(tenant, field)
}

/// The internal key of a pipeline: unique across tenants, stable for the pipeline's
/// life, used by workers, topic names and destinations. Neither part may contain '.', so
/// the key is unambiguous.
pub fn pipeline_key(tenant: &str, name: &str) -> String {
    format!("{tenant}.{name}")
}

/// A fresh id for a pipeline created without one.
pub fn generate_pipeline_id(uuid: &str) -> String {
    format!("p-{}", &uuid.replace('-', "")[..20])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "orders-v2", "0abc", "p-0192f3"] {
            assert!(validate_pipeline_id(good, "id").is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a/b", &"x".repeat(64)] {
            assert!(validate_pipeline_id(bad, "id").is_err(), "{bad}");
        }
        assert_eq!(pipeline_key("acme", "orders"), "acme.orders");
        let generated = generate_pipeline_id("0192f3a4-1111-7222-8333-444455556666");
        assert!(validate_pipeline_id(&generated, "id").is_ok());
    }
}
