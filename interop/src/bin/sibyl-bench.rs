//! `sibyl-bench <scenario>`: runs a benchmark scenario and its baseline in the same run,
//! prints progress and ratios to stderr and one JSON summary line last on stdout.
//! See `docs/BENCHMARKS.md`.

use std::process::ExitCode;

use clap::Parser;
use sibyl_interop::bench::{self, BenchError, NotBuilt, Settings, quic::BenchTls};

fn main() -> ExitCode {
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
        // The Sibyl half plugs in here once the gateway and SDK implement `SibylHalf`.
        let mut sibyl = NotBuilt;
        bench::run(&settings, &tls, &mut sibyl).await
    });
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
