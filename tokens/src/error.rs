//! Typed errors, one per operation: opening (peer input), sealing (caller input) and the
//! keyring (local files and caller misuse).

use std::path::PathBuf;

use sibyl_proto::cbor::CborError;

use crate::keyring::KeyId;

/// The operating system's randomness source failed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("OS randomness unavailable: {0}")]
pub struct RandomnessError(pub(crate) getrandom::Error);

/// Why a presented token was refused.
///
/// Everything up to and including [`OpenError::TrailingBytes`] means the bytes are garbage or
/// forged (or sealed under a key this keyring never had); [`OpenError::RetiredKey`],
/// [`OpenError::Expired`] and [`OpenError::NotYetValid`] mean the token was genuine but is not
/// valid now. [`OpenError::is_stale`] tells the two apart for callers that answer "get a new
/// ticket".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The input exceeds [`crate::MAX_SEALED_LEN`] bytes (or [`crate::MAX_TEXT_LEN`]
    /// characters for the text form); refused before any other work.
    #[error("token too long: {len} bytes")]
    TooLong {
        /// Length of the input.
        len: usize,
    },
    /// The input is shorter than a header plus a tag.
    #[error("token truncated: {len} bytes")]
    Truncated {
        /// Length of the input.
        len: usize,
    },
    /// The text form is not unpadded base64url.
    #[error("token text is not unpadded base64url")]
    Text,
    /// The version byte is not one this build understands.
    #[error("unknown token version {0}")]
    UnknownVersion(u8),
    /// No key with this id is in the keyring.
    #[error("unknown token key {0}")]
    UnknownKey(KeyId),
    /// The key exists but its grace period after rotation is over.
    #[error("token key {0} is retired")]
    RetiredKey(KeyId),
    /// Authentication failed: the token was altered, forged, or bound to other context (AAD).
    #[error("token authentication failed")]
    BadTag,
    /// The authenticated plaintext is not well-formed claims.
    #[error("malformed token claims: {0}")]
    Malformed(#[source] CborError),
    /// The authenticated plaintext holds bytes after the claims.
    #[error("trailing bytes after token claims")]
    TrailingBytes,
    /// The token expired (`now >= expires_at + skew`).
    #[error("token expired at {expires_at} (now {now})")]
    Expired {
        /// The claims' expiry, unix seconds.
        expires_at: u64,
        /// The instant the token was checked at, unix seconds.
        now: u64,
    },
    /// The token is not valid yet (`now + skew < not_before`).
    #[error("token not valid before {not_before} (now {now})")]
    NotYetValid {
        /// The claims' start of validity, unix seconds.
        not_before: u64,
        /// The instant the token was checked at, unix seconds.
        now: u64,
    },
}

impl OpenError {
    /// Whether the token was genuine but is no longer usable (expired or sealed under a retired
    /// key): the client should fetch a fresh ticket rather than be treated as hostile.
    pub fn is_stale(&self) -> bool {
        matches!(self, Self::Expired { .. } | Self::RetiredKey(_))
    }
}

/// Why claims could not be sealed (the caller's input or the platform, never a peer).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The sealed token would exceed [`crate::MAX_SEALED_LEN`] bytes (too many scopes or too
    /// long names).
    #[error("sealed token would be {len} bytes, over the {max}-byte limit", max = crate::MAX_SEALED_LEN)]
    TooLong {
        /// The length the sealed token would have had.
        len: usize,
    },
    /// The claims could not be CBOR-encoded.
    #[error("cannot encode claims: {0}")]
    Encode(#[source] CborError),
    /// No nonce could be drawn.
    #[error(transparent)]
    Randomness(#[from] RandomnessError),
}

/// Why a keyring could not be loaded, saved, decoded or rotated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// Reading or writing the key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The key file is readable or writable by group or others.
    #[error(
        "key file {path} has mode {mode:04o}; refusing it (must not be group/world accessible, e.g. 0600)"
    )]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The encoded keyring exceeds [`crate::MAX_KEYRING_LEN`] bytes.
    #[error("encoded keyring too large: {len} bytes")]
    TooLarge {
        /// Length of the input.
        len: usize,
    },
    /// The encoded keyring is not well-formed CBOR of the expected shape.
    #[error("malformed keyring: {0}")]
    Malformed(#[source] CborError),
    /// The encoded keyring is well-formed but inconsistent.
    #[error("invalid keyring: {0}")]
    Invalid(&'static str),
    /// Rotation would hold more than [`crate::MAX_KEYS`] keys; retire some first
    /// (shorter grace periods or fewer rotations).
    #[error("keyring full ({max} keys)", max = crate::MAX_KEYS)]
    TooManyKeys,
    /// Key ids are exhausted (`u32::MAX` reached).
    #[error("key ids exhausted")]
    KeyIdsExhausted,
    /// No key could be generated.
    #[error(transparent)]
    Randomness(#[from] RandomnessError),
}
