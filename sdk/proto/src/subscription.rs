//! The I/O-free state of one subscription, client side: what the app has consumed, which
//! partition stream is current, what to resume from, when to send `Position` and `Fetch`, and
//! the grant bucket. The SDK's `Subscription` drives [`SubMachine`] (PROTOCOL.md §6.2, §6.3).
//!
//! Call order (one driver, `now` only moves forward):
//!
//! 1. [`begin_generation`](SubMachine::begin_generation) for every new control stream (the first
//!    one and after each reconnect); send `Subscribe` with the `Start` it returns.
//! 2. Feed the shard's frames: [`handle_assignment`](SubMachine::handle_assignment),
//!    [`handle_grant`](SubMachine::handle_grant), and each partition stream's `PartitionOpen`
//!    through [`open_partition`](SubMachine::open_partition).
//! 3. A partition reader calls [`on_received`](SubMachine::on_received) (under the same lock as
//!    its push into the app's queue) and [`reader_ended`](SubMachine::reader_ended).
//! 4. The app side calls [`on_deliver`](SubMachine::on_deliver) for each record it takes out of
//!    the queue: the machine drops offsets below the partition's next offset (duplicates).
//! 5. The driver sends what [`poll_transmit`](SubMachine::poll_transmit) gives and sleeps until
//!    [`poll_timeout`](SubMachine::poll_timeout).
//!
//! Predictive mode (seed 000): every record the app takes feeds the subscription's
//! [`ForecastEngine`] ([`took`](SubMachine::took)), whose requests go out as `Forecast`
//! frames carrying the buffer capacity; each control stream starts with a `Forecast` of the
//! current predictions (possibly none) so the shard knows the buffer at once. When the app
//! finds nothing buffered ([`on_starved`](SubMachine::on_starved)) the positions go out at
//! once, so the shard sees the drained buffer. [`PrefetchMetrics`] accounts hits, waits and
//! discarded records in both modes.
//!
//! Invariant that makes delivery gap- and duplicate-free: per partition at most one reader is
//! *current*; a reader pushes only while current (checked under the lock), so the queue holds
//! each partition's batches in stream-switch order; the next offset handed to the app only ever
//! grows, and every resume starts from it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::forecast::{
    ForecastConfig, ForecastEngine, PartitionMetrics, PrefetchMetrics, PrefetchStats,
};
use crate::frame::{
    Assignment, Fetch, Forecast, Grant, Mode, PartitionForecast, PartitionOpen, Position, Start,
};

/// Identifies one partition-stream reader (unique per machine).
pub type ReaderId = u64;

/// The machine's tunables (the SDK fills them from its `SubscriptionConfig`).
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Push (`Predictive`) or pull (`Reactive`).
    pub mode: Mode,
    /// Least time between two `Position` rounds.
    pub position_interval: Duration,
    /// Reactive mode: records to keep buffered-or-requested per partition.
    pub fetch_records: u32,
    /// Reactive mode: fetch only when the whole buffer is empty (no pipelining).
    pub fetch_on_empty: bool,
    /// Predictive mode: the forecaster's configuration (validated by the caller; an invalid
    /// one falls back to the default).
    pub forecast: ForecastConfig,
    /// Predictive mode: the buffer capacity advertised in every `Forecast`.
    pub buffer_bytes: u64,
}

/// What the driver must send on the control stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Transmit {
    /// The next offset to hand to the app, of one partition.
    Position(Position),
    /// Reactive mode: records asked for, within the grant.
    Fetch(Fetch),
    /// Predictive mode: the buffer capacity and the current predictions.
    Forecast(Forecast),
}

/// Verdict on a partition stream's `PartitionOpen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Read it as reader `id`; stop the reader `replaces` (an older stream of the partition).
    Accept {
        /// The new reader.
        id: ReaderId,
        /// The partition's previous reader, to stop.
        replaces: Option<ReaderId>,
    },
    /// Older than the latest assignment (or than the partition's current stream): stop it with
    /// `REVOKED`.
    Stale,
}

/// Verdict on a record the app is about to receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deliver {
    /// Hand it to the app.
    Deliver,
    /// Its offset was already handed to the app, or it was queued from a stream of a partition
    /// since revoked (its final `Position` went out; the next owner starts there): drop it.
    Duplicate,
}

/// Peer misbehaviour the machine detects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MachineError {
    /// An `Assignment` did not raise the epoch of the current control stream.
    #[error("Assignment epoch {got} does not increase (latest {latest})")]
    EpochNotIncreasing {
        /// The latest epoch seen.
        latest: u64,
        /// The epoch received.
        got: u64,
    },
}

/// Counters of one subscription.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct SubscriptionMetrics {
    /// Records handed to the application.
    pub records_delivered: u64,
    /// Records dropped because their offset had already been handed to the application
    /// (re-sent after a reconnect or a reassignment).
    pub duplicates_dropped: u64,
    /// Re-subscriptions after the first (shard connection lost, `GoAway`, control stream lost).
    pub reconnects: u64,
    /// Assignments received (all generations).
    pub assignments: u64,
    /// Partition streams stopped as stale or replaced.
    pub streams_stopped: u64,
    /// Pre-fetch figures: records received, hits (already buffered when the app asked),
    /// misses, discarded (received and dropped unread: wasted pre-fetch), hit ratio,
    /// wasted ratio, app wait per record p50/p99/max. Both modes.
    pub prefetch: PrefetchStats,
    /// Predictive mode: mean MASE of the per-partition forecasters (forecast error against
    /// the naive forecast; < 1 beats it), `None` while undefined or in reactive mode.
    pub forecast_mase: Option<f64>,
}

impl SubscriptionMetrics {
    fn new() -> Self {
        Self {
            records_delivered: 0,
            duplicates_dropped: 0,
            reconnects: 0,
            assignments: 0,
            streams_stopped: 0,
            prefetch: PrefetchMetrics::new().stats(),
            forecast_mase: None,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Part {
    /// The next offset to hand to the app (`None`: not known yet).
    next: Option<u64>,
    /// The last `Position.next_offset` sent on the current control stream.
    sent_position: Option<u64>,
    /// In the latest assignment of the current generation.
    assigned: bool,
    /// Records queued before an assignment revoked the partition (a consumer-group
    /// hand-over), still to come out of the app's queue: dropped, so the final `Position`
    /// stays where the next owner starts. The queue is in push order and only the current
    /// reader pushes, so they are the partition's next ones.
    stale: u64,
    /// The current reader and the epoch of its stream.
    reader: Option<(ReaderId, u64)>,
    /// Records pushed into the app's queue and not yet delivered or dropped.
    buffered: u64,
    /// Reactive mode: records asked for with `Fetch` and not yet received.
    outstanding: u64,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    grant: Grant,
    expires: Instant,
    /// Milli-records in the bucket.
    milli_tokens: u128,
    refilled_at: Instant,
}

impl Lease {
    fn refill(&mut self, now: Instant) {
        let us = now.saturating_duration_since(self.refilled_at).as_micros();
        let add = us.saturating_mul(u128::from(self.grant.rate_records_per_s)) / 1000;
        let cap = u128::from(self.grant.burst) * 1000;
        self.milli_tokens = self.milli_tokens.saturating_add(add).min(cap);
        self.refilled_at = now;
    }

    fn whole_tokens(&self) -> u64 {
        u64::try_from(self.milli_tokens / 1000).unwrap_or(u64::MAX)
    }

    /// When one more whole token will be available (None: never, rate 0 or expired).
    fn next_token_at(&self, now: Instant) -> Option<Instant> {
        let rate = u128::from(self.grant.rate_records_per_s);
        if rate == 0 || u128::from(self.grant.burst) == 0 {
            return None;
        }
        let missing = 1000 - (self.milli_tokens % 1000);
        let us = (missing * 1000).div_ceil(rate);
        let at = now + Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX / 2));
        (at < self.expires).then_some(at)
    }
}

/// The subscription state machine. See the module docs for the call order.
#[derive(Debug)]
pub struct SubMachine {
    cfg: MachineConfig,
    start: Start,
    generation: u64,
    epoch: Option<u64>,
    parts: BTreeMap<u32, Part>,
    next_reader: ReaderId,
    lease: Option<Lease>,
    position_due: Option<Instant>,
    last_position_at: Option<Instant>,
    /// Predictive mode: key and payload bytes the app took since the last `Position` round.
    unreported_bytes: u64,
    out: VecDeque<Transmit>,
    /// Set when the app side changed something the driver must act on.
    poke: bool,
    metrics: SubscriptionMetrics,
    /// Predictive mode: the consumption forecaster.
    engine: Option<ForecastEngine>,
    prefetch: PrefetchMetrics,
}

impl SubMachine {
    /// A machine before its first control stream; `start` is where the first `Subscribe`
    /// starts.
    pub fn new(cfg: MachineConfig, start: Start) -> Self {
        let engine = (cfg.mode == Mode::Predictive).then(|| {
            // The builder validated the config; fall back to the defaults if it did not.
            let mut e = ForecastEngine::new(cfg.forecast.clone())
                .or_else(|_| ForecastEngine::new(ForecastConfig::default()))
                .expect("the default forecast config is valid");
            e.set_buffer_capacity(cfg.buffer_bytes);
            e
        });
        Self {
            engine,
            prefetch: PrefetchMetrics::new(),
            cfg,
            start,
            generation: 0,
            epoch: None,
            parts: BTreeMap::new(),
            next_reader: 1,
            lease: None,
            position_due: None,
            last_position_at: None,
            unreported_bytes: 0,
            out: VecDeque::new(),
            poke: false,
            metrics: SubscriptionMetrics::new(),
        }
    }

    /// Starts a new control stream (first subscribe or resume). Every reader of the previous
    /// generation stops being current. Returns the `start` to put in `Subscribe`: the original
    /// start until any partition's next offset is known, then `Offsets` of every partition
    /// seen.
    pub fn begin_generation(&mut self) -> Start {
        self.generation += 1;
        if self.generation > 1 {
            self.metrics.reconnects += 1;
        }
        self.epoch = None;
        self.lease = None;
        self.out.clear();
        self.position_due = None;
        for p in self.parts.values_mut() {
            p.assigned = false;
            p.reader = None;
            p.outstanding = 0;
            // The new Subscribe carries the position; only later changes need a Position.
            p.sent_position = p.next;
        }
        if let Some(e) = &self.engine {
            // A new control stream (maybe a new shard): advertise the buffer and every
            // current prediction at once.
            let partitions = e
                .metrics()
                .into_iter()
                .filter_map(|m| {
                    Some(PartitionForecast {
                        partition: m.partition,
                        records_per_s: m.predicted_records_per_s?.round() as u64,
                        bytes_per_s: m.predicted_bytes_per_s?.round() as u64,
                    })
                })
                .collect();
            self.out.push_back(Transmit::Forecast(Forecast {
                partitions,
                buffer_capacity_bytes: self.cfg.buffer_bytes,
            }));
        }
        self.resume_start()
    }

    /// The start a (re-)subscribe uses now.
    pub fn resume_start(&self) -> Start {
        let offsets: BTreeMap<u32, u64> = self
            .parts
            .iter()
            .filter_map(|(&p, s)| s.next.map(|n| (p, n)))
            .collect();
        if offsets.is_empty() {
            self.start.clone()
        } else {
            Start::Offsets(offsets)
        }
    }

    /// A new `Assignment`: replaces the assigned set, learns start offsets of partitions never
    /// seen, queues a final `Position` for revoked partitions. Returns the readers to stop
    /// (streams of older epochs).
    pub fn handle_assignment(
        &mut self,
        a: &Assignment,
        now: Instant,
    ) -> Result<Vec<ReaderId>, MachineError> {
        if let Some(latest) = self.epoch
            && a.epoch <= latest
        {
            return Err(MachineError::EpochNotIncreasing {
                latest,
                got: a.epoch,
            });
        }
        self.epoch = Some(a.epoch);
        self.metrics.assignments += 1;
        // Held in this generation's previous assignment: revoked unless listed again.
        let mut held = Vec::new();
        for (&id, p) in &mut self.parts {
            if p.assigned {
                held.push(id);
            }
            p.assigned = false;
        }
        let mut behind = false;
        for ap in &a.partitions {
            let p = self.parts.entry(ap.partition).or_default();
            p.assigned = true;
            match p.next {
                None => {
                    p.next = Some(ap.start_offset);
                    p.sent_position = Some(ap.start_offset);
                }
                Some(n) if ap.start_offset < n => {
                    // The stream restarts below what the app has (a group's committed position
                    // after a member loss): the replay is dropped here, and only a `Position`
                    // tells the shard, whose pre-fetch window counts it in flight.
                    p.sent_position = Some(ap.start_offset);
                    behind = true;
                }
                Some(_) => {}
            }
        }
        if let Some(e) = &mut self.engine {
            for (&partition, p) in &self.parts {
                if !p.assigned {
                    e.forget(partition);
                }
            }
        }
        let mut stop = Vec::new();
        for p in self.parts.values_mut() {
            if let Some((id, e)) = p.reader
                && e < a.epoch
            {
                stop.push(id);
                p.reader = None;
                p.outstanding = 0;
            }
        }
        self.metrics.streams_stopped += stop.len() as u64;
        // Revoked partitions: their final position goes out now, even if unchanged: the hub
        // ends a hand-over only on a report its shard relays after the revocation.
        for id in held {
            if let Some(p) = self.parts.get_mut(&id)
                && !p.assigned
                && p.next.is_some()
            {
                p.sent_position = None;
                p.stale = p.buffered;
            }
        }
        let revoked_changed = self
            .parts
            .values()
            .any(|p| !p.assigned && p.next.is_some() && p.next != p.sent_position);
        if revoked_changed || behind {
            self.position_due = Some(now);
        }
        Ok(stop)
    }

    /// A partition stream opened with `open` (its `sub_id` already matched).
    pub fn open_partition(&mut self, open: &PartitionOpen) -> Open {
        if self.epoch.is_some_and(|e| open.epoch < e) {
            self.metrics.streams_stopped += 1;
            return Open::Stale;
        }
        let p = self.parts.entry(open.partition).or_default();
        if let Some((_, e)) = p.reader
            && e >= open.epoch
        {
            self.metrics.streams_stopped += 1;
            return Open::Stale;
        }
        let id = self.next_reader;
        self.next_reader += 1;
        let replaces = p.reader.replace((id, open.epoch)).map(|(old, _)| old);
        if replaces.is_some() {
            p.outstanding = 0;
            self.metrics.streams_stopped += 1;
        }
        Open::Accept { id, replaces }
    }

    /// True while `id` is the current reader of `partition`.
    pub fn is_current(&self, id: ReaderId, partition: u32) -> bool {
        self.parts
            .get(&partition)
            .and_then(|p| p.reader)
            .is_some_and(|(r, _)| r == id)
    }

    /// Reader `id` is about to push `n` records of `partition`: true if it may (it is
    /// current). Call under the lock that also covers the push.
    pub fn on_received(&mut self, id: ReaderId, partition: u32, n: u64) -> bool {
        self.prefetch.received(n);
        if !self.is_current(id, partition) {
            self.prefetch.discarded(n);
            return false;
        }
        if let Some(p) = self.parts.get_mut(&partition) {
            p.buffered += n;
            p.outstanding = p.outstanding.saturating_sub(n);
        }
        true
    }

    /// Reader `id` ended (stream finished, reset, or stopped).
    pub fn reader_ended(&mut self, id: ReaderId, partition: u32) {
        if let Some(p) = self.parts.get_mut(&partition)
            && p.reader.is_some_and(|(r, _)| r == id)
        {
            p.reader = None;
            p.outstanding = 0;
        }
    }

    /// The app is about to receive `offset` of `partition`.
    pub fn on_deliver(&mut self, partition: u32, offset: u64, now: Instant) -> Deliver {
        let low = self.low_water();
        let p = self.parts.entry(partition).or_default();
        p.buffered = p.buffered.saturating_sub(1);
        if p.stale > 0 {
            p.stale -= 1;
            self.prefetch.discarded(1);
            return Deliver::Duplicate;
        }
        if p.next.is_some_and(|n| offset < n) {
            self.metrics.duplicates_dropped += 1;
            self.prefetch.discarded(1);
            return Deliver::Duplicate;
        }
        p.next = Some(offset.saturating_add(1));
        if self.cfg.mode == Mode::Reactive && p.buffered + p.outstanding == low {
            self.poke = true;
        }
        self.metrics.records_delivered += 1;
        if self.position_due.is_none() {
            self.poke = true;
            let at = self
                .last_position_at
                .map_or(now, |t| t + self.cfg.position_interval);
            self.position_due = Some(at.max(now));
        }
        Deliver::Deliver
    }

    /// Reactive mode: a partition is topped up when buffered + requested falls to this.
    fn low_water(&self) -> u64 {
        if self.cfg.fetch_on_empty {
            0
        } else {
            u64::from(self.cfg.fetch_records.max(1)) / 2
        }
    }

    /// The app took a delivered record of `partition` (`bytes` of key and payload); it had
    /// waited `waited` for it (`None`: it was already buffered).
    pub fn took(&mut self, partition: u32, bytes: u64, waited: Option<Duration>, now: Instant) {
        match waited {
            Some(w) => self.prefetch.miss(w),
            None => self.prefetch.hit(1),
        }
        if let Some(e) = &mut self.engine {
            // Over `max_partitions` the partition is simply not forecast.
            let _ = e.record(partition, 1, bytes, now);
            if e.poll_timeout().is_some_and(|t| t <= now) {
                self.poke = true;
            }
            // The shard counts what it pushed against the advertised buffer until a
            // `Position` covers it: once the app took a quarter of the buffer, report at once
            // (not only every `position_interval`), so a fast reader's buffer is refilled
            // before it runs dry — as QUIC raises a flow-control window before it closes.
            self.unreported_bytes = self.unreported_bytes.saturating_add(bytes);
            if self.unreported_bytes >= (self.cfg.buffer_bytes / 4).max(1)
                && self.generation > 0
                && self.position_due.is_none_or(|d| d > now)
            {
                self.position_due = Some(now);
                self.poke = true;
            }
        }
    }

    /// The app asked for a record and nothing was buffered. Predictive mode: positions go
    /// out at once so the shard sees the drained buffer.
    pub fn on_starved(&mut self, now: Instant) {
        if self.engine.is_some() && self.generation > 0 {
            self.position_due = Some(now);
            self.poke = true;
        }
    }

    /// Forecast quality per partition (predictive mode; empty in reactive mode).
    pub fn forecast_metrics(&self) -> Vec<PartitionMetrics> {
        self.engine.as_ref().map_or_else(Vec::new, |e| e.metrics())
    }

    /// True (once) when the driver should run `poll_transmit` / re-arm its timer because of
    /// an [`on_deliver`](Self::on_deliver).
    pub fn take_poke(&mut self) -> bool {
        std::mem::take(&mut self.poke)
    }

    /// A `Grant` arrived at `now`; `server_now_ms` is the shard clock estimated at `now`.
    pub fn handle_grant(&mut self, g: Grant, now: Instant, server_now_ms: u64) {
        let ttl = Duration::from_millis(g.lease_expires_ms.saturating_sub(server_now_ms));
        let expires = now + ttl;
        let lease = match self.lease.take() {
            Some(mut l) => {
                l.refill(now);
                l.grant = g;
                l.expires = expires;
                l.milli_tokens = l.milli_tokens.min(u128::from(g.burst) * 1000);
                l
            }
            None => Lease {
                grant: g,
                expires,
                milli_tokens: u128::from(g.burst) * 1000,
                refilled_at: now,
            },
        };
        self.lease = Some(lease);
    }

    /// The current grant, if one is held and unexpired at `now`.
    pub fn grant(&self, now: Instant) -> Option<Grant> {
        self.lease.filter(|l| now < l.expires).map(|l| l.grant)
    }

    /// The next frame to send on the control stream, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if self.out.is_empty() {
            self.fill(now);
        }
        self.out.pop_front()
    }

    fn fill(&mut self, now: Instant) {
        if self.generation == 0 {
            return;
        }
        if self.position_due.is_some_and(|d| d <= now) {
            self.position_due = None;
            self.unreported_bytes = 0;
            let mut any = false;
            for (&partition, p) in &mut self.parts {
                if let Some(n) = p.next
                    && p.sent_position != Some(n)
                {
                    p.sent_position = Some(n);
                    any = true;
                    self.out.push_back(Transmit::Position(Position {
                        partition,
                        next_offset: n,
                        epoch: self.epoch,
                    }));
                }
            }
            if any {
                self.last_position_at = Some(now);
            }
        }
        if self.cfg.mode == Mode::Reactive {
            self.fill_fetches(now);
        }
        if let Some(f) = self.engine.as_mut().and_then(|e| e.poll_request(now)) {
            self.out.push_back(Transmit::Forecast(f));
        }
    }

    fn fill_fetches(&mut self, now: Instant) {
        let target = u64::from(self.cfg.fetch_records.max(1));
        let low = self.low_water();
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        if now >= lease.expires {
            return;
        }
        lease.refill(now);
        let mut target = target;
        if self.cfg.fetch_on_empty {
            // On demand: only once the whole subscription buffer is empty and nothing is
            // requested, `fetch_records` in total, split over the live partitions.
            let live = self
                .parts
                .values()
                .filter(|p| p.assigned && p.reader.is_some());
            let (mut n, mut have) = (0u64, 0u64);
            for p in live {
                n += 1;
                have += p.buffered + p.outstanding;
            }
            if n == 0 || have > 0 {
                return;
            }
            target = (target / n).max(1);
        }
        for (&partition, p) in &mut self.parts {
            // Fetch only on a partition assigned in this generation with a current stream.
            if !p.assigned || p.reader.is_none() {
                continue;
            }
            let have = p.buffered + p.outstanding;
            if have > low {
                continue;
            }
            let want = (target - have).min(lease.whole_tokens());
            let Ok(max_records) = u32::try_from(want) else {
                continue;
            };
            if max_records == 0 {
                continue;
            }
            lease.milli_tokens -= u128::from(max_records) * 1000;
            p.outstanding += u64::from(max_records);
            self.out.push_back(Transmit::Fetch(Fetch {
                partition,
                max_records,
            }));
        }
    }

    /// When [`poll_transmit`](Self::poll_transmit) may next have something without any other
    /// input (the position timer, or grant tokens for a blocked fetch).
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let mut t = self.position_due;
        if let Some(at) = self.engine.as_ref().and_then(ForecastEngine::poll_timeout) {
            t = Some(t.map_or(at, |x| x.min(at)));
        }
        if self.cfg.mode == Mode::Reactive
            && let Some(l) = &self.lease
            && now < l.expires
        {
            let low = self.low_water();
            let starved = self
                .parts
                .values()
                .any(|p| p.assigned && p.reader.is_some() && p.buffered + p.outstanding <= low);
            if starved && l.whole_tokens() == 0 {
                let mut l = *l;
                l.refill(now);
                if let Some(at) = l.next_token_at(now) {
                    t = Some(t.map_or(at, |x| x.min(at)));
                }
            }
        }
        t
    }

    /// The next offset to hand to the app, per partition seen.
    pub fn positions(&self) -> BTreeMap<u32, u64> {
        self.parts
            .iter()
            .filter_map(|(&p, s)| s.next.map(|n| (p, n)))
            .collect()
    }

    /// The partitions of the latest assignment (current generation).
    pub fn assigned(&self) -> Vec<u32> {
        self.parts
            .iter()
            .filter(|(_, p)| p.assigned)
            .map(|(&p, _)| p)
            .collect()
    }

    /// The latest assignment epoch of the current generation.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// The subscription's counters, with the current pre-fetch figures.
    pub fn metrics(&self) -> SubscriptionMetrics {
        let mases: Vec<f64> = self
            .forecast_metrics()
            .iter()
            .filter_map(|m| m.mase)
            .collect();
        SubscriptionMetrics {
            prefetch: self.prefetch.stats(),
            forecast_mase: (!mases.is_empty())
                .then(|| mases.iter().sum::<f64>() / mases.len() as f64),
            ..self.metrics
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::AssignedPartition;

    fn cfg(mode: Mode) -> MachineConfig {
        MachineConfig {
            mode,
            position_interval: Duration::from_millis(200),
            fetch_records: 100,
            fetch_on_empty: false,
            forecast: ForecastConfig::default(),
            buffer_bytes: 1 << 20,
        }
    }

    fn assignment(epoch: u64, parts: &[(u32, u64)]) -> Assignment {
        Assignment {
            sub_id: 1,
            epoch,
            partitions: parts
                .iter()
                .map(|&(partition, start_offset)| AssignedPartition {
                    partition,
                    start_offset,
                    priority: 0,
                })
                .collect(),
        }
    }

    fn open(partition: u32, epoch: u64) -> PartitionOpen {
        PartitionOpen {
            sub_id: 1,
            partition,
            epoch,
        }
    }

    fn accept(m: &mut SubMachine, partition: u32, epoch: u64) -> ReaderId {
        match m.open_partition(&open(partition, epoch)) {
            Open::Accept { id, .. } => id,
            Open::Stale => panic!("stale"),
        }
    }

    fn drain(m: &mut SubMachine, now: Instant) -> Vec<Transmit> {
        std::iter::from_fn(|| m.poll_transmit(now)).collect()
    }

    #[test]
    fn first_subscribe_uses_the_callers_start_then_resumes_from_delivered_offsets() {
        let t0 = Instant::now();
        let mut m = SubMachine::new(cfg(Mode::Predictive), Start::Latest);
        assert_eq!(m.begin_generation(), Start::Latest);
        m.handle_assignment(&assignment(1, &[(0, 10), (1, 50)]), t0)
            .unwrap();
        let r0 = accept(&mut m, 0, 1);
        assert!(m.on_received(r0, 0, 3));
        for off in 10..13 {
            assert_eq!(m.on_deliver(0, off, t0), Deliver::Deliver);
        }
        // Partition 1 delivered nothing: it resumes at the assignment's start offset.
        let resume = m.begin_generation();
        assert_eq!(resume, Start::Offsets(BTreeMap::from([(0, 13), (1, 50)])));
        assert_eq!(m.metrics().reconnects, 1);
        // The old reader is no longer current: its late pushes are refused.
        assert!(!m.on_received(r0, 0, 1));
    }

    #[test]
    fn replays_after_resume_are_dropped_without_gaps() {
        let t0 = Instant::now();
        let mut m = SubMachine::new(cfg(Mode::Predictive), Start::Earliest);
        m.begin_generation();
        m.handle_assignment(&assignment(1, &[(0, 0)]), t0).unwrap();
        for off in 0..5 {
            assert_eq!(m.on_deliver(0, off, t0), Deliver::Deliver);
        }
        m.begin_generation();
        m.handle_assignment(&assignment(1, &[(0, 3)]), t0).unwrap();
        // The shard deliberately replays 3 and 4.
        let got: Vec<_> = (3..8).map(|o| m.on_deliver(0, o, t0)).collect();
        assert_eq!(
            got,
            [
                Deliver::Duplicate,
                Deliver::Duplicate,
                Deliver::Deliver,
                Deliver::Deliver,
                Deliver::Deliver
            ]
        );
        assert_eq!(m.positions(), BTreeMap::from([(0, 8)]));
        let mt = m.metrics();
        assert_eq!((mt.records_delivered, mt.duplicates_dropped), (8, 2));
        // Offsets absent from the log (a jump) are delivered: the SDK never skips.
        assert_eq!(m.on_deliver(0, 20, t0), Deliver::Deliver);
        assert_eq!(m.positions()[&0], 21);
    }

    #[test]
    fn positions_are_sent_when_changed_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut m = SubMachine::new(cfg(Mode::Predictive), Start::Earliest);
        m.begin_generation();
        assert_eq!(drain(&mut m, t0), [initial_forecast()]);
        m.handle_assignment(&assignment(1, &[(0, 0), (1, 0)]), t0)
            .unwrap();
        assert_eq!(drain(&mut m, t0), []);
        assert_eq!(m.poll_timeout(t0), None);
        m.on_deliver(0, 0, t0);
        m.on_deliver(0, 1, t0);
        assert_eq!(
            drain(&mut m, t0),
            [Transmit::Position(Position {
                partition: 0,
                next_offset: 2,
                epoch: Some(1)
            })]
        );
        let t1 = t0 + Duration::from_millis(10);
        m.on_deliver(1, 0, t1);
        assert_eq!(m.poll_timeout(t1), Some(t0 + Duration::from_millis(200)));
        assert_eq!(drain(&mut m, t1), []);
        let t2 = t0 + Duration::from_millis(200);
        assert_eq!(
            drain(&mut m, t2),
            [Transmit::Position(Position {
                partition: 1,
                next_offset: 1,
                epoch: Some(1)
            })]
        );
        assert_eq!(m.poll_timeout(t2), None);
    }

    /// Found by the gateway's simulation (`consumer_group_handover`, seeds 0 and 10): records
    /// of a revoked partition still queued for the app were delivered after the final
    /// `Position`, and again by the member that took the partition over; and an unchanged
    /// position was not sent again, so the hand-over waited for the hub's timeout.
    #[test]
    fn queued_records_of_a_revoked_partition_are_not_delivered() {
        let t0 = Instant::now();
        let mut m = SubMachine::new(cfg(Mode::Reactive), Start::Earliest);
        m.begin_generation();
        m.handle_assignment(&assignment(1, &[(0, 0), (1, 0)]), t0)
            .unwrap();
        let r1 = accept(&mut m, 1, 1);
        assert!(m.on_received(r1, 1, 4));
        assert_eq!(m.on_deliver(1, 0, t0), Deliver::Deliver);
        assert_eq!(m.on_deliver(1, 1, t0), Deliver::Deliver);
        let position_in = |epoch| {
            Transmit::Position(Position {
                partition: 1,
                next_offset: 2,
                epoch: Some(epoch),
            })
        };
        assert!(drain(&mut m, t0).contains(&position_in(1)));
        // Partition 1 moves to another member, which starts at the final position, 2: it goes
        // out again, unchanged (the one before may have crossed the revocation), now with the
        // revoking epoch, so the shard can tell it from the one before.
        m.handle_assignment(&assignment(2, &[(0, 0)]), t0).unwrap();
        assert_eq!(drain(&mut m, t0), [position_in(2)]);
        // Given back (its stream may come before the assignment) after the other member
        // consumed up to 9: the new stream's records are delivered, the queued ones are not.
        let r1b = accept(&mut m, 1, 3);
        assert!(m.on_received(r1b, 1, 1));
        assert_eq!(m.on_deliver(1, 2, t0), Deliver::Duplicate, "queued");
        assert_eq!(m.on_deliver(1, 3, t0), Deliver::Duplicate, "queued");
        assert_eq!(m.positions()[&1], 2);
        assert_eq!(m.on_deliver(1, 9, t0), Deliver::Deliver);
    }

    /// Found by the gateway's simulation (`consumer_group_handover`, seed 715): a member that
    /// rejoined after a lost connection got partitions starting at the group's older position;
    /// it dropped the replay as duplicates and never sent a `Position`, so the shard's
    /// pre-fetch window stayed full and the partitions stalled.
    #[test]
    fn an_assignment_below_the_delivered_offset_sends_the_position_at_once() {
        let t0 = Instant::now();
        let mut m = SubMachine::new(cfg(Mode::Predictive), Start::Earliest);
        m.begin_generation();
        m.handle_assignment(&assignment(1, &[(0, 0)]), t0).unwrap();
        let r0 = accept(&mut m, 0, 1);
        assert!(m.on_received(r0, 0, 10));
        for o in 0..10 {
            assert_eq!(m.on_deliver(0, o, t0), Deliver::Deliver);
        }
        // The connection is lost; the new member is given partition 0 from 4.
        m.begin_generation();
        drain(&mut m, t0);
        m.handle_assignment(&assignment(1, &[(0, 4)]), t0).unwrap();
        assert_eq!(
            drain(&mut m, t0),
            [Transmit::Position(Position {
                partition: 0,
                next_offset: 10,
                epoch: Some(1)
            })]
        );
        // Kept at or above the delivered offset: nothing to say.
        m.handle_assignment(&assignment(2, &[(0, 10)]), t0).unwrap();
        assert_eq!(drain(&mut m, t0), []);
    }

    #[test]
    fn reassignment_stops_stale_streams_and_sends_final_positions() {
        let t0 = Instant::now();
        let mut m = SubMachine::new(cfg(Mode::Predictive), Start::Earliest);
        m.begin_generation();
        m.handle_assignment(&assignment(1, &[(0, 0), (1, 0)]), t0)
            .unwrap();
        let r0 = accept(&mut m, 0, 1);
        let r1 = accept(&mut m, 1, 1);
        m.on_deliver(1, 0, t0);
        drain(&mut m, t0);
        m.on_deliver(1, 1, t0);
        // A stream of epoch 2 may arrive before the Assignment of epoch 2.
        let r0b = match m.open_partition(&open(0, 2)) {
            Open::Accept { id, replaces } => {
                assert_eq!(replaces, Some(r0));
                id
            }
            Open::Stale => panic!(),
        };
        assert!(!m.is_current(r0, 0));
        let t1 = t0 + Duration::from_millis(5);
        let stop = m.handle_assignment(&assignment(2, &[(0, 0)]), t1).unwrap();
        assert_eq!(stop, vec![r1]);
        assert!(m.is_current(r0b, 0));
        assert_eq!(m.assigned(), vec![0]);
        // Partition 1 was revoked: its final position goes out at once.
        assert_eq!(
            drain(&mut m, t1),
            [Transmit::Position(Position {
                partition: 1,
                next_offset: 2,
                epoch: Some(2)
            })]
        );
        // Old epochs are stale now; epochs must increase.
        assert_eq!(m.open_partition(&open(1, 1)), Open::Stale);
        assert_eq!(m.open_partition(&open(0, 2)), Open::Stale);
        assert!(matches!(
            m.handle_assignment(&assignment(2, &[]), t1),
            Err(MachineError::EpochNotIncreasing { latest: 2, got: 2 })
        ));
        assert_eq!(m.metrics().streams_stopped, 4);
    }

    #[test]
    fn reactive_fetches_only_within_the_grant_and_when_low() {
        let t0 = Instant::now();
        let mut m = SubMachine::new(cfg(Mode::Reactive), Start::Earliest);
        m.begin_generation();
        m.handle_assignment(&assignment(1, &[(0, 0), (1, 0)]), t0)
            .unwrap();
        let r0 = accept(&mut m, 0, 1);
        // No grant yet: no fetch, no timer.
        assert_eq!(drain(&mut m, t0), []);
        assert_eq!(m.poll_timeout(t0), None);
        m.handle_grant(
            Grant {
                rate_records_per_s: 1000,
                burst: 150,
                lease_expires_ms: 10_000,
            },
            t0,
            5_000,
        );
        // Partition 1 has no stream yet: only partition 0 is fetched (burst 150 ≥ 100).
        assert_eq!(
            drain(&mut m, t0),
            [Transmit::Fetch(Fetch {
                partition: 0,
                max_records: 100
            })]
        );
        let _r1 = accept(&mut m, 1, 1);
        // 50 tokens left for partition 1.
        assert_eq!(
            drain(&mut m, t0),
            [Transmit::Fetch(Fetch {
                partition: 1,
                max_records: 50
            })]
        );
        // Bucket empty: the timer says when the next token arrives (1 ms at 1000/s).
        assert_eq!(m.poll_timeout(t0), Some(t0 + Duration::from_millis(1)));
        // 60 records of partition 0 arrive and 40 are consumed: 20 buffered + 40 outstanding
        // (> 50 low water), so no fetch for it; partition 1 (50 outstanding) is at low water
        // and gets the 100 tokens refilled in 100 ms, up to its 50 wanted.
        assert!(m.on_received(r0, 0, 60));
        for o in 0..40 {
            m.on_deliver(0, o, t0);
        }
        let t1 = t0 + Duration::from_millis(100);
        let fetches: Vec<_> = drain(&mut m, t1)
            .into_iter()
            .filter(|t| matches!(t, Transmit::Fetch(_)))
            .collect();
        assert_eq!(
            fetches,
            [Transmit::Fetch(Fetch {
                partition: 1,
                max_records: 50
            })]
        );
        // Partition 0 down to 20 buffered + 40 outstanding = 60 > 50; consume 20 more.
        for o in 40..60 {
            m.on_deliver(0, o, t1);
        }
        let t2 = t1 + Duration::from_millis(200);
        let fetches: Vec<_> = drain(&mut m, t2)
            .into_iter()
            .filter(|t| matches!(t, Transmit::Fetch(_)))
            .collect();
        // 50 tokens left + 200 refilled, capped at burst 150; wants 100 − 40 outstanding = 60.
        assert_eq!(
            fetches,
            [Transmit::Fetch(Fetch {
                partition: 0,
                max_records: 60
            })]
        );
        // After the lease expires (5 s after t0) nothing is fetched.
        let late = t0 + Duration::from_secs(6);
        for o in 60..160 {
            m.on_deliver(0, o, late);
        }
        assert!(m.grant(late).is_none());
        assert!(
            drain(&mut m, late)
                .iter()
                .all(|t| matches!(t, Transmit::Position(_)))
        );
    }

    #[test]
    fn predictive_mode_never_fetches() {
        let t0 = Instant::now();
        let mut m = SubMachine::new(cfg(Mode::Predictive), Start::Earliest);
        m.begin_generation();
        assert_eq!(drain(&mut m, t0), [initial_forecast()]);
        m.handle_grant(
            Grant {
                rate_records_per_s: 10,
                burst: 10,
                lease_expires_ms: 100,
            },
            t0,
            0,
        );
        m.handle_assignment(&assignment(1, &[(0, 0)]), t0).unwrap();
        accept(&mut m, 0, 1);
        assert_eq!(drain(&mut m, t0), []);
        assert_eq!(m.grant(t0).map(|g| g.burst), Some(10));
    }

    fn initial_forecast() -> Transmit {
        Transmit::Forecast(Forecast {
            partitions: vec![],
            buffer_capacity_bytes: 1 << 20,
        })
    }

    #[test]
    fn predictive_mode_reports_the_position_once_a_quarter_of_the_buffer_was_taken() {
        let t0 = Instant::now();
        let mut m = SubMachine::new(cfg(Mode::Predictive), Start::Earliest);
        m.begin_generation();
        drain(&mut m, t0);
        m.handle_assignment(&assignment(1, &[(0, 0)]), t0).unwrap();
        let r = accept(&mut m, 0, 1);
        assert!(m.on_received(r, 0, 10));
        // The first delivery opens a position round at once; later ones wait the interval.
        m.on_deliver(0, 0, t0);
        m.took(0, 1000, None, t0);
        assert!(drain(&mut m, t0).contains(&Transmit::Position(Position {
            partition: 0,
            next_offset: 1,
            epoch: Some(1)
        })));
        let quarter = (1u64 << 20) / 4;
        let t1 = t0 + Duration::from_millis(1);
        m.on_deliver(0, 1, t1);
        m.took(0, quarter - 1, None, t1);
        m.take_poke();
        assert!(
            !drain(&mut m, t1)
                .iter()
                .any(|t| matches!(t, Transmit::Position(_))),
            "below a quarter of the buffer, the interval applies"
        );
        m.on_deliver(0, 2, t1);
        m.took(0, 1, None, t1);
        assert!(m.take_poke());
        assert!(drain(&mut m, t1).contains(&Transmit::Position(Position {
            partition: 0,
            next_offset: 3,
            epoch: Some(1)
        })));
    }

    #[test]
    fn predictive_mode_forecasts_what_the_app_takes_and_reports_starvation() {
        let t0 = Instant::now();
        let mut m = SubMachine::new(cfg(Mode::Predictive), Start::Earliest);
        m.begin_generation();
        assert_eq!(drain(&mut m, t0), [initial_forecast()]);
        m.handle_assignment(&assignment(1, &[(0, 0)]), t0).unwrap();
        let r = accept(&mut m, 0, 1);
        assert!(m.on_received(r, 0, 200));
        // 100 records/s for 2 s (1 s buckets by default), 10 bytes each.
        for i in 0..200u64 {
            let now = t0 + Duration::from_millis(i * 10);
            assert_eq!(m.on_deliver(0, i, now), Deliver::Deliver);
            m.took(0, 10, None, now);
        }
        let t2 = t0 + Duration::from_secs(2);
        let forecasts: Vec<Forecast> = drain(&mut m, t2)
            .into_iter()
            .filter_map(|t| match t {
                Transmit::Forecast(f) => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(forecasts.len(), 1, "{forecasts:?}");
        let f = &forecasts[0];
        assert_eq!(f.buffer_capacity_bytes, 1 << 20);
        assert_eq!(f.partitions.len(), 1);
        assert!((90..=110).contains(&f.partitions[0].records_per_s), "{f:?}");
        assert!((900..=1100).contains(&f.partitions[0].bytes_per_s), "{f:?}");
        // A miss is accounted, and starvation sends the position at once.
        m.on_deliver(0, 200, t2);
        m.took(0, 10, Some(Duration::from_millis(30)), t2);
        m.on_starved(t2);
        assert!(m.take_poke());
        assert!(drain(&mut m, t2).contains(&Transmit::Position(Position {
            partition: 0,
            next_offset: 201,
            epoch: Some(1)
        })));
        let mt = m.metrics();
        assert_eq!((mt.prefetch.hits, mt.prefetch.misses), (200, 1));
        assert_eq!(mt.prefetch.received, 200);
        assert!(mt.prefetch.wait_max >= Duration::from_millis(29));
        // A revoked partition is forgotten by the forecaster.
        m.handle_assignment(&assignment(2, &[]), t2).unwrap();
        assert!(m.forecast_metrics().is_empty());
    }

    #[test]
    fn reactive_fetch_on_empty_waits_for_an_empty_buffer() {
        let t0 = Instant::now();
        let mut c = cfg(Mode::Reactive);
        c.fetch_on_empty = true;
        let mut m = SubMachine::new(c, Start::Earliest);
        m.begin_generation();
        m.handle_grant(
            Grant {
                rate_records_per_s: 1000,
                burst: 1000,
                lease_expires_ms: 60_000,
            },
            t0,
            0,
        );
        m.handle_assignment(&assignment(1, &[(0, 0)]), t0).unwrap();
        let r = accept(&mut m, 0, 1);
        let fetch = |n| {
            Transmit::Fetch(Fetch {
                partition: 0,
                max_records: n,
            })
        };
        assert_eq!(drain(&mut m, t0), [fetch(100)]);
        assert!(m.on_received(r, 0, 100));
        for o in 0..99 {
            m.on_deliver(0, o, t0);
        }
        // One record left: no fetch yet (the half-way top-up is off).
        assert!(
            !drain(&mut m, t0)
                .iter()
                .any(|t| matches!(t, Transmit::Fetch(_)))
        );
        m.on_deliver(0, 99, t0);
        assert!(drain(&mut m, t0).contains(&fetch(100)));
        // Duplicates count as discarded pre-fetch.
        assert!(m.on_received(r, 0, 1));
        assert_eq!(m.on_deliver(0, 5, t0), Deliver::Duplicate);
        assert_eq!(m.metrics().prefetch.discarded, 1);
    }
}
