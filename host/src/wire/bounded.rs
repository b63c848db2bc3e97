//! The codec of the peer protocol: prost's, with a look at a message's wire
//! bytes before it is decoded.
//!
//! tonic has already bounded a message's bytes (64 MiB on the data lane,
//! 1 MiB on the control lane) when the codec sees it, but decoding can cost
//! far more than the bytes: an empty `Message` is two bytes on the wire and
//! a struct of a hundred in memory, so 60 MiB of them once took a member to
//! 4.6 GB. [`WireShape`] counts what decoding would allocate (messages per
//! envelope, entries per envelope) by walking the bytes, which allocates
//! nothing, and refuses the message before prost builds any of it.

use super::pb;
use bytes::Buf;
use prost::Message;
use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Most messages one envelope may carry.
pub const MESSAGES_PER_ENVELOPE_MAX: usize = 4096;
/// Most log entries the messages of one envelope may carry together. A
/// sender fills an envelope up to 16 MiB of entries counted at 24 bytes of
/// overhead each (plus one message of up to 1 MiB), which stays below this.
pub const ENTRIES_PER_ENVELOPE_MAX: usize = 1 << 20;

/// What may be checked of a message's encoded bytes before decoding it.
pub trait WireShape {
    /// Refuses bytes whose decoding would allocate beyond a bound.
    fn check_shape(_bytes: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

impl WireShape for pb::Envelope {
    fn check_shape(bytes: &[u8]) -> Result<(), String> {
        const MESSAGES: u32 = 4;
        const APPEND_ENTRIES: u32 = 4;
        const ENTRIES: u32 = 3;
        let (mut messages, mut entries) = (0usize, 0usize);
        for_each_field(bytes, |field, value| {
            if field != MESSAGES {
                return Ok(());
            }
            messages += 1;
            if messages > MESSAGES_PER_ENVELOPE_MAX {
                return Err(format!("an envelope carries more than {MESSAGES_PER_ENVELOPE_MAX} messages"));
            }
            for_each_field(value.unwrap_or_default(), |field, value| {
                if field != APPEND_ENTRIES {
                    return Ok(());
                }
                for_each_field(value.unwrap_or_default(), |field, _| {
                    if field == ENTRIES {
                        entries += 1;
                        if entries > ENTRIES_PER_ENVELOPE_MAX {
                            return Err(format!(
                                "an envelope carries more than {ENTRIES_PER_ENVELOPE_MAX} log entries"
                            ));
                        }
                    }
                    Ok(())
                })
            })
        })
    }
}

impl WireShape for pb::DeliverReply {}
impl WireShape for pb::SnapshotChunk {}
impl WireShape for pb::InstallSnapshotReply {}
impl WireShape for pb::ModuleStatusRequest {}
impl WireShape for pb::ModuleStatusReply {}

/// Calls `visit` with the number of each top-level field of the protobuf
/// message in `bytes`, and its bytes when it is length-delimited (`None`
/// for scalars). Malformed bytes are refused.
fn for_each_field(
    mut bytes: &[u8],
    mut visit: impl FnMut(u32, Option<&[u8]>) -> Result<(), String>,
) -> Result<(), String> {
    let malformed = |what: &str| format!("a malformed message: {what}");
    while !bytes.is_empty() {
        let key = varint(&mut bytes).ok_or_else(|| malformed("a field key is cut short"))?;
        let field = u32::try_from(key >> 3).map_err(|_| malformed("a field number is out of range"))?;
        match key & 7 {
            0 => {
                varint(&mut bytes).ok_or_else(|| malformed("a varint is cut short"))?;
                visit(field, None)?;
            }
            1 | 5 => {
                let width = if key & 7 == 1 { 8 } else { 4 };
                if bytes.len() < width {
                    return Err(malformed("a fixed-width field is cut short"));
                }
                bytes = &bytes[width..];
                visit(field, None)?;
            }
            2 => {
                let length = varint(&mut bytes).ok_or_else(|| malformed("a length is cut short"))?;
                let length = usize::try_from(length).ok().filter(|&n| n <= bytes.len());
                let length = length.ok_or_else(|| malformed("a length runs past the end"))?;
                let (value, rest) = bytes.split_at(length);
                bytes = rest;
                visit(field, Some(value))?;
            }
            _ => return Err(malformed("an unknown wire type")),
        }
    }
    Ok(())
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// prost's codec for the peer protocol, with [`WireShape`] checked first.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec { _types: PhantomData }
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + WireShape + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = BoundedEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        BoundedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(PhantomData)
    }
}

/// Encodes with prost.
#[derive(Debug)]
pub struct BoundedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for BoundedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // EncodeBuf grows as needed, so encoding cannot run out of room.
        item.encode(buf).map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Checks the shape, then decodes with prost.
#[derive(Debug)]
pub struct BoundedDecoder<U>(PhantomData<U>);

impl<U: Message + Default + WireShape> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // The message's bytes are one contiguous buffer here: taking them is
        // not a copy.
        let bytes = buf.copy_to_bytes(buf.remaining());
        U::check_shape(&bytes).map_err(Status::resource_exhausted)?;
        U::decode(bytes).map(Some).map_err(|e| Status::invalid_argument(format!("a malformed message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(messages: Vec<pb::Message>) -> Vec<u8> {
        pb::Envelope { cluster_id: "c".into(), from: 1, to: 2, messages }.encode_to_vec()
    }

    fn append(entries: usize) -> pb::Message {
        let entry = pb::Entry { term: 1, index: 1, kind: 0, data: bytes::Bytes::from_static(b"x") };
        let body =
            pb::AppendEntries { prev_log_index: 0, prev_log_term: 0, entries: vec![entry; entries], leader_commit: 0 };
        pb::Message { term: 1, body: Some(pb::message::Body::AppendEntries(body)) }
    }

    #[test]
    fn envelopes_are_counted_before_they_are_decoded() {
        assert_eq!(pb::Envelope::check_shape(&envelope(vec![append(3); 10])), Ok(()));
        let empty = pb::Message::default();
        let many = envelope(vec![empty; MESSAGES_PER_ENVELOPE_MAX + 1]);
        let refused = pb::Envelope::check_shape(&many).expect_err("too many messages");
        assert!(refused.contains("more than 4096 messages"), "{refused}");
        let half = ENTRIES_PER_ENVELOPE_MAX / 2 + 1;
        let refused = pb::Envelope::check_shape(&envelope(vec![append(half), append(half)])).expect_err("entries");
        assert!(refused.contains("log entries"), "{refused}");
        let mut cut = envelope(vec![append(3)]);
        cut.truncate(cut.len() - 2);
        assert!(pb::Envelope::check_shape(&cut).expect_err("cut").contains("malformed"));
        assert!(pb::Envelope::check_shape(&[0xff; 11]).is_err(), "an endless varint");
    }
}
