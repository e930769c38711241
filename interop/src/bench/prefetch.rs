//! `sibyl-bench prefetch`: predictive pre-fetch vs reactive fetch through the impairment
//! proxy (seed 000), plus consumer-group stickiness on the assigner.
//!
//! ```text
//!  per RTT (20 ms, 80 ms): netem Proxy (delay RTT/2 each way) ──▶ shard (port_base P)
//!    sibyl-gateway [shards] port_base = P, [advertise.rewrite] "127.0.0.1:P" = "<proxy>"
//!    per trace (steady, ramp, burst, skewed) and mode (predictive, reactive):
//!      stream <trace>-<mode> (4 partitions) ◀── SDK Publisher: backlog (hub path, no proxy)
//!      SDK Subscription (Earliest) via the proxy ──▶ app loop: take a record, "process" it
//!        for 1/rate(t) ─▶ Subscription::metrics().prefetch: wait per record, received, taken
//!  group: GroupAssigner driven by a membership-change trace ─▶ moves beyond the minimum
//! ```
//!
//! Figures (last line on stdout): `figures.wait_p99_ms_rtt{20,80}` (predictive: the largest
//! per-trace p99 of app wait per record, i.e. the worst trace),
//! `baseline.wait_p99_ms_rtt{20,80}` (reactive, same traces), `figures.wasted_prefetch_ratio`
//! (records received and never taken — discarded or still buffered when the trace ended — over
//! records received; records are all the same size, so this is also the bytes ratio), and
//! `figures.group_moves_excess`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use sibyl_gateway::predict::{
    GroupAssigner, GroupConfig, MemberId, PartitionState, minimal_moves, moved,
};
use sibyl_sdk::{Client, Mode, PublisherConfig, Start, SubscriptionConfig, Trust};

use super::gateway::GatewayProcess;
use super::{Figures, Summary};
use crate::netem::{DirectionConfig, Impairment, Proxy};

/// `sibyl-bench prefetch [--quick] [--json-only]`.
#[derive(Debug, Clone, Parser)]
#[command(name = "sibyl-bench prefetch")]
pub struct PrefetchArgs {
    /// A few seconds: two traces (steady, burst) of 2 s per RTT and mode.
    #[arg(long)]
    pub quick: bool,
    /// Print only the JSON line.
    #[arg(long)]
    pub json_only: bool,
    /// Seconds per trace (full mode). Default 8.
    #[arg(long, default_value_t = 8.0)]
    pub trace_secs: f64,
    /// Reactive baseline: records per `Fetch` (sent when a partition's buffer is empty).
    #[arg(long, default_value_t = 50)]
    pub fetch_records: u32,
}

/// Payload bytes of every record.
const PAYLOAD: usize = 256;
/// Partitions of every stream.
const PARTITIONS: u32 = 4;

/// A consumption trace: total records/s at `t` seconds into a trace of `len` seconds, and
/// how the backlog is spread over the partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trace {
    /// 1 000 records/s.
    Steady,
    /// 200 → 2 000 records/s, linear.
    Ramp,
    /// 400 records/s with 2 000 records/s in the middle fifth and the last tenth.
    Burst,
    /// 1 000 records/s over a backlog skewed 55/25/15/5 % across the partitions.
    Skewed,
}

impl Trace {
    fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Ramp => "ramp",
            Self::Burst => "burst",
            Self::Skewed => "skewed",
        }
    }

    fn rate(self, t: f64, len: f64) -> f64 {
        let x = (t / len).clamp(0.0, 1.0);
        match self {
            Self::Steady | Self::Skewed => 1000.0,
            Self::Ramp => 200.0 + 1800.0 * x,
            Self::Burst => {
                if (0.4..0.6).contains(&x) || x >= 0.9 {
                    2000.0
                } else {
                    400.0
                }
            }
        }
    }

    /// Share of the backlog per partition.
    fn weights(self) -> [f64; PARTITIONS as usize] {
        match self {
            Self::Skewed => [0.55, 0.25, 0.15, 0.05],
            _ => [0.25; 4],
        }
    }
}

/// What one (trace, mode) run measured.
#[derive(Debug, Clone, Copy)]
struct RunResult {
    wait_p99_ms: f64,
    wait_p50_ms: f64,
    hit_ratio: f64,
    received: u64,
    taken: u64,
    wasted: u64,
    mase: Option<f64>,
}

/// Runs the scenario; the summary's JSON line is printed by the caller.
pub async fn run(args: &PrefetchArgs) -> anyhow::Result<Summary> {
    let (traces, len): (&[Trace], f64) = if args.quick {
        (&[Trace::Steady, Trace::Burst], 2.0)
    } else {
        (
            &[Trace::Steady, Trace::Ramp, Trace::Burst, Trace::Skewed],
            args.trace_secs.max(1.0),
        )
    };
    let mut figures = Figures::new();
    let mut baseline = Figures::new();
    let (mut wasted, mut received) = (0u64, 0u64);
    let (mut base_wasted, mut base_received) = (0u64, 0u64);
    for rtt_ms in [20u64, 80] {
        let results = run_rtt(args, rtt_ms, traces, len).await?;
        let mut worst = (0.0f64, 0.0f64);
        for ((trace, mode), r) in &results {
            if !args.json_only {
                eprintln!(
                    "prefetch rtt={rtt_ms}ms {:<7} {:<10} wait p50={:.3}ms p99={:.3}ms hit={:.4} received={} taken={} wasted={} mase={}",
                    trace.name(),
                    format!("{mode:?}"),
                    r.wait_p50_ms,
                    r.wait_p99_ms,
                    r.hit_ratio,
                    r.received,
                    r.taken,
                    r.wasted,
                    r.mase.map_or("-".into(), |m| format!("{m:.2}")),
                );
            }
            let tag = format!("rtt{rtt_ms}_{}", trace.name());
            if *mode == Mode::Predictive {
                worst.0 = worst.0.max(r.wait_p99_ms);
                wasted += r.wasted;
                received += r.received;
                figures.insert(format!("wait_p99_ms_{tag}"), r.wait_p99_ms);
                figures.insert(format!("hit_ratio_{tag}"), r.hit_ratio);
                if let Some(m) = r.mase {
                    figures.insert(format!("mase_{tag}"), m);
                }
            } else {
                worst.1 = worst.1.max(r.wait_p99_ms);
                base_wasted += r.wasted;
                base_received += r.received;
                baseline.insert(format!("wait_p99_ms_{tag}"), r.wait_p99_ms);
                baseline.insert(format!("hit_ratio_{tag}"), r.hit_ratio);
            }
        }
        figures.insert(format!("wait_p99_ms_rtt{rtt_ms}"), worst.0);
        baseline.insert(format!("wait_p99_ms_rtt{rtt_ms}"), worst.1);
    }
    figures.insert(
        "wasted_prefetch_ratio".into(),
        wasted as f64 / received.max(1) as f64,
    );
    baseline.insert(
        "wasted_prefetch_ratio".into(),
        base_wasted as f64 / base_received.max(1) as f64,
    );
    baseline.insert("fetch_records".into(), f64::from(args.fetch_records));
    let (excess, changes) = group_moves_excess();
    figures.insert("group_moves_excess".into(), excess as f64);
    figures.insert("group_membership_changes".into(), changes as f64);
    let summary = Summary {
        scenario: "prefetch".into(),
        figures,
        baseline,
    };
    if !args.json_only {
        for rtt in [20, 80] {
            let k = format!("wait_p99_ms_rtt{rtt}");
            let (f, b) = (summary.figures[&k], summary.baseline[&k]);
            let ratio = b / f.max(0.001);
            eprintln!(
                "prefetch: reactive/predictive wait p99 at RTT {rtt} ms = {ratio:.1}x (target >= 10x, {})",
                if ratio >= 10.0 { "met" } else { "MISSED" }
            );
        }
        let w = summary.figures["wasted_prefetch_ratio"];
        eprintln!(
            "prefetch: wasted_prefetch_ratio = {w:.4} (target <= 0.05, {})",
            if w <= 0.05 { "met" } else { "MISSED" }
        );
        eprintln!(
            "prefetch: group_moves_excess = {excess} (target <= 1, {})",
            if excess <= 1 { "met" } else { "MISSED" }
        );
    }
    Ok(summary)
}

/// A UDP port free right now on 127.0.0.1 (bound and released; the kernel's choice).
fn free_port() -> anyhow::Result<u16> {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("probing a free UDP port")?;
    Ok(s.local_addr()?.port())
}

async fn run_rtt(
    args: &PrefetchArgs,
    rtt_ms: u64,
    traces: &[Trace],
    len: f64,
) -> anyhow::Result<Vec<((Trace, Mode), RunResult)>> {
    let port = free_port()?;
    let shard: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
    let proxy = Proxy::new(shard)
        .impairment(Impairment::symmetric(
            DirectionConfig {
                delay: Duration::from_millis(rtt_ms / 2),
                ..DirectionConfig::default()
            },
            rtt_ms,
        ))
        .spawn()
        .await
        .context("starting the impairment proxy")?;
    let modes = [Mode::Predictive, Mode::Reactive];
    let mut config = format!(
        "[shards]\nport_base = {port}\n\n[[shards.groups]]\nid = 0\nshards = 1\n\n\
         [advertise.rewrite]\n\"{shard}\" = \"{}\"\n\n",
        proxy.local_addr()
    );
    for t in traces {
        for m in modes {
            config.push_str(&format!(
                "[[streams]]\nname = \"{}\"\npartitions = {PARTITIONS}\ndurability = \"never\"\n\n",
                stream_name(*t, m)
            ));
        }
    }
    let gw = tokio::task::block_in_place(|| GatewayProcess::start(&config, 1, None))
        .context("starting sibyl-gateway")?;
    let mut builder = Client::builder()
        .hub(gw.hub().to_string().as_str())
        .trust(Trust::CaFile(gw.ca().to_path_buf()))
        .api_key(gw.dev_key().to_owned());
    for t in traces {
        for m in modes {
            builder = builder
                .want_publish(stream_name(*t, m))
                .want_subscribe(stream_name(*t, m));
        }
    }
    let client = builder.connect().await.context("connecting the SDK")?;
    let mut out = Vec::new();
    for &t in traces {
        for m in modes {
            let r = run_trace(&client, args, t, m, len)
                .await
                .with_context(|| format!("trace {} {m:?} at RTT {rtt_ms} ms", t.name()))?;
            out.push(((t, m), r));
        }
    }
    drop(client);
    drop(gw);
    proxy.shutdown().await;
    Ok(out)
}

fn stream_name(t: Trace, m: Mode) -> String {
    let m = if m == Mode::Predictive {
        "predictive"
    } else {
        "reactive"
    };
    format!("{}-{m}", t.name())
}

/// Records the trace consumes: ∫ rate, plus 20 % spare so the backlog never runs dry.
fn trace_records(t: Trace, len: f64) -> u64 {
    let steps = 1000;
    let dt = len / f64::from(steps);
    let total: f64 = (0..steps)
        .map(|i| t.rate((f64::from(i) + 0.5) * dt, len) * dt)
        .sum();
    (total * 1.2).ceil() as u64
}

async fn run_trace(
    client: &Client,
    args: &PrefetchArgs,
    trace: Trace,
    mode: Mode,
    len: f64,
) -> anyhow::Result<RunResult> {
    let stream = stream_name(trace, mode);
    // Backlog, spread over the partitions by the trace's weights (each partition gets at
    // least its share of the whole run, so no partition runs dry while the app consumes).
    let publisher = client
        .publisher_with(stream.clone(), PublisherConfig::default())
        .await
        .context("opening the publisher")?;
    let total = trace_records(trace, len);
    let body = vec![b'x'; PAYLOAD];
    let mut acks = Vec::new();
    for (p, w) in trace.weights().iter().enumerate() {
        let n = ((total as f64) * w * 1.5).ceil() as u64;
        for _ in 0..n {
            acks.push(publisher.send_to(p as u32, Vec::new(), body.clone()));
        }
    }
    for a in futures::future::join_all(acks).await {
        a.context("publishing the backlog")?;
    }
    publisher.close().await.context("closing the publisher")?;

    let mut cfg = SubscriptionConfig::default();
    if mode == Mode::Reactive {
        cfg = cfg.fetch_records(args.fetch_records)?.fetch_on_empty(true);
    }
    let mut sub = client
        .subscribe(stream)
        .start(Start::Earliest)
        .mode(mode)
        .config(cfg)
        .open()
        .await
        .context("subscribing")?;
    // The app: take a record, process it for 1/rate(t) (the trace's rate), ask again.
    let t0 = Instant::now();
    let mut due = t0;
    let end = t0 + Duration::from_secs_f64(len);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        match tokio::time::timeout(end - now, sub.next()).await {
            Ok(Some(r)) => {
                r.context("subscription")?;
            }
            Ok(None) => anyhow::bail!("subscription ended"),
            Err(_) => break,
        }
        let now = Instant::now();
        let rate = trace.rate(now.duration_since(t0).as_secs_f64(), len);
        // Processing time accumulates (the timer's 1 ms granularity averages out); time
        // spent waiting for a record is not made up for.
        if now > due + Duration::from_millis(5) {
            due = now;
        }
        due += Duration::from_secs_f64(1.0 / rate);
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        }
    }
    // Let what the shard sent before the app stopped land in the SDK's buffer: it counts as
    // sent and never used.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = sub.metrics();
    let p = m.prefetch;
    let taken = p.hits + p.misses;
    drop(sub);
    Ok(RunResult {
        wait_p99_ms: p.wait_p99.as_secs_f64() * 1e3,
        wait_p50_ms: p.wait_p50.as_secs_f64() * 1e3,
        hit_ratio: p.hit_ratio.unwrap_or(0.0),
        received: p.received,
        taken,
        wasted: p.received.saturating_sub(taken),
        mase: m.forecast_mase,
    })
}

/// Drives a [`GroupAssigner`] (12 partitions, equal load) through a membership-change trace
/// (joins, a leave, a rejoin, a capacity change), completing every handover; returns the
/// largest number of partitions moved beyond [`minimal_moves`] by one change, and the number
/// of changes. The assigner is the one the shard's consumer groups use; here it runs without
/// the network.
fn group_moves_excess() -> (usize, usize) {
    let now = Instant::now();
    let parts: BTreeSet<u32> = (0..12).collect();
    let mut g = GroupAssigner::new(parts.iter().copied(), GroupConfig::default());
    #[derive(Clone, Copy)]
    enum Op {
        Join(u64, f64),
        Leave(u64),
        Capacity(u64, f64),
    }
    let ops = [
        Op::Join(1, 1.0),
        Op::Join(2, 1.0),
        Op::Join(3, 1.0),
        Op::Join(4, 1.0),
        Op::Leave(2),
        Op::Join(5, 1.0),
        Op::Capacity(1, 2.0),
        Op::Leave(4),
        Op::Join(2, 1.0),
        Op::Leave(1),
        Op::Join(6, 3.0),
    ];
    let settle = |g: &mut GroupAssigner| {
        for _ in 0..100 {
            let _ = g.poll_assignments();
            let pending: Vec<(u32, MemberId)> = g
                .partitions()
                .filter_map(|p| match g.state(p) {
                    Some(PartitionState::Revoking { from, .. }) => Some((p, from)),
                    _ => None,
                })
                .collect();
            if pending.is_empty() {
                return;
            }
            for (p, from) in pending {
                g.position_known(from, p, 1000, now);
            }
        }
    };
    let owners = |g: &GroupAssigner| -> BTreeMap<u32, MemberId> {
        g.partitions()
            .filter_map(|p| g.owner(p).map(|m| (p, m)))
            .collect()
    };
    let mut worst = 0usize;
    for op in ops {
        settle(&mut g);
        let before = owners(&g);
        match op {
            Op::Join(m, c) => {
                let _ = g.join(MemberId(m), c, now);
            }
            Op::Leave(m) => {
                let _ = g.leave(MemberId(m), now);
            }
            Op::Capacity(m, c) => {
                let _ = g.set_capacity(MemberId(m), c, now);
            }
        }
        settle(&mut g);
        let after = owners(&g);
        let min = minimal_moves(&before, &g.members(), &parts);
        worst = worst.max(moved(&before, &after).saturating_sub(min));
    }
    (worst, ops.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_cover_their_rates() {
        assert_eq!(Trace::Steady.rate(1.0, 8.0), 1000.0);
        assert_eq!(Trace::Ramp.rate(0.0, 8.0), 200.0);
        assert_eq!(Trace::Ramp.rate(8.0, 8.0), 2000.0);
        assert_eq!(Trace::Burst.rate(4.0, 8.0), 2000.0);
        assert_eq!(Trace::Burst.rate(1.0, 8.0), 400.0);
        // 1 000/s × 2 s, +20 %.
        assert_eq!(trace_records(Trace::Steady, 2.0), 2400);
        let w: f64 = Trace::Skewed.weights().iter().sum();
        assert!((w - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_assigner_moves_about_the_minimum() {
        let (excess, changes) = group_moves_excess();
        assert_eq!(changes, 11);
        assert!(excess <= 1, "{excess}");
    }
}
