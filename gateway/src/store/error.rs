//! The store's error type.

use std::path::PathBuf;

/// Why a store operation failed.
///
/// Three families, kept apart: the caller misused the API (`NoSuch*`, `InvalidName`,
/// `InvalidConfig`, `*TooLarge`, `ConfigMismatch`, `OffsetOutOfRange`), the data on disk is
/// damaged (`Corrupt`, `Metadata`), or the operating system failed us (`Io`, `Locked`,
/// `Poisoned`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No stream of that name exists.
    #[error("no such stream `{stream}`")]
    NoSuchStream {
        /// The stream asked for.
        stream: String,
    },
    /// The stream has no such partition.
    #[error("stream `{stream}` has no partition {partition} (it has {partitions})")]
    NoSuchPartition {
        /// The stream.
        stream: String,
        /// The partition asked for.
        partition: u32,
        /// How many partitions the stream has.
        partitions: u32,
    },
    /// A stream name outside `[A-Za-z0-9._-]{1,128}`, or starting with `.`.
    #[error("invalid stream name {name:?}: use 1 to 128 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// A store or stream configuration value out of bounds.
    #[error("invalid store configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// A record payload above the configured limit.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// The payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A record key above the configured limit.
    #[error("key of {len} bytes exceeds the limit of {max}")]
    KeyTooLarge {
        /// The key length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `create_stream` on an existing stream with a different configuration.
    #[error("stream `{stream}` already exists with a different configuration")]
    ConfigMismatch {
        /// The stream.
        stream: String,
    },
    /// A damaged record: the offset is never served. `resume_at`, when known, is the next offset
    /// that can be read (recovery found the corrupt region and the valid records after it).
    #[error("corrupt record at offset {offset} in {path:?} (resume at {resume_at:?})")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// The first offset that cannot be served.
        offset: u64,
        /// Where reading can continue, if known.
        resume_at: Option<u64>,
    },
    /// A stream metadata file that cannot be parsed.
    #[error("bad stream metadata in {path:?}: {reason}")]
    Metadata {
        /// The metadata file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file system operation failed.
    #[error("I/O error on {path:?}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The store directory is already open in another process (or another `Store`).
    #[error("store directory {path:?} is locked by another process")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A write to the partition failed half-way and could not be undone; the partition refuses
    /// further appends until the store is reopened (recovery repairs it).
    #[error(
        "partition {partition} of stream `{stream}` is unusable after a failed write; reopen the store"
    )]
    Poisoned {
        /// The stream.
        stream: String,
        /// The partition.
        partition: u32,
    },
    /// A read offset outside `[earliest, next]`.
    #[error("offset {requested} out of range [{earliest}, {next}] for `{stream}`/{partition}")]
    OffsetOutOfRange {
        /// The stream.
        stream: String,
        /// The partition.
        partition: u32,
        /// The offset asked for.
        requested: u64,
        /// The earliest offset still stored.
        earliest: u64,
        /// The next offset to be written.
        next: u64,
    },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { path, source }
    }
}
