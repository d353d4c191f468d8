//! Two Envoys (two workers each), each with its own companion, on a Redis Cluster
//! (`cluster-node-timeout` 1 s) that loses a primary:
//!
//! - with replicas, SIGKILLed under steady load of warm and cold tenants, the replica
//!   takes over;
//! - without, the shard stays dead, and a burst of cold tenants follows.
//!
//! Every request must be answered with its tenant's token, with at most one OAuth call
//! per tenant per companion, and one per tenant across both on the shards still alive.
//! Each test prints one `cluster failover:` line with its numbers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokengate_tests::harness::{Companion, Envoy, EnvoyUpstreams};
use tokengate_tests::leak_scan::{LeakScan, receive};
use tokengate_tests::redis_cluster::RedisCluster;
use tokengate_tests::standins::{Fixture, StandIns, generated_tenant_id};

/// Tenants warmed through both Envoys before the kill.
const WARM: usize = 20;
/// Tenants first asked for under load (each once per Envoy).
const COLD: usize = 200;
/// Load clients.
const CLIENTS: usize = 4;
/// Pause between two requests of one client: the load stays bounded.
const PACE: Duration = Duration::from_millis(10);

/// Requests that were not answered with their tenant's token.
#[derive(Default)]
struct Tally {
    answered: AtomicUsize,
    failures: std::sync::Mutex<Vec<String>>,
}

/// One request for `tenant` through `envoy`, recorded in `tally`.
async fn request(client: &reqwest::Client, envoy: &Envoy, tenant: &str, tally: &Tally) {
    let response = client
        .get(format!("{}/api/conversations", envoy.url()))
        .header("x-tenant-id", tenant)
        .send()
        .await;
    let failure = match response {
        Ok(response) => {
            let received = receive(response).await;
            let body: Value = serde_json::from_str(&received.text).unwrap_or(Value::Null);
            let bearer = body["headers"]["authorization"].as_str().unwrap_or("");
            if received.status == 200 && bearer.starts_with(&format!("Bearer gen-{tenant}-")) {
                None
            } else {
                Some(format!("{tenant}: {} {}", received.status, received.text))
            }
        }
        Err(error) => Some(format!("{tenant}: {error}")),
    };
    match failure {
        None => {
            tally.answered.fetch_add(1, Ordering::Relaxed);
        }
        Some(failure) => tally.failures.lock().unwrap().push(failure),
    }
}

fn token_key(tenant: &str) -> String {
    format!("tokengate:{{genesys:{tenant}}}:token")
}

/// Two Envoys, each with its own companion on `redis`, the stand-ins, and the leak scan
/// of their logs. Fields drop in order: the processes stop before their logs are scanned.
struct Gateways {
    envoys: Arc<Vec<Envoy>>,
    _companions: Vec<Companion>,
    _leak_scan: LeakScan,
    standins: StandIns,
    _dir: tempfile::TempDir,
}

impl Gateways {
    /// Starts them, and warms [`WARM`] tenants through both Envoys (one OAuth call each).
    async fn start_and_warm_up(redis: &RedisCluster) -> Gateways {
        let dir = tempfile::Builder::new()
            .prefix("tokengate-cluster-failover-")
            .tempdir()
            .unwrap();
        let fixture = Fixture::default_fixture()
            .with_generated_tenants(WARM + COLD)
            .unwrap();
        let standins = StandIns::start(fixture).await.unwrap();
        let leak_scan = LeakScan::new(dir.path(), standins.secrets());
        let tenant_service_url = format!("http://{}", standins.tenant_service);
        let login_url_template = format!("http://{}", standins.login);
        let args = [
            "--tenant-service-url",
            tenant_service_url.as_str(),
            "--genesys-login-url-template",
            login_url_template.as_str(),
        ];
        let mut companions = Vec::new();
        let mut envoys = Vec::new();
        for _ in 0..2 {
            let companion = Companion::start(dir.path(), &redis.url(), &args).await;
            let upstreams = EnvoyUpstreams {
                companion_port: companion.port,
                tenant_service: standins.tenant_service,
                login: standins.login,
                echo: standins.echo,
                idp: None,
            };
            let config = Envoy::filter_config_with(json!({}));
            envoys.push(Envoy::start(dir.path(), &upstreams, &config, 2).await);
            companions.push(companion);
        }
        let envoys = Arc::new(envoys);
        let client = reqwest::Client::new();
        let warm_up = Tally::default();
        for n in 0..WARM {
            for envoy in envoys.iter() {
                request(&client, envoy, &generated_tenant_id(n), &warm_up).await;
            }
        }
        assert_eq!(warm_up.answered.load(Ordering::Relaxed), 2 * WARM);
        assert_eq!(standins.tokens_issued(), WARM as u64, "warm-up collapses");
        Gateways {
            envoys,
            _companions: companions,
            _leak_scan: leak_scan,
            standins,
            _dir: dir,
        }
    }
}

/// Cluster nodes: declared failed after 1 s without an answer, and the shards still
/// alive serve their slots while one has no replica to take over.
const NODE_ARGS: [&str; 4] = [
    "--cluster-node-timeout",
    "1000",
    "--cluster-require-full-coverage",
    "no",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_envoys_ride_out_a_primary_failover_without_a_failed_request() {
    let mut redis = RedisCluster::start(3, 1, &NODE_ARGS).await;
    let gateways = Gateways::start_and_warm_up(&redis).await;
    let (envoys, standins) = (&gateways.envoys, &gateways.standins);
    let client = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let next_cold = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for client_index in 0..CLIENTS {
        let (envoys, stop, tally, next_cold, client) = (
            Arc::clone(envoys),
            Arc::clone(&stop),
            Arc::clone(&tally),
            Arc::clone(&next_cold),
            client.clone(),
        );
        clients.spawn(async move {
            let mut turn = client_index;
            while !stop.load(Ordering::Relaxed) {
                turn += 1;
                let warm = generated_tenant_id(turn % WARM);
                request(&client, &envoys[turn % 2], &warm, &tally).await;
                let cold = next_cold.fetch_add(1, Ordering::Relaxed);
                if cold < 2 * COLD {
                    let tenant = generated_tenant_id(WARM + cold / 2);
                    request(&client, &envoys[cold % 2], &tenant, &tally).await;
                }
                tokio::time::sleep(PACE).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let victim_slot = redis.slot_of(&token_key(&generated_tenant_id(0)));
    let victim = redis.node_of(&token_key(&generated_tenant_id(0)));
    let calls_before = standins.tokens_issued();
    let killed = Instant::now();
    redis.kill(victim);
    let promoted = redis
        .wait_for_promotion(victim_slot, victim, killed, Duration::from_secs(30))
        .await;
    // Steady load after the failover too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}

    let calls: Vec<usize> = (0..WARM + COLD)
        .map(|n| standins.tokens_issued_to(&generated_tenant_id(n)).len())
        .filter(|calls| *calls > 0)
        .collect();
    let most = calls.iter().copied().max().unwrap_or(0);
    let extra: usize = calls.iter().map(|calls| calls - 1).sum();
    let total = standins.tokens_issued();
    let failures = tally.failures.lock().unwrap().clone();
    eprintln!(
        "cluster failover: two Envoys: {} requests answered, {} failed; OAuth calls {total} for {} \
         tenants, {} since the kill ({extra} beyond one per tenant, at most {most} for one tenant); \
         replica promoted after {promoted:?}",
        tally.answered.load(Ordering::Relaxed),
        failures.len(),
        calls.len(),
        total - calls_before,
    );
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    assert!(most <= 2, "at most one OAuth call per tenant per companion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_primary_dead_and_no_replica_every_tenant_is_served_and_live_shards_collapse() {
    let mut redis = RedisCluster::start(3, 0, &NODE_ARGS).await;
    let gateways = Gateways::start_and_warm_up(&redis).await;
    let (envoys, standins) = (&gateways.envoys, &gateways.standins);
    let victim_slot = redis.slot_of(&token_key(&generated_tenant_id(0)));
    let victim = redis.node_of(&token_key(&generated_tenant_id(0)));
    redis.kill(victim);
    let killed = Instant::now();
    while redis.owner_of(victim_slot) != Some((victim, true)) {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the cluster never marked the dead primary failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed_after = killed.elapsed();

    // Every warm tenant once per Envoy, and 60 cold tenants three times each over both
    // Envoys, all at once.
    let client = reqwest::Client::new();
    let tally = Tally::default();
    let cold: Vec<String> = (WARM..WARM + 60).map(generated_tenant_id).collect();
    let warm: Vec<String> = (0..WARM).map(generated_tenant_id).collect();
    let requests = cold
        .iter()
        .flat_map(|tenant| (0..3).map(move |n| (tenant, n)))
        .chain(
            warm.iter()
                .flat_map(|tenant| (0..2).map(move |n| (tenant, n))),
        )
        .map(|(tenant, n)| request(&client, &envoys[n % 2], tenant, &tally));
    futures::future::join_all(requests).await;

    let dead_shard = |tenant: &String| redis.node_of(&token_key(tenant)) == victim;
    let calls = |tenants: Vec<&String>| -> Vec<usize> {
        let calls = tenants
            .iter()
            .map(|tenant| standins.tokens_issued_to(tenant).len());
        calls.collect()
    };
    let (on_dead, on_live): (Vec<&String>, Vec<&String>) = cold.iter().partition(|t| dead_shard(t));
    let (dead_calls, live_calls) = (calls(on_dead), calls(on_live));
    let warm_calls = calls(warm.iter().collect());
    let failures = tally.failures.lock().unwrap().clone();
    eprintln!(
        "cluster failover: two Envoys, no replica (primary failed after {failed_after:?}): {} requests \
         answered, {} failed; OAuth calls per cold tenant on a live shard {live_calls:?}, on the dead \
         shard {dead_calls:?}; per warm tenant {warm_calls:?}",
        tally.answered.load(Ordering::Relaxed),
        failures.len(),
    );
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        !dead_calls.is_empty() && !live_calls.is_empty(),
        "cold tenants on both"
    );
    assert!(
        live_calls.iter().all(|calls| *calls == 1),
        "live shards collapse"
    );
    assert!(
        dead_calls.iter().all(|calls| (1..=2).contains(calls)),
        "one per companion"
    );
    assert!(
        warm_calls.iter().all(|calls| *calls == 1),
        "warm tenants: no new call"
    );
}
