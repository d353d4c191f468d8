//! The per-worker brain of the filter: the token cache lookup, the in-flight fetches
//! of this worker, and the requests paused on each of them. It decides everything and
//! touches nothing: every effect goes through [`Host`], so the same worker runs in
//! proxy-wasm, in a native host and, in the tests, on a recording fake with a driven
//! clock ([`crate::fake`]).
//!
//! A host creates one `Worker` per Envoy worker thread and calls, as things happen:
//!
//! | event | call |
//! |---|---|
//! | a request wants a token | [`Worker::on_request`] (answers at once or pauses it) |
//! | the upstream answered a request | [`Worker::on_upstream_status`] |
//! | a request ended | [`Worker::on_request_gone`] |
//! | the timer the worker asked for fired | [`Worker::on_tick`] |
//! | another worker woke this one | [`Worker::on_wake`] |
//! | a callout was answered | [`Worker::on_callout_response`] |
//!
//! Fetches collapse in three tiers: requests of one worker that miss the cache for the
//! same key wait on one fetch (the `fetches` map); workers of one Envoy wait for the
//! one that claimed the key's in-flight marker in shared data ([`crate::inflight`]);
//! Envoys wait for the one holding the companion's Redis lock (the lease).
//!
//! All callouts leave from the worker (on a tick or in a callout answer), never from a
//! request, so no answer is lost when the request that caused a fetch goes away. A
//! key's fetch goes:
//!
//! ```text
//! Queued --tick--> WaitingOnPeer --(token in shared cache)--> done
//!    |                  \--(marker released or expired)--> Queued
//!    |--(claimed marker)--> Leasing --hit--> done
//!    |                         \--fetch--> Fetching(lease) --> commit / abort --> done
//!    |                         \--companion unreachable--> Fetching(local)
//!    \--(companion known down)--> Fetching(local) --> done
//! ```
//!
//! When the fetch ends every waiting request is resumed with the token (inject mode)
//! or answered with it (endpoint mode), or answered with the error.
//!
//! - `fetch`: the stages above, the gateway cache, refresh-ahead and local mode.
//! - `companion`: the lease, `fetch: companion` token requests, commits, aborts and
//!   invalidations, with their answers.
//! - `purge`: upstream rejections and forced refreshes, rate-limited per key.

mod companion;
mod fetch;
mod purge;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokengate_core::limit::FetchLog;
use tokengate_core::{
    CachedToken, CalloutResult, FetchConfig, Provider, SecretString, TokenKey, Traceparent,
};

use crate::config::FilterConfig;
use crate::hits::HitTally;
use crate::host::{Host, Level, Metric};
use crate::ready::{self, MAX_READY_TOKENS, ReadyToken, ReadyTokens};
use crate::slots::Slots;
use companion::{LeaseEnd, Purpose};
use fetch::{Fetch, Stage};

/// What the request context does after asking for a token.
#[derive(Debug)]
pub enum Decision {
    /// The gateway cache has a fresh token: use it now.
    Cached(CachedToken),
    /// Pause: the worker resumes or answers the request when its fetch ends.
    Pause,
}

/// How a request wants its token delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Inject mode: set the authorization header and let the request continue upstream.
    Inject,
    /// Endpoint mode: answer the request with a `TokenResponse`.
    Respond,
}

/// A request asking for a token.
#[derive(Debug)]
pub struct TokenAsk {
    /// The request's context, to resume or answer it.
    pub context_id: u32,
    /// The token wanted.
    pub key: TokenKey,
    /// How to deliver the token.
    pub delivery: Delivery,
    /// Skip the caches (endpoint mode's `forceRefresh`).
    pub force_refresh: bool,
}

/// What a request's headers say about where it comes from, read only when needed (a
/// miss, an error, a hit's debug line; see [`crate::ask::request_ids`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestIds {
    /// Its `x-request-id`, for log lines and error bodies.
    pub correlation_id: Option<String>,
    /// Its valid W3C trace context, passed on to the callouts of a fetch it starts.
    pub traceparent: Option<Traceparent>,
}

/// One worker's filter state; see the module documentation.
#[derive(Debug)]
pub struct Worker {
    config: Arc<FilterConfig>,
    fetch_config: FetchConfig,
    /// The gateway cache's bounded tables in shared data.
    slots: Slots,
    /// Names this worker in the per-Envoy in-flight markers; unique per Envoy.
    worker_id: u64,
    /// This worker's wake queue, which it leaves in the marker of a peer's fetch it
    /// waits on; `None` when the host registered none (then it only polls).
    wake_queue: Option<u32>,
    /// In-flight fetches of this worker, one per key.
    fetches: HashMap<TokenKey, Fetch>,
    /// Outstanding callouts: id -> the key and why it was sent.
    callouts: HashMap<u32, (TokenKey, Purpose)>,
    /// The companion failed to answer: until then, fetch in local mode.
    companion_down_until_ms: u64,
    /// Local-mode fetches in the last minute, per key, for the local limiter.
    local_fetches: HashMap<TokenKey, FetchLog>,
    /// The tick period last asked of the host, to avoid resetting the timer needlessly.
    tick_period_ms: u64,
    /// The token each resumed request carried, to purge it if the upstream rejects it.
    delivered: HashMap<u32, (TokenKey, CachedToken)>,
    /// Tokens the upstream rejected, to invalidate at the companion on the next tick.
    pending_invalidations: Vec<(TokenKey, SecretString)>,
    /// Commits and aborts in flight, by callout id, to send once more if lost.
    lease_ends: HashMap<u32, LeaseEnd>,
    /// Lost commits and aborts, each sent once more at its moment.
    lease_end_retries: Vec<(u64, LeaseEnd)>,
    /// Cache hits not yet added to their stat (shared with the request contexts, which
    /// report when they end).
    hits: Arc<HitTally>,
    /// Whether the host writes debug lines (the per-hit line is only built then), and
    /// when that was last asked.
    debug_logging: Option<(bool, u64)>,
    /// Providers already warned of tokens too short for the margin and refresh lead.
    misfit_warned: HashSet<Provider>,
    /// This worker's own copies of the gateway cache's tokens ([`crate::ready`]).
    ready: ReadyTokens,
}

/// What this worker's own token cache answers for a key.
enum Lookup {
    /// A token to serve.
    Ready(Arc<ReadyToken>),
    /// No servable token, here or in the gateway cache.
    Miss,
    /// The host keeps no generations: the worker keeps no tokens.
    Off,
}

/// What a worker holds for requests and callouts in flight (for tests that bound it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerLoad {
    /// Fetches under way, one per key.
    pub fetches: usize,
    /// Requests paused on them.
    pub waiters: usize,
    /// Callouts not yet answered.
    pub callouts: usize,
    /// Resumed requests whose upstream answer is awaited (to purge a rejected token).
    pub delivered: usize,
    /// Commits and aborts waiting for their second attempt.
    pub lease_end_retries: usize,
}

/// How many tokens a worker keeps of its own, for `cache.maxTenants` keys.
fn config_ready_capacity(max_tenants: u32) -> u32 {
    max_tenants.min(MAX_READY_TOKENS)
}

/// Tick period while work waits for the worker's next turn.
const KICK_TICK_MS: u64 = 1;
/// Tick period while waiting for another worker's fetch: polls the shared cache, in
/// case the wake-up through the marker is missed (the owner gone, a lost race).
const PEER_POLL_TICK_MS: u64 = 1;
/// How long the host's log level is trusted before it is asked again (a level changed
/// at run time shows in the per-hit lines within this long).
const LOG_LEVEL_TTL_MS: u64 = 1_000;
/// Longest tick period while a backoff is pending.
const MAX_TICK_MS: u64 = 1_000;
/// Beyond this many keys in the local limiter, the idle ones are dropped.
const LOCAL_FETCHES_PRUNE_AT: usize = 4_096;

impl Worker {
    /// A worker with a validated configuration, an id unique within its Envoy and the
    /// wake queue it registered, if any.
    pub fn new(config: FilterConfig, worker_id: u64, wake_queue: Option<u32>) -> Self {
        let fetch_config = config.fetch_config();
        let max_tenants = config.cache.max_tenants;
        Self {
            slots: config.slots(),
            config: Arc::new(config),
            fetch_config,
            worker_id,
            wake_queue,
            fetches: HashMap::new(),
            callouts: HashMap::new(),
            companion_down_until_ms: 0,
            local_fetches: HashMap::new(),
            tick_period_ms: 0,
            delivered: HashMap::new(),
            pending_invalidations: Vec::new(),
            lease_ends: HashMap::new(),
            lease_end_retries: Vec::new(),
            hits: Arc::default(),
            debug_logging: None,
            misfit_warned: HashSet::new(),
            ready: ReadyTokens::new(config_ready_capacity(max_tenants)),
        }
    }

    /// What this worker holds for requests and callouts in flight.
    pub fn load(&self) -> WorkerLoad {
        WorkerLoad {
            fetches: self.fetches.len(),
            waiters: self.fetches.values().map(|fetch| fetch.waiters.len()).sum(),
            callouts: self.callouts.len(),
            delivered: self.delivered.len(),
            lease_end_retries: self.lease_end_retries.len(),
        }
    }

    /// The tally of cache hits, for the request contexts to report their end to.
    pub fn hits(&self) -> &Arc<HitTally> {
        &self.hits
    }

    /// The configuration in force.
    pub fn config(&self) -> &Arc<FilterConfig> {
        &self.config
    }

    /// A request for a token arrived: serve it from the cache or pause it on a fetch.
    /// `request_ids` reads the request's `x-request-id` and `traceparent`, only when
    /// needed: on a miss, or for a hit's debug line.
    pub fn on_request(
        &mut self,
        host: &mut impl Host,
        ask: TokenAsk,
        request_ids: impl FnOnce() -> RequestIds,
    ) -> Decision {
        let now_ms = host.now_ms();
        // A forced refresh is rate-limited like a purge; a refused one is served as usual.
        let force_refresh = ask.force_refresh && {
            let stale = self
                .cached(host, &ask.key, now_ms, None)
                .map_or(0, |entry| entry.token.expires_at_ms);
            self.claim_purge(host, &ask.key, now_ms, stale)
        };
        if !force_refresh {
            let served = match self.ready_lookup(host, &ask.key, now_ms) {
                Lookup::Ready(ready) => Some((ready.to_cached(), ready.refresh_at_ms)),
                Lookup::Miss => None,
                Lookup::Off => self
                    .cached(host, &ask.key, now_ms, None)
                    .map(|entry| (entry.token, entry.refresh_at_ms)),
            };
            if let Some((token, refresh_at_ms)) = served {
                let expires_at_ms = token.expires_at_ms;
                self.served(
                    host,
                    &ask.key,
                    now_ms,
                    (expires_at_ms, refresh_at_ms),
                    || request_ids().correlation_id,
                );
                return Decision::Cached(token);
            }
        }
        host.count(Metric::CacheMiss);
        self.pause(host, ask, force_refresh, request_ids(), now_ms);
        Decision::Pause
    }

    /// The hit path of a request that wants `key`'s token now, from this worker's own
    /// token cache: the token ready to serve, or `None` (a miss, or a host without
    /// generations), when the request goes to [`Worker::on_request`].
    /// `correlation_id` reads the request's `x-request-id`, only for a debug line.
    pub fn serve_ready(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        correlation_id: impl FnOnce() -> Option<String>,
    ) -> Option<Arc<ReadyToken>> {
        let now_ms = host.now_ms();
        let Lookup::Ready(ready) = self.ready_lookup(host, key, now_ms) else {
            return None;
        };
        let moments = (ready.expires_at_ms, ready.refresh_at_ms);
        self.served(host, key, now_ms, moments, correlation_id);
        Some(ready)
    }

    /// `key`'s servable token from this worker's own cache, refilled from the gateway
    /// cache when a write since made it stale (see [`crate::ready`] for the order).
    fn ready_lookup(&mut self, host: &impl Host, key: &TokenKey, now_ms: u64) -> Lookup {
        let Some(generation) = host.cache_generation(ready::bucket_of(key)) else {
            return Lookup::Off;
        };
        if let Some(ready) = self.ready.get(key, generation) {
            if ready.is_servable(now_ms) {
                return Lookup::Ready(Arc::clone(ready));
            }
        }
        match self.cached(host, key, now_ms, None) {
            Some(entry) => {
                let ready = Arc::new(ReadyToken::new(&entry));
                self.ready.keep(key, generation, Arc::clone(&ready));
                Lookup::Ready(ready)
            }
            None => {
                self.ready.forget(key);
                Lookup::Miss
            }
        }
    }

    /// A request was served `key`'s cached token, which expires and wants refreshing
    /// at `(expires_at_ms, refresh_at_ms)`: starts its refresh when due, counts the hit
    /// and writes the debug line.
    fn served(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        now_ms: u64,
        (expires_at_ms, refresh_at_ms): (u64, u64),
        correlation_id: impl FnOnce() -> Option<String>,
    ) {
        if now_ms >= refresh_at_ms {
            self.refresh_ahead(host, key, expires_at_ms, now_ms);
        }
        if let Some(hits) = self.hits.hit(now_ms) {
            host.add(Metric::CacheHit, hits);
        }
        if self.debug_logging(host, now_ms) {
            host.log(
                Level::Debug,
                &format!(
                    "token request {key} source=cache duration_ms=0 correlation_id={}",
                    correlation_id().as_deref().unwrap_or("-")
                ),
            );
        }
    }

    /// Whether the host writes debug lines, asked at most once per [`LOG_LEVEL_TTL_MS`].
    fn debug_logging(&mut self, host: &impl Host, now_ms: u64) -> bool {
        match self.debug_logging {
            Some((enabled, asked_at_ms))
                if now_ms.saturating_sub(asked_at_ms) < LOG_LEVEL_TTL_MS =>
            {
                enabled
            }
            _ => {
                let enabled = host.log_level() <= Level::Debug;
                self.debug_logging = Some((enabled, now_ms));
                enabled
            }
        }
    }

    /// The request `context_id` ended (answered, reset or finished): forget it.
    pub fn on_request_gone(&mut self, context_id: u32) {
        self.delivered.remove(&context_id);
        for fetch in self.fetches.values_mut() {
            fetch
                .waiters
                .retain(|waiter| waiter.context_id != context_id);
        }
    }

    /// The worker's timer fired: send what waits to be sent, start queued fetches,
    /// check on other workers' fetches and resume due backoffs.
    pub fn on_tick(&mut self, host: &mut impl Host) {
        if let Some(hits) = self.hits.take() {
            host.add(Metric::CacheHit, hits);
        }
        self.send_pending_invalidations(host);
        self.send_due_lease_ends(host);
        self.advance_fetches(host);
        self.schedule_tick(host);
    }

    /// Another worker finished a fetch this one waits on: check now instead of on the
    /// next poll.
    pub fn on_wake(&mut self, host: &mut impl Host) {
        self.check_peers(host);
        self.schedule_tick(host);
    }

    /// The answer to callout `callout_id` arrived.
    pub fn on_callout_response(
        &mut self,
        host: &mut impl Host,
        callout_id: u32,
        result: CalloutResult,
    ) {
        let Some((key, purpose)) = self.callouts.remove(&callout_id) else {
            return;
        };
        match purpose {
            Purpose::Lease => self.on_lease_response(host, key, result),
            Purpose::CompanionToken => self.on_token_response(host, key, result),
            Purpose::Fetch => self.on_fetch_response(host, &key, result),
            Purpose::Commit | Purpose::Abort => {
                self.on_lease_end_response(host, callout_id, &result);
            }
            Purpose::Invalidate => self.on_invalidate_response(host, &key, &result),
        }
        self.schedule_tick(host);
    }

    /// `key`'s local-mode fetch log, created if new; when the limiter holds many keys,
    /// the idle ones are dropped first.
    fn local_fetches_of(&mut self, key: &TokenKey, now_ms: u64) -> &mut FetchLog {
        if self.local_fetches.len() >= LOCAL_FETCHES_PRUNE_AT {
            self.local_fetches.retain(|_, log| !log.is_idle(now_ms));
        }
        self.local_fetches.entry(key.clone()).or_default()
    }

    /// Keeps the tick period at what the pending work needs: 1 ms while a fetch waits
    /// to start, a short poll while another worker fetches, until the earliest backoff
    /// ends otherwise, off when idle.
    fn schedule_tick(&mut self, host: &mut impl Host) {
        let now_ms = host.now_ms();
        let until = |at_ms: u64| {
            at_ms
                .saturating_sub(now_ms)
                .clamp(KICK_TICK_MS, MAX_TICK_MS)
        };
        let wanted = self
            .fetches
            .values()
            .filter_map(|fetch| match fetch.stage {
                Stage::Queued => Some(KICK_TICK_MS),
                Stage::WaitingOnPeer => Some(PEER_POLL_TICK_MS),
                Stage::Fetching {
                    wake_at_ms: Some(at),
                    ..
                } => Some(until(at)),
                _ => None,
            })
            .chain(
                self.lease_end_retries
                    .iter()
                    .map(|(at_ms, _)| until(*at_ms)),
            )
            .min()
            .or((!self.pending_invalidations.is_empty()).then_some(KICK_TICK_MS))
            .unwrap_or(0);
        if wanted != self.tick_period_ms {
            self.tick_period_ms = wanted;
            host.set_tick_period_ms(wanted);
        }
    }
}
