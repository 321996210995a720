//! Update masks (AIP-134) on domain types: which fields an `UpdatePipeline` changes and
//! the merged result, which is then validated exactly like a create.

use crate::spec::{ConnectorSpec, PipelineSpec};
use crate::status::DesiredStatus;
use crate::FieldViolation;

/// The updatable fields a mask may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskPath {
    DesiredStatus,
    SpecSource,
    SpecDestination,
}

pub const UPDATABLE_PATHS: &[&str] = &[
    "desired_status",
    "spec",
    "spec.source",
    "spec.destination",
    "*",
];

const OUTPUT_ONLY: &[&str] = &[
    "id",
    "status",
    "phase",
    "generation",
    "observed_generation",
    "owner",
    "last_error",
    "etag",
    "create_time",
    "update_time",
];

/// The fields a client sent in `UpdatePipelineRequest.pipeline`, already converted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PipelinePatch {
    pub desired_status: Option<DesiredStatus>,
    pub source: Option<ConnectorSpec>,
    pub destination: Option<ConnectorSpec>,
}

/// Parses the mask's paths; an absent (empty) mask means "every field the patch sets".
pub fn parse_mask(
    paths: &[String],
    patch: &PipelinePatch,
) -> Result<Vec<MaskPath>, FieldViolation> {
    let mut out = Vec::new();
    let mut push = |p: MaskPath| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    if paths.is_empty() {
        if patch.desired_status.is_some() {
            push(MaskPath::DesiredStatus);
        }
        if patch.source.is_some() {
            push(MaskPath::SpecSource);
        }
        if patch.destination.is_some() {
            push(MaskPath::SpecDestination);
        }
    }
    for path in paths {
        match path.as_str() {
            "desired_status" => push(MaskPath::DesiredStatus),
            "spec" => {
                push(MaskPath::SpecSource);
                push(MaskPath::SpecDestination);
            }
            "spec.source" => push(MaskPath::SpecSource),
            "spec.destination" => push(MaskPath::SpecDestination),
            "*" => {
                push(MaskPath::DesiredStatus);
                push(MaskPath::SpecSource);
                push(MaskPath::SpecDestination);
            }
            p if OUTPUT_ONLY.contains(&p) => {
                return Err(FieldViolation::new(
                    "update_mask",
                    format!("{p:?} is output only and cannot be updated"),
                ))
            }
            p => {
                return Err(FieldViolation::new(
                    "update_mask",
                    format!(
                        "unknown or non-updatable path {p:?}; updatable: {}",
                        UPDATABLE_PATHS.join(", ")
                    ),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(FieldViolation::new(
            "update_mask",
            "names no field to update (and the request sets none)",
        ));
    }
    Ok(out)
}

/// Applies `patch` to the current values for the masked paths. A masked field missing
/// from the patch is an error rather than a silent clear, because a pipeline cannot
/// exist without a source or destination.
pub fn apply_patch(
    current_desired: DesiredStatus,
    current_spec: &PipelineSpec,
    patch: &PipelinePatch,
    mask: &[MaskPath],
) -> Result<(DesiredStatus, PipelineSpec), FieldViolation> {
    let mut desired = current_desired;
    let mut spec = current_spec.clone();
    for path in mask {
        match path {
            MaskPath::DesiredStatus => {
                desired = match patch.desired_status {
                    Some(DesiredStatus::Deleted) => {
                        return Err(FieldViolation::new(
                            "pipeline.desired_status",
                            "DELETED cannot be set by UpdatePipeline; use DeletePipeline",
                        ))
                    }
                    Some(d) => d,
                    None => {
                        return Err(FieldViolation::new(
                            "pipeline.desired_status",
                            "is named in update_mask but not set (ACTIVE or PAUSED)",
                        ))
                    }
                }
            }
            MaskPath::SpecSource => {
                spec.source = patch.source.clone().ok_or_else(|| {
                    FieldViolation::new(
                        "pipeline.spec.source",
                        "is named in update_mask but not set",
                    )
                })?
            }
            MaskPath::SpecDestination => {
                spec.destination = patch.destination.clone().ok_or_else(|| {
                    FieldViolation::new(
                        "pipeline.spec.destination",
                        "is named in update_mask but not set",
                    )
                })?
            }
        }
    }
    Ok((desired, spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn connector(t: &str) -> ConnectorSpec {
        ConnectorSpec {
            connector_type: t.into(),
            config: Map::new(),
        }
    }

    fn spec() -> PipelineSpec {
        PipelineSpec {
            source: connector("generator"),
            destination: connector("postgres"),
        }
    }

    #[test]
    fn empty_mask_infers_from_set_fields() {
        let patch = PipelinePatch {
            desired_status: Some(DesiredStatus::Paused),
            ..Default::default()
        };
        assert_eq!(
            parse_mask(&[], &patch).expect("ok"),
            vec![MaskPath::DesiredStatus]
        );
        assert!(parse_mask(&[], &PipelinePatch::default()).is_err());
    }

    #[test]
    fn rejects_output_only_and_unknown_paths() {
        for p in [
            "status",
            "generation",
            "etag",
            "spec.source.config.count",
            "bogus",
        ] {
            let err =
                parse_mask(&[p.to_string()], &PipelinePatch::default()).expect_err("rejected");
            assert_eq!(err.field, "update_mask", "{p}");
        }
    }

    #[test]
    fn masked_fields_only() {
        let patch = PipelinePatch {
            desired_status: Some(DesiredStatus::Paused),
            source: Some(connector("other")),
            destination: None,
        };
        let mask = parse_mask(&["desired_status".into()], &patch).expect("ok");
        let (d, s) = apply_patch(DesiredStatus::Active, &spec(), &patch, &mask).expect("ok");
        assert_eq!(d, DesiredStatus::Paused);
        assert_eq!(s, spec(), "unmasked source must not change");

        let mask = parse_mask(&["spec.source".into()], &patch).expect("ok");
        let (d, s) = apply_patch(DesiredStatus::Active, &spec(), &patch, &mask).expect("ok");
        assert_eq!(d, DesiredStatus::Active);
        assert_eq!(s.source.connector_type, "other");
    }

    #[test]
    fn masked_but_missing_is_an_error() {
        let mask = parse_mask(&["spec".into()], &PipelinePatch::default()).expect("ok");
        let err = apply_patch(
            DesiredStatus::Active,
            &spec(),
            &PipelinePatch::default(),
            &mask,
        )
        .expect_err("missing");
        assert_eq!(err.field, "pipeline.spec.source");
    }

    #[test]
    fn deleted_only_through_delete() {
        let patch = PipelinePatch {
            desired_status: Some(DesiredStatus::Deleted),
            ..Default::default()
        };
        let mask = parse_mask(&[], &patch).expect("ok");
        let err = apply_patch(DesiredStatus::Active, &spec(), &patch, &mask).expect_err("no");
        assert_eq!(err.field, "pipeline.desired_status");
    }
}
