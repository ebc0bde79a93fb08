//! Fixed-bucket histograms for the figures the hot paths time or size.
//!
//! The counting side is crate-internal: one relaxed atomic add per bucket hit
//! and one for the sum, no lock. What the stats APIs hand out is a
//! [`Histogram`], the counts read at one moment, cumulative per bucket as
//! Prometheus wants them.

use crate::sync::{AtomicU64, Ordering};

/// Upper bounds (inclusive) of duration buckets, in nanoseconds: 10 µs to
/// 10 s, three per decade.
pub(crate) const DURATION_BOUNDS_NS: &[u64] = &[
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Upper bounds (inclusive) of size buckets: powers of two up to 4096.
pub(crate) const SIZE_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The counting side: an atomic counter per bucket (plus one past the last
/// bound) and the sum of the values, in raw units.
pub(crate) struct AtomicHistogram {
    bounds: &'static [u64],
    /// Raw units per reported unit (1e9 for nanoseconds reported in seconds).
    scale: f64,
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl AtomicHistogram {
    /// Durations, recorded in nanoseconds, reported in seconds.
    pub(crate) fn durations() -> Self {
        Self::new(DURATION_BOUNDS_NS, 1e9)
    }

    /// Sizes (counts of things), reported as they are.
    pub(crate) fn sizes() -> Self {
        Self::new(SIZE_BOUNDS, 1.0)
    }

    fn new(bounds: &'static [u64], scale: f64) -> Self {
        Self {
            bounds,
            scale,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Counts one value (raw units).
    pub(crate) fn record(&self, value: u64) {
        let at = self.bounds.partition_point(|b| *b < value);
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Counts one duration.
    pub(crate) fn record_duration(&self, d: std::time::Duration) {
        self.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The counts now, cumulative.
    pub(crate) fn snapshot(&self) -> Histogram {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (i, b) in self.bounds.iter().enumerate() {
            total += self.buckets[i].load(Ordering::Relaxed);
            buckets.push(Bucket {
                le: *b as f64 / self.scale,
                count: total,
            });
        }
        total += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        Histogram {
            buckets,
            count: total,
            sum: self.sum.load(Ordering::Relaxed) as f64 / self.scale,
        }
    }
}

impl std::fmt::Debug for AtomicHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

/// A histogram read at one moment: cumulative bucket counts (Prometheus
/// `le` buckets), the count of all values and their sum. Durations are in
/// seconds.
///
/// The counts of one read are taken bucket by bucket without a lock, so a
/// value recorded during the read may show in `count` and not yet in `sum`
/// (or the reverse); the next read has it in both.
///
/// # Examples
///
/// ```
/// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
///
/// let mut b = Publisher::<u8>::builder();
/// b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u8>| async { Ok(1) }).unwrap();
/// let h = b.build().batch_sizes("t").unwrap();
/// assert_eq!(h.count, 0);
/// assert!(h.buckets.iter().all(|b| b.count == 0));
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct Histogram {
    /// The buckets, by increasing bound; each counts the values at or below
    /// its bound (cumulative). Values above the last bound count only in
    /// [`count`](Self::count) (the `+Inf` bucket).
    pub buckets: Vec<Bucket>,
    /// Values recorded.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
}

impl Histogram {
    /// An upper estimate of the `q` quantile (`q` from 0 to 1): the bound
    /// of the first bucket holding at least that share of the values.
    /// `None` when nothing was recorded; infinite when the quantile lies
    /// above the last bound.
    ///
    /// # Examples
    ///
    /// ```
    /// use snapstream::publisher::{Publisher, SnapshotRequest, SnapshotSink};
    ///
    /// let mut b = Publisher::<u8>::builder();
    /// b.register("t", |_r: SnapshotRequest, _s: SnapshotSink<u8>| async { Ok(1) }).unwrap();
    /// let h = b.build().batch_sizes("t").unwrap();
    /// assert_eq!(h.quantile(0.5), None);
    /// ```
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        // The rank of the quantile's value, 1-based, at least 1.
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        Some(
            self.buckets
                .iter()
                .find(|b| b.count >= rank)
                .map_or(f64::INFINITY, |b| b.le),
        )
    }
}

/// One cumulative bucket of a [`Histogram`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct Bucket {
    /// The bucket's upper bound, inclusive (Prometheus `le`).
    pub le: f64,
    /// Values at or below `le`.
    pub count: u64,
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn cumulative_counts_and_sum() {
        let h = AtomicHistogram::sizes();
        for v in [1, 2, 3, 5000] {
            h.record(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.sum, 5006.0);
        assert_eq!(s.buckets[0].count, 1); // le 1
        assert_eq!(s.quantile(0.0), Some(1.0));
        assert_eq!(s.quantile(0.5), Some(2.0));
        assert_eq!(s.quantile(0.75), Some(4.0));
        assert_eq!(s.quantile(0.99), Some(f64::INFINITY));
        assert_eq!(Histogram::default().quantile(0.5), None);
        assert_eq!(s.buckets[1].count, 2); // le 2
        assert_eq!(s.buckets[2].count, 3); // le 4
        assert_eq!(s.buckets.last().unwrap().count, 3); // 5000 is in +Inf only
    }

    #[test]
    fn durations_in_seconds() {
        let h = AtomicHistogram::durations();
        h.record_duration(std::time::Duration::from_millis(3));
        let s = h.snapshot();
        assert_eq!(s.count, 1);
        assert!((s.sum - 0.003).abs() < 1e-12);
        let first = s.buckets.iter().find(|b| b.count == 1).unwrap();
        assert_eq!(first.le, 0.005);
    }
}
