//! The HTTP surface: routes, handlers, the internal API's key check, and the JSON
//! extractor whose rejections are answered with core's error body instead of axum's
//! plain-text ones.
//!
//! | method and path       | body                | success                           |
//! |-----------------------|---------------------|-----------------------------------|
//! | `POST /v1/lease`      | `LeaseRequest`      | 200 `LeaseResponse` (hit/fetch)   |
//! | `POST /v1/commit`     | `CommitRequest`     | 204                               |
//! | `POST /v1/abort`      | `AbortRequest`      | 204                               |
//! | `POST /v1/invalidate` | `InvalidateRequest` | 204                               |
//! | `GET /healthz`        |                     | 200 `{"status":"ok"}` (liveness)  |
//! | `GET /readyz`         |                     | 200 `{"status":"ready","redis":"healthy"}`; on a cluster with shards down 200 `{"status":"ready","redis":"degraded","down":[{"node","slots"}]}`; or 503 `{"status":"degraded","redis":"unhealthy"}` |
//! | `GET /metrics`        |                     | 200 Prometheus text               |
//! | `POST`/`GET /auth/token` | see [`crate::token_api`] | 200 `TokenResponse`       |
//!
//! With an internal API key configured, `/v1/*` requires it in `x-tokengate-key`
//! (compared in constant time; else `401 UNAUTHORIZED`); the probes, the metrics and
//! the token API stay open. Every request runs in a span carrying its correlation id
//! (see [`crate::correlation`]).
//!
//! Failures answer the status of their [`ErrorCode`](tokengate_core::ErrorCode) with an
//! [`ErrorBody`](tokengate_core::ErrorBody).

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use tokengate_core::TokenKey;
use tokengate_core::lease::{
    ABORT_PATH, AbortRequest, COMMIT_PATH, CommitRequest, INVALIDATE_PATH, InvalidateRequest,
    LEASE_PATH, LeaseRequest, LeaseResponse,
};

use crate::error::ApiError;
use crate::keys::{INTERNAL_API_KEY_HEADER, InternalApiKey};
use crate::lease::Service;
use crate::metrics::{self, Metrics};
use crate::{correlation, token_api};

/// Path of the liveness probe.
pub const HEALTH_PATH: &str = "/healthz";
/// Path of the readiness probe (Redis healthy or not).
pub const READY_PATH: &str = "/readyz";
/// Path of the Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";

/// Largest request body accepted; real ones are a few hundred bytes.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// Longest rejection message echoed to a client.
const MAX_MESSAGE_CHARS: usize = 300;

/// The companion's router around `service` with an open internal API and no token
/// API (what [`crate::run`] serves when neither is configured).
pub fn router(service: Arc<Service>) -> Router {
    finish(internal_router(service, None))
}

/// The internal API (`/v1/*`, guarded by `key` when given), the probes and the metrics.
/// Add the token API with [`Router::merge`], then [`finish`] it.
pub fn internal_router(service: Arc<Service>, key: Option<InternalApiKey>) -> Router {
    let mut v1 = Router::new()
        .route(LEASE_PATH, post(lease))
        .route(COMMIT_PATH, post(commit))
        .route(ABORT_PATH, post(abort))
        .route(INVALIDATE_PATH, post(invalidate));
    if let Some(key) = key {
        let guard = Arc::new(KeyGuard {
            key,
            metrics: Arc::clone(service.metrics()),
        });
        v1 = v1.route_layer(middleware::from_fn_with_state(guard, require_key));
    }
    v1.merge(probes())
        .route(READY_PATH, get(ready))
        .route(METRICS_PATH, get(metrics))
        .with_state(service)
}

/// The token API's own listener (`--token-api-listen`): `/auth/token` and `/healthz`.
pub fn token_api_router(api: Arc<token_api::TokenApi>) -> Router {
    finish(token_api::router(api).merge(probes()))
}

/// The liveness probe, on every listener.
fn probes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(HEALTH_PATH, get(health))
}

/// Adds what every listener has: JSON 404 and 405 answers, the body limit, and the
/// correlation id of every request.
pub fn finish(router: Router) -> Router {
    router
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(correlation::layer))
}

/// What the internal API's key check needs.
#[derive(Debug)]
struct KeyGuard {
    /// The key requests must present.
    key: InternalApiKey,
    /// Counts refusals.
    metrics: Arc<Metrics>,
}

/// Lets a request through only with the internal API key in `x-tokengate-key`.
async fn require_key(
    State(guard): State<Arc<KeyGuard>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(INTERNAL_API_KEY_HEADER)
        .map(|value| value.as_bytes());
    match presented {
        Some(presented) if guard.key.matches(presented) => Ok(next.run(request).await),
        _ => {
            guard.metrics.unauthorized();
            tracing::warn!(
                present = presented.is_some(),
                "internal API request refused: missing or wrong {INTERNAL_API_KEY_HEADER}"
            );
            Err(ApiError::Unauthorized)
        }
    }
}

async fn lease(
    State(service): State<Arc<Service>>,
    ApiJson(request): ApiJson<LeaseRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    let key = TokenKey::new(request.provider, request.tenant_id);
    service
        .lease(key, request.force_refresh, request.min_expires_at_ms)
        .await
        .map(Json)
}

async fn commit(
    State(service): State<Arc<Service>>,
    ApiJson(request): ApiJson<CommitRequest>,
) -> Result<StatusCode, ApiError> {
    service
        .commit(request)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

async fn abort(
    State(service): State<Arc<Service>>,
    ApiJson(request): ApiJson<AbortRequest>,
) -> Result<StatusCode, ApiError> {
    service
        .abort(request)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

async fn invalidate(
    State(service): State<Arc<Service>>,
    ApiJson(request): ApiJson<InvalidateRequest>,
) -> Result<StatusCode, ApiError> {
    service
        .invalidate(request)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

/// Liveness: the process serves requests (in degraded mode too).
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: whether Redis is healthy. A degraded companion still answers leases, from
/// its in-memory limiter; this tells operators and load balancers it runs without the
/// cluster cache and lock. A cluster with some shards down is still ready while any
/// shard answers (their keys alone are served in degraded mode); the body names them.
async fn ready(State(service): State<Arc<Service>>) -> (StatusCode, Json<serde_json::Value>) {
    if service.health().is_healthy() {
        let down: Vec<serde_json::Value> = service
            .health()
            .down_shards()
            .iter()
            .map(|shard| serde_json::json!({ "node": shard.node, "slots": shard.slots() }))
            .collect();
        let body = if down.is_empty() {
            serde_json::json!({ "status": "ready", "redis": "healthy" })
        } else {
            serde_json::json!({ "status": "ready", "redis": "degraded", "down": down })
        };
        (StatusCode::OK, Json(body))
    } else {
        let body = serde_json::json!({ "status": "degraded", "redis": "unhealthy" });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    }
}

/// The Prometheus text exposition.
async fn metrics(State(service): State<Arc<Service>>) -> impl IntoResponse {
    let text = service.metrics().render();
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::InvalidRequest(format!("method {method} is not allowed on {}", uri.path()))
}

/// `axum::Json`, but a rejection (wrong content type, bad JSON, a field that fails
/// validation such as the tenant id) becomes `400 INVALID_REQUEST` with our error body.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => {
                let message = rejection_message(&rejection);
                tracing::debug!(reason = %message, "rejected request body");
                Err(ApiError::InvalidRequest(message))
            }
        }
    }
}

/// The rejection's text, shortened. serde's messages name the field, the position and
/// the expected type; they quote a value only when its type is wrong, never a
/// well-formed string such as `accessToken`.
fn rejection_message(rejection: &JsonRejection) -> String {
    let text = rejection.body_text();
    if text.chars().count() <= MAX_MESSAGE_CHARS {
        text
    } else {
        let mut short: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
        short.push('…');
        short
    }
}
