//! Compiles `proto/*.proto` into Rust at build time. protox parses the files
//! in pure Rust, so no `protoc` is needed on the machine.
//!
//! The peer protocol's services decode through `wire::bounded::BoundedCodec`,
//! which checks an envelope's shape (how many messages and entries) before
//! decoding allocates anything; the client API uses prost's own codec. The
//! descriptors are written next to the generated code, for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let peer = ["../proto/raft.proto", "../proto/entry.proto"];
    let client = ["../proto/client.proto"];
    let etcd = ["../proto/etcd_kv.proto"];
    for proto in peer.iter().chain(&client).chain(&etcd) {
        println!("cargo:rerun-if-changed={proto}");
    }
    let peer = protox::compile(peer, ["../proto"])?;
    let client = protox::compile(client, ["../proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("peer_descriptors.bin"), prost::Message::encode_to_vec(&peer))?;
    std::fs::write(out.join("client_descriptors.bin"), prost::Message::encode_to_vec(&client))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A command is decoded from its log entry once per member: as
        // `Bytes` it borrows the entry's buffer instead of being copied.
        .bytes(".raft.v1.Command.command")
        .bytes(".raft.v1.Command.client_id")
        // An entry's data goes into every AppendEntries the leader sends
        // (shared, not copied per follower) and is taken out of the
        // received message's buffer by the follower (not copied either).
        .bytes(".raft.v1.Entry.data")
        .codec_path("crate::wire::bounded::BoundedCodec")
        .compile_fds(peer)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A write's command and client id go on into its log entry: as
        // `Bytes` they are shared, not copied, on the way.
        .bytes(".raft.client.v1.WriteRequest.command")
        .bytes(".raft.client.v1.WriteRequest.client_id")
        .compile_fds(client)?;
    // etcd's Put, for the bench's side-by-side runs; no server.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(protox::compile(etcd, ["../proto"])?)?;
    Ok(())
}
