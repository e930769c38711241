//! Starting a real `sibyl-gateway` (hub + shard processes) for a case: the case's generated
//! config, run through the shared launcher [`sibyl_gateway::launch`] (temporary data dir,
//! banner and `shard ready` lines parsed as they come). Only the processes started here (the
//! hub, and shards it reported by pid) are signalled.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use sibyl_gateway::launch::{GatewayProcess, Launch, LaunchError};
pub use sibyl_gateway::launch::{ShardReady, StartupLine, parse_ready, parse_startup};

use crate::runner::RunnerError;

/// Lines of output quoted when the gateway does not come up.
const FAILURE_LINES: usize = 20;

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

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    /// Boxed: the runner keeps a gateway in an enum beside a small `Child`.
    process: Box<GatewayProcess>,
    /// The hub's address from the banner.
    pub hub: SocketAddr,
    /// The development API key from the banner.
    pub api_key: String,
}

fn runner_error(e: LaunchError) -> RunnerError {
    match e {
        LaunchError::Io { what, source } => RunnerError::Io(what, source),
        LaunchError::Startup { what, tail } => {
            let from = tail.len().saturating_sub(FAILURE_LINES);
            RunnerError::Server(format!(
                "gateway: gave up waiting for {what}; last output:\n{}",
                tail[from..].join("\n")
            ))
        }
        other => RunnerError::Server(other.to_string()),
    }
}

impl Gateway {
    /// Starts `bin` with `opts` and waits for the banner and one ready line per shard.
    pub fn start(bin: &Path, opts: &GatewayOptions) -> Result<Self, RunnerError> {
        let total: usize = opts.groups.iter().map(|(_, n)| *n as usize).sum();
        let process = Launch::new(bin)
            .temp_prefix("sibyl-interop-gw")
            .config(opts.config_toml())
            .args(["--heartbeat-interval", "200ms", "--drain-deadline", "5s"])
            .env("RUST_LOG", "info")
            .shards(total)
            .patience(opts.patience)
            .stop_grace(Duration::from_secs(10))
            .start()
            .map_err(runner_error)?;
        let api_key = process
            .dev_key()
            .ok_or_else(|| RunnerError::Server("gateway: the banner has no dev API key".into()))?
            .to_owned();
        Ok(Self {
            hub: process.hub(),
            api_key,
            process: Box::new(process),
        })
    }

    /// The dev CA certificate (PEM) the gateway's certificates chain to.
    pub fn ca_file(&self) -> PathBuf {
        self.process.ca_file()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.process.data_dir().to_owned()
    }

    /// Every `shard ready` line seen so far (restarts append).
    pub fn ready(&self) -> Vec<ShardReady> {
        self.process.ready()
    }

    /// The latest ready shard per (group, index), in (group, index) order.
    pub fn current_shards(&self) -> Vec<ShardReady> {
        self.process.current_shards()
    }

    /// Sends `signal` to the current shard process bound at `addr` (one this gateway
    /// reported); returns it.
    pub fn signal_shard(
        &self,
        addr: SocketAddr,
        signal: Signal,
    ) -> Result<ShardReady, RunnerError> {
        self.process
            .signal_shard(addr, signal)
            .map_err(runner_error)
    }

    /// The last lines of the gateway's output.
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        self.process.log_tail(n)
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the hub to exit. Shards exit with their
    /// hub (they stop on hub loss).
    pub fn stop(self, grace: Duration) {
        self.process.stop(grace);
    }
}
