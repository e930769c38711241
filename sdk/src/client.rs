//! [`Client`]: the connected client, its state watch and the supervisor task that reconnects.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures::Stream;
use sibyl_proto::frame::{Endpoint, Hello, PartitionOpen, SessionLimits, Ticket};
use sibyl_proto::{ErrorCode, Frame};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{ClientBuilder, HubAddress, Prepared, bind_endpoint};
use crate::driver::Driver;
use crate::error::{ConnectError, ProtocolError, PublishError, TransportError};
use crate::hub::{self, HubAnswer};
use crate::publisher::{Publisher, PublisherConfig};
use crate::shard::{SessionEnd, ShardSession};
use crate::subscription::SubscribeBuilder;
use crate::wire::{FrameReader, close_for};

/// The connection state, as published on [`Client::watch_state`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connecting for the first time (or again after [`Failed`](Self::Failed)).
    Connecting,
    /// A shard session is attached.
    Attached {
        /// The shard's endpoint, from the ticket.
        endpoint: Endpoint,
        /// The shard's session id.
        session_id: u64,
    },
    /// The shard session was lost (or a reconnect was requested); reconnecting.
    Reconnecting {
        /// The code the shard gave (`GoAway` or close), if any.
        cause: Option<ErrorCode>,
    },
    /// The machine gave up; [`Client::reconnect`] starts again.
    Failed {
        /// Why.
        error: ConnectError,
    },
    /// The client was closed.
    Closed,
}

/// What the client knows about the ticket of its session (never the token or the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TicketInfo {
    /// Negotiated protocol version.
    pub version: u32,
    /// The shard group the token is for.
    pub shard_group: u32,
    /// Token expiry, Unix seconds.
    pub expires_at: u64,
    /// The group's endpoints, priority order.
    pub endpoints: Vec<Endpoint>,
}

impl From<&Ticket> for TicketInfo {
    fn from(t: &Ticket) -> Self {
        Self {
            version: t.version,
            shard_group: t.shard_group,
            expires_at: t.expires_at,
            endpoints: t.endpoints.clone(),
        }
    }
}

/// The attached shard session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionInfo {
    /// The shard's endpoint.
    pub endpoint: Endpoint,
    /// The shard's session id.
    pub session_id: u64,
    /// The shard group.
    pub shard_group: u32,
    /// Limits the shard applies to this client's frames and streams.
    pub limits: SessionLimits,
    /// The shard's clock at attach, Unix ms.
    pub server_time: u64,
    /// The ticket the session was attached with.
    pub ticket: TicketInfo,
    /// The session was attached in the connection's first flight: `EarlyAttach` as 0-RTT
    /// data on a resumed TLS session with this shard (reconnects to a shard seen before).
    pub zero_rtt: bool,
}

enum Command {
    Reconnect(oneshot::Sender<Result<SessionInfo, ConnectError>>),
    Close,
}

/// Connections shared between the client and its supervisor task.
#[derive(Debug, Default)]
struct Shared {
    session: Option<SessionInfo>,
    /// The current shard connection (subscriptions open their streams on it).
    shard: Option<quinn::Connection>,
    /// The latest hub connection (publishers open their streams on it): the driver's (of the
    /// latest ticket) or one a publisher re-established.
    hub: Option<quinn::Connection>,
    /// `stable_id` of the driver's hub connection last taken into `hub`.
    driver_hub: Option<usize>,
}

/// What re-establishing a hub connection for publishing needs (a fresh `Hello` exchange).
#[derive(Debug)]
struct HubParams {
    quic: quinn::ClientConfig,
    addr: HubAddress,
    server_name: String,
    hello: Hello,
    timeout: Duration,
}

/// A partition uni stream whose `PartitionOpen` was read, routed to its subscription.
#[derive(Debug)]
pub(crate) struct PartitionStream {
    /// `stable_id` of the shard connection it arrived on.
    pub(crate) conn_id: usize,
    pub(crate) open: PartitionOpen,
    pub(crate) reader: FrameReader,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// The client's one QUIC endpoint (one UDP socket) for the hub and every shard.
    endpoint: quinn::Endpoint,
    client_id: String,
    shared: Mutex<Shared>,
    state: watch::Sender<ConnectionState>,
    hub_params: HubParams,
    /// Single flight for re-establishing the hub connection.
    hub_refresh: tokio::sync::Mutex<()>,
    /// Subscriptions by `sub_id`: where the dispatcher sends their partition streams.
    router: Mutex<HashMap<u32, mpsc::UnboundedSender<PartitionStream>>>,
    next_sub_id: AtomicU32,
}

impl Inner {
    fn shared(&self) -> MutexGuard<'_, Shared> {
        // A poisoned lock only means a panic elsewhere while holding it; the data (handles
        // and plain values) stays consistent, so keep going.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, s: ConnectionState) {
        self.state.send_replace(s);
    }

    fn router(&self) -> MutexGuard<'_, HashMap<u32, mpsc::UnboundedSender<PartitionStream>>> {
        // As for `shared`: a poisoned map of senders is still consistent.
        self.router.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    /// The attached session's shard connection and info, if attached.
    pub(crate) fn shard(&self) -> Option<(quinn::Connection, SessionInfo)> {
        let s = self.shared();
        Some((s.shard.clone()?, s.session.clone()?))
    }

    /// Registers a subscription: a new `sub_id` (unique for this client) and the receiver of
    /// its partition streams.
    pub(crate) fn register_subscription(&self) -> (u32, mpsc::UnboundedReceiver<PartitionStream>) {
        let id = self.next_sub_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.router().insert(id, tx);
        (id, rx)
    }

    pub(crate) fn unregister_subscription(&self, sub_id: u32) {
        self.router().remove(&sub_id);
    }

    /// A hub connection to open publish streams on: the latest one while it is open and is
    /// not `stale` (the `stable_id` of a connection the caller lost); otherwise a fresh one,
    /// by a new `Hello` → `Ticket` exchange (the ticket itself is not used: the shard session
    /// keeps its own). One refresh at a time.
    pub(crate) async fn hub_connection(
        &self,
        stale: Option<usize>,
    ) -> Result<quinn::Connection, ConnectError> {
        let _single = self.hub_refresh.lock().await;
        {
            let shared = self.shared();
            if let Some(c) = &shared.hub
                && c.close_reason().is_none()
                && Some(c.stable_id()) != stale
            {
                return Ok(c.clone());
            }
        }
        if matches!(*self.state.borrow(), ConnectionState::Closed) {
            return Err(ConnectError::Shutdown);
        }
        let p = &self.hub_params;
        let exchange = async {
            let addr = p.addr.resolve().await?;
            let connecting = self
                .endpoint
                .connect_with(p.quic.clone(), addr, &p.server_name)
                .map_err(ConnectError::from_connect)?;
            hub::exchange(connecting, p.hello.clone(), None).await
        };
        let (conn, answer) = tokio::time::timeout(p.timeout, exchange)
            .await
            .unwrap_or(Err(ConnectError::Timeout))?;
        match answer {
            HubAnswer::Ticket(_) => {
                tracing::debug!("hub connection re-established for publishing");
                self.shared().hub = Some(conn.clone());
                Ok(conn)
            }
            HubAnswer::Refused(r) => {
                conn.close(ErrorCode::NoError.to_u32().into(), b"refused");
                Err(ConnectError::Refused {
                    code: r.code,
                    reason: r.reason,
                    retry_after: r.retry_after_ms.map(Duration::from_millis),
                })
            }
        }
    }
}

/// Accepts the shard's partition uni streams on `conn`, reads each `PartitionOpen` and routes
/// the stream to its subscription (unknown `sub_id`: stopped with `REVOKED`).
async fn dispatch(conn: quinn::Connection, inner: Weak<Inner>) {
    while let Ok(recv) = conn.accept_uni().await {
        let (conn, inner) = (conn.clone(), inner.clone());
        tokio::spawn(async move {
            let mut reader = FrameReader::new(recv);
            match reader.next().await {
                Ok(Some(Frame::PartitionOpen(open))) => {
                    let tx = inner
                        .upgrade()
                        .and_then(|i| i.router().get(&open.sub_id).cloned());
                    let stream = PartitionStream {
                        conn_id: conn.stable_id(),
                        open,
                        reader,
                    };
                    let unrouted = match tx {
                        Some(tx) => tx.send(stream).err().map(|e| e.0),
                        None => Some(stream),
                    };
                    if let Some(mut s) = unrouted {
                        s.reader.stop(ErrorCode::Revoked);
                    }
                }
                Ok(Some(other)) => {
                    let e = ConnectError::from(ProtocolError::Unexpected {
                        expected: "PartitionOpen",
                        got: other.frame_type(),
                    });
                    close_for(&conn, &e);
                }
                Ok(None) => {}
                Err(e) => close_for(&conn, &e),
            }
        });
    }
}

/// A Sibyl client: attached to a shard of the group the hub chose, reconnecting on its own.
///
/// Created by [`Client::builder`] … [`ClientBuilder::connect`]. When the shard connection
/// closes or the shard sends `GoAway`, a background task re-runs the connection machine:
/// the cached ticket first (the lost endpoint last), then the hub. Dropping the client closes
/// its connections.
#[derive(Debug)]
pub struct Client {
    inner: Arc<Inner>,
    commands: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// A builder; see [`ClientBuilder`] for what is required.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects with `p`, on `endpoint` when [`ClientBuilder::build`] bound it already.
    pub(crate) async fn connect_prepared(
        p: Prepared,
        endpoint: Option<quinn::Endpoint>,
    ) -> Result<Self, ConnectError> {
        let deadline = p.connect_timeout.map(|t| Instant::now() + t);
        let endpoint = match endpoint {
            Some(e) => e,
            None => bind_endpoint(p.bind_for(p.hub.resolve().await?))?,
        };
        let client_id = p.hello.client_id.clone();
        let hub_params = HubParams {
            quic: p.quic.clone(),
            addr: p.hub.clone(),
            server_name: p.hub_server_name.clone(),
            hello: p.hello.clone(),
            timeout: p.machine.attach_timeout,
        };
        let mut driver = Driver::new(
            p.machine,
            endpoint.clone(),
            p.quic,
            p.shard_quic,
            p.hub,
            p.hub_server_name,
            p.hello,
        );
        let (state, _) = watch::channel(ConnectionState::Connecting);
        driver.start();
        let (session, ticket) = match driver.run(deadline).await {
            Ok(ok) => ok,
            Err(e) => {
                driver.abort_all();
                endpoint.close(ErrorCode::NoError.to_u32().into(), b"connect failed");
                return Err(e);
            }
        };
        let inner = Arc::new(Inner {
            endpoint,
            client_id,
            shared: Mutex::new(Shared::default()),
            state,
            hub_params,
            hub_refresh: tokio::sync::Mutex::new(()),
            router: Mutex::new(HashMap::new()),
            next_sub_id: AtomicU32::new(1),
        });
        publish(&inner, &driver, &session, ticket);
        let (commands, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(supervise(inner.clone(), driver, session, rx));
        Ok(Self {
            inner,
            commands,
            task,
        })
    }

    /// The client id sent to the hub and shards.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The local UDP address of the client's QUIC endpoint.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.endpoint.local_addr().ok()
    }

    /// Moves the client's QUIC endpoint to a new UDP socket on the same IP, port chosen by
    /// the OS, and returns the new local address. Open connections (hub and shard) migrate:
    /// the next packets leave from the new port, the servers validate the new path (QUIC
    /// connection migration) and streams, subscriptions and publishers carry on without a
    /// reconnect. Use it when the application knows its network path changed (or to test
    /// migration); a NAT rebinding the client does not know about is handled by QUIC alone.
    ///
    /// Fails ([`TransportError::Io`]) when the new socket cannot be bound or the endpoint
    /// refuses it; the endpoint then keeps its old socket.
    pub fn rebind(&self) -> Result<SocketAddr, TransportError> {
        let io = |what| {
            move |e: std::io::Error| TransportError::Io {
                what,
                source: Arc::new(e),
            }
        };
        let old = self
            .inner
            .endpoint
            .local_addr()
            .map_err(io("reading the client's UDP address"))?;
        let socket = std::net::UdpSocket::bind(SocketAddr::new(old.ip(), 0))
            .map_err(io("binding the new client UDP socket"))?;
        self.inner
            .endpoint
            .rebind(socket)
            .map_err(io("moving the QUIC endpoint to the new socket"))?;
        let new = self
            .inner
            .endpoint
            .local_addr()
            .map_err(io("reading the client's new UDP address"))?;
        tracing::info!(%old, %new, "client endpoint rebound");
        Ok(new)
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        self.inner.state.borrow().clone()
    }

    /// A watch of the connection state (latest value; every change wakes the receiver).
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.subscribe()
    }

    /// The connection states as a stream: the current one, then each change (intermediate
    /// states may be skipped when they change faster than they are read). Ends when the
    /// client is gone.
    pub fn state_changes(&self) -> impl Stream<Item = ConnectionState> + Send + 'static {
        let rx = self.watch_state();
        futures::stream::unfold((rx, true), |(mut rx, first)| async move {
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let s = rx.borrow_and_update().clone();
            Some((s, (rx, false)))
        })
    }

    /// The attached session, if attached.
    pub fn session(&self) -> Option<SessionInfo> {
        self.inner.shared().session.clone()
    }

    /// The current shard endpoint, if attached.
    pub fn shard_endpoint(&self) -> Option<Endpoint> {
        self.inner
            .shared()
            .session
            .as_ref()
            .map(|s| s.endpoint.clone())
    }

    /// The current session id, if attached.
    pub fn session_id(&self) -> Option<u64> {
        self.inner.shared().session.as_ref().map(|s| s.session_id)
    }

    /// The current shard group, if attached.
    pub fn shard_group(&self) -> Option<u32> {
        self.inner.shared().session.as_ref().map(|s| s.shard_group)
    }

    /// The ticket of the current session, if attached.
    pub fn ticket(&self) -> Option<TicketInfo> {
        self.inner
            .shared()
            .session
            .as_ref()
            .map(|s| s.ticket.clone())
    }

    /// Attaches a new shard session, at once (a requested reconnect is not a failure: no
    /// backoff): the cached ticket while it is valid beyond the expiry margin (no hub round
    /// trip), else the hub. Make before break: the current shard connection stays open (its
    /// partition streams keep delivering; repeats are dropped by offset) until the new
    /// session is attached, then closes; subscriptions resume on the new one. After
    /// [`ConnectionState::Failed`] this starts the machine again.
    pub async fn reconnect(&self) -> Result<SessionInfo, ConnectError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Reconnect(tx))
            .map_err(|_| ConnectError::Shutdown)?;
        rx.await.unwrap_or(Err(ConnectError::Shutdown))
    }

    /// Opens a [`Publisher`] on `stream` with [`PublisherConfig::default`]: a publish stream on
    /// the hub connection (`PublishOpen` → `PublishAccepted`). The API key needs publish
    /// scope and the stream should be in the builder's
    /// [`want_publish`](ClientBuilder::want_publish).
    pub async fn publisher(&self, stream: impl Into<String>) -> Result<Publisher, PublishError> {
        self.publisher_with(stream, PublisherConfig::default())
            .await
    }

    /// Opens a [`Publisher`] on `stream` with `config`.
    pub async fn publisher_with(
        &self,
        stream: impl Into<String>,
        config: PublisherConfig,
    ) -> Result<Publisher, PublishError> {
        Publisher::open(self.inner.clone(), stream.into(), config).await
    }

    /// Starts building a [`Subscription`](crate::Subscription) to `stream`; finish with
    /// [`SubscribeBuilder::open`].
    pub fn subscribe(&self, stream: impl Into<String>) -> SubscribeBuilder {
        SubscribeBuilder::new(self.inner.clone(), stream.into())
    }

    /// Closes the shard and hub connections and waits for the background task to end.
    pub async fn close(self) {
        let _ = self.commands.send(Command::Close);
        // The task ends after Close; a JoinError would mean it panicked, which changes
        // nothing for a client being closed.
        let _ = self.task.await;
        self.inner.endpoint.wait_idle().await;
    }
}

/// Records an attached session in the shared state and the watch.
fn publish(
    inner: &Arc<Inner>,
    driver: &Driver,
    s: &ShardSession,
    ticket: crate::client::TicketInfo,
) {
    let info = SessionInfo {
        endpoint: s.endpoint.clone(),
        session_id: s.attached.session_id,
        shard_group: ticket.shard_group,
        limits: s.attached.limits,
        server_time: s.attached.server_time,
        ticket,
        zero_rtt: s.zero_rtt,
    };
    {
        let mut shared = inner.shared();
        shared.session = Some(info.clone());
        shared.shard = Some(s.conn.clone());
        if let Some(h) = driver.hub_connection()
            && shared.driver_hub != Some(h.stable_id())
        {
            shared.driver_hub = Some(h.stable_id());
            shared.hub = Some(h.clone());
        }
    }
    tokio::spawn(dispatch(s.conn.clone(), Arc::downgrade(inner)));
    inner.set_state(ConnectionState::Attached {
        endpoint: info.endpoint,
        session_id: info.session_id,
    });
}

fn session_info(inner: &Inner) -> Option<SessionInfo> {
    inner.shared().session.clone()
}

enum Phase {
    Attached(Box<ShardSession>),
    Connecting,
    Failed,
}

/// The background task: watches the attached session and re-runs the machine when it ends.
/// Keeps `conn` open until the next session attaches (it becomes `draining`); a
/// connection kept so before is closed now.
fn keep_until_next(draining: &mut Option<quinn::Connection>, conn: &quinn::Connection) {
    if let Some(older) = draining.replace(conn.clone()) {
        older.close(ErrorCode::NoError.to_u32().into(), b"moved");
    }
}

async fn supervise(
    inner: Arc<Inner>,
    mut driver: Driver,
    session: ShardSession,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut waiters: Vec<oneshot::Sender<Result<SessionInfo, ConnectError>>> = Vec::new();
    // A draining shard's connection stays open until the next session attaches.
    let mut draining: Option<quinn::Connection> = None;
    let mut phase = Phase::Attached(Box::new(session));
    loop {
        phase = match phase {
            Phase::Attached(mut s) => {
                // `requested`: the application asked (no failure, so no backoff).
                let (cause, requested) = tokio::select! {
                    end = s.ended() => {
                        tracing::info!(endpoint = %s.endpoint.addr, ?end, "shard session ended");
                        let code = end.machine_code();
                        if matches!(end, SessionEnd::GoAway(_)) {
                            keep_until_next(&mut draining, &s.conn);
                        }
                        (code, false)
                    }
                    cmd = commands.recv() => match cmd {
                        Some(Command::Reconnect(reply)) => {
                            waiters.push(reply);
                            // Make before break: the old connection keeps serving (its
                            // streams, and the shard's view of this client) until the next
                            // session attaches, and its close is off the new attach's path.
                            keep_until_next(&mut draining, &s.conn);
                            (Some(ErrorCode::NoError), true)
                        }
                        Some(Command::Close) | None => break,
                    },
                };
                {
                    let mut shared = inner.shared();
                    shared.session = None;
                    shared.shard = None;
                }
                inner.set_state(ConnectionState::Reconnecting { cause });
                if requested {
                    driver.reconnect_requested();
                } else {
                    driver.disconnected(cause);
                }
                Phase::Connecting
            }
            Phase::Connecting => {
                tokio::select! {
                    r = driver.run(None) => match r {
                        Ok((s, ticket)) => {
                            if let Some(old) = draining.take() {
                                old.close(ErrorCode::NoError.to_u32().into(), b"moved");
                            }
                            publish(&inner, &driver, &s, ticket);
                            let info = session_info(&inner);
                            for w in waiters.drain(..) {
                                let _ = w.send(info.clone().ok_or(ConnectError::Shutdown));
                            }
                            Phase::Attached(Box::new(s))
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reconnect gave up");
                            if let Some(old) = draining.take() {
                                old.close(ErrorCode::NoError.to_u32().into(), b"gave up");
                            }
                            inner.set_state(ConnectionState::Failed { error: e.clone() });
                            for w in waiters.drain(..) {
                                let _ = w.send(Err(e.clone()));
                            }
                            Phase::Failed
                        }
                    },
                    cmd = commands.recv() => match cmd {
                        Some(Command::Reconnect(reply)) => {
                            waiters.push(reply);
                            Phase::Connecting
                        }
                        Some(Command::Close) | None => break,
                    },
                }
            }
            Phase::Failed => match commands.recv().await {
                Some(Command::Reconnect(reply)) => {
                    waiters.push(reply);
                    inner.set_state(ConnectionState::Connecting);
                    driver.start();
                    Phase::Connecting
                }
                Some(Command::Close) | None => break,
            },
        };
    }
    driver.abort_all();
    let (shard, hub) = {
        let mut shared = inner.shared();
        shared.session = None;
        (shared.shard.take(), shared.hub.take())
    };
    let bye = ErrorCode::NoError.to_u32().into();
    for conn in [shard, hub, draining].into_iter().flatten() {
        conn.close(bye, b"client closed");
    }
    if let Some(h) = driver.hub_connection() {
        h.close(bye, b"client closed");
    }
    inner.endpoint.close(bye, b"client closed");
    for w in waiters.drain(..) {
        let _ = w.send(Err(ConnectError::Shutdown));
    }
    inner.set_state(ConnectionState::Closed);
}
