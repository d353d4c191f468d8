//! A model of the companion cluster's lease contract (README, "Companion API") with
//! Redis behind it, as the simulation (`plugin/tests/simulation.rs`) runs it in place of
//! the companion, and as `tests/tests/companion_model.rs` checks it against a real
//! companion on a real `redis-server`, answer by answer, so the model cannot drift from
//! what it stands for.
//!
//! Redis holds the tokens and the locks. A lease is answered, in order: `hit` with the
//! cached token if it outlives [`USABLE_MARGIN_MS`] and `minExpiresAtMs`; `fetch` with
//! the key's lock (for the lock TTL) if it is free; else it waits for the holder and
//! looks again at each commit, abort or lock expiry, until its wait budget ends (`503
//! LOCK_ACQUISITION_FAILED`). A forced lease skips the cached token; once it waits, it
//! takes only a token newer than that one (a fetch that started after it). A commit
//! stores the token (the lock holder's always, another lease's only if it outlives the
//! cached one; an expired one never) and frees the lock if the lease holds it; an abort
//! frees it; an invalidation deletes the cached token (only the named one, if named).
//!
//! Not modelled (the simulation does not use them): cached fetch failures (its aborts
//! carry none), degraded mode without Redis, the minimum refresh interval. The
//! simulation models crashes, restarts and freezes around the model: what a restart
//! loses is the waiting leases ([`CompanionModel::drop_waiters`]), not Redis' state.

use std::collections::HashMap;

use tokengate_core::TokenKey;
use tokengate_core::lease::{
    ABORT_PATH, AbortRequest, COMMIT_PATH, CommitRequest, INVALIDATE_PATH, InvalidateRequest,
    LEASE_PATH, LeaseRequest,
};

/// A cached token answers a lease only if it is valid beyond this (the companion's
/// `store::USABLE_MARGIN_MS`).
pub const USABLE_MARGIN_MS: u64 = 1_000;

/// What the companion answers a request, as a caller observes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `200 {"outcome": "hit"}`.
    Hit {
        access_token: String,
        expires_at_ms: u64,
    },
    /// `200 {"outcome": "fetch"}`: the caller holds the key's lock.
    Fetch { lease_id: String, lease_ttl_ms: u64 },
    /// `503 LOCK_ACQUISITION_FAILED`: the wait budget ended before the holder did.
    LockBusy,
    /// `204`: a commit, abort or invalidation done.
    Done,
    /// `400 INVALID_REQUEST`: a body that does not parse.
    BadRequest,
    /// `404`: no such route.
    NotFound,
}

/// What handling a request makes the companion do, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect<C> {
    /// Answer caller `C`.
    Answer(C, Reply),
    /// Look at the waiting leases and locks again after this long (a lock's TTL, a
    /// lease's wait budget): call [`CompanionModel::expire_locks`] and
    /// [`CompanionModel::wake`] then.
    Timer { after_ms: u64 },
}

#[derive(Debug, Clone)]
struct Lock {
    lease_id: String,
    until_ms: u64,
}

/// A lease waiting for another holder's lock.
#[derive(Debug, Clone)]
struct Waiter<C> {
    caller: C,
    request: LeaseRequest,
    give_up_at_ms: u64,
    /// Only a token expiring after this answers it.
    newer_than_ms: u64,
}

/// The companion cluster and its Redis; `C` names a caller waiting for an answer.
#[derive(Debug)]
pub struct CompanionModel<C> {
    lock_ttl_ms: u64,
    lease_wait_ms: u64,
    tokens: HashMap<TokenKey, (String, u64)>,
    locks: HashMap<TokenKey, Lock>,
    waiters: Vec<Waiter<C>>,
    next_lease: u64,
}

impl<C> CompanionModel<C> {
    /// A companion started with `--lock-ttl-ms` and `--lease-wait-ms`, on an empty Redis.
    pub fn new(lock_ttl_ms: u64, lease_wait_ms: u64) -> Self {
        Self {
            lock_ttl_ms,
            lease_wait_ms,
            tokens: HashMap::new(),
            locks: HashMap::new(),
            waiters: Vec::new(),
            next_lease: 0,
        }
    }

    /// A request of `caller` to `path` with `body` at `now_ms`.
    pub fn handle(&mut self, now_ms: u64, caller: C, path: &str, body: &[u8]) -> Vec<Effect<C>> {
        let mut effects = Vec::new();
        let reply = match path {
            LEASE_PATH => match serde_json::from_slice::<LeaseRequest>(body) {
                Ok(request) => {
                    let give_up_at_ms = now_ms + self.lease_wait_ms;
                    self.lease(now_ms, caller, request, give_up_at_ms, None, &mut effects);
                    return effects;
                }
                Err(_) => Reply::BadRequest,
            },
            COMMIT_PATH => match serde_json::from_slice::<CommitRequest>(body) {
                Ok(request) => {
                    let key = TokenKey::new(request.provider, request.tenant_id);
                    let held = self.holds(&key, &request.lease_id.0);
                    let expires_at_ms = request.expires_at_ms;
                    // The cached token's expiry while Redis still holds it.
                    let previous = self
                        .tokens
                        .get(&key)
                        .map(|(_, at)| *at)
                        .filter(|at| *at > now_ms);
                    let outlives = previous.is_none_or(|at| at < expires_at_ms);
                    if expires_at_ms > now_ms && (held || outlives) {
                        let token = request.access_token.expose().to_owned();
                        self.tokens.insert(key.clone(), (token, expires_at_ms));
                    }
                    self.release(now_ms, &key, &request.lease_id.0, &mut effects);
                    Reply::Done
                }
                Err(_) => Reply::BadRequest,
            },
            ABORT_PATH => match serde_json::from_slice::<AbortRequest>(body) {
                Ok(request) => {
                    let key = TokenKey::new(request.provider, request.tenant_id);
                    self.release(now_ms, &key, &request.lease_id.0, &mut effects);
                    Reply::Done
                }
                Err(_) => Reply::BadRequest,
            },
            INVALIDATE_PATH => match serde_json::from_slice::<InvalidateRequest>(body) {
                Ok(request) => {
                    let key = TokenKey::new(request.provider, request.tenant_id);
                    let named = match (&request.access_token, self.tokens.get(&key)) {
                        (Some(token), Some((cached, _))) => token.expose() == cached,
                        (None, Some(_)) => true,
                        (_, None) => false,
                    };
                    if named {
                        self.tokens.remove(&key);
                    }
                    Reply::Done
                }
                Err(_) => Reply::BadRequest,
            },
            _ => Reply::NotFound,
        };
        effects.push(Effect::Answer(caller, reply));
        effects
    }

    /// Redis expires the locks whose TTL ended by `now_ms`.
    pub fn expire_locks(&mut self, now_ms: u64) {
        self.locks.retain(|_, lock| lock.until_ms > now_ms);
    }

    /// Every waiting lease looks again (a freed lock, the end of its budget).
    pub fn wake(&mut self, now_ms: u64) -> Vec<Effect<C>> {
        let mut effects = Vec::new();
        self.wake_into(now_ms, &mut effects);
        effects
    }

    /// A restart: the waiting leases are lost (their callers see the connection reset);
    /// Redis keeps the tokens and locks.
    pub fn drop_waiters(&mut self) -> Vec<C> {
        std::mem::take(&mut self.waiters)
            .into_iter()
            .map(|waiter| waiter.caller)
            .collect()
    }

    fn holds(&self, key: &TokenKey, lease_id: &str) -> bool {
        self.locks
            .get(key)
            .is_some_and(|lock| lock.lease_id == lease_id)
    }

    fn release(
        &mut self,
        now_ms: u64,
        key: &TokenKey,
        lease_id: &str,
        effects: &mut Vec<Effect<C>>,
    ) {
        if self.holds(key, lease_id) {
            self.locks.remove(key);
        }
        self.wake_into(now_ms, effects);
    }

    fn wake_into(&mut self, now_ms: u64, effects: &mut Vec<Effect<C>>) {
        for waiter in std::mem::take(&mut self.waiters) {
            self.lease(
                now_ms,
                waiter.caller,
                waiter.request,
                waiter.give_up_at_ms,
                Some(waiter.newer_than_ms),
                effects,
            );
        }
    }

    /// A lease's round: the cached token if it answers the lease, else the lock, else a
    /// wait for the holder. `newer_than_ms` is set once it waited.
    fn lease(
        &mut self,
        now_ms: u64,
        caller: C,
        request: LeaseRequest,
        give_up_at_ms: u64,
        waited_for_newer_than_ms: Option<u64>,
        effects: &mut Vec<Effect<C>>,
    ) {
        let key = TokenKey::new(request.provider.clone(), request.tenant_id.clone());
        let wanted = request.min_expires_at_ms.unwrap_or(0);
        // A forced lease's first round skips the cached token.
        let newer_than = waited_for_newer_than_ms.or((!request.force_refresh).then_some(wanted));
        if let Some(newer_than) = newer_than {
            let usable_after = newer_than.max(now_ms + USABLE_MARGIN_MS);
            if let Some((token, expires_at_ms)) = self.tokens.get(&key) {
                if *expires_at_ms > usable_after {
                    let reply = Reply::Hit {
                        access_token: token.clone(),
                        expires_at_ms: *expires_at_ms,
                    };
                    effects.push(Effect::Answer(caller, reply));
                    return;
                }
            }
        }
        let free = self
            .locks
            .get(&key)
            .is_none_or(|lock| lock.until_ms <= now_ms);
        if free {
            self.next_lease += 1;
            let lease_id = format!("lease-{}", self.next_lease);
            let lock = Lock {
                lease_id: lease_id.clone(),
                until_ms: now_ms + self.lock_ttl_ms,
            };
            self.locks.insert(key, lock);
            effects.push(Effect::Timer {
                after_ms: self.lock_ttl_ms,
            });
            let reply = Reply::Fetch {
                lease_id,
                lease_ttl_ms: self.lock_ttl_ms,
            };
            effects.push(Effect::Answer(caller, reply));
            return;
        }
        if now_ms >= give_up_at_ms {
            effects.push(Effect::Answer(caller, Reply::LockBusy));
            return;
        }
        let newer_than_ms = newer_than.unwrap_or_else(|| {
            // The token this forced lease skipped, if Redis still holds it.
            let cached = self.tokens.get(&key).map(|(_, at)| *at);
            cached.filter(|at| *at > now_ms).unwrap_or(0).max(wanted)
        });
        if waited_for_newer_than_ms.is_none() {
            // A new waiter: it gives up then (looking again adds no timer).
            effects.push(Effect::Timer {
                after_ms: give_up_at_ms - now_ms,
            });
        }
        self.waiters.push(Waiter {
            caller,
            request,
            give_up_at_ms,
            newer_than_ms,
        });
    }
}
