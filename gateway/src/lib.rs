//! # sibyl-gateway
//!
//! The edge gateway: the hub (admission, tickets, supervision of shard processes), the shard
//! processes ("streamlets") that serve subscriptions, and the embedded store.
//!
//! ```text
//! sibyl-gateway (hub) ── config::Config (file ← flags, validate) ── datadir::bootstrap
//!   │                     (certs/, keyring.cbor, api-keys.toml; apikeys::ApiKeyStore)
//!   └─ supervisor::Supervisor ──spawn `sibyl-gateway shard --ipc-fd N`──▶ shard::run_shard
//!        (SupervisorPolicy: I/O-free)  ◀── ipc (u32 len + CBOR over a socketpair) ──▶
//!                                          limits: rlimits (in the shard), cgroup v2 (hub)
//! ```
//!
//! - [`config`]: the one clap + serde configuration struct and its validation.
//! - [`datadir`]: first-start bootstrap of the data directory.
//! - [`apikeys`]: API keys, stored hashed.
//! - [`supervisor`]: the shard supervision policy and its tokio driver.
//! - [`ipc`]: the hub ↔ shard control channel.
//! - [`shard`]: the shard process runtime.
//! - [`ids`], [`shard_stats`]: bottom modules that import nothing of the crate: [`ShardId`],
//!   and the live [`ShardStats`](shard_stats::ShardStats) the session layer writes and the
//!   heartbeats report.
//! - [`limits`]: rlimits and cgroup v2 limits.
//! - [`storelink`]: how shards read the hub's store (Unix socket, framed; per-partition caches)
//!   and relay their consumer-group members to the hub.
//! - [`quic`]: shared QUIC setup (transport config, endpoint, bounded frame reads).
//! - [`hub`]: the hub's admission endpoint (`Hello` → `Ticket` | `Refused`), publishing, and
//!   the consumer-group coordinator of every shard's members ([`hub::GroupCoordinator`]).
//! - [`session`]: shard-side connections (`Attach` → `Attached`, `GoAway` on drain) and
//!   subscriptions (`Subscribe` → `Grant`, `Assignment`, partition streams of `Records`).
//! - [`storage`]: the hub's store lifecycle (streams from config, flush and retention).
//! - [`grants`]: the I/O-free per-subscription token bucket.
//! - [`predict`]: I/O-free predictive pre-fetch cores (partition assignment, run by the hub's
//!   group coordinator; pre-fetch sizing and deviation tracking, run by each shard).
//! - [`synthetic`]: generated records published by the hub (demos, benchmarks).
//! - [`launch`]: starting the real `sibyl-gateway` binary from a harness (integration tests,
//!   interop runner, benchmarks) and parsing its start-up banner.
//! - [`obs`]: metrics (shards report theirs to the hub after each heartbeat), the admin HTTP
//!   listener (`/metrics`, `/api/…`, the status page) and the operator commands' client.
//!
//! ```text
//! client ──QUIC──▶ hub::HubServer ── hub::Hub::handle_hello (keys, keyring, Supervisor loads)
//! client ──QUIC──▶ session::SessionServer (in each shard) ── session::check_attach
//!
//! data plane:
//! publisher ──Produce──▶ hub::publish (blocking worker, group commit) ──▶ store::Store
//! store::Store ◀── storelink::StoreLinkServer ◀══ Unix socket ══▶ storelink::CachedReader
//!   (in each shard) ──▶ session::subscribe (grant bucket, per-partition uni streams) ──▶ client
//! consumer groups: session::subscribe ──join/leave/Position/Forecast══▶ StoreLinkServer ──▶
//!   hub::GroupCoordinator ──GroupAssign══▶ the member's shard ──Assignment──▶ client
//! ```
#![warn(missing_docs)]
pub mod apikeys;
pub mod config;
pub mod datadir;
#[cfg(any(fuzzing, feature = "fuzzing"))]
pub mod fuzzing;
pub mod grants;
pub mod hub;
pub mod ids;
pub mod ipc;
pub mod launch;
pub mod limits;
pub mod obs;
pub mod predict;
pub mod quic;
pub mod session;
pub mod shard;
pub mod shard_stats;
pub mod storage;
pub mod store;
pub mod storelink;
pub mod supervisor;
pub mod synthetic;

pub use config::{Config, ConfigError};
pub use ids::ShardId;
pub use supervisor::{ShardInfo, Supervisor, SupervisorOptions, SupervisorPolicy};
