//! Cluster-wide collapse and the companion-down fallback on real processes: several
//! Envoys (two workers each) and companions sharing one Redis.

use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{Value, json};
use tokengate_tests::harness::{Cluster, Envoy, companion_metric, eventually};
use tokengate_tests::leak_scan::receive;
use tokengate_tests::standins::{Endpoint, Fault};

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
            let received = receive(response).await;
            let status = received.status;
            let body: Value =
                serde_json::from_str(&received.text).unwrap_or(Value::String(received.text));
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
    // The filter tries the companion again 1 ms after it failed: the dead companion is
    // found again on each cold fetch, and the restarted one is used at once.
    let config = filter_config(json!({ "companion": { "retryAfterMs": 1 } }));
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

/// A companion's `/readyz` status.
async fn readiness(port: u16) -> u16 {
    match reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_down_warm_tenants_keep_working_cold_ones_are_fetched_once_per_companion_then_redis_is_used_again()
 {
    let companion_args = [
        "--health-interval-ms",
        "50",
        "--health-failure-threshold",
        "2",
        "--redis-timeout-ms",
        "200",
        "--degraded-fetches-per-minute",
        "1",
    ];
    // Envoys 0 and 2 share companion 0; Envoy 1 has companion 1.
    let mut cluster = Cluster::start(3, 2, 2, &filter_config(json!({})), &companion_args).await;
    let warm = burst(&cluster, "acme", 30).await;
    let warm_bearer = the_one_token(&cluster, "acme");
    assert_eq!(served_with(&warm, &warm_bearer), 30);

    cluster.redis.kill();
    let ports: Vec<u16> = cluster.companions.iter().map(|c| c.port).collect();
    eventually(
        "the companions notice Redis is down",
        Duration::from_secs(10),
        async || readiness(ports[0]).await == 503 && readiness(ports[1]).await == 503,
    )
    .await;

    let still_warm = burst(&cluster, "acme", 30).await;
    assert_eq!(
        served_with(&still_warm, &warm_bearer),
        30,
        "warm tenants see no failure"
    );

    // A cold tenant: one fetch in degraded mode (within the limit of 1 a minute), whose
    // token the companion then serves from memory to its other Envoy, where a second
    // fetch would be over the limit.
    let client = reqwest::Client::new();
    let logins = cluster.standins.calls(Endpoint::Login);
    let admitted = request(&client, &cluster.envoys[0], "initech").await;
    assert_eq!(
        admitted.status, 200,
        "within the degraded limit: {}",
        admitted.body
    );
    let remembered = request(&client, &cluster.envoys[2], "initech").await;
    assert_eq!(
        remembered.status, 200,
        "from the companion's memory: {}",
        remembered.body
    );
    assert_eq!(remembered.authorization, admitted.authorization);
    assert_eq!(cluster.standins.calls(Endpoint::Login), logins + 1);

    let redis_port = cluster.redis.port;
    cluster.redis = tokengate_tests::harness::Redis::start_on(cluster.dir.path(), redis_port).await;
    eventually(
        "the companions use Redis again",
        Duration::from_secs(10),
        async || readiness(ports[0]).await == 200 && readiness(ports[1]).await == 200,
    )
    .await;

    // Redis-backed again: umbrella fetched through Envoy 0 is committed to Redis, so
    // Envoy 1, behind the other companion, gets it without an OAuth call.
    let logins = cluster.standins.calls(Endpoint::Login);
    let through_zero = request(&client, &cluster.envoys[0], "umbrella").await;
    let through_one = request(&client, &cluster.envoys[1], "umbrella").await;
    assert_eq!((through_zero.status, through_one.status), (200, 200));
    assert_eq!(through_one.authorization, through_zero.authorization);
    assert_eq!(cluster.standins.calls(Endpoint::Login), logins + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_lock_holders_companion_dies_mid_fetch_the_waiters_take_over_after_the_lock_ttl() {
    let companion_args = [
        "--lock-ttl-ms",
        "3000",
        "--lease-wait-ms",
        "6000",
        "--fetch-deadline-ms",
        "1000",
    ];
    let config =
        filter_config(json!({ "genesys": { "timeoutMs": 3000 }, "fetchDeadlineMs": 3000 }));
    let cluster = Cluster::start(2, 2, 2, &config, &companion_args).await;
    // The holder's login answers after 2.5 s: time enough, even on a loaded machine, for
    // the waiters to reach companion 1 and wait there before the holder could commit.
    cluster
        .standins
        .push_fault(Endpoint::Login, Fault::Delay(Duration::from_millis(2500)));
    let cluster = std::sync::Arc::new(tokio::sync::Mutex::new(cluster));

    // Envoy 0 (companion 0) takes the lock and calls the slow login.
    let holder = tokio::spawn({
        let cluster = std::sync::Arc::clone(&cluster);
        async move {
            let envoy_url = cluster.lock().await.envoys[0].url();
            reqwest::Client::new()
                .get(format!("{envoy_url}/api"))
                .header("x-tenant-id", "acme")
                .send()
                .await
                .map(|response| response.status().as_u16())
        }
    });
    let (waiter_port, envoy_one) = {
        let cluster = cluster.lock().await;
        (cluster.companions[1].port, cluster.envoys[1].url())
    };
    eventually(
        "the holder calls the login",
        Duration::from_secs(5),
        async || cluster.lock().await.standins.calls(Endpoint::Login) == 1,
    )
    .await;
    // Envoy 1's requests wait on the lock at companion 1.
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let url = format!("{envoy_one}/api");
            tokio::spawn(async move {
                let response = reqwest::Client::new()
                    .get(url)
                    .header("x-tenant-id", "acme")
                    .send()
                    .await;
                match response {
                    Ok(response) => response.status().as_u16(),
                    Err(_) => 0,
                }
            })
        })
        .collect();
    eventually(
        "a lease waits at companion 1",
        Duration::from_secs(5),
        async || companion_metric(waiter_port, "tokengate_companion_leases_waiting").await >= 1.0,
    )
    .await;
    cluster.lock().await.companions[0].kill();

    assert_eq!(
        holder.await.ok().and_then(Result::ok),
        Some(200),
        "the holder's own request is served"
    );
    for waiter in waiters {
        assert_eq!(
            waiter.await.ok(),
            Some(200),
            "a waiter got a token after the lock TTL"
        );
    }
    let logins = cluster.lock().await.standins.calls(Endpoint::Login);
    assert!(logins <= 2, "at most one extra OAuth call: {logins}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workers_of_one_envoy_send_one_lease_between_them() {
    let cluster = Cluster::start(1, 2, 1, &filter_config(json!({})), &[]).await;
    cluster
        .standins
        .set_latency(Endpoint::Login, Duration::from_millis(300));

    let outcomes = burst(&cluster, "acme", 100).await;

    let bearer = the_one_token(&cluster, "acme");
    assert_eq!(served_with(&outcomes, &bearer), 100);
    let port = cluster.companions[0].port;
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    let leases: f64 = text
        .lines()
        .filter(|line| line.starts_with("tokengate_companion_leases_total{"))
        .filter_map(|line| {
            line.rsplit(' ')
                .next()
                .and_then(|value| value.parse::<f64>().ok())
        })
        .sum();
    assert_eq!(
        leases, 1.0,
        "the second worker waited on the first through shared data:\n{text}"
    );
    assert!(cluster.stat("tokengate.collapsed_waiter").await >= 99);
}
