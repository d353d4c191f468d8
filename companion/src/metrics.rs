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
//! | `tokengate_companion_token_requests_total` | counter | `outcome` ([`TokenOutcome`]) |
//! | `tokengate_companion_token_request_seconds` | histogram | |
//! | `tokengate_companion_upstream_requests_total` | counter | `upstream` ([`Upstream`]), `outcome` ([`CalloutOutcome`]) |
//! | `tokengate_companion_upstream_request_seconds` | histogram | `upstream`, `outcome` |
//! | `tokengate_companion_unauthorized_total` | counter | |

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

label_enum! {
    /// How a request of the token API (`/auth/token`) was answered.
    TokenOutcome {
        /// From the Redis cache (or a concurrent fetch's commit): `source: cache`.
        Cache => "cache",
        /// Fetched for this request: `source: fresh`.
        Fresh => "fresh",
        /// An error body (any code).
        Error => "error",
    }
}

label_enum! {
    /// The upstreams the token API calls.
    Upstream {
        /// The Tenant Service (credentials).
        TenantService => "tenant_service",
        /// A Genesys login host (the OAuth client-credentials exchange).
        Oauth => "oauth",
    }
}

label_enum! {
    /// How one upstream call ended.
    CalloutOutcome {
        /// A 2xx answer.
        Ok => "ok",
        /// A 4xx answer.
        ClientError => "client_error",
        /// A 5xx answer (or any other non-2xx, non-4xx status).
        ServerError => "server_error",
        /// No answer: connection failure, reset or timeout.
        NoResponse => "no_response",
    }
}

impl CalloutOutcome {
    /// The outcome of an answer with `status`.
    pub fn of_status(status: u16) -> Self {
        match status {
            200..=299 => CalloutOutcome::Ok,
            400..=499 => CalloutOutcome::ClientError,
            _ => CalloutOutcome::ServerError,
        }
    }
}

/// Upper bounds of the lease wait histogram's buckets, in milliseconds: from a cache
/// hit (about a millisecond) to the longest wait budgets.
const WAIT_BUCKETS_MS: [u64; 13] = [
    1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000,
];

/// Upper bounds of the upstream call histogram's buckets, in milliseconds: from a
/// loopback answer to the longest per-attempt timeouts.
const CALLOUT_BUCKETS_MS: [u64; 12] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000,
];

/// A histogram with fixed bucket bounds, in the Prometheus shape (cumulative buckets,
/// sum, count).
#[derive(Debug)]
struct Histogram {
    /// Upper bounds of the buckets, in milliseconds; `+Inf` is implied.
    bounds_ms: &'static [u64],
    /// Per-bucket (not cumulative) counts; one more than `bounds_ms`, the last `+Inf`.
    buckets: Vec<AtomicU64>,
    /// Sum of the observations, in microseconds.
    sum_us: AtomicU64,
    /// Number of observations.
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds_ms: &'static [u64]) -> Self {
        Self {
            bounds_ms,
            buckets: (0..=bounds_ms.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, took: Duration) {
        let took_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = self
            .bounds_ms
            .iter()
            .position(|&le_ms| took_us <= le_ms * 1_000)
            .unwrap_or(self.bounds_ms.len());
        if let Some(counter) = self.buckets.get(bucket) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(took_us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the bucket, sum and count lines of `name` with `labels` (`k="v",…`, or empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let with = |extra: &str| match (labels.is_empty(), extra.is_empty()) {
            (true, true) => String::new(),
            (true, false) => format!("{{{extra}}}"),
            (false, true) => format!("{{{labels}}}"),
            (false, false) => format!("{{{labels},{extra}}}"),
        };
        let mut cumulative = 0;
        for (bucket, le_ms) in self.bounds_ms.iter().enumerate() {
            cumulative += self.buckets[bucket].load(Ordering::Relaxed);
            let le = format_seconds(le_ms * 1_000);
            let _ = writeln!(
                out,
                "{name}_bucket{} {cumulative}",
                with(&format!("le=\"{le}\""))
            );
        }
        cumulative += self.buckets[self.bounds_ms.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{} {cumulative}", with("le=\"+Inf\""));
        let sum = format_seconds(self.sum_us.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum{} {sum}", with(""));
        let _ = writeln!(
            out,
            "{name}_count{} {}",
            with(""),
            self.count.load(Ordering::Relaxed)
        );
    }
}

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
    /// Time from receiving a lease to answering it.
    lease_wait: Histogram,
    /// Token API requests, indexed by [`TokenOutcome`].
    token_requests: [AtomicU64; TokenOutcome::ALL.len()],
    /// Time from receiving a token API request to answering it.
    token_latency: Histogram,
    /// Upstream calls, indexed by [`Upstream`] then [`CalloutOutcome`].
    callouts: [[AtomicU64; CalloutOutcome::ALL.len()]; Upstream::ALL.len()],
    /// Upstream call durations, indexed like `callouts`.
    callout_latency: Vec<Vec<Histogram>>,
    /// Internal API requests refused for a missing or wrong key.
    unauthorized: AtomicU64,
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
            lease_wait: Histogram::new(&WAIT_BUCKETS_MS),
            token_requests: Default::default(),
            token_latency: Histogram::new(&WAIT_BUCKETS_MS),
            callouts: Default::default(),
            callout_latency: Upstream::ALL
                .iter()
                .map(|_| {
                    CalloutOutcome::ALL
                        .iter()
                        .map(|_| Histogram::new(&CALLOUT_BUCKETS_MS))
                        .collect()
                })
                .collect(),
            unauthorized: AtomicU64::new(0),
        }
    }

    /// Counts a lease's outcome and how long it took to answer.
    pub fn lease(&self, outcome: LeaseOutcome, took: Duration) {
        self.leases[outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.lease_wait.observe(took);
    }

    /// Counts a token API request's outcome and how long it took to answer.
    pub fn token_request(&self, outcome: TokenOutcome, took: Duration) {
        self.token_requests[outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.token_latency.observe(took);
    }

    /// Counts one upstream call of the token API and its duration.
    pub fn callout(&self, upstream: Upstream, outcome: CalloutOutcome, took: Duration) {
        self.callouts[upstream.index()][outcome.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(histogram) = self
            .callout_latency
            .get(upstream.index())
            .and_then(|by_outcome| by_outcome.get(outcome.index()))
        {
            histogram.observe(took);
        }
    }

    /// Counts an internal API request refused for its key.
    pub fn unauthorized(&self) {
        self.unauthorized.fetch_add(1, Ordering::Relaxed);
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
        self.lease_wait.render(&mut out, name, "");

        let name = "tokengate_companion_token_requests_total";
        family(
            &mut out,
            name,
            "counter",
            "Token API (/auth/token) requests, by outcome.",
        );
        for outcome in TokenOutcome::ALL {
            let value = load(&self.token_requests[outcome.index()]);
            sample(&mut out, name, Some(("outcome", outcome.as_str())), value);
        }
        let name = "tokengate_companion_token_request_seconds";
        family(
            &mut out,
            name,
            "histogram",
            "Time from receiving a token API request to answering it.",
        );
        self.token_latency.render(&mut out, name, "");

        let name = "tokengate_companion_upstream_requests_total";
        family(
            &mut out,
            name,
            "counter",
            "Calls of the token API to the Tenant Service and the OAuth login, by outcome.",
        );
        for upstream in Upstream::ALL {
            for outcome in CalloutOutcome::ALL {
                let value = load(&self.callouts[upstream.index()][outcome.index()]);
                let _ = writeln!(
                    out,
                    "{name}{{upstream=\"{}\",outcome=\"{}\"}} {value}",
                    upstream.as_str(),
                    outcome.as_str()
                );
            }
        }
        let name = "tokengate_companion_upstream_request_seconds";
        family(
            &mut out,
            name,
            "histogram",
            "Duration of the token API's upstream calls, by upstream and outcome.",
        );
        for upstream in Upstream::ALL {
            for outcome in CalloutOutcome::ALL {
                if let Some(histogram) = self
                    .callout_latency
                    .get(upstream.index())
                    .and_then(|by_outcome| by_outcome.get(outcome.index()))
                {
                    let labels = format!(
                        "upstream=\"{}\",outcome=\"{}\"",
                        upstream.as_str(),
                        outcome.as_str()
                    );
                    histogram.render(&mut out, name, &labels);
                }
            }
        }

        let name = "tokengate_companion_unauthorized_total";
        family(
            &mut out,
            name,
            "counter",
            "Internal API requests refused for a missing or wrong x-tokengate-key.",
        );
        sample(&mut out, name, None, load(&self.unauthorized));
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

    #[test]
    fn upstream_calls_are_counted_and_timed_by_upstream_and_outcome() {
        let metrics = Metrics::new();
        metrics.callout(
            Upstream::Oauth,
            CalloutOutcome::Ok,
            Duration::from_millis(7),
        );
        metrics.callout(
            Upstream::TenantService,
            CalloutOutcome::NoResponse,
            Duration::from_secs(60),
        );
        metrics.token_request(TokenOutcome::Fresh, Duration::from_millis(9));
        let text = metrics.render(&Health::new(3));
        let series = |s: &str| value_of(&text, s);
        assert_eq!(
            series(
                "tokengate_companion_upstream_requests_total{upstream=\"oauth\",outcome=\"ok\"}"
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            series("tokengate_companion_upstream_request_seconds_bucket{upstream=\"oauth\",outcome=\"ok\",le=\"0.01\"}")
                .as_deref(),
            Some("1")
        );
        assert_eq!(
            series("tokengate_companion_upstream_request_seconds_sum{upstream=\"oauth\",outcome=\"ok\"}")
                .as_deref(),
            Some("0.007")
        );
        assert_eq!(
            series("tokengate_companion_upstream_request_seconds_bucket{upstream=\"tenant_service\",outcome=\"no_response\",le=\"30\"}")
                .as_deref(),
            Some("0")
        );
        assert_eq!(
            series("tokengate_companion_upstream_request_seconds_count{upstream=\"tenant_service\",outcome=\"no_response\"}")
                .as_deref(),
            Some("1")
        );
        assert_eq!(
            series("tokengate_companion_token_requests_total{outcome=\"fresh\"}").as_deref(),
            Some("1")
        );
        assert_eq!(CalloutOutcome::of_status(404), CalloutOutcome::ClientError);
        assert_eq!(CalloutOutcome::of_status(302), CalloutOutcome::ServerError);
    }
}
