//! `sibyl-gateway`: the hub (default), operator tools, and the hidden `shard` process.

mod demo;
mod obs_cmd;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing::{info, warn};

use sibyl_gateway::apikeys::ApiKeyStore;
use sibyl_gateway::config::DEFAULT_DEPLOYMENT_ID;
use sibyl_gateway::config::{Config, LogFormat};
use sibyl_gateway::datadir::{self, DataDir};
use sibyl_gateway::hub::{self, Hub, HubServer, HubSettings, PublishService};
use sibyl_gateway::ipc::{self, HubToShard, ShardIpc};
use sibyl_gateway::obs::admin::AdminServer;
use sibyl_gateway::storage::{self, StoreTasks};
use sibyl_gateway::store::Store;
use sibyl_gateway::storelink::{self, StoreLinkServer};
use sibyl_gateway::supervisor::{Supervisor, SupervisorOptions, shutdown_bound};
use sibyl_gateway::synthetic::Synthetic;

/// TLS session tickets the hub sends per handshake (see where the hub TLS config is built).
const HUB_SESSION_TICKETS: usize = 1;

/// Sibyl QUIC edge gateway.
///
/// With no subcommand (or `run`) this starts the hub: on first start it creates the data
/// directory (a development CA and certificates, a token keyring and a development API key,
/// printed once), starts the shard processes of every shard group, and prints the hub
/// address, the CA fingerprint and how a client connects. Ctrl-C or SIGTERM drains the
/// shards and exits.
///
/// Settings come from the built-in defaults, then the TOML file given with --config, then
/// the flags given on the command line. Every setting is described in docs/CONFIG.md.
#[derive(Debug, Parser)]
#[command(
    name = "sibyl-gateway",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum Cmd {
    /// Start the hub and its shards (the default).
    Run(RunArgs),
    /// Certificate tools.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Token keyring and API-key tools.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Access-token tools.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Hub, shards, a synthetic publisher and N SDK consumers in one command, with live
    /// progress and a summary; exits non-zero if a consumer saw a gap or a duplicate.
    Demo(demo::DemoArgs),
    /// Streams of the embedded store (`create`, `list`: on the data dir while the hub is
    /// stopped; `describe`: from the running hub's admin API).
    #[command(subcommand)]
    Streams(StreamsCmd),
    /// Validates the configuration as start-up does (file, flags, referenced files) and
    /// exits non-zero with a message naming the field.
    CheckConfig(RunArgs),
    /// A terminal summary of the running hub: shards, streams, consumer groups (admin API).
    Status(obs_cmd::AdminArgs),
    /// Consumer groups of the running hub (admin API).
    #[command(subcommand)]
    Groups(obs_cmd::GroupsCmd),
    /// Internal: run one shard process (started by the hub).
    #[command(hide = true)]
    Shard {
        /// Inherited control-socket file descriptor.
        #[arg(long)]
        ipc_fd: i32,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML configuration file (read first; flags override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Config,
}

#[derive(Debug, Subcommand)]
enum StreamsCmd {
    /// Create a stream (idempotent with the same settings).
    Create {
        /// Stream name.
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// `always`, `interval:5ms` or `never`.
        #[arg(long, default_value = "always")]
        durability: String,
        /// Retention by size per partition, bytes.
        #[arg(long, value_name = "BYTES")]
        retention_bytes: Option<u64>,
        /// Retention by age (e.g. 7d).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        retention_age: Option<Duration>,
        /// Data directory.
        #[arg(long, value_name = "DIR", default_value = "./sibyl-data")]
        data_dir: PathBuf,
    },
    /// List streams with their partitions, durability and offsets.
    List {
        /// Data directory.
        #[arg(long, value_name = "DIR", default_value = "./sibyl-data")]
        data_dir: PathBuf,
    },
    /// Describe a stream of the running hub: offsets per partition, size, traffic.
    Describe {
        /// Stream name.
        name: String,
        #[command(flatten)]
        admin: obs_cmd::AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Create (or reuse) a development CA in DIR and issue a fresh server certificate:
    /// ca.pem, ca.key, server.pem, server.key.
    Init {
        /// Target directory (created with mode 0700).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Extra DNS name or IP for the server certificate (repeatable); localhost,
        /// 127.0.0.1 and ::1 are always included.
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Generate a new token keyring file (mode 0600).
    Generate {
        /// Keyring file to create.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Overwrite an existing file (every token sealed under it becomes invalid).
        #[arg(long)]
        force: bool,
    },
    /// Rotate a token keyring: add a new active key; the previous one still opens tokens
    /// for the grace period.
    Rotate {
        /// Keyring file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// How long the previous key keeps opening tokens (e.g. 1h, 30m).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
        grace: Duration,
    },
    /// API keys (stored as SHA-256 hashes in <data-dir>/api-keys.toml).
    #[command(subcommand, name = "api-key")]
    ApiKey(ApiKeyCmd),
}

#[derive(Debug, Subcommand)]
enum ApiKeyCmd {
    /// Create an API key and print it once.
    New {
        /// Name of the key's owner, for the operator.
        #[arg(long)]
        name: String,
        /// Scope `PATTERN:ACTION[,ACTION]` (repeatable), e.g. 'orders.*:subscribe,publish'.
        /// Actions: subscribe, publish, admin.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Data directory holding api-keys.toml.
        #[arg(long, value_name = "DIR", default_value = "./sibyl-data")]
        data_dir: PathBuf,
    },
    /// List API keys (id, name, scopes; never the key).
    List {
        /// Data directory holding api-keys.toml.
        #[arg(long, value_name = "DIR", default_value = "./sibyl-data")]
        data_dir: PathBuf,
    },
    /// Check a key read from standard input; exits non-zero if it is refused.
    Check {
        /// Data directory holding api-keys.toml.
        #[arg(long, value_name = "DIR", default_value = "./sibyl-data")]
        data_dir: PathBuf,
    },
    /// Revoke the key with ID (the 12 hex characters after `sk_`).
    Revoke {
        /// Key id.
        id: String,
        /// Data directory holding api-keys.toml.
        #[arg(long, value_name = "DIR", default_value = "./sibyl-data")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Open an access token and print its claims as JSON (without the session secret), or
    /// why it is refused (exit status 1).
    Inspect {
        /// Keyring file.
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
        /// Additional authenticated data the token was sealed with: the deployment id
        /// (`tokens.deployment_id`, default `sibyl-dev`).
        #[arg(long, default_value = DEFAULT_DEPLOYMENT_ID)]
        aad: String,
        /// Clock skew tolerated on expiry / not-before.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        clock_skew: Duration,
        /// The token text.
        token: String,
    },
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        None => run(cli.run, &matches),
        Some(Cmd::Run(args)) => {
            let sub = matches.subcommand_matches("run").unwrap_or(&matches);
            run(args, sub)
        }
        Some(Cmd::Shard { ipc_fd }) => return shard_main(ipc_fd),
        Some(Cmd::Certs(c)) => certs(c),
        Some(Cmd::Keys(k)) => keys(k),
        Some(Cmd::Streams(c)) => streams(c),
        Some(Cmd::CheckConfig(args)) => {
            let sub = matches
                .subcommand_matches("check-config")
                .unwrap_or(&matches);
            check_config(args, sub)
        }
        Some(Cmd::Status(a)) => obs_cmd::status(&a),
        Some(Cmd::Groups(g)) => obs_cmd::groups(g),
        Some(Cmd::Demo(a)) => demo::demo(a),
        Some(Cmd::Token(TokenCmd::Inspect {
            keys,
            aad,
            clock_skew,
            token,
        })) => token_inspect(&keys, &aad, clock_skew, &token),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => fmt.json().with_current_span(true).try_init(),
    };
}

/// The configuration `run` would start with: file, flags, `RUST_LOG`, validated.
fn effective_config(args: &RunArgs, matches: &ArgMatches) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref(), matches)?;
    let log_flag =
        matches.value_source("logging.filter") == Some(clap::parser::ValueSource::CommandLine);
    if let (false, Ok(env)) = (log_flag, std::env::var("RUST_LOG")) {
        config.logging.filter = env;
    }
    config.validate()?;
    Ok(config)
}

fn check_config(args: RunArgs, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    let config = effective_config(&args, matches)?;
    let groups: u32 = config.shards.groups.iter().map(|g| g.shards).sum();
    println!(
        "config OK: {} shard group(s), {groups} shard(s), {} stream(s), hub {}, admin {}",
        config.shards.groups.len(),
        config.streams.len(),
        config.hub.listen,
        if config.admin.enabled {
            config.admin.listen.to_string()
        } else {
            "disabled".to_owned()
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn run(args: RunArgs, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    let config = effective_config(&args, matches)?;
    init_logging(&config.logging.filter, config.logging.format);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut node = Node::start(config)?;
        // Installed before the banner, so a SIGTERM sent once the banner is seen drains.
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        print_banner(
            &node.config,
            &node.dir,
            node.hub_addr,
            &node.ca_fingerprint,
            node.dev_api_key.as_deref(),
            node.admin.as_ref().map(AdminServer::local_addr),
        );
        info!(addr = %node.hub_addr, "hub started");

        let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        // What the file said at start: a SIGHUP names the sections changed since.
        let file_at_start = args.config.as_deref().map(Config::from_file).transpose()?;
        let mut rotate = tokio::time::interval(node.config.tokens.rotation_interval);
        rotate.tick().await;
        loop {
            tokio::select! {
                r = tokio::signal::ctrl_c() => { r?; info!("interrupt: shutting down"); break; }
                _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
                _ = sighup.recv() => node.reload(args.config.as_deref(), file_at_start.as_ref()),
                _ = rotate.tick() => node.rotate_keyring(),
            }
        }
        node.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// A started hub: data dir, store, store link, shard supervisor, QUIC endpoint and
/// synthetic publishers. `run` and `demo` both start the gateway through [`Node::start`]
/// and stop it with [`Node::shutdown`].
pub(crate) struct Node {
    pub(crate) config: Config,
    pub(crate) dir: DataDir,
    pub(crate) ca_fingerprint: String,
    pub(crate) dev_api_key: Option<String>,
    pub(crate) hub_addr: std::net::SocketAddr,
    pub(crate) store: Arc<Store>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) supervisor: Arc<Supervisor>,
    synthetic: Vec<Synthetic>,
    keyring: sibyl_tokens::Keyring,
    server: HubServer,
    store_tasks: StoreTasks,
    _link: Arc<StoreLinkServer>,
    _watch: tokio::task::JoinHandle<()>,
    /// The admin listener (`[admin] enabled`).
    pub(crate) admin: Option<AdminServer>,
    /// Re-reads the hub's certificates (SIGHUP).
    certs: sibyl_certs::ReloadHandle,
}

impl Node {
    /// Prepares the data dir and the store (creating the configured streams), then starts
    /// the store tasks, the store link, the synthetic publishers, the shard supervisor and
    /// the hub's QUIC endpoint. `config` must be validated. Must be called inside a
    /// multi-threaded tokio runtime.
    pub(crate) fn start(config: Config) -> anyhow::Result<Self> {
        let listen_ip = config.hub.listen.ip();
        let names = if listen_ip.is_loopback() || listen_ip.is_unspecified() {
            vec![]
        } else {
            vec![listen_ip.to_string()]
        };
        let boot = datadir::bootstrap(&config.data_dir, &names, unix_now())
            .with_context(|| format!("preparing data dir {}", config.data_dir.display()))?;
        for p in &boot.created {
            info!(path = %p.display(), "created");
        }

        let store = Arc::new(
            storage::open_store(&config.data_dir)
                .with_context(|| format!("opening the store in {}", config.data_dir.display()))?,
        );
        storage::ensure_streams(&store, &config).context("creating the configured streams")?;

        let store_tasks = StoreTasks::start(store.clone())?;
        let link_cfg = storelink::ServerConfig {
            handover_timeout: config.subscribe.handover_timeout,
            ..storelink::ServerConfig::default()
        };
        let link = StoreLinkServer::bind_with(
            &storelink::socket_path(&config.data_dir),
            store.clone(),
            link_cfg,
        )
        .context("binding the store link socket")?;
        let max_payload = config
            .streams
            .iter()
            .map(|s| (s.name.clone(), s.max_payload))
            .collect();
        let publish = Arc::new(
            PublishService::new(
                store.clone(),
                max_payload,
                sibyl_gateway::quic::decode_limits(&config.connection),
            )
            .context("opening the producer ids")?,
        );
        let mut synthetic = Vec::new();
        for spec in &config.synthetic {
            info!(stream = %spec.name, rate = spec.rate, size = spec.size, "synthetic publisher");
            synthetic.push(Synthetic::start(store.clone(), spec.clone())?);
        }
        // QUIC seam: the hub's endpoint is built on this socket.
        let hub_socket = std::net::UdpSocket::bind(config.hub.listen)
            .with_context(|| format!("binding hub address {}", config.hub.listen))?;
        let hub_addr = hub_socket.local_addr()?;
        let exe = std::env::current_exe().context("locating the gateway binary")?;
        let dir = boot.dir.clone();
        let (hub_tls, certs) =
            sibyl_certs::ServerTlsBuilder::new(&dir.certs.server_cert, &dir.certs.server_key)
                // A client holds one hub connection and resumes it at most once before the
                // next handshake hands it a new ticket: one ticket per handshake is enough.
                .session_tickets(HUB_SESSION_TICKETS)
                .build()
                .context("loading the hub certificate")?;
        let api_keys = ApiKeyStore::load(&dir.api_keys)?;
        let supervisor = Arc::new(Supervisor::start(SupervisorOptions {
            exe,
            config: config.clone(),
            keyring: boot.keyring.to_bytes(),
            ca_cert: dir.certs.ca_cert.clone(),
            cert: dir.certs.server_cert.clone(),
            key: dir.certs.server_key.clone(),
        }));
        let hub = Arc::new(Hub::new(
            HubSettings::from_config(&config),
            api_keys,
            boot.keyring.clone(),
            supervisor.clone(),
        ));
        hub.set_publish(publish);
        let server = HubServer::start(hub.clone(), hub_socket, hub_tls, &config)
            .context("starting the hub's QUIC endpoint")?;
        let watch = hub::watch_api_keys(
            Arc::downgrade(&hub),
            dir.api_keys.clone(),
            hub::API_KEYS_CHECK_INTERVAL,
        );
        let link = Arc::new(link);
        let admin = obs_cmd::start_admin(&config, &store, &supervisor, &link, hub_addr)?;
        Ok(Self {
            config,
            dir,
            ca_fingerprint: boot.ca_fingerprint,
            dev_api_key: boot.dev_api_key,
            hub_addr,
            store,
            hub,
            supervisor,
            synthetic,
            keyring: boot.keyring,
            server,
            store_tasks,
            _link: link,
            _watch: watch,
            admin,
            certs,
        })
    }

    /// SIGHUP: re-reads the hub's certificates and the API keys now, and names the settings
    /// of the config file that changed but need a restart.
    fn reload(&self, config_file: Option<&Path>, file_at_start: Option<&Config>) {
        match self.certs.reload_now() {
            Ok(()) => info!("SIGHUP: hub certificates reloaded (shards re-read theirs within 2 s)"),
            Err(e) => warn!("SIGHUP: certificate reload failed, previous ones kept: {e}"),
        }
        match ApiKeyStore::load(&self.dir.api_keys) {
            Ok(keys) => {
                self.hub.set_api_keys(keys);
                info!("SIGHUP: API keys reloaded");
            }
            Err(e) => warn!("SIGHUP: API keys not reloaded: {e}"),
        }
        if let (Some(path), Some(before)) = (config_file, file_at_start) {
            match Config::from_file(path) {
                Ok(new) => {
                    let changed = obs_cmd::changed_sections(before, &new);
                    if !changed.is_empty() {
                        warn!(
                            "SIGHUP: {} changed settings need a restart: {}",
                            path.display(),
                            changed.join(", ")
                        );
                    }
                }
                Err(e) => warn!("SIGHUP: {e}"),
            }
        }
    }

    /// Rotates the token keyring, saves it and hands it to the hub and the shards.
    fn rotate_keyring(&mut self) {
        let rotated = self
            .keyring
            .rotate(self.config.tokens.rotation_grace)
            .and_then(|id| self.keyring.save(&self.dir.keyring).map(|()| id));
        match rotated {
            Ok(id) => {
                info!(key_id = %id, "token keyring rotated");
                self.hub.set_keyring(self.keyring.clone());
                self.supervisor.update_keyring(self.keyring.to_bytes());
            }
            Err(e) => warn!("token keyring rotation failed: {e}"),
        }
    }

    /// Stops admitting, drains the shards (killed at the drain deadline), closes the QUIC
    /// endpoint, stops the synthetic publishers and syncs the store.
    pub(crate) async fn shutdown(self) {
        if self.admin.is_some() {
            let _ = std::fs::remove_file(obs_cmd::addr_file(&self.config.data_dir));
        }
        // Stop admitting (new Hellos get DRAINING) while the shards drain.
        self.hub.begin_drain();
        let bound = shutdown_bound(&self.config);
        match Arc::try_unwrap(self.supervisor) {
            Ok(supervisor) => {
                if tokio::time::timeout(bound, supervisor.shutdown())
                    .await
                    .is_err()
                {
                    warn!("shards did not stop within {bound:?}");
                }
            }
            // The hub released its handle in begin_drain; nothing else keeps one. Should
            // that ever change, drain without waiting for the exits.
            Err(supervisor) => supervisor.drain_all(),
        }
        self.server.shutdown(Duration::from_secs(1)).await;
        drop(self.synthetic);
        if let Err(e) = self.store_tasks.stop() {
            warn!("store sync at shutdown failed: {e}");
        }
        info!("hub stopped");
    }
}

fn print_banner(
    config: &Config,
    dir: &DataDir,
    hub: std::net::SocketAddr,
    fp: &str,
    dev_key: Option<&str>,
    admin: Option<std::net::SocketAddr>,
) {
    let groups: Vec<String> = config
        .shards
        .groups
        .iter()
        .map(|g| format!("{}×{}", g.id, g.shards))
        .collect();
    println!("Sibyl gateway hub");
    println!("  data dir:        {}", dir.root.display());
    println!("  hub address:     {hub}");
    println!("  shard groups:    {} (group×shards)", groups.join(", "));
    println!("  CA certificate:  {}", dir.certs.ca_cert.display());
    println!("  CA fingerprint:  SHA256 {fp}");
    match admin {
        Some(a) => println!(
            "  admin:           http://{a}/ (status page; metrics at /metrics, JSON at /api/status)"
        ),
        None => println!("  admin:           disabled"),
    }
    match dev_key {
        Some(k) => {
            println!("  dev API key:     {k}");
            println!(
                "                   (shown once; only its hash is stored in {})",
                dir.api_keys.display()
            );
        }
        None => println!(
            "  API keys:        {} (create one: sibyl-gateway keys api-key new --name NAME --scope 'STREAMS:subscribe,publish')",
            dir.api_keys.display()
        ),
    }
    println!("Connect a client:");
    println!(
        "  cargo run -p sibyl-sdk --example connect -- --hub {hub} --ca {} --api-key {}",
        dir.certs.ca_cert.display(),
        dev_key.unwrap_or("<key>")
    );
    println!("Press Ctrl-C to drain the shards and stop.");
}

fn streams(cmd: StreamsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        StreamsCmd::Create {
            name,
            partitions,
            durability,
            retention_bytes,
            retention_age,
            data_dir,
        } => {
            let durability =
                sibyl_gateway::config::parse_durability(&durability).map_err(anyhow::Error::msg)?;
            let store = storage::open_store(&data_dir).with_context(|| {
                format!(
                    "opening the store in {} (stop the hub first)",
                    data_dir.display()
                )
            })?;
            let cfg = sibyl_gateway::store::StreamConfig {
                partitions,
                durability,
                retention_bytes,
                retention_age,
            };
            store.create_stream(&name, cfg)?;
            println!("stream {name}: {partitions} partitions");
        }
        StreamsCmd::Describe { name, admin } => return obs_cmd::streams_describe(&name, &admin),
        StreamsCmd::List { data_dir } => {
            let store = storage::open_store(&data_dir).with_context(|| {
                format!(
                    "opening the store in {} (stop the hub first)",
                    data_dir.display()
                )
            })?;
            for (name, c) in store.streams() {
                let mut records = 0u64;
                for p in 0..c.partitions {
                    let (earliest, next) = store.bounds(&name, p)?;
                    records += next - earliest;
                }
                println!(
                    "{name}  partitions={}  durability={:?}  records={records}",
                    c.partitions, c.durability
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn certs(cmd: CertsCmd) -> anyhow::Result<ExitCode> {
    let CertsCmd::Init { dir, names } = cmd;
    let opts = sibyl_certs::InitOptions {
        names,
        ..Default::default()
    };
    let paths = sibyl_certs::init_dir(&dir, &opts)?;
    let ca = sibyl_certs::load_certs(&paths.ca_cert)?;
    let first = ca.first().context("CA file holds no certificate")?;
    println!("CA certificate:     {}", paths.ca_cert.display());
    println!("CA key:             {}", paths.ca_key.display());
    println!("server certificate: {}", paths.server_cert.display());
    println!("server key:         {}", paths.server_key.display());
    println!(
        "CA fingerprint:     SHA256 {}",
        sibyl_certs::fingerprint_hex(&sibyl_certs::sha256_fingerprint(first))
    );
    Ok(ExitCode::SUCCESS)
}

fn keys(cmd: KeysCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCmd::Generate { file, force } => {
            if file.exists() && !force {
                bail!(
                    "{} exists; pass --force to replace it (tokens sealed under it stop opening)",
                    file.display()
                );
            }
            let k = sibyl_tokens::Keyring::generate()?;
            k.save(&file)?;
            println!(
                "wrote keyring {} (active key {})",
                file.display(),
                k.active_key_id()
            );
        }
        KeysCmd::Rotate { file, grace } => {
            let mut k = sibyl_tokens::Keyring::load(&file)?;
            let id = k.rotate(grace)?;
            k.save(&file)?;
            println!(
                "rotated {}: active key {id}; previous key opens tokens for {}",
                file.display(),
                humantime::format_duration(grace)
            );
        }
        KeysCmd::ApiKey(c) => return api_key(c),
    }
    Ok(ExitCode::SUCCESS)
}

fn api_key(cmd: ApiKeyCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ApiKeyCmd::New {
            name,
            scopes,
            data_dir,
        } => {
            let path = DataDir::at(&data_dir).api_keys;
            if !data_dir.exists() {
                bail!(
                    "data dir {} does not exist (start the gateway once, or pass --data-dir)",
                    data_dir.display()
                );
            }
            let mut store = ApiKeyStore::load(&path)?;
            let k = store.create(&name, &scopes, unix_now())?;
            store.save(&path)?;
            eprintln!(
                "created API key id={} name={} scopes={:?} in {}",
                k.record.id,
                k.record.name,
                k.record.scopes,
                path.display()
            );
            eprintln!("the key is shown once; only its SHA-256 hash is stored:");
            println!("{}", k.key);
        }
        ApiKeyCmd::List { data_dir } => {
            let store = ApiKeyStore::load(&DataDir::at(&data_dir).api_keys)?;
            for r in store.records() {
                println!("{}  {}  {}", r.id, r.name, r.scopes.join(" "));
            }
        }
        ApiKeyCmd::Check { data_dir } => {
            let store = ApiKeyStore::load(&DataDir::at(&data_dir).api_keys)?;
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            match store.verify(line.trim()) {
                Ok(r) => println!(
                    "valid: id={} name={} scopes={}",
                    r.id,
                    r.name,
                    r.scopes.join(" ")
                ),
                Err(e) => {
                    eprintln!("refused: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        ApiKeyCmd::Revoke { id, data_dir } => {
            let path = DataDir::at(&data_dir).api_keys;
            let mut store = ApiKeyStore::load(&path)?;
            if !store.revoke(&id) {
                bail!("no API key with id {id}");
            }
            store.save(&path)?;
            println!("revoked {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn token_inspect(
    keys: &Path,
    aad: &str,
    clock_skew: Duration,
    token: &str,
) -> anyhow::Result<ExitCode> {
    let ring = sibyl_tokens::Keyring::load(keys)?;
    let opts = sibyl_tokens::OpenOptions::default().with_clock_skew(clock_skew);
    let opened = sibyl_tokens::from_text(token.trim()).and_then(|b| {
        let key_id = b
            .get(1..5)
            .map(|k| u32::from_be_bytes([k[0], k[1], k[2], k[3]]));
        ring.open(&b, aad.as_bytes(), &opts).map(|c| (c, key_id))
    });
    match opened {
        Ok((c, key_id)) => {
            let scopes: Vec<serde_json::Value> = c
                .scopes
                .iter()
                .map(|s| serde_json::json!({ "stream": s.stream.to_string(), "subscribe": s.subscribe, "publish": s.publish }))
                .collect();
            let v = serde_json::json!({
                "token_id": hex::encode(c.token_id.0),
                "key_id": key_id,
                "client_id": c.client_id,
                "shard_group": c.shard_group,
                "scopes": scopes,
                "rate_class": c.rate_class,
                "issued_at": c.issued_at,
                "not_before": c.not_before,
                "expires_at": c.expires_at,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let kind = if e.is_stale() { "stale" } else { "invalid" };
            eprintln!("refused ({kind}): {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The hidden `shard` subcommand: take the control socket, wait for Init, apply rlimits,
/// run. Exits 0 on drain, SIGTERM or hub loss.
fn shard_main(fd: i32) -> ExitCode {
    let stream = match ipc::take_inherited(fd) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sibyl-gateway shard: {e} (this subcommand is started by the hub)");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sibyl-gateway shard: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r: anyhow::Result<()> = rt.block_on(async move {
        let mut ipc = ShardIpc::from_std(stream)?;
        let init = match ipc.recv().await? {
            Some(HubToShard::Init(init)) => *init,
            None => return Ok(()),
            Some(_) => bail!("first control message was not Init"),
        };
        init_logging(&init.log_filter, init.log_format);
        let report = sibyl_gateway::limits::apply_rlimits(&init.limits);
        info!(
            group = init.group,
            shard = init.shard,
            pid = std::process::id(),
            "rlimits {report}"
        );
        let exit = sibyl_gateway::shard::run_shard(init, ipc).await?;
        info!(?exit, "shard stopped");
        Ok(())
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("shard failed: {e:#}");
            eprintln!("sibyl-gateway shard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
