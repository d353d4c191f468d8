//! The lease logic behind `POST /v1/lease`, `/v1/commit`, `/v1/abort` and
//! `/v1/invalidate`.
//!
//! While Redis is healthy (see [`crate::health`]), a lease is answered, in order:
//!
//! 1. `hit` if Redis holds a token that is still usable (valid beyond
//!    [`USABLE_MARGIN_MS`]), answered from this process's copy of it when it has a
//!    fresh one (see [`crate::hot`]);
//! 2. `fetch` if the lease takes the key's lock (set if absent, for the lock TTL): the
//!    caller fetches, then commits or aborts. Steps 1 and 2 are one atomic script, so a commit cannot slip
//!    between them and cause a second fetch;
//! 3. otherwise it waits (see [`crate::waits`]) for the holder: a commit answers it
//!    `hit`, a freed lock (abort or expiry) sends it back to step 1, and the end of the
//!    wait budget answers `503 LOCK_ACQUISITION_FAILED`.
//!
//! Between steps 1 and 2, a key whose last fetch failed with rejected or missing
//! credentials within `--negative-cache-ms` (the holder's abort said so) is answered
//! that fetch's error, with its status, code and message, instead of the lock
//! (negative caching): every gateway asking gets the same answer and the IdP no call.
//!
//! A lease with `forceRefresh` skips step 1 for the token cached when it arrives, and
//! clears the key's cached failure (see [`Service::lease`]).
//!
//! While Redis is unhealthy, or (on a Redis Cluster) the key's shard is down, or a Redis
//! operation of the lease fails for want of Redis (refused, timed out, `CLUSTERDOWN`,
//! `TRYAGAIN`, redirections that do not settle), the lease bypasses Redis and is
//! answered without it: `hit` with the token this companion last served or saw
//! committed for the key, if still usable (see [`crate::stale`]), else in degraded mode
//! (see [`crate::degraded`]): `fetch` with a `local-` lease id if the in-memory
//! limiter admits it, the commit of another local fetch of the same key in this process
//! (`hit`), or `503 CACHE_UNAVAILABLE`. So a dead shard costs its own keys the cluster
//! cache and lock, and no other key anything. Commits and aborts of `local-` leases
//! never touch Redis; other commits and aborts go to Redis, since they hold a Redis
//! lock, unless the key's shard is down: then a commit keeps its token in this
//! process's memory (answered `204`), and an invalidation is deferred.
//!
//! Every lease logs one line with provider, tenant, outcome and time spent (at debug for
//! a plain `hit`, the common case; at info otherwise), and is counted in [`Metrics`] by
//! outcome.

use std::sync::Arc;
use std::time::Duration;
use tokengate_core::lease::{
    AbortRequest, CommitRequest, FetchFailure, InvalidateRequest, LeaseId, LeaseResponse,
};
use tokengate_core::{CachedToken, TokenError, TokenKey};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::degraded::{self, Begin, Degraded, FlightState};
use crate::error::ApiError;
use crate::health::Health;
use crate::hot::HotTokens;
use crate::metrics::{AbortResult, CommitResult, InvalidateResult, LeaseOutcome, Metrics};
use crate::stale::StaleTokens;
use crate::store::{
    self, Acquire, Invalidated, Store, StoreError, USABLE_MARGIN_MS, key_tag, slot_of_tag,
};
use crate::waits::{WaitOutcome, Waits};

/// Largest `expiresAtMs` a commit may carry: 2^53, the largest integer the Lua scripts
/// (double-precision numbers) hold exactly; year 287396, so no real token is refused.
pub const MAX_EXPIRES_AT_MS: u64 = 1 << 53;

/// Serves leases, commits, aborts and invalidations.
#[derive(Debug)]
pub struct Service {
    /// The cluster-wide cache and lock; also carries the Redis health verdict.
    store: Store,
    /// The Redis health verdict: healthy leases use Redis, unhealthy ones degraded mode.
    health: Arc<Health>,
    /// This process's shared waits on held locks.
    waits: Arc<Waits>,
    /// Copies of the tokens recently read from Redis, to answer hits without it.
    hot: Arc<HotTokens>,
    /// The last token served per key, answered while the key cannot use Redis.
    stale: Arc<StaleTokens>,
    /// Flights, limiter and deferred invalidations of degraded mode.
    degraded: Arc<Degraded>,
    /// Counters of outcomes, exposed on `/metrics`.
    metrics: Arc<Metrics>,
    /// Decides whether a token is usable or already expired.
    clock: Arc<dyn Clock>,
    /// How long a lease waits for another holder before it is answered 503.
    lease_wait: Duration,
    /// How long a fetch failure that asking again cannot fix answers the key's leases
    /// (zero: never).
    negative_cache: Duration,
    /// Turns `true` when the companion shuts down, so waiting leases are answered at once.
    stopping: watch::Receiver<bool>,
}

impl Service {
    /// Creates the service.
    #[allow(clippy::too_many_arguments)] // each a collaborator wired once, in `lib.rs`
    pub fn new(
        store: Store,
        health: Arc<Health>,
        waits: Arc<Waits>,
        degraded: Arc<Degraded>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        lease_wait: Duration,
        negative_cache: Duration,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            health,
            waits,
            hot: Arc::new(HotTokens::new(Arc::clone(&clock))),
            stale: Arc::new(StaleTokens::new(Arc::clone(&clock))),
            degraded,
            metrics,
            clock,
            lease_wait,
            negative_cache,
            stopping,
        }
    }

    /// The Redis health verdict the service follows.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The copies of cached tokens, which the pub/sub subscriber keeps honest.
    pub fn hot(&self) -> &Arc<HotTokens> {
        &self.hot
    }

    /// The tokens kept for stale-if-error, which the pub/sub subscriber purges.
    pub fn stale(&self) -> &Arc<StaleTokens> {
        &self.stale
    }

    /// The service's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Answers a lease for `key` (see the module doc), logs and counts its outcome.
    ///
    /// With `force_refresh` the cached token is skipped: the lease fetches, or waits for
    /// a fetch in progress and accepts only a token that expires later than the skipped
    /// one and than `min_expires_at_ms` (a newly fetched one). The skipped token stays cached for other leases until
    /// the new one replaces it. With `min_expires_at_ms`, only a token expiring after it
    /// answers the lease (a newer one than the caller holds), cached or awaited.
    pub async fn lease(
        &self,
        key: TokenKey,
        force_refresh: bool,
        min_expires_at_ms: Option<u64>,
    ) -> Result<LeaseResponse, ApiError> {
        let started = Instant::now();
        let result = self
            .lease_inner(&key, force_refresh, min_expires_at_ms, started)
            .await;
        let took = started.elapsed();
        let waited_ms = millis(took);
        let outcome = match &result {
            Ok((_, outcome)) => *outcome,
            Err(ApiError::LockWaitExhausted { .. }) => LeaseOutcome::LockTimeout,
            Err(ApiError::DegradedLimitReached { .. }) => LeaseOutcome::DegradedRefused,
            Err(ApiError::Fetch { .. }) => LeaseOutcome::CachedFailure,
            Err(_) => LeaseOutcome::Error,
        };
        self.metrics.lease(outcome, took);
        let (provider, tenant) = (key.provider.as_str(), key.tenant_id.as_str());
        let outcome = outcome.as_str();
        match &result {
            Ok((LeaseResponse::Hit { expires_at_ms, .. }, hit_outcome)) => {
                let expires_in_ms = expires_at_ms.saturating_sub(self.clock.now_ms());
                macro_rules! hit_line {
                    ($level:ident) => {
                        tracing::$level!(
                            provider,
                            tenant,
                            force_refresh,
                            outcome,
                            waited_ms,
                            expires_in_ms,
                            "lease"
                        )
                    };
                }
                // A plain hit is the common case; an info line for each was about 15 % of
                // its cost.
                if matches!(hit_outcome, LeaseOutcome::Hit) {
                    hit_line!(debug);
                } else {
                    hit_line!(info);
                }
            }
            Ok((LeaseResponse::Fetch { lease_id, .. }, _)) => {
                tracing::info!(provider, tenant, force_refresh, outcome, waited_ms, lease_id = %lease_id.0, "lease");
            }
            Err(error) => {
                tracing::warn!(provider, tenant, force_refresh, outcome, waited_ms, %error, "lease");
            }
        }
        result.map(|(response, _)| response)
    }

    async fn lease_inner(
        &self,
        key: &TokenKey,
        force_refresh: bool,
        min_expires_at_ms: Option<u64>,
        started: Instant,
    ) -> Result<(LeaseResponse, LeaseOutcome), ApiError> {
        let tag = key_tag(key);
        let slot = slot_of_tag(&tag);
        let deadline = started + self.lease_wait;
        let cache_error = |source: StoreError| ApiError::CacheUnavailable {
            key: key.clone(),
            source,
        };
        let without_redis =
            || self.lease_without_redis(key, &tag, force_refresh, min_expires_at_ms, started);
        let mut stopping = self.stopping.clone();
        // A token answers this lease only if it expires after this (and is usable).
        // `None`: not known yet, because the lease skips the cached token and learns its
        // expiry from the first attempt.
        let mut newer_than_ms = if force_refresh {
            None
        } else {
            Some(min_expires_at_ms.unwrap_or(0))
        };
        let mut has_waited = false;
        loop {
            // Checked on every round, so a lease whose wait outlives Redis' health (or
            // its shard's) continues in degraded mode instead of on a dead Redis.
            if !self.health.serves(slot) {
                return without_redis().await;
            }
            let usable_after_ms = self.clock.now_ms().saturating_add(USABLE_MARGIN_MS);
            let usable_after_ms = newer_than_ms.map(|newer_than| newer_than.max(usable_after_ms));
            if let Some(token) = usable_after_ms.and_then(|after| self.hot.get(&tag, after)) {
                return Ok((hit(token), hit_outcome(has_waited)));
            }
            let generation = self.hot.generation();
            let lease_id = LeaseId(uuid::Uuid::new_v4().to_string());
            let unanswered = UnansweredAcquire {
                store: self.store.clone(),
                tag: tag.clone(),
                lease_id: Some(lease_id.clone()),
            };
            let acquired = match self.store.acquire(&tag, &lease_id, usable_after_ms).await {
                Ok(acquired) => acquired,
                Err(source) if source.is_unavailability() => {
                    tracing::debug!(%source, "redis failed for this key; the lease goes without it");
                    return without_redis().await;
                }
                Err(source) => return Err(cache_error(source)),
            };
            unanswered.answered();
            match acquired {
                Acquire::Hit(token) => {
                    self.hot.keep(&tag, &token, generation);
                    self.stale.keep(&tag, &token);
                    return Ok((hit(token), hit_outcome(has_waited)));
                }
                Acquire::Failed(failure) => return Err(cached_failure(key, failure)),
                Acquire::Locked => {
                    let lease_ttl_ms = self.store.lock_ttl_ms();
                    let outcome = if has_waited {
                        LeaseOutcome::WaitedFetch
                    } else {
                        LeaseOutcome::Fetch
                    };
                    let fetch = LeaseResponse::Fetch {
                        lease_id,
                        lease_ttl_ms,
                    };
                    return Ok((fetch, outcome));
                }
                // A forced lease waits for a token newer than both the cached one and
                // the one its caller discards: a fetch that began before the caller's
                // and commits after it brings neither.
                Acquire::Held {
                    cached_expires_at_ms,
                } => {
                    newer_than_ms
                        .get_or_insert(cached_expires_at_ms.max(min_expires_at_ms.unwrap_or(0)));
                }
            }
            has_waited = true;
            let _waiting = self.metrics.waiting();
            let wait = self.waits.wait(&tag, newer_than_ms.unwrap_or(0));
            let waited = tokio::select! {
                waited = tokio::time::timeout_at(deadline, wait) => waited,
                _ = stopping.wait_for(|stopping| *stopping) => {
                    return Err(ApiError::ShuttingDown { key: key.clone() });
                }
            };
            match waited {
                Err(_elapsed) => {
                    let waited_ms = millis(started.elapsed());
                    return Err(ApiError::LockWaitExhausted {
                        key: key.clone(),
                        waited_ms,
                    });
                }
                // Redis failed under the wait: for want of Redis, the lease goes without
                // it; else, if that made the key unusable, the next round does; otherwise
                // the caller hears of it.
                Ok(Err(source)) => {
                    if source.is_unavailability() {
                        return without_redis().await;
                    }
                    if self.health.serves(slot) {
                        return Err(cache_error(source));
                    }
                }
                Ok(Ok(WaitOutcome::Ready(token))) => {
                    self.stale.keep(&tag, &token);
                    return Ok((hit(token), LeaseOutcome::WaitedHit));
                }
                // The holder aborted or its lock expired: race the other waiters for it.
                Ok(Ok(WaitOutcome::LockFree)) => {}
            }
        }
    }

    /// A lease that cannot use Redis: the token this companion last served for the key
    /// if it answers the lease (not with `force_refresh`), else a degraded-mode lease.
    async fn lease_without_redis(
        &self,
        key: &TokenKey,
        tag: &str,
        force_refresh: bool,
        min_expires_at_ms: Option<u64>,
        started: Instant,
    ) -> Result<(LeaseResponse, LeaseOutcome), ApiError> {
        if !force_refresh {
            let usable_after_ms = self
                .clock
                .now_ms()
                .saturating_add(USABLE_MARGIN_MS)
                .max(min_expires_at_ms.unwrap_or(0));
            if let Some(token) = self.stale.get(tag, usable_after_ms) {
                return Ok((hit(token), LeaseOutcome::DegradedHit));
            }
        }
        self.lease_degraded(key, started).await
    }

    /// A lease while Redis is unhealthy: join this process's fetch of the key, or start
    /// one if the limiter admits it (see [`crate::degraded`]). Waits at most the lease
    /// wait budget counted from `started`, like a lease waiting on a Redis lock.
    async fn lease_degraded(
        &self,
        key: &TokenKey,
        started: Instant,
    ) -> Result<(LeaseResponse, LeaseOutcome), ApiError> {
        let deadline = started + self.lease_wait;
        let mut stopping = self.stopping.clone();
        loop {
            let (mut outcome, expires_at) = match self.degraded.begin(key, Instant::now()) {
                Begin::Failed(failure) => return Err(cached_failure(key, failure)),
                Begin::Fetch(lease_id) => {
                    let fetch = LeaseResponse::Fetch {
                        lease_id,
                        lease_ttl_ms: self.store.lock_ttl_ms(),
                    };
                    return Ok((fetch, LeaseOutcome::DegradedFetch));
                }
                Begin::Refused { retry_after } => {
                    return Err(ApiError::DegradedLimitReached {
                        key: key.clone(),
                        per_minute: self.degraded.per_minute(),
                        retry_after,
                    });
                }
                Begin::Join {
                    outcome,
                    expires_at,
                } => (outcome, expires_at),
            };
            let _waiting = self.metrics.waiting();
            let settled = async {
                match outcome
                    .wait_for(|state| !matches!(state, FlightState::Pending))
                    .await
                {
                    Ok(state) => (*state).clone(),
                    // The flight was dropped (replaced after it expired).
                    Err(_) => FlightState::Ended,
                }
            };
            let settled = tokio::select! {
                settled = tokio::time::timeout_at(deadline.min(expires_at), settled) => settled,
                _ = stopping.wait_for(|stopping| *stopping) => {
                    return Err(ApiError::ShuttingDown { key: key.clone() });
                }
            };
            match settled {
                Ok(FlightState::Committed(token)) => {
                    return Ok((hit(token), LeaseOutcome::DegradedWaitedHit));
                }
                Err(_elapsed) if Instant::now() >= deadline => {
                    return Err(ApiError::LockWaitExhausted {
                        key: key.clone(),
                        waited_ms: millis(started.elapsed()),
                    });
                }
                // Aborted, or the flight expired: start (or join) a new one.
                Ok(_) | Err(_) => {}
            }
        }
    }

    /// Stores the token of a finished fetch, releases the lock and wakes waiters.
    ///
    /// A lease that lost its lock (it expired, another lease took it) still stores its
    /// token, which is valid, but leaves the other holder's lock alone. A token that is
    /// already expired is not stored; the lock is released so a waiter fetches anew.
    pub async fn commit(&self, request: CommitRequest) -> Result<(), ApiError> {
        if request.access_token.is_empty() {
            return Err(ApiError::InvalidRequest("accessToken is empty".to_owned()));
        }
        if request.expires_at_ms > MAX_EXPIRES_AT_MS {
            return Err(ApiError::InvalidRequest(format!(
                "expiresAtMs must be at most {MAX_EXPIRES_AT_MS}"
            )));
        }
        let key = TokenKey::new(request.provider, request.tenant_id);
        let (provider, tenant) = (key.provider.as_str(), key.tenant_id.as_str());
        let lease_id = request.lease_id;
        let token = CachedToken {
            access_token: request.access_token,
            expires_at_ms: request.expires_at_ms,
        };
        if degraded::is_local(&lease_id) {
            self.commit_local(&key, &lease_id, token);
            return Ok(());
        }
        let tag = key_tag(&key);
        if !self.health.serves(slot_of_tag(&tag)) {
            self.commit_unreachable(&key, &lease_id, &token, "redis is unavailable for this key");
            return Ok(());
        }
        let cache_error = |source: StoreError| {
            let error = ApiError::CacheUnavailable {
                key: key.clone(),
                source,
            };
            self.metrics.commit(CommitResult::Error);
            tracing::warn!(provider, tenant, lease_id = %lease_id.0, %error, "commit failed");
            error
        };

        let now_ms = self.clock.now_ms();
        if request.expires_at_ms <= now_ms {
            let released = self
                .store
                .release(&tag, &lease_id)
                .await
                .map_err(cache_error)?;
            self.metrics.commit(CommitResult::Expired);
            tracing::warn!(
                provider, tenant, lease_id = %lease_id.0, expired_ms_ago = now_ms - request.expires_at_ms,
                released, "commit of an already expired token: not stored"
            );
            return Ok(());
        }

        let outcome = match self.store.commit(&tag, &lease_id, &token).await {
            Ok(outcome) => outcome,
            Err(source) if source.is_unavailability() => {
                self.commit_unreachable(&key, &lease_id, &token, &source.to_string());
                return Ok(());
            }
            Err(source) => return Err(cache_error(source)),
        };
        // This companion's own next lease reads the committed token: its copy is dropped
        // now, after the write (a read racing the write cannot keep the old token), not
        // when the `ready` message comes back from Redis.
        self.hot.forget(&tag);
        self.stale.keep(&tag, &token);
        let expires_in_ms = request.expires_at_ms - now_ms;
        self.metrics.commit(if outcome.stored {
            CommitResult::Stored
        } else {
            CommitResult::NotStored
        });
        if let Some(replaced_expires_in_ms) = early_replacement(&outcome, now_ms, expires_in_ms) {
            self.metrics.early_replacement();
            tracing::warn!(
                provider, tenant, lease_id = %lease_id.0, expires_in_ms, replaced_expires_in_ms,
                "token replaced early: the cached one had more than half of the new one's \
                 lifetime left (a forced refresh, or fetches beyond one per token lifetime)"
            );
        }
        if outcome.lock_was_held {
            tracing::info!(provider, tenant, lease_id = %lease_id.0, expires_in_ms, "token committed");
        } else {
            tracing::warn!(
                provider, tenant, lease_id = %lease_id.0, expires_in_ms, stored = outcome.stored,
                "commit from a lease that no longer holds the lock (it expired or was taken over); \
                 the current lock was left alone"
            );
        }
        Ok(())
    }

    /// A commit of a Redis lease whose key cannot use Redis now: the token is kept in
    /// this process's memory ([`crate::stale`]), so the key's next leases here are
    /// answered with it; its lock, if the shard still holds it, expires at its TTL.
    fn commit_unreachable(
        &self,
        key: &TokenKey,
        lease_id: &LeaseId,
        token: &CachedToken,
        why: &str,
    ) {
        let usable = store::is_usable(token, self.clock.now_ms());
        if usable {
            self.stale.keep(&key_tag(key), token);
        }
        self.metrics.commit(CommitResult::Local);
        tracing::warn!(
            provider = key.provider.as_str(), tenant = key.tenant_id.as_str(), lease_id = %lease_id.0,
            usable, error = why,
            "commit without redis: the token is kept in this process's memory for its leases, not cluster-wide"
        );
    }

    /// Releases the lock of a failed fetch, so a waiter takes over. Releasing a lock the
    /// lease no longer holds is not an error: there is nothing left to do.
    ///
    /// A failure the abort reports, if asking again cannot fix it (credentials rejected
    /// or not found), answers the key's leases for `--negative-cache-ms` first: the
    /// waiters the release wakes get it too, instead of each fetching in turn.
    pub async fn abort(&self, request: AbortRequest) -> Result<(), ApiError> {
        let key = TokenKey::new(request.provider, request.tenant_id);
        let (provider, tenant) = (key.provider.as_str(), key.tenant_id.as_str());
        let lease_id = request.lease_id;
        let failure = request.error.filter(|failure| {
            failure.code.is_negatively_cached() && !self.negative_cache.is_zero()
        });
        if degraded::is_local(&lease_id) {
            if let Some(failure) = failure {
                let until = Instant::now() + self.negative_cache;
                self.degraded.remember_failure(&key, failure, until);
            }
            let current = self.degraded.finish(&key, &lease_id, None);
            self.metrics.abort(AbortResult::Local);
            tracing::info!(provider, tenant, lease_id = %lease_id.0, current, "degraded-mode lease aborted");
            return Ok(());
        }
        if let Some(failure) = &failure {
            let ttl_ms = millis(self.negative_cache);
            if let Err(error) = self
                .store
                .record_failure(&key_tag(&key), failure, ttl_ms)
                .await
            {
                tracing::warn!(provider, tenant, %error, "the fetch's failure could not be cached");
            }
        }
        match self.store.release(&key_tag(&key), &lease_id).await {
            Ok(true) => {
                self.metrics.abort(AbortResult::Released);
                tracing::info!(provider, tenant, lease_id = %lease_id.0, "lease aborted; lock released");
                Ok(())
            }
            Ok(false) => {
                self.metrics.abort(AbortResult::NotHeld);
                tracing::debug!(provider, tenant, lease_id = %lease_id.0, "abort from a lease that no longer holds the lock");
                Ok(())
            }
            Err(source) => {
                self.metrics.abort(AbortResult::Error);
                let error = ApiError::CacheUnavailable {
                    key: key.clone(),
                    source,
                };
                tracing::warn!(provider, tenant, lease_id = %lease_id.0, %error, "abort failed");
                Err(error)
            }
        }
    }

    /// Ends a degraded-mode fetch: nothing is stored (Redis is bypassed for `local-`
    /// leases, even if it is healthy again); the leases of this process waiting on the
    /// fetch get the token if it is usable, or else start a new fetch.
    fn commit_local(&self, key: &TokenKey, lease_id: &LeaseId, token: CachedToken) {
        let usable = store::is_usable(&token, self.clock.now_ms());
        if usable {
            self.stale.keep(&key_tag(key), &token);
        }
        let current = self.degraded.finish(key, lease_id, usable.then_some(token));
        self.metrics.commit(CommitResult::Local);
        tracing::info!(
            provider = key.provider.as_str(), tenant = key.tenant_id.as_str(), lease_id = %lease_id.0,
            current, usable, "degraded-mode commit: token handed to this process's waiters, not stored"
        );
    }

    /// Drops the key's cached token from Redis: only if it is `accessToken` when one is
    /// given, so purging a rejected token never drops the fresh one that replaced it.
    ///
    /// While Redis is unhealthy the invalidation is remembered and applied when it is
    /// healthy again (see [`Service::replay_deferred_invalidations`]); the answer is the
    /// same success.
    pub async fn invalidate(&self, request: InvalidateRequest) -> Result<(), ApiError> {
        if request.access_token.as_ref().is_some_and(|t| t.is_empty()) {
            return Err(ApiError::InvalidRequest(
                "accessToken is empty; omit it to drop whatever token is cached".to_owned(),
            ));
        }
        let key = TokenKey::new(request.provider, request.tenant_id);
        let (provider, tenant) = (key.provider.as_str(), key.tenant_id.as_str());
        let compared = request.access_token.is_some();
        // The other companions drop theirs when the deletion's message arrives.
        let tag = key_tag(&key);
        self.hot.forget(&tag);
        self.stale.forget(&tag);
        self.degraded.forget_failure(&key);

        let slot = slot_of_tag(&tag);
        if self.health.serves(slot) {
            let invalidated = match self.store.forget_failure(&tag).await {
                Ok(()) => {
                    self.store
                        .invalidate(&tag, request.access_token.as_ref())
                        .await
                }
                Err(error) => Err(error),
            };
            match invalidated {
                Ok(found) => {
                    let result = match found {
                        Invalidated::Deleted => InvalidateResult::Deleted,
                        Invalidated::Mismatch => InvalidateResult::Mismatch,
                        Invalidated::NotCached => InvalidateResult::NotCached,
                    };
                    self.metrics.invalidate(result);
                    tracing::info!(
                        provider,
                        tenant,
                        compared,
                        result = result.as_str(),
                        "invalidate"
                    );
                    return Ok(());
                }
                // For want of Redis: deferred, below.
                Err(source) if source.is_unavailability() => {
                    tracing::debug!(provider, tenant, %source, "invalidate failed; deferred");
                }
                Err(source) => {
                    self.metrics.invalidate(InvalidateResult::Error);
                    let error = ApiError::CacheUnavailable {
                        key: key.clone(),
                        source,
                    };
                    tracing::warn!(provider, tenant, compared, %error, "invalidate failed");
                    return Err(error);
                }
            }
        }

        if !self.degraded.defer_invalidation(&key, request.access_token) {
            self.metrics.invalidate(InvalidateResult::Error);
            let error = ApiError::DeferredInvalidationsFull { key: key.clone() };
            tracing::warn!(provider, tenant, compared, %error, "invalidate");
            return Err(error);
        }
        self.metrics.invalidate(InvalidateResult::Deferred);
        tracing::info!(
            provider,
            tenant,
            compared,
            result = InvalidateResult::Deferred.as_str(),
            "invalidate: redis is unavailable for this key; applied once it is back"
        );
        // Redis may have recovered since the check, after the replay ran.
        if self.health.serves(slot) {
            self.replay_deferred_invalidations().await;
        }
        Ok(())
    }

    /// Applies the invalidations deferred while Redis (or their key's shard) was
    /// unavailable. Those of keys whose shard is still down stay deferred; if Redis
    /// fails again, the rest stay deferred until the next recovery.
    pub async fn replay_deferred_invalidations(&self) {
        let mut deferred = self.degraded.take_deferred().into_iter();
        let (mut applied, mut deleted) = (0_usize, 0_usize);
        while let Some((key, access_token)) = deferred.next() {
            if !self.health.serves(slot_of_tag(&key_tag(&key))) {
                self.degraded.defer_invalidation(&key, access_token);
                continue;
            }
            match self
                .store
                .invalidate(&key_tag(&key), access_token.as_ref())
                .await
            {
                Ok(found) => {
                    applied += 1;
                    deleted += usize::from(found == Invalidated::Deleted);
                }
                Err(error) => {
                    let mut kept = 0_usize;
                    for (key, access_token) in std::iter::once((key, access_token)).chain(deferred)
                    {
                        kept += usize::from(self.degraded.defer_invalidation(&key, access_token));
                    }
                    tracing::warn!(
                        applied,
                        kept,
                        %error,
                        "redis failed while applying deferred invalidations; the rest wait for the next recovery"
                    );
                    return;
                }
            }
        }
        if applied > 0 {
            tracing::info!(
                applied,
                deleted,
                "invalidations deferred while redis was unhealthy applied"
            );
        }
    }
}

/// Applies deferred invalidations each time Redis turns healthy again. Runs until its
/// task is aborted.
pub async fn replay_on_recovery(service: Arc<Service>) {
    let mut changes = service.health().subscribe();
    while changes.changed().await.is_ok() {
        let healthy = *changes.borrow_and_update();
        if healthy {
            service.replay_deferred_invalidations().await;
        }
    }
}

/// An acquire whose answer this lease has not seen yet. Redis runs a script it received
/// even after the lease stopped waiting for the answer (a timeout while Redis is slow), and
/// a lease whose caller went away is dropped in the middle of its acquire; either way the
/// lock may be taken for a lease id nobody will commit or abort, and other leases would
/// wait for it until the lock TTL. Dropped before [`UnansweredAcquire::answered`], it
/// releases that lock in the background: a compare-and-delete on the lease id, so a lock
/// this lease never took is left alone, sent on the same connection after the acquire, so
/// Redis runs it after the acquire.
struct UnansweredAcquire {
    store: Store,
    tag: String,
    /// `None` once answered.
    lease_id: Option<LeaseId>,
}

impl UnansweredAcquire {
    /// The lease saw the answer: the lock, if taken, is the lease's to hand on.
    fn answered(mut self) {
        self.lease_id = None;
    }
}

impl Drop for UnansweredAcquire {
    fn drop(&mut self) {
        let Some(lease_id) = self.lease_id.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, tag) = (self.store.clone(), std::mem::take(&mut self.tag));
        runtime.spawn(async move {
            match store.release(&tag, &lease_id).await {
                Ok(true) => tracing::info!(
                    key = %tag,
                    lease_id = %lease_id.0,
                    "released a lock taken after its lease had given up on the acquire"
                ),
                Ok(false) => {}
                Err(error) => tracing::debug!(
                    lease_id = %lease_id.0,
                    %error,
                    "could not release the lock of an unanswered acquire; if taken, it expires at the lock TTL"
                ),
            }
        });
    }
}

/// How a lease answered `hit` is counted: after a wait on another holder, or at once.
fn hit_outcome(has_waited: bool) -> LeaseOutcome {
    if has_waited {
        LeaseOutcome::WaitedHit
    } else {
        LeaseOutcome::Hit
    }
}

/// The error a lease of `key` is answered while its last fetch's `failure` is cached.
fn cached_failure(key: &TokenKey, failure: FetchFailure) -> ApiError {
    ApiError::Fetch {
        key: key.clone(),
        error: TokenError::new(failure.code, failure.message),
    }
}

fn hit(token: CachedToken) -> LeaseResponse {
    LeaseResponse::Hit {
        access_token: token.access_token,
        expires_at_ms: token.expires_at_ms,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// When a commit stored its token over a cached one that still had more than half of
/// the new token's lifetime (`expires_in_ms`) left, how long that one had left. A
/// healthy cluster replaces a cached token only in its refresh window (the filter's
/// `refreshAhead`, at most half of its life) or after an invalidation deleted it, so an
/// early replacement is a forced refresh or a fetch beyond one per token lifetime.
fn early_replacement(
    outcome: &store::CommitOutcome,
    now_ms: u64,
    expires_in_ms: u64,
) -> Option<u64> {
    let replaced_expires_in_ms = outcome.previous_expires_at_ms?.checked_sub(now_ms)?;
    (outcome.stored && replaced_expires_in_ms.saturating_mul(2) > expires_in_ms)
        .then_some(replaced_expires_in_ms)
}

#[cfg(test)]
mod early_replacements {
    use super::*;

    fn stored_over(previous_expires_at_ms: Option<u64>) -> store::CommitOutcome {
        store::CommitOutcome {
            lock_was_held: true,
            stored: true,
            previous_expires_at_ms,
        }
    }

    #[test]
    fn a_token_replaced_with_more_than_half_of_the_new_ones_life_left_is_early() {
        let now = 1_000_000;
        assert_eq!(
            early_replacement(&stored_over(Some(now + 60_001)), now, 120_000),
            Some(60_001)
        );
        assert_eq!(
            early_replacement(&stored_over(Some(now + 60_000)), now, 120_000),
            None
        );
    }

    #[test]
    fn a_refresh_in_the_window_a_first_token_an_expired_one_or_a_kept_one_is_not() {
        let now = 1_000_000;
        // Refresh-ahead: the cached token is in its last 10 %.
        assert_eq!(
            early_replacement(&stored_over(Some(now + 8_000)), now, 86_400_000),
            None
        );
        assert_eq!(early_replacement(&stored_over(None), now, 86_400_000), None);
        assert_eq!(
            early_replacement(&stored_over(Some(now - 1)), now, 86_400_000),
            None
        );
        let kept = store::CommitOutcome {
            stored: false,
            ..stored_over(Some(now + 86_000_000))
        };
        assert_eq!(early_replacement(&kept, now, 60_000), None);
    }
}
