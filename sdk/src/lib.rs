//! # sibyl-sdk
//!
//! The Rust client SDK: `Client` (hub → ticket → shard, with failover), `Publisher` and
//! `Subscription`. The protocol logic lives in `sibyl-proto`; this crate is the async driver
//! over quinn and tokio.
#![warn(missing_docs)]
#![forbid(unsafe_code)]
