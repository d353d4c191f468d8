//! Stale-if-error: the last token this companion handed out or saw committed for each
//! key, kept so that a lease whose Redis shard is unreachable (or Redis as a whole) is
//! still answered `hit` while that token is valid, instead of costing a fetch.
//!
//! A token is remembered when a lease is answered from Redis, when a commit stores it,
//! and when a degraded-mode fetch commits it; it is forgotten when this companion
//! invalidates the key, when another companion's invalidation is announced on the key's
//! `ready` channel, and when it expires. It is only used while the key cannot use Redis
//! ([`crate::lease`]), and only under the rule Redis applies (usable beyond the margin,
//! newer than what the lease asks for); a lease that skips the cache (`forceRefresh`)
//! never looks here.
//!
//! The trade-off: while the key's shard is unreachable, an invalidation made by another
//! companion cannot reach this one (its `DEL` and its announcement need that shard, or
//! the announcement is lost with the subscription), so a token purged elsewhere during
//! the outage may still be served here until it expires, or until a caller of this
//! companion reports it rejected. Unlike the [hot copies](crate::hot), these copies
//! survive the loss of the subscription: that is what they are for.
//!
//! At most [`MAX_STALE_KEYS`] keys are remembered; beyond, expired copies are dropped,
//! then the one expiring soonest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokengate_core::CachedToken;

use crate::clock::Clock;

/// At most this many keys' tokens are remembered.
pub const MAX_STALE_KEYS: usize = 10_000;

/// The remembered tokens, per key hash tag (see [`crate::store::key_tag`]).
pub struct StaleTokens {
    /// The last token of each key.
    tokens: Mutex<HashMap<String, CachedToken>>,
    /// Tells expired tokens.
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for StaleTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaleTokens")
            .field("keys", &self.lock_tokens().len())
            .finish_non_exhaustive()
    }
}

impl StaleTokens {
    /// Nothing remembered.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            tokens: Mutex::new(HashMap::new()),
            clock,
        }
    }

    /// The token remembered for `tag` if it expires after `usable_after_ms`.
    pub fn get(&self, tag: &str, usable_after_ms: u64) -> Option<CachedToken> {
        self.lock_tokens()
            .get(tag)
            .filter(|token| token.expires_at_ms > usable_after_ms)
            .cloned()
    }

    /// Remembers `token` for `tag`, unless a token that lives longer is remembered.
    pub fn keep(&self, tag: &str, token: &CachedToken) {
        let now_ms = self.clock.now_ms();
        if token.expires_at_ms <= now_ms {
            return;
        }
        let mut tokens = self.lock_tokens();
        if let Some(known) = tokens.get_mut(tag) {
            if known.expires_at_ms < token.expires_at_ms {
                *known = token.clone();
            }
            return;
        }
        if tokens.len() >= MAX_STALE_KEYS {
            tokens.retain(|_, known| known.expires_at_ms > now_ms);
        }
        if tokens.len() >= MAX_STALE_KEYS {
            let soonest = tokens
                .iter()
                .min_by_key(|(_, known)| known.expires_at_ms)
                .map(|(tag, _)| tag.clone());
            if let Some(soonest) = soonest {
                tokens.remove(&soonest);
            }
        }
        tokens.insert(tag.to_owned(), token.clone());
    }

    /// Forgets `tag`'s token (it was invalidated, here or elsewhere).
    pub fn forget(&self, tag: &str) {
        self.lock_tokens().remove(tag);
    }

    fn lock_tokens(&self) -> MutexGuard<'_, HashMap<String, CachedToken>> {
        // Every update is one insert, remove or retain: consistent even after a panic.
        self.tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn token(name: &str, expires_at_ms: u64) -> CachedToken {
        CachedToken {
            access_token: name.into(),
            expires_at_ms,
        }
    }

    fn stale_at(now_ms: u64) -> (Arc<FixedClock>, StaleTokens) {
        let clock = Arc::new(FixedClock(AtomicU64::new(now_ms)));
        let stale = StaleTokens::new(Arc::clone(&clock) as Arc<dyn Clock>);
        (clock, stale)
    }

    #[test]
    fn the_longest_lived_token_answers_until_it_expires_or_is_forgotten() {
        let (_clock, stale) = stale_at(1_000);
        stale.keep("a", &token("long", 60_000));
        stale.keep("a", &token("short", 30_000));
        assert_eq!(stale.get("a", 2_000), Some(token("long", 60_000)));
        assert_eq!(stale.get("a", 60_000), None, "not newer than asked for");
        stale.keep("a", &token("longer", 90_000));
        assert_eq!(stale.get("a", 2_000), Some(token("longer", 90_000)));
        stale.forget("a");
        assert_eq!(stale.get("a", 2_000), None);
        stale.keep("b", &token("expired", 1_000));
        assert_eq!(stale.get("b", 0), None, "an expired token is not kept");
    }

    #[test]
    fn memory_is_bounded_dropping_expired_then_soonest_expiring_tokens() {
        let (clock, stale) = stale_at(1_000);
        for n in 0..MAX_STALE_KEYS {
            let expires_at_ms = 10_000 + u64::try_from(n).unwrap();
            stale.keep(&format!("k{n}"), &token("t", expires_at_ms));
        }
        stale.keep("new", &token("t", 50_000));
        assert_eq!(stale.get("k0", 0), None, "the soonest expiring was dropped");
        assert!(stale.get("k1", 0).is_some() && stale.get("new", 0).is_some());

        clock.0.store(20_000, Ordering::Relaxed);
        stale.keep("newer", &token("t", 60_000));
        assert_eq!(stale.lock_tokens().len(), 2, "expired ones were swept");
    }
}
