//! Copying a data directory into a backup: a streaming directory walk feeding `-j`
//! workers, with page verification and the FULL / PAGE / DELTA per-file decision.
//!
//! Memory stays bounded with millions of files: the walk holds one directory listing at a
//! time, jobs go through a bounded channel and manifest entries are streamed to disk.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::index::merge::ChangeMap;
use crate::index::MAIN_FORKNUM;
use crate::progress::Progress;
use crate::repo::{Durability, ObjectWriter, Repo};
use crate::types::Lsn;

use super::page::{check_page, is_all_zero, page_lsn, PageCheck};
use super::relfile::{self, RelFile};
use crate::format::blockcrc;
use crate::format::incfile::IncWriter;
use crate::format::manifest::{stored_path, FileEntry, Lz4Frames, Storage};

/// How many times a page that fails verification is re-read (a concurrent write may have
/// torn it) before it counts as corrupt.
const PAGE_RETRIES: u32 = 5;
const CHUNK_PAGES: usize = 128;

/// How the files of a backup are chosen against its parent.
pub enum CopyPlan {
    /// Every file whole.
    Full,
    /// Relation files the parent holds: the blocks the WAL says changed since the parent's
    /// start (`change`); everything else whole.
    Page {
        parent_start: Lsn,
        parent_files: HashSet<String>,
        change: ChangeMap,
    },
    /// Relation files the parent holds: every page with an LSN at or after the parent's
    /// start; everything else whole.
    Delta {
        parent_start: Lsn,
        parent_files: HashSet<String>,
    },
}

impl CopyPlan {
    fn parent_start(&self) -> Lsn {
        match self {
            CopyPlan::Full => Lsn::INVALID,
            CopyPlan::Page { parent_start, .. } | CopyPlan::Delta { parent_start, .. } => {
                *parent_start
            }
        }
    }
}

/// What the copy needs to know; shared read-only by the workers.
pub struct CopyCtx<'a> {
    pub pgdata: PathBuf,
    /// The catalog's store and the backup's key prefix: stored files go to `key/database/...`.
    pub repo: &'a dyn Repo,
    pub key: String,
    pub plan: CopyPlan,
    pub compress: bool,
    pub block_size: u32,
    pub relseg_size: u32,
    pub checksums: bool,
    pub start_lsn: Lsn,
    pub progress: &'a dyn Progress,
    pub abort: AtomicBool,
    /// The newest page LSN seen so far (starts at `start_lsn`; see [`CopyCtx::note_page_lsn`]).
    pub newest_lsn: AtomicU64,
    /// The page that carries `newest_lsn`, once one is newer than the start.
    pub newest_page: Mutex<Option<NewestPage>>,
    /// The backup's block checksums (uncompressed backups): every file stored whole or
    /// incremental adds its blocks' CRCs once it is stored.
    pub block_crcs: Option<Mutex<BlockCrcOut>>,
}

/// Where the copy writes the block checksums object.
pub type BlockCrcOut = blockcrc::Writer<BufWriter<Box<dyn ObjectWriter>>>;

/// Finishes the block checksums object of `backup` (a backup's or a merged FULL's) and
/// commits it (deferred: the caller's barrier makes it durable before `backup.json`);
/// returns what `backup.json` records of it.
pub fn finish_block_crcs(w: Mutex<BlockCrcOut>, backup: &str) -> Result<blockcrc::BlockCrcsRef> {
    let w = w
        .into_inner()
        .map_err(|_| Error::invalid("a copy thread panicked"))?;
    let bad = |e: std::io::Error| {
        Error::invalid(format!(
            "writing the block checksums of backup {backup}: {e}"
        ))
    };
    let (out, r) = w.finish().map_err(bad)?;
    out.into_inner()
        .map_err(|e| bad(e.into_error()))?
        .commit(Durability::Deferred)?;
    Ok(r)
}

impl CopyCtx<'_> {
    /// Whether stored files record their blocks' CRCs.
    fn wants_crcs(&self) -> bool {
        self.block_crcs.is_some() && !self.compress
    }

    /// Adds a file's block CRCs to the object.
    fn add_crcs(
        &self,
        logical: &str,
        f: impl FnOnce(&mut BlockCrcOut) -> std::io::Result<()>,
    ) -> Result<()> {
        let Some(m) = &self.block_crcs else {
            return Ok(());
        };
        let mut w = m
            .lock()
            .map_err(|_| Error::invalid("a copy thread panicked"))?;
        f(&mut w).map_err(|e| {
            Error::invalid(format!("writing the block checksums of \"{logical}\": {e}"))
        })
    }
}

/// The page with the newest LSN a backup read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewestPage {
    pub lsn: Lsn,
    pub logical: String,
    pub block: u32,
}

impl CopyCtx<'_> {
    /// Notes a page's LSN: one compare per page in the common case (not newer than every
    /// page seen so far).
    ///
    /// Why the newest one is all we need: PostgreSQL writes a page only after flushing the
    /// WAL up to its LSN (WAL before data), so every intact page read during the backup has
    /// an LSN at or below the WAL insert position at the time it was read, which is at or
    /// below the stop LSN (`pg_backup_stop` returns the end of its backup-end record,
    /// inserted after the last page was read). So if the newest page LSN is not beyond the
    /// stop LSN, none is; if it is, that page is damaged (a torn or garbage header WAL
    /// replay will never rewrite: recovery fails on it). Zero and new pages have LSN 0.
    #[inline]
    pub fn note_page_lsn(&self, lsn: Lsn, logical: &str, block: u32) {
        if lsn.0 <= self.newest_lsn.load(Ordering::Relaxed) {
            return;
        }
        self.note_newest(lsn, logical, block);
    }

    #[cold]
    fn note_newest(&self, lsn: Lsn, logical: &str, block: u32) {
        let Ok(mut g) = self.newest_page.lock() else {
            return;
        };
        if g.as_ref().is_none_or(|p| lsn > p.lsn) {
            *g = Some(NewestPage {
                lsn,
                logical: logical.to_string(),
                block,
            });
            self.newest_lsn.fetch_max(lsn.0, Ordering::Relaxed);
        }
    }

    /// Fails when a page read carries an LSN beyond `stop` (the backup's stop LSN), naming
    /// the file and block.
    pub fn check_page_lsns(&self, stop: Lsn) -> Result<()> {
        let newest = self
            .newest_page
            .lock()
            .map_err(|_| Error::invalid("a copy thread panicked"))?;
        match &*newest {
            Some(p) if p.lsn > stop => Err(Error::corruption(format!(
                "corrupt page in file \"{}\" block {}: page LSN {} is beyond the server's WAL insert position at backup stop {stop} (a damaged page header: WAL replay cannot restore it)",
                p.logical, p.block, p.lsn
            ))),
            _ => Ok(()),
        }
    }
}

struct Job {
    logical: String,
    abs: PathBuf,
}

/// Counts and CRCs the bytes written through it.
pub struct CrcWriter<W: Write> {
    inner: W,
    pub crc: u32,
    pub n: u64,
}

impl<W: Write> CrcWriter<W> {
    pub fn new(inner: W) -> CrcWriter<W> {
        CrcWriter {
            inner,
            crc: 0,
            n: 0,
        }
    }
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Decoded bytes per LZ4 frame of a compressed whole file: the restore decodes frames on
/// several threads, one chunk each (rebuild::CHUNK_BYTES).
pub const LZ4_FRAME_BYTES: u64 = 32 << 20;

/// Writes LZ4 frames of `frame_bytes` decoded bytes each (the last one the rest; at least
/// one frame, so an empty file is still a valid LZ4 file). Concatenated frames are one valid
/// stream for `lz4 -d` and for `lz4_flex::frame::FrameDecoder`.
pub struct Lz4FrameWriter<W: Write> {
    enc: Option<lz4_flex::frame::FrameEncoder<Counted<W>>>,
    /// The writer between frames.
    idle: Option<Counted<W>>,
    frame_bytes: u64,
    in_frame: u64,
    stored: Vec<u64>,
}

/// Counts the bytes written through it.
pub struct Counted<W: Write> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Lz4FrameWriter<W> {
    pub fn new(out: W, frame_bytes: u64) -> Lz4FrameWriter<W> {
        Lz4FrameWriter {
            enc: None,
            idle: Some(Counted { inner: out, n: 0 }),
            frame_bytes: frame_bytes.max(1),
            in_frame: 0,
            stored: Vec::new(),
        }
    }

    fn end_frame(&mut self) -> std::io::Result<()> {
        if let Some(enc) = self.enc.take() {
            let before: u64 = self.stored.iter().sum();
            let c = enc.finish().map_err(std::io::Error::other)?;
            self.stored.push(c.n - before);
            self.idle = Some(c);
            self.in_frame = 0;
        }
        Ok(())
    }

    /// Ends the last frame; returns the writer and each frame's stored length.
    pub fn finish(mut self) -> std::io::Result<(W, Vec<u64>)> {
        if self.enc.is_none() && self.stored.is_empty() {
            self.enc = self.idle.take().map(lz4_flex::frame::FrameEncoder::new);
        }
        self.end_frame()?;
        let c = self
            .idle
            .take()
            .ok_or_else(|| std::io::Error::other("LZ4 writer lost its output"))?;
        Ok((c.inner, self.stored))
    }
}

impl<W: Write> Write for Lz4FrameWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.enc.is_none() {
            self.enc = self.idle.take().map(lz4_flex::frame::FrameEncoder::new);
        }
        let take = (buf.len() as u64).min(self.frame_bytes - self.in_frame) as usize;
        let enc = self
            .enc
            .as_mut()
            .ok_or_else(|| std::io::Error::other("LZ4 writer lost its output"))?;
        enc.write_all(&buf[..take])?;
        self.in_frame += take as u64;
        if self.in_frame == self.frame_bytes {
            self.end_frame()?;
        }
        Ok(take)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match (&mut self.enc, &mut self.idle) {
            (Some(e), _) => e.flush(),
            (None, Some(c)) => c.flush(),
            (None, None) => Ok(()),
        }
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Copies the data directory (everything but `global/pg_control`) with `jobs` workers,
/// handing each manifest entry to `sink` in the calling thread.
pub fn copy_tree(
    ctx: &CopyCtx<'_>,
    jobs: usize,
    mut sink: impl FnMut(FileEntry) -> Result<()>,
) -> Result<()> {
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(1024);
    let job_rx = Mutex::new(job_rx);
    let (res_tx, res_rx) = mpsc::channel::<Result<Option<FileEntry>>>();
    let mut first_err: Option<Error> = None;
    std::thread::scope(|s| {
        {
            let res_tx = res_tx.clone();
            s.spawn(move || {
                if let Err(e) = walk(ctx, &job_tx, &res_tx) {
                    let _ = res_tx.send(Err(e));
                }
            });
        }
        for _ in 0..jobs.max(1) {
            let res_tx = res_tx.clone();
            let job_rx = &job_rx;
            s.spawn(move || loop {
                let job = match job_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => break,
                };
                let Ok(job) = job else { break };
                if ctx.abort.load(Ordering::Relaxed) {
                    continue;
                }
                let r = copy_file(ctx, &job)
                    .map_err(|e| e.context(format!("file \"{}\"", job.logical)));
                if res_tx.send(r).is_err() {
                    break;
                }
            });
        }
        drop(res_tx);
        for r in res_rx {
            let r = r.and_then(|e| match e {
                Some(e) => sink(e),
                None => Ok(()),
            });
            if let Err(e) = r {
                ctx.abort.store(true, Ordering::Relaxed);
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    });
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What [`copy_tree`] would store, without reading any file's contents or writing:
/// (files, stored bytes) of every regular file the walk hands out (`global/pg_control`,
/// which the taker copies last, not included). The choice per file is the copy's own
/// ([`choose_method`]); an incremental file's size is that of its changed blocks stored
/// whole. Exact for uncompressed backups; with compression, an upper bound.
pub fn predict_tree(ctx: &CopyCtx<'_>) -> Result<(u64, u64)> {
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(1024);
    let (res_tx, res_rx) = mpsc::channel::<Result<Option<FileEntry>>>();
    let bs = ctx.block_size;
    std::thread::scope(|s| {
        let walker = s.spawn(move || walk(ctx, &job_tx, &res_tx));
        let mut files = 0u64;
        let mut bytes = 0u64;
        for job in job_rx {
            let size = match std::fs::metadata(&job.abs) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", &job.abs, e)),
            };
            let rel = relfile::rel_file(&job.logical);
            files += 1;
            bytes += match choose_method(ctx, &job.logical, rel, size) {
                Method::Full | Method::Delta => size,
                Method::Blocks(blocks, _) => {
                    crate::format::incfile::whole_page_file_size(blocks.len() as u32, bs)
                }
            };
        }
        walker
            .join()
            .map_err(|_| Error::invalid("the directory walk panicked"))??;
        // a walk error sent as a result (e.g. an unreadable directory)
        for r in res_rx.try_iter() {
            r?;
        }
        Ok((files, bytes))
    })
}

fn walk(
    ctx: &CopyCtx<'_>,
    jobs: &mpsc::SyncSender<Job>,
    results: &mpsc::Sender<Result<Option<FileEntry>>>,
) -> Result<()> {
    let mut queue: VecDeque<(String, PathBuf)> = VecDeque::new();
    queue.push_back((String::new(), ctx.pgdata.clone()));
    // Directories are manifest entries only (a store has no directories); restore creates
    // them from the manifest.
    let send_dir = |logical: String| -> Result<()> {
        results
            .send(Ok(Some(FileEntry::dir(logical))))
            .map_err(|_| Error::invalid("backup aborted"))
    };
    while let Some((ldir, adir)) = queue.pop_front() {
        if ctx.abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        let rd = match std::fs::read_dir(&adir) {
            Ok(rd) => rd,
            // a database or tablespace dropped while we walk: WAL replay removes it too
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !ldir.is_empty() => continue,
            Err(e) => return Err(Error::io("read directory", &adir, e)),
        };
        let mut names = Vec::new();
        for e in rd {
            let e = e.ctx("read directory", &adir)?;
            names.push(e.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        let in_db = relfile::db_dir(&ldir).is_some();
        // unlogged relations: only the init fork is kept
        let unlogged: HashSet<u32> = if in_db {
            names
                .iter()
                .filter_map(|n| relfile::parse_rel_file_name(n))
                .filter(|r| r.fork == crate::index::INIT_FORKNUM)
                .map(|r| r.rel)
                .collect()
        } else {
            HashSet::new()
        };
        for name in names {
            if relfile::excluded_name(&name) {
                continue;
            }
            let top = ldir.is_empty();
            if top && relfile::excluded_top_file(&name) {
                continue;
            }
            let logical = join(&ldir, &name);
            if logical == "global/pg_control" {
                continue;
            }
            let abs = adir.join(&name);
            // lstat: a symbolic link is never followed unless it is one of the two kinds
            // PostgreSQL itself puts there (see `Entry`).
            let md = match std::fs::symlink_metadata(&abs) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", &abs, e)),
            };
            let kind = match classify(&ldir, &name, &abs, &md) {
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", &abs, e)),
            };
            if kind == Entry::Dir {
                send_dir(logical.clone())?;
                if top && relfile::excluded_dir_contents(&name) {
                    if name == "pg_wal" {
                        for sub in ["archive_status", "summaries"] {
                            if abs.join(sub).is_dir() {
                                send_dir(format!("pg_wal/{sub}"))?;
                            }
                        }
                    }
                    continue;
                }
                queue.push_back((logical, abs));
            } else if kind == Entry::File {
                if in_db {
                    if relfile::is_temp_relation(&name) {
                        continue;
                    }
                    if let Some(r) = relfile::parse_rel_file_name(&name) {
                        if r.fork != crate::index::INIT_FORKNUM && unlogged.contains(&r.rel) {
                            continue;
                        }
                    }
                }
                jobs.send(Job { logical, abs })
                    .map_err(|_| Error::invalid("backup aborted"))?;
            } else {
                skip_warning(&logical, &abs, &md);
            }
        }
    }
    Ok(())
}

/// What the walk does with a directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// A directory: recorded, and walked unless its contents are excluded.
    Dir,
    /// A regular file: copied.
    File,
    /// Anything else (a symbolic link that is not followed, a socket, a FIFO, a device):
    /// skipped with a warning.
    Skip,
}

/// The rules of PostgreSQL's `sendDir` (src/backend/backup/basebackup.c), which
/// pg_basebackup applies, for an entry `name` of the logical directory `ldir`, `md` being
/// its lstat:
/// - a symbolic link directly in `pg_tblspc` is a tablespace: followed;
/// - `pg_wal` and the directories whose contents are excluded (`pg_stat_tmp`, ...) are
///   stored as (empty) directories even when they are links (`convert_link_to_directory`);
/// - every other symbolic link is skipped (pg_basebackup: "skipping special file"), so a
///   link is never followed into a loop (`PGDATA/loop -> .`) or out of the data directory;
///   nor are sockets, FIFOs and devices copied.
fn classify(ldir: &str, name: &str, abs: &Path, md: &std::fs::Metadata) -> std::io::Result<Entry> {
    let ft = md.file_type();
    if ft.is_dir() {
        return Ok(Entry::Dir);
    }
    if ft.is_file() {
        return Ok(Entry::File);
    }
    if !ft.is_symlink() {
        return Ok(Entry::Skip);
    }
    let top_kept_empty = ldir.is_empty() && relfile::excluded_dir_contents(name);
    if top_kept_empty {
        return Ok(Entry::Dir);
    }
    if ldir == "pg_tblspc" {
        // a tablespace: what the link points to must be a directory
        return Ok(if std::fs::metadata(abs)?.is_dir() {
            Entry::Dir
        } else {
            Entry::Skip
        });
    }
    Ok(Entry::Skip)
}

fn skip_warning(logical: &str, abs: &Path, md: &std::fs::Metadata) {
    if md.file_type().is_symlink() {
        let to = std::fs::read_link(abs)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|e| format!("(unreadable: {e})"));
        log::warn!(
            "skipping symbolic link \"{logical}\" -> \"{to}\": only tablespace links in pg_tblspc and pg_wal are followed (as pg_basebackup does); it is not in the backup"
        );
    } else {
        log::warn!("skipping special file \"{logical}\" (not a regular file or directory)");
    }
}

/// How one file is stored.
enum Method {
    Full,
    /// PAGE: these file-relative blocks, and the limit block.
    Blocks(Vec<u32>, Option<u32>),
    /// DELTA: every page with an LSN at or after the parent's start, and zero pages.
    Delta,
}

fn choose_method(ctx: &CopyCtx<'_>, logical: &str, rel: Option<RelFile>, size: u64) -> Method {
    let bs = ctx.block_size as u64;
    let Some(rel) = rel else { return Method::Full };
    let parent_has = |files: &HashSet<String>| {
        rel.fork.fork == MAIN_FORKNUM
            && size != 0
            && size.is_multiple_of(bs)
            && files.contains(logical)
    };
    match &ctx.plan {
        CopyPlan::Full => Method::Full,
        CopyPlan::Delta { parent_files, .. } if parent_has(parent_files) => Method::Delta,
        CopyPlan::Page {
            parent_files,
            change: map,
            ..
        } if parent_has(parent_files) => {
            let file_blocks = (size / bs) as u32;
            let fc = map.blocks_for_file(&rel.fork, rel.segno, ctx.relseg_size);
            if fc.whole {
                return Method::Full;
            }
            // changed blocks below the size, plus every block from the limit to the end:
            // restore must never take those from an older backup
            let blocks = fc.blocks_to_copy(file_blocks).to_vec();
            Method::Blocks(blocks, fc.limit)
        }
        CopyPlan::Delta { .. } | CopyPlan::Page { .. } => Method::Full,
    }
}

/// Verifies the pages of `buf`, which was read at byte `offset` of `f`; failing pages are
/// re-read in place. Each page's LSN is also noted for the check at backup stop
/// ([`CopyCtx::note_page_lsn`]).
fn verify_pages(
    ctx: &CopyCtx<'_>,
    f: &File,
    logical: &str,
    rel: &RelFile,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    let bs = ctx.block_size as usize;
    for (i, page) in buf.chunks_exact_mut(bs).enumerate() {
        let blk_in_file = (offset / bs as u64) as u32 + i as u32;
        let blkno = (rel.segno as u64 * ctx.relseg_size as u64 + blk_in_file as u64) as u32;
        if let PageCheck::Bad(why) = check_page(page, blkno, ctx.checksums) {
            let pos = offset + (i * bs) as u64;
            recheck_page(ctx, f, logical, blk_in_file, blkno, pos, page, why)?;
        }
        ctx.note_page_lsn(page_lsn(page), logical, blk_in_file);
    }
    Ok(())
}

/// A page that failed verification: re-read it until it passes (a concurrent write tore
/// it) or the retries run out. Then it is corrupt, unless its LSN is after the backup start
/// (WAL replay rewrites it; an LSN beyond anything the server wrote is caught at stop).
#[allow(clippy::too_many_arguments)]
fn recheck_page(
    ctx: &CopyCtx<'_>,
    f: &File,
    logical: &str,
    blk_in_file: u32,
    blkno: u32,
    pos: u64,
    page: &mut [u8],
    mut why: String,
) -> Result<()> {
    let bs = page.len();
    for attempt in 0..PAGE_RETRIES {
        std::thread::sleep(Duration::from_millis(10 * (attempt as u64 + 1)));
        let mut fresh = vec![0u8; bs];
        let n = f.read_at(&mut fresh, pos).unwrap_or(0);
        if n < bs {
            // truncated while we read: WAL replay recreates whatever is needed
            return Ok(());
        }
        match check_page(&fresh, blkno, ctx.checksums) {
            PageCheck::Bad(w) => why = w,
            _ => {
                page.copy_from_slice(&fresh);
                return Ok(());
            }
        }
    }
    let lsn = page_lsn(page);
    if lsn >= ctx.start_lsn {
        log::info!(
            "file \"{logical}\" block {blk_in_file}: {why}, but its LSN {lsn} is after the backup start; WAL replay restores it"
        );
        Ok(())
    } else {
        Err(Error::corruption(format!(
            "corrupt page in file \"{logical}\" block {blk_in_file}: {why} (page LSN {lsn})"
        )))
    }
}

fn copy_file(ctx: &CopyCtx<'_>, job: &Job) -> Result<Option<FileEntry>> {
    let f = match File::open(&job.abs) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open", &job.abs, e)),
    };
    let size = f.metadata().ctx("stat", &job.abs)?.len();
    let rel = relfile::rel_file(&job.logical);
    let method = choose_method(ctx, &job.logical, rel, size);
    match method {
        Method::Full => copy_whole(ctx, f, &job.logical, &job.abs, rel.as_ref()).map(Some),
        Method::Blocks(blocks, limit) => {
            let rel = rel.ok_or_else(|| Error::invalid("not a relation file"))?;
            copy_incremental(
                ctx,
                &f,
                &job.logical,
                &job.abs,
                &rel,
                size,
                Some((blocks, limit)),
            )
            .map(Some)
        }
        Method::Delta => {
            let rel = rel.ok_or_else(|| Error::invalid("not a relation file"))?;
            copy_incremental(ctx, &f, &job.logical, &job.abs, &rel, size, None).map(Some)
        }
    }
}

/// A new stored object of the backup, `key/<stored path>`, and where it goes (for messages).
fn create_stored(ctx: &CopyCtx<'_>, rel: &str) -> Result<(Box<dyn ObjectWriter>, PathBuf)> {
    let w = ctx.repo.create(&format!("{}/{rel}", ctx.key))?;
    let dest = PathBuf::from(w.describe());
    Ok((w, dest))
}

/// Flushes a stored file and commits it deferred (made durable by the backup's barrier
/// before the completion record); returns the CRC-32C and length of the stored bytes.
fn finish_stored(
    cw: CrcWriter<BufWriter<Box<dyn ObjectWriter>>>,
    dest: &Path,
) -> Result<(u32, u64)> {
    let (crc, stored) = (cw.crc, cw.n);
    let obj = cw
        .into_inner()
        .into_inner()
        .map_err(|e| Error::io("write", dest, e.into_error()))?;
    obj.commit(Durability::Deferred)?;
    Ok((crc, stored))
}

/// Copies `src` whole (verifying pages of relation files); pg_control uses it too.
pub fn copy_whole(
    ctx: &CopyCtx<'_>,
    mut f: File,
    logical: &str,
    abs: &Path,
    rel: Option<&RelFile>,
) -> Result<FileEntry> {
    let storage = if ctx.compress {
        Storage::FullLz4
    } else {
        Storage::Full
    };
    let (df, dest) = create_stored(ctx, &stored_path(logical, storage))?;
    let tmp_ctx = dest.clone();
    let cw = CrcWriter::new(BufWriter::with_capacity(256 << 10, df));
    let bs = ctx.block_size as usize;
    let mut buf = vec![0u8; bs * CHUNK_PAGES];
    let mut size = 0u64;
    let want_crcs = ctx.wants_crcs();
    let mut crcs: Vec<u32> = Vec::new();
    let mut pump = |w: &mut dyn Write| -> Result<()> {
        loop {
            let n = read_full(&mut f, &mut buf).ctx("read", abs)?;
            if n == 0 {
                break;
            }
            if let Some(rel) = rel {
                let whole = n - n % bs;
                verify_pages(ctx, &f, logical, rel, size, &mut buf[..whole])?;
            }
            w.write_all(&buf[..n]).ctx("write", &tmp_ctx)?;
            if want_crcs {
                // reads fill the buffer until the end: only the file's tail is short
                crcs.extend(buf[..n].chunks(bs).map(crc32c::crc32c));
            }
            size += n as u64;
            ctx.progress.inc(n as u64);
            if ctx.abort.load(Ordering::Relaxed) {
                return Err(Error::invalid("backup aborted"));
            }
        }
        Ok(())
    };
    let (cw, frames) = if ctx.compress {
        let mut enc = Lz4FrameWriter::new(cw, LZ4_FRAME_BYTES);
        pump(&mut enc)?;
        let (cw, stored) = enc.finish().ctx("compress", &dest)?;
        let frames = (stored.len() > 1).then_some(Lz4Frames {
            frame_bytes: LZ4_FRAME_BYTES,
            stored,
        });
        (cw, frames)
    } else {
        let mut cw = cw;
        pump(&mut cw)?;
        (cw, None)
    };
    let (crc, stored) = finish_stored(cw, &dest)?;
    if want_crcs {
        ctx.add_crcs(logical, |w| w.add_whole(logical, &crcs))?;
    }
    Ok(FileEntry {
        path: logical.to_string(),
        storage,
        size,
        stored_size: stored,
        crc32c: crc,
        changed_blocks: None,
        file_blocks: None,
        limit_block: None,
        lz4_frames: frames,
    })
}

/// Stores `data` (bytes that are not a file of the data directory, e.g. streamed WAL) as
/// the whole file `logical` of the backup at `key`, checksummed and compressed like a
/// copied file.
pub fn store_bytes(
    repo: &dyn Repo,
    key: &str,
    logical: &str,
    data: &[u8],
    compress: bool,
) -> Result<FileEntry> {
    let storage = if compress {
        Storage::FullLz4
    } else {
        Storage::Full
    };
    let w = repo.create(&format!("{key}/{}", stored_path(logical, storage)))?;
    let dest = PathBuf::from(w.describe());
    let mut cw = CrcWriter::new(BufWriter::with_capacity(256 << 10, w));
    let frames = if compress {
        let mut enc = Lz4FrameWriter::new(cw, LZ4_FRAME_BYTES);
        enc.write_all(data).ctx("write", &dest)?;
        let (inner, stored) = enc.finish().ctx("compress", &dest)?;
        cw = inner;
        (stored.len() > 1).then_some(Lz4Frames {
            frame_bytes: LZ4_FRAME_BYTES,
            stored,
        })
    } else {
        cw.write_all(data).ctx("write", &dest)?;
        None
    };
    let (crc, stored) = finish_stored(cw, &dest)?;
    Ok(FileEntry {
        path: logical.to_string(),
        storage,
        size: data.len() as u64,
        stored_size: stored,
        crc32c: crc,
        changed_blocks: None,
        file_blocks: None,
        limit_block: None,
        lz4_frames: frames,
    })
}

fn copy_incremental(
    ctx: &CopyCtx<'_>,
    f: &File,
    logical: &str,
    abs: &Path,
    rel: &RelFile,
    size: u64,
    page_plan: Option<(Vec<u32>, Option<u32>)>,
) -> Result<FileEntry> {
    let bs = ctx.block_size as usize;
    let (df, dest) = create_stored(ctx, &stored_path(logical, Storage::Incremental))?;
    let cw = CrcWriter::new(BufWriter::with_capacity(256 << 10, df));
    let mut w = IncWriter::new(cw, ctx.block_size, ctx.compress).ctx("write", &dest)?;
    let file_blocks = (size / bs as u64) as u32;
    let want_crcs = ctx.wants_crcs();
    let mut crcs: Vec<(u32, u32)> = Vec::new();
    let limit;
    match page_plan {
        Some((blocks, lim)) => {
            limit = lim;
            let mut page = vec![0u8; bs];
            for b in blocks {
                let n = f
                    .read_at(&mut page, b as u64 * bs as u64)
                    .ctx("read", abs)?;
                if n < bs {
                    // shorter now (truncated after the start): replay handles it
                    break;
                }
                verify_pages(ctx, f, logical, rel, b as u64 * bs as u64, &mut page)?;
                w.add(b, &page).ctx("write", &dest)?;
                if want_crcs {
                    crcs.push((b, crc32c::crc32c(&page)));
                }
                ctx.progress.inc(bs as u64);
            }
        }
        None => {
            limit = None;
            let parent_start = ctx.plan.parent_start();
            let mut buf = vec![0u8; bs * CHUNK_PAGES];
            let mut off = 0u64;
            let mut rd = f;
            while off < file_blocks as u64 * bs as u64 {
                let n = read_full(&mut rd, &mut buf).ctx("read", abs)?;
                let whole = n - n % bs;
                if whole == 0 {
                    break;
                }
                verify_pages(ctx, f, logical, rel, off, &mut buf[..whole])?;
                for (i, page) in buf[..whole].chunks_exact(bs).enumerate() {
                    let b = (off / bs as u64) as u32 + i as u32;
                    if b >= file_blocks {
                        break;
                    }
                    if page_lsn(page) >= parent_start || is_all_zero(page) {
                        w.add(b, page).ctx("write", &dest)?;
                        if want_crcs {
                            crcs.push((b, crc32c::crc32c(page)));
                        }
                    }
                }
                ctx.progress.inc(whole as u64);
                off += whole as u64;
                if n < buf.len() {
                    break;
                }
            }
        }
    }
    let nblocks = w_nblocks(&w);
    let (cw, _, trailer_crc) = w.finish_with_crc(file_blocks, limit).ctx("write", &dest)?;
    // The whole file's CRC is the same for every incremental file (it ends with its own
    // CRC); the manifest records the trailer's, which is this file's alone.
    let (_, stored) = finish_stored(cw, &dest)?;
    if want_crcs {
        ctx.add_crcs(logical, |w| w.add_inc(logical, &crcs))?;
    }
    let crc = trailer_crc;
    Ok(FileEntry {
        path: logical.to_string(),
        storage: Storage::Incremental,
        size,
        stored_size: stored,
        crc32c: crc,
        changed_blocks: Some(nblocks),
        file_blocks: Some(file_blocks),
        limit_block: limit,
        lz4_frames: None,
    })
}

fn w_nblocks<W: Write>(w: &IncWriter<W>) -> u32 {
    w.nblocks()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 20) as u8 & 0x1f)
            .collect()
    }

    /// pg_basebackup's rules for links: only tablespace links directly in pg_tblspc are
    /// followed; pg_wal and the kept-empty directories are directories even as links;
    /// every other link, a socket or a FIFO is skipped.
    #[test]
    fn links_are_classified_as_pg_basebackup_does() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let outside = root.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(root.join("file"), b"x").unwrap();
        let ln = |to: &Path, at: &str| std::os::unix::fs::symlink(to, root.join(at)).unwrap();
        ln(Path::new("."), "loop");
        ln(&outside, "pg_wal");
        ln(&outside, "pg_stat_tmp");
        ln(&outside, "ts");
        ln(&root.join("file"), "filelink");
        ln(Path::new("/nonexistent"), "dangling");
        let sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
        let c = |ldir: &str, name: &str| {
            let abs = root.join(name);
            let md = std::fs::symlink_metadata(&abs).unwrap();
            classify(ldir, name, &abs, &md).unwrap()
        };
        assert_eq!(c("", "outside"), Entry::Dir);
        assert_eq!(c("", "file"), Entry::File);
        assert_eq!(c("", "loop"), Entry::Skip);
        assert_eq!(c("base", "loop"), Entry::Skip);
        assert_eq!(c("", "filelink"), Entry::Skip);
        assert_eq!(c("", "dangling"), Entry::Skip);
        assert_eq!(c("", "sock"), Entry::Skip);
        assert_eq!(c("", "pg_wal"), Entry::Dir);
        assert_eq!(c("", "pg_stat_tmp"), Entry::Dir);
        // below the top, the names mean nothing special
        assert_eq!(c("base", "pg_wal"), Entry::Skip);
        // a tablespace link is followed only directly in pg_tblspc, and only to a directory
        assert_eq!(c("pg_tblspc", "ts"), Entry::Dir);
        assert_eq!(c("pg_tblspc/16384", "ts"), Entry::Skip);
        assert_eq!(c("pg_tblspc", "filelink"), Entry::Skip);
        drop(sock);
    }

    /// Frames of the set decoded size, each decodable alone from its offset; the whole
    /// decodes as one stream (lz4_flex, and the stock `lz4 -d` when it is installed).
    #[test]
    fn lz4_frames_decode_alone_and_together() {
        for (len, frame) in [
            (250_000usize, 100_000u64),
            (200_000, 100_000),
            (0, 100),
            (5, 100),
        ] {
            let src = data(len);
            let mut w = Lz4FrameWriter::new(Vec::new(), frame);
            for piece in src.chunks(7_777) {
                w.write_all(piece).unwrap();
            }
            let (out, stored) = w.finish().unwrap();
            assert_eq!(stored.len(), (len as u64).div_ceil(frame).max(1) as usize);
            assert_eq!(stored.iter().sum::<u64>(), out.len() as u64);
            let mut whole = Vec::new();
            let mut dec = lz4_flex::frame::FrameDecoder::new(crate::restore::rebuild::CrcReader {
                inner: &out[..],
                crc: 0,
                n: 0,
            });
            let mut buf = vec![0u8; 4096];
            loop {
                let n = crate::restore::rebuild::read_frames(&mut dec, &mut buf).unwrap();
                if n == 0 {
                    break;
                }
                whole.extend_from_slice(&buf[..n]);
            }
            assert!(whole == src, "frames decode to {} bytes", whole.len());
            let mut at = 0usize;
            for (k, s) in stored.iter().enumerate() {
                let mut one = Vec::new();
                lz4_flex::frame::FrameDecoder::new(&out[at..at + *s as usize])
                    .read_to_end(&mut one)
                    .unwrap();
                let lo = (k as u64 * frame) as usize;
                assert!(one == src[lo..(lo + frame as usize).min(len)], "frame {k}");
                at += *s as usize;
            }
            if std::process::Command::new("lz4").arg("-V").output().is_ok() {
                let d = tempfile::tempdir().unwrap();
                let p = d.path().join("f.lz4");
                std::fs::write(&p, &out).unwrap();
                let o = std::process::Command::new("lz4")
                    .args(["-d", "-c"])
                    .arg(&p)
                    .output()
                    .unwrap();
                assert!(o.status.success());
                assert!(o.stdout == src, "lz4 -d gives {} bytes", o.stdout.len());
            }
        }
    }
}
