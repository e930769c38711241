//! Admission policy, I/O-free: which shard group a client goes to, what its token may do,
//! and every refusal as a protocol `Refused`.
//!
//! ```text
//! Hello ──versions──▶ negotiate ──api key──▶ ApiKeyStore::verify ──wants──▶ scopes
//!       ──groups (ready shards, connections)──▶ choose_group ──▶ Claims (now, lifetime)
//! ```

use std::collections::BTreeMap;

use sibyl_proto::frame::{Action, Refused, Want};
use sibyl_proto::{ErrorCode, SUPPORTED_VERSIONS};
use sibyl_tokens::{Scope as TokenScope, StreamPattern};

use crate::apikeys::{ApiKeyRecord, ScopeAction};
use crate::supervisor::ShardInfo;

/// Most streams one `Hello` may name (every wanted stream becomes a token scope, and a
/// sealed token is at most 1 KiB).
pub const MAX_WANTS: usize = 16;
/// Longest stream name accepted in `Hello.wants`.
pub const MAX_STREAM_NAME: usize = 256;
/// Longest `Hello.client_id`.
pub const MAX_CLIENT_ID: usize = 128;
/// `Refused.retry_after_ms` when no shard group has a ready shard.
pub const OVERLOADED_RETRY_AFTER_MS: u64 = 1000;

/// A `Refused` frame body.
pub fn refused(code: ErrorCode, reason: impl Into<String>) -> Refused {
    Refused {
        code,
        reason: reason.into(),
        retry_after_ms: None,
        versions: Vec::new(),
    }
}

/// The protocol version to speak, or `Refused{UNSUPPORTED_VERSION, versions}`.
pub fn negotiate_version(offered: &[u32]) -> Result<u32, Refused> {
    sibyl_proto::negotiate(offered, SUPPORTED_VERSIONS).ok_or_else(|| Refused {
        versions: SUPPORTED_VERSIONS.to_vec(),
        ..refused(ErrorCode::UnsupportedVersion, "no common protocol version")
    })
}

/// Checks the client id's shape (`LIMIT_EXCEEDED` when too long, `PROTOCOL_VIOLATION` when
/// empty).
pub fn check_client_id(client_id: &str) -> Result<(), Refused> {
    if client_id.is_empty() {
        return Err(refused(
            ErrorCode::ProtocolViolation,
            "client_id must not be empty",
        ));
    }
    if client_id.len() > MAX_CLIENT_ID {
        return Err(refused(
            ErrorCode::LimitExceeded,
            format!("client_id longer than {MAX_CLIENT_ID} bytes"),
        ));
    }
    Ok(())
}

/// Checks every wanted stream against the key's scopes and returns the token scopes: one
/// exact-name scope per wanted stream with exactly the wanted actions (never more than the
/// key allows, never a stream the client did not ask for).
///
/// The first stream not allowed gives `Refused{FORBIDDEN}` naming the stream and action.
pub fn scopes_for(record: &ApiKeyRecord, wants: &[Want]) -> Result<Vec<TokenScope>, Refused> {
    if wants.len() > MAX_WANTS {
        return Err(refused(
            ErrorCode::LimitExceeded,
            format!("at most {MAX_WANTS} wanted streams per Hello"),
        ));
    }
    let key_scopes = record.parsed_scopes();
    let mut by_stream: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    for w in wants {
        if w.stream.is_empty() || w.stream.len() > MAX_STREAM_NAME {
            return Err(refused(
                ErrorCode::ProtocolViolation,
                format!("stream names must be 1..={MAX_STREAM_NAME} bytes"),
            ));
        }
        let (action, name) = match w.action {
            Action::Subscribe => (ScopeAction::Subscribe, "subscribe"),
            Action::Publish => (ScopeAction::Publish, "publish"),
        };
        if !key_scopes.iter().any(|s| s.allows(&w.stream, action)) {
            return Err(refused(
                ErrorCode::Forbidden,
                format!("stream {:?}: {name} not allowed for this API key", w.stream),
            ));
        }
        let entry = by_stream.entry(w.stream.as_str()).or_default();
        match w.action {
            Action::Subscribe => entry.0 = true,
            Action::Publish => entry.1 = true,
        }
    }
    Ok(by_stream
        .into_iter()
        .map(|(stream, (subscribe, publish))| TokenScope {
            stream: StreamPattern::Exact(stream.to_owned()),
            subscribe,
            publish,
        })
        .collect())
}

/// One shard group's ready shards, fewest connections first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCandidate {
    /// Shard-group id.
    pub group: u32,
    /// Its ready shards in ticket order (fewest connections first).
    pub shards: Vec<ShardInfo>,
}

impl GroupCandidate {
    /// Total open connections over the group's ready shards, counting the clients sent
    /// since each shard's last heartbeat ([`ShardInfo::load`]).
    pub fn connections(&self) -> u64 {
        self.shards.iter().map(ShardInfo::load).sum()
    }
}

/// The group a new client goes to: among groups with at least one ready shard, the one with
/// the fewest total connections; ties go to the lowest group id. `None`: no ready shard
/// anywhere (answer `Refused{OVERLOADED}`).
pub fn choose_group(candidates: &[GroupCandidate]) -> Option<&GroupCandidate> {
    candidates
        .iter()
        .filter(|c| !c.shards.is_empty())
        .min_by_key(|c| (c.connections(), c.group))
}

/// [`choose_group`], except that `preferred` (the group a `GroupHint` named for this
/// connection) wins while it still has a ready shard, so the ticket matches the hint.
pub fn choose_group_preferring(
    candidates: &[GroupCandidate],
    preferred: Option<u32>,
) -> Option<&GroupCandidate> {
    preferred
        .and_then(|g| {
            candidates
                .iter()
                .find(|c| c.group == g && !c.shards.is_empty())
        })
        .or_else(|| choose_group(candidates))
}

/// `Refused{OVERLOADED, retry_after_ms}` for "no ready shard".
pub fn no_ready_shard() -> Refused {
    Refused {
        retry_after_ms: Some(OVERLOADED_RETRY_AFTER_MS),
        ..refused(ErrorCode::Overloaded, "no shard group has a ready shard")
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::ids::ShardId;

    fn shard(group: u32, index: u32, connections: u64) -> ShardInfo {
        ShardInfo {
            id: ShardId { group, index },
            group,
            generation: 1,
            pid: 100 + index,
            addr: SocketAddr::from(([127, 0, 0, 1], 5000 + index as u16)),
            connections,
            admitted: 0,
            subscriptions: 0,
            rss_bytes: 0,
        }
    }

    fn record(scopes: &[&str]) -> ApiKeyRecord {
        ApiKeyRecord {
            id: "0123456789ab".into(),
            name: "t".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            sha256: String::new(),
            created_unix: 0,
        }
    }

    fn want(stream: &str, action: Action) -> Want {
        Want {
            stream: stream.into(),
            action,
        }
    }

    #[test]
    fn group_with_fewest_connections_wins_ties_to_lowest_id() {
        let c = vec![
            GroupCandidate {
                group: 2,
                shards: vec![shard(2, 0, 1), shard(2, 1, 1)],
            },
            GroupCandidate {
                group: 1,
                shards: vec![shard(1, 0, 0), shard(1, 1, 3)],
            },
            GroupCandidate {
                group: 0,
                shards: vec![],
            },
        ];
        // 2 vs 3 connections; group 0 has no ready shard.
        assert_eq!(choose_group(&c).unwrap().group, 2);
        let tie = vec![
            GroupCandidate {
                group: 5,
                shards: vec![shard(5, 0, 2)],
            },
            GroupCandidate {
                group: 3,
                shards: vec![shard(3, 0, 2)],
            },
        ];
        assert_eq!(choose_group(&tie).unwrap().group, 3);
        let none = vec![GroupCandidate {
            group: 0,
            shards: vec![],
        }];
        assert!(choose_group(&none).is_none());
        let r = no_ready_shard();
        assert_eq!(r.code, ErrorCode::Overloaded);
        assert_eq!(r.retry_after_ms, Some(OVERLOADED_RETRY_AFTER_MS));
    }

    #[test]
    fn a_hinted_group_is_kept_while_it_has_a_ready_shard() {
        let c = vec![
            GroupCandidate {
                group: 1,
                shards: vec![shard(1, 0, 0)],
            },
            GroupCandidate {
                group: 2,
                shards: vec![shard(2, 0, 9)],
            },
            GroupCandidate {
                group: 3,
                shards: vec![],
            },
        ];
        // The busier group 2 was hinted: the ticket follows the hint.
        assert_eq!(choose_group_preferring(&c, Some(2)).unwrap().group, 2);
        // A hinted group that lost its shards, or an unknown one: the usual choice.
        assert_eq!(choose_group_preferring(&c, Some(3)).unwrap().group, 1);
        assert_eq!(choose_group_preferring(&c, Some(42)).unwrap().group, 1);
        assert_eq!(choose_group_preferring(&c, None).unwrap().group, 1);
    }

    #[test]
    fn scopes_are_restricted_to_the_wanted_streams() {
        let r = record(&["orders.*:subscribe,publish", "audit:subscribe"]);
        let s = scopes_for(
            &r,
            &[
                want("orders.eu", Action::Subscribe),
                want("audit", Action::Subscribe),
                want("orders.eu", Action::Publish),
            ],
        )
        .unwrap();
        assert_eq!(
            s,
            vec![
                TokenScope {
                    stream: StreamPattern::Exact("audit".into()),
                    subscribe: true,
                    publish: false
                },
                TokenScope {
                    stream: StreamPattern::Exact("orders.eu".into()),
                    subscribe: true,
                    publish: true
                },
            ]
        );
        assert!(scopes_for(&r, &[]).unwrap().is_empty());
    }

    #[test]
    fn forbidden_names_the_stream() {
        let r = record(&["orders.*:subscribe", "audit:subscribe"]);
        let e = scopes_for(
            &r,
            &[
                want("orders.eu", Action::Subscribe),
                want("audit", Action::Publish),
            ],
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(
            e.reason.contains("\"audit\"") && e.reason.contains("publish"),
            "{}",
            e.reason
        );
        let e = scopes_for(&r, &[want("payments", Action::Subscribe)]).unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(e.reason.contains("payments"));
    }

    #[test]
    fn bounds_on_wants_and_client_id() {
        let r = record(&["*:subscribe"]);
        let many: Vec<Want> = (0..=MAX_WANTS)
            .map(|i| want(&format!("s{i}"), Action::Subscribe))
            .collect();
        assert_eq!(
            scopes_for(&r, &many).unwrap_err().code,
            ErrorCode::LimitExceeded
        );
        assert_eq!(
            scopes_for(&r, &[want("", Action::Subscribe)])
                .unwrap_err()
                .code,
            ErrorCode::ProtocolViolation
        );
        assert!(check_client_id("app-1").is_ok());
        assert_eq!(
            check_client_id("").unwrap_err().code,
            ErrorCode::ProtocolViolation
        );
        assert_eq!(
            check_client_id(&"x".repeat(MAX_CLIENT_ID + 1))
                .unwrap_err()
                .code,
            ErrorCode::LimitExceeded
        );
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate_version(&[1, 7]), Ok(1));
        let e = negotiate_version(&[7]).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnsupportedVersion);
        assert_eq!(e.versions, SUPPORTED_VERSIONS.to_vec());
    }
}
