//! What a cache hit costs the worker, counted rather than timed (a timing on a shared
//! machine says little): the host calls it makes and the allocations it does, with
//! the worker's own token cache ([`tokengate::ready`]) and, for comparison, with a host
//! that keeps no generations (every hit reads and decodes the gateway cache's slot, as
//! the wasm build did before). `--nocapture` prints the counts.
//!
//! The fake host stands in for proxy-wasm: where Envoy copies shared data into the VM
//! (an allocation of the VM's), the fake clones it, so the allocations counted are the
//! VM's. The filter's own share of a hit (the header map buffer, the tenant id, the
//! request's context) is outside the worker and not counted here.

#![allow(unsafe_code)] // the counting allocator hands every call to the system one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use tokengate::config::FilterConfig;
use tokengate::fake::{FakeEnvoy, FakeHost};
use tokengate::host::{Callout, Host, Level, Metric};
use tokengate::slots::{Eviction, Table};
use tokengate::worker::{Decision, Delivery, RequestIds, TokenAsk, Worker};
use tokengate_core::cache::GatewayEntry;
use tokengate_core::{CachedToken, Provider, TenantId, TokenKey};

/// Counts the allocations of the current thread (tests run on threads of their own).
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is handed to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// A host that counts every call made of it, optionally without generations.
struct Counted<'h> {
    inner: &'h mut FakeHost,
    generations: bool,
    calls: Cell<u64>,
}

impl Counted<'_> {
    fn call(&self) {
        self.calls.set(self.calls.get() + 1);
    }
}

impl Host for Counted<'_> {
    fn now_ms(&self) -> u64 {
        self.call();
        self.inner.now_ms()
    }
    fn dispatch(&mut self, callout: Callout<'_>) -> Result<u32, String> {
        self.call();
        self.inner.dispatch(callout)
    }
    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        self.call();
        self.inner.shared_get(key)
    }
    fn shared_set(&mut self, key: &str, value: &[u8]) {
        self.call();
        self.inner.shared_set(key, value);
    }
    fn shared_get_versioned(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.call();
        self.inner.shared_get_versioned(key)
    }
    fn shared_replace(&mut self, key: &str, value: &[u8], version: u32) -> bool {
        self.call();
        self.inner.shared_replace(key, value, version)
    }
    fn cache_generation(&self, bucket: u32) -> Option<u64> {
        if !self.generations {
            return None;
        }
        self.call();
        self.inner.cache_generation(bucket)
    }
    fn bump_cache_generation(&mut self, bucket: u32) {
        self.call();
        self.inner.bump_cache_generation(bucket);
    }
    fn wake(&mut self, queue: u32) {
        self.call();
        self.inner.wake(queue);
    }
    fn resume_with_header(&mut self, context_id: u32, header: &str, value: &str) -> bool {
        self.call();
        self.inner.resume_with_header(context_id, header, value)
    }
    fn reply_json(&mut self, context_id: u32, status: u16, body: &[u8]) -> bool {
        self.call();
        self.inner.reply_json(context_id, status, body)
    }
    fn set_tick_period_ms(&mut self, period_ms: u64) {
        self.call();
        self.inner.set_tick_period_ms(period_ms);
    }
    fn add(&mut self, metric: Metric, amount: u64) {
        self.call();
        self.inner.add(metric, amount);
    }
    fn log_level(&self) -> Level {
        self.call();
        self.inner.log_level()
    }
    fn log(&mut self, level: Level, message: &str) {
        self.call();
        self.inner.log(level, message);
    }
}

const START_MS: u64 = 1_700_000_000_000;

fn acme() -> TokenKey {
    TokenKey::new(Provider::genesys(), TenantId::parse("acme").unwrap())
}

fn tenant(name: &str) -> TokenKey {
    TokenKey::new(Provider::genesys(), TenantId::parse(name).unwrap())
}

/// A worker whose gateway cache holds a fresh token for acme, and its host.
fn warm() -> (Worker, FakeHost) {
    warm_with(b"{}", &[acme()])
}

/// A worker of `config` whose gateway cache holds a fresh token for each of `keys`.
fn warm_with(config: &[u8], keys: &[TokenKey]) -> (Worker, FakeHost) {
    let config = FilterConfig::parse(config).unwrap();
    let slots = config.slots();
    let mut host = FakeEnvoy::starting_at(START_MS).host();
    let entry = GatewayEntry {
        token: CachedToken {
            access_token: "AT-0123456789abcdef0123456789abcdef".into(),
            expires_at_ms: START_MS + 3_600_000,
        },
        refresh_at_ms: START_MS + 3_000_000,
        stale_at_ms: START_MS + 3_595_000,
    };
    for key in keys {
        slots
            .put(
                &mut host,
                Table::Tokens,
                key,
                &entry.encode(),
                |_| 0,
                Eviction::Allowed,
            )
            .unwrap();
    }
    (Worker::new(config, 1, Some(1)), host)
}

/// Host calls and allocations of one hit, after a first hit warmed everything up.
/// `hit` gets the key the request asks for, read from its headers before.
fn cost_of_a_hit(
    hit: impl Fn(&mut Worker, &mut Counted<'_>, TokenKey) -> bool,
    generations: bool,
) -> (u64, u64) {
    let (mut worker, mut fake) = warm();
    let mut host = Counted {
        inner: &mut fake,
        generations,
        calls: Cell::new(0),
    };
    assert!(
        hit(&mut worker, &mut host, acme()),
        "the first request hits"
    );
    host.calls.set(0);
    let key = acme();
    let before = allocations();
    assert!(hit(&mut worker, &mut host, key), "the second request hits");
    (host.calls.get(), allocations() - before)
}

fn through_on_request(worker: &mut Worker, host: &mut Counted<'_>, key: TokenKey) -> bool {
    let ask = TokenAsk {
        context_id: 7,
        key,
        delivery: Delivery::Inject,
        force_refresh: false,
    };
    let decision = worker.on_request(host, ask, RequestIds::default);
    matches!(decision, Decision::Cached(token) if token.access_token.expose().starts_with("AT-"))
}

fn through_serve_ready(worker: &mut Worker, host: &mut Counted<'_>, key: TokenKey) -> bool {
    worker
        .serve_ready(host, &key, || None)
        .is_some_and(|ready| ready.header_value().starts_with("Bearer AT-"))
}

#[test]
fn a_hit_from_the_workers_own_cache_makes_two_host_calls_and_no_allocation() {
    let (calls, allocated) = cost_of_a_hit(through_serve_ready, true);
    println!("hit from the worker's own cache: {calls} host calls, {allocated} allocations");
    assert_eq!(calls, 2, "the clock and the key's generation");
    assert_eq!(allocated, 0);
}

#[test]
fn a_hit_read_from_the_gateway_cache_costs_more() {
    let (calls, allocated) = cost_of_a_hit(through_on_request, false);
    println!("hit read from the gateway cache: {calls} host calls, {allocated} allocations");
    assert_eq!(calls, 2, "the clock and the key's slot");
    assert!(allocated >= 4, "{allocated}");
}

#[test]
fn a_worker_keeps_as_many_tokens_of_its_own_as_the_gateway_cache_holds_tenants() {
    let keys = [tenant("acme"), tenant("globex")];
    let (mut worker, mut fake) = warm_with(br#"{"cache":{"maxTenants":64}}"#, &keys);
    let mut host = Counted {
        inner: &mut fake,
        generations: true,
        calls: Cell::new(0),
    };
    for key in &keys {
        assert!(
            through_serve_ready(&mut worker, &mut host, key.clone()),
            "the first hit fills"
        );
    }
    host.calls.set(0);
    for key in keys.iter().chain(&keys) {
        assert!(through_serve_ready(&mut worker, &mut host, key.clone()));
    }
    assert_eq!(
        host.calls.get(),
        8,
        "both tokens kept: each hit is the clock and the generation, no shared read"
    );
}
