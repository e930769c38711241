//! The bucketed rolling window of what the application actually consumed on one partition.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Consumption in one bucket (or a sum of buckets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Records the application took.
    pub records: u64,
    /// Bytes of those records.
    pub bytes: u64,
}

impl Bucket {
    fn add(&mut self, other: Bucket) {
        self.records = self.records.saturating_add(other.records);
        self.bytes = self.bytes.saturating_add(other.bytes);
    }

    fn sub(&mut self, other: Bucket) {
        self.records = self.records.saturating_sub(other.records);
        self.bytes = self.bytes.saturating_sub(other.bytes);
    }
}

/// A rolling window of consumption, in fixed-length buckets, so memory is bounded by
/// `window / bucket` buckets whatever the record rate.
///
/// Buckets are aligned on the instant the window was created. A bucket *closes* when `now`
/// passes its end; [`advance`](Self::advance) hands every closed bucket (empty ones included,
/// at most `capacity` of them after a long gap) to a callback, oldest first, which is how the
/// forecasters get one observation per bucket.
#[derive(Debug, Clone)]
pub struct ConsumptionWindow {
    bucket: Duration,
    capacity: usize,
    closed: VecDeque<Bucket>,
    closed_sum: Bucket,
    current: Bucket,
    current_start: Instant,
}

impl ConsumptionWindow {
    /// A window covering `window`, in buckets of `bucket` (`window / bucket` rounded up, at
    /// least 1). `bucket` must be non-zero (checked by `ForecastConfig::validate`); a zero
    /// bucket is treated as 1 ms.
    pub fn new(window: Duration, bucket: Duration, now: Instant) -> Self {
        let bucket = bucket.max(Duration::from_millis(1));
        let capacity = window.as_nanos().div_ceil(bucket.as_nanos()).max(1);
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        Self {
            bucket,
            capacity,
            closed: VecDeque::new(),
            closed_sum: Bucket::default(),
            current: Bucket::default(),
            current_start: now,
        }
    }

    /// The bucket length.
    pub fn bucket(&self) -> Duration {
        self.bucket
    }

    /// How many closed buckets the window keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// When the current bucket closes.
    pub fn next_close(&self) -> Instant {
        self.current_start + self.bucket
    }

    /// Closes every bucket that ended at or before `now`, calling `on_close` with each, oldest
    /// first. After a gap longer than the window only the last `capacity` (empty) buckets are
    /// reported: older ones would have left the window anyway. `now` earlier than the current
    /// bucket is ignored (time never moves backwards).
    pub fn advance(&mut self, now: Instant, mut on_close: impl FnMut(Bucket)) {
        let Some(elapsed) = now.checked_duration_since(self.current_start) else {
            return;
        };
        let n = elapsed.as_nanos() / self.bucket.as_nanos();
        if n == 0 {
            return;
        }
        let cap = self.capacity as u128;
        // The current bucket closes first; then (n - 1) empty ones, at most `cap` reported.
        let first = std::mem::take(&mut self.current);
        if n <= cap {
            self.push_closed(first);
            on_close(first);
        }
        let empties = (n - 1).min(cap);
        for _ in 0..empties {
            self.push_closed(Bucket::default());
            on_close(Bucket::default());
        }
        // `n` fits: it is at most elapsed nanoseconds over a bucket of >= 1 ms.
        let advance = self
            .bucket
            .saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
        self.current_start += advance;
        if now.duration_since(self.current_start) >= self.bucket {
            // Only reachable if `n` exceeded u32::MAX buckets; re-align on `now`.
            self.current_start = now;
        }
    }

    fn push_closed(&mut self, b: Bucket) {
        if self.closed.len() == self.capacity
            && let Some(old) = self.closed.pop_front()
        {
            self.closed_sum.sub(old);
        }
        self.closed.push_back(b);
        self.closed_sum.add(b);
    }

    /// Adds consumption to the current bucket (call [`advance`](Self::advance) first).
    pub fn add(&mut self, records: u64, bytes: u64) {
        self.current.add(Bucket { records, bytes });
    }

    /// Sum over the closed buckets in the window.
    pub fn closed_sum(&self) -> Bucket {
        self.closed_sum
    }

    /// Number of closed buckets held (≤ [`capacity`](Self::capacity)).
    pub fn closed_len(&self) -> usize {
        self.closed.len()
    }

    /// The most recently closed bucket.
    pub fn last_closed(&self) -> Option<Bucket> {
        self.closed.back().copied()
    }

    /// The bucket being filled.
    pub fn current(&self) -> Bucket {
        self.current
    }

    /// Mean records/s over the closed buckets, `None` before the first bucket closes.
    pub fn mean_records_per_s(&self) -> Option<f64> {
        if self.closed.is_empty() {
            return None;
        }
        let secs = self.bucket.as_secs_f64() * self.closed.len() as f64;
        Some(self.closed_sum.records as f64 / secs)
    }

    /// Mean bytes per record over the closed buckets and the current one; `None` if no record.
    pub fn mean_record_bytes(&self) -> Option<f64> {
        let records = self.closed_sum.records.saturating_add(self.current.records);
        let bytes = self.closed_sum.bytes.saturating_add(self.current.bytes);
        (records > 0).then(|| bytes as f64 / records as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_buckets_and_bounds_memory() {
        let t0 = Instant::now();
        let mut w = ConsumptionWindow::new(Duration::from_secs(5), Duration::from_secs(1), t0);
        assert_eq!(w.capacity(), 5);
        let mut seen = Vec::new();
        w.add(3, 30);
        w.advance(t0 + Duration::from_millis(999), |b| seen.push(b));
        assert!(seen.is_empty());
        w.advance(t0 + Duration::from_millis(2500), |b| seen.push(b));
        assert_eq!(
            seen,
            vec![
                Bucket {
                    records: 3,
                    bytes: 30
                },
                Bucket::default()
            ]
        );
        assert_eq!(w.next_close(), t0 + Duration::from_secs(3));
        // A long gap reports at most `capacity` buckets and keeps at most that many.
        seen.clear();
        w.add(1, 1);
        w.advance(t0 + Duration::from_secs(1000), |b| seen.push(b));
        assert_eq!(seen.len(), 5);
        assert_eq!(w.closed_len(), 5);
        assert_eq!(w.closed_sum(), Bucket::default());
        assert_eq!(w.next_close(), t0 + Duration::from_secs(1001));
    }

    #[test]
    fn means() {
        let t0 = Instant::now();
        let mut w = ConsumptionWindow::new(Duration::from_secs(60), Duration::from_secs(1), t0);
        assert_eq!(w.mean_records_per_s(), None);
        assert_eq!(w.mean_record_bytes(), None);
        w.add(10, 1000);
        w.advance(t0 + Duration::from_secs(1), |_| {});
        w.add(30, 1000);
        w.advance(t0 + Duration::from_secs(2), |_| {});
        assert_eq!(w.mean_records_per_s(), Some(20.0));
        assert_eq!(w.mean_record_bytes(), Some(50.0));
        // Time going backwards is ignored.
        w.advance(t0, |_| panic!("no bucket closes"));
    }
}
