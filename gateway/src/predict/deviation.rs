//! Shard-side deviation tracking: actual consumption (from `Position`) vs the forecast.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::prefetch::SubKey;

/// Configuration of [`DeviationTracker`]. Every field has a documented default.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeviationConfig {
    /// Measurement window. Default 5 s.
    pub window: Duration,
    /// A window deviates when `|actual − predicted| > threshold × max(predicted, floor)`.
    /// Default 0.5 (50 %).
    pub threshold: f64,
    /// Floor of the reference rate, records/s. Default 1.0.
    pub floor_records_per_s: f64,
    /// Consecutive deviating windows before a partition is flagged. Default 2.
    pub consecutive: u32,
}

impl Default for DeviationConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(5),
            threshold: 0.5,
            floor_records_per_s: 1.0,
            consecutive: 2,
        }
    }
}

/// A flagged partition: its forecast is off, a new `Forecast` is needed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deviation {
    /// The subscription.
    pub sub: SubKey,
    /// The partition.
    pub partition: u32,
    /// The predicted records/s.
    pub predicted: f64,
    /// The measured records/s over the last window.
    pub actual: f64,
}

#[derive(Debug, Clone)]
struct Track {
    predicted: f64,
    last_offset: Option<u64>,
    consumed: u64,
    window_start: Instant,
    actual: Option<f64>,
    streak: u32,
    flagged: bool,
}

/// Per partition: predicted vs actual records/s on the shard side; flags partitions whose
/// forecast is persistently off (`consecutive` windows beyond `threshold`), once per forecast.
///
/// Feed [`predict`](Self::predict) with each `Forecast`'s rates, [`position`](Self::position)
/// with each `Position`, call [`handle_timeout`](Self::handle_timeout) at
/// [`poll_timeout`](Self::poll_timeout) (so a stalled consumer is measured too), and drain
/// [`poll_flagged`](Self::poll_flagged).
#[derive(Debug, Clone)]
pub struct DeviationTracker {
    config: DeviationConfig,
    tracks: BTreeMap<(SubKey, u32), Track>,
    flagged: VecDeque<Deviation>,
}

impl DeviationTracker {
    /// An empty tracker.
    pub fn new(config: DeviationConfig) -> Self {
        Self {
            config,
            tracks: BTreeMap::new(),
            flagged: VecDeque::new(),
        }
    }

    /// A new prediction for a partition: clears its streak and flag.
    pub fn predict(&mut self, sub: SubKey, partition: u32, records_per_s: f64, now: Instant) {
        let t = self.tracks.entry((sub, partition)).or_insert(Track {
            predicted: 0.0,
            last_offset: None,
            consumed: 0,
            window_start: now,
            actual: None,
            streak: 0,
            flagged: false,
        });
        t.predicted = records_per_s.max(0.0);
        t.streak = 0;
        t.flagged = false;
    }

    /// The client's next offset on a partition (`Position`); offsets going backwards (a
    /// reset) are not counted.
    pub fn position(&mut self, sub: SubKey, partition: u32, next_offset: u64, now: Instant) {
        self.close_windows(now);
        if let Some(t) = self.tracks.get_mut(&(sub, partition)) {
            if let Some(last) = t.last_offset {
                t.consumed = t.consumed.saturating_add(next_offset.saturating_sub(last));
            }
            t.last_offset = Some(next_offset.max(t.last_offset.unwrap_or(0)));
        }
    }

    /// Stops tracking a partition.
    pub fn remove(&mut self, sub: SubKey, partition: u32) {
        self.tracks.remove(&(sub, partition));
    }

    /// The measured records/s over the last closed window.
    pub fn actual(&self, sub: SubKey, partition: u32) -> Option<f64> {
        self.tracks.get(&(sub, partition))?.actual
    }

    /// The earliest window end.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.tracks
            .values()
            .map(|t| t.window_start + self.config.window)
            .min()
    }

    /// Closes windows that ended.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.close_windows(now);
    }

    /// The next flagged partition, if any.
    pub fn poll_flagged(&mut self) -> Option<Deviation> {
        self.flagged.pop_front()
    }

    fn close_windows(&mut self, now: Instant) {
        let c = &self.config;
        for (&(sub, partition), t) in &mut self.tracks {
            let Some(elapsed) = now.checked_duration_since(t.window_start) else {
                continue;
            };
            if elapsed < c.window {
                continue;
            }
            let actual = t.consumed as f64 / elapsed.as_secs_f64();
            t.actual = Some(actual);
            t.consumed = 0;
            t.window_start = now;
            let reference = t.predicted.max(c.floor_records_per_s);
            if (actual - t.predicted).abs() > c.threshold * reference {
                t.streak += 1;
            } else {
                t.streak = 0;
            }
            if t.streak >= c.consecutive && !t.flagged {
                t.flagged = true;
                self.flagged.push_back(Deviation {
                    sub,
                    partition,
                    predicted: t.predicted,
                    actual,
                });
            }
        }
    }
}
