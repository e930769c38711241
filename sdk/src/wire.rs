//! Frames over quinn streams: one [`FrameDecoder`] per receive stream, whole frames out.

use bytes::BytesMut;
use sibyl_proto::{Codec, Frame, FrameDecoder};

use crate::error::{ConnectError, ProtocolError};

/// Room offered to quinn per read outside a `Records` frame (inside one, the rest of the
/// frame is offered; the decoder bounds frames by type first).
const READ_CHUNK: usize = 64 * 1024;

/// A receive stream with its frame decoder.
#[derive(Debug)]
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FrameReader {
    pub(crate) fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::default(),
        }
    }

    /// Stops the receive stream (`STOP_SENDING` with `code`); a stream already finished or
    /// reset needs nothing more.
    pub(crate) fn stop(&mut self, code: sibyl_proto::ErrorCode) {
        let _ = self.recv.stop(code.to_u32().into());
    }

    /// The next whole frame, `Ok(None)` at a clean end of stream. A decode error is
    /// [`ProtocolError::Frame`] (close the connection with its code).
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, ConnectError> {
        loop {
            if let Some(frame) = self.decoder.next_frame().map_err(ProtocolError::from)? {
                return Ok(Some(frame));
            }
            // Straight into the decoder's buffer: quinn copies every chunk it holds in one
            // call (one lock of the connection, one flow-control update) instead of one call
            // per packet-sized chunk.
            let buf = self.decoder.read_buffer(READ_CHUNK);
            let n = read_into(&mut self.recv, buf).await?;
            if n == 0 {
                self.decoder.finish().map_err(ProtocolError::from)?;
                return Ok(None);
            }
        }
    }
}

/// Reads what `recv` has (at least one byte, waiting if it has none) into `buf`'s spare
/// capacity; 0 at the end of the stream.
async fn read_into(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<usize, ConnectError> {
    use tokio::io::AsyncReadExt;
    recv.read_buf(buf).await.map_err(|e| {
        // quinn's `AsyncRead` wraps its `ReadError` in the `io::Error`.
        let e = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<quinn::ReadError>())
            .cloned()
            .unwrap_or(quinn::ReadError::ClosedStream);
        ConnectError::from_read(e)
    })
}

/// Writes one whole frame.
pub(crate) async fn write_frame(
    send: &mut quinn::SendStream,
    frame: impl Into<Frame>,
) -> Result<(), ConnectError> {
    let mut buf = Vec::new();
    frame.into().encode(&mut buf);
    send.write_all(&buf).await.map_err(ConnectError::from_write)
}

/// Closes `conn` with the code a protocol error calls for.
pub(crate) fn close_for(conn: &quinn::Connection, err: &ConnectError) {
    if let ConnectError::Protocol(p) = err {
        conn.close(p.code().to_u32().into(), p.to_string().as_bytes());
    }
}
