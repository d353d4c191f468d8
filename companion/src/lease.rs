//! The lease logic behind `POST /v1/lease`, `/v1/commit` and `/v1/abort`.
//!
//! A lease is answered, in order:
//!
//! 1. `hit` if Redis holds a token that is still usable (valid beyond
//!    [`USABLE_MARGIN_MS`]);
//! 2. `fetch` if the lease takes the key's lock (set if absent, for the lock TTL): the
//!    caller fetches, then commits or aborts. Steps 1 and 2 are one atomic script, so a commit cannot slip
//!    between them and cause a second fetch;
//! 3. otherwise it waits (see [`crate::waits`]) for the holder: a commit answers it
//!    `hit`, a freed lock (abort or expiry) sends it back to step 1, and the end of the
//!    wait budget answers `503 LOCK_ACQUISITION_FAILED`.
//!
//! A lease with `forceRefresh` skips step 1 for the token cached when it arrives (see
//! [`Service::lease`]).
//!
//! Every lease logs one line with provider, tenant, outcome and time spent.

use std::sync::Arc;
use std::time::Duration;
use tokengate_core::lease::{AbortRequest, CommitRequest, LeaseId, LeaseResponse};
use tokengate_core::{CachedToken, TokenKey};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::error::ApiError;
use crate::store::{Acquire, Store, StoreError, USABLE_MARGIN_MS, key_tag};
use crate::waits::{WaitOutcome, Waits};

/// Largest `expiresAtMs` a commit may carry: 2^53, the largest integer the Lua scripts
/// (double-precision numbers) hold exactly; year 287396, so no real token is refused.
pub const MAX_EXPIRES_AT_MS: u64 = 1 << 53;

/// Serves leases, commits and aborts.
#[derive(Debug)]
pub struct Service {
    /// The cluster-wide cache and lock.
    store: Store,
    /// This process's shared waits on held locks.
    waits: Arc<Waits>,
    /// Decides whether a token is usable or already expired.
    clock: Arc<dyn Clock>,
    /// How long a lease waits for another holder before it is answered 503.
    lease_wait: Duration,
    /// Turns `true` when the companion shuts down, so waiting leases are answered at once.
    stopping: watch::Receiver<bool>,
}

impl Service {
    /// Creates the service.
    pub fn new(
        store: Store,
        waits: Arc<Waits>,
        clock: Arc<dyn Clock>,
        lease_wait: Duration,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            waits,
            clock,
            lease_wait,
            stopping,
        }
    }

    /// Answers a lease for `key` (see the module doc) and logs its outcome.
    ///
    /// With `force_refresh` the cached token is skipped: the lease fetches, or waits for
    /// a fetch in progress and accepts only a token that expires later than the skipped
    /// one (a newly fetched one). The skipped token stays cached for other leases until
    /// the new one replaces it.
    pub async fn lease(
        &self,
        key: TokenKey,
        force_refresh: bool,
    ) -> Result<LeaseResponse, ApiError> {
        let started = Instant::now();
        let result = self.lease_inner(&key, force_refresh, started).await;
        let waited_ms = millis(started.elapsed());
        let (provider, tenant) = (key.provider.as_str(), key.tenant_id.as_str());
        match &result {
            Ok(LeaseResponse::Hit { expires_at_ms, .. }) => {
                let expires_in_ms = expires_at_ms.saturating_sub(self.clock.now_ms());
                tracing::info!(
                    provider,
                    tenant,
                    force_refresh,
                    outcome = "hit",
                    waited_ms,
                    expires_in_ms,
                    "lease"
                );
            }
            Ok(LeaseResponse::Fetch { lease_id, .. }) => {
                tracing::info!(provider, tenant, force_refresh, outcome = "fetch", waited_ms, lease_id = %lease_id.0, "lease");
            }
            Err(error) => {
                let outcome = error.code().as_str();
                tracing::warn!(provider, tenant, force_refresh, outcome, waited_ms, %error, "lease");
            }
        }
        result
    }

    async fn lease_inner(
        &self,
        key: &TokenKey,
        force_refresh: bool,
        started: Instant,
    ) -> Result<LeaseResponse, ApiError> {
        let tag = key_tag(key);
        let deadline = started + self.lease_wait;
        let cache_error = |source: StoreError| ApiError::CacheUnavailable {
            key: key.clone(),
            source,
        };
        let mut stopping = self.stopping.clone();
        // A token answers this lease only if it expires after this (and is usable).
        // `None`: not known yet, because the lease skips the cached token and learns its
        // expiry from the first attempt.
        let mut newer_than_ms = if force_refresh { None } else { Some(0) };
        loop {
            let lease_id = LeaseId(uuid::Uuid::new_v4().to_string());
            let usable_after_ms = self.clock.now_ms().saturating_add(USABLE_MARGIN_MS);
            let usable_after_ms = newer_than_ms.map(|newer_than| newer_than.max(usable_after_ms));
            match self
                .store
                .acquire(&tag, &lease_id, usable_after_ms)
                .await
                .map_err(cache_error)?
            {
                Acquire::Hit(token) => return Ok(hit(token)),
                Acquire::Locked => {
                    let lease_ttl_ms = self.store.lock_ttl_ms();
                    return Ok(LeaseResponse::Fetch {
                        lease_id,
                        lease_ttl_ms,
                    });
                }
                Acquire::Held {
                    cached_expires_at_ms,
                } => {
                    newer_than_ms.get_or_insert(cached_expires_at_ms);
                }
            }
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
                Ok(Err(source)) => return Err(cache_error(source)),
                Ok(Ok(WaitOutcome::Ready(token))) => return Ok(hit(token)),
                // The holder aborted or its lock expired: race the other waiters for it.
                Ok(Ok(WaitOutcome::LockFree)) => {}
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
        let tag = key_tag(&key);
        let cache_error = |source: StoreError| {
            let error = ApiError::CacheUnavailable {
                key: key.clone(),
                source,
            };
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
            tracing::warn!(
                provider, tenant, lease_id = %lease_id.0, expired_ms_ago = now_ms - request.expires_at_ms,
                released, "commit of an already expired token: not stored"
            );
            return Ok(());
        }

        let token = CachedToken {
            access_token: request.access_token,
            expires_at_ms: request.expires_at_ms,
        };
        let outcome = self
            .store
            .commit(&tag, &lease_id, &token)
            .await
            .map_err(cache_error)?;
        let expires_in_ms = request.expires_at_ms - now_ms;
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

    /// Releases the lock of a failed fetch, so a waiter takes over. Releasing a lock the
    /// lease no longer holds is not an error: there is nothing left to do.
    pub async fn abort(&self, request: AbortRequest) -> Result<(), ApiError> {
        let key = TokenKey::new(request.provider, request.tenant_id);
        let (provider, tenant) = (key.provider.as_str(), key.tenant_id.as_str());
        let lease_id = request.lease_id;
        match self.store.release(&key_tag(&key), &lease_id).await {
            Ok(true) => {
                tracing::info!(provider, tenant, lease_id = %lease_id.0, "lease aborted; lock released");
                Ok(())
            }
            Ok(false) => {
                tracing::debug!(provider, tenant, lease_id = %lease_id.0, "abort from a lease that no longer holds the lock");
                Ok(())
            }
            Err(source) => {
                let error = ApiError::CacheUnavailable {
                    key: key.clone(),
                    source,
                };
                tracing::warn!(provider, tenant, lease_id = %lease_id.0, %error, "abort failed");
                Err(error)
            }
        }
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
