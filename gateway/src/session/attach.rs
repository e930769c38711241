//! The attach check, I/O-free: token, group, client id and proof → claims or the close code.
//! `EarlyAttach` (0-RTT) runs the same checks in two steps: [`check_token`] at once,
//! [`check_proof`] when `AttachProof` arrives after the handshake.
//!
//! ```text
//! Attach{token, proof, client_id} + exporter(this connection) + now
//!   ── Keyring::open_at(AAD = deployment id, clock skew) ──▶ Claims   (TOKEN_EXPIRED | TOKEN_INVALID)
//!   ── claims.shard_group == own group ─────────────────────▶         (WRONG_GROUP)
//!   ── claims.client_id == attach.client_id ────────────────▶         (TOKEN_INVALID)
//!   ── verify_attach_proof(secret, exporter, proof) ────────▶ ok      (PROOF_FAILED)
//! ```

use sibyl_proto::ErrorCode;
use sibyl_proto::frame::Attach;
use sibyl_tokens::{Claims, Keyring, OpenError, OpenOptions};

/// Why an `Attach` was refused: the close code and a reason for the peer's logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct AttachRefusal {
    /// Application error code to close the connection with.
    pub code: ErrorCode,
    /// Human-readable reason (sent as the close reason).
    pub reason: String,
}

impl AttachRefusal {
    fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// The code for a token that did not open.
pub fn open_error_code(e: &OpenError) -> ErrorCode {
    match e {
        OpenError::Expired { .. } => ErrorCode::TokenExpired,
        _ => ErrorCode::TokenInvalid,
    }
}

/// What a shard checks an `Attach` against.
#[derive(Debug, Clone, Copy)]
pub struct AttachContext<'a> {
    /// The current keyring.
    pub keyring: &'a Keyring,
    /// The AAD tokens are sealed with (deployment id).
    pub aad: &'a [u8],
    /// Clock skew tolerated on the token's validity window.
    pub open: OpenOptions,
    /// This shard's group.
    pub group: u32,
}

/// Checks `attach` received on a connection whose TLS exporter is `exporter`, as of `now`
/// (Unix seconds). Returns the token's claims, or the refusal with its documented code.
pub fn check_attach(
    ctx: &AttachContext<'_>,
    attach: &Attach,
    exporter: &[u8; 32],
    now: u64,
) -> Result<Claims, AttachRefusal> {
    let claims = check_token(ctx, &attach.token, &attach.client_id, now)?;
    check_proof(&claims, exporter, &attach.proof)?;
    Ok(claims)
}

/// Every check of an `Attach` but the proof (what an `EarlyAttach` gets before its
/// `AttachProof`): the token opens (`TOKEN_EXPIRED`, `TOKEN_INVALID`), is for this group
/// (`WRONG_GROUP`) and was issued to `client_id` (`TOKEN_INVALID`).
pub fn check_token(
    ctx: &AttachContext<'_>,
    token: &[u8],
    client_id: &str,
    now: u64,
) -> Result<Claims, AttachRefusal> {
    let claims = ctx
        .keyring
        .open_at(token, ctx.aad, &ctx.open, now)
        .map_err(|e| AttachRefusal::new(open_error_code(&e), e.to_string()))?;
    if claims.shard_group != ctx.group {
        return Err(AttachRefusal::new(
            ErrorCode::WrongGroup,
            format!(
                "token is for shard group {}, this shard serves group {}",
                claims.shard_group, ctx.group
            ),
        ));
    }
    if claims.client_id != client_id {
        return Err(AttachRefusal::new(
            ErrorCode::TokenInvalid,
            "token was issued to another client_id",
        ));
    }
    if !sibyl_proto::SUPPORTED_VERSIONS.contains(&claims.protocol_version) {
        return Err(AttachRefusal::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "token is for protocol version {}, this shard speaks {:?}",
                claims.protocol_version,
                sibyl_proto::SUPPORTED_VERSIONS
            ),
        ));
    }
    Ok(claims)
}

/// The proof check (`PROOF_FAILED`): `proof` is the MAC of the token's session secret over
/// this connection's TLS `exporter`.
pub fn check_proof(
    claims: &Claims,
    exporter: &[u8; 32],
    proof: &[u8; 32],
) -> Result<(), AttachRefusal> {
    if sibyl_proto::verify_attach_proof(claims.session_secret.as_bytes(), exporter, proof) {
        Ok(())
    } else {
        Err(AttachRefusal::new(
            ErrorCode::ProofFailed,
            "attach proof does not match this connection",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sibyl_proto::attach_proof;
    use sibyl_tokens::{Scope, StreamPattern};

    use super::*;

    const NOW: u64 = 1_700_000_000;
    const AAD: &[u8] = b"sibyl-test";

    fn claims(group: u32) -> Claims {
        Claims::issue(
            "app-1",
            group,
            vec![Scope::subscribe(StreamPattern::Exact("prices".into()))],
            "default",
            NOW,
            Duration::from_secs(60),
        )
        .unwrap()
    }

    fn attach(ring: &Keyring, c: &Claims, exporter: &[u8; 32]) -> Attach {
        Attach {
            token: ring.seal(c, AAD).unwrap(),
            proof: attach_proof(c.session_secret.as_bytes(), exporter),
            client_id: c.client_id.clone(),
            resume: None,
        }
    }

    fn ctx(ring: &Keyring) -> AttachContext<'_> {
        AttachContext {
            keyring: ring,
            aad: AAD,
            open: OpenOptions::default().with_clock_skew(Duration::ZERO),
            group: 1,
        }
    }

    #[test]
    fn valid_attach_opens() {
        let ring = Keyring::generate().unwrap();
        let c = claims(1);
        let ex = [7; 32];
        let got = check_attach(&ctx(&ring), &attach(&ring, &c, &ex), &ex, NOW + 1).unwrap();
        assert_eq!(got, c);
    }

    #[test]
    fn every_refusal_has_its_code() {
        let ring = Keyring::generate().unwrap();
        let ex = [7; 32];
        let code = |a: &Attach, ex: &[u8; 32], now: u64| {
            check_attach(&ctx(&ring), a, ex, now).unwrap_err().code
        };
        let good = attach(&ring, &claims(1), &ex);

        // Expired (skew 0): refused from expires_at on.
        assert_eq!(code(&good, &ex, NOW + 60), ErrorCode::TokenExpired);
        // Another group.
        assert_eq!(
            code(&attach(&ring, &claims(0), &ex), &ex, NOW),
            ErrorCode::WrongGroup
        );
        // A protocol version this shard does not speak.
        let v2 = Claims {
            protocol_version: 2,
            ..claims(1)
        };
        assert_eq!(
            code(&attach(&ring, &v2, &ex), &ex, NOW),
            ErrorCode::UnsupportedVersion
        );
        // Proof computed for another connection's exporter.
        assert_eq!(code(&good, &[8; 32], NOW), ErrorCode::ProofFailed);
        // Tampered token, other AAD, other keyring, garbage.
        let mut bad = good.clone();
        bad.token[40] ^= 1;
        assert_eq!(code(&bad, &ex, NOW), ErrorCode::TokenInvalid);
        let other = Keyring::generate().unwrap();
        assert_eq!(
            code(&attach(&other, &claims(1), &ex), &ex, NOW),
            ErrorCode::TokenInvalid
        );
        let mut aad_ctx = ctx(&ring);
        aad_ctx.aad = b"another-deployment";
        assert_eq!(
            check_attach(&aad_ctx, &good, &ex, NOW).unwrap_err().code,
            ErrorCode::TokenInvalid
        );
        let mut garbage = good.clone();
        garbage.token = vec![0xff; 3];
        assert_eq!(code(&garbage, &ex, NOW), ErrorCode::TokenInvalid);
        // client_id differing from the token's.
        let mut other_client = good.clone();
        other_client.client_id = "app-2".into();
        assert_eq!(code(&other_client, &ex, NOW), ErrorCode::TokenInvalid);
    }
}
