//! The one place that uses the wasm filter's host-agnostic layer (`tokengate::worker`,
//! `tokengate::host`, `tokengate::hits`): `plugin/` is being refactored, and when it
//! changes only this module follows.
//!
//! It drives one [`Worker`] per Envoy worker thread (and filter configuration) from the
//! dynamic-module hooks, through [`DynamicHost`], the `tokengate::host::Host` of this
//! build. Like the wasm glue, it translates and decides nothing:
//!
//! - **Worker per thread**: a `thread_local!` map from configuration generation to a
//!   [`Slot`] (the `Worker`, its live streams). Every hook of a stream runs on the
//!   stream's worker thread, so `RefCell`s suffice.
//! - **Records** (cached tokens, in-flight markers, purge records): the host's keyed
//!   store, [`LruRecords`], one process-wide least-recently-used map per table bounded
//!   by the newest configuration's `cache.maxTenants`. No shared data.
//! - **Callouts** leave from the main thread, like proxy-wasm's root-context callouts
//!   they belong to no request: `dispatch` queues the callout in the configuration's
//!   outbox and commits the configuration scheduler; `on_http_filter_config_scheduled`
//!   (main thread) sends it with `http_filter_config_http_callout` (which Envoy keeps in
//!   an unlocked per-configuration map: main thread only); the answer arrives in
//!   `on_http_filter_config_http_callout_done` (main thread) and goes to the worker's
//!   inbox, with an event on one of its paused streams to hand it over on the worker's
//!   own thread. (A first version carried callouts on the worker's streams: Envoy
//!   cancels a stream's callouts when it ends, and a companion commit carried by a
//!   request that was just resumed was lost, holding the cluster lock to its TTL.)
//! - **Resume / reply**: the worker's `resume_with_header` / `reply_json` record the
//!   delivery on the paused stream and commit an event on that stream's scheduler; the
//!   stream applies it in `on_http_filter_scheduled` (`set_header` +
//!   `continue_decoding`, or `send_response`) on its own hook: no re-entry into another
//!   stream's filter chain from inside a hook.
//! - **Ticks**: no timer exists for HTTP filters. A process-wide ticker thread commits a
//!   tick event on a paused stream of each worker whose period is due (schedulers may be
//!   committed from any thread; the registry lock keeps every commit before the
//!   scheduler's delete). A worker without paused streams ticks, and takes its callout
//!   answers, at the start of its next request instead, before the worker decides that
//!   request (`Slot::catch_up`).
//! - **Wake**: `wake(queue)` commits a wake event on a paused stream of the woken worker
//!   (queue = worker id, unique in the process): cross-worker wake-ups need no polling.
//!
//! - **Configuration updates**: each configuration Envoy loads gets its own workers
//!   (its generation); when Envoy drops one, its slots leave each thread when that
//!   thread makes its next slot. The cache (shared data) outlives configurations.
//!
//! Known limits: background work
//! of a worker without paused requests (a refresh-ahead started by a hit, an invalidate,
//! a lease-end retry) gets its answer on the worker's next request. The end-to-end
//! suite (`TOKENGATE_FILTER=native`) states it where it shows: `tests/tests/refresh.rs`
//! (a refresh-ahead), `tests/tests/faults.rs` (a lost commit sent once more).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokengate::ask::{self, Ask, RequestHeaders, Wanted};
use tokengate::config::{CacheConfig, FilterConfig, Mode};
use tokengate::delivery;
use tokengate::hits::HitTally;
use tokengate::host::{Callout, Host, Level, Metric};
use tokengate::records::LruRecords;
use tokengate::slots::KeyedStore;
use tokengate::worker::{Decision, Delivery, Worker};
use tokengate_core::token_api::TokenSource;
use tokengate_core::{
    CachedToken, CalloutResult, ErrorCode, SecretBytes, SecretString, TokenError, TokenKey,
};

use crate::abi;
use crate::envoy::{self, ConfigScheduler, EnvoyConfig, EnvoyFilter, LogLevel, Scheduler};

/// Scheduled event: apply the delivery recorded on the stream.
const EVENT_DELIVER: u64 = 1;
/// Scheduled event: run the worker's tick.
const EVENT_TICK: u64 = 2;
/// Scheduled event: run the worker's wake-up.
const EVENT_WAKE: u64 = 3;
/// Scheduled event: hand the callout answers in the worker's inbox over.
const EVENT_ANSWER: u64 = 4;
/// Main-thread event: send the callouts in the configuration's outbox.
const EVENT_SEND: u64 = 1;

/// The request header that marks the filter's own answers for Envoy's
/// `local_reply_config` (as in the wasm build).
const REPLY_MARKER_HEADER: &str = "x-tokengate-reply";
/// Largest callout answer handed to the worker (as in the wasm build).
const MAX_CALLOUT_BODY: usize = 64 * 1024;

/// A stream's request headers, for [`ask`] (the same request reading as the wasm build).
struct StreamHeaders(EnvoyFilter);

impl RequestHeaders for StreamHeaders {
    fn get(&self, name: &str) -> Option<String> {
        self.0.request_header(name).map(into_text)
    }

    fn values(&self, name: &str) -> Vec<String> {
        self.0
            .request_header_values(name)
            .into_iter()
            .map(into_text)
            .collect()
    }

    fn route_name(&self) -> Option<String> {
        self.0
            .attribute_string(abi::ATTRIBUTE_XDS_ROUTE_NAME)
            .map(into_text)
    }
}

/// Bytes Envoy handed over as text: kept as they are when UTF-8 (no copy), else with
/// U+FFFD in place of what is not (the tenant id check then refuses them).
fn into_text(raw: Vec<u8>) -> String {
    String::from_utf8(raw)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Locks `mutex`, going on after a panic elsewhere (every critical section here is a
/// single map operation: no half-written state).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------
// Process-wide state
// ---------------------------------------------------------------------------------

/// The gateway cache of all workers (the wasm build keeps it in slots of shared data).
/// Its bound is set by every configuration Envoy loads.
static RECORDS: LazyLock<LruRecords> =
    LazyLock::new(|| LruRecords::new(CacheConfig::default().max_tenants));

/// Per worker (by worker id): its tick period and the schedulers of its paused streams.
#[derive(Debug, Default)]
struct TickEntry {
    period_ms: u64,
    next_ms: u64,
    schedulers: Vec<(u32, Scheduler)>,
}

static TICKS: LazyLock<Mutex<HashMap<u64, TickEntry>>> = LazyLock::new(Default::default);

/// Callout answers by worker id, waiting for their worker's thread.
static INBOX: LazyLock<Mutex<HashMap<u64, Answers>>> = LazyLock::new(Default::default);

/// Callout answers: (the worker's callout id, result).
type Answers = Vec<(u32, CalloutResult)>;
/// How many answers wait in [`INBOX`] (checked without the lock on every request).
static INBOX_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Hands a callout answer to worker `worker_id` (any thread): into its inbox, and an
/// event on one of its paused streams (without one, its next request takes it).
fn post_answer(worker_id: u64, id: u32, result: CalloutResult) {
    lock(&INBOX)
        .entry(worker_id)
        .or_default()
        .push((id, result));
    INBOX_COUNT.fetch_add(1, Ordering::SeqCst);
    let ticks = lock(&TICKS);
    if let Some((_, scheduler)) = ticks
        .get(&worker_id)
        .and_then(|entry| entry.schedulers.first())
    {
        scheduler.commit(EVENT_ANSWER);
    }
}

/// The answers waiting for worker `worker_id`.
fn take_answers(worker_id: u64) -> Vec<(u32, CalloutResult)> {
    if INBOX_COUNT.load(Ordering::SeqCst) == 0 {
        return Vec::new();
    }
    let answers = lock(&INBOX).remove(&worker_id).unwrap_or_default();
    INBOX_COUNT.fetch_sub(answers.len(), Ordering::SeqCst);
    answers
}
static TICKER: Once = Once::new();
/// Worker ids (also their wake queues), unique in the process.
static NEXT_WORKER_ID: AtomicU32 = AtomicU32::new(1);
/// Configuration generations, unique in the process.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);
/// Generations Envoy dropped: their slots are removed from each thread on its next new
/// slot (a configuration is dropped only once its streams are gone).
static DROPPED: LazyLock<Mutex<Vec<u64>>> = LazyLock::new(Default::default);

/// Starts the ticker thread once: it commits tick events on paused streams.
fn start_ticker() {
    TICKER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("tokengate-ticker".to_owned())
            .spawn(|| {
                loop {
                    let sleep_ms = std::panic::catch_unwind(tick_due_workers).unwrap_or(100);
                    std::thread::sleep(Duration::from_millis(sleep_ms));
                }
            });
        if spawned.is_err() {
            envoy::log(
                LogLevel::Error,
                "tokengate: no ticker thread: paused requests only move on new requests",
            );
        }
    });
}

/// Commits a tick on each due worker; returns how long to sleep.
fn tick_due_workers() -> u64 {
    let now = now_ms();
    let mut sleep_ms = 100u64;
    let mut ticks = lock(&TICKS);
    for entry in ticks.values_mut() {
        if entry.period_ms == 0 {
            continue;
        }
        // Without a paused stream the worker ticks on its next request instead.
        let Some((_, scheduler)) = entry.schedulers.first() else {
            continue;
        };
        if now >= entry.next_ms {
            scheduler.commit(EVENT_TICK);
            entry.next_ms = now.saturating_add(entry.period_ms);
        }
        sleep_ms = sleep_ms.min(entry.next_ms.saturating_sub(now));
    }
    sleep_ms.max(5)
}

// ---------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------

/// One `dynamic_modules` filter configuration.
#[derive(Debug)]
pub struct NativeConfig {
    /// The same configuration the wasm filter reads (each worker gets a copy).
    config: FilterConfig,
    /// Identifies this configuration among the ones Envoy loaded.
    generation: u64,
    /// Stat ids by metric.
    metrics: Arc<Vec<(Metric, usize)>>,
    /// Callouts of the workers, sent from the main thread.
    main: Arc<Mutex<Main>>,
}

// The configuration is created on the main thread and read by every worker thread.
const _: () = {
    const fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<NativeConfig>();
};

/// A callout a worker asked for, waiting for the main thread.
#[derive(Debug)]
struct Outgoing {
    worker_id: u64,
    id: u32,
    cluster: String,
    /// Header names and values (values may carry secrets).
    headers: Vec<(String, SecretBytes)>,
    body: SecretBytes,
    timeout_ms: u64,
}

/// The main-thread side of a configuration: the workers' callouts leave from here, as
/// Envoy sends a configuration's callouts through the calling thread and keeps them in
/// an unlocked map (so only the main thread may call it).
#[derive(Debug)]
struct Main {
    envoy: EnvoyConfig,
    /// `None` once Envoy dropped the configuration.
    scheduler: Option<ConfigScheduler>,
    outbox: Vec<Outgoing>,
    /// Envoy's callout id -> (worker, the worker's callout id).
    pending: HashMap<u64, (u64, u32)>,
}

impl NativeConfig {
    /// Parses `bytes` with the wasm filter's parser and defines every stat. The error
    /// is the line for Envoy's log (it names the offending field).
    pub fn new(envoy_config: EnvoyConfig, bytes: &[u8]) -> Result<Self, String> {
        let config = FilterConfig::parse(bytes).map_err(|error| error.to_string())?;
        RECORDS.set_max_records(config.cache.max_tenants);
        let metrics = Metric::all(&config.provider_table)
            .into_iter()
            .filter_map(|(metric, name)| {
                let id = envoy_config.define_counter(&name);
                if id.is_none() {
                    envoy::log(
                        LogLevel::Warn,
                        &format!("tokengate: stat {name} not defined"),
                    );
                }
                id.map(|id| (metric, id))
            })
            .collect();
        Ok(Self {
            config,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            metrics: Arc::new(metrics),
            main: Arc::new(Mutex::new(Main {
                envoy: envoy_config,
                scheduler: Some(envoy_config.new_scheduler()),
                outbox: Vec::new(),
                pending: HashMap::new(),
            })),
        })
    }

    /// Envoy drops the configuration (main thread): no callout leaves any more; the
    /// ones in flight are cancelled by Envoy, so their workers get `NoResponse`.
    pub fn shutdown(&self) {
        let (scheduler, outbox, pending) = {
            let mut main = lock(&self.main);
            (
                main.scheduler.take(),
                std::mem::take(&mut main.outbox),
                std::mem::take(&mut main.pending),
            )
        };
        if let Some(scheduler) = scheduler {
            scheduler.delete();
        }
        lock(&DROPPED).push(self.generation);
        for outgoing in outbox {
            post_answer(outgoing.worker_id, outgoing.id, CalloutResult::NoResponse);
        }
        for (worker_id, id) in pending.into_values() {
            post_answer(worker_id, id, CalloutResult::NoResponse);
        }
    }

    /// Main thread: send the callouts the workers queued.
    pub fn on_main_scheduled(&self, event_id: u64) {
        if event_id != EVENT_SEND {
            return;
        }
        let (envoy, outbox) = {
            let mut main = lock(&self.main);
            (main.envoy, std::mem::take(&mut main.outbox))
        };
        for outgoing in outbox {
            let headers: Vec<(&str, &[u8])> = outgoing
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.expose()))
                .collect();
            match envoy.callout(
                &outgoing.cluster,
                &headers,
                outgoing.body.expose(),
                outgoing.timeout_ms,
            ) {
                Ok(envoy_id) => {
                    lock(&self.main)
                        .pending
                        .insert(envoy_id, (outgoing.worker_id, outgoing.id));
                }
                Err(code) => {
                    envoy::log(
                        LogLevel::Warn,
                        &format!(
                            "tokengate: cluster '{}' refused the call (init result {code})",
                            outgoing.cluster
                        ),
                    );
                    post_answer(outgoing.worker_id, outgoing.id, CalloutResult::NoResponse);
                }
            }
        }
    }

    /// Main thread: a configuration callout ended.
    pub fn on_main_callout_done(&self, envoy_id: u64, answer: Option<RawAnswer<'_>>) {
        let Some((worker_id, id)) = lock(&self.main).pending.remove(&envoy_id) else {
            return;
        };
        post_answer(worker_id, id, callout_result(answer));
    }

    /// A line for the log naming what this configuration does.
    pub fn describe(&self) -> String {
        let config = &self.config;
        let mode = match config.mode {
            Mode::Inject => "inject",
            Mode::Endpoint => "endpoint",
        };
        format!(
            "mode {mode}, provider {}, tenant header '{}'",
            config.provider, config.tenant_header
        )
    }
}

// ---------------------------------------------------------------------------------
// Per worker thread
// ---------------------------------------------------------------------------------

/// What a paused stream is to receive, applied in its own scheduled hook.
#[derive(Debug)]
enum Handover {
    /// Set this header and continue.
    Header(String, SecretString),
    /// Answer with this status and JSON body.
    Reply(u16, SecretBytes),
}

/// A live stream of a worker.
#[derive(Debug)]
struct StreamEntry {
    envoy: EnvoyFilter,
    /// Made when the stream pauses.
    scheduler: Option<Scheduler>,
    /// Paused, waiting on the worker.
    waiting: bool,
    /// Recorded by the worker, applied on `EVENT_DELIVER`.
    pending: Option<Handover>,
}

/// The host side of one worker: everything [`DynamicHost`] touches while the worker
/// itself is borrowed.
#[derive(Debug)]
struct HostState {
    worker_id: u64,
    metrics: Arc<Vec<(Metric, usize)>>,
    streams: RefCell<HashMap<u32, StreamEntry>>,
    /// Where the worker's callouts leave from.
    main: Arc<Mutex<Main>>,
    next_callout: Cell<u32>,
    /// The tick period the worker asked for, and when the next tick is due.
    tick_period_ms: Cell<u64>,
    next_tick_ms: Cell<u64>,
}

/// One worker and its host state.
struct Slot {
    worker: RefCell<Worker>,
    hits: Rc<HitTally>,
    config: Rc<FilterConfig>,
    state: HostState,
    /// Answers that arrived while the worker was busy (re-entry), handed over after.
    deferred: RefCell<Vec<(u32, CalloutResult)>>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("worker_id", &self.state.worker_id)
            .finish_non_exhaustive()
    }
}

thread_local! {
    static SLOTS: RefCell<HashMap<u64, Rc<Slot>>> = RefCell::new(HashMap::new());
    static NEXT_CONTEXT: Cell<u32> = const { Cell::new(1) };
}

impl Slot {
    /// This thread's slot for `config`, made on first use.
    fn for_config(config: &NativeConfig) -> Rc<Slot> {
        SLOTS.with(|slots| {
            let mut slots = slots.borrow_mut();
            if !slots.contains_key(&config.generation) {
                // A new configuration (an xDS update, say): forget the dropped ones.
                let dropped = lock(&DROPPED).clone();
                slots.retain(|generation, slot| {
                    let keep = !dropped.contains(generation);
                    if !keep {
                        lock(&TICKS).remove(&slot.state.worker_id);
                    }
                    keep
                });
            }
            Rc::clone(slots.entry(config.generation).or_insert_with(|| {
                let id = NEXT_WORKER_ID.fetch_add(1, Ordering::Relaxed);
                let worker = Worker::new(config.config.clone(), u64::from(id), Some(id));
                let hits = Rc::clone(worker.hits());
                let filter_config = Rc::clone(worker.config());
                lock(&TICKS).insert(u64::from(id), TickEntry::default());
                Rc::new(Slot {
                    worker: RefCell::new(worker),
                    hits,
                    config: filter_config,
                    state: HostState {
                        worker_id: u64::from(id),
                        metrics: Arc::clone(&config.metrics),
                        streams: RefCell::new(HashMap::new()),
                        main: Arc::clone(&config.main),
                        next_callout: Cell::new(1),
                        tick_period_ms: Cell::new(0),
                        next_tick_ms: Cell::new(0),
                    },
                    deferred: RefCell::new(Vec::new()),
                })
            }))
        })
    }

    /// Runs `call` on the worker with a host whose running stream is `current`; then
    /// hands over answers deferred meanwhile. `None` when the worker is busy (re-entry).
    fn with_worker<T>(
        &self,
        current: Option<u32>,
        call: impl FnOnce(&mut Worker, &mut DynamicHost<'_>) -> T,
    ) -> Option<T> {
        let mut host = DynamicHost {
            state: &self.state,
            current,
        };
        let value = {
            let mut worker = self.worker.try_borrow_mut().ok()?;
            call(&mut worker, &mut host)
        };
        loop {
            let mut answers = std::mem::take(&mut *self.deferred.borrow_mut());
            answers.extend(take_answers(self.state.worker_id));
            if answers.is_empty() {
                break;
            }
            let Ok(mut worker) = self.worker.try_borrow_mut() else {
                self.deferred.borrow_mut().extend(answers);
                break;
            };
            for (id, result) in answers {
                worker.on_callout_response(&mut host, id, result);
            }
        }
        Some(value)
    }

    /// At the start of a request, before the worker decides it: runs the worker's tick
    /// when it is due and no ticker event ran it (no paused stream), and hands over the
    /// callout answers that arrived meanwhile. So the request is decided on what the
    /// worker's background work already brought in (e.g. the token a refresh-ahead
    /// fetched), not on the state before it.
    fn catch_up(&self, current: u32) {
        let period = self.state.tick_period_ms.get();
        if period != 0 && now_ms() >= self.state.next_tick_ms.get() {
            self.with_worker(Some(current), |worker, host| worker.on_tick(host));
        } else if INBOX_COUNT.load(Ordering::SeqCst) > 0 || !self.deferred.borrow().is_empty() {
            // `with_worker` hands the answers over after its call.
            self.with_worker(Some(current), |_, _| ());
        }
    }
}

/// [`Host`] over the dynamic-module callbacks, for one worker, while one of its streams'
/// hooks runs (`current`).
#[derive(Debug)]
pub struct DynamicHost<'a> {
    state: &'a HostState,
    current: Option<u32>,
}

impl DynamicHost<'_> {
    /// The stream whose hook runs, or any live stream of the worker.
    fn some_stream(&self) -> Option<EnvoyFilter> {
        let streams = self.state.streams.borrow();
        self.current
            .and_then(|id| streams.get(&id))
            .or_else(|| streams.values().next())
            .map(|entry| entry.envoy)
    }

    /// Records `delivery` for paused stream `context_id` and schedules it.
    fn deliver(&mut self, context_id: u32, delivery: Handover) -> bool {
        let mut streams = self.state.streams.borrow_mut();
        let Some(entry) = streams.get_mut(&context_id) else {
            return false;
        };
        match entry.scheduler {
            Some(scheduler) => {
                entry.pending = Some(delivery);
                scheduler.commit(EVENT_DELIVER);
                true
            }
            // The stream whose hook runs now, which the worker paused in this very call
            // and whose fetch ended before the hook returned (an answer handed over by
            // `with_worker`): not held yet, so `Stream::ask` applies it on return.
            None if self.current == Some(context_id) => {
                entry.pending = Some(delivery);
                true
            }
            None => false,
        }
    }
}

impl Host for DynamicHost<'_> {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn dispatch(&mut self, callout: Callout<'_>) -> Result<u32, String> {
        let id = self.state.next_callout.get();
        self.state.next_callout.set(id.wrapping_add(1).max(1));
        let mut headers: Vec<(String, SecretBytes)> = vec![
            (
                ":method".to_owned(),
                SecretBytes::new(callout.method.as_bytes().to_vec()),
            ),
            (
                ":path".to_owned(),
                SecretBytes::new(callout.path.as_bytes().to_vec()),
            ),
            (
                "host".to_owned(),
                SecretBytes::new(callout.authority.as_bytes().to_vec()),
            ),
        ];
        headers.extend(callout.headers.iter().map(|(name, value)| {
            (
                (*name).to_owned(),
                SecretBytes::new(value.as_bytes().to_vec()),
            )
        }));
        let outgoing = Outgoing {
            worker_id: self.state.worker_id,
            id,
            cluster: callout.cluster.to_owned(),
            headers,
            body: SecretBytes::new(callout.body.unwrap_or_default().to_vec()),
            timeout_ms: callout.timeout_ms,
        };
        let mut main = lock(&self.state.main);
        let Some(scheduler) = main.scheduler else {
            return Err("the filter configuration is gone".to_owned());
        };
        main.outbox.push(outgoing);
        // Committed under the lock: `shutdown` deletes the scheduler under it too.
        scheduler.commit(EVENT_SEND);
        Ok(id)
    }

    fn keyed_store(&self) -> Option<&dyn KeyedStore> {
        Some(&*RECORDS)
    }

    fn wake(&mut self, queue: u32) {
        let ticks = lock(&TICKS);
        if let Some((_, scheduler)) = ticks
            .get(&u64::from(queue))
            .and_then(|entry| entry.schedulers.first())
        {
            scheduler.commit(EVENT_WAKE);
        }
    }

    fn resume_with_header(&mut self, context_id: u32, header: &str, value: &str) -> bool {
        self.deliver(
            context_id,
            Handover::Header(header.to_owned(), SecretString::new(value.to_owned())),
        )
    }

    fn reply_json(&mut self, context_id: u32, status: u16, body: &[u8]) -> bool {
        self.deliver(
            context_id,
            Handover::Reply(status, SecretBytes::new(body.to_vec())),
        )
    }

    fn set_tick_period_ms(&mut self, period_ms: u64) {
        let next = now_ms().saturating_add(period_ms);
        self.state.tick_period_ms.set(period_ms);
        self.state.next_tick_ms.set(next);
        if let Some(entry) = lock(&TICKS).get_mut(&self.state.worker_id) {
            entry.period_ms = period_ms;
            entry.next_ms = next;
        }
        if period_ms > 0 {
            start_ticker();
        }
    }

    fn add(&mut self, metric: Metric, amount: u64) {
        let Some((_, id)) = self
            .state
            .metrics
            .iter()
            .find(|(defined, _)| *defined == metric)
        else {
            return;
        };
        if let Some(stream) = self.some_stream() {
            stream.increment(*id, amount);
        }
    }

    fn log_level(&self) -> Level {
        if envoy::log_enabled(LogLevel::Debug) {
            Level::Debug
        } else if envoy::log_enabled(LogLevel::Info) {
            Level::Info
        } else if envoy::log_enabled(LogLevel::Warn) {
            Level::Warn
        } else {
            Level::Error
        }
    }

    fn log(&mut self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        envoy::log(level, message);
    }
}

// ---------------------------------------------------------------------------------
// Per stream
// ---------------------------------------------------------------------------------

/// What token a request carries upstream (inject mode), for purge on rejection.
#[derive(Debug)]
enum Carried {
    Nothing,
    Cached(TokenKey, CachedToken),
    FromWorker,
}

/// What `request_headers` tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersVerdict {
    /// Go on.
    Continue,
    /// Hold headers and body until the worker delivers (`continue_decoding`).
    Pause,
    /// Stop the headers, keep receiving the body (endpoint mode's `POST`).
    AwaitBody,
    /// Answered locally: stop.
    Answered,
}

/// What `request_body` tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyVerdict {
    /// Go on.
    Continue,
    /// Hold (buffer) it.
    Hold,
}

/// The module's object for one HTTP stream.
#[derive(Debug)]
pub struct Stream {
    slot: Rc<Slot>,
    id: u32,
    envoy: EnvoyFilter,
    carried: Carried,
    awaiting_body: bool,
    correlation_id: Option<Option<String>>,
    /// `stream_complete` ran (the request is counted as ended).
    completed: bool,
    /// The worker paused the request (it knows the stream's id until it is gone); a
    /// request served from the cache at once never was.
    paused_by_worker: bool,
}

/// A callout answer as Envoy hands it over.
#[derive(Debug)]
pub struct RawAnswer<'a> {
    /// `:status`, when an answer came.
    pub status: Option<u16>,
    /// `retry-after`, when numeric.
    pub retry_after_secs: Option<u64>,
    /// Body chunks (Envoy memory, valid during the hook).
    pub body: Vec<&'a [u8]>,
}

impl Stream {
    /// A stream of `config` starts on this thread.
    pub fn new(config: &NativeConfig, envoy: EnvoyFilter) -> Stream {
        let slot = Slot::for_config(config);
        let id = NEXT_CONTEXT.with(|next| {
            let id = next.get();
            next.set(id.wrapping_add(1).max(1));
            id
        });
        slot.state.streams.borrow_mut().insert(
            id,
            StreamEntry {
                envoy,
                scheduler: None,
                waiting: false,
                pending: None,
            },
        );
        slot.hits.request_started();
        Stream {
            slot,
            id,
            envoy,
            carried: Carried::Nothing,
            awaiting_body: false,
            correlation_id: None,
            completed: false,
            paused_by_worker: false,
        }
    }

    /// The stream is complete (Envoy's object is still valid): settle the hit tally.
    pub fn on_stream_complete(&mut self) {
        if self.completed {
            return;
        }
        self.completed = true;
        if let Some(hits) = self.slot.hits.request_ended() {
            let id = self.id;
            self.slot
                .with_worker(Some(id), |_, host| host.add(Metric::CacheHit, hits));
        }
    }

    /// Whether the request is held (body and trailers must wait).
    pub fn paused(&self) -> bool {
        self.slot
            .state
            .streams
            .borrow()
            .get(&self.id)
            .is_some_and(|entry| entry.waiting)
    }

    fn correlation_id(&mut self) -> Option<String> {
        let envoy = self.envoy;
        self.correlation_id
            .get_or_insert_with(|| envoy.request_header("x-request-id").map(into_text))
            .clone()
    }

    fn reject(&mut self, error: &TokenError, tenant_id: Option<&str>) -> HeadersVerdict {
        let body = error.to_body(tenant_id, self.correlation_id().as_deref());
        send_json(self.envoy, error.http_status(), &body.to_json());
        HeadersVerdict::Answered
    }

    /// Makes the stream's scheduler and registers it for ticks and wake-ups.
    fn hold(&self) {
        let mut streams = self.slot.state.streams.borrow_mut();
        let Some(entry) = streams.get_mut(&self.id) else {
            return;
        };
        if entry.waiting {
            return;
        }
        entry.waiting = true;
        let scheduler = *entry
            .scheduler
            .get_or_insert_with(|| self.envoy.new_scheduler());
        if let Some(ticks) = lock(&TICKS).get_mut(&self.slot.state.worker_id) {
            ticks.schedulers.push((self.id, scheduler));
        }
        // Start the worker's queued fetch at once, on this (paused) stream.
        scheduler.commit(EVENT_TICK);
    }

    /// The request headers arrived.
    pub fn on_request_headers(&mut self, end_of_stream: bool) -> HeadersVerdict {
        self.slot.catch_up(self.id);
        let config = Rc::clone(&self.slot.config);
        let headers = StreamHeaders(self.envoy);
        match ask::from_headers(&config, &headers, end_of_stream) {
            Ask::Token(wanted) => self.ask(wanted),
            Ask::Refuse(error) => self.reject(&error, None),
            Ask::ReadBody => {
                let _ = self.correlation_id();
                self.awaiting_body = true;
                HeadersVerdict::AwaitBody
            }
        }
    }

    /// A chunk of request body; `body` reads the whole body so far when it is complete.
    pub fn on_request_body(
        &mut self,
        end_of_stream: bool,
        body_size: usize,
        body: impl FnOnce() -> Vec<u8>,
    ) -> BodyVerdict {
        if !self.awaiting_body {
            return if self.paused() {
                BodyVerdict::Hold
            } else {
                BodyVerdict::Continue
            };
        }
        if let Some(error) = ask::refuse_body_of(body_size) {
            self.awaiting_body = false;
            self.reject(&error, None);
            return BodyVerdict::Hold;
        }
        if !end_of_stream {
            return BodyVerdict::Hold;
        }
        self.awaiting_body = false;
        match ask::from_body(&self.slot.config, &body()) {
            Ask::Token(wanted) => {
                self.ask(wanted);
            }
            Ask::Refuse(error) => {
                self.reject(&error, None);
            }
            Ask::ReadBody => {}
        }
        BodyVerdict::Hold
    }

    /// Hands a validated request to the worker and applies its decision.
    fn ask(&mut self, wanted: Wanted) -> HeadersVerdict {
        let delivery = wanted.delivery;
        let purge_on = !self.slot.config.purge.statuses.is_empty() && delivery == Delivery::Inject;
        let carried_key = purge_on.then(|| wanted.key.clone());
        let correlation_id = self.correlation_id.clone();
        let envoy = self.envoy;
        let ask = wanted.of(self.id);
        let mut read_correlation = None;
        let decision = self.slot.with_worker(Some(self.id), |worker, host| {
            worker.on_request(host, ask, || {
                let value = correlation_id
                    .unwrap_or_else(|| envoy.request_header("x-request-id").map(into_text));
                read_correlation = Some(value.clone());
                value
            })
        });
        if let Some(value) = read_correlation {
            self.correlation_id = Some(value);
        }
        let Some(decision) = decision else {
            return self.reject(
                &TokenError::new(ErrorCode::InternalError, "tokengate worker busy"),
                None,
            );
        };
        match decision {
            Decision::Cached(token) => match delivery {
                Delivery::Inject => {
                    let bearer = delivery::bearer(&token);
                    let header = &self.slot.config.authorization_header;
                    self.set_token_header(header, bearer.expose().as_bytes());
                    if let Some(key) = carried_key {
                        self.carried = Carried::Cached(key, token);
                    }
                    HeadersVerdict::Continue
                }
                Delivery::Respond => {
                    let body = delivery::token_response(&token, now_ms(), TokenSource::Cache);
                    send_json(self.envoy, 200, body.expose());
                    HeadersVerdict::Answered
                }
            },
            Decision::Pause => {
                self.paused_by_worker = true;
                if purge_on {
                    self.carried = Carried::FromWorker;
                }
                match self.take_pending() {
                    Some(Handover::Header(name, value)) => {
                        self.set_token_header(&name, value.expose().as_bytes());
                        HeadersVerdict::Continue
                    }
                    Some(Handover::Reply(status, body)) => {
                        send_json(self.envoy, status, body.expose());
                        HeadersVerdict::Answered
                    }
                    None => {
                        self.hold();
                        HeadersVerdict::Pause
                    }
                }
            }
        }
    }

    /// Sets the token header; a refusal (which Envoy does not explain) is logged.
    fn set_token_header(&self, name: &str, value: &[u8]) {
        if !self.envoy.set_request_header(name, value) {
            envoy::log(
                LogLevel::Warn,
                "tokengate: the token header could not be set",
            );
        }
    }

    /// What the worker handed this stream, if anything is waiting for it.
    fn take_pending(&self) -> Option<Handover> {
        self.slot
            .state
            .streams
            .borrow_mut()
            .get_mut(&self.id)
            .and_then(|entry| entry.pending.take())
    }

    /// Response headers: tell the worker the upstream's status (purge on rejection).
    pub fn on_response_headers(&mut self) {
        let injected = match std::mem::replace(&mut self.carried, Carried::Nothing) {
            Carried::Nothing => return,
            Carried::Cached(key, token) => Some((key, token)),
            Carried::FromWorker => None,
        };
        let status = self
            .envoy
            .response_header(":status")
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|status| status.parse::<u16>().ok());
        // Only a purge status concerns the worker (what it keeps of a stream it resumed
        // goes when the stream does).
        if let Some(status) =
            status.filter(|status| self.slot.config.purge.statuses.contains(status))
        {
            let id = self.id;
            self.slot.with_worker(Some(id), |worker, host| {
                worker.on_upstream_status(host, id, injected, status);
            });
        }
    }

    /// A scheduled event reached this stream.
    pub fn on_scheduled(&mut self, event_id: u64) {
        match event_id {
            EVENT_DELIVER => match self.take_pending() {
                Some(Handover::Header(name, value)) => {
                    self.release();
                    self.set_token_header(&name, value.expose().as_bytes());
                    self.envoy.continue_decoding();
                }
                Some(Handover::Reply(status, body)) => {
                    self.release();
                    send_json(self.envoy, status, body.expose());
                }
                None => {}
            },
            EVENT_TICK => {
                self.slot
                    .with_worker(Some(self.id), |worker, host| worker.on_tick(host));
            }
            EVENT_WAKE => {
                self.slot
                    .with_worker(Some(self.id), |worker, host| worker.on_wake(host));
            }
            // The answers are handed over by `with_worker` itself.
            EVENT_ANSWER => {
                self.slot.with_worker(Some(self.id), |_, _| ());
            }
            _ => {}
        }
    }

    /// The stream no longer waits: drop its scheduler from the tick registry (the
    /// scheduler itself is deleted with the stream). The registry is only locked for a
    /// stream that was in it (one that waited).
    fn release(&self) {
        let was_waiting = self
            .slot
            .state
            .streams
            .borrow_mut()
            .get_mut(&self.id)
            .is_some_and(|entry| std::mem::replace(&mut entry.waiting, false));
        if !was_waiting {
            return;
        }
        if let Some(ticks) = lock(&TICKS).get_mut(&self.slot.state.worker_id) {
            ticks.schedulers.retain(|(id, _)| *id != self.id);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let state = &self.slot.state;
        // No commit may reach the scheduler after its delete: out of the registry first.
        self.release();
        let entry = state.streams.borrow_mut().remove(&self.id);
        if let Some(scheduler) = entry.and_then(|entry| entry.scheduler) {
            envoy::delete_scheduler(scheduler);
        }
        // Envoy's object is going away: hits still pending are counted on another stream.
        let hits = if self.completed {
            None
        } else {
            self.slot.hits.request_ended()
        };
        if !self.paused_by_worker && hits.is_none() {
            // A request served from the cache at once: the worker holds nothing of it.
            return;
        }
        let id = self.id;
        let paused_by_worker = self.paused_by_worker;
        self.slot.with_worker(None, |worker, host| {
            if paused_by_worker {
                worker.on_request_gone(id);
            }
            if let Some(hits) = hits {
                host.add(Metric::CacheHit, hits);
            }
        });
    }
}

/// A callout answer for the worker.
fn callout_result(answer: Option<RawAnswer<'_>>) -> CalloutResult {
    let Some(RawAnswer {
        status: Some(status),
        retry_after_secs,
        body,
    }) = answer
    else {
        return CalloutResult::NoResponse;
    };
    let size: usize = body.iter().map(|chunk| chunk.len()).sum();
    if size > MAX_CALLOUT_BODY {
        envoy::log(
            LogLevel::Warn,
            &format!(
                "tokengate: callout answer {status} of {size} bytes is larger than {MAX_CALLOUT_BODY}: treated as no answer"
            ),
        );
        return CalloutResult::NoResponse;
    }
    CalloutResult::Response {
        status,
        body: SecretBytes::new(body.concat()),
        retry_after_secs,
    }
}

/// Answers the request with a JSON body, marked as the filter's own answer.
fn send_json(envoy: EnvoyFilter, status: u16, body: &[u8]) {
    let _ = envoy.set_request_header(REPLY_MARKER_HEADER, b"1");
    envoy.send_response(
        status,
        &[("content-type", "application/json")],
        body,
        "tokengate",
    );
}
