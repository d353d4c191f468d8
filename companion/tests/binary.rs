//! The `tokengate-companion` binary as operators run it: start-up errors, logs (no
//! secret ever, a correlation id on every request line, text or JSON), and graceful
//! shutdown on SIGTERM.

mod common;

use common::{RedisServer, free_port, standins};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokengate_tests::standins::{Endpoint, Fault, StandIns};

const LOCK: &str = "tokengate:{genesys:acme}:lock";
const TOKEN: &str = "tokengate:{genesys:acme}:token";
/// The stand-in Tenant Service's client secret for acme.
const ACME_SECRET: &str = "acme-secret-7f3a9c";

/// The companion binary running on a free port; killed when dropped.
struct Binary {
    child: Option<Child>,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    /// Starts the binary with `args` and `env` (nothing else from the test's
    /// environment), and waits until `/healthz` answers.
    async fn start(args: &[&str], env: &[(&str, &str)]) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("companion.log");
        let file = std::fs::File::create(&log).unwrap();
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_tokengate-companion"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut binary = Binary {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(response) = http.get(format!("{}/healthz", binary.base)).send().await {
                if response.status() == 200 {
                    return binary;
                }
            }
            if let Some(status) = binary.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the companion exited ({status}):\n{}", binary.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "no /healthz:\n{}",
                binary.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, for at most `limit`; returns its status.
    async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {limit:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The token API flags for `redis` and `standins`.
fn token_api_args(redis: &RedisServer, standins: &StandIns) -> Vec<String> {
    vec![
        "--redis-url".into(),
        redis.url(),
        "--tenant-service-url".into(),
        format!("http://{}", standins.tenant_service),
        "--genesys-login-url-template".into(),
        format!("http://{}", standins.login),
    ]
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Runs the binary with `args` and `env`, expecting it to refuse to start.
fn refused(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tokengate-companion"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_values_stop_start_up_with_a_message_naming_the_flag() {
    /// Arguments, environment, and what the message must name.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let providers = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(providers.path(), r#"{"crm":{"kind":"oauth2","scope":""}}"#).unwrap();
    let providers = providers.path().display().to_string();
    let cases: [Case; 8] = [
        (
            &[
                "--tenant-service-url",
                "http://127.0.0.1:1",
                "--fetch-deadline-ms",
                "40000",
            ],
            &[],
            "--fetch-deadline-ms",
        ),
        (
            &["--encryption-key-file", "/nonexistent/keys"],
            &[],
            "--encryption-key-file",
        ),
        (
            &["--redis-url", "http://127.0.0.1:6379"],
            &[],
            "--redis-url",
        ),
        (&[], &[("TOKENGATE_LOCK_TTL_MS", "0")], "--lock-ttl-ms"),
        (
            &[],
            &[("TOKENGATE_INTERNAL_API_KEY", "short")],
            "at least 16",
        ),
        (&["--log-format", "xml"], &[], "--log-format"),
        (
            &["--providers-file", &providers],
            &[],
            "crm.tokenUrl: is required",
        ),
        (
            &["--providers-file", "/nonexistent/providers.json"],
            &[],
            "--providers-file",
        ),
    ];
    for (args, env, mentions) in cases {
        let (code, stderr) = refused(args, env);
        assert_eq!(code, 2, "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(mentions), "{args:?} {env:?}: {stderr}");
    }
}

#[tokio::test]
async fn the_key_in_the_environment_guards_the_binary_internal_api() {
    let redis = RedisServer::start();
    let key = "fleet-key-from-the-environment";
    let binary = Binary::start(
        &["--redis-url", &redis.url()],
        &[("TOKENGATE_INTERNAL_API_KEY", key)],
    )
    .await;
    let http = reqwest::Client::new();
    let lease = |key: Option<&'static str>| {
        let mut request = http
            .post(format!("{}/v1/lease", binary.base))
            .json(&serde_json::json!({"provider": "genesys", "tenantId": "acme"}));
        if let Some(key) = key {
            request = request.header("x-tokengate-key", key);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(lease(None).await, 401);
    assert_eq!(lease(Some("fleet-key-from-the-environment")).await, 200);
    assert!(!binary.log_text().contains(key));
}

#[tokio::test]
async fn without_a_key_the_open_internal_api_is_warned_about() {
    let redis = RedisServer::start();
    let binary = Binary::start(&["--redis-url", &redis.url()], &[]).await;
    let log = binary.log_text();
    assert!(
        log.contains("WARN") && log.contains("internal API (/v1/*) is open"),
        "{log}"
    );
}

/// Every secret of a fetch through the token API, and of a lease's commit.
fn secrets(standins: &StandIns, issued: &str) -> Vec<String> {
    use base64::Engine as _;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("acme-client:{ACME_SECRET}"));
    let mut all = vec![ACME_SECRET.to_owned(), basic, issued.to_owned()];
    all.extend(standins.tokens_issued_to("acme"));
    all.push("committed-secret-token-31f".to_owned());
    all
}

/// Runs a fetch, a cache hit and a lease's commit and invalidation through `binary`.
async fn exercise(binary: &Binary, request_id: &str) -> String {
    let http = reqwest::Client::new();
    let token = http
        .post(format!("{}/auth/token", binary.base))
        .header("x-request-id", request_id)
        .json(&serde_json::json!({"tenantId": "acme", "type": "genesys"}))
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), 200);
    let token: serde_json::Value = token.json().await.unwrap();
    let again = http
        .post(format!("{}/auth/token", binary.base))
        .json(&serde_json::json!({"tenantId": "acme", "type": "genesys"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);

    let lease: serde_json::Value = http
        .post(format!("{}/v1/lease", binary.base))
        .json(&serde_json::json!({"provider": "whatsapp", "tenantId": "acme"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let commit = http
        .post(format!("{}/v1/commit", binary.base))
        .json(&serde_json::json!({
            "provider": "whatsapp", "tenantId": "acme", "leaseId": lease["leaseId"],
            "accessToken": "committed-secret-token-31f", "expiresAtMs": common::now_ms() + 60_000,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(commit.status(), 204);
    let invalidate = http
        .post(format!("{}/v1/invalidate", binary.base))
        .json(&serde_json::json!({
            "provider": "whatsapp", "tenantId": "acme", "accessToken": "committed-secret-token-31f",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(invalidate.status(), 204);
    token["accessToken"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn trace_logs_carry_the_request_id_and_never_a_secret_or_token() {
    let redis = RedisServer::start();
    let standins = standins().await;
    let args = token_api_args(&redis, &standins);
    let mut binary = Binary::start(&strs(&args), &[("RUST_LOG", "trace")]).await;

    let issued = exercise(&binary, "corr-text-1").await;
    binary.terminate();
    assert!(binary.exit_within(Duration::from_secs(10)).await.success());

    let log = binary.log_text();
    assert!(log.lines().count() > 20, "trace logging is on:\n{log}");
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
    for secret in secrets(&standins, &issued) {
        assert!(
            !log.contains(&secret),
            "the log shows a secret ({} chars)",
            secret.len()
        );
    }
    let request_line = log
        .lines()
        .find(|line| line.contains("token request"))
        .unwrap_or_else(|| panic!("no token request line:\n{log}"));
    assert!(
        request_line.contains("request_id=corr-text-1"),
        "{request_line}"
    );
    // Lines from deep inside the request (the upstream calls) carry it too.
    assert!(
        log.lines()
            .any(|line| line.contains("upstream answered") && line.contains("corr-text-1")),
        "{log}"
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_request_span() {
    let redis = RedisServer::start();
    let standins = standins().await;
    let mut args = token_api_args(&redis, &standins);
    args.extend(["--log-format".into(), "json".into()]);
    let mut binary = Binary::start(&strs(&args), &[("RUST_LOG", "debug")]).await;

    let issued = exercise(&binary, "corr-json-2").await;
    binary.terminate();
    assert!(binary.exit_within(Duration::from_secs(10)).await.success());

    let log = binary.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let request = lines
        .iter()
        .find(|line| line["message"] == "token request")
        .unwrap_or_else(|| panic!("no token request line:\n{log}"));
    assert_eq!(request["spans"][0]["request_id"], "corr-json-2");
    assert_eq!(request["tenant"], "acme");
    assert_eq!(request["source"], "fresh");
    for secret in secrets(&standins, &issued) {
        assert!(!log.contains(&secret));
    }
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_fetch_finish_then_exits() {
    let redis = RedisServer::start();
    let standins = standins().await;
    standins.set_latency(Endpoint::Login, Duration::from_millis(1_500));
    let mut args = token_api_args(&redis, &standins);
    args.extend(["--shutdown-timeout-ms".into(), "8000".into()]);
    let mut binary = Binary::start(&strs(&args), &[]).await;

    let request = tokio::spawn(
        reqwest::Client::new()
            .post(format!("{}/auth/token", binary.base))
            .json(&serde_json::json!({"tenantId": "acme", "type": "genesys"}))
            .send(),
    );
    common::eventually(
        "the fetch reached the login",
        Duration::from_secs(5),
        || async { standins.calls(Endpoint::Login) == 1 },
    )
    .await;
    binary.terminate();
    let signalled = Instant::now();

    let response = request.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "the in-flight request finished");
    let status = binary.exit_within(Duration::from_secs(8)).await;
    assert!(status.success(), "{status}");
    assert!(signalled.elapsed() < Duration::from_secs(8));
    assert_eq!(redis.query::<i64>(&["EXISTS", LOCK]).await, 0);
    assert_eq!(redis.query::<i64>(&["EXISTS", TOKEN]).await, 1, "committed");
}

#[tokio::test]
async fn sigterm_with_a_hung_fetch_releases_its_lock_and_exits_within_the_bound() {
    let redis = RedisServer::start();
    let standins = standins().await;
    standins.push_fault(Endpoint::Login, Fault::Hang);
    let mut args = token_api_args(&redis, &standins);
    args.extend(
        [
            "--shutdown-timeout-ms",
            "2000",
            "--oauth-timeout-ms",
            "20000",
            "--redis-timeout-ms",
            "500",
        ]
        .map(String::from),
    );
    let mut binary = Binary::start(&strs(&args), &[]).await;

    let request = tokio::spawn(
        reqwest::Client::new()
            .post(format!("{}/auth/token", binary.base))
            .json(&serde_json::json!({"tenantId": "acme", "type": "genesys"}))
            .send(),
    );
    common::eventually(
        "the fetch reached the login",
        Duration::from_secs(5),
        || async { standins.calls(Endpoint::Login) == 1 },
    )
    .await;
    assert_eq!(
        redis.query::<i64>(&["EXISTS", LOCK]).await,
        1,
        "the fetch holds the lock"
    );
    binary.terminate();
    let signalled = Instant::now();

    // No new connection is accepted while the fetch is still running.
    common::eventually(
        "new connections are refused",
        Duration::from_secs(2),
        || async {
            tokio::net::TcpStream::connect(binary.base.trim_start_matches("http://"))
                .await
                .is_err()
        },
    )
    .await;
    assert!(!request.is_finished());

    let response = request.await.unwrap().unwrap();
    let answered = signalled.elapsed();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "COMPANION_UNAVAILABLE");
    assert!(answered < Duration::from_millis(2_000), "{answered:?}");
    let status = binary.exit_within(Duration::from_secs(3)).await;
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() < Duration::from_millis(2_500),
        "{:?}",
        signalled.elapsed()
    );
    assert_eq!(
        redis.query::<i64>(&["EXISTS", LOCK]).await,
        0,
        "the lock was released"
    );
    let log = binary.log_text();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("release their locks"), "{log}");
}

#[tokio::test]
async fn a_traceparent_reaches_the_upstream_calls_and_its_trace_id_the_log_lines() {
    let redis = RedisServer::start();
    let standins = standins().await;
    let args = token_api_args(&redis, &standins);
    let mut binary = Binary::start(&strs(&args), &[("RUST_LOG", "info")]).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let http = reqwest::Client::new();
    let token = async |tenant: &str, traceparent: Option<&str>| {
        let mut request = http
            .post(format!("{}/auth/token", binary.base))
            .header("x-request-id", format!("corr-trace-{tenant}"))
            .json(&serde_json::json!({"tenantId": tenant, "type": "genesys"}));
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        request.send().await.unwrap().status()
    };

    assert_eq!(token("acme", Some(traceparent)).await, 200);
    for endpoint in [Endpoint::TenantService, Endpoint::Login] {
        assert_eq!(
            standins.last_traceparent(endpoint).as_deref(),
            Some(traceparent),
            "{endpoint}"
        );
    }
    // Without one (or with an invalid one), none is sent.
    assert_eq!(token("globex", None).await, 200);
    assert_eq!(token("initech", Some("00-not-a-trace-01")).await, 200);
    for endpoint in [Endpoint::TenantService, Endpoint::Login] {
        assert_eq!(standins.last_traceparent(endpoint), None, "{endpoint}");
    }
    binary.terminate();
    assert!(binary.exit_within(Duration::from_secs(10)).await.success());

    let log = binary.log_text();
    let request_line = |tenant: &str| {
        log.lines()
            .find(|line| {
                line.contains("token request") && line.contains(&format!("corr-trace-{tenant}"))
            })
            .unwrap_or_else(|| panic!("no token request line of {tenant}:\n{log}"))
            .to_owned()
    };
    let traced = request_line("acme");
    assert!(
        traced.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"),
        "{traced}"
    );
    assert!(!request_line("globex").contains("trace_id"), "{log}");
}
