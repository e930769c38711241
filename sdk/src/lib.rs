//! # sibyl-sdk
//!
//! The Rust client SDK of Sibyl: [`Client`] authenticates at the hub, receives a ticket for a
//! shard group and attaches directly to a shard of that group, with failover and automatic
//! reconnects. The protocol logic lives in `sibyl-proto` (frames, the attach proof and the
//! I/O-free [`ClientMachine`](sibyl_proto::ClientMachine) that takes every connection
//! decision); this crate is the thin async driver over quinn and tokio.
//!
//! ```text
//!  ClientBuilder ──build──▶ Connector: Hello + rustls/quinn config (sibyl-certs Trust), bound UDP socket
//!        │ connect()
//!        ▼
//!  driver ◀── actions / deadlines ── ClientMachine (sibyl-proto, no I/O)
//!    │   └── outcomes (handle_ticket, handle_attached, handle_shard_failed…) ──▶
//!    ├─ hub task:    QUIC ─▶ hub, stream 0: Hello ─▶ ◀─ Ticket | Refused
//!    └─ shard tasks: QUIC ─▶ shard (top two, staggered race; TLS session cache per shard address), stream 0:
//!                    Attach{token, HMAC(secret, TLS exporter)} ─▶ ◀─ Attached | close(code)
//!        ▼
//!  Client ── one quinn::Endpoint (one UDP socket), hub connection (publishing, next),
//!    │       shard connection (subscriptions, next), watch of ConnectionState
//!    └─ supervisor task: session stream GoAway / connection close ─▶ machine ─▶ reattach
//!                        (cached ticket first, lost endpoint last, then the hub)
//! ```
//!
//! Data plane (PROTOCOL.md §5.2, §6.2, §6.3):
//!
//! ```text
//!  Publisher ── send() ─▶ window (max_inflight_bytes) ─▶ task: per-partition batches
//!    (hub connection, publish stream)  Produce{seq} ─▶ ◀─ ProduceAck{seq, base_offset}
//!    re-opens on a fresh hub connection after a loss and re-sends unacked batches with
//!    their original seq under the same producer id (exactly-once: the hub acks a batch it
//!    already appended with its original offsets; at-least-once with `idempotent(false)`)
//!  Subscription (futures::Stream) ◀─ bounded queue ◀─ partition readers ◀─ uni streams
//!    driver: control stream Subscribe / Position / Fetch ─▶ ◀─ Grant, Assignment, SubError
//!    SubMachine (sibyl-proto, I/O-free): dedupe by offset, resume Offsets, epochs, fetch within grant
//! ```
//!
//! Modules: [`config`] (the builder), [`client`] (the connected client and its state),
//! [`publisher`] ([`Publisher`], [`SendFuture`]), [`subscription`] ([`Subscription`] and its
//! builder), [`error`] (typed errors with `retryable()`: [`ConnectError`], [`PublishError`],
//! [`SubscribeError`]). Internals: `inner` (the state a client shares with its supervisor task,
//! publishers and subscriptions), `driver` (the machine driver), `hub` and `shard` (one
//! exchange each), `wire` (frames over quinn streams); the subscription's I/O-free machine is
//! [`SubMachine`](sibyl_proto::SubMachine) in `sibyl-proto`.
//!
//! ```no_run
//! use sibyl_sdk::{Client, Trust};
//!
//! # async fn demo() -> Result<(), sibyl_sdk::ConnectError> {
//! let client = Client::builder()
//!     .hub("127.0.0.1:4433")
//!     .trust(Trust::CaFile("sibyl-data/certs/ca.pem".into()))
//!     .api_key("sk_live_example")
//!     .want_subscribe("orders")
//!     .connect()
//!     .await?;
//! println!("attached to {:?} (group {:?})", client.shard_endpoint(), client.shard_group());
//! let mut states = client.watch_state();
//! while states.changed().await.is_ok() {
//!     println!("state: {:?}", *states.borrow());
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
mod driver;
pub mod error;
mod hub;
mod inner;
pub mod publisher;
mod shard;
pub mod subscription;
mod wire;

pub use client::{Client, ConnectionState, SessionInfo, TicketInfo};
pub use config::{ClientBuilder, Connector, HubAddress, SDK_VERSION};
pub use error::{
    ConfigError, ConnectError, ProtocolError, PublishError, SubscribeError, TlsError,
    TransportError,
};
pub use publisher::{
    PartitionFn, Partitioner, Publisher, PublisherConfig, PublisherMetrics, RecordAck, SendFuture,
};
pub use sibyl_certs::{Trust, parse_fingerprint};
pub use sibyl_proto::frame::{Endpoint, SessionLimits};
pub use sibyl_proto::frame::{Grant, Mode, Start};
pub use sibyl_proto::{ClientConfig, ErrorCode, Fault, Retry};
pub use subscription::{
    Record, SubscribeBuilder, Subscription, SubscriptionConfig, SubscriptionMetrics,
};
