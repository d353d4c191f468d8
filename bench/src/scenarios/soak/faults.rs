//! The soak's faults: what each one does to the fleet, how long it is held, and what
//! the README lets a client see while it lasts (the only errors counted as expected).

use std::time::{Duration, Instant};

use tokengate_tests::harness::{Companion, Redis};
use tokengate_tests::standins::{Endpoint, Fault, StandIns};

/// One-shot faults queued at a stand-in for a "every call fails" window; far more than
/// the calls a window sees, and whatever is left is dropped when the window ends.
const QUEUED_FAULTS: usize = 10_000;
/// `Retry-After` of the IdP's 429s.
const RETRY_AFTER_SECS: u64 = 1;
/// How long a burst waits for the first call to meet it, or a fault that strikes during
/// a fetch for the next OAuth call, before going ahead without.
pub const MEET_WITHIN: Duration = Duration::from_secs(20);
/// The filter's default `companion.retryAfterMs`.
const COMPANION_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Latency of the IdP during its slow spell.
pub const IDP_SLOW: Duration = Duration::from_millis(1_500);

/// The faults, injected in this order, one per period, round and round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Every OAuth call answers 503.
    IdpErrors,
    /// Every OAuth call answers 429 with `Retry-After`.
    IdpRateLimited,
    /// Every OAuth call answers after [`IDP_SLOW`].
    IdpSlow,
    /// Every Tenant Service call answers 503.
    TenantServiceErrors,
    /// Redis is killed and started again on the same port, empty.
    RedisRestart,
    /// A companion is killed with SIGKILL and started again on the same port.
    CompanionKill,
    /// Redis stops answering every client (`CLIENT PAUSE ... ALL`).
    RedisPause,
}

impl FaultKind {
    /// The cycle.
    pub const CYCLE: [FaultKind; 7] = [
        FaultKind::IdpErrors,
        FaultKind::IdpRateLimited,
        FaultKind::IdpSlow,
        FaultKind::TenantServiceErrors,
        FaultKind::RedisRestart,
        FaultKind::CompanionKill,
        FaultKind::RedisPause,
    ];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::IdpErrors => "IdP 5xx",
            FaultKind::IdpRateLimited => "IdP 429",
            FaultKind::IdpSlow => "IdP slow",
            FaultKind::TenantServiceErrors => "Tenant Service 503",
            FaultKind::RedisRestart => "Redis restart",
            FaultKind::CompanionKill => "companion SIGKILL",
            FaultKind::RedisPause => "Redis pause",
        }
    }

    /// How long the fault is held (for a kill or restart: how long the process stays down).
    pub fn hold(self) -> Duration {
        match self {
            FaultKind::IdpErrors | FaultKind::IdpRateLimited | FaultKind::TenantServiceErrors => {
                Duration::from_secs(2)
            }
            FaultKind::IdpSlow => Duration::from_secs(20),
            FaultKind::RedisRestart => Duration::from_secs(2),
            // About a pod's restart; long enough that leases meet the closed port.
            FaultKind::CompanionKill => Duration::from_secs(5),
            FaultKind::RedisPause => Duration::from_secs(3),
        }
    }

    /// How many extra OAuth calls one tenant may cost in this fault's wake: one per
    /// refresh that can fall in the degraded spell (the fault, plus the filter's
    /// `companion.retryAfterMs` of local mode after the companion's last failure).
    pub fn extra_tokens_allowed(self, refresh_period: Duration) -> usize {
        if self.extra_tokens_reason().is_none() {
            return 0;
        }
        let spell = self.hold() + COMPANION_RETRY_AFTER;
        spell
            .as_millis()
            .div_ceil(refresh_period.as_millis().max(1)) as usize
    }

    /// The stand-in whose calls meet this fault, for a burst: it is held from the first
    /// call that meets it (a burst that meets no call would test nothing).
    fn met_at(self) -> Option<Endpoint> {
        match self {
            FaultKind::IdpErrors | FaultKind::IdpRateLimited => Some(Endpoint::Login),
            FaultKind::TenantServiceErrors => Some(Endpoint::TenantService),
            _ => None,
        }
    }

    /// Whether it waits for the next OAuth call to strike: Redis and companion faults
    /// are injected while a refresh is under way (its lease taken, its commit to come),
    /// not in a quiet moment between refreshes where they would meet nothing.
    pub fn strikes_during_a_fetch(self) -> bool {
        matches!(
            self,
            FaultKind::RedisRestart | FaultKind::CompanionKill | FaultKind::RedisPause
        )
    }

    /// What is done, for the report.
    pub fn describe(self) -> String {
        let held = self.hold().as_secs();
        match self {
            FaultKind::IdpErrors => {
                format!("every OAuth call answers 503 for {held} s from the first")
            }
            FaultKind::IdpRateLimited => format!(
                "every OAuth call answers 429 `Retry-After: {RETRY_AFTER_SECS}` for {held} s \
                 from the first"
            ),
            FaultKind::IdpSlow => format!(
                "every OAuth call answers after {} ms for {held} s",
                IDP_SLOW.as_millis()
            ),
            FaultKind::TenantServiceErrors => {
                format!("every Tenant Service call answers 503 for {held} s from the first")
            }
            FaultKind::RedisRestart => format!(
                "Redis killed (SIGKILL) at the next OAuth call, started again {held} s later on \
                 the same port, empty"
            ),
            FaultKind::CompanionKill => format!(
                "a companion killed (SIGKILL) at the next OAuth call, started again {held} s \
                 later on the same port"
            ),
            FaultKind::RedisPause => {
                format!(
                    "`CLIENT PAUSE {} ALL` at the next OAuth call: Redis answers nobody for {held} s",
                    self.hold().as_millis()
                )
            }
        }
    }

    /// Error codes the README documents for this fault, so a client may see them while
    /// it lasts and shortly after: while Redis is gone and before the companion has
    /// counted `--health-failure-threshold` failures, "requests that need Redis answer
    /// 503 CACHE_UNAVAILABLE". Every other fault is absorbed by design: retries and
    /// refresh-ahead (IdP and Tenant Service), the filter's local mode (companion).
    pub fn expected_codes(self) -> &'static [&'static str] {
        match self {
            FaultKind::RedisRestart | FaultKind::RedisPause => &["CACHE_UNAVAILABLE"],
            _ => &[],
        }
    }

    /// Error codes the README documents for a tenant with no token to serve yet (one that
    /// just joined) whose first fetch meets this fault: the IdP failing through the
    /// filter's retries (README, "IdP 5xx or no answer 3 times", "IdP 429 3 times"), the
    /// Tenant Service likewise. A tenant with a token keeps being served from it.
    pub fn expected_codes_without_token(self) -> &'static [&'static str] {
        match self {
            FaultKind::IdpErrors | FaultKind::IdpRateLimited => &["OAUTH_EXCHANGE_FAILED"],
            FaultKind::TenantServiceErrors => &["TENANT_SERVICE_UNAVAILABLE"],
            _ => self.expected_codes(),
        }
    }

    /// Why this fault may cost a tenant an extra OAuth call, when the README says so.
    pub fn extra_tokens_reason(self) -> Option<&'static str> {
        match self {
            FaultKind::CompanionKill => Some(
                "the Envoy without its companion fetches in local mode for `companion.retryAfterMs`, \
                 outside the cluster lock, and stores nothing in Redis: the other Envoy's next \
                 refresh of that tenant fetches again",
            ),
            FaultKind::RedisRestart => Some(
                "while Redis is down the companions serve degraded leases (one fetch per tenant \
                 each, no cluster lock, nothing stored), so both Envoys may fetch; a token \
                 committed or a lock taken just before the kill is lost with it",
            ),
            FaultKind::RedisPause => Some(
                "in degraded mode each companion grants one fetch per tenant without a cluster \
                 lock, so the two companions' Envoys may both fetch",
            ),
            _ => None,
        }
    }
}

/// A fault under way, with what is needed to end it and describe it.
#[derive(Debug)]
pub struct Active {
    /// Which.
    pub kind: FaultKind,
    /// When it began.
    pub began: Instant,
    /// Calls to the stand-in it acts on (the login, or the Tenant Service) before it began.
    calls_before: u64,
    /// When the first call met it (bursts only).
    met: Option<Instant>,
    /// The companion killed, if any.
    pub companion: Option<usize>,
}

impl Active {
    /// When to end it: its hold after it began, or for a burst after the first call met
    /// it (or [`MEET_WITHIN`] after it began, when none came); `None` while a burst waits.
    pub fn ends(&self) -> Option<Instant> {
        let hold = self.kind.hold();
        match (self.kind.met_at(), self.met) {
            (None, _) => Some(self.began + hold),
            (Some(_), Some(met)) => Some(met + hold),
            (Some(_), None) if self.began.elapsed() >= MEET_WITHIN => {
                Some(self.began + MEET_WITHIN)
            }
            (Some(_), None) => None,
        }
    }
}

/// Everything a fault acts on.
#[derive(Debug)]
pub struct Targets<'a> {
    /// The stand-ins.
    pub standins: &'a StandIns,
    /// The companions.
    pub companions: &'a mut [Companion],
    /// Redis.
    pub redis: &'a mut Redis,
    /// Where Redis logs (it is started again there).
    pub dir: &'a std::path::Path,
}

impl Targets<'_> {
    /// Starts fault `kind`; `occurrence` counts earlier faults of the same kind (the
    /// companion killed alternates).
    pub async fn begin(&mut self, kind: FaultKind, occurrence: usize) -> Result<Active, String> {
        let calls_before = self
            .standins
            .calls(kind.met_at().unwrap_or(Endpoint::Login));
        let mut companion = None;
        match kind {
            FaultKind::IdpErrors => self.queue(Endpoint::Login, &Fault::Status(503)),
            FaultKind::IdpRateLimited => self.queue(
                Endpoint::Login,
                &Fault::TooManyRequests {
                    retry_after_secs: Some(RETRY_AFTER_SECS),
                },
            ),
            FaultKind::IdpSlow => self.standins.set_latency(Endpoint::Login, IDP_SLOW),
            FaultKind::TenantServiceErrors => {
                self.queue(Endpoint::TenantService, &Fault::Status(503));
            }
            FaultKind::RedisRestart => self.redis.kill(),
            FaultKind::CompanionKill => {
                let index = occurrence % self.companions.len();
                self.companions[index].kill();
                companion = Some(index);
            }
            FaultKind::RedisPause => {
                let millis = kind.hold().as_millis().to_string();
                let reply = self.redis.cli(&["CLIENT", "PAUSE", &millis, "ALL"]);
                if reply.trim() != "OK" {
                    return Err(format!("CLIENT PAUSE answered '{}'", reply.trim()));
                }
            }
        }
        Ok(Active {
            kind,
            began: Instant::now(),
            calls_before,
            met: None,
            companion,
        })
    }

    /// Notes when the first call meets a burst.
    pub fn watch(&self, active: &mut Active) {
        if let (Some(endpoint), None) = (active.kind.met_at(), active.met) {
            if self.standins.calls(endpoint) > active.calls_before {
                active.met = Some(Instant::now());
            }
        }
    }

    /// Ends a fault; returns what happened, for the report.
    pub async fn end(&mut self, active: &Active) -> String {
        let held = active.began.elapsed().as_secs_f64();
        match active.kind {
            FaultKind::IdpErrors | FaultKind::IdpRateLimited | FaultKind::TenantServiceErrors => {
                let endpoint = active.kind.met_at().unwrap_or(Endpoint::Login);
                let faulted = self.drain(endpoint);
                let calls = match endpoint {
                    Endpoint::TenantService => "Tenant Service calls",
                    _ => "OAuth calls",
                };
                match active.met {
                    Some(met) => format!(
                        "{faulted} {calls} got the fault in {:.1} s from the first, {:.1} s after the start",
                        met.elapsed().as_secs_f64(),
                        met.duration_since(active.began).as_secs_f64()
                    ),
                    None => format!("no {calls} within {} s", MEET_WITHIN.as_secs()),
                }
            }
            FaultKind::IdpSlow => {
                self.standins.set_latency(Endpoint::Login, Duration::ZERO);
                let calls = self.standins.calls(Endpoint::Login) - active.calls_before;
                format!("{calls} OAuth calls in {held:.1} s")
            }
            FaultKind::RedisRestart => {
                let port = self.redis.port;
                *self.redis = Redis::start_on(self.dir, port).await;
                format!(
                    "Redis answered again {:.1} s after the kill",
                    active.began.elapsed().as_secs_f64()
                )
            }
            FaultKind::CompanionKill => {
                let Some(index) = active.companion else {
                    return String::new();
                };
                let companion = &mut self.companions[index];
                companion.restart().await;
                format!(
                    "companion {index} answered again {:.1} s after the kill",
                    active.began.elapsed().as_secs_f64()
                )
            }
            FaultKind::RedisPause => format!("Redis paused for {held:.1} s"),
        }
    }

    fn queue(&self, endpoint: Endpoint, fault: &Fault) {
        for _ in 0..QUEUED_FAULTS {
            self.standins.push_fault(endpoint, fault.clone());
        }
    }

    /// Drops the faults left at `endpoint`; returns how many were taken.
    fn drain(&self, endpoint: Endpoint) -> usize {
        let taken = QUEUED_FAULTS - self.standins.pending_faults(endpoint);
        self.standins.clear_faults(endpoint);
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(kind: FaultKind, began_ago: Duration, met_ago: Option<Duration>) -> Active {
        let now = Instant::now();
        let ago = |d: Duration| now.checked_sub(d).expect("the clock is past boot");
        Active {
            kind,
            began: ago(began_ago),
            calls_before: 0,
            met: met_ago.map(ago),
            companion: None,
        }
    }

    #[test]
    fn a_burst_is_held_from_the_first_call_that_meets_it() {
        let second = Duration::from_secs(1);
        let waiting = active(FaultKind::IdpErrors, 5 * second, None);
        assert_eq!(waiting.ends(), None);
        let met = active(FaultKind::TenantServiceErrors, 5 * second, Some(second));
        assert_eq!(met.ends(), met.met.map(|at| at + 2 * second));
        let nobody = active(FaultKind::IdpRateLimited, MEET_WITHIN + second, None);
        assert_eq!(nobody.ends(), Some(nobody.began + MEET_WITHIN));
        // Other faults are held from their start.
        let kill = active(FaultKind::CompanionKill, second, None);
        assert_eq!(kill.ends(), Some(kill.began + 5 * second));
    }
}
