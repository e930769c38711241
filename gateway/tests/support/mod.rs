//! Shared helpers of the `quic_*` tests: start a real `sibyl-gateway` (hub + shard processes)
//! on a temporary data dir through `sibyl_gateway::launch`, read its banner and log, and a
//! raw quinn client trusting the gateway's dev CA that speaks sibyl-proto frames directly.
//! Only processes started here are signalled, by pid.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream};
use sibyl_certs::{ClientTlsBuilder, Trust};
use sibyl_gateway::launch::{GatewayProcess, Launch};
use sibyl_proto::frame::{Action, Attach, Hello, Profile, Refused, Ticket, Want};
use sibyl_proto::proof::{EXPORTER_CONTEXT, EXPORTER_LABEL};
use sibyl_proto::{Codec, ErrorCode, Frame, FrameDecoder};

pub const BIN: &str = env!("CARGO_BIN_EXE_sibyl-gateway");
/// Generous bound for anything to happen on a loaded 2-core machine; never a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Two groups (0 and 1) of one shard each: the smallest layout with a "wrong group".
pub const TWO_GROUPS: &str =
    "[[shards.groups]]\nid = 0\nshards = 1\n[[shards.groups]]\nid = 1\nshards = 1\n";

/// A `shard ready` log line.
pub use sibyl_gateway::launch::ShardReady as Ready;
// Not every test binary waits for a restarted shard.
#[allow(unused_imports)]
pub use sibyl_gateway::launch::parse_ready;

/// A running gateway (the shared launcher's process), what the banner said and the shards
/// the test knows to be ready.
pub struct Gateway {
    process: GatewayProcess,
    pub hub: SocketAddr,
    /// Empty when the banner has none (not the first start of the data dir).
    pub dev_key: String,
    /// Shards seen ready so far (latest per slot last); tests push restarts they wait for.
    pub ready: Vec<Ready>,
}

impl Gateway {
    /// Starts the hub with `config` (TOML) and waits for the banner and `shards` shards.
    pub fn start(config: &str, shards: usize) -> Self {
        Self::launch(Launch::new(BIN), config, shards)
    }

    /// Like [`start`](Self::start) on an existing directory (a restart keeps its data);
    /// `dev_key` is empty when the banner has none (not the first start).
    pub fn start_in(dir: tempfile::TempDir, config: &str, shards: usize) -> Self {
        Self::launch(Launch::new(BIN).in_dir(dir), config, shards)
    }

    /// Like [`start_in`](Self::start_in) with the hub on `listen` (a restart on the port the
    /// previous run got, so that a client configured with it finds the hub again).
    pub fn start_listening(
        dir: tempfile::TempDir,
        config: &str,
        shards: usize,
        listen: &str,
    ) -> Self {
        Self::launch(Launch::new(BIN).in_dir(dir).listen(listen), config, shards)
    }

    fn launch(launch: Launch, config: &str, shards: usize) -> Self {
        let process = launch
            .config(config)
            .args(["--heartbeat-interval", "100ms", "--drain-deadline", "5s"])
            .env("RUST_LOG", "info")
            .shards(shards)
            .patience(PATIENCE)
            // A test's gateway is SIGKILLed when it ends: nothing of it needs to drain.
            .stop_grace(Duration::ZERO)
            .start()
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            hub: process.hub(),
            dev_key: process.dev_key().unwrap_or_default().to_owned(),
            ready: process.ready(),
            process,
        }
    }

    /// The gateway's directory (config file, `data/`).
    pub fn dir(&self) -> PathBuf {
        self.process.dir().to_owned()
    }

    /// The hub's pid (to signal it).
    pub fn pid(&self) -> i32 {
        self.process.pid() as i32
    }

    /// Every output line kept so far (the banner included).
    pub fn log(&self) -> Vec<String> {
        self.process.log_tail(usize::MAX)
    }

    /// Whether the hub is still running.
    pub fn running(&mut self) -> bool {
        self.process.try_wait().unwrap().is_none()
    }

    /// Waits for the hub to exit; whether it exited successfully.
    pub fn exit_success(&mut self) -> bool {
        self.process.wait().unwrap().success()
    }

    pub fn data(&self) -> PathBuf {
        self.process.data_dir().to_owned()
    }

    /// SIGKILLs the hub (its shards exit when they see it gone) and keeps the directory.
    pub fn kill9(self) -> tempfile::TempDir {
        self.process.kill_keep_dir().expect("data dir")
    }

    /// SIGKILLs the hub and every shard process it reported ready (the whole gateway, no
    /// process left to notice anything), and keeps the directory.
    pub fn kill9_all(self) -> tempfile::TempDir {
        self.process.kill_all_keep_dir().expect("data dir")
    }

    pub fn ca(&self) -> PathBuf {
        self.process.ca_file()
    }

    /// The latest ready shard of `group`.
    pub fn shard_of(&self, group: u32) -> Ready {
        self.ready
            .iter()
            .rev()
            .find(|r| r.group == group)
            .copied()
            .unwrap_or_else(|| panic!("no ready shard of group {group}"))
    }

    /// Reads lines until `f` returns Some, bounded by PATIENCE. Blocking: call it from a
    /// multi-threaded runtime through `block_in_place`, or outside any runtime.
    pub fn until<T>(&mut self, f: impl FnMut(&str) -> Option<T>) -> T {
        self.process
            .until(Instant::now() + PATIENCE, "a line the test waits for", f)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `sibyl-gateway keys api-key new` on this data dir; returns the key.
    pub fn new_api_key(&self, name: &str, scope: &str) -> String {
        let out = Command::new(BIN)
            .args(["keys", "api-key", "new", "--name", name, "--scope", scope])
            .arg("--data-dir")
            .arg(self.data())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

/// A runtime for the async parts of a test (multi-threaded so that `block_in_place` can
/// wait for log lines while quinn keeps running).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A quinn client endpoint trusting the gateway's dev CA.
pub fn client(ca: &Path) -> Endpoint {
    client_with(ca, false)
}

/// As [`client`]; with `early_data`, a resumed connection may carry 0-RTT data.
pub fn client_with(ca: &Path, early_data: bool) -> Endpoint {
    client_tuned(ca, |tls| tls.enable_early_data = early_data)
}

/// As [`client`], with `tune` applied to its rustls configuration.
pub fn client_tuned(ca: &Path, tune: impl FnOnce(&mut rustls::ClientConfig)) -> Endpoint {
    let tls = ClientTlsBuilder::new(Trust::CaFile(ca.to_owned()))
        .build()
        .unwrap();
    let mut tls = (*tls).clone();
    tune(&mut tls);
    let mut ep = Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(Arc::new(tls)).unwrap(),
    )));
    ep
}

pub async fn connect(ep: &Endpoint, addr: SocketAddr) -> Connection {
    tokio::time::timeout(PATIENCE, ep.connect(addr, "localhost").unwrap())
        .await
        .expect("handshake in time")
        .expect("handshake")
}

pub fn hello(api_key: &str, wants: &[(&str, Action)]) -> Hello {
    Hello {
        client_id: "app-1".into(),
        api_key: api_key.into(),
        profile: Profile::default(),
        wants: wants
            .iter()
            .map(|(s, a)| Want {
                stream: (*s).into(),
                action: *a,
            })
            .collect(),
        versions: vec![1],
    }
}

pub async fn send_frame(send: &mut SendStream, f: Frame) {
    let mut buf = Vec::new();
    f.encode(&mut buf);
    send.write_all(&buf).await.unwrap();
}

/// Reads one frame; `None` if the stream or connection ended first.
pub async fn recv_frame(recv: &mut RecvStream) -> Option<Frame> {
    let mut dec = FrameDecoder::default();
    let read = async {
        loop {
            if let Some(f) = dec.next_frame().unwrap() {
                return Some(f);
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(c)) => dec.push(&c.bytes),
                _ => return None,
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("frame in time")
}

/// Sends `hello` on a new hub connection; returns the connection and the answer.
pub async fn ask_hub(
    ep: &Endpoint,
    hub: SocketAddr,
    h: Hello,
) -> (Connection, Result<Ticket, Refused>) {
    let conn = connect(ep, hub).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send_frame(&mut send, Frame::Hello(h)).await;
    let answer = match recv_frame(&mut recv).await {
        Some(Frame::Ticket(t)) => Ok(t),
        Some(Frame::Refused(r)) => Err(r),
        other => panic!("unexpected hub answer {other:?}"),
    };
    (conn, answer)
}

pub async fn ticket(ep: &Endpoint, gw: &Gateway) -> Ticket {
    let (conn, t) = ask_hub(
        ep,
        gw.hub,
        hello(&gw.dev_key, &[("prices", Action::Subscribe)]),
    )
    .await;
    conn.close(0u32.into(), b"");
    t.expect("ticket")
}

/// This connection's attach proof for `t`.
pub fn proof(conn: &Connection, t: &Ticket) -> [u8; 32] {
    let mut ex = [0u8; 32];
    conn.export_keying_material(&mut ex, EXPORTER_LABEL, EXPORTER_CONTEXT)
        .unwrap();
    sibyl_proto::attach_proof(&t.session_secret, &ex)
}

pub fn attach_frame(t: &Ticket, proof: [u8; 32]) -> Frame {
    Frame::Attach(Attach {
        token: t.token.clone(),
        proof,
        client_id: "app-1".into(),
        resume: None,
    })
}

/// An open session stream and the shard's first answer.
pub struct Session {
    pub conn: Connection,
    pub send: SendStream,
    pub recv: RecvStream,
    pub first: Option<Frame>,
}

/// Connects to `addr` and sends `attach` (or this connection's valid Attach when `None`).
pub async fn attach(ep: &Endpoint, addr: SocketAddr, t: &Ticket, attach: Option<Frame>) -> Session {
    let conn = connect(ep, addr).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let f = attach.unwrap_or_else(|| attach_frame(t, proof(&conn, t)));
    send_frame(&mut send, f).await;
    let first = recv_frame(&mut recv).await;
    Session {
        conn,
        send,
        recv,
        first,
    }
}

/// The application code the peer closed `conn` with (waits for the close).
pub async fn close_code(conn: &Connection) -> ErrorCode {
    let e = tokio::time::timeout(PATIENCE, conn.closed())
        .await
        .expect("connection closed in time");
    match e {
        ConnectionError::ApplicationClosed(c) => ErrorCode::from_u64(c.error_code.into_inner()),
        other => panic!("closed without an application code: {other}"),
    }
}

/// Sends raw bytes on a new connection's first bidi stream; returns the close code.
pub async fn raw_first_stream(ep: &Endpoint, addr: SocketAddr, bytes: &[u8]) -> ErrorCode {
    let conn = connect(ep, addr).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    close_code(&conn).await
}

/// Reads the frames of one stream with a persistent decoder.
pub struct StreamReader {
    recv: RecvStream,
    dec: FrameDecoder,
}

impl StreamReader {
    pub fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            dec: FrameDecoder::default(),
        }
    }

    async fn read(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.dec.next_frame().unwrap() {
                return Some(f);
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(c)) => self.dec.push(&c.bytes),
                _ => return None,
            }
        }
    }

    /// The next frame, or `None` if none arrives within `wait` (or the stream ended).
    pub async fn next_within(&mut self, wait: Duration) -> Option<Frame> {
        tokio::time::timeout(wait, self.read()).await.ok().flatten()
    }

    /// The next frame, `None` when the stream ended; panics if none arrives in PATIENCE.
    pub async fn next(&mut self) -> Option<Frame> {
        tokio::time::timeout(PATIENCE, self.read())
            .await
            .expect("frame in time")
    }
}
