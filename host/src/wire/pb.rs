//! Types and service stubs generated from `proto/raft.proto` (the peer
//! protocol) and `proto/entry.proto` (what log entries and the node's
//! durable records carry).

tonic::include_proto!("raft.v1");
