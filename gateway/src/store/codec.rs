//! On-disk record frames: encoding, decoding and the recovery scan. No I/O.
//!
//! A frame is, little-endian:
//!
//! ```text
//! body_len u32 | crc32c(body) u32 | body = offset u64 | timestamp_ms u64 | key_len u32 | key | payload
//! ```
//!
//! The first record of a batch appended for an idempotent producer carries a **producer
//! mark**: bit 31 of `key_len` is set, and the key is followed by
//! `producer u64 | seq u64 | count u32 | written_ms u64` ([`MARK_LEN`] bytes) before the
//! payload. `count` is the number of records of the batch (this one and the `count - 1`
//! following); recovery rebuilds the producers' dedup state from the marks and drops a batch
//! whose records are not all there ([`scan_segment`]). Keys are far shorter than 2³¹ bytes, so
//! segments written before marks existed decode unchanged.
//!
//! `body_len` is bounded by [`MAX_BODY_LEN`] before anything is trusted, so a corrupt length can
//! never cause a large allocation or an out-of-bounds slice.

use super::index::SparseIndex;

/// Bytes before the body: `body_len` and the CRC.
pub(crate) const HEADER_LEN: usize = 8;
/// Fixed part of the body: offset, timestamp, key length.
pub(crate) const FIXED_BODY_LEN: usize = 20;
/// Hard upper bound of a frame body, whatever the configured limits (they are validated to
/// fit under it), so that records written under a larger limit still decode.
pub(crate) const MAX_BODY_LEN: usize = 256 << 20;

/// Bit of `key_len` saying that a producer mark follows the key.
const MARK_FLAG: u32 = 1 << 31;
/// Encoded length of a producer mark.
pub(crate) const MARK_LEN: usize = 28;

/// The producer mark on the first record of an idempotent batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProducerMark {
    /// Producer id the hub issued.
    pub(crate) producer: u64,
    /// The batch's `Produce.seq`.
    pub(crate) seq: u64,
    /// Records in the batch (≥ 1), this one included.
    pub(crate) count: u32,
    /// Hub clock when the batch was written, ms since the Unix epoch (idle expiry).
    pub(crate) written_ms: u64,
}

/// Total encoded size of one record (without a producer mark).
pub(crate) fn frame_len(key_len: usize, payload_len: usize) -> usize {
    HEADER_LEN + FIXED_BODY_LEN + key_len + payload_len
}

/// The whole frame length announced by a frame's first [`HEADER_LEN`] bytes, `None` when the
/// body length is out of bounds (nothing else is checked: the CRC covers the body).
pub(crate) fn frame_len_from_header(head: &[u8; HEADER_LEN]) -> Option<usize> {
    let body_len = u32_at(head, 0) as usize;
    (FIXED_BODY_LEN..=MAX_BODY_LEN)
        .contains(&body_len)
        .then_some(HEADER_LEN + body_len)
}

/// Appends one encoded frame to `out`.
///
/// The caller has checked `key.len() + payload.len() + FIXED_BODY_LEN <= MAX_BODY_LEN`.
#[cfg(any(test, fuzzing, feature = "fuzzing"))]
pub(crate) fn encode_frame(
    out: &mut Vec<u8>,
    offset: u64,
    timestamp_ms: u64,
    key: &[u8],
    payload: &[u8],
) {
    encode_marked(out, offset, timestamp_ms, key, payload, None);
}

/// [`encode_frame`] with an optional producer mark (the first record of an idempotent batch).
///
/// The caller has checked `key.len() + payload.len() + FIXED_BODY_LEN + MARK_LEN <=
/// MAX_BODY_LEN` (the store's limits are validated to leave room for it).
pub(crate) fn encode_marked(
    out: &mut Vec<u8>,
    offset: u64,
    timestamp_ms: u64,
    key: &[u8],
    payload: &[u8],
    mark: Option<&ProducerMark>,
) {
    let mark_len = if mark.is_some() { MARK_LEN } else { 0 };
    let body_len = FIXED_BODY_LEN + key.len() + mark_len + payload.len();
    debug_assert!(body_len <= MAX_BODY_LEN);
    let start = out.len();
    // Both casts are lossless: body_len <= MAX_BODY_LEN < 2^31 and key.len() <= body_len.
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    let flag = if mark.is_some() { MARK_FLAG } else { 0 };
    out.extend_from_slice(&(key.len() as u32 | flag).to_le_bytes());
    out.extend_from_slice(key);
    if let Some(m) = mark {
        out.extend_from_slice(&m.producer.to_le_bytes());
        out.extend_from_slice(&m.seq.to_le_bytes());
        out.extend_from_slice(&m.count.to_le_bytes());
        out.extend_from_slice(&m.written_ms.to_le_bytes());
    }
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + HEADER_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A decoded frame borrowing its key and payload from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameRef<'a> {
    pub(crate) offset: u64,
    pub(crate) timestamp_ms: u64,
    pub(crate) key: &'a [u8],
    pub(crate) payload: &'a [u8],
    /// The producer mark, on the first record of an idempotent batch.
    pub(crate) mark: Option<ProducerMark>,
    /// Encoded length of the whole frame, header included.
    pub(crate) len: usize,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// `body_len` below the fixed part or above [`MAX_BODY_LEN`].
    Length,
    /// The CRC does not match the body.
    Crc,
    /// `key_len` (with the producer mark it announces) does not fit in the body, or the mark
    /// says the batch has no record.
    KeyLength,
}

/// Result of decoding at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decode<'a> {
    /// A complete frame with a valid CRC.
    Frame(FrameRef<'a>),
    /// The buffer ends before the frame does; `needed` is the whole frame length when known.
    Incomplete {
        /// Total frame length, once the length field is readable and plausible.
        needed: Option<usize>,
    },
    /// The bytes are not a valid frame.
    Invalid(Invalid),
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Decodes the frame at the start of `buf`, verifying its CRC.
pub(crate) fn decode_frame(buf: &[u8]) -> Decode<'_> {
    if buf.len() < HEADER_LEN {
        return Decode::Incomplete { needed: None };
    }
    let body_len = u32_at(buf, 0) as usize;
    if !(FIXED_BODY_LEN..=MAX_BODY_LEN).contains(&body_len) {
        return Decode::Invalid(Invalid::Length);
    }
    let total = HEADER_LEN + body_len;
    if buf.len() < total {
        return Decode::Incomplete {
            needed: Some(total),
        };
    }
    let body = &buf[HEADER_LEN..total];
    if crc32c::crc32c(body) != u32_at(buf, 4) {
        return Decode::Invalid(Invalid::Crc);
    }
    let raw_key_len = u32_at(body, 16);
    let key_len = (raw_key_len & !MARK_FLAG) as usize;
    let marked = raw_key_len & MARK_FLAG != 0;
    let mark_len = if marked { MARK_LEN } else { 0 };
    if key_len + mark_len > body_len - FIXED_BODY_LEN {
        return Decode::Invalid(Invalid::KeyLength);
    }
    let key_end = FIXED_BODY_LEN + key_len;
    let mark = if marked {
        let m = ProducerMark {
            producer: u64_at(body, key_end),
            seq: u64_at(body, key_end + 8),
            count: u32_at(body, key_end + 16),
            written_ms: u64_at(body, key_end + 20),
        };
        if m.count == 0 {
            return Decode::Invalid(Invalid::KeyLength);
        }
        Some(m)
    } else {
        None
    };
    Decode::Frame(FrameRef {
        offset: u64_at(body, 0),
        timestamp_ms: u64_at(body, 8),
        key: &body[FIXED_BODY_LEN..key_end],
        payload: &body[key_end + mark_len..],
        mark,
        len: total,
    })
}

/// A corrupt region found by the recovery scan: bytes `[pos, end_pos)` of the segment hold no
/// servable record, and offsets `[first_offset, next_offset)` are lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hole {
    pub(crate) pos: u64,
    pub(crate) end_pos: u64,
    pub(crate) first_offset: u64,
    pub(crate) next_offset: u64,
}

/// What the recovery scan learnt about one segment's bytes.
#[derive(Debug)]
pub(crate) struct SegmentScan {
    /// Bytes to keep; everything after is a torn tail to truncate.
    pub(crate) valid_len: u64,
    /// One past the last valid record's offset (the base offset for an empty segment).
    pub(crate) next_offset: u64,
    /// Corrupt regions in the middle of the segment, in file order.
    pub(crate) holes: Vec<Hole>,
    /// The rebuilt sparse index (also tracks the timestamps).
    pub(crate) index: SparseIndex,
    /// Number of valid records.
    pub(crate) records: u64,
    /// Producer marks with the offset of the record carrying each, in file order. Every
    /// marked batch is whole: a last batch whose records are not all there was cut off
    /// (it is part of the torn tail).
    pub(crate) marks: Vec<(ProducerMark, u64)>,
}

impl SegmentScan {
    /// Bytes dropped from the tail.
    pub(crate) fn torn_bytes(&self, file_len: u64) -> u64 {
        file_len - self.valid_len
    }
}

/// Scans a whole segment: verifies every CRC and offset, finds corrupt regions followed by
/// valid records (holes) and the torn tail (anything after the last valid record that no
/// valid record follows), rebuilds the sparse index and collects the producer marks.
///
/// A batch is written with one write, so only the last one can be cut short (a crash during
/// the write): when the last marked batch has fewer records than its mark says, the torn tail
/// starts at its first record. Those records were never acknowledged, and keeping them would
/// let a re-send of the batch (which the dedup state would not know) append them again.
pub(crate) fn scan_segment(buf: &[u8], base_offset: u64, index_interval: u32) -> SegmentScan {
    let mut scan = scan_frames(buf, base_offset, index_interval);
    while let Some(&(m, at, pos)) = scan.1.last() {
        if at.saturating_add(u64::from(m.count)) <= scan.0.next_offset {
            break;
        }
        // Rescan the prefix before the cut batch (rare: only after a crash mid-write).
        scan = scan_frames(&buf[..pos], base_offset, index_interval);
    }
    let (mut s, marks) = scan;
    s.marks = marks.into_iter().map(|(m, at, _)| (m, at)).collect();
    s
}

/// The scan proper; marks come with the byte position of their record.
#[allow(clippy::type_complexity)]
fn scan_frames(
    buf: &[u8],
    base_offset: u64,
    index_interval: u32,
) -> (SegmentScan, Vec<(ProducerMark, u64, usize)>) {
    let mut index = SparseIndex::new(index_interval);
    let mut holes = Vec::new();
    let mut marks = Vec::new();
    let mut pos = 0usize;
    let mut expected = base_offset;
    let mut records = 0u64;
    while pos < buf.len() {
        match decode_frame(&buf[pos..]) {
            Decode::Frame(f) if f.offset == expected => {
                if let Some(m) = f.mark {
                    marks.push((m, f.offset, pos));
                }
                index.on_append(f.offset, pos as u64, f.len as u64, f.timestamp_ms);
                pos += f.len;
                expected += 1;
                records += 1;
            }
            Decode::Frame(f) if f.offset > expected => {
                // A valid frame further on than expected: offsets are missing, no bytes are.
                holes.push(Hole {
                    pos: pos as u64,
                    end_pos: pos as u64,
                    first_offset: expected,
                    next_offset: f.offset,
                });
                expected = f.offset;
            }
            other => match resync(buf, pos, expected, other) {
                Some((q, next)) => {
                    holes.push(Hole {
                        pos: pos as u64,
                        end_pos: q as u64,
                        first_offset: expected,
                        next_offset: next,
                    });
                    pos = q;
                    expected = next;
                }
                None => break,
            },
        }
    }
    let scan = SegmentScan {
        valid_len: pos as u64,
        next_offset: expected,
        holes,
        index,
        records,
        marks: Vec::new(),
    };
    (scan, marks)
}

/// Is there a valid frame at `q` with offset `>= expected`, confirmed by what follows it
/// (end of buffer, a torn tail, or the next offset)? Returns its offset. The confirmation keeps
/// the byte-by-byte scan from mistaking a frame-shaped payload for a record.
fn confirmed_frame_at(buf: &[u8], q: usize, expected: u64) -> Option<u64> {
    let Decode::Frame(f) = decode_frame(&buf[q..]) else {
        return None;
    };
    if f.offset < expected {
        return None;
    }
    let after = q + f.len;
    match decode_frame(&buf[after..]) {
        Decode::Frame(g) if g.offset == f.offset + 1 => Some(f.offset),
        Decode::Incomplete { .. } => Some(f.offset),
        _ => None,
    }
}

/// After an undecodable frame at `pos`, finds the next valid frame: first where the length
/// field says the next frame starts (a corrupt payload with an intact length), then byte by
/// byte. `None` means nothing valid follows: a torn tail.
fn resync(buf: &[u8], pos: usize, expected: u64, at_pos: Decode<'_>) -> Option<(usize, u64)> {
    if let Decode::Invalid(Invalid::Crc | Invalid::KeyLength) = at_pos {
        // The length field passed its bounds check; try the boundary it names.
        let q = pos + HEADER_LEN + u32_at(buf, pos) as usize;
        if q < buf.len()
            && let Decode::Frame(f) = decode_frame(&buf[q..])
            && f.offset >= expected
        {
            return Some((q, f.offset));
        }
    }
    (pos + 1..buf.len().saturating_sub(HEADER_LEN + FIXED_BODY_LEN - 1))
        .find_map(|q| confirmed_frame_at(buf, q, expected).map(|off| (q, off)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(base: u64, n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut starts = Vec::new();
        for i in 0..n {
            starts.push(out.len());
            let payload = vec![i as u8; 10 + i as usize];
            encode_frame(&mut out, base + i, 1000 + i, b"k", &payload);
        }
        (out, starts)
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 7, 99, b"key", b"payload");
        assert_eq!(buf.len(), frame_len(3, 7));
        let Decode::Frame(f) = decode_frame(&buf) else {
            panic!("not a frame")
        };
        assert_eq!(
            (f.offset, f.timestamp_ms, f.key, f.payload, f.len),
            (7, 99, &b"key"[..], &b"payload"[..], buf.len())
        );
    }

    #[test]
    fn incomplete_and_invalid() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 0, 0, b"", b"abc");
        assert_eq!(decode_frame(&buf[..3]), Decode::Incomplete { needed: None });
        assert_eq!(
            decode_frame(&buf[..10]),
            Decode::Incomplete {
                needed: Some(buf.len())
            }
        );
        let mut bad = buf.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(decode_frame(&bad), Decode::Invalid(Invalid::Crc));
        let mut bad = buf.clone();
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_frame(&bad), Decode::Invalid(Invalid::Length));
        bad[0..4].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(decode_frame(&bad), Decode::Invalid(Invalid::Length));
    }

    #[test]
    fn scan_clean_and_torn() {
        let (buf, starts) = log(10, 5);
        let s = scan_segment(&buf, 10, 16);
        assert_eq!(
            (s.valid_len, s.next_offset, s.records),
            (buf.len() as u64, 15, 5)
        );
        assert!(s.holes.is_empty());
        // Cut mid-record.
        let cut = starts[4] + 5;
        let s = scan_segment(&buf[..cut], 10, 16);
        assert_eq!((s.valid_len, s.next_offset), (starts[4] as u64, 14));
        // Garbage appended.
        let mut g = buf.clone();
        g.extend_from_slice(&[0xAB; 37]);
        let s = scan_segment(&g, 10, 16);
        assert_eq!(
            (s.valid_len, s.next_offset, s.holes.len()),
            (buf.len() as u64, 15, 0)
        );
        // Bad CRC on the very last record is a torn tail too.
        let mut t = buf.clone();
        *t.last_mut().unwrap() ^= 0xFF;
        let s = scan_segment(&t, 10, 16);
        assert_eq!((s.valid_len, s.next_offset), (starts[4] as u64, 14));
    }

    #[test]
    fn scan_finds_middle_corruption() {
        let (buf, starts) = log(0, 6);
        // Payload byte of record 2.
        let mut b = buf.clone();
        b[starts[3] - 1] ^= 0x55;
        let s = scan_segment(&b, 0, 16);
        assert_eq!(s.next_offset, 6);
        assert_eq!(s.valid_len, buf.len() as u64);
        assert_eq!(s.records, 5);
        assert_eq!(
            s.holes,
            vec![Hole {
                pos: starts[2] as u64,
                end_pos: starts[3] as u64,
                first_offset: 2,
                next_offset: 3
            }]
        );
        // Length field of record 2: found again by the byte scan.
        let mut b = buf.clone();
        b[starts[2]] ^= 0x40;
        let s = scan_segment(&b, 0, 16);
        assert_eq!((s.next_offset, s.records), (6, 5));
        assert_eq!(s.holes.len(), 1);
        assert_eq!((s.holes[0].first_offset, s.holes[0].next_offset), (2, 3));
    }

    fn mark(seq: u64, count: u32) -> ProducerMark {
        ProducerMark {
            producer: 9,
            seq,
            count,
            written_ms: 77,
        }
    }

    #[test]
    fn marked_frames_round_trip_and_old_frames_decode_unchanged() {
        let m = mark(3, 2);
        let mut buf = Vec::new();
        encode_marked(&mut buf, 5, 6, b"key", b"payload", Some(&m));
        assert_eq!(buf.len(), frame_len(3, 7) + MARK_LEN);
        let Decode::Frame(f) = decode_frame(&buf) else {
            panic!("not a frame")
        };
        assert_eq!(
            (f.key, f.payload, f.mark),
            (&b"key"[..], &b"payload"[..], Some(m))
        );
        let mut plain = Vec::new();
        encode_frame(&mut plain, 5, 6, b"key", b"payload");
        let Decode::Frame(f) = decode_frame(&plain) else {
            panic!("not a frame")
        };
        assert_eq!(f.mark, None);
        // A mark that does not fit, or says zero records, is not a frame.
        let mut short = Vec::new();
        encode_marked(&mut short, 0, 0, b"", b"", Some(&mark(1, 0)));
        assert_eq!(decode_frame(&short), Decode::Invalid(Invalid::KeyLength));
        let mut bad = Vec::new();
        encode_frame(&mut bad, 0, 0, b"k", b"0123456789");
        bad[HEADER_LEN + 16..HEADER_LEN + 20].copy_from_slice(&(1u32 | MARK_FLAG).to_le_bytes());
        let crc = crc32c::crc32c(&bad[HEADER_LEN..]);
        bad[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_frame(&bad), Decode::Invalid(Invalid::KeyLength));
    }

    #[test]
    fn scan_collects_marks_and_cuts_a_partial_last_batch() {
        // Batch seq 1: offsets 0..2; batch seq 2: offsets 2..5, only 2 of its 3 records written.
        let mut buf = Vec::new();
        encode_marked(&mut buf, 0, 1, b"", b"a", Some(&mark(1, 2)));
        encode_frame(&mut buf, 1, 1, b"", b"b");
        let cut_at = buf.len();
        encode_marked(&mut buf, 2, 1, b"", b"c", Some(&mark(2, 3)));
        encode_frame(&mut buf, 3, 1, b"", b"d");
        let whole = scan_segment(&buf, 0, 16);
        assert_eq!((whole.valid_len, whole.next_offset), (cut_at as u64, 2));
        assert_eq!(whole.marks, vec![(mark(1, 2), 0)]);
        assert_eq!(whole.records, 2);
        encode_frame(&mut buf, 4, 1, b"", b"e");
        let s = scan_segment(&buf, 0, 16);
        assert_eq!((s.valid_len, s.next_offset), (buf.len() as u64, 5));
        assert_eq!(s.marks, vec![(mark(1, 2), 0), (mark(2, 3), 2)]);
    }

    #[test]
    fn index_rebuilt_by_scan() {
        let (buf, starts) = log(0, 20);
        let s = scan_segment(&buf, 0, 64);
        let e = s.index.lookup_offset(15).expect("entries every 64 bytes");
        assert!(e.offset <= 15);
        assert_eq!(e.pos, starts[e.offset as usize] as u64);
    }
}
