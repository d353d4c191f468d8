//! The per-Envoy in-flight marker (tier 2 of collapsing): a shared-data entry that says
//! which worker of this Envoy is fetching a token key, so the other workers wait for
//! the shared cache instead of fetching too.
//!
//! Shared data has no atomic create (FACTS §3: two workers racing to create a missing
//! key both succeed), so a worker claims the marker, reads it back and only proceeds
//! when it still names it. A rare double claim costs nothing but a second lease: the
//! companion's lock is the authority. Markers live in a bounded table of slots
//! ([`crate::slots`]), as shared data has no delete: a finished
//! fetch leaves the marker released, or holding its error briefly so the waiting
//! workers answer with it instead of each retrying a failing fetch. An error that
//! asking again cannot fix ([`ErrorCode::is_negatively_cached`]: credentials rejected
//! or not found) is held for `negativeCacheMs` and answered to every new request of
//! the key on this Envoy too (negative caching), until a forced refresh or a purge
//! clears it.
//!
//! A waiting worker adds its wake queue (a proxy-wasm shared queue it registered) to
//! the marker, with a compare-and-swap write; the owner releases the marker the same
//! way and then wakes every queue it found there, so the waiters resume at once
//! instead of on their next poll of the shared cache (which stays as the fallback).
//!
//! The marker is stored in a compact binary form (see [`Marker::encode`]), like the
//! gateway cache's entries.

use tokengate_core::{ErrorCode, TokenError, TokenKey};

use crate::host::Host;
use crate::slots::{Eviction, Slots, Table};

/// How long a failed fetch's error is handed to the workers that waited on it.
pub const ERROR_SHARE_MS: u64 = 1_000;

/// The state of one key's fetch on this Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// The worker fetching (0 when released).
    pub owner: u64,
    /// The claim, or the shared error, is void after this moment.
    pub until_ms: u64,
    /// The error the fetch ended with, for the workers that waited on it.
    pub error: Option<SharedError>,
    /// Whether the error also answers new requests until `until_ms` (negative caching).
    pub cached: bool,
    /// The wake queues of the workers waiting on this fetch (at most
    /// [`MAX_WAITERS`]; beyond, a worker only polls).
    pub waiters: Vec<u32>,
}

/// Attempts at a compare-and-swap write of a marker before giving up (waiting) or
/// writing unconditionally (releasing).
const WRITE_ATTEMPTS: usize = 4;

/// The most wake queues a marker holds (one per waiting worker).
pub const MAX_WAITERS: usize = 255;

/// Set in an encoded error code when the error is cached ([`Marker::cached`]).
const CACHED_BIT: u8 = 0x80;

/// A fetch error as stored in the marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedError {
    /// The error code.
    pub code: ErrorCode,
    /// The message (never a secret).
    pub message: String,
}

/// What a worker should do about a key it misses.
#[derive(Debug, PartialEq, Eq)]
pub enum Peer {
    /// Nobody of this Envoy fetches it: claim it.
    Free,
    /// Another worker fetches it: wait for the shared cache.
    Busy,
    /// Another worker's fetch just failed with this error.
    Failed(TokenError),
}

impl Marker {
    /// A claim by `owner` valid until `until_ms`.
    pub fn claim(owner: u64, until_ms: u64) -> Self {
        Self {
            owner,
            until_ms,
            error: None,
            cached: false,
            waiters: Vec::new(),
        }
    }

    /// A released marker carrying the fetch's outcome for a moment: for
    /// `negative_cache_ms` (when not 0) if the error is one to cache, else for
    /// [`ERROR_SHARE_MS`] and only to the workers that waited.
    pub fn release(now_ms: u64, error: Option<&TokenError>, negative_cache_ms: u64) -> Self {
        let cached = negative_cache_ms > 0 && error.is_some_and(|e| e.code.is_negatively_cached());
        let lasts_ms = if cached {
            negative_cache_ms
        } else {
            ERROR_SHARE_MS
        };
        Self {
            owner: 0,
            until_ms: now_ms.saturating_add(lasts_ms),
            error: error.map(|error| SharedError {
                code: error.code,
                message: error.message.clone(),
            }),
            cached,
            waiters: Vec::new(),
        }
    }

    /// Encodes for shared data: owner and expiry (8 bytes each, big-endian), the number
    /// of waiters (1 byte) and their queues (4 bytes each), then, if the fetch failed,
    /// its error code's place in [`ErrorCode::ALL`] (1 byte, its high bit set when the
    /// error is cached) and its message.
    pub fn encode(&self) -> Vec<u8> {
        let waiters = self.waiters.get(..MAX_WAITERS).unwrap_or(&self.waiters);
        let mut bytes = Vec::with_capacity(17 + 4 * waiters.len());
        bytes.extend_from_slice(&self.owner.to_be_bytes());
        bytes.extend_from_slice(&self.until_ms.to_be_bytes());
        bytes.push(u8::try_from(waiters.len()).unwrap_or(u8::MAX));
        for queue in waiters {
            bytes.extend_from_slice(&queue.to_be_bytes());
        }
        if let Some(error) = &self.error {
            let code = ErrorCode::ALL
                .iter()
                .position(|code| *code == error.code)
                .and_then(|place| u8::try_from(place).ok())
                .unwrap_or(u8::MAX);
            bytes.push(if self.cached { code | CACHED_BIT } else { code });
            bytes.extend_from_slice(error.message.as_bytes());
        }
        bytes
    }

    /// Decodes [`Marker::encode`]'s output; anything unreadable counts as no marker.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (owner, rest) = bytes.split_first_chunk::<8>()?;
        let (until_ms, rest) = rest.split_first_chunk::<8>()?;
        let (&count, mut rest) = rest.split_first()?;
        let mut waiters = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let (queue, after) = rest.split_first_chunk::<4>()?;
            waiters.push(u32::from_be_bytes(*queue));
            rest = after;
        }
        let (error, cached) = match rest.split_first() {
            None => (None, false),
            Some((&code, message)) => {
                let error = SharedError {
                    code: *ErrorCode::ALL.get(usize::from(code & !CACHED_BIT))?,
                    message: String::from_utf8(message.to_vec()).ok()?,
                };
                (Some(error), code & CACHED_BIT != 0)
            }
        };
        Some(Self {
            owner: u64::from_be_bytes(*owner),
            until_ms: u64::from_be_bytes(*until_ms),
            error,
            cached,
            waiters,
        })
    }

    /// The error this marker answers new requests with at `now_ms` (negative caching).
    pub fn cached_error(&self, now_ms: u64) -> Option<TokenError> {
        let error = self.error.as_ref().filter(|_| self.cached)?;
        (now_ms < self.until_ms).then(|| TokenError::new(error.code, error.message.clone()))
    }

    /// Whether the marker still means something at `now_ms`: a claim, or a failed
    /// fetch's error for its waiters.
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms && (self.owner != 0 || self.error.is_some())
    }

    /// What this marker means to worker `me` at `now_ms`.
    pub fn peer_state(&self, me: u64, now_ms: u64) -> Peer {
        if now_ms >= self.until_ms {
            return Peer::Free;
        }
        match &self.error {
            Some(error) => Peer::Failed(TokenError::new(error.code, error.message.clone())),
            None if self.owner != 0 && self.owner != me => Peer::Busy,
            None => Peer::Free,
        }
    }
}

/// What `key`'s marker means to worker `me` at `now_ms`.
pub fn peer_state(host: &impl Host, slots: &Slots, key: &TokenKey, me: u64, now_ms: u64) -> Peer {
    slots
        .find(host, Table::Markers, key)
        .and_then(|found| Marker::decode(&found.record))
        .map_or(Peer::Free, |marker| marker.peer_state(me, now_ms))
}

/// The error `key`'s marker answers new requests with at `now_ms`, if it caches one.
pub fn cached_error(
    host: &impl Host,
    slots: &Slots,
    key: &TokenKey,
    now_ms: u64,
) -> Option<TokenError> {
    slots
        .find(host, Table::Markers, key)
        .and_then(|found| Marker::decode(&found.record))
        .and_then(|marker| marker.cached_error(now_ms))
}

/// Drops the error `key`'s marker caches (a purge: the tenant's credentials may have
/// changed). A claim or a fetch in flight is left alone.
pub fn forget_cached_error(host: &mut impl Host, slots: &Slots, key: &TokenKey, now_ms: u64) {
    for _ in 0..WRITE_ATTEMPTS {
        let Some(found) = slots.find(host, Table::Markers, key) else {
            return;
        };
        let Some(marker) = Marker::decode(&found.record) else {
            return;
        };
        if marker.cached_error(now_ms).is_none() {
            return;
        }
        if slots.replace(
            host,
            &found,
            key,
            &Marker::release(now_ms, None, 0).encode(),
        ) {
            return;
        }
    }
}

/// Claims `key` for worker `me` from `now_ms` until `until_ms`; false when another
/// worker claimed it at the same moment and wrote last (then that one fetches). When
/// every one of the key's marker slots holds another key's live claim, nothing is written and
/// the claim succeeds: the fetch runs without tier 2 (the companion still collapses it).
pub fn claim(
    host: &mut impl Host,
    slots: &Slots,
    key: &TokenKey,
    me: u64,
    now_ms: u64,
    until_ms: u64,
) -> bool {
    let claim = Marker::claim(me, until_ms).encode();
    // Another key's marker is spent once neither a claim nor a shared error: a live
    // claim is kept even when it is `me`'s own (this worker fetching that key too).
    let spent = |record: &[u8]| {
        let live = Marker::decode(record).is_some_and(|marker| marker.is_live(now_ms));
        u64::from(live)
    };
    if slots
        .put(
            host,
            Table::Markers,
            key,
            &claim,
            spent,
            Eviction::SpentOnly,
        )
        .is_err()
    {
        return true;
    }
    peer_state(host, slots, key, me, now_ms) != Peer::Busy
}

/// Leaves wake queue `queue` of worker `me` in `key`'s marker while another worker
/// holds it. Gives up quietly (the poll remains) when the marker keeps changing or is
/// free.
pub fn ask_to_be_woken(
    host: &mut impl Host,
    slots: &Slots,
    key: &TokenKey,
    me: u64,
    queue: u32,
    now_ms: u64,
) {
    for _ in 0..WRITE_ATTEMPTS {
        let Some(found) = slots.find(host, Table::Markers, key) else {
            return;
        };
        let Some(mut marker) = Marker::decode(&found.record) else {
            return;
        };
        if marker.peer_state(me, now_ms) != Peer::Busy
            || marker.waiters.contains(&queue)
            || marker.waiters.len() >= MAX_WAITERS
        {
            return;
        }
        marker.waiters.push(queue);
        if slots.replace(host, &found, key, &marker.encode()) {
            return;
        }
    }
}

/// Writes `released` over `key`'s marker, if it is still worker `me`'s claim, and wakes
/// the workers that asked to be (except `own_queue`). The write only succeeds on the
/// version read, so a waiter that adds itself in between is not lost; after repeated
/// races it is written anyway.
pub fn release(
    host: &mut impl Host,
    slots: &Slots,
    key: &TokenKey,
    me: u64,
    released: &Marker,
    own_queue: Option<u32>,
) {
    let encoded = released.encode();
    let mut waiters = Vec::new();
    let mut written = false;
    for _ in 0..WRITE_ATTEMPTS {
        let Some(found) = slots.find(host, Table::Markers, key) else {
            // Never claimed in a slot (every one was busy), or taken over since: nobody
            // can be waiting on it through the marker.
            return;
        };
        let Some(marker) = Marker::decode(&found.record).filter(|marker| marker.owner == me) else {
            // Another worker's claim (this one's was never written, or expired and was
            // taken over): it is that worker's to release.
            return;
        };
        waiters = marker.waiters;
        if slots.replace(host, &found, key, &encoded) {
            written = true;
            break;
        }
    }
    if !written {
        // Only into the slot that holds the key: another key's marker stays.
        let _ = slots.put(
            host,
            Table::Markers,
            key,
            &encoded,
            |_| u64::MAX,
            Eviction::SpentOnly,
        );
    }
    for queue in waiters {
        if Some(queue) != own_queue {
            host.wake(queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_claim_of_another_worker_is_busy_and_expires() {
        let marker = Marker::claim(7, 1_000);
        assert_eq!(marker.peer_state(8, 999), Peer::Busy);
        assert_eq!(marker.peer_state(7, 999), Peer::Free, "one's own claim");
        assert_eq!(
            marker.peer_state(8, 1_000),
            Peer::Free,
            "expired: the owner may be gone"
        );
    }

    #[test]
    fn a_workers_own_claim_of_one_key_is_not_pushed_out_by_its_claim_of_another() {
        // Found by the simulation: worker 1 claimed `a`, then `b` in a table of one
        // slot; `b`'s claim took `a`'s slot (its own claim looked spent to it), and
        // worker 2 fetched `a` too.
        let mut host = crate::fake::FakeEnvoy::default().host();
        let slots = Slots::new(1);
        let key = |tenant| {
            TokenKey::new(
                tokengate_core::Provider::genesys(),
                tokengate_core::TenantId::parse(tenant).unwrap(),
            )
        };
        assert!(claim(&mut host, &slots, &key("a"), 1, 0, 1_000));
        assert!(claim(&mut host, &slots, &key("b"), 1, 10, 1_000));
        assert_eq!(peer_state(&host, &slots, &key("a"), 2, 20), Peer::Busy);
    }

    #[test]
    fn a_released_or_expired_marker_of_another_key_gives_way_to_a_claim() {
        let mut host = crate::fake::FakeEnvoy::default().host();
        let slots = Slots::new(1);
        let key = |tenant| {
            TokenKey::new(
                tokengate_core::Provider::genesys(),
                tokengate_core::TenantId::parse(tenant).unwrap(),
            )
        };
        assert!(claim(&mut host, &slots, &key("a"), 1, 0, 1_000));
        release(
            &mut host,
            &slots,
            &key("a"),
            1,
            &Marker::release(10, None, 0),
            None,
        );
        assert!(claim(&mut host, &slots, &key("b"), 2, 20, 2_000));
        assert_eq!(
            peer_state(&host, &slots, &key("b"), 3, 30),
            Peer::Busy,
            "b's claim took the released marker's slot"
        );
        // b's claim ends at 2,000: at that moment c's claim may take its slot.
        assert!(claim(&mut host, &slots, &key("c"), 4, 2_000, 3_000));
        assert_eq!(peer_state(&host, &slots, &key("c"), 3, 2_001), Peer::Busy);
    }

    #[test]
    fn a_waiting_worker_is_listed_once_and_at_most_max_waiters_are() {
        let mut host = crate::fake::FakeEnvoy::default().host();
        let slots = Slots::new(4);
        let acme = TokenKey::new(
            tokengate_core::Provider::genesys(),
            tokengate_core::TenantId::parse("acme").unwrap(),
        );
        let waiters = |host: &crate::fake::FakeHost| {
            let found = slots.find(host, Table::Markers, &acme).unwrap();
            Marker::decode(&found.record).unwrap().waiters
        };
        assert!(claim(&mut host, &slots, &acme, 1, 0, 1_000));
        ask_to_be_woken(&mut host, &slots, &acme, 2, 7, 10);
        ask_to_be_woken(&mut host, &slots, &acme, 2, 7, 20);
        assert_eq!(waiters(&host), [7]);
        for queue in 100..500 {
            ask_to_be_woken(&mut host, &slots, &acme, 3, queue, 30);
        }
        assert_eq!(waiters(&host).len(), MAX_WAITERS);
    }

    #[test]
    fn a_worker_releases_only_its_own_claim() {
        // Found by the simulation: a worker whose claim was never written (every slot
        // held a live claim) released the claim another worker made since, and a
        // third fetch of the key started beside that worker's.
        let mut host = crate::fake::FakeEnvoy::default().host();
        let slots = Slots::new(4);
        let acme = TokenKey::new(
            tokengate_core::Provider::genesys(),
            tokengate_core::TenantId::parse("acme").unwrap(),
        );
        assert!(claim(&mut host, &slots, &acme, 2, 0, 1_000));
        release(
            &mut host,
            &slots,
            &acme,
            1,
            &Marker::release(10, None, 0),
            None,
        );
        assert_eq!(peer_state(&host, &slots, &acme, 3, 20), Peer::Busy);
        release(
            &mut host,
            &slots,
            &acme,
            2,
            &Marker::release(30, None, 0),
            None,
        );
        assert_eq!(peer_state(&host, &slots, &acme, 3, 40), Peer::Free);
    }

    #[test]
    fn a_released_marker_shares_its_error_for_a_moment() {
        let error = TokenError::new(ErrorCode::OauthInvalidGrant, "rejected");
        let marker = Marker::decode(&Marker::release(5_000, Some(&error), 0).encode()).unwrap();
        assert_eq!(marker.peer_state(8, 5_500), Peer::Failed(error));
        assert_eq!(marker.peer_state(8, 5_000 + ERROR_SHARE_MS), Peer::Free);
        assert_eq!(
            Marker::release(5_000, None, 0).peer_state(8, 5_500),
            Peer::Free
        );
    }

    #[test]
    fn a_rejection_is_cached_for_new_requests_and_a_passing_failure_is_not() {
        let rejected =
            TokenError::new(ErrorCode::OauthInvalidGrant, "crm rejected: invalid_client");
        let marker = Marker::decode(&Marker::release(5_000, Some(&rejected), 3_000).encode());
        let marker = marker.unwrap();
        assert_eq!(marker.cached_error(7_999), Some(rejected.clone()));
        assert_eq!(marker.peer_state(8, 7_999), Peer::Failed(rejected.clone()));
        assert_eq!(marker.cached_error(8_000), None, "for negativeCacheMs only");
        let not_found = TokenError::new(ErrorCode::CredentialsNotFound, "none");
        assert!(
            Marker::release(0, Some(&not_found), 3_000)
                .cached_error(1)
                .is_some()
        );
        let off = Marker::release(5_000, Some(&rejected), 0);
        assert_eq!(off.cached_error(5_001), None, "0 turns it off");
        assert_eq!(
            off.peer_state(8, 5_001),
            Peer::Failed(rejected),
            "waiters still hear it"
        );
        for code in [
            ErrorCode::OauthExchangeFailed,
            ErrorCode::TenantServiceUnavailable,
        ] {
            let passing = TokenError::new(code, "5xx or timeout");
            let marker = Marker::release(5_000, Some(&passing), 3_000);
            assert_eq!(marker.cached_error(5_001), None, "{code:?}");
            assert_eq!(marker.until_ms, 5_000 + ERROR_SHARE_MS);
        }
    }

    #[test]
    fn markers_survive_the_round_trip() {
        let mut marker = Marker::claim(7, 1_000);
        assert_eq!(Marker::decode(&marker.encode()), Some(marker.clone()));
        marker.waiters = vec![3, u32::MAX];
        assert_eq!(Marker::decode(&marker.encode()), Some(marker));
        let error = TokenError::new(ErrorCode::CompanionUnavailable, "no companion: é");
        let released = Marker::release(9_000, Some(&error), 5_000);
        assert_eq!(Marker::decode(&released.encode()), Some(released));
    }

    #[test]
    fn a_marker_holds_at_most_max_waiters() {
        let mut marker = Marker::claim(7, 1_000);
        marker.waiters = (0..300).collect();
        let decoded = Marker::decode(&marker.encode()).unwrap();
        assert_eq!(decoded.waiters.len(), MAX_WAITERS);
    }

    #[test]
    fn unreadable_markers_decode_to_nothing() {
        assert_eq!(Marker::decode(b""), None);
        assert_eq!(Marker::decode(b"{\"owner\":1}"), None);
        let mut cut = Marker::claim(7, 1_000);
        cut.waiters = vec![3];
        let bytes = cut.encode();
        assert_eq!(Marker::decode(&bytes[..bytes.len() - 1]), None);
        let mut bad_code = Marker::claim(7, 1_000).encode();
        bad_code.push(u8::MAX);
        assert_eq!(Marker::decode(&bad_code), None);
    }
}
