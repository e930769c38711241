//! Consumer groups within one shard (I/O-free: every call takes `now`).
//!
//! ```text
//! join(member) / leave(member) / position(member, p, next) / poll(now)
//!   ──▶ GroupCoordinator (sticky, balanced: each member owns ⌊n/m⌋ or ⌈n/m⌉ partitions)
//!   ──▶ Vec<Change{member, owned: [(partition, start?)]}>  (the full new set per member)
//! ```
//!
//! A partition is never owned by two members at once. Moving a partition from a live member
//! is two steps: it is revoked from the old owner first, and given to the new one only when
//! the old owner's `Position` for it arrives after the revocation (or the old owner leaves,
//! or `handover_timeout` passes — then the last known position is used). A leaving member's
//! partitions move at once, from their last known positions. `start: None` means "no known
//! position: use the subscription's start".

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// A member: one subscription on this shard.
pub type MemberId = u64;

/// A member's new complete set of partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The member.
    pub member: MemberId,
    /// Every partition it owns now, with the offset to start newly given ones at (the
    /// group's known position), `None` for "the subscription's start".
    pub owned: Vec<(u32, Option<u64>)>,
}

#[derive(Debug, Clone)]
struct Moving {
    to: MemberId,
    since: Instant,
}

#[derive(Debug, Default)]
struct Group {
    partitions: u32,
    members: Vec<MemberId>,
    owner: Vec<Option<MemberId>>,
    moving: Vec<Option<Moving>>,
    position: Vec<Option<u64>>,
}

/// The coordinator of every group of one shard. Keyed by `(stream, group)`.
#[derive(Debug)]
pub struct GroupCoordinator {
    groups: HashMap<(String, String), Group>,
    member_group: HashMap<MemberId, (String, String)>,
    handover_timeout: Duration,
}

impl GroupCoordinator {
    /// A coordinator whose hand-overs wait at most `handover_timeout` for a position.
    pub fn new(handover_timeout: Duration) -> Self {
        Self {
            groups: HashMap::new(),
            member_group: HashMap::new(),
            handover_timeout,
        }
    }

    /// `member` joins `group` of `stream` (which has `partitions` partitions).
    pub fn join(
        &mut self,
        stream: &str,
        group: &str,
        partitions: u32,
        member: MemberId,
        now: Instant,
    ) -> Vec<Change> {
        let key = (stream.to_owned(), group.to_owned());
        self.member_group.insert(member, key.clone());
        let g = self.groups.entry(key).or_insert_with(|| Group {
            partitions,
            owner: vec![None; partitions as usize],
            moving: vec![None; partitions as usize],
            position: vec![None; partitions as usize],
            members: Vec::new(),
        });
        if !g.members.contains(&member) {
            g.members.push(member);
        }
        rebalance(g, now)
    }

    /// `member` left (unsubscribed or disconnected): its partitions move at once.
    pub fn leave(&mut self, member: MemberId, now: Instant) -> Vec<Change> {
        let Some(key) = self.member_group.remove(&member) else {
            return Vec::new();
        };
        let Some(g) = self.groups.get_mut(&key) else {
            return Vec::new();
        };
        g.members.retain(|m| *m != member);
        // Owners of partitions that were on their way to the leaving member keep them.
        let mut kept = Vec::new();
        for p in 0..g.partitions as usize {
            if g.owner[p] == Some(member) {
                g.owner[p] = None;
            }
            if g.moving[p].as_ref().is_some_and(|m| m.to == member) {
                g.moving[p] = None;
                kept.extend(g.owner[p]);
            }
        }
        if g.members.is_empty() {
            self.groups.remove(&key);
            return Vec::new();
        }
        let mut changes = complete(g, |_| true);
        kept.sort_unstable();
        kept.dedup();
        merge(
            &mut changes,
            kept.into_iter().map(|o| change(g, o)).collect(),
        );
        merge(&mut changes, rebalance(g, now));
        changes
    }

    /// `member` consumed `partition` up to `next_offset`.
    pub fn position(&mut self, member: MemberId, partition: u32, next_offset: u64) -> Vec<Change> {
        let Some(g) = self
            .member_group
            .get(&member)
            .and_then(|k| self.groups.get_mut(k))
        else {
            return Vec::new();
        };
        let p = partition as usize;
        if p >= g.partitions as usize {
            return Vec::new();
        }
        let owns = g.owner[p] == Some(member);
        if owns {
            g.position[p] = Some(next_offset);
            if g.moving[p].is_some() {
                // The final position of a revoked partition: hand it over.
                g.owner[p] = None;
                return complete(g, |q| q == p);
            }
        }
        Vec::new()
    }

    /// Hand-overs whose wait expired at `now` complete from the last known position.
    pub fn poll(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        for g in self.groups.values_mut() {
            let expired: Vec<usize> = (0..g.partitions as usize)
                .filter(|&p| {
                    g.moving[p]
                        .as_ref()
                        .is_some_and(|m| now >= m.since + self.handover_timeout)
                })
                .collect();
            for p in expired {
                g.owner[p] = None;
                merge(&mut changes, complete(g, |q| q == p));
            }
        }
        changes
    }

    /// When [`poll`](Self::poll) should next be called, if a hand-over is waiting.
    pub fn poll_at(&self) -> Option<Instant> {
        self.groups
            .values()
            .flat_map(|g| g.moving.iter().flatten())
            .map(|m| m.since + self.handover_timeout)
            .min()
    }

    /// The partitions `member` owns now.
    pub fn owned(&self, member: MemberId) -> Vec<u32> {
        self.member_group
            .get(&member)
            .and_then(|k| self.groups.get(k))
            .map(|g| owned(g, member))
            .unwrap_or_default()
    }
}

/// Partitions `member` owns and keeps (a revoked one awaiting hand-over is not listed).
fn owned(g: &Group, member: MemberId) -> Vec<u32> {
    (0..g.partitions)
        .filter(|&p| g.owner[p as usize] == Some(member) && g.moving[p as usize].is_none())
        .collect()
}

fn change(g: &Group, member: MemberId) -> Change {
    Change {
        member,
        owned: owned(g, member)
            .into_iter()
            .map(|p| (p, g.position[p as usize]))
            .collect(),
    }
}

/// Gives moving partitions matching `which` whose old owner is gone to their target.
fn complete(g: &mut Group, which: impl Fn(usize) -> bool) -> Vec<Change> {
    let mut touched = Vec::new();
    for p in 0..g.partitions as usize {
        if !which(p) || g.owner[p].is_some() {
            continue;
        }
        if let Some(m) = g.moving[p].take() {
            g.owner[p] = Some(m.to);
            touched.push(m.to);
        }
    }
    touched.sort_unstable();
    touched.dedup();
    touched.into_iter().map(|m| change(g, m)).collect()
}

/// Balances ownership: free partitions go to the least loaded members at once; then, while
/// loads differ by more than one, the most loaded member gives a partition to the least
/// loaded one (revoked first, handed over later). Loads count incoming partitions.
fn rebalance(g: &mut Group, now: Instant) -> Vec<Change> {
    let n = g.partitions as usize;
    if g.members.is_empty() {
        return Vec::new();
    }
    let mut load: BTreeMap<MemberId, usize> = g.members.iter().map(|&id| (id, 0)).collect();
    for p in 0..n {
        match (&g.moving[p], g.owner[p]) {
            (Some(mv), _) => *load.entry(mv.to).or_default() += 1,
            (None, Some(o)) => *load.entry(o).or_default() += 1,
            (None, None) => {}
        }
    }
    let least = |load: &BTreeMap<MemberId, usize>| {
        load.iter()
            .min_by_key(|(id, l)| (**l, **id))
            .map(|(id, _)| *id)
    };
    let most = |load: &BTreeMap<MemberId, usize>| {
        load.iter()
            .max_by_key(|(id, l)| (**l, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    };
    let mut touched: Vec<MemberId> = Vec::new();
    for p in 0..n {
        if g.owner[p].is_none() && g.moving[p].is_none() {
            let Some(to) = least(&load) else { break };
            *load.entry(to).or_default() += 1;
            g.owner[p] = Some(to);
            touched.push(to);
        }
    }
    for _ in 0..n {
        let (Some(from), Some(to)) = (most(&load), least(&load)) else {
            break;
        };
        if load[&from] <= load[&to] + 1 {
            break;
        }
        // Prefer re-targeting a partition still on its way to `from`; else revoke one
        // `from` owns (the highest: the rest stay where they are).
        let incoming = (0..n)
            .rev()
            .find(|&p| g.moving[p].as_ref().is_some_and(|m| m.to == from));
        let owned = (0..n)
            .rev()
            .find(|&p| g.moving[p].is_none() && g.owner[p] == Some(from));
        if let Some(p) = incoming {
            g.moving[p] = Some(Moving { to, since: now });
        } else if let Some(p) = owned {
            g.moving[p] = Some(Moving { to, since: now });
            touched.push(from);
        } else {
            break;
        }
        *load.entry(from).or_default() -= 1;
        *load.entry(to).or_default() += 1;
    }
    touched.sort_unstable();
    touched.dedup();
    touched.into_iter().map(|id| change(g, id)).collect()
}

/// Adds `more` to `changes`, the later change of a member replacing the earlier one.
fn merge(changes: &mut Vec<Change>, more: Vec<Change>) {
    for c in more {
        changes.retain(|x| x.member != c.member);
        changes.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(c: &GroupCoordinator, members: &[MemberId]) -> Vec<Vec<u32>> {
        members.iter().map(|&m| c.owned(m)).collect()
    }

    /// No partition is owned twice and, without hand-overs pending, every one is owned.
    fn exclusive(c: &GroupCoordinator, members: &[MemberId], n: u32) -> usize {
        let mut seen = vec![0; n as usize];
        for m in members {
            for p in c.owned(*m) {
                seen[p as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&s| s <= 1), "{seen:?}");
        seen.iter().sum()
    }

    #[test]
    fn lone_member_owns_everything_then_shares_after_handover() {
        let t0 = Instant::now();
        let mut c = GroupCoordinator::new(Duration::from_secs(5));
        let ch = c.join("s", "g", 4, 1, t0);
        assert_eq!(
            ch,
            vec![Change {
                member: 1,
                owned: vec![(0, None), (1, None), (2, None), (3, None)]
            }]
        );
        // Member 2 joins: 1 loses two partitions first; 2 gets nothing yet.
        let ch = c.join("s", "g", 4, 2, t0);
        assert_eq!(owners(&c, &[1, 2]), vec![vec![0, 1], vec![]]);
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].member, 1);
        assert_eq!(exclusive(&c, &[1, 2], 4), 2);
        // 1's final positions hand the partitions over, starting there.
        assert!(c.position(1, 0, 7).is_empty(), "0 stays with 1");
        let ch = c.position(1, 3, 30);
        assert_eq!(
            ch,
            vec![Change {
                member: 2,
                owned: vec![(3, Some(30))]
            }]
        );
        let ch = c.position(1, 2, 20);
        assert_eq!(
            ch,
            vec![Change {
                member: 2,
                owned: vec![(2, Some(20)), (3, Some(30))]
            }]
        );
        assert_eq!(exclusive(&c, &[1, 2], 4), 4);
        // A position of a partition one does not own is ignored.
        assert!(c.position(1, 3, 99).is_empty());
    }

    #[test]
    fn leaving_member_hands_over_at_once_from_known_positions() {
        let t0 = Instant::now();
        let mut c = GroupCoordinator::new(Duration::from_secs(5));
        c.join("s", "g", 2, 1, t0);
        c.join("s", "g", 2, 2, t0);
        c.position(1, 1, 11);
        assert_eq!(owners(&c, &[1, 2]), vec![vec![0], vec![1]]);
        c.position(2, 1, 15);
        let ch = c.leave(2, t0);
        assert_eq!(
            ch,
            vec![Change {
                member: 1,
                owned: vec![(0, None), (1, Some(15))]
            }]
        );
        assert!(c.leave(1, t0).is_empty());
        assert!(c.leave(1, t0).is_empty());
    }

    #[test]
    fn handover_times_out_to_the_last_known_position() {
        let t0 = Instant::now();
        let mut c = GroupCoordinator::new(Duration::from_secs(5));
        c.join("s", "g", 2, 1, t0);
        c.position(1, 1, 4);
        c.join("s", "g", 2, 2, t0);
        assert_eq!(c.poll_at(), Some(t0 + Duration::from_secs(5)));
        assert!(c.poll(t0 + Duration::from_secs(4)).is_empty());
        let ch = c.poll(t0 + Duration::from_secs(5));
        assert_eq!(
            ch,
            vec![Change {
                member: 2,
                owned: vec![(1, Some(4))]
            }]
        );
        assert_eq!(c.poll_at(), None);
    }

    #[test]
    fn many_members_stay_balanced_and_exclusive() {
        let t0 = Instant::now();
        let mut c = GroupCoordinator::new(Duration::from_secs(5));
        let members: Vec<MemberId> = (1..=3).collect();
        for &m in &members {
            c.join("s", "g", 8, m, t0);
            exclusive(&c, &members, 8);
        }
        // Complete every hand-over by timeout.
        c.poll(t0 + Duration::from_secs(10));
        assert_eq!(exclusive(&c, &members, 8), 8);
        let counts: Vec<usize> = members.iter().map(|&m| c.owned(m).len()).collect();
        assert!(counts.iter().all(|&n| n == 2 || n == 3), "{counts:?}");
    }
}
