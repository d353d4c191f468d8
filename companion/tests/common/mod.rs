//! Test harness: a private `redis-server` per test, the real companion served by
//! [`tokengate_companion::run`] on a free port, and a small typed client.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokengate_companion::{Clock, Config};
use tokengate_core::lease::{
    ABORT_PATH, AbortRequest, COMMIT_PATH, CommitRequest, INVALIDATE_PATH, InvalidateRequest,
    LEASE_PATH, LeaseId, LeaseRequest, LeaseResponse,
};
use tokengate_core::{ErrorBody, Provider, SecretString, TenantId};

/// A `redis-server` on a free loopback port, killed when dropped.
pub struct RedisServer {
    /// The server process.
    child: Child,
    /// Where it listens.
    pub port: u16,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        for _ in 0..5 {
            let port = free_port();
            if let Some(server) = Self::start_on(port) {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts a server on `port` (e.g. again, after [`RedisServer::kill`]); `None` if it
    /// exited, e.g. because the port was taken meanwhile.
    pub fn start_on(port: u16) -> Option<Self> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install -y redis-server)");
        let mut server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if server
                .child
                .try_wait()
                .expect("redis-server status")
                .is_some()
            {
                return None;
            }
            if answers_ping(port) {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        server.kill();
        None
    }

    /// The URL the companion connects with.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered, the
    /// data survives. [`RedisServer::resume`] thaws it; dropping kills it either way.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a server frozen by [`RedisServer::pause`] (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// A connection for inspecting and arranging Redis state directly.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Runs one command and decodes its reply.
    pub async fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command
            .query_async(&mut self.connection().await)
            .await
            .unwrap()
    }

    /// How many times Redis ran `command` (from `INFO commandstats`).
    pub async fn calls(&self, command: &str) -> u64 {
        let info: String = self.query(&["INFO", "commandstats"]).await;
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |calls| calls.parse().unwrap())
    }

    /// Polls until `condition` holds on this server, or panics after `limit`.
    pub async fn wait_until<F, Fut>(&self, what: &str, limit: Duration, mut condition: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        while !condition().await {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `condition` every 10 ms until it holds, or panics after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// A test configuration for `redis`: short budgets, fast re-checks.
pub fn config(redis: &RedisServer) -> Config {
    config_for(redis.url())
}

/// A test configuration for the Redis at `redis_url`.
pub fn config_for(redis_url: String) -> Config {
    Config {
        redis_url: redis_url.into(),
        lock_ttl_ms: 5_000,
        lease_wait_ms: 3_000,
        recheck_interval_ms: 50,
        redis_timeout_ms: 500,
        ..Config::default()
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A wall clock the test moves by hand.
#[derive(Debug)]
pub struct ManualClock(pub std::sync::atomic::AtomicU64);

impl ManualClock {
    /// A clock reading `now_ms`.
    pub fn at(now_ms: u64) -> Arc<Self> {
        Arc::new(Self(std::sync::atomic::AtomicU64::new(now_ms)))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The companion, served by the library's `run` on a free port; stopped when dropped.
pub struct Companion {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Shared connection pool for the test's requests.
    pub http: reqwest::Client,
    /// Completes the shutdown future given to `run`.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Companion {
    /// Starts the companion with `config` and the system clock.
    pub async fn start(config: Config) -> Self {
        Self::start_with(config, None).await
    }

    /// Starts the companion with `config` and, if given, a test clock.
    pub async fn start_with(config: Config, clock: Option<Arc<dyn Clock>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        tokio::spawn(async move {
            let result = match clock {
                Some(clock) => {
                    tokengate_companion::run_with_clock(listener, config, clock, shutdown).await
                }
                None => tokengate_companion::run(listener, config, shutdown).await,
            };
            if let Err(error) = result {
                panic!("companion failed: {error}");
            }
        });
        Companion {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            stop: Some(stop),
        }
    }

    /// POSTs `body` (any JSON) to `path`.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Leases `tenant`'s Genesys token; returns the raw response.
    pub async fn lease_raw(&self, tenant: &str) -> reqwest::Response {
        self.lease_raw_owned(tenant, false).await
    }

    /// Like [`Companion::lease_raw`], as a future that can be spawned, optionally
    /// skipping the cache.
    pub fn lease_raw_owned(
        &self,
        tenant: &str,
        force_refresh: bool,
    ) -> impl std::future::Future<Output = reqwest::Response> + Send + 'static {
        let request = LeaseRequest {
            provider: Provider::genesys(),
            tenant_id: TenantId::parse(tenant).unwrap(),
            force_refresh,
            min_expires_at_ms: None,
        };
        let (http, url) = (self.http.clone(), format!("{}{LEASE_PATH}", self.base));
        async move { http.post(url).json(&request).send().await.unwrap() }
    }

    /// Leases `tenant`'s Genesys token, expecting 200.
    pub async fn lease(&self, tenant: &str) -> LeaseResponse {
        let response = self.lease_raw(tenant).await;
        assert_eq!(response.status(), 200, "lease of {tenant}");
        response.json().await.unwrap()
    }

    /// Leases `tenant`'s Genesys token skipping the cache (`forceRefresh`), expecting 200.
    pub async fn lease_forced(&self, tenant: &str) -> LeaseResponse {
        let response = self.lease_raw_owned(tenant, true).await;
        assert_eq!(response.status(), 200, "forced lease of {tenant}");
        response.json().await.unwrap()
    }

    /// Leases, expecting `fetch`; returns the lease id.
    pub async fn lease_fetch(&self, tenant: &str) -> LeaseId {
        match self.lease(tenant).await {
            LeaseResponse::Fetch { lease_id, .. } => lease_id,
            other => panic!("expected fetch for {tenant}, got {other:?}"),
        }
    }

    /// Commits `token` for `tenant` under `lease_id`; returns the status.
    pub async fn commit(
        &self,
        tenant: &str,
        lease_id: &LeaseId,
        token: &str,
        expires_at_ms: u64,
    ) -> u16 {
        let request = CommitRequest {
            provider: Provider::genesys(),
            tenant_id: TenantId::parse(tenant).unwrap(),
            lease_id: lease_id.clone(),
            access_token: SecretString::from(token),
            expires_at_ms,
        };
        let response = self
            .post(COMMIT_PATH, &serde_json::to_value(request).unwrap())
            .await;
        response.status().as_u16()
    }

    /// Invalidates `tenant`'s cached Genesys token (only if it is `token`, when given);
    /// returns the status.
    pub async fn invalidate(&self, tenant: &str, token: Option<&str>) -> u16 {
        let request = InvalidateRequest {
            provider: Provider::genesys(),
            tenant_id: TenantId::parse(tenant).unwrap(),
            access_token: token.map(SecretString::from),
        };
        let response = self
            .post(INVALIDATE_PATH, &serde_json::to_value(request).unwrap())
            .await;
        response.status().as_u16()
    }

    /// GETs `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    /// `GET /readyz`: the status and the JSON body.
    pub async fn readiness(&self) -> (u16, serde_json::Value) {
        let response = self.get("/readyz").await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// Polls `/readyz` until its status is `status`, for up to 10 s.
    pub async fn wait_until_ready_is(&self, status: u16) {
        eventually(
            &format!("/readyz answers {status}"),
            Duration::from_secs(10),
            || async { self.readiness().await.0 == status },
        )
        .await;
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> Metrics {
        let response = self.get("/metrics").await;
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        Metrics::parse(&response.text().await.unwrap())
    }

    /// Polls `/metrics` until `series` has `value`, for up to 10 s.
    pub async fn wait_until_metric(&self, series: &str, value: f64) {
        eventually(
            &format!("{series} is {value}"),
            Duration::from_secs(10),
            || async { self.metrics().await.get(series) == Some(value) },
        )
        .await;
    }

    /// Aborts `lease_id`; returns the status.
    pub async fn abort(&self, tenant: &str, lease_id: &LeaseId) -> u16 {
        let request = AbortRequest {
            provider: Provider::genesys(),
            tenant_id: TenantId::parse(tenant).unwrap(),
            lease_id: lease_id.clone(),
        };
        let response = self
            .post(ABORT_PATH, &serde_json::to_value(request).unwrap())
            .await;
        response.status().as_u16()
    }
}

impl Companion {
    /// Completes the shutdown future (as Ctrl-C or SIGTERM would for the binary).
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Companion {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads an error response: its status and JSON body (panics if the body is not ours).
pub async fn error_of(response: reqwest::Response) -> (u16, ErrorBody) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/json"));
    (status, response.json().await.unwrap())
}

/// Asserts a `hit` carrying `token` and `expires_at_ms`.
pub fn assert_hit(response: &LeaseResponse, token: &str, expires_at_ms: u64) {
    match response {
        LeaseResponse::Hit {
            access_token,
            expires_at_ms: at,
        } => {
            assert_eq!(access_token.expose(), token);
            assert_eq!(*at, expires_at_ms);
        }
        other => panic!("expected hit, got {other:?}"),
    }
}

/// Waits until the companion's pub/sub subscriber is subscribed on `redis`.
pub async fn wait_until_subscribed(redis: &RedisServer) {
    redis
        .wait_until(
            "the companion subscribed",
            Duration::from_secs(5),
            || async { redis.query::<i64>(&["PUBSUB", "NUMPAT"]).await >= 1 },
        )
        .await;
}

/// A parsed Prometheus text exposition: series (name and labels, as written) -> value.
#[derive(Debug)]
pub struct Metrics {
    /// Every sample.
    pub samples: std::collections::HashMap<String, f64>,
    /// The exposition as received.
    pub text: String,
}

impl Metrics {
    /// Parses the text format, checking that every line is a comment or a sample.
    pub fn parse(text: &str) -> Self {
        let mut samples = std::collections::HashMap::new();
        for line in text.lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number in {line:?}"));
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "{series} appears twice"
            );
        }
        Metrics {
            samples,
            text: text.to_owned(),
        }
    }

    /// The value of `series` (e.g. `tokengate_companion_leases_total{outcome="hit"}`).
    pub fn get(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// The value of `series`, which must exist.
    pub fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("{series} missing from:\n{}", self.text))
    }

    /// `tokengate_companion_leases_total{outcome="<outcome>"}`.
    pub fn leases(&self, outcome: &str) -> f64 {
        self.value(&format!(
            "tokengate_companion_leases_total{{outcome=\"{outcome}\"}}"
        ))
    }
}

/// The stand-ins (Tenant Service, Genesys login) of the tests crate, on free ports.
pub async fn standins() -> tokengate_tests::standins::StandIns {
    tokengate_tests::standins::StandIns::start(tokengate_tests::standins::Fixture::default_fixture())
        .await
        .expect("the stand-ins start")
}

/// A test configuration for `redis` with the token API on, against `standins`: every
/// region's login goes to the stand-in login (which checks the `Host` header).
pub fn token_api_config(
    redis: &RedisServer,
    standins: &tokengate_tests::standins::StandIns,
) -> Config {
    Config {
        tenant_service_url: Some(format!("http://{}", standins.tenant_service).into()),
        genesys_login_url_template: format!("http://{}", standins.login),
        fetch_deadline_ms: 4_000,
        tenant_service_timeout_ms: 1_000,
        oauth_timeout_ms: 1_000,
        ..config(redis)
    }
}

impl Companion {
    /// `POST /auth/token` for `tenant` and `provider`.
    pub async fn token(
        &self,
        tenant: &str,
        provider: &str,
        force_refresh: bool,
    ) -> reqwest::Response {
        self.token_at(&self.base, tenant, provider, force_refresh)
            .await
    }

    /// `POST /auth/token` at `base`, a future that can be spawned.
    pub fn token_at(
        &self,
        base: &str,
        tenant: &str,
        provider: &str,
        force_refresh: bool,
    ) -> impl std::future::Future<Output = reqwest::Response> + Send + 'static {
        let body = serde_json::json!({"tenantId": tenant, "type": provider, "forceRefresh": force_refresh});
        let (http, url) = (self.http.clone(), format!("{base}/auth/token"));
        async move { http.post(url).json(&body).send().await.unwrap() }
    }
}

/// Reads a `200` token response.
pub async fn token_of(response: reqwest::Response) -> tokengate_core::token_api::TokenResponse {
    assert_eq!(response.status(), 200, "expected a token");
    assert_eq!(response.headers()["cache-control"], "no-store");
    response.json().await.unwrap()
}

/// A `redis-server` configured with extra arguments (a password, TLS, cluster mode),
/// killed when dropped. Readiness is checked by the caller.
pub struct RedisProcess {
    /// The server process.
    child: Child,
    /// Its port.
    pub port: u16,
}

impl RedisProcess {
    /// Starts `redis-server --port <free> --bind 127.0.0.1 <args>`.
    pub fn start(args: &[&str]) -> Self {
        Self::start_on(free_port(), args)
    }

    /// Starts `redis-server --port <port> --bind 127.0.0.1 <args>`.
    pub fn start_on(port: u16, args: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        RedisProcess { child, port }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `redis-cli <args>`; returns its standard output, panicking if it fails.
pub fn redis_cli(args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(args)
        .output()
        .expect("redis-cli is installed");
    assert!(
        output.status.success(),
        "redis-cli {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Polls a blocking `condition` every 20 ms until it holds, or panics after `limit`.
/// It blocks its thread: use it only before an in-process companion is started (a
/// `#[tokio::test]` runs the companion on the test's own thread).
pub fn eventually_blocking(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
