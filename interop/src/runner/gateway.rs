//! Starting a real `sibyl-gateway` (hub + shard processes) for a case: a temporary data dir,
//! a generated config, the banner and `shard ready` log lines parsed as they come. Only the
//! processes started here (the hub, and shards it reported by pid) are signalled.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::runner::RunnerError;

/// Lines of gateway output kept for failure reports.
const LOG_TAIL: usize = 400;

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
pub enum StartupLine {
    /// The banner's `hub address: A`.
    Hub(SocketAddr),
    /// The banner's `dev API key: K` (first start only).
    DevKey(String),
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
    parse_ready(line).map(StartupLine::Ready)
}

/// Settings of one gateway instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayOptions {
    /// Shard groups and shards per group.
    pub groups: Vec<(u32, u32)>,
    /// `tokens.lifetime` (with `clock_skew = 0s`) when set.
    pub token_lifetime: Option<Duration>,
    /// How long to wait for the banner and every shard.
    pub patience: Duration,
    /// `[shards] port_base` (deterministic shard ports) when set.
    pub port_base: Option<u16>,
    /// `[advertise] rewrite`: (bound shard address, address advertised in tickets).
    pub rewrite: Vec<(SocketAddr, SocketAddr)>,
}

impl Default for GatewayOptions {
    /// Two groups (0 and 1) of one shard each, default token lifetime, 60 s patience,
    /// ephemeral shard ports, no rewrite.
    fn default() -> Self {
        Self {
            groups: vec![(0, 1), (1, 1)],
            token_lifetime: None,
            patience: Duration::from_secs(60),
            port_base: None,
            rewrite: Vec::new(),
        }
    }
}

impl GatewayOptions {
    /// The TOML config file for these options.
    pub fn config_toml(&self) -> String {
        let mut s = String::new();
        if let Some(l) = self.token_lifetime {
            s.push_str(&format!(
                "[tokens]\nlifetime = \"{}ms\"\nclock_skew = \"0s\"\nrotation_grace = \"1h\"\n\n",
                l.as_millis()
            ));
        }
        // The stream every case uses (`STREAMS`), one partition so order is total.
        s.push_str(
            "[[streams]]\nname = \"interop\"\npartitions = 1\ndurability = \"interval:5ms\"\n\n",
        );
        if !self.rewrite.is_empty() {
            s.push_str("[advertise.rewrite]\n");
            for (from, to) in &self.rewrite {
                s.push_str(&format!("\"{from}\" = \"{to}\"\n"));
            }
            s.push('\n');
        }
        if let Some(p) = self.port_base {
            s.push_str(&format!("[shards]\nport_base = {p}\n\n"));
        }
        for (id, n) in &self.groups {
            s.push_str(&format!("[[shards.groups]]\nid = {id}\nshards = {n}\n"));
        }
        s
    }
}

#[derive(Default)]
struct Output {
    tail: Vec<String>,
    ready: Vec<ShardReady>,
    hub: Option<SocketAddr>,
    dev_key: Option<String>,
    closed: usize,
}

/// A running gateway.
pub struct Gateway {
    child: Child,
    out: Arc<(Mutex<Output>, Condvar)>,
    dir: tempfile::TempDir,
    /// The hub's address from the banner.
    pub hub: SocketAddr,
    /// The development API key from the banner.
    pub api_key: String,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("pid", &self.child.id())
            .field("hub", &self.hub)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts `bin` with `opts` and waits for the banner and one ready line per shard.
    pub fn start(bin: &Path, opts: &GatewayOptions) -> Result<Self, RunnerError> {
        let dir = tempfile::Builder::new()
            .prefix("sibyl-interop-gw")
            .tempdir()
            .map_err(|e| RunnerError::Io("creating the gateway temp dir".into(), e))?;
        let cfg = dir.path().join("gateway.toml");
        std::fs::write(&cfg, opts.config_toml())
            .map_err(|e| RunnerError::Io(format!("writing {}", cfg.display()), e))?;
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--heartbeat-interval", "200ms", "--drain-deadline", "5s"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| RunnerError::Io(format!("starting {}", bin.display()), e))?;
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let (m, cv) = &*out;
                    let mut o = m.lock().unwrap_or_else(|p| p.into_inner());
                    match parse_startup(&line) {
                        Some(StartupLine::Hub(a)) => o.hub = Some(a),
                        Some(StartupLine::DevKey(k)) => o.dev_key = Some(k),
                        Some(StartupLine::Ready(r)) => o.ready.push(r),
                        None => {}
                    }
                    o.tail.push(line);
                    if o.tail.len() > LOG_TAIL {
                        o.tail.remove(0);
                    }
                    cv.notify_all();
                }
                let (m, cv) = &*out;
                m.lock().unwrap_or_else(|p| p.into_inner()).closed += 1;
                cv.notify_all();
            });
        }
        let mut gw = Self {
            child,
            out,
            dir,
            hub: SocketAddr::from(([0, 0, 0, 0], 0)),
            api_key: String::new(),
        };
        let total: usize = opts.groups.iter().map(|(_, n)| *n as usize).sum();
        let (hub, key) = gw.wait_for(opts.patience, "the banner and every shard", |o| {
            (o.ready.len() >= total)
                .then(|| Some((o.hub?, o.dev_key.clone()?)))
                .flatten()
        })?;
        gw.hub = hub;
        gw.api_key = key;
        Ok(gw)
    }

    /// Waits (bounded) until `f` returns `Some` on the output seen so far.
    fn wait_for<T>(
        &self,
        patience: Duration,
        what: &str,
        mut f: impl FnMut(&Output) -> Option<T>,
    ) -> Result<T, RunnerError> {
        let deadline = Instant::now() + patience;
        let (m, cv) = &*self.out;
        let mut o = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(t) = f(&o) {
                return Ok(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || o.closed == 2 {
                let tail = o
                    .tail
                    .iter()
                    .rev()
                    .take(20)
                    .rev()
                    .cloned()
                    .collect::<Vec<_>>();
                return Err(RunnerError::Server(format!(
                    "gateway: gave up waiting for {what}; last output:\n{}",
                    tail.join("\n")
                )));
            }
            o = cv
                .wait_timeout(o, left.min(Duration::from_millis(500)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The dev CA certificate (PEM) the gateway's certificates chain to.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("data").join("certs").join("ca.pem")
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Every `shard ready` line seen so far (restarts append).
    pub fn ready(&self) -> Vec<ShardReady> {
        self.out
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ready
            .clone()
    }

    /// The latest ready shard per (group, index), in (group, index) order.
    pub fn current_shards(&self) -> Vec<ShardReady> {
        let mut latest: std::collections::BTreeMap<(u32, u32), ShardReady> = Default::default();
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
    ) -> Result<ShardReady, RunnerError> {
        let shard = self
            .current_shards()
            .into_iter()
            .find(|r| r.addr == addr)
            .ok_or_else(|| RunnerError::Server(format!("no current shard bound at {addr}")))?;
        kill(Pid::from_raw(shard.pid), signal)
            .map_err(|e| RunnerError::Server(format!("signalling shard pid {}: {e}", shard.pid)))?;
        Ok(shard)
    }

    /// The last lines of the gateway's output.
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        let o = self.out.0.lock().unwrap_or_else(|p| p.into_inner());
        o.tail.iter().rev().take(n).rev().cloned().collect()
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the hub to exit. Shards exit with their
    /// hub (they stop on hub loss).
    pub fn stop(mut self, grace: Duration) {
        self.stop_inner(grace);
    }

    fn stop_inner(&mut self, grace: Duration) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop_inner(Duration::from_secs(10));
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
        assert_eq!(parse_startup("  hub address:     not-an-address"), None);
        assert_eq!(parse_startup("Sibyl gateway hub"), None);
    }
}
