//! Identifiers shared across the gateway's layers (bottom module: imports nothing of the
//! crate), so the supervisor, the limits and the hub can name a shard without importing each
//! other.

/// A shard slot: its group and index within the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId {
    /// Shard-group id.
    pub group: u32,
    /// Index within the group (0-based).
    pub index: u32,
}

impl std::fmt::Display for ShardId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "group={} shard={}", self.group, self.index)
    }
}
