//! A client of etcd's v3 `KV.Put`, generated from `proto/etcd_kv.proto`, for
//! `raft-host bench --etcd`.

tonic::include_proto!("etcdserverpb");
