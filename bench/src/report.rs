//! Renders `BENCHMARKS.md` from a run's [`Results`], followed by the hand-written
//! analysis in `bench/findings.md`.

use std::fmt::Write as _;

use crate::Results;
use crate::machine::Machine;
use tokengate_tests::harness::FilterBuild;

use crate::scenarios::churn;
use crate::scenarios::hit_path::{CONTROL, ConfigRuns, HitPath, NATIVE, NATIVE_MANY, Profile};
use crate::stats::{Latencies, ms};

const FINDINGS: &str = include_str!("../findings.md");

/// The size goal of `tokengate.wasm`: no larger than before the hit-path work (the
/// first goal, 250 KB, was met on 2026-11-22 and given up for features since).
const MAX_WASM_BYTES: u64 = 308_934;

/// `path` relative to the checkout the benchmark runs in (its working directory), so the
/// report names no directory of the machine it ran on.
fn in_checkout(path: &str) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|dir| {
            std::path::Path::new(path)
                .strip_prefix(dir)
                .ok()
                .map(|relative| relative.display().to_string())
        })
        .unwrap_or_else(|| path.to_owned())
}

/// The report of one run.
pub struct Report<'a>(pub &'a Results);

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

pub(crate) fn kib_mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The head of a "machine" table: CPUs, memory, kernel, Envoy.
pub(crate) fn machine_rows(out: &mut String, m: &Machine) {
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| CPUs (`nproc`) | {} |", m.cpus);
    let _ = writeln!(out, "| CPU model | {} |", m.cpu_model);
    let _ = writeln!(out, "| memory | {} |", kib_mib(m.mem_total_kib));
    let _ = writeln!(out, "| kernel | {} |", m.kernel);
    let _ = writeln!(out, "| Envoy | {} |", m.envoy);
}

fn lat_row(name: &str, l: &Latencies) -> String {
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} |",
        l.count,
        ms(l.p50_us),
        ms(l.p90_us),
        ms(l.p99_us),
        ms(l.max_us),
        ms(l.mean_us as u64)
    )
}

/// A headline row of scenario 1: a pair of configurations and its goals.
struct HeadlineRow {
    name: &'static str,
    what: String,
    /// (numerator, denominator) configuration names.
    pair: (&'static str, &'static str),
    /// The least throughput ratio, if the pair has a goal.
    throughput_goal: Option<f64>,
    /// The largest Envoy CPU per request ratio, if the pair has a goal.
    cpu_goal: Option<f64>,
}

/// A figure over the independent runs of scenario 1.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    /// `None` without values.
    fn of(values: Vec<f64>) -> Option<Spread> {
        let min = values.iter().copied().reduce(f64::min)?;
        let max = values.iter().copied().reduce(f64::max)?;
        Some(Spread {
            median: crate::stats::median(&values),
            min,
            max,
        })
    }

    /// `median [min - max]`, with `decimals` decimals and `unit` after each figure.
    fn show(&self, decimals: usize, unit: &str) -> String {
        format!(
            "{:.decimals$}{unit} [{:.decimals$} - {:.decimals$}]",
            self.median, self.min, self.max
        )
    }
}

/// The stampede's goal for the measured burst of `runs` (warm-up, measured, warm
/// control): the IdP's latency, plus what the same burst costs when every request is a
/// cache hit (the warm control's p99, in the same run), plus 50 ms.
fn stampede_budget_us(results: &Results, runs: &[crate::scenarios::stampede::StampedeRun]) -> u64 {
    let warm_p99 = runs.get(2).map_or(0, |warm| warm.latency.p99_us);
    results.stampede_idp.as_micros() as u64 + warm_p99 + 50_000
}

const LAT_HEADER: &str =
    "| | requests | p50 | p90 | p99 | max | mean |\n|---|---:|---:|---:|---:|---:|---:|";

impl Report<'_> {
    /// The whole document.
    pub fn render(&self) -> String {
        let r = self.0;
        let mut out = String::new();
        let _ = writeln!(out, "# Benchmarks\n");
        let _ = writeln!(
            out,
            "Written by `{}` on {} (commit `{}`){}. The whole run took {:.1} minutes. \
             Everything ran on loopback on the machine below; numbers from another machine \
             or a loaded one are not comparable.\n",
            r.command_line,
            r.date,
            r.machine.commit,
            if r.quick {
                ", **quick mode: short runs to try the tooling, numbers not meaningful**"
            } else {
                ""
            },
            r.duration.as_secs_f64() / 60.0
        );
        self.summary(&mut out);
        self.machine(&mut out);
        if let Some(hit) = &r.hit_path {
            self.hit_path(&mut out, hit);
        }
        self.stampede(&mut out);
        self.wakeup(&mut out);
        self.rollover(&mut out);
        self.lease(&mut out);
        self.footprint(&mut out);
        self.churn(&mut out);
        if !r.failures.is_empty() {
            let _ = writeln!(out, "## Scenarios that failed\n");
            for (scenario, error) in &r.failures {
                let _ = writeln!(out, "- {scenario}: `{}`", error.replace('\n', " "));
            }
            let _ = writeln!(out);
        }
        out.push_str(FINDINGS);
        out
    }

    fn summary(&self, out: &mut String) {
        let r = self.0;
        let _ = writeln!(out, "## Summary\n");
        if !r.hit_path_runs.is_empty() {
            let count = r.hit_path_runs.len();
            let _ = writeln!(
                out,
                "Scenario 1's figures are the median of {count} independent run{} (each the \
                 median of its rounds), followed by their range [min - max]; Envoy CPU per \
                 request, the steadier figure on a shared machine, is given next to each \
                 throughput ratio.\n",
                if count == 1 { "" } else { "s" }
            );
        }
        let _ = writeln!(
            out,
            "| # | what | measured | goal | |\n|---|---|---|---|---|"
        );
        if !r.hit_path_runs.is_empty() {
            self.hit_path_summary(out);
        }
        if let Some(run) = r.stampede.get(1) {
            let budget = stampede_budget_us(r, &r.stampede);
            let _ = writeln!(
                out,
                "| 2 | stampede: OAuth calls for {} concurrent cold requests | {} | 1 | {} |",
                run.requests,
                run.oauth_calls,
                verdict(run.oauth_calls == 1)
            );
            let _ = writeln!(
                out,
                "| 2 | stampede: successes | {} / {} | all | {} |",
                run.successes(),
                run.requests,
                verdict(run.successes() == run.requests)
            );
            let _ = writeln!(
                out,
                "| 2 | stampede: p50 / p99 latency (IdP {} ms) | {} / {} (first answer {}; the same burst warm: p99 {}) | p99 <= IdP + warm p99 + 50 ms = {} | {} |",
                r.stampede_idp.as_millis(),
                ms(run.latency.p50_us),
                ms(run.latency.p99_us),
                ms(run.latency.min_us),
                r.stampede
                    .get(2)
                    .map_or_else(|| "-".to_owned(), |warm| ms(warm.latency.p99_us)),
                ms(budget),
                verdict(run.latency.p99_us <= budget)
            );
        }
        if let Some(run) = r.native_stampede.get(1) {
            let budget = stampede_budget_us(r, &r.native_stampede);
            let _ = writeln!(
                out,
                "| 2 | native: stampede OAuth calls / successes / p99 ({} requests) | {} / {} / {} | 1 / all / <= IdP + warm p99 + 50 ms = {} | {} |",
                run.requests,
                run.oauth_calls,
                run.successes(),
                ms(run.latency.p99_us),
                ms(budget),
                verdict(
                    run.oauth_calls == 1
                        && run.successes() == run.requests
                        && run.latency.p99_us <= budget
                )
            );
        }
        for wake in r.native_wakeup.iter().filter(|wake| wake.concurrency > 1) {
            let _ = writeln!(
                out,
                "| 3 | native: waiters on the holder's Envoy, p99 after its first answer ({} workers) | {} (p50 {}) | < 0.5 ms | {} |",
                wake.concurrency,
                ms(wake.holder_envoy_others.p99_us),
                ms(wake.holder_envoy_others.p50_us),
                verdict(
                    wake.holder_envoy_others.p99_us < 500 && wake.holder_envoy_others.count > 0
                )
            );
        }
        for wake in &r.wakeup {
            let _ = writeln!(
                out,
                "| 3 | wake-up p99, waiters on other Envoys ({} worker{} each) | {} (p50 {}) | < 5 ms | {} |",
                wake.concurrency,
                if wake.concurrency == 1 { "" } else { "s" },
                ms(wake.other_envoys.p99_us),
                ms(wake.other_envoys.p50_us),
                verdict(wake.other_envoys.p99_us < 5_000 && wake.other_envoys.count > 0)
            );
        }
        if let Some(roll) = &r.rollover {
            let no_step = rollover_ok(roll);
            let _ = writeln!(
                out,
                "| 4 | expiry rollover: p99 near {} rollovers / steady | {} / {} ({} cache misses, {} requests >= IdP latency) | no visible step | {} |",
                roll.rollovers_seen,
                ms(roll.rollover.p99_us),
                ms(roll.steady.p99_us),
                roll.cache_misses,
                roll.slower_than_idp,
                verdict(no_step)
            );
        }
        if let Some(lease) = &r.lease {
            let ratio = lease.lease.p50_us as f64 / lease.redis_get.p50_us.max(1) as f64;
            let ratio99 = lease.lease.p99_us as f64 / lease.redis_get.p99_us.max(1) as f64;
            let _ = writeln!(
                out,
                "| 5 | companion lease (Redis hit) / raw Redis GET, p50 | {ratio:.2}x ({} / {} us; p99 {ratio99:.2}x) | <= 2x | {} |",
                lease.lease.p50_us,
                lease.redis_get.p50_us,
                verdict(ratio <= 2.0)
            );
        }
        if let Some(foot) = &r.footprint {
            let _ = writeln!(
                out,
                "| 6 | tokengate.wasm size | {:.0} KB ({} bytes) | <= {MAX_WASM_BYTES} bytes | {} |",
                foot.bytes as f64 / 1000.0,
                foot.bytes,
                verdict(foot.bytes <= MAX_WASM_BYTES)
            );
        }
        if let Some(hit) = &r.hit_path {
            let _ = writeln!(
                out,
                "| 6 | Envoy RSS, {} cached tenants / none | {} / {} (+{}) | (reported) | |",
                hit.settings.tenants,
                kib_mib(hit.rss_d_warm_kib),
                kib_mib(hit.rss_d_empty_kib),
                kib_mib(hit.rss_d_warm_kib.saturating_sub(hit.rss_d_empty_kib))
            );
        }
        for churn in &r.churn {
            // The wasm rows keep the wording they had before the native build was measured.
            let build = match churn.settings.build {
                FilterBuild::Wasm => "",
                FilterBuild::Native => "native: ",
            };
            for (name, memory) in churn::PROCESSES {
                let growth = churn.growth_after_bound(memory);
                let _ = writeln!(
                    out,
                    "| 7 | {build}{name} RSS growth after the cache bound, {} distinct tenants (bound {}) | {} | <= {:.0} % | {} |",
                    churn.settings.tenants,
                    churn.settings.max_tenants,
                    growth.map_or_else(|| "not reached".to_owned(), |g| format!("{g:+.1} %")),
                    churn::FLAT_PERCENT,
                    verdict(growth.is_some_and(|g| g <= churn::FLAT_PERCENT))
                );
            }
        }
        let _ = writeln!(out);
        if !r.failures.is_empty() {
            let _ = writeln!(
                out,
                "Some scenarios failed; see \"Scenarios that failed\" below.\n"
            );
        }
    }

    fn machine(&self, out: &mut String) {
        let r = self.0;
        let m = &r.machine;
        let _ = writeln!(out, "## Machine and run\n");
        machine_rows(out, m);
        let _ = writeln!(out, "| wrk | {} |", m.wrk);
        let _ = writeln!(out, "| Redis | {} |", m.redis);
        let _ = writeln!(out, "| command | `{}` |", r.command_line);
        let _ = writeln!(out, "| date | {} |", r.date);
        if let Some(before) = &r.load_before {
            let _ = writeln!(
                out,
                "| load average when the script checked (1, 5, 15 min) | {before} |"
            );
        }
        let _ = writeln!(
            out,
            "| load average at start (1, 5, 15 min) | {} |",
            r.load_start
        );
        let _ = writeln!(out, "| load average at end | {} |", r.load_end);
        match &r.pinning {
            Some((envoy, client)) => {
                let _ = writeln!(
                    out,
                    "| CPU pinning (hit path) | Envoy on CPU {envoy}; wrk and the echo upstream on CPU {client} |"
                );
            }
            None => {
                let _ = writeln!(out, "| CPU pinning | none |");
            }
        }
        for (what, path) in &r.binaries {
            let _ = writeln!(out, "| {what} | `{}` |", in_checkout(path));
        }
        let _ = writeln!(out);
    }

    fn hit_path(&self, out: &mut String, hit: &HitPath) {
        let s = &hit.settings;
        let _ = writeln!(out, "## 1. Hit path\n");
        self.hit_path_runs(out);
        let _ = writeln!(
            out,
            "Envoys identical but for the HTTP filter before the router \
             (`bench/envoy/hitpath.yaml.tmpl`), each `--concurrency 1`{}, all proxying to the same \
             upstream: a one-thread hyper server that answers `200 ok` and copies the \
             `Authorization` it received into a response header (`tokengate-bench echo`). \
             (a) no filter; (b) `credential_injector` with `envoy.http.injected_credentials.oauth2` \
             logging in as acme at the stand-in login (measured once its token was injected); \
             (c) tokengate with acme's token warm; (d) tokengate with {} tenants `bench-0..` \
             warm, requested round-robin. (e) to (gc), to split tokengate's cost: the minimal \
             proxy-wasm filter of `bench/wasm-floor` (same SDK, toolchain and build settings \
             as tokengate, without wasm-opt) making no host call (e), reading `x-tenant-id` \
             and setting `authorization` (f), making the 5 host calls of tokengate's hit \
             path when its goals were set (those two, the clock and the shared cache before \
             the request goes upstream, `:status` on its response) without any of its logic \
             (g), or the 5 it makes today (gc: the request's header map instead of one \
             header, a stat read instead of the shared cache). \
             Every run uses the same wrk Lua script \
             (`bench/wrk/tenants.lua`, requests built once in `init`) and the same request \
             (`GET /api/conversations` with `x-tenant-id`).\n",
            if s.envoy_cpus.is_some() {
                " and pinned with `taskset`"
            } else {
                ""
            },
            s.tenants
        );
        let _ = writeln!(
            out,
            "Runs are interleaved: in each of {} rounds (after a 2 s warm-up per configuration \
             at the start), first a saturating run ({} s, 1 wrk thread, {} connections) per \
             configuration, then a single-connection run ({} s) per configuration, which shows \
             the latency a request gets without queueing. The order rotates by one \
             configuration every round, so each takes every position, and a discarded 1 s \
             saturating run opens each round. Tables show medians over the rounds. \
             \"Envoy CPU/request\" is the Envoy process's CPU time (`/proc/<pid>/stat`) during a \
             saturating run divided by its requests; \"Envoy CPU busy\" is that time over the run's \
             length (100%: Envoy's worker had its CPU to itself and was the bottleneck). Example: `{}`.\n",
            s.rounds,
            s.throughput_duration.as_secs(),
            s.connections,
            s.latency_duration.as_secs(),
            hit.wrk_command
        );
        let _ = writeln!(
            out,
            "| | configuration | req/s ({} conns) | p50 | p99 | Envoy CPU/request | Envoy CPU busy | 1 conn: p50 | 1 conn: p99 | 1 conn: req/s | errors / requests |",
            s.connections
        );
        let _ = writeln!(
            out,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for c in &hit.configs {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} us | {:.0} us | {:.1} us | {:.0}% | {:.0} us | {:.0} us | {:.0} | {} / {} |",
                c.name,
                c.label.replace("N warm", &format!("{} warm", s.tenants)),
                c.rps(),
                c.loaded(|w| w.p50_us),
                c.loaded(|w| w.p99_us),
                c.cpu_us(),
                100.0 * c.cpu_share(),
                c.unloaded(|w| w.p50_us),
                c.unloaded(|w| w.p99_us),
                c.unloaded_rps(),
                c.errors(),
                c.requests()
            );
        }
        let [a, b, c, d] = ["a", "b", "c", "d"].map(|name| hit.config(name));
        let control = hit.config(CONTROL);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Ratios and differences are medians over the rounds of the per-round values (the \
             two runs of a pair are seconds apart, so they share the machine's state); the \
             noise control a2 is a second plain Envoy, so a2/a shows how far two identical \
             setups drift apart on this machine.\n"
        );
        let _ = writeln!(
            out,
            "| pair | throughput ratio | Envoy CPU/request ratio | 1 conn: p50 added | 1 conn: p99 added |\n|---|---:|---:|---:|---:|"
        );
        let ratio = |x: &ConfigRuns, y: &ConfigRuns| {
            format!(
                "| {}/{} | {:.3} | {:.2}x | {:+.0} us | {:+.0} us |",
                x.name,
                y.name,
                x.paired_rps_ratio(y),
                x.paired_cpu_ratio(y),
                x.paired_latency_diff(y, |w| w.p50_us),
                x.paired_latency_diff(y, |w| w.p99_us)
            )
        };
        for (x, y) in [(c, a), (c, b), (d, c), (b, a), (d, a), (control, a)] {
            let _ = writeln!(out, "{}", ratio(x, y));
        }
        for other in (2..).map_while(|number| hit.find(&format!("c{number}"))) {
            let _ = writeln!(out, "{}", ratio(other, c));
        }
        if let (Some(e), Some(f), Some(g)) = (hit.find("e"), hit.find("f"), hit.find("g")) {
            for (x, y) in [(e, a), (f, e), (g, f), (c, g), (f, b)] {
                let _ = writeln!(out, "{}", ratio(x, y));
            }
            if let Some(today) = hit.find("gc") {
                for (x, y) in [(today, f), (today, g), (c, today)] {
                    let _ = writeln!(out, "{}", ratio(x, y));
                }
            }
        }
        if let (Some(n), Some(h)) = (hit.find(NATIVE), hit.find("h")) {
            for (x, y) in [(h, a), (n, h), (h, b)] {
                let _ = writeln!(out, "{}", ratio(x, y));
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Every round (req/s of the saturating runs; p99 of the single-connection runs):\n"
        );
        let names: Vec<&str> = hit.configs.iter().map(|c| c.name.as_str()).collect();
        let _ = writeln!(
            out,
            "| round | {} | {} |\n|---|{}",
            names.join(" | "),
            names
                .iter()
                .map(|n| format!("{n} p99"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---:|".repeat(2 * names.len())
        );
        for round in 0..s.rounds {
            let rps: Vec<String> = hit
                .configs
                .iter()
                .map(|c| {
                    c.throughput
                        .get(round)
                        .map_or("-".into(), |w| format!("{:.0}", w.rps()))
                })
                .collect();
            let p99: Vec<String> = hit
                .configs
                .iter()
                .map(|c| {
                    c.latency
                        .get(round)
                        .map_or("-".into(), |w| format!("{} us", w.p99_us))
                })
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                round + 1,
                rps.join(" | "),
                p99.join(" | ")
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Checks: OAuth calls during the measured runs: {} (all hits). tokengate cache hits / \
             misses during the runs: (c) {} / {}, (d) {} / {}. credential_injector: tokens \
             fetched {}, requests injected {}. Warming (d)'s {} tenants through Envoy took \
             {:.1} s and {} OAuth calls.\n",
            hit.oauth_calls_during_runs,
            hit.cache_hits.0,
            hit.cache_misses.0,
            hit.cache_hits.1,
            hit.cache_misses.1,
            hit.injector_stats.0,
            hit.injector_stats.1,
            s.tenants,
            hit.warm_duration.as_secs_f64(),
            hit.warm_oauth_calls
        );
        if let Some(((n_hits, n_misses), (many_hits, many_misses))) = hit.native_hits_misses {
            let _ = writeln!(
                out,
                "The native build's cache hits / misses during the runs: (n) {n_hits} / {n_misses}, \
                 ({NATIVE_MANY}) {many_hits} / {many_misses}; its N tenants were warmed from the \
                 companion's cache.\n"
            );
        }
        let noisiest = hit
            .configs
            .iter()
            .map(|c| (c.name.as_str(), c.max_interference(), c.max_steal()))
            .fold(("-", 0.0f64, 0.0f64), |worst, c| {
                (
                    if c.1 > worst.1 { c.0 } else { worst.0 },
                    worst.1.max(c.1),
                    worst.2.max(c.2),
                )
            });
        let _ = writeln!(
            out,
            "Quiet check: in the saturating runs, other processes used at most {:.1}% of \
             Envoy's CPU (worst: ({})), and the hypervisor reported at most {:.1}% of it stolen \
             (`/proc/stat`); the client CPU (wrk and the echo upstream) was at most {:.0}% busy, \
             so the load generator was not the bottleneck while that stays well below 100%. \
             Spread of the saturating runs (min - max req/s over the rounds): {}.\n",
            100.0 * noisiest.1,
            noisiest.0,
            100.0 * noisiest.2,
            100.0
                * hit
                    .configs
                    .iter()
                    .map(ConfigRuns::max_client_busy)
                    .fold(0.0, f64::max),
            hit.configs
                .iter()
                .map(|c| {
                    let (lo, hi) = c.rps_range();
                    format!("({}) {lo:.0} - {hi:.0}", c.name)
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Taken in the last run, which need not be the one shown.
        let profiles = self
            .0
            .hit_path_runs
            .iter()
            .map(|run| &run.profiles)
            .find(|profiles| !profiles.is_empty())
            .unwrap_or(&hit.profiles);
        if !profiles.is_empty() {
            let _ = writeln!(
                out,
                "Where Envoy's CPU goes under saturating load (`perf record -e cpu-clock -p <envoy>` \
                 for 4 s in the last run, `perf report --sort dso`; V8's generated code for a \
                 wasm module shows as anonymous memory, `[JIT]` or `[unknown]`: Envoy passes \
                 V8 no `--perf-prof` flag, so there is no perf map of the module's functions):\n"
            );
            for profile in profiles {
                let split: Vec<String> = profile
                    .dsos
                    .iter()
                    .map(|(dso, percent)| format!("{dso} {percent:.1}%"))
                    .collect();
                let _ = writeln!(
                    out,
                    "- ({}) {} samples: {}",
                    profile.name,
                    profile.samples,
                    split.join(", ")
                );
            }
            let _ = writeln!(out);
            self.profile_symbols(out, profiles);
        }
    }

    /// Each independent run's ratios, and which run the detailed tables come from.
    fn hit_path_runs(&self, out: &mut String) {
        let runs = &self.0.hit_path_runs;
        if runs.len() < 2 {
            return;
        }
        let shown_index = crate::scenarios::hit_path::median_run(runs).map_or(1, |index| index + 1);
        let _ = writeln!(
            out,
            "The scenario ran {} times, independently (fresh stand-ins, Redis, companion and \
             Envoys each time). The summary's figures are the median of the runs' figures \
             (each the median of its rounds), with their range; the tables below are run \
             {shown_index}'s, the one whose c/a is the median. Each run's throughput ratio, \
             with Envoy CPU per request after the slash:\n",
            runs.len()
        );
        let pairs = [
            ("c", "a"),
            ("c", "b"),
            ("c", "f"),
            ("c", "g"),
            ("g", "f"),
            ("gc", "f"),
            ("c", "gc"),
            ("d", "c"),
            (CONTROL, "a"),
            (NATIVE, "a"),
            (NATIVE, "b"),
            (NATIVE, "h"),
            (NATIVE_MANY, NATIVE),
            ("h", "b"),
        ];
        // Other builds of tokengate.wasm (`--alt-wasm`), each against (c).
        let alternatives = (2..)
            .map(|number| format!("c{number}"))
            .take_while(|name| runs.iter().any(|run| run.find(name).is_some()));
        let pairs: Vec<(String, &str)> = pairs
            .into_iter()
            .map(|(x, y)| (x.to_owned(), y))
            .chain(alternatives.map(|name| (name, "c")))
            .collect();
        let headers: Vec<String> = (1..=runs.len()).map(|run| format!("run {run}")).collect();
        let _ = writeln!(out, "| pair | {} |", headers.join(" | "));
        let _ = writeln!(out, "|---|{}", "---:|".repeat(runs.len()));
        for (x, y) in &pairs {
            let cells: Vec<String> = runs
                .iter()
                .map(|run| match (run.find(x), run.find(y)) {
                    (Some(x), Some(y)) => format!(
                        "{:.3} / {:.2}x",
                        x.paired_rps_ratio(y),
                        x.paired_cpu_ratio(y)
                    ),
                    _ => "-".to_owned(),
                })
                .collect();
            if cells.iter().all(|cell| cell == "-") {
                continue;
            }
            let _ = writeln!(out, "| {x}/{y} | {} |", cells.join(" | "));
        }
        let _ = writeln!(out);
    }

    /// The profiles by symbol, side by side (`perf report --sort dso,sym`).
    fn profile_symbols(&self, out: &mut String, profiles: &[Profile]) {
        let profiles: Vec<_> = profiles
            .iter()
            .filter(|profile| !profile.symbols.is_empty())
            .collect();
        if profiles.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "The same samples by object and symbol (`perf report --sort dso,sym`), the largest \
             first, side by side:\n"
        );
        let names: Vec<String> = profiles.iter().map(|p| format!("({})", p.name)).collect();
        let _ = writeln!(out, "| # | {} |", names.join(" | "));
        let _ = writeln!(out, "|---:|{}", "---|".repeat(profiles.len()));
        let rows = profiles.iter().map(|p| p.symbols.len()).max().unwrap_or(0);
        for row in 0..rows {
            let cells: Vec<String> = profiles
                .iter()
                .map(|profile| {
                    profile
                        .symbols
                        .get(row)
                        .map_or_else(String::new, |(symbol, percent)| {
                            format!(
                                "{percent:.1}% `{}`",
                                symbol.replace('|', "/").replace('`', "'")
                            )
                        })
                })
                .collect();
            let _ = writeln!(out, "| {} | {} |", row + 1, cells.join(" | "));
        }
        let _ = writeln!(out);
    }

    /// Scenario 1's headline rows: each figure the median of the independent runs, with
    /// their spread, and Envoy CPU per request next to throughput.
    fn hit_path_summary(&self, out: &mut String) {
        let runs = &self.0.hit_path_runs;
        let spread_of = |figure: &dyn Fn(&HitPath) -> Option<f64>| {
            Spread::of(runs.iter().filter_map(figure).collect())
        };
        let throughput = |x: &'static str, y: &'static str| {
            spread_of(&move |run: &HitPath| Some(run.find(x)?.paired_rps_ratio(run.find(y)?)))
        };
        let cpu = |x: &'static str, y: &'static str| {
            spread_of(&move |run: &HitPath| Some(run.find(x)?.paired_cpu_ratio(run.find(y)?)))
        };
        let added_p99 = |x: &'static str| {
            spread_of(&move |run: &HitPath| {
                Some(
                    run.find(x)?
                        .paired_latency_diff(run.find("a")?, |w| w.p99_us),
                )
            })
        };
        let tenants = runs.first().map_or(0, |run| run.settings.tenants);
        let noise = throughput(CONTROL, "a").map_or_else(String::new, |noise| {
            format!("; noise control a2/a {}", noise.show(3, ""))
        });
        let row = |name, what: String, pair, throughput_goal, cpu_goal| HeadlineRow {
            name,
            what,
            pair,
            throughput_goal,
            cpu_goal,
        };
        let rows = [
            row(
                "c/b",
                "wasm tokengate / credential_injector".into(),
                ("c", "b"),
                None,
                None,
            ),
            row(
                "c/a",
                "wasm tokengate / plain Envoy".into(),
                ("c", "a"),
                None,
                Some(1.35),
            ),
            row(
                "c/f",
                "wasm tokengate / minimal filter (get 1 header, set 1)".into(),
                ("c", "f"),
                Some(0.93),
                None,
            ),
            row(
                "c/g",
                "wasm tokengate / minimal filter making its 5 host calls".into(),
                ("c", "g"),
                Some(1.00),
                None,
            ),
            row(
                "d/c",
                format!("wasm: {tenants} warm tenants / one tenant"),
                ("d", "c"),
                Some(0.97),
                None,
            ),
            row(
                "n/a",
                "native tokengate / plain Envoy".into(),
                (NATIVE, "a"),
                Some(0.95),
                None,
            ),
            row(
                "n/b",
                "native tokengate / credential_injector".into(),
                (NATIVE, "b"),
                Some(0.97),
                None,
            ),
            row(
                "n/h",
                "native tokengate / minimal dynamic module".into(),
                (NATIVE, "h"),
                Some(0.98),
                Some(1.02),
            ),
            row(
                "n10k/n",
                format!("native: {tenants} warm tenants / one tenant"),
                (NATIVE_MANY, NATIVE),
                Some(0.97),
                None,
            ),
            row(
                "h/b",
                "minimal dynamic module / credential_injector".into(),
                ("h", "b"),
                None,
                None,
            ),
            row(
                "h/a",
                "minimal dynamic module / plain Envoy".into(),
                ("h", "a"),
                None,
                None,
            ),
        ];
        for HeadlineRow {
            name,
            what,
            pair: (x, y),
            throughput_goal,
            cpu_goal,
        } in rows
        {
            let Some(ratio) = throughput(x, y) else {
                continue;
            };
            let cpu_ratio = cpu(x, y);
            let mut goals = Vec::new();
            let mut met = true;
            if let Some(goal) = throughput_goal {
                goals.push(format!(">= {goal:.2}"));
                met &= ratio.median >= goal;
            }
            if let (Some(goal), Some(cpu_ratio)) = (cpu_goal, &cpu_ratio) {
                goals.push(format!("CPU <= {goal:.2}x"));
                met &= cpu_ratio.median <= goal;
            }
            let _ = writeln!(
                out,
                "| 1 | hit path throughput, {what} ({name}) | {}; Envoy CPU per request {}{} | {} | {} |",
                ratio.show(3, ""),
                cpu_ratio.map_or_else(|| "-".to_owned(), |cpu| cpu.show(2, "x")),
                if name == "c/b" { noise.as_str() } else { "" },
                if goals.is_empty() {
                    "(reported)".to_owned()
                } else {
                    goals.join(", ")
                },
                if goals.is_empty() { "" } else { verdict(met) },
            );
        }
        for (x, label, goal) in [("c", "", 100.0), (NATIVE, "native: ", 30.0)] {
            if let Some(added) = added_p99(x) {
                let _ = writeln!(
                    out,
                    "| 1 | {label}p99 added over plain Envoy, one connection ({x} - a) | {} | < {goal:.0} us | {} |",
                    added.show(0, " us"),
                    verdict(added.median < goal)
                );
            }
        }
    }

    fn stampede(&self, out: &mut String) {
        let r = self.0;
        if r.stampede.is_empty() && r.native_stampede.is_empty() {
            return;
        }
        let (envoys, workers, companions) = r.stampede_shape;
        let _ = writeln!(out, "## 2. Stampede\n");
        let _ = writeln!(
            out,
            "{envoys} Envoys x {workers} workers and {companions} companions on one Redis \
             (`envoy/local.yaml.tmpl`, default filter configuration), stand-in login answering \
             after {} ms. The client opens every connection first (spread evenly over the \
             Envoys), then releases all requests at once for one cold tenant; latency is from \
             a request's send to its complete answer. The first burst (globex) runs on freshly \
             started processes and also opens Envoy's upstream connections; the second (acme) \
             is the measured one; the third repeats it for acme once its token is cached \
             (all cache hits, no fetch): what proxying such a burst costs on this machine \
             by itself. The same three bursts run on the wasm build, then on the native \
             build (when it is built).\n",
            r.stampede_idp.as_millis()
        );
        let _ = writeln!(
            out,
            "| build | burst | requests | OAuth calls | Tenant Service calls | statuses | tokens seen | min | p50 | p90 | p99 | max | last answer | fetches per Envoy | cluster-cache hits per Envoy |"
        );
        let _ = writeln!(
            out,
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
        );
        let runs = (r.stampede.iter().enumerate().map(|run| ("wasm", run))).chain(
            r.native_stampede
                .iter()
                .enumerate()
                .map(|run| ("native", run)),
        );
        for (build, (i, run)) in runs {
            let statuses: Vec<String> = run
                .statuses
                .iter()
                .map(|(status, n)| {
                    if *status == 0 {
                        format!("no answer: {n}")
                    } else {
                        format!("{status}: {n}")
                    }
                })
                .collect();
            let _ = writeln!(
                out,
                "| {build} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:?} | {:?} |",
                match i {
                    0 => "warm-up",
                    1 => "measured",
                    _ => "control, warm",
                },
                run.tenant,
                run.requests,
                run.oauth_calls,
                run.tenant_service_calls,
                statuses.join(", "),
                run.distinct_tokens,
                ms(run.latency.min_us),
                ms(run.latency.p50_us),
                ms(run.latency.p90_us),
                ms(run.latency.p99_us),
                ms(run.latency.max_us),
                ms(run.last_done_us),
                run.fetches_per_envoy,
                run.cluster_hits_per_envoy
            );
        }
        let _ = writeln!(out);
    }

    fn wakeup(&self, out: &mut String) {
        let r = self.0;
        let Some(first) = r.wakeup.first().or(r.native_wakeup.first()) else {
            return;
        };
        let _ = writeln!(out, "## 3. Wake-up latency\n");
        let _ = writeln!(
            out,
            "Method: each trial sends {} requests to each of the {} Envoys at once for a cold \
             tenant (stand-in login latency {} ms, companions and Redis as in scenario 2). The \
             holder is the one Envoy whose `fetch_started` went up; its first answer marks the \
             moment it had the token (the filter sends the commit, then resumes its own paused \
             requests). A request answered by another Envoy was woken through the companion \
             (commit -> Redis `PUBLISH` -> the waiting lease re-reads Redis and answers `hit`) or, \
             on an Envoy's second worker, by the worker that leased, through the shared queue it \
             registered (a 1 ms poll of shared data is the fallback); its wake-up latency is \
             its answer time minus the holder's first answer. Both include the same upstream \
             and client legs, which cancel out; what remains is the commit, Redis, the pub/sub \
             wake-up, the lease answer and the resume. Trials where more than one Envoy fetched \
             or the login was called more than once are left out (counted below). Run once with \
             two workers per Envoy (as deployed) and once with one, which leaves only the \
             cross-Envoy path. The native build runs the same trials; there the holder's \
             other worker is woken by an event on its paused request's scheduler.\n",
            first.requests_per_envoy,
            first.envoys,
            r.stampede_idp.as_millis()
        );
        let _ = writeln!(
            out,
            "| build | workers per Envoy | valid trials | failed requests | waiters on other Envoys: p50 | p90 | p99 | max | trials with a waiter > 10 ms | holder Envoy's other requests: p50 | p99 | max |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let all = (r.wakeup.iter().map(|w| ("wasm", w)))
            .chain(r.native_wakeup.iter().map(|w| ("native", w)));
        for (build, w) in all {
            let _ = writeln!(
                out,
                "| {build} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                w.concurrency,
                w.valid_trials,
                w.trials,
                w.failures,
                ms(w.other_envoys.p50_us),
                ms(w.other_envoys.p90_us),
                ms(w.other_envoys.p99_us),
                ms(w.other_envoys.max_us),
                w.slow_trials,
                ms(w.holder_envoy_others.p50_us),
                ms(w.holder_envoy_others.p99_us),
                ms(w.holder_envoy_others.max_us)
            );
        }
        let _ = writeln!(out);
    }

    fn rollover(&self, out: &mut String) {
        let Some(roll) = &self.0.rollover else {
            return;
        };
        let s = &roll.settings;
        let _ = writeln!(out, "## 4. Expiry rollover\n");
        let _ = writeln!(
            out,
            "One Envoy (2 workers), one companion; the stand-in login issues tokens living \
             {} s and answers after {} ms; filter configuration `{}` (so a refresh starts 2 s \
             before expiry and a token is served until 1 s before it). {} connections each send \
             a request every {} ms for acme for {:.1} s. A rollover is the first request that \
             carries a new token; requests sent within {} ms of one count as \"near a rollover\". \
             A request that had to wait for a fetch would take at least the IdP latency.\n",
            s.lifetime_secs,
            s.idp_latency.as_millis(),
            roll.filter_config,
            s.connections,
            s.interval.as_millis(),
            roll.duration.as_secs_f64(),
            s.window.as_millis()
        );
        let _ = writeln!(out, "{LAT_HEADER}");
        let _ = writeln!(out, "{}", lat_row("near a rollover", &roll.rollover));
        let _ = writeln!(out, "{}", lat_row("steady state", &roll.steady));
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Rollovers seen: {}; OAuth calls: {}; background refreshes started: {}; cache \
             misses (requests that waited for a fetch): {}; requests at or above the IdP \
             latency: {}; failed requests: {}. Verdict rule: no cache miss, no request at or \
             above the IdP latency, and p99 near rollovers within 1.5x steady p99 + 0.5 ms.\n",
            roll.rollovers_seen,
            roll.oauth_calls,
            roll.refreshes,
            roll.cache_misses,
            roll.slower_than_idp,
            roll.failures
        );
    }

    fn churn(&self, out: &mut String) {
        let runs = &self.0.churn;
        let Some(first) = runs.first() else {
            return;
        };
        let _ = writeln!(out, "## 7. Memory under tenant churn\n");
        let _ = writeln!(
            out,
            "{} distinct generated tenants (`bench-0` ...), each asked for once through one Envoy \
             (2 workers) with `cache.maxTenants` {}, one companion and Redis, over {} keep-alive \
             connections: every request is a cold fetch (lease, Tenant Service, login, commit) \
             and no tenant comes back, the worst case for anything kept per tenant. The wasm \
             build runs first, then the native build (when it is built), each with its own \
             fleet. Resident memory (`VmRSS`) was read every {} tenants; growth after the bound \
             is from the first reading at twice `cache.maxTenants` tenants to the last; the cost \
             of a cached tenant is the growth from the first reading to that one divided by \
             `cache.maxTenants` (anything else that grew on the way is counted in). Redis keeps \
             every token until its TTL (the cluster cache, by design) and is not shown.\n",
            first.settings.tenants,
            first.settings.max_tenants,
            first.settings.connections,
            first.settings.tenants / first.settings.samples.max(1),
        );
        for run in runs {
            let _ = writeln!(
                out,
                "- {} build: {} tenants in {:.1} min ({:.0} per second); {} requests failed; \
                 the login counted {} OAuth calls.",
                churn::build_name(run.settings.build),
                run.settings.tenants,
                run.elapsed.as_secs_f64() / 60.0,
                run.rate(),
                run.errors,
                run.logins,
            );
        }
        let _ = writeln!(
            out,
            "\n| build | process | start | at the bound | end | growth after the bound | per cached tenant |\n|---|---|---:|---:|---:|---:|---:|"
        );
        for run in runs {
            for (name, memory) in churn::PROCESSES {
                let at = |sample: Option<churn::Sample>| {
                    sample.map_or_else(|| "-".to_owned(), |s| kib_mib(memory(&s)))
                };
                let _ = writeln!(
                    out,
                    "| {} | {name} | {} | {} | {} | {} | {} |",
                    churn::build_name(run.settings.build),
                    at(run.samples.first().copied()),
                    at(run.at_bound()),
                    at(run.last()),
                    run.growth_after_bound(memory)
                        .map_or_else(|| "not reached".to_owned(), |g| format!("{g:+.1} %")),
                    run.bytes_per_cached_tenant(memory)
                        .map_or_else(|| "-".to_owned(), |b| format!("{b:.0} bytes")),
                );
            }
        }
        let _ = writeln!(out);
        if let Some(chart) = &self.0.churn_chart {
            let _ = writeln!(
                out,
                "![resident memory against tenants seen, per build and process]({chart})\n"
            );
        }
        for run in runs {
            let _ = writeln!(
                out,
                "{} build:\n\n| tenants seen | Envoy | companion |\n|---:|---:|---:|",
                churn::build_name(run.settings.build)
            );
            let shown = run.samples.len().div_ceil(10).max(1);
            for (index, sample) in run.samples.iter().enumerate() {
                if index % shown == 0 || index + 1 == run.samples.len() {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} |",
                        sample.tenants_seen,
                        kib_mib(sample.envoy_kib),
                        kib_mib(sample.companion_kib)
                    );
                }
            }
            let _ = writeln!(out);
        }
    }

    fn lease(&self, out: &mut String) {
        let Some(lease) = &self.0.lease else {
            return;
        };
        let _ = writeln!(out, "## 5. Companion lease on a Redis hit\n");
        let _ = writeln!(
            out,
            "One client (tokio; hyper HTTP/1.1 keep-alive connections and a raw RESP \
             connection, `TCP_NODELAY`), strictly sequential, alternating the four calls below \
             {} times each after {} warm-up rounds. The lease is `POST /v1/lease \
             {{\"provider\":\"genesys\",\"tenantId\":\"acme\"}}` answered `hit` from Redis; the \
             Redis call is `GET {}` on the same Redis. The companion is the release build, as \
             the harness starts it (log level info; a plain `hit` logs at debug); a second \
             companion on the same Redis logs at warn; `/healthz` answers without Redis. Both \
             companions answer the repeated lease from their in-process copy of the token: \
             only the first lease, and then one a second when the copy has aged out, goes to \
             Redis.\n",
            lease.iterations,
            lease.iterations / 10,
            lease.key
        );
        let us = |v: u64| format!("{v} us");
        let _ = writeln!(
            out,
            "| call | p50 | p90 | p99 | max | mean | p50 / GET p50 |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for (name, l) in [
            ("lease, hit (log level info)", &lease.lease),
            ("lease, hit (log level warn)", &lease.lease_quiet),
            ("companion GET /healthz", &lease.healthz),
            ("Redis GET", &lease.redis_get),
        ] {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {:.1} us | {:.2}x |",
                us(l.p50_us),
                us(l.p90_us),
                us(l.p99_us),
                us(l.max_us),
                l.mean_us,
                l.p50_us as f64 / lease.redis_get.p50_us.max(1) as f64
            );
        }
        let _ = writeln!(out);
    }

    fn footprint(&self, out: &mut String) {
        let r = self.0;
        if r.footprint.is_none() && r.hit_path.is_none() {
            return;
        }
        let _ = writeln!(out, "## 6. Footprint\n");
        if let Some(foot) = &r.footprint {
            let _ = writeln!(
                out,
                "`{}`: {} bytes ({:.0} KB). Its sections:\n",
                in_checkout(&foot.path),
                foot.bytes,
                foot.bytes as f64 / 1000.0
            );
            let _ = writeln!(out, "| section | bytes | share |\n|---|---:|---:|");
            for section in &foot.sections {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.1}% |",
                    section.name,
                    section.bytes,
                    100.0 * section.bytes as f64 / foot.bytes as f64
                );
            }
            let _ = writeln!(out);
            if !foot.code_by_crate.is_empty() {
                let code: usize = foot.code_by_crate.iter().map(|(_, size, _)| size).sum();
                let _ = writeln!(
                    out,
                    "Code by crate (function bodies attributed through the `name` section):\n"
                );
                let _ = writeln!(
                    out,
                    "| crate | code bytes | share of code | functions |\n|---|---:|---:|---:|"
                );
                for (krate, size, count) in foot.code_by_crate.iter().take(14) {
                    let _ = writeln!(
                        out,
                        "| {krate} | {size} | {:.1}% | {count} |",
                        100.0 * *size as f64 / code.max(1) as f64
                    );
                }
                let _ = writeln!(out, "\nLargest functions:\n");
                let _ = writeln!(out, "| bytes | function |\n|---:|---|");
                for (_, name, size) in &foot.largest_functions {
                    let name: String = name.chars().take(140).collect();
                    let _ = writeln!(out, "| {size} | `{}` |", name.replace('|', "\\|"));
                }
                let _ = writeln!(out);
            }
            let _ = writeln!(
                out,
                "Built by `scripts/build-wasm`: the workspace's `wasm` profile (`opt-level = \"z\"`, \
                 LTO, one codegen unit, symbols stripped), `panic=immediate-abort` and no panic \
                 locations where std is compiled from source (Debian's `rustc-web`), then \
                 `wasm-opt -Oz --converge` when binaryen is installed (here: {}).\n",
                foot.wasm_opt_note
            );
        }
        if let Some(hit) = &r.hit_path {
            let _ = writeln!(
                out,
                "Envoy memory (`VmRSS`, one worker, from scenario 1's Envoys):\n"
            );
            let _ = writeln!(out, "| Envoy | RSS |\n|---|---:|");
            let _ = writeln!(
                out,
                "| (a) plain, just started | {} |",
                kib_mib(hit.rss_a_start_kib)
            );
            let _ = writeln!(
                out,
                "| (d) tokengate, just started, no tenant cached | {} |",
                kib_mib(hit.rss_d_empty_kib)
            );
            let _ = writeln!(
                out,
                "| (d) tokengate, {} tenants cached (after warming) | {} |",
                hit.settings.tenants,
                kib_mib(hit.rss_d_warm_kib)
            );
            for c in &hit.configs {
                let _ = writeln!(
                    out,
                    "| ({}) after the runs | {} |",
                    c.name,
                    kib_mib(c.rss_end_kib)
                );
            }
            let per_tenant = (hit.rss_d_warm_kib.saturating_sub(hit.rss_d_empty_kib)) as f64
                * 1024.0
                / hit.settings.tenants.max(1) as f64;
            let _ = writeln!(
                out,
                "\n{} cached tenants cost {} over the empty filter: about {:.0} bytes per tenant \
                 (token entry and in-flight marker in Envoy's shared data, plus the worker's \
                 wasm heap). After identical load, (d) holds {} more than (c) (1 tenant).\n",
                hit.settings.tenants,
                kib_mib(hit.rss_d_warm_kib.saturating_sub(hit.rss_d_empty_kib)),
                per_tenant,
                kib_mib(
                    hit.config("d")
                        .rss_end_kib
                        .saturating_sub(hit.config("c").rss_end_kib)
                )
            );
        }
    }
}

/// The rollover verdict: no request waited for a fetch and the tail did not move.
pub fn rollover_ok(roll: &crate::scenarios::rollover::Rollover) -> bool {
    roll.cache_misses == 0
        && roll.slower_than_idp == 0
        && roll.rollover.count > 0
        && (roll.rollover.p99_us as f64) <= roll.steady.p99_us as f64 * 1.5 + 500.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::stampede::StampedeRun;

    fn burst(tenant: &str, p99_us: u64) -> StampedeRun {
        StampedeRun {
            tenant: tenant.to_owned(),
            requests: 1,
            oauth_calls: 1,
            tenant_service_calls: 1,
            statuses: [(200, 1)].into(),
            distinct_tokens: 1,
            latency: Latencies {
                p99_us,
                ..Latencies::default()
            },
            success_latency: Latencies::default(),
            last_done_us: 0,
            fetches_per_envoy: Vec::new(),
            cluster_hits_per_envoy: Vec::new(),
        }
    }

    #[test]
    fn the_stampede_goal_is_the_idp_latency_plus_the_same_bursts_warm_p99_plus_50_ms() {
        let results = Results {
            stampede_idp: std::time::Duration::from_millis(200),
            ..Results::default()
        };
        let runs = [
            burst("globex", 900_000),
            burst("acme", 300_000),
            burst("acme", 37_000),
        ];
        assert_eq!(stampede_budget_us(&results, &runs), 287_000);
        assert_eq!(
            stampede_budget_us(&results, &runs[..2]),
            250_000,
            "without a warm burst, the IdP and 50 ms"
        );
    }

    #[test]
    fn a_figure_over_runs_is_their_median_with_their_range() {
        let spread = Spread::of(vec![0.91, 0.84, 0.95]);
        assert_eq!(
            spread.map(|spread| spread.show(2, "x")).as_deref(),
            Some("0.91x [0.84 - 0.95]")
        );
        assert!(Spread::of(Vec::new()).is_none());
    }
}
