//! [`Publisher`]: batches records per partition into `Produce` frames on a publish stream of the
//! hub connection, keeps a window of unacknowledged bytes, and resolves one [`SendFuture`] per
//! record with its offset when the hub acknowledges the batch (PROTOCOL.md §5.2).
//!
//! ```text
//!  send(key, payload) ──window permit──▶ task: per-partition batch ──linger / full──▶ Produce{seq}
//!        │ SendFuture                        inflight (seq order) ◀── ProduceAck{seq, base_offset}
//!        └──────────── RecordAck{partition, offset = base_offset + i} ◀──┘   (permits released)
//! ```
//!
//! The task is a driver: batching, linger, seq numbering, the producer id, ack matching and
//! re-sending live in the I/O-free [`sibyl_proto::PublishMachine`]; the task moves records
//! and frames in and out of it and owns the window and the futures.
//!
//! **Delivery guarantee: exactly-once** (idempotent publishing, the default; PROTOCOL.md §5.2).
//! The first publish stream asks the hub for a producer id; every batch gets the next `seq` of
//! one counter, once. When the hub connection or the publish stream is lost, the publisher
//! opens a new stream (on a fresh hub connection if needed) presenting the same producer id
//! and token, and re-sends every batch that was not acknowledged, in the same order, **with
//! its original `seq`**: a batch whose `ProduceAck` was lost in transit was already appended,
//! and the hub acknowledges it with its original offsets instead of appending it again (also
//! across hub restarts). At most `PublishAccepted.max_in_flight` batches are unacknowledged at
//! once, so the hub still remembers every batch a re-send can name.
//!
//! With [`PublisherConfig::idempotent`]`(false)`, or against a hub that issues no producer id,
//! delivery is **at-least-once**: a re-sent batch whose ack was lost is appended again (at new
//! offsets; the record's future resolves with the offsets of the copy that was acknowledged).
//! Either way, without a loss each record is appended exactly once, in `send` order per
//! partition.
//!
//! A record failed with [`PublishError::Connect`] (the stream could not be re-opened within
//! `reconnect_timeout`) or with `INTERNAL` may nevertheless have been appended: its outcome is
//! unknown. Every other failure means it was not appended.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use sibyl_proto::frame::{NewRecordRef, Produce, ProduceAck, PublishAccepted, PublishOpen};
use sibyl_proto::publish::PRODUCE_HEADER;
use sibyl_proto::{Backoff, Codec, Frame, Retry};
use sibyl_proto::{PublishConfig, PublishMachine, PublishViolation};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{ConfigError, ConnectError, ProtocolError, PublishError};
use crate::inner::Inner;
use crate::wire::{FrameReader, write_frame};

/// How [`Publisher::send`] picks a partition (explicit partitions: [`Publisher::send_to`]).
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Partitioner {
    /// `crc32c(key) % partitions` (CRC-32C, Castagnoli, as computed by the `crc32c` crate);
    /// records with an empty key go round-robin. The default.
    #[default]
    KeyHash,
    /// Round-robin over all partitions, whatever the key.
    RoundRobin,
    /// A caller function of `(key, partitions)`; its result is taken modulo `partitions`.
    Custom(PartitionFn),
}

/// A custom partitioning function: `(key, partitions) -> partition`.
pub type PartitionFn = Arc<dyn Fn(&[u8], u32) -> u32 + Send + Sync>;

impl fmt::Debug for Partitioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::KeyHash => f.write_str("KeyHash"),
            Self::RoundRobin => f.write_str("RoundRobin"),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Largest window accepted (the window is counted in `u32` semaphore permits).
const MAX_WINDOW: usize = 1 << 30;
/// Largest `Produce` body protocol v1 allows by default (`max_batch_body`).
const MAX_BATCH_BODY: usize = 1_572_880;
/// Protocol v1 `max_batch_records`.
const MAX_BATCH_RECORDS: u32 = 16_384;
/// Waits between failed re-opens of the publish stream: full jitter up to 100 ms, doubling
/// to 1.6 s.
const REOPEN_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_millis(1600));

/// Tunables of a [`Publisher`]. `Default`: linger 1 ms, max batch 256 KiB, max batch records
/// 16 384, window 8 MiB, [`Partitioner::KeyHash`], reconnect timeout 30 s, open timeout 10 s,
/// idempotent.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    idempotent: bool,
    linger: Duration,
    max_batch_bytes: usize,
    max_batch_records: u32,
    max_inflight_bytes: usize,
    partitioner: Partitioner,
    reconnect_timeout: Duration,
    open_timeout: Duration,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            idempotent: true,
            linger: Duration::from_millis(1),
            max_batch_bytes: 256 * 1024,
            max_batch_records: MAX_BATCH_RECORDS,
            max_inflight_bytes: 8 * 1024 * 1024,
            partitioner: Partitioner::KeyHash,
            reconnect_timeout: Duration::from_secs(30),
            open_timeout: Duration::from_secs(10),
        }
    }
}

impl PublisherConfig {
    /// Idempotent publishing (exactly-once across reconnects; see the [module
    /// documentation](self)). Default: `true`. `false` opens at-least-once streams.
    pub fn idempotent(mut self, on: bool) -> Self {
        self.idempotent = on;
        self
    }

    /// How long a partition's batch may wait for more records before it is sent (0: send as
    /// soon as the publisher task runs; records arriving together still share a batch).
    /// At most 10 s.
    pub fn linger(mut self, linger: Duration) -> Result<Self, ConfigError> {
        if linger > Duration::from_secs(10) {
            return Err(range("linger", "at most 10 s"));
        }
        self.linger = linger;
        Ok(self)
    }

    /// Largest `Produce` body in bytes (also capped by the hub's `PublishAccepted.max_frame`);
    /// a single record larger than this is refused with [`PublishError::RecordTooLarge`].
    /// 64 ..= 1 572 880.
    pub fn max_batch_bytes(mut self, bytes: usize) -> Result<Self, ConfigError> {
        if !(64..=MAX_BATCH_BODY).contains(&bytes) {
            return Err(range("max_batch_bytes", "64 ..= 1572880"));
        }
        self.max_batch_bytes = bytes;
        Ok(self)
    }

    /// Most records in one batch, 1 ..= 16 384.
    pub fn max_batch_records(mut self, records: u32) -> Result<Self, ConfigError> {
        if !(1..=MAX_BATCH_RECORDS).contains(&records) {
            return Err(range("max_batch_records", "1 ..= 16384"));
        }
        self.max_batch_records = records;
        Ok(self)
    }

    /// The window: most bytes of records sent or batched and not yet acknowledged; a `send`
    /// beyond it waits. A record counts its encoded size (at most the whole window, so one
    /// record always fits an empty window). 1 KiB ..= 1 GiB.
    pub fn max_inflight_bytes(mut self, bytes: usize) -> Result<Self, ConfigError> {
        if !(1024..=MAX_WINDOW).contains(&bytes) {
            return Err(range("max_inflight_bytes", "1 KiB ..= 1 GiB"));
        }
        self.max_inflight_bytes = bytes;
        Ok(self)
    }

    /// How [`Publisher::send`] picks partitions.
    pub fn partitioner(mut self, p: Partitioner) -> Self {
        self.partitioner = p;
        self
    }

    /// How long the publisher keeps trying to re-open its stream after losing it before it
    /// fails every pending record with [`PublishError::Connect`]. At least 100 ms.
    pub fn reconnect_timeout(mut self, t: Duration) -> Result<Self, ConfigError> {
        if t < Duration::from_millis(100) {
            return Err(range("reconnect_timeout", "at least 100 ms"));
        }
        self.reconnect_timeout = t;
        Ok(self)
    }

    /// How long to wait for `PublishAccepted`. At least 100 ms.
    pub fn open_timeout(mut self, t: Duration) -> Result<Self, ConfigError> {
        if t < Duration::from_millis(100) {
            return Err(range("open_timeout", "at least 100 ms"));
        }
        self.open_timeout = t;
        Ok(self)
    }
}

fn range(name: &'static str, detail: &'static str) -> ConfigError {
    ConfigError::OutOfRange { name, detail }
}

/// Where a record was appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordAck {
    /// Partition.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
}

/// Counters of a publisher (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublisherMetrics {
    /// Records admitted into the window.
    pub records_admitted: u64,
    /// Records acknowledged by the hub.
    pub records_acked: u64,
    /// Records the hub rejected (`ProduceError`) or that failed with the publisher.
    pub records_failed: u64,
    /// `Produce` frames written (including re-sends).
    pub batches_sent: u64,
    /// `Produce` frames re-sent on a new stream after a loss.
    pub batches_resent: u64,
    /// Publish streams re-opened after a loss.
    pub reconnects: u64,
    /// Window bytes in use now.
    pub inflight_bytes: u64,
}

#[derive(Debug, Default)]
struct Stats {
    admitted: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    resent: AtomicU64,
    reconnects: AtomicU64,
}

/// One record on its way.
#[derive(Debug)]
struct Item {
    partition: u32,
    key: Bytes,
    payload: Bytes,
    /// Encoded size in a `Produce` body.
    size: usize,
    /// Window permits held.
    permits: u32,
    ack: oneshot::Sender<Result<RecordAck, PublishError>>,
}

#[derive(Debug)]
enum Cmd {
    Record(Item),
    Flush(oneshot::Sender<Result<(), PublishError>>),
    Close(oneshot::Sender<Result<(), PublishError>>),
}

/// State shared by the [`Publisher`] handle and its [`SendFuture`]s (not by the task, so the
/// task sees its command channel close when they are all gone).
#[derive(Debug)]
struct Handle {
    tx: mpsc::UnboundedSender<Cmd>,
    window: Arc<Semaphore>,
    window_size: usize,
    partitions: Arc<AtomicU32>,
    max_record: usize,
    partitioner: Partitioner,
    round_robin: AtomicU32,
    fatal: Arc<Mutex<Option<PublishError>>>,
}

impl Handle {
    fn fatal(&self) -> PublishError {
        self.fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(PublishError::Closed)
    }
}

/// A publisher on one stream. Created by [`Client::publisher`](crate::Client::publisher).
///
/// `send` never waits for the hub: it admits the record into the window (or queues for room)
/// and returns a [`SendFuture`] that resolves with the record's offset once its batch is
/// acknowledged — i.e. once the stream's durability policy is met at the hub. Keep many sends
/// in flight to get batching (`futures::stream::…buffered(n)`, `join_all`, or drop the futures
/// and [`flush`](Self::flush)).
///
/// Dropping the publisher lets its task send what was admitted and then end; use
/// [`close`](Self::close) to wait for that.
#[derive(Debug)]
pub struct Publisher {
    handle: Arc<Handle>,
    stream: String,
    stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub(crate) async fn open(
        inner: Arc<Inner>,
        stream: String,
        config: PublisherConfig,
    ) -> Result<Self, PublishError> {
        let first = if config.idempotent {
            PublishOpen::idempotent(&stream, None)
        } else {
            PublishOpen::new(&stream)
        };
        let link = Link::open(&inner, first, None, config.open_timeout).await?;
        let window_size = config.max_inflight_bytes;
        let max_body = config
            .max_batch_bytes
            .min(link.accepted.max_frame as usize)
            .max(PRODUCE_HEADER + 1);
        let mut machine = PublishMachine::new(PublishConfig {
            linger: config.linger,
            max_body,
            max_records: config.max_batch_records as usize,
            idempotent: config.idempotent,
        });
        machine
            .handle_accepted(&link.accepted)
            .map_err(|v| PublishError::from(ProtocolError::Violation(v.to_string())))?;
        let partitions = Arc::new(AtomicU32::new(link.accepted.partitions));
        let window = Arc::new(Semaphore::new(window_size));
        let fatal = Arc::new(Mutex::new(None));
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            inner,
            stream: stream.clone(),
            config: config.clone(),
            rx,
            window: window.clone(),
            partitions: partitions.clone(),
            fatal: fatal.clone(),
            stats: stats.clone(),
            link: Some(link),
            stale: None,
            machine,
            admitted: 0,
            resolved: 0,
            flushers: Vec::new(),
        };
        let task = tokio::spawn(task.run());
        Ok(Self {
            handle: Arc::new(Handle {
                tx,
                window,
                window_size,
                partitions,
                max_record: max_body - PRODUCE_HEADER,
                partitioner: config.partitioner,
                round_robin: AtomicU32::new(0),
                fatal,
            }),
            stream,
            stats,
            task,
        })
    }

    /// The stream this publisher appends to.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The stream's partition count (from the latest `PublishAccepted`).
    pub fn partitions(&self) -> u32 {
        self.handle.partitions.load(Ordering::Relaxed)
    }

    /// Sends a record to the partition the [`Partitioner`] picks. See [`SendFuture`].
    pub fn send(&self, key: impl Into<Bytes>, payload: impl Into<Bytes>) -> SendFuture {
        let key = key.into();
        let n = self.partitions().max(1);
        let rr = || self.handle.round_robin.fetch_add(1, Ordering::Relaxed) % n;
        let partition = match &self.handle.partitioner {
            Partitioner::KeyHash if key.is_empty() => rr(),
            Partitioner::KeyHash => crc32c::crc32c(&key) % n,
            Partitioner::RoundRobin => rr(),
            Partitioner::Custom(f) => f(&key, n) % n,
        };
        self.send_to(partition, key, payload)
    }

    /// Sends a record to `partition`.
    ///
    /// The record is admitted into the window at once when there is room and no earlier send
    /// is waiting; otherwise when the returned future is first polled and room frees up
    /// (first come, first served). Records are sent in admission order. Dropping the future
    /// after admission does not cancel the record (only its acknowledgement is lost);
    /// dropping it before admission withdraws it.
    pub fn send_to(
        &self,
        partition: u32,
        key: impl Into<Bytes>,
        payload: impl Into<Bytes>,
    ) -> SendFuture {
        let (key, payload) = (key.into(), payload.into());
        let partitions = self.partitions();
        if partition >= partitions {
            return SendFuture::failed(PublishError::BadPartition {
                partition,
                partitions,
            });
        }
        let size = record_size(key.len(), payload.len());
        if size > self.handle.max_record {
            return SendFuture::failed(PublishError::RecordTooLarge {
                size,
                max: self.handle.max_record,
            });
        }
        // Invariant: window_size ≤ MAX_WINDOW < u32::MAX.
        let permits = u32::try_from(size.min(self.handle.window_size)).unwrap_or(u32::MAX);
        let (ack, rx) = oneshot::channel();
        let item = Item {
            partition,
            key,
            payload,
            size,
            permits,
            ack,
        };
        match self.handle.window.clone().try_acquire_many_owned(permits) {
            Ok(p) => SendFuture::admit(&self.handle, item, p, rx),
            Err(TryAcquireError::Closed) => SendFuture::failed(self.handle.fatal()),
            Err(TryAcquireError::NoPermits) => {
                let acquire = Box::pin(self.handle.window.clone().acquire_many_owned(permits));
                SendFuture {
                    state: SendState::Waiting {
                        handle: self.handle.clone(),
                        item: Some(item),
                        acquire,
                        rx: Some(rx),
                    },
                }
            }
        }
    }

    /// Sends every admitted record now (without waiting for the linger) and waits until all
    /// records admitted before this call are resolved (acknowledged or failed; each one's
    /// outcome is on its own future). `Err` only when the publisher itself failed.
    pub async fn flush(&self) -> Result<(), PublishError> {
        let (tx, rx) = oneshot::channel();
        self.handle
            .tx
            .send(Cmd::Flush(tx))
            .map_err(|_| self.handle.fatal())?;
        rx.await.unwrap_or_else(|_| Err(self.handle.fatal()))
    }

    /// Flushes, finishes the publish stream and ends the publisher's task.
    pub async fn close(self) -> Result<(), PublishError> {
        let (tx, rx) = oneshot::channel();
        if self.handle.tx.send(Cmd::Close(tx)).is_err() {
            return Err(self.handle.fatal());
        }
        let r = rx.await.unwrap_or_else(|_| Err(self.handle.fatal()));
        // The task ends right after answering; a JoinError (panic) changes nothing here.
        let _ = self.task.await;
        r
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> PublisherMetrics {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.stats;
        PublisherMetrics {
            records_admitted: l(&s.admitted),
            records_acked: l(&s.acked),
            records_failed: l(&s.failed),
            batches_sent: l(&s.batches),
            batches_resent: l(&s.resent),
            reconnects: l(&s.reconnects),
            inflight_bytes: self
                .handle
                .window_size
                .saturating_sub(self.handle.window.available_permits())
                as u64,
        }
    }
}

/// Encoded size of a record in a `Produce` body: timestamp, two varint lengths, the bytes.
fn record_size(key: usize, payload: usize) -> usize {
    8 + varint_len(key) + key + varint_len(payload) + payload
}

fn varint_len(v: usize) -> usize {
    match v {
        0..=63 => 1,
        64..=16_383 => 2,
        16_384..=1_073_741_823 => 4,
        _ => 8,
    }
}

/// The outcome of one [`Publisher::send`]: resolves with the record's [`RecordAck`] once its
/// batch is acknowledged, or with the error that failed it. While the window is full it is
/// also where the caller waits for room (backpressure).
#[must_use = "a SendFuture waiting for window room sends nothing until polled"]
pub struct SendFuture {
    state: SendState,
}

type Acquire = Pin<
    Box<dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send + Sync>,
>;

enum SendState {
    Failed(Option<PublishError>),
    Waiting {
        handle: Arc<Handle>,
        item: Option<Item>,
        acquire: Acquire,
        rx: Option<oneshot::Receiver<Result<RecordAck, PublishError>>>,
    },
    Admitted {
        handle: Arc<Handle>,
        rx: oneshot::Receiver<Result<RecordAck, PublishError>>,
    },
}

impl fmt::Debug for SendFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match &self.state {
            SendState::Failed(_) => "failed",
            SendState::Waiting { .. } => "waiting for window",
            SendState::Admitted { .. } => "admitted",
        };
        f.debug_struct("SendFuture").field("state", &s).finish()
    }
}

impl SendFuture {
    fn failed(e: PublishError) -> Self {
        Self {
            state: SendState::Failed(Some(e)),
        }
    }

    fn admit(
        handle: &Arc<Handle>,
        item: Item,
        permit: OwnedSemaphorePermit,
        rx: oneshot::Receiver<Result<RecordAck, PublishError>>,
    ) -> Self {
        // The task gives the permits back when the record is resolved.
        permit.forget();
        let permits = item.permits;
        if let Err(mpsc::error::SendError(Cmd::Record(_))) = handle.tx.send(Cmd::Record(item)) {
            handle.window.add_permits(permits as usize);
            return Self::failed(handle.fatal());
        }
        Self {
            state: SendState::Admitted {
                handle: handle.clone(),
                rx,
            },
        }
    }

    /// True once the record is in the window (sent or batched).
    pub fn is_admitted(&self) -> bool {
        matches!(self.state, SendState::Admitted { .. })
    }
}

impl Future for SendFuture {
    type Output = Result<RecordAck, PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.poll_admission(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        match &mut self.state {
            SendState::Admitted { handle, rx } => match Pin::new(rx).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(r)) => Poll::Ready(r),
                Poll::Ready(Err(_)) => Poll::Ready(Err(handle.fatal())),
            },
            // `poll_admission` is `Ready(Ok)` only in the admitted state.
            _ => Poll::Ready(Err(PublishError::Closed)),
        }
    }
}

impl SendFuture {
    /// Waits for admission into the window only (the backpressure), not for the
    /// acknowledgement, and gives the future back, admitted: it resolves with the record's
    /// [`RecordAck`]. Awaiting `publisher.send(..).admitted()` in a loop pipelines records
    /// in call order (each one is admitted before the next `send`), so one round trip is not
    /// paid per record; keep the returned futures (or call [`Publisher::flush`]) to learn
    /// each record's outcome.
    ///
    /// ```no_run
    /// # async fn f(publisher: sibyl_sdk::Publisher) -> Result<(), sibyl_sdk::PublishError> {
    /// let mut acks = Vec::new();
    /// for i in 0..1000u32 {
    ///     acks.push(publisher.send(Vec::new(), i.to_be_bytes().to_vec()).admitted().await?);
    /// }
    /// for ack in acks {
    ///     let ack = ack.await?;
    ///     println!("partition {} offset {}", ack.partition, ack.offset);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn admitted(mut self) -> Result<Self, PublishError> {
        std::future::poll_fn(|cx| self.poll_admission(cx)).await?;
        Ok(self)
    }

    /// Drives the window wait: `Ready(Ok)` once admitted, `Ready(Err)` if the record failed
    /// before (too large, bad partition, publisher failed).
    fn poll_admission(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PublishError>> {
        loop {
            match &mut self.state {
                SendState::Failed(e) => {
                    return Poll::Ready(Err(e.take().unwrap_or(PublishError::Closed)));
                }
                SendState::Admitted { .. } => return Poll::Ready(Ok(())),
                SendState::Waiting {
                    handle,
                    item,
                    acquire,
                    rx,
                } => {
                    let permit = match acquire.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(p)) => p,
                        Poll::Ready(Err(_)) => {
                            let e = handle.fatal();
                            self.state = SendState::Failed(Some(e));
                            continue;
                        }
                    };
                    let (Some(item), Some(rx)) = (item.take(), rx.take()) else {
                        self.state = SendState::Failed(None);
                        continue;
                    };
                    let handle = handle.clone();
                    self.state = SendFuture::admit(&handle, item, permit, rx).state;
                }
            }
        }
    }
}

/// An open publish stream.
struct Link {
    conn_id: usize,
    send: quinn::SendStream,
    frames: mpsc::UnboundedReceiver<Result<Option<Frame>, ConnectError>>,
    reader: tokio::task::AbortHandle,
    accepted: PublishAccepted,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Why opening a link failed: retry later, or give up now.
enum OpenError {
    Retry(ConnectError),
    Fatal(PublishError),
}

impl From<OpenError> for PublishError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Retry(c) => PublishError::Connect(c),
            OpenError::Fatal(p) => p,
        }
    }
}

impl Link {
    /// Opens a publish stream with `open` on the latest hub connection (a fresh one if
    /// `stale` is it).
    async fn open(
        inner: &Inner,
        open: PublishOpen,
        stale: Option<usize>,
        timeout: Duration,
    ) -> Result<Self, OpenError> {
        let conn = inner
            .hub_connection(stale)
            .await
            .map_err(|e| match e.retryable() {
                true => OpenError::Retry(e),
                false => OpenError::Fatal(PublishError::Connect(e)),
            })?;
        let opened = async {
            let (mut send, recv) = conn
                .open_bi()
                .await
                .map_err(ConnectError::from_connection)?;
            write_frame(&mut send, open).await?;
            let mut reader = FrameReader::new(recv);
            let first = reader.next().await?;
            Ok::<_, ConnectError>((send, reader, first))
        };
        let (send, mut reader, first) = tokio::time::timeout(timeout, opened)
            .await
            .unwrap_or(Err(ConnectError::Timeout))
            .map_err(OpenError::Retry)?;
        let accepted = match first {
            Some(Frame::PublishAccepted(a)) => a,
            Some(Frame::ProduceError(e)) => {
                let err = PublishError::Rejected {
                    code: e.code,
                    reason: e.reason,
                };
                return Err(if e.code.retry() == Retry::Never {
                    OpenError::Fatal(err)
                } else {
                    OpenError::Retry(ConnectError::Closed {
                        code: e.code,
                        reason: "PublishOpen refused".into(),
                    })
                });
            }
            Some(other) => {
                return Err(OpenError::Fatal(
                    ProtocolError::Unexpected {
                        expected: "PublishAccepted or ProduceError",
                        got: other.frame_type(),
                    }
                    .into(),
                ));
            }
            None => {
                return Err(OpenError::Retry(
                    ProtocolError::StreamEnded {
                        expected: "PublishAccepted",
                    }
                    .into(),
                ));
            }
        };
        let (tx, frames) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let f = reader.next().await;
                let end = !matches!(f, Ok(Some(_)));
                if tx.send(f).is_err() || end {
                    return;
                }
            }
        })
        .abort_handle();
        Ok(Self {
            conn_id: conn.stable_id(),
            send,
            frames,
            reader,
            accepted,
        })
    }
}

struct Task {
    inner: Arc<Inner>,
    stream: String,
    config: PublisherConfig,
    rx: mpsc::UnboundedReceiver<Cmd>,
    window: Arc<Semaphore>,
    partitions: Arc<AtomicU32>,
    fatal: Arc<Mutex<Option<PublishError>>>,
    stats: Arc<Stats>,
    link: Option<Link>,
    /// `stable_id` of the hub connection of the lost link (ask for a fresh one instead).
    stale: Option<usize>,
    /// Batching, seqs, the producer id, ack matching and re-sends (I/O-free).
    machine: PublishMachine<Item>,
    /// Records admitted / resolved so far (flush waits for `resolved` to reach a mark).
    admitted: u64,
    resolved: u64,
    flushers: Vec<(u64, oneshot::Sender<Result<(), PublishError>>)>,
}

/// What the loop woke up for.
enum Wake {
    Cmd(Option<Cmd>),
    Frame(Option<Result<Option<Frame>, ConnectError>>),
    Linger,
}

impl Task {
    async fn run(mut self) {
        let mut closing: Option<oneshot::Sender<Result<(), PublishError>>> = None;
        let mut input_open = true;
        loop {
            if self.link.is_none()
                && let Err(e) = self.reconnect().await
            {
                self.fail_all(e);
                break;
            }
            if let Err(e) = self.write_sealed().await {
                self.lost(e);
                continue;
            }
            self.answer_flushers();
            if (closing.is_some() || !input_open) && self.idle() {
                break;
            }
            let deadline = self.machine.poll_timeout().map(Instant::from_std);
            let Some(link) = self.link.as_mut() else {
                continue;
            };
            let wake = tokio::select! {
                cmd = self.rx.recv(), if input_open => Wake::Cmd(cmd),
                f = link.frames.recv() => Wake::Frame(f),
                () = sleep_until(deadline), if deadline.is_some() => Wake::Linger,
            };
            match wake {
                Wake::Cmd(None) => {
                    input_open = false;
                    self.machine.seal_all();
                }
                Wake::Cmd(Some(cmd)) => {
                    // One clock read per wake, not per record: records taken in one go
                    // arrived together (a batch's linger starts at most this drain earlier).
                    let now = Instant::now().into_std();
                    self.on_cmd(cmd, now, &mut closing);
                    // Take whatever else is already queued, so it shares batches.
                    for _ in 0..4096 {
                        match self.rx.try_recv() {
                            Ok(cmd) => self.on_cmd(cmd, now, &mut closing),
                            Err(_) => break,
                        }
                    }
                    if self.config.linger.is_zero() {
                        self.machine.seal_all();
                    }
                }
                Wake::Frame(Some(Ok(Some(frame)))) => {
                    if let Err(e) = self.on_frame(frame) {
                        self.fail_all(e.into());
                        break;
                    }
                }
                Wake::Frame(Some(Ok(None))) | Wake::Frame(None) => {
                    self.lost(
                        ProtocolError::StreamEnded {
                            expected: "ProduceAck",
                        }
                        .into(),
                    );
                }
                Wake::Frame(Some(Err(e))) => {
                    if let ConnectError::Protocol(p) = e {
                        self.fail_all(p.into());
                        break;
                    }
                    self.lost(e);
                }
                Wake::Linger => self.machine.handle_timeout(Instant::now().into_std()),
            }
        }
        if let Some(mut link) = self.link.take() {
            let _ = link.send.finish();
        }
        self.answer_flushers();
        if let Some(c) = closing {
            let r = match self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                Some(e) => Err(e),
                None => Ok(()),
            };
            let _ = c.send(r);
        }
    }

    fn idle(&self) -> bool {
        self.machine.is_idle()
    }

    fn on_cmd(
        &mut self,
        cmd: Cmd,
        now: std::time::Instant,
        closing: &mut Option<oneshot::Sender<Result<(), PublishError>>>,
    ) {
        match cmd {
            Cmd::Record(item) => {
                self.admitted += 1;
                self.stats.admitted.fetch_add(1, Ordering::Relaxed);
                let (p, size) = (item.partition, item.size);
                self.machine.push(p, size, item, now);
            }
            Cmd::Flush(tx) => {
                self.machine.seal_all();
                self.flushers.push((self.admitted, tx));
            }
            Cmd::Close(tx) => {
                self.machine.seal_all();
                *closing = Some(tx);
            }
        }
    }

    /// Writes the sealed batches the machine releases (at most `max_in_flight`
    /// unacknowledged), as one write.
    async fn write_sealed(&mut self) -> Result<(), ConnectError> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        let mut buf = Vec::new();
        let mut n = 0u64;
        while let Some(t) = self.machine.poll_transmit() {
            let records = t.items.iter().map(|i| NewRecordRef {
                timestamp: 0,
                key: &i.key,
                payload: &i.payload,
            });
            // Invariant: batches hold ≥ 1 record and sizes were bounded at admission.
            match Produce::new(t.seq, t.partition, records) {
                Ok(p) => Frame::Produce(p).encode(&mut buf),
                Err(e) => tracing::error!(error = %e, "unbuildable batch"),
            }
            n += 1;
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.stats.batches.fetch_add(n, Ordering::Relaxed);
        // One chunk handed to quinn as is (`write_all` would copy it once more).
        link.send
            .write_chunk(Bytes::from(buf))
            .await
            .map_err(ConnectError::from_write)
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), ProtocolError> {
        let violation = |v: PublishViolation| ProtocolError::Violation(v.to_string());
        match frame {
            Frame::ProduceAck(ack) => {
                let items = self.machine.handle_ack(&ack).map_err(violation)?;
                self.on_acked(&ack, items);
                Ok(())
            }
            Frame::ProduceError(e) => {
                let items = self.machine.handle_error(&e).map_err(violation)?;
                let err = PublishError::Rejected {
                    code: e.code,
                    reason: e.reason,
                };
                for item in items {
                    self.resolve(item, Err(err.clone()));
                }
                Ok(())
            }
            other => Err(ProtocolError::Unexpected {
                expected: "ProduceAck or ProduceError",
                got: other.frame_type(),
            }),
        }
    }

    fn on_acked(&mut self, ack: &ProduceAck, items: Vec<Item>) {
        // One window release and one counter update per batch, not per record, both before
        // any future resolves (as `resolve` does).
        let permits: usize = items.iter().map(|i| i.permits as usize).sum();
        let n = items.len() as u64;
        self.stats.acked.fetch_add(n, Ordering::Relaxed);
        self.resolved += n;
        self.window.add_permits(permits);
        for (i, item) in items.into_iter().enumerate() {
            let offset = ack.base_offset.saturating_add(i as u64);
            let _ = item.ack.send(Ok(RecordAck {
                partition: ack.partition,
                offset,
            }));
        }
    }

    fn resolve(&mut self, item: Item, r: Result<RecordAck, PublishError>) {
        let counter = if r.is_ok() {
            &self.stats.acked
        } else {
            &self.stats.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.window.add_permits(item.permits as usize);
        self.resolved += 1;
        let _ = item.ack.send(r);
    }

    fn answer_flushers(&mut self) {
        let resolved = self.resolved;
        let dead = self.window.is_closed();
        let mut keep = Vec::new();
        for (mark, tx) in self.flushers.drain(..) {
            if dead {
                let e = self
                    .fatal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or(PublishError::Closed);
                let _ = tx.send(Err(e));
            } else if resolved >= mark {
                let _ = tx.send(Ok(()));
            } else {
                keep.push((mark, tx));
            }
        }
        self.flushers = keep;
    }

    /// The stream was lost: every written batch goes out again on the next stream, with its
    /// seq.
    fn lost(&mut self, e: ConnectError) {
        tracing::info!(stream = %self.stream, error = %e, "publish stream lost; re-opening");
        self.stale = self.link.take().map(|l| l.conn_id).or(self.stale);
        let resent = self.machine.handle_stream_lost();
        self.stats.resent.fetch_add(resent, Ordering::Relaxed);
    }

    /// Re-opens the stream with backoff until `reconnect_timeout` (continuing the producer);
    /// marks every unacknowledged batch for re-sending with its original seq.
    async fn reconnect(&mut self) -> Result<(), PublishError> {
        let give_up = Instant::now() + self.config.reconnect_timeout;
        let mut attempt = 0u32;
        loop {
            let open = Link::open(
                &self.inner,
                self.machine.open_frame(&self.stream),
                self.stale,
                self.config.open_timeout,
            );
            let r = tokio::time::timeout_at(give_up, open).await;
            match r {
                Ok(Ok(link)) => {
                    self.machine
                        .handle_accepted(&link.accepted)
                        .map_err(|v| ProtocolError::Violation(v.to_string()))?;
                    self.partitions
                        .store(link.accepted.partitions, Ordering::Relaxed);
                    self.link = Some(link);
                    self.stale = None;
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(Err(OpenError::Fatal(e))) => return Err(e),
                Ok(Err(OpenError::Retry(e))) => {
                    tracing::debug!(error = %e, "re-opening the publish stream failed");
                    // The connection used may be the broken one: ask for a fresh one next.
                    if Instant::now() >= give_up {
                        return Err(PublishError::Connect(e));
                    }
                    attempt += 1;
                    let wait = REOPEN_BACKOFF.full_jitter(attempt - 1, rand::random());
                    tokio::time::sleep(wait.min(give_up - Instant::now())).await;
                    if Instant::now() >= give_up {
                        return Err(PublishError::Connect(e));
                    }
                }
                Err(_) => return Err(PublishError::Connect(ConnectError::Timeout)),
            }
        }
    }

    /// The publisher cannot go on: fail every pending record and every later send.
    fn fail_all(&mut self, e: PublishError) {
        tracing::warn!(stream = %self.stream, error = %e, "publisher failed");
        *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
        self.window.close();
        for item in self.machine.drain() {
            self.resolve(item, Err(e.clone()));
        }
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Record(item) => self.resolve(item, Err(e.clone())),
                Cmd::Flush(tx) | Cmd::Close(tx) => {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_sizes_match_the_encoder() {
        for (k, p) in [(0, 0), (5, 63), (64, 70_000), (16_384, 3)] {
            let key = vec![1u8; k];
            let payload = vec![2u8; p];
            let prod = Produce::new(
                1,
                0,
                [NewRecordRef {
                    timestamp: 0,
                    key: &key,
                    payload: &payload,
                }],
            )
            .unwrap();
            assert_eq!(prod.body_len(), 16 + record_size(k, p), "{k} {p}");
        }
    }

    #[test]
    fn config_bounds() {
        let c = PublisherConfig::default();
        assert!(c.clone().max_batch_bytes(10).is_err());
        assert!(c.clone().max_inflight_bytes(MAX_WINDOW + 1).is_err());
        assert!(c.clone().max_batch_records(0).is_err());
        assert!(c.clone().linger(Duration::from_secs(11)).is_err());
        assert!(
            c.clone()
                .reconnect_timeout(Duration::from_millis(1))
                .is_err()
        );
        assert!(c.max_batch_records(16_384).is_ok());
    }
}
