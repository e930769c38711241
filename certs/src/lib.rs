//! # sibyl-certs
//!
//! Development CA and leaf certificates, and the rustls configurations every Sibyl QUIC
//! endpoint uses (TLS 1.3, ALPN `sibyl/1`).
#![warn(missing_docs)]
#![forbid(unsafe_code)]
