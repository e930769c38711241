//! One subscription's data-path decisions on a shard, I/O-free (PROTOCOL.md §6.2, §6.3).
//!
//! ```text
//!  control stream ──handle_frame(Position | Fetch | Forecast, now)──▶ ┌──────────┐
//!  store link     ──handle_owned(partitions) / handle_starts(offsets)─▶ │   Flow   │──poll_transmit──▶ Grant, Assignment
//!  timers         ──handle_timeout(now) at poll_timeout()────────────▶ │          │──poll_relay─────▶ group Position / Forecast
//!  partition pump ──poll_send(p, epoch, now) ─▶ Read{from, ≤records, ≤bytes} | Wait | Stop
//!                 ──admit_batch(p, epoch, batch, now) ─▶ Send | Wait | Stop  └──────────┘──poll_pump──────▶ start / stop / wake a pump
//! ```
//!
//! [`Flow`] holds everything one subscription decides: the token bucket of its `Grant` and
//! the lease renewal, the assignment epoch and the partitions it owns, the client's
//! positions, reactive credit (`Fetch`), and in predictive mode the pre-fetch window of each
//! partition with its starvation boost, the client's advertised buffer and the deviation
//! tracker. The shard-wide [`PrefetchPlanner`] is passed in by the driver where a decision
//! needs it (it is shared by all subscriptions of the shard). The async driver
//! (`session/subscribe.rs`) moves frames, store reads and timers in and out; it never
//! decides.
//!
//! Call order: every input takes `now`, which never goes backwards. After each `handle_*`
//! call the driver drains [`Flow::poll_transmit`], [`Flow::poll_relay`] and
//! [`Flow::poll_pump`], and re-arms its timer at [`Flow::poll_timeout`]. After
//! [`Flow::handle_owned`] it resolves the returned starts and calls [`Flow::handle_starts`]
//! before any other input.
//!
//! Predictive mode (seed 000). The planner turns each `Forecast` into a per-partition depth
//! (predicted rate × lead time, lead = RTT + [`POSITION_LAG`] + the planner's jitter margin,
//! within the shard's memory budget). A pump keeps at most `depth × HEADROOM × boost` records
//! *in flight* (sent and not yet covered by a `Position`), pushes a warm-up batch on a newly
//! assigned partition, and never lets the bytes in flight of the whole subscription exceed
//! the buffer the client advertised in its last `Forecast` ([`DEFAULT_CLIENT_BUFFER`] until
//! one arrives). `boost` doubles when, while the pump was holding back, the client confirms
//! every record sent more than RTT + [`STARVED_MARGIN`] ago (see [`grown_boost`]) and halves
//! with each new forecast. A persistent deviation between positions and the forecast
//! replaces that partition's predicted load with the measured one until the next forecast.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use sibyl_proto::FrameType;
use sibyl_proto::frame::{
    AssignedPartition, Assignment, Forecast, Frame, Mode, PartitionForecast, Start, Subscribe,
};
use tracing::debug;

use crate::grants::TokenBucket;
use crate::predict::{
    DeviationConfig, DeviationTracker, PartitionLoad, PrefetchConfig, PrefetchPlanner, SubKey,
};

/// In-flight records a pump allows per record of planned depth, as (numerator, denominator):
/// 1.5. Serves `sibyl-bench prefetch`'s `wasted_prefetch_ratio` at zero app waits.
pub const HEADROOM: (u64, u64) = (3, 2);
/// Largest starvation boost of a pump's window. Serves `sibyl-bench prefetch`'s waits.
pub const MAX_BOOST: u64 = 64;
/// How late the shard learns what the client consumed: the SDK's position interval in
/// predictive mode. Added to the lead time.
pub const POSITION_LAG: Duration = Duration::from_millis(50);
/// Client buffer assumed until the first `Forecast` advertises one: the SDK's smallest.
pub const DEFAULT_CLIENT_BUFFER: u64 = 64 * 1024;
/// A client counts as starved when it confirmed every record sent more than the RTT plus this
/// ago; see [`grown_boost`].
pub const STARVED_MARGIN: Duration = Duration::from_millis(20);
/// A pump holding back re-checks its window at least this often.
pub const RECHECK: Duration = Duration::from_millis(100);
/// Shortest wait of a pump for grant tokens (avoids spinning on sub-millisecond refills).
pub const MIN_TOKEN_WAIT: Duration = Duration::from_millis(1);

/// Settings of a [`Flow`] (from the shard's `[subscribe]` configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowConfig {
    /// Grant rate, records/s.
    pub grant_rate: u64,
    /// Grant burst, records.
    pub grant_burst: u64,
    /// Grant lease; renewed half-way through.
    pub grant_lease: Duration,
    /// Most records a pump reads in one batch.
    pub batch_records: u32,
    /// About this many bytes per batch.
    pub batch_bytes: u32,
}

/// The flow's timers (one deadline each; [`Flow::poll_timeout`] is the earliest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Half-way through the grant's lease: send a fresh `Grant`.
    GrantRenewal,
    /// The deviation tracker closes a measurement window.
    Deviation,
}

impl Timer {
    /// Every timer, in the order expired ones are handled.
    pub const VALUES: [Self; 2] = [Self::GrantRenewal, Self::Deviation];
}

/// A frame for the control stream, built by the driver (which adds the wall clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// A `Grant`: its lease runs `lease` from when the driver sends it.
    Grant {
        /// Records/s.
        rate: u64,
        /// Records.
        burst: u64,
        /// Lease length.
        lease: Duration,
    },
    /// An `Assignment` (a new epoch).
    Assignment(Assignment),
}

/// A consumer-group report for the hub (over the store link).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRelay {
    /// The client's `Position`.
    Position {
        /// Partition.
        partition: u32,
        /// Next offset the client will consume.
        next_offset: u64,
        /// This shard still serves the partition to the member (the report cannot end a
        /// hand-over).
        serving: bool,
    },
    /// The client's `Forecast` as the group's partition loads.
    Forecast(Vec<PartitionLoad>),
}

/// What the driver does with the partition pumps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PumpEvent {
    /// Start a pump for `partition` in `epoch` at `start`, with this stream priority.
    Start {
        /// Partition.
        partition: u32,
        /// Assignment epoch the pump belongs to.
        epoch: u64,
        /// First offset to send.
        start: u64,
        /// QUIC stream priority.
        priority: i32,
    },
    /// Stop (finish) the pump of `partition` of an earlier epoch.
    Stop(u32),
    /// Wake the pump of `partition`: something it waits for may have changed.
    Wake(u32),
}

/// Where a newly owned partition starts, for the driver to resolve against the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// Kept from the previous epoch: the client's last position (or where it started).
    Kept(u64),
    /// Resolve this `Start` (the group's offset, clamped, or the subscription's start).
    Resolve(Start),
}

/// A pump's next step, from [`Flow::poll_send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpStep {
    /// Read up to `records` records (about `max_bytes`) from `from` and offer the batch to
    /// [`Flow::admit_batch`].
    Read {
        /// First offset.
        from: u64,
        /// At most this many records (≥ 1).
        records: u32,
        /// About this many bytes.
        max_bytes: u32,
    },
    /// Wait for a [`PumpEvent::Wake`] or until `until` (`None`: a wake only).
    Wait {
        /// Re-poll at this instant at the latest.
        until: Option<Instant>,
    },
    /// The pump's epoch is over: finish the stream.
    Stop,
}

/// A pump's poll: its step and, if it changed, its stream's new priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PumpPoll {
    /// What to do.
    pub step: PumpStep,
    /// Set the partition stream's QUIC priority to this first.
    pub priority: Option<i32>,
}

/// A batch a pump read, offered to [`Flow::admit_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// The offset after its last record.
    pub next_offset: u64,
    /// Bytes of its record section (what the client buffers).
    pub bytes: u64,
    /// Records in it (≥ 1).
    pub records: u64,
}

/// What to do with a batch that was read, from [`Flow::admit_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Send it (it is now counted in flight).
    Send,
    /// It does not fit the client's free buffer yet: wait for a wake or `until`, then offer
    /// it again.
    Wait {
        /// Offer again at this instant at the latest.
        until: Instant,
    },
    /// The pump's epoch is over.
    Stop,
}

/// A client frame the control stream does not carry after `Subscribe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// The peer sent a frame type that has no meaning here (protocol violation).
    #[error("unexpected {0:?} frame on a subscription's control stream")]
    Unexpected(FrameType),
}

/// A partition's pre-fetch window (predictive mode).
#[derive(Debug, Clone)]
struct Window {
    /// Batches sent and not yet covered by a `Position`: (offset after the batch, bytes, sent
    /// at).
    sent: VecDeque<(u64, u64, Instant)>,
    /// Sum of `sent` bytes.
    bytes: u64,
    /// Starvation multiplier of the depth (1 ..= [`MAX_BOOST`]).
    boost: u64,
    /// The last check found no room.
    held: bool,
    /// The flow's forecast count when the boost was last halved.
    forecasts_seen: u64,
    /// The stream's current QUIC priority.
    priority: i32,
}

/// A partition owned in the current epoch.
#[derive(Debug, Clone)]
struct Part {
    /// Where its pump started.
    start: u64,
    /// The next offset its pump sends.
    next: u64,
    /// Reactive: records the client asked for (`Fetch`) and not yet sent.
    credit: u64,
    /// Predictive: the client's latest `Position` on it.
    acked: u64,
    window: Window,
}

/// One subscription's decisions on a shard: grant, epochs, positions, credit, pre-fetch
/// windows, deviations. See the module doc for the call order.
#[derive(Debug)]
pub struct Flow {
    cfg: FlowConfig,
    sub_id: u32,
    mode: Mode,
    group: bool,
    start: Start,
    /// The stream's partition count: entries naming other partitions are ignored.
    partitions: u32,
    key: SubKey,
    bucket: TokenBucket,
    epoch: u64,
    /// Partitions owned in `epoch` (after [`Flow::handle_starts`]).
    parts: BTreeMap<u32, Part>,
    /// Partitions of the epoch [`Flow::handle_owned`] opened, until [`Flow::handle_starts`].
    pending: BTreeSet<u32>,
    positions: BTreeMap<u32, u64>,
    /// Partitions this subscription held and no longer owns: the epoch that revoked each (at
    /// most one entry per partition of the stream).
    revoked: BTreeMap<u32, u64>,
    /// The client's advertised pre-fetch buffer (bytes).
    capacity: u64,
    /// Bytes sent on all partition streams and not yet covered by a `Position`.
    inflight_bytes: u64,
    /// `Forecast`s received.
    forecasts: u64,
    deviation: DeviationTracker,
    last_forecast: Option<Forecast>,
    transmits: VecDeque<Transmit>,
    relays: VecDeque<GroupRelay>,
    pumps: VecDeque<PumpEvent>,
}

impl Flow {
    /// A subscription accepted at `now`: queues its first `Grant`. In predictive mode the
    /// planner learns its lead time (`rtt`: the connection's current RTT).
    pub fn new(
        cfg: FlowConfig,
        sub: &Subscribe,
        partitions: u32,
        key: SubKey,
        now: Instant,
        rtt: Duration,
        planner: &mut PrefetchPlanner,
    ) -> Self {
        let bucket = TokenBucket::new(cfg.grant_rate, cfg.grant_burst, cfg.grant_lease, now);
        let mut f = Self {
            cfg,
            sub_id: sub.sub_id,
            mode: sub.mode,
            group: sub.group.is_some(),
            start: sub.start.clone(),
            partitions,
            key,
            bucket,
            epoch: 0,
            parts: BTreeMap::new(),
            pending: BTreeSet::new(),
            positions: BTreeMap::new(),
            revoked: BTreeMap::new(),
            capacity: DEFAULT_CLIENT_BUFFER,
            inflight_bytes: 0,
            forecasts: 0,
            deviation: DeviationTracker::new(DeviationConfig::default()),
            last_forecast: None,
            transmits: VecDeque::new(),
            relays: VecDeque::new(),
            pumps: VecDeque::new(),
        };
        f.queue_grant();
        if f.predictive() {
            planner.set_rtt(key, rtt + POSITION_LAG);
        }
        f
    }

    fn predictive(&self) -> bool {
        self.mode == Mode::Predictive
    }

    /// The current assignment epoch (0 before the first).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes sent and not yet covered by a `Position` (predictive mode).
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight_bytes
    }

    fn queue_grant(&mut self) {
        self.transmits.push_back(Transmit::Grant {
            rate: self.bucket.rate(),
            burst: self.bucket.burst(),
            lease: self.bucket.lease(),
        });
    }

    fn wake_all(&mut self) {
        self.pumps
            .extend(self.parts.keys().map(|&p| PumpEvent::Wake(p)));
    }

    /// The next frame for the control stream.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next consumer-group report for the hub (only for a group subscription).
    pub fn poll_relay(&mut self) -> Option<GroupRelay> {
        self.relays.pop_front()
    }

    /// The next thing to do with the partition pumps.
    pub fn poll_pump(&mut self) -> Option<PumpEvent> {
        self.pumps.pop_front()
    }

    fn deadline(&self, t: Timer) -> Option<Instant> {
        match t {
            Timer::GrantRenewal => Some(self.bucket.renew_at()),
            Timer::Deviation => self.deviation.poll_timeout(),
        }
    }

    /// When [`Flow::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Timer::VALUES.iter().filter_map(|&t| self.deadline(t)).min()
    }

    /// Handles every timer expired at `now`.
    pub fn handle_timeout(&mut self, now: Instant, planner: &mut PrefetchPlanner) {
        for t in Timer::VALUES {
            if self.deadline(t).is_none_or(|at| at > now) {
                continue;
            }
            match t {
                Timer::GrantRenewal => {
                    self.bucket.renewed(now);
                    self.queue_grant();
                }
                Timer::Deviation => {
                    self.deviation.handle_timeout(now);
                    self.on_deviations(planner);
                }
            }
        }
    }

    /// A client frame on the control stream after `Subscribe` (PROTOCOL.md §6.2):
    /// `Position`, `Fetch` and `Forecast` entries for partitions the stream does not have are
    /// ignored and leave no state; `Fetch` for a partition not assigned now is ignored (no
    /// credit kept); `Forecast` is ignored in reactive mode. Any other frame is an error.
    pub fn handle_frame(
        &mut self,
        frame: Frame,
        now: Instant,
        rtt: Duration,
        planner: &mut PrefetchPlanner,
    ) -> Result<(), FlowError> {
        match frame {
            Frame::Position(p) if p.partition >= self.partitions => {}
            Frame::Position(p) => {
                self.positions.insert(p.partition, p.next_offset);
                if self.predictive() {
                    self.deviation
                        .position(self.key, p.partition, p.next_offset, now);
                    // A position can close a measurement window too.
                    self.on_deviations(planner);
                    if let Some(part) = self.parts.get_mut(&p.partition) {
                        part.acked = part.acked.max(p.next_offset);
                        self.pumps.push_back(PumpEvent::Wake(p.partition));
                    }
                }
                if self.group {
                    // The hub records it (owner) or completes a hand-over (previous owner); a
                    // stale report changes nothing there. Not `serving` once this shard applied
                    // a revocation and the client had processed it (its epoch, when it sends
                    // one, is at or after the revoking epoch), so a report sent before the
                    // revocation cannot end a hand-over.
                    let stale = match (p.epoch, self.revoked.get(&p.partition)) {
                        (Some(e), Some(&revoked_in)) => e < revoked_in,
                        _ => false,
                    };
                    self.relays.push_back(GroupRelay::Position {
                        partition: p.partition,
                        next_offset: p.next_offset,
                        serving: stale
                            || self.parts.contains_key(&p.partition)
                            || self.pending.contains(&p.partition),
                    });
                }
            }
            Frame::Fetch(f) => {
                if let Some(part) = self.parts.get_mut(&f.partition) {
                    part.credit = part.credit.saturating_add(u64::from(f.max_records));
                    self.pumps.push_back(PumpEvent::Wake(f.partition));
                }
            }
            Frame::Forecast(f) => {
                if self.predictive() {
                    self.on_forecast(f, now, rtt, planner);
                }
            }
            other => return Err(FlowError::Unexpected(other.frame_type())),
        }
        Ok(())
    }

    /// A `Forecast` in predictive mode: the planner's rates, depth and lead time, the client's
    /// buffer, the deviation tracker's predictions, the group's loads; pumps re-plan. Entries
    /// for partitions the stream does not have are dropped first, so the work is bounded by
    /// the stream's size.
    fn on_forecast(
        &mut self,
        mut f: Forecast,
        now: Instant,
        rtt: Duration,
        planner: &mut PrefetchPlanner,
    ) {
        let partitions = self.partitions;
        f.partitions.retain(|p| p.partition < partitions);
        planner.set_rtt(self.key, rtt + POSITION_LAG);
        planner.update_forecast(self.key, &f);
        for pf in &f.partitions {
            self.deviation
                .predict(self.key, pf.partition, pf.records_per_s as f64, now);
        }
        self.capacity = f.buffer_capacity_bytes;
        self.forecasts += 1;
        if self.group {
            // The group's partition loads (rate-aware assignment at the hub).
            let loads = f.partitions.iter().map(PartitionLoad::from).collect();
            self.relays.push_back(GroupRelay::Forecast(loads));
        }
        self.last_forecast = Some(f);
        self.wake_all();
    }

    /// Persistent deviations between positions and the forecast: until the next `Forecast`,
    /// the planner uses the measured rate of each deviating partition as its load.
    fn on_deviations(&mut self, planner: &mut PrefetchPlanner) {
        let flagged: Vec<_> = std::iter::from_fn(|| self.deviation.poll_flagged()).collect();
        let Some(last) = &self.last_forecast else {
            return;
        };
        if flagged.is_empty() {
            return;
        }
        let mut f = last.clone();
        for d in flagged {
            debug!(
                partition = d.partition,
                predicted = d.predicted,
                actual = d.actual,
                "forecast deviates; planning with the measured rate"
            );
            if let Some(pf) = f.partitions.iter_mut().find(|p| p.partition == d.partition) {
                let per_record = pf.bytes_per_s.checked_div(pf.records_per_s).unwrap_or(0);
                pf.records_per_s = d.actual.round() as u64;
                pf.bytes_per_s = pf.records_per_s.saturating_mul(per_record);
            } else {
                f.partitions.push(PartitionForecast {
                    partition: d.partition,
                    records_per_s: d.actual.round() as u64,
                    bytes_per_s: 0,
                });
            }
        }
        planner.update_forecast(self.key, &f);
        self.wake_all();
    }

    /// A new complete set of owned partitions (each with the offset a newly given one starts
    /// at; `None`: the subscription's start) opens the next epoch: every pump of the previous
    /// epoch stops (the client treats its streams as stale), and the planner and deviation
    /// tracker follow. Returns where each owned partition starts — a kept one at the client's
    /// last `Position` (the SDK drops what it already has), a new one to be resolved — for
    /// [`Flow::handle_starts`].
    pub fn handle_owned(
        &mut self,
        owned: Vec<(u32, Option<u64>)>,
        planner: &mut PrefetchPlanner,
    ) -> Vec<(u32, StartAt)> {
        self.epoch += 1;
        let previous = std::mem::take(&mut self.parts);
        for (&p, part) in &previous {
            // The client drops (or already counted) what the stopped stream carried.
            self.inflight_bytes = self.inflight_bytes.saturating_sub(part.window.bytes);
            self.pumps.push_back(PumpEvent::Stop(p));
        }
        let mut owned = owned;
        owned.retain(|&(p, _)| p < self.partitions);
        owned.sort_unstable();
        owned.dedup_by_key(|(p, _)| *p);
        for p in previous.keys() {
            if owned.binary_search_by_key(p, |(o, _)| *o).is_err() {
                self.revoked.insert(*p, self.epoch);
            }
        }
        for (p, _) in &owned {
            self.revoked.remove(p);
        }
        if self.predictive() {
            for p in previous.keys() {
                if !owned.iter().any(|(o, _)| o == p) {
                    planner.revoked(self.key, *p);
                    self.deviation.remove(self.key, *p);
                }
            }
            for (p, _) in &owned {
                // Warm-up: a partition new to this subscription gets a warm-up batch.
                planner.assigned(self.key, *p);
            }
        }
        self.pending.clear();
        owned
            .into_iter()
            .map(|(p, known)| {
                let at = match previous.get(&p) {
                    Some(part) => {
                        StartAt::Kept(self.positions.get(&p).copied().unwrap_or(part.start))
                    }
                    None => match known {
                        Some(o) => StartAt::Resolve(Start::Offsets([(p, o)].into_iter().collect())),
                        None => StartAt::Resolve(self.start.clone()),
                    },
                };
                self.pending.insert(p);
                (p, at)
            })
            .collect()
    }

    /// The resolved start offset of every partition [`Flow::handle_owned`] returned: queues
    /// the `Assignment` and a [`PumpEvent::Start`] per partition (entries for partitions it
    /// did not return are ignored).
    pub fn handle_starts(&mut self, starts: Vec<(u32, u64)>, planner: &PrefetchPlanner) {
        let pending = std::mem::take(&mut self.pending);
        let mut parts = Vec::with_capacity(starts.len());
        for (p, start) in starts {
            if !pending.contains(&p) || self.parts.contains_key(&p) {
                continue;
            }
            let priority = if self.predictive() {
                planner.priority(self.key, p)
            } else {
                0
            };
            self.parts.insert(
                p,
                Part {
                    start,
                    next: start,
                    credit: 0,
                    acked: start,
                    window: Window {
                        sent: VecDeque::new(),
                        bytes: 0,
                        boost: 1,
                        held: false,
                        forecasts_seen: 0,
                        priority,
                    },
                },
            );
            parts.push(AssignedPartition {
                partition: p,
                start_offset: start,
                priority,
            });
        }
        self.transmits.push_back(Transmit::Assignment(Assignment {
            sub_id: self.sub_id,
            epoch: self.epoch,
            partitions: parts.clone(),
        }));
        for ap in parts {
            self.pumps.push_back(PumpEvent::Start {
                partition: ap.partition,
                epoch: self.epoch,
                start: ap.start_offset,
                priority: ap.priority,
            });
        }
    }

    /// The pump of `partition` in `epoch` asks what to do next: the pre-fetch window
    /// (predictive), the client's credit (reactive) and the grant's tokens bound the read.
    pub fn poll_send(
        &mut self,
        partition: u32,
        epoch: u64,
        now: Instant,
        rtt: Duration,
        planner: &mut PrefetchPlanner,
    ) -> PumpPoll {
        let mut poll = PumpPoll {
            step: PumpStep::Stop,
            priority: None,
        };
        if epoch != self.epoch {
            return poll;
        }
        let Some(part) = self.parts.get_mut(&partition) else {
            return poll;
        };
        let mut want = u64::from(self.cfg.batch_records);
        let mut max_bytes = u64::from(self.cfg.batch_bytes);
        if self.mode == Mode::Predictive {
            let room = room(
                RoomCtx {
                    key: self.key,
                    partition,
                    capacity: self.capacity,
                    forecasts: self.forecasts,
                    starved_after: rtt + STARVED_MARGIN,
                    now,
                },
                part,
                &mut self.inflight_bytes,
                planner,
            );
            poll.priority = room.priority;
            if room.records == 0 {
                poll.step = PumpStep::Wait {
                    until: Some(now + RECHECK),
                };
                return poll;
            }
            want = want.min(room.records);
            max_bytes = max_bytes.min(room.bytes);
        }
        if self.mode == Mode::Reactive {
            if part.credit == 0 {
                poll.step = PumpStep::Wait { until: None };
                return poll;
            }
            want = want.min(part.credit);
        }
        match self.bucket.available(now) {
            0 => {
                let wait = self.bucket.wait_for(1, now).max(MIN_TOKEN_WAIT);
                poll.step = PumpStep::Wait {
                    until: Some(now + wait),
                };
            }
            n => {
                poll.step = PumpStep::Read {
                    from: part.next,
                    // ≤ batch_records (a u32).
                    records: u32::try_from(want.min(n)).unwrap_or(u32::MAX),
                    // ≤ batch_bytes (a u32).
                    max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
                };
            }
        }
        poll
    }

    /// The pump of `partition` in `epoch` read `batch`. A batch is at least one record, which may be larger than the client's
    /// free buffer: in predictive mode it waits until it fits or nothing of the subscription is
    /// in flight. Admitted, it is counted in flight, against the grant and the credit.
    pub fn admit_batch(
        &mut self,
        partition: u32,
        epoch: u64,
        batch: Batch,
        now: Instant,
        planner: &mut PrefetchPlanner,
    ) -> Admit {
        if epoch != self.epoch {
            return Admit::Stop;
        }
        let Some(part) = self.parts.get_mut(&partition) else {
            return Admit::Stop;
        };
        let Batch {
            next_offset,
            bytes: body,
            records: count,
        } = batch;
        if self.mode == Mode::Predictive {
            settle(part, &mut self.inflight_bytes);
            if self.forecasts != 0
                && body > self.capacity.saturating_sub(self.inflight_bytes)
                && self.inflight_bytes != 0
            {
                return Admit::Wait {
                    until: now + RECHECK,
                };
            }
            part.window.sent.push_back((next_offset, body, now));
            part.window.bytes += body;
            self.inflight_bytes += body;
            planner.on_pushed(self.key, partition, count);
        }
        self.bucket.consume(count, now);
        if self.mode == Mode::Reactive {
            part.credit = part.credit.saturating_sub(count);
        }
        part.next = next_offset;
        Admit::Send
    }

    /// Retention deleted what the pump was about to send: it continues at `earliest`.
    pub fn handle_skip(&mut self, partition: u32, epoch: u64, earliest: u64) {
        if epoch != self.epoch {
            return;
        }
        if let Some(part) = self.parts.get_mut(&partition)
            && part.next < earliest
        {
            part.next = earliest;
        }
    }
}

/// What [`room`] needs of the flow besides the partition.
struct RoomCtx {
    key: SubKey,
    partition: u32,
    capacity: u64,
    forecasts: u64,
    starved_after: Duration,
    now: Instant,
}

/// How much a predictive pump may push now.
struct Room {
    records: u64,
    bytes: u64,
    priority: Option<i32>,
}

/// Forgets in-flight batches the client's `Position` covers.
fn settle(part: &mut Part, inflight_bytes: &mut u64) {
    let w = &mut part.window;
    while let Some(&(end, bytes, _)) = w.sent.front() {
        if end > part.acked {
            break;
        }
        w.sent.pop_front();
        w.bytes -= bytes;
        *inflight_bytes = inflight_bytes.saturating_sub(bytes);
    }
}

/// Predictive: how many records and bytes the partition may push now (zero records: hold).
fn room(
    cx: RoomCtx,
    part: &mut Part,
    inflight_bytes: &mut u64,
    planner: &mut PrefetchPlanner,
) -> Room {
    settle(part, inflight_bytes);
    if cx.forecasts == 0 {
        // No `Forecast` yet (a client that does not forecast): push within flow control and
        // the grant only; what is sent is still counted for when one arrives.
        return Room {
            records: u64::MAX,
            bytes: u64::MAX,
            priority: None,
        };
    }
    let w = &mut part.window;
    if cx.forecasts != w.forecasts_seen {
        w.forecasts_seen = cx.forecasts;
        w.boost = (w.boost / 2).max(1);
    }
    let inflight = part.next.saturating_sub(part.acked);
    let depth = planner.depth(cx.key, cx.partition).records;
    let warm = planner.warmup_left(cx.key, cx.partition);
    let priority = planner.priority(cx.key, cx.partition);
    let changed = (priority != w.priority).then_some(priority);
    w.priority = priority;
    let base = if depth == 0 {
        // No forecast for this partition yet: a warm-up-sized window until one arrives.
        PrefetchConfig::default().warmup_records
    } else {
        depth.saturating_mul(HEADROOM.0).div_ceil(HEADROOM.1)
    };
    w.boost = grown_boost(
        w.boost,
        w.held,
        w.sent
            .front()
            .map(|&(_, _, at)| cx.now.saturating_duration_since(at)),
        cx.starved_after,
    );
    let records = base
        .saturating_mul(w.boost)
        .saturating_sub(inflight)
        .max(warm);
    let bytes = cx.capacity.saturating_sub(*inflight_bytes);
    w.held = records == 0 || bytes == 0;
    if w.held {
        Room {
            records: 0,
            bytes: 0,
            priority: changed,
        }
    } else {
        Room {
            records,
            bytes,
            priority: changed,
        }
    }
}

/// The starvation boost after a pump's re-check: doubled (≤ [`MAX_BOOST`]) when the last
/// check held back (`held`) and the client has since confirmed (by `Position`) every record
/// sent more than `starved_after` ago (`oldest_unacked`: the age of the oldest batch it has
/// not confirmed, `None` when it confirmed everything); unchanged otherwise. Such a client
/// consumes what arrives as soon as it arrives: the window, not the client, limits delivery
/// (the forecast lags a rate increase, or a reader catching up on a backlog has no forecast
/// yet). A client reading at the forecast rate keeps about a lead time of records unconsumed,
/// so its oldest unconfirmed batch is older than that and the window stays. Records on the
/// wire when a catching-up reader sends its `Position` are never confirmed by it, hence "every
/// record older than", not "everything".
pub fn grown_boost(
    boost: u64,
    held: bool,
    oldest_unacked: Option<Duration>,
    starved_after: Duration,
) -> u64 {
    if held && oldest_unacked.is_none_or(|age| age < starved_after) {
        boost.saturating_mul(2).clamp(1, MAX_BOOST)
    } else {
        boost
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use sibyl_proto::FrameType;
    use sibyl_proto::frame::{
        Fetch, Forecast, Frame, Mode, PartitionForecast, Position, Start, Subscribe,
    };

    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const RTT: Duration = Duration::from_millis(10);
    const KEY: SubKey = SubKey(7);
    const PARTITIONS: u32 = 4;

    fn cfg() -> FlowConfig {
        FlowConfig {
            grant_rate: 1_000_000,
            grant_burst: 1_000_000,
            grant_lease: Duration::from_secs(60),
            batch_records: 1024,
            batch_bytes: 1 << 20,
        }
    }

    fn batch(next_offset: u64, bytes: u64, records: u64) -> Batch {
        Batch {
            next_offset,
            bytes,
            records,
        }
    }

    /// A flow on a 4-partition stream with its own planner, at virtual time `now`.
    struct Harness {
        flow: Flow,
        planner: PrefetchPlanner,
        now: Instant,
    }

    impl Harness {
        fn new(mode: Mode, group: bool) -> Self {
            Self::with_cfg(mode, group, cfg())
        }

        fn with_cfg(mode: Mode, group: bool, cfg: FlowConfig) -> Self {
            let mut planner = PrefetchPlanner::new(PrefetchConfig::default());
            let now = Instant::now();
            let sub = Subscribe {
                sub_id: 3,
                stream: "s".into(),
                start: Start::Earliest,
                group: group.then(|| "g".into()),
                mode,
            };
            let flow = Flow::new(cfg, &sub, PARTITIONS, KEY, now, RTT, &mut planner);
            Self { flow, planner, now }
        }

        fn frame(&mut self, f: Frame) -> Result<(), FlowError> {
            self.flow.handle_frame(f, self.now, RTT, &mut self.planner)
        }

        fn position(&mut self, partition: u32, next_offset: u64) {
            self.position_in(partition, next_offset, None);
        }

        /// A `Position` the client produced after processing assignment `epoch`.
        fn position_in(&mut self, partition: u32, next_offset: u64, epoch: Option<u64>) {
            self.frame(Frame::Position(Position {
                partition,
                next_offset,
                epoch,
            }))
            .unwrap();
        }

        fn forecast(&mut self, rates: &[(u32, u64, u64)], capacity: u64) {
            let partitions = rates
                .iter()
                .map(
                    |&(partition, records_per_s, bytes_per_s)| PartitionForecast {
                        partition,
                        records_per_s,
                        bytes_per_s,
                    },
                )
                .collect();
            self.frame(Frame::Forecast(Forecast {
                partitions,
                buffer_capacity_bytes: capacity,
            }))
            .unwrap();
        }

        /// Opens an epoch owning `owned` and resolves every start to `resolved` (kept ones
        /// where the flow says).
        fn own(&mut self, owned: &[(u32, Option<u64>)], resolved: u64) -> Vec<(u32, StartAt)> {
            let plan = self.flow.handle_owned(owned.to_vec(), &mut self.planner);
            let starts = plan
                .iter()
                .map(|(p, at)| match at {
                    StartAt::Kept(o) => (*p, *o),
                    StartAt::Resolve(_) => (*p, resolved),
                })
                .collect();
            self.flow.handle_starts(starts, &self.planner);
            plan
        }

        fn send(&mut self, p: u32) -> PumpPoll {
            let epoch = self.flow.epoch();
            self.flow
                .poll_send(p, epoch, self.now, RTT, &mut self.planner)
        }

        /// Reads what the flow allows on `p` (`bytes_per_record` each) and admits it.
        fn pump(&mut self, p: u32, bytes_per_record: u64) -> Option<(u64, u64)> {
            let PumpStep::Read {
                from,
                records,
                max_bytes,
            } = self.send(p).step
            else {
                return None;
            };
            let n = u64::from(records)
                .min(u64::from(max_bytes) / bytes_per_record)
                .max(1);
            let epoch = self.flow.epoch();
            let admit = self.flow.admit_batch(
                p,
                epoch,
                batch(from + n, n * bytes_per_record, n),
                self.now,
                &mut self.planner,
            );
            (admit == Admit::Send).then_some((from, n))
        }

        /// Pumps `p` until the flow stops allowing reads: records sent and the step that
        /// ended it.
        fn fill(&mut self, p: u32, bytes_per_record: u64) -> (u64, PumpStep) {
            let mut sent = 0;
            for _ in 0..10_000 {
                let step = self.send(p).step;
                if !matches!(step, PumpStep::Read { .. }) {
                    return (sent, step);
                }
                sent += self.pump(p, bytes_per_record).expect("admitted").1;
            }
            panic!("the window never closed")
        }

        fn drain(&mut self) -> (Vec<Transmit>, Vec<GroupRelay>, Vec<PumpEvent>) {
            (
                std::iter::from_fn(|| self.flow.poll_transmit()).collect(),
                std::iter::from_fn(|| self.flow.poll_relay()).collect(),
                std::iter::from_fn(|| self.flow.poll_pump()).collect(),
            )
        }

        /// Steps virtual time to the next timer (bounded), handling it.
        fn step_timer(&mut self) -> Instant {
            let at = self
                .flow
                .poll_timeout()
                .expect("a grant always has a renewal");
            self.now = self.now.max(at);
            self.flow.handle_timeout(self.now, &mut self.planner);
            at
        }
    }

    #[test]
    fn the_grant_is_sent_at_once_and_renewed_half_way_through_each_lease() {
        let mut h = Harness::new(Mode::Reactive, false);
        let start = h.now;
        let (t, _, _) = h.drain();
        assert_eq!(
            t,
            vec![Transmit::Grant {
                rate: 1_000_000,
                burst: 1_000_000,
                lease: Duration::from_secs(60)
            }]
        );
        assert_eq!(h.flow.poll_timeout(), Some(start + Duration::from_secs(30)));
        // Nothing before the deadline.
        h.flow
            .handle_timeout(start + Duration::from_secs(29), &mut h.planner);
        assert!(h.drain().0.is_empty());
        for lease in 1..=3u32 {
            let at = h.step_timer();
            assert_eq!(at, start + Duration::from_secs(30) * lease);
            assert!(matches!(h.drain().0.as_slice(), [Transmit::Grant { .. }]));
        }
    }

    #[test]
    fn an_epoch_assigns_every_owned_partition_and_starts_its_pump() {
        let mut h = Harness::new(Mode::Reactive, false);
        h.drain();
        let plan = h.own(&[(1, None), (0, Some(5)), (9, None)], 5);
        // Sorted; a partition the stream does not have is never assigned.
        assert_eq!(
            plan,
            vec![
                (
                    0,
                    StartAt::Resolve(Start::Offsets([(0, 5)].into_iter().collect()))
                ),
                (1, StartAt::Resolve(Start::Earliest)),
            ]
        );
        let (t, _, pumps) = h.drain();
        let [Transmit::Assignment(a)] = t.as_slice() else {
            panic!("{t:?}")
        };
        assert_eq!((a.sub_id, a.epoch), (3, 1));
        assert_eq!(
            a.partitions.iter().map(|p| p.partition).collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(
            pumps,
            vec![
                PumpEvent::Start {
                    partition: 0,
                    epoch: 1,
                    start: 5,
                    priority: 0
                },
                PumpEvent::Start {
                    partition: 1,
                    epoch: 1,
                    start: 5,
                    priority: 0
                },
            ]
        );
    }

    #[test]
    fn a_new_epoch_stops_the_old_pumps_and_keeps_a_kept_partition_at_the_clients_position() {
        let mut h = Harness::new(Mode::Reactive, true);
        h.own(&[(0, Some(0)), (1, Some(0))], 0);
        h.position(1, 42);
        h.drain();
        let plan = h.own(&[(1, Some(7)), (2, Some(9))], 9);
        assert_eq!(
            plan,
            vec![
                (1, StartAt::Kept(42)),
                (
                    2,
                    StartAt::Resolve(Start::Offsets([(2, 9)].into_iter().collect()))
                ),
            ]
        );
        let (t, _, pumps) = h.drain();
        assert!(matches!(t.as_slice(), [Transmit::Assignment(a)] if a.epoch == 2));
        assert_eq!(pumps[..2], [PumpEvent::Stop(0), PumpEvent::Stop(1)]);
        assert!(matches!(
            pumps[2],
            PumpEvent::Start {
                partition: 1,
                epoch: 2,
                start: 42,
                ..
            }
        ));
        // A pump of the old epoch is told to stop, whatever it asks.
        assert_eq!(
            h.flow.poll_send(0, 1, h.now, RTT, &mut h.planner).step,
            PumpStep::Stop
        );
        assert_eq!(
            h.flow
                .admit_batch(1, 1, batch(50, 10, 1), h.now, &mut h.planner),
            Admit::Stop
        );
        // Hand-over: a position on a partition no longer served is relayed as not serving.
        h.position(0, 11);
        h.position(2, 12);
        assert_eq!(
            h.drain().1,
            vec![
                GroupRelay::Position {
                    partition: 0,
                    next_offset: 11,
                    serving: false
                },
                GroupRelay::Position {
                    partition: 2,
                    next_offset: 12,
                    serving: true
                },
            ]
        );
    }

    #[test]
    fn a_position_sent_before_the_revoking_epoch_does_not_end_the_hand_over() {
        let serving = |h: &mut Harness| match h.drain().1.as_slice() {
            [GroupRelay::Position { serving, .. }] => *serving,
            other => panic!("{other:?}"),
        };
        let mut h = Harness::new(Mode::Reactive, true);
        h.own(&[(0, Some(0)), (1, Some(0))], 0);
        h.own(&[(0, None), (1, None)], 0);
        h.drain();
        // Epoch 3 revokes partition 1.
        h.own(&[(0, None)], 0);
        h.drain();
        // Produced before the client processed epoch 3: stale, cannot end the hand-over.
        h.position_in(1, 20, Some(2));
        assert!(serving(&mut h));
        // The final one, produced after it (or later still).
        h.position_in(1, 25, Some(3));
        assert!(!serving(&mut h));
        h.own(&[(0, None)], 0);
        h.drain();
        h.position_in(1, 25, Some(4));
        assert!(!serving(&mut h));
        // Without an epoch (an older client): today's rule, final.
        h.position_in(1, 25, None);
        assert!(!serving(&mut h));
        // Given back in epoch 5 and revoked again in 6: the new revocation counts.
        h.own(&[(0, None), (1, None)], 0);
        h.drain();
        h.position_in(1, 30, Some(4));
        assert!(serving(&mut h), "served again");
        h.own(&[(0, None)], 0);
        h.drain();
        h.position_in(1, 31, Some(5));
        assert!(serving(&mut h));
        h.position_in(1, 31, Some(6));
        assert!(!serving(&mut h));
        // A partition this subscription never held: today's rule.
        h.position_in(2, 1, Some(1));
        assert!(!serving(&mut h));
    }

    #[test]
    fn reactive_pumps_send_only_what_fetch_asked_for() {
        let mut h = Harness::new(Mode::Reactive, false);
        h.own(&[(0, None), (1, None)], 0);
        h.drain();
        assert_eq!(h.send(0).step, PumpStep::Wait { until: None });
        h.frame(Frame::Fetch(Fetch {
            partition: 0,
            max_records: 10,
        }))
        .unwrap();
        assert_eq!(h.drain().2, vec![PumpEvent::Wake(0)]);
        assert_eq!(
            h.send(0).step,
            PumpStep::Read {
                from: 0,
                records: 10,
                max_bytes: 1 << 20
            }
        );
        // The pump read 6; 4 left, from 6.
        assert_eq!(
            h.flow
                .admit_batch(0, 1, batch(6, 600, 6), h.now, &mut h.planner),
            Admit::Send
        );
        assert!(matches!(
            h.send(0).step,
            PumpStep::Read {
                from: 6,
                records: 4,
                ..
            }
        ));
        assert_eq!(h.pump(0, 100), Some((6, 4)));
        assert_eq!(h.send(0).step, PumpStep::Wait { until: None });
        // Other partitions have their own credit.
        assert_eq!(h.send(1).step, PumpStep::Wait { until: None });
    }

    #[test]
    fn fetch_for_a_partition_not_assigned_keeps_no_credit() {
        let mut h = Harness::new(Mode::Reactive, false);
        let fetch = |partition| {
            Frame::Fetch(Fetch {
                partition,
                max_records: 10,
            })
        };
        // Before the first epoch, and for a partition the stream does not have.
        h.frame(fetch(0)).unwrap();
        h.frame(fetch(PARTITIONS)).unwrap();
        h.frame(fetch(u32::MAX)).unwrap();
        h.own(&[(0, None)], 0);
        h.drain();
        assert_eq!(h.send(0).step, PumpStep::Wait { until: None });
    }

    #[test]
    fn the_grant_bounds_every_read_and_a_drained_bucket_waits_for_its_refill() {
        let mut h = Harness::with_cfg(
            Mode::Predictive,
            false,
            FlowConfig {
                grant_rate: 1000,
                grant_burst: 100,
                ..cfg()
            },
        );
        h.own(&[(0, None)], 0);
        assert_eq!(h.pump(0, 10), Some((0, 100)));
        // Empty: one record takes 1 ms at 1000/s.
        assert_eq!(
            h.send(0).step,
            PumpStep::Wait {
                until: Some(h.now + MS)
            }
        );
        h.now += 10 * MS;
        assert!(matches!(h.send(0).step, PumpStep::Read { records: 10, .. }));
    }

    #[test]
    fn positions_and_frames_for_partitions_outside_the_stream_leave_no_state() {
        let mut h = Harness::new(Mode::Predictive, true);
        h.own(&[(0, None)], 0);
        h.drain();
        h.position(PARTITIONS, 5);
        h.position(u32::MAX, 5);
        h.forecast(&[(PARTITIONS, 100, 1000), (0, 100, 1000)], 1 << 20);
        let (_, relays, _) = h.drain();
        // Only the in-stream forecast entry travels; no position was relayed.
        assert_eq!(
            relays,
            vec![GroupRelay::Forecast(vec![PartitionLoad {
                partition: 0,
                records_per_s: 100,
                bytes_per_s: 1000
            }])]
        );
        assert_eq!(h.planner.depth(KEY, PARTITIONS).records, 0);
        // A later epoch keeps nothing for them either.
        let plan = h.own(&[(PARTITIONS, Some(5))], 0);
        assert!(plan.is_empty());
    }

    #[test]
    fn reactive_mode_ignores_forecasts_and_other_frames_are_errors() {
        let mut h = Harness::new(Mode::Reactive, true);
        h.forecast(&[(0, 100, 1000)], 1);
        assert!(h.drain().1.is_empty());
        assert_eq!(h.planner.allocated_bytes(), 0);
        let e = h.frame(Frame::Fetch(Fetch {
            partition: 0,
            max_records: 1,
        }));
        assert!(e.is_ok());
        let bad = h.frame(Frame::Grant(sibyl_proto::frame::Grant {
            rate_records_per_s: 1,
            burst: 1,
            lease_expires_ms: 0,
        }));
        assert_eq!(bad, Err(FlowError::Unexpected(FrameType::Grant)));
    }

    #[test]
    fn without_a_forecast_a_predictive_pump_sends_within_the_grant_only() {
        let mut h = Harness::new(Mode::Predictive, false);
        h.own(&[(0, None)], 0);
        for _ in 0..10 {
            assert!(h.pump(0, 100).is_some());
        }
        // What was sent is counted in flight for when a forecast arrives.
        assert_eq!(h.flow.inflight_bytes(), 10 * 1024 * 100);
    }

    #[test]
    fn the_window_holds_at_depth_times_headroom_and_positions_reopen_it() {
        let mut h = Harness::new(Mode::Predictive, false);
        h.own(&[(0, None)], 0);
        // 1000 records/s of 100 bytes, a large client buffer.
        h.forecast(&[(0, 1000, 100_000)], 64 << 20);
        let depth = h.planner.depth(KEY, 0).records;
        assert!(depth > 0);
        let window = (depth * HEADROOM.0).div_ceil(HEADROOM.1);
        let (sent, step) = h.fill(0, 100);
        // The warm-up batch (32) or the window, whichever is larger.
        assert_eq!(sent, window.max(32));
        assert_eq!(
            step,
            PumpStep::Wait {
                until: Some(h.now + RECHECK)
            }
        );
        // The client confirms half, later than the starvation margin: the pump may send
        // that half again.
        h.now += Duration::from_secs(1);
        h.drain();
        h.position(0, sent / 2);
        assert_eq!(h.drain().2, vec![PumpEvent::Wake(0)]);
        assert_eq!(h.fill(0, 100).0, sent / 2);
    }

    #[test]
    fn a_starved_client_doubles_the_boost_and_a_forecast_halves_it() {
        let mut h = Harness::new(Mode::Predictive, false);
        h.own(&[(0, None)], 0);
        h.forecast(&[(0, 1000, 100_000)], 64 << 20);
        let (first, _) = h.fill(0, 100);
        // The client consumed everything at once (a reader catching up): the next window is
        // twice as large.
        h.now += 5 * MS;
        h.position(0, first);
        let (more, _) = h.fill(0, 100);
        assert_eq!(more, 2 * first, "boost 2");
        // A client keeping old records unconsumed (reading at the forecast rate) does not grow
        // the window.
        h.now += Duration::from_secs(1);
        assert!(matches!(h.send(0).step, PumpStep::Wait { .. }));
        h.position(0, first + more / 2);
        let (steady, _) = h.fill(0, 100);
        assert_eq!(steady, more / 2, "boost stays 2");
        // A new forecast halves it: the same confirmation no longer opens the window.
        h.now += Duration::from_secs(1);
        h.forecast(&[(0, 1000, 100_000)], 64 << 20);
        h.position(0, first + more / 2 + first);
        assert!(matches!(h.send(0).step, PumpStep::Wait { .. }), "boost 1");
    }

    #[test]
    fn bytes_in_flight_never_exceed_the_advertised_client_buffer() {
        let mut h = Harness::new(Mode::Predictive, false);
        h.own(&[(0, None), (1, None)], 0);
        h.forecast(
            &[(0, 100_000, 10_000_000), (1, 100_000, 10_000_000)],
            10_000,
        );
        let mut rounds = 0;
        while h.pump(0, 100).is_some() || h.pump(1, 100).is_some() {
            rounds += 1;
            assert!(rounds < 1000, "bounded");
        }
        assert!(h.flow.inflight_bytes() <= 10_000);
        // A record larger than the free buffer waits while something is in flight …
        let epoch = h.flow.epoch();
        let big = h
            .flow
            .admit_batch(0, epoch, batch(10_000, 20_000, 1), h.now, &mut h.planner);
        assert_eq!(
            big,
            Admit::Wait {
                until: h.now + RECHECK
            }
        );
        // … and goes once nothing is.
        h.position(0, u64::MAX);
        h.position(1, u64::MAX);
        let big = h
            .flow
            .admit_batch(0, epoch, batch(10_000, 20_000, 1), h.now, &mut h.planner);
        assert_eq!(big, Admit::Send);
    }

    #[test]
    fn a_persistent_deviation_plans_with_the_measured_rate_until_the_next_forecast() {
        let mut h = Harness::new(Mode::Predictive, false);
        h.own(&[(0, None)], 0);
        h.forecast(&[(0, 10_000, 1_000_000)], 64 << 20);
        let predicted = h.planner.depth(KEY, 0).records;
        // The client consumes 100 records/s, far below the forecast: two windows later the
        // partition is flagged and planned with the measured rate.
        let mut offset = 0;
        let mut steps = 0;
        while h.planner.depth(KEY, 0).records == predicted {
            steps += 1;
            assert!(steps < 200, "bounded");
            h.now += Duration::from_millis(100);
            offset += 10;
            h.position(0, offset);
            if h.flow.poll_timeout().is_some_and(|at| at <= h.now) {
                h.flow.handle_timeout(h.now, &mut h.planner);
            }
        }
        let measured = h.planner.depth(KEY, 0).records;
        assert!(measured < predicted / 10, "{measured} vs {predicted}");
        assert!(h.drain().2.contains(&PumpEvent::Wake(0)));
        h.forecast(&[(0, 10_000, 1_000_000)], 64 << 20);
        assert_eq!(h.planner.depth(KEY, 0).records, predicted);
    }

    #[test]
    fn a_revoked_partition_leaves_the_plan_and_its_bytes_leave_the_flight() {
        let mut h = Harness::new(Mode::Predictive, true);
        h.own(&[(0, Some(0)), (1, Some(0))], 0);
        h.forecast(&[(0, 1000, 100_000), (1, 1000, 100_000)], 64 << 20);
        h.pump(0, 100).unwrap();
        h.pump(1, 100).unwrap();
        assert!(h.flow.inflight_bytes() > 0);
        h.own(&[(1, Some(0))], 0);
        assert_eq!(h.planner.depth(KEY, 0).records, 0, "revoked");
        assert!(h.planner.depth(KEY, 1).records > 0, "kept");
        assert_eq!(h.flow.inflight_bytes(), 0, "the old streams are finished");
    }

    /// A simulated client reading 2 000 records/s on two partitions with positions every
    /// 50 ms, against the flow stepping virtual time: after the warm-up the client never
    /// finds its buffer empty and the flow never overfills it.
    #[test]
    fn a_steady_reader_is_never_starved_and_never_overfilled() {
        const RATE: u64 = 2000;
        const RECORD: u64 = 100;
        const CAPACITY: u64 = 1 << 20;
        let mut h = Harness::new(Mode::Predictive, false);
        h.own(&[(0, None), (1, None)], 0);
        h.forecast(
            &[(0, RATE, RATE * RECORD), (1, RATE, RATE * RECORD)],
            CAPACITY,
        );
        let start = h.now;
        let tick = 5 * MS;
        // Per partition: offset delivered (after the link's RTT), offset consumed.
        let mut delivered = [VecDeque::<(Instant, u64)>::new(), VecDeque::new()];
        let mut arrived = [0u64; 2];
        let mut consumed = [0u64; 2];
        let mut starved_ticks = 0;
        for step in 0..2000u32 {
            h.now = start + tick * step;
            for p in 0..2u32 {
                let i = p as usize;
                while let Some((from, n)) = h.pump(p, RECORD) {
                    assert_eq!(from, arrived[i].max(from));
                    delivered[i].push_back((h.now + RTT / 2, from + n));
                }
                while delivered[i].front().is_some_and(|&(at, _)| at <= h.now) {
                    arrived[i] = delivered[i].pop_front().unwrap().1;
                }
                let want = RATE * u64::from(step) * 5 / 1000;
                if consumed[i] < want && arrived[i] < want && step > 100 {
                    starved_ticks += 1;
                }
                consumed[i] = want.min(arrived[i]);
                if step % 10 == 0 {
                    h.position(p, consumed[i]);
                }
            }
            assert!(h.flow.inflight_bytes() <= CAPACITY);
            if h.flow.poll_timeout().is_some_and(|at| at <= h.now) {
                h.flow.handle_timeout(h.now, &mut h.planner);
            }
            h.drain();
        }
        assert_eq!(starved_ticks, 0);
    }

    #[test]
    fn a_held_pump_doubles_its_boost_when_the_client_confirmed_all_older_records() {
        let after = 20 * MS;
        assert_eq!(grown_boost(1, true, None, after), 2, "everything confirmed");
        // Records on the wire when the client reported (a reader catching up).
        assert_eq!(grown_boost(4, true, Some(3 * MS), after), 8);
        // A client reading at the forecast rate keeps older records buffered.
        assert_eq!(grown_boost(4, true, Some(60 * MS), after), 4);
        assert_eq!(grown_boost(4, true, Some(after), after), 4);
    }

    #[test]
    fn the_boost_stays_unless_the_pump_held_back_and_is_capped() {
        let after = 20 * MS;
        assert_eq!(grown_boost(2, false, None, after), 2, "not held back");
        assert_eq!(grown_boost(2, false, Some(MS), after), 2, "not held back");
        assert_eq!(grown_boost(MAX_BOOST, true, None, after), MAX_BOOST);
        assert_eq!(grown_boost(MAX_BOOST / 2 + 1, true, None, after), MAX_BOOST);
    }
}
