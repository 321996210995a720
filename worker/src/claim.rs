//! The identity a worker holds a pipeline under, and the activity runner bound to it.
//!
//! A [`Claim`] is made once, by the claim activity, and passed to everything that acts
//! for the pipeline: the store (every write is fenced by its epoch), the lanes (records
//! are tagged with it, the records topic and the transactional producer are named by
//! its incarnation) and the destination (offsets and table ownership carry it).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use sluice_protocol::conversions::PendingActivity;
use sluice_protocol::retry::RetryPolicy;
use tokio_util::sync::CancellationToken;

use crate::activity::{run_observed, ActivityError, RetryNotice, RetryObserver};
use crate::WorkerContext;

pub use sluice_connectors::Claim;

/// Runs the activities of one claimed pipeline: retries with backoff, per-attempt
/// timeouts, cancellation, and the pending-activity report in the pipeline row while
/// an activity keeps failing. Cheap to clone.
#[derive(Clone)]
pub struct Activities {
    ctx: Arc<WorkerContext>,
    claim: Arc<Claim>,
    /// The activity last reported as retrying (shared by the clones the lanes hold),
    /// so that its report is cleared once it ends however it ends.
    reported: Arc<Mutex<Option<&'static str>>>,
    /// The retry policy: the worker's, with the pipeline spec's overrides.
    policy: Arc<RwLock<RetryPolicy>>,
}

impl Activities {
    pub fn new(ctx: Arc<WorkerContext>, claim: Claim) -> Self {
        let ctx_policy = ctx.retry;
        Self {
            ctx,
            claim: Arc::new(claim),
            reported: Arc::default(),
            policy: Arc::new(RwLock::new(ctx_policy)),
        }
    }

    /// Applies a pipeline spec's retry overrides (None: the worker's policy).
    pub fn set_retry(&self, spec: Option<&sluice_protocol::spec::RetrySpec>) {
        let base = self.ctx.retry;
        *self.policy.write().expect("policy lock is never poisoned") =
            spec.map_or(base, |r| r.apply(base));
    }

    pub fn claim(&self) -> &Claim {
        &self.claim
    }

    pub fn ctx(&self) -> &Arc<WorkerContext> {
        &self.ctx
    }

    /// Runs activity `name` until it succeeds, fails permanently or `cancel` fires.
    pub async fn run<T, F, Fut>(
        &self,
        name: &'static str,
        cancel: &CancellationToken,
        attempt: F,
    ) -> Result<T, ActivityError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ActivityError>>,
    {
        let policy = *self.policy.read().expect("policy lock is never poisoned");
        let result = run_observed(
            name,
            &self.claim.key,
            &policy,
            self.ctx.attempt_timeout,
            cancel,
            Some(self),
            attempt,
        )
        .await;
        // Succeeded, failed for good, or cancelled: it is not retrying any more. (A
        // permanent failure ends in ERROR, whose write clears the report too.)
        let was_reported = {
            let mut reported = self.reported.lock().expect("lock is never poisoned");
            if *reported == Some(name) {
                *reported = None;
                true
            } else {
                false
            }
        };
        if was_reported {
            if let Err(e) = crate::store::clear_pending(&self.ctx.pool, &self.claim, name).await {
                tracing::debug!(pipeline_id = %self.claim.key, error = %e, "could not clear the pending activity");
            }
        }
        result
    }
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Retries are recorded in the pipeline row (fenced by the epoch), best effort: when
/// the row cannot be written, the retry goes on regardless.
impl RetryObserver for Activities {
    fn retrying(&self, notice: RetryNotice<'_>) -> BoxFuture<'_, ()> {
        let failure_type = match notice.error {
            ActivityError::Failed { failure_type, .. } => failure_type.as_str(),
            _ => "system_error",
        };
        let pending = PendingActivity {
            name: notice.activity.to_owned(),
            attempt: notice.attempt,
            last_failure: notice.error.to_string(),
            failure_type: failure_type.to_owned(),
            first_failure_ms: millis(notice.first_failure),
            last_failure_ms: millis(SystemTime::now()),
            next_attempt_ms: millis(notice.next_attempt),
        };
        *self.reported.lock().expect("lock is never poisoned") = Some(notice.activity);
        Box::pin(async move {
            if let Err(e) =
                crate::store::report_pending(&self.ctx.pool, &self.claim, &pending).await
            {
                tracing::debug!(pipeline_id = %self.claim.key, error = %e, "could not record the pending activity");
            }
        })
    }
}
