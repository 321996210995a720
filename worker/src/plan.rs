//! Decide, then act: [`plan`] is the whole decision of a reconcile pass, a pure
//! function from what the workflow observes to the next step. The runtime
//! (`workflow.rs`) applies the step as an activity, updates what it observed, and asks
//! again, until the answer is [`Step::Wait`].

use sluice_protocol::status::{DesiredStatus, PipelineStatus};

/// The lanes as the workflow holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LanesState {
    Stopped,
    /// Running with the current spec.
    Current,
    /// Running with a spec that is no longer the stored one (e.g. only a password
    /// changed, which needs no setup but new connections).
    Stale,
}

/// What a pass knows when it decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub desired: DesiredStatus,
    pub status: Option<PipelineStatus>,
    /// Whether the worker has acted on the stored generation.
    pub observed_current: bool,
    /// Whether the stored spec validates on this worker.
    pub spec_valid: bool,
    /// Whether setup has run for this spec (its fingerprint is the checkpoint's).
    pub set_up: bool,
    /// Whether setup ran, successfully, in this claim.
    pub setup_ran: bool,
    pub lanes: LanesState,
    /// Whether every backfilled record is committed at the destination; None until
    /// checked in this pass.
    pub backfill_complete: Option<bool>,
    /// A lane failed for good (the runtime holds the error).
    pub lane_failed: bool,
    pub topics_deleted: bool,
    pub destination_cleaned: bool,
    /// An operator asked for a reset (ResetPipeline) the worker has not applied.
    pub reset_pending: bool,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A lane failed: stop everything and write ERROR with its error.
    Fail,
    /// The spec does not validate here and the pipeline should run: ERROR with why.
    RejectSpec,
    StopLanes,
    /// Run setup (writes SETUP first): topic, destination objects, checkpoint.
    Setup,
    /// Read the destination's committed offset to tell BACKFILL from READY.
    CheckBackfill,
    StartLanes,
    WriteStatus(PipelineStatus, &'static str),
    /// Pause a pipeline whose spec cannot be set up here, saying why.
    PauseUnset,
    /// Record that the generation was acted on (no transition).
    Observe,
    /// Apply a requested reset (lanes stopped): the named streams read again from the
    /// start.
    Reset,
    DeleteTopics,
    CleanDestination,
    Remove,
    /// Converged: sleep until something changes.
    Wait,
}

/// The next step towards the desired state.
pub fn plan(o: &Observed) -> Step {
    use PipelineStatus::*;
    if o.lane_failed {
        return Step::Fail;
    }
    if o.desired == DesiredStatus::Deleted {
        return if o.lanes != LanesState::Stopped {
            Step::StopLanes
        } else if o.status != Some(Teardown) {
            Step::WriteStatus(Teardown, "deletion requested")
        } else if !o.topics_deleted {
            Step::DeleteTopics
        } else if !o.destination_cleaned {
            Step::CleanDestination
        } else {
            Step::Remove
        };
    }
    // A failed pipeline waits, lanes stopped, for its generation to change (any
    // update) to retry.
    if o.status == Some(Error) && o.observed_current {
        return if o.lanes == LanesState::Stopped {
            Step::Wait
        } else {
            Step::StopLanes
        };
    }
    // A reset is applied with the lanes stopped, before anything else starts them.
    if o.reset_pending {
        return if o.lanes == LanesState::Stopped {
            Step::Reset
        } else {
            Step::StopLanes
        };
    }
    let needs_setup = !o.set_up
        || matches!(o.status, None | Some(Error))
        || (o.status == Some(Setup) && !o.setup_ran);
    match o.desired {
        DesiredStatus::Paused => {
            if o.lanes != LanesState::Stopped {
                return Step::StopLanes;
            }
            // A new pipeline sets up while paused, so a bad destination shows at once;
            // a failed or changed one sets up when it resumes: pausing must not depend
            // on anything that can fail.
            if matches!(o.status, None | Some(Setup)) && needs_setup {
                return match (o.spec_valid, o.status) {
                    (true, _) => Step::Setup,
                    (false, None) => Step::WriteStatus(Setup, "setting up"),
                    (false, _) => Step::PauseUnset,
                };
            }
            if o.status != Some(Paused) {
                return Step::WriteStatus(Paused, "paused by request");
            }
        }
        DesiredStatus::Active => {
            if !o.spec_valid {
                return Step::RejectSpec;
            }
            if needs_setup {
                return if o.lanes == LanesState::Stopped {
                    Step::Setup
                } else {
                    Step::StopLanes
                };
            }
            if o.lanes == LanesState::Stale {
                return Step::StopLanes;
            }
            match (o.status, o.backfill_complete) {
                (Some(Setup), _) => return Step::WriteStatus(Backfill, "setup finished"),
                (Some(Paused), None) => return Step::CheckBackfill,
                (Some(Paused), Some(true)) => {
                    return Step::WriteStatus(Ready, "resumed by request")
                }
                (Some(Paused), Some(false)) => {
                    return Step::WriteStatus(Backfill, "resumed by request")
                }
                _ => {}
            }
            if o.lanes == LanesState::Stopped {
                return Step::StartLanes;
            }
            match (o.status, o.backfill_complete) {
                (Some(Backfill), None) => return Step::CheckBackfill,
                (Some(Backfill), Some(true)) => {
                    return Step::WriteStatus(Ready, "backfill complete")
                }
                _ => {}
            }
        }
        DesiredStatus::Deleted => unreachable!("handled above"),
    }
    if o.observed_current {
        Step::Wait
    } else {
        Step::Observe
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DesiredStatus as D;
    use PipelineStatus::*;

    fn base(desired: DesiredStatus, status: Option<PipelineStatus>) -> Observed {
        Observed {
            desired,
            status,
            observed_current: false,
            spec_valid: true,
            set_up: true,
            setup_ran: false,
            lanes: LanesState::Stopped,
            backfill_complete: None,
            lane_failed: false,
            topics_deleted: false,
            destination_cleaned: false,
            reset_pending: false,
        }
    }

    /// The decisions that matter, one line each: (what is observed) → the next step.
    #[test]
    fn decision_table() {
        let cases: Vec<(Observed, Step)> = vec![
            // A new pipeline, ACTIVE: set up, then BACKFILL, lanes, READY once committed.
            (
                Observed {
                    set_up: false,
                    ..base(D::Active, None)
                },
                Step::Setup,
            ),
            (
                Observed {
                    setup_ran: true,
                    ..base(D::Active, Some(Setup))
                },
                Step::WriteStatus(Backfill, "setup finished"),
            ),
            (base(D::Active, Some(Backfill)), Step::StartLanes),
            (
                Observed {
                    lanes: LanesState::Current,
                    ..base(D::Active, Some(Backfill))
                },
                Step::CheckBackfill,
            ),
            (
                Observed {
                    lanes: LanesState::Current,
                    backfill_complete: Some(true),
                    ..base(D::Active, Some(Backfill))
                },
                Step::WriteStatus(Ready, "backfill complete"),
            ),
            (
                Observed {
                    lanes: LanesState::Current,
                    backfill_complete: Some(false),
                    ..base(D::Active, Some(Backfill))
                },
                Step::Observe,
            ),
            (
                Observed {
                    lanes: LanesState::Current,
                    observed_current: true,
                    ..base(D::Active, Some(Ready))
                },
                Step::Wait,
            ),
            // A crash during setup: setup runs again.
            (base(D::Active, Some(Setup)), Step::Setup),
            // The spec changed: lanes stop, setup runs.
            (
                Observed {
                    set_up: false,
                    lanes: LanesState::Current,
                    ..base(D::Active, Some(Ready))
                },
                Step::StopLanes,
            ),
            (
                Observed {
                    set_up: false,
                    ..base(D::Active, Some(Ready))
                },
                Step::Setup,
            ),
            // Only a secret changed: new lanes, no setup.
            (
                Observed {
                    lanes: LanesState::Stale,
                    ..base(D::Active, Some(Ready))
                },
                Step::StopLanes,
            ),
            // Resume goes back to whichever it left.
            (base(D::Active, Some(Paused)), Step::CheckBackfill),
            (
                Observed {
                    backfill_complete: Some(true),
                    ..base(D::Active, Some(Paused))
                },
                Step::WriteStatus(Ready, "resumed by request"),
            ),
            (
                Observed {
                    backfill_complete: Some(false),
                    ..base(D::Active, Some(Paused))
                },
                Step::WriteStatus(Backfill, "resumed by request"),
            ),
            // A reconcile of a READY pipeline never flips it back.
            (
                Observed {
                    lanes: LanesState::Current,
                    backfill_complete: Some(false),
                    ..base(D::Active, Some(Ready))
                },
                Step::Observe,
            ),
            // ERROR waits for a new generation, then retries from setup.
            (
                Observed {
                    observed_current: true,
                    ..base(D::Active, Some(Error))
                },
                Step::Wait,
            ),
            (base(D::Active, Some(Error)), Step::Setup),
            (
                Observed {
                    spec_valid: false,
                    ..base(D::Active, Some(Ready))
                },
                Step::RejectSpec,
            ),
            (
                Observed {
                    lane_failed: true,
                    ..base(D::Active, Some(Ready))
                },
                Step::Fail,
            ),
            // Pause: stop, then PAUSED; a new pipeline sets up first; a failed one does not.
            (
                Observed {
                    lanes: LanesState::Current,
                    ..base(D::Paused, Some(Ready))
                },
                Step::StopLanes,
            ),
            (
                base(D::Paused, Some(Ready)),
                Step::WriteStatus(Paused, "paused by request"),
            ),
            (
                Observed {
                    set_up: false,
                    ..base(D::Paused, None)
                },
                Step::Setup,
            ),
            (
                base(D::Paused, Some(Error)),
                Step::WriteStatus(Paused, "paused by request"),
            ),
            (
                Observed {
                    spec_valid: false,
                    set_up: false,
                    ..base(D::Paused, None)
                },
                Step::WriteStatus(Setup, "setting up"),
            ),
            (
                Observed {
                    spec_valid: false,
                    set_up: false,
                    ..base(D::Paused, Some(Setup))
                },
                Step::PauseUnset,
            ),
            (
                Observed {
                    set_up: false,
                    ..base(D::Paused, Some(Ready))
                },
                Step::WriteStatus(Paused, "paused by request"),
            ),
            (
                Observed {
                    observed_current: true,
                    ..base(D::Paused, Some(Paused))
                },
                Step::Wait,
            ),
            // Delete: stop, TEARDOWN, topics, destination, remove — valid spec or not.
            (
                Observed {
                    lanes: LanesState::Current,
                    ..base(D::Deleted, Some(Ready))
                },
                Step::StopLanes,
            ),
            (
                Observed {
                    spec_valid: false,
                    ..base(D::Deleted, Some(Error))
                },
                Step::WriteStatus(Teardown, "deletion requested"),
            ),
            (base(D::Deleted, Some(Teardown)), Step::DeleteTopics),
            (
                Observed {
                    topics_deleted: true,
                    ..base(D::Deleted, Some(Teardown))
                },
                Step::CleanDestination,
            ),
            (
                Observed {
                    topics_deleted: true,
                    destination_cleaned: true,
                    ..base(D::Deleted, Some(Teardown))
                },
                Step::Remove,
            ),
            // A reset: lanes stop, then it is applied; a deletion skips it.
            (
                Observed {
                    reset_pending: true,
                    lanes: LanesState::Current,
                    ..base(D::Active, Some(Ready))
                },
                Step::StopLanes,
            ),
            (
                Observed {
                    reset_pending: true,
                    ..base(D::Paused, Some(Paused))
                },
                Step::Reset,
            ),
            (
                Observed {
                    reset_pending: true,
                    ..base(D::Deleted, Some(Teardown))
                },
                Step::DeleteTopics,
            ),
        ];
        for (observed, expected) in cases {
            assert_eq!(plan(&observed), expected, "{observed:?}");
        }
    }

    /// The effect of a step on what is observed, as the runtime applies it when the
    /// activity succeeds.
    fn apply(o: &mut Observed, step: Step) -> bool {
        match step {
            Step::Fail | Step::RejectSpec => {
                o.status = Some(Error);
                o.lanes = LanesState::Stopped;
                o.lane_failed = false;
                o.observed_current = true;
            }
            Step::StopLanes => o.lanes = LanesState::Stopped,
            Step::Setup => {
                o.status = Some(Setup);
                o.set_up = true;
                o.setup_ran = true;
            }
            Step::CheckBackfill => o.backfill_complete = Some(true),
            Step::StartLanes => o.lanes = LanesState::Current,
            Step::WriteStatus(to, _) => {
                assert!(
                    sluice_protocol::status::can_transition(o.status, to),
                    "{:?} -> {to:?} is illegal ({o:?})",
                    o.status
                );
                o.status = Some(to);
                o.observed_current = true;
            }
            Step::PauseUnset => {
                o.status = Some(Paused);
                o.observed_current = true;
            }
            Step::Observe => o.observed_current = true,
            Step::Reset => {
                o.reset_pending = false;
                o.backfill_complete = None;
            }
            Step::DeleteTopics => o.topics_deleted = true,
            Step::CleanDestination => o.destination_cleaned = true,
            Step::Remove | Step::Wait => return false,
        }
        true
    }

    fn every_observation() -> Vec<Observed> {
        let statuses = std::iter::once(None).chain(PipelineStatus::ALL.map(Some));
        let mut all = Vec::new();
        for desired in DesiredStatus::ALL {
            for status in statuses.clone() {
                for bits in 0u32..(1 << 8) {
                    for lanes in [LanesState::Stopped, LanesState::Current, LanesState::Stale] {
                        for backfill_complete in [None, Some(false), Some(true)] {
                            let bit = |n: u32| bits & (1 << n) != 0;
                            all.push(Observed {
                                desired,
                                status,
                                observed_current: bit(0),
                                spec_valid: bit(1),
                                set_up: bit(2),
                                setup_ran: bit(3),
                                lanes,
                                backfill_complete,
                                lane_failed: bit(4),
                                topics_deleted: bit(5),
                                destination_cleaned: bit(6),
                                reset_pending: bit(7),
                            });
                        }
                    }
                }
            }
        }
        all
    }

    /// Every combination of (desired, status, flags) converges: applying the planned
    /// steps never makes an illegal transition, never runs lanes against the wish,
    /// and ends (Wait or Remove) in the desired state within a few steps.
    #[test]
    fn every_combination_converges_to_the_desired_state() {
        let mut checked = 0;
        for start in every_observation() {
            // TEARDOWN is reached only on the way to removal.
            if start.status == Some(Teardown) && start.desired != DesiredStatus::Deleted {
                continue;
            }
            let mut o = start.clone();
            let mut steps = Vec::new();
            loop {
                let step = plan(&o);
                steps.push(step);
                assert!(
                    steps.len() <= 12,
                    "no convergence from {start:?}: {steps:?}"
                );
                if step == Step::StartLanes {
                    assert_eq!(o.desired, DesiredStatus::Active, "{start:?}: {steps:?}");
                }
                if let Step::WriteStatus(to, _) = step {
                    assert!(
                        !(o.status == Some(Ready) && to == Backfill),
                        "READY flapped back to BACKFILL from {start:?}"
                    );
                }
                if !apply(&mut o, step) {
                    break;
                }
            }
            let last = *steps.last().expect("at least one step");
            match start.desired {
                DesiredStatus::Deleted => assert_eq!(last, Step::Remove, "{start:?}: {steps:?}"),
                DesiredStatus::Paused => {
                    assert_eq!(last, Step::Wait);
                    assert_eq!(o.lanes, LanesState::Stopped, "{start:?}: {steps:?}");
                    assert!(
                        matches!(o.status, Some(Paused) | Some(Error)),
                        "{start:?}: {steps:?} left {:?}",
                        o.status
                    );
                }
                DesiredStatus::Active => {
                    assert_eq!(last, Step::Wait);
                    match o.status {
                        Some(Error) => assert_eq!(o.lanes, LanesState::Stopped),
                        Some(Backfill | Ready) => {
                            assert_eq!(o.lanes, LanesState::Current, "{start:?}: {steps:?}")
                        }
                        other => panic!("{start:?}: {steps:?} left {other:?}"),
                    }
                }
            }
            assert!(
                o.observed_current || last == Step::Remove,
                "{start:?}: {steps:?}"
            );
            checked += 1;
        }
        assert!(checked > 40_000, "{checked}");
    }
}
