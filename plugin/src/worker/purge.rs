//! Throwing a token away: when an upstream rejects the token a request carried (its
//! status is one of `purge.statuses`), or when a client asks for `forceRefresh`. Both
//! are limited per key per Envoy by core's [`RefreshThrottle`], whose last moment lives
//! in shared data so every worker of the Envoy sees it.
//!
//! [`RefreshThrottle`]: tokengate_core::limit::RefreshThrottle

use tokengate_core::cache::{GatewayEntry, PurgeRecord};
use tokengate_core::{CachedToken, TokenKey};

use super::Worker;
use crate::host::{Host, Level, Metric};
use crate::inflight;
use crate::slots::{Eviction, Table};

impl Worker {
    /// The upstream answered `status` to request `context_id`, which carried
    /// `injected` (its token when it came from the cache; `None` when the worker
    /// resumed it). A rejection status purges that token, at most once per key per
    /// `purge.minIntervalMs` on this Envoy.
    pub fn on_upstream_status(
        &mut self,
        host: &mut impl Host,
        context_id: u32,
        injected: Option<(TokenKey, CachedToken)>,
        status: u16,
    ) {
        let Some((key, token)) = injected.or_else(|| self.delivered.remove(&context_id)) else {
            return;
        };
        if !self.config.purge.statuses.contains(&status) {
            return;
        }
        let now_ms = host.now_ms();
        if !self.claim_purge(host, &key, now_ms, token.expires_at_ms) {
            return;
        }
        let cached = self.slots.find(host, Table::Tokens, &key).filter(|found| {
            GatewayEntry::decode(&found.record)
                .is_some_and(|entry| entry.token.access_token == token.access_token)
        });
        if let Some(found) = cached {
            self.slots.clear(host, &found, &key);
        }
        inflight::forget_cached_error(host, &self.slots, &key, now_ms);
        host.count(Metric::Purge);
        host.log(
            Level::Warn,
            &format!("upstream answered {status} with the token of {key}: purged"),
        );
        self.invalidate_later(key, token.access_token);
        self.schedule_tick(host);
    }

    /// Records a purge (or forced refresh) of `key`, whose current token expires at
    /// `stale_expires_at_ms`, unless the throttle refuses it: then it is counted as
    /// suppressed and refused.
    pub(super) fn claim_purge(
        &self,
        host: &mut impl Host,
        key: &TokenKey,
        now_ms: u64,
        stale_expires_at_ms: u64,
    ) -> bool {
        let last_ms = self
            .slots
            .find(host, Table::Purges, key)
            .and_then(|found| PurgeRecord::decode(&found.record))
            .map(|last| last.purged_at_ms);
        let throttle = self.config.refresh_throttle();
        if !throttle.admits(last_ms, now_ms) {
            host.count(Metric::PurgeSuppressed);
            return false;
        }
        let record = PurgeRecord {
            purged_at_ms: now_ms,
            stale_expires_at_ms,
        };
        // Another key's record is spent once it neither throttles nor guards anything.
        let worth = |other: &[u8]| {
            PurgeRecord::decode(other)
                .filter(|other| {
                    !throttle.admits(Some(other.purged_at_ms), now_ms)
                        || other.stale_expires_at_ms > now_ms
                })
                .map_or(0, |other| other.purged_at_ms.max(1))
        };
        let _ = self.slots.put(
            host,
            Table::Purges,
            key,
            &record.encode(),
            worth,
            Eviction::Allowed,
        );
        true
    }
}
