//! `tokengate-bench`: the benchmarks behind `scripts/bench` and `BENCHMARKS.md`.
//!
//! ```text
//! tokengate-bench run [--quick] [--repeat 3] [--out BENCHMARKS.md] [--only hit,stampede,wakeup,rollover,lease,footprint,churn]
//! tokengate-bench echo --listen 127.0.0.1:PORT     # the fast upstream (started by `run`)
//! tokengate-bench soak [--minutes 12] [--churn-every-secs 2] [--out SOAK.md]  # the soak (scripts/soak)
//! ```
//!
//! `run` starts everything on loopback (stand-ins in this process; Redis, companions,
//! Envoys, the echo upstream and wrk as processes), runs the scenarios and writes the
//! report. It expects release builds: `scripts/bench` builds them and points
//! `TOKENGATE_COMPANION` at the release companion. See `BENCHMARKS.md` for what each
//! scenario measures and how. `soak` holds load with short-lived tokens and a fault
//! every minute and writes `SOAK.md` (see `scenarios::soak`).

mod client;
mod echo;
mod envoy;
mod fleet;
mod machine;
mod report;
mod scenarios;
mod stats;
mod wrk;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokengate_tests::harness::{Envoy, FilterBuild, companion_binary, envoy_binary, wasm_module};
use tokengate_tests::standins::{Endpoint, Fixture};

use crate::fleet::{EchoProcess, Fleet, FleetSpec};
use crate::machine::Machine;
use crate::report::Report;
use crate::scenarios::{churn, footprint, hit_path, lease, rollover, soak, stampede, wakeup};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of tokengate (scripts/bench)")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the scenarios and writes the report.
    Run {
        /// Short runs, to try the tooling (numbers not meaningful).
        #[arg(long)]
        quick: bool,
        /// Where to write the report.
        #[arg(long, default_value = "BENCHMARKS.md")]
        out: PathBuf,
        /// Comma-separated subset: hit, stampede, wakeup, rollover, lease, footprint, churn.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Do not pin Envoy and the load generator to separate CPUs.
        #[arg(long)]
        no_pin: bool,
        /// Do not profile the hit path with perf.
        #[arg(long)]
        no_profile: bool,
        /// How the run was started, for the report.
        #[arg(long, default_value = "scripts/bench")]
        command_line: String,
        /// The load average before the run (the script waited for it), for the report.
        #[arg(long)]
        load_before: Option<String>,
        /// The minimal proxy-wasm filter (`bench/wasm-floor`), to measure the floor cost
        /// of any proxy-wasm filter next to tokengate.
        #[arg(long)]
        floor_wasm: Option<PathBuf>,
        /// The folder of the minimal dynamic module (`bench/native-floor`,
        /// `libnative_floor.so`), to measure the floor cost of any native filter next to
        /// tokengate's native build: row (h).
        #[arg(long)]
        floor_native: Option<PathBuf>,
        /// An experiment: instead of (e), (f), (g), run the minimal filter with these host
        /// calls, e.g. `--floor-ops h=time --floor-ops i=shared_get` (`NAME=` alone: none).
        #[arg(long)]
        floor_ops: Vec<String>,
        /// Rounds of the hit path in each of its runs (default 12, or 6 when it runs
        /// more than once; quick: 1).
        #[arg(long)]
        rounds: Option<usize>,
        /// Independent runs of the hit path (fresh processes each): its headline figures
        /// are their median, with their spread (default 3; quick: 1).
        #[arg(long)]
        repeat: Option<usize>,
        /// An experiment: other builds of tokengate.wasm, measured as (c2), (c3), ... next
        /// to (c).
        #[arg(long)]
        alt_wasm: Vec<PathBuf>,
        /// Distinct tenants the churn scenario streams (default 1,000,000; quick: 20,000).
        #[arg(long)]
        churn_tenants: Option<usize>,
    },
    /// Holds load with 10 s tokens, tenant churn and a fault every minute; writes the soak
    /// report.
    Soak {
        /// Minutes of load.
        #[arg(long, default_value_t = 12.0)]
        minutes: f64,
        /// Requests per second, all connections together.
        #[arg(long, default_value_t = 400)]
        rate: u32,
        /// Concurrent connections (loops).
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Genesys tenants active at once.
        #[arg(long, default_value_t = 20)]
        tenants: usize,
        /// Tenant churn: every this many seconds the oldest active tenant leaves and a
        /// never-seen one joins (an hour: 1,800 tenants come and go); 0: no churn.
        #[arg(long, default_value_t = 2)]
        churn_every_secs: u64,
        /// Seconds between faults.
        #[arg(long, default_value_t = 60)]
        fault_every_secs: u64,
        /// Seconds of warm-up before memory growth is measured.
        #[arg(long, default_value_t = 120)]
        warmup_secs: u64,
        /// Where to write the report.
        #[arg(long, default_value = "SOAK.md")]
        out: PathBuf,
        /// Where to copy the processes' logs.
        #[arg(long, default_value = "target/soak-logs")]
        logs: PathBuf,
        /// How the run was started, for the report.
        #[arg(long, default_value = "tokengate-bench soak")]
        command_line: String,
        /// A remark for the report, e.g. what else ran on the machine.
        #[arg(long)]
        note: Option<String>,
    },
    /// Serves the benchmark's upstream until killed.
    Echo {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
}

/// Everything a run found; rendered by [`report`].
#[derive(Debug, Default)]
pub struct Results {
    /// The machine.
    pub machine: Machine,
    /// Load average at the start.
    pub load_start: String,
    /// Load average at the end.
    pub load_end: String,
    /// Load average the script saw before starting, if it waited.
    pub load_before: Option<String>,
    /// When it started.
    pub date: String,
    /// The command.
    pub command_line: String,
    /// Quick mode.
    pub quick: bool,
    /// CPU pinning used (Envoy CPUs, client CPUs).
    pub pinning: Option<(String, String)>,
    /// How long it all took.
    pub duration: Duration,
    /// Binaries measured.
    pub binaries: Vec<(String, String)>,
    /// Scenario 1: the run whose c/a throughput ratio is the median (its tables are
    /// shown in full).
    pub hit_path: Option<hit_path::HitPath>,
    /// Scenario 1: every independent run (the headline figures are their median).
    pub hit_path_runs: Vec<hit_path::HitPath>,
    /// Scenario 2: warm-up burst (first, cold processes) and the measured one.
    pub stampede: Vec<stampede::StampedeRun>,
    /// IdP latency of the stampede.
    pub stampede_idp: Duration,
    /// Fleet shape of the stampede: (envoys, workers each, companions).
    pub stampede_shape: (usize, u32, usize),
    /// Scenario 3, per worker count.
    pub wakeup: Vec<wakeup::WakeUp>,
    /// Scenario 2 on the native build (warm-up, measured, control), when it is built.
    pub native_stampede: Vec<stampede::StampedeRun>,
    /// Scenario 3 on the native build, per worker count.
    pub native_wakeup: Vec<wakeup::WakeUp>,
    /// Scenario 4.
    pub rollover: Option<rollover::Rollover>,
    /// Scenario 5.
    pub lease: Option<lease::LeaseBench>,
    /// Scenario 6.
    pub footprint: Option<footprint::Footprint>,
    /// Scenario 7, per build (wasm first).
    pub churn: Vec<churn::Churn>,
    /// The file name of scenario 7's chart, beside the report.
    pub churn_chart: Option<String>,
    /// Scenarios that failed, with why.
    pub failures: Vec<(String, String)>,
}

fn main() -> ExitCode {
    // Measure what operators run: Envoy and the companion at `info`.
    tokengate_tests::harness::log_like_an_operator();
    let args = Args::parse();
    match args.command {
        Cmd::Echo { listen } => match echo::serve(listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("echo: {error}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run {
            quick,
            out,
            only,
            no_pin,
            no_profile,
            command_line,
            load_before,
            floor_wasm,
            floor_native,
            floor_ops,
            rounds,
            repeat,
            alt_wasm,
            churn_tenants,
        } => {
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            let options = Options {
                quick,
                only,
                pin: !no_pin,
                profile: !no_profile,
                floor_wasm,
                floor_native,
                floor_ops: floor_ops
                    .iter()
                    .map(|spec| {
                        let (name, ops) = spec.split_once('=').unwrap_or((spec, ""));
                        (name.to_owned(), ops.to_owned())
                    })
                    .collect(),
                rounds,
                repeat,
                alt_wasm,
                churn_tenants,
            };
            let mut results = runtime.block_on(run(&options));
            results.command_line = command_line;
            results.load_before = load_before;
            if !results.churn.is_empty() {
                let chart = churn_chart_path(&out);
                if let Err(error) = std::fs::write(&chart, churn::svg(&results.churn)) {
                    eprintln!("bench: cannot write {}: {error}", chart.display());
                    return ExitCode::FAILURE;
                }
                results.churn_chart = chart
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned());
            }
            let text = Report(&results).render();
            if let Err(error) = std::fs::write(&out, text) {
                eprintln!("bench: cannot write {}: {error}", out.display());
                return ExitCode::FAILURE;
            }
            eprintln!("bench: wrote {}", out.display());
            if results.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                for (scenario, error) in &results.failures {
                    eprintln!("bench: scenario {scenario} failed: {error}");
                }
                ExitCode::FAILURE
            }
        }
        Cmd::Soak {
            minutes,
            rate,
            connections,
            tenants,
            churn_every_secs,
            fault_every_secs,
            warmup_secs,
            out,
            logs,
            command_line,
            note,
        } => {
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            let settings = soak::Settings {
                duration: Duration::from_secs_f64(minutes.max(0.1) * 60.0),
                rate: rate.max(1),
                connections: connections.max(1),
                tenants: tenants.max(1),
                churn_every: Duration::from_secs(churn_every_secs),
                fault_every: Duration::from_secs(fault_every_secs),
                warmup: Duration::from_secs(warmup_secs),
                logs,
                command_line,
                note,
            };
            let found = match runtime.block_on(soak::run(settings)) {
                Ok(found) => found,
                Err(error) => {
                    eprintln!("soak: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let text = soak::render(&found);
            println!("{text}");
            if let Err(error) = std::fs::write(&out, &text) {
                eprintln!("soak: cannot write {}: {error}", out.display());
                return ExitCode::FAILURE;
            }
            eprintln!("soak: wrote {}", out.display());
            let missed: Vec<_> = found.goals().into_iter().filter(|g| !g.met).collect();
            for goal in &missed {
                eprintln!("soak: goal missed: {}: {}", goal.name, goal.detail);
            }
            if missed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The multi-threaded runtime the benchmarks run on.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(error) => {
            eprintln!("bench: no runtime: {error}");
            None
        }
    }
}

struct Options {
    quick: bool,
    only: Vec<String>,
    pin: bool,
    profile: bool,
    floor_wasm: Option<PathBuf>,
    floor_native: Option<PathBuf>,
    floor_ops: Vec<(String, String)>,
    rounds: Option<usize>,
    repeat: Option<usize>,
    alt_wasm: Vec<PathBuf>,
    churn_tenants: Option<usize>,
}

/// Where the churn scenario's chart goes: beside the report, `<report name>-churn.svg`.
pub fn churn_chart_path(report: &std::path::Path) -> PathBuf {
    let stem = report.file_stem().map_or_else(
        || "BENCHMARKS".into(),
        |stem| stem.to_string_lossy().into_owned(),
    );
    report.with_file_name(format!("{stem}-churn.svg"))
}

impl Options {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

/// The builds of the filter to measure, one after the other: wasm, and native when it
/// is built.
fn builds() -> Vec<FilterBuild> {
    let mut builds = vec![FilterBuild::Wasm];
    if envoy::native_module_built() {
        builds.push(FilterBuild::Native);
    }
    builds
}

async fn run(options: &Options) -> Results {
    let started = Instant::now();
    let mut results = Results {
        machine: Machine::detect(&envoy_binary()),
        load_start: machine::load_average(),
        date: machine::now_utc(),
        quick: options.quick,
        ..Results::default()
    };
    results.binaries = vec![
        ("Envoy".into(), envoy_binary().display().to_string()),
        ("filter".into(), wasm_module().display().to_string()),
        ("companion".into(), companion_binary().display().to_string()),
    ];
    if envoy::native_module_built() {
        let module = envoy::native_module_dir().join("libtokengate_native.so");
        results
            .binaries
            .insert(2, ("native filter".into(), module.display().to_string()));
    }
    let pinning = (options.pin && results.machine.cpus >= 2).then(|| {
        let last = results.machine.cpus - 1;
        ("0".to_owned(), last.to_string())
    });
    results.pinning = pinning.clone();
    let quick = options.quick;

    if options.wants("footprint") {
        eprintln!("bench: footprint");
        match footprint::run(&wasm_module()) {
            Ok(found) => results.footprint = Some(found),
            Err(error) => results.failures.push(("footprint".into(), error)),
        }
    }

    if options.wants("hit") {
        let repeat = options.repeat.unwrap_or(if quick { 1 } else { 3 }).max(1);
        let default_rounds = match (quick, repeat) {
            (true, _) => 1,
            (false, 1) => 12,
            (false, _) => 6,
        };
        let settings = hit_path::Settings {
            rounds: options.rounds.unwrap_or(default_rounds),
            throughput_duration: Duration::from_secs(2),
            connections: 16,
            latency_duration: Duration::from_secs(2),
            tenants: if quick { 500 } else { 10_000 },
            envoy_cpus: pinning.as_ref().map(|(envoy, _)| envoy.clone()),
            client_cpus: pinning.as_ref().map(|(_, client)| client.clone()),
            profile: options.profile,
            floor_module: options.floor_wasm.clone(),
            native_floor: options.floor_native.clone(),
            floor_ops: options.floor_ops.clone(),
            alt_modules: options.alt_wasm.clone(),
        };
        for run in 1..=repeat {
            eprintln!("bench: hit path, run {run} of {repeat}");
            // One profile is enough: taken in the last run.
            let settings = hit_path::Settings {
                profile: settings.profile && run == repeat,
                ..settings.clone()
            };
            match hit_path::run(settings).await {
                Ok(found) => results.hit_path_runs.push(found),
                Err(error) => results
                    .failures
                    .push((format!("hit path (run {run} of {repeat})"), error)),
            }
        }
        results.hit_path = hit_path::median_run(&results.hit_path_runs)
            .and_then(|index| results.hit_path_runs.get(index))
            .cloned();
    }

    if options.wants("lease") {
        eprintln!("bench: companion lease against Redis GET");
        match lease::run(if quick { 2_000 } else { 20_000 }).await {
            Ok(found) => results.lease = Some(found),
            Err(error) => results.failures.push(("lease".into(), error)),
        }
    }

    if options.wants("stampede") || options.wants("wakeup") {
        for build in builds() {
            if let Err(error) = stampede_and_wakeup(options, &mut results, build).await {
                results
                    .failures
                    .push((format!("stampede / wake-up ({build:?})"), error));
            }
        }
    }

    if options.wants("rollover") {
        eprintln!("bench: expiry rollover");
        if let Err(error) = rollover_scenario(quick, &mut results).await {
            results.failures.push(("rollover".into(), error));
        }
    }

    if options.wants("churn") {
        for build in builds() {
            let settings = churn::Settings {
                tenants: options
                    .churn_tenants
                    .unwrap_or(if quick { 20_000 } else { 1_000_000 }),
                max_tenants: if quick { 2_000 } else { 100_000 },
                connections: 32,
                samples: 40,
                build,
            };
            eprintln!(
                "bench: churn, {} build ({} distinct tenants)",
                churn::build_name(build),
                settings.tenants
            );
            match churn::run(settings).await {
                Ok(found) => results.churn.push(found),
                Err(error) => results.failures.push((format!("churn ({build:?})"), error)),
            }
        }
    }

    results.load_end = machine::load_average();
    results.duration = started.elapsed();
    results
}

/// Tenants generated for the stampede and wake-up fleets (one per wake-up trial).
const TRIAL_TENANTS: usize = 200;

async fn stampede_and_wakeup(
    options: &Options,
    results: &mut Results,
    build: FilterBuild,
) -> Result<(), String> {
    let quick = options.quick;
    let native = build == FilterBuild::Native;
    let echo = EchoProcess::start(None)?;
    let idp = Duration::from_millis(200);
    let shape = (3, 2, 2);
    let spec = FleetSpec {
        envoys: shape.0,
        concurrency: shape.1,
        companions: shape.2,
        filter_config: Envoy::default_filter_config(),
        echo: echo.addr,
        build,
    };
    let fixture = || {
        Fixture::default_fixture()
            .with_generated_tenants(TRIAL_TENANTS)
            .map_err(|e| e.to_string())
    };
    let fleet = Fleet::start(&spec, fixture()?).await?;
    fleet.standins.set_latency(Endpoint::Login, idp);
    results.stampede_idp = idp;
    results.stampede_shape = shape;
    if options.wants("stampede") {
        let requests = if quick { 200 } else { 1_000 };
        eprintln!(
            "bench: stampede, {build:?} build ({requests} requests, warm-up burst on globex first)"
        );
        let runs = if native {
            &mut results.native_stampede
        } else {
            &mut results.stampede
        };
        runs.push(stampede::run_once(&fleet, "globex", requests).await?);
        runs.push(stampede::run_once(&fleet, "acme", requests).await?);
        // Control: the same burst again, now all cache hits: what proxying the burst
        // costs on this machine without any fetch.
        runs.push(stampede::run_once(&fleet, "acme", requests).await?);
    }
    if options.wants("wakeup") {
        let trials = if quick { 5 } else { 60 };
        eprintln!(
            "bench: wake-up, {build:?} build, {} workers per Envoy",
            spec.concurrency
        );
        let found = wakeup::run(&fleet, spec.concurrency, trials, 4, 0).await?;
        if native {
            results.native_wakeup.push(found);
        } else {
            results.wakeup.push(found);
        }
        drop(fleet);
        let single = FleetSpec {
            concurrency: 1,
            ..spec.clone()
        };
        eprintln!("bench: wake-up, {build:?} build, 1 worker per Envoy");
        let fleet = Fleet::start(&single, fixture()?).await?;
        fleet.standins.set_latency(Endpoint::Login, idp);
        let found = wakeup::run(&fleet, 1, trials, 4, trials).await?;
        if native {
            results.native_wakeup.push(found);
        } else {
            results.wakeup.push(found);
        }
    }
    Ok(())
}

async fn rollover_scenario(quick: bool, results: &mut Results) -> Result<(), String> {
    let echo = EchoProcess::start(None)?;
    let filter_config = Envoy::filter_config_with(serde_json::json!({
        "expiryMarginMs": 1000,
        "refreshAhead": { "percent": 40, "minLeadMs": 2000 }
    }));
    let spec = FleetSpec {
        envoys: 1,
        concurrency: 2,
        companions: 1,
        filter_config: filter_config.clone(),
        echo: echo.addr,
        build: FilterBuild::Wasm,
    };
    let fleet = Fleet::start(&spec, Fixture::default_fixture()).await?;
    let settings = rollover::Settings {
        lifetime_secs: 5,
        rollovers: if quick { 2 } else { 10 },
        connections: 4,
        interval: Duration::from_millis(2),
        window: Duration::from_millis(500),
        idp_latency: Duration::from_millis(50),
    };
    results.rollover = Some(rollover::run(&fleet, settings, filter_config).await?);
    Ok(())
}
