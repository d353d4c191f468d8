//! A real OAuth 2.0 authorization server for end-to-end tests: panva's `oidc-provider`
//! (the exact version pinned in `tests/authserver/package.json`, installed by
//! `scripts/setup`) with the client credentials grant (RFC 6749 §4.4), run by
//! `tests/authserver/server.mjs` on a free loopback port like Redis.
//!
//! The launcher records every request to the token endpoint (client, authentication
//! method, `scope`, `resource`, `audience`, outcome; never a secret or a token) and
//! serves the record at `GET /__tokengate/calls`: [`AuthServer::token_requests`].
//! Access tokens for [`RESOURCE`] are JWTs whose audience is that resource; tokens
//! without a resource are opaque.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use crate::harness::{Process, free_port, workspace_root};

/// The resource server (RFC 8707 `resource`) the server knows: a client may get a JWT
/// access token for it with the scopes of its own `scope`; other resources are refused
/// with `invalid_target`.
pub const RESOURCE: &str = "https://api.crm.example";

/// The lifetime of access tokens when not given ([`AuthServer::start_with`]).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Where the launcher serves its record of token requests.
const CALLS_PATH: &str = "/__tokengate/calls";

/// How long the server may take to answer its discovery document after it starts.
const START_LIMIT: Duration = Duration::from_secs(30);

/// How a client is registered to authenticate at the token endpoint (RFC 6749 §2.3.1).
///
/// oidc-provider treats the two as one family: a client registered with either may
/// authenticate with either; only both at once, or neither, is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret_basic`: `Authorization: Basic base64(id:secret)`.
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post,
}

impl ClientAuth {
    /// The registered `token_endpoint_auth_method`.
    pub fn method(self) -> &'static str {
        match self {
            ClientAuth::Basic => "client_secret_basic",
            ClientAuth::Post => "client_secret_post",
        }
    }

    /// How the launcher reports a request that used this method
    /// ([`TokenRequestSeen::auth`]).
    pub fn seen(self) -> &'static str {
        match self {
            ClientAuth::Basic => "basic",
            ClientAuth::Post => "post",
        }
    }
}

/// A client registered at the server, allowed the client credentials grant only.
#[derive(Debug, Clone)]
pub struct AuthClient {
    /// Its `client_id`.
    pub id: String,
    /// Its `client_secret`.
    pub secret: String,
    /// How it is registered to authenticate.
    pub auth: ClientAuth,
    /// The scopes it may ask for, space-separated (`"crm.read crm.write"`); asking for
    /// another scope some other client has is refused with `invalid_scope`.
    pub scope: String,
}

impl AuthClient {
    /// Its registration, as oidc-provider reads it.
    fn metadata(&self) -> serde_json::Value {
        json!({
            "client_id": self.id,
            "client_secret": self.secret,
            "token_endpoint_auth_method": self.auth.method(),
            "grant_types": ["client_credentials"],
            "scope": self.scope,
            "redirect_uris": [],
            "response_types": [],
        })
    }
}

/// One request to the token endpoint, as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TokenRequestSeen {
    /// The client it named (authenticated or not); `None` when it named none.
    pub client_id: Option<String>,
    /// How it authenticated: `basic`, `post`, `basic+post` or `none`.
    pub auth: String,
    /// Its `grant_type`.
    pub grant_type: Option<String>,
    /// Its `scope` form value, as sent.
    pub scope: Option<String>,
    /// Its `resource` form values (RFC 8707).
    pub resource: Vec<String>,
    /// Its `audience` form values (not standard; some servers want it).
    pub audience: Vec<String>,
    /// The status of the answer.
    pub status: u16,
    /// The `error` of the answer (RFC 6749 §5.2), when it was one.
    pub error: Option<String>,
}

/// What `GET /__tokengate/calls` answers.
#[derive(Debug, Deserialize)]
struct Calls {
    token_requests: Vec<TokenRequestSeen>,
}

/// What the server's discovery document says that we need.
#[derive(Debug, Deserialize)]
struct Discovery {
    token_endpoint: String,
}

/// A running authorization server, killed when dropped.
#[derive(Debug)]
pub struct AuthServer {
    /// Where it listens, on 127.0.0.1; its issuer is `http://127.0.0.1:{port}`.
    pub port: u16,
    /// The process, to read its log or kill it.
    pub process: Process,
    /// The token endpoint its discovery document names.
    token_url: String,
    /// Reads the record of calls.
    http: reqwest::Client,
}

impl AuthServer {
    /// Starts the server with `clients` and tokens that live [`DEFAULT_TOKEN_TTL`],
    /// writing its files into `dir`, and waits until it answers.
    pub async fn start(dir: &Path, clients: &[AuthClient]) -> AuthServer {
        Self::start_with(dir, clients, DEFAULT_TOKEN_TTL).await
    }

    /// Starts the server with `clients` and tokens that live `token_ttl` (whole
    /// seconds, at least one), and waits until its discovery document answers (30 s at
    /// most). The port is free when chosen, but a process started by a concurrent test
    /// may bind it first: then the server exits at once and is started on another port.
    pub async fn start_with(dir: &Path, clients: &[AuthClient], token_ttl: Duration) -> AuthServer {
        const ATTEMPTS: u32 = 3;
        let root = workspace_root().join("tests/authserver");
        assert!(
            root.join("node_modules/oidc-provider").is_dir(),
            "oidc-provider is not installed in tests/authserver: run scripts/setup"
        );
        let clients_file = dir.join("authserver-clients.json");
        let metadata: Vec<serde_json::Value> = clients.iter().map(AuthClient::metadata).collect();
        std::fs::write(&clients_file, serde_json::Value::from(metadata).to_string())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", clients_file.display()));
        let ttl = token_ttl.as_secs().max(1).to_string();
        let http = reqwest::Client::new();
        let mut attempt = 1;
        loop {
            let port = free_port();
            let mut command = Command::new("node");
            command.current_dir(&root).arg("server.mjs").args([
                "--port",
                &port.to_string(),
                "--clients",
                &clients_file.to_string_lossy(),
                "--resource",
                RESOURCE,
                "--ttl",
                &ttl,
            ]);
            let log = dir.join(format!("authserver-{port}.log"));
            let mut process = Process::spawn("authserver", command, log);
            if let Some(discovery) = Self::wait_ready(&http, &mut process, port).await {
                return AuthServer {
                    port,
                    process,
                    token_url: discovery.token_endpoint,
                    http,
                };
            }
            assert!(
                attempt < ATTEMPTS && process.log_text().contains("EADDRINUSE"),
                "authserver exited before answering:\n{}",
                process.log_tail(40)
            );
            attempt += 1;
        }
    }

    /// Waits until the server just started on `port` serves its discovery document;
    /// `None` when it exits first.
    async fn wait_ready(
        http: &reqwest::Client,
        process: &mut Process,
        port: u16,
    ) -> Option<Discovery> {
        let url = format!("http://127.0.0.1:{port}/.well-known/openid-configuration");
        let started = Instant::now();
        loop {
            let answer = http
                .get(&url)
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            if let Ok(response) = answer {
                if response.status().is_success() {
                    let discovery = response
                        .json()
                        .await
                        .unwrap_or_else(|e| panic!("discovery document of the authserver: {e}"));
                    return Some(discovery);
                }
            }
            if !process.is_running() {
                return None;
            }
            assert!(
                started.elapsed() < START_LIMIT,
                "authserver not answering after {START_LIMIT:?}:\n{}",
                process.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The token endpoint, from the discovery document (`http://127.0.0.1:P/token`).
    pub fn token_url(&self) -> String {
        self.token_url.clone()
    }

    /// The host and port of the token endpoint (`127.0.0.1:P`).
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The path of the token endpoint (`/token`).
    pub fn token_path(&self) -> String {
        reqwest::Url::parse(&self.token_url)
            .map(|url| url.path().to_owned())
            .unwrap_or_else(|e| panic!("token endpoint {}: {e}", self.token_url))
    }

    /// Where the record of token requests is served, as JSON: `token_requests` (what
    /// [`AuthServer::token_requests`] returns), `count`, and `by_client` (client id to
    /// outcome, `ok` or the error code, to count).
    pub fn calls_url(&self) -> String {
        format!("http://127.0.0.1:{}{CALLS_PATH}", self.port)
    }

    /// Every request to the token endpoint so far, in arrival order.
    pub async fn token_requests(&self) -> Vec<TokenRequestSeen> {
        let url = self.calls_url();
        let calls: Calls = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("{url}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        calls.token_requests
    }

    /// How many requests to the token endpoint named `client_id`, whatever their outcome.
    pub async fn token_calls(&self, client_id: &str) -> usize {
        self.token_requests()
            .await
            .iter()
            .filter(|seen| seen.client_id.as_deref() == Some(client_id))
            .count()
    }
}
