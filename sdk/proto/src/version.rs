//! ALPN and protocol version negotiation.
//!
//! The ALPN `sibyl/1` names the framing (this crate's major wire format). Within it,
//! `Hello.versions` lists the protocol versions the client speaks; the hub picks the highest
//! one it also speaks ([`negotiate`]) and puts it in `Ticket.version` (and in the sealed
//! token, so the shard speaks the same), or answers `Refused{code: UNSUPPORTED_VERSION,
//! versions: [...]}`.

/// The ALPN protocol id for hub and shard connections.
pub const ALPN: &[u8] = b"sibyl/1";
/// `sibyl/1` plus the group hint: a client that lists this ALPN before [`ALPN`] on its hub
/// connection asks the hub to send a `GroupHint` in 0.5-RTT on its first uni stream (so
/// the client can start its shard handshake while `Hello` is on its way). The framing is
/// `sibyl/1`'s; a hub that does not know it selects `sibyl/1` and sends no hint. Shards
/// speak [`ALPN`] only.
pub const ALPN_GROUP_HINT: &[u8] = b"sibyl/1+hint";
/// The protocol version this crate implements.
pub const PROTOCOL_VERSION: u32 = 1;
/// The versions this crate speaks.
pub const SUPPORTED_VERSIONS: &[u32] = &[PROTOCOL_VERSION];

/// The highest version present in both lists, if any.
pub fn negotiate(offered: &[u32], supported: &[u32]) -> Option<u32> {
    offered
        .iter()
        .copied()
        .filter(|v| supported.contains(v))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_highest_common() {
        assert_eq!(negotiate(&[1, 3, 2], &[2, 1]), Some(2));
        assert_eq!(negotiate(&[7], SUPPORTED_VERSIONS), None);
        assert_eq!(negotiate(&[], SUPPORTED_VERSIONS), None);
        assert_eq!(negotiate(&[1], SUPPORTED_VERSIONS), Some(1));
    }
}
