//! Typed errors of the SDK.
//!
//! [`ConnectError`] keeps apart *whose fault* a failure is: the caller's set-up
//! ([`ConfigError`], TLS material), the network ([`TransportError`], timeouts), a peer that sent
//! garbage or broke the protocol ([`ProtocolError`]), and a peer that said no with a Sibyl
//! [`ErrorCode`] (`Refused`, `Closed`). [`ConnectError::retryable`] tells whether trying again
//! can help. Errors are `Clone` (non-`Clone` sources are behind `Arc`) so that the connection
//! state watch and every waiter can carry the same error.

use std::sync::Arc;
use std::time::Duration;

use sibyl_proto::{ErrorCode, FrameError, FrameType, Retry};

/// Why connecting (hub → ticket → shard) failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The hub answered `Refused`.
    #[error("hub refused: {code}: {reason}")]
    Refused {
        /// The hub's code (e.g. [`ErrorCode::Unauthenticated`]).
        code: ErrorCode,
        /// Human-readable reason, for logs.
        reason: String,
        /// With `OVERLOADED`: do not retry before this long.
        retry_after: Option<Duration>,
    },
    /// A hub or shard closed the connection with a Sibyl application error code (for a shard:
    /// how it refuses an `Attach`, e.g. [`ErrorCode::TokenInvalid`]).
    #[error("peer closed the connection: {code}: {reason}")]
    Closed {
        /// The QUIC application error code, mapped with [`ErrorCode::from_u64`].
        code: ErrorCode,
        /// The close reason the peer gave (lossily decoded as UTF-8).
        reason: String,
    },
    /// TLS set-up or handshake failed (bad CA file, certificate not trusted, wrong name).
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The network failed (unreachable, reset, lost connection).
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// A peer sent bytes that do not decode, or frames that are not allowed.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// No answer in time: the initial `connect_timeout`, the hub exchange or a shard attach
    /// exceeded `ClientConfig::attach_timeout`, or QUIC's idle timeout during the handshake.
    #[error("timed out")]
    Timeout,
    /// The connection machine stopped retrying: `ClientConfig::max_failures` consecutive
    /// failed rounds, or a code whose [`Retry`] is `Never` with no more specific error.
    #[error("gave up after {failures} failed rounds (code {code:?}){}", last.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    GiveUp {
        /// Consecutive failed rounds.
        failures: u32,
        /// The last Sibyl error code seen, if any.
        code: Option<ErrorCode>,
        /// The last error seen, if any.
        last: Option<Box<ConnectError>>,
    },
    /// The client's configuration is invalid (caller misuse; nothing was sent).
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The client was closed while connecting.
    #[error("client closed")]
    Shutdown,
}

impl ConnectError {
    /// True when trying again (later, or elsewhere) can help; false when the caller must
    /// change something first (credentials, configuration, trust, a client bug).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Refused { code, .. } | Self::Closed { code, .. } => code.retry() != Retry::Never,
            Self::Transport(_) | Self::Timeout => true,
            Self::GiveUp { code, last, .. } => match (code, last) {
                (Some(c), _) => c.retry() != Retry::Never,
                (None, Some(last)) => last.retryable(),
                (None, None) => true,
            },
            Self::Tls(_) | Self::Protocol(_) | Self::Config(_) | Self::Shutdown => false,
        }
    }

    /// The Sibyl error code behind this error, if a peer gave one (or one applies, like
    /// `MALFORMED_FRAME` for a frame that does not decode).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } | Self::Closed { code, .. } => Some(*code),
            Self::GiveUp { code, .. } => *code,
            Self::Protocol(p) => Some(p.code()),
            _ => None,
        }
    }

    /// What the protocol says to do about [`code`](Self::code), if there is one.
    pub fn retry(&self) -> Option<Retry> {
        self.code().map(ErrorCode::retry)
    }

    /// Maps a quinn connection error: an application close becomes [`Closed`](Self::Closed)
    /// with its [`ErrorCode`], TLS alerts become [`Tls`](Self::Tls), QUIC's idle timeout
    /// becomes [`Timeout`](Self::Timeout), a local close [`Shutdown`](Self::Shutdown).
    pub fn from_connection(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match e {
            E::ApplicationClosed(close) => Self::Closed {
                code: code_from_varint(close.error_code),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            E::TimedOut => Self::Timeout,
            E::LocallyClosed => Self::Shutdown,
            E::TransportError(ref t) if is_crypto(u64::from(t.code)) => {
                Self::Tls(TlsError::Handshake(e))
            }
            E::ConnectionClosed(ref c) if is_crypto(u64::from(c.error_code)) => {
                Self::Tls(TlsError::Handshake(e))
            }
            other => Self::Transport(TransportError::Connection(other)),
        }
    }

    pub(crate) fn from_connect(e: quinn::ConnectError) -> Self {
        match e {
            quinn::ConnectError::EndpointStopping => Self::Shutdown,
            quinn::ConnectError::InvalidServerName(name) => {
                Self::Tls(TlsError::InvalidServerName(name))
            }
            other => Self::Transport(TransportError::Connect(other)),
        }
    }

    pub(crate) fn from_read(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => Self::from_connection(c),
            quinn::ReadError::Reset(code) => Self::Closed {
                code: code_from_varint(code),
                reason: "stream reset".into(),
            },
            other => Self::Transport(TransportError::Read(other)),
        }
    }

    pub(crate) fn from_write(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => Self::from_connection(c),
            quinn::WriteError::Stopped(code) => Self::Closed {
                code: code_from_varint(code),
                reason: "stream stopped".into(),
            },
            other => Self::Transport(TransportError::Write(other)),
        }
    }
}

/// QUIC CRYPTO_ERROR codes (TLS alerts) are `0x100..=0x1ff` (RFC 9000 §20.1).
fn is_crypto(code: u64) -> bool {
    (0x100..=0x1ff).contains(&code)
}

/// A QUIC application error code as a Sibyl [`ErrorCode`] (unlisted values, however large,
/// are [`ErrorCode::Unknown`]).
pub(crate) fn code_from_varint(v: quinn::VarInt) -> ErrorCode {
    ErrorCode::from_u64(v.into_inner())
}

/// TLS material or handshake problems.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Loading the trust anchors or the client certificate failed.
    #[error(transparent)]
    Cert(Arc<sibyl_certs::CertError>),
    /// The rustls configuration cannot be used for QUIC (no TLS 1.3 initial cipher suite).
    #[error("rustls config unusable for QUIC: {0}")]
    NotQuic(String),
    /// A server name (hub, or a ticket endpoint's) is not a valid DNS name or IP address.
    #[error("invalid server name {0:?}")]
    InvalidServerName(String),
    /// The handshake failed: a TLS alert sent or received (untrusted certificate, name
    /// mismatch, client certificate refused, no common ALPN).
    #[error("handshake failed: {0}")]
    Handshake(quinn::ConnectionError),
}

impl From<sibyl_certs::CertError> for TlsError {
    fn from(e: sibyl_certs::CertError) -> Self {
        Self::Cert(Arc::new(e))
    }
}

/// Network-level failures.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Binding the local UDP socket or resolving the hub's name failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// quinn could not start a connection.
    #[error(transparent)]
    Connect(quinn::ConnectError),
    /// An established or handshaking connection failed.
    #[error(transparent)]
    Connection(quinn::ConnectionError),
    /// Reading a stream failed.
    #[error(transparent)]
    Read(quinn::ReadError),
    /// Writing a stream failed.
    #[error(transparent)]
    Write(quinn::WriteError),
}

/// A peer sent garbage (undecodable frames) or misbehaved (frames not allowed there).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Bytes that do not decode as a frame (garbage).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A well-formed frame that is not allowed at this point (misbehaviour).
    #[error("expected {expected}, got {got:?}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: FrameType,
    },
    /// The peer finished the stream before sending the expected frame.
    #[error("stream ended before {expected}")]
    StreamEnded {
        /// What was expected.
        expected: &'static str,
    },
    /// A well-formed frame whose content breaks the protocol (an ack out of `seq` order, a
    /// non-increasing `Assignment.epoch`, a `Records` batch of another partition).
    #[error("protocol violation: {0}")]
    Violation(String),
    /// A ticket endpoint address is not `ip:port`.
    #[error("ticket endpoint address {0:?} is not ip:port")]
    BadEndpoint(String),
    /// The TLS exporter for the attach proof is unavailable on this connection.
    #[error("TLS exporter unavailable")]
    Exporter,
}

impl ProtocolError {
    /// The code to close the connection with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Frame(f) => f.code(),
            Self::Unexpected { .. } | Self::Violation(_) => ErrorCode::ProtocolViolation,
            Self::StreamEnded { .. } => ErrorCode::MalformedFrame,
            Self::BadEndpoint(_) | Self::Exporter => ErrorCode::Internal,
        }
    }
}

/// The caller configured the client wrongly. Nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No hub address was given.
    #[error("no hub address: call ClientBuilder::hub")]
    MissingHub,
    /// No trust decision was made (CA file, pinned fingerprint, platform roots).
    #[error(
        "no trust decision: call ClientBuilder::trust (a CA file, a pinned fingerprint or the platform roots)"
    )]
    MissingTrust,
    /// No API key was given.
    #[error("no API key: call ClientBuilder::api_key")]
    MissingApiKey,
    /// The hub address is not `host:port`, or resolved to nothing.
    #[error("bad hub address {0:?}: expected host:port")]
    BadHubAddress(String),
    /// A value is out of its allowed range.
    #[error("{name}: {detail}")]
    OutOfRange {
        /// The setting.
        name: &'static str,
        /// The allowed range.
        detail: &'static str,
    },
}

/// Why publishing failed. [`retryable`](Self::retryable) says whether sending the record again
/// can help; [`code`](Self::code) gives the Sibyl code when the hub gave one.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The hub refused: `ProduceError` for the record's batch, or for `PublishOpen`
    /// (`NOT_FOUND` unknown stream, `FORBIDDEN` no publish scope / not in `Hello.wants`).
    #[error("hub rejected: {code}: {reason}")]
    Rejected {
        /// The hub's code.
        code: ErrorCode,
        /// Human-readable reason.
        reason: String,
    },
    /// The record does not fit in one `Produce` frame (caller misuse; nothing was sent).
    #[error("record of {size} bytes exceeds the largest batch of {max} bytes")]
    RecordTooLarge {
        /// Encoded size of the record.
        size: usize,
        /// The limit (`min(max_batch_bytes, PublishAccepted.max_frame)`).
        max: usize,
    },
    /// The partition does not exist (caller misuse; nothing was sent).
    #[error("partition {partition} out of range (the stream has {partitions})")]
    BadPartition {
        /// The partition asked for.
        partition: u32,
        /// The stream's partition count.
        partitions: u32,
    },
    /// The hub connection could not be (re-)established within the publisher's
    /// `reconnect_timeout`, or the client is closed.
    #[error("hub connection: {0}")]
    Connect(#[from] ConnectError),
    /// The hub sent garbage or broke the publish-stream protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The publisher was closed (or its task ended) before the record was acknowledged.
    #[error("publisher closed")]
    Closed,
}

impl PublishError {
    /// True when sending the record again (later) can help.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Rejected { code, .. } => code.retry() != Retry::Never,
            Self::Connect(e) => e.retryable(),
            Self::RecordTooLarge { .. }
            | Self::BadPartition { .. }
            | Self::Protocol(_)
            | Self::Closed => false,
        }
    }

    /// The Sibyl error code behind this error, if any.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Rejected { code, .. } => Some(*code),
            Self::Connect(e) => e.code(),
            Self::Protocol(p) => Some(p.code()),
            Self::RecordTooLarge { .. } => Some(ErrorCode::LimitExceeded),
            Self::BadPartition { .. } => Some(ErrorCode::NotFound),
            Self::Closed => None,
        }
    }
}

/// Why a subscription failed. After an `Err` item the [`Subscription`](crate::Subscription)
/// ends.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The shard refused or failed the subscription (`SubError`: `NOT_FOUND`, `FORBIDDEN`,
    /// `LIMIT_EXCEEDED`, `GRANT_EXCEEDED`, …).
    #[error("shard rejected the subscription: {code}: {reason}")]
    Rejected {
        /// The shard's code.
        code: ErrorCode,
        /// Human-readable reason.
        reason: String,
    },
    /// The shard sent garbage or broke the subscription protocol (the connection is closed
    /// with the matching code; the subscription ends).
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// No `Assignment` (or `SubError`) within the subscription's `open_timeout`.
    #[error("timed out waiting for the first assignment")]
    Timeout,
    /// The subscription's configuration is invalid (caller misuse).
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The client was closed.
    #[error("client closed")]
    Closed,
}

impl SubscribeError {
    /// True when subscribing again (later) can help.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Rejected { code, .. } => code.retry() != Retry::Never,
            Self::Timeout => true,
            Self::Protocol(_) | Self::Config(_) | Self::Closed => false,
        }
    }

    /// The Sibyl error code behind this error, if any.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Rejected { code, .. } => Some(*code),
            Self::Protocol(p) => Some(p.code()),
            _ => None,
        }
    }
}
