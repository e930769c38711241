//! Structured arbitrary claims → seal → open → equal.
#![no_main]

use sibyl_tokens::Claims;

libfuzzer_sys::fuzz_target!(|claims: Claims| sibyl_tokens::fuzzing::claims_roundtrip(&claims));
