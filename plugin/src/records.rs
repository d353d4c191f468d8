//! The native build's gateway cache (a [`KeyedStore`]): every per-key record of the
//! worker (cached tokens, in-flight markers, purge records) in one least-recently-used
//! map per table, in process memory, shared by all workers of the Envoy. Each table holds at most
//! `cache.maxTenants` records: writing one more pushes out the record least recently
//! read or written, so memory stays bounded under any tenant churn, and a tenant pushed
//! out is fetched again through the companion (its Redis cache), not from the IdP.
//!
//! The proxy-wasm build cannot delete shared data and approximates this with tables of
//! reused slots ([`crate::slots`]); the worker's calls are the same for both. Native
//! builds only: `native/` keeps one for its process, and the fake host can keep one so
//! the worker's tests run on it too.
//!
//! **Generations, for copies kept elsewhere.** The tokens table also keeps a generation
//! per stripe of keys ([`TOKEN_STRIPES`] stripes, by the key's stable hash), an atomic
//! that every change to a key's token record bumps: a write, a replacement, a removal
//! (a purge), the record pushed out by another key's write, and a new bound (every
//! stripe). The bump is made under the tables' lock, after the change, with release
//! ordering. [`LruRecords::find_token`] returns a token record with its [`TokenStamp`]
//! (read under the same lock), and [`LruRecords::is_current`] says, with one atomic
//! load and no lock, whether a copy taken with that stamp is still the record: if no
//! change to any key of its stripe was made since, it is. So a thread may keep copies
//! of token records (the native build's per-thread hit cache) and serve them without
//! the lock, never past a change made here. A change to another key of the same stripe
//! only costs the copy one more read.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::slots::{Eviction, KeyedStore, Placed, Table};
use lru::LruCache;
use tokengate_core::TokenKey;

/// How many generation stripes the tokens table has: a change to one key makes the
/// copies of about one key in this many read the record again.
pub const TOKEN_STRIPES: usize = 1024;

/// The records of each table, least recently used first out.
#[derive(Debug)]
pub struct LruRecords {
    inner: Mutex<Tables>,
    /// The generation of each stripe of the tokens table (see the module documentation).
    token_generations: Box<[AtomicU64]>,
}

/// Which version of a key's token record a copy was taken from: its stripe and the
/// stripe's generation, read together with the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenStamp {
    stripe: usize,
    generation: u64,
}

#[derive(Debug)]
struct Tables {
    tokens: LruCache<TokenKey, Entry>,
    markers: LruCache<TokenKey, Entry>,
    purges: LruCache<TokenKey, Entry>,
    /// The version of the latest write: every write gets a new one, so a record
    /// removed and written again never matches a version read before.
    last_version: u32,
}

#[derive(Debug)]
struct Entry {
    record: Vec<u8>,
    version: u32,
}

impl LruRecords {
    /// Tables of at most `max_records` records each (at least one).
    pub fn new(max_records: u32) -> Self {
        let capacity = capacity(max_records);
        Self {
            inner: Mutex::new(Tables {
                tokens: LruCache::new(capacity),
                markers: LruCache::new(capacity),
                purges: LruCache::new(capacity),
                last_version: 0,
            }),
            token_generations: (0..TOKEN_STRIPES).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Sets the bound of every table (a configuration Envoy loaded), pushing out the
    /// least recently used records beyond it.
    pub fn set_max_records(&self, max_records: u32) {
        let capacity = capacity(max_records);
        let mut tables = self.lock();
        if tables.tokens.cap() != capacity {
            tables.tokens.resize(capacity);
            // Which keys went is not told: every copy reads its record again.
            for generation in &self.token_generations {
                generation.fetch_add(1, Ordering::Release);
            }
        }
        tables.markers.resize(capacity);
        tables.purges.resize(capacity);
    }

    /// The bound of each table.
    pub fn max_records(&self) -> usize {
        self.lock().tokens.cap().get()
    }

    /// `key`'s token record (a use of it, like [`KeyedStore::find`]) and the stamp of
    /// this version of it, for a copy checked later with [`Self::is_current`].
    pub fn find_token(&self, key: &TokenKey) -> Option<(Vec<u8>, TokenStamp)> {
        let stripe = stripe_of(key);
        let mut tables = self.lock();
        let record = tables.tokens.get(key)?.record.clone();
        // Read under the lock that every change and its bump are made under.
        let generation = self.token_generations.get(stripe)?.load(Ordering::Acquire);
        Some((record, TokenStamp { stripe, generation }))
    }

    /// Whether no token record of the stamp's stripe has changed since the stamp was
    /// read: then a copy taken with it is still the key's record. One atomic load.
    pub fn is_current(&self, stamp: TokenStamp) -> bool {
        self.token_generations
            .get(stamp.stripe)
            .is_some_and(|generation| generation.load(Ordering::Acquire) == stamp.generation)
    }

    /// Marks `key`'s token record as used (its recency, for the least-recently-used
    /// order) without reading it; for copies served elsewhere, now and then.
    pub fn touch_token(&self, key: &TokenKey) {
        self.lock().tokens.promote(key);
    }

    /// A change to `key`'s record in `table` was made (under the lock): copies of a
    /// token record are out of date.
    fn changed(&self, table: Table, key: &TokenKey) {
        if table != Table::Tokens {
            return;
        }
        if let Some(generation) = self.token_generations.get(stripe_of(key)) {
            generation.fetch_add(1, Ordering::Release);
        }
    }

    /// How many records `table` holds.
    pub fn len(&self, table: Table) -> usize {
        self.lock().table(table).len()
    }

    /// Locks the tables, going on after a panic elsewhere (every critical section is
    /// one map operation: no half-written state).
    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Tables {
    fn table(&mut self, table: Table) -> &mut LruCache<TokenKey, Entry> {
        match table {
            Table::Tokens => &mut self.tokens,
            Table::Markers => &mut self.markers,
            Table::Purges => &mut self.purges,
        }
    }

    fn next_version(&mut self) -> u32 {
        self.last_version = self.last_version.wrapping_add(1);
        self.last_version
    }
}

/// The generation stripe of `key`.
fn stripe_of(key: &TokenKey) -> usize {
    // The remainder is below TOKEN_STRIPES, so it fits.
    usize::try_from(key.stable_hash() % TOKEN_STRIPES as u64).unwrap_or_default()
}

fn capacity(max_records: u32) -> NonZeroUsize {
    let records = usize::try_from(max_records).unwrap_or(usize::MAX);
    NonZeroUsize::new(records).unwrap_or(NonZeroUsize::MIN)
}

impl KeyedStore for LruRecords {
    fn find(&self, table: Table, key: &TokenKey) -> Option<(Vec<u8>, u32)> {
        let mut tables = self.lock();
        let entry = tables.table(table).get(key)?;
        Some((entry.record.clone(), entry.version))
    }

    fn put(
        &self,
        table: Table,
        key: &TokenKey,
        record: &[u8],
        worth: &dyn Fn(&[u8]) -> u64,
        eviction: Eviction,
    ) -> Option<Placed> {
        let mut tables = self.lock();
        let version = tables.next_version();
        let records = tables.table(table);
        let entry = Entry {
            record: record.to_vec(),
            version,
        };
        if let Some(held) = records.get_mut(key) {
            *held = entry;
            self.changed(table, key);
            return Some(Placed { evicted: false });
        }
        let mut evicted = false;
        if records.len() >= records.cap().get() {
            let least_worth = records
                .peek_lru()
                .map_or(0, |(_, held)| worth(&held.record));
            if least_worth > 0 && eviction == Eviction::SpentOnly {
                return None;
            }
            evicted = least_worth > 0;
        }
        let pushed_out = records.push(key.clone(), entry);
        if let Some((pushed_out, _)) = pushed_out {
            self.changed(table, &pushed_out);
        }
        self.changed(table, key);
        Some(Placed { evicted })
    }

    fn replace(&self, table: Table, key: &TokenKey, record: &[u8], version: u32) -> bool {
        let mut tables = self.lock();
        let next = tables.next_version();
        match tables.table(table).get_mut(key) {
            Some(held) if held.version == version => {
                *held = Entry {
                    record: record.to_vec(),
                    version: next,
                };
                self.changed(table, key);
                true
            }
            _ => false,
        }
    }

    fn remove(&self, table: Table, key: &TokenKey) {
        let mut tables = self.lock();
        if tables.table(table).pop(key).is_some() {
            self.changed(table, key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengate_core::{Provider, TenantId, TokenError};

    fn key(tenant: &str) -> TokenKey {
        let tenant_id = TenantId::parse(tenant).unwrap_or_else(|error| panic!("{error}"));
        TokenKey::new(Provider::genesys(), tenant_id)
    }

    /// The version of `tenant`'s record in `table` (0: none).
    fn version_of(records: &LruRecords, table: Table, tenant: &str) -> u32 {
        records
            .find(table, &key(tenant))
            .map_or(0, |(_, version)| version)
    }

    /// Worth of a test record: its first byte.
    fn first_byte(record: &[u8]) -> u64 {
        u64::from(record.first().copied().unwrap_or(0))
    }

    fn put(records: &LruRecords, table: Table, tenant: &str, record: &[u8]) -> Option<Placed> {
        records.put(table, &key(tenant), record, &first_byte, Eviction::Allowed)
    }

    #[test]
    fn a_table_never_holds_more_than_its_bound_whatever_the_churn() {
        let records = LruRecords::new(64);
        for tenant in 0..10_000 {
            put(&records, Table::Tokens, &format!("t{tenant}"), b"\x01");
        }
        assert_eq!(records.len(Table::Tokens), 64);
        assert!(records.find(Table::Tokens, &key("t9999")).is_some());
        assert_eq!(records.find(Table::Tokens, &key("t9935")), None);
    }

    #[test]
    fn the_least_recently_used_record_goes_first_and_a_read_is_a_use() {
        let records = LruRecords::new(2);
        put(&records, Table::Tokens, "a", b"\x01");
        put(&records, Table::Tokens, "b", b"\x01");
        assert!(records.find(Table::Tokens, &key("a")).is_some());
        let placed = put(&records, Table::Tokens, "c", b"\x01");
        assert_eq!(placed, Some(Placed { evicted: true }));
        assert_eq!(
            records.find(Table::Tokens, &key("b")),
            None,
            "b was least used"
        );
        assert!(records.find(Table::Tokens, &key("a")).is_some());
        assert!(records.find(Table::Tokens, &key("c")).is_some());
    }

    #[test]
    fn pushing_out_a_spent_record_is_no_eviction_and_a_live_marker_is_never_pushed_out() {
        let records = LruRecords::new(1);
        put(&records, Table::Tokens, "a", b"\x00");
        assert_eq!(
            put(&records, Table::Tokens, "b", b"\x01"),
            Some(Placed { evicted: false })
        );

        let live = b"\x07";
        let spent_only = |tenant: &str| {
            records.put(
                Table::Markers,
                &key(tenant),
                live,
                &first_byte,
                Eviction::SpentOnly,
            )
        };
        assert!(spent_only("a").is_some());
        assert_eq!(spent_only("b"), None, "a's live claim is kept");
        assert!(records.find(Table::Markers, &key("a")).is_some());
        assert!(
            spent_only("a").is_some(),
            "a key may always rewrite its own"
        );
    }

    #[test]
    fn a_spent_marker_gives_way_to_a_claim_of_another_key() {
        let records = LruRecords::new(1);
        put(&records, Table::Markers, "a", b"\x00");
        let placed = records.put(
            Table::Markers,
            &key("b"),
            b"\x01",
            &first_byte,
            Eviction::SpentOnly,
        );
        assert_eq!(placed, Some(Placed { evicted: false }));
        assert!(records.find(Table::Markers, &key("b")).is_some());
    }

    #[test]
    fn tables_are_apart_and_a_key_is_found_under_its_own_provider_only() -> Result<(), TokenError> {
        let records = LruRecords::new(4);
        put(&records, Table::Tokens, "acme", b"\x01");
        assert_eq!(records.find(Table::Markers, &key("acme")), None);
        let whatsapp = TokenKey::new(Provider::whatsapp(), TenantId::parse("acme")?);
        assert_eq!(records.find(Table::Tokens, &whatsapp), None);
        Ok(())
    }

    #[test]
    fn a_replace_needs_the_version_it_read_even_across_a_removal() {
        let records = LruRecords::new(4);
        put(&records, Table::Purges, "acme", b"\x01");
        let version = version_of(&records, Table::Purges, "acme");
        assert!(records.replace(Table::Purges, &key("acme"), b"\x02", version));
        assert!(
            !records.replace(Table::Purges, &key("acme"), b"\x03", version),
            "stale"
        );

        let version = version_of(&records, Table::Purges, "acme");
        records.remove(Table::Purges, &key("acme"));
        put(&records, Table::Purges, "acme", b"\x04");
        assert!(
            !records.replace(Table::Purges, &key("acme"), b"\x05", version),
            "written again since: a new version"
        );
        assert_eq!(
            records
                .find(Table::Purges, &key("acme"))
                .map(|(record, _)| record),
            Some(b"\x04".to_vec())
        );
    }

    /// A tenant whose key is in another generation stripe than `tenant`'s.
    fn tenant_of_another_stripe(tenant: &str) -> String {
        (0..)
            .map(|n| format!("other{n}"))
            .find(|other| stripe_of(&key(other)) != stripe_of(&key(tenant)))
            .unwrap_or_default()
    }

    /// `tenant`'s token stamp, after writing its record.
    fn stamped(records: &LruRecords, tenant: &str) -> TokenStamp {
        put(records, Table::Tokens, tenant, b"\x01");
        records
            .find_token(&key(tenant))
            .map(|(_, stamp)| stamp)
            .unwrap_or_else(|| panic!("{tenant} just written"))
    }

    #[test]
    fn a_token_copy_stays_current_until_its_record_changes_in_any_way() {
        let records = LruRecords::new(2);
        let other = tenant_of_another_stripe("acme");

        let stamp = stamped(&records, "acme");
        assert!(records.is_current(stamp));
        put(&records, Table::Tokens, &other, b"\x01");
        put(&records, Table::Markers, "acme", b"\x01");
        records.touch_token(&key("acme"));
        assert!(
            records.is_current(stamp),
            "another stripe, another table and a touch change nothing"
        );
        put(&records, Table::Tokens, "acme", b"\x02");
        assert!(!records.is_current(stamp), "written again");

        let stamp = stamped(&records, "acme");
        let version = version_of(&records, Table::Tokens, "acme");
        assert!(records.replace(Table::Tokens, &key("acme"), b"\x03", version));
        assert!(!records.is_current(stamp), "replaced");

        let stamp = stamped(&records, "acme");
        records.remove(Table::Tokens, &key("acme"));
        assert!(!records.is_current(stamp), "removed (a purge)");

        let stamp = stamped(&records, "acme");
        records.touch_token(&key(&other));
        put(&records, Table::Tokens, "third", b"\x01");
        assert_eq!(records.find(Table::Tokens, &key("acme")), None);
        assert!(!records.is_current(stamp), "pushed out by another key");

        let stamp = stamped(&records, "acme");
        records.set_max_records(1);
        assert!(!records.is_current(stamp), "a new bound");
    }

    #[test]
    fn a_touch_keeps_a_token_record_from_being_pushed_out() {
        let records = LruRecords::new(2);
        put(&records, Table::Tokens, "a", b"\x01");
        put(&records, Table::Tokens, "b", b"\x01");
        records.touch_token(&key("a"));
        put(&records, Table::Tokens, "c", b"\x01");
        assert!(records.find_token(&key("a")).is_some());
        assert_eq!(records.find_token(&key("b")), None);
        assert_eq!(records.max_records(), 2);
    }

    #[test]
    fn a_smaller_bound_pushes_out_the_least_recently_used_at_once() {
        let records = LruRecords::new(8);
        for tenant in ["a", "b", "c", "d"] {
            put(&records, Table::Tokens, tenant, b"\x01");
        }
        records.set_max_records(2);
        assert_eq!(records.len(Table::Tokens), 2);
        assert!(records.find(Table::Tokens, &key("d")).is_some());
        assert_eq!(records.find(Table::Tokens, &key("a")), None);
    }
}
