//! Compiles `proto/*.proto` into Rust at build time. protox parses the files
//! in pure Rust, so no `protoc` is needed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["../proto/raft.proto", "../proto/entry.proto", "../proto/client.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["../proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
