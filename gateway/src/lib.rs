//! # sibyl-gateway
//!
//! The edge gateway: the hub (admission, tickets, supervision of shard processes), the shard
//! processes ("streamlets") that serve subscriptions, and the embedded store.
#![warn(missing_docs)]
