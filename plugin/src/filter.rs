//! The proxy-wasm glue: one root context per Envoy worker owning a [`Worker`], and a
//! thin HTTP context per request. Nothing here decides anything; it translates
//! between proxy-wasm calls and the worker.

#![allow(unsafe_code)] // `#[unsafe(no_mangle)]` on the module's entry point.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

use tokengate_core::{CalloutResult, SecretBytes, TenantId, TokenKey};

use crate::config::FilterConfig;
use crate::host::{Callout, Host, Level};
use crate::worker::{Decision, Worker};

/// The entry point Envoy calls when it loads the module.
#[unsafe(no_mangle)]
pub extern "C" fn _initialize() {
    proxy_wasm::set_root_context(|context_id| Box::new(Root { context_id, worker: None }));
}

/// [`Host`] over the proxy-wasm host functions.
struct ProxyWasmHost {
    /// The root context: callouts and timers belong to it, so the effective context
    /// is set back to it after touching a request's context.
    root_context_id: u32,
}

impl Host for ProxyWasmHost {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|now| now.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    fn dispatch(&mut self, callout: Callout<'_>) -> Result<u32, String> {
        let mut headers = vec![(":method", callout.method), (":path", callout.path), (":authority", callout.authority)];
        headers.extend(callout.headers);
        hostcalls::dispatch_http_call(
            callout.cluster,
            headers,
            callout.body,
            Vec::new(),
            Duration::from_millis(callout.timeout_ms),
        )
        .map_err(|status| format!("cluster '{}' refused the call ({status:?})", callout.cluster))
    }

    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(key).ok().and_then(|(value, _cas)| value)
    }

    fn shared_set(&mut self, key: &str, value: &[u8]) {
        if let Err(status) = hostcalls::set_shared_data(key, Some(value), None) {
            self.log(Level::Warn, &format!("shared data write failed ({status:?})"));
        }
    }

    fn resume_with_header(&mut self, context_id: u32, header: &str, value: &str) -> bool {
        if hostcalls::set_effective_context(context_id).is_err() {
            return false;
        }
        let done = hostcalls::set_map_value(MapType::HttpRequestHeaders, header, Some(value)).is_ok()
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

fn send_json(status: u16, body: &[u8]) -> bool {
    hostcalls::send_http_response(u32::from(status), vec![("content-type", "application/json")], Some(body)).is_ok()
}

/// One per worker: owns the worker state once the configuration is accepted.
struct Root {
    context_id: u32,
    worker: Option<Rc<RefCell<Worker>>>,
}

impl Root {
    fn host(&self) -> ProxyWasmHost {
        ProxyWasmHost { root_context_id: self.context_id }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(worker) = &self.worker else { return };
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|status| status.parse::<u16>().ok());
        let result = match status {
            Some(status) => {
                let retry_after_secs = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, "retry-after")
                    .ok()
                    .flatten()
                    .and_then(|value| value.trim().parse::<u64>().ok());
                let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                CalloutResult::Response { status, body: SecretBytes::new(body), retry_after_secs }
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
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        match FilterConfig::parse(&bytes) {
            Ok(config) => {
                self.worker = Some(Rc::new(RefCell::new(Worker::new(config))));
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

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let worker = self.worker.clone()?;
        Some(Box::new(Request { context_id, root_context_id: self.context_id, worker }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One per request: resolves the tenant and hands over to the worker.
struct Request {
    context_id: u32,
    root_context_id: u32,
    worker: Rc<RefCell<Worker>>,
}

impl Request {
    fn header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name).ok().flatten()
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut host = ProxyWasmHost { root_context_id: self.root_context_id };
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            send_json(500, br#"{"code":"INTERNAL_ERROR","message":"tokengate worker busy"}"#);
            return Action::Pause;
        };
        let correlation_id = self.header("x-request-id");
        let raw_tenant = self.header(&worker.config().tenant_header).unwrap_or_default();
        let tenant_id = match TenantId::parse(&raw_tenant) {
            Ok(tenant_id) => tenant_id,
            Err(error) => {
                let body = error.to_body(None, correlation_id.as_deref());
                send_json(error.http_status(), &body.to_json());
                return Action::Pause;
            }
        };
        let key = TokenKey::new(worker.config().provider, tenant_id);
        match worker.on_request(&mut host, self.context_id, key, correlation_id) {
            Decision::Inject(token) => {
                let bearer = tokengate_core::SecretString::new(format!("Bearer {}", token.expose()));
                let header = worker.config().authorization_header.clone();
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, &header, Some(bearer.expose()));
                Action::Continue
            }
            Decision::Pause => Action::Pause,
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            worker.on_request_gone(self.context_id);
        }
    }
}
