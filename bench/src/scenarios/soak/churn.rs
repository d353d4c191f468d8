//! Tenant churn: which tenants the load sends for at each moment. The active set has a
//! fixed size; every period its oldest tenant leaves (no more requests for it) and a
//! never-seen one joins. Tenants are numbered in order of arrival (generated
//! `bench-<n>`), so the active set at any moment is a range of numbers.

use std::ops::Range;
use std::time::Duration;

/// The active set over time, from the start of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Tenants active at once.
    pub active: usize,
    /// One tenant replaced every this long; zero: no churn, the first set stays.
    pub every: Duration,
}

impl Rotation {
    /// Replacements done by `at`.
    fn steps(self, at: Duration) -> usize {
        if self.every.is_zero() {
            return 0;
        }
        usize::try_from(at.as_nanos() / self.every.as_nanos()).unwrap_or(usize::MAX)
    }

    /// The tenants active at `at`.
    pub fn active_at(self, at: Duration) -> Range<usize> {
        let first = self.steps(at);
        first..first.saturating_add(self.active)
    }

    /// How many tenants a load of `length` sends for.
    pub fn tenants_for(self, length: Duration) -> usize {
        self.active_at(length).end
    }

    /// The tenant of a sender's `count`th request, sent at `at`: the sender steps through
    /// the active set.
    pub fn tenant(self, at: Duration, count: usize) -> usize {
        let active = self.active_at(at);
        active.start + count % self.active.max(1)
    }

    /// When tenant `n` joins (the first set: at the start).
    pub fn joins(self, n: usize) -> Duration {
        match n.checked_sub(self.active) {
            Some(later) if !self.every.is_zero() => self
                .every
                .saturating_mul(u32::try_from(later.saturating_add(1)).unwrap_or(u32::MAX)),
            _ => Duration::ZERO,
        }
    }

    /// When tenant `n` leaves, if it does.
    pub fn leaves(self, n: usize) -> Option<Duration> {
        (!self.every.is_zero()).then(|| {
            self.every
                .saturating_mul(u32::try_from(n.saturating_add(1)).unwrap_or(u32::MAX))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_oldest_tenant_leaves_and_a_new_one_joins_every_period() {
        let rotation = Rotation {
            active: 3,
            every: 2 * SECOND,
        };
        assert_eq!(rotation.active_at(Duration::ZERO), 0..3);
        assert_eq!(rotation.active_at(SECOND), 0..3);
        assert_eq!(rotation.active_at(2 * SECOND), 1..4);
        assert_eq!(rotation.active_at(9 * SECOND), 4..7);
        assert_eq!(rotation.joins(1), Duration::ZERO);
        assert_eq!(rotation.joins(3), 2 * SECOND);
        assert_eq!(rotation.joins(6), 8 * SECOND);
        assert_eq!(rotation.leaves(0), Some(2 * SECOND));
        assert_eq!(rotation.leaves(3), Some(8 * SECOND));
        // Each tenant is active from its join to its leave.
        for n in 0..10 {
            let joins = rotation.joins(n);
            let leaves = rotation.leaves(n).expect("churn");
            assert!(rotation.active_at(joins).contains(&n));
            assert!(!rotation.active_at(leaves).contains(&n));
        }
        // An hour with one replaced every 2 s: well over 1,000 tenants.
        let hour = Rotation {
            active: 20,
            every: 2 * SECOND,
        };
        assert_eq!(hour.tenants_for(3_600 * SECOND), 1_820);
    }

    #[test]
    fn requests_step_through_the_active_set() {
        let rotation = Rotation {
            active: 3,
            every: 2 * SECOND,
        };
        let at = 5 * SECOND;
        let tenants: Vec<usize> = (0..6).map(|count| rotation.tenant(at, count)).collect();
        assert_eq!(tenants, [2, 3, 4, 2, 3, 4]);
    }

    #[test]
    fn without_churn_the_first_set_stays() {
        let rotation = Rotation {
            active: 20,
            every: Duration::ZERO,
        };
        assert_eq!(rotation.active_at(3_600 * SECOND), 0..20);
        assert_eq!(rotation.tenants_for(3_600 * SECOND), 20);
        assert_eq!(rotation.joins(5), Duration::ZERO);
        assert_eq!(rotation.leaves(5), None);
    }
}
