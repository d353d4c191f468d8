//! One key's fetch on this worker, stage by stage (see the diagram in the worker's
//! documentation): the gateway cache, waiting on another worker of this Envoy,
//! refresh-ahead, local mode and its limiter, driving core's fetch flow, and the end
//! of a fetch, which hands its outcome to every request paused on it.

use tokengate_core::cache::{GatewayEntry, PurgeRecord, REFRESH_RETRY_MS};
use tokengate_core::lease::LeaseId;
use tokengate_core::limit::Admission;
use tokengate_core::token_api::TokenSource;
use tokengate_core::trace::TRACEPARENT_HEADER;
use tokengate_core::{
    CachedToken, CalloutResult, Destination, ErrorCode, FetchFlow, FetchedToken, OutboundRequest,
    Step, TokenError, TokenKey, Traceparent,
};

use super::{Delivery, RequestIds, TokenAsk, Worker};
use crate::config::FetchBy;
use crate::delivery;
use crate::host::{Callout, Host, Level, Metric, ProviderEvent};
use crate::inflight::{self, Marker, Peer};
use crate::slots::{Eviction, Slots, Table};

/// A request paused until its token is ready.
#[derive(Debug)]
pub(super) struct Waiter {
    /// The request's context, to resume or answer it.
    pub(super) context_id: u32,
    /// How to deliver the token.
    delivery: Delivery,
    /// Its `x-request-id`, for the log line and the error body.
    correlation_id: Option<String>,
    /// When it arrived, for the logged duration.
    arrived_ms: u64,
}

/// Where one key's fetch stands.
#[derive(Debug)]
pub(super) enum Stage {
    /// Waiting for the worker's next tick (callouts leave from the worker).
    Queued,
    /// Another worker of this Envoy fetches the key: watch the shared cache.
    WaitingOnPeer,
    /// The lease (or `fetch: companion` token) call is outstanding.
    Leasing {
        /// When it was sent: a token answered with only its `expiresIn` lives from then.
        sent_at_ms: u64,
    },
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

/// One key's fetch and the requests waiting on it.
#[derive(Debug)]
pub(super) struct Fetch {
    pub(super) stage: Stage,
    pub(super) waiters: Vec<Waiter>,
    /// Skip the gateway and cluster caches (a waiter asked for `forceRefresh`).
    pub(super) force_refresh: bool,
    /// Only a token expiring after this will do (a refresh-ahead: the cached token
    /// expires then).
    pub(super) min_expires_at_ms: Option<u64>,
    /// The trace context of the first request that waited on the fetch, carried by
    /// its callouts from then on (none for a refresh-ahead nobody waits on).
    pub(super) traceparent: Option<Traceparent>,
}

impl Fetch {
    fn new(min_expires_at_ms: Option<u64>) -> Self {
        Self {
            stage: Stage::Queued,
            waiters: Vec::new(),
            force_refresh: false,
            min_expires_at_ms,
            traceparent: None,
        }
    }
}

impl Worker {
    /// `event` of `key`'s provider, counted under the provider's name.
    fn provider_metric(&self, key: &TokenKey, event: ProviderEvent) -> Metric {
        let index = self
            .config
            .provider_table
            .iter()
            .position(|spec| spec.name == key.provider)
            .unwrap_or(usize::MAX);
        Metric::Provider(u16::try_from(index).unwrap_or(u16::MAX), event)
    }

    /// Pauses the request of `ask` on its key's fetch, starting one if none runs.
    pub(super) fn pause(
        &mut self,
        host: &mut impl Host,
        ask: TokenAsk,
        force_refresh: bool,
        request_ids: RequestIds,
        now_ms: u64,
    ) {
        let waiter = Waiter {
            context_id: ask.context_id,
            delivery: ask.delivery,
            correlation_id: request_ids.correlation_id,
            arrived_ms: now_ms,
        };
        let fetch = self
            .fetches
            .entry(ask.key)
            .or_insert_with(|| Fetch::new(None));
        if fetch.waiters.is_empty() {
            fetch.traceparent = request_ids.traceparent;
        } else {
            host.count(Metric::CollapsedWaiter);
        }
        if matches!(fetch.stage, Stage::Queued) {
            fetch.force_refresh |= force_refresh;
        }
        fetch.waiters.push(waiter);
        self.schedule_tick(host);
    }

    /// The gateway cache's token for `key` if it is fresh (and, with
    /// `newer_than_ms`, expires after that).
    pub(super) fn cached(
        &self,
        host: &impl Host,
        key: &TokenKey,
        now_ms: u64,
        newer_than_ms: Option<u64>,
    ) -> Option<GatewayEntry> {
        let found = self.slots.find(host, Table::Tokens, key)?;
        GatewayEntry::decode(&found.record).filter(|entry| {
            entry.is_servable(now_ms)
                && newer_than_ms.is_none_or(|newer_than| entry.token.expires_at_ms > newer_than)
        })
    }

    /// Starts one background refresh of `key`, whose cached token expires at
    /// `expires_at_ms`, unless one already runs on this worker or this Envoy.
    pub(super) fn refresh_ahead(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        expires_at_ms: u64,
        now_ms: u64,
    ) {
        if self.fetches.contains_key(key)
            || inflight::peer_state(host, &self.slots, key, self.worker_id, now_ms) == Peer::Busy
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
        let purged = self
            .slots
            .find(host, Table::Purges, key)
            .and_then(|found| PurgeRecord::decode(&found.record))
            .filter(|record| record.stale_expires_at_ms > now_ms)
            .map(|record| record.stale_expires_at_ms);
        refreshing.max(purged)
    }

    /// On a tick: starts queued fetches, checks on other workers' fetches and drives
    /// fetches whose backoff ended.
    pub(super) fn advance_fetches(&mut self, host: &mut impl Host) {
        let now_ms = host.now_ms();
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
        // In key order, not the map's random one: the same events take the same steps
        // (the simulation replays a seed exactly).
        let mut ready = ready;
        ready.sort_unstable_by(by_key_name);
        for key in ready {
            match self.fetches.get(&key).map(|fetch| &fetch.stage) {
                Some(Stage::Queued) => self.start(host, key),
                Some(Stage::WaitingOnPeer) => self.check_peer(host, key),
                Some(Stage::Fetching { .. }) => self.drive(host, &key),
                _ => {}
            }
        }
    }

    /// Checks every fetch this worker waits on another worker for.
    pub(super) fn check_peers(&mut self, host: &mut impl Host) {
        let waiting: Vec<TokenKey> = self
            .fetches
            .iter()
            .filter(|(_, fetch)| matches!(fetch.stage, Stage::WaitingOnPeer))
            .map(|(key, _)| key.clone())
            .collect();
        let mut waiting = waiting;
        waiting.sort_unstable_by(by_key_name);
        for key in waiting {
            self.check_peer(host, key);
        }
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
                let token = token_of(entry.token, now_ms);
                return self.finish(host, &key, Ok(token), TokenSource::Cache);
            }
        }
        // A failure that asking again cannot fix is answered from memory for a while
        // (unless the request forces a refresh); any other recent failure of a peer is
        // only handed to the requests that waited on it, and a new request tries again.
        if !force_refresh {
            if let Some(error) = inflight::cached_error(host, &self.slots, &key, now_ms) {
                host.count(Metric::NegativeCacheHit);
                return self.finish(host, &key, Err(error), TokenSource::Cache);
            }
        }
        if inflight::peer_state(host, &self.slots, &key, self.worker_id, now_ms) == Peer::Busy {
            return self.wait_on_peer(host, &key);
        }
        let claim_until = now_ms
            .saturating_add(self.config.companion.timeout_ms)
            .saturating_add(self.config.fetch_deadline_ms);
        if !inflight::claim(host, &self.slots, &key, self.worker_id, now_ms, claim_until) {
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
            if let Some(queue) = self.wake_queue {
                let now_ms = host.now_ms();
                inflight::ask_to_be_woken(host, &self.slots, key, self.worker_id, queue, now_ms);
            }
        }
    }

    /// Checks on another worker's fetch of `key`: its token, its error, or its end
    /// without either (then this worker fetches).
    fn check_peer(&mut self, host: &mut impl Host, key: TokenKey) {
        let now_ms = host.now_ms();
        let newer_than = self.newer_than(host, &key, now_ms);
        if let Some(entry) = self.cached(host, &key, now_ms, newer_than) {
            let token = token_of(entry.token, now_ms);
            return self.finish(host, &key, Ok(token), TokenSource::Cache);
        }
        match inflight::peer_state(host, &self.slots, &key, self.worker_id, now_ms) {
            Peer::Busy => {}
            Peer::Failed(error) => self.finish(host, &key, Err(error), TokenSource::Fresh),
            // Released without a token we can use, or the owner is gone: fetch ourselves.
            Peer::Free => self.start(host, key),
        }
    }

    /// Local mode: fetch without the companion, within the local limiter.
    pub(super) fn fetch_locally(&mut self, host: &mut impl Host, key: TokenKey) {
        let now_ms = host.now_ms();
        let per_minute = self.config.companion.local_fetches_per_minute;
        let admission = self
            .local_fetches_of(&key, now_ms)
            .admit(now_ms, per_minute);
        if let Admission::Refused { retry_after_ms } = admission {
            let error = TokenError::new(
                ErrorCode::CompanionUnavailable,
                format!(
                    "the token companion is unreachable and the local limit of {per_minute} fetches per minute for {key} is reached; the next is allowed in {} s",
                    retry_after_ms.div_ceil(1000)
                ),
            );
            return self.finish(host, &key, Err(error), TokenSource::Fresh);
        }
        host.count(Metric::CompanionFallback);
        self.begin_fetch(host, key, None);
    }

    /// Starts core's fetch flow for `key`, under companion lease `lease_id` (`None`:
    /// local mode).
    pub(super) fn begin_fetch(
        &mut self,
        host: &mut impl Host,
        key: TokenKey,
        lease_id: Option<LeaseId>,
    ) {
        let started = self.provider_metric(&key, ProviderEvent::FetchStarted);
        if let Some(fetch) = self.fetches.get_mut(&key) {
            host.count(Metric::FetchStarted);
            host.count(started);
            let flow = Box::new(FetchFlow::new(key.clone(), &self.fetch_config));
            fetch.stage = Stage::Fetching {
                flow,
                lease_id,
                wake_at_ms: None,
            };
            self.drive(host, &key);
        } else if let Some(lease_id) = lease_id {
            // Every waiter left while leasing: hand the lock back at once.
            self.end_lease(host, &key, lease_id, None, None, None);
        }
    }

    /// A Tenant Service or IdP callout of `key`'s flow was answered.
    pub(super) fn on_fetch_response(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        result: CalloutResult,
    ) {
        if let Some(Fetch {
            stage: Stage::Fetching { flow, .. },
            ..
        }) = self.fetches.get_mut(key)
        {
            flow.handle_response(host.now_ms(), result);
            self.drive(host, key);
        }
    }

    /// Runs `key`'s flow until it waits for an answer, a timer or has finished.
    fn drive(&mut self, host: &mut impl Host, key: &TokenKey) {
        loop {
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
                Step::Send(request) => match self.send_fetch_request(host, key, &request) {
                    Ok(callout_id) => {
                        self.callouts
                            .insert(callout_id, (key.clone(), super::Purpose::Fetch));
                        return;
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
                    }
                },
                Step::WaitUntil { at_ms, reason } => {
                    host.log(
                        Level::Warn,
                        &format!(
                            "fetch for {key} backs off {} ms: {reason}",
                            at_ms.saturating_sub(now_ms)
                        ),
                    );
                    *wake_at_ms = Some(at_ms);
                    return;
                }
                Step::AwaitResponse => return,
                Step::Done(result) => {
                    return self.finish(host, key, result, TokenSource::Fresh);
                }
            }
        }
    }

    /// Sends a Tenant Service or token endpoint call of `key`'s fetch, with the fetch's
    /// trace context.
    fn send_fetch_request(
        &self,
        host: &mut impl Host,
        key: &TokenKey,
        request: &OutboundRequest,
    ) -> Result<u32, String> {
        let traceparent = self.fetch_traceparent(key);
        let (cluster, authority) = match &request.destination {
            Destination::TenantService => (
                self.config.tenant_service.cluster.clone(),
                self.config.tenant_service.authority.as_str(),
            ),
            Destination::GenesysLogin { region, host } => {
                (self.config.login_cluster(region), host.as_str())
            }
            Destination::TokenEndpoint { provider, url } => {
                // Configuration load checked every allowed authority has a cluster.
                let Some(cluster) = self.config.token_endpoint_cluster(&url.authority) else {
                    return Err(format!(
                        "no Envoy cluster for {provider}'s token endpoint {}",
                        url.authority
                    ));
                };
                (cluster.to_owned(), url.authority.as_str())
            }
        };
        let headers = request
            .headers
            .iter()
            .map(|(name, value)| (*name, value.expose()))
            .chain(
                traceparent
                    .as_ref()
                    .map(|t| (TRACEPARENT_HEADER, t.as_str())),
            )
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

    /// The trace context the callouts of `key`'s fetch carry, if it has one.
    pub(super) fn fetch_traceparent(&self, key: &TokenKey) -> Option<Traceparent> {
        self.fetches.get(key)?.traceparent.clone()
    }

    /// Ends `key`'s fetch: caches and commits a token or aborts the lease, releases
    /// the in-flight marker, then resumes or answers every waiting request and writes
    /// one log line for the fetch.
    pub(super) fn finish(
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
        let claimed = fetched_here || matches!(fetch.stage, Stage::Leasing { .. });
        let cacheable = result.as_ref().ok().filter(|token| token.cacheable);
        if let Stage::Fetching {
            lease_id: Some(lease_id),
            ..
        } = fetch.stage
        {
            let failure = result.as_ref().err();
            let traceparent = fetch.traceparent.clone();
            self.end_lease(host, key, lease_id, cacheable, failure, traceparent);
        }
        if claimed {
            if let Some(token) = cacheable {
                let lifetimes = self.config.lifetimes();
                self.warn_if_lifetime_misfits(host, key, token.expires_at_ms, now_ms);
                let token = CachedToken {
                    access_token: token.access_token.clone(),
                    expires_at_ms: token.expires_at_ms,
                };
                // A token from the companion's cache may be near its end: its margin
                // is not fitted to what is left of it.
                let fetched_now = source == TokenSource::Fresh;
                let entry = lifetimes.entry(key, token, now_ms, fetched_now);
                let worth = |record: &[u8]| token_worth(record, now_ms);
                let record = entry.encode();
                let slots = self.slots;
                let placed = slots.put(host, Table::Tokens, key, &record, worth, Eviction::Allowed);
                if placed.is_ok_and(|placed| placed.evicted) {
                    host.count(Metric::CacheEvicted);
                }
            }
            let released =
                Marker::release(now_ms, result.as_ref().err(), self.config.negative_cache_ms);
            let me = self.worker_id;
            inflight::release(host, &self.slots, key, me, &released, self.wake_queue);
        }
        let first = fetch.waiters.first();
        let duration_ms = first.map_or(0, |waiter| now_ms.saturating_sub(waiter.arrived_ms));
        let correlation_id = first
            .and_then(|waiter| waiter.correlation_id.clone())
            .unwrap_or_else(|| "-".to_owned());
        let token = match result {
            Ok(token) => token,
            Err(error) => {
                host.count(Metric::FetchFailed(error.code));
                host.count(self.provider_metric(key, ProviderEvent::FetchFailed));
                if let Some(stale_expires_at_ms) = fetch.min_expires_at_ms {
                    // A failed refresh-ahead: the cached token still serves; every worker
                    // tries again at the same later moment.
                    let retry_at_ms = now_ms.saturating_add(REFRESH_RETRY_MS);
                    postpone_refresh(host, &self.slots, key, stale_expires_at_ms, retry_at_ms);
                }
                host.log(
                    Level::Error,
                    &format!(
                        "token request {key} failed: {error} waiters={} duration_ms={duration_ms} correlation_id={correlation_id}",
                        fetch.waiters.len()
                    ),
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
        if fetched_here {
            host.count(Metric::FetchSucceeded);
            host.count(self.provider_metric(key, ProviderEvent::FetchSucceeded));
        }
        let token = CachedToken {
            access_token: token.access_token,
            expires_at_ms: token.expires_at_ms,
        };
        let delivered = fetch
            .waiters
            .iter()
            .filter(|waiter| self.deliver(host, key, &token, waiter, now_ms, source))
            .count();
        let source_name = match source {
            TokenSource::Fresh => "fresh",
            TokenSource::Cache => "cache",
        };
        host.log(
            Level::Info,
            &format!(
                "token request {key} source={source_name} duration_ms={duration_ms} waiters={delivered} correlation_id={correlation_id}"
            ),
        );
    }

    /// Warns, once per provider on this worker, when a token of `key`'s provider lives
    /// too short for `expiryMarginMs` or `refreshAhead.minLeadMs`, which core then cuts
    /// to fit (see [`tokengate_core::cache::Lifetimes`]).
    fn warn_if_lifetime_misfits(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        expires_at_ms: u64,
        now_ms: u64,
    ) {
        let lifetime_ms = expires_at_ms.saturating_sub(now_ms);
        let lifetimes = self.config.lifetimes();
        if !lifetimes.capped(lifetime_ms) || !self.misfit_warned.insert(key.provider.clone()) {
            return;
        }
        host.log(
            Level::Warn,
            &format!(
                "provider {} issues tokens that live {} ms (tenant {}): expiryMarginMs {} and refreshAhead.minLeadMs {} do not fit; this token is served until {} ms before it expires and refreshed in its last {} ms (at most a quarter and a half of its life)",
                key.provider,
                lifetime_ms,
                key.tenant_id,
                lifetimes.expiry_margin_ms,
                lifetimes.min_lead_ms,
                lifetimes.margin_ms(lifetime_ms),
                lifetimes.lead_ms(lifetime_ms),
            ),
        );
    }

    /// Resumes (inject mode) or answers (endpoint mode) `waiter` with `token`; false
    /// when the request is gone.
    fn deliver(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        token: &CachedToken,
        waiter: &Waiter,
        now_ms: u64,
        source: TokenSource,
    ) -> bool {
        match waiter.delivery {
            Delivery::Inject => {
                let header = &self.config.authorization_header;
                let resumed = host.resume_with_header(
                    waiter.context_id,
                    header,
                    delivery::bearer(token).expose(),
                );
                if resumed && !self.config.purge.statuses.is_empty() {
                    self.delivered
                        .insert(waiter.context_id, (key.clone(), token.clone()));
                }
                resumed
            }
            Delivery::Respond => {
                let body = delivery::token_response(token, now_ms, source);
                host.reply_json(waiter.context_id, 200, body.expose())
            }
        }
    }
}

/// Moves the refresh moment of `key`'s cached token, which expires at
/// `stale_expires_at_ms`, to `retry_at_ms`, in the shared entry that every worker of
/// this Envoy reads, so they all wait for the same retry. Nothing is written when the
/// entry holds another token by now (purged, or replaced by a newer one).
fn postpone_refresh(
    host: &mut impl Host,
    slots: &Slots,
    key: &TokenKey,
    stale_expires_at_ms: u64,
    retry_at_ms: u64,
) {
    for _ in 0..ENTRY_WRITE_ATTEMPTS {
        let Some(found) = slots.find(host, Table::Tokens, key) else {
            return;
        };
        let Some(mut entry) = GatewayEntry::decode(&found.record) else {
            return;
        };
        if entry.token.expires_at_ms != stale_expires_at_ms {
            return;
        }
        entry.refresh_at_ms = retry_at_ms;
        if slots.replace(host, &found, key, &entry.encode()) {
            return;
        }
    }
}

/// What another key's cached token is worth keeping at `now_ms`, when a new token
/// needs its slot: nothing once it can no longer be served, else the later it expires
/// the more.
fn token_worth(record: &[u8], now_ms: u64) -> u64 {
    GatewayEntry::decode(record)
        .filter(|entry| entry.token.is_fresh(now_ms, 0))
        .map_or(0, |entry| entry.token.expires_at_ms)
}

/// Orders keys by provider, then tenant.
fn by_key_name(a: &TokenKey, b: &TokenKey) -> std::cmp::Ordering {
    (a.provider.as_str(), a.tenant_id.as_str()).cmp(&(b.provider.as_str(), b.tenant_id.as_str()))
}

/// Attempts at a compare-and-swap write of a cache entry before giving up.
const ENTRY_WRITE_ATTEMPTS: usize = 4;

/// A cached token as the result of a fetch, its lifetime counted from `now_ms`.
pub(super) fn token_of(token: CachedToken, now_ms: u64) -> FetchedToken {
    let remaining_secs = token.expires_at_ms.saturating_sub(now_ms) / 1000;
    FetchedToken {
        access_token: token.access_token,
        expires_in_secs: i64::try_from(remaining_secs).unwrap_or(i64::MAX),
        expires_at_ms: token.expires_at_ms,
        cacheable: true,
    }
}
