//! # sibyl-proto
//!
//! The Sibyl wire protocol and the I/O-free machines shared by clients and servers. This crate
//! depends on neither tokio nor quinn, as quinn-proto sits under quinn: everything here takes
//! bytes and `now` in and gives bytes, decisions and deadlines out. The normative description
//! for implementers in other languages is `docs/PROTOCOL.md`.
//!
//! ```text
//!  client                                   hub (ALPN "sibyl/1")
//!    │ bidi "hub stream":  Hello ─────────────▶
//!    │                     ◀───────────── Ticket{token, secret, group, endpoints} | Refused
//!    │ bidi "publish stream" (per publisher): PublishOpen, Produce… ─▶
//!    │                     ◀── PublishAccepted, ProduceAck | ProduceError…
//!    │
//!    │                                      shard of `group` (separate QUIC connection)
//!    │ bidi "session stream" (first): Attach{token, proof} ─▶
//!    │                     ◀── Attached{session_id, limits} … GoAway
//!    │ bidi "control stream" (per subscription): Subscribe, Position, Fetch, Forecast ─▶
//!    │                     ◀── Assignment, Grant, SubError, FlipHint, Flip
//!    │ uni "partition stream" (shard-opened, per assigned partition):
//!    │                     ◀── PartitionOpen, Records, Records, … FIN (revoked)
//! ```
//!
//! Every stream is a sequence of frames `type: u8 · length: u32 BE · body`; see [`frame`].
//!
//! - [`cbor`]: the single CBOR codec module every crate goes through.
//! - [`codec`]: [`Reader`], the [`Codec`] trait, [`FrameError`], [`DecodeLimits`].
//! - [`frame`]: every frame type and the stream-level [`FrameDecoder`].
//! - [`error`]: [`ErrorCode`] with its [`Fault`] and [`Retry`] class.
//! - [`proof`]: [`attach_proof`] / [`verify_attach_proof`].
//! - [`version`]: ALPN and version negotiation.
//! - [`backoff`]: [`Backoff`], the exponential backoff (with full jitter from a caller's
//!   sample) behind every reconnect and restart delay, here and in the gateway.
//! - [`client`]: the I/O-free connection machine (hub → ticket → shard failover, backoff).
//! - [`subscription`]: [`SubMachine`], the I/O-free state of one subscription (dedupe by
//!   offset, resume offsets, assignment epochs, `Position` / `Fetch` / `Forecast` timing,
//!   the grant bucket).
//! - [`publish`]: the I/O-free publish machine (batching, linger, seq numbering, the
//!   idempotent producer, ack matching, re-sending after a lost stream).
//! - [`forecast`]: predictive pre-fetch, client side: consumption windows, forecasters (SMA,
//!   EWMA, Holt) with MASE-driven sensitivity, the assignment-request policy, pre-fetch metrics.
//! - `fuzzing` (feature `fuzzing` or `cfg(fuzzing)`): oracles for fuzz targets.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod backoff;
pub mod cbor;
pub mod client;
pub mod codec;
pub mod error;
pub mod forecast;
pub mod frame;
pub mod proof;
pub mod publish;
pub mod subscription;
pub mod version;

#[cfg(any(fuzzing, feature = "fuzzing"))]
pub mod fuzzing;

pub use backoff::Backoff;
pub use client::{
    AttemptId, ClientAction, ClientConfig, ClientMachine, DEFAULT_RACE_DELAY, ShardAttempt, Timer,
};
pub use codec::{Codec, DecodeLimits, FrameError, Reader};
pub use error::{ErrorCode, Fault, Retry};
pub use forecast::{
    ForecastConfig, ForecastEngine, ForecasterKind, PrefetchMetrics, PrefetchStats,
};
pub use frame::data::BatchError;
pub use frame::{Frame, FrameBody, FrameDecoder, FrameType};
pub use proof::{attach_proof, verify_attach_proof};
pub use publish::{PublishConfig, PublishMachine, PublishViolation};
pub use subscription::{SubMachine, SubscriptionMetrics};
pub use version::{ALPN, ALPN_GROUP_HINT, PROTOCOL_VERSION, SUPPORTED_VERSIONS, negotiate};
