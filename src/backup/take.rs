//! Taking a backup: checks, parent choice, start, copy, stop, and the OK commit record.

use std::collections::HashSet;
use std::io::BufWriter;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::archive::WalArchive;
use crate::catalog::Catalog;
use crate::durable::{self, DurableFile, Replace};
use crate::error::{Error, IoContext, Result};
use crate::pgcontrol::ControlFile;
use crate::progress::Progress;
use crate::types::{Lsn, WalFileName};

use super::copy::{copy_tree, copy_whole, CopyCtx};
use super::meta::{self, BackupMeta, Mode, Status};
use super::plan;
use crate::format::manifest::{FileEntry, ManifestWriter, Storage};
use crate::server;

pub struct BackupOptions {
    pub mode: Mode,
    pub jobs: usize,
    pub compress: bool,
    pub parent: Option<String>,
    pub archive_timeout: Duration,
    pub conn: crate::server::ConnParams,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Takes a backup; returns its metadata (status OK). On failure after the backup directory
/// was created, the backup is marked ERROR, its partial data removed (only `backup.json`,
/// with the error, stays) and the error returned.
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
    durable::create_dir_all_durable(&catalog.backups_dir(instance))?;
    let start_secs = now_secs();
    // create-only: a concurrent backup never shares this directory
    let (id, dir) = meta::new_id(catalog, instance, start_secs)?;
    let mut m = BackupMeta {
        format: meta::META_FORMAT,
        id: id.clone(),
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
    m.save(catalog)?;
    log::info!(
        "backup {id} ({}) of instance \"{instance}\" started",
        opts.mode
    );
    match run(catalog, &archive, &mut sess, &pgdata, &list, &mut m, opts) {
        Ok(()) => Ok(m),
        Err(e) => {
            m.status = Status::Error;
            m.error = Some(e.to_string());
            m.end_time = Some(meta::format_utc(now_secs()));
            m.pid = None;
            match m.save(catalog) {
                // Only once the record says ERROR: the partial copy goes, so a failed
                // backup keeps no data in the catalog, only its record and error.
                Ok(()) => remove_partial_data(&dir),
                Err(se) => log::error!("could not mark backup {id} as ERROR: {se}"),
            }
            Err(e.context(format!("backup {id} failed")))
        }
    }
}

/// Removes everything but `backup.json` from a failed backup's directory (which this
/// process created, create-only). Never follows links (`remove_dir_all` does not). Failures
/// are logged: the record already says ERROR, so nothing here can look complete.
fn remove_partial_data(dir: &std::path::Path) {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            log::warn!(
                "could not list \"{}\" to remove its partial data: {e}",
                dir.display()
            );
            return;
        }
    };
    for ent in rd.flatten() {
        if ent.file_name() == meta::META_FILE {
            continue;
        }
        let p = ent.path();
        let r = match ent.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
            _ => std::fs::remove_file(&p),
        };
        if let Err(e) = r {
            log::warn!(
                "could not remove \"{}\" of a failed backup: {e}",
                p.display()
            );
        }
    }
    if let Err(e) = durable::fsync_dir(dir) {
        log::warn!("{e}");
    }
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

    // Parent: the newest OK backup on this timeline's history.
    let mut parent_files = HashSet::new();
    let mut change = None;
    let mut parent_start = Lsn::INVALID;
    if m.mode != Mode::Full {
        let history = archive.timeline_history(tli)?;
        let parent = match &opts.parent {
            Some(pid) => {
                let p = meta::find(list, pid)?;
                if p.effective_status() != Status::Ok {
                    return Err(Error::invalid(format!(
                        "backup {pid} has status {}; only OK backups can be parents",
                        p.effective_status()
                    )));
                }
                if !plan::on_history(&history, tli, p.timeline, p.start_lsn) {
                    return Err(Error::invalid(format!(
                        "backup {pid} (timeline {}, start {}) is not on the history of timeline {tli}",
                        p.timeline, p.start_lsn
                    )));
                }
                p
            }
            None => list
                .iter()
                .rev()
                .find(|b| {
                    b.effective_status() == Status::Ok
                        && b.system_id == m.system_id
                        && plan::on_history(&history, tli, b.timeline, b.start_lsn)
                })
                .ok_or_else(|| {
                    Error::not_found(format!(
                        "no OK backup on the history of timeline {tli} to be the parent of a {} backup; take a FULL backup",
                        m.mode
                    ))
                })?,
        };
        if start_lsn < parent.start_lsn {
            return Err(Error::invalid(format!(
                "the server's start LSN {start_lsn} is older than parent backup {}'s start {}: \
                 this is an instance from the past (restored from an older backup?); take a FULL backup",
                parent.id, parent.start_lsn
            )));
        }
        m.parent_id = Some(parent.id.clone());
        m.parent_start_lsn = Some(parent.start_lsn);
        parent_start = parent.start_lsn;
        crate::format::manifest::read_in(&parent.dir(catalog), |e| {
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
            change = Some(plan::change_map(
                archive,
                &history,
                tli,
                parent.start_lsn,
                start_lsn,
                seg_size,
            )?);
        }
    }
    m.save(catalog)?;
    log::debug!("copying {}", pgdata.display());

    let total = sess.total_size().unwrap_or(0);
    let progress = Progress::new(&format!("backup {}", m.id), total);
    let ctx = CopyCtx {
        pgdata: pgdata.to_path_buf(),
        out_dir: m.dir(catalog),
        mode: m.mode,
        compress: opts.compress,
        block_size: m.block_size,
        relseg_size: m.relseg_size,
        checksums: m.data_checksums,
        start_lsn,
        parent_start,
        parent_files,
        change,
        progress: &progress,
        abort: AtomicBool::new(false),
        newest_lsn: AtomicU64::new(start_lsn.0),
        newest_page: Mutex::new(None),
    };
    // Data files go in place without per-file fsyncs (thousands of them); this handle,
    // opened before any is written, syncs the filesystem before the OK record.
    let fs_sync = durable::FsSync::open(&m.dir(catalog))?;
    let mpath = m.dir(catalog).join("manifest");
    let mut mw = ManifestWriter::new(BufWriter::new(DurableFile::create(&mpath)?), opts.compress)
        .ctx("write", &mpath)?;
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut add = |e: FileEntry, mw: &mut ManifestWriter<BufWriter<DurableFile>>| -> Result<()> {
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
    let dir = m.dir(catalog);
    durable::write_file(
        &dir.join("backup_label"),
        stop.labelfile.as_bytes(),
        Replace::No,
    )?;
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
        durable::write_file(&dir.join(e.stored_path()), map, Replace::No)?;
        add(e, &mut mw)?;
        durable::write_file(&dir.join("tablespace_map"), map, Replace::No)?;
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
    let df = mw_out
        .into_inner()
        .map_err(|e| Error::io("write", &mpath, e.into_error()))?;
    df.commit(Replace::No)?;
    durable::fsync_dir(&dir)?;

    fs_sync.sync()?;

    m.stop_lsn = Some(stop.lsn);
    m.files = files;
    m.data_bytes = bytes;
    m.recovery_time = Some(meta::format_utc(rt));
    m.recovery_epoch = Some(rt);
    m.recovery_xid = Some(xid);
    m.end_time = Some(meta::format_utc(now_secs()));
    m.status = Status::Ok;
    m.pid = None;
    m.save(catalog)?;
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
