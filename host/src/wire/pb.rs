//! Types and service stubs generated from `proto/raft.proto` (the peer
//! protocol) and `proto/entry.proto` (what log entries and the node's
//! durable records carry).

tonic::include_proto!("raft.v1");

/// The encoded descriptors of the peer protocol's files, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/peer_descriptors.bin"));
