//! Consumer-group coordination over the store link (I/O-free): the shard relays its group
//! members' join, leave, positions and forecasts ([`GroupMsg`], tag `0x05`, no answer), and
//! the hub pushes each member's complete assignment ([`GroupAssign`], tag `0x06`).
//!
//! ```text
//! shard: subscription ─join/leave/Position/Forecast─▶ StoreLink ══ GroupMsg ══▶ hub:
//!   StoreLinkServer ─▶ GroupCoordinator ─▶ GroupAssigner (PartitionLoad per partition)
//! shard: subscription ◀─ GroupAssignment ─ StoreLink ◀══ GroupAssign ══ hub: poll_pushes
//! ```
//!
//! Member ids are the shard's own ([`MemberId`]); the hub scopes them to the link, so they
//! never collide across shards or shard restarts. Names and lists are bounded
//! ([`MAX_GROUP_NAME`], [`MAX_GROUP_PARTITIONS`]) and checked at decode, in the same frame
//! envelope and CBOR codec as the store reads ([`super::codec`]).

use serde::{Deserialize, Serialize};

use super::codec::{CodecError, TAG_GROUP, TAG_GROUP_PUSH, put_frame};
use crate::predict::{MemberId, PartitionLoad};

/// Longest stream or group name in a group message.
pub const MAX_GROUP_NAME: usize = 255;
/// Most entries of a group message's list (starts, loads, partitions): a stream's partition
/// count bound.
pub const MAX_GROUP_PARTITIONS: usize = crate::store::MAX_PARTITIONS as usize;

/// Shard → hub: a group member's news. None is answered; the hub pushes [`GroupAssign`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GroupMsg {
    /// A subscription of this shard joins consumer group `group` of `stream` (the hub pushes
    /// [`GroupAssign`] for `member` from now on).
    Join {
        /// The member, unique on this link (the shard's subscription counter).
        member: MemberId,
        /// Stream name.
        stream: String,
        /// Group name.
        group: String,
        /// `(partition, offset)`: where each partition starts if the group is new (the
        /// member's `Start` resolved) or has no position for it yet; otherwise ignored.
        starts: Vec<(u32, u64)>,
    },
    /// The member's subscription ended.
    Leave {
        /// The member.
        member: MemberId,
    },
    /// The member's client reported `Position{partition, next_offset}`.
    Position {
        /// The member.
        member: MemberId,
        /// Partition.
        partition: u32,
        /// Next offset the client will consume.
        next_offset: u64,
        /// The shard still sends the member this partition (the report cannot be the final
        /// position of a hand-over).
        serving: bool,
    },
    /// The member's client sent a `Forecast`: the group's partition loads.
    Forecast {
        /// The member.
        member: MemberId,
        /// Predicted load per partition.
        loads: Vec<PartitionLoad>,
    },
}

/// Hub → shard: group member `member` of this link now owns exactly `partitions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupAssign {
    /// The member (as in [`GroupMsg::Join`]).
    pub member: MemberId,
    /// Strictly increasing per member.
    pub epoch: u64,
    /// `(partition, start_offset)`: a partition new to the member starts at its offset (the
    /// group's committed position); a kept one continues where the member is.
    pub partitions: Vec<(u32, u64)>,
}

fn check_name(name: &str) -> Result<(), CodecError> {
    if name.len() > MAX_GROUP_NAME {
        return Err(CodecError::Limit("name longer than 255 bytes"));
    }
    Ok(())
}

fn check_list(len: usize) -> Result<(), CodecError> {
    if len > MAX_GROUP_PARTITIONS {
        return Err(CodecError::Limit(
            "more entries than a stream has partitions",
        ));
    }
    Ok(())
}

impl GroupMsg {
    /// The member it is about.
    pub fn member(&self) -> MemberId {
        match self {
            Self::Join { member, .. }
            | Self::Leave { member }
            | Self::Position { member, .. }
            | Self::Forecast { member, .. } => *member,
        }
    }

    /// Checks the bounds (names, list lengths).
    pub fn check_limits(&self) -> Result<(), CodecError> {
        match self {
            Self::Join {
                stream,
                group,
                starts,
                ..
            } => {
                check_name(stream)?;
                check_name(group)?;
                check_list(starts.len())
            }
            Self::Forecast { loads, .. } => check_list(loads.len()),
            Self::Leave { .. } | Self::Position { .. } => Ok(()),
        }
    }
}

impl GroupAssign {
    /// Checks the bounds (the list length).
    pub fn check_limits(&self) -> Result<(), CodecError> {
        check_list(self.partitions.len())
    }
}

/// Appends a group message frame to `out` ([`CodecError::Limit`] over a bound).
pub fn encode_group_msg(msg: &GroupMsg, out: &mut Vec<u8>) -> Result<(), CodecError> {
    msg.check_limits()?;
    put_frame(out, TAG_GROUP, |o| {
        sibyl_proto::cbor::to_writer(msg, o).map_err(CodecError::from)
    })
}

/// Appends a group push frame to `out` ([`CodecError::Limit`] over a bound).
pub fn encode_group_assign(push: &GroupAssign, out: &mut Vec<u8>) -> Result<(), CodecError> {
    push.check_limits()?;
    put_frame(out, TAG_GROUP_PUSH, |o| {
        sibyl_proto::cbor::to_writer(push, o).map_err(CodecError::from)
    })
}

/// Decodes the body (after the tag) of a group message frame.
pub(super) fn decode_group_msg(rest: &[u8]) -> Result<GroupMsg, CodecError> {
    let msg: GroupMsg = sibyl_proto::cbor::from_slice(rest)?;
    msg.check_limits()?;
    Ok(msg)
}

/// Decodes the body (after the tag) of a group push frame.
pub(super) fn decode_group_assign(rest: &[u8]) -> Result<GroupAssign, CodecError> {
    let push: GroupAssign = sibyl_proto::cbor::from_slice(rest)?;
    push.check_limits()?;
    Ok(push)
}
