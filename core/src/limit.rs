//! How often one token key may cause a fetch when nothing cluster-wide collapses it,
//! and how often a client may throw a token away: the numbers and the rules, once, for
//! the filter (local mode, purges, `forceRefresh`) and the companion (degraded mode,
//! `forceRefresh` on its `/auth/token`).
//!
//! Both rules are pure: the caller keeps the state per key and passes `now_ms`.

/// Fetches per key per rolling minute admitted while the cluster-wide lock is out of
/// reach (the filter without its companion, the companion without Redis).
pub const DEFAULT_FETCHES_PER_MINUTE: u32 = 6;

/// The fetch limiter's window.
pub const WINDOW_MS: u64 = 60_000;

/// At most one purge or forced refresh of a key in this long, so a broken upstream or a
/// client looping `forceRefresh` cannot cause one OAuth call per request.
pub const DEFAULT_MIN_REFRESH_INTERVAL_MS: u64 = 10_000;

/// One key's fetch admissions within the last [`WINDOW_MS`]: a sliding log holding at
/// most `per_minute` start times. Unlike a fixed window it never admits more than the
/// limit within any minute, and unlike a token bucket it has no burst on top of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchLog {
    /// Start times of the admitted fetches, oldest first.
    starts_ms: Vec<u64>,
}

/// The limiter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Admission {
    /// The fetch may start; it is counted.
    Admitted,
    /// The limit is reached; the oldest admission leaves the window after this long.
    Refused {
        /// Milliseconds until a fetch would be admitted.
        retry_after_ms: u64,
    },
}

impl FetchLog {
    /// Admits a fetch at `now_ms` if fewer than `per_minute` started in the last
    /// [`WINDOW_MS`]; 0 refuses every fetch.
    pub fn admit(&mut self, now_ms: u64, per_minute: u32) -> Admission {
        self.forget_before(now_ms);
        let limit = usize::try_from(per_minute).unwrap_or(usize::MAX);
        if self.starts_ms.len() < limit {
            self.starts_ms.push(now_ms);
            return Admission::Admitted;
        }
        let oldest = self.starts_ms.first().copied().unwrap_or(now_ms);
        Admission::Refused {
            retry_after_ms: oldest
                .saturating_add(WINDOW_MS)
                .saturating_sub(now_ms)
                .max(1),
        }
    }

    /// Whether no admission is left in the window at `now_ms`: the log can be dropped.
    pub fn is_idle(&self, now_ms: u64) -> bool {
        self.starts_ms
            .last()
            .is_none_or(|last| now_ms.saturating_sub(*last) >= WINDOW_MS)
    }

    fn forget_before(&mut self, now_ms: u64) {
        let live = self
            .starts_ms
            .iter()
            .position(|start| now_ms.saturating_sub(*start) < WINDOW_MS)
            .unwrap_or(self.starts_ms.len());
        self.starts_ms.drain(..live);
    }
}

/// The rate limit on throwing a key's token away (a purge after an upstream rejection,
/// or a client's `forceRefresh`): at most one per `min_interval_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshThrottle {
    /// Shortest time between two purges or forced refreshes of one key.
    pub min_interval_ms: u64,
}

impl Default for RefreshThrottle {
    fn default() -> Self {
        Self {
            min_interval_ms: DEFAULT_MIN_REFRESH_INTERVAL_MS,
        }
    }
}

impl RefreshThrottle {
    /// Whether a purge or forced refresh at `now_ms` may go ahead, the last one having
    /// happened at `last_ms`. When it may, the caller records `now_ms` as the last.
    pub fn admits(&self, last_ms: Option<u64>, now_ms: u64) -> bool {
        last_ms.is_none_or(|last| now_ms.saturating_sub(last) >= self.min_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn the_limit_holds_within_any_rolling_minute() {
        let mut log = FetchLog::default();
        for at in [0, 10_000, 20_000] {
            assert_eq!(log.admit(at, 3), Admission::Admitted);
        }
        assert_eq!(
            log.admit(59_999, 3),
            Admission::Refused { retry_after_ms: 1 },
            "the first admission is still in the window"
        );
        assert_eq!(
            log.admit(60_000, 3),
            Admission::Admitted,
            "it left the window"
        );
        assert_eq!(
            log.admit(60_001, 3),
            Admission::Refused {
                retry_after_ms: 9_999
            },
            "the next to leave is the one at 10 s"
        );
    }

    #[test]
    fn a_refused_fetch_is_not_counted() {
        let mut log = FetchLog::default();
        assert_eq!(log.admit(0, 1), Admission::Admitted);
        for at in [1, 2, 3] {
            assert!(matches!(log.admit(at, 1), Admission::Refused { .. }));
        }
        assert_eq!(log.admit(WINDOW_MS, 1), Admission::Admitted);
    }

    #[test]
    fn a_limit_of_zero_refuses_everything() {
        let mut log = FetchLog::default();
        assert!(matches!(log.admit(0, 0), Admission::Refused { .. }));
        assert!(log.is_idle(0));
    }

    #[test]
    fn a_log_is_idle_once_its_last_admission_left_the_window() {
        let mut log = FetchLog::default();
        assert!(log.is_idle(0));
        assert_eq!(log.admit(1_000, 6), Admission::Admitted);
        assert!(!log.is_idle(1_000 + WINDOW_MS - 1));
        assert!(log.is_idle(1_000 + WINDOW_MS));
    }

    #[test]
    fn the_log_never_holds_more_than_the_limit() {
        let mut log = FetchLog::default();
        for at in 0..1_000 {
            let _ = log.admit(at, 6);
        }
        assert_eq!(log.starts_ms.len(), 6);
    }

    #[test]
    fn one_refresh_per_interval() {
        let throttle = RefreshThrottle {
            min_interval_ms: 10_000,
        };
        assert!(throttle.admits(None, 5), "never refreshed");
        assert!(!throttle.admits(Some(5), 10_004));
        assert!(throttle.admits(Some(5), 10_005));
        assert_eq!(
            RefreshThrottle::default().min_interval_ms,
            DEFAULT_MIN_REFRESH_INTERVAL_MS
        );
    }
}
