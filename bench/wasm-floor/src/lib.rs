//! The cheapest proxy-wasm filters, built with the same SDK (proxy-wasm 0.2.5),
//! toolchain and profile as tokengate, to measure what a proxy-wasm filter costs per
//! request in Envoy + V8 before it does anything useful (scenario 1's (e), (f), (g)).
//!
//! The plugin configuration is a comma-separated list of the host calls to make on
//! every request, nothing else (no parsing, no cache logic):
//!
//! | op | host call |
//! |---|---|
//! | `get_request_id` | read `x-request-id` (request headers) |
//! | `get_tenant` | read `x-tenant-id` |
//! | `pairs` | read the whole request header map, serialised (`proxy_get_header_map_pairs`), not parsed |
//! | `time` | current time |
//! | `shared_get` | read a 60-byte shared-data value written at configure time |
//! | `metric` | increment a counter |
//! | `metric_get` | read a counter (`proxy_get_metric`) |
//! | `log` | a debug-level log line (formatted; dropped by Envoy at its default level) |
//! | `set_auth` | set `authorization: Bearer <constant>` |
//! | `get_status` | read `:status` of the response headers |
//!
//! An empty configuration makes no host call at all. Scenario 1's (g) makes
//! `get_tenant,time,shared_get,set_auth,get_status`, tokengate's hit path when its goals
//! were set (it made all eight, in this order, before the other three were cut); (gc)
//! makes `pairs,time,metric_get,set_auth,get_status`, the hit path today (see
//! plugin/src/filter.rs and plugin/src/ready.rs).
//!
//! Not a workspace member (it only builds for wasm32): `scripts/bench` builds it into
//! `target/wasm-floor/`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

const SHARED_KEY: &str = "wasm_floor.v1.token.genesys.acme";
const TOKEN: &str = "Bearer gen-acme-1-0123456789abcdef";

/// The entry point Envoy calls when it loads the module.
#[no_mangle]
pub extern "C" fn _initialize() {
    proxy_wasm::set_root_context(|_| {
        Box::new(Root {
            ops: Ops::default(),
        })
    });
}

#[derive(Debug, Default, Clone, Copy)]
struct Ops {
    get_request_id: bool,
    get_tenant: bool,
    time: bool,
    shared_get: bool,
    pairs: bool,
    metric: Option<u32>,
    metric_get: Option<u32>,
    log: bool,
    set_auth: bool,
    get_status: bool,
}

struct Root {
    ops: Ops,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = String::from_utf8_lossy(&config);
        let has = |op: &str| config.split(',').any(|item| item.trim() == op);
        self.ops = Ops {
            get_request_id: has("get_request_id"),
            get_tenant: has("get_tenant"),
            time: has("time"),
            shared_get: has("shared_get"),
            pairs: has("pairs"),
            metric: if has("metric") {
                hostcalls::define_metric(MetricType::Counter, "wasm_floor.hit").ok()
            } else {
                None
            },
            metric_get: if has("metric_get") {
                hostcalls::define_metric(MetricType::Counter, "wasm_floor.generation").ok()
            } else {
                None
            },
            log: has("log"),
            set_auth: has("set_auth"),
            get_status: has("get_status"),
        };
        if self.ops.shared_get {
            let value = [7u8; 60];
            let _ = hostcalls::set_shared_data(SHARED_KEY, Some(&value), None);
        }
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request { ops: self.ops }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    ops: Ops,
}

impl Context for Request {}

fn header(map: MapType, name: &str) -> Vec<u8> {
    hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .unwrap_or_default()
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
}

/// The request's header map as the host serialises it, freed unread.
fn request_header_pairs() {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and a length; the buffer came from the SDK's
    // allocator (a boxed slice of `size` bytes).
    unsafe {
        if proxy_get_header_map_pairs(0, &mut data, &mut size) == 0 && !data.is_null() {
            drop(Vec::from_raw_parts(data, size, size));
        }
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let ops = self.ops;
        let request_id = if ops.get_request_id {
            header(MapType::HttpRequestHeaders, "x-request-id")
        } else {
            Vec::new()
        };
        let tenant = if ops.get_tenant {
            header(MapType::HttpRequestHeaders, "x-tenant-id")
        } else {
            Vec::new()
        };
        if ops.pairs {
            request_header_pairs();
        }
        if ops.time {
            let _ = hostcalls::get_current_time();
        }
        if ops.shared_get {
            let _ = hostcalls::get_shared_data(SHARED_KEY);
        }
        if let Some(id) = ops.metric_get {
            let _ = hostcalls::get_metric(id);
        }
        if let Some(id) = ops.metric {
            let _ = hostcalls::increment_metric(id, 1);
        }
        if ops.log {
            let _ = hostcalls::log(
                LogLevel::Debug,
                &format!(
                    "token request genesys:{} source=cache duration_ms=0 correlation_id={}",
                    String::from_utf8_lossy(&tenant),
                    String::from_utf8_lossy(&request_id)
                ),
            );
        }
        if ops.set_auth {
            let _ =
                hostcalls::set_map_value(MapType::HttpRequestHeaders, "authorization", Some(TOKEN));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if self.ops.get_status {
            let _ = header(MapType::HttpResponseHeaders, ":status");
        }
        Action::Continue
    }
}
