//! tokengate as an Envoy dynamic module: `libtokengate_native.so`, loaded by Envoy **1.40.0**
//! through `envoy.filters.http.dynamic_modules` (no Wasm VM, native speed). It reads
//! the same filter configuration as `tokengate.wasm`, with the same parser
//! (`tokengate::config::FilterConfig::parse`).
//!
//! It runs the wasm filter's own logic: `tokengate::worker::Worker` (one per Envoy worker
//! thread) behind a dynamic-module implementation of `tokengate::host::Host` (see
//! `adapter`). Both modes (inject, endpoint) and both fetch paths (`gateway`, `companion`)
//! run; `tests/tests/native.rs` proves them on a real Envoy 1.40 (the gateway path with
//! the companion up, leasing through Redis, and with it down, in local mode).
//!
//! - [`abi`]: the C declarations used, by hand, for Envoy 1.40's ABI (`v0.2.0`).
//! - `envoy`: safe wrappers over those callbacks.
//! - `ffi`: the exported `envoy_dynamic_module_on_*` hooks, each inside `catch_unwind`.
//! - `adapter`: the only user of `tokengate::worker` / `tokengate::host` / `tokengate::hits`:
//!   per-thread workers, the `Host`, shared data, carriers, schedulers and ticks.
//! - `local`: each thread's copies of token records, for hits without a lock (its
//!   module documentation holds the coherence argument).
//!
//! # Build
//!
//! `cargo build -p tokengate-native` writes `target/debug/libtokengate_native.so`. For
//! production use `cargo build -p tokengate-native --profile native`
//! (`target/native/libtokengate_native.so`): the workspace's `release` profile has
//! `panic = "abort"`, under which `catch_unwind` catches nothing and any panic would
//! take Envoy down; the `native` profile is `release` with `panic = "unwind"`.
//!
//! # Loading
//!
//! ```yaml
//! - name: tokengate
//!   typed_config:
//!     "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
//!     dynamic_module_config: { name: tokengate_native }   # lib<name>.so, see below
//!     filter_name: tokengate
//!     filter_config:
//!       "@type": type.googleapis.com/google.protobuf.StringValue
//!       value: '{"fetch":"companion", ...}'          # the wasm filter's JSON
//! ```
//!
//! Envoy looks for `libtokengate_native.so` in `$ENVOY_DYNAMIC_MODULES_SEARCH_PATH` (see
//! `envoy/filter-native.yaml.tmpl`, the filter block of `envoy/local.yaml.tmpl` that the
//! tests' harness loads when `TOKENGATE_FILTER=native`).
//!
//! # ABI version (found on the 1.40.0 binary)
//!
//! `envoy_dynamic_module_on_program_init` returns the ABI version string. Envoy 1.40.0
//! logs `Dynamic module ABI version v0.2.0 matched.` for `v0.2.0` (the only `v0.*`
//! string in the binary). For another string it does NOT refuse the module: it logs, at
//! warning level, `Dynamic module ABI version <x> is deprecated. Please recompile the
//! module against the SDK with the exact Envoy version used by the main program.` and
//! goes on. So a module built for another Envoy loads and then calls callbacks whose
//! signatures may differ: the version check is no safety net, the build must target the
//! exact Envoy release (`tests/tests/native.rs` pins this behaviour).
//!
//! # What Envoy 1.40's ABI offers (checked against the binary's symbols)
//!
//! "Run" marks what this crate exercises in its tests; the rest is read in the header
//! (`abi/abi.h`) and Envoy's sources.
//!
//! - **Request headers**: `callback_http_get_header` (value `index` of a key, and the
//!   count), `get_headers` / `get_headers_size`, `set_header` (replace; null value
//!   removes), `add_header`. Usable in any hook of the stream while its request headers
//!   exist, so also in `on_http_filter_http_callout_done` and `on_http_filter_scheduled`
//!   (run: get/set, also from a scheduled event).
//! - **Local reply**: `callback_http_send_response(status, headers, body, details)`;
//!   also `send_response_headers` / `_data` / `_trailers` for a streamed answer (run:
//!   `send_response`, from `request_headers`, `request_body` and a scheduled event).
//! - **Callouts bound to a stream**: `callback_http_filter_http_callout(cluster,
//!   headers incl. :method/:path/host, body, timeout)` -> id; the answer arrives in
//!   `on_http_filter_http_callout_done` (result, headers, body chunks) on the stream's
//!   worker thread; Envoy cancels it when the stream is destroyed first (seen: a callout
//!   carried by a request that went on upstream and finished was reset). Streamed
//!   variant: `filter_start_http_stream` + `on_http_filter_http_stream_*`.
//! - **Callouts not bound to a stream**: `callback_http_filter_config_http_callout` (and
//!   `config_start_http_stream`) on the filter *configuration*; the answer arrives in the
//!   optional hook `on_http_filter_config_http_callout_done`. Envoy 1.40 sends it through
//!   the thread-local cluster of the calling thread and delivers the answer on that
//!   thread (its implementation keeps the pending callouts in a map on the config
//!   object without a lock, so call it from the main thread only: this module calls it
//!   from `on_http_filter_config_scheduled`, and it works there: run). Bootstrap
//!   extensions have their own (`bootstrap_extension_http_callout`).
//! - **Schedulers**: `callback_http_filter_scheduler_new/commit/delete` (per stream):
//!   `commit` may be called from any thread and runs `on_http_filter_scheduled(event_id)`
//!   on the **stream's worker thread** — this is how another event (another worker, the
//!   main thread) wakes a paused request. `callback_http_filter_config_scheduler_*` (per
//!   configuration): `commit` from any thread runs `on_http_filter_config_scheduled` on
//!   the **main thread** (run: both, committed from worker threads, the main thread and
//!   the module's own ticker thread). There is no per-worker timer for HTTP filters (no
//!   `on_tick`); bootstrap extensions have timers (`on_bootstrap_extension_timer_fired`).
//! - **Resume a paused request**: `callback_http_filter_continue_decoding` (and
//!   `continue_encoding`), called on the stream's worker thread (from a callout answer
//!   or a scheduled event; run: from a scheduled event).
//! - **Metrics**: `callback_http_filter_config_define_counter/gauge/histogram` (only in
//!   `config_new`: later Envoy answers `Frozen`), with optional labels; per-stream
//!   `http_filter_increment_counter`, `increment/decrement/set_gauge`,
//!   `record_histogram_value`; config-level variants (`http_filter_config_increment_counter`
//!   ...) for events outside a stream. Stats appear as `<metrics_namespace>.<name>`, by
//!   default `dynamicmodulescustom.tokengate.cache_hit` (run: counters).
//! - **Logging**: `callback_log(level, message)` writes under Envoy's `dynamic_modules`
//!   logger (the line shows `[dynamic_modules] [:]`); `callback_log_enabled(level)` is
//!   the cheap level query; `get_log_level` exists too (run: log, log_enabled).
//! - **Misc**: `http_filter_get_worker_index`, `get_concurrency` (main thread, in
//!   `program_init`), `register_shared_data` / `get_shared_data` (a process-wide
//!   registry of module pointers), generic secrets (`config_get_generic_secret`).
//!
//! # How the worker is driven (details in `adapter`)
//!
//! - One `Worker` per Envoy worker thread and configuration, behind a mutex that the
//!   thread's stream hooks and Envoy's main thread share.
//! - The gateway cache: one least-recently-used map per record table, process-wide,
//!   bounded by `cache.maxTenants` (`tokengate::records`), in place of proxy-wasm's shared data.
//! - No work waits for traffic: callouts leave from the main thread (configuration
//!   callouts, sent from `on_http_filter_config_scheduled`), so no request's end cancels
//!   them, and their answers are handled there at once; ticks (backoffs, deadlines,
//!   refresh-ahead, lease-end retries) and wake-ups are events on the configuration's
//!   scheduler, which a module-owned ticker thread commits when they are due.
//! - Resume / reply: an event committed on the paused stream's own scheduler, applied
//!   in `on_http_filter_scheduled` on the stream's thread.
//!
//! # Not done yet
//!
//! - Per-route configuration; the hooks' `catch_unwind` has no automated test (a cdylib
//!   linking Envoy's symbols has no native unit tests): checked by hand with a panic
//!   planted in `request_headers`: Envoy logged `tokengate: panic in
//!   http_filter_request_headers: ...`, answered 500 and stayed live.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
// A dynamic module is a C ABI boundary: the hooks receive raw pointers from Envoy and
// call Envoy's C callbacks, which only `unsafe` can do. The workspace denies
// `unsafe_code`; here it is allowed, confined to `abi`, `envoy` and `ffi`, every block
// with a SAFETY comment.
#![allow(unsafe_code)]

pub mod abi;
mod adapter;
mod envoy;
mod ffi;
mod local;
