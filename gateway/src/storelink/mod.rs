//! The store link: how shard processes read the hub's embedded store.
//!
//! ```text
//!  hub process                                  shard process
//!  Store ◀─ spawn_blocking ─ StoreLinkServer ◀══ Unix socket ══▶ StoreLink ◀─ CachedReader ◀─ subscriptions
//!   │ subscribe_tail           (one task per    u32 len | tag | body   (multiplexed,   │ ShardCache:
//!   └──────── Tail pushes ──── shard link)      requests: CBOR           reconnecting)  │ PartitionCache per
//!                                               batches: Records frame                  │ (stream, partition)
//! ```
//!
//! - [`codec`]: the wire format (I/O-free): the frame envelope, store reads ([`Request`],
//!   [`Response`]), batch frames that carry a client-facing `Records` frame, raw frames that
//!   carry segment bytes, every length bounded before allocation.
//! - [`group`] (I/O-free): the other protocol on the link, consumer-group coordination:
//!   [`GroupMsg`] (a member's join, leave, positions, forecasts as
//!   [`PartitionLoad`](crate::predict::PartitionLoad)s) and [`GroupAssign`] pushes.
//! - [`StoreLinkServer`]: binds `<data>/run/store.sock` (mode 0600), serves each shard link on
//!   its own task; reads and time lookups run on blocking threads, a bounded number per link;
//!   tail watches push coalesced `Tail` notifications. A malformed frame closes that link only.
//! - [`StoreLink`]: the shard's client: request ids, a pending map, reconnect with a doubling
//!   [`Backoff`](sibyl_proto::Backoff),
//!   tail watches as `tokio::sync::watch` receivers; relays consumer-group join / leave /
//!   positions / forecasts and delivers the hub's [`GroupAssignment`] pushes per member
//!   (members re-joined on reconnect).
//! - The hub's consumer-group coordinator ([`GroupCoordinator`](crate::hub::GroupCoordinator))
//!   is driven by [`StoreLinkServer`] through `coordination`: members are scoped to their
//!   link, and a closed link (a crashed shard) removes its members, so their partitions move
//!   to the others.
//! - [`ShardCache`] / [`PartitionCache`] (I/O-free): the most recent contiguous records of each
//!   partition, bounded per partition and per shard (LRU across partitions).
//! - [`CachedReader`]: cache first, then one shared fetch through the link per miss position.
//!
//! - [`raw`] (I/O-free): the shard's half of a raw read, segment bytes → a checked `Records`
//!   batch.
//!
//! Bytes of a record on the read path, verifying `Read`: `pread` into the hub's reused read
//! buffer (CRC checked there), one copy into the batch frame ([`codec::BatchWriter`]), the
//! socket; on the shard one read into the frame's own buffer, whose `Records` section (a
//! `Bytes` slice) the cache keeps and the pump hands to QUIC without copying. `ReadRaw` (what
//! [`CachedReader`] uses for large records, [`ReaderConfig::raw_min_record_bytes`]): the hub
//! `sendfile`s the segment range (the kernel moves page references, the hub touches no
//! byte); the shard reads it into the frame's buffer, checks each CRC and offset and
//! re-encodes the records once into a `Records` batch ([`raw::decode_raw`]). That moves the
//! CRC pass to the shard and takes two copies and a socket copy off the hub.

pub mod batch;
pub mod cache;
mod client;
pub mod codec;
mod coordination;
pub mod group;
pub mod raw;
mod reader;
mod server;

pub use batch::RecordBatch;
pub use cache::{Ahead, CacheConfig, CacheStats, PartitionCache, ShardCache};
pub use client::{GroupAssignment, LinkConfig, LinkError, StoreLink};
pub use codec::{CodecError, RemoteError, Request, Response, ShardMsg, StreamInfo};
pub use group::{GroupAssign, GroupMsg};
pub use reader::{CachedReader, ReaderConfig};
pub use server::{ServerConfig, StoreLinkServer};

/// File name of the hub's store socket inside `<data>/run/`.
pub const SOCKET_FILE: &str = "store.sock";

/// The conventional socket path for a data directory: `<data>/run/store.sock`.
pub fn socket_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("run").join(SOCKET_FILE)
}
