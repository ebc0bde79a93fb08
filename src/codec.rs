//! Payload codecs: how a payload `P` becomes bytes and back, for everything
//! that carries events out of the process (features `net` and `jetstream`).
//!
//! The network server encodes every event's payload with a [`PayloadCodec`]
//! and its clients decode it with the same codec; a cluster's log writer
//! encodes each change into a JetStream message and every node decodes it. [`BinaryCodec`] is the fast default
//! for the payload types that have an obvious binary form ([`WireFormat`]:
//! bytes, strings, fixed-width integers); [`JsonCodec`] carries any serde type.

use bytes::Bytes;

/// A payload could not be encoded or decoded.
///
/// # Examples
///
/// ```
/// use snapstream::codec::{BinaryCodec, CodecError, PayloadCodec};
///
/// let err = PayloadCodec::<u64>::decode(&BinaryCodec, bytes::Bytes::from_static(b"abc")).unwrap_err();
/// assert!(matches!(err, CodecError::Length { expected: 8, found: 3 }));
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

/// Encodes payloads `P` to bytes and decodes them back. A server and its
/// clients, or a log writer and every node, must use the same codec.
///
/// Obligations: `decode(encode(p))` equals `p`; `decode` never panics on
/// arbitrary bytes (it returns a [`CodecError`]): a cluster node quarantines a
/// log message that does not decode and goes on.
///
/// # Examples
///
/// ```
/// use snapstream::codec::{BinaryCodec, PayloadCodec};
///
/// let mut buf = Vec::new();
/// BinaryCodec.encode(&"hello".to_string(), &mut buf).unwrap();
/// let back: String = BinaryCodec.decode(bytes::Bytes::from(buf)).unwrap();
/// assert_eq!(back, "hello");
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

/// A payload type with a fixed binary form, used by [`BinaryCodec`]:
/// raw bytes for `Vec<u8>`, [`Bytes`] and `String` (UTF-8 checked on
/// decode), little-endian for the integers, nothing for `()`.
///
/// # Examples
///
/// ```
/// use snapstream::net::WireFormat;
///
/// let mut buf = Vec::new();
/// 7u64.write_to(&mut buf);
/// assert_eq!(buf, 7u64.to_le_bytes());
/// assert_eq!(u64::read_from(bytes::Bytes::from(buf)).unwrap(), 7);
/// ```
pub trait WireFormat: Sized {
    /// Appends the binary form of `self` to `out`.
    fn write_to(&self, out: &mut Vec<u8>);

    /// Reads a value from the whole of `bytes`.
    ///
    /// # Errors
    ///
    /// A [`CodecError`] when `bytes` is not a valid binary form.
    fn read_from(bytes: Bytes) -> Result<Self, CodecError>;
}

impl WireFormat for Vec<u8> {
    fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }

    fn read_from(bytes: Bytes) -> Result<Self, CodecError> {
        Ok(bytes.to_vec())
    }
}

impl WireFormat for Bytes {
    fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }

    fn read_from(bytes: Bytes) -> Result<Self, CodecError> {
        Ok(bytes)
    }
}

impl WireFormat for String {
    fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }

    fn read_from(bytes: Bytes) -> Result<Self, CodecError> {
        std::str::from_utf8(&bytes)
            .map(str::to_owned)
            .map_err(CodecError::Utf8)
    }
}

impl WireFormat for () {
    fn write_to(&self, _out: &mut Vec<u8>) {}

    fn read_from(bytes: Bytes) -> Result<Self, CodecError> {
        if bytes.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Length {
                expected: 0,
                found: bytes.len(),
            })
        }
    }
}

macro_rules! int_wire_format {
    ($($t:ty),*) => {$(
        impl WireFormat for $t {
            fn write_to(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }

            fn read_from(bytes: Bytes) -> Result<Self, CodecError> {
                const N: usize = std::mem::size_of::<$t>();
                let arr: [u8; N] = bytes[..].try_into().map_err(|_| CodecError::Length {
                    expected: N,
                    found: bytes.len(),
                })?;
                Ok(<$t>::from_le_bytes(arr))
            }
        }
    )*};
}

int_wire_format!(u8, u16, u32, u64, u128, i8, i16, i32, i64, i128);

/// The default codec: each payload's [`WireFormat`], no framing, no copies
/// beyond the one into the message.
///
/// # Examples
///
/// See [`PayloadCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BinaryCodec;

impl<P: WireFormat> PayloadCodec<P> for BinaryCodec {
    fn encode(&self, payload: &P, out: &mut Vec<u8>) -> Result<(), CodecError> {
        payload.write_to(out);
        Ok(())
    }

    fn decode(&self, bytes: Bytes) -> Result<P, CodecError> {
        P::read_from(bytes)
    }
}

/// A codec for any serde type, as JSON.
///
/// # Examples
///
/// ```
/// use snapstream::codec::{JsonCodec, PayloadCodec};
///
/// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
/// struct Node { name: String, up: bool }
///
/// let mut buf = Vec::new();
/// JsonCodec.encode(&Node { name: "a".into(), up: true }, &mut buf).unwrap();
/// let back: Node = JsonCodec.decode(bytes::Bytes::from(buf)).unwrap();
/// assert_eq!(back, Node { name: "a".into(), up: true });
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

    fn round_trip<P: WireFormat + PartialEq + std::fmt::Debug>(p: P) {
        let mut buf = Vec::new();
        BinaryCodec.encode(&p, &mut buf).unwrap();
        let back: P = BinaryCodec.decode(Bytes::from(buf)).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn binary_round_trips() {
        round_trip(vec![1u8, 2, 3]);
        round_trip(Bytes::from_static(b"xyz"));
        round_trip("héllo".to_string());
        round_trip(u64::MAX);
        round_trip(-5i32);
        round_trip(());
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        let r: Result<String, _> = BinaryCodec.decode(Bytes::from_static(&[0xff, 0xfe]));
        assert!(matches!(r, Err(CodecError::Utf8(_))));
        let r: Result<u32, _> = BinaryCodec.decode(Bytes::from_static(&[1, 2, 3, 4, 5]));
        assert!(matches!(
            r,
            Err(CodecError::Length {
                expected: 4,
                found: 5
            })
        ));
        let r: Result<(), _> = BinaryCodec.decode(Bytes::from_static(&[1]));
        assert!(r.is_err());
        let r: Result<Vec<u32>, _> = JsonCodec.decode(Bytes::from_static(b"{"));
        assert!(matches!(r, Err(CodecError::Other(_))));
    }
}
