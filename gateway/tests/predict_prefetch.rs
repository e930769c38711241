//! Pre-fetch sizing (budget, buffer, grant, warm-up, priority) and deviation tracking.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use sibyl_gateway::predict::{
    DeviationConfig, DeviationTracker, PrefetchConfig, PrefetchPlanner, SubKey, stream_priority,
};
use sibyl_proto::frame::Forecast;

fn forecast(rates: &[(u32, u64, u64)], buffer: u64) -> Forecast {
    Forecast::from_rates(rates.iter().copied(), buffer)
}

#[test]
fn depth_is_rate_times_lead_time() {
    let mut p = PrefetchPlanner::new(PrefetchConfig::default());
    let s = SubKey(1);
    p.set_rtt(s, Duration::from_millis(80));
    p.update_forecast(s, &forecast(&[(0, 1000, 100_000), (1, 0, 0)], 1 << 30));
    assert!(p.assigned(s, 0));
    assert!(p.assigned(s, 1));
    // Lead = 80 ms RTT + 20 ms jitter = 100 ms: 100 records, 10 000 bytes.
    let d = p.depth(s, 0);
    assert_eq!((d.records, d.bytes), (100, 10_000));
    // Not hot: no buffer.
    assert_eq!(p.depth(s, 1).bytes, 0);
    assert_eq!(p.depth(s, 7).bytes, 0);
    assert!(p.priority(s, 0) > p.priority(s, 1));
    assert_eq!(p.priority(s, 0), stream_priority(100_000));
}

#[test]
fn budget_is_split_by_predicted_bytes() {
    let mut c = PrefetchConfig::default();
    c.budget_bytes = 30_000;
    c.jitter_margin = Duration::ZERO;
    let mut p = PrefetchPlanner::new(c);
    let s = SubKey(1);
    p.set_rtt(s, Duration::from_secs(1));
    // Wants 100 000 and 50 000 bytes; budget 30 000 split 2:1.
    p.update_forecast(s, &forecast(&[(0, 100, 100_000), (1, 50, 50_000)], 1 << 30));
    p.assigned(s, 0);
    p.assigned(s, 1);
    assert_eq!(p.depth(s, 0).bytes, 20_000);
    assert_eq!(p.depth(s, 0).records, 20);
    assert_eq!(p.depth(s, 1).bytes, 10_000);
    assert_eq!(p.allocated_bytes(), 30_000);
    p.revoked(s, 0);
    // Alone, partition 1 wants 50 000 > 30 000: it gets the whole budget.
    assert_eq!(p.depth(s, 1).bytes, 30_000);
    p.remove_sub(s);
    assert_eq!(p.allocated_bytes(), 0);
}

#[test]
fn warm_up_on_new_assignment_only() {
    let mut p = PrefetchPlanner::new(PrefetchConfig::default());
    let s = SubKey(1);
    assert!(p.assigned(s, 3));
    // No forecast yet: only the warm-up batch may go.
    assert_eq!(p.push_allowance(s, 3, 1 << 20, 1000).records, 32);
    p.on_pushed(s, 3, 20);
    assert_eq!(p.push_allowance(s, 3, 1 << 20, 1000).records, 12);
    p.on_pushed(s, 3, 12);
    assert_eq!(p.push_allowance(s, 3, 1 << 20, 1000).records, 0);
    // Assigned again (same assignment re-sent): no new warm-up; a forecast does not either.
    assert!(!p.assigned(s, 3));
    p.update_forecast(s, &forecast(&[(3, 0, 0)], 1 << 20));
    assert_eq!(p.warmup_left(s, 3), 0);
    // Revoked then assigned again: newly assigned, warm-up again.
    p.revoked(s, 3);
    assert!(p.assigned(s, 3));
    assert_eq!(p.warmup_left(s, 3), 32);
    // Not assigned: nothing.
    assert_eq!(p.push_allowance(s, 9, 1 << 20, 1000).records, 0);
}

#[test]
fn deviation_flags_a_stalled_consumer_once_per_forecast() {
    let t0 = Instant::now();
    let mut d = DeviationTracker::new(DeviationConfig::default());
    let (s, part) = (SubKey(1), 0);
    d.predict(s, part, 100.0, t0);
    d.position(s, part, 0, t0);
    // First window: 500 records in 5 s = 100/s, on forecast.
    d.position(s, part, 500, t0 + Duration::from_secs(4));
    assert_eq!(d.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    d.handle_timeout(t0 + Duration::from_secs(5));
    assert_eq!(d.actual(s, part), Some(100.0));
    assert_eq!(d.poll_flagged(), None);
    // Then the consumer stalls: two windows at 0/s → flagged once.
    d.handle_timeout(t0 + Duration::from_secs(10));
    assert_eq!(d.poll_flagged(), None);
    d.handle_timeout(t0 + Duration::from_secs(15));
    let f = d.poll_flagged().expect("flagged");
    assert_eq!(
        (f.sub, f.partition, f.predicted, f.actual),
        (s, part, 100.0, 0.0)
    );
    d.handle_timeout(t0 + Duration::from_secs(20));
    assert_eq!(d.poll_flagged(), None);
    // A new forecast re-arms it.
    d.predict(s, part, 0.0, t0 + Duration::from_secs(20));
    d.handle_timeout(t0 + Duration::from_secs(30));
    assert_eq!(d.poll_flagged(), None);
    d.remove(s, part);
    assert_eq!(d.poll_timeout(), None);
}

#[test]
fn small_deviation_is_not_flagged() {
    let t0 = Instant::now();
    let mut d = DeviationTracker::new(DeviationConfig::default());
    let s = SubKey(2);
    d.predict(s, 0, 100.0, t0);
    d.position(s, 0, 0, t0);
    for w in 1..=10u32 {
        // 130/s: 30 % off, under the 50 % threshold.
        d.position(
            s,
            0,
            u64::from(w) * 650,
            t0 + Duration::from_secs(u64::from(w) * 5),
        );
    }
    assert_eq!(d.poll_flagged(), None);
    assert_eq!(d.actual(s, 0), Some(130.0));
}

proptest! {
    #[test]
    fn never_exceeds_buffer_grant_or_budget(
        budget in 0u64..1_000_000,
        rtt_ms in 0u64..500,
        subs in proptest::collection::vec(
            (proptest::collection::vec((0u32..8, 0u64..10_000, 0u64..5_000_000), 0..8), 0u64..1 << 24),
            1..5,
        ),
        free in 0u64..1 << 24,
        grant in 0u64..10_000,
    ) {
        let mut c = PrefetchConfig::default();
        c.budget_bytes = budget;
        let mut p = PrefetchPlanner::new(c);
        for (i, (rates, advertised)) in subs.iter().enumerate() {
            let s = SubKey(i as u64);
            p.set_rtt(s, Duration::from_millis(rtt_ms));
            p.update_forecast(s, &forecast(rates, *advertised));
            for &(part, _, _) in rates {
                p.assigned(s, part);
            }
        }
        prop_assert!(p.allocated_bytes() <= budget);
        for (i, (rates, advertised)) in subs.iter().enumerate() {
            let s = SubKey(i as u64);
            for &(part, _, _) in rates {
                let a = p.push_allowance(s, part, free, grant);
                prop_assert!(a.records <= grant);
                prop_assert!(a.bytes <= free && a.bytes <= *advertised);
                prop_assert!(p.depth(s, part).bytes <= budget);
            }
        }
    }
}
