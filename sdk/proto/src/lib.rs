//! # sibyl-proto
//!
//! The Sibyl wire protocol and the I/O-free machines shared by clients and servers. This crate
//! depends on neither tokio nor quinn, as quinn-proto sits under quinn: everything here takes
//! bytes and `now` in and gives bytes, decisions and deadlines out.
//!
//! - [`cbor`]: the single CBOR codec module every crate goes through.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod cbor;
