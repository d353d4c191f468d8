//! Scenario 3, wake-up latency: how long after the lock holder has its token the
//! requests waiting on other Envoys are resumed.
//!
//! Method: a trial sends a few requests for a cold tenant to every Envoy at once. The
//! holder is the Envoy whose `fetch_started` went up. Its first answer marks the
//! moment the holder had the token (it resumes its own requests right after sending
//! the commit). Every request answered by another Envoy was woken through the
//! companion (commit -> Redis -> pub/sub -> lease answered) or, on a second worker of
//! an Envoy, by the worker that leased (through its shared queue); its wake-up latency is its answer time minus the
//! holder's first answer. Both include the same upstream and client legs, which cancel.

use std::net::SocketAddr;

use tokengate_tests::standins::{Endpoint, generated_tenant_id};

use crate::fleet::Fleet;
use crate::scenarios::stampede::burst;
use crate::stats::Latencies;

/// What the trials found.
#[derive(Debug, Clone)]
pub struct WakeUp {
    /// Workers per Envoy in these trials.
    pub concurrency: u32,
    /// Envoys.
    pub envoys: usize,
    /// Trials run.
    pub trials: usize,
    /// Trials with exactly one fetching Envoy and one OAuth call (the others are skipped).
    pub valid_trials: usize,
    /// Requests per Envoy per trial.
    pub requests_per_envoy: usize,
    /// Wake-up latency of requests answered by the other Envoys (microseconds; values
    /// below 0 count as 0).
    pub other_envoys: Latencies,
    /// Answer time of the holder Envoy's other requests after its first (its second
    /// worker is woken through its shared queue).
    pub holder_envoy_others: Latencies,
    /// Failed requests.
    pub failures: usize,
    /// Valid trials in which some waiter on another Envoy took more than 10 ms.
    pub slow_trials: usize,
}

/// Runs `trials` trials over generated tenants `first_tenant..`.
pub async fn run(
    fleet: &Fleet,
    concurrency: u32,
    trials: usize,
    requests_per_envoy: usize,
    first_tenant: usize,
) -> Result<WakeUp, String> {
    let envoys = fleet.envoys.len();
    let addrs: Vec<SocketAddr> = (0..envoys).map(|i| fleet.envoy_addr(i)).collect();
    let per_envoy = vec![requests_per_envoy; envoys];
    let mut other = Vec::new();
    let mut holder_others = Vec::new();
    let mut valid_trials = 0;
    let mut failures = 0;
    let mut slow_trials = 0;
    for trial in 0..trials {
        let tenant = generated_tenant_id(first_tenant + trial);
        let logins = fleet.standins.calls(Endpoint::Login);
        let mut before = Vec::new();
        for envoy in &fleet.envoys {
            before.push(envoy.stat("tokengate.fetch_started").await);
        }
        let outcomes = burst(&addrs, &per_envoy, &tenant).await?;
        let mut fetching = Vec::new();
        for (i, envoy) in fleet.envoys.iter().enumerate() {
            if envoy.stat("tokengate.fetch_started").await > before[i] {
                fetching.push(i);
            }
        }
        failures += outcomes.iter().filter(|o| o.status != Some(200)).count();
        let oauth_calls = fleet.standins.calls(Endpoint::Login) - logins;
        let [holder] = fetching.as_slice() else {
            continue;
        };
        if oauth_calls != 1 {
            continue;
        }
        let holder = *holder;
        let mut holder_done: Vec<u64> = outcomes
            .iter()
            .filter(|o| o.envoy == holder && o.status == Some(200))
            .map(|o| o.done_us)
            .collect();
        holder_done.sort_unstable();
        let Some(&first) = holder_done.first() else {
            continue;
        };
        valid_trials += 1;
        holder_others.extend(holder_done.iter().skip(1).map(|done| done - first));
        let waiters: Vec<u64> = outcomes
            .iter()
            .filter(|o| o.envoy != holder && o.status == Some(200))
            .map(|o| o.done_us.saturating_sub(first))
            .collect();
        if waiters.iter().any(|us| *us > 10_000) {
            slow_trials += 1;
            if std::env::var_os("TOKENGATE_BENCH_DEBUG").is_some() {
                let mut times: Vec<(usize, u64)> = outcomes
                    .iter()
                    .map(|o| (o.envoy, o.done_us.saturating_sub(first)))
                    .collect();
                times.sort_unstable();
                eprintln!("bench: slow wake-up, tenant {tenant}, holder {holder}: {times:?}");
                for (i, envoy) in fleet.envoys.iter().enumerate() {
                    let lines: Vec<String> = envoy
                        .process
                        .log_text()
                        .lines()
                        .filter(|line| line.contains(&tenant))
                        .map(str::to_owned)
                        .collect();
                    eprintln!("bench:   envoy {i}:\n{}", lines.join("\n"));
                }
                for (i, companion) in fleet.companions.iter().enumerate() {
                    let lines: Vec<String> = companion
                        .process
                        .log_text()
                        .lines()
                        .filter(|line| {
                            line.contains(&format!("\"{tenant}\""))
                                || line.contains(&format!("={tenant} "))
                                || line.contains(&format!("{tenant}\""))
                        })
                        .map(str::to_owned)
                        .collect();
                    eprintln!("bench:   companion {i}:\n{}", lines.join("\n"));
                }
            }
        }
        other.extend(waiters);
    }
    Ok(WakeUp {
        concurrency,
        envoys,
        trials,
        valid_trials,
        requests_per_envoy,
        other_envoys: Latencies::of(&other),
        holder_envoy_others: Latencies::of(&holder_others),
        failures,
        slow_trials,
    })
}
