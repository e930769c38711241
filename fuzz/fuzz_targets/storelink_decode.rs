//! Arbitrary bytes as store-link frames never panic; decoded requests and responses round-trip.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sibyl_gateway::fuzzing::storelink_decode(data));
