//! The one place the project touches a CBOR implementation.
//!
//! Every CBOR body in Sibyl — sealed token claims, wire frame bodies, the hub↔shard control
//! channel — goes through [`to_vec`] and [`from_slice`]. Swapping `serde_cbor` for another
//! codec means changing this file only.
//!
//! Decoding is strict: the input must hold exactly one CBOR item (trailing bytes are an
//! error), and callers bound the input length *before* calling [`from_slice`].

use serde::{Serialize, de::DeserializeOwned};

/// Why a CBOR body could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CborError {
    /// The bytes are not a well-formed CBOR item of the expected shape.
    #[error("malformed CBOR: {0}")]
    Malformed(String),
    /// Bytes remained after the single expected CBOR item.
    #[error("trailing bytes after CBOR item")]
    TrailingBytes,
    /// The value could not be serialized (a bug in the caller's type, never peer input).
    #[error("CBOR encode failed: {0}")]
    Encode(String),
}

/// Encodes `value` as a single CBOR item.
pub fn to_vec<T: Serialize>(value: &T) -> Result<Vec<u8>, CborError> {
    serde_cbor::to_vec(value).map_err(|e| CborError::Encode(e.to_string()))
}

/// Appends `value` encoded as a single CBOR item to `out`.
pub fn to_writer<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CborError> {
    serde_cbor::to_writer(out, value).map_err(|e| CborError::Encode(e.to_string()))
}

/// Decodes exactly one CBOR item from `bytes`; trailing bytes are rejected.
///
/// The caller bounds `bytes.len()` before calling; `serde_cbor` additionally bounds nesting
/// depth, so hostile input cannot exhaust the stack.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CborError> {
    let mut de = serde_cbor::Deserializer::from_slice(bytes);
    let value = T::deserialize(&mut de).map_err(|e| CborError::Malformed(e.to_string()))?;
    de.end().map_err(|e| {
        if e.is_syntax() || e.is_eof() || e.is_data() {
            CborError::TrailingBytes
        } else {
            CborError::Malformed(e.to_string())
        }
    })?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        a: u32,
        #[serde(with = "serde_bytes")]
        b: Vec<u8>,
    }

    #[test]
    fn round_trip() {
        let s = Sample {
            a: 7,
            b: vec![1, 2, 3],
        };
        let bytes = to_vec(&s).unwrap();
        assert_eq!(from_slice::<Sample>(&bytes).unwrap(), s);
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut bytes = to_vec(&Sample { a: 1, b: vec![] }).unwrap();
        bytes.push(0);
        assert!(matches!(
            from_slice::<Sample>(&bytes),
            Err(CborError::TrailingBytes)
        ));
    }

    #[test]
    fn garbage_rejected() {
        assert!(matches!(
            from_slice::<Sample>(&[0xff, 0x00]),
            Err(CborError::Malformed(_))
        ));
        assert!(from_slice::<Sample>(&[]).is_err());
    }
}
