//! The store link's wire format (I/O-free).
//!
//! Every frame is `len u32 BE | tag u8 | body`, where `len` counts the tag and the body and is
//! bounded ([`MAX_FRAME_LEN`], or [`MAX_REQUEST_LEN`] for what the hub accepts) before any
//! allocation:
//!
//! ```text
//! tag 0x01  Request   shard → hub   CBOR (sibyl_proto::cbor) of [`Request`]
//! tag 0x02  Response  hub → shard   CBOR of [`Response`]
//! tag 0x03  Batch     hub → shard   id u64 BE | a whole client-facing `Records` frame
//!                                   (type 0x41 | len u32 BE | body, sibyl_proto::frame::data)
//! tag 0x04  Raw       hub → shard   id u64 BE | segment_base u64 BE | pos u64 BE | bytes of
//!                                   the segment file from pos on (store frames, unverified)
//! ```
//!
//! A `Batch` carries the records of a `Read` as the very frame a shard sends its clients, so a
//! shard can forward it with no per-record re-encoding.
//!
//! A `Raw` answers a [`Request::ReadRaw`]: the hub sends a range of the segment file as it is
//! (`sendfile`, never copied through the hub), and the shard checks every frame's CRC and
//! offset and re-encodes the records as a `Records` batch ([`super::raw`]). The hub may
//! answer a `ReadRaw` with a `Batch` instead (a corrupt region, an oversized record), and
//! the shard falls back to `Read` when the bytes are not what it expects.
//!
//! Consumer-group coordination rides the same link as its own protocol ([`super::group`]):
//!
//! ```text
//! tag 0x05  GroupMsg     shard → hub   CBOR of [`GroupMsg`] (join, leave, positions, forecasts)
//! tag 0x06  GroupAssign  hub → shard   CBOR of [`GroupAssign`] (a member's complete set)
//! ```
//!
//! The hub decodes what a shard sends with [`decode_shard_msg`] (a store [`Request`] or a
//! [`GroupMsg`]), the shard what the hub sends with [`decode_server_msg`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sibyl_proto::codec::{Codec, DecodeLimits, FrameError, put_varint};
use sibyl_proto::frame::data::Records;
use sibyl_proto::frame::{FrameBody, FrameType};

use super::group::{self, GroupAssign, GroupMsg};
use crate::store::Record;

/// Largest frame (tag + body) either side sends: 8 MiB. A `Read` answer is capped well under
/// it by the hub ([`ServerConfig::max_read_bytes`](super::ServerConfig::max_read_bytes)),
/// and a single record (at most 1 MiB payload + 4 KiB key by default) always fits.
pub const MAX_FRAME_LEN: usize = 8 << 20;
/// Largest request frame the hub accepts: 256 KiB (requests carry a stream name and a few
/// integers; a group join or forecast lists up to [`MAX_GROUP_PARTITIONS`] small entries).
pub const MAX_REQUEST_LEN: usize = 256 << 10;
pub use super::group::{MAX_GROUP_NAME, MAX_GROUP_PARTITIONS};

const LEN_LEN: usize = 4;
const TAG_REQUEST: u8 = 0x01;
const TAG_RESPONSE: u8 = 0x02;
/// Tag of a [`GroupMsg`] frame (shard → hub).
pub(super) const TAG_GROUP: u8 = 0x05;
/// Tag of a [`GroupAssign`] frame (hub → shard).
pub(super) const TAG_GROUP_PUSH: u8 = 0x06;
const TAG_BATCH: u8 = 0x03;
const TAG_RAW: u8 = 0x04;
/// Bytes of a `Raw` frame before the segment bytes: length, tag, id, segment base, position.
pub const RAW_PREFIX: usize = LEN_LEN + 1 + 8 + 8 + 8;
/// Most segment bytes one `Raw` frame carries.
pub const MAX_RAW_LEN: usize = MAX_FRAME_LEN - (RAW_PREFIX - LEN_LEN);

/// Why bytes from the peer could not be decoded (the peer sent garbage), or, when encoding,
/// why a message cannot be sent (the caller's misuse).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The announced frame length exceeds the bound.
    #[error("frame of {len} bytes exceeds the {max}-byte bound")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// An empty frame, or a batch frame too short for its request id.
    #[error("frame too short")]
    Short,
    /// A tag this side does not accept.
    #[error("unexpected frame tag {0:#04x}")]
    UnexpectedTag(u8),
    /// A CBOR body that does not decode to a message.
    #[error("malformed message: {0}")]
    Cbor(#[from] sibyl_proto::cbor::CborError),
    /// A batch body that is not a valid `Records` body.
    #[error("malformed record batch: {0}")]
    Batch(#[from] FrameError),
    /// Encoding only: an empty batch or offsets not strictly increasing (caller misuse).
    #[error("a batch needs at least one record and strictly increasing offsets")]
    InvalidBatch,
    /// A group message over a bound ([`MAX_GROUP_NAME`], [`MAX_GROUP_PARTITIONS`]).
    #[error("group message over a bound: {0}")]
    Limit(&'static str),
}

/// A stream as listed by [`Request::Streams`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Stream name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
}

/// Shard → hub. Every request carries an `id` chosen by the shard; answers carry it back and
/// may arrive in any order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// List the streams → [`Response::Streams`].
    Streams {
        /// Request id.
        id: u64,
    },
    /// `(earliest, next)` of a partition → [`Response::Bounds`].
    Bounds {
        /// Request id.
        id: u64,
        /// Stream name.
        stream: String,
        /// Partition.
        partition: u32,
    },
    /// First offset with a timestamp `>= ts_ms` → [`Response::Offset`].
    OffsetForTimestamp {
        /// Request id.
        id: u64,
        /// Stream name.
        stream: String,
        /// Partition.
        partition: u32,
        /// Unix milliseconds.
        ts_ms: u64,
    },
    /// Records from `from` on → a batch frame, or [`Response::ReadEmpty`] at the tail.
    Read {
        /// Request id.
        id: u64,
        /// Stream name.
        stream: String,
        /// Partition.
        partition: u32,
        /// First offset wanted.
        from: u64,
        /// At most this many records (the hub may return fewer).
        max_records: u32,
        /// About this many bytes (at least one record is returned if any is available).
        max_bytes: u32,
    },
    /// Like [`Request::Read`], answered by a `Raw` frame (the segment bytes from a frame
    /// boundary at or before `from`), a batch frame (the hub's choice), [`Response::ReadEmpty`]
    /// at the tail, or an error.
    ReadRaw {
        /// Request id.
        id: u64,
        /// Stream name.
        stream: String,
        /// Partition.
        partition: u32,
        /// First offset wanted.
        from: u64,
        /// At most this many records, if the hub answers with a batch.
        max_records: u32,
        /// About this many bytes (at least one whole record).
        max_bytes: u32,
        /// `(segment_base, pos)` where the previous raw answer's last whole frame ended, when
        /// `from` is the offset after it: the hub starts there instead of at its index entry.
        hint: Option<(u64, u64)>,
    },
    /// Push [`Response::Tail`] whenever the partition's `next` grows; answered by
    /// [`Response::Watching`]. The request id names the watch.
    WatchTail {
        /// Request id, and the watch id of later `Tail` pushes.
        id: u64,
        /// Stream name.
        stream: String,
        /// Partition.
        partition: u32,
    },
    /// Stop a watch (no answer).
    Unwatch {
        /// The `WatchTail` request id.
        watch: u64,
    },
}

/// Hub → shard control messages (batches travel in their own binary frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// Answer to [`Request::Streams`].
    Streams {
        /// Request id.
        id: u64,
        /// Streams, sorted by name.
        streams: Vec<StreamInfo>,
    },
    /// Answer to [`Request::Bounds`].
    Bounds {
        /// Request id.
        id: u64,
        /// Earliest stored offset.
        earliest: u64,
        /// Offset the next record will get.
        next: u64,
    },
    /// Answer to [`Request::OffsetForTimestamp`].
    Offset {
        /// Request id.
        id: u64,
        /// The offset.
        offset: u64,
    },
    /// Answer to a [`Request::Read`] at the partition's tail: no records yet.
    ReadEmpty {
        /// Request id.
        id: u64,
        /// The requested offset, which is the partition's `next`.
        next: u64,
    },
    /// Answer to [`Request::WatchTail`]: the watch is active.
    Watching {
        /// Request id (the watch id).
        id: u64,
        /// The partition's current `next`.
        next: u64,
    },
    /// Pushed when a watched partition's `next` grows. Coalesced: only the latest value is
    /// sent.
    Tail {
        /// The watch id.
        watch: u64,
        /// The partition's new `next`.
        next: u64,
    },
    /// A request failed.
    Error {
        /// Request id.
        id: u64,
        /// Why.
        error: RemoteError,
    },
}

/// A request's failure as reported by the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// No stream of that name (caller's problem).
    #[error("no such stream `{stream}`")]
    NoSuchStream {
        /// The stream asked for.
        stream: String,
    },
    /// The stream has no such partition (caller's problem).
    #[error("stream `{stream}` has no partition {partition} (it has {partitions})")]
    NoSuchPartition {
        /// The stream.
        stream: String,
        /// The partition asked for.
        partition: u32,
        /// How many it has.
        partitions: u32,
    },
    /// The offset is outside `[earliest, next]` (caller's problem: re-seek).
    #[error("offset {requested} out of range [{earliest}, {next}]")]
    OffsetOutOfRange {
        /// The offset asked for.
        requested: u64,
        /// The earliest offset still stored.
        earliest: u64,
        /// The next offset to be written.
        next: u64,
    },
    /// The record at `offset` is damaged and never served; reading can continue at
    /// `resume_at` if known (the caller decides whether to skip).
    #[error("corrupt record at offset {offset} (resume at {resume_at:?})")]
    Corrupt {
        /// The first unreadable offset.
        offset: u64,
        /// Next readable offset, if known.
        resume_at: Option<u64>,
    },
    /// The hub's store failed (I/O error, poisoned partition): retry later.
    #[error("store unavailable: {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
    },
    /// The hub refused the request (a limit of the link): the shard's misuse.
    #[error("request refused: {reason}")]
    Refused {
        /// Why.
        reason: String,
    },
}

impl From<&crate::store::StoreError> for RemoteError {
    fn from(e: &crate::store::StoreError) -> Self {
        use crate::store::StoreError as E;
        match e {
            E::NoSuchStream { stream } => Self::NoSuchStream {
                stream: stream.clone(),
            },
            E::NoSuchPartition {
                stream,
                partition,
                partitions,
            } => Self::NoSuchPartition {
                stream: stream.clone(),
                partition: *partition,
                partitions: *partitions,
            },
            E::OffsetOutOfRange {
                requested,
                earliest,
                next,
                ..
            } => Self::OffsetOutOfRange {
                requested: *requested,
                earliest: *earliest,
                next: *next,
            },
            E::Corrupt {
                offset, resume_at, ..
            } => Self::Corrupt {
                offset: *offset,
                resume_at: *resume_at,
            },
            E::InvalidName { .. } => Self::Refused {
                reason: e.to_string(),
            },
            other => Self::Unavailable {
                reason: other.to_string(),
            },
        }
    }
}

/// A decoded hub → shard frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum ServerMsg {
    /// A control message.
    Response(Response),
    /// A consumer-group push.
    Group(GroupAssign),
    /// The records answering `Read` request `id`.
    Batch {
        /// Request id.
        id: u64,
        /// The records.
        records: Records,
    },
    /// Segment bytes answering `ReadRaw` request `id` (unverified: see [`super::raw`]).
    Raw {
        /// Request id.
        id: u64,
        /// First offset of the segment the bytes come from.
        segment_base: u64,
        /// Where the bytes start in that segment file.
        pos: u64,
        /// The bytes.
        data: Bytes,
    },
}

/// Appends `len | tag | body` to `out` (nothing on error).
pub(super) fn put_frame(
    out: &mut Vec<u8>,
    tag: u8,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), CodecError>,
) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_LEN]);
    out.push(tag);
    if let Err(e) = body(out) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - LEN_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(CodecError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // The bound above keeps `len` within u32.
    out[start..start + LEN_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Appends a request frame to `out`.
pub fn encode_request(req: &Request, out: &mut Vec<u8>) -> Result<(), CodecError> {
    put_frame(out, TAG_REQUEST, |o| {
        sibyl_proto::cbor::to_writer(req, o).map_err(CodecError::from)
    })
}

/// Appends a response frame to `out`.
pub fn encode_response(resp: &Response, out: &mut Vec<u8>) -> Result<(), CodecError> {
    put_frame(out, TAG_RESPONSE, |o| {
        sibyl_proto::cbor::to_writer(resp, o).map_err(CodecError::from)
    })
}

/// Appends the prefix of a `Raw` frame that `len` segment bytes will follow (the hub sends
/// them straight from the file). [`CodecError::TooLarge`] over [`MAX_RAW_LEN`].
pub fn encode_raw_prefix(
    id: u64,
    segment_base: u64,
    pos: u64,
    len: usize,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    if len > MAX_RAW_LEN {
        return Err(CodecError::TooLarge {
            len,
            max: MAX_RAW_LEN,
        });
    }
    // Bounded by MAX_FRAME_LEN, far below u32::MAX.
    let frame = (RAW_PREFIX - LEN_LEN + len) as u32;
    out.extend_from_slice(&frame.to_be_bytes());
    out.push(TAG_RAW);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&segment_base.to_be_bytes());
    out.extend_from_slice(&pos.to_be_bytes());
    Ok(())
}

/// Appends a batch frame holding an already built `Records` batch.
pub fn encode_batch(id: u64, records: &Records, out: &mut Vec<u8>) -> Result<(), CodecError> {
    put_frame(out, TAG_BATCH, |o| {
        o.extend_from_slice(&id.to_be_bytes());
        o.push(Records::TYPE.to_u8());
        let len = u32::try_from(records.body_len()).map_err(|_| CodecError::TooLarge {
            len: records.body_len(),
            max: MAX_FRAME_LEN,
        })?;
        o.extend_from_slice(&len.to_be_bytes());
        records.encode(o);
        Ok(())
    })
}

/// Appends a batch frame built straight from store records. `records` must be non-empty
/// with strictly increasing offsets, as [`Store::read`](crate::store::Store::read) returns
/// them; otherwise nothing is written and [`CodecError::InvalidBatch`] is returned.
pub fn encode_store_batch(
    id: u64,
    partition: u32,
    records: &[Record],
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let size: usize = records
        .iter()
        .map(|r| 8 + 8 + 8 + 8 + r.key.len() + r.payload.len())
        .sum();
    out.reserve(size.min(MAX_FRAME_LEN) + 64);
    let mut w = BatchWriter::begin(id, partition, out);
    for r in records {
        w.push(r.offset, r.timestamp_ms, &r.key, &r.payload)?;
    }
    w.finish()
}

/// Writes one batch frame record by record into `out` (the hub's read path: each record is
/// encoded once, straight from the bytes the store read, with no intermediate record).
///
/// [`begin`](Self::begin) writes the headers with placeholders, [`push`](Self::push) appends
/// a record, [`finish`](Self::finish) fills in the base offset, count and lengths. A writer
/// dropped without `finish`, or a failing `finish`, leaves `out` as it was.
#[derive(Debug)]
pub struct BatchWriter<'a> {
    out: &'a mut Vec<u8>,
    /// Where this frame starts in `out`.
    start: usize,
    base: u64,
    last: u64,
    count: u32,
    done: bool,
}

/// Link length, tag and request id, then the `Records` frame's type and body length.
const BATCH_PREFIX: usize = LEN_LEN + 1 + 8 + 1 + 4;
/// The `Records` body header: partition, base offset, count.
const RECORDS_HEADER: usize = 16;

impl<'a> BatchWriter<'a> {
    /// Starts the batch frame answering request `id` with records of `partition`.
    pub fn begin(id: u64, partition: u32, out: &'a mut Vec<u8>) -> Self {
        let start = out.len();
        out.extend_from_slice(&[0; LEN_LEN]);
        out.push(TAG_BATCH);
        out.extend_from_slice(&id.to_be_bytes());
        out.push(Records::TYPE.to_u8());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&partition.to_be_bytes());
        out.extend_from_slice(&[0; 12]);
        Self {
            out,
            start,
            base: 0,
            last: 0,
            count: 0,
            done: false,
        }
    }

    /// Records written so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Appends one record. Offsets must strictly increase ([`CodecError::InvalidBatch`]
    /// otherwise, and the record is not written).
    pub fn push(
        &mut self,
        offset: u64,
        timestamp_ms: u64,
        key: &[u8],
        payload: &[u8],
    ) -> Result<(), CodecError> {
        if self.count == 0 {
            self.base = offset;
        } else if offset <= self.last || self.count == u32::MAX {
            return Err(CodecError::InvalidBatch);
        }
        self.last = offset;
        self.count += 1;
        let o = &mut *self.out;
        put_varint(offset - self.base, o);
        o.extend_from_slice(&timestamp_ms.to_be_bytes());
        put_varint(key.len() as u64, o);
        o.extend_from_slice(key);
        put_varint(payload.len() as u64, o);
        o.extend_from_slice(payload);
        Ok(())
    }

    /// Completes the frame: [`CodecError::InvalidBatch`] if no record was pushed,
    /// [`CodecError::TooLarge`] over [`MAX_FRAME_LEN`]; on error `out` is restored.
    pub fn finish(mut self) -> Result<(), CodecError> {
        self.done = true;
        let start = self.start;
        let o = &mut *self.out;
        if self.count == 0 {
            o.truncate(start);
            return Err(CodecError::InvalidBatch);
        }
        let len = o.len() - start - LEN_LEN;
        if len > MAX_FRAME_LEN {
            o.truncate(start);
            return Err(CodecError::TooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        let body_len = o.len() - start - BATCH_PREFIX;
        // Both fit in u32: bounded by MAX_FRAME_LEN above.
        o[start..start + LEN_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        o[start + BATCH_PREFIX - 4..start + BATCH_PREFIX]
            .copy_from_slice(&(body_len as u32).to_be_bytes());
        let h = start + BATCH_PREFIX + 4;
        o[h..h + 8].copy_from_slice(&self.base.to_be_bytes());
        o[h + 8..h + RECORDS_HEADER - 4].copy_from_slice(&self.count.to_be_bytes());
        Ok(())
    }
}

impl Drop for BatchWriter<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.out.truncate(self.start);
        }
    }
}

/// The body length announced by the 4-byte header `header`, checked against `max`.
pub fn frame_len(header: [u8; 4], max: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(CodecError::Short);
    }
    Ok(len)
}

/// Splits the first frame off `buf`: `Ok(None)` when `buf` holds an incomplete frame (read
/// more), `Ok(Some((body, consumed)))` for a complete one, an error for an oversized one.
pub fn split_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, CodecError> {
    let Some(header) = buf.get(..LEN_LEN) else {
        return Ok(None);
    };
    let mut h = [0u8; LEN_LEN];
    h.copy_from_slice(header);
    let len = frame_len(h, max)?;
    Ok(buf
        .get(LEN_LEN..LEN_LEN + len)
        .map(|body| (body, LEN_LEN + len)))
}

/// A decoded shard → hub frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardMsg {
    /// A store request.
    Store(Request),
    /// A consumer-group message.
    Group(GroupMsg),
}

/// Decodes a frame body (tag included) the hub received.
pub fn decode_shard_msg(body: &[u8]) -> Result<ShardMsg, CodecError> {
    match body.split_first() {
        None => Err(CodecError::Short),
        Some((&TAG_REQUEST, rest)) => Ok(ShardMsg::Store(sibyl_proto::cbor::from_slice(rest)?)),
        Some((&TAG_GROUP, rest)) => Ok(ShardMsg::Group(group::decode_group_msg(rest)?)),
        Some((&tag, _)) => Err(CodecError::UnexpectedTag(tag)),
    }
}

/// Limits for batches on the link: bounded by the frame length alone.
fn link_limits() -> DecodeLimits {
    DecodeLimits {
        max_batch_payload: MAX_FRAME_LEN as u32,
        // Each record takes at least 11 bytes (delta, timestamp, two lengths).
        max_batch_records: (MAX_FRAME_LEN / 11) as u32,
        ..DecodeLimits::default()
    }
}

/// Decodes a frame body (tag included) the shard received (copies a batch's records; the
/// shard's link reader uses [`decode_server_msg_shared`]).
pub fn decode_server_msg(body: &[u8]) -> Result<ServerMsg, CodecError> {
    decode_server_msg_shared(&Bytes::copy_from_slice(body))
}

/// Decodes a frame body (tag included) the shard received; a batch's record section stays a
/// slice of `body` (no copy), so the shard forwards the bytes the hub wrote.
pub fn decode_server_msg_shared(body: &Bytes) -> Result<ServerMsg, CodecError> {
    match body.split_first() {
        None => Err(CodecError::Short),
        Some((&TAG_RESPONSE, rest)) => {
            Ok(ServerMsg::Response(sibyl_proto::cbor::from_slice(rest)?))
        }
        Some((&TAG_GROUP_PUSH, rest)) => Ok(ServerMsg::Group(group::decode_group_assign(rest)?)),
        Some((&TAG_RAW, rest)) => {
            let head = rest.get(..24).ok_or(CodecError::Short)?;
            let be = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&head[i..i + 8]);
                u64::from_be_bytes(b)
            };
            Ok(ServerMsg::Raw {
                id: be(0),
                segment_base: be(8),
                pos: be(16),
                data: body.slice(1 + 24..),
            })
        }
        Some((&TAG_BATCH, rest)) => {
            let (id, rest) = rest.split_at_checked(8).ok_or(CodecError::Short)?;
            let mut idb = [0u8; 8];
            idb.copy_from_slice(id);
            // `rest` is a whole client-facing frame: type, length, then exactly the body.
            let ty = Records::TYPE.to_u8();
            let (&tag, after) = rest.split_first().ok_or(CodecError::Short)?;
            if tag != ty {
                return Err(match FrameType::from_u8(tag) {
                    Some(_) => CodecError::UnexpectedTag(tag),
                    None => FrameError::UnknownType(tag).into(),
                });
            }
            let (len, frame_body) =
                after
                    .split_at_checked(4)
                    .ok_or_else(|| FrameError::Incomplete {
                        needed: 4 - after.len(),
                    })?;
            let mut lb = [0u8; 4];
            lb.copy_from_slice(len);
            let len = u32::from_be_bytes(lb) as usize;
            if len < frame_body.len() {
                return Err(FrameError::TrailingBytes { ty }.into());
            }
            if len > frame_body.len() {
                return Err(FrameError::Incomplete {
                    needed: len - frame_body.len(),
                }
                .into());
            }
            // Tag, id, type and length precede the body.
            let at = 1 + 8 + 1 + 4;
            let records = Records::decode_shared(&body.slice(at..), &link_limits())?;
            Ok(ServerMsg::Batch {
                id: u64::from_be_bytes(idb),
                records,
            })
        }
        Some((&tag, _)) => Err(CodecError::UnexpectedTag(tag)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::{MemberId, PartitionLoad};
    use proptest::prelude::*;
    use sibyl_proto::codec::Reader;
    use sibyl_proto::frame::Frame;

    fn rec(offset: u64, key: &[u8], payload: &[u8]) -> Record {
        Record {
            offset,
            timestamp_ms: 1_700_000_000_000 + offset,
            key: key.to_vec(),
            payload: payload.to_vec(),
        }
    }

    fn one_frame(buf: &[u8]) -> &[u8] {
        let (body, used) = split_frame(buf, MAX_FRAME_LEN).unwrap().unwrap();
        assert_eq!(used, buf.len());
        body
    }

    /// The store request in `body` (a group message is a test failure).
    fn decode_request(body: &[u8]) -> Result<Request, CodecError> {
        match decode_shard_msg(body)? {
            ShardMsg::Store(r) => Ok(r),
            ShardMsg::Group(g) => panic!("a group message: {g:?}"),
        }
    }

    fn load(partition: u32, records_per_s: u64, bytes_per_s: u64) -> PartitionLoad {
        PartitionLoad {
            partition,
            records_per_s,
            bytes_per_s,
        }
    }

    /// A frame of `msg` under `tag`, unchecked (what a misbehaving peer could send).
    fn put_cbor(tag: u8, msg: &impl Serialize, out: &mut Vec<u8>) {
        put_frame(out, tag, |o| {
            sibyl_proto::cbor::to_writer(msg, o).map_err(CodecError::from)
        })
        .unwrap();
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Streams { id: 1 },
            Request::Bounds {
                id: 2,
                stream: "s".into(),
                partition: 3,
            },
            Request::OffsetForTimestamp {
                id: 3,
                stream: "s".into(),
                partition: 0,
                ts_ms: 99,
            },
            Request::Read {
                id: u64::MAX,
                stream: "orders".into(),
                partition: 7,
                from: 1 << 40,
                max_records: 10,
                max_bytes: 1 << 20,
            },
            Request::WatchTail {
                id: 5,
                stream: "s".into(),
                partition: 1,
            },
            Request::Unwatch { watch: 5 },
        ]
    }

    fn all_group_msgs() -> Vec<GroupMsg> {
        vec![
            GroupMsg::Join {
                member: MemberId(9),
                stream: "s".into(),
                group: "g".into(),
                starts: vec![(0, 5), (1, 1 << 40)],
            },
            GroupMsg::Leave {
                member: MemberId(9),
            },
            GroupMsg::Position {
                member: MemberId(9),
                partition: 1,
                next_offset: 77,
                serving: true,
            },
            GroupMsg::Forecast {
                member: MemberId(9),
                loads: vec![load(0, 100, 100_000), load(3, 0, 0)],
            },
        ]
    }

    fn all_responses() -> Vec<Response> {
        vec![
            Response::Streams {
                id: 1,
                streams: vec![StreamInfo {
                    name: "a".into(),
                    partitions: 4,
                }],
            },
            Response::Bounds {
                id: 2,
                earliest: 3,
                next: 9,
            },
            Response::Offset { id: 3, offset: 4 },
            Response::ReadEmpty { id: 4, next: 10 },
            Response::Watching { id: 5, next: 11 },
            Response::Tail { watch: 5, next: 12 },
            Response::Error {
                id: 6,
                error: RemoteError::Corrupt {
                    offset: 7,
                    resume_at: Some(9),
                },
            },
            Response::Error {
                id: 7,
                error: RemoteError::OffsetOutOfRange {
                    requested: 1,
                    earliest: 2,
                    next: 3,
                },
            },
        ]
    }

    #[test]
    fn group_messages_are_bounded() {
        let long = "x".repeat(MAX_GROUP_NAME + 1);
        let too_many: Vec<(u32, u64)> = (0..=MAX_GROUP_PARTITIONS as u32).map(|p| (p, 0)).collect();
        let member = MemberId(1);
        let bad = [
            GroupMsg::Join {
                member,
                stream: long.clone(),
                group: "g".into(),
                starts: vec![],
            },
            GroupMsg::Join {
                member,
                stream: "s".into(),
                group: long,
                starts: vec![],
            },
            GroupMsg::Join {
                member,
                stream: "s".into(),
                group: "g".into(),
                starts: too_many.clone(),
            },
            GroupMsg::Forecast {
                member,
                loads: too_many.iter().map(|&(p, _)| load(p, 1, 1)).collect(),
            },
        ];
        for m in bad {
            let mut buf = Vec::new();
            assert!(matches!(
                group::encode_group_msg(&m, &mut buf),
                Err(CodecError::Limit(_))
            ));
            assert!(buf.is_empty());
            // A peer that encodes it anyway is refused at decode.
            put_cbor(TAG_GROUP, &m, &mut buf);
            let (body, _) = split_frame(&buf, MAX_REQUEST_LEN).unwrap().unwrap();
            assert!(
                matches!(decode_shard_msg(body), Err(CodecError::Limit(_))),
                "{m:?}"
            );
        }
        let mut buf = Vec::new();
        let push = GroupAssign {
            member,
            epoch: 1,
            partitions: too_many,
        };
        put_cbor(TAG_GROUP_PUSH, &push, &mut buf);
        assert!(matches!(
            decode_server_msg(one_frame(&buf)),
            Err(CodecError::Limit(_))
        ));
        // The largest legal join and forecast fit the request bound.
        let full = GroupMsg::Forecast {
            member: MemberId(u64::MAX),
            loads: (0..MAX_GROUP_PARTITIONS as u32)
                .map(|p| load(p, u64::MAX, u64::MAX))
                .collect(),
        };
        let mut buf = Vec::new();
        group::encode_group_msg(&full, &mut buf).unwrap();
        let (body, _) = split_frame(&buf, MAX_REQUEST_LEN).unwrap().unwrap();
        assert_eq!(decode_shard_msg(body).unwrap(), ShardMsg::Group(full));
    }

    #[test]
    fn every_message_round_trips() {
        for r in all_requests() {
            let mut buf = Vec::new();
            encode_request(&r, &mut buf).unwrap();
            assert_eq!(decode_request(one_frame(&buf)).unwrap(), r);
            // A shard never accepts its own requests.
            assert!(matches!(
                decode_server_msg(one_frame(&buf)),
                Err(CodecError::UnexpectedTag(TAG_REQUEST))
            ));
        }
        for m in all_group_msgs() {
            let mut buf = Vec::new();
            group::encode_group_msg(&m, &mut buf).unwrap();
            assert_eq!(
                decode_shard_msg(one_frame(&buf)).unwrap(),
                ShardMsg::Group(m)
            );
            assert!(matches!(
                decode_server_msg(one_frame(&buf)),
                Err(CodecError::UnexpectedTag(TAG_GROUP))
            ));
        }
        for r in all_responses() {
            let mut buf = Vec::new();
            encode_response(&r, &mut buf).unwrap();
            assert_eq!(
                decode_server_msg(one_frame(&buf)).unwrap(),
                ServerMsg::Response(r)
            );
            assert!(matches!(
                decode_shard_msg(one_frame(&buf)),
                Err(CodecError::UnexpectedTag(TAG_RESPONSE))
            ));
        }
        for push in [
            GroupAssign {
                member: MemberId(9),
                epoch: 2,
                partitions: vec![(0, 5), (2, 8)],
            },
            GroupAssign {
                member: MemberId(10),
                epoch: 1,
                partitions: vec![],
            },
        ] {
            let mut buf = Vec::new();
            group::encode_group_assign(&push, &mut buf).unwrap();
            assert_eq!(
                decode_server_msg(one_frame(&buf)).unwrap(),
                ServerMsg::Group(push)
            );
            assert!(matches!(
                decode_shard_msg(one_frame(&buf)),
                Err(CodecError::UnexpectedTag(TAG_GROUP_PUSH))
            ));
        }
    }

    #[test]
    fn store_batch_is_the_records_layout() {
        let recs = vec![
            rec(10, b"k", b"a"),
            rec(11, b"", &[7; 300]),
            rec(12, b"kk", b""),
        ];
        let mut direct = Vec::new();
        encode_store_batch(42, 3, &recs, &mut direct).unwrap();
        let built = Records::new(
            3,
            recs.iter().map(|r| sibyl_proto::frame::data::RecordRef {
                offset: r.offset,
                timestamp: r.timestamp_ms,
                key: &r.key,
                payload: &r.payload,
            }),
        )
        .unwrap();
        let mut via = Vec::new();
        encode_batch(42, &built, &mut via).unwrap();
        assert_eq!(direct, via);
        let ServerMsg::Batch { id, records } = decode_server_msg(one_frame(&direct)).unwrap()
        else {
            panic!("not a batch");
        };
        assert_eq!((id, &records), (42, &built));
        // The bytes after the id are a whole client-facing frame.
        let body = one_frame(&direct);
        let frame = Frame::decode_with_limits(&mut Reader::new(&body[9..]), &link_limits());
        assert_eq!(frame.unwrap(), Frame::Records(built));
    }

    #[test]
    fn batch_writer_leaves_out_untouched_unless_finished() {
        let mut out = vec![9, 9];
        {
            let mut w = BatchWriter::begin(1, 0, &mut out);
            w.push(5, 1, b"k", b"v").unwrap();
            assert_eq!(w.count(), 1);
            // Offsets must increase; the refused record is not written.
            assert!(matches!(
                w.push(5, 1, b"", b""),
                Err(CodecError::InvalidBatch)
            ));
        }
        assert_eq!(out, [9, 9]);
        assert!(matches!(
            BatchWriter::begin(1, 0, &mut out).finish(),
            Err(CodecError::InvalidBatch)
        ));
        assert_eq!(out, [9, 9]);
        let mut w = BatchWriter::begin(7, 4, &mut out);
        w.push(5, 1, b"k", b"v").unwrap();
        w.push(8, 2, b"", b"payload").unwrap();
        w.finish().unwrap();
        let ServerMsg::Batch { id, records } =
            decode_server_msg_shared(&Bytes::copy_from_slice(one_frame(&out[2..]))).unwrap()
        else {
            panic!("not a batch");
        };
        assert_eq!(id, 7);
        assert_eq!(
            records.to_records(),
            [(5, 1, &b"k"[..], &b"v"[..]), (8, 2, b"", b"payload")].map(
                |(offset, timestamp, key, payload)| sibyl_proto::frame::Record {
                    offset,
                    timestamp,
                    key: key.to_vec(),
                    payload: payload.to_vec(),
                }
            )
        );
    }

    #[test]
    fn shared_decode_keeps_the_records_in_the_frame_buffer() {
        let mut buf = Vec::new();
        encode_store_batch(3, 0, &[rec(1, b"k", &[1; 100])], &mut buf).unwrap();
        let body = Bytes::copy_from_slice(one_frame(&buf));
        let ServerMsg::Batch { records, .. } = decode_server_msg_shared(&body).unwrap() else {
            panic!("not a batch");
        };
        assert!(body.as_ptr_range().contains(&records.data().as_ptr()));
    }

    #[test]
    fn store_batch_refuses_misuse() {
        let mut out = vec![1, 2];
        assert!(matches!(
            encode_store_batch(1, 0, &[], &mut out),
            Err(CodecError::InvalidBatch)
        ));
        assert!(matches!(
            encode_store_batch(1, 0, &[rec(5, b"", b""), rec(5, b"", b"")], &mut out),
            Err(CodecError::InvalidBatch)
        ));
        assert_eq!(out, vec![1, 2], "nothing written on error");
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let mut buf = Vec::new();
        encode_request(&all_requests()[3], &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert!(
                split_frame(&buf[..cut], MAX_FRAME_LEN).unwrap().is_none(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn lengths_are_bounded_before_allocation() {
        let big = ((MAX_REQUEST_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            split_frame(&big, MAX_REQUEST_LEN),
            Err(CodecError::TooLarge { len, .. }) if len == MAX_REQUEST_LEN + 1
        ));
        assert!(matches!(
            frame_len(u32::MAX.to_be_bytes(), MAX_FRAME_LEN),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(matches!(
            frame_len([0; 4], MAX_FRAME_LEN),
            Err(CodecError::Short)
        ));
        // Encoding refuses what the peer would refuse.
        let huge = vec![rec(0, b"", &vec![0; MAX_FRAME_LEN])];
        let mut out = Vec::new();
        assert!(matches!(
            encode_store_batch(1, 0, &huge, &mut out),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(matches!(decode_request(&[]), Err(CodecError::Short)));
        assert!(matches!(
            decode_request(&[9, 1]),
            Err(CodecError::UnexpectedTag(9))
        ));
        assert!(matches!(
            decode_request(&[TAG_REQUEST, 0xff]),
            Err(CodecError::Cbor(_))
        ));
        assert!(matches!(
            decode_server_msg(&[TAG_BATCH, 0, 0]),
            Err(CodecError::Short)
        ));
        // A batch frame with trailing bytes, and a truncated one.
        let mut buf = Vec::new();
        encode_store_batch(1, 0, &[rec(0, b"k", b"v")], &mut buf).unwrap();
        let mut body = one_frame(&buf).to_vec();
        body.push(0);
        assert!(matches!(
            decode_server_msg(&body),
            Err(CodecError::Batch(_))
        ));
        body.truncate(body.len() - 2);
        assert!(matches!(
            decode_server_msg(&body),
            Err(CodecError::Batch(_))
        ));
        // A control frame in the batch slot.
        let mut b = vec![TAG_BATCH];
        b.extend_from_slice(&7u64.to_be_bytes());
        let open = sibyl_proto::frame::PartitionOpen {
            sub_id: 1,
            partition: 2,
            epoch: 3,
        };
        b.extend_from_slice(&Frame::from(open).to_vec());
        assert!(matches!(
            decode_server_msg(&b),
            Err(CodecError::UnexpectedTag(0x40))
        ));
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{0,20}"
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            any::<u64>().prop_map(|id| Request::Streams { id }),
            (any::<u64>(), arb_name(), any::<u32>()).prop_map(|(id, stream, partition)| {
                Request::Bounds {
                    id,
                    stream,
                    partition,
                }
            }),
            (any::<u64>(), arb_name(), any::<u32>(), any::<u64>()).prop_map(
                |(id, stream, partition, ts_ms)| Request::OffsetForTimestamp {
                    id,
                    stream,
                    partition,
                    ts_ms,
                }
            ),
            (
                any::<u64>(),
                arb_name(),
                any::<u32>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(id, stream, partition, from, max_records, max_bytes)| {
                    Request::Read {
                        id,
                        stream,
                        partition,
                        from,
                        max_records,
                        max_bytes,
                    }
                }),
            (any::<u64>(), arb_name(), any::<u32>()).prop_map(|(id, stream, partition)| {
                Request::WatchTail {
                    id,
                    stream,
                    partition,
                }
            }),
            any::<u64>().prop_map(|watch| Request::Unwatch { watch }),
        ]
    }

    fn arb_group_msg() -> impl Strategy<Value = GroupMsg> {
        let member = any::<u64>().prop_map(MemberId);
        prop_oneof![
            (
                member.clone(),
                arb_name(),
                arb_name(),
                proptest::collection::vec(any::<(u32, u64)>(), 0..8)
            )
                .prop_map(|(member, stream, group, starts)| GroupMsg::Join {
                    member,
                    stream,
                    group,
                    starts,
                }),
            member.clone().prop_map(|member| GroupMsg::Leave { member }),
            (member.clone(), any::<u32>(), any::<u64>(), any::<bool>()).prop_map(
                |(member, partition, next_offset, serving)| GroupMsg::Position {
                    member,
                    partition,
                    next_offset,
                    serving,
                }
            ),
            (
                member,
                proptest::collection::vec(any::<(u32, u64, u64)>(), 0..8)
            )
                .prop_map(|(member, loads)| GroupMsg::Forecast {
                    member,
                    loads: loads.into_iter().map(|(p, r, b)| load(p, r, b)).collect(),
                }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(reqs in proptest::collection::vec(arb_request(), 1..8)) {
            let mut buf = Vec::new();
            for r in &reqs {
                encode_request(r, &mut buf).unwrap();
            }
            let mut at = 0;
            for r in &reqs {
                let (body, used) = split_frame(&buf[at..], MAX_REQUEST_LEN).unwrap().unwrap();
                prop_assert_eq!(&decode_request(body).unwrap(), r);
                at += used;
            }
            prop_assert_eq!(at, buf.len());
        }

        #[test]
        fn group_messages_round_trip(msgs in proptest::collection::vec(arb_group_msg(), 1..8)) {
            let mut buf = Vec::new();
            for m in &msgs {
                group::encode_group_msg(m, &mut buf).unwrap();
            }
            let mut at = 0;
            for m in &msgs {
                let (body, used) = split_frame(&buf[at..], MAX_REQUEST_LEN).unwrap().unwrap();
                prop_assert_eq!(decode_shard_msg(body).unwrap(), ShardMsg::Group(m.clone()));
                at += used;
            }
            prop_assert_eq!(at, buf.len());
        }

        #[test]
        fn batches_round_trip(
            id in any::<u64>(),
            partition in any::<u32>(),
            base in 0u64..1 << 50,
            gaps in proptest::collection::vec(1u64..1000, 1..40),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut off = base;
            let recs: Vec<Record> = gaps.iter().map(|g| {
                let r = rec(off, &payload[..payload.len() / 3], &payload);
                off += g;
                r
            }).collect();
            let mut buf = Vec::new();
            encode_store_batch(id, partition, &recs, &mut buf).unwrap();
            let ServerMsg::Batch { id: got, records } = decode_server_msg(one_frame(&buf)).unwrap() else {
                panic!("not a batch");
            };
            prop_assert_eq!(got, id);
            prop_assert_eq!(records.partition(), partition);
            let back: Vec<_> = records.iter().map(|r| (r.offset, r.timestamp, r.key.to_vec(), r.payload.to_vec())).collect();
            let want: Vec<_> = recs.iter().map(|r| (r.offset, r.timestamp_ms, r.key.clone(), r.payload.clone())).collect();
            prop_assert_eq!(back, want);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = split_frame(&bytes, MAX_FRAME_LEN);
            let _ = decode_shard_msg(&bytes);
            let _ = decode_server_msg(&bytes);
            let mut b = vec![TAG_BATCH];
            b.extend_from_slice(&bytes);
            let _ = decode_server_msg(&b);
        }
    }
}
