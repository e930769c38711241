//! The text form of a sealed token: unpadded base64url.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::OpenError;
use crate::keyring::MAX_SEALED_LEN;

/// Longest text form: unpadded base64url of [`MAX_SEALED_LEN`] bytes.
pub const MAX_TEXT_LEN: usize = (MAX_SEALED_LEN * 4).div_ceil(3);

/// Encodes a sealed token as unpadded base64url.
pub fn to_text(sealed: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(sealed)
}

/// Decodes the text form; the length is bounded before decoding. The bytes still have to be
/// opened.
pub fn from_text(text: &str) -> Result<Vec<u8>, OpenError> {
    if text.len() > MAX_TEXT_LEN {
        return Err(OpenError::TooLong { len: text.len() });
    }
    URL_SAFE_NO_PAD.decode(text).map_err(|_| OpenError::Text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let bytes: Vec<u8> = (0..=255).collect();
        let text = to_text(&bytes);
        assert!(!text.contains(['=', '+', '/']));
        assert_eq!(from_text(&text).unwrap(), bytes);
        assert_eq!(to_text(&[0u8; MAX_SEALED_LEN]).len(), MAX_TEXT_LEN);
        assert_eq!(
            from_text(&to_text(&[7u8; MAX_SEALED_LEN])).unwrap().len(),
            MAX_SEALED_LEN
        );
        let long = "A".repeat(MAX_TEXT_LEN + 1);
        assert!(
            matches!(from_text(&long), Err(OpenError::TooLong { len }) if len == MAX_TEXT_LEN + 1)
        );
        for bad in ["AAA=", "A+/A", "A", "é"] {
            assert!(matches!(from_text(bad), Err(OpenError::Text)), "{bad}");
        }
    }
}
