//! Predictive pre-fetch, client side (seed 000): consumption windows, forecasters and the
//! assignment-request policy, all I/O-free (every call takes `now`).
//!
//! ```text
//!  app takes records ──record(p, n, bytes, now)──▶ ConsumptionWindow (per partition, 1 s buckets)
//!                                                      │ each closed bucket: one observation
//!                                                      ▼
//!                                                  Forecaster (SMA | EWMA | Holt, MASE, adaptive α)
//!                                                      │
//!  driver ──poll_request(now)──▶ ForecastEngine ──▶ Option<frame::Forecast> (interval or >20 % move)
//!  driver ──poll_timeout()────▶ next bucket close / next interval request
//! ```
//!
//! [`PrefetchMetrics`] is the matching accounting of how well pre-fetch served the app.

mod metrics;
mod model;
mod window;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use metrics::{PrefetchMetrics, PrefetchStats};
pub use model::{Forecaster, ForecasterKind, Mase, ModelConfig};
pub use window::{Bucket, ConsumptionWindow};

use crate::frame::Forecast;

/// A configuration value out of its documented bounds (caller misuse).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// α bounds must satisfy `0 < alpha_min ≤ alpha ≤ alpha_max ≤ 1`.
    #[error("alpha bounds must satisfy 0 < alpha_min <= alpha <= alpha_max <= 1")]
    Alpha,
    /// The named field is out of its documented range.
    #[error("{0} is out of range")]
    OutOfRange(&'static str),
}

/// The engine refused an input (caller misuse).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForecastError {
    /// Already tracking `max_partitions` partitions; this new one was not recorded.
    #[error("too many partitions tracked (limit {limit})")]
    TooManyPartitions {
        /// The configured limit.
        limit: usize,
    },
}

/// Configuration of [`ForecastEngine`]. Every field has a documented default.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ForecastConfig {
    /// Length of the rolling consumption window. Default 60 s (the design note's
    /// `PREDICTION_WINDOW`).
    pub window: Duration,
    /// Bucket length: one forecaster observation per bucket. Default 1 s; must be ≥ 1 ms and
    /// ≤ `window`.
    pub bucket: Duration,
    /// The forecaster. Default [`ForecasterKind::Ewma`].
    pub kind: ForecasterKind,
    /// Forecaster parameters and adaptation rule.
    pub model: ModelConfig,
    /// A request is sent at least this often. Default 10 s (`PARTITION_REQUEST_INTERVAL`).
    pub request_interval: Duration,
    /// A request is sent at once when a partition's predicted records/s moves by more than
    /// this fraction of the last sent value. Default 0.2 (20 %); must be > 0.
    pub change_threshold: f64,
    /// Floor (records/s) of the value the change is measured against, so a partition going
    /// from 0.0 to 0.1 records/s does not count as a large move. Default 1.0.
    pub min_rate: f64,
    /// Most partitions tracked at once. Default 4096.
    pub max_partitions: usize,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            bucket: Duration::from_secs(1),
            kind: ForecasterKind::Ewma,
            model: ModelConfig::default(),
            request_interval: Duration::from_secs(10),
            change_threshold: 0.2,
            min_rate: 1.0,
            max_partitions: 4096,
        }
    }
}

impl ForecastConfig {
    /// Checks every bound (see the field docs and [`ModelConfig::validate`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bucket < Duration::from_millis(1) || self.bucket > self.window {
            return Err(ConfigError::OutOfRange("bucket"));
        }
        if self.request_interval.is_zero() {
            return Err(ConfigError::OutOfRange("request_interval"));
        }
        if !(self.change_threshold > 0.0 && self.change_threshold.is_finite()) {
            return Err(ConfigError::OutOfRange("change_threshold"));
        }
        if !(self.min_rate >= 0.0 && self.min_rate.is_finite()) {
            return Err(ConfigError::OutOfRange("min_rate"));
        }
        if self.max_partitions == 0 {
            return Err(ConfigError::OutOfRange("max_partitions"));
        }
        self.model.validate()
    }
}

/// Forecast-quality figures of one partition.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct PartitionMetrics {
    /// Partition number.
    pub partition: u32,
    /// Predicted records/s for the next bucket (`None` before the first bucket closed).
    pub predicted_records_per_s: Option<f64>,
    /// Predicted bytes/s (predicted records/s × mean record size in the window).
    pub predicted_bytes_per_s: Option<f64>,
    /// Actual records/s in the last closed bucket.
    pub actual_records_per_s: Option<f64>,
    /// Mean actual records/s over the closed buckets of the window.
    pub window_records_per_s: Option<f64>,
    /// Rolling MASE of the forecaster (`None` while undefined).
    pub mase: Option<f64>,
    /// The forecaster's current sensitivity α.
    pub alpha: f64,
}

#[derive(Debug, Clone)]
struct PartitionState {
    window: ConsumptionWindow,
    model: Forecaster,
}

impl PartitionState {
    fn advance(&mut self, now: Instant) {
        let secs = self.window.bucket().as_secs_f64();
        let model = &mut self.model;
        self.window
            .advance(now, |b| model.observe(b.records as f64 / secs));
    }

    fn predicted(&self) -> Option<(f64, f64)> {
        let records = self.model.forecast()?;
        let bytes = records * self.window.mean_record_bytes().unwrap_or(0.0);
        Some((records, bytes))
    }
}

/// The client's forecasting machine for one subscription.
///
/// Call order (`now` never moves backwards):
///
/// 1. [`record`](Self::record) each time the application takes records from a partition;
///    [`set_buffer_capacity`](Self::set_buffer_capacity) when the free pre-fetch buffer space
///    changes; [`forget`](Self::forget) when a partition is revoked.
/// 2. [`poll_request`](Self::poll_request) after inputs and when the
///    [`poll_timeout`](Self::poll_timeout) deadline passes; send any `Forecast` it returns on
///    the subscription's control stream.
///
/// A request goes out when the first prediction exists, then every `request_interval`, and at
/// once whenever a partition's prediction moved by more than `change_threshold` relative to
/// the value last sent (against at least `min_rate`), or a predicted partition was not in the
/// last request. Predictions change only when a bucket closes.
#[derive(Debug, Clone)]
pub struct ForecastEngine {
    config: ForecastConfig,
    partitions: BTreeMap<u32, PartitionState>,
    sent: BTreeMap<u32, f64>,
    last_sent: Option<Instant>,
    buffer_capacity: u64,
}

impl ForecastEngine {
    /// A new engine.
    pub fn new(config: ForecastConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            partitions: BTreeMap::new(),
            sent: BTreeMap::new(),
            last_sent: None,
            buffer_capacity: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ForecastConfig {
        &self.config
    }

    /// The application took `records` records (`bytes` bytes) from `partition`. The first
    /// record of a partition starts its window, aligned on `now`.
    pub fn record(
        &mut self,
        partition: u32,
        records: u64,
        bytes: u64,
        now: Instant,
    ) -> Result<(), ForecastError> {
        let limit = self.config.max_partitions;
        let len = self.partitions.len();
        let state = match self.partitions.entry(partition) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                if len >= limit {
                    return Err(ForecastError::TooManyPartitions { limit });
                }
                e.insert(PartitionState {
                    window: ConsumptionWindow::new(self.config.window, self.config.bucket, now),
                    model: Forecaster::new(self.config.kind, &self.config.model),
                })
            }
        };
        state.advance(now);
        state.window.add(records, bytes);
        Ok(())
    }

    /// Stops tracking a partition (e.g. revoked): its history and last sent value are dropped.
    pub fn forget(&mut self, partition: u32) {
        self.partitions.remove(&partition);
        self.sent.remove(&partition);
    }

    /// Sets the free space of the client's pre-fetch buffer, carried in the next request.
    pub fn set_buffer_capacity(&mut self, bytes: u64) {
        self.buffer_capacity = bytes;
    }

    /// Closes elapsed buckets, feeding the forecasters. Called by the other `now` methods.
    pub fn advance(&mut self, now: Instant) {
        for state in self.partitions.values_mut() {
            state.advance(now);
        }
    }

    /// The current prediction for a partition: `(records/s, bytes/s)`.
    pub fn predicted(&self, partition: u32) -> Option<(f64, f64)> {
        self.partitions.get(&partition)?.predicted()
    }

    /// A `Forecast` to send now, if the policy says so (see the type docs).
    pub fn poll_request(&mut self, now: Instant) -> Option<Forecast> {
        self.advance(now);
        let predictions: Vec<(u32, f64, f64)> = self
            .partitions
            .iter()
            .filter_map(|(&p, s)| s.predicted().map(|(r, b)| (p, r, b)))
            .collect();
        if predictions.is_empty() {
            return None;
        }
        let due = self
            .last_sent
            .is_none_or(|t| now >= t + self.config.request_interval);
        let moved = || {
            predictions
                .iter()
                .any(|&(p, r, _)| match self.sent.get(&p) {
                    None => true,
                    Some(&old) => {
                        (r - old).abs()
                            > self.config.change_threshold * old.max(self.config.min_rate)
                    }
                })
        };
        if !(due || moved()) {
            return None;
        }
        self.last_sent = Some(now);
        self.sent = predictions.iter().map(|&(p, r, _)| (p, r)).collect();
        Some(Forecast::from_rates(
            predictions
                .iter()
                .map(|&(p, r, b)| (p, r.round() as u64, b.round() as u64)),
            self.buffer_capacity,
        ))
    }

    /// When to call [`poll_request`](Self::poll_request) next if nothing else happens: the
    /// next bucket close or the next interval request, whichever is first; `None` while no
    /// partition is tracked.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let close = self
            .partitions
            .values()
            .map(|s| s.window.next_close())
            .min()?;
        Some(match self.last_sent {
            Some(t) => close.min(t + self.config.request_interval),
            None => close,
        })
    }

    /// Forecast quality per tracked partition: actual vs predicted, MASE, α.
    pub fn metrics(&self) -> Vec<PartitionMetrics> {
        self.partitions
            .iter()
            .map(|(&partition, s)| {
                let secs = s.window.bucket().as_secs_f64();
                let predicted = s.predicted();
                PartitionMetrics {
                    partition,
                    predicted_records_per_s: predicted.map(|p| p.0),
                    predicted_bytes_per_s: predicted.map(|p| p.1),
                    actual_records_per_s: s.window.last_closed().map(|b| b.records as f64 / secs),
                    window_records_per_s: s.window.mean_records_per_s(),
                    mase: s.model.mase(),
                    alpha: s.model.alpha(),
                }
            })
            .collect()
    }
}
