//! Tiny in-process fakes of the hub and of shards, on quinn and sibyl-proto frames, bound to
//! 127.0.0.1:0 with a dev CA in a temp dir. They implement just enough of PROTOCOL.md §5.1
//! and §6.1 to exercise the SDK's connection logic; the cross-process interop tests replace
//! them with the real gateway.
#![allow(dead_code, unreachable_pub)]

pub mod data;
pub use data::{FakeLog, ShardData};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::crypto::rustls::QuicServerConfig;
use sibyl_certs::{InitOptions, ServerTlsBuilder, init_dir};
use sibyl_proto::frame::{
    Attach, AttachProof, Attached, EarlyAttach, Endpoint, GoAway, GroupHint, Hello, Refused,
    SessionLimits, Ticket,
};
use sibyl_proto::proof::{EXPORTER_CONTEXT, EXPORTER_LABEL};
use sibyl_proto::{
    ALPN, ALPN_GROUP_HINT, Codec, ErrorCode, Frame, FrameDecoder, verify_attach_proof,
};

/// Safety net against hangs in awaits of the tests; never a timing assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

/// A dev CA and server certificate in a temp dir (removed on drop).
pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca_pem: PathBuf,
    pub server_fingerprint: [u8; 32],
    server: Arc<rustls::ServerConfig>,
    cert: PathBuf,
    key: PathBuf,
}

pub fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("temp dir");
    let paths = init_dir(&dir.path().join("certs"), &InitOptions::default()).expect("dev CA");
    let (server, reload) = server_tls(&paths.server_cert, &paths.server_key);
    Pki {
        _dir: dir,
        ca_pem: paths.ca_cert,
        server_fingerprint: reload.fingerprint(None),
        server,
        cert: paths.server_cert,
        key: paths.server_key,
    }
}

/// Server TLS as the shards have it: early data (0-RTT) accepted from resuming clients.
fn server_tls(cert: &Path, key: &Path) -> (Arc<rustls::ServerConfig>, sibyl_certs::ReloadHandle) {
    ServerTlsBuilder::new(cert, key)
        .early_data(true)
        .build()
        .expect("server TLS config")
}

impl Pki {
    /// A server TLS config with a session cache of its own, as a restarted shard process
    /// has: TLS session tickets issued before are unknown to it.
    fn fresh_server(&self) -> Arc<rustls::ServerConfig> {
        server_tls(&self.cert, &self.key).0
    }
}

fn server_endpoint(tls: Arc<rustls::ServerConfig>, addr: SocketAddr) -> quinn::Endpoint {
    try_server_endpoint(tls, addr).expect("bind a loopback port")
}

fn try_server_endpoint(
    tls: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let crypto = QuicServerConfig::try_from(tls).expect("QUIC server config");
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    quinn::Endpoint::server(config, addr)
}

/// Tokens the fake hub issued and their session secrets: the fakes' shared "keyring".
#[derive(Clone, Default)]
pub struct Keys(Arc<Mutex<HashMap<Vec<u8>, [u8; 32]>>>);

impl Keys {
    fn issue(&self) -> (Vec<u8>, [u8; 32]) {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let token = format!("tok-{}", NEXT.fetch_add(1, Ordering::Relaxed)).into_bytes();
        let secret: [u8; 32] = rand::random();
        self.0.lock().unwrap().insert(token.clone(), secret);
        (token, secret)
    }

    fn secret(&self, token: &[u8]) -> Option<[u8; 32]> {
        self.0.lock().unwrap().get(token).copied()
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Reads one frame from a stream (None at its end or on any error).
pub(crate) async fn read_frame(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
) -> Option<Frame> {
    loop {
        if let Some(f) = dec.next_frame().ok()? {
            return Some(f);
        }
        let chunk = recv.read_chunk(65_536, true).await.ok()??;
        dec.push(&chunk.bytes);
    }
}

pub(crate) async fn write_frame(send: &mut quinn::SendStream, frame: impl Into<Frame>) {
    let mut buf = Vec::new();
    frame.into().encode(&mut buf);
    let _ = send.write_all(&buf).await;
}

/// What the hub answers, in order; the last one repeats.
#[derive(Clone, Debug)]
pub enum HubReply {
    /// A ticket for `endpoints`, expiring `ttl_s` seconds from now.
    Ticket {
        ttl_s: u64,
    },
    Refused(Refused),
}

pub struct FakeHub {
    pub addr: SocketAddr,
    /// The fake store publish streams append to (share it with shards to serve it).
    pub log: FakeLog,
    /// Publish-stream behaviour and observations.
    pub publish: data::PublishSide,
    hellos: Arc<Mutex<Vec<Hello>>>,
    tickets: Arc<Mutex<Vec<Ticket>>>,
    /// See [`FakeHub::answered_blind`].
    blind: Arc<AtomicU64>,
    endpoint: quinn::Endpoint,
}

impl FakeHub {
    pub const GROUP: u32 = 7;

    pub fn start(pki: &Pki, keys: &Keys, endpoints: Vec<Endpoint>, replies: Vec<HubReply>) -> Self {
        Self::start_with_log(pki, keys, endpoints, replies, FakeLog::default())
    }

    /// A hub whose publish streams append to `log`.
    pub fn start_with_log(
        pki: &Pki,
        keys: &Keys,
        endpoints: Vec<Endpoint>,
        replies: Vec<HubReply>,
        log: FakeLog,
    ) -> Self {
        Self::start_inner(pki, keys, endpoints, replies, log, None)
    }

    /// A hub that speaks ALPN `sibyl/1+hint`: it sends a `GroupHint` for `endpoints` in
    /// 0.5-RTT, and answers `Hello` only once `shard` has seen a connection (or after
    /// [`HANG_GUARD`], noted in [`answered_blind`](Self::answered_blind)), so a client that
    /// does not start its shard handshake from the hint is found out.
    pub fn start_hinting(
        pki: &Pki,
        keys: &Keys,
        endpoints: Vec<Endpoint>,
        replies: Vec<HubReply>,
        shard: &FakeShard,
    ) -> Self {
        let seen = shard.connections.clone();
        Self::start_inner(
            pki,
            keys,
            endpoints,
            replies,
            FakeLog::default(),
            Some(seen),
        )
    }

    /// Hello answers given before the hinted shard saw any connection.
    pub fn answered_blind(&self) -> usize {
        self.blind.load(Ordering::SeqCst) as usize
    }

    fn start_inner(
        pki: &Pki,
        keys: &Keys,
        endpoints: Vec<Endpoint>,
        replies: Vec<HubReply>,
        log: FakeLog,
        hint_for: Option<Arc<AtomicU64>>,
    ) -> Self {
        let tls = match hint_for {
            Some(_) => {
                let mut tls = (*pki.server).clone();
                tls.alpn_protocols = vec![ALPN_GROUP_HINT.to_vec(), ALPN.to_vec()];
                Arc::new(tls)
            }
            None => pki.server.clone(),
        };
        let endpoint = server_endpoint(tls, LOOPBACK_ANY);
        let blind = Arc::new(AtomicU64::new(0));
        let blind_count = blind.clone();
        let addr = endpoint.local_addr().unwrap();
        let hellos = Arc::new(Mutex::new(Vec::new()));
        let tickets = Arc::new(Mutex::new(Vec::new()));
        let publish = data::PublishSide::default();
        let (ep, h, t, keys) = (
            endpoint.clone(),
            hellos.clone(),
            tickets.clone(),
            keys.clone(),
        );
        let (plog, pside) = (log.clone(), publish.clone());
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let conn = match &hint_for {
                    None => match incoming.await {
                        Ok(c) => c,
                        Err(_) => continue,
                    },
                    Some(_) => {
                        let Ok(connecting) = incoming.accept() else {
                            continue;
                        };
                        let Ok((conn, done)) = connecting.into_0rtt() else {
                            continue;
                        };
                        let hint = GroupHint {
                            shard_group: Self::GROUP,
                            endpoints: endpoints.clone(),
                        };
                        if let Ok(mut uni) = conn.open_uni().await {
                            write_frame(&mut uni, hint).await;
                            let _ = uni.finish();
                        }
                        done.await;
                        conn
                    }
                };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    continue;
                };
                let Some(Frame::Hello(hello)) =
                    read_frame(&mut recv, &mut FrameDecoder::default()).await
                else {
                    conn.close(ErrorCode::ProtocolViolation.to_u32().into(), b"want Hello");
                    continue;
                };
                if let Some(seen) = &hint_for {
                    let deadline = tokio::time::Instant::now() + HANG_GUARD;
                    while seen.load(Ordering::SeqCst) == 0 {
                        if tokio::time::Instant::now() >= deadline {
                            blind_count.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                let n = {
                    let mut h = h.lock().unwrap();
                    h.push(hello);
                    h.len()
                };
                let reply = replies[(n - 1).min(replies.len() - 1)].clone();
                match reply {
                    HubReply::Ticket { ttl_s } => {
                        let (token, session_secret) = keys.issue();
                        let ticket = Ticket {
                            version: 1,
                            token,
                            session_secret,
                            shard_group: Self::GROUP,
                            expires_at: unix_now() + ttl_s,
                            endpoints: endpoints.clone(),
                        };
                        t.lock().unwrap().push(ticket.clone());
                        write_frame(&mut send, ticket).await;
                    }
                    HubReply::Refused(r) => write_frame(&mut send, r).await,
                }
                let _ = send.finish();
                // Keep `conn` alive: the client may keep it for publishing.
                tokio::spawn(data::serve_publish(conn, plog.clone(), pside.clone()));
            }
        });
        Self {
            addr,
            log,
            publish,
            hellos,
            tickets,
            blind,
            endpoint,
        }
    }

    pub fn hellos(&self) -> Vec<Hello> {
        self.hellos.lock().unwrap().clone()
    }

    pub fn tickets(&self) -> Vec<Ticket> {
        self.tickets.lock().unwrap().clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"test over");
    }
}

/// How a fake shard answers `Attach`.
#[derive(Clone, Copy, Debug)]
pub enum ShardMode {
    /// Verify the token and proof; answer `Attached` (or close with `PROOF_FAILED`).
    Accept,
    /// Close the connection with this code on `Attach`.
    Refuse(ErrorCode),
}

#[derive(Clone, Debug)]
pub struct SeenAttach {
    /// The `Attach`, or an `EarlyAttach` with its `AttachProof`'s proof.
    pub attach: Attach,
    pub proof_ok: bool,
    /// Came as `EarlyAttach` (0-RTT) + `AttachProof`.
    pub early: bool,
    /// Accepted sessions of this shard whose connection was still open when this attach's
    /// first frame was read (a make-before-break reconnect keeps the old one open until it attached).
    pub open_before: usize,
}

type Sessions = Arc<Mutex<Vec<(quinn::Connection, quinn::SendStream)>>>;

/// How many accepted sessions in `live` are still open.
fn open_sessions(live: &Sessions) -> usize {
    let live = live.lock().unwrap();
    live.iter()
        .filter(|(c, _)| c.close_reason().is_none())
        .count()
}

/// What an `EarlyAttach` and its `AttachProof` together amount to: an `Attach`.
fn with_proof(e: EarlyAttach, proof: [u8; 32]) -> Attach {
    Attach {
        token: e.token,
        proof,
        client_id: e.client_id,
        resume: e.resume,
    }
}

/// 127.0.0.1, any port.
const LOOPBACK_ANY: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

pub struct FakeShard {
    pub addr: SocketAddr,
    /// Subscription-serving observations.
    pub data: ShardData,
    attaches: Arc<Mutex<Vec<SeenAttach>>>,
    sessions: Sessions,
    /// Connections this shard accepted (counted when the client's first flight arrives).
    connections: Arc<AtomicU64>,
    endpoint: quinn::Endpoint,
}

static SESSION_IDS: AtomicU64 = AtomicU64::new(100);

impl FakeShard {
    pub fn start(pki: &Pki, keys: &Keys, mode: ShardMode) -> Self {
        Self::start_with(pki, keys, mode, FakeLog::default(), ShardData::default())
    }

    /// A shard that serves subscriptions from `log` as `data` says.
    pub fn start_with(
        pki: &Pki,
        keys: &Keys,
        mode: ShardMode,
        log: FakeLog,
        data: ShardData,
    ) -> Self {
        let endpoint = server_endpoint(pki.server.clone(), LOOPBACK_ANY);
        Self::start_at(endpoint, keys, mode, log, data)
    }

    /// A shard on `addr` with `tls`; see [`restarted`](Self::restarted).
    fn start_at(
        endpoint: quinn::Endpoint,
        keys: &Keys,
        mode: ShardMode,
        log: FakeLog,
        data: ShardData,
    ) -> Self {
        let addr = endpoint.local_addr().unwrap();
        let attaches = Arc::new(Mutex::new(Vec::new()));
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let (ep, seen, live, keys) = (
            endpoint.clone(),
            attaches.clone(),
            sessions.clone(),
            keys.clone(),
        );
        let d = data.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let (seen, live, keys) = (seen.clone(), live.clone(), keys.clone());
                let (log, d) = (log.clone(), d.clone());
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                        return;
                    };
                    let violation = |conn: &quinn::Connection| {
                        conn.close(ErrorCode::ProtocolViolation.to_u32().into(), b"want Attach");
                    };
                    let mut dec = FrameDecoder::default();
                    let attached = Attached {
                        session_id: SESSION_IDS.fetch_add(1, Ordering::Relaxed),
                        limits: SessionLimits {
                            max_streams: 100,
                            max_frame: 65_536,
                            idle_timeout_ms: 30_000,
                        },
                        server_time: unix_now() * 1000,
                    };
                    // The fake answers after the handshake either way (a real shard answers
                    // an EarlyAttach in 0.5-RTT); the client sees the same frames.
                    let first = read_frame(&mut recv, &mut dec).await;
                    let open_before = open_sessions(&live);
                    let (attach, early) = match first {
                        Some(Frame::Attach(a)) => (a, false),
                        Some(Frame::EarlyAttach(e)) => {
                            if let ShardMode::Refuse(code) = mode {
                                // Refused before any proof is asked for.
                                seen.lock().unwrap().push(SeenAttach {
                                    attach: with_proof(e, [0; 32]),
                                    proof_ok: false,
                                    early: true,
                                    open_before,
                                });
                                conn.close(code.to_u32().into(), b"refused by fake shard");
                                return;
                            }
                            write_frame(&mut send, attached.clone()).await;
                            let Some(Frame::AttachProof(AttachProof { proof })) =
                                read_frame(&mut recv, &mut dec).await
                            else {
                                return violation(&conn);
                            };
                            (with_proof(e, proof), true)
                        }
                        _ => return violation(&conn),
                    };
                    let mut exporter = [0u8; 32];
                    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, EXPORTER_CONTEXT)
                        .expect("exporter");
                    let proof_ok = keys
                        .secret(&attach.token)
                        .is_some_and(|s| verify_attach_proof(&s, &exporter, &attach.proof));
                    seen.lock().unwrap().push(SeenAttach {
                        attach,
                        proof_ok,
                        early,
                        open_before,
                    });
                    let code = match mode {
                        ShardMode::Refuse(code) => code,
                        ShardMode::Accept if !proof_ok => ErrorCode::ProofFailed,
                        ShardMode::Accept => {
                            if !early {
                                write_frame(&mut send, attached).await;
                            }
                            live.lock().unwrap().push((conn.clone(), send));
                            data::serve_subscriptions(conn.clone(), log, d).await;
                            conn.closed().await;
                            return;
                        }
                    };
                    conn.close(code.to_u32().into(), b"refused by fake shard");
                });
            }
        });
        Self {
            addr,
            data,
            attaches,
            sessions,
            connections,
            endpoint,
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            addr: self.addr.to_string(),
            server_name: "localhost".into(),
        }
    }

    /// Stops this shard and starts a new one on the same address with a fresh TLS session
    /// cache, as a restarted shard process: the client's TLS session tickets for it are
    /// stale (resumption and 0-RTT are refused; a full handshake follows).
    pub async fn restarted(self, pki: &Pki, keys: &Keys, mode: ShardMode) -> Self {
        let addr = self.addr;
        self.endpoint.close(0u32.into(), b"restart");
        self.endpoint.wait_idle().await;
        drop(self);
        // The old endpoint's socket goes once its driver task has seen the last handle go.
        let rebind = async {
            loop {
                match try_server_endpoint(pki.fresh_server(), addr) {
                    Ok(endpoint) => return endpoint,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        let endpoint = tokio::time::timeout(HANG_GUARD, rebind)
            .await
            .expect("the shard's port is free again");
        Self::start_at(
            endpoint,
            keys,
            mode,
            FakeLog::default(),
            ShardData::default(),
        )
    }

    /// The attaches seen once there are at least `n`: an `EarlyAttach` is recorded when its
    /// `AttachProof` arrives, which may be after the client reported itself attached.
    pub async fn attaches_settled(&self, n: usize) -> Vec<SeenAttach> {
        let wait = async {
            loop {
                let seen = self.attaches();
                if seen.len() >= n {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(HANG_GUARD, wait)
            .await
            .expect("attaches recorded in time")
    }

    pub fn attaches(&self) -> Vec<SeenAttach> {
        self.attaches.lock().unwrap().clone()
    }

    /// The connection of the `i`-th accepted session still listed (not closed or moved
    /// away by [`close_sessions`](Self::close_sessions) / [`go_away`](Self::go_away)).
    pub fn session_connection(&self, i: usize) -> quinn::Connection {
        self.sessions.lock().unwrap()[i].0.clone()
    }

    /// Closes every attached session's connection with `code`.
    pub fn close_sessions(&self, code: ErrorCode) {
        for (conn, _) in self.sessions.lock().unwrap().drain(..) {
            conn.close(code.to_u32().into(), b"fake shard closes");
        }
    }

    /// Sends `GoAway{DRAINING}` on every live session stream (connections stay open).
    pub async fn go_away(&self) {
        let mut live: Vec<_> = self.sessions.lock().unwrap().drain(..).collect();
        for (_, send) in &mut live {
            let g = GoAway {
                code: ErrorCode::Draining,
                reason: "draining".into(),
                reconnect_after_ms: 5_000,
            };
            write_frame(send, g).await;
        }
        // Keep the streams open until the client moves (dropping would finish them).
        self.sessions.lock().unwrap().extend(live);
    }
}

impl Drop for FakeShard {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"test over");
    }
}

/// An endpoint nothing listens on: a UDP port bound and released.
pub fn dead_endpoint() -> Endpoint {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    drop(sock);
    Endpoint {
        addr: addr.to_string(),
        server_name: "localhost".into(),
    }
}

/// Waits (bounded by [`HANG_GUARD`]) until the state watch satisfies `pred`.
pub async fn wait_state(
    rx: &mut tokio::sync::watch::Receiver<sibyl_sdk::ConnectionState>,
    pred: impl Fn(&sibyl_sdk::ConnectionState) -> bool,
) -> sibyl_sdk::ConnectionState {
    tokio::time::timeout(HANG_GUARD, rx.wait_for(|s| pred(s)))
        .await
        .expect("state reached before the hang guard")
        .expect("client alive")
        .clone()
}
