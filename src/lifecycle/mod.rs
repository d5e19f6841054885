//! Lifecycle commands: retention settings, `delete` (one backup and its descendants, or
//! what the retention policy expires, and the WAL no kept backup needs) and pins.
//!
//! The rules are in [`policy`] (pure, unit-tested); this module reads the catalog, takes the
//! locks and removes objects through [`crate::repo::Repo::delete`].
//!
//! # Locks
//! See [`locks`]: `delete` holds the instance's lifecycle lock exclusively (two deletes
//! never interleave; none runs during a validate or set-backup) and, for every backup it
//! removes, its `.running` and `.use` locks exclusively before marking it: a backup being
//! taken, restored or used as a parent is refused. The WAL purge takes the WAL lock
//! exclusively and is skipped while a backup runs.
//!
//! # Crash safety: the order of a backup's removal
//! 1. every backup to delete gets an ERROR status record ("being deleted"), newest first,
//!    and all these records are made durable together ([`Repo::sync_objects`]) before
//!    anything is removed; from then on each reads as ERROR, never as a valid backup, and
//!    no restore picks it. Every backup that depends on one of them is marked too, so no
//!    remaining valid backup ever lacks a parent;
//! 2. then, for all of them at once, their data objects, `backup.json` and
//!    `backup.started` (without both the name no longer lists as a backup), removed
//!    several at a time and durable as a whole ([`Repo::delete_batch`]);
//! 3. last their status and pin records.
//!
//! A kill at any point leaves backups that read as ERROR (or a leftover name that is no
//! backup at all); running `delete` again finishes the job (leftovers are removed by any
//! `delete`). WAL objects go per timeline: every index object to purge, durably, before
//! any segment, so a crash leaves no index without its segment; a crash inside the purge
//! may leave holes only among the segments being purged, all outside every kept range.
//!
//! Crash points ([`crashpoint`]): every catalog write and delete of `delete` and `merge`.

pub mod crashpoint;
pub mod locks;
pub mod merge;
pub mod policy;
pub mod records;

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::archive::WalArchive;
use crate::backup::meta::{self, BackupMeta, Found, Status, META_FILE, STARTED_FILE, STATUS_DIR};
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::repo::Repo;

use policy::{Decision, TimelinePurge};
use records::{Pin, Settings, PIN_DIR};

/// What to delete.
#[derive(Clone, Debug)]
pub enum Target {
    /// One backup and its descendants.
    Id(String),
    /// What the retention policy expires.
    Expired,
    /// No backup (only `--delete-wal`).
    None,
}

#[derive(Clone, Debug)]
pub struct DeleteOptions {
    pub target: Target,
    /// Settings for this run, over the stored ones.
    pub settings: Settings,
    pub delete_wal: bool,
    pub dry_run: bool,
    /// "Now" for the window and pins (tests move it).
    pub now: i64,
    /// With [`Target::Expired`]: merge expired ancestors of kept incrementals into them
    /// instead of keeping them (see [`merge::merge_expired`]).
    pub merge_expired: bool,
}

/// What `delete` did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Serialize)]
pub struct DeleteReport {
    pub instance: String,
    pub dry_run: bool,
    pub settings: Settings,
    /// Every backup with its decision, oldest first.
    pub backups: Vec<Decision>,
    /// The backups removed, in the order they went.
    pub deleted: Vec<String>,
    /// Leftovers of an interrupted delete, removed.
    pub leftovers: Vec<String>,
    /// The WAL purged per timeline.
    pub wal: Vec<TimelinePurge>,
    /// Why no WAL was purged although asked, if so.
    pub wal_skipped: Option<String>,
    /// The merges of `--merge-expired`.
    pub merged: Vec<merge::MergeReport>,
}

/// The instance's lifecycle lock, exclusive (no wait): what merge holds, as delete does.
pub(crate) fn lifecycle_lock(catalog: &Catalog, instance: &str) -> Result<crate::repo::RepoLock> {
    locks::lifecycle_exclusive(catalog, instance, "merge")
}

/// Every object key below `prefix`, depth first. A damaged entry is an error.
pub(crate) fn walk(repo: &dyn Repo, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    let l = repo.list(prefix)?;
    if let Some(d) = l.damaged.first() {
        return Err(Error::corruption(format!(
            "{}/{prefix}/{d}: not a regular file or directory (refused)",
            repo.location()
        )));
    }
    for p in l.prefixes {
        walk(repo, &format!("{prefix}/{p}"), out)?;
    }
    out.extend(
        l.objects
            .into_iter()
            .map(|o| format!("{prefix}/{}", o.name)),
    );
    Ok(())
}

/// Removes a backup's objects in the crash-safe order (module docs, steps 2-4).
pub(crate) fn remove_backup_objects(repo: &dyn Repo, key: &str) -> Result<()> {
    remove_backups(repo, &[key.to_string()])
}

/// Removes the objects of the backups at `keys` (each marked "being deleted" durably, or
/// no backup at all any more) in the crash-safe order: every data object, `backup.json`
/// and `backup.started` in one batch, durable before the status and pin records go in a
/// second. Until the records go each backup reads as ERROR (or as no backup), so the order
/// inside the first batch does not matter, and neither does the order of the backups:
/// every backup that depends on one of them is marked too.
pub(crate) fn remove_backups(repo: &dyn Repo, keys: &[String]) -> Result<()> {
    let mut body = Vec::new();
    let mut records = Vec::new();
    for key in keys {
        let mut all = Vec::new();
        walk(repo, key, &mut all)?;
        let rank = |k: &str| {
            let rel = k
                .strip_prefix(key.as_str())
                .unwrap_or(k)
                .trim_start_matches('/');
            if rel == META_FILE {
                1
            } else if rel == STARTED_FILE {
                2
            } else if rel.starts_with(&format!("{STATUS_DIR}/"))
                || rel.starts_with(&format!("{PIN_DIR}/"))
            {
                3
            } else {
                0
            }
        };
        // (one by one, as under a test's crash points: data, backup.json, backup.started)
        all.sort_by_key(|k| rank(k));
        for k in all {
            if rank(&k) == 3 {
                records.push(k);
            } else {
                body.push(k);
            }
        }
    }
    remove_keys(repo, &body)?;
    remove_keys(repo, &records)
}

/// Removes `keys` durably, in batches ([`Repo::delete_batch`]: several at once, durable as
/// a whole); one by one, each a crash point, on a test's store ([`crashpoint`]).
pub fn remove_keys(repo: &dyn Repo, keys: &[String]) -> Result<()> {
    for chunk in keys.chunks(4096) {
        repo.delete_batch(chunk)?;
    }
    Ok(())
}

fn load_pins(
    catalog: &Catalog,
    instance: &str,
    list: &[BackupMeta],
) -> Result<HashMap<String, Pin>> {
    let mut pins = HashMap::new();
    for b in list {
        pins.insert(b.id.clone(), records::load_pin(catalog, instance, &b.id)?);
    }
    Ok(pins)
}

/// The error text of the status record that marks a backup "being deleted" (step 1).
pub const DELETING: &str = "being deleted by walnut delete (run delete again if this stays)";

/// Whether `b` carries the "being deleted" mark of an interrupted delete (or merge).
pub fn being_deleted(b: &BackupMeta) -> bool {
    b.effective_status() == Status::Error
        && b.error.as_deref().is_some_and(|e| e.starts_with(DELETING))
}

fn decision(b: &BackupMeta, keep: bool, reason: &str) -> Decision {
    Decision {
        id: b.id.clone(),
        mode: b.mode.to_string(),
        status: b.effective_status().to_string(),
        timeline: b.timeline,
        start_lsn: b.start_lsn.to_string(),
        keep,
        reason: reason.to_string(),
    }
}

/// Runs `delete` (see the module docs and [`policy`] for the rules).
pub fn delete(catalog: &Catalog, instance: &str, opts: &DeleteOptions) -> Result<DeleteReport> {
    let killable = crashpoint::catalog(catalog);
    let catalog = killable.as_ref().unwrap_or(catalog);
    let settings = records::load_settings(catalog, instance)?.overlay(&opts.settings);
    let _lock = locks::lifecycle_exclusive(catalog, instance, "delete")?;
    let repo = catalog.repo();
    // an interrupted merge is finished first (lifecycle/merge.rs)
    let merge_leftovers = if opts.dry_run {
        Vec::new()
    } else {
        merge::finish_pending(catalog, instance)?
    };
    let mut list = Vec::new();
    let mut leftovers = Vec::new();
    for (name, f) in meta::scan_named(catalog, instance)? {
        match f {
            Found::Backup(m) => list.push(*m),
            Found::Absent => leftovers.push(name),
            Found::Failed(e) => {
                return Err(Error::corruption(format!(
                    "{e}; nothing deleted (a backup whose state cannot be read may be one a kept backup needs)"
                )))
            }
        }
    }
    list.sort_by(|a, b| {
        (a.start_lsn, &a.start_time, &a.id).cmp(&(b.start_lsn, &b.start_time, &b.id))
    });
    // Backups an interrupted delete marked go whatever the policy says now (the mark is a
    // commitment: their removal may have begun), and so do their descendants (unrestorable).
    let marked: Vec<String> = list
        .iter()
        .filter(|b| {
            list.iter()
                .any(|m| being_deleted(m) && (m.id == b.id || meta::descends_from(&list, b, &m.id)))
        })
        .map(|b| b.id.clone())
        .collect();
    let plan_list: Vec<BackupMeta> = list
        .iter()
        .filter(|b| !marked.contains(&b.id))
        .cloned()
        .collect();
    let pins = load_pins(catalog, instance, &list)?;
    let planned: Vec<Decision> = match &opts.target {
        Target::Expired => policy::plan_expired(&plan_list, &pins, &settings, opts.now)?,
        Target::Id(id) => {
            // the leftover of an interrupted delete of `id`: cleaned below, nothing else goes
            let doomed = if (leftovers.contains(id) && meta::find(&list, id).is_err())
                || marked.contains(id)
            {
                Vec::new()
            } else {
                policy::plan_delete_id(&plan_list, &pins, id, opts.now)?
            };
            plan_list
                .iter()
                .map(|b| {
                    let gone = doomed.contains(&b.id);
                    let reason = match (gone, b.id == *id) {
                        (true, true) => "selected",
                        (true, false) => "descendant",
                        _ => "not selected",
                    };
                    decision(b, !gone, reason)
                })
                .collect()
        }
        Target::None => plan_list
            .iter()
            .map(|b| decision(b, true, "not selected"))
            .collect(),
    };
    // every backup, oldest first: the plan's decisions and the marked ones
    let mut decisions: Vec<Decision> = list
        .iter()
        .map(|b| {
            planned
                .iter()
                .find(|d| d.id == b.id)
                .cloned()
                .unwrap_or_else(|| decision(b, false, "marked by an interrupted delete"))
        })
        .collect();
    let merged = if opts.merge_expired && matches!(opts.target, Target::Expired) {
        merge::merge_expired(
            catalog,
            instance,
            &list,
            &mut decisions,
            &pins,
            opts.now,
            opts.dry_run,
        )?
    } else {
        Vec::new()
    };
    // newest first: descendants before their ancestors
    let doomed: Vec<&BackupMeta> = list
        .iter()
        .rev()
        .filter(|b| decisions.iter().any(|d| d.id == b.id && !d.keep))
        .filter(|b| !merged.iter().any(|m| m.plan.replaces.contains(&b.id)))
        .collect();
    let mut report = DeleteReport {
        instance: instance.to_string(),
        dry_run: opts.dry_run,
        settings: settings.clone(),
        backups: decisions.clone(),
        deleted: Vec::new(),
        leftovers: merge_leftovers,
        wal: Vec::new(),
        wal_skipped: None,
        merged,
    };
    if !opts.dry_run {
        // leftovers of an interrupted delete: names with objects but no backup metadata
        for name in &leftovers {
            let key = meta::backup_key(instance, name)?;
            let mut keys = Vec::new();
            walk(repo, &key, &mut keys)?;
            if !keys.is_empty() {
                remove_backup_objects(repo, &key)?;
                report.leftovers.push(name.clone());
            }
        }
        // every doomed backup locked first (refused while in use), then marked (all the
        // marks made durable together), then removed
        let mut held = Vec::new();
        for b in &doomed {
            held.push(locks::remove(catalog, b, "delete")?);
        }
        let mut marks = Vec::new();
        for b in &doomed {
            if being_deleted(b) {
                continue;
            }
            marks.push(meta::record_status_deferred(
                catalog,
                instance,
                &b.id,
                Status::Error,
                Some(DELETING.into()),
                "delete",
            )?);
        }
        repo.sync_objects(&marks)?;
        let keys = doomed.iter().map(|b| b.key()).collect::<Result<Vec<_>>>()?;
        remove_backups(repo, &keys)?;
        for b in &doomed {
            log::info!("deleted backup {}", b.id);
            report.deleted.push(b.id.clone());
        }
    } else {
        report.deleted = doomed.iter().map(|b| b.id.clone()).collect();
    }
    if opts.delete_wal {
        // a running backup holds the WAL lock: what it needs is not known yet
        let wal_lock = if opts.dry_run {
            None
        } else {
            match locks::wal_exclusive(catalog, instance)? {
                Some(l) => Some(l),
                None => {
                    report.wal_skipped = Some(
                        "a backup of the instance is running (it holds the WAL lock); the next delete purges".into(),
                    );
                    return Ok(report);
                }
            }
        };
        match plan_wal_purge(
            catalog, instance, &list, &decisions, &pins, &settings, opts.now,
        )? {
            Ok(plan) => {
                if !opts.dry_run {
                    // per timeline: every index object (durably), then the segments
                    // (module docs)
                    let prefix = Catalog::wal_key(instance);
                    for t in &plan {
                        let keys: Vec<String> = t
                            .objects
                            .iter()
                            .map(|name| format!("{prefix}/{:08X}/{name}", t.timeline))
                            .collect();
                        let (idx, data): (Vec<String>, Vec<String>) =
                            keys.into_iter().partition(|k| k.contains(".idx"));
                        remove_keys(repo, &idx)?;
                        remove_keys(repo, &data)?;
                    }
                }
                report.wal = plan;
            }
            Err(why) => report.wal_skipped = Some(why),
        }
        drop(wal_lock);
    }
    Ok(report)
}

/// The WAL purge plan, or why nothing may be purged.
fn plan_wal_purge(
    catalog: &Catalog,
    instance: &str,
    list: &[BackupMeta],
    decisions: &[Decision],
    pins: &HashMap<String, Pin>,
    settings: &Settings,
    now: i64,
) -> Result<std::result::Result<Vec<TimelinePurge>, String>> {
    let keepers = match policy::wal_keepers(list, decisions, pins, settings, now) {
        Ok(k) => k,
        Err(why) => return Ok(Err(why)),
    };
    let ar = WalArchive::open(catalog, instance)?;
    let mut files = BTreeMap::new();
    let mut histories = BTreeMap::new();
    let mut tlis = ar.timelines()?;
    tlis.extend(list.iter().map(|b| b.timeline));
    tlis.sort_unstable();
    tlis.dedup();
    for t in tlis {
        if t > 1 {
            match ar.timeline_history(t) {
                Ok(h) => {
                    histories.insert(t, h);
                }
                Err(e) => {
                    return Ok(Err(format!(
                    "the history of timeline {t} cannot be read ({e}); without it no WAL is purged"
                )))
                }
            }
        }
        let l = ar.listing(Some(t))?;
        if let Some(d) = l.damaged.first() {
            return Ok(Err(format!(
                "timeline {t:08X} holds \"{d}\", which is not a regular file"
            )));
        }
        files.insert(t, l.objects.into_iter().map(|o| o.name).collect::<Vec<_>>());
    }
    Ok(Ok(policy::plan_wal(
        ar.seg_size(),
        &histories,
        &files,
        &keepers,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{Blob, Listing, LockMode, MemRepo, ObjectInfo, ObjectWriter, RepoLock};
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A store whose deletes "crash" (fail, and every later one too) after `left` of them.
    #[derive(Debug)]
    struct Dying {
        inner: MemRepo,
        left: AtomicUsize,
    }

    impl Repo for Dying {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
            self.inner.create(key)
        }
        fn get(&self, key: &str) -> Result<Blob> {
            self.inner.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
            self.inner.get_range(key, offset, len)
        }
        fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
            self.inner.head(key)
        }
        fn list(&self, prefix: &str) -> Result<Listing> {
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<()> {
            if self.left.load(Ordering::SeqCst) == 0 {
                return Err(Error::new(crate::error::ErrorKind::Io, "killed"));
            }
            self.left.fetch_sub(1, Ordering::SeqCst);
            self.inner.delete(key)
        }
        fn lock(&self, key: &str, mode: LockMode, wait: bool) -> Result<Option<RepoLock>> {
            self.inner.lock(key, mode, wait)
        }
        fn barrier(&self) -> Result<()> {
            self.inner.barrier()
        }
    }

    fn sample() -> BackupMeta {
        let mut m: BackupMeta = serde_json::from_value(serde_json::json!({
            "format": 2, "id": "A", "instance": "db", "mode": "FULL", "status": "OK",
            "parent_id": null, "timeline": 1, "start_lsn": "0/2000028", "stop_lsn": "0/3000100",
            "parent_start_lsn": null, "start_time": "2026-01-01 00:00:00+00", "end_time": null,
            "recovery_time": null, "recovery_epoch": null, "recovery_xid": null,
            "data_bytes": 0, "files": 2, "compress": "none", "pg_major": 15, "system_id": 1,
            "block_size": 8192, "relseg_size": 131072, "wal_segment_size": 16777216,
            "data_checksums": true, "pid": null, "error": null
        }))
        .unwrap();
        m.status = Status::Ok;
        m
    }

    /// A kill at every point of a backup's removal (after the "being deleted" record)
    /// leaves something that reads as ERROR or as no backup, never as OK; a second run
    /// finishes it.
    #[test]
    fn a_kill_at_every_point_of_removal_never_leaves_a_valid_backup() {
        let k = "instances/db/backups/A";
        let objects = [
            "manifest",
            "backup_label",
            "database/base/1/1",
            "database/base/1/2",
            "database/global/pg_control",
            "pin/20260101T000000Z.json",
        ];
        for kill_after in 0..=objects.len() + 4 {
            let repo = Arc::new(Dying {
                inner: MemRepo::new(),
                left: AtomicUsize::new(kill_after),
            });
            let catalog = Catalog::with_repo(Path::new("/mem"), repo.clone());
            let m = sample();
            repo.put_new(&format!("{k}/{STARTED_FILE}"), &meta::encode(&m).unwrap())
                .unwrap();
            for o in objects {
                repo.put_new(&format!("{k}/{o}"), b"x").unwrap();
            }
            meta::save_complete(&catalog, &m).unwrap();
            assert_eq!(
                meta::load_in(&catalog, "db", "A").unwrap().status,
                Status::Ok
            );
            meta::record_status(
                &catalog,
                "db",
                "A",
                Status::Error,
                Some("being deleted".into()),
                "delete",
            )
            .unwrap();
            let res = remove_backup_objects(&*repo, k);
            match meta::load_in(&catalog, "db", "A") {
                Ok(b) => {
                    assert!(res.is_err());
                    assert_eq!(b.status, Status::Error, "kill after {kill_after} deletes");
                }
                Err(e) => assert_eq!(e.kind(), crate::error::ErrorKind::NotFound, "{e}"),
            }
            repo.left.store(usize::MAX, Ordering::SeqCst);
            remove_backup_objects(&*repo, k).unwrap();
            let mut left = Vec::new();
            walk(&*repo, k, &mut left).unwrap();
            assert!(left.is_empty(), "{left:?}");
        }
    }
}
