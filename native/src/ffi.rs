//! The event hooks Envoy calls (`envoy_dynamic_module_on_*`), exported from the `.so`.
//!
//! Every hook runs its body inside [`guard`] (`std::panic::catch_unwind`): a panic that
//! crossed into Envoy's C++ frames would abort Envoy. A caught panic is logged and the
//! hook answers its safest value (no config, fail the request, continue).
//!
//! Pointer ownership: `config_new` returns a leaked `Box<Arc<NativeConfig>>`, freed in
//! `config_destroy`; `filter_new` returns a leaked `Box<Stream>`, freed in
//! `filter_destroy`. Envoy calls every hook of one stream on that stream's worker
//! thread, and keeps a configuration alive while it has streams.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::abi::{
    self, BodyStatus, CalloutResult, EnvoyBuffer, EnvoyHttpHeader, HeadersStatus,
    HttpFilterConfigEnvoyPtr, HttpFilterConfigModulePtr, HttpFilterEnvoyPtr, HttpFilterModulePtr,
    LocalReplyStatus, TrailersStatus,
};
use crate::adapter::{BodyVerdict, HeadersVerdict, NativeConfig, RawAnswer, Stream};
use crate::envoy::{self, EnvoyConfig, EnvoyFilter, LogLevel};

/// The text of a panic payload.
fn panic_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs `body`; on a panic logs it and returns `fallback`.
fn guard<T>(hook: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            // Logging itself must not unwind out of the hook either.
            let _ = catch_unwind(AssertUnwindSafe(|| {
                envoy::log(
                    LogLevel::Error,
                    &format!(
                        "tokengate: panic in {hook}: {}",
                        panic_text(payload.as_ref())
                    ),
                );
            }));
            fallback
        }
    }
}

/// The module's stream behind `ptr`.
///
/// # Safety
/// `ptr` must be a pointer returned by `envoy_dynamic_module_on_http_filter_new` and not
/// yet destroyed; Envoy calls one stream's hooks one at a time, on one thread.
unsafe fn filter_mut<'a>(ptr: HttpFilterModulePtr) -> Option<&'a mut Stream> {
    // SAFETY: per the function's contract.
    unsafe { ptr.cast::<Stream>().cast_mut().as_mut() }
}

/// Envoy loaded the module (main thread). Returns the ABI version it was built for.
///
/// `TOKENGATE_NATIVE_ABI_VERSION`, when set, replaces the version: a test hook to see
/// what Envoy does with a module built for another ABI (`tests/tests/native.rs`).
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const std::ffi::c_char {
    guard("program_init", abi::ABI_VERSION.as_ptr(), || {
        match std::env::var("TOKENGATE_NATIVE_ABI_VERSION") {
            Ok(version) => match std::ffi::CString::new(version) {
                // Leaked once per process: Envoy reads the string after we return.
                Ok(version) => version.into_raw().cast_const(),
                Err(_) => abi::ABI_VERSION.as_ptr(),
            },
            Err(_) => abi::ABI_VERSION.as_ptr(),
        }
    })
}

/// A filter configuration arrived (main thread): parse it with the wasm filter's parser.
/// Null refuses it; Envoy then rejects the listener ("Failed to initialize dynamic module").
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> HttpFilterConfigModulePtr {
    guard("http_filter_config_new", std::ptr::null(), || {
        // SAFETY: both buffers come from Envoy for this hook and are read before it returns.
        let (name, config) = unsafe { (abi::envoy_bytes(name), abi::envoy_bytes(config)) };
        match NativeConfig::new(EnvoyConfig(filter_config_envoy_ptr), config) {
            Ok(native) => {
                envoy::log(
                    LogLevel::Info,
                    &format!(
                        "tokengate: filter '{}' configured ({})",
                        String::from_utf8_lossy(name),
                        native.describe()
                    ),
                );
                Box::into_raw(Box::new(Arc::new(native)))
                    .cast_const()
                    .cast()
            }
            Err(error) => {
                envoy::log(LogLevel::Error, &format!("tokengate: {error}"));
                std::ptr::null()
            }
        }
    })
}

/// Envoy dropped a configuration.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    filter_config_ptr: HttpFilterConfigModulePtr,
) {
    guard("http_filter_config_destroy", (), || {
        if !filter_config_ptr.is_null() {
            // SAFETY: see `config_ref`.
            if let Some(config) = unsafe { config_ref(filter_config_ptr) } {
                config.shutdown();
            }
            // SAFETY: made by Box::into_raw in config_new; Envoy destroys it once.
            drop(unsafe {
                Box::from_raw(filter_config_ptr.cast::<Arc<NativeConfig>>().cast_mut())
            });
        }
    });
}

/// A stream starts (worker thread).
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    filter_config_ptr: HttpFilterConfigModulePtr,
    filter_envoy_ptr: HttpFilterEnvoyPtr,
) -> HttpFilterModulePtr {
    guard("http_filter_new", std::ptr::null(), || {
        // SAFETY: the config pointer from config_new, alive while Envoy creates filters of it.
        let Some(config) = (unsafe { filter_config_ptr.cast::<Arc<NativeConfig>>().as_ref() })
        else {
            return std::ptr::null();
        };
        let stream = Stream::new(config, EnvoyFilter(filter_envoy_ptr));
        Box::into_raw(Box::new(stream)).cast_const().cast()
    })
}

/// A stream ends: free its filter.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(
    filter_module_ptr: HttpFilterModulePtr,
) {
    guard("http_filter_destroy", (), || {
        if !filter_module_ptr.is_null() {
            // SAFETY: made by Box::into_raw in filter_new; Envoy destroys it once.
            drop(unsafe { Box::from_raw(filter_module_ptr.cast::<Stream>().cast_mut()) });
        }
    });
}

/// The request headers arrived.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    end_of_stream: bool,
) -> HeadersStatus {
    let envoy = EnvoyFilter(filter_envoy_ptr);
    let answered = guard("http_filter_request_headers", None, || {
        // SAFETY: see `filter_mut`.
        let stream = unsafe { filter_mut(filter_module_ptr) }?;
        Some(match stream.on_request_headers(end_of_stream) {
            HeadersVerdict::Continue => abi::HEADERS_CONTINUE,
            HeadersVerdict::Pause => abi::HEADERS_STOP_ALL_AND_BUFFER,
            HeadersVerdict::AwaitBody => abi::HEADERS_STOP_ITERATION_KEEP_BODY,
            HeadersVerdict::Answered => abi::HEADERS_STOP_ITERATION,
        })
    });
    answered.unwrap_or_else(|| {
        // Fail closed: no request goes upstream without its token.
        guard("http_filter_request_headers (failure reply)", (), || {
            envoy.send_response(
                500,
                &[("x-tokengate-reply", "1")],
                b"",
                "tokengate_internal_error",
            );
        });
        abi::HEADERS_STOP_ITERATION
    })
}

/// A chunk of request body: held back while the headers are paused.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    end_of_stream: bool,
) -> BodyStatus {
    let envoy = EnvoyFilter(filter_envoy_ptr);
    guard("http_filter_request_body", abi::BODY_CONTINUE, || {
        // SAFETY: see `filter_mut`.
        let Some(stream) = (unsafe { filter_mut(filter_module_ptr) }) else {
            return abi::BODY_CONTINUE;
        };
        let size = envoy
            .body_size(abi::BODY_BUFFERED_REQUEST)
            .saturating_add(envoy.body_size(abi::BODY_RECEIVED_REQUEST));
        let body = || {
            let mut body = envoy.body(abi::BODY_BUFFERED_REQUEST);
            body.extend(envoy.body(abi::BODY_RECEIVED_REQUEST));
            body
        };
        match stream.on_request_body(end_of_stream, size, body) {
            BodyVerdict::Continue => abi::BODY_CONTINUE,
            BodyVerdict::Hold => abi::BODY_STOP_AND_BUFFER,
        }
    })
}

/// Request trailers: held back while the headers are paused.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
) -> TrailersStatus {
    guard(
        "http_filter_request_trailers",
        abi::TRAILERS_CONTINUE,
        || {
            // SAFETY: see `filter_mut`.
            match unsafe { filter_mut(filter_module_ptr) } {
                Some(filter) if filter.paused() => abi::TRAILERS_STOP,
                _ => abi::TRAILERS_CONTINUE,
            }
        },
    )
}

/// Response headers: passed on (purge on 401 is the worker's job, see the crate docs).
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    _end_of_stream: bool,
) -> HeadersStatus {
    guard("http_filter_response_headers", (), || {
        // SAFETY: see `filter_mut`.
        if let Some(stream) = unsafe { filter_mut(filter_module_ptr) } {
            stream.on_response_headers();
        }
    });
    abi::HEADERS_CONTINUE
}

/// Response body: passed on.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _end_of_stream: bool,
) -> BodyStatus {
    abi::BODY_CONTINUE
}

/// Response trailers: passed on.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
) -> TrailersStatus {
    abi::TRAILERS_CONTINUE
}

/// The stream is complete (before destroy and the access logs).
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
) {
    guard("http_filter_stream_complete", (), || {
        // SAFETY: see `filter_mut`.
        if let Some(stream) = unsafe { filter_mut(filter_module_ptr) } {
            stream.on_stream_complete();
        }
    });
}

/// Stream-bound callouts are not used (the worker's callouts leave from the main
/// thread, see `adapter`): the hook exists because Envoy 1.40 requires it.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _callout_id: u64,
    _result: CalloutResult,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _body_chunks: *mut EnvoyBuffer,
    _body_chunks_size: usize,
) {
}

/// The configuration behind `ptr`.
///
/// # Safety
/// `ptr` is null or a pointer returned by `config_new` and not yet destroyed.
unsafe fn config_ref<'a>(ptr: HttpFilterConfigModulePtr) -> Option<&'a Arc<NativeConfig>> {
    // SAFETY: per the function's contract.
    unsafe { ptr.cast::<Arc<NativeConfig>>().as_ref() }
}

/// Main thread: an event committed on the configuration's scheduler (send callouts).
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
    filter_config_ptr: HttpFilterConfigModulePtr,
    event_id: u64,
) {
    guard("http_filter_config_scheduled", (), || {
        // SAFETY: see `config_ref`.
        if let Some(config) = unsafe { config_ref(filter_config_ptr) } {
            config.on_main_scheduled(event_id);
        }
    });
}

/// Main thread: a configuration callout ended.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
    filter_config_ptr: HttpFilterConfigModulePtr,
    callout_id: u64,
    result: CalloutResult,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) {
    guard("http_filter_config_http_callout_done", (), || {
        // SAFETY: see `config_ref`.
        let Some(config) = (unsafe { config_ref(filter_config_ptr) }) else {
            return;
        };
        let answer = (result == abi::CALLOUT_SUCCESS).then(|| {
            // SAFETY: Envoy's arrays of `*_size` entries, valid during this hook.
            let headers = unsafe { envoy_slice(headers, headers_size) };
            let number = |name: &[u8]| {
                headers.iter().find_map(|header| {
                    // SAFETY: as above.
                    let (key, value) = unsafe { envoy_pair(header) };
                    if !key.eq_ignore_ascii_case(name) {
                        return None;
                    }
                    std::str::from_utf8(value).ok()?.trim().parse::<u64>().ok()
                })
            };
            let status = number(b":status").and_then(|status| u16::try_from(status).ok());
            let retry_after_secs = number(b"retry-after");
            // SAFETY: as above.
            let chunks = unsafe { envoy_slice(body_chunks, body_chunks_size) };
            RawAnswer {
                status,
                retry_after_secs,
                // SAFETY: as above; read before the hook returns.
                body: chunks
                    .iter()
                    .map(|chunk| unsafe { abi::envoy_bytes(*chunk) })
                    .collect(),
            }
        });
        config.on_main_callout_done(callout_id, answer);
    });
}

/// An array Envoy lends for the current hook.
///
/// # Safety
/// `ptr` is null or points to `len` initialised values valid for the current hook.
unsafe fn envoy_slice<'a, T>(ptr: *mut T, len: usize) -> &'a [T] {
    if ptr.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: per the function's contract.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// The name and value bytes of an Envoy header.
///
/// # Safety
/// `header` comes from Envoy in the current hook.
unsafe fn envoy_pair(header: &EnvoyHttpHeader) -> (&[u8], &[u8]) {
    // SAFETY: per the function's contract (Envoy memory valid for the hook).
    unsafe {
        (
            abi::envoy_bytes(EnvoyBuffer {
                ptr: header.key_ptr,
                length: header.key_length,
            }),
            abi::envoy_bytes(EnvoyBuffer {
                ptr: header.value_ptr,
                length: header.value_length,
            }),
        )
    }
}

/// Streamed callouts are not used: the hooks exist because Envoy 1.40 requires them.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

/// Streamed callouts are not used.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

/// Streamed callouts are not used.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

/// Streamed callouts are not used.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _stream_id: u64,
) {
}

/// Streamed callouts are not used.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

/// An event committed on this stream's scheduler (delivery, tick, wake-up).
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    event_id: u64,
) {
    guard("http_filter_scheduled", (), || {
        // SAFETY: see `filter_mut`.
        if let Some(stream) = unsafe { filter_mut(filter_module_ptr) } {
            stream.on_scheduled(event_id);
        }
    });
}

/// Flow control of terminal filters: not one.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
) {
}

/// Flow control of terminal filters: not one.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
) {
}

/// A local reply is being sent on the stream (ours or another filter's): let it go.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _filter_envoy_ptr: HttpFilterEnvoyPtr,
    _filter_module_ptr: HttpFilterModulePtr,
    _response_code: u32,
    _details: EnvoyBuffer,
    _reset_imminent: bool,
) -> LocalReplyStatus {
    abi::LOCAL_REPLY_CONTINUE
}
