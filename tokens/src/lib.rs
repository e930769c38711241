//! # sibyl-tokens
//!
//! Access tokens the hub seals and shards open: CBOR [`Claims`] sealed with
//! XChaCha20-Poly1305 under a rotating [`Keyring`].
//!
//! ```text
//!  hub: Claims ──cbor──▶ plaintext ──XChaCha20-Poly1305(key[active], nonce, AAD)──▶ sealed ──to_text──▶ ticket
//! shard: ticket ──from_text──▶ sealed ──bounded, version, key id, tag, CBOR, time──▶ Claims
//!
//! sealed token (at most MAX_SEALED_LEN = 1024 bytes):
//! ┌─────────┬──────────────┬──────────────────┬──────────────────────────────┬──────────┐
//! │ version │ key id       │ nonce            │ ciphertext of CBOR(Claims)   │ tag      │
//! │ 1 byte  │ 4 bytes (BE) │ 24 bytes, random │ same length as the plaintext │ 16 bytes │
//! └─────────┴──────────────┴──────────────────┴──────────────────────────────┴──────────┘
//!  └──────── header (29 bytes), authenticated ─┘
//! AAD = header ‖ caller AAD (e.g. a deployment id; never sent)
//! text form = base64url without padding
//! ```
//!
//! - [`claims`]: [`Claims`], [`Scope`], [`StreamPattern`], [`SessionSecret`], [`TokenId`].
//! - [`keyring`]: [`Keyring`] (seal, open, rotate, encode), [`KeyId`], [`OpenOptions`], the
//!   format constants. The logic takes the nonce and `now` as arguments
//!   ([`Keyring::open_at`], [`Keyring::rotate_at`]); [`Keyring::seal`], [`Keyring::open`] and
//!   [`Keyring::rotate`] only add OS randomness and the system clock.
//! - Key files ([`Keyring::load`], [`Keyring::save`]): CBOR, written atomically with mode
//!   0600, refused when group- or world-accessible.
//! - [`text`]: [`to_text`] / [`from_text`].
//! - [`error`]: [`OpenError`] (peer input), [`SealError`] (caller input), [`KeyringError`]
//!   (files and caller misuse).
//!
//! Secrets (keys, session secrets) never appear in `Debug` output and are zeroized on drop.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod claims;
pub mod error;
mod file;
pub mod keyring;
pub mod text;

#[cfg(any(fuzzing, feature = "fuzzing"))]
pub mod fuzzing;

pub use claims::{Action, Claims, PatternError, Scope, SessionSecret, StreamPattern, TokenId};
pub use error::{KeyringError, OpenError, RandomnessError, SealError};
pub use keyring::{KeyId, Keyring, MAX_KEYRING_LEN, MAX_KEYS, MAX_SEALED_LEN, OpenOptions};
pub use text::{MAX_TEXT_LEN, from_text, to_text};
