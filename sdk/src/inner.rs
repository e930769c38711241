//! The state a [`Client`](crate::Client) shares with its supervisor task, publishers and
//! subscriptions ([`Inner`]), and the session types it publishes. Kept apart from `client` so
//! that `driver`, `publisher` and `subscription` reach it without importing the client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::Duration;

use sibyl_proto::frame::{Endpoint, Hello, PartitionOpen, SessionLimits, Ticket};
use sibyl_proto::{ErrorCode, Frame};
use tokio::sync::{mpsc, watch};

use crate::config::HubAddress;
use crate::error::{ConnectError, ProtocolError};
use crate::hub::{self, HubAnswer};
use crate::wire::{FrameReader, close_for};

/// The connection state, as published on [`Client::watch_state`](crate::Client::watch_state).
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
    /// The machine gave up; [`Client::reconnect`](crate::Client::reconnect) starts again.
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

/// Connections shared between the client and its supervisor task.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) session: Option<SessionInfo>,
    /// The current shard connection (subscriptions open their streams on it).
    pub(crate) shard: Option<quinn::Connection>,
    /// The latest hub connection (publishers open their streams on it): the driver's (of the
    /// latest ticket) or one a publisher re-established.
    pub(crate) hub: Option<quinn::Connection>,
    /// `stable_id` of the driver's hub connection last taken into `hub`.
    pub(crate) driver_hub: Option<usize>,
}

/// What re-establishing a hub connection for publishing needs (a fresh `Hello` exchange).
#[derive(Debug)]
pub(crate) struct HubParams {
    pub(crate) quic: quinn::ClientConfig,
    pub(crate) addr: HubAddress,
    pub(crate) server_name: String,
    pub(crate) hello: Hello,
    pub(crate) timeout: Duration,
}

/// A partition uni stream whose `PartitionOpen` was read, routed to its subscription.
#[derive(Debug)]
pub(crate) struct PartitionStream {
    /// `stable_id` of the shard connection it arrived on.
    pub(crate) conn_id: usize,
    pub(crate) open: PartitionOpen,
    pub(crate) reader: FrameReader,
}

/// What the client, its supervisor task, publishers and subscriptions share.
#[derive(Debug)]
pub(crate) struct Inner {
    /// The client's one QUIC endpoint (one UDP socket) for the hub and every shard.
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) client_id: String,
    shared: Mutex<Shared>,
    pub(crate) state: watch::Sender<ConnectionState>,
    hub_params: HubParams,
    /// Single flight for re-establishing the hub connection.
    hub_refresh: tokio::sync::Mutex<()>,
    /// Subscriptions by `sub_id`: where the dispatcher sends their partition streams.
    router: Mutex<HashMap<u32, mpsc::UnboundedSender<PartitionStream>>>,
    next_sub_id: AtomicU32,
}

impl Inner {
    /// A client's shared state before its first session is published.
    pub(crate) fn new(
        endpoint: quinn::Endpoint,
        client_id: String,
        state: watch::Sender<ConnectionState>,
        hub_params: HubParams,
    ) -> Self {
        Self {
            endpoint,
            client_id,
            shared: Mutex::new(Shared::default()),
            state,
            hub_params,
            hub_refresh: tokio::sync::Mutex::new(()),
            router: Mutex::new(HashMap::new()),
            next_sub_id: AtomicU32::new(1),
        }
    }

    pub(crate) fn shared(&self) -> MutexGuard<'_, Shared> {
        // A poisoned lock only means a panic elsewhere while holding it; the data (handles
        // and plain values) stays consistent, so keep going.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_state(&self, s: ConnectionState) {
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
pub(crate) async fn dispatch(conn: quinn::Connection, inner: Weak<Inner>) {
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
