//! The native build (`libtokengate_native.so`, an Envoy 1.40 dynamic module) in a real Envoy.
//!
//! Needs the module built first: `cargo build -p tokengate-native` (it is read from
//! `target/debug`, or from the directory in `$TOKENGATE_NATIVE_DIR`, e.g. `target/native`
//! after `cargo build -p tokengate-native --profile native`), and Envoy 1.40.0
//! (`scripts/setup`). The cluster test also needs Redis and the companion binary (as
//! the other end-to-end tests: `$TOKENGATE_COMPANION` or `target/debug`). The others use
//! the harness's stand-ins or their own (an echo upstream, a token API answering like
//! the companion's `/auth/token`).
//!
//! These tests pin what is particular to the native build (ABI version, load-time
//! refusal, its own scenarios); the whole end-to-end suite also runs on it with
//! `TOKENGATE_FILTER=native` (see `tokengate_tests::harness::FilterBuild`, and
//! `scripts/test`). Its configuration is the harness's `envoy/local.yaml.tmpl` with the
//! native filter block, the same listener, routes and clusters as the wasm build's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{any, post};
use serde_json::{Value, json};
use tokengate_tests::harness::{
    Companion, EnvoyPorts, EnvoyUpstreams, FilterBuild, Process, Redis, envoy_binary,
    envoy_log_args, free_port, native_module_dir, render_envoy_config,
};
use tokengate_tests::standins::{Endpoint, Fixture, StandIns};

fn assert_prerequisites() {
    FilterBuild::Native.assert_built();
    assert!(
        envoy_binary().exists(),
        "no Envoy at {}: run scripts/setup",
        envoy_binary().display()
    );
}

/// A stand-in listening on a free loopback port.
async fn serve(router: Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("cannot bind a stand-in: {e}"));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    port
}

/// The echo upstream: answers the request headers it received as JSON.
async fn echo() -> u16 {
    async fn handle(headers: HeaderMap) -> axum::Json<Value> {
        let headers: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
                )
            })
            .collect();
        axum::Json(json!({ "headers": headers }))
    }
    serve(Router::new().fallback(any(handle))).await
}

/// A token API answering like the companion's `/auth/token`, counting its calls.
async fn token_api(calls: Arc<AtomicUsize>) -> u16 {
    async fn handle(
        State(calls): State<Arc<AtomicUsize>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::Json<Value> {
        calls.fetch_add(1, Ordering::SeqCst);
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let tenant = request["tenantId"].as_str().unwrap_or("?").to_owned();
        let provider = request["type"].as_str().unwrap_or("?").to_owned();
        let authority = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        assert_eq!(authority, "tokengate-companion", "the callout's authority");
        axum::Json(json!({
            "accessToken": format!("native-{provider}-{tenant}"),
            "expiresIn": 3600,
            "tokenType": "Bearer",
            "source": "fresh",
            "expiresAt": "2099-01-01T00:00:00.000Z",
        }))
    }
    serve(
        Router::new()
            .route("/auth/token", post(handle))
            .with_state(calls),
    )
    .await
}

/// Ports of one rendered configuration.
struct Ports {
    listen: u16,
    admin: u16,
    echo: u16,
    companion: u16,
    tenant_service: u16,
    login: u16,
}

/// Renders the harness's `envoy/local.yaml.tmpl` with the native build's filter block
/// (`envoy/filter-native.yaml.tmpl`) into `dir`; returns its path.
fn render(dir: &Path, ports: &Ports, filter_config: &Value) -> PathBuf {
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let rendered = render_envoy_config(
        &EnvoyPorts {
            listen: ports.listen,
            admin: ports.admin,
        },
        &EnvoyUpstreams {
            companion_port: ports.companion,
            tenant_service: loopback(ports.tenant_service),
            login: loopback(ports.login),
            echo: loopback(ports.echo),
            idp: None,
        },
        FilterBuild::Native,
        filter_config,
    );
    let path = dir.join(format!("native-{}.yaml", ports.listen));
    std::fs::write(&path, rendered).unwrap_or_else(|e| panic!("cannot write config: {e}"));
    path
}

/// An Envoy command for `config` loading the module from [`native_module_dir`].
fn envoy_command(config: &Path, base_id: u16) -> Command {
    let mut command = Command::new(envoy_binary());
    command
        .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", native_module_dir())
        .arg("-c")
        .arg(config)
        .args(["--base-id", &base_id.to_string(), "--disable-hot-restart"])
        .args(envoy_log_args());
    command
}

/// `envoy --mode validate` of `config`; returns (success, output).
fn validate(config: &Path, abi_version: Option<&str>) -> (bool, String) {
    let mut command = envoy_command(config, free_port());
    command.args(["--mode", "validate"]);
    if let Some(version) = abi_version {
        command.env("TOKENGATE_NATIVE_ABI_VERSION", version);
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run Envoy: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Starts Envoy (2 workers) with `filter_config` and waits until it is ready.
async fn start_envoy(dir: &Path, ports: &Ports, filter_config: &Value) -> Process {
    let config = render(dir, ports, filter_config);
    let mut command = envoy_command(&config, ports.admin);
    command.args(["--concurrency", "2"]);
    let mut envoy = Process::spawn(
        "envoy",
        command,
        dir.join(format!("envoy-{}.log", ports.listen)),
    );
    let ready = format!("http://127.0.0.1:{}/ready", ports.admin);
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(answer) = client.get(&ready).send().await {
            if answer.status().is_success() {
                return envoy;
            }
        }
        envoy.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("Envoy not ready after 30 s:\n{}", envoy.log_tail(40));
}

/// Ports of an Envoy whose companion is a stand-in token API counting its `calls`, with
/// an echo upstream, for `fetch: companion` (no Tenant Service or login behind it).
async fn ports_with_token_api(calls: &Arc<AtomicUsize>) -> Ports {
    Ports {
        listen: free_port(),
        admin: free_port(),
        echo: echo().await,
        companion: token_api(Arc::clone(calls)).await,
        tenant_service: free_port(),
        login: free_port(),
    }
}

/// The stand-ins and one Envoy with the module whose companion cluster points where
/// nobody listens: the filter fetches in local mode, from the stand-ins (every login
/// through one cluster). Returns what must live as long as the test.
async fn start_without_companion() -> (tempfile::TempDir, StandIns, Ports, Process) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
    let standins = StandIns::start(Fixture::default_fixture())
        .await
        .unwrap_or_else(|e| panic!("stand-ins: {e}"));
    let ports = Ports {
        listen: free_port(),
        admin: free_port(),
        echo: standins.echo.port(),
        companion: free_port(),
        tenant_service: standins.tenant_service.port(),
        login: standins.login.port(),
    };
    let filter_config = json!({ "genesys": { "loginClusterPattern": "genesys_login" } });
    let envoy = start_envoy(dir.path(), &ports, &filter_config).await;
    (dir, standins, ports, envoy)
}

/// The counter `name` (e.g. `tokengate.cache_hit`) in Envoy's stats.
async fn stat(admin: u16, name: &str) -> Option<u64> {
    let stats = reqwest::get(format!("http://127.0.0.1:{admin}/stats?filter=tokengate"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    stats.lines().find_map(|line| {
        let (key, value) = line.split_once(": ")?;
        key.ends_with(name).then(|| value.trim().parse().ok())?
    })
}

fn companion_config() -> Value {
    json!({ "fetch": "companion" })
}

fn unused_ports() -> Ports {
    Ports {
        listen: free_port(),
        admin: free_port(),
        echo: free_port(),
        companion: free_port(),
        tenant_service: free_port(),
        login: free_port(),
    }
}

#[test]
fn the_local_template_with_the_native_block_validates_with_the_module() {
    assert_prerequisites();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
    let config = render(dir.path(), &unused_ports(), &companion_config());
    let (ok, log) = validate(&config, None);
    assert!(
        ok,
        "envoy --mode validate refused the native config:\n{log}"
    );
    assert!(
        log.contains("Dynamic module ABI version v0.2.0 matched."),
        "Envoy 1.40 should accept ABI v0.2.0:\n{log}"
    );
    assert!(
        log.contains("tokengate: filter 'tokengate' configured"),
        "{log}"
    );
}

#[test]
fn an_invalid_filter_configuration_is_refused_at_load_naming_the_field() {
    assert_prerequisites();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
    let bad = json!({ "fetch": "companion", "expiryMarginMs": "soon" });
    let config = render(dir.path(), &unused_ports(), &bad);
    let (ok, log) = validate(&config, None);
    assert!(
        !ok,
        "Envoy accepted an invalid filter configuration:\n{log}"
    );
    assert!(
        log.contains("invalid tokengate configuration at 'expiryMarginMs'"),
        "the module's log line names the field:\n{log}"
    );
    assert!(
        log.contains("Failed to initialize dynamic module"),
        "Envoy's own refusal:\n{log}"
    );
}

/// Envoy 1.40 does not refuse a module built for another ABI: it warns and loads it.
/// This pins that behaviour (and the exact line operators should alert on), so a
/// change in a later Envoy is noticed.
#[test]
fn an_abi_mismatch_is_only_a_warning_in_envoy_1_40() {
    assert_prerequisites();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
    let config = render(dir.path(), &unused_ports(), &companion_config());
    for version in ["v0.1.0", "v0.3.0", "not-a-version"] {
        let (ok, log) = validate(&config, Some(version));
        assert!(
            log.contains(&format!(
                "Dynamic module ABI version {version} is deprecated. Please recompile the \
                 module against the SDK with the exact Envoy version used by the main program."
            )),
            "Envoy's line for ABI {version}:\n{log}"
        );
        assert!(
            ok,
            "Envoy 1.40 now refuses ABI {version}; update the crate docs:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_reaches_the_upstream_with_the_tenants_token() {
    assert_prerequisites();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
    let calls = Arc::new(AtomicUsize::new(0));
    let ports = ports_with_token_api(&calls).await;
    let mut envoy = start_envoy(dir.path(), &ports, &companion_config()).await;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/app", ports.listen);

    let get = |tenant: Option<&'static str>| {
        let mut request = client.get(&url);
        if let Some(tenant) = tenant {
            request = request.header("x-tenant-id", tenant);
        }
        request.send()
    };

    // A miss: the request waits for the token API, then goes upstream with the token.
    let answer = get(Some("acme"))
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    assert_eq!(answer.status(), 200, "{}", envoy.log_tail(40));
    let echo: Value = answer.json().await.unwrap_or(Value::Null);
    assert_eq!(
        echo["headers"]["authorization"],
        "Bearer native-genesys-acme",
        "the upstream saw: {echo}\n{}",
        envoy.log_tail(40)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Hits: served from the process-wide cache, whichever worker takes the request.
    for _ in 0..6 {
        let answer = get(Some("acme"))
            .await
            .unwrap_or_else(|e| panic!("no answer: {e}"));
        let echo: Value = answer.json().await.unwrap_or(Value::Null);
        assert_eq!(
            echo["headers"]["authorization"],
            "Bearer native-genesys-acme"
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "hits must not call the token API"
    );

    // Another tenant, another token.
    let answer = get(Some("globex"))
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    let echo: Value = answer.json().await.unwrap_or(Value::Null);
    assert_eq!(
        echo["headers"]["authorization"],
        "Bearer native-genesys-globex"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // No tenant: answered by the filter, never sent upstream.
    let answer = get(None).await.unwrap_or_else(|e| panic!("no answer: {e}"));
    assert_eq!(answer.status(), 400);
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    assert_eq!(body["code"], "INVALID_REQUEST", "{body}");

    // The counters carry the wasm filter's names.
    let stats = client
        .get(format!(
            "http://127.0.0.1:{}/stats?filter=tokengate",
            ports.admin
        ))
        .send()
        .await
        .unwrap_or_else(|e| panic!("no stats: {e}"))
        .text()
        .await
        .unwrap_or_default();
    let stat = |name: &str| -> Option<u64> {
        stats.lines().find_map(|line| {
            let (key, value) = line.split_once(": ")?;
            key.ends_with(name).then(|| value.trim().parse().ok())?
        })
    };
    assert_eq!(stat("tokengate.cache_hit"), Some(6), "{stats}");
    assert_eq!(stat("tokengate.cache_miss"), Some(2), "{stats}");
    // The companion fetched these tokens, not this filter (as in the wasm build).
    assert_eq!(stat("tokengate.fetch_succeeded"), Some(0), "{stats}");
    envoy.assert_running();
}

/// The default path (`fetch: gateway`) driven by `tokengate::worker` inside the module,
/// with the companion down: local mode, the Tenant Service and the Genesys login
/// stand-ins, callouts carried by the paused requests, one fetch for concurrent misses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_fetches_from_the_tenant_service_and_the_login_collapsing_misses() {
    assert_prerequisites();
    let (_dir, standins, ports, mut envoy) = start_without_companion().await;
    let url = format!("http://127.0.0.1:{}/app", ports.listen);
    let client = reqwest::Client::new();

    // Twenty concurrent misses for one tenant: one login, every request gets its token.
    let requests = (0..20).map(|_| {
        let request = client.get(&url).header("x-tenant-id", "acme").send();
        async move {
            let answer = request.await.unwrap_or_else(|e| panic!("no answer: {e}"));
            let status = answer.status();
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            (
                status,
                body["headers"]["authorization"].as_str().map(str::to_owned),
            )
        }
    });
    let answers = futures::future::join_all(requests).await;
    let issued: Vec<String> = standins
        .tokens_issued_to("acme")
        .into_iter()
        .map(|token| format!("Bearer {token}"))
        .collect();
    assert_eq!(
        issued.len(),
        1,
        "one login for concurrent misses\n{}",
        envoy.log_tail(60)
    );
    for (status, authorization) in answers {
        assert_eq!(status, 200, "{}", envoy.log_tail(60));
        assert_eq!(authorization.as_deref(), Some(issued[0].as_str()));
    }
    assert_eq!(standins.calls(Endpoint::TenantService), 1);

    // Served from the cache afterwards.
    let answer = client
        .get(&url)
        .header("x-tenant-id", "acme")
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    assert_eq!(
        body["headers"]["authorization"].as_str(),
        Some(issued[0].as_str())
    );
    assert_eq!(standins.tokens_issued_to("acme").len(), 1);

    // A request with a body, paused on a miss: the body goes upstream with the token.
    let answer = client
        .post(&url)
        .header("x-tenant-id", "initech")
        .body("x".repeat(100_000))
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    assert_eq!(answer.status(), 200, "{}", envoy.log_tail(40));
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    let issued = standins.tokens_issued_to("initech");
    assert_eq!(issued.len(), 1);
    assert_eq!(
        body["headers"]["authorization"].as_str(),
        Some(format!("Bearer {}", issued[0]).as_str())
    );
    assert_eq!(body["body"].as_str().map(str::len), Some(100_000));

    // A tenant without Genesys credentials: the Tenant Service's 404 as the filter's error.
    let answer = client
        .get(&url)
        .header("x-tenant-id", "wonka")
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    assert_eq!(answer.status(), 404);
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    assert_eq!(body["code"], "CREDENTIALS_NOT_FOUND", "{body}");

    assert!(
        stat(ports.admin, "tokengate.companion_fallback")
            .await
            .unwrap_or(0)
            >= 1
    );
    assert_eq!(
        stat(ports.admin, "tokengate.fetch_succeeded").await,
        Some(2)
    );
    envoy.assert_running();
}

/// Endpoint mode: the module answers the token API itself, GET from headers and POST
/// from the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_mode_answers_the_token_api() {
    assert_prerequisites();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
    let calls = Arc::new(AtomicUsize::new(0));
    let ports = ports_with_token_api(&calls).await;
    let filter_config = json!({ "mode": "endpoint", "fetch": "companion" });
    let mut envoy = start_envoy(dir.path(), &ports, &filter_config).await;
    let url = format!("http://127.0.0.1:{}/auth/token", ports.listen);
    let client = reqwest::Client::new();

    let answer = client
        .get(&url)
        .header("x-tenant-id", "acme")
        .header("x-credential-type", "genesys")
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    assert_eq!(answer.status(), 200, "{}", envoy.log_tail(40));
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    assert_eq!(body["accessToken"], "native-genesys-acme", "{body}");
    assert_eq!(body["tokenType"], "Bearer");

    let answer = client
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"tenantId":"acme","type":"genesys"}"#)
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    assert_eq!(answer.status(), 200, "{}", envoy.log_tail(40));
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    assert_eq!(body["accessToken"], "native-genesys-acme", "{body}");
    assert_eq!(body["source"], "cache", "{body}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let answer = client
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"tenantId":"globex","type":"whatsapp"}"#)
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    assert_eq!(body["accessToken"], "native-whatsapp-globex", "{body}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let answer = client
        .post(&url)
        .body("not json")
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    assert_eq!(answer.status(), 400);
    envoy.assert_running();
}

/// Two native Envoys sharing one companion and Redis (needs the companion binary, see
/// `harness::companion_binary`): concurrent misses on both make one login, cluster-wide,
/// through the worker's lease / commit with the companion.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_envoys_lease_through_the_companion_and_log_in_once() {
    assert_prerequisites();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
    let standins = StandIns::start(Fixture::default_fixture())
        .await
        .unwrap_or_else(|e| panic!("stand-ins: {e}"));
    let redis = Redis::start(dir.path()).await;
    let tenant_service_url = format!("http://{}", standins.tenant_service);
    let login_url_template = format!("http://{}", standins.login);
    let mut companion = Companion::start(
        dir.path(),
        &redis.url(),
        &[
            "--tenant-service-url",
            &tenant_service_url,
            "--genesys-login-url-template",
            &login_url_template,
        ],
    )
    .await;
    let filter_config = json!({ "genesys": { "loginClusterPattern": "genesys_login" } });
    let mut envoys = Vec::new();
    for _ in 0..2 {
        let ports = Ports {
            listen: free_port(),
            admin: free_port(),
            echo: standins.echo.port(),
            companion: companion.port,
            tenant_service: standins.tenant_service.port(),
            login: standins.login.port(),
        };
        let envoy = start_envoy(dir.path(), &ports, &filter_config).await;
        envoys.push((ports, envoy));
    }
    let client = reqwest::Client::new();
    let requests = (0..24).map(|index| {
        let (ports, _) = &envoys[index % 2];
        let request = client
            .get(format!("http://127.0.0.1:{}/app", ports.listen))
            .header("x-tenant-id", "globex")
            .send();
        async move {
            let answer = request.await.unwrap_or_else(|e| panic!("no answer: {e}"));
            let status = answer.status();
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            (
                status,
                body["headers"]["authorization"].as_str().map(str::to_owned),
            )
        }
    });
    let answers = futures::future::join_all(requests).await;
    let issued = standins.tokens_issued_to("globex");
    let logs = || {
        envoys
            .iter()
            .map(|(_, envoy)| envoy.log_tail(40))
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    assert_eq!(issued.len(), 1, "one login cluster-wide\n{}", logs());
    let bearer = format!("Bearer {}", issued[0]);
    for (status, authorization) in answers {
        assert_eq!(status, 200, "{}", logs());
        assert_eq!(authorization.as_deref(), Some(bearer.as_str()));
    }
    let mut fallbacks = 0;
    for (ports, envoy) in &mut envoys {
        fallbacks += stat(ports.admin, "tokengate.companion_fallback")
            .await
            .unwrap_or(0);
        envoy.assert_running();
    }
    assert_eq!(fallbacks, 0, "the companion was up: no local mode");
    companion.process.assert_running();
}

/// An upstream 401 purges the token it was sent with (the response-headers hook tells
/// the worker); the next request gets a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_purges_the_token() {
    assert_prerequisites();
    let (_dir, standins, ports, mut envoy) = start_without_companion().await;
    let client = reqwest::Client::new();
    let get = |path: &str| {
        client
            .get(format!("http://127.0.0.1:{}{path}", ports.listen))
            .header("x-tenant-id", "umbrella")
            .send()
    };
    let bearer_of = |answer: Value| {
        answer["headers"]["authorization"]
            .as_str()
            .map(str::to_owned)
    };

    let first = get("/app")
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    let first = bearer_of(first.json().await.unwrap_or(Value::Null));
    let rejected = get("/status/401")
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    assert_eq!(rejected.status(), 401);
    let second = get("/app")
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    let second = bearer_of(second.json().await.unwrap_or(Value::Null));
    let issued = standins.tokens_issued_to("umbrella");
    assert_eq!(
        issued.len(),
        2,
        "a new login after the 401\n{}",
        envoy.log_tail(40)
    );
    assert_eq!(first, Some(format!("Bearer {}", issued[0])));
    assert_eq!(second, Some(format!("Bearer {}", issued[1])));
    assert_eq!(stat(ports.admin, "tokengate.purge").await, Some(1));
    envoy.assert_running();
}

/// Many tenants at once on two workers: every tenant's concurrent misses make one
/// login (tier 1 within a worker, tier 2 across the workers through shared data and
/// wake-ups), and every request carries its own tenant's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_of_many_tenants_on_two_workers() {
    assert_prerequisites();
    let (_dir, standins, ports, mut envoy) = start_without_companion().await;
    let url = format!("http://127.0.0.1:{}/app", ports.listen);
    let tenants = ["acme", "globex", "initech", "umbrella", "hooli", "wayne"];
    let client = reqwest::Client::new();
    let requests = (0..120).map(|index| {
        let tenant = tenants[index % tenants.len()];
        let request = client.get(&url).header("x-tenant-id", tenant).send();
        async move {
            let answer = request.await.unwrap_or_else(|e| panic!("no answer: {e}"));
            let status = answer.status();
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            (
                tenant,
                status,
                body["headers"]["authorization"].as_str().map(str::to_owned),
            )
        }
    });
    let answers = futures::future::join_all(requests).await;
    for tenant in tenants {
        assert_eq!(
            standins.tokens_issued_to(tenant).len(),
            1,
            "one login for {tenant}\n{}",
            envoy.log_tail(40)
        );
    }
    for (tenant, status, authorization) in answers {
        assert_eq!(status, 200, "{}", envoy.log_tail(40));
        let issued = standins.tokens_issued_to(tenant);
        assert_eq!(
            authorization,
            Some(format!("Bearer {}", issued[0])),
            "{tenant}"
        );
    }
    envoy.assert_running();
}
