//! Group assignment: ownership, stickiness, handover and rate-awareness, over random
//! membership and forecast sequences.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sibyl_gateway::predict::{
    AssignError, GroupAssigner, GroupConfig, MemberId, PartitionLoad, PartitionState,
    minimal_moves, moved,
};

/// What each member's client currently believes it owns (from the Assignments it received).
#[derive(Default)]
struct Clients {
    views: BTreeMap<MemberId, BTreeSet<u32>>,
    epochs: BTreeMap<MemberId, u64>,
}

impl Clients {
    fn drain(&mut self, g: &mut GroupAssigner) {
        self.epochs.retain(|m, _| g.members().contains_key(m));
        for a in g.poll_assignments() {
            let last = self.epochs.insert(a.member, a.epoch).unwrap_or(0);
            assert!(a.epoch > last, "epoch must increase");
            let prios: Vec<i32> = a.partitions.iter().map(|p| p.priority).collect();
            assert!(
                prios.windows(2).all(|w| w[0] >= w[1]),
                "highest priority first"
            );
            self.views
                .insert(a.member, a.partitions.iter().map(|p| p.partition).collect());
        }
        // A member that left and joins again is a new subscription: its epochs restart.
        self.views.retain(|m, _| g.members().contains_key(m));
        self.epochs.retain(|m, _| g.members().contains_key(m));
        // Never two owners at once, as the clients see it.
        let mut seen = BTreeSet::new();
        for v in self.views.values() {
            for p in v {
                assert!(seen.insert(*p), "partition {p} in two assignments");
            }
        }
        // The clients' views are exactly the assigner's owners.
        for p in g.partitions() {
            let holder = self
                .views
                .iter()
                .find(|(_, v)| v.contains(&p))
                .map(|(m, _)| *m);
            assert_eq!(holder, g.owner(p), "partition {p}");
        }
    }
}

fn forecast(rates: &[(u32, u64)]) -> Vec<PartitionLoad> {
    rates
        .iter()
        .map(|&(partition, r)| PartitionLoad {
            partition,
            records_per_s: r,
            bytes_per_s: r * 100,
        })
        .collect()
}

/// Reports every pending handover's final position (the old owners' clients do so after
/// receiving the Assignment without the partition).
fn settle(g: &mut GroupAssigner, clients: &mut Clients, now: Instant) {
    for _ in 0..100 {
        clients.drain(g);
        let pending: Vec<(u32, MemberId)> = g
            .partitions()
            .filter_map(|p| match g.state(p) {
                Some(PartitionState::Revoking { from, .. }) => Some((p, from)),
                _ => None,
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        for (p, from) in pending {
            assert!(!clients.views.get(&from).is_some_and(|v| v.contains(&p)));
            // Each hand-over is one event: it may trigger a rebalance, which moves each
            // partition at most once.
            let moves_before = g.moves();
            assert!(g.position_known(from, p, 1000 + u64::from(p), now));
            assert!(g.moves() - moves_before <= g.partitions().count() as u64);
        }
    }
    panic!("did not settle");
}

fn assert_stable(g: &GroupAssigner) {
    if g.members().is_empty() {
        return;
    }
    for p in g.partitions() {
        let owner = g.owner(p).expect("every partition owned when stable");
        assert!(g.members().contains_key(&owner));
    }
}

fn counts(g: &GroupAssigner) -> BTreeMap<MemberId, usize> {
    let mut c: BTreeMap<MemberId, usize> = g.members().keys().map(|&m| (m, 0)).collect();
    for m in g.planned_owners().values() {
        *c.get_mut(m).unwrap() += 1;
    }
    c
}

#[test]
fn lone_subscriber_gets_everything_hottest_first() {
    let t0 = Instant::now();
    let mut g = GroupAssigner::new(0..4, GroupConfig::default());
    for p in 0..4 {
        g.set_start_offset(p, 10 * u64::from(p));
    }
    let m = MemberId(1);
    g.join(m, 100.0, t0).unwrap();
    let a = g.poll_assignments();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].epoch, 1);
    assert_eq!(a[0].partitions.len(), 4);
    assert_eq!(a[0].partitions[2].start_offset, 20);
    g.update_forecast(m, &forecast(&[(0, 1), (1, 1000), (2, 10), (3, 0)]), t0)
        .unwrap();
    let a = g.poll_assignments();
    assert_eq!(a[0].epoch, 2);
    let order: Vec<u32> = a[0].partitions.iter().map(|p| p.partition).collect();
    assert_eq!(order, vec![1, 2, 0, 3]);
    // Same priorities again: nothing to send.
    g.update_forecast(m, &forecast(&[(0, 1), (1, 1001), (2, 10), (3, 0)]), t0)
        .unwrap();
    assert!(g.poll_assignments().is_empty());
}

#[test]
fn faster_member_gets_more_and_hotter_partitions() {
    let t0 = Instant::now();
    let mut g = GroupAssigner::new(0..8, GroupConfig::default());
    let (slow, fast) = (MemberId(1), MemberId(2));
    g.join(slow, 1.0, t0).unwrap();
    g.join(fast, 3.0, t0).unwrap();
    let mut c = Clients::default();
    settle(&mut g, &mut c, t0);
    assert_eq!(counts(&g), BTreeMap::from([(slow, 2), (fast, 6)]));
    // One hot partition (700 of 1400 records/s): forecasts shift load.
    let rates: Vec<(u32, u64)> = (0..8)
        .map(|p| (p, if p == 0 { 700 } else { 100 }))
        .collect();
    g.update_forecast(slow, &forecast(&rates), t0).unwrap();
    g.update_forecast(fast, &forecast(&rates), t0).unwrap();
    settle(&mut g, &mut c, t0);
    let load = |m: MemberId| -> u64 {
        g.planned_owners()
            .iter()
            .filter(|(_, o)| **o == m)
            .map(|(p, _)| if *p == 0 { 700 } else { 100 })
            .sum()
    };
    // Targets 350 and 1050: the fast member holds the hot partition.
    assert_eq!(g.owner(0), Some(fast));
    assert_eq!((load(slow), load(fast)), (300, 1100));
}

#[test]
fn handover_waits_for_final_position_or_timeout() {
    let t0 = Instant::now();
    let mut g = GroupAssigner::new(0..4, GroupConfig::default());
    let (a, b) = (MemberId(1), MemberId(2));
    g.join(a, 1.0, t0).unwrap();
    g.poll_assignments();
    g.join(b, 1.0, t0).unwrap();
    let out = g.poll_assignments();
    // `a` loses two partitions now; `b` gets an empty assignment until they are handed over.
    let of = |m: MemberId| out.iter().find(|x| x.member == m).unwrap().partitions.len();
    assert_eq!((of(a), of(b)), (2, 0));
    let revoking: Vec<u32> = (0..4)
        .filter(|&p| matches!(g.state(p), Some(PartitionState::Revoking { .. })))
        .collect();
    assert_eq!(revoking.len(), 2);
    assert_eq!(g.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    // A position from the wrong member is refused.
    assert!(!g.position_known(b, revoking[0], 5, t0));
    assert!(g.position_known(a, revoking[0], 77, t0));
    let out = g.poll_assignments();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].member, b);
    assert_eq!(out[0].partitions[0].partition, revoking[0]);
    assert_eq!(out[0].partitions[0].start_offset, 77);
    // The other handover times out and goes on from the last position known (0).
    g.handle_timeout(t0 + Duration::from_secs(9));
    assert!(g.poll_assignments().is_empty());
    g.handle_timeout(t0 + Duration::from_secs(10));
    let out = g.poll_assignments();
    assert_eq!(out[0].partitions.len(), 2);
    assert_eq!(g.poll_timeout(), None);
}

#[test]
fn leaving_owner_completes_handover_and_misuse_is_typed() {
    let t0 = Instant::now();
    let mut g = GroupAssigner::new(0..4, GroupConfig::default());
    let (a, b) = (MemberId(1), MemberId(2));
    g.join(a, 1.0, t0).unwrap();
    g.join(b, 1.0, t0).unwrap();
    g.leave(a, t0).unwrap();
    assert_stable(&g);
    assert_eq!(counts(&g), BTreeMap::from([(b, 4)]));
    assert_eq!(g.join(b, 1.0, t0), Err(AssignError::AlreadyMember(b)));
    assert_eq!(g.leave(a, t0), Err(AssignError::UnknownMember(a)));
    assert_eq!(g.join(a, 0.0, t0), Err(AssignError::InvalidCapacity));
    assert_eq!(g.join(a, f64::NAN, t0), Err(AssignError::InvalidCapacity));
    assert_eq!(
        g.update_forecast(a, &forecast(&[]), t0),
        Err(AssignError::UnknownMember(a))
    );
}

#[test]
fn forecast_noise_moves_nothing() {
    let t0 = Instant::now();
    let mut g = GroupAssigner::new(0..6, GroupConfig::default());
    let mut c = Clients::default();
    for m in 1..=3 {
        g.join(MemberId(m), 1.0, t0).unwrap();
    }
    settle(&mut g, &mut c, t0);
    let before = g.moves();
    for round in 0..20u64 {
        for m in 1..=3 {
            let rates: Vec<(u32, u64)> = (0..6)
                .map(|p| (p, 100 + (round * 7 + u64::from(p)) % 5))
                .collect();
            g.update_forecast(MemberId(m), &forecast(&rates), t0)
                .unwrap();
        }
    }
    assert_eq!(g.moves(), before);
}

#[test]
fn minimal_moves_by_hand() {
    let parts: BTreeSet<u32> = (0..10).collect();
    let (a, b, c) = (MemberId(1), MemberId(2), MemberId(3));
    let all_a: BTreeMap<u32, MemberId> = parts.iter().map(|&p| (p, a)).collect();
    // A alone holds 10; B and C join: targets 3.33 each → A keeps 4, 6 move.
    let members = BTreeMap::from([(a, 1.0), (b, 1.0), (c, 1.0)]);
    assert_eq!(minimal_moves(&all_a, &members, &parts), 6);
    // A leaves: its 10 are orphans.
    let members = BTreeMap::from([(b, 1.0), (c, 1.0)]);
    assert_eq!(minimal_moves(&all_a, &members, &parts), 10);
    // Balanced already.
    let even: BTreeMap<u32, MemberId> = parts
        .iter()
        .map(|&p| (p, if p < 5 { a } else { b }))
        .collect();
    assert_eq!(
        minimal_moves(&even, &BTreeMap::from([(a, 1.0), (b, 1.0)]), &parts),
        0
    );
    assert_eq!(moved(&all_a, &even), 5);
}

#[derive(Debug, Clone)]
enum Op {
    Join(u64, u8),
    Leave(u64),
    Forecast(u64, Vec<u16>),
    ReportPositions,
    Tick(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..6, 1u8..4).prop_map(|(m, c)| Op::Join(m, c)),
        2 => (0u64..6).prop_map(Op::Leave),
        2 => (0u64..6, proptest::collection::vec(0u16..2000, 16)).prop_map(|(m, r)| Op::Forecast(m, r)),
        2 => Just(Op::ReportPositions),
        1 => (1u8..15).prop_map(Op::Tick),
    ]
}

/// Runs ops; with `uniform` no forecasts are applied (equal loads) and every membership
/// change is checked against the balance deficit.
fn run_ops(n_parts: u32, ops: Vec<Op>, uniform: bool) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut g = GroupAssigner::new(0..n_parts, GroupConfig::default());
    let mut clients = Clients::default();
    let pool: BTreeSet<u32> = (0..n_parts).collect();
    for op in ops {
        let before = g.planned_owners();
        let moves_before = g.moves();
        let mut membership = false;
        let compound = matches!(op, Op::ReportPositions);
        match op {
            Op::Join(m, c) => {
                membership = g.join(MemberId(m), f64::from(c), now).is_ok();
            }
            Op::Leave(m) => {
                membership = g.leave(MemberId(m), now).is_ok();
            }
            Op::Forecast(m, rates) => {
                if !uniform {
                    let rates: Vec<(u32, u64)> = (0..n_parts)
                        .map(|p| (p, u64::from(rates[p as usize])))
                        .collect();
                    let _ = g.update_forecast(MemberId(m), &forecast(&rates), now);
                }
            }
            Op::ReportPositions => settle(&mut g, &mut clients, now),
            Op::Tick(s) => {
                now += Duration::from_secs(u64::from(s));
                g.handle_timeout(now);
            }
        }
        let after = g.planned_owners();
        // Bounded movement: a single event moves each partition at most once.
        // `ReportPositions` is a sequence of hand-over events; `settle` checks each of them.
        if !compound {
            assert!(g.moves() - moves_before <= u64::from(n_parts));
        }
        if uniform && membership {
            let min = minimal_moves(&before, &g.members(), &pool);
            let did = moved(&before, &after);
            assert!(did <= min + 1, "moved {did}, minimum {min}");
        }
        clients.drain(&mut g);
    }
    settle(&mut g, &mut clients, now);
    assert_stable(&g);
    if uniform && !g.members().is_empty() {
        // Balanced: each member within floor..=ceil of its capacity share.
        let caps = g.members();
        let total: f64 = caps.values().sum();
        for (m, have) in counts(&g) {
            let t = f64::from(n_parts) * caps[&m] / total;
            assert!(
                (have as f64) >= (t + 1e-9).floor() && (have as f64) <= (t - 1e-9).ceil(),
                "member {m:?} holds {have}, target {t}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn uniform_load_is_sticky_balanced_and_single_owner(
        n in 1u32..16,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run_ops(n, ops, true);
    }

    #[test]
    fn forecast_changes_keep_single_ownership(
        n in 1u32..16,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run_ops(n, ops, false);
    }
}

/// Found by `forecast_changes_keep_single_ownership`: after two members leave and one joins,
/// settling hands partitions over one by one, and the rebalance after each hand-over may move
/// a partition that an earlier hand-over placed. Every single event stays bounded, and the
/// group settles with every partition owned exactly once.
#[test]
fn settling_after_leaves_and_a_join_is_bounded_per_event() {
    let mut rates = vec![183, 39, 0, 266, 1875, 13, 604, 0, 1038];
    rates.resize(16, 0);
    run_ops(
        9,
        vec![
            Op::Join(2, 1),
            Op::Join(1, 1),
            Op::Join(5, 3),
            Op::Forecast(1, rates),
            Op::Leave(1),
            Op::Leave(5),
            Op::Join(0, 1),
            Op::ReportPositions,
        ],
        false,
    );
}
