//! The one place that uses the wasm filter's host-agnostic layer (`tokengate::worker`,
//! `tokengate::host`, `tokengate::hits`): `plugin/` is being refactored, and when it
//! changes only this module follows.
//!
//! It drives one [`Worker`] per Envoy worker thread (and filter configuration) through
//! [`DynamicHost`], the `tokengate::host::Host` of this build. Like the wasm glue, it
//! translates and decides nothing. The rule it keeps: **no work waits for traffic.**
//! Streams on the worker threads only ask (hit, or park until the worker delivers);
//! everything that is due later (callout answers, ticks for backoffs, deadlines,
//! refresh-ahead and lease-end retries, wake-ups from other workers) runs on Envoy's
//! main thread, whether or not any request is alive.
//!
//! - **Worker per thread**: a `thread_local!` map from configuration generation to a
//!   [`WorkerCell`]: the `Worker` behind a mutex, taken by the thread's stream hooks and
//!   by the main thread's background work (uncontended on a hit, held for microseconds).
//!   A process-wide registry ([`WORKERS`]) finds a worker by id from the main thread.
//! - **Records** (cached tokens, in-flight markers, purge records): the host's keyed
//!   store, [`LruRecords`], one process-wide least-recently-used map per table bounded
//!   by the newest configuration's `cache.maxTenants`. No shared data.
//! - **Hits**: served before the worker is asked, from the thread's copies of token
//!   records ([`crate::local`], whose documentation holds the coherence argument): the
//!   tenant header read in place (its value count answers whether it is repeated), an
//!   atomic load, the clock, and the header set. Neither the worker's lock nor the
//!   gateway cache's is taken, nothing is allocated or copied. A request whose tenant
//!   has no servable copy takes one from the gateway cache (its lock, once per copy);
//!   the worker decides only when there is none to take (a miss, a refresh due, a
//!   forced refresh, or debug logging on, whose per-hit line the worker writes).
//! - **Callouts** leave from the main thread, like proxy-wasm's root-context callouts
//!   they belong to no request: `dispatch` queues the callout in the configuration's
//!   outbox and commits the configuration scheduler; `on_http_filter_config_scheduled`
//!   (main thread) sends it with `http_filter_config_http_callout` (which Envoy keeps in
//!   an unlocked per-configuration map: main thread only); the answer arrives in
//!   `on_http_filter_config_http_callout_done` (main thread), where the worker handles
//!   it at once. (A first version carried callouts on the worker's streams: Envoy
//!   cancels a stream's callouts when it ends, and a companion commit carried by a
//!   request that was just resumed was lost, holding the cluster lock to its TTL. A
//!   second version handed answers to the worker's thread through a paused stream: a
//!   worker without one got its answers only with its next request, and a refresh-ahead
//!   on a quiet Envoy held the cluster lock and aged its token meanwhile.)
//! - **Ticks**: Envoy 1.40 gives HTTP filters no timer. A module-owned ticker thread
//!   commits a tick event on the configuration scheduler of each worker whose period is
//!   due (schedulers may be committed from any thread); the main thread runs the tick.
//! - **Wake**: `wake(queue)` (queue = worker id, unique in the process) commits a wake
//!   event for that worker on its configuration's scheduler: no polling.
//! - **Resume / reply**: the worker's `resume_with_header` / `reply_json` record the
//!   delivery on the parked stream ([`Parked`]) and commit an event on that stream's own
//!   scheduler; the stream applies it in `on_http_filter_scheduled` (`set_header` +
//!   `continue_decoding`, or `send_response`) on its own thread. A delivery to the
//!   stream whose hook is running (a fetch that ended in the very call that paused it)
//!   is applied when the hook returns. Streams are registered only when they park.
//! - **Stats**: added on the configuration (`http_filter_config_increment_counter`),
//!   so background work counts without a stream.
//! - **Configuration updates**: each configuration Envoy loads gets its own workers
//!   (its generation); when Envoy drops one, its workers leave the registry, and each
//!   thread's map when that thread makes its next worker. The cache outlives
//!   configurations.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokengate::ask::{self, Ask, RequestHeaders, Wanted};
use tokengate::config::{CacheConfig, FilterConfig, Mode};
use tokengate::delivery;
use tokengate::hits::HitTally;
use tokengate::host::{Callout, Host, Level, Metric};
use tokengate::records::LruRecords;
use tokengate::slots::KeyedStore;
use tokengate::worker::{Decision, Delivery, RequestIds, Worker};
use tokengate_core::token_api::TokenSource;
use tokengate_core::{
    CachedToken, CalloutResult, ErrorCode, Provider, SecretBytes, SecretString, TokenError,
    TokenKey,
};

use crate::abi;
use crate::envoy::{self, ConfigScheduler, EnvoyConfig, EnvoyFilter, LogLevel, Scheduler};
use crate::local::{self, LocalToken};

/// Stream event: apply the delivery recorded for the stream.
const EVENT_DELIVER: u64 = 1;
/// Main-thread event: send the callouts in the configuration's outbox.
const EVENT_SEND: u64 = 1;
/// Main-thread event, with a worker id above [`EVENT_KIND_BITS`]: run its tick.
const EVENT_TICK: u64 = 2;
/// Main-thread event, with a worker id above [`EVENT_KIND_BITS`]: run its wake-up.
const EVENT_WAKE: u64 = 3;
/// A tick period this short is run at once (and then every period by the ticker).
const IMMEDIATE_TICK_MS: u64 = 1;
/// A main-thread event id is `worker id << EVENT_KIND_BITS | kind`.
const EVENT_KIND_BITS: u32 = 4;

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

/// How long this thread trusts Envoy's log level (as the worker does: a level changed at
/// run time shows in the per-hit lines within this long).
const LOG_LEVEL_TTL_MS: u64 = 1_000;

thread_local! {
    /// Whether Envoy writes debug lines, and when this thread last asked.
    static DEBUG_LOGGING: Cell<Option<(bool, u64)>> = const { Cell::new(None) };
}

/// Whether Envoy writes debug lines (then hits go to the worker, which writes one per
/// hit), asked at most once per [`LOG_LEVEL_TTL_MS`] per thread.
fn debug_logging(now: u64) -> bool {
    DEBUG_LOGGING.with(|asked| match asked.get() {
        Some((enabled, asked_at)) if now.saturating_sub(asked_at) < LOG_LEVEL_TTL_MS => enabled,
        _ => {
            let enabled = envoy::log_enabled(LogLevel::Debug);
            asked.set(Some((enabled, now)));
            enabled
        }
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

/// Every live worker by id, for the main thread (answers, ticks, wake-ups) and the
/// ticker thread.
static WORKERS: LazyLock<Mutex<HashMap<u64, Arc<WorkerCell>>>> = LazyLock::new(Default::default);

/// The ticker thread, unparked when a worker asks for a tick sooner than it planned.
static TICKER: OnceLock<std::thread::Thread> = OnceLock::new();
/// Worker ids (also their wake queues), unique in the process.
static NEXT_WORKER_ID: AtomicU32 = AtomicU32::new(1);
/// Configuration generations, unique in the process.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);
/// Generations Envoy dropped: their workers are removed from each thread's map when it
/// next makes one (a configuration is dropped only once its streams are gone).
static DROPPED: LazyLock<Mutex<Vec<u64>>> = LazyLock::new(Default::default);

/// The worker with id `worker_id`, if it lives.
fn worker_by_id(worker_id: u64) -> Option<Arc<WorkerCell>> {
    lock(&WORKERS).get(&worker_id).cloned()
}

/// Starts the ticker thread once (it commits tick events for due workers), or wakes it
/// to look at the periods again.
fn wake_ticker() {
    let ticker = TICKER.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("tokengate-ticker".to_owned())
            .spawn(|| {
                loop {
                    let sleep_ms = std::panic::catch_unwind(tick_due_workers).unwrap_or(100);
                    std::thread::park_timeout(Duration::from_millis(sleep_ms));
                }
            });
        match spawned {
            Ok(handle) => handle.thread().clone(),
            Err(_) => {
                envoy::log(
                    LogLevel::Error,
                    "tokengate: no ticker thread: backoffs, deadlines and refreshes wait for requests",
                );
                std::thread::current()
            }
        }
    });
    ticker.unpark();
}

/// Commits a tick for each due worker on its configuration's scheduler; returns how
/// long to sleep.
fn tick_due_workers() -> u64 {
    let now = now_ms();
    let mut sleep_ms = 100u64;
    let workers: Vec<Arc<WorkerCell>> = lock(&WORKERS).values().cloned().collect();
    for cell in workers {
        let period = cell.tick_period_ms.load(Ordering::Relaxed);
        if period == 0 {
            continue;
        }
        let next = cell.next_tick_ms.load(Ordering::Relaxed);
        if now >= next {
            // Pushed on at once, so a busy main thread gets one event, not a flood; the
            // tick itself sets the next moment it wants.
            let following = now.saturating_add(period);
            cell.next_tick_ms.store(following, Ordering::Relaxed);
            cell.commit_main(EVENT_TICK);
            sleep_ms = sleep_ms.min(period);
        } else {
            sleep_ms = sleep_ms.min(next.saturating_sub(now));
        }
    }
    sleep_ms.max(1)
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
    shared_across_threads::<WorkerCell>();
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

    /// Envoy drops the configuration (main thread, once its streams are gone): no
    /// callout leaves any more, the ones in flight are cancelled by Envoy, and its
    /// workers leave the registry.
    pub fn shutdown(&self) {
        let scheduler = {
            let mut main = lock(&self.main);
            main.outbox.clear();
            main.pending.clear();
            main.scheduler.take()
        };
        if let Some(scheduler) = scheduler {
            scheduler.delete();
        }
        lock(&DROPPED).push(self.generation);
        lock(&WORKERS).retain(|_, cell| cell.generation != self.generation);
    }

    /// Main thread: an event of this configuration's scheduler.
    pub fn on_main_scheduled(&self, event_id: u64) {
        let kind = event_id & ((1 << EVENT_KIND_BITS) - 1);
        let worker = || worker_by_id(event_id >> EVENT_KIND_BITS);
        match kind {
            EVENT_SEND => self.send_outbox(),
            EVENT_TICK => {
                if let Some(cell) = worker() {
                    cell.with_worker(None, |worker, host| worker.on_tick(host));
                }
            }
            EVENT_WAKE => {
                if let Some(cell) = worker() {
                    cell.with_worker(None, |worker, host| worker.on_wake(host));
                }
            }
            _ => {}
        }
    }

    /// Main thread: sends the callouts the workers queued.
    fn send_outbox(&self) {
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
                    answer_worker(outgoing.worker_id, outgoing.id, CalloutResult::NoResponse);
                }
            }
        }
    }

    /// Main thread: a configuration callout ended; its worker handles the answer now.
    pub fn on_main_callout_done(&self, envoy_id: u64, answer: Option<RawAnswer<'_>>) {
        let Some((worker_id, id)) = lock(&self.main).pending.remove(&envoy_id) else {
            return;
        };
        answer_worker(worker_id, id, callout_result(answer));
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

/// Main thread: hands callout answer `id` to worker `worker_id`, if it still lives.
fn answer_worker(worker_id: u64, id: u32, result: CalloutResult) {
    if let Some(cell) = worker_by_id(worker_id) {
        cell.with_worker(None, |worker, host| {
            worker.on_callout_response(host, id, result);
        });
    }
}

// ---------------------------------------------------------------------------------
// Per worker
// ---------------------------------------------------------------------------------

/// What a parked stream is to receive, applied in its own scheduled hook.
#[derive(Debug)]
enum Handover {
    /// Set this header and continue.
    Header(String, SecretString),
    /// Answer with this status and JSON body.
    Reply(u16, SecretBytes),
}

/// A stream the worker paused, waiting for its delivery.
#[derive(Debug)]
struct Parked {
    /// The stream's scheduler (deleted by the stream after it left this map).
    scheduler: Scheduler,
    /// Recorded by the worker, applied on `EVENT_DELIVER`.
    pending: Option<Handover>,
}

/// The worker and what its [`DynamicHost`] keeps, under one lock.
#[derive(Debug)]
struct WorkerState {
    worker: Worker,
    next_callout: u32,
}

/// One worker (of one thread and configuration): its state behind a lock, and what the
/// stream hooks and the main thread reach without it.
#[derive(Debug)]
struct WorkerCell {
    id: u64,
    /// The configuration generation it belongs to.
    generation: u64,
    state: Mutex<WorkerState>,
    /// The worker's cache-hit tally, told by streams when they end.
    hits: Arc<HitTally>,
    /// The worker's configuration, read by streams without the lock.
    config: Arc<FilterConfig>,
    /// Streams the worker paused, by context id: where its deliveries go. Commits to a
    /// parked stream's scheduler happen under this lock, and a stream leaves the map
    /// under it before deleting its scheduler.
    parked: Mutex<HashMap<u32, Parked>>,
    /// Stat ids by metric, added on `envoy`.
    metrics: Arc<Vec<(Metric, usize)>>,
    envoy: EnvoyConfig,
    /// Where the worker's callouts leave from, and its scheduler for ticks and wakes.
    main: Arc<Mutex<Main>>,
    /// The tick period the worker asked for (0: none), and when the next tick is due;
    /// read by the ticker thread.
    tick_period_ms: AtomicU64,
    next_tick_ms: AtomicU64,
}

thread_local! {
    static WORKERS_OF_THREAD: RefCell<HashMap<u64, Arc<WorkerCell>>> =
        RefCell::new(HashMap::new());
    static NEXT_CONTEXT: Cell<u32> = const { Cell::new(1) };
    /// Set while this thread runs a worker: a re-entry answers "busy" instead of
    /// waiting on a lock this thread holds.
    static IN_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Clears [`IN_WORKER`] when dropped, also while a panic unwinds.
struct LeavingWorker;

impl Drop for LeavingWorker {
    fn drop(&mut self) {
        IN_WORKER.with(|flag| flag.set(false));
    }
}

impl WorkerCell {
    /// This thread's worker for `config`, made on first use.
    fn for_config(config: &NativeConfig) -> Arc<WorkerCell> {
        WORKERS_OF_THREAD.with(|cells| {
            let mut cells = cells.borrow_mut();
            if !cells.contains_key(&config.generation) {
                // A new configuration (an xDS update, say): forget the dropped ones.
                let dropped = lock(&DROPPED).clone();
                cells.retain(|generation, _| !dropped.contains(generation));
            }
            Arc::clone(cells.entry(config.generation).or_insert_with(|| {
                let id = u64::from(NEXT_WORKER_ID.fetch_add(1, Ordering::Relaxed));
                let queue = u32::try_from(id).ok();
                let worker = Worker::new(config.config.clone(), id, queue);
                let envoy = lock(&config.main).envoy;
                let cell = Arc::new(WorkerCell {
                    id,
                    generation: config.generation,
                    hits: Arc::clone(worker.hits()),
                    config: Arc::clone(worker.config()),
                    state: Mutex::new(WorkerState {
                        worker,
                        next_callout: 1,
                    }),
                    parked: Mutex::new(HashMap::new()),
                    metrics: Arc::clone(&config.metrics),
                    envoy,
                    main: Arc::clone(&config.main),
                    tick_period_ms: AtomicU64::new(0),
                    next_tick_ms: AtomicU64::new(0),
                });
                lock(&WORKERS).insert(id, Arc::clone(&cell));
                cell
            }))
        })
    }

    /// Commits main-thread event `kind` for this worker on its configuration's
    /// scheduler (from any thread).
    fn commit_main(&self, kind: u64) {
        let main = lock(&self.main);
        // Committed under the lock: `shutdown` deletes the scheduler under it too.
        if let Some(scheduler) = main.scheduler {
            scheduler.commit(self.id << EVENT_KIND_BITS | kind);
        }
    }

    /// Runs `call` on the worker with a host whose running stream is `current` (`None`:
    /// background work on the main thread). Returns the call's value and a delivery for
    /// `current` made during the call; `None` on a re-entry from this thread.
    fn with_worker<T>(
        &self,
        current: Option<u32>,
        call: impl FnOnce(&mut Worker, &mut DynamicHost<'_>) -> T,
    ) -> Option<(T, Option<Handover>)> {
        if IN_WORKER.with(Cell::get) {
            return None;
        }
        IN_WORKER.with(|flag| flag.set(true));
        // Cleared however the call ends: a panic the hook catches must not leave this
        // thread answering "busy" for good.
        let _leaving = LeavingWorker;
        let result = {
            let mut state = lock(&self.state);
            let WorkerState {
                worker,
                next_callout,
            } = &mut *state;
            let mut host = DynamicHost {
                cell: self,
                next_callout,
                current,
                current_delivery: None,
            };
            let value = call(worker, &mut host);
            (value, host.current_delivery.take())
        };
        Some(result)
    }

    /// Adds `amount` to `metric`'s stat (from any thread, without the worker's lock).
    fn count(&self, metric: Metric, amount: u64) {
        if let Some((_, id)) = self.metrics.iter().find(|(defined, _)| *defined == metric) {
            self.envoy.increment(*id, amount);
        }
    }

    /// Parks stream `id` (under the worker's lock, so no delivery can miss it).
    fn park(&self, id: u32, scheduler: Scheduler) {
        lock(&self.parked).insert(
            id,
            Parked {
                scheduler,
                pending: None,
            },
        );
    }

    /// The delivery recorded for parked stream `id`, which leaves the map with it.
    fn take_delivery(&self, id: u32) -> Option<Handover> {
        let mut parked = lock(&self.parked);
        let delivery = parked.get_mut(&id)?.pending.take()?;
        parked.remove(&id);
        Some(delivery)
    }

    /// Stream `id` is going away: it leaves the map (no commit can reach its scheduler
    /// after this).
    fn unpark(&self, id: u32) {
        lock(&self.parked).remove(&id);
    }
}

/// [`Host`] over the dynamic-module callbacks, for one worker, while one of its streams'
/// hooks runs (`current`) or while the main thread runs its background work.
#[derive(Debug)]
pub struct DynamicHost<'a> {
    cell: &'a WorkerCell,
    next_callout: &'a mut u32,
    current: Option<u32>,
    /// A delivery to `current`, applied by its hook when the worker returns.
    current_delivery: Option<Handover>,
}

impl DynamicHost<'_> {
    /// Records `delivery` for paused stream `context_id` and schedules it.
    fn deliver(&mut self, context_id: u32, delivery: Handover) -> bool {
        if self.current == Some(context_id) {
            self.current_delivery = Some(delivery);
            return true;
        }
        let mut parked = lock(&self.cell.parked);
        let Some(entry) = parked.get_mut(&context_id) else {
            return false;
        };
        entry.pending = Some(delivery);
        entry.scheduler.commit(EVENT_DELIVER);
        true
    }
}

impl Host for DynamicHost<'_> {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn dispatch(&mut self, callout: Callout<'_>) -> Result<u32, String> {
        let id = *self.next_callout;
        *self.next_callout = id.wrapping_add(1).max(1);
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
            worker_id: self.cell.id,
            id,
            cluster: callout.cluster.to_owned(),
            headers,
            body: SecretBytes::new(callout.body.unwrap_or_default().to_vec()),
            timeout_ms: callout.timeout_ms,
        };
        let mut main = lock(&self.cell.main);
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
        if let Some(cell) = worker_by_id(u64::from(queue)) {
            cell.commit_main(EVENT_WAKE);
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
        let cell = self.cell;
        cell.tick_period_ms.store(period_ms, Ordering::Relaxed);
        cell.next_tick_ms
            .store(now_ms().saturating_add(period_ms), Ordering::Relaxed);
        if period_ms == 0 {
            return;
        }
        if period_ms <= IMMEDIATE_TICK_MS {
            // Work waits for the worker's next turn (a request just queued a fetch):
            // no need to wait for the ticker.
            cell.commit_main(EVENT_TICK);
        }
        wake_ticker();
    }

    fn add(&mut self, metric: Metric, amount: u64) {
        self.cell.count(metric, amount);
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
    /// This thread's copy of a cached token.
    Local(Rc<LocalToken>),
    /// A cached token the worker served.
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
    cell: Arc<WorkerCell>,
    id: u32,
    envoy: EnvoyFilter,
    carried: Carried,
    awaiting_body: bool,
    /// The request's `x-request-id` and trace context, read when first needed (never
    /// on a plain cache hit).
    request_ids: Option<RequestIds>,
    /// `stream_complete` ran (the request is counted as ended).
    completed: bool,
    /// The worker paused the request (it knows the stream's id until it is gone); a
    /// request served from the cache at once never was.
    paused_by_worker: bool,
    /// Parked in the worker's map, waiting for a delivery.
    parked: bool,
    /// Made when the stream parks; deleted when the stream goes.
    scheduler: Option<Scheduler>,
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
        let cell = WorkerCell::for_config(config);
        let id = NEXT_CONTEXT.with(|next| {
            let id = next.get();
            next.set(id.wrapping_add(1).max(1));
            id
        });
        cell.hits.request_started();
        Stream {
            cell,
            id,
            envoy,
            carried: Carried::Nothing,
            awaiting_body: false,
            request_ids: None,
            completed: false,
            paused_by_worker: false,
            parked: false,
            scheduler: None,
        }
    }

    /// The stream is complete (Envoy's object is still valid): settle the hit tally.
    pub fn on_stream_complete(&mut self) {
        if self.completed {
            return;
        }
        self.completed = true;
        if let Some(hits) = self.cell.hits.request_ended() {
            self.cell.count(Metric::CacheHit, hits);
        }
    }

    /// Whether the request is held (body and trailers must wait).
    pub fn paused(&self) -> bool {
        self.parked
    }

    fn request_ids(&mut self) -> &RequestIds {
        let envoy = self.envoy;
        self.request_ids
            .get_or_insert_with(|| ask::request_ids(&StreamHeaders(envoy)))
    }

    fn reject(&mut self, error: &TokenError, tenant_id: Option<&str>) -> HeadersVerdict {
        let correlation_id = self.request_ids().correlation_id.as_deref();
        let body = error.to_body(tenant_id, correlation_id);
        send_json(self.envoy, error.http_status(), &body.to_json());
        HeadersVerdict::Answered
    }

    /// The request headers arrived.
    pub fn on_request_headers(&mut self, end_of_stream: bool) -> HeadersVerdict {
        if let Some(verdict) = self.serve_local_hit() {
            return verdict;
        }
        let config = Arc::clone(&self.cell.config);
        let headers = StreamHeaders(self.envoy);
        match ask::from_headers(&config, &headers, end_of_stream) {
            Ask::Token(wanted) => self.ask(wanted),
            Ask::Refuse(error) => self.reject(&error, None),
            Ask::ReadBody => {
                let _ = self.request_ids();
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
        match ask::from_body(&self.cell.config, &body()) {
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

    /// Inject mode's hit path: the request's tenant header, read in place, names a token
    /// of the request's provider (its route's, read in place too) that this thread holds a
    /// servable copy of. `None` leaves the request to the usual reading (which refuses a
    /// repeated or invalid tenant header) and the worker.
    fn serve_local_hit(&mut self) -> Option<HeadersVerdict> {
        let config = &self.cell.config;
        if config.mode != Mode::Inject {
            return None;
        }
        let now = now_ms();
        if debug_logging(now) {
            return None;
        }
        let envoy = self.envoy;
        let serve = |provider: &Provider| {
            envoy.with_request_header(&config.tenant_header, |tenant, count| {
                // A repeated header is refused by the usual reading.
                if count != 1 {
                    return None;
                }
                local::with_local_tokens(|copies| {
                    copies.serve(&RECORDS, provider.as_str(), tenant, now)
                })
                .flatten()
            })?
        };
        let routed = (!config.routes.is_empty())
            .then(|| {
                envoy.with_attribute_string(abi::ATTRIBUTE_XDS_ROUTE_NAME, |route| {
                    // A route name that is not UTF-8 is left to the usual reading.
                    let route = std::str::from_utf8(route).ok()?;
                    serve(config.provider_of_route(Some(route)))
                })
            })
            .flatten();
        let copy = match routed {
            Some(copy) => copy?,
            None => serve(config.provider_of_route(None))?,
        };
        Some(self.serve_copy(&copy, now, Delivery::Inject))
    }

    /// Serves `copy` of a cached token (at `now`) as `delivery` asks, without the worker.
    fn serve_copy(
        &mut self,
        copy: &Rc<LocalToken>,
        now: u64,
        delivery: Delivery,
    ) -> HeadersVerdict {
        if let Some(hits) = self.cell.hits.hit(now) {
            self.cell.count(Metric::CacheHit, hits);
        }
        match delivery {
            Delivery::Inject => {
                let header = &self.cell.config.authorization_header;
                self.set_token_header(header, copy.bearer.expose().as_bytes());
                if !self.cell.config.purge.statuses.is_empty() {
                    self.carried = Carried::Local(Rc::clone(copy));
                }
                HeadersVerdict::Continue
            }
            Delivery::Respond => {
                let body = delivery::token_response(&copy.token, now, TokenSource::Cache);
                send_json(self.envoy, 200, body.expose());
                HeadersVerdict::Answered
            }
        }
    }

    /// Hands a validated request to the worker and applies its decision, unless this
    /// thread can serve it from a copy of the cached token. A paused request parks (with
    /// a scheduler for its delivery) before the worker's lock is released, so a delivery
    /// made on the main thread right after cannot miss it.
    fn ask(&mut self, wanted: Wanted) -> HeadersVerdict {
        let delivery = wanted.delivery;
        if !wanted.force_refresh {
            let now = now_ms();
            let copy = (!debug_logging(now))
                .then(|| local::with_local_tokens(|copies| copies.fill(&RECORDS, &wanted.key, now)))
                .flatten()
                .flatten();
            if let Some(copy) = copy {
                return self.serve_copy(&copy, now, delivery);
            }
        }
        let purge_on = !self.cell.config.purge.statuses.is_empty() && delivery == Delivery::Inject;
        let carried_key = purge_on.then(|| wanted.key.clone());
        let request_ids = self.request_ids.clone();
        let envoy = self.envoy;
        let id = self.id;
        let ask = wanted.of(id);
        let mut read_ids = None;
        let mut parked_with = None;
        let outcome = self.cell.with_worker(Some(id), |worker, host| {
            let decision = worker.on_request(host, ask, || {
                let ids = request_ids.unwrap_or_else(|| ask::request_ids(&StreamHeaders(envoy)));
                read_ids = Some(ids.clone());
                ids
            });
            if matches!(decision, Decision::Pause) && host.current_delivery.is_none() {
                let scheduler = envoy.new_scheduler();
                host.cell.park(id, scheduler);
                parked_with = Some(scheduler);
            }
            decision
        });
        if let Some(ids) = read_ids {
            self.request_ids = Some(ids);
        }
        let Some((decision, delivered_now)) = outcome else {
            return self.reject(
                &TokenError::new(ErrorCode::InternalError, "tokengate worker busy"),
                None,
            );
        };
        match decision {
            Decision::Cached(token) => match delivery {
                Delivery::Inject => {
                    let bearer = delivery::bearer(&token);
                    let header = &self.cell.config.authorization_header;
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
                match delivered_now {
                    Some(Handover::Header(name, value)) => {
                        self.set_token_header(&name, value.expose().as_bytes());
                        HeadersVerdict::Continue
                    }
                    Some(Handover::Reply(status, body)) => {
                        send_json(self.envoy, status, body.expose());
                        HeadersVerdict::Answered
                    }
                    None => {
                        self.scheduler = parked_with;
                        self.parked = parked_with.is_some();
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

    /// Response headers: tell the worker the upstream's status (purge on rejection).
    pub fn on_response_headers(&mut self) {
        let carried = std::mem::replace(&mut self.carried, Carried::Nothing);
        if matches!(carried, Carried::Nothing) {
            return;
        }
        // Only a purge status concerns the worker (what it keeps of a stream it resumed
        // goes when the stream does).
        if let Some(status) = self
            .envoy
            .response_status()
            .filter(|status| self.cell.config.purge.statuses.contains(status))
        {
            let injected = match carried {
                Carried::Nothing | Carried::FromWorker => None,
                Carried::Local(copy) => Some((copy.key.clone(), copy.token.clone())),
                Carried::Cached(key, token) => Some((key, token)),
            };
            let id = self.id;
            self.cell.with_worker(Some(id), |worker, host| {
                worker.on_upstream_status(host, id, injected, status);
            });
        }
    }

    /// A scheduled event reached this stream: the worker's delivery.
    pub fn on_scheduled(&mut self, event_id: u64) {
        if event_id != EVENT_DELIVER {
            return;
        }
        match self.cell.take_delivery(self.id) {
            Some(Handover::Header(name, value)) => {
                self.parked = false;
                self.set_token_header(&name, value.expose().as_bytes());
                self.envoy.continue_decoding();
            }
            Some(Handover::Reply(status, body)) => {
                self.parked = false;
                send_json(self.envoy, status, body.expose());
            }
            None => {}
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // No commit may reach the scheduler after its delete: out of the map first.
        if self.parked {
            self.cell.unpark(self.id);
        }
        if let Some(scheduler) = self.scheduler.take() {
            envoy::delete_scheduler(scheduler);
        }
        // Envoy's object is going away: hits still pending are counted now.
        if !self.completed {
            if let Some(hits) = self.cell.hits.request_ended() {
                self.cell.count(Metric::CacheHit, hits);
            }
        }
        if self.paused_by_worker {
            let id = self.id;
            self.cell
                .with_worker(None, |worker, _| worker.on_request_gone(id));
        }
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
