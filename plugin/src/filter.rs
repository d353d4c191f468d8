//! The proxy-wasm glue: one root context per Envoy worker owning a [`Worker`], and a
//! thin HTTP context per request. Nothing here decides anything: it translates
//! proxy-wasm callbacks into the worker's events and implements [`Host`] with
//! proxy-wasm host calls. What it does itself is read the request (tenant header,
//! endpoint-mode body) into a validated ask, and apply the worker's decision on a
//! cache hit, which takes no worker state.

#![allow(unsafe_code)] // `#[unsafe(no_mangle)]` on the module's entry point.

use std::cell::{OnceCell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use tokengate_core::token_api::TokenSource;
use tokengate_core::{CachedToken, CalloutResult, ErrorCode, SecretBytes, TokenError, TokenKey};

use crate::ask::{self, Ask, RequestHeaders, Wanted};
use crate::config::FilterConfig;
use crate::delivery;
use crate::header_pairs;
use crate::hits::HitTally;
use crate::host::{Callout, Host, Level, Metric};
use crate::ready::{GENERATION_BUCKETS, ReadyToken};
use crate::worker::{Decision, Delivery, RequestIds, Worker};

/// The entry point Envoy calls when it loads the module.
#[unsafe(no_mangle)]
pub extern "C" fn _initialize() {
    proxy_wasm::set_root_context(|context_id| {
        Box::new(Root {
            context_id,
            worker: None,
            metrics: MetricIds::default(),
            generations: GenerationIds::default(),
        })
    });
}

/// Stat ids of this worker's VM, defined once in `on_configure` (a short list searched in
/// order: less code than a map).
type MetricIds = Rc<Vec<(Metric, u32)>>;

/// Stat ids of the gateway cache's write generations ([`crate::ready`]), one per
/// bucket; empty when Envoy refused one (then workers keep no tokens of their own).
type GenerationIds = Rc<Vec<u32>>;

/// [`Host`] over the proxy-wasm host functions.
#[derive(Clone)]
struct ProxyWasmHost {
    /// The root context: callouts and timers belong to it, so the effective context
    /// is set back to it after touching a request's context.
    root_context_id: u32,
    /// Where `count` finds each stat.
    metrics: MetricIds,
    /// Where the write generations are.
    generations: GenerationIds,
}

/// Defines the write generations: counters, since a counter of one name is one Envoy
/// stat for every worker's VM, and `proxy_get_metric` reads it with an atomic load.
fn define_generations() -> Vec<u32> {
    let mut name = String::from(GENERATION_STAT_PREFIX);
    let ids: Option<Vec<u32>> = (0..GENERATION_BUCKETS)
        .map(|bucket| {
            name.truncate(GENERATION_STAT_PREFIX.len());
            name.push_str(&bucket.to_string());
            hostcalls::define_metric(MetricType::Counter, &name).ok()
        })
        .collect();
    ids.unwrap_or_else(|| {
        let _ = hostcalls::log(
            LogLevel::Warn,
            "cache generations not defined: every hit reads the gateway cache",
        );
        Vec::new()
    })
}

/// The write generations' stat names, followed by the bucket.
const GENERATION_STAT_PREFIX: &str = "tokengate.cache_generation.";

/// Defines every stat; a name Envoy refuses is logged and left uncounted.
fn define_metrics(config: &FilterConfig) -> Vec<(Metric, u32)> {
    Metric::all(&config.provider_table)
        .into_iter()
        .filter_map(
            |(metric, name)| match hostcalls::define_metric(MetricType::Counter, &name) {
                Ok(id) => Some((metric, id)),
                Err(status) => {
                    let _ = hostcalls::log(
                        LogLevel::Warn,
                        &format!(
                            "stat {name} not defined (proxy-wasm status {})",
                            status as u32
                        ),
                    );
                    None
                }
            },
        )
        .collect()
}

/// A number unique among the workers of this Envoy: a shared counter (a racing first
/// creation can hand out a number twice, FACTS §3) combined with the clock's nanoseconds.
fn allocate_worker_id() -> u64 {
    const KEY: &str = "tokengate.v1.worker_seq";
    let mut sequence = 0u64;
    for _ in 0..16 {
        let (value, cas) = hostcalls::get_shared_data(KEY).unwrap_or((None, None));
        let current = value
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        sequence = current.wrapping_add(1);
        if hostcalls::set_shared_data(KEY, Some(&sequence.to_be_bytes()), cas).is_ok() {
            break;
        }
    }
    let nanos = hostcalls::get_current_time()
        .ok()
        .and_then(|now| now.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |since| u64::from(since.subsec_nanos()));
    (sequence << 30) | (nanos & 0x3FFF_FFFF) | 1
}

/// Registers this worker's wake queue (named after its id, so unique per Envoy); other
/// workers enqueue to it when a fetch it waits on ends. Without one it only polls.
fn register_wake_queue(worker_id: u64) -> Option<u32> {
    match hostcalls::register_shared_queue(&format!("tokengate.v1.wake.{worker_id}")) {
        Ok(queue) => Some(queue),
        Err(status) => {
            let _ = hostcalls::log(
                LogLevel::Warn,
                &format!(
                    "no wake queue (proxy-wasm status {}): waits on other workers are polled",
                    status as u32
                ),
            );
            None
        }
    }
}

impl Host for ProxyWasmHost {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|now| now.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            })
    }

    fn dispatch(&mut self, callout: Callout<'_>) -> Result<u32, String> {
        let mut headers = vec![
            (":method", callout.method),
            (":path", callout.path),
            (":authority", callout.authority),
        ];
        headers.extend(callout.headers);
        hostcalls::dispatch_http_call(
            callout.cluster,
            headers,
            callout.body,
            Vec::new(),
            Duration::from_millis(callout.timeout_ms),
        )
        .map_err(|status| {
            format!(
                "cluster '{}' refused the call (proxy-wasm status {})",
                callout.cluster, status as u32
            )
        })
    }

    fn cache_generation(&self, bucket: u32) -> Option<u64> {
        let id = self.generations.get(usize::try_from(bucket).ok()?)?;
        hostcalls::get_metric(*id).ok()
    }

    fn bump_cache_generation(&mut self, bucket: u32) {
        let id = usize::try_from(bucket)
            .ok()
            .and_then(|bucket| self.generations.get(bucket));
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }

    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(key)
            .ok()
            .and_then(|(value, _cas)| value)
    }

    fn shared_set(&mut self, key: &str, value: &[u8]) {
        if let Err(status) = hostcalls::set_shared_data(key, Some(value), None) {
            self.log(
                Level::Warn,
                &format!(
                    "shared data write failed (proxy-wasm status {})",
                    status as u32
                ),
            );
        }
    }

    fn shared_get_versioned(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(version))) => Some((value, version)),
            _ => None,
        }
    }

    fn shared_replace(&mut self, key: &str, value: &[u8], version: u32) -> bool {
        hostcalls::set_shared_data(key, Some(value), Some(version)).is_ok()
    }

    fn wake(&mut self, queue: u32) {
        // One byte: an empty message may be dequeued as "no message" (and a null
        // pointer refused).
        let _ = hostcalls::enqueue_shared_queue(queue, Some(b"w"));
    }

    fn resume_with_header(&mut self, context_id: u32, header: &str, value: &str) -> bool {
        if hostcalls::set_effective_context(context_id).is_err() {
            return false;
        }
        let done = hostcalls::set_map_value(MapType::HttpRequestHeaders, header, Some(value))
            .is_ok()
            && hostcalls::resume_http_request().is_ok();
        let _ = hostcalls::set_effective_context(self.root_context_id);
        done
    }

    fn reply_json(&mut self, context_id: u32, status: u16, body: &[u8]) -> bool {
        if hostcalls::set_effective_context(context_id).is_err() {
            return false;
        }
        let done = send_json(status, body);
        let _ = hostcalls::set_effective_context(self.root_context_id);
        done
    }

    fn set_tick_period_ms(&mut self, period_ms: u64) {
        let _ = hostcalls::set_tick_period(Duration::from_millis(period_ms));
    }

    fn add(&mut self, metric: Metric, amount: u64) {
        if let Some((_, id)) = self.metrics.iter().find(|(defined, _)| *defined == metric) {
            let _ = hostcalls::increment_metric(*id, i64::try_from(amount).unwrap_or(i64::MAX));
        }
    }

    fn log_level(&self) -> Level {
        // Read as a number: the SDK's typed call reads into an enum that has no value
        // for Envoy's `off` (6).
        let mut level = 0u32;
        // SAFETY: the host writes one u32 to the address given, which is valid for it.
        let status = unsafe { proxy_get_log_level(&mut level) };
        if status != 0 {
            // Not answered: keep writing every line, as `log` would.
            return Level::Debug;
        }
        match level {
            0 | 1 => Level::Debug,
            2 => Level::Info,
            3 => Level::Warn,
            _ => Level::Error,
        }
    }

    fn log(&mut self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        let _ = hostcalls::log(level, message);
    }
}

#[link(wasm_import_module = "env")]
#[allow(clashing_extern_declarations)] // the SDK declares it with its own enum
unsafe extern "C" {
    /// proxy-wasm ABI 0.2: the level of the host's log for this module (spdlog's
    /// numbering: 0 trace, 1 debug, 2 info, 3 warn, 4 error, 5 critical, 6 off).
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    /// proxy-wasm ABI 0.2: sets a header (map 0: the request headers). Declared here
    /// because the SDK's wrapper panics, aborting the VM, when the host refuses.
    /// proxy-wasm ABI 0.2: a header map, serialised ([`header_pairs`] reads it). The
    /// host allocates the buffer through the module's `proxy_on_memory_allocate`.
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
}

/// proxy-wasm's number for the request header map.
const REQUEST_HEADER_MAP: u32 = 0;

/// The request's header map as the host serialises it: one host call, no parsing.
fn request_header_pairs() -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and a length to the two addresses, valid for
    // it. The buffer it returns was allocated by `proxy_on_memory_allocate` (the SDK's:
    // a boxed slice of exactly `size` bytes), so it becomes a Vec of that length and
    // capacity, freed when dropped.
    unsafe {
        if proxy_get_header_map_pairs(REQUEST_HEADER_MAP, &mut data, &mut size) != 0
            || data.is_null()
        {
            return Vec::new();
        }
        Vec::from_raw_parts(data, size, size)
    }
}

/// A header of `map` as text. Uses the bytes host call: the SDK's text variant panics
/// (aborting the VM) on a value that is not UTF-8; here such bytes become U+FFFD, which
/// no validation accepts.
fn header_text(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

/// The request header that marks the filter's own answers for Envoy's
/// `local_reply_config` (see `envoy/local.yaml.tmpl`): those pass unchanged, while
/// Envoy's own refusals of bad requests get the same JSON shape.
const REPLY_MARKER_HEADER: &str = "x-tokengate-reply";

fn send_json(status: u16, body: &[u8]) -> bool {
    // Best effort: once a request's headers went on (endpoint mode's POST), Envoy
    // refuses changes to them; `Request::endpoint` marks those requests up front.
    mark_reply_as_the_filters();
    hostcalls::send_http_response(
        u32::from(status),
        vec![("content-type", "application/json")],
        Some(body),
    )
    .is_ok()
}

/// The request's headers in the header phase, for [`ask`].
struct HeaderPhase;

impl RequestHeaders for HeaderPhase {
    fn get(&self, name: &str) -> Option<String> {
        header_text(MapType::HttpRequestHeaders, name)
    }

    fn values(&self, name: &str) -> Vec<String> {
        let pairs = request_header_pairs();
        header_pairs::pairs(&pairs)
            .into_iter()
            .flatten()
            .map_while(Result::ok)
            .filter(|(header, _)| *header == name.as_bytes())
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
            .collect()
    }

    fn single(&self, name: &str) -> Result<Option<String>, ask::Repeated> {
        let pairs = request_header_pairs();
        let found = header_pairs::values(&pairs, name.as_bytes()).unwrap_or_default();
        if found.count > 1 {
            return Err(ask::Repeated);
        }
        Ok(found
            .first
            .map(|value| String::from_utf8_lossy(value).into_owned()))
    }

    fn route_name(&self) -> Option<String> {
        hostcalls::get_property(vec!["xds", "route_name"])
            .ok()
            .flatten()
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
    }
}

/// Sets [`REPLY_MARKER_HEADER`] on the current request; false if Envoy refused.
fn mark_reply_as_the_filters() -> bool {
    let (name, value) = (REPLY_MARKER_HEADER.as_bytes(), b"1");
    // SAFETY: both pointers are valid for the lengths given for the whole call; the
    // host copies them.
    let status = unsafe {
        proxy_replace_header_map_value(
            REQUEST_HEADER_MAP,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
    status == 0
}

/// One per worker: owns the worker state once the configuration is accepted.
struct Root {
    context_id: u32,
    worker: Option<Rc<RefCell<Worker>>>,
    metrics: MetricIds,
    generations: GenerationIds,
}

impl Root {
    fn host(&self) -> ProxyWasmHost {
        ProxyWasmHost {
            root_context_id: self.context_id,
            metrics: Rc::clone(&self.metrics),
            generations: Rc::clone(&self.generations),
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(worker) = &self.worker else { return };
        // No headers: Envoy has no answer for the call (it was reset, or its body went
        // over the async client's buffer limit), and reading its headers would make the
        // SDK panic on Envoy's BadArgument, aborting the VM.
        let status = (num_headers > 0)
            .then(|| header_text(MapType::HttpCallResponseHeaders, ":status"))
            .flatten()
            .and_then(|status| status.parse::<u16>().ok());
        let result = match status {
            Some(status) if body_size > MAX_CALLOUT_BODY => {
                let _ = hostcalls::log(
                    LogLevel::Warn,
                    &format!(
                        "callout answer {status} of {body_size} bytes is larger than {MAX_CALLOUT_BODY}: treated as no answer"
                    ),
                );
                CalloutResult::NoResponse
            }
            Some(status) => {
                let retry_after_secs = header_text(MapType::HttpCallResponseHeaders, "retry-after")
                    .and_then(|value| value.trim().parse::<u64>().ok());
                let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                CalloutResult::Response {
                    status,
                    body: SecretBytes::new(body),
                    retry_after_secs,
                }
            }
            None => CalloutResult::NoResponse,
        };
        let mut host = self.host();
        if let Ok(mut worker) = worker.try_borrow_mut() {
            worker.on_callout_response(&mut host, token_id, result);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match FilterConfig::parse(&bytes) {
            Ok(config) => {
                self.metrics = Rc::new(define_metrics(&config));
                self.generations = Rc::new(define_generations());
                let worker_id = allocate_worker_id();
                let worker = Worker::new(config, worker_id, register_wake_queue(worker_id));
                self.worker = Some(Rc::new(RefCell::new(worker)));
                true
            }
            Err(error) => {
                self.host().log(Level::Error, &error.to_string());
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(worker) = &self.worker else { return };
        let mut host = self.host();
        if let Ok(mut worker) = worker.try_borrow_mut() {
            worker.on_tick(&mut host);
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        // The messages carry nothing: being woken is the message.
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        let Some(worker) = &self.worker else { return };
        let mut host = self.host();
        if let Ok(mut worker) = worker.try_borrow_mut() {
            worker.on_wake(&mut host);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let worker = self.worker.clone()?;
        let config = Arc::clone(worker.try_borrow().ok()?.config());
        let hits = Arc::clone(worker.try_borrow().ok()?.hits());
        hits.request_started();
        Some(Box::new(Request {
            context_id,
            host: self.host(),
            config,
            worker,
            hits,
            awaiting_body: false,
            paused: false,
            request_ids: OnceCell::new(),
            carried: Carried::Nothing,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One per request: works out what it asks for and hands over to the worker.
struct Request {
    context_id: u32,
    /// Host calls on behalf of the worker (its root context and stats).
    host: ProxyWasmHost,
    /// The worker's configuration, shared without borrowing the worker.
    config: Arc<FilterConfig>,
    worker: Rc<RefCell<Worker>>,
    /// The worker's cache-hit tally, told when this request ends.
    hits: Arc<HitTally>,
    /// Set while an endpoint-mode `POST` waits for its body.
    awaiting_body: bool,
    /// Set once the worker paused the request: only then does it hold anything of it
    /// to forget when the request ends.
    paused: bool,
    /// The request's `x-request-id` and trace context, read when first needed (a cache
    /// hit never needs them) but always in the header phase: headers cannot be read
    /// once they have continued, so an endpoint-mode `POST` reads them before waiting
    /// for its body.
    request_ids: OnceCell<RequestIds>,
    /// The token this request carries upstream, to purge it if the upstream rejects it.
    carried: Carried,
}

/// What token a request carries upstream (inject mode).
enum Carried {
    /// None (endpoint mode, an error, or not yet decided).
    Nothing,
    /// This token from the worker's cache.
    Ready(TokenKey, Arc<ReadyToken>),
    /// This token from the gateway cache (the worker keeps no tokens of its own).
    Cached(TokenKey, CachedToken),
    /// The token the worker resumed it with (the worker remembers which).
    FromWorker,
}

/// Largest callout answer read into the VM (the companion's bound on the same answers).
/// Tenant Service, login and companion answers are a few hundred bytes; a VM that cannot
/// grow its memory for a huge one aborts, and every later request of its worker fails.
/// A larger answer is not read and counts as no answer, which the fetch retries.
const MAX_CALLOUT_BODY: usize = 64 * 1024;

impl Request {
    /// The request's ids; only valid in the header phase unless already read.
    fn request_ids(&self) -> &RequestIds {
        self.request_ids
            .get_or_init(|| ask::request_ids(&HeaderPhase))
    }

    fn reject(&self, error: &TokenError, tenant_id: Option<&str>) -> Action {
        let correlation_id = self.request_ids().correlation_id.as_deref();
        let body = error.to_body(tenant_id, correlation_id);
        send_json(error.http_status(), &body.to_json());
        Action::Pause
    }

    /// Hands a validated request to the worker and applies its decision.
    fn ask(&mut self, wanted: Wanted) -> Action {
        let mut host = self.host.clone();
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            return self.reject(
                &TokenError::new(ErrorCode::InternalError, "tokengate worker busy"),
                None,
            );
        };
        let delivery = wanted.delivery;
        let purge_on = !self.config.purge.statuses.is_empty() && delivery == Delivery::Inject;
        if delivery == Delivery::Inject && !wanted.force_refresh {
            // The hit path: the worker's own token, set as is; the key is kept (not
            // copied) for a purge, or dropped.
            let correlation_id = || self.request_ids().correlation_id.clone();
            if let Some(ready) = worker.serve_ready(&mut host, &wanted.key, correlation_id) {
                let header = &self.config.authorization_header;
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    header,
                    Some(ready.header_value()),
                );
                if purge_on {
                    self.carried = Carried::Ready(wanted.key, ready);
                }
                return Action::Continue;
            }
        }
        let carried_key = purge_on.then(|| wanted.key.clone());
        let ask = wanted.of(self.context_id);
        match worker.on_request(&mut host, ask, || self.request_ids().clone()) {
            Decision::Cached(token) => match delivery {
                Delivery::Inject => {
                    let header = &self.config.authorization_header;
                    let _ = hostcalls::set_map_value(
                        MapType::HttpRequestHeaders,
                        header,
                        Some(delivery::bearer(&token).expose()),
                    );
                    if let Some(key) = carried_key {
                        self.carried = Carried::Cached(key, token);
                    }
                    Action::Continue
                }
                Delivery::Respond => {
                    let body = delivery::token_response(&token, host.now_ms(), TokenSource::Cache);
                    send_json(200, body.expose());
                    Action::Pause
                }
            },
            Decision::Pause => {
                self.paused = true;
                if purge_on {
                    self.carried = Carried::FromWorker;
                }
                Action::Pause
            }
        }
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        match ask::from_headers(&self.config, &HeaderPhase, end_of_stream) {
            Ask::Token(wanted) => self.ask(wanted),
            Ask::Refuse(error) => self.reject(&error, None),
            Ask::ReadBody => {
                let _ = self.request_ids();
                // The answer comes after the headers went on, when they can no longer
                // be marked: mark them now.
                mark_reply_as_the_filters();
                // The body is read in `on_http_request_body`. Pausing here would stop
                // Envoy from delivering it (proxy-wasm turns a paused header phase into
                // StopAllIteration), so the headers continue and the body is held; an
                // Envoy buffer filter behind this one keeps the headers from the router.
                self.awaiting_body = true;
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let carried = std::mem::replace(&mut self.carried, Carried::Nothing);
        if matches!(carried, Carried::Nothing) {
            return Action::Continue;
        }
        let Some(status) = response_status() else {
            return Action::Continue;
        };
        // The common case, an accepted token, touches nothing more.
        if !self.config.purge.statuses.contains(&status) && !matches!(carried, Carried::FromWorker)
        {
            return Action::Continue;
        }
        let injected = match carried {
            Carried::Nothing | Carried::FromWorker => None,
            Carried::Ready(key, ready) => Some((key, ready.to_cached())),
            Carried::Cached(key, token) => Some((key, token)),
        };
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            let mut host = self.host.clone();
            worker.on_upstream_status(&mut host, self.context_id, injected, status);
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.awaiting_body {
            return Action::Continue;
        }
        if let Some(error) = ask::refuse_body_of(body_size) {
            self.awaiting_body = false;
            return self.reject(&error, None);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.awaiting_body = false;
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        match ask::from_body(&self.config, &body) {
            Ask::Token(wanted) => self.ask(wanted),
            Ask::Refuse(error) => self.reject(&error, None),
            Ask::ReadBody => Action::Continue,
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Some(hits) = self.hits.request_ended() {
            self.host.add(Metric::CacheHit, hits);
        }
        // A request the worker never paused left nothing with it.
        if self.paused {
            if let Ok(mut worker) = self.worker.try_borrow_mut() {
                worker.on_request_gone(self.context_id);
            }
        }
    }
}

/// The upstream's `:status`, parsed from the bytes the host hands over.
fn response_status() -> Option<u16> {
    let bytes = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
        .ok()
        .flatten()?;
    parse_status(&bytes)
}

/// A three-digit HTTP status.
fn parse_status(bytes: &[u8]) -> Option<u16> {
    match bytes {
        [a, b, c] if bytes.iter().all(u8::is_ascii_digit) => {
            Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => None,
    }
}
