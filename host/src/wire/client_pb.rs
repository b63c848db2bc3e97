//! Types and service stubs of the public client API, generated from
//! `proto/client.proto`.

tonic::include_proto!("raft.client.v1");

/// The encoded descriptors of the client API's files, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/client_descriptors.bin"));
