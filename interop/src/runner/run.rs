//! Running cells: server start, client spawn under the contract, events, verdicts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::runner::RunnerError;
use crate::runner::case::Case;
use crate::runner::contract::{
    self, ATTACHED_FILE, ClientEnv, EVENT_DONE_FILE, EVENT_REQUEST_FILE, EVENT_STARTED_FILE,
    ExitVerdict, PROGRESS_FILE,
};
use crate::runner::gateway::{Gateway, GatewayOptions};
use crate::runner::impair::{BLACKHOLE, Netem, free_port_range, impairment_of};
use crate::runner::matrix::{Cell, Matrix, Verdict};

/// File (in the server's `OUTPUT_DIR`) where an external server command writes what clients
/// need, as `KEY=VALUE` lines: `HUB_ADDR`, `CA_FILE`, `API_KEY`, optionally `SHARD_ADDRS`.
pub const SERVER_ENV_FILE: &str = "server.env";

/// How long to wait for an external server's `server.env`.
const SERVER_PATIENCE: Duration = Duration::from_secs(60);

/// A client implementation: a name for the matrix and the command to run (argv).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSpec {
    /// Column name in the matrix (`rust`, `python`, …).
    pub name: String,
    /// Program and arguments; the contract's environment is added.
    pub command: Vec<String>,
}

/// A server implementation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerSpec {
    /// Our `sibyl-gateway` binary, started and observed by the runner itself.
    Gateway {
        /// Path of `sibyl-gateway`.
        bin: PathBuf,
        /// Whether the gateway serves publish/subscribe (the data-plane cases); when false
        /// those cells are `unsupported` with the reason.
        data_plane: bool,
    },
    /// Any implementation following the server side of the contract (README).
    Command {
        /// Row name in the matrix.
        name: String,
        /// Program and arguments.
        command: Vec<String>,
    },
}

impl ServerSpec {
    /// The matrix name.
    pub fn name(&self) -> &str {
        match self {
            ServerSpec::Gateway { .. } => "sibyl-gateway",
            ServerSpec::Command { name, .. } => name,
        }
    }

    /// Why this server cannot run `case` (known before starting it), if so.
    pub fn unsupported(&self, case: Case) -> Option<String> {
        let ServerSpec::Gateway { data_plane, .. } = self else {
            if case.server_needs().impairment.is_some() {
                return Some(
                    "impairment proxies need the runner to write the server's advertised shard \
                     addresses (built-in sibyl-gateway only)"
                        .into(),
                );
            }
            return None;
        };
        if case.is_data_plane() && !data_plane {
            return Some(
                "data-plane cases disabled for sibyl-gateway (SIBYL_INTEROP_DATA_PLANE=0: \
                 publish/subscribe not served)"
                    .into(),
            );
        }
        None
    }
}

/// Runner settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerOptions {
    /// Where per-cell logs go (`<dir>/logs/<server>/<client>/<case>/`); a temp dir when
    /// `None` (removed after the cell).
    pub output_dir: Option<PathBuf>,
    /// `RECORDS` for data-plane cases.
    pub records: u64,
    /// Multiplies every case timeout (slow machines).
    pub timeout_scale: u32,
}

impl Default for RunnerOptions {
    /// No output dir, 1000 records, timeouts as the cases say.
    fn default() -> Self {
        Self {
            output_dir: None,
            records: 1000,
            timeout_scale: 1,
        }
    }
}

/// What a client needs from a started server.
#[derive(Debug, Clone)]
struct ServerInfo {
    hub: SocketAddr,
    ca_file: PathBuf,
    api_key: String,
    shards: Vec<(u32, SocketAddr)>,
}

enum Running {
    /// The gateway, and the impairment proxies in front of it for loss/blackhole.
    Gateway(Gateway, Option<Box<Netem>>),
    Command {
        child: Child,
    },
}

impl Running {
    fn stop(self) {
        match self {
            Running::Gateway(g, netem) => {
                g.stop(Duration::from_secs(10));
                if let Some(n) = netem {
                    n.stop();
                }
            }
            Running::Command { mut child } => stop_child(&mut child, Duration::from_secs(5)),
        }
    }
}

/// The interop runner: servers × clients × cases, run one cell at a time.
#[derive(Debug, Clone)]
pub struct Runner {
    /// Servers (rows of the matrix).
    pub servers: Vec<ServerSpec>,
    /// Clients (columns).
    pub clients: Vec<ClientSpec>,
    /// Cases.
    pub cases: Vec<Case>,
    /// Settings.
    pub options: RunnerOptions,
}

impl Runner {
    /// Runs every cell sequentially, calling `progress` after each.
    pub fn run(&self, mut progress: impl FnMut(&Cell)) -> Matrix {
        let mut m = Matrix::default();
        for server in &self.servers {
            for case in &self.cases {
                for client in &self.clients {
                    let cell = self.run_cell(server, client, *case);
                    progress(&cell);
                    m.push(cell);
                }
            }
        }
        m
    }

    /// Runs one cell: starts the server, runs the client, stops both.
    pub fn run_cell(&self, server: &ServerSpec, client: &ClientSpec, case: Case) -> Cell {
        let started = Instant::now();
        let cell = |verdict, reason: Option<String>| Cell {
            client: client.name.clone(),
            server: server.name().to_owned(),
            case: case.name().to_owned(),
            verdict,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            reason,
            requirements: BTreeMap::new(),
        };
        if let Some(why) = server.unsupported(case) {
            return cell(Verdict::Unsupported, Some(format!("server: {why}")));
        }
        let (dir, _temp) = match self.cell_dir(server, client, case) {
            Ok(d) => d,
            Err(e) => return cell(Verdict::Fail, Some(format!("runner: {e}"))),
        };
        let server_dir = dir.join("server");
        let client_dir = dir.join("client");
        for d in [&server_dir, &client_dir] {
            if let Err(e) = std::fs::create_dir_all(d) {
                return cell(
                    Verdict::Fail,
                    Some(format!("runner: creating {}: {e}", d.display())),
                );
            }
        }
        let (running, info) = match start_server(server, case, &server_dir) {
            Ok(s) => s,
            Err(RunnerError::ServerUnsupported(why)) => {
                return cell(Verdict::Unsupported, Some(format!("server: {why}")));
            }
            Err(e) => return cell(Verdict::Fail, Some(format!("server: {e}"))),
        };
        let (verdict, reason) = self.run_client(client, case, &info, &running, &client_dir);
        if let Running::Gateway(g, netem) = &running {
            if verdict != Verdict::Pass {
                let _ = std::fs::write(server_dir.join("gateway.log"), g.log_tail(400).join("\n"));
            }
            if let Some(n) = netem {
                let _ = std::fs::write(server_dir.join("netem.txt"), n.stats_line() + "\n");
            }
        }
        running.stop();
        Cell {
            requirements: read_requirements(&client_dir),
            ..cell(verdict, reason)
        }
    }

    /// The cell's directory (persistent under the output dir, else a temp dir kept alive by
    /// the second value).
    fn cell_dir(
        &self,
        server: &ServerSpec,
        client: &ClientSpec,
        case: Case,
    ) -> Result<(PathBuf, Option<tempfile::TempDir>), RunnerError> {
        match &self.options.output_dir {
            Some(out) => {
                let d = out
                    .join("logs")
                    .join(server.name())
                    .join(&client.name)
                    .join(case.name());
                if d.exists() {
                    std::fs::remove_dir_all(&d)
                        .map_err(|e| RunnerError::Io(format!("clearing {}", d.display()), e))?;
                }
                Ok((d, None))
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("sibyl-interop-cell")
                    .tempdir()
                    .map_err(|e| RunnerError::Io("creating a temp dir".into(), e))?;
                Ok((t.path().to_owned(), Some(t)))
            }
        }
    }

    fn run_client(
        &self,
        client: &ClientSpec,
        case: Case,
        info: &ServerInfo,
        server: &Running,
        dir: &Path,
    ) -> (Verdict, Option<String>) {
        let mut env = ClientEnv::new(case, info.hub, &info.ca_file, &info.api_key, dir);
        env.shards = info.shards.clone();
        if case == Case::RefuseExpired {
            env.wait = Some(Duration::from_secs(2));
        }
        if case.is_data_plane() {
            env.records = Some(self.options.records);
            env.event_at = Some((self.options.records / 3).max(1));
        }
        let Some((prog, args)) = client.command.split_first() else {
            return (Verdict::Fail, Some("runner: empty client command".into()));
        };
        let files = (
            std::fs::File::create(dir.join("client.stdout.log")),
            std::fs::File::create(dir.join("client.stderr.log")),
        );
        let (Ok(out), Ok(err)) = files else {
            return (
                Verdict::Fail,
                Some("runner: cannot create client log files".into()),
            );
        };
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .envs(env.vars())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own process group, so a wrapper script and its child are stopped together.
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return (Verdict::Fail, Some(format!("runner: starting {prog}: {e}"))),
        };
        let timeout = case.timeout() * self.options.timeout_scale.max(1);
        let deadline = Instant::now() + timeout;
        // `event_done`: the event was started; `blackhole_until`: a blackhole to end then.
        let mut event_done = false;
        let mut blackhole_until: Option<Instant> = None;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) => {}
                Err(e) => {
                    stop_child(&mut child, Duration::ZERO);
                    return (
                        Verdict::Fail,
                        Some(format!("runner: waiting for the client: {e}")),
                    );
                }
            }
            if Instant::now() >= deadline {
                break None;
            }
            if !event_done
                && matches!(case, Case::Resume | Case::Drain | Case::Blackhole)
                && event_requested(dir, env.event_at)
            {
                event_done = true;
                let started = if case == Case::Blackhole {
                    blackhole_until = Some(Instant::now() + BLACKHOLE);
                    blackhole(server, true, dir)
                } else {
                    shard_event(case, server, dir)
                };
                if let Err(e) = started {
                    stop_child(&mut child, Duration::ZERO);
                    return (Verdict::Fail, Some(format!("runner: {e}")));
                }
            }
            if blackhole_until.is_some_and(|t| Instant::now() >= t) {
                blackhole_until = None;
                if let Err(e) = blackhole(server, false, dir) {
                    stop_child(&mut child, Duration::ZERO);
                    return (Verdict::Fail, Some(format!("runner: {e}")));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let Some(status) = status else {
            stop_child(&mut child, Duration::from_secs(1));
            return (
                Verdict::Fail,
                Some(format!("timeout after {} s", timeout.as_secs())),
            );
        };
        let stderr = std::fs::read_to_string(dir.join("client.stderr.log")).unwrap_or_default();
        let code = status.code();
        match contract::verdict_of(code) {
            ExitVerdict::Pass => {
                if matches!(case, Case::Resume | Case::Drain | Case::Blackhole) && !event_done {
                    return (
                        Verdict::Fail,
                        Some("client passed without asking for the mid-stream event".into()),
                    );
                }
                (Verdict::Pass, None)
            }
            ExitVerdict::Unsupported => (
                Verdict::Unsupported,
                Some(format!(
                    "client: {}",
                    contract::reason_of(dir, &stderr, code)
                )),
            ),
            ExitVerdict::Fail => (Verdict::Fail, Some(contract::reason_of(dir, &stderr, code))),
        }
    }
}

/// Whether the client asked for the mid-stream event (request file, or progress ≥ EVENT_AT).
fn event_requested(dir: &Path, event_at: Option<u64>) -> bool {
    if dir.join(EVENT_REQUEST_FILE).exists() {
        return true;
    }
    let progress = std::fs::read_to_string(dir.join(PROGRESS_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    matches!((progress, event_at), (Some(p), Some(at)) if p >= at)
}

/// Switches the blackhole on every proxy on (creates `event-started`) or off (creates
/// `event-done`).
fn blackhole(server: &Running, on: bool, dir: &Path) -> Result<(), RunnerError> {
    let Running::Gateway(_, Some(netem)) = server else {
        return Err(RunnerError::Server(
            "blackhole needs the runner's impairment proxies".into(),
        ));
    };
    netem.set_blackhole(on);
    let (file, what) = if on {
        (EVENT_STARTED_FILE, "blackhole on")
    } else {
        (EVENT_DONE_FILE, "blackhole off")
    };
    std::fs::write(dir.join(file), format!("{what}\n"))
        .map_err(|e| RunnerError::Io(format!("writing {file}"), e))
}

/// Kills (`resume`) or drains (`drain`) the shard named in `attached.txt`, then creates
/// `event-started` and `event-done`.
fn shard_event(case: Case, server: &Running, dir: &Path) -> Result<(), RunnerError> {
    let Running::Gateway(g, _) = server else {
        return Err(RunnerError::Server(
            "mid-stream shard events need the runner to own the server (sibyl-gateway)".into(),
        ));
    };
    let text = std::fs::read_to_string(dir.join(ATTACHED_FILE))
        .map_err(|e| RunnerError::Io(format!("reading {ATTACHED_FILE}"), e))?;
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        RunnerError::Server(format!("{ATTACHED_FILE} does not hold ip:port: {text:?}"))
    })?;
    let signal = if case == Case::Resume {
        Signal::SIGKILL
    } else {
        Signal::SIGTERM
    };
    g.signal_shard(addr, signal)?;
    for file in [EVENT_STARTED_FILE, EVENT_DONE_FILE] {
        std::fs::write(dir.join(file), format!("{signal} {addr}\n"))
            .map_err(|e| RunnerError::Io(format!("writing {file}"), e))?;
    }
    Ok(())
}

fn start_server(
    spec: &ServerSpec,
    case: Case,
    dir: &Path,
) -> Result<(Running, ServerInfo), RunnerError> {
    match spec {
        ServerSpec::Gateway { bin, .. } => {
            let needs = case.server_needs();
            let mut opts = GatewayOptions {
                token_lifetime: needs.token_lifetime,
                ..GatewayOptions::default()
            };
            if let Some(n) = needs.shards_per_group {
                for g in &mut opts.groups {
                    g.1 = n;
                }
            }
            let Some(kind) = needs.impairment else {
                let g = Gateway::start(bin, &opts)?;
                let info = ServerInfo {
                    hub: g.hub,
                    ca_file: g.ca_file(),
                    api_key: g.api_key.clone(),
                    shards: g
                        .current_shards()
                        .iter()
                        .map(|r| (r.group, r.addr))
                        .collect(),
                };
                return Ok((Running::Gateway(g, None), info));
            };
            // Shard ports fixed in advance, a proxy in front of each, tickets advertising the
            // proxies; then the hub's proxy once the hub's port is known.
            let total: u32 = opts.groups.iter().map(|g| g.1).sum();
            let total =
                u16::try_from(total).map_err(|_| RunnerError::Usage(format!("{total} shards")))?;
            let base = free_port_range(total)?;
            // Fixed: the same packets in the same order see the same losses.
            let seed = 0x51B7;
            let mut netem = Netem::for_shards(base, total, impairment_of(kind, seed))?;
            opts.port_base = Some(base);
            opts.rewrite = netem.rewrite();
            let g = Gateway::start(bin, &opts)?;
            let advertised: std::collections::HashMap<SocketAddr, SocketAddr> =
                opts.rewrite.iter().copied().collect();
            let mut shards = Vec::new();
            for r in g.current_shards() {
                let Some(a) = advertised.get(&r.addr) else {
                    return Err(RunnerError::Server(format!(
                        "shard {}/{} bound {}, outside port_base {base}",
                        r.group, r.shard, r.addr
                    )));
                };
                shards.push((r.group, *a));
            }
            let hub = netem.start_hub(g.hub)?;
            let info = ServerInfo {
                hub,
                ca_file: g.ca_file(),
                api_key: g.api_key.clone(),
                shards,
            };
            Ok((Running::Gateway(g, Some(Box::new(netem))), info))
        }
        ServerSpec::Command { command, .. } => start_command_server(command, case, dir),
    }
}

fn start_command_server(
    command: &[String],
    case: Case,
    dir: &Path,
) -> Result<(Running, ServerInfo), RunnerError> {
    let (prog, args) = command
        .split_first()
        .ok_or_else(|| RunnerError::Usage("empty server command".into()))?;
    let log = |name: &str| {
        std::fs::File::create(dir.join(name))
            .map_err(|e| RunnerError::Io(format!("creating {name}"), e))
    };
    let mut child = Command::new(prog)
        .args(args)
        .env("ROLE", "server")
        .env("TESTCASE", case.name())
        .env("OUTPUT_DIR", dir)
        .stdin(Stdio::null())
        .stdout(log("server.stdout.log")?)
        .stderr(log("server.stderr.log")?)
        .process_group(0)
        .spawn()
        .map_err(|e| RunnerError::Io(format!("starting {prog}"), e))?;
    let deadline = Instant::now() + SERVER_PATIENCE;
    let env_file = dir.join(SERVER_ENV_FILE);
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            let stderr = std::fs::read_to_string(dir.join("server.stderr.log")).unwrap_or_default();
            let reason = contract::reason_of(dir, &stderr, s.code());
            return Err(match contract::verdict_of(s.code()) {
                ExitVerdict::Unsupported => RunnerError::ServerUnsupported(reason),
                _ => RunnerError::Server(format!("server exited before it was ready: {reason}")),
            });
        }
        if let Some(info) = std::fs::read_to_string(&env_file)
            .ok()
            .and_then(|t| parse_server_env(&t).ok())
        {
            return Ok((Running::Command { child }, info));
        }
        if Instant::now() >= deadline {
            stop_child(&mut child, Duration::from_secs(1));
            return Err(RunnerError::Server(format!(
                "no complete {SERVER_ENV_FILE} within {} s",
                SERVER_PATIENCE.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Parses `server.env` (`KEY=VALUE` lines; `HUB_ADDR`, `CA_FILE`, `API_KEY` required).
fn parse_server_env(text: &str) -> Result<ServerInfo, String> {
    let get = |k: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(key, _)| key.trim() == k)
            .map(|(_, v)| v.trim().to_owned())
    };
    Ok(ServerInfo {
        hub: get("HUB_ADDR")
            .ok_or("HUB_ADDR missing")?
            .parse()
            .map_err(|_| "bad HUB_ADDR")?,
        ca_file: get("CA_FILE").ok_or("CA_FILE missing")?.into(),
        api_key: get("API_KEY").ok_or("API_KEY missing")?,
        shards: contract::parse_shard_addrs(&get("SHARD_ADDRS").unwrap_or_default())?,
    })
}

/// SIGTERM to the child's process group, SIGKILL after `grace`, then reap.
fn stop_child(child: &mut Child, grace: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let pgid = Pid::from_raw(-i32::try_from(child.id()).unwrap_or(i32::MAX));
    let _ = kill(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(pgid, Signal::SIGKILL);
    let _ = child.wait();
}

/// The requirement verdicts a `conformance` client wrote to `requirements.json`
/// (`{"R01": "pass", "R02": "fail: why", …}`); empty when there is none or it does not parse.
fn read_requirements(client_dir: &Path) -> BTreeMap<String, String> {
    std::fs::read(client_dir.join("requirements.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}
