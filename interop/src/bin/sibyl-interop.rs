//! `sibyl-interop`: runs the interop matrix (servers × clients × cases) and writes
//! `DIR/matrix.md` and `DIR/matrix.json`. Exits 1 when any cell failed, 2 on usage errors.
//!
//! Binaries are found through environment variables, else next to this executable:
//! `SIBYL_GATEWAY_BIN` (`sibyl-gateway`), `SIBYL_INTEROP_CLIENT_BIN` (`sibyl-interop-client`),
//! `SIBYL_PYTHON_CLIENT` (default: `interop/clients/python/run.sh` of this source tree).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use sibyl_interop::runner::{Case, ClientSpec, Runner, RunnerOptions, ServerSpec, Verdict};

/// Sibyl interop runner: named test cases against real processes.
#[derive(Debug, Parser)]
#[command(name = "sibyl-interop", version)]
struct Cli {
    /// Directory for matrix.md, matrix.json and per-cell logs (created).
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// Run the fast CI subset (handshake, ticket, direct-connect, refuse-bad-key,
    /// token-replay, transfer).
    #[arg(long, conflicts_with = "cases")]
    quick: bool,
    /// Comma-separated cases (default: all).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<Case>,
    /// Comma-separated clients: `rust`, `python`, or `NAME=COMMAND` for any implementation
    /// of the contract (the command is split on whitespace).
    #[arg(long, value_delimiter = ',', default_value = "rust,python")]
    clients: Vec<String>,
    /// Extra servers `NAME=COMMAND` following the server side of the contract; the built-in
    /// `sibyl-gateway` always runs first unless --no-gateway.
    #[arg(long = "server", value_name = "NAME=COMMAND")]
    servers: Vec<String>,
    /// Do not run the built-in sibyl-gateway server.
    #[arg(long)]
    no_gateway: bool,
    /// RECORDS for the data-plane cases.
    #[arg(long, default_value_t = 1000)]
    records: u64,
    /// Multiply every case timeout by this factor.
    #[arg(long, default_value_t = 1)]
    timeout_scale: u32,
}

fn beside_exe(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().context("executable without a directory")?;
    // `cargo test` puts test executables in target/debug/deps, binaries one level up.
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found beside {} (build it, or set the environment variable)",
        exe.display()
    )
}

fn locate(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    match std::env::var_os(env) {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => beside_exe(name),
    }
}

fn client_spec(s: &str) -> anyhow::Result<ClientSpec> {
    let command = match s {
        "rust" => vec![
            locate("SIBYL_INTEROP_CLIENT_BIN", "sibyl-interop-client")?
                .display()
                .to_string(),
        ],
        "python" => {
            let p = std::env::var_os("SIBYL_PYTHON_CLIENT")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python/run.sh")
                });
            vec![p.display().to_string()]
        }
        other => {
            let (name, cmd) = other.split_once('=').with_context(|| {
                format!("unknown client {other:?} (rust, python or NAME=COMMAND)")
            })?;
            return Ok(ClientSpec {
                name: name.to_owned(),
                command: cmd.split_whitespace().map(str::to_owned).collect(),
            });
        }
    };
    Ok(ClientSpec {
        name: s.to_owned(),
        command,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sibyl-interop: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let cases = if cli.quick {
        Case::QUICK.to_vec()
    } else if cli.cases.is_empty() {
        Case::ALL.to_vec()
    } else {
        cli.cases.clone()
    };
    let clients = cli
        .clients
        .iter()
        .map(|c| client_spec(c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut servers = Vec::new();
    if !cli.no_gateway {
        servers.push(ServerSpec::Gateway {
            bin: locate("SIBYL_GATEWAY_BIN", "sibyl-gateway")?,
            data_plane: std::env::var("SIBYL_INTEROP_DATA_PLANE").map_or(true, |v| v != "0"),
        });
    }
    for s in &cli.servers {
        let (name, cmd) = s
            .split_once('=')
            .with_context(|| format!("--server {s:?}: expected NAME=COMMAND"))?;
        servers.push(ServerSpec::Command {
            name: name.to_owned(),
            command: cmd.split_whitespace().map(str::to_owned).collect(),
        });
    }
    std::fs::create_dir_all(&cli.output)
        .with_context(|| format!("creating {}", cli.output.display()))?;
    let runner = Runner {
        servers,
        clients,
        cases,
        options: RunnerOptions {
            output_dir: Some(cli.output.clone()),
            records: cli.records,
            timeout_scale: cli.timeout_scale,
        },
    };
    let total = runner.servers.len() * runner.cases.len() * runner.clients.len();
    let progress = sibyl_interop::progress::Progress::new(Some(total as u64), "cells");
    let matrix = runner.run(|c| {
        progress.inc();
        let mark = match c.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Unsupported => "unsupported",
        };
        progress.line(format_args!(
            "{:>14} × {:<8} × {:<20} {mark:<11} {:>6} ms{}",
            c.server,
            c.client,
            c.case,
            c.duration_ms,
            c.reason
                .as_deref()
                .map(|r| format!("  {r}"))
                .unwrap_or_default()
        ));
    });
    std::fs::write(cli.output.join("matrix.md"), matrix.to_markdown())?;
    std::fs::write(cli.output.join("matrix.json"), matrix.to_json())?;
    Ok(if matrix.any_failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
