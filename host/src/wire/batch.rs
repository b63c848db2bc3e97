//! The batched client protocol's errors: a gRPC status as one item's answer
//! and back, with the metadata the unary calls carry (the leader, "do not
//! retry"), so a batching client routes and retries each item exactly as it
//! would a unary call.

use super::client_pb::BatchError;
use super::transport::{LEADER_ADDR_KEY, LEADER_ID_KEY, NO_RETRY_KEY};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// `status` as one item's error.
pub fn batch_error_of(status: &Status) -> BatchError {
    let text = |key: &str| status.metadata().get(key).and_then(|value| value.to_str().ok()).map(str::to_string);
    BatchError {
        code: status.code() as i32,
        message: status.message().to_string(),
        leader_id: text(LEADER_ID_KEY).and_then(|id| id.parse().ok()).unwrap_or(0),
        leader_addr: text(LEADER_ADDR_KEY).unwrap_or_default(),
        no_retry: status.metadata().contains_key(NO_RETRY_KEY),
    }
}

/// The status a unary call would have failed with, from one item's error.
pub fn status_of_batch_error(error: &BatchError) -> Status {
    let mut status = Status::new(Code::from(error.code), error.message.clone());
    if error.leader_id != 0 {
        status.metadata_mut().insert(LEADER_ID_KEY, MetadataValue::from(error.leader_id));
    }
    if !error.leader_addr.is_empty()
        && let Ok(address) = error.leader_addr.parse()
    {
        status.metadata_mut().insert(LEADER_ADDR_KEY, address);
    }
    if error.no_retry {
        status.metadata_mut().insert(NO_RETRY_KEY, MetadataValue::from_static("1"));
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_survives_the_trip_through_an_item_error_with_its_routing_metadata() {
        let mut status = Status::unavailable("not the leader");
        status.metadata_mut().insert(LEADER_ID_KEY, MetadataValue::from(3u64));
        status.metadata_mut().insert(LEADER_ADDR_KEY, "127.0.0.1:7003".parse().expect("ascii"));
        let back = status_of_batch_error(&batch_error_of(&status));
        assert_eq!(back.code(), Code::Unavailable);
        assert_eq!(back.message(), "not the leader");
        assert_eq!(back.metadata().get(LEADER_ADDR_KEY).and_then(|v| v.to_str().ok()), Some("127.0.0.1:7003"));
        assert_eq!(back.metadata().get(LEADER_ID_KEY).and_then(|v| v.to_str().ok()), Some("3"));
        assert!(!back.metadata().contains_key(NO_RETRY_KEY));

        let plain = status_of_batch_error(&batch_error_of(&Status::unavailable("no leader yet")));
        assert!(!plain.metadata().contains_key(LEADER_ADDR_KEY), "no leader named, none made up");
        assert!(!plain.metadata().contains_key(LEADER_ID_KEY));

        let mut quota = Status::resource_exhausted("over the quota");
        quota.metadata_mut().insert(NO_RETRY_KEY, MetadataValue::from_static("1"));
        assert!(status_of_batch_error(&batch_error_of(&quota)).metadata().contains_key(NO_RETRY_KEY));
    }
}
