//! The gateway's configuration: one clap + serde struct, file first, flags override, then
//! [`Config::validate`].
//!
//! Loading order (see [`Config::load`]): built-in defaults ← TOML file (`--config`, every
//! section optional, unknown keys rejected) ← command-line flags that were actually given.
//! Every field, its flag and its default are documented in `docs/CONFIG.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use serde::{Deserialize, Serialize};

/// Why the configuration could not be loaded or is not acceptable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config: cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema (names the offending key).
    #[error("config: {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key and position.
        message: String,
    },
    /// A value is out of range or inconsistent; `field` is the dotted path to it.
    #[error("config: {field} {reason}")]
    Invalid {
        /// Dotted path of the field, e.g. `shards.groups[1].shards`.
        field: String,
        /// What is wrong, e.g. `must be ≥ 1`.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// The whole gateway configuration (`sibyl-gateway run`).
///
/// Flag ids are the dotted TOML paths of the fields they override, which is how
/// [`Config::load`] merges "flags given on the command line" over the file.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Data directory: certificates, token keyring, API keys and the embedded log.
    /// Created (mode 0700) on first start.
    #[arg(
        long = "data-dir",
        id = "data_dir",
        value_name = "DIR",
        default_value = "./sibyl-data"
    )]
    pub data_dir: PathBuf,
    /// The hub's QUIC endpoint.
    #[command(flatten)]
    pub hub: HubConfig,
    /// Address rewriting for shard endpoints put in tickets (file only).
    #[arg(skip)]
    pub advertise: AdvertiseConfig,
    /// Shard groups and their per-shard resource limits (file only).
    #[arg(skip)]
    pub shards: ShardsConfig,
    /// Per-connection limits of hub and shard QUIC connections (file only).
    #[arg(skip)]
    pub connection: ConnectionConfig,
    /// Shard supervision: heartbeats, restarts, drain.
    #[command(flatten)]
    pub supervision: SupervisionConfig,
    /// Access-token lifetime, clock skew and keyring rotation.
    #[command(flatten)]
    pub tokens: TokensConfig,
    /// Log output.
    #[command(flatten)]
    pub logging: LoggingConfig,
    /// The admin HTTP listener: metrics, JSON API, status page.
    #[command(flatten)]
    pub admin: AdminConfig,
    /// Streams created at start (`[[streams]]`, file only; idempotent). Default: `events`,
    /// 4 partitions, `interval:5ms`.
    #[arg(skip = default_streams())]
    pub streams: Vec<StreamSpec>,
    /// Subscription serving on the shards: grants and batch sizes (file only).
    #[arg(skip)]
    pub subscribe: SubscribeConfig,
    /// Synthetic publishers run by the hub (`[[synthetic]]` or the repeatable
    /// `--synthetic name=events,partitions=4,rate=10000,size=100,skew=0.0`).
    #[arg(long = "synthetic", id = "synthetic", value_name = "SPEC", value_parser = SyntheticSpec::parse, action = clap::ArgAction::Append)]
    pub synthetic: Vec<SyntheticSpec>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./sibyl-data"),
            hub: HubConfig::default(),
            advertise: AdvertiseConfig::default(),
            shards: ShardsConfig::default(),
            connection: ConnectionConfig::default(),
            supervision: SupervisionConfig::default(),
            tokens: TokensConfig::default(),
            logging: LoggingConfig::default(),
            admin: AdminConfig::default(),
            streams: default_streams(),
            subscribe: SubscribeConfig::default(),
            synthetic: Vec::new(),
        }
    }
}

fn default_streams() -> Vec<StreamSpec> {
    vec![StreamSpec {
        name: "events".to_owned(),
        partitions: 4,
        durability: "interval:5ms".to_owned(),
        retention_bytes: None,
        retention_age: None,
        max_payload: DEFAULT_MAX_PAYLOAD,
    }]
}

/// Default and largest [`StreamSpec::max_payload`]: 1 MiB (the store's payload bound).
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 20;

/// One `[[streams]]` entry: a stream the hub creates at start (or checks, if it exists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    /// Stream name (`[A-Za-z0-9._-]`, 1..=128 bytes, not starting with `.`).
    pub name: String,
    /// Partitions (1..=4096). Default 1.
    #[serde(default = "one")]
    pub partitions: u32,
    /// `"always"` (fsync before each ack), `"interval:5ms"` (ack after the write, fsync
    /// within the interval) or `"never"`. Default `"always"`.
    #[serde(default = "always")]
    pub durability: String,
    /// Delete the oldest segments while a partition holds more than this. Default: unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_bytes: Option<u64>,
    /// Delete segments older than this (e.g. `"7d"`). Default: unset.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention_age: Option<Duration>,
    /// Largest record payload a publisher may send, bytes (≤ 1 MiB). Default 1 MiB.
    #[serde(default = "default_max_payload")]
    pub max_payload: u32,
}

fn one() -> u32 {
    1
}
fn always() -> String {
    "always".to_owned()
}
fn default_max_payload() -> u32 {
    DEFAULT_MAX_PAYLOAD
}

/// Parses a durability string: `always`, `never` or `interval:DURATION` (e.g.
/// `interval:5ms`).
pub fn parse_durability(s: &str) -> Result<crate::store::Durability, String> {
    use crate::store::Durability;
    match s {
        "always" => Ok(Durability::Always),
        "never" => Ok(Durability::Never),
        _ => {
            let d = s
                .strip_prefix("interval:")
                .ok_or_else(|| format!("{s:?} is not always, never or interval:DURATION"))?;
            let d = humantime::parse_duration(d).map_err(|e| format!("{s:?}: {e}"))?;
            if d.is_zero() || d > Duration::from_secs(60) {
                return Err(format!("{s:?}: the interval must be in (0, 60s]"));
            }
            Ok(Durability::Interval(d))
        }
    }
}

impl StreamSpec {
    /// The store configuration of this stream (after [`Config::validate`]).
    pub fn stream_config(&self) -> Result<crate::store::StreamConfig, String> {
        Ok(crate::store::StreamConfig {
            partitions: self.partitions,
            durability: parse_durability(&self.durability)?,
            retention_bytes: self.retention_bytes,
            retention_age: self.retention_age,
        })
    }
}

/// `[subscribe]`: how shards serve subscriptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscribeConfig {
    /// Grant: sustained records per second per subscription. Default 10 000 000.
    pub grant_rate: u64,
    /// Grant: bucket depth in records. Default 1 000 000.
    pub grant_burst: u64,
    /// Grant lease; a new `Grant` is sent after half of it. Default 30s; ≥ 1s.
    #[serde(with = "humantime_serde")]
    pub grant_lease: Duration,
    /// Largest `Records` batch, bytes of stored records (≤ 1 MiB; also the size of the
    /// shard's reads from the hub). Default 1 MiB: a reader catching up moves its backlog in
    /// the fewest hub reads, link frames and `Records` frames; a reader at the tail gets
    /// whatever was appended, so small batches are unaffected.
    pub batch_bytes: u32,
    /// Largest `Records` batch, records (1..=16384). Default 4096.
    pub batch_records: u32,
    /// A consumer-group hand-over waits at most this long for the previous owner's final
    /// `Position` before it uses the last one it knows. Default 5s.
    #[serde(with = "humantime_serde")]
    pub handover_timeout: Duration,
    /// Bytes of recent records the shard caches, all partitions together. Default 32 MiB.
    pub cache_bytes: usize,
}

impl Default for SubscribeConfig {
    fn default() -> Self {
        Self {
            grant_rate: 10_000_000,
            grant_burst: 1_000_000,
            grant_lease: Duration::from_secs(30),
            batch_bytes: 1 << 20,
            batch_records: 4096,
            handover_timeout: Duration::from_secs(5),
            cache_bytes: 32 << 20,
        }
    }
}

/// One synthetic publisher: the hub appends generated records straight into the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    /// Stream to publish to (created with `partitions` and `interval:5ms` if missing).
    pub name: String,
    /// Partitions of the stream if it is created. Default 4.
    #[serde(default = "four")]
    pub partitions: u32,
    /// Records per second, all partitions together. Default 10 000.
    #[serde(default = "ten_thousand")]
    pub rate: u64,
    /// Payload bytes per record. Default 100.
    #[serde(default = "hundred")]
    pub size: u32,
    /// Zipf-like partition skew exponent: 0 = uniform, 1 = partition k gets ∝ 1/(k+1).
    /// Default 0.
    #[serde(default)]
    pub skew: f64,
}

fn four() -> u32 {
    4
}
fn ten_thousand() -> u64 {
    10_000
}
fn hundred() -> u32 {
    100
}

impl SyntheticSpec {
    /// Parses `name=events,partitions=4,rate=10000,size=100,skew=0.0` (only `name` is
    /// required).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut spec = Self {
            name: String::new(),
            partitions: 4,
            rate: 10_000,
            size: 100,
            skew: 0.0,
        };
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected key=value"))?;
            let bad = |e: &dyn std::fmt::Display| format!("{k}={v}: {e}");
            match k.trim() {
                "name" | "stream" => spec.name = v.trim().to_owned(),
                "partitions" => spec.partitions = v.trim().parse().map_err(|e| bad(&e))?,
                "rate" => spec.rate = v.trim().parse().map_err(|e| bad(&e))?,
                "size" => spec.size = v.trim().parse().map_err(|e| bad(&e))?,
                "skew" => spec.skew = v.trim().parse().map_err(|e| bad(&e))?,
                other => return Err(format!("unknown key {other:?}")),
            }
        }
        if spec.name.is_empty() {
            return Err("name=STREAM is required".to_owned());
        }
        Ok(spec)
    }
}

/// `[hub]`: the hub's QUIC endpoint.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// UDP address the hub's QUIC endpoint listens on (port 0 picks a free port).
    #[arg(
        long = "listen",
        id = "hub.listen",
        value_name = "ADDR",
        default_value = "127.0.0.1:4433"
    )]
    pub listen: SocketAddr,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
        }
    }
}

/// `[advertise]`: endpoint rewriting, e.g. to put an impairment proxy in front of shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdvertiseConfig {
    /// Map of a shard's bound address (`"127.0.0.1:5000"`) to the address advertised to
    /// clients in tickets instead. Empty by default (shards are advertised as bound).
    pub rewrite: BTreeMap<String, String>,
    /// TLS server name put in every ticket endpoint (clients verify the shard certificate
    /// against it). Default `"localhost"` (a SAN of the development certificate).
    pub server_name: String,
}

impl Default for AdvertiseConfig {
    fn default() -> Self {
        Self {
            rewrite: BTreeMap::new(),
            server_name: "localhost".to_owned(),
        }
    }
}

impl AdvertiseConfig {
    /// The advertised address for a shard bound at `bound` (itself when not rewritten).
    ///
    /// Entries are checked by [`Config::validate`], so unparsable ones never reach here;
    /// an unparsable entry is ignored rather than trusted.
    pub fn rewrite(&self, bound: SocketAddr) -> SocketAddr {
        self.rewrite
            .get(&bound.to_string())
            .and_then(|a| a.parse().ok())
            .unwrap_or(bound)
    }
}

/// `[shards]`: the shard groups the hub starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardsConfig {
    /// The groups (`[[shards.groups]]`). Default: groups 0 and 1 with 2 shards each.
    pub groups: Vec<GroupConfig>,
    /// Deterministic shard ports: shard `index` of the `n`-th group (in file order) binds UDP
    /// port `port_base + (shards of the groups before it) + index`, and binds the same port
    /// again after a restart. `0` (the default): every shard binds a free port.
    ///
    /// Lets an operator (or the interop runner) know the bound addresses before start, e.g.
    /// to write an `[advertise] rewrite` to impairment proxies or firewall rules.
    pub port_base: u16,
}

impl ShardsConfig {
    /// The total number of shards over all groups.
    pub fn total(&self) -> u32 {
        self.groups.iter().map(|g| g.shards).sum()
    }

    /// The UDP port shard `index` of `group` binds: `None` when ports are ephemeral
    /// (`port_base = 0`), the group is unknown, the index is out of range, or the port would
    /// overflow (rejected by [`Config::validate`]).
    pub fn port_of(&self, group: u32, index: u32) -> Option<u16> {
        if self.port_base == 0 {
            return None;
        }
        let mut before: u32 = 0;
        for g in &self.groups {
            if g.id == group {
                if index >= g.shards {
                    return None;
                }
                let port = u32::from(self.port_base) + before + index;
                return u16::try_from(port).ok();
            }
            before += g.shards;
        }
        None
    }
}

impl Default for ShardsConfig {
    fn default() -> Self {
        Self {
            groups: vec![
                GroupConfig {
                    id: 0,
                    shards: 2,
                    limits: ShardLimits::default(),
                },
                GroupConfig {
                    id: 1,
                    shards: 2,
                    limits: ShardLimits::default(),
                },
            ],
            port_base: 0,
        }
    }
}

/// One `[[shards.groups]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Shard-group id carried in tokens; unique.
    pub id: u32,
    /// Number of shard processes in this group (1..=64). Default 2.
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// Resource limits for each shard of the group (`[shards.groups.limits]`).
    #[serde(default)]
    pub limits: ShardLimits,
}

fn default_shards() -> u32 {
    2
}

/// Per-shard resource limits. Unset means "no limit".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardLimits {
    /// cgroup v2 `memory.max` in bytes (≥ 16 MiB). Applied only where the cgroup hierarchy
    /// is writable. Default: unset.
    pub memory_bytes: Option<u64>,
    /// cgroup v2 `cpu.max` as a percentage of one CPU (1..=10000). Default: unset.
    pub cpu_percent: Option<u32>,
    /// `RLIMIT_NOFILE` (open files, ≥ 64). Default 4096.
    pub open_files: Option<u64>,
    /// `RLIMIT_AS` address-space bytes (≥ 256 MiB). Default 4 GiB: a bound on a runaway
    /// shard that leaves room for the virtual memory async runtimes and allocator arenas
    /// reserve (an idle shard maps ~20 MiB); `memory_bytes` (cgroup v2) is the precise limit.
    pub address_space_bytes: Option<u64>,
}

impl Default for ShardLimits {
    fn default() -> Self {
        Self {
            memory_bytes: None,
            cpu_percent: None,
            open_files: Some(4096),
            address_space_bytes: Some(4 << 30),
        }
    }
}

/// `[connection]`: limits applied to every client connection of the hub and of the shards.
///
/// The stream limits and the idle timeout are QUIC transport parameters (the peer cannot
/// exceed them); `max_frame` bounds every control frame body before it is buffered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionConfig {
    /// Concurrent client-opened bidirectional streams per connection (shard: the session
    /// stream plus control streams; hub: the hub stream plus publish streams). Default 100.
    pub max_streams: u32,
    /// Concurrent client-opened unidirectional streams per connection. The protocol has
    /// none, so the default is 0 (a client opening one is stopped by QUIC flow control).
    pub max_uni_streams: u32,
    /// Largest control-frame body accepted from a client, bytes (announced in
    /// `Attached.limits.max_frame`). Default 65 536; 4 096..=16 MiB.
    pub max_frame: u32,
    /// A connection without any packet for this long is closed (QUIC `max_idle_timeout`,
    /// announced in `Attached.limits.idle_timeout_ms`). Default 30s; ≥ 1s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Shard connections send a QUIC PING this often, so an attached session survives quiet
    /// periods; `0s` disables. Hub connections never do: an unused hub connection closes
    /// after `idle_timeout` unless the client keeps it alive. Default 10s; < idle_timeout.
    #[serde(with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    /// After the handshake, a client must send its first frame (`Hello` to the hub, `Attach`
    /// to a shard, `Subscribe` on a new control stream) within this time, or the connection
    /// is closed (`IDLE`). Default 10s.
    #[serde(with = "humantime_serde")]
    pub attach_timeout: Duration,
    /// Attached sessions one shard serves at once; an attach beyond it is refused: the shard
    /// closes the connection with `OVERLOADED` (the client tries the ticket's next endpoint).
    /// Default 10 000; 1..=1 000 000.
    pub max_sessions: u32,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            max_streams: 100,
            max_uni_streams: 0,
            max_frame: 64 * 1024,
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Duration::from_secs(10),
            attach_timeout: Duration::from_secs(10),
            max_sessions: 10_000,
        }
    }
}

/// `[supervision]`: how the hub watches and restarts shards.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    /// Interval at which each shard sends a heartbeat.
    #[arg(long = "heartbeat-interval", id = "supervision.heartbeat_interval", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Consecutive missed heartbeats after which a shard is declared dead and killed.
    #[arg(
        long = "missed-heartbeats",
        id = "supervision.missed_heartbeats",
        value_name = "N",
        default_value_t = 3
    )]
    pub missed_heartbeats: u32,
    /// How long a freshly spawned shard may take to report ready before it is killed.
    #[arg(long = "startup-timeout", id = "supervision.startup_timeout", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// First restart delay after a crash; doubles per consecutive short-lived crash.
    #[arg(long = "restart-backoff-base", id = "supervision.restart_backoff_base", value_name = "DURATION", default_value = "200ms", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub restart_backoff_base: Duration,
    /// Cap on the restart delay.
    #[arg(long = "restart-backoff-max", id = "supervision.restart_backoff_max", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// A shard that lived at least this long before dying is restarted with the base delay
    /// (its crash-loop count resets); shorter lives count as a crash loop.
    #[arg(long = "min-lifespan", id = "supervision.min_lifespan", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub min_lifespan: Duration,
    /// On shutdown, how long shards get to drain before they are killed.
    #[arg(long = "drain-deadline", id = "supervision.drain_deadline", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            missed_heartbeats: 3,
            startup_timeout: Duration::from_secs(10),
            restart_backoff_base: Duration::from_millis(200),
            restart_backoff_max: Duration::from_secs(10),
            min_lifespan: Duration::from_secs(10),
            drain_deadline: Duration::from_secs(10),
        }
    }
}

/// `[tokens]`: access tokens issued by the hub and opened by shards.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokensConfig {
    /// Lifetime of an issued access token.
    #[arg(long = "token-lifetime", id = "tokens.lifetime", value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub lifetime: Duration,
    /// Clock skew tolerated when checking token expiry.
    #[arg(long = "token-clock-skew", id = "tokens.clock_skew", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
    /// How often the hub rotates the token keyring.
    #[arg(long = "token-rotation-interval", id = "tokens.rotation_interval", value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub rotation_interval: Duration,
    /// How long a retired key still opens tokens after a rotation (≥ lifetime).
    #[arg(long = "token-rotation-grace", id = "tokens.rotation_grace", value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub rotation_grace: Duration,
    /// Deployment id, bound into every token as additional authenticated data: a token
    /// sealed by one deployment never opens in another, even under the same keyring.
    #[arg(
        long = "deployment-id",
        id = "tokens.deployment_id",
        value_name = "ID",
        default_value = DEFAULT_DEPLOYMENT_ID
    )]
    pub deployment_id: String,
}

/// Default [`TokensConfig::deployment_id`] (also `token inspect`'s default `--aad`).
pub const DEFAULT_DEPLOYMENT_ID: &str = "sibyl-dev";

impl Default for TokensConfig {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(3600),
            clock_skew: Duration::from_secs(30),
            rotation_interval: Duration::from_secs(24 * 3600),
            rotation_grace: Duration::from_secs(3600),
            deployment_id: DEFAULT_DEPLOYMENT_ID.to_owned(),
        }
    }
}

/// `[logging]`: log output (to stderr).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Log filter in `RUST_LOG` syntax (e.g. `info,sibyl_gateway=debug`). `RUST_LOG`, when
    /// set, takes precedence over the file; `--log` over both.
    #[arg(
        long = "log",
        id = "logging.filter",
        value_name = "FILTER",
        default_value = "info"
    )]
    pub filter: String,
    /// `text` (human-readable) or `json` (one JSON object per line, tracing-subscriber's
    /// json format); shards use the hub's format.
    #[arg(
        long = "log-format",
        id = "logging.format",
        value_name = "FORMAT",
        default_value = "text"
    )]
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            filter: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// `[logging] format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[admin]`: the hub's admin HTTP listener (Prometheus `/metrics`, the JSON API under
/// `/api/`, the status page at `/`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the admin listener (`false`: no listener and no shard metric reports).
    #[arg(skip = true)]
    pub enabled: bool,
    /// TCP address of the admin listener (port 0 picks a free port; the banner prints it and
    /// the hub writes it to `<data_dir>/run/admin.addr`).
    #[arg(
        long = "admin-listen",
        id = "admin.listen",
        value_name = "ADDR",
        default_value = "127.0.0.1:0"
    )]
    pub listen: SocketAddr,
    /// File holding a bearer token the listener requires (`Authorization: Bearer …`) on
    /// every route but the status page itself; unset: no token.
    #[arg(skip)]
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token_file: None,
        }
    }
}

impl Config {
    /// Builds the effective configuration: defaults, then the TOML file at `file` (if any),
    /// then every flag in `matches` whose value came from the command line.
    ///
    /// `matches` are the matches of the command that [`Config`] is flattened into.
    pub fn load(file: Option<&Path>, matches: &clap::ArgMatches) -> Result<Self, ConfigError> {
        use clap::FromArgMatches;
        let base = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        let flags =
            Self::from_arg_matches(matches).map_err(|e| invalid("command line", e.to_string()))?;
        let given: Vec<String> = matches
            .ids()
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| id.as_str().to_owned())
            .collect();
        base.overridden_by(&flags, &given)
    }

    /// Parses a TOML file (every section optional; unknown keys rejected by name).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<toml>"),
            message: e.to_string(),
        })
    }

    /// Copies the fields named by the dotted `paths` from `flags` over `self`.
    fn overridden_by(self, flags: &Self, paths: &[String]) -> Result<Self, ConfigError> {
        if paths.is_empty() {
            return Ok(self);
        }
        let to_value = |c: &Self| {
            toml::Value::try_from(c)
                .map_err(|e| invalid("config", format!("cannot be represented: {e}")))
        };
        let mut merged = to_value(&self)?;
        let from = to_value(flags)?;
        for path in paths {
            let mut src = &from;
            let mut dst = &mut merged;
            let parts: Vec<&str> = path.split('.').collect();
            for (i, part) in parts.iter().enumerate() {
                let last = i + 1 == parts.len();
                let Some(next_src) = src.get(*part) else {
                    break;
                };
                let Some(table) = dst.as_table_mut() else {
                    break;
                };
                if last {
                    table.insert((*part).to_owned(), next_src.clone());
                    break;
                }
                src = next_src;
                dst = table
                    .entry((*part).to_owned())
                    .or_insert_with(|| toml::Value::Table(toml::map::Map::new()));
            }
        }
        merged
            .try_into()
            .map_err(|e: toml::de::Error| invalid("command line", e.to_string()))
    }

    /// Checks ranges and consistency; the error names the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        for (from, to) in &self.advertise.rewrite {
            from.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    format!("advertise.rewrite.\"{from}\""),
                    "key must be an IP:port socket address",
                )
            })?;
            to.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    format!("advertise.rewrite.\"{from}\""),
                    "value must be an IP:port socket address",
                )
            })?;
        }
        if self.shards.groups.is_empty() {
            return Err(invalid("shards.groups", "must contain at least one group"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, g) in self.shards.groups.iter().enumerate() {
            let f = |name: &str| format!("shards.groups[{i}].{name}");
            if !seen.insert(g.id) {
                return Err(invalid(f("id"), format!("duplicates group id {}", g.id)));
            }
            if g.shards < 1 {
                return Err(invalid(f("shards"), "must be ≥ 1"));
            }
            if g.shards > 64 {
                return Err(invalid(f("shards"), "must be ≤ 64"));
            }
            let l = &g.limits;
            if l.memory_bytes.is_some_and(|m| m < 16 << 20) {
                return Err(invalid(
                    f("limits.memory_bytes"),
                    "must be ≥ 16 MiB (16777216)",
                ));
            }
            if l.cpu_percent.is_some_and(|c| !(1..=10_000).contains(&c)) {
                return Err(invalid(f("limits.cpu_percent"), "must be in 1..=10000"));
            }
            if l.open_files.is_some_and(|n| n < 64) {
                return Err(invalid(f("limits.open_files"), "must be ≥ 64"));
            }
            if l.address_space_bytes.is_some_and(|a| a < 256 << 20) {
                return Err(invalid(
                    f("limits.address_space_bytes"),
                    "must be ≥ 256 MiB (268435456)",
                ));
            }
        }
        if self.shards.port_base != 0 {
            let first = u32::from(self.shards.port_base);
            // Groups are ≤ 64 shards each, so this sum cannot overflow for any sane count;
            // saturate anyway rather than wrap.
            let last = first.saturating_add(self.shards.total()).saturating_sub(1);
            if last > u32::from(u16::MAX) {
                return Err(invalid(
                    "shards.port_base",
                    format!("shard ports {first}..={last} exceed 65535"),
                ));
            }
            let hub = u32::from(self.hub.listen.port());
            if (first..=last).contains(&hub) {
                return Err(invalid(
                    "shards.port_base",
                    format!("shard ports {first}..={last} include the hub's port {hub}"),
                ));
            }
        }
        let s = &self.supervision;
        if s.heartbeat_interval < Duration::from_millis(10) {
            return Err(invalid("supervision.heartbeat_interval", "must be ≥ 10ms"));
        }
        if s.missed_heartbeats < 1 {
            return Err(invalid("supervision.missed_heartbeats", "must be ≥ 1"));
        }
        if s.startup_timeout.is_zero() {
            return Err(invalid("supervision.startup_timeout", "must be > 0"));
        }
        if s.restart_backoff_base.is_zero() {
            return Err(invalid("supervision.restart_backoff_base", "must be > 0"));
        }
        if s.restart_backoff_max < s.restart_backoff_base {
            return Err(invalid(
                "supervision.restart_backoff_max",
                "must be ≥ supervision.restart_backoff_base",
            ));
        }
        if s.drain_deadline.is_zero() {
            return Err(invalid("supervision.drain_deadline", "must be > 0"));
        }
        let t = &self.tokens;
        if t.lifetime < Duration::from_secs(1) {
            return Err(invalid("tokens.lifetime", "must be ≥ 1s"));
        }
        if t.clock_skew >= t.lifetime {
            return Err(invalid("tokens.clock_skew", "must be < tokens.lifetime"));
        }
        if t.rotation_interval < Duration::from_secs(60) {
            return Err(invalid("tokens.rotation_interval", "must be ≥ 1m"));
        }
        if t.rotation_grace < t.lifetime {
            return Err(invalid(
                "tokens.rotation_grace",
                "must be ≥ tokens.lifetime (or tokens issued before a rotation die early)",
            ));
        }
        if t.deployment_id.is_empty() || t.deployment_id.len() > 128 {
            return Err(invalid("tokens.deployment_id", "must be 1..=128 bytes"));
        }
        let a = &self.advertise;
        if a.server_name.is_empty() || a.server_name.len() > 253 {
            return Err(invalid("advertise.server_name", "must be 1..=253 bytes"));
        }
        let c = &self.connection;
        if !(1..=10_000).contains(&c.max_streams) {
            return Err(invalid("connection.max_streams", "must be in 1..=10000"));
        }
        if c.max_uni_streams > 10_000 {
            return Err(invalid("connection.max_uni_streams", "must be ≤ 10000"));
        }
        if !(4096..=16 << 20).contains(&c.max_frame) {
            return Err(invalid(
                "connection.max_frame",
                "must be in 4096..=16777216 (an Attach with a full token must fit)",
            ));
        }
        if c.idle_timeout < Duration::from_secs(1) {
            return Err(invalid("connection.idle_timeout", "must be ≥ 1s"));
        }
        if !c.keep_alive_interval.is_zero() && c.keep_alive_interval >= c.idle_timeout {
            return Err(invalid(
                "connection.keep_alive_interval",
                "must be < connection.idle_timeout (or 0s to disable)",
            ));
        }
        if c.attach_timeout.is_zero() {
            return Err(invalid("connection.attach_timeout", "must be > 0"));
        }
        if !(1..=1_000_000).contains(&c.max_sessions) {
            return Err(invalid("connection.max_sessions", "must be in 1..=1000000"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, st) in self.streams.iter().enumerate() {
            let f = |name: &str| format!("streams[{i}].{name}");
            crate::store::validate_stream_name(&st.name)
                .map_err(|e| invalid(f("name"), e.to_string()))?;
            if !names.insert(st.name.as_str()) {
                return Err(invalid(
                    f("name"),
                    format!("duplicates stream {:?}", st.name),
                ));
            }
            if !(1..=crate::store::MAX_PARTITIONS).contains(&st.partitions) {
                return Err(invalid(f("partitions"), "must be in 1..=4096"));
            }
            parse_durability(&st.durability).map_err(|e| invalid(f("durability"), e))?;
            if !(1..=DEFAULT_MAX_PAYLOAD).contains(&st.max_payload) {
                return Err(invalid(f("max_payload"), "must be in 1..=1048576"));
            }
        }
        let sc = &self.subscribe;
        if sc.grant_rate == 0 || sc.grant_burst == 0 {
            return Err(invalid(
                "subscribe.grant_rate",
                "and grant_burst must be ≥ 1",
            ));
        }
        if sc.grant_lease < Duration::from_secs(1) {
            return Err(invalid("subscribe.grant_lease", "must be ≥ 1s"));
        }
        if !(1024..=1 << 20).contains(&sc.batch_bytes) {
            return Err(invalid(
                "subscribe.batch_bytes",
                "must be in 1024..=1048576",
            ));
        }
        if !(1..=16_384).contains(&sc.batch_records) {
            return Err(invalid("subscribe.batch_records", "must be in 1..=16384"));
        }
        if sc.cache_bytes < 1 << 20 {
            return Err(invalid("subscribe.cache_bytes", "must be ≥ 1 MiB"));
        }
        for (i, sy) in self.synthetic.iter().enumerate() {
            let f = |name: &str| format!("synthetic[{i}].{name}");
            crate::store::validate_stream_name(&sy.name)
                .map_err(|e| invalid(f("name"), e.to_string()))?;
            if !(1..=crate::store::MAX_PARTITIONS).contains(&sy.partitions) {
                return Err(invalid(f("partitions"), "must be in 1..=4096"));
            }
            if !(1..=10_000_000).contains(&sy.rate) {
                return Err(invalid(f("rate"), "must be in 1..=10000000"));
            }
            if sy.size > DEFAULT_MAX_PAYLOAD {
                return Err(invalid(f("size"), "must be ≤ 1048576"));
            }
            if !(0.0..=4.0).contains(&sy.skew) {
                return Err(invalid(f("skew"), "must be in 0..=4"));
            }
        }
        if let Some(f) = &self.admin.token_file
            && self.admin.enabled
        {
            crate::obs::admin::read_token(f)
                .map_err(|e| invalid("admin.token_file", e.to_string()))?;
        }
        if tracing_subscriber::EnvFilter::try_new(&self.logging.filter).is_err() {
            return Err(invalid(
                "logging.filter",
                format!("is not a valid filter: {:?}", self.logging.filter),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    struct TestCli {
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        run: Config,
    }

    fn load(file_text: Option<&str>, args: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        if let Some(t) = file_text {
            std::fs::write(&path, t).unwrap();
        }
        let mut argv = vec!["test"];
        argv.extend_from_slice(args);
        let m = TestCli::command().try_get_matches_from(argv).unwrap();
        let _ = TestCli::from_arg_matches(&m).unwrap();
        Config::load(file_text.map(|_| path.as_path()), &m)
    }

    #[test]
    fn defaults_validate_and_match_the_docs() {
        let c = load(None, &[]).unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
        assert_eq!(c.hub.listen.to_string(), "127.0.0.1:4433");
        assert_eq!(c.shards.groups.len(), 2);
        assert!(c.shards.groups.iter().all(|g| g.shards == 2));
        assert_eq!(c.supervision.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(c.supervision.missed_heartbeats, 3);
        assert_eq!(
            c.supervision.restart_backoff_base,
            Duration::from_millis(200)
        );
        assert_eq!(c.supervision.restart_backoff_max, Duration::from_secs(10));
        assert_eq!(c.supervision.drain_deadline, Duration::from_secs(10));
        assert_eq!(c.tokens.lifetime, Duration::from_secs(3600));
        assert_eq!(c.tokens.clock_skew, Duration::from_secs(30));
    }

    const FILE: &str = r#"
        data_dir = "/var/lib/sibyl"
        [hub]
        listen = "0.0.0.0:7000"
        [supervision]
        heartbeat_interval = "250ms"
        drain_deadline = "3s"
        [[shards.groups]]
        id = 7
        shards = 3
        [shards.groups.limits]
        memory_bytes = 536870912
        cpu_percent = 50
        [advertise.rewrite]
        "127.0.0.1:5000" = "127.0.0.1:6000"
    "#;

    #[test]
    fn file_is_read_and_flags_override_only_what_was_given() {
        let c = load(
            Some(FILE),
            &["--listen", "127.0.0.1:0", "--drain-deadline", "5s"],
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/sibyl"));
        assert_eq!(c.hub.listen.to_string(), "127.0.0.1:0");
        assert_eq!(c.supervision.drain_deadline, Duration::from_secs(5));
        // Not given on the command line: the file wins over the flag's default.
        assert_eq!(c.supervision.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(c.shards.groups.len(), 1);
        assert_eq!(c.shards.groups[0].id, 7);
        assert_eq!(c.shards.groups[0].shards, 3);
        assert_eq!(c.shards.groups[0].limits.memory_bytes, Some(512 << 20));
        // Unset limits in a present limits table fall back to the defaults.
        assert_eq!(c.shards.groups[0].limits.open_files, Some(4096));
        assert_eq!(
            c.advertise
                .rewrite("127.0.0.1:5000".parse().unwrap())
                .to_string(),
            "127.0.0.1:6000"
        );
        assert_eq!(
            c.advertise
                .rewrite("127.0.0.1:5001".parse().unwrap())
                .to_string(),
            "127.0.0.1:5001"
        );
    }

    #[test]
    fn flags_without_file_override_defaults() {
        let c = load(
            None,
            &[
                "--data-dir",
                "/tmp/x",
                "--log",
                "debug",
                "--missed-heartbeats",
                "5",
            ],
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.logging.filter, "debug");
        assert_eq!(c.supervision.missed_heartbeats, 5);
        assert_eq!(c.hub, HubConfig::default());
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let e = load(
            Some("[hub]\nlisten = \"127.0.0.1:1\"\nlisten_addr = \"x\"\n"),
            &[],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Parse { .. }), "{msg}");
        assert!(msg.contains("listen_addr"), "{msg}");
        let e = Config::from_toml("[[shards.groups]]\nid = 1\nshard = 2\n").unwrap_err();
        assert!(e.to_string().contains("shard"), "{e}");
        let e = Config::from_toml("colour = true\n").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn shard_ports_follow_port_base_in_group_order() {
        let mut c = Config::from_toml(
            "[shards]\nport_base = 7000\n[[shards.groups]]\nid = 5\nshards = 2\n\
             [[shards.groups]]\nid = 1\nshards = 3\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.shards.port_of(5, 0), Some(7000));
        assert_eq!(c.shards.port_of(5, 1), Some(7001));
        assert_eq!(c.shards.port_of(1, 0), Some(7002));
        assert_eq!(c.shards.port_of(1, 2), Some(7004));
        assert_eq!(c.shards.port_of(1, 3), None);
        assert_eq!(c.shards.port_of(9, 0), None);
        // Ephemeral by default.
        c.shards.port_base = 0;
        assert_eq!(c.shards.port_of(5, 0), None);
        assert_eq!(Config::default().shards.port_base, 0);
        // The hub's port inside the range is refused, just outside it is fine.
        c.shards.port_base = 4430;
        c.hub.listen = "127.0.0.1:4433".parse().unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("config: shards.port_base"), "{e}");
        assert!(e.contains("4433"), "{e}");
        c.shards.port_base = 4434;
        c.validate().unwrap();
        c.shards.port_base = 4428;
        c.validate().unwrap();
        // Past 65535 is refused.
        c.shards.port_base = 65_532;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("exceed 65535"), "{e}");
        c.shards.port_base = 65_531;
        c.validate().unwrap();
        assert_eq!(c.shards.port_of(1, 2), Some(65_535));
    }

    #[test]
    fn validate_names_the_field() {
        let mut c =
            Config::from_toml("[[shards.groups]]\nid = 0\n[[shards.groups]]\nid = 1\nshards = 0\n")
                .unwrap();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "config: shards.groups[1].shards must be ≥ 1"
        );
        c.shards.groups[1].shards = 1;
        c.shards.groups[1].id = 0;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "config: shards.groups[1].id duplicates group id 0"
        );
        c.shards.groups[1].id = 1;
        c.shards.groups[0].limits.cpu_percent = Some(0);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("config: shards.groups[0].limits.cpu_percent")
        );
        c.shards.groups[0].limits.cpu_percent = None;
        c.validate().unwrap();

        let mut s = Config::default();
        s.supervision.restart_backoff_max = Duration::from_millis(100);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .starts_with("config: supervision.restart_backoff_max")
        );
        let mut s = Config::default();
        s.tokens.clock_skew = Duration::from_secs(7200);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .starts_with("config: tokens.clock_skew")
        );
        let mut s = Config::default();
        s.advertise
            .rewrite
            .insert("nope".into(), "127.0.0.1:1".into());
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .starts_with("config: advertise.rewrite.\"nope\"")
        );
        let mut s = Config::default();
        s.shards.groups.clear();
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "config: shards.groups must contain at least one group"
        );
    }

    #[test]
    fn bad_flag_values_are_refused_by_clap() {
        let r = TestCli::command().try_get_matches_from(["t", "--listen", "not-an-addr"]);
        assert!(r.is_err());
        let r = TestCli::command().try_get_matches_from(["t", "--heartbeat-interval", "soon"]);
        assert!(r.is_err());
    }
}
