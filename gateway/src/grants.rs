//! The shard's per-subscription token bucket (I/O-free: every call takes `now`).
//!
//! ```text
//! Grant{rate, burst, lease} ──▶ TokenBucket::new(rate, burst, now)
//!   partition senders: available(now) → read ≤ that many records → consume(n, now)
//!                      nothing available → sleep wait_for(1, now)
//!   lease renewal:     renew_due(now) → send a fresh Grant, renewed(now)
//! ```
//!
//! The bucket counts records. `consume` may take the level below zero (a batch read after
//! `available` can be a little larger when several partitions share the bucket); the debt is
//! paid back by refill before anything more is available.

use std::time::{Duration, Instant};

/// A token bucket over records with a lease, as sent in a `Grant`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    level: f64,
    last: Instant,
    lease: Duration,
    leased_at: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` records refilled at `rate` records/s, leased for `lease`
    /// from `now`. `rate` and `burst` are at least 1.
    pub fn new(rate: u64, burst: u64, lease: Duration, now: Instant) -> Self {
        let burst = burst.max(1);
        Self {
            rate: rate.max(1),
            burst,
            level: burst as f64,
            last: now,
            lease,
            leased_at: now,
        }
    }

    /// Sustained rate, records per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Bucket depth, records.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.level = (self.level + dt * self.rate as f64).min(self.burst as f64);
    }

    /// Whole records that may be sent now.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        if self.level < 1.0 {
            0
        } else {
            self.level as u64
        }
    }

    /// Takes `n` records (the level may go negative: a debt).
    pub fn consume(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.level -= n as f64;
    }

    /// How long from `now` until `n` (≤ burst) records are available.
    pub fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        let need = n.min(self.burst) as f64 - self.level;
        if need <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(need / self.rate as f64)
        }
    }

    /// When the current lease should be renewed: half-way through it.
    pub fn renew_at(&self) -> Instant {
        self.leased_at + self.lease / 2
    }

    /// True when the lease should be renewed at `now`.
    pub fn renew_due(&self, now: Instant) -> bool {
        now >= self.renew_at()
    }

    /// The lease was renewed at `now`.
    pub fn renewed(&mut self, now: Instant) {
        self.leased_at = now;
    }

    /// The lease length.
    pub fn lease(&self) -> Duration {
        self.lease
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_full_then_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, Duration::from_secs(10), t0);
        assert_eq!(b.available(t0), 100);
        b.consume(100, t0);
        assert_eq!(b.available(t0), 0);
        let w = b.wait_for(10, t0);
        assert!(
            w > Duration::from_micros(9_990) && w < Duration::from_micros(10_010),
            "{w:?}"
        );
        assert_eq!(b.available(t0 + Duration::from_millis(50)), 50);
        // Never above the burst.
        assert_eq!(b.available(t0 + Duration::from_secs(60)), 100);
    }

    #[test]
    fn debt_is_paid_before_more_is_available() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 10, Duration::from_secs(10), t0);
        b.consume(30, t0);
        assert_eq!(b.available(t0 + Duration::from_millis(100)), 0);
        assert_eq!(b.available(t0 + Duration::from_millis(210)), 1);
        let w = b.wait_for(1000, t0 + Duration::from_millis(210));
        assert!(
            w > Duration::from_millis(89) && w < Duration::from_millis(91),
            "{w:?}"
        );
    }

    #[test]
    fn lease_renews_half_way() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, 1, Duration::from_secs(10), t0);
        assert!(!b.renew_due(t0 + Duration::from_secs(4)));
        assert!(b.renew_due(t0 + Duration::from_secs(5)));
        b.renewed(t0 + Duration::from_secs(5));
        assert_eq!(b.renew_at(), t0 + Duration::from_secs(10));
    }

    #[test]
    fn time_never_runs_backwards() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 10, Duration::from_secs(1), t0 + Duration::from_secs(1));
        b.consume(10, t0 + Duration::from_secs(1));
        // An earlier `now` adds nothing.
        assert_eq!(b.available(t0), 0);
    }
}
