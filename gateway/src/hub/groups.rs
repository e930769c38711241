//! The hub's consumer-group coordinator (I/O-free): one [`GroupAssigner`] per (stream,
//! group), members from every shard.
//!
//! ```text
//! shard links ──GroupJoin/Leave/Position/Forecast──▶ GroupCoordinator::{join, leave,
//!   position, forecast}(link, member, …, now)      link closed ─▶ link_closed(link, now)
//!                                                   deadline    ─▶ handle_timeout(now)
//!   ◀──GroupAssign{member, epoch, partitions}── poll_pushes()  (one per changed member)
//! ```
//!
//! A member is named by its link and the shard's own member id ([`LinkMember`]); the hub maps
//! it to a [`MemberId`] it never reuses, so ids of different shards, or of a shard restarted
//! on a new link, never collide. When a link closes (the shard crashed or was killed), every
//! member of that link leaves at once: its partitions move to the remaining members from the
//! last positions the hub knows (at-least-once for what was consumed after them).
//!
//! The async driver is the store link server
//! ([`StoreLinkServer`](crate::storelink::StoreLinkServer)); it calls these methods under one
//! lock and sends [`poll_pushes`](GroupCoordinator::poll_pushes) to each push's link in order.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::predict::{
    AssignError, GroupAssigner, GroupConfig, MemberId, PartitionLoad, PartitionState,
};

/// A shard link, numbered by the hub for as long as it runs (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

/// A group member as its shard names it: the link and the shard's member id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkMember {
    /// The shard's link.
    pub link: LinkId,
    /// The shard's member id (unique on that link).
    pub member: MemberId,
}

/// A member's new assignment, to push on its link as `GroupAssign`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPush {
    /// Who receives it.
    pub to: LinkMember,
    /// Strictly increasing per member.
    pub epoch: u64,
    /// `(partition, start_offset)`, ascending by partition: the member's complete set.
    pub partitions: Vec<(u32, u64)>,
}

/// What a relayed `Position` did ([`GroupCoordinator::position`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionReport {
    /// Neither the owner's position nor a final one of a hand-over (an unknown member, a
    /// partition it does not own, or one its shard still served): nothing changed.
    Stale,
    /// The owner's committed position: recorded (a later owner starts there).
    Recorded,
    /// The previous owner's final position: the hand-over completed (pushes may follow).
    HandedOver,
}

/// Misuse of the coordinator by a shard (the driver logs it and drops the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoordError {
    /// The member already joined on this link.
    #[error("member {0:?} already joined")]
    AlreadyMember(LinkMember),
    /// No such member on this link.
    #[error("unknown member {0:?}")]
    UnknownMember(LinkMember),
    /// The link has [`CoordConfig::max_members_per_link`] members already.
    #[error("too many group members on link {0:?}")]
    TooManyMembers(LinkId),
    /// A stream without partitions cannot be split.
    #[error("stream has no partitions")]
    NoPartitions,
    /// The assigner refused (an invariant of the coordinator broke).
    #[error(transparent)]
    Assign(#[from] AssignError),
}

/// Coordinator settings. Every field has a documented default.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CoordConfig {
    /// The assigners' settings; `revoke_timeout` is the hand-over deadline (the gateway sets
    /// it from `[subscribe] handover_timeout`). Default [`GroupConfig::default`].
    pub group: GroupConfig,
    /// Members one link may have at once; more joins are refused. Default 65 536.
    pub max_members_per_link: usize,
}

impl Default for CoordConfig {
    fn default() -> Self {
        Self {
            group: GroupConfig::default(),
            max_members_per_link: 65_536,
        }
    }
}

type GroupKey = (String, String);

struct Group {
    assigner: GroupAssigner,
    /// Each member's link name and the partition set last pushed to it.
    members: BTreeMap<MemberId, (LinkMember, Option<Vec<u32>>)>,
}

/// Every consumer group of the hub. See the [module docs](self).
///
/// Call order (`now` never moves backwards): the event methods as messages arrive,
/// [`handle_timeout`](Self::handle_timeout) at [`poll_timeout`](Self::poll_timeout); after
/// each, drain [`poll_pushes`](Self::poll_pushes).
pub struct GroupCoordinator {
    config: CoordConfig,
    groups: HashMap<GroupKey, Group>,
    members: HashMap<LinkMember, (GroupKey, MemberId)>,
    per_link: HashMap<LinkId, usize>,
    next_member: u64,
    out: Vec<GroupPush>,
}

impl std::fmt::Debug for GroupCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCoordinator")
            .field("groups", &self.groups.len())
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

impl GroupCoordinator {
    /// No group yet.
    pub fn new(config: CoordConfig) -> Self {
        Self {
            config,
            groups: HashMap::new(),
            members: HashMap::new(),
            per_link: HashMap::new(),
            next_member: 1,
            out: Vec::new(),
        }
    }

    /// `who` joins `group` of `stream` (which has `partitions` partitions). `starts` seeds the
    /// offsets of partitions the group has no position for (a new group starts where its
    /// first member's `Start` resolves). Members join with equal capacity; forecasts make the
    /// split rate-aware.
    pub fn join(
        &mut self,
        who: LinkMember,
        stream: &str,
        group: &str,
        partitions: u32,
        starts: &[(u32, u64)],
        now: Instant,
    ) -> Result<(), CoordError> {
        if self.members.contains_key(&who) {
            return Err(CoordError::AlreadyMember(who));
        }
        if partitions == 0 {
            return Err(CoordError::NoPartitions);
        }
        let on_link = self.per_link.entry(who.link).or_default();
        if *on_link >= self.config.max_members_per_link {
            return Err(CoordError::TooManyMembers(who.link));
        }
        *on_link += 1;
        let key = (stream.to_owned(), group.to_owned());
        let cfg = self.config.group.clone();
        let g = self.groups.entry(key.clone()).or_insert_with(|| Group {
            assigner: GroupAssigner::new(0..partitions, cfg),
            members: BTreeMap::new(),
        });
        for &(p, o) in starts {
            if p < partitions {
                g.assigner.set_start_offset(p, o);
            }
        }
        let id = MemberId(self.next_member);
        self.next_member += 1;
        g.members.insert(id, (who, None));
        self.members.insert(who, (key.clone(), id));
        // A fresh id with capacity 1.0: cannot fail.
        g.assigner.join(id, 1.0, now)?;
        self.dispatch(&key);
        Ok(())
    }

    /// `who` left: its partitions move on from their last known positions.
    pub fn leave(&mut self, who: LinkMember, now: Instant) -> Result<(), CoordError> {
        let (key, id) = self
            .members
            .remove(&who)
            .ok_or(CoordError::UnknownMember(who))?;
        if let Some(n) = self.per_link.get_mut(&who.link) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_link.remove(&who.link);
            }
        }
        let Some(g) = self.groups.get_mut(&key) else {
            return Ok(());
        };
        g.members.remove(&id);
        let r = g.assigner.leave(id, now);
        if g.members.is_empty() {
            // The group's positions go with it: a group nobody consumes restarts from its
            // next first member's `Start`.
            self.groups.remove(&key);
        } else {
            self.dispatch(&key);
        }
        r.map_err(CoordError::from)
    }

    /// A link closed (its shard crashed, was killed or restarted): all its members leave.
    /// Returns how many did.
    pub fn link_closed(&mut self, link: LinkId, now: Instant) -> usize {
        let gone: Vec<LinkMember> = self
            .members
            .keys()
            .filter(|m| m.link == link)
            .copied()
            .collect();
        // Nothing is pushed to a member that is about to leave.
        for m in &gone {
            if let Some((key, id)) = self.members.get(m)
                && let Some(g) = self.groups.get_mut(key)
            {
                g.members.remove(id);
            }
        }
        for m in &gone {
            let _ = self.leave(*m, now);
        }
        self.per_link.remove(&link);
        gone.len()
    }

    /// The member's client reported `Position`; `serving` says whether its shard still
    /// sends it the partition (had not applied a revocation yet when the report arrived).
    /// Recorded if the member owns the partition; completes a hand-over if the member is the
    /// partition's previous owner and its shard no longer serves it (so the report is the
    /// client's position after the revocation, not an earlier one overtaking it).
    pub fn position(
        &mut self,
        who: LinkMember,
        partition: u32,
        next_offset: u64,
        serving: bool,
        now: Instant,
    ) -> PositionReport {
        let Some((key, id)) = self.members.get(&who).cloned() else {
            return PositionReport::Stale;
        };
        let Some(g) = self.groups.get_mut(&key) else {
            return PositionReport::Stale;
        };
        match g.assigner.state(partition) {
            Some(PartitionState::Owned(m)) if m == id => {
                g.assigner.position_known(id, partition, next_offset, now);
                PositionReport::Recorded
            }
            Some(PartitionState::Revoking { from, .. }) if from == id && !serving => {
                g.assigner.position_known(id, partition, next_offset, now);
                self.dispatch(&key);
                PositionReport::HandedOver
            }
            _ => PositionReport::Stale,
        }
    }

    /// The member's client sent a `Forecast`: its partition loads become the loads of the
    /// partitions it owns (and of those nobody predicted yet); rebalances.
    pub fn forecast(
        &mut self,
        who: LinkMember,
        loads: &[PartitionLoad],
        now: Instant,
    ) -> Result<(), CoordError> {
        let (key, id) = self
            .members
            .get(&who)
            .cloned()
            .ok_or(CoordError::UnknownMember(who))?;
        let Some(g) = self.groups.get_mut(&key) else {
            return Err(CoordError::UnknownMember(who));
        };
        g.assigner.update_forecast(id, loads, now)?;
        self.dispatch(&key);
        Ok(())
    }

    /// The earliest hand-over deadline of any group.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.groups
            .values()
            .filter_map(|g| g.assigner.poll_timeout())
            .min()
    }

    /// Completes the hand-overs whose deadline passed (from the last known positions).
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<GroupKey> = self
            .groups
            .iter()
            .filter(|(_, g)| g.assigner.poll_timeout().is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(g) = self.groups.get_mut(&key) {
                g.assigner.handle_timeout(now);
            }
            self.dispatch(&key);
        }
    }

    /// Assignments to push since the last call, in the order they were decided.
    pub fn poll_pushes(&mut self) -> Vec<GroupPush> {
        std::mem::take(&mut self.out)
    }

    /// Members across all groups.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Groups with at least one member.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// The partitions a member owns now (empty for an unknown member).
    pub fn owned(&self, who: LinkMember) -> Vec<u32> {
        let Some((key, id)) = self.members.get(&who) else {
            return Vec::new();
        };
        let Some(g) = self.groups.get(key) else {
            return Vec::new();
        };
        g.assigner
            .partitions()
            .filter(|&p| g.assigner.owner(p) == Some(*id))
            .collect()
    }

    /// Queues the group's changed partition sets. A change of priorities alone is not pushed
    /// (shards follow their own pre-fetch planner's priorities).
    fn dispatch(&mut self, key: &GroupKey) {
        let Some(g) = self.groups.get_mut(key) else {
            return;
        };
        for a in g.assigner.poll_assignments() {
            let Some((who, sent)) = g.members.get_mut(&a.member) else {
                continue;
            };
            let mut partitions: Vec<(u32, u64)> = a
                .partitions
                .iter()
                .map(|p| (p.partition, p.start_offset))
                .collect();
            partitions.sort_unstable();
            let set: Vec<u32> = partitions.iter().map(|p| p.0).collect();
            if sent.as_ref() == Some(&set) {
                continue;
            }
            *sent = Some(set);
            self.out.push(GroupPush {
                to: *who,
                epoch: a.epoch,
                partitions,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn m(link: u64, member: u64) -> LinkMember {
        LinkMember {
            link: LinkId(link),
            member: MemberId(member),
        }
    }

    fn coord() -> GroupCoordinator {
        GroupCoordinator::new(CoordConfig {
            group: GroupConfig {
                revoke_timeout: Duration::from_secs(5),
                ..GroupConfig::default()
            },
            ..CoordConfig::default()
        })
    }

    /// The latest pushed set of each member.
    fn apply(latest: &mut BTreeMap<LinkMember, Vec<(u32, u64)>>, pushes: Vec<GroupPush>) {
        for p in pushes {
            latest.insert(p.to, p.partitions);
        }
    }

    /// No partition is in two members' latest sets.
    fn disjoint(latest: &BTreeMap<LinkMember, Vec<(u32, u64)>>) -> BTreeSet<u32> {
        let mut all = BTreeSet::new();
        for set in latest.values() {
            for (p, _) in set {
                assert!(all.insert(*p), "partition {p} owned twice: {latest:?}");
            }
        }
        all
    }

    #[test]
    fn members_on_two_links_split_with_a_handover_at_the_committed_position() {
        let t0 = Instant::now();
        let mut c = coord();
        let mut latest = BTreeMap::new();
        let (a, b) = (m(1, 1), m(2, 1)); // same shard-local id on two links
        c.join(a, "s", "g", 4, &[(0, 10), (1, 11), (2, 12), (3, 13)], t0)
            .unwrap();
        let first = c.poll_pushes();
        assert_eq!(
            first,
            vec![GroupPush {
                to: a,
                epoch: 1,
                partitions: vec![(0, 10), (1, 11), (2, 12), (3, 13)],
            }]
        );
        apply(&mut latest, first);
        for p in 0..4 {
            let r = c.position(a, p, 100 + u64::from(p), true, t0);
            assert_eq!(r, PositionReport::Recorded);
        }
        assert!(c.poll_pushes().is_empty(), "positions alone change nothing");
        // B's starts are ignored: the group exists.
        c.join(b, "s", "g", 4, &[(0, 0), (1, 0), (2, 0), (3, 0)], t0)
            .unwrap();
        let pushes = c.poll_pushes();
        apply(&mut latest, pushes);
        assert_eq!(latest[&a].len(), 2);
        assert!(latest[&b].is_empty(), "B waits for A's final positions");
        disjoint(&latest);
        let revoked: Vec<u32> = (0..4)
            .filter(|p| !latest[&a].iter().any(|(q, _)| q == p))
            .collect();
        // B's early report on a partition it does not own is stale, and so is one of A's
        // sent while its shard still served the partition (it overtook the revocation).
        assert_eq!(
            c.position(b, revoked[0], 0, false, t0),
            PositionReport::Stale
        );
        assert_eq!(
            c.position(a, revoked[0], 150, true, t0),
            PositionReport::Stale
        );
        assert!(c.poll_pushes().is_empty());
        for p in &revoked {
            let r = c.position(a, *p, 200 + u64::from(*p), false, t0);
            assert_eq!(r, PositionReport::HandedOver);
            apply(&mut latest, c.poll_pushes());
            disjoint(&latest);
        }
        assert_eq!(
            latest[&b],
            revoked
                .iter()
                .map(|&p| (p, 200 + u64::from(p)))
                .collect::<Vec<_>>(),
            "moved partitions continue from the previous owner's final position"
        );
        assert_eq!(disjoint(&latest).len(), 4);
        assert_eq!(c.member_count(), 2);
        assert_eq!(c.group_count(), 1);
    }

    #[test]
    fn a_handover_without_a_final_position_completes_at_the_deadline() {
        let t0 = Instant::now();
        let mut c = coord();
        let mut latest = BTreeMap::new();
        let (a, b) = (m(1, 7), m(2, 7));
        c.join(a, "s", "g", 2, &[(0, 5), (1, 6)], t0).unwrap();
        c.join(b, "s", "g", 2, &[], t0).unwrap();
        apply(&mut latest, c.poll_pushes());
        assert_eq!(latest[&a].len(), 1);
        assert!(latest[&b].is_empty());
        let deadline = c.poll_timeout().expect("a hand-over is pending");
        assert_eq!(deadline, t0 + Duration::from_secs(5));
        c.handle_timeout(deadline - Duration::from_millis(1));
        assert!(c.poll_pushes().is_empty(), "not before the deadline");
        c.handle_timeout(deadline);
        apply(&mut latest, c.poll_pushes());
        assert_eq!(
            latest[&b].len(),
            1,
            "B gets it from the last known position"
        );
        let (p, o) = latest[&b][0];
        assert_eq!(o, if p == 0 { 5 } else { 6 });
        assert_eq!(disjoint(&latest).len(), 2);
        assert!(c.poll_timeout().is_none());
    }

    #[test]
    fn a_closed_link_hands_everything_to_the_survivors() {
        let t0 = Instant::now();
        let mut c = coord();
        let mut latest = BTreeMap::new();
        let (a1, a2, b) = (m(1, 1), m(1, 2), m(2, 1));
        c.join(a1, "s", "g", 6, &[], t0).unwrap();
        c.join(b, "s", "g", 6, &[], t0).unwrap();
        c.join(a2, "s", "g", 6, &[], t0).unwrap();
        // Another group on link 1 only: it disappears with the link.
        c.join(m(1, 3), "s", "other", 2, &[], t0).unwrap();
        apply(&mut latest, c.poll_pushes());
        // Complete every hand-over with positions from their previous owners.
        for _ in 0..3 {
            for who in [a1, a2, b] {
                for p in 0..6 {
                    let serving = latest.get(&who).is_some_and(|s| s.iter().any(|x| x.0 == p));
                    c.position(who, p, 40 + u64::from(p), serving, t0);
                }
            }
            apply(&mut latest, c.poll_pushes());
        }
        latest.remove(&m(1, 3));
        assert_eq!(disjoint(&latest).len(), 6);
        assert_eq!(latest[&b].len(), 2);
        assert_eq!(c.group_count(), 2);
        // Shard 1 dies.
        assert_eq!(c.link_closed(LinkId(1), t0), 3);
        let pushes = c.poll_pushes();
        assert!(pushes.iter().all(|p| p.to == b), "{pushes:?}");
        apply(&mut latest, pushes);
        assert_eq!(
            latest[&b],
            (0..6).map(|p| (p, 40 + u64::from(p))).collect::<Vec<_>>(),
            "the survivor continues every partition from its committed position"
        );
        assert_eq!(c.member_count(), 1);
        assert_eq!(c.group_count(), 1);
        assert!(c.owned(a1).is_empty());
        assert_eq!(c.owned(b), (0..6).collect::<Vec<_>>());
        // The shard comes back on a new link with the same member ids: no collision with B
        // (also member 1) and nothing left of the old link's members.
        let again = m(3, 1);
        c.join(again, "s", "g", 6, &[], t0).unwrap();
        let pushes = c.poll_pushes();
        assert!(pushes.iter().all(|p| p.to == b || p.to == again));
        latest.remove(&a1);
        latest.remove(&a2);
        apply(&mut latest, pushes);
        assert_eq!(c.member_count(), 2);
        disjoint(&latest);
    }

    #[test]
    fn leave_and_misuse() {
        let t0 = Instant::now();
        let mut c = coord();
        let a = m(1, 1);
        assert_eq!(c.leave(a, t0), Err(CoordError::UnknownMember(a)));
        assert_eq!(c.position(a, 0, 1, false, t0), PositionReport::Stale);
        assert!(
            c.forecast(a, &[PartitionLoad::from((0, 1, 1))], t0)
                .is_err()
        );
        assert_eq!(
            c.join(a, "s", "g", 0, &[], t0),
            Err(CoordError::NoPartitions)
        );
        c.join(a, "s", "g", 3, &[(9, 1)], t0).unwrap();
        assert_eq!(
            c.join(a, "s", "g", 3, &[], t0),
            Err(CoordError::AlreadyMember(a))
        );
        c.poll_pushes();
        c.leave(a, t0).unwrap();
        assert!(c.poll_pushes().is_empty(), "nobody left to tell");
        assert_eq!((c.member_count(), c.group_count()), (0, 0));
        let mut c = GroupCoordinator::new(CoordConfig {
            max_members_per_link: 1,
            ..CoordConfig::default()
        });
        c.join(a, "s", "g", 1, &[], t0).unwrap();
        assert_eq!(
            c.join(m(1, 2), "s", "h", 1, &[], t0),
            Err(CoordError::TooManyMembers(LinkId(1)))
        );
        c.join(m(2, 2), "s", "h", 1, &[], t0).unwrap();
    }

    #[test]
    fn forecasts_from_any_shard_make_the_split_rate_aware() {
        let t0 = Instant::now();
        let mut c = coord();
        let mut latest = BTreeMap::new();
        let (a, b) = (m(1, 1), m(2, 1));
        c.join(a, "s", "g", 4, &[], t0).unwrap();
        c.join(b, "s", "g", 4, &[], t0).unwrap();
        apply(&mut latest, c.poll_pushes());
        for p in 0..4 {
            c.position(a, p, 0, false, t0);
        }
        apply(&mut latest, c.poll_pushes());
        let b_parts: Vec<u32> = latest[&b].iter().map(|p| p.0).collect();
        assert_eq!(b_parts.len(), 2);
        let loads: Vec<PartitionLoad> = (0..4)
            .map(|p| {
                let r = if p == b_parts[0] {
                    100
                } else if p == b_parts[1] {
                    50
                } else {
                    1
                };
                PartitionLoad {
                    partition: p,
                    records_per_s: r,
                    bytes_per_s: r * 1000,
                }
            })
            .collect();
        c.forecast(b, &loads, t0).unwrap();
        apply(&mut latest, c.poll_pushes());
        assert_eq!(
            latest[&b].iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![b_parts[0]],
            "B keeps only the hottest partition"
        );
        c.position(b, b_parts[1], 0, false, t0);
        apply(&mut latest, c.poll_pushes());
        assert_eq!(latest[&a].len(), 3);
        assert_eq!(disjoint(&latest).len(), 4);
    }
}
