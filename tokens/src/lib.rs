//! # sibyl-tokens
//!
//! Access tokens the hub seals and shards open: CBOR claims sealed with XChaCha20-Poly1305
//! under a rotating keyring.
#![warn(missing_docs)]
#![forbid(unsafe_code)]
