//! The I/O-free impairment machine of one direction.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{DirectionConfig, GilbertElliott};

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// Inside a blackhole window, or the blackhole is switched on.
    Blackhole,
    /// Independent random loss.
    Loss,
    /// Gilbert–Elliott bursty loss.
    Burst,
    /// The bandwidth queue was full (tail drop).
    QueueFull,
}

/// One copy of a packet to send at `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emission {
    /// When to send it.
    pub at: Instant,
    /// The bytes to send (corrupted if `corrupted`).
    pub packet: Vec<u8>,
    /// Whether one bit of this copy was flipped.
    pub corrupted: bool,
}

/// What happens to a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Dropped, for this reason.
    Drop(DropReason),
    /// Sent as these copies (one, or two when duplicated), in order.
    Emit(Vec<Emission>),
}

/// Counters of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DirectionStats {
    /// Packets handed to the impairer.
    pub received: u64,
    /// Copies scheduled for sending (duplicates included).
    pub emitted: u64,
    /// Copies actually sent by the proxy driver (0 from a bare [`Impairer`]).
    pub sent: u64,
    /// Sends that failed at the socket (proxy driver only).
    pub send_errors: u64,
    /// Dropped by a blackhole.
    pub dropped_blackhole: u64,
    /// Dropped by random loss.
    pub dropped_loss: u64,
    /// Dropped by bursty loss.
    pub dropped_burst: u64,
    /// Tail-dropped at a full bandwidth queue.
    pub dropped_queue: u64,
    /// Extra copies made by duplication.
    pub duplicated: u64,
    /// Copies with a flipped bit.
    pub corrupted: u64,
    /// Packets given the extra reorder delay.
    pub reordered: u64,
}

impl DirectionStats {
    /// All drops, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_blackhole + self.dropped_loss + self.dropped_burst + self.dropped_queue
    }
}

/// The impairment machine of one direction: it decides, for each packet and the instant it
/// arrived, whether it is dropped or when its copies leave.
///
/// It performs no I/O and reads no clock. Call [`handle`](Self::handle) with non-decreasing
/// `now`s; the bandwidth queue and the Gilbert–Elliott state live here, and all randomness comes
/// from one RNG seeded at construction, so the same packets at the same instants give the same
/// verdicts. Emission instants are not ordered across packets (jitter and reordering): hand them
/// to a [`TimerQueue`](super::TimerQueue).
#[derive(Debug)]
pub struct Impairer {
    cfg: DirectionConfig,
    rng: StdRng,
    start: Instant,
    blackhole_on: bool,
    ge_bad: bool,
    /// Serialization finish instants of the packets in the bandwidth queue, oldest first.
    link: VecDeque<Instant>,
    stats: DirectionStats,
}

impl Impairer {
    /// A machine for `cfg` (assumed [validated](DirectionConfig::validate)), with its RNG seeded
    /// from `seed`; blackhole windows count from `start`.
    pub fn new(cfg: DirectionConfig, seed: u64, start: Instant) -> Self {
        Self {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            start,
            blackhole_on: false,
            ge_bad: false,
            link: VecDeque::new(),
            stats: DirectionStats::default(),
        }
    }

    /// Replaces the config, keeping the RNG, the burst state and the packets already queued.
    pub fn set_config(&mut self, cfg: DirectionConfig) {
        self.cfg = cfg;
    }

    /// The config in force.
    pub fn config(&self) -> &DirectionConfig {
        &self.cfg
    }

    /// Switches the runtime blackhole on or off (independent of the configured windows).
    pub fn set_blackhole(&mut self, on: bool) {
        self.blackhole_on = on;
    }

    /// The counters so far.
    pub fn stats(&self) -> DirectionStats {
        self.stats
    }

    /// Decides the fate of `packet`, arrived at `now`.
    pub fn handle(&mut self, now: Instant, mut packet: Vec<u8>) -> Verdict {
        self.stats.received += 1;
        let elapsed = now.saturating_duration_since(self.start);
        if self.blackhole_on || self.cfg.blackholes.iter().any(|w| w.contains(elapsed)) {
            self.stats.dropped_blackhole += 1;
            return Verdict::Drop(DropReason::Blackhole);
        }
        if self.cfg.loss > 0.0 && self.rng.random_bool(self.cfg.loss) {
            self.stats.dropped_loss += 1;
            return Verdict::Drop(DropReason::Loss);
        }
        if let Some(ge) = self.cfg.burst
            && self.burst_loss(&ge)
        {
            self.stats.dropped_burst += 1;
            return Verdict::Drop(DropReason::Burst);
        }
        let mut at = now;
        if let Some(rate) = self.cfg.rate_bps {
            while self.link.front().is_some_and(|&done| done <= now) {
                self.link.pop_front();
            }
            if self.link.len() >= self.cfg.queue_packets {
                self.stats.dropped_queue += 1;
                return Verdict::Drop(DropReason::QueueFull);
            }
            let begin = self
                .link
                .back()
                .map_or(now, |&busy_until| busy_until.max(now));
            at = begin + serialization_time(packet.len(), rate);
            self.link.push_back(at);
        }
        at += self.sample_delay();
        if self.cfg.reorder > 0.0 && self.rng.random_bool(self.cfg.reorder) {
            self.stats.reordered += 1;
            at += self.cfg.reorder_delay;
        }
        let duplicate = self.cfg.duplicate > 0.0 && self.rng.random_bool(self.cfg.duplicate);
        let mut copies = Vec::with_capacity(if duplicate { 2 } else { 1 });
        if duplicate {
            self.stats.duplicated += 1;
            let mut copy = packet.clone();
            let corrupted = self.maybe_corrupt(&mut copy);
            copies.push(Emission {
                at,
                packet: copy,
                corrupted,
            });
        }
        let corrupted = self.maybe_corrupt(&mut packet);
        copies.insert(
            0,
            Emission {
                at,
                packet,
                corrupted,
            },
        );
        self.stats.emitted += copies.len() as u64;
        Verdict::Emit(copies)
    }

    /// One Gilbert–Elliott step: move the chain, then lose with the state's probability.
    fn burst_loss(&mut self, ge: &GilbertElliott) -> bool {
        let flip = if self.ge_bad {
            ge.p_bad_to_good
        } else {
            ge.p_good_to_bad
        };
        if flip > 0.0 && self.rng.random_bool(flip) {
            self.ge_bad = !self.ge_bad;
        }
        let p = if self.ge_bad {
            ge.loss_in_bad
        } else {
            ge.loss_in_good
        };
        p > 0.0 && self.rng.random_bool(p)
    }

    fn sample_delay(&mut self) -> Duration {
        let delay = duration_nanos(self.cfg.delay);
        let jitter = duration_nanos(self.cfg.jitter);
        if jitter == 0 {
            return self.cfg.delay;
        }
        let lo = delay.saturating_sub(jitter);
        let hi = delay.saturating_add(jitter);
        Duration::from_nanos(self.rng.random_range(lo..=hi))
    }

    fn maybe_corrupt(&mut self, packet: &mut [u8]) -> bool {
        if self.cfg.corrupt <= 0.0 || packet.is_empty() || !self.rng.random_bool(self.cfg.corrupt) {
            return false;
        }
        let bit = self.rng.random_range(0..packet.len() * 8);
        packet[bit / 8] ^= 1 << (bit % 8);
        self.stats.corrupted += 1;
        true
    }
}

/// Nanoseconds of a duration, saturated to `u64` (584 years).
fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Time to put `len` bytes on a link of `rate_bps` bits per second, rounded up to the nanosecond.
pub fn serialization_time(len: usize, rate_bps: u64) -> Duration {
    let bits = len as u128 * 8 * 1_000_000_000;
    let rate = u128::from(rate_bps.max(1));
    let nanos = bits.div_ceil(rate);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netem::BlackholeWindow;

    const MS: Duration = Duration::from_millis(1);

    fn run(cfg: DirectionConfig, seed: u64, n: usize) -> (Instant, Vec<Verdict>) {
        let t0 = Instant::now();
        let mut imp = Impairer::new(cfg, seed, t0);
        let verdicts = (0..n)
            .map(|i| imp.handle(t0 + MS * i as u32, (i as u32).to_be_bytes().to_vec()))
            .collect();
        (t0, verdicts)
    }

    fn drops(v: &[Verdict]) -> usize {
        v.iter().filter(|v| matches!(v, Verdict::Drop(_))).count()
    }

    #[test]
    fn no_impairment_by_default() {
        let (t0, v) = run(DirectionConfig::default(), 1, 100);
        for (i, v) in v.iter().enumerate() {
            let want = Emission {
                at: t0 + MS * i as u32,
                packet: (i as u32).to_be_bytes().to_vec(),
                corrupted: false,
            };
            assert_eq!(v, &Verdict::Emit(vec![want]));
        }
    }

    #[test]
    fn random_loss_rate_matches_config_and_repeats_with_seed() {
        let cfg = DirectionConfig {
            loss: 0.03,
            ..Default::default()
        };
        let (_, v) = run(cfg.clone(), 7, 100_000);
        let rate = drops(&v) as f64 / 100_000.0;
        assert!((rate - 0.03).abs() < 0.003, "loss rate {rate}");
        assert!(
            v.iter()
                .all(|v| matches!(v, Verdict::Emit(_) | Verdict::Drop(DropReason::Loss)))
        );
        let (_, again) = run(cfg.clone(), 7, 100_000);
        let pattern = |v: &[Verdict]| v.iter().map(|v| matches!(v, Verdict::Drop(_))).collect();
        let (p1, p2): (Vec<bool>, Vec<bool>) = (pattern(&v), pattern(&again));
        assert_eq!(p1, p2, "same seed, same drops");
        let (_, other) = run(cfg, 8, 100_000);
        assert_ne!(p1, pattern(&other), "another seed, other drops");
    }

    #[test]
    fn gilbert_elliott_bursts_have_mean_length_one_over_p_bad_to_good() {
        let ge = GilbertElliott {
            p_good_to_bad: 0.01,
            p_bad_to_good: 0.25,
            ..Default::default()
        };
        let cfg = DirectionConfig {
            burst: Some(ge),
            ..Default::default()
        };
        let (_, v) = run(cfg, 42, 200_000);
        let mut bursts = Vec::new();
        let mut current = 0usize;
        for v in &v {
            if matches!(v, Verdict::Drop(DropReason::Burst)) {
                current += 1;
            } else if current > 0 {
                bursts.push(current);
                current = 0;
            }
        }
        let mean = bursts.iter().sum::<usize>() as f64 / bursts.len() as f64;
        assert!(bursts.len() > 300, "{} bursts", bursts.len());
        assert!((mean - 4.0).abs() < 0.4, "mean burst {mean}");
        // Stationary share of the bad state: p_gb / (p_gb + p_bg).
        let rate = drops(&v) as f64 / 200_000.0;
        assert!((rate - 0.01 / 0.26).abs() < 0.008, "burst loss rate {rate}");
    }

    #[test]
    fn delay_and_jitter_stay_within_bounds_and_spread() {
        let cfg = DirectionConfig {
            delay: 20 * MS,
            jitter: 5 * MS,
            ..Default::default()
        };
        let (t0, v) = run(cfg, 3, 10_000);
        let mut lo = Duration::MAX;
        let mut hi = Duration::ZERO;
        for (i, v) in v.iter().enumerate() {
            let Verdict::Emit(copies) = v else {
                panic!("no loss configured")
            };
            let d = copies[0].at - (t0 + MS * i as u32);
            lo = lo.min(d);
            hi = hi.max(d);
        }
        assert!(lo >= 15 * MS && hi <= 25 * MS, "delay range {lo:?}..{hi:?}");
        assert!(
            lo < 16 * MS && hi > 24 * MS,
            "jitter should use its range: {lo:?}..{hi:?}"
        );
    }

    #[test]
    fn reorder_emits_out_of_order() {
        let cfg = DirectionConfig {
            reorder: 0.2,
            reorder_delay: 10 * MS,
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut imp = Impairer::new(cfg, 5, t0);
        let mut sent = Vec::new();
        for i in 0..1000u32 {
            let Verdict::Emit(c) = imp.handle(t0 + MS * i, i.to_be_bytes().to_vec()) else {
                panic!("no loss configured")
            };
            sent.push((c[0].at, i));
        }
        sent.sort();
        let inversions = sent.windows(2).filter(|w| w[0].1 > w[1].1).count();
        assert!(inversions > 50, "{inversions} inversions");
        let reordered = imp.stats().reordered as f64 / 1000.0;
        assert!(
            (reordered - 0.2).abs() < 0.05,
            "reordered share {reordered}"
        );
    }

    #[test]
    fn duplication_adds_identical_copies() {
        let cfg = DirectionConfig {
            duplicate: 0.1,
            ..Default::default()
        };
        let (_, v) = run(cfg, 11, 100_000);
        let mut copies = 0;
        for v in &v {
            let Verdict::Emit(c) = v else {
                panic!("no loss configured")
            };
            assert!(c.len() == 1 || (c.len() == 2 && c[0] == c[1]));
            copies += c.len();
        }
        let extra = (copies - 100_000) as f64 / 100_000.0;
        assert!((extra - 0.1).abs() < 0.01, "duplicate share {extra}");
    }

    #[test]
    fn corruption_flips_exactly_one_bit() {
        let cfg = DirectionConfig {
            corrupt: 1.0,
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut imp = Impairer::new(cfg, 13, t0);
        let original: Vec<u8> = (0..200u8).collect();
        for _ in 0..1000 {
            let Verdict::Emit(c) = imp.handle(t0, original.clone()) else {
                panic!("no loss")
            };
            assert!(c[0].corrupted);
            let flipped: u32 = c[0]
                .packet
                .iter()
                .zip(&original)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            assert_eq!(flipped, 1);
        }
        let Verdict::Emit(c) = imp.handle(t0, Vec::new()) else {
            panic!("no loss")
        };
        assert!(
            !c[0].corrupted && c[0].packet.is_empty(),
            "nothing to flip in an empty packet"
        );
        assert_eq!(imp.stats().corrupted, 1000);
    }

    #[test]
    fn bandwidth_spaces_packets_by_size_over_rate_and_tail_drops() {
        // 8000 bit/s = 1000 B/s: a 100-byte packet takes 100 ms on the wire.
        let cfg = DirectionConfig {
            rate_bps: Some(8000),
            queue_packets: 5,
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut imp = Impairer::new(cfg, 0, t0);
        let mut times = Vec::new();
        for _ in 0..8 {
            match imp.handle(t0, vec![0; 100]) {
                Verdict::Emit(c) => times.push(c[0].at),
                Verdict::Drop(r) => assert_eq!(r, DropReason::QueueFull),
            }
        }
        let want: Vec<Instant> = (1..=5).map(|k| t0 + 100 * MS * k).collect();
        assert_eq!(times, want);
        assert_eq!(imp.stats().dropped_queue, 3);
        // Once two packets have left the wire, two places are free again.
        let t = t0 + 200 * MS;
        assert!(
            matches!(imp.handle(t, vec![0; 100]), Verdict::Emit(c) if c[0].at == t0 + 600 * MS)
        );
        assert!(matches!(imp.handle(t, vec![0; 50]), Verdict::Emit(c) if c[0].at == t0 + 650 * MS));
        assert_eq!(
            imp.handle(t, vec![0; 1]),
            Verdict::Drop(DropReason::QueueFull)
        );
        // An idle link sends at once.
        let later = t0 + Duration::from_secs(10);
        assert!(
            matches!(imp.handle(later, vec![0; 10]), Verdict::Emit(c) if c[0].at == later + 10 * MS)
        );
    }

    #[test]
    fn blackhole_windows_drop_inside_only_and_toggle_at_runtime() {
        let window = BlackholeWindow {
            from: Duration::from_secs(1),
            to: Duration::from_secs(2),
        };
        let cfg = DirectionConfig {
            blackholes: vec![window],
            ..Default::default()
        };
        let (_, v) = run(cfg.clone(), 0, 3000);
        for (i, v) in v.iter().enumerate() {
            let inside = (1000..2000).contains(&i);
            assert_eq!(
                matches!(v, Verdict::Drop(DropReason::Blackhole)),
                inside,
                "packet {i}"
            );
            assert_eq!(matches!(v, Verdict::Emit(_)), !inside, "packet {i}");
        }
        let t0 = Instant::now();
        let mut imp = Impairer::new(cfg, 0, t0);
        imp.set_blackhole(true);
        assert_eq!(
            imp.handle(t0, vec![1]),
            Verdict::Drop(DropReason::Blackhole)
        );
        imp.set_blackhole(false);
        assert!(matches!(imp.handle(t0, vec![1]), Verdict::Emit(_)));
        assert_eq!(imp.stats().dropped(), 1);
        assert_eq!(imp.stats().received, 2);
    }

    #[test]
    fn serialization_time_rounds_up() {
        assert_eq!(
            serialization_time(1250, 10_000_000),
            Duration::from_millis(1)
        );
        assert_eq!(
            serialization_time(1, 3),
            Duration::from_nanos(2_666_666_667)
        );
        assert_eq!(serialization_time(0, 1000), Duration::ZERO);
    }
}
