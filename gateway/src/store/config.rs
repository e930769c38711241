//! Store and stream configuration, stream names, and the `stream.toml` metadata file format.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::codec::{FIXED_BODY_LEN, MARK_LEN, MAX_BODY_LEN};
use super::error::StoreError;

/// Configuration of a [`Store`](super::Store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Directory holding every stream. Default: `sibyl-data/store` (relative to the working
    /// directory; the gateway binary sets it from its data dir).
    pub dir: PathBuf,
    /// A segment is rolled when the next batch would push it past this size. Default: 64 MiB.
    pub segment_bytes: u64,
    /// Also roll a segment once a record is this much newer (by record timestamp) than the
    /// segment's first record. Default: `None` (size only).
    pub segment_age: Option<Duration>,
    /// One sparse index entry every this many bytes of log. Default: 4096.
    pub index_interval_bytes: u32,
    /// Largest payload accepted by `append`. Default: 1 MiB.
    pub max_payload: usize,
    /// Largest key accepted by `append`. Default: 4 KiB.
    pub max_key: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("sibyl-data/store"),
            segment_bytes: 64 << 20,
            segment_age: None,
            index_interval_bytes: 4096,
            max_payload: 1 << 20,
            max_key: 4096,
        }
    }
}

impl StoreConfig {
    /// A default configuration rooted at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        let bad = |reason: &str| {
            Err(StoreError::InvalidConfig {
                reason: reason.to_owned(),
            })
        };
        if self.segment_bytes < 1024 {
            return bad("segment_bytes must be at least 1024");
        }
        if self.index_interval_bytes == 0 {
            return bad("index_interval_bytes must be at least 1");
        }
        match self
            .max_payload
            .checked_add(self.max_key)
            .and_then(|n| n.checked_add(FIXED_BODY_LEN + MARK_LEN))
        {
            Some(n) if n <= MAX_BODY_LEN => Ok(()),
            _ => bad("max_payload + max_key must stay under 256 MiB"),
        }
    }
}

/// When an append is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Durability {
    /// `append` returns after the batch is fsynced (one fsync per batch).
    Always,
    /// `append` returns after the write; the data is fsynced by
    /// [`Store::flush_due`](super::Store::flush_due) at most this long after it was written.
    Interval(Duration),
    /// Never fsynced by the store (the OS writes it back eventually); survives a process crash
    /// but not a power loss.
    Never,
}

/// Configuration of one stream, persisted in its `stream.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamConfig {
    /// Number of partitions, 1 to [`MAX_PARTITIONS`]. Default: 1.
    pub partitions: u32,
    /// Fsync policy. Default: [`Durability::Always`].
    pub durability: Durability,
    /// Delete the oldest whole segments while the partition holds at least this many bytes
    /// without them. Default: `None` (keep everything).
    pub retention_bytes: Option<u64>,
    /// Delete whole segments whose newest record timestamp is older than this. Default: `None`.
    pub retention_age: Option<Duration>,
}

/// Most partitions a stream can have.
pub const MAX_PARTITIONS: u32 = 4096;

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            partitions: 1,
            durability: Durability::Always,
            retention_bytes: None,
            retention_age: None,
        }
    }
}

impl StreamConfig {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return Err(StoreError::InvalidConfig {
                reason: format!(
                    "partitions must be 1 to {MAX_PARTITIONS}, not {}",
                    self.partitions
                ),
            });
        }
        if self.durability == Durability::Interval(Duration::ZERO) {
            return Err(StoreError::InvalidConfig {
                reason: "Durability::Interval must be positive".to_owned(),
            });
        }
        Ok(())
    }
}

/// Longest stream name.
pub const MAX_STREAM_NAME: usize = 128;

/// Checks a stream name: 1 to 128 of `[A-Za-z0-9._-]`, not starting with `.` (so it is never
/// `.`, `..` or a hidden file, and always a plain directory name).
pub fn validate_stream_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_STREAM_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            name: name.to_owned(),
        })
    }
}

/// Version of the `stream.toml` format.
const META_VERSION: u32 = 1;
/// Largest `stream.toml` read.
pub(crate) const MAX_META_LEN: u64 = 64 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamMeta {
    version: u32,
    config: StreamConfig,
}

pub(crate) fn encode_meta(cfg: &StreamConfig) -> String {
    // Serializing a plain struct of integers, options and a unit/newtype enum cannot fail.
    toml::to_string(&StreamMeta {
        version: META_VERSION,
        config: cfg.clone(),
    })
    .unwrap_or_else(|e| unreachable!("stream.toml serialization: {e}"))
}

pub(crate) fn decode_meta(text: &str) -> Result<StreamConfig, String> {
    let meta: StreamMeta = toml::from_str(text).map_err(|e| e.to_string())?;
    if meta.version != META_VERSION {
        return Err(format!("unsupported version {}", meta.version));
    }
    meta.config.validate().map_err(|e| e.to_string())?;
    Ok(meta.config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "orders", "Orders.v2-eu_west", &"x".repeat(128)] {
            assert!(validate_stream_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(129),
            "a\0",
        ] {
            assert!(
                matches!(
                    validate_stream_name(bad),
                    Err(StoreError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn meta_round_trip() {
        let cfgs = [
            StreamConfig::default(),
            StreamConfig {
                partitions: 8,
                durability: Durability::Interval(Duration::from_micros(5_500)),
                retention_bytes: Some(1 << 30),
                retention_age: Some(Duration::from_secs(3600)),
            },
            StreamConfig {
                durability: Durability::Never,
                ..StreamConfig::default()
            },
        ];
        for cfg in cfgs {
            let text = encode_meta(&cfg);
            assert_eq!(decode_meta(&text).unwrap(), cfg, "{text}");
        }
        assert!(
            decode_meta("version = 2\n[config]\npartitions = 1\ndurability = \"Always\"\n")
                .is_err()
        );
        assert!(
            decode_meta("version = 1\n[config]\npartitions = 0\ndurability = \"Always\"\n")
                .is_err()
        );
        assert!(decode_meta("garbage").is_err());
    }

    #[test]
    fn config_validation() {
        assert!(StoreConfig::default().validate().is_ok());
        assert!(
            StoreConfig {
                max_payload: usize::MAX,
                ..StoreConfig::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            StoreConfig {
                segment_bytes: 10,
                ..StoreConfig::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            StreamConfig {
                partitions: 0,
                ..StreamConfig::default()
            }
            .validate()
            .is_err()
        );
        let zero = StreamConfig {
            durability: Durability::Interval(Duration::ZERO),
            ..StreamConfig::default()
        };
        assert!(zero.validate().is_err());
    }
}
