//! `raft-host snapshot save | status | restore`: back a cluster up to a
//! file, say what a file holds, and build a new member's data directory
//! from one, offline (as `etcdctl snapshot save` and `etcdutl snapshot
//! restore` do). The file format is `raft_host::storage::BackupFile`'s.

use super::client::Target;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use raft_host::node::built_in_state_machines;
use raft_host::raft::ConfState;
use raft_host::storage::{BackupFile, BackupWriter, Identity, Membership, Store, StoreOptions, backup_header};
use raft_host::wire::client_pb::{BackupHeader, backup_chunk};
use raft_host::wire::hex;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Streams a consistent copy of the replicated state from a member into
    /// FILE (written as FILE.partial, renamed when complete and checked).
    /// It holds every write acknowledged before the call. Needs an admin
    /// certificate.
    Save {
        /// Where to write the backup.
        file: PathBuf,
        #[command(flatten)]
        target: Target,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
        /// Read a stopped member's data directory instead of asking a
        /// running member: what it had applied, with no read barrier (after
        /// losing quorum, when no member can confirm a commit index).
        #[arg(long, value_name = "DIR")]
        from_data_dir: Option<PathBuf>,
    },
    /// Checks FILE whole (length, checksum, every record, by restoring it
    /// into a temporary directory) and says what it holds: where and when
    /// it was taken, the members, every state machine's keys and digest (as
    /// `status` prints them), the module versions, the sessions.
    Status {
        file: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Builds the data directory of one member of a new cluster from FILE,
    /// offline. Run it for every member of the new cluster with the same
    /// --peer list, then start each with `raft-host serve` on its directory:
    /// they start from the backup's state and index and elect a leader.
    Restore {
        file: PathBuf,
        /// The new member's data directory (must not exist, or be empty).
        #[arg(long)]
        data_dir: PathBuf,
        /// The new member's id (one of the --peer ids).
        #[arg(long)]
        id: u64,
        /// The new cluster's id (default: the backup's).
        #[arg(long)]
        cluster: Option<String>,
        /// Every member of the new cluster, this one included: ID=HOST:PORT,
        /// repeated or comma-separated. They become its voters.
        #[arg(long = "peer", value_delimiter = ',', required = true)]
        peers: Vec<String>,
    },
}

pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<()> {
    match args.action {
        Action::Save { file, target, force, from_data_dir } => match from_data_dir {
            Some(dir) => save_offline(&file, &dir, force),
            None => save(&file, &target, force),
        },
        Action::Status { file, json } => status(&file, json),
        Action::Restore { file, data_dir, id, cluster, peers } => restore(&file, &data_dir, id, cluster, &peers),
    }
}

fn save(file: &Path, target: &Target, force: bool) -> anyhow::Result<()> {
    if file.exists() && !force {
        bail!("{} exists; pass --force to replace it", file.display());
    }
    let partial = partial_path(file);
    let runtime = super::runtime()?;
    let header = runtime.block_on(async {
        let mut client = target.client()?;
        let (header, mut stream) = client.backup().await.context("the backup could not start")?;
        let mut writer = create_backup(&partial, &header)?;
        let progress = Progress::new(header.total_bytes);
        while let Some(message) = stream.message().await.context("the backup stream broke off")? {
            match message.part {
                Some(backup_chunk::Part::Records(records)) => {
                    writer.write_records(&records).with_context(|| format!("writing {}", partial.display()))?;
                    progress.show(header.total_bytes - writer.records_left());
                }
                _ => bail!("the member sent something other than records after the header"),
            }
        }
        progress.done();
        close_backup(writer, &partial)?;
        Ok::<_, anyhow::Error>(header)
    });
    finish_save(file, &partial, header)
}

/// Reads the backup written to `partial` back whole and gives it `file`'s name.
fn finish_save(file: &Path, partial: &Path, header: anyhow::Result<BackupHeader>) -> anyhow::Result<()> {
    let header = match header {
        Ok(header) => header,
        Err(error) => {
            let _ = std::fs::remove_file(partial);
            return Err(error);
        }
    };
    let checked = BackupFile::open(partial).with_context(|| format!("checking {}", partial.display()))?;
    std::fs::rename(partial, file).with_context(|| format!("renaming {} to {}", partial.display(), file.display()))?;
    println!(
        "saved {}: cluster {:?}, index {}, term {}, {} bytes of records, from member {}; sha256 {}",
        file.display(),
        header.cluster,
        header.index,
        header.term,
        header.total_bytes,
        header.member_id,
        checked.checksum()
    );
    Ok(())
}

fn save_offline(file: &Path, dir: &Path, force: bool) -> anyhow::Result<()> {
    if file.exists() && !force {
        bail!("{} exists; pass --force to replace it", file.display());
    }
    let partial = partial_path(file);
    let header = (|| {
        let identity = Identity::of_data_dir(dir)?;
        // The store is locked while a member runs on it: this fails then.
        let store = Store::open(dir, &identity, &StoreOptions::default())
            .with_context(|| format!("opening {} (is its member stopped?)", dir.display()))?;
        let reader = store.snapshot_reader()?;
        let total = reader.total_bytes()?;
        let header = backup_header(&reader, &identity.cluster_id, identity.node_id, total);
        let mut writer = create_backup(&partial, &header)?;
        let progress = Progress::new(total);
        let mut failed = None;
        reader.for_each_chunk(1 << 20, |records| match writer.write_records(&records) {
            Ok(()) => {
                progress.show(total - writer.records_left());
                true
            }
            Err(error) => {
                failed = Some(error);
                false
            }
        })?;
        progress.done();
        if let Some(error) = failed {
            return Err(anyhow::Error::new(error).context(format!("writing {}", partial.display())));
        }
        close_backup(writer, &partial)?;
        Ok::<_, anyhow::Error>(header)
    })();
    finish_save(file, &partial, header)
}

type BackupOut = BackupWriter<std::io::BufWriter<std::fs::File>>;

/// A new backup file at `partial`, its marker and `header` written.
fn create_backup(partial: &Path, header: &BackupHeader) -> anyhow::Result<BackupOut> {
    let out = std::fs::File::create(partial).with_context(|| format!("creating {}", partial.display()))?;
    BackupWriter::new(std::io::BufWriter::with_capacity(1 << 20, out), header)
        .with_context(|| format!("writing {}", partial.display()))
}

/// Writes the checksum once every record is in, and syncs the file.
fn close_backup(writer: BackupOut, partial: &Path) -> anyhow::Result<()> {
    let out = writer.finish().with_context(|| format!("finishing {}", partial.display()))?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|file| file.sync_all())
        .with_context(|| format!("syncing {}", partial.display()))
}

fn partial_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    file.with_file_name(name)
}

/// Progress on stderr, when it is a terminal.
struct Progress {
    total: u64,
    shown: bool,
}

impl Progress {
    fn new(total: u64) -> Progress {
        Progress { total, shown: std::io::stderr().is_terminal() }
    }

    fn show(&self, done: u64) {
        if self.shown {
            let percent = (done * 100).checked_div(self.total).unwrap_or(100);
            eprint!("\r{done} of {} bytes ({percent}%)", self.total);
        }
    }

    fn done(&self) {
        if self.shown {
            eprintln!();
        }
    }
}

/// What a backup holds, read from a copy of it restored into a store.
struct Contents {
    sessions: usize,
    /// Name, keys, digest, active version (none: a built-in the backup
    /// never replaced).
    state_machines: Vec<(String, u64, String, Option<String>)>,
    /// State machine and hash of every stored version.
    versions: Vec<(String, String)>,
    membership: Membership,
}

fn contents_of(backup: &BackupFile) -> anyhow::Result<Contents> {
    let header = backup.header();
    let scratch = tempfile::Builder::new().prefix("raft-host-snapshot-status-").tempdir()?;
    let identity = Identity::new(header.cluster.clone(), header.member_id.max(1));
    let store = Store::open(scratch.path(), &identity, &StoreOptions::default())?;
    backup.restore_into(&store, None)?;
    let active: BTreeMap<String, [u8; 32]> = store.active_modules()?.into_iter().collect();
    let with_state: BTreeMap<String, u64> = store.state_machines_with_state()?.into_iter().collect();
    let names: BTreeSet<String> = active
        .keys()
        .cloned()
        .chain(with_state.keys().cloned())
        .chain(built_in_state_machines().map(str::to_string))
        .collect();
    let mut state_machines = Vec::new();
    for name in names {
        let digest = hex(&store.state_digest(&name)?);
        let keys = with_state.get(&name).copied().unwrap_or(0);
        state_machines.push((name.clone(), keys, digest, active.get(&name).map(|hash| hex(hash))));
    }
    let versions = store.module_versions()?.into_iter().map(|v| (v.name, hex(&v.hash))).collect();
    Ok(Contents {
        sessions: store.session_scan()?.len(),
        state_machines,
        versions,
        membership: store.membership().unwrap_or_default(),
    })
}

fn status(file: &Path, as_json: bool) -> anyhow::Result<()> {
    let backup = BackupFile::open(file)?;
    let contents = contents_of(&backup)?;
    let header = backup.header();
    if as_json {
        let machines: Vec<_> = contents
            .state_machines
            .iter()
            .map(|(name, keys, digest, active)| {
                json!({"name": name, "keys": keys, "state_digest": digest, "active_module": active})
            })
            .collect();
        let versions: Vec<_> =
            contents.versions.iter().map(|(name, hash)| json!({"state_machine": name, "hash": hash})).collect();
        println!(
            "{}",
            json!({
                "file": file.display().to_string(), "sha256": backup.checksum(), "format": header.format,
                "cluster": header.cluster, "member_id": header.member_id, "index": header.index,
                "term": header.term, "voters": header.voters, "learners": header.learners,
                "removed": contents.membership.removed, "records_bytes": header.total_bytes,
                "version": header.version, "created_unix_ms": header.created_unix_ms,
                "sessions": contents.sessions, "state_machines": machines, "module_versions": versions,
            })
        );
        return Ok(());
    }
    println!("{}: a raft-host backup, format {}, sha256 {}", file.display(), header.format, backup.checksum());
    println!(
        "  taken from member {} of cluster {:?} (raft-host {}) at index {}, term {}, at {}",
        header.member_id,
        header.cluster,
        header.version,
        header.index,
        header.term,
        utc_time(header.created_unix_ms)
    );
    println!(
        "  members then: voters {:?}, learners {:?}, removed {:?}",
        header.voters,
        header.learners,
        contents.membership.removed.iter().collect::<Vec<_>>()
    );
    println!("  {} bytes of records, {} client sessions", header.total_bytes, contents.sessions);
    println!("  {:<16} {:>10}  {:<64}  active module", "state machine", "keys", "state digest");
    for (name, keys, digest, active) in &contents.state_machines {
        println!("  {name:<16} {keys:>10}  {digest:<64}  {}", active.as_deref().unwrap_or("built-in"));
    }
    for (name, hash) in &contents.versions {
        println!("  version {hash} of {name}");
    }
    Ok(())
}

fn restore(file: &Path, data_dir: &Path, id: u64, cluster: Option<String>, peers: &[String]) -> anyhow::Result<()> {
    let addresses = super::serve::parse_peers(peers, "--peer")?;
    if !addresses.contains_key(&id) {
        bail!("--peer must list every member of the new cluster, this one (id {id}) included");
    }
    if data_dir.exists() && std::fs::read_dir(data_dir)?.next().is_some() {
        bail!("{} is not empty: restore into a new directory", data_dir.display());
    }
    let backup = BackupFile::open(file)?;
    let header = backup.header();
    let cluster = cluster.unwrap_or_else(|| header.cluster.clone());
    let identity = Identity::new(cluster.clone(), id);
    let voters: BTreeSet<u64> = addresses.keys().copied().collect();
    let conf = ConfState::with_voters(voters.clone());
    let membership = Membership { conf, addresses: addresses.clone(), removed: BTreeSet::new() };
    let store = Store::open(data_dir, &identity, &StoreOptions::default())?;
    if let Err(error) = backup.restore_into(&store, Some(&membership)) {
        drop(store);
        let _ = std::fs::remove_dir_all(data_dir);
        return Err(error.into());
    }
    println!(
        "restored {} into {}: member {id} of cluster {cluster:?}, index {}, term {}, voters {:?}",
        file.display(),
        data_dir.display(),
        header.index,
        header.term,
        voters
    );
    let others: Vec<String> =
        addresses.iter().filter(|(peer, _)| **peer != id).map(|(p, a)| format!("{p}={a}")).collect();
    println!(
        "start it with: raft-host serve --id {id} --cluster {cluster} --data-dir {} --listen {} --peer {}",
        data_dir.display(),
        addresses[&id],
        others.join(",")
    );
    Ok(())
}

/// `ms` after the Unix epoch as `YYYY-MM-DD hh:mm:ss UTC` (the civil date
/// from a day count, as in Howard Hinnant's `civil_from_days`).
fn utc_time(ms: u64) -> String {
    let seconds = ms / 1000;
    let (days, of_day) = ((seconds / 86_400) as i64, seconds % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::utc_time;

    #[test]
    fn times_print_as_utc_calendar_dates() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_796_164_837_560), "2026-12-01 22:40:37 UTC");
    }
}
