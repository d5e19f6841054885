//! Backup metadata and the list of an instance's backups, derived from append-only objects.
//!
//! A backup is a set of objects under `instances/I/backups/ID/`, none ever rewritten:
//! ```text
//! backup.started         BackupMeta (status RUNNING), written first, create-only: claims ID
//! .running               lock held by the taker while it runs (never listed)
//! manifest, database/... the files: whole, whole LZ4 (.lz4) or incremental (.winc)
//! backup_label, tablespace_map
//! backup.json            BackupMeta (status OK), written ONCE, after every other file of the
//!                        backup and the WAL it needs are durable: the commit record
//! status/<UTC>[-n].json  StatusRecord: a later status (ERROR, CORRUPT, ORPHAN, OK again);
//!                        the newest one wins
//! ```
//! The current state is derived ([`derive`]): with backup.json, its status unless a status
//! record is newer; with only the started marker, RUNNING while its `.running` lock is held
//! and ERROR otherwise (the error from the newest record, if the taker left one). Catalogs of
//! the previous release (backup.json rewritten in place RUNNING -> OK, CORRUPT, ...) read the
//! same way: an in-place RUNNING whose process is gone is ERROR.
//!
//! ```text
//! backup.json, format 2 (UTF-8): {
//!   body     BackupMeta as pretty-printed JSON, without its closing "\n}"
//!   trailer  ",\n  \"crc32c\": \"<8 lowercase hex digits>\"\n}\n"   CRC-32C of the body
//! }
//! ```
//! The whole is still one JSON object that other tools can read. Format 1 files, written
//! before the checksum existed, have no `crc32c` member and are read unchecked; a format 2
//! file without a valid trailer is refused as damaged. backup.started has the same layout.
//!
//! Everything read is untrusted input. `id`, `instance` and `parent_id` must be plain names
//! ([`safepath::check_name`]), and a backup is listed only when its `id` is the name of its
//! prefix and its `instance` the instance it is listed under. All access goes through the
//! catalog's [`Repo`], which opens nothing through a symbolic link.

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::{LockMode, Repo, RepoLock};
use crate::safepath;
use crate::types::{Lsn, TimeLineId};

pub const META_FILE: &str = "backup.json";
/// The started marker: written first, create-only.
pub const STARTED_FILE: &str = "backup.started";
/// Status records, one object per change.
pub const STATUS_DIR: &str = "status";
/// The lock the taker holds while it runs.
const RUNNING_LOCK: &str = ".running";
/// Format of status records.
const STATUS_FORMAT: u32 = 1;
pub const META_FORMAT: u32 = 2;
/// The format before backup.json had a checksum: still read.
const META_FORMAT_NO_CRC: u32 = 1;
const CRC_KEY: &[u8] = b",\n  \"crc32c\": \"";
const CRC_END: &[u8] = b"\"\n}\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    Full,
    Page,
    Delta,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Full => "FULL",
            Mode::Page => "PAGE",
            Mode::Delta => "DELTA",
        })
    }
}

/// Where a PAGE backup's change map came from. Written only for `Summary` (backups of
/// walnut's own WAL index keep their bytes); absent reads as the index. The source changes
/// only how the blocks were chosen: the backup is a PAGE backup for restore, validate and
/// the lifecycle commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeSource {
    /// walnut's block index of the archived WAL.
    Index,
    /// PostgreSQL 17+'s WAL summaries (`backup -b summary`).
    Summary,
}

impl std::fmt::Display for ChangeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChangeSource::Index => "index",
            ChangeSource::Summary => "summary",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Running,
    Ok,
    Error,
    Corrupt,
    Orphan,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Running => "RUNNING",
            Status::Ok => "OK",
            Status::Error => "ERROR",
            Status::Corrupt => "CORRUPT",
            Status::Orphan => "ORPHAN",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMeta {
    pub format: u32,
    pub id: String,
    pub instance: String,
    pub mode: Mode,
    pub status: Status,
    pub parent_id: Option<String>,
    pub timeline: TimeLineId,
    pub start_lsn: Lsn,
    pub stop_lsn: Option<Lsn>,
    /// Parent's start LSN (incremental backups): the changed-block range starts there.
    pub parent_start_lsn: Option<Lsn>,
    /// UTC, "YYYY-MM-DD HH:MM:SS+00".
    pub start_time: String,
    pub end_time: Option<String>,
    /// Server time after the backup stopped: the earliest recovery_target_time this backup
    /// can reach.
    pub recovery_time: Option<String>,
    /// Unix seconds of `recovery_time`.
    pub recovery_epoch: Option<i64>,
    /// The next transaction id when the backup stopped (`pg_snapshot_xmax`): transactions
    /// from this one on committed after the backup's consistency point.
    pub recovery_xid: Option<u64>,
    pub data_bytes: u64,
    pub files: u64,
    pub compress: String,
    pub pg_major: u32,
    pub system_id: u64,
    pub block_size: u32,
    pub relseg_size: u32,
    pub wal_segment_size: u32,
    pub data_checksums: bool,
    /// Process that runs the backup while RUNNING (a RUNNING backup whose process is gone
    /// is shown as ERROR).
    pub pid: Option<u32>,
    pub error: Option<String>,
    /// A STREAM backup: it carries the WAL from its start to its stop (`pg_wal/` files of
    /// its manifest). Written only when true, so other backups' bytes are as before;
    /// absent reads as false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    /// Taken from a standby (written only when true).
    #[serde(default, skip_serializing_if = "is_false")]
    pub from_standby: bool,
    /// A PAGE backup whose change map came from the server's WAL summaries: `"source":
    /// "summary"` (written only then; see [`ChangeSource`]).
    #[serde(default, rename = "source", skip_serializing_if = "Option::is_none")]
    pub change_source: Option<ChangeSource>,
    /// The backup's block checksums object (`block_crcs`, see
    /// [`crate::format::blockcrc`]): its size and CRC. Written only when it exists;
    /// absent, a checksum-mode incremental restore reads every block the chain supplies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_crcs: Option<crate::format::blockcrc::BlockCrcsRef>,
}

impl BackupMeta {
    /// The key prefix of this backup (`instances/I/backups/ID`), from checked names.
    pub fn key(&self) -> Result<String> {
        backup_key(&self.instance, &self.id)
    }

    /// The status to show and to decide on (derived when the backup was loaded, see
    /// [`derive`]).
    pub fn effective_status(&self) -> Status {
        self.status
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// backup.json's bytes (see the module docs for the layout).
pub fn encode(m: &BackupMeta) -> Result<Vec<u8>> {
    let json = serde_json::to_vec_pretty(m)?;
    let body = json
        .strip_suffix(b"\n}")
        .ok_or_else(|| Error::invalid("backup metadata did not serialize as an object"))?;
    let mut out = body.to_vec();
    out.extend_from_slice(CRC_KEY);
    out.extend_from_slice(format!("{:08x}", crc32c::crc32c(body)).as_bytes());
    out.extend_from_slice(CRC_END);
    Ok(out)
}

/// Parses backup.json's bytes; `what` names the file in errors. Ids and the instance name
/// that are not plain names are refused as corruption.
pub fn decode(b: &[u8], what: &str) -> Result<BackupMeta> {
    let bad = |m: String| Error::corruption(format!("{what}: {m}"));
    let trailer_len = CRC_KEY.len() + 8 + CRC_END.len();
    let trailer = b
        .len()
        .checked_sub(trailer_len)
        .map(|at| (&b[..at], &b[at..]))
        .filter(|(_, t)| t.starts_with(CRC_KEY) && t.ends_with(CRC_END));
    if let Some((body, t)) = trailer {
        let hex = &t[CRC_KEY.len()..CRC_KEY.len() + 8];
        let stored = std::str::from_utf8(hex)
            .ok()
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| bad("bad checksum field".into()))?;
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(bad(format!(
                "backup metadata checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            )));
        }
    }
    let m: BackupMeta = serde_json::from_slice(b).map_err(|e| bad(e.to_string()))?;
    match (m.format, trailer.is_some()) {
        (META_FORMAT, true) | (META_FORMAT_NO_CRC, false) => {
            check_names(&m, what)?;
            Ok(m)
        }
        (META_FORMAT, false) => Err(bad(
            "backup metadata has no valid checksum trailer (damaged or truncated)".into(),
        )),
        (f, _) => Err(bad(format!(
            "backup metadata format {f} is not supported (this walnut reads {META_FORMAT_NO_CRC} and {META_FORMAT})"
        ))),
    }
}

/// Checks the names in metadata just read: `id`, `instance` and `parent_id` become path
/// components, so each must be one plain name.
fn check_names(m: &BackupMeta, what: &str) -> Result<()> {
    safepath::check_name(&m.id, &format!("{what}: id"))?;
    safepath::check_name(&m.instance, &format!("{what}: instance"))?;
    if let Some(p) = &m.parent_id {
        safepath::check_name(p, &format!("{what}: parent_id"))?;
    }
    Ok(())
}

/// backup.json larger than this is not ours (a real one is under 2 KiB).
const MAX_META_BYTES: u64 = 1 << 20;

/// The key prefix of backup `id` of `instance`, from checked names.
pub fn backup_key(instance: &str, id: &str) -> Result<String> {
    safepath::check_name(instance, "instance name")?;
    safepath::check_name(id, "backup id")?;
    Ok(Catalog::backup_key(instance, id))
}

/// How an object is named in messages: its place in the store.
fn what(repo: &dyn Repo, key: &str) -> String {
    format!("{}/{key}", repo.location())
}

/// A small JSON object of the catalog, at most [`MAX_META_BYTES`]. `Ok(None)` only when it
/// is definitely absent.
fn get_small(repo: &dyn Repo, key: &str) -> Result<Option<Vec<u8>>> {
    match repo.head(key)? {
        None => return Ok(None),
        Some(h) if h.size > MAX_META_BYTES => {
            return Err(Error::corruption(format!(
                "{}: larger than {MAX_META_BYTES} bytes: not backup metadata",
                what(repo, key)
            )))
        }
        Some(_) => {}
    }
    match repo.get(key) {
        Ok(b) => Ok(Some(b.into_vec())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads backup metadata (backup.json or the started marker) at `key`, refusing it unless it
/// says it is backup `id` of `instance`.
fn read_meta_at(
    repo: &dyn Repo,
    key: &str,
    instance: &str,
    id: &str,
) -> Result<Option<BackupMeta>> {
    let Some(b) = get_small(repo, key)? else {
        return Ok(None);
    };
    let w = what(repo, key);
    let m = decode(&b, &w)?;
    if m.id != id || m.instance != instance {
        return Err(Error::corruption(format!(
            "{w}: says it is backup {:?} of instance {:?}, but it is stored as backup {id:?} of instance {instance:?}",
            m.id, m.instance
        )));
    }
    Ok(Some(m))
}

/// A later status of a backup: one object per change, never rewritten.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    pub format: u32,
    pub status: Status,
    pub error: Option<String>,
    /// When it was recorded (UTC, "YYYY-MM-DD HH:MM:SS+00").
    pub time: String,
    /// What recorded it: "backup", "validate".
    pub by: String,
}

/// Dated record names (status, pin and settings records): `<YYYYMMDDTHHMMSSZ>[-n].json`,
/// ordered by (stamp, n).
pub(crate) fn parse_record_name(name: &str) -> Option<(String, u32)> {
    let rest = name.strip_suffix(".json")?;
    let (st, n) = match rest.split_once('-') {
        Some((st, n)) => (st, n.parse::<u32>().ok()?),
        None => (rest, 0),
    };
    let b = st.as_bytes();
    let ok = b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
    ok.then(|| (st.to_string(), n))
}

/// "YYYYMMDDTHHMMSSZ" for Unix seconds.
pub fn stamp(secs: i64) -> String {
    let t = format_utc(secs);
    let digits: String = t.chars().take(19).filter(|c| c.is_ascii_digit()).collect();
    format!(
        "{}T{}Z",
        digits.get(..8).unwrap_or(""),
        digits.get(8..).unwrap_or("")
    )
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Records a new status of backup `id` (a dated object under `status/`; several in one
/// second get `-1`, `-2`, ...). The newest record decides the backup's status.
pub fn record_status(
    catalog: &Catalog,
    instance: &str,
    id: &str,
    status: Status,
    error: Option<String>,
    by: &str,
) -> Result<()> {
    put_status(catalog, instance, id, status, error, by, false).map(|_| ())
}

/// [`record_status`], visible at once but durable only after
/// [`crate::repo::Repo::sync_objects`] of the key it returns (for a group of records made
/// durable with one wait).
pub fn record_status_deferred(
    catalog: &Catalog,
    instance: &str,
    id: &str,
    status: Status,
    error: Option<String>,
    by: &str,
) -> Result<String> {
    put_status(catalog, instance, id, status, error, by, true)
}

fn put_status(
    catalog: &Catalog,
    instance: &str,
    id: &str,
    status: Status,
    error: Option<String>,
    by: &str,
    deferred: bool,
) -> Result<String> {
    use std::io::Write as _;
    let now = now_secs();
    let rec = StatusRecord {
        format: STATUS_FORMAT,
        status,
        error,
        time: format_utc(now),
        by: by.to_string(),
    };
    let mut json = serde_json::to_vec_pretty(&rec)?;
    json.push(b'\n');
    let dir = format!("{}/{STATUS_DIR}", backup_key(instance, id)?);
    let st = stamp(now);
    let repo = catalog.repo();
    // A record from this second may exist: the next free counter, never a replacement.
    // Start after the newest one of this second so that this record sorts last.
    let mut n = newest_status_name(repo, &dir)?
        .filter(|(s, _)| *s == st)
        .map_or(0, |(_, k)| k + 1);
    for _ in 0..1000 {
        let name = if n == 0 {
            format!("{st}.json")
        } else {
            format!("{st}-{n}.json")
        };
        let key = format!("{dir}/{name}");
        let put = if deferred {
            repo.create(&key).and_then(|mut w| {
                let dest = w.describe();
                w.write_all(&json)
                    .map_err(|e| Error::io("write", std::path::Path::new(&dest), e))?;
                w.commit(crate::repo::Durability::Deferred)
            })
        } else {
            repo.put_new(&key, &json)
        };
        match put {
            Err(e) if e.kind() == ErrorKind::Conflict => n += 1,
            other => return other.map(|()| key),
        }
    }
    Err(Error::conflict(format!(
        "{}: 1000 status records in one second",
        what(repo, &dir)
    )))
}

fn newest_status_name(repo: &dyn Repo, dir: &str) -> Result<Option<(String, u32)>> {
    Ok(repo
        .list(dir)?
        .objects
        .iter()
        .filter_map(|o| parse_record_name(&o.name))
        .max())
}

/// The newest status record of the backup at `key`, if any. A newest record that cannot be
/// read or parsed is damage, not "no record".
fn newest_status(repo: &dyn Repo, key: &str) -> Result<Option<StatusRecord>> {
    let dir = format!("{key}/{STATUS_DIR}");
    let Some((st, n)) = newest_status_name(repo, &dir)? else {
        return Ok(None);
    };
    let name = if n == 0 {
        format!("{st}.json")
    } else {
        format!("{st}-{n}.json")
    };
    let k = format!("{dir}/{name}");
    let Some(b) = get_small(repo, &k)? else {
        return Err(Error::corruption(format!(
            "{}: listed but absent",
            what(repo, &k)
        )));
    };
    let rec: StatusRecord = serde_json::from_slice(&b)
        .map_err(|e| Error::corruption(format!("{}: {e}", what(repo, &k))))?;
    if rec.format != STATUS_FORMAT {
        return Err(Error::corruption(format!(
            "{}: status record format {} is not supported",
            what(repo, &k),
            rec.format
        )));
    }
    Ok(Some(rec))
}

/// Whether the taker of the backup at `key` still runs: it holds the `.running` lock. A lock
/// that cannot be tried (a read-only store) counts as not running.
fn taker_alive(repo: &dyn Repo, key: &str) -> bool {
    match repo.lock(&format!("{key}/{RUNNING_LOCK}"), LockMode::Shared, false) {
        Ok(Some(_)) => false,
        Ok(None) => true,
        Err(e) => {
            log::debug!("cannot try the running lock of {key}: {e}");
            false
        }
    }
}

/// Whether a process that wrote an in-place RUNNING record (previous release) still runs.
fn pid_alive(pid: Option<u32>) -> bool {
    pid.is_some_and(|p| {
        p == std::process::id()
            || nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), None).is_ok()
    })
}

/// The current state of a backup from what exists (see the module docs): `complete` is
/// backup.json, else `started` is the started marker; `newest` the newest status record;
/// `running` whether the taker still holds its lock (asked only for a marker alone).
pub fn derive(
    complete: Option<BackupMeta>,
    started: Option<BackupMeta>,
    newest: Option<StatusRecord>,
    running: impl FnOnce() -> bool,
) -> Option<BackupMeta> {
    match (complete, started) {
        (Some(mut m), _) => {
            if m.status == Status::Running && !pid_alive(m.pid) {
                // previous release: rewritten in place, its process gone
                m.status = Status::Error;
            }
            if let Some(r) = newest {
                m.status = r.status;
                m.error = r.error;
            }
            Some(m)
        }
        (None, Some(mut m)) => {
            let errored = newest.as_ref().is_some_and(|r| r.status == Status::Error);
            m.status = if !errored && running() {
                Status::Running
            } else {
                Status::Error
            };
            m.error = newest.and_then(|r| r.error);
            if m.status == Status::Error {
                m.pid = None;
            }
            Some(m)
        }
        (None, None) => None,
    }
}

/// Loads the current state of backup `id` of `instance` (see [`derive`]); NotFound when
/// neither its metadata nor its started marker exists.
pub fn load_in(catalog: &Catalog, instance: &str, id: &str) -> Result<BackupMeta> {
    let repo = catalog.repo();
    let key = backup_key(instance, id)?;
    let complete = read_meta_at(repo, &format!("{key}/{META_FILE}"), instance, id)?;
    let started = if complete.is_none() {
        read_meta_at(repo, &format!("{key}/{STARTED_FILE}"), instance, id)?
    } else {
        None
    };
    if complete.is_none() && started.is_none() {
        return Err(Error::not_found(format!(
            "backup {id} of instance \"{instance}\" not found (no {} in {})",
            META_FILE,
            what(repo, &key)
        )));
    }
    let newest = newest_status(repo, &key)?;
    derive(complete, started, newest, || taker_alive(repo, &key))
        .ok_or_else(|| Error::not_found(format!("backup {id} not found")))
}

/// Every backup of an instance, oldest first (by start LSN, then id). Backups that cannot be
/// read or are refused (see [`scan`]) are skipped with a warning.
pub fn list(catalog: &Catalog, instance: &str) -> Result<Vec<BackupMeta>> {
    let (v, skipped) = scan(catalog, instance)?;
    for err in skipped {
        log::warn!("skipping backup: {err}");
    }
    Ok(v)
}

/// One name under an instance's `backups/`.
#[derive(Debug)]
pub enum Found {
    Backup(Box<BackupMeta>),
    /// Neither metadata nor a started marker (a leftover): not a backup.
    Absent,
    /// Refused or unreadable (the error's kind tells which).
    Failed(Error),
}

/// Every name under an instance's `backups/`, with what it holds, sorted by name. An
/// instance or `backups` prefix that is damaged is an error; a missing one has no backups.
/// A backup that a committed merged FULL replaces reads as [`Found::Absent`], and its
/// children name the merged FULL as their parent (see `lifecycle::merge`).
pub fn scan_named(catalog: &Catalog, instance: &str) -> Result<Vec<(String, Found)>> {
    crate::catalog::check_instance_name(instance)?;
    let repo = catalog.repo();
    let prefix = Catalog::backups_key(instance);
    let l = repo.list(&prefix)?;
    let mut out = Vec::new();
    for name in l.damaged {
        let e = Error::corruption(format!(
            "\"{}\" is not a real directory (a symbolic link?); a backup must be one (refused, not read)",
            what(repo, &format!("{prefix}/{name}"))
        ));
        out.push((name, Found::Failed(e)));
    }
    for name in l.prefixes {
        let found = match load_in(catalog, instance, &name) {
            Ok(m) => Found::Backup(Box::new(m)),
            Err(e) if e.kind() == ErrorKind::NotFound => Found::Absent,
            Err(e) => Found::Failed(e),
        };
        out.push((name, found));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    // merged FULL backups replace their chain (lifecycle/merge.rs)
    crate::lifecycle::merge::apply_merges(repo, &mut out)?;
    Ok(out)
}

/// Every readable backup of an instance, oldest first, and an error for each one that was
/// skipped: a link, a name that is not a plain name, metadata that cannot be read, is
/// damaged, or names another backup or instance. A prefix without metadata or started
/// marker is not a backup and is left out silently.
pub fn scan(catalog: &Catalog, instance: &str) -> Result<(Vec<BackupMeta>, Vec<Error>)> {
    let mut v = Vec::new();
    let mut skipped = Vec::new();
    for (_, f) in scan_named(catalog, instance)? {
        match f {
            Found::Backup(m) => v.push(*m),
            Found::Absent => {}
            Found::Failed(e) => skipped.push(e),
        }
    }
    v.sort_by(|a, b| (a.start_lsn, &a.start_time, &a.id).cmp(&(b.start_lsn, &b.start_time, &b.id)));
    Ok((v, skipped))
}

/// Writes the backup's metadata once, when it is complete (create-only: a backup.json that
/// exists is never replaced). The caller has made every other object durable first.
pub fn save_complete(catalog: &Catalog, m: &BackupMeta) -> Result<()> {
    let key = format!("{}/{META_FILE}", m.key()?);
    catalog.repo().put_new(&key, &encode(m)?)
}

/// A started backup: its id is claimed and its taker holds the running lock.
pub struct Started {
    pub id: String,
    /// Held while the backup runs (RUNNING to readers); released on drop.
    pub lock: RepoLock,
}

pub fn find<'a>(list: &'a [BackupMeta], id: &str) -> Result<&'a BackupMeta> {
    list.iter()
        .find(|b| b.id == id)
        .ok_or_else(|| Error::not_found(format!("backup {id} not found")))
}

/// The chain of `id`: the backup itself, then its parent, ... down to the FULL backup.
pub fn chain<'a>(list: &'a [BackupMeta], id: &str) -> Result<Vec<&'a BackupMeta>> {
    let mut out = vec![find(list, id)?];
    while let Some(p) = out.last().and_then(|b| b.parent_id.clone()) {
        if out.len() > 10_000 {
            return Err(Error::corruption(format!("backup chain of {id} loops")));
        }
        let parent = find(list, &p).map_err(|_| {
            Error::not_found(format!("backup {id} needs parent {p}, which is missing"))
        })?;
        out.push(parent);
    }
    if out.last().map(|b| b.mode) != Some(Mode::Full) {
        return Err(Error::corruption(format!(
            "backup chain of {id} does not end in a FULL backup"
        )));
    }
    Ok(out)
}

/// Whether `b` descends from `ancestor` (or is it).
pub fn descends_from(list: &[BackupMeta], b: &BackupMeta, ancestor: &str) -> bool {
    let mut cur = Some(b);
    let mut steps = 0;
    while let Some(c) = cur {
        if c.id == ancestor {
            return true;
        }
        steps += 1;
        if steps > 10_000 {
            return false;
        }
        cur = c
            .parent_id
            .as_deref()
            .and_then(|p| list.iter().find(|x| x.id == p));
    }
    false
}

/// Unix seconds to "YYYY-MM-DD HH:MM:SS+00".
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}+00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Parses "YYYY-MM-DD[ T]HH:MM:SS[.frac][Z|UTC|+HH[:MM]|-HH[:MM]]" (UTC when no zone) to
/// Unix seconds (fraction dropped, rounded down).
pub fn parse_time(s: &str) -> Result<i64> {
    let bad = || {
        Error::invalid(format!(
            "cannot parse time '{s}' (expected YYYY-MM-DD HH:MM:SS[+TZ])"
        ))
    };
    let s = s.trim();
    let date = s.get(0..10).ok_or_else(bad)?;
    let mut dp = date.split('-');
    let y: i64 = dp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let mo: u32 = dp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let d: u32 = dp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let rest = s.get(10..).ok_or_else(bad)?.trim_start_matches([' ', 'T']);
    let hms = rest.get(0..8).ok_or_else(bad)?;
    let mut tp = hms.split(':');
    let h: i64 = tp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let mi: i64 = tp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let se: i64 = tp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let mut zone = rest.get(8..).ok_or_else(bad)?;
    if let Some(z) = zone.strip_prefix('.') {
        zone = z.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let zone = zone.trim();
    let offset = match zone {
        "" | "Z" | "UTC" | "GMT" => 0,
        z if z.starts_with('+') || z.starts_with('-') => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let body = &z[1..];
            let (hh, mm) = match body.split_once(':') {
                Some((a, b)) => (a, b),
                None if body.len() == 4 => (&body[0..2], &body[2..4]),
                None => (body, "0"),
            };
            let hh: i64 = hh.parse().map_err(|_| bad())?;
            let mm: i64 = mm.parse().map_err(|_| bad())?;
            sign * (hh * 3600 + mm * 60)
        }
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    Ok(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset)
}

/// How many suffixed ids (`BASE-2`, `BASE-3`, ...) are tried before giving up.
/// How many suffixed ids (`BASE-2`, `BASE-3`, ...) are tried before giving up.
const MAX_ID_SUFFIX: u32 = 10_000;

/// Starts a backup: claims a new id and writes its started marker (`m` with that id,
/// status RUNNING). The id is the start time in base 36 (as pg_probackup does), made
/// unique by a `-N` suffix. Claiming is create-only: the taker first takes the id's
/// `.running` lock (without waiting), then writes the marker with `put_new`; whoever loses
/// on a name (lock held, or a marker or metadata there) tries the next. Ids stay valid
/// names and sort by start time (the suffix only breaks ties).
pub fn start(catalog: &Catalog, m: &mut BackupMeta, now: i64) -> Result<Started> {
    let repo = catalog.repo();
    let base = base36(now.max(0) as u64);
    for k in 1..=MAX_ID_SUFFIX {
        let id = if k == 1 {
            base.clone()
        } else {
            format!("{base}-{k}")
        };
        let key = backup_key(&m.instance, &id)?;
        // Damage where the id would go (a link, a file) takes the id too: skip it.
        let taken = |e: &Error| e.kind() == ErrorKind::Corruption;
        match repo.head(&format!("{key}/{META_FILE}")) {
            Ok(None) => {}
            Ok(Some(_)) => continue,
            Err(e) if taken(&e) => continue,
            Err(e) => return Err(e),
        }
        let lock = match repo.lock(&format!("{key}/{RUNNING_LOCK}"), LockMode::Exclusive, false) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(e) if taken(&e) => continue,
            Err(e) => return Err(e),
        };
        m.id = id.clone();
        m.status = Status::Running;
        match repo.put_new(&format!("{key}/{STARTED_FILE}"), &encode(m)?) {
            Ok(()) => return Ok(Started { id, lock }),
            Err(e) if e.kind() == ErrorKind::Conflict || taken(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::conflict(format!(
        "no free backup id in \"{}\": {base} and {MAX_ID_SUFFIX} suffixed ids are taken",
        what(repo, &Catalog::backups_key(&m.instance))
    )))
}

/// `n` in upper-case base 36.
fn base36(mut n: u64) -> String {
    let mut s = Vec::new();
    loop {
        let digit = (n % 36) as u32;
        s.push(
            std::char::from_digit(digit, 36)
                .unwrap_or('0')
                .to_ascii_uppercase(),
        );
        n /= 36;
        if n == 0 {
            break;
        }
    }
    s.iter().rev().collect()
}

/// A complete OK backup of instance "db" for unit tests (PostgreSQL 15, 8 kB blocks,
/// 16 MiB segments); tests override what they need with struct update syntax.
#[cfg(test)]
pub(crate) fn test_meta(id: &str, mode: Mode, parent: Option<&str>) -> BackupMeta {
    BackupMeta {
        format: META_FORMAT,
        id: id.into(),
        instance: "db".into(),
        mode,
        status: Status::Ok,
        parent_id: parent.map(Into::into),
        timeline: 1,
        start_lsn: Lsn(0),
        stop_lsn: Some(Lsn(1)),
        parent_start_lsn: None,
        start_time: String::new(),
        end_time: None,
        recovery_time: None,
        recovery_epoch: None,
        recovery_xid: None,
        data_bytes: 0,
        files: 0,
        compress: "none".into(),
        pg_major: 15,
        system_id: 1,
        block_size: 8192,
        relseg_size: 131072,
        wal_segment_size: 1 << 24,
        data_checksums: true,
        pid: None,
        error: None,
        stream: false,
        from_standby: false,
        change_source: None,
        block_crcs: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::MemRepo;
    use std::path::Path;

    fn sample() -> BackupMeta {
        BackupMeta {
            format: META_FORMAT,
            id: "TOZ6BJ".into(),
            instance: "db".into(),
            mode: Mode::Page,
            status: Status::Ok,
            parent_id: Some("TOZ6AG".into()),
            timeline: 1,
            start_lsn: Lsn(0x1_0000_0028),
            stop_lsn: Some(Lsn(0x1_0000_0100)),
            parent_start_lsn: Some(Lsn(0x28)),
            start_time: "2026-11-23 18:33:31+00".into(),
            end_time: None,
            recovery_time: None,
            recovery_epoch: None,
            recovery_xid: Some(771),
            data_bytes: 8192,
            files: 1,
            compress: "none".into(),
            pg_major: 15,
            system_id: 7,
            block_size: 8192,
            relseg_size: 131072,
            wal_segment_size: 1 << 24,
            data_checksums: true,
            pid: None,
            error: None,
            stream: false,
            from_standby: false,
            change_source: None,
            block_crcs: None,
        }
    }

    #[test]
    fn summary_source_is_written_only_for_summary_backups() {
        let m = BackupMeta {
            change_source: Some(ChangeSource::Summary),
            ..sample()
        };
        let b = encode(&m).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["source"], "summary");
        assert_eq!(v["mode"], "PAGE");
        assert_eq!(decode(&b, "x").unwrap(), m);
        let plain = encode(&sample()).unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains("source"));
        assert_eq!(decode(&plain, "x").unwrap().change_source, None);
    }

    #[test]
    fn stream_flag_is_written_when_true_and_reads_false_when_absent() {
        let m = BackupMeta {
            stream: true,
            from_standby: true,
            ..sample()
        };
        let b = encode(&m).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["from_standby"], true);
        assert_eq!(decode(&b, "t").unwrap(), m);
        let plain = encode(&sample()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        assert!(v.get("stream").is_none(), "{v}");
        assert!(!decode(&plain, "t").unwrap().stream);
    }

    #[test]
    fn meta_round_trip_and_golden_bytes() {
        let m = sample();
        let b = encode(&m).unwrap();
        assert_eq!(decode(&b, "t").unwrap(), m);
        // still one JSON object, for other tools
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["crc32c"], "f4c28f34");
        let golden = r#"{
  "format": 2,
  "id": "TOZ6BJ",
  "instance": "db",
  "mode": "PAGE",
  "status": "OK",
  "parent_id": "TOZ6AG",
  "timeline": 1,
  "start_lsn": "1/28",
  "stop_lsn": "1/100",
  "parent_start_lsn": "0/28",
  "start_time": "2026-11-23 18:33:31+00",
  "end_time": null,
  "recovery_time": null,
  "recovery_epoch": null,
  "recovery_xid": 771,
  "data_bytes": 8192,
  "files": 1,
  "compress": "none",
  "pg_major": 15,
  "system_id": 7,
  "block_size": 8192,
  "relseg_size": 131072,
  "wal_segment_size": 16777216,
  "data_checksums": true,
  "pid": null,
  "error": null,
  "crc32c": "f4c28f34"
}
"#;
        assert_eq!(String::from_utf8(b).unwrap(), golden);
        let body = golden.split(",\n  \"crc32c\"").next().unwrap();
        assert_eq!(crc32c::crc32c(body.as_bytes()), 0xf4c28f34);
    }

    #[test]
    fn meta_flipped_byte_is_refused_naming_the_file() {
        let good = encode(&sample()).unwrap();
        for pos in 0..good.len() {
            let mut b = good.clone();
            b[pos] ^= 0x01;
            let e = decode(&b, "/cat/backups/X/backup.json").unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corruption, "byte {pos}: {e}");
            assert!(
                e.to_string().contains("/cat/backups/X/backup.json"),
                "byte {pos}: {e}"
            );
        }
        let e = decode(&good[..good.len() - 30], "f").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corruption, "{e}");
    }

    #[test]
    fn meta_format_1_without_checksum_is_still_read() {
        let m = BackupMeta {
            format: 1,
            ..sample()
        };
        let mut old = serde_json::to_vec_pretty(&m).unwrap();
        old.push(b'\n');
        assert_eq!(decode(&old, "f").unwrap(), m);
        // but a format 2 file must carry its checksum
        let mut no_crc = serde_json::to_vec_pretty(&sample()).unwrap();
        no_crc.push(b'\n');
        let e = decode(&no_crc, "f").unwrap_err();
        assert!(e.to_string().contains("no valid checksum"), "{e}");
    }

    #[test]
    fn meta_unknown_format_is_refused_clearly() {
        let m = BackupMeta {
            format: 9,
            ..sample()
        };
        let e = decode(&encode(&m).unwrap(), "f").unwrap_err();
        assert!(e.to_string().contains("format 9 is not supported"), "{e}");
    }

    /// Ids are created create-only: the same second gives `BASE`, `BASE-2`, ... and a name
    #[test]
    fn times() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00+00");
        assert_eq!(format_utc(1_795_458_811), "2026-11-23 18:33:31+00");
        assert_eq!(parse_time("2026-11-23 18:33:31+00").unwrap(), 1_795_458_811);
        assert_eq!(
            parse_time("2026-11-23 19:33:31.123456+01").unwrap(),
            1_795_458_811
        );
        assert_eq!(parse_time("2026-11-23T18:33:31Z").unwrap(), 1_795_458_811);
        assert_eq!(
            parse_time("2026-11-23 13:33:31-05:00").unwrap(),
            1_795_458_811
        );
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01 00:00:00").is_err());
    }

    #[test]
    fn meta_with_unsafe_names_is_refused() {
        for m in [
            BackupMeta {
                id: "../../x".into(),
                ..sample()
            },
            BackupMeta {
                id: "a/b".into(),
                ..sample()
            },
            BackupMeta {
                instance: "../db".into(),
                ..sample()
            },
            BackupMeta {
                parent_id: Some("../../y".into()),
                ..sample()
            },
            BackupMeta {
                format: 1,
                id: "..".into(),
                ..sample()
            },
        ] {
            let b = if m.format == 1 {
                serde_json::to_vec_pretty(&m).unwrap()
            } else {
                encode(&m).unwrap()
            };
            let e = decode(&b, "/cat/backups/X/backup.json").unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corruption, "{m:?}: {e}");
            assert!(e.to_string().contains("/cat/backups/X/backup.json"), "{e}");
        }
    }

    fn mem_catalog() -> (Catalog, MemRepo) {
        let r = MemRepo::new();
        (
            Catalog::with_repo(Path::new("/mem"), std::sync::Arc::new(r.clone())),
            r,
        )
    }

    fn meta(id: &str) -> BackupMeta {
        BackupMeta {
            id: id.into(),
            mode: Mode::Full,
            parent_id: None,
            ..sample()
        }
    }

    fn put_meta(r: &MemRepo, dir: &str, file: &str, m: &BackupMeta) {
        r.put_new(
            &format!("instances/db/backups/{dir}/{file}"),
            &encode(m).unwrap(),
        )
        .unwrap();
    }

    fn status_of(c: &Catalog, id: &str) -> (Status, Option<String>) {
        let m = load_in(c, "db", id).unwrap();
        (m.effective_status(), m.error)
    }

    /// A started marker alone is RUNNING while its taker holds the lock, ERROR after; a
    /// complete backup is OK; an ERROR record names the error; nothing is rewritten.
    #[test]
    fn status_derives_from_marker_lock_metadata_and_records() {
        let (c, r) = mem_catalog();
        let mut m = BackupMeta {
            status: Status::Running,
            ..meta("")
        };
        m.instance = "db".into();
        let started = start(&c, &mut m, 1_795_458_811).unwrap();
        assert_eq!(started.id, "TOYWVV");
        assert_eq!(status_of(&c, "TOYWVV").0, Status::Running);
        // a second backup in the same second gets its own id
        let mut m2 = m.clone();
        let s2 = start(&c, &mut m2, 1_795_458_811).unwrap();
        assert_eq!(s2.id, "TOYWVV-2");
        drop(s2);
        assert_eq!(status_of(&c, "TOYWVV-2"), (Status::Error, None));
        // a failed backup leaves an ERROR record and keeps its files
        r.put_new("instances/db/backups/TOYWVV-2/manifest", b"partial")
            .unwrap();
        record_status(
            &c,
            "db",
            "TOYWVV-2",
            Status::Error,
            Some("boom".into()),
            "backup",
        )
        .unwrap();
        assert_eq!(
            status_of(&c, "TOYWVV-2"),
            (Status::Error, Some("boom".into()))
        );
        assert!(r
            .head("instances/db/backups/TOYWVV-2/manifest")
            .unwrap()
            .is_some());
        // completion: backup.json written once
        m.status = Status::Ok;
        save_complete(&c, &m).unwrap();
        assert_eq!(
            save_complete(&c, &m).unwrap_err().kind(),
            ErrorKind::Conflict
        );
        drop(started);
        assert_eq!(status_of(&c, "TOYWVV"), (Status::Ok, None));
        // the marker's id is taken even after the lock is gone
        let mut m3 = m.clone();
        assert_eq!(start(&c, &mut m3, 1_795_458_811).unwrap().id, "TOYWVV-3");
        let ids: Vec<String> = list(&c, "db").unwrap().into_iter().map(|b| b.id).collect();
        assert_eq!(ids.len(), 3, "{ids:?}");
    }

    /// Validation records: CORRUPT, then a clean validation restoring OK; the newest wins,
    /// also within one second; backup.json stays as written.
    #[test]
    fn newest_status_record_wins() {
        let (c, r) = mem_catalog();
        put_meta(&r, "A", META_FILE, &meta("A"));
        let before = r
            .get("instances/db/backups/A/backup.json")
            .unwrap()
            .into_vec();
        record_status(
            &c,
            "db",
            "A",
            Status::Corrupt,
            Some("bad crc".into()),
            "validate",
        )
        .unwrap();
        assert_eq!(
            status_of(&c, "A"),
            (Status::Corrupt, Some("bad crc".into()))
        );
        record_status(
            &c,
            "db",
            "A",
            Status::Orphan,
            Some("parent".into()),
            "validate",
        )
        .unwrap();
        assert_eq!(status_of(&c, "A").0, Status::Orphan);
        record_status(&c, "db", "A", Status::Ok, None, "validate").unwrap();
        assert_eq!(status_of(&c, "A"), (Status::Ok, None));
        let l = r.list("instances/db/backups/A/status").unwrap();
        assert_eq!(l.objects.len(), 3);
        assert_eq!(
            r.get("instances/db/backups/A/backup.json")
                .unwrap()
                .into_vec(),
            before
        );
        // an unreadable newest record is damage, not "no record"
        let (c2, r2) = mem_catalog();
        put_meta(&r2, "B", META_FILE, &meta("B"));
        r2.put_new("instances/db/backups/B/status/20261129T101010Z.json", b"{")
            .unwrap();
        let (v, skipped) = scan(&c2, "db").unwrap();
        assert!(v.is_empty());
        assert_eq!(skipped[0].kind(), ErrorKind::Corruption);
        assert!(skipped[0]
            .to_string()
            .contains("status/20261129T101010Z.json"));
    }

    /// The previous release's in-place formats: backup.json format 1 and 2 with status OK,
    /// CORRUPT, and RUNNING (ERROR once its process is gone, RUNNING while it lives).
    #[test]
    fn previous_release_in_place_statuses_are_read() {
        let (c, r) = mem_catalog();
        let mut old = serde_json::to_vec_pretty(&BackupMeta {
            format: 1,
            ..meta("OLD")
        })
        .unwrap();
        old.push(b'\n');
        r.put_new("instances/db/backups/OLD/backup.json", &old)
            .unwrap();
        put_meta(
            &r,
            "COR",
            META_FILE,
            &BackupMeta {
                status: Status::Corrupt,
                error: Some("x".into()),
                ..meta("COR")
            },
        );
        put_meta(
            &r,
            "DEAD",
            META_FILE,
            &BackupMeta {
                status: Status::Running,
                pid: Some(u32::MAX - 1),
                ..meta("DEAD")
            },
        );
        put_meta(
            &r,
            "LIVE",
            META_FILE,
            &BackupMeta {
                status: Status::Running,
                pid: Some(std::process::id()),
                ..meta("LIVE")
            },
        );
        assert_eq!(status_of(&c, "OLD").0, Status::Ok);
        assert_eq!(status_of(&c, "COR"), (Status::Corrupt, Some("x".into())));
        assert_eq!(status_of(&c, "DEAD").0, Status::Error);
        assert_eq!(status_of(&c, "LIVE").0, Status::Running);
        // a clean validation of the CORRUPT one restores OK, as a new record
        record_status(&c, "db", "COR", Status::Ok, None, "validate").unwrap();
        assert_eq!(status_of(&c, "COR"), (Status::Ok, None));
    }

    #[test]
    fn list_refuses_mismatched_ids_and_skips_leftovers() {
        let (c, r) = mem_catalog();
        put_meta(&r, "A", META_FILE, &meta("A"));
        put_meta(&r, "B", META_FILE, &meta("../../x"));
        put_meta(
            &r,
            "C",
            META_FILE,
            &BackupMeta {
                instance: "other".into(),
                ..meta("C")
            },
        );
        // a marker that names another backup
        put_meta(&r, "D", STARTED_FILE, &meta("A"));
        // a prefix with neither metadata nor marker: a leftover, no complaint
        r.put_new("instances/db/backups/NEW/manifest", b"x")
            .unwrap();
        let (v, skipped) = scan(&c, "db").unwrap();
        let ids: Vec<&str> = v.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["A"], "{skipped:?}");
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        let text: Vec<String> = skipped.iter().map(|e| e.to_string()).collect();
        for needle in ["backups/B", "backups/C", "backups/D"] {
            assert!(
                text.iter().any(|t| t.contains(needle)),
                "{needle}: {text:?}"
            );
        }
        assert!(load_in(&c, "db", "B").is_err());
        assert!(load_in(&c, "db", "../db/backups/A").is_err());
        assert_eq!(load_in(&c, "db", "A").unwrap(), meta("A"));
        assert!(list(&c, "nosuch").unwrap().is_empty());
    }

    /// On a local catalog, a backup directory or backup.json that is a symlink is refused.
    #[test]
    fn local_links_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let c = Catalog::init(&d.path().join("cat")).unwrap();
        c.repo()
            .put_new(
                "instances/db/backups/A/backup.json",
                &encode(&meta("A")).unwrap(),
            )
            .unwrap();
        let bdir = d.path().join("cat/instances/db/backups");
        let elsewhere = d.path().join("elsewhere/L");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join(META_FILE), encode(&meta("L")).unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, bdir.join("L")).unwrap();
        std::fs::create_dir(bdir.join("S")).unwrap();
        std::fs::write(d.path().join("s.json"), encode(&meta("S")).unwrap()).unwrap();
        std::os::unix::fs::symlink(d.path().join("s.json"), bdir.join("S").join(META_FILE))
            .unwrap();
        let (v, skipped) = scan(&c, "db").unwrap();
        assert_eq!(v.len(), 1);
        let text: Vec<String> = skipped.iter().map(|e| e.to_string()).collect();
        assert_eq!(skipped.len(), 2, "{text:?}");
        for needle in ["backups/L", "backups/S"] {
            assert!(
                text.iter().any(|t| t.contains(needle)),
                "{needle}: {text:?}"
            );
        }
    }
}
