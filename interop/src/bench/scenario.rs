//! Scenarios: command line, the [`SibylHalf`] seam, and the runner that interleaves the
//! Sibyl half and the baseline per repeat and reduces them to a [`Summary`].

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::quic::{self, BaselineServer, BenchTls, Transport};
use super::{BenchError, Figures, Summary, median, median_figures, millis};

/// The scenarios `sibyl-bench` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum Scenario {
    /// Completed tickets/s (handshake + Hello + Ticket, fresh connections) vs bare quinn
    /// handshakes/s, both with `--concurrency` connectors.
    Admission,
    /// Cold (hub + shard) and warm (cached ticket) `connect()`-to-attached time vs one bare
    /// quinn handshake.
    Attach,
    /// Sibyl bulk delivery vs bare quinn streaming the same bytes on one uni stream.
    Throughput,
    /// The baseline of `admission` alone.
    BaselineAdmission,
    /// The baseline of `attach` alone.
    BaselineAttach,
    /// The baseline of `throughput` alone.
    BaselineThroughput,
}

impl Scenario {
    /// The name on the command line and in the JSON summary.
    pub fn name(self) -> &'static str {
        match self {
            Self::Admission => "admission",
            Self::Attach => "attach",
            Self::Throughput => "throughput",
            Self::BaselineAdmission => "baseline-admission",
            Self::BaselineAttach => "baseline-attach",
            Self::BaselineThroughput => "baseline-throughput",
        }
    }

    /// Whether the Sibyl half runs (false for `baseline-*`).
    pub fn with_sibyl(self) -> bool {
        matches!(self, Self::Admission | Self::Attach | Self::Throughput)
    }

    /// The ratios (figure / baseline) this scenario is judged by, with their targets.
    pub fn ratios(self) -> &'static [Ratio] {
        match self {
            Self::Admission | Self::BaselineAdmission => &[Ratio {
                figure: "tickets_per_s",
                baseline: "quinn_handshakes_per_s",
                target: Target::AtLeast(0.8),
            }],
            Self::Attach | Self::BaselineAttach => &[
                Ratio {
                    figure: "cold_attach_ms",
                    baseline: "quinn_handshake_ms",
                    target: Target::AtMost(2.5),
                },
                Ratio {
                    figure: "warm_attach_ms",
                    baseline: "quinn_handshake_ms",
                    target: Target::AtMost(1.3),
                },
            ],
            Self::Throughput | Self::BaselineThroughput => &[Ratio {
                figure: "bytes_per_s_16k",
                baseline: "quinn_bytes_per_s",
                target: Target::AtLeast(0.8),
            }],
        }
    }

    /// Figures judged on their own (no baseline) with their targets, e.g. records/s on
    /// this machine.
    pub fn absolutes(self) -> &'static [(&'static str, Target)] {
        match self {
            Self::Throughput => &[
                ("records_per_s_100b", Target::AtLeast(1_000_000.0)),
                ("publish_records_per_s_100b", Target::AtLeast(500_000.0)),
            ],
            _ => &[],
        }
    }
}

/// A ratio `figures[figure] / baseline[baseline]` and its target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ratio {
    /// Key in [`Summary::figures`].
    pub figure: &'static str,
    /// Key in [`Summary::baseline`].
    pub baseline: &'static str,
    /// What the ratio must satisfy.
    pub target: Target,
}

/// A ratio's target.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Target {
    /// The ratio must be at least this.
    AtLeast(f64),
    /// The ratio must be at most this.
    AtMost(f64),
    /// Reported only; no target in the issues yet.
    None,
}

impl Target {
    /// Whether `ratio` meets the target (always true for [`Target::None`]).
    pub fn met(self, ratio: f64) -> bool {
        match self {
            Self::AtLeast(t) => ratio >= t,
            Self::AtMost(t) => ratio <= t,
            Self::None => true,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AtLeast(t) => write!(f, "target >= {t}"),
            Self::AtMost(t) => write!(f, "target <= {t}"),
            Self::None => f.write_str("no target"),
        }
    }
}

/// `sibyl-bench` command line.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "sibyl-bench",
    about = "Sibyl benchmark scenarios, each with its baseline in the same run; \
             the last stdout line is a JSON summary"
)]
pub struct Settings {
    /// The scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Repeats (medians are taken over them). Default: admission 3, attach 50,
    /// throughput 3; with --quick 1, 10, 1.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub repeats: Option<u32>,
    /// Smaller sizes for smoke runs in CI (1 s admission runs, 32 MiB transfers, fewer
    /// repeats). Numbers from quick runs are not the published figures.
    #[arg(long)]
    pub quick: bool,
    /// Print only the JSON summary line (no progress, no ratio line).
    #[arg(long)]
    pub json_only: bool,
    /// Concurrent connectors in `admission`.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// Length of one `admission` run (e.g. `5s`). Default 5 s, --quick 1 s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Bytes per `throughput` run. Default 512 MiB, --quick 32 MiB.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=quic::MAX_STREAM_TOTAL))]
    pub bytes: Option<u64>,
    /// Write size of `throughput` (bytes).
    #[arg(long, default_value_t = 16 * 1024, value_parser = clap::value_parser!(u64).range(1..=quic::MAX_WRITE_SIZE))]
    pub write_size: u64,
    /// Run the baseline with `quinn::TransportConfig::default()` instead of
    /// `quic::transport_config()` (for before/after comparisons of the tuning only).
    #[arg(long)]
    pub quinn_default_transport: bool,
    /// Bind the baseline server here instead of 127.0.0.1:0 (loopback), e.g. as the
    /// upstream of `sibyl-netem`.
    #[arg(long)]
    pub server_bind: Option<SocketAddr>,
    /// Make baseline clients connect here (e.g. a `sibyl-netem` listening address) instead
    /// of the baseline server's own address.
    #[arg(long)]
    pub connect_via: Option<SocketAddr>,
    /// Start the gateway with `[admin] enabled = false` (no admin listener, no shard metric
    /// reports): the metrics-off side of the observability cost A/B (`throughput`).
    #[arg(long)]
    pub no_admin: bool,
}

impl Settings {
    fn repeats_or(&self, full: u32, quick: u32) -> usize {
        let n = self
            .repeats
            .unwrap_or(if self.quick { quick } else { full })
            .max(1);
        // u32 always fits in usize on the 32/64-bit targets we build for.
        usize::try_from(n).unwrap_or(1)
    }

    fn duration(&self) -> Duration {
        self.duration.unwrap_or(if self.quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        })
    }

    fn bytes(&self) -> u64 {
        self.bytes
            .unwrap_or(if self.quick { 32 << 20 } else { 512 << 20 })
    }

    fn transport(&self) -> Transport {
        if self.quinn_default_transport {
            Transport::QuinnDefault
        } else {
            Transport::Sibyl
        }
    }

    fn progress(&self, line: std::fmt::Arguments<'_>) {
        if !self.json_only {
            crate::progress::bench_line(line);
        }
    }
}

/// What a Sibyl `throughput` measurement is asked to move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ThroughputParams {
    /// Bytes to deliver for the bulk figure (`bytes_per_s_16k`); the baseline moves the same.
    pub total_bytes: u64,
    /// Payload size of the bulk figure's records/writes (16 KiB by default).
    pub write_size: u64,
    /// Payload size of the small-record figures (`records_per_s_100b`,
    /// `publish_records_per_s_100b`): 100 bytes.
    pub small_record: u64,
}

/// One cold `attach` sample: building the SDK client (not part of the figure) and its
/// `connect()` to attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ColdSample {
    /// `ClientBuilder::build`: configuration checked, trust loaded, UDP socket bound.
    pub build: Duration,
    /// `Connector::connect` to attached: the figure `cold_attach_ms`.
    pub connect: Duration,
}

impl ColdSample {
    /// A sample of `build` then `connect`.
    pub fn new(build: Duration, connect: Duration) -> Self {
        Self { build, connect }
    }
}

/// The Sibyl half of the scenarios. Each method measures ONE repeat; the runner interleaves
/// it with the baseline's repeat and takes medians. Every method defaults to
/// [`BenchError::SibylNotBuilt`], so an implementation fills in scenarios one at a time.
///
/// The implementation owns its setup (in-process hub, shard processes, SDK client) and is
/// built before the run from the same [`BenchTls`] files the baseline uses (serve
/// `tls.paths().server_cert`/`server_key`, trust `ca_cert`) and with
/// [`quic::transport_config`] on every endpoint.
pub trait SibylHalf {
    /// `admission`: completed tickets per second over `duration` with `concurrency`
    /// connectors, each ticket on a fresh connection (handshake + Hello + Ticket), the
    /// rate being completed tickets / wall time until the last connector stopped (as
    /// [`quic::handshakes_per_s`]). Figure `tickets_per_s`.
    fn tickets_per_s(
        &mut self,
        concurrency: usize,
        duration: Duration,
    ) -> impl Future<Output = Result<f64, BenchError>> {
        let _ = (concurrency, duration);
        async {
            Err(BenchError::SibylNotBuilt {
                scenario: "admission",
            })
        }
    }

    /// `attach`, cold: a fresh SDK client with no cached ticket; time from `connect()` to
    /// attached (hub handshake + Hello/Ticket + shard handshake + Attach), on a client built
    /// (configuration checked, trust loaded, UDP socket bound) before the clock starts, as
    /// the baseline's endpoint is. Figure `cold_attach_ms`; the build itself is reported as
    /// `cold_build_ms`. The runner discards the first sample.
    fn cold_attach(&mut self) -> impl Future<Output = Result<ColdSample, BenchError>> {
        async { Err(BenchError::SibylNotBuilt { scenario: "attach" }) }
    }

    /// `attach`, warm: a client holding a valid cached ticket goes straight to the shard;
    /// time from `connect()` to attached. Figure `warm_attach_ms`. The runner discards the
    /// first sample.
    fn warm_attach(&mut self) -> impl Future<Output = Result<Duration, BenchError>> {
        async { Err(BenchError::SibylNotBuilt { scenario: "attach" }) }
    }

    /// `throughput`: one repeat of the Sibyl delivery figures, keys `bytes_per_s_16k`,
    /// `records_per_s_100b`, `publish_records_per_s_100b` (any subset; missing keys are
    /// simply absent from the summary).
    fn throughput(
        &mut self,
        params: ThroughputParams,
    ) -> impl Future<Output = Result<Figures, BenchError>> {
        let _ = params;
        async {
            Err(BenchError::SibylNotBuilt {
                scenario: "throughput",
            })
        }
    }
}

/// Pause before every `attach` sample (Sibyl and baseline alike), so that no sample
/// overlaps the teardown of the one before.
const ATTACH_SETTLE: Duration = Duration::from_millis(10);

/// The `attach` scenario's informational second baseline: the bare quinn server in another
/// process ([`quic::OtherProcessServer`]), when this process is the `sibyl-bench` binary
/// (which can be re-executed as that server); `None` elsewhere (e.g. a test harness).
fn other_process_server(tls: &BenchTls) -> Result<Option<quic::OtherProcessServer>, BenchError> {
    let Ok(exe) = std::env::current_exe() else {
        return Ok(None);
    };
    if exe.file_stem().and_then(|s| s.to_str()) != Some("sibyl-bench") {
        return Ok(None);
    }
    tokio::task::block_in_place(|| quic::OtherProcessServer::start(&exe, tls)).map(Some)
}

/// The Sibyl half before the gateway and SDK exist: every scenario reports
/// [`BenchError::SibylNotBuilt`].
#[derive(Clone, Copy, Debug, Default)]
pub struct NotBuilt;

impl SibylHalf for NotBuilt {}

/// Runs `settings.scenario` against `sibyl` (ignored for `baseline-*`), prints progress and
/// the ratio line to stderr (unless `--json-only`) and returns the summary; the caller
/// prints [`Summary::to_json_line`] last on stdout. Must run inside a tokio runtime.
///
/// Per repeat the Sibyl half runs first, so a missing half fails before any baseline time
/// is spent and no partial summary is produced.
pub async fn run<S: SibylHalf>(
    settings: &Settings,
    tls: &BenchTls,
    sibyl: &mut S,
) -> Result<Summary, BenchError> {
    let transport = settings.transport();
    let bind = settings
        .server_bind
        .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    if !bind.ip().is_loopback() {
        return Err(BenchError::BadParameter(
            "--server-bind must be a loopback address",
        ));
    }
    let mut server = BaselineServer::start_on(tls, transport, bind)?;
    if let Some(via) = settings.connect_via {
        if !via.ip().is_loopback() {
            return Err(BenchError::BadParameter(
                "--connect-via must be a loopback address",
            ));
        }
        server.connect_via(via);
    }
    let with_sibyl = settings.scenario.with_sibyl();
    let mut figures = Figures::new();
    let mut baseline = Figures::new();
    let name = settings.scenario.name();
    if transport != Transport::Sibyl {
        settings.progress(format_args!(
            "{name}: baseline with quinn's default transport config"
        ));
    }

    match settings.scenario {
        Scenario::Admission | Scenario::BaselineAdmission => {
            let repeats = settings.repeats_or(3, 1);
            let concurrency = usize::try_from(settings.concurrency).unwrap_or(4);
            let duration = settings.duration();
            let mut sibyl_rates = Vec::with_capacity(repeats);
            let mut quinn_rates = Vec::with_capacity(repeats);
            let mut floor_rates = Vec::with_capacity(repeats);
            // The floor's server is in another process, as the hub is.
            let other = match with_sibyl {
                true => other_process_server(tls)?,
                false => None,
            };
            for r in 1..=repeats {
                if with_sibyl {
                    let t = sibyl.tickets_per_s(concurrency, duration).await?;
                    settings.progress(format_args!("{name} {r}/{repeats}: sibyl {t:.0} tickets/s"));
                    sibyl_rates.push(t);
                }
                let h =
                    quic::handshakes_per_s(tls, &server, transport, concurrency, duration).await?;
                settings.progress(format_args!(
                    "{name} {r}/{repeats}: quinn {h:.0} handshakes/s ({concurrency} connectors)"
                ));
                quinn_rates.push(h);
                if let Some(o) = &other {
                    let f = quic::exchanges_per_s(tls, o.addr(), transport, concurrency, duration)
                        .await?;
                    settings.progress(format_args!(
                        "{name} {r}/{repeats}: floor {f:.0}/s (quinn handshake + one \
                         request/response, server in another process)"
                    ));
                    floor_rates.push(f);
                }
            }
            if with_sibyl {
                figures.insert("tickets_per_s".into(), median(&mut sibyl_rates));
            }
            let q = median(&mut quinn_rates);
            baseline.insert("quinn_handshakes_per_s".into(), q);
            if !floor_rates.is_empty() {
                let f = median(&mut floor_rates);
                settings.progress(format_args!(
                    "{name}: admission floor, bare quinn on a ticket's path (handshake, then \
                     one request/response, server in another process; not a target's \
                     baseline): median {f:.0}/s = {:.3}x quinn_handshakes_per_s",
                    f / q
                ));
                baseline.insert("quinn_exchanges_other_process_per_s".into(), f);
            }
        }
        Scenario::Attach | Scenario::BaselineAttach => {
            let repeats = settings.repeats_or(50, 10);
            let mut cold = Vec::with_capacity(repeats);
            let mut cold_build = Vec::with_capacity(repeats);
            let mut warm = Vec::with_capacity(repeats);
            let mut quinn_ms = Vec::with_capacity(repeats);
            let mut other_ms = Vec::with_capacity(repeats);
            let mut floor_ms = Vec::with_capacity(repeats);
            let other = other_process_server(tls)?;
            // A second one for the cold floor's second leg (a hub and a shard are two
            // processes); the floor is only measured next to a Sibyl run.
            let other2 = match (&other, with_sibyl) {
                (Some(_), true) => other_process_server(tls)?,
                _ => None,
            };
            // Sample 0 of each series is a warm-up and is discarded.
            for r in 0..=repeats {
                // Every sample starts on an idle system: the previous sample's connections
                // are closed, and their teardown (hub, shard, server) is given time to end.
                let settle = || tokio::time::sleep(ATTACH_SETTLE);
                let sample = if with_sibyl {
                    settle().await;
                    let c = sibyl.cold_attach().await?;
                    settle().await;
                    let w = millis(sibyl.warm_attach().await?);
                    Some((c, w))
                } else {
                    None
                };
                settle().await;
                let q = millis(quic::handshake_once(tls, &server, transport).await?);
                let o = match &other {
                    Some(o) => {
                        settle().await;
                        Some(millis(
                            quic::handshake_once_to(tls, o.addr(), transport).await?,
                        ))
                    }
                    None => None,
                };
                let f = match (&other, &other2) {
                    (Some(a), Some(b)) => {
                        settle().await;
                        Some(millis(
                            quic::cold_floor_once(tls, a.addr(), b.addr(), transport).await?,
                        ))
                    }
                    _ => None,
                };
                if r == 0 {
                    continue;
                }
                other_ms.extend(o);
                floor_ms.extend(f);
                if let Some((c, w)) = sample {
                    cold.push(millis(c.connect));
                    cold_build.push(millis(c.build));
                    warm.push(w);
                }
                quinn_ms.push(q);
            }
            if with_sibyl {
                figures.insert("cold_attach_ms".into(), median(&mut cold));
                figures.insert("warm_attach_ms".into(), median(&mut warm));
                figures.insert("cold_build_ms".into(), median(&mut cold_build));
            }
            let q = median(&mut quinn_ms);
            settings.progress(format_args!(
                "{name}: quinn handshake median {q:.3} ms over {repeats} fresh endpoints"
            ));
            baseline.insert("quinn_handshake_ms".into(), q);
            if !other_ms.is_empty() {
                let o = median(&mut other_ms);
                settings.progress(format_args!(
                    "{name}: quinn handshake with a server in another process (not a target's \
                     baseline): median {o:.3} ms"
                ));
                baseline.insert("quinn_handshake_other_process_ms".into(), o);
            }
            if !floor_ms.is_empty() {
                let f = median(&mut floor_ms);
                settings.progress(format_args!(
                    "{name}: cold floor, bare quinn on cold attach's path (full handshake with \
                     one other-process server, then with a second, then one request/response; \
                     not a target's baseline): median {f:.3} ms = {:.2}x quinn_handshake_ms",
                    f / q
                ));
                baseline.insert("quinn_cold_floor_other_process_ms".into(), f);
            }
        }
        Scenario::Throughput | Scenario::BaselineThroughput => {
            let repeats = settings.repeats_or(3, 1);
            let params = ThroughputParams {
                total_bytes: settings.bytes(),
                write_size: settings.write_size,
                small_record: 100,
            };
            let mut sibyl_runs = Vec::with_capacity(repeats);
            let mut quinn_rates = Vec::with_capacity(repeats);
            for r in 1..=repeats {
                if with_sibyl {
                    let f = sibyl.throughput(params).await?;
                    settings.progress(format_args!("{name} {r}/{repeats}: sibyl {f:?}"));
                    sibyl_runs.push(f);
                }
                let b = quic::stream_bytes_per_s(
                    tls,
                    &server,
                    transport,
                    params.total_bytes,
                    params.write_size,
                )
                .await?;
                settings.progress(format_args!(
                    "{name} {r}/{repeats}: quinn {:.1} MiB/s ({} MiB in {} B writes)",
                    b / f64::from(1u32 << 20),
                    params.total_bytes >> 20,
                    params.write_size
                ));
                quinn_rates.push(b);
            }
            if with_sibyl {
                figures = median_figures(&sibyl_runs);
            }
            baseline.insert("quinn_bytes_per_s".into(), median(&mut quinn_rates));
        }
    }

    let summary = Summary {
        scenario: name.to_owned(),
        figures,
        baseline,
    };
    settings.progress(format_args!("{}", ratio_line(settings.scenario, &summary)));
    Ok(summary)
}

/// The human line of ratios, e.g.
/// `admission: tickets_per_s/quinn_handshakes_per_s = 0.91 (target >= 0.8, met)`.
pub(crate) fn ratio_line(scenario: Scenario, summary: &Summary) -> String {
    let mut parts: Vec<String> = scenario
        .ratios()
        .iter()
        .map(|r| {
            match (
                summary.figures.get(r.figure),
                summary.baseline.get(r.baseline),
            ) {
                (Some(f), Some(b)) => {
                    let ratio = f / b;
                    let verdict = match r.target {
                        Target::None => "",
                        t if t.met(ratio) => ", met",
                        _ => ", MISSED",
                    };
                    format!(
                        "{}/{} = {ratio:.3} ({}{verdict})",
                        r.figure, r.baseline, r.target
                    )
                }
                (None, Some(b)) => format!(
                    "{}/{} = n/a ({} not measured; {} = {b:.3}; {})",
                    r.figure, r.baseline, r.figure, r.baseline, r.target
                ),
                _ => format!("{}/{} = n/a", r.figure, r.baseline),
            }
        })
        .collect();
    for (figure, target) in scenario.absolutes() {
        if let Some(v) = summary.figures.get(*figure) {
            let verdict = if target.met(*v) { "met" } else { "MISSED" };
            parts.push(format!("{figure} = {v:.0} ({target}, {verdict})"));
        }
    }
    format!("{}: {}", summary.scenario, parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert!(Target::AtLeast(0.8).met(0.8));
        assert!(!Target::AtLeast(0.8).met(0.79));
        assert!(Target::AtMost(2.5).met(2.5));
        assert!(!Target::AtMost(1.3).met(1.31));
        assert!(Target::None.met(0.0));
    }

    #[test]
    fn ratio_line_reports_met_missed_and_missing() {
        let s = Summary {
            scenario: "attach".into(),
            figures: [
                ("cold_attach_ms".into(), 2.0),
                ("warm_attach_ms".into(), 1.5),
            ]
            .into(),
            baseline: [("quinn_handshake_ms".into(), 1.0)].into(),
        };
        let line = ratio_line(Scenario::Attach, &s);
        assert!(line.contains("cold_attach_ms/quinn_handshake_ms = 2.000 (target <= 2.5, met)"));
        assert!(line.contains("warm_attach_ms/quinn_handshake_ms = 1.500 (target <= 1.3, MISSED)"));

        let base_only = Summary {
            scenario: "baseline-admission".into(),
            figures: Figures::new(),
            baseline: [("quinn_handshakes_per_s".into(), 1000.0)].into(),
        };
        let line = ratio_line(Scenario::BaselineAdmission, &base_only);
        assert!(line.contains("tickets_per_s not measured"), "{line}");
    }

    #[test]
    fn ratio_line_judges_absolute_figures() {
        let s = Summary {
            scenario: "throughput".into(),
            figures: [
                ("bytes_per_s_16k".into(), 400.0),
                ("records_per_s_100b".into(), 900_000.0),
                ("publish_records_per_s_100b".into(), 600_000.0),
            ]
            .into(),
            baseline: [("quinn_bytes_per_s".into(), 500.0)].into(),
        };
        let line = ratio_line(Scenario::Throughput, &s);
        assert!(line.contains("= 0.800 (target >= 0.8, met)"), "{line}");
        assert!(
            line.contains("records_per_s_100b = 900000 (target >= 1000000, MISSED)"),
            "{line}"
        );
        assert!(
            line.contains("publish_records_per_s_100b = 600000 (target >= 500000, met)"),
            "{line}"
        );
        assert!(Scenario::Admission.absolutes().is_empty());
    }

    #[test]
    fn scenario_names_match_clap() {
        use clap::ValueEnum;
        for s in Scenario::value_variants() {
            let pv = s.to_possible_value().unwrap();
            assert_eq!(pv.get_name(), s.name());
        }
    }
}
