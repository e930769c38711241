//! The assignment-request policy of `ForecastEngine`, walked through synthetic time.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sibyl_proto::forecast::{ConfigError, ForecastConfig, ForecastEngine, ForecastError};
use sibyl_proto::frame::Forecast;

const TICK: Duration = Duration::from_millis(100);

/// Drives the engine for `secs` seconds in 100 ms ticks; `rate(t)` gives records/s at second
/// `t` (100-byte records). Returns `(seconds since t0, request)` for every request.
fn drive(
    engine: &mut ForecastEngine,
    t0: Instant,
    from_tick: u64,
    secs: u64,
    mut rate: impl FnMut(u64) -> f64,
) -> Vec<(f64, Forecast)> {
    let mut out = Vec::new();
    for i in from_tick..from_tick + secs * 10 {
        let now = t0 + TICK * u32::try_from(i).unwrap();
        let per_tick = (rate(i / 10) / 10.0).round() as u64;
        engine.record(0, per_tick, per_tick * 100, now).unwrap();
        if let Some(f) = engine.poll_request(now) {
            out.push(((now - t0).as_secs_f64(), f));
        }
    }
    out
}

#[test]
fn first_request_after_first_bucket_then_on_interval() {
    let t0 = Instant::now();
    let mut e = ForecastEngine::new(ForecastConfig::default()).unwrap();
    assert_eq!(e.poll_request(t0), None);
    assert_eq!(e.poll_timeout(), None);
    e.set_buffer_capacity(1 << 20);
    let reqs = drive(&mut e, t0, 0, 45, |_| 100.0);
    let times: Vec<f64> = reqs.iter().map(|r| r.0).collect();
    assert_eq!(times, vec![1.0, 11.0, 21.0, 31.0, 41.0]);
    let f = &reqs[0].1;
    assert_eq!(f.buffer_capacity_bytes, 1 << 20);
    assert_eq!(f.partitions.len(), 1);
    assert_eq!(f.partitions[0].partition, 0);
    assert_eq!(f.partitions[0].records_per_s, 100);
    assert_eq!(f.partitions[0].bytes_per_s, 10_000);
}

#[test]
fn small_noise_does_not_trigger_requests() {
    let t0 = Instant::now();
    let mut e = ForecastEngine::new(ForecastConfig::default()).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let reqs = drive(&mut e, t0, 0, 60, |_| 1000.0 * rng.random_range(0.9..1.1));
    let times: Vec<f64> = reqs.iter().map(|r| r.0).collect();
    assert_eq!(times, vec![1.0, 11.0, 21.0, 31.0, 41.0, 51.0]);
}

#[test]
fn a_large_move_triggers_a_request_at_once() {
    let t0 = Instant::now();
    let mut e = ForecastEngine::new(ForecastConfig::default()).unwrap();
    let reqs = drive(&mut e, t0, 0, 15, |_| 100.0);
    assert_eq!(reqs.last().unwrap().0, 11.0);
    // At t = 15 s the rate doubles; EWMA (α = 0.2) moves the prediction by 20 % of the jump
    // per bucket, so the prediction passes 120 (> 20 % over the last sent 100) after the
    // second bucket at 200/s, at t = 17 s — well before the interval request at t = 21 s.
    let reqs = drive(&mut e, t0, 150, 5, |_| 200.0);
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].0, 17.0);
    assert!(reqs[0].1.partitions[0].records_per_s > 120);
}

#[test]
fn poll_timeout_is_next_bucket_or_interval() {
    let t0 = Instant::now();
    let mut e = ForecastEngine::new(ForecastConfig::default()).unwrap();
    e.record(0, 10, 10, t0).unwrap();
    assert_eq!(e.poll_timeout(), Some(t0 + Duration::from_secs(1)));
    let t1 = t0 + Duration::from_secs(1);
    assert!(e.poll_request(t1).is_some());
    assert_eq!(e.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    // With a bucket longer than the interval, the interval deadline comes first.
    let mut c = ForecastConfig::default();
    c.bucket = Duration::from_secs(30);
    c.request_interval = Duration::from_secs(10);
    let mut e = ForecastEngine::new(c).unwrap();
    e.record(0, 10, 10, t0).unwrap();
    let t30 = t0 + Duration::from_secs(30);
    assert!(e.poll_request(t30).is_some());
    assert_eq!(e.poll_timeout(), Some(t30 + Duration::from_secs(10)));
    // The interval request repeats the same prediction.
    assert_eq!(e.poll_request(t30 + Duration::from_secs(9)), None);
    assert!(e.poll_request(t30 + Duration::from_secs(10)).is_some());
}

#[test]
fn new_partition_triggers_and_forget_removes() {
    let t0 = Instant::now();
    let mut e = ForecastEngine::new(ForecastConfig::default()).unwrap();
    e.record(0, 50, 500, t0).unwrap();
    let t1 = t0 + Duration::from_secs(1);
    let f = e.poll_request(t1).unwrap();
    assert_eq!(f.partitions.len(), 1);
    e.record(1, 50, 500, t1).unwrap();
    assert_eq!(e.poll_request(t1 + Duration::from_millis(500)), None);
    // Partition 1's first bucket closes: a partition not in the last request → request.
    let f = e.poll_request(t1 + Duration::from_secs(1)).unwrap();
    let parts: Vec<u32> = f.partitions.iter().map(|p| p.partition).collect();
    assert_eq!(parts, vec![0, 1]);
    e.forget(0);
    let f = e.poll_request(t1 + Duration::from_secs(11)).unwrap();
    let parts: Vec<u32> = f.partitions.iter().map(|p| p.partition).collect();
    assert_eq!(parts, vec![1]);
}

#[test]
fn metrics_report_actual_vs_predicted() {
    let t0 = Instant::now();
    let mut e = ForecastEngine::new(ForecastConfig::default()).unwrap();
    drive(
        &mut e,
        t0,
        0,
        10,
        |s| if s % 2 == 0 { 100.0 } else { 200.0 },
    );
    let m = e.metrics();
    assert_eq!(m.len(), 1);
    let m = m[0];
    assert_eq!(m.partition, 0);
    // Buckets closed: seconds 0..=8 (the 9th closes at t = 10 s, not reached).
    assert_eq!(m.actual_records_per_s, Some(100.0));
    let window = m.window_records_per_s.unwrap();
    assert!((window - 1300.0 / 9.0).abs() < 1e-9, "{window}");
    let p = m.predicted_records_per_s.unwrap();
    assert!((100.0..200.0).contains(&p));
    assert_eq!(m.predicted_bytes_per_s, Some(p * 100.0));
    // An alternating series: the naive forecast is always 100 off; EWMA is closer.
    assert!(m.mase.unwrap() < 1.0);
}

#[test]
fn limits_and_validation() {
    let t0 = Instant::now();
    let mut c = ForecastConfig::default();
    c.max_partitions = 2;
    let mut e = ForecastEngine::new(c).unwrap();
    e.record(0, 1, 1, t0).unwrap();
    e.record(1, 1, 1, t0).unwrap();
    assert_eq!(
        e.record(2, 1, 1, t0),
        Err(ForecastError::TooManyPartitions { limit: 2 })
    );
    e.record(1, 1, 1, t0).unwrap();

    let mut c = ForecastConfig::default();
    c.bucket = Duration::ZERO;
    assert_eq!(
        ForecastEngine::new(c).unwrap_err(),
        ConfigError::OutOfRange("bucket")
    );
    let mut c = ForecastConfig::default();
    c.change_threshold = 0.0;
    assert!(ForecastEngine::new(c).is_err());
    let mut c = ForecastConfig::default();
    c.model.alpha_max = 0.1;
    assert_eq!(ForecastEngine::new(c).unwrap_err(), ConfigError::Alpha);
}
