//! Impairment configuration: what each direction of a proxy does to the packets crossing it.

use std::time::Duration;

use serde::Deserialize;

/// A configuration value out of its allowed range (caller misuse, never peer input).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A probability that is not a finite number in `[0, 1]`.
    #[error("{field} must be a probability in [0, 1], got {value}")]
    Probability {
        /// The offending field, e.g. `loss` or `burst.p_good_to_bad`.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// A bandwidth cap of zero bits per second.
    #[error("rate_bps must be > 0 when set")]
    ZeroRate,
    /// A bandwidth queue that can hold no packet.
    #[error("queue_packets must be > 0")]
    ZeroQueue,
    /// A blackhole window that ends before it starts.
    #[error("blackhole window {from:?}..{to:?} ends before it starts")]
    EmptyWindow {
        /// Start of the window.
        from: Duration,
        /// End of the window.
        to: Duration,
    },
}

/// Bursty loss after the Gilbert–Elliott two-state model.
///
/// Before each packet the chain moves (good → bad with `p_good_to_bad`, bad → good with
/// `p_bad_to_good`); the packet is then lost with the loss probability of the state it is in.
/// With `loss_in_bad = 1` and `loss_in_good = 0`, loss bursts are geometric with mean length
/// `1 / p_bad_to_good` packets.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GilbertElliott {
    /// Probability of moving from the good to the bad state, per packet. Default `0`.
    pub p_good_to_bad: f64,
    /// Probability of moving from the bad to the good state, per packet. Default `1`.
    pub p_bad_to_good: f64,
    /// Loss probability in the good state. Default `0`.
    pub loss_in_good: f64,
    /// Loss probability in the bad state. Default `1`.
    pub loss_in_bad: f64,
}

impl Default for GilbertElliott {
    fn default() -> Self {
        Self {
            p_good_to_bad: 0.0,
            p_bad_to_good: 1.0,
            loss_in_good: 0.0,
            loss_in_bad: 1.0,
        }
    }
}

/// A window, relative to the proxy's start, during which every packet is dropped.
///
/// Half-open: a packet arriving at `from` is dropped, one arriving at `to` is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlackholeWindow {
    /// Start of the window, since the proxy started (TOML: `"2s"`).
    #[serde(with = "duration_str")]
    pub from: Duration,
    /// End of the window, since the proxy started (TOML: `"5s"`).
    #[serde(with = "duration_str")]
    pub to: Duration,
}

impl BlackholeWindow {
    /// Whether `elapsed` (time since the proxy started) falls inside the window.
    pub fn contains(&self, elapsed: Duration) -> bool {
        self.from <= elapsed && elapsed < self.to
    }
}

/// What one direction (client → server "up", or server → client "down") does to packets.
///
/// The default impairs nothing. Stages, in order: blackhole → random loss → bursty loss →
/// bandwidth queue (tail drop) → delay ± jitter (+ reorder delay) → duplication → corruption.
/// Durations in TOML are strings such as `"20ms"` or `"1s"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectionConfig {
    /// Fixed one-way delay added to every packet. Default `0`.
    #[serde(with = "duration_str")]
    pub delay: Duration,
    /// Each packet's delay is drawn uniformly from `delay ± jitter` (clamped at zero), so jitter
    /// larger than the packet spacing reorders packets, as with the kernel's netem. Default `0`.
    #[serde(with = "duration_str")]
    pub jitter: Duration,
    /// Independent random loss probability per packet. Default `0`.
    pub loss: f64,
    /// Bursty loss, applied after (and in addition to) `loss`. Default: none.
    pub burst: Option<GilbertElliott>,
    /// Probability that a packet is held back by an extra `reorder_delay`. Default `0`.
    pub reorder: f64,
    /// Extra delay of a reordered packet. Default 10 ms.
    #[serde(with = "duration_str")]
    pub reorder_delay: Duration,
    /// Probability that a packet is sent twice (the copy leaves right after it). Default `0`.
    pub duplicate: f64,
    /// Probability that a copy has one random bit flipped (empty packets are left alone).
    /// Default `0`.
    pub corrupt: f64,
    /// Bandwidth cap in bits per second: packets are serialized one after the other at this
    /// rate before the delay stage. Default: none (unlimited).
    pub rate_bps: Option<u64>,
    /// How many packets the bandwidth queue holds (the one being serialized included); a packet
    /// arriving at a full queue is tail-dropped. Only used with `rate_bps`. Default 1000.
    pub queue_packets: usize,
    /// Windows, relative to the proxy's start, during which every packet is dropped.
    /// Default: none.
    pub blackholes: Vec<BlackholeWindow>,
}

impl Default for DirectionConfig {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: None,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(10),
            duplicate: 0.0,
            corrupt: 0.0,
            rate_bps: None,
            queue_packets: 1000,
            blackholes: Vec::new(),
        }
    }
}

fn check_probability(field: &'static str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::Probability { field, value })
    }
}

impl DirectionConfig {
    /// Checks every bounded value: probabilities in `[0, 1]`, a non-zero rate and queue, and
    /// blackhole windows that do not end before they start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_probability("loss", self.loss)?;
        check_probability("reorder", self.reorder)?;
        check_probability("duplicate", self.duplicate)?;
        check_probability("corrupt", self.corrupt)?;
        if let Some(ge) = &self.burst {
            check_probability("burst.p_good_to_bad", ge.p_good_to_bad)?;
            check_probability("burst.p_bad_to_good", ge.p_bad_to_good)?;
            check_probability("burst.loss_in_good", ge.loss_in_good)?;
            check_probability("burst.loss_in_bad", ge.loss_in_bad)?;
        }
        if self.rate_bps == Some(0) {
            return Err(ConfigError::ZeroRate);
        }
        if self.queue_packets == 0 {
            return Err(ConfigError::ZeroQueue);
        }
        for w in &self.blackholes {
            if w.to < w.from {
                return Err(ConfigError::EmptyWindow {
                    from: w.from,
                    to: w.to,
                });
            }
        }
        Ok(())
    }
}

/// The impairment of a whole proxy: one config per direction and one seed.
///
/// The default impairs nothing, with seed 0.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Impairment {
    /// Seed of the proxy; each direction derives its own RNG from it
    /// (see [`Direction::seed`]), so a run with the same packets in the same order repeats.
    pub seed: u64,
    /// Client → server.
    pub up: DirectionConfig,
    /// Server → client.
    pub down: DirectionConfig,
}

impl Impairment {
    /// The same config in both directions.
    pub fn symmetric(cfg: DirectionConfig, seed: u64) -> Self {
        Self {
            seed,
            up: cfg.clone(),
            down: cfg,
        }
    }

    /// Validates both directions.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.up.validate()?;
        self.down.validate()
    }
}

/// A direction of a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → server.
    Up,
    /// Server → client.
    Down,
}

impl Direction {
    /// The RNG seed of this direction for a proxy seeded with `proxy_seed`.
    pub fn seed(self, proxy_seed: u64) -> u64 {
        match self {
            Direction::Up => proxy_seed,
            // Any fixed odd constant keeps the two streams apart; this is the golden ratio's.
            Direction::Down => proxy_seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }
}

/// Parses a human duration such as `20ms`, `1s` or `1m 30s` (via `humantime`).
pub fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s.trim())
}

/// Serde adapter for durations written as human strings (`"20ms"`).
mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_of_every_field() {
        let text = r#"
            seed = 7
            [up]
            delay = "20ms"
            jitter = "5ms"
            loss = 0.03
            burst = { p_good_to_bad = 0.01, p_bad_to_good = 0.5 }
            reorder = 0.1
            reorder_delay = "3ms"
            duplicate = 0.01
            corrupt = 0.001
            rate_bps = 1000000
            queue_packets = 50
            blackholes = [{ from = "2s", to = "5s" }]
            [down]
            delay = "1s"
        "#;
        let imp: Impairment = toml::from_str(text).expect("valid config");
        imp.validate().expect("in range");
        assert_eq!(imp.seed, 7);
        assert_eq!(imp.up.delay, Duration::from_millis(20));
        assert_eq!(imp.up.jitter, Duration::from_millis(5));
        let ge = imp.up.burst.expect("burst set");
        assert_eq!(ge.p_bad_to_good, 0.5);
        assert_eq!(ge.loss_in_bad, 1.0, "unset GE fields take their defaults");
        assert_eq!(imp.up.rate_bps, Some(1_000_000));
        assert_eq!(imp.up.queue_packets, 50);
        assert_eq!(
            imp.up.blackholes,
            vec![BlackholeWindow {
                from: Duration::from_secs(2),
                to: Duration::from_secs(5)
            }]
        );
        assert_eq!(imp.down.delay, Duration::from_secs(1));
        assert_eq!(imp.down.loss, 0.0);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        assert!(toml::from_str::<Impairment>("[up]\ndelai = \"1ms\"").is_err());
        assert!(toml::from_str::<Impairment>("[up]\ndelay = \"soon\"").is_err());
        let bad = DirectionConfig {
            loss: 1.5,
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Probability { field: "loss", .. })
        ));
        let nan = DirectionConfig {
            corrupt: f64::NAN,
            ..Default::default()
        };
        assert!(nan.validate().is_err());
        let zero = DirectionConfig {
            rate_bps: Some(0),
            ..Default::default()
        };
        assert_eq!(zero.validate(), Err(ConfigError::ZeroRate));
        let w = BlackholeWindow {
            from: Duration::from_secs(2),
            to: Duration::from_secs(1),
        };
        let empty = DirectionConfig {
            blackholes: vec![w],
            ..Default::default()
        };
        assert!(matches!(
            empty.validate(),
            Err(ConfigError::EmptyWindow { .. })
        ));
        assert_eq!(DirectionConfig::default().validate(), Ok(()));
    }
}
