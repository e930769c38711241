//! The [`Keyring`]: sealing, opening and rotation, all I/O-free at the core.
//!
//! `seal_with_nonce`, [`Keyring::open_at`] and [`Keyring::rotate_at`] take every input —
//! the nonce, the current instant — as arguments; [`Keyring::seal`], [`Keyring::open`] and
//! [`Keyring::rotate`] are thin wrappers that draw OS randomness and read the system clock (as
//! rustls' `ticketer.rs` does).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sibyl_proto::cbor::{self, CborError};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::claims::{Claims, fill_random, random_nonce};
use crate::error::{KeyringError, OpenError, SealError};

/// Longest sealed token accepted or produced, in bytes.
pub const MAX_SEALED_LEN: usize = 1024;
/// The only sealed-format version this build seals and opens.
pub const TOKEN_VERSION: u8 = 1;
/// Length of the nonce.
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Length of the authenticated cleartext header: version, key id, nonce.
pub const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
/// Most keys a keyring holds (the active one plus those in their grace period).
pub const MAX_KEYS: usize = 32;
/// Longest encoded keyring accepted by [`Keyring::from_bytes`] / [`Keyring::load`].
pub const MAX_KEYRING_LEN: usize = 16 * 1024;

/// Caller AAD up to this length is joined to the header on the stack.
const INLINE_AAD: usize = 128;
/// Encoded keyring format version.
const KEYRING_FORMAT: u8 = 1;

/// Identifies a key in a keyring; carried in clear in the token header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub u32);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Options for [`Keyring::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// Clock difference tolerated at both ends of the validity window (whole seconds count).
    /// Default: 30 s.
    pub clock_skew: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            clock_skew: Duration::from_secs(30),
        }
    }
}

impl OpenOptions {
    /// Sets [`OpenOptions::clock_skew`].
    pub fn with_clock_skew(mut self, clock_skew: Duration) -> Self {
        self.clock_skew = clock_skew;
        self
    }
}

#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct Key {
    #[zeroize(skip)]
    id: KeyId,
    bytes: [u8; 32],
    /// Unix seconds from which the key no longer opens; `None` for the active key and for keys
    /// that never retire.
    #[zeroize(skip)]
    retire_at: Option<u64>,
}

/// Symmetric keys by id: one active key seals, the others only open until their retirement.
///
/// Invariants (kept by every constructor and by [`Keyring::rotate_at`]): at least one key; ids
/// unique; the active key has the highest id and no retirement; at most [`MAX_KEYS`] keys.
/// `Debug` prints ids and retirement instants only, never key bytes.
#[derive(Clone)]
pub struct Keyring {
    /// Sorted by id; the last one is active.
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Entry<'a>(&'a Key);
        impl fmt::Debug for Entry<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0.id)?;
                match self.0.retire_at {
                    Some(at) => write!(f, " (retires at {at})"),
                    None => Ok(()),
                }
            }
        }
        f.debug_struct("Keyring")
            .field("active", &self.active_key_id())
            .field("keys", &self.keys.iter().map(Entry).collect::<Vec<_>>())
            .finish()
    }
}

fn unix_now() -> u64 {
    // A clock before 1970 is treated as 1970: every token then looks not-yet-valid rather
    // than valid forever.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Keyring {
    /// A keyring with one active key (id 1) from OS randomness.
    pub fn generate() -> Result<Self, KeyringError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        fill_random(bytes.as_mut())?;
        Ok(Self::from_key(KeyId(1), *bytes))
    }

    /// A keyring whose only, active key is `bytes` under `id` (tests and fuzzing).
    pub(crate) fn from_key(id: KeyId, bytes: [u8; 32]) -> Self {
        Self {
            keys: vec![Key {
                id,
                bytes,
                retire_at: None,
            }],
        }
    }

    /// The key new tokens are sealed with.
    pub fn active_key_id(&self) -> KeyId {
        self.active().id
    }

    /// Every key id held, ascending; the last is the active one.
    pub fn key_ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|k| k.id)
    }

    /// When key `id` stops opening tokens: `None` if it is unknown or never retires.
    pub fn retires_at(&self, id: KeyId) -> Option<u64> {
        self.find(id).and_then(|k| k.retire_at)
    }

    fn active(&self) -> &Key {
        // Invariant: a keyring always holds at least one key, the last being active.
        self.keys.last().expect("keyring is never empty")
    }

    fn find(&self, id: KeyId) -> Option<&Key> {
        self.keys
            .binary_search_by_key(&id, |k| k.id)
            .ok()
            .map(|i| &self.keys[i])
    }

    /// Rotates now: see [`Keyring::rotate_at`].
    pub fn rotate(&mut self, grace: Duration) -> Result<KeyId, KeyringError> {
        self.rotate_at(unix_now(), grace)
    }

    /// Rotates at `now` (unix seconds): drops keys already retired at `now`, schedules the
    /// current active key to retire at `now + grace` (it keeps opening tokens until then), and
    /// makes a fresh key from OS randomness active. Returns the new key's id.
    pub fn rotate_at(&mut self, now: u64, grace: Duration) -> Result<KeyId, KeyringError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        fill_random(bytes.as_mut())?;
        self.install_key_at(now, grace, *bytes)
    }

    /// [`Keyring::rotate_at`] with given key bytes.
    pub(crate) fn install_key_at(
        &mut self,
        now: u64,
        grace: Duration,
        bytes: [u8; 32],
    ) -> Result<KeyId, KeyringError> {
        let next = self
            .active()
            .id
            .0
            .checked_add(1)
            .ok_or(KeyringError::KeyIdsExhausted)?;
        let live = |k: &Key| k.retire_at.is_none_or(|at| now < at);
        if self.keys.iter().filter(|k| live(k)).count() >= MAX_KEYS {
            return Err(KeyringError::TooManyKeys);
        }
        self.keys.retain(live);
        let retire_at = now.saturating_add(grace.as_secs());
        let old = self
            .keys
            .last_mut()
            .expect("the active key never retires, so one remains");
        old.retire_at = Some(retire_at);
        self.keys.push(Key {
            id: KeyId(next),
            bytes,
            retire_at: None,
        });
        Ok(KeyId(next))
    }

    /// Seals `claims` under the active key with a random nonce (from a thread-local CSPRNG
    /// seeded from the OS), binding `aad` (never sent).
    pub fn seal(&self, claims: &Claims, aad: &[u8]) -> Result<Vec<u8>, SealError> {
        self.seal_with_nonce(claims, aad, &random_nonce::<NONCE_LEN>()?)
    }

    /// Sealing with a given nonce; the nonce must never repeat under one key.
    pub(crate) fn seal_with_nonce(
        &self,
        claims: &Claims,
        aad: &[u8],
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Vec<u8>, SealError> {
        let key = self.active();
        let mut out = Vec::with_capacity(256);
        out.push(TOKEN_VERSION);
        out.extend_from_slice(&key.id.0.to_be_bytes());
        out.extend_from_slice(nonce);
        if let Err(e) = cbor::to_writer(claims, &mut out) {
            out.zeroize();
            return Err(SealError::Encode(e));
        }
        let len = out.len() + TAG_LEN;
        if len > MAX_SEALED_LEN {
            out.zeroize();
            return Err(SealError::TooLong { len });
        }
        let cipher = XChaCha20Poly1305::new((&key.bytes).into());
        let (header, body) = out.split_at_mut(HEADER_LEN);
        let tag = with_aad(header, aad, |full_aad| {
            cipher.encrypt_in_place_detached(XNonce::from_slice(nonce), full_aad, body)
        })
        // Invariant: the body is at most MAX_SEALED_LEN bytes, far below the cipher's limit.
        .expect("XChaCha20-Poly1305 accepts any body under 256 GiB");
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Opens `token` now: see [`Keyring::open_at`].
    pub fn open(&self, token: &[u8], aad: &[u8], opts: &OpenOptions) -> Result<Claims, OpenError> {
        self.open_at(token, aad, opts, unix_now())
    }

    /// Opens `token` as of `now` (unix seconds), with the same `aad` it was sealed with.
    ///
    /// Checks, in order: length (before any other work), version, key id, key retirement,
    /// tag, CBOR, validity window widened by `opts.clock_skew` at both ends.
    pub fn open_at(
        &self,
        token: &[u8],
        aad: &[u8],
        opts: &OpenOptions,
        now: u64,
    ) -> Result<Claims, OpenError> {
        let claims = self.open_authentic_at(token, aad, now)?;
        let skew = opts.clock_skew.as_secs();
        if now >= claims.expires_at.saturating_add(skew) {
            return Err(OpenError::Expired {
                expires_at: claims.expires_at,
                now,
            });
        }
        if now.saturating_add(skew) < claims.not_before {
            return Err(OpenError::NotYetValid {
                not_before: claims.not_before,
                now,
            });
        }
        Ok(claims)
    }

    /// Everything [`Keyring::open_at`] checks except the claims' validity window.
    pub(crate) fn open_authentic_at(
        &self,
        token: &[u8],
        aad: &[u8],
        now: u64,
    ) -> Result<Claims, OpenError> {
        let len = token.len();
        if len > MAX_SEALED_LEN {
            return Err(OpenError::TooLong { len });
        }
        if len < HEADER_LEN + TAG_LEN {
            return Err(OpenError::Truncated { len });
        }
        let (header, rest) = token.split_at(HEADER_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        if header[0] != TOKEN_VERSION {
            return Err(OpenError::UnknownVersion(header[0]));
        }
        let id = KeyId(u32::from_be_bytes([
            header[1], header[2], header[3], header[4],
        ]));
        let key = self.find(id).ok_or(OpenError::UnknownKey(id))?;
        if key.retire_at.is_some_and(|at| now >= at) {
            return Err(OpenError::RetiredKey(id));
        }
        let cipher = XChaCha20Poly1305::new((&key.bytes).into());
        // Decrypted in place on the stack (no allocation); the length was bounded above.
        let mut buf = [0u8; MAX_SEALED_LEN];
        let plaintext = &mut buf[..ciphertext.len()];
        plaintext.copy_from_slice(ciphertext);
        let claims = with_aad(header, aad, |full_aad| {
            cipher.decrypt_in_place_detached(
                XNonce::from_slice(&header[5..]),
                full_aad,
                plaintext,
                Tag::from_slice(tag),
            )
        })
        .map_err(|_| OpenError::BadTag)
        .and_then(|()| {
            cbor::from_slice::<Claims>(plaintext).map_err(|e| match e {
                CborError::TrailingBytes => OpenError::TrailingBytes,
                other => OpenError::Malformed(other),
            })
        });
        plaintext.zeroize();
        claims
    }

    /// The keyring encoded for a file or a pipe to a child process (CBOR via
    /// `sibyl_proto::cbor`). The bytes hold the secret keys: zeroize them after use.
    pub fn to_bytes(&self) -> Vec<u8> {
        let repr = KeyringRepr {
            format: KEYRING_FORMAT,
            keys: self
                .keys
                .iter()
                .map(|k| KeyRepr {
                    id: k.id.0,
                    key: k.bytes.to_vec(),
                    retire_at: k.retire_at,
                })
                .collect(),
        };
        // Invariant: a struct of integers and byte strings always encodes.
        cbor::to_vec(&repr).expect("keyring encoding cannot fail")
    }

    /// Decodes [`Keyring::to_bytes`] output, checking every keyring invariant.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyringError> {
        if bytes.len() > MAX_KEYRING_LEN {
            return Err(KeyringError::TooLarge { len: bytes.len() });
        }
        let repr: KeyringRepr = cbor::from_slice(bytes).map_err(KeyringError::Malformed)?;
        if repr.format != KEYRING_FORMAT {
            return Err(KeyringError::Invalid("unknown keyring format version"));
        }
        if repr.keys.is_empty() {
            return Err(KeyringError::Invalid("no keys"));
        }
        if repr.keys.len() > MAX_KEYS {
            return Err(KeyringError::TooManyKeys);
        }
        let mut keys = Vec::with_capacity(repr.keys.len());
        for k in &repr.keys {
            let bytes = <[u8; 32]>::try_from(k.key.as_slice())
                .map_err(|_| KeyringError::Invalid("key is not 32 bytes"))?;
            keys.push(Key {
                id: KeyId(k.id),
                bytes,
                retire_at: k.retire_at,
            });
        }
        if keys.windows(2).any(|w| w[0].id >= w[1].id) {
            return Err(KeyringError::Invalid("key ids not strictly ascending"));
        }
        if keys.last().is_some_and(|k| k.retire_at.is_some()) {
            return Err(KeyringError::Invalid("active key has a retirement time"));
        }
        Ok(Self { keys })
    }
}

/// Runs `f` with `header ‖ aad`, on the stack when `aad` is short.
fn with_aad<R>(header: &[u8], aad: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    let len = header.len() + aad.len();
    if aad.len() <= INLINE_AAD {
        let mut buf = [0u8; HEADER_LEN + INLINE_AAD];
        buf[..header.len()].copy_from_slice(header);
        buf[header.len()..len].copy_from_slice(aad);
        f(&buf[..len])
    } else {
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(header);
        buf.extend_from_slice(aad);
        f(&buf)
    }
}

#[derive(Serialize, Deserialize)]
struct KeyringRepr {
    #[serde(rename = "v")]
    format: u8,
    #[serde(rename = "k")]
    keys: Vec<KeyRepr>,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct KeyRepr {
    #[serde(rename = "i")]
    id: u32,
    #[serde(rename = "k", with = "serde_bytes")]
    key: Vec<u8>,
    #[serde(rename = "r")]
    retire_at: Option<u64>,
}
