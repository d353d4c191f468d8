//! Scenario 4, expiry rollover: steady paced load on one tenant whose tokens live a
//! few seconds, across several token expiries, with refresh-ahead on and a slow IdP
//! (so a request that waited for a fetch would stand out by at least the IdP latency).
//!
//! Every request records when it was sent, its latency and the token the upstream saw.
//! A rollover is the first request carrying a new token; requests sent within
//! `window` of a rollover are "rollover" requests, the rest "steady".

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokengate_tests::standins::Endpoint;

use crate::client::Conn;
use crate::fleet::Fleet;
use crate::stats::{Latencies, micros};

/// How to run it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Token lifetime the login answers (`expires_in`).
    pub lifetime_secs: i64,
    /// Rollovers to observe.
    pub rollovers: usize,
    /// Connections, each sending one request every `interval`.
    pub connections: usize,
    /// Pause between one connection's requests.
    pub interval: Duration,
    /// Half-width of the window around a rollover.
    pub window: Duration,
    /// IdP latency during the run.
    pub idp_latency: Duration,
}

/// What it found.
#[derive(Debug, Clone)]
pub struct Rollover {
    /// The settings.
    pub settings: Settings,
    /// The filter configuration used.
    pub filter_config: serde_json::Value,
    /// Rollovers seen by the client (token changes).
    pub rollovers_seen: usize,
    /// OAuth calls during the run.
    pub oauth_calls: u64,
    /// Requests that were not answered 200.
    pub failures: usize,
    /// Requests near a rollover.
    pub rollover: Latencies,
    /// The others.
    pub steady: Latencies,
    /// Requests that took longer than the IdP latency (waited for a fetch, or stalled).
    pub slower_than_idp: usize,
    /// tokengate's cache misses during the measured run (a miss waits for a fetch).
    pub cache_misses: u64,
    /// Background refreshes started during the run.
    pub refreshes: u64,
    /// Measured length.
    pub duration: Duration,
}

struct Sample {
    sent_us: u64,
    latency_us: u64,
    ok: bool,
    token: Option<String>,
}

/// Runs it on `fleet` (one Envoy; its filter configuration must refresh ahead).
pub async fn run(
    fleet: &Fleet,
    settings: Settings,
    filter_config: serde_json::Value,
) -> Result<Rollover, String> {
    fleet.standins.set_expires_in(settings.lifetime_secs);
    fleet
        .standins
        .set_latency(Endpoint::Login, settings.idp_latency);
    let addr: SocketAddr = fleet.envoy_addr(0);
    // Warm the tenant, and wait for the first rollover so the run starts in steady state.
    let mut conn = Conn::connect(addr).await?;
    let first = conn
        .get("/api/conversations", "acme")
        .await?
        .seen_authorization;
    let started = Instant::now();
    loop {
        let seen = conn
            .get("/api/conversations", "acme")
            .await?
            .seen_authorization;
        if seen != first {
            break;
        }
        if started.elapsed() > Duration::from_secs(settings.lifetime_secs as u64 * 3) {
            return Err("no token rollover seen while warming".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let envoy = &fleet.envoys[0];
    let misses_before = envoy.stat("tokengate.cache_miss").await;
    let refreshes_before = envoy.stat("tokengate.refresh_ahead").await;
    let logins_before = fleet.standins.calls(Endpoint::Login);
    let length = Duration::from_secs_f64(
        settings.lifetime_secs as f64 * 0.6 * (settings.rollovers as f64 + 0.5),
    );
    let epoch = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..settings.connections {
        let interval = settings.interval;
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut samples = Vec::new();
            while epoch.elapsed() < length {
                ticker.tick().await;
                let sent = Instant::now();
                let answer = conn.get("/api/conversations", "acme").await;
                let latency_us = micros(sent.elapsed());
                let (ok, token) = match answer {
                    Ok(answer) => (answer.status == 200, answer.seen_authorization),
                    Err(_) => (false, None),
                };
                samples.push(Sample {
                    sent_us: micros(sent.duration_since(epoch)),
                    latency_us,
                    ok,
                    token,
                });
            }
            Ok::<Vec<Sample>, String>(samples)
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.map_err(|e| e.to_string())??);
    }
    let duration = epoch.elapsed();
    let oauth_calls = fleet.standins.calls(Endpoint::Login) - logins_before;
    let cache_misses = envoy.stat("tokengate.cache_miss").await - misses_before;
    let refreshes = envoy.stat("tokengate.refresh_ahead").await - refreshes_before;
    samples.sort_by_key(|s| s.sent_us);

    // Each token's first appearance after the first token is a rollover.
    let mut first_seen: BTreeMap<String, u64> = BTreeMap::new();
    for sample in &samples {
        if let Some(token) = &sample.token {
            first_seen.entry(token.clone()).or_insert(sample.sent_us);
        }
    }
    let mut switches: Vec<u64> = first_seen.values().copied().collect();
    switches.sort_unstable();
    if !switches.is_empty() {
        switches.remove(0);
    }
    let window = micros(settings.window);
    let near = |sent: u64| {
        switches
            .iter()
            .any(|switch| sent + window >= *switch && sent <= switch + window)
    };
    let mut rollover = Vec::new();
    let mut steady = Vec::new();
    for sample in samples.iter().filter(|s| s.ok) {
        if near(sample.sent_us) {
            rollover.push(sample.latency_us);
        } else {
            steady.push(sample.latency_us);
        }
    }
    let idp = micros(settings.idp_latency);
    Ok(Rollover {
        rollovers_seen: switches.len(),
        oauth_calls,
        failures: samples.iter().filter(|s| !s.ok).count(),
        rollover: Latencies::of(&rollover),
        steady: Latencies::of(&steady),
        slower_than_idp: samples.iter().filter(|s| s.latency_us >= idp).count(),
        cache_misses,
        refreshes,
        duration,
        settings,
        filter_config,
    })
}
