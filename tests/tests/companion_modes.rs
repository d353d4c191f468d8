//! The filter with the companion doing the fetching (`fetch: companion`, so secrets
//! never enter Envoy), and the companion's internal API key.

use futures::future::join_all;
use serde_json::{Value, json};
use tokengate_tests::harness::{Cluster, Envoy, EnvoyUpstreams, Stack};
use tokengate_tests::leak_scan::receive;
use tokengate_tests::standins::Endpoint;

async fn get(url: &str, tenant: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("{url}/api"))
        .header("x-tenant-id", tenant)
        .send()
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"));
    let received = receive(response).await;
    (received.status, received.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_fetch_companion_the_companion_fetches_and_envoy_never_calls_the_tenant_service() {
    let stack = Stack::start_with(
        Envoy::filter_config_with(json!({ "fetch": "companion" })),
        2,
    )
    .await;

    let url = stack.envoy.url();
    let answers = join_all((0..50).map(|_| get(&url, "acme"))).await;

    let issued = stack.standins.tokens_issued_to("acme");
    assert_eq!(issued.len(), 1, "one OAuth call: {issued:?}");
    let bearer = format!("Bearer {}", issued[0]);
    for (status, body) in &answers {
        assert_eq!(
            (*status, body["headers"]["authorization"].as_str()),
            (200, Some(bearer.as_str())),
            "{body}"
        );
    }
    assert_eq!(stack.standins.calls(Endpoint::TenantService), 1);
    for cluster in ["tenant_service", "genesys_login"] {
        let calls = stack
            .envoy
            .stat(&format!("cluster.{cluster}.upstream_rq_total"))
            .await;
        assert_eq!(calls, 0, "Envoy itself never called {cluster}");
    }
    let hits = stack.envoy.stat("tokengate.cache_hit").await;
    let again = get(&stack.envoy.url(), "acme").await;
    assert_eq!(again.0, 200);
    assert_eq!(
        stack.envoy.stat("tokengate.cache_hit").await,
        hits + 1,
        "cached in the gateway"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_fetch_companion_the_requests_traceparent_reaches_the_companions_upstream_calls() {
    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let stack = Stack::start_with(
        Envoy::filter_config_with(json!({ "fetch": "companion" })),
        1,
    )
    .await;

    let headers = [("traceparent", TRACE)];
    let answer = stack.envoy.get_with_headers("/api", "acme", &headers).await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    for endpoint in [Endpoint::TenantService, Endpoint::Login] {
        let received = stack.standins.last_traceparent(endpoint);
        assert_eq!(received.as_deref(), Some(TRACE), "{endpoint}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_fetch_companion_the_companions_errors_reach_the_client() {
    let stack = Stack::start_with(
        Envoy::filter_config_with(json!({ "fetch": "companion" })),
        1,
    )
    .await;

    let (status, body) = get(&stack.envoy.url(), "nobody").await;

    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("CREDENTIALS_NOT_FOUND")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_filter_sends_the_companions_api_key_and_a_wrong_key_is_a_503_not_a_client_401() {
    let keys = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let key_file = keys.path().join("internal-api-key");
    std::fs::write(&key_file, "k3y-for-the-gateway-0123456789\n").unwrap_or_else(|e| panic!("{e}"));
    let key_arg = key_file.display().to_string();
    let config = Envoy::filter_config_with(
        json!({ "companion": { "apiKey": "k3y-for-the-gateway-0123456789" } }),
    );
    let cluster = Cluster::start(1, 1, 1, &config, &["--internal-api-key-file", &key_arg]).await;

    let (status, _) = get(&cluster.envoys[0].url(), "acme").await;
    assert_eq!(status, 200, "the right key is accepted");

    let upstreams = EnvoyUpstreams {
        companion_port: cluster.companions[0].port,
        tenant_service: cluster.standins.tenant_service,
        login: cluster.standins.login,
        echo: cluster.standins.echo,
        idp: None,
    };
    let wrong =
        Envoy::filter_config_with(json!({ "companion": { "apiKey": "not-the-key-0000000000" } }));
    let envoy = Envoy::start(cluster.dir.path(), &upstreams, &wrong, 1).await;
    let (status, body) = get(&envoy.url(), "globex").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("COMPANION_UNAVAILABLE")),
        "{body}"
    );
    assert!(
        !envoy.process.log_text().contains("not-the-key"),
        "the key is never logged"
    );
}
