//! The hub exchange: one QUIC connection, the first bidi stream, `Hello` → `Ticket` | `Refused`.

use std::net::SocketAddr;

use sibyl_proto::Frame;
use sibyl_proto::frame::{Hello, Refused, Ticket};

use crate::error::{ConnectError, ProtocolError};
use crate::wire::{FrameReader, close_for, write_frame};

/// What the hub answered.
#[derive(Debug)]
pub(crate) enum HubAnswer {
    Ticket(Ticket),
    Refused(Refused),
}

/// Connects to the hub, sends `hello` on the hub stream and reads the one answer. On success
/// the connection is returned open (it carries publish streams later).
pub(crate) async fn exchange(
    endpoint: &quinn::Endpoint,
    quic: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    hello: Hello,
) -> Result<(quinn::Connection, HubAnswer), ConnectError> {
    let conn = endpoint
        .connect_with(quic, addr, server_name)
        .map_err(ConnectError::from_connect)?
        .await
        .map_err(ConnectError::from_connection)?;
    match hub_stream(&conn, hello).await {
        Ok(answer) => Ok((conn, answer)),
        Err(e) => {
            close_for(&conn, &e);
            Err(e)
        }
    }
}

async fn hub_stream(conn: &quinn::Connection, hello: Hello) -> Result<HubAnswer, ConnectError> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(ConnectError::from_connection)?;
    write_frame(&mut send, hello).await?;
    // The hub answers once and finishes; so do we. A stream already reset by the peer is
    // reported by the read below, so the result of `finish` adds nothing.
    let _ = send.finish();
    let mut reader = FrameReader::new(recv);
    const EXPECTED: &str = "Ticket or Refused";
    match reader.next().await? {
        Some(Frame::Ticket(t)) => Ok(HubAnswer::Ticket(t)),
        Some(Frame::Refused(r)) => Ok(HubAnswer::Refused(r)),
        Some(other) => Err(ProtocolError::Unexpected {
            expected: EXPECTED,
            got: other.frame_type(),
        }
        .into()),
        None => Err(ProtocolError::StreamEnded { expected: EXPECTED }.into()),
    }
}
