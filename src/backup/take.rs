//! Taking a backup: checks, start (the started marker), parent choice ([`plan`]), copy,
//! stop, and the commit record (backup.json, written once).

use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use super::meta::{self, BackupMeta, ChangeSource, Mode, Status};
use super::plan;
use super::stream::{StreamJob, StreamOutcome, StreamShared};
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
    /// STREAM: the WAL from start to stop streamed into the backup (see [`super::stream`]).
    pub stream: bool,
    /// The data directory to copy instead of the server's `data_directory` as reported by
    /// it (e.g. a standby's as seen from this host); it must be the server's.
    pub pgdata: Option<std::path::PathBuf>,
    /// `-b summary`: a PAGE backup (`mode` is [`Mode::Page`]) whose change map comes from
    /// the server's WAL summaries ([`super::summary`]) instead of walnut's WAL index.
    pub summary: bool,
    pub conn: crate::server::ConnParams,
    /// Where the copy reports its progress.
    pub progress: Arc<dyn Progress>,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        + crate::lifecycle::records::test_clock_offset()
}

/// Takes a backup; returns its metadata (status OK). The backup is a started marker, its
/// files and, once all is durable, its metadata (see [`meta`]). On failure after the start,
/// a dated ERROR status record is written and the error returned; the files stay (only the
/// lifecycle commands delete).
pub fn take_backup(catalog: &Catalog, instance: &str, opts: &BackupOptions) -> Result<BackupMeta> {
    let cfg = catalog.instance(instance)?;
    let mut sess = server::connect(&opts.conn, &cfg)?;
    let standby = sess.check_backup(&cfg, catalog.root(), opts.stream)?;
    let archive = WalArchive::open(catalog, instance)?;
    let pgdata = data_dir(&mut sess, opts.pgdata.as_deref())?;
    let control = ControlFile::read_from_pgdata(&pgdata)?;
    if control.system_id != cfg.system_id {
        return Err(Error::invalid(format!(
            "data directory \"{}\" belongs to system {}, not instance \"{instance}\"",
            pgdata.display(),
            control.system_id
        )));
    }
    if opts.summary {
        if opts.mode != Mode::Page {
            return Err(Error::invalid(
                "a summary backup is a PAGE backup whose change map comes from WAL summaries",
            ));
        }
        // before anything is written
        super::summary::check_server(&mut sess)?;
    }
    // held for the whole run: the WAL this backup needs is not purged meanwhile
    let _wal_lock = crate::lifecycle::locks::wal_shared(catalog, instance)?;
    let list = meta::list(catalog, instance)?;
    if opts.summary {
        // A gap in the summaries already written fails the backup before anything is
        // written (the parent is chosen again, and everything checked, once started).
        if let Ok(history) = archive.timeline_history(control.timeline) {
            if let Ok(p) = plan::choose_parent(
                &list,
                opts.parent.as_deref(),
                &history,
                control.timeline,
                cfg.system_id,
                opts.mode,
            ) {
                super::summary::precheck(
                    &mut sess,
                    &pgdata,
                    &history,
                    control.timeline,
                    p.start_lsn,
                )?;
            }
        }
    }
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
        stream: opts.stream,
        from_standby: standby,
        change_source: opts.summary.then_some(ChangeSource::Summary),
        block_crcs: None,
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

/// The data directory to copy: the server's own, or `given`, which must be the same
/// directory (a backup copies the files of the server it starts and stops).
fn data_dir(
    sess: &mut server::Session,
    given: Option<&std::path::Path>,
) -> Result<std::path::PathBuf> {
    let reported = std::path::PathBuf::from(sess.data_directory()?);
    let Some(given) = given else {
        return Ok(reported);
    };
    let canon = |p: &std::path::Path| std::fs::canonicalize(p).ctx("resolve", p);
    let g = canon(given)?;
    match canon(&reported) {
        Ok(r) if r == g => Ok(g),
        Ok(r) => Err(Error::invalid(format!(
            "--pgdata \"{}\" is not the data directory of the server connected to (\"{}\"): \
             a backup copies the files of the server it runs on",
            given.display(),
            r.display()
        ))),
        // The server's path is not visible here (another mount namespace): trust the
        // given one; its pg_control's system identifier is still checked.
        Err(_) => Ok(g),
    }
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

/// Every database's OID and name, as the server lists them.
fn database_map(sess: &mut server::Session) -> Result<Vec<crate::restore::partial::Database>> {
    let rows = sess.client().query(
        "select oid::int8, datname::text from pg_database order by oid",
        &[],
    )?;
    let mut v = Vec::with_capacity(rows.len());
    for r in rows {
        let oid: i64 = r.get(0);
        v.push(crate::restore::partial::Database {
            oid: u32::try_from(oid)
                .map_err(|_| Error::server(format!("pg_database lists oid {oid}")))?,
            name: r.get(1),
        });
    }
    Ok(v)
}

/// The slot name of a STREAM backup: `walnut_backup_` and the id's letters and digits.
fn slot_name(id: &str) -> String {
    let tail: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    format!("walnut_backup_{tail}")
}

/// Where a STREAM backup starts streaming: the start segment, or for a PAGE backup the
/// first segment since its parent's start that the archive lacks (the server may still
/// have it in `pg_wal`; the stream then puts it into the archive, so the change map can be
/// built without `archive_command`).
fn stream_from(
    archive: &WalArchive,
    history: &[crate::archive::HistoryEntry],
    tli: crate::types::TimeLineId,
    parent_start: Option<Lsn>,
    start: Lsn,
    seg_size: u32,
) -> Result<u64> {
    let first = start.segno(seg_size);
    let Some(ps) = parent_start else {
        return Ok(first);
    };
    for segno in ps.segno(seg_size)..first {
        if plan::timeline_of_segment(history, tli, segno, seg_size) != tli {
            continue; // an older timeline's: only the archive can have it
        }
        if !archive.is_archived(&WalFileName::segment(tli, segno, seg_size))? {
            return Ok(segno);
        }
    }
    Ok(first)
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
    // STREAM: the temporary slot is created before the backup starts, so the server keeps
    // every segment from the start on (it goes with the connection).
    let repl = if opts.stream {
        let cfg = catalog.instance(&m.instance)?;
        let rc = server::repl_config(&opts.conn, &cfg);
        let mut conn = crate::replication::ReplConnection::connect(&rc)?;
        let id = conn.identify_system()?;
        if id.system_id != m.system_id {
            return Err(Error::invalid(format!(
                "the replication connection to {} reaches system {}, not instance \"{}\"'s {}",
                conn.endpoint(),
                id.system_id,
                m.instance,
                m.system_id
            )));
        }
        let slot = slot_name(&m.id);
        conn.create_physical_slot(&slot, true, true)?;
        Some((conn, slot))
    } else {
        None
    };
    let start_lsn = sess.backup_start(&format!("walnut backup {}", m.id))?;
    // A standby promoted before pg_backup_start ran gave a primary's backup, which
    // pg_backup_stop would not refuse; one promoted later is refused by pg_backup_stop.
    if m.from_standby && !sess.in_recovery()? {
        return Err(Error::server(
            "the standby was promoted (it is no longer in recovery) before the backup started; \
             take the backup again",
        ));
    }
    let tli = sess.checkpoint_timeline()?;
    m.start_lsn = start_lsn;
    m.timeline = tli;
    let seg_size = m.wal_segment_size;
    let key = m.key()?;

    let parent = if m.mode == Mode::Full {
        None
    } else {
        let history = archive_or_server_history(archive, tli)?;
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
        Some((parent.clone(), history))
    };
    // the parent chain is locked for use (a delete or merge of it is refused) and checked
    // to be still as planned
    let _chain_lock = match &parent {
        Some((p, _)) => Some(crate::lifecycle::locks::use_chain(
            catalog,
            &m.instance,
            &meta::chain(list, &p.id)?,
            true,
            "backup",
        )?),
        None => None,
    };

    let shared = StreamShared::default();
    let job = match repl {
        Some((conn, slot)) => {
            let empty = Vec::new();
            let history = parent.as_ref().map(|(_, h)| h).unwrap_or(&empty);
            let from_seg = stream_from(
                archive,
                history,
                tli,
                parent
                    .as_ref()
                    .filter(|_| m.mode == Mode::Page && !opts.summary)
                    .map(|(p, _)| p.start_lsn),
                start_lsn,
                seg_size,
            )?;
            Some(StreamJob {
                conn,
                slot,
                tli,
                from: Lsn(from_seg * seg_size as u64),
                first_in_backup: start_lsn.segno(seg_size),
                seg_size,
                repo: catalog.repo(),
                key: key.clone(),
                compress: opts.compress,
                archive,
                timeout: opts.archive_timeout,
            })
        }
        None => None,
    };
    let shared = &shared;
    std::thread::scope(|s| {
        let mut handle = job.map(|job| s.spawn(move || super::stream::run(job, shared)));
        let r = copy_and_stop(
            catalog,
            archive,
            sess,
            pgdata,
            m,
            opts,
            &key,
            parent,
            &mut handle,
            shared,
            started,
        );
        let Err(e) = r else { return Ok(()) };
        let stream_failed_first = shared.failed.load(Ordering::SeqCst);
        shared.abort.store(true, Ordering::SeqCst);
        match handle.map(|h| h.join()) {
            // the stream's error is the cause
            Some(Ok(Err(se))) if stream_failed_first => {
                Err(se.context("streaming the backup's WAL"))
            }
            _ => Err(e),
        }
    })
}

/// The history of timeline `tli`: from the archive (a STREAM backup's stream puts it
/// there too; a PAGE backup needs it before its stream runs, so a missing one is an
/// error as before).
fn archive_or_server_history(
    archive: &WalArchive,
    tli: crate::types::TimeLineId,
) -> Result<Vec<crate::archive::HistoryEntry>> {
    archive.timeline_history(tli)
}

type StreamHandle<'s> = std::thread::ScopedJoinHandle<'s, Result<StreamOutcome>>;

#[allow(clippy::too_many_arguments)]
fn copy_and_stop(
    catalog: &Catalog,
    archive: &WalArchive,
    sess: &mut server::Session,
    pgdata: &std::path::Path,
    m: &mut BackupMeta,
    opts: &BackupOptions,
    key: &str,
    parent: Option<(BackupMeta, Vec<crate::archive::HistoryEntry>)>,
    stream: &mut Option<StreamHandle<'_>>,
    shared: &StreamShared,
    started: Instant,
) -> Result<()> {
    let start_lsn = m.start_lsn;
    let tli = m.timeline;
    let seg_size = m.wal_segment_size;
    let standby = m.from_standby;
    let copy_plan = match parent {
        None => CopyPlan::Full,
        Some((parent, history)) => {
            m.parent_id = Some(parent.id.clone());
            m.parent_start_lsn = Some(parent.start_lsn);
            let mut parent_files = HashSet::new();
            super::stored::read_manifest(catalog.repo(), &parent.key()?, |e| {
                if e.storage != Storage::Dir {
                    parent_files.insert(e.path);
                }
                Ok(())
            })?;
            if opts.summary {
                // The summarizer must have written the summary that ends at our start (the
                // redo point of pg_backup_start's checkpoint).
                super::summary::wait_summarized(sess, start_lsn, opts.archive_timeout)?;
                let change =
                    super::summary::change_map(pgdata, &history, tli, parent.start_lsn, start_lsn)?;
                CopyPlan::Page {
                    parent_start: parent.start_lsn,
                    parent_files,
                    change,
                }
            } else if m.mode == Mode::Page {
                // The segment holding our start LSN must be complete and indexed: records
                // between the start-of-backup segment switch and the redo point count. A
                // standby cannot switch: its primary finishes the segment.
                let seg = WalFileName::segment(tli, start_lsn.segno(seg_size), seg_size);
                if standby {
                    log::info!(
                        "waiting for WAL segment {seg} (holding the start LSN {start_lsn}) to be archived{}: a standby cannot switch WAL, its primary must finish the segment",
                        if opts.stream { " or streamed" } else { "" }
                    );
                } else {
                    sess.switch_wal()?;
                }
                log::debug!("waiting for the start segment");
                let want_tail = (standby && stream.is_some()).then_some(start_lsn);
                let tail =
                    wait_archived_or_tail(archive, &seg, want_tail, opts.archive_timeout, shared)?;
                // The start segment being archived does not mean the older ones are:
                // walnut-archive's look-ahead pushes segments in parallel.
                wait_older_ready_segments(
                    archive,
                    pgdata,
                    &history,
                    tli,
                    parent.start_lsn,
                    start_lsn,
                    seg_size,
                    opts.archive_timeout,
                    shared,
                )?;
                let tail = match tail {
                    Some((segno, bytes)) => Some(super::stream::index_tail(
                        tli, segno, &bytes, start_lsn, seg_size,
                    )?),
                    None => None,
                };
                log::debug!("start segment {seg} available; building the change map");
                let change = plan::change_map_with_tail(
                    archive,
                    &history,
                    tli,
                    parent.start_lsn,
                    start_lsn,
                    seg_size,
                    tail,
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
        }
    };
    log::debug!("copying {}", pgdata.display());

    let total = sess.total_size().unwrap_or(0);
    let progress = &*opts.progress;
    progress.start(&format!("backup {}", m.id), total);
    // block checksums of an uncompressed backup (see format/blockcrc.rs), written beside
    // the stored files and committed before backup.json
    let block_crc_out = if opts.compress {
        None
    } else {
        let w = create(catalog, key, crate::format::blockcrc::FILE_NAME)?;
        let p = std::path::PathBuf::from(w.describe());
        Some(Mutex::new(
            crate::format::blockcrc::Writer::new(BufWriter::new(w), m.block_size)
                .ctx("write", &p)?,
        ))
    };
    let mut ctx = CopyCtx {
        pgdata: pgdata.to_path_buf(),
        repo: catalog.repo(),
        key: key.to_string(),
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
        block_crcs: block_crc_out,
    };
    // Stored files are committed deferred (thousands of them, no per-file fsync); one
    // barrier makes them durable before the completion record.
    let mw_obj = create(catalog, key, "manifest")?;
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
    // pg_control last: on a standby its minRecoveryPoint is where the copy is consistent
    // (walnut never rewrites it, so it never has to rewrite minRecoveryPointTLI either)
    let pc = pgdata.join("global").join("pg_control");
    let f = std::fs::File::open(&pc).ctx("open", &pc)?;
    let e = copy_whole(&ctx, f, "global/pg_control", &pc, None)?;
    add(e, &mut mw)?;
    progress.finish();
    if let Some(w) = ctx.block_crcs.take() {
        m.block_crcs = Some(super::copy::finish_block_crcs(w, &m.id)?);
    }

    log::debug!("stopping the backup");
    // On a standby, pg_backup_stop fails if the standby was promoted meanwhile, and
    // returns the standby's minimum recovery point: where the last record it needs *ends*.
    let stop = sess.backup_stop(opts.archive_timeout)?;
    log::debug!("stopped at {}", stop.lsn);
    if standby && sess.checkpoint_timeline()? != tli {
        return Err(Error::server(format!(
            "the standby changed timeline during the backup (promoted?): started on timeline {tli}"
        )));
    }
    // every page was read before the stop: one beyond it is damaged
    ctx.check_page_lsns(stop.lsn)?;
    put_deferred(catalog, key, "backup_label", stop.labelfile.as_bytes())?;
    // The databases' names and OIDs, for partial restore (restore/partial.rs).
    let dbs = database_map(sess)?;
    put_deferred(
        catalog,
        key,
        crate::restore::partial::DATABASES_FILE,
        &crate::restore::partial::encode(&dbs)?,
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
        put_deferred(catalog, key, &e.stored_path(), map)?;
        add(e, &mut mw)?;
        put_deferred(catalog, key, "tablespace_map", map)?;
    }
    let (rt, xid) = sess.now_and_next_xid()?;
    match stream.take() {
        Some(h) => {
            // The backup's WAL comes with it: no wait for the archive.
            shared.stop.store(stop.lsn.0, Ordering::SeqCst);
            let out = h
                .join()
                .unwrap_or_else(|_| Err(Error::invalid("the WAL stream thread panicked")))
                .map_err(|e| e.context("streaming the backup's WAL"))?;
            log::debug!("streamed {} WAL files up to {}", out.entries.len(), out.end);
            for e in out.entries {
                add(e, &mut mw)?;
            }
        }
        None => {
            // Every segment from the start to the one holding the last byte before the stop
            // LSN must be in the archive (a stop LSN on a segment boundary needs the
            // previous segment; on a standby the record *ending* at the stop LSN is the
            // last one needed, never one starting there).
            let last = Lsn(stop.lsn.0.saturating_sub(1)).segno(seg_size);
            let remaining = opts
                .archive_timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(10));
            if standby {
                log::info!(
                    "waiting up to {} s for WAL segment {} (holding the stop LSN {}) to be archived: a standby cannot switch WAL, its primary must finish the segment",
                    remaining.as_secs(),
                    WalFileName::segment(tli, last, seg_size),
                    stop.lsn
                );
            }
            for segno in start_lsn.segno(seg_size)..=last {
                let seg = WalFileName::segment(tli, segno, seg_size);
                wait_archived(archive, &seg, remaining, shared)?;
            }
        }
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
    // (moved with the clock in tests, see records::CLOCK_OFFSET_ENV)
    let rt = rt + crate::lifecycle::records::test_clock_offset();
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

/// Waits for the segments from `from`'s up to (not including) `to`'s that the server still
/// has to archive (a `.ready` status file in `pg_wal/archive_status`). One neither archived
/// nor pending is left for the change map to report as missing, at once.
#[allow(clippy::too_many_arguments)]
fn wait_older_ready_segments(
    archive: &WalArchive,
    pgdata: &std::path::Path,
    history: &[crate::archive::HistoryEntry],
    tli: crate::types::TimeLineId,
    from: Lsn,
    to: Lsn,
    seg_size: u32,
    timeout: Duration,
    shared: &StreamShared,
) -> Result<()> {
    let t0 = Instant::now();
    let status = pgdata.join("pg_wal").join("archive_status");
    for segno in from.segno(seg_size)..to.segno(seg_size) {
        let seg_tli = plan::timeline_of_segment(history, tli, segno, seg_size);
        let name = WalFileName::segment(seg_tli, segno, seg_size);
        if archive.is_archived(&name)? {
            continue;
        }
        let ready = status.join(format!("{name}.ready"));
        if std::fs::symlink_metadata(&ready).is_err() {
            continue;
        }
        log::debug!("waiting for {name}: the server has yet to archive it");
        wait_archived(archive, &name, timeout.saturating_sub(t0.elapsed()), shared)?;
    }
    Ok(())
}

/// Waits until `seg` is archived ([`wait_archived_or_tail`] without a tail).
fn wait_archived(
    archive: &WalArchive,
    seg: &WalFileName,
    timeout: Duration,
    shared: &StreamShared,
) -> Result<()> {
    wait_archived_or_tail(archive, seg, None, timeout, shared).map(|_| ())
}

/// Waits until `seg` is archived (`Ok(None)`). With `tail = Some(start)` (the start
/// segment of a STREAM PAGE backup from a standby), the stream is asked for the segment's
/// streamed bytes up to `start` as well, and they do instead while the segment is not
/// complete (`Ok(Some((segno, bytes)))`). Fails when the stream fails, or after `timeout`.
fn wait_archived_or_tail(
    archive: &WalArchive,
    seg: &WalFileName,
    tail: Option<Lsn>,
    timeout: Duration,
    shared: &StreamShared,
) -> Result<Option<(u64, Vec<u8>)>> {
    let t0 = Instant::now();
    if let Some(start) = tail {
        shared.tail_request.store(start.0, Ordering::SeqCst);
    }
    loop {
        if tail.is_some() {
            if let Some(t) = shared.take_tail() {
                return Ok(Some(t));
            }
        }
        if archive.is_archived(seg)? {
            if tail.is_some() {
                shared.tail_request.store(0, Ordering::SeqCst);
            }
            return Ok(None);
        }
        if shared.failed.load(Ordering::SeqCst) {
            // the stream's own error is reported when it is joined
            return Err(Error::server(format!(
                "WAL streaming failed while waiting for {seg}"
            )));
        }
        if t0.elapsed() >= timeout {
            let secs = timeout.as_secs();
            return Err(Error::not_found(match tail {
                Some(start) => format!(
                    "the WAL up to the start LSN {start} (segment {seg}) was not streamed within {secs} s"
                ),
                None => format!(
                    "WAL segment {seg} was not archived within {secs} s (check archive_command and pg_stat_archiver)"
                ),
            }));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_valid_replication_slot_names() {
        for id in ["TPAD29", "TPAD29-2", "x"] {
            let s = slot_name(id);
            crate::replication::check_slot_name(&s).unwrap();
            assert!(s.starts_with("walnut_backup_"), "{s}");
        }
        assert_eq!(slot_name("TPAD29-2"), "walnut_backup_tpad292");
    }
}

/// What `walnut backup --dry-run` predicts (JSON keys are a contract for scripts).
#[derive(Clone, Debug, serde::Serialize)]
pub struct DryRun {
    /// "FULL" or "PAGE".
    pub mode: String,
    pub parent_id: Option<String>,
    /// Files the backup would store (directories not counted), as `files` in `show`.
    pub files: u64,
    /// Bytes it would store, as `data_bytes` in `show` (uncompressed; with --compress
    /// lz4 an upper bound).
    pub data_bytes: u64,
    /// The WAL range the prediction covers: the parent's start to the server's current
    /// WAL insert position.
    pub from_lsn: Option<String>,
    pub to_lsn: String,
    /// Segments read from the server's pg_wal (not archived, or not indexed, yet).
    pub segments_from_pg_wal: u64,
    pub compressed: bool,
}

/// Predicts a FULL or PAGE backup of the server now: the files and bytes it would store,
/// from the merged block indexes of the archive (and, for the WAL the archive does not
/// hold yet, the server's pg_wal decoded in memory), without starting a backup or writing
/// anything (a read-only connection: no pg_backup_start, no WAL switch, no index
/// repaired in the archive).
pub fn dry_run(catalog: &Catalog, instance: &str, opts: &BackupOptions) -> Result<DryRun> {
    let cfg = catalog.instance(instance)?;
    let mut sess = server::connect(&opts.conn, &cfg)?;
    let sysid = sess.system_identifier()?;
    if sysid != cfg.system_id {
        return Err(Error::invalid(format!(
            "the server's system identifier {sysid} is not instance \"{instance}\"'s {}",
            cfg.system_id
        )));
    }
    // nothing this session runs may write
    sess.client()
        .batch_execute("set default_transaction_read_only = on")?;
    if sess.in_recovery()? {
        return Err(Error::invalid(
            "--dry-run needs the primary (a standby's WAL position is not where a backup of it would start)",
        ));
    }
    let pgdata = data_dir(&mut sess, opts.pgdata.as_deref())?;
    let control = ControlFile::read_from_pgdata(&pgdata)?;
    if control.system_id != cfg.system_id {
        return Err(Error::invalid(format!(
            "data directory \"{}\" belongs to system {}, not instance \"{instance}\"",
            pgdata.display(),
            control.system_id
        )));
    }
    let row = sess.client().query_one(
        "select pg_current_wal_insert_lsn()::text, pg_current_wal_lsn()::text, \
                (select timeline_id from pg_control_checkpoint())",
        &[],
    )?;
    let insert: Lsn = row.get::<_, String>(0).parse()?;
    let written: Lsn = row.get::<_, String>(1).parse()?;
    let tli: crate::types::TimeLineId = row.get::<_, i32>(2) as u32;
    let seg_size = control.wal_segment_size;
    let archive = WalArchive::open(catalog, instance)?;
    let list = meta::list(catalog, instance)?;
    let (plan, parent_id, from, from_pg_wal) = match opts.mode {
        Mode::Full => (super::copy::CopyPlan::Full, None, None, 0),
        Mode::Delta => {
            return Err(Error::invalid(
                "--dry-run predicts FULL and PAGE backups (a DELTA backup's size depends on every page's LSN: it must read them all)",
            ))
        }
        Mode::Page => {
            let history = archive.timeline_history(tli)?;
            let parent = plan::choose_parent(
                &list,
                opts.parent.as_deref(),
                &history,
                tli,
                cfg.system_id,
                Mode::Page,
            )?;
            let (change, n) =
                dry_change_map(&archive, &pgdata, &history, tli, parent.start_lsn, written, seg_size)?;
            let mut parent_files = HashSet::new();
            super::stored::read_manifest(catalog.repo(), &parent.key()?, |e| {
                if e.storage != Storage::Dir {
                    parent_files.insert(e.path);
                }
                Ok(())
            })?;
            (
                super::copy::CopyPlan::Page {
                    parent_start: parent.start_lsn,
                    parent_files,
                    change,
                },
                Some(parent.id.clone()),
                Some(parent.start_lsn),
                n,
            )
        }
    };
    let progress = crate::progress::NoProgress;
    let ctx = CopyCtx {
        pgdata: pgdata.clone(),
        repo: catalog.repo(),
        key: String::new(),
        plan,
        compress: opts.compress,
        block_size: control.block_size,
        relseg_size: control.relseg_size,
        checksums: control.data_checksums(),
        start_lsn: insert,
        progress: &progress,
        abort: AtomicBool::new(false),
        newest_lsn: AtomicU64::new(insert.0),
        newest_page: Mutex::new(None),
        block_crcs: None,
    };
    let (mut files, mut bytes) = super::copy::predict_tree(&ctx)?;
    // pg_control, copied last
    let pc = pgdata.join("global").join("pg_control");
    files += 1;
    bytes += std::fs::metadata(&pc).ctx("stat", &pc)?.len();
    // the tablespace map pg_backup_stop returns: "<oid> <location>\n" per tablespace
    let spc = pgdata.join("pg_tblspc");
    let mut map = 0u64;
    if let Ok(rd) = std::fs::read_dir(&spc) {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                map += e.file_name().len() as u64 + 2 + t.as_os_str().len() as u64;
            }
        }
    }
    if map > 0 {
        files += 1;
        bytes += map;
    }
    Ok(DryRun {
        mode: opts.mode.to_string(),
        parent_id,
        files,
        data_bytes: bytes,
        from_lsn: from.map(|l| l.to_string()),
        to_lsn: insert.to_string(),
        segments_from_pg_wal: from_pg_wal,
        compressed: opts.compress,
    })
}

/// The change map from `from` to `to` (the server's write position) without writing: the
/// archive's indexes while they are complete, then the rest of the WAL decoded in memory,
/// from the server's pg_wal (or the archive, for an archived segment without a usable
/// index). Returns it and how many segments were decoded here.
fn dry_change_map(
    archive: &WalArchive,
    pgdata: &std::path::Path,
    history: &[crate::archive::HistoryEntry],
    cur: crate::types::TimeLineId,
    from: Lsn,
    to: Lsn,
    seg_size: u32,
) -> Result<(crate::index::merge::ChangeMap, u64)> {
    use crate::archive::IndexState;
    let first = from.segno(seg_size);
    // `to` is the first byte not written yet: when it starts a segment (right after a WAL
    // switch), that segment holds nothing of the range and is not read
    let last = if to > from && to.segment_offset(seg_size) == 0 {
        to.segno(seg_size) - 1
    } else {
        to.segno(seg_size)
    };
    let mut indexes = Vec::new();
    let mut segno = first;
    while segno <= last {
        let tli = plan::timeline_of_segment(history, cur, segno, seg_size);
        match archive.index_state(tli, segno)? {
            IndexState::Indexed(ix) => indexes.push(ix),
            _ => break,
        }
        segno += 1;
    }
    let decoded = (last + 1).saturating_sub(segno);
    if segno <= last {
        let mut ix = crate::index::build::StreamIndexer::new(cur);
        for s in segno..=last {
            let tli = plan::timeline_of_segment(history, cur, s, seg_size);
            let name = WalFileName::segment(tli, s, seg_size);
            if tli != cur {
                return Err(Error::not_found(format!(
                    "WAL segment {name} of an earlier timeline has no usable block index in the archive: a PAGE backup now would fail; take a DELTA or FULL backup"
                )));
            }
            let local = pgdata.join("pg_wal").join(name.to_string());
            let mut data = match std::fs::read(&local) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    archive.read_opt(&name)?.ok_or_else(|| {
                        Error::not_found(format!(
                            "WAL segment {name} is neither in the archive nor in \"{}\": a PAGE backup now would fail; take a DELTA or FULL backup",
                            local.display()
                        ))
                    })?
                }
                Err(e) => return Err(Error::io("read", &local, e)),
            };
            if s == last {
                // beyond the write position: not written yet (a recycled file's old bytes)
                let off = to.segment_offset(seg_size) as usize;
                if let Some(tail) = data.get_mut(off..) {
                    tail.fill(0);
                }
            }
            ix.feed_segment(s, &data)?;
        }
        // the last record may be incomplete: its blocks are missed, as they would be
        // beyond a backup's start
        indexes.extend(ix.finish()?);
    }
    let map = crate::index::merge::merge(indexes.iter());
    if map.wal_level_minimal {
        return Err(Error::invalid(format!(
            "WAL between {from} and {to} was written with wal_level=minimal: a PAGE backup now would fail; take a FULL backup"
        )));
    }
    Ok((map, decoded))
}
