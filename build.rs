//! Compiles `proto/snapstream.proto` for the `net` feature with protox (a
//! protobuf compiler written in Rust): no `protoc` needs to be installed.

fn main() {
    #[cfg(feature = "net")]
    net();
}

#[cfg(feature = "net")]
fn net() {
    println!("cargo:rerun-if-changed=proto/snapstream.proto");
    let fds = protox::compile(["proto/snapstream.proto"], ["proto"])
        .unwrap_or_else(|e| panic!("proto/snapstream.proto: {e}"));
    tonic_prost_build::configure()
        .bytes(".snapstream.v1.Event.payload")
        // A small encoder yield threshold: see `YIELD_THRESHOLD` in src/net/proto.rs.
        .codec_path("crate::net::proto::SnapCodec")
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the gRPC code: {e}"));
}
