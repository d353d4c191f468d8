//! tokengate's proxy-wasm filter: injects each tenant's provider token into requests.
//!
//! - [`config`]: the filter's JSON configuration, validated at load.
//! - [`ask`]: what a request asks for, read from its headers or body and validated.
//! - [`worker`]: per-worker logic (cache, in-flight fetches, paused requests), host-agnostic.
//! - [`host`]: the host functions and stats the logic needs, as a trait.
//! - `fake` (native builds only): a recording [`host::Host`] with a driven clock, for
//!   tests of the worker that run in microseconds.
//! - [`delivery`]: the header value and the body a token is delivered as.
//! - [`inflight`]: the per-Envoy in-flight marker in shared data (tier 2 of collapsing).
//! - [`slots`]: bounded shared data: per-key records in tables of reused slots.
//! - `records` (native builds only): the same records in least-recently-used maps, for
//!   hosts that can free memory (the native build; the fake host, on request).
//! - [`ready`]: each worker's own cache of ready tokens, coherent with the gateway cache
//!   through write generations.
//! - [`header_pairs`]: a request's header map as the host serialises it, read in place.
//! - [`hits`]: cache hits counted per worker, added to their stat in batches.
//! - `filter` (wasm32 only): the proxy-wasm root and HTTP contexts, thin glue over [`worker`].

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod ask;
pub mod config;
pub mod delivery;
#[cfg(not(target_arch = "wasm32"))]
pub mod fake;
pub mod header_pairs;
pub mod hits;
pub mod host;
pub mod inflight;
pub mod ready;
#[cfg(not(target_arch = "wasm32"))]
pub mod records;
pub mod slots;
pub mod worker;

#[cfg(target_arch = "wasm32")]
mod filter;
