//! Degraded mode: how leases are answered while Redis is unhealthy (see
//! [`crate::health`]), without the cluster cache and without the cluster-wide lock.
//!
//! Three pieces of in-process state, all behind one mutex and all driven by a tokio
//! `now` the caller passes in (so the rules are tested without sleeping); core's
//! limiter reads it as milliseconds since this state was made.
//!
//! - **In-flight fetches** (single flight per process): the first lease of a key gets
//!   `fetch` with a lease id starting with [`LOCAL_LEASE_PREFIX`]; later leases of the
//!   same key [join](Begin::Join) it and are answered by its commit, so an outage still
//!   costs one OAuth call per key per companion, not one per caller. A flight that is
//!   neither committed nor aborted ends at the lock TTL, like a Redis lock.
//! - **The limiter**: core's sliding log ([`FetchLog`]) per (provider, tenant), the
//!   same rule the filter applies without its companion. A new flight is admitted only
//!   if fewer than `--degraded-fetches-per-minute` flights of that key started in the
//!   last [`WINDOW_MS`]; otherwise the lease is refused (`503 CACHE_UNAVAILABLE`) and
//!   told when the oldest admission leaves the window. Joining a flight costs nothing
//!   (it causes no fetch). The logs survive recoveries, so a flapping Redis cannot
//!   multiply the fetches; logs with no admission left in the window are swept once per
//!   window, so the map holds only recently fetched keys.
//! - **Cached failures**: an abort that reports rejected or missing credentials answers
//!   the key's degraded leases with that error until `--negative-cache-ms` has passed
//!   (negative caching, as Redis does while healthy); swept with the limiter's logs.
//! - **Deferred invalidations**: an invalidation received while Redis is unhealthy is
//!   remembered and applied once Redis is healthy again, so a token an upstream
//!   rejected during the outage does not come back from the cluster cache after it.
//!
//! Commits and aborts of local leases never touch Redis: a commit answers the flight's
//! waiters and is not stored anywhere.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokengate_core::lease::{FetchFailure, LeaseId};
use tokengate_core::limit::{Admission, FetchLog, WINDOW_MS};
use tokengate_core::{CachedToken, SecretString, TokenKey};
use tokio::sync::watch;
use tokio::time::Instant;

/// Prefix of the lease ids handed out in degraded mode; a commit or abort carrying one
/// skips Redis.
pub const LOCAL_LEASE_PREFIX: &str = "local-";

/// The limiter's window (core's [`WINDOW_MS`]).
pub const WINDOW: Duration = Duration::from_millis(WINDOW_MS);

/// Most invalidations remembered while Redis is down (one per key); beyond it, new
/// keys' invalidations are dropped with a warning.
pub const MAX_DEFERRED_INVALIDATIONS: usize = 10_000;

/// Whether a lease id was handed out in degraded mode.
pub fn is_local(lease_id: &LeaseId) -> bool {
    lease_id.0.starts_with(LOCAL_LEASE_PREFIX)
}

/// Where a local fetch stands, as seen by the leases waiting on it.
#[derive(Debug, Clone)]
pub enum FlightState {
    /// The holder is still fetching.
    Pending,
    /// The holder committed this (usable) token.
    Committed(CachedToken),
    /// The holder aborted, committed an unusable token, or the flight was replaced
    /// after it expired: a waiter may start a new flight.
    Ended,
}

/// What a degraded lease should do.
#[derive(Debug)]
pub enum Begin {
    /// No fetch of this key is in flight and the limiter admitted one: the caller fetches.
    Fetch(LeaseId),
    /// Another lease of this process is fetching: wait for its outcome, at most until
    /// `expires_at` (when the flight counts as abandoned).
    Join {
        /// Turns from [`FlightState::Pending`] to the flight's outcome. A closed channel
        /// means [`FlightState::Ended`].
        outcome: watch::Receiver<FlightState>,
        /// When the flight expires if its holder never finishes.
        expires_at: Instant,
    },
    /// The key's last fetch failed in a way asking again cannot fix, moments ago:
    /// answer its error.
    Failed(FetchFailure),
    /// No fetch in flight, and the limit is reached.
    Refused {
        /// When the oldest admission of the key leaves the window.
        retry_after: Duration,
    },
}

/// One local fetch in progress.
#[derive(Debug)]
struct Flight {
    /// The holder's lease id; only its commit or abort ends the flight.
    lease_id: LeaseId,
    /// When the flight is abandoned if the holder never finishes (lock TTL after start).
    expires_at: Instant,
    /// Tells the waiters the outcome.
    outcome: watch::Sender<FlightState>,
}

/// The mutable state, under one lock.
#[derive(Debug)]
struct State {
    /// In-flight local fetches, one per key at most.
    flights: HashMap<TokenKey, Flight>,
    /// Each key's admitted flights within the last window.
    admissions: HashMap<TokenKey, FetchLog>,
    /// When `admissions` was last purged of keys with no recent admission (limiter ms).
    last_sweep_ms: u64,
    /// Invalidations waiting for Redis: key -> the token to drop (`None`: any).
    deferred: HashMap<TokenKey, Option<SecretString>>,
    /// Failures answered from memory: key -> the failure and when it stops answering.
    failures: HashMap<TokenKey, (FetchFailure, Instant)>,
}

/// Degraded mode's state for one companion process.
#[derive(Debug)]
pub struct Degraded {
    /// Flights, limiter log and deferred invalidations.
    state: Mutex<State>,
    /// Time zero of the limiter's milliseconds (core's rules take `now_ms`).
    origin: Instant,
    /// Flights admitted per key in any window; 0 refuses every degraded fetch.
    per_minute: u32,
    /// How long a flight lives without commit or abort (the lock TTL).
    flight_ttl: Duration,
}

impl Degraded {
    /// Degraded mode admitting `per_minute` fetches per key per rolling minute, with
    /// flights abandoned after `flight_ttl`.
    pub fn new(per_minute: u32, flight_ttl: Duration) -> Self {
        let origin = Instant::now();
        Self {
            state: Mutex::new(State {
                flights: HashMap::new(),
                admissions: HashMap::new(),
                last_sweep_ms: 0,
                deferred: HashMap::new(),
                failures: HashMap::new(),
            }),
            origin,
            per_minute,
            flight_ttl,
        }
    }

    /// The limit per key per rolling minute.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Decides what a degraded lease of `key` arriving at `now` does (see [`Begin`]).
    pub fn begin(&self, key: &TokenKey, now: Instant) -> Begin {
        let now_ms = self.millis(now);
        let mut state = self.lock();
        state.sweep(now_ms, now);
        if let Some((failure, until)) = state.failures.get(key) {
            if *until > now {
                return Begin::Failed(failure.clone());
            }
        }
        if let Some(flight) = state.flights.get(key) {
            if flight.expires_at > now {
                return Begin::Join {
                    outcome: flight.outcome.subscribe(),
                    expires_at: flight.expires_at,
                };
            }
            // Abandoned: dropping its sender tells its waiters it ended.
            tracing::warn!(
                provider = key.provider.as_str(), tenant = key.tenant_id.as_str(),
                lease_id = %flight.lease_id.0,
                "degraded-mode fetch neither committed nor aborted within the lock TTL; replacing it"
            );
            state.flights.remove(key);
        }

        let log = state.admissions.entry(key.clone()).or_default();
        if let Admission::Refused { retry_after_ms } = log.admit(now_ms, self.per_minute) {
            return Begin::Refused {
                retry_after: Duration::from_millis(retry_after_ms),
            };
        }

        let lease_id = LeaseId(format!("{LOCAL_LEASE_PREFIX}{}", uuid::Uuid::new_v4()));
        state.flights.insert(
            key.clone(),
            Flight {
                lease_id: lease_id.clone(),
                expires_at: now + self.flight_ttl,
                outcome: watch::Sender::new(FlightState::Pending),
            },
        );
        Begin::Fetch(lease_id)
    }

    /// Ends the flight of `key` held by `lease_id`, if it is still the current one:
    /// `Some(token)` answers its waiters (commit of a usable token), `None` lets them
    /// start a new flight (abort). Returns whether there was such a flight.
    pub fn finish(&self, key: &TokenKey, lease_id: &LeaseId, token: Option<CachedToken>) -> bool {
        let flight = {
            let mut state = self.lock();
            match state.flights.entry(key.clone()) {
                Entry::Occupied(entry) if entry.get().lease_id == *lease_id => entry.remove(),
                _ => return false,
            }
        };
        let outcome = token.map_or(FlightState::Ended, FlightState::Committed);
        flight.outcome.send_replace(outcome);
        true
    }

    /// Answers `key`'s degraded leases with `failure` until `until` (negative caching).
    pub fn remember_failure(&self, key: &TokenKey, failure: FetchFailure, until: Instant) {
        self.lock().failures.insert(key.clone(), (failure, until));
    }

    /// Forgets `key`'s failure (an invalidation).
    pub fn forget_failure(&self, key: &TokenKey) {
        self.lock().failures.remove(key);
    }

    /// Remembers an invalidation of `key` until Redis is back (see [`Degraded::take_deferred`]).
    ///
    /// Two invalidations of one key naming different tokens merge into "drop whatever is
    /// cached": the cached token is one of them at most, and dropping a good one costs
    /// one fetch. Returns `false` if the key is new and the list is full.
    pub fn defer_invalidation(&self, key: &TokenKey, access_token: Option<SecretString>) -> bool {
        let mut state = self.lock();
        let full = state.deferred.len() >= MAX_DEFERRED_INVALIDATIONS;
        match state.deferred.entry(key.clone()) {
            Entry::Occupied(mut entry) => {
                if entry.get() != &access_token {
                    entry.insert(None);
                }
                true
            }
            Entry::Vacant(_) if full => false,
            Entry::Vacant(entry) => {
                entry.insert(access_token);
                true
            }
        }
    }

    /// Takes every deferred invalidation, to apply them to Redis.
    pub fn take_deferred(&self) -> Vec<(TokenKey, Option<SecretString>)> {
        self.lock().deferred.drain().collect()
    }

    /// How many invalidations wait for Redis.
    pub fn deferred_len(&self) -> usize {
        self.lock().deferred.len()
    }

    /// `now` as the limiter's milliseconds: since this state was made (0 before it).
    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the maps consistent, so a panic elsewhere cannot corrupt them.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Once per window, drops the limiter logs of keys with no admission in the last
    /// window and the failures no longer answered, so the maps hold only recent keys.
    fn sweep(&mut self, now_ms: u64, now: Instant) {
        if now_ms.saturating_sub(self.last_sweep_ms) < WINDOW_MS {
            return;
        }
        self.last_sweep_ms = now_ms;
        self.admissions.retain(|_, log| !log.is_idle(now_ms));
        self.failures.retain(|_, (_, until)| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengate_core::{Provider, TenantId};

    fn key(tenant: &str) -> TokenKey {
        TokenKey::new(Provider::genesys(), TenantId::parse(tenant).unwrap())
    }

    fn token(value: &str) -> CachedToken {
        CachedToken {
            access_token: SecretString::from(value),
            expires_at_ms: u64::MAX >> 12,
        }
    }

    fn fetch(begin: Begin) -> LeaseId {
        match begin {
            Begin::Fetch(lease_id) => lease_id,
            other => panic!("expected fetch, got {other:?}"),
        }
    }

    #[test]
    fn the_limit_holds_in_every_rolling_minute_per_key() {
        let degraded = Degraded::new(2, Duration::from_secs(30));
        let t0 = Instant::now();
        let acme = key("acme");

        let first = fetch(degraded.begin(&acme, t0));
        assert!(is_local(&first));
        assert!(degraded.finish(&acme, &first, None));
        let second = fetch(degraded.begin(&acme, t0 + Duration::from_secs(10)));
        assert!(degraded.finish(&acme, &second, None));

        match degraded.begin(&acme, t0 + Duration::from_secs(20)) {
            Begin::Refused { retry_after } => assert_eq!(retry_after, Duration::from_secs(40)),
            other => panic!("expected refused, got {other:?}"),
        }
        // Other keys have their own window.
        fetch(degraded.begin(&key("globex"), t0 + Duration::from_secs(20)));
        // The first admission leaves the window 60 s after it started.
        assert!(matches!(
            degraded.begin(&acme, t0 + Duration::from_millis(59_999)),
            Begin::Refused { .. }
        ));
        fetch(degraded.begin(&acme, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_limit_of_zero_refuses_every_fetch() {
        let degraded = Degraded::new(0, Duration::from_secs(30));
        assert!(matches!(
            degraded.begin(&key("acme"), Instant::now()),
            Begin::Refused { .. }
        ));
    }

    #[test]
    fn leases_during_a_flight_join_it_without_using_the_limit_and_get_its_token() {
        let degraded = Degraded::new(1, Duration::from_secs(30));
        let now = Instant::now();
        let acme = key("acme");
        let holder = fetch(degraded.begin(&acme, now));

        let Begin::Join {
            outcome: mut first,
            expires_at,
        } = degraded.begin(&acme, now)
        else {
            panic!("expected join");
        };
        assert_eq!(expires_at, now + Duration::from_secs(30));
        let Begin::Join {
            outcome: second, ..
        } = degraded.begin(&acme, now)
        else {
            panic!("expected join");
        };
        assert!(matches!(*first.borrow_and_update(), FlightState::Pending));

        // A commit with another lease id is not this flight's.
        assert!(!degraded.finish(&acme, &LeaseId("local-other".into()), Some(token("x"))));
        assert!(degraded.finish(&acme, &holder, Some(token("tok"))));
        for outcome in [first, second] {
            match &*outcome.borrow() {
                FlightState::Committed(got) => assert_eq!(got.access_token.expose(), "tok"),
                other => panic!("expected the token, got {other:?}"),
            }
        }
        // The flight is over; the limit (1) was used by the holder alone.
        assert!(matches!(degraded.begin(&acme, now), Begin::Refused { .. }));
    }

    #[test]
    fn an_abort_ends_the_flight_and_an_expired_flight_is_replaced() {
        let degraded = Degraded::new(5, Duration::from_secs(30));
        let now = Instant::now();
        let acme = key("acme");

        let holder = fetch(degraded.begin(&acme, now));
        let Begin::Join { outcome, .. } = degraded.begin(&acme, now) else {
            panic!("expected join");
        };
        assert!(degraded.finish(&acme, &holder, None));
        assert!(matches!(*outcome.borrow(), FlightState::Ended));

        let abandoned = fetch(degraded.begin(&acme, now));
        let Begin::Join { outcome, .. } = degraded.begin(&acme, now) else {
            panic!("expected join");
        };
        let later = now + Duration::from_secs(30);
        let replacement = fetch(degraded.begin(&acme, later));
        assert_ne!(replacement, abandoned);
        assert!(
            outcome.has_changed().is_err(),
            "the old flight's waiters are told"
        );
        assert!(!degraded.finish(&acme, &abandoned, None));
    }

    #[test]
    fn keys_without_recent_admissions_are_swept() {
        let degraded = Degraded::new(5, Duration::from_secs(1));
        let now = Instant::now() + WINDOW;
        let lease = fetch(degraded.begin(&key("acme"), now));
        degraded.finish(&key("acme"), &lease, None);
        fetch(degraded.begin(&key("globex"), now + WINDOW));
        assert_eq!(degraded.lock().admissions.len(), 1);
    }

    #[test]
    fn deferred_invalidations_merge_per_key() {
        let degraded = Degraded::new(5, Duration::from_secs(1));
        let (acme, globex) = (key("acme"), key("globex"));
        assert!(degraded.defer_invalidation(&acme, Some("a".into())));
        assert!(degraded.defer_invalidation(&acme, Some("a".into())));
        assert!(degraded.defer_invalidation(&globex, Some("g1".into())));
        assert!(degraded.defer_invalidation(&globex, Some("g2".into())));
        assert_eq!(degraded.deferred_len(), 2);

        let mut taken = degraded.take_deferred();
        taken.sort_by(|a, b| a.0.tenant_id.as_str().cmp(b.0.tenant_id.as_str()));
        assert_eq!(
            taken,
            vec![(acme, Some("a".into())), (globex, None)],
            "different tokens of one key merge into 'drop any'"
        );
        assert_eq!(degraded.deferred_len(), 0);
    }
}
