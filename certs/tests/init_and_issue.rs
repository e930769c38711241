//! `init_dir` and leaf issuance, checked independently with x509-parser and openssl.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sibyl_certs::{
    CertError, CertPaths, DevCa, InitOptions, init_dir, load_certs, load_key, sha256_fingerprint,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn opts_with(names: &[&str]) -> InitOptions {
    InitOptions {
        names: names.iter().map(|s| (*s).to_owned()).collect(),
        ..InitOptions::default()
    }
}

#[test]
fn defaults_are_documented_values() {
    let o = InitOptions::default();
    assert!(o.names.is_empty());
    assert_eq!(o.leaf_lifetime, Duration::from_secs(90 * 86400));
    assert_eq!(o.ca_lifetime, Duration::from_secs(3650 * 86400));
    assert_eq!(o.backdate, Duration::from_secs(3600));
}

#[test]
fn init_writes_four_files_with_key_modes_and_reuses_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let paths = init_dir(&dir, &opts_with(&["edge.example"])).unwrap();
    assert_eq!(paths, CertPaths::in_dir(&dir));
    assert_eq!(mode(&dir), 0o700);
    for p in [
        &paths.ca_cert,
        &paths.ca_key,
        &paths.server_cert,
        &paths.server_key,
    ] {
        assert!(p.is_file(), "{} missing", p.display());
    }
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.key", "ca.pem", "server.key", "server.pem"]);
    assert_eq!(mode(&paths.ca_key), 0o600);
    assert_eq!(mode(&paths.server_key), 0o600);
    assert_eq!(mode(&paths.ca_cert), 0o644);
    load_key(&paths.server_key).unwrap();

    let ca_fp = sha256_fingerprint(&load_certs(&paths.ca_cert).unwrap()[0]);
    let leaf_fp = sha256_fingerprint(&load_certs(&paths.server_cert).unwrap()[0]);

    let again = init_dir(&dir, &opts_with(&["edge.example"])).unwrap();
    assert_eq!(
        sha256_fingerprint(&load_certs(&again.ca_cert).unwrap()[0]),
        ca_fp,
        "second init must reuse the CA"
    );
    assert_ne!(
        sha256_fingerprint(&load_certs(&again.server_cert).unwrap()[0]),
        leaf_fp,
        "second init re-issues the leaf"
    );
    // The loaded CA is the same CA.
    let ca = DevCa::load(&paths.ca_cert, &paths.ca_key).unwrap();
    assert_eq!(ca.fingerprint(), ca_fp);
}

#[test]
fn init_refuses_half_a_ca_and_insecure_ca_key() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = init_dir(tmp.path(), &InitOptions::default()).unwrap();
    let ca_pem = std::fs::read(&paths.ca_cert).unwrap();
    std::fs::remove_file(&paths.ca_key).unwrap();
    let err = init_dir(tmp.path(), &InitOptions::default()).unwrap_err();
    assert!(matches!(err, CertError::IncompleteCa { .. }), "{err:?}");
    assert!(err.to_string().contains("ca.key"), "{err}");
    // The surviving CA certificate was not overwritten.
    assert_eq!(std::fs::read(&paths.ca_cert).unwrap(), ca_pem);

    let tmp = tempfile::tempdir().unwrap();
    let paths = init_dir(tmp.path(), &InitOptions::default()).unwrap();
    std::fs::set_permissions(&paths.ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = init_dir(tmp.path(), &InitOptions::default()).unwrap_err();
    assert!(
        matches!(err, CertError::InsecureKeyFile { mode: 0o644, .. }),
        "{err:?}"
    );
}

#[test]
fn leaf_sans_validity_and_issuer_via_x509_parser() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = init_dir(
        tmp.path(),
        &opts_with(&["shard-7.edge.example", "10.1.2.3"]),
    )
    .unwrap();
    let leaf_der = load_certs(&paths.server_cert).unwrap().remove(0);
    let ca_der = load_certs(&paths.ca_cert).unwrap().remove(0);
    let (rest, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    assert!(rest.is_empty());
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();

    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for ext in leaf.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(d) => dns.push(d.to_string()),
                    GeneralName::IPAddress(b) => ips.push(b.to_vec()),
                    other => panic!("unexpected SAN {other:?}"),
                }
            }
        }
    }
    assert!(dns.contains(&"localhost".to_owned()), "{dns:?}");
    assert!(dns.contains(&"shard-7.edge.example".to_owned()), "{dns:?}");
    assert!(ips.contains(&vec![127, 0, 0, 1]), "{ips:?}");
    let mut v6_loopback = vec![0u8; 16];
    v6_loopback[15] = 1;
    assert!(ips.contains(&v6_loopback), "{ips:?}");
    assert!(ips.contains(&vec![10, 1, 2, 3]), "{ips:?}");

    // Issued by the CA, signature checks out, and the CA is a CA.
    assert_eq!(leaf.issuer(), ca.subject());
    leaf.verify_signature(Some(ca.public_key())).unwrap();
    assert!(ca.is_ca());
    assert!(!leaf.is_ca());

    // Backdated by about the default hour, valid for about 90 days.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    assert!(
        nb <= now - 3600 + 5 && nb >= now - 3600 - 600,
        "not_before {nb} now {now}"
    );
    assert!(
        (na - (now + 90 * 86400)).abs() < 600,
        "not_after {na} now {now}"
    );
    let ca_na = ca.validity().not_after.timestamp();
    assert!((ca_na - (now + 3650 * 86400)).abs() < 600);
}

#[test]
fn backdate_and_lifetime_follow_options_exactly_at_a_given_instant() {
    let opts = InitOptions {
        backdate: Duration::from_secs(7200),
        leaf_lifetime: Duration::from_secs(86400),
        ca_lifetime: Duration::from_secs(10 * 86400),
        ..InitOptions::default()
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let ca = DevCa::generate_at(&opts, now).unwrap();
    let leaf = ca.issue_leaf_at(&[], &opts, now).unwrap();
    let (_, cert) = X509Certificate::from_der(&leaf.cert_der).unwrap();
    assert_eq!(cert.validity().not_before.timestamp(), 1_800_000_000 - 7200);
    assert_eq!(cert.validity().not_after.timestamp(), 1_800_000_000 + 86400);
    let ca_der = ca.cert_der();
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
    assert_eq!(
        ca_cert.validity().not_before.timestamp(),
        1_800_000_000 - 7200
    );
    assert_eq!(
        ca_cert.validity().not_after.timestamp(),
        1_800_000_000 + 10 * 86400
    );

    let absurd = InitOptions {
        leaf_lifetime: Duration::from_secs(u64::MAX),
        ..InitOptions::default()
    };
    assert!(matches!(
        ca.issue_leaf(&[], &absurd),
        Err(CertError::InvalidOptions(_))
    ));
}

#[test]
fn openssl_sees_the_sans_and_the_chain() {
    let Ok(out) = Command::new("openssl").arg("version").output() else {
        eprintln!("openssl not on PATH; skipping the openssl cross-check");
        return;
    };
    assert!(out.status.success());
    let tmp = tempfile::tempdir().unwrap();
    let paths = init_dir(tmp.path(), &opts_with(&["hub.sibyl.test"])).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&paths.server_cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let san_line = text
        .lines()
        .skip_while(|l| !l.contains("X509v3 Subject Alternative Name"))
        .nth(1)
        .unwrap_or_else(|| panic!("no SAN extension in:\n{text}"));
    for want in [
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
        "DNS:hub.sibyl.test",
    ] {
        assert!(san_line.contains(want), "{want} not in {san_line}");
    }
    // openssl also accepts the chain.
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&paths.ca_cert)
        .arg(&paths.server_cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And the key is a key openssl can read.
    let out = Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(&paths.server_key)
        .output()
        .unwrap();
    assert!(out.status.success());
}
