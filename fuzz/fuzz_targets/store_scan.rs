//! Arbitrary bytes as a segment file: the recovery scan never panics and stays within them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sibyl_gateway::fuzzing::store_scan(data));
