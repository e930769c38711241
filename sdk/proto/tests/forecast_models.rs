//! Forecasters on synthetic series: step, ramp, seasonal, seeded noise.

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sibyl_proto::forecast::{Forecaster, ForecasterKind, Mase, ModelConfig};

const KINDS: [ForecasterKind; 3] = [
    ForecasterKind::Sma,
    ForecasterKind::Ewma,
    ForecasterKind::Holt,
];

fn fixed(alpha: f64) -> ModelConfig {
    let mut c = ModelConfig::default();
    c.alpha = alpha;
    c.alpha_min = alpha;
    c.alpha_max = alpha;
    c
}

fn step(n: usize, at: usize, from: f64, to: f64) -> Vec<f64> {
    (0..n).map(|i| if i < at { from } else { to }).collect()
}

fn ramp(n: usize) -> Vec<f64> {
    (0..n).map(|i| 10.0 + 5.0 * i as f64).collect()
}

fn seasonal(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| 100.0 + 50.0 * (i as f64 * std::f64::consts::TAU / 24.0).sin())
        .collect()
}

fn noisy(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| 100.0 + rng.random_range(-20.0..20.0))
        .collect()
}

/// Feeds the series, checking bounds at every step; returns the forecaster.
fn run(kind: ForecasterKind, config: &ModelConfig, series: &[f64]) -> Forecaster {
    let mut f = Forecaster::new(kind, config);
    for &y in series {
        f.observe(y);
        let a = f.alpha();
        assert!(
            (config.alpha_min..=config.alpha_max).contains(&a),
            "{kind:?}: alpha {a} out of bounds"
        );
        let p = f.forecast().expect("forecast after an observation");
        assert!(p.is_finite() && p >= 0.0, "{kind:?}: forecast {p}");
    }
    f
}

#[test]
fn mase_hand_checked() {
    // y = 10, 12, 11, 15 with forecasts 10, 11, 13 for steps 2..4.
    let mut m = Mase::new(10);
    assert_eq!(m.value(), None);
    m.push(10.0, 12.0, 10.0);
    m.push(11.0, 11.0, 12.0);
    m.push(13.0, 15.0, 11.0);
    // Σ|e| = 2 + 0 + 2 = 4; Σ|naive| = 2 + 1 + 4 = 7.
    assert_eq!(m.sums(), (4.0, 7.0));
    assert_eq!(m.value(), Some(4.0 / 7.0));
    // Rolling: a window of 2 keeps only the last two steps: (0 + 2) / (1 + 4).
    let mut m = Mase::new(2);
    m.push(10.0, 12.0, 10.0);
    m.push(11.0, 11.0, 12.0);
    m.push(13.0, 15.0, 11.0);
    assert_eq!(m.value(), Some(2.0 / 5.0));
    // A flat history has an undefined MASE.
    let mut m = Mase::new(4);
    m.push(1.0, 5.0, 5.0);
    assert_eq!(m.value(), None);
}

#[test]
fn mase_of_a_forecaster_hand_checked() {
    // EWMA with α fixed at 0.5 on 10, 12, 11, 15: forecasts 10, 11, 11 for steps 2..4
    // (levels 10 → 11 → 11 → 13). Errors 2, 0, 4 = 6; naive errors 2, 1, 4 = 7.
    let f = run(ForecasterKind::Ewma, &fixed(0.5), &[10.0, 12.0, 11.0, 15.0]);
    assert_eq!(f.mase(), Some(6.0 / 7.0));
    assert_eq!(f.forecast(), Some(13.0));
}

#[test]
fn holt_tracks_a_ramp_better_than_sma() {
    let series = ramp(120);
    let config = ModelConfig::default();
    let holt = run(ForecasterKind::Holt, &config, &series);
    let sma = run(ForecasterKind::Sma, &config, &series);
    let ewma = run(ForecasterKind::Ewma, &config, &series);
    let (h, s, e) = (
        holt.mase().unwrap(),
        sma.mase().unwrap(),
        ewma.mase().unwrap(),
    );
    assert!(h < s, "holt {h} vs sma {s}");
    assert!(h < e, "holt {h} vs ewma {e}");
    // Holt has learned the slope: the next value is 10 + 5·120 = 610.
    let next = holt.forecast().unwrap();
    assert!((next - 610.0).abs() < 5.0, "holt forecast {next}");
    // The others fall behind the naive forecast on a ramp, so their sensitivity rose.
    assert!(sma.alpha() > config.alpha && ewma.alpha() > config.alpha);
}

/// Steps after the jump until the forecast is within 5 % of the new level.
fn steps_to_settle(config: &ModelConfig) -> usize {
    let series = step(200, 40, 100.0, 200.0);
    let mut f = Forecaster::new(ForecasterKind::Ewma, config);
    for (i, &y) in series.iter().enumerate() {
        f.observe(y);
        if i >= 40 && (f.forecast().unwrap() - 200.0).abs() <= 10.0 {
            return i - 40 + 1;
        }
    }
    usize::MAX
}

#[test]
fn ewma_adapts_to_a_step_within_n_steps() {
    let adaptive = steps_to_settle(&ModelConfig::default());
    let fixed = steps_to_settle(&fixed(0.2));
    // Within 10 of 200 is within 10 % of the jump: fixed α = 0.2 needs
    // ⌈ln 0.1 / ln 0.8⌉ = 11 steps; adapting α gets there sooner.
    assert_eq!(fixed, 11);
    assert!(adaptive <= 8, "adaptive EWMA took {adaptive} steps");
}

#[test]
fn alpha_rises_on_drift_and_decays_when_stable() {
    let config = ModelConfig::default();
    // Seasonal: a smooth series the naive forecast follows closely, so a sluggish EWMA is
    // worse than naive and α rises.
    let f = run(ForecasterKind::Ewma, &config, &seasonal(200));
    assert!(f.alpha() > config.alpha, "alpha {}", f.alpha());
    // Noise around a constant: smoothing beats naive, so α decays toward alpha_min.
    let f = run(ForecasterKind::Ewma, &config, &noisy(300, 7));
    assert!(f.alpha() < config.alpha, "alpha {}", f.alpha());
    assert!(f.mase().unwrap() < 1.0);
    // A perfectly flat series is stable: α decays too.
    let f = run(ForecasterKind::Ewma, &config, &[50.0; 100]);
    assert!(f.alpha() < config.alpha, "alpha {}", f.alpha());
    assert_eq!(f.forecast(), Some(50.0));
}

#[test]
fn every_kind_stays_within_bounds_on_every_series() {
    let config = ModelConfig::default();
    for kind in KINDS {
        for series in [
            step(150, 50, 10.0, 500.0),
            step(150, 50, 500.0, 0.0),
            ramp(150),
            seasonal(150),
            noisy(150, 42),
        ] {
            let f = run(kind, &config, &series);
            assert_eq!(f.steps(), 150);
        }
    }
}

#[test]
fn sma_length_shortens_as_alpha_rises() {
    let config = ModelConfig::default();
    let mut f = Forecaster::new(ForecasterKind::Sma, &config);
    let before = f.sma_len();
    for y in step(60, 20, 10.0, 1000.0) {
        f.observe(y);
    }
    assert!(f.alpha() > config.alpha);
    assert!(f.sma_len() < before, "{} vs {before}", f.sma_len());
}

proptest! {
    #[test]
    fn adaptation_stays_within_bounds(
        series in proptest::collection::vec(0.0f64..1e6, 1..200),
        kind in 0usize..3,
        lo in 0.01f64..0.5,
        span in 0.0f64..0.5,
    ) {
        let mut config = ModelConfig::default();
        config.alpha_min = lo;
        config.alpha_max = lo + span;
        config.alpha = lo + span / 2.0;
        config.validate().unwrap();
        run(KINDS[kind], &config, &series);
    }
}
