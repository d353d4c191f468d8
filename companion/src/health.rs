//! Whether Redis is usable: the verdict every lease consults to choose between the
//! cluster-wide path (Redis cache and lock) and degraded mode (see [`crate::degraded`]).
//! On a Redis Cluster the verdict is also kept per shard: a key whose shard is down is
//! served in degraded mode while the keys of the other shards keep the cluster-wide path.
//!
//! The verdict is fed by signals:
//!
//! - the [monitor](run_monitor): a `PING` every `--health-interval-ms`; any failure of
//!   it counts. On a cluster the monitor asks for the shards (`CLUSTER SLOTS`, from
//!   whichever node answers first) and `PING`s every primary on its own connection
//!   ([`NodeProber`]): each primary's answer is a signal of its shard, and Redis as a
//!   whole is healthy while any primary answers;
//! - every Redis operation of a real request: a connection failure or a timeout counts
//!   as a failure ([`StoreError::is_unavailability`]), and so does a reply that says
//!   the node cannot serve the key now (`CLUSTERDOWN`, `TRYAGAIN`, `READONLY`, a
//!   redirection the client's retries did not settle); another error *reply* (a
//!   script error, `NOPERM`, ...) is no evidence either way and is ignored;
//! - any success.
//!
//! The store reports them through its [`Observer`] trait, which [`Health`] implements;
//! `lib.rs` hands the store its `Health`, so the store does not know this module.
//!
//! `--health-failure-threshold` consecutive failures make Redis unhealthy; a single
//! success makes it healthy again. Each transition is logged once (warn going down,
//! info coming back), announced on a [`watch`] channel, counted, and sets the
//! `tokengate_companion_redis_healthy` gauge ([`RedisHealthMetrics`]).
//!
//! A shard follows the same rule with its own streak: the failures of operations on its
//! keys and of its primary's `PING`. A shard the monitor does not list, or a slot no
//! shard serves, counts as down. The shards are replaced at every probe, so a
//! replica promoted to primary is a new, healthy shard as soon as it answers. A shard
//! coming back is announced on the same channel as Redis coming back (deferred
//! invalidations are replayed). Each primary's state is the
//! `tokengate_companion_redis_node_up{node,slots}` gauge.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::metrics::{HealthState, RedisHealthMetrics};
use crate::store::{NodeProber, Observer, Shard, ShardProbe, Store, StoreError};

/// One shard's verdict.
#[derive(Debug, Clone)]
struct ShardState {
    /// The slot range and its primary.
    shard: Shard,
    /// Failures since its last success.
    failures: u32,
    /// Whether its keys bypass Redis.
    down: bool,
}

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
    /// A cluster's shards as last probed, sorted by first slot; empty for one Redis
    /// server, and for a cluster until its first probe.
    shards: RwLock<Vec<ShardState>>,
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
            shards: RwLock::new(Vec::new()),
        }
    }

    /// Whether the keys of `slot` (see [`crate::store::slot_of_tag`]) may use Redis:
    /// Redis is healthy and, on a cluster, the slot's shard is not down.
    pub fn serves(&self, slot: u16) -> bool {
        if !self.is_healthy() {
            return false;
        }
        let shards = self.read_shards();
        shards.is_empty()
            || shards
                .iter()
                .find(|state| state.shard.holds(slot))
                .is_some_and(|state| !state.down)
    }

    /// The shards last probed (empty but for a cluster).
    pub fn shards(&self) -> Vec<Shard> {
        self.read_shards()
            .iter()
            .map(|state| state.shard.clone())
            .collect()
    }

    /// The shards whose keys are served in degraded mode now.
    pub fn down_shards(&self) -> Vec<Shard> {
        self.read_shards()
            .iter()
            .filter(|state| state.down)
            .map(|state| state.shard.clone())
            .collect()
    }

    /// Takes in a probe of the cluster's shards: the new shard list, each shard's
    /// `PING` as a signal of it (a shard whose range and primary are unchanged keeps its
    /// streak), and Redis healthy if any primary answered. A probe that reached no node
    /// is a failure of Redis as a whole.
    pub fn record_probe(&self, probe: Result<Vec<ShardProbe>, StoreError>) {
        let probes = match probe {
            Ok(probes) => probes,
            Err(error) => return self.record_failure(&error),
        };
        let mut first_error = None;
        let any_answered = probes.iter().any(|probe| probe.outcome.is_ok());
        let (down_before, down_after) = {
            let mut shards = self.write_shards();
            let down_before = shards.iter().filter(|state| state.down).count();
            let mut next = Vec::with_capacity(probes.len());
            for ShardProbe { shard, outcome } in probes {
                let previous = shards.iter().find(|state| state.shard == shard);
                let mut state = previous.cloned().unwrap_or(ShardState {
                    shard,
                    failures: 0,
                    down: false,
                });
                match outcome {
                    Ok(()) => {
                        self.shard_answered(&mut state);
                    }
                    Err(error) => {
                        self.shard_failed(&mut state, &error);
                        first_error.get_or_insert(error);
                    }
                }
                next.push(state);
            }
            next.sort_by_key(|state| state.shard.first_slot);
            self.metrics.set_nodes(
                next.iter()
                    .map(|state| (state.shard.node.as_str(), state.shard.slots(), !state.down)),
            );
            let down_after = next.iter().filter(|state| state.down).count();
            *shards = next;
            (down_before, down_after)
        };
        match first_error {
            Some(error) if !any_answered => self.record_failure(&error),
            _ => self.record_success(),
        }
        // A shard back, or its slots taken over by a promoted replica.
        if down_after < down_before && self.is_healthy() {
            self.changes.send_replace(true);
        }
    }

    /// An operation on a key of `slot` succeeded.
    fn record_key_success(&self, slot: u16) {
        let recovered = self.with_shard(slot, |health, state| health.shard_answered(state));
        self.record_success();
        if recovered == Some(true) {
            self.changes.send_replace(true);
        }
    }

    /// An operation on a key of `slot` failed for want of its shard; without a known
    /// shard (one Redis server, or no probe yet) it counts against Redis as a whole.
    fn record_key_failure(&self, slot: u16, error: &StoreError) {
        if self
            .with_shard(slot, |health, state| health.shard_failed(state, error))
            .is_none()
        {
            self.record_failure(error);
        }
    }

    /// Applies `update` to the shard holding `slot`, if one does, and keeps its gauge.
    fn with_shard<T>(
        &self,
        slot: u16,
        update: impl FnOnce(&Self, &mut ShardState) -> T,
    ) -> Option<T> {
        let mut shards = self.write_shards();
        let state = shards.iter_mut().find(|state| state.shard.holds(slot))?;
        let was_down = state.down;
        let result = update(self, state);
        if state.down != was_down {
            self.metrics
                .set_node(&state.shard.node, state.shard.slots(), !state.down);
        }
        Some(result)
    }

    /// The shard answered: its streak ends; `true` if it was down.
    fn shard_answered(&self, state: &mut ShardState) -> bool {
        state.failures = 0;
        if !state.down {
            return false;
        }
        state.down = false;
        tracing::info!(
            node = %state.shard.node, slots = %state.shard.slots(),
            "redis shard is healthy again: its keys use the cluster cache and lock"
        );
        true
    }

    /// The shard failed; the `threshold`-th failure in a row puts it down.
    fn shard_failed(&self, state: &mut ShardState, error: &StoreError) {
        state.failures = state.failures.saturating_add(1);
        if state.down || state.failures < self.threshold {
            return;
        }
        state.down = true;
        tracing::warn!(
            node = %state.shard.node, slots = %state.shard.slots(), %error, failures = state.failures,
            "redis shard is unhealthy: its keys are served in degraded mode (or from this \
             process's memory of their tokens) until it, or a replica promoted in its place, answers"
        );
    }

    fn read_shards(&self) -> RwLockReadGuard<'_, Vec<ShardState>> {
        // Every update replaces whole fields: consistent even after a panic.
        self.shards
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_shards(&self) -> RwLockWriteGuard<'_, Vec<ShardState>> {
        self.shards
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    fn answered(&self, slot: Option<u16>) {
        match slot {
            Some(slot) => self.record_key_success(slot),
            None => self.record_success(),
        }
    }

    fn unavailable(&self, slot: Option<u16>, error: &StoreError) {
        match slot {
            Some(slot) => self.record_key_failure(slot, error),
            None => self.record_failure(error),
        }
    }
}

/// Probes Redis every `interval` until the task is aborted: one server with a `PING`
/// through `store` (which reports its outcome to its [`Health`]); a cluster (`prober`
/// given) shard by shard ([`NodeProber::probe`]), reported to `health`.
///
/// One server is first PINGed one interval after start (start-up has just checked
/// it); a cluster is probed at once, so its shards are known from the start. A probe
/// that hangs is cut off by the Redis timeout; the next one starts an interval after
/// the previous one ended.
pub async fn run_monitor(
    store: Store,
    health: std::sync::Arc<Health>,
    prober: Option<NodeProber>,
    interval: Duration,
) {
    // A zero period would panic; the flag's parser refuses 0, a `Config` built in code may not.
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    if prober.is_none() {
        ticks.tick().await; // the first tick is immediate
    }
    loop {
        ticks.tick().await;
        match &prober {
            Some(prober) => health.record_probe(prober.probe(&health.shards()).await),
            // The outcome is recorded by the store; nothing else to do with it here.
            None => {
                let _ = store.ping().await;
            }
        }
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

    fn shard(first_slot: u16, last_slot: u16, node: &str) -> Shard {
        Shard {
            first_slot,
            last_slot,
            node: node.to_owned(),
        }
    }

    fn probe(shard: Shard, answered: bool) -> ShardProbe {
        ShardProbe {
            shard,
            outcome: if answered { Ok(()) } else { Err(down()) },
        }
    }

    #[test]
    fn a_dead_shard_is_down_alone_until_a_replica_takes_its_slots() {
        let health = Health::new(2, RedisHealthMetrics::default());
        let (a, b) = (shard(0, 8191, "a:1"), shard(8192, 16383, "b:1"));
        health.record_probe(Ok(vec![probe(a.clone(), true), probe(b.clone(), true)]));
        assert!(health.serves(0) && health.serves(16383));

        // Failures of b's keys, then of its PING: down at the threshold, a stays.
        health.unavailable(Some(9000), &down());
        assert!(health.serves(9000));
        health.record_probe(Ok(vec![probe(a.clone(), true), probe(b.clone(), false)]));
        assert!(!health.serves(9000) && health.serves(100));
        assert!(health.is_healthy(), "another shard answers");
        assert_eq!(health.down_shards(), vec![b.clone()]);
        let mut changes = health.subscribe();
        changes.borrow_and_update();

        // A replica took b's slots: a new shard, healthy, and announced.
        let promoted = shard(8192, 16383, "c:1");
        health.record_probe(Ok(vec![probe(a.clone(), true), probe(promoted, true)]));
        assert!(health.serves(9000));
        assert!(health.down_shards().is_empty());
        assert!(changes.has_changed().unwrap());

        // Every primary down: Redis itself turns unhealthy.
        for _ in 0..2 {
            health.record_probe(Ok(vec![probe(a.clone(), false), probe(b.clone(), false)]));
        }
        assert!(!health.is_healthy() && !health.serves(0));
    }

    #[test]
    fn a_slot_no_shard_serves_is_down() {
        let health = Health::new(1, RedisHealthMetrics::default());
        health.record_probe(Ok(vec![probe(shard(0, 99, "a:1"), true)]));
        assert!(health.serves(99));
        assert!(!health.serves(100));
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
