//! The hub's admission endpoint: `Hello` → `Ticket` | `Refused` over QUIC.
//!
//! ```text
//! quinn::Endpoint (hub socket) ──accept──▶ one task per connection:
//!   first bidi stream ── FrameDecoder (bounded, attach_timeout) ──▶ Hello
//!     └─ Hub::handle_hello(hello, now)   (no I/O: keys, keyring, shard loads all in memory)
//!          ├─ admission::negotiate_version / ApiKeyStore::verify / admission::scopes_for
//!          ├─ ShardDirectory (Supervisor) ──▶ admission::choose_group
//!          ├─ Claims ──Keyring::seal(AAD = deployment id)──▶ Ticket{endpoints by least conns}
//!          └─ ShardDirectory::note_admitted(first endpoint): counts as a connection until
//!             that shard's next heartbeat (a GroupHint's first endpoint is counted when the
//!             hint is sent, and stays first in that connection's ticket)
//!   ◀── Ticket (stream finished; the connection stays open until idle) | Refused (then
//!       the connection is closed with the refusal code)
//! ```
//!
//! [`Hub`] holds the admission state and is usable without any socket ([`Hub::handle_hello`]
//! takes `now`); [`HubServer`] is the thin quinn driver.

pub mod admission;
pub mod groups;
pub mod producers;
pub mod publish;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use quinn::Endpoint;
use sibyl_proto::frame::inbound;
use sibyl_proto::frame::{
    Action, Endpoint as TicketEndpoint, GroupHint, Hello, ProduceError, Refused, Ticket,
};
use sibyl_proto::{ALPN, ALPN_GROUP_HINT, DecodeLimits, ErrorCode, Frame, FrameDecoder};
use sibyl_tokens::{Claims, Keyring, SessionSecret, TokenId};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::apikeys::ApiKeyStore;
use crate::config::{AdvertiseConfig, Config};
use crate::ids::ShardId;
use crate::quic::{self, QuicSetupError, Role, StreamError};
use crate::supervisor::{ShardInfo, Supervisor};

pub use admission::GroupCandidate;
pub use groups::{CoordConfig, GroupCoordinator, GroupPush, LinkId, LinkMember, PositionReport};
pub use publish::{PublishRights, PublishService};

/// Where the hub learns which shards are ready and how loaded they are.
pub trait ShardDirectory: Send + Sync {
    /// Ready shards of `group`, fewest connections first ([`ShardInfo::load`]).
    fn ready_by_least_connections(&self, group: u32) -> Vec<ShardInfo>;
    /// A client was sent to `shard`: count it in [`ShardInfo::admitted`] until the shard's
    /// next load report.
    fn note_admitted(&self, shard: &ShardInfo);
}

impl ShardDirectory for Supervisor {
    fn ready_by_least_connections(&self, group: u32) -> Vec<ShardInfo> {
        self.by_least_connections(group)
    }

    fn note_admitted(&self, shard: &ShardInfo) {
        Supervisor::note_admitted(self, shard);
    }
}

/// What a connection was sent in its `GroupHint`: the group and the shard the client
/// pre-connects to (the hint's first endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hinted {
    /// The hinted group.
    pub group: u32,
    /// Its first endpoint's shard.
    pub shard: ShardId,
}

/// Hub settings taken from [`Config`] at start.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// Shard groups, in configuration order.
    pub groups: Vec<u32>,
    /// Token lifetime.
    pub token_lifetime: Duration,
    /// AAD tokens are sealed with (the deployment id).
    pub deployment_id: String,
    /// Endpoint rewriting and the TLS server name put in tickets.
    pub advertise: AdvertiseConfig,
    /// Rate class written into tokens.
    pub rate_class: String,
}

impl HubSettings {
    /// The settings of `config`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            groups: config.shards.groups.iter().map(|g| g.id).collect(),
            token_lifetime: config.tokens.lifetime,
            deployment_id: config.tokens.deployment_id.clone(),
            advertise: config.advertise.clone(),
            rate_class: "default".to_owned(),
        }
    }
}

/// The hub's admission state: API keys, the sealing keyring and the shard directory, all in
/// memory. Shared by every connection task.
pub struct Hub {
    settings: HubSettings,
    keys: RwLock<ApiKeyStore>,
    keyring: RwLock<Keyring>,
    directory: RwLock<Option<Arc<dyn ShardDirectory>>>,
    draining: AtomicBool,
    publish: RwLock<Option<Arc<PublishService>>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("settings", &self.settings)
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub admitting with `keys`, sealing with `keyring`, routing to `directory`.
    pub fn new(
        settings: HubSettings,
        keys: ApiKeyStore,
        keyring: Keyring,
        directory: Arc<dyn ShardDirectory>,
    ) -> Self {
        Self {
            settings,
            keys: RwLock::new(keys),
            keyring: RwLock::new(keyring),
            directory: RwLock::new(Some(directory)),
            draining: AtomicBool::new(false),
            publish: RwLock::new(None),
        }
    }

    /// Serves publish streams into `svc`'s store (without it, `PublishOpen` is answered
    /// `ProduceError{NOT_FOUND}`).
    pub fn set_publish(&self, svc: Arc<PublishService>) {
        *self.publish.write().unwrap_or_else(|p| p.into_inner()) = Some(svc);
    }

    fn publish_service(&self) -> Option<Arc<PublishService>> {
        self.publish
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the sealing keyring (after a rotation).
    pub fn set_keyring(&self, keyring: Keyring) {
        *self.keyring.write().unwrap_or_else(|p| p.into_inner()) = keyring;
    }

    /// Replaces the API keys (after the store file changed).
    pub fn set_api_keys(&self, keys: ApiKeyStore) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    /// Stops admitting: every later `Hello` gets `Refused{DRAINING}`. Releases the shard
    /// directory (so the caller can shut the supervisor down).
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.directory
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Whether [`Hub::begin_drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The ready shards of every configured group.
    fn candidates(&self) -> Option<Vec<GroupCandidate>> {
        let dir = self.directory.read().unwrap_or_else(|p| p.into_inner());
        let dir = dir.as_ref()?;
        Some(
            self.settings
                .groups
                .iter()
                .map(|&group| GroupCandidate {
                    group,
                    shards: dir.ready_by_least_connections(group),
                })
                .collect(),
        )
    }

    /// The group a new connection would be given now and its ready shards (a `GroupHint`,
    /// sent in 0.5-RTT to clients that asked with ALPN `sibyl/1+hint`); `None` when no group
    /// has a ready shard or the hub is draining. The client pre-connects to the first
    /// endpoint, so that shard is counted as admitted now; pass the [`Hinted`] to
    /// [`handle_hello_hinted`](Self::handle_hello_hinted) so the ticket keeps it first.
    pub fn group_hint(&self) -> Option<(GroupHint, Hinted)> {
        if self.is_draining() {
            return None;
        }
        let candidates = self.candidates()?;
        let chosen = admission::choose_group(&candidates)?;
        let first = chosen.shards.first()?;
        self.note_admitted(first);
        Some((
            GroupHint {
                shard_group: chosen.group,
                endpoints: self.endpoints_of(&chosen.shards),
            },
            Hinted {
                group: chosen.group,
                shard: first.id,
            },
        ))
    }

    fn note_admitted(&self, shard: &ShardInfo) {
        if let Some(dir) = self
            .directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            dir.note_admitted(shard);
        }
    }

    /// `shards` as ticket endpoints (advertised address, server name).
    fn endpoints_of(&self, shards: &[ShardInfo]) -> Vec<TicketEndpoint> {
        shards
            .iter()
            .map(|s| TicketEndpoint {
                addr: self.settings.advertise.rewrite(s.addr).to_string(),
                server_name: self.settings.advertise.server_name.clone(),
            })
            .collect()
    }

    /// Answers one `Hello` as of `now` (Unix seconds). No I/O: everything it reads is in
    /// memory. See the module docs for the order of checks.
    pub fn handle_hello(&self, hello: &Hello, now: u64) -> Result<Ticket, Refused> {
        self.handle_hello_hinted(hello, now, None)
    }

    /// [`handle_hello`](Self::handle_hello) on a connection that was sent a `GroupHint`
    /// ([`group_hint`](Self::group_hint)): the ticket is for the hinted group while it still
    /// has a ready shard, with the hinted shard first while it is ready (the client is
    /// already connecting to it).
    pub fn handle_hello_hinted(
        &self,
        hello: &Hello,
        now: u64,
        hinted: Option<Hinted>,
    ) -> Result<Ticket, Refused> {
        if self.is_draining() {
            return Err(admission::refused(
                ErrorCode::Draining,
                "the hub is shutting down",
            ));
        }
        let version = admission::negotiate_version(&hello.versions)?;
        admission::check_client_id(&hello.client_id)?;
        let scopes = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            let record = keys.verify(&hello.api_key).map_err(|_| {
                admission::refused(ErrorCode::Unauthenticated, "unknown or revoked API key")
            })?;
            admission::scopes_for(record, &hello.wants)?
        };
        let Some(candidates) = self.candidates() else {
            return Err(admission::refused(
                ErrorCode::Draining,
                "the hub is shutting down",
            ));
        };
        let chosen = admission::choose_group_preferring(&candidates, hinted.map(|h| h.group))
            .ok_or_else(admission::no_ready_shard)?;
        let internal = |what: &str| admission::refused(ErrorCode::Internal, what.to_owned());
        let session_secret =
            SessionSecret::generate().map_err(|_| internal("randomness unavailable"))?;
        let token_id = TokenId::generate().map_err(|_| internal("randomness unavailable"))?;
        let expires_at = now.saturating_add(self.settings.token_lifetime.as_secs());
        let secret_bytes = *session_secret.as_bytes();
        let claims = Claims {
            token_id,
            client_id: hello.client_id.clone(),
            shard_group: chosen.group,
            session_secret,
            scopes,
            rate_class: self.settings.rate_class.clone(),
            issued_at: now,
            not_before: now,
            expires_at,
            protocol_version: version,
        };
        let token = self
            .keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .seal(&claims, self.settings.deployment_id.as_bytes())
            .map_err(|e| match e {
                sibyl_tokens::SealError::TooLong { .. } => admission::refused(
                    ErrorCode::LimitExceeded,
                    "the token would be too large (shorter client_id or fewer streams)",
                ),
                _ => internal("cannot seal the token"),
            })?;
        let mut shards = chosen.shards.clone();
        let hinted_first = hinted
            .and_then(|h| shards.iter().position(|s| s.id == h.shard))
            .inspect(|&i| shards[..=i].rotate_right(1))
            .is_some();
        if !hinted_first && let Some(first) = shards.first() {
            // A hinted shard was counted when the hint was sent.
            self.note_admitted(first);
        }
        let endpoints = self.endpoints_of(&shards);
        Ok(Ticket {
            version,
            token,
            session_secret: secret_bytes,
            shard_group: chosen.group,
            expires_at,
            endpoints,
        })
    }
}

/// Per-connection settings of the hub's driver.
#[derive(Debug, Clone, Copy)]
struct ConnSettings {
    limits: DecodeLimits,
    first_frame_within: Duration,
}

/// The running hub endpoint: an accept task spawning one task per connection.
#[derive(Debug)]
pub struct HubServer {
    endpoint: Endpoint,
    accept: tokio::task::JoinHandle<()>,
}

impl HubServer {
    /// Starts serving on `socket` (already bound) with `tls`, whose ALPN list it replaces with
    /// `sibyl/1+hint`, `sibyl/1` (PROTOCOL.md §2, §5.1). Must be called inside a tokio
    /// runtime.
    pub fn start(
        hub: Arc<Hub>,
        socket: UdpSocket,
        tls: Arc<rustls::ServerConfig>,
        config: &Config,
    ) -> Result<Self, QuicSetupError> {
        let transport = quic::transport_config(&config.connection, Role::Hub);
        // `sibyl/1+hint` first: a client that offers it gets a `GroupHint` in 0.5-RTT.
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![ALPN_GROUP_HINT.to_vec(), ALPN.to_vec()];
        let endpoint = quic::endpoint(socket, quic::server_config(Arc::new(tls), transport)?)?;
        let conn = ConnSettings {
            limits: quic::decode_limits(&config.connection),
            first_frame_within: config.connection.attach_timeout,
        };
        let accept = tokio::spawn(accept_loop(endpoint.clone(), hub, conn));
        Ok(Self { endpoint, accept })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Closes every connection (`DRAINING`) and waits, at most `within`, for the peers to
    /// be told.
    pub async fn shutdown(self, within: Duration) {
        self.endpoint.close(
            quinn::VarInt::from_u32(ErrorCode::Draining.to_u32()),
            b"hub stopped",
        );
        self.accept.abort();
        let _ = self.accept.await;
        let _ = tokio::time::timeout(within, self.endpoint.wait_idle()).await;
    }
}

async fn accept_loop(endpoint: Endpoint, hub: Arc<Hub>, conn: ConnSettings) {
    // Connection tasks live in the set so that aborting this task aborts them too.
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                // Accepted here, not in the connection's task: the handshake's first flight
                // goes out without waiting for that task to be scheduled, with the
                // `GroupHint` in it (`spawn_after_first_poll`).
                Some(incoming) => match incoming.accept() {
                    Ok(connecting) => {
                        let serve = serve_connection(hub.clone(), connecting, conn);
                        quic::spawn_after_first_poll(&mut tasks, serve).await;
                    }
                    Err(e) => debug!("hub handshake failed: {e}"),
                },
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Completes the handshake. On a `sibyl/1+hint` connection the `GroupHint` goes out first,
/// in 0.5-RTT with the handshake flight (PROTOCOL.md §5.1); nothing is read from the client
/// before the handshake completes. Returns the connection and what it was hinted.
async fn establish(
    hub: &Hub,
    mut connecting: quinn::Connecting,
) -> Option<(quinn::Connection, Option<Hinted>)> {
    if negotiated_alpn(&mut connecting).await.as_deref() == Some(ALPN_GROUP_HINT) {
        // quinn always grants 0.5-RTT on the server side; `Err` hands the handshake back.
        match connecting.into_0rtt() {
            Ok((conn, done)) => {
                let hinted = match hub.group_hint() {
                    Some((h, hinted)) => {
                        send_hint(&conn, h).await;
                        Some(hinted)
                    }
                    None => None,
                };
                done.await;
                if let Some(e) = conn.close_reason() {
                    debug!("hub handshake failed: {e}");
                    return None;
                }
                return Some((conn, hinted));
            }
            Err(back) => connecting = back,
        }
    }
    match connecting.await {
        Ok(conn) => Some((conn, None)),
        Err(e) => {
            debug!("hub handshake failed: {e}");
            None
        }
    }
}

/// The ALPN the handshake selected (known once the ClientHello was processed, which
/// `Incoming::accept` already did).
async fn negotiated_alpn(connecting: &mut quinn::Connecting) -> Option<Vec<u8>> {
    let data = connecting.handshake_data().await.ok()?;
    data.downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Sends `hint` on the hub's first uni stream and finishes it. Best effort: a client that
/// never reads it loses nothing but the hint.
async fn send_hint(conn: &quinn::Connection, hint: GroupHint) {
    let Ok(mut stream) = conn.open_uni().await else {
        return;
    };
    if quic::write_frame(&mut stream, &Frame::GroupHint(hint))
        .await
        .is_ok()
    {
        let _ = stream.finish();
    }
}

async fn serve_connection(hub: Arc<Hub>, connecting: quinn::Connecting, cs: ConnSettings) {
    let established = establish(&hub, connecting).await;
    crate::obs::handshake(true, established.is_some());
    let Some((conn, hinted)) = established else {
        return;
    };
    let peer = conn.remote_address();
    let first = tokio::time::timeout(cs.first_frame_within, conn.accept_bi()).await;
    let (mut send, mut recv) = match first {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, "hub connection ended before Hello: {e}");
            return;
        }
        Err(_) => {
            quic::close(&conn, ErrorCode::Idle, "no Hello in time");
            return;
        }
    };
    let hello = match quic::read_first_frame(
        &mut recv,
        cs.limits,
        inbound::HUB_STREAM,
        cs.first_frame_within,
    )
    .await
    {
        Ok(Frame::Hello(h)) => h,
        Ok(other) => return close_on(&conn, &StreamError::Unexpected(other.frame_type())),
        Err(e) => return close_on(&conn, &e),
    };
    let flush = cs.first_frame_within;
    match hub.handle_hello_hinted(&hello, unix_now(), hinted) {
        Ok(ticket) => {
            debug!(%peer, client_id = %hello.client_id, group = ticket.shard_group, "ticket issued");
            crate::obs::ticket(ticket.shard_group);
            if quic::write_frame(&mut send, &Frame::Ticket(ticket))
                .await
                .is_err()
            {
                return;
            }
            let _ = send.finish();
            let rights = PublishRights {
                streams: hello
                    .wants
                    .iter()
                    .filter(|w| w.action == Action::Publish)
                    .map(|w| w.stream.clone())
                    .collect(),
                owner: producers::ProducerOwner::new(&hello.api_key, &hello.client_id),
            };
            let after = serve_after_ticket(&hub, &conn, cs, Arc::new(rights));
            tracing::Instrument::instrument(after, crate::obs::hub_span(&hello.client_id)).await;
        }
        Err(refused) => {
            info!(%peer, client_id = %hello.client_id, code = %refused.code, reason = %refused.reason, "hello refused");
            let code = refused.code;
            crate::obs::refused(code);
            if quic::write_frame(&mut send, &Frame::Refused(refused))
                .await
                .is_ok()
            {
                quic::finish_and_flush(&mut send, flush).await;
            }
            quic::close(&conn, code, "refused");
        }
    }
}

fn close_on(conn: &quinn::Connection, e: &StreamError) {
    if let Some(code) = e.close_code() {
        debug!(peer = %conn.remote_address(), %code, "closing hub connection: {e}");
        quic::close(conn, code, &e.to_string());
    }
}

/// After a ticket the connection stays open (for publish streams) until the client closes
/// it or it idles out. Each publish stream is served on its own task
/// ([`publish::serve_publish`]); any other first frame closes the connection.
async fn serve_after_ticket(
    hub: &Arc<Hub>,
    conn: &quinn::Connection,
    cs: ConnSettings,
    rights: Arc<PublishRights>,
) {
    let mut tasks = JoinSet::new();
    loop {
        let (mut send, mut recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let mut dec = FrameDecoder::accepting(cs.limits, inbound::AFTER_TICKET);
        let first =
            tokio::time::timeout(cs.first_frame_within, quic::read_frame(&mut recv, &mut dec))
                .await
                .unwrap_or(Err(StreamError::Timeout(cs.first_frame_within)));
        match first {
            Ok(Some(Frame::PublishOpen(open))) => match hub.publish_service() {
                Some(svc) => {
                    tasks.spawn(publish::serve_publish(
                        svc,
                        rights.clone(),
                        conn.clone(),
                        send,
                        recv,
                        dec,
                        open,
                    ));
                }
                None => {
                    let err = ProduceError {
                        seq: 0,
                        code: ErrorCode::NotFound,
                        reason: format!(
                            "stream {:?}: publishing is not available on this hub",
                            open.stream
                        ),
                    };
                    if quic::write_frame(&mut send, &Frame::ProduceError(err))
                        .await
                        .is_ok()
                    {
                        let _ = send.finish();
                    }
                }
            },
            Ok(Some(other)) => {
                close_on(conn, &StreamError::Unexpected(other.frame_type()));
                break;
            }
            Ok(None) => {
                close_on(conn, &StreamError::Ended);
                break;
            }
            Err(e) => {
                close_on(conn, &e);
                break;
            }
        }
    }
    // Publish streams end with the connection; their workers finish what was queued.
    while tasks.join_next().await.is_some() {}
}

/// How often [`watch_api_keys`] looks at the API-key store file.
pub const API_KEYS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Reloads the API-key store at `path` into `hub` whenever the file's modification time or
/// length changes (checked every `every`, off the admission path), so that keys created or
/// revoked with `sibyl-gateway keys api-key` take effect without a restart. A file that
/// fails to load keeps the previous keys in service. Ends when the hub is dropped.
pub fn watch_api_keys(
    hub: std::sync::Weak<Hub>,
    path: std::path::PathBuf,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let stamp = |m: &std::fs::Metadata| (m.modified().ok(), m.len());
    tokio::spawn(async move {
        let mut last = tokio::fs::metadata(&path).await.ok().map(|m| stamp(&m));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(hub) = hub.upgrade() else { return };
            let now = tokio::fs::metadata(&path).await.ok().map(|m| stamp(&m));
            if now == last {
                continue;
            }
            last = now;
            let p = path.clone();
            match tokio::task::spawn_blocking(move || ApiKeyStore::load(&p)).await {
                Ok(Ok(keys)) => {
                    info!(path = %path.display(), keys = keys.records().len(), "API keys reloaded");
                    hub.set_api_keys(keys);
                }
                Ok(Err(e)) => warn!("API keys not reloaded: {e}"),
                Err(e) => warn!("API keys not reloaded: {e}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use sibyl_proto::frame::{Action, Profile, Want};
    use sibyl_tokens::OpenOptions;

    use super::*;
    use crate::ids::ShardId;

    const NOW: u64 = 1_700_000_000;

    struct FakeDirectory(Mutex<Vec<ShardInfo>>);

    impl ShardDirectory for FakeDirectory {
        fn ready_by_least_connections(&self, group: u32) -> Vec<ShardInfo> {
            let mut v: Vec<ShardInfo> = self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.group == group)
                .cloned()
                .collect();
            v.sort_by_key(|s| (s.load(), s.id.index));
            v
        }

        fn note_admitted(&self, shard: &ShardInfo) {
            for s in self.0.lock().unwrap().iter_mut() {
                if s.id == shard.id && s.generation == shard.generation {
                    s.admitted += 1;
                }
            }
        }
    }

    fn shard(group: u32, index: u32, connections: u64) -> ShardInfo {
        ShardInfo {
            id: ShardId { group, index },
            group,
            generation: 1,
            pid: 1,
            addr: SocketAddr::from(([127, 0, 0, 1], 6000 + (group * 10 + index) as u16)),
            connections,
            admitted: 0,
            subscriptions: 0,
            rss_bytes: 0,
        }
    }

    fn setup(shards: Vec<ShardInfo>) -> (Hub, Keyring, String) {
        let mut keys = ApiKeyStore::default();
        let key = keys
            .create("t", &["prices*:subscribe".to_owned()], NOW)
            .unwrap()
            .key;
        let ring = Keyring::generate().unwrap();
        let mut config = Config::default();
        config
            .advertise
            .rewrite
            .insert("127.0.0.1:6010".into(), "10.0.0.1:7000".into());
        let hub = Hub::new(
            HubSettings::from_config(&config),
            keys,
            ring.clone(),
            Arc::new(FakeDirectory(Mutex::new(shards))),
        );
        (hub, ring, key)
    }

    fn hello(key: &str) -> Hello {
        Hello {
            client_id: "app-1".into(),
            api_key: key.into(),
            profile: Profile::default(),
            wants: vec![Want {
                stream: "prices.eu".into(),
                action: Action::Subscribe,
            }],
            versions: vec![1],
        }
    }

    #[test]
    fn ticket_carries_a_token_for_the_least_loaded_group() {
        let (hub, ring, key) = setup(vec![shard(0, 0, 5), shard(1, 1, 2), shard(1, 0, 1)]);
        let t = hub.handle_hello(&hello(&key), NOW).unwrap();
        assert_eq!(t.shard_group, 1);
        assert_eq!(t.version, 1);
        assert_eq!(t.expires_at, NOW + 3600);
        // Fewest connections first, rewritten through [advertise].
        let addrs: Vec<&str> = t.endpoints.iter().map(|e| e.addr.as_str()).collect();
        assert_eq!(addrs, ["10.0.0.1:7000", "127.0.0.1:6011"]);
        assert!(t.endpoints.iter().all(|e| e.server_name == "localhost"));
        let claims = ring
            .open_at(&t.token, b"sibyl-dev", &OpenOptions::default(), NOW)
            .unwrap();
        assert_eq!(claims.shard_group, 1);
        assert_eq!(claims.client_id, "app-1");
        assert_eq!(claims.session_secret.as_bytes(), &t.session_secret);
        assert!(claims.allows("prices.eu", sibyl_tokens::Action::Subscribe));
        assert!(!claims.allows("prices.us", sibyl_tokens::Action::Subscribe));
        // Another AAD (deployment) does not open it.
        assert!(
            ring.open_at(&t.token, b"", &OpenOptions::default(), NOW)
                .is_err()
        );
    }

    #[test]
    fn clients_between_heartbeats_spread_over_groups_and_shards() {
        let (hub, _, key) = setup(vec![
            shard(0, 0, 0),
            shard(0, 1, 0),
            shard(1, 0, 0),
            shard(1, 1, 0),
        ]);
        // With no heartbeat in between, each ticket's first endpoint counts as a connection:
        // four clients land on four shards, not all on group 0's first.
        let firsts: Vec<(u32, String)> = (0..4)
            .map(|_| {
                let t = hub.handle_hello(&hello(&key), NOW).unwrap();
                (t.shard_group, t.endpoints[0].addr.clone())
            })
            .collect();
        assert_eq!(
            firsts,
            [
                (0, "127.0.0.1:6000".to_owned()),
                (1, "10.0.0.1:7000".to_owned()),
                (0, "127.0.0.1:6001".to_owned()),
                (1, "127.0.0.1:6011".to_owned()),
            ]
        );
    }

    #[test]
    fn a_hinted_shard_stays_first_in_its_ticket_and_counts_once() {
        let (hub, _, key) = setup(vec![shard(0, 0, 0), shard(0, 1, 0)]);
        let (hint, hinted) = hub.group_hint().unwrap();
        assert_eq!(hint.endpoints[0].addr, "127.0.0.1:6000");
        assert_eq!(hinted.shard, ShardId { group: 0, index: 0 });
        // Shard 0 was counted when the hint went out, so it now sorts after shard 1, yet the
        // hinted connection's ticket keeps it first (the client is already connecting).
        let t = hub
            .handle_hello_hinted(&hello(&key), NOW, Some(hinted))
            .unwrap();
        let addrs: Vec<&str> = t.endpoints.iter().map(|e| e.addr.as_str()).collect();
        assert_eq!(addrs, ["127.0.0.1:6000", "127.0.0.1:6001"]);
        // Counted once: the next client goes to shard 1, the one after that is a tie again.
        let t = hub.handle_hello(&hello(&key), NOW).unwrap();
        assert_eq!(t.endpoints[0].addr, "127.0.0.1:6001");
        let (hint, _) = hub.group_hint().unwrap();
        assert_eq!(hint.endpoints[0].addr, "127.0.0.1:6000");
        // A hinted shard that is no longer ready: the ticket's own first endpoint is counted.
        let gone = Hinted {
            group: 0,
            shard: ShardId { group: 0, index: 7 },
        };
        let t = hub
            .handle_hello_hinted(&hello(&key), NOW, Some(gone))
            .unwrap();
        assert_eq!(t.endpoints[0].addr, "127.0.0.1:6001");
        let t = hub.handle_hello(&hello(&key), NOW).unwrap();
        assert_eq!(t.endpoints[0].addr, "127.0.0.1:6000");
    }

    #[test]
    fn refusals() {
        let (hub, _, key) = setup(vec![]);
        assert_eq!(
            hub.handle_hello(&hello(&key), NOW).unwrap_err().code,
            ErrorCode::Overloaded
        );
        assert_eq!(
            hub.handle_hello(&hello("sk_nope"), NOW).unwrap_err().code,
            ErrorCode::Unauthenticated
        );
        let (hub, _, key) = setup(vec![shard(0, 0, 0)]);
        hub.begin_drain();
        assert_eq!(
            hub.handle_hello(&hello(&key), NOW).unwrap_err().code,
            ErrorCode::Draining
        );
    }
}
