//! Subscriptions on a shard (PROTOCOL.md §6.2, §6.3): the async driver of [`Flow`], one task
//! per control stream and one pump task per assigned partition. Every decision — grant and
//! renewal, epochs, positions, credit, pre-fetch windows and boost, deviations — is the
//! I/O-free [`Flow`]'s (`session/flow.rs`); this module moves frames, store reads and timers
//! in and out of it.
//!
//! ```text
//! control stream: Subscribe ─▶ scope check (token) ─▶ stream exists (store link)
//!   Flow::new ──poll_transmit──▶ Grant (renewed at Flow::poll_timeout, Timer::GrantRenewal)
//!   owned set (all partitions, or the hub's GroupAssignment) ─▶ Flow::handle_owned
//!     ─▶ resolve starts (store link) ─▶ Flow::handle_starts ──poll_transmit──▶ Assignment
//!                                                           ──poll_pump──▶ start/stop pumps
//!   ──▶ Position | Fetch | Forecast ─▶ Flow::handle_frame ──poll_relay──▶ hub (a group's
//!       positions and loads over the store link), ──poll_pump──▶ wake pumps
//! pump per partition: open uni ─ priority ─ PartitionOpen ─▶ loop:
//!   Flow::poll_send ─▶ Wait (wake | deadline) | Read{from, records, bytes}
//!   ─▶ CachedReader::read ─ empty: wait for the store link's tail watch
//!   ─▶ Flow::admit_batch ─▶ write Records (one chunk)
//! ```
//!
//! Lock order: a subscription's [`Flow`], then the shard's [`PrefetchPlanner`]; neither is
//! held across an `.await`.
//!
//! Flow control: a pump reads the next batch only after the previous one was handed to
//! QUIC, so a consumer that stops reading stops its pumps (QUIC flow control) and nothing
//! else buffers. Batches are forwarded as the hub wrote them: the `Records` body is built
//! once by the hub, read once from the store link into one buffer (`Bytes`), and its record
//! section is handed to QUIC as a slice of that buffer (no copy on the shard).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream};
use sibyl_proto::frame::{Grant, PartitionOpen, Start, SubError, Subscribe};
use sibyl_proto::{ErrorCode, Frame, FrameDecoder, FrameType};
use sibyl_tokens::{Action, Claims};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tracing::debug;

use super::flow::{
    Admit, Batch, Flow, FlowConfig, FlowError, GroupRelay, PumpEvent, PumpStep, StartAt, Transmit,
};
use crate::config::SubscribeConfig;
use crate::predict::{MemberId, PrefetchConfig, PrefetchPlanner, SubKey};
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

/// How long a pump waits before retrying after the store link failed.
const RETRY: Duration = Duration::from_millis(50);

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

    fn flow_config(&self) -> FlowConfig {
        FlowConfig {
            grant_rate: self.cfg.grant_rate,
            grant_burst: self.cfg.grant_burst,
            grant_lease: self.cfg.grant_lease,
            batch_records: self.cfg.batch_records,
            batch_bytes: self.cfg.batch_bytes,
        }
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

/// A pump as the control task sees it.
struct PumpHandle {
    stop: watch::Sender<bool>,
    wake: Arc<Notify>,
}

/// What the control task and the pumps of one subscription share.
struct Shared {
    dp: Arc<DataPlane>,
    conn: Connection,
    stream: String,
    sub_id: u32,
    flow: Mutex<Flow>,
}

impl Shared {
    /// Runs `f` on the flow and the shard's planner (in that lock order).
    fn with<R>(&self, f: impl FnOnce(&mut Flow, &mut PrefetchPlanner) -> R) -> R {
        let mut flow = lock(&self.flow);
        let mut planner = lock(&self.dp.planner);
        f(&mut flow, &mut planner)
    }
}

/// The control task's state.
struct Sub {
    shared: Arc<Shared>,
    sub: Subscribe,
    member: MemberId,
    pumps: HashMap<u32, PumpHandle>,
    tasks: JoinSet<()>,
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
    // A subscription's group member id on the store link and its pre-fetch key: unique in
    // this process (the hub scopes it to this shard's link).
    let n = dp.next_member.fetch_add(1, Ordering::Relaxed);
    let (member, key) = (MemberId(n), SubKey(n));
    // The planner forgets this subscription however it ends (also when its task is aborted
    // with the connection).
    let planned = Planned {
        dp: dp.clone(),
        key,
    };
    let flow = {
        let mut planner = lock(&dp.planner);
        Flow::new(
            dp.flow_config(),
            &sub,
            partitions,
            key,
            Instant::now(),
            conn.rtt(),
            &mut planner,
        )
    };
    let mut s = Sub {
        shared: Arc::new(Shared {
            dp: dp.clone(),
            conn: conn.clone(),
            stream: sub.stream.clone(),
            sub_id: sub.sub_id,
            flow: Mutex::new(flow),
        }),
        sub,
        member,
        pumps: HashMap::new(),
        tasks: JoinSet::new(),
    };
    // The first `Grant`.
    if flush(&mut s, &mut send).await.is_err() {
        return;
    }
    let mut group_rx = None;
    let mut membership = None;
    let mut first = None;
    if let Some(g) = &s.sub.group {
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
        first = Some((0..partitions).map(|p| (p, None)).collect::<Vec<_>>());
    }
    // A `Forecast` sent with `Subscribe` (the SDK does) is planned before the first pumps
    // start, so the client's buffer bound holds from the first batch.
    let mut early = Ok(());
    while early.is_ok() {
        match dec.next_frame() {
            Ok(Some(f)) => early = on_frame(&mut s, f),
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
                first,
                group_rx.as_mut(),
            )
            .await
        }
        Err(e) => Err(e),
    };
    drop(membership);
    // The subscription ends: finish every partition stream.
    for h in s.pumps.values() {
        h.stop.send_replace(true);
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

/// A [`Transmit`] as a frame; a `Grant`'s lease is stamped with the wall clock here.
fn transmit_frame(t: Transmit) -> Frame {
    match t {
        Transmit::Grant { rate, burst, lease } => Frame::Grant(Grant {
            rate_records_per_s: rate,
            burst,
            lease_expires_ms: unix_ms()
                .saturating_add(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX)),
        }),
        Transmit::Assignment(a) => Frame::Assignment(a),
    }
}

/// Moves the flow's outputs out: control frames to `send` first (an `Assignment` goes out
/// before its pumps start), then group reports to the hub and pump starts, stops and wakes.
async fn flush(s: &mut Sub, send: &mut SendStream) -> Result<(), quinn::WriteError> {
    loop {
        let t = lock(&s.shared.flow).poll_transmit();
        match t {
            Some(t) => quic::write_frame(send, &transmit_frame(t)).await?,
            None => break,
        }
    }
    dispatch(s);
    Ok(())
}

/// Moves the flow's group reports to the hub and its pump events to the pumps.
fn dispatch(s: &mut Sub) {
    let (relays, events) = {
        let mut f = lock(&s.shared.flow);
        let relays: Vec<_> = std::iter::from_fn(|| f.poll_relay()).collect();
        let events: Vec<_> = std::iter::from_fn(|| f.poll_pump()).collect();
        (relays, events)
    };
    if !relays.is_empty() {
        let link = s.shared.dp.reader.link();
        for r in relays {
            match r {
                GroupRelay::Position {
                    partition,
                    next_offset,
                    serving,
                } => link.group_position(s.member, partition, next_offset, serving),
                GroupRelay::Forecast(loads) => link.group_forecast(s.member, loads),
            }
        }
    }
    for e in events {
        on_pump_event(s, e);
    }
}

fn on_pump_event(s: &mut Sub, e: PumpEvent) {
    match e {
        PumpEvent::Wake(p) => {
            if let Some(h) = s.pumps.get(&p) {
                h.wake.notify_one();
            }
        }
        PumpEvent::Stop(p) => {
            if let Some(h) = s.pumps.remove(&p) {
                h.stop.send_replace(true);
            }
        }
        PumpEvent::Start {
            partition,
            epoch,
            priority,
            ..
        } => {
            let (stop, stop_rx) = watch::channel(false);
            let wake = Arc::new(Notify::new());
            if let Some(old) = s.pumps.insert(
                partition,
                PumpHandle {
                    stop,
                    wake: wake.clone(),
                },
            ) {
                old.stop.send_replace(true);
            }
            let pump = Pump {
                shared: s.shared.clone(),
                partition,
                epoch,
                priority,
                wake,
            };
            s.tasks.spawn(pump.run(stop_rx));
        }
    }
}

/// A client frame on the control stream after `Subscribe`, into the flow.
fn on_frame(s: &mut Sub, frame: Frame) -> Result<(), StreamError> {
    let rtt = s.shared.conn.rtt();
    s.shared
        .with(|f, planner| f.handle_frame(frame, Instant::now(), rtt, planner))
        .map_err(|e| match e {
            FlowError::Unexpected(t) => StreamError::Unexpected(t),
        })
}

/// Opens the next epoch with `owned`: the flow decides the starts, the store link resolves
/// the new ones, the flow queues the `Assignment` and the pumps. A start that cannot be
/// resolved ends the subscription with `SubError`.
async fn apply(
    s: &mut Sub,
    send: &mut SendStream,
    owned: Vec<(u32, Option<u64>)>,
) -> Result<(), quinn::WriteError> {
    let plan = s.shared.with(|f, planner| f.handle_owned(owned, planner));
    // The previous epoch's pumps stop now, not after the starts are resolved.
    dispatch(s);
    let mut starts = Vec::with_capacity(plan.len());
    for (p, at) in plan {
        let o = match at {
            StartAt::Kept(o) => o,
            StartAt::Resolve(start) => {
                match resolve_start(&s.shared.dp.reader, &s.sub.stream, p, &start).await {
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
        starts.push((p, o));
    }
    s.shared.with(|f, planner| f.handle_starts(starts, planner));
    flush(s, send).await
}

async fn control_loop(
    s: &mut Sub,
    send: &mut SendStream,
    recv: &mut RecvStream,
    dec: &mut FrameDecoder,
    first: Option<Vec<(u32, Option<u64>)>>,
    mut group: Option<&mut mpsc::UnboundedReceiver<GroupAssignment>>,
) -> Result<(), StreamError> {
    // Early frames' outputs (group reports, wakes) go out first.
    if flush(s, send).await.is_err() {
        return Ok(());
    }
    if let Some(owned) = first
        && apply(s, send, owned).await.is_err()
    {
        return Ok(());
    }
    loop {
        let timeout = lock(&s.shared.flow).poll_timeout();
        tokio::select! {
            f = quic::read_frame(recv, dec) => match f {
                // Finished or reset by the client: this subscription ends, the session goes on
                // (PROTOCOL.md §6.2).
                Ok(None) | Err(StreamError::Read(quinn::ReadError::Reset(_))) => return Ok(()),
                Ok(Some(f)) => on_frame(s, f)?,
                Err(e) => return Err(e),
            },
            () = sleep_until(timeout) => {
                s.shared.with(|f, planner| f.handle_timeout(Instant::now(), planner));
            }
            Some(a) = next_group_assignment(&mut group) => {
                let owned = a.partitions.iter().map(|&(p, o)| (p, Some(o))).collect();
                if apply(s, send, owned).await.is_err() {
                    return Ok(());
                }
            }
            Some(_) = s.tasks.join_next(), if !s.tasks.is_empty() => {}
        }
        if flush(s, send).await.is_err() {
            return Ok(());
        }
    }
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

/// Moves one partition's records: asks the flow what to send, reads it through the store
/// link, offers the batch to the flow and writes it.
struct Pump {
    shared: Arc<Shared>,
    partition: u32,
    epoch: u64,
    priority: i32,
    wake: Arc<Notify>,
}

impl Pump {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let Ok(mut send) = self.shared.conn.open_uni().await else {
            return;
        };
        let _ = send.set_priority(self.priority);
        let open = Frame::PartitionOpen(PartitionOpen {
            sub_id: self.shared.sub_id,
            partition: self.partition,
            epoch: self.epoch,
        });
        if quic::write_frame(&mut send, &open).await.is_err() {
            return;
        }
        tokio::select! {
            () = self.pump(&mut send) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        let _ = send.finish();
    }

    /// Waits for a wake from the control task or until `until`.
    async fn wait(&self, until: Option<Instant>) {
        tokio::select! {
            () = self.wake.notified() => {}
            () = sleep_until(until) => {}
        }
    }

    /// Sends records until the stream fails or the flow stops this epoch (the caller also
    /// stops it by dropping this future).
    async fn pump(&self, send: &mut SendStream) {
        let (p, epoch) = (self.partition, self.epoch);
        let reader = self.shared.dp.reader.clone();
        let stream = self.shared.stream.as_str();
        let mut tail = reader.link().watch_tail(stream, p);
        loop {
            let rtt = self.shared.conn.rtt();
            let poll = self
                .shared
                .with(|f, planner| f.poll_send(p, epoch, Instant::now(), rtt, planner));
            if let Some(priority) = poll.priority {
                let _ = send.set_priority(priority);
            }
            let (from, want, max_bytes) = match poll.step {
                PumpStep::Stop => return,
                PumpStep::Wait { until } => {
                    self.wait(until).await;
                    continue;
                }
                PumpStep::Read {
                    from,
                    records,
                    max_bytes,
                } => (from, records, max_bytes),
            };
            let batch = match reader.read(stream, p, from, want, max_bytes).await {
                Ok(b) => b,
                Err(LinkError::Store(RemoteError::OffsetOutOfRange { earliest, .. }))
                    if from < earliest =>
                {
                    // Retention deleted what this consumer had not read yet.
                    lock(&self.shared.flow).handle_skip(p, epoch, earliest);
                    continue;
                }
                Err(e) if e.is_retryable() => {
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                Err(e) => {
                    debug!(partition = p, error = %e, "partition stream ends");
                    return;
                }
            };
            let Some(records) = batch.records() else {
                // At the tail: wait for an append past `from`.
                if tail.wait_for(|t| *t > from).await.is_err() {
                    tokio::time::sleep(RETRY).await;
                    tail = reader.link().watch_tail(stream, p);
                }
                continue;
            };
            let read = Batch {
                next_offset: batch.next_offset(),
                bytes: records.body_len() as u64,
                records: u64::from(records.count()),
            };
            loop {
                let admit = self
                    .shared
                    .with(|f, planner| f.admit_batch(p, epoch, read, Instant::now(), planner));
                match admit {
                    Admit::Send => break,
                    Admit::Wait { until } => self.wait(Some(until)).await,
                    Admit::Stop => return,
                }
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
        }
    }
}
