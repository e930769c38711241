//! Entry points for the cargo-fuzz targets in `fuzz/` (compiled only with `cfg(fuzzing)` or
//! the `fuzzing` feature).
//!
//! Everything is deterministic: a fixed two-key keyring (key [`OLD_KEY_ID`] in its grace
//! period, [`KEY_ID`] active), a fixed [`NOW`], fixed [`AAD`] and a fixed nonce for re-sealing.
//! Each target is an oracle, not just "does not panic".

use std::time::Duration;

use crate::claims::{Claims, Scope, SessionSecret, StreamPattern, TokenId};
use crate::error::{OpenError, SealError};
use crate::keyring::{KeyId, Keyring, NONCE_LEN, OpenOptions};
use crate::text::{from_text, to_text};

/// The fixed clock, unix seconds.
pub const NOW: u64 = 1_700_000_000;
/// The AAD every fuzz token is bound to.
pub const AAD: &[u8] = b"sibyl-fuzz-deployment";
/// The active key's id.
pub const KEY_ID: KeyId = KeyId(7);
/// The previous key's id, still within its grace period at [`NOW`].
pub const OLD_KEY_ID: KeyId = KeyId(6);
const NONCE: [u8; NONCE_LEN] = [0x4e; NONCE_LEN];

/// The fixed keyring: key 6 rotated out at `NOW - 60` with a 120 s grace, key 7 active.
pub fn keyring() -> Keyring {
    let mut ring = Keyring::from_key(OLD_KEY_ID, [0x16; 32]);
    ring.install_key_at(NOW - 60, Duration::from_secs(120), [0x17; 32])
        // Invariant: a one-key ring has room and id 6 has a successor.
        .expect("fixed keyring rotates");
    ring
}

/// The same keyring before rotation: only key 6, active (to seal old-key seeds).
pub fn old_keyring() -> Keyring {
    Keyring::from_key(OLD_KEY_ID, [0x16; 32])
}

/// Typical claims valid at [`NOW`]: a 16-character client id and two scopes.
pub fn sample_claims() -> Claims {
    Claims {
        token_id: TokenId([0xa5; 16]),
        client_id: "client-0000-0042".to_owned(),
        shard_group: 3,
        session_secret: SessionSecret::from_bytes([0x5e; 32]),
        scopes: vec![
            Scope::subscribe(StreamPattern::Prefix("orders.".to_owned())),
            Scope {
                stream: StreamPattern::Exact("audit".to_owned()),
                subscribe: true,
                publish: true,
            },
        ],
        rate_class: "standard".to_owned(),
        issued_at: NOW - 10,
        not_before: NOW - 10,
        expires_at: NOW + 3600,
        protocol_version: 1,
    }
}

/// Seals `claims` under `ring`'s active key with the fixed nonce and [`AAD`].
pub fn seal_with(ring: &Keyring, claims: &Claims) -> Result<Vec<u8>, SealError> {
    ring.seal_with_nonce(claims, AAD, &NONCE)
}

/// Oracle for arbitrary sealed bytes: opening never panics, and anything accepted re-seals and
/// re-opens to the same claims.
pub fn token_open(data: &[u8]) {
    let ring = keyring();
    let opts = OpenOptions::default();
    if let Ok(claims) = ring.open_at(data, AAD, &opts, NOW) {
        let resealed = seal_with(&ring, &claims).expect("accepted claims re-seal");
        let reopened = ring
            .open_at(&resealed, AAD, &opts, NOW)
            .expect("re-sealed token opens");
        assert_eq!(reopened, claims);
    }
}

/// Oracle for arbitrary text: parsing never panics, accepted text is canonical (re-encodes to
/// itself), and its bytes go through [`token_open`].
pub fn token_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(bytes) = from_text(text) {
        assert_eq!(to_text(&bytes), text);
        token_open(&bytes);
    }
}

/// Oracle for structured claims: seal → open gives the same claims; the validity check at
/// [`NOW`] agrees with the claims' window.
pub fn claims_roundtrip(claims: &Claims) {
    let ring = keyring();
    let sealed = match seal_with(&ring, claims) {
        Ok(sealed) => sealed,
        Err(SealError::TooLong { .. }) => return,
        Err(e) => panic!("sealing failed: {e}"),
    };
    let opened = ring
        .open_authentic_at(&sealed, AAD, NOW)
        .expect("sealed token opens");
    assert_eq!(&opened, claims);
    let skew = OpenOptions::default().clock_skew.as_secs();
    match ring.open_at(&sealed, AAD, &OpenOptions::default(), NOW) {
        Ok(c) => {
            assert_eq!(&c, claims);
            assert!(NOW < claims.expires_at.saturating_add(skew));
            assert!(NOW.saturating_add(skew) >= claims.not_before);
        }
        Err(OpenError::Expired { .. }) => assert!(NOW >= claims.expires_at.saturating_add(skew)),
        Err(OpenError::NotYetValid { .. }) => {
            assert!(NOW.saturating_add(skew) < claims.not_before);
        }
        Err(e) => panic!("unexpected open error: {e}"),
    }
    assert!(matches!(
        ring.open_at(&sealed, b"other", &OpenOptions::default(), NOW),
        Err(OpenError::BadTag)
    ));
}
