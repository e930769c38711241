//! The hub exchange: one QUIC connection, the first bidi stream, `Hello` → `Ticket` | `Refused`.

use sibyl_proto::frame::{GroupHint, Hello, Refused, Ticket};
use sibyl_proto::{ALPN_GROUP_HINT, Frame};
use tokio::sync::mpsc;

use crate::error::{ConnectError, ProtocolError};
use crate::wire::{FrameReader, close_for, write_frame};

/// What the hub answered.
#[derive(Debug)]
pub(crate) enum HubAnswer {
    Ticket(Ticket),
    Refused(Refused),
}

/// Completes the hub handshake `connecting`, sends `hello` on the hub stream and reads the
/// one answer. On success
/// the connection is returned open (it carries publish streams later). When the hub selected
/// ALPN `sibyl/1+hint`, its `GroupHint` goes to `hints` as soon as it is read (it came with
/// the handshake), while the `Ticket` is still on its way.
pub(crate) async fn exchange(
    connecting: quinn::Connecting,
    hello: Hello,
    hints: Option<mpsc::UnboundedSender<GroupHint>>,
) -> Result<(quinn::Connection, HubAnswer), ConnectError> {
    let conn = connecting.await.map_err(ConnectError::from_connection)?;
    let hints = hints.filter(|_| selected_alpn(&conn).as_deref() == Some(ALPN_GROUP_HINT));
    let answer = async {
        match hints {
            Some(tx) => {
                // The hint is read first when it is there; only the answer ends the exchange.
                let hint = async {
                    if let Some(h) = read_hint(&conn).await {
                        let _ = tx.send(h);
                    }
                };
                let ticket = hub_stream(&conn, hello);
                tokio::pin!(hint, ticket);
                let mut hint_done = false;
                loop {
                    tokio::select! {
                        biased;
                        () = &mut hint, if !hint_done => hint_done = true,
                        r = &mut ticket => break r,
                    }
                }
            }
            None => hub_stream(&conn, hello).await,
        }
    };
    match answer.await {
        Ok(answer) => Ok((conn, answer)),
        Err(e) => {
            close_for(&conn, &e);
            Err(e)
        }
    }
}

/// The ALPN the handshake selected.
fn selected_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The hub's `GroupHint` on its first uni stream; `None` if anything else comes.
async fn read_hint(conn: &quinn::Connection) -> Option<GroupHint> {
    let recv = conn.accept_uni().await.ok()?;
    match FrameReader::new(recv).next().await {
        Ok(Some(Frame::GroupHint(h))) if !h.endpoints.is_empty() => Some(h),
        _ => None,
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
