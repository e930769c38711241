//! Bare-quinn baselines: an in-process quinn server and client on 127.0.0.1 with the dev
//! certificates and the exact TLS configuration Sibyl uses (TLS 1.3, ALPN `sibyl/1`, ECDSA
//! P-256 leaf issued by a dev CA, both from `sibyl-certs`), and [`transport_config`], the quinn
//! transport configuration the gateway and the SDK mirror.
//!
//! ```text
//!  client endpoint(s) ──connect──▶ BaselineServer (127.0.0.1:0)
//!        │  handshake only: close right after establishment (handshakes/s, handshake ms)
//!        └─ uni "request" {total u64, write size u64} ──▶ server opens one uni stream and
//!           writes `total` bytes in `write size` writes ──▶ client reads to the end (bytes/s)
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, TransportConfig, VarInt};
use sibyl_certs::{
    CertPaths, ClientTlsBuilder, InitOptions, ReloadHandle, ServerTlsBuilder, Trust,
};
use tempfile::TempDir;

use super::BenchError;

/// The server name clients present (a SAN of every `sibyl-certs` dev leaf).
pub const SERVER_NAME: &str = "localhost";

/// Largest write size a baseline stream request may ask for (1 MiB); bounds the server's
/// buffer before it is allocated.
pub const MAX_WRITE_SIZE: u64 = 1 << 20;

/// Largest total a baseline stream request may ask for (1 TiB).
pub const MAX_STREAM_TOTAL: u64 = 1 << 40;

/// Size of a stream request: `total` then `write size`, both big-endian `u64`.
const REQUEST_LEN: usize = 16;

/// Stream receive window of [`transport_config`]: 16 MiB.
pub const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;

/// Connection receive window of [`transport_config`]: 32 MiB (room for two full streams).
pub const RECEIVE_WINDOW: u32 = 32 << 20;

/// Send window of [`transport_config`]: 32 MiB.
pub const SEND_WINDOW: u64 = 32 << 20;

/// Maximum concurrent uni streams a peer may open under [`transport_config`]: 1024 (Sibyl
/// carries one uni stream per assigned partition, plus staging streams during a flip).
pub const MAX_CONCURRENT_UNI_STREAMS: u32 = 1024;

/// Idle timeout of [`transport_config`]: 30 s (RFC 9308 § 3.2, quinn's default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Keep-alive interval of [`transport_config`]: 10 s, well inside [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// The quinn transport configuration of every Sibyl endpoint (hub, shard, SDK). The gateway
/// and the SDK must build theirs with exactly these settings (or call this function) so that
/// the baselines compare like with like.
///
/// Differences from `TransportConfig::default()`:
/// - stream receive window [`STREAM_RECEIVE_WINDOW`] (16 MiB, default 1.25 MB), connection
///   receive window [`RECEIVE_WINDOW`] (32 MiB, default unlimited) and send window
///   [`SEND_WINDOW`] (32 MiB, default 10 MB): the default stream window caps one stream at
///   about 1.25 MB per RTT, which throttles bulk transfer on a fast path;
/// - [`MAX_CONCURRENT_UNI_STREAMS`] uni streams (default 100), no bidi change (100);
/// - keep-alive every [`KEEP_ALIVE_INTERVAL`] with the default 30 s idle timeout.
///
/// Everything else (initial MTU 1200 with MTU discovery, segmentation offload, Cubic
/// congestion control, datagram buffers, initial RTT 333 ms) stays at quinn's defaults.
pub fn transport_config() -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_CONCURRENT_UNI_STREAMS))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    // The conversion only fails for values above 2^62 ms; 30 s is far below.
    config.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    config
}

/// Which transport configuration a baseline endpoint uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// [`transport_config`], what Sibyl uses. Default.
    #[default]
    Sibyl,
    /// `quinn::TransportConfig::default()`, for before/after comparisons only.
    QuinnDefault,
}

impl Transport {
    fn config(self) -> Arc<TransportConfig> {
        Arc::new(match self {
            Self::Sibyl => transport_config(),
            Self::QuinnDefault => TransportConfig::default(),
        })
    }
}

/// Whether a client may resume an earlier TLS session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resumption {
    /// Every handshake is a full one (certificate sent, signed and verified). Default; what
    /// a fresh client process sees, and what the baseline figures use.
    #[default]
    Full,
    /// The client keeps rustls' in-memory session cache, so repeated handshakes to the
    /// same server resume (PSK + ECDHE, no certificate).
    Resume,
}

/// The benchmark's TLS material: a dev CA and a server leaf written by
/// `sibyl_certs::init_dir` into a temporary directory (removed on drop), and the rustls
/// configurations `sibyl-certs` builds from them. A Sibyl half should serve these same
/// files so that certificate size and TLS work match the baseline.
pub struct BenchTls {
    paths: CertPaths,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    _reload: ReloadHandle,
    /// The generated files' directory (removed on drop); `None` for [`BenchTls::load`].
    _dir: Option<TempDir>,
}

impl std::fmt::Debug for BenchTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchTls")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl BenchTls {
    /// Generates the dev CA and server leaf (default [`InitOptions`]) in a fresh temporary
    /// directory and builds both TLS configurations.
    pub fn generate() -> Result<Self, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix("sibyl-bench-certs")
            .tempdir()
            .map_err(BenchError::Io)?;
        let certs_dir = dir.path().join("certs");
        let paths = sibyl_certs::init_dir(&certs_dir, &InitOptions::default())?;
        Self::from_paths(paths, Some(dir))
    }

    /// The configurations for files another run generated in `certs_dir` (`ca.pem`,
    /// `server.pem`, `server.key`; see [`CertPaths::in_dir`]), which stay where they are.
    pub fn load(certs_dir: &Path) -> Result<Self, BenchError> {
        Self::from_paths(CertPaths::in_dir(certs_dir), None)
    }

    fn from_paths(paths: CertPaths, dir: Option<TempDir>) -> Result<Self, BenchError> {
        let (server, reload) = ServerTlsBuilder::new(&paths.server_cert, &paths.server_key)
            // The files never change during a run; skip the per-handshake metadata checks.
            .reload_interval(Duration::from_secs(3600))
            .build()?;
        let client = ClientTlsBuilder::new(Trust::CaFile(paths.ca_cert.clone())).build()?;
        Ok(Self {
            paths,
            server,
            client,
            _reload: reload,
            _dir: dir,
        })
    }

    /// Where the CA and the server certificate and key are.
    pub fn paths(&self) -> &CertPaths {
        &self.paths
    }

    /// The server's rustls configuration (as the gateway builds it).
    pub fn server_crypto(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// The client's rustls configuration (as the SDK builds it), trusting the dev CA, with
    /// the given session resumption policy.
    pub fn client_crypto(&self, resumption: Resumption) -> Arc<rustls::ClientConfig> {
        match resumption {
            Resumption::Resume => self.client.clone(),
            Resumption::Full => {
                let mut config = (*self.client).clone();
                config.resumption = rustls::client::Resumption::disabled();
                Arc::new(config)
            }
        }
    }

    /// A quinn client configuration from [`client_crypto`](Self::client_crypto) and the
    /// given transport.
    pub fn quinn_client_config(
        &self,
        resumption: Resumption,
        transport: Transport,
    ) -> Result<quinn::ClientConfig, BenchError> {
        let crypto = QuicClientConfig::try_from(self.client_crypto(resumption))
            .map_err(|_| BenchError::NoInitialCipherSuite)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport.config());
        Ok(config)
    }

    /// A fresh quinn client endpoint on 127.0.0.1:0 with
    /// [`quinn_client_config`](Self::quinn_client_config) as its default.
    pub fn client_endpoint(
        &self,
        resumption: Resumption,
        transport: Transport,
    ) -> Result<Endpoint, BenchError> {
        let mut endpoint =
            Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).map_err(BenchError::Io)?;
        endpoint.set_default_client_config(self.quinn_client_config(resumption, transport)?);
        Ok(endpoint)
    }
}

/// An in-process bare quinn server on 127.0.0.1:0. It accepts every connection; on each
/// incoming uni stream it reads a stream request and answers with one uni stream of the
/// requested size. Closed (and its accept task stopped) on drop.
#[derive(Debug)]
pub struct BaselineServer {
    endpoint: Endpoint,
    bound_addr: SocketAddr,
    connect_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BaselineServer {
    fn drop(&mut self) {
        self.endpoint.close(VarInt::from_u32(0), b"bench over");
        self.task.abort();
    }
}

impl BaselineServer {
    /// Binds 127.0.0.1:0 and starts serving. Must be called inside a tokio runtime.
    pub fn start(tls: &BenchTls, transport: Transport) -> Result<Self, BenchError> {
        Self::start_on(tls, transport, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }

    /// Binds `bind` (e.g. a fixed loopback port an impairment proxy forwards to) and starts
    /// serving. Must be called inside a tokio runtime.
    pub fn start_on(
        tls: &BenchTls,
        transport: Transport,
        bind: SocketAddr,
    ) -> Result<Self, BenchError> {
        let crypto = QuicServerConfig::try_from(tls.server_crypto())
            .map_err(|_| BenchError::NoInitialCipherSuite)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport.config());
        let endpoint = Endpoint::server(config, bind).map_err(BenchError::Io)?;
        let bound_addr = endpoint.local_addr().map_err(BenchError::Io)?;
        let accept = endpoint.clone();
        let task = tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve_connection(conn).await;
                    }
                });
            }
        });
        Ok(Self {
            endpoint,
            bound_addr,
            connect_addr: bound_addr,
            task,
        })
    }

    /// Makes clients connect to `addr` (e.g. an impairment proxy in front of this server)
    /// instead of the bound address.
    pub fn connect_via(&mut self, addr: SocketAddr) {
        self.connect_addr = addr;
    }

    /// The address clients connect to: the bound address unless
    /// [`connect_via`](Self::connect_via) changed it.
    pub fn addr(&self) -> SocketAddr {
        self.connect_addr
    }

    /// The address the server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.bound_addr
    }
}

/// The first argument that makes `sibyl-bench` serve as an [`OtherProcessServer`].
pub const SERVE_BASELINE_ARG: &str = "serve-baseline";

/// A [`BaselineServer`] in another process: the `sibyl-bench` binary re-executed as
/// `sibyl-bench serve-baseline <certs dir>` ([`serve_baseline`]), serving the same files
/// with the same transport. It prints its address and serves until its stdin closes, so it
/// ends with this handle (dropped: stdin closed, then killed by pid and reaped) or with the
/// parent process.
///
/// What it is for: a Sibyl hub and its shards are other processes than the client, while
/// the baseline server runs inside the benchmark's own runtime; handshakes with this server
/// show what the process boundary alone costs on the machine.
#[derive(Debug)]
pub struct OtherProcessServer {
    child: std::process::Child,
    addr: SocketAddr,
}

impl OtherProcessServer {
    /// Starts `bench_bin serve-baseline <tls's certs dir>` and reads its address (blocking,
    /// bounded by the child: it prints the address or exits).
    pub fn start(bench_bin: &Path, tls: &BenchTls) -> Result<Self, BenchError> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let dir = tls
            .paths()
            .server_cert
            .parent()
            .ok_or(BenchError::BadParameter(
                "certificate path without a directory",
            ))?;
        let mut child = Command::new(bench_bin)
            .arg(SERVE_BASELINE_ARG)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(BenchError::Io)?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| std::io::BufReader::new(out).read_line(&mut line));
        match (read, line.trim().parse::<SocketAddr>()) {
            (Some(Ok(_)), Ok(addr)) => Ok(Self { child, addr }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(BenchError::BadParameter(
                    "the other-process baseline server did not report its address",
                ))
            }
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for OtherProcessServer {
    fn drop(&mut self) {
        // Closing stdin ends it; the kill (by our child's pid) covers a stuck one.
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child side of [`OtherProcessServer`]: serves the files in `certs_dir` with the
/// Sibyl transport on 127.0.0.1:0, prints the address on stdout and serves until stdin
/// reaches its end. Runs its own multi-threaded runtime, as the in-process baseline's.
pub fn serve_baseline(certs_dir: &Path) -> Result<(), BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Io)?;
    runtime.block_on(async {
        let tls = BenchTls::load(certs_dir)?;
        let server = BaselineServer::start(&tls, Transport::Sibyl)?;
        println!("{}", server.addr());
        // Blocking read of stdin on the blocking pool: returns at its end (parent gone).
        let _ = tokio::task::spawn_blocking(|| {
            std::io::copy(&mut std::io::stdin(), &mut std::io::sink())
        })
        .await;
        Ok(())
    })
}

/// Answers stream requests on `conn` until the peer closes it.
async fn serve_connection(conn: quinn::Connection) {
    while let Ok(mut request) = conn.accept_uni().await {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; REQUEST_LEN];
            if request.read_exact(&mut buf).await.is_err() {
                return;
            }
            let (total, write_size) = split_request(&buf);
            if write_size == 0 || write_size > MAX_WRITE_SIZE || total > MAX_STREAM_TOTAL {
                conn.close(VarInt::from_u32(1), b"bad stream request");
                return;
            }
            if let Err(e) = send_stream(&conn, total, write_size).await {
                tracing::debug!(error = %e, "baseline stream aborted");
            }
        });
    }
}

/// A stream request: `total` bytes in `write_size` writes (read back by [`split_request`]).
fn stream_request(total: u64, write_size: u64) -> [u8; REQUEST_LEN] {
    let mut buf = [0u8; REQUEST_LEN];
    buf[..8].copy_from_slice(&total.to_be_bytes());
    buf[8..].copy_from_slice(&write_size.to_be_bytes());
    buf
}

fn split_request(buf: &[u8; REQUEST_LEN]) -> (u64, u64) {
    let mut total = [0u8; 8];
    let mut write_size = [0u8; 8];
    total.copy_from_slice(&buf[..8]);
    write_size.copy_from_slice(&buf[8..]);
    (u64::from_be_bytes(total), u64::from_be_bytes(write_size))
}

async fn send_stream(
    conn: &quinn::Connection,
    total: u64,
    write_size: u64,
) -> Result<(), BenchError> {
    let mut send = conn.open_uni().await?;
    // Bounded by MAX_WRITE_SIZE (checked by the caller), so it fits in usize.
    let chunk = vec![0x5a_u8; usize::try_from(write_size).unwrap_or(0)];
    let mut left = total;
    while left > 0 {
        let n = left.min(write_size);
        // n <= write_size == chunk.len()
        let len = usize::try_from(n).unwrap_or(chunk.len());
        send.write_all(&chunk[..len]).await?;
        left -= n;
    }
    send.finish().map_err(|_| BenchError::StreamClosed)?;
    // Keep the stream (and thus the connection handle) until the peer has read everything.
    let _ = send.stopped().await;
    Ok(())
}

/// Bare quinn handshakes per second: `concurrency` connectors, each with its own client
/// endpoint, run fresh connections back to back (full handshakes, no resumption) against
/// `server` until `duration` has passed; each connection is closed right after the client
/// sees it established. Returns completed handshakes / wall time until the last connector
/// stopped.
pub async fn handshakes_per_s(
    tls: &BenchTls,
    server: &BaselineServer,
    transport: Transport,
    concurrency: usize,
    duration: Duration,
) -> Result<f64, BenchError> {
    connections_per_s(tls, server.addr(), transport, concurrency, duration, false).await
}

/// As [`handshakes_per_s`] against the server at `addr` (e.g. an [`OtherProcessServer`]),
/// each connection also carrying one request/response (a 1-byte stream) before it is
/// closed: the bare quinn shape of a ticket (handshake, `Hello`, `Ticket`).
pub async fn exchanges_per_s(
    tls: &BenchTls,
    addr: SocketAddr,
    transport: Transport,
    concurrency: usize,
    duration: Duration,
) -> Result<f64, BenchError> {
    connections_per_s(tls, addr, transport, concurrency, duration, true).await
}

async fn connections_per_s(
    tls: &BenchTls,
    addr: SocketAddr,
    transport: Transport,
    concurrency: usize,
    duration: Duration,
    exchange: bool,
) -> Result<f64, BenchError> {
    let concurrency = concurrency.max(1);
    let mut endpoints = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        endpoints.push(tls.client_endpoint(Resumption::Full, transport)?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for endpoint in endpoints {
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                let conn = endpoint.connect(addr, SERVER_NAME)?.await?;
                let r = match exchange {
                    true => one_byte_exchange(&conn).await,
                    false => Ok(()),
                };
                conn.close(VarInt::from_u32(0), b"done");
                r?;
                done += 1;
            }
            endpoint.close(VarInt::from_u32(0), b"done");
            Ok::<u64, BenchError>(done)
        });
    }
    let mut total = 0u64;
    while let Some(joined) = tasks.join_next().await {
        total += joined.map_err(|_| BenchError::TaskFailed)??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(total as f64 / elapsed)
}

/// Duration of one bare quinn handshake on a fresh client endpoint (new UDP socket, empty
/// session cache, so a full handshake): the clock runs from `connect()` to the client seeing
/// the connection established. The endpoint is bound before the clock starts.
pub async fn handshake_once(
    tls: &BenchTls,
    server: &BaselineServer,
    transport: Transport,
) -> Result<Duration, BenchError> {
    handshake_once_to(tls, server.addr(), transport).await
}

/// [`handshake_once`] against the server at `addr` (e.g. an [`OtherProcessServer`]).
pub async fn handshake_once_to(
    tls: &BenchTls,
    addr: SocketAddr,
    transport: Transport,
) -> Result<Duration, BenchError> {
    let endpoint = tls.client_endpoint(Resumption::Full, transport)?;
    let start = Instant::now();
    let conn = endpoint.connect(addr, SERVER_NAME)?.await?;
    let took = start.elapsed();
    conn.close(VarInt::from_u32(0), b"done");
    endpoint.close(VarInt::from_u32(0), b"done");
    Ok(took)
}

/// The path of a cold attach done with nothing but bare quinn: on one fresh client endpoint
/// (bound before the clock starts), a full handshake with `first`, then a full handshake
/// with `second`, then one request/response on the second connection (a 1-byte stream
/// request, read to its byte). Clock from the first `connect()` to that byte.
///
/// Sibyl's cold attach has the same critical path (hub handshake; the shard handshake
/// starts when the hub's is done, since only then is the shard known; `Attach` needs the
/// finished shard handshake's exporter; `Attached`), plus its own work. With `first` and
/// `second` in other processes, as the hub and the shards are, this is the floor of
/// `cold_attach_ms` on the machine.
pub async fn cold_floor_once(
    tls: &BenchTls,
    first: SocketAddr,
    second: SocketAddr,
    transport: Transport,
) -> Result<Duration, BenchError> {
    let endpoint = tls.client_endpoint(Resumption::Full, transport)?;
    let start = Instant::now();
    let a = endpoint.connect(first, SERVER_NAME)?.await?;
    let b = endpoint.connect(second, SERVER_NAME)?.await?;
    one_byte_exchange(&b).await?;
    let took = start.elapsed();
    for conn in [a, b] {
        conn.close(VarInt::from_u32(0), b"done");
    }
    endpoint.close(VarInt::from_u32(0), b"done");
    Ok(took)
}

/// One request/response on `conn`: a stream request for one byte, read to that byte (the
/// shape of `Hello` → `Ticket` and of `Attach` → `Attached`, on a bare quinn server).
async fn one_byte_exchange(conn: &quinn::Connection) -> Result<(), BenchError> {
    let mut request = conn.open_uni().await?;
    request.write_all(&stream_request(1, 1)).await?;
    request.finish().map_err(|_| BenchError::StreamClosed)?;
    let mut answer = conn.accept_uni().await?;
    let mut byte = [0u8; 1];
    answer
        .read_exact(&mut byte)
        .await
        .map_err(|_| BenchError::ShortStream {
            expected: 1,
            got: 0,
        })
}

/// Durations of `repeats` handshakes as in [`handshake_once`], after one untimed warm-up.
pub async fn handshake_durations(
    tls: &BenchTls,
    server: &BaselineServer,
    transport: Transport,
    repeats: usize,
) -> Result<Vec<Duration>, BenchError> {
    handshake_once(tls, server, transport).await?;
    let mut out = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        out.push(handshake_once(tls, server, transport).await?);
    }
    Ok(out)
}

/// Median bare quinn handshake time in milliseconds over `repeats` handshakes (see
/// [`handshake_durations`]).
pub async fn handshake_ms(
    tls: &BenchTls,
    server: &BaselineServer,
    transport: Transport,
    repeats: usize,
) -> Result<f64, BenchError> {
    let mut ms: Vec<f64> = handshake_durations(tls, server, transport, repeats.max(1))
        .await?
        .iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    Ok(super::median(&mut ms))
}

/// Bare quinn bulk transfer: a fresh connection; the client asks (on a uni stream) for
/// `total_bytes`, the server sends them on one uni stream in `write_size` writes
/// (`write_all`), the client reads to the end (`read_chunk`, zero copy). Returns bytes per
/// second from the request to the last byte read. The handshake is not timed.
pub async fn stream_bytes_per_s(
    tls: &BenchTls,
    server: &BaselineServer,
    transport: Transport,
    total_bytes: u64,
    write_size: u64,
) -> Result<f64, BenchError> {
    if write_size == 0 || write_size > MAX_WRITE_SIZE || total_bytes > MAX_STREAM_TOTAL {
        return Err(BenchError::BadParameter(
            "write size must be 1..=1 MiB and total at most 1 TiB",
        ));
    }
    let endpoint = tls.client_endpoint(Resumption::Full, transport)?;
    let conn = endpoint.connect(server.addr(), SERVER_NAME)?.await?;
    let start = Instant::now();
    let mut request = conn.open_uni().await?;
    request
        .write_all(&stream_request(total_bytes, write_size))
        .await?;
    request.finish().map_err(|_| BenchError::StreamClosed)?;
    let mut recv = conn.accept_uni().await?;
    let mut got = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        got += chunk.bytes.len() as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    conn.close(VarInt::from_u32(0), b"done");
    endpoint.close(VarInt::from_u32(0), b"done");
    if got != total_bytes {
        return Err(BenchError::ShortStream {
            expected: total_bytes,
            got,
        });
    }
    Ok(got as f64 / elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_request_round_trips() {
        let buf = stream_request(512 << 20, 16 << 10);
        assert_eq!(split_request(&buf), (512 << 20, 16 << 10));
        assert_eq!(split_request(&stream_request(1, 1)), (1, 1));
    }
}
