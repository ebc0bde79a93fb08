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
