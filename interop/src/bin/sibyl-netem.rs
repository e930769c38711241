//! `sibyl-netem`: a loopback UDP impairment proxy.
//!
//! ```text
//! sibyl-netem --listen 127.0.0.1:0 --upstream 127.0.0.1:4433 --delay 20ms --jitter 5ms \
//!             --loss 0.03 --seed 7
//! ```
//!
//! The config file (`--config file.toml`, same shape as [`sibyl_interop::netem::Impairment`]
//! plus `listen`, `upstream` and `max_mappings`) is read first; flags override it. Plain
//! impairment flags set both directions; `--up-*` / `--down-*` flags then override one
//! direction. The first line on stdout is `listening on <addr>`. Stops on Ctrl-C or SIGTERM,
//! printing the counters on stderr.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;
use sibyl_interop::netem::{
    BlackholeWindow, DirectionConfig, GilbertElliott, Impairment, Proxy, parse_duration,
};

/// Largest config file read, in bytes.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Parser)]
#[command(name = "sibyl-netem", version, about = "Loopback UDP impairment proxy")]
struct Cli {
    /// TOML config file, read first (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (loopback only) [default: 127.0.0.1:0].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address to forward to (loopback only).
    #[arg(long)]
    upstream: Option<SocketAddr>,
    /// RNG seed of the run [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Most client source addresses mapped at once [default: 1024].
    #[arg(long)]
    max_mappings: Option<usize>,

    /// Both directions: fixed delay, e.g. 20ms.
    #[arg(long, value_parser = parse_duration)]
    delay: Option<Duration>,
    /// Both directions: jitter (delay is uniform in delay ± jitter).
    #[arg(long, value_parser = parse_duration)]
    jitter: Option<Duration>,
    /// Both directions: random loss probability, e.g. 0.03.
    #[arg(long)]
    loss: Option<f64>,
    /// Both directions: Gilbert-Elliott loss `p_good_to_bad,p_bad_to_good[,loss_good,loss_bad]`.
    #[arg(long, value_parser = parse_burst)]
    burst: Option<GilbertElliott>,
    /// Both directions: probability of holding a packet back by --reorder-delay.
    #[arg(long)]
    reorder: Option<f64>,
    /// Both directions: extra delay of a reordered packet [default: 10ms].
    #[arg(long, value_parser = parse_duration)]
    reorder_delay: Option<Duration>,
    /// Both directions: duplication probability.
    #[arg(long)]
    duplicate: Option<f64>,
    /// Both directions: probability of flipping one random bit.
    #[arg(long)]
    corrupt: Option<f64>,
    /// Both directions: bandwidth cap in bits per second.
    #[arg(long)]
    rate_bps: Option<u64>,
    /// Both directions: bandwidth queue length in packets [default: 1000].
    #[arg(long)]
    queue_packets: Option<usize>,
    /// Both directions: drop everything in `FROM..TO` since start, e.g. `2s..5s` (repeatable).
    #[arg(long, value_parser = parse_window)]
    blackhole: Vec<BlackholeWindow>,

    /// Client → server only: delay.
    #[arg(long, value_parser = parse_duration)]
    up_delay: Option<Duration>,
    /// Client → server only: jitter.
    #[arg(long, value_parser = parse_duration)]
    up_jitter: Option<Duration>,
    /// Client → server only: random loss probability.
    #[arg(long)]
    up_loss: Option<f64>,
    /// Client → server only: bandwidth cap in bits per second.
    #[arg(long)]
    up_rate_bps: Option<u64>,
    /// Server → client only: delay.
    #[arg(long, value_parser = parse_duration)]
    down_delay: Option<Duration>,
    /// Server → client only: jitter.
    #[arg(long, value_parser = parse_duration)]
    down_jitter: Option<Duration>,
    /// Server → client only: random loss probability.
    #[arg(long)]
    down_loss: Option<f64>,
    /// Server → client only: bandwidth cap in bits per second.
    #[arg(long)]
    down_rate_bps: Option<u64>,
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    upstream: Option<SocketAddr>,
    max_mappings: Option<usize>,
    seed: u64,
    up: DirectionConfig,
    down: DirectionConfig,
}

/// The resolved run settings.
#[derive(Debug)]
struct Settings {
    listen: SocketAddr,
    upstream: SocketAddr,
    max_mappings: usize,
    impairment: Impairment,
}

fn parse_burst(s: &str) -> Result<GilbertElliott, String> {
    let parts = s
        .split(',')
        .map(|p| p.trim().parse::<f64>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ge = GilbertElliott::default();
    match parts[..] {
        [gb, bg] => (ge.p_good_to_bad, ge.p_bad_to_good) = (gb, bg),
        [gb, bg, lg, lb] => {
            (
                ge.p_good_to_bad,
                ge.p_bad_to_good,
                ge.loss_in_good,
                ge.loss_in_bad,
            ) = (gb, bg, lg, lb)
        }
        _ => return Err("expected p_good_to_bad,p_bad_to_good[,loss_good,loss_bad]".into()),
    }
    Ok(ge)
}

fn parse_window(s: &str) -> Result<BlackholeWindow, String> {
    let (from, to) = s.split_once("..").ok_or("expected FROM..TO, e.g. 2s..5s")?;
    let from = parse_duration(from).map_err(|e| format!("{from:?}: {e}"))?;
    let to = parse_duration(to).map_err(|e| format!("{to:?}: {e}"))?;
    Ok(BlackholeWindow { from, to })
}

impl Cli {
    /// File first, then flags for both directions, then per-direction flags; then validation.
    fn resolve(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => read_config(path)?,
            None => FileConfig::default(),
        };
        let mut up = file.up;
        let mut down = file.down;
        for cfg in [&mut up, &mut down] {
            self.apply_both(cfg);
        }
        set(&mut up.delay, self.up_delay);
        set(&mut up.jitter, self.up_jitter);
        set(&mut up.loss, self.up_loss);
        if self.up_rate_bps.is_some() {
            up.rate_bps = self.up_rate_bps;
        }
        set(&mut down.delay, self.down_delay);
        set(&mut down.jitter, self.down_jitter);
        set(&mut down.loss, self.down_loss);
        if self.down_rate_bps.is_some() {
            down.rate_bps = self.down_rate_bps;
        }
        let impairment = Impairment {
            seed: self.seed.unwrap_or(file.seed),
            up,
            down,
        };
        impairment.validate()?;
        let Some(upstream) = self.upstream.or(file.upstream) else {
            bail!("no upstream: pass --upstream 127.0.0.1:PORT or set `upstream` in the config");
        };
        let listen = self
            .listen
            .or(file.listen)
            .unwrap_or(([127, 0, 0, 1], 0).into());
        for (role, addr) in [("listen", listen), ("upstream", upstream)] {
            if !addr.ip().is_loopback() {
                bail!("{role} address {addr} is not loopback; sibyl-netem only runs on loopback");
            }
        }
        let max_mappings = self.max_mappings.or(file.max_mappings).unwrap_or(1024);
        Ok(Settings {
            listen,
            upstream,
            max_mappings,
            impairment,
        })
    }

    fn apply_both(&self, cfg: &mut DirectionConfig) {
        set(&mut cfg.delay, self.delay);
        set(&mut cfg.jitter, self.jitter);
        set(&mut cfg.loss, self.loss);
        if self.burst.is_some() {
            cfg.burst = self.burst;
        }
        set(&mut cfg.reorder, self.reorder);
        set(&mut cfg.reorder_delay, self.reorder_delay);
        set(&mut cfg.duplicate, self.duplicate);
        set(&mut cfg.corrupt, self.corrupt);
        if self.rate_bps.is_some() {
            cfg.rate_bps = self.rate_bps;
        }
        set(&mut cfg.queue_packets, self.queue_packets);
        if !self.blackhole.is_empty() {
            cfg.blackholes = self.blackhole.clone();
        }
    }
}

fn set<T>(field: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *field = v;
    }
}

fn read_config(path: &PathBuf) -> anyhow::Result<FileConfig> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_CONFIG_BYTES {
        bail!(
            "{} is {len} bytes; a config file is at most {MAX_CONFIG_BYTES}",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber_init();
    let settings = Cli::parse().resolve()?;
    // Installed before the first line, so a script may send SIGTERM or SIGINT as soon as it reads it.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let handle = Proxy::new(settings.upstream)
        .listen(settings.listen)
        .max_mappings(settings.max_mappings)
        .impairment(settings.impairment)
        .spawn()
        .await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", handle.local_addr())?;
        out.flush()?;
    }
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    let stats = handle.stats();
    handle.shutdown().await;
    eprintln!(
        "sibyl-netem: stopped; up {:?}; down {:?}",
        stats.up, stats.down
    );
    Ok(())
}

/// Logs go to stderr (stdout carries the `listening on` line), filtered by `RUST_LOG`.
fn tracing_subscriber_init() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
}
