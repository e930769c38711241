//! # sibyl-interop
//!
//! The cross-process interop suite, the userspace UDP impairment proxy (`sibyl-netem`) and the
//! benchmark scenarios (`sibyl-bench`).
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod bench;
pub mod netem;
pub mod progress;
pub mod runner;
