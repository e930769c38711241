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
//!
//! ## Performance
//!
//! Target: seal and open of a typical token (≈170 bytes) in ≤ 1 µs each (median of
//! `cargo bench -p sibyl-tokens --bench seal_open`; figures in `docs/BENCHMARKS.md`,
//! "Tokens"). What gets there, each measured:
//!
//! - **Portable ChaCha20 and Poly1305 backends.** The repository's `.cargo/config.toml` sets
//!   `--cfg poly1305_force_soft --cfg chacha20_force_soft`: for messages this short the
//!   runtime-detected AVX2 backends cost more than they save (cipher ≈1.9 µs → ≈0.53 µs per
//!   token; still faster at the 1 KiB maximum). Nothing else in the workspace uses these
//!   crates. A `RUSTFLAGS` environment variable replaces the config's flags (cargo-fuzz does
//!   so): correct, only slower.
//! - **Nonces from a thread-local CSPRNG** (`StdRng`, ChaCha12, seeded from the OS and reseeded
//!   every 1024 nonces) instead of a `getrandom` syscall per seal (≈0.29 µs → ≈20 ns). Token
//!   ids and session secrets still come straight from the OS.
//! - **No heap buffer on open**: the ciphertext is decrypted in place in a stack buffer
//!   (bounded by [`MAX_SEALED_LEN`]) that is zeroized afterwards; seal encodes the claims
//!   straight into the output buffer.
//!
//! Measured and not kept: caching the `XChaCha20Poly1305` object per key (its "key schedule"
//! is a key copy; the real work, HChaCha20, depends on the nonce: ≈10 ns), and
//! `chacha20poly1305` 0.11 (same backends, same speed). The claims encoding (CBOR maps with
//! one-letter keys) is part of the sealed format and stays.
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
