//! What an Envoy operator relies on, through real Envoy: purge on an upstream
//! rejection, stats, configuration rejected at load, tenant ids that cannot be abused,
//! and a request's trace context on the calls of the fetch it starts. (Refresh-ahead
//! and expiry are in `refresh.rs`, alone in their binary because they depend on
//! wall-clock timing.)

use std::time::Duration;

use futures::future::join_all;
use serde_json::json;
use tokengate_tests::harness::{Envoy, EnvoyUpstreams, FilterBuild, Stack, wait_until};
use tokengate_tests::leak_scan::receive;
use tokengate_tests::standins::Endpoint;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_an_upstream_401_the_next_request_carries_a_new_token() {
    let stack = Stack::start().await;

    let first = stack.get("/api", "acme").await;
    let rejected = stack.get("/status/401", "acme").await;
    let next = stack.get("/api", "acme").await;

    let issued = stack.bearers("acme");
    assert_eq!(rejected.status, 401);
    assert_eq!(
        issued.len(),
        2,
        "a new token was fetched after the rejection"
    );
    assert_eq!(first.authorization.as_deref(), Some(issued[0].as_str()));
    assert_eq!(next.authorization.as_deref(), Some(issued[1].as_str()));
    assert_eq!(stack.envoy.stat("tokengate.purge").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_fifty_upstream_401s_causes_at_most_one_refetch() {
    let stack = Stack::start().await;
    let first = stack.get("/api", "acme").await;
    assert_eq!(first.status, 200);

    let burst = join_all((0..50).map(|_| stack.get("/status/401", "acme"))).await;
    assert!(burst.iter().all(|answer| answer.status == 401));
    let next = stack.get("/api", "acme").await;

    let issued = stack.bearers("acme");
    assert_eq!(
        issued.len(),
        2,
        "one refetch (purge.minIntervalMs 10 s): {issued:?}"
    );
    assert_eq!(next.authorization.as_deref(), Some(issued[1].as_str()));
    assert_eq!(stack.envoy.stat("tokengate.purge").await, 1);
    assert!(stack.envoy.stat("tokengate.purge_suppressed").await >= 48);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_count_hits_misses_fetches_and_failures() {
    let stack = Stack::start_with(Envoy::default_filter_config(), 1).await;

    stack.get("/api", "acme").await;
    stack.get("/api", "acme").await;
    stack.get("/api", "nobody").await;

    let stat = async |name: &str| stack.envoy.stat(name).await;
    assert_eq!(stat("tokengate.cache_hit").await, 1);
    assert_eq!(stat("tokengate.cache_miss").await, 2);
    assert_eq!(stat("tokengate.fetch_started").await, 2);
    assert_eq!(stat("tokengate.fetch_succeeded").await, 1);
    assert_eq!(
        stat("tokengate.fetch_failed.credentials_not_found").await,
        1
    );
    let prometheus = reqwest::get(format!(
        "http://127.0.0.1:{}/stats/prometheus",
        stack.envoy.admin_port
    ))
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .text()
    .await
    .unwrap_or_default();
    // Envoy strips the wasm filter's `wasmcustom` namespace in Prometheus' names; it keeps
    // the dynamic modules' one, under its `envoy_` prefix:
    // `envoy_dynamicmodulescustom_tokengate_cache_hit{} 1` (an operator's dashboards
    // name the stats per build).
    let name = match FilterBuild::from_env() {
        FilterBuild::Wasm => "tokengate_cache_hit",
        FilterBuild::Native => "envoy_dynamicmodulescustom_tokengate_cache_hit",
    };
    assert!(
        prometheus
            .lines()
            .any(|line| line.starts_with(name) && line.ends_with(" 1")),
        "{prometheus}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_filter_configuration_is_rejected_at_load_naming_the_field() {
    let stack = Stack::start().await;
    let upstreams = EnvoyUpstreams {
        companion_port: stack.companion.port,
        tenant_service: stack.standins.tenant_service,
        login: stack.standins.login,
        echo: stack.standins.echo,
        idp: None,
    };

    for (config, expected) in [
        (
            json!({ "companion": { "timeoutMs": "soon" } }),
            "invalid tokengate configuration at 'companion.timeoutMs'",
        ),
        (
            json!({ "tenantHeadr": "x-tenant" }),
            "unknown field `tenantHeadr`",
        ),
        (
            json!({ "provider": "slack" }),
            "invalid tokengate configuration at 'provider'",
        ),
    ] {
        let log = Envoy::start_expecting_rejection(stack.dir.path(), &upstreams, &config).await;
        assert!(
            log.contains(expected),
            "the log names the problem ({expected}):\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_ids_that_could_escape_a_key_or_a_path_are_refused_before_any_callout() {
    let stack = Stack::start().await;
    let long = "a".repeat(10 * 1024);
    for tenant in [
        "acme:globex",
        "*",
        "{acme}",
        "acme/../globex",
        "acme globex",
        long.as_str(),
        "acme%0d%0aX-Evil:1",
    ] {
        let answer = stack.get("/api", tenant).await;
        assert_eq!(answer.status, 400, "{tenant:.40}");
        assert_eq!(answer.authorization, None);
    }
    // A CRLF inside a header value never reaches the filter: the client library or
    // Envoy's codec refuses it.
    let crlf = reqwest::header::HeaderValue::from_bytes(b"acme\r\nx-tenant-id: globex");
    assert!(crlf.is_err());

    // Two tenant headers: never another tenant's token.
    let response = reqwest::Client::new()
        .get(format!("{}/api", stack.envoy.url()))
        .header("x-tenant-id", "acme")
        .header("x-tenant-id", "globex")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let received = receive(response).await;
    assert_eq!(
        (received.status, received.json()["code"].as_str()),
        (400, Some("INVALID_REQUEST")),
        "an ambiguous tenant is refused"
    );
    assert_eq!(stack.standins.calls(Endpoint::TenantService), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_pushed_out_of_the_gateway_cache_is_served_from_redis_not_the_idp() {
    // One slot per table: each new tenant pushes the last one out of this Envoy.
    let config = Envoy::filter_config_with(json!({ "cache": { "maxTenants": 1 } }));
    let stack = Stack::start_with(config, 2).await;

    let acme = stack.get("/api", "acme").await;
    let globex = stack.get("/api", "globex").await;
    let acme_again = stack.get("/api", "acme").await;

    for answer in [&acme, &globex, &acme_again] {
        assert_eq!(answer.status, 200);
    }
    assert_eq!(
        acme_again.authorization, acme.authorization,
        "the same token"
    );
    assert_eq!(
        stack.standins.calls(Endpoint::Login),
        2,
        "no OAuth call for acme again"
    );
    assert_eq!(stack.envoy.stat("tokengate.cluster_cache_hit").await, 1);
    assert_eq!(
        stack.envoy.stat("tokengate.cache_evicted").await,
        2,
        "globex pushed acme out, then acme globex"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_requests_traceparent_reaches_every_call_of_its_fetch_and_an_invalid_one_none() {
    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const TRACE_ID: &str = "trace_id=4bf92f3577b34da6a3ce929d0e0e4736";
    let stack = Stack::start().await;
    let get = async |tenant: &str, traceparent: &str| {
        let headers = [("traceparent", traceparent)];
        stack
            .envoy
            .get_with_headers("/api", tenant, &headers)
            .await
            .status
    };
    let endpoints = [Endpoint::TenantService, Endpoint::Login];

    assert_eq!(get("acme", TRACE).await, 200);
    for endpoint in endpoints {
        let received = stack.standins.last_traceparent(endpoint);
        assert_eq!(received.as_deref(), Some(TRACE), "{endpoint}");
    }
    // Upper-case hex is not a trace context: nothing is passed on.
    assert_eq!(get("globex", &TRACE.to_uppercase()).await, 200);
    for endpoint in endpoints {
        assert_eq!(
            stack.standins.last_traceparent(endpoint),
            None,
            "{endpoint}"
        );
    }

    // The companion names the trace in its lease and commit lines of the traced fetch
    // (a commit may still be on its way when the request is answered).
    let companion = &stack.companion.process;
    wait_until("both commits logged", Duration::from_secs(5), || {
        companion.log_text().matches("token committed").count() >= 2
    })
    .await;
    let log = companion.log_text();
    let line = |tenant: &str, message: &str| {
        log.lines()
            .find(|line| line.contains(message) && line.contains(&format!("tenant=\"{tenant}\"")))
            .unwrap_or_else(|| panic!("no {message:?} line of {tenant}:\n{log}"))
    };
    for message in [" lease ", "token committed"] {
        assert!(line("acme", message).contains(TRACE_ID), "{log}");
        assert!(!line("globex", message).contains("trace_id"), "{log}");
    }
}
