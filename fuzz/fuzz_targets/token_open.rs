//! Arbitrary bytes → open never panics; accepted tokens re-seal and re-open to the same claims.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sibyl_tokens::fuzzing::token_open(data));
