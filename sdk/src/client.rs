//! [`Client`]: the connected client, its state watch and the supervisor task that reconnects.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use sibyl_proto::ErrorCode;
use sibyl_proto::frame::Endpoint;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{ClientBuilder, Connector, Prepared, bind_endpoint};
use crate::driver::Driver;
use crate::error::{ConnectError, PublishError, TransportError};
use crate::inner::{HubParams, Inner, dispatch};
use crate::publisher::{Publisher, PublisherConfig};
use crate::shard::{SessionEnd, ShardSession};
use crate::subscription::SubscribeBuilder;

pub use crate::inner::{ConnectionState, SessionInfo, TicketInfo};

enum Command {
    Reconnect(oneshot::Sender<Result<SessionInfo, ConnectError>>),
    Close,
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

impl ClientBuilder {
    /// Checks the configuration and connects: hub → ticket → shard, retrying as the
    /// connection machine decides until attached, given up, or `connect_timeout` (then
    /// [`ConnectError::Timeout`], or [`ConnectError::GiveUp`] carrying the last error seen).
    ///
    /// The same as [`build`](Self::build) then [`Connector::connect`].
    pub async fn connect(self) -> Result<Client, ConnectError> {
        self.build()?.connect().await
    }
}

impl Connector {
    /// Connects: hub → ticket → shard, as [`ClientBuilder::connect`] describes.
    pub async fn connect(self) -> Result<Client, ConnectError> {
        let (prepared, endpoint) = self.into_parts();
        Client::connect_prepared(prepared, endpoint).await
    }
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
        let inner = Arc::new(Inner::new(endpoint, client_id, state, hub_params));
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
fn publish(inner: &Arc<Inner>, driver: &Driver, s: &ShardSession, ticket: TicketInfo) {
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
