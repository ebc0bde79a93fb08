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
    // The messages and the client.
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".snapstream.v1.Event.payload")
        // A small encoder yield threshold: see `YIELD_THRESHOLD` in src/net/proto.rs.
        .codec_path("crate::net::proto::SnapCodec")
        .compile_fds(fds.clone())
        .unwrap_or_else(|e| panic!("generating the gRPC code: {e}"));
    // The server, over those messages, except that it sends responses it
    // encoded itself (wire-identical to the messages: see
    // src/net/server/wire.rs).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("server");
    std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&out)
        .extern_path(".snapstream.v1", "crate::net::proto")
        .extern_path(
            ".snapstream.v1.SubscribeResponse",
            "crate::net::proto::EncodedSubscribeResponse",
        )
        .extern_path(
            ".snapstream.v1.MuxResponse",
            "crate::net::proto::EncodedMuxResponse",
        )
        .codec_path("crate::net::proto::SnapCodec")
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the gRPC server code: {e}"));
}
