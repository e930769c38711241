//! Oracles for fuzz targets (feature `fuzzing` or `cfg(fuzzing)`), not a stable API.

use crate::codec::{Codec, DecodeLimits, Reader};
use crate::frame::{Frame, FrameDecoder, FrameType, inbound};

/// Runs a [`FrameDecoder`] over arbitrary bytes (fed in chunks whose sizes are taken from the
/// input itself; the first byte's top bits pick the stream kind: any type, or one of the
/// [`inbound`] sets) and, for every frame decoded, checks that its type is one the stream
/// carries, `decode(encode(f)) == f` and that the re-encoding decodes in one piece with
/// nothing left over. Panics only if an oracle fails.
pub fn decode_frames(data: &[u8]) {
    let (first, data) = match data.split_first() {
        Some((c, rest)) => (*c, rest),
        None => return,
    };
    let chunk = usize::from(first & 0x3f).max(1) * usize::from(1 + (first >> 6));
    let allowed: Option<&'static [FrameType]> = match first >> 5 {
        1 => Some(inbound::HUB_STREAM),
        2 => Some(inbound::PUBLISH_STREAM),
        3 => Some(inbound::SESSION_STREAM),
        4 => Some(inbound::CONTROL_STREAM),
        _ => None,
    };
    let limits = DecodeLimits::default();
    let mut dec = match allowed {
        Some(a) => FrameDecoder::accepting(limits, a),
        None => FrameDecoder::new(limits),
    };
    for piece in data.chunks(chunk) {
        dec.push(piece);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    assert!(
                        allowed.is_none_or(|a| a.contains(&f.frame_type())),
                        "decoded a {:?} on a stream that does not carry it",
                        f.frame_type()
                    );
                    check_round_trip(&f, &limits)
                }
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
