//! Partition assignment: which member of a subscription group owns which partition.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sibyl_proto::frame::AssignedPartition;

use super::{PartitionLoad, stream_priority};

/// One member of a group: a shard names its group subscriptions with these on its store
/// link, and the hub names the members of each [`GroupAssigner`] with its own.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct MemberId(pub u64);

/// Caller misuse of [`GroupAssigner`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AssignError {
    /// The member is not in the group.
    #[error("unknown member {0:?}")]
    UnknownMember(MemberId),
    /// The member already joined.
    #[error("member {0:?} already joined")]
    AlreadyMember(MemberId),
    /// Capacity must be finite and > 0.
    #[error("capacity must be finite and > 0")]
    InvalidCapacity,
}

/// Configuration of [`GroupAssigner`]. Every field has a documented default.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GroupConfig {
    /// A partition being handed over waits at most this long for the previous owner's final
    /// `Position`; then it moves on from the last position known (at-least-once: the new
    /// owner may see records the old one already consumed). Default 10 s.
    pub revoke_timeout: Duration,
    /// A rebalancing move must reduce the total imbalance by more than this fraction of the
    /// mean partition load (hysteresis against forecast noise). Default 0.05.
    pub min_gain: f64,
    /// Every partition weighs at least this many records/s, so idle partitions are spread by
    /// count. Default 0.1.
    pub min_load: f64,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            revoke_timeout: Duration::from_secs(10),
            min_gain: 0.05,
            min_load: 0.1,
        }
    }
}

/// Where a partition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionState {
    /// Nobody owns it (no member, or its owner left); placed at the next rebalance.
    Unowned,
    /// Exactly one member receives it.
    Owned(MemberId),
    /// Being handed over: `from` no longer has it in its assignment but its final position
    /// is not known yet; `to` (if still a member) gets it once it is. Nobody receives it.
    Revoking {
        /// The previous owner.
        from: MemberId,
        /// The planned next owner, if it has not left.
        to: Option<MemberId>,
    },
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Unowned,
    Owned(MemberId),
    Revoking {
        from: MemberId,
        to: Option<MemberId>,
        deadline: Instant,
    },
}

#[derive(Debug, Clone)]
struct Member {
    capacity: f64,
    epoch: u64,
    sent: Option<Vec<AssignedPartition>>,
}

/// A member's new assignment, to send as an `Assignment` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberAssignment {
    /// The member.
    pub member: MemberId,
    /// Strictly increasing per member (first is 1).
    pub epoch: u64,
    /// The full set of partitions it now owns, highest priority first.
    pub partitions: Vec<AssignedPartition>,
}

/// Rate-aware, sticky partition assignment for one stream's subscription group (a lone
/// subscriber is a group of one).
///
/// Call order (`now` never moves backwards): [`join`](Self::join) /
/// [`leave`](Self::leave) / [`update_forecast`](Self::update_forecast) /
/// [`position_known`](Self::position_known) as events arrive, [`handle_timeout`](Self::handle_timeout)
/// at [`poll_timeout`](Self::poll_timeout); after each, drain
/// [`poll_assignments`](Self::poll_assignments) and send each member its `Assignment`.
///
/// # Policy
///
/// - **Load**: a partition weighs its latest predicted records/s (from its owner's
///   `Forecast`; partitions nobody predicted weigh the mean of the known ones), at least
///   `min_load`. A member's *target* is the total load × its share of the group's capacity,
///   so a faster member gets more or hotter partitions.
/// - **Placement**: unowned partitions go, hottest first, to the member furthest below its
///   target.
/// - **Rebalancing** (sticky): a partition moves from `d` to `u` only if `d` stays at or
///   above its target without it, or `u` stays at or below its target with it (someone is
///   out of balance by at least that partition), and the move reduces the total absolute
///   deviation from targets by more than `min_gain` × mean load; the best such move is taken
///   repeatedly until none is left. With equal loads this takes
///   [`minimal_moves`] moves (the balance deficit). Members not involved keep everything.
/// - **Handover**: a moving partition is `Revoking` — removed from the old owner's
///   assignment at once, added to the new owner's only when the old owner's final position is
///   known ([`position_known`](Self::position_known)), it leaves, or `revoke_timeout` passes.
///   So no partition is ever in two members' assignments.
#[derive(Debug, Clone)]
pub struct GroupAssigner {
    config: GroupConfig,
    slots: BTreeMap<u32, Slot>,
    loads: BTreeMap<u32, (f64, u64)>,
    positions: BTreeMap<u32, u64>,
    members: BTreeMap<MemberId, Member>,
    moves: u64,
}

impl GroupAssigner {
    /// A group over the stream's partitions, with no member yet.
    pub fn new(partitions: impl IntoIterator<Item = u32>, config: GroupConfig) -> Self {
        Self {
            config,
            slots: partitions.into_iter().map(|p| (p, Slot::Unowned)).collect(),
            loads: BTreeMap::new(),
            positions: BTreeMap::new(),
            members: BTreeMap::new(),
            moves: 0,
        }
    }

    /// Seeds the first offset of a partition nobody has reported a position for (resolve
    /// the subscription's `Start` to offsets before the first assignment). Default 0.
    pub fn set_start_offset(&mut self, partition: u32, offset: u64) {
        self.positions.entry(partition).or_insert(offset);
    }

    /// A member joins with its consumption capacity (records/s, measured or predicted; only
    /// ratios between members matter).
    pub fn join(
        &mut self,
        member: MemberId,
        capacity: f64,
        now: Instant,
    ) -> Result<(), AssignError> {
        check_capacity(capacity)?;
        if self.members.contains_key(&member) {
            return Err(AssignError::AlreadyMember(member));
        }
        self.members.insert(
            member,
            Member {
                capacity,
                epoch: 0,
                sent: None,
            },
        );
        self.rebalance(now);
        Ok(())
    }

    /// Updates a member's capacity.
    pub fn set_capacity(
        &mut self,
        member: MemberId,
        capacity: f64,
        now: Instant,
    ) -> Result<(), AssignError> {
        check_capacity(capacity)?;
        self.members
            .get_mut(&member)
            .ok_or(AssignError::UnknownMember(member))?
            .capacity = capacity;
        self.rebalance(now);
        Ok(())
    }

    /// A member leaves: its partitions are re-placed (from their last known positions), and
    /// handovers it was receiving wait for a new target.
    pub fn leave(&mut self, member: MemberId, now: Instant) -> Result<(), AssignError> {
        if self.members.remove(&member).is_none() {
            return Err(AssignError::UnknownMember(member));
        }
        for slot in self.slots.values_mut() {
            *slot = match *slot {
                Slot::Owned(m) if m == member => Slot::Unowned,
                Slot::Revoking { from, to, .. } if from == member => {
                    to.map_or(Slot::Unowned, Slot::Owned)
                }
                Slot::Revoking {
                    from,
                    to: Some(t),
                    deadline,
                } if t == member => Slot::Revoking {
                    from,
                    to: None,
                    deadline,
                },
                s => s,
            };
        }
        self.rebalance(now);
        Ok(())
    }

    /// A member's `Forecast` as partition loads: updates the load of the partitions it owns
    /// (and of partitions nobody has predicted yet), then rebalances.
    pub fn update_forecast(
        &mut self,
        member: MemberId,
        loads: &[PartitionLoad],
        now: Instant,
    ) -> Result<(), AssignError> {
        if !self.members.contains_key(&member) {
            return Err(AssignError::UnknownMember(member));
        }
        for pf in loads {
            let owned =
                matches!(self.slots.get(&pf.partition), Some(Slot::Owned(m)) if *m == member);
            let unknown =
                self.slots.contains_key(&pf.partition) && !self.loads.contains_key(&pf.partition);
            if owned || unknown {
                self.loads
                    .insert(pf.partition, (pf.records_per_s as f64, pf.bytes_per_s));
            }
        }
        self.rebalance(now);
        Ok(())
    }

    /// A member reported the next offset it will consume on a partition (`Position`). From
    /// the owner it is recorded; from the previous owner of a partition being handed over it
    /// completes the handover. Returns false (and changes nothing) from anyone else: a stale
    /// or misbehaving report.
    pub fn position_known(
        &mut self,
        member: MemberId,
        partition: u32,
        offset: u64,
        now: Instant,
    ) -> bool {
        match self.slots.get(&partition).copied() {
            Some(Slot::Owned(m)) if m == member => {
                self.positions.insert(partition, offset);
                true
            }
            Some(Slot::Revoking { from, to, .. }) if from == member => {
                self.positions.insert(partition, offset);
                self.slots
                    .insert(partition, to.map_or(Slot::Unowned, Slot::Owned));
                self.rebalance(now);
                true
            }
            _ => false,
        }
    }

    /// The earliest handover deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.slots
            .values()
            .filter_map(|s| match s {
                Slot::Revoking { deadline, .. } => Some(*deadline),
                _ => None,
            })
            .min()
    }

    /// Completes handovers whose deadline passed, from the last known positions.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut changed = false;
        for slot in self.slots.values_mut() {
            if let Slot::Revoking { to, deadline, .. } = *slot
                && deadline <= now
            {
                *slot = to.map_or(Slot::Unowned, Slot::Owned);
                changed = true;
            }
        }
        if changed {
            self.rebalance(now);
        }
    }

    /// Assignments that changed since the last call (set, start offsets of new partitions,
    /// or priorities), one per member, with a fresh epoch. New members always get one.
    pub fn poll_assignments(&mut self) -> Vec<MemberAssignment> {
        let mut out = Vec::new();
        let ids: Vec<MemberId> = self.members.keys().copied().collect();
        for id in ids {
            let list = self.assignment_of(id);
            // `id` comes from `members` just above.
            let Some(m) = self.members.get_mut(&id) else {
                continue;
            };
            let same_set = m.sent.as_ref().is_some_and(|s| {
                s.len() == list.len()
                    && s.iter()
                        .zip(&list)
                        .all(|(a, b)| a.partition == b.partition && a.priority == b.priority)
            });
            if !same_set {
                m.epoch += 1;
                m.sent = Some(list.clone());
                out.push(MemberAssignment {
                    member: id,
                    epoch: m.epoch,
                    partitions: list,
                });
            }
        }
        out
    }

    fn assignment_of(&self, member: MemberId) -> Vec<AssignedPartition> {
        let mut list: Vec<AssignedPartition> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Owned(m) if *m == member))
            .map(|(&p, _)| AssignedPartition {
                partition: p,
                start_offset: self.positions.get(&p).copied().unwrap_or(0),
                priority: self.loads.get(&p).map_or(0, |l| stream_priority(l.1)),
            })
            .collect();
        list.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.partition.cmp(&b.partition))
        });
        list
    }

    /// Where a partition stands (`None`: not in this stream).
    pub fn state(&self, partition: u32) -> Option<PartitionState> {
        self.slots.get(&partition).map(|s| match *s {
            Slot::Unowned => PartitionState::Unowned,
            Slot::Owned(m) => PartitionState::Owned(m),
            Slot::Revoking { from, to, .. } => PartitionState::Revoking { from, to },
        })
    }

    /// The member that receives a partition now, if any.
    pub fn owner(&self, partition: u32) -> Option<MemberId> {
        match self.slots.get(&partition) {
            Some(Slot::Owned(m)) => Some(*m),
            _ => None,
        }
    }

    /// Planned owners: the owner, or the target of a handover in progress.
    pub fn planned_owners(&self) -> BTreeMap<u32, MemberId> {
        self.slots
            .iter()
            .filter_map(|(&p, s)| match *s {
                Slot::Owned(m) | Slot::Revoking { to: Some(m), .. } => Some((p, m)),
                _ => None,
            })
            .collect()
    }

    /// Members and their capacities.
    pub fn members(&self) -> BTreeMap<MemberId, f64> {
        self.members
            .iter()
            .map(|(&id, m)| (id, m.capacity))
            .collect()
    }

    /// The stream's partitions.
    pub fn partitions(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.keys().copied()
    }

    /// Partition moves decided so far (placements of unowned partitions included).
    pub fn moves(&self) -> u64 {
        self.moves
    }

    fn load(&self, partition: u32, default: f64) -> f64 {
        self.loads
            .get(&partition)
            .map_or(default, |l| l.0)
            .max(self.config.min_load)
    }

    fn rebalance(&mut self, now: Instant) {
        if self.members.is_empty() {
            return;
        }
        let known: Vec<f64> = self
            .slots
            .keys()
            .filter_map(|p| self.loads.get(p).map(|l| l.0))
            .collect();
        let default = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let weight: BTreeMap<u32, f64> = self
            .slots
            .keys()
            .map(|&p| (p, self.load(p, default)))
            .collect();
        let total: f64 = weight.values().sum();
        let cap_sum: f64 = self.members.values().map(|m| m.capacity).sum();
        let target: BTreeMap<MemberId, f64> = self
            .members
            .iter()
            .map(|(&id, m)| (id, total * m.capacity / cap_sum))
            .collect();
        let mut held: BTreeMap<MemberId, f64> = self.members.keys().map(|&id| (id, 0.0)).collect();
        for (p, s) in &self.slots {
            if let Slot::Owned(m) | Slot::Revoking { to: Some(m), .. } = *s
                && let Some(h) = held.get_mut(&m)
            {
                *h += weight[p];
            }
        }
        let eps = 1e-9 * total.max(1.0);
        // The member furthest below target (ties: lowest id), excluding `not`.
        let neediest = |held: &BTreeMap<MemberId, f64>, not: Option<MemberId>| {
            held.iter()
                .filter(|(id, _)| Some(**id) != not)
                .map(|(&id, &h)| (id, target[&id] - h))
                .fold(None::<(MemberId, f64)>, |best, (id, d)| match best {
                    Some((_, bd)) if bd >= d - eps => best,
                    _ => Some((id, d)),
                })
        };

        // 1. Place unowned partitions, hottest first.
        let mut orphans: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Unowned))
            .map(|(&p, _)| p)
            .collect();
        orphans.sort_by(|a, b| weight[b].total_cmp(&weight[a]).then(a.cmp(b)));
        for p in orphans {
            if let Some((u, _)) = neediest(&held, None) {
                self.slots.insert(p, Slot::Owned(u));
                *held.entry(u).or_default() += weight[&p];
                self.moves += 1;
            }
        }

        // 2. Improving moves, best first; each partition moves at most once per rebalance
        //    (a moved partition is Revoking, hence not a candidate), so this terminates.
        let mean = total / self.slots.len().max(1) as f64;
        let min_gain = self.config.min_gain * mean;
        loop {
            let mut best: Option<(f64, u32, MemberId, MemberId)> = None;
            for (&p, s) in &self.slots {
                let Slot::Owned(d) = *s else { continue };
                let Some((u, deficit)) = neediest(&held, Some(d)) else {
                    continue;
                };
                let w = weight[&p];
                let hd = held[&d];
                let td = target[&d];
                let hu = target[&u] - deficit;
                let tu = target[&u];
                let donor_over = hd - w >= td - eps;
                let taker_under = hu + w <= tu + eps;
                if !(donor_over || taker_under) {
                    continue;
                }
                let gain =
                    (hd - td).abs() + (hu - tu).abs() - (hd - w - td).abs() - (hu + w - tu).abs();
                if gain > min_gain + eps && best.is_none_or(|b| gain > b.0 + eps) {
                    best = Some((gain, p, d, u));
                }
            }
            let Some((_, p, d, u)) = best else { break };
            self.slots.insert(
                p,
                Slot::Revoking {
                    from: d,
                    to: Some(u),
                    deadline: now + self.config.revoke_timeout,
                },
            );
            let w = weight[&p];
            *held.entry(d).or_default() -= w;
            *held.entry(u).or_default() += w;
            self.moves += 1;
        }
    }
}

fn check_capacity(capacity: f64) -> Result<(), AssignError> {
    if capacity.is_finite() && capacity > 0.0 {
        Ok(())
    } else {
        Err(AssignError::InvalidCapacity)
    }
}

/// Partitions that have an owner in `after` other than their owner in `before` (or had
/// none): the moves between two ownership snapshots. Losing an owner without gaining one (the
/// last member left) is not a move.
pub fn moved(before: &BTreeMap<u32, MemberId>, after: &BTreeMap<u32, MemberId>) -> usize {
    after
        .iter()
        .filter(|(p, m)| before.get(p) != Some(m))
        .count()
}

/// The fewest moves that balance `partitions` (equal loads) across `members` (by capacity),
/// starting from the owners in `before`: the balance deficit.
///
/// Each member `m` should end with `floor(t_m)` to `ceil(t_m)` partitions, `t_m = N·c_m/Σc`.
/// Partitions without a member owner (`before` has none, or it is not in `members`) must move,
/// as must everything a member holds above `ceil(t_m)`; every member below `floor(t_m)` must
/// receive. One move can do one of each, so the minimum is the larger of the two sums.
pub fn minimal_moves(
    before: &BTreeMap<u32, MemberId>,
    members: &BTreeMap<MemberId, f64>,
    partitions: &BTreeSet<u32>,
) -> usize {
    if members.is_empty() {
        return 0;
    }
    let n = partitions.len() as f64;
    let cap_sum: f64 = members.values().sum();
    let mut have: BTreeMap<MemberId, usize> = members.keys().map(|&m| (m, 0)).collect();
    let mut orphans = 0usize;
    for p in partitions {
        match before.get(p).and_then(|m| have.get_mut(m)) {
            Some(h) => *h += 1,
            None => orphans += 1,
        }
    }
    let (mut over, mut under) = (orphans, 0usize);
    for (m, &c) in members {
        let t = n * c / cap_sum;
        let h = have[m];
        let ceil = (t - 1e-9).ceil().max(0.0) as usize;
        let floor = (t + 1e-9).floor().max(0.0) as usize;
        over += h.saturating_sub(ceil);
        under += floor.saturating_sub(h);
    }
    over.max(under)
}
