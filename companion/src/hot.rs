//! An in-process copy of the tokens this companion recently read from Redis, so a lease
//! that Redis would answer `hit` is answered without the Redis round trip.
//!
//! A copy never outlives what it copies by more than a moment:
//!
//! - it is dropped when the key's `ready` channel fires: every change the companions
//!   make to a cached token publishes there (a commit, an abort, an invalidation, on
//!   any companion); the companion that made the change drops its own copy as it
//!   answers, so its next lease reads its own write;
//! - everything is dropped, and nothing copied, while the pub/sub subscription is down,
//!   since those messages are then lost;
//! - a copy read from Redis is only kept if no message arrived while it was read, so a
//!   message that overtakes the read cannot be undone by it;
//! - no copy is trusted longer than [`HOT_TTL_MS`], the bound for changes made behind
//!   the companions' backs (a `DEL` by hand, a flushed Redis whose connection survived).
//!
//! A copy answers under the same rule as Redis (the token is usable beyond the margin
//! and expires after what the lease asks for); a lease that skips the cache
//! (`forceRefresh`) never looks here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokengate_core::CachedToken;

use crate::clock::Clock;

/// The longest a copy is used, in milliseconds.
pub const HOT_TTL_MS: u64 = 1_000;

/// At most this many keys are copied; beyond, the copies are dropped and start over.
pub const MAX_HOT_KEYS: usize = 10_000;

/// The copies, per key hash tag (see [`crate::store::key_tag`]).
pub struct HotTokens {
    /// Each copy and when it was read from Redis (epoch ms).
    copies: Mutex<HashMap<String, (CachedToken, u64)>>,
    /// Moves on every drop; a read is kept only if it did not move while it ran.
    generation: AtomicU64,
    /// The subscription is up, so drops are heard.
    live: AtomicBool,
    /// Ages the copies.
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for HotTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotTokens")
            .field("keys", &self.lock_copies().len())
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl HotTokens {
    /// No copies, and none kept until the subscription is up ([`HotTokens::set_live`]).
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            copies: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            live: AtomicBool::new(false),
            clock,
        }
    }

    /// The copy of `tag`'s token if it expires after `usable_after_ms` and is fresh.
    pub fn get(&self, tag: &str, usable_after_ms: u64) -> Option<CachedToken> {
        let now_ms = self.clock.now_ms();
        let copies = self.lock_copies();
        let (token, read_at_ms) = copies.get(tag)?;
        (now_ms.saturating_sub(*read_at_ms) < HOT_TTL_MS && token.expires_at_ms > usable_after_ms)
            .then(|| token.clone())
    }

    /// Taken before reading a token from Redis, for [`HotTokens::keep`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Keeps a copy of `tag`'s token read from Redis, unless the subscription is down or
    /// a drop happened since `generation` was taken.
    pub fn keep(&self, tag: &str, token: &CachedToken, generation: u64) {
        let now_ms = self.clock.now_ms();
        let mut copies = self.lock_copies();
        // Checked under the lock, which every drop also takes.
        if !self.live.load(Ordering::Acquire) || self.generation() != generation {
            return;
        }
        if copies.len() >= MAX_HOT_KEYS && !copies.contains_key(tag) {
            copies.clear();
        }
        copies.insert(tag.to_owned(), (token.clone(), now_ms));
    }

    /// Drops the copy of `tag`'s token (its `ready` channel fired, or this companion
    /// changed it).
    pub fn forget(&self, tag: &str) {
        let mut copies = self.lock_copies();
        self.generation.fetch_add(1, Ordering::AcqRel);
        copies.remove(tag);
    }

    /// Whether the subscription is up. Either way every copy is dropped: those kept
    /// before it went down may have missed messages, and so may those of a new one.
    pub fn set_live(&self, live: bool) {
        let mut copies = self.lock_copies();
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.live.store(live, Ordering::Release);
        copies.clear();
    }

    fn lock_copies(&self) -> MutexGuard<'_, HashMap<String, (CachedToken, u64)>> {
        // Every update is one insert, remove or clear: consistent even after a panic.
        self.copies
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;

    const TAG: &str = "genesys:acme";

    fn token(expires_at_ms: u64) -> CachedToken {
        CachedToken {
            access_token: "tok".into(),
            expires_at_ms,
        }
    }

    fn live_at(now_ms: u64) -> (Arc<FixedClock>, HotTokens) {
        let clock = Arc::new(FixedClock(AtomicU64::new(now_ms)));
        let hot = HotTokens::new(Arc::clone(&clock) as Arc<dyn Clock>);
        hot.set_live(true);
        (clock, hot)
    }

    #[test]
    fn a_copy_answers_like_redis_until_it_is_too_old() {
        let (clock, hot) = live_at(1_000);
        hot.keep(TAG, &token(60_000), hot.generation());
        assert_eq!(hot.get(TAG, 2_000), Some(token(60_000)));
        assert_eq!(hot.get(TAG, 60_000), None, "not newer than asked for");
        assert_eq!(hot.get("genesys:globex", 0), None);

        clock.0.store(1_000 + HOT_TTL_MS, Ordering::Relaxed);
        assert_eq!(hot.get(TAG, 2_000), None, "older than the TTL");
    }

    #[test]
    fn a_message_drops_the_copy_and_voids_a_read_it_overtook() {
        let (_clock, hot) = live_at(1_000);
        hot.keep(TAG, &token(60_000), hot.generation());
        let before_read = hot.generation();
        hot.forget(TAG);
        assert_eq!(hot.get(TAG, 0), None);

        hot.keep(TAG, &token(60_000), before_read);
        assert_eq!(hot.get(TAG, 0), None, "read before the message: not kept");
    }

    #[test]
    fn nothing_is_kept_while_the_subscription_is_down() {
        let (_clock, hot) = live_at(1_000);
        hot.keep(TAG, &token(60_000), hot.generation());
        hot.set_live(false);
        assert_eq!(hot.get(TAG, 0), None, "dropped when it went down");

        hot.keep(TAG, &token(60_000), hot.generation());
        assert_eq!(hot.get(TAG, 0), None);
    }
}
