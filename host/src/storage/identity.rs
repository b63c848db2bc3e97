//! The identity file of a data directory: which format wrote it, and which
//! cluster and node it belongs to. It is read before the database opens, so a
//! directory from another node, another cluster or a newer release is refused
//! before anything in it is touched.
//!
//! The file is small plain text (an operator can read it) ending in a CRC32 of
//! the lines above it; it is written once, through a temporary file, an fsync
//! and a rename.

use super::StoreError;
use std::fs;
use std::io::Write;
use std::path::Path;

/// Name of the identity file inside a data directory.
pub const IDENTITY_FILE: &str = "IDENTITY";

/// The on-disk format this build writes and the newest it can read.
/// Format 2 keeps the log, the change history and the session table one
/// record per append or applied batch; a format 1 directory is read as it
/// is and marked format 2 when it opens, before anything of format 2 is
/// written, so an older build refuses it with [`StoreError::NewerFormat`]
/// rather than misreading it.
pub const FORMAT_VERSION: u32 = 2;

/// The cluster and node a data directory belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The cluster's id (any non-empty string without whitespace, for example
    /// a UUID), the same on every member.
    pub cluster_id: String,
    /// This member's id, unique in the cluster and non-zero.
    pub node_id: u64,
}

impl Identity {
    pub fn new(cluster_id: impl Into<String>, node_id: u64) -> Identity {
        Identity { cluster_id: cluster_id.into(), node_id }
    }

    fn validate(&self) -> Result<(), StoreError> {
        if self.cluster_id.is_empty() || self.cluster_id.len() > 128 || self.cluster_id.chars().any(char::is_whitespace)
        {
            return Err(StoreError::InvalidIdentity(format!(
                "cluster id {:?} must be 1 to 128 characters without whitespace",
                self.cluster_id
            )));
        }
        if self.node_id == 0 {
            return Err(StoreError::InvalidIdentity("node id must be non-zero".into()));
        }
        Ok(())
    }
}

/// The identity file's text: its lines and the checksum over them.
fn render(format: u32, identity: &Identity) -> String {
    let body = format!(
        "raft-host data directory\nformat = {format}\ncluster_id = {}\nnode_id = {}\n",
        identity.cluster_id, identity.node_id
    );
    format!("{body}checksum = {:08x}\n", crc32fast::hash(body.as_bytes()))
}

/// Writes the identity file of a new data directory, durably.
pub(crate) fn write(dir: &Path, identity: &Identity) -> Result<(), StoreError> {
    identity.validate()?;
    let text = render(FORMAT_VERSION, identity);
    let io = |e| StoreError::Io { path: dir.join(IDENTITY_FILE), source: e };
    let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
    let mut file = fs::File::create(&tmp).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, dir.join(IDENTITY_FILE)).map_err(io)?;
    // The rename itself must be durable, or a crash could leave a directory
    // with data and no identity.
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// Reads and checks the identity file against what the caller expects;
/// marks an older format's directory as this format's.
pub(crate) fn check(dir: &Path, expected: &Identity) -> Result<(), StoreError> {
    expected.validate()?;
    let (format, found) = read(dir)?;
    if format > FORMAT_VERSION {
        return Err(StoreError::NewerFormat { dir: dir.to_path_buf(), found: format, supported: FORMAT_VERSION });
    }
    if found.cluster_id != expected.cluster_id {
        return Err(StoreError::WrongCluster {
            dir: dir.to_path_buf(),
            found: found.cluster_id,
            expected: expected.cluster_id.clone(),
        });
    }
    if found.node_id != expected.node_id {
        return Err(StoreError::WrongNode { dir: dir.to_path_buf(), found: found.node_id, expected: expected.node_id });
    }
    if format < FORMAT_VERSION {
        tracing::info!(dir = %dir.display(), from = format, to = FORMAT_VERSION, "upgrading the data directory's format");
        write(dir, expected)?;
    }
    Ok(())
}

impl Identity {
    /// The identity a data directory's file records (checksum verified),
    /// for tools that open a member's directory offline.
    pub fn of_data_dir(dir: &Path) -> Result<Identity, StoreError> {
        let (format, identity) = read(dir)?;
        if format > FORMAT_VERSION {
            return Err(StoreError::NewerFormat { dir: dir.to_path_buf(), found: format, supported: FORMAT_VERSION });
        }
        Ok(identity)
    }
}

/// The format and identity the identity file of `dir` records.
fn read(dir: &Path) -> Result<(u32, Identity), StoreError> {
    let path = dir.join(IDENTITY_FILE);
    let text = fs::read_to_string(&path).map_err(|e| StoreError::Io { path: path.clone(), source: e })?;
    let corrupt = |why: &str| StoreError::Corrupt { dir: dir.to_path_buf(), what: format!("{IDENTITY_FILE}: {why}") };
    let (body, checksum_line) = text.rsplit_once("checksum = ").ok_or_else(|| corrupt("no checksum line"))?;
    let stored = u32::from_str_radix(checksum_line.trim(), 16).map_err(|_| corrupt("unreadable checksum"))?;
    if crc32fast::hash(body.as_bytes()) != stored {
        return Err(corrupt("checksum mismatch"));
    }
    let field = |name: &str| {
        body.lines()
            .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(" = ")))
            .ok_or_else(|| corrupt(&format!("missing {name}")))
    };
    let format: u32 = field("format")?.parse().map_err(|_| corrupt("unreadable format"))?;
    let cluster_id = field("cluster_id")?.to_string();
    let node_id: u64 = field("node_id")?.parse().map_err(|_| corrupt("unreadable node_id"))?;
    Ok((format, Identity { cluster_id, node_id }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_refuses_mismatches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = Identity::new("prod-eu", 3);
        write(dir.path(), &me).expect("write");
        check(dir.path(), &me).expect("same identity is accepted");
        let err = check(dir.path(), &Identity::new("prod-us", 3)).expect_err("other cluster");
        assert!(err.to_string().contains("prod-eu") && err.to_string().contains("prod-us"), "{err}");
        let err = check(dir.path(), &Identity::new("prod-eu", 4)).expect_err("other node");
        assert!(matches!(err, StoreError::WrongNode { found: 3, expected: 4, .. }), "{err}");
    }

    #[test]
    fn newer_format_is_refused_and_edits_are_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = Identity::new("c", 1);
        fs::write(dir.path().join(IDENTITY_FILE), render(FORMAT_VERSION + 1, &me)).expect("write");
        let err = check(dir.path(), &me).expect_err("newer format");
        assert!(
            matches!(err, StoreError::NewerFormat { found, supported, .. } if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
            "{err}"
        );

        write(dir.path(), &me).expect("write");
        let edited =
            fs::read_to_string(dir.path().join(IDENTITY_FILE)).expect("read").replace("node_id = 1", "node_id = 2");
        fs::write(dir.path().join(IDENTITY_FILE), edited).expect("write");
        let err = check(dir.path(), &Identity::new("c", 2)).expect_err("hand edit breaks the checksum");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn an_older_format_is_accepted_and_marked_as_this_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = Identity::new("c", 1);
        fs::write(dir.path().join(IDENTITY_FILE), render(1, &me)).expect("write");
        check(dir.path(), &me).expect("format 1 opens");
        assert_eq!(read(dir.path()).expect("read").0, FORMAT_VERSION);
        assert!(check(dir.path(), &Identity::new("other", 1)).is_err(), "and is still checked");
    }

    #[test]
    fn invalid_identities_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(write(dir.path(), &Identity::new("", 1)).is_err());
        assert!(write(dir.path(), &Identity::new("a b", 1)).is_err());
        assert!(write(dir.path(), &Identity::new("ok", 0)).is_err());
    }
}
