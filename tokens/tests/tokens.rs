//! Sealing, opening, rotation and key files, walked through synthetic instants.

use std::time::Duration;

use proptest::prelude::*;
use sibyl_tokens::{
    Action, Claims, KeyId, Keyring, KeyringError, MAX_KEYS, MAX_SEALED_LEN, OpenError, OpenOptions,
    Scope, SealError, SessionSecret, StreamPattern, TokenId, from_text, to_text,
};

const T0: u64 = 1_700_000_000;
const AAD: &[u8] = b"deployment-eu-1";

fn claims_at(now: u64, ttl: u64) -> Claims {
    let scopes = vec![
        Scope::subscribe("orders.*".parse().unwrap()),
        Scope {
            stream: "audit".parse().unwrap(),
            subscribe: true,
            publish: true,
        },
    ];
    Claims::issue(
        "client-0000-0042",
        3,
        scopes,
        "standard",
        now,
        Duration::from_secs(ttl),
    )
    .unwrap()
}

fn no_skew() -> OpenOptions {
    OpenOptions::default().with_clock_skew(Duration::ZERO)
}

#[test]
fn round_trip_bytes_and_text() {
    let ring = Keyring::generate().unwrap();
    let claims = claims_at(T0, 600);
    let sealed = ring.seal(&claims, AAD).unwrap();
    assert!(sealed.len() <= MAX_SEALED_LEN);
    assert_eq!(sealed[0], 1);
    assert_eq!(&sealed[1..5], &ring.active_key_id().0.to_be_bytes());
    let opened = ring
        .open_at(&sealed, AAD, &OpenOptions::default(), T0)
        .unwrap();
    assert_eq!(opened, claims);
    assert!(opened.allows("orders.eu", Action::Subscribe));
    assert!(!opened.allows("orders.eu", Action::Publish));

    let text = to_text(&sealed);
    assert_eq!(from_text(&text).unwrap(), sealed);
    // Public wrapper reading the real clock: claims issued now are valid now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fresh = claims_at(now, 600);
    let sealed = ring.seal(&fresh, AAD).unwrap();
    assert_eq!(
        ring.open(&sealed, AAD, &OpenOptions::default()).unwrap(),
        fresh
    );
}

#[test]
fn nonces_differ_between_seals() {
    let ring = Keyring::generate().unwrap();
    let claims = claims_at(T0, 600);
    assert_ne!(
        ring.seal(&claims, AAD).unwrap(),
        ring.seal(&claims, AAD).unwrap()
    );
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let ring = Keyring::generate().unwrap();
    let sealed = ring.seal(&claims_at(T0, 600), AAD).unwrap();
    let opts = OpenOptions::default();
    for i in 0..sealed.len() {
        for bit in 0..8 {
            let mut bad = sealed.clone();
            bad[i] ^= 1 << bit;
            let err = ring.open_at(&bad, AAD, &opts, T0).unwrap_err();
            let expected = match i {
                0 => matches!(err, OpenError::UnknownVersion(v) if v == bad[0]),
                1..=4 => matches!(err, OpenError::UnknownKey(_)),
                _ => matches!(err, OpenError::BadTag),
            };
            assert!(expected, "byte {i} bit {bit}: {err:?}");
        }
    }
}

#[test]
fn wrong_key_aad_and_lengths_rejected() {
    let ring = Keyring::generate().unwrap();
    let other = Keyring::generate().unwrap(); // also key id 1, different bytes
    let claims = claims_at(T0, 600);
    let sealed = ring.seal(&claims, AAD).unwrap();
    let opts = OpenOptions::default();
    assert!(matches!(
        other.open_at(&sealed, AAD, &opts, T0),
        Err(OpenError::BadTag)
    ));
    assert!(matches!(
        ring.open_at(&sealed, b"deployment-us-1", &opts, T0),
        Err(OpenError::BadTag)
    ));
    assert!(matches!(
        ring.open_at(&sealed, &[7u8; 300], &opts, T0),
        Err(OpenError::BadTag)
    ));
    let long_aad = [9u8; 300];
    let sealed_long = ring.seal(&claims, &long_aad).unwrap();
    assert_eq!(
        ring.open_at(&sealed_long, &long_aad, &opts, T0).unwrap(),
        claims
    );

    let mut trailing = sealed.clone();
    trailing.push(0);
    assert!(matches!(
        ring.open_at(&trailing, AAD, &opts, T0),
        Err(OpenError::BadTag)
    ));
    assert!(matches!(
        ring.open_at(&sealed[..44], AAD, &opts, T0),
        Err(OpenError::Truncated { len: 44 })
    ));
    assert!(matches!(
        ring.open_at(&[], AAD, &opts, T0),
        Err(OpenError::Truncated { len: 0 })
    ));
    let huge = vec![1u8; MAX_SEALED_LEN + 1];
    assert!(matches!(
        ring.open_at(&huge, AAD, &opts, T0),
        Err(OpenError::TooLong { .. })
    ));
    let mut v2 = sealed.clone();
    v2[0] = 2;
    assert!(matches!(
        ring.open_at(&v2, AAD, &opts, T0),
        Err(OpenError::UnknownVersion(2))
    ));
    let mut unknown = sealed;
    unknown[1..5].copy_from_slice(&99u32.to_be_bytes());
    assert!(matches!(
        ring.open_at(&unknown, AAD, &opts, T0),
        Err(OpenError::UnknownKey(KeyId(99)))
    ));
}

#[test]
fn oversized_claims_refused_at_seal() {
    let ring = Keyring::generate().unwrap();
    let mut claims = claims_at(T0, 600);
    claims.client_id = "x".repeat(MAX_SEALED_LEN);
    assert!(matches!(
        ring.seal(&claims, AAD),
        Err(SealError::TooLong { .. })
    ));
}

#[test]
fn expiry_and_skew_edges() {
    let ring = Keyring::generate().unwrap();
    let mut claims = claims_at(T0, 600); // valid [T0, T0 + 600)
    claims.not_before = T0 + 100;
    let sealed = ring.seal(&claims, AAD).unwrap();
    let open = |now, opts: &OpenOptions| ring.open_at(&sealed, AAD, opts, now);

    let strict = no_skew();
    assert!(
        matches!(open(T0 + 99, &strict), Err(OpenError::NotYetValid { not_before, now }) if not_before == T0 + 100 && now == T0 + 99)
    );
    assert!(open(T0 + 100, &strict).is_ok());
    assert!(open(T0 + 599, &strict).is_ok());
    assert!(
        matches!(open(T0 + 600, &strict), Err(OpenError::Expired { expires_at, now }) if expires_at == T0 + 600 && now == T0 + 600)
    );

    let skew = OpenOptions::default(); // 30 s
    assert_eq!(skew.clock_skew, Duration::from_secs(30));
    assert!(matches!(
        open(T0 + 69, &skew),
        Err(OpenError::NotYetValid { .. })
    ));
    assert!(open(T0 + 70, &skew).is_ok());
    assert!(open(T0 + 629, &skew).is_ok());
    assert!(matches!(
        open(T0 + 630, &skew),
        Err(OpenError::Expired { .. })
    ));
    assert!(open(T0 + 630, &skew).unwrap_err().is_stale());

    // Extremes saturate rather than wrap.
    let mut forever = claims_at(0, 0);
    forever.not_before = 0;
    forever.expires_at = u64::MAX;
    let sealed = ring.seal(&forever, AAD).unwrap();
    let big = OpenOptions::default().with_clock_skew(Duration::from_secs(u64::MAX));
    assert!(ring.open_at(&sealed, AAD, &big, u64::MAX - 1).is_ok());
    assert!(ring.open_at(&sealed, AAD, &strict, 0).is_ok());
}

#[test]
fn rotation_walked_through_synthetic_instants() {
    let mut ring = Keyring::generate().unwrap();
    let opts = OpenOptions::default();
    let k1 = ring.active_key_id();
    assert_eq!(k1, KeyId(1));
    let t1 = ring.seal(&claims_at(T0, 10_000), AAD).unwrap();

    // T0 + 100: rotate with one hour of grace.
    let k2 = ring.rotate_at(T0 + 100, Duration::from_secs(3600)).unwrap();
    assert_eq!(k2, KeyId(2));
    assert_eq!(ring.active_key_id(), k2);
    assert_eq!(ring.key_ids().collect::<Vec<_>>(), vec![k1, k2]);
    assert_eq!(ring.retires_at(k1), Some(T0 + 3700));
    assert_eq!(ring.retires_at(k2), None);
    let t2 = ring.seal(&claims_at(T0 + 100, 10_000), AAD).unwrap();
    assert_eq!(&t2[1..5], &2u32.to_be_bytes());

    // Within grace both open; the old key only opens.
    assert!(ring.open_at(&t1, AAD, &opts, T0 + 3699).is_ok());
    assert!(ring.open_at(&t2, AAD, &opts, T0 + 3699).is_ok());
    // At the retirement instant the old key stops.
    let err = ring.open_at(&t1, AAD, &opts, T0 + 3700).unwrap_err();
    assert!(matches!(err, OpenError::RetiredKey(KeyId(1))), "{err:?}");
    assert!(err.is_stale());
    assert!(ring.open_at(&t2, AAD, &opts, T0 + 3700).is_ok());

    // Rotating again after that prunes key 1 entirely: then it is unknown.
    let k3 = ring.rotate_at(T0 + 5000, Duration::from_secs(60)).unwrap();
    assert_eq!(ring.key_ids().collect::<Vec<_>>(), vec![k2, k3]);
    assert!(matches!(
        ring.open_at(&t1, AAD, &opts, T0 + 5000),
        Err(OpenError::UnknownKey(KeyId(1)))
    ));
    assert!(ring.open_at(&t2, AAD, &opts, T0 + 5059).is_ok());
    assert!(matches!(
        ring.open_at(&t2, AAD, &opts, T0 + 5060),
        Err(OpenError::RetiredKey(KeyId(2)))
    ));

    // A clone shares keys; an encoded copy opens the same tokens.
    let copy = Keyring::from_bytes(&ring.to_bytes()).unwrap();
    assert_eq!(copy.key_ids().collect::<Vec<_>>(), vec![k2, k3]);
    assert!(copy.open_at(&t2, AAD, &opts, T0 + 5059).is_ok());
    assert_eq!(copy.retires_at(k2), Some(T0 + 5060));
}

#[test]
fn rotation_is_bounded() {
    let mut ring = Keyring::generate().unwrap();
    for i in 1..MAX_KEYS {
        ring.rotate_at(T0 + i as u64, Duration::from_secs(3600))
            .unwrap();
    }
    assert!(matches!(
        ring.rotate_at(T0 + 100, Duration::from_secs(3600)),
        Err(KeyringError::TooManyKeys)
    ));
    // Once the grace periods are over, rotation prunes and succeeds.
    ring.rotate_at(T0 + 10_000, Duration::ZERO).unwrap();
    assert_eq!(ring.key_ids().count(), 2);
}

#[test]
fn debug_never_prints_secrets() {
    let ring = Keyring::generate().unwrap();
    let bytes = ring.to_bytes();
    let debug = format!("{ring:?}");
    assert!(debug.contains("active"), "{debug}");
    // The key bytes sit at the end of the encoding (map value after "k").
    let key = &bytes[bytes.len() - 32 - 3..bytes.len() - 3];
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let list = format!("{key:?}");
    assert!(
        !debug.contains(&hex) && !debug.contains(&list[1..list.len() - 1]),
        "{debug}"
    );
}

#[test]
fn keyring_bytes_validated() {
    assert!(matches!(
        Keyring::from_bytes(&[0xff]),
        Err(KeyringError::Malformed(_))
    ));
    assert!(matches!(
        Keyring::from_bytes(&vec![0; 64 * 1024]),
        Err(KeyringError::TooLarge { .. })
    ));
    let mut bytes = Keyring::generate().unwrap().to_bytes();
    bytes.push(0);
    assert!(matches!(
        Keyring::from_bytes(&bytes),
        Err(KeyringError::Malformed(_))
    ));
}

#[cfg(unix)]
#[test]
fn key_file_mode_and_atomic_save() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.key");
    let mut ring = Keyring::generate().unwrap();
    ring.rotate_at(T0, Duration::from_secs(60)).unwrap();
    ring.save(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temp file left behind"
    );

    let loaded = Keyring::load(&path).unwrap();
    assert_eq!(
        loaded.key_ids().collect::<Vec<_>>(),
        ring.key_ids().collect::<Vec<_>>()
    );
    let sealed = ring.seal(&claims_at(T0, 60), AAD).unwrap();
    assert!(
        loaded
            .open_at(&sealed, AAD, &OpenOptions::default(), T0)
            .is_ok()
    );

    // Overwriting keeps 0600 and replaces the content.
    let fresh = Keyring::generate().unwrap();
    fresh.save(&path).unwrap();
    assert_eq!(Keyring::load(&path).unwrap().key_ids().count(), 1);

    for bad in [0o640, 0o604, 0o660, 0o644, 0o610] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bad)).unwrap();
        match Keyring::load(&path) {
            Err(KeyringError::InsecurePermissions { path: p, mode }) => {
                assert_eq!(p, path);
                assert_eq!(mode & 0o777, bad);
                let msg = KeyringError::InsecurePermissions { path: p, mode }.to_string();
                assert!(
                    msg.contains("tokens.key") && msg.contains(&format!("{bad:04o}")),
                    "{msg}"
                );
            }
            other => panic!("mode {bad:o}: {other:?}"),
        }
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    assert!(Keyring::load(&path).is_ok());
    assert!(matches!(
        Keyring::load(&dir.path().join("missing")),
        Err(KeyringError::Io { .. })
    ));
}

fn arb_pattern() -> impl Strategy<Value = StreamPattern> {
    prop_oneof![
        ".{0,24}".prop_map(StreamPattern::Exact),
        ".{0,24}".prop_map(StreamPattern::Prefix),
    ]
}

fn arb_claims() -> impl Strategy<Value = Claims> {
    (
        any::<[u8; 16]>(),
        ".{0,40}",
        any::<u32>(),
        any::<[u8; 32]>(),
        proptest::collection::vec((arb_pattern(), any::<bool>(), any::<bool>()), 0..6),
        "[a-z]{0,12}",
        any::<(u64, u64, u64)>(),
    )
        .prop_map(
            |(id, client, group, secret, scopes, rate, (i, n, e))| Claims {
                token_id: TokenId(id),
                client_id: client,
                shard_group: group,
                session_secret: SessionSecret::from_bytes(secret),
                scopes: scopes
                    .into_iter()
                    .map(|(stream, subscribe, publish)| Scope {
                        stream,
                        subscribe,
                        publish,
                    })
                    .collect(),
                rate_class: rate,
                issued_at: i,
                not_before: n,
                expires_at: e,
                protocol_version: 1,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_claims_round_trip(claims in arb_claims(), aad in proptest::collection::vec(any::<u8>(), 0..200)) {
        let ring = Keyring::generate().unwrap();
        let sealed = ring.seal(&claims, &aad).unwrap();
        prop_assert!(sealed.len() <= MAX_SEALED_LEN);
        let opts = OpenOptions::default().with_clock_skew(Duration::ZERO);
        let now = claims.not_before;
        match ring.open_at(&from_text(&to_text(&sealed)).unwrap(), &aad, &opts, now) {
            Ok(opened) => prop_assert_eq!(opened, claims),
            Err(OpenError::Expired { expires_at, .. }) => prop_assert!(now >= expires_at),
            Err(e) => prop_assert!(false, "unexpected {:?}", e),
        }
    }

    #[test]
    fn pattern_text_round_trips(pattern in "[a-z.]{1,12}\\*?") {
        let parsed: StreamPattern = pattern.parse().unwrap();
        prop_assert_eq!(parsed.to_string(), pattern);
    }
}
