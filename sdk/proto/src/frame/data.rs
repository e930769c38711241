//! Partition uni stream frames (shard → client): `PartitionOpen` then `Records` batches.
//!
//! `Records` body layout (all integers big-endian; `varint` = QUIC varint, RFC 9000 §16):
//!
//! ```text
//! partition    u32
//! base_offset  u64        offset of the first record
//! count        u32        1 ..= max_batch_records
//! count × {
//!   offset_delta  varint  offset − base_offset; 0 for the first record, strictly increasing
//!   timestamp     u64     Unix ms
//!   key_len       varint  then key_len bytes of key
//!   payload_len   varint  then payload_len bytes of payload
//! }
//! ```
//!
//! Σ(key_len + payload_len) ≤ `max_batch_payload`. Decoding validates the whole body once; the
//! record section is held as one [`Bytes`] — a slice of the received buffer when decoded with
//! [`Records::decode_shared`] (no copy), a copy otherwise — and records are then borrowed
//! ([`RecordRef`]) without allocating.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{DecodeLimited, FrameBody, Validate, cbor_frame};
use crate::codec::{Codec, DecodeLimits, FrameError, Reader, put_varint};

/// `PartitionOpen` (`0x40`): the first frame of a partition uni stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOpen {
    /// The subscription this partition is assigned to.
    pub sub_id: u32,
    /// Partition number.
    pub partition: u32,
    /// The `Assignment.epoch` that assigned it; streams of older epochs are stale.
    pub epoch: u64,
}

impl Validate for PartitionOpen {}
cbor_frame!(PartitionOpen);

/// A record borrowed from a decoded batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordRef<'a> {
    /// Offset within the partition.
    pub offset: u64,
    /// Unix time in milliseconds.
    pub timestamp: u64,
    /// Key (may be empty).
    pub key: &'a [u8],
    /// Payload.
    pub payload: &'a [u8],
}

/// An owned record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Record {
    /// Offset within the partition.
    pub offset: u64,
    /// Unix time in milliseconds.
    pub timestamp: u64,
    /// Key (may be empty).
    pub key: Vec<u8>,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Record {
    /// Borrows this record.
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            offset: self.offset,
            timestamp: self.timestamp,
            key: &self.key,
            payload: &self.payload,
        }
    }
}

impl RecordRef<'_> {
    /// Copies into an owned record.
    pub fn to_owned(&self) -> Record {
        Record {
            offset: self.offset,
            timestamp: self.timestamp,
            key: self.key.to_vec(),
            payload: self.payload.to_vec(),
        }
    }
}

/// Why a batch could not be built (caller misuse, never peer input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// A batch holds at least one record.
    #[error("a batch must hold at least one record")]
    Empty,
    /// Offsets must strictly increase within a batch.
    #[error("record offsets must strictly increase")]
    OffsetsNotIncreasing,
    /// More than `u32::MAX` records or bytes.
    #[error("batch too large")]
    TooLarge,
}

/// `Records` (`0x41`): a batch of consecutive-or-increasing records of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Records {
    partition: u32,
    base_offset: u64,
    count: u32,
    /// The validated record section (everything after the 16-byte header).
    data: Bytes,
}

impl Records {
    /// Builds a batch. Offsets must strictly increase; the first becomes `base_offset`.
    pub fn new<'a>(
        partition: u32,
        records: impl IntoIterator<Item = RecordRef<'a>>,
    ) -> Result<Self, BatchError> {
        let mut data = Vec::new();
        let mut count: u32 = 0;
        let mut base = 0u64;
        let mut last = 0u64;
        for rec in records {
            if count == 0 {
                base = rec.offset;
            } else if rec.offset <= last {
                return Err(BatchError::OffsetsNotIncreasing);
            }
            last = rec.offset;
            count = count.checked_add(1).ok_or(BatchError::TooLarge)?;
            put_varint(rec.offset - base, &mut data);
            data.extend_from_slice(&rec.timestamp.to_be_bytes());
            put_bytes(rec.key, &mut data)?;
            put_bytes(rec.payload, &mut data)?;
        }
        if count == 0 {
            return Err(BatchError::Empty);
        }
        Ok(Self {
            partition,
            base_offset: base,
            count,
            data: data.into(),
        })
    }

    /// Builds a batch from owned records.
    pub fn from_records(partition: u32, records: &[Record]) -> Result<Self, BatchError> {
        Self::new(partition, records.iter().map(Record::as_ref))
    }

    /// Partition number.
    pub fn partition(&self) -> u32 {
        self.partition
    }
    /// Offset of the first record.
    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }
    /// Number of records (≥ 1).
    pub fn count(&self) -> u32 {
        self.count
    }
    /// Offset after the last record.
    pub fn next_offset(&self) -> u64 {
        self.iter()
            .last()
            .map_or(self.base_offset, |r| r.offset.saturating_add(1))
    }
    /// Encoded body length in bytes (compare with the peer's frame limit before sending).
    pub fn body_len(&self) -> usize {
        16 + self.data.len()
    }
    /// Borrowing iterator over the records, in offset order.
    pub fn iter(&self) -> RecordIter<'_> {
        RecordIter {
            r: Reader::new(&self.data),
            base: self.base_offset,
            left: self.count,
        }
    }
    /// The validated record section (everything after the 16-byte header): what
    /// [`iter`](Self::iter) walks; every [`RecordRef`] key and payload borrows from it.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    /// Appends the 16-byte body header (partition, base_offset, count): the body is this
    /// header followed by [`data`](Self::data), so a sender can write the two separately
    /// and share the data without copying it.
    pub fn encode_header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.partition.to_be_bytes());
        out.extend_from_slice(&self.base_offset.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
    }
    /// Consumes the batch, returning [`data`](Self::data) without copying (for zero-copy
    /// views: note the records' positions first, then share the buffer).
    pub fn into_data(self) -> Bytes {
        self.data
    }
    /// [`data`](Self::data) as a shared handle (a reference count, no copy): what a sender
    /// hands to its transport after [`encode_header`](Self::encode_header).
    pub fn shared_data(&self) -> Bytes {
        self.data.clone()
    }
    /// Decodes a `Records` body held in `body` under `limits`, validating it exactly as
    /// [`Frame`](super::Frame) decoding does; the record section is a slice of `body` (no
    /// copy).
    pub fn decode_shared(body: &Bytes, limits: &DecodeLimits) -> Result<Self, FrameError> {
        let (partition, base_offset, count) = validate(body, limits)?;
        Ok(Self {
            partition,
            base_offset,
            count,
            data: body.slice(HEADER_LEN..),
        })
    }
    /// Copies all records out.
    pub fn to_records(&self) -> Vec<Record> {
        self.iter().map(|r| r.to_owned()).collect()
    }
}

impl<'a> IntoIterator for &'a Records {
    type Item = RecordRef<'a>;
    type IntoIter = RecordIter<'a>;
    fn into_iter(self) -> RecordIter<'a> {
        self.iter()
    }
}

/// Iterator over a [`Records`] batch.
#[derive(Debug, Clone)]
pub struct RecordIter<'a> {
    r: Reader<'a>,
    base: u64,
    left: u32,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = RecordRef<'a>;
    fn next(&mut self) -> Option<RecordRef<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The data section was validated at decode/build time, so these reads succeed; on the
        // impossible failure the iterator ends instead of panicking.
        let delta = self.r.varint().ok()?;
        let timestamp = self.r.u64().ok()?;
        let key = take_bytes(&mut self.r).ok()?;
        let payload = take_bytes(&mut self.r).ok()?;
        Some(RecordRef {
            offset: self.base.wrapping_add(delta),
            timestamp,
            key,
            payload,
        })
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

pub(crate) fn put_bytes(b: &[u8], out: &mut Vec<u8>) -> Result<(), BatchError> {
    let len = u32::try_from(b.len()).map_err(|_| BatchError::TooLarge)?;
    put_varint(u64::from(len), out);
    out.extend_from_slice(b);
    Ok(())
}

pub(crate) fn take_bytes<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], FrameError> {
    let len = r.varint()?;
    let len = usize::try_from(len).map_err(|_| FrameError::Incomplete { needed: usize::MAX })?;
    r.take(len)
}

/// Checks one record's `timestamp · key · payload` (the part `Records` and `Produce` share),
/// adding its key and payload bytes to `payload_total` against `max_batch_payload`.
pub(crate) fn check_record_tail(
    ty: u8,
    w: &mut Reader<'_>,
    payload_total: &mut u64,
    limits: &DecodeLimits,
) -> Result<(), FrameError> {
    w.u64().map_err(|e| short(ty, e))?;
    let k = take_bytes(w).map_err(|e| short(ty, e))?;
    let p = take_bytes(w).map_err(|e| short(ty, e))?;
    *payload_total += (k.len() + p.len()) as u64;
    if *payload_total > u64::from(limits.max_batch_payload) {
        return Err(FrameError::malformed(
            ty,
            "batch payload exceeds max_batch_payload",
        ));
    }
    Ok(())
}

/// A batch body must end exactly after its last record.
pub(crate) fn check_batch_end(ty: u8, w: &Reader<'_>) -> Result<(), FrameError> {
    if w.remaining() != 0 {
        return Err(FrameError::TrailingBytes { ty });
    }
    Ok(())
}

/// Checks the count against limits; shared by `Records` and `Produce`.
pub(crate) fn check_count(ty: u8, count: u32, limits: &DecodeLimits) -> Result<(), FrameError> {
    if count == 0 {
        return Err(FrameError::malformed(ty, "batch count must be >= 1"));
    }
    if count > limits.max_batch_records {
        return Err(FrameError::malformed(
            ty,
            format!("batch count {count} exceeds {}", limits.max_batch_records),
        ));
    }
    Ok(())
}

/// Turns a short read inside a body into `Malformed`.
pub(crate) fn short(ty: u8, e: FrameError) -> FrameError {
    if e.is_incomplete() {
        FrameError::malformed(ty, "body truncated")
    } else {
        e
    }
}

/// Length of the fixed part of a `Records` body: partition, base_offset, count.
const HEADER_LEN: usize = 16;

/// Validates a whole `Records` body: returns `(partition, base_offset, count)`; the record
/// section is `body[HEADER_LEN..]`.
fn validate(body: &[u8], limits: &DecodeLimits) -> Result<(u32, u64, u32), FrameError> {
    let ty = Records::TYPE.to_u8();
    let mut r = Reader::new(body);
    let partition = r.u32().map_err(|e| short(ty, e))?;
    let base_offset = r.u64().map_err(|e| short(ty, e))?;
    let count = r.u32().map_err(|e| short(ty, e))?;
    check_count(ty, count, limits)?;
    {
        let data = r.take_rest();
        let mut w = Reader::new(data);
        let mut payload_total: u64 = 0;
        let mut last_delta = 0u64;
        for i in 0..count {
            let delta = w.varint().map_err(|e| short(ty, e))?;
            if i == 0 && delta != 0 {
                return Err(FrameError::malformed(ty, "first offset_delta must be 0"));
            }
            if i > 0 && delta <= last_delta {
                return Err(FrameError::malformed(ty, "offsets must strictly increase"));
            }
            if base_offset.checked_add(delta).is_none() {
                return Err(FrameError::malformed(ty, "offset overflows u64"));
            }
            last_delta = delta;
            check_record_tail(ty, &mut w, &mut payload_total, limits)?;
        }
        check_batch_end(ty, &w)?;
    }
    Ok((partition, base_offset, count))
}

impl DecodeLimited for Records {
    fn decode_limited(r: &mut Reader<'_>, limits: &DecodeLimits) -> Result<Self, FrameError> {
        let body = r.take_rest();
        let (partition, base_offset, count) = validate(body, limits)?;
        Ok(Self {
            partition,
            base_offset,
            count,
            data: Bytes::copy_from_slice(&body[HEADER_LEN..]),
        })
    }
}

impl Codec for Records {
    fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(16 + self.data.len());
        self.encode_header(out);
        out.extend_from_slice(&self.data);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, FrameError> {
        Self::decode_limited(r, &DecodeLimits::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: u64, payload: &[u8]) -> Record {
        Record {
            offset,
            timestamp: 1_700_000_000_000 + offset,
            key: b"k".to_vec(),
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn build_iterate_decode() {
        let recs = vec![rec(10, b"a"), rec(11, b"bb"), rec(15, b"")];
        let b = Records::from_records(3, &recs).unwrap();
        assert_eq!(
            (b.partition(), b.base_offset(), b.count(), b.next_offset()),
            (3, 10, 3, 16)
        );
        assert_eq!(b.to_records(), recs);
        let mut out = Vec::new();
        b.encode(&mut out);
        assert_eq!(out.len(), b.body_len());
        assert_eq!(Records::decode(&mut Reader::new(&out)).unwrap(), b);
    }

    #[test]
    fn shared_decode_slices_the_input_and_agrees_with_the_copying_decode() {
        let b = Records::from_records(2, &[rec(7, b"abc"), rec(9, b"")]).unwrap();
        let mut body = Vec::new();
        b.encode(&mut body);
        let limits = DecodeLimits::default();
        let shared = Bytes::from(body.clone());
        let d = Records::decode_shared(&shared, &limits).unwrap();
        assert_eq!(d, b);
        // The record section is a view of the input, not a copy.
        assert_eq!(d.data().as_ptr(), shared[HEADER_LEN..].as_ptr());
        assert_eq!(d.shared_data().as_ptr(), d.data().as_ptr());
        // Every truncation and a trailing byte get the same verdict both ways.
        let mut long = body.clone();
        long.push(0);
        let cases = (0..body.len()).map(|n| body[..n].to_vec()).chain([long]);
        for case in cases {
            assert_eq!(
                Records::decode_shared(&Bytes::from(case.clone()), &limits),
                Records::decode_limited(&mut Reader::new(&case), &limits),
                "{case:?}"
            );
        }
    }

    #[test]
    fn builder_rejects_misuse() {
        assert_eq!(Records::from_records(0, &[]), Err(BatchError::Empty));
        assert_eq!(
            Records::from_records(0, &[rec(5, b""), rec(5, b"")]),
            Err(BatchError::OffsetsNotIncreasing)
        );
    }

    #[test]
    fn decode_rejects_bad_batches() {
        let b = Records::from_records(0, &[rec(1, b"xyz")]).unwrap();
        let mut body = Vec::new();
        b.encode(&mut body);
        // Truncated.
        let e = Records::decode(&mut Reader::new(&body[..body.len() - 1])).unwrap_err();
        assert!(matches!(e, FrameError::Malformed { .. }), "{e:?}");
        // Trailing.
        let mut t = body.clone();
        t.push(0);
        assert_eq!(
            Records::decode(&mut Reader::new(&t)),
            Err(FrameError::TrailingBytes { ty: 0x41 })
        );
        // Count zero.
        let mut z = body.clone();
        z[12..16].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            Records::decode(&mut Reader::new(&z)),
            Err(FrameError::Malformed { .. })
        ));
        // Over the payload limit.
        let tight = DecodeLimits {
            max_batch_payload: 3,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            Records::decode_limited(&mut Reader::new(&body), &tight),
            Err(FrameError::Malformed { .. })
        ));
        // A huge key length does not allocate or panic.
        let mut h = body[..16].to_vec();
        h.push(0); // delta
        h.extend_from_slice(&[0; 8]); // timestamp
        h.extend_from_slice(&[0xff; 8]); // key_len = 2^62-1
        assert!(matches!(
            Records::decode(&mut Reader::new(&h)),
            Err(FrameError::Malformed { .. })
        ));
    }
}
