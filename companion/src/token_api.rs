//! The original service's token API, served natively: `POST /auth/token` with
//! `{"tenantId","type","forceRefresh"}`, and the legacy `GET /auth/token` with the
//! tenant in `x-tenant-id` and the type in `X-Credential-Type` (Genesys when absent).
//! Answers core's [`TokenResponse`] (`accessToken, expiresIn, tokenType, source,
//! expiresAt`) or core's error body. No shared secret: this is the API clients used.
//!
//! A request goes through the same lease as the filter's, so the Redis cache, the
//! cluster-wide lock, the waits and degraded mode apply alike:
//!
//! - `hit` (a cached token, or the commit of a fetch this lease waited for): answered
//!   with `source: "cache"`;
//! - `fetch`: the companion itself holds the lock and runs core's fetch flow
//!   ([`crate::fetch`]); a cacheable token is committed (stored, lock released,
//!   waiters woken), anything else aborts the lease; answered with `source: "fresh"` or
//!   the fetch's error.
//!
//! `forceRefresh` skips the cached token (the lease then fetches, or waits for a fetch
//! already running and takes its newer token), at most once per
//! `--min-refresh-interval-ms` per (provider, tenant): core's [`RefreshThrottle`], the
//! filter's rule, over the companion's clock. A forced refresh sooner than that after
//! the last admitted one is served as a normal request (from the cache when a token is
//! cached), so a client looping `forceRefresh` cannot cause one OAuth call per request.
//!
//! The fetch runs in a task of its own: a client that goes away does not cancel it, so
//! the lock always ends in a commit or an abort. At shutdown, fetches still running
//! near the end of `--shutdown-timeout-ms` abort their lease and answer 503.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokengate_core::lease::{AbortRequest, CommitRequest, FetchFailure, LeaseId, LeaseResponse};
use tokengate_core::limit::RefreshThrottle;
use tokengate_core::token_api::{
    CREDENTIAL_TYPE_HEADER, TOKEN_PATH, TokenRequest, TokenResponse, TokenSource,
};
use tokengate_core::{FetchedToken, TokenKey};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::clock::Clock;
use crate::correlation;
use crate::error::ApiError;
use crate::fetch::Fetcher;
use crate::lease::Service;
use crate::metrics::{Metrics, TokenOutcome};

/// Header naming the tenant in the legacy `GET /auth/token`.
pub const TENANT_HEADER: &str = "x-tenant-id";

/// Most keys whose last forced refresh is remembered; when a new key finds the map
/// full, entries older than the interval are dropped (and all of them if that is not
/// enough, which at worst admits one more forced refresh per key).
pub const MAX_REFRESH_KEYS: usize = 10_000;

/// The forced-refresh throttle's state: when each key's last forced refresh was admitted.
#[derive(Debug)]
pub struct ForcedRefreshes {
    /// Core's rule: one forced refresh per key per `min_interval_ms`.
    throttle: RefreshThrottle,
    /// Key -> wall-clock time (ms) of its last admitted forced refresh.
    last_ms: Mutex<HashMap<TokenKey, u64>>,
}

impl ForcedRefreshes {
    /// Admits one forced refresh per key per `min_interval_ms` (0 admits every one).
    pub fn new(min_interval_ms: u64) -> Self {
        Self {
            throttle: RefreshThrottle { min_interval_ms },
            last_ms: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a forced refresh of `key` at `now_ms` may skip the cache; if so, it is
    /// recorded as the key's last.
    pub fn admit(&self, key: &TokenKey, now_ms: u64) -> bool {
        // Every update leaves the map consistent, so a panic elsewhere cannot corrupt it.
        let mut last_ms = self
            .last_ms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !self.throttle.admits(last_ms.get(key).copied(), now_ms) {
            return false;
        }
        if last_ms.len() >= MAX_REFRESH_KEYS && !last_ms.contains_key(key) {
            last_ms.retain(|_, last| !self.throttle.admits(Some(*last), now_ms));
            if last_ms.len() >= MAX_REFRESH_KEYS {
                last_ms.clear();
            }
        }
        last_ms.insert(key.clone(), now_ms);
        true
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.last_ms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Serves `/auth/token`.
#[derive(Debug)]
pub struct TokenApi {
    /// The lease logic shared with the internal API (cache, lock, waits, degraded mode).
    service: Arc<Service>,
    /// Runs core's fetch flow over HTTP.
    fetcher: Fetcher,
    /// Computes `expiresIn` of the answers.
    clock: Arc<dyn Clock>,
    /// Counts requests by outcome.
    metrics: Arc<Metrics>,
    /// Turns `true` near the end of the shutdown bound: running fetches give up and
    /// release their lock.
    cancel: watch::Receiver<bool>,
    /// Counts the fetch tasks still running, so shutdown can wait for them.
    tasks: TaskCounter,
    /// Lets one forced refresh per key per `--min-refresh-interval-ms` skip the cache.
    refreshes: ForcedRefreshes,
}

impl TokenApi {
    /// The token API over `service`, fetching with `fetcher`.
    pub fn new(
        service: Arc<Service>,
        fetcher: Fetcher,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        cancel: watch::Receiver<bool>,
        tasks: TaskCounter,
        refreshes: ForcedRefreshes,
    ) -> Self {
        Self {
            service,
            fetcher,
            clock,
            metrics,
            cancel,
            tasks,
            refreshes,
        }
    }

    /// Answers one token request; logs and counts its outcome.
    pub async fn token(self: &Arc<Self>, request: TokenRequest) -> Result<TokenResponse, ApiError> {
        let started = Instant::now();
        let key = request.key.clone();
        let force_refresh = request.force_refresh;
        let result = self.serve(request).await;
        let took = started.elapsed();
        let took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let (provider, tenant) = (key.provider.as_str(), key.tenant_id.as_str());
        match &result {
            Ok(response) => {
                let outcome = match response.source {
                    TokenSource::Cache => TokenOutcome::Cache,
                    TokenSource::Fresh => TokenOutcome::Fresh,
                };
                self.metrics.token_request(outcome, took);
                tracing::info!(
                    provider,
                    tenant,
                    force_refresh,
                    source = outcome.as_str(),
                    expires_in_secs = response.expires_in,
                    took_ms,
                    "token request"
                );
            }
            Err(error) => {
                self.metrics.token_request(TokenOutcome::Error, took);
                tracing::warn!(
                    provider,
                    tenant,
                    force_refresh,
                    code = error.code().as_str(),
                    took_ms,
                    %error,
                    "token request failed"
                );
            }
        }
        result
    }

    async fn serve(self: &Arc<Self>, request: TokenRequest) -> Result<TokenResponse, ApiError> {
        let key = request.key;
        let force_refresh =
            request.force_refresh && self.refreshes.admit(&key, self.clock.now_ms());
        if request.force_refresh && !force_refresh {
            tracing::info!(
                provider = key.provider.as_str(),
                tenant = key.tenant_id.as_str(),
                "forced refresh within --min-refresh-interval-ms of the last one: served as a normal request"
            );
        }
        match self
            .service
            .lease(key.clone(), force_refresh, request.min_expires_at_ms)
            .await?
        {
            LeaseResponse::Hit {
                access_token,
                expires_at_ms,
            } => Ok(TokenResponse::new(
                access_token,
                expires_at_ms,
                self.clock.now_ms(),
                TokenSource::Cache,
            )),
            LeaseResponse::Fetch { lease_id, .. } => {
                let api = Arc::clone(self);
                let guard = self.tasks.enter();
                // A task of its own: it takes the request's trace context along.
                let traceparent = correlation::traceparent();
                let fetch = async move {
                    let _running = guard;
                    let fetched = api.fetch_and_end_lease(key, lease_id);
                    correlation::with_traceparent(traceparent, fetched).await
                };
                tokio::spawn(fetch.in_current_span())
                    .await
                    .map_err(|error| {
                        ApiError::Internal(format!("the fetch task failed: {error}"))
                    })?
            }
        }
    }

    /// Fetches under the lease, then commits (cacheable token) or aborts it.
    async fn fetch_and_end_lease(
        &self,
        key: TokenKey,
        lease_id: LeaseId,
    ) -> Result<TokenResponse, ApiError> {
        let mut cancel = self.cancel.clone();
        let cancelled = async move {
            // A dropped sender means no shutdown will ever ask: wait forever.
            if cancel.wait_for(|cancel| *cancel).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let fetched = tokio::select! {
            fetched = self.fetcher.fetch(key.clone()) => Some(fetched),
            () = cancelled => None,
        };
        match fetched {
            Some(Ok(token)) if token.cacheable => {
                self.commit(&key, lease_id, &token).await;
                Ok(self.fresh(token))
            }
            Some(Ok(token)) => {
                // A WhatsApp token at the end of its life: served once, never cached.
                self.abort(&key, lease_id, None).await;
                Ok(self.fresh(token))
            }
            Some(Err(error)) => {
                self.abort(&key, lease_id, FetchFailure::of(&error)).await;
                Err(ApiError::Fetch { key, error })
            }
            None => {
                tracing::warn!(
                    provider = key.provider.as_str(),
                    tenant = key.tenant_id.as_str(),
                    "shutting down: the fetch gives up and releases its lock"
                );
                self.abort(&key, lease_id, None).await;
                Err(ApiError::ShuttingDown { key })
            }
        }
    }

    fn fresh(&self, token: FetchedToken) -> TokenResponse {
        TokenResponse::new(
            token.access_token,
            token.expires_at_ms,
            self.clock.now_ms(),
            TokenSource::Fresh,
        )
    }

    /// Commits the token; a failure (Redis) is logged: the client still gets its token,
    /// the lock expires at its TTL.
    async fn commit(&self, key: &TokenKey, lease_id: LeaseId, token: &FetchedToken) {
        let commit = CommitRequest {
            provider: key.provider.clone(),
            tenant_id: key.tenant_id.clone(),
            lease_id,
            access_token: token.access_token.clone(),
            expires_at_ms: token.expires_at_ms,
        };
        if let Err(error) = self.service.commit(commit).await {
            tracing::warn!(
                provider = key.provider.as_str(),
                tenant = key.tenant_id.as_str(),
                %error,
                "the fetched token could not be cached; it is answered anyway"
            );
        }
    }

    /// Aborts the lease, reporting `failure` (which the key's leases are then answered
    /// for `--negative-cache-ms`); a failure of the abort itself (Redis) is logged: the
    /// lock expires at its TTL.
    async fn abort(&self, key: &TokenKey, lease_id: LeaseId, failure: Option<FetchFailure>) {
        let abort = AbortRequest {
            provider: key.provider.clone(),
            tenant_id: key.tenant_id.clone(),
            lease_id,
            error: failure,
        };
        if let Err(error) = self.service.abort(abort).await {
            tracing::warn!(
                provider = key.provider.as_str(),
                tenant = key.tenant_id.as_str(),
                %error,
                "the lease could not be aborted; its lock expires at its TTL"
            );
        }
    }
}

/// The token API's routes: `POST` and `GET` on `/auth/token`.
pub fn router(api: Arc<TokenApi>) -> Router {
    Router::new()
        .route(TOKEN_PATH, post(post_token).get(get_token))
        .with_state(api)
}

async fn post_token(State(api): State<Arc<TokenApi>>, body: Bytes) -> Result<Response, ApiError> {
    let request = TokenRequest::from_json(&body, api.fetcher.providers())
        .map_err(|error| ApiError::InvalidRequest(error.message))?;
    api.token(request).await.map(token_response)
}

async fn get_token(
    State(api): State<Arc<TokenApi>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let text = |name: &str| -> Result<Option<&str>, ApiError> {
        headers
            .get(name)
            .map(|value| {
                value
                    .to_str()
                    .map_err(|_| ApiError::InvalidRequest(format!("{name} is not visible ASCII")))
            })
            .transpose()
    };
    let request = TokenRequest::from_headers(
        text(TENANT_HEADER)?,
        text(CREDENTIAL_TYPE_HEADER)?,
        api.fetcher.providers(),
    )
    .map_err(|error| ApiError::InvalidRequest(error.message))?;
    api.token(request).await.map(token_response)
}

/// The JSON answer, never stored by caches on the way.
fn token_response(response: TokenResponse) -> Response {
    let mut response = Json(response).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Counts running tasks; [`TaskCounter::idle`] completes when none runs.
#[derive(Debug, Clone)]
pub struct TaskCounter(Arc<watch::Sender<usize>>);

impl Default for TaskCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl TaskCounter {
    /// No task running.
    pub fn new() -> Self {
        Self(Arc::new(watch::Sender::new(0)))
    }

    /// Counts one more task until the guard is dropped.
    pub fn enter(&self) -> TaskGuard {
        self.0.send_modify(|running| *running += 1);
        TaskGuard(Arc::clone(&self.0))
    }

    /// How many tasks run now.
    pub fn running(&self) -> usize {
        *self.0.borrow()
    }

    /// Completes once no task runs.
    pub async fn idle(&self) {
        let mut running = self.0.subscribe();
        // The sender lives in `self`: the wait cannot fail.
        let _ = running.wait_for(|running| *running == 0).await;
    }
}

/// Keeps a task counted in its [`TaskCounter`] while alive.
#[derive(Debug)]
pub struct TaskGuard(Arc<watch::Sender<usize>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0
            .send_modify(|running| *running = running.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengate_core::{Provider, TenantId};

    fn key(tenant: &str) -> TokenKey {
        TokenKey::new(Provider::genesys(), TenantId::parse(tenant).unwrap())
    }

    #[test]
    fn one_forced_refresh_per_key_per_interval() {
        let refreshes = ForcedRefreshes::new(10_000);
        let (acme, globex) = (key("acme"), key("globex"));
        assert!(refreshes.admit(&acme, 1_000));
        assert!(!refreshes.admit(&acme, 10_999), "within the interval");
        assert!(refreshes.admit(&globex, 10_999), "another key");
        assert!(
            refreshes.admit(&acme, 11_000),
            "a refused one does not count"
        );
        assert!(!refreshes.admit(&acme, 20_999));

        let unthrottled = ForcedRefreshes::new(0);
        assert!(unthrottled.admit(&acme, 5));
        assert!(unthrottled.admit(&acme, 5));
    }

    #[test]
    fn the_map_stays_bounded() {
        let refreshes = ForcedRefreshes::new(10_000);
        for n in 0..MAX_REFRESH_KEYS {
            assert!(refreshes.admit(&key(&format!("old-{n}")), 0));
        }
        assert_eq!(refreshes.len(), MAX_REFRESH_KEYS);
        let late = key("late");
        assert!(refreshes.admit(&late, 10_000));
        assert_eq!(
            refreshes.len(),
            1,
            "entries older than the interval dropped"
        );

        for n in 1..MAX_REFRESH_KEYS {
            assert!(refreshes.admit(&key(&format!("busy-{n}")), 10_000));
        }
        assert!(refreshes.admit(&key("one-more"), 10_001));
        assert_eq!(refreshes.len(), 1, "all recent: the map is emptied");
        assert!(
            refreshes.admit(&late, 10_002),
            "the worst case: one more refresh"
        );
    }
}
