//! Retry policy: exponential backoff with full jitter.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How a failed delivery is retried before it is dead-lettered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Backoff ceiling before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Growth of the ceiling per attempt.
    pub factor: f64,
    /// Largest backoff.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// How long one delivery may wait in all for open circuit breakers without its attempts
    /// being charged: an attempt that asks to retry after an open breaker refused one of its
    /// outbound calls waits out the breaker's cool-down and runs again as the same attempt,
    /// until the delivery has waited this long; past it, such an attempt counts like any
    /// other (so an event whose provider never comes back still ends in a dead letter).
    #[serde(with = "humantime_serde")]
    pub max_circuit_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial: Duration::from_millis(100),
            factor: 2.0,
            max: Duration::from_secs(30),
            max_circuit_wait: Duration::from_secs(15 * 60),
        }
    }
}

impl RetryPolicy {
    /// The ceiling of the wait after failed attempt `attempt` (1-based): `initial * factor^(attempt-1)`, capped.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = self.factor.max(1.0).powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        // (A `max` near `u64::MAX` seconds rounds past it as a float: never a panic.)
        Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(self.max)
    }

    /// The wait after failed attempt `attempt`: uniformly random in `[0, ceiling]` (full jitter),
    /// so many events failing together do not retry together.
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.ceiling(attempt).mul_f64(fastrand::f64())
    }

    /// How many times a redelivering transport (JetStream's `max_deliver`) delivers an event
    /// before it gives up: twice the attempts, at least one more, so deliveries given back
    /// unrun (another version's, a stop's) never use up the attempts themselves.
    pub fn transport_deliveries(&self) -> u32 {
        self.max_attempts.saturating_mul(2).max(self.max_attempts.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review 56e: a `max` near `u64::MAX` seconds (refused at the start now) rounded past it as a
    /// float and panicked every backoff; the ceiling never panics, whatever the policy.
    #[test]
    fn the_ceiling_never_panics() {
        let huge = Duration::from_secs(u64::MAX);
        let p = RetryPolicy { initial: huge, max: huge, ..RetryPolicy::default() };
        assert_eq!(p.ceiling(3), huge);
        let p = RetryPolicy { factor: f64::INFINITY, ..RetryPolicy::default() };
        assert_eq!(p.ceiling(5), p.max);
    }

    #[test]
    fn ceilings_grow_exponentially_and_stop_at_max() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(4), Duration::from_millis(800));
        assert_eq!(p.ceiling(30), Duration::from_secs(30));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn a_redelivering_transport_delivers_twice_the_attempts_and_at_least_one_more() {
        let with = |max_attempts| RetryPolicy { max_attempts, ..RetryPolicy::default() }.transport_deliveries();
        assert_eq!((with(0), with(1), with(3), with(u32::MAX)), (1, 2, 6, u32::MAX));
    }

    #[test]
    fn backoff_stays_within_the_ceiling() {
        let p = RetryPolicy::default();
        for attempt in 1..10 {
            for _ in 0..100 {
                assert!(p.backoff(attempt) <= p.ceiling(attempt));
            }
        }
    }
}
