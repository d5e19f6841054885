//! Incremental restore into an existing data directory: rewrite only what differs.
//!
//! Two modes:
//! - **checksum**: every block of every file is compared with the block the chain would
//!   restore, and written only when it differs. Backups record a CRC-32C per block of the
//!   files they store uncompressed ([`crate::format::blockcrc`]): the destination is read
//!   once, each block's CRC compared with the one the chain gives it (the newest backup
//!   holding the block, under the truncation rule, as rebuild takes it), and only the
//!   differing blocks are read from the backups, each checked against its CRC. A file whose
//!   sources lack block checksums (older or compressed backups, LZ4 or compressed-page
//!   incremental files) is rebuilt from the chain as a fresh restore would and compared
//!   block by block.
//! - **lsn**: the destination and the chain share their history up to a divergence point
//!   X (where their timeline histories part, the destination's end of WAL, or the newest
//!   backup's start, whichever is lowest: a destination ahead of the chain on the same
//!   history, rolled back, holds newer pages than the chain's). A destination page that passes its data checksum and whose LSN is below X
//!   holds what the source held at X. A block that the chain takes from a backup that
//!   started at or before X was not changed between that backup's start and the newest
//!   backup's start (else a newer backup would hold it), so the destination's page is the
//!   chain's: it is kept without reading the backup. Blocks of backups that started after X
//!   are compared and written where they differ; the rest is read from the FULL (single
//!   blocks or runs of them, each page checked against its data checksum) or rebuilt as in
//!   checksum mode.
//!   WAL replay from the newest backup's redo point then restores every block changed
//!   after it (full-page writes).
//!
//!   The **wal-index route** ([`super::destwal`]) does without reading the destination: when
//!   it archived its WAL into the same catalog instance, the blocks it changed after X are
//!   named by the block indexes of that WAL (and of the segments only in its pg_wal,
//!   decoded here). Blocks of trusted sources that it does not name are kept unread; named
//!   ones are written from the FULL, and newer backups' blocks written, both unread.
//!   Visibility-map forks are compared whole; a fork created, dropped or truncated after X
//!   gets the page scan. Anything [`super::destwal::decide`] cannot prove is the page scan.
//!
//! Every check runs before the first write ([`preflight`]). Then `global/pg_control` is
//! removed first, and written last, so a crash mid-way leaves a directory PostgreSQL
//! refuses to start, never a silently mixed one. Files and directories the backup does not
//! have are removed (this resets unlogged relations: a backup keeps only their init fork),
//! and every file gets the length of the backup's.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::archive::{parse_history, HistoryEntry};
use crate::backup::meta::BackupMeta;
use crate::backup::page::{check_page, is_all_zero, page_lsn, PageCheck};
use crate::backup::relfile;
use crate::durable::{self, Replace};
use crate::error::{Error, IoContext, Result};
use crate::format::blockcrc::FileCrcs;
use crate::format::manifest::{FileEntry, Storage};
use crate::index::merge::ChangeMap;
use crate::index::{BlockSet, RelFork};
use crate::pgcontrol::ControlFile;
use crate::progress::Progress;
use crate::types::{Lsn, TimeLineId};

use super::rebuild::{self, Shape, Sink, Stored};
use super::Restorer;

/// How an incremental restore decides which blocks to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IncrementalMode {
    Checksum,
    Lsn,
}

impl std::fmt::Display for IncrementalMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IncrementalMode::Checksum => "checksum",
            IncrementalMode::Lsn => "lsn",
        })
    }
}

/// One pre-flight check and its result.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// Only lsn mode needs it: checksum mode would be safe.
    #[serde(skip)]
    pub lsn_only: bool,
}

/// The checks of an incremental restore and what they found.
#[derive(Clone, Debug, Default)]
pub struct Preflight {
    pub checks: Vec<Check>,
    /// lsn mode: the divergence point.
    pub divergence: Option<Lsn>,
    /// lsn mode, once the checks passed: keep blocks by the destination's WAL index, or by
    /// reading every page ([`super::destwal::decide`]).
    pub route: Option<super::destwal::Route>,
}

impl Preflight {
    fn add(&mut self, name: &str, ok: bool, detail: impl Into<String>, lsn_only: bool) {
        self.checks.push(Check {
            name: name.to_string(),
            ok,
            detail: detail.into(),
            lsn_only,
        });
    }

    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// The refusal for the first failed check, naming it; offers checksum mode when only
    /// lsn-mode checks failed.
    pub fn refusal(&self, target: &Path) -> Option<Error> {
        let failed: Vec<&Check> = self.checks.iter().filter(|c| !c.ok).collect();
        let first = failed.first()?;
        let hint = if failed.iter().all(|c| c.lsn_only) {
            "; --incremental-mode checksum does not need this check and would be safe here"
        } else {
            ""
        };
        Some(Error::refused(format!(
            "incremental restore into \"{}\" refused: check \"{}\" failed: {}{hint}",
            target.display(),
            first.name,
            first.detail
        )))
    }
}

/// A history as segments: each timeline with the LSN where it ended (the last one never).
fn segments(history: &[HistoryEntry], tli: TimeLineId) -> Vec<(TimeLineId, Lsn)> {
    history
        .iter()
        .map(|h| (h.tli, h.switchpoint))
        .chain(std::iter::once((tli, Lsn(u64::MAX))))
        .collect()
}

/// The first LSN at which the two histories differ (`Lsn(u64::MAX)`: nowhere).
pub fn divergence(a: &[(TimeLineId, Lsn)], b: &[(TimeLineId, Lsn)]) -> Lsn {
    let mut start = Lsn(0);
    for (x, y) in a.iter().zip(b) {
        if x.0 != y.0 {
            return start;
        }
        if x.1 != y.1 {
            return Lsn(x.1 .0.min(y.1 .0));
        }
        start = x.1;
    }
    start
}

/// Symbolic links below `dir` (the first found), not following any.
fn first_link(dir: &Path) -> Result<Option<PathBuf>> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ctx("read directory", &d)? {
            let e = e.ctx("read directory", &d)?;
            let ft = e.file_type().ctx("stat", &e.path())?;
            if ft.is_symlink() {
                return Ok(Some(e.path()));
            }
            if ft.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(None)
}

/// Every check before the first write (see the module docs). `chain_history` is the
/// history of the newest backup's timeline, from the archive.
pub fn preflight(
    target: &Path,
    chain: &[&BackupMeta],
    mode: IncrementalMode,
    chain_history: Result<Vec<HistoryEntry>>,
    has_tablespaces: bool,
) -> Preflight {
    let newest = chain[0];
    let mut p = Preflight::default();
    let control = match ControlFile::read_from_pgdata(target) {
        Ok(c) => {
            p.add(
                "data directory",
                true,
                "global/pg_control is readable",
                false,
            );
            c
        }
        Err(e) => {
            p.add(
                "data directory",
                false,
                format!("{e}; an incremental restore needs an existing data directory"),
                false,
            );
            return p;
        }
    };
    match super::dirs::live_postmaster(target) {
        Ok(None) => p.add("no server running", true, "no live postmaster.pid", false),
        Ok(Some(pid)) => p.add(
            "no server running",
            false,
            format!("a server (pid {pid}) is running in it; stop it first"),
            false,
        ),
        Err(e) => p.add("no server running", false, e.to_string(), false),
    }
    p.add(
        "system identifier",
        control.system_id == newest.system_id,
        format!(
            "destination {}, backup {}",
            control.system_id, newest.system_id
        ),
        false,
    );
    let version = crate::pgcontrol::read_pg_version_file(target);
    let v_ok =
        matches!(version, Ok(v) if v == newest.pg_major) && control.block_size == newest.block_size;
    p.add(
        "version and block size",
        v_ok,
        match &version {
            Ok(v) => format!(
                "destination PostgreSQL {v} with {}-byte blocks, backup {} with {}",
                control.block_size, newest.pg_major, newest.block_size
            ),
            Err(e) => e.to_string(),
        },
        false,
    );
    let spc_empty = match std::fs::read_dir(target.join("pg_tblspc")) {
        Ok(mut rd) => rd.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    p.add(
        "no tablespaces",
        !has_tablespaces && spc_empty,
        if has_tablespaces || !spc_empty {
            "incremental restore of a cluster with tablespaces is not supported; restore into an empty directory"
        } else {
            "neither the backup nor the destination has tablespaces"
        },
        false,
    );
    match first_link(target) {
        Ok(None) => p.add(
            "no symbolic links",
            true,
            "none below the data directory",
            false,
        ),
        Ok(Some(l)) => p.add(
            "no symbolic links",
            false,
            format!(
                "\"{}\" is a symbolic link; incremental restore never writes through one",
                l.display()
            ),
            false,
        ),
        Err(e) => p.add("no symbolic links", false, e.to_string(), false),
    }
    if mode == IncrementalMode::Checksum {
        return p;
    }
    let label = target.join("backup_label");
    let has_label = std::fs::symlink_metadata(&label).is_ok();
    p.add(
        "no backup_label",
        !has_label,
        if has_label {
            format!("\"{}\" exists: the destination is a restored backup that never finished recovery, its page LSNs say nothing", label.display())
        } else {
            "none".to_string()
        },
        true,
    );
    p.add(
        "data checksums",
        control.data_checksums(),
        if control.data_checksums() {
            "enabled"
        } else {
            "disabled in the destination: page LSNs cannot be trusted without them"
        },
        true,
    );
    p.add(
        "clean shutdown",
        control.state.is_shut_down(),
        format!(
            "pg_control state {:?}{}",
            control.state,
            if control.state.is_shut_down() {
                ""
            } else {
                ": the destination was not shut down cleanly, its pages may be torn"
            }
        ),
        true,
    );
    // the timeline histories
    let dest_tli = control.timeline;
    let dest_hist = if dest_tli <= 1 {
        Ok(Vec::new())
    } else {
        let f = target.join(format!("pg_wal/{dest_tli:08X}.history"));
        std::fs::read(&f)
            .ctx("read", &f)
            .and_then(|b| parse_history(&b, &f.display().to_string()))
    };
    match (dest_hist, chain_history) {
        (Ok(dh), Ok(ch)) => {
            let ds = segments(&dh, dest_tli);
            let cs = segments(&ch, newest.timeline);
            let contains =
                ds.iter().any(|s| s.0 == newest.timeline) || cs.iter().any(|s| s.0 == dest_tli);
            let end = control.checkpoint.max(control.min_recovery_point);
            // never past the newest backup's start: a destination ahead of it on the same
            // history (a roll-back) holds pages newer than the chain's, which recovery to a
            // target before them could not undo
            let x = Lsn(divergence(&ds, &cs).0.min(end.0).min(newest.start_lsn.0));
            if contains {
                p.divergence = Some(x);
            }
            p.add(
                "timeline history",
                contains,
                if contains {
                    format!(
                        "destination timeline {dest_tli}, chain timeline {}: they diverge at {x}",
                        newest.timeline
                    )
                } else {
                    format!(
                        "the destination's timeline {dest_tli} history does not contain the chain's timeline {}",
                        newest.timeline
                    )
                },
                true,
            );
            if contains {
                let promoted =
                    dest_tli != newest.timeline && ds.iter().any(|s| s.0 == newest.timeline);
                let (ok, detail) = redo_at_promotion(target, chain, x, promoted);
                p.add("redo pointer at promotion", ok, detail, true);
            }
        }
        (Err(e), _) => p.add("timeline history", false, e.to_string(), true),
        (_, Err(e)) => p.add(
            "timeline history",
            false,
            format!("history of the chain's timeline {}: {e}", newest.timeline),
            true,
        ),
    }
    p
}

/// lsn mode: whether hint bits the destination may have set without WAL can be on a page
/// lsn mode keeps. With data checksums a hint change is logged (as a full-page image) unless
/// the page changed since the redo pointer of the last checkpoint; a kept page's last change
/// is older than the divergence point X and, unless a newer backup holds it, than the start
/// S of the backup it comes from. A destination that left the chain's timeline by its own
/// promotion (`promoted`) kept, until its first checkpoint after that, the redo pointer of
/// its last restartpoint, which may be older than S: hint bits set in that moment (for
/// transactions whose fate the two histories decide differently) would be kept. Proven
/// safe when its recovery began at or after S (`backup_label.old`: it was restored from a
/// backup no older than S); a destination on the chain's timeline, or one the chain left,
/// was the primary at S and made that checkpoint itself.
fn redo_at_promotion(
    target: &Path,
    chain: &[&BackupMeta],
    x: Lsn,
    promoted: bool,
) -> (bool, String) {
    if !promoted {
        return (
            true,
            "the destination did not leave the chain's timeline by its own promotion".into(),
        );
    }
    let s = chain
        .iter()
        .map(|b| b.start_lsn)
        .filter(|&l| l <= x)
        .max()
        .unwrap_or(x);
    let label = target.join("backup_label.old");
    let start = std::fs::read(&label).ok().and_then(|b| label_start(&b));
    match start {
        Some(w) if w >= s => (
            true,
            format!("the destination's recovery began at {w} (backup_label.old), not before the backup start {s}"),
        ),
        _ => (
            false,
            format!(
                "the destination left the chain's timeline by its own promotion, and nothing shows its redo pointer then was at or after the backup start {s} ({}): right after a promotion it may set hint bits without WAL on pages lsn mode keeps",
                match start {
                    Some(w) => format!("its recovery began at {w}, by backup_label.old"),
                    None => "no readable backup_label.old".into(),
                }
            ),
        ),
    }
}

/// The `START WAL LOCATION` of a backup label.
fn label_start(b: &[u8]) -> Option<Lsn> {
    let t = std::str::from_utf8(b).ok()?;
    let line = t
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION: "))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Time since the first call (debug timings of an incremental restore).
pub(super) fn since_start() -> std::time::Duration {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T0.get_or_init(std::time::Instant::now).elapsed()
}

/// A debug line: where an incremental restore got to, and when ([`since_start`]).
pub(super) fn phase(what: &str) {
    log::debug!("{what} at {} ms", since_start().as_millis());
}

/// Bytes of the destination read at once: long sequential reads, never one per block.
const DEST_READ: usize = 1 << 20;

/// Compares blocks with an existing file and writes those that differ.
struct Compare<'a> {
    file: &'a File,
    dest: &'a Path,
    dest_len: u64,
    bs: usize,
    dry: bool,
    written: u64,
    scratch: Vec<u8>,
    /// Byte range written since writeback was last started, and the bytes in it.
    wb: Option<(u64, u64)>,
    wb_bytes: u64,
    /// Where writeback is started (none: here, in the caller's thread).
    flusher: Option<&'a Flusher>,
    /// Counts the bytes of the destination read.
    counter: Option<&'a AtomicU64>,
}

/// Starts the writeback of written ranges in a thread of its own. `sync_file_range`
/// (even `SYNC_FILE_RANGE_WRITE` alone) sleeps while the device's write queue is throttled
/// (blk-wbt keeps few writes in flight while reads are busy): measured at 50-500 ms for
/// 4 MiB of scattered blocks during the destination scan. The scanning threads only queue
/// the ranges; durability still comes from the final syncfs.
pub(super) struct Flusher {
    tx: std::sync::mpsc::Sender<(File, u64, u64)>,
}

impl Flusher {
    /// Queues the writeback of `len` bytes of `file` from `off`; without a duplicate of the
    /// descriptor (or once the thread stopped) it starts here.
    fn start(&self, file: &File, off: u64, len: u64) {
        let sent = file
            .try_clone()
            .ok()
            .is_some_and(|f| self.tx.send((f, off, len)).is_ok());
        if !sent {
            durable::start_writeback(file, off, len);
        }
    }

    /// Runs `f` with a flusher whose thread lives as long as `f`; what is still queued
    /// when `f` returns is left to the final syncfs.
    fn with<T>(f: impl FnOnce(&Flusher) -> T) -> T {
        let (tx, rx) = std::sync::mpsc::channel::<(File, u64, u64)>();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                for (file, off, len) in rx {
                    if !stop.load(Ordering::Relaxed) {
                        durable::start_writeback(&file, off, len);
                    }
                }
            });
            let fl = Flusher { tx };
            let out = f(&fl);
            stop.store(true, Ordering::Relaxed);
            // the sender goes with `fl`: the thread drains the queue and ends
            drop(fl);
            let _ = h.join();
            out
        })
    }
}

/// Bytes written before their writeback is started: one `sync_file_range` submits them
/// all in one plug (sorted, merged where adjacent), not one device request and one
/// notification of the device per block.
const WB_BATCH: u64 = 4 << 20;

impl Compare<'_> {
    fn new<'a>(
        file: &'a File,
        dest: &'a Path,
        dest_len: u64,
        bs: usize,
        dry: bool,
        flusher: Option<&'a Flusher>,
    ) -> Compare<'a> {
        Compare {
            flusher,
            counter: None,
            file,
            dest,
            dest_len,
            bs,
            dry,
            written: 0,
            scratch: vec![0u8; bs],
            wb: None,
            wb_bytes: 0,
        }
    }

    /// Starts the writeback of what was written since the last call (a hint: durability
    /// comes from the final syncfs).
    fn start_writeback(&mut self) {
        if let Some((lo, hi)) = self.wb.take() {
            match self.flusher {
                Some(f) => f.start(self.file, lo, hi - lo),
                None => durable::start_writeback(self.file, lo, hi - lo),
            }
        }
        self.wb_bytes = 0;
    }

    /// The destination's bytes at `off` (fewer past its end) into `scratch[..len]`, in one
    /// positional read; returns how many exist.
    fn read_dest(&mut self, off: u64, len: usize) -> Result<usize> {
        let n = (len as u64).min(self.dest_len.saturating_sub(off)) as usize;
        if self.scratch.len() < len {
            self.scratch.resize(len, 0);
        }
        if n > 0 {
            self.file
                .read_exact_at(&mut self.scratch[..n], off)
                .ctx("read", self.dest)?;
            if let Some(c) = self.counter {
                c.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Ok(n)
    }

    fn write(&mut self, data: &[u8], off: u64) -> Result<()> {
        if !self.dry {
            self.file.write_all_at(data, off).ctx("write", self.dest)?;
            // writeback starts soon, beside the reads, not all in the final syncfs
            let end = off + data.len() as u64;
            self.wb = Some(
                self.wb
                    .map_or((off, end), |(lo, hi)| (lo.min(off), hi.max(end))),
            );
            self.wb_bytes += data.len() as u64;
            if self.wb_bytes >= WB_BATCH {
                self.start_writeback();
            }
        }
        self.written += data.len() as u64;
        Ok(())
    }

    /// Writes `data` at `off` where it differs from the destination: the destination read
    /// in long pieces, compared block by block, runs of differing blocks written at once.
    fn sync(&mut self, data: &[u8], off: u64) -> Result<()> {
        let step = (DEST_READ / self.bs).max(1) * self.bs;
        let mut o = 0;
        while o < data.len() {
            let len = step.min(data.len() - o);
            let have = self.read_dest(off + o as u64, len)?;
            // which blocks of this piece differ (a block past the destination's end does)
            let mut j = 0;
            while j < len {
                let e = (j + self.bs).min(len);
                let differs =
                    |j: usize, e: usize, s: &[u8]| e > have || s[j..e] != data[o + j..o + e];
                if !differs(j, e, &self.scratch) {
                    j = e;
                    continue;
                }
                let mut k = e;
                while k < len {
                    let ke = (k + self.bs).min(len);
                    if !differs(k, ke, &self.scratch) {
                        break;
                    }
                    k = ke;
                }
                self.write(&data[o + j..o + k], off + (o + j) as u64)?;
                j = k;
            }
            o += len;
        }
        Ok(())
    }

    /// Makes blocks `first..first + n` zero pages (holes past the destination's end): the
    /// destination read in long pieces, runs of non-zero blocks overwritten.
    fn zero_run(&mut self, first: u32, n: u32) -> Result<()> {
        let bs = self.bs;
        let per = (DEST_READ / bs).max(1) as u32;
        let mut b = first;
        let end = first.saturating_add(n);
        let mut z: Vec<u8> = Vec::new();
        while b < end {
            let cnt = per.min(end - b);
            let off = b as u64 * bs as u64;
            if off >= self.dest_len {
                break;
            }
            let have = self.read_dest(off, cnt as usize * bs)?;
            let nb = have.div_ceil(bs);
            let mut j = 0;
            while j < nb {
                let blk = |j: usize| &self.scratch[j * bs..((j + 1) * bs).min(have)];
                if is_all_zero(blk(j)) {
                    j += 1;
                    continue;
                }
                let mut k = j + 1;
                while k < nb && !is_all_zero(blk(k)) {
                    k += 1;
                }
                let len = (k - j) * bs;
                if z.len() < len {
                    z.resize(len, 0);
                }
                self.write(&z[..len], off + (j * bs) as u64)?;
                j = k;
            }
            b += cnt;
        }
        Ok(())
    }

    /// Makes block `b` a zero page (a hole past the destination's end).
    fn zero(&mut self, b: u32) -> Result<()> {
        self.zero_run(b, 1)
    }
}

impl Drop for Compare<'_> {
    /// The end of a chunk: the writeback of its last writes starts.
    fn drop(&mut self) {
        self.start_writeback();
    }
}

impl Sink for Compare<'_> {
    fn put(&mut self, data: &[u8], off: u64) -> Result<()> {
        self.sync(data, off)
    }

    fn zeros(&mut self, first: u32, n: u32) -> Result<()> {
        self.zero_run(first, n)
    }
}

/// lsn mode: blocks newer backups supply are compared; blocks below `trusted_cap` (supplied
/// by backups that started at or before the divergence point) are kept when the
/// destination's page is valid and older than it, else listed in `needed`.
struct LsnSink<'a, 'o> {
    cmp: Compare<'a>,
    x: Lsn,
    trusted_cap: u32,
    /// Block number of block 0 of this file in its relation (segment files).
    first_block: u64,
    needed: Vec<u32>,
    kept: u64,
    /// The FULL the needed blocks will be read from: they are asked for as soon as found,
    /// so the reads run while the scan goes on.
    full: Option<(&'o rebuild::Obj, u64)>,
    /// wal-index route: the blocks of this file the destination changed after the
    /// divergence point; the others below `trusted_cap` are kept without reading them.
    changed: Option<&'o BlockSet>,
    /// Whole blocks the destination's file has.
    dest_blocks: u32,
    /// Blocks kept without reading the destination.
    unread: u64,
}

impl LsnSink<'_, '_> {
    /// Readahead hints for `needed[from..]` (runs of consecutive blocks at once).
    fn hint(&self, from: usize) {
        let Some((obj, size)) = self.full else { return };
        let bs = self.cmp.bs as u64;
        let max = (DEST_READ as u64 / bs).max(1) as u32;
        for (b, n) in spans_with(&self.needed[from..], max, full_gap(self.changed.is_some())) {
            let off = b as u64 * bs;
            if off < size {
                obj.will_need(off, (n as u64 * bs).min(size - off));
            }
        }
    }

    /// Blocks `first..first + n` (all below `trusted_cap`): each kept when the destination's
    /// page is whole, valid and older than the divergence point, else listed in `needed`.
    /// The destination is read in long pieces.
    fn check_run(&mut self, first: u32, n: u32) -> Result<()> {
        if let Some(changed) = self.changed {
            // wal-index route: what the destination's WAL names, or what it does not have,
            // comes from the chain; the rest is kept unread
            let from = self.needed.len();
            for b in first..first.saturating_add(n) {
                if b >= self.dest_blocks || changed.contains(b) {
                    self.needed.push(b);
                } else {
                    self.kept += 1;
                    self.unread += 1;
                }
            }
            self.hint(from);
            return Ok(());
        }
        let bs = self.cmp.bs;
        let per = (DEST_READ / bs).max(1) as u32;
        let mut b = first;
        let end = first.saturating_add(n);
        while b < end {
            let cnt = per.min(end - b);
            let have = self
                .cmp
                .read_dest(b as u64 * bs as u64, cnt as usize * bs)?;
            let from = self.needed.len();
            for j in 0..cnt {
                let lo = j as usize * bs;
                let keep = lo + bs <= have && {
                    let page = &self.cmp.scratch[lo..lo + bs];
                    let blkno = (self.first_block + (b + j) as u64) as u32;
                    check_page(page, blkno, true) == PageCheck::Valid && page_lsn(page) < self.x
                };
                if keep {
                    self.kept += 1;
                } else {
                    self.needed.push(b + j);
                }
            }
            self.hint(from);
            b += cnt;
        }
        Ok(())
    }
}

impl Sink for LsnSink<'_, '_> {
    fn put(&mut self, data: &[u8], off: u64) -> Result<()> {
        if self.changed.is_some() {
            // wal-index route: a newer backup's block is the result's; the destination's
            // block (what the shared history held at X, or what the destination changed)
            // almost never equals it, so it is written without reading the destination
            self.cmp.write(data, off)
        } else {
            self.cmp.sync(data, off)
        }
    }

    fn zeros(&mut self, first: u32, n: u32) -> Result<()> {
        let end = first.saturating_add(n);
        let split = self.trusted_cap.clamp(first, end);
        if split > first {
            self.check_run(first, split - first)?;
        }
        if end > split {
            self.cmp.zero_run(split, end - split)?;
        }
        Ok(())
    }
}

/// What an incremental restore did (or, dry, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// Bytes written into existing or new files.
    pub bytes_written: u64,
    /// Bytes of the restored files in all.
    pub bytes_total: u64,
    pub files_rewritten: u64,
    pub files_created: u64,
    pub files_removed: u64,
    /// Blocks kept without reading the backup (lsn mode; checksum mode with block
    /// checksums).
    pub blocks_kept: u64,
    /// lsn mode, wal-index route: blocks kept without reading the destination either.
    pub blocks_kept_unread: u64,
    /// Bytes of existing destination files read.
    pub dest_bytes_read: u64,
    /// lsn mode: the route taken and why.
    pub route: Option<super::destwal::RouteReport>,
}

/// Runs the in-place restore of the chain's files; `dry` only counts.
pub(super) struct InPlace<'a> {
    pub r: &'a Restorer<'a>,
    pub mode: IncrementalMode,
    pub x: Option<Lsn>,
    pub start_of: HashMap<String, Lsn>,
    pub relseg_size: u32,
    /// Threads for the chunks of one big file.
    pub jobs: usize,
    pub dry: bool,
    pub sparse: &'a (dyn Fn(&str) -> bool + Sync),
    pub written: AtomicU64,
    pub kept: AtomicU64,
    pub rewritten: AtomicU64,
    pub created: AtomicU64,
    /// Checksum mode: the chain's block checksums, where its backups have them.
    pub crcs: Option<ChainCrcs>,
    /// lsn mode, wal-index route: what the destination changed after the divergence point.
    pub changes: Option<&'a ChangeMap>,
    pub kept_unread: AtomicU64,
    pub dest_read: AtomicU64,
}

impl InPlace<'_> {
    /// Brings one file to the backup's content; returns nothing, counts.
    fn sync_file(&self, e: &FileEntry, fl: &Flusher) -> Result<()> {
        let Some(dest) = self.r.dest(&e.path)? else {
            return Ok(());
        };
        let md = match std::fs::symlink_metadata(&dest) {
            Ok(m) => Some(m),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => return Err(Error::io("stat", &dest, err)),
        };
        if (self.sparse)(&e.path) {
            // an excluded database's file: zeroes of its length, as a hole
            if !self.dry {
                if md.is_some() {
                    durable::remove_file(&dest)?;
                }
                let mut f = durable::DurableFile::create(&dest)?;
                f.file().set_len(e.size).ctx("extend", &dest)?;
                f.commit_deferred(Replace::No)?;
            }
            return Ok(());
        }
        let md = match md {
            Some(m) if m.is_file() => m,
            Some(_) => {
                return Err(Error::invalid(format!(
                    "\"{}\" is not a regular file, the backup has a file there",
                    dest.display()
                )))
            }
            None => {
                if !self.dry {
                    if let Some(df) = self.r.restore_entry(e)? {
                        df.commit_deferred(Replace::No)?;
                    }
                }
                self.written.fetch_add(e.size, Ordering::Relaxed);
                self.created.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        };
        let plan = self.r.plan(e)?;
        let bs = plan.block_size as usize;
        let dest_len = md.len();
        // FSM pages change without WAL (their LSN says nothing): compared like any file
        let rel = relfile::rel_file(&e.path).filter(|r| r.fork.fork != crate::index::FSM_FORKNUM);
        let named = rel.as_ref().and_then(|rf| self.named_blocks(rf));
        if self.untouched(e, &plan, dest_len, rel.as_ref(), named.as_ref()) {
            return Ok(());
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!self.dry)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&dest)
            .ctx("open", &dest)?;
        // no POSIX_FADV_SEQUENTIAL: its doubled readahead, in each of the scan's streams,
        // queued the reads of the backups' differing blocks behind tens of megabytes
        // (measured 10-80 ms slower a restore, 6 A/B pairs out of 6)
        let mk = || {
            let mut c = Compare::new(&file, &dest, dest_len, bs, self.dry, Some(fl));
            c.counter = Some(&self.dest_read);
            c
        };
        let final_len = match plan.shape {
            Shape::Blocks(n) => n as u64 * bs as u64,
            Shape::Copy => e.size,
        };
        let written = match (self.mode, self.x, rel) {
            // wal-index route: a VM page's bits are cleared by heap records that (before
            // PostgreSQL 18.6) do not reference it: rebuilt and compared whole (small)
            (IncrementalMode::Lsn, Some(_), Some(rf))
                if self.changes.is_some() && rf.fork.fork == crate::index::VM_FORKNUM =>
            {
                self.compare_all(&plan, &mk, &dest)?
            }
            (IncrementalMode::Lsn, Some(x), Some(rf)) if final_len % bs as u64 == 0 => {
                let first_block = relfile::segment_first_block(rf.segno, self.relseg_size);
                let dest_blocks = (dest_len / bs as u64).min(u32::MAX as u64) as u32;
                self.lsn_file(
                    &plan,
                    &mk,
                    x,
                    first_block,
                    &dest,
                    named.as_ref(),
                    dest_blocks,
                )?
            }
            (IncrementalMode::Checksum, _, _) => match self.crc_sources(&plan, e) {
                Some(lists) => self.checksum_file(&plan, &lists, &mk, final_len)?,
                None => self.compare_all(&plan, &mk, &dest)?,
            },
            _ => self.compare_all(&plan, &mk, &dest)?,
        };
        if !self.dry && dest_len != final_len {
            file.set_len(final_len).ctx("truncate", &dest)?;
        }
        if written > 0 {
            self.rewritten.fetch_add(1, Ordering::Relaxed);
        }
        self.written.fetch_add(written, Ordering::Relaxed);
        Ok(())
    }

    /// lsn mode, wal-index route: whether the destination's file `e` already is the
    /// result, known without opening it or any stored file: a relation fork (not a
    /// visibility map or free space map) whose every block comes from a backup that started
    /// at or before the divergence point, of which the destination's WAL names none, that
    /// was not created, dropped or truncated after it, that no newer backup holds a block of
    /// (their manifests say so), and whose length is the result's. Its blocks are counted
    /// as kept unread. `rel`: the file's relation fork (free space maps already left out);
    /// `named`: its [`Self::named_blocks`].
    fn untouched(
        &self,
        e: &FileEntry,
        plan: &rebuild::Plan,
        dest_len: u64,
        rel: Option<&relfile::RelFile>,
        named: Option<&BlockSet>,
    ) -> bool {
        let (IncrementalMode::Lsn, Some(x), Some(rf), Some(named)) =
            (self.mode, self.x, rel, named)
        else {
            return false;
        };
        let bs = plan.block_size as u64;
        if bs == 0 || rf.fork.fork == crate::index::VM_FORKNUM || !named.is_empty() {
            return false;
        }
        let n_blocks = match plan.shape {
            Shape::Blocks(n) => n as u64,
            Shape::Copy if e.size == dest_len => e.size / bs,
            Shape::Copy => return false,
        };
        if n_blocks * bs != dest_len {
            return false;
        }
        // the sources newer than X hold no block; the first older one covers the file
        let (split, cap) = self.trusted_split(plan, x);
        let empty =
            |s: &rebuild::Source| matches!(s.stored, Stored::Inc { info, .. } if info.nblocks == 0);
        if split == plan.sources.len()
            || !plan.sources[..split].iter().all(empty)
            || (cap as u64) < n_blocks
        {
            return false;
        }
        self.kept.fetch_add(n_blocks, Ordering::Relaxed);
        self.kept_unread.fetch_add(n_blocks, Ordering::Relaxed);
        true
    }

    /// wal-index route: the blocks of relation file `rf` the destination's WAL names after
    /// the divergence point; `None` (every page checked, as in the page scan) outside the
    /// route, or when the fork was created, dropped or truncated, or its database created
    /// or dropped, after that point.
    fn named_blocks(&self, rf: &relfile::RelFile) -> Option<BlockSet> {
        let changes = self.changes?;
        let fc = changes.blocks_for_file(&rf.fork, rf.segno, self.relseg_size);
        let moved = fork_replaced(Some(changes), &rf.fork);
        (!fc.whole && fc.limit.is_none() && !moved).then_some(fc.blocks)
    }

    /// The first source of `plan` that started at or before `x` (its index;
    /// `plan.sources.len()` when none does) and the block it supplies blocks below (0 when
    /// none does).
    fn trusted_split(&self, plan: &rebuild::Plan, x: Lsn) -> (usize, u32) {
        let trusted = |s: &rebuild::Source| self.start_of.get(&s.backup).is_some_and(|&l| l <= x);
        let split = plan
            .sources
            .iter()
            .position(trusted)
            .unwrap_or(plan.sources.len());
        let cap = plan.sources.get(split).map_or(0, |s| match plan.shape {
            Shape::Copy => u32::MAX,
            Shape::Blocks(_) => s.cap,
        });
        (split, cap)
    }

    /// Checksum mode with block checksums: the block CRC lists of every source of `plan`
    /// (newest first), when each has one and can be read block by block (a plain whole file,
    /// or an incremental file of whole-page records); `None`: rebuild and compare.
    fn crc_sources<'c>(&'c self, plan: &rebuild::Plan, e: &FileEntry) -> Option<Vec<&'c FileCrcs>> {
        let crcs = self.crcs.as_ref()?;
        let mut out = Vec::with_capacity(plan.sources.len());
        for s in &plan.sources {
            let fc = crcs.by_backup.get(&s.backup)?.get(&e.path)?;
            let fits = match (&s.stored, fc) {
                (Stored::Plain, FileCrcs::Whole(_)) => true,
                (Stored::Inc { whole_pages, .. }, FileCrcs::Inc(_)) => {
                    *whole_pages && plan.shape != Shape::Copy
                }
                _ => false,
            };
            if !fits {
                return None;
            }
            out.push(fc);
        }
        (!out.is_empty()).then_some(out)
    }

    /// Checksum mode for one file with block checksums (see [`ChainCrcs`]): the CRC each
    /// block of the result must have (the newest source holding it below its cap, as
    /// rebuild takes it, or a zero page), then one pass over the destination in chunks on
    /// [`Self::scan_threads`] threads, each reading its part in long reads and comparing
    /// every block's CRC; the blocks that differ are read from their source (spans of
    /// them at once), each checked against its CRC, and written. Returns the bytes written.
    fn checksum_file<'f>(
        &self,
        plan: &rebuild::Plan,
        lists: &[&FileCrcs],
        mk: &(dyn Fn() -> Compare<'f> + Sync),
        final_len: u64,
    ) -> Result<u64> {
        let bs = plan.block_size as usize;
        let n_blocks = final_len.div_ceil(bs as u64);
        if n_blocks > u32::MAX as u64 {
            return Err(Error::invalid("file too large"));
        }
        let n_blocks = n_blocks as u32;
        let zero_crc = crc32c::crc32c(&vec![0u8; bs]);
        let mut want = vec![
            Want {
                crc: zero_crc,
                src: NO_SOURCE,
                pos: 0,
            };
            n_blocks as usize
        ];
        for (si, (s, fc)) in plan.sources.iter().zip(lists).enumerate().rev() {
            let cap = match plan.shape {
                Shape::Copy => u32::MAX,
                Shape::Blocks(_) => s.cap,
            };
            match fc {
                FileCrcs::Whole(c) => {
                    // whole blocks of the file; a copy also takes its short tail
                    let held = match plan.shape {
                        Shape::Copy => c.len() as u64,
                        Shape::Blocks(_) => s.size / bs as u64,
                    };
                    let lim = held
                        .min(c.len() as u64)
                        .min(cap as u64)
                        .min(n_blocks as u64);
                    for (j, (w, &crc)) in want.iter_mut().zip(c.iter()).enumerate() {
                        if j as u64 >= lim {
                            break;
                        }
                        *w = Want {
                            crc,
                            src: si as u32,
                            pos: j as u32,
                        };
                    }
                }
                FileCrcs::Inc(r) => {
                    for (i, &(b, crc)) in r.iter().enumerate() {
                        if b < cap {
                            if let Some(w) = want.get_mut(b as usize) {
                                *w = Want {
                                    crc,
                                    src: si as u32,
                                    pos: i as u32,
                                };
                            }
                        }
                    }
                }
            }
        }
        let step = plan.chunk_blocks.max(1);
        let want = &want;
        let res = par(n_blocks.div_ceil(step), self.scan_threads(), |k| {
            let lo = k * step;
            let hi = lo.saturating_add(step).min(n_blocks);
            let mut c = CrcChunk {
                cmp: mk(),
                plan,
                want,
                final_len,
                objs: (0..plan.sources.len()).map(|_| None).collect(),
                diff: Vec::new(),
                kept: 0,
            };
            let t = std::time::Instant::now();
            c.scan(lo, hi, &*self.r.progress)?;
            let (ts, nd) = (t.elapsed(), c.diff.len());
            c.fetch()?;
            log::debug!(
                "{} blocks {lo}..{hi}: scan {} ms, {nd} differ, fetch {} ms, done at {} ms",
                c.cmp.dest.display(),
                ts.as_millis(),
                (t.elapsed() - ts).as_millis(),
                since_start().as_millis()
            );
            Ok((c.cmp.written, c.kept))
        })?;
        self.kept
            .fetch_add(res.iter().map(|r| r.1).sum(), Ordering::Relaxed);
        Ok(res.iter().map(|r| r.0).sum())
    }

    /// Checksum mode for one file: every chunk rebuilt and compared (chunks on `jobs`
    /// threads), every source verified; returns the bytes written.
    fn compare_all<'f>(
        &self,
        plan: &rebuild::Plan,
        mk: &(dyn Fn() -> Compare<'f> + Sync),
        dest: &Path,
    ) -> Result<u64> {
        let res = par(plan.chunks, self.scan_threads(), |k| {
            let mut c = mk();
            let p = rebuild::run_chunk_to(plan, k, &mut c, &*self.r.progress)?;
            Ok((p, c.written))
        })?;
        let written = res.iter().map(|r| r.1).sum();
        let parts: Vec<_> = res.into_iter().map(|r| r.0).collect();
        rebuild::verify(plan, &parts, dest)?;
        Ok(written)
    }

    /// lsn mode for one relation file (see the module docs); returns the bytes written.
    ///
    /// One pass over the destination in chunks on [`Self::scan_threads`] threads: each
    /// chunk reads its part of the destination in long reads, keeps the pages it may keep,
    /// asks for the FULL's blocks of the others as it finds them (readahead hints, so those
    /// random reads run during the scan) and, at its end, reads, checks and writes them.
    #[allow(clippy::too_many_arguments)]
    fn lsn_file<'f>(
        &self,
        plan: &rebuild::Plan,
        mk: &(dyn Fn() -> Compare<'f> + Sync),
        x: Lsn,
        first_block: u64,
        dest: &Path,
        changed: Option<&BlockSet>,
        dest_blocks: u32,
    ) -> Result<u64> {
        let (split, trusted_cap) = self.trusted_split(plan, x);
        let n_blocks = match plan.shape {
            Shape::Blocks(n) => n,
            Shape::Copy => {
                (plan.sources.first().map_or(0, |s| s.size) / plan.block_size as u64) as u32
            }
        };
        let older = &plan.sources[split..];
        // the single plain FULL the needed blocks are read from, block by block
        let full_src = match older {
            [src] if matches!(src.stored, Stored::Plain) => Some(src),
            _ => None,
        };
        let full_obj = full_src.map(|s| s.open()).transpose()?;
        let full = full_src.zip(full_obj.as_ref());
        let newer = plan.sources[..split].to_vec();
        let sink = || LsnSink {
            cmp: mk(),
            x,
            trusted_cap,
            first_block,
            needed: Vec::new(),
            kept: 0,
            full: full.map(|(s, o)| (o, s.size)),
            changed,
            dest_blocks,
            unread: 0,
        };
        // the end of a chunk: the needed blocks from the FULL, or listed for a rebuild
        let unread = AtomicU64::new(0);
        let done = |mut s: LsnSink<'f, '_>| -> Result<(u64, u64, Vec<u32>)> {
            if let Some((src, obj)) = full {
                // wal-index route: the changed blocks are written without reading them
                let compare = s.changed.is_none();
                fetch_blocks(src, obj, &s.needed, first_block, &mut s.cmp, compare)?;
                s.needed.clear();
            }
            unread.fetch_add(s.unread, Ordering::Relaxed);
            Ok((s.cmp.written, s.kept, s.needed))
        };
        let threads = self.scan_threads();
        let res: Vec<(u64, u64, Vec<u32>)> = if newer.is_empty() {
            // every block comes from backups older than the divergence: scan in chunks
            let step = plan.chunk_blocks.max(1);
            par(n_blocks.div_ceil(step), threads, |k| {
                let mut s = sink();
                let lo = k * step;
                s.zeros(lo, step.min(n_blocks - lo))?;
                done(s)
            })?
        } else {
            let part = rebuild::Plan::new(
                Shape::Blocks(n_blocks),
                newer,
                plan.block_size,
                plan.chunk_blocks,
                plan.window_blocks,
            );
            let res = par(part.chunks, threads, |k| {
                let mut s = sink();
                let p = rebuild::run_chunk_to(&part, k, &mut s, &*self.r.progress)?;
                Ok((p, done(s)?))
            })?;
            let parts: Vec<_> = res.iter().map(|r| r.0.clone()).collect();
            rebuild::verify(&part, &parts, dest)?;
            res.into_iter().map(|r| r.1).collect()
        };
        let written: u64 = res.iter().map(|r| r.0).sum();
        self.kept
            .fetch_add(res.iter().map(|r| r.1).sum(), Ordering::Relaxed);
        if res.iter().all(|r| r.2.is_empty()) {
            self.kept_unread
                .fetch_add(unread.load(Ordering::Relaxed), Ordering::Relaxed);
            return Ok(written);
        }
        // needed blocks and no single plain FULL: rebuild the whole file as checksum mode
        Ok(written + self.compare_all(plan, mk, dest)?)
    }

    /// Threads that read the destination: twice `jobs`, since each mostly waits for the
    /// device (a cold read on this kind of VM is fastest with about four sequential streams;
    /// the checks cost little CPU).
    fn scan_threads(&self) -> usize {
        self.jobs.max(1) * 2
    }

    /// Brings every file to the backup's content. First the small files (a cluster has
    /// about a thousand, of a block or a few, each a few syscalls and one or two small
    /// reads) on [`SMALL_THREADS`] threads, so that their reads overlap while the device is
    /// otherwise idle (beside the big files' scans each waits behind megabytes of
    /// readahead: measured ~10 ms a file); then the others, biggest first, on `jobs`
    /// threads. In lsn mode's wal-index route the small files run beside the big ones.
    ///
    /// `extra` ([`list_extra`]: nothing the backup has) is removed beside the big files:
    /// the unlinks of the destination's old WAL segments (~2 ms each, 16 MiB of extents
    /// freed) then cost no time of their own (before the small files, they slowed them).
    pub fn sync_files(
        &self,
        files: &[&FileEntry],
        jobs: usize,
        extra: &[(PathBuf, bool)],
    ) -> Result<()> {
        let mut order: Vec<&FileEntry> = files.to_vec();
        order.sort_by_key(|e| std::cmp::Reverse(e.size));
        let split = order.partition_point(|e| e.size >= SMALL_FILE);
        let (big, small) = order.split_at(split);
        let small_pool = |fl: &Flusher| {
            let r = self.pool(small, SMALL_THREADS, fl);
            phase(&format!("{} small files done", small.len()));
            r
        };
        // the wal-index route reads no big file whole: the small files, run beside the big
        // files' random reads, fill a queue those leave room in (4 A/B pairs: ~8 ms less)
        let beside = self.changes.is_some();
        Flusher::with(|fl| {
            if !beside {
                small_pool(fl)?;
            }
            std::thread::scope(|s| {
                let sm = beside.then(|| s.spawn(|| small_pool(fl)));
                let rm = (!self.dry && !extra.is_empty()).then(|| s.spawn(|| remove_listed(extra)));
                let synced = self.pool(big, jobs, fl);
                synced.and(joined(sm)).and(joined(rm))
            })
        })
    }

    /// [`Self::sync_file`] of `files`, in their order, on `threads` threads; the first
    /// error stops them.
    fn pool(&self, files: &[&FileEntry], threads: usize, fl: &Flusher) -> Result<()> {
        let next = AtomicUsize::new(0);
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1).min(files.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&e) = files.get(i) else { break };
                    if first_err.lock().map(|g| g.is_some()).unwrap_or(true) {
                        break;
                    }
                    if let Err(err) = self.sync_file(e, fl) {
                        let err = err.context(format!("restoring \"{}\"", e.path));
                        if let Ok(mut g) = first_err.lock() {
                            g.get_or_insert(err);
                        }
                        break;
                    }
                });
            }
        });
        match first_err.into_inner().ok().flatten() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The result of a scoped thread, if one was started.
fn joined(h: Option<std::thread::ScopedJoinHandle<'_, Result<()>>>) -> Result<()> {
    match h.map(|h| h.join()) {
        None => Ok(()),
        Some(Ok(r)) => r,
        Some(Err(_)) => Err(Error::invalid("a restore thread panicked")),
    }
}

/// Whether the fork was created, dropped or truncated after the divergence point (a new
/// relfilenode reusing a number, a drop and re-creation, pages cut and re-extended with
/// zeros that WAL does not show): its pages are then each checked, as in the page scan.
fn fork_replaced(changes: Option<&ChangeMap>, key: &RelFork) -> bool {
    changes
        .and_then(|m| m.fork(key))
        .is_some_and(|f| f.created || f.dropped || f.limit_block.is_some())
}

/// Files smaller than this are restored first, [`SMALL_THREADS`] at a time.
const SMALL_FILE: u64 = 1 << 20;

/// Threads for the small files: each mostly waits for one small read.
const SMALL_THREADS: usize = 16;

/// The block checksums of an incremental restore's chain (checksum mode), by backup id and
/// manifest path, every list checked against its manifest entry when loaded ([`load_crcs`]).
pub struct ChainCrcs {
    by_backup: HashMap<String, HashMap<String, FileCrcs>>,
}

/// Loads the block checksums objects of the chain's backups that have one (`chain` newest
/// first; `newest` the newest backup's manifest, `older[i]` that of `chain[i + 1]`), each
/// checked by [`crate::backup::stored::block_crcs`]: a missing or damaged one is an error
/// naming it, never a silent fallback.
pub fn load_crcs(
    catalog: &crate::catalog::Catalog,
    chain: &[&BackupMeta],
    newest: &[FileEntry],
    older: &[HashMap<String, FileEntry>],
) -> Result<ChainCrcs> {
    let repo = catalog.repo();
    // one thread a backup: each object is read and every list checked against the manifest
    // (a CRC combine per block), about 10 ms a backup of this size
    let loaded: Vec<Result<Option<HashMap<String, FileCrcs>>>> = std::thread::scope(|s| {
        let handles: Vec<_> = chain
            .iter()
            .enumerate()
            .map(|(i, b)| {
                s.spawn(move || {
                    let entries: Vec<&FileEntry> = if i == 0 {
                        newest.iter().collect()
                    } else {
                        older
                            .get(i - 1)
                            .map(|m| m.values().collect())
                            .unwrap_or_default()
                    };
                    crate::backup::stored::block_crcs(repo, b, &entries)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::invalid("a block checksums thread panicked")))
            })
            .collect()
    });
    let mut by_backup = HashMap::new();
    for (b, r) in chain.iter().zip(loaded) {
        if let Some(files) = r? {
            by_backup.insert(b.id.clone(), files);
        }
    }
    Ok(ChainCrcs { by_backup })
}

/// No source: the block is a zero page.
const NO_SOURCE: u32 = u32::MAX;

/// What a block of the result must be: its CRC, and where it comes from (`src` indexes the
/// plan's sources; `pos` is the block of a whole file, or the record of an incremental one).
#[derive(Clone, Copy)]
struct Want {
    crc: u32,
    src: u32,
    pos: u32,
}

/// One chunk of [`InPlace::checksum_file`].
struct CrcChunk<'a, 'p> {
    cmp: Compare<'a>,
    plan: &'p rebuild::Plan,
    want: &'p [Want],
    final_len: u64,
    /// The sources opened so far.
    objs: Vec<Option<rebuild::Obj>>,
    /// Blocks that differ, ascending.
    diff: Vec<u32>,
    /// Blocks found equal: kept without reading the backup.
    kept: u64,
}

impl CrcChunk<'_, '_> {
    fn bs(&self) -> usize {
        self.cmp.bs
    }

    /// Bytes of block `b` in the result (the last block of a copy may be short).
    fn blen(&self, b: u32) -> usize {
        let off = b as u64 * self.bs() as u64;
        (self.final_len.saturating_sub(off)).min(self.bs() as u64) as usize
    }

    fn obj(&mut self, si: usize) -> Result<&rebuild::Obj> {
        let slot = self
            .objs
            .get_mut(si)
            .ok_or_else(|| Error::invalid("no such source"))?;
        if slot.is_none() {
            let src = self
                .plan
                .sources
                .get(si)
                .ok_or_else(|| Error::invalid("no such source"))?;
            *slot = Some(src.open()?);
        }
        slot.as_ref()
            .ok_or_else(|| Error::invalid("no such source"))
    }

    /// Where block `b`'s bytes are in its source, and how many.
    fn stored_range(&self, w: Want) -> (u64, u64) {
        let bs = self.bs() as u64;
        match self.plan.sources.get(w.src as usize).map(|s| &s.stored) {
            Some(Stored::Inc { .. }) => (
                crate::format::incfile::record_offset(w.pos, bs as u32),
                crate::format::incfile::RECORD_HEADER_LEN as u64 + bs,
            ),
            _ => (w.pos as u64 * bs, bs),
        }
    }

    /// Compares blocks `lo..hi` of the destination with the CRCs they must have: the
    /// destination read in long pieces; the differing blocks are listed (and their
    /// sources asked to read ahead).
    fn scan(&mut self, lo: u32, hi: u32, progress: &dyn Progress) -> Result<()> {
        let bs = self.bs();
        let per = (DEST_READ / bs).max(1) as u32;
        let mut b = lo;
        while b < hi {
            let cnt = per.min(hi - b);
            let off = b as u64 * bs as u64;
            let len = (cnt as u64 * bs as u64).min(self.final_len - off) as usize;
            let have = self.cmp.read_dest(off, len)?;
            let from = self.diff.len();
            for j in 0..cnt {
                let blk = b + j;
                let lo_b = j as usize * bs;
                let blen = self.blen(blk);
                let w = self.want.get(blk as usize).copied();
                let same = lo_b + blen <= have
                    && w.is_some_and(|w| {
                        self.cmp
                            .scratch
                            .get(lo_b..lo_b + blen)
                            .is_some_and(|d| crc32c::crc32c(d) == w.crc)
                    });
                if same {
                    self.kept += 1;
                } else {
                    self.diff.push(blk);
                }
            }
            self.hint(from)?;
            progress.inc(len as u64);
            b += cnt;
        }
        Ok(())
    }

    /// Readahead hints for the sources of `diff[from..]`.
    fn hint(&mut self, from: usize) -> Result<()> {
        if self.cmp.dry {
            return Ok(());
        }
        let mut ranges = Vec::new();
        for i in from..self.diff.len() {
            let Some(w) = self
                .diff
                .get(i)
                .and_then(|&b| self.want.get(b as usize))
                .copied()
            else {
                continue;
            };
            if w.src != NO_SOURCE {
                let (off, len) = self.stored_range(w);
                ranges.push((w.src, off, len));
            }
        }
        for (src, off, len) in adjacent_runs(&ranges) {
            self.obj(src as usize)?.will_need(off, len);
        }
        Ok(())
    }

    /// Reads the differing blocks from their sources, each checked against its CRC, and
    /// writes them (dry: counts them).
    fn fetch(&mut self) -> Result<()> {
        let bs = self.bs();
        let plan = self.plan;
        let diff = std::mem::take(&mut self.diff);
        // by source, ascending
        let mut by_src: HashMap<u32, Vec<u32>> = HashMap::new();
        for &b in &diff {
            if let Some(w) = self.want.get(b as usize) {
                by_src.entry(w.src).or_default().push(b);
            }
        }
        let zeros = vec![0u8; bs];
        let mut buf: Vec<u8> = Vec::new();
        let mut srcs: Vec<u32> = by_src.keys().copied().collect();
        srcs.sort_unstable();
        for si in srcs {
            let blocks = by_src.get(&si).map(|v| v.as_slice()).unwrap_or_default();
            if si == NO_SOURCE {
                for &b in blocks {
                    let off = b as u64 * bs as u64;
                    // past the destination's end a zero page is a hole
                    if off < self.cmp.dest_len {
                        let n = self.blen(b);
                        self.cmp.write(&zeros[..n], off)?;
                    }
                }
                continue;
            }
            if self.cmp.dry {
                for &b in blocks {
                    self.cmp.written += self.blen(b) as u64;
                }
                continue;
            }
            let src = plan
                .sources
                .get(si as usize)
                .ok_or_else(|| Error::invalid("no such source"))?;
            let inc = matches!(src.stored, Stored::Inc { .. });
            let rec = if inc {
                crate::format::incfile::RECORD_HEADER_LEN
            } else {
                0
            };
            let unit = rec + bs;
            let pos: Vec<u32> = blocks
                .iter()
                .filter_map(|&b| self.want.get(b as usize).map(|w| w.pos))
                .collect();
            // only the blocks asked for during the scan (each hinted then): bridging a gap
            // would read blocks nobody asked for, synchronously (bridging gaps of up to 4
            // blocks, hinted too, measured no faster)
            for ((p0, n), runs) in reads_with(&pos, (DEST_READ / unit).max(1) as u32, 0) {
                let (start, _) = self.stored_range(Want {
                    crc: 0,
                    src: si,
                    pos: p0,
                });
                // a whole file's span may end in its short tail
                let end = if inc {
                    start + n as u64 * unit as u64
                } else {
                    ((p0 + n) as u64 * bs as u64).min(src.size)
                };
                let len = (end - start) as usize;
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                let obj = self.obj(si as usize)?;
                rebuild::read_stored_at(obj, src, start, &mut buf[..len])?;
                for (first, k) in runs {
                    for p in first..first + k {
                        let at = (p - p0) as usize * unit;
                        // the block this position gives: the same for a whole file, the
                        // record's for an incremental one
                        let i = pos.partition_point(|&q| q < p);
                        let b = *blocks
                            .get(i)
                            .ok_or_else(|| Error::invalid("block list out of step"))?;
                        let blen = self.blen(b);
                        let w = self
                            .want
                            .get(b as usize)
                            .copied()
                            .ok_or_else(|| Error::invalid("block out of range"))?;
                        if inc {
                            let h = buf.get(at..at + rec).unwrap_or_default();
                            let blkno = h.get(..4).and_then(|x| x.first_chunk::<4>());
                            let slen = h.get(4..8).and_then(|x| x.first_chunk::<4>());
                            if blkno.map(|x| u32::from_le_bytes(*x)) != Some(b)
                                || slen.map(|x| u32::from_le_bytes(*x)) != Some(bs as u32)
                            {
                                return Err(Error::corruption(format!(
                                    "{}: record {p} is not a whole page of block {b} (backup {})",
                                    src.path().display(),
                                    src.backup
                                )));
                            }
                        }
                        let data = buf
                            .get(at + rec..at + rec + blen)
                            .ok_or_else(|| Error::invalid("short read"))?;
                        if crc32c::crc32c(data) != w.crc {
                            return Err(Error::corruption(format!(
                                "{}: block {b} does not match its block checksum (backup {})",
                                src.path().display(),
                                src.backup
                            )));
                        }
                        if inc {
                            self.cmp.write(data, b as u64 * bs as u64)?;
                        }
                    }
                    if !inc {
                        // a whole file's run is the result's run: written at once
                        let lo = (first - p0) as usize * bs;
                        let hi = (((first + k) as u64 * bs as u64).min(end) - start) as usize;
                        let data = buf
                            .get(lo..hi)
                            .ok_or_else(|| Error::invalid("short read"))?;
                        self.cmp.write(data, first as u64 * bs as u64)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// lsn mode: blocks `needed` (ascending) of a plain FULL into the destination, each page
/// checked against its data checksum (the stored file's checksum cannot cover single
/// blocks): runs of consecutive blocks read at once; a block past the FULL's end is a zero
/// page.
fn fetch_blocks(
    src: &rebuild::Source,
    obj: &rebuild::Obj,
    needed: &[u32],
    first_block: u64,
    cmp: &mut Compare<'_>,
    compare: bool,
) -> Result<()> {
    let bs = cmp.bs as u32;
    let in_full = |b: u32| (b as u64 + 1) * bs as u64 <= src.size;
    // blocks past the FULL's end are zero pages
    let split = needed.partition_point(|&b| in_full(b));
    for &b in &needed[split..] {
        cmp.zero(b)?;
    }
    let needed = &needed[..split];
    let mut buf: Vec<u8> = Vec::new();
    let max = (DEST_READ / bs as usize).max(1) as u32;
    for ((b, n), runs) in reads_with(needed, max, full_gap(!compare)) {
        let len = n as usize * bs as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        rebuild::read_plain_blocks(obj, src, b, n, bs, &mut buf)?;
        // the needed blocks of the span: checked, then runs of them compared and written
        for (first, k) in runs {
            let lo = (first - b) as usize * bs as usize;
            let data = &buf[lo..lo + k as usize * bs as usize];
            for (j, page) in data.chunks_exact(bs as usize).enumerate() {
                let blk = first as u64 + j as u64;
                if let PageCheck::Bad(why) = check_page(page, (first_block + blk) as u32, true) {
                    return Err(Error::corruption(format!(
                        "{}: block {blk}: {why} (backup {})",
                        src.path().display(),
                        src.backup
                    )));
                }
            }
            if compare {
                cmp.sync(data, first as u64 * bs as u64)?;
            } else {
                cmp.write(data, first as u64 * bs as u64)?;
            }
        }
    }
    Ok(())
}

/// Blocks of the FULL read in one piece across a gap of up to this many: [`SPAN_GAP`] in
/// the page scan (whose needed blocks come in dense runs), none in the wal-index route: its
/// changed blocks are scattered (5% of a table's pages, at random, had spans bridging most
/// of the file), all hinted at once, then read one run each.
fn full_gap(wal_index: bool) -> u32 {
    if wal_index {
        0
    } else {
        SPAN_GAP
    }
}

/// Ranges `(source, offset, length)` in their order, those of a source that continue its
/// previous one joined: one readahead hint for a run of adjacent records of an incremental
/// file (most of its records differ), not one per block.
fn adjacent_runs(ranges: &[(u32, u64, u64)]) -> Vec<(u32, u64, u64)> {
    let mut out: Vec<(u32, u64, u64)> = Vec::new();
    // the index in `out` of each source's open run
    let mut open: Vec<(u32, usize)> = Vec::new();
    for &(src, off, len) in ranges {
        match open.iter_mut().find(|o| o.0 == src) {
            Some(o) if out.get(o.1).is_some_and(|r| off >= r.1 && off <= r.1 + r.2) => {
                if let Some(r) = out.get_mut(o.1) {
                    r.2 = r.2.max(off + len - r.1);
                }
            }
            Some(o) => {
                o.1 = out.len();
                out.push((src, off, len));
            }
            None => {
                open.push((src, out.len()));
                out.push((src, off, len));
            }
        }
    }
    out
}

/// Blocks `(first, count)`.
type Run = (u32, u32);

/// [`spans`] of `needed`, each with the runs of consecutive needed blocks inside it (a run
/// never crosses the end of its span).
#[cfg(test)]
fn reads(needed: &[u32], max: u32) -> Vec<(Run, Vec<Run>)> {
    reads_with(needed, max, SPAN_GAP)
}

/// [`reads`] bridging gaps of up to `gap` blocks.
fn reads_with(needed: &[u32], max: u32, gap: u32) -> Vec<(Run, Vec<Run>)> {
    let mut out = Vec::new();
    let mut i = 0;
    for (b, n) in spans_with(needed, max, gap) {
        let mut runs = Vec::new();
        while i < needed.len() && needed[i] < b + n {
            let first = needed[i];
            let mut k = 1u32;
            while needed.get(i + k as usize) == Some(&(first + k)) && first + k < b + n {
                k += 1;
            }
            runs.push((first, k));
            i += k as usize;
        }
        out.push(((b, n), runs));
    }
    out
}

/// Blocks at most this far apart are read in one piece: reading the gap costs less than
/// one more random read.
const SPAN_GAP: u32 = 16;

/// The ascending blocks `v` as spans `(first, count)` to read at once: a span takes the next
/// block while the gap to it is at most [`SPAN_GAP`] and the span stays within `max`
/// blocks.
#[cfg(test)]
fn spans(v: &[u32], max: u32) -> Vec<(u32, u32)> {
    spans_with(v, max, SPAN_GAP)
}

/// [`spans`] bridging gaps of up to `gap` blocks.
fn spans_with(v: &[u32], max: u32, gap: u32) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let first = v[i];
        let mut last = first;
        i += 1;
        while i < v.len() && v[i] - last <= gap + 1 && v[i] - first < max {
            last = v[i];
            i += 1;
        }
        out.push((first, last - first + 1));
    }
    out
}

/// Runs `f(k)` for `k` in `0..n` on up to `jobs` threads; the results in order, or the
/// first error.
fn par<T: Send>(n: u32, jobs: usize, f: impl Fn(u32) -> Result<T> + Sync) -> Result<Vec<T>> {
    if n <= 1 || jobs <= 1 {
        return (0..n).map(&f).collect();
    }
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<Result<T>>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs.min(n as usize) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n as usize {
                    break;
                }
                let r = f(k as u32);
                let failed = r.is_err();
                if let Ok(mut g) = out.lock() {
                    g[k] = Some(r);
                }
                if failed {
                    next.store(n as usize, Ordering::Relaxed);
                    break;
                }
            });
        }
    });
    let v = out
        .into_inner()
        .map_err(|_| Error::invalid("a restore thread panicked"))?;
    if let Some(i) = v.iter().position(|r| matches!(r, Some(Err(_)))) {
        if let Some(Some(Err(e))) = v.into_iter().nth(i) {
            return Err(e);
        }
        return Err(Error::invalid("a restore chunk failed"));
    }
    let mut res = Vec::with_capacity(n as usize);
    for (k, r) in v.into_iter().enumerate() {
        match r {
            Some(r) => res.push(r?),
            None => {
                return Err(Error::invalid(format!("chunk {k} did not run")));
            }
        }
    }
    Ok(res)
}

/// Every file and directory below `root` that `keep` (manifest paths and their parents,
/// relative to `root`) does not name, each with whether it is a directory (not followed
/// into); links are listed, never followed. `global/pg_control` is handled by the caller.
/// Reads directories only: [`remove_listed`] removes them.
pub fn list_extra(root: &Path, keep: &HashSet<String>) -> Result<Vec<(PathBuf, bool)>> {
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        for e in std::fs::read_dir(&dir).ctx("read directory", &dir)? {
            let e = e.ctx("read directory", &dir)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type().ctx("stat", &e.path())?;
            if keep.contains(&r) {
                if ft.is_dir() {
                    stack.push(r);
                }
                continue;
            }
            if r == "global/pg_control" {
                continue;
            }
            out.push((e.path(), ft.is_dir()));
        }
    }
    Ok(out)
}

/// Removes what [`list_extra`] listed (a directory with all below it).
pub fn remove_listed(extra: &[(PathBuf, bool)]) -> Result<()> {
    for (p, is_dir) in extra {
        if *is_dir {
            std::fs::remove_dir_all(p).ctx("remove", p)?;
        } else {
            std::fs::remove_file(p).ctx("remove", p)?;
        }
    }
    Ok(())
}

/// Paths the backup has (files and directories) and every parent of them.
pub fn keep_set(entries: &[FileEntry]) -> HashSet<String> {
    let mut keep = HashSet::new();
    for e in entries {
        let mut p = e.path.as_str();
        keep.insert(p.to_string());
        while let Some((parent, _)) = p.rsplit_once('/') {
            keep.insert(parent.to_string());
            p = parent;
        }
    }
    keep
}

/// The starts of the chain's backups, by id.
pub fn starts(chain: &[&BackupMeta]) -> HashMap<String, Lsn> {
    chain.iter().map(|b| (b.id.clone(), b.start_lsn)).collect()
}

/// Files of `entries` an incremental restore brings over (pg_control apart).
pub fn files(entries: &[FileEntry]) -> Vec<&FileEntry> {
    entries
        .iter()
        .filter(|e| e.storage != Storage::Dir && e.path != "global/pg_control")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination promoted off the chain's timeline passes only when its
    /// backup_label.old shows its recovery began at or after the start of the newest backup
    /// at or before the divergence point.
    #[test]
    fn redo_at_promotion_needs_a_recent_recovery_start() {
        use crate::backup::meta::{test_meta, Mode};
        let dir = tempfile::tempdir().unwrap();
        let mut full = test_meta("F", Mode::Full, None);
        full.start_lsn = Lsn(0x4F00_0028);
        let mut page = test_meta("P", Mode::Page, Some("F"));
        page.start_lsn = Lsn(0x9000_0028);
        let chain = [&page, &full];
        let x = Lsn(0x5000_0000);
        // not promoted off the chain's timeline: nothing to prove
        assert!(redo_at_promotion(dir.path(), &chain, x, false).0);
        // promoted, no backup_label.old: unproven
        let (ok, why) = redo_at_promotion(dir.path(), &chain, x, true);
        assert!(!ok && why.contains("no readable backup_label.old"), "{why}");
        let label = |start: &str| {
            std::fs::write(
                dir.path().join("backup_label.old"),
                format!("START WAL LOCATION: {start} (file 00000001000000000000004F)\nCHECKPOINT LOCATION: 0/4F000060\nSTART TIMELINE: 1\n"),
            )
            .unwrap()
        };
        // restored from the FULL (the newest backup at or before X): proven
        label("0/4F000028");
        assert!(redo_at_promotion(dir.path(), &chain, x, true).0);
        // restored from an older backup: its redo pointer may be older than the FULL's start
        label("0/3F000028");
        let (ok, why) = redo_at_promotion(dir.path(), &chain, x, true);
        assert!(
            !ok && why.contains("0/3F000028") && why.contains("0/4F000028"),
            "{why}"
        );
        // a PAGE at or before X is the newest trusted backup: its start is what counts
        let x2 = Lsn(0x9100_0000);
        label("0/4F000028");
        assert!(!redo_at_promotion(dir.path(), &chain, x2, true).0);
        label("0/90000028");
        assert!(redo_at_promotion(dir.path(), &chain, x2, true).0);
        // garbage is unproven, never an error
        std::fs::write(dir.path().join("backup_label.old"), b"\xff\xfe").unwrap();
        assert!(!redo_at_promotion(dir.path(), &chain, x, true).0);
    }

    #[test]
    fn divergence_of_histories() {
        let s = |v: &[(u32, u64)]| -> Vec<(TimeLineId, Lsn)> {
            v.iter().map(|&(t, l)| (t, Lsn(l))).collect()
        };
        const M: u64 = u64::MAX;
        // same timeline: nowhere
        assert_eq!(divergence(&s(&[(1, M)]), &s(&[(1, M)])), Lsn(M));
        // destination promoted off the chain's timeline at 100
        assert_eq!(divergence(&s(&[(1, 100), (2, M)]), &s(&[(1, M)])), Lsn(100));
        // both promoted, at different points
        assert_eq!(
            divergence(&s(&[(1, 100), (2, M)]), &s(&[(1, 80), (3, M)])),
            Lsn(80)
        );
        // shared TL2 from 100, destination left it at 300
        assert_eq!(
            divergence(&s(&[(1, 100), (2, 300), (4, M)]), &s(&[(1, 100), (2, M)])),
            Lsn(300)
        );
        // different roots
        assert_eq!(divergence(&s(&[(2, M)]), &s(&[(1, M)])), Lsn(0));
    }

    /// Only differing blocks are written; zero pages are written only over non-zero ones;
    /// a dry run writes nothing but counts the same.
    #[test]
    fn compare_writes_only_what_differs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let bs = 8192usize;
        let mut old = vec![1u8; 4 * bs];
        old[2 * bs..3 * bs].fill(0);
        let mut new = old.clone();
        new[bs + 5] = 9; // block 1 differs
        for dry in [true, false] {
            std::fs::write(&p, &old).unwrap();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap();
            let mut c = Compare::new(&f, &p, old.len() as u64, bs, dry, None);
            c.put(&new[..2 * bs], 0).unwrap();
            c.zeros(2, 2).unwrap(); // block 2 is zero already, block 3 is not
            c.put(&[7u8; 8192], 4 * bs as u64).unwrap(); // past the end: written
            assert_eq!(c.written, 3 * bs as u64, "dry {dry}");
            let got = std::fs::read(&p).unwrap();
            if dry {
                assert_eq!(got, old);
            } else {
                assert_eq!(&got[..2 * bs], &new[..2 * bs]);
                assert!(got[2 * bs..4 * bs].iter().all(|&b| b == 0));
                assert!(got[4 * bs..].iter().all(|&b| b == 7));
            }
        }
    }

    #[test]
    fn spans_bridge_small_gaps_only() {
        assert_eq!(spans(&[], 128), vec![]);
        assert_eq!(spans(&[5], 128), vec![(5, 1)]);
        // a gap of 16 blocks is bridged, one of 17 is not
        assert_eq!(spans(&[0, 17, 35], 128), vec![(0, 18), (35, 1)]);
        // a span never exceeds max blocks
        let v: Vec<u32> = (0..300).collect();
        assert_eq!(spans(&v, 128), vec![(0, 128), (128, 128), (256, 44)]);
        // runs stay inside their span and cover the needed blocks exactly, once
        let mut v: Vec<u32> = (10..400).collect();
        v.extend([405, 430, 431, 1000]);
        let r = reads(&v, 128);
        let mut seen = Vec::new();
        for ((b, n), runs) in &r {
            assert!(*n <= 128);
            for &(f, k) in runs {
                assert!(
                    f >= *b && f + k <= b + n,
                    "run {f}+{k} outside span {b}+{n}"
                );
                seen.extend(f..f + k);
            }
        }
        assert_eq!(seen, v);
    }

    #[test]
    fn adjacent_runs_join_per_source() {
        assert_eq!(adjacent_runs(&[]), vec![]);
        // source 0's records at 100, 200 (adjacent), 300 (adjacent); source 1 interleaved
        let r = [
            (0, 100, 100),
            (1, 8192, 8192),
            (0, 200, 100),
            (1, 32768, 8192),
            (0, 300, 100),
            (1, 40960, 8192),
        ];
        assert_eq!(
            adjacent_runs(&r),
            vec![(0, 100, 300), (1, 8192, 8192), (1, 32768, 16384)]
        );
        // a gap, or a range before the run, starts a new run
        assert_eq!(
            adjacent_runs(&[(2, 0, 10), (2, 11, 5), (2, 0, 10)]),
            vec![(2, 0, 10), (2, 11, 5), (2, 0, 10)]
        );
    }

    /// Writeback queued to the flusher thread: what was written is in the file, and the
    /// thread ends with the closure, returning its result.
    #[test]
    fn flusher_thread_takes_the_writeback() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let bs = 8192usize;
        std::fs::write(&p, vec![1u8; 1024 * bs]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let n = Flusher::with(|fl| {
            let mut c = Compare::new(&f, &p, 1024 * bs as u64, bs, false, Some(fl));
            // every other block differs: more than one batch of writeback
            let mut want = vec![1u8; 1024 * bs];
            for b in (0..1024).step_by(2) {
                want[b * bs] = 2;
            }
            c.put(&want, 0).unwrap();
            assert!(c.wb_bytes < WB_BATCH, "a full batch was handed over");
            c.written
        });
        assert_eq!(n, 512 * bs as u64);
        let got = std::fs::read(&p).unwrap();
        for b in 0..1024 {
            assert_eq!(got[b * bs], if b % 2 == 0 { 2 } else { 1 }, "block {b}");
        }
    }

    #[test]
    fn keep_set_holds_parents() {
        let e = FileEntry::dir("base/5/16384".to_string());
        let k = keep_set(&[e]);
        assert!(k.contains("base") && k.contains("base/5") && k.contains("base/5/16384"));
    }
}
