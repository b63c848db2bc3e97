//! Compiles `proto/*.proto` into Rust at build time. protox parses the files
//! in pure Rust, so no `protoc` is needed on the machine.
//!
//! The peer protocol's services decode through `wire::bounded::BoundedCodec`,
//! which checks an envelope's shape (how many messages and entries) before
//! decoding allocates anything; the client API uses prost's own codec.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let peer = ["../proto/raft.proto", "../proto/entry.proto"];
    let client = ["../proto/client.proto"];
    for proto in peer.iter().chain(&client) {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::wire::bounded::BoundedCodec")
        .compile_fds(protox::compile(peer, ["../proto"])?)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(protox::compile(client, ["../proto"])?)?;
    Ok(())
}
