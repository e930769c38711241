//! Arbitrary bytes, fed to the stream frame decoder in input-chosen chunks, never panic; every
//! frame decoded re-encodes and decodes to itself.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sibyl_proto::fuzzing::decode_frames(data));
