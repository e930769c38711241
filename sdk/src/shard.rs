//! One shard attempt (connect, session stream, `Attach` with the proof, `Attached`; or on a
//! resumed connection `EarlyAttach` in 0-RTT, `Attached`, `AttachProof`) and the attached
//! session's watch (connection close or `GoAway` on the session stream).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::{ClientSessionMemoryCache, Resumption};

use sibyl_proto::frame::{Attach, AttachProof, Attached, EarlyAttach, Endpoint, GoAway};
use sibyl_proto::proof::{EXPORTER_CONTEXT, EXPORTER_LABEL, EXPORTER_LEN};
use sibyl_proto::{ErrorCode, Frame, attach_proof};

use crate::error::{ConnectError, ProtocolError, TransportError};
use crate::wire::{FrameReader, close_for, write_frame};

/// Shard endpoints whose TLS session caches are kept; past this the map starts afresh.
const MAX_CACHED_ENDPOINTS: usize = 64;
/// TLS 1.3 tickets kept per shard endpoint (a shard issues two per handshake; each is used
/// once).
const TICKETS_PER_ENDPOINT: usize = 4;

/// The quinn client configs of shard connections: one per shard address, each with its own
/// TLS session cache, so a reconnect to a shard resumes the TLS session it had with that
/// shard (PSK: no certificate sent, signed or verified).
///
/// Why per address: every shard of a group answers to the same server name, and rustls keys
/// its session cache by server name alone, so one shared cache would offer shard A's
/// ticket to shard B (a separate process that cannot decrypt it: a wasted ticket and a full
/// handshake).
#[derive(Clone)]
pub(crate) struct ShardQuic {
    tls: Arc<rustls::ClientConfig>,
    transport: Arc<quinn::TransportConfig>,
    /// False for an application's own rustls config: its resumption setting is kept as is.
    per_endpoint_sessions: bool,
    by_addr: HashMap<String, quinn::ClientConfig>,
}

impl std::fmt::Debug for ShardQuic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardQuic")
            .field("endpoints", &self.by_addr.len())
            .finish_non_exhaustive()
    }
}

impl ShardQuic {
    /// Shard connections on `tls` with `transport`; with `per_endpoint_sessions` each shard
    /// address gets its own in-memory TLS session cache (else `tls.resumption` is used as
    /// it is, e.g. an application's own config that disabled resumption).
    pub(crate) fn new(
        tls: Arc<rustls::ClientConfig>,
        transport: Arc<quinn::TransportConfig>,
        per_endpoint_sessions: bool,
    ) -> Self {
        Self {
            tls,
            transport,
            per_endpoint_sessions,
            by_addr: HashMap::new(),
        }
    }

    /// The config for connections to `addr` (built on first use).
    pub(crate) fn for_addr(&mut self, addr: &str) -> Result<quinn::ClientConfig, ConnectError> {
        if let Some(c) = self.by_addr.get(addr) {
            return Ok(c.clone());
        }
        if self.by_addr.len() >= MAX_CACHED_ENDPOINTS {
            self.by_addr.clear();
        }
        let tls = if self.per_endpoint_sessions {
            let mut tls = (*self.tls).clone();
            tls.resumption = Resumption::store(Arc::new(ClientSessionMemoryCache::new(
                TICKETS_PER_ENDPOINT,
            )));
            // A resumed connection carries `EarlyAttach` as 0-RTT data (see `attach`).
            tls.enable_early_data = true;
            Arc::new(tls)
        } else {
            self.tls.clone()
        };
        let crypto = QuicClientConfig::try_from(tls)
            .map_err(|e| crate::error::TlsError::NotQuic(e.to_string()))?;
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        quic.transport_config(self.transport.clone());
        self.by_addr.insert(addr.to_owned(), quic.clone());
        Ok(quic)
    }
}

/// What an attempt needs from the ticket.
#[derive(Debug, Clone)]
pub(crate) struct AttachRequest {
    pub(crate) endpoint: Endpoint,
    pub(crate) token: Vec<u8>,
    pub(crate) secret: [u8; 32],
    pub(crate) client_id: String,
    pub(crate) resume: Option<u64>,
}

/// An attached shard session: the connection and its session stream.
#[derive(Debug)]
pub(crate) struct ShardSession {
    pub(crate) conn: quinn::Connection,
    pub(crate) endpoint: Endpoint,
    pub(crate) attached: Attached,
    /// Attached with `EarlyAttach` in 0-RTT data (a resumed TLS session the shard took).
    pub(crate) zero_rtt: bool,
    /// Kept open for the session's lifetime (dropping it would finish the stream).
    _send: quinn::SendStream,
    reader: FrameReader,
}

/// How an attached session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The shard is draining.
    GoAway(GoAway),
    /// The connection closed or the session stream failed.
    Lost(ConnectError),
}

impl SessionEnd {
    /// The code to report to the machine: only codes a peer gave; a shard that misbehaved or
    /// a lost network counts as a plain connection loss.
    pub(crate) fn machine_code(&self) -> Option<ErrorCode> {
        match self {
            Self::GoAway(g) => Some(g.code),
            Self::Lost(e) => peer_code(e),
        }
    }
}

/// A code the peer gave (application close, stream reset), for [`sibyl_proto::ClientMachine`].
pub(crate) fn peer_code(e: &ConnectError) -> Option<ErrorCode> {
    match e {
        ConnectError::Closed { code, .. } => Some(*code),
        _ => None,
    }
}

/// Connects to `req.endpoint`, opens the session stream and attaches: with a resumable TLS
/// session for this shard, `EarlyAttach` goes out as 0-RTT data and `Attached` comes back in
/// the shard's first flight (0.5-RTT), then `AttachProof` follows once the handshake is
/// complete; otherwise (or when the shard rejects the 0-RTT data) the handshake completes
/// first and `Attach` carries the proof. Either way the proof is bound to this connection's
/// TLS exporter.
pub(crate) async fn attach(
    quic_endpoint: &quinn::Endpoint,
    quic: quinn::ClientConfig,
    req: AttachRequest,
    started: Option<quinn::Connecting>,
) -> Result<ShardSession, ConnectError> {
    let connecting = match started {
        // A handshake started from the hub's `GroupHint` (nothing sent on it yet).
        Some(c) => c,
        None => {
            let addr: SocketAddr = req
                .endpoint
                .addr
                .parse()
                .map_err(|_| ProtocolError::BadEndpoint(req.endpoint.addr.clone()))?;
            quic_endpoint
                .connect_with(quic, addr, &req.endpoint.server_name)
                .map_err(ConnectError::from_connect)?
        }
    };
    let (conn, result, zero_rtt) = match connecting.into_0rtt() {
        Ok((conn, accepted)) => {
            let (result, zero_rtt) = match early_session_stream(&conn, accepted, &req).await {
                // The shard did not take the 0-RTT data (e.g. it restarted and lost its
                // session cache): the handshake is complete now, attach the 1-RTT way.
                Ok(None) => (session_stream(&conn, &req).await, false),
                Ok(Some(attached)) => (Ok(attached), true),
                Err(e) => (Err(e), true),
            };
            (conn, result, zero_rtt)
        }
        Err(connecting) => {
            let conn = connecting.await.map_err(ConnectError::from_connection)?;
            let result = session_stream(&conn, &req).await;
            (conn, result, false)
        }
    };
    match result {
        Ok((send, reader, attached)) => Ok(ShardSession {
            conn,
            endpoint: req.endpoint,
            attached,
            zero_rtt,
            _send: send,
            reader,
        }),
        Err(e) => {
            close_for(&conn, &e);
            Err(e)
        }
    }
}

/// What a session stream yields once attached.
type Attaching = (quinn::SendStream, FrameReader, Attached);

/// The 1-RTT attach on a connection whose handshake is complete: `Attach` with the proof.
async fn session_stream(
    conn: &quinn::Connection,
    req: &AttachRequest,
) -> Result<Attaching, ConnectError> {
    let exporter = exporter(conn)?;
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(ConnectError::from_connection)?;
    let attach = Attach {
        token: req.token.clone(),
        proof: attach_proof(&req.secret, &exporter),
        client_id: req.client_id.clone(),
        resume: req.resume,
    };
    write_frame(&mut send, attach).await?;
    let mut reader = FrameReader::new(recv);
    let attached = expect_attached(conn, &mut reader).await?;
    Ok((send, reader, attached))
}

/// The 0-RTT attach: `EarlyAttach` in 0-RTT data, `Attached` in the shard's first flight,
/// then `AttachProof`. `Ok(None)`: the shard rejected the 0-RTT data (nothing it sent
/// reached the shard's application; attach again the 1-RTT way on this connection).
async fn early_session_stream(
    conn: &quinn::Connection,
    accepted: quinn::ZeroRttAccepted,
    req: &AttachRequest,
) -> Result<Option<Attaching>, ConnectError> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(ConnectError::from_connection)?;
    let early = EarlyAttach {
        token: req.token.clone(),
        client_id: req.client_id.clone(),
        resume: req.resume,
    };
    let mut reader = FrameReader::new(recv);
    let attached = match write_frame(&mut send, early).await {
        Ok(()) => expect_attached(conn, &mut reader).await,
        Err(e) => Err(e),
    };
    let attached = match attached {
        Ok(a) => a,
        Err(e) if zero_rtt_rejected(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    // `Attached` arrived under 1-RTT keys, so the handshake is complete: this resolves at
    // once (false only if the 0-RTT data was rejected, which a reply rules out).
    if !accepted.await {
        return Ok(None);
    }
    let proof = AttachProof {
        proof: attach_proof(&req.secret, &exporter(conn)?),
    };
    write_frame(&mut send, proof).await?;
    Ok(Some((send, reader, attached)))
}

/// Whether `e` is quinn telling that data sent as 0-RTT was rejected by the server.
fn zero_rtt_rejected(e: &ConnectError) -> bool {
    matches!(
        e,
        ConnectError::Transport(TransportError::Read(quinn::ReadError::ZeroRttRejected))
            | ConnectError::Transport(TransportError::Write(quinn::WriteError::ZeroRttRejected))
    )
}

/// This connection's TLS exporter for the attach proof (the handshake must be complete).
fn exporter(conn: &quinn::Connection) -> Result<[u8; EXPORTER_LEN], ConnectError> {
    let mut exporter = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, EXPORTER_CONTEXT)
        .map_err(|_| ProtocolError::Exporter)?;
    Ok(exporter)
}

/// Reads the shard's answer to an attach: `Attached`, or the close code of a refusal.
async fn expect_attached(
    conn: &quinn::Connection,
    reader: &mut FrameReader,
) -> Result<Attached, ConnectError> {
    const EXPECTED: &str = "Attached";
    // A refusing shard closes the connection with its code: the read reports it as
    // `ConnectError::Closed`.
    match reader.next().await {
        Ok(Some(Frame::Attached(a))) => Ok(a),
        Ok(Some(other)) => Err(ProtocolError::Unexpected {
            expected: EXPECTED,
            got: other.frame_type(),
        }
        .into()),
        Ok(None) => {
            // Finished without answering: the close code, if one follows, says why.
            match conn.closed().await {
                quinn::ConnectionError::ApplicationClosed(c) => Err(ConnectError::from_connection(
                    quinn::ConnectionError::ApplicationClosed(c),
                )),
                _ => Err(ProtocolError::StreamEnded { expected: EXPECTED }.into()),
            }
        }
        Err(e) => Err(e),
    }
}

impl ShardSession {
    /// Waits until the session ends: `GoAway` on the session stream, or the connection
    /// closing. Any other frame is a protocol violation (the connection is closed with it).
    /// Cancel-safe between frames.
    pub(crate) async fn ended(&mut self) -> SessionEnd {
        match self.reader.next().await {
            Ok(Some(Frame::GoAway(g))) => SessionEnd::GoAway(g),
            Ok(Some(other)) => {
                let e = ConnectError::from(ProtocolError::Unexpected {
                    expected: "GoAway",
                    got: other.frame_type(),
                });
                close_for(&self.conn, &e);
                SessionEnd::Lost(e)
            }
            Ok(None) => {
                return SessionEnd::Lost(ConnectError::from_connection(self.conn.closed().await));
            }
            Err(e @ ConnectError::Protocol(_)) => {
                close_for(&self.conn, &e);
                SessionEnd::Lost(e)
            }
            Err(e) => SessionEnd::Lost(e),
        }
    }
}
