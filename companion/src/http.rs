//! The HTTP surface: routes, handlers, and the JSON extractor whose rejections are
//! answered with core's error body instead of axum's plain-text ones.
//!
//! | method and path       | body                | success                           |
//! |-----------------------|---------------------|-----------------------------------|
//! | `POST /v1/lease`      | `LeaseRequest`      | 200 `LeaseResponse` (hit/fetch)   |
//! | `POST /v1/commit`     | `CommitRequest`     | 204                               |
//! | `POST /v1/abort`      | `AbortRequest`      | 204                               |
//! | `POST /v1/invalidate` | `InvalidateRequest` | 204                               |
//! | `GET /healthz`        |                     | 200 `{"status":"ok"}` (liveness)  |
//! | `GET /readyz`         |                     | 200 `{"status":"ready","redis":"healthy"}`, or 503 `{"status":"degraded","redis":"unhealthy"}` |
//! | `GET /metrics`        |                     | 200 Prometheus text               |
//!
//! Failures answer the status of their [`ErrorCode`](tokengate_core::ErrorCode) with an
//! [`ErrorBody`](tokengate_core::ErrorBody).

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::IntoResponse;
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
use crate::lease::Service;
use crate::metrics;

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

/// Builds the companion's router around `service`.
pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .route(LEASE_PATH, post(lease))
        .route(COMMIT_PATH, post(commit))
        .route(ABORT_PATH, post(abort))
        .route(INVALIDATE_PATH, post(invalidate))
        .route(HEALTH_PATH, get(health))
        .route(READY_PATH, get(ready))
        .route(METRICS_PATH, get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(service)
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
/// cluster cache and lock.
async fn ready(State(service): State<Arc<Service>>) -> (StatusCode, Json<serde_json::Value>) {
    if service.health().is_healthy() {
        let body = serde_json::json!({ "status": "ready", "redis": "healthy" });
        (StatusCode::OK, Json(body))
    } else {
        let body = serde_json::json!({ "status": "degraded", "redis": "unhealthy" });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    }
}

/// The Prometheus text exposition.
async fn metrics(State(service): State<Arc<Service>>) -> impl IntoResponse {
    let text = service.metrics().render(service.health());
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
