//! Subscriptions on a shard (PROTOCOL.md §6.2, §6.3): one task per control stream, one
//! pump per assigned partition.
//!
//! ```text
//! control stream: Subscribe ─▶ scope check (token) ─▶ stream exists (store link)
//!   ◀── Grant{rate, burst, lease}        (TokenBucket; renewed half-way through the lease)
//!   ◀── Assignment{epoch, partitions}    (all partitions, or the group's share)
//!   ──▶ Position (recorded; drives group hand-over), Fetch (reactive credit), Forecast (ignored)
//! pump per partition: open uni ─ priority ─ PartitionOpen ─▶ loop:
//!   tokens ← bucket (and credit in reactive mode) ─▶ CachedReader::read(next, ≤ tokens)
//!   ─ empty: wait for the store link's tail watch ─▶ write Records (one chunk) ─▶ next
//! ```
//!
//! Flow control: a pump reads the next batch only after the previous one was handed to
//! QUIC, so a consumer that stops reading stops its pumps (QUIC flow control) and nothing
//! else buffers. Batches are forwarded as stored by the hub (the `Records` body is built
//! once by the hub and copied once into the QUIC chunk).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream};
use sibyl_proto::frame::{
    AssignedPartition, Assignment, Grant, Mode, PartitionOpen, Start, SubError, Subscribe,
};
use sibyl_proto::{Codec, ErrorCode, Frame, FrameDecoder, FrameType};
use sibyl_tokens::{Action, Claims};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tracing::debug;

use super::groups::{Change, GroupCoordinator, MemberId};
use crate::config::SubscribeConfig;
use crate::grants::TokenBucket;
use crate::quic::{self, StreamError};
use crate::storelink::{CachedReader, LinkError, RemoteError};

/// The shard's data plane: the store reader, the settings and the group coordinator.
pub struct DataPlane {
    reader: CachedReader,
    cfg: SubscribeConfig,
    groups: Mutex<GroupCoordinator>,
    members: Mutex<HashMap<MemberId, mpsc::UnboundedSender<Change>>>,
    next_member: AtomicU64,
    groups_changed: Notify,
}

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
        let dp = Arc::new(Self {
            reader,
            groups: Mutex::new(GroupCoordinator::new(cfg.handover_timeout)),
            cfg,
            members: Mutex::new(HashMap::new()),
            next_member: AtomicU64::new(1),
            groups_changed: Notify::new(),
        });
        // Drives hand-over timeouts; ends when the data plane is dropped.
        let weak = Arc::downgrade(&dp);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Some(dp) = weak.upgrade() else { return };
                let changes = lock(&dp.groups).poll(Instant::now());
                dp.dispatch(changes);
            }
        });
        dp
    }

    /// The store reader.
    pub fn reader(&self) -> &CachedReader {
        &self.reader
    }

    fn dispatch(&self, changes: Vec<Change>) {
        let members = lock(&self.members);
        for c in changes {
            if let Some(tx) = members.get(&c.member) {
                let _ = tx.send(c);
            }
        }
        self.groups_changed.notify_waiters();
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
}

struct Sub {
    dp: Arc<DataPlane>,
    conn: Connection,
    sub: Subscribe,
    bucket: Arc<Mutex<TokenBucket>>,
    epoch: u64,
    pumps: HashMap<u32, Arc<PumpCtl>>,
    tasks: JoinSet<()>,
    positions: BTreeMap<u32, u64>,
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
    let cfg = &dp.cfg;
    let now = Instant::now();
    let bucket = TokenBucket::new(cfg.grant_rate, cfg.grant_burst, cfg.grant_lease, now);
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
        bucket: Arc::new(Mutex::new(bucket)),
        epoch: 0,
        pumps: HashMap::new(),
        tasks: JoinSet::new(),
        positions: BTreeMap::new(),
    };
    let (change_tx, mut change_rx) = mpsc::unbounded_channel::<Change>();
    let member = dp.next_member.fetch_add(1, Ordering::Relaxed);
    let group = s.sub.group.clone();
    if let Some(g) = &group {
        lock(&dp.members).insert(member, change_tx.clone());
        let (changes, mine) = {
            let mut groups = lock(&dp.groups);
            let changes = groups.join(&s.sub.stream, g, partitions, member, now);
            let mine = groups.owned(member);
            (changes, mine)
        };
        if !changes.iter().any(|c| c.member == member) {
            // Nothing for it yet (hand-overs pending): an Assignment all the same.
            let owned = mine.into_iter().map(|p| (p, None)).collect();
            let _ = change_tx.send(Change { member, owned });
        }
        dp.dispatch(changes);
    } else {
        let all = (0..partitions).map(|p| (p, None)).collect();
        let _ = change_tx.send(Change { member, owned: all });
    }
    let result = control_loop(
        &mut s,
        &mut send,
        &mut recv,
        &mut dec,
        &mut change_rx,
        member,
    )
    .await;
    if group.is_some() {
        lock(&dp.members).remove(&member);
        let changes = lock(&dp.groups).leave(member, Instant::now());
        dp.dispatch(changes);
    }
    // The subscription ends: finish every partition stream.
    for ctl in s.pumps.values() {
        ctl.stop.send_replace(true);
    }
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
    changes: &mut mpsc::UnboundedReceiver<Change>,
    member: MemberId,
) -> Result<(), StreamError> {
    loop {
        let renew_at = lock(&s.bucket).renew_at();
        tokio::select! {
            f = quic::read_frame(recv, dec) => match f? {
                None => return Ok(()),
                Some(Frame::Position(p)) => {
                    s.positions.insert(p.partition, p.next_offset);
                    if s.sub.group.is_some() {
                        let ch = lock(&s.dp.groups).position(member, p.partition, p.next_offset);
                        s.dp.dispatch(ch);
                    }
                }
                Some(Frame::Fetch(f)) => {
                    if let Some(ctl) = s.pumps.get(&f.partition) {
                        ctl.credit.fetch_add(u64::from(f.max_records), Ordering::SeqCst);
                        ctl.credit_added.notify_one();
                    }
                }
                Some(Frame::Forecast(_)) => {}
                Some(other) => return Err(StreamError::Unexpected(other.frame_type())),
            },
            Some(c) = changes.recv() => {
                if apply(s, send, c).await.is_err() {
                    return Ok(());
                }
            }
            _ = tokio::time::sleep_until(renew_at.into()) => {
                let g = {
                    let mut b = lock(&s.bucket);
                    b.renewed(Instant::now());
                    grant(&b)
                };
                if quic::write_frame(send, &Frame::Grant(g)).await.is_err() {
                    return Ok(());
                }
            }
            Some(_) = s.tasks.join_next(), if !s.tasks.is_empty() => {}
        }
    }
}

/// Applies a new owned set with a new epoch: every partition stream of the previous epoch
/// is finished (the client treats them as stale), the `Assignment` is sent, and a pump per
/// owned partition starts — a partition kept from the previous epoch at the client's last
/// `Position` (the SDK drops what it already has), a new one at the group's known position
/// or the subscription's start.
async fn apply(s: &mut Sub, send: &mut SendStream, c: Change) -> Result<(), quinn::WriteError> {
    s.epoch += 1;
    let mut previous = std::mem::take(&mut s.pumps);
    for ctl in previous.values() {
        ctl.stop.send_replace(true);
    }
    let mut owned = c.owned;
    owned.sort_unstable();
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
        parts.push(AssignedPartition {
            partition: p,
            start_offset: start,
            priority: 0,
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
    bucket: Arc<Mutex<TokenBucket>>,
    ctl: Arc<PumpCtl>,
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
        tokio::select! {
            _ = self.pump(&mut send) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        let _ = send.finish();
    }

    /// Sends records until the stream fails (the caller stops it by dropping this future).
    async fn pump(&mut self, send: &mut SendStream) {
        let cfg = &self.dp.cfg;
        let reader = self.dp.reader.clone();
        let mut tail = reader.link().watch_tail(&self.stream, self.partition);
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let mut want = u64::from(cfg.batch_records);
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
                .read(
                    &self.stream,
                    self.partition,
                    self.next,
                    want,
                    cfg.batch_bytes,
                )
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
            lock(&self.bucket).consume(count, Instant::now());
            if self.reactive {
                let _ = self
                    .ctl
                    .credit
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                        Some(c.saturating_sub(count))
                    });
            }
            buf.clear();
            buf.reserve(5 + records.body_len());
            buf.push(FrameType::Records.to_u8());
            // Batches are bounded by batch_bytes (≤ 1 MiB) plus one record: far below 4 GiB.
            let len = u32::try_from(records.body_len()).unwrap_or(u32::MAX);
            buf.extend_from_slice(&len.to_be_bytes());
            records.encode(&mut buf);
            let chunk = Bytes::from(std::mem::take(&mut buf));
            if send.write_chunk(chunk).await.is_err() {
                return;
            }
            self.next = batch.next_offset();
        }
    }
}
