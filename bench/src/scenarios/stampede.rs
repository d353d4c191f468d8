//! Scenario 2, the stampede: many concurrent cold requests for one tenant spread over
//! several Envoys and companions, with a slow IdP. Connections are opened first; then
//! every request is released at once, so the latency measured is the request's own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokengate_tests::standins::Endpoint;
use tokio::sync::watch;

use crate::client::Conn;
use crate::fleet::Fleet;
use crate::stats::{Latencies, micros};

/// One request's outcome, times relative to the release of the whole burst.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Which Envoy it went to.
    pub envoy: usize,
    /// Status, or `None` when the request failed at the transport.
    pub status: Option<u16>,
    /// The token the upstream saw.
    pub token: Option<String>,
    /// When it was sent (microseconds after the release).
    pub sent_us: u64,
    /// When its answer was complete (microseconds after the release).
    pub done_us: u64,
}

impl Outcome {
    /// Its latency.
    pub fn latency_us(&self) -> u64 {
        self.done_us.saturating_sub(self.sent_us)
    }
}

/// Opens `per_envoy[i]` connections to Envoy `i`, then sends one request for `tenant`
/// on each at the same moment; returns every outcome.
pub async fn burst(
    addrs: &[SocketAddr],
    per_envoy: &[usize],
    tenant: &str,
) -> Result<Vec<Outcome>, String> {
    let (go, released) = watch::channel(None::<Instant>);
    let mut tasks = Vec::new();
    let mut connecting = Vec::new();
    for (envoy, (addr, count)) in addrs.iter().zip(per_envoy).enumerate() {
        for _ in 0..*count {
            let addr = *addr;
            connecting.push(tokio::spawn(
                async move { (envoy, Conn::connect(addr).await) },
            ));
        }
    }
    let mut conns = Vec::new();
    for task in connecting {
        let (envoy, conn) = task.await.map_err(|e| e.to_string())?;
        conns.push((envoy, conn?));
    }
    for (envoy, mut conn) in conns {
        let mut released = released.clone();
        let tenant = tenant.to_owned();
        tasks.push(tokio::spawn(async move {
            let epoch = match released.wait_for(Option::is_some).await {
                Ok(epoch) => epoch.unwrap_or_else(Instant::now),
                Err(_) => Instant::now(),
            };
            let sent_us = micros(epoch.elapsed());
            let answer = conn.get("/api/conversations", &tenant).await;
            let done_us = micros(epoch.elapsed());
            let (status, token) = match answer {
                Ok(answer) => (Some(answer.status), answer.seen_authorization),
                Err(_) => (None, None),
            };
            Outcome {
                envoy,
                status,
                token,
                sent_us,
                done_us,
            }
        }));
    }
    // Let every task reach its wait before the release.
    tokio::time::sleep(Duration::from_millis(200)).await;
    go.send_replace(Some(Instant::now()));
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.map_err(|e| e.to_string())?);
    }
    Ok(outcomes)
}

/// What one stampede found.
#[derive(Debug, Clone)]
pub struct StampedeRun {
    /// The tenant.
    pub tenant: String,
    /// Requests sent.
    pub requests: usize,
    /// Calls to the login stand-in.
    pub oauth_calls: u64,
    /// Calls to the Tenant Service stand-in.
    pub tenant_service_calls: u64,
    /// Answers by status (`0`: no answer).
    pub statuses: BTreeMap<u16, usize>,
    /// Distinct tokens the upstream saw.
    pub distinct_tokens: usize,
    /// Latency of every request.
    pub latency: Latencies,
    /// Latency of the successful requests.
    pub success_latency: Latencies,
    /// When the last answer arrived after the release.
    pub last_done_us: u64,
    /// `fetch_started` per Envoy.
    pub fetches_per_envoy: Vec<u64>,
    /// Leases answered from the cluster cache per Envoy.
    pub cluster_hits_per_envoy: Vec<u64>,
}

impl StampedeRun {
    /// Requests answered 200.
    pub fn successes(&self) -> usize {
        self.statuses.get(&200).copied().unwrap_or(0)
    }
}

/// Runs one stampede of `requests` for `tenant` over every Envoy of `fleet`.
pub async fn run_once(fleet: &Fleet, tenant: &str, requests: usize) -> Result<StampedeRun, String> {
    let envoys = fleet.envoys.len();
    let addrs: Vec<SocketAddr> = (0..envoys).map(|i| fleet.envoy_addr(i)).collect();
    let per_envoy: Vec<usize> = (0..envoys)
        .map(|i| requests / envoys + usize::from(i < requests % envoys))
        .collect();
    let logins = fleet.standins.calls(Endpoint::Login);
    let tenant_calls = fleet.standins.calls(Endpoint::TenantService);
    let mut fetches_before = Vec::new();
    let mut hits_before = Vec::new();
    for envoy in &fleet.envoys {
        fetches_before.push(envoy.stat("tokengate.fetch_started").await);
        hits_before.push(envoy.stat("tokengate.cluster_cache_hit").await);
    }
    let outcomes = burst(&addrs, &per_envoy, tenant).await?;
    let mut statuses = BTreeMap::new();
    for outcome in &outcomes {
        *statuses.entry(outcome.status.unwrap_or(0)).or_insert(0) += 1;
    }
    let mut tokens: Vec<&str> = outcomes.iter().filter_map(|o| o.token.as_deref()).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let all: Vec<u64> = outcomes.iter().map(Outcome::latency_us).collect();
    let ok: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.status == Some(200))
        .map(Outcome::latency_us)
        .collect();
    let mut fetches_per_envoy = Vec::new();
    let mut cluster_hits_per_envoy = Vec::new();
    for (i, envoy) in fleet.envoys.iter().enumerate() {
        fetches_per_envoy.push(envoy.stat("tokengate.fetch_started").await - fetches_before[i]);
        cluster_hits_per_envoy
            .push(envoy.stat("tokengate.cluster_cache_hit").await - hits_before[i]);
    }
    Ok(StampedeRun {
        tenant: tenant.to_owned(),
        requests,
        oauth_calls: fleet.standins.calls(Endpoint::Login) - logins,
        tenant_service_calls: fleet.standins.calls(Endpoint::TenantService) - tenant_calls,
        statuses,
        distinct_tokens: tokens.len(),
        latency: Latencies::of(&all),
        success_latency: Latencies::of(&ok),
        last_done_us: outcomes.iter().map(|o| o.done_us).max().unwrap_or(0),
        fetches_per_envoy,
        cluster_hits_per_envoy,
    })
}
