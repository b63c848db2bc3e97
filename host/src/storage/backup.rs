//! Backup files: a consistent copy of a cluster's replicated state, as a
//! member's `Backup` call streams it, in one file that a new cluster can be
//! built from (`raft-host snapshot save | status | restore`).
//!
//! ```text
//! "raft-host backup"      16 bytes, the marker
//! header length           u32 big-endian
//! header                  protobuf raft.client.v1.BackupHeader
//! records                 header.total_bytes bytes: the snapshot stream's
//!                         records (see `storage::snapshot`), each value
//!                         with its own CRC32
//! SHA-256                 32 bytes, of everything before it
//! ```
//!
//! A file is checked whole (length, then checksum) before anything of it is
//! used, so a truncated or corrupt backup is refused up front and never
//! restores half a state.

use super::{Membership, SnapshotReader, Store, StoreError};
use crate::raft::{ConfState, SnapshotMeta};
use crate::wire::client_pb::BackupHeader;
use crate::wire::hex;
use prost::Message as _;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The first bytes of every backup file.
pub const BACKUP_MAGIC: &[u8; 16] = b"raft-host backup";

/// The record format this build writes and reads.
pub const BACKUP_FORMAT: u32 = 1;

/// A header larger than this is not one (it holds a few ids and numbers).
const HEADER_BYTES_MAX: u32 = 1 << 20;

const CHECKSUM_BYTES: u64 = 32;

/// Why a backup file cannot be read or restored.
#[derive(Debug, Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a raft-host backup (it does not start with {:?})", String::from_utf8_lossy(BACKUP_MAGIC))]
    NotABackup { path: PathBuf },
    #[error("{path} is truncated or has bytes after its end: {why}")]
    Truncated { path: PathBuf, why: String },
    #[error("{path} is corrupt: its SHA-256 is {found}, but the file says {expected}")]
    Checksum { path: PathBuf, expected: String, found: String },
    #[error("{path} has a malformed header: {why}")]
    BadHeader { path: PathBuf, why: String },
    #[error("{path} holds records of format {found}; this build reads format {BACKUP_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("restoring {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
}

/// The header of a backup of `reader`'s view, served by member
/// `member_id` of `cluster`, with `total_bytes` of records.
pub fn backup_header(reader: &SnapshotReader, cluster: &str, member_id: u64, total_bytes: u64) -> BackupHeader {
    let meta = reader.meta();
    BackupHeader {
        format: BACKUP_FORMAT,
        cluster: cluster.to_string(),
        member_id,
        index: meta.index,
        term: meta.term,
        voters: meta.conf_state.voters.iter().copied().collect(),
        learners: meta.conf_state.learners.iter().copied().collect(),
        voters_outgoing: meta.conf_state.voters_outgoing.iter().copied().collect(),
        total_bytes,
        version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// Writes a backup file as its records arrive: marker and header first,
/// the checksum when [`BackupWriter::finish`] sees every announced byte.
pub struct BackupWriter<W: Write> {
    out: W,
    hasher: Sha256,
    records_left: u64,
}

impl<W: Write> BackupWriter<W> {
    /// Starts a file on `out` for the backup `header` announces.
    pub fn new(mut out: W, header: &BackupHeader) -> std::io::Result<BackupWriter<W>> {
        let encoded = header.encode_to_vec();
        let mut hasher = Sha256::new();
        let length = (encoded.len() as u32).to_be_bytes();
        for part in [&BACKUP_MAGIC[..], &length, &encoded] {
            out.write_all(part)?;
            hasher.update(part);
        }
        Ok(BackupWriter { out, hasher, records_left: header.total_bytes })
    }

    /// Appends records; more than the header announced is an error.
    pub fn write_records(&mut self, records: &[u8]) -> std::io::Result<()> {
        let len = records.len() as u64;
        if len > self.records_left {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the member sent {} bytes more than it announced", len - self.records_left),
            ));
        }
        self.records_left -= len;
        self.hasher.update(records);
        self.out.write_all(records)
    }

    /// Bytes of records still to come.
    pub fn records_left(&self) -> u64 {
        self.records_left
    }

    /// Writes the checksum once every record is in; the output, flushed.
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.records_left > 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the stream ended {} bytes short of what the member announced", self.records_left),
            ));
        }
        let digest = self.hasher.finalize();
        self.out.write_all(&digest)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// A backup file whose length and checksum have been verified.
#[derive(Debug)]
pub struct BackupFile {
    path: PathBuf,
    header: BackupHeader,
    records_offset: u64,
    checksum: [u8; 32],
}

impl BackupFile {
    /// Opens `path` and checks it whole: marker, header, length, format and
    /// SHA-256. Reads the file once.
    pub fn open(path: &Path) -> Result<BackupFile, BackupError> {
        let io = |source| BackupError::Io { path: path.to_path_buf(), source };
        let truncated = |why: String| BackupError::Truncated { path: path.to_path_buf(), why };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut magic = [0u8; 16];
        if file.read_exact(&mut magic).is_err() || &magic != BACKUP_MAGIC {
            return Err(BackupError::NotABackup { path: path.to_path_buf() });
        }
        let mut length = [0u8; 4];
        file.read_exact(&mut length).map_err(|e| truncated(format!("no header length ({e})")))?;
        let header_len = u32::from_be_bytes(length);
        if header_len > HEADER_BYTES_MAX {
            return Err(BackupError::BadHeader {
                path: path.to_path_buf(),
                why: format!("it claims {header_len} bytes (at most {HEADER_BYTES_MAX})"),
            });
        }
        let mut encoded = vec![0u8; header_len as usize];
        file.read_exact(&mut encoded).map_err(|e| truncated(format!("the header is cut short ({e})")))?;
        let header = BackupHeader::decode(encoded.as_slice())
            .map_err(|e| BackupError::BadHeader { path: path.to_path_buf(), why: e.to_string() })?;
        let records_offset = 20 + u64::from(header_len);
        let expected_len = records_offset.saturating_add(header.total_bytes).saturating_add(CHECKSUM_BYTES);
        if file_len != expected_len {
            return Err(truncated(format!(
                "it is {file_len} bytes, and its header makes it {expected_len} ({} bytes of records and a checksum)",
                header.total_bytes
            )));
        }
        if header.format != BACKUP_FORMAT {
            return Err(BackupError::Format { path: path.to_path_buf(), found: header.format });
        }
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut covered = (&mut file).take(file_len - CHECKSUM_BYTES);
        std::io::copy(&mut covered, &mut HashWriter(&mut hasher)).map_err(io)?;
        let mut stored = [0u8; 32];
        file.read_exact(&mut stored).map_err(io)?;
        let found: [u8; 32] = hasher.finalize().into();
        if found != stored {
            return Err(BackupError::Checksum { path: path.to_path_buf(), expected: hex(&stored), found: hex(&found) });
        }
        Ok(BackupFile { path: path.to_path_buf(), header, records_offset, checksum: stored })
    }

    /// What the file says it holds.
    pub fn header(&self) -> &BackupHeader {
        &self.header
    }

    /// The file's SHA-256 (its last 32 bytes), in hex.
    pub fn checksum(&self) -> String {
        hex(&self.checksum)
    }

    /// Builds `store` (new and empty) from this backup; with `replace`, a
    /// new cluster's membership takes the place of the backup's (see
    /// [`Store::restore_records`]).
    pub fn restore_into(&self, store: &Store, replace: Option<&Membership>) -> Result<(), BackupError> {
        let io = |source| BackupError::Io { path: self.path.clone(), source };
        let mut file = std::fs::File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(self.records_offset)).map_err(io)?;
        let mut records = std::io::BufReader::with_capacity(1 << 20, file.take(self.header.total_bytes));
        let header = &self.header;
        let conf_state = ConfState {
            voters: header.voters.iter().copied().collect(),
            voters_outgoing: header.voters_outgoing.iter().copied().collect(),
            learners: header.learners.iter().copied().collect(),
        };
        let meta = SnapshotMeta { index: header.index, term: header.term, conf_state };
        store
            .restore_records(meta, &mut records, header.total_bytes, replace)
            .map_err(|source| BackupError::Store { path: self.path.clone(), source })
    }
}

/// Feeds what is written into a hasher.
struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
