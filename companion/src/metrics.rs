//! The companion's Prometheus metrics: plain atomics updated on the request paths and a
//! hand-written text exposition (format 0.0.4) served on `GET /metrics`.
//!
//! Every label takes a value from a fixed list (an outcome, a result, a direction):
//! tenant ids, lease ids and tokens are never labels, so the number of series is fixed.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tokengate_companion_leases_total` | counter | `outcome` ([`LeaseOutcome`]) |
//! | `tokengate_companion_commits_total` | counter | `result` ([`CommitResult`]) |
//! | `tokengate_companion_aborts_total` | counter | `result` ([`AbortResult`]) |
//! | `tokengate_companion_invalidations_total` | counter | `result` ([`InvalidateResult`]) |
//! | `tokengate_companion_redis_healthy` | gauge | |
//! | `tokengate_companion_redis_health_transitions_total` | counter | `to` (`healthy`, `unhealthy`) |
//! | `tokengate_companion_leases_waiting` | gauge | |
//! | `tokengate_companion_lease_wait_seconds` | histogram | |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::health::Health;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Declares a label enum: its variants, their label values, and the list of all of them.
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in exposition order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

label_enum! {
    /// How a lease was answered.
    LeaseOutcome {
        /// A usable token was cached in Redis.
        Hit => "hit",
        /// The lease took the Redis lock at once: the caller fetches.
        Fetch => "fetch",
        /// The lease waited for another holder, whose commit answered it.
        WaitedHit => "waited_hit",
        /// The lease waited, the holder gave up (abort, expiry), and this lease took over.
        WaitedFetch => "waited_fetch",
        /// The lease waited for the whole wait budget (`503 LOCK_ACQUISITION_FAILED`).
        LockTimeout => "lock_timeout",
        /// Redis is unhealthy; the in-memory limiter admitted a fetch.
        DegradedFetch => "degraded_fetch",
        /// Redis is unhealthy; another lease of this process was fetching and its commit
        /// answered this one.
        DegradedWaitedHit => "degraded_waited_hit",
        /// Redis is unhealthy and the in-memory limit was reached (`503 CACHE_UNAVAILABLE`).
        DegradedRefused => "degraded_refused",
        /// Any other failure: Redis failed during the lease, or the companion stopped.
        Error => "error",
    }
}

label_enum! {
    /// What a commit did.
    CommitResult {
        /// The token was stored in Redis.
        Stored => "stored",
        /// A lease that had lost its lock committed a token shorter-lived than the cached
        /// one, which was kept.
        NotStored => "not_stored",
        /// The token was already expired: not stored, lock released.
        Expired => "expired",
        /// A degraded-mode lease: nothing stored, waiters of this process answered.
        Local => "local",
        /// Redis failed (`503 CACHE_UNAVAILABLE`).
        Error => "error",
    }
}

label_enum! {
    /// What an abort did.
    AbortResult {
        /// The lease held the lock and released it.
        Released => "released",
        /// The lease no longer held the lock (expired, taken over, already released).
        NotHeld => "not_held",
        /// A degraded-mode lease: waiters of this process take over.
        Local => "local",
        /// Redis failed (`503 CACHE_UNAVAILABLE`).
        Error => "error",
    }
}

label_enum! {
    /// What an invalidation did.
    InvalidateResult {
        /// The cached token was deleted.
        Deleted => "deleted",
        /// A different token is cached (the rejected one was already replaced): kept.
        Mismatch => "mismatch",
        /// No token was cached.
        NotCached => "not_cached",
        /// Redis is unhealthy: remembered, applied when Redis is healthy again.
        Deferred => "deferred",
        /// Redis failed (`503 CACHE_UNAVAILABLE`).
        Error => "error",
    }
}

/// Upper bounds of the lease wait histogram's buckets, in milliseconds: from a cache
/// hit (about a millisecond) to the longest wait budgets.
const WAIT_BUCKETS_MS: [u64; 13] = [
    1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000,
];

/// The counters, gauges and histogram of one companion process.
#[derive(Debug)]
pub struct Metrics {
    /// Leases answered, indexed by [`LeaseOutcome`].
    leases: [AtomicU64; LeaseOutcome::ALL.len()],
    /// Commits, indexed by [`CommitResult`].
    commits: [AtomicU64; CommitResult::ALL.len()],
    /// Aborts, indexed by [`AbortResult`].
    aborts: [AtomicU64; AbortResult::ALL.len()],
    /// Invalidations, indexed by [`InvalidateResult`].
    invalidations: [AtomicU64; InvalidateResult::ALL.len()],
    /// Leases waiting right now (for a Redis holder or an in-process degraded fetch);
    /// also lets tests know a lease is parked before they release it.
    waiting: AtomicI64,
    /// Per-bucket (not cumulative) counts of lease durations; the last is `+Inf`.
    wait_buckets: [AtomicU64; WAIT_BUCKETS_MS.len() + 1],
    /// Sum of lease durations, in microseconds.
    wait_sum_us: AtomicU64,
    /// Number of leases timed.
    wait_count: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero.
    pub fn new() -> Self {
        Self {
            leases: Default::default(),
            commits: Default::default(),
            aborts: Default::default(),
            invalidations: Default::default(),
            waiting: AtomicI64::new(0),
            wait_buckets: Default::default(),
            wait_sum_us: AtomicU64::new(0),
            wait_count: AtomicU64::new(0),
        }
    }

    /// Counts a lease's outcome and how long it took to answer.
    pub fn lease(&self, outcome: LeaseOutcome, took: Duration) {
        self.leases[outcome.index()].fetch_add(1, Ordering::Relaxed);
        let took_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = WAIT_BUCKETS_MS
            .iter()
            .position(|&le_ms| took_us <= le_ms * 1_000)
            .unwrap_or(WAIT_BUCKETS_MS.len());
        self.wait_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.wait_sum_us.fetch_add(took_us, Ordering::Relaxed);
        self.wait_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a commit.
    pub fn commit(&self, result: CommitResult) {
        self.commits[result.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an abort.
    pub fn abort(&self, result: AbortResult) {
        self.aborts[result.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an invalidation.
    pub fn invalidate(&self, result: InvalidateResult) {
        self.invalidations[result.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a lease as waiting until the returned guard is dropped.
    pub fn waiting(&self) -> WaitingGuard<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingGuard(&self.waiting)
    }

    /// The text exposition of these metrics and of `health`'s state.
    pub fn render(&self, health: &Health) -> String {
        let mut out = String::with_capacity(4096);
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);

        family(
            &mut out,
            "tokengate_companion_leases_total",
            "counter",
            "Leases answered, by outcome.",
        );
        for outcome in LeaseOutcome::ALL {
            sample(
                &mut out,
                "tokengate_companion_leases_total",
                Some(("outcome", outcome.as_str())),
                load(&self.leases[outcome.index()]),
            );
        }

        family(
            &mut out,
            "tokengate_companion_commits_total",
            "counter",
            "Commits, by result.",
        );
        for result in CommitResult::ALL {
            sample(
                &mut out,
                "tokengate_companion_commits_total",
                Some(("result", result.as_str())),
                load(&self.commits[result.index()]),
            );
        }

        family(
            &mut out,
            "tokengate_companion_aborts_total",
            "counter",
            "Aborts, by result.",
        );
        for result in AbortResult::ALL {
            sample(
                &mut out,
                "tokengate_companion_aborts_total",
                Some(("result", result.as_str())),
                load(&self.aborts[result.index()]),
            );
        }

        family(
            &mut out,
            "tokengate_companion_invalidations_total",
            "counter",
            "Invalidations, by result.",
        );
        for result in InvalidateResult::ALL {
            sample(
                &mut out,
                "tokengate_companion_invalidations_total",
                Some(("result", result.as_str())),
                load(&self.invalidations[result.index()]),
            );
        }

        family(
            &mut out,
            "tokengate_companion_redis_healthy",
            "gauge",
            "1 while Redis is healthy, 0 while leases are served in degraded mode.",
        );
        sample(
            &mut out,
            "tokengate_companion_redis_healthy",
            None,
            u64::from(health.is_healthy()),
        );

        let (to_unhealthy, to_healthy) = health.transitions();
        family(
            &mut out,
            "tokengate_companion_redis_health_transitions_total",
            "counter",
            "Changes of the Redis health verdict, by the state changed to.",
        );
        for (to, count) in [("healthy", to_healthy), ("unhealthy", to_unhealthy)] {
            sample(
                &mut out,
                "tokengate_companion_redis_health_transitions_total",
                Some(("to", to)),
                count,
            );
        }

        family(
            &mut out,
            "tokengate_companion_leases_waiting",
            "gauge",
            "Leases waiting for another holder's fetch right now.",
        );
        let waiting = self.waiting.load(Ordering::Relaxed).max(0);
        sample(
            &mut out,
            "tokengate_companion_leases_waiting",
            None,
            waiting.unsigned_abs(),
        );

        let name = "tokengate_companion_lease_wait_seconds";
        family(
            &mut out,
            name,
            "histogram",
            "Time from receiving a lease to answering it.",
        );
        let mut cumulative = 0;
        for (bucket, le_ms) in WAIT_BUCKETS_MS.iter().enumerate() {
            cumulative += load(&self.wait_buckets[bucket]);
            let le = format_seconds(le_ms * 1_000);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += load(&self.wait_buckets[WAIT_BUCKETS_MS.len()]);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = format_seconds(load(&self.wait_sum_us));
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", load(&self.wait_count));
        out
    }
}

/// Keeps a lease counted in `tokengate_companion_leases_waiting` while alive.
#[derive(Debug)]
pub struct WaitingGuard<'a>(&'a AtomicI64);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Writes a family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample line. Label values here are fixed identifiers: nothing to escape.
fn sample(out: &mut String, name: &str, label: Option<(&str, &str)>, value: u64) {
    let _ = match label {
        Some((label, label_value)) => writeln!(out, "{name}{{{label}=\"{label_value}\"}} {value}"),
        None => writeln!(out, "{name} {value}"),
    };
}

/// Microseconds as decimal seconds without float rounding (`1500` -> `0.0015`).
fn format_seconds(us: u64) -> String {
    let (whole, frac) = (us / 1_000_000, us % 1_000_000);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:06}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn seconds_are_printed_exactly() {
        assert_eq!(format_seconds(0), "0");
        assert_eq!(format_seconds(1_000), "0.001");
        assert_eq!(format_seconds(1_500), "0.0015");
        assert_eq!(format_seconds(2_500_000), "2.5");
        assert_eq!(format_seconds(25_000_000), "25");
    }

    #[test]
    fn every_outcome_is_exposed_and_counted() {
        let metrics = Metrics::new();
        metrics.lease(LeaseOutcome::Hit, Duration::from_micros(800));
        metrics.lease(LeaseOutcome::Hit, Duration::from_millis(3));
        metrics.lease(LeaseOutcome::DegradedRefused, Duration::from_secs(60));
        metrics.commit(CommitResult::Local);
        let text = metrics.render(&Health::new(3));

        for outcome in LeaseOutcome::ALL {
            let series = format!(
                "tokengate_companion_leases_total{{outcome=\"{}\"}}",
                outcome.as_str()
            );
            assert!(value_of(&text, &series).is_some(), "{series} missing");
        }
        let leases = |outcome: &str| {
            value_of(
                &text,
                &format!("tokengate_companion_leases_total{{outcome=\"{outcome}\"}}"),
            )
        };
        assert_eq!(leases("hit").as_deref(), Some("2"));
        assert_eq!(leases("degraded_refused").as_deref(), Some("1"));
        assert_eq!(
            value_of(&text, "tokengate_companion_commits_total{result=\"local\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            value_of(&text, "tokengate_companion_redis_healthy").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn the_wait_histogram_is_cumulative_with_sum_and_count() {
        let metrics = Metrics::new();
        metrics.lease(LeaseOutcome::Hit, Duration::from_micros(500));
        metrics.lease(LeaseOutcome::WaitedHit, Duration::from_millis(40));
        metrics.lease(LeaseOutcome::LockTimeout, Duration::from_secs(30));
        let text = metrics.render(&Health::new(3));
        let bucket = |le: &str| {
            value_of(
                &text,
                &format!("tokengate_companion_lease_wait_seconds_bucket{{le=\"{le}\"}}"),
            )
        };

        assert_eq!(bucket("0.001").as_deref(), Some("1"));
        assert_eq!(bucket("0.025").as_deref(), Some("1"));
        assert_eq!(bucket("0.05").as_deref(), Some("2"));
        assert_eq!(bucket("25").as_deref(), Some("2"));
        assert_eq!(bucket("+Inf").as_deref(), Some("3"));
        assert_eq!(
            value_of(&text, "tokengate_companion_lease_wait_seconds_sum").as_deref(),
            Some("30.0405")
        );
        assert_eq!(
            value_of(&text, "tokengate_companion_lease_wait_seconds_count").as_deref(),
            Some("3")
        );
    }

    #[test]
    fn the_waiting_gauge_follows_its_guards() {
        let metrics = Metrics::new();
        let health = Health::new(3);
        let first = metrics.waiting();
        let second = metrics.waiting();
        assert!(
            metrics
                .render(&health)
                .contains("\ntokengate_companion_leases_waiting 2\n")
        );
        drop((first, second));
        assert!(
            metrics
                .render(&health)
                .contains("\ntokengate_companion_leases_waiting 0\n")
        );
    }
}
