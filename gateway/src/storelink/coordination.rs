//! The hub's half of consumer-group coordination over the store link: every shard link's
//! [`GroupMsg`]s drive one [`GroupCoordinator`] behind one lock, its pushes go back to each
//! member's link as [`GroupAssign`] frames, and a task completes hand-overs at their
//! deadlines. A closed link (a crashed shard) removes its members, so their partitions move
//! to the others.
//!
//! ```text
//! serve_link ──GroupMsg──▶ LinkGuard::handle ──▶ Groups::with(GroupCoordinator) ──route──▶
//!   Outbox per link (latest push per member) ──push_loop──▶ GroupAssign on that link
//! Groups::deadlines: GroupCoordinator::poll_timeout ─▶ handle_timeout ─▶ route
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{Notify, mpsc, watch};

use super::group::{GroupAssign, GroupMsg, encode_group_assign};
use super::server::{Out, ServerConfig};
use crate::hub::groups::{
    CoordConfig, GroupCoordinator, GroupPush, LinkId, LinkMember, PositionReport,
};
use crate::predict::{GroupConfig, MemberId};
use crate::store::Store;

/// A member's latest push: `(epoch, partitions)`.
type PendingPush = (u64, Vec<(u32, u64)>);

/// Pending group pushes of one link, coalesced per member (each push is the member's
/// complete set, so only the latest matters): bounded by the link's member count.
#[derive(Default)]
pub(super) struct Outbox {
    pending: Mutex<BTreeMap<MemberId, PendingPush>>,
    ready: Notify,
}

/// The coordinator and where its pushes go.
struct GroupsState {
    coord: GroupCoordinator,
    outboxes: HashMap<LinkId, Arc<Outbox>>,
}

/// The hub's group coordination: one [`GroupCoordinator`] behind one lock, fed by every
/// shard link, plus the task that completes hand-overs at their deadlines.
pub(super) struct Groups {
    state: Mutex<GroupsState>,
    /// An event may have moved the earliest hand-over deadline.
    wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code panics while holding these locks; recover the data if one ever did.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Groups {
    pub(super) fn new(cfg: &ServerConfig) -> Self {
        let config = CoordConfig {
            group: GroupConfig {
                revoke_timeout: cfg.handover_timeout,
                ..GroupConfig::default()
            },
            max_members_per_link: cfg.max_group_members_per_link,
            ..CoordConfig::default()
        };
        Self {
            state: Mutex::new(GroupsState {
                coord: GroupCoordinator::new(config),
                outboxes: HashMap::new(),
            }),
            wake: Notify::new(),
        }
    }

    /// Runs `f` on the coordinator and routes the pushes it produced to their links' outboxes
    /// (under the lock, so each member's pushes are queued in decision order). Wakes the
    /// deadline task unless `f` returns `false` for "no hand-over can have started".
    fn with<R>(&self, f: impl FnOnce(&mut GroupCoordinator, Instant) -> (R, bool)) -> R {
        let mut st = lock(&self.state);
        let (r, rebalanced) = f(&mut st.coord, Instant::now());
        route(&mut st);
        drop(st);
        if rebalanced {
            self.wake.notify_one();
        }
        r
    }

    pub(super) fn add_link(&self, link: LinkId) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::default());
        lock(&self.state).outboxes.insert(link, outbox.clone());
        outbox
    }

    /// Completes hand-overs at their deadlines until shutdown.
    pub(super) async fn deadlines(self: Arc<Self>, mut shutdown: watch::Receiver<()>) {
        loop {
            let at = lock(&self.state).coord.poll_timeout();
            let sleep = async {
                match at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                () = self.wake.notified() => {}
                () = sleep => {
                    let mut st = lock(&self.state);
                    st.coord.handle_timeout(Instant::now());
                    route(&mut st);
                }
            }
        }
    }
}

fn route(st: &mut GroupsState) {
    for GroupPush {
        to,
        epoch,
        partitions,
    } in st.coord.poll_pushes()
    {
        if let Some(o) = st.outboxes.get(&to.link) {
            lock(&o.pending).insert(to.member, (epoch, partitions));
            o.ready.notify_one();
        }
    }
}

/// Sends a link's group pushes as `GroupAssign` frames.
pub(super) async fn push_loop(outbox: Arc<Outbox>, tx: mpsc::Sender<Out>) {
    loop {
        outbox.ready.notified().await;
        let batch = std::mem::take(&mut *lock(&outbox.pending));
        for (member, (epoch, partitions)) in batch {
            let mut f = Vec::new();
            let push = GroupAssign {
                member,
                epoch,
                partitions,
            };
            if let Err(e) = encode_group_assign(&push, &mut f) {
                // The coordinator lists a stream's partitions at most.
                tracing::warn!(error = %e, "group push does not encode");
                continue;
            }
            if tx.send(f.into()).await.is_err() {
                return;
            }
        }
    }
}

/// A link's membership in the group coordination; its drop removes the link's members.
pub(super) struct LinkGuard {
    link: LinkId,
    groups: Arc<Groups>,
}

impl LinkGuard {
    /// The link `link` takes part in `groups`.
    pub(super) fn new(link: LinkId, groups: Arc<Groups>) -> Self {
        Self { link, groups }
    }

    /// A group message of this link's shard.
    pub(super) fn handle(&self, msg: GroupMsg, store: &Store) {
        let who = |member| LinkMember {
            link: self.link,
            member,
        };
        let r = match msg {
            GroupMsg::Join {
                member,
                stream,
                group,
                starts,
            } => {
                // In memory: the store's stream table.
                let partitions = store
                    .streams()
                    .into_iter()
                    .find(|(name, _)| *name == stream)
                    .map(|(_, c)| c.partitions);
                let Some(partitions) = partitions else {
                    tracing::debug!(%stream, "group join for an unknown stream ignored");
                    return;
                };
                self.groups.with(|c, now| {
                    (
                        c.join(who(member), &stream, &group, partitions, &starts, now),
                        true,
                    )
                })
            }
            GroupMsg::Leave { member } => {
                self.groups.with(|c, now| (c.leave(who(member), now), true))
            }
            GroupMsg::Position {
                member,
                partition,
                next_offset,
                serving,
            } => {
                // The common case (an owner's position) neither pushes nor moves a deadline.
                self.groups.with(|c, now| {
                    let r = c.position(who(member), partition, next_offset, serving, now);
                    ((), r == PositionReport::HandedOver)
                });
                Ok(())
            }
            GroupMsg::Forecast { member, loads } => self
                .groups
                .with(|c, now| (c.forecast(who(member), &loads, now), true)),
        };
        if let Err(e) = r {
            tracing::debug!(link = self.link.0, error = %e, "group message ignored");
        }
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let link = self.link;
        let gone = self.groups.with(|c, now| (c.link_closed(link, now), true));
        lock(&self.groups.state).outboxes.remove(&link);
        if gone > 0 {
            tracing::info!(
                link = link.0,
                members = gone,
                "shard link closed: its group members left"
            );
        }
    }
}
