//! The hub side: serves the store to shard processes over a Unix socket, and hands the
//! shards' group messages to [`super::coordination`].

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};

use super::codec::{
    self, CodecError, MAX_REQUEST_LEN, RemoteError, Request, Response, ShardMsg, StreamInfo,
};
use super::coordination::{Groups, LinkGuard, push_loop};
use crate::hub::groups::LinkId;
use crate::store::{RawRange, RawRead, Store};

/// Limits of the hub side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Store calls (reads, time lookups) running at once per shard link; further requests
    /// wait, which stops reading that link's socket. Default 16.
    pub max_inflight_per_link: usize,
    /// Tail watches per shard link; more are refused. Default 65 536.
    pub max_watches_per_link: usize,
    /// Records per `Read` answer, whatever the shard asks. Default 65 536.
    pub max_read_records: u32,
    /// Approximate bytes per `Read` answer, whatever the shard asks (one record larger than
    /// this is still served). Default 4 MiB, well under the 8 MiB frame bound.
    pub max_read_bytes: u32,
    /// Shard links open at once; more connections are closed at accept. Default 1024.
    pub max_links: usize,
    /// Consumer groups: how long a hand-over waits for the previous owner's final position
    /// (the gateway passes `[subscribe] handover_timeout`). Default 5 s.
    pub handover_timeout: Duration,
    /// Consumer-group members per shard link; more joins are ignored. Default 65 536.
    pub max_group_members_per_link: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_inflight_per_link: 16,
            max_watches_per_link: 65_536,
            max_read_records: 65_536,
            max_read_bytes: 4 << 20,
            max_links: 1024,
            handover_timeout: Duration::from_secs(5),
            max_group_members_per_link: 65_536,
        }
    }
}

/// The hub's store link listener. Dropping it stops accepting, closes every shard link and
/// removes the socket file.
#[derive(Debug)]
pub struct StoreLinkServer {
    path: PathBuf,
    accept: JoinHandle<()>,
    _shutdown: watch::Sender<()>,
    groups: GroupsHandle,
}

/// The coordination state, kept by the server for status queries.
struct GroupsHandle(Arc<Groups>);

impl std::fmt::Debug for GroupsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Groups")
    }
}

impl StoreLinkServer {
    /// [`bind_with`](Self::bind_with) the default [`ServerConfig`].
    pub fn bind(path: &Path, store: Arc<Store>) -> io::Result<Self> {
        Self::bind_with(path, store, ServerConfig::default())
    }

    /// Listens on `path` (a Unix socket, mode 0600; its directory is created with mode 0700
    /// if missing; a stale socket at `path` is removed, any other file is an error) and
    /// serves each shard connection on its own task. Must be called inside a tokio runtime.
    pub fn bind_with(path: &Path, store: Arc<Store>, cfg: ServerConfig) -> io::Result<Self> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let (shutdown, shutdown_rx) = watch::channel(());
        let groups = Arc::new(Groups::new(&cfg));
        tokio::spawn(groups.clone().deadlines(shutdown_rx.clone()));
        let handle = GroupsHandle(groups.clone());
        let accept = tokio::spawn(accept_loop(listener, store, cfg, groups, shutdown_rx));
        tracing::info!(path = %path.display(), "store link listening");
        Ok(Self {
            path: path.to_owned(),
            accept,
            _shutdown: shutdown,
            groups: handle,
        })
    }

    /// The consumer groups the hub coordinates
    /// ([`GroupCoordinator::view`](crate::hub::groups::GroupCoordinator::view)).
    pub fn consumer_groups(&self) -> Vec<crate::hub::groups::GroupView> {
        self.groups.0.view()
    }

    /// The socket path shards connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StoreLinkServer {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(
    listener: UnixListener,
    store: Arc<Store>,
    cfg: ServerConfig,
    groups: Arc<Groups>,
    shutdown: watch::Receiver<()>,
) {
    let links = Arc::new(Semaphore::new(cfg.max_links));
    let next_link = AtomicU64::new(1);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "store link accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = links.clone().try_acquire_owned() else {
            tracing::warn!("store link: too many shard links, closing a new one");
            continue;
        };
        let (store, mut shutdown) = (store.clone(), shutdown.clone());
        let link = LinkId(next_link.fetch_add(1, Ordering::Relaxed));
        let groups = groups.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = serve_link(stream, store, cfg, link, groups) => if let Err(e) = r {
                    tracing::warn!(error = %e, "store link closed");
                },
                _ = shutdown.changed() => {}
            }
            drop(permit);
        });
    }
}

/// Why a shard link was closed by the hub.
#[derive(Debug, thiserror::Error)]
enum LinkClosed {
    #[error("peer sent garbage: {0}")]
    Garbage(#[from] CodecError),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// Reads one frame body (tag included), `Ok(None)` at a clean end of stream. The body is read
/// straight into its own buffer (not zeroed first), which a batch's records then share.
pub(crate) async fn read_frame(
    rd: &mut BufReader<OwnedReadHalf>,
    max: usize,
) -> Result<Option<Bytes>, LinkReadError> {
    let mut h = [0u8; 4];
    match rd.read_exact(&mut h[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    rd.read_exact(&mut h[1..]).await?;
    let len = codec::frame_len(h, max)?;
    let mut body = BytesMut::with_capacity(len);
    while body.len() < len {
        // `take` keeps the read inside this frame; the capacity was reserved above.
        let left = (len - body.len()) as u64;
        if (&mut *rd).take(left).read_buf(&mut body).await? == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
    }
    Ok(Some(body.freeze()))
}

/// A frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkReadError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Socket buffer size asked for on both ends of a link (the kernel may cap it): a whole
/// 1 MiB batch frame fits, so the hub's write and the shard's read of one batch take one
/// system call and one wake-up each instead of several.
const LINK_SOCKET_BUFFER: usize = 4 << 20;

/// Enlarges `stream`'s send and receive buffers to [`LINK_SOCKET_BUFFER`]. Best effort: a
/// refusal only costs throughput, so it is logged and ignored.
pub(crate) fn size_link_buffers(stream: &UnixStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    for r in [
        setsockopt(stream, sockopt::SndBuf, &LINK_SOCKET_BUFFER),
        setsockopt(stream, sockopt::RcvBuf, &LINK_SOCKET_BUFFER),
    ] {
        if let Err(e) = r {
            tracing::debug!(error = %e, "store link: socket buffer size not set");
        }
    }
}

/// What a link's writer sends: an encoded frame, or a `Raw` frame whose segment bytes go
/// from the file to the socket with `sendfile` (never through the hub's memory).
#[derive(Debug)]
pub(crate) enum Out {
    /// A whole frame.
    Frame(Vec<u8>),
    /// The prefix of a `Raw` frame ([`codec::encode_raw_prefix`]), then `range`'s bytes.
    Raw { prefix: Vec<u8>, range: RawRange },
}

impl From<Vec<u8>> for Out {
    fn from(f: Vec<u8>) -> Self {
        Self::Frame(f)
    }
}

/// How often a `sendfile` waiting for the socket checks whether its link is gone.
const SENDFILE_POLL: Duration = Duration::from_millis(100);

/// Writes queued frames, coalescing whatever is queued into one flush.
pub(crate) async fn write_loop<T: Into<Out>>(
    wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<T>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(64 << 10, wr);
    // Set when this task ends, however it ends: a `sendfile` still waiting gives up.
    let gone = SetOnDrop(Arc::new(AtomicBool::new(false)));
    while let Some(f) = rx.recv().await {
        write_out(&mut w, f.into(), &gone.0).await?;
        while let Ok(f) = rx.try_recv() {
            write_out(&mut w, f.into(), &gone.0).await?;
        }
        w.flush().await?;
    }
    Ok(())
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn write_out(
    w: &mut BufWriter<OwnedWriteHalf>,
    out: Out,
    gone: &Arc<AtomicBool>,
) -> io::Result<()> {
    match out {
        Out::Frame(f) => w.write_all(&f).await,
        Out::Raw { prefix, range } => {
            w.write_all(&prefix).await?;
            w.flush().await?;
            // On a blocking thread: the file's pages may have to come from the disk. The
            // duplicate descriptor stays valid whatever happens to this task meanwhile.
            let sock = w.get_ref().as_ref().as_fd().try_clone_to_owned()?;
            let gone = gone.clone();
            tokio::task::spawn_blocking(move || send_range(&sock, &range, &gone))
                .await
                .map_err(io::Error::other)?
        }
    }
}

/// Sends `range`'s bytes from its file to the (non-blocking) socket `sock`, waiting for room
/// with `poll`; gives up when `gone` is set.
fn send_range(sock: &OwnedFd, range: &RawRange, gone: &AtomicBool) -> io::Result<()> {
    use nix::errno::Errno;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut off = i64::try_from(range.pos).map_err(io::Error::other)?;
    let mut left = range.len;
    let slice = PollTimeout::try_from(SENDFILE_POLL).unwrap_or(PollTimeout::MAX);
    while left > 0 {
        match nix::sys::sendfile::sendfile64(sock, &*range.file, Some(&mut off), left) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "segment file ends inside its range",
                ));
            }
            Ok(n) => left -= n.min(left),
            Err(Errno::EAGAIN) => {
                if gone.load(Ordering::Relaxed) {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, slice) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn response_frame(resp: &Response) -> Vec<u8> {
    let mut out = Vec::new();
    // Responses are a few integers and names of bounded length: far below the frame bound.
    if let Err(e) = codec::encode_response(resp, &mut out) {
        tracing::error!(error = %e, "store link: response does not encode");
    }
    out
}

fn error_frame(id: u64, error: RemoteError) -> Vec<u8> {
    response_frame(&Response::Error { id, error })
}

async fn serve_link(
    stream: UnixStream,
    store: Arc<Store>,
    cfg: ServerConfig,
    link: LinkId,
    groups: Arc<Groups>,
) -> Result<(), LinkClosed> {
    size_link_buffers(&stream);
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let (tx, rx) = mpsc::channel::<Out>(cfg.max_inflight_per_link + 64);
    let _writer = AbortOnDrop(tokio::spawn(write_loop(wr, rx)));
    // However this link ends (EOF, garbage, shutdown abort), its group members leave.
    let member_of = LinkGuard::new(link, groups.clone());
    let outbox = groups.add_link(link);
    let _pushes = AbortOnDrop(tokio::spawn(push_loop(outbox, tx.clone())));
    let inflight = Arc::new(Semaphore::new(cfg.max_inflight_per_link));
    let mut watches = WatchSet(HashMap::new());
    loop {
        let body = match read_frame(&mut rd, MAX_REQUEST_LEN).await {
            Ok(Some(b)) => b,
            Ok(None) => break Ok(()),
            Err(LinkReadError::Io(e)) => break Err(LinkClosed::Io(e)),
            Err(LinkReadError::Codec(e)) => break Err(LinkClosed::Garbage(e)),
        };
        let req = match codec::decode_shard_msg(&body) {
            Ok(ShardMsg::Store(r)) => r,
            Ok(ShardMsg::Group(g)) => {
                member_of.handle(g, &store);
                continue;
            }
            Err(e) => break Err(LinkClosed::Garbage(e)),
        };
        if handle(req, &store, &cfg, &tx, &inflight, &mut watches)
            .await
            .is_err()
        {
            // The writer is gone: the link is down.
            break Ok(());
        }
    }
}

/// Aborts a task when dropped (also when the link's task is itself aborted at shutdown).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Abort handles of a link's watch tasks, aborted when the link ends.
struct WatchSet(HashMap<u64, AbortHandle>);

impl Drop for WatchSet {
    fn drop(&mut self) {
        for h in self.0.values() {
            h.abort();
        }
    }
}

struct WriterGone;

async fn handle(
    req: Request,
    store: &Arc<Store>,
    cfg: &ServerConfig,
    tx: &mpsc::Sender<Out>,
    inflight: &Arc<Semaphore>,
    watches: &mut WatchSet,
) -> Result<(), WriterGone> {
    let send = |f: Vec<u8>| async move { tx.send(f.into()).await.map_err(|_| WriterGone) };
    match req {
        Request::Streams { id } => {
            let streams = store
                .streams()
                .into_iter()
                .map(|(name, c)| StreamInfo {
                    name,
                    partitions: c.partitions,
                })
                .collect();
            send(response_frame(&Response::Streams { id, streams })).await
        }
        Request::Bounds {
            id,
            stream,
            partition,
        } => {
            // In memory: a partition mutex held for a few instructions.
            let f = match store.bounds(&stream, partition) {
                Ok((earliest, next)) => response_frame(&Response::Bounds { id, earliest, next }),
                Err(e) => error_frame(id, RemoteError::from(&e)),
            };
            send(f).await
        }
        Request::OffsetForTimestamp {
            id,
            stream,
            partition,
            ts_ms,
        } => {
            store_call(inflight, store, tx, id, move |store| {
                match store.offset_for_timestamp(&stream, partition, ts_ms) {
                    Ok(offset) => response_frame(&Response::Offset { id, offset }),
                    Err(e) => error_frame(id, RemoteError::from(&e)),
                }
                .into()
            })
            .await;
            Ok(())
        }
        Request::Read {
            id,
            stream,
            partition,
            from,
            max_records,
            max_bytes,
        } => {
            let max_records = max_records.clamp(1, cfg.max_read_records.max(1)) as usize;
            let max_bytes = max_bytes.min(cfg.max_read_bytes) as usize;
            store_call(inflight, store, tx, id, move |store| {
                read_frame_blocking(store, id, &stream, partition, from, max_records, max_bytes)
                    .into()
            })
            .await;
            Ok(())
        }
        Request::ReadRaw {
            id,
            stream,
            partition,
            from,
            max_records,
            max_bytes,
            hint,
        } => {
            let max_records = max_records.clamp(1, cfg.max_read_records.max(1)) as usize;
            let max_bytes = max_bytes.min(cfg.max_read_bytes) as usize;
            store_call(inflight, store, tx, id, move |store| {
                raw_blocking(
                    store,
                    id,
                    &stream,
                    partition,
                    from,
                    hint,
                    max_records,
                    max_bytes,
                )
            })
            .await;
            Ok(())
        }
        Request::WatchTail {
            id,
            stream,
            partition,
        } => {
            if watches.0.len() >= cfg.max_watches_per_link || watches.0.contains_key(&id) {
                let reason = format!(
                    "watch id in use or more than {} watches",
                    cfg.max_watches_per_link
                );
                return send(error_frame(id, RemoteError::Refused { reason })).await;
            }
            let mut rx = match store.subscribe_tail(&stream, partition) {
                Ok(rx) => rx,
                Err(e) => return send(error_frame(id, RemoteError::from(&e))).await,
            };
            let next = *rx.borrow_and_update();
            send(response_frame(&Response::Watching { id, next })).await?;
            let tx = tx.clone();
            let task = tokio::spawn(async move {
                // `watch` keeps only the latest value, and at most one Tail per watch waits for
                // the writer: bursts of appends coalesce, nothing queues without bound.
                while rx.changed().await.is_ok() {
                    let next = *rx.borrow_and_update();
                    if tx
                        .send(response_frame(&Response::Tail { watch: id, next }).into())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
            watches.0.insert(id, task.abort_handle());
            Ok(())
        }
        Request::Unwatch { watch } => {
            if let Some(h) = watches.0.remove(&watch) {
                h.abort();
            }
            Ok(())
        }
    }
}

/// Runs `call` (a store call that may block on the disk) on a blocking thread, at most
/// `max_inflight_per_link` per link (waiting for a slot stops reading the link), and queues
/// its answer to request `id`.
async fn store_call(
    inflight: &Arc<Semaphore>,
    store: &Arc<Store>,
    tx: &mpsc::Sender<Out>,
    id: u64,
    call: impl FnOnce(&Store) -> Out + Send + 'static,
) {
    let permit = inflight.clone().acquire_owned().await;
    let (store, tx) = (store.clone(), tx.clone());
    tokio::spawn(async move {
        let out = tokio::task::spawn_blocking(move || call(&store))
            .await
            .unwrap_or_else(|e| error_frame(id, unavailable(&e)).into());
        let _ = tx.send(out).await;
        drop(permit);
    });
}

fn unavailable(e: &tokio::task::JoinError) -> RemoteError {
    RemoteError::Unavailable {
        reason: format!("store task failed: {e}"),
    }
}

/// Runs one read on a blocking thread and encodes its answer: each record goes from the
/// store's read buffer straight into the batch frame (CRC verified by the store, one copy).
/// Answers a `ReadRaw`: a `Raw` frame of the segment bytes from `from` on when the store has
/// such a range, a verifying batch (as `Read`) when it has not.
#[allow(clippy::too_many_arguments)]
fn raw_blocking(
    store: &Store,
    id: u64,
    stream: &str,
    partition: u32,
    from: u64,
    hint: Option<(u64, u64)>,
    max_records: usize,
    max_bytes: usize,
) -> Out {
    match store.raw_read(stream, partition, from, hint, max_bytes, codec::MAX_RAW_LEN) {
        Ok(RawRead::Tail) => response_frame(&Response::ReadEmpty { id, next: from }).into(),
        Ok(RawRead::Range(range)) => {
            let mut prefix = Vec::with_capacity(codec::RAW_PREFIX);
            match codec::encode_raw_prefix(
                id,
                range.segment_base,
                range.pos,
                range.len,
                &mut prefix,
            ) {
                Ok(()) => Out::Raw { prefix, range },
                // The store bounds the range by MAX_RAW_LEN.
                Err(_) => {
                    read_frame_blocking(store, id, stream, partition, from, max_records, max_bytes)
                        .into()
                }
            }
        }
        Ok(RawRead::Unsuitable) => {
            read_frame_blocking(store, id, stream, partition, from, max_records, max_bytes).into()
        }
        Err(e) => error_frame(id, RemoteError::from(&e)).into(),
    }
}

fn read_frame_blocking(
    store: &Store,
    id: u64,
    stream: &str,
    partition: u32,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Vec<u8> {
    // A batch's encoded records are never larger than their stored frames (see
    // `codec::BatchWriter`), so one allocation of `max_bytes` holds any batch but one made of
    // a single larger record.
    let mut out = Vec::with_capacity(max_bytes.min(codec::MAX_FRAME_LEN) + 64);
    let mut w = codec::BatchWriter::begin(id, partition, &mut out);
    let mut bad = None;
    let r = store.read_with(stream, partition, from, max_records, max_bytes, |fr| {
        if bad.is_none()
            && let Err(e) = w.push(fr.offset, fr.timestamp_ms, fr.key, fr.payload)
        {
            bad = Some(e);
        }
    });
    let frame = match (r, bad) {
        (Ok(0), _) => {
            drop(w);
            return response_frame(&Response::ReadEmpty { id, next: from });
        }
        (Ok(_), None) => w.finish(),
        (Ok(_), Some(e)) => {
            drop(w);
            Err(e)
        }
        (Err(e), _) => {
            drop(w);
            return error_frame(id, RemoteError::from(&e));
        }
    };
    match frame {
        Ok(()) => {
            if out.capacity() > 4 * out.len() {
                // A small read (the tail): do not queue a mostly empty buffer.
                out.shrink_to_fit();
            }
            out
        }
        Err(e) => error_frame(
            id,
            RemoteError::Unavailable {
                reason: format!("batch does not fit the link: {e}"),
            },
        ),
    }
}
