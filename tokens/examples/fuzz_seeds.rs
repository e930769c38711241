//! Writes the fuzz seed corpus: real sealed tokens, their text forms, and encoded claims.
//!
//! `cargo run -p sibyl-tokens --features fuzzing --example fuzz_seeds -- fuzz/seeds`
#![allow(missing_docs)]

use std::path::PathBuf;

use sibyl_tokens::fuzzing::{self, AAD, NOW};
use sibyl_tokens::{Claims, OpenOptions, Scope, StreamPattern, to_text};

fn variants() -> Vec<(&'static str, Claims)> {
    let typical = fuzzing::sample_claims();
    let mut wildcard = typical.clone();
    wildcard.scopes = vec![Scope::publish(StreamPattern::Prefix(String::new()))];
    wildcard.rate_class = "bulk".to_owned();
    let mut many = typical.clone();
    many.scopes = (0..12)
        .map(|i| Scope::subscribe(StreamPattern::Exact(format!("stream-{i}"))))
        .collect();
    let mut expired = typical.clone();
    expired.expires_at = NOW - 3600;
    let mut early = typical.clone();
    early.not_before = NOW + 3600;
    early.expires_at = NOW + 7200;
    vec![
        ("typical", typical),
        ("wildcard", wildcard),
        ("many_scopes", many),
        ("expired", expired),
        ("not_yet_valid", early),
    ]
}

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/seeds".to_owned()),
    );
    for target in ["token_open", "token_text", "claims_roundtrip"] {
        std::fs::create_dir_all(root.join(target))?;
    }
    let ring = fuzzing::keyring();
    let old = fuzzing::old_keyring();
    for (name, claims) in variants() {
        let sealed = fuzzing::seal_with(&ring, &claims).expect("seed claims seal");
        std::fs::write(root.join("token_open").join(format!("{name}.bin")), &sealed)?;
        std::fs::write(
            root.join("token_text").join(format!("{name}.txt")),
            to_text(&sealed),
        )?;
        let plain = sibyl_proto::cbor::to_vec(&claims).expect("claims encode");
        std::fs::write(
            root.join("claims_roundtrip").join(format!("{name}.cbor")),
            plain,
        )?;
    }
    // A token sealed under the previous key, still in its grace period at NOW.
    let sealed = fuzzing::seal_with(&old, &fuzzing::sample_claims()).expect("seal");
    assert!(
        ring.open_at(&sealed, AAD, &OpenOptions::default(), NOW)
            .is_ok()
    );
    std::fs::write(root.join("token_open").join("old_key.bin"), &sealed)?;
    std::fs::write(
        root.join("token_text").join("old_key.txt"),
        to_text(&sealed),
    )?;
    println!("seeds written under {}", root.display());
    Ok(())
}
