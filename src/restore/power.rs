//! The restore entry point with the options of incremental and partial restore, and the
//! restore plan (`--plan`): everything a restore would do, computed without writing.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::archive::{IndexState, WalArchive};
use crate::backup::meta::{self, BackupMeta};
use crate::catalog::Catalog;
use crate::durable::{self, Replace};
use crate::error::{Error, Result};
use crate::format::manifest::FileEntry;
use crate::progress::Progress;
use crate::types::{Lsn, WalFileName};

use super::incremental::{self, Check, InPlace, IncrementalMode, Outcome, Preflight};
use super::plan::{self, Plan};
use super::{partial, rebuild, RecoveryTarget, RestoreOptions, Restorer};

/// The options beyond a plain restore.
#[derive(Clone, Debug, Default)]
pub struct PowerOptions {
    /// Rewrite only what differs in an existing data directory.
    pub incremental: Option<IncrementalMode>,
    pub db_include: Vec<String>,
    pub db_exclude: Vec<String>,
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub backup_id: String,
    /// "full", or the incremental mode.
    pub kind: String,
    pub bytes_written: u64,
    pub bytes_total: u64,
    pub files_removed: u64,
    /// Blocks kept without reading the backup (lsn mode; checksum mode with block
    /// checksums).
    pub blocks_kept: u64,
    /// lsn mode, wal-index route: blocks kept without reading the destination either.
    pub blocks_kept_unread: u64,
    /// Bytes of existing destination files read.
    pub dest_bytes_read: u64,
    /// lsn mode: the route taken (wal-index or page-scan) and why.
    pub lsn_route: Option<super::destwal::RouteReport>,
    pub excluded_databases: Vec<u32>,
}

fn with_force(opts: &RestoreOptions, force: bool) -> RestoreOptions {
    RestoreOptions {
        backup_id: opts.backup_id.clone(),
        target: opts.target.clone(),
        jobs: opts.jobs,
        mappings: opts.mappings.clone(),
        recovery: opts.recovery.clone(),
        force,
        progress: opts.progress.clone(),
    }
}

/// The plan phase with the partial and incremental options: the plan, the excluded
/// databases' OIDs and, incremental, the pre-flight checks. Writes nothing.
fn plan_all<'a>(
    catalog: &Catalog,
    instance: &str,
    list: &'a [BackupMeta],
    opts: &RestoreOptions,
    p: &PowerOptions,
) -> Result<(Plan<'a>, BTreeSet<u32>, Option<Preflight>)> {
    // an incremental restore works in a non-empty directory and never clears it
    let o = with_force(opts, opts.force || p.incremental.is_some());
    let mut pl = plan::plan(catalog, instance, list, &o)?;
    let newest = pl.chain[0];
    let dbs = if p.db_include.is_empty() && p.db_exclude.is_empty() {
        None
    } else {
        partial::read(catalog, newest)?
    };
    let excluded =
        partial::excluded_oids(dbs.as_deref(), &newest.id, &p.db_include, &p.db_exclude)?;
    if let Some(dbs) = &dbs {
        partial::check_excluded(
            &excluded,
            dbs,
            &pl.entries,
            &partial::file_name(catalog, newest)?,
        )?;
    }
    pl.excluded_dbs = excluded.clone();
    let pf = match p.incremental {
        Some(mode) => {
            pl.clear_target = false;
            let archive = WalArchive::open(catalog, instance);
            let history = match &archive {
                Ok(a) => a.timeline_history(newest.timeline),
                Err(e) => Err(Error::new(e.kind(), e.to_string())),
            };
            let mut pf = incremental::preflight(
                &pl.target,
                &pl.chain,
                mode,
                history,
                !pl.tablespaces.is_empty(),
            );
            // lsn mode: the route, decided before any write (X is never past the newest
            // backup's start: see the preflight)
            if let (IncrementalMode::Lsn, true, Some(x)) = (mode, pf.passed(), pf.divergence) {
                pf.route = Some(super::destwal::decide(&pl.target, archive.as_ref().ok(), x));
            }
            Some(pf)
        }
        None => None,
    };
    Ok((pl, excluded, pf))
}

/// Restores with the options of `p`; nothing is written until every check passed.
pub fn restore_with(
    catalog: &Catalog,
    instance: &str,
    opts: &RestoreOptions,
    p: &PowerOptions,
) -> Result<RestoreReport> {
    incremental::phase("restore started");
    let list = meta::list(catalog, instance)?;
    let (pl, excluded, pf) = plan_all(catalog, instance, &list, opts, p)?;
    incremental::phase("planned");
    // as in [`super::restore`]: the chain is locked for use until the restore ends
    let _chain_lock =
        crate::lifecycle::locks::use_chain(catalog, instance, &pl.chain, false, "restore")?;
    let settings = super::recovery_settings(catalog, instance, &pl)?;
    let id = pl.chain[0].id.clone();
    let total: u64 = pl.entries.iter().map(|e| e.size).sum();
    let excluded_databases = excluded.iter().copied().collect();
    match (p.incremental, pf) {
        (Some(mode), Some(pf)) => {
            if let Some(err) = pf.refusal(&pl.target) {
                return Err(err);
            }
            let out = execute_in_place(
                catalog,
                pl,
                Some(&settings),
                opts.jobs,
                &opts.progress,
                mode,
                pf.divergence,
                pf.route.as_ref(),
            )?;
            Ok(RestoreReport {
                backup_id: id,
                kind: mode.to_string(),
                bytes_written: out.bytes_written,
                bytes_total: out.bytes_total,
                files_removed: out.files_removed,
                blocks_kept: out.blocks_kept,
                blocks_kept_unread: out.blocks_kept_unread,
                dest_bytes_read: out.dest_bytes_read,
                lsn_route: out.route,
                excluded_databases,
            })
        }
        _ => {
            super::execute(catalog, pl, &settings, opts.jobs, &opts.progress)?;
            Ok(RestoreReport {
                backup_id: id,
                kind: "full".into(),
                bytes_written: total,
                bytes_total: total,
                files_removed: 0,
                blocks_kept: 0,
                blocks_kept_unread: 0,
                dest_bytes_read: 0,
                lsn_route: None,
                excluded_databases,
            })
        }
    }
}

/// Creates the files of excluded databases as sparse zeroed files of their length.
pub(super) fn create_sparse(r: &Restorer<'_>, files: &[&FileEntry]) -> Result<()> {
    for e in files {
        if let Some(dest) = r.dest(&e.path)? {
            let mut f = durable::DurableFile::create(&dest)?;
            f.file()
                .set_len(e.size)
                .map_err(|err| Error::io("extend", &dest, err))?;
            f.commit_deferred(Replace::No)?;
        }
    }
    Ok(())
}

/// The in-place execute phase of an incremental restore (see incremental.rs); with
/// `settings` `None`, a dry run that only counts.
#[allow(clippy::too_many_arguments)]
fn execute_in_place(
    catalog: &Catalog,
    plan: Plan<'_>,
    settings: Option<&[(&'static str, String)]>,
    jobs: usize,
    progress: &Arc<dyn Progress>,
    mode: IncrementalMode,
    divergence: Option<Lsn>,
    route: Option<&super::destwal::Route>,
) -> Result<Outcome> {
    incremental::phase("in-place restore begins");
    let dry = settings.is_none();
    let newest = plan.chain[0];
    let target = plan.target.clone();
    // the chain's block checksums, checked before anything is written
    let crcs = match mode {
        IncrementalMode::Checksum => Some(incremental::load_crcs(
            catalog,
            &plan.chain,
            &plan.entries,
            &plan.older,
        )?),
        IncrementalMode::Lsn => None,
    };
    incremental::phase("block checksums loaded");
    let r = Restorer {
        catalog,
        chain: plan.chain.clone(),
        older: plan.older,
        target: target.clone(),
        tablespaces: Default::default(),
        progress: progress.clone(),
        chunk_blocks: (rebuild::CHUNK_BYTES / newest.block_size.max(1) as u64) as u32,
        window_blocks: (rebuild::WINDOW_BYTES / newest.block_size.max(1) as u64) as u32,
    };
    let entries = plan.entries;
    let pc = entries
        .iter()
        .find(|e| e.path == "global/pg_control")
        .ok_or_else(|| {
            Error::corruption(format!("backup {} has no global/pg_control", newest.id))
        })?;
    let total: u64 = entries.iter().map(|e| e.size).sum();
    let excluded = plan.excluded_dbs.clone();
    let sparse = move |p: &str| partial::is_excluded(p, &excluded);
    let ip = InPlace {
        r: &r,
        mode,
        x: divergence,
        start_of: incremental::starts(&plan.chain),
        relseg_size: newest.relseg_size,
        jobs,
        dry,
        sparse: &sparse,
        written: AtomicU64::new(0),
        kept: AtomicU64::new(0),
        rewritten: AtomicU64::new(0),
        created: AtomicU64::new(0),
        crcs,
        changes: route.and_then(|r| r.changes()),
        kept_unread: AtomicU64::new(0),
        dest_read: AtomicU64::new(0),
    };
    let fs_sync = if dry {
        None
    } else {
        Some(durable::FsSync::open(&target)?)
    };
    // pg_control first: from here on the directory cannot start until the end
    if !dry {
        let pcp = target.join("global/pg_control");
        durable::remove_file(&pcp)?;
        durable::fsync_dir(&target.join("global"))?;
    }
    incremental::phase("checks done");
    let extra = incremental::list_extra(&target, &incremental::keep_set(&entries))?;
    let removed = extra.len() as u64;
    if !dry {
        r.create_dirs(&entries)?;
    }
    progress.start(&format!("incremental restore {}", newest.id), total);
    let files = incremental::files(&entries);
    incremental::phase("listed and created");
    // what the backup does not have is removed while the big files are restored
    ip.sync_files(&files, jobs, &extra)?;
    incremental::phase("files done");
    let mut out = Outcome {
        bytes_written: ip.written.load(Ordering::Relaxed) + pc.size,
        bytes_total: total,
        files_rewritten: ip.rewritten.load(Ordering::Relaxed),
        files_created: ip.created.load(Ordering::Relaxed),
        files_removed: removed,
        blocks_kept: ip.kept.load(Ordering::Relaxed),
        blocks_kept_unread: ip.kept_unread.load(Ordering::Relaxed),
        dest_bytes_read: ip.dest_read.load(Ordering::Relaxed),
        route: route.map(Into::into),
    };
    let Some(settings) = settings else {
        progress.finish();
        return Ok(out);
    };
    let pc_file = r
        .restore_entry(pc)?
        .ok_or_else(|| Error::corruption("pg_control has no destination"))?;
    durable::write_file(
        &target.join("backup_label"),
        &plan.backup_label,
        Replace::Yes,
    )?;
    super::write_recovery_settings(&target, settings)?;
    if let Some(f) = &fs_sync {
        f.sync()?;
    }
    incremental::phase("syncfs done");
    // pg_control last
    pc_file.commit(Replace::Yes)?;
    durable::fsync_dir(&target)?;
    progress.finish();
    out.bytes_written = out.bytes_written.max(pc.size);
    log::info!(
        "incremental restore ({mode}{}) of {}: {} of {} bytes written, {} files rewritten, {} created, {} removed, {} blocks kept without reading the backup, {} of them without reading the destination; {} bytes of the destination read",
        route.map(|r| format!(", route {}", r.name())).unwrap_or_default(),
        newest.id,
        out.bytes_written,
        out.bytes_total,
        out.files_rewritten,
        out.files_created,
        out.files_removed,
        out.blocks_kept,
        out.blocks_kept_unread,
        out.dest_bytes_read
    );
    Ok(out)
}

/// One backup of the chain, newest first.
#[derive(Clone, Debug, Serialize)]
pub struct ChainStep {
    pub id: String,
    pub mode: String,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TablespacePlan {
    pub oid: String,
    pub to: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct DatabasePlan {
    pub name: String,
    pub oid: u32,
    pub restored: bool,
}

/// One WAL segment recovery reads.
#[derive(Clone, Debug, Serialize)]
pub struct SegmentPlan {
    pub name: String,
    /// Needed to reach consistency (the backup's start to its stop).
    pub required: bool,
    pub present: bool,
    pub indexed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct TargetPlan {
    /// latest, immediate, time, xid, lsn or name.
    pub kind: String,
    pub value: Option<String>,
    /// Where recovery stops, when known: the LSN of the target (an LSN, a named restore
    /// point found in the index, the consistency point for immediate, the end of the
    /// archived WAL for latest).
    pub lsn: Option<String>,
    pub timeline: u32,
    /// For a time target: the archived segment holding the first commit after the target
    /// (where recovery stops), found from the block indexes' last commit times.
    pub segment: Option<String>,
}

/// Everything a restore would do (`--plan`).
#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    /// The restore would succeed.
    pub ok: bool,
    pub backup_id: Option<String>,
    pub chain: Vec<ChainStep>,
    pub why: String,
    pub target: String,
    /// "full", "checksum" or "lsn".
    pub kind: String,
    pub tablespaces: Vec<TablespacePlan>,
    pub bytes_total: u64,
    pub bytes_to_write: u64,
    pub files_to_remove: u64,
    pub databases: Vec<DatabasePlan>,
    pub recovery_target: Option<TargetPlan>,
    pub wal: Vec<SegmentPlan>,
    pub checks: Vec<Check>,
    /// lsn mode: the route an lsn-mode restore would take (wal-index or page-scan) and why.
    pub lsn_route: Option<super::destwal::RouteReport>,
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok,
        detail: detail.into(),
        lsn_only: false,
    }
}

/// The restore plan: runs every check and computes what would be written, writing
/// nothing. A failed step is a failed check (and `ok` false), not an error.
pub fn plan_report(
    catalog: &Catalog,
    instance: &str,
    opts: &RestoreOptions,
    p: &PowerOptions,
) -> Result<PlanReport> {
    let mut rep = PlanReport {
        ok: false,
        backup_id: None,
        chain: Vec::new(),
        why: String::new(),
        target: opts.target.display().to_string(),
        kind: p.incremental.map_or("full".to_string(), |m| m.to_string()),
        tablespaces: Vec::new(),
        bytes_total: 0,
        bytes_to_write: 0,
        files_to_remove: 0,
        databases: Vec::new(),
        recovery_target: None,
        wal: Vec::new(),
        checks: Vec::new(),
        lsn_route: None,
    };
    let list = meta::list(catalog, instance)?;
    let (pl, excluded, pf) = match plan_all(catalog, instance, &list, opts, p) {
        Ok(x) => x,
        Err(e) => {
            rep.checks.push(check(
                "backup, options and destination",
                false,
                e.to_string(),
            ));
            return Ok(rep);
        }
    };
    rep.checks.push(check(
        "backup, options and destination",
        true,
        "the chain, its manifests, the tablespace map and the destination check out",
    ));
    let newest = pl.chain[0];
    rep.backup_id = Some(newest.id.clone());
    rep.chain = pl
        .chain
        .iter()
        .map(|b| ChainStep {
            id: b.id.clone(),
            mode: b.mode.to_string(),
            timeline: b.timeline,
            start_lsn: b.start_lsn.to_string(),
            stop_lsn: b.stop_lsn.map(|l| l.to_string()),
        })
        .collect();
    rep.why = match &opts.backup_id {
        Some(id) => format!("backup {id} was given (-i); its whole chain is OK"),
        None => format!(
            "the newest backup whose whole chain is OK and that can reach the recovery target{}",
            if pl.chain.len() > 1 {
                format!(
                    "; a {}-backup chain down to FULL {}",
                    pl.chain.len(),
                    pl.chain[pl.chain.len() - 1].id
                )
            } else {
                String::new()
            }
        ),
    };
    rep.tablespaces = pl
        .tablespaces
        .iter()
        .map(|t| TablespacePlan {
            oid: t.oid.clone(),
            to: t.dest.display().to_string(),
        })
        .collect();
    if let Ok(Some(dbs)) = partial::read(catalog, newest) {
        rep.databases = dbs
            .iter()
            .map(|d| DatabasePlan {
                name: d.name.clone(),
                oid: d.oid,
                restored: !excluded.contains(&d.oid),
            })
            .collect();
    }
    let total: u64 = pl.entries.iter().map(|e| e.size).sum();
    rep.bytes_total = total;
    let mut ok = true;
    if let Some(pf) = &pf {
        rep.checks.extend(pf.checks.iter().cloned());
        ok &= pf.passed();
        if let Some(r) = &pf.route {
            rep.lsn_route = Some(r.into());
            rep.checks.push(check("lsn route", true, r.detail()));
        }
    }
    // the WAL and the target, before `pl` is consumed
    wal_plan(catalog, instance, newest, &opts.recovery.target, &mut rep);
    ok &= rep.wal.iter().all(|s| !s.required || s.present);
    match (p.incremental, pf) {
        (Some(mode), Some(pf)) if pf.passed() => {
            let progress: Arc<dyn Progress> = Arc::new(crate::progress::NoProgress);
            match execute_in_place(
                catalog,
                pl,
                None,
                opts.jobs,
                &progress,
                mode,
                pf.divergence,
                pf.route.as_ref(),
            ) {
                Ok(out) => {
                    rep.bytes_to_write = out.bytes_written;
                    rep.files_to_remove = out.files_removed;
                    rep.checks.push(check(
                        "backup files readable",
                        true,
                        "every stored file compared matches its manifest checksum",
                    ));
                }
                Err(e) => {
                    ok = false;
                    rep.checks
                        .push(check("backup files readable", false, e.to_string()));
                }
            }
        }
        (Some(_), _) => {}
        _ => {
            rep.bytes_to_write = pl
                .entries
                .iter()
                .filter(|e| !partial::is_excluded(&e.path, &excluded))
                .map(|e| e.size)
                .sum();
        }
    }
    rep.ok = ok && rep.checks.iter().all(|c| c.ok);
    Ok(rep)
}

/// The WAL recovery reads, from the archive's index, and the target's position.
fn wal_plan(
    catalog: &Catalog,
    instance: &str,
    newest: &BackupMeta,
    target: &RecoveryTarget,
    rep: &mut PlanReport,
) {
    let seg_size = newest.wal_segment_size;
    let tli = newest.timeline;
    let (kind, value) = match target {
        RecoveryTarget::Latest => ("latest", None),
        RecoveryTarget::Immediate => ("immediate", None),
        RecoveryTarget::Time { text, .. } => ("time", Some(text.clone())),
        RecoveryTarget::Xid { xid, .. } => ("xid", Some(xid.to_string())),
        RecoveryTarget::Lsn { lsn, .. } => ("lsn", Some(lsn.to_string())),
        RecoveryTarget::Name(n) => ("name", Some(n.clone())),
    };
    let mut tp = TargetPlan {
        kind: kind.into(),
        value,
        lsn: None,
        timeline: tli,
        segment: None,
    };
    let archive = match WalArchive::open(catalog, instance) {
        Ok(a) => a,
        Err(e) => {
            rep.checks.push(check("WAL archive", false, e.to_string()));
            rep.recovery_target = Some(tp);
            return;
        }
    };
    let Some(stop) = newest.stop_lsn else {
        rep.checks
            .push(check("WAL archive", false, "the backup has no stop LSN"));
        rep.recovery_target = Some(tp);
        return;
    };
    let first = newest.start_lsn.segno(seg_size);
    let last_required = stop.segno(seg_size);
    let goal: Option<Lsn> = match target {
        RecoveryTarget::Immediate => Some(stop),
        RecoveryTarget::Lsn { lsn, .. } => Some(*lsn),
        RecoveryTarget::Name(n) => match archive.find_restore_point(n) {
            Ok(Some((t, l))) => {
                tp.timeline = t;
                Some(l)
            }
            _ => None,
        },
        _ => None,
    };
    if matches!(target, RecoveryTarget::Name(_)) && goal.is_none() {
        rep.checks.push(check(
            "recovery target",
            false,
            "the named restore point is not in the block indexes",
        ));
    }
    // A time target: recovery stops at the first commit after it (at or after it when not
    // inclusive). The indexes hold each segment's last commit time, so the first segment
    // whose last commit passes the target holds that commit. The target's text is kept to
    // whole seconds here, so the segment found is never later than the real one.
    let time_goal: Option<(i64, bool)> = match target {
        RecoveryTarget::Time {
            epoch, inclusive, ..
        } => Some((
            epoch
                .saturating_sub(crate::archive::show::PG_EPOCH_UNIX)
                .saturating_mul(1_000_000),
            inclusive.unwrap_or(true),
        )),
        _ => None,
    };
    let mut time_segment: Option<u64> = None;
    let mut unindexed_after_backup = false;
    let mut segno = first;
    let mut end_of_archive = None;
    loop {
        let name = WalFileName::segment(tli, segno, seg_size);
        let st = archive.index_state(tli, segno);
        let (present, indexed) = match &st {
            Ok(IndexState::Indexed(_)) => (true, true),
            Ok(IndexState::Pending(_)) | Ok(IndexState::Missing(_)) => (true, false),
            Ok(IndexState::NotArchived) => (false, false),
            Err(_) => (false, false),
        };
        if let (Some((t, inclusive)), None) = (time_goal, time_segment) {
            match &st {
                Ok(IndexState::Indexed(ix) | IndexState::Pending(ix)) => {
                    let passes = |c: i64| if inclusive { c > t } else { c >= t };
                    if ix.last_commit_time.is_some_and(passes) {
                        time_segment = Some(segno);
                    }
                }
                Ok(IndexState::Missing(_)) => unindexed_after_backup = true,
                _ => {}
            }
        }
        let needed = segno <= last_required || goal.is_some_and(|g| segno <= g.segno(seg_size));
        // (a time target's segments are required up to the one it is found in; an absent
        // segment before that is the end of the archive, checked below)
        let required =
            needed || (present && time_goal.is_some() && time_segment.is_none_or(|t| segno <= t));
        // a STREAM backup carries the WAL to its stop
        let present = present || (newest.stream && segno <= last_required);
        if !required && !present {
            end_of_archive = Some(segno);
            break;
        }
        rep.wal.push(SegmentPlan {
            name: name.to_string(),
            required,
            present,
            indexed,
        });
        if !present {
            rep.checks.push(check(
                "WAL segments",
                false,
                format!("segment {name} that recovery needs is not in the archive"),
            ));
        }
        segno += 1;
        if rep.wal.len() > 1_000_000 {
            break;
        }
    }
    if rep.wal.iter().all(|s| s.present) {
        rep.checks.push(check(
            "WAL segments",
            true,
            format!("{} segments, all present", rep.wal.len()),
        ));
    }
    if time_goal.is_some() {
        match time_segment {
            Some(s) => {
                tp.segment = Some(WalFileName::segment(tli, s, seg_size).to_string());
                rep.checks.push(check(
                    "recovery target",
                    true,
                    format!(
                        "the first commit after the target time is in segment {}",
                        WalFileName::segment(tli, s, seg_size)
                    ),
                ));
            }
            None if unindexed_after_backup => rep.checks.push(check(
                "recovery target",
                true,
                "position unknown: a segment after the backup has no block index",
            )),
            None => rep.checks.push(check(
                "recovery target",
                false,
                format!(
                    "no commit after the target time is in the archive (up to {}): recovery would end before reaching the target",
                    end_of_archive
                        .and_then(|e: u64| e.checked_sub(1))
                        .filter(|&e| e >= first)
                        .map_or("the backup".to_string(), |e| WalFileName::segment(
                            tli, e, seg_size
                        )
                        .to_string())
                ),
            )),
        }
    }
    tp.lsn = match (goal, target) {
        (Some(g), _) => Some(g.to_string()),
        (None, RecoveryTarget::Latest) => {
            end_of_archive.map(|s| Lsn(s * seg_size as u64).to_string())
        }
        _ => None,
    };
    rep.recovery_target = Some(tp);
}

/// The plan as text.
pub fn render_plan(r: &PlanReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "restore plan: {}\n",
        if r.ok { "would succeed" } else { "WOULD FAIL" }
    ));
    if let Some(id) = &r.backup_id {
        s.push_str(&format!("backup {id} ({}): {}\n", r.kind, r.why));
    }
    for c in &r.chain {
        s.push_str(&format!(
            "  chain: {} {} timeline {} start {} stop {}\n",
            c.id,
            c.mode,
            c.timeline,
            c.start_lsn,
            c.stop_lsn.as_deref().unwrap_or("-")
        ));
    }
    s.push_str(&format!("target directory: {}\n", r.target));
    for t in &r.tablespaces {
        s.push_str(&format!("  tablespace {} -> {}\n", t.oid, t.to));
    }
    for d in &r.databases {
        s.push_str(&format!(
            "  database {} (oid {}): {}\n",
            d.name,
            d.oid,
            if d.restored {
                "restored"
            } else {
                "EXCLUDED (sparse zero files; drop it after recovery)"
            }
        ));
    }
    s.push_str(&format!(
        "bytes to write: {} of {}; files to remove: {}\n",
        r.bytes_to_write, r.bytes_total, r.files_to_remove
    ));
    if let Some(t) = &r.recovery_target {
        s.push_str(&format!(
            "recovery target: {}{} on timeline {}, position {}\n",
            t.kind,
            t.value
                .as_deref()
                .map(|v| format!(" {v}"))
                .unwrap_or_default(),
            t.timeline,
            match (&t.lsn, &t.segment) {
                (Some(l), _) => l.clone(),
                (None, Some(seg)) => format!("in segment {seg}"),
                (None, None) => "unknown before recovery".to_string(),
            }
        ));
    }
    let (first, last) = (r.wal.first(), r.wal.last());
    if let (Some(f), Some(l)) = (first, last) {
        let missing = r.wal.iter().filter(|w| !w.present).count();
        let unindexed = r.wal.iter().filter(|w| w.present && !w.indexed).count();
        s.push_str(&format!(
            "WAL: {} segments {}..{}, {missing} missing, {unindexed} not indexed\n",
            r.wal.len(),
            f.name,
            l.name
        ));
        for w in r.wal.iter().filter(|w| !w.present || !w.indexed) {
            s.push_str(&format!(
                "  {} {}{}\n",
                w.name,
                if w.present {
                    "present, not indexed"
                } else {
                    "MISSING"
                },
                if w.required { " (required)" } else { "" }
            ));
        }
    }
    for c in &r.checks {
        s.push_str(&format!(
            "check {:<32} {}  {}\n",
            c.name,
            if c.ok { "ok  " } else { "FAIL" },
            c.detail
        ));
    }
    s
}
