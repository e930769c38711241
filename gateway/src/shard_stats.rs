//! [`ShardStats`]: the live counters of a shard process (bottom module: imports nothing of the
//! crate). The session layer writes them; the shard runtime reports them in every heartbeat.

use std::sync::atomic::AtomicU64;

/// Live counters the QUIC layer updates; reported in every heartbeat.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Open client connections.
    pub connections: AtomicU64,
    /// Active subscriptions.
    pub subscriptions: AtomicU64,
}
