//! `sibyl-gateway demo`: the whole data path in one command.
//!
//! ```text
//! Node::start (same start-up as `run`: data dir, store, store link, shards, hub endpoint)
//!   └─ synthetic publisher ──append──▶ store stream `demo` (P partitions, R records/s)
//! shard processes ◀── store link ──  (wait until every configured shard is ready)
//! N × (sibyl_sdk::Client ──hub──▶ ticket ──▶ shard) ── Subscription(Start::Earliest)
//!        └─ SeqCheck per consumer: offsets contiguous per partition, payload sequence == offset
//! every second: published records/s; per consumer records/s, lag (log end − next offset), shard
//! end (--seconds or Ctrl-C): stop the publisher, let consumers catch up to the final log end
//!   (bounded), close them, drain the shards, print the summary, remove the temp data dir
//! ```
//!
//! Consumers subscribe from [`Start::Earliest`], so each one must receive every record of the
//! stream (on a fresh data dir: every record the demo published), in order, exactly once. The
//! synthetic publisher writes each record's offset as the first 8 payload bytes (little
//! endian), which [`SeqCheck`] compares with the offset the SDK delivered. The exit status is 0
//! only when every consumer received records, with no gap, no duplicate, no corrupt payload,
//! no error, and caught up with the log end before the drain bound.
//!
//! The demo creates an in-memory API key (scope `demo:subscribe`) in the hub; nothing is
//! written to `api-keys.toml`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use sibyl_gateway::apikeys::ApiKeyStore;
use sibyl_gateway::config::{Config, StreamSpec, SyntheticSpec};
use sibyl_gateway::synthetic::Synthetic;
use sibyl_sdk::{Client, Mode, Start, Trust};
use tokio::sync::watch;

use crate::{Node, init_logging, unix_now};

/// Stream the demo publishes to and consumes from.
const STREAM: &str = "demo";
/// How long consumers get to reach the final log end once the publisher stopped.
const CATCH_UP: Duration = Duration::from_secs(10);
/// How often consumers refresh their shard and SDK counters for the progress line.
const REFRESH: Duration = Duration::from_millis(250);

/// `sibyl-gateway demo`: hub, shards, a synthetic publisher and N SDK consumers in one
/// process tree, with live progress and a final summary.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// SDK consumers, each with its own client and subscription (from the earliest offset).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    consumers: u32,
    /// How long to publish, in seconds (0 = until Ctrl-C).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Records per second published, all partitions together.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    rate: u64,
    /// Partitions of the `demo` stream (when it is created).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    partitions: u32,
    /// Payload bytes per record; the first 8 carry the record's sequence number.
    #[arg(long, value_name = "BYTES", default_value_t = 100, value_parser = clap::value_parser!(u32).range(8..=1 << 20))]
    size: u32,
    /// Zipf-like partition skew: 0 = uniform, 1 = partition k gets ∝ 1/(k+1).
    #[arg(long, default_value_t = 0.0)]
    skew: f64,
    /// How the shards deliver: `predictive` (push within the grant, sized by the SDK's
    /// forecasts) or `reactive` (only what the SDK's `Fetch` asks for).
    #[arg(long, value_enum, default_value_t = DemoMode::Predictive)]
    mode: DemoMode,
    /// Data directory to use and keep. Default: a fresh temporary directory, removed at exit.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log filter for the log on stderr (RUST_LOG syntax). Default: `RUST_LOG`, else `warn`.
    #[arg(long = "log", value_name = "FILTER")]
    log: Option<String>,
}

/// `--mode`: the SDK's [`Mode`] as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DemoMode {
    Predictive,
    Reactive,
}

impl DemoMode {
    fn name(self) -> &'static str {
        match self {
            Self::Predictive => "predictive",
            Self::Reactive => "reactive",
        }
    }

    fn sdk(self) -> Mode {
        match self {
            Self::Predictive => Mode::Predictive,
            Self::Reactive => Mode::Reactive,
        }
    }
}

/// Runs the demo; see the module doc.
pub(crate) fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if !args.skew.is_finite() || args.skew < 0.0 {
        bail!("--skew must be a finite number ≥ 0");
    }
    let filter = args
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "warn".to_owned());
    init_logging(&filter, sibyl_gateway::config::LogFormat::Text);
    let temp = match &args.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("sibyl-demo-")
                // A data dir must be private (the gateway refuses one others can read).
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .tempdir()
                .context("creating a temporary data dir")?,
        ),
    };
    let data_dir = match (&args.data_dir, &temp) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_owned(),
        (None, None) => unreachable!("a temp dir is created when no --data-dir is given"),
    };
    let mut config = Config {
        data_dir,
        ..Config::default()
    };
    config.hub.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.logging.filter = filter;
    config.supervision.drain_deadline = Duration::from_secs(5);
    // The stream is created by the start-up path; the demo starts its publisher itself once
    // the consumers are subscribed.
    config.streams = vec![StreamSpec {
        name: STREAM.to_owned(),
        partitions: args.partitions,
        durability: "interval:5ms".to_owned(),
        retention_bytes: None,
        retention_age: None,
        max_payload: args.size,
    }];
    config.synthetic = Vec::new();
    config.validate()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = rt.block_on(run(config, &args));
    drop(rt);
    if let Some(t) = temp {
        let path = t.path().to_owned();
        match t.close() {
            Ok(()) => println!("removed {}", path.display()),
            Err(e) => eprintln!("warning: could not remove {}: {e}", path.display()),
        }
    }
    outcome
}

async fn run(config: Config, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    // Ctrl-C or SIGTERM at any point ends the demo (before start-up completes, too).
    let (stop_tx, stop) = watch::channel(false);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
        stop_tx.send_replace(true);
    });

    let node = Node::start(config)?;
    let outcome = session(&node, args, stop).await;
    node.shutdown().await;
    println!("hub and shards stopped");
    let report = outcome?;
    Ok(if report {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Waits for `stop` to become true, or forever.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: no stop will ever come.
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Everything between start-up and shutdown; returns whether the run passed.
async fn session(
    node: &Node,
    args: &DemoArgs,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<bool> {
    let partitions = node
        .store
        .streams()
        .into_iter()
        .find(|(n, _)| n == STREAM)
        .map(|(_, c)| c.partitions)
        .context("the demo stream was not created")?;
    let total_shards: usize = node
        .config
        .shards
        .groups
        .iter()
        .map(|g| g.shards as usize)
        .sum();
    println!(
        "sibyl demo: hub {} · data dir {} · stream {STREAM}: {partitions} partitions, {} records/s of {} B",
        node.hub_addr,
        node.dir.root.display(),
        args.rate,
        args.size
    );
    if let Some(a) = &node.admin {
        println!(
            "  status page http://{}/ (metrics at /metrics)",
            a.local_addr()
        );
    }

    // Every configured shard ready before the consumers ask for tickets.
    let ready_by = node.config.supervision.startup_timeout + Duration::from_secs(5);
    let shards = tokio::select! {
        r = tokio::time::timeout(ready_by, wait_ready(node, total_shards)) => match r {
            Ok(s) => s,
            Err(_) => bail!("the shards were not ready within {ready_by:?}"),
        },
        () = stopped(&mut stop) => return Ok(false),
    };
    for s in &shards {
        println!(
            "  shard {} pid={} addr={}",
            shard_label(s.group, s.id.index),
            s.pid,
            s.addr
        );
    }

    let mut keys = ApiKeyStore::load(&node.dir.api_keys)?;
    let key = keys
        .create("sibyl-demo", &[format!("{STREAM}:subscribe")], unix_now())?
        .key;
    node.hub.set_api_keys(keys);

    let mut first = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        first.push(node.store.bounds(STREAM, p)?.0);
    }
    let (halt_tx, halt) = watch::channel(false);
    let mut consumers = Vec::new();
    for i in 0..args.consumers {
        let state = Arc::new(Mutex::new(ConsumerState::new(&first)));
        let task = tokio::spawn(consume(
            node.hub_addr.to_string(),
            node.dir.certs.ca_cert.clone(),
            key.clone(),
            args.mode.sdk(),
            state.clone(),
            halt.clone(),
        ));
        consumers.push(Consumer {
            name: format!("c{i}"),
            state,
            task,
            last: 0,
            rates: Vec::new(),
        });
    }
    println!(
        "  {} consumers (each its own SDK client, {} mode) subscribed from the earliest offset; {}",
        args.consumers,
        args.mode.name(),
        if args.seconds == 0 {
            "Ctrl-C to stop".to_owned()
        } else {
            format!("running {}s (Ctrl-C stops early)", args.seconds)
        }
    );

    // Publishing starts now: every record it appends lies past `first`.
    let synthetic = Synthetic::start(
        node.store.clone(),
        SyntheticSpec {
            name: STREAM.to_owned(),
            partitions,
            rate: args.rate,
            size: args.size,
            skew: args.skew,
        },
    )?;
    let live = Instant::now();
    let deadline = (args.seconds > 0).then(|| live + Duration::from_secs(args.seconds));
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut last_published = 0;
    let mut last_tick = Instant::now();
    let mut interrupted = false;
    loop {
        let until_end = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                let secs = now.duration_since(last_tick).as_secs_f64().max(1e-3);
                last_tick = now;
                let ends = log_ends(node, partitions);
                let p = lag(&ends, &first);
                let mut line = format!(
                    "[{:>4.0}s] published {:>7.0}/s",
                    live.elapsed().as_secs_f64(),
                    (p - last_published) as f64 / secs
                );
                last_published = p;
                for c in &mut consumers {
                    let s = c.lock();
                    let rate = (s.check.delivered - c.last) as f64 / secs;
                    let lag = lag(&ends, &s.check.next);
                    let shard = s.shard_label(&shards);
                    let delivered = s.check.delivered;
                    drop(s);
                    c.last = delivered;
                    c.rates.push(rate);
                    line.push_str(&format!(" | {} @{shard} {rate:>7.0}/s lag {lag:>6}", c.name));
                }
                println!("{line}");
            }
            () = until_end => break,
            () = stopped(&mut stop) => { interrupted = true; break; }
        }
    }

    // Stop publishing, then give every consumer a bounded time to reach the final log end.
    let publish_time = live.elapsed();
    drop(synthetic);
    let ends = log_ends(node, partitions);
    let total_published = lag(&ends, &first);
    let mut caught_up = true;
    if !interrupted {
        println!("publisher stopped; waiting for the consumers to reach the log end…");
        let wait = async {
            loop {
                let done = consumers.iter().all(|c| {
                    let s = c.lock();
                    s.finished || lag(&ends, &s.check.next) == 0
                });
                if done {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            r = tokio::time::timeout(CATCH_UP, wait) => caught_up = r.is_ok(),
            () = stopped(&mut stop) => { interrupted = true; caught_up = false; }
        }
    }
    halt_tx.send_replace(true);
    for c in &mut consumers {
        // A JoinError (a panic in a consumer) is reported as that consumer's error.
        if let Err(e) = (&mut c.task).await {
            c.lock().errors.push(format!("consumer task: {e}"));
        }
    }

    // Summary.
    let secs = publish_time.as_secs_f64().max(1e-3);
    println!(
        "summary: {:.1}s{}, published {total_published} records ({:.0}/s) over {partitions} partitions, {} consumers",
        secs,
        if interrupted { " (interrupted)" } else { "" },
        total_published as f64 / secs,
        consumers.len()
    );
    let mut ok = true;
    for c in &consumers {
        let s = c.lock();
        let final_lag = lag(&ends, &s.check.next);
        let (min, median, max) = min_median_max(&c.rates).unwrap_or((0.0, 0.0, 0.0));
        println!(
            "  {} @{}: delivered {} · records/s min {min:.0} median {median:.0} max {max:.0} · final lag {final_lag} · gaps {} (missing {}) · duplicates {} · corrupt {} · sdk duplicates dropped {} · reconnects {}",
            c.name,
            s.shard_label(&shards),
            s.check.delivered,
            s.check.gaps,
            s.check.missing,
            s.check.duplicates,
            s.check.corrupt,
            s.duplicates_dropped,
            s.reconnects,
        );
        for e in &s.errors {
            println!("    error: {e}");
        }
        let passed = s.check.delivered > 0 && s.check.is_clean() && s.errors.is_empty();
        ok &= passed && (interrupted || final_lag == 0);
    }
    if !caught_up && !interrupted {
        println!("  consumers did not reach the log end within {CATCH_UP:?}");
    }
    if ok {
        println!(
            "result: OK: every consumer received its records in order, with no gap and no duplicate"
        );
    } else {
        println!("result: FAILED");
    }
    Ok(ok)
}

/// Waits until `total` shards are ready, returns them ordered by group and index.
async fn wait_ready(node: &Node, total: usize) -> Vec<sibyl_gateway::ShardInfo> {
    loop {
        let mut ready: Vec<_> = node
            .config
            .shards
            .groups
            .iter()
            .flat_map(|g| node.supervisor.ready_shards(g.id))
            .collect();
        if ready.len() >= total {
            ready.sort_by_key(|s| (s.id.group, s.id.index));
            return ready;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next offset of every partition (the log end).
fn log_ends(node: &Node, partitions: u32) -> Vec<u64> {
    (0..partitions)
        .map(|p| node.store.bounds(STREAM, p).map_or(0, |b| b.1))
        .collect()
}

fn shard_label(group: u32, index: u32) -> String {
    format!("g{group}.s{index}")
}

/// Records between the log ends and the next offsets a consumer expects (or the offsets
/// the demo started at: records published since).
fn lag(ends: &[u64], next: &[u64]) -> u64 {
    ends.iter()
        .zip(next)
        .map(|(e, n)| e.saturating_sub(*n))
        .sum()
}

/// Minimum, median (upper middle for an even count) and maximum of `samples`.
fn min_median_max(samples: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some((v[0], v[v.len() / 2], v[v.len() - 1]))
}

/// What one record did to a [`SeqCheck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The next offset of its partition, with the matching payload sequence.
    InOrder,
    /// Offsets were skipped (`missing` of them); the check continues after this record.
    Gap { missing: u64 },
    /// At or before an offset already received.
    Duplicate,
    /// The payload's sequence does not match the offset (or is too short to hold it).
    Corrupt,
    /// A partition the stream does not have.
    UnknownPartition,
}

/// I/O-free delivery check of one consumer: per partition, offsets must be contiguous from
/// the first expected offset, and each payload must start with its offset (little endian,
/// as [`sibyl_gateway::synthetic::fill_payload`] writes it).
#[derive(Debug, Clone)]
struct SeqCheck {
    /// Per partition, the next offset expected.
    next: Vec<u64>,
    delivered: u64,
    gaps: u64,
    missing: u64,
    duplicates: u64,
    corrupt: u64,
    unknown: u64,
}

impl SeqCheck {
    /// Expects partition `p` to start at `first[p]`.
    fn new(first: &[u64]) -> Self {
        Self {
            next: first.to_vec(),
            delivered: 0,
            gaps: 0,
            missing: 0,
            duplicates: 0,
            corrupt: 0,
            unknown: 0,
        }
    }

    fn on_record(&mut self, partition: u32, offset: u64, payload: &[u8]) -> Verdict {
        self.delivered += 1;
        let Some(next) = self.next.get_mut(partition as usize) else {
            self.unknown += 1;
            return Verdict::UnknownPartition;
        };
        if offset < *next {
            self.duplicates += 1;
            return Verdict::Duplicate;
        }
        let skipped = offset - *next;
        *next = offset + 1;
        let seq = payload
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes);
        if seq != Some(offset) {
            self.corrupt += 1;
            return Verdict::Corrupt;
        }
        if skipped > 0 {
            self.gaps += 1;
            self.missing += skipped;
            return Verdict::Gap { missing: skipped };
        }
        Verdict::InOrder
    }

    fn is_clean(&self) -> bool {
        self.gaps == 0 && self.duplicates == 0 && self.corrupt == 0 && self.unknown == 0
    }
}

/// One consumer as the progress loop sees it.
struct Consumer {
    name: String,
    state: Arc<Mutex<ConsumerState>>,
    task: tokio::task::JoinHandle<()>,
    /// Delivered count at the previous progress line.
    last: u64,
    /// Records/s of every progress line.
    rates: Vec<f64>,
}

impl Consumer {
    fn lock(&self) -> MutexGuard<'_, ConsumerState> {
        // Poisoned only by a panic in the consumer task, which is reported as its error;
        // the counters are still the last ones written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Shared between a consumer task and the progress loop.
#[derive(Debug)]
struct ConsumerState {
    check: SeqCheck,
    /// The shard endpoint the client is attached to (`ip:port`).
    shard: Option<String>,
    duplicates_dropped: u64,
    reconnects: u64,
    errors: Vec<String>,
    /// The consumer task ended (error or halt).
    finished: bool,
}

impl ConsumerState {
    fn new(first: &[u64]) -> Self {
        Self {
            check: SeqCheck::new(first),
            shard: None,
            duplicates_dropped: 0,
            reconnects: 0,
            errors: Vec::new(),
            finished: false,
        }
    }

    /// `g0.s1` for the shard the client is attached to, `-` when not attached.
    fn shard_label(&self, shards: &[sibyl_gateway::ShardInfo]) -> String {
        let Some(addr) = &self.shard else {
            return "-".to_owned();
        };
        shards
            .iter()
            .find(|s| s.addr.to_string() == *addr)
            .map_or_else(|| addr.clone(), |s| shard_label(s.group, s.id.index))
    }
}

/// One consumer: its own client and subscription, checking every record until `halt`.
async fn consume(
    hub: String,
    ca: PathBuf,
    key: String,
    mode: Mode,
    state: Arc<Mutex<ConsumerState>>,
    halt: watch::Receiver<bool>,
) {
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = consume_inner(hub, ca, key, mode, &state, halt).await {
        lock().errors.push(format!("{e:#}"));
    }
    lock().finished = true;
}

async fn consume_inner(
    hub: String,
    ca: PathBuf,
    key: String,
    mode: Mode,
    state: &Mutex<ConsumerState>,
    mut halt: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let client = Client::builder()
        .hub(hub.as_str())
        .trust(Trust::CaFile(ca))
        .api_key(key)
        .want_subscribe(STREAM)
        .connect()
        .await
        .context("connecting")?;
    lock().shard = client.shard_endpoint().map(|e| e.addr);
    let mut sub = client
        .subscribe(STREAM)
        .start(Start::Earliest)
        .mode(mode)
        .open()
        .await
        .context("subscribing")?;
    let mut refresh = tokio::time::interval(REFRESH);
    let result = loop {
        tokio::select! {
            biased;
            _ = halt.wait_for(|h| *h) => break Ok(()),
            _ = refresh.tick() => {
                let m = sub.metrics();
                let mut s = lock();
                s.shard = client.shard_endpoint().map(|e| e.addr);
                s.duplicates_dropped = m.duplicates_dropped;
                s.reconnects = m.reconnects;
            }
            r = sub.next() => match r {
                Some(Ok(rec)) => {
                    lock().check.on_record(rec.partition, rec.offset, &rec.payload);
                }
                Some(Err(e)) => break Err(anyhow::Error::new(e).context("subscription")),
                None => break Err(anyhow::anyhow!("subscription ended")),
            },
        }
    };
    // The SDK's positions (next offset per partition seen) must agree with what was checked.
    let positions: BTreeMap<u32, u64> = sub.positions();
    let m = sub.metrics();
    {
        let mut s = lock();
        s.duplicates_dropped = m.duplicates_dropped;
        s.reconnects = m.reconnects;
        for (p, next) in positions {
            if let Some(&mine) = s.check.next.get(p as usize)
                && mine != next
            {
                s.errors.push(format!(
                    "partition {p}: SDK position {next} but {mine} records checked"
                ));
            }
        }
    }
    sub.close().await;
    client.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(seq: u64) -> Vec<u8> {
        let mut p = vec![0u8; 16];
        sibyl_gateway::synthetic::fill_payload(&mut p, seq);
        p
    }

    #[test]
    fn in_order_records_are_clean() {
        let mut c = SeqCheck::new(&[0, 5]);
        for o in 0..3 {
            assert_eq!(c.on_record(0, o, &payload(o)), Verdict::InOrder);
        }
        assert_eq!(c.on_record(1, 5, &payload(5)), Verdict::InOrder);
        assert!(c.is_clean());
        assert_eq!(c.delivered, 4);
        assert_eq!(c.next, vec![3, 6]);
    }

    #[test]
    fn gap_duplicate_corrupt_and_unknown_partition_are_counted() {
        let mut c = SeqCheck::new(&[0]);
        assert_eq!(c.on_record(0, 0, &payload(0)), Verdict::InOrder);
        assert_eq!(c.on_record(0, 3, &payload(3)), Verdict::Gap { missing: 2 });
        assert_eq!(c.on_record(0, 3, &payload(3)), Verdict::Duplicate);
        assert_eq!(c.on_record(0, 1, &payload(1)), Verdict::Duplicate);
        assert_eq!(c.on_record(0, 4, &payload(7)), Verdict::Corrupt);
        assert_eq!(c.on_record(0, 5, &[1, 2, 3]), Verdict::Corrupt);
        assert_eq!(c.on_record(1, 0, &payload(0)), Verdict::UnknownPartition);
        assert_eq!(
            (c.gaps, c.missing, c.duplicates, c.corrupt, c.unknown),
            (1, 2, 2, 2, 1)
        );
        assert!(!c.is_clean());
        // The check goes on after a corrupt record.
        assert_eq!(c.on_record(0, 6, &payload(6)), Verdict::InOrder);
    }

    #[test]
    fn a_first_record_past_the_expected_start_is_a_gap() {
        let mut c = SeqCheck::new(&[10]);
        assert_eq!(
            c.on_record(0, 12, &payload(12)),
            Verdict::Gap { missing: 2 }
        );
    }

    #[test]
    fn lag_sums_what_is_left_per_partition() {
        assert_eq!(lag(&[10, 20, 5], &[10, 15, 0]), 10);
        // A consumer ahead of a stale end snapshot has no negative lag.
        assert_eq!(lag(&[10], &[12]), 0);
    }

    #[test]
    fn min_median_max_of_samples() {
        assert_eq!(min_median_max(&[]), None);
        assert_eq!(min_median_max(&[3.0]), Some((3.0, 3.0, 3.0)));
        assert_eq!(
            min_median_max(&[5.0, 1.0, 4.0, 2.0, 3.0]),
            Some((1.0, 3.0, 5.0))
        );
        assert_eq!(min_median_max(&[2.0, 1.0, f64::NAN]), Some((1.0, 2.0, 2.0)));
    }
}
