//! Cluster-wide collapse and the companion-down fallback on real processes: several
//! Envoys (two workers each) and companions sharing one Redis.

use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{Value, json};
use tokengate_tests::harness::{Cluster, Envoy};
use tokengate_tests::standins::Endpoint;

/// What one request through Envoy came back with.
struct Outcome {
    status: u16,
    body: Value,
    authorization: Option<String>,
    latency: Duration,
}

async fn request(client: &reqwest::Client, envoy: &Envoy, tenant: &str) -> Outcome {
    let started = Instant::now();
    let response = client
        .get(format!("{}/api/conversations", envoy.url()))
        .header("x-tenant-id", tenant)
        .send()
        .await;
    let latency = started.elapsed();
    match response {
        Ok(response) => {
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            let authorization = body["headers"]["authorization"].as_str().map(str::to_owned);
            Outcome {
                status,
                body,
                authorization,
                latency,
            }
        }
        Err(error) => panic!("request through Envoy failed: {error}"),
    }
}

/// `count` concurrent requests for `tenant`, spread round-robin over every Envoy.
async fn burst(cluster: &Cluster, tenant: &str, count: usize) -> Vec<Outcome> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap_or_default();
    let client = &client;
    join_all((0..count).map(|i| request(client, &cluster.envoys[i % cluster.envoys.len()], tenant)))
        .await
}

fn percentile(outcomes: &[Outcome], fraction: f64) -> Duration {
    let mut latencies: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    latencies.sort();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let index = ((latencies.len() as f64 - 1.0) * fraction).round() as usize;
    latencies.get(index).copied().unwrap_or_default()
}

fn served_with(outcomes: &[Outcome], bearer: &str) -> usize {
    for other in outcomes
        .iter()
        .filter(|o| o.status != 200 || o.authorization.as_deref() != Some(bearer))
        .take(3)
    {
        eprintln!(
            "not served with the token: status {} body {}",
            other.status, other.body
        );
    }
    outcomes
        .iter()
        .filter(|o| o.status == 200 && o.authorization.as_deref() == Some(bearer))
        .count()
}

fn the_one_token(cluster: &Cluster, tenant: &str) -> String {
    let issued = cluster.standins.tokens_issued_to(tenant);
    assert_eq!(
        issued.len(),
        1,
        "exactly one token issued to {tenant}: {issued:?}"
    );
    format!("Bearer {}", issued[0])
}

fn filter_config(overrides: Value) -> Value {
    Envoy::filter_config_with(overrides)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_cold_requests_over_three_envoys_make_one_oauth_call() {
    let cluster = Cluster::start(3, 2, 2, &filter_config(json!({})), &[]).await;

    let outcomes = burst(&cluster, "globex", 300).await;

    let bearer = the_one_token(&cluster, "globex");
    assert_eq!(
        cluster.standins.calls(Endpoint::Login),
        1,
        "one OAuth call cluster-wide"
    );
    assert_eq!(
        cluster.standins.calls(Endpoint::TenantService),
        1,
        "one Tenant Service call"
    );
    assert_eq!(
        served_with(&outcomes, &bearer),
        300,
        "all 300 reached the upstream with it"
    );
    println!(
        "300 cold requests, 3 Envoys x 2 workers, 2 companions: OAuth calls 1, Tenant Service calls 1, p50 {:?}, p99 {:?}",
        percentile(&outcomes, 0.50),
        percentile(&outcomes, 0.99)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_identity_provider_fails_no_waiter() {
    let cluster = Cluster::start(3, 2, 2, &filter_config(json!({})), &[]).await;
    cluster
        .standins
        .set_latency(Endpoint::Login, Duration::from_secs(1));

    let outcomes = burst(&cluster, "acme", 300).await;

    let bearer = the_one_token(&cluster, "acme");
    assert_eq!(cluster.standins.calls(Endpoint::Login), 1);
    assert_eq!(
        served_with(&outcomes, &bearer),
        300,
        "every waiter got the token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_companion_down_warm_tenants_keep_working_and_cold_ones_fetch_locally() {
    let config = filter_config(json!({ "companion": { "retryAfterMs": 300 } }));
    let mut cluster = Cluster::start(2, 2, 2, &config, &[]).await;
    let warm = burst(&cluster, "acme", 20).await;
    let warm_bearer = the_one_token(&cluster, "acme");
    assert_eq!(served_with(&warm, &warm_bearer), 20);

    // Envoy 0's companion dies.
    cluster.companions[0].kill();
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let outcome = request(&client, &cluster.envoys[0], "acme").await;
        assert_eq!(
            (outcome.status, outcome.authorization.as_deref()),
            (200, Some(warm_bearer.as_str()))
        );
    }
    let cold = request(&client, &cluster.envoys[0], "initech").await;
    assert_eq!(cold.status, 200, "a cold tenant is served in local mode");
    assert_eq!(cold.authorization, Some(the_one_token(&cluster, "initech")));
    assert!(
        cluster.envoys[0].stat("tokengate.companion_fallback").await >= 1,
        "the fallback was counted"
    );

    // It comes back: after retryAfterMs the filter uses it again, so a token fetched
    // through Envoy 0 is committed to Redis, and Envoy 1 (the other companion) gets
    // it from the cluster cache without an OAuth call.
    cluster.companions[0].restart().await;
    tokio::time::sleep(Duration::from_millis(400)).await; // retryAfterMs (300 ms) passes
    let logins_before = cluster.standins.calls(Endpoint::Login);
    let cluster_hits_before = cluster.envoys[1].stat("tokengate.cluster_cache_hit").await;
    let through_zero = request(&client, &cluster.envoys[0], "umbrella").await;
    let through_one = request(&client, &cluster.envoys[1], "umbrella").await;
    assert_eq!((through_zero.status, through_one.status), (200, 200));
    assert_eq!(through_one.authorization, through_zero.authorization);
    assert_eq!(
        cluster.standins.calls(Endpoint::Login),
        logins_before + 1,
        "one OAuth call for umbrella"
    );
    let cluster_hits =
        cluster.envoys[1].stat("tokengate.cluster_cache_hit").await - cluster_hits_before;
    assert_eq!(cluster_hits, 1, "Envoy 1 was served from Redis");
}
