//! Small statistics helpers: nearest-rank percentiles and medians.

use std::time::Duration;

/// The `p`-th percentile (0..=100) of `values` by nearest rank; 0 for no values.
#[cfg(test)]
pub fn percentile(values: &[u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    percentile_sorted(&sorted, p)
}

/// [`percentile`] of values already sorted ascending.
pub fn percentile_sorted(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

/// Summary of a set of latencies (microseconds).
#[derive(Debug, Clone, Copy, Default)]
pub struct Latencies {
    /// How many.
    pub count: usize,
    /// Smallest.
    pub min_us: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

impl Latencies {
    /// Summarises microsecond values.
    pub fn of(values: &[u64]) -> Latencies {
        if values.is_empty() {
            return Latencies::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        Latencies {
            count: sorted.len(),
            min_us: sorted[0],
            p50_us: percentile_sorted(&sorted, 50.0),
            p90_us: percentile_sorted(&sorted, 90.0),
            p99_us: percentile_sorted(&sorted, 99.0),
            max_us: sorted[sorted.len() - 1],
            mean_us: sorted.iter().sum::<u64>() as f64 / sorted.len() as f64,
        }
    }
}

/// Microseconds of a duration, saturating.
pub fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Formats microseconds as milliseconds with two decimals, e.g. `1.25 ms`.
pub fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), 50);
        assert_eq!(percentile(&values, 99.0), 99);
        assert_eq!(percentile(&values, 100.0), 100);
        assert_eq!(percentile(&values, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
