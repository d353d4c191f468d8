//! The soak (`tokengate-bench soak`, run by `scripts/soak`): sustained load for many
//! minutes on a fleet of 2 Envoys (2 workers each), 2 companions and one Redis, with
//! tokens that live 10 s (a token generation every 5 to 7.5 s), tenants coming and
//! going, and a fault injected every minute, cycling through
//! [`FaultKind::CYCLE`]. It checks:
//!
//! - **errors**: clients see no error the README does not document for the fault under
//!   way ([`FaultKind::expected_codes`]); every 200 carries a token of its own tenant
//!   that has not expired;
//! - **OAuth calls**: one per tenant per token generation. A token issued before its
//!   predecessor's refresh window opened (the earliest its refresh may start) is an
//!   extra call; it is explained only in
//!   the wake of a fault whose documented behaviour costs one
//!   ([`FaultKind::extra_tokens_reason`]), and at most once per tenant and fault;
//! - **memory**: the resident memory (`VmRSS`) of every Envoy and companion, sampled
//!   every 10 s, grows by at most [`MEMORY_GROWTH_PERCENT`] % (or
//!   [`MEMORY_GROWTH_FLOOR_KIB`], whichever is larger) from the end of the warm-up to
//!   the end;
//! - **load**: the generator kept at least 90 % of its target rate;
//! - every process stayed up (but the one killed on purpose) and every fault was injected.
//!
//! The load: `connections` loops, each with one keep-alive connection to one Envoy
//! (round-robin), sending paced `GET`s that step through the active tenants. With churn
//! (on by default, [`churn::Rotation`]) the active set rotates: every `churn_every` its
//! oldest tenant leaves and a never-seen one joins, and the gateway cache is bounded to
//! [`CACHE_MAX_TENANTS`], so its slots are reused and tenants pushed out within the run.
//! A tenant's first token is its generation 0; nothing is expected of a tenant after it
//! left. The stand-ins run
//! in this process; a tracker polls the tokens the login issued every 50 ms, which gives
//! each token's issue time (to 50 ms) for the OAuth and expiry checks.

mod analysis;
mod churn;
mod faults;
mod load;
mod report;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokengate_tests::harness::{
    Envoy, FilterBuild, companion_binary, envoy_binary, wasm_module, workspace_root,
};
use tokengate_tests::standins::{Endpoint, Fixture, StandIns, generated_tenant_id};

use crate::envoy::rss_kib;
use crate::fleet::{EchoProcess, Fleet, FleetSpec};
use crate::machine::{self, Machine};
use crate::stats::Latencies;

use analysis::{
    Merged, add_counters, analyse_tokens, companion_counters, envoy_counters, memory_rows, merge,
};
use churn::Rotation;
pub use faults::FaultKind;
use faults::{Active, Targets};
use load::{IssueTimes, LoadLoop, TokenTracker, warm_up};
pub use report::render;

/// Token lifetime the login stand-in answers (`expires_in`).
pub const LIFETIME_SECS: u64 = 10;
/// The filter's `expiryMarginMs`: a token is served until 9.5 s after its issue.
pub const EXPIRY_MARGIN_MS: u64 = 500;
/// The filter's `refreshAhead.percent`: the refresh window is the last half of a
/// token's life, from 5 s after its issue. The refresh starts at a moment in the first
/// half of that window (core's `cache::refresh_moment`: a jitter of the tenant and the
/// token's expiry), so by 7.5 s, which leaves 2 s before the end of service (more than
/// the IdP's slow spell of 1.5 s) for it to land. (At 30 %, the refresh could start as
/// late as 8.5 s, 1 s before the end of service.)
pub const REFRESH_PERCENT: u64 = 50;
/// The filter's `refreshAhead.minLeadMs` (below the 5 s that `percent` gives).
pub const REFRESH_MIN_LEAD_MS: u64 = 1_000;
/// The filter's `cache.maxTenants`: a few times the active set (20 by default), so with
/// churn the gateway cache's slots are reused (and tenants pushed out) within minutes,
/// and "memory flat" tests the bound, not a cache that never fills.
pub const CACHE_MAX_TENANTS: u32 = 64;
/// Growth of resident memory allowed after warm-up, in percent of the warm-up value...
pub const MEMORY_GROWTH_PERCENT: u64 = 5;
/// ... or this much, whichever is larger (allocator noise of a small process).
pub const MEMORY_GROWTH_FLOOR_KIB: u64 = 4 * 1024;

const ENVOYS: usize = 2;
const WORKERS: u32 = 2;
const COMPANIONS: usize = 2;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How often a burst waiting for its first call looks at the stand-in's count.
const WATCH_EVERY: Duration = Duration::from_millis(10);
/// How long after a fault ends its effects may still show: two token lifetimes plus
/// the filter's `companion.retryAfterMs` (5 s).
const SETTLE: Duration = Duration::from_secs(2 * LIFETIME_SECS + 5);
/// A token issued this much earlier than the start of its predecessor's refresh window
/// is an extra OAuth call (the tracker's 50 ms and scheduling are well inside it).
const EARLY_TOLERANCE: Duration = Duration::from_millis(500);
/// Share of the target rate the generator must keep.
const MIN_RATE_SHARE: f64 = 0.9;

/// How to run it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Length of the load.
    pub duration: Duration,
    /// Requests per second, all connections together.
    pub rate: u32,
    /// Concurrent loops (connections).
    pub connections: usize,
    /// Genesys tenants active at once (generated `bench-<n>`).
    pub tenants: usize,
    /// Tenant churn: every this long the oldest active tenant leaves and a never-seen one
    /// joins; zero: the same tenants throughout.
    pub churn_every: Duration,
    /// A fault every this long.
    pub fault_every: Duration,
    /// Memory growth is measured from this long after a process's start or the load's
    /// start, whichever is later.
    pub warmup: Duration,
    /// Where the processes' logs are copied at the end.
    pub logs: PathBuf,
    /// How the run was started, for the report.
    pub command_line: String,
    /// A remark for the report (e.g. what else ran on the machine).
    pub note: Option<String>,
}

impl Settings {
    /// The active set over time.
    fn rotation(&self) -> Rotation {
        Rotation {
            active: self.tenants,
            every: self.churn_every,
        }
    }

    /// The refresh window of a token issued at 0 (core's `cache::refresh_moment`): its
    /// last `percent` %, at least `minLeadMs`.
    fn refresh_lead() -> Duration {
        let lifetime_ms = LIFETIME_SECS * 1_000;
        Duration::from_millis((lifetime_ms * REFRESH_PERCENT / 100).max(REFRESH_MIN_LEAD_MS))
    }

    /// The earliest a token issued at 0 may start being refreshed: the start of its
    /// refresh window. Also the shortest time from a token to its refresh.
    fn refresh_window_start() -> Duration {
        Duration::from_secs(LIFETIME_SECS) - Self::refresh_lead()
    }

    /// The latest: the refresh starts in the first half of the window.
    fn refresh_latest() -> Duration {
        Self::refresh_window_start() + Self::refresh_lead() / 2
    }

    /// How long after its issue a token is still served.
    fn served_for() -> Duration {
        Duration::from_millis(LIFETIME_SECS * 1_000 - EXPIRY_MARGIN_MS)
    }
}

/// The filter configuration of the soak's Envoys.
pub fn filter_config() -> serde_json::Value {
    Envoy::filter_config_with(serde_json::json!({
        "expiryMarginMs": EXPIRY_MARGIN_MS,
        "refreshAhead": { "percent": REFRESH_PERCENT, "minLeadMs": REFRESH_MIN_LEAD_MS },
        "cache": { "maxTenants": CACHE_MAX_TENANTS }
    }))
}

/// One client-visible failure.
#[derive(Debug, Clone)]
pub struct Failure {
    /// When it was sent, after the start of the load.
    pub at: Duration,
    /// Status (0: no answer; 200 with a bad token).
    pub status: u16,
    /// The error body's `code`, or what was wrong.
    pub code: String,
    /// The request's tenant.
    pub tenant: String,
    /// Whether the fault under way documents it.
    pub expected: bool,
}

/// A fault as injected.
#[derive(Debug, Clone)]
pub struct Injected {
    /// Which.
    pub kind: FaultKind,
    /// When it began, after the start of the load.
    pub at: Duration,
    /// When it ended.
    pub ended: Duration,
    /// What happened.
    pub detail: String,
}

impl Injected {
    /// Whether `at` falls in the fault or its wake.
    fn covers(&self, at: Duration) -> bool {
        self.at <= at && at <= self.ended + SETTLE
    }
}

/// One resident-memory reading.
#[derive(Debug, Clone)]
struct MemorySample {
    at: Duration,
    process: String,
    pid: u32,
    rss_kib: u64,
}

/// The memory of one process (a restarted companion is a new one).
#[derive(Debug, Clone)]
pub struct MemoryRow {
    /// e.g. `envoy 0`.
    pub process: String,
    /// Its pid.
    pub pid: u32,
    /// First reading: when, and its value.
    pub first: (Duration, u64),
    /// Largest reading.
    pub max_kib: u64,
    /// Last reading.
    pub last: (Duration, u64),
    /// The reading growth is measured from (the first after warm-up), if any.
    pub baseline: Option<(Duration, u64)>,
}

impl MemoryRow {
    /// Growth from the baseline to the end (negative: shrank).
    pub fn growth_kib(&self) -> Option<i64> {
        self.baseline
            .map(|(_, base)| self.last.1 as i64 - base as i64)
    }

    /// The allowed growth.
    pub fn bound_kib(&self) -> Option<u64> {
        self.baseline
            .map(|(_, base)| (base * MEMORY_GROWTH_PERCENT / 100).max(MEMORY_GROWTH_FLOOR_KIB))
    }

    /// Within the bound (a process too short-lived to judge counts as within).
    pub fn within(&self) -> bool {
        match (self.growth_kib(), self.bound_kib()) {
            (Some(growth), Some(bound)) => growth <= bound as i64,
            _ => true,
        }
    }
}

/// One minute of load.
#[derive(Debug, Clone)]
pub struct Minute {
    /// Latency of the successful requests sent in it.
    pub latency: Latencies,
    /// Failures among its requests.
    pub failures: usize,
    /// Faults that began in it.
    pub faults: Vec<FaultKind>,
}

/// A token issued before its predecessor's refresh window opened.
#[derive(Debug, Clone)]
pub struct Extra {
    /// When, after the start of the load.
    pub at: Duration,
    /// Whose.
    pub tenant: String,
    /// How long after the tenant's previous token.
    pub after: Duration,
    /// The fault whose wake explains it (index into the faults).
    pub fault: Option<usize>,
}

/// The OAuth calls.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// Tokens issued per tenant during the load, for every tenant active during it.
    pub per_tenant: Vec<usize>,
    /// Tenants the login issued a token to (warm-up included).
    pub tenants_seen: usize,
    /// Time spent in the active set during the load, all tenants together.
    pub active_time: Duration,
    /// Tokens issued to a tenant well after it left (no request asked for them): when,
    /// and whose.
    pub after_leaving: Vec<(Duration, String)>,
    /// Time from a token to its successor (microseconds).
    pub intervals: Latencies,
    /// Successors issued from the start of the refresh window to the end of the
    /// predecessor's service.
    pub on_time: usize,
    /// Successors issued after the predecessor stopped being served (requests waited).
    pub late: Vec<Duration>,
    /// Successors issued before the refresh window opened.
    pub extras: Vec<Extra>,
    /// Calls to the login stand-in during the load (failed ones included).
    pub login_calls: u64,
    /// Tokens it issued during the load.
    pub issued: u64,
    /// Calls to the Tenant Service stand-in during the load.
    pub tenant_service_calls: u64,
}

/// Everything the soak found.
#[derive(Debug)]
pub struct Soak {
    /// The settings.
    pub settings: Settings,
    /// The filter configuration.
    pub filter_config: serde_json::Value,
    /// The machine.
    pub machine: Machine,
    /// When it started.
    pub date: String,
    /// Load averages at the start and the end.
    pub load: (String, String),
    /// Binaries used (Markdown).
    pub binaries: Vec<(String, String)>,
    /// Measured length of the load.
    pub duration: Duration,
    /// Requests sent.
    pub requests: u64,
    /// Per minute.
    pub minutes: Vec<Minute>,
    /// Every failure.
    pub failures: Vec<Failure>,
    /// Requests slower than [`load::SLOW`]: when, and how long (microseconds).
    pub slow: Vec<(Duration, u64)>,
    /// Faults.
    pub faults: Vec<Injected>,
    /// OAuth calls.
    pub tokens: Tokens,
    /// Memory per process.
    pub memory: Vec<MemoryRow>,
    /// The filter's counters, summed over the Envoys.
    pub envoy_stats: BTreeMap<String, u64>,
    /// The companions' lease outcomes and Redis health transitions (since each one's
    /// last start).
    pub companion_metrics: BTreeMap<String, u64>,
    /// Processes that died unasked, faults that could not be injected.
    pub incidents: Vec<String>,
    /// Warn and error lines of the Envoy and companion logs.
    pub log_warnings: Vec<LogLines>,
}

/// Warn or error lines of one kind of process that say the same thing.
#[derive(Debug, Clone)]
pub struct LogLines {
    /// `Envoy` or `companion`.
    pub process: &'static str,
    /// `warn` or `error`.
    pub level: &'static str,
    /// The message, numbers replaced by `#`.
    pub message: String,
    /// How many lines.
    pub count: usize,
}

/// A goal and whether it was met.
#[derive(Debug, Clone)]
pub struct Goal {
    /// What.
    pub name: &'static str,
    /// Met.
    pub met: bool,
    /// The numbers.
    pub detail: String,
}

impl Soak {
    /// The goals, checked.
    pub fn goals(&self) -> Vec<Goal> {
        let unexpected = self.failures.iter().filter(|f| !f.expected).count();
        let expected = self.failures.len() - unexpected;
        let unexplained = self
            .tokens
            .extras
            .iter()
            .filter(|e| e.fault.is_none())
            .count();
        let mut per_tenant_fault: BTreeMap<(&str, usize), usize> = BTreeMap::new();
        for extra in &self.tokens.extras {
            if let Some(fault) = extra.fault {
                *per_tenant_fault
                    .entry((extra.tenant.as_str(), fault))
                    .or_default() += 1;
            }
        }
        let refresh_period = Settings::refresh_window_start();
        let beyond = per_tenant_fault
            .iter()
            .filter(|((_, fault), count)| {
                **count
                    > self.faults[*fault]
                        .kind
                        .extra_tokens_allowed(refresh_period)
            })
            .count();
        let over_bound: Vec<&MemoryRow> = self.memory.iter().filter(|m| !m.within()).collect();
        let rate = self.requests as f64 / self.duration.as_secs_f64().max(1e-9);
        vec![
            Goal {
                name: "no unexpected client errors",
                met: unexpected == 0,
                detail: format!(
                    "{unexpected} unexpected, {expected} documented for the fault under way, of {} requests",
                    self.requests
                ),
            },
            Goal {
                name: "one OAuth call per tenant per token generation",
                met: unexplained == 0 && beyond == 0 && self.tokens.after_leaving.is_empty(),
                detail: format!(
                    "{} tokens for {} tenants; {} extra calls, {unexplained} not explained by a fault, \
                     {beyond} tenant-fault pairs beyond the fault's allowance, {} after the tenant left",
                    self.tokens.issued,
                    self.tokens.per_tenant.len(),
                    self.tokens.extras.len(),
                    self.tokens.after_leaving.len()
                ),
            },
            Goal {
                name: "memory growth within the bound after warm-up",
                met: over_bound.is_empty(),
                detail: if over_bound.is_empty() {
                    let judged = self.memory.iter().filter(|m| m.baseline.is_some()).count();
                    format!(
                        "{judged} of {} processes judged, all within",
                        self.memory.len()
                    )
                } else {
                    over_bound
                        .iter()
                        .map(|m| {
                            format!(
                                "{} grew {} KiB (bound {} KiB)",
                                m.process,
                                m.growth_kib().unwrap_or(0),
                                m.bound_kib().unwrap_or(0)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            },
            Goal {
                name: "load sustained",
                met: rate >= MIN_RATE_SHARE * f64::from(self.settings.rate),
                detail: format!(
                    "{rate:.0} requests/s of {} targeted (at least {:.0} % needed)",
                    self.settings.rate,
                    MIN_RATE_SHARE * 100.0
                ),
            },
            Goal {
                name: "processes up and every fault injected",
                met: self.incidents.is_empty(),
                detail: if self.incidents.is_empty() {
                    format!(
                        "{} faults injected, no process died unasked",
                        self.faults.len()
                    )
                } else {
                    self.incidents.join("; ")
                },
            },
        ]
    }
}

/// Runs the soak.
pub async fn run(settings: Settings) -> Result<Soak, String> {
    let longest = FaultKind::CYCLE
        .iter()
        .map(|kind| kind.hold())
        .max()
        .unwrap_or_default()
        .max(faults::MEET_WITHIN + Duration::from_secs(2));
    if settings.fault_every < longest + Duration::from_secs(5) {
        return Err(format!(
            "the fault period must exceed the longest fault ({} s, with a burst's wait for its first call) by 5 s",
            longest.as_secs()
        ));
    }
    let machine = Machine::detect(&envoy_binary());
    let date = machine::now_utc();
    let load_start = machine::load_average();
    let echo = EchoProcess::start(None)?;
    let rotation = settings.rotation();
    // One more than the load reaches, for a request sent in the very last moment.
    let generated = rotation.tenants_for(settings.duration) + 1;
    let fixture = Fixture::default_fixture()
        .with_generated_tenants(generated)
        .map_err(|e| e.to_string())?;
    let tenants: Arc<[String]> = (0..generated).map(generated_tenant_id).collect();
    let spec = FleetSpec {
        envoys: ENVOYS,
        concurrency: WORKERS,
        companions: COMPANIONS,
        filter_config: filter_config(),
        echo: echo.addr,
        build: FilterBuild::Wasm,
    };
    let mut fleet = Fleet::start(&spec, fixture).await?;
    fleet.standins.set_expires_in(LIFETIME_SECS as i64);
    let addrs: Vec<SocketAddr> = (0..ENVOYS).map(|i| fleet.envoy_addr(i)).collect();
    let issued: IssueTimes = Arc::new(Mutex::new(HashMap::new()));
    let mut tracker = TokenTracker::new(Arc::clone(&tenants), rotation, Arc::clone(&issued));
    warm_up(
        &addrs,
        &tenants[..settings.tenants.min(tenants.len())],
        Settings::refresh_window_start(),
        &mut tracker,
        &fleet.standins,
    )
    .await?;
    let login_before = fleet.standins.calls(Endpoint::Login);
    let tenant_service_before = fleet.standins.calls(Endpoint::TenantService);
    let issued_before = fleet.standins.tokens_issued();

    let epoch = Instant::now();
    tracker.start(epoch);
    let end = epoch + settings.duration;
    let interval = Duration::from_secs_f64(settings.connections as f64 / f64::from(settings.rate));
    let loops: Vec<_> = (0..settings.connections)
        .map(|i| {
            let load = LoadLoop {
                addr: addrs[i % ENVOYS],
                tenants: Arc::clone(&tenants),
                rotation,
                next_tenant: i,
                interval,
                start: epoch + interval.mul_f64(i as f64 / settings.connections as f64),
                end,
                epoch,
                issued: Arc::clone(&issued),
            };
            tokio::spawn(load.drive())
        })
        .collect();

    let Fleet {
        envoys,
        companions,
        redis,
        standins,
        dir,
    } = &mut fleet;
    let standins: &StandIns = standins;
    let mut controller = Controller {
        envoys,
        targets: Targets {
            standins,
            companions,
            redis,
            dir: dir.path(),
        },
        epoch,
        faults: Vec::new(),
        memory: Vec::new(),
        incidents: Vec::new(),
        down: None,
    };
    tokio::join!(
        tracker.run(standins, end + Duration::from_secs(1)),
        controller.run(&settings, end)
    );
    let Controller {
        faults,
        memory,
        incidents,
        ..
    } = controller;

    let mut records = Vec::new();
    for task in loops {
        records.push(task.await.map_err(|e| e.to_string())?);
    }

    let mut envoy_stats = BTreeMap::new();
    for envoy in &fleet.envoys {
        add_counters(&mut envoy_stats, &envoy_counters(envoy.admin_port).await);
    }
    let mut companion_metrics = BTreeMap::new();
    for companion in &fleet.companions {
        add_counters(&mut companion_metrics, &companion_counters(companion).await);
    }
    let tokens_issued = fleet.standins.tokens_issued() - issued_before;
    let login_calls = fleet.standins.calls(Endpoint::Login) - login_before;
    let tenant_service_calls =
        fleet.standins.calls(Endpoint::TenantService) - tenant_service_before;
    let log_warnings = analysis::log_warnings(fleet.dir.path());
    copy_logs(fleet.dir.path(), &settings.logs);
    drop(fleet);

    let mut tokens = analyse_tokens(
        &tracker.times,
        &tenants,
        rotation,
        epoch,
        settings.duration,
        &faults,
    );
    tokens.issued = tokens_issued;
    tokens.login_calls = login_calls;
    tokens.tenant_service_calls = tenant_service_calls;
    let Merged {
        minutes,
        failures,
        slow,
        requests,
    } = merge(records, &faults, |tenant| {
        let n = tenants.iter().position(|t| t == tenant)?;
        let first = tracker.times.get(n)?.first()?;
        Some(first.saturating_duration_since(epoch))
    });
    Ok(Soak {
        filter_config: filter_config(),
        machine,
        date,
        load: (load_start, machine::load_average()),
        binaries: vec![
            ("Envoy".into(), format!("`{}`", relative(&envoy_binary()))),
            (
                "filter".into(),
                format!(
                    "`{}` ({} bytes)",
                    relative(&wasm_module()),
                    std::fs::metadata(wasm_module()).map_or(0, |m| m.len())
                ),
            ),
            (
                "companion".into(),
                format!("`{}`", relative(&companion_binary())),
            ),
        ],
        duration: settings.duration,
        requests,
        minutes,
        failures,
        slow,
        memory: memory_rows(&memory, settings.warmup),
        faults,
        tokens,
        envoy_stats,
        companion_metrics,
        incidents,
        log_warnings,
        settings,
    })
}

/// A path inside the workspace as a relative one (the report names no machine's folders).
fn relative(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Where the cycle of faults is.
enum Phase {
    /// No fault under way.
    Idle,
    /// A fault that strikes during a fetch waits for the next OAuth call.
    Waiting {
        kind: FaultKind,
        occurrence: usize,
        since: Instant,
        calls_before: u64,
    },
    /// A fault under way, and when it began after the start of the load.
    Active(Active, Duration),
}

/// Injects the faults and samples memory while the load runs.
struct Controller<'a> {
    envoys: &'a mut [Envoy],
    targets: Targets<'a>,
    epoch: Instant,
    faults: Vec<Injected>,
    memory: Vec<MemorySample>,
    incidents: Vec<String>,
    /// The companion down on purpose right now.
    down: Option<usize>,
}

impl Controller<'_> {
    async fn run(&mut self, settings: &Settings, end: Instant) {
        let mut next_sample = self.epoch;
        let mut next_fault = self.epoch + settings.fault_every;
        // The last fault leaves half a period to settle before the end.
        let last_fault = end
            .checked_sub(settings.fault_every / 2)
            .unwrap_or(self.epoch);
        let mut begun = 0;
        let mut phase = Phase::Idle;
        loop {
            let mut next = next_sample.min(end);
            match &mut phase {
                Phase::Active(fault, _) => {
                    self.targets.watch(fault);
                    // A burst waiting for its first call is watched every 10 ms.
                    next = next.min(fault.ends().unwrap_or_else(|| Instant::now() + WATCH_EVERY));
                }
                Phase::Waiting { .. } => next = next.min(Instant::now() + WATCH_EVERY),
                Phase::Idle if next_fault <= last_fault => next = next.min(next_fault),
                Phase::Idle => {}
            }
            tokio::time::sleep_until(next.into()).await;
            let now = Instant::now();
            phase = match phase {
                Phase::Active(fault, at) if fault.ends().is_some_and(|ends| now >= ends) => {
                    let detail = self.targets.end(&fault).await;
                    self.down = None;
                    self.faults.push(Injected {
                        kind: fault.kind,
                        at,
                        ended: self.since_epoch(),
                        detail,
                    });
                    Phase::Idle
                }
                Phase::Idle if now >= next_fault && next_fault <= last_fault => {
                    let kind = FaultKind::CYCLE[begun % FaultKind::CYCLE.len()];
                    let occurrence = begun / FaultKind::CYCLE.len();
                    begun += 1;
                    next_fault += settings.fault_every;
                    if kind.strikes_during_a_fetch() {
                        Phase::Waiting {
                            kind,
                            occurrence,
                            since: now,
                            calls_before: self.targets.standins.calls(Endpoint::Login),
                        }
                    } else {
                        self.strike(kind, occurrence).await
                    }
                }
                Phase::Waiting {
                    kind,
                    occurrence,
                    since,
                    calls_before,
                } if self.targets.standins.calls(Endpoint::Login) > calls_before
                    || since.elapsed() >= faults::MEET_WITHIN =>
                {
                    self.strike(kind, occurrence).await
                }
                unchanged => unchanged,
            };
            if now >= next_sample {
                self.sample();
                next_sample += SAMPLE_EVERY;
            }
            if now >= end && matches!(phase, Phase::Idle) {
                break;
            }
        }
        self.sample();
    }

    /// Injects fault `kind`.
    async fn strike(&mut self, kind: FaultKind, occurrence: usize) -> Phase {
        let at = self.since_epoch();
        eprintln!(
            "soak: {:>5.1} min: {}",
            at.as_secs_f64() / 60.0,
            kind.describe()
        );
        match self.targets.begin(kind, occurrence).await {
            Ok(fault) => {
                self.down = fault.companion;
                Phase::Active(fault, at)
            }
            Err(error) => {
                self.incidents
                    .push(format!("{} could not be injected: {error}", kind.name()));
                Phase::Idle
            }
        }
    }

    fn since_epoch(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Reads every process's resident memory; notes processes that died unasked.
    fn sample(&mut self) {
        let at = self.since_epoch();
        let mut readings = Vec::new();
        for (index, envoy) in self.envoys.iter_mut().enumerate() {
            readings.push((
                format!("envoy {index}"),
                envoy.process.is_running(),
                envoy.process.id(),
            ));
        }
        for (index, companion) in self.targets.companions.iter_mut().enumerate() {
            let running = companion.process.is_running() || self.down == Some(index);
            readings.push((
                format!("companion {index}"),
                running,
                companion.process.id(),
            ));
        }
        for (process, running, pid) in readings {
            if !running {
                let incident = format!("{process} exited unasked");
                if !self.incidents.contains(&incident) {
                    eprintln!("soak: {incident}");
                    self.incidents.push(incident);
                }
                continue;
            }
            if let Some((pid, rss_kib)) = pid.and_then(|pid| rss_kib(pid).map(|rss| (pid, rss))) {
                self.memory.push(MemorySample {
                    at,
                    process,
                    pid,
                    rss_kib,
                });
            }
        }
    }
}

/// Copies the processes' logs (Envoy, companions, Redis) to `to`, replacing its contents.
fn copy_logs(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    if std::fs::create_dir_all(to).is_err() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "log") {
            let _ = std::fs::copy(&path, to.join(entry.file_name()));
        }
    }
}
