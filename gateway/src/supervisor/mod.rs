//! Shard-process supervision: the I/O-free [`SupervisorPolicy`] and its thin tokio driver,
//! [`Supervisor`].
//!
//! ```text
//! Supervisor (handle) ──commands──▶ driver task ──Spawn/Kill/SendDrain──▶ child processes
//!        │  ready_shards(), pick_least_connections()         ▲ Ready/Heartbeat/exit events
//!        └──────────── Arc<Mutex<SupervisorPolicy>> ◀────────┘
//! ```
//!
//! Each shard is `current_exe() shard --ipc-fd N` in its own process group (so a terminal
//! Ctrl-C reaches only the hub, which drains the shards), with the control socket as fd N.
//! A shard exits when its control socket closes, so the hub never leaves orphans, even when
//! it is SIGKILLed.

mod policy;

pub use policy::{
    Action, DeathCause, ShardId, ShardInfo, ShardState, SupervisorPolicy, Transition, backoff,
};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{Config, ShardLimits};
use crate::ipc::{HubIpc, HubToShard, ShardInit, ShardToHub};
use crate::limits::Cgroups;

/// Everything the driver needs to start shards.
#[derive(Clone)]
pub struct SupervisorOptions {
    /// The binary to run (`std::env::current_exe()`).
    pub exe: PathBuf,
    /// Gateway configuration (groups, limits, supervision and token settings).
    pub config: Config,
    /// Token keyring bytes sent to every shard in `Init`.
    pub keyring: Vec<u8>,
    /// CA certificate path.
    pub ca_cert: PathBuf,
    /// Server certificate path.
    pub cert: PathBuf,
    /// Server key path.
    pub key: PathBuf,
}

impl std::fmt::Debug for SupervisorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorOptions")
            .field("exe", &self.exe)
            .finish_non_exhaustive()
    }
}

enum Command {
    Drain,
    KeyringUpdate(Vec<u8>),
}

enum Event {
    Msg {
        shard: ShardId,
        generation: u64,
        msg: ShardToHub,
    },
    Exited {
        shard: ShardId,
        generation: u64,
        pid: u32,
        status: String,
    },
}

struct Child {
    generation: u64,
    tx: mpsc::UnboundedSender<HubToShard>,
    kill: Option<oneshot::Sender<()>>,
}

/// Hub-side handle on the running shards. Cheap queries lock the policy briefly.
#[derive(Debug)]
pub struct Supervisor {
    policy: Arc<Mutex<SupervisorPolicy>>,
    cmd: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervisor {
    /// Starts the driver task, which spawns every configured shard. Must be called inside a
    /// tokio runtime.
    pub fn start(opts: SupervisorOptions) -> Self {
        let now = Instant::now().into_std();
        let policy = Arc::new(Mutex::new(SupervisorPolicy::new(
            opts.config.supervision.clone(),
            &opts.config.shards,
            now,
        )));
        let (cmd, cmd_rx) = mpsc::unbounded_channel();
        let driver = Driver {
            policy: policy.clone(),
            children: HashMap::new(),
            cgroups: Cgroups::probe(),
            limits: opts
                .config
                .shards
                .groups
                .iter()
                .map(|g| (g.id, g.limits.clone()))
                .collect(),
            bind_ip: opts.config.hub.listen.ip(),
            opts,
        };
        let task = tokio::spawn(driver.run(cmd_rx));
        Self { policy, cmd, task }
    }

    fn lock(&self) -> MutexGuard<'_, SupervisorPolicy> {
        // A poisoned lock means a panic in the policy; its state is still the last one
        // written, which is the best information there is.
        self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready shards of `group` (never a shard that is starting, draining or dead).
    pub fn ready_shards(&self, group: u32) -> Vec<ShardInfo> {
        self.lock().ready_shards(group)
    }

    /// Ready shards of `group`, fewest connections first: the ticket's endpoint list.
    pub fn by_least_connections(&self, group: u32) -> Vec<ShardInfo> {
        self.lock().by_least_connections(group)
    }

    /// Every slot with its generation, state and restart count (admin API).
    pub fn slots(&self) -> Vec<(ShardId, u64, ShardState, u64)> {
        self.lock().slots()
    }

    /// The hub sent a client to `shard` ([`SupervisorPolicy::note_admitted`]).
    pub fn note_admitted(&self, shard: &ShardInfo) {
        self.lock().note_admitted(shard.id, shard.generation);
    }

    /// The ready shard of `group` with the fewest connections.
    pub fn pick_least_connections(&self, group: u32) -> Option<ShardInfo> {
        self.lock().pick_least_connections(group)
    }

    /// Sends a new keyring to every live shard (after a rotation).
    pub fn update_keyring(&self, keyring: Vec<u8>) {
        let _ = self.cmd.send(Command::KeyringUpdate(keyring));
    }

    /// Starts draining every shard; nothing restarts afterwards.
    pub fn drain_all(&self) {
        let _ = self.cmd.send(Command::Drain);
    }

    /// Drains every shard and waits until all exited (killed at the drain deadline).
    pub async fn shutdown(self) {
        self.drain_all();
        let _ = self.task.await;
    }
}

struct Driver {
    policy: Arc<Mutex<SupervisorPolicy>>,
    children: HashMap<ShardId, Child>,
    cgroups: Cgroups,
    limits: HashMap<u32, ShardLimits>,
    bind_ip: IpAddr,
    opts: SupervisorOptions,
}

impl Driver {
    fn lock(&self) -> MutexGuard<'_, SupervisorPolicy> {
        self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(mut self, mut cmd_rx: mpsc::UnboundedReceiver<Command>) {
        if let Some(why) = self.cgroups.unavailable() {
            info!("cgroup limits unavailable: {why}");
        }
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
        let mut cmd_open = true;
        loop {
            self.execute(&ev_tx);
            if self.lock().is_drained() {
                break;
            }
            let deadline = self.lock().poll_timeout();
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = ev_rx.recv() => {
                    // The driver holds a sender, so the channel never closes.
                    if let Some(ev) = ev { self.on_event(ev) }
                }
                cmd = cmd_rx.recv(), if cmd_open => match cmd {
                    Some(Command::Drain) => {
                        info!("draining all shards");
                        self.lock().drain_all(Instant::now().into_std());
                    }
                    Some(Command::KeyringUpdate(k)) => {
                        for c in self.children.values() {
                            let _ = c.tx.send(HubToShard::KeyringUpdate { keyring: k.clone() });
                        }
                        self.opts.keyring = k;
                    }
                    // Every handle is gone: nobody can route to shards any more.
                    None => {
                        cmd_open = false;
                        self.lock().drain_all(Instant::now().into_std());
                    }
                },
                () = sleep => self.lock().handle_timeout(Instant::now().into_std()),
            }
        }
        info!("all shards stopped");
        self.cgroups.cleanup();
    }

    fn on_event(&mut self, ev: Event) {
        let now = Instant::now().into_std();
        match ev {
            Event::Msg {
                shard,
                generation,
                msg,
            } => match msg {
                ShardToHub::Ready { udp_port } => {
                    let addr = SocketAddr::new(self.bind_ip, udp_port);
                    if let Transition::Ready(i) =
                        self.lock().handle_ready(shard, generation, addr, now)
                    {
                        info!(group = shard.group, shard = shard.index, pid = i.pid, addr = %i.addr, generation, "shard ready");
                    }
                }
                ShardToHub::Heartbeat(load) => {
                    self.lock().handle_heartbeat(shard, generation, load, now)
                }
                ShardToHub::Metrics(m) => {
                    crate::obs::metrics::shard_snapshot(shard.group, shard.index, *m)
                }
                ShardToHub::Draining => {
                    info!(group = shard.group, shard = shard.index, "shard draining")
                }
                ShardToHub::Exiting { reason } => {
                    info!(group = shard.group, shard = shard.index, %reason, "shard exiting")
                }
            },
            Event::Exited {
                shard,
                generation,
                pid,
                status,
            } => {
                if self
                    .children
                    .get(&shard)
                    .is_some_and(|c| c.generation == generation)
                {
                    self.children.remove(&shard);
                    self.cgroups.release(shard);
                }
                let t = self.lock().handle_exited(shard, generation, now);
                crate::obs::shard_exited(shard.group, shard.index, &t);
                match t {
                    Transition::Died {
                        cause,
                        restart_in: Some(d),
                        ..
                    } => warn!(
                        group = shard.group, shard = shard.index, pid, %status, ?cause,
                        restart_in_ms = d.as_millis() as u64, "shard died; restarting"
                    ),
                    _ => {
                        info!(group = shard.group, shard = shard.index, pid, %status, "shard exited")
                    }
                }
            }
        }
    }

    fn execute(&mut self, ev_tx: &mpsc::UnboundedSender<Event>) {
        loop {
            let Some(action) = self.lock().poll_action() else {
                return;
            };
            match action {
                Action::Spawn { shard, generation } => self.spawn(shard, generation, ev_tx),
                Action::Kill {
                    shard,
                    generation,
                    pid,
                } => {
                    warn!(
                        group = shard.group,
                        shard = shard.index,
                        pid,
                        "killing shard"
                    );
                    if let Some(k) = self
                        .children
                        .get_mut(&shard)
                        .filter(|c| c.generation == generation)
                        .and_then(|c| c.kill.take())
                    {
                        let _ = k.send(());
                    }
                }
                Action::SendDrain {
                    shard,
                    generation,
                    within,
                } => {
                    if let Some(c) = self
                        .children
                        .get(&shard)
                        .filter(|c| c.generation == generation)
                    {
                        let _ = c.tx.send(HubToShard::Drain { within });
                    }
                }
            }
        }
    }

    fn spawn(&mut self, shard: ShardId, generation: u64, ev_tx: &mpsc::UnboundedSender<Event>) {
        let now = Instant::now().into_std();
        match self.try_spawn(shard, generation, ev_tx) {
            Ok(pid) => {
                crate::obs::shard_spawned(shard.group);
                self.lock().handle_spawned(shard, generation, pid, now)
            }
            Err(e) => {
                warn!(
                    group = shard.group,
                    shard = shard.index,
                    "cannot spawn shard: {e}"
                );
                self.lock().handle_spawn_failed(shard, generation, now);
            }
        }
    }

    fn try_spawn(
        &mut self,
        shard: ShardId,
        generation: u64,
        ev_tx: &mpsc::UnboundedSender<Event>,
    ) -> std::io::Result<u32> {
        let (parent_end, child_end) = crate::ipc::child_socketpair()?;
        let fd = child_end.as_raw_fd();
        let mut cmd = tokio::process::Command::new(&self.opts.exe);
        cmd.arg("shard")
            .arg("--ipc-fd")
            .arg(fd.to_string())
            .stdin(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let spawned = cmd.spawn();
        // The child holds its own copy now (or never will); ours must go so that the
        // child sees EOF when the hub's end closes.
        drop(child_end);
        let mut child = spawned?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("child exited before its pid was read"))?;
        let limits = self.limits.get(&shard.group).cloned().unwrap_or_default();
        let report = self.cgroups.attach(shard, pid, &limits);
        if report != crate::limits::LimitReport::default() {
            info!(
                group = shard.group,
                shard = shard.index,
                pid,
                "cgroup limits {report}"
            );
        }

        let ipc = HubIpc::from_std(parent_end)?;
        let (mut rx, mut tx) = ipc.into_split();
        let (msg_tx, mut msg_rx) = mpsc::unbounded_channel::<HubToShard>();
        let cfg = &self.opts.config;
        let init = ShardInit {
            shard: shard.index,
            group: shard.group,
            generation,
            bind_ip: self.bind_ip,
            bind_port: cfg.shards.port_of(shard.group, shard.index).unwrap_or(0),
            heartbeat_interval: cfg.supervision.heartbeat_interval,
            limits,
            token_lifetime: cfg.tokens.lifetime,
            token_clock_skew: cfg.tokens.clock_skew,
            log_filter: cfg.logging.filter.clone(),
            keyring: self.opts.keyring.clone(),
            ca_cert: self.opts.ca_cert.clone(),
            cert: self.opts.cert.clone(),
            key: self.opts.key.clone(),
            connection: cfg.connection.clone(),
            deployment_id: cfg.tokens.deployment_id.clone(),
            store_socket: Some(crate::storelink::socket_path(&cfg.data_dir)),
            subscribe: cfg.subscribe.clone(),
            log_format: cfg.logging.format,
            metrics: cfg.admin.enabled,
        };
        let _ = msg_tx.send(HubToShard::Init(Box::new(init)));
        tokio::spawn(async move {
            while let Some(m) = msg_rx.recv().await {
                if tx.send(&m).await.is_err() {
                    break;
                }
            }
        });
        let evs = ev_tx.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(Some(msg)) => {
                        if evs
                            .send(Event::Msg {
                                shard,
                                generation,
                                msg,
                            })
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!(
                            group = shard.group,
                            shard = shard.index,
                            "control channel: {e}"
                        );
                        break;
                    }
                }
            }
        });
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let evs = ev_tx.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                Ok(()) = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let status = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = evs.send(Event::Exited {
                shard,
                generation,
                pid,
                status,
            });
        });
        self.children.insert(
            shard,
            Child {
                generation,
                tx: msg_tx,
                kill: Some(kill_tx),
            },
        );
        Ok(pid)
    }
}

/// How long [`Supervisor::shutdown`] can take at most: the drain deadline plus the time to
/// reap killed processes.
pub fn shutdown_bound(config: &Config) -> Duration {
    config.supervision.drain_deadline + Duration::from_secs(5)
}
