//! What the filter logic needs from its host, as a trait: proxy-wasm's host functions
//! implement it in `filter`, and the tests use the recording fake in `fake`, whose
//! clock they drive. Every effect of the worker goes through it.

use tokengate_core::ErrorCode;

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Per-request detail (cache hits).
    Debug,
    /// One line per fetched token or per notable event.
    Info,
    /// Something failed but the filter copes.
    Warn,
    /// Something failed and a request got an error.
    Error,
}

/// A counter the filter exposes as an Envoy stat (see the README's stats table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// A request was served from the gateway cache.
    CacheHit,
    /// A tenant's token was pushed out of the gateway cache (full) by another's.
    CacheEvicted,
    /// A request missed the gateway cache.
    CacheMiss,
    /// A request joined a fetch already under way on its worker or its Envoy.
    CollapsedWaiter,
    /// A fetch (Tenant Service and OAuth) started on this worker.
    FetchStarted,
    /// A fetch ended with a token.
    FetchSucceeded,
    /// A fetch, lease or wait ended with this error.
    FetchFailed(ErrorCode),
    /// The companion answered a lease with a token from the cluster cache.
    ClusterCacheHit,
    /// The companion could not be reached: the fetch ran in local mode.
    CompanionFallback,
    /// A background refresh of a token near its expiry started.
    RefreshAhead,
    /// A token the upstream rejected was dropped.
    Purge,
    /// A rejection was not acted on: the key was purged too recently.
    PurgeSuppressed,
}

impl Metric {
    /// Every metric, for defining them all up front (so they show as 0 from the start).
    pub fn all() -> impl Iterator<Item = Metric> {
        [
            Metric::CacheHit,
            Metric::CacheEvicted,
            Metric::CacheMiss,
            Metric::CollapsedWaiter,
            Metric::FetchStarted,
            Metric::FetchSucceeded,
            Metric::ClusterCacheHit,
            Metric::CompanionFallback,
            Metric::RefreshAhead,
            Metric::Purge,
            Metric::PurgeSuppressed,
        ]
        .into_iter()
        .chain(ErrorCode::ALL.into_iter().map(Metric::FetchFailed))
    }

    /// The stat's name (Envoy shows it as is in `/stats`, and as `tokengate_...` in
    /// Prometheus output).
    pub fn name(self) -> String {
        let name = match self {
            Metric::CacheHit => "cache_hit",
            Metric::CacheEvicted => "cache_evicted",
            Metric::CacheMiss => "cache_miss",
            Metric::CollapsedWaiter => "collapsed_waiter",
            Metric::FetchStarted => "fetch_started",
            Metric::FetchSucceeded => "fetch_succeeded",
            Metric::ClusterCacheHit => "cluster_cache_hit",
            Metric::CompanionFallback => "companion_fallback",
            Metric::RefreshAhead => "refresh_ahead",
            Metric::Purge => "purge",
            Metric::PurgeSuppressed => "purge_suppressed",
            Metric::FetchFailed(code) => {
                return format!(
                    "tokengate.fetch_failed.{}",
                    code.as_str().to_ascii_lowercase()
                );
            }
        };
        format!("tokengate.{name}")
    }
}

/// An HTTP call to an Envoy cluster.
#[derive(Debug)]
pub struct Callout<'a> {
    /// Envoy cluster name.
    pub cluster: &'a str,
    /// `GET` or `POST`.
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// `:authority` (the virtual host the upstream expects).
    pub authority: &'a str,
    /// Headers besides the pseudo-headers. May carry secrets: never log them.
    pub headers: Vec<(&'a str, &'a str)>,
    /// Body, if any. May carry secrets: never log it.
    pub body: Option<&'a [u8]>,
    /// Give up after this long.
    pub timeout_ms: u64,
}

/// The host functions the filter logic uses. Every method that can fail reports it
/// instead of panicking: a panic would abort the whole Wasm VM.
pub trait Host {
    /// Wall-clock time in milliseconds since the epoch.
    fn now_ms(&self) -> u64;
    /// Sends an HTTP call; its answer comes back to the worker under the returned id.
    fn dispatch(&mut self, callout: Callout<'_>) -> Result<u32, String>;
    /// Reads a value shared by all workers of this Envoy.
    fn shared_get(&self, key: &str) -> Option<Vec<u8>>;
    /// Writes a value shared by all workers of this Envoy.
    fn shared_set(&mut self, key: &str, value: &[u8]);
    /// Reads a shared value with its version, for [`Host::shared_replace`].
    fn shared_get_versioned(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes a shared value only if it is still at `version`; false when another
    /// worker wrote it since.
    fn shared_replace(&mut self, key: &str, value: &[u8], version: u32) -> bool;
    /// Wakes the worker that registered wake queue `queue` (its `on_wake` runs soon, on
    /// its own thread).
    fn wake(&mut self, queue: u32);
    /// Sets `header: value` on paused request `context_id` and resumes it.
    /// Returns false when that request is gone.
    fn resume_with_header(&mut self, context_id: u32, header: &str, value: &str) -> bool;
    /// Answers paused request `context_id` with a JSON body. Returns false when it is gone.
    fn reply_json(&mut self, context_id: u32, status: u16, body: &[u8]) -> bool;
    /// Sets how often the worker's `on_tick` runs; 0 stops it.
    fn set_tick_period_ms(&mut self, period_ms: u64);
    /// Adds `amount` to a counter.
    fn add(&mut self, metric: Metric, amount: u64);
    /// Adds one to a counter.
    fn count(&mut self, metric: Metric) {
        self.add(metric, 1);
    }
    /// The least severe level the host writes; lines below it are dropped.
    fn log_level(&self) -> Level;
    /// Writes a log line. Callers never pass secrets.
    fn log(&mut self, level: Level, message: &str);
}
