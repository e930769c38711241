//! Arbitrary bytes as a hub↔shard IPC frame never panic; decoded messages round-trip.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sibyl_gateway::fuzzing::ipc_decode(data));
