//! The per-worker brain of the filter: the token cache lookup, the in-flight fetches
//! of this worker, and the requests paused on each of them.
//!
//! Envoy runs one copy per worker thread (one root context each). Fetches collapse in
//! three tiers: requests of one worker that miss the cache for the same key wait on
//! one fetch (the `fetches` map); workers of one Envoy wait for the one that claimed
//! the key's in-flight marker in shared data ([`crate::inflight`]); Envoys wait for
//! the one holding the companion's Redis lock (the lease).
//!
//! All callouts leave from the root context (on a tick or in a callout answer), so no
//! answer is lost when the request that caused a fetch goes away. A key's fetch goes:
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

use std::collections::HashMap;
use std::rc::Rc;

use serde::Serialize;

use tokengate_core::cache::{
    CachedToken, GatewayEntry, PurgeRecord, refresh_moment, shared_data_key,
};
use tokengate_core::credentials::parse_rfc3339_ms;
use tokengate_core::lease::{
    ABORT_PATH, AbortRequest, COMMIT_PATH, CommitRequest, INVALIDATE_PATH, InvalidateRequest,
    LEASE_PATH, LeaseId, LeaseRequest, LeaseResponse,
};
use tokengate_core::token_api::{TOKEN_PATH, TokenResponse, TokenSource};
use tokengate_core::{
    CalloutResult, Destination, ErrorBody, ErrorCode, FetchConfig, FetchFlow, FetchedToken,
    OutboundRequest, Provider, SecretBytes, SecretString, Step, TenantId, TokenError, TokenKey,
};

use crate::config::{FetchBy, FilterConfig};
use crate::hits::HitTally;
use crate::host::{Callout, Host, Level, Metric};
use crate::inflight::{MAX_WAITERS, Marker, Peer, marker_key};

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

/// A request paused until its token is ready.
#[derive(Debug)]
struct Waiter {
    /// The request's context, to resume or answer it.
    context_id: u32,
    /// How to deliver the token.
    delivery: Delivery,
    /// Its `x-request-id`, for the log line and the error body.
    correlation_id: Option<String>,
    /// When it arrived, for the logged duration.
    arrived_ms: u64,
}

/// Where one key's fetch stands.
#[derive(Debug)]
enum Stage {
    /// Waiting for the next tick (callouts leave from the root context).
    Queued,
    /// Another worker of this Envoy fetches the key: watch the shared cache.
    WaitingOnPeer,
    /// The lease call is outstanding.
    Leasing,
    /// This worker runs the fetch.
    Fetching {
        /// The core state machine doing the fetch.
        flow: Box<FetchFlow>,
        /// The companion lease to commit or abort at the end; `None` in local mode.
        lease_id: Option<LeaseId>,
        /// When the flow waits on a backoff, the moment to poll it again.
        wake_at_ms: Option<u64>,
    },
}

#[derive(Debug)]
struct Fetch {
    stage: Stage,
    waiters: Vec<Waiter>,
    /// Skip the gateway and cluster caches (a waiter asked for `forceRefresh`).
    force_refresh: bool,
    /// Only a token expiring after this will do (a refresh-ahead: the cached token
    /// expires then).
    min_expires_at_ms: Option<u64>,
}

impl Fetch {
    fn new(min_expires_at_ms: Option<u64>) -> Self {
        Self {
            stage: Stage::Queued,
            waiters: Vec::new(),
            force_refresh: false,
            min_expires_at_ms,
        }
    }
}

/// Why a callout was sent, to route its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Lease,
    CompanionToken,
    Fetch,
    Commit,
    Abort,
    Invalidate,
}

/// A commit or abort of a lease: kept until answered, so that one lost to a companion
/// restart is sent once more instead of leaving the lock held until its TTL (other
/// gateways would wait that long).
#[derive(Debug)]
struct LeaseEnd {
    key: TokenKey,
    purpose: Purpose,
    path: &'static str,
    /// The request body (a commit carries the token).
    body: SecretBytes,
    /// Whether this is already the second attempt.
    retried: bool,
}

/// What a worker remembers of a key between its fetches (one map for both, as each map
/// type costs the module its own hash-table code).
#[derive(Debug, Clone, Copy, Default)]
struct KeyHistory {
    /// When the current one-minute window of local-mode fetches started.
    local_window_started_ms: u64,
    /// Local-mode fetches in that window, for the local limiter.
    local_fetches: u32,
    /// After a failed refresh-ahead, no new one for the key before this moment.
    refresh_retry_at_ms: u64,
}

impl KeyHistory {
    /// Whether it still matters at `now_ms` (a live window or a pending retry).
    fn is_current(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.local_window_started_ms) < LOCAL_WINDOW_MS
            || self.refresh_retry_at_ms > now_ms
    }
}

/// One worker's filter state; see the module documentation.
#[derive(Debug)]
pub struct Worker {
    config: Rc<FilterConfig>,
    fetch_config: FetchConfig,
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
    /// Local-mode windows and refresh-ahead retries, per key.
    history: HashMap<TokenKey, KeyHistory>,
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
    hits: Rc<HitTally>,
    /// Whether the host writes debug lines (the per-hit line is only built then), and
    /// when that was last asked.
    debug_logging: Option<(bool, u64)>,
}

/// Tick period while work waits for the root context.
const KICK_TICK_MS: u64 = 1;
/// Tick period while waiting for another worker's fetch: polls the shared cache, in
/// case the wake-up through the marker is missed (the owner gone, a lost race).
const PEER_POLL_TICK_MS: u64 = 1;
/// Attempts at a compare-and-swap write of a marker before giving up (waiting) or
/// writing unconditionally (releasing).
const MARKER_WRITE_ATTEMPTS: usize = 4;
/// How long the host's log level is trusted before it is asked again (a level changed
/// at run time shows in the per-hit lines within this long).
const LOG_LEVEL_TTL_MS: u64 = 1_000;
/// Longest tick period while a backoff is pending.
const MAX_TICK_MS: u64 = 1_000;
/// Length of the local limiter's window.
const LOCAL_WINDOW_MS: u64 = 60_000;
/// Beyond this many keys in the history, the entries no longer current are dropped.
const HISTORY_PRUNE_AT: usize = 4_096;
/// Pause after a failed refresh-ahead before the next one for the same key.
const REFRESH_RETRY_MS: u64 = 5_000;

impl Worker {
    /// A worker with a validated configuration, an id unique within its Envoy and the
    /// wake queue it registered, if any.
    pub fn new(config: FilterConfig, worker_id: u64, wake_queue: Option<u32>) -> Self {
        let fetch_config = config.fetch_config();
        Self {
            config: Rc::new(config),
            fetch_config,
            worker_id,
            wake_queue,
            fetches: HashMap::new(),
            callouts: HashMap::new(),
            companion_down_until_ms: 0,
            history: HashMap::new(),
            tick_period_ms: 0,
            delivered: HashMap::new(),
            pending_invalidations: Vec::new(),
            lease_ends: HashMap::new(),
            lease_end_retries: Vec::new(),
            hits: Rc::default(),
            debug_logging: None,
        }
    }

    /// The tally of cache hits, for the request contexts to report their end to.
    pub fn hits(&self) -> &Rc<HitTally> {
        &self.hits
    }

    /// The configuration in force.
    pub fn config(&self) -> &Rc<FilterConfig> {
        &self.config
    }

    /// A request for a token arrived: serve it from the cache or pause it on a fetch.
    /// `correlation_id` reads the request's `x-request-id` (for log lines and error
    /// bodies), only when needed: on a miss, or for a hit's debug line.
    pub fn on_request(
        &mut self,
        host: &mut impl Host,
        ask: TokenAsk,
        correlation_id: impl FnOnce() -> Option<String>,
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
            if let Some(entry) = self.cached(host, &ask.key, now_ms, None) {
                if entry.wants_refresh(now_ms) {
                    self.refresh_ahead(host, &ask.key, entry.token.expires_at_ms, now_ms);
                }
                if let Some(hits) = self.hits.hit(now_ms) {
                    host.add(Metric::CacheHit, hits);
                }
                if self.debug_logging(host, now_ms) {
                    host.log(
                        Level::Debug,
                        &format!(
                            "token request {} source=cache duration_ms=0 correlation_id={}",
                            ask.key,
                            correlation_id().as_deref().unwrap_or("-")
                        ),
                    );
                }
                return Decision::Cached(entry.token);
            }
        }
        host.count(Metric::CacheMiss);
        let waiter = Waiter {
            context_id: ask.context_id,
            delivery: ask.delivery,
            correlation_id: correlation_id(),
            arrived_ms: now_ms,
        };
        let fetch = self
            .fetches
            .entry(ask.key)
            .or_insert_with(|| Fetch::new(None));
        if !fetch.waiters.is_empty() {
            host.count(Metric::CollapsedWaiter);
        }
        if matches!(fetch.stage, Stage::Queued) {
            fetch.force_refresh |= force_refresh;
        }
        fetch.waiters.push(waiter);
        self.schedule_tick(host);
        Decision::Pause
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

    /// The upstream answered `status` to request `context_id`, which carried
    /// `injected` (its token when it came from the cache; `None` when the worker
    /// resumed it). A rejection status purges that token, at most once per key per
    /// `purge.minIntervalMs` on this Envoy.
    pub fn on_upstream_status(
        &mut self,
        host: &mut impl Host,
        context_id: u32,
        injected: Option<(TokenKey, CachedToken)>,
        status: u16,
    ) {
        let Some((key, token)) = injected.or_else(|| self.delivered.remove(&context_id)) else {
            return;
        };
        if !self.config.purge.statuses.contains(&status) {
            return;
        }
        let now_ms = host.now_ms();
        if !self.claim_purge(host, &key, now_ms, token.expires_at_ms) {
            return;
        }
        let still_cached = host
            .shared_get(&shared_data_key(&key))
            .and_then(|bytes| GatewayEntry::decode(&bytes))
            .is_some_and(|entry| entry.token.access_token == token.access_token);
        if still_cached {
            host.shared_set(&shared_data_key(&key), &[]);
        }
        host.count(Metric::Purge);
        host.log(
            Level::Warn,
            &format!("upstream answered {status} with the token of {key}: purged"),
        );
        self.pending_invalidations.push((key, token.access_token));
        self.schedule_tick(host);
    }

    /// Records a purge (or forced refresh) of `key`, whose current token expires at
    /// `stale_expires_at_ms`, unless one happened within `purge.minIntervalMs` on this
    /// Envoy: then it is counted as suppressed and refused.
    fn claim_purge(
        &self,
        host: &mut impl Host,
        key: &TokenKey,
        now_ms: u64,
        stale_expires_at_ms: u64,
    ) -> bool {
        let record_key = PurgeRecord::shared_data_key(key);
        let last = host
            .shared_get(&record_key)
            .and_then(|bytes| PurgeRecord::decode(&bytes));
        if last.is_some_and(|last| {
            now_ms.saturating_sub(last.purged_at_ms) < self.config.purge.min_interval_ms
        }) {
            host.count(Metric::PurgeSuppressed);
            return false;
        }
        let record = PurgeRecord {
            purged_at_ms: now_ms,
            stale_expires_at_ms,
        };
        host.shared_set(&record_key, &record.encode());
        true
    }

    /// The worker's timer fired: start queued fetches, check on other workers' fetches
    /// and resume due backoffs.
    pub fn on_tick(&mut self, host: &mut impl Host) {
        if let Some(hits) = self.hits.take() {
            host.add(Metric::CacheHit, hits);
        }
        for (key, token) in std::mem::take(&mut self.pending_invalidations) {
            self.send_invalidate(host, key, token);
        }
        let now_ms = host.now_ms();
        let (due, later) = std::mem::take(&mut self.lease_end_retries)
            .into_iter()
            .partition(|(at_ms, _)| *at_ms <= now_ms);
        self.lease_end_retries = later;
        for (_, lease_end) in due {
            self.send_lease_end(host, lease_end);
        }
        let ready: Vec<TokenKey> = self
            .fetches
            .iter()
            .filter(|(_, fetch)| match fetch.stage {
                Stage::Queued | Stage::WaitingOnPeer => true,
                Stage::Fetching {
                    wake_at_ms: Some(at),
                    ..
                } => at <= now_ms,
                _ => false,
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in ready {
            match self.fetches.get(&key).map(|fetch| &fetch.stage) {
                Some(Stage::Queued) => self.start(host, key),
                Some(Stage::WaitingOnPeer) => self.check_peer(host, key),
                Some(Stage::Fetching { .. }) => self.drive(host, &key),
                _ => {}
            }
        }
        self.schedule_tick(host);
    }

    /// Another worker finished a fetch this one waits on: check now instead of on the
    /// next poll.
    pub fn on_wake(&mut self, host: &mut impl Host) {
        let waiting: Vec<TokenKey> = self
            .fetches
            .iter()
            .filter(|(_, fetch)| matches!(fetch.stage, Stage::WaitingOnPeer))
            .map(|(key, _)| key.clone())
            .collect();
        for key in waiting {
            self.check_peer(host, key);
        }
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
            Purpose::Fetch => {
                if let Some(Fetch {
                    stage: Stage::Fetching { flow, .. },
                    ..
                }) = self.fetches.get_mut(&key)
                {
                    flow.handle_response(host.now_ms(), result);
                    self.drive(host, &key);
                }
            }
            Purpose::Commit | Purpose::Abort => {
                self.on_lease_end_response(host, callout_id, &result);
            }
            Purpose::Invalidate => {
                if !matches!(
                    result,
                    CalloutResult::Response {
                        status: 200..=299,
                        ..
                    }
                ) {
                    host.log(
                        Level::Warn,
                        &format!(
                            "companion invalidate for {key} failed: {}",
                            describe(&result)
                        ),
                    );
                }
            }
        }
        self.schedule_tick(host);
    }

    /// The gateway cache's token for `key` if it is fresh (and, with
    /// `newer_than_ms`, expires after that).
    fn cached(
        &self,
        host: &impl Host,
        key: &TokenKey,
        now_ms: u64,
        newer_than_ms: Option<u64>,
    ) -> Option<GatewayEntry> {
        let bytes = host.shared_get(&shared_data_key(key))?;
        GatewayEntry::decode(&bytes).filter(|entry| {
            entry.token.is_fresh(now_ms, self.config.expiry_margin_ms)
                && newer_than_ms.is_none_or(|newer_than| entry.token.expires_at_ms > newer_than)
        })
    }

    /// Starts one background refresh of `key`, whose cached token expires at
    /// `expires_at_ms`, unless one already runs on this worker or this Envoy.
    fn refresh_ahead(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        expires_at_ms: u64,
        now_ms: u64,
    ) {
        if self.fetches.contains_key(key)
            || self
                .history
                .get(key)
                .is_some_and(|history| now_ms < history.refresh_retry_at_ms)
            || self.peer_state(host, key, now_ms) == Peer::Busy
        {
            return;
        }
        host.count(Metric::RefreshAhead);
        self.fetches
            .insert(key.clone(), Fetch::new(Some(expires_at_ms)));
        self.schedule_tick(host);
    }

    /// The expiry a new token for `key` must beat: the refreshed token's, or the one
    /// an upstream rejected recently.
    fn newer_than(&self, host: &impl Host, key: &TokenKey, now_ms: u64) -> Option<u64> {
        let refreshing = self
            .fetches
            .get(key)
            .and_then(|fetch| fetch.min_expires_at_ms);
        let purged = host
            .shared_get(&PurgeRecord::shared_data_key(key))
            .and_then(|bytes| PurgeRecord::decode(&bytes))
            .filter(|record| record.stale_expires_at_ms > now_ms)
            .map(|record| record.stale_expires_at_ms);
        refreshing.max(purged)
    }

    fn peer_state(&self, host: &impl Host, key: &TokenKey, now_ms: u64) -> Peer {
        host.shared_get(&marker_key(key))
            .and_then(|bytes| Marker::decode(&bytes))
            .map_or(Peer::Free, |marker| {
                marker.peer_state(self.worker_id, now_ms)
            })
    }

    /// Starts a queued fetch: unless another worker of this Envoy already fetches the
    /// key, claim it and lease it from the companion (or fetch locally while the
    /// companion is known to be down).
    fn start(&mut self, host: &mut impl Host, key: TokenKey) {
        let now_ms = host.now_ms();
        let force_refresh = self
            .fetches
            .get(&key)
            .is_some_and(|fetch| fetch.force_refresh);
        let newer_than = self.newer_than(host, &key, now_ms);
        if !force_refresh {
            if let Some(entry) = self.cached(host, &key, now_ms, newer_than) {
                self.finish(
                    host,
                    &key,
                    Ok(token_of(entry.token, now_ms)),
                    TokenSource::Cache,
                );
                return;
            }
        }
        // A peer's recent failure is only handed to requests that waited on it; a new
        // request tries again.
        if self.peer_state(host, &key, now_ms) == Peer::Busy {
            return self.wait_on_peer(host, &key);
        }
        let claim_until = now_ms
            .saturating_add(self.config.companion.timeout_ms)
            .saturating_add(self.config.fetch_deadline_ms);
        host.shared_set(
            &marker_key(&key),
            &Marker::claim(self.worker_id, claim_until).encode(),
        );
        if self.peer_state(host, &key, now_ms) == Peer::Busy {
            // Another worker claimed it at the same moment and wrote last: it fetches.
            return self.wait_on_peer(host, &key);
        }
        // The companion hands out any token it holds that is still valid; ask for one
        // that outlives `expiryMarginMs`, which this gateway would inject.
        let usable_after = now_ms.saturating_add(self.config.expiry_margin_ms);
        let min_expires_at_ms = newer_than.max(Some(usable_after));
        if self.config.fetch == FetchBy::Companion {
            self.send_token_request(host, key, force_refresh, min_expires_at_ms);
        } else if now_ms < self.companion_down_until_ms {
            self.fetch_locally(host, key);
        } else {
            self.send_lease(host, key, force_refresh, min_expires_at_ms);
        }
    }

    fn wait_on_peer(&mut self, host: &mut impl Host, key: &TokenKey) {
        if let Some(fetch) = self.fetches.get_mut(key) {
            fetch.stage = Stage::WaitingOnPeer;
            host.count(Metric::CollapsedWaiter);
            self.ask_to_be_woken(host, key);
        }
    }

    /// Leaves this worker's wake queue in `key`'s marker while another worker holds it.
    /// Gives up quietly (the poll remains) when the marker keeps changing or is free.
    fn ask_to_be_woken(&self, host: &mut impl Host, key: &TokenKey) {
        let Some(queue) = self.wake_queue else { return };
        let now_ms = host.now_ms();
        let marker_key = marker_key(key);
        for _ in 0..MARKER_WRITE_ATTEMPTS {
            let Some((bytes, version)) = host.shared_get_versioned(&marker_key) else {
                return;
            };
            let Some(mut marker) = Marker::decode(&bytes) else {
                return;
            };
            if marker.peer_state(self.worker_id, now_ms) != Peer::Busy
                || marker.waiters.contains(&queue)
                || marker.waiters.len() >= MAX_WAITERS
            {
                return;
            }
            marker.waiters.push(queue);
            if host.shared_replace(&marker_key, &marker.encode(), version) {
                return;
            }
        }
    }

    /// Writes `released` over `key`'s marker and wakes the workers that asked to be.
    /// The write only succeeds on the version read, so a waiter that adds itself in
    /// between is not lost; after repeated races it is written anyway.
    fn release_marker(&self, host: &mut impl Host, key: &TokenKey, released: &Marker) {
        let marker_key = marker_key(key);
        let encoded = released.encode();
        let mut waiters = Vec::new();
        let mut written = false;
        for _ in 0..MARKER_WRITE_ATTEMPTS {
            let Some((bytes, version)) = host.shared_get_versioned(&marker_key) else {
                break;
            };
            waiters = Marker::decode(&bytes).map_or_else(Vec::new, |marker| marker.waiters);
            if host.shared_replace(&marker_key, &encoded, version) {
                written = true;
                break;
            }
        }
        if !written {
            host.shared_set(&marker_key, &encoded);
        }
        for queue in waiters {
            if Some(queue) != self.wake_queue {
                host.wake(queue);
            }
        }
    }

    /// Polled on tick while another worker fetches `key`.
    fn check_peer(&mut self, host: &mut impl Host, key: TokenKey) {
        let now_ms = host.now_ms();
        let newer_than = self.newer_than(host, &key, now_ms);
        if let Some(entry) = self.cached(host, &key, now_ms, newer_than) {
            return self.finish(
                host,
                &key,
                Ok(token_of(entry.token, now_ms)),
                TokenSource::Cache,
            );
        }
        match self.peer_state(host, &key, now_ms) {
            Peer::Busy => {}
            Peer::Failed(error) => self.finish(host, &key, Err(error), TokenSource::Fresh),
            // Released without a token we can use, or the owner is gone: fetch ourselves.
            Peer::Free => self.start(host, key),
        }
    }

    fn send_lease(
        &mut self,
        host: &mut impl Host,
        key: TokenKey,
        force_refresh: bool,
        min_expires_at_ms: Option<u64>,
    ) {
        let request = LeaseRequest {
            provider: key.provider,
            tenant_id: key.tenant_id.clone(),
            force_refresh,
            min_expires_at_ms,
        };
        let sent = serde_json::to_vec(&request)
            .map_err(|e| e.to_string())
            .and_then(|body| {
                host.dispatch(self.companion_callout(
                    LEASE_PATH,
                    &body,
                    self.config.companion.timeout_ms,
                ))
            });
        match sent {
            Ok(callout_id) => {
                self.callouts
                    .insert(callout_id, (key.clone(), Purpose::Lease));
                if let Some(fetch) = self.fetches.get_mut(&key) {
                    fetch.stage = Stage::Leasing;
                }
            }
            Err(reason) => self.companion_unreachable(host, key, &reason),
        }
    }

    fn companion_callout<'a>(
        &'a self,
        path: &'a str,
        body: &'a [u8],
        timeout_ms: u64,
    ) -> Callout<'a> {
        Callout {
            cluster: &self.config.companion.cluster,
            method: "POST",
            path,
            authority: &self.config.companion.authority,
            headers: match &self.config.companion.api_key {
                Some(key) => vec![
                    ("content-type", "application/json"),
                    (COMPANION_KEY_HEADER, key.expose()),
                ],
                None => vec![("content-type", "application/json")],
            },
            body: Some(body),
            timeout_ms,
        }
    }

    /// `fetch: companion`: asks the companion's `/auth/token` for the token.
    fn send_token_request(
        &mut self,
        host: &mut impl Host,
        key: TokenKey,
        force_refresh: bool,
        min_expires_at_ms: Option<u64>,
    ) {
        let body = serde_json::to_vec(&CompanionTokenRequest {
            tenant_id: &key.tenant_id,
            provider: key.provider,
            force_refresh,
            min_expires_at_ms,
        })
        .unwrap_or_default();
        let timeout_ms = self.config.companion.timeout_ms;
        match host.dispatch(self.companion_callout(TOKEN_PATH, &body, timeout_ms)) {
            Ok(callout_id) => {
                self.callouts
                    .insert(callout_id, (key.clone(), Purpose::CompanionToken));
                if let Some(fetch) = self.fetches.get_mut(&key) {
                    fetch.stage = Stage::Leasing;
                }
            }
            Err(reason) => {
                let error = companion_down(&reason);
                self.finish(host, &key, Err(error), TokenSource::Fresh);
            }
        }
    }

    fn on_token_response(&mut self, host: &mut impl Host, key: TokenKey, result: CalloutResult) {
        let now_ms = host.now_ms();
        let outcome = match &result {
            CalloutResult::Response {
                status: 200, body, ..
            } => match serde_json::from_slice::<TokenResponse>(body.expose()) {
                Ok(response) => {
                    let expires_at_ms =
                        parse_rfc3339_ms(&response.expires_at).unwrap_or_else(|| {
                            now_ms.saturating_add(
                                response
                                    .expires_in
                                    .max(0)
                                    .unsigned_abs()
                                    .saturating_mul(1000),
                            )
                        });
                    let token = FetchedToken {
                        access_token: response.access_token,
                        expires_in_secs: response.expires_in,
                        expires_at_ms,
                        cacheable: response.expires_in > 0,
                    };
                    Ok((token, response.source))
                }
                Err(_) => Err(companion_down("an unreadable token response")),
            },
            CalloutResult::Response { body, .. } => {
                Err(serde_json::from_slice::<ErrorBody>(body.expose())
                    .map(companion_error)
                    .unwrap_or_else(|_| companion_down(&describe(&result))))
            }
            CalloutResult::NoResponse => Err(companion_down("no answer")),
        };
        match outcome {
            Ok((token, source)) => self.finish(host, &key, Ok(token), source),
            Err(error) => self.finish(host, &key, Err(error), TokenSource::Fresh),
        }
    }

    fn on_lease_response(&mut self, host: &mut impl Host, key: TokenKey, result: CalloutResult) {
        let answer = match &result {
            CalloutResult::Response {
                status: 200, body, ..
            } => serde_json::from_slice::<LeaseResponse>(body.expose()).ok(),
            _ => None,
        };
        match answer {
            Some(LeaseResponse::Hit {
                access_token,
                expires_at_ms,
            }) => {
                host.count(Metric::ClusterCacheHit);
                let token = CachedToken {
                    access_token,
                    expires_at_ms,
                };
                self.finish(
                    host,
                    &key,
                    Ok(token_of(token, host.now_ms())),
                    TokenSource::Cache,
                );
            }
            Some(LeaseResponse::Fetch { lease_id, .. }) => {
                self.begin_fetch(host, key, Some(lease_id))
            }
            None => {
                // The companion's own errors (lock timeout, Redis and its limiter
                // refusing) come back as our JSON error body; anything else means the
                // companion itself could not be reached.
                let answered_error = match &result {
                    CalloutResult::Response { body, .. } => {
                        serde_json::from_slice::<ErrorBody>(body.expose()).ok()
                    }
                    CalloutResult::NoResponse => None,
                };
                match answered_error {
                    Some(error) => {
                        self.finish(host, &key, Err(companion_error(error)), TokenSource::Fresh);
                    }
                    None => self.companion_unreachable(host, key, &describe(&result)),
                }
            }
        }
    }

    /// The companion did not answer: remember it is down for a while and fetch locally.
    fn companion_unreachable(&mut self, host: &mut impl Host, key: TokenKey, reason: &str) {
        let now_ms = host.now_ms();
        if now_ms >= self.companion_down_until_ms {
            host.log(
                Level::Warn,
                &format!(
                    "companion unreachable ({reason}): fetching without it for {} ms",
                    self.config.companion.retry_after_ms
                ),
            );
        }
        self.companion_down_until_ms = now_ms.saturating_add(self.config.companion.retry_after_ms);
        self.fetch_locally(host, key);
    }

    /// Local mode: fetch without the companion, within the local limiter.
    fn fetch_locally(&mut self, host: &mut impl Host, key: TokenKey) {
        let now_ms = host.now_ms();
        let limit = self.config.companion.local_fetches_per_minute;
        let history = self.history_of(&key, now_ms);
        if now_ms.saturating_sub(history.local_window_started_ms) >= LOCAL_WINDOW_MS {
            history.local_window_started_ms = now_ms;
            history.local_fetches = 0;
        }
        if history.local_fetches >= limit {
            let error = TokenError::new(
                ErrorCode::CompanionUnavailable,
                format!(
                    "the token companion is unreachable and the local limit of {limit} fetches per minute for {key} is reached"
                ),
            );
            return self.finish(host, &key, Err(error), TokenSource::Fresh);
        }
        history.local_fetches += 1;
        host.count(Metric::CompanionFallback);
        self.begin_fetch(host, key, None);
    }

    /// `key`'s history, created if new; when the history is large, the entries no
    /// longer current are dropped first.
    fn history_of(&mut self, key: &TokenKey, now_ms: u64) -> &mut KeyHistory {
        if self.history.len() >= HISTORY_PRUNE_AT {
            self.history.retain(|_, history| history.is_current(now_ms));
        }
        self.history.entry(key.clone()).or_default()
    }

    fn begin_fetch(&mut self, host: &mut impl Host, key: TokenKey, lease_id: Option<LeaseId>) {
        if let Some(fetch) = self.fetches.get_mut(&key) {
            host.count(Metric::FetchStarted);
            let flow = Box::new(FetchFlow::new(key.clone(), &self.fetch_config));
            fetch.stage = Stage::Fetching {
                flow,
                lease_id,
                wake_at_ms: None,
            };
            self.drive(host, &key);
        } else if let Some(lease_id) = lease_id {
            // Every waiter left while leasing: hand the lock back at once.
            self.end_lease(host, &key, lease_id, None);
        }
    }

    /// Runs `key`'s flow until it waits for an answer, a timer or has finished.
    fn drive(&mut self, host: &mut impl Host, key: &TokenKey) {
        let now_ms = host.now_ms();
        let Some(Fetch {
            stage: Stage::Fetching {
                flow, wake_at_ms, ..
            },
            ..
        }) = self.fetches.get_mut(key)
        else {
            return;
        };
        *wake_at_ms = None;
        match flow.poll(now_ms) {
            Step::Send(request) => {
                let sent = self.send_fetch_request(host, &request);
                drop(request);
                match sent {
                    Ok(callout_id) => {
                        self.callouts
                            .insert(callout_id, (key.clone(), Purpose::Fetch));
                    }
                    Err(reason) => {
                        host.log(
                            Level::Error,
                            &format!("callout for {key} could not be sent: {reason}"),
                        );
                        if let Some(Fetch {
                            stage: Stage::Fetching { flow, .. },
                            ..
                        }) = self.fetches.get_mut(key)
                        {
                            flow.handle_response(now_ms, CalloutResult::NoResponse);
                        }
                        self.drive(host, key);
                    }
                }
            }
            Step::WaitUntil { at_ms, reason } => {
                host.log(
                    Level::Warn,
                    &format!(
                        "fetch for {key} backs off {} ms: {reason}",
                        at_ms.saturating_sub(now_ms)
                    ),
                );
                *wake_at_ms = Some(at_ms);
            }
            Step::AwaitResponse => {}
            Step::Done(result) => self.finish(host, key, result, TokenSource::Fresh),
        }
    }

    fn send_fetch_request(
        &self,
        host: &mut impl Host,
        request: &OutboundRequest,
    ) -> Result<u32, String> {
        let (cluster, authority) = match &request.destination {
            Destination::TenantService => (
                self.config.tenant_service.cluster.clone(),
                self.config.tenant_service.authority.as_str(),
            ),
            Destination::GenesysLogin { region, host } => {
                (self.config.login_cluster(region), host.as_str())
            }
        };
        let headers = request
            .headers
            .iter()
            .map(|(name, value)| (*name, value.expose()))
            .collect();
        let body = request.body.expose();
        host.dispatch(Callout {
            cluster: &cluster,
            method: request.method,
            path: &request.path,
            authority,
            headers,
            body: (!body.is_empty()).then_some(body),
            timeout_ms: request.timeout_ms,
        })
    }

    /// Ends `key`'s fetch: caches and commits a token or aborts the lease, releases
    /// the in-flight marker, then resumes or answers every waiting request.
    fn finish(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        result: Result<FetchedToken, TokenError>,
        source: TokenSource,
    ) {
        let Some(fetch) = self.fetches.remove(key) else {
            return;
        };
        let now_ms = host.now_ms();
        let fetched_here = matches!(fetch.stage, Stage::Fetching { .. });
        // This worker claimed the key's marker when it leased or fetched; a request
        // served from the shared cache or by another worker's fetch claimed nothing.
        let claimed = fetched_here || matches!(fetch.stage, Stage::Leasing);
        if let Stage::Fetching {
            lease_id: Some(lease_id),
            ..
        } = fetch.stage
        {
            self.end_lease(
                host,
                key,
                lease_id,
                result.as_ref().ok().filter(|token| token.cacheable),
            );
        }
        if claimed {
            if let Some(token) = result.as_ref().ok().filter(|token| token.cacheable) {
                let refresh = &self.config.refresh_ahead;
                let entry = GatewayEntry {
                    token: CachedToken {
                        access_token: token.access_token.clone(),
                        expires_at_ms: token.expires_at_ms,
                    },
                    refresh_at_ms: refresh_moment(
                        now_ms,
                        token.expires_at_ms,
                        refresh.percent,
                        refresh.min_lead_ms,
                    ),
                };
                host.shared_set(&shared_data_key(key), &entry.encode());
            }
            self.release_marker(host, key, &Marker::release(now_ms, result.as_ref().err()));
        }
        let token = match result {
            Ok(token) => {
                if fetched_here {
                    host.count(Metric::FetchSucceeded);
                }
                token
            }
            Err(error) => {
                host.count(Metric::FetchFailed(error.code));
                if fetch.min_expires_at_ms.is_some() {
                    // A failed refresh-ahead: the cached token still serves; try again later.
                    self.history_of(key, now_ms).refresh_retry_at_ms =
                        now_ms.saturating_add(REFRESH_RETRY_MS);
                }
                host.log(
                    Level::Error,
                    &format!("token request {key} failed: {error}"),
                );
                for waiter in fetch.waiters {
                    let body = error.to_body(
                        Some(key.tenant_id.as_str()),
                        waiter.correlation_id.as_deref(),
                    );
                    host.reply_json(waiter.context_id, error.http_status(), &body.to_json());
                }
                return;
            }
        };
        let source_name = if source == TokenSource::Fresh {
            "fresh"
        } else {
            "cache"
        };
        for waiter in fetch.waiters {
            let delivered = match waiter.delivery {
                Delivery::Inject => {
                    let bearer =
                        SecretString::new(format!("Bearer {}", token.access_token.expose()));
                    let resumed = host.resume_with_header(
                        waiter.context_id,
                        &self.config.authorization_header,
                        bearer.expose(),
                    );
                    if resumed && !self.config.purge.statuses.is_empty() {
                        let carried = CachedToken {
                            access_token: token.access_token.clone(),
                            expires_at_ms: token.expires_at_ms,
                        };
                        self.delivered
                            .insert(waiter.context_id, (key.clone(), carried));
                    }
                    resumed
                }
                Delivery::Respond => {
                    let response = TokenResponse::new(
                        token.access_token.clone(),
                        token.expires_at_ms,
                        now_ms,
                        source,
                    );
                    let body = SecretBytes::new(response.to_json());
                    host.reply_json(waiter.context_id, 200, body.expose())
                }
            };
            if delivered {
                host.log(
                    Level::Info,
                    &format!(
                        "token request {key} source={source_name} duration_ms={} correlation_id={}",
                        now_ms.saturating_sub(waiter.arrived_ms),
                        waiter.correlation_id.as_deref().unwrap_or("-")
                    ),
                );
            }
        }
    }

    /// Asks the companion to drop `token` from the cluster cache.
    fn send_invalidate(&mut self, host: &mut impl Host, key: TokenKey, token: SecretString) {
        let request = InvalidateRequest {
            provider: key.provider,
            tenant_id: key.tenant_id.clone(),
            access_token: Some(token),
        };
        let body = SecretBytes::new(serde_json::to_vec(&request).unwrap_or_default());
        let timeout_ms = self.config.tenant_service.timeout_ms;
        match host.dispatch(self.companion_callout(INVALIDATE_PATH, body.expose(), timeout_ms)) {
            Ok(callout_id) => {
                self.callouts.insert(callout_id, (key, Purpose::Invalidate));
            }
            Err(reason) => {
                host.log(
                    Level::Warn,
                    &format!("companion invalidate for {key} could not be sent: {reason}"),
                );
            }
        }
    }

    /// Commits a cacheable token to the companion, or aborts the lease.
    fn end_lease(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        lease_id: LeaseId,
        token: Option<&FetchedToken>,
    ) {
        let provider = key.provider;
        let tenant_id = key.tenant_id.clone();
        let (path, purpose, body) = match token {
            Some(token) => (
                COMMIT_PATH,
                Purpose::Commit,
                serde_json::to_vec(&CommitRequest {
                    provider,
                    tenant_id,
                    lease_id,
                    access_token: token.access_token.clone(),
                    expires_at_ms: token.expires_at_ms,
                }),
            ),
            None => (
                ABORT_PATH,
                Purpose::Abort,
                serde_json::to_vec(&AbortRequest {
                    provider,
                    tenant_id,
                    lease_id,
                }),
            ),
        };
        let lease_end = LeaseEnd {
            key: key.clone(),
            purpose,
            path,
            body: SecretBytes::new(body.unwrap_or_default()),
            retried: false,
        };
        self.send_lease_end(host, lease_end);
    }

    fn send_lease_end(&mut self, host: &mut impl Host, lease_end: LeaseEnd) {
        let sent = host.dispatch(self.companion_callout(
            lease_end.path,
            lease_end.body.expose(),
            self.config.tenant_service.timeout_ms,
        ));
        match sent {
            Ok(callout_id) => {
                self.callouts
                    .insert(callout_id, (lease_end.key.clone(), lease_end.purpose));
                self.lease_ends.insert(callout_id, lease_end);
            }
            Err(reason) => self.lease_end_lost(host, lease_end, &reason),
        }
    }

    /// A commit or abort was answered: done unless the companion never saw it (no
    /// answer, or a 5xx of a companion going away).
    fn on_lease_end_response(
        &mut self,
        host: &mut impl Host,
        callout_id: u32,
        result: &CalloutResult,
    ) {
        let Some(lease_end) = self.lease_ends.remove(&callout_id) else {
            return;
        };
        match result {
            CalloutResult::Response {
                status: 200..=299, ..
            } => {}
            CalloutResult::Response {
                status: 500..=599, ..
            }
            | CalloutResult::NoResponse => self.lease_end_lost(host, lease_end, &describe(result)),
            CalloutResult::Response { .. } => host.log(
                Level::Warn,
                &format!(
                    "companion {} for {} refused: {}",
                    lease_end.path,
                    lease_end.key,
                    describe(result)
                ),
            ),
        }
    }

    /// Schedules the one retry of a lost commit or abort, after `companion.retryAfterMs`.
    fn lease_end_lost(&mut self, host: &mut impl Host, mut lease_end: LeaseEnd, reason: &str) {
        let retry = !lease_end.retried;
        host.log(
            Level::Warn,
            &format!(
                "companion {} for {} failed: {reason}{}",
                lease_end.path,
                lease_end.key,
                if retry { "; sending it once more" } else { "" }
            ),
        );
        if retry {
            lease_end.retried = true;
            let at_ms = host
                .now_ms()
                .saturating_add(self.config.companion.retry_after_ms);
            self.lease_end_retries.push((at_ms, lease_end));
        }
    }

    /// Keeps the tick period at what the pending work needs: 1 ms while a fetch waits
    /// to start, a short poll while another worker fetches, until the earliest backoff
    /// ends otherwise, off when idle.
    fn schedule_tick(&mut self, host: &mut impl Host) {
        let now_ms = host.now_ms();
        let wanted = self
            .fetches
            .values()
            .filter_map(|fetch| match fetch.stage {
                Stage::Queued => Some(KICK_TICK_MS),
                Stage::WaitingOnPeer => Some(PEER_POLL_TICK_MS),
                Stage::Fetching {
                    wake_at_ms: Some(at),
                    ..
                } => Some(at.saturating_sub(now_ms).clamp(KICK_TICK_MS, MAX_TICK_MS)),
                _ => None,
            })
            .chain(self.lease_end_retries.iter().map(|(at_ms, _)| {
                at_ms
                    .saturating_sub(now_ms)
                    .clamp(KICK_TICK_MS, MAX_TICK_MS)
            }))
            .min()
            .or((!self.pending_invalidations.is_empty()).then_some(KICK_TICK_MS))
            .unwrap_or(0);
        if wanted != self.tick_period_ms {
            self.tick_period_ms = wanted;
            host.set_tick_period_ms(wanted);
        }
    }
}

/// The body of a `fetch: companion` request to the companion's `/auth/token`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CompanionTokenRequest<'a> {
    tenant_id: &'a TenantId,
    #[serde(rename = "type")]
    provider: Provider,
    force_refresh: bool,
    min_expires_at_ms: Option<u64>,
}

/// The header carrying the companion's internal API key.
const COMPANION_KEY_HEADER: &str = "x-tokengate-key";

/// `fetch: companion` has no local mode: an unreachable companion fails the request.
fn companion_down(reason: &str) -> TokenError {
    TokenError::new(
        ErrorCode::CompanionUnavailable,
        format!("the token companion, which fetches tokens for this gateway, failed: {reason}"),
    )
}

/// An error the companion answered, as the client will see it. The companion refusing
/// this filter's API key is a gateway misconfiguration, not the client's doing.
fn companion_error(error: ErrorBody) -> TokenError {
    if error.code == ErrorCode::Unauthorized {
        return TokenError::new(
            ErrorCode::CompanionUnavailable,
            "the token companion refused this gateway's companion.apiKey",
        );
    }
    TokenError::new(error.code, error.message)
}

/// A cached token as the result of a fetch, its lifetime counted from `now_ms`.
fn token_of(token: CachedToken, now_ms: u64) -> FetchedToken {
    let remaining_secs = token.expires_at_ms.saturating_sub(now_ms) / 1000;
    FetchedToken {
        access_token: token.access_token,
        expires_in_secs: i64::try_from(remaining_secs).unwrap_or(i64::MAX),
        expires_at_ms: token.expires_at_ms,
        cacheable: true,
    }
}

/// A short description of a callout result for logs (never its body).
fn describe(result: &CalloutResult) -> String {
    match result {
        CalloutResult::Response { status, .. } => format!("status {status}"),
        CalloutResult::NoResponse => "no answer".to_owned(),
    }
}
