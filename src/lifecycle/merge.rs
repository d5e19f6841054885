//! `walnut merge -i ID`: an incremental backup and its ancestors become one FULL backup
//! that restores identically; the old chain is replaced. `delete --expired --merge-expired`
//! merges the expired ancestors of a kept incremental into it the same way.
//!
//! # Identity
//! `backup.json` is written once, so the merged FULL cannot take the place of the merged
//! incremental under its id (pg_probackup rewrites it in place). It is a new backup with a
//! new id (`M`), a normal FULL: its `backup.json`, manifest, compression and checksums are
//! what a FULL backup writes, so show, validate and restore treat it as any FULL. Beside
//! them it holds `merged.json` ([`MergeRecord`]): the incremental it replaces (`target`,
//! `X`) and every backup it replaces (`replaces`: `X` and the ancestors nothing else
//! needs). Once `M`'s backup.json exists, every listing of the instance
//! ([`crate::backup::meta::scan_named`], so show, validate, restore, backup and delete):
//! - leaves out the backups `M` replaces, even while their objects still exist;
//! - gives every child of `X` (an incremental taken on top of `X`) `M` as its parent: `M`
//!   has `X`'s start LSN, timeline, stop LSN and data, so the child's changed blocks apply
//!   on top of it as they applied on top of `X`.
//!
//! An ancestor stays (and so does everything below it) when another backup still descends
//! from it through another branch, or when it is pinned.
//!
//! # Crash safety
//! 1. `M` is claimed like any backup (started marker, `.running` lock held); the marker's
//!    `error` text says it is a merge in progress. Until step 3 it reads as RUNNING, and as
//!    ERROR once the process is gone: never OK.
//! 2. Every file is written. Files that are, byte for byte, a stored whole file of a
//!    backup of the chain are *linked*, not rewritten ([`Repo::link_copy`]: a hard link in
//!    a local catalog, as pg_probackup's merge moves unchanged files): the files `X` holds
//!    whole, and those unchanged since an older backup stored them whole (every newer
//!    backup holds them as an incremental file of no page, at the same length, and the
//!    whole file is stored as `M` stores files, see [`unchanged_whole`]). A link keeps the
//!    source's manifest entry (size, CRC-32C) and is checked against its size only: its
//!    CRC is checked when validate or restore read it. Hard links are sound because no
//!    catalog object is ever rewritten in place: removing the old chain, or an abandoned
//!    `M`, removes names, never the other's bytes. The other files are rebuilt from the
//!    chain as restore rebuilds them (every source checked against its CRC) and stored
//!    compressed and checksummed as a FULL stores them. When uncompressed, each block's
//!    CRC-32C goes into `M`'s `block_crcs` ([`crate::format::blockcrc`]): taken on the way
//!    for a rebuilt file, from the source backup's own `block_crcs` for a linked one (or
//!    read from it when that has none).
//!    Then `block_crcs`, `backup_label`, the pin, the manifest and `merged.json`, and one
//!    barrier makes all of it durable.
//! 3. The switch: `M`'s backup.json, create-only. Before it the old chain is what every
//!    command sees; after it, `M`.
//! 4. The replaced backups get an ERROR record ("merged into M"), then their objects go,
//!    newest first, in the order `delete` removes a backup.
//!
//! A kill at any point leaves the old chain (before 3) or `M` (after 3) restorable, and
//! nothing half-written listed OK. `merge` and `delete` finish an interrupted merge first
//! ([`finish_pending`]): an abandoned `M` (a merge marker, no backup.json, its lock free)
//! is removed, and what a committed `M` replaces is removed.
//!
//! Test hook: with `WALNUT_TEST_KILL_AT=n`, merge SIGKILLs itself right before its `n`th
//! catalog write or delete ([`super::crashpoint`], as `delete`; inert without it).

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backup::copy::{BlockCrcOut, CrcWriter, Lz4FrameWriter, LZ4_FRAME_BYTES};
use crate::backup::meta::{
    self, BackupMeta, Found, Mode, Status, META_FILE, STARTED_FILE, STATUS_DIR,
};
use crate::backup::stored;
use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::blockcrc::{self, FileCrcs, WholeCrcs};
use crate::format::manifest::{self, FileEntry, Lz4Frames, ManifestWriter, Storage};
use crate::repo::{Durability, LockMode, ObjectWriter, Repo};
use crate::restore::{rebuild, ChainFiles};
use crate::safepath;

use super::records::{self, Pin, PinChange};

/// The merge record of a merged FULL backup.
pub const MERGE_FILE: &str = "merged.json";
const MERGE_FORMAT: u32 = 1;
/// The `error` text of a merged FULL's started marker: what marks an abandoned merge.
const MERGE_MARK: &str = "walnut merge in progress, merging ";
/// The largest merge record read.
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// `merged.json`: what a merged FULL backup replaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRecord {
    pub format: u32,
    /// The incremental backup merged: its children descend from the merged FULL.
    pub target: String,
    /// Every backup the merged FULL replaces, newest first: the target and the ancestors
    /// nothing else needs.
    pub replaces: Vec<String>,
    /// The chain whose data it holds, newest first (the target down to its FULL).
    pub chain: Vec<String>,
    /// When the merge ran (UTC).
    pub time: String,
}

/// What a merge does (planned before anything is written).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MergePlan {
    pub target: String,
    /// The chain, newest first.
    pub chain: Vec<String>,
    /// What the merged FULL replaces, newest first.
    pub replaces: Vec<String>,
    /// Ancestors that stay, with why.
    pub kept: Vec<(String, String)>,
}

/// What `merge` did.
#[derive(Clone, Debug, Serialize)]
pub struct MergeReport {
    pub instance: String,
    pub plan: MergePlan,
    /// The merged FULL's id (`None` in a dry run).
    pub merged_id: Option<String>,
    pub files: u64,
    /// Bytes stored in the merged FULL (linked ones included).
    pub bytes_written: u64,
    /// Files of the merged FULL that are files of the replaced backups, unchanged, and
    /// their bytes: put in place with [`Repo::link_copy`] (hard links in a local catalog:
    /// nothing read or written), not rewritten. Counts links only: a store that copies
    /// counts none. (0 for an interrupted merge finished now.)
    pub linked_files: u64,
    pub linked_bytes: u64,
    /// Seconds in all, and writing the merged FULL (up to and with the switch).
    pub seconds: f64,
    pub write_seconds: f64,
    /// Backups removed (the replaced ones, and leftovers of interrupted merges).
    pub removed: Vec<String>,
    /// The target had already been merged (an interrupted merge, finished now).
    pub already_merged: bool,
}

#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub id: String,
    /// "Now", for pins.
    pub now: i64,
    /// Files merged at once.
    pub jobs: usize,
}

/// Threads of `delete --merge-expired`'s merges.
pub const DEFAULT_JOBS: usize = 2;

// ---- reading merge records ---------------------------------------------------------------

/// The merge record of the backup at `key`, when it has one and its backup.json exists
/// (a record without it belongs to a merge that never switched, and means nothing).
fn committed_record(repo: &dyn Repo, key: &str) -> Result<Option<MergeRecord>> {
    let rkey = format!("{key}/{MERGE_FILE}");
    let what = stored::what(repo, &rkey);
    match repo.head(&rkey)? {
        None => return Ok(None),
        Some(h) if h.size > MAX_RECORD_BYTES => {
            return Err(Error::corruption(format!(
                "{what}: larger than {MAX_RECORD_BYTES} bytes: not a merge record"
            )))
        }
        Some(_) => {}
    }
    if repo.head(&format!("{key}/{META_FILE}"))?.is_none() {
        return Ok(None);
    }
    let b = repo.get(&rkey).map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            Error::corruption(format!("{what}: listed but absent"))
        } else {
            e
        }
    })?;
    let r: MergeRecord =
        serde_json::from_slice(&b).map_err(|e| Error::corruption(format!("{what}: {e}")))?;
    if r.format != MERGE_FORMAT {
        return Err(Error::corruption(format!(
            "{what}: merge record format {} is not supported",
            r.format
        )));
    }
    safepath::check_name(&r.target, &format!("{what}: target"))?;
    for id in r.replaces.iter().chain(&r.chain) {
        safepath::check_name(id, &format!("{what}: backup id"))?;
    }
    if r.replaces.first() != Some(&r.target) {
        return Err(Error::corruption(format!(
            "{what}: the replaced backups do not start with the target {}",
            r.target
        )));
    }
    Ok(Some(r))
}

/// Applies the committed merges to a listing of an instance's backups (see the module
/// docs): what a merged FULL replaces reads as absent, the children of its target name it
/// as their parent. A replaced backup must agree with the merged FULL (same system, not
/// newer; the target at the same start LSN and timeline), else the record is ignored for
/// it and a warning says so. A merge record that cannot be read makes its FULL unreadable.
pub(crate) fn apply_merges(repo: &dyn Repo, out: &mut [(String, Found)]) -> Result<()> {
    let mut merges: Vec<(BackupMeta, MergeRecord)> = Vec::new();
    for (_, f) in out.iter_mut() {
        let Found::Backup(m) = f else { continue };
        if m.mode != Mode::Full || m.status == Status::Running {
            continue;
        }
        match committed_record(repo, &m.key()?) {
            Ok(Some(r)) => merges.push(((**m).clone(), r)),
            Ok(None) => {}
            Err(e) => *f = Found::Failed(e),
        }
    }
    for (m, r) in &merges {
        for (_, f) in out.iter_mut() {
            let Found::Backup(b) = f else { continue };
            if b.id == m.id || !r.replaces.contains(&b.id) {
                continue;
            }
            let agrees = b.system_id == m.system_id
                && b.start_lsn <= m.start_lsn
                && (b.id != r.target || (b.start_lsn == m.start_lsn && b.timeline == m.timeline));
            if agrees {
                *f = Found::Absent;
            } else {
                log::warn!(
                    "backup {} claims to replace backup {}, which does not match it; both are listed",
                    m.id,
                    b.id
                );
            }
        }
        let target_listed = out
            .iter()
            .any(|(_, f)| matches!(f, Found::Backup(b) if b.id == r.target));
        if target_listed {
            continue;
        }
        for (_, f) in out.iter_mut() {
            if let Found::Backup(b) = f {
                if b.id != m.id
                    && b.parent_id.as_deref() == Some(r.target.as_str())
                    && !r.replaces.contains(&b.id)
                {
                    b.parent_id = Some(m.id.clone());
                }
            }
        }
    }
    Ok(())
}

// ---- planning ----------------------------------------------------------------------------

/// Plans merging backup `id` of `list` (as [`meta::scan`] lists it): refused for a FULL
/// backup, a chain with a backup that is not OK, or a chain a RUNNING backup builds on.
pub fn plan_merge(
    list: &[BackupMeta],
    pins: &HashMap<String, Pin>,
    id: &str,
    now: i64,
) -> Result<MergePlan> {
    let x = meta::find(list, id)?;
    if x.mode == Mode::Full {
        return Err(Error::invalid(format!(
            "backup {id} is a FULL backup: there is nothing to merge"
        )));
    }
    let chain = meta::chain(list, id)?;
    for b in &chain {
        match b.effective_status() {
            Status::Ok => {}
            Status::Running => {
                return Err(Error::refused(format!(
                    "backup {} of the chain of {id} is RUNNING; nothing merged",
                    b.id
                )))
            }
            s => {
                return Err(Error::refused(format!(
                    "backup {} of the chain of {id} is {s}; only a chain of OK backups is merged (validate it first)",
                    b.id
                )))
            }
        }
    }
    let ids: HashSet<&str> = chain.iter().map(|b| b.id.as_str()).collect();
    if let Some(r) = list.iter().find(|b| {
        b.effective_status() == Status::Running
            && b.parent_id.as_deref().is_some_and(|p| ids.contains(p))
    }) {
        return Err(Error::refused(format!(
            "backup {} is RUNNING on top of the chain of {id}; nothing merged",
            r.id
        )));
    }
    let mut replaces = vec![x.id.clone()];
    let mut kept = Vec::new();
    let mut keeping = false;
    for a in chain.iter().skip(1) {
        if !keeping {
            let others: Vec<&str> = list
                .iter()
                .filter(|c| {
                    c.parent_id.as_deref() == Some(a.id.as_str()) && !replaces.contains(&c.id)
                })
                .map(|c| c.id.as_str())
                .collect();
            let why = if !others.is_empty() {
                Some(format!("parent of {}", others.join(", ")))
            } else if pins.get(&a.id).is_some_and(|p| p.pinned_at(now)) {
                Some("pinned".to_string())
            } else {
                None
            };
            match why {
                None => {
                    replaces.push(a.id.clone());
                    continue;
                }
                Some(w) => {
                    keeping = true;
                    kept.push((a.id.clone(), w));
                    continue;
                }
            }
        }
        kept.push((a.id.clone(), "ancestor of a kept backup".to_string()));
    }
    Ok(MergePlan {
        target: x.id.clone(),
        chain: chain.iter().map(|b| b.id.clone()).collect(),
        replaces,
        kept,
    })
}

// ---- finishing interrupted merges ---------------------------------------------------------

/// Whether the backup at `key` is an abandoned merge: no backup.json, a started marker
/// that says "merge in progress", and no process holding its running lock.
fn abandoned_merge(repo: &dyn Repo, key: &str) -> Result<bool> {
    if repo.head(&format!("{key}/{META_FILE}"))?.is_some() {
        return Ok(false);
    }
    let skey = format!("{key}/{STARTED_FILE}");
    let b = match repo.get(&skey) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let m = match meta::decode(&b, &stored::what(repo, &skey)) {
        Ok(m) => m,
        Err(_) => return Ok(false),
    };
    if !m
        .error
        .as_deref()
        .is_some_and(|e| e.starts_with(MERGE_MARK))
    {
        return Ok(false);
    }
    Ok(repo
        .lock(&format!("{key}/.running"), LockMode::Shared, false)?
        .is_some())
}

/// Removes replaced backup `id` (merged into `by`): an ERROR record first (should the
/// merged FULL ever go, it reads as ERROR, never as OK), then its objects.
fn remove_replaced(catalog: &Catalog, instance: &str, id: &str, by: &str) -> Result<()> {
    let repo = catalog.repo();
    let key = meta::backup_key(instance, id)?;
    let mut _held = Vec::new();
    for name in [".running", ".use"] {
        _held.push(
            repo.lock(&format!("{key}/{name}"), LockMode::Exclusive, false)?
                .ok_or_else(|| {
                    Error::refused(format!(
                        "backup {id}, replaced by merged backup {by}, is in use (its {name} lock is held); a later merge or delete removes it"
                    ))
                })?,
        );
    }
    let has_meta = repo.head(&format!("{key}/{META_FILE}"))?.is_some()
        || repo.head(&format!("{key}/{STARTED_FILE}"))?.is_some();
    let already = repo
        .list(&format!("{key}/{STATUS_DIR}"))?
        .objects
        .iter()
        .any(|o| o.name.ends_with(".json"))
        && meta::load_in(catalog, instance, id).is_ok_and(|b| b.status == Status::Error);
    if has_meta && !already {
        meta::record_status(
            catalog,
            instance,
            id,
            Status::Error,
            Some(format!("merged into backup {by}; being removed")),
            "merge",
        )?;
    }
    // the data objects first, several at once (their order does not matter: the backup
    // reads as ERROR already), then the records
    super::remove_backup_objects(repo, &key)?;
    log::info!("removed backup {id} (merged into {by})");
    Ok(())
}

/// Refuses to remove backup `id`, which the merge record of merged FULL `m` says it
/// replaces, unless `id` matches it as [`apply_merges`] requires (same system, not newer;
/// the target at `m`'s start LSN and timeline) or is no backup any more (a leftover of an
/// interrupted removal). A forged record must not make `delete` or `merge` remove a backup.
fn check_replaced(
    catalog: &Catalog,
    instance: &str,
    m: &BackupMeta,
    r: &MergeRecord,
    id: &str,
) -> Result<()> {
    let repo = catalog.repo();
    let key = meta::backup_key(instance, id)?;
    if repo.head(&format!("{key}/{META_FILE}"))?.is_none()
        && repo.head(&format!("{key}/{STARTED_FILE}"))?.is_none()
    {
        return Ok(());
    }
    let b = meta::load_in(catalog, instance, id)?;
    let agrees = b.system_id == m.system_id
        && b.start_lsn <= m.start_lsn
        && (b.id != r.target || (b.start_lsn == m.start_lsn && b.timeline == m.timeline));
    if agrees {
        return Ok(());
    }
    Err(Error::corruption(format!(
        "{}: claims that backup {} replaces backup {id}, which does not match it (start {} on timeline {}, system {}); nothing removed",
        stored::what(repo, &format!("{}/{MERGE_FILE}", m.key()?)),
        m.id,
        b.start_lsn,
        b.timeline,
        b.system_id
    )))
}

/// Finishes interrupted merges of `instance` (the caller holds the lifecycle lock): removes
/// abandoned merged FULLs and what committed ones replace. Returns the names removed.
pub(crate) fn finish_pending(catalog: &Catalog, instance: &str) -> Result<Vec<String>> {
    crate::catalog::check_instance_name(instance)?;
    let repo = catalog.repo();
    let names = repo.list(&Catalog::backups_key(instance))?.prefixes;
    let mut removed = Vec::new();
    let mut replaced: Vec<(String, String)> = Vec::new();
    for name in &names {
        if safepath::check_name(name, "backup directory").is_err() {
            continue;
        }
        let key = meta::backup_key(instance, name)?;
        if abandoned_merge(repo, &key)? {
            log::info!("removing {name}, the merged backup of an interrupted merge");
            super::remove_backup_objects(repo, &key)?;
            removed.push(name.clone());
            continue;
        }
        if let Some(r) = committed_record(repo, &key)? {
            let m = meta::load_in(catalog, instance, name)?;
            for id in r.replaces.iter().filter(|i| *i != name) {
                let mut left = Vec::new();
                super::walk(repo, &meta::backup_key(instance, id)?, &mut left)?;
                if !left.is_empty() {
                    check_replaced(catalog, instance, &m, &r, id)?;
                    replaced.push((id.clone(), name.clone()));
                }
            }
        }
    }
    for (id, by) in replaced {
        remove_replaced(catalog, instance, &id, &by)?;
        removed.push(id);
    }
    Ok(removed)
}

// ---- writing the merged FULL ------------------------------------------------------------

/// A stored file of the merged backup being written: CRC-32C of the stored bytes, LZ4
/// frames when compressed (as a FULL backup writes them).
type Out = CrcWriter<BufWriter<Box<dyn ObjectWriter>>>;

/// What [`StoredOut::finish`] returns: (CRC-32C, stored bytes, LZ4 frames, block CRCs).
type Finished = (u32, u64, Option<Lz4Frames>, Option<Vec<u32>>);

struct StoredOut {
    enc: Option<Lz4FrameWriter<Out>>,
    plain: Option<Out>,
    dest: PathBuf,
    size: u64,
    /// The block CRCs of an uncompressed stored file, when the merged backup records them.
    blocks: Option<WholeCrcs>,
}

impl StoredOut {
    /// `crc_block_size`: record the block CRCs (ignored when compressed).
    fn create(
        repo: &dyn Repo,
        key: &str,
        compress: bool,
        crc_block_size: Option<u32>,
    ) -> Result<StoredOut> {
        let w = repo.create(key)?;
        let dest = PathBuf::from(w.describe());
        let cw = CrcWriter::new(BufWriter::with_capacity(1 << 20, w));
        Ok(if compress {
            StoredOut {
                enc: Some(Lz4FrameWriter::new(cw, LZ4_FRAME_BYTES)),
                plain: None,
                dest,
                size: 0,
                blocks: None,
            }
        } else {
            StoredOut {
                enc: None,
                plain: Some(cw),
                dest,
                size: 0,
                blocks: crc_block_size.map(WholeCrcs::new),
            }
        })
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        let r = match (&mut self.enc, &mut self.plain) {
            (Some(e), _) => e.write_all(b),
            (None, Some(p)) => p.write_all(b),
            (None, None) => Err(std::io::Error::other("writer finished")),
        };
        r.ctx("write", &self.dest)?;
        if let Some(w) = &mut self.blocks {
            w.feed(b);
        }
        self.size += b.len() as u64;
        Ok(())
    }

    /// Commits (deferred); returns (crc, stored bytes, frames, block CRCs).
    fn finish(self) -> Result<Finished> {
        let (cw, frames) = match (self.enc, self.plain) {
            (Some(e), _) => {
                let (cw, stored) = e.finish().ctx("compress", &self.dest)?;
                let frames = (stored.len() > 1).then_some(Lz4Frames {
                    frame_bytes: LZ4_FRAME_BYTES,
                    stored,
                });
                (cw, frames)
            }
            (None, Some(p)) => (p, None),
            (None, None) => return Err(Error::invalid("stored file finished twice")),
        };
        let (crc, n) = (cw.crc, cw.n);
        let obj = cw
            .into_inner()
            .into_inner()
            .map_err(|e| Error::io("write", &self.dest, e.into_error()))?;
        obj.commit(Durability::Deferred)?;
        Ok((crc, n, frames, self.blocks.map(WholeCrcs::finish)))
    }
}

/// Bytes a merge thread reads and writes at a time.
const BUF_BYTES: usize = 1 << 20;

thread_local! {
    /// Each merge thread's buffer, reused from file to file (a fresh zeroed megabyte per
    /// file cost more than copying a small file).
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The thread's buffer (taken: a task this thread runs meanwhile gets its own).
fn take_buf() -> Vec<u8> {
    let mut b = BUF.with(|b| b.take());
    if b.len() < BUF_BYTES {
        b.resize(BUF_BYTES, 0);
    }
    b
}

fn give_buf(b: Vec<u8>) {
    BUF.with(|c| *c.borrow_mut() = b);
}

/// Reads stored object `key` front to back in pieces handed to `each` (through this
/// thread's buffer); returns its bytes.
fn read_stored(repo: &dyn Repo, key: &str, each: impl FnMut(&[u8]) -> Result<()>) -> Result<u64> {
    let mut buf = take_buf();
    let r = crate::repo::read_pieces(repo, key, &mut buf, each);
    give_buf(buf);
    r
}

/// How a merge thread takes the block CRCs of a whole uncompressed file it links: the
/// merged backup's block size, and the source backup's own block checksums (checked
/// against its manifest), when it has them.
type CrcSource<'a> = (u32, Option<&'a HashMap<String, FileCrcs>>);

/// Puts the whole stored file `e` of backup `backup` (object `from`) into the merged backup
/// as `to` without rewriting it ([`Repo::link_copy`]: a hard link in a local catalog, so
/// nothing is read or written; a streamed copy elsewhere). A link is checked against the
/// manifest's size only (its CRC-32C is checked by validate and restore, which read it);
/// a copy against size and CRC-32C. With `crcs`, also returns the CRC of each block:
/// from the source's block checksums when they list the file, else read from the stored
/// file (and its CRC-32C checked on the way). Returns (block CRCs, linked).
fn link_stored(
    repo: &dyn Repo,
    from: &str,
    to: &str,
    e: &FileEntry,
    backup: &str,
    crcs: Option<CrcSource<'_>>,
) -> Result<(Option<Vec<u32>>, bool)> {
    let c = repo.link_copy(from, to)?;
    let mismatch = || {
        Error::corruption(format!(
            "{}: stored file does not match its manifest size and checksum (backup {backup})",
            stored::what(repo, from)
        ))
    };
    if c.size != e.stored_size || c.crc32c.is_some_and(|k| k != e.crc32c) {
        return Err(mismatch());
    }
    let Some((bs, known)) = crcs else {
        return Ok((None, c.linked));
    };
    if let Some(FileCrcs::Whole(v)) = known.and_then(|m| m.get(&e.path)) {
        return Ok((Some(v.clone()), c.linked));
    }
    let mut blocks = WholeCrcs::new(bs);
    let mut crc = 0u32;
    let n = read_stored(repo, to, |b| {
        crc = crc32c::crc32c_append(crc, b);
        blocks.feed(b);
        Ok(())
    })?;
    if n != e.stored_size || crc != e.crc32c {
        return Err(mismatch());
    }
    Ok((Some(blocks.finish()), c.linked))
}

/// The whole stored file that file `plan` rebuilds to, byte for byte, when there is one:
/// every incremental source (the newest backup's and those between) holds no page, none
/// truncates the file below its length (each source's `cap` is at least the length), the
/// oldest source is a whole file of exactly that length, and it is stored as the merged
/// backup stores files (uncompressed, or LZ4 when `compress`). Then each block of the
/// result is that file's block (rebuild.rs: a block comes from the newest source holding
/// it below its cap; no incremental source holds any, the whole one holds all), and no
/// block is a zero page. That is how a PAGE or DELTA backup records a file unchanged
/// since its parent (an incremental file of no pages, its length, no limit block).
fn unchanged_whole(plan: &rebuild::Plan, compress: bool) -> Option<&rebuild::Source> {
    let rebuild::Shape::Blocks(n) = plan.shape else {
        return None;
    };
    let (whole, incs) = plan.sources.split_last()?;
    if incs.is_empty() {
        return None;
    }
    for s in incs {
        match &s.stored {
            rebuild::Stored::Inc { info, .. } if info.nblocks == 0 && s.cap >= n => {}
            _ => return None,
        }
    }
    let stored_as_merged = match whole.stored {
        rebuild::Stored::Plain => !compress && whole.stored_size == whole.size,
        rebuild::Stored::Lz4 { .. } => compress,
        rebuild::Stored::Inc { .. } => false,
    };
    (stored_as_merged && whole.cap >= n && whole.size == n as u64 * plan.block_size as u64)
        .then_some(whole)
}

/// Adds the block CRCs of the merged backup's whole file `path` to its block checksums
/// object (shared by the merge threads; records in any order).
fn add_block_crcs(out: &std::sync::Mutex<BlockCrcOut>, path: &str, crcs: &[u32]) -> Result<()> {
    let mut w = out
        .lock()
        .map_err(|_| Error::invalid("a merge thread panicked"))?;
    w.add_whole(path, crcs)
        .map_err(|e| Error::invalid(format!("writing the block checksums of \"{path}\": {e}")))
}

/// Zeros for the zero pages of a rebuilt file (pages no source supplies).
static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];

/// Where [`InOrder`] puts the rebuilt bytes.
trait ByteOut {
    fn push(&mut self, data: &[u8]) -> Result<()>;
}

/// Straight into the stored file (its CRC-32C and, when compressed, its LZ4 frames
/// computed on the way).
impl ByteOut for &mut StoredOut {
    fn push(&mut self, data: &[u8]) -> Result<()> {
        self.write(data)
    }
}

/// The merged backup's stored file as a [`rebuild::Sink`]: the rebuilt file arrives block
/// after block, in order, and goes to `out`. Anything out of order is an error.
struct InOrder<'a, O> {
    out: O,
    block_size: u64,
    /// Bytes of the result written so far.
    next: u64,
    path: &'a str,
}

impl<O> InOrder<'_, O> {
    fn at(&self, off: u64) -> Result<()> {
        if off != self.next {
            return Err(Error::invalid(format!(
                "\"{}\": rebuilt out of order (byte {off}, expected {})",
                self.path, self.next
            )));
        }
        Ok(())
    }
}

impl<O: ByteOut> rebuild::Sink for InOrder<'_, O> {
    fn put(&mut self, data: &[u8], off: u64) -> Result<()> {
        self.at(off)?;
        self.out.push(data)?;
        self.next += data.len() as u64;
        Ok(())
    }

    fn zeros(&mut self, first: u32, n: u32) -> Result<()> {
        self.at(first as u64 * self.block_size)?;
        let mut left = n as u64 * self.block_size;
        while left > 0 {
            let k = left.min(ZEROS.len() as u64) as usize;
            self.out.push(&ZEROS[..k])?;
            left -= k as u64;
        }
        self.next += n as u64 * self.block_size;
        Ok(())
    }
}

/// Files of at least this many bytes are written by a thread of their own while the merge
/// thread rebuilds them (a large file is the merge's longest task: reading and rebuilding
/// overlap with writing).
const PIPE_MIN_BYTES: u64 = 8 << 20;
/// Bytes per hand-over to the writer thread, and hand-overs in flight at most.
const PIPE_BUF_BYTES: usize = 1 << 20;
const PIPE_DEPTH: usize = 4;

/// The merged backup's stored file written by another thread: the rebuilt bytes are
/// gathered in buffers of [`PIPE_BUF_BYTES`] handed over in order, at most [`PIPE_DEPTH`]
/// of them at a time (so at most a few MiB of the file in memory).
struct Pipe<'a> {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    /// Buffers the writer is done with.
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    allocated: usize,
    cur: Vec<u8>,
    path: &'a str,
}

impl Pipe<'_> {
    fn stopped(&self) -> Error {
        Error::invalid(format!("\"{}\": the writer thread stopped", self.path))
    }

    /// Hands the current buffer over and takes an empty one.
    fn hand_over(&mut self) -> Result<()> {
        let tx = self.tx.as_ref().ok_or_else(|| self.stopped())?;
        let fresh = match self.free.try_recv() {
            Ok(b) => b,
            Err(_) if self.allocated < PIPE_DEPTH + 1 => {
                self.allocated += 1;
                Vec::with_capacity(PIPE_BUF_BYTES)
            }
            Err(_) => self.free.recv().map_err(|_| self.stopped())?,
        };
        let full = std::mem::replace(&mut self.cur, fresh);
        self.cur.clear();
        tx.send(full).map_err(|_| self.stopped())
    }

    /// Hands over the last bytes and lets the writer finish.
    fn close(&mut self) -> Result<()> {
        if !self.cur.is_empty() {
            self.hand_over()?;
        }
        self.tx = None;
        Ok(())
    }
}

impl ByteOut for Pipe<'_> {
    fn push(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let room = PIPE_BUF_BYTES - self.cur.len();
            let k = room.min(data.len());
            self.cur.extend_from_slice(&data[..k]);
            data = &data[k..];
            if self.cur.len() == PIPE_BUF_BYTES {
                self.hand_over()?;
            }
        }
        Ok(())
    }
}

/// Rebuilds `plan` into `out` with a writer thread (see [`Pipe`]); returns the parts
/// and the bytes rebuilt. The writer's error, when it has one, is the one reported.
fn rebuild_piped(
    plan: &rebuild::Plan,
    out: &mut StoredOut,
    path: &str,
) -> Result<(Vec<Vec<rebuild::Part>>, u64)> {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(PIPE_DEPTH);
        let (ftx, frx) = std::sync::mpsc::channel::<Vec<u8>>();
        let writer = s.spawn(move || -> Result<()> {
            for b in rx {
                out.write(&b)?;
                let _ = ftx.send(b);
            }
            Ok(())
        });
        let mut sink = InOrder {
            out: Pipe {
                tx: Some(tx),
                free: frx,
                allocated: 0,
                cur: Vec::with_capacity(PIPE_BUF_BYTES),
                path,
            },
            block_size: plan.block_size as u64,
            next: 0,
            path,
        };
        let built = rebuild::run_all_to(plan, &mut sink, &crate::progress::NoProgress, true)
            .and_then(|parts| sink.out.close().map(|()| parts));
        let next = sink.next;
        drop(sink);
        let wrote = writer
            .join()
            .map_err(|_| Error::invalid(format!("\"{path}\": the writer thread panicked")))?;
        wrote?;
        Ok((built?, next))
    })
}

/// Rebuilds file `e` of the chain (as restore does) and stores it whole in the merged
/// backup. The rebuilt blocks stream straight into the stored file, chunk after chunk (at
/// most a few windows of the file in memory, nothing read back); a large file is written
/// by a thread of its own meanwhile ([`rebuild_piped`]). The stored file is committed
/// only after every source passed its checks (length, CRC-32C, an incremental file's
/// trailer), else it is left uncommitted and the merge fails.
fn rebuild_stored(
    repo: &dyn Repo,
    plan: rebuild::Plan,
    e: &FileEntry,
    mkey: &str,
    compress: bool,
    crcs_out: Option<&std::sync::Mutex<BlockCrcOut>>,
) -> Result<FileEntry> {
    let rebuild::Shape::Blocks(nblocks) = plan.shape else {
        return Err(Error::invalid(format!(
            "\"{}\": an incremental file rebuilt as a copy",
            e.path
        )));
    };
    let bs = plan.block_size as u64;
    let size = nblocks as u64 * bs;
    let storage = if compress {
        Storage::FullLz4
    } else {
        Storage::Full
    };
    let mut out = StoredOut::create(
        repo,
        &format!("{mkey}/{}", manifest::stored_path(&e.path, storage)),
        compress,
        crcs_out.map(|_| plan.block_size),
    )?;
    let dest = out.dest.clone();
    let (parts, written) = if size >= PIPE_MIN_BYTES {
        rebuild_piped(&plan, &mut out, &e.path)?
    } else {
        let mut sink = InOrder {
            out: &mut out,
            block_size: bs,
            next: 0,
            path: &e.path,
        };
        let parts = rebuild::run_all_to(&plan, &mut sink, &crate::progress::NoProgress, true)?;
        (parts, sink.next)
    };
    rebuild::verify(&plan, &parts, &dest)?;
    if written != size || out.size != size {
        return Err(Error::invalid(format!(
            "\"{}\": rebuilt {written} bytes of {size}",
            e.path
        )));
    }
    let (crc, stored_size, frames, blocks) = out.finish()?;
    if let (Some(o), Some(b)) = (crcs_out, blocks) {
        add_block_crcs(o, &e.path, &b)?;
    }
    Ok(FileEntry {
        path: e.path.clone(),
        storage,
        size,
        stored_size,
        crc32c: crc,
        changed_blocks: None,
        file_blocks: None,
        limit_block: None,
        lz4_frames: frames,
    })
}

/// Reads an object of a backup that the manifest does not cover; `None` when absent.
fn read_optional(repo: &dyn Repo, key: &str) -> Result<Option<Vec<u8>>> {
    match repo.get(key) {
        Ok(b) => Ok(Some(b.into_vec())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn put_deferred(repo: &dyn Repo, key: &str, data: &[u8]) -> Result<()> {
    let mut w = repo.create(key)?;
    let what = w.describe();
    w.write_all(data).ctx("write", Path::new(&what))?;
    w.commit(Durability::Deferred)
}

/// What [`write_merged`] stored: files and bytes, and of them those linked unchanged.
struct Written {
    files: u64,
    bytes: u64,
    linked: u64,
    linked_bytes: u64,
}

/// Writes the merged FULL of `plan` and switches to it (steps 1-3 of the module docs);
/// returns its metadata, files and stored bytes.
fn write_merged(
    catalog: &Catalog,
    instance: &str,
    list: &[BackupMeta],
    plan: &MergePlan,
    pin: &Pin,
    now: i64,
    jobs: usize,
) -> Result<(BackupMeta, Written)> {
    let repo = catalog.repo();
    let chain: Vec<&BackupMeta> = plan
        .chain
        .iter()
        .map(|id| meta::find(list, id))
        .collect::<Result<_>>()?;
    let x = chain[0];
    let entries = crate::restore::plan::read_manifest(catalog, x)?;
    let mut older = Vec::new();
    for b in chain.iter().skip(1) {
        let mut m = HashMap::new();
        for e in crate::restore::plan::read_manifest(catalog, b)? {
            if e.storage != Storage::Dir {
                m.insert(e.path.clone(), e);
            }
        }
        older.push(m);
    }
    if !entries.iter().any(|e| e.path == "global/pg_control") {
        return Err(Error::corruption(format!(
            "backup {} has no global/pg_control",
            x.id
        )));
    }
    let xkey = x.key()?;
    let label = read_optional(repo, &format!("{xkey}/backup_label"))?.ok_or_else(|| {
        Error::corruption(format!(
            "backup {} has no backup_label ({})",
            x.id,
            stored::what(repo, &format!("{xkey}/backup_label"))
        ))
    })?;
    let spcmap = read_optional(repo, &format!("{xkey}/tablespace_map"))?;
    let compress = x.compress == "lz4";

    let mut m = x.clone();
    m.mode = Mode::Full;
    m.parent_id = None;
    m.parent_start_lsn = None;
    // set below once its own block checksums object is written (uncompressed only)
    m.block_crcs = None;
    m.status = Status::Running;
    m.pid = Some(std::process::id());
    m.error = Some(format!("{MERGE_MARK}{}", x.id));
    m.files = 0;
    m.data_bytes = 0;
    let started = meta::start(catalog, &mut m, now)?;
    let mkey = m.key()?;
    log::info!(
        "merging backup {} with {} into new FULL backup {}",
        x.id,
        plan.chain[1..].join(", "),
        m.id
    );

    // the block checksums of every backup of the chain that has them (uncompressed merged
    // FULL only): a file linked unchanged takes its blocks' CRCs from there instead of
    // being read. One that cannot be read is not used (a warning; the files are read).
    let mut src_crcs: Vec<Option<HashMap<String, FileCrcs>>> = vec![None; chain.len()];
    if !compress {
        for (i, b) in chain.iter().enumerate() {
            if b.block_crcs.is_none() || b.block_size != m.block_size {
                continue;
            }
            let es: Vec<&FileEntry> = if i == 0 {
                entries.iter().collect()
            } else {
                older[i - 1].values().collect()
            };
            match stored::block_crcs(repo, b, &es) {
                Ok(c) => src_crcs[i] = c,
                Err(e) => log::warn!(
                    "backup {}: its block checksums are not used (the files merged from it are read instead): {e}",
                    b.id
                ),
            }
        }
    }
    let crcs_of = |id: &str| -> Option<&HashMap<String, FileCrcs>> {
        let i = plan.chain.iter().position(|c| c == id)?;
        src_crcs.get(i)?.as_ref()
    };
    let block_size = m.block_size;
    let linked = std::sync::atomic::AtomicU64::new(0);
    let linked_bytes = std::sync::atomic::AtomicU64::new(0);
    let count_link = |was: bool, e: &FileEntry| {
        if was {
            linked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            linked_bytes.fetch_add(e.stored_size, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let files = ChainFiles::new(catalog, chain.clone(), older);
    // the block checksums of an uncompressed merged FULL (format/blockcrc.rs), computed as
    // its files stream out and committed before backup.json, as a backup writes them; a
    // compressed one has none (as a compressed backup)
    let crcs_out: Option<std::sync::Mutex<BlockCrcOut>> = if compress {
        None
    } else {
        let w = repo.create(&format!("{mkey}/{}", blockcrc::FILE_NAME))?;
        let p = PathBuf::from(w.describe());
        Some(std::sync::Mutex::new(
            blockcrc::Writer::new(BufWriter::new(w), m.block_size).ctx("write", &p)?,
        ))
    };
    let crcs_ref = crcs_out.as_ref();
    let mw_obj = repo.create(&format!("{mkey}/{}", manifest::FILE_NAME))?;
    let mpath = PathBuf::from(mw_obj.describe());
    let frames_possible = compress || entries.iter().any(|e| e.lz4_frames.is_some());
    let mut mw =
        ManifestWriter::new(BufWriter::new(mw_obj), frames_possible).ctx("write", &mpath)?;
    let (mut nfiles, mut bytes) = (0u64, 0u64);
    let one = |e: &FileEntry| -> Result<FileEntry> {
        Ok(match e.storage {
            Storage::Dir => e.clone(),
            Storage::Full | Storage::FullLz4 => {
                // stored whole by the newest backup: linked as it is stored
                let rel = e.stored_path();
                // a whole uncompressed file's block CRCs (an LZ4 file of an uncompressed
                // backup, should there be one, is left out: restore reads it all)
                let want = crcs_ref.is_some() && e.storage == Storage::Full;
                let (blocks, was) = link_stored(
                    repo,
                    &format!("{xkey}/{rel}"),
                    &format!("{mkey}/{rel}"),
                    e,
                    &x.id,
                    want.then(|| (block_size, crcs_of(&x.id))),
                )
                .map_err(|err| err.context(format!("merging \"{}\"", e.path)))?;
                count_link(was, e);
                if let (Some(o), Some(b)) = (crcs_ref, blocks) {
                    add_block_crcs(o, &e.path, &b)?;
                }
                e.clone()
            }
            Storage::Incremental => {
                let merging = |err: Error| err.context(format!("merging \"{}\"", e.path));
                let plan = files.plan(e).map_err(merging)?;
                match unchanged_whole(&plan, compress) {
                    // unchanged since an older backup stored it whole: linked from there
                    Some(src) => {
                        let (storage, lz4_frames) = match &src.stored {
                            rebuild::Stored::Lz4 { frames } => (Storage::FullLz4, frames.clone()),
                            _ => (Storage::Full, None),
                        };
                        let out = FileEntry {
                            path: e.path.clone(),
                            storage,
                            size: src.size,
                            stored_size: src.stored_size,
                            crc32c: src.crc32c,
                            changed_blocks: None,
                            file_blocks: None,
                            limit_block: None,
                            lz4_frames,
                        };
                        let want = crcs_ref.is_some() && storage == Storage::Full;
                        let (blocks, was) = link_stored(
                            repo,
                            &src.key,
                            &format!("{mkey}/{}", out.stored_path()),
                            &out,
                            &src.backup,
                            want.then(|| (block_size, crcs_of(&src.backup))),
                        )
                        .map_err(merging)?;
                        count_link(was, &out);
                        if let (Some(o), Some(b)) = (crcs_ref, blocks) {
                            add_block_crcs(o, &e.path, &b)?;
                        }
                        out
                    }
                    None => {
                        rebuild_stored(repo, plan, e, &mkey, compress, crcs_ref).map_err(merging)?
                    }
                }
            }
        })
    };
    // files on `jobs` threads; the manifest lists them in the merged backup's order
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.max(1))
        .build()
        .map_err(|e| Error::invalid(format!("cannot start {jobs} merge threads: {e}")))?;
    let outs: Vec<FileEntry> = pool.install(|| {
        use rayon::prelude::*;
        entries.par_iter().map(one).collect::<Result<Vec<_>>>()
    })?;
    for out in outs {
        if out.storage != Storage::Dir {
            nfiles += 1;
            bytes += out.stored_size;
        }
        mw.add(&out).ctx("write", &mpath)?;
    }
    put_deferred(repo, &format!("{mkey}/backup_label"), &label)?;
    if let Some(map) = &spcmap {
        put_deferred(repo, &format!("{mkey}/tablespace_map"), map)?;
    }
    if pin.expire_epoch.is_some() || pin.note.is_some() {
        // the caller holds the lifecycle lock (merge, or delete --merge-expired)
        records::set_pin_locked(
            catalog,
            instance,
            &m.id,
            &PinChange {
                expire: Some(pin.expire_epoch),
                note: pin.note.clone(),
            },
        )?;
    }
    let rec = MergeRecord {
        format: MERGE_FORMAT,
        target: x.id.clone(),
        replaces: plan.replaces.clone(),
        chain: plan.chain.clone(),
        time: meta::format_utc(records::now_secs()),
    };
    let mut json = serde_json::to_vec_pretty(&rec)?;
    json.push(b'\n');
    put_deferred(repo, &format!("{mkey}/{MERGE_FILE}"), &json)?;
    if let Some(w) = crcs_out {
        m.block_crcs = Some(crate::backup::copy::finish_block_crcs(w, &m.id)?);
    }
    let mw_out = mw.finish().ctx("write", &mpath)?;
    mw_out
        .into_inner()
        .map_err(|e| Error::io("write", &mpath, e.into_error()))?
        .commit(Durability::Deferred)?;
    repo.barrier()?;

    // the switch
    m.status = Status::Ok;
    m.pid = None;
    m.error = None;
    m.files = nfiles;
    m.data_bytes = bytes;
    meta::save_complete(catalog, &m)?;
    drop(started);
    let written = Written {
        files: nfiles,
        bytes,
        linked: linked.into_inner(),
        linked_bytes: linked_bytes.into_inner(),
    };
    log::info!(
        "merged backup {} committed: {} files, {} linked unchanged ({} of {} bytes)",
        m.id,
        written.files,
        written.linked,
        written.linked_bytes,
        written.bytes
    );
    Ok((m, written))
}

/// Merges with the lifecycle lock held: finishes interrupted merges, then merges `id`.
pub(crate) fn merge_locked(
    catalog: &Catalog,
    instance: &str,
    id: &str,
    now: i64,
    jobs: usize,
) -> Result<MergeReport> {
    let t0 = Instant::now();
    let mut removed = finish_pending(catalog, instance)?;
    let list = meta::list(catalog, instance)?;
    if meta::find(&list, id).is_err() {
        // merged already (an interrupted merge, finished above)?
        for b in list.iter().filter(|b| b.mode == Mode::Full) {
            if let Some(r) = committed_record(catalog.repo(), &b.key()?)? {
                if r.target == id {
                    return Ok(MergeReport {
                        instance: instance.to_string(),
                        plan: MergePlan {
                            target: r.target,
                            chain: r.chain,
                            replaces: r.replaces,
                            kept: Vec::new(),
                        },
                        merged_id: Some(b.id.clone()),
                        files: b.files,
                        bytes_written: b.data_bytes,
                        linked_files: 0,
                        linked_bytes: 0,
                        seconds: t0.elapsed().as_secs_f64(),
                        write_seconds: 0.0,
                        removed,
                        already_merged: true,
                    });
                }
            }
        }
    }
    let mut pins = HashMap::new();
    for b in &list {
        pins.insert(b.id.clone(), records::load_pin(catalog, instance, &b.id)?);
    }
    let plan = plan_merge(&list, &pins, id, now)?;
    // Refused at once while a restore (or a backup on it as a parent) uses a backup the
    // merge replaces. The check's locks are let go: removal takes them again and, should
    // a restore begin meanwhile, is refused then (the merged FULL is committed by then,
    // the replaced backups stay until a later merge or delete removes them).
    for r in &plan.replaces {
        if let Ok(b) = meta::find(&list, r) {
            drop(super::locks::remove(catalog, b, "merge")?);
        }
    }
    let pin = pins.get(id).cloned().unwrap_or_default();
    let tw = Instant::now();
    let (m, w) = write_merged(catalog, instance, &list, &plan, &pin, now, jobs)?;
    let write_seconds = tw.elapsed().as_secs_f64();
    for r in &plan.replaces {
        remove_replaced(catalog, instance, r, &m.id)?;
        removed.push(r.clone());
    }
    Ok(MergeReport {
        instance: instance.to_string(),
        plan,
        merged_id: Some(m.id),
        files: w.files,
        bytes_written: w.bytes,
        linked_files: w.linked,
        linked_bytes: w.linked_bytes,
        seconds: t0.elapsed().as_secs_f64(),
        write_seconds,
        removed,
        already_merged: false,
    })
}

/// `walnut merge -i ID` (see the module docs).
pub fn merge(catalog: &Catalog, instance: &str, opts: &MergeOptions) -> Result<MergeReport> {
    catalog.instance(instance)?;
    let killable = super::crashpoint::catalog(catalog);
    let catalog = killable.as_ref().unwrap_or(catalog);
    let _lock = super::lifecycle_lock(catalog, instance)?;
    merge_locked(catalog, instance, &opts.id, opts.now, opts.jobs)
}

/// For `delete --expired --merge-expired`: every kept incremental whose parent the policy
/// expired (kept only as an ancestor) is merged with its chain, oldest first; the
/// decisions of the backups each merge replaces become "merged into ...". With `dry_run`
/// nothing is written and the reports have no merged id. The caller holds the lifecycle
/// lock.
pub(crate) fn merge_expired(
    catalog: &Catalog,
    instance: &str,
    list: &[BackupMeta],
    decisions: &mut [super::policy::Decision],
    pins: &HashMap<String, Pin>,
    now: i64,
    dry_run: bool,
) -> Result<Vec<MergeReport>> {
    let ancestor_only =
        |d: &super::policy::Decision| d.keep && d.reason.starts_with("ancestor of kept");
    let targets: Vec<String> = list
        .iter()
        .filter(|b| b.mode != Mode::Full)
        .filter(|b| {
            decisions
                .iter()
                .any(|d| d.id == b.id && d.keep && !ancestor_only(d))
        })
        .filter(|b| {
            b.parent_id
                .as_deref()
                .is_some_and(|p| decisions.iter().any(|d| d.id == p && ancestor_only(d)))
        })
        .map(|b| b.id.clone())
        .collect();
    let mut out = Vec::new();
    for t in targets {
        let report = if dry_run {
            let plan = plan_merge(list, pins, &t, now)?;
            MergeReport {
                instance: instance.to_string(),
                plan,
                merged_id: None,
                files: 0,
                bytes_written: 0,
                linked_files: 0,
                linked_bytes: 0,
                seconds: 0.0,
                write_seconds: 0.0,
                removed: Vec::new(),
                already_merged: false,
            }
        } else {
            // (the catalog of `delete`: with a kill armed, its crash points already)
            merge_locked(catalog, instance, &t, now, DEFAULT_JOBS)?
        };
        for d in decisions.iter_mut() {
            if report.plan.replaces.contains(&d.id) && d.id != t && ancestor_only(d) {
                d.keep = false;
                d.reason = format!("expired; merged into {t}");
            }
            if d.id == t {
                d.reason = format!(
                    "{}; merged with its expired ancestors into a new FULL{}",
                    d.reason,
                    report
                        .merged_id
                        .as_deref()
                        .map(|m| format!(" {m}"))
                        .unwrap_or_default()
                );
            }
        }
        out.push(report);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::meta::test_meta;

    fn ok(id: &str, mode: Mode, parent: Option<&str>, lsn: u64) -> BackupMeta {
        BackupMeta {
            start_lsn: crate::types::Lsn(lsn),
            ..test_meta(id, mode, parent)
        }
    }

    #[test]
    fn plan_replaces_the_chain_but_keeps_shared_and_pinned_ancestors() {
        let list = vec![
            ok("F", Mode::Full, None, 1),
            ok("P1", Mode::Page, Some("F"), 2),
            ok("P2", Mode::Page, Some("P1"), 3),
            ok("P3", Mode::Page, Some("P2"), 4),
            ok("C", Mode::Page, Some("P3"), 5),
        ];
        let pins = HashMap::new();
        let p = plan_merge(&list, &pins, "P3", 0).unwrap();
        assert_eq!(p.chain, ["P3", "P2", "P1", "F"]);
        assert_eq!(p.replaces, ["P3", "P2", "P1", "F"]);
        // a sibling branch on P1 keeps P1 and F
        let mut l2 = list.clone();
        l2.push(ok("S", Mode::Delta, Some("P1"), 6));
        let p = plan_merge(&l2, &pins, "P3", 0).unwrap();
        assert_eq!(p.replaces, ["P3", "P2"]);
        assert_eq!(p.kept[0].0, "P1");
        assert!(p.kept[0].1.contains('S'), "{:?}", p.kept);
        // a pinned ancestor stays, and so does everything below it
        let mut pins = HashMap::new();
        pins.insert(
            "P2".to_string(),
            Pin {
                expire_epoch: Some(100),
                ..Pin::default()
            },
        );
        let p = plan_merge(&list, &pins, "P3", 10).unwrap();
        assert_eq!(p.replaces, ["P3"]);
        assert_eq!(p.kept.len(), 3);
        // refusals
        let e = plan_merge(&list, &HashMap::new(), "F", 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let mut l3 = list.clone();
        l3[1].status = Status::Error;
        let e = plan_merge(&l3, &HashMap::new(), "P3", 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
        let mut l4 = list.clone();
        l4[4].status = Status::Running;
        let e = plan_merge(&l4, &HashMap::new(), "P3", 0).unwrap_err();
        assert!(e.to_string().contains("RUNNING"), "{e}");
    }

    /// A file is linked only when its rebuilt bytes are provably those of the whole stored
    /// file: no page from a newer backup, no truncation, the same length, stored as the
    /// merged backup stores files.
    #[test]
    fn only_a_file_no_newer_backup_changed_is_linked() {
        use crate::format::incfile::IncInfo;
        use rebuild::{Plan, Shape, Source, Stored};
        const BS: u64 = 8192;
        let repo: std::sync::Arc<dyn Repo> = std::sync::Arc::new(crate::repo::MemRepo::new());
        let inc = |nblocks: u32, file_blocks: u32, limit: Option<u32>| Source {
            repo: repo.clone(),
            key: "k/inc".into(),
            backup: "P".into(),
            stored: Stored::Inc {
                info: IncInfo {
                    nblocks,
                    file_blocks,
                    limit_block: limit,
                },
                whole_pages: true,
            },
            size: file_blocks as u64 * BS,
            stored_size: 32,
            crc32c: 0,
            cap: u32::MAX,
        };
        let whole = |stored: Stored, blocks: u64| Source {
            repo: repo.clone(),
            key: "k/full".into(),
            backup: "F".into(),
            stored,
            size: blocks * BS,
            stored_size: blocks * BS,
            crc32c: 7,
            cap: u32::MAX,
        };
        // the plan restore makes: caps as Restorer::plan sets them
        let plan = |n: u32, incs: Vec<Source>, w: Option<Source>| {
            let mut cap = n;
            let mut srcs = Vec::new();
            for (i, mut s) in incs.into_iter().enumerate() {
                let Stored::Inc { info, .. } = s.stored else {
                    unreachable!()
                };
                s.cap = if i == 0 { n } else { cap };
                cap = cap
                    .min(info.file_blocks)
                    .min(info.limit_block.unwrap_or(u32::MAX));
                srcs.push(s);
            }
            if let Some(mut w) = w {
                w.cap = cap;
                srcs.push(w);
            }
            Plan::new(Shape::Blocks(n), srcs, BS as u32, 4096, 128)
        };
        let p = plan(
            10,
            vec![inc(0, 10, None), inc(0, 10, None)],
            Some(whole(Stored::Plain, 10)),
        );
        assert_eq!(
            unchanged_whole(&p, false).map(|s| s.key.as_str()),
            Some("k/full")
        );
        // stored compressed: linked into a compressed merged FULL only
        assert!(unchanged_whole(&p, true).is_none());
        let lz = whole(Stored::Lz4 { frames: None }, 10);
        let p = plan(10, vec![inc(0, 10, None)], Some(lz));
        assert!(unchanged_whole(&p, true).is_some());
        assert!(unchanged_whole(&p, false).is_none());
        // a page from a newer backup, a truncation, another length, no whole file
        for p in [
            plan(
                10,
                vec![inc(0, 10, None), inc(1, 10, None)],
                Some(whole(Stored::Plain, 10)),
            ),
            plan(
                10,
                vec![inc(0, 10, Some(4))],
                Some(whole(Stored::Plain, 10)),
            ),
            plan(
                10,
                vec![inc(0, 10, None), inc(0, 8, None)],
                Some(whole(Stored::Plain, 10)),
            ),
            plan(10, vec![inc(0, 10, None)], Some(whole(Stored::Plain, 12))),
            plan(12, vec![inc(0, 12, None)], Some(whole(Stored::Plain, 10))),
            plan(10, vec![inc(0, 10, None)], None),
        ] {
            assert!(unchanged_whole(&p, false).is_none(), "{:?}", p.sources);
        }
    }

    /// A linked file's block CRCs come from its backup's block checksums when they list it,
    /// else from reading it (its CRC-32C checked then); a copy (a store without links) is
    /// checked against the manifest's CRC-32C.
    #[test]
    fn linked_file_block_crcs_and_checks() {
        let repo = crate::repo::MemRepo::new();
        let data: Vec<u8> = (0..3 * 8192 + 100).map(|i| (i % 253) as u8).collect();
        repo.put_new("b/F/database/x", &data).unwrap();
        let e = FileEntry {
            path: "x".into(),
            storage: Storage::Full,
            size: data.len() as u64,
            stored_size: data.len() as u64,
            crc32c: crc32c::crc32c(&data),
            changed_blocks: None,
            file_blocks: None,
            limit_block: None,
            lz4_frames: None,
        };
        let mut want = WholeCrcs::new(8192);
        want.feed(&data);
        let want = want.finish();
        let (got, linked) = link_stored(
            &repo,
            "b/F/database/x",
            "b/M/database/x",
            &e,
            "F",
            Some((8192, None)),
        )
        .unwrap();
        assert_eq!(got.as_deref(), Some(&want[..]));
        assert!(!linked, "a memory store copies");
        assert_eq!(&*repo.get("b/M/database/x").unwrap(), &data[..]);
        let known: HashMap<String, FileCrcs> =
            [("x".to_string(), FileCrcs::Whole(vec![1, 2, 3, 4]))].into();
        let (got, _) = link_stored(
            &repo,
            "b/F/database/x",
            "b/M2/database/x",
            &e,
            "F",
            Some((8192, Some(&known))),
        )
        .unwrap();
        assert_eq!(got, Some(vec![1, 2, 3, 4]));
        let bad = FileEntry {
            crc32c: e.crc32c ^ 1,
            ..e.clone()
        };
        let err =
            link_stored(&repo, "b/F/database/x", "b/M3/database/x", &bad, "F", None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corruption, "{err}");
        // a local store links: nothing read, the size checked
        let d = tempfile::tempdir().unwrap();
        let local = crate::repo::LocalRepo::open(d.path()).unwrap();
        local.put_new("b/F/database/x", &data).unwrap();
        let (got, linked) = link_stored(
            &local,
            "b/F/database/x",
            "b/M/database/x",
            &e,
            "F",
            Some((8192, None)),
        )
        .unwrap();
        assert!(linked);
        assert_eq!(got.as_deref(), Some(&want[..]));
        let short = FileEntry {
            stored_size: 5,
            ..e.clone()
        };
        let err = link_stored(
            &local,
            "b/F/database/x",
            "b/M2/database/x",
            &short,
            "F",
            None,
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corruption, "{err}");
    }

    fn put_backup(repo: &crate::repo::MemRepo, m: &BackupMeta) {
        let key = m.key().unwrap();
        repo.put_new(&format!("{key}/{STARTED_FILE}"), &meta::encode(m).unwrap())
            .unwrap();
        repo.put_new(&format!("{key}/{META_FILE}"), &meta::encode(m).unwrap())
            .unwrap();
    }

    /// A committed merge hides what it replaces and re-parents the target's children; an
    /// uncommitted one (no backup.json) changes nothing.
    #[test]
    fn listing_applies_committed_merges_only() {
        let repo = std::sync::Arc::new(crate::repo::MemRepo::new());
        let catalog = Catalog::with_repo(Path::new("/mem"), repo.clone());
        for m in [
            ok("F", Mode::Full, None, 1),
            ok("P1", Mode::Page, Some("F"), 2),
            ok("C", Mode::Page, Some("P1"), 5),
        ] {
            put_backup(&repo, &m);
        }
        let m = ok("M", Mode::Full, None, 2);
        let key = m.key().unwrap();
        repo.put_new(&format!("{key}/{STARTED_FILE}"), &meta::encode(&m).unwrap())
            .unwrap();
        let rec = MergeRecord {
            format: MERGE_FORMAT,
            target: "P1".into(),
            replaces: vec!["P1".into(), "F".into()],
            chain: vec!["P1".into(), "F".into()],
            time: String::new(),
        };
        repo.put_new(
            &format!("{key}/{MERGE_FILE}"),
            &serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
        let ids = |c: &Catalog| {
            meta::list(c, "db")
                .unwrap()
                .into_iter()
                .map(|b| (b.id, b.parent_id))
                .collect::<Vec<_>>()
        };
        // not committed: M is an ERROR leftover, the chain as it was
        let l = ids(&catalog);
        assert!(l.contains(&("P1".into(), Some("F".into()))), "{l:?}");
        assert!(l.contains(&("C".into(), Some("P1".into()))), "{l:?}");
        repo.put_new(&format!("{key}/{META_FILE}"), &meta::encode(&m).unwrap())
            .unwrap();
        let l = ids(&catalog);
        assert_eq!(
            l,
            vec![
                ("M".to_string(), None),
                ("C".to_string(), Some("M".to_string()))
            ]
        );
        // restore's chain of the child ends in the merged FULL
        let list = meta::list(&catalog, "db").unwrap();
        let c: Vec<&str> = meta::chain(&list, "C")
            .unwrap()
            .iter()
            .map(|b| b.id.as_str())
            .collect();
        assert_eq!(c, ["C", "M"]);
        // finishing removes the replaced backups' objects
        let removed = finish_pending(&catalog, "db").unwrap();
        assert_eq!(removed, ["P1", "F"]);
        for id in ["P1", "F"] {
            let mut left = Vec::new();
            super::super::walk(&*repo, &meta::backup_key("db", id).unwrap(), &mut left).unwrap();
            assert!(left.is_empty(), "{left:?}");
        }
        assert_eq!(ids(&catalog).len(), 2);
    }
}
