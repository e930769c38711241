//! The async driver: loopback UDP sockets and tokio timers around two [`Impairer`]s.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::config::{ConfigError, Direction, DirectionConfig, Impairment};
use super::impairer::{DirectionStats, Impairer, Verdict};
use super::timer::TimerQueue;

/// Largest UDP payload; receive buffers have this size so nothing is truncated.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams read from upstream sockets and not yet taken by the proxy loop.
const UPSTREAM_CHANNEL: usize = 1024;

/// Errors of the proxy (all are caller misuse or local socket failures).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetemError {
    /// The proxy only ever listens on and forwards to loopback addresses.
    #[error("{role} address {addr} is not a loopback address")]
    NotLoopback {
        /// `"listen"` or `"upstream"`.
        role: &'static str,
        /// The refused address.
        addr: SocketAddr,
    },
    /// An impairment config out of range.
    #[error("invalid impairment: {0}")]
    Config(#[from] ConfigError),
    /// A local socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The proxy task is no longer running.
    #[error("the proxy has stopped")]
    Stopped,
}

/// Counters of a running proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Client → server.
    pub up: DirectionStats,
    /// Server → client.
    pub down: DirectionStats,
    /// Client source addresses mapped so far (one upstream socket each).
    pub mappings: usize,
    /// Packets dropped because a new client address would exceed the mapping limit.
    pub refused_mappings: u64,
}

/// Builder and spawner of a proxy: listens on loopback, forwards to a loopback upstream.
///
/// Each client source address gets its own upstream socket (like a NAT mapping), so several
/// clients and QUIC connection migration work: a new source port is a new mapping. Both
/// directions are impaired by one [`Impairer`] each, shared by all mappings (one bottleneck).
#[derive(Debug, Clone)]
pub struct Proxy {
    listen: SocketAddr,
    upstream: SocketAddr,
    impairment: Impairment,
    max_mappings: usize,
}

impl Proxy {
    /// A proxy to `upstream`, listening on `127.0.0.1:0`, impairing nothing, with at most 1024
    /// mappings.
    pub fn new(upstream: SocketAddr) -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            upstream,
            impairment: Impairment::default(),
            max_mappings: 1024,
        }
    }

    /// The address to listen on (must be loopback; port 0 picks one). Default `127.0.0.1:0`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The impairment of both directions and the seed. Default: none.
    pub fn impairment(mut self, impairment: Impairment) -> Self {
        self.impairment = impairment;
        self
    }

    /// Most client source addresses mapped at once; packets from further addresses are dropped
    /// and counted in [`ProxyStats::refused_mappings`]. Default 1024.
    pub fn max_mappings(mut self, max: usize) -> Self {
        self.max_mappings = max;
        self
    }

    /// Binds the listen socket and starts the proxy task on the current tokio runtime.
    ///
    /// Fails if either address is not loopback, the impairment is invalid or binding fails.
    pub async fn spawn(self) -> Result<ProxyHandle, NetemError> {
        check_loopback("listen", self.listen)?;
        check_loopback("upstream", self.upstream)?;
        self.impairment.validate()?;
        let listen = UdpSocket::bind(self.listen)
            .await
            .map_err(|source| NetemError::Io {
                context: "binding the listen socket",
                source,
            })?;
        let local_addr = listen.local_addr().map_err(|source| NetemError::Io {
            context: "reading the listen address",
            source,
        })?;
        let start = tokio::time::Instant::now().into_std();
        let seed = self.impairment.seed;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (up_tx, up_rx) = mpsc::channel(UPSTREAM_CHANNEL);
        let stats = Arc::new(Mutex::new(ProxyStats::default()));
        let driver = Driver {
            listen,
            upstream: self.upstream,
            max_mappings: self.max_mappings,
            up: Impairer::new(self.impairment.up, Direction::Up.seed(seed), start),
            down: Impairer::new(self.impairment.down, Direction::Down.seed(seed), start),
            queue: TimerQueue::new(),
            by_client: HashMap::new(),
            mappings: Vec::new(),
            readers: JoinSet::new(),
            from_upstream_tx: up_tx,
            sent: Counters::default(),
            refused_mappings: 0,
            shared: Arc::clone(&stats),
        };
        let task = tokio::spawn(driver.run(cmd_rx, up_rx));
        tracing::debug!(%local_addr, upstream = %self.upstream, "netem proxy started");
        Ok(ProxyHandle {
            local_addr,
            upstream: self.upstream,
            cmds: cmd_tx,
            stats,
            task,
        })
    }
}

/// Starts one proxy per upstream, each on `127.0.0.1:0`, in the order given.
///
/// Proxy `i` is seeded with `impairment.seed + i` (wrapping), so proxies differ from each other
/// but a run repeats.
pub async fn spawn_many(
    upstreams: &[SocketAddr],
    impairment: &Impairment,
) -> Result<Vec<ProxyHandle>, NetemError> {
    let mut handles = Vec::with_capacity(upstreams.len());
    for (i, &upstream) in upstreams.iter().enumerate() {
        let mut imp = impairment.clone();
        imp.seed = imp.seed.wrapping_add(i as u64);
        handles.push(Proxy::new(upstream).impairment(imp).spawn().await?);
    }
    Ok(handles)
}

fn check_loopback(role: &'static str, addr: SocketAddr) -> Result<(), NetemError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(NetemError::NotLoopback { role, addr })
    }
}

/// Control of a running proxy. Dropping it stops the proxy.
#[derive(Debug)]
pub struct ProxyHandle {
    local_addr: SocketAddr,
    upstream: SocketAddr,
    cmds: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<ProxyStats>>,
    task: JoinHandle<()>,
}

impl ProxyHandle {
    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address packets are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Drops every packet in both directions while on (on top of configured windows). Takes
    /// effect before any packet the proxy reads after this call returns.
    pub fn set_blackhole(&self, on: bool) {
        // A stopped proxy has nothing to blackhole.
        let _ = self.cmds.send(Command::Blackhole(on));
    }

    /// Replaces both directions' configs, keeping RNG, burst state and queued packets.
    pub fn update(&self, up: DirectionConfig, down: DirectionConfig) -> Result<(), NetemError> {
        up.validate()?;
        down.validate()?;
        self.cmds
            .send(Command::Update(Box::new((up, down))))
            .map_err(|_| NetemError::Stopped)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ProxyStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the proxy and waits for its task to end; packets still delayed are discarded.
    pub async fn shutdown(self) {
        let _ = self.cmds.send(Command::Shutdown);
        let _ = self.task.await;
    }
}

#[derive(Debug)]
enum Command {
    Blackhole(bool),
    /// Boxed: two configs would make every command (and event) large.
    Update(Box<(DirectionConfig, DirectionConfig)>),
    Shutdown,
}

enum Outbound {
    /// To upstream, through mapping `id`'s socket.
    Up { id: usize, packet: Vec<u8> },
    /// To the client at `client`, from the listen socket.
    Down { client: SocketAddr, packet: Vec<u8> },
}

enum Event {
    Command(Option<Command>),
    Timer,
    FromClient(io::Result<(usize, SocketAddr)>),
    FromUpstream(Option<(usize, Vec<u8>)>),
}

struct Mapping {
    client: SocketAddr,
    socket: Arc<UdpSocket>,
}

#[derive(Default)]
struct Counters {
    up_sent: u64,
    up_errors: u64,
    down_sent: u64,
    down_errors: u64,
}

struct Driver {
    listen: UdpSocket,
    upstream: SocketAddr,
    max_mappings: usize,
    up: Impairer,
    down: Impairer,
    queue: TimerQueue<Outbound>,
    by_client: HashMap<SocketAddr, usize>,
    mappings: Vec<Mapping>,
    /// One reader per mapping; aborted when the driver ends.
    readers: JoinSet<()>,
    from_upstream_tx: mpsc::Sender<(usize, Vec<u8>)>,
    sent: Counters,
    refused_mappings: u64,
    shared: Arc<Mutex<ProxyStats>>,
}

impl Driver {
    async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<Command>,
        mut from_upstream: mpsc::Receiver<(usize, Vec<u8>)>,
    ) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let deadline = self.queue.poll_timeout();
            let event = tokio::select! {
                biased;
                cmd = cmds.recv() => Event::Command(cmd),
                () = sleep_until(deadline) => Event::Timer,
                r = self.listen.recv_from(&mut buf) => Event::FromClient(r),
                p = from_upstream.recv() => Event::FromUpstream(p),
            };
            let now = tokio::time::Instant::now().into_std();
            match event {
                Event::Command(None | Some(Command::Shutdown)) => break,
                Event::Command(Some(Command::Blackhole(on))) => {
                    self.up.set_blackhole(on);
                    self.down.set_blackhole(on);
                }
                Event::Command(Some(Command::Update(configs))) => {
                    let (up, down) = *configs;
                    self.up.set_config(up);
                    self.down.set_config(down);
                }
                Event::Timer => {}
                Event::FromClient(Ok((n, client))) => {
                    let packet = buf[..n].to_vec();
                    self.on_client_packet(now, client, packet).await;
                }
                Event::FromClient(Err(e)) => {
                    tracing::debug!(error = %e, "netem: receive on the listen socket failed");
                }
                Event::FromUpstream(Some((id, packet))) => self.on_upstream_packet(now, id, packet),
                // The driver holds a sender, so the channel never closes while it runs.
                Event::FromUpstream(None) => break,
            }
            self.flush(now).await;
            self.publish();
        }
        tracing::debug!(listen = ?self.listen.local_addr().ok(), "netem proxy stopped");
    }

    async fn on_client_packet(&mut self, now: Instant, client: SocketAddr, packet: Vec<u8>) {
        let id = match self.by_client.get(&client) {
            Some(&id) => id,
            None => match self.new_mapping(client).await {
                Some(id) => id,
                None => return,
            },
        };
        if let Verdict::Emit(copies) = self.up.handle(now, packet) {
            for c in copies {
                self.queue.push(
                    c.at,
                    Outbound::Up {
                        id,
                        packet: c.packet,
                    },
                );
            }
        }
    }

    fn on_upstream_packet(&mut self, now: Instant, id: usize, packet: Vec<u8>) {
        let Some(client) = self.mappings.get(id).map(|m| m.client) else {
            return;
        };
        if let Verdict::Emit(copies) = self.down.handle(now, packet) {
            for c in copies {
                self.queue.push(
                    c.at,
                    Outbound::Down {
                        client,
                        packet: c.packet,
                    },
                );
            }
        }
    }

    async fn new_mapping(&mut self, client: SocketAddr) -> Option<usize> {
        if self.mappings.len() >= self.max_mappings {
            self.refused_mappings += 1;
            return None;
        }
        let bind: SocketAddr = if self.upstream.is_ipv4() {
            (Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (Ipv6Addr::LOCALHOST, 0).into()
        };
        let socket = match UdpSocket::bind(bind).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, %client, "netem: cannot bind an upstream socket");
                self.refused_mappings += 1;
                return None;
            }
        };
        if let Err(e) = socket.connect(self.upstream).await {
            tracing::warn!(error = %e, %client, "netem: cannot connect an upstream socket");
            self.refused_mappings += 1;
            return None;
        }
        let socket = Arc::new(socket);
        let id = self.mappings.len();
        tracing::debug!(%client, upstream_port = ?socket.local_addr().ok(), "netem: new mapping");
        self.readers.spawn(read_upstream(
            id,
            Arc::clone(&socket),
            self.from_upstream_tx.clone(),
        ));
        self.mappings.push(Mapping { client, socket });
        self.by_client.insert(client, id);
        Some(id)
    }

    async fn flush(&mut self, now: Instant) {
        while let Some(out) = self.queue.pop_expired(now) {
            match out {
                Outbound::Up { id, packet } => {
                    // `id` indexes `mappings`, which only grows.
                    let Some(m) = self.mappings.get(id) else {
                        continue;
                    };
                    match m.socket.send(&packet).await {
                        Ok(_) => self.sent.up_sent += 1,
                        Err(e) => {
                            tracing::trace!(error = %e, "netem: send upstream failed");
                            self.sent.up_errors += 1;
                        }
                    }
                }
                Outbound::Down { client, packet } => {
                    match self.listen.send_to(&packet, client).await {
                        Ok(_) => self.sent.down_sent += 1,
                        Err(e) => {
                            tracing::trace!(error = %e, %client, "netem: send to client failed");
                            self.sent.down_errors += 1;
                        }
                    }
                }
            }
        }
    }

    fn publish(&self) {
        let mut up = self.up.stats();
        up.sent = self.sent.up_sent;
        up.send_errors = self.sent.up_errors;
        let mut down = self.down.stats();
        down.sent = self.sent.down_sent;
        down.send_errors = self.sent.down_errors;
        let snapshot = ProxyStats {
            up,
            down,
            mappings: self.mappings.len(),
            refused_mappings: self.refused_mappings,
        };
        *self.shared.lock().unwrap_or_else(PoisonError::into_inner) = snapshot;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// Reads one mapping's upstream socket into the proxy loop until the loop goes away.
async fn read_upstream(id: usize, socket: Arc<UdpSocket>, tx: mpsc::Sender<(usize, Vec<u8>)>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv(&mut buf).await {
            Ok(n) => {
                if tx.send((id, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
            // An ICMP port unreachable from an upstream that is not listening (yet): reported
            // once per ICMP message, so going on cannot spin.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                tracing::debug!(error = %e, id, "netem: upstream socket failed; mapping is mute");
                return;
            }
        }
    }
}
