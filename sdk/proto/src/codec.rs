//! The codec layer: [`Reader`], the [`Codec`] trait, [`FrameError`] and [`DecodeLimits`].
//!
//! "Incomplete" ([`FrameError::Incomplete`]: wait for more bytes) is kept apart from every
//! invalid variant (the peer sent garbage: close with [`FrameError::code`]).

use crate::cbor::CborError;
use crate::error::ErrorCode;

/// Size of the frame header: `type: u8` then `length: u32` big-endian.
pub const HEADER_LEN: usize = 5;

/// One codec trait for frame bodies and whole frames.
///
/// For a body type (`Hello`, `Records`, ...) `encode` appends the body only and `decode`
/// consumes the whole reader (trailing bytes are an error). For [`crate::Frame`] both include
/// the 5-byte header, and `decode` returns [`FrameError::Incomplete`] when the reader holds
/// less than one whole frame.
pub trait Codec: Sized {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// Decodes one value from `r`.
    fn decode(r: &mut Reader<'_>) -> Result<Self, FrameError>;
}

/// Bounds applied while decoding, before any allocation.
///
/// The defaults are the protocol's defaults (`docs/PROTOCOL.md` §Limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Maximum body length of every CBOR (control) frame. Default 65 536 (64 KiB).
    pub max_control_body: u32,
    /// Maximum sum of key and payload bytes in one `Records`/`Produce` batch.
    /// Default 1 048 576 (1 MiB).
    pub max_batch_payload: u32,
    /// Maximum number of records in one batch. Default 16 384.
    pub max_batch_records: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_control_body: 64 * 1024,
            max_batch_payload: 1024 * 1024,
            max_batch_records: 16 * 1024,
        }
    }
}

/// Per-record framing overhead upper bound in a batch: offset delta varint (8) + timestamp (8)
/// + key length varint (8) + payload length varint (8).
pub const MAX_RECORD_OVERHEAD: u64 = 32;
/// Fixed batch header upper bound (`Records`: 16 bytes, `Produce`: 16 bytes).
pub const BATCH_HEADER_LEN: u64 = 16;

impl DecodeLimits {
    /// Maximum body length of a `Records` or `Produce` frame:
    /// `16 + 32 × max_batch_records + max_batch_payload`, saturated to `u32::MAX`.
    pub fn max_batch_body(&self) -> u32 {
        let v = BATCH_HEADER_LEN
            + MAX_RECORD_OVERHEAD * u64::from(self.max_batch_records)
            + u64::from(self.max_batch_payload);
        u32::try_from(v).unwrap_or(u32::MAX)
    }
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Not an error yet: at least `needed` more bytes are required. At the end of a stream
    /// it means the stream was truncated mid-frame ([`ErrorCode::MalformedFrame`]).
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete {
        /// Minimum number of further bytes before decoding can progress.
        needed: usize,
    },
    /// The frame type byte is not defined.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The length field exceeds the maximum for this frame type.
    #[error("frame type 0x{ty:02x}: body length {len} exceeds maximum {max}")]
    TooLarge {
        /// Frame type byte.
        ty: u8,
        /// Announced body length.
        len: u32,
        /// Maximum allowed for this type under the active [`DecodeLimits`].
        max: u32,
    },
    /// The body does not have the shape its type requires.
    #[error("frame type 0x{ty:02x} malformed: {detail}")]
    Malformed {
        /// Frame type byte.
        ty: u8,
        /// What was wrong.
        detail: String,
    },
    /// The body held bytes after the complete value.
    #[error("frame type 0x{ty:02x}: trailing bytes in body")]
    TrailingBytes {
        /// Frame type byte.
        ty: u8,
    },
    /// A defined frame type that this stream does not carry (refused from its type byte,
    /// before its length or body).
    #[error("frame type 0x{ty:02x} is not allowed on this stream")]
    NotAllowed {
        /// Frame type byte.
        ty: u8,
    },
}

impl FrameError {
    /// The application error code to close the connection (or reset the stream) with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::NotAllowed { .. } => ErrorCode::ProtocolViolation,
            Self::Incomplete { .. }
            | Self::UnknownType(_)
            | Self::Malformed { .. }
            | Self::TrailingBytes { .. } => ErrorCode::MalformedFrame,
        }
    }

    /// True for [`FrameError::Incomplete`].
    pub fn is_incomplete(&self) -> bool {
        matches!(self, Self::Incomplete { .. })
    }

    pub(crate) fn malformed(ty: u8, detail: impl Into<String>) -> Self {
        Self::Malformed {
            ty,
            detail: detail.into(),
        }
    }

    pub(crate) fn from_cbor(ty: u8, e: CborError) -> Self {
        match e {
            CborError::TrailingBytes => Self::TrailingBytes { ty },
            other => Self::malformed(ty, other.to_string()),
        }
    }
}

/// A cursor over a byte slice. Every read checks the remaining length first and reports a
/// shortfall as [`FrameError::Incomplete`].
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`, positioned at its start.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The unconsumed bytes, without consuming them.
    pub fn peek_rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Consumes and returns `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.remaining() < n {
            return Err(FrameError::Incomplete {
                needed: n - self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Consumes all remaining bytes.
    pub fn take_rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    /// Reads a big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, FrameError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }

    /// Reads a big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, FrameError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    /// Reads a QUIC variable-length integer (RFC 9000 §16): the top two bits of the first
    /// byte give the length (1, 2, 4 or 8 bytes), the rest is the big-endian value.
    pub fn varint(&mut self) -> Result<u64, FrameError> {
        let first = *self
            .buf
            .get(self.pos)
            .ok_or(FrameError::Incomplete { needed: 1 })?;
        let len = 1usize << (first >> 6);
        let bytes = self.take(len)?;
        let mut v = u64::from(bytes[0] & 0x3f);
        for b in &bytes[1..] {
            v = (v << 8) | u64::from(*b);
        }
        Ok(v)
    }
}

/// Largest value a QUIC varint can hold (2^62 − 1).
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Appends `v` as a minimal QUIC varint. Values above [`VARINT_MAX`] are a caller bug; they
/// are clamped to `VARINT_MAX` (never produced by this crate: lengths are bounded by `u32`).
pub fn put_varint(v: u64, out: &mut Vec<u8>) {
    let v = v.min(VARINT_MAX);
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// Encoded size of `v` as a minimal QUIC varint.
pub fn varint_len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip_at_boundaries() {
        for v in [0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, VARINT_MAX] {
            let mut out = Vec::new();
            put_varint(v, &mut out);
            assert_eq!(out.len(), varint_len(v));
            let mut r = Reader::new(&out);
            assert_eq!(r.varint().unwrap(), v);
            assert_eq!(r.remaining(), 0);
        }
    }

    #[test]
    fn varint_rfc9000_examples() {
        let mut r = Reader::new(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]);
        assert_eq!(r.varint().unwrap(), 151_288_809_941_952_652);
        let mut r = Reader::new(&[0x7b, 0xbd]);
        assert_eq!(r.varint().unwrap(), 15_293);
        let mut r = Reader::new(&[0x40, 0x25]);
        assert_eq!(r.varint().unwrap(), 37);
    }

    #[test]
    fn short_reads_are_incomplete() {
        let mut r = Reader::new(&[0x80, 0x00]);
        assert_eq!(r.varint(), Err(FrameError::Incomplete { needed: 2 }));
        let mut r = Reader::new(&[1, 2]);
        assert_eq!(r.u32(), Err(FrameError::Incomplete { needed: 2 }));
        assert_eq!(
            Reader::new(&[]).u8(),
            Err(FrameError::Incomplete { needed: 1 })
        );
    }

    #[test]
    fn default_batch_body_bound() {
        let l = DecodeLimits::default();
        assert_eq!(l.max_batch_body(), 16 + 32 * 16 * 1024 + 1024 * 1024);
    }
}
