//! The cheapest HTTP filter an Envoy 1.40 dynamic module can be: on the request
//! headers it reads `x-tenant-id` and sets `authorization` to a constant, and does
//! nothing else (no allocation, no state, no stats). Scenario 1 of `scripts/bench`
//! measures it as (h), next to tokengate's native build (n): h/a is the floor of any
//! native filter on this Envoy, n/h what tokengate's own code costs over it.
//!
//! The declarations are tokengate-native's (`native/src/abi.rs`, included as they are);
//! every hook Envoy 1.40 requires is exported, most of them empty.

use std::ffi::c_char;

#[path = "../../../native/src/abi.rs"]
#[allow(dead_code)]
mod abi;

use abi::{
    BodyStatus, CalloutResult, EnvoyBuffer, EnvoyHttpHeader, HeadersStatus,
    HttpFilterConfigEnvoyPtr, HttpFilterConfigModulePtr, HttpFilterEnvoyPtr, HttpFilterModulePtr,
    LocalReplyStatus, TrailersStatus,
};

/// What Envoy gets as the configuration and as every stream's filter: never read.
static MARK: u8 = 0;

fn mark() -> *const std::ffi::c_void {
    (&raw const MARK).cast()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    abi::ABI_VERSION.as_ptr()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: HttpFilterConfigEnvoyPtr,
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> HttpFilterConfigModulePtr {
    mark()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    _config: HttpFilterConfigModulePtr,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    _config: HttpFilterConfigModulePtr,
    _filter_envoy: HttpFilterEnvoyPtr,
) -> HttpFilterModulePtr {
    mark()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_filter: HttpFilterModulePtr) {}

/// Reads `x-tenant-id`, sets `authorization`: the two host calls of a token injector.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _end_of_stream: bool,
) -> HeadersStatus {
    let mut value = EnvoyBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };
    let mut count = 0usize;
    // SAFETY: Envoy's filter pointer for this hook; the name is lent for the call, and
    // Envoy writes `value` and `count` before it returns.
    let found = unsafe {
        abi::envoy_dynamic_module_callback_http_get_header(
            filter_envoy,
            abi::HEADER_TYPE_REQUEST,
            abi::module_buffer(b"x-tenant-id"),
            &raw mut value,
            0,
            &raw mut count,
        )
    };
    if found && count > 0 {
        // SAFETY: as above; Envoy copies name and value.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                filter_envoy,
                abi::HEADER_TYPE_REQUEST,
                abi::module_buffer(b"authorization"),
                abi::module_buffer(b"Bearer floor-token"),
            );
        }
    }
    abi::HEADERS_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _end_of_stream: bool,
) -> BodyStatus {
    abi::BODY_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
) -> TrailersStatus {
    abi::TRAILERS_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _end_of_stream: bool,
) -> HeadersStatus {
    abi::HEADERS_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _end_of_stream: bool,
) -> BodyStatus {
    abi::BODY_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
) -> TrailersStatus {
    abi::TRAILERS_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _callout_id: u64,
    _result: CalloutResult,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _body_chunks: *mut EnvoyBuffer,
    _body_chunks_size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _config_envoy: HttpFilterConfigEnvoyPtr,
    _config: HttpFilterConfigModulePtr,
    _event_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy: HttpFilterConfigEnvoyPtr,
    _config: HttpFilterConfigModulePtr,
    _callout_id: u64,
    _result: CalloutResult,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _body_chunks: *mut EnvoyBuffer,
    _body_chunks_size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _stream_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _event_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _filter_envoy: HttpFilterEnvoyPtr,
    _filter: HttpFilterModulePtr,
    _response_code: u32,
    _details: EnvoyBuffer,
    _reset_imminent: bool,
) -> LocalReplyStatus {
    abi::LOCAL_REPLY_CONTINUE
}
