//! Hub stream frames: `Hello` → `Ticket` | `Refused`.

use serde::{Deserialize, Serialize};

use super::{Validate, cbor_frame};
use crate::error::ErrorCode;

/// What the client wants to do with a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Consume records (through a shard).
    Subscribe,
    /// Append records (through the hub).
    Publish,
}

/// One stream the client intends to use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    /// Stream name.
    pub stream: String,
    /// What the client will do with it.
    pub action: Action,
}

/// The client's self-description, used by the hub to choose a shard group.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Profile {
    /// Region or location hint, e.g. `"eu-west"`.
    pub region: String,
    /// Device class, e.g. `"server"`, `"mobile"`.
    pub device_class: String,
    /// SDK name and version, e.g. `"sibyl-sdk/0.1.0"`.
    pub sdk_version: String,
}

/// `Hello` (`0x01`): the first frame on the hub stream. `Debug` does not print the API key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Client identifier chosen by the application (stable across reconnects).
    pub client_id: String,
    /// API key, sent over TLS; the hub stores only its hash.
    pub api_key: String,
    /// Client profile.
    pub profile: Profile,
    /// Streams the client intends to use.
    pub wants: Vec<Want>,
    /// Protocol versions the client speaks, any order; must not be empty.
    pub versions: Vec<u32>,
}

/// A shard endpoint, in the ticket's priority order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// `"ip:port"` (IPv6 as `"[::1]:4433"`).
    pub addr: String,
    /// TLS server name to verify the shard's certificate against.
    pub server_name: String,
}

/// `Ticket` (`0x02`): permission to attach to a shard of one group. `Debug` prints neither
/// the session secret nor the token's bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The negotiated protocol version.
    pub version: u32,
    /// The sealed shard token: opaque to the client, presented verbatim in `Attach`.
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// The session secret, the key of the attach proof. Never sent to a shard.
    #[serde(with = "serde_bytes")]
    pub session_secret: [u8; 32],
    /// The shard group the token is valid for.
    pub shard_group: u32,
    /// Token expiry, Unix time in seconds.
    pub expires_at: u64,
    /// Shard endpoints in priority order (first is preferred); never empty.
    pub endpoints: Vec<Endpoint>,
}

/// `GroupHint` (`0x04`): the shard group the hub will most likely issue a ticket for, sent
/// by the hub in 0.5-RTT on its first uni stream when the client offered the ALPN
/// [`ALPN_GROUP_HINT`](crate::version::ALPN_GROUP_HINT). Not a permission: the client may
/// start handshakes with these endpoints while `Hello` is on its way, and attaches only
/// with the `Ticket`'s token (whose group may differ if the hint's group lost its shards).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupHint {
    /// The group the hub chose for this connection.
    pub shard_group: u32,
    /// Its ready shards in priority order, as a `Ticket` would list them; never empty.
    pub endpoints: Vec<Endpoint>,
}

/// `Refused` (`0x03`): the hub will not issue a ticket (or failed a request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// Why (see [`ErrorCode`]): typically `Unauthenticated`, `Forbidden`, `Overloaded`,
    /// `UnsupportedVersion`.
    pub code: ErrorCode,
    /// Human-readable reason (for logs, not for matching).
    pub reason: String,
    /// For `Overloaded`: wait at least this long before retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// For `UnsupportedVersion`: the versions the hub speaks. Omitted when empty; `null`
    /// reads as empty.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "super::rules::null_as_default"
    )]
    pub versions: Vec<u32>,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("client_id", &self.client_id)
            .field("api_key", &"<redacted>")
            .field("profile", &self.profile)
            .field("wants", &self.wants)
            .field("versions", &self.versions)
            .finish()
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("version", &self.version)
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("session_secret", &"<redacted>")
            .field("shard_group", &self.shard_group)
            .field("expires_at", &self.expires_at)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl Validate for Hello {
    fn validate(&self) -> Result<(), &'static str> {
        if self.versions.is_empty() {
            Err("versions must not be empty")
        } else {
            Ok(())
        }
    }
}
/// `Ticket` and `GroupHint` list at least one endpoint.
fn endpoints_present(endpoints: &[Endpoint]) -> Result<(), &'static str> {
    if endpoints.is_empty() {
        Err("endpoints must not be empty")
    } else {
        Ok(())
    }
}

impl Validate for Ticket {
    fn validate(&self) -> Result<(), &'static str> {
        endpoints_present(&self.endpoints)
    }
}
impl Validate for Refused {}
impl Validate for GroupHint {
    fn validate(&self) -> Result<(), &'static str> {
        endpoints_present(&self.endpoints)
    }
}

cbor_frame!(Hello, Ticket, Refused, GroupHint);
