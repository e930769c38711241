//! What a token says: [`Claims`] and their parts.
//!
//! Claims are serialized with compact field names (one or two letters, see each
//! `#[serde(rename)]`) through `sibyl_proto::cbor`; the names are part of the sealed format.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::RandomnessError;

/// Fills `buf` from the operating system's randomness source.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), RandomnessError> {
    getrandom::fill(buf).map_err(RandomnessError)
}

/// Nonces one thread draws from its generator before reseeding it from the OS (24 KiB of
/// output; `rand`'s `ThreadRng` reseeds every 64 KiB).
const NONCES_PER_SEED: u32 = 1024;

thread_local! {
    /// Per-thread CSPRNG (`StdRng`, ChaCha12) and the nonces left before its next reseed.
    static NONCE_RNG: RefCell<Option<(StdRng, u32)>> = const { RefCell::new(None) };
}

/// A fresh random 24-byte nonce from a thread-local CSPRNG seeded (and periodically reseeded)
/// from OS randomness.
///
/// A `getrandom` syscall per nonce costs ~0.3 µs, as much as the rest of sealing; the
/// generator costs ~20 ns. 192-bit random nonces from any CSPRNG never collide in practice.
/// This is `rand::rng()` (`ThreadRng`) except that a failing OS source is returned as an error
/// instead of panicking. Like `ThreadRng` it is not reseeded on `fork()`: a process that forks
/// without `exec` and seals in both parent and child must not share a keyring across them.
pub(crate) fn random_nonce<const N: usize>() -> Result<[u8; N], RandomnessError> {
    NONCE_RNG.with_borrow_mut(|slot| {
        let (rng, left) = match slot {
            Some(state) if state.1 > 0 => state,
            _ => {
                let mut seed = Zeroizing::new([0u8; 32]);
                fill_random(seed.as_mut())?;
                slot.insert((StdRng::from_seed(*seed), NONCES_PER_SEED))
            }
        };
        *left -= 1;
        let mut nonce = [0u8; N];
        rng.fill_bytes(&mut nonce);
        Ok(nonce)
    })
}

/// A token's unique id: 128 random bits, for revocation lists and logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "fuzzing", derive(arbitrary::Arbitrary))]
pub struct TokenId(pub [u8; 16]);

impl TokenId {
    /// A fresh random id from OS randomness.
    pub fn generate() -> Result<Self, RandomnessError> {
        let mut id = [0u8; 16];
        fill_random(&mut id)?;
        Ok(Self(id))
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}

impl Serialize for TokenId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(ByteArray::<16>).map(Self)
    }
}

/// Deserializes a CBOR byte string of exactly `N` bytes without allocating (the bytes are
/// borrowed from the input).
struct ByteArray<const N: usize>;

impl<const N: usize> serde::de::Visitor<'_> for ByteArray<N> {
    type Value = [u8; N];

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a byte string of {N} bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<[u8; N], E> {
        <[u8; N]>::try_from(v).map_err(|_| E::invalid_length(v.len(), &self))
    }
}

/// The 32-byte session secret a client proves it holds when it presents the token.
///
/// `Debug` prints `SessionSecret(..)`, equality is constant-time, and the bytes are zeroized on
/// drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SessionSecret([u8; 32]);

impl SessionSecret {
    /// A fresh secret from OS randomness.
    pub fn generate() -> Result<Self, RandomnessError> {
        let mut secret = Self([0u8; 32]);
        fill_random(&mut secret.0)?;
        Ok(secret)
    }

    /// Wraps known bytes (e.g. received beside the token over TLS).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The secret bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionSecret(..)")
    }
}

impl PartialEq for SessionSecret {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for SessionSecret {}

impl Serialize for SessionSecret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SessionSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(ByteArray::<32>).map(Self)
    }
}

#[cfg(feature = "fuzzing")]
impl<'a> arbitrary::Arbitrary<'a> for SessionSecret {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self(u.arbitrary()?))
    }
}

/// What a client wants to do with a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Read records.
    Subscribe,
    /// Append records.
    Publish,
}

/// Which streams a scope covers.
///
/// Text form (`FromStr` / `Display`): `"orders"` is `Exact("orders")`, `"orders.*"` is
/// `Prefix("orders.")`, `"*"` is `Prefix("")` (every stream). A `*` anywhere but at the end is
/// refused, as is the empty string. In sealed claims the pattern is encoded structurally, so
/// any value round-trips.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "fuzzing", derive(arbitrary::Arbitrary))]
pub enum StreamPattern {
    /// Exactly this stream name.
    #[serde(rename = "e")]
    Exact(String),
    /// Every stream whose name starts with this prefix (`""` matches all).
    #[serde(rename = "p")]
    Prefix(String),
}

impl StreamPattern {
    /// Whether `stream` is covered by this pattern.
    pub fn matches(&self, stream: &str) -> bool {
        match self {
            Self::Exact(name) => name == stream,
            Self::Prefix(prefix) => stream.starts_with(prefix.as_str()),
        }
    }
}

/// Why a stream pattern's text form was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The pattern text was empty.
    #[error("empty stream pattern")]
    Empty,
    /// A `*` appeared somewhere other than at the very end.
    #[error("`*` is only allowed as the last character of a stream pattern: {0:?}")]
    MisplacedWildcard(String),
}

impl FromStr for StreamPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        match s.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => Ok(Self::Prefix(prefix.to_owned())),
            None if !s.contains('*') => Ok(Self::Exact(s.to_owned())),
            _ => Err(PatternError::MisplacedWildcard(s.to_owned())),
        }
    }
}

impl fmt::Display for StreamPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// A stream pattern and the actions it grants.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "fuzzing", derive(arbitrary::Arbitrary))]
pub struct Scope {
    /// Streams covered.
    #[serde(rename = "s")]
    pub stream: StreamPattern,
    /// Whether [`Action::Subscribe`] is granted.
    #[serde(rename = "r")]
    pub subscribe: bool,
    /// Whether [`Action::Publish`] is granted.
    #[serde(rename = "w")]
    pub publish: bool,
}

impl Scope {
    /// Subscribe-only access to `stream`.
    pub fn subscribe(stream: StreamPattern) -> Self {
        Self {
            stream,
            subscribe: true,
            publish: false,
        }
    }

    /// Publish-only access to `stream`.
    pub fn publish(stream: StreamPattern) -> Self {
        Self {
            stream,
            subscribe: false,
            publish: true,
        }
    }

    /// Whether this scope grants `action` on `stream`.
    pub fn allows(&self, stream: &str, action: Action) -> bool {
        let granted = match action {
            Action::Subscribe => self.subscribe,
            Action::Publish => self.publish,
        };
        granted && self.stream.matches(stream)
    }
}

/// Everything a sealed token asserts. Times are unix seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "fuzzing", derive(arbitrary::Arbitrary))]
pub struct Claims {
    /// Random id of this token.
    #[serde(rename = "t")]
    pub token_id: TokenId,
    /// The authenticated client the token was issued to.
    #[serde(rename = "c")]
    pub client_id: String,
    /// The shard group the client should connect to.
    #[serde(rename = "g")]
    pub shard_group: u32,
    /// The secret the client must prove it holds.
    #[serde(rename = "k")]
    pub session_secret: SessionSecret,
    /// What the client may do.
    #[serde(rename = "s")]
    pub scopes: Vec<Scope>,
    /// The client's rate class (names a token-shaping profile).
    #[serde(rename = "r")]
    pub rate_class: String,
    /// When the token was issued.
    #[serde(rename = "i")]
    pub issued_at: u64,
    /// The token is refused before this instant (minus the allowed clock skew).
    #[serde(rename = "n")]
    pub not_before: u64,
    /// The token is refused from this instant on (plus the allowed clock skew).
    #[serde(rename = "e")]
    pub expires_at: u64,
    /// The wire protocol version the hub negotiated with the client (`Ticket.version`); the
    /// shard refuses a version it does not speak. Absent in tokens sealed before the field
    /// existed, which read as version 1.
    #[serde(rename = "v", default = "first_protocol_version")]
    pub protocol_version: u32,
}

fn first_protocol_version() -> u32 {
    1
}

impl Claims {
    /// Fresh claims issued at `now`, valid from `now` for `ttl`, with a random token id and
    /// session secret, for protocol version 1.
    pub fn issue(
        client_id: impl Into<String>,
        shard_group: u32,
        scopes: Vec<Scope>,
        rate_class: impl Into<String>,
        now: u64,
        ttl: Duration,
    ) -> Result<Self, RandomnessError> {
        Ok(Self {
            token_id: TokenId::generate()?,
            client_id: client_id.into(),
            shard_group,
            session_secret: SessionSecret::generate()?,
            scopes,
            rate_class: rate_class.into(),
            issued_at: now,
            not_before: now,
            expires_at: now.saturating_add(ttl.as_secs()),
            protocol_version: first_protocol_version(),
        })
    }

    /// Whether any scope grants `action` on `stream`.
    pub fn allows(&self, stream: &str, action: Action) -> bool {
        self.scopes.iter().any(|scope| scope.allows(stream, action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(s: &str) -> StreamPattern {
        s.parse().unwrap()
    }

    #[test]
    fn pattern_text_forms() {
        assert_eq!(pattern("orders"), StreamPattern::Exact("orders".into()));
        assert_eq!(pattern("orders.*"), StreamPattern::Prefix("orders.".into()));
        assert_eq!(pattern("*"), StreamPattern::Prefix(String::new()));
        for text in ["orders", "orders.*", "*", "a.b.c"] {
            assert_eq!(pattern(text).to_string(), text);
        }
        assert_eq!("".parse::<StreamPattern>(), Err(PatternError::Empty));
        for bad in ["or*ders", "**", "*.orders", "a*.*"] {
            assert!(
                matches!(
                    bad.parse::<StreamPattern>(),
                    Err(PatternError::MisplacedWildcard(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn matching() {
        assert!(pattern("orders").matches("orders"));
        assert!(!pattern("orders").matches("orders.eu"));
        assert!(pattern("orders.*").matches("orders.eu"));
        assert!(!pattern("orders.*").matches("orders"));
        assert!(!pattern("orders.*").matches("payments.eu"));
        assert!(pattern("*").matches(""));
        assert!(pattern("*").matches("anything"));
    }

    #[test]
    fn allows_checks_action_and_stream() {
        let mut claims =
            Claims::issue("c", 1, vec![], "default", 100, Duration::from_secs(60)).unwrap();
        assert!(!claims.allows("orders", Action::Subscribe));
        claims.scopes = vec![
            Scope::subscribe(pattern("orders.*")),
            Scope::publish(pattern("audit")),
        ];
        assert!(claims.allows("orders.eu", Action::Subscribe));
        assert!(!claims.allows("orders.eu", Action::Publish));
        assert!(claims.allows("audit", Action::Publish));
        assert!(!claims.allows("audit", Action::Subscribe));
        assert!(!claims.allows("audit.x", Action::Publish));
        assert_eq!(claims.expires_at, 160);
    }

    #[test]
    fn nonces_distinct_across_reseeds() {
        // Crosses at least one reseed of the thread's generator.
        let n = 2 * NONCES_PER_SEED as usize + 1;
        let nonces: std::collections::HashSet<[u8; 24]> =
            (0..n).map(|_| random_nonce::<24>().unwrap()).collect();
        assert_eq!(nonces.len(), n);
        assert!(!nonces.contains(&[0u8; 24]));
    }

    #[test]
    fn secrets_redacted_and_random() {
        let a = SessionSecret::generate().unwrap();
        let b = SessionSecret::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a, SessionSecret::from_bytes(*a.as_bytes()));
        assert_eq!(format!("{a:?}"), "SessionSecret(..)");
        let claims = Claims {
            session_secret: SessionSecret::from_bytes([0xab; 32]),
            ..Claims::issue("c", 1, vec![], "x", 0, Duration::ZERO).unwrap()
        };
        let debug = format!("{claims:?}");
        // The secret (32 × 0xab) shows neither as bytes ("171, 171") nor as hex; the random
        // token id is hex too, so only runs it cannot plausibly hold count (a random 32-digit
        // id contains "171" or "abab" in about 1 run of 70; this test once failed on that).
        assert!(debug.contains("SessionSecret(..)"), "{debug}");
        assert!(
            !debug.contains("171, 171") && !debug.to_lowercase().contains("abababababababab"),
            "{debug}"
        );
        assert_ne!(TokenId::generate().unwrap(), TokenId::generate().unwrap());
    }
}
