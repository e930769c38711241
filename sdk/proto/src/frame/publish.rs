//! Publish stream frames (a client-opened bidi stream on the hub connection, one per
//! publisher, after a `Ticket`): `PublishOpen` → `PublishAccepted`; then `Produce` up and
//! `ProduceAck` | `ProduceError` down, one answer per `Produce`, in `seq` order.
//!
//! An **idempotent** publisher asks for a producer id (`PublishOpen.producer_id = 0`), keeps
//! the id and token the hub issues, presents them again on every later stream, and numbers its
//! batches with one `seq` counter for the producer's whole life (from 1, never renumbered): a
//! batch re-sent after a lost ack is then recognised and acknowledged with its original
//! offsets instead of being appended twice (PROTOCOL.md §5.2).
//!
//! `Produce` body layout (big-endian; `varint` = QUIC varint):
//!
//! ```text
//! seq          u64     client sequence number ≥ 1, strictly increasing per publish stream
//!                      (idempotent streams: per producer, across its streams)
//! partition    u32     target partition (< PublishAccepted.partitions)
//! count        u32     1 ..= max_batch_records
//! count × {
//!   timestamp    u64     Unix ms; 0 = the hub stamps its own clock
//!   key_len      varint  then key_len bytes of key
//!   payload_len  varint  then payload_len bytes of payload
//! }
//! ```

use serde::{Deserialize, Serialize};

use super::data::{
    BatchError, check_batch_end, check_count, check_record_tail, put_bytes, short, take_bytes,
};
use super::{DecodeLimited, FrameBody, Validate, cbor_frame};
use crate::codec::{Codec, DecodeLimits, FrameError, Reader};
use crate::error::ErrorCode;

/// Length of a producer token.
pub const PRODUCER_TOKEN_LEN: usize = 16;

/// `PublishOpen` (`0x10`): the first frame on a publish stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOpen {
    /// Stream to append to (must have been in `Hello.wants` with action `publish`).
    pub stream: String,
    /// Idempotent publishing: `0` asks the hub for a new producer id; an id the hub issued
    /// earlier (with its `producer_token`) continues that producer. Absent: at-least-once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer_id: Option<u64>,
    /// The token the hub issued with `producer_id` (required with a non-zero id).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub producer_token: Option<[u8; PRODUCER_TOKEN_LEN]>,
}

impl PublishOpen {
    /// An at-least-once publish stream on `stream` (no producer id).
    pub fn new(stream: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            producer_id: None,
            producer_token: None,
        }
    }

    /// An idempotent publish stream: a new producer (`None`) or an issued one.
    pub fn idempotent(
        stream: impl Into<String>,
        producer: Option<(u64, [u8; PRODUCER_TOKEN_LEN])>,
    ) -> Self {
        Self {
            stream: stream.into(),
            producer_id: Some(producer.map_or(0, |p| p.0)),
            producer_token: producer.map(|p| p.1),
        }
    }
}

/// `PublishAccepted` (`0x11`): the publisher may send `Produce` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishAccepted {
    /// Number of partitions of the stream (partitions are `0 .. partitions`).
    pub partitions: u32,
    /// Maximum `Produce` body length the hub accepts.
    pub max_frame: u32,
    /// The producer id of an idempotent stream (the one presented, or a new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer_id: Option<u64>,
    /// The token to present with `producer_id` on later streams.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub producer_token: Option<[u8; PRODUCER_TOKEN_LEN]>,
    /// Idempotent streams: most batches the publisher may have unacknowledged at once (the
    /// hub remembers this many batches per producer and partition for re-sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

/// `ProduceAck` (`0x13`): the batch `seq` was durably appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProduceAck {
    /// The acknowledged `Produce.seq`.
    pub seq: u64,
    /// Partition appended to.
    pub partition: u32,
    /// Offset of the batch's first record; the others follow consecutively.
    pub base_offset: u64,
    /// Number of records appended.
    pub count: u32,
}

/// `ProduceError` (`0x14`): the batch `seq` was not appended (with `INTERNAL`, possibly was:
/// re-send it with the same `seq` on an idempotent stream to learn); the stream stays usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProduceError {
    /// The rejected `Produce.seq`.
    pub seq: u64,
    /// Why: e.g. `NOT_FOUND` (partition), `LIMIT_EXCEEDED`, `OUT_OF_ORDER_SEQUENCE`,
    /// `INTERNAL`.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub reason: String,
}

impl Validate for PublishOpen {}
impl Validate for PublishAccepted {}
impl Validate for ProduceAck {}
impl Validate for ProduceError {}
cbor_frame!(PublishOpen, PublishAccepted, ProduceAck, ProduceError);

/// A new record borrowed for a `Produce` batch (no offset yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NewRecordRef<'a> {
    /// Unix ms; 0 lets the hub stamp it.
    pub timestamp: u64,
    /// Key (may be empty).
    pub key: &'a [u8],
    /// Payload.
    pub payload: &'a [u8],
}

/// An owned new record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NewRecord {
    /// Unix ms; 0 lets the hub stamp it.
    pub timestamp: u64,
    /// Key (may be empty).
    pub key: Vec<u8>,
    /// Payload.
    pub payload: Vec<u8>,
}

impl NewRecord {
    /// Borrows this record.
    pub fn as_ref(&self) -> NewRecordRef<'_> {
        NewRecordRef {
            timestamp: self.timestamp,
            key: &self.key,
            payload: &self.payload,
        }
    }
}

/// `Produce` (`0x12`): a batch of new records for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produce {
    seq: u64,
    partition: u32,
    count: u32,
    data: Vec<u8>,
}

impl Produce {
    /// Builds a batch (at least one record).
    pub fn new<'a>(
        seq: u64,
        partition: u32,
        records: impl IntoIterator<Item = NewRecordRef<'a>>,
    ) -> Result<Self, BatchError> {
        let mut data = Vec::new();
        let mut count: u32 = 0;
        for rec in records {
            count = count.checked_add(1).ok_or(BatchError::TooLarge)?;
            data.extend_from_slice(&rec.timestamp.to_be_bytes());
            put_bytes(rec.key, &mut data)?;
            put_bytes(rec.payload, &mut data)?;
        }
        if count == 0 {
            return Err(BatchError::Empty);
        }
        Ok(Self {
            seq,
            partition,
            count,
            data,
        })
    }

    /// Builds a batch from owned records.
    pub fn from_records(
        seq: u64,
        partition: u32,
        records: &[NewRecord],
    ) -> Result<Self, BatchError> {
        Self::new(seq, partition, records.iter().map(NewRecord::as_ref))
    }

    /// Client sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// Target partition.
    pub fn partition(&self) -> u32 {
        self.partition
    }
    /// Number of records (≥ 1).
    pub fn count(&self) -> u32 {
        self.count
    }
    /// Encoded body length in bytes.
    pub fn body_len(&self) -> usize {
        16 + self.data.len()
    }
    /// Borrowing iterator over the records.
    pub fn iter(&self) -> NewRecordIter<'_> {
        NewRecordIter {
            r: Reader::new(&self.data),
            left: self.count,
        }
    }
    /// Copies all records out.
    pub fn to_records(&self) -> Vec<NewRecord> {
        self.iter()
            .map(|r| NewRecord {
                timestamp: r.timestamp,
                key: r.key.to_vec(),
                payload: r.payload.to_vec(),
            })
            .collect()
    }
}

/// Iterator over a [`Produce`] batch.
#[derive(Debug, Clone)]
pub struct NewRecordIter<'a> {
    r: Reader<'a>,
    left: u32,
}

impl<'a> Iterator for NewRecordIter<'a> {
    type Item = NewRecordRef<'a>;
    fn next(&mut self) -> Option<NewRecordRef<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Validated at decode/build time; ends early instead of panicking if not.
        let timestamp = self.r.u64().ok()?;
        let key = take_bytes(&mut self.r).ok()?;
        let payload = take_bytes(&mut self.r).ok()?;
        Some(NewRecordRef {
            timestamp,
            key,
            payload,
        })
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

impl DecodeLimited for Produce {
    fn decode_limited(r: &mut Reader<'_>, limits: &DecodeLimits) -> Result<Self, FrameError> {
        let ty = Self::TYPE.to_u8();
        let seq = r.u64().map_err(|e| short(ty, e))?;
        let partition = r.u32().map_err(|e| short(ty, e))?;
        let count = r.u32().map_err(|e| short(ty, e))?;
        check_count(ty, count, limits)?;
        let data = r.take_rest();
        let mut w = Reader::new(data);
        let mut payload_total: u64 = 0;
        for _ in 0..count {
            check_record_tail(ty, &mut w, &mut payload_total, limits)?;
        }
        check_batch_end(ty, &w)?;
        Ok(Self {
            seq,
            partition,
            count,
            data: data.to_vec(),
        })
    }
}

impl Codec for Produce {
    fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(16 + self.data.len());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.partition.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.data);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, FrameError> {
        Self::decode_limited(r, &DecodeLimits::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn produce_round_trip() {
        let recs = vec![
            NewRecord {
                timestamp: 0,
                key: vec![],
                payload: b"hello".to_vec(),
            },
            NewRecord {
                timestamp: 5,
                key: b"user-1".to_vec(),
                payload: vec![0; 300],
            },
        ];
        let p = Produce::from_records(7, 2, &recs).unwrap();
        let mut out = Vec::new();
        p.encode(&mut out);
        let d = Produce::decode(&mut Reader::new(&out)).unwrap();
        assert_eq!(d, p);
        assert_eq!((d.seq(), d.partition(), d.count()), (7, 2, 2));
        assert_eq!(d.to_records(), recs);
        assert_eq!(Produce::from_records(1, 0, &[]), Err(BatchError::Empty));
    }
}
