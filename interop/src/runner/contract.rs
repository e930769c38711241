//! The command contract between the runner and an implementation (documented in
//! `interop/README.md`): environment variables in, exit code and files out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::runner::case::Case;

/// Exit code meaning "this test case is not supported by this implementation".
pub const EXIT_UNSUPPORTED: i32 = 127;

/// File (in `OUTPUT_DIR`) where a client writes the `ip:port` of the shard it attached to,
/// one line, rewritten after every (re)attach. Data-plane cases only.
pub const ATTACHED_FILE: &str = "attached.txt";
/// File (in `OUTPUT_DIR`) where a client writes the number of records received so far
/// (decimal, rewritten). The runner triggers mid-stream events once it reaches `EVENT_AT`.
pub const PROGRESS_FILE: &str = "progress.txt";
/// File (in `OUTPUT_DIR`) where a client may write a one-line reason for its verdict; the
/// runner prefers it over the stderr tail.
pub const REASON_FILE: &str = "reason.txt";
/// File (in `OUTPUT_DIR`) the runner creates once it has carried out a mid-stream event
/// (kill, blackhole end, …); a client that must do something after the event waits for it.
pub const EVENT_DONE_FILE: &str = "event-done";
/// File (in `OUTPUT_DIR`) the runner creates when it starts a mid-stream event (signal sent,
/// blackhole switched on); `event-done` follows when the event is over (at once for signals).
pub const EVENT_STARTED_FILE: &str = "event-started";
/// File (in `OUTPUT_DIR`) a client creates when it asks the runner for the mid-stream event
/// (same meaning as `PROGRESS_FILE` reaching `EVENT_AT`, for clients that prefer a flag).
pub const EVENT_REQUEST_FILE: &str = "event-request";

/// The environment of one client run. Build with [`ClientEnv::new`], add case-specific
/// values, then [`ClientEnv::vars`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEnv {
    /// `TESTCASE`.
    pub case: Case,
    /// `HUB_ADDR`: the hub's UDP address (`ip:port`), possibly a proxy.
    pub hub: SocketAddr,
    /// `CA_FILE`: PEM file of the CA that signed the server certificates.
    pub ca_file: PathBuf,
    /// `SERVER_NAME`: TLS server name of the hub (shards: as the ticket says).
    pub server_name: String,
    /// `API_KEY`.
    pub api_key: String,
    /// `STREAMS`: comma-separated stream names the case uses (the first one is used).
    pub streams: Vec<String>,
    /// `OUTPUT_DIR`: a fresh directory for the client's files.
    pub output_dir: PathBuf,
    /// `CLIENT_ID`.
    pub client_id: String,
    /// `RECORDS`: records to publish and receive (data-plane cases).
    pub records: Option<u64>,
    /// `EVENT_AT`: records received before the runner's mid-stream event.
    pub event_at: Option<u64>,
    /// `SHARD_ADDRS`: every shard as `group=ip:port`, comma-separated (as advertised).
    pub shards: Vec<(u32, SocketAddr)>,
    /// `WAIT_MS`: how long to wait before using the ticket (`refuse-expired`).
    pub wait: Option<Duration>,
}

impl ClientEnv {
    /// The mandatory part of the contract.
    pub fn new(
        case: Case,
        hub: SocketAddr,
        ca_file: &Path,
        api_key: &str,
        output_dir: &Path,
    ) -> Self {
        Self {
            case,
            hub,
            ca_file: ca_file.to_owned(),
            server_name: "localhost".into(),
            api_key: api_key.to_owned(),
            streams: vec!["interop".into()],
            output_dir: output_dir.to_owned(),
            client_id: format!("interop-{}", case.name()),
            records: None,
            event_at: None,
            shards: Vec::new(),
            wait: None,
        }
    }

    /// The environment variables, in a stable order.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("ROLE".to_owned(), "client".to_owned()),
            ("TESTCASE".to_owned(), self.case.name().to_owned()),
            ("HUB_ADDR".to_owned(), self.hub.to_string()),
            ("CA_FILE".to_owned(), self.ca_file.display().to_string()),
            ("SERVER_NAME".to_owned(), self.server_name.clone()),
            ("API_KEY".to_owned(), self.api_key.clone()),
            ("STREAMS".to_owned(), self.streams.join(",")),
            (
                "OUTPUT_DIR".to_owned(),
                self.output_dir.display().to_string(),
            ),
            ("CLIENT_ID".to_owned(), self.client_id.clone()),
        ];
        if let Some(n) = self.records {
            v.push(("RECORDS".into(), n.to_string()));
        }
        if let Some(n) = self.event_at {
            v.push(("EVENT_AT".into(), n.to_string()));
        }
        if !self.shards.is_empty() {
            let s: Vec<String> = self
                .shards
                .iter()
                .map(|(g, a)| format!("{g}={a}"))
                .collect();
            v.push(("SHARD_ADDRS".into(), s.join(",")));
        }
        if let Some(w) = self.wait {
            v.push(("WAIT_MS".into(), w.as_millis().to_string()));
        }
        v
    }
}

/// Parses a `SHARD_ADDRS` value (`group=ip:port,…`).
pub fn parse_shard_addrs(s: &str) -> Result<Vec<(u32, SocketAddr)>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (g, a) = p
                .trim()
                .split_once('=')
                .ok_or_else(|| format!("SHARD_ADDRS entry {p:?} is not group=ip:port"))?;
            let g = g.parse().map_err(|_| format!("bad group in {p:?}"))?;
            let a = a.parse().map_err(|_| format!("bad address in {p:?}"))?;
            Ok((g, a))
        })
        .collect()
}

/// How a client run ended, per the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitVerdict {
    /// Exit code 0.
    Pass,
    /// Exit code 127.
    Unsupported,
    /// Any other exit code, a signal, or the timeout.
    Fail,
}

/// Maps an exit status to the verdict: `Some(0)` pass, `Some(127)` unsupported, anything else
/// (including death by signal, `None`) fail.
pub fn verdict_of(code: Option<i32>) -> ExitVerdict {
    match code {
        Some(0) => ExitVerdict::Pass,
        Some(EXIT_UNSUPPORTED) => ExitVerdict::Unsupported,
        _ => ExitVerdict::Fail,
    }
}

/// The reason to show for a non-passing run: the client's `reason.txt` when present and not
/// empty, else the last non-empty line of its stderr, else a description of the exit.
pub fn reason_of(output_dir: &Path, stderr: &str, code: Option<i32>) -> String {
    if let Ok(r) = std::fs::read_to_string(output_dir.join(REASON_FILE)) {
        let r = r.trim();
        if !r.is_empty() {
            return one_line(r);
        }
    }
    if let Some(l) = stderr.lines().rev().find(|l| !l.trim().is_empty()) {
        return one_line(l.trim());
    }
    match code {
        Some(c) => format!("exit code {c}"),
        None => "killed by a signal".into(),
    }
}

fn one_line(s: &str) -> String {
    const MAX: usize = 300;
    let s = s.replace(['\n', '\r', '|'], " ");
    if s.chars().count() > MAX {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut}…")
    } else {
        s
    }
}
