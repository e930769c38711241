//! [`Subscription`]: a `futures::Stream` of [`Record`]s of one stream, in offset order per
//! partition, with no gap and no duplicate across reconnects, shard crashes and `GoAway`
//! (PROTOCOL.md §6.2, §6.3).
//!
//! ```text
//!  driver task ── control stream: Subscribe{start} ─▶ ◀─ Grant, Assignment, SubError
//!     │   │        Position, Fetch ◀── SubMachine::poll_transmit (I/O-free, sibyl-proto)
//!     │   └─ per PartitionOpen (routed by sub_id from the client's dispatcher):
//!     │        reader task: Records ─▶ byte permits (bounded buffer) ─▶ queue (if current)
//!     ▼
//!  Subscription::poll_next ◀── queue ── SubMachine::on_deliver (drop offsets < next)
//! ```
//!
//! Flow control: a reader takes byte permits (the subscription's `buffer_bytes`) before it
//! pushes a batch and the app gives them back by consuming; while none are free it stops
//! reading, so QUIC flow control stops the shard. A slow app never makes the SDK buffer more
//! than `buffer_bytes` plus one batch per partition stream.
//!
//! Resume: after any loss (connection, `GoAway`, control stream) the driver re-subscribes on the
//! next attached session with `start = Offsets{partition → next offset after the last record
//! handed to the app}` for every partition seen; replayed records are dropped by offset.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use sibyl_proto::forecast::{ForecastConfig, PartitionMetrics};
use sibyl_proto::frame::{Grant, Mode, Records, Start, Subscribe};
use sibyl_proto::{ErrorCode, Frame};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::error::{ConfigError, ConnectError, ProtocolError, SubscribeError};
use crate::inner::{ConnectionState, Inner, PartitionStream, SessionInfo};
use crate::wire::{FrameReader, close_for, write_frame};
use sibyl_proto::subscription::{Deliver, MachineConfig, Open, ReaderId, SubMachine, Transmit};

pub use sibyl_proto::subscription::SubscriptionMetrics;

/// A record delivered to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The stream it belongs to.
    pub stream: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
    /// Unix time in milliseconds (the publisher's, or the hub's when it stamped it).
    pub timestamp_ms: u64,
    /// Key (may be empty).
    pub key: Bytes,
    /// Payload.
    pub payload: Bytes,
}

/// Tunables of a [`Subscription`]. `Default`: buffer 4 MiB, position interval 200 ms
/// (reactive) / 50 ms (predictive), reactive fetch size 1 000 records topped up at half,
/// open timeout 10 s, and for predictive mode a forecaster with 250 ms buckets over a 15 s
/// window (otherwise [`ForecastConfig::default`]).
#[derive(Debug, Clone)]
pub struct SubscriptionConfig {
    buffer_bytes: usize,
    position_interval: Option<Duration>,
    fetch_records: u32,
    fetch_on_empty: bool,
    open_timeout: Duration,
    forecast: ForecastConfig,
}

/// The forecaster a predictive subscription uses unless configured: 250 ms buckets over a
/// 15 s window, so a rate change shows within a bucket (the pre-fetch depth follows it).
fn default_forecast() -> ForecastConfig {
    let mut f = ForecastConfig::default();
    f.bucket = Duration::from_millis(250);
    f.window = Duration::from_secs(15);
    f
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        Self {
            buffer_bytes: 4 * 1024 * 1024,
            position_interval: None,
            fetch_records: 1000,
            fetch_on_empty: false,
            open_timeout: Duration::from_secs(10),
            forecast: default_forecast(),
        }
    }
}

impl SubscriptionConfig {
    /// Bytes of received records (`Records` body size) held for the app across all
    /// partitions before the SDK stops reading partition streams. 64 KiB ..= 1 GiB.
    pub fn buffer_bytes(mut self, bytes: usize) -> Result<Self, ConfigError> {
        if !(64 * 1024..=1 << 30).contains(&bytes) {
            return Err(range("buffer_bytes", "64 KiB ..= 1 GiB"));
        }
        self.buffer_bytes = bytes;
        Ok(self)
    }

    /// Least time between two `Position` rounds (sent only for partitions whose position
    /// changed). 10 ms ..= 60 s. In predictive mode a round also goes out as soon as the app
    /// has taken a quarter of [`buffer_bytes`](Self::buffer_bytes) since the last one, or
    /// finds the buffer empty.
    pub fn position_interval(mut self, t: Duration) -> Result<Self, ConfigError> {
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&t) {
            return Err(range("position_interval", "10 ms ..= 60 s"));
        }
        self.position_interval = Some(t);
        Ok(self)
    }

    /// Reactive mode: fetch on demand (the Kafka-style baseline): only when the whole
    /// subscription buffer is empty and nothing is requested, `fetch_records` in total split
    /// over the assigned partitions, instead of topping each partition up at half. Default
    /// false.
    pub fn fetch_on_empty(mut self, on: bool) -> Self {
        self.fetch_on_empty = on;
        self
    }

    /// Predictive mode: the consumption forecaster (window, bucket, model, request interval,
    /// change threshold). Checked with [`ForecastConfig::validate`].
    pub fn forecast(mut self, forecast: ForecastConfig) -> Result<Self, ConfigError> {
        if forecast.validate().is_err() {
            return Err(range("forecast", "see ForecastConfig::validate"));
        }
        self.forecast = forecast;
        Ok(self)
    }

    /// Reactive mode: records kept buffered-or-requested per partition; a `Fetch` tops the
    /// partition up to this when it falls to half (within the grant). 1 ..= 16 384.
    pub fn fetch_records(mut self, n: u32) -> Result<Self, ConfigError> {
        if !(1..=16_384).contains(&n) {
            return Err(range("fetch_records", "1 ..= 16384"));
        }
        self.fetch_records = n;
        Ok(self)
    }

    /// How long [`SubscribeBuilder::open`] waits for the first `Assignment`. At least 100 ms.
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

/// Builds a subscription; from [`Client::subscribe`](crate::Client::subscribe). Defaults:
/// [`Start::Latest`], no group (all partitions), [`Mode::Predictive`],
/// [`SubscriptionConfig::default`].
#[derive(Debug)]
#[must_use = "call open() to subscribe"]
pub struct SubscribeBuilder {
    inner: Arc<Inner>,
    stream: String,
    start: Start,
    group: Option<String>,
    mode: Mode,
    config: SubscriptionConfig,
}

impl SubscribeBuilder {
    pub(crate) fn new(inner: Arc<Inner>, stream: String) -> Self {
        Self {
            inner,
            stream,
            start: Start::Latest,
            group: None,
            mode: Mode::Predictive,
            config: SubscriptionConfig::default(),
        }
    }

    /// Where to start on partitions this subscription has not consumed yet.
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// Joins a consumer group: its members split the partitions.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Push (`Predictive`, default) or pull (`Reactive`: the SDK sends `Fetch` as the app's
    /// buffer runs low, never beyond the grant).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Tunables.
    pub fn config(mut self, config: SubscriptionConfig) -> Self {
        self.config = config;
        self
    }

    /// Subscribes: waits for an attached session, sends `Subscribe` and waits for the first
    /// `Assignment` (or the `SubError` refusing it) within the config's `open_timeout`.
    pub async fn open(self) -> Result<Subscription, SubscribeError> {
        let cfg = self.config;
        let position_interval = cfg.position_interval.unwrap_or(match self.mode {
            Mode::Predictive => Duration::from_millis(50),
            _ => Duration::from_millis(200),
        });
        let (sub_id, streams) = self.inner.register_subscription();
        let stream: Arc<str> = self.stream.as_str().into();
        let shared = Arc::new(Shared {
            machine: Mutex::new(SubMachine::new(
                MachineConfig {
                    mode: self.mode,
                    position_interval,
                    fetch_records: cfg.fetch_records,
                    fetch_on_empty: cfg.fetch_on_empty,
                    forecast: cfg.forecast.clone(),
                    buffer_bytes: cfg.buffer_bytes as u64,
                },
                self.start.clone(),
            )),
            poke: Notify::new(),
            stream: stream.clone(),
            server_clock: Mutex::new(None),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let (opened_tx, opened_rx) = oneshot::channel();
        let (close_tx, close_rx) = watch::channel(false);
        let driver = Driver {
            inner: self.inner.clone(),
            shared: shared.clone(),
            sub_id,
            stream: self.stream,
            group: self.group,
            mode: self.mode,
            streams,
            tx,
            buffer: Arc::new(Semaphore::new(cfg.buffer_bytes)),
            buffer_max: u32::try_from(cfg.buffer_bytes).unwrap_or(u32::MAX),
            opened: Some(opened_tx),
            close: close_rx,
            readers: HashMap::new(),
        };
        let task = tokio::spawn(driver.run());
        let sub = Subscription {
            shared,
            inner: self.inner,
            sub_id,
            rx,
            current: None,
            done: false,
            close: close_tx,
            task: Some(task),
            waiting_since: None,
        };
        match tokio::time::timeout(cfg.open_timeout, opened_rx).await {
            Ok(Ok(Ok(()))) => Ok(sub),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(SubscribeError::Closed),
            Err(_) => Err(SubscribeError::Timeout),
        }
    }
}

/// State shared by the [`Subscription`], its driver task and its readers.
#[derive(Debug)]
struct Shared {
    machine: Mutex<SubMachine>,
    /// Wakes the driver (a position or a fetch may be due).
    poke: Notify,
    stream: Arc<str>,
    /// (shard clock at attach in Unix ms, local instant it was first seen): for grant leases.
    server_clock: Mutex<Option<(u64, Instant)>>,
}

impl Shared {
    fn machine(&self) -> MutexGuard<'_, SubMachine> {
        // A poisoned lock means a panic while holding it; the machine's fields are plain
        // counters and maps that each method leaves consistent, so keep going.
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A batch in the app's queue, holding its buffer permits until consumed.
#[derive(Debug)]
struct Delivery {
    records: VecDeque<Record>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug)]
enum Item {
    Batch(Delivery),
    Error(SubscribeError),
}

/// A subscription to one stream: a [`Stream`] of `Result<Record, SubscribeError>`.
///
/// Records come in offset order per partition (the interleaving across partitions is
/// unspecified), with no gap and no duplicate across reconnects: a gap can only be offsets
/// absent from the log. An `Err` item (the shard's `SubError`, a protocol violation, the
/// client closed) is the last one. Dropping the subscription ends it at the shard.
#[derive(Debug)]
pub struct Subscription {
    shared: Arc<Shared>,
    inner: Arc<Inner>,
    sub_id: u32,
    rx: mpsc::UnboundedReceiver<Item>,
    current: Option<Delivery>,
    done: bool,
    close: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// When the app started waiting on an empty buffer (app wait per record).
    waiting_since: Option<Instant>,
}

impl Subscription {
    /// The stream subscribed to.
    pub fn stream(&self) -> &str {
        &self.shared.stream
    }

    /// The `sub_id` used on the wire.
    pub fn sub_id(&self) -> u32 {
        self.sub_id
    }

    /// Counters: records delivered, duplicates dropped, reconnects, ….
    pub fn metrics(&self) -> SubscriptionMetrics {
        self.shared.machine().metrics()
    }

    /// Predictive mode: forecast quality per partition (predicted vs actual records/s, MASE,
    /// the forecaster's α); empty in reactive mode.
    pub fn forecast_metrics(&self) -> Vec<PartitionMetrics> {
        self.shared.machine().forecast_metrics()
    }

    /// The next offset the app will receive, per partition seen (what a resume starts from).
    pub fn positions(&self) -> BTreeMap<u32, u64> {
        self.shared.machine().positions()
    }

    /// The partitions of the latest `Assignment`.
    pub fn assigned_partitions(&self) -> Vec<u32> {
        self.shared.machine().assigned()
    }

    /// The latest `Assignment.epoch` on the current control stream.
    pub fn epoch(&self) -> Option<u64> {
        self.shared.machine().epoch()
    }

    /// The current grant (token-bucket lease), if one is held and unexpired.
    pub fn grant(&self) -> Option<Grant> {
        self.shared.machine().grant(Instant::now())
    }

    /// Ends the subscription at the shard (finishes the control stream) and waits for its
    /// task to end.
    pub async fn close(mut self) {
        self.close.send_replace(true);
        if let Some(t) = self.task.take() {
            // A JoinError (panic) changes nothing for a subscription being closed.
            let _ = t.await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.close.send_replace(true);
        self.inner.unregister_subscription(self.sub_id);
    }
}

impl Stream for Subscription {
    type Item = Result<Record, SubscribeError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(d) = &mut this.current {
                let Some(rec) = d.records.pop_front() else {
                    this.current = None;
                    continue;
                };
                let (verdict, poke) = {
                    let mut m = this.shared.machine();
                    let now = Instant::now();
                    let v = m.on_deliver(rec.partition, rec.offset, now);
                    if v == Deliver::Deliver {
                        let waited = this.waiting_since.take().map(|t| now - t);
                        let bytes = (rec.key.len() + rec.payload.len()) as u64;
                        m.took(rec.partition, bytes, waited, now);
                    }
                    (v, m.take_poke())
                };
                if d.records.is_empty() {
                    this.current = None;
                }
                if poke {
                    this.shared.poke.notify_one();
                }
                if verdict == Deliver::Duplicate {
                    continue;
                }
                return Poll::Ready(Some(Ok(rec)));
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(Item::Batch(d))) => this.current = Some(d),
                Poll::Ready(Some(Item::Error(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if this.waiting_since.is_none() {
                        let now = Instant::now();
                        this.waiting_since = Some(now);
                        let poke = {
                            let mut m = this.shared.machine();
                            m.on_starved(now);
                            m.take_poke()
                        };
                        if poke {
                            this.shared.poke.notify_one();
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// A running partition reader.
struct ReaderHandle {
    partition: u32,
    stop: oneshot::Sender<()>,
}

/// The subscription's driver task.
struct Driver {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    sub_id: u32,
    stream: String,
    group: Option<String>,
    mode: Mode,
    streams: mpsc::UnboundedReceiver<PartitionStream>,
    tx: mpsc::UnboundedSender<Item>,
    buffer: Arc<Semaphore>,
    buffer_max: u32,
    opened: Option<oneshot::Sender<Result<(), SubscribeError>>>,
    close: watch::Receiver<bool>,
    readers: HashMap<ReaderId, ReaderHandle>,
}

/// How one control stream ended.
enum End {
    /// Closed by the app or failed for good (the error, if any, was queued).
    Done,
    /// Re-subscribe on the next session (`Some`: not on this session id).
    Resubscribe(Option<u64>),
}

impl Driver {
    async fn run(mut self) {
        let mut state = self.inner.watch_state();
        let mut avoid: Option<u64> = None;
        loop {
            let Some((conn, session)) = self.wait_session(&mut state, avoid).await else {
                break;
            };
            match self.control(&mut state, conn, session).await {
                End::Done => break,
                End::Resubscribe(a) => {
                    avoid = a;
                    if a.is_none() {
                        // Same session, new control stream: do not spin on a shard that
                        // keeps resetting it.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        self.stop_all_readers();
        self.inner.unregister_subscription(self.sub_id);
    }

    /// Waits for an attached session other than `avoid` whose connection is open; `None`
    /// when the subscription or the client is closed.
    async fn wait_session(
        &mut self,
        state: &mut watch::Receiver<ConnectionState>,
        avoid: Option<u64>,
    ) -> Option<(quinn::Connection, SessionInfo)> {
        loop {
            if *self.close.borrow() {
                return None;
            }
            if let Some((c, s)) = self.inner.shard()
                && c.close_reason().is_none()
                && Some(s.session_id) != avoid
            {
                return Some((c, s));
            }
            if matches!(*state.borrow_and_update(), ConnectionState::Closed) {
                self.fail(SubscribeError::Closed);
                return None;
            }
            tokio::select! {
                r = state.changed() => if r.is_err() {
                    self.fail(SubscribeError::Closed);
                    return None;
                },
                _ = self.close.changed() => {}
            }
        }
    }

    /// Queues `e` as the subscription's last item (and answers `open` with it).
    fn fail(&mut self, e: SubscribeError) {
        if let Some(o) = self.opened.take() {
            let _ = o.send(Err(e));
        } else {
            let _ = self.tx.send(Item::Error(e));
        }
    }

    /// Runs one control stream on `conn` until it ends.
    async fn control(
        &mut self,
        state: &mut watch::Receiver<ConnectionState>,
        conn: quinn::Connection,
        session: SessionInfo,
    ) -> End {
        let lost = End::Resubscribe(Some(session.session_id));
        {
            let mut clock = self
                .shared
                .server_clock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if clock.is_none_or(|(t, _)| t != session.server_time) {
                *clock = Some((session.server_time, Instant::now()));
            }
        }
        let start = self.shared.machine().begin_generation();
        self.stop_all_readers();
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "opening the control stream failed");
                return lost;
            }
        };
        let subscribe = Subscribe {
            sub_id: self.sub_id,
            stream: self.stream.clone(),
            start: start.clone(),
            group: self.group.clone(),
            mode: self.mode,
        };
        tracing::debug!(sub_id = self.sub_id, ?start, "subscribe");
        if write_frame(&mut send, subscribe).await.is_err() {
            return lost;
        }
        // Predictive: the first `Forecast` (buffer capacity, current predictions) goes out
        // with `Subscribe`, so the shard plans the first batches with it.
        if self.transmit(&mut send).await.is_err() {
            return lost;
        }
        let (ftx, mut frames) = mpsc::unbounded_channel();
        let control_reader = tokio::spawn(async move {
            let mut reader = FrameReader::new(recv);
            loop {
                let f = reader.next().await;
                let end = !matches!(f, Ok(Some(_)));
                if ftx.send(f).is_err() || end {
                    return;
                }
            }
        })
        .abort_handle();
        let end = loop {
            let timer = self.shared.machine().poll_timeout(Instant::now());
            tokio::select! {
                _ = self.close.changed() => {
                    let _ = send.finish();
                    break End::Done;
                }
                f = frames.recv() => match f {
                    Some(Ok(Some(frame))) => {
                        if let Some(end) = self.on_control(&conn, frame) {
                            break end;
                        }
                    }
                    Some(Err(ConnectError::Protocol(p))) => {
                        close_for(&conn, &ConnectError::Protocol(p.clone()));
                        self.fail(SubscribeError::Protocol(p));
                        break End::Done;
                    }
                    Some(Err(e)) if conn.close_reason().is_none() => {
                        tracing::debug!(error = %e, "control stream reset; re-subscribing");
                        break End::Resubscribe(None);
                    }
                    _ => break lost,
                },
                ps = self.streams.recv() => match ps {
                    Some(ps) => self.on_partition_stream(&conn, ps),
                    None => break End::Done,
                },
                r = state.changed() => {
                    if r.is_err() {
                        self.fail(SubscribeError::Closed);
                        break End::Done;
                    }
                    let moved = match self.inner.shard() {
                        Some((_, s)) => s.session_id != session.session_id,
                        None => conn.close_reason().is_some(),
                    };
                    if moved {
                        // A new session (GoAway, reconnect): leave this one politely.
                        let _ = send.finish();
                        break lost;
                    }
                    if matches!(*state.borrow(), ConnectionState::Closed) {
                        self.fail(SubscribeError::Closed);
                        break End::Done;
                    }
                }
                () = self.shared.poke.notified() => {}
                () = sleep_until(timer), if timer.is_some() => {}
            }
            if self.transmit(&mut send).await.is_err() {
                break lost;
            }
        };
        control_reader.abort();
        end
    }

    /// Handles a control frame; `Some` ends the control stream.
    fn on_control(&mut self, conn: &quinn::Connection, frame: Frame) -> Option<End> {
        let now = Instant::now();
        match frame {
            Frame::Assignment(a) => {
                if a.sub_id != self.sub_id {
                    return Some(self.violation(
                        conn,
                        format!("Assignment for sub_id {} on {}", a.sub_id, self.sub_id),
                    ));
                }
                let r = self.shared.machine().handle_assignment(&a, now);
                match r {
                    Ok(stop) => {
                        for id in stop {
                            self.stop_reader(id);
                        }
                        if let Some(o) = self.opened.take() {
                            let _ = o.send(Ok(()));
                        }
                    }
                    Err(e) => return Some(self.violation(conn, e.to_string())),
                }
            }
            Frame::Grant(g) => {
                let server_now = self
                    .shared
                    .server_clock
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .map_or(0, |(t, at)| {
                        t.saturating_add(u64::try_from(at.elapsed().as_millis()).unwrap_or(0))
                    });
                self.shared.machine().handle_grant(g, now, server_now);
            }
            Frame::SubError(e) => {
                self.fail(SubscribeError::Rejected {
                    code: e.code,
                    reason: e.reason,
                });
                return Some(End::Done);
            }
            // Reserved for flip events: accepted and ignored in this version.
            Frame::FlipHint(_) | Frame::Flip(_) => {}
            other => {
                let e = ProtocolError::Unexpected {
                    expected: "Assignment, Grant, SubError, FlipHint or Flip",
                    got: other.frame_type(),
                };
                close_for(conn, &ConnectError::Protocol(e.clone()));
                self.fail(SubscribeError::Protocol(e));
                return Some(End::Done);
            }
        }
        None
    }

    fn violation(&mut self, conn: &quinn::Connection, what: String) -> End {
        let e = ProtocolError::Violation(what);
        close_for(conn, &ConnectError::Protocol(e.clone()));
        self.fail(SubscribeError::Protocol(e));
        End::Done
    }

    fn on_partition_stream(&mut self, conn: &quinn::Connection, mut ps: PartitionStream) {
        if ps.conn_id != conn.stable_id() {
            // From a connection this subscription left (e.g. a draining shard).
            ps.reader.stop(ErrorCode::Revoked);
            return;
        }
        let verdict = self.shared.machine().open_partition(&ps.open);
        match verdict {
            Open::Stale => ps.reader.stop(ErrorCode::Revoked),
            Open::Accept { id, replaces } => {
                if let Some(old) = replaces {
                    self.stop_reader(old);
                }
                let (stop, stopped) = oneshot::channel();
                let partition = ps.open.partition;
                self.readers.insert(id, ReaderHandle { partition, stop });
                tokio::spawn(read_partition(PartitionReader {
                    shared: self.shared.clone(),
                    id,
                    partition,
                    reader: ps.reader,
                    tx: self.tx.clone(),
                    buffer: self.buffer.clone(),
                    buffer_max: self.buffer_max,
                    stopped,
                }));
            }
        }
    }

    fn stop_reader(&mut self, id: ReaderId) {
        if let Some(h) = self.readers.remove(&id) {
            let _ = h.stop.send(());
            self.shared.machine().reader_ended(id, h.partition);
        }
    }

    fn stop_all_readers(&mut self) {
        let ids: Vec<ReaderId> = self.readers.keys().copied().collect();
        for id in ids {
            self.stop_reader(id);
        }
    }

    /// Sends what the machine wants on the control stream.
    async fn transmit(&mut self, send: &mut quinn::SendStream) -> Result<(), ConnectError> {
        // Forget readers that ended on their own.
        self.readers.retain(|_, h| !h.stop.is_closed());
        let out: Vec<Transmit> = {
            let mut m = self.shared.machine();
            let now = Instant::now();
            std::iter::from_fn(|| m.poll_transmit(now)).collect()
        };
        for t in out {
            match t {
                Transmit::Position(p) => write_frame(send, p).await?,
                Transmit::Fetch(f) => write_frame(send, f).await?,
                Transmit::Forecast(f) => write_frame(send, f).await?,
            }
        }
        Ok(())
    }
}

struct PartitionReader {
    shared: Arc<Shared>,
    id: ReaderId,
    partition: u32,
    reader: FrameReader,
    tx: mpsc::UnboundedSender<Item>,
    buffer: Arc<Semaphore>,
    buffer_max: u32,
    stopped: oneshot::Receiver<()>,
}

/// The records of `batch` as app [`Record`]s whose keys and payloads are slices of one
/// shared buffer (the batch's record section): no copy and no allocation per record.
fn share_records(stream: &Arc<str>, partition: u32, batch: Records) -> VecDeque<Record> {
    let base = batch.data().as_ptr() as usize;
    // Every key and payload borrows from `batch.data()`, so these offsets are in bounds.
    let span = |s: &[u8]| {
        let at = s.as_ptr() as usize - base;
        at..at + s.len()
    };
    let spans: Vec<_> = batch
        .iter()
        .map(|rec| (rec.offset, rec.timestamp, span(rec.key), span(rec.payload)))
        .collect();
    let data = batch.into_data();
    spans
        .into_iter()
        .map(|(offset, timestamp_ms, key, payload)| Record {
            stream: stream.clone(),
            partition,
            offset,
            timestamp_ms,
            key: data.slice(key),
            payload: data.slice(payload),
        })
        .collect()
}

/// Reads one partition stream into the app's queue, pausing while the buffer is full.
async fn read_partition(mut r: PartitionReader) {
    loop {
        let frame = tokio::select! {
            _ = &mut r.stopped => break,
            f = r.reader.next() => f,
        };
        let batch = match frame {
            Ok(Some(Frame::Records(b))) if b.partition() == r.partition => b,
            Ok(Some(other)) => {
                tracing::warn!(partition = r.partition, frame = ?other.frame_type(), "unexpected frame on a partition stream");
                r.reader.stop(ErrorCode::ProtocolViolation);
                break;
            }
            // Finished (revoked) or reset (REVOKED, or the connection is gone).
            Ok(None) | Err(_) => break,
        };
        let body_len = batch.body_len();
        let records = share_records(&r.shared.stream, r.partition, batch);
        let permits = u32::try_from(body_len)
            .unwrap_or(u32::MAX)
            .min(r.buffer_max);
        let permit = tokio::select! {
            _ = &mut r.stopped => break,
            p = r.buffer.clone().acquire_many_owned(permits) => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let n = records.len() as u64;
        let pushed = {
            let mut m = r.shared.machine();
            m.on_received(r.id, r.partition, n)
                && r.tx
                    .send(Item::Batch(Delivery {
                        records,
                        _permit: permit,
                    }))
                    .is_ok()
        };
        if !pushed {
            break;
        }
    }
    r.reader.stop(ErrorCode::Revoked);
    r.shared.machine().reader_ended(r.id, r.partition);
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
