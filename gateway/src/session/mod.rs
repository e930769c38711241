//! Shard-side client connections: `Attach` → `Attached`, `GoAway` on drain.
//!
//! ```text
//! quinn::Endpoint (ShardRuntime.socket) ──accept──▶ one task per connection:
//!   draining? ──▶ close(DRAINING)
//!   (0.5-RTT: the connection is used before its handshake completes)
//!   first bidi stream = session stream ── FrameDecoder (bounded, attach_timeout) ──▶
//!     Attach:      handshake done ─ attach::check_attach(…, exporter, now) ─▶ close(code) | ok
//!                  ◀── Attached{session_id, limits, server_time}
//!     EarlyAttach (0-RTT): attach::check_token ─▶ close(code) | ◀── Attached (0.5-RTT)
//!                  ──▶ AttachProof; handshake done ─ attach::check_proof(exporter) ─▶ close | ok
//!   ShardStats.connections += 1 (only once the proof verified)
//!   loop: session stream (any frame = PROTOCOL_VIOLATION, garbage = its code),
//!         control streams (first frame bounded), drain signal ──▶ GoAway(DRAINING), close
//! SessionServer::drain(within): refuse new, GoAway to all, wait for none left (bounded),
//!   endpoint.close + wait_idle (bounded)
//! ```
//!
//! A frame error closes only the connection it happened on, with [`FrameError::code`]
//! (via [`StreamError::close_code`]); every other connection keeps being served.
//!
//! [`FrameError::code`]: sibyl_proto::FrameError::code

pub mod attach;
pub mod flow;
pub mod subscribe;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use sibyl_proto::frame::{Attached, GoAway, SessionLimits, SubError, inbound};
use sibyl_proto::proof::{EXPORTER_CONTEXT, EXPORTER_LABEL, EXPORTER_LEN};
use sibyl_proto::{DecodeLimits, ErrorCode, Frame, FrameDecoder};
use sibyl_tokens::{Keyring, OpenOptions};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::ConnectionConfig;
use crate::ipc::ShardInit;
use crate::quic::{self, QuicSetupError, Role, StreamError};
use crate::shard_stats::ShardStats;

pub use attach::{AttachContext, AttachRefusal, check_attach};
pub use subscribe::DataPlane;

/// How long a `GoAway` may take to be acknowledged before the connection is closed anyway.
const GOAWAY_FLUSH: Duration = Duration::from_secs(2);

/// At the end of a drain, how long the closed endpoint may wait for its connections to be
/// idle (bounded further by the drain deadline, and at least 200 ms). Our `CONNECTION_CLOSE`
/// frames leave at once; the wait only lets a lost one be repeated. It must stay short:
/// a connection its peer closed or abandoned mid-handshake sits in quinn's draining state
/// for three PTOs, about 3 s before any RTT sample, and needs nothing from us. Waiting for
/// it held a shard's exit 3–5 s after a client dropped a hinted handshake.
const CLOSE_FLUSH: Duration = Duration::from_millis(500);

/// During a drain, how long an unattached connection's handshake may take to complete before
/// the connection is closed anyway: 2 × the path's RTT estimate (quinn's initial 333 ms
/// before any sample), at most `attach_timeout` and at least 100 ms (the floor wins over a
/// shorter `attach_timeout`). A close sent after the handshake
/// carries its `DRAINING` code to the client; one sent before reaches it as a bare
/// APPLICATION_ERROR (RFC 9000 §10.2.3), and the SDK retries either way. A client that went
/// away mid-handshake (e.g. one the hub refused after sending it a `GroupHint`) never
/// completes it: waiting the whole `attach_timeout` held a drain until its deadline.
fn drain_handshake_grace(rtt: Duration, attach_timeout: Duration) -> Duration {
    (rtt * 2).clamp(
        Duration::from_millis(100),
        attach_timeout.max(Duration::from_millis(100)),
    )
}

/// Why the session server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// TLS or endpoint setup failed.
    #[error(transparent)]
    Setup(#[from] QuicSetupError),
    /// The keyring delivered by the hub does not decode.
    #[error("keyring: {0}")]
    Keyring(#[from] sibyl_tokens::KeyringError),
}

struct Shared {
    group: u32,
    shard: u32,
    aad: Vec<u8>,
    open: OpenOptions,
    conn: ConnectionConfig,
    limits: DecodeLimits,
    keyring: RwLock<Arc<Keyring>>,
    stats: Arc<ShardStats>,
    drain: watch::Sender<bool>,
    live: AtomicU64,
    none_live: Notify,
    data: Option<Arc<DataPlane>>,
}

impl Shared {
    fn keyring(&self) -> Arc<Keyring> {
        self.keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn is_draining(&self) -> bool {
        *self.drain.borrow()
    }
}

/// Decrements a counter on drop (and wakes drain when no connection is left).
struct LiveGuard(Arc<Shared>);

impl LiveGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.live.fetch_add(1, Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.none_live.notify_waiters();
        }
    }
}

/// Counts an attached session in [`ShardStats::connections`] while alive.
struct AttachedGuard(Arc<ShardStats>);

impl AttachedGuard {
    /// Counts one more session, or refuses with `OVERLOADED` when `max` are attached.
    fn admit(stats: &Arc<ShardStats>, max: u32) -> Result<Self, AttachRefusal> {
        stats
            .connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < u64::from(max)).then_some(n + 1)
            })
            .map_err(|n| AttachRefusal {
                code: ErrorCode::Overloaded,
                reason: format!("shard serves its maximum of {n} sessions"),
            })?;
        Ok(Self(stats.clone()))
    }
}

impl Drop for AttachedGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The shard's QUIC endpoint and its connection tasks.
pub struct SessionServer {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for SessionServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionServer")
            .field("group", &self.shared.group)
            .field("shard", &self.shared.shard)
            .finish_non_exhaustive()
    }
}

impl SessionServer {
    /// Starts serving on `socket` with the certificate of `init` and the keyring `keyring`
    /// (`Keyring::to_bytes` form); subscriptions are served from `data` (without it,
    /// `Subscribe` is answered `SubError{NOT_FOUND}`). Must be called inside a tokio runtime.
    pub fn start(
        init: &ShardInit,
        socket: UdpSocket,
        stats: Arc<ShardStats>,
        keyring: &[u8],
        data: Option<Arc<DataPlane>>,
    ) -> Result<Self, SessionError> {
        let keyring = Keyring::from_bytes(keyring)?;
        let transport = quic::transport_config(&init.connection, Role::Shard);
        let server = quic::server_config_from_files(&init.cert, &init.key, transport, true)?;
        let endpoint = quic::endpoint(socket, server)?;
        let (drain, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            group: init.group,
            shard: init.shard,
            aad: init.deployment_id.as_bytes().to_vec(),
            open: OpenOptions::default().with_clock_skew(init.token_clock_skew),
            conn: init.connection.clone(),
            limits: quic::decode_limits(&init.connection),
            keyring: RwLock::new(Arc::new(keyring)),
            stats,
            drain,
            live: AtomicU64::new(0),
            none_live: Notify::new(),
            data,
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        Ok(Self {
            shared,
            endpoint,
            accept,
        })
    }

    /// Replaces the keyring tokens are opened with (on `KeyringUpdate`). Bytes that do not
    /// decode leave the current keyring in service.
    pub fn update_keyring(&self, bytes: &[u8]) -> Result<(), SessionError> {
        let k = Keyring::from_bytes(bytes)?;
        *self
            .shared
            .keyring
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(k);
        Ok(())
    }

    /// Connections currently open (attached or not).
    pub fn live_connections(&self) -> u64 {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Drains: new connections are closed with `DRAINING`, every attached session gets
    /// `GoAway{DRAINING, reconnect_after_ms: 0}` and is then closed with `DRAINING`. When no
    /// connection is left or `within` has passed, the endpoint is closed; returns after at
    /// most 500 ms more (`CLOSE_FLUSH`: the close frames' time to leave).
    pub async fn drain(self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        self.shared.drain.send_replace(true);
        loop {
            let notified = self.shared.none_live.notified();
            if self.shared.live.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                warn!(
                    group = self.shared.group,
                    shard = self.shared.shard,
                    left = self.shared.live.load(Ordering::SeqCst),
                    "drain deadline reached; closing the remaining connections"
                );
                break;
            }
        }
        self.endpoint.close(
            quinn::VarInt::from_u32(ErrorCode::Draining.to_u32()),
            b"shard draining",
        );
        self.accept.abort();
        let _ = self.accept.await;
        let flush = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .clamp(Duration::from_millis(200), CLOSE_FLUSH);
        let _ = tokio::time::timeout(flush, self.endpoint.wait_idle()).await;
    }
}

async fn accept_loop(endpoint: Endpoint, shared: Arc<Shared>) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                // Accepted here, not in the connection's task: the handshake's first flight
                // (and an answer to 0-RTT data) goes out without waiting for that task.
                Some(incoming) => match incoming.accept() {
                    Ok(connecting) => {
                        let guard = LiveGuard::new(&shared);
                        let serve = serve(shared.clone(), connecting, guard);
                        quic::spawn_after_first_poll(&mut tasks, serve).await;
                    }
                    Err(e) => debug!("shard handshake failed: {e}"),
                },
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

fn unix_now() -> (u64, u64) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (
        d.as_secs(),
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    )
}

fn close_on(conn: &Connection, e: &StreamError) {
    if let Some(code) = e.close_code() {
        debug!(peer = %conn.remote_address(), %code, "closing session: {e}");
        quic::close(conn, code, &e.to_string());
    }
}

async fn serve(shared: Arc<Shared>, connecting: quinn::Connecting, _live: LiveGuard) {
    // 0.5-RTT: the connection is usable before the handshake completes, so an `EarlyAttach`
    // sent as 0-RTT data is answered in the shard's first flight. Nothing but the session
    // stream is read, and no proof checked, until `handshake` resolves (the exporter needs
    // the whole handshake). quinn always grants this on the server side.
    let (conn, handshake) = match connecting.into_0rtt() {
        Ok((conn, done)) => (conn, Some(done.shared())),
        Err(connecting) => match connecting.await {
            Ok(conn) => (conn, None),
            Err(e) => {
                debug!("shard handshake failed: {e}");
                return;
            }
        },
    };
    let within = shared.conn.attach_timeout;
    // An application close sent before the handshake completes reaches the client without
    // its code (RFC 9000 §10.2.3, e.g. a refused `EarlyAttach`): closes wait for it, up to
    // `wait`.
    let handshake_done = |h: Option<Handshake>, wait: Duration| async move {
        if let Some(done) = h {
            let _ = tokio::time::timeout(wait, done).await;
        }
    };
    let drain_grace = || drain_handshake_grace(conn.rtt(), within);
    if shared.is_draining() {
        handshake_done(handshake, drain_grace()).await;
        quic::close(&conn, ErrorCode::Draining, "shard draining");
        return;
    }
    // One budget for the whole attach, however many steps it takes. A drain that starts
    // before the attach completes closes the connection at once: it has no session to move
    // (e.g. a client that started its handshake from a hub's `GroupHint` and went away).
    let mut drain = shared.drain.subscribe();
    let attach = tokio::select! {
        r = tokio::time::timeout(within, attach(&shared, &conn, handshake.clone())) => r,
        () = async {
            // The guard `wait_for` returns is not `Send`: dropped here, not held.
            let _ = drain.wait_for(|d| *d).await.map(|_| ());
        } => {
            handshake_done(handshake, drain_grace()).await;
            quic::close(&conn, ErrorCode::Draining, DRAINING_UNATTACHED);
            return;
        }
    };
    if attach.as_ref().is_ok_and(Result::is_err) {
        handshake_done(handshake, within).await;
    }
    let (claims, send, recv, dec, _attached) = match attach {
        Ok(Ok(attached)) => attached,
        Ok(Err(AttachFailure::Refused(refusal))) => {
            info!(peer = %conn.remote_address(), code = %refusal.code, reason = %refusal.reason, "attach refused");
            quic::close(&conn, refusal.code, &refusal.reason);
            return;
        }
        Ok(Err(AttachFailure::Stream(e))) => return close_on(&conn, &e),
        Ok(Err(AttachFailure::Gone)) => return,
        Err(_) => return close_on(&conn, &StreamError::Timeout(within)),
    };
    session(&shared, &conn, Arc::new(claims), send, recv, dec).await;
}

/// Close reason of a connection a drain found not attached yet.
pub const DRAINING_UNATTACHED: &str = "shard draining (not attached)";

/// Resolves when the connection's handshake completes (several waiters).
type Handshake = futures::future::Shared<quinn::ZeroRttAccepted>;

/// Why an attach did not complete.
enum AttachFailure {
    /// A check failed: close with its code.
    Refused(AttachRefusal),
    /// The session stream failed or carried the wrong frame.
    Stream(StreamError),
    /// The connection ended first (nothing to report).
    Gone,
}

impl From<StreamError> for AttachFailure {
    fn from(e: StreamError) -> Self {
        Self::Stream(e)
    }
}

/// Reads the session stream's first frame and runs the attach: `Attach` (proof included)
/// → checks → `Attached`; or `EarlyAttach` (0-RTT) → token checks → `Attached` at once →
/// `AttachProof` after the handshake → proof check. Returns the claims and the session
/// stream once the proof has verified.
async fn attach(
    shared: &Shared,
    conn: &Connection,
    handshake: Option<Handshake>,
) -> Result<
    (
        sibyl_tokens::Claims,
        SendStream,
        RecvStream,
        FrameDecoder,
        AttachedGuard,
    ),
    AttachFailure,
> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| {
        debug!("connection ended before Attach: {e}");
        AttachFailure::Gone
    })?;
    let mut dec = FrameDecoder::accepting(shared.limits, inbound::SESSION_STREAM);
    let first = quic::read_frame(&mut recv, &mut dec)
        .await?
        .ok_or(StreamError::Ended)?;
    let keyring = shared.keyring();
    let ctx = AttachContext {
        keyring: &keyring,
        aad: &shared.aad,
        open: shared.open,
        group: shared.group,
    };
    let (now_s, now_ms) = unix_now();
    let admit = || {
        AttachedGuard::admit(&shared.stats, shared.conn.max_sessions)
            .map_err(AttachFailure::Refused)
    };
    let attached = || -> Result<Attached, AttachFailure> {
        let mut session_id = [0u8; 8];
        getrandom::fill(&mut session_id).map_err(|_| {
            AttachFailure::Refused(AttachRefusal {
                code: ErrorCode::Internal,
                reason: "randomness unavailable".into(),
            })
        })?;
        Ok(Attached {
            session_id: u64::from_be_bytes(session_id),
            limits: SessionLimits {
                max_streams: shared.conn.max_streams,
                max_frame: shared.conn.max_frame,
                idle_timeout_ms: u64::try_from(shared.conn.idle_timeout.as_millis())
                    .unwrap_or(u64::MAX),
            },
            server_time: now_ms,
        })
    };
    let claims = match first {
        Frame::Attach(a) => {
            let exporter = exporter(conn, handshake).await?;
            let claims =
                check_attach(&ctx, &a, &exporter, now_s).map_err(AttachFailure::Refused)?;
            let guard = admit()?;
            let attached = attached()?;
            debug!(client_id = %claims.client_id, session_id = attached.session_id, "attached");
            quic::write_frame(&mut send, &Frame::Attached(attached))
                .await
                .map_err(|_| AttachFailure::Gone)?;
            (claims, guard)
        }
        Frame::EarlyAttach(a) => {
            let claims = attach::check_token(&ctx, &a.token, &a.client_id, now_s)
                .map_err(AttachFailure::Refused)?;
            let guard = admit()?;
            let attached = attached()?;
            let session_id = attached.session_id;
            quic::write_frame(&mut send, &Frame::Attached(attached))
                .await
                .map_err(|_| AttachFailure::Gone)?;
            let proof = match quic::read_frame(&mut recv, &mut dec).await? {
                Some(Frame::AttachProof(p)) => p.proof,
                Some(other) => return Err(StreamError::Unexpected(other.frame_type()).into()),
                None => return Err(StreamError::Ended.into()),
            };
            let exporter = exporter(conn, handshake).await?;
            attach::check_proof(&claims, &exporter, &proof).map_err(AttachFailure::Refused)?;
            debug!(client_id = %claims.client_id, session_id, "attached (0-RTT)");
            (claims, guard)
        }
        other => return Err(StreamError::Unexpected(other.frame_type()).into()),
    };
    let (claims, guard) = claims;
    Ok((claims, send, recv, dec, guard))
}

/// This connection's TLS exporter for the attach proof, once the handshake is complete.
async fn exporter(
    conn: &Connection,
    handshake: Option<Handshake>,
) -> Result<[u8; EXPORTER_LEN], AttachFailure> {
    if let Some(done) = handshake {
        // Resolves when the handshake completes (always `true` on the server side); a
        // connection that failed first shows in `close_reason`.
        done.await;
    }
    if conn.close_reason().is_some() {
        return Err(AttachFailure::Gone);
    }
    let mut out = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, EXPORTER_CONTEXT)
        .map_err(|_| {
            AttachFailure::Refused(AttachRefusal {
                code: ErrorCode::Internal,
                reason: "TLS exporter unavailable".into(),
            })
        })?;
    Ok(out)
}

/// The attached session: watches the session stream, serves control streams (each
/// subscription on its own task, ended with the session), and sends `GoAway` when the shard
/// drains.
async fn session(
    shared: &Shared,
    conn: &Connection,
    claims: Arc<sibyl_tokens::Claims>,
    mut send: SendStream,
    mut recv: RecvStream,
    mut dec: FrameDecoder,
) {
    let mut drain_rx = shared.drain.subscribe();
    let mut session_open = true;
    let mut subs = JoinSet::new();
    let sub_ids = Arc::new(SubIds::default());
    loop {
        tokio::select! {
            draining = async { drain_rx.wait_for(|d| *d).await.is_ok() } => {
                if draining {
                    go_away(conn, &mut send).await;
                }
                return;
            }
            r = quic::read_frame(&mut recv, &mut dec), if session_open => match r {
                Ok(Some(f)) => return close_on(conn, &StreamError::Unexpected(f.frame_type())),
                // The client finished its half of the session stream; nothing more can
                // arrive on it, the session goes on.
                Ok(None) => session_open = false,
                Err(e) => return close_on(conn, &e),
            },
            s = conn.accept_bi() => match s {
                Ok((s, r)) => {
                    subs.spawn(control_stream(
                        shared.data.clone(),
                        shared.stats.clone(),
                        claims.clone(),
                        conn.clone(),
                        sub_ids.clone(),
                        shared.limits,
                        shared.conn.attach_timeout,
                        s,
                        r,
                    ));
                }
                Err(_) => return,
            },
            Some(_) = subs.join_next(), if !subs.is_empty() => {}
        }
    }
}

/// Counts a subscription in [`ShardStats::subscriptions`] while alive.
struct SubscriptionGuard(Arc<ShardStats>);

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.0.subscriptions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `sub_id`s of a session's live subscriptions (PROTOCOL.md §6.2: unique in the
/// session).
#[derive(Default)]
struct SubIds(std::sync::Mutex<std::collections::HashSet<u32>>);

impl SubIds {
    /// Claims `id` for a new subscription; `None` if a live one already uses it.
    fn claim(self: &Arc<Self>, id: u32) -> Option<SubIdGuard> {
        let fresh = self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
        fresh.then(|| SubIdGuard(self.clone(), id))
    }
}

/// Frees a `sub_id` when its subscription ends.
struct SubIdGuard(Arc<SubIds>, u32);

impl Drop for SubIdGuard {
    fn drop(&mut self) {
        self.0
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// The longest stream name a `Subscribe` may carry, bytes (as the hub's `Hello.wants`).
pub const MAX_STREAM_NAME: usize = crate::hub::admission::MAX_STREAM_NAME;
/// The longest consumer-group name a `Subscribe` may carry, bytes.
pub const MAX_GROUP_NAME: usize = crate::storelink::codec::MAX_GROUP_NAME;

/// `SubError{LIMIT_EXCEEDED}` for a `Subscribe` whose fields are over their bounds.
fn subscribe_limits(sub: &sibyl_proto::frame::Subscribe) -> Option<SubError> {
    let over = |what: &str, max: usize| SubError {
        code: ErrorCode::LimitExceeded,
        reason: format!("{what} longer than {max} bytes"),
    };
    if sub.stream.len() > MAX_STREAM_NAME {
        return Some(over("stream name", MAX_STREAM_NAME));
    }
    match &sub.group {
        Some(g) if g.len() > MAX_GROUP_NAME => Some(over("group name", MAX_GROUP_NAME)),
        _ => None,
    }
}

/// A control stream: its first frame must be `Subscribe` (within `within`) with a `sub_id`
/// no live subscription of the session uses (else `PROTOCOL_VIOLATION`) and fields within
/// their bounds (else `SubError{LIMIT_EXCEEDED}`); the subscription is then served by
/// [`subscribe::serve_subscription`]. Without a data plane, `Subscribe` is answered with
/// `SubError{NOT_FOUND}`.
#[allow(clippy::too_many_arguments)]
async fn control_stream(
    data: Option<Arc<DataPlane>>,
    stats: Arc<ShardStats>,
    claims: Arc<sibyl_tokens::Claims>,
    conn: Connection,
    sub_ids: Arc<SubIds>,
    limits: DecodeLimits,
    within: Duration,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let mut dec = FrameDecoder::accepting(limits, inbound::CONTROL_STREAM);
    let first = tokio::time::timeout(within, quic::read_frame(&mut recv, &mut dec))
        .await
        .unwrap_or(Err(StreamError::Timeout(within)));
    let sub = match first {
        Ok(Some(Frame::Subscribe(sub))) => sub,
        Ok(Some(other)) => return close_on(&conn, &StreamError::Unexpected(other.frame_type())),
        Ok(None) => return close_on(&conn, &StreamError::Ended),
        // Reset before its `Subscribe`: nothing to end.
        Err(StreamError::Read(quinn::ReadError::Reset(_))) => return,
        Err(e) => return close_on(&conn, &e),
    };
    let Some(_sub_id) = sub_ids.claim(sub.sub_id) else {
        let reason = format!("sub_id {} is already in use in this session", sub.sub_id);
        debug!(peer = %conn.remote_address(), "closing session: {reason}");
        return quic::close(&conn, ErrorCode::ProtocolViolation, &reason);
    };
    let data = match (subscribe_limits(&sub), data) {
        (None, Some(data)) => data,
        (refusal, _) => {
            let err = refusal.unwrap_or_else(|| SubError {
                code: ErrorCode::NotFound,
                reason: format!(
                    "stream {:?}: subscriptions are not served by this shard",
                    sub.stream
                ),
            });
            if quic::write_frame(&mut send, &Frame::SubError(err))
                .await
                .is_ok()
            {
                let _ = send.finish();
            }
            return;
        }
    };
    stats.subscriptions.fetch_add(1, Ordering::Relaxed);
    let _guard = SubscriptionGuard(stats);
    subscribe::serve_subscription(data, claims, conn, send, recv, dec, sub).await;
}

async fn go_away(conn: &Connection, send: &mut SendStream) {
    let frame = Frame::GoAway(GoAway {
        code: ErrorCode::Draining,
        reason: "shard draining".to_owned(),
        reconnect_after_ms: 0,
    });
    if quic::write_frame(send, &frame).await.is_ok() {
        quic::finish_and_flush(send, GOAWAY_FLUSH).await;
    }
    quic::close(conn, ErrorCode::Draining, "shard draining");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::drain_handshake_grace;

    #[test]
    fn drain_handshake_grace_follows_the_rtt_within_bounds() {
        let ms = Duration::from_millis;
        let attach = Duration::from_secs(10);
        // Loopback: the floor.
        assert_eq!(drain_handshake_grace(ms(0), attach), ms(100));
        // Before any RTT sample quinn estimates 333 ms.
        assert_eq!(drain_handshake_grace(ms(333), attach), ms(666));
        // Never longer than the attach budget, and never below the floor.
        assert_eq!(
            drain_handshake_grace(Duration::from_secs(30), attach),
            attach
        );
        assert_eq!(drain_handshake_grace(ms(30), ms(10)), ms(100));
    }
}
