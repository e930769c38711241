//! Client-side pre-fetch accounting: hit ratio, wasted pre-fetch, app wait per record.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Longest wait recorded exactly (longer waits are recorded as this), microseconds: 1 hour.
const MAX_WAIT_US: u64 = 3_600_000_000;

/// Pre-fetch accounting for one subscription (or a whole client), I/O-free.
///
/// The SDK reports, per record handed to the application, whether it was already buffered
/// when the application asked ([`hit`](Self::hit)) or how long the application waited for it
/// ([`miss`](Self::miss)); records received from the shard ([`received`](Self::received)); and
/// buffered records dropped unread, e.g. after a reassignment revoked their partition
/// ([`discarded`](Self::discarded)).
#[derive(Debug, Clone)]
pub struct PrefetchMetrics {
    received: u64,
    hits: u64,
    misses: u64,
    discarded: u64,
    wait_us: Histogram<u64>,
}

/// A snapshot of [`PrefetchMetrics`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct PrefetchStats {
    /// Records received from the shard.
    pub received: u64,
    /// Records the application took that were already buffered when it asked.
    pub hits: u64,
    /// Records the application had to wait for.
    pub misses: u64,
    /// Records received and then discarded unread (wasted pre-fetch).
    pub discarded: u64,
    /// `hits / (hits + misses)`; `None` before any record was taken.
    pub hit_ratio: Option<f64>,
    /// `discarded / received`; `None` before any record was received.
    pub wasted_ratio: Option<f64>,
    /// Median application wait per record (hits count as zero).
    pub wait_p50: Duration,
    /// 99th percentile application wait per record.
    pub wait_p99: Duration,
    /// Longest recorded wait (capped at one hour).
    pub wait_max: Duration,
}

impl Default for PrefetchMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PrefetchMetrics {
    /// Empty accounting.
    pub fn new() -> Self {
        Self {
            received: 0,
            hits: 0,
            misses: 0,
            discarded: 0,
            // 1 µs .. 1 h at 3 significant digits: valid bounds, so this cannot fail.
            wait_us: Histogram::new_with_bounds(1, MAX_WAIT_US, 3)
                .expect("constant histogram bounds are valid"),
        }
    }

    /// `n` records arrived from the shard into the client buffer.
    pub fn received(&mut self, n: u64) {
        self.received = self.received.saturating_add(n);
    }

    /// The application took `n` records that were already buffered (zero wait each).
    pub fn hit(&mut self, n: u64) {
        self.hits = self.hits.saturating_add(n);
        if n > 0 {
            self.wait_us.saturating_record_n(0, n);
        }
    }

    /// The application took one record it had to wait `wait` for.
    pub fn miss(&mut self, wait: Duration) {
        self.misses = self.misses.saturating_add(1);
        let us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.wait_us.saturating_record(us.min(MAX_WAIT_US));
    }

    /// `n` buffered records were dropped unread (wasted pre-fetch).
    pub fn discarded(&mut self, n: u64) {
        self.discarded = self.discarded.saturating_add(n);
    }

    /// The current figures.
    pub fn stats(&self) -> PrefetchStats {
        let taken = self.hits.saturating_add(self.misses);
        let q = |q: f64| Duration::from_micros(self.wait_us.value_at_quantile(q));
        PrefetchStats {
            received: self.received,
            hits: self.hits,
            misses: self.misses,
            discarded: self.discarded,
            hit_ratio: (taken > 0).then(|| self.hits as f64 / taken as f64),
            wasted_ratio: (self.received > 0).then(|| self.discarded as f64 / self.received as f64),
            wait_p50: q(0.5),
            wait_p99: q(0.99),
            wait_max: Duration::from_micros(self.wait_us.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_quantiles() {
        let mut m = PrefetchMetrics::new();
        let s = m.stats();
        assert_eq!((s.hit_ratio, s.wasted_ratio), (None, None));
        m.received(100);
        m.hit(98);
        m.miss(Duration::from_millis(10));
        m.miss(Duration::from_millis(20));
        m.discarded(5);
        let s = m.stats();
        assert_eq!(s.hit_ratio, Some(0.98));
        assert_eq!(s.wasted_ratio, Some(0.05));
        assert_eq!(s.wait_p50, Duration::ZERO);
        // 2 of 100 waits are non-zero: p99 is the 99th value, i.e. the 10 ms one (±0.1 %).
        let p99 = s.wait_p99.as_micros();
        assert!((9_990..=10_010).contains(&p99), "{p99}");
        let max = s.wait_max.as_micros();
        assert!((19_980..=20_020).contains(&max), "{max}");
        m.miss(Duration::from_secs(7200));
        assert!(m.stats().wait_max <= Duration::from_secs(3601));
    }
}
