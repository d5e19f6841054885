//! Taking a backup: checks, start (the started marker), parent choice ([`plan`]), copy,
//! stop, and the commit record (backup.json, written once).

use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::archive::WalArchive;
use crate::catalog::Catalog;
use crate::error::{Error, IoContext, Result};
use crate::pgcontrol::ControlFile;
use crate::progress::Progress;
use crate::repo::{Durability, ObjectWriter};
use crate::types::{Lsn, WalFileName};

use super::copy::{copy_tree, copy_whole, CopyCtx, CopyPlan};
use super::meta::{self, BackupMeta, Mode, Status};
use super::plan;
use crate::format::manifest::{FileEntry, ManifestWriter, Storage};
use crate::server;

/// What `take_backup` does: plain options, checked by the caller.
#[derive(Clone)]
pub struct BackupOptions {
    pub mode: Mode,
    pub jobs: usize,
    pub compress: bool,
    /// The parent of a PAGE or DELTA backup (default: chosen by [`plan::choose_parent`]).
    pub parent: Option<String>,
    pub archive_timeout: Duration,
    pub conn: crate::server::ConnParams,
    /// Where the copy reports its progress.
    pub progress: Arc<dyn Progress>,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Takes a backup; returns its metadata (status OK). The backup is a started marker, its
/// files and, once all is durable, its metadata (see [`meta`]). On failure after the start,
/// a dated ERROR status record is written and the error returned; the files stay (only the
/// lifecycle commands delete).
pub fn take_backup(catalog: &Catalog, instance: &str, opts: &BackupOptions) -> Result<BackupMeta> {
    let cfg = catalog.instance(instance)?;
    let mut sess = server::connect(&opts.conn, &cfg)?;
    sess.check(&cfg, catalog.root())?;
    let archive = WalArchive::open(catalog, instance)?;
    let pgdata = std::path::PathBuf::from(sess.data_directory()?);
    let control = ControlFile::read_from_pgdata(&pgdata)?;
    if control.system_id != cfg.system_id {
        return Err(Error::invalid(format!(
            "data directory \"{}\" belongs to system {}, not instance \"{instance}\"",
            pgdata.display(),
            control.system_id
        )));
    }
    let list = meta::list(catalog, instance)?;
    let start_secs = now_secs();
    let mut m = BackupMeta {
        format: meta::META_FORMAT,
        id: String::new(),
        instance: instance.to_string(),
        mode: opts.mode,
        status: Status::Running,
        parent_id: None,
        timeline: control.timeline,
        start_lsn: Lsn::INVALID,
        stop_lsn: None,
        parent_start_lsn: None,
        start_time: meta::format_utc(start_secs),
        end_time: None,
        recovery_time: None,
        recovery_epoch: None,
        recovery_xid: None,
        data_bytes: 0,
        files: 0,
        compress: if opts.compress { "lz4" } else { "none" }.to_string(),
        pg_major: sess.major,
        system_id: cfg.system_id,
        block_size: control.block_size,
        relseg_size: control.relseg_size,
        wal_segment_size: control.wal_segment_size,
        data_checksums: control.data_checksums(),
        pid: Some(std::process::id()),
        error: None,
    };
    // create-only: a concurrent backup never shares this id
    let started = meta::start(catalog, &mut m, start_secs)?;
    let id = started.id.clone();
    log::info!(
        "backup {id} ({}) of instance \"{instance}\" started",
        opts.mode
    );
    let r = run(catalog, &archive, &mut sess, &pgdata, &list, &mut m, opts);
    let r = match r {
        Ok(()) => Ok(m),
        Err(e) => {
            let msg = e.to_string();
            // A new dated record, never a rewrite; the partial files stay until a
            // lifecycle command removes them (nothing without backup.json looks complete).
            if let Err(se) =
                meta::record_status(catalog, instance, &id, Status::Error, Some(msg), "backup")
            {
                log::error!("could not record backup {id} as ERROR: {se}");
            }
            Err(e.context(format!("backup {id} failed")))
        }
    };
    drop(started);
    r
}

/// A stored object of the backup being written: `key/rel`, through the catalog's store.
fn create(catalog: &Catalog, key: &str, rel: &str) -> Result<Box<dyn ObjectWriter>> {
    catalog.repo().create(&format!("{key}/{rel}"))
}

/// Writes a small object of the backup (deferred: the barrier before backup.json makes it
/// durable).
fn put_deferred(catalog: &Catalog, key: &str, rel: &str, data: &[u8]) -> Result<()> {
    let mut w = create(catalog, key, rel)?;
    let what = w.describe();
    w.write_all(data)
        .map_err(|e| Error::io("write", std::path::Path::new(&what), e))?;
    w.commit(Durability::Deferred)
}

fn run(
    catalog: &Catalog,
    archive: &WalArchive,
    sess: &mut server::Session,
    pgdata: &std::path::Path,
    list: &[BackupMeta],
    m: &mut BackupMeta,
    opts: &BackupOptions,
) -> Result<()> {
    let started = Instant::now();
    let start_lsn = sess.backup_start(&format!("walnut backup {}", m.id))?;
    let tli = sess.checkpoint_timeline()?;
    m.start_lsn = start_lsn;
    m.timeline = tli;
    let seg_size = m.wal_segment_size;
    let key = m.key()?;

    let copy_plan = if m.mode == Mode::Full {
        CopyPlan::Full
    } else {
        let history = archive.timeline_history(tli)?;
        let parent = plan::choose_parent(
            list,
            opts.parent.as_deref(),
            &history,
            tli,
            m.system_id,
            m.mode,
        )?;
        if start_lsn < parent.start_lsn {
            return Err(Error::invalid(format!(
                "the server's start LSN {start_lsn} is older than parent backup {}'s start {}: \
                 this is an instance from the past (restored from an older backup?); take a FULL backup",
                parent.id, parent.start_lsn
            )));
        }
        m.parent_id = Some(parent.id.clone());
        m.parent_start_lsn = Some(parent.start_lsn);
        let mut parent_files = HashSet::new();
        super::stored::read_manifest(catalog.repo(), &parent.key()?, |e| {
            if e.storage != Storage::Dir {
                parent_files.insert(e.path);
            }
            Ok(())
        })?;
        if m.mode == Mode::Page {
            // The segment holding our start LSN must be complete and indexed: records
            // between the start-of-backup segment switch and the redo point count.
            sess.switch_wal()?;
            log::debug!("waiting for the start segment");
            let seg = WalFileName::segment(tli, start_lsn.segno(seg_size), seg_size);
            wait_archived(archive, &seg, opts.archive_timeout)?;
            log::debug!("start segment {seg} archived; building the change map");
            let change = plan::change_map(
                archive,
                &history,
                tli,
                parent.start_lsn,
                start_lsn,
                seg_size,
            )?;
            CopyPlan::Page {
                parent_start: parent.start_lsn,
                parent_files,
                change,
            }
        } else {
            CopyPlan::Delta {
                parent_start: parent.start_lsn,
                parent_files,
            }
        }
    };
    log::debug!("copying {}", pgdata.display());

    let total = sess.total_size().unwrap_or(0);
    let progress = &*opts.progress;
    progress.start(&format!("backup {}", m.id), total);
    let ctx = CopyCtx {
        pgdata: pgdata.to_path_buf(),
        repo: catalog.repo(),
        key: key.clone(),
        plan: copy_plan,
        compress: opts.compress,
        block_size: m.block_size,
        relseg_size: m.relseg_size,
        checksums: m.data_checksums,
        start_lsn,
        progress,
        abort: AtomicBool::new(false),
        newest_lsn: AtomicU64::new(start_lsn.0),
        newest_page: Mutex::new(None),
    };
    // Stored files are committed deferred (thousands of them, no per-file fsync); one
    // barrier makes them durable before the completion record.
    let mw_obj = create(catalog, &key, "manifest")?;
    let mpath = std::path::PathBuf::from(mw_obj.describe());
    let mut mw = ManifestWriter::new(BufWriter::new(mw_obj), opts.compress).ctx("write", &mpath)?;
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut add =
        |e: FileEntry, mw: &mut ManifestWriter<BufWriter<Box<dyn ObjectWriter>>>| -> Result<()> {
            if e.storage != Storage::Dir {
                files += 1;
                bytes += e.stored_size;
            }
            mw.add(&e).ctx("write", &mpath)
        };
    copy_tree(&ctx, opts.jobs, |e| add(e, &mut mw))?;
    // pg_control last
    let pc = pgdata.join("global").join("pg_control");
    let f = std::fs::File::open(&pc).ctx("open", &pc)?;
    let e = copy_whole(&ctx, f, "global/pg_control", &pc, None)?;
    add(e, &mut mw)?;
    progress.finish();

    log::debug!("stopping the backup");
    let stop = sess.backup_stop(opts.archive_timeout)?;
    log::debug!("stopped at {}", stop.lsn);
    // every page was read before the stop: one beyond it is damaged
    ctx.check_page_lsns(stop.lsn)?;
    put_deferred(catalog, &key, "backup_label", stop.labelfile.as_bytes())?;
    if !stop.spcmapfile.is_empty() {
        // Covered by the manifest (size and CRC, like every stored file) so that validate
        // and restore detect damage; the copy beside the manifest is what older walnut
        // versions read.
        let map = stop.spcmapfile.as_bytes();
        let e = FileEntry {
            storage: Storage::Full,
            size: map.len() as u64,
            stored_size: map.len() as u64,
            crc32c: crc32c::crc32c(map),
            ..FileEntry::dir(crate::restore::plan::SPCMAP_ENTRY.to_string())
        };
        put_deferred(catalog, &key, &e.stored_path(), map)?;
        add(e, &mut mw)?;
        put_deferred(catalog, &key, "tablespace_map", map)?;
    }
    let (rt, xid) = sess.now_and_next_xid()?;
    // Every segment from the start to the one holding the last byte before the stop LSN
    // must be in the archive (a stop LSN on a segment boundary needs the previous segment).
    let last = Lsn(stop.lsn.0.saturating_sub(1)).segno(seg_size);
    let remaining = opts
        .archive_timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_secs(10));
    for segno in start_lsn.segno(seg_size)..=last {
        let seg = WalFileName::segment(tli, segno, seg_size);
        wait_archived(archive, &seg, remaining)?;
    }
    let mw_out = mw.finish().ctx("write", &mpath)?;
    let obj = mw_out
        .into_inner()
        .map_err(|e| Error::io("write", &mpath, e.into_error()))?;
    obj.commit(Durability::Deferred)?;
    catalog.repo().barrier()?;

    m.stop_lsn = Some(stop.lsn);
    m.files = files;
    m.data_bytes = bytes;
    m.recovery_time = Some(meta::format_utc(rt));
    m.recovery_epoch = Some(rt);
    m.recovery_xid = Some(xid);
    m.end_time = Some(meta::format_utc(now_secs()));
    m.status = Status::Ok;
    m.pid = None;
    // the commit record: written once, after everything above is durable
    meta::save_complete(catalog, m)?;
    log::info!(
        "backup {} completed: {} files, {} MiB, start {} stop {} in {:.1} s",
        m.id,
        files,
        bytes >> 20,
        start_lsn,
        stop.lsn,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn wait_archived(archive: &WalArchive, seg: &WalFileName, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if archive.is_archived(seg)? {
            return Ok(());
        }
        if t0.elapsed() >= timeout {
            return Err(Error::not_found(format!(
                "WAL segment {seg} was not archived within {} s (check archive_command and pg_stat_archiver)",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
