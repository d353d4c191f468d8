//! Cache hits, counted per worker and added to the `tokengate.cache_hit` stat in
//! batches. Every stat update is a host call, and a cached hit is otherwise only four
//! (read the tenant header, the clock and the shared cache, set the authorization
//! header), so a per-hit update would be a fifth of the filter's cost on the hot path.
//!
//! The stat stays exact whenever the worker is idle: the pending hits are added when
//! the worker's last open request ends (after its answer, off the request's path). Under
//! sustained load it lags by at most [`BATCH`] hits or [`MAX_DELAY_MS`].

use std::sync::atomic::{AtomicU64, Ordering};

/// The pending hits are added once there are this many...
pub const BATCH: u64 = 64;
/// ... or on the first hit this long after the last addition.
pub const MAX_DELAY_MS: u64 = 1_000;

/// One worker's tally. Atomics, because a request ends (its context is dropped) outside
/// any borrow of the worker, and the native build runs a worker's background work on
/// another thread than its requests (relaxed: each field is a counter of its own).
#[derive(Debug, Default)]
pub struct HitTally {
    /// Hits not yet added to the stat.
    pending: AtomicU64,
    /// Requests of this worker that have started and not ended.
    open_requests: AtomicU64,
    /// When a hit last brought the stat up to date.
    added_at_ms: AtomicU64,
}

impl HitTally {
    /// A request of this worker started.
    pub fn request_started(&self) {
        self.open_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A request was served from the cache at `now_ms`. Returns the hits to add to the
    /// stat now, if it is time.
    #[must_use]
    pub fn hit(&self, now_ms: u64) -> Option<u64> {
        let pending = self
            .pending
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let added_at_ms = self.added_at_ms.load(Ordering::Relaxed);
        if pending >= BATCH || now_ms.saturating_sub(added_at_ms) >= MAX_DELAY_MS {
            self.added_at_ms.store(now_ms, Ordering::Relaxed);
            return self.take();
        }
        None
    }

    /// A request of this worker ended. When it was the last open one, returns the
    /// pending hits to add now.
    #[must_use]
    pub fn request_ended(&self) -> Option<u64> {
        let before = self
            .open_requests
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                Some(open.saturating_sub(1))
            })
            .unwrap_or(0);
        if before <= 1 { self.take() } else { None }
    }

    /// Every pending hit, emptying the tally (on ticks).
    #[must_use]
    pub fn take(&self) -> Option<u64> {
        Some(self.pending.swap(0, Ordering::Relaxed)).filter(|pending| *pending > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_worker_has_added_every_hit() {
        let tally = HitTally::default();
        tally.request_started();
        assert_eq!(
            tally.hit(5_000),
            Some(1),
            "the first hit in a while is added at once"
        );
        assert_eq!(tally.request_ended(), None);

        tally.request_started();
        assert_eq!(
            tally.hit(5_010),
            None,
            "a hit soon after the last addition waits"
        );
        assert_eq!(
            tally.request_ended(),
            Some(1),
            "the last open request ends: added"
        );
        assert_eq!(tally.take(), None);
    }

    #[test]
    fn under_load_hits_are_added_in_batches_or_after_the_delay() {
        let tally = HitTally::default();
        for _ in 0..3 {
            tally.request_started();
        }
        assert_eq!(tally.hit(10_000), Some(1));
        let added: Vec<Option<u64>> = (0..BATCH).map(|_| tally.hit(10_001)).collect();
        assert_eq!(added.iter().flatten().collect::<Vec<_>>(), [&BATCH]);
        assert_eq!(tally.hit(10_002), None);
        assert_eq!(
            tally.hit(10_000 + MAX_DELAY_MS),
            None,
            "counted from the batch's addition"
        );
        assert_eq!(tally.hit(10_001 + MAX_DELAY_MS), Some(3));
        assert_eq!(tally.hit(10_002 + MAX_DELAY_MS), None);
        assert_eq!(tally.request_ended(), None, "two requests still open");
        assert_eq!(tally.take(), Some(1), "a tick adds what is pending");
    }
}
