//! `sibyl-bench`: the bare-quinn baselines on loopback, the `SibylHalf` seam and the CLI's
//! output contract. Sizes are tiny; nothing here asserts a timing.

use std::process::Command;
use std::time::Duration;

use clap::Parser;
use sibyl_interop::bench::quic::{self, BaselineServer, BenchTls, Transport};
use sibyl_interop::bench::{
    self, BenchError, ColdSample, Figures, Settings, SibylHalf, ThroughputParams,
};

/// A Sibyl half with canned answers, to check that the runner wires figures through.
struct Canned {
    cold_calls: usize,
}

impl SibylHalf for Canned {
    async fn tickets_per_s(
        &mut self,
        concurrency: usize,
        _duration: Duration,
    ) -> Result<f64, BenchError> {
        Ok(100.0 * concurrency as f64)
    }

    async fn cold_attach(&mut self) -> Result<ColdSample, BenchError> {
        self.cold_calls += 1;
        // The first (warm-up) sample is huge and must be discarded.
        let connect = if self.cold_calls == 1 {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(3)
        };
        Ok(ColdSample::new(Duration::from_micros(500), connect))
    }

    async fn warm_attach(&mut self) -> Result<Duration, BenchError> {
        Ok(Duration::from_millis(1))
    }

    async fn throughput(&mut self, p: ThroughputParams) -> Result<Figures, BenchError> {
        Ok([("bytes_per_s_16k".to_owned(), p.write_size as f64)].into())
    }
}

fn settings(args: &[&str]) -> Settings {
    Settings::parse_from(std::iter::once("sibyl-bench").chain(args.iter().copied()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baselines_measure_on_loopback() {
    let tls = BenchTls::generate().unwrap();
    let server = BaselineServer::start(&tls, Transport::Sibyl).unwrap();

    let took = quic::handshake_durations(&tls, &server, Transport::Sibyl, 3)
        .await
        .unwrap();
    assert_eq!(took.len(), 3);
    assert!(took.iter().all(|d| !d.is_zero()));

    let rate = quic::handshakes_per_s(
        &tls,
        &server,
        Transport::Sibyl,
        2,
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    assert!(rate.is_finite() && rate > 0.0, "{rate}");

    // 1 MiB + 1 byte in 16 KiB writes: the last write is short, the count must be exact
    // (stream_bytes_per_s errors on a short stream).
    let bps = quic::stream_bytes_per_s(
        &tls,
        &server,
        Transport::QuinnDefault,
        (1 << 20) + 1,
        16 * 1024,
    )
    .await
    .unwrap();
    assert!(bps.is_finite() && bps > 0.0, "{bps}");

    let bad = quic::stream_bytes_per_s(&tls, &server, Transport::Sibyl, 10, 0).await;
    assert!(matches!(bad, Err(BenchError::BadParameter(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_feeds_the_sibyl_half_through_medians() {
    let tls = BenchTls::generate().unwrap();
    let mut sibyl = Canned { cold_calls: 0 };

    let s = settings(&["attach", "--repeats", "3", "--json-only"]);
    let summary = bench::run(&s, &tls, &mut sibyl).await.unwrap();
    assert_eq!(summary.scenario, "attach");
    assert_eq!(summary.figures["cold_attach_ms"], 3.0);
    assert_eq!(summary.figures["cold_build_ms"], 0.5);
    assert_eq!(summary.figures["warm_attach_ms"], 1.0);
    assert!(summary.baseline["quinn_handshake_ms"] > 0.0);
    assert_eq!(sibyl.cold_calls, 4, "3 samples + 1 discarded warm-up");

    let s = settings(&[
        "admission",
        "--repeats",
        "1",
        "--duration",
        "100ms",
        "--concurrency",
        "3",
        "--json-only",
    ]);
    let summary = bench::run(&s, &tls, &mut sibyl).await.unwrap();
    assert_eq!(summary.figures["tickets_per_s"], 300.0);
    assert!(summary.baseline["quinn_handshakes_per_s"] > 0.0);

    let s = settings(&[
        "throughput",
        "--bytes",
        "65536",
        "--write-size",
        "4096",
        "--repeats",
        "1",
        "--json-only",
    ]);
    let summary = bench::run(&s, &tls, &mut sibyl).await.unwrap();
    assert_eq!(summary.figures["bytes_per_s_16k"], 4096.0);
    assert!(summary.baseline["quinn_bytes_per_s"] > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_sibyl_half_fails_before_any_figure() {
    let tls = BenchTls::generate().unwrap();
    let s = settings(&["throughput", "--quick", "--json-only"]);
    let err = bench::run(&s, &tls, &mut bench::NotBuilt)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            BenchError::SibylNotBuilt {
                scenario: "throughput"
            }
        ),
        "{err}"
    );
}

#[test]
fn cli_prints_exactly_one_json_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_sibyl-bench"))
        .args([
            "baseline-attach",
            "--quick",
            "--repeats",
            "2",
            "--json-only",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["scenario"], "baseline-attach");
    assert!(v["figures"].as_object().unwrap().is_empty());
    assert!(v["baseline"]["quinn_handshake_ms"].as_f64().unwrap() > 0.0);
    // The binary re-executes itself as the other-process server.
    assert!(
        v["baseline"]["quinn_handshake_other_process_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}
