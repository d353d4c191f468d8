//! The HTTP surface: routes, handlers, and the JSON extractor whose rejections are
//! answered with core's error body instead of axum's plain-text ones.
//!
//! | method and path   | body             | success                        |
//! |-------------------|------------------|--------------------------------|
//! | `POST /v1/lease`  | `LeaseRequest`   | 200 `LeaseResponse` (hit/fetch)|
//! | `POST /v1/commit` | `CommitRequest`  | 204                            |
//! | `POST /v1/abort`  | `AbortRequest`   | 204                            |
//! | `GET /healthz`    |                  | 200 `{"status":"ok"}`          |
//!
//! Failures answer the status of their [`ErrorCode`](tokengate_core::ErrorCode) with an
//! [`ErrorBody`](tokengate_core::ErrorBody).

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use tokengate_core::TokenKey;
use tokengate_core::lease::{
    ABORT_PATH, AbortRequest, COMMIT_PATH, CommitRequest, LEASE_PATH, LeaseRequest, LeaseResponse,
};

use crate::error::ApiError;
use crate::lease::Service;

/// Path of the liveness probe.
pub const HEALTH_PATH: &str = "/healthz";

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
        .route(HEALTH_PATH, get(health))
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
    service.lease(key, request.force_refresh).await.map(Json)
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

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
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
