//! Safe wrappers over the Envoy callbacks in [`crate::abi`]: the only place besides
//! `ffi.rs` that calls into Envoy.

use crate::abi::{self, HttpFilterConfigEnvoyPtr, HttpFilterEnvoyPtr};

/// Severity of a module log line (a subset of Envoy's levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Per-request detail.
    Debug,
    /// Notable events.
    Info,
    /// Something failed, the filter copes.
    Warn,
    /// Something failed, a request or a configuration was refused.
    Error,
}

impl LogLevel {
    fn raw(self) -> abi::LogLevel {
        match self {
            LogLevel::Debug => abi::LOG_DEBUG,
            LogLevel::Info => abi::LOG_INFO,
            LogLevel::Warn => abi::LOG_WARN,
            LogLevel::Error => abi::LOG_ERROR,
        }
    }
}

/// Writes a line to Envoy's log (logger `dynamic_modules`). Never pass secrets.
pub fn log(level: LogLevel, message: &str) {
    // SAFETY: the buffer lends `message` for the duration of the call; Envoy copies it.
    unsafe {
        abi::envoy_dynamic_module_callback_log(level.raw(), abi::module_buffer(message.as_bytes()))
    }
}

/// Whether Envoy writes lines of `level` for the `dynamic_modules` logger.
pub fn log_enabled(level: LogLevel) -> bool {
    // SAFETY: a plain query without pointers.
    unsafe { abi::envoy_dynamic_module_callback_log_enabled(level.raw()) }
}

/// A per-stream scheduler: `commit` may be called from any thread while the scheduler
/// lives; the event runs `on_http_filter_scheduled` on the stream's worker thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduler(abi::HttpFilterSchedulerModulePtr);

// SAFETY: Envoy documents the scheduler as usable from any thread (that is its purpose);
// the module keeps every commit before the matching delete (see `adapter`).
unsafe impl Send for Scheduler {}

impl Scheduler {
    /// Schedules `event_id` on the scheduler's stream.
    pub fn commit(self, event_id: u64) {
        if !self.0.is_null() {
            // SAFETY: a live scheduler (the caller keeps commits before the delete).
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_scheduler_commit(self.0, event_id)
            }
        }
    }
}

/// Frees a scheduler; it must not be committed afterwards.
pub fn delete_scheduler(scheduler: Scheduler) {
    if !scheduler.0.is_null() {
        // SAFETY: made by `scheduler_new`, deleted once.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler.0) }
    }
}

/// A configuration scheduler: `commit` from any thread runs
/// `on_http_filter_config_scheduled` on the main thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigScheduler(abi::HttpFilterConfigSchedulerModulePtr);

// SAFETY: made to be committed from any thread; the module keeps commits before the
// delete (see `adapter`).
unsafe impl Send for ConfigScheduler {}

impl ConfigScheduler {
    /// Schedules `event_id` on the main thread.
    pub fn commit(self, event_id: u64) {
        if !self.0.is_null() {
            // SAFETY: a live scheduler (the caller keeps commits before the delete).
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                    self.0, event_id,
                );
            }
        }
    }

    /// Frees the scheduler; it must not be committed afterwards.
    pub fn delete(self) {
        if !self.0.is_null() {
            // SAFETY: made by `config_scheduler_new`, deleted once.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0)
            }
        }
    }
}

/// Envoy's configuration object: `define_counter` during `config_new` only; the
/// scheduler and callouts while the configuration lives (callouts on the main thread).
#[derive(Debug, Clone, Copy)]
pub struct EnvoyConfig(pub HttpFilterConfigEnvoyPtr);

// SAFETY: only a handle; the module uses it on the main thread (callouts), to make a
// scheduler in `config_new`, and to add to its counters, which Envoy keeps atomic, from
// any thread while the configuration lives (see `adapter`).
unsafe impl Send for EnvoyConfig {}
// SAFETY: as for `Send`: the only call made from several threads is `increment`.
unsafe impl Sync for EnvoyConfig {}

impl EnvoyConfig {
    /// A scheduler to the main thread for this configuration.
    pub fn new_scheduler(self) -> ConfigScheduler {
        // SAFETY: the config pointer of a live configuration.
        ConfigScheduler(unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.0)
        })
    }

    /// Sends a callout not bound to a stream (main thread only); `Err` names Envoy's
    /// refusal code.
    pub fn callout(
        self,
        cluster: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, u32> {
        let mut raw: Vec<abi::ModuleHttpHeader> = headers
            .iter()
            .map(|(name, value)| abi::module_header(name, value))
            .collect();
        let mut id = 0u64;
        // SAFETY: a live configuration, on the main thread; everything lent for the call.
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.0,
                &mut id,
                abi::module_buffer(cluster.as_bytes()),
                raw.as_mut_ptr(),
                raw.len(),
                abi::module_buffer(body),
                timeout_ms,
            )
        };
        if result == abi::CALLOUT_INIT_SUCCESS {
            Ok(id)
        } else {
            Err(result)
        }
    }

    /// Adds `value` to counter `id` (defined by this configuration), from any thread
    /// while the configuration lives.
    pub fn increment(self, id: usize, value: u64) {
        // SAFETY: a live configuration; no labels (null, 0), as defined.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(
                self.0,
                id,
                std::ptr::null_mut(),
                0,
                value,
            );
        }
    }

    /// Defines a counter without labels; `None` when Envoy refuses it.
    pub fn define_counter(self, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: `self.0` is the config pointer of the running `config_new`; the name
        // is lent for the call; no labels (null, 0); `id` is a valid out-pointer.
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_define_counter(
                self.0,
                abi::module_buffer(name.as_bytes()),
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        };
        (result == abi::METRICS_SUCCESS).then_some(id)
    }
}

/// Envoy's object for one HTTP stream, valid from `filter_new` to `filter_destroy`.
#[derive(Debug, Clone, Copy)]
pub struct EnvoyFilter(pub HttpFilterEnvoyPtr);

impl EnvoyFilter {
    /// The first value of request header `name` (copied), if present.
    pub fn request_header(self, name: &str) -> Option<Vec<u8>> {
        self.header(abi::HEADER_TYPE_REQUEST, name)
            .and_then(|mut values| (!values.is_empty()).then(|| values.swap_remove(0)))
    }

    /// Every value of request header `name` (copied).
    pub fn request_header_values(self, name: &str) -> Vec<Vec<u8>> {
        self.header(abi::HEADER_TYPE_REQUEST, name)
            .unwrap_or_default()
    }

    /// The first value of request header `name`, lent to `read` with the number of
    /// values the header has; `None` when the header is absent or the map not available.
    /// No copy: the bytes are Envoy's.
    pub fn with_request_header<T>(
        self,
        name: &str,
        read: impl FnOnce(&[u8], usize) -> T,
    ) -> Option<T> {
        self.with_header_value(abi::HEADER_TYPE_REQUEST, name, 0, read)?
    }

    /// The response's `:status`, read in place.
    pub fn response_status(self) -> Option<u16> {
        self.with_header_value(abi::HEADER_TYPE_RESPONSE, ":status", 0, |value, _| {
            std::str::from_utf8(value).ok()?.parse().ok()
        })??
    }

    /// The values of header `name` in map `header_type`, `None` when the map is not
    /// available.
    fn header(self, header_type: abi::HeaderType, name: &str) -> Option<Vec<Vec<u8>>> {
        let first = self.header_value(header_type, name, 0)?;
        let Some((first, count)) = first else {
            return Some(Vec::new());
        };
        let mut values = Vec::with_capacity(count);
        values.push(first);
        for index in 1..count {
            if let Some(Some((value, _))) = self.header_value(header_type, name, index) {
                values.push(value);
            }
        }
        Some(values)
    }

    /// Value `index` of header `name` (copied) and the number of values.
    fn header_value(
        self,
        header_type: abi::HeaderType,
        name: &str,
        index: usize,
    ) -> Option<Option<(Vec<u8>, usize)>> {
        self.with_header_value(header_type, name, index, |value, count| {
            (value.to_vec(), count)
        })
    }

    /// Value `index` of header `name`, lent to `read` with the number of values;
    /// `Some(None)` when the header is absent, `None` when the map is not available.
    fn with_header_value<T>(
        self,
        header_type: abi::HeaderType,
        name: &str,
        index: usize,
        read: impl FnOnce(&[u8], usize) -> T,
    ) -> Option<Option<T>> {
        let mut value = abi::EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        let mut count = 0usize;
        // SAFETY: valid filter pointer (see the type); key lent for the call; valid
        // out-pointers.
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_get_header(
                self.0,
                header_type,
                abi::module_buffer(name.as_bytes()),
                &mut value,
                index,
                &mut count,
            )
        };
        if count == 0 {
            return Some(None);
        }
        if !found {
            return None;
        }
        // SAFETY: Envoy's buffer is valid during this hook, and `read` cannot keep it.
        Some(Some(read(unsafe { abi::envoy_bytes(value) }, count)))
    }

    /// String attribute `attribute_id` of the stream (copied), if it has one.
    pub fn attribute_string(self, attribute_id: abi::AttributeId) -> Option<Vec<u8>> {
        self.with_attribute_string(attribute_id, <[u8]>::to_vec)
    }

    /// String attribute `attribute_id` of the stream, lent to `read`, if it has one. No
    /// copy: the bytes are Envoy's.
    pub fn with_attribute_string<T>(
        self,
        attribute_id: abi::AttributeId,
        read: impl FnOnce(&[u8]) -> T,
    ) -> Option<T> {
        let mut value = abi::EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        // SAFETY: valid filter pointer; `value` is written by Envoy before it returns.
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.0,
                attribute_id,
                &raw mut value,
            )
        };
        // SAFETY: Envoy's buffer is valid during this hook, and `read` cannot keep it.
        found.then(|| read(unsafe { abi::envoy_bytes(value) }))
    }

    /// A scheduler for this stream (to be deleted with [`delete_scheduler`]).
    pub fn new_scheduler(self) -> Scheduler {
        // SAFETY: valid filter pointer.
        Scheduler(unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_new(self.0) })
    }

    /// The size of a request body (`abi::BODY_*_REQUEST`).
    pub fn body_size(self, body_type: abi::BodyType) -> usize {
        // SAFETY: valid filter pointer.
        unsafe { abi::envoy_dynamic_module_callback_http_get_body_size(self.0, body_type) }
    }

    /// A request body (`abi::BODY_*_REQUEST`), copied.
    pub fn body(self, body_type: abi::BodyType) -> Vec<u8> {
        // SAFETY: valid filter pointer.
        let count = unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_chunks_size(self.0, body_type)
        };
        if count == 0 {
            return Vec::new();
        }
        let mut chunks = vec![
            abi::EnvoyBuffer {
                ptr: std::ptr::null(),
                length: 0
            };
            count
        ];
        // SAFETY: valid filter pointer; `chunks` has room for `count` entries.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_chunks(
                self.0,
                body_type,
                chunks.as_mut_ptr(),
            )
        };
        if !ok {
            return Vec::new();
        }
        chunks
            .iter()
            // SAFETY: Envoy's chunks, valid during this hook; copied at once.
            .flat_map(|chunk| unsafe { abi::envoy_bytes(*chunk) }.iter().copied())
            .collect()
    }

    /// Replaces request header `name` with `value`. False when Envoy refused.
    pub fn set_request_header(self, name: &str, value: &[u8]) -> bool {
        // SAFETY: valid filter pointer; name and value lent for the call (Envoy copies).
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.0,
                abi::HEADER_TYPE_REQUEST,
                abi::module_buffer(name.as_bytes()),
                abi::module_buffer(value),
            )
        }
    }

    /// Answers the request locally with `status`, `headers` and `body`.
    pub fn send_response(self, status: u16, headers: &[(&str, &str)], body: &[u8], details: &str) {
        let mut raw: Vec<abi::ModuleHttpHeader> = headers
            .iter()
            .map(|(name, value)| abi::module_header(name, value.as_bytes()))
            .collect();
        // SAFETY: valid filter pointer; headers, body and details are lent for the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.0,
                u32::from(status),
                raw.as_mut_ptr(),
                raw.len(),
                abi::module_buffer(body),
                abi::module_buffer(details.as_bytes()),
            );
        }
    }

    /// Resumes the request paused in `request_headers`.
    pub fn continue_decoding(self) {
        // SAFETY: valid filter pointer.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_decoding(self.0) }
    }
}
