//! The companion's Prometheus metrics: a `prometheus-client` registry updated on the
//! request paths (and by the health verdict, [`RedisHealthMetrics`]), served on
//! `GET /metrics` in the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]).
//!
//! Every label takes a value from a fixed list (an outcome, a result, a direction), or
//! names one of a Redis Cluster's primaries and its slot range: tenant ids, lease ids
//! and tokens are never labels, so the number of series is bounded.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tokengate_companion_leases_total` | counter | `outcome` ([`LeaseOutcome`]) |
//! | `tokengate_companion_commits_total` | counter | `result` ([`CommitResult`]) |
//! | `tokengate_companion_early_replacements_total` | counter | |
//! | `tokengate_companion_aborts_total` | counter | `result` ([`AbortResult`]) |
//! | `tokengate_companion_invalidations_total` | counter | `result` ([`InvalidateResult`]) |
//! | `tokengate_companion_redis_healthy` | gauge | |
//! | `tokengate_companion_redis_health_transitions_total` | counter | `to` (`healthy`, `unhealthy`) |
//! | `tokengate_companion_redis_node_up` | gauge | `node`, `slots` (a Redis Cluster's primaries) |
//! | `tokengate_companion_leases_waiting` | gauge | |
//! | `tokengate_companion_lease_wait_seconds` | histogram | |
//! | `tokengate_companion_token_requests_total` | counter | `outcome` ([`TokenOutcome`]) |
//! | `tokengate_companion_token_request_seconds` | histogram | |
//! | `tokengate_companion_upstream_requests_total` | counter | `upstream` ([`Upstream`]), `outcome` ([`CalloutOutcome`]) |
//! | `tokengate_companion_upstream_request_seconds` | histogram | `upstream`, `outcome` |
//! | `tokengate_companion_unauthorized_total` | counter | |

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// The `Content-Type` of the exposition: the Prometheus text format 0.0.4, which the
/// encoder ([`prometheus_client::encoding::prometheus_text`]) writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Declares a label enum: its variants, their label values, and the list of all of them.
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
                EncodeLabelValue::encode(&self.as_str(), encoder)
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
        /// Redis (or the key's shard) is unavailable; a token this companion served or
        /// fetched earlier, still valid, answered from its memory (stale-if-error).
        DegradedHit => "degraded_hit",
        /// Redis is unhealthy; the in-memory limiter admitted a fetch.
        DegradedFetch => "degraded_fetch",
        /// Redis is unhealthy; another lease of this process was fetching and its commit
        /// answered this one.
        DegradedWaitedHit => "degraded_waited_hit",
        /// Redis is unhealthy and the in-memory limit was reached (`503 CACHE_UNAVAILABLE`).
        DegradedRefused => "degraded_refused",
        /// The key's last fetch failed with rejected or missing credentials moments ago:
        /// its error was answered from the cache (negative caching), without a fetch.
        CachedFailure => "cached_failure",
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
    /// The Redis health verdict a transition changed to.
    HealthState {
        /// Redis answers again: leases use the cluster cache and lock.
        Healthy => "healthy",
        /// Too many failures in a row: leases are served in degraded mode.
        Unhealthy => "unhealthy",
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

/// Upper bounds of the lease wait histogram's buckets, in seconds: from a cache hit
/// (about a millisecond) to the longest wait budgets.
const WAIT_BUCKETS: [f64; 13] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0,
];

/// Upper bounds of the upstream call histogram's buckets, in seconds: from a loopback
/// answer to the longest per-attempt timeouts.
const CALLOUT_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A family of counters with one label, `[(name, value)]`.
type Counters<T> = Family<[(&'static str, T); 1], Counter>;

/// The `outcome` label set.
fn outcome_label<T>(value: T) -> [(&'static str, T); 1] {
    [("outcome", value)]
}

/// The `result` label set.
fn result_label<T>(value: T) -> [(&'static str, T); 1] {
    [("result", value)]
}

/// The `to` label set of the health transitions.
fn to_label(value: HealthState) -> [(&'static str, HealthState); 1] {
    [("to", value)]
}

/// The labels of an upstream call, in exposition order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CalloutLabels {
    upstream: Upstream,
    outcome: CalloutOutcome,
}

/// A histogram of upstream call durations.
fn callout_histogram() -> Histogram {
    Histogram::new(CALLOUT_BUCKETS)
}

/// The metrics the health verdict keeps; clones share the same series.
#[derive(Debug, Clone, Default)]
pub struct RedisHealthMetrics {
    /// `tokengate_companion_redis_healthy`: 1 while Redis is healthy, 0 while not.
    healthy: Gauge,
    /// `tokengate_companion_redis_health_transitions_total`, by the state changed to.
    transitions: Counters<HealthState>,
    /// `tokengate_companion_redis_node_up`: per primary of a cluster, 1 while its shard
    /// serves its keys, 0 while they are served in degraded mode.
    nodes: Family<NodeLabels, Gauge>,
}

/// The labels of a cluster primary's gauge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NodeLabels {
    /// `host:port`.
    node: String,
    /// `first-last`.
    slots: String,
}

impl RedisHealthMetrics {
    /// Sets the healthy gauge.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.set(i64::from(healthy));
    }

    /// Replaces every primary's gauge: `(node, slots, up)` per shard, so the primaries
    /// of a past topology (a node failed over) leave the exposition.
    pub fn set_nodes<'a>(&self, nodes: impl IntoIterator<Item = (&'a str, String, bool)>) {
        self.nodes.clear();
        for (node, slots, up) in nodes {
            self.set_node(node, slots, up);
        }
    }

    /// Sets one primary's gauge.
    pub fn set_node(&self, node: &str, slots: String, up: bool) {
        let labels = NodeLabels {
            node: node.to_owned(),
            slots,
        };
        self.nodes.get_or_create(&labels).set(i64::from(up));
    }

    /// Counts a transition to `to`.
    pub fn transition(&self, to: HealthState) {
        self.transitions.get_or_create(&to_label(to)).inc();
    }

    /// Transitions so far to `to`.
    pub fn transitions(&self, to: HealthState) -> u64 {
        self.transitions.get_or_create(&to_label(to)).get()
    }
}

/// The counters, gauges and histograms of one companion process, and the registry that
/// exposes them.
#[derive(Debug)]
pub struct Metrics {
    /// Every family below, in exposition order.
    registry: Registry,
    /// Leases answered, by [`LeaseOutcome`].
    leases: Counters<LeaseOutcome>,
    /// Commits, by [`CommitResult`].
    commits: Counters<CommitResult>,
    /// Tokens stored over a cached one that had more than half the new one's life left.
    early_replacements: Counter,
    /// Aborts, by [`AbortResult`].
    aborts: Counters<AbortResult>,
    /// Invalidations, by [`InvalidateResult`].
    invalidations: Counters<InvalidateResult>,
    /// The health verdict's gauge and transitions.
    redis_health: RedisHealthMetrics,
    /// Leases waiting right now (for a Redis holder or an in-process degraded fetch);
    /// also lets tests know a lease is parked before they release it.
    waiting: Gauge,
    /// Time from receiving a lease to answering it.
    lease_wait: Histogram,
    /// Token API requests, by [`TokenOutcome`].
    token_requests: Counters<TokenOutcome>,
    /// Time from receiving a token API request to answering it.
    token_latency: Histogram,
    /// Upstream calls, by [`Upstream`] and [`CalloutOutcome`].
    callouts: Family<CalloutLabels, Counter>,
    /// Upstream call durations, labelled like `callouts`.
    callout_latency: Family<CalloutLabels, Histogram, fn() -> Histogram>,
    /// Internal API requests refused for a missing or wrong key.
    unauthorized: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero, every label value present; Redis healthy.
    pub fn new() -> Self {
        let metrics = Self {
            registry: Registry::default(),
            leases: Family::default(),
            commits: Family::default(),
            early_replacements: Counter::default(),
            aborts: Family::default(),
            invalidations: Family::default(),
            redis_health: RedisHealthMetrics::default(),
            waiting: Gauge::default(),
            lease_wait: Histogram::new(WAIT_BUCKETS),
            token_requests: Family::default(),
            token_latency: Histogram::new(WAIT_BUCKETS),
            callouts: Family::default(),
            callout_latency: Family::new_with_constructor(callout_histogram),
            unauthorized: Counter::default(),
        };
        // Every label value is created at zero, so every series is exposed from the start.
        for &outcome in LeaseOutcome::ALL {
            let _ = metrics.leases.get_or_create(&outcome_label(outcome));
        }
        for &result in CommitResult::ALL {
            let _ = metrics.commits.get_or_create(&result_label(result));
        }
        for &result in AbortResult::ALL {
            let _ = metrics.aborts.get_or_create(&result_label(result));
        }
        for &result in InvalidateResult::ALL {
            let _ = metrics.invalidations.get_or_create(&result_label(result));
        }
        for &to in HealthState::ALL {
            let _ = metrics
                .redis_health
                .transitions
                .get_or_create(&to_label(to));
        }
        metrics.redis_health.set_healthy(true);
        for &outcome in TokenOutcome::ALL {
            let _ = metrics
                .token_requests
                .get_or_create(&outcome_label(outcome));
        }
        for &upstream in Upstream::ALL {
            for &outcome in CalloutOutcome::ALL {
                let labels = CalloutLabels { upstream, outcome };
                let _ = metrics.callouts.get_or_create(&labels);
                let _ = metrics.callout_latency.get_or_create(&labels);
            }
        }
        metrics.registered()
    }

    /// Registers every family under its exposed name (counters get `_total` from the
    /// encoder, which also ends each help text with a period).
    fn registered(mut self) -> Self {
        let registry = &mut self.registry;
        registry.register(
            "tokengate_companion_leases",
            "Leases answered, by outcome",
            self.leases.clone(),
        );
        registry.register(
            "tokengate_companion_commits",
            "Commits, by result",
            self.commits.clone(),
        );
        registry.register(
            "tokengate_companion_early_replacements",
            "Tokens stored over a cached token that had more than half of the new one's lifetime left (fetches beyond one per token lifetime)",
            self.early_replacements.clone(),
        );
        registry.register(
            "tokengate_companion_aborts",
            "Aborts, by result",
            self.aborts.clone(),
        );
        registry.register(
            "tokengate_companion_invalidations",
            "Invalidations, by result",
            self.invalidations.clone(),
        );
        registry.register(
            "tokengate_companion_redis_healthy",
            "1 while Redis is healthy, 0 while leases are served in degraded mode",
            self.redis_health.healthy.clone(),
        );
        registry.register(
            "tokengate_companion_redis_health_transitions",
            "Changes of the Redis health verdict, by the state changed to",
            self.redis_health.transitions.clone(),
        );
        registry.register(
            "tokengate_companion_redis_node_up",
            "Per primary of a Redis Cluster and its slot range: 1 while its keys use Redis, \
             0 while they are served in degraded mode",
            self.redis_health.nodes.clone(),
        );
        registry.register(
            "tokengate_companion_leases_waiting",
            "Leases waiting for another holder's fetch right now",
            self.waiting.clone(),
        );
        registry.register(
            "tokengate_companion_lease_wait_seconds",
            "Time from receiving a lease to answering it",
            self.lease_wait.clone(),
        );
        registry.register(
            "tokengate_companion_token_requests",
            "Token API (/auth/token) requests, by outcome",
            self.token_requests.clone(),
        );
        registry.register(
            "tokengate_companion_token_request_seconds",
            "Time from receiving a token API request to answering it",
            self.token_latency.clone(),
        );
        registry.register(
            "tokengate_companion_upstream_requests",
            "Calls of the token API to the Tenant Service and the OAuth login, by outcome",
            self.callouts.clone(),
        );
        registry.register(
            "tokengate_companion_upstream_request_seconds",
            "Duration of the token API's upstream calls, by upstream and outcome",
            self.callout_latency.clone(),
        );
        registry.register(
            "tokengate_companion_unauthorized",
            "Internal API requests refused for a missing or wrong x-tokengate-key",
            self.unauthorized.clone(),
        );
        self
    }

    /// The health verdict's metrics, for [`crate::health::Health`] to keep.
    pub fn redis_health(&self) -> RedisHealthMetrics {
        self.redis_health.clone()
    }

    /// Counts a lease's outcome and how long it took to answer.
    pub fn lease(&self, outcome: LeaseOutcome, took: Duration) {
        self.leases.get_or_create(&outcome_label(outcome)).inc();
        self.lease_wait.observe(took.as_secs_f64());
    }

    /// Counts a token API request's outcome and how long it took to answer.
    pub fn token_request(&self, outcome: TokenOutcome, took: Duration) {
        self.token_requests
            .get_or_create(&outcome_label(outcome))
            .inc();
        self.token_latency.observe(took.as_secs_f64());
    }

    /// Counts one upstream call of the token API and its duration.
    pub fn callout(&self, upstream: Upstream, outcome: CalloutOutcome, took: Duration) {
        let labels = CalloutLabels { upstream, outcome };
        self.callouts.get_or_create(&labels).inc();
        self.callout_latency
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Counts an internal API request refused for its key.
    pub fn unauthorized(&self) {
        self.unauthorized.inc();
    }

    /// Counts a commit.
    pub fn commit(&self, result: CommitResult) {
        self.commits.get_or_create(&result_label(result)).inc();
    }

    /// Counts a token stored over a cached one that still had more than half of the new
    /// one's lifetime left.
    pub fn early_replacement(&self) {
        self.early_replacements.inc();
    }

    /// Counts an abort.
    pub fn abort(&self, result: AbortResult) {
        self.aborts.get_or_create(&result_label(result)).inc();
    }

    /// Counts an invalidation.
    pub fn invalidate(&self, result: InvalidateResult) {
        self.invalidations
            .get_or_create(&result_label(result))
            .inc();
    }

    /// Counts a lease as waiting until the returned guard is dropped.
    pub fn waiting(&self) -> WaitingGuard<'_> {
        self.waiting.inc();
        WaitingGuard(&self.waiting)
    }

    /// The text exposition (Prometheus text format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Keeps a lease counted in `tokengate_companion_leases_waiting` while alive.
#[derive(Debug)]
pub struct WaitingGuard<'a>(&'a Gauge);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
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
    fn every_outcome_is_exposed_and_counted() {
        let metrics = Metrics::new();
        metrics.lease(LeaseOutcome::Hit, Duration::from_micros(800));
        metrics.lease(LeaseOutcome::Hit, Duration::from_millis(3));
        metrics.lease(LeaseOutcome::DegradedRefused, Duration::from_secs(60));
        metrics.commit(CommitResult::Local);
        let text = metrics.render();

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
        let text = metrics.render();
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
        let sum: f64 = value_of(&text, "tokengate_companion_lease_wait_seconds_sum")
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 30.0405).abs() < 1e-9, "{sum}");
        assert_eq!(
            value_of(&text, "tokengate_companion_lease_wait_seconds_count").as_deref(),
            Some("3")
        );
    }

    #[test]
    fn the_waiting_gauge_follows_its_guards() {
        let metrics = Metrics::new();
        let first = metrics.waiting();
        let second = metrics.waiting();
        assert!(
            metrics
                .render()
                .contains("\ntokengate_companion_leases_waiting 2\n")
        );
        drop((first, second));
        assert!(
            metrics
                .render()
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
        let text = metrics.render();
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
                .and_then(|sum| sum.parse::<f64>().ok()),
            Some(0.007)
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

#[cfg(test)]
mod exposition {
    use super::*;

    /// Every family's `# HELP` / `# TYPE` lines, as operators' scrapers have seen them.
    const FAMILIES: [(&str, &str); 14] = [
        ("tokengate_companion_leases_total", "counter"),
        ("tokengate_companion_commits_total", "counter"),
        ("tokengate_companion_early_replacements_total", "counter"),
        ("tokengate_companion_aborts_total", "counter"),
        ("tokengate_companion_invalidations_total", "counter"),
        ("tokengate_companion_redis_healthy", "gauge"),
        (
            "tokengate_companion_redis_health_transitions_total",
            "counter",
        ),
        ("tokengate_companion_leases_waiting", "gauge"),
        ("tokengate_companion_lease_wait_seconds", "histogram"),
        ("tokengate_companion_token_requests_total", "counter"),
        ("tokengate_companion_token_request_seconds", "histogram"),
        ("tokengate_companion_upstream_requests_total", "counter"),
        ("tokengate_companion_upstream_request_seconds", "histogram"),
        ("tokengate_companion_unauthorized_total", "counter"),
    ];

    #[test]
    fn names_types_and_help_lines_are_the_ones_operators_scrape() {
        let text = Metrics::new().render();
        for (name, kind) in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind}"
            );
            let help = text
                .lines()
                .find_map(|line| line.strip_prefix(&format!("# HELP {name} ")))
                .unwrap_or_else(|| panic!("no help for {name}"));
            assert!(help.ends_with('.') && !help.ends_with(".."), "{help}");
        }
        assert_eq!(text.matches("# TYPE ").count(), FAMILIES.len());
        assert!(
            !text.contains("# EOF"),
            "the 0.0.4 text format has no EOF marker"
        );
        assert!(text.contains("\ntokengate_companion_unauthorized_total 0\n"));
        assert!(
            text.contains("tokengate_companion_redis_health_transitions_total{to=\"healthy\"} 0\n")
        );
        assert!(text.contains("tokengate_companion_lease_wait_seconds_bucket{le=\"25\"} 0\n"));
        assert!(text.contains("tokengate_companion_lease_wait_seconds_bucket{le=\"0.001\"} 0\n"));
    }

    #[test]
    fn the_content_type_is_prometheus_text_0_0_4() {
        assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    }

    #[test]
    fn the_health_verdict_sets_the_healthy_gauge_and_counts_transitions() {
        let metrics = Metrics::new();
        let health = metrics.redis_health();
        health.set_healthy(false);
        health.transition(HealthState::Unhealthy);
        let text = metrics.render();
        assert!(
            text.contains("\ntokengate_companion_redis_healthy 0\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "tokengate_companion_redis_health_transitions_total{to=\"unhealthy\"} 1\n"
            )
        );
    }

    #[test]
    fn a_clusters_primaries_have_a_gauge_each_only_for_the_current_topology() {
        let metrics = Metrics::new();
        let health = metrics.redis_health();
        assert!(
            !metrics.render().contains("redis_node_up"),
            "none for one server"
        );
        health.set_nodes([("10.0.0.1:6379", "0-8191".to_owned(), true)]);
        health.set_nodes([
            ("10.0.0.2:6379", "0-8191".to_owned(), true),
            ("10.0.0.3:6379", "8192-16383".to_owned(), false),
        ]);
        let text = metrics.render();
        assert!(text.contains("# TYPE tokengate_companion_redis_node_up gauge\n"));
        assert!(text.contains(
            "tokengate_companion_redis_node_up{node=\"10.0.0.3:6379\",slots=\"8192-16383\"} 0\n"
        ));
        assert!(text.contains(
            "tokengate_companion_redis_node_up{node=\"10.0.0.2:6379\",slots=\"0-8191\"} 1\n"
        ));
        assert!(!text.contains("10.0.0.1"), "a past primary is gone");
    }
}
