//! What the benchmark ran on: CPUs, memory, load, versions, commit, date.

use std::process::Command;

/// The machine and software a run used.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    /// `nproc`.
    pub cpus: usize,
    /// `model name` of `/proc/cpuinfo`.
    pub cpu_model: String,
    /// `MemTotal` of `/proc/meminfo`, in KiB.
    pub mem_total_kib: u64,
    /// Kernel release.
    pub kernel: String,
    /// `envoy --version`.
    pub envoy: String,
    /// `wrk -v` (first line).
    pub wrk: String,
    /// `redis-server --version`.
    pub redis: String,
    /// `git rev-parse --short HEAD`, with `+dirty` when the tree has changes.
    pub commit: String,
}

/// The 1-, 5- and 15-minute load averages from `/proc/loadavg`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// The current UTC time, RFC 3339.
pub fn now_utc() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|output| {
            let text = if output.stdout.is_empty() {
                output.stderr
            } else {
                output.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|_| "not found".into())
}

impl Machine {
    /// Looks everything up.
    pub fn detect(envoy: &std::path::Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let mem_total_kib = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let envoy_version = first_line(&envoy.display().to_string(), &["--version"]);
        let envoy_version = envoy_version
            .split_once("version:")
            .map_or(envoy_version.clone(), |(_, v)| v.trim().to_owned());
        let dirty = Command::new("git")
            .args(["status", "--porcelain"])
            .output()
            .is_ok_and(|output| !output.stdout.is_empty());
        let commit = first_line("git", &["rev-parse", "--short", "HEAD"]);
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            mem_total_kib,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|text| text.trim().to_owned())
                .unwrap_or_default(),
            envoy: envoy_version,
            wrk: first_line("wrk", &["-v"]),
            redis: first_line("redis-server", &["--version"]),
            commit: if dirty {
                format!("{commit}+dirty")
            } else {
                commit
            },
        }
    }
}
