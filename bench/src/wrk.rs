//! Runs `wrk` with `bench/wrk/tenants.lua` and reads the JSON line its `done()` prints.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

const SCRIPT: &str = include_str!("../wrk/tenants.lua");

/// What one wrk run measured (latencies in microseconds).
#[derive(Debug, Clone, Deserialize)]
pub struct WrkResult {
    /// Requests completed.
    pub requests: u64,
    /// Length of the run.
    pub duration_us: u64,
    /// Socket errors.
    pub connect_errors: u64,
    /// Socket errors.
    pub read_errors: u64,
    /// Socket errors.
    pub write_errors: u64,
    /// Responses with a status other than 2xx or 3xx.
    pub status_errors: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Latency percentiles.
    pub p50_us: u64,
    /// Latency percentiles.
    pub p90_us: u64,
    /// Latency percentiles.
    pub p99_us: u64,
    /// Latency percentiles.
    pub p999_us: u64,
    /// Largest latency.
    pub max_us: u64,
    /// Mean latency.
    pub mean_us: f64,
}

impl WrkResult {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / (self.duration_us.max(1) as f64 / 1e6)
    }

    /// Every kind of error together.
    pub fn errors(&self) -> u64 {
        self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.status_errors
            + self.timeouts
    }
}

/// How to run wrk.
#[derive(Debug, Clone)]
pub struct WrkRun {
    /// Connections.
    pub connections: u32,
    /// Length.
    pub duration: Duration,
    /// CPUs to pin wrk to (`taskset -c`), if any.
    pub cpus: Option<String>,
    /// Tenants: 1 (always `tenant`) or N (round-robin over `<tenant>0..<tenant>N-1`).
    pub tenant_count: usize,
    /// Tenant id or prefix.
    pub tenant: String,
}

/// Writes the Lua script into `dir` and returns its path.
pub fn write_script(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join("tenants.lua");
    std::fs::write(&path, SCRIPT)?;
    Ok(path)
}

/// Runs wrk (one thread) against `url` and returns what it measured.
pub fn run(script: &Path, url: &str, run: &WrkRun) -> Result<WrkResult, String> {
    let mut command = match &run.cpus {
        Some(cpus) => {
            let mut command = Command::new("taskset");
            command.args(["-c", cpus, "wrk"]);
            command
        }
        None => Command::new("wrk"),
    };
    let seconds = run.duration.as_secs().max(1);
    command
        .args(["-t1", "-c", &run.connections.to_string()])
        .args(["-d", &format!("{seconds}s"), "--timeout", "10s", "-s"])
        .arg(script)
        .arg(format!("{url}/api/conversations"))
        .args(["--", &run.tenant_count.to_string(), &run.tenant]);
    let output = command
        .output()
        .map_err(|e| format!("cannot run wrk: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("TGBENCH "))
        .ok_or_else(|| {
            format!(
                "wrk printed no result ({}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    serde_json::from_str(line).map_err(|e| format!("wrk result '{line}': {e}"))
}
