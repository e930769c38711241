//! The Sibyl half of `admission` and `attach` against a real `sibyl-gateway` process.
//!
//! ```text
//!  GatewayProcess::start ── sibyl_gateway::launch: sibyl-gateway --listen 127.0.0.1:0 --data-dir <tmp>/data
//!     │   (<tmp>/data/certs pre-filled with the BenchTls files: same CA + leaf as the baseline)
//!     ├─ stdout banner: "hub address: …", "dev API key: …"
//!     ├─ stderr log:    "shard ready group=… shard=… pid=… addr=…" × every shard
//!     └─ Drop: SIGTERM by pid, bounded wait, then SIGKILL by pid
//!
//!  GatewayHalf (SibylHalf)
//!     ├─ tickets_per_s: N connectors × (fresh quinn connection, Hello ─▶ ◀─ Ticket, close)
//!     ├─ cold_attach:   fresh sibyl_sdk::Client: build() (timed apart), connect() ─▶ attached
//!     └─ warm_attach:   one long-lived Client, reconnect() with its cached ticket ─▶ attached
//! ```
//!
//! The gateway binary is found through `SIBYL_GATEWAY_BIN`, else next to the running
//! executable (or its parent, for test binaries in `deps/`); build it first with
//! `cargo build --release -p sibyl-gateway`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quinn::VarInt;
use sibyl_gateway::launch::{self, Launch, LaunchError, ShardReady};
use sibyl_proto::frame::{Action, Hello, Profile, Want};
use sibyl_proto::{Codec, Frame, FrameDecoder, SUPPORTED_VERSIONS};

use super::quic::{BenchTls, Resumption, SERVER_NAME, Transport};
use super::{BenchError, ColdSample, SibylHalf};

/// Environment variable naming the `sibyl-gateway` binary to benchmark.
pub const GATEWAY_BIN_ENV: &str = "SIBYL_GATEWAY_BIN";

/// How long the gateway gets to print its banner and report every shard ready.
pub const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// How long the gateway gets to drain and exit after SIGTERM before it is killed.
const STOP_PATIENCE: Duration = Duration::from_secs(15);

/// The stream every benchmark client announces it will subscribe to.
pub const BENCH_STREAM: &str = "bench";

/// Why the gateway half could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// No gateway binary where it was looked for.
    #[error(
        "sibyl-gateway binary not found (looked at: {}); run `cargo build --release -p sibyl-gateway` first, or set {GATEWAY_BIN_ENV}",
        .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    BinaryNotFound {
        /// The paths tried.
        searched: Vec<PathBuf>,
    },
    /// Starting the process or preparing its data dir failed.
    #[error("starting sibyl-gateway: {0}")]
    Spawn(#[source] std::io::Error),
    /// The gateway did not print its banner or report its shards in time, or exited.
    #[error("sibyl-gateway did not come up ({what}); output so far:\n{log}")]
    Startup {
        /// What was awaited.
        what: &'static str,
        /// The gateway's output lines seen so far.
        log: String,
    },
    /// The hub answered a `Hello` with `Refused`, or something other than a ticket.
    #[error("hub did not issue a ticket: {0}")]
    NoTicket(String),
}

impl From<GatewayError> for BenchError {
    fn from(e: GatewayError) -> Self {
        BenchError::Sibyl(Box::new(e))
    }
}

/// Where the `sibyl-gateway` binary is: `$SIBYL_GATEWAY_BIN`, else next to the running
/// executable, else in its parent directory (test binaries live in `target/<profile>/deps/`).
pub fn gateway_binary() -> Result<PathBuf, GatewayError> {
    if let Some(p) = std::env::var_os(GATEWAY_BIN_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(GatewayError::BinaryNotFound { searched: vec![p] })
        };
    }
    let mut searched = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        searched.push(dir.join("sibyl-gateway"));
        if let Some(parent) = dir.parent() {
            searched.push(parent.join("sibyl-gateway"));
        }
    }
    searched
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(GatewayError::BinaryNotFound { searched })
}

/// A running `sibyl-gateway` (hub and its shard processes) on a temporary data dir, started
/// through the shared launcher and stopped by pid when dropped (SIGTERM, SIGKILL after 15 s).
#[derive(Debug)]
pub struct GatewayProcess {
    process: launch::GatewayProcess,
    dev_key: String,
    ca: PathBuf,
    shards: Vec<ShardReady>,
}

impl GatewayProcess {
    /// Starts the gateway with `config_toml` (TOML; empty for the defaults) on
    /// `--listen 127.0.0.1:0` and a fresh data dir, serving `certs` (copied into
    /// `<data>/certs`, so hub and shards present exactly that CA and leaf; `None` lets the
    /// gateway create its own), and waits for the banner and `shards` shards ready.
    /// Blocking (reads the process output with a bound of [`STARTUP_PATIENCE`]).
    pub fn start(
        config_toml: &str,
        shards: usize,
        certs: Option<&sibyl_certs::CertPaths>,
    ) -> Result<Self, GatewayError> {
        let mut launch = Launch::new(gateway_binary()?)
            .temp_prefix("sibyl-bench-gateway")
            .config(config_toml)
            .args(["--log", "info"])
            .shards(shards)
            .patience(STARTUP_PATIENCE)
            .stop_grace(STOP_PATIENCE);
        if let Some(c) = certs {
            launch = launch.certs(c.clone());
        }
        let process = launch.start().map_err(|e| match e {
            LaunchError::Io { source, .. } => GatewayError::Spawn(source),
            LaunchError::Startup { what, tail } => GatewayError::Startup {
                what,
                log: tail.join("\n"),
            },
            other => GatewayError::Spawn(std::io::Error::other(other)),
        })?;
        let dev_key = process
            .dev_key()
            .ok_or_else(|| GatewayError::Startup {
                what: "the dev API key",
                log: process.log_tail(launch::LOG_TAIL).join("\n"),
            })?
            .to_owned();
        Ok(Self {
            shards: process.ready(),
            dev_key,
            ca: process.ca_file(),
            process,
        })
    }

    /// The hub's QUIC address.
    pub fn hub(&self) -> SocketAddr {
        self.process.hub()
    }

    /// The development API key the gateway printed (scope `*:subscribe,publish`).
    pub fn dev_key(&self) -> &str {
        &self.dev_key
    }

    /// The CA certificate clients trust (`<data>/certs/ca.pem`).
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// The shards reported ready during start.
    pub fn shards(&self) -> &[ShardReady] {
        &self.shards
    }

    /// The temporary directory holding the data dir and the config file.
    pub fn dir(&self) -> &Path {
        self.process.dir()
    }

    /// The hub's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// The Sibyl half of `admission` and `attach`: a real gateway serving the baseline's
/// certificate files, raw quinn + sibyl-proto clients for tickets, and the SDK for attach.
pub struct GatewayHalf {
    /// The warm-attach client (kept attached between samples); dropped before the gateway.
    warm: Option<sibyl_sdk::Client>,
    /// Client config of the ticket connectors: the baseline's (full handshakes, same
    /// transport).
    ticket_config: quinn::ClientConfig,
    gateway: GatewayProcess,
}

impl std::fmt::Debug for GatewayHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayHalf")
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

impl GatewayHalf {
    /// Starts a gateway with the default layout (two groups of two shards) serving `tls`'s
    /// files. Runs the blocking start on tokio's blocking pool.
    pub async fn start(tls: &BenchTls) -> Result<Self, BenchError> {
        let certs = tls.paths().clone();
        let gateway =
            tokio::task::spawn_blocking(move || GatewayProcess::start("", 4, Some(&certs)))
                .await
                .map_err(|_| BenchError::TaskFailed)??;
        Ok(Self {
            warm: None,
            ticket_config: tls.quinn_client_config(Resumption::Full, Transport::Sibyl)?,
            gateway,
        })
    }

    /// The running gateway.
    pub fn gateway(&self) -> &GatewayProcess {
        &self.gateway
    }

    fn builder(&self) -> sibyl_sdk::ClientBuilder {
        sibyl_sdk::Client::builder()
            .hub(self.gateway.hub())
            .trust(sibyl_sdk::Trust::CaFile(self.gateway.ca().to_owned()))
            .api_key(self.gateway.dev_key())
            .want_subscribe(BENCH_STREAM)
    }
}

fn sdk_err(e: sibyl_sdk::ConnectError) -> BenchError {
    BenchError::Sibyl(Box::new(e))
}

/// One `Hello` → `Ticket` exchange on an established hub connection.
async fn ask_ticket(conn: &quinn::Connection, hello: &Hello) -> Result<(), BenchError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut buf = Vec::with_capacity(256);
    Frame::Hello(hello.clone()).encode(&mut buf);
    send.write_all(&buf).await?;
    send.finish().map_err(|_| BenchError::StreamClosed)?;
    let mut dec = FrameDecoder::default();
    loop {
        match dec.next_frame() {
            Ok(Some(Frame::Ticket(_))) => return Ok(()),
            Ok(Some(other)) => {
                return Err(GatewayError::NoTicket(format!("{other:?}")).into());
            }
            Ok(None) => {}
            Err(e) => return Err(GatewayError::NoTicket(e.to_string()).into()),
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => dec.push(&chunk.bytes),
            None => return Err(GatewayError::NoTicket("stream ended".into()).into()),
        }
    }
}

impl SibylHalf for GatewayHalf {
    async fn tickets_per_s(
        &mut self,
        concurrency: usize,
        duration: Duration,
    ) -> Result<f64, BenchError> {
        let concurrency = concurrency.max(1);
        let mut endpoints = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            let mut ep = quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .map_err(BenchError::Io)?;
            ep.set_default_client_config(self.ticket_config.clone());
            endpoints.push(ep);
        }
        let addr = self.gateway.hub();
        let start = Instant::now();
        let deadline = start + duration;
        let mut tasks = tokio::task::JoinSet::new();
        for (i, endpoint) in endpoints.into_iter().enumerate() {
            let hello = Hello {
                client_id: format!("bench-{i}"),
                api_key: self.gateway.dev_key().to_owned(),
                profile: Profile::default(),
                wants: vec![Want {
                    stream: BENCH_STREAM.into(),
                    action: Action::Subscribe,
                }],
                versions: SUPPORTED_VERSIONS.to_vec(),
            };
            tasks.spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let conn = endpoint.connect(addr, SERVER_NAME)?.await?;
                    let r = ask_ticket(&conn, &hello).await;
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
        Ok(total as f64 / start.elapsed().as_secs_f64())
    }

    async fn cold_attach(&mut self) -> Result<ColdSample, BenchError> {
        let builder = self.builder();
        let start = Instant::now();
        let connector = builder.build().map_err(sdk_err)?;
        let build = start.elapsed();
        let start = Instant::now();
        let client = connector.connect().await.map_err(sdk_err)?;
        let connect = start.elapsed();
        client.close().await;
        Ok(ColdSample::new(build, connect))
    }

    async fn warm_attach(&mut self) -> Result<Duration, BenchError> {
        let client = match self.warm.take() {
            Some(c) => c,
            None => self.builder().connect().await.map_err(sdk_err)?,
        };
        let start = Instant::now();
        let r = client.reconnect().await;
        let took = start.elapsed();
        self.warm = Some(client);
        r.map_err(sdk_err)?;
        Ok(took)
    }
}
