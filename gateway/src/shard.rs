//! The shard process ("streamlet") runtime: what `sibyl-gateway shard --ipc-fd N` runs
//! after it received [`ShardInit`] and applied its rlimits.
//!
//! ```text
//! hub ──Init──▶ main (limits) ──▶ run_shard ── bind UDP ──Ready{port}──▶ hub
//!                                    │  every heartbeat_interval ──Heartbeat{load}──▶ hub
//!                                    │  Drain / SIGTERM ──Draining … Exiting──▶ hub, return
//!                                    └─ control channel closed (hub gone) ──▶ return
//! ```
//!
//! QUIC seam: [`ShardRuntime::socket`] is the bound `std::net::UdpSocket` to hand to
//! `quinn::Endpoint::new`; [`ShardRuntime::stats`] is what the QUIC layer updates (it is
//! reported in heartbeats); [`ShardRuntime::keyring`] holds the current keyring bytes (kept
//! up to date on `KeyringUpdate`); the drain hook is where GoAway to clients goes.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sibyl_proto::Backoff;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::ipc::{HubToShard, IpcError, Load, ShardInit, ShardIpc, ShardToHub};
use crate::session::{DataPlane, SessionError, SessionServer};
pub use crate::shard_stats::ShardStats;
use crate::storelink::{CacheConfig, CachedReader, ReaderConfig, StoreLink};

/// Why a shard stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The UDP socket could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// The control channel failed or carried garbage.
    #[error("control channel: {0}")]
    Ipc(#[from] IpcError),
    /// The hub sent a message that is not valid at this point (hub misbehaviour).
    #[error("unexpected control message: {0}")]
    Unexpected(&'static str),
    /// Signal handler installation failed.
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    /// The QUIC session endpoint could not start.
    #[error("session endpoint: {0}")]
    Session(#[from] SessionError),
}

/// How a shard ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardExit {
    /// The hub asked it to drain.
    Drained,
    /// SIGTERM.
    Terminated,
    /// The control channel closed: the hub is gone.
    HubGone,
}

/// The heartbeat's load figures: `stats` and this process's resident memory.
fn load(stats: &ShardStats) -> Load {
    Load {
        connections: stats.connections.load(Ordering::Relaxed),
        subscriptions: stats.subscriptions.load(Ordering::Relaxed),
        rss_bytes: crate::limits::rss_bytes(),
    }
}

/// A started shard: its init, bound socket and shared state.
#[derive(Debug)]
pub struct ShardRuntime {
    /// What the hub sent.
    pub init: ShardInit,
    /// The bound UDP socket (to hand to quinn).
    pub socket: UdpSocket,
    /// Counters reported in heartbeats.
    pub stats: Arc<ShardStats>,
    /// Current keyring bytes (`sibyl_tokens::Keyring::from_bytes` input).
    pub keyring: Arc<RwLock<Vec<u8>>>,
}

impl ShardRuntime {
    /// Binds the shard's UDP socket on `init.bind_ip`, port `init.bind_port` (0: a free
    /// port). A fixed port is bound again as is on restart: the supervisor only restarts a
    /// shard after its previous process exited, which released the port.
    pub fn bind(init: ShardInit) -> Result<Self, ShardError> {
        let addr = SocketAddr::new(init.bind_ip, init.bind_port);
        let socket = UdpSocket::bind(addr).map_err(|source| ShardError::Bind { addr, source })?;
        let keyring = Arc::new(RwLock::new(init.keyring.clone()));
        Ok(Self {
            init,
            socket,
            stats: Arc::default(),
            keyring,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

/// Runs a shard until drained, terminated or orphaned. See the module docs.
pub async fn run_shard(init: ShardInit, ipc: ShardIpc) -> Result<ShardExit, ShardError> {
    let rt = ShardRuntime::bind(init)?;
    run(rt, ipc).await
}

async fn run(rt: ShardRuntime, mut ipc: ShardIpc) -> Result<ShardExit, ShardError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(ShardError::Signal)?;
    let addr = rt.local_addr().map_err(|source| ShardError::Bind {
        addr: SocketAddr::new(rt.init.bind_ip, rt.init.bind_port),
        source,
    })?;
    // QUIC seam: the session endpoint takes the bound socket.
    let keyring = rt.keyring.read().unwrap_or_else(|p| p.into_inner()).clone();
    let data = connect_data_plane(&rt.init).await;
    let server = SessionServer::start(&rt.init, rt.socket, rt.stats.clone(), &keyring, data)?;
    ipc.send(&ShardToHub::Ready {
        udp_port: addr.port(),
    })
    .await?;
    info!(group = rt.init.group, shard = rt.init.shard, %addr, "shard listening");
    let mut beat = tokio::time::interval(rt.init.heartbeat_interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    loop {
        tokio::select! {
            _ = beat.tick() => {
                ipc.send(&ShardToHub::Heartbeat(load(&rt.stats))).await?;
                if rt.init.metrics { ipc.send(&crate::obs::shard_report()).await? }
            }
            msg = ipc.recv() => match msg? {
                Some(HubToShard::Drain { within }) => {
                    drain(&rt.init, server, &mut ipc, within).await?;
                    ipc.send(&ShardToHub::Exiting { reason: "drained".into() }).await?;
                    return Ok(ShardExit::Drained);
                }
                Some(HubToShard::KeyringUpdate { keyring }) => {
                    info!(group = rt.init.group, shard = rt.init.shard, "keyring updated");
                    // QUIC seam: the session endpoint opens tokens with the new keyring.
                    if let Err(e) = server.update_keyring(&keyring) {
                        warn!(group = rt.init.group, shard = rt.init.shard, "keyring update refused: {e}");
                    }
                    *rt.keyring.write().unwrap_or_else(|p| p.into_inner()) = keyring;
                }
                Some(HubToShard::Init(_)) => return Err(ShardError::Unexpected("second Init")),
                None => {
                    warn!(group = rt.init.group, shard = rt.init.shard, "hub gone; exiting");
                    return Ok(ShardExit::HubGone);
                }
            },
            _ = sigterm.recv() => {
                drain(&rt.init, server, &mut ipc, Duration::from_secs(10)).await?;
                let _ = ipc.send(&ShardToHub::Exiting { reason: "SIGTERM".into() }).await;
                return Ok(ShardExit::Terminated);
            }
        }
    }
}

/// Attempts to connect the store link at start-up (about 3 s in all with
/// [`STORE_LINK_CONNECT_BACKOFF`]).
const STORE_LINK_CONNECT_ATTEMPTS: u32 = 10;
/// Waits between start-up attempts to connect the store link: 20 ms doubling to 500 ms, no
/// jitter (one link per shard process).
const STORE_LINK_CONNECT_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(20), Duration::from_millis(500));

/// Connects the store link (a few attempts: the hub binds it before it spawns shards) and
/// builds the data plane; `None` (subscriptions refused) without a socket or a link.
async fn connect_data_plane(init: &ShardInit) -> Option<Arc<DataPlane>> {
    let path = init.store_socket.as_ref()?;
    for retry in 0..STORE_LINK_CONNECT_ATTEMPTS {
        match StoreLink::connect(path).await {
            Ok(link) => {
                let sc = &init.subscribe;
                let cache = CacheConfig {
                    partition_bytes: (4 << 20).min(sc.cache_bytes),
                    total_bytes: sc.cache_bytes,
                };
                let rc = ReaderConfig {
                    fetch_records: sc.batch_records,
                    fetch_bytes: sc.batch_bytes,
                    ..ReaderConfig::default()
                };
                return Some(DataPlane::new(
                    CachedReader::new(link, cache, rc),
                    sc.clone(),
                ));
            }
            Err(e) => {
                warn!(group = init.group, shard = init.shard, error = %e, "store link not ready");
                tokio::time::sleep(STORE_LINK_CONNECT_BACKOFF.ceiling(retry)).await;
            }
        }
    }
    warn!(
        group = init.group,
        shard = init.shard,
        "no store link: subscriptions are refused"
    );
    None
}

/// Stops accepting and tells clients to go away, within `within`.
async fn drain(
    init: &ShardInit,
    server: SessionServer,
    ipc: &mut ShardIpc,
    within: Duration,
) -> Result<(), ShardError> {
    ipc.send(&ShardToHub::Draining).await?;
    info!(
        group = init.group,
        shard = init.shard,
        within_ms = within.as_millis() as u64,
        connections = server.live_connections(),
        "draining"
    );
    // QUIC seam: GoAway to every session, then wait (bounded by `within`) for them to close.
    server.drain(within).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ShardLimits;
    use crate::ipc::HubIpc;

    /// A shard init with real dev certificates and keyring in a temporary directory (kept
    /// alive by the returned guard).
    fn init() -> (ShardInit, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let paths = sibyl_certs::init_dir(&dir.path().join("certs"), &Default::default()).unwrap();
        let init = ShardInit {
            shard: 0,
            group: 0,
            generation: 1,
            bind_ip: "127.0.0.1".parse().unwrap(),
            bind_port: 0,
            heartbeat_interval: Duration::from_millis(20),
            limits: ShardLimits::default(),
            token_lifetime: Duration::from_secs(60),
            token_clock_skew: Duration::from_secs(1),
            log_filter: "info".into(),
            keyring: sibyl_tokens::Keyring::generate().unwrap().to_bytes(),
            ca_cert: paths.ca_cert,
            cert: paths.server_cert,
            key: paths.server_key,
            connection: crate::config::ConnectionConfig::default(),
            deployment_id: "test".into(),
            store_socket: None,
            subscribe: crate::config::SubscribeConfig::default(),
            log_format: crate::config::LogFormat::Text,
            metrics: true,
        };
        (init, dir)
    }

    fn pair() -> (HubIpc, ShardIpc) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (HubIpc::from_std(a).unwrap(), ShardIpc::from_std(b).unwrap())
    }

    #[tokio::test]
    async fn ready_heartbeat_then_drain() {
        let (mut hub, shard) = pair();
        let (init, _dir) = init();
        let task = tokio::spawn(run_shard(init, shard));
        let Some(ShardToHub::Ready { udp_port }) = hub.recv().await.unwrap() else {
            panic!()
        };
        assert_ne!(udp_port, 0);
        let Some(ShardToHub::Heartbeat(load)) = hub.recv().await.unwrap() else {
            panic!()
        };
        assert_eq!(load.connections, 0);
        assert!(load.rss_bytes > 0);
        hub.send(&HubToShard::Drain {
            within: Duration::from_secs(1),
        })
        .await
        .unwrap();
        let mut seen = vec![];
        while let Some(m) = hub.recv().await.unwrap() {
            if !matches!(m, ShardToHub::Heartbeat(_) | ShardToHub::Metrics(_)) {
                seen.push(m);
            }
        }
        assert_eq!(
            seen,
            vec![
                ShardToHub::Draining,
                ShardToHub::Exiting {
                    reason: "drained".into()
                }
            ]
        );
        assert_eq!(task.await.unwrap().unwrap(), ShardExit::Drained);
    }

    #[tokio::test]
    async fn exits_when_the_hub_goes_away() {
        let (hub, shard) = pair();
        let (init, _dir) = init();
        let task = tokio::spawn(run_shard(init, shard));
        drop(hub);
        // Either Ready fails to send (broken pipe) or the recv sees EOF: both end the shard.
        let r = task.await.unwrap();
        assert!(
            matches!(r, Ok(ShardExit::HubGone) | Err(ShardError::Ipc(_))),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn second_init_is_refused() {
        let (mut hub, shard) = pair();
        let (first, _dir) = init();
        let second = first.clone();
        let task = tokio::spawn(run_shard(first, shard));
        hub.send(&HubToShard::Init(Box::new(second))).await.unwrap();
        assert!(matches!(
            task.await.unwrap(),
            Err(ShardError::Unexpected(_))
        ));
    }
}
