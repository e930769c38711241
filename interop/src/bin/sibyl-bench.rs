//! `sibyl-bench <scenario>`: runs a benchmark scenario and its baseline in the same run,
//! prints progress and ratios to stderr and one JSON summary line last on stdout.
//! See `docs/BENCHMARKS.md`.
//!
//! `admission` and `attach` start a real `sibyl-gateway` (found through `SIBYL_GATEWAY_BIN`
//! or next to this binary: `cargo build --release -p sibyl-gateway` first) serving the
//! baseline's certificate files; `throughput` starts a fresh one per repeat
//! (`bench::throughput`).

use std::process::ExitCode;

use clap::Parser;
use sibyl_interop::bench::gateway::GatewayHalf;
use sibyl_interop::bench::throughput::ThroughputHalf;
use sibyl_interop::bench::{self, BenchError, NotBuilt, Scenario, Settings, quic::BenchTls};

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("prefetch") {
        return prefetch();
    }
    if std::env::args().nth(1).as_deref() == Some(bench::quic::SERVE_BASELINE_ARG) {
        // `attach`'s other-process baseline server (`bench::quic::OtherProcessServer`).
        let Some(dir) = std::env::args_os().nth(2) else {
            eprintln!("sibyl-bench serve-baseline: missing the certificate directory");
            return ExitCode::from(2);
        };
        return match bench::quic::serve_baseline(std::path::Path::new(&dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sibyl-bench serve-baseline: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let settings = Settings::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sibyl-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let tls = BenchTls::generate()?;
        match settings.scenario {
            Scenario::Admission | Scenario::Attach => {
                let mut sibyl = GatewayHalf::start(&tls).await?;
                bench::run(&settings, &tls, &mut sibyl).await
            }
            Scenario::Throughput => {
                let mut half = ThroughputHalf::new(&tls).admin(!settings.no_admin);
                bench::run(&settings, &tls, &mut half).await
            }
            _ => bench::run(&settings, &tls, &mut NotBuilt).await,
        }
    });
    sibyl_interop::progress::bench_done();
    match result {
        Ok(summary) => {
            println!("{}", summary.to_json_line());
            ExitCode::SUCCESS
        }
        Err(e @ BenchError::SibylNotBuilt { .. }) => {
            eprintln!("sibyl-bench: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("sibyl-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `sibyl-bench prefetch …` (`bench::prefetch`): its own flags, same output contract.
fn prefetch() -> ExitCode {
    use sibyl_interop::bench::prefetch::{PrefetchArgs, run};
    let args = PrefetchArgs::parse_from(std::env::args().skip(1));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sibyl-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(summary) => {
            println!("{}", summary.to_json_line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sibyl-bench prefetch: {e:#}");
            ExitCode::FAILURE
        }
    }
}
