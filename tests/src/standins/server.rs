//! Plumbing shared by the three servers: shared state, shutdown, the per-request
//! arrive/settle steps, the `/_standin/*` control routes and request logging.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher as _, RandomState};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::faults::{Arrival, Dialect, Endpoint, EndpointState, Fault, fault_response, lock};
use super::fixture::Fixture;

/// Largest request body the stand-ins read (the real services accept far less).
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Default `expires_in` of the login stand-in, as Genesys answers by default.
pub const DEFAULT_EXPIRES_IN_SECS: i64 = 86_399;

/// State shared by the three servers and the [`StandIns`](super::StandIns) handle.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Tenants, Tenant Service answers and login clients.
    pub(crate) fixture: Fixture,
    /// Counters, fault queues and latency, indexed by [`endpoint_index`].
    endpoints: [EndpointState; 3],
    /// `X-Service-Name` of the last Tenant Service request (`None`: header absent),
    /// so tests can check the gateway identifies itself.
    pub(crate) last_service_name: Mutex<Option<String>>,
    /// The W3C `traceparent` header of the last request, per [`endpoint_index`]
    /// (`None`: header absent), so tests can check trace context is passed on.
    last_traceparent: Mutex<[Option<String>; 3]>,
    /// Login requests sent to a host that is not the client's region's login host.
    pub(crate) wrong_host_calls: AtomicU64,
    /// Tokens issued by the login, per tenant, in issue order.
    pub(crate) issued: Mutex<BTreeMap<String, Vec<String>>>,
    /// When each issued token expires for the login (issue time plus `expires_in`).
    pub(crate) expiries: Mutex<HashMap<String, Instant>>,
    /// `expires_in` the login answers.
    pub(crate) expires_in: AtomicI64,
    /// Tokens issued so far; numbers each token so tokens are unique and ordered.
    pub(crate) tokens_minted: AtomicU64,
    /// Per-process random keys that make tokens unguessable across runs.
    pub(crate) token_entropy: RandomState,
    /// Fires when the stand-ins stop; releases hanging and delayed requests.
    pub(crate) shutdown: Shutdown,
}

fn endpoint_index(endpoint: Endpoint) -> usize {
    match endpoint {
        Endpoint::TenantService => 0,
        Endpoint::Login => 1,
        Endpoint::Echo => 2,
    }
}

impl Shared {
    pub(crate) fn new(fixture: Fixture, shutdown: Shutdown) -> Shared {
        Shared {
            fixture,
            endpoints: Default::default(),
            last_service_name: Mutex::new(None),
            last_traceparent: Mutex::new(Default::default()),
            wrong_host_calls: AtomicU64::new(0),
            issued: Mutex::new(BTreeMap::new()),
            expiries: Mutex::new(HashMap::new()),
            expires_in: AtomicI64::new(DEFAULT_EXPIRES_IN_SECS),
            tokens_minted: AtomicU64::new(0),
            token_entropy: RandomState::new(),
            shutdown,
        }
    }

    pub(crate) fn endpoint(&self, endpoint: Endpoint) -> &EndpointState {
        &self.endpoints[endpoint_index(endpoint)]
    }

    /// Step 1 of every request: count it, note its `traceparent`, and take its fault,
    /// if any.
    pub(crate) fn arrive(&self, endpoint: Endpoint, headers: &HeaderMap) -> Arrival {
        let traceparent = headers
            .get("traceparent")
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        lock(&self.last_traceparent)[endpoint_index(endpoint)] = traceparent;
        self.endpoint(endpoint).arrive()
    }

    /// The `traceparent` header of `endpoint`'s last request.
    pub(crate) fn last_traceparent(&self, endpoint: Endpoint) -> Option<String> {
        lock(&self.last_traceparent)[endpoint_index(endpoint)].clone()
    }

    /// Step 2 of every request: wait the latency, then apply the fault.
    ///
    /// Returns `None` when the handler should answer normally, or the response to send.
    pub(crate) async fn settle(&self, arrival: Arrival, dialect: &Dialect) -> Option<Response> {
        if self.shutdown.sleep(arrival.latency).await.is_err() {
            return Some(shutting_down());
        }
        match arrival.fault? {
            Fault::Delay(delay) => self
                .shutdown
                .sleep(delay)
                .await
                .err()
                .map(|_| shutting_down()),
            Fault::Hang => {
                self.shutdown.wait().await;
                Some(shutting_down())
            }
            fault => fault_response(&fault, dialect),
        }
    }

    pub(crate) fn wrong_host_calls(&self) -> u64 {
        self.wrong_host_calls.load(Ordering::SeqCst)
    }

    pub(crate) fn record_wrong_host(&self) {
        self.wrong_host_calls.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn expires_in(&self) -> i64 {
        self.expires_in.load(Ordering::SeqCst)
    }

    /// Mints a unique token for a tenant and records it and its expiry:
    /// `gen-<tenant>-<n>-<16 hex>`, with the `expires_in` to answer.
    pub(crate) fn issue_token(&self, tenant: &str) -> (String, i64) {
        let n = self.tokens_minted.fetch_add(1, Ordering::SeqCst) + 1;
        let noise = self.token_entropy.hash_one((n, tenant));
        let token = format!("gen-{tenant}-{n}-{noise:016x}");
        let expires_in = self.expires_in();
        let lifetime = Duration::from_secs(u64::try_from(expires_in).unwrap_or(0));
        lock(&self.expiries).insert(token.clone(), Instant::now() + lifetime);
        lock(&self.issued)
            .entry(tenant.to_owned())
            .or_default()
            .push(token.clone());
        (token, expires_in)
    }
}

/// The answer to requests cut short by shutdown.
fn shutting_down() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "stand-in shutting down").into_response()
}

/// The stand-ins are stopping (returned by [`Shutdown::sleep`]).
#[derive(Debug)]
pub(crate) struct ShuttingDown;

/// A handle on the stop signal: `true` once sent, or the sender dropped.
#[derive(Debug, Clone)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub(crate) fn new(receiver: watch::Receiver<bool>) -> Shutdown {
        Shutdown(receiver)
    }

    /// Resolves once the stand-ins stop.
    pub(crate) async fn wait(&self) {
        let mut receiver = self.0.clone();
        // An error means the sender is gone, which also means "stop".
        let _ = receiver.wait_for(|stopped| *stopped).await;
    }

    /// Sleeps for `duration` unless the stand-ins stop first.
    pub(crate) async fn sleep(&self, duration: Duration) -> Result<(), ShuttingDown> {
        if duration.is_zero() {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(duration) => Ok(()),
            () = self.wait() => Err(ShuttingDown),
        }
    }
}

/// What every handler of one server gets: the shared state and which endpoint it is.
#[derive(Debug, Clone)]
pub(crate) struct ServerCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) endpoint: Endpoint,
}

/// Response extension naming the client a login request was for, so the request log
/// can show it (the id only, never the secret or the token).
#[derive(Debug, Clone)]
pub(crate) struct LogClientId(pub(crate) String);

/// A server's router: the control routes, everything else to `handler`, all logged.
pub(crate) fn router<H, T>(ctx: ServerCtx, handler: H) -> Router
where
    H: Handler<T, ServerCtx>,
    T: 'static,
{
    let endpoint = ctx.endpoint;
    Router::new()
        .route("/_standin/calls", get(control_calls))
        .route("/_standin/fault", post(control_fault))
        .route("/_standin/latency", post(control_latency))
        .fallback(handler)
        .layer(middleware::from_fn_with_state(endpoint, log_request))
        .with_state(ctx)
}

/// Serves `router` on `listener` until `shutdown` fires, in a background task.
pub(crate) fn spawn_server(
    listener: TcpListener,
    router: Router,
    shutdown: Shutdown,
    endpoint: Endpoint,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(error) = served {
            tracing::error!(standin = endpoint.name(), %error, "stand-in server failed");
        }
    })
}

/// Logs one line per request: stand-in, method, path (no query), status, client id.
async fn log_request(State(endpoint): State<Endpoint>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let client_id = response
        .extensions()
        .get::<LogClientId>()
        .map(|client| client.0.as_str());
    tracing::info!(
        standin = endpoint.name(),
        %method,
        path,
        status = response.status().as_u16(),
        client_id,
        "request"
    );
    response
}

/// `GET /_standin/calls`: `{"calls": n}` (login adds `wrong_host_calls`).
async fn control_calls(State(ctx): State<ServerCtx>) -> Json<serde_json::Value> {
    let calls = ctx.shared.endpoint(ctx.endpoint).calls();
    let body = match ctx.endpoint {
        Endpoint::Login => json!({
            "calls": calls,
            "wrong_host_calls": ctx.shared.wrong_host_calls(),
        }),
        _ => json!({ "calls": calls }),
    };
    Json(body)
}

/// The body of `POST /_standin/fault`, e.g. `{"fault": "status", "status": 503}`.
#[derive(Debug, Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case")]
enum FaultRequest {
    Status { status: u16 },
    StatusWithBody { status: u16, body: String },
    Delay { millis: u64 },
    Hang,
    RateLimited,
    TooManyRequests { retry_after_secs: Option<u64> },
    InvalidClient,
    EmptyOk,
    GarbageOk,
}

impl From<FaultRequest> for Fault {
    fn from(request: FaultRequest) -> Fault {
        match request {
            FaultRequest::Status { status } => Fault::Status(status),
            FaultRequest::StatusWithBody { status, body } => Fault::StatusWithBody(status, body),
            FaultRequest::Delay { millis } => Fault::Delay(Duration::from_millis(millis)),
            FaultRequest::Hang => Fault::Hang,
            FaultRequest::RateLimited => Fault::RateLimited,
            FaultRequest::TooManyRequests { retry_after_secs } => {
                Fault::TooManyRequests { retry_after_secs }
            }
            FaultRequest::InvalidClient => Fault::InvalidClient,
            FaultRequest::EmptyOk => Fault::EmptyOk,
            FaultRequest::GarbageOk => Fault::GarbageOk,
        }
    }
}

/// `POST /_standin/fault`: queues a one-shot fault; answers `{"pending_faults": n}`.
async fn control_fault(
    State(ctx): State<ServerCtx>,
    Json(request): Json<FaultRequest>,
) -> Json<serde_json::Value> {
    let state = ctx.shared.endpoint(ctx.endpoint);
    state.push_fault(request.into());
    Json(json!({ "pending_faults": state.pending_faults() }))
}

/// The body of `POST /_standin/latency`.
#[derive(Debug, Deserialize)]
struct LatencyRequest {
    millis: u64,
}

/// `POST /_standin/latency` with `{"millis": n}`: sets the persistent added latency.
async fn control_latency(
    State(ctx): State<ServerCtx>,
    Json(request): Json<LatencyRequest>,
) -> Json<serde_json::Value> {
    ctx.shared
        .endpoint(ctx.endpoint)
        .set_latency(Duration::from_millis(request.millis));
    Json(json!({ "latency_millis": request.millis }))
}
