//! What the filter logic needs from its host, as a trait. Three hosts implement it:
//! proxy-wasm's host functions in `filter`, the Envoy dynamic module's callbacks in the
//! native build (`native/src/adapter.rs`, which also keeps the gateway cache itself:
//! [`Host::keyed_store`]), and the recording fake in `fake`, whose clock the tests
//! drive. Every effect of the worker goes through it.

use tokengate_core::ErrorCode;

use crate::slots::KeyedStore;
use tokengate_core::providers::ProviderTable;

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
    /// A request was answered the error its key's last fetch failed with, from memory
    /// (negative caching: credentials rejected or not found, for `negativeCacheMs`).
    NegativeCacheHit,
    /// A token the upstream rejected was dropped.
    Purge,
    /// A rejection was not acted on: the key was purged too recently.
    PurgeSuppressed,
    /// A fetch of the provider at this position of the provider table (sorted by
    /// name) started, succeeded or failed: `tokengate.provider.<name>.<event>`.
    Provider(u16, ProviderEvent),
}

/// What happened to one provider's fetch, counted per provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderEvent {
    /// As [`Metric::FetchStarted`].
    FetchStarted,
    /// As [`Metric::FetchSucceeded`].
    FetchSucceeded,
    /// As [`Metric::FetchFailed`], whatever the error.
    FetchFailed,
}

impl ProviderEvent {
    const ALL: [ProviderEvent; 3] = [
        ProviderEvent::FetchStarted,
        ProviderEvent::FetchSucceeded,
        ProviderEvent::FetchFailed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            ProviderEvent::FetchStarted => "fetch_started",
            ProviderEvent::FetchSucceeded => "fetch_succeeded",
            ProviderEvent::FetchFailed => "fetch_failed",
        }
    }
}

impl Metric {
    /// Every metric with its stat name, for defining them all up front (so they show
    /// as 0 from the start): the filter's own and three per provider of `providers`.
    pub fn all(providers: &ProviderTable) -> Vec<(Metric, String)> {
        let filter_wide = [
            Metric::CacheHit,
            Metric::CacheEvicted,
            Metric::CacheMiss,
            Metric::CollapsedWaiter,
            Metric::FetchStarted,
            Metric::FetchSucceeded,
            Metric::ClusterCacheHit,
            Metric::CompanionFallback,
            Metric::RefreshAhead,
            Metric::NegativeCacheHit,
            Metric::Purge,
            Metric::PurgeSuppressed,
        ]
        .into_iter()
        .chain(ErrorCode::ALL.into_iter().map(Metric::FetchFailed));
        let per_provider = (0..providers.iter().count()).flat_map(|index| {
            let index = u16::try_from(index).unwrap_or(u16::MAX);
            ProviderEvent::ALL
                .into_iter()
                .map(move |event| Metric::Provider(index, event))
        });
        filter_wide
            .chain(per_provider)
            .map(|metric| (metric, metric.name(providers)))
            .collect()
    }

    /// The stat's name (Envoy shows it as is in `/stats`, and as `tokengate_...` in
    /// Prometheus output); a provider's names it as `providers` does.
    pub fn name(self, providers: &ProviderTable) -> String {
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
            Metric::NegativeCacheHit => "negative_cache_hit",
            Metric::Purge => "purge",
            Metric::PurgeSuppressed => "purge_suppressed",
            Metric::Provider(index, event) => {
                let provider = providers.iter().nth(usize::from(index));
                let name = provider.map_or("unknown", |spec| spec.name.as_str());
                return format!("tokengate.provider.{name}.{}", event.as_str());
            }
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
    /// The per-key records this host keeps itself (the native build), shared by all
    /// workers of this Envoy. `None` (proxy-wasm): records live in slot tables over the
    /// shared data below ([`crate::slots`]).
    fn keyed_store(&self) -> Option<&dyn KeyedStore> {
        None
    }
    /// Reads a value shared by all workers of this Envoy. A host with a
    /// [`Host::keyed_store`] has no shared data: the default reads nothing.
    fn shared_get(&self, _key: &str) -> Option<Vec<u8>> {
        None
    }
    /// Writes a value shared by all workers of this Envoy (the default: nowhere).
    fn shared_set(&mut self, _key: &str, _value: &[u8]) {}
    /// Reads a shared value with its version, for [`Host::shared_replace`].
    fn shared_get_versioned(&self, _key: &str) -> Option<(Vec<u8>, u32)> {
        None
    }
    /// Writes a shared value only if it is still at `version`; false when another
    /// worker wrote it since (or, the default, there is no shared data).
    fn shared_replace(&mut self, _key: &str, _value: &[u8], _version: u32) -> bool {
        false
    }
    /// The write generation of `bucket` of the gateway cache's keys
    /// ([`crate::ready`]), shared by every worker of this Envoy. `None` (the default: a
    /// host with a [`Host::keyed_store`]): the host keeps no generations, and workers
    /// keep no tokens of their own.
    fn cache_generation(&self, _bucket: u32) -> Option<u64> {
        None
    }
    /// Counts a completed write of a key of `bucket` in the gateway cache.
    fn bump_cache_generation(&mut self, _bucket: u32) {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tokengate_core::providers::ProviderDocument;

    #[test]
    fn every_provider_gets_its_three_stats_under_its_name() {
        let documents: BTreeMap<String, ProviderDocument> =
            serde_json::from_str(r#"{"slack":{"kind":"static"}}"#).unwrap();
        let providers = ProviderTable::from_documents(&documents).unwrap();
        let all = Metric::all(&providers);
        let named = |wanted: &str| {
            all.iter()
                .find(|(_, name)| name == wanted)
                .map(|(metric, _)| *metric)
        };
        // Sorted by name: genesys, slack, whatsapp.
        assert_eq!(
            named("tokengate.provider.slack.fetch_started"),
            Some(Metric::Provider(1, ProviderEvent::FetchStarted))
        );
        assert_eq!(
            named("tokengate.provider.whatsapp.fetch_failed"),
            Some(Metric::Provider(2, ProviderEvent::FetchFailed))
        );
        assert_eq!(named("tokengate.fetch_started"), Some(Metric::FetchStarted));
        let names: std::collections::HashSet<&String> = all.iter().map(|(_, name)| name).collect();
        assert_eq!(names.len(), all.len(), "no name twice");
    }
}
