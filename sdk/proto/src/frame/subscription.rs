//! Control stream frames (one client-opened bidi stream per subscription).
//!
//! Client → shard: `Subscribe` (first), then any of `Position`, `Fetch`, `Forecast`.
//! Shard → client: `Assignment`, `Grant`, `SubError`, `FlipHint`, `Flip`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Validate, cbor_frame};
use crate::error::ErrorCode;

/// Where a subscription starts reading partitions it has no `Position` for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// The oldest retained record. CBOR: text `"earliest"`.
    Earliest,
    /// Only records appended after the assignment. CBOR: text `"latest"`.
    Latest,
    /// Explicit next offset per partition (partitions not listed: `earliest`).
    /// CBOR: `{"offsets": {partition(uint): offset(uint)}}`; a repeated partition is
    /// malformed.
    #[serde(deserialize_with = "super::rules::unique_map")]
    Offsets(BTreeMap<u32, u64>),
    /// The first record with timestamp ≥ this Unix time in ms. CBOR: `{"timestamp": uint}`.
    Timestamp(u64),
}

/// How records flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The shard pushes (and pre-fetches) within the grant, guided by `Forecast`.
    Predictive,
    /// The shard sends only what `Fetch` asks for.
    Reactive,
}

/// `Subscribe` (`0x30`): the first frame on a control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    /// Client-chosen id, unique within the session; echoed in `Assignment`/`PartitionOpen`.
    pub sub_id: u32,
    /// Stream name.
    pub stream: String,
    /// Start position for partitions without a `Position`.
    pub start: Start,
    /// Consumer group: members share the partitions. Absent: this client gets all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Delivery mode.
    pub mode: Mode,
}

/// One assigned partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedPartition {
    /// Partition number.
    pub partition: u32,
    /// The first offset the shard will send on this partition.
    pub start_offset: u64,
    /// Delivery priority (higher first); the shard uses it as the QUIC stream priority of the
    /// partition's uni stream.
    pub priority: i32,
}

/// `Assignment` (`0x31`): the full set of partitions now assigned (replaces the previous).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The subscription.
    pub sub_id: u32,
    /// Strictly increasing per subscription; `PartitionOpen.epoch` refers to it.
    pub epoch: u64,
    /// The assigned partitions.
    pub partitions: Vec<AssignedPartition>,
}

/// `Grant` (`0x32`): a token-bucket lease for this subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Sustained rate the client may consume, records per second.
    pub rate_records_per_s: u64,
    /// Bucket depth in records.
    pub burst: u64,
    /// When the lease ends, shard clock (Unix ms; compare via `Attached.server_time`).
    pub lease_expires_ms: u64,
}

/// `SubError` (`0x33`): the subscription failed; the shard then finishes the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubError {
    /// Why: e.g. `NOT_FOUND`, `FORBIDDEN`, `LIMIT_EXCEEDED`, `GRANT_EXCEEDED`.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub reason: String,
}

/// `Position` (`0x34`): the next offset the application will consume on a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Partition number.
    pub partition: u32,
    /// The offset after the last record the app consumed.
    pub next_offset: u64,
    /// The latest `Assignment` epoch the client had processed when it produced this report
    /// (absent: unknown, from a client that does not send it). Lets the shard tell a report
    /// sent before a revocation from the final one sent after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// `Fetch` (`0x35`): reactive mode pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetch {
    /// Partition number (must be assigned).
    pub partition: u32,
    /// Send at most this many records (≥ 1).
    pub max_records: u32,
}

/// Predicted consumption of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionForecast {
    /// Partition number.
    pub partition: u32,
    /// Predicted records per second.
    pub records_per_s: u64,
    /// Predicted bytes per second.
    pub bytes_per_s: u64,
}

/// `Forecast` (`0x36`): the client's predicted consumption (predictive pre-fetch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forecast {
    /// Per-partition predictions (partitions not listed: no prediction).
    pub partitions: Vec<PartitionForecast>,
    /// Free space in the client's pre-fetch buffer, bytes.
    pub buffer_capacity_bytes: u64,
}

impl Forecast {
    /// A forecast from `(partition, records/s, bytes/s)` triples and the free buffer space.
    pub fn from_rates(
        rates: impl IntoIterator<Item = (u32, u64, u64)>,
        buffer_capacity_bytes: u64,
    ) -> Self {
        Self {
            partitions: rates
                .into_iter()
                .map(
                    |(partition, records_per_s, bytes_per_s)| PartitionForecast {
                        partition,
                        records_per_s,
                        bytes_per_s,
                    },
                )
                .collect(),
            buffer_capacity_bytes,
        }
    }
}

/// `FlipHint` (`0x37`, reserved): a flip from one stream to another is likely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlipHint {
    /// The stream currently consumed.
    pub from_stream: String,
    /// The stream it may flip to.
    pub to_stream: String,
    /// Likelihood in percent (0–100).
    pub confidence_pct: u8,
    /// Expected flip time, shard clock Unix ms, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_at_ms: Option<u64>,
}

/// `Flip` (`0x38`, reserved): the subscription switches streams at exact positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flip {
    /// The stream being left.
    pub from_stream: String,
    /// The stream being entered.
    pub to_stream: String,
    /// Per partition of `from_stream`: the first offset NOT to deliver.
    #[serde(deserialize_with = "super::rules::unique_map")]
    pub from_positions: BTreeMap<u32, u64>,
    /// Per partition of `to_stream`: the first offset to deliver.
    #[serde(deserialize_with = "super::rules::unique_map")]
    pub to_positions: BTreeMap<u32, u64>,
}

impl Validate for Subscribe {}
impl Validate for Assignment {}
impl Validate for Grant {}
impl Validate for SubError {}
impl Validate for Position {}
impl Validate for Fetch {
    fn validate(&self) -> Result<(), &'static str> {
        if self.max_records == 0 {
            Err("max_records must be >= 1")
        } else {
            Ok(())
        }
    }
}
impl Validate for Forecast {}
impl Validate for FlipHint {
    fn validate(&self) -> Result<(), &'static str> {
        if self.confidence_pct > 100 {
            Err("confidence_pct must be <= 100")
        } else {
            Ok(())
        }
    }
}
impl Validate for Flip {}

cbor_frame!(
    Subscribe, Assignment, Grant, SubError, Position, Fetch, Forecast, FlipHint, Flip
);
