//! The two status fields of a pipeline and the rules that govern them.
//!
//! `desired_status` is written only by the control plane; `status` only by the worker
//! that owns the pipeline. [`can_transition`] is the single definition of a legal
//! worker status move, and [`derive_phase`] the human-readable summary of both.

use std::fmt;
use std::str::FromStr;

/// What an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DesiredStatus {
    Active,
    Paused,
    Deleted,
}

/// What the owning worker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PipelineStatus {
    Setup,
    Backfill,
    Ready,
    Paused,
    Teardown,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownStatus(pub String);

impl DesiredStatus {
    pub const ALL: [DesiredStatus; 3] = [Self::Active, Self::Paused, Self::Deleted];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Paused => "PAUSED",
            Self::Deleted => "DELETED",
        }
    }

    /// Whether the control plane accepts a change from `self` to `to`. DELETED is
    /// terminal; everything else may move freely.
    pub fn can_change_to(self, to: DesiredStatus) -> bool {
        self != Self::Deleted || to == Self::Deleted
    }
}

impl PipelineStatus {
    pub const ALL: [PipelineStatus; 6] = [
        Self::Setup,
        Self::Backfill,
        Self::Ready,
        Self::Paused,
        Self::Teardown,
        Self::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Setup => "SETUP",
            Self::Backfill => "BACKFILL",
            Self::Ready => "READY",
            Self::Paused => "PAUSED",
            Self::Teardown => "TEARDOWN",
            Self::Error => "ERROR",
        }
    }
}

impl fmt::Display for DesiredStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for PipelineStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DesiredStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

impl FromStr for PipelineStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// Whether the worker may move a pipeline from `from` (None: never written) to `to`.
///
/// SETUP → BACKFILL → READY; SETUP|BACKFILL|READY → PAUSED; PAUSED → BACKFILL|READY;
/// any → ERROR; ERROR → SETUP|BACKFILL|READY|PAUSED; any → TEARDOWN. A changed spec
/// re-runs setup, so BACKFILL|READY|PAUSED → SETUP is legal too. Pausing always works,
/// a failed pipeline included (ERROR → PAUSED). READY → BACKFILL is not: a
/// periodic reconcile of a ready pipeline must not flap its status. Staying in the same
/// status is not a transition.
pub fn can_transition(from: Option<PipelineStatus>, to: PipelineStatus) -> bool {
    use PipelineStatus::*;
    match (from, to) {
        (Some(a), b) if a == b => false,
        (_, Error) | (_, Teardown) => true,
        (None, Setup) => true,
        (None, _) => false,
        (Some(Teardown), _) => false,
        (Some(Setup), Backfill) => true,
        (Some(Backfill), Ready) => true,
        (Some(Setup | Backfill | Ready), Paused) => true,
        (Some(Paused), Backfill | Ready) => true,
        (Some(Error), Setup | Backfill | Ready | Paused) => true,
        (Some(Backfill | Ready | Paused), Setup) => true,
        _ => false,
    }
}

/// The derived, read-only summary shown to humans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No worker owns the pipeline.
    Unassigned,
    /// Owned, but the worker has not written a status yet.
    Pending,
    Pausing,
    Resuming,
    Deleting,
    /// Converged (or converging forward) on the worker status itself.
    Status(PipelineStatus),
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Unassigned => "UNASSIGNED",
            Phase::Pending => "PENDING",
            Phase::Pausing => "PAUSING",
            Phase::Resuming => "RESUMING",
            Phase::Deleting => "DELETING",
            Phase::Status(s) => s.as_str(),
        })
    }
}

pub fn derive_phase(
    desired: DesiredStatus,
    status: Option<PipelineStatus>,
    owner: Option<&str>,
) -> Phase {
    if desired == DesiredStatus::Deleted {
        return Phase::Deleting;
    }
    if owner.is_none_or(str::is_empty) {
        return Phase::Unassigned;
    }
    match (desired, status) {
        (_, Some(PipelineStatus::Error)) => Phase::Status(PipelineStatus::Error),
        (DesiredStatus::Paused, Some(PipelineStatus::Paused)) => {
            Phase::Status(PipelineStatus::Paused)
        }
        (DesiredStatus::Paused, _) => Phase::Pausing,
        (DesiredStatus::Active, Some(PipelineStatus::Paused)) => Phase::Resuming,
        (_, None) => Phase::Pending,
        (_, Some(s)) => Phase::Status(s),
    }
}

#[cfg(test)]
mod tests {
    use super::PipelineStatus::*;
    use super::*;

    /// The complete table of legal moves; every pair not listed must be rejected.
    const LEGAL: &[(Option<PipelineStatus>, PipelineStatus)] = &[
        (None, Setup),
        (None, Error),
        (None, Teardown),
        (Some(Setup), Backfill),
        (Some(Setup), Paused),
        (Some(Setup), Error),
        (Some(Setup), Teardown),
        (Some(Backfill), Ready),
        (Some(Backfill), Paused),
        (Some(Backfill), Setup),
        (Some(Backfill), Error),
        (Some(Backfill), Teardown),
        (Some(Ready), Paused),
        (Some(Ready), Setup),
        (Some(Ready), Error),
        (Some(Ready), Teardown),
        (Some(Paused), Backfill),
        (Some(Paused), Ready),
        (Some(Paused), Setup),
        (Some(Paused), Error),
        (Some(Paused), Teardown),
        (Some(Error), Setup),
        (Some(Error), Backfill),
        (Some(Error), Ready),
        (Some(Error), Paused),
        (Some(Error), Teardown),
        (Some(Teardown), Error),
    ];

    #[test]
    fn transition_table_is_exhaustive() {
        let froms = std::iter::once(None).chain(PipelineStatus::ALL.map(Some));
        let mut checked = 0;
        for from in froms {
            for to in PipelineStatus::ALL {
                let expected = LEGAL.contains(&(from, to));
                assert_eq!(
                    can_transition(from, to),
                    expected,
                    "{from:?} -> {to:?} should be {}",
                    if expected { "legal" } else { "illegal" }
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 7 * 6);
    }

    #[test]
    fn ready_never_flaps_back_to_backfill() {
        assert!(!can_transition(Some(Ready), Backfill));
    }

    #[test]
    fn deleted_is_terminal_for_desired_status() {
        for to in DesiredStatus::ALL {
            assert_eq!(
                DesiredStatus::Deleted.can_change_to(to),
                to == DesiredStatus::Deleted
            );
            assert!(DesiredStatus::Active.can_change_to(to));
            assert!(DesiredStatus::Paused.can_change_to(to));
        }
    }

    #[test]
    fn status_names_round_trip() {
        for s in PipelineStatus::ALL {
            assert_eq!(s.as_str().parse::<PipelineStatus>(), Ok(s));
        }
        for d in DesiredStatus::ALL {
            assert_eq!(d.as_str().parse::<DesiredStatus>(), Ok(d));
        }
        assert!("RUNNING".parse::<PipelineStatus>().is_err());
    }

    #[test]
    fn phase_table() {
        use DesiredStatus as D;
        let w = Some("worker-1");
        let cases = [
            (D::Active, None, None, "UNASSIGNED"),
            (D::Paused, Some(Paused), None, "UNASSIGNED"),
            (D::Deleted, None, None, "DELETING"),
            (D::Deleted, Some(Teardown), w, "DELETING"),
            (D::Active, None, w, "PENDING"),
            (D::Active, Some(Setup), w, "SETUP"),
            (D::Active, Some(Backfill), w, "BACKFILL"),
            (D::Active, Some(Ready), w, "READY"),
            (D::Active, Some(Paused), w, "RESUMING"),
            (D::Paused, Some(Ready), w, "PAUSING"),
            (D::Paused, None, w, "PAUSING"),
            (D::Paused, Some(Paused), w, "PAUSED"),
            (D::Paused, Some(Error), w, "ERROR"),
            (D::Active, Some(Error), w, "ERROR"),
        ];
        for (desired, status, owner, expected) in cases {
            assert_eq!(
                derive_phase(desired, status, owner).to_string(),
                expected,
                "{desired:?} {status:?} {owner:?}"
            );
        }
    }
}
