//! Secret hygiene beyond the logs: after tokens of both providers were fetched, served,
//! refused, purged and force-refreshed, no secret or token of the stand-ins appears in
//! Envoy's stats (names or values, in every format the admin serves) or in the
//! companion's metrics.
//!
//! The logs and response bodies of every end-to-end test are scanned by the harness
//! itself (`tokengate_tests::leak_scan`, run when each stack is dropped).

use serde_json::json;
use tokengate_tests::harness::{Envoy, Stack};
use tokengate_tests::leak_scan::receive;
use tokengate_tests::standins::{LabelledSecret, SecretKind};

/// The text of a GET on loopback.
async fn text_of(url: String) -> String {
    let response = reqwest::get(&url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    receive(response).await.text
}

/// Every place in `pages` (name, text) that holds one of `secrets`, named by label.
fn hits(pages: &[(String, String)], secrets: &[LabelledSecret]) -> Vec<String> {
    pages
        .iter()
        .flat_map(|(page, text)| {
            secrets
                .iter()
                .filter(|secret| text.contains(&secret.value))
                .map(move |secret| format!("{page} holds the {}", secret.label))
        })
        .collect()
}

/// Envoy's stats in its three formats and the companion's metrics.
async fn observability_pages(stack: &Stack) -> Vec<(String, String)> {
    let admin = format!("http://127.0.0.1:{}", stack.envoy.admin_port);
    let mut pages = Vec::new();
    for path in ["/stats", "/stats?format=json", "/stats/prometheus"] {
        pages.push((
            format!("Envoy {path}"),
            text_of(format!("{admin}{path}")).await,
        ));
    }
    let metrics = format!("http://127.0.0.1:{}/metrics", stack.companion.port);
    pages.push(("companion /metrics".to_owned(), text_of(metrics).await));
    pages
}

/// Fails if a secret is on any page, after checking the pages do hold the counters
/// the traffic moved (so an empty page cannot pass).
fn assert_clean(pages: &[(String, String)], secrets: &[LabelledSecret]) {
    let tokens = secrets
        .iter()
        .filter(|secret| secret.kind == SecretKind::Token)
        .count();
    assert!(tokens >= 2, "tokens were issued and served: {tokens}");
    for (page, text) in pages {
        assert!(
            text.contains("tokengate"),
            "{page} shows tokengate's metrics"
        );
    }
    let found = hits(pages, secrets);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_mode_traffic_leaves_no_secret_in_stats_or_metrics() {
    let stack = Stack::start().await;
    for tenant in ["acme", "globex", "acme", "wonka", "tyrell", "lostco"] {
        stack.get("/api", tenant).await;
    }
    // An upstream 401 purges acme's token; the next request fetches a new one.
    stack.get("/status/401", "acme").await;
    let after_purge = stack.get("/api", "acme").await;
    assert_eq!(after_purge.status, 200, "{}", after_purge.body);
    assert_eq!(stack.bearers("acme").len(), 2, "the purge refetched");

    let pages = observability_pages(&stack).await;

    assert_clean(&pages, &stack.standins.secrets().all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_mode_traffic_leaves_no_secret_in_stats_or_metrics() {
    let stack =
        Stack::start_with(Envoy::filter_config_with(json!({ "mode": "endpoint" })), 1).await;
    let client = reqwest::Client::new();
    let token_url = format!("{}/auth/token", stack.envoy.url());
    for body in [
        json!({ "tenantId": "hooli", "type": "whatsapp" }),
        json!({ "tenantId": "initech", "type": "genesys" }),
        json!({ "tenantId": "initech", "type": "genesys", "forceRefresh": true }),
        json!({ "tenantId": "wonka", "type": "genesys" }),
    ] {
        let response = client
            .post(&token_url)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        receive(response).await;
    }
    assert_eq!(
        stack.bearers("initech").len(),
        2,
        "the forced refresh fetched"
    );

    let pages = observability_pages(&stack).await;

    assert_clean(&pages, &stack.standins.secrets().all());
}
