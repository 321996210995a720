//! Update masks (AIP-134) on domain types: which fields an `UpdatePipeline` changes and
//! the merged result, which is then validated exactly like a create.

use crate::spec::{ConnectorSpec, PipelineSpec, RetrySpec};
use crate::status::DesiredStatus;
use crate::FieldViolation;

/// The updatable fields a mask may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskPath {
    DesiredStatus,
    SpecSource,
    SpecDestination,
    SpecStreams,
    SpecSchedule,
    SpecRetry,
}

const SPEC_PATHS: [MaskPath; 5] = [
    MaskPath::SpecSource,
    MaskPath::SpecDestination,
    MaskPath::SpecStreams,
    MaskPath::SpecSchedule,
    MaskPath::SpecRetry,
];

pub const UPDATABLE_PATHS: &[&str] = &[
    "desired_status",
    "spec",
    "spec.source",
    "spec.destination",
    "spec.streams",
    "spec.schedule",
    "spec.retry",
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
    /// Empty: all streams (a masked empty list clears a selection).
    pub streams: Vec<String>,
    /// None: no schedule (a masked empty schedule clears it).
    pub schedule: Option<String>,
    pub retry: Option<RetrySpec>,
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
        if !patch.streams.is_empty() {
            push(MaskPath::SpecStreams);
        }
        if patch.schedule.is_some() {
            push(MaskPath::SpecSchedule);
        }
        if patch.retry.is_some() {
            push(MaskPath::SpecRetry);
        }
    }
    for path in paths {
        match path.as_str() {
            "desired_status" => push(MaskPath::DesiredStatus),
            "spec" => SPEC_PATHS.into_iter().for_each(&mut push),
            "spec.source" => push(MaskPath::SpecSource),
            "spec.destination" => push(MaskPath::SpecDestination),
            "spec.streams" => push(MaskPath::SpecStreams),
            "spec.schedule" => push(MaskPath::SpecSchedule),
            "spec.retry" => push(MaskPath::SpecRetry),
            "*" => {
                push(MaskPath::DesiredStatus);
                SPEC_PATHS.into_iter().for_each(&mut push);
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
            MaskPath::SpecStreams => spec.streams = patch.streams.clone(),
            MaskPath::SpecSchedule => spec.schedule = patch.schedule.clone(),
            MaskPath::SpecRetry => spec.retry = patch.retry.clone(),
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
        PipelineSpec::new(connector("generator"), connector("postgres"))
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
            ..Default::default()
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
    fn schedule_streams_and_retry_are_patched_on_their_own() {
        let mut current = spec();
        current.schedule = Some("every 1h".into());
        current.streams = vec!["orders".into()];
        let patch = PipelinePatch {
            schedule: Some("every 5m".into()),
            ..Default::default()
        };
        let mask = parse_mask(&[], &patch).expect("inferred");
        assert_eq!(mask, vec![MaskPath::SpecSchedule]);
        let (_, s) = apply_patch(DesiredStatus::Active, &current, &patch, &mask).expect("ok");
        assert_eq!(s.schedule.as_deref(), Some("every 5m"));
        assert_eq!(s.streams, ["orders"], "streams untouched");
        // A masked empty list clears the selection: all streams.
        let mask = parse_mask(&["spec.streams".into()], &PipelinePatch::default()).expect("ok");
        let (_, s) = apply_patch(
            DesiredStatus::Active,
            &current,
            &PipelinePatch::default(),
            &mask,
        )
        .expect("ok");
        assert!(s.streams.is_empty());
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
