//! Fault injection and per-endpoint bookkeeping: call counters, one-shot faults, added latency.
//!
//! Every stand-in endpoint owns an [`EndpointState`]. A request to the endpoint (other
//! than the `/_standin/*` control routes) is counted on arrival, then waits for the
//! endpoint's persistent latency, then takes the oldest queued [`Fault`] if any
//! ([`EndpointState::arrive`]). Faults are rendered in the endpoint's own error dialect
//! ([`Dialect`]) so the gateway sees realistic bodies.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// One of the three stand-in servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// The Tenant Service: `GET /tenants/{id}/credentials/{type}`.
    TenantService,
    /// The Genesys login: `POST /oauth/token`.
    Login,
    /// The echo upstream app: any method, any path.
    Echo,
}

impl Endpoint {
    /// All endpoints, in a fixed order.
    pub const ALL: [Endpoint; 3] = [Endpoint::TenantService, Endpoint::Login, Endpoint::Echo];

    /// Short name used in logs: `tenant-service`, `login`, `echo`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::TenantService => "tenant-service",
            Endpoint::Login => "login",
            Endpoint::Echo => "echo",
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A one-shot misbehaviour for the next request to an endpoint.
///
/// Error bodies follow the endpoint's dialect: `{"error","message"}` for the Tenant
/// Service, `{"error","description","error_description"}` for the Genesys login, and
/// the usual echo JSON for the echo upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status with a realistic error body for the endpoint.
    Status(u16),
    /// Answer this status with exactly this body (`Content-Type: application/json`).
    StatusWithBody(u16, String),
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Never answer. The request stays open until the client gives up; when the
    /// stand-ins shut down it is released with a 503 so shutdown is not blocked.
    Hang,
    /// Rate limiting. Login: Genesys-style HTTP 400 `invalid_request` whose description
    /// is `rate limit exceeded`. Other endpoints: HTTP 429.
    RateLimited,
    /// HTTP 429, with a `Retry-After: <secs>` header when given.
    TooManyRequests {
        /// Value of the `Retry-After` header, in seconds; `None` sends no header.
        retry_after_secs: Option<u64>,
    },
    /// Credentials rejected. Login: HTTP 400 `invalid_client` / `client not found`.
    /// Other endpoints: HTTP 401.
    InvalidClient,
    /// HTTP 200 with an empty body.
    EmptyOk,
    /// HTTP 200 with a non-JSON (HTML) body, labelled `Content-Type: application/json`.
    GarbageOk,
}

/// Locks a mutex, ignoring poisoning: the guarded data stays consistent (plain values).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What an endpoint remembers across requests for counting and fault injection.
#[derive(Debug, Default)]
pub(crate) struct EndpointState {
    /// Requests received so far, counted on arrival (before latency and faults).
    calls: AtomicU64,
    /// One-shot faults, oldest first; each request takes at most one.
    faults: Mutex<VecDeque<Fault>>,
    /// Added before every answer, until changed.
    latency: Mutex<Duration>,
}

/// What a request learns on arrival: how long to wait and whether to misbehave.
#[derive(Debug)]
pub(crate) struct Arrival {
    pub(crate) latency: Duration,
    pub(crate) fault: Option<Fault>,
}

impl EndpointState {
    /// Counts a request and takes the next fault, if any.
    pub(crate) fn arrive(&self) -> Arrival {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Arrival {
            latency: *lock(&self.latency),
            fault: lock(&self.faults).pop_front(),
        }
    }

    pub(crate) fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    pub(crate) fn push_fault(&self, fault: Fault) {
        lock(&self.faults).push_back(fault);
    }

    pub(crate) fn pending_faults(&self) -> usize {
        lock(&self.faults).len()
    }

    pub(crate) fn clear_faults(&self) {
        lock(&self.faults).clear();
    }

    pub(crate) fn set_latency(&self, latency: Duration) {
        *lock(&self.latency) = latency;
    }
}

/// How an endpoint writes its error bodies.
#[derive(Debug)]
pub(crate) enum Dialect {
    /// `{"error": code, "message": text}`
    TenantService,
    /// `{"error": code, "description": text, "error_description": text}`
    Login,
    /// The echo of the request, whatever the status.
    Echo(serde_json::Value),
}

impl Dialect {
    /// An error response in this dialect.
    pub(crate) fn error(&self, status: StatusCode, code: &str, message: &str) -> Response {
        let body = match self {
            Dialect::TenantService => json!({ "error": code, "message": message }),
            Dialect::Login => genesys_error_body(code, message),
            Dialect::Echo(echo) => echo.clone(),
        };
        (status, axum::Json(body)).into_response()
    }

    /// The error code this dialect uses for a bare status.
    fn code_for(&self, status: StatusCode) -> String {
        if let Dialect::Login = self {
            let oauth = match status.as_u16() {
                400 => Some("invalid_request"),
                401 => Some("invalid_client"),
                403 => Some("access_denied"),
                429 => Some("too_many_requests"),
                503 => Some("temporarily_unavailable"),
                500..=599 => Some("server_error"),
                _ => None,
            };
            if let Some(code) = oauth {
                return code.to_owned();
            }
        }
        status
            .canonical_reason()
            .map(|reason| reason.to_ascii_lowercase().replace([' ', '-'], "_"))
            .unwrap_or_else(|| "error".to_owned())
    }
}

/// The Genesys login's error body: `{"error","description","error_description"}`.
pub(crate) fn genesys_error_body(code: &str, message: &str) -> serde_json::Value {
    json!({ "error": code, "description": message, "error_description": message })
}

/// A status usable as a final answer (200..=599).
fn final_status(code: u16) -> Option<StatusCode> {
    StatusCode::from_u16(code)
        .ok()
        .filter(|_| (200..=599).contains(&code))
}

/// The answer to an injected status that cannot be a final one: an explained 500.
fn bad_injected_status(code: u16) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("stand-in: injected status {code} is not a final HTTP status (200..=599)"),
    )
        .into_response()
}

/// The response for a fault that answers immediately.
///
/// `Delay` and `Hang` are timing faults handled by the caller; given here they yield
/// `None` (answer normally).
pub(crate) fn fault_response(fault: &Fault, dialect: &Dialect) -> Option<Response> {
    let response = match fault {
        Fault::Delay(_) | Fault::Hang => return None,
        Fault::Status(code) => match final_status(*code) {
            Some(status) => {
                let message = format!("injected fault: HTTP {code}");
                dialect.error(status, &dialect.code_for(status), &message)
            }
            None => bad_injected_status(*code),
        },
        Fault::StatusWithBody(code, body) => match final_status(*code) {
            Some(status) => json_text(status, body.clone()),
            None => bad_injected_status(*code),
        },
        Fault::RateLimited => match dialect {
            Dialect::Login => dialect.error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "rate limit exceeded",
            ),
            _ => dialect.error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "rate limit exceeded",
            ),
        },
        Fault::TooManyRequests { retry_after_secs } => {
            let mut response = dialect.error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "rate limit exceeded",
            );
            if let Some(secs) = retry_after_secs {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            response
        }
        Fault::InvalidClient => match dialect {
            Dialect::Login => dialect.error(
                StatusCode::BAD_REQUEST,
                "invalid_client",
                "client not found",
            ),
            _ => dialect.error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "credentials rejected",
            ),
        },
        Fault::EmptyOk => json_text(StatusCode::OK, String::new()),
        Fault::GarbageOk => json_text(
            StatusCode::OK,
            "<html><body><h1>502 Bad Gateway</h1></body></html>".to_owned(),
        ),
    };
    Some(response)
}

/// A response with this exact body, labelled as JSON.
fn json_text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_taken_oldest_first_one_per_request() {
        let state = EndpointState::default();
        state.push_fault(Fault::Status(503));
        state.push_fault(Fault::EmptyOk);
        assert_eq!(state.arrive().fault, Some(Fault::Status(503)));
        assert_eq!(state.arrive().fault, Some(Fault::EmptyOk));
        assert_eq!(state.arrive().fault, None);
        assert_eq!(state.calls(), 3);
    }

    #[test]
    fn latency_persists_until_changed() {
        let state = EndpointState::default();
        state.set_latency(Duration::from_millis(250));
        assert_eq!(state.arrive().latency, Duration::from_millis(250));
        assert_eq!(state.arrive().latency, Duration::from_millis(250));
        state.set_latency(Duration::ZERO);
        assert_eq!(state.arrive().latency, Duration::ZERO);
    }

    #[test]
    fn login_codes_follow_oauth_names() {
        assert_eq!(
            Dialect::Login.code_for(StatusCode::SERVICE_UNAVAILABLE),
            "temporarily_unavailable"
        );
        assert_eq!(
            Dialect::Login.code_for(StatusCode::BAD_GATEWAY),
            "server_error"
        );
        assert_eq!(
            Dialect::TenantService.code_for(StatusCode::SERVICE_UNAVAILABLE),
            "service_unavailable"
        );
        assert_eq!(
            Dialect::TenantService.code_for(StatusCode::INTERNAL_SERVER_ERROR),
            "internal_server_error"
        );
    }

    #[test]
    fn non_final_injected_status_becomes_an_explained_500() {
        let response =
            fault_response(&Fault::Status(42), &Dialect::TenantService).expect("answers");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
