//! Application error codes: QUIC `CONNECTION_CLOSE` / `RESET_STREAM` / `STOP_SENDING` values
//! and the `code` field of `Refused`, `SubError`, `ProduceError` and `GoAway`.
//!
//! Every code says whose fault it is ([`Fault`]) and whether, and where, a retry can help
//! ([`Retry`]); the SDK's failover is driven by [`ErrorCode::retry`].

use serde::{Deserialize, Serialize};

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fault {
    /// Nobody: a normal close.
    None,
    /// The client (bad credentials, bad frames, asked for too much).
    Client,
    /// The server (bug, overload, shutdown).
    Server,
}

/// Whether, and where, retrying the failed operation can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Retry {
    /// Retrying cannot help: surface the error to the application.
    Never,
    /// Retry against the same endpoint (after backoff).
    SameEndpoint,
    /// Retry against another endpoint of the ticket (the next in priority order).
    OtherEndpoint,
    /// The ticket is unusable: go back to the hub for a new one, then retry.
    AfterHub,
}

/// A Sibyl application error code.
///
/// The listed codes fit in a byte; on the wire a code is a QUIC varint (up to 2^62 − 1) or a
/// CBOR unsigned integer (up to 2^64 − 1). Unknown values received from a peer, however
/// large, are kept as [`ErrorCode::Unknown`] so they round-trip; they are treated as server
/// faults retryable on another endpoint (PROTOCOL.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u64", into = "u64")]
#[non_exhaustive]
pub enum ErrorCode {
    /// `0x00`: graceful close, no error.
    NoError,
    /// `0x01`: an internal error in the sender.
    Internal,
    /// `0x02`: the peer sent a valid frame that is not allowed here (wrong stream, wrong state).
    ProtocolViolation,
    /// `0x03`: a frame's length exceeded the maximum for its type.
    FrameTooLarge,
    /// `0x04`: a frame could not be decoded (bad CBOR, bad layout, unknown type, truncated).
    MalformedFrame,
    /// `0x05`: no protocol version in common.
    UnsupportedVersion,
    /// `0x10`: the API key is missing, unknown or revoked.
    Unauthenticated,
    /// `0x11`: authenticated, but not allowed this stream/action.
    Forbidden,
    /// `0x12`: the shard token has expired.
    TokenExpired,
    /// `0x13`: the shard token does not open (forged, corrupted, unknown key id).
    TokenInvalid,
    /// `0x14`: the token is for another shard group than this shard's.
    WrongGroup,
    /// `0x15`: the attach proof does not match the session secret and this connection.
    ProofFailed,
    /// `0x16`: the server is overloaded; retry elsewhere or later.
    Overloaded,
    /// `0x17`: the server is draining (shutdown, retirement); reconnect elsewhere.
    Draining,
    /// `0x18`: a negotiated limit (streams, subscriptions, frame size) was exceeded.
    LimitExceeded,
    /// `0x19`: closed for inactivity.
    Idle,
    /// `0x1a`: the named stream (or partition) does not exist.
    NotFound,
    /// `0x1b`: the client consumed beyond its token grant.
    GrantExceeded,
    /// `0x1c`: a partition was revoked from this subscription (stream reset of a partition
    /// uni stream); not an error of the session.
    Revoked,
    /// `0x1d`: an idempotent batch's `seq` is at or below the producer's last appended seq on
    /// that partition and is not one of the batches the hub remembers: it was refused before,
    /// or is too old to tell. Not appended.
    OutOfOrderSequence,
    /// `0x1e`: `PublishOpen.producer_id`/`producer_token` were not issued by this hub for this
    /// API key, client id and stream (or the hub lost its producer state).
    UnknownProducer,
    /// Any value not listed above.
    Unknown(u64),
}

impl ErrorCode {
    /// Maps a wire value to a code; unlisted values become [`ErrorCode::Unknown`].
    pub fn from_u32(v: u32) -> Self {
        Self::from_u64(u64::from(v))
    }

    /// Maps a wire value (QUIC varint or CBOR uint) to a code; unlisted values become
    /// [`ErrorCode::Unknown`].
    pub fn from_u64(v: u64) -> Self {
        match v {
            0x00 => Self::NoError,
            0x01 => Self::Internal,
            0x02 => Self::ProtocolViolation,
            0x03 => Self::FrameTooLarge,
            0x04 => Self::MalformedFrame,
            0x05 => Self::UnsupportedVersion,
            0x10 => Self::Unauthenticated,
            0x11 => Self::Forbidden,
            0x12 => Self::TokenExpired,
            0x13 => Self::TokenInvalid,
            0x14 => Self::WrongGroup,
            0x15 => Self::ProofFailed,
            0x16 => Self::Overloaded,
            0x17 => Self::Draining,
            0x18 => Self::LimitExceeded,
            0x19 => Self::Idle,
            0x1a => Self::NotFound,
            0x1b => Self::GrantExceeded,
            0x1c => Self::Revoked,
            0x1d => Self::OutOfOrderSequence,
            0x1e => Self::UnknownProducer,
            other => Self::Unknown(other),
        }
    }

    /// The wire value as `u32`: exact for every listed code (all are below `0x100`); an
    /// [`ErrorCode::Unknown`] value beyond `u32` saturates to `u32::MAX`.
    pub fn to_u32(self) -> u32 {
        u32::try_from(self.to_u64()).unwrap_or(u32::MAX)
    }

    /// The wire value.
    pub fn to_u64(self) -> u64 {
        match self {
            Self::NoError => 0x00,
            Self::Internal => 0x01,
            Self::ProtocolViolation => 0x02,
            Self::FrameTooLarge => 0x03,
            Self::MalformedFrame => 0x04,
            Self::UnsupportedVersion => 0x05,
            Self::Unauthenticated => 0x10,
            Self::Forbidden => 0x11,
            Self::TokenExpired => 0x12,
            Self::TokenInvalid => 0x13,
            Self::WrongGroup => 0x14,
            Self::ProofFailed => 0x15,
            Self::Overloaded => 0x16,
            Self::Draining => 0x17,
            Self::LimitExceeded => 0x18,
            Self::Idle => 0x19,
            Self::NotFound => 0x1a,
            Self::GrantExceeded => 0x1b,
            Self::Revoked => 0x1c,
            Self::OutOfOrderSequence => 0x1d,
            Self::UnknownProducer => 0x1e,
            Self::Unknown(v) => v,
        }
    }

    /// Whose fault an error with this code is.
    pub fn fault(self) -> Fault {
        match self {
            Self::NoError | Self::Idle | Self::Revoked => Fault::None,
            Self::ProtocolViolation
            | Self::FrameTooLarge
            | Self::MalformedFrame
            | Self::UnsupportedVersion
            | Self::Unauthenticated
            | Self::Forbidden
            | Self::TokenExpired
            | Self::TokenInvalid
            | Self::WrongGroup
            | Self::ProofFailed
            | Self::LimitExceeded
            | Self::NotFound
            | Self::GrantExceeded
            | Self::OutOfOrderSequence
            | Self::UnknownProducer => Fault::Client,
            Self::Internal | Self::Overloaded | Self::Draining | Self::Unknown(_) => Fault::Server,
        }
    }

    /// Whether, and where, a client should retry after receiving this code.
    pub fn retry(self) -> Retry {
        match self {
            Self::NoError | Self::Idle | Self::Revoked => Retry::SameEndpoint,
            Self::Internal | Self::Overloaded | Self::Draining | Self::Unknown(_) => {
                Retry::OtherEndpoint
            }
            Self::TokenExpired | Self::TokenInvalid | Self::WrongGroup | Self::ProofFailed => {
                Retry::AfterHub
            }
            Self::ProtocolViolation
            | Self::FrameTooLarge
            | Self::MalformedFrame
            | Self::UnsupportedVersion
            | Self::Unauthenticated
            | Self::Forbidden
            | Self::LimitExceeded
            | Self::NotFound
            | Self::GrantExceeded
            | Self::OutOfOrderSequence
            | Self::UnknownProducer => Retry::Never,
        }
    }

    /// Every listed code (without `Unknown`), in wire-value order.
    pub const ALL: [ErrorCode; 21] = [
        Self::NoError,
        Self::Internal,
        Self::ProtocolViolation,
        Self::FrameTooLarge,
        Self::MalformedFrame,
        Self::UnsupportedVersion,
        Self::Unauthenticated,
        Self::Forbidden,
        Self::TokenExpired,
        Self::TokenInvalid,
        Self::WrongGroup,
        Self::ProofFailed,
        Self::Overloaded,
        Self::Draining,
        Self::LimitExceeded,
        Self::Idle,
        Self::NotFound,
        Self::GrantExceeded,
        Self::Revoked,
        Self::OutOfOrderSequence,
        Self::UnknownProducer,
    ];
}

impl From<u64> for ErrorCode {
    fn from(v: u64) -> Self {
        Self::from_u64(v)
    }
}

impl From<ErrorCode> for u64 {
    fn from(c: ErrorCode) -> Self {
        c.to_u64()
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?} (0x{:x})", self.to_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u32(c.to_u32()), c);
            assert!(seen.insert(c.to_u32()), "duplicate {c}");
        }
        assert_eq!(ErrorCode::from_u32(0xdead), ErrorCode::Unknown(0xdead));
        assert_eq!(ErrorCode::Unknown(0xdead).to_u32(), 0xdead);
        // Codes beyond u32 (QUIC varints reach 2^62, CBOR uints 2^64) are kept exactly.
        let big = (1u64 << 62) - 1;
        assert_eq!(ErrorCode::from_u64(big), ErrorCode::Unknown(big));
        assert_eq!(ErrorCode::from_u64(big).to_u64(), big);
        assert_eq!(ErrorCode::from_u64(big).to_u32(), u32::MAX);
        assert_eq!(ErrorCode::from_u64(u64::MAX).retry(), Retry::OtherEndpoint);
    }

    #[test]
    fn wire_values_match_the_spec() {
        assert_eq!(ErrorCode::UnsupportedVersion.to_u32(), 5);
        assert_eq!(ErrorCode::Unauthenticated.to_u32(), 0x10);
        assert_eq!(ErrorCode::GrantExceeded.to_u32(), 0x1b);
    }

    #[test]
    fn retry_classes() {
        assert_eq!(ErrorCode::Overloaded.retry(), Retry::OtherEndpoint);
        assert_eq!(ErrorCode::TokenExpired.retry(), Retry::AfterHub);
        assert_eq!(ErrorCode::Unauthenticated.retry(), Retry::Never);
        assert_eq!(ErrorCode::Unauthenticated.fault(), Fault::Client);
        assert_eq!(ErrorCode::Internal.fault(), Fault::Server);
    }
}
