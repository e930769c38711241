//! The I/O-free shard supervision policy.
//!
//! [`SupervisorPolicy`] holds one slot per configured shard. The driver feeds it events
//! (`handle_*`, each with `now`), executes the [`Action`]s it yields from
//! [`SupervisorPolicy::poll_action`], and calls [`SupervisorPolicy::handle_timeout`] when
//! [`SupervisorPolicy::poll_timeout`] passes. Time only moves forward. Every process
//! incarnation of a slot has a `generation`; events from an older generation are ignored,
//! so a late heartbeat or exit of a replaced process cannot confuse the new one.
//!
//! ```text
//!        spawn           Ready            missed heartbeats / startup timeout
//! Backoff ───▶ Starting ─────▶ Ready ───────────────────────────────▶ Dead ─(exit)─▶ Backoff
//!    ▲            │  (exit)      │ (exit)                           Kill{pid}
//!    └────────────┴──────────────┘
//! drain_all: Starting/Ready ─SendDrain─▶ Draining ─(exit)─▶ Stopped   (deadline ⇒ Kill)
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sibyl_proto::Backoff;

use crate::config::{ShardsConfig, SupervisionConfig};
pub use crate::ids::ShardId;
use crate::ipc::Load;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Start a process for `shard`; report back with `handle_spawned` or `handle_spawn_failed`.
    Spawn {
        /// The slot.
        shard: ShardId,
        /// Incarnation to tag the process's events with.
        generation: u64,
    },
    /// Send `Drain{within}` over the shard's control channel.
    SendDrain {
        /// The slot.
        shard: ShardId,
        /// Incarnation.
        generation: u64,
        /// Drain budget.
        within: Duration,
    },
    /// SIGKILL the process.
    Kill {
        /// The slot.
        shard: ShardId,
        /// Incarnation.
        generation: u64,
        /// Its pid.
        pid: u32,
    },
}

/// Why a shard process was declared dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeathCause {
    /// The process exited on its own (crash or unexpected exit).
    Exited,
    /// No heartbeat for `missed_heartbeats × heartbeat_interval`.
    MissedHeartbeats,
    /// Not ready within the startup timeout.
    StartupTimeout,
    /// The process could not be spawned.
    SpawnFailed,
}

/// A slot's state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardState {
    /// Waiting to be (re)spawned at `until`.
    Backoff {
        /// When to spawn.
        until: Instant,
    },
    /// Spawned (pid once known), not ready yet; never routed to.
    Starting {
        /// Spawn time.
        since: Instant,
        /// Pid once the driver reported it.
        pid: Option<u32>,
    },
    /// Serving; routable.
    Ready {
        /// Pid.
        pid: u32,
        /// Bound UDP address.
        addr: SocketAddr,
        /// Last heartbeat (or the ready report).
        last_seen: Instant,
        /// Last load report.
        load: Load,
        /// Clients sent to it (the first endpoint of a `GroupHint` or `Ticket`) since `load`
        /// was reported; see [`ShardInfo::admitted`].
        admitted: u64,
    },
    /// Declared dead and killed; waiting for its exit before restarting.
    Dead {
        /// Pid being killed.
        pid: u32,
        /// Why.
        cause: DeathCause,
    },
    /// Told to drain; killed at `deadline` if still alive. Not routed to.
    Draining {
        /// Pid, if it was ever known.
        pid: Option<u32>,
        /// Kill deadline.
        deadline: Instant,
    },
    /// Exited during shutdown; never restarted.
    Stopped,
}

#[derive(Debug)]
struct Slot {
    id: ShardId,
    generation: u64,
    state: ShardState,
    /// When the current incarnation was spawned (for the min-lifespan rule).
    spawned_at: Option<Instant>,
    /// Consecutive deaths of short-lived incarnations.
    crash_streak: u32,
    restarts: u64,
}

/// A routable shard as seen by the hub's admission path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// The slot.
    pub id: ShardId,
    /// Shard-group id (same as `id.group`).
    pub group: u32,
    /// Incarnation.
    pub generation: u64,
    /// Process id.
    pub pid: u32,
    /// Bound UDP address (apply `AdvertiseConfig::rewrite` before putting it in a ticket).
    pub addr: SocketAddr,
    /// Open connections from the last heartbeat.
    pub connections: u64,
    /// Clients the hub sent to it since that heartbeat (see
    /// [`SupervisorPolicy::note_admitted`]): they count as connections until the next
    /// heartbeat reports them, so that clients arriving between two heartbeats spread over
    /// the shards instead of all going to the one that looked least loaded.
    pub admitted: u64,
    /// Active subscriptions from the last heartbeat.
    pub subscriptions: u64,
    /// RSS from the last heartbeat.
    pub rss_bytes: u64,
}

impl ShardInfo {
    /// What least-connections routing compares: `connections + admitted`.
    pub fn load(&self) -> u64 {
        self.connections.saturating_add(self.admitted)
    }
}

/// What the policy reports back from an event, for logging by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transition {
    /// Nothing notable (or a stale event).
    None,
    /// The shard became routable.
    Ready(ShardInfo),
    /// The shard was declared dead; it restarts after `restart_in` (None during drain).
    Died {
        /// The slot.
        shard: ShardId,
        /// Why.
        cause: DeathCause,
        /// Delay before the respawn.
        restart_in: Option<Duration>,
    },
}

/// The supervision state machine; see the module docs.
#[derive(Debug)]
pub struct SupervisorPolicy {
    cfg: SupervisionConfig,
    slots: Vec<Slot>,
    actions: VecDeque<Action>,
    draining: bool,
}

impl SupervisorPolicy {
    /// One slot per shard of every group, all due to spawn at `now`.
    pub fn new(cfg: SupervisionConfig, shards: &ShardsConfig, now: Instant) -> Self {
        let slots = shards
            .groups
            .iter()
            .flat_map(|g| (0..g.shards).map(move |index| ShardId { group: g.id, index }))
            .map(|id| Slot {
                id,
                generation: 0,
                state: ShardState::Backoff { until: now },
                spawned_at: None,
                crash_streak: 0,
                restarts: 0,
            })
            .collect();
        let mut p = Self {
            cfg,
            slots,
            actions: VecDeque::new(),
            draining: false,
        };
        p.handle_timeout(now);
        p
    }

    fn slot_mut(&mut self, shard: ShardId, generation: u64) -> Option<&mut Slot> {
        self.slots
            .iter_mut()
            .find(|s| s.id == shard && s.generation == generation)
    }

    /// The driver started the process.
    pub fn handle_spawned(&mut self, shard: ShardId, generation: u64, pid: u32, now: Instant) {
        let Some(slot) = self.slot_mut(shard, generation) else {
            return;
        };
        match &mut slot.state {
            ShardState::Starting { pid: p, .. } => *p = Some(pid),
            ShardState::Draining { pid: p, .. } => *p = Some(pid),
            _ => {}
        }
        let _ = now;
    }

    /// The driver could not start the process.
    pub fn handle_spawn_failed(
        &mut self,
        shard: ShardId,
        generation: u64,
        now: Instant,
    ) -> Transition {
        self.on_gone(shard, generation, DeathCause::SpawnFailed, now)
    }

    /// The shard reported `Ready`.
    pub fn handle_ready(
        &mut self,
        shard: ShardId,
        generation: u64,
        addr: SocketAddr,
        now: Instant,
    ) -> Transition {
        let Some(slot) = self.slot_mut(shard, generation) else {
            return Transition::None;
        };
        let ShardState::Starting { pid: Some(pid), .. } = slot.state else {
            return Transition::None;
        };
        slot.state = ShardState::Ready {
            pid,
            addr,
            last_seen: now,
            load: Load::default(),
            admitted: 0,
        };
        Transition::Ready(info(slot).expect("just set Ready"))
    }

    /// The shard sent a heartbeat.
    pub fn handle_heartbeat(&mut self, shard: ShardId, generation: u64, load: Load, now: Instant) {
        let Some(slot) = self.slot_mut(shard, generation) else {
            return;
        };
        if let ShardState::Ready {
            last_seen,
            load: l,
            admitted,
            ..
        } = &mut slot.state
        {
            *last_seen = now;
            *l = load;
            // The report counts the clients that attached since the last one. A client sent
            // just before it and not yet attached is not counted until the next report.
            *admitted = 0;
        }
    }

    /// The hub sent a client to the shard (the first endpoint of a `GroupHint` or of a
    /// `Ticket`): it counts as one more connection until the next heartbeat. Ignored unless
    /// that incarnation is Ready.
    pub fn note_admitted(&mut self, shard: ShardId, generation: u64) {
        let Some(slot) = self.slot_mut(shard, generation) else {
            return;
        };
        if let ShardState::Ready { admitted, .. } = &mut slot.state {
            *admitted = admitted.saturating_add(1);
        }
    }

    /// The process exited (any reason).
    pub fn handle_exited(&mut self, shard: ShardId, generation: u64, now: Instant) -> Transition {
        self.on_gone(shard, generation, DeathCause::Exited, now)
    }

    fn on_gone(
        &mut self,
        shard: ShardId,
        generation: u64,
        cause: DeathCause,
        now: Instant,
    ) -> Transition {
        let draining = self.draining;
        let cfg = self.cfg.clone();
        let Some(slot) = self.slot_mut(shard, generation) else {
            return Transition::None;
        };
        let cause = match slot.state {
            ShardState::Dead { cause, .. } => cause,
            ShardState::Stopped | ShardState::Backoff { .. } => return Transition::None,
            _ => cause,
        };
        if draining || matches!(slot.state, ShardState::Draining { .. }) {
            slot.state = ShardState::Stopped;
            return Transition::Died {
                shard,
                cause,
                restart_in: None,
            };
        }
        let lived = slot
            .spawned_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        if lived >= cfg.min_lifespan {
            slot.crash_streak = 0;
        }
        let delay = backoff(&cfg, slot.crash_streak);
        slot.crash_streak = slot.crash_streak.saturating_add(1);
        slot.state = ShardState::Backoff { until: now + delay };
        Transition::Died {
            shard,
            cause,
            restart_in: Some(delay),
        }
    }

    /// Starts a drain of every shard: live ones get `SendDrain`, pending restarts are
    /// cancelled, and nothing restarts afterwards. Shards still alive at
    /// `now + drain_deadline` are killed.
    pub fn drain_all(&mut self, now: Instant) {
        if self.draining {
            return;
        }
        self.draining = true;
        let within = self.cfg.drain_deadline;
        let deadline = now + within;
        for slot in &mut self.slots {
            match slot.state {
                ShardState::Starting { pid, .. } => {
                    self.actions.push_back(Action::SendDrain {
                        shard: slot.id,
                        generation: slot.generation,
                        within,
                    });
                    slot.state = ShardState::Draining { pid, deadline };
                }
                ShardState::Ready { pid, .. } => {
                    self.actions.push_back(Action::SendDrain {
                        shard: slot.id,
                        generation: slot.generation,
                        within,
                    });
                    slot.state = ShardState::Draining {
                        pid: Some(pid),
                        deadline,
                    };
                }
                ShardState::Backoff { .. } => slot.state = ShardState::Stopped,
                ShardState::Dead { .. } | ShardState::Draining { .. } | ShardState::Stopped => {}
            }
        }
    }

    /// Whether a drain was started and every shard has exited.
    pub fn is_drained(&self) -> bool {
        self.draining && self.slots.iter().all(|s| s.state == ShardState::Stopped)
    }

    /// Whether [`drain_all`](Self::drain_all) was called.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Advances timers: spawns due restarts, declares silent shards dead, kills shards past
    /// the drain deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        let hb_deadline = self.cfg.heartbeat_interval * self.cfg.missed_heartbeats;
        let startup = self.cfg.startup_timeout;
        for slot in &mut self.slots {
            match slot.state {
                ShardState::Backoff { until } if until <= now && !self.draining => {
                    slot.generation += 1;
                    if slot.spawned_at.is_some() {
                        slot.restarts += 1;
                    }
                    slot.spawned_at = Some(now);
                    slot.state = ShardState::Starting {
                        since: now,
                        pid: None,
                    };
                    self.actions.push_back(Action::Spawn {
                        shard: slot.id,
                        generation: slot.generation,
                    });
                }
                ShardState::Starting { since, pid } if since + startup <= now => match pid {
                    Some(pid) => {
                        slot.state = ShardState::Dead {
                            pid,
                            cause: DeathCause::StartupTimeout,
                        };
                        self.actions.push_back(Action::Kill {
                            shard: slot.id,
                            generation: slot.generation,
                            pid,
                        });
                    }
                    // The driver reports spawn results synchronously; a missing pid past the
                    // timeout means the report was lost. Treat as a failed spawn.
                    None => {
                        slot.state = ShardState::Dead {
                            pid: 0,
                            cause: DeathCause::SpawnFailed,
                        };
                    }
                },
                ShardState::Ready { pid, last_seen, .. } if last_seen + hb_deadline <= now => {
                    slot.state = ShardState::Dead {
                        pid,
                        cause: DeathCause::MissedHeartbeats,
                    };
                    self.actions.push_back(Action::Kill {
                        shard: slot.id,
                        generation: slot.generation,
                        pid,
                    });
                }
                ShardState::Draining {
                    pid: Some(pid),
                    deadline,
                } if deadline <= now => {
                    slot.state = ShardState::Dead {
                        pid,
                        cause: DeathCause::MissedHeartbeats,
                    };
                    self.actions.push_back(Action::Kill {
                        shard: slot.id,
                        generation: slot.generation,
                        pid,
                    });
                }
                ShardState::Draining {
                    pid: None,
                    deadline,
                } if deadline <= now => {
                    slot.state = ShardState::Stopped;
                }
                _ => {}
            }
        }
        // A Dead slot with pid 0 never had a process: move it on as if it had exited.
        let lost: Vec<(ShardId, u64)> = self
            .slots
            .iter()
            .filter(|s| matches!(s.state, ShardState::Dead { pid: 0, .. }))
            .map(|s| (s.id, s.generation))
            .collect();
        for (id, generation) in lost {
            self.on_gone(id, generation, DeathCause::SpawnFailed, now);
        }
    }

    /// The next action for the driver, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The earliest instant at which [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hb_deadline = self.cfg.heartbeat_interval * self.cfg.missed_heartbeats;
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                ShardState::Backoff { until } if !self.draining => Some(until),
                ShardState::Starting { since, .. } => Some(since + self.cfg.startup_timeout),
                ShardState::Ready { last_seen, .. } => Some(last_seen + hb_deadline),
                ShardState::Draining { deadline, .. } => Some(deadline),
                _ => None,
            })
            .min()
    }

    /// Ready shards of `group`, in slot order. Never includes a shard that is not Ready.
    pub fn ready_shards(&self, group: u32) -> Vec<ShardInfo> {
        self.slots
            .iter()
            .filter(|s| s.id.group == group)
            .filter_map(info)
            .collect()
    }

    /// Ready shards of `group` ordered by fewest connections, counting the clients sent since
    /// the last heartbeat ([`ShardInfo::load`]; ties by index): the ticket's endpoint list,
    /// best first.
    pub fn by_least_connections(&self, group: u32) -> Vec<ShardInfo> {
        let mut v = self.ready_shards(group);
        v.sort_by_key(|s| (s.load(), s.id.index));
        v
    }

    /// The Ready shard of `group` with the fewest connections.
    pub fn pick_least_connections(&self, group: u32) -> Option<ShardInfo> {
        self.by_least_connections(group).into_iter().next()
    }

    /// State of a slot (for status output and tests).
    pub fn state(&self, shard: ShardId) -> Option<&ShardState> {
        self.slots.iter().find(|s| s.id == shard).map(|s| &s.state)
    }

    /// Current generation of a slot.
    pub fn generation(&self, shard: ShardId) -> Option<u64> {
        self.slots
            .iter()
            .find(|s| s.id == shard)
            .map(|s| s.generation)
    }

    /// How many times the slot was restarted.
    pub fn restarts(&self, shard: ShardId) -> Option<u64> {
        self.slots
            .iter()
            .find(|s| s.id == shard)
            .map(|s| s.restarts)
    }

    /// Every slot: id, generation, state and restarts (status output).
    pub fn slots(&self) -> Vec<(ShardId, u64, ShardState, u64)> {
        self.slots
            .iter()
            .map(|s| (s.id, s.generation, s.state.clone(), s.restarts))
            .collect()
    }

    /// Pids of every process believed alive (Starting, Ready, Draining, Dead-awaiting-exit).
    pub fn live_pids(&self) -> Vec<(ShardId, u64, u32)> {
        self.slots
            .iter()
            .filter_map(|s| {
                let pid = match s.state {
                    ShardState::Starting { pid, .. } | ShardState::Draining { pid, .. } => pid,
                    ShardState::Ready { pid, .. } | ShardState::Dead { pid, .. } => Some(pid),
                    _ => None,
                }?;
                Some((s.id, s.generation, pid))
            })
            .collect()
    }
}

fn info(slot: &Slot) -> Option<ShardInfo> {
    match slot.state {
        ShardState::Ready {
            pid,
            addr,
            load,
            admitted,
            ..
        } => Some(ShardInfo {
            id: slot.id,
            group: slot.id.group,
            generation: slot.generation,
            pid,
            addr,
            connections: load.connections,
            admitted,
            subscriptions: load.subscriptions,
            rss_bytes: load.rss_bytes,
        }),
        _ => None,
    }
}

/// Restart delay after `streak` consecutive short-lived deaths: base × 2^streak, capped, no
/// jitter (the supervisor restarts its own processes; nothing to spread).
pub fn backoff(cfg: &SupervisionConfig, streak: u32) -> Duration {
    Backoff::new(cfg.restart_backoff_base, cfg.restart_backoff_max).ceiling(streak)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GroupConfig, ShardLimits};

    const G0S0: ShardId = ShardId { group: 0, index: 0 };
    const G0S1: ShardId = ShardId { group: 0, index: 1 };

    fn shards(groups: &[(u32, u32)]) -> ShardsConfig {
        ShardsConfig {
            groups: groups
                .iter()
                .map(|&(id, shards)| GroupConfig {
                    id,
                    shards,
                    limits: ShardLimits::default(),
                })
                .collect(),
            port_base: 0,
        }
    }

    /// A policy plus a fake driver that gives pids and records what it was asked.
    struct Harness {
        p: SupervisorPolicy,
        now: Instant,
        next_pid: u32,
        killed: Vec<u32>,
        drained: Vec<ShardId>,
    }

    impl Harness {
        fn new(groups: &[(u32, u32)]) -> Self {
            let now = Instant::now();
            let p = SupervisorPolicy::new(SupervisionConfig::default(), &shards(groups), now);
            let mut h = Self {
                p,
                now,
                next_pid: 100,
                killed: vec![],
                drained: vec![],
            };
            h.run_actions();
            h
        }
        fn run_actions(&mut self) {
            while let Some(a) = self.p.poll_action() {
                match a {
                    Action::Spawn { shard, generation } => {
                        self.next_pid += 1;
                        self.p
                            .handle_spawned(shard, generation, self.next_pid, self.now);
                    }
                    Action::Kill { pid, .. } => self.killed.push(pid),
                    Action::SendDrain { shard, .. } => self.drained.push(shard),
                }
            }
        }
        fn advance(&mut self, d: Duration) {
            self.now += d;
            self.p.handle_timeout(self.now);
            self.run_actions();
        }
        /// Steps to the next deadline, bounded.
        fn step_to_timeout(&mut self) {
            let t = self.p.poll_timeout().expect("a timer is armed");
            assert!(t >= self.now, "time only moves forward");
            self.advance(t - self.now);
        }
        fn generation_of(&self, s: ShardId) -> u64 {
            self.p.generation(s).unwrap()
        }
        fn pid(&self, s: ShardId) -> u32 {
            match self.p.state(s).unwrap() {
                ShardState::Starting { pid: Some(p), .. }
                | ShardState::Ready { pid: p, .. }
                | ShardState::Dead { pid: p, .. } => *p,
                other => panic!("no pid in {other:?}"),
            }
        }
        fn ready(&mut self, s: ShardId, port: u16) {
            let g = self.generation_of(s);
            let t = self
                .p
                .handle_ready(s, g, SocketAddr::from(([127, 0, 0, 1], port)), self.now);
            assert!(matches!(t, Transition::Ready(_)), "{t:?}");
        }
        fn beat(&mut self, s: ShardId, connections: u64) {
            let g = self.generation_of(s);
            self.p.handle_heartbeat(
                s,
                g,
                Load {
                    connections,
                    ..Load::default()
                },
                self.now,
            );
        }
        fn exit(&mut self, s: ShardId) -> Transition {
            let g = self.generation_of(s);
            let t = self.p.handle_exited(s, g, self.now);
            self.run_actions();
            t
        }
    }

    #[test]
    fn spawns_every_slot_at_start() {
        let h = Harness::new(&[(0, 2), (5, 3)]);
        assert_eq!(h.next_pid, 105);
        for (g, n) in [(0, 2), (5, 3)] {
            for i in 0..n {
                assert!(matches!(
                    h.p.state(ShardId { group: g, index: i }),
                    Some(ShardState::Starting { pid: Some(_), .. })
                ));
            }
        }
    }

    #[test]
    fn readiness_gates_routing() {
        let mut h = Harness::new(&[(0, 2)]);
        assert!(h.p.ready_shards(0).is_empty());
        assert_eq!(h.p.pick_least_connections(0), None);
        // Ready from an old generation or before the pid is known is ignored.
        let stale =
            h.p.handle_ready(G0S0, 0, SocketAddr::from(([127, 0, 0, 1], 1)), h.now);
        assert_eq!(stale, Transition::None);
        h.ready(G0S1, 7001);
        let r = h.p.ready_shards(0);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].id, G0S1);
        assert_eq!(r[0].addr.port(), 7001);
        assert_eq!(h.p.pick_least_connections(0).unwrap().id, G0S1);
        assert!(h.p.ready_shards(1).is_empty());
    }

    #[test]
    fn least_connections_orders_the_endpoints() {
        let mut h = Harness::new(&[(0, 3)]);
        for i in 0..3 {
            h.ready(ShardId { group: 0, index: i }, 7000 + i as u16);
        }
        h.beat(ShardId { group: 0, index: 0 }, 9);
        h.beat(ShardId { group: 0, index: 1 }, 2);
        h.beat(ShardId { group: 0, index: 2 }, 5);
        let order: Vec<u32> =
            h.p.by_least_connections(0)
                .iter()
                .map(|s| s.id.index)
                .collect();
        assert_eq!(order, vec![1, 2, 0]);
        assert_eq!(h.p.pick_least_connections(0).unwrap().connections, 2);
    }

    #[test]
    fn clients_sent_between_heartbeats_count_until_the_next_one() {
        let mut h = Harness::new(&[(0, 2)]);
        h.ready(G0S0, 7000);
        h.ready(G0S1, 7001);
        let order = |h: &Harness| -> Vec<(u32, u64)> {
            h.p.by_least_connections(0)
                .iter()
                .map(|s| (s.id.index, s.admitted))
                .collect()
        };
        // Equal loads: the lower index first. Each client sent there counts as a connection.
        let g0 = h.generation_of(G0S0);
        h.p.note_admitted(G0S0, g0);
        assert_eq!(order(&h), vec![(1, 0), (0, 1)]);
        let g1 = h.generation_of(G0S1);
        h.p.note_admitted(G0S1, g1);
        h.p.note_admitted(G0S1, g1);
        assert_eq!(order(&h), vec![(0, 1), (1, 2)]);
        assert_eq!(h.p.pick_least_connections(0).unwrap().load(), 1);
        // A heartbeat replaces the guess with the shard's own count.
        h.beat(G0S1, 1);
        assert_eq!(order(&h), vec![(0, 1), (1, 0)]);
        assert_eq!(h.p.by_least_connections(0)[1].load(), 1);
        // Another incarnation, or a shard not Ready, is not counted.
        h.p.note_admitted(G0S1, g1 + 1);
        assert_eq!(order(&h), vec![(0, 1), (1, 0)]);
        h.exit(G0S0);
        h.p.note_admitted(G0S0, g0);
        assert!(!matches!(h.p.state(G0S0), Some(ShardState::Ready { .. })));
        assert_eq!(order(&h), vec![(1, 0)]);
    }

    #[test]
    fn missed_heartbeats_kill_then_restart_after_backoff() {
        let mut h = Harness::new(&[(0, 1)]);
        h.ready(G0S0, 7000);
        let pid = h.pid(G0S0);
        // Heartbeats keep it alive across many intervals.
        for _ in 0..10 {
            h.advance(Duration::from_secs(1));
            h.beat(G0S0, 0);
        }
        assert!(matches!(h.p.state(G0S0), Some(ShardState::Ready { .. })));
        // Silence: dead at exactly 3 × 1 s, not before.
        h.advance(Duration::from_millis(2999));
        assert!(h.killed.is_empty());
        h.advance(Duration::from_millis(1));
        assert_eq!(h.killed, vec![pid]);
        assert!(matches!(
            h.p.state(G0S0),
            Some(ShardState::Dead {
                cause: DeathCause::MissedHeartbeats,
                ..
            })
        ));
        assert!(h.p.ready_shards(0).is_empty());
        // It lived ≥ min_lifespan, so the restart uses the base delay.
        let t = h.exit(G0S0);
        assert_eq!(
            t,
            Transition::Died {
                shard: G0S0,
                cause: DeathCause::MissedHeartbeats,
                restart_in: Some(Duration::from_millis(200))
            }
        );
        let g = h.generation_of(G0S0);
        h.advance(Duration::from_millis(199));
        assert_eq!(h.generation_of(G0S0), g);
        h.advance(Duration::from_millis(1));
        assert_eq!(h.generation_of(G0S0), g + 1);
        assert_ne!(h.pid(G0S0), pid);
        assert_eq!(h.p.restarts(G0S0), Some(1));
    }

    #[test]
    fn stale_events_from_a_replaced_process_are_ignored() {
        let mut h = Harness::new(&[(0, 1)]);
        h.ready(G0S0, 7000);
        let old = h.generation_of(G0S0);
        h.exit(G0S0);
        h.step_to_timeout();
        assert_eq!(h.p.handle_exited(G0S0, old, h.now), Transition::None);
        h.p.handle_heartbeat(G0S0, old, Load::default(), h.now);
        assert!(matches!(h.p.state(G0S0), Some(ShardState::Starting { .. })));
    }

    #[test]
    fn crash_loop_backs_off_exponentially_and_caps() {
        let mut h = Harness::new(&[(0, 1)]);
        let mut delays = vec![];
        for _ in 0..10 {
            h.advance(Duration::from_millis(10)); // dies young, well under min_lifespan
            match h.exit(G0S0) {
                Transition::Died {
                    restart_in: Some(d),
                    ..
                } => delays.push(d),
                t => panic!("{t:?}"),
            }
            h.step_to_timeout();
            assert!(matches!(h.p.state(G0S0), Some(ShardState::Starting { .. })));
        }
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(
            ms,
            vec![
                200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000, 10_000
            ]
        );
    }

    #[test]
    fn min_lifespan_resets_the_crash_streak() {
        let mut h = Harness::new(&[(0, 1)]);
        for _ in 0..3 {
            h.advance(Duration::from_millis(10));
            h.exit(G0S0);
            h.step_to_timeout();
        }
        // Now it lives long enough (10 s default) before crashing.
        h.ready(G0S0, 7000);
        for _ in 0..10 {
            h.advance(Duration::from_secs(1));
            h.beat(G0S0, 0);
        }
        let t = h.exit(G0S0);
        assert!(
            matches!(t, Transition::Died { restart_in: Some(d), .. } if d == Duration::from_millis(200)),
            "{t:?}"
        );
    }

    #[test]
    fn startup_timeout_kills_a_shard_that_never_gets_ready() {
        let mut h = Harness::new(&[(0, 1)]);
        let pid = h.pid(G0S0);
        h.step_to_timeout();
        assert_eq!(h.killed, vec![pid]);
        assert!(matches!(
            h.p.state(G0S0),
            Some(ShardState::Dead {
                cause: DeathCause::StartupTimeout,
                ..
            })
        ));
        h.exit(G0S0);
        assert!(matches!(h.p.state(G0S0), Some(ShardState::Backoff { .. })));
    }

    #[test]
    fn spawn_failure_backs_off() {
        let now = Instant::now();
        let mut p = SupervisorPolicy::new(SupervisionConfig::default(), &shards(&[(0, 1)]), now);
        let Some(Action::Spawn { shard, generation }) = p.poll_action() else {
            panic!()
        };
        let t = p.handle_spawn_failed(shard, generation, now);
        assert!(matches!(
            t,
            Transition::Died {
                cause: DeathCause::SpawnFailed,
                restart_in: Some(_),
                ..
            }
        ));
        assert_eq!(p.poll_timeout(), Some(now + Duration::from_millis(200)));
    }

    #[test]
    fn drain_sends_drain_stops_restarts_and_kills_at_deadline() {
        let mut h = Harness::new(&[(0, 2), (1, 1)]);
        h.ready(G0S0, 7000);
        h.ready(G0S1, 7001);
        let g1 = ShardId { group: 1, index: 0 };
        h.exit(g1); // in backoff when the drain starts
        let p0 = h.pid(G0S0);
        let p1 = h.pid(G0S1);
        h.p.drain_all(h.now);
        h.run_actions();
        assert_eq!(h.drained, vec![G0S0, G0S1]);
        assert!(
            h.p.ready_shards(0).is_empty(),
            "draining shards are not routable"
        );
        assert_eq!(h.p.state(g1), Some(&ShardState::Stopped));
        // One exits in time, the other does not.
        h.advance(Duration::from_secs(2));
        assert_eq!(
            h.exit(G0S0),
            Transition::Died {
                shard: G0S0,
                cause: DeathCause::Exited,
                restart_in: None
            }
        );
        assert!(!h.p.is_drained());
        h.advance(Duration::from_secs(8));
        assert_eq!(h.killed, vec![p1]);
        assert!(!h.killed.contains(&p0));
        h.exit(G0S1);
        assert!(h.p.is_drained());
        assert_eq!(h.p.poll_timeout(), None);
        // Nothing ever respawns.
        h.advance(Duration::from_secs(60));
        assert_eq!(h.p.state(G0S0), Some(&ShardState::Stopped));
    }

    #[test]
    fn poll_timeout_is_the_earliest_deadline_and_stepping_is_bounded() {
        let mut h = Harness::new(&[(0, 2)]);
        h.ready(G0S0, 7000);
        // Starting shard: startup timeout 10 s; ready shard: 3 s heartbeat deadline.
        assert_eq!(h.p.poll_timeout(), Some(h.now + Duration::from_secs(3)));
        // A shard that never beats and one that never readies: stepping converges to a
        // kill/restart loop with growing delays; bounded iterations, time moves forward.
        let mut last = h.now;
        for _ in 0..50 {
            h.step_to_timeout();
            assert!(h.now >= last);
            last = h.now;
            for s in [G0S0, G0S1] {
                if matches!(h.p.state(s), Some(ShardState::Dead { .. })) {
                    h.exit(s);
                }
            }
        }
        assert!(h.killed.len() >= 2);
    }

    #[test]
    fn backoff_formula() {
        let cfg = SupervisionConfig::default();
        assert_eq!(backoff(&cfg, 0), Duration::from_millis(200));
        assert_eq!(backoff(&cfg, 1), Duration::from_millis(400));
        assert_eq!(backoff(&cfg, 100), Duration::from_secs(10));
    }
}
