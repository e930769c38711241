//! Subscriptions on a shard (PROTOCOL.md §6.2, §6.3): one task per control stream, one
//! pump per assigned partition.
//!
//! ```text
//! control stream: Subscribe ─▶ scope check (token) ─▶ stream exists (store link)
//!   ◀── Grant{rate, burst, lease}        (TokenBucket; renewed half-way through the lease)
//!   ◀── Assignment{epoch, partitions}    (all partitions, or the group's share)
//!   ──▶ Position (recorded; drives the pre-fetch window; relayed to the hub for a group),
//!       Fetch (reactive credit), Forecast (predictive: PrefetchPlanner + DeviationTracker;
//!       relayed to the hub for a group)
//! consumer group: coordinated by the hub across all shards (hub::GroupCoordinator); this
//!   shard relays join / leave / Position / Forecast over the store link
//!   (StoreLink::join_group …) and applies each GroupAssignment the hub pushes as a new
//!   epoch ─▶ Assignment
//! pump per partition: open uni ─ priority ─ PartitionOpen ─▶ loop:
//!   tokens ← bucket (and credit in reactive mode, the pre-fetch room in predictive mode)
//!   ─▶ CachedReader::read(next, ≤ tokens) ─ empty: wait for the store link's tail watch
//!   ─▶ write Records (one chunk) ─▶ next
//! ```
//!
//! Predictive mode (seed 000). The shard-wide [`PrefetchPlanner`] turns each `Forecast`
//! into a per-partition depth (predicted rate × lead time, lead = `conn.rtt()` + the
//! client's position lag + the planner's jitter margin, within the shard's memory budget).
//! A pump keeps at most `depth × HEADROOM × boost` records *in flight* (sent and not yet
//! covered by a `Position`), pushes a warm-up batch on a newly assigned partition, and
//! never lets the bytes in flight of the whole subscription exceed the buffer the client
//! advertised in its last `Forecast` (64 KiB, the SDK's smallest buffer, until one
//! arrives): that is the client's free pre-fetch buffer as seen from the shard. `boost`
//! doubles when, while the pump was holding back, the client confirms every record sent more
//! than RTT + 20 ms ago (it consumes records as they arrive: the forecast lags a rate
//! increase, or a reader catching up on a backlog has no forecast yet) and halves with each
//! new forecast. The partition
//! stream's QUIC priority follows the predicted bytes/s. A [`DeviationTracker`] compares
//! positions with the forecast; a persistent deviation replaces that partition's predicted
//! load with the measured one until the next forecast.
//!
//! Flow control: a pump reads the next batch only after the previous one was handed to
//! QUIC, so a consumer that stops reading stops its pumps (QUIC flow control) and nothing
//! else buffers. Batches are forwarded as the hub wrote them: the `Records` body is built
//! once by the hub, read once from the store link into one buffer (`Bytes`), and its record
//! section is handed to QUIC as a slice of that buffer (no copy on the shard).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream};
use sibyl_proto::frame::{
    AssignedPartition, Assignment, Forecast, Grant, Mode, PartitionForecast, PartitionOpen, Start,
    SubError, Subscribe,
};
use sibyl_proto::{ErrorCode, Frame, FrameDecoder, FrameType};
use sibyl_tokens::{Action, Claims};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tracing::debug;

use crate::config::SubscribeConfig;
use crate::grants::TokenBucket;
use crate::predict::{DeviationConfig, DeviationTracker, PrefetchConfig, PrefetchPlanner, SubKey};
use crate::quic::{self, StreamError};
use crate::storelink::{CachedReader, GroupAssignment, LinkError, RemoteError, StoreLink};

/// The shard's data plane: the store reader, the settings and the pre-fetch planner.
/// Consumer groups are coordinated by the hub (relayed over the store link).
pub struct DataPlane {
    reader: CachedReader,
    cfg: SubscribeConfig,
    next_member: AtomicU64,
    planner: Mutex<PrefetchPlanner>,
}

/// A subscription on this shard: its group member id on the store link and its pre-fetch
/// key (unique in this process; the hub scopes it to this shard's link).
type MemberId = u64;

/// A subscription's new complete set of partitions, for its control loop (applied with
/// the next epoch).
struct Owned {
    /// Each partition with the offset a newly given one starts at (`None`: the
    /// subscription's start).
    partitions: Vec<(u32, Option<u64>)>,
}

/// In-flight records a pump allows per record of planned depth (covers the forecast's
/// error and the granularity of positions), as (numerator, denominator): 1.5. With 2,
/// `sibyl-bench prefetch` wasted 0.049–0.055 of what it received (the window left in the
/// client's buffer when a trace stops) against 0.038–0.040 with 1.5, with app waits still
/// at 0 (docs/BENCHMARKS.md, session 6); below that the starvation boost takes over and the
/// waste gets noisier, not lower.
const HEADROOM: (u64, u64) = (3, 2);
/// Largest starvation boost of a pump's window.
const MAX_BOOST: u64 = 64;
/// How late the shard learns what the client consumed: the SDK's position interval in
/// predictive mode (plus a starvation `Position` at once). Added to the lead time.
const POSITION_LAG: Duration = Duration::from_millis(50);
/// Client buffer assumed until the first `Forecast` advertises one: the SDK's smallest.
const DEFAULT_CLIENT_BUFFER: u64 = 64 * 1024;
/// A client counts as starved (its pump's boost doubles) when it confirmed every record sent
/// more than the RTT plus this ago; see [`grown_boost`].
const STARVED_MARGIN: Duration = Duration::from_millis(20);
/// A pump holding back re-checks the planner at least this often.
const RECHECK: Duration = Duration::from_millis(100);

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // No code panics while holding these locks; recover the data if one ever did.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DataPlane {
    /// A data plane reading through `reader`.
    pub fn new(reader: CachedReader, cfg: SubscribeConfig) -> Arc<Self> {
        Arc::new(Self {
            reader,
            cfg,
            next_member: AtomicU64::new(1),
            planner: Mutex::new(PrefetchPlanner::new(PrefetchConfig::default())),
        })
    }

    /// The store reader.
    pub fn reader(&self) -> &CachedReader {
        &self.reader
    }

    /// Bytes of pre-fetch depth the planner has allocated across all subscriptions.
    pub fn prefetch_allocated_bytes(&self) -> u64 {
        lock(&self.planner).allocated_bytes()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a subscription failed before it was served: the `SubError` to send.
fn sub_error(code: ErrorCode, reason: impl Into<String>) -> SubError {
    SubError {
        code,
        reason: reason.into(),
    }
}

fn link_sub_error(e: &LinkError) -> SubError {
    match e {
        LinkError::Store(RemoteError::NoSuchStream { .. }) => {
            sub_error(ErrorCode::NotFound, e.to_string())
        }
        _ => sub_error(ErrorCode::Internal, e.to_string()),
    }
}

/// Resolves where partition `p` starts for `start` (DATAPLANE.md): Earliest → log start,
/// Latest → log end, Offsets → clamped into [earliest, next] (missing: earliest),
/// Timestamp → first offset with timestamp ≥ ms.
async fn resolve_start(
    reader: &CachedReader,
    stream: &str,
    p: u32,
    start: &Start,
) -> Result<u64, LinkError> {
    let link = reader.link();
    let (earliest, next) = link.bounds(stream, p).await?;
    Ok(match start {
        Start::Earliest => earliest,
        Start::Latest => next,
        Start::Offsets(m) => m.get(&p).copied().unwrap_or(earliest).clamp(earliest, next),
        Start::Timestamp(ms) => link
            .offset_for_timestamp(stream, p, *ms)
            .await?
            .clamp(earliest, next),
    })
}

/// Per-partition state shared between the subscription task and a pump.
struct PumpCtl {
    start: u64,
    credit: AtomicU64,
    credit_added: Notify,
    stop: watch::Sender<bool>,
    /// Predictive: the client's latest `Position` on this partition (0: none yet).
    acked: AtomicU64,
    /// Predictive: a `Position` or a `Forecast` arrived.
    wake: Notify,
}

/// Predictive pre-fetch state of one subscription, shared with its pumps.
struct SubPrefetch {
    key: SubKey,
    /// The client's advertised pre-fetch buffer (bytes).
    capacity: AtomicU64,
    /// Bytes sent on all partition streams and not yet covered by a `Position`.
    inflight_bytes: AtomicU64,
    /// Incremented on each `Forecast` (pumps halve their boost).
    forecasts: AtomicU64,
}

struct Sub {
    dp: Arc<DataPlane>,
    conn: Connection,
    sub: Subscribe,
    /// The stream's partition count: frames naming other partitions are ignored.
    partitions: u32,
    bucket: Arc<Mutex<TokenBucket>>,
    epoch: u64,
    pumps: HashMap<u32, Arc<PumpCtl>>,
    tasks: JoinSet<()>,
    positions: BTreeMap<u32, u64>,
    prefetch: Arc<SubPrefetch>,
    deviation: DeviationTracker,
    last_forecast: Option<Forecast>,
}

/// Serves one control stream whose first frame was `sub`, for a session holding `claims`.
/// Frame errors close `conn` with their code; subscription errors are answered with
/// `SubError` and the stream is finished.
pub async fn serve_subscription(
    dp: Arc<DataPlane>,
    claims: Arc<Claims>,
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    mut dec: FrameDecoder,
    sub: Subscribe,
) {
    let refuse = |e: SubError| Frame::SubError(e);
    let partitions = if !claims.allows(&sub.stream, Action::Subscribe) {
        Err(sub_error(
            ErrorCode::Forbidden,
            format!("the token does not allow subscribing to {:?}", sub.stream),
        ))
    } else {
        match dp.reader.link().streams().await {
            Ok(s) => s
                .into_iter()
                .find(|s| s.name == sub.stream)
                .map(|s| s.partitions)
                .ok_or_else(|| {
                    sub_error(ErrorCode::NotFound, format!("no stream {:?}", sub.stream))
                }),
            Err(e) => Err(link_sub_error(&e)),
        }
    };
    let partitions = match partitions {
        Ok(p) => p,
        Err(e) => {
            debug!(stream = %sub.stream, code = %e.code, "subscribe refused");
            if quic::write_frame(&mut send, &refuse(e)).await.is_ok() {
                let _ = send.finish();
            }
            return;
        }
    };
    // A new group starts where its first member's `Start` resolves to (the hub ignores the
    // starts of a group it already has).
    let mut group_starts = Vec::new();
    if sub.group.is_some() {
        for p in 0..partitions {
            match resolve_start(&dp.reader, &sub.stream, p, &sub.start).await {
                Ok(o) => group_starts.push((p, o)),
                Err(e) => {
                    if quic::write_frame(&mut send, &refuse(link_sub_error(&e)))
                        .await
                        .is_ok()
                    {
                        let _ = send.finish();
                    }
                    return;
                }
            }
        }
    }
    let cfg = &dp.cfg;
    let now = Instant::now();
    let bucket = TokenBucket::new(cfg.grant_rate, cfg.grant_burst, cfg.grant_lease, now);
    crate::obs::inc(&crate::obs::metrics::GRANTS, &[]);
    if quic::write_frame(&mut send, &Frame::Grant(grant(&bucket)))
        .await
        .is_err()
    {
        return;
    }
    let mut s = Sub {
        dp: dp.clone(),
        conn: conn.clone(),
        sub,
        partitions,
        bucket: Arc::new(Mutex::new(bucket)),
        epoch: 0,
        pumps: HashMap::new(),
        tasks: JoinSet::new(),
        positions: BTreeMap::new(),
        prefetch: Arc::new(SubPrefetch {
            key: SubKey(0),
            capacity: AtomicU64::new(DEFAULT_CLIENT_BUFFER),
            inflight_bytes: AtomicU64::new(0),
            forecasts: AtomicU64::new(0),
        }),
        deviation: DeviationTracker::new(DeviationConfig::default()),
        last_forecast: None,
    };
    let (change_tx, mut change_rx) = mpsc::unbounded_channel::<Owned>();
    let member = dp.next_member.fetch_add(1, Ordering::Relaxed);
    if let Some(p) = Arc::get_mut(&mut s.prefetch) {
        p.key = SubKey(member);
    }
    // The planner forgets this subscription however it ends (also when its task is aborted
    // with the connection).
    let planned = Planned {
        dp: dp.clone(),
        key: SubKey(member),
    };
    if s.sub.mode == Mode::Predictive {
        lock(&dp.planner).set_rtt(SubKey(member), conn.rtt() + POSITION_LAG);
    }
    let group = s.sub.group.clone();
    let mut group_rx = None;
    let mut membership = None;
    if let Some(g) = &group {
        // The first assignment comes from the hub (possibly empty while hand-overs to this
        // member are pending).
        let link = dp.reader.link();
        group_rx = Some(
            link.join_group(member, &s.sub.stream, g, group_starts)
                .await,
        );
        membership = Some(Membership {
            link: link.clone(),
            member,
        });
    } else {
        let partitions = (0..partitions).map(|p| (p, None)).collect();
        let _ = change_tx.send(Owned { partitions });
    }
    // A `Forecast` sent with `Subscribe` (the SDK does) is planned before the first pumps
    // start, so the client's buffer bound holds from the first batch.
    let mut early = Ok(());
    while early.is_ok() {
        match dec.next_frame() {
            Ok(Some(f)) => early = on_frame(&mut s, f, member),
            Ok(None) => break,
            Err(e) => early = Err(e.into()),
        }
    }
    let result = match early {
        Ok(()) => {
            control_loop(
                &mut s,
                &mut send,
                &mut recv,
                &mut dec,
                &mut change_rx,
                group_rx.as_mut(),
                member,
            )
            .await
        }
        Err(e) => Err(e),
    };
    drop(membership);
    // The subscription ends: finish every partition stream.
    for ctl in s.pumps.values() {
        ctl.stop.send_replace(true);
    }
    drop(planned);
    match result {
        Ok(()) => {
            let _ = send.finish();
            while s.tasks.join_next().await.is_some() {}
        }
        Err(e) => {
            s.tasks.abort_all();
            if let Some(code) = e.close_code() {
                debug!(%code, "closing session: {e}");
                quic::close(&conn, code, &e.to_string());
            }
        }
    }
}

/// A subscription's consumer-group membership: leaves the group when dropped, also when
/// the subscription task is aborted with its connection.
struct Membership {
    link: StoreLink,
    member: MemberId,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.link.leave_group(self.member);
    }
}

/// A subscription's pre-fetch plan: removed from the shard's planner when dropped.
struct Planned {
    dp: Arc<DataPlane>,
    key: SubKey,
}

impl Drop for Planned {
    fn drop(&mut self) {
        lock(&self.dp.planner).remove_sub(self.key);
    }
}

fn grant(b: &TokenBucket) -> Grant {
    Grant {
        rate_records_per_s: b.rate(),
        burst: b.burst(),
        lease_expires_ms: unix_ms()
            .saturating_add(u64::try_from(b.lease().as_millis()).unwrap_or(u64::MAX)),
    }
}

async fn control_loop(
    s: &mut Sub,
    send: &mut SendStream,
    recv: &mut RecvStream,
    dec: &mut FrameDecoder,
    changes: &mut mpsc::UnboundedReceiver<Owned>,
    mut group: Option<&mut mpsc::UnboundedReceiver<GroupAssignment>>,
    member: MemberId,
) -> Result<(), StreamError> {
    loop {
        let renew_at = lock(&s.bucket).renew_at();
        let deviation_at = s.deviation.poll_timeout();
        tokio::select! {
            f = quic::read_frame(recv, dec) => match f {
                // Finished or reset by the client: this subscription ends, the session goes on
                // (PROTOCOL.md §6.2).
                Ok(None) | Err(StreamError::Read(quinn::ReadError::Reset(_))) => return Ok(()),
                Ok(Some(f)) => on_frame(s, f, member)?,
                Err(e) => return Err(e),
            },
            () = sleep_until(deviation_at), if deviation_at.is_some() => {
                s.deviation.handle_timeout(Instant::now());
                on_deviations(s);
            }
            Some(c) = changes.recv() => {
                if apply(s, send, c).await.is_err() {
                    return Ok(());
                }
            }
            Some(a) = next_group_assignment(&mut group) => {
                let partitions = a.partitions.iter().map(|&(p, o)| (p, Some(o))).collect();
                if apply(s, send, Owned { partitions }).await.is_err() {
                    return Ok(());
                }
            }
            _ = tokio::time::sleep_until(renew_at.into()) => {
                let g = {
                    let mut b = lock(&s.bucket);
                    b.renewed(Instant::now());
                    grant(&b)
                };
                crate::obs::inc(&crate::obs::metrics::GRANTS, &[]);
                if quic::write_frame(send, &Frame::Grant(g)).await.is_err() {
                    return Ok(());
                }
            }
            Some(_) = s.tasks.join_next(), if !s.tasks.is_empty() => {}
        }
    }
}

/// A client frame on the control stream after `Subscribe` (PROTOCOL.md §6.2): `Position`,
/// `Fetch` and `Forecast` entries for partitions the stream does not have are ignored and
/// leave no state; `Fetch` for a partition not assigned now is ignored (no credit kept);
/// `Forecast` is ignored in reactive mode.
fn on_frame(s: &mut Sub, frame: Frame, member: MemberId) -> Result<(), StreamError> {
    let predictive = s.sub.mode == Mode::Predictive;
    match frame {
        Frame::Position(p) if p.partition >= s.partitions => {}
        Frame::Position(p) => {
            s.positions.insert(p.partition, p.next_offset);
            if predictive {
                let now = Instant::now();
                s.deviation
                    .position(s.prefetch.key, p.partition, p.next_offset, now);
                if let Some(ctl) = s.pumps.get(&p.partition) {
                    ctl.acked.fetch_max(p.next_offset, Ordering::SeqCst);
                    ctl.wake.notify_one();
                }
            }
            if s.sub.group.is_some() {
                // The hub records it (owner) or completes a hand-over (previous owner); a
                // stale report changes nothing there.
                // `serving`: sent before this shard applied a revocation of the partition, so
                // it cannot end a hand-over.
                let serving = s.pumps.contains_key(&p.partition);
                s.dp.reader
                    .link()
                    .group_position(member, p.partition, p.next_offset, serving);
            }
        }
        Frame::Fetch(f) => {
            if let Some(ctl) = s.pumps.get(&f.partition) {
                ctl.credit
                    .fetch_add(u64::from(f.max_records), Ordering::SeqCst);
                ctl.credit_added.notify_one();
            }
        }
        Frame::Forecast(f) => {
            if predictive {
                on_forecast(s, f);
            }
        }
        other => return Err(StreamError::Unexpected(other.frame_type())),
    }
    Ok(())
}

/// The next assignment the hub pushed for this member (pending forever without a group).
async fn next_group_assignment(
    rx: &mut Option<&mut mpsc::UnboundedReceiver<GroupAssignment>>,
) -> Option<GroupAssignment> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A `Forecast` in predictive mode: the planner's rates, depth and lead time, the client's
/// buffer, the deviation tracker's predictions; pumps re-plan. Entries for partitions the
/// stream does not have are dropped first, so the work is bounded by the stream's size.
fn on_forecast(s: &mut Sub, mut f: Forecast) {
    let partitions = s.partitions;
    f.partitions.retain(|p| p.partition < partitions);
    let key = s.prefetch.key;
    let now = Instant::now();
    {
        let mut planner = lock(&s.dp.planner);
        planner.set_rtt(key, s.conn.rtt() + POSITION_LAG);
        planner.update_forecast(key, &f);
    }
    for pf in &f.partitions {
        s.deviation
            .predict(key, pf.partition, pf.records_per_s as f64, now);
    }
    s.prefetch
        .capacity
        .store(f.buffer_capacity_bytes, Ordering::SeqCst);
    s.prefetch.forecasts.fetch_add(1, Ordering::SeqCst);
    if s.sub.group.is_some() {
        // The group's partition loads (rate-aware assignment at the hub).
        let loads = f
            .partitions
            .iter()
            .map(|p| (p.partition, p.records_per_s, p.bytes_per_s))
            .collect();
        s.dp.reader.link().group_forecast(key.0, loads);
    }
    s.last_forecast = Some(f);
    for ctl in s.pumps.values() {
        ctl.wake.notify_one();
    }
}

/// Persistent deviations between positions and the forecast: until the next `Forecast`,
/// the planner uses the measured rate of each deviating partition as its load.
fn on_deviations(s: &mut Sub) {
    let Some(mut f) = s.last_forecast.clone() else {
        while s.deviation.poll_flagged().is_some() {}
        return;
    };
    let mut changed = false;
    while let Some(d) = s.deviation.poll_flagged() {
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
            changed = true;
        } else {
            f.partitions.push(PartitionForecast {
                partition: d.partition,
                records_per_s: d.actual.round() as u64,
                bytes_per_s: 0,
            });
            changed = true;
        }
    }
    if changed {
        lock(&s.dp.planner).update_forecast(s.prefetch.key, &f);
        for ctl in s.pumps.values() {
            ctl.wake.notify_one();
        }
    }
}

/// Applies a new owned set with a new epoch: every partition stream of the previous epoch
/// is finished (the client treats them as stale), the `Assignment` is sent, and a pump per
/// owned partition starts — a partition kept from the previous epoch at the client's last
/// `Position` (the SDK drops what it already has), a new one at the group's known position
/// or the subscription's start.
async fn apply(s: &mut Sub, send: &mut SendStream, c: Owned) -> Result<(), quinn::WriteError> {
    s.epoch += 1;
    let mut previous = std::mem::take(&mut s.pumps);
    for ctl in previous.values() {
        ctl.stop.send_replace(true);
    }
    let mut owned = c.partitions;
    owned.sort_unstable();
    let predictive = s.sub.mode == Mode::Predictive;
    if predictive {
        let key = s.prefetch.key;
        let mut planner = lock(&s.dp.planner);
        for p in previous.keys() {
            if !owned.iter().any(|(o, _)| o == p) {
                planner.revoked(key, *p);
                s.deviation.remove(key, *p);
            }
        }
        for (p, _) in &owned {
            // Warm-up: a partition new to this subscription gets a warm-up batch.
            planner.assigned(key, *p);
        }
    }
    let mut parts = Vec::with_capacity(owned.len());
    for (p, known) in owned {
        let start = match previous.remove(&p) {
            Some(ctl) => s.positions.get(&p).copied().unwrap_or(ctl.start),
            None => {
                let start = match known {
                    Some(o) => Start::Offsets([(p, o)].into_iter().collect()),
                    None => s.sub.start.clone(),
                };
                match resolve_start(&s.dp.reader, &s.sub.stream, p, &start).await {
                    Ok(o) => o,
                    Err(e) => {
                        let err = link_sub_error(&e);
                        quic::write_frame(send, &Frame::SubError(err)).await?;
                        let _ = send.finish();
                        return Err(quinn::WriteError::ClosedStream);
                    }
                }
            }
        };
        let priority = if predictive {
            lock(&s.dp.planner).priority(s.prefetch.key, p)
        } else {
            0
        };
        parts.push(AssignedPartition {
            partition: p,
            start_offset: start,
            priority,
        });
    }
    let a = Assignment {
        sub_id: s.sub.sub_id,
        epoch: s.epoch,
        partitions: parts.clone(),
    };
    quic::write_frame(send, &Frame::Assignment(a)).await?;
    for ap in parts {
        let (stop, stop_rx) = watch::channel(false);
        let ctl = Arc::new(PumpCtl {
            start: ap.start_offset,
            credit: AtomicU64::new(0),
            credit_added: Notify::new(),
            stop,
            acked: AtomicU64::new(ap.start_offset),
            wake: Notify::new(),
        });
        s.pumps.insert(ap.partition, ctl.clone());
        let pump = Pump {
            dp: s.dp.clone(),
            conn: s.conn.clone(),
            stream: s.sub.stream.clone(),
            sub_id: s.sub.sub_id,
            epoch: s.epoch,
            partition: ap.partition,
            next: ap.start_offset,
            priority: ap.priority,
            reactive: s.sub.mode == Mode::Reactive,
            prefetch: predictive.then(|| s.prefetch.clone()),
            bucket: s.bucket.clone(),
            ctl,
        };
        s.tasks.spawn(pump.run(stop_rx));
    }
    Ok(())
}

struct Pump {
    dp: Arc<DataPlane>,
    conn: Connection,
    stream: String,
    sub_id: u32,
    epoch: u64,
    partition: u32,
    next: u64,
    priority: i32,
    reactive: bool,
    prefetch: Option<Arc<SubPrefetch>>,
    bucket: Arc<Mutex<TokenBucket>>,
    ctl: Arc<PumpCtl>,
}

/// A pump's pre-fetch window (predictive mode).
struct Window {
    /// Batches sent and not yet covered by a `Position`: (offset after the batch, bytes).
    sent: VecDeque<(u64, u64, Instant)>,
    /// Sum of `sent` bytes.
    bytes: u64,
    /// Starvation multiplier of the depth (1 ..= `MAX_BOOST`).
    boost: u64,
    /// The last check found no room.
    held: bool,
    /// `SubPrefetch::forecasts` when the boost was last halved.
    forecasts_seen: u64,
    /// The stream's current QUIC priority.
    priority: i32,
}

/// The starvation boost after a pump's re-check: doubled (≤ [`MAX_BOOST`]) when the last
/// check held back (`held`) and the client has since confirmed (by `Position`) every record
/// sent more than `starved_after` ago (`oldest_unacked`: the age of the oldest batch it has
/// not confirmed, `None` when it confirmed everything); unchanged otherwise. Such a client
/// consumes what arrives as soon as it arrives: the window, not the client, limits delivery
/// (the forecast lags a rate increase, or a reader catching up on a backlog has no forecast
/// yet). A client reading at the forecast rate keeps about a lead time of records unconsumed,
/// so its oldest unconfirmed batch is older than that and the window stays. Waiting for the
/// client to confirm *everything* (the rule before) missed a reader catching up: the records on
/// the wire when it sends its `Position` are never confirmed by it, so a backlog drained at the
/// 32-record warm-up window.
fn grown_boost(
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

/// How long a pump waits before retrying after the store link failed.
const RETRY: Duration = Duration::from_millis(50);

impl Pump {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let Ok(mut send) = self.conn.open_uni().await else {
            return;
        };
        let _ = send.set_priority(self.priority);
        let open = Frame::PartitionOpen(PartitionOpen {
            sub_id: self.sub_id,
            partition: self.partition,
            epoch: self.epoch,
        });
        if quic::write_frame(&mut send, &open).await.is_err() {
            return;
        }
        let mut w = Window {
            sent: VecDeque::new(),
            bytes: 0,
            boost: 1,
            held: false,
            forecasts_seen: 0,
            priority: self.priority,
        };
        tokio::select! {
            _ = self.pump(&mut send, &mut w) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        if let Some(pf) = &self.prefetch {
            // The client drops (or already counted) what this stream carried.
            pf.inflight_bytes.fetch_sub(w.bytes, Ordering::SeqCst);
        }
        let _ = send.finish();
    }

    /// Predictive: forgets in-flight batches the client's `Position` covers.
    fn settle(&self, pf: &SubPrefetch, w: &mut Window) -> u64 {
        let acked = self.ctl.acked.load(Ordering::SeqCst);
        while let Some(&(end, bytes, _)) = w.sent.front() {
            if end > acked {
                break;
            }
            w.sent.pop_front();
            w.bytes -= bytes;
            pf.inflight_bytes.fetch_sub(bytes, Ordering::SeqCst);
        }
        acked
    }

    /// Predictive: the client buffer space the shard may still fill (bytes).
    fn client_free(pf: &SubPrefetch) -> u64 {
        pf.capacity
            .load(Ordering::SeqCst)
            .saturating_sub(pf.inflight_bytes.load(Ordering::SeqCst))
    }

    /// Predictive: how many records and bytes this pump may push now (zero: hold).
    fn room(&self, send: &mut SendStream, pf: &SubPrefetch, w: &mut Window) -> (u64, u64) {
        let acked = self.settle(pf, w);
        let forecasts = pf.forecasts.load(Ordering::SeqCst);
        if forecasts == 0 {
            // No `Forecast` yet (a client that does not forecast): push within flow control
            // and the grant only; what is sent is still counted for when one arrives.
            return (u64::MAX, u64::MAX);
        }
        if forecasts != w.forecasts_seen {
            w.forecasts_seen = forecasts;
            w.boost = (w.boost / 2).max(1);
        }
        let inflight = self.next.saturating_sub(acked);
        let (depth, warm, priority) = {
            let p = lock(&self.dp.planner);
            (
                p.depth(pf.key, self.partition).records,
                p.warmup_left(pf.key, self.partition),
                p.priority(pf.key, self.partition),
            )
        };
        if priority != w.priority {
            let _ = send.set_priority(priority);
            w.priority = priority;
        }
        let base = if depth == 0 {
            // No forecast for this partition yet: a warm-up-sized window until one arrives.
            PrefetchConfig::default().warmup_records
        } else {
            depth.saturating_mul(HEADROOM.0).div_ceil(HEADROOM.1)
        };
        let now = Instant::now();
        w.boost = grown_boost(
            w.boost,
            w.held,
            w.sent
                .front()
                .map(|&(_, _, at)| now.saturating_duration_since(at)),
            self.conn.rtt() + STARVED_MARGIN,
        );
        let records = base
            .saturating_mul(w.boost)
            .saturating_sub(inflight)
            .max(warm);
        let bytes = Self::client_free(pf);
        w.held = records == 0 || bytes == 0;
        if w.held { (0, 0) } else { (records, bytes) }
    }

    /// Predictive: waits for a `Position`, a `Forecast` or the re-check period.
    async fn hold(&self) {
        tokio::select! {
            () = self.ctl.wake.notified() => {}
            () = tokio::time::sleep(RECHECK) => {}
        }
    }

    /// Sends records until the stream fails (the caller stops it by dropping this future).
    async fn pump(&mut self, send: &mut SendStream, w: &mut Window) {
        let cfg = &self.dp.cfg;
        let reader = self.dp.reader.clone();
        let mut tail = reader.link().watch_tail(&self.stream, self.partition);
        loop {
            let mut want = u64::from(cfg.batch_records);
            let mut max_bytes = cfg.batch_bytes;
            if let Some(pf) = &self.prefetch {
                let (records, bytes) = self.room(send, pf, w);
                if records == 0 {
                    self.hold().await;
                    continue;
                }
                want = want.min(records);
                max_bytes = u32::try_from(bytes.min(u64::from(max_bytes))).unwrap_or(max_bytes);
            }
            if self.reactive {
                let credit = self.ctl.credit.load(Ordering::SeqCst);
                if credit == 0 {
                    let notified = self.ctl.credit_added.notified();
                    if self.ctl.credit.load(Ordering::SeqCst) == 0 {
                        notified.await;
                    }
                    continue;
                }
                want = want.min(credit);
            }
            let wait = {
                let mut b = lock(&self.bucket);
                let now = Instant::now();
                match b.available(now) {
                    0 => Some(b.wait_for(1, now)),
                    n => {
                        want = want.min(n);
                        None
                    }
                }
            };
            if let Some(w) = wait {
                tokio::time::sleep(w.max(Duration::from_millis(1))).await;
                continue;
            }
            // `want` ≤ batch_records ≤ 16384.
            let want = u32::try_from(want).unwrap_or(u32::MAX);
            let batch = match reader
                .read(&self.stream, self.partition, self.next, want, max_bytes)
                .await
            {
                Ok(b) => b,
                Err(LinkError::Store(RemoteError::OffsetOutOfRange { earliest, .. }))
                    if self.next < earliest =>
                {
                    // Retention deleted what this consumer had not read yet.
                    self.next = earliest;
                    continue;
                }
                Err(e) if e.is_retryable() => {
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                Err(e) => {
                    debug!(partition = self.partition, error = %e, "partition stream ends");
                    return;
                }
            };
            let Some(records) = batch.records() else {
                // At the tail: wait for an append past `next`.
                let next = self.next;
                if tail.wait_for(|t| *t > next).await.is_err() {
                    tokio::time::sleep(RETRY).await;
                    tail = reader.link().watch_tail(&self.stream, self.partition);
                }
                continue;
            };
            let count = u64::from(records.count());
            if let Some(pf) = &self.prefetch {
                // A batch is at least one record, which may be larger than the free client
                // buffer: hold it until it fits or nothing of the subscription is in flight.
                let body = records.body_len() as u64;
                loop {
                    self.settle(pf, w);
                    if pf.forecasts.load(Ordering::SeqCst) == 0
                        || body <= Self::client_free(pf)
                        || pf.inflight_bytes.load(Ordering::SeqCst) == 0
                    {
                        break;
                    }
                    self.hold().await;
                }
                w.sent
                    .push_back((batch.next_offset(), body, Instant::now()));
                w.bytes += body;
                pf.inflight_bytes.fetch_add(body, Ordering::SeqCst);
                lock(&self.dp.planner).on_pushed(pf.key, self.partition, count);
            }
            lock(&self.bucket).consume(count, Instant::now());
            if self.reactive {
                let _ = self
                    .ctl
                    .credit
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                        Some(c.saturating_sub(count))
                    });
            }
            // The frame header and the batch header, then the record section itself, shared
            // with the cache (no copy).
            let mut head = Vec::with_capacity(21);
            head.push(FrameType::Records.to_u8());
            // Batches are bounded by batch_bytes (≤ 1 MiB) plus one record: far below 4 GiB.
            let len = u32::try_from(records.body_len()).unwrap_or(u32::MAX);
            head.extend_from_slice(&len.to_be_bytes());
            records.encode_header(&mut head);
            let data = records.shared_data();
            if send.write_chunk(Bytes::from(head)).await.is_err()
                || send.write_chunk(data).await.is_err()
            {
                return;
            }
            self.next = batch.next_offset();
            crate::obs::delivered(&self.stream, self.conn.stable_id(), count, u64::from(len));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{MAX_BOOST, grown_boost};

    const MS: Duration = Duration::from_millis(1);

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
