//! The named test cases and what each needs from the server side.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// One interop test case. The name (`handshake`, `refuse-bad-key`, …) is the `TESTCASE` value
/// of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Case {
    /// QUIC + TLS 1.3 with ALPN `sibyl/1` to the hub.
    Handshake,
    /// `Hello` → `Ticket`.
    Ticket,
    /// Ticket, then attach to a shard of the ticket's group.
    DirectConnect,
    /// An unknown API key is refused with `UNAUTHENTICATED`.
    RefuseBadKey,
    /// A token with one byte flipped is refused with `TOKEN_INVALID`.
    RefuseForgedToken,
    /// A token used after its lifetime (server: 1 s, skew 0) is refused with `TOKEN_EXPIRED`.
    RefuseExpired,
    /// A ticket presented to a shard of another group is refused with `WRONG_GROUP`.
    RefuseWrongGroup,
    /// A proof computed on connection A and sent on connection B is refused with
    /// `PROOF_FAILED`.
    TokenReplay,
    /// `RECORDS` records published, all received in order with matching hashes.
    Transfer,
    /// The serving shard is SIGKILLed mid-stream: no gap, no duplicate.
    Resume,
    /// Transfer at 3 % loss and 40 ms RTT (impairment proxies in front of hub and shards).
    Loss,
    /// A 5 s blackhole mid-transfer, then recovery: no gap, no duplicate.
    Blackhole,
    /// The client changes its UDP port mid-stream (QUIC migration).
    Rebind,
    /// The serving shard is SIGTERMed (drain) mid-stream: no gap, no duplicate.
    Drain,
    /// The numbered requirements of PROTOCOL.md §10, each checked on the wire; the client
    /// writes `requirements.json` and the matrix lists the verdict of each.
    Conformance,
}

impl Case {
    /// Every case, in matrix order.
    pub const ALL: [Case; 15] = [
        Case::Handshake,
        Case::Ticket,
        Case::DirectConnect,
        Case::RefuseBadKey,
        Case::RefuseForgedToken,
        Case::RefuseExpired,
        Case::RefuseWrongGroup,
        Case::TokenReplay,
        Case::Transfer,
        Case::Resume,
        Case::Loss,
        Case::Blackhole,
        Case::Rebind,
        Case::Drain,
        Case::Conformance,
    ];

    /// The fast CI subset (`--quick`).
    pub const QUICK: [Case; 7] = [
        Case::Handshake,
        Case::Ticket,
        Case::DirectConnect,
        Case::RefuseBadKey,
        Case::TokenReplay,
        Case::Transfer,
        Case::Conformance,
    ];

    /// The `TESTCASE` name.
    pub fn name(self) -> &'static str {
        match self {
            Case::Handshake => "handshake",
            Case::Ticket => "ticket",
            Case::DirectConnect => "direct-connect",
            Case::RefuseBadKey => "refuse-bad-key",
            Case::RefuseForgedToken => "refuse-forged-token",
            Case::RefuseExpired => "refuse-expired",
            Case::RefuseWrongGroup => "refuse-wrong-group",
            Case::TokenReplay => "token-replay",
            Case::Transfer => "transfer",
            Case::Resume => "resume",
            Case::Loss => "loss",
            Case::Blackhole => "blackhole",
            Case::Rebind => "rebind",
            Case::Drain => "drain",
            Case::Conformance => "conformance",
        }
    }

    /// Whether the case needs publish/subscribe (the data plane).
    pub fn is_data_plane(self) -> bool {
        matches!(
            self,
            Case::Transfer
                | Case::Resume
                | Case::Loss
                | Case::Blackhole
                | Case::Rebind
                | Case::Drain
        )
    }

    /// What the server side must provide for this case.
    pub fn server_needs(self) -> ServerNeeds {
        let mut n = ServerNeeds::default();
        match self {
            Case::RefuseExpired => {
                n.token_lifetime = Some(Duration::from_secs(1));
            }
            Case::Loss => {
                n.impairment = Some(ImpairmentKind::Loss);
            }
            Case::Blackhole => {
                n.impairment = Some(ImpairmentKind::Blackhole);
            }
            // A second shard in the group, so the cached ticket fails over at once.
            Case::Resume | Case::Drain => {
                n.shards_per_group = Some(2);
            }
            _ => {}
        }
        n
    }

    /// Wall-clock bound of the whole cell (server start excluded).
    pub fn timeout(self) -> Duration {
        match self {
            Case::Handshake | Case::Ticket | Case::RefuseBadKey => Duration::from_secs(30),
            Case::Loss | Case::Blackhole | Case::Resume | Case::Drain | Case::Conformance => {
                Duration::from_secs(120)
            }
            _ => Duration::from_secs(60),
        }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown case name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown test case {0:?} (known: {known})", known = Case::ALL.map(Case::name).join(", "))]
pub struct UnknownCase(pub String);

impl FromStr for Case {
    type Err = UnknownCase;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Case::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| UnknownCase(s.to_owned()))
    }
}

/// The network impairment a case puts between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImpairmentKind {
    /// 3 % random loss each way, 20 ms one-way delay (40 ms RTT).
    Loss,
    /// No impairment until the runner switches a 5 s blackhole on mid-transfer.
    Blackhole,
}

/// Server-side requirements of a case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerNeeds {
    /// Token lifetime to configure (clock skew 0), if the default does not do.
    pub token_lifetime: Option<Duration>,
    /// Impairment proxies in front of the hub and every shard.
    pub impairment: Option<ImpairmentKind>,
    /// Shards per group, if the default (one) does not do.
    pub shards_per_group: Option<u32>,
}
