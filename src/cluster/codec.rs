//! Payload codecs: how a payload `P` becomes the bytes of a log message and
//! back.
//!
//! The trait has the shape of the network layer's codec (encode appends to a
//! `Vec<u8>`, decode takes the whole message as [`Bytes`]) so that the two can
//! become one trait once both are in the crate.

use bytes::Bytes;

/// A payload could not be encoded or decoded.
///
/// # Examples
///
/// ```
/// use snapstream::cluster::{CodecError, JsonCodec, PayloadCodec};
///
/// let err = PayloadCodec::<u64>::decode(&JsonCodec, bytes::Bytes::from_static(b"not json"))
///     .unwrap_err();
/// assert!(matches!(err, CodecError::Other(_)));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A fixed-width payload had the wrong number of bytes.
    #[error("payload of {found} bytes, expected {expected}")]
    Length {
        /// The width of the type.
        expected: usize,
        /// The bytes received.
        found: usize,
    },
    /// A string payload was not UTF-8.
    #[error("payload is not UTF-8")]
    Utf8(#[source] std::str::Utf8Error),
    /// The codec's own format failed (e.g. serde).
    #[error("payload codec failed")]
    Other(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// Encodes payloads `P` to the bytes of a log message and decodes them back.
/// The writer and every node must use the same codec.
///
/// Obligations: `decode(encode(p))` equals `p`; `decode` never panics on
/// arbitrary bytes (it returns a [`CodecError`]): a message that does not
/// decode is quarantined by the node, which goes on.
///
/// # Examples
///
/// ```
/// use snapstream::cluster::{JsonCodec, PayloadCodec};
///
/// let mut buf = Vec::new();
/// JsonCodec.encode(&vec![1u32, 2], &mut buf).unwrap();
/// let back: Vec<u32> = JsonCodec.decode(bytes::Bytes::from(buf)).unwrap();
/// assert_eq!(back, [1, 2]);
/// ```
pub trait PayloadCodec<P>: Send + Sync + 'static {
    /// Appends the encoding of `payload` to `out`.
    ///
    /// # Errors
    ///
    /// A [`CodecError`] when the payload cannot be encoded.
    fn encode(&self, payload: &P, out: &mut Vec<u8>) -> Result<(), CodecError>;

    /// Decodes one payload from `bytes` (the whole of it).
    ///
    /// # Errors
    ///
    /// A [`CodecError`] when the bytes are not a valid encoding.
    fn decode(&self, bytes: Bytes) -> Result<P, CodecError>;
}

/// JSON through serde: any `Serialize + DeserializeOwned` payload.
///
/// # Examples
///
/// ```
/// use snapstream::cluster::{JsonCodec, PayloadCodec};
///
/// let mut buf = Vec::new();
/// JsonCodec.encode(&"up".to_string(), &mut buf).unwrap();
/// assert_eq!(buf, br#""up""#);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl<P> PayloadCodec<P> for JsonCodec
where
    P: serde::Serialize + serde::de::DeserializeOwned,
{
    fn encode(&self, payload: &P, out: &mut Vec<u8>) -> Result<(), CodecError> {
        serde_json::to_writer(out, payload).map_err(|e| CodecError::Other(Box::new(e)))
    }

    fn decode(&self, bytes: Bytes) -> Result<P, CodecError> {
        serde_json::from_slice(&bytes).map_err(|e| CodecError::Other(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_and_refuses_garbage() {
        let mut buf = Vec::new();
        JsonCodec
            .encode(&("a".to_string(), 7u64), &mut buf)
            .unwrap();
        let back: (String, u64) = JsonCodec.decode(Bytes::from(buf)).unwrap();
        assert_eq!(back, ("a".to_string(), 7));
        let err = PayloadCodec::<(String, u64)>::decode(&JsonCodec, Bytes::from_static(b"\xff"));
        assert!(matches!(err, Err(CodecError::Other(_))));
    }
}
