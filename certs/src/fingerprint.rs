//! SHA-256 certificate fingerprints: compute, print, parse.

use sha2::{Digest, Sha256};

use crate::CertError;

/// SHA-256 of a certificate's DER encoding (what `openssl x509 -fingerprint -sha256` prints).
pub fn sha256_fingerprint(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

/// Upper-case hex with `:` between bytes, `AB:CD:...`, the form `openssl` prints.
pub fn fingerprint_hex(fp: &[u8; 32]) -> String {
    let mut out = String::with_capacity(32 * 3);
    for (i, b) in fp.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(&hex::encode_upper([*b]));
    }
    out
}

/// Parses a fingerprint as printed by [`fingerprint_hex`] (`AB:CD:...`) or as plain hex, in
/// either case; surrounding whitespace, a `sha256:` prefix and openssl's
/// `sha256 Fingerprint=` prefix are ignored.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], CertError> {
    let mut body = s.trim();
    // `openssl x509 -fingerprint` prints `sha256 Fingerprint=AB:CD:...`.
    if let Some((_, rest)) = body.rsplit_once('=') {
        body = rest.trim();
    }
    if body.len() >= 7 && body[..7].eq_ignore_ascii_case("sha256:") {
        body = &body[7..];
    }
    // Bounded before any allocation proportional to input.
    if body.len() > 32 * 3 {
        return Err(CertError::BadFingerprint(format!(
            "{} characters is too long for 32 bytes",
            body.len()
        )));
    }
    let hex_digits: String = if body.contains(':') {
        let parts: Vec<&str> = body.split(':').collect();
        if parts.len() != 32 || parts.iter().any(|p| p.len() != 2) {
            return Err(CertError::BadFingerprint(
                "expected 32 colon-separated byte pairs".into(),
            ));
        }
        parts.concat()
    } else {
        body.to_owned()
    };
    let mut out = [0u8; 32];
    hex::decode_to_slice(&hex_digits, &mut out)
        .map_err(|e| CertError::BadFingerprint(format!("{e} (expected 64 hex digits)")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_both_forms() {
        let fp = sha256_fingerprint(b"hello");
        let colon = fingerprint_hex(&fp);
        assert_eq!(colon.len(), 32 * 3 - 1);
        assert_eq!(parse_fingerprint(&colon).unwrap(), fp);
        assert_eq!(parse_fingerprint(&colon.to_lowercase()).unwrap(), fp);
        let plain = hex::encode(fp);
        assert_eq!(parse_fingerprint(&plain).unwrap(), fp);
        assert_eq!(
            parse_fingerprint(&format!("sha256 Fingerprint={colon}\n")).unwrap(),
            fp
        );
        assert_eq!(parse_fingerprint(&format!("sha256:{plain}")).unwrap(), fp);
    }

    #[test]
    fn known_vector() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let fp = sha256_fingerprint(b"abc");
        assert_eq!(
            hex::encode(fp),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "AB:CD",
            "zz",
            &"ab".repeat(31),
            &"ab".repeat(33),
            &"a".repeat(500),
            "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:8",
        ] {
            assert!(
                matches!(parse_fingerprint(bad), Err(CertError::BadFingerprint(_))),
                "{bad:?} accepted"
            );
        }
    }
}
