//! Retry policy of activities: Temporal's defaults (initial 1 s, ×2, capped at 100 s,
//! with jitter) unless a caller overrides them.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub initial_interval: Duration,
    pub multiplier: f64,
    pub max_interval: Duration,
    /// Fraction of random jitter applied to each interval (0.0–1.0).
    pub jitter: f64,
    /// Give up after this long; None retries until the activity succeeds or is cancelled.
    pub max_elapsed: Option<Duration>,
    /// Give up after this many attempts; None: no limit.
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Duration::from_secs(100),
            jitter: 0.2,
            max_elapsed: None,
            max_attempts: None,
        }
    }
}

impl RetryPolicy {
    /// The interval before retry number `attempt` (1-based), before jitter.
    pub fn interval(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.powi(attempt.saturating_sub(1) as i32);
        let secs = self.initial_interval.as_secs_f64() * factor;
        Duration::from_secs_f64(secs.min(self.max_interval.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporal_defaults() {
        let p = RetryPolicy::default();
        assert_eq!(p.interval(1), Duration::from_secs(1));
        assert_eq!(p.interval(2), Duration::from_secs(2));
        assert_eq!(p.interval(7), Duration::from_secs(64));
        assert_eq!(p.interval(8), Duration::from_secs(100));
        assert_eq!(p.interval(50), Duration::from_secs(100));
    }
}
