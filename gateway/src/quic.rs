//! Shared QUIC plumbing of the hub and the shards: the transport configuration, the server
//! endpoint on an already-bound socket, bounded frame reads and closes with Sibyl codes.
//!
//! ```text
//! std::net::UdpSocket ──endpoint()──▶ quinn::Endpoint (TLS from sibyl-certs, ALPN sibyl/1,
//!                                     transport_config(ConnectionConfig))
//! RecvStream ──read_chunk──▶ FrameDecoder (bounded by DecodeLimits) ──▶ Frame | StreamError
//! StreamError::close_code() ──▶ Connection::close(code) (only that connection)
//! ```
//!
//! The transport values mirror `sibyl_interop::bench::quic::transport_config` (the benchmark
//! baseline) so that the figures compare like with like; the stream limits and the idle
//! timeout come from [`ConnectionConfig`].

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{
    Connection, Endpoint, EndpointConfig, RecvStream, SendStream, TransportConfig, VarInt,
};
use sibyl_proto::{Codec, DecodeLimits, ErrorCode, Frame, FrameDecoder, FrameError, FrameType};

use crate::config::ConnectionConfig;

/// Stream receive window: 16 MiB (as the benchmark baseline).
pub const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
/// Connection receive window: 32 MiB (as the benchmark baseline).
pub const RECEIVE_WINDOW: u32 = 32 << 20;
/// Send window: 32 MiB (as the benchmark baseline).
pub const SEND_WINDOW: u64 = 32 << 20;
/// Largest chunk taken from a stream at once; bounds the decoder's buffer to one frame plus
/// one chunk.
const READ_CHUNK: usize = 64 * 1024;

/// Why the QUIC layer could not be set up (local configuration, never a peer).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicSetupError {
    /// The TLS configuration cannot carry QUIC (e.g. no TLS 1.3 cipher suite).
    #[error("TLS configuration unusable for QUIC: {0}")]
    Tls(String),
    /// The certificates could not be loaded.
    #[error("certificates: {0}")]
    Certs(#[from] sibyl_certs::CertError),
    /// The socket could not be handed to quinn.
    #[error("QUIC endpoint: {0}")]
    Io(#[from] std::io::Error),
}

/// Which side of the gateway a transport configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// The hub: no keep-alive, so unused hub connections close after the idle timeout.
    Hub,
    /// A shard: keep-alive every `keep_alive_interval` so attached sessions stay up.
    Shard,
}

/// Runs a new connection's task: polled once here, in the accept loop's task, then spawned
/// into `tasks` unless that first poll finished it.
///
/// `Incoming::accept` has processed the client's first datagram and queued the connection's
/// driver task, which sends the server's first flight when it runs. Whatever the first poll
/// writes (a shard's `Attached` answering 0-RTT `EarlyAttach`, a hub's `GroupHint`) is thus
/// already buffered when that flight is built and goes out coalesced with it, instead of a
/// scheduling round (or, with the client busy on the flight, a client round trip) later.
/// The spawned task polls the future again, so its wakers are its own from then on.
///
/// A panic in the connection's code ends that connection only, in the first poll as in the
/// spawned task (the accept loop goes on; the panic hook has printed the message).
pub async fn spawn_after_first_poll<F>(tasks: &mut tokio::task::JoinSet<()>, connection: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    use futures::FutureExt;
    let mut connection = Box::pin(std::panic::AssertUnwindSafe(connection).catch_unwind());
    if futures::poll!(connection.as_mut()).is_pending() {
        tasks.spawn(async move {
            let _ = connection.await;
        });
    }
}

/// The quinn transport configuration for client connections of `role` under `c`.
///
/// Windows as in the benchmark baseline; `max_concurrent_bidi_streams` =
/// `c.max_streams`, `max_concurrent_uni_streams` = `c.max_uni_streams`,
/// `max_idle_timeout` = `c.idle_timeout`, keep-alive `c.keep_alive_interval` (shards only).
pub fn transport_config(c: &ConnectionConfig, role: Role) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(c.max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(c.max_uni_streams));
    let keep_alive = match role {
        Role::Shard if !c.keep_alive_interval.is_zero() => Some(c.keep_alive_interval),
        _ => None,
    };
    t.keep_alive_interval(keep_alive);
    // Validated to be far below the 2^62 ms limit of the conversion; an out-of-range value
    // falls back to "no idle timeout from our side" rather than panicking.
    t.max_idle_timeout(c.idle_timeout.try_into().ok());
    t
}

/// Decode limits for frames received from clients under `c`.
pub fn decode_limits(c: &ConnectionConfig) -> DecodeLimits {
    DecodeLimits {
        max_control_body: c.max_frame,
        ..DecodeLimits::default()
    }
}

/// A quinn server configuration from a rustls one (TLS 1.3, ALPN `sibyl/1`).
pub fn server_config(
    tls: Arc<rustls::ServerConfig>,
    transport: TransportConfig,
) -> Result<quinn::ServerConfig, QuicSetupError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicSetupError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport));
    // Clients may change address mid-connection (NAT rebinding, `sibyl_sdk::Client::rebind`):
    // quinn validates the new path and keeps the connection. quinn's default, stated here
    // because the interop `rebind` case depends on it.
    server.migration(true);
    Ok(server)
}

/// Loads `cert`/`key` (PEM) into a quinn server configuration; with `early_data`, resuming
/// clients may send 0-RTT data (the shards, for `EarlyAttach`; see
/// [`sibyl_certs::ServerTlsBuilder::early_data`]).
pub fn server_config_from_files(
    cert: &std::path::Path,
    key: &std::path::Path,
    transport: TransportConfig,
    early_data: bool,
) -> Result<quinn::ServerConfig, QuicSetupError> {
    let (tls, _reload) = sibyl_certs::ServerTlsBuilder::new(cert, key)
        .early_data(early_data)
        .build()?;
    server_config(tls, transport)
}

/// A quinn server endpoint on an already-bound socket. Must be called inside a tokio runtime.
pub fn endpoint(
    socket: UdpSocket,
    server: quinn::ServerConfig,
) -> Result<Endpoint, QuicSetupError> {
    Ok(Endpoint::new(
        EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The peer sent bytes that are not a valid frame (peer garbage).
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The stream ended before a whole frame arrived (peer garbage: truncated stream).
    #[error("stream ended before a whole frame")]
    Ended,
    /// A well-formed frame that is not allowed here (peer misbehaviour).
    #[error("unexpected {0:?} frame")]
    Unexpected(FrameType),
    /// Nothing arrived within the deadline.
    #[error("no frame within {0:?}")]
    Timeout(Duration),
    /// The stream or connection failed underneath (reset, connection lost).
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadError),
}

impl StreamError {
    /// The code to close the connection with, or `None` when the connection is already
    /// gone or the peer reset the stream (nothing of ours to report).
    pub fn close_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Frame(e) => Some(e.code()),
            Self::Ended => Some(ErrorCode::MalformedFrame),
            Self::Unexpected(_) => Some(ErrorCode::ProtocolViolation),
            Self::Timeout(_) => Some(ErrorCode::Idle),
            Self::Read(quinn::ReadError::Reset(_)) => Some(ErrorCode::ProtocolViolation),
            Self::Read(_) => None,
        }
    }
}

/// Reads the next whole frame from `recv`, buffering in `dec` (which checks type and length
/// before any body is buffered). Cancel-safe: bytes already read stay in `dec`.
///
/// A stream that ends cleanly between frames gives `Ok(None)`; one that ends inside a frame
/// gives [`StreamError::Frame`].
pub async fn read_frame(
    recv: &mut RecvStream,
    dec: &mut FrameDecoder,
) -> Result<Option<Frame>, StreamError> {
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(Some(f));
        }
        match recv.read_chunk(READ_CHUNK, true).await? {
            Some(chunk) => dec.push(&chunk.bytes),
            None => {
                dec.finish()?;
                return Ok(None);
            }
        }
    }
}

/// Reads the first frame of a stream that carries only `allowed` within `within`; the
/// stream ending first is [`StreamError::Ended`].
pub async fn read_first_frame(
    recv: &mut RecvStream,
    limits: DecodeLimits,
    allowed: &'static [FrameType],
    within: Duration,
) -> Result<Frame, StreamError> {
    let mut dec = FrameDecoder::accepting(limits, allowed);
    match tokio::time::timeout(within, read_frame(recv, &mut dec)).await {
        Ok(Ok(Some(f))) => Ok(f),
        Ok(Ok(None)) => Err(StreamError::Ended),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(StreamError::Timeout(within)),
    }
}

/// Writes one frame.
pub async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<(), quinn::WriteError> {
    let mut buf = Vec::with_capacity(256);
    frame.encode(&mut buf);
    send.write_all(&buf).await
}

/// Closes `conn` with a Sibyl application error code.
pub fn close(conn: &Connection, code: ErrorCode, reason: &str) {
    conn.close(VarInt::from_u32(code.to_u32()), reason.as_bytes());
}

/// Finishes `send` and waits (at most `within`) until the peer acknowledged everything
/// written, so that a close that follows does not discard the last frame.
pub async fn finish_and_flush(send: &mut SendStream, within: Duration) {
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(within, send.stopped()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_poll_runs_in_place_and_only_unfinished_connections_are_spawned() {
        let mut tasks = tokio::task::JoinSet::new();
        let (tx, rx) = std::sync::mpsc::channel();
        // Finishes in the first poll: runs before the call returns, nothing is spawned.
        let done = tx.clone();
        spawn_after_first_poll(&mut tasks, async move { done.send("ready").unwrap() }).await;
        assert_eq!(rx.try_recv(), Ok("ready"));
        assert!(tasks.is_empty());
        // Waits after its first step: that step ran in place, the rest in the spawned task.
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        spawn_after_first_poll(&mut tasks, async move {
            tx.send("first step").unwrap();
            wait.await.unwrap();
            tx.send("finished").unwrap();
        })
        .await;
        assert_eq!(rx.try_recv(), Ok("first step"));
        assert_eq!(tasks.len(), 1);
        go.send(()).unwrap();
        tasks.join_next().await.unwrap().unwrap();
        assert_eq!(rx.try_recv(), Ok("finished"));
    }

    #[tokio::test]
    async fn a_panicking_connection_ends_alone() {
        let mut tasks = tokio::task::JoinSet::new();
        // In the first poll: caught here, the caller goes on.
        spawn_after_first_poll(&mut tasks, async { panic!("first poll") }).await;
        assert!(tasks.is_empty());
        // After the first poll: the spawned task ends without a panic of its own.
        spawn_after_first_poll(&mut tasks, async {
            tokio::task::yield_now().await;
            panic!("later");
        })
        .await;
        assert!(tasks.join_next().await.unwrap().is_ok());
    }

    #[test]
    fn stream_errors_map_to_their_codes() {
        let too_large = StreamError::Frame(FrameError::TooLarge {
            ty: 0x20,
            len: u32::MAX,
            max: 65536,
        });
        assert_eq!(too_large.close_code(), Some(ErrorCode::FrameTooLarge));
        assert_eq!(
            StreamError::Frame(FrameError::UnknownType(0xee)).close_code(),
            Some(ErrorCode::MalformedFrame)
        );
        assert_eq!(
            StreamError::Ended.close_code(),
            Some(ErrorCode::MalformedFrame)
        );
        assert_eq!(
            StreamError::Unexpected(FrameType::Hello).close_code(),
            Some(ErrorCode::ProtocolViolation)
        );
        assert_eq!(
            StreamError::Timeout(Duration::from_secs(1)).close_code(),
            Some(ErrorCode::Idle)
        );
        assert_eq!(
            StreamError::Read(quinn::ReadError::ClosedStream).close_code(),
            None
        );
    }

    #[test]
    fn decode_limits_follow_the_config() {
        let c = ConnectionConfig {
            max_frame: 8192,
            ..ConnectionConfig::default()
        };
        let l = decode_limits(&c);
        assert_eq!(l.max_control_body, 8192);
        assert_eq!(
            l.max_batch_records,
            DecodeLimits::default().max_batch_records
        );
    }
}
