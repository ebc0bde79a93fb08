//! The generated protobuf messages and gRPC stubs (from `proto/snapstream.proto`).
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

tonic::include_proto!("snapstream.v1");

/// Bytes a stream's gRPC encoder gathers before it hands a chunk to HTTP/2:
/// 4 KiB (tonic's default is 32 KiB). The encoder drains every message that
/// is ready until its buffer passes this, and HTTP/2 takes that chunk
/// whole as soon as the stream has any send capacity; so, per stream, the
/// server holds about this plus one message while the client reads slowly.
pub(crate) const YIELD_THRESHOLD: usize = 4 << 10;

/// The prost codec, handing chunks over at 4 KiB (used by the generated stubs).
#[derive(Debug, Clone, Copy)]
pub struct SnapCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SnapCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for SnapCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::new(
            YIELD_THRESHOLD,
            YIELD_THRESHOLD,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// The server side of the service (`subscriber_server`), generated over the
/// messages above except that it sends [`EncodedSubscribeResponse`] and
/// [`EncodedMuxResponse`].
mod server {
    include!(concat!(env!("OUT_DIR"), "/server/snapstream.v1.rs"));
}
pub use server::subscriber_server;

macro_rules! encoded_message {
    ($(#[$doc:meta])* $name:ident, $of:ident) => {
        $(#[$doc])*
        ///
        /// The server encodes its responses itself, sharing the encoding of
        /// an event among the subscriptions it goes to, instead of building
        /// the message's structs for every one. The bytes are exactly
        #[doc = concat!("what [`", stringify!($of), "`]'s encoding would be, so a client decodes them as a [`", stringify!($of), "`].")]
        /// This type only encodes: decoding one skips every field (decode a
        #[doc = concat!("[`", stringify!($of), "`] instead).")]
        #[derive(Clone, Default, PartialEq, Eq)]
        pub struct $name(pub(crate) bytes::Bytes);

        impl $name {
            /// The encoded message.
            pub fn as_bytes(&self) -> &[u8] {
                &self.0
            }

            /// A message from its encoding (not checked: the bytes are sent
            /// as they are).
            pub fn from_encoded(bytes: bytes::Bytes) -> Self {
                Self(bytes)
            }
        }

        #[doc = concat!("Encodes a [`", stringify!($of), "`] (for an own implementation of the service trait).")]
        impl From<&$of> for $name {
            fn from(message: &$of) -> Self {
                Self(prost::Message::encode_to_vec(message).into())
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("len", &self.0.len())
                    .finish()
            }
        }

        impl prost::Message for $name {
            fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
                buf.put_slice(&self.0);
            }

            fn merge_field(
                &mut self,
                tag: u32,
                wire_type: prost::encoding::WireType,
                buf: &mut impl bytes::Buf,
                ctx: prost::encoding::DecodeContext,
            ) -> Result<(), prost::DecodeError> {
                prost::encoding::skip_field(wire_type, tag, buf, ctx)
            }

            fn encoded_len(&self) -> usize {
                self.0.len()
            }

            fn clear(&mut self) {
                self.0.clear();
            }
        }
    };
}

encoded_message!(
    /// A [`SubscribeResponse`] as the server sends it: the message's bytes.
    EncodedSubscribeResponse,
    SubscribeResponse
);

encoded_message!(
    /// A [`MuxResponse`] as the server sends it: the message's bytes.
    EncodedMuxResponse,
    MuxResponse
);
