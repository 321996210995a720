//! Activities: every side effect of a workflow runs through [`run_activity`], which
//! applies a per-attempt timeout and the retry policy, and stops retrying on a
//! non-retryable failure, on fencing, or when the workflow is cancelled.

use std::future::Future;
use std::time::Duration;

use tracing::Instrument;

use futures::future::BoxFuture;

pub use sluice_connectors::error::{sqlstate_failure_type, ActivityError};
use sluice_protocol::retry::RetryPolicy;
use tokio_util::sync::CancellationToken;

/// The wait before retry number `attempt` (1-based): the policy's exponential interval
/// with ± `jitter` of randomness, so retries of many pipelines do not move in step.
pub fn retry_delay(policy: &RetryPolicy, attempt: u32) -> Duration {
    let spread = policy.jitter.clamp(0.0, 1.0) * (rand::random::<f64>() * 2.0 - 1.0);
    policy.interval(attempt).mul_f64(1.0 + spread)
}

/// One failed attempt of an activity that will be retried.
#[derive(Debug, Clone)]
pub struct RetryNotice<'a> {
    pub activity: &'static str,
    /// Failed attempts so far (1 after the first failure).
    pub attempt: u32,
    pub error: &'a ActivityError,
    pub first_failure: std::time::SystemTime,
    pub next_attempt: std::time::SystemTime,
}

/// Told about retries, so that what a retrying activity is doing can be shown.
pub trait RetryObserver: Sync {
    /// An attempt failed and another will follow after the delay.
    fn retrying(&self, notice: RetryNotice<'_>) -> BoxFuture<'_, ()>;
}

/// Runs `attempt` until it succeeds, fails permanently or `cancel` fires.
pub async fn run_activity<T, F, Fut>(
    name: &'static str,
    pipeline_id: &str,
    policy: &RetryPolicy,
    attempt_timeout: Duration,
    cancel: &CancellationToken,
    attempt: F,
) -> Result<T, ActivityError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ActivityError>>,
{
    run_observed(
        name,
        pipeline_id,
        policy,
        attempt_timeout,
        cancel,
        None,
        attempt,
    )
    .await
}

/// [`run_activity`] that tells `observer` about each retry and the recovery.
pub async fn run_observed<T, F, Fut>(
    name: &'static str,
    pipeline_id: &str,
    policy: &RetryPolicy,
    attempt_timeout: Duration,
    cancel: &CancellationToken,
    observer: Option<&dyn RetryObserver>,
    mut attempt: F,
) -> Result<T, ActivityError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ActivityError>>,
{
    let started = tokio::time::Instant::now();
    let mut first_failure = None;
    let mut attempt_no: u32 = 0;
    loop {
        attempt_no += 1;
        let began = tokio::time::Instant::now();
        // One span per attempt: a child of the pass or lane that runs the activity.
        let span = tracing::info_span!(
            "activity",
            otel.name = name,
            pipeline_id,
            attempt = attempt_no,
            outcome = tracing::field::Empty,
        );
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return Err(ActivityError::Cancelled),
            r = tokio::time::timeout(attempt_timeout, attempt()).instrument(span.clone()) => r,
        };
        let seconds = began.elapsed().as_secs_f64();
        let err = match outcome {
            Ok(Ok(v)) => {
                crate::metrics::WORKER.attempt(name, "ok", seconds);
                span.record("outcome", "ok");
                return Ok(v);
            }
            Ok(Err(e)) => e,
            Err(_) => {
                ActivityError::transient(format!("attempt timed out after {attempt_timeout:?}"))
            }
        };
        crate::metrics::WORKER.attempt(name, outcome_label(&err), seconds);
        span.record("outcome", outcome_label(&err));
        if !err.is_retryable() {
            return Err(err);
        }
        if policy.max_attempts.is_some_and(|max| attempt_no >= max) {
            // The workflow turns a failure returned here into ERROR, retryable or not.
            let failure_type = match &err {
                ActivityError::Failed { failure_type, .. } => *failure_type,
                _ => sluice_protocol::message::FailureType::SystemError,
            };
            return Err(ActivityError::Failed {
                failure_type,
                message: format!("{name} gave up after {attempt_no} attempts: {err}"),
            });
        }
        let delay = retry_delay(policy, attempt_no);
        if policy
            .max_elapsed
            .is_some_and(|max| started.elapsed() + delay > max)
        {
            return Err(err);
        }
        tracing::warn!(activity = name, pipeline_id, attempt = attempt_no, error = %err, ?delay, "activity failed, retrying");
        let now = std::time::SystemTime::now();
        let first = *first_failure.get_or_insert(now);
        if let Some(observer) = observer {
            // Bounded: reporting must not hold up the retry (the database it writes to
            // may be the very thing that is failing).
            let report = observer.retrying(RetryNotice {
                activity: name,
                attempt: attempt_no,
                error: &err,
                first_failure: first,
                next_attempt: now + delay,
            });
            tokio::select! {
                _ = cancel.cancelled() => return Err(ActivityError::Cancelled),
                _ = tokio::time::timeout(REPORT_TIMEOUT.min(delay), report) => {}
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(ActivityError::Cancelled),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The metrics label of a failed attempt: its failure class.
fn outcome_label(err: &ActivityError) -> &'static str {
    match err {
        ActivityError::Fenced => "fenced",
        ActivityError::Cancelled => "cancelled",
        ActivityError::Invariant(_) => "invariant",
        ActivityError::Failed { failure_type, .. } => failure_type.as_str(),
    }
}

/// How long reporting a retry may take before the retry goes on without it.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::message::FailureType;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn delays_grow_with_bounded_jitter() {
        let policy = RetryPolicy::default();
        for attempt in 1..=10 {
            let base = policy.interval(attempt).as_secs_f64();
            for _ in 0..50 {
                let d = retry_delay(&policy, attempt).as_secs_f64();
                assert!(
                    d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9,
                    "{d} vs {base}"
                );
            }
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            initial_interval: Duration::from_millis(1),
            max_interval: Duration::from_millis(5),
            ..RetryPolicy::default()
        }
    }

    #[tokio::test]
    async fn retries_transient_until_success() {
        let calls = AtomicU32::new(0);
        let cancel = CancellationToken::new();
        let r = run_activity(
            "t",
            "p",
            &fast(),
            Duration::from_secs(1),
            &cancel,
            || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(ActivityError::transient("boom"))
                } else {
                    Ok(7)
                }
            },
        )
        .await;
        assert_eq!(r.expect("succeeds"), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[derive(Default)]
    struct Recorder {
        retries: std::sync::Mutex<Vec<(u32, String)>>,
    }

    impl RetryObserver for Recorder {
        fn retrying(&self, notice: RetryNotice<'_>) -> BoxFuture<'_, ()> {
            assert!(notice.next_attempt >= notice.first_failure);
            self.retries
                .lock()
                .expect("test lock")
                .push((notice.attempt, notice.error.to_string()));
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn observers_see_each_retry_and_the_recovery() {
        let calls = AtomicU32::new(0);
        let recorder = Recorder::default();
        let cancel = CancellationToken::new();
        let r = run_observed(
            "t",
            "p",
            &fast(),
            Duration::from_secs(1),
            &cancel,
            Some(&recorder),
            || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(ActivityError::transient("refused"))
                } else {
                    Ok(())
                }
            },
        )
        .await;
        assert!(r.is_ok());
        let retries = recorder.retries.lock().expect("test lock").clone();
        assert_eq!(retries.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);
        assert!(retries[0].1.contains("refused"));

        // A first attempt that succeeds reports nothing.
        let quiet = Recorder::default();
        run_observed(
            "t",
            "p",
            &fast(),
            Duration::from_secs(1),
            &cancel,
            Some(&quiet),
            || async { Ok(()) },
        )
        .await
        .expect("succeeds");
        assert!(quiet.retries.lock().expect("test lock").is_empty());
    }

    #[tokio::test]
    async fn config_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let cancel = CancellationToken::new();
        let r: Result<(), _> = run_activity(
            "t",
            "p",
            &fast(),
            Duration::from_secs(1),
            &cancel,
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(ActivityError::config("bad table"))
            },
        )
        .await;
        assert!(matches!(
            r,
            Err(ActivityError::Failed {
                failure_type: FailureType::ConfigError,
                ..
            })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn fencing_stops_at_once_and_cancel_interrupts() {
        let cancel = CancellationToken::new();
        let r: Result<(), _> = run_activity(
            "t",
            "p",
            &fast(),
            Duration::from_secs(1),
            &cancel,
            || async { Err(ActivityError::Fenced) },
        )
        .await;
        assert!(matches!(r, Err(ActivityError::Fenced)));

        cancel.cancel();
        let r: Result<(), _> = run_activity(
            "t",
            "p",
            &fast(),
            Duration::from_secs(1),
            &cancel,
            || async { std::future::pending().await },
        )
        .await;
        assert!(matches!(r, Err(ActivityError::Cancelled)));
    }
}
