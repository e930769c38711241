//! Seal and open of a typical token (16-character client id, two scopes), and their parts.
//!
//! The cipher figures depend on the `--cfg poly1305_force_soft` / `chacha20_force_soft` flags
//! in the repository's `.cargo/config.toml` (a `RUSTFLAGS` environment variable replaces them).
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use sibyl_tokens::{Claims, Keyring, OpenOptions, Scope, StreamPattern};

fn typical_claims(now: u64) -> Claims {
    let scopes = vec![
        Scope::subscribe(StreamPattern::Prefix("orders.".to_owned())),
        Scope {
            stream: StreamPattern::Exact("audit".to_owned()),
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
        Duration::from_secs(3600),
    )
    .expect("OS randomness")
}

fn bench(c: &mut Criterion) {
    let ring = Keyring::generate().expect("OS randomness");
    let now = 1_700_000_000;
    let claims = typical_claims(now);
    let aad = b"deployment-eu-1";
    let sealed = ring.seal(&claims, aad).expect("seal");
    println!("typical sealed token: {} bytes", sealed.len());
    let opts = OpenOptions::default();

    c.bench_function("seal", |b| {
        b.iter(|| ring.seal(black_box(&claims), black_box(aad)))
    });
    c.bench_function("open", |b| {
        b.iter(|| ring.open_at(black_box(&sealed), black_box(aad), &opts, now))
    });

    // Where the time goes: the parts of seal and open on their own.
    let plain = sibyl_proto::cbor::to_vec(&claims).expect("encode");
    c.bench_function("part/cbor_encode", |b| {
        b.iter(|| sibyl_proto::cbor::to_vec(black_box(&claims)))
    });
    c.bench_function("part/cbor_decode", |b| {
        b.iter(|| sibyl_proto::cbor::from_slice::<Claims>(black_box(&plain)))
    });
    c.bench_function("part/nonce_getrandom", |b| {
        b.iter(|| {
            let mut nonce = [0u8; 24];
            getrandom::fill(&mut nonce).map(|()| nonce)
        })
    });
    c.bench_function("part/nonce_stdrng", |b| {
        // What `Keyring::seal` draws its nonce from: a thread-local `StdRng` seeded from the OS.
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::from_os_rng();
        b.iter(|| {
            let mut nonce = [0u8; 24];
            rng.fill_bytes(&mut nonce);
            nonce
        })
    });
    c.bench_function("part/xchacha20poly1305_seal", |b| {
        use chacha20poly1305::aead::{AeadInPlace, KeyInit};
        let cipher = chacha20poly1305::XChaCha20Poly1305::new(&[7u8; 32].into());
        let nonce = [9u8; 24];
        let mut buf = plain.clone();
        b.iter(|| {
            cipher.encrypt_in_place_detached(&nonce.into(), black_box(aad), black_box(&mut buf))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
