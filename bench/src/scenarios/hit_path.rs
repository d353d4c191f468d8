//! Scenario 1, the hit path: (a) plain Envoy, (b) Envoy's credential_injector with the
//! oauth2 extension, (c) tokengate with one warm tenant, (d) tokengate with N warm
//! tenants requested round-robin, and, when the native build is there, (n) and (n10k):
//! the same two with tokengate's native build (an Envoy dynamic module). Same Envoy
//! binary and settings (one worker, pinned), same upstream (the echo process), same wrk
//! script; runs interleaved in every round; medians reported.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokengate_tests::standins::{Endpoint, Fixture, StandIns, generated_tenant_id};

use crate::client::Conn;
use crate::envoy::{
    BenchEnvoy, Filter, Upstreams, cpu_busy_steal_us, cpu_time_us, native_module_built, rss_kib,
};
use crate::fleet::EchoProcess;
use crate::stats::median;
use crate::wrk::{self, WrkResult, WrkRun};
use tokengate_tests::harness::{Companion, Envoy, Redis};

/// How to run the scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Rounds of a, b, c, d.
    pub rounds: usize,
    /// Length of each throughput run.
    pub throughput_duration: Duration,
    /// Connections of the throughput runs.
    pub connections: u32,
    /// Length of each single-connection latency run.
    pub latency_duration: Duration,
    /// Warm tenants of (d).
    pub tenants: usize,
    /// CPUs for Envoy (`taskset -c`), e.g. `0`.
    pub envoy_cpus: Option<String>,
    /// CPUs for wrk and the echo upstream, e.g. `1`.
    pub client_cpus: Option<String>,
    /// Profile (a), (c), (g), (n) and (h) (those that ran) with `perf` after the rounds.
    pub profile: bool,
    /// The minimal proxy-wasm filter of `bench/wasm-floor`, when built: adds (e), (f), (g).
    pub floor_module: Option<std::path::PathBuf>,
    /// The folder of the minimal dynamic module of `bench/native-floor`, when built: adds (h).
    pub native_floor: Option<std::path::PathBuf>,
    /// Instead of (e), (f), (g): these configurations of the minimal filter, as
    /// `(name, comma-separated host calls)` (an experiment: which host call costs what).
    pub floor_ops: Vec<(String, String)>,
    /// Another build of tokengate (an experiment, e.g. a size-optimised module): adds
    /// (c2), (c3), ...: tokengate with one warm tenant from each of these modules.
    pub alt_modules: Vec<std::path::PathBuf>,
}

/// One configuration's runs.
#[derive(Debug, Clone)]
pub struct ConfigRuns {
    /// `a`, `b`, ...
    pub name: String,
    /// What it is.
    pub label: String,
    /// Saturating runs.
    pub throughput: Vec<WrkResult>,
    /// Envoy CPU time per request in each saturating run (microseconds).
    pub cpu_us_per_request: Vec<f64>,
    /// Envoy CPU time over wall time in each saturating run (1.0: one CPU busy).
    pub cpu_share: Vec<f64>,
    /// Other processes' time on Envoy's CPU over wall time, in each saturating run
    /// (when Envoy is pinned).
    pub interference: Vec<f64>,
    /// Time the hypervisor stole from Envoy's CPU over wall time, in each saturating run.
    pub steal: Vec<f64>,
    /// Busy time of the client CPU (wrk, the echo upstream, anything else) over wall
    /// time, in each saturating run (when pinned).
    pub client_cpu_busy: Vec<f64>,
    /// Single-connection runs.
    pub latency: Vec<WrkResult>,
    /// Envoy's resident memory after the rounds (KiB).
    pub rss_end_kib: u64,
}

impl ConfigRuns {
    /// Median requests per second of the saturating runs.
    pub fn rps(&self) -> f64 {
        median(
            &self
                .throughput
                .iter()
                .map(WrkResult::rps)
                .collect::<Vec<_>>(),
        )
    }

    /// Median of a latency figure over the saturating runs.
    pub fn loaded(&self, pick: impl Fn(&WrkResult) -> u64) -> f64 {
        median(
            &self
                .throughput
                .iter()
                .map(|r| pick(r) as f64)
                .collect::<Vec<_>>(),
        )
    }

    /// Median of a latency figure over the single-connection runs.
    pub fn unloaded(&self, pick: impl Fn(&WrkResult) -> u64) -> f64 {
        median(
            &self
                .latency
                .iter()
                .map(|r| pick(r) as f64)
                .collect::<Vec<_>>(),
        )
    }

    /// Median single-connection requests per second.
    pub fn unloaded_rps(&self) -> f64 {
        median(&self.latency.iter().map(WrkResult::rps).collect::<Vec<_>>())
    }

    /// Median Envoy CPU per request.
    pub fn cpu_us(&self) -> f64 {
        median(&self.cpu_us_per_request)
    }

    /// Median share of a CPU Envoy used in the saturating runs.
    pub fn cpu_share(&self) -> f64 {
        median(&self.cpu_share)
    }

    /// Largest share of Envoy's CPU other processes took in a saturating run.
    pub fn max_interference(&self) -> f64 {
        self.interference.iter().copied().fold(0.0, f64::max)
    }

    /// Largest busy share of the client CPU in a saturating run.
    pub fn max_client_busy(&self) -> f64 {
        self.client_cpu_busy.iter().copied().fold(0.0, f64::max)
    }

    /// Smallest and largest requests per second over the saturating runs.
    pub fn rps_range(&self) -> (f64, f64) {
        self.throughput
            .iter()
            .map(WrkResult::rps)
            .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(r), hi.max(r)))
    }

    /// Largest share of Envoy's CPU stolen by the hypervisor in a saturating run.
    pub fn max_steal(&self) -> f64 {
        self.steal.iter().copied().fold(0.0, f64::max)
    }

    /// Median over the rounds of this configuration's throughput over `other`'s in the
    /// same round (pairs measured seconds apart share the machine's state).
    pub fn paired_rps_ratio(&self, other: &ConfigRuns) -> f64 {
        let ratios: Vec<f64> = self
            .throughput
            .iter()
            .zip(&other.throughput)
            .map(|(x, y)| x.rps() / y.rps().max(1.0))
            .collect();
        median(&ratios)
    }

    /// Median over the rounds of the ratio of Envoy CPU per request to `other`'s.
    pub fn paired_cpu_ratio(&self, other: &ConfigRuns) -> f64 {
        let ratios: Vec<f64> = self
            .cpu_us_per_request
            .iter()
            .zip(&other.cpu_us_per_request)
            .map(|(x, y)| x / y.max(f64::MIN_POSITIVE))
            .collect();
        median(&ratios)
    }

    /// Median over the rounds of a single-connection latency figure minus `other`'s.
    pub fn paired_latency_diff(&self, other: &ConfigRuns, pick: impl Fn(&WrkResult) -> u64) -> f64 {
        let diffs: Vec<f64> = self
            .latency
            .iter()
            .zip(&other.latency)
            .map(|(x, y)| pick(x) as f64 - pick(y) as f64)
            .collect();
        median(&diffs)
    }

    /// Errors over every run.
    pub fn errors(&self) -> u64 {
        self.throughput
            .iter()
            .chain(&self.latency)
            .map(WrkResult::errors)
            .sum()
    }

    /// Requests over every run.
    pub fn requests(&self) -> u64 {
        self.throughput
            .iter()
            .chain(&self.latency)
            .map(|r| r.requests)
            .sum()
    }
}

/// Where an Envoy's CPU went, by shared object (`perf report --sort dso`) and by
/// symbol (`--sort dso,sym`). Code that V8 compiled from a wasm module has no symbols
/// here (Envoy gives V8 no `--perf-prof` flag; see the Findings): it shows as one object
/// (`[JIT]` or `[unknown]`).
#[derive(Debug, Clone)]
pub struct Profile {
    /// Configuration name.
    pub name: String,
    /// (shared object, percent of samples), largest first.
    pub dsos: Vec<(String, f64)>,
    /// (shared object and symbol, percent of samples), largest first.
    pub symbols: Vec<(String, f64)>,
    /// Samples taken.
    pub samples: u64,
}

/// The configurations profiled, when they ran: plain Envoy, tokengate (wasm), the
/// minimal filter making tokengate's host calls, tokengate (native), the minimal
/// dynamic module.
pub const PROFILED: [&str; 5] = ["a", "c", "g", NATIVE, "h"];
/// Symbols listed per profile.
const PROFILE_SYMBOLS: usize = 15;

/// Everything the scenario found.
#[derive(Debug, Clone)]
pub struct HitPath {
    /// The settings it ran with.
    pub settings: Settings,
    /// a, b, c, d, and e, f when the minimal filter was built.
    pub configs: Vec<ConfigRuns>,
    /// RSS of (d) right after start, before any tenant was cached (KiB).
    pub rss_d_empty_kib: u64,
    /// RSS of (d) once its tenants were warm (KiB).
    pub rss_d_warm_kib: u64,
    /// RSS of (a) right after start (KiB).
    pub rss_a_start_kib: u64,
    /// How long warming (d)'s tenants took.
    pub warm_duration: Duration,
    /// OAuth calls made to warm (d).
    pub warm_oauth_calls: u64,
    /// OAuth calls made during the measured runs (should be 0: all hits).
    pub oauth_calls_during_runs: u64,
    /// tokengate's cache hits on (c) and (d) during the runs.
    pub cache_hits: (u64, u64),
    /// tokengate's cache misses on (c) and (d) during the runs.
    pub cache_misses: (u64, u64),
    /// The native build's cache hits and misses on (n) and (n10k) during the runs.
    pub native_hits_misses: Option<((u64, u64), (u64, u64))>,
    /// (b)'s tokens fetched and requests injected.
    pub injector_stats: (u64, u64),
    /// Profiles of (a) and (c) under load, when taken.
    pub profiles: Vec<Profile>,
    /// wrk's command line (one example).
    pub wrk_command: String,
}

/// The floor configurations (e), (f), (g), (gc): name, label, configuration of the minimal
/// filter (`bench/wasm-floor`).
const FLOOR: [(&str, &str, &str); 4] = [
    ("e", "minimal proxy-wasm filter: no host call", ""),
    (
        "f",
        "minimal proxy-wasm filter: get 1 header, set 1 header",
        "get_tenant,set_auth",
    ),
    (
        "g",
        "minimal proxy-wasm filter: tokengate's 5 host calls, no logic",
        "get_tenant,time,shared_get,set_auth,get_status",
    ),
    (
        "gc",
        "minimal proxy-wasm filter: the 5 host calls tokengate makes today, no logic",
        "pairs,time,metric_get,set_auth,get_status",
    ),
];

/// The noise control: a second plain Envoy, measured last in every round.
pub const CONTROL: &str = "a2";

/// The native build, one warm tenant.
pub const NATIVE: &str = "n";
/// The native build, N warm tenants round-robin.
pub const NATIVE_MANY: &str = "n10k";

/// Whether configuration `name` steps through the N warm tenants.
fn many_tenants(name: &str) -> bool {
    name == "d" || name == NATIVE_MANY
}

/// The stat names of tokengate's counter `name` in the wasm and native builds.
fn wasm_stat(name: &str) -> String {
    format!("wasmcustom.tokengate.{name}")
}
fn native_stat(name: &str) -> String {
    format!("dynamicmodulescustom.tokengate.{name}")
}

/// Runs the scenario.
pub async fn run(settings: Settings) -> Result<HitPath, String> {
    let dir = tempfile::Builder::new()
        .prefix("tokengate-bench-hit-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let fixture = Fixture::default_fixture()
        .with_generated_tenants(settings.tenants)
        .map_err(|e| e.to_string())?;
    let acme = fixture
        .genesys_client("acme")
        .cloned()
        .ok_or("the fixture has no acme")?;
    let standins = StandIns::start(fixture)
        .await
        .map_err(|e| format!("stand-ins: {e}"))?;
    let redis = Redis::start(dir.path()).await;
    let companion = Companion::start(dir.path(), &redis.url(), &[]).await;
    let echo = EchoProcess::start(settings.client_cpus.as_deref())?;
    let upstreams = Upstreams {
        echo: echo.addr,
        companion: std::net::SocketAddr::from(([127, 0, 0, 1], companion.port)),
        tenant_service: standins.tenant_service,
        login: standins.login,
    };
    let tokengate = Envoy::default_filter_config();
    let mut plan: Vec<(String, String, Filter)> = vec![
        ("a".into(), "plain Envoy (no filter)".into(), Filter::None),
        (
            "b".into(),
            "Envoy credential_injector + oauth2".into(),
            Filter::CredentialInjector(acme),
        ),
        (
            "c".into(),
            "tokengate, 1 warm tenant".into(),
            Filter::Tokengate(tokengate.clone()),
        ),
        (
            "d".into(),
            "tokengate, N warm tenants round-robin".into(),
            Filter::Tokengate(tokengate.clone()),
        ),
    ];
    let native = native_module_built();
    if native {
        plan.push((
            NATIVE.into(),
            "tokengate native module, 1 warm tenant".into(),
            Filter::Native(tokengate.clone()),
        ));
        plan.push((
            NATIVE_MANY.into(),
            "tokengate native module, N warm tenants round-robin".into(),
            Filter::Native(tokengate),
        ));
    } else {
        eprintln!("bench: no native build (target/native/libtokengate_native.so): no (n), (n10k)");
    }
    if let Some(dir) = &settings.native_floor {
        plan.push((
            "h".into(),
            "minimal dynamic module: get 1 header, set 1 header".into(),
            Filter::OtherNative { dir: dir.clone() },
        ));
    }
    if let Some(module) = &settings.floor_module {
        let floor: Vec<(String, String, String)> = if settings.floor_ops.is_empty() {
            FLOOR
                .iter()
                .map(|(name, label, ops)| ((*name).into(), (*label).into(), (*ops).into()))
                .collect()
        } else {
            settings
                .floor_ops
                .iter()
                .map(|(name, ops)| {
                    let label = if ops.is_empty() {
                        "minimal proxy-wasm filter: no host call".to_owned()
                    } else {
                        format!("minimal proxy-wasm filter: {ops}")
                    };
                    (name.clone(), label, ops.clone())
                })
                .collect()
        };
        for (name, label, configuration) in floor {
            plan.push((
                name,
                label,
                Filter::OtherWasm {
                    module: module.clone(),
                    configuration,
                },
            ));
        }
    }
    for (number, module) in (2..).zip(&settings.alt_modules) {
        plan.push((
            format!("c{number}"),
            format!("tokengate, 1 warm tenant, module {}", module.display()),
            Filter::OtherWasm {
                module: module.clone(),
                configuration: Envoy::default_filter_config().to_string(),
            },
        ));
    }
    plan.push((
        CONTROL.into(),
        "plain Envoy again, another process (noise control)".into(),
        Filter::None,
    ));
    let mut envoys = Vec::new();
    for (name, _, filter) in &plan {
        envoys.push(
            BenchEnvoy::start(
                dir.path(),
                name,
                filter,
                &upstreams,
                settings.envoy_cpus.as_deref(),
            )
            .await?,
        );
    }
    let rss_a_start_kib = rss_kib(envoys[0].pid()).unwrap_or(0);
    let rss_d_empty_kib = rss_kib(envoys[3].pid()).unwrap_or(0);

    // (b): Envoy fetches its one token on its main thread; wait until it injects it.
    wait_for_token(&envoys[1], "acme", "Bearer gen-acme-").await?;
    // (c): one tenant.
    wait_for_token(&envoys[2], "acme", "Bearer gen-acme-").await?;
    for (index, (name, _, _)) in plan.iter().enumerate() {
        if name.len() > 1 && name.starts_with('c') {
            wait_for_token(&envoys[index], "acme", "Bearer gen-acme-").await?;
        }
    }
    let index_of = |name: &str| plan.iter().position(|(n, _, _)| n == name);
    if let Some(n) = index_of(NATIVE) {
        wait_for_token(&envoys[n], "acme", "Bearer gen-acme-").await?;
    }
    // (d): every generated tenant, through Envoy, so each is fetched once and cached.
    let logins_before = standins.calls(Endpoint::Login);
    let started = Instant::now();
    warm_tenants(envoys[3].addr(), settings.tenants, 32).await?;
    let warm_duration = started.elapsed();
    let warm_oauth_calls = standins.calls(Endpoint::Login) - logins_before;
    let rss_d_warm_kib = rss_kib(envoys[3].pid()).unwrap_or(0);
    // (n10k) the same (from the companion's cache: the tokens are in Redis by now).
    if let Some(n10k) = index_of(NATIVE_MANY) {
        warm_tenants(envoys[n10k].addr(), settings.tenants, 32).await?;
    }

    let script = wrk::write_script(dir.path()).map_err(|e| e.to_string())?;
    let throughput_run = |name: &str| WrkRun {
        connections: settings.connections,
        duration: settings.throughput_duration,
        cpus: settings.client_cpus.clone(),
        tenant_count: if many_tenants(name) {
            settings.tenants
        } else {
            1
        },
        tenant: if many_tenants(name) {
            tokengate_tests::standins::GENERATED_TENANT_PREFIX.to_owned()
        } else {
            "acme".to_owned()
        },
    };
    let wrk_command = format!(
        "taskset -c {} wrk -t1 -c{} -d{}s --timeout 10s -s bench/wrk/tenants.lua http://127.0.0.1:<port>/api/conversations -- 1 acme",
        settings.client_cpus.as_deref().unwrap_or("-"),
        settings.connections,
        settings.throughput_duration.as_secs()
    );

    // Warm-up: V8 tiers the filter up, connections to the upstream are opened.
    for envoy in &envoys {
        let mut warm = throughput_run(&envoy.name);
        warm.duration = Duration::from_secs(2);
        run_wrk(&script, envoy, &warm).await?;
    }

    let logins_before_runs = standins.calls(Endpoint::Login);
    let hits_before = (
        envoys[2].counter(&wasm_stat("cache_hit")).await,
        envoys[3].counter(&wasm_stat("cache_hit")).await,
    );
    let misses_before = (
        envoys[2].counter(&wasm_stat("cache_miss")).await,
        envoys[3].counter(&wasm_stat("cache_miss")).await,
    );
    let native_pair = index_of(NATIVE).zip(index_of(NATIVE_MANY));
    let native_before = match native_pair {
        Some((n, n10k)) => Some(native_counts(&envoys[n], &envoys[n10k]).await),
        None => None,
    };
    let mut configs: Vec<ConfigRuns> = plan
        .iter()
        .map(|(name, label, _)| ConfigRuns {
            name: name.clone(),
            label: label.clone(),
            throughput: Vec::new(),
            cpu_us_per_request: Vec::new(),
            cpu_share: Vec::new(),
            interference: Vec::new(),
            steal: Vec::new(),
            client_cpu_busy: Vec::new(),
            latency: Vec::new(),
            rss_end_kib: 0,
        })
        .collect();
    for round in 0..settings.rounds {
        // The order rotates every round, so each configuration runs in every position
        // (the first run after the light single-connection runs tends to be slower).
        let order: Vec<usize> = (0..envoys.len())
            .map(|i| (i + round) % envoys.len())
            .collect();
        let mut prewarm = throughput_run(&envoys[order[0]].name);
        prewarm.duration = Duration::from_secs(1);
        run_wrk(&script, &envoys[order[0]], &prewarm).await?;
        for &index in &order {
            let (envoy, config) = (&envoys[index], &mut configs[index]);
            let pinned_cpu = settings.envoy_cpus.as_deref().unwrap_or("0");
            let cpu_before = cpu_time_us(envoy.pid()).unwrap_or(0);
            let machine_before = cpu_busy_steal_us(pinned_cpu).unwrap_or((0, 0));
            let client_cpu = settings.client_cpus.as_deref().unwrap_or("1");
            let client_before = cpu_busy_steal_us(client_cpu).unwrap_or((0, 0));
            let result = run_wrk(&script, envoy, &throughput_run(&envoy.name)).await?;
            let cpu_used = cpu_time_us(envoy.pid()).unwrap_or(0) - cpu_before;
            let machine_after = cpu_busy_steal_us(pinned_cpu).unwrap_or((0, 0));
            let client_after = cpu_busy_steal_us(client_cpu).unwrap_or((0, 0));
            let wall = result.duration_us.max(1) as f64;
            if settings.envoy_cpus.is_some() {
                config
                    .client_cpu_busy
                    .push(client_after.0.saturating_sub(client_before.0) as f64 / wall);
                let busy = machine_after.0.saturating_sub(machine_before.0);
                config
                    .interference
                    .push(busy.saturating_sub(cpu_used) as f64 / wall);
            }
            config
                .steal
                .push(machine_after.1.saturating_sub(machine_before.1) as f64 / wall);
            eprintln!(
                "bench: hit path round {} {} throughput {:.0} req/s p50 {} us p99 {} us errors {}",
                round + 1,
                envoy.name,
                result.rps(),
                result.p50_us,
                result.p99_us,
                result.errors()
            );
            config
                .cpu_us_per_request
                .push(cpu_used as f64 / result.requests.max(1) as f64);
            config
                .cpu_share
                .push(cpu_used as f64 / result.duration_us.max(1) as f64);
            config.throughput.push(result);
        }
        for &index in &order {
            let (envoy, config) = (&envoys[index], &mut configs[index]);
            let mut single = throughput_run(&envoy.name);
            single.connections = 1;
            single.duration = settings.latency_duration;
            let result = run_wrk(&script, envoy, &single).await?;
            eprintln!(
                "bench: hit path round {} {} 1 connection p50 {} us p99 {} us",
                round + 1,
                envoy.name,
                result.p50_us,
                result.p99_us
            );
            config.latency.push(result);
        }
    }
    let oauth_calls_during_runs = standins.calls(Endpoint::Login) - logins_before_runs;
    let cache_hits = (
        envoys[2].counter(&wasm_stat("cache_hit")).await - hits_before.0,
        envoys[3].counter(&wasm_stat("cache_hit")).await - hits_before.1,
    );
    let cache_misses = (
        envoys[2].counter(&wasm_stat("cache_miss")).await - misses_before.0,
        envoys[3].counter(&wasm_stat("cache_miss")).await - misses_before.1,
    );
    let native_hits_misses = match (native_pair, native_before) {
        (Some((n, n10k)), Some(before)) => {
            let after = native_counts(&envoys[n], &envoys[n10k]).await;
            Some((
                (after.0.0 - before.0.0, after.0.1 - before.0.1),
                (after.1.0 - before.1.0, after.1.1 - before.1.1),
            ))
        }
        _ => None,
    };
    let injector_stats = (
        envoys[1]
            .counter("http.ingress.credential_injector.oauth2.token_fetched")
            .await,
        envoys[1]
            .counter("http.ingress.credential_injector.injected")
            .await,
    );

    let mut profiles = Vec::new();
    if settings.profile {
        let profiled = PROFILED
            .iter()
            .filter_map(|name| plan.iter().position(|(n, _, _)| n == name));
        for index in profiled {
            let envoy = &envoys[index];
            match profile_under_load(&script, envoy, &throughput_run(&envoy.name)).await {
                Ok(profile) => profiles.push(Profile {
                    name: plan[index].0.clone(),
                    ..profile
                }),
                Err(error) => eprintln!("bench: no profile of {}: {error}", envoy.name),
            }
        }
    }
    for (envoy, config) in envoys.iter().zip(configs.iter_mut()) {
        config.rss_end_kib = rss_kib(envoy.pid()).unwrap_or(0);
    }
    drop(envoys);
    drop(echo);
    Ok(HitPath {
        settings,
        configs,
        rss_d_empty_kib,
        rss_d_warm_kib,
        rss_a_start_kib,
        warm_duration,
        warm_oauth_calls,
        oauth_calls_during_runs,
        cache_hits,
        cache_misses,
        native_hits_misses,
        injector_stats,
        profiles,
        wrk_command,
    })
}

/// The native build's ((hits, misses) of (n), (hits, misses) of (n10k)).
async fn native_counts(n: &BenchEnvoy, n10k: &BenchEnvoy) -> ((u64, u64), (u64, u64)) {
    (
        (
            n.counter(&native_stat("cache_hit")).await,
            n.counter(&native_stat("cache_miss")).await,
        ),
        (
            n10k.counter(&native_stat("cache_hit")).await,
            n10k.counter(&native_stat("cache_miss")).await,
        ),
    )
}

/// Of independent runs, the index of the one whose c/a throughput ratio is the median
/// (the lower middle one of an even count); `None` when there is none.
pub fn median_run(runs: &[HitPath]) -> Option<usize> {
    let mut ordered: Vec<(f64, usize)> = runs
        .iter()
        .enumerate()
        .map(|(index, run)| (run.config("c").paired_rps_ratio(run.config("a")), index))
        .collect();
    ordered.sort_by(|x, y| x.0.total_cmp(&y.0));
    ordered
        .get(ordered.len().saturating_sub(1) / 2)
        .map(|(_, index)| *index)
}

impl HitPath {
    /// The configuration named `name`, if it ran.
    pub fn find(&self, name: &str) -> Option<&ConfigRuns> {
        self.configs.iter().find(|c| c.name == name)
    }

    /// The configuration named `name` (a, b, c, d and the control always run).
    pub fn config(&self, name: &str) -> &ConfigRuns {
        self.find(name).unwrap_or(&self.configs[0])
    }
}

async fn run_wrk(
    script: &std::path::Path,
    envoy: &BenchEnvoy,
    run: &WrkRun,
) -> Result<WrkResult, String> {
    let script = script.to_path_buf();
    let url = envoy.url();
    let run = run.clone();
    tokio::task::spawn_blocking(move || wrk::run(&script, &url, &run))
        .await
        .map_err(|e| e.to_string())?
}

/// Sends requests for `tenant` until the upstream sees a token starting with `prefix`.
async fn wait_for_token(envoy: &BenchEnvoy, tenant: &str, prefix: &str) -> Result<(), String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(mut conn) = Conn::connect(envoy.addr()).await {
            match conn.get("/api/conversations", tenant).await {
                Ok(answer)
                    if answer.status == 200
                        && answer
                            .seen_authorization
                            .as_deref()
                            .is_some_and(|seen| seen.starts_with(prefix)) =>
                {
                    return Ok(());
                }
                Ok(answer) => {
                    last = format!(
                        "status {} {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    )
                }
                Err(error) => last = error,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "Envoy {} never injected a token for {tenant} (last answer: {last}):\n{}",
        envoy.name,
        envoy.log_tail(20)
    ))
}

/// Requests every generated tenant once through `addr`, `parallel` at a time, and
/// checks each got its own token.
pub async fn warm_tenants(
    addr: std::net::SocketAddr,
    tenants: usize,
    parallel: usize,
) -> Result<(), String> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel.max(1) {
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= tenants {
                    return Ok::<(), String>(());
                }
                let tenant = generated_tenant_id(n);
                let answer = conn.get("/api/conversations", &tenant).await?;
                let expected = format!("Bearer gen-{tenant}-");
                if answer.status != 200
                    || !answer
                        .seen_authorization
                        .as_deref()
                        .is_some_and(|seen| seen.starts_with(&expected))
                {
                    return Err(format!(
                        "warming {tenant}: status {} {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    ));
                }
            }
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Samples the Envoy's CPU with `perf record -e cpu-clock` for 4 s in the middle of a
/// saturating wrk run, and splits the samples by shared object.
async fn profile_under_load(
    script: &std::path::Path,
    envoy: &BenchEnvoy,
    run: &WrkRun,
) -> Result<Profile, String> {
    let mut run = run.clone();
    run.duration = Duration::from_secs(7);
    let load = {
        let script = script.to_path_buf();
        let url = envoy.url();
        tokio::task::spawn_blocking(move || wrk::run(&script, &url, &run))
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let data = std::env::temp_dir().join(format!("tokengate-bench-perf-{}.data", envoy.pid()));
    let pid = envoy.pid();
    let data_path = data.clone();
    let recorded = tokio::task::spawn_blocking(move || {
        std::process::Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "999", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&data_path)
            .args(["--", "sleep", "4"])
            .output()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("perf: {e}"))?;
    let _ = load.await;
    if !recorded.status.success() {
        return Err(format!(
            "perf record failed: {}",
            String::from_utf8_lossy(&recorded.stderr)
        ));
    }
    let report = |sort: &str| {
        std::process::Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--percent-limit",
                "0.5",
                "--sort",
                sort,
                "-i",
            ])
            .arg(&data)
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .map_err(|e| format!("perf report: {e}"))
    };
    let text = report("dso");
    let by_symbol = report("dso,sym");
    let _ = std::fs::remove_file(&data);
    let text = text?;
    let samples = text
        .lines()
        .find_map(|line| line.strip_prefix("# Samples: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| {
            let count = count.trim();
            let (number, scale) = match count.strip_suffix('K') {
                Some(n) => (n, 1000.0),
                None => (count, 1.0),
            };
            number.parse::<f64>().ok().map(|n| (n * scale) as u64)
        })
        .unwrap_or(0);
    let dsos = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (percent, dso) = line.trim().split_once('%')?;
            Some((dso.trim().to_owned(), percent.trim().parse::<f64>().ok()?))
        })
        .take(8)
        .collect();
    // Lines like `  12.34%  envoy  [.] Envoy::Http::...`.
    let symbols = by_symbol
        .unwrap_or_default()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (percent, rest) = line.trim().split_once('%')?;
            let rest = rest.split_whitespace().collect::<Vec<_>>().join(" ");
            Some((rest, percent.trim().parse::<f64>().ok()?))
        })
        .take(PROFILE_SYMBOLS)
        .collect();
    Ok(Profile {
        name: String::new(),
        dsos,
        symbols,
        samples,
    })
}
