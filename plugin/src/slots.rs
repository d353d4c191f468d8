//! Bounded shared data. Proxy-wasm shared data has no delete: a key once written keeps
//! its memory for the life of the Envoy, so one key per tenant would grow without bound
//! as tenants come and go. Instead every per-key record (cached tokens, in-flight
//! markers, purge records) lives in a [`Table`] of `cache.maxTenants` slots with fixed
//! names (`tokengate.v3.<table>.<n>`), which are reused.
//!
//! A key may live in one of four slots picked from its stable hash, tried in order (a
//! cache hit mostly reads the first): five live keys must share the same four slots
//! before one is pushed out, so a table holds nearly `maxTenants` keys before it evicts
//! any. A slot's value starts with the key it holds, so one tenant's record is never
//! read as another's. A record goes to the slot that already holds its key, else to an
//! empty one, else over the record its table values least (a spent one first: an
//! expired token, a released marker). A key lives in one slot at most: a write clears
//! any other slot still holding the key, and [`Slots::clear`] empties every one, so a
//! purged or replaced record can never be found again in a later slot.
//!
//! A slot's value: `[key length: u8][provider:tenant][record]`.
//!
//! Every write to the token table bumps the write generation of each key it changes
//! (the key written, and the key whose record it pushed out), after the write: workers
//! keep copies of tokens checked against it ([`crate::ready`]).
//!
//! A host that keeps records in its own memory (the native build: one least recently
//! used map per table, shared by its workers) offers a [`KeyedStore`] through
//! [`Host::keyed_store`]; [`Slots`] then hands every call to it and no slot is used.

use tokengate_core::TokenKey;

use crate::host::Host;
use crate::ready::{bucket_of, bucket_of_name};

/// How many slots a key may live in.
const WAYS: u32 = 4;

/// The kinds of per-key records, each in its own table of slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// The gateway cache: a [`tokengate_core::GatewayEntry`] per key.
    Tokens,
    /// The per-Envoy in-flight markers ([`crate::inflight::Marker`]).
    Markers,
    /// The last purge of each key ([`tokengate_core::cache::PurgeRecord`]).
    Purges,
}

impl Table {
    fn prefix(self) -> &'static str {
        match self {
            Table::Tokens => "tokengate.v3.t.",
            Table::Markers => "tokengate.v3.m.",
            Table::Purges => "tokengate.v3.p.",
        }
    }
}

/// A key's record as found in its slot (or in the host's keyed store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Where the record was read, to write it back.
    place: Place,
    /// The record (the slot's value after the key).
    pub record: Vec<u8>,
    /// The record's version, for a compare-and-swap write.
    pub version: u32,
}

/// Where a found record lives.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// The shared-data key of its slot, in its table.
    Slot(Table, String),
    /// Its key's entry in this table of the host's keyed store.
    Keyed(Table),
}

/// What writing a record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// Whether another key's live record was pushed out for it.
    pub evicted: bool,
}

/// Why a record was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotPlaced {
    /// Every slot of the key holds another key's live record, and the eviction rule
    /// forbids pushing one out.
    #[error("every slot of the key holds another key's live record")]
    Full,
    /// The key is longer than a slot's one-byte key length can say.
    #[error("the key is longer than {} bytes", u8::MAX)]
    KeyTooLong,
}

/// Per-key records kept by the host itself, bounded per table, in place of slot tables.
/// Implementations are shared by the workers of one Envoy: every call is atomic.
pub trait KeyedStore {
    /// `key`'s record in `table` and its version; a use of the record (the least
    /// recently used record is the first to go).
    fn find(&self, table: Table, key: &TokenKey) -> Option<(Vec<u8>, u32)>;
    /// Writes `record` as `key`'s record in `table`. When the table is full it pushes
    /// out its least recently used record, unless `eviction` forbids that (`worth`
    /// values it; 0: spent): then it writes nothing and returns `None`.
    fn put(
        &self,
        table: Table,
        key: &TokenKey,
        record: &[u8],
        worth: &dyn Fn(&[u8]) -> u64,
        eviction: Eviction,
    ) -> Option<Placed>;
    /// Writes `record` as `key`'s record only if it is still at `version`.
    fn replace(&self, table: Table, key: &TokenKey, record: &[u8], version: u32) -> bool;
    /// Removes `key`'s record from `table`.
    fn remove(&self, table: Table, key: &TokenKey);
}

/// How a record is placed when both of its key's slots hold other keys' records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Over the one worth less (cached tokens, purge records: losing one costs a
    /// lookup at the companion).
    Allowed,
    /// Only over a spent one (worth 0); otherwise not at all (in-flight markers: a live
    /// claim of another key is never destroyed).
    SpentOnly,
}

/// The slots of every table, `count` in each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    count: u64,
}

impl Slots {
    /// Tables of `count` slots each (at least one).
    pub fn new(count: u32) -> Self {
        Self {
            count: u64::from(count.max(1)),
        }
    }

    /// The slots `key` may live in, in the order they are tried.
    fn candidates(&self, table: Table, key: &TokenKey) -> impl Iterator<Item = String> {
        let hash = key.stable_hash();
        let prefix = table.prefix();
        let count = self.count;
        (0..WAYS).map(move |way| {
            // 16 bits of the hash per way: plenty below 65,536 slots, and beyond, the
            // ways still differ.
            let slot = hash.rotate_right(16 * way).wrapping_add(u64::from(way)) % count;
            format!("{prefix}{slot}")
        })
    }

    /// `key`'s record in `table`, if it has one.
    pub fn find(&self, host: &impl Host, table: Table, key: &TokenKey) -> Option<Found> {
        if let Some(store) = host.keyed_store() {
            let (record, version) = store.find(table, key)?;
            return Some(Found {
                place: Place::Keyed(table),
                record,
                version,
            });
        }
        self.candidates(table, key).find_map(|slot| {
            let (value, version) = host.shared_get_versioned(&slot)?;
            let record = record_of(&value, key)?.to_vec();
            Some(Found {
                place: Place::Slot(table, slot),
                record,
                version,
            })
        })
    }

    /// Writes `record` as `key`'s record in `table` (see the module documentation for
    /// the slot chosen); `worth` values another key's record (0: spent). Returns where
    /// it went, or why it went nowhere.
    pub fn put(
        &self,
        host: &mut impl Host,
        table: Table,
        key: &TokenKey,
        record: &[u8],
        worth: impl Fn(&[u8]) -> u64,
        eviction: Eviction,
    ) -> Result<Placed, NotPlaced> {
        if let Some(store) = host.keyed_store() {
            return store
                .put(table, key, record, &worth, eviction)
                .ok_or(NotPlaced::Full);
        }
        let value = encode(key, record).ok_or(NotPlaced::KeyTooLong)?;
        // The slots already holding the key (one, but for tables written before this
        // rule), and the best other slot.
        let mut own: Vec<String> = Vec::new();
        // The best other slot, its worth and the bucket of the key it holds.
        let mut best: Option<(String, u64, Option<u32>)> = None;
        for slot in self.candidates(table, key) {
            let held = host.shared_get(&slot).unwrap_or_default();
            if record_of(&held, key).is_some() {
                own.push(slot);
                continue;
            }
            let (place_worth, held_bucket) = match held_key_len(&held) {
                None => (0, None),
                Some(len) => (
                    worth(held.get(1 + len..).unwrap_or_default()),
                    held.get(1..=len)
                        .map(|name| bucket_of_name(name.iter().copied())),
                ),
            };
            if best
                .as_ref()
                .is_none_or(|(_, least, _)| place_worth < *least)
            {
                best = Some((slot, place_worth, held_bucket));
            }
        }
        let mut own = own.into_iter();
        let (slot, place_worth, pushed_out) = match own.next() {
            Some(slot) => (slot, 0, None),
            None => best.ok_or(NotPlaced::Full)?,
        };
        if place_worth > 0 && eviction == Eviction::SpentOnly {
            return Err(NotPlaced::Full);
        }
        host.shared_set(&slot, &value);
        for duplicate in own.filter(|duplicate| *duplicate != slot) {
            host.shared_set(&duplicate, &[]);
        }
        if table == Table::Tokens {
            host.bump_cache_generation(bucket_of(key));
            if let Some(bucket) = pushed_out {
                host.bump_cache_generation(bucket);
            }
        }
        Ok(Placed {
            evicted: place_worth > 0,
        })
    }

    /// Writes `record` back to where `found` came from, if no one wrote it since.
    pub fn replace(
        &self,
        host: &mut impl Host,
        found: &Found,
        key: &TokenKey,
        record: &[u8],
    ) -> bool {
        match &found.place {
            Place::Slot(table, slot) => {
                let replaced = encode(key, record)
                    .is_some_and(|value| host.shared_replace(slot, &value, found.version));
                if replaced && *table == Table::Tokens {
                    host.bump_cache_generation(bucket_of(key));
                }
                replaced
            }
            Place::Keyed(table) => host
                .keyed_store()
                .is_some_and(|store| store.replace(*table, key, record, found.version)),
        }
    }

    /// Removes `key`'s record from the table `found` came from: every slot that holds
    /// the key is emptied (another key's record is left alone).
    pub fn clear(&self, host: &mut impl Host, found: &Found, key: &TokenKey) {
        match &found.place {
            Place::Slot(table, _) => {
                for slot in self.candidates(*table, key) {
                    if host
                        .shared_get(&slot)
                        .is_some_and(|held| record_of(&held, key).is_some())
                    {
                        host.shared_set(&slot, &[]);
                    }
                }
                if *table == Table::Tokens {
                    host.bump_cache_generation(bucket_of(key));
                }
            }
            Place::Keyed(table) => {
                if let Some(store) = host.keyed_store() {
                    store.remove(*table, key);
                }
            }
        }
    }
}

/// A slot's value for `key`'s `record`; `None` when the key's length does not fit
/// its byte (tenant ids are at most 128 characters and provider names 32, so it
/// always does today).
fn encode(key: &TokenKey, record: &[u8]) -> Option<Vec<u8>> {
    let provider = key.provider.as_str().as_bytes();
    let tenant = key.tenant_id.as_str().as_bytes();
    let key_len = provider.len() + 1 + tenant.len();
    let key_len_byte = key_len_byte(key_len)?;
    let mut value = Vec::with_capacity(1 + key_len + record.len());
    value.push(key_len_byte);
    value.extend_from_slice(provider);
    value.push(b':');
    value.extend_from_slice(tenant);
    value.extend_from_slice(record);
    Some(value)
}

/// A key's length as the byte that starts a slot's value; `None` beyond 255.
fn key_len_byte(key_len: usize) -> Option<u8> {
    u8::try_from(key_len).ok()
}

/// The length of the key a slot's value holds; `None` for an empty or unreadable slot.
fn held_key_len(value: &[u8]) -> Option<usize> {
    let (&len, rest) = value.split_first()?;
    (rest.len() >= usize::from(len) && len > 0).then_some(usize::from(len))
}

/// The record in a slot's value, if the value holds `key`'s.
fn record_of<'v>(value: &'v [u8], key: &TokenKey) -> Option<&'v [u8]> {
    let len = held_key_len(value)?;
    let held = value.get(1..1 + len)?;
    let provider = key.provider.as_str().as_bytes();
    let tenant = key.tenant_id.as_str().as_bytes();
    let (held_provider, rest) = held.split_at_checked(provider.len())?;
    let (&colon, held_tenant) = rest.split_first()?;
    (held_provider == provider && colon == b':' && held_tenant == tenant)
        .then(|| value.get(1 + len..))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeEnvoy;
    use tokengate_core::{Provider, TenantId};

    fn key(tenant: &str) -> TokenKey {
        TokenKey::new(Provider::genesys(), TenantId::parse(tenant).unwrap())
    }

    /// Worth of a test record: its first byte.
    fn first_byte(record: &[u8]) -> u64 {
        u64::from(record.first().copied().unwrap_or(0))
    }

    #[test]
    fn a_record_is_found_under_its_own_key_only() {
        let mut host = FakeEnvoy::default().host();
        let slots = Slots::new(1);
        slots
            .put(
                &mut host,
                Table::Tokens,
                &key("acme"),
                b"\x05a",
                first_byte,
                Eviction::Allowed,
            )
            .unwrap();
        let found = slots.find(&host, Table::Tokens, &key("acme")).unwrap();
        assert_eq!(found.record, b"\x05a");
        assert_eq!(slots.find(&host, Table::Tokens, &key("acm")), None);
        assert_eq!(
            slots.find(&host, Table::Markers, &key("acme")),
            None,
            "tables apart"
        );
        let whatsapp = TokenKey::new(Provider::whatsapp(), TenantId::parse("acme").unwrap());
        assert_eq!(slots.find(&host, Table::Tokens, &whatsapp), None);
    }

    #[test]
    fn the_number_of_slots_bounds_the_shared_data_whatever_the_churn() {
        let envoy = FakeEnvoy::default();
        let mut host = envoy.host();
        let slots = Slots::new(64);
        for tenant in 0..10_000 {
            let record = [1 + (tenant % 200) as u8];
            slots
                .put(
                    &mut host,
                    Table::Tokens,
                    &key(&format!("t{tenant}")),
                    &record,
                    first_byte,
                    Eviction::Allowed,
                )
                .unwrap();
        }
        assert!(envoy.shared_len() <= 64, "{}", envoy.shared_len());
    }

    #[test]
    fn four_choices_hold_nearly_the_slot_count_before_evicting() {
        let mut host = FakeEnvoy::default().host();
        let slots = Slots::new(1_000);
        let keys: Vec<TokenKey> = (0..500)
            .map(|tenant| key(&format!("tenant-{tenant}")))
            .collect();
        for key in &keys {
            slots
                .put(
                    &mut host,
                    Table::Tokens,
                    key,
                    b"\x09",
                    first_byte,
                    Eviction::Allowed,
                )
                .unwrap();
        }
        let kept = keys
            .iter()
            .filter(|key| slots.find(&host, Table::Tokens, key).is_some())
            .count();
        assert!(kept >= 495, "{kept} of 500 kept in 1,000 slots");
    }

    #[test]
    fn a_spent_record_is_replaced_first_and_a_live_one_only_when_allowed() {
        let mut host = FakeEnvoy::default().host();
        let slots = Slots::new(1);
        slots
            .put(
                &mut host,
                Table::Markers,
                &key("a"),
                b"\x07",
                first_byte,
                Eviction::SpentOnly,
            )
            .unwrap();
        let refused = slots.put(
            &mut host,
            Table::Markers,
            &key("b"),
            b"\x07",
            first_byte,
            Eviction::SpentOnly,
        );
        assert_eq!(refused, Err(NotPlaced::Full), "a's live record is kept");
        assert!(slots.find(&host, Table::Markers, &key("a")).is_some());

        slots
            .put(
                &mut host,
                Table::Markers,
                &key("a"),
                b"\x00",
                first_byte,
                Eviction::SpentOnly,
            )
            .unwrap();
        assert!(
            slots
                .put(
                    &mut host,
                    Table::Markers,
                    &key("b"),
                    b"\x07",
                    first_byte,
                    Eviction::SpentOnly
                )
                .is_ok()
        );
        assert_eq!(slots.find(&host, Table::Markers, &key("a")), None);

        assert!(
            slots
                .put(
                    &mut host,
                    Table::Markers,
                    &key("c"),
                    b"\x01",
                    first_byte,
                    Eviction::Allowed
                )
                .is_ok()
        );
        assert!(slots.find(&host, Table::Markers, &key("c")).is_some());
    }

    #[test]
    fn a_replace_fails_when_the_slot_was_written_since_and_clear_empties_it() {
        let mut host = FakeEnvoy::default().host();
        let slots = Slots::new(8);
        slots
            .put(
                &mut host,
                Table::Purges,
                &key("acme"),
                b"\x01",
                first_byte,
                Eviction::Allowed,
            )
            .unwrap();
        let found = slots.find(&host, Table::Purges, &key("acme")).unwrap();
        assert!(slots.replace(&mut host, &found, &key("acme"), b"\x02"));
        assert!(
            !slots.replace(&mut host, &found, &key("acme"), b"\x03"),
            "stale version"
        );
        let found = slots.find(&host, Table::Purges, &key("acme")).unwrap();
        assert_eq!(found.record, b"\x02");
        slots.clear(&mut host, &found, &key("acme"));
        assert_eq!(slots.find(&host, Table::Purges, &key("acme")), None);
    }

    /// Two keys whose first candidate slot is the same, in tables of `count` slots:
    /// `(first, second)` where `second`'s first way is `first`'s.
    fn keys_sharing_a_first_slot(slots: &Slots) -> (TokenKey, TokenKey) {
        let first_slot = |key: &TokenKey| slots.candidates(Table::Tokens, key).next().unwrap();
        let keys: Vec<TokenKey> = (0..500).map(|n| key(&format!("k{n}"))).collect();
        for (index, one) in keys.iter().enumerate() {
            for other in &keys[index + 1..] {
                let ways: Vec<String> = slots.candidates(Table::Tokens, other).collect();
                let distinct = ways.iter().collect::<std::collections::HashSet<_>>().len();
                if first_slot(one) == ways[0] && distinct == WAYS as usize {
                    return (one.clone(), other.clone());
                }
            }
        }
        panic!("no two keys share a first slot");
    }

    #[test]
    fn a_key_moves_to_no_second_slot_when_its_first_one_frees_up() {
        // The resurrection the simulation found (seed 1884): `k` lands in a later slot
        // while `j` holds its first; `j`'s record goes stale, `k` is written again; a
        // purge of `k` must leave nothing of `k` behind.
        let mut host = FakeEnvoy::default().host();
        let slots = Slots::new(64);
        let (j, k) = keys_sharing_a_first_slot(&slots);
        slots
            .put(
                &mut host,
                Table::Tokens,
                &j,
                b"\x09j",
                first_byte,
                Eviction::Allowed,
            )
            .unwrap();
        slots
            .put(
                &mut host,
                Table::Tokens,
                &k,
                b"\x09old",
                first_byte,
                Eviction::Allowed,
            )
            .unwrap();
        slots
            .put(
                &mut host,
                Table::Tokens,
                &j,
                b"\x00j",
                first_byte,
                Eviction::Allowed,
            )
            .unwrap();
        slots
            .put(
                &mut host,
                Table::Tokens,
                &k,
                b"\x09new",
                first_byte,
                Eviction::Allowed,
            )
            .unwrap();
        let found = slots.find(&host, Table::Tokens, &k).unwrap();
        assert_eq!(found.record, b"\x09new");
        slots.clear(&mut host, &found, &k);
        assert_eq!(
            slots.find(&host, Table::Tokens, &k),
            None,
            "the older record must not come back"
        );
        assert!(
            slots.find(&host, Table::Tokens, &j).is_some(),
            "j's is left alone"
        );
    }

    #[test]
    fn a_clear_empties_every_slot_that_holds_the_key() {
        // Two slots holding one key (as tables written before this rule may): a purge
        // clears both.
        let mut host = FakeEnvoy::default().host();
        let slots = Slots::new(64);
        let acme = key("acme");
        let ways: Vec<String> = slots.candidates(Table::Tokens, &acme).collect();
        let value = encode(&acme, b"\x09").unwrap();
        host.shared_set(&ways[0], &value);
        host.shared_set(&ways[2], &value);
        let found = slots.find(&host, Table::Tokens, &acme).unwrap();
        slots.clear(&mut host, &found, &acme);
        assert_eq!(slots.find(&host, Table::Tokens, &acme), None);
    }

    #[test]
    fn a_key_too_long_for_its_length_byte_is_refused() {
        let mut host = FakeEnvoy::default().host();
        let slots = Slots::new(8);
        let provider = Provider::parse(&"p".repeat(32)).unwrap();
        let fits = TokenKey::new(provider.clone(), TenantId::parse(&"t".repeat(128)).unwrap());
        assert!(
            slots
                .put(
                    &mut host,
                    Table::Tokens,
                    &fits,
                    b"\x01",
                    first_byte,
                    Eviction::Allowed
                )
                .is_ok(),
            "the longest key allowed today fits"
        );
        assert!(encode(&fits, b"").is_some());
        // Longer keys cannot be built today (tenant ids and provider names are
        // bounded); the rule that would refuse them:
        assert_eq!(key_len_byte(255), Some(255));
        assert_eq!(key_len_byte(256), None, "not wrapped or clamped to 255");
    }

    #[test]
    fn a_new_key_takes_its_first_slot_and_says_whether_it_pushed_one_out() {
        let mut host = FakeEnvoy::default().host();
        let slots = Slots::new(64);
        let acme = key("acme");
        let placed = slots
            .put(
                &mut host,
                Table::Tokens,
                &acme,
                b"\x09",
                first_byte,
                Eviction::Allowed,
            )
            .unwrap();
        assert!(!placed.evicted, "an empty slot");
        let first = slots.candidates(Table::Tokens, &acme).next().unwrap();
        assert!(
            host.shared_get(&first)
                .is_some_and(|held| record_of(&held, &acme).is_some()),
            "a hit reads one slot"
        );

        let one = Slots::new(1);
        one.put(
            &mut host,
            Table::Markers,
            &key("a"),
            b"\x09",
            first_byte,
            Eviction::Allowed,
        )
        .unwrap();
        let placed = one
            .put(
                &mut host,
                Table::Markers,
                &key("b"),
                b"\x09",
                first_byte,
                Eviction::Allowed,
            )
            .unwrap();
        assert!(placed.evicted, "a's live record pushed out");
    }

    #[test]
    fn a_write_clears_the_keys_other_slots() {
        let mut host = FakeEnvoy::default().host();
        let slots = Slots::new(64);
        let acme = key("acme");
        let ways: Vec<String> = slots.candidates(Table::Tokens, &acme).collect();
        assert_ne!(ways[0], ways[2]);
        let old = encode(&acme, b"\x05old").unwrap();
        host.shared_set(&ways[0], &old);
        host.shared_set(&ways[2], &old);
        slots
            .put(
                &mut host,
                Table::Tokens,
                &acme,
                b"\x09new",
                first_byte,
                Eviction::Allowed,
            )
            .unwrap();
        assert_eq!(host.shared_get(&ways[0]), encode(&acme, b"\x09new"));
        assert_eq!(host.shared_get(&ways[2]), Some(Vec::new()));
    }

    #[test]
    fn an_unreadable_slot_counts_as_empty() {
        // A value naming a key of length 0: no record, so even a marker may take it.
        let mut host = FakeEnvoy::default().host();
        let slots = Slots::new(1);
        let only = slots.candidates(Table::Markers, &key("a")).next().unwrap();
        host.shared_set(&only, &[0, 9]);
        assert!(
            slots
                .put(
                    &mut host,
                    Table::Markers,
                    &key("a"),
                    b"\x07",
                    first_byte,
                    Eviction::SpentOnly
                )
                .is_ok()
        );
    }
}
