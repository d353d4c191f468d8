//! A seeded, deterministic simulation of a whole tokengate cluster: the real
//! [`Worker`] code of several Envoys, each with several workers, on the fake host
//! ([`tokengate::fake`]), against models of the companion (its lease, commit, abort
//! and invalidate contract, with lock TTL, waiters, crashes, restarts that lose what
//! they were doing, and freezes), the Tenant Service and the IdP (latency, 5xx, 429 with
//! `Retry-After`, 401, unusable 200s, token lifetimes, secret rotations) and an
//! upstream that rejects revoked tokens (which drives purges).
//!
//! One seed draws everything: the cluster's shape, the cache kind (slot tables with a
//! small `cache.maxTenants`, or the native build's LRU records), and a schedule of
//! requests (Zipf-like over more tenants than `maxTenants`, inject and endpoint mode,
//! forced refreshes, clients that leave), callout answers in any order, timeouts,
//! clock jumps and companion faults. After every step the invariants of
//! [`Invariant`] are checked; the first violation stops the run and prints the seed
//! and the trace of the key it concerns. `SIM_SEED=<n>` replays seed `n` exactly
//! (`cargo test -p tokengate-plugin --test simulation -- --nocapture`).
//!
//! - `a_fixed_budget_of_seeds_keeps_every_invariant` (or the one seed of `SIM_SEED`) and
//!   `seeds_that_once_failed_keep_every_invariant` run in `scripts/test`.
//! - `soak` (ignored) runs fresh seeds for `SIM_MINUTES` minutes from `SIM_FIRST_SEED`
//!   and prints the totals `scripts/sim` writes to SIMULATION.md.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::Instant;

use serde_json::json;

use tokengate::config::FilterConfig;
use tokengate::fake::{FakeEnvoy, FakeHost, SentCallout};
use tokengate::host::Metric;
use tokengate::inflight::Marker;
use tokengate::records::LruRecords;
use tokengate::slots::Table;
use tokengate::worker::{Decision, Delivery, RequestIds, TokenAsk, Worker};

#[path = "sim/companion.rs"]
mod companion_model;
use companion_model::{CompanionModel, Effect, Reply};
use tokengate_core::{
    CachedToken, CalloutResult, ErrorBody, ErrorCode, Provider, SecretBytes, TenantId, TokenKey,
};

// --- The cluster's configuration -------------------------------------------------------

const START_MS: u64 = 1_700_000_000_000;
const EXPIRY_MARGIN_MS: u64 = 2_000;
const FETCH_DEADLINE_MS: u64 = 2_500;
const COMPANION_TIMEOUT_MS: u64 = 4_000;
const COMPANION_RETRY_AFTER_MS: u64 = 1_000;
const CALLOUT_TIMEOUT_MS: u64 = 400;
const PURGE_MIN_INTERVAL_MS: u64 = 1_000;
/// The companion's `--lock-ttl-ms` and `--lease-wait-ms` (fetch deadline < TTL < wait
/// < the filter's companion timeout, as the README asks).
const LOCK_TTL_MS: u64 = 3_000;
const LEASE_WAIT_MS: u64 = 3_500;
/// A request is answered within two lease timeouts (a lease answered too late to use
/// its token is asked once more) and a whole fetch, plus this.
const ANSWER_SLACK_MS: u64 = 1_000;
const ANSWER_DEADLINE_MS: u64 = 2 * COMPANION_TIMEOUT_MS + FETCH_DEADLINE_MS + ANSWER_SLACK_MS;
/// After a fault that may send gateways to local mode (or a clock jump that may expire
/// locks and markers), fetches overlap legitimately for this long.
const FAULT_SHADOW_MS: u64 =
    COMPANION_TIMEOUT_MS + COMPANION_RETRY_AFTER_MS + FETCH_DEADLINE_MS + LOCK_TTL_MS;
/// A run that takes more steps than this is stuck (runs take some 10,000).
const MAX_STEPS: u64 = 1_000_000;
/// How long the end of a run waits for every request and callout to settle.
const DRAIN_MS: u64 = 60_000;

const COMPANION: &str = "tokengate_companion";
const TENANT_SERVICE: &str = "tenant_service";
const LOGIN: &str = "genesys_eu-west-1";
/// Every token and secret the models hand out contains one of these, so a log line
/// holding one is found by a substring search (tenant ids never contain `~`).
const TOKEN_MARK: &str = "AT~";
const SECRET_MARK: &str = "SK~";

fn filter_config(max_tenants: u32, refresh_percent: u64) -> FilterConfig {
    let document = json!({
        "expiryMarginMs": EXPIRY_MARGIN_MS,
        "fetchDeadlineMs": FETCH_DEADLINE_MS,
        "companion": {"timeoutMs": COMPANION_TIMEOUT_MS, "retryAfterMs": COMPANION_RETRY_AFTER_MS, "localFetchesPerMinute": 6},
        "tenantService": {"timeoutMs": CALLOUT_TIMEOUT_MS, "retries": 2},
        "genesys": {"timeoutMs": CALLOUT_TIMEOUT_MS, "retries": 2},
        "whatsapp": {"safetyBufferSecs": 1},
        "refreshAhead": {"percent": refresh_percent, "minLeadMs": 4_000},
        "purge": {"statuses": [401], "minIntervalMs": PURGE_MIN_INTERVAL_MS},
        "cache": {"maxTenants": max_tenants},
    });
    match FilterConfig::parse(document.to_string().as_bytes()) {
        Ok(config) => config,
        Err(error) => panic!("the simulation's filter configuration: {error:?}"),
    }
}

// --- The seeded generator --------------------------------------------------------------

/// splitmix64: small, fast, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn per_mille(&mut self, chance: u64) -> bool {
        self.next() % 1_000 < chance
    }

    fn index(&mut self, len: usize) -> usize {
        (self.next() % len as u64) as usize
    }

    /// Zipf-like over `0..len`: `len^u - 1` for a uniform `u` (log-uniform, so index 0
    /// is asked for about as often as 1..2, 3..6, 7..14 ...).
    fn zipf(&mut self, len: usize) -> usize {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((len as f64).powf(u) as usize)
            .saturating_sub(1)
            .min(len - 1)
    }
}

// --- The invariants --------------------------------------------------------------------

/// What must hold after every step; each violation names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Invariant {
    /// A request gets a token of its own tenant and provider, never another's.
    NeverAnotherKeysToken,
    /// A token is never delivered once it is past its expiry minus `expiryMarginMs`.
    NeverPastExpiryMinusMargin,
    /// After an Envoy purged a token (an upstream rejected it), that Envoy never
    /// delivers it again, nor a token of the key it had received before it, unless
    /// that token reached it again after the purge.
    NeverAPurgedToken,
    /// No resurrection: an Envoy never serves a token of a key older than the one it
    /// last served for it while that one is still fresh (its cache holds the newest).
    NeverAnOlderToken,
    /// At most one fetch (Tenant Service or IdP call) per key at a time per Envoy.
    OneFetchPerKeyPerEnvoy,
    /// ... and per cluster, while the companion answers.
    OneFetchPerKeyPerCluster,
    /// Every request is answered, with a token or a documented error, within two
    /// lease timeouts plus a whole fetch (unless a clock jump stalled it).
    AnsweredWithinDeadline,
    /// At the end, no request is left waiting and no worker holds anything.
    NoneLeftWaiting,
    /// Each table of the gateway cache holds at most `maxTenants` records (slot
    /// tables: three tables of `maxTenants` slots in shared data).
    SharedDataBounded,
    /// A worker holds no more waiters and delivered tokens than requests in flight,
    /// and no more callouts than are outstanding.
    WorkerStateBounded,
    /// No log line holds a secret or a token.
    NoSecretInLogs,
}

#[derive(Debug)]
struct Violation {
    invariant: Invariant,
    detail: String,
    /// The key whose trace explains it.
    key: Option<String>,
    /// Print its trace from this moment on (else its last lines).
    since_ms: Option<u64>,
}

// --- The models of the services --------------------------------------------------------

/// What the models know of every token they issued.
#[derive(Debug, Clone)]
struct Issued {
    key: TokenKey,
    expires_at_ms: u64,
    /// How long it lives from its issue (the models answer at once, so a gateway counts
    /// the same lifetime from its send).
    lifetime_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CompanionState {
    Up,
    /// Crashed or restarting: connections refused until then.
    Down {
        until_ms: u64,
    },
    /// SIGSTOP: requests queue until then.
    Frozen {
        until_ms: u64,
    },
}

/// The companion cluster: its lease contract ([`CompanionModel`], with Redis, whose tokens
/// and locks outlive a companion restart) and its faults; what a companion was doing
/// (waiting leases, requests it had not answered) is lost in a restart.
struct Companion {
    state: CompanionState,
    /// Answers to (envoy, callout id).
    model: CompanionModel<(usize, u32)>,
    /// Requests received while frozen: (envoy, callout id, path, body).
    frozen: Vec<(usize, u32, String, Vec<u8>)>,
}

/// One tenant at the Tenant Service and its IdP.
struct Tenant {
    /// The lifetime of the tokens its IdP issues (fixed, as real IdPs: a newer token
    /// always expires later).
    lifetime_secs: u64,
    secret_version: u32,
    /// WhatsApp's static token and its expiry.
    static_token: Option<(String, u64)>,
}

/// An answer to deliver: `None` is no answer (reset, timeout).
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    body: Vec<u8>,
    retry_after_secs: Option<u64>,
}

impl Answer {
    fn json(status: u16, body: serde_json::Value) -> Self {
        Self {
            status,
            body: body.to_string().into_bytes(),
            retry_after_secs: None,
        }
    }

    fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            body: body.as_bytes().to_vec(),
            retry_after_secs: None,
        }
    }

    fn error(status: u16, code: ErrorCode, message: &str) -> Self {
        let body = ErrorBody {
            code,
            message: message.to_owned(),
            tenant_id: None,
            correlation_id: None,
        };
        Self {
            status,
            body: serde_json::to_vec(&body).unwrap_or_default(),
            retry_after_secs: None,
        }
    }

    fn result(self) -> CalloutResult {
        CalloutResult::Response {
            status: self.status,
            body: SecretBytes::new(self.body),
            retry_after_secs: self.retry_after_secs,
        }
    }
}

const CONNECTION_REFUSED: &str = "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: Connection refused";
const CONNECTION_RESET: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";

// --- The simulated cluster -------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheKind {
    Slots,
    Lru,
}

#[derive(Debug)]
enum Event {
    Arrive,
    Tick {
        envoy: usize,
        worker: usize,
        generation: u64,
    },
    Wake {
        envoy: usize,
        worker: usize,
    },
    /// The callout reaches its service, which acts on it.
    Serve {
        envoy: usize,
        id: u32,
    },
    Answer {
        envoy: usize,
        id: u32,
        answer: Option<Answer>,
    },
    Timeout {
        envoy: usize,
        id: u32,
    },
    Upstream {
        envoy: usize,
        context: u32,
    },
    ClientLeaves {
        envoy: usize,
        context: u32,
    },
    Deadline {
        envoy: usize,
        context: u32,
    },
    /// The companion's own timers: lock expiry, lease wait budget, thaw, restart.
    CompanionTimer,
}

struct WorkerRig {
    worker: Worker,
    host: FakeHost,
    tick_period_ms: u64,
    tick_generation: u64,
}

struct EnvoyRig {
    fake: FakeEnvoy,
    workers: Vec<WorkerRig>,
    /// Per key, the latest purge at this Envoy: (the step its token last arrived at,
    /// the step of the purge). Every token of the key that arrived no later is dead.
    purged: HashMap<TokenKey, (u64, u64)>,
    /// Tokens that reached this Envoy in a callout answer: token -> the latest step.
    arrived: HashMap<String, u64>,
    /// Per key, the token this Envoy served that reached it last, and that step.
    latest_served: HashMap<TokenKey, (u64, String)>,
}

#[derive(Debug)]
struct Request {
    worker: usize,
    key: TokenKey,
    delivery: Delivery,
    arrived_ms: u64,
    /// Answered (token or error) or gone.
    settled: bool,
    /// The token it was resumed with (inject mode), for the upstream.
    injected: Option<(String, bool)>,
}

#[derive(Debug)]
struct Outstanding {
    worker: usize,
    callout: SentCallout,
    /// The key of a Tenant Service or IdP call (a fetch).
    fetch_of: Option<TokenKey>,
    /// Whether the key's in-flight marker named the sender when it was sent (tier 2
    /// holds; without it, when every slot of the key held another key's live claim,
    /// the fetch runs without tier 2, as `inflight::claim` documents).
    marked: bool,
    sent_ms: u64,
}

/// Totals of a run.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    seeds: u64,
    steps: u64,
    requests: u64,
    tokens_delivered: u64,
    errors_answered: u64,
    purges: u64,
    fetches: u64,
    companion_faults: u64,
    clock_jumps: u64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.seeds += other.seeds;
        self.steps += other.steps;
        self.requests += other.requests;
        self.tokens_delivered += other.tokens_delivered;
        self.errors_answered += other.errors_answered;
        self.purges += other.purges;
        self.fetches += other.fetches;
        self.companion_faults += other.companion_faults;
        self.clock_jumps += other.clock_jumps;
    }
}

struct Sim {
    seed: u64,
    kind: CacheKind,
    max_tenants: u32,
    rng: Rng,
    now_ms: u64,
    step: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    next_event: u64,
    envoys: Vec<EnvoyRig>,
    keys: Vec<TokenKey>,
    tenants: Vec<Tenant>,
    companion: Companion,
    issued: HashMap<String, Issued>,
    next_token: u64,
    revoked: HashSet<String>,
    requests: HashMap<(usize, u32), Request>,
    next_context: u32,
    requests_left: u64,
    /// Requests arrive 0 to this many ms apart (the seed's load).
    arrival_gap_ms: u64,
    outstanding: HashMap<(usize, u32), Outstanding>,
    /// Fetches may overlap per Envoy before this moment (a clock jump expired markers).
    envoy_check_from_ms: u64,
    /// ... and per cluster before this one (companion faults, clock jumps).
    cluster_check_from_ms: u64,
    last_jump_ms: u64,
    /// The token a Tenant Service or IdP answer delivered in this step.
    fetched_now: Option<String>,
    /// Per key: its latest trace lines.
    trace: HashMap<String, VecDeque<(u64, String)>>,
    totals: Totals,
}

/// Trace lines kept per key, and printed when no moment is given.
const TRACE_LINES: usize = 600;
const TRACE_PRINTED: usize = 30;

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let kind = if seed % 2 == 0 {
            CacheKind::Slots
        } else {
            CacheKind::Lru
        };
        let max_tenants = rng.range(2, 6) as u32;
        let tenant_count =
            rng.range(u64::from(max_tenants) * 2, u64::from(max_tenants) * 8) as usize;
        let refresh_percent = rng.range(10, 60);
        let envoy_count = rng.range(2, 3) as usize;
        let worker_count = rng.range(2, 3) as usize;
        let requests_left = rng.range(100, 400);
        let arrival_gap_ms = rng.range(20, 300);
        let envoys = (0..envoy_count)
            .map(|_| {
                let fake = FakeEnvoy::starting_at(START_MS);
                let fake = match kind {
                    CacheKind::Slots => fake,
                    CacheKind::Lru => fake.keeping_records_in(LruRecords::new(max_tenants)),
                };
                let workers = (0..worker_count)
                    .map(|index| WorkerRig {
                        worker: Worker::new(
                            filter_config(max_tenants, refresh_percent),
                            index as u64 + 1,
                            Some(index as u32 + 1),
                        ),
                        host: fake.host(),
                        tick_period_ms: 0,
                        tick_generation: 0,
                    })
                    .collect();
                EnvoyRig {
                    fake,
                    workers,
                    purged: HashMap::new(),
                    arrived: HashMap::new(),
                    latest_served: HashMap::new(),
                }
            })
            .collect();
        let mut keys = Vec::new();
        for tenant in 0..tenant_count {
            let tenant_id = TenantId::parse(&format!("t{tenant}")).expect("a valid tenant id");
            keys.push(TokenKey::new(Provider::genesys(), tenant_id.clone()));
        }
        // A few tenants also use WhatsApp (a static token from the Tenant Service).
        for tenant in 0..tenant_count.div_ceil(4) {
            let tenant_id = TenantId::parse(&format!("t{tenant}")).expect("a valid tenant id");
            keys.push(TokenKey::new(Provider::whatsapp(), tenant_id));
        }
        let tenants = (0..tenant_count)
            .map(|_| Tenant {
                lifetime_secs: rng.range(6, 40),
                secret_version: 1,
                static_token: None,
            })
            .collect();
        let mut sim = Self {
            seed,
            kind,
            max_tenants,
            rng,
            now_ms: START_MS,
            step: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_event: 0,
            envoys,
            keys,
            tenants,
            companion: Companion {
                state: CompanionState::Up,
                model: CompanionModel::new(LOCK_TTL_MS, LEASE_WAIT_MS),
                frozen: Vec::new(),
            },
            issued: HashMap::new(),
            next_token: 0,
            revoked: HashSet::new(),
            requests: HashMap::new(),
            next_context: 0,
            requests_left,
            arrival_gap_ms,
            outstanding: HashMap::new(),
            envoy_check_from_ms: 0,
            cluster_check_from_ms: 0,
            last_jump_ms: 0,
            fetched_now: None,
            trace: HashMap::new(),
            totals: Totals {
                seeds: 1,
                ..Totals::default()
            },
        };
        sim.schedule(0, Event::Arrive);
        sim
    }

    fn schedule(&mut self, after_ms: u64, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.events.insert(id, event);
        self.queue.push(Reverse((self.now_ms + after_ms, id)));
    }

    fn note(&mut self, key: &TokenKey, line: String) {
        let lines = self.trace.entry(key.to_string()).or_default();
        if lines.len() == TRACE_LINES {
            lines.pop_front();
        }
        let line = format!(
            "step {:>6} t=+{:>6}ms {line}",
            self.step,
            self.now_ms - START_MS
        );
        lines.push_back((self.now_ms, line));
    }

    /// Runs to the end, or to the first violation.
    fn run(&mut self) -> Result<Totals, Violation> {
        let drain_until = loop {
            if self.requests_left == 0 {
                break self.now_ms + DRAIN_MS;
            }
            self.step_once()?;
        };
        while self
            .queue
            .peek()
            .is_some_and(|Reverse((at, _))| *at <= drain_until)
        {
            self.step_once()?;
        }
        self.check_settled()?;
        Ok(self.totals)
    }

    fn step_once(&mut self) -> Result<(), Violation> {
        let Some(Reverse((at_ms, id))) = self.queue.pop() else {
            return Ok(());
        };
        let Some(event) = self.events.remove(&id) else {
            return Ok(());
        };
        self.now_ms = self.now_ms.max(at_ms);
        for envoy in &self.envoys {
            envoy.fake.advance_to(self.now_ms);
        }
        self.step += 1;
        self.totals.steps += 1;
        self.fetched_now = None;
        if self.step > MAX_STEPS {
            return Err(Violation {
                invariant: Invariant::NoneLeftWaiting,
                detail: format!(
                    "no end after {MAX_STEPS} steps (a livelock) at +{} ms; workers hold {:?}; next events {:?}",
                    self.now_ms - START_MS,
                    self.envoys
                        .iter()
                        .map(|envoy| envoy
                            .workers
                            .iter()
                            .map(|rig| rig.worker.load())
                            .collect::<Vec<_>>())
                        .collect::<Vec<_>>(),
                    self.events.values().take(6).collect::<Vec<_>>()
                ),
                key: None,
                since_ms: None,
            });
        }
        let touched = self.handle(event)?;
        for (envoy, worker) in touched {
            self.collect(envoy, worker)?;
        }
        self.check_bounds()
    }

    /// Handles one event; returns the workers it called.
    fn handle(&mut self, event: Event) -> Result<Vec<(usize, usize)>, Violation> {
        match event {
            Event::Arrive => self.arrive(),
            Event::Tick {
                envoy,
                worker,
                generation,
            } => {
                let rig = &mut self.envoys[envoy].workers[worker];
                if rig.tick_generation != generation || rig.tick_period_ms == 0 {
                    return Ok(Vec::new());
                }
                rig.worker.on_tick(&mut rig.host);
                let period = rig.tick_period_ms;
                if rig.host.tick_period_ms == period {
                    let jitter = self.rng.range(0, 1);
                    self.schedule(
                        period + jitter,
                        Event::Tick {
                            envoy,
                            worker,
                            generation,
                        },
                    );
                }
                Ok(vec![(envoy, worker)])
            }
            Event::Wake { envoy, worker } => {
                let rig = &mut self.envoys[envoy].workers[worker];
                rig.worker.on_wake(&mut rig.host);
                Ok(vec![(envoy, worker)])
            }
            Event::Serve { envoy, id } => Ok(self.serve(envoy, id)),
            Event::Answer { envoy, id, answer } => Ok(self.answer(envoy, id, answer)),
            Event::Timeout { envoy, id } => Ok(self.answer(envoy, id, None)),
            Event::Upstream { envoy, context } => self.upstream(envoy, context),
            Event::ClientLeaves { envoy, context } => {
                let Some(request) = self.requests.get_mut(&(envoy, context)) else {
                    return Ok(Vec::new());
                };
                if request.settled {
                    return Ok(Vec::new());
                }
                request.settled = true;
                let (worker, key) = (request.worker, request.key.clone());
                let rig = &mut self.envoys[envoy].workers[worker];
                rig.host.gone.insert(context);
                rig.worker.on_request_gone(context);
                self.note(
                    &key,
                    format!("e{envoy}.w{worker} request #{context} leaves"),
                );
                Ok(vec![(envoy, worker)])
            }
            Event::Deadline { envoy, context } => {
                let Some(request) = self.requests.get(&(envoy, context)) else {
                    return Ok(Vec::new());
                };
                if !request.settled && self.last_jump_ms < request.arrived_ms {
                    return Err(Violation {
                        invariant: Invariant::AnsweredWithinDeadline,
                        detail: format!(
                            "request #{context} at e{envoy} for {} waits {} ms",
                            request.key,
                            self.now_ms - request.arrived_ms
                        ),
                        key: Some(request.key.to_string()),
                        since_ms: Some(request.arrived_ms),
                    });
                }
                Ok(Vec::new())
            }
            Event::CompanionTimer => {
                self.companion_timers();
                Ok(Vec::new())
            }
        }
    }

    // --- Requests and faults --------------------------------------------------------

    fn arrive(&mut self) -> Result<Vec<(usize, usize)>, Violation> {
        self.requests_left -= 1;
        if self.requests_left > 0 {
            let gap = self.rng.range(0, self.arrival_gap_ms);
            self.schedule(gap, Event::Arrive);
        }
        self.maybe_fault();
        let envoy = self.rng.index(self.envoys.len());
        let worker = self.rng.index(self.envoys[envoy].workers.len());
        let key = if self.rng.per_mille(150) {
            let whatsapp = self.keys.len() - self.tenants.len();
            self.keys[self.tenants.len() + self.rng.index(whatsapp)].clone()
        } else {
            self.keys[self.rng.zipf(self.tenants.len())].clone()
        };
        let delivery = if self.rng.per_mille(200) {
            Delivery::Respond
        } else {
            Delivery::Inject
        };
        let force_refresh = delivery == Delivery::Respond && self.rng.per_mille(200);
        self.next_context += 1;
        let context = self.next_context;
        self.totals.requests += 1;
        self.requests.insert(
            (envoy, context),
            Request {
                worker,
                key: key.clone(),
                delivery,
                arrived_ms: self.now_ms,
                settled: false,
                injected: None,
            },
        );
        let rig = &mut self.envoys[envoy].workers[worker];
        let ask = TokenAsk {
            context_id: context,
            key: key.clone(),
            delivery,
            force_refresh,
        };
        let decision = rig
            .worker
            .on_request(&mut rig.host, ask, RequestIds::default);
        let mode = match (delivery, force_refresh) {
            (Delivery::Inject, _) => "inject",
            (Delivery::Respond, false) => "endpoint",
            (Delivery::Respond, true) => "endpoint forceRefresh",
        };
        match decision {
            Decision::Cached(token) => {
                let token = token.access_token.expose().to_owned();
                self.note(
                    &key,
                    format!("e{envoy}.w{worker} request #{context} ({mode}): cache hit {token}"),
                );
                self.delivered(envoy, context, &token, true)?;
            }
            Decision::Pause => {
                self.note(
                    &key,
                    format!("e{envoy}.w{worker} request #{context} ({mode}): paused"),
                );
                self.schedule(ANSWER_DEADLINE_MS, Event::Deadline { envoy, context });
                if self.rng.per_mille(30) {
                    let after = self.rng.range(1, 3_000);
                    self.schedule(after, Event::ClientLeaves { envoy, context });
                }
            }
        }
        Ok(vec![(envoy, worker)])
    }

    fn maybe_fault(&mut self) {
        let roll = self.rng.range(0, 9_999);
        match roll {
            0..=14 => {
                let down_ms = self.rng.range(100, 3_000);
                self.crash_companion(down_ms);
            }
            15..=29 if self.companion.state == CompanionState::Up => {
                let frozen_ms = self.rng.range(500, 6_000);
                self.companion.state = CompanionState::Frozen {
                    until_ms: self.now_ms + frozen_ms,
                };
                self.totals.companion_faults += 1;
                self.shadow_cluster(self.now_ms + frozen_ms);
                self.schedule(frozen_ms, Event::CompanionTimer);
            }
            30..=44 => {
                let jump_ms = self.rng.range(1_000, 20_000);
                self.now_ms += jump_ms;
                self.last_jump_ms = self.now_ms;
                self.totals.clock_jumps += 1;
                self.envoy_check_from_ms = self.now_ms + COMPANION_TIMEOUT_MS + FETCH_DEADLINE_MS;
                self.shadow_cluster(self.now_ms);
                for envoy in &self.envoys {
                    envoy.fake.advance_to(self.now_ms);
                }
            }
            45..=1044 => {
                // The IdP revokes a tenant's latest token (or the Tenant Service's
                // static token of WhatsApp is revoked).
                let key = self.keys[self.rng.zipf(self.keys.len())].clone();
                let latest = self
                    .issued
                    .iter()
                    .filter(|(_, issued)| issued.key == key)
                    .max_by_key(|(token, issued)| (issued.expires_at_ms, (*token).clone()))
                    .map(|(token, _)| token.clone());
                if let Some(token) = latest {
                    self.note(&key, format!("IdP revokes {token}"));
                    self.revoked.insert(token);
                }
            }
            1045..=1094 => {
                // A secret rotation: the old secret stops working and every token
                // issued with it is revoked.
                let tenant = self.rng.zipf(self.tenants.len());
                self.tenants[tenant].secret_version += 1;
                self.tenants[tenant].static_token = None;
                let revoked: Vec<String> = self
                    .issued
                    .iter()
                    .filter(|(_, issued)| issued.key.tenant_id.as_str() == format!("t{tenant}"))
                    .map(|(token, _)| token.clone())
                    .collect();
                let key = self.keys[tenant].clone();
                self.note(
                    &key,
                    format!(
                        "secret of t{tenant} rotated: {} tokens revoked",
                        revoked.len()
                    ),
                );
                self.revoked.extend(revoked);
            }
            _ => {}
        }
    }

    fn shadow_cluster(&mut self, fault_ends_ms: u64) {
        self.cluster_check_from_ms = self
            .cluster_check_from_ms
            .max(fault_ends_ms + FAULT_SHADOW_MS);
    }

    fn crash_companion(&mut self, down_ms: u64) {
        self.totals.companion_faults += 1;
        self.companion.state = CompanionState::Down {
            until_ms: self.now_ms + down_ms,
        };
        self.shadow_cluster(self.now_ms + down_ms);
        // What it was doing is lost: waiting leases and frozen requests are reset.
        for (envoy, id) in self.companion.model.drop_waiters() {
            self.respond(envoy, id, Some(Answer::text(503, CONNECTION_RESET)));
        }
        let frozen = std::mem::take(&mut self.companion.frozen);
        for (envoy, id, _, _) in frozen {
            self.respond(envoy, id, Some(Answer::text(503, CONNECTION_RESET)));
        }
        self.schedule(down_ms, Event::CompanionTimer);
    }

    /// A token (or an error) reached request `context`.
    fn delivered(
        &mut self,
        envoy: usize,
        context: u32,
        token: &str,
        from_cache_hit: bool,
    ) -> Result<(), Violation> {
        let Some(request) = self.requests.get_mut(&(envoy, context)) else {
            return Ok(());
        };
        request.settled = true;
        let key = request.key.clone();
        let inject = request.delivery == Delivery::Inject;
        if inject {
            request.injected = Some((token.to_owned(), from_cache_hit));
        }
        self.totals.tokens_delivered += 1;
        let violation = |invariant, detail: String| Violation {
            invariant,
            detail,
            key: Some(key.to_string()),
            since_ms: None,
        };
        let Some(issued) = self.issued.get(token) else {
            return Err(violation(
                Invariant::NeverAnotherKeysToken,
                format!("request #{context} for {key} got {token}, which no model issued"),
            ));
        };
        if issued.key != key {
            return Err(violation(
                Invariant::NeverAnotherKeysToken,
                format!("request #{context} for {key} got {token} of {}", issued.key),
            ));
        }
        // A token fetched just now is handed to its waiters whatever its lifetime; it
        // must still not be expired. A cached one is served until its expiry minus the
        // margin fitted to its lifetime: `expiryMarginMs`, at most a quarter of it.
        let margin_ms = if self.fetched_now.as_deref() == Some(token) {
            0
        } else {
            EXPIRY_MARGIN_MS.min(issued.lifetime_ms / 4)
        };
        if self.now_ms + margin_ms >= issued.expires_at_ms {
            return Err(violation(
                Invariant::NeverPastExpiryMinusMargin,
                format!(
                    "request #{context} got {token}, which expires in {} ms",
                    issued.expires_at_ms as i64 - self.now_ms as i64
                ),
            ));
        }
        let rig = &self.envoys[envoy];
        if let Some((dead_through, purged_at)) = rig.purged.get(&key) {
            let arrived = rig.arrived.get(token).copied().unwrap_or(0);
            if arrived <= *dead_through {
                return Err(violation(
                    Invariant::NeverAPurgedToken,
                    format!(
                        "e{envoy} served {token} (received at step {arrived}) to request #{context} after purging a token of {key} received at step {dead_through} (purge at step {purged_at})"
                    ),
                ));
            }
        }
        let arrived = rig.arrived.get(token).copied().unwrap_or(0);
        if let Some((latest_arrived, latest)) = rig.latest_served.get(&key) {
            let latest_fresh = self
                .issued
                .get(latest)
                .is_some_and(|issued| issued.expires_at_ms > self.now_ms + EXPIRY_MARGIN_MS);
            if arrived < *latest_arrived && latest_fresh {
                return Err(violation(
                    Invariant::NeverAnOlderToken,
                    format!(
                        "e{envoy} served {token} (received at step {arrived}) to request #{context} after serving the newer {latest} (received at step {latest_arrived})"
                    ),
                ));
            }
        }
        if rig
            .latest_served
            .get(&key)
            .is_none_or(|(latest_arrived, _)| arrived >= *latest_arrived)
        {
            self.envoys[envoy]
                .latest_served
                .insert(key.clone(), (arrived, token.to_owned()));
        }
        if inject {
            let after = self.rng.range(1, 400);
            self.schedule(after, Event::Upstream { envoy, context });
        }
        Ok(())
    }

    /// The upstream answers request `context`: 401 for a revoked token.
    fn upstream(&mut self, envoy: usize, context: u32) -> Result<Vec<(usize, usize)>, Violation> {
        let Some(request) = self.requests.remove(&(envoy, context)) else {
            return Ok(Vec::new());
        };
        let Some((token, from_cache_hit)) = request.injected else {
            return Ok(Vec::new());
        };
        let status = if self.revoked.contains(&token) {
            401
        } else {
            200
        };
        let worker = request.worker;
        let rig = &mut self.envoys[envoy].workers[worker];
        let purges = rig.host.stat(Metric::Purge);
        let injected = from_cache_hit.then(|| {
            let expires_at_ms = self
                .issued
                .get(&token)
                .map_or(0, |issued| issued.expires_at_ms);
            (
                request.key.clone(),
                CachedToken {
                    access_token: token.as_str().into(),
                    expires_at_ms,
                },
            )
        });
        rig.worker
            .on_upstream_status(&mut rig.host, context, injected, status);
        rig.worker.on_request_gone(context);
        if rig.host.stat(Metric::Purge) > purges {
            self.totals.purges += 1;
            let rig = &mut self.envoys[envoy];
            let arrived = rig.arrived.get(&token).copied().unwrap_or(0);
            let dead_through = rig.purged.get(&request.key).map_or(0, |(dead, _)| *dead);
            rig.purged
                .insert(request.key.clone(), (arrived.max(dead_through), self.step));
            self.note(
                &request.key,
                format!(
                    "e{envoy}.w{worker} upstream answers 401 to request #{context}: {token} purged"
                ),
            );
        } else if status == 401 {
            self.note(
                &request.key,
                format!("e{envoy}.w{worker} upstream answers 401 to request #{context} ({token}): purge suppressed"),
            );
        }
        Ok(vec![(envoy, worker)])
    }

    // --- Callouts -------------------------------------------------------------------

    /// Takes what worker `worker` of `envoy` did: callouts sent, requests resumed or
    /// answered, log lines, its timer and the workers it woke; checks them.
    fn collect(&mut self, envoy: usize, worker: usize) -> Result<(), Violation> {
        let rig = &mut self.envoys[envoy].workers[worker];
        let sent = rig.host.take_sent();
        let resumed = std::mem::take(&mut rig.host.resumed);
        let replies = std::mem::take(&mut rig.host.replies);
        let logs = std::mem::take(&mut rig.host.logs);
        if rig.host.tick_period_ms != rig.tick_period_ms {
            rig.tick_period_ms = rig.host.tick_period_ms;
            rig.tick_generation += 1;
            if rig.tick_period_ms > 0 {
                let (period, generation) = (rig.tick_period_ms, rig.tick_generation);
                self.schedule(
                    period,
                    Event::Tick {
                        envoy,
                        worker,
                        generation,
                    },
                );
            }
        }
        for (_, line) in &logs {
            if line.contains(TOKEN_MARK) || line.contains(SECRET_MARK) {
                return Err(Violation {
                    invariant: Invariant::NoSecretInLogs,
                    detail: format!("e{envoy}.w{worker} logged: {line}"),
                    key: None,
                    since_ms: None,
                });
            }
        }
        for queue in self.envoys[envoy].fake.take_woken() {
            let after = self.rng.range(0, 2);
            self.schedule(
                after,
                Event::Wake {
                    envoy,
                    worker: queue as usize - 1,
                },
            );
        }
        for callout in sent {
            self.dispatch(envoy, worker, callout)?;
        }
        let mut resumed_key = None;
        let mut resumed_contexts = Vec::new();
        for resume in &resumed {
            let token = resume
                .value
                .strip_prefix("Bearer ")
                .unwrap_or(&resume.value)
                .to_owned();
            if let Some(request) = self.requests.get(&(envoy, resume.context_id)) {
                resumed_key = Some((request.key.clone(), token));
            }
            resumed_contexts.push(format!("#{}", resume.context_id));
        }
        if let Some((key, token)) = resumed_key {
            let contexts = resumed_contexts.join(",");
            self.note(
                &key,
                format!("e{envoy}.w{worker} requests {contexts} resumed with {token}"),
            );
        }
        for resume in resumed {
            let token = resume
                .value
                .strip_prefix("Bearer ")
                .unwrap_or(&resume.value);
            self.delivered(envoy, resume.context_id, token, false)?;
        }
        for reply in replies {
            let context = reply.context_id;
            let Some(request) = self.requests.get(&(envoy, context)) else {
                continue;
            };
            let key = request.key.clone();
            if reply.status == 200 {
                let token = reply.body["accessToken"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                self.note(
                    &key,
                    format!("e{envoy}.w{worker} request #{context} answered {token}"),
                );
                self.delivered(envoy, context, &token, false)?;
            } else {
                let code = reply.body["code"].as_str().unwrap_or("?").to_owned();
                self.note(
                    &key,
                    format!(
                        "e{envoy}.w{worker} request #{context} answered {} {code}",
                        reply.status
                    ),
                );
                self.totals.errors_answered += 1;
                if let Some(request) = self.requests.get_mut(&(envoy, context)) {
                    request.settled = true;
                }
            }
            if self
                .requests
                .get(&(envoy, context))
                .is_some_and(|r| r.delivery == Delivery::Respond)
            {
                self.requests.remove(&(envoy, context));
                let rig = &mut self.envoys[envoy].workers[worker];
                rig.worker.on_request_gone(context);
            }
        }
        Ok(())
    }

    fn dispatch(
        &mut self,
        envoy: usize,
        worker: usize,
        callout: SentCallout,
    ) -> Result<(), Violation> {
        let fetch_of = match callout.cluster.as_str() {
            TENANT_SERVICE => tenant_service_key(&callout.path),
            LOGIN => self.login_key(&callout),
            _ => None,
        };
        let id = callout.id;
        let what = describe_callout(&callout);
        let marked = fetch_of
            .as_ref()
            .is_some_and(|key| self.marked_by(envoy, worker, key));
        if let Some(key) = &fetch_of {
            self.totals.fetches += 1;
            let unmarked = if marked { "" } else { " without a marker" };
            self.note(
                key,
                format!("e{envoy}.w{worker} sends {what} (#{id}){unmarked}"),
            );
            if marked {
                self.check_one_fetch(envoy, key)?;
            }
        } else if let Some(key) = companion_key(&callout) {
            self.note(&key, format!("e{envoy}.w{worker} sends {what} (#{id})"));
        }
        let timeout_ms = callout.timeout_ms;
        self.outstanding.insert(
            (envoy, id),
            Outstanding {
                worker,
                callout,
                fetch_of,
                marked,
                sent_ms: self.now_ms,
            },
        );
        let latency = self.rng.range(1, 80);
        self.schedule(latency, Event::Serve { envoy, id });
        self.schedule(timeout_ms, Event::Timeout { envoy, id });
        Ok(())
    }

    fn check_one_fetch(&self, envoy: usize, key: &TokenKey) -> Result<(), Violation> {
        for ((other_envoy, other_id), other) in &self.outstanding {
            if other.fetch_of.as_ref() != Some(key) || !other.marked {
                continue;
            }
            let (invariant, from_ms) = if *other_envoy == envoy {
                (Invariant::OneFetchPerKeyPerEnvoy, self.envoy_check_from_ms)
            } else {
                (
                    Invariant::OneFetchPerKeyPerCluster,
                    self.cluster_check_from_ms,
                )
            };
            if other.sent_ms >= from_ms && self.now_ms >= from_ms {
                return Err(Violation {
                    invariant,
                    detail: format!(
                        "e{envoy} starts a fetch call for {key} while e{other_envoy}.w{}'s #{other_id} (sent at +{} ms) is outstanding",
                        other.worker,
                        other.sent_ms - START_MS
                    ),
                    key: Some(key.to_string()),
                    since_ms: None,
                });
            }
        }
        Ok(())
    }

    /// Whether `key`'s in-flight marker at `envoy` names `worker` as its owner.
    fn marked_by(&self, envoy: usize, worker: usize, key: &TokenKey) -> bool {
        let rig = &self.envoys[envoy].workers[worker];
        rig.worker
            .config()
            .slots()
            .find(&rig.host, Table::Markers, key)
            .and_then(|found| Marker::decode(&found.record))
            .is_some_and(|marker| marker.owner == worker as u64 + 1)
    }

    /// The key of a login call: its tenant, by client id.
    fn login_key(&self, callout: &SentCallout) -> Option<TokenKey> {
        let basic = callout.header("authorization")?.strip_prefix("Basic ")?;
        let (tenant, _) = self.login_client(basic)?;
        Some(self.keys[tenant].clone())
    }

    /// The tenant and secret version a login call's `Basic` credentials name.
    fn login_client(&self, basic: &str) -> Option<(usize, u32)> {
        let decoded = base64_decode(basic)?;
        let (client_id, secret) = decoded.split_once(':')?;
        let tenant: usize = client_id.strip_prefix("id-t")?.parse().ok()?;
        let version: u32 = secret.rsplit('~').next()?.strip_prefix('v')?.parse().ok()?;
        (tenant < self.tenants.len()).then_some((tenant, version))
    }

    /// Schedules the answer to callout `id` of `envoy` after the service's latency.
    fn respond(&mut self, envoy: usize, id: u32, answer: Option<Answer>) {
        let latency = self.rng.range(0, 80);
        self.schedule(latency, Event::Answer { envoy, id, answer });
    }

    /// Delivers an answer (or, `None`, its absence) to the worker that sent the
    /// callout, if it still waits for it.
    fn answer(&mut self, envoy: usize, id: u32, answer: Option<Answer>) -> Vec<(usize, usize)> {
        let Some(outstanding) = self.outstanding.remove(&(envoy, id)) else {
            return Vec::new();
        };
        let worker = outstanding.worker;
        let key = outstanding
            .fetch_of
            .clone()
            .or_else(|| companion_key(&outstanding.callout));
        if let Some(key) = &key {
            let text = match &answer {
                Some(answer) => format!("{} {}", answer.status, summarize(&answer.body)),
                None => "no answer".to_owned(),
            };
            self.note(key, format!("e{envoy}.w{worker} gets #{id}: {text}"));
        }
        if let Some(answer) = &answer {
            if let Some(token) = token_in(&answer.body) {
                self.envoys[envoy].arrived.insert(token.clone(), self.step);
                if outstanding.fetch_of.is_some() {
                    self.fetched_now = Some(token);
                }
            }
        }
        let result = answer.map_or(CalloutResult::NoResponse, Answer::result);
        let rig = &mut self.envoys[envoy].workers[worker];
        rig.worker.on_callout_response(&mut rig.host, id, result);
        vec![(envoy, worker)]
    }

    /// A callout reaches its service; returns the workers it called (the IdP answers
    /// at once).
    fn serve(&mut self, envoy: usize, id: u32) -> Vec<(usize, usize)> {
        let Some(outstanding) = self.outstanding.get(&(envoy, id)) else {
            // Timed out before it arrived: the service never sees it.
            return Vec::new();
        };
        let callout = outstanding.callout.clone();
        match callout.cluster.as_str() {
            COMPANION => self.companion_receives(envoy, id, callout.path, callout.body),
            TENANT_SERVICE => {
                let answer = self.tenant_service(&callout);
                self.respond(envoy, id, answer);
            }
            LOGIN => {
                // The IdP answers at once: a token's lifetime starts when the worker
                // reads it (see the report: counting from the send is core's change).
                let answer = self.idp(&callout);
                return self.answer(envoy, id, answer);
            }
            _ => self.respond(envoy, id, Some(Answer::text(404, "no such cluster"))),
        }
        Vec::new()
    }

    fn tenant_service(&mut self, callout: &SentCallout) -> Option<Answer> {
        let key = tenant_service_key(&callout.path)?;
        let tenant: usize = key.tenant_id.as_str().strip_prefix('t')?.parse().ok()?;
        let roll = self.rng.range(0, 999);
        match roll {
            0..=29 => return Some(Answer::text(503, "unavailable")),
            30..=44 => {
                let mut answer = Answer::text(429, "slow down");
                answer.retry_after_secs = Some(self.rng.range(0, 1));
                return Some(answer);
            }
            45..=54 => return Some(Answer::text(401, "who are you")),
            55..=69 => return Some(Answer::text(200, "<html>maintenance</html>")),
            70..=89 => return None,
            _ => {}
        }
        if key.provider == Provider::whatsapp() {
            let now_ms = self.now_ms;
            let stale = self.tenants[tenant]
                .static_token
                .as_ref()
                .is_none_or(|(_, expires_at_ms)| *expires_at_ms < now_ms + 20_000);
            if stale {
                let expires_at_ms = now_ms + 25_000 + self.tenants[tenant].lifetime_secs * 1_000;
                let token = self.issue(&key, expires_at_ms);
                self.tenants[tenant].static_token = Some((token, expires_at_ms));
            }
            let (token, expires_at_ms) = self.tenants[tenant].static_token.clone()?;
            return Some(Answer::json(
                200,
                json!({"accessToken": token, "expiresAt": expires_at_ms}),
            ));
        }
        let version = self.tenants[tenant].secret_version;
        Some(Answer::json(
            200,
            json!({
                "clientId": format!("id-t{tenant}"),
                "clientSecret": format!("{SECRET_MARK}t{tenant}~v{version}"),
                "region": "eu-west-1",
            }),
        ))
    }

    fn idp(&mut self, callout: &SentCallout) -> Option<Answer> {
        let basic = callout.header("authorization")?.strip_prefix("Basic ")?;
        let Some((tenant, version)) = self.login_client(basic) else {
            return Some(Answer::json(401, json!({"error": "invalid_client"})));
        };
        if version != self.tenants[tenant].secret_version {
            return Some(Answer::json(401, json!({"error": "invalid_client"})));
        }
        let roll = self.rng.range(0, 999);
        match roll {
            0..=29 => return Some(Answer::text(503, "unavailable")),
            30..=44 => {
                let mut answer = Answer::json(429, json!({"error": "rate limited"}));
                answer.retry_after_secs = Some(self.rng.range(0, 1));
                return Some(answer);
            }
            45..=59 => return Some(Answer::json(200, json!({"token_type": "bearer"}))),
            60..=79 => return None,
            _ => {}
        }
        let lifetime_secs = self.tenants[tenant].lifetime_secs;
        let key = self.keys[tenant].clone();
        let token = self.issue(&key, self.now_ms + lifetime_secs * 1_000);
        Some(Answer::json(
            200,
            json!({
                "access_token": token,
                "token_type": "bearer",
                "expires_in": lifetime_secs,
            }),
        ))
    }

    fn issue(&mut self, key: &TokenKey, expires_at_ms: u64) -> String {
        self.next_token += 1;
        let token = format!(
            "{TOKEN_MARK}{}~{}~{}",
            key.provider, key.tenant_id, self.next_token
        );
        let lifetime_ms = expires_at_ms.saturating_sub(self.now_ms);
        self.issued.insert(
            token.clone(),
            Issued {
                key: key.clone(),
                expires_at_ms,
                lifetime_ms,
            },
        );
        token
    }

    // --- The companion model ----------------------------------------------------------

    fn companion_receives(&mut self, envoy: usize, id: u32, path: String, body: Vec<u8>) {
        match self.companion.state {
            CompanionState::Down { .. } => {
                self.respond(envoy, id, Some(Answer::text(503, CONNECTION_REFUSED)));
                return;
            }
            CompanionState::Frozen { .. } => {
                self.companion.frozen.push((envoy, id, path, body));
                return;
            }
            CompanionState::Up => {}
        }
        if self.rng.per_mille(10) {
            self.totals.companion_faults += 1;
            self.shadow_cluster(self.now_ms);
            self.respond(envoy, id, Some(Answer::text(500, "internal error")));
            return;
        }
        // A restart while this request is being handled: lost, the connection reset.
        if self.rng.per_mille(3) {
            let down_ms = self.rng.range(100, 1_500);
            self.crash_companion(down_ms);
            self.respond(envoy, id, Some(Answer::text(503, CONNECTION_RESET)));
            return;
        }
        self.companion_handles(envoy, id, &path, &body);
    }

    fn companion_handles(&mut self, envoy: usize, id: u32, path: &str, body: &[u8]) {
        let effects = self
            .companion
            .model
            .handle(self.now_ms, (envoy, id), path, body);
        self.apply(effects);
    }

    /// Does what the companion model says, in its order.
    fn apply(&mut self, effects: Vec<Effect<(usize, u32)>>) {
        for effect in effects {
            match effect {
                Effect::Answer((envoy, id), reply) => {
                    self.respond(envoy, id, Some(companion_answer(reply)));
                }
                Effect::Timer { after_ms } => self.schedule(after_ms, Event::CompanionTimer),
            }
        }
    }

    fn companion_timers(&mut self) {
        let now_ms = self.now_ms;
        match self.companion.state {
            CompanionState::Down { until_ms } if until_ms <= now_ms => {
                self.companion.state = CompanionState::Up;
            }
            CompanionState::Frozen { until_ms } if until_ms <= now_ms => {
                self.companion.state = CompanionState::Up;
                for (envoy, id, path, body) in std::mem::take(&mut self.companion.frozen) {
                    self.companion_handles(envoy, id, &path, &body);
                }
            }
            _ => {}
        }
        self.companion.model.expire_locks(now_ms);
        if self.companion.state == CompanionState::Up {
            let effects = self.companion.model.wake(now_ms);
            self.apply(effects);
        }
    }

    // --- Checks -----------------------------------------------------------------------

    fn check_bounds(&mut self) -> Result<(), Violation> {
        let max = self.max_tenants as usize;
        for (index, envoy) in self.envoys.iter().enumerate() {
            let over = match self.kind {
                CacheKind::Slots => {
                    let len = envoy.fake.shared_len();
                    (len > 3 * max).then(|| format!("e{index} holds {len} shared-data keys"))
                }
                CacheKind::Lru => [Table::Tokens, Table::Markers, Table::Purges]
                    .into_iter()
                    .find_map(|table| {
                        let len = envoy.fake.keyed_len(table).unwrap_or(0);
                        (len > max).then(|| format!("e{index} holds {len} records in {table:?}"))
                    }),
            };
            if let Some(detail) = over {
                return Err(Violation {
                    invariant: Invariant::SharedDataBounded,
                    detail,
                    key: None,
                    since_ms: None,
                });
            }
            for (worker_index, rig) in envoy.workers.iter().enumerate() {
                let load = rig.worker.load();
                let in_flight = self
                    .requests
                    .iter()
                    .filter(|((at, _), request)| *at == index && request.worker == worker_index)
                    .count();
                let callouts = self
                    .outstanding
                    .iter()
                    .filter(|((at, _), outstanding)| {
                        *at == index && outstanding.worker == worker_index
                    })
                    .count();
                if load.waiters > in_flight
                    || load.delivered > in_flight
                    || load.callouts > callouts
                {
                    return Err(Violation {
                        invariant: Invariant::WorkerStateBounded,
                        detail: format!(
                            "e{index}.w{worker_index} holds {load:?} with {in_flight} requests and {callouts} callouts in flight"
                        ),
                        key: None,
                        since_ms: None,
                    });
                }
            }
        }
        Ok(())
    }

    fn check_settled(&self) -> Result<(), Violation> {
        if let Some(((envoy, context), request)) =
            self.requests.iter().find(|(_, request)| !request.settled)
        {
            return Err(Violation {
                invariant: Invariant::NoneLeftWaiting,
                detail: format!(
                    "request #{context} at e{envoy} for {} never answered",
                    request.key
                ),
                key: Some(request.key.to_string()),
                since_ms: None,
            });
        }
        for (index, envoy) in self.envoys.iter().enumerate() {
            for (worker_index, rig) in envoy.workers.iter().enumerate() {
                let load = rig.worker.load();
                if load != Default::default() {
                    return Err(Violation {
                        invariant: Invariant::NoneLeftWaiting,
                        detail: format!("e{index}.w{worker_index} still holds {load:?} at the end"),
                        key: None,
                        since_ms: None,
                    });
                }
            }
        }
        Ok(())
    }

    fn report(&self, violation: &Violation) -> String {
        let mut text = format!(
            "simulation seed {} ({:?} cache, maxTenants {}, {} Envoys x {} workers) broke {:?} at step {}:\n  {}\nreplay: SIM_SEED={} cargo test -p tokengate-plugin --test simulation -- --nocapture\n",
            self.seed,
            self.kind,
            self.max_tenants,
            self.envoys.len(),
            self.envoys[0].workers.len(),
            violation.invariant,
            self.step,
            violation.detail,
            self.seed,
        );
        if let Some(lines) = violation.key.as_ref().and_then(|key| self.trace.get(key)) {
            text.push_str(&format!(
                "trace of {}:\n",
                violation.key.as_deref().unwrap_or("")
            ));
            let shown: Vec<&String> = match violation.since_ms {
                Some(since_ms) => lines
                    .iter()
                    .filter(|(at_ms, _)| *at_ms >= since_ms)
                    .map(|(_, line)| line)
                    .collect(),
                None => lines
                    .iter()
                    .skip(lines.len().saturating_sub(TRACE_PRINTED))
                    .map(|(_, line)| line)
                    .collect(),
            };
            for line in shown {
                text.push_str("  ");
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

// --- Reading callouts ------------------------------------------------------------------

/// The companion's answer on the wire.
fn companion_answer(reply: Reply) -> Answer {
    match reply {
        Reply::Hit {
            access_token,
            expires_at_ms,
        } => Answer::json(
            200,
            json!({ "outcome": "hit", "accessToken": access_token, "expiresAtMs": expires_at_ms }),
        ),
        Reply::Fetch {
            lease_id,
            lease_ttl_ms,
        } => Answer::json(
            200,
            json!({ "outcome": "fetch", "leaseId": lease_id, "leaseTtlMs": lease_ttl_ms }),
        ),
        Reply::LockBusy => Answer::error(
            503,
            ErrorCode::LockAcquisitionFailed,
            "another instance holds the fetch lock",
        ),
        Reply::Done => Answer::text(204, ""),
        Reply::BadRequest => Answer::error(400, ErrorCode::InvalidRequest, "bad request"),
        Reply::NotFound => Answer::error(404, ErrorCode::NotFound, "no such route"),
    }
}

fn tenant_service_key(path: &str) -> Option<TokenKey> {
    let mut parts = path.trim_start_matches('/').split('/');
    let (Some("tenants"), Some(tenant), Some("credentials"), Some(provider)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let provider = provider.split('?').next()?;
    Some(TokenKey::new(
        Provider::parse(provider).ok()?,
        TenantId::parse(tenant).ok()?,
    ))
}

fn companion_key(callout: &SentCallout) -> Option<TokenKey> {
    if callout.cluster != COMPANION {
        return None;
    }
    let body = callout.json();
    Some(TokenKey::new(
        Provider::parse(body["provider"].as_str()?).ok()?,
        TenantId::parse(body["tenantId"].as_str()?).ok()?,
    ))
}

fn describe_callout(callout: &SentCallout) -> String {
    let body = callout.json();
    let mut text = format!("{} {}", callout.cluster, callout.path);
    for field in ["forceRefresh", "minExpiresAtMs", "leaseId", "accessToken"] {
        if let Some(value) = body.get(field) {
            text.push_str(&format!(" {field}={value}"));
        }
    }
    text
}

/// An answer's body, short.
fn summarize(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut text: String = text.chars().take(120).collect();
    if text.is_empty() {
        text.push_str("(empty)");
    }
    text
}

/// The token a service's answer carries, if any.
fn token_in(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    ["accessToken", "access_token"]
        .iter()
        .find_map(|field| value[field].as_str().map(str::to_owned))
}

fn base64_decode(text: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for byte in text.bytes().filter(|byte| *byte != b'=') {
        let value = ALPHABET.iter().position(|c| *c == byte)? as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    String::from_utf8(out).ok()
}

// --- Runs ------------------------------------------------------------------------------

fn run_seed(seed: u64) -> Result<Totals, String> {
    let mut sim = Sim::new(seed);
    sim.run().map_err(|violation| sim.report(&violation))
}

/// Runs `seeds`, stopping at the first failure.
fn run_seeds(seeds: impl Iterator<Item = u64>) -> Result<Totals, String> {
    let mut totals = Totals::default();
    for seed in seeds {
        totals.add(&run_seed(seed)?);
    }
    Ok(totals)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
}

/// The seeds `scripts/test` runs every time (`SIM_SEEDS` sets fewer or more:
/// `scripts/mutants` runs fewer per mutant).
const FIXED_SEEDS: u64 = 200;

#[test]
fn a_fixed_budget_of_seeds_keeps_every_invariant() {
    let started = Instant::now();
    let outcome = match env_u64("SIM_SEED") {
        Some(seed) => run_seeds(seed..=seed),
        None => run_seeds(1..=env_u64("SIM_SEEDS").unwrap_or(FIXED_SEEDS)),
    };
    match outcome {
        Ok(totals) => println!("simulation: {totals:?} in {:?}", started.elapsed()),
        Err(report) => panic!("{report}"),
    }
}

/// Seeds that broke an invariant before the fixes they are named for, kept as
/// regression tests (each fails again if its fix is undone).
const REGRESSION_SEEDS: [(u64, &str); 6] = [
    // Slots::put wrote a key's new token to a freed earlier slot and left the older
    // one in a later slot; a purge cleared the newer, and the older was served again.
    (
        766,
        "the slot resurrection: an older token served after the newer one's purge",
    ),
    (
        1256,
        "a purged token served again from a second slot of its key",
    ),
    (
        472,
        "an older token served from a later slot after a newer one was cached",
    ),
    // inflight: a worker took its own live claim of another key for spent, or
    // released a claim another worker made since.
    (8, "two workers of one Envoy fetching one key at once"),
    (98, "two workers of one Envoy fetching one key at once"),
    (
        391,
        "two workers of one Envoy fetching one key at once (LRU records)",
    ),
];

#[test]
fn seeds_that_once_failed_keep_every_invariant() {
    for (seed, what) in REGRESSION_SEEDS {
        if let Err(report) = run_seed(seed) {
            panic!("regression ({what}):\n{report}");
        }
    }
}

#[test]
#[ignore = "a measurement: scripts/sim runs it"]
fn soak() {
    let minutes = env_u64("SIM_MINUTES").unwrap_or(1);
    let first = env_u64("SIM_FIRST_SEED").unwrap_or(1_000_000);
    let started = Instant::now();
    let budget = std::time::Duration::from_secs(minutes * 60);
    let mut totals = [Totals::default(), Totals::default()];
    let mut seed = first;
    // SIM_KEEP_GOING=1: a survey, one line per failing seed.
    let keep_going = std::env::var_os("SIM_KEEP_GOING").is_some();
    let mut failures = 0u64;
    while started.elapsed() < budget && env_u64("SIM_LAST_SEED").is_none_or(|last| seed <= last) {
        match run_seed(seed) {
            Ok(run) => totals[(seed % 2) as usize].add(&run),
            Err(report) if keep_going => {
                failures += 1;
                println!("{}", report.lines().take(2).collect::<Vec<_>>().join(" "));
            }
            Err(report) => panic!("{report}"),
        }
        seed += 1;
    }
    for (kind, totals) in ["slots", "lru"].iter().zip(totals) {
        println!(
            "soak {kind}: seeds={} steps={} requests={} tokens={} errors={} purges={} fetch_calls={} companion_faults={} clock_jumps={} violations=0",
            totals.seeds,
            totals.steps,
            totals.requests,
            totals.tokens_delivered,
            totals.errors_answered,
            totals.purges,
            totals.fetches,
            totals.companion_faults,
            totals.clock_jumps,
        );
    }
    println!("soak seeds {first}..{seed} in {:?}", started.elapsed());
    assert_eq!(failures, 0, "failing seeds");
}
