//! Oracles for fuzz targets (feature `fuzzing` or `cfg(fuzzing)`), not a stable API.

use crate::codec::{Codec, DecodeLimits, Reader};
use crate::frame::{Frame, FrameDecoder};

/// Runs a [`FrameDecoder`] over arbitrary bytes (fed in chunks whose sizes are taken from the
/// input itself) and, for every frame decoded, checks `decode(encode(f)) == f` and that the
/// re-encoding decodes in one piece with nothing left over. Panics only if an oracle fails.
pub fn decode_frames(data: &[u8]) {
    let (chunk, data) = match data.split_first() {
        Some((c, rest)) => (usize::from(*c).max(1), rest),
        None => return,
    };
    let limits = DecodeLimits::default();
    let mut dec = FrameDecoder::new(limits);
    for piece in data.chunks(chunk) {
        dec.push(piece);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => check_round_trip(&f, &limits),
                Ok(None) => break,
                Err(e) => {
                    assert!(!e.is_incomplete(), "decoder surfaced Incomplete");
                    let _ = e.code();
                    return;
                }
            }
        }
    }
    let _ = dec.finish();
}

fn check_round_trip(f: &Frame, limits: &DecodeLimits) {
    let mut out = Vec::new();
    f.encode(&mut out);
    let mut r = Reader::new(&out);
    let g = Frame::decode_with_limits(&mut r, limits).expect("re-encoded frame must decode");
    assert_eq!(&g, f, "decode(encode(f)) != f");
    assert_eq!(r.remaining(), 0, "re-encoded frame left bytes");
}
