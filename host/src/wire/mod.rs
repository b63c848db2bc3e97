//! The wire layer: what crosses the network, and what the node keeps on disk
//! in its own records, as bytes. It owns the code generated from `proto/`,
//! the conversions between those messages and the consensus core's own types,
//! the codec of what a log entry carries, the channels to other members and
//! the metadata keys of the client API.
//!
//! It sits just above the consensus core and below everything else: storage,
//! the node and the server use it; it uses none of them (`host/tests/layers.rs`
//! keeps it so). Nothing here holds state or starts a task. This file only
//! declares the layer's files and what they export.

mod batch;
pub mod bounded;
pub mod certs;
pub mod client_pb;
mod entry;
pub mod etcd_pb;
mod hash;
pub mod pb;
mod peer;
mod tls;
mod transport;

pub use self::batch::{batch_error_of, status_of_batch_error};
pub use self::bounded::{ENTRIES_PER_ENVELOPE_MAX, MESSAGES_PER_ENVELOPE_MAX};
pub use self::entry::{Payload, StampedPayload, decode_addresses, decode_payload, encode_addresses, encode_payload};
pub use self::hash::{hex, parse_hash};
pub use self::peer::{
    EnvelopeError, conf_state_from_pb, conf_state_to_pb, message_from_pb, message_to_pb, open_envelope, seal_envelope,
    snapshot_meta_from_pb, snapshot_meta_to_pb,
};
pub use self::tls::{Admitted, ClientRole, Principal, Tls, TlsConnector, TlsError, TlsFiles, plaintext_incoming};
pub use self::transport::{
    CONTROL_MESSAGE_BYTES_MAX, FORWARDED_KEY, HISTORY_FLOOR_KEY, LEADER_ADDR_KEY, LEADER_ID_KEY, NO_RETRY_KEY,
    PEER_MESSAGE_BYTES_MAX, REQUEST_ID_KEY, Transport, WATCH_MESSAGE_BYTES_MAX, control_client, peer_client,
};
