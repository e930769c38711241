//! Exponential backoff, the one formula behind every reconnect and restart delay.
//!
//! [`Backoff`] holds the bounds; the caller counts its retries and, for full jitter, brings
//! the random sample (no clock, no generator here), so tests pass fixed values:
//!
//! ```
//! use std::time::Duration;
//! use sibyl_proto::backoff::Backoff;
//!
//! let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
//! assert_eq!(b.ceiling(0), Duration::from_millis(100));
//! assert_eq!(b.ceiling(3), Duration::from_millis(800));
//! assert_eq!(b.ceiling(4), Duration::from_secs(1));
//! // Full jitter: uniform in [0, ceiling] given a uniform u64 sample.
//! assert!(b.full_jitter(2, 0xdead_beef) <= Duration::from_millis(400));
//! ```

use std::time::Duration;

/// Exponential backoff bounds: retry `n` (0-based) waits at most `min(max, initial·2^n)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// Backoff starting at `initial` and doubling up to `max` (an `initial` above `max` is
    /// cut to `max`).
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The delay of the first retry.
    pub fn initial(&self) -> Duration {
        self.initial.min(self.max)
    }

    /// The largest delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The exponential delay without jitter: `min(max, initial·2^retry)`, exact for every
    /// `retry` (no overflow).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let initial = self.initial().as_nanos();
        let max = self.max.as_nanos();
        let scaled = if initial == 0 {
            0
        } else if retry >= initial.leading_zeros() {
            // initial·2^retry does not fit in u128 nanoseconds: far above any `max`.
            max
        } else {
            initial << retry
        };
        from_nanos_u128(scaled.min(max))
    }

    /// Full jitter: uniform in `[0, ceiling(retry)]`, given `sample` drawn uniformly from
    /// all of `u64` (the caller's generator; the modulo bias is below 2⁻³⁰ for ceilings up
    /// to 17 s).
    pub fn full_jitter(&self, retry: u32, sample: u64) -> Duration {
        let cap = u64::try_from(self.ceiling(retry).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(match cap.checked_add(1) {
            Some(span) => sample % span,
            None => sample,
        })
    }
}

/// `nanos` as a `Duration`; callers pass at most an existing `Duration`'s nanoseconds.
fn from_nanos_u128(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 10^9 and fits in u32.
    Duration::new(secs, (nanos % NANOS_PER_SEC) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_from_initial_to_max() {
        let b = Backoff::new(20 * MS, 100 * MS);
        let got: Vec<_> = (0..6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(got, vec![20, 40, 80, 100, 100, 100]);
    }

    #[test]
    fn ceiling_saturates_at_max_for_any_retry() {
        let b = Backoff::new(Duration::from_nanos(1), Duration::MAX);
        assert_eq!(b.ceiling(0), Duration::from_nanos(1));
        assert_eq!(b.ceiling(63), Duration::from_nanos(1 << 63));
        assert_eq!(b.ceiling(100), Duration::MAX);
        assert_eq!(b.ceiling(127), Duration::MAX);
        assert_eq!(b.ceiling(u32::MAX), Duration::MAX);
        let b = Backoff::new(100 * MS, Duration::from_secs(10));
        assert_eq!(b.ceiling(40), Duration::from_secs(10));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(10));
        // No doubling is cut short: 1 ns doubles all the way to a large max.
        let b = Backoff::new(Duration::from_nanos(1), Duration::from_secs(10));
        assert_eq!(b.ceiling(34), Duration::from_secs(10));
    }

    #[test]
    fn initial_above_max_and_zero_bounds() {
        let b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(b.initial(), Duration::from_secs(1));
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
        let zero = Backoff::new(Duration::ZERO, Duration::from_secs(1));
        assert_eq!(zero.ceiling(u32::MAX), Duration::ZERO);
        assert_eq!(zero.full_jitter(7, u64::MAX), Duration::ZERO);
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let b = Backoff::new(100 * MS, Duration::from_secs(10));
        let cap = b.ceiling(2);
        let cap_ns = cap.as_nanos() as u64;
        assert_eq!(b.full_jitter(2, 0), Duration::ZERO);
        assert_eq!(b.full_jitter(2, cap_ns), cap);
        assert_eq!(b.full_jitter(2, cap_ns + 1), Duration::ZERO);
        assert_eq!(b.full_jitter(2, 12_345), Duration::from_nanos(12_345));
        for sample in [1, 1 << 20, 1 << 40, u64::MAX / 3, u64::MAX] {
            assert!(b.full_jitter(2, sample) <= cap);
        }
    }

    #[test]
    fn full_jitter_with_a_ceiling_beyond_u64_nanos_passes_the_sample_through() {
        let b = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(b.full_jitter(0, 42), Duration::from_nanos(42));
        assert_eq!(b.full_jitter(0, u64::MAX), Duration::from_nanos(u64::MAX));
    }
}
