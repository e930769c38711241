//! The shard's half of a raw read (I/O-free): segment bytes from the hub → a checked
//! `Records` batch.
//!
//! The hub answers a [`Request::ReadRaw`](super::Request::ReadRaw) with a range of a segment
//! file as it lies on disk, sent with `sendfile` so the hub never copies it (the verifying
//! `Read` costs the hub a `pread` copy, a CRC pass, an encode copy and a socket copy per
//! byte). The shard, which copies the bytes out of the socket anyway, does the checks here:
//!
//! - every frame is decoded with the store's own decoder, which verifies its CRC and bounds
//!   its length;
//! - frames before `from` (the range starts at the hub's sparse index entry) are skipped, the
//!   first record taken must be `from` itself and every next one the offset after it;
//! - a frame cut by the end of the range ends the batch, and the position of that frame
//!   becomes the hint of the next read.
//!
//! Anything else (a CRC mismatch, a gap, bytes that are no frame) ends the batch at the last
//! good record; with no good record at all the caller asks again with a verifying `Read`, so
//! a damaged record reaches the shard as the hub's `Corrupt` error, exactly as without raw
//! reads.

use bytes::Bytes;
use sibyl_proto::frame::data::Records;

use super::codec::{self, BatchWriter, ServerMsg};
use crate::store::{Decode, decode_frame};

/// Where a raw read ended: the next record's offset and the segment position of its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHint {
    /// Offset of the next record.
    pub next: u64,
    /// First offset of the segment holding it.
    pub segment_base: u64,
    /// Position of its frame in that segment file.
    pub pos: u64,
}

/// Why segment bytes gave no record (the caller falls back to a verifying read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RawProblem {
    /// The bytes hold no whole frame at or after `from`.
    #[error("no whole record from the requested offset")]
    NoRecord,
    /// A frame does not decode (length, CRC or key length).
    #[error("a frame does not decode")]
    Invalid,
    /// The first record after the skipped ones is not the requested offset.
    #[error("the records do not start at the requested offset")]
    Gap,
}

/// Decodes the segment bytes `data` (starting at `pos` of segment `segment_base`) into a
/// batch of the records `from, from + 1, …` of `partition`, at most `max_records` of them.
/// Returns the batch and where the next read continues.
pub fn decode_raw(
    partition: u32,
    from: u64,
    max_records: u32,
    segment_base: u64,
    pos: u64,
    data: &[u8],
) -> Result<(Records, RawHint), RawProblem> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut w = BatchWriter::begin(0, partition, &mut out);
    let mut at = 0usize;
    let mut next = from;
    let mut problem = RawProblem::NoRecord;
    while w.count() < max_records.max(1) {
        let fr = match decode_frame(&data[at..]) {
            Decode::Frame(fr) => fr,
            Decode::Incomplete { .. } => break,
            Decode::Invalid(_) => {
                problem = RawProblem::Invalid;
                break;
            }
        };
        if fr.offset < next && w.count() == 0 {
            // Before `from`: the range started at the index entry.
            at += fr.len;
            continue;
        }
        if fr.offset != next {
            problem = RawProblem::Gap;
            break;
        }
        if next == u64::MAX {
            // No offset after it: not a record a store writes.
            problem = RawProblem::Invalid;
            break;
        }
        if w.push(fr.offset, fr.timestamp_ms, fr.key, fr.payload)
            .is_err()
        {
            problem = RawProblem::Invalid;
            break;
        }
        at += fr.len;
        next += 1;
    }
    if w.count() == 0 {
        return Err(problem);
    }
    w.finish().map_err(|_| RawProblem::Invalid)?;
    // `out` is a whole link batch frame: strip the length and decode it like one from the hub.
    let frame = Bytes::from(out).slice(4..);
    let Ok(ServerMsg::Batch { records, .. }) = codec::decode_server_msg_shared(&frame) else {
        return Err(RawProblem::Invalid);
    };
    Ok((
        records,
        RawHint {
            next,
            segment_base,
            pos: pos.saturating_add(at as u64),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(from: u64, n: u64, payload: usize) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for o in from..from + n {
            crate::store::fuzz_encode_record(&mut out, o, 1000 + o, b"k", &vec![o as u8; payload]);
            ends.push(out.len());
        }
        (out, ends)
    }

    #[test]
    fn whole_frames_become_a_batch_and_a_cut_frame_the_hint() {
        let (data, ends) = frames(10, 5, 100);
        // Cut the last frame in half.
        let cut = ends[3] + (ends[4] - ends[3]) / 2;
        let (records, hint) = decode_raw(3, 10, 100, 7, 4096, &data[..cut]).unwrap();
        assert_eq!(records.partition(), 3);
        assert_eq!(records.base_offset(), 10);
        let got: Vec<_> = records.iter().map(|r| (r.offset, r.timestamp)).collect();
        assert_eq!(got, vec![(10, 1010), (11, 1011), (12, 1012), (13, 1013)]);
        assert!(
            records
                .iter()
                .all(|r| r.key == b"k" && r.payload.len() == 100)
        );
        assert_eq!(
            hint,
            RawHint {
                next: 14,
                segment_base: 7,
                pos: 4096 + ends[3] as u64
            }
        );
    }

    #[test]
    fn frames_before_from_are_skipped_and_max_records_bounds_the_batch() {
        let (data, ends) = frames(0, 10, 10);
        let (records, hint) = decode_raw(0, 4, 3, 0, 0, &data).unwrap();
        let offsets: Vec<_> = records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![4, 5, 6]);
        assert_eq!(hint.next, 7);
        assert_eq!(hint.pos, ends[6] as u64);
    }

    #[test]
    fn damage_ends_the_batch_and_a_damaged_first_record_is_a_problem() {
        let (mut data, ends) = frames(0, 4, 50);
        // Flip a payload byte of record 2: its CRC no longer matches.
        data[ends[2] - 1] ^= 0xff;
        let (records, hint) = decode_raw(0, 0, 100, 0, 0, &data).unwrap();
        assert_eq!(
            records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(hint.next, 2);
        assert_eq!(
            decode_raw(0, 2, 100, 0, ends[1] as u64, &data[ends[1]..]),
            Err(RawProblem::Invalid)
        );
    }

    #[test]
    fn a_gap_a_cut_first_frame_and_garbage_are_problems() {
        let (data, ends) = frames(5, 3, 20);
        // Asked for 4, the range starts at 5: a record is missing.
        assert_eq!(decode_raw(0, 4, 10, 0, 0, &data), Err(RawProblem::Gap));
        // Only part of the first frame.
        assert_eq!(
            decode_raw(0, 5, 10, 0, 0, &data[..ends[0] - 1]),
            Err(RawProblem::NoRecord)
        );
        // Asked past everything in the range.
        assert_eq!(decode_raw(0, 9, 10, 0, 0, &data), Err(RawProblem::NoRecord));
        assert_eq!(
            decode_raw(0, 0, 10, 0, 0, &[0xff; 64]),
            Err(RawProblem::Invalid)
        );
        assert_eq!(decode_raw(0, 0, 10, 0, 0, &[]), Err(RawProblem::NoRecord));
    }
}
