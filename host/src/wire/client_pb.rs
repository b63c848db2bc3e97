//! Types and service stubs of the public client API, generated from
//! `proto/client.proto`.

tonic::include_proto!("raft.client.v1");
