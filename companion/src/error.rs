//! The errors of the companion's two boundaries: [`ApiError`] for one HTTP request
//! (mapped once, in [`IntoResponse`], to a status and core's JSON [`ErrorBody`]), and
//! [`CompanionError`] for the process as a whole.
//!
//! [`ErrorBody`]: tokengate_core::ErrorBody

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use tokengate_core::{ErrorCode, TokenError, TokenKey};

use crate::store::StoreError;

/// Why a request to the companion's API failed.
///
/// `Display` is for logs and may carry internal detail (Redis errors); clients get
/// [`ApiError::to_token_error`], whose messages are safe to show.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body or the request line is malformed (bad JSON, bad tenant id, unknown provider).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No route matches the path.
    #[error("no route for this path")]
    NotFound,
    /// Another lease held the lock for the whole wait budget.
    #[error("the lock for {key} was still held after waiting {waited_ms} ms")]
    LockWaitExhausted {
        /// The token key waited on.
        key: TokenKey,
        /// How long the lease waited.
        waited_ms: u64,
    },
    /// Redis failed or did not answer in time.
    #[error("the token cache is unavailable for {key}: {source}")]
    CacheUnavailable {
        /// The token key the request was about.
        key: TokenKey,
        /// What went wrong with Redis.
        #[source]
        source: StoreError,
    },
    /// Redis is unhealthy and the degraded-mode limiter refused another fetch of the key.
    #[error(
        "redis is unhealthy and {key} reached the degraded-mode limit of {per_minute} fetches per minute"
    )]
    DegradedLimitReached {
        /// The token key refused.
        key: TokenKey,
        /// The limit per key per rolling minute.
        per_minute: u32,
        /// When the limiter admits the key's next fetch.
        retry_after: Duration,
    },
    /// Redis is unhealthy and too many invalidations already wait for it: this one was
    /// not recorded.
    #[error("redis is unhealthy and the deferred invalidations are full; {key} was not recorded")]
    DeferredInvalidationsFull {
        /// The token key whose invalidation was dropped.
        key: TokenKey,
    },
    /// The companion is shutting down and answers waiting leases now instead of later.
    #[error("the companion is shutting down")]
    ShuttingDown {
        /// The token key waited on.
        key: TokenKey,
    },
    /// The internal API requires `x-tokengate-key` and the request lacked it or had
    /// another key.
    #[error("missing or wrong internal API key")]
    Unauthorized,
    /// The token API's fetch failed (Tenant Service, region, OAuth); the code says why.
    #[error("fetching {key} failed: {error}")]
    Fetch {
        /// The token key fetched.
        key: TokenKey,
        /// Core's error: its code and a message safe to show.
        error: TokenError,
    },
    /// A bug: something that cannot happen did (a fetch task panicked).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The error code this failure is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            ApiError::NotFound => ErrorCode::NotFound,
            ApiError::LockWaitExhausted { .. } => ErrorCode::LockAcquisitionFailed,
            ApiError::CacheUnavailable { .. }
            | ApiError::DegradedLimitReached { .. }
            | ApiError::DeferredInvalidationsFull { .. } => ErrorCode::CacheUnavailable,
            ApiError::ShuttingDown { .. } => ErrorCode::CompanionUnavailable,
            ApiError::Unauthorized => ErrorCode::Unauthorized,
            ApiError::Fetch { error, .. } => error.code,
            ApiError::Internal(_) => ErrorCode::InternalError,
        }
    }

    /// The token key the request was about, when it got far enough to have one.
    pub fn key(&self) -> Option<&TokenKey> {
        match self {
            ApiError::LockWaitExhausted { key, .. }
            | ApiError::CacheUnavailable { key, .. }
            | ApiError::DegradedLimitReached { key, .. }
            | ApiError::DeferredInvalidationsFull { key }
            | ApiError::ShuttingDown { key }
            | ApiError::Fetch { key, .. } => Some(key),
            ApiError::InvalidRequest(_)
            | ApiError::NotFound
            | ApiError::Unauthorized
            | ApiError::Internal(_) => None,
        }
    }

    /// The code and a message safe to show the client (no Redis internals).
    pub fn to_token_error(&self) -> TokenError {
        let message = match self {
            ApiError::InvalidRequest(message) => message.clone(),
            ApiError::NotFound => "no such route".to_owned(),
            ApiError::LockWaitExhausted { key, waited_ms } => format!(
                "another instance is still fetching the {} token for tenant '{}'; gave up after {waited_ms} ms",
                key.provider, key.tenant_id
            ),
            ApiError::CacheUnavailable { .. } => {
                "the token cache (Redis) is unavailable".to_owned()
            }
            ApiError::DegradedLimitReached {
                key,
                per_minute,
                retry_after,
            } => format!(
                "Redis is unavailable and the degraded-mode limit of {per_minute} fetches per \
                 minute for the {} token of tenant '{}' was reached; retry in {} s",
                key.provider,
                key.tenant_id,
                retry_after_secs(*retry_after)
            ),
            ApiError::DeferredInvalidationsFull { .. } => {
                "Redis is unavailable and too many invalidations already wait for it; \
                 this one was not recorded"
                    .to_owned()
            }
            ApiError::ShuttingDown { .. } => "the companion is shutting down".to_owned(),
            ApiError::Unauthorized => format!(
                "this API requires the companion's key in the {} header",
                crate::keys::INTERNAL_API_KEY_HEADER
            ),
            ApiError::Fetch { error, .. } => error.message.clone(),
            ApiError::Internal(_) => {
                "an internal error occurred; see the companion's log".to_owned()
            }
        };
        TokenError::new(self.code(), message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = self.to_token_error();
        let correlation_id = crate::correlation::current();
        let body = error.to_body(
            self.key().map(|key| key.tenant_id.as_str()),
            correlation_id.as_deref(),
        );
        let status =
            StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(body)).into_response();
        if let ApiError::DegradedLimitReached { retry_after, .. } = self {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(retry_after)),
            );
        }
        response
    }
}

/// Whole seconds to wait, rounded up (a client retrying earlier is refused again).
fn retry_after_secs(retry_after: Duration) -> u64 {
    retry_after
        .as_millis()
        .div_ceil(1_000)
        .try_into()
        .unwrap_or(u64::MAX)
}

/// Why the companion could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum CompanionError {
    /// A configuration value is invalid; the message names the flag.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The Redis client could not be set up from the configured URL.
    #[error("cannot set up the Redis client: {0}")]
    Redis(#[source] StoreError),
    /// The HTTP listener failed.
    #[error("the HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
    /// A key file could not be read or is invalid; the message names the flag and file.
    #[error("invalid configuration: {0}")]
    Keys(#[from] crate::keys::KeyError),
    /// The token API's HTTP client could not be built.
    #[error(transparent)]
    Client(#[from] crate::fetch::ClientError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengate_core::{ErrorBody, Provider, TenantId};

    fn key() -> TokenKey {
        TokenKey::new(Provider::whatsapp(), TenantId::parse("acme").unwrap())
    }

    async fn body_of(error: ApiError) -> (StatusCode, ErrorBody) {
        let response = error.into_response();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn cache_errors_answer_503_without_redis_detail() {
        let source = StoreError::Timeout(std::time::Duration::from_millis(7));
        let (status, body) = body_of(ApiError::CacheUnavailable { key: key(), source }).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body.code, ErrorCode::CacheUnavailable);
        assert_eq!(body.tenant_id.as_deref(), Some("acme"));
        assert!(!body.message.contains("7ms"), "{}", body.message);
    }

    #[tokio::test]
    async fn an_exhausted_wait_names_provider_tenant_and_wait() {
        let (status, body) = body_of(ApiError::LockWaitExhausted {
            key: key(),
            waited_ms: 250,
        })
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body.code, ErrorCode::LockAcquisitionFailed);
        assert!(body.message.contains("whatsapp token for tenant 'acme'"));
        assert!(body.message.contains("250 ms"));
    }

    #[tokio::test]
    async fn the_degraded_limit_answers_cache_unavailable_with_retry_after() {
        let response = ApiError::DegradedLimitReached {
            key: key(),
            per_minute: 6,
            retry_after: Duration::from_millis(12_001),
        }
        .into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "13");
        let (status, body) = body_of(ApiError::DegradedLimitReached {
            key: key(),
            per_minute: 6,
            retry_after: Duration::from_millis(12_001),
        })
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body.code, ErrorCode::CacheUnavailable);
        assert!(
            body.message
                .starts_with("Redis is unavailable and the degraded-mode limit of 6"),
            "{}",
            body.message
        );
        assert!(body.message.contains("tenant 'acme'"), "{}", body.message);
    }

    #[tokio::test]
    async fn invalid_requests_answer_400_without_a_tenant() {
        let (status, body) = body_of(ApiError::InvalidRequest("bad".into())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            (body.code, body.message.as_str(), body.tenant_id),
            (ErrorCode::InvalidRequest, "bad", None)
        );
    }
}
