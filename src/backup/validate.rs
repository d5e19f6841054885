//! `walnut validate`: checks that backups can be restored, as restore would see them.
//!
//! For every backup checked (all of an instance, or with `-i ID` the chain of ID):
//! - its `backup.json` is read from its own directory, without following links, checked
//!   (checksum, id = directory name, instance) and the whole parent chain down to a FULL
//!   must exist, be readable and be valid itself;
//! - every stored directory must be a real directory and every stored file a regular file
//!   (opened with [`safepath::open_under`], never through a link) whose size and CRC-32C match
//!   the manifest; incremental files are parsed through;
//! - every WAL segment from its start LSN to its stop LSN (what recovery needs to reach
//!   consistency) is read through the archive's verified path (header CRC-32C, LZ4 content
//!   checksums, name and system id).
//!
//! With `--wal`, every segment from the valid backups' start to the newest archived segment
//! (or to a recovery target) along the timeline history is read and verified too; missing
//! segments are reported as gaps by name.
//!
//! What is found is kept apart by meaning:
//! - *damaged* (bytes wrong, or definitely absent: `ENOENT`, a link, a non-regular file):
//!   the backup becomes CORRUPT, recorded in its `backup.json`; a backup whose WAL for
//!   consistency is damaged or missing is CORRUPT as well (its files are intact, but it
//!   cannot be restored to a consistent state, as pg_probackup decides);
//! - an *ancestor* that is missing, damaged, CORRUPT, ORPHAN or not OK (ERROR, RUNNING):
//!   the backup becomes ORPHAN;
//! - *could not read* (any other I/O error, e.g. `EACCES`): reported, the run fails, and
//!   the stored status is left as it was, since nothing is known to be wrong;
//! - a backup found intact again (own files, WAL and chain) returns to OK.
//!
//! A `backup.json` that fails its checks is reported by directory name as a damaged backup
//! and is never rewritten; every backup whose chain names it becomes ORPHAN. ERROR and
//! running backups are listed as skipped (they never were usable) and do not fail the run.

use std::collections::{BTreeSet, HashMap};

use crate::archive::{HistoryEntry, IndexState, WalArchive};
use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind, Result};
use crate::safepath;
use crate::types::{valid_segment_size, Lsn, TimeLineId, WalFileName};

use super::meta::{self, BackupMeta, Mode, Status};
use super::plan;
use super::stored;
use crate::format::incfile;
use crate::format::manifest::{self, FileEntry, Storage};
use crate::repo::Repo;

/// What to validate.
#[derive(Clone, Debug, Default)]
pub struct ValidateOptions {
    /// The chain of this backup (default: every backup of the instance).
    pub backup_id: Option<String>,
    /// Also verify the WAL from the backups to the newest archived segment or the target.
    pub wal: bool,
    pub target: WalTarget,
}

/// How far `--wal` checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum WalTarget {
    /// To the newest archived segment of the newest timeline.
    #[default]
    Latest,
    Lsn(Lsn),
    /// Unix seconds: to the first segment whose block index records a commit after it.
    Time(i64),
    /// A restore point, found in the block indexes.
    Name(String),
}

/// A problem, by what it means for the stored status.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Problem {
    /// Wrong or definitely absent: recorded (CORRUPT).
    Damaged(String),
    /// Could not be read: reported, status unchanged.
    Unreadable(String),
}

/// I/O errors other than `ENOENT` are "could not read"; everything else (checksums,
/// structure, links, definite absence) is damage.
fn problem(e: &Error) -> Problem {
    match e.kind() {
        ErrorKind::Io | ErrorKind::StorageFull => Problem::Unreadable(e.to_string()),
        _ => Problem::Damaged(e.to_string()),
    }
}

/// The result for one backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Its files, its WAL to consistency and its whole chain are intact.
    Valid,
    /// Its own files or the WAL it needs are damaged or missing.
    Corrupt(String),
    /// An ancestor cannot be restored.
    Orphan(String),
    /// Something could not be read: the status is left unchanged.
    Unreadable(String),
    /// Not a usable backup (ERROR, or still running): not checked.
    Skipped(String),
}

#[derive(Clone, Debug)]
pub struct BackupResult {
    pub id: String,
    pub mode: Mode,
    /// Status before and after this run.
    pub before: Status,
    pub after: Status,
    pub outcome: Outcome,
    /// Only reached as a descendant of a backup found bad (not checked itself).
    pub descendant: bool,
    /// The backup named by `-i`: skipping it (ERROR, running) fails the run.
    pub named: bool,
}

/// A backup directory whose `backup.json` cannot be used.
#[derive(Clone, Debug)]
pub struct DamagedDir {
    pub dir: String,
    pub reason: String,
    /// Could not read it (I/O error), rather than damaged.
    pub unreadable: bool,
}

impl std::fmt::Display for DamagedDir {
    /// The report line: "backup directory DIR could not be read: WHY" (or "is a damaged
    /// backup").
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.unreadable {
            "could not be read"
        } else {
            "is a damaged backup"
        };
        write!(f, "backup directory {} {what}: {}", self.dir, self.reason)
    }
}

#[derive(Clone, Debug, Default)]
pub struct WalReport {
    pub segments_checked: u64,
    /// Gaps, damaged segments, unreadable segments, unreachable targets.
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub backups: Vec<BackupResult>,
    pub damaged: Vec<DamagedDir>,
    pub wal: Option<WalReport>,
    /// Statuses that could not be recorded.
    pub record_errors: Vec<String>,
}

impl Report {
    /// Backups and damaged backup directories looked at (skipped ones not counted).
    pub fn checked(&self) -> usize {
        self.backups
            .iter()
            .filter(|b| !b.descendant && !matches!(b.outcome, Outcome::Skipped(_)))
            .count()
            + self.damaged.len()
    }

    /// Things that failed: backups that cannot be restored or could not be checked, damaged
    /// directories, WAL problems and statuses that could not be recorded.
    pub fn failed(&self) -> usize {
        self.backups
            .iter()
            .filter(|b| match b.outcome {
                Outcome::Valid => false,
                Outcome::Skipped(_) => b.named,
                _ => true,
            })
            .count()
            + self.damaged.len()
            + self.wal.as_ref().map_or(0, |w| w.problems.len())
            + self.record_errors.len()
    }

    pub fn success(&self) -> bool {
        self.failed() == 0
    }
}

/// One directory under `backups/`.
enum Entry {
    Meta(Box<BackupMeta>),
    /// No backup.json (a backup being created, or a leftover).
    NoMeta,
    Damaged(String),
    Unreadable(String),
}

/// Reads every backup of `instance` (by its name in the catalog), as [`meta`] derives it.
fn scan(catalog: &Catalog, instance: &str) -> Result<HashMap<String, Entry>> {
    let mut out = HashMap::new();
    for (name, found) in meta::scan_named(catalog, instance)? {
        let entry = match safepath::check_name(&name, "backup directory") {
            Err(e) => Entry::Damaged(e.to_string()),
            Ok(()) => match found {
                meta::Found::Backup(m) => Entry::Meta(m),
                meta::Found::Absent => Entry::NoMeta,
                meta::Found::Failed(e) => match problem(&e) {
                    Problem::Unreadable(m) => Entry::Unreadable(m),
                    Problem::Damaged(m) => Entry::Damaged(m),
                },
            },
        };
        out.insert(name, entry);
    }
    Ok(out)
}

/// Validates (see the module docs) and records the statuses found.
pub fn validate(catalog: &Catalog, instance: &str, opts: &ValidateOptions) -> Result<Report> {
    // shared with other validates; waits for a delete or merge, which is refused meanwhile
    let _lock = crate::lifecycle::locks::lifecycle_shared(catalog, instance)?;
    let archive = WalArchive::open(catalog, instance)?;
    let entries = scan(catalog, instance)?;
    let mut report = Report::default();

    // What to check: one chain, or everything.
    let mut targets: Vec<String> = match &opts.backup_id {
        Some(id) => chain_names(&entries, id)?,
        None => entries.keys().cloned().collect(),
    };
    let meta_of = |n: &str| match entries.get(n) {
        Some(Entry::Meta(m)) => Some(m.as_ref()),
        _ => None,
    };
    // Oldest first (parents before children), as `show` lists them.
    targets.sort_by(|a, b| {
        let key = |n: &String| meta_of(n).map(|m| (m.start_lsn, m.start_time.clone()));
        key(a).cmp(&key(b)).then(a.cmp(b))
    });

    let mut own: HashMap<String, std::result::Result<(), Problem>> = HashMap::new();
    for name in &targets {
        match entries.get(name) {
            Some(Entry::Meta(b)) => {
                if usable_status(b).is_some() {
                    continue;
                }
                log::info!("checking backup {name}");
                own.insert(name.clone(), check_own(catalog, &archive, b));
            }
            Some(Entry::Damaged(r)) => report.damaged.push(DamagedDir {
                dir: name.clone(),
                reason: r.clone(),
                unreadable: false,
            }),
            Some(Entry::Unreadable(r)) => report.damaged.push(DamagedDir {
                dir: name.clone(),
                reason: r.clone(),
                unreadable: true,
            }),
            Some(Entry::NoMeta) | None => {}
        }
    }

    for name in &targets {
        let Some(b) = meta_of(name) else { continue };
        let outcome = match usable_status(b) {
            Some(why) => Outcome::Skipped(why),
            None => {
                let mine = own.get(name).cloned().unwrap_or(Ok(()));
                combine(mine, chain_problem(&entries, &own, b))
            }
        };
        let after = record(catalog, b, &outcome, &mut report.record_errors);
        report.backups.push(BackupResult {
            id: name.clone(),
            mode: b.mode,
            before: b.effective_status(),
            after,
            outcome,
            descendant: false,
            named: opts.backup_id.as_deref() == Some(name.as_str()),
        });
    }

    // Backups outside the checked chain that descend from one found bad become ORPHAN.
    let bad: Vec<String> = report
        .backups
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Corrupt(_) | Outcome::Orphan(_)))
        .map(|r| r.id.clone())
        .collect();
    let mut rest: Vec<&BackupMeta> = entries
        .iter()
        .filter(|(n, _)| !targets.contains(n))
        .filter_map(|(_, e)| match e {
            Entry::Meta(m) if m.effective_status() == Status::Ok => Some(m.as_ref()),
            _ => None,
        })
        .collect();
    rest.sort_by(|a, b| (a.start_lsn, &a.id).cmp(&(b.start_lsn, &b.id)));
    for b in rest {
        if let Some(anc) = bad.iter().find(|a| descends(&entries, b, a)) {
            let outcome = Outcome::Orphan(format!(
                "its chain includes backup {anc}, which is not valid"
            ));
            let after = record(catalog, b, &outcome, &mut report.record_errors);
            report.backups.push(BackupResult {
                id: b.id.clone(),
                mode: b.mode,
                before: b.effective_status(),
                after,
                outcome,
                descendant: true,
                named: false,
            });
        }
    }

    if opts.wal {
        let starts: Vec<&BackupMeta> = report
            .backups
            .iter()
            .filter(|r| r.outcome == Outcome::Valid)
            // with -i, recovery starts from that backup, not from its ancestors
            .filter(|r| opts.backup_id.is_none() || r.named)
            .filter_map(|r| meta_of(&r.id))
            .collect();
        report.wal = Some(check_wal(
            catalog.repo(),
            &archive,
            &starts,
            opts.backup_id.is_some(),
            &opts.target,
        ));
    }
    Ok(report)
}

/// `id` and its ancestors, by directory name, as far as they can be followed.
fn chain_names(entries: &HashMap<String, Entry>, id: &str) -> Result<Vec<String>> {
    match entries.get(id) {
        None => return Err(Error::not_found(format!("backup {id} not found"))),
        Some(Entry::NoMeta) => {
            return Err(Error::not_found(format!(
                "backup {id} has no {} (it is being created, or is a leftover)",
                meta::META_FILE
            )))
        }
        Some(_) => {}
    }
    let mut out = vec![id.to_string()];
    let mut cur = id.to_string();
    while let Some(Entry::Meta(m)) = entries.get(&cur) {
        let Some(p) = m.parent_id.clone() else { break };
        if out.contains(&p) || out.len() > 10_000 {
            break;
        }
        out.push(p.clone());
        cur = p;
    }
    Ok(out)
}

/// Why a backup is not checked at all: it never completed.
fn usable_status(b: &BackupMeta) -> Option<String> {
    match b.effective_status() {
        Status::Error => Some(format!(
            "status ERROR{}",
            b.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )),
        Status::Running => Some("still running".into()),
        _ => None,
    }
}

/// The first definite problem in `b`'s ancestors, else the first one that could not be
/// read, else `None`.
fn chain_problem(
    entries: &HashMap<String, Entry>,
    own: &HashMap<String, std::result::Result<(), Problem>>,
    b: &BackupMeta,
) -> Option<Problem> {
    let mut unreadable: Option<Problem> = None;
    let mut cur = b;
    for _ in 0..10_000 {
        let Some(p) = cur.parent_id.as_deref() else {
            if cur.mode != Mode::Full {
                return Some(Problem::Damaged(format!(
                    "its chain ends in backup {}, a {} backup without a parent",
                    cur.id, cur.mode
                )));
            }
            return unreadable;
        };
        let parent = match entries.get(p) {
            None => return Some(Problem::Damaged(format!("ancestor backup {p} is missing"))),
            Some(Entry::NoMeta) => {
                return Some(Problem::Damaged(format!(
                    "ancestor backup {p} has no {}",
                    meta::META_FILE
                )))
            }
            Some(Entry::Damaged(r)) => {
                return Some(Problem::Damaged(format!(
                    "ancestor backup {p} is damaged ({r})"
                )))
            }
            Some(Entry::Unreadable(r)) => {
                return Some(unreadable.unwrap_or(Problem::Unreadable(format!(
                    "ancestor backup {p} could not be read ({r})"
                ))))
            }
            Some(Entry::Meta(m)) => m.as_ref(),
        };
        if let Some(why) = usable_status(parent) {
            return Some(Problem::Damaged(format!(
                "ancestor backup {p} is not usable ({why})"
            )));
        }
        match own.get(p) {
            Some(Err(Problem::Damaged(_))) => {
                return Some(Problem::Damaged(format!("ancestor backup {p} is CORRUPT")))
            }
            Some(Err(Problem::Unreadable(_))) => {
                unreadable.get_or_insert(Problem::Unreadable(format!(
                    "ancestor backup {p} could not be read completely"
                )));
            }
            Some(Ok(())) => {}
            None if parent.effective_status() != Status::Ok => {
                return Some(Problem::Damaged(format!(
                    "ancestor backup {p} has status {}",
                    parent.effective_status()
                )))
            }
            None => {}
        }
        cur = parent;
    }
    Some(Problem::Damaged(format!(
        "the parent chain of backup {} loops",
        b.id
    )))
}

/// Whether `b`'s chain includes `ancestor` (not `b` itself).
fn descends(entries: &HashMap<String, Entry>, b: &BackupMeta, ancestor: &str) -> bool {
    let mut cur = b.parent_id.clone();
    for _ in 0..10_000 {
        let Some(p) = cur else { return false };
        if p == ancestor {
            return true;
        }
        cur = match entries.get(&p) {
            Some(Entry::Meta(m)) => m.parent_id.clone(),
            _ => None,
        };
    }
    false
}

/// A backup's own result and its chain's give its outcome: its own damage first, then a
/// definitely bad ancestor, then anything that could not be read.
fn combine(own: std::result::Result<(), Problem>, chain: Option<Problem>) -> Outcome {
    match (own, chain) {
        (Err(Problem::Damaged(m)), _) => Outcome::Corrupt(m),
        (_, Some(Problem::Damaged(m))) => Outcome::Orphan(m),
        (Err(Problem::Unreadable(m)), _) | (Ok(()), Some(Problem::Unreadable(m))) => {
            Outcome::Unreadable(m)
        }
        (Ok(()), None) => Outcome::Valid,
    }
}

/// Records the status an outcome implies and returns the status afterwards. Kept apart so
/// that how statuses are stored can change in one place.
fn record(catalog: &Catalog, b: &BackupMeta, o: &Outcome, errors: &mut Vec<String>) -> Status {
    let (status, error) = match o {
        Outcome::Valid => (Status::Ok, None),
        Outcome::Corrupt(m) => (Status::Corrupt, Some(m.clone())),
        Outcome::Orphan(m) => (Status::Orphan, Some(m.clone())),
        Outcome::Unreadable(_) | Outcome::Skipped(_) => return b.effective_status(),
    };
    if b.status == status && b.error == error {
        return status;
    }
    // A new dated status record; backup.json is never rewritten.
    match meta::record_status(catalog, &b.instance, &b.id, status, error, "validate") {
        Ok(()) => status,
        Err(e) => {
            let msg = format!("backup {}: could not record status {status}: {e}", b.id);
            log::error!("{msg}");
            errors.push(msg);
            b.effective_status()
        }
    }
}

/// Checks a backup's metadata, stored files and WAL to consistency. Continues past what
/// cannot be read, so that damage elsewhere is still found (damage wins).
fn check_own(
    catalog: &Catalog,
    archive: &WalArchive,
    b: &BackupMeta,
) -> std::result::Result<(), Problem> {
    let seg = b.wal_segment_size;
    let Some(stop) = b.stop_lsn else {
        return Err(Problem::Damaged(format!("backup {} has no stop LSN", b.id)));
    };
    if !valid_segment_size(seg) || seg != archive.seg_size() || stop < b.start_lsn {
        return Err(Problem::Damaged(format!(
            "backup {}: metadata is inconsistent (WAL segment size {seg}, archive {}, start {}, stop {stop})",
            b.id,
            archive.seg_size(),
            b.start_lsn
        )));
    }
    if !(512..=32768).contains(&b.block_size) || !b.block_size.is_power_of_two() {
        return Err(Problem::Damaged(format!(
            "backup {}: block size {} is impossible",
            b.id, b.block_size
        )));
    }
    let mut unreadable: Option<Problem> = None;
    check_files(catalog, b, &mut unreadable)?;
    if b.block_crcs.is_some() {
        // the block checksums a checksum-mode incremental restore trusts
        let key = b.key().map_err(|e| problem(&e))?;
        let entries = stored::manifest_entries(catalog.repo(), &key).map_err(|e| problem(&e))?;
        let refs: Vec<&FileEntry> = entries.iter().collect();
        stored::block_crcs(catalog.repo(), b, &refs).map_err(|e| problem(&e))?;
    }
    // WAL from start to stop: what recovery needs to make this backup consistent.
    let last = Lsn(stop.0.saturating_sub(1)).segno(seg);
    if b.stream {
        // A STREAM backup carries it: its pg_wal files were checked with the others.
        return check_streamed_wal(catalog, b, last).and(unreadable.map_or(Ok(()), Err));
    }
    for segno in b.start_lsn.segno(seg)..=last {
        let name = WalFileName::segment(b.timeline, segno, seg);
        match archive.read(&name) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Problem::Damaged(format!(
                    "backup {}: WAL segment {name}, needed to reach consistency (start {} to stop {stop}), is not in the archive",
                    b.id, b.start_lsn
                )))
            }
            Err(e) => match problem(&e) {
                Problem::Damaged(m) => {
                    return Err(Problem::Damaged(format!(
                        "backup {}: WAL segment {name}, needed to reach consistency (start {} to stop {stop}), is damaged: {m}",
                        b.id, b.start_lsn
                    )))
                }
                Problem::Unreadable(m) => {
                    unreadable.get_or_insert(Problem::Unreadable(format!(
                        "backup {}: WAL segment {name}: {m}",
                        b.id
                    )));
                }
            },
        }
    }
    unreadable.map_or(Ok(()), Err)
}

/// A STREAM backup's manifest lists every segment from its start to `last` under
/// `pg_wal/` (their bytes are checked with the other stored files).
fn check_streamed_wal(
    catalog: &Catalog,
    b: &BackupMeta,
    last: u64,
) -> std::result::Result<(), Problem> {
    let seg = b.wal_segment_size;
    let key = b.key().map_err(|e| Problem::Damaged(e.to_string()))?;
    let mut have = std::collections::HashSet::new();
    super::stored::read_manifest(catalog.repo(), &key, |e| {
        if let Some(n) = e.path.strip_prefix("pg_wal/") {
            have.insert(n.to_string());
        }
        Ok(())
    })
    .map_err(|e| problem(&e))?;
    for segno in b.start_lsn.segno(seg)..=last {
        let name = WalFileName::segment(b.timeline, segno, seg);
        if !have.contains(&name.to_string()) {
            return Err(Problem::Damaged(format!(
                "STREAM backup {}: WAL segment {name}, needed to reach consistency (start {} to stop {}), is not in the backup",
                b.id,
                b.start_lsn,
                b.stop_lsn.unwrap_or_default()
            )));
        }
    }
    Ok(())
}

/// Checks the manifest and every stored file against it.
fn check_files(
    catalog: &Catalog,
    b: &BackupMeta,
    unreadable: &mut Option<Problem>,
) -> std::result::Result<(), Problem> {
    let repo = catalog.repo();
    let key = b.key().map_err(|e| problem(&e))?;
    let mkey = format!("{key}/{}", manifest::FILE_NAME);
    let mwhat = stored::what(repo, &mkey);
    let blob = repo.get(&mkey).map_err(|e| problem(&e))?;
    let res = manifest::read(&blob[..], &mwhat, |e| {
        match check_entry(repo, &key, b, &e) {
            Ok(()) => Ok(()),
            Err(Problem::Damaged(m)) => Err(Error::corruption(m)),
            Err(u @ Problem::Unreadable(_)) => {
                unreadable.get_or_insert(u);
                Ok(())
            }
        }
    });
    res.map(drop).map_err(|e| problem(&e))
}

/// One manifest entry: a stored object with the recorded size and CRC. (Directories are
/// manifest entries only: a store has none to check; restore creates them.)
fn check_entry(
    repo: &dyn Repo,
    key: &str,
    b: &BackupMeta,
    e: &FileEntry,
) -> std::result::Result<(), Problem> {
    if e.storage == Storage::Dir {
        return Ok(());
    }
    let okey = format!("{key}/{}", e.stored_path());
    let w = stored::what(repo, &okey);
    // One read of the object: its checksum and, for an incremental file, its structure
    // come from the same bytes.
    let blob = repo.get(&okey).map_err(|err| problem(&err))?;
    let bytes: &[u8] = &blob;
    let n = bytes.len() as u64;
    let crc = crc32c::crc32c(bytes);
    // An incremental file ends with its own CRC: the whole file's CRC is then the residue,
    // and the manifest holds that trailer CRC (the last 4 bytes).
    let crc_ok = match e.storage {
        Storage::Incremental => match bytes.len().checked_sub(4).and_then(|at| bytes.get(at..)) {
            Some(t) => {
                let t = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
                crc == incfile::WHOLE_FILE_RESIDUE && incfile::manifest_crc_ok(e.crc32c, t)
            }
            None => false,
        },
        _ => crc == e.crc32c,
    };
    if !crc_ok || n != e.stored_size {
        return Err(Problem::Damaged(format!(
            "backup {}: file \"{}\" does not match its checksum ({n} bytes, crc {crc:08x}; manifest says {} bytes, crc {:08x})",
            b.id, e.path, e.stored_size, e.crc32c
        )));
    }
    if e.storage == Storage::Incremental {
        incfile::read_stream(bytes, n, &w, b.block_size, |_, _| Ok(()))
            .map_err(|err| problem(&err))?;
    }
    Ok(())
}

/// `--wal`: every segment from each start backup to the newest archived one (or the
/// target), along the timeline history recovery would follow.
fn check_wal(
    repo: &dyn Repo,
    archive: &WalArchive,
    starts: &[&BackupMeta],
    explicit: bool,
    target: &WalTarget,
) -> WalReport {
    let mut rep = WalReport::default();
    let target = match target {
        WalTarget::Name(n) => match archive.find_restore_point(n) {
            Ok(Some((_, lsn))) => WalTarget::Lsn(lsn),
            Ok(None) => {
                rep.problems.push(format!(
                    "restore point \"{n}\" is not in the block indexes of the archive"
                ));
                return rep;
            }
            Err(e) => {
                rep.problems
                    .push(format!("could not look up restore point \"{n}\": {e}"));
                return rep;
            }
        },
        t => t.clone(),
    };
    let seg = archive.seg_size();
    let mut wanted: BTreeSet<(u64, TimeLineId)> = BTreeSet::new();
    let mut reaching = 0;
    for b in starts {
        let reaches = match &target {
            WalTarget::Lsn(l) => b.stop_lsn.is_some_and(|s| s <= *l),
            WalTarget::Time(t) => b.recovery_epoch.is_some_and(|r| r <= *t),
            _ => true,
        };
        if !reaches {
            if explicit {
                rep.problems.push(format!(
                    "backup {} cannot reach the recovery target (it ends at {}, {})",
                    b.id,
                    b.stop_lsn.map(|l| l.to_string()).unwrap_or_default(),
                    b.recovery_time.as_deref().unwrap_or("unknown time")
                ));
            }
            continue;
        }
        reaching += 1;
        match wal_path(repo, archive, b, &target) {
            Ok((segs, note)) => {
                wanted.extend(segs);
                if let Some(n) = note {
                    rep.problems.push(n);
                }
            }
            Err(e) => rep.problems.push(e.to_string()),
        }
    }
    if reaching == 0 && !starts.is_empty() && target != WalTarget::Latest {
        rep.problems
            .push("no valid backup can reach the recovery target".to_string());
    }
    let mut missing: Vec<WalFileName> = Vec::new();
    for &(segno, tli) in &wanted {
        let name = WalFileName::segment(tli, segno, seg);
        match archive.read(&name) {
            Ok(_) => rep.segments_checked += 1,
            Err(e) if e.kind() == ErrorKind::NotFound => missing.push(name),
            Err(e) => rep.problems.push(match problem(&e) {
                Problem::Damaged(m) => format!("WAL segment {name} is damaged: {m}"),
                Problem::Unreadable(m) => format!("WAL segment {name} could not be read: {m}"),
            }),
        }
    }
    rep.problems.extend(gaps(&missing, seg));
    rep
}

/// Consecutive missing segments as one line each.
fn gaps(missing: &[WalFileName], seg: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < missing.len() {
        let mut j = i;
        while j + 1 < missing.len()
            && missing[j + 1].tli() == missing[i].tli()
            && missing[j + 1].segno(seg) == missing[j].segno(seg).map(|s| s + 1)
        {
            j += 1;
        }
        out.push(if i == j {
            format!("WAL gap: segment {} is not in the archive", missing[i])
        } else {
            format!(
                "WAL gap: segments {} to {} ({} segments) are not in the archive",
                missing[i],
                missing[j],
                j - i + 1
            )
        });
        i = j + 1;
    }
    out
}

/// A segment number and the timeline it is read from.
type SegOnTli = (u64, TimeLineId);

/// The segments (segno, timeline) recovery from `b` reads up to the target, and a note when
/// `b` is not on the newest timeline's history (then its own timeline is followed).
fn wal_path(
    repo: &dyn Repo,
    archive: &WalArchive,
    b: &BackupMeta,
    target: &WalTarget,
) -> Result<(Vec<SegOnTli>, Option<String>)> {
    let seg = archive.seg_size();
    let (mut cur, mut history) = newest_timeline(archive, b.timeline)?;
    let mut note = None;
    if !plan::on_history(&history, cur, b.timeline, b.start_lsn) {
        log::warn!(
            "backup {} (timeline {}, start {}) is not on the history of the newest timeline {cur}: checking its own timeline",
            b.id, b.timeline, b.start_lsn
        );
        cur = b.timeline;
        history = archive.timeline_history(cur)?;
    }
    let first = b.start_lsn.segno(seg);
    let newest = newest_segment(repo, archive, &history, cur)?;
    let end = match target {
        WalTarget::Lsn(l) => Some(l.segno(seg)),
        WalTarget::Time(t) => {
            let pg_us = t
                .saturating_sub(crate::archive::show::PG_EPOCH_UNIX)
                .saturating_mul(1_000_000);
            let mut found = None;
            for segno in first..=newest.unwrap_or(0) {
                let tli = plan::timeline_of_segment(&history, cur, segno, seg);
                if let Ok(IndexState::Indexed(ix) | IndexState::Pending(ix)) =
                    archive.index_state(tli, segno)
                {
                    if ix.last_commit_time.is_some_and(|c| c > pg_us) {
                        found = Some(segno);
                        break;
                    }
                }
            }
            if found.is_none() {
                note = Some(format!(
                    "no commit after the target time is in the archive's block indexes (up to {}): recovery from backup {} would end before the target",
                    newest.map_or("no segment".to_string(), |s| WalFileName::segment(
                        plan::timeline_of_segment(&history, cur, s, seg),
                        s,
                        seg
                    )
                    .to_string()),
                    b.id
                ));
            }
            found.or(newest)
        }
        _ => newest,
    };
    let segs = match end {
        Some(end) if end >= first => (first..=end)
            .map(|s| (s, plan::timeline_of_segment(&history, cur, s, seg)))
            .collect(),
        _ => Vec::new(),
    };
    Ok((segs, note))
}

/// The newest timeline PostgreSQL would follow from `from` (`recovery_target_timeline =
/// latest` probes history files `from+1`, `from+2`, ... until one is absent), with its history.
fn newest_timeline(
    archive: &WalArchive,
    from: TimeLineId,
) -> Result<(TimeLineId, Vec<HistoryEntry>)> {
    let mut cur = from;
    let mut history = archive.timeline_history(from)?;
    while let Some(next) = cur.checked_add(1) {
        match archive.timeline_history(next) {
            Ok(h) => {
                cur = next;
                history = h;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        }
    }
    Ok((cur, history))
}

/// The newest archived segment that recovery on `cur` (with `history`) would read.
fn newest_segment(
    repo: &dyn Repo,
    archive: &WalArchive,
    history: &[HistoryEntry],
    cur: TimeLineId,
) -> Result<Option<u64>> {
    let seg = archive.seg_size();
    let wal = Catalog::wal_key(&archive.config().name);
    let mut best: Option<u64> = None;
    let tlis = history.iter().map(|h| h.tli).chain(std::iter::once(cur));
    for tli in tlis {
        for o in repo.list(&format!("{wal}/{tli:08X}"))?.objects {
            let Some(name) = o
                .name
                .strip_suffix(".lz4")
                .and_then(|s| s.parse::<WalFileName>().ok())
                .filter(|w| w.is_segment() && w.tli() == tli)
            else {
                continue;
            };
            let Some(segno) = name.segno(seg) else {
                continue;
            };
            if plan::timeline_of_segment(history, cur, segno, seg) == tli
                && best.is_none_or(|b| segno > b)
            {
                best = Some(segno);
            }
        }
    }
    Ok(best)
}

/// One line per failure (for stderr): backups that cannot be restored or could not be
/// checked, damaged directories, WAL problems.
pub fn problems(r: &Report) -> Vec<String> {
    let mut v = Vec::new();
    for b in &r.backups {
        match &b.outcome {
            Outcome::Corrupt(m) => v.push(format!("backup {} is CORRUPT: {m}", b.id)),
            Outcome::Orphan(m) => v.push(format!("backup {} is ORPHAN: {m}", b.id)),
            Outcome::Unreadable(m) => v.push(format!(
                "backup {} could not be validated (status {} unchanged): {m}",
                b.id, b.after
            )),
            Outcome::Skipped(m) if b.named => v.push(format!("backup {} is not usable: {m}", b.id)),
            Outcome::Valid | Outcome::Skipped(_) => {}
        }
    }
    v.extend(r.damaged.iter().map(DamagedDir::to_string));
    if let Some(w) = &r.wal {
        v.extend(w.problems.iter().cloned());
    }
    v.extend(r.record_errors.iter().cloned());
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::InstanceConfig;
    use crate::format::segment::{self as store, FileMeta};

    const SEG: u32 = 1 << 20;

    fn meta(id: &str, mode: Mode, parent: Option<&str>) -> BackupMeta {
        BackupMeta {
            start_lsn: Lsn(0x20_0028),
            stop_lsn: Some(Lsn(0x20_0100)),
            start_time: "2026-11-29 10:00:00+00".into(),
            system_id: 7,
            wal_segment_size: SEG,
            ..meta::test_meta(id, mode, parent)
        }
    }

    fn entries(v: Vec<(&str, Entry)>) -> HashMap<String, Entry> {
        v.into_iter().map(|(n, e)| (n.to_string(), e)).collect()
    }

    fn m(b: BackupMeta) -> Entry {
        Entry::Meta(Box::new(b))
    }

    #[test]
    fn chains_are_judged_by_their_worst_ancestor() {
        let full = meta("F", Mode::Full, None);
        let page = meta("P", Mode::Page, Some("F"));
        let page2 = meta("P2", Mode::Page, Some("P"));
        let no_own = HashMap::new();
        let damaged = |p: Option<Problem>| matches!(p, Some(Problem::Damaged(_)));
        let unread = |p: Option<Problem>| matches!(p, Some(Problem::Unreadable(_)));

        let e = entries(vec![("F", m(full.clone())), ("P", m(page.clone()))]);
        assert_eq!(chain_problem(&e, &no_own, &page), None);
        let e = entries(vec![
            ("F", Entry::Damaged("crc".into())),
            ("P", m(page.clone())),
        ]);
        assert!(damaged(chain_problem(&e, &no_own, &page)));
        let e = entries(vec![("P", m(page.clone()))]);
        assert!(damaged(chain_problem(&e, &no_own, &page)));
        let e = entries(vec![("F", Entry::NoMeta), ("P", m(page.clone()))]);
        assert!(damaged(chain_problem(&e, &no_own, &page)));
        let e = entries(vec![("F", Entry::Unreadable("EACCES".into()))]);
        assert!(unread(chain_problem(&e, &no_own, &page)));

        // an unreadable parent above a corrupt grandparent: definitely not restorable
        let e = entries(vec![
            ("F", m(full.clone())),
            ("P", m(page.clone())),
            ("P2", m(page2.clone())),
        ]);
        let own: HashMap<String, std::result::Result<(), Problem>> = [
            ("F".to_string(), Err(Problem::Damaged("x".into()))),
            ("P".to_string(), Err(Problem::Unreadable("y".into()))),
        ]
        .into();
        assert!(damaged(chain_problem(&e, &own, &page2)));
        let own: HashMap<String, std::result::Result<(), Problem>> = [
            ("F".to_string(), Ok(())),
            ("P".to_string(), Err(Problem::Unreadable("y".into()))),
        ]
        .into();
        assert!(unread(chain_problem(&e, &own, &page2)));

        // a stored status that is not OK, an ERROR parent, a chain without a FULL, a loop
        let mut orphan_full = full.clone();
        orphan_full.status = Status::Corrupt;
        let e = entries(vec![("F", m(orphan_full))]);
        assert!(damaged(chain_problem(&e, &no_own, &page)));
        let mut err_full = full.clone();
        err_full.status = Status::Error;
        let e = entries(vec![("F", m(err_full))]);
        assert!(damaged(chain_problem(&e, &no_own, &page)));
        let headless = meta("P", Mode::Page, None);
        assert!(damaged(chain_problem(&entries(vec![]), &no_own, &headless)));
        let a = meta("A", Mode::Page, Some("B"));
        let b = meta("B", Mode::Page, Some("A"));
        let e = entries(vec![("A", m(a.clone())), ("B", m(b))]);
        assert!(damaged(chain_problem(&e, &no_own, &a)));
        assert!(!descends(&e, &a, "C"));
    }

    #[test]
    fn own_damage_wins_then_ancestors_then_unreadable() {
        let d = |s: &str| Problem::Damaged(s.into());
        let u = |s: &str| Problem::Unreadable(s.into());
        assert_eq!(combine(Ok(()), None), Outcome::Valid);
        assert_eq!(
            combine(Err(d("a")), Some(d("b"))),
            Outcome::Corrupt("a".into())
        );
        assert_eq!(
            combine(Err(u("a")), Some(d("b"))),
            Outcome::Orphan("b".into())
        );
        assert_eq!(
            combine(Ok(()), Some(u("b"))),
            Outcome::Unreadable("b".into())
        );
        assert_eq!(combine(Err(u("a")), None), Outcome::Unreadable("a".into()));
    }

    #[test]
    fn io_errors_are_not_damage() {
        let eacces = std::io::Error::from_raw_os_error(nix::libc::EACCES);
        let enoent = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        let p = std::path::Path::new("/x");
        assert!(matches!(
            problem(&Error::io("open", p, eacces)),
            Problem::Unreadable(_)
        ));
        assert!(matches!(
            problem(&Error::io("open", p, enoent)),
            Problem::Damaged(_)
        ));
        assert!(matches!(
            problem(&Error::corruption("crc")),
            Problem::Damaged(_)
        ));
    }

    #[test]
    fn gaps_are_named_in_runs() {
        let n = |s| WalFileName::segment(1, s, SEG);
        let g = gaps(&[n(3), n(4), n(5), n(9)], SEG);
        assert_eq!(
            g,
            vec![
                "WAL gap: segments 000000010000000000000003 to 000000010000000000000005 (3 segments) are not in the archive",
                "WAL gap: segment 000000010000000000000009 is not in the archive",
            ]
        );
    }

    /// An archive with timeline 1 (segments 1..=6) and timeline 2 (from 0/400100, segments
    /// 4..=7), as a promotion leaves it.
    fn two_timelines() -> (tempfile::TempDir, Catalog) {
        let d = tempfile::tempdir().unwrap();
        let catalog = Catalog::init(&d.path().join("cat")).unwrap();
        let cfg = InstanceConfig {
            name: "db".into(),
            system_id: 7,
            pg_major: 15,
            wal_segment_size: SEG,
            wal_page_size: 8192,
            block_size: 8192,
            relseg_size: 131072,
            data_checksums: true,
            pgdata: "/nonexistent".into(),
            host: None,
            port: None,
            user: None,
            dbname: None,
        };
        catalog.save_instance(&cfg).unwrap();
        let wal = catalog.wal_dir("db");
        let put = |name: WalFileName, data: &[u8]| {
            let fm = FileMeta {
                format: 1,
                name: name.to_string(),
                size: data.len() as u64,
                crc32c: crc32c::crc32c(data),
                system_id: 7,
                archived_at: 0,
            };
            let dir = wal.join(format!("{:08X}", name.tli()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join(format!("{name}.lz4")),
                store::encode(&fm, data).unwrap(),
            )
            .unwrap();
        };
        // a segment's first bytes: the long page header the archive checks on every read
        let seg = |tli: u32, segno: u64| {
            let mut b = Vec::with_capacity(40);
            b.extend_from_slice(&0xD110u16.to_le_bytes()); // PG15 page magic
            b.extend_from_slice(&2u16.to_le_bytes()); // XLP_LONG_HEADER
            b.extend_from_slice(&tli.to_le_bytes());
            b.extend_from_slice(&(segno * SEG as u64).to_le_bytes());
            b.extend_from_slice(&[0; 8]); // rem_len, padding
            b.extend_from_slice(&7u64.to_le_bytes());
            b.extend_from_slice(&SEG.to_le_bytes());
            b.extend_from_slice(&8192u32.to_le_bytes());
            b
        };
        for s in 1..=6 {
            put(WalFileName::segment(1, s, SEG), &seg(1, s));
        }
        for s in 4..=7 {
            put(WalFileName::segment(2, s, SEG), &seg(2, s));
        }
        put(
            WalFileName::History { tli: 2 },
            b"1\t0/400100\tno recovery target\n",
        );
        (d, catalog)
    }

    #[test]
    fn wal_path_follows_the_newest_timeline() {
        let (_d, catalog) = two_timelines();
        let ar = WalArchive::open(&catalog, "db").unwrap();
        let b = meta("F", Mode::Full, None);
        let (segs, note) = wal_path(catalog.repo(), &ar, &b, &WalTarget::Latest).unwrap();
        assert_eq!(segs, vec![(2, 1), (3, 1), (4, 2), (5, 2), (6, 2), (7, 2)]);
        assert_eq!(note, None);
        let (segs, _) = wal_path(catalog.repo(), &ar, &b, &WalTarget::Lsn(Lsn(0x50_0000))).unwrap();
        assert_eq!(segs.last(), Some(&(5, 2)));
        // a backup on timeline 1 after the switch is not on timeline 2's history
        let mut late = b.clone();
        late.start_lsn = Lsn(0x50_0028);
        let (segs, _) = wal_path(catalog.repo(), &ar, &late, &WalTarget::Latest).unwrap();
        assert_eq!(segs, vec![(5, 1), (6, 1)]);

        // the whole check: a gap on timeline 2, then a damaged segment
        std::fs::remove_file(ar.data_path(&WalFileName::segment(2, 5, SEG))).unwrap();
        let rep = check_wal(catalog.repo(), &ar, &[&b], true, &WalTarget::Latest);
        assert_eq!(rep.segments_checked, 5);
        assert_eq!(rep.problems.len(), 1, "{:?}", rep.problems);
        assert!(rep.problems[0].contains("000000020000000000000005"));
        std::fs::write(ar.data_path(&WalFileName::segment(1, 3, SEG)), b"junk").unwrap();
        let rep = check_wal(catalog.repo(), &ar, &[&b], true, &WalTarget::Latest);
        assert_eq!(rep.problems.len(), 2, "{:?}", rep.problems);
        assert!(rep.problems[0].contains("000000010000000000000003"));
        // a target the backup cannot reach
        let rep = check_wal(catalog.repo(), &ar, &[&b], true, &WalTarget::Lsn(Lsn(0x10)));
        assert!(rep.problems.iter().any(|p| p.contains("cannot reach")));
    }
}
