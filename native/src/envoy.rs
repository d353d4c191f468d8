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

/// Whether Envoy writes trace lines (not used by the filter yet; kept for the Host).
#[allow(dead_code)]
pub fn trace_enabled() -> bool {
    // SAFETY: a plain query without pointers.
    unsafe { abi::envoy_dynamic_module_callback_log_enabled(abi::LOG_TRACE) }
}

/// Envoy's configuration object, valid during `config_new` (for defining metrics).
#[derive(Debug, Clone, Copy)]
pub struct EnvoyConfig(pub HttpFilterConfigEnvoyPtr);

impl EnvoyConfig {
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
                abi::HEADER_TYPE_REQUEST,
                abi::module_buffer(name.as_bytes()),
                &mut value,
                0,
                &mut count,
            )
        };
        if !found || count == 0 {
            return None;
        }
        // SAFETY: Envoy's buffer is valid during this hook; copied at once.
        Some(unsafe { abi::envoy_bytes(value) }.to_vec())
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

    /// Sends an HTTP callout bound to this stream; `Err` names Envoy's refusal code.
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
        // SAFETY: valid filter pointer; everything lent for the call (Envoy copies the
        // request into its own message before returning); `id` is a valid out-pointer.
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_http_callout(
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

    /// Adds `value` to counter `id` (defined by this stream's configuration).
    pub fn increment(self, id: usize, value: u64) {
        // SAFETY: valid filter pointer; no labels (null, 0), as defined.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_increment_counter(
                self.0,
                id,
                std::ptr::null_mut(),
                0,
                value,
            );
        }
    }

    /// The index of the worker thread running this stream (the worker id, once the
    /// adapter drives `tokengate::worker`).
    #[allow(dead_code)]
    pub fn worker_index(self) -> u32 {
        // SAFETY: valid filter pointer.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_get_worker_index(self.0) }
    }
}
