//! Wall-clock time in milliseconds since the Unix epoch, behind a trait so the lease
//! logic can be tested with a fixed clock.
//!
//! Token expiries travel as epoch milliseconds (`expiresAtMs`), so this is the one
//! place the companion reads the system clock. Durations (waits, timeouts) use tokio's
//! monotonic clock instead.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// Tells the current wall-clock time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock set before 1970 reads as 0; Redis' own PXAT expiry still removes tokens.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock the unit tests set by hand.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FixedClock(pub std::sync::atomic::AtomicU64);

#[cfg(test)]
impl Clock for FixedClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now_ms() > 1_577_836_800_000);
    }
}
