//! Predictive pre-fetch, shard side (seed 000): partition assignment, pre-fetch sizing and
//! deviation tracking. All I/O-free: inputs carry `now`, outputs are decisions and deadlines.
//!
//! ```text
//!  control stream ──Subscribe/leave──▶ GroupAssigner::{join, leave}
//!                 ──Forecast────────▶ GroupAssigner::update_forecast, PrefetchPlanner::update_forecast,
//!                                     DeviationTracker::predict
//!                 ──Position────────▶ GroupAssigner::position_known, DeviationTracker::position
//!  GroupAssigner::poll_assignments ──▶ Assignment frames (per member, epoch)
//!  PrefetchPlanner::{depth, push_allowance, priority} ──▶ store reads ahead, pushes, stream priority
//!  DeviationTracker::poll_flagged ──▶ "forecast is off" (ask for / fall back from the forecast)
//! ```
//!
//! Driven by the shard's session layer (`session/subscribe.rs`): a `GroupAssigner` per
//! consumer group, one `PrefetchPlanner` per shard, a `DeviationTracker` per subscription.

mod assign;
mod deviation;
mod prefetch;

pub use assign::{
    AssignError, GroupAssigner, GroupConfig, MemberAssignment, MemberId, PartitionState,
    minimal_moves, moved,
};
pub use deviation::{Deviation, DeviationConfig, DeviationTracker};
pub use prefetch::{Allowance, Depth, PrefetchConfig, PrefetchPlanner, SubKey};

/// Maps a predicted rate in bytes/s to a QUIC stream priority (higher is sent first): the
/// bit length of the rate, 0 for an idle partition up to 64. Coarse on purpose, so forecast
/// noise rarely changes it.
pub fn stream_priority(bytes_per_s: u64) -> i32 {
    // At most 64: fits.
    (u64::BITS - bytes_per_s.leading_zeros()) as i32
}

/// A partition's predicted load, as a client forecasts it and a group's assigner weighs it.
/// On the store link it travels as the tuple `(partition, records_per_s, bytes_per_s)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(from = "(u32, u64, u64)", into = "(u32, u64, u64)")]
pub struct PartitionLoad {
    /// The partition.
    pub partition: u32,
    /// Predicted consumption, records per second.
    pub records_per_s: u64,
    /// Predicted consumption, bytes per second (0: unknown).
    pub bytes_per_s: u64,
}

impl From<&sibyl_proto::frame::PartitionForecast> for PartitionLoad {
    fn from(f: &sibyl_proto::frame::PartitionForecast) -> Self {
        Self {
            partition: f.partition,
            records_per_s: f.records_per_s,
            bytes_per_s: f.bytes_per_s,
        }
    }
}

impl From<(u32, u64, u64)> for PartitionLoad {
    fn from((partition, records_per_s, bytes_per_s): (u32, u64, u64)) -> Self {
        Self {
            partition,
            records_per_s,
            bytes_per_s,
        }
    }
}

impl From<PartitionLoad> for (u32, u64, u64) {
    fn from(l: PartitionLoad) -> Self {
        (l.partition, l.records_per_s, l.bytes_per_s)
    }
}
