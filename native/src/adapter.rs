//! The one place that uses the wasm filter's host-agnostic layer (`tokengate::host`,
//! later `tokengate::worker`). `plugin/` is being refactored: when it changes, only
//! this module follows.
//!
//! Today it lends the stat names, so `libtokengate.so` and `tokengate.wasm` count under
//! the same names. Next (see the crate docs, "Driving the worker"): a `DynamicHost`
//! implementing `tokengate::host::Host` over [`crate::envoy`], and one
//! `tokengate::worker::Worker` per Envoy worker thread.

use tokengate::host::Metric;
use tokengate_core::ErrorCode;

/// The counters the native filter increments (a subset of `tokengate::host::Metric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Served from the process-wide cache.
    CacheHit,
    /// Not in the cache.
    CacheMiss,
    /// A fetch started.
    FetchStarted,
    /// A fetch ended with a token.
    FetchSucceeded,
    /// A fetch ended with this error.
    FetchFailed(ErrorCode),
}

impl Counter {
    fn metric(self) -> Metric {
        match self {
            Counter::CacheHit => Metric::CacheHit,
            Counter::CacheMiss => Metric::CacheMiss,
            Counter::FetchStarted => Metric::FetchStarted,
            Counter::FetchSucceeded => Metric::FetchSucceeded,
            Counter::FetchFailed(code) => Metric::FetchFailed(code),
        }
    }
}

/// Every counter with its stat name (the wasm filter's names, e.g. `tokengate.cache_hit`).
pub fn counters() -> impl Iterator<Item = (Counter, String)> {
    [
        Counter::CacheHit,
        Counter::CacheMiss,
        Counter::FetchStarted,
        Counter::FetchSucceeded,
    ]
    .into_iter()
    .chain(ErrorCode::ALL.into_iter().map(Counter::FetchFailed))
    .map(|counter| (counter, counter.metric().name()))
}
