//! The worker's calls to the companion: the lease that collapses fetches across
//! Envoys, `fetch: companion` token requests, the commit or abort that ends a lease
//! (sent once more when a companion restart lost it), and invalidations of tokens an
//! upstream rejected. Also what the companion's answers mean: a hit, a lease, its own
//! error, or no companion at all (then this worker fetches in local mode).

use serde::Serialize;

use tokengate_core::lease::{
    ABORT_PATH, AbortRequest, COMMIT_PATH, CommitRequest, FetchFailure, INVALIDATE_PATH,
    InvalidateRequest, LEASE_PATH, LeaseId, LeaseRequest, LeaseResponse,
};
use tokengate_core::token_api::{TOKEN_PATH, TokenResponse, TokenSource};
use tokengate_core::trace::TRACEPARENT_HEADER;
use tokengate_core::{
    CachedToken, CalloutResult, ErrorBody, ErrorCode, FetchedToken, Provider, SecretBytes,
    SecretString, TenantId, TokenError, TokenKey, Traceparent,
};

use super::Worker;
use super::fetch::{Stage, token_of};
use crate::host::{Callout, Host, Level, Metric};

/// Why a callout was sent, to route its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
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
pub(super) struct LeaseEnd {
    key: TokenKey,
    purpose: Purpose,
    path: &'static str,
    /// The request body (a commit carries the token).
    body: SecretBytes,
    /// Whether this is already the second attempt.
    retried: bool,
    /// The trace context of the fetch the lease was for.
    traceparent: Option<Traceparent>,
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

impl Worker {
    fn companion_callout<'a>(
        &'a self,
        path: &'a str,
        body: &'a [u8],
        timeout_ms: u64,
        traceparent: Option<&'a Traceparent>,
    ) -> Callout<'a> {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(key) = &self.config.companion.api_key {
            headers.push((COMPANION_KEY_HEADER, key.expose()));
        }
        if let Some(traceparent) = traceparent {
            headers.push((TRACEPARENT_HEADER, traceparent.as_str()));
        }
        Callout {
            cluster: &self.config.companion.cluster,
            method: "POST",
            path,
            authority: &self.config.companion.authority,
            headers,
            body: Some(body),
            timeout_ms,
        }
    }

    /// Sends a companion callout for `key`, with `traceparent` (the trace context of
    /// the fetch it serves); its answer is routed by `purpose`. A lease or token
    /// request waits `companion.timeoutMs`; a lease end or an invalidation, which the
    /// companion answers after a Redis write, the Tenant Service's timeout.
    fn send_to_companion(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        purpose: Purpose,
        path: &'static str,
        body: &[u8],
        traceparent: Option<&Traceparent>,
    ) -> Result<u32, String> {
        let timeout_ms = match purpose {
            Purpose::Lease | Purpose::CompanionToken => self.config.companion.timeout_ms,
            _ => self.config.tenant_service.timeout_ms,
        };
        let callout = self.companion_callout(path, body, timeout_ms, traceparent);
        let callout_id = host.dispatch(callout)?;
        self.callouts.insert(callout_id, (key.clone(), purpose));
        Ok(callout_id)
    }

    /// Asks the companion for `key`'s lease: a token it holds, or the lock to fetch.
    pub(super) fn send_lease(
        &mut self,
        host: &mut impl Host,
        key: TokenKey,
        force_refresh: bool,
        min_expires_at_ms: Option<u64>,
    ) {
        let request = LeaseRequest {
            provider: key.provider.clone(),
            tenant_id: key.tenant_id.clone(),
            force_refresh,
            min_expires_at_ms,
        };
        let traceparent = self.fetch_traceparent(&key);
        let sent = serde_json::to_vec(&request)
            .map_err(|e| e.to_string())
            .and_then(|body| {
                let purpose = Purpose::Lease;
                let traceparent = traceparent.as_ref();
                self.send_to_companion(host, &key, purpose, LEASE_PATH, &body, traceparent)
            });
        match sent {
            Ok(_) => self.set_leasing(&key, host.now_ms()),
            Err(reason) => self.companion_unreachable(host, key, &reason),
        }
    }

    fn set_leasing(&mut self, key: &TokenKey, sent_at_ms: u64) {
        if let Some(fetch) = self.fetches.get_mut(key) {
            fetch.stage = Stage::Leasing { sent_at_ms };
        }
    }

    pub(super) fn on_lease_response(
        &mut self,
        host: &mut impl Host,
        key: TokenKey,
        result: CalloutResult,
    ) {
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
                let token = CachedToken {
                    access_token,
                    expires_at_ms,
                };
                let now_ms = host.now_ms();
                let margin_ms = self.config.expiry_margin_ms;
                if !token.is_fresh(now_ms, margin_ms) {
                    // The answer came late (the lease waited for another holder, or
                    // the companion was slow): its token no longer outlives the margin
                    // it was asked for. Ask again from now.
                    host.log(
                        Level::Warn,
                        &format!(
                            "lease answer for {key} came too late to be used: its token expires within expiryMarginMs; asking again"
                        ),
                    );
                    let usable_after = now_ms.saturating_add(margin_ms);
                    return self.send_lease(host, key, false, Some(usable_after));
                }
                host.count(Metric::ClusterCacheHit);
                let token = token_of(token, now_ms);
                self.finish(host, &key, Ok(token), TokenSource::Cache);
            }
            Some(LeaseResponse::Fetch { lease_id, .. }) => {
                self.begin_fetch(host, key, Some(lease_id));
            }
            // The companion's own errors (lock timeout, Redis and its limiter refusing)
            // come back as our JSON error body; anything else means the companion
            // itself could not be reached.
            None => match answered_error(&result) {
                Some(error) => {
                    self.finish(host, &key, Err(companion_error(error)), TokenSource::Fresh);
                }
                None => self.companion_unreachable(host, key, &describe(&result)),
            },
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

    /// `fetch: companion`: asks the companion's `/auth/token` for the token.
    pub(super) fn send_token_request(
        &mut self,
        host: &mut impl Host,
        key: TokenKey,
        force_refresh: bool,
        min_expires_at_ms: Option<u64>,
    ) {
        let body = serde_json::to_vec(&CompanionTokenRequest {
            tenant_id: &key.tenant_id,
            provider: key.provider.clone(),
            force_refresh,
            min_expires_at_ms,
        })
        .unwrap_or_default();
        let purpose = Purpose::CompanionToken;
        let traceparent = self.fetch_traceparent(&key);
        let traceparent = traceparent.as_ref();
        match self.send_to_companion(host, &key, purpose, TOKEN_PATH, &body, traceparent) {
            Ok(_) => self.set_leasing(&key, host.now_ms()),
            Err(reason) => {
                let error = companion_down(&reason);
                self.finish(host, &key, Err(error), TokenSource::Fresh);
            }
        }
    }

    pub(super) fn on_token_response(
        &mut self,
        host: &mut impl Host,
        key: TokenKey,
        result: CalloutResult,
    ) {
        let sent_at_ms = match self.fetches.get(&key).map(|fetch| &fetch.stage) {
            Some(Stage::Leasing { sent_at_ms }) => *sent_at_ms,
            _ => host.now_ms(),
        };
        let outcome = match &result {
            CalloutResult::Response {
                status: 200, body, ..
            } => serde_json::from_slice::<TokenResponse>(body.expose())
                .map(|response| {
                    let source = response.source;
                    (response.into_fetched(sent_at_ms), source)
                })
                .map_err(|_| companion_down("an unreadable token response")),
            CalloutResult::Response { .. } => Err(answered_error(&result)
                .map(companion_error)
                .unwrap_or_else(|| companion_down(&describe(&result)))),
            CalloutResult::NoResponse => Err(companion_down("no answer")),
        };
        let now_ms = host.now_ms();
        match outcome {
            Ok((token, _)) if token.expires_at_ms <= now_ms => {
                let error = expired_on_arrival(token.expires_at_ms, now_ms);
                self.finish(host, &key, Err(error), TokenSource::Fresh);
            }
            Ok((token, source)) => self.finish(host, &key, Ok(token), source),
            Err(error) => self.finish(host, &key, Err(error), TokenSource::Fresh),
        }
    }

    /// Commits a cacheable token to the companion, or aborts the lease (reporting
    /// `failure` when it is an error the companion caches for the key's other leases),
    /// with the trace context of the fetch.
    pub(super) fn end_lease(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        lease_id: LeaseId,
        token: Option<&FetchedToken>,
        failure: Option<&TokenError>,
        traceparent: Option<Traceparent>,
    ) {
        let provider = key.provider.clone();
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
                    error: failure.and_then(FetchFailure::of),
                }),
            ),
        };
        let lease_end = LeaseEnd {
            key: key.clone(),
            purpose,
            path,
            body: SecretBytes::new(body.unwrap_or_default()),
            retried: false,
            traceparent,
        };
        self.send_lease_end(host, lease_end);
    }

    fn send_lease_end(&mut self, host: &mut impl Host, lease_end: LeaseEnd) {
        let sent = self.send_to_companion(
            host,
            &lease_end.key,
            lease_end.purpose,
            lease_end.path,
            lease_end.body.expose(),
            lease_end.traceparent.as_ref(),
        );
        match sent {
            Ok(callout_id) => {
                self.lease_ends.insert(callout_id, lease_end);
            }
            Err(reason) => self.lease_end_lost(host, lease_end, &reason),
        }
    }

    /// On a tick: sends the lost commits and aborts whose moment came.
    pub(super) fn send_due_lease_ends(&mut self, host: &mut impl Host) {
        let now_ms = host.now_ms();
        let (due, later) = std::mem::take(&mut self.lease_end_retries)
            .into_iter()
            .partition(|(at_ms, _)| *at_ms <= now_ms);
        self.lease_end_retries = later;
        for (_, lease_end) in due {
            self.send_lease_end(host, lease_end);
        }
    }

    /// A commit or abort was answered: done unless the companion never saw it (no
    /// answer, or a 5xx of a companion going away).
    pub(super) fn on_lease_end_response(
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

    /// On a tick: asks the companion to drop the tokens upstreams rejected.
    pub(super) fn send_pending_invalidations(&mut self, host: &mut impl Host) {
        for (key, token) in std::mem::take(&mut self.pending_invalidations) {
            let request = InvalidateRequest {
                provider: key.provider.clone(),
                tenant_id: key.tenant_id.clone(),
                access_token: Some(token),
            };
            let body = SecretBytes::new(serde_json::to_vec(&request).unwrap_or_default());
            let purpose = Purpose::Invalidate;
            let path = INVALIDATE_PATH;
            let sent = self.send_to_companion(host, &key, purpose, path, body.expose(), None);
            if let Err(reason) = sent {
                host.log(
                    Level::Warn,
                    &format!("companion invalidate for {key} could not be sent: {reason}"),
                );
            }
        }
    }

    pub(super) fn on_invalidate_response(
        &mut self,
        host: &mut impl Host,
        key: &TokenKey,
        result: &CalloutResult,
    ) {
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
                    describe(result)
                ),
            );
        }
    }

    /// Remembers `token`, which an upstream rejected, for invalidation at the companion
    /// on the next tick.
    pub(super) fn invalidate_later(&mut self, key: TokenKey, token: SecretString) {
        self.pending_invalidations.push((key, token));
    }
}

/// The companion's own JSON error in `result`, if it answered one.
fn answered_error(result: &CalloutResult) -> Option<ErrorBody> {
    match result {
        CalloutResult::Response { body, .. } => serde_json::from_slice(body.expose()).ok(),
        CalloutResult::NoResponse => None,
    }
}

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

/// A short description of a companion callout's result for logs. Never the body,
/// except Envoy's own reply when it could not reach the companion, which says why
/// (e.g. `connection refused`) and holds nothing secret.
fn describe(result: &CalloutResult) -> String {
    match result {
        CalloutResult::Response { status, body, .. } => {
            match envoy_connect_failure(body.expose()) {
                Some(reason) => reason,
                None => format!("status {status}"),
            }
        }
        CalloutResult::NoResponse => "no answer".to_owned(),
    }
}

/// The reason in Envoy's local reply for a callout it could not deliver (`upstream
/// connect error or disconnect/reset before headers. reset reason: ...`, `no healthy
/// upstream`), if `body` is one.
fn envoy_connect_failure(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    if text.starts_with("no healthy upstream") {
        return Some("no healthy upstream".to_owned());
    }
    text.strip_prefix("upstream connect error or disconnect/reset before headers")?;
    if text.to_ascii_lowercase().contains("connection refused") {
        return Some("connection refused".to_owned());
    }
    let reason = text.split("reset reason: ").nth(1).unwrap_or("reset");
    Some(reason.chars().take(120).collect())
}

/// The error for a companion answer whose token had expired when it was handled (an
/// answer held up longer than the token lived): never delivered, the requests get this.
fn expired_on_arrival(expires_at_ms: u64, now_ms: u64) -> TokenError {
    TokenError::new(
        ErrorCode::CompanionUnavailable,
        format!(
            "the companion's token had expired {} ms before its answer was handled",
            now_ms.saturating_sub(expires_at_ms)
        ),
    )
}
