//! The native build's per-thread token cache: a cache hit served by the thread that
//! runs the request, without the worker's lock, the gateway cache's process-wide lock,
//! a least-recently-used write, a record copy or an allocation.
//!
//! Each Envoy worker thread keeps [`LocalTokens`]: copies of token records of the
//! gateway cache ([`LruRecords`], process-wide), each with the ready `Bearer` value and
//! the [`TokenStamp`] it was read with. A hit ([`LocalTokens::serve`]) looks the copy up
//! by the tenant header's bytes (borrowed from Envoy) and serves it only while
//!
//! 1. its stamp is current ([`LruRecords::is_current`]: one atomic load of its stripe's
//!    generation), and
//! 2. the clock is before the earlier of its refresh moment and its stale moment
//!    (expiry less the margin). From the refresh moment on, requests go through the
//!    worker, which starts the refresh-ahead; the refreshed record (or the moved moment
//!    of a failed refresh) is a change, and the next request takes a new copy.
//!
//! Otherwise the request goes the slow way: [`LocalTokens::fill`] reads the record with
//! its stamp under the gateway cache's lock, and when it is not servable from here, the
//! worker decides (a miss, a refresh, a forced refresh, a per-hit debug line).
//!
//! # Coherence
//!
//! Every change to a token record in the gateway cache, by any thread (a write after a
//! fetch or a refresh, a purge's removal, a moved refresh moment, another key's write
//! that pushes the record out, a new bound), is made under the gateway cache's lock and
//! followed, still under it, by a release increment of the generation of the key's
//! stripe. A copy is taken with the generation read under that lock, so the copy is the
//! record as of that generation. A hit loads the generation (acquire) and serves only if
//! it is unchanged: then no change to the record has been made since the copy, in the
//! generation's modification order. Each change therefore takes effect, for every thread,
//! at its increment: a hit whose load comes after it reads the record again, and a hit
//! whose load comes before it is one that the gateway cache's lock would also have
//! ordered before the change. The bound is thus the same as the shared map's: no token
//! is served from here after the store call that purged or replaced it returned (at this
//! Envoy), and none at or after its stale moment, read from the clock on each hit. The
//! copies do not outlive what they copy: a record pushed out of the gateway cache is a
//! change too. Another key's change in the same stripe ([`tokengate::records::TOKEN_STRIPES`]
//! stripes) only costs a copy one more read.
//!
//! # Bound and recency
//!
//! A thread keeps at most [`MAX_LOCAL_TOKENS`] copies (or `cache.maxTenants`, if fewer),
//! least recently used first out. A hit writes no recency, neither here nor in the
//! gateway cache: a copy served for [`TOUCH_EVERY_MS`] since its last touch touches
//! both (one lock of the gateway cache per key, thread and interval), so a token in use
//! stays in the gateway cache while other tenants churn through it.

use std::cell::{Cell, RefCell};
use std::num::NonZeroUsize;
use std::rc::Rc;

use lru::LruCache;
use tokengate::delivery;
use tokengate::records::{LruRecords, TokenStamp};
use tokengate_core::provider::MAX_TENANT_ID_LEN;
use tokengate_core::{CachedToken, GatewayEntry, SecretString, TokenKey};

/// Most copies a thread keeps.
pub const MAX_LOCAL_TOKENS: usize = 16_384;
/// A copy in use touches its recency (here and in the gateway cache) this often.
pub const TOUCH_EVERY_MS: u64 = 1_000;

/// Longest lookup key: provider name length, provider name, tenant id.
const MAX_LOOKUP_KEY: usize = 1 + u8::MAX as usize + MAX_TENANT_ID_LEN;

/// A token record copied for this thread's hits.
#[derive(Debug)]
pub struct LocalToken {
    /// Its key (for a purge, when the upstream rejects it).
    pub key: TokenKey,
    /// The token.
    pub token: CachedToken,
    /// The authorization header's value, `Bearer <token>`.
    pub bearer: SecretString,
    /// The version of the gateway cache's record it copies.
    stamp: TokenStamp,
    /// Served from here before this moment: the earlier of the refresh and stale moments.
    serve_before_ms: u64,
    /// When its recency was last touched.
    touched_at_ms: Cell<u64>,
}

/// One thread's copies, by lookup key (see [`lookup_key`]).
#[derive(Debug)]
pub struct LocalTokens {
    copies: LruCache<Box<[u8]>, Rc<LocalToken>>,
}

thread_local! {
    static LOCAL_TOKENS: RefCell<LocalTokens> = RefCell::new(LocalTokens::new(MAX_LOCAL_TOKENS));
}

/// Runs `call` on this thread's copies (`None` on a re-entry, which cannot happen: the
/// calls hold no borrow across a host call).
pub fn with_local_tokens<T>(call: impl FnOnce(&mut LocalTokens) -> T) -> Option<T> {
    LOCAL_TOKENS.with(|local| {
        local
            .try_borrow_mut()
            .ok()
            .map(|mut local| call(&mut local))
    })
}

impl LocalTokens {
    /// At most `bound` copies (at least one); memory grows with the copies kept, not
    /// with the bound.
    pub fn new(bound: usize) -> Self {
        let mut copies = LruCache::unbounded();
        copies.resize(NonZeroUsize::new(bound).unwrap_or(NonZeroUsize::MIN));
        Self { copies }
    }

    /// How many copies this thread keeps.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// The copy of `provider`'s token for tenant `tenant` (the header's bytes, not yet
    /// validated: only a validated tenant id's bytes ever match), if it may be served at
    /// `now_ms`. A copy that may not is dropped. No allocation and, but for a touch every
    /// [`TOUCH_EVERY_MS`], no lock.
    pub fn serve(
        &mut self,
        records: &LruRecords,
        provider: &str,
        tenant: &[u8],
        now_ms: u64,
    ) -> Option<Rc<LocalToken>> {
        let mut buffer = [0u8; MAX_LOOKUP_KEY];
        let lookup = lookup_key(&mut buffer, provider, tenant)?;
        let copy = self.copies.peek(lookup)?;
        if !(now_ms < copy.serve_before_ms && records.is_current(copy.stamp)) {
            self.copies.pop(lookup);
            return None;
        }
        let copy = Rc::clone(copy);
        if now_ms.saturating_sub(copy.touched_at_ms.get()) >= TOUCH_EVERY_MS {
            copy.touched_at_ms.set(now_ms);
            records.touch_token(&copy.key);
            self.copies.promote(lookup);
        }
        Some(copy)
    }

    /// `key`'s token, from this thread's copy or read again from the gateway cache, if it
    /// may be served at `now_ms` without the worker: a fresh record whose refresh is not
    /// due. `None` leaves the request to the worker.
    pub fn fill(
        &mut self,
        records: &LruRecords,
        key: &TokenKey,
        now_ms: u64,
    ) -> Option<Rc<LocalToken>> {
        let provider = key.provider.as_str();
        let tenant = key.tenant_id.as_str().as_bytes();
        if let Some(copy) = self.serve(records, provider, tenant, now_ms) {
            return Some(copy);
        }
        let (record, stamp) = records.find_token(key)?;
        let entry = GatewayEntry::decode(&record)?;
        let serve_before_ms = entry.refresh_at_ms.min(entry.stale_at_ms);
        if now_ms >= serve_before_ms {
            return None;
        }
        let copy = Rc::new(LocalToken {
            key: key.clone(),
            bearer: delivery::bearer(&entry.token),
            token: entry.token,
            stamp,
            serve_before_ms,
            touched_at_ms: Cell::new(now_ms),
        });
        let mut buffer = [0u8; MAX_LOOKUP_KEY];
        if let Some(lookup) = lookup_key(&mut buffer, provider, tenant) {
            let bound = records.max_records().min(MAX_LOCAL_TOKENS);
            if let Some(bound) =
                NonZeroUsize::new(bound).filter(|bound| *bound != self.copies.cap())
            {
                self.copies.resize(bound);
            }
            self.copies.push(lookup.into(), Rc::clone(&copy));
        }
        Some(copy)
    }
}

/// The lookup key of `provider`'s token for `tenant`, written into `buffer`:
/// `[provider length][provider][tenant]`; `None` when it does not fit (no such key is
/// ever kept: tenant ids are at most [`MAX_TENANT_ID_LEN`] bytes).
fn lookup_key<'b>(
    buffer: &'b mut [u8; MAX_LOOKUP_KEY],
    provider: &str,
    tenant: &[u8],
) -> Option<&'b [u8]> {
    let provider = provider.as_bytes();
    let provider_len = u8::try_from(provider.len()).ok()?;
    let end = 1 + provider.len() + tenant.len();
    let key = buffer.get_mut(..end)?;
    let (length, rest) = key.split_first_mut()?;
    *length = provider_len;
    let (provider_part, tenant_part) = rest.split_at_mut(provider.len());
    provider_part.copy_from_slice(provider);
    tenant_part.copy_from_slice(tenant);
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokengate::slots::{Eviction, KeyedStore, Table};
    use tokengate_core::{Provider, TenantId};

    /// Counts the allocations of the thread that set [`COUNTING`].
    struct CountingAllocator;

    static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        static COUNTING: Cell<bool> = const { Cell::new(false) };
    }

    // SAFETY: every call is handed to the system allocator unchanged.
    #[allow(unsafe_code)]
    unsafe impl GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if COUNTING.try_with(Cell::get).unwrap_or(false) {
                ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            }
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static GLOBAL: CountingAllocator = CountingAllocator;

    /// Tests that count allocations run one at a time.
    static COUNTED: Mutex<()> = Mutex::new(());

    /// The allocations `call` makes on this thread.
    fn allocations_of<T>(call: impl FnOnce() -> T) -> (T, usize) {
        let _one_at_a_time = COUNTED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        COUNTING.with(|counting| counting.set(true));
        let value = call();
        COUNTING.with(|counting| counting.set(false));
        (value, ALLOCATIONS.load(Ordering::Relaxed) - before)
    }

    const NOW: u64 = 1_000_000;
    const REFRESH_AT: u64 = NOW + 60_000;
    const STALE_AT: u64 = NOW + 90_000;

    fn key(tenant: &str) -> TokenKey {
        TokenKey::new(Provider::genesys(), TenantId::parse(tenant).unwrap())
    }

    fn write_token(records: &LruRecords, tenant: &str, token: &str) {
        let entry = GatewayEntry {
            token: CachedToken {
                access_token: SecretString::new(token.to_owned()),
                expires_at_ms: STALE_AT + 5_000,
            },
            refresh_at_ms: REFRESH_AT,
            stale_at_ms: STALE_AT,
        };
        records.put(
            Table::Tokens,
            &key(tenant),
            &entry.encode(),
            &|_| 1,
            Eviction::Allowed,
        );
    }

    /// The bearer served for `tenant` at `now_ms`, on the hit path.
    fn served(
        local: &mut LocalTokens,
        records: &LruRecords,
        tenant: &str,
        now_ms: u64,
    ) -> Option<String> {
        local
            .serve(
                records,
                Provider::genesys().as_str(),
                tenant.as_bytes(),
                now_ms,
            )
            .map(|copy| copy.bearer.expose().to_owned())
    }

    #[test]
    fn a_hit_from_the_copy_allocates_nothing_and_the_fill_is_paid_once() {
        let records = LruRecords::new(16);
        write_token(&records, "acme", "t1");
        let mut local = LocalTokens::new(16);
        let acme = key("acme");
        let (filled, _) = allocations_of(|| local.fill(&records, &acme, NOW));
        assert!(filled.is_some());
        let provider = Provider::genesys();
        let (copy, allocations) =
            allocations_of(|| local.serve(&records, provider.as_str(), b"acme", NOW + 1));
        assert_eq!(
            copy.map(|copy| copy.bearer.expose().to_owned()).as_deref(),
            Some("Bearer t1")
        );
        assert_eq!(allocations, 0, "a hit allocates nothing");
    }

    #[test]
    fn a_copy_is_never_served_after_its_record_changed_or_at_its_refresh_or_stale_moment() {
        let records = LruRecords::new(16);
        let mut local = LocalTokens::new(16);
        write_token(&records, "acme", "t1");
        assert!(local.fill(&records, &key("acme"), NOW).is_some());
        assert_eq!(
            served(&mut local, &records, "acme", NOW).as_deref(),
            Some("Bearer t1")
        );

        records.remove(Table::Tokens, &key("acme"));
        assert_eq!(served(&mut local, &records, "acme", NOW), None, "purged");
        assert_eq!(local.fill(&records, &key("acme"), NOW).map(|_| ()), None);

        write_token(&records, "acme", "t1");
        assert!(local.fill(&records, &key("acme"), NOW).is_some());
        write_token(&records, "acme", "t2");
        assert_eq!(
            served(&mut local, &records, "acme", NOW),
            None,
            "refreshed elsewhere"
        );
        assert!(local.fill(&records, &key("acme"), NOW).is_some());
        assert_eq!(
            served(&mut local, &records, "acme", NOW).as_deref(),
            Some("Bearer t2")
        );

        assert_eq!(
            served(&mut local, &records, "acme", REFRESH_AT - 1).as_deref(),
            Some("Bearer t2")
        );
        assert_eq!(
            served(&mut local, &records, "acme", REFRESH_AT),
            None,
            "the worker refreshes"
        );
        assert_eq!(
            local.fill(&records, &key("acme"), REFRESH_AT).map(|_| ()),
            None,
            "left to the worker until the record changes"
        );
        assert_eq!(
            local.fill(&records, &key("acme"), STALE_AT).map(|_| ()),
            None
        );
    }

    #[test]
    fn a_purge_or_refresh_made_by_another_thread_is_seen_by_the_next_hit() {
        let records = std::sync::Arc::new(LruRecords::new(16));
        let mut local = LocalTokens::new(16);
        write_token(&records, "acme", "t1");
        assert!(local.fill(&records, &key("acme"), NOW).is_some());

        let elsewhere = |change: fn(&LruRecords)| {
            let records = std::sync::Arc::clone(&records);
            std::thread::spawn(move || change(&records)).join().unwrap();
        };
        elsewhere(|records| records.remove(Table::Tokens, &key("acme")));
        assert_eq!(
            served(&mut local, &records, "acme", NOW),
            None,
            "purged by another thread"
        );

        write_token(&records, "acme", "t1");
        assert!(local.fill(&records, &key("acme"), NOW).is_some());
        elsewhere(|records| write_token(records, "acme", "t2"));
        assert_eq!(
            served(&mut local, &records, "acme", NOW),
            None,
            "refreshed by another thread"
        );
        assert_eq!(
            local
                .fill(&records, &key("acme"), NOW)
                .map(|copy| copy.bearer.expose().to_owned())
                .as_deref(),
            Some("Bearer t2")
        );
    }

    #[test]
    fn another_tenants_bytes_and_another_provider_never_match() {
        let records = LruRecords::new(16);
        let mut local = LocalTokens::new(16);
        write_token(&records, "acme", "t1");
        assert!(local.fill(&records, &key("acme"), NOW).is_some());
        assert_eq!(served(&mut local, &records, "acm", NOW), None);
        assert_eq!(served(&mut local, &records, "acme ", NOW), None);
        let whatsapp = Provider::whatsapp();
        assert!(
            local
                .serve(&records, whatsapp.as_str(), b"acme", NOW)
                .is_none()
        );
        assert!(
            local.serve(&records, "", &[b'x'; 1_000], NOW).is_none(),
            "too long: no key"
        );
    }

    #[test]
    fn a_thread_keeps_at_most_its_bound_and_a_copy_in_use_keeps_its_record() {
        let records = LruRecords::new(3);
        let mut local = LocalTokens::new(MAX_LOCAL_TOKENS);
        for tenant in ["a", "b", "c"] {
            write_token(&records, tenant, tenant);
            assert!(local.fill(&records, &key(tenant), NOW).is_some());
        }
        assert_eq!(local.len(), 3, "bounded by the gateway cache's bound");
        // "a" is served from its copy (no read of the gateway cache), and touched once
        // its interval has passed: the gateway cache then pushes out "b", not "a".
        assert!(served(&mut local, &records, "a", NOW + TOUCH_EVERY_MS).is_some());
        write_token(&records, "d", "d");
        assert!(records.find_token(&key("a")).is_some());
        assert_eq!(records.find_token(&key("b")), None);
        assert_eq!(
            served(&mut local, &records, "b", NOW),
            None,
            "pushed out: a change"
        );
    }
}
