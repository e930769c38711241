//! The shard side: a multiplexed, reconnecting client of the hub's store link, and the relay
//! of this shard's consumer-group members to the hub's coordinator.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sibyl_proto::Backoff;
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::batch::RecordBatch;
use super::codec::{self, MAX_FRAME_LEN, RemoteError, Request, Response, ServerMsg, StreamInfo};
use super::group::{GroupAssign, GroupMsg, MAX_GROUP_PARTITIONS, encode_group_msg};
use super::raw::{self, RawHint};
use super::server::{LinkReadError, read_frame, size_link_buffers, write_loop};
use crate::predict::{MemberId, PartitionLoad};

/// Why a store link call failed. Say whose fault it is and whether to retry with
/// [`is_retryable`](Self::is_retryable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The hub answered with a store error (see [`RemoteError`] for whose fault).
    #[error("store: {0}")]
    Store(#[from] RemoteError),
    /// The hub sent bytes that are not a valid answer; the link was reset.
    #[error("store link protocol violation: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// The link is down (hub gone, reconnecting); retry after a while.
    #[error("store link down: {reason}")]
    Down {
        /// Why.
        reason: String,
    },
    /// No answer within [`LinkConfig::request_timeout`].
    #[error("store link request timed out")]
    Timeout,
}

impl LinkError {
    /// True when the same call may succeed later without the caller changing it.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(RemoteError::Unavailable { .. }) => true,
            Self::Store(_) => false,
            Self::Protocol { .. } | Self::Down { .. } | Self::Timeout => true,
        }
    }

    fn down(reason: impl Into<String>) -> Self {
        Self::Down {
            reason: reason.into(),
        }
    }
}

/// Client settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// How long a call waits for its answer. Default 30 s.
    pub request_timeout: Duration,
    /// First reconnect delay after the link drops; later ones double, without jitter (one
    /// link per shard process). Default 20 ms.
    pub backoff_initial: Duration,
    /// Largest reconnect delay. Default 2 s.
    pub backoff_max: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_secs(2),
        }
    }
}

type Reply = Result<ServerMsg, LinkError>;
type WatchKey = (String, u32);

struct WatchSlot {
    tx: watch::Sender<u64>,
    /// Id of the `WatchTail` on the current connection, if registered.
    remote: Option<u64>,
}

/// A consumer-group assignment the hub pushed for one member of this shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupAssignment {
    /// The hub's epoch for the member (strictly increasing per hub-side membership); 0 when
    /// the link went down: everything is revoked until the hub answers the re-join.
    pub epoch: u64,
    /// `(partition, start_offset)`: the member's complete set. A partition new to the member
    /// starts at its offset (the group's committed position).
    pub partitions: Vec<(u32, u64)>,
}

/// A group member of this shard, re-joined on every new connection.
struct MemberSlot {
    stream: String,
    group: String,
    /// The join's starts, updated with every relayed position: what a re-join seeds a group
    /// the hub no longer has (all its members were on this link) with.
    starts: BTreeMap<u32, u64>,
    tx: mpsc::UnboundedSender<GroupAssignment>,
}

impl MemberSlot {
    fn join_msg(&self, member: MemberId) -> GroupMsg {
        GroupMsg::Join {
            member,
            stream: self.stream.clone(),
            group: self.group.clone(),
            starts: self.starts.iter().map(|(&p, &o)| (p, o)).collect(),
        }
    }
}

#[derive(Default)]
struct State {
    conn: Option<mpsc::Sender<Vec<u8>>>,
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    watches: HashMap<WatchKey, WatchSlot>,
    watch_ids: HashMap<u64, WatchKey>,
    members: HashMap<MemberId, MemberSlot>,
}

struct Inner {
    path: PathBuf,
    cfg: LinkConfig,
    next_id: AtomicU64,
    state: Mutex<State>,
    /// Signalled when the connection drops.
    dropped: tokio::sync::Notify,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; recover the data if one ever did.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed)
    }
}

/// A shard's handle on the hub's store: cheap to clone, multiplexed over one Unix socket
/// (request ids, answers in any order), reconnecting with a [`Backoff`] in a background task
/// that ends when the last clone is dropped.
///
/// While the link is down, calls fail fast with [`LinkError::Down`]; tail watches survive
/// and are re-registered on reconnect.
#[derive(Clone)]
pub struct StoreLink {
    inner: Arc<Inner>,
    _shutdown: Arc<watch::Sender<()>>,
}

impl std::fmt::Debug for StoreLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLink")
            .field("path", &self.inner.path)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl StoreLink {
    /// [`connect_with`](Self::connect_with) the default [`LinkConfig`].
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, LinkError> {
        Self::connect_with(path, LinkConfig::default()).await
    }

    /// Connects to the hub's socket at `path` (fails if the first connect fails) and starts
    /// the background task. Must be called inside a tokio runtime.
    pub async fn connect_with(path: impl AsRef<Path>, cfg: LinkConfig) -> Result<Self, LinkError> {
        let path = path.as_ref().to_owned();
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|e| LinkError::down(format!("connect {}: {e}", path.display())))?;
        let inner = Arc::new(Inner {
            path,
            cfg,
            next_id: AtomicU64::new(1),
            state: Mutex::new(State::default()),
            dropped: tokio::sync::Notify::new(),
        });
        let (shutdown, shutdown_rx) = watch::channel(());
        attach(&inner, stream);
        tokio::spawn(drive(inner.clone(), shutdown_rx));
        Ok(Self {
            inner,
            _shutdown: Arc::new(shutdown),
        })
    }

    /// True while the socket is connected.
    pub fn is_connected(&self) -> bool {
        self.inner.state().conn.is_some()
    }

    /// Every stream of the store and its partition count.
    pub async fn streams(&self) -> Result<Vec<StreamInfo>, LinkError> {
        match self.call(|id| Request::Streams { id }).await? {
            ServerMsg::Response(Response::Streams { streams, .. }) => Ok(streams),
            other => Err(unexpected(&other)),
        }
    }

    /// `(earliest, next)` of a partition.
    pub async fn bounds(&self, stream: &str, partition: u32) -> Result<(u64, u64), LinkError> {
        let req = |id| Request::Bounds {
            id,
            stream: stream.to_owned(),
            partition,
        };
        match self.call(req).await? {
            ServerMsg::Response(Response::Bounds { earliest, next, .. }) => Ok((earliest, next)),
            other => Err(unexpected(&other)),
        }
    }

    /// The first offset whose record has a timestamp `>= ts_ms`, or `next` if none.
    pub async fn offset_for_timestamp(
        &self,
        stream: &str,
        partition: u32,
        ts_ms: u64,
    ) -> Result<u64, LinkError> {
        let req = |id| Request::OffsetForTimestamp {
            id,
            stream: stream.to_owned(),
            partition,
            ts_ms,
        };
        match self.call(req).await? {
            ServerMsg::Response(Response::Offset { offset, .. }) => Ok(offset),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads records from `from` on (semantics of [`Store::read`](crate::store::Store::read);
    /// the hub also caps the answer, by default at 65 536 records / 4 MiB). At the tail the
    /// batch is empty.
    pub async fn read(
        &self,
        stream: &str,
        partition: u32,
        from: u64,
        max_records: u32,
        max_bytes: u32,
    ) -> Result<RecordBatch, LinkError> {
        let req = |id| Request::Read {
            id,
            stream: stream.to_owned(),
            partition,
            from,
            max_records,
            max_bytes,
        };
        match self.call(req).await? {
            ServerMsg::Batch { records, .. } => {
                starting_at(RecordBatch::from_records(records), partition, from)
            }
            ServerMsg::Response(Response::ReadEmpty { next, .. }) => {
                Ok(RecordBatch::empty(partition, next))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Reads like [`read`](Self::read) through a raw read: the hub sends segment bytes and
    /// this side checks and re-encodes them ([`super::raw`]). `hint` is where the previous
    /// raw read of the partition ended, if `from` is its `next`. Returns the batch and, when
    /// it came from segment bytes, where the next raw read continues. When the bytes hold no
    /// good record from `from` (a corrupt record, a gap) this falls back to a verifying
    /// [`read`](Self::read), so errors are those of `read`.
    pub async fn read_raw(
        &self,
        stream: &str,
        partition: u32,
        from: u64,
        max_records: u32,
        max_bytes: u32,
        hint: Option<RawHint>,
    ) -> Result<(RecordBatch, Option<RawHint>), LinkError> {
        let hint = hint
            .filter(|h| h.next == from)
            .map(|h| (h.segment_base, h.pos));
        let req = |id| Request::ReadRaw {
            id,
            stream: stream.to_owned(),
            partition,
            from,
            max_records,
            max_bytes,
            hint,
        };
        let msg = self.call(req).await?;
        let (batch, next) = match msg {
            ServerMsg::Raw {
                segment_base,
                pos,
                data,
                ..
            } => match raw::decode_raw(partition, from, max_records, segment_base, pos, &data) {
                Ok((records, next)) => (RecordBatch::from_records(records), Some(next)),
                Err(problem) => {
                    tracing::debug!(
                        stream, partition, from, %problem,
                        "raw read unusable; reading the verifying way"
                    );
                    let b = self
                        .read(stream, partition, from, max_records, max_bytes)
                        .await?;
                    return Ok((b, None));
                }
            },
            ServerMsg::Batch { records, .. } => (RecordBatch::from_records(records), None),
            ServerMsg::Response(Response::ReadEmpty { next, .. }) => {
                return Ok((RecordBatch::empty(partition, next), None));
            }
            other => return Err(unexpected(&other)),
        };
        Ok((starting_at(batch, partition, from)?, next))
    }

    /// Watches a partition's `next` offset. The receiver starts at 0 until the hub answers,
    /// then follows the partition (only growing; intermediate values may be skipped). All
    /// watchers of a partition on this link share one hub-side watch, dropped after the last
    /// receiver is gone. The receiver is closed if the hub refuses the watch (no such stream
    /// or partition); it survives reconnects.
    pub fn watch_tail(&self, stream: &str, partition: u32) -> watch::Receiver<u64> {
        let mut st = self.inner.state();
        let key = (stream.to_owned(), partition);
        if let Some(slot) = st.watches.get(&key) {
            return slot.tx.subscribe();
        }
        let (tx, rx) = watch::channel(0);
        let mut slot = WatchSlot { tx, remote: None };
        if let Some(conn) = st.conn.clone() {
            let id = self.inner.id();
            if register(&conn, id, &key) {
                slot.remote = Some(id);
                st.watch_ids.insert(id, key.clone());
            }
        }
        st.watches.insert(key, slot);
        rx
    }

    /// Relays a consumer-group join to the hub's coordinator: `member` (unique on this shard)
    /// joins `group` of `stream`; `starts` (`(partition, offset)`) seed a new group. Returns
    /// the member's assignments as the hub pushes them. The membership survives reconnects
    /// (re-joined on each new connection; while the link is down the member gets an empty
    /// assignment with epoch 0) until [`leave_group`](Self::leave_group).
    pub async fn join_group(
        &self,
        member: MemberId,
        stream: &str,
        group: &str,
        starts: Vec<(u32, u64)>,
    ) -> mpsc::UnboundedReceiver<GroupAssignment> {
        let (tx, rx) = mpsc::unbounded_channel();
        let slot = MemberSlot {
            stream: stream.to_owned(),
            group: group.to_owned(),
            starts: starts.into_iter().collect(),
            tx,
        };
        let msg = slot.join_msg(member);
        let conn = {
            let mut st = self.inner.state();
            st.members.insert(member, slot);
            st.conn.clone()
        };
        // Down: the next connection re-joins it.
        if let (Some(conn), Some(f)) = (conn, group_frame(&msg)) {
            let _ = conn.send(f).await;
        }
        rx
    }

    /// Relays that `member`'s subscription ended. Not async, so that it can run from a drop
    /// guard (a subscription task aborted with its connection): queued at once, or by a
    /// spawned task when the queue is full. While the link is down there is nothing to send:
    /// the hub removed every member of the old connection already.
    pub fn leave_group(&self, member: MemberId) {
        let conn = {
            let mut st = self.inner.state();
            if st.members.remove(&member).is_none() {
                return;
            }
            st.conn.clone()
        };
        let (Some(conn), Some(f)) = (conn, group_frame(&GroupMsg::Leave { member })) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(f)) = conn.try_send(f)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = conn.send(f).await;
            });
        }
    }

    /// Relays a member's `Position`; `serving`: this shard still sends the member that
    /// partition (best effort: dropped while the link is down or its queue is full; a
    /// hand-over then completes at the hub's deadline).
    pub fn group_position(
        &self,
        member: MemberId,
        partition: u32,
        next_offset: u64,
        serving: bool,
    ) {
        let mut st = self.inner.state();
        let Some(slot) = st.members.get_mut(&member) else {
            return;
        };
        slot.starts.insert(partition, next_offset);
        let msg = GroupMsg::Position {
            member,
            partition,
            next_offset,
            serving,
        };
        if let (Some(conn), Some(f)) = (&st.conn, group_frame(&msg)) {
            let _ = conn.try_send(f);
        }
    }

    /// Relays a member's `Forecast` as its partitions' loads (best effort, at most
    /// [`MAX_GROUP_PARTITIONS`] entries are sent).
    pub fn group_forecast(&self, member: MemberId, mut loads: Vec<PartitionLoad>) {
        loads.truncate(MAX_GROUP_PARTITIONS);
        let st = self.inner.state();
        if !st.members.contains_key(&member) {
            return;
        }
        if let (Some(conn), Some(f)) =
            (&st.conn, group_frame(&GroupMsg::Forecast { member, loads }))
        {
            let _ = conn.try_send(f);
        }
    }

    async fn call(&self, req: impl FnOnce(u64) -> Request) -> Result<ServerMsg, LinkError> {
        let id = self.inner.id();
        let mut frame = Vec::new();
        codec::encode_request(&req(id), &mut frame).map_err(|e| {
            LinkError::Store(RemoteError::Refused {
                reason: format!("request does not encode: {e}"),
            })
        })?;
        let (tx, rx) = oneshot::channel();
        let conn = {
            let mut st = self.inner.state();
            let conn = st
                .conn
                .clone()
                .ok_or_else(|| LinkError::down("reconnecting"))?;
            st.pending.insert(id, tx);
            conn
        };
        let _guard = PendingGuard {
            inner: &self.inner,
            id,
        };
        conn.send(frame)
            .await
            .map_err(|_| LinkError::down("connection closed"))?;
        match tokio::time::timeout(self.inner.cfg.request_timeout, rx).await {
            Err(_) => Err(LinkError::Timeout),
            Ok(Err(_)) => Err(LinkError::down("connection closed")),
            Ok(Ok(reply)) => match reply? {
                ServerMsg::Response(Response::Error { error, .. }) => Err(LinkError::Store(error)),
                msg => Ok(msg),
            },
        }
    }
}

/// Removes a call's pending entry however the call ends (answer, timeout, cancellation).
struct PendingGuard<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.inner.state().pending.remove(&self.id);
    }
}

/// `batch` if it holds `partition`'s records from `from` on, as a read of `from` asked.
fn starting_at(batch: RecordBatch, partition: u32, from: u64) -> Result<RecordBatch, LinkError> {
    if batch.partition() != partition || batch.base_offset() != from {
        return Err(LinkError::Protocol {
            reason: "batch does not start at the requested offset".into(),
        });
    }
    Ok(batch)
}

fn unexpected(msg: &ServerMsg) -> LinkError {
    let what = match msg {
        ServerMsg::Batch { .. } => "a batch".to_owned(),
        ServerMsg::Raw { .. } => "segment bytes".to_owned(),
        ServerMsg::Response(r) => format!("{r:?}"),
        ServerMsg::Group(g) => format!("{g:?}"),
    };
    LinkError::Protocol {
        reason: format!("unexpected answer: {what}"),
    }
}

/// A request's frame (`None`, logged, if it does not encode: only over-long lists could).
fn group_frame(msg: &GroupMsg) -> Option<Vec<u8>> {
    let mut f = Vec::new();
    match encode_group_msg(msg, &mut f) {
        Ok(()) => Some(f),
        Err(e) => {
            tracing::warn!(error = %e, "store link: group message does not encode");
            None
        }
    }
}

/// Queues a `WatchTail`; false if the connection's queue is full or gone (the watch is then
/// registered on the next connection).
fn register(conn: &mpsc::Sender<Vec<u8>>, id: u64, key: &WatchKey) -> bool {
    let mut f = Vec::new();
    let req = Request::WatchTail {
        id,
        stream: key.0.clone(),
        partition: key.1,
    };
    codec::encode_request(&req, &mut f).is_ok() && conn.try_send(f).is_ok()
}

/// Installs a fresh connection: starts its writer, re-registers live watches, and spawns its
/// reader.
fn attach(inner: &Arc<Inner>, stream: UnixStream) {
    size_link_buffers(&stream);
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Vec<u8>>(1024);
    tokio::spawn(async move {
        let _ = write_loop(wr, rx).await;
    });
    {
        let mut guard = inner.state();
        let st = &mut *guard;
        st.watches.retain(|_, s| s.tx.receiver_count() > 0);
        st.watch_ids.clear();
        for (key, slot) in st.watches.iter_mut() {
            let id = inner.id();
            slot.remote = None;
            if register(&tx, id, key) {
                slot.remote = Some(id);
                st.watch_ids.insert(id, key.clone());
            }
        }
        // Re-join this shard's group members (the hub dropped them with the old connection),
        // in order, waiting for room in the queue.
        let joins: Vec<Vec<u8>> = st
            .members
            .iter()
            .filter_map(|(&m, slot)| group_frame(&slot.join_msg(m)))
            .collect();
        if !joins.is_empty() {
            let tx = tx.clone();
            tokio::spawn(async move {
                for f in joins {
                    if tx.send(f).await.is_err() {
                        return;
                    }
                }
            });
        }
        st.conn = Some(tx);
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        let mut rd = BufReader::with_capacity(64 << 10, rd);
        let reason = loop {
            let body = match read_frame(&mut rd, MAX_FRAME_LEN).await {
                Ok(Some(b)) => b,
                Ok(None) => break "hub closed the link".to_owned(),
                Err(LinkReadError::Io(e)) => break format!("i/o: {e}"),
                Err(LinkReadError::Codec(e)) => break format!("hub sent garbage: {e}"),
            };
            match codec::decode_server_msg_shared(&body) {
                Ok(msg) => dispatch(&inner, msg),
                Err(e) => break format!("hub sent garbage: {e}"),
            }
        };
        detach(&inner, &reason);
    });
}

/// Marks the link down and fails every pending call.
fn detach(inner: &Inner, reason: &str) {
    tracing::warn!(reason, "store link down");
    let mut st = inner.state();
    st.conn = None;
    for (_, p) in st.pending.drain() {
        let _ = p.send(Err(LinkError::down(reason)));
    }
    st.watch_ids.clear();
    for s in st.watches.values_mut() {
        s.remote = None;
    }
    // The hub removes this connection's members from their groups and moves their
    // partitions on: stop serving them here until the re-join is answered.
    for slot in st.members.values() {
        let _ = slot.tx.send(GroupAssignment {
            epoch: 0,
            partitions: Vec::new(),
        });
    }
    drop(st);
    inner.dropped.notify_one();
}

fn dispatch(inner: &Inner, msg: ServerMsg) {
    let mut guard = inner.state();
    let st = &mut *guard;
    let id = match &msg {
        ServerMsg::Batch { id, .. } | ServerMsg::Raw { id, .. } => *id,
        ServerMsg::Group(GroupAssign {
            member,
            epoch,
            partitions,
        }) => {
            if let Some(slot) = st.members.get(member) {
                let _ = slot.tx.send(GroupAssignment {
                    epoch: *epoch,
                    partitions: partitions.clone(),
                });
            }
            return;
        }
        ServerMsg::Response(r) => match r {
            Response::Watching { id, next } | Response::Tail { watch: id, next } => {
                let (id, next) = (*id, *next);
                let Some(key) = st.watch_ids.get(&id) else {
                    return;
                };
                let Some(slot) = st.watches.get(key) else {
                    return;
                };
                if slot.tx.receiver_count() == 0 {
                    let key = key.clone();
                    st.watches.remove(&key);
                    st.watch_ids.remove(&id);
                    if let Some(conn) = &st.conn {
                        let mut f = Vec::new();
                        if codec::encode_request(&Request::Unwatch { watch: id }, &mut f).is_ok() {
                            let _ = conn.try_send(f);
                        }
                    }
                    return;
                }
                slot.tx.send_if_modified(|v| {
                    let grew = next > *v;
                    *v = (*v).max(next);
                    grew
                });
                return;
            }
            Response::Error { id, .. } if st.watch_ids.contains_key(id) => {
                // The hub refused a watch: close its receivers.
                if let Some(key) = st.watch_ids.remove(id) {
                    st.watches.remove(&key);
                }
                return;
            }
            Response::Streams { id, .. }
            | Response::Bounds { id, .. }
            | Response::Offset { id, .. }
            | Response::ReadEmpty { id, .. }
            | Response::Error { id, .. } => *id,
        },
    };
    if let Some(p) = st.pending.remove(&id) {
        let _ = p.send(Ok(msg));
    }
}

/// Reconnects after each drop until the last handle is gone.
async fn drive(inner: Arc<Inner>, mut shutdown: watch::Receiver<()>) {
    let backoff = Backoff::new(inner.cfg.backoff_initial, inner.cfg.backoff_max);
    loop {
        // Wait for the current connection to drop (`notify_one` keeps the signal if it came
        // before we wait).
        tokio::select! {
            _ = shutdown.changed() => { close(&inner); return; }
            _ = inner.dropped.notified() => {}
        }
        let mut retry = 0u32;
        loop {
            let delay = backoff.ceiling(retry);
            retry = retry.saturating_add(1);
            tokio::select! {
                _ = shutdown.changed() => { close(&inner); return; }
                _ = tokio::time::sleep(delay) => {}
            }
            match UnixStream::connect(&inner.path).await {
                Ok(s) => {
                    tracing::info!(path = %inner.path.display(), "store link reconnected");
                    attach(&inner, s);
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "store link reconnect failed"),
            }
        }
    }
}

/// Last handle dropped: close the connection (the reader ends on EOF).
fn close(inner: &Inner) {
    let mut st = inner.state();
    st.conn = None;
    st.watches.clear();
    st.watch_ids.clear();
    st.members.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability_follows_whose_fault() {
        assert!(LinkError::Timeout.is_retryable());
        assert!(LinkError::down("x").is_retryable());
        let unavailable = RemoteError::Unavailable {
            reason: "io".into(),
        };
        assert!(LinkError::Store(unavailable).is_retryable());
        let oor = RemoteError::OffsetOutOfRange {
            requested: 1,
            earliest: 2,
            next: 3,
        };
        assert!(!LinkError::Store(oor).is_retryable());
    }
}
