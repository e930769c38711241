//! `runner`: the cross-implementation interop suite behind `sibyl-interop`.
//!
//! ```text
//!  Runner ── for each server × client × case (sequential) ──▶ run_cell
//!    run_cell: start server (Gateway: sibyl-gateway with a generated config │ Command: the
//!              contract's ROLE=server) ──▶ ServerInfo {hub, ca, api key, shards}
//!              ──▶ ClientEnv (contract.rs) ──▶ spawn client command, bounded by the case timeout
//!              (loss/blackhole: impair.rs puts netem proxies in front of the hub and each
//!              shard: fixed shard ports + [advertise] rewrite to the proxies)
//!              ──▶ mid-stream events (kill / SIGTERM a shard, blackhole) when the client asks
//!              ──▶ exit code: 0 pass │ 127 unsupported │ other fail (reason: reason.txt or stderr)
//!              ──▶ Cell ──▶ Matrix (matrix.rs) ──▶ matrix.md + matrix.json
//! ```
//!
//! The contract (environment variables, exit codes, files) is in `interop/README.md`; the
//! cases are [`Case`]. Every process started is stopped by pid; temp dirs are removed.

mod case;
mod contract;
mod gateway;
mod impair;
mod matrix;
mod run;

pub use case::{Case, ImpairmentKind, ServerNeeds, UnknownCase};
pub use contract::{
    ATTACHED_FILE, ClientEnv, EVENT_DONE_FILE, EVENT_REQUEST_FILE, EVENT_STARTED_FILE,
    EXIT_UNSUPPORTED, ExitVerdict, PROGRESS_FILE, REASON_FILE, parse_shard_addrs, reason_of,
    verdict_of,
};
pub use gateway::{Gateway, GatewayOptions, ShardReady, StartupLine, parse_ready, parse_startup};
pub use impair::{BLACKHOLE, Netem, free_port_range, impairment_of};
pub use matrix::{Cell, Matrix, Verdict};
pub use run::{ClientSpec, Runner, RunnerOptions, SERVER_ENV_FILE, ServerSpec};

/// Errors of the runner itself (not of an implementation under test, which become cells).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// A file or process operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The server could not be started or did not behave as the contract says.
    #[error("{0}")]
    Server(String),
    /// The server command exited 127 for this case.
    #[error("server does not support this case: {0}")]
    ServerUnsupported(String),
    /// The caller asked for something impossible (unknown client, missing binary, …).
    #[error("{0}")]
    Usage(String),
}
