//! Forecasters (SMA, EWMA, Holt), their MASE error tracker and the sensitivity adaptation rule.

use std::collections::VecDeque;

use super::ConfigError;

/// Which forecaster a client runs (the same kind for all its partitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ForecasterKind {
    /// Simple moving average of the last `n` observations, `n = round(2/α − 1)` clamped to
    /// `[1, sma_max_len]` (the classical SMA/EWMA equivalence `α = 2/(n+1)`), so the same
    /// sensitivity α drives it.
    Sma,
    /// Exponentially weighted moving average: `level ← α·y + (1−α)·level`. The default.
    #[default]
    Ewma,
    /// Holt's linear trend: `level ← α·y + (1−α)(level+trend)`,
    /// `trend ← β(level−level') + (1−β)·trend`, forecast `level + trend`.
    Holt,
}

/// Forecaster parameters and the adaptation rule's knobs. Every field has a documented
/// default; [`validate`](Self::validate) checks the bounds.
///
/// # The adaptation rule
///
/// After each observation, with at least `patience` scored steps in the MASE window:
///
/// - a step is *worse* when the rolling MASE is above 1 (the forecaster does worse than the
///   naive "same as last step" forecast; a perfectly flat history with any error counts too);
/// - a step is *good* when the rolling MASE is at most `low_mase` (a perfectly flat history
///   forecast exactly counts too);
/// - after `patience` consecutive worse steps, `α ← α + raise_gain·(α_max − α)` (react faster);
/// - after `patience` consecutive good steps, `α ← α − decay_gain·(α − α_min)` (smooth more);
/// - each adjustment restarts the streak. α always stays within `[alpha_min, alpha_max]`;
///   β (Holt's trend smoothing) is not adapted.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ModelConfig {
    /// Initial sensitivity α. Default 0.2 (the design note's `PREDICTION_SENSITIVITY`).
    pub alpha: f64,
    /// Lower bound of α. Default 0.05.
    pub alpha_min: f64,
    /// Upper bound of α. Default 0.8.
    pub alpha_max: f64,
    /// Holt's trend smoothing β in `(0, 1]`. Default 0.1.
    pub beta: f64,
    /// Longest SMA (observations kept). Default 60.
    pub sma_max_len: usize,
    /// Steps in the rolling MASE window. Default 20.
    pub mase_window: usize,
    /// Consecutive worse (or good) steps before α moves. Default 3.
    pub patience: u32,
    /// Fraction of the distance to `alpha_max` added on drift, in `(0, 1]`. Default 0.5.
    pub raise_gain: f64,
    /// Fraction of the distance to `alpha_min` removed when stable, in `[0, 1]`. Default 0.1.
    pub decay_gain: f64,
    /// MASE at or below which the forecaster counts as stable and low. Default 0.8.
    pub low_mase: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            alpha: 0.2,
            alpha_min: 0.05,
            alpha_max: 0.8,
            beta: 0.1,
            sma_max_len: 60,
            mase_window: 20,
            patience: 3,
            raise_gain: 0.5,
            decay_gain: 0.1,
            low_mase: 0.8,
        }
    }
}

impl ModelConfig {
    /// Checks every bound: `0 < alpha_min ≤ alpha ≤ alpha_max ≤ 1`, `0 < beta ≤ 1`,
    /// `sma_max_len ≥ 1`, `mase_window ≥ 2`, `patience ≥ 1`, `0 < raise_gain ≤ 1`,
    /// `0 ≤ decay_gain ≤ 1`, `0 ≤ low_mase < 1`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let in01 = |v: f64| v > 0.0 && v <= 1.0;
        if !(in01(self.alpha_min)
            && in01(self.alpha_max)
            && self.alpha_min <= self.alpha
            && self.alpha <= self.alpha_max)
        {
            return Err(ConfigError::Alpha);
        }
        if !in01(self.beta) {
            return Err(ConfigError::OutOfRange("beta"));
        }
        if self.sma_max_len == 0 {
            return Err(ConfigError::OutOfRange("sma_max_len"));
        }
        if self.mase_window < 2 {
            return Err(ConfigError::OutOfRange("mase_window"));
        }
        if self.patience == 0 {
            return Err(ConfigError::OutOfRange("patience"));
        }
        if !in01(self.raise_gain) {
            return Err(ConfigError::OutOfRange("raise_gain"));
        }
        if !(0.0..=1.0).contains(&self.decay_gain) {
            return Err(ConfigError::OutOfRange("decay_gain"));
        }
        if !(0.0..1.0).contains(&self.low_mase) {
            return Err(ConfigError::OutOfRange("low_mase"));
        }
        Ok(())
    }
}

/// Rolling mean absolute scaled error: `Σ|y − ŷ| / Σ|y − y_prev|` over the last `window`
/// scored steps, i.e. the forecaster's absolute error scaled by the in-sample naive one-step
/// error over the same steps. Below 1: better than naive; above 1: worse.
#[derive(Debug, Clone)]
pub struct Mase {
    window: usize,
    steps: VecDeque<(f64, f64)>,
}

impl Mase {
    /// An empty tracker over the last `window` steps (at least 1).
    pub fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            steps: VecDeque::new(),
        }
    }

    /// Scores one step: the forecast made for it, the actual value and the previous actual
    /// value (the naive forecast).
    pub fn push(&mut self, forecast: f64, actual: f64, previous: f64) {
        if self.steps.len() == self.window {
            self.steps.pop_front();
        }
        // Floating-point noise (a forecast off by an ulp on a flat series) is not an error.
        let noise = 1e-9 * actual.abs().max(1.0);
        let clean = |d: f64| if d.abs() <= noise { 0.0 } else { d.abs() };
        self.steps
            .push_back((clean(actual - forecast), clean(actual - previous)));
    }

    /// Scored steps held.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// True before the first scored step.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// `(Σ forecast error, Σ naive error)` over the window.
    pub fn sums(&self) -> (f64, f64) {
        self.steps
            .iter()
            .fold((0.0, 0.0), |(e, n), &(de, dn)| (e + de, n + dn))
    }

    /// The MASE; `None` when empty or when the naive error is zero (a flat history: the
    /// ratio is undefined).
    pub fn value(&self) -> Option<f64> {
        let (e, n) = self.sums();
        (n > 0.0).then(|| e / n)
    }
}

/// One partition's forecaster: the model state, its MASE and its adaptive sensitivity.
///
/// Feed one observation per closed bucket with [`observe`](Self::observe) (a rate, e.g.
/// records/s); [`forecast`](Self::forecast) is the prediction for the next bucket.
#[derive(Debug, Clone)]
pub struct Forecaster {
    kind: ForecasterKind,
    config: ModelConfig,
    alpha: f64,
    level: Option<f64>,
    trend: f64,
    history: VecDeque<f64>,
    last_actual: Option<f64>,
    mase: Mase,
    worse_streak: u32,
    good_streak: u32,
    steps: u64,
}

impl Forecaster {
    /// A fresh forecaster (`config` is expected to be validated; α is clamped into bounds).
    pub fn new(kind: ForecasterKind, config: &ModelConfig) -> Self {
        Self {
            kind,
            alpha: config.alpha.clamp(config.alpha_min, config.alpha_max),
            mase: Mase::new(config.mase_window),
            config: config.clone(),
            level: None,
            trend: 0.0,
            history: VecDeque::new(),
            last_actual: None,
            worse_streak: 0,
            good_streak: 0,
            steps: 0,
        }
    }

    /// The kind.
    pub fn kind(&self) -> ForecasterKind {
        self.kind
    }

    /// The current sensitivity α.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The SMA length α currently maps to (`round(2/α − 1)` in `[1, sma_max_len]`).
    pub fn sma_len(&self) -> usize {
        let n = (2.0 / self.alpha - 1.0).round();
        // α ∈ (0, 1] so n ≥ 1 and finite.
        (n as usize).clamp(1, self.config.sma_max_len)
    }

    /// The rolling MASE (see [`Mase::value`]).
    pub fn mase(&self) -> Option<f64> {
        self.mase.value()
    }

    /// Observations so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The forecast for the next step (never negative); `None` before the first observation.
    pub fn forecast(&self) -> Option<f64> {
        let raw = match self.kind {
            ForecasterKind::Sma => {
                let n = self.sma_len().min(self.history.len());
                if n == 0 {
                    return None;
                }
                self.history.iter().rev().take(n).sum::<f64>() / n as f64
            }
            ForecasterKind::Ewma => self.level?,
            ForecasterKind::Holt => self.level? + self.trend,
        };
        Some(raw.max(0.0))
    }

    /// Takes one observation (non-finite values are ignored): scores the previous forecast,
    /// updates the model, then applies the adaptation rule.
    pub fn observe(&mut self, y: f64) {
        if !y.is_finite() {
            return;
        }
        if let (Some(f), Some(prev)) = (self.forecast(), self.last_actual) {
            self.mase.push(f, y, prev);
        }
        let a = self.alpha;
        match self.kind {
            ForecasterKind::Sma => {
                if self.history.len() == self.config.sma_max_len {
                    self.history.pop_front();
                }
                self.history.push_back(y);
            }
            ForecasterKind::Ewma => {
                self.level = Some(self.level.map_or(y, |l| l + a * (y - l)));
            }
            ForecasterKind::Holt => match self.level {
                None => self.level = Some(y),
                Some(l) => {
                    let b = self.config.beta;
                    let prior = l + self.trend;
                    let new = prior + a * (y - prior);
                    self.trend = b * (new - l) + (1.0 - b) * self.trend;
                    self.level = Some(new);
                }
            },
        }
        self.last_actual = Some(y);
        self.steps += 1;
        self.adapt();
    }

    fn adapt(&mut self) {
        let c = &self.config;
        if self.mase.len() < c.patience as usize {
            return;
        }
        let (e, n) = self.mase.sums();
        let worse = e > n;
        let good = e <= c.low_mase * n;
        if worse {
            self.worse_streak += 1;
            self.good_streak = 0;
        } else if good {
            self.good_streak += 1;
            self.worse_streak = 0;
        } else {
            self.worse_streak = 0;
            self.good_streak = 0;
        }
        if self.worse_streak >= c.patience {
            self.alpha += c.raise_gain * (c.alpha_max - self.alpha);
            self.worse_streak = 0;
        } else if self.good_streak >= c.patience {
            self.alpha -= c.decay_gain * (self.alpha - c.alpha_min);
            self.good_streak = 0;
        }
        self.alpha = self.alpha.clamp(c.alpha_min, c.alpha_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_bad_bounds() {
        let mut c = ModelConfig::default();
        c.validate().unwrap();
        c.alpha = 0.9;
        assert_eq!(c.validate(), Err(ConfigError::Alpha));
        let c = ModelConfig {
            beta: 0.0,
            ..ModelConfig::default()
        };
        assert!(c.validate().is_err());
        let c = ModelConfig {
            low_mase: 1.0,
            ..ModelConfig::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn sma_len_follows_alpha() {
        let mut c = ModelConfig {
            alpha: 0.2,
            ..ModelConfig::default()
        };
        assert_eq!(Forecaster::new(ForecasterKind::Sma, &c).sma_len(), 9);
        c.alpha = 1.0;
        c.alpha_max = 1.0;
        assert_eq!(Forecaster::new(ForecasterKind::Sma, &c).sma_len(), 1);
    }

    #[test]
    fn ewma_and_holt_by_hand() {
        let c = ModelConfig {
            alpha: 0.5,
            beta: 0.5,
            ..ModelConfig::default()
        };
        let mut e = Forecaster::new(ForecasterKind::Ewma, &c);
        assert_eq!(e.forecast(), None);
        e.observe(10.0);
        e.observe(20.0);
        assert_eq!(e.forecast(), Some(15.0));
        let mut h = Forecaster::new(ForecasterKind::Holt, &c);
        h.observe(10.0);
        h.observe(20.0);
        // level = 0.5·20 + 0.5·(10 + 0) = 15; trend = 0.5·(15 − 10) + 0 = 2.5.
        assert_eq!(h.forecast(), Some(17.5));
    }
}
