//! Whether Redis is usable: the verdict every lease consults to choose between the
//! cluster-wide path (Redis cache and lock) and degraded mode (see [`crate::degraded`]).
//!
//! The verdict is fed by signals:
//!
//! - the [monitor](run_monitor): a `PING` every `--health-interval-ms`; any failure of
//!   it counts;
//! - every Redis operation of a real request: a connection failure or a timeout counts
//!   as a failure ([`StoreError::is_unavailability`]); an error *reply* (a script error,
//!   `READONLY`, ...) is no evidence either way and is ignored;
//! - any success.
//!
//! The store reports them through its [`Observer`] trait, which [`Health`] implements;
//! `lib.rs` hands the store its `Health`, so the store does not know this module.
//!
//! `--health-failure-threshold` consecutive failures make Redis unhealthy; a single
//! success makes it healthy again. Each transition is logged once (warn going down,
//! info coming back), announced on a [`watch`] channel, counted, and sets the
//! `tokengate_companion_redis_healthy` gauge ([`RedisHealthMetrics`]).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::metrics::{HealthState, RedisHealthMetrics};
use crate::store::{Observer, Store, StoreError};

/// The Redis health verdict and its counters.
#[derive(Debug)]
pub struct Health {
    /// The verdict every lease reads; starts `true` (the start-up check is the first signal).
    healthy: AtomicBool,
    /// Failures since the last success, compared with `threshold`.
    failures: AtomicU32,
    /// Consecutive failures that make Redis unhealthy (at least 1).
    threshold: u32,
    /// The healthy gauge and the transition counters on `/metrics`.
    metrics: RedisHealthMetrics,
    /// Announces every transition (the new verdict), e.g. to replay deferred work.
    changes: watch::Sender<bool>,
}

impl Health {
    /// A healthy verdict that turns unhealthy after `threshold` failures in a row
    /// (a threshold of 0 is treated as 1), kept in `metrics` too.
    pub fn new(threshold: u32, metrics: RedisHealthMetrics) -> Self {
        metrics.set_healthy(true);
        Self {
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            threshold: threshold.max(1),
            metrics,
            changes: watch::Sender::new(true),
        }
    }

    /// Whether Redis is considered usable now.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Transitions so far: `(to unhealthy, to healthy)`.
    pub fn transitions(&self) -> (u64, u64) {
        (
            self.metrics.transitions(HealthState::Unhealthy),
            self.metrics.transitions(HealthState::Healthy),
        )
    }

    /// A receiver told the new verdict at every transition.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    /// A Redis operation succeeded: the failure streak ends, and an unhealthy Redis is
    /// healthy again.
    pub fn record_success(&self) {
        self.failures.store(0, Ordering::SeqCst);
        // `swap` makes exactly one caller see the transition, so it is logged once.
        if !self.healthy.swap(true, Ordering::SeqCst) {
            self.metrics.set_healthy(true);
            self.metrics.transition(HealthState::Healthy);
            tracing::info!("redis is healthy again: leases use the cluster cache and lock");
            self.changes.send_replace(true);
        }
    }

    /// A Redis operation failed for want of Redis; the `threshold`-th in a row makes it
    /// unhealthy.
    pub fn record_failure(&self, error: &StoreError) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::SeqCst)
            .saturating_add(1);
        if failures < self.threshold {
            tracing::debug!(%error, failures, threshold = self.threshold, "redis operation failed");
            return;
        }
        if self.healthy.swap(false, Ordering::SeqCst) {
            self.metrics.set_healthy(false);
            self.metrics.transition(HealthState::Unhealthy);
            tracing::warn!(
                %error, failures,
                "redis is unhealthy: leases are served in degraded mode (no cluster cache, \
                 no lock, an in-memory limit per provider and tenant) until it answers again"
            );
            self.changes.send_replace(false);
        }
    }
}

impl Observer for Health {
    fn answered(&self) {
        self.record_success();
    }

    fn unavailable(&self, error: &StoreError) {
        self.record_failure(error);
    }
}

/// PINGs Redis every `interval` through `store` (which reports each outcome to its
/// [`Health`]), until the task is aborted.
///
/// The first PING is one interval after start: start-up has just checked Redis.
/// A PING that hangs is cut off by the store's timeout; the next one starts an
/// interval after the previous one ended.
pub async fn run_monitor(store: Store, interval: Duration) {
    // A zero period would panic; the flag's parser refuses 0, a `Config` built in code may not.
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate
    loop {
        ticks.tick().await;
        // The outcome is recorded by the store; nothing else to do with it here.
        let _ = store.ping().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> StoreError {
        StoreError::Timeout(Duration::from_millis(5))
    }

    #[test]
    fn the_threshold_th_failure_in_a_row_makes_redis_unhealthy_once() {
        let health = Health::new(3, RedisHealthMetrics::default());
        let mut changes = health.subscribe();
        health.record_failure(&down());
        health.record_failure(&down());
        assert!(health.is_healthy());
        assert!(!changes.has_changed().unwrap());

        health.record_failure(&down());
        health.record_failure(&down());
        assert!(!health.is_healthy());
        assert_eq!(health.transitions(), (1, 0));
        assert!(changes.has_changed().unwrap());
        assert!(!*changes.borrow_and_update());
    }

    #[test]
    fn a_success_ends_the_streak_and_recovers_at_once() {
        let health = Health::new(2, RedisHealthMetrics::default());
        health.record_failure(&down());
        health.record_success();
        health.record_failure(&down());
        assert!(
            health.is_healthy(),
            "the streak restarted after the success"
        );

        health.record_failure(&down());
        assert!(!health.is_healthy());
        health.record_success();
        health.record_success();
        assert!(health.is_healthy());
        assert_eq!(health.transitions(), (1, 1));
    }
}
