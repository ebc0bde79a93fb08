//! The generated protobuf messages and gRPC stubs (from `proto/snapstream.proto`).
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

tonic::include_proto!("snapstream.v1");
