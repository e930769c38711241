//! Arbitrary text → parse never panics; accepted text is canonical and its bytes are opened.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sibyl_tokens::fuzzing::token_text(data));
