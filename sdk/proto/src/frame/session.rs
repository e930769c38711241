//! Session stream frames (first bidi stream of a shard connection):
//! `Attach` → `Attached`, later `GoAway`; or, in 0-RTT on a resumed connection,
//! `EarlyAttach` → `Attached` (0.5-RTT) → `AttachProof` once the handshake is complete.

use serde::{Deserialize, Serialize};

use super::{Validate, cbor_frame};
use crate::error::ErrorCode;

/// `Attach` (`0x20`): the first frame on a shard connection's session stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    /// The ticket's token, verbatim.
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// [`crate::attach_proof`] of the session secret over this connection's TLS exporter.
    #[serde(with = "serde_bytes")]
    pub proof: [u8; 32],
    /// The client id sent in `Hello` (the shard checks it against the token).
    pub client_id: String,
    /// A previous `session_id` from `Attached`. Advisory: shards keep no per-session state to
    /// restore (PROTOCOL.md §6.1); the client re-sends `Subscribe` regardless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<u64>,
}

/// Limits the shard imposes on the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionLimits {
    /// Maximum concurrent client-opened bidi streams (session stream + control streams).
    pub max_streams: u32,
    /// Maximum body length of any frame the client sends.
    pub max_frame: u32,
    /// The shard's QUIC idle timeout: a connection without any packet for this long ends
    /// silently (no close frame).
    pub idle_timeout_ms: u64,
}

/// `Attached` (`0x21`): the session is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// Session id (for `Attach.resume`).
    pub session_id: u64,
    /// Limits for this session.
    pub limits: SessionLimits,
    /// The shard's clock, Unix time in milliseconds (to interpret `Grant.lease_expires_ms`).
    pub server_time: u64,
}

/// `GoAway` (`0x22`): the shard is draining; reconnect elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoAway {
    /// Usually `DRAINING`.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub reason: String,
    /// Reconnect (to another endpoint) within this many milliseconds; the shard closes the
    /// connection with `code` once it elapses.
    pub reconnect_after_ms: u64,
}

/// `EarlyAttach` (`0x23`): `Attach` without the proof, for 0-RTT data on a resumed
/// connection, where the TLS exporter the proof is computed over does not exist yet. The
/// shard checks the token and answers `Attached` at once (0.5-RTT), then waits for
/// `AttachProof` and serves nothing else on the connection until the proof verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyAttach {
    /// The ticket's token, verbatim.
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// The client id sent in `Hello` (the shard checks it against the token).
    pub client_id: String,
    /// As [`Attach::resume`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<u64>,
}

/// `AttachProof` (`0x24`): the proof of an `EarlyAttach`, sent as the next frame on the
/// session stream once the handshake is complete (same derivation as [`Attach::proof`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachProof {
    /// [`crate::attach_proof`] of the session secret over this connection's TLS exporter.
    #[serde(with = "serde_bytes")]
    pub proof: [u8; 32],
}

impl Validate for Attach {}
impl Validate for Attached {}
impl Validate for GoAway {}
impl Validate for EarlyAttach {}
impl Validate for AttachProof {}

cbor_frame!(Attach, Attached, GoAway, EarlyAttach, AttachProof);
