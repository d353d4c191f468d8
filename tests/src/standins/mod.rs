//! Stand-ins for the services tokengate talks to but tests cannot reach: the Tenant
//! Service, the Genesys login (OAuth token endpoint) and an echo upstream app.
//!
//! [`StandIns::start`] runs all three as axum servers on `127.0.0.1` (ephemeral ports)
//! from one [`Fixture`]; the returned handle exposes their addresses and lets a test:
//!
//! - count requests per server ([`StandIns::calls`]), counted on arrival;
//! - queue one-shot faults ([`StandIns::push_fault`]): each request takes the oldest
//!   queued [`Fault`] of its server, later requests behave normally;
//! - add persistent latency ([`StandIns::set_latency`]);
//! - see what the login issued ([`StandIns::tokens_issued_to`]) and how often it was
//!   called on the wrong host ([`StandIns::wrong_host_calls`]);
//! - see the `X-Service-Name` the Tenant Service last received
//!   ([`StandIns::last_service_name`]).
//!
//! Per request the order is: count, (login: record a wrong host), wait the latency, then
//! answer with the fault if one was queued, else normally. Requests to
//! `/_standin/*` are control calls (below) and are neither counted nor faulted.
//!
//! Each server also answers, for curl and the demo binary:
//! `GET /_standin/calls` -> `{"calls": n}` (login adds `"wrong_host_calls"`),
//! `POST /_standin/fault` with e.g. `{"fault":"status","status":503}`,
//! `{"fault":"delay","millis":1500}`, `{"fault":"too_many_requests","retry_after_secs":3}`
//! or `{"fault":"rate_limited"|"hang"|"invalid_client"|"empty_ok"|"garbage_ok"}`, and
//! `POST /_standin/latency` with `{"millis": n}`.
//!
//! Modules: [`fixture`] (data), [`regions`] (the login's own region table),
//! `tenant_service`, `login`, `echo` (the three servers), `faults` and `server` (plumbing).

mod echo;
mod faults;
pub mod fixture;
mod login;
pub mod regions;
mod server;
mod tenant_service;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use faults::{Endpoint, Fault};
pub use fixture::{
    DEFAULT_FIXTURE_JSON, Fixture, FixtureError, GENERATED_TENANT_PREFIX, GenesysClient,
    LabelledSecret, SecretKind, default_fixture_path, generated_tenant_id,
};
pub use login::TOKEN_PATH;
pub use regions::{GENESYS_REGIONS, genesys_domain, genesys_login_host};
pub use server::DEFAULT_EXPIRES_IN_SECS;
pub use tenant_service::SERVICE_NAME_HEADER;

use faults::lock;
use server::{ServerCtx, Shared, Shutdown, spawn_server};

/// Builds one server's router from its context.
type MakeRouter = fn(ServerCtx) -> Router;

/// How long [`StandIns::shutdown`] waits for the servers to finish before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Ports to bind on `127.0.0.1`; 0 picks a free one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// Port of the Tenant Service stand-in.
    pub tenant_service: u16,
    /// Port of the Genesys login stand-in.
    pub login: u16,
    /// Port of the echo upstream.
    pub echo: u16,
}

impl Ports {
    /// Free ports chosen by the OS: what tests use.
    pub const EPHEMERAL: Ports = Ports {
        tenant_service: 0,
        login: 0,
        echo: 0,
    };

    /// The fixed ports of the demo binary and the demo Envoy config.
    pub const DEMO: Ports = Ports {
        tenant_service: 18081,
        login: 18082,
        echo: 18083,
    };
}

/// The three running stand-in servers. Dropping the handle stops them.
#[derive(Debug)]
pub struct StandIns {
    /// Address of the Tenant Service stand-in.
    pub tenant_service: SocketAddr,
    /// Address of the Genesys login stand-in (serves every region's login host).
    pub login: SocketAddr,
    /// Address of the echo upstream.
    pub echo: SocketAddr,
    /// Counters, faults and records, shared with the servers.
    shared: Arc<Shared>,
    /// Sending `true` (or dropping this) stops the servers and releases hung requests.
    stop: watch::Sender<bool>,
    /// The server tasks, awaited by [`StandIns::shutdown`].
    servers: Vec<JoinHandle<()>>,
}

impl StandIns {
    /// Starts the three stand-ins on free ports of `127.0.0.1`.
    pub async fn start(fixture: Fixture) -> io::Result<StandIns> {
        StandIns::start_on(fixture, Ports::EPHEMERAL).await
    }

    /// Starts the three stand-ins on the given ports of `127.0.0.1`.
    ///
    /// Fails if a port cannot be bound; nothing is left running then.
    pub async fn start_on(fixture: Fixture, ports: Ports) -> io::Result<StandIns> {
        let bind = |port: u16| TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        let tenant_service = bind(ports.tenant_service).await?;
        let login = bind(ports.login).await?;
        let echo = bind(ports.echo).await?;

        let (stop, stopped) = watch::channel(false);
        let shutdown = Shutdown::new(stopped);
        let shared = Arc::new(Shared::new(fixture, shutdown.clone()));
        let mut standins = StandIns {
            tenant_service: tenant_service.local_addr()?,
            login: login.local_addr()?,
            echo: echo.local_addr()?,
            shared: Arc::clone(&shared),
            stop,
            servers: Vec::with_capacity(3),
        };
        let servers: [(TcpListener, Endpoint, MakeRouter); 3] = [
            (
                tenant_service,
                Endpoint::TenantService,
                tenant_service::router,
            ),
            (login, Endpoint::Login, login::router),
            (echo, Endpoint::Echo, echo::router),
        ];
        for (listener, endpoint, router) in servers {
            let ctx = ServerCtx {
                shared: Arc::clone(&shared),
                endpoint,
            };
            standins.servers.push(spawn_server(
                listener,
                router(ctx),
                shutdown.clone(),
                endpoint,
            ));
        }
        Ok(standins)
    }

    /// The address of one stand-in.
    pub fn addr(&self, endpoint: Endpoint) -> SocketAddr {
        match endpoint {
            Endpoint::TenantService => self.tenant_service,
            Endpoint::Login => self.login,
            Endpoint::Echo => self.echo,
        }
    }

    /// The base URL of one stand-in, e.g. `http://127.0.0.1:18082` (no trailing slash).
    pub fn url(&self, endpoint: Endpoint) -> String {
        format!("http://{}", self.addr(endpoint))
    }

    /// The fixture the stand-ins serve.
    pub fn fixture(&self) -> &Fixture {
        &self.shared.fixture
    }

    /// Requests the stand-in has received so far (control calls excluded).
    pub fn calls(&self, endpoint: Endpoint) -> u64 {
        self.shared.endpoint(endpoint).calls()
    }

    /// Queues a one-shot fault: the next request to `endpoint` without an earlier
    /// queued fault gets it (first in, first out).
    pub fn push_fault(&self, endpoint: Endpoint, fault: Fault) {
        self.shared.endpoint(endpoint).push_fault(fault);
    }

    /// Faults queued for `endpoint` and not yet taken by a request.
    pub fn pending_faults(&self, endpoint: Endpoint) -> usize {
        self.shared.endpoint(endpoint).pending_faults()
    }

    /// Drops the faults queued for `endpoint`.
    pub fn clear_faults(&self, endpoint: Endpoint) {
        self.shared.endpoint(endpoint).clear_faults();
    }

    /// Sets the latency added before every answer of `endpoint` (zero to remove it).
    pub fn set_latency(&self, endpoint: Endpoint, latency: Duration) {
        self.shared.endpoint(endpoint).set_latency(latency);
    }

    /// Tokens the login issued for a tenant, oldest first. Accepts a tenant id or a
    /// Genesys client id; unknown names give an empty list.
    pub fn tokens_issued_to(&self, tenant_or_client: &str) -> Vec<String> {
        let Some(tenant) = self.shared.fixture.resolve_tenant(tenant_or_client) else {
            return Vec::new();
        };
        lock(&self.shared.issued)
            .get(tenant)
            .cloned()
            .unwrap_or_default()
    }

    /// When `token` (as issued, without `Bearer `) expires for the login that issued it:
    /// its issue time plus the `expires_in` it was answered with.
    pub fn token_expiry(&self, token: &str) -> Option<Instant> {
        lock(&self.shared.expiries).get(token).copied()
    }

    /// A handle on every secret the stand-ins know or will issue, readable after they
    /// stopped: what the harness's leak scan searches for.
    pub fn secrets(&self) -> Secrets {
        Secrets {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Total tokens the login issued, all tenants.
    pub fn tokens_issued(&self) -> u64 {
        self.shared.tokens_minted.load(Ordering::SeqCst)
    }

    /// Sets the `expires_in` the login answers (default [`DEFAULT_EXPIRES_IN_SECS`]).
    pub fn set_expires_in(&self, secs: i64) {
        self.shared.expires_in.store(secs, Ordering::SeqCst);
    }

    /// Login requests sent with a host that is not the client's region's login host.
    /// A correct gateway keeps this at 0.
    pub fn wrong_host_calls(&self) -> u64 {
        self.shared.wrong_host_calls()
    }

    /// The W3C `traceparent` header of `endpoint`'s last request; `None` if that request
    /// had none or there was no request yet.
    pub fn last_traceparent(&self, endpoint: Endpoint) -> Option<String> {
        self.shared.last_traceparent(endpoint)
    }

    /// The `X-Service-Name` header of the last Tenant Service request; `None` if that
    /// request had none or there was no request yet.
    pub fn last_service_name(&self) -> Option<String> {
        lock(&self.shared.last_service_name).clone()
    }

    /// Stops the servers and waits for them to finish (hung requests are released
    /// with a 503); servers still busy after 5 s are aborted.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        for server in std::mem::take(&mut self.servers) {
            let abort = server.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for StandIns {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Every secret of one set of stand-ins: the fixture's (client secrets, their `Basic`
/// headers, WhatsApp tokens) and every token the login issued so far.
#[derive(Debug, Clone)]
pub struct Secrets {
    shared: Arc<Shared>,
}

impl Secrets {
    /// The secrets as of now, labelled.
    pub fn all(&self) -> Vec<LabelledSecret> {
        let mut secrets = self.shared.fixture.secrets();
        for (tenant, tokens) in lock(&self.shared.issued).iter() {
            for (n, token) in tokens.iter().enumerate() {
                secrets.push(LabelledSecret::token(
                    format!("access token #{} of {tenant}", n + 1),
                    token,
                ));
            }
        }
        secrets
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    async fn start() -> (StandIns, reqwest::Client) {
        let standins = StandIns::start(Fixture::default_fixture())
            .await
            .expect("stand-ins start");
        (standins, reqwest::Client::new())
    }

    #[tokio::test]
    async fn servers_listen_on_distinct_loopback_ports() {
        let (standins, _) = start().await;
        let addrs = Endpoint::ALL.map(|e| standins.addr(e));
        for addr in addrs {
            assert!(addr.ip().is_loopback());
            assert_ne!(addr.port(), 0);
        }
        assert_ne!(addrs[0], addrs[1]);
        assert_ne!(addrs[1], addrs[2]);
        assert_ne!(addrs[0], addrs[2]);
    }

    #[tokio::test]
    async fn control_calls_reports_the_count_and_is_not_counted() {
        let (standins, client) = start().await;
        client
            .get(format!("{}/anything", standins.url(Endpoint::Echo)))
            .send()
            .await
            .expect("request");
        for endpoint in Endpoint::ALL {
            let body: Value = client
                .get(format!("{}/_standin/calls", standins.url(endpoint)))
                .send()
                .await
                .expect("request")
                .json()
                .await
                .expect("json");
            let expected = if endpoint == Endpoint::Echo { 1 } else { 0 };
            assert_eq!(body["calls"], expected, "{endpoint}");
        }
        assert_eq!(standins.calls(Endpoint::Echo), 1);
        assert_eq!(standins.calls(Endpoint::Login), 0);
    }

    #[tokio::test]
    async fn control_fault_and_latency_routes_queue_and_set() {
        let (standins, client) = start().await;
        let base = standins.url(Endpoint::TenantService);
        let queued: Value = client
            .post(format!("{base}/_standin/fault"))
            .json(&json!({"fault": "status", "status": 503}))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        assert_eq!(queued, json!({"pending_faults": 1}));
        let unknown = client
            .post(format!("{base}/_standin/fault"))
            .json(&json!({"fault": "explode"}))
            .send()
            .await
            .expect("request");
        assert!(unknown.status().is_client_error());
        assert_eq!(standins.pending_faults(Endpoint::TenantService), 1);
        let latency = client
            .post(format!("{base}/_standin/latency"))
            .json(&json!({"millis": 0}))
            .send()
            .await
            .expect("request");
        assert_eq!(latency.status(), 200);

        let faulted = client
            .get(format!("{base}/tenants/acme/credentials/genesys"))
            .send()
            .await
            .expect("request");
        assert_eq!(faulted.status(), 503);
        assert_eq!(standins.pending_faults(Endpoint::TenantService), 0);
        assert_eq!(standins.calls(Endpoint::TenantService), 1);
    }

    #[tokio::test]
    async fn tokens_issued_to_unknown_names_is_empty() {
        let (standins, _) = start().await;
        assert!(standins.tokens_issued_to("nobody").is_empty());
        assert_eq!(standins.tokens_issued(), 0);
    }

    #[tokio::test]
    async fn fixed_ports_in_use_fail_cleanly() {
        let (standins, _) = start().await;
        let taken = Ports {
            tenant_service: 0,
            login: standins.login.port(),
            echo: 0,
        };
        let error = StandIns::start_on(Fixture::default_fixture(), taken)
            .await
            .expect_err("port in use");
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn shutdown_stops_the_servers() {
        let (standins, client) = start().await;
        let url = format!("{}/x", standins.url(Endpoint::Echo));
        standins.shutdown().await;
        assert!(client.get(url).send().await.is_err());
    }
}
