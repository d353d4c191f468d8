//! A Redis Cluster losing a shard under load: real `redis-server` processes on loopback,
//! two companions serving the token API to warm and cold tenants, and one primary
//! SIGKILLed mid-run.
//!
//! - With replicas, the replica is promoted and takes the dead primary's slots; until
//!   then the dead shard's keys are served from memory or in degraded mode. Every
//!   request must be answered with a token, at most one OAuth call per tenant per
//!   companion, and both companions use the promoted replica once it took over.
//! - Without a replica, the shard stays dead: the other shards keep the cluster-wide
//!   collapse (one OAuth call per tenant across both companions), the dead shard's
//!   tenants are served in degraded mode, and `/readyz` stays ready, naming the dead
//!   node.
//!
//! Each case prints one `failover:` line with its numbers (failed requests, OAuth
//! calls, the failover window).

mod common;

use common::Companion;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokengate_companion::Config;
use tokengate_tests::redis_cluster::RedisCluster;
use tokengate_tests::standins::{Fixture, StandIns, generated_tenant_id};

/// A node is declared failed after this long without answering (`cluster-node-timeout`).
const NODE_TIMEOUT_MS: &str = "1000";
/// Tenants warmed through both companions before the kill.
const WARM: usize = 40;
/// Tenants first asked for under load (each once per companion).
const COLD: usize = 400;
/// Load clients.
const CLIENTS: usize = 6;
/// Pause between two requests of one client: the load stays bounded.
const PACE: Duration = Duration::from_millis(10);

fn cluster_args() -> [&'static str; 4] {
    [
        "--cluster-node-timeout",
        NODE_TIMEOUT_MS,
        // The shards still alive serve their slots while one has none to take over.
        "--cluster-require-full-coverage",
        "no",
    ]
}

/// Two companions on `cluster`, serving the token API against `standins`, with the
/// production defaults for the Redis timeout and the health monitor.
async fn companions(cluster: &RedisCluster, standins: &StandIns) -> [Arc<Companion>; 2] {
    let config = || Config {
        tenant_service_url: Some(format!("http://{}", standins.tenant_service).into()),
        genesys_login_url_template: format!("http://{}", standins.login),
        fetch_deadline_ms: 4_000,
        tenant_service_timeout_ms: 1_000,
        oauth_timeout_ms: 1_000,
        lock_ttl_ms: 10_000,
        lease_wait_ms: 10_000,
        recheck_interval_ms: 200,
        redis_timeout_ms: 1_000,
        ..common::config_for(cluster.url())
    };
    let first = Arc::new(Companion::start(config()).await);
    let second = Arc::new(Companion::start(config()).await);
    for companion in [&first, &second] {
        companion.wait_until_ready_is(200).await;
    }
    [first, second]
}

async fn stand_ins() -> StandIns {
    let fixture = Fixture::default_fixture()
        .with_generated_tenants(WARM + COLD + 100)
        .unwrap();
    tokengate_tests::standins::StandIns::start(fixture)
        .await
        .expect("the stand-ins start")
}

fn token_key(tenant: &str) -> String {
    format!("tokengate:{{genesys:{tenant}}}:token")
}

/// Answers of the load: tokens, and failures with what they were.
#[derive(Default)]
struct Tally {
    answered: AtomicUsize,
    failures: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    async fn record(&self, response: reqwest::Response) {
        let status = response.status();
        if status == 200 {
            self.answered.fetch_add(1, Ordering::Relaxed);
        } else {
            let body = response.text().await.unwrap_or_default();
            self.failures
                .lock()
                .unwrap()
                .push(format!("{status} {body}"));
        }
    }

    fn failed(&self) -> usize {
        self.failures.lock().unwrap().len()
    }
}

/// Steady load until `stop`: each client alternates a warm tenant (round robin) and the
/// next cold tenant, the cold one asked of both companions in turn.
fn start_load(
    companions: &[Arc<Companion>; 2],
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
) -> tokio::task::JoinSet<()> {
    let next_cold = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let (companions, stop, tally, next_cold) = (
            companions.clone(),
            Arc::clone(stop),
            Arc::clone(tally),
            Arc::clone(&next_cold),
        );
        clients.spawn(async move {
            let mut turn = client;
            while !stop.load(Ordering::Relaxed) {
                turn += 1;
                let warm = generated_tenant_id(turn % WARM);
                let companion = &companions[turn % 2];
                tally
                    .record(companion.token(&warm, "genesys", false).await)
                    .await;
                let cold = next_cold.fetch_add(1, Ordering::Relaxed);
                if cold < 2 * COLD {
                    let tenant = generated_tenant_id(WARM + cold / 2);
                    let companion = &companions[cold % 2];
                    tally
                        .record(companion.token(&tenant, "genesys", false).await)
                        .await;
                }
                tokio::time::sleep(PACE).await;
            }
        });
    }
    clients
}

/// OAuth calls per tenant, for the tenants that had any.
fn calls_per_tenant(
    standins: &StandIns,
    tenants: impl Iterator<Item = String>,
) -> BTreeMap<String, usize> {
    tenants
        .map(|tenant| {
            let calls = standins.tokens_issued_to(&tenant).len();
            (tenant, calls)
        })
        .filter(|(_, calls)| *calls > 0)
        .collect()
}

async fn warm_up(companions: &[Arc<Companion>; 2]) {
    for n in 0..WARM {
        for companion in companions {
            let response = companion
                .token(&generated_tenant_id(n), "genesys", false)
                .await;
            assert_eq!(response.status(), 200);
        }
    }
}

/// A cluster, its stand-ins, two companions and the load, just after a primary was
/// SIGKILLed.
struct Run {
    cluster: RedisCluster,
    standins: StandIns,
    companions: [Arc<Companion>; 2],
    /// Ends the load.
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    clients: tokio::task::JoinSet<()>,
    /// The port of the primary killed: the one holding the first warm tenant.
    victim: u16,
    /// The first warm tenant's slot.
    victim_slot: u16,
    /// OAuth calls before the kill.
    calls_before: u64,
    killed: Instant,
}

/// Starts a cluster of three primaries with `replicas` each, two companions, warms
/// [`WARM`] tenants through both (one OAuth call each), starts the load, and half a
/// second later SIGKILLs the primary of the first warm tenant's shard.
async fn kill_a_primary_under_load(replicas: usize) -> Run {
    let mut cluster = RedisCluster::start(3, replicas, &cluster_args()).await;
    let standins = stand_ins().await;
    let companions = companions(&cluster, &standins).await;
    warm_up(&companions).await;
    assert_eq!(standins.tokens_issued(), WARM as u64, "warm-up collapses");

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients = start_load(&companions, &stop, &tally);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let victim_slot = cluster.slot_of(&token_key(&generated_tenant_id(0)));
    let victim = cluster.node_of(&token_key(&generated_tenant_id(0)));
    let calls_before = standins.tokens_issued();
    let killed = Instant::now();
    cluster.kill(victim);
    Run {
        cluster,
        standins,
        companions,
        stop,
        tally,
        clients,
        victim,
        victim_slot,
        calls_before,
        killed,
    }
}

/// `/readyz` of `companion`.
async fn readiness(companion: &Companion) -> serde_json::Value {
    companion.readiness().await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_killed_under_load_fails_over_to_its_replica_without_a_failed_request() {
    let Run {
        cluster,
        standins,
        companions,
        stop,
        tally,
        mut clients,
        victim,
        victim_slot,
        calls_before,
        killed,
    } = kill_a_primary_under_load(1).await;

    // The failover window: until a replica serves the slots, then until both
    // companions use it (no shard down any more).
    let deadline = killed + Duration::from_secs(30);
    let promoted = cluster
        .wait_for_promotion(victim_slot, victim, killed, Duration::from_secs(30))
        .await;
    let mut detected = false;
    let recovered = loop {
        let (first, second) = (
            readiness(&companions[0]).await,
            readiness(&companions[1]).await,
        );
        detected |= first["redis"] == "degraded" || second["redis"] == "degraded";
        if first["redis"] == "healthy"
            && second["redis"] == "healthy"
            && killed.elapsed() > promoted
        {
            break killed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the companions did not use the promoted replica: {first} {second}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Steady load after the failover too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}

    let asked = (0..WARM + COLD).map(generated_tenant_id);
    let calls = calls_per_tenant(&standins, asked);
    let most = calls.values().copied().max().unwrap_or(0);
    let total = standins.tokens_issued();
    let extra: usize = calls.values().map(|calls| calls - 1).sum();
    eprintln!(
        "failover: with replica: {} requests answered, {} failed; OAuth calls {total} for {} tenants, \
         {} since the kill ({extra} beyond one per tenant, at most {most} for one tenant); replica promoted \
         after {promoted:?}, companions on it after {recovered:?}; shard seen down by a companion: {detected}",
        tally.answered.load(Ordering::Relaxed),
        tally.failed(),
        calls.len(),
        total - calls_before,
    );
    let failures = tally.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        most <= 2,
        "at most one OAuth call per tenant per companion: {calls:?}"
    );
    // Through the promoted replica, a warm tenant of the dead shard is a cache hit.
    let warm_on_victim = (0..WARM)
        .map(generated_tenant_id)
        .find(|tenant| cluster.slot_of(&token_key(tenant)) == victim_slot)
        .unwrap();
    let before = standins.tokens_issued_to(&warm_on_victim).len();
    for companion in &companions {
        let response = companion.token(&warm_on_victim, "genesys", false).await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(standins.tokens_issued_to(&warm_on_victim).len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_killed_without_replica_leaves_its_tenants_to_degraded_mode_and_the_rest_collapsed()
 {
    let mut run = kill_a_primary_under_load(0).await;
    let victim = run.victim;
    // Past the node timeout: the run.cluster marks the node failed, and stays so.
    tokio::time::sleep(Duration::from_secs(4)).await;
    run.stop.store(true, Ordering::Relaxed);
    while run.clients.join_next().await.is_some() {}
    let during_load = run.standins.tokens_issued() - run.calls_before;

    // A burst of concurrent requests for tenants never asked for: five per tenant at
    // each companion.
    let burst: Vec<String> = (WARM + COLD..WARM + COLD + 60)
        .map(generated_tenant_id)
        .collect();
    let burst_tally = Arc::new(Tally::default());
    let mut requests = tokio::task::JoinSet::new();
    for tenant in &burst {
        for n in 0..10 {
            let request = run.companions[n % 2].token_at(
                &run.companions[n % 2].base,
                tenant,
                "genesys",
                false,
            );
            let burst_tally = Arc::clone(&burst_tally);
            requests.spawn(async move { burst_tally.record(request.await).await });
        }
    }
    while requests.join_next().await.is_some() {}
    let on_victim = |tenant: &str| {
        let owner = run
            .cluster
            .owner_of(run.cluster.slot_of(&token_key(tenant)));
        owner.is_none_or(|(port, _)| port == victim)
    };
    let (on_dead, on_live): (Vec<&String>, Vec<&String>) =
        burst.iter().partition(|tenant| on_victim(tenant));
    let calls = |tenants: &[&String]| -> Vec<usize> {
        tenants
            .iter()
            .map(|tenant| run.standins.tokens_issued_to(tenant).len())
            .collect()
    };
    let (dead_calls, live_calls) = (calls(&on_dead), calls(&on_live));
    let warm_on_dead = (0..WARM)
        .map(generated_tenant_id)
        .filter(|tenant| on_victim(tenant))
        .count();
    eprintln!(
        "failover: without replica: load {} answered, {} failed, {during_load} OAuth calls during it \
         ({warm_on_dead} of {WARM} warm tenants on the dead shard); burst of 10 requests per tenant: {} failed, \
         OAuth calls per live-shard tenant {live_calls:?}, per dead-shard tenant {dead_calls:?}; \
         {:?} since the kill",
        run.tally.answered.load(Ordering::Relaxed),
        run.tally.failed(),
        burst_tally.failed(),
        run.killed.elapsed(),
    );
    for companion in &run.companions {
        let body = readiness(companion).await;
        assert_eq!(body["status"], "ready", "{body}");
        assert_eq!(body["redis"], "degraded", "{body}");
        assert!(
            body["down"].to_string().contains(&format!(":{victim}")),
            "{body}"
        );
        let metrics = companion.metrics().await;
        assert!(
            metrics.text.contains(&format!(
                "tokengate_companion_redis_node_up{{node=\"127.0.0.1:{victim}\""
            )),
            "{}",
            metrics.text
        );
    }
    let failures = run.tally.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(burst_tally.failed(), 0);
    assert!(
        !on_dead.is_empty() && !on_live.is_empty(),
        "the burst spans both"
    );
    assert!(
        live_calls.iter().all(|calls| *calls == 1),
        "collapse on live shards: {live_calls:?}"
    );
    assert!(
        dead_calls.iter().all(|calls| (1..=2).contains(calls)),
        "one per companion: {dead_calls:?}"
    );
}
