//! Starting a real `sibyl-gateway` process from a harness: the integration tests, the interop
//! runner and the benchmarks all go through [`Launch`]. It writes the config into a temporary
//! directory, starts the binary on loopback, and parses the start-up banner and the
//! `shard ready` log lines as they come.
//!
//! ```text
//!  Launch::new(bin).config(toml).args(…).shards(n).start()
//!    ├─ spawn: bin --config <tmp>/gateway.toml --listen 127.0.0.1:0 --data-dir <tmp>/data …
//!    ├─ two reader threads (stdout: banner, stderr: log) ─▶ pending lines, tail, ready shards
//!    └─ waits, bounded: "hub address:", "dev API key:" | "API keys:", n × "shard ready"
//!  GatewayProcess ── until(f): consume lines · ready() · signal_shard(addr) · stop(grace)
//!    └─ Drop: SIGTERM to the hub by pid, SIGKILL after the stop grace; then the temp dir goes
//! ```
//!
//! Only processes started here are signalled, by pid: the hub, and on request a shard the hub
//! reported ready (shards exit on their own once their hub is gone).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sibyl_certs::CertPaths;

/// Output lines kept for failure reports ([`GatewayProcess::log_tail`]).
pub const LOG_TAIL: usize = 400;

/// Unconsumed output lines kept for [`GatewayProcess::until`]; older ones are dropped, so a
/// harness that never reads them holds bounded memory.
const PENDING_CAP: usize = 1 << 16;

/// How often a stop polls for the hub's exit.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Default [`Launch::patience`]: 60 s (a loaded 2-core machine; never a timing assertion).
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(60);

/// Default [`Launch::stop_grace`]: 10 s between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// A `shard ready group=G shard=I pid=P addr=A` log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardReady {
    /// Shard group.
    pub group: u32,
    /// Index in the group.
    pub shard: u32,
    /// OS process id.
    pub pid: i32,
    /// Bound QUIC address.
    pub addr: SocketAddr,
}

/// Parses a `shard ready` log line (`None` for any other line).
pub fn parse_ready(line: &str) -> Option<ShardReady> {
    if !line.contains("shard ready") {
        return None;
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
    };
    Some(ShardReady {
        group: field("group")?.parse().ok()?,
        shard: field("shard")?.parse().ok()?,
        pid: field("pid")?.parse().ok()?,
        addr: field("addr")?.parse().ok()?,
    })
}

/// A line of `sibyl-gateway`'s start-up output that harnesses wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartupLine {
    /// The banner's `hub address: A`.
    Hub(SocketAddr),
    /// The banner's `dev API key: K` (first start of a data dir only).
    DevKey(String),
    /// The banner's `API keys: …` line, printed instead of a dev key on later starts.
    NoDevKey,
    /// A `shard ready` log line.
    Ready(ShardReady),
}

/// Parses one line of output into the piece it carries, if any. The banner is on stdout and
/// `shard ready` on stderr, so the pieces come in any order.
pub fn parse_startup(line: &str) -> Option<StartupLine> {
    let t = line.trim();
    if let Some(a) = t.strip_prefix("hub address:") {
        return a.trim().parse().ok().map(StartupLine::Hub);
    }
    if let Some(k) = t.strip_prefix("dev API key:") {
        return Some(StartupLine::DevKey(k.trim().to_owned()));
    }
    if t.starts_with("API keys:") {
        return Some(StartupLine::NoDevKey);
    }
    parse_ready(line).map(StartupLine::Ready)
}

/// Why a gateway could not be started or driven.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// Preparing the directory or starting the process failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The awaited output did not come within the patience, or the process closed its output.
    #[error("sibyl-gateway: gave up waiting for {what}; last output:\n{}", .tail.join("\n"))]
    Startup {
        /// What was awaited.
        what: &'static str,
        /// The last lines of output (at most [`LOG_TAIL`]).
        tail: Vec<String>,
    },
    /// No shard reported ready is bound at this address.
    #[error("no current shard bound at {0}")]
    NoSuchShard(SocketAddr),
    /// Sending a signal failed.
    #[error("signalling pid {pid}: {source}")]
    Signal {
        /// The process.
        pid: i32,
        /// The OS error.
        #[source]
        source: nix::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let what = what.into();
    move |source| LaunchError::Io { what, source }
}

/// How to start a gateway; [`start`](Self::start) runs it.
#[derive(Debug)]
pub struct Launch {
    bin: PathBuf,
    config: String,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    certs: Option<CertPaths>,
    dir: Option<tempfile::TempDir>,
    temp_prefix: String,
    listen: String,
    shards: usize,
    patience: Duration,
    stop_grace: Duration,
}

impl Launch {
    /// Starts `bin` with an empty config, no extra arguments, in a new temp dir, waiting for
    /// the banner only, [`DEFAULT_PATIENCE`] and [`DEFAULT_STOP_GRACE`].
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            config: String::new(),
            args: Vec::new(),
            envs: Vec::new(),
            certs: None,
            dir: None,
            temp_prefix: "sibyl-gateway".into(),
            listen: "127.0.0.1:0".into(),
            shards: 0,
            patience: DEFAULT_PATIENCE,
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }

    /// The hub's listen address (default `127.0.0.1:0`): a restart on the port an earlier
    /// run got, so that a client configured with it finds the hub again.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = addr.into();
        self
    }

    /// The TOML config file's contents.
    pub fn config(mut self, toml: impl Into<String>) -> Self {
        self.config = toml.into();
        self
    }

    /// Extra command-line arguments (after `--config`, `--listen 127.0.0.1:0` and
    /// `--data-dir`).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the gateway (e.g. `RUST_LOG`).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Certificate files copied into `<data>/certs` before start, so hub and shards present
    /// exactly that CA and leaf (default: the gateway creates its own).
    pub fn certs(mut self, certs: CertPaths) -> Self {
        self.certs = Some(certs);
        self
    }

    /// Runs in `dir` (kept from an earlier gateway: a restart keeps its data) instead of a
    /// new temp dir.
    pub fn in_dir(mut self, dir: tempfile::TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Name prefix of a new temp dir. Default `sibyl-gateway`.
    pub fn temp_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.temp_prefix = prefix.into();
        self
    }

    /// Shards to wait for before [`start`](Self::start) returns. Default 0.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }

    /// Bound on the wait for the banner and the shards. Default [`DEFAULT_PATIENCE`].
    pub fn patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Time between SIGTERM and SIGKILL when the process is dropped; zero sends SIGKILL at
    /// once. Default [`DEFAULT_STOP_GRACE`].
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// Starts the gateway and waits (blocking, bounded by the patience) for the hub address,
    /// the dev key line (or the line saying there is none) and the shards. The lines read
    /// meanwhile are consumed: [`GatewayProcess::until`] sees only later ones.
    pub fn start(self) -> Result<GatewayProcess, LaunchError> {
        let dir = match self.dir {
            Some(d) => d,
            None => tempfile::Builder::new()
                .prefix(&self.temp_prefix)
                .tempdir()
                .map_err(io("creating the gateway temp dir"))?,
        };
        let data = dir.path().join("data");
        if let Some(c) = &self.certs {
            let to = data.join("certs");
            // Private, as the gateway requires of its data dir.
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(&to)
            .map_err(io(format!("creating {}", to.display())))?;
            for (from, name) in [
                (&c.ca_cert, "ca.pem"),
                (&c.ca_key, "ca.key"),
                (&c.server_cert, "server.pem"),
                (&c.server_key, "server.key"),
            ] {
                std::fs::copy(from, to.join(name))
                    .map_err(io(format!("copying {}", from.display())))?;
            }
        }
        let cfg = dir.path().join("gateway.toml");
        std::fs::write(&cfg, &self.config).map_err(io(format!("writing {}", cfg.display())))?;
        let mut child = Command::new(&self.bin)
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg(&self.listen)
            .arg("--data-dir")
            .arg(&data)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("starting {}", self.bin.display())))?;
        let out = Arc::new(Shared::default());
        // Both pipes are drained for the process's whole life, so the gateway never blocks
        // on a full pipe.
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child.stdout.take().map(|p| Box::new(p) as _),
            child.stderr.take().map(|p| Box::new(p) as _),
        ];
        for pipe in pipes.into_iter().flatten() {
            let out = out.clone();
            std::thread::spawn(move || out.read_lines(pipe));
        }
        let mut gw = GatewayProcess {
            child,
            out,
            root: dir.path().to_owned(),
            dir: Some(dir),
            data,
            hub: SocketAddr::from(([127, 0, 0, 1], 0)),
            dev_key: None,
            stop_grace: self.stop_grace,
        };
        let deadline = Instant::now() + self.patience;
        // One pass over the output, each line tried against every piece: the banner (stdout)
        // and `shard ready` (stderr) are read by two threads, so they interleave.
        let (mut hub, mut key_line, mut shards) = (None, false, 0);
        while hub.is_none() || !key_line || shards < self.shards {
            let what = match (hub, key_line) {
                (None, _) => "the hub address",
                (_, false) => "the dev API key line",
                _ => "every shard ready",
            };
            match gw.until(deadline, what, parse_startup)? {
                StartupLine::Hub(a) => hub = Some(a),
                StartupLine::DevKey(k) => {
                    gw.dev_key = Some(k);
                    key_line = true;
                }
                StartupLine::NoDevKey => key_line = true,
                StartupLine::Ready(_) => shards += 1,
            }
        }
        gw.hub = hub.unwrap_or(gw.hub);
        Ok(gw)
    }
}

/// Output of the process, filled by the reader threads.
#[derive(Default)]
struct Output {
    /// Lines not yet consumed by `until`.
    pending: VecDeque<String>,
    tail: VecDeque<String>,
    ready: Vec<ShardReady>,
    /// Pipes that reached EOF (2: the process closed both).
    closed: usize,
}

#[derive(Default)]
struct Shared {
    out: Mutex<Output>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Output> {
        // A reader thread that panicked leaves consistent lines behind: keep going.
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_lines(&self, pipe: Box<dyn Read + Send>) {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut o = self.lock();
            if let Some(r) = parse_ready(&line) {
                o.ready.push(r);
            }
            if o.tail.len() == LOG_TAIL {
                o.tail.pop_front();
            }
            o.tail.push_back(line.clone());
            if o.pending.len() == PENDING_CAP {
                o.pending.pop_front();
            }
            o.pending.push_back(line);
            drop(o);
            self.changed.notify_all();
        }
        self.lock().closed += 1;
        self.changed.notify_all();
    }
}

/// A running gateway (hub and its shard processes) started by [`Launch::start`].
pub struct GatewayProcess {
    child: Child,
    out: Arc<Shared>,
    /// `None` only once handed back by [`kill_keep_dir`](Self::kill_keep_dir).
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    data: PathBuf,
    hub: SocketAddr,
    dev_key: Option<String>,
    stop_grace: Duration,
}

impl std::fmt::Debug for GatewayProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayProcess")
            .field("pid", &self.child.id())
            .field("hub", &self.hub)
            .finish_non_exhaustive()
    }
}

impl GatewayProcess {
    /// The hub's QUIC address, from the banner.
    pub fn hub(&self) -> SocketAddr {
        self.hub
    }

    /// The development API key from the banner (first start of a data dir only).
    pub fn dev_key(&self) -> Option<&str> {
        self.dev_key.as_deref()
    }

    /// The data directory (`<tmp>/data`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The CA certificate clients trust (`<data>/certs/ca.pem`).
    pub fn ca_file(&self) -> PathBuf {
        self.data.join("certs").join("ca.pem")
    }

    /// The temporary directory holding the data dir and the config file.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The hub's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads output lines until `f` returns `Some`, the deadline passes or the process closes
    /// its output; consumed lines are not seen again.
    pub fn until<T>(
        &mut self,
        deadline: Instant,
        what: &'static str,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, LaunchError> {
        let mut o = self.out.lock();
        loop {
            while let Some(line) = o.pending.pop_front() {
                if let Some(t) = f(&line) {
                    return Ok(t);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || o.closed == 2 {
                return Err(LaunchError::Startup {
                    what,
                    tail: o.tail.iter().cloned().collect(),
                });
            }
            o = self
                .out
                .changed
                .wait_timeout(o, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Every `shard ready` line seen so far, in order (restarts append).
    pub fn ready(&self) -> Vec<ShardReady> {
        self.out.lock().ready.clone()
    }

    /// The latest ready shard per (group, index), in (group, index) order.
    pub fn current_shards(&self) -> Vec<ShardReady> {
        let mut latest = std::collections::BTreeMap::new();
        for r in self.ready() {
            latest.insert((r.group, r.shard), r);
        }
        latest.into_values().collect()
    }

    /// Sends `signal` to the current shard process bound at `addr` (one this gateway
    /// reported); returns it.
    pub fn signal_shard(
        &self,
        addr: SocketAddr,
        signal: Signal,
    ) -> Result<ShardReady, LaunchError> {
        let shard = self
            .current_shards()
            .into_iter()
            .find(|r| r.addr == addr)
            .ok_or(LaunchError::NoSuchShard(addr))?;
        kill(Pid::from_raw(shard.pid), signal).map_err(|source| LaunchError::Signal {
            pid: shard.pid,
            source,
        })?;
        Ok(shard)
    }

    /// The last `n` lines of output (at most [`LOG_TAIL`]).
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        let o = self.out.lock();
        o.tail
            .iter()
            .skip(o.tail.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// The hub's exit status if it has exited (without waiting).
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits for the hub to exit (after a signal sent with [`pid`](Self::pid)).
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// SIGTERM, then SIGKILL after `grace` (at once if zero); waits for the hub to exit.
    /// Shards exit with their hub. The temp dir is removed.
    pub fn stop(mut self, grace: Duration) {
        self.halt(grace);
    }

    /// SIGKILLs the hub and returns its directory instead of removing it (to start a gateway
    /// on the same data again with [`Launch::in_dir`]).
    pub fn kill_keep_dir(mut self) -> Option<tempfile::TempDir> {
        self.halt(Duration::ZERO);
        self.dir.take()
    }

    /// SIGKILLs the hub and every shard process it reported (the whole gateway: no process
    /// is left to notice anything) and returns its directory, as
    /// [`kill_keep_dir`](Self::kill_keep_dir).
    pub fn kill_all_keep_dir(mut self) -> Option<tempfile::TempDir> {
        if let Ok(raw) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
        }
        for shard in self.current_shards() {
            let _ = kill(Pid::from_raw(shard.pid), Signal::SIGKILL);
        }
        self.halt(Duration::ZERO);
        self.dir.take()
    }

    fn halt(&mut self, grace: Duration) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let Ok(raw) = i32::try_from(self.child.id()) else {
            return;
        };
        let pid = Pid::from_raw(raw);
        if !grace.is_zero() {
            // SIGTERM drains the shards and makes the hub exit; SIGKILL only if it does not.
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(EXIT_POLL);
            }
        }
        let _ = kill(pid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.halt(self.stop_grace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_lines_are_recognised_whatever_their_order() {
        let ready = "2026-11-22T20:23:17Z  INFO sibyl_gateway::supervisor: shard ready group=0 \
                     shard=1 pid=42 addr=127.0.0.1:35580 generation=1";
        assert_eq!(
            parse_startup(ready),
            Some(StartupLine::Ready(ShardReady {
                group: 0,
                shard: 1,
                pid: 42,
                addr: "127.0.0.1:35580".parse().unwrap(),
            }))
        );
        assert_eq!(
            parse_startup("  hub address:     127.0.0.1:57559"),
            Some(StartupLine::Hub("127.0.0.1:57559".parse().unwrap()))
        );
        assert_eq!(
            parse_startup("  dev API key:     sk_1bb1e8ae904e_abc"),
            Some(StartupLine::DevKey("sk_1bb1e8ae904e_abc".into()))
        );
        assert_eq!(
            parse_startup("  API keys:        /tmp/x/api-keys.toml (create one: …)"),
            Some(StartupLine::NoDevKey)
        );
        assert_eq!(parse_startup("  hub address:     not-an-address"), None);
        assert_eq!(parse_startup("Sibyl gateway hub"), None);
        assert_eq!(
            parse_ready("shard ready group=0 shard=1 pid=x addr=127.0.0.1:1"),
            None
        );
    }
}
