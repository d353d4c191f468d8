//! The soak's load: the warm-up, the paced load loops and the tracker of the tokens
//! the login stand-in issued.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokengate_tests::standins::StandIns;

use super::churn::Rotation;
use super::{Failure, LIFETIME_SECS};
use crate::client::Conn;
use crate::stats::micros;

const PATH: &str = "/api/conversations";
/// How often the tracker looks at the tokens issued.
const TRACK_EVERY: Duration = Duration::from_millis(50);
/// Beyond Envoy's route timeout (60 s): a request is never given up by the client first.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(65);
/// Requests slower than this are kept one by one (for the per-fault table).
pub const SLOW: Duration = Duration::from_millis(100);
/// How long after a tenant left the tracker still looks for its tokens while the load
/// runs (a refresh under way when it left may still land); the last poll looks at every
/// tenant.
const LINGER: Duration = Duration::from_secs(30);

/// Token -> when the tracker first saw it issued.
pub type IssueTimes = Arc<Mutex<HashMap<String, Instant>>>;

/// One request per tenant through every Envoy, the tenants spread evenly over
/// `spread` (one refresh period), so that their tokens fall due one after another
/// as they would in production, not all at once. The tracker sees each token issued.
pub async fn warm_up(
    addrs: &[SocketAddr],
    tenants: &[String],
    spread: Duration,
    tracker: &mut TokenTracker,
    standins: &StandIns,
) -> Result<(), String> {
    let mut conns = Vec::new();
    for addr in addrs {
        conns.push((*addr, Conn::connect(*addr).await?));
    }
    let step = spread.div_f64(tenants.len().max(1) as f64);
    let start = Instant::now();
    for (index, tenant) in tenants.iter().enumerate() {
        tokio::time::sleep_until((start + step.mul_f64(index as f64)).into()).await;
        for (addr, conn) in &mut conns {
            let answer = conn.get(PATH, tenant).await?;
            if answer.status != 200 {
                return Err(format!(
                    "warm-up: {tenant} through {addr} answered {}: {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                ));
            }
        }
        tracker.poll(standins);
    }
    Ok(())
}

/// Records when each token the login issued was first seen.
pub struct TokenTracker {
    /// Every tenant the load will send for, in order of arrival.
    tenants: Arc<[String]>,
    /// Which of them are active when; only those (and those that left lately) are looked at.
    rotation: Rotation,
    /// The start of the load, once it started (before: the warm-up, the first set only).
    epoch: Option<Instant>,
    /// Tokens seen so far per tenant.
    seen: Vec<usize>,
    /// Issue times per tenant, in order.
    pub times: Vec<Vec<Instant>>,
    /// Token -> issue time, for the load loops' expiry check.
    issued: IssueTimes,
    /// The login's total at the last poll (nothing to do while it stays).
    total: u64,
}

impl TokenTracker {
    /// A tracker that has seen nothing yet.
    pub fn new(tenants: Arc<[String]>, rotation: Rotation, issued: IssueTimes) -> Self {
        let count = tenants.len();
        TokenTracker {
            tenants,
            rotation,
            epoch: None,
            seen: vec![0; count],
            times: vec![Vec::new(); count],
            issued,
            total: u64::MAX,
        }
    }

    /// The load started at `epoch`.
    pub fn start(&mut self, epoch: Instant) {
        self.epoch = Some(epoch);
    }

    /// Records the tokens issued since the last poll to the tenants active now or lately.
    pub fn poll(&mut self, standins: &StandIns) {
        let now = Instant::now();
        let (from, to) = match self.epoch {
            Some(epoch) => {
                let since = now.saturating_duration_since(epoch);
                (
                    self.rotation.active_at(since.saturating_sub(LINGER)).start,
                    self.rotation.active_at(since).end,
                )
            }
            None => (0, self.rotation.active),
        };
        self.poll_tenants(standins, from..to);
    }

    /// Records the tokens issued to any tenant since the last poll.
    pub fn poll_all(&mut self, standins: &StandIns) {
        self.total = u64::MAX;
        self.poll_tenants(standins, 0..self.tenants.len());
    }

    fn poll_tenants(&mut self, standins: &StandIns, range: std::ops::Range<usize>) {
        let total = standins.tokens_issued();
        if total == self.total {
            return;
        }
        self.total = total;
        let now = Instant::now();
        let to = range.end.min(self.tenants.len());
        for index in range.start.min(to)..to {
            let tenant = &self.tenants[index];
            let tokens = standins.tokens_issued_to(tenant);
            if tokens.len() <= self.seen[index] {
                continue;
            }
            let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
            for token in &tokens[self.seen[index]..] {
                issued.insert(token.clone(), now);
                self.times[index].push(now);
            }
            self.seen[index] = tokens.len();
        }
    }

    /// Polls until `until`, then once more for every tenant.
    pub async fn run(&mut self, standins: &StandIns, until: Instant) {
        while Instant::now() < until {
            tokio::time::sleep(TRACK_EVERY).await;
            self.poll(standins);
        }
        self.poll_all(standins);
    }
}

/// What one load loop saw.
#[derive(Debug, Default)]
pub struct LoopRecord {
    /// Latencies of successful requests (microseconds), per minute of sending.
    pub per_minute: Vec<Vec<u64>>,
    /// Its failures.
    pub failures: Vec<Failure>,
    /// Requests slower than [`SLOW`]: when, and how long (microseconds).
    pub slow: Vec<(Duration, u64)>,
    /// Requests sent.
    pub sent: u64,
}

/// One connection's paced requests.
pub struct LoadLoop {
    /// The Envoy.
    pub addr: SocketAddr,
    /// Every tenant, in order of arrival.
    pub tenants: Arc<[String]>,
    /// Which of them are active when: requests step through the active set.
    pub rotation: Rotation,
    /// Counts this loop's requests (the tenant is this, modulo the active set).
    pub next_tenant: usize,
    /// Time between two requests.
    pub interval: Duration,
    /// When to send the first.
    pub start: Instant,
    /// When to stop sending.
    pub end: Instant,
    /// The start of the load (times are reported from it).
    pub epoch: Instant,
    /// For the expiry check.
    pub issued: IssueTimes,
}

impl LoadLoop {
    /// Sends until `end`.
    pub async fn drive(mut self) -> LoopRecord {
        tokio::time::sleep_until(self.start.into()).await;
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut conn = None;
        let mut record = LoopRecord::default();
        loop {
            ticker.tick().await;
            if Instant::now() >= self.end {
                break;
            }
            let sent = Instant::now();
            let tenants = Arc::clone(&self.tenants);
            let index = self
                .rotation
                .tenant(sent.duration_since(self.epoch), self.next_tenant)
                .min(tenants.len().saturating_sub(1));
            let tenant = &tenants[index];
            self.next_tenant += 1;
            let outcome = self.send(&mut conn, tenant, sent).await;
            let latency_us = micros(sent.elapsed());
            let at = sent.duration_since(self.epoch);
            record.sent += 1;
            if latency_us >= micros(SLOW) {
                record.slow.push((at, latency_us));
            }
            match outcome {
                Ok(()) => {
                    let minute = (at.as_secs() / 60) as usize;
                    if record.per_minute.len() <= minute {
                        record.per_minute.resize(minute + 1, Vec::new());
                    }
                    record.per_minute[minute].push(latency_us);
                }
                Err((status, code)) => record.failures.push(Failure {
                    at,
                    status,
                    code,
                    tenant: tenant.clone(),
                    expected: false,
                }),
            }
        }
        record
    }

    /// One request; `Err((status, code))` for anything but a 200 with a good token.
    async fn send(
        &self,
        conn: &mut Option<Conn>,
        tenant: &str,
        sent: Instant,
    ) -> Result<(), (u16, String)> {
        if conn.is_none() {
            *conn = Some(
                Conn::connect(self.addr)
                    .await
                    .map_err(|e| (0, short(&format!("NO_ANSWER: {e}"))))?,
            );
        }
        let Some(open) = conn.as_mut() else {
            return Err((0, "NO_ANSWER: no connection".into()));
        };
        let answer = match tokio::time::timeout(REQUEST_TIMEOUT, open.get(PATH, tenant)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                *conn = None;
                return Err((0, short(&format!("NO_ANSWER: {error}"))));
            }
            Err(_) => {
                *conn = None;
                return Err((0, "TIMEOUT".into()));
            }
        };
        if answer.status != 200 {
            let code = serde_json::from_slice::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|body| body["code"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "(no JSON error body)".into());
            return Err((answer.status, code));
        }
        let Some(token) = answer
            .seen_authorization
            .as_deref()
            .and_then(|value| value.strip_prefix("Bearer "))
        else {
            return Err((200, "NO_TOKEN".into()));
        };
        if !token.starts_with(&format!("gen-{tenant}-")) {
            return Err((200, "WRONG_TENANT_TOKEN".into()));
        }
        let issued_at = self
            .issued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .copied();
        if issued_at.is_some_and(|at| {
            sent.saturating_duration_since(at) > Duration::from_secs(LIFETIME_SECS)
        }) {
            return Err((200, "EXPIRED_TOKEN".into()));
        }
        Ok(())
    }
}

/// An error text cut to a length that groups well in the report.
fn short(text: &str) -> String {
    text.chars().take(80).collect()
}
