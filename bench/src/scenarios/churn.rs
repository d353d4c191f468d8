//! Scenario 7: memory under tenant churn. Streams `tenants` distinct tenants through
//! one Envoy (2 workers) with its companion and Redis, each asked for once, so every
//! request is a cold fetch (lease, Tenant Service, login, commit) and no tenant comes
//! back: the worst case for anything kept per tenant. The resident memory (`VmRSS`) of
//! Envoy and the companion is read every `tenants / samples` tenants.
//!
//! Goal: once the gateway cache is full (`cache.maxTenants` slots per table; taken as
//! twice that many tenants seen, when the slots have been reused), neither process
//! grows by more than [`FLAT_PERCENT`] % however many more tenants come. Redis keeps
//! every token until its TTL by design (the cluster cache), so it is not part of it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokengate_tests::harness::{Envoy, FilterBuild};
use tokengate_tests::standins::{Fixture, generated_tenant_id};

use crate::client::Conn;
use crate::envoy::rss_kib;
use crate::fleet::{EchoProcess, Fleet, FleetSpec};

/// Growth allowed after the bound is reached, in percent.
pub const FLAT_PERCENT: f64 = 10.0;

/// Which memory of a [`Sample`].
pub type Memory = fn(&Sample) -> u64;

/// The processes measured, by name, with their memory in a [`Sample`].
pub const PROCESSES: [(&str, Memory); 2] = [
    ("Envoy", |s| s.envoy_kib),
    ("companion", |s| s.companion_kib),
];

/// How the report and the chart name `build`.
pub fn build_name(build: FilterBuild) -> &'static str {
    match build {
        FilterBuild::Wasm => "wasm",
        FilterBuild::Native => "native",
    }
}

/// How to run it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Distinct tenants streamed.
    pub tenants: usize,
    /// The filter's `cache.maxTenants`.
    pub max_tenants: u32,
    /// Concurrent connections.
    pub connections: usize,
    /// Memory readings over the run.
    pub samples: usize,
    /// The build of the filter Envoy loads.
    pub build: FilterBuild,
}

/// One memory reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Tenants asked for so far.
    pub tenants_seen: usize,
    /// Envoy's resident memory.
    pub envoy_kib: u64,
    /// The companion's resident memory.
    pub companion_kib: u64,
}

/// What the run found.
#[derive(Debug, Clone)]
pub struct Churn {
    /// How it ran.
    pub settings: Settings,
    /// Readings, the first before any tenant.
    pub samples: Vec<Sample>,
    /// How long the stream took.
    pub elapsed: Duration,
    /// Requests that did not come back 200 with a token.
    pub errors: u64,
    /// OAuth calls the login stand-in counted.
    pub logins: u64,
}

impl Churn {
    /// The reading taken when the bound had been reached (the first at twice
    /// `maxTenants` tenants or more), if the run went that far.
    pub fn at_bound(&self) -> Option<Sample> {
        let bound = 2 * self.settings.max_tenants as usize;
        self.samples
            .iter()
            .copied()
            .find(|s| s.tenants_seen >= bound)
    }

    /// The last reading.
    pub fn last(&self) -> Option<Sample> {
        self.samples.last().copied()
    }

    /// Growth from the bound to the end, in percent, of `memory`.
    pub fn growth_after_bound(&self, memory: impl Fn(&Sample) -> u64) -> Option<f64> {
        let (at_bound, last) = (self.at_bound()?, self.last()?);
        let start = memory(&at_bound) as f64;
        (start > 0.0).then(|| 100.0 * (memory(&last) as f64 - start) / start)
    }

    /// Tenants per second streamed.
    pub fn rate(&self) -> f64 {
        self.settings.tenants as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Growth of `memory` from the first reading to the bound, in bytes per
    /// `cache.maxTenants` entry: what a cached tenant costs at most (whatever else grew
    /// on the way, connection buffers or allocator pools, is counted in).
    pub fn bytes_per_cached_tenant(&self, memory: impl Fn(&Sample) -> u64) -> Option<f64> {
        let (first, at_bound) = (self.samples.first()?, self.at_bound()?);
        let grown = memory(&at_bound).saturating_sub(memory(first));
        Some(grown as f64 * 1024.0 / f64::from(self.settings.max_tenants.max(1)))
    }
}

/// The runs' readings as one SVG line chart: MiB against tenants seen, a line per build
/// and process (the process by colour, the build by dash), the first run's bound marked.
pub fn svg(runs: &[Churn]) -> String {
    let (width, height, margin, legend) = (860.0, 360.0, 56.0, 190.0);
    let right = width - legend;
    let max_x = runs
        .iter()
        .map(|run| run.settings.tenants)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let max_kib = runs
        .iter()
        .flat_map(|run| &run.samples)
        .map(|s| s.envoy_kib.max(s.companion_kib))
        .max()
        .unwrap_or(1) as f64;
    let max_y = (max_kib / 1024.0 * 1.1).max(1.0);
    let x = |tenants: f64| margin + (right - margin) * tenants / max_x;
    let y = |mib: f64| height - margin - (height - 2.0 * margin) * mib / max_y;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        svg,
        r#"<rect width="{width}" height="{height}" fill="white"/><line x1="{m}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{m}" y1="{t}" x2="{m}" y2="{b}" stroke="black"/>"#,
        m = margin,
        b = height - margin,
        r = right,
        t = margin
    );
    for step in 0..=4 {
        let tenants = max_x * f64::from(step) / 4.0;
        let mib = max_y * f64::from(step) / 4.0;
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{:.0}k</text><text x="{}" y="{}" text-anchor="end">{:.0}</text>"#,
            x(tenants),
            height - margin + 18.0,
            tenants / 1000.0,
            margin - 6.0,
            y(mib) + 4.0,
            mib
        );
    }
    if let Some(first) = runs.first() {
        let bound = f64::from(first.settings.max_tenants);
        let _ = write!(
            svg,
            r#"<line x1="{bx}" y1="{t}" x2="{bx}" y2="{b}" stroke="gray" stroke-dasharray="4"/><text x="{tx}" y="{ty}" fill="gray">cache.maxTenants = {bound}</text>"#,
            bx = x(bound),
            t = margin,
            b = height - margin,
            tx = x(bound) + 4.0,
            ty = margin + 12.0,
        );
    }
    let colours = ["#1f77b4", "#d62728"];
    let lines = runs.iter().flat_map(|run| {
        PROCESSES
            .into_iter()
            .zip(colours)
            .map(move |(process, colour)| (run, process, colour))
    });
    for (index, (run, (name, memory), colour)) in lines.enumerate() {
        let dash = match run.settings.build {
            FilterBuild::Wasm => "",
            FilterBuild::Native => r#" stroke-dasharray="6 3""#,
        };
        let points: Vec<String> = run
            .samples
            .iter()
            .map(|s| {
                format!(
                    "{:.1},{:.1}",
                    x(s.tenants_seen as f64),
                    y(memory(s) as f64 / 1024.0)
                )
            })
            .collect();
        let key_y = margin + 14.0 + 18.0 * index as f64;
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{key_y}" fill="{colour}">{name}, {}</text>"#,
            points.join(" "),
            right + 16.0,
            key_y - 4.0,
            right + 40.0,
            key_y - 4.0,
            right + 46.0,
            build_name(run.settings.build),
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">distinct tenants seen</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">resident memory, MiB</text></svg>"#,
        (margin + right) / 2.0,
        height - 12.0,
        height / 2.0,
        height / 2.0
    );
    svg.push('\n');
    svg
}

/// Runs the scenario.
pub async fn run(settings: Settings) -> Result<Churn, String> {
    let echo = EchoProcess::start(None)?;
    let filter_config = Envoy::filter_config_with(serde_json::json!({
        "cache": { "maxTenants": settings.max_tenants }
    }));
    let spec = FleetSpec {
        envoys: 1,
        concurrency: 2,
        companions: 1,
        filter_config,
        echo: echo.addr,
        build: settings.build,
    };
    let build = build_name(settings.build);
    eprintln!(
        "bench: churn, {build} build: generating {} tenants",
        settings.tenants
    );
    let fixture = Fixture::default_fixture()
        .with_generated_tenants(settings.tenants)
        .map_err(|e| e.to_string())?;
    let mut fleet = Fleet::start(&spec, fixture).await?;
    let envoy_pid = fleet.envoys[0].process.id().ok_or("Envoy has no pid")?;
    let companion_pid = fleet.companions[0]
        .process
        .id()
        .ok_or("the companion has no pid")?;
    let addr = fleet.envoy_addr(0);
    let read = |tenants_seen| Sample {
        tenants_seen,
        envoy_kib: rss_kib(envoy_pid).unwrap_or(0),
        companion_kib: rss_kib(companion_pid).unwrap_or(0),
    };

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..settings.connections.max(1) {
        let (next, done, errors) = (Arc::clone(&next), Arc::clone(&done), Arc::clone(&errors));
        let total = settings.tenants;
        loops.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return Ok::<(), String>(());
                }
                let tenant = generated_tenant_id(n);
                let ok = match conn.get("/api", &tenant).await {
                    Ok(answer) => answer.status == 200 && answer.seen_authorization.is_some(),
                    Err(_) => {
                        // The connection broke: count it and open another.
                        conn = Conn::connect(addr).await?;
                        false
                    }
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let every = (settings.tenants / settings.samples.max(1)).max(1);
    let mut samples = vec![read(0)];
    let mut next_sample = every;
    while samples
        .last()
        .is_some_and(|s| s.tenants_seen < settings.tenants)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = done.load(Ordering::Relaxed);
        if seen >= next_sample || seen >= settings.tenants {
            samples.push(read(seen));
            next_sample = seen + every;
            if samples.len() % 10 == 0 {
                eprintln!(
                    "bench: churn, {build} build: {seen} tenants, Envoy {} MiB, companion {} MiB",
                    samples.last().map_or(0, |s| s.envoy_kib / 1024),
                    samples.last().map_or(0, |s| s.companion_kib / 1024)
                );
            }
        }
        if loops.iter().all(|task| task.is_finished())
            && done.load(Ordering::Relaxed) < settings.tenants
        {
            return Err("every connection failed".into());
        }
    }
    let elapsed = started.elapsed();
    for task in loops {
        task.await.map_err(|e| e.to_string())??;
    }
    let logins = fleet
        .standins
        .calls(tokengate_tests::standins::Endpoint::Login);
    fleet.envoys.clear();
    Ok(Churn {
        settings,
        samples,
        elapsed,
        errors: errors.load(Ordering::Relaxed),
        logins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn churn(samples: &[(usize, u64)]) -> Churn {
        Churn {
            settings: Settings {
                tenants: 1_000,
                max_tenants: 100,
                connections: 1,
                samples: samples.len(),
                build: FilterBuild::Wasm,
            },
            samples: samples
                .iter()
                .map(|&(tenants_seen, kib)| Sample {
                    tenants_seen,
                    envoy_kib: kib,
                    companion_kib: kib / 2,
                })
                .collect(),
            elapsed: Duration::from_secs(10),
            errors: 0,
            logins: 1_000,
        }
    }

    #[test]
    fn growth_is_measured_from_twice_the_bound_to_the_end() {
        let run = churn(&[(0, 100), (100, 150), (200, 200), (600, 205), (1_000, 210)]);
        assert_eq!(run.at_bound().map(|s| s.tenants_seen), Some(200));
        assert_eq!(run.growth_after_bound(|s| s.envoy_kib), Some(5.0));
        assert_eq!(run.rate(), 100.0);
        let short = churn(&[(0, 100), (150, 150)]);
        assert_eq!(short.growth_after_bound(|s| s.envoy_kib), None);
    }

    #[test]
    fn a_cached_tenant_costs_the_growth_to_the_bound_over_max_tenants() {
        let run = churn(&[(0, 100), (100, 150), (200, 200), (1_000, 900)]);
        // 100 KiB over 100 entries.
        assert_eq!(run.bytes_per_cached_tenant(|s| s.envoy_kib), Some(1_024.0));
        let shrunk = churn(&[(0, 300), (200, 200)]);
        assert_eq!(shrunk.bytes_per_cached_tenant(|s| s.envoy_kib), Some(0.0));
        let short = churn(&[(0, 100), (150, 150)]);
        assert_eq!(short.bytes_per_cached_tenant(|s| s.envoy_kib), None);
    }

    #[test]
    fn the_chart_has_a_line_per_process_and_the_bound() {
        let svg = svg(&[churn(&[(0, 100_000), (500, 120_000), (1_000, 121_000)])]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("cache.maxTenants = 100"));
        assert!(svg.contains(">Envoy, wasm<") && svg.contains(">companion, wasm<"));
        assert!(!svg.contains(r#"stroke-dasharray="6 3""#));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn the_chart_has_a_line_per_build_and_process_the_native_ones_dashed() {
        let wasm = churn(&[(0, 100_000), (500, 120_000), (1_000, 121_000)]);
        let mut native = churn(&[(0, 40_000), (500, 60_000), (1_000, 61_000)]);
        native.settings.build = FilterBuild::Native;
        let svg = svg(&[wasm, native]);
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(svg.matches("cache.maxTenants").count(), 1);
        assert!(svg.contains(">Envoy, native<") && svg.contains(">companion, native<"));
        // Each native line and its key.
        assert_eq!(svg.matches(r#"stroke-dasharray="6 3""#).count(), 4);
    }
}
