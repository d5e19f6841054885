//! The WAL archive: `walnut-archive` (archive_command), `walnut-fetch` (restore_command) and
//! `show --archive`, plus the read API that backups use.
//!
//! # Layout
//!
//! Everything is readable with standard tools in an emergency: data files are standard LZ4
//! frames (`lz4 -d`), metadata is JSON.
//!
//! ```text
//! CATALOG/instances/NAME/
//!   wal/                                  the archive (Catalog::wal_dir)
//!     .index.lock                         fs2 lock serialising index (re)writes
//!     TTTTTTTT/                           one directory per timeline (8 hex digits)
//!       <segment>.lz4                     archived segment (see below)
//!       <segment>.idx                     its block index (crate::index::format)
//!       <segment>.idx-missing             JSON {"reason": ...}: archived, but not indexable
//!       <segment>.partial.lz4             last, incomplete segment of a timeline
//!       <segment>.OOOOOOOO.backup.lz4     backup history file
//!       TTTTTTTT.history.lz4              timeline history file (never overwritten)
//!   spool/push/                           look-ahead acknowledgements
//!     <segment>.ok                        JSON {name, size, crc32c, compressed_size, source}
//!     <segment>.failed                    the background pusher failed on it (error text)
//!     .look-ahead.lock                    held by the one background pusher; holds the
//!                                         name its caller archives itself
//! PGDATA/pg_wal/walnut-prefetch/          walnut-fetch's prefetch spool (at most K entries)
//!   <segment>                             decompressed, verified segment
//!   <segment>.json                        {name, size, crc32c}, written after the data
//! ```
//!
//! An archived `*.lz4` file is a small JSON header in an LZ4 *skippable frame* (original
//! name, size, CRC-32C, system id) followed by LZ4 frames (two halves compressed in parallel)
//! with content sizes and xxh32 content checksums (see [`store`]). `lz4 -d F.lz4 F` restores the original and checks it;
//! `head -c 300 F.lz4` shows the header.
//!
//! # Guarantees
//! - A file appears under its final name only complete, fsynced, with its checksum inside,
//!   through a unique temp file + no-replace link + directory fsync ([`crate::durable`]).
//!   `walnut-archive` exits 0 only after that.
//! - A name is never overwritten: the same content offered again is success, different
//!   content is an error ([`crate::ErrorKind::Conflict`]) that leaves the archive untouched.
//! - Indexing never makes archiving fail: a segment that cannot be decoded is stored, and an
//!   `.idx-missing` marker records why (reported by `show --archive`; backups then fall back to
//!   a full scan of the files concerned).
//! - An index is *pending* when its last record continues into a segment not yet archived;
//!   it is rebuilt when that segment arrives (by whichever of the two writers comes second).
//! - `walnut-fetch` verifies every byte before writing `%p`; corruption is exit 200, fatal
//!   to recovery, never "not found".

pub mod fetch;
pub mod mapped;
pub mod push;
pub mod show;
pub mod store;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, InstanceConfig};
use crate::cli::ShowArgs;
use crate::durable::{self, Replace};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::index::SegmentIndex;
use crate::types::{Lsn, TimeLineId, WalFileName};

pub use fetch::fetch_to;

/// The state of one segment's block index in the archive.
#[derive(Clone, Debug)]
pub enum IndexState {
    /// Complete index.
    Indexed(SegmentIndex),
    /// Indexed, but the last record continues into a segment not yet archived.
    Pending(SegmentIndex),
    /// The segment is archived but has no usable index; the reason says why.
    Missing(String),
    /// The segment itself is not in the archive.
    NotArchived,
}

/// One line of a timeline history file: `tli` ended at `switchpoint`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub tli: TimeLineId,
    pub switchpoint: Lsn,
}

/// Contents of an `.idx-missing` marker.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct MissingMarker {
    reason: String,
}

/// Read (and write) access to one instance's WAL archive.
pub struct WalArchive {
    cfg: InstanceConfig,
    dir: PathBuf,
    spool: PathBuf,
}

impl WalArchive {
    pub fn open(catalog: &Catalog, instance: &str) -> Result<WalArchive> {
        let cfg = catalog.instance(instance)?;
        Ok(WalArchive {
            dir: catalog.wal_dir(instance),
            spool: catalog.instance_dir(instance).join("spool"),
            cfg,
        })
    }

    /// The instance's configuration (system id, segment size, ...).
    pub fn config(&self) -> &InstanceConfig {
        &self.cfg
    }

    pub fn seg_size(&self) -> u32 {
        self.cfg.wal_segment_size
    }

    /// The archive directory (`Catalog::wal_dir`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn spool_dir(&self) -> PathBuf {
        self.spool.join("push")
    }

    /// The newest restore point named `name` (`pg_create_restore_point`) recorded in the
    /// block indexes of any timeline, with its timeline and LSN. Reads only the small index
    /// files, never WAL. Unreadable indexes are skipped: the answer is "not found", not an
    /// error, and callers fall back accordingly.
    pub fn find_restore_point(&self, name: &str) -> Result<Option<(TimeLineId, Lsn)>> {
        let mut best: Option<(TimeLineId, Lsn)> = None;
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read directory", &self.dir, e)),
        };
        for tdir in rd {
            let tdir = tdir.ctx("read directory", &self.dir)?;
            let Some(tli) = tdir
                .file_name()
                .to_str()
                .filter(|n| n.len() == 8)
                .and_then(|n| u32::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            let tpath = tdir.path();
            for f in fs::read_dir(&tpath).ctx("read directory", &tpath)? {
                let f = f.ctx("read directory", &tpath)?;
                let path = f.path();
                if path.extension().and_then(|e| e.to_str()) != Some("idx") {
                    continue;
                }
                let Ok(bytes) = fs::read(&path) else { continue };
                let Ok(ix) = crate::index::format::decode(&bytes, &path.display().to_string())
                else {
                    continue;
                };
                for ev in &ix.other_events {
                    if let crate::index::OtherEvent::RestorePoint { lsn, name: n, .. } = ev {
                        if n == name && best.is_none_or(|(_, b)| *lsn > b) {
                            best = Some((tli, *lsn));
                        }
                    }
                }
            }
        }
        Ok(best)
    }

    pub(crate) fn tli_dir(&self, tli: TimeLineId) -> PathBuf {
        self.dir.join(format!("{tli:08X}"))
    }

    /// Where files of timeline `tli` are written before they get their final name: a small
    /// directory beside them (same filesystem), so that removing temp files left by killed
    /// runs never lists the timeline directory, which grows with the archive.
    pub(crate) fn tmp_dir(&self, tli: TimeLineId) -> Result<PathBuf> {
        let d = self.tli_dir(tli).join(".tmp");
        durable::create_dir_all_durable(&d)?;
        Ok(d)
    }

    /// Path of the archived (compressed) file for `name`.
    pub fn data_path(&self, name: &WalFileName) -> PathBuf {
        self.tli_dir(name.tli()).join(format!("{name}.lz4"))
    }

    fn segment_name(&self, tli: TimeLineId, segno: u64) -> WalFileName {
        WalFileName::segment(tli, segno, self.seg_size())
    }

    pub(crate) fn index_path(&self, tli: TimeLineId, segno: u64) -> PathBuf {
        let n = self.segment_name(tli, segno);
        self.tli_dir(tli).join(format!("{n}.idx"))
    }

    pub(crate) fn missing_path(&self, tli: TimeLineId, segno: u64) -> PathBuf {
        let n = self.segment_name(tli, segno);
        self.tli_dir(tli).join(format!("{n}.idx-missing"))
    }

    /// Whether a file (segment, .history, .partial, .backup) is archived.
    pub fn contains(&self, name: &WalFileName) -> bool {
        self.data_path(name).is_file()
    }

    /// Reads, decompresses and verifies an archived file. Corruption is
    /// `ErrorKind::Corruption`; absence is `ErrorKind::NotFound`.
    pub fn read(&self, name: &WalFileName) -> Result<Vec<u8>> {
        self.read_with_meta(name).map(|(_, d)| d)
    }

    pub(crate) fn read_with_meta(&self, name: &WalFileName) -> Result<(store::FileMeta, Vec<u8>)> {
        let p = self.data_path(name);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::not_found(format!(
                    "{name} is not in the archive ({})",
                    p.display()
                )))
            }
            Err(e) => return Err(Error::io("read", &p, e)),
        };
        let (meta, data) = store::decode(&bytes, &p.display().to_string())?;
        if meta.name != name.to_string() {
            return Err(Error::corruption(format!(
                "{}: header names \"{}\", expected {name}",
                p.display(),
                meta.name
            )));
        }
        Ok((meta, data))
    }

    /// Like [`read`](Self::read) but `Ok(None)` when absent.
    pub fn read_opt(&self, name: &WalFileName) -> Result<Option<Vec<u8>>> {
        match self.read(name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == ErrorKind::NotFound && !self.contains(name) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads only the metadata header of an archived file (cheap: a few hundred bytes).
    pub fn read_meta(&self, name: &WalFileName) -> Result<store::FileMeta> {
        use std::io::Read;
        let p = self.data_path(name);
        let f = fs::File::open(&p).ctx("open", &p)?;
        let mut head = Vec::with_capacity(512);
        f.take(64 * 1024 + 8)
            .read_to_end(&mut head)
            .ctx("read", &p)?;
        store::decode_meta(&head, &p.display().to_string()).map(|(m, _)| m)
    }

    /// The index state of segment `segno` on timeline `tli`.
    pub fn index_state(&self, tli: TimeLineId, segno: u64) -> Result<IndexState> {
        let name = self.segment_name(tli, segno);
        if !self.contains(&name) {
            return Ok(IndexState::NotArchived);
        }
        let ip = self.index_path(tli, segno);
        match fs::read(&ip) {
            Ok(bytes) => {
                return Ok(
                    match crate::index::format::decode(&bytes, &ip.display().to_string()) {
                        Ok(ix) if ix.pending => IndexState::Pending(ix),
                        Ok(ix) => IndexState::Indexed(ix),
                        Err(e) => IndexState::Missing(format!("index file unreadable: {e}")),
                    },
                )
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("read", &ip, e)),
        }
        let mp = self.missing_path(tli, segno);
        match fs::read(&mp) {
            Ok(bytes) => {
                let reason = serde_json::from_slice::<MissingMarker>(&bytes)
                    .map(|m| m.reason)
                    .unwrap_or_else(|e| format!("marker {} unreadable: {e}", mp.display()));
                Ok(IndexState::Missing(reason))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(IndexState::Missing(
                "not indexed yet (archiving was interrupted before indexing)".into(),
            )),
            Err(e) => Err(Error::io("read", &mp, e)),
        }
    }

    /// Indexes an archived segment now (and completes pending neighbours) and returns its
    /// state afterwards. Used by backups for segments archived but not yet indexed.
    pub fn ensure_index(&self, tli: TimeLineId, segno: u64) -> Result<IndexState> {
        let state = self.index_state(tli, segno)?;
        if matches!(state, IndexState::Indexed(_) | IndexState::NotArchived) {
            return Ok(state);
        }
        let data = self.read(&self.segment_name(tli, segno))?;
        self.index_and_store(tli, segno, &data, None);
        if segno > 0 {
            self.complete_pending(tli, segno - 1, Some((segno, &data)));
        }
        self.index_state(tli, segno)
    }

    /// Builds the index of a segment whose bytes are `data` and stores it, or an
    /// `.idx-missing` marker when decoding fails. Never fails: indexing must not make
    /// archiving fail. `built` is an index computed already (in parallel with compression).
    pub(crate) fn index_and_store(
        &self,
        tli: TimeLineId,
        segno: u64,
        data: &[u8],
        built: Option<Result<SegmentIndex>>,
    ) {
        let result = match built {
            Some(r) => r,
            None => self.build_index(tli, segno, data, None),
        };
        match result {
            Ok(ix) => {
                let pending = ix.pending;
                if let Err(e) = self.store_index(tli, segno, &ix) {
                    log::warn!(
                        "segment {}: could not store its index: {e}",
                        self.segment_name(tli, segno)
                    );
                    self.store_missing(tli, segno, &format!("could not store index: {e}"));
                }
                // The writer of segno+1 may have looked for our index before it existed:
                // whoever comes second completes it (see the module docs).
                if pending && self.contains(&self.segment_name(tli, segno + 1)) {
                    self.complete_pending(tli, segno, None);
                }
            }
            Err(e) => {
                log::warn!(
                    "segment {} is archived but could not be indexed: {e}",
                    self.segment_name(tli, segno)
                );
                self.store_missing(tli, segno, &e.to_string());
            }
        }
    }

    /// Decodes a segment into its index; `next` (segno+1's bytes) when known already.
    pub(crate) fn build_index(
        &self,
        tli: TimeLineId,
        segno: u64,
        data: &[u8],
        next: Option<(u64, &[u8])>,
    ) -> Result<SegmentIndex> {
        let mut next_fn = |s: u64| -> Result<Option<Vec<u8>>> {
            if let Some((n, bytes)) = next {
                if n == s {
                    return Ok(Some(bytes.to_vec()));
                }
            }
            self.read_opt(&self.segment_name(tli, s))
        };
        crate::index::build::index_segment(tli, segno, data, &mut next_fn)
    }

    /// Like [`build_index`](Self::build_index) for a segment arriving from `src` (in
    /// `pg_wal`): when segno+1 is not archived yet, its file next to `src` is used to
    /// complete a record that crosses into it. That file may still be being written; the
    /// record's CRC covers every byte of it, so a record assembled from it is either
    /// correct or rejected. Any error with it falls back to a pending index, which the
    /// arrival of segno+1 completes. This spares re-decoding segno when segno+1 arrives.
    pub(crate) fn build_index_on_arrival(
        &self,
        tli: TimeLineId,
        segno: u64,
        data: &[u8],
        src: &Path,
    ) -> Result<SegmentIndex> {
        let next_name = self.segment_name(tli, segno + 1);
        let sibling = match src.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.join(next_name.to_string()),
            _ => PathBuf::from(next_name.to_string()),
        };
        let seg_size = u64::from(self.seg_size());
        let mut used_sibling = false;
        // Read lazily: the decoder asks only when the last record crosses the boundary.
        let mut next_fn = |s: u64| -> Result<Option<Vec<u8>>> {
            if s == segno + 1 && fs::metadata(&sibling).is_ok_and(|m| m.len() == seg_size) {
                if let Some(bytes) = read_prefix_zero_padded(&sibling, seg_size) {
                    used_sibling = true;
                    return Ok(Some(bytes));
                }
            }
            self.read_opt(&self.segment_name(tli, s))
        };
        let first = crate::index::build::index_segment(tli, segno, data, &mut next_fn);
        match first {
            Ok(ix) => Ok(ix),
            Err(e) if used_sibling => {
                log::debug!(
                    "{}: completing its last record from \"{}\" failed ({e}); indexing without it",
                    self.segment_name(tli, segno),
                    sibling.display()
                );
                self.build_index(tli, segno, data, None)
            }
            Err(e) => Err(e),
        }
    }

    /// Re-indexes `segno` if its index is pending (or was never written).
    pub(crate) fn complete_pending(&self, tli: TimeLineId, segno: u64, next: Option<(u64, &[u8])>) {
        let state = match self.index_state(tli, segno) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("index state of segment {segno:X}: {e}");
                return;
            }
        };
        // Only a stored pending index is completed here. No index at all means its writer is
        // still at work (it re-checks for segno+1 after storing a pending index, see
        // index_and_store) or was killed (ensure_index rebuilds it when a backup needs it).
        if !matches!(state, IndexState::Pending(_)) {
            return;
        }
        let name = self.segment_name(tli, segno);
        match self.read(&name) {
            Ok(data) => {
                let built = self.build_index(tli, segno, &data, next);
                match built {
                    Ok(ix) => {
                        if let Err(e) = self.store_index(tli, segno, &ix) {
                            log::warn!("segment {name}: could not store its index: {e}");
                        }
                    }
                    Err(e) => {
                        log::warn!("segment {name} could not be indexed: {e}");
                        self.store_missing(tli, segno, &e.to_string());
                    }
                }
            }
            Err(e) => log::warn!("re-indexing {name}: {e}"),
        }
    }

    fn lock_index(&self) -> Result<fs::File> {
        use fs2::FileExt;
        let p = self.dir.join(".index.lock");
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .ctx("open lock file", &p)?;
        f.lock_exclusive().ctx("lock", &p)?;
        Ok(f)
    }

    /// Stores an index durably, under the index lock. A complete index is never replaced
    /// by a pending one (a concurrent writer may have completed it meanwhile).
    fn store_index(&self, tli: TimeLineId, segno: u64, ix: &SegmentIndex) -> Result<()> {
        let _lock = self.lock_index()?;
        let ip = self.index_path(tli, segno);
        if ix.pending {
            if let Ok(bytes) = fs::read(&ip) {
                if let Ok(old) = crate::index::format::decode(&bytes, "") {
                    if !old.pending {
                        return Ok(());
                    }
                }
            }
        }
        durable::write_file_in(
            &ip,
            &self.tmp_dir(tli)?,
            &crate::index::format::encode(ix),
            Replace::Yes,
        )?;
        durable::remove_file(&self.missing_path(tli, segno))
    }

    fn store_missing(&self, tli: TimeLineId, segno: u64, reason: &str) {
        let res = (|| -> Result<()> {
            let _lock = self.lock_index()?;
            if self.index_path(tli, segno).exists() {
                return Ok(());
            }
            let mut json = serde_json::to_vec(&MissingMarker {
                reason: reason.to_string(),
            })?;
            json.push(b'\n');
            durable::write_file_in(
                &self.missing_path(tli, segno),
                &self.tmp_dir(tli)?,
                &json,
                Replace::Yes,
            )
        })();
        if let Err(e) = res {
            log::warn!("could not write the index-missing marker for segment {segno:X}: {e}");
        }
    }

    /// The parsed history of timeline `tli` (empty for timeline 1): the timelines it
    /// descends from, each with the LSN where it ended.
    pub fn timeline_history(&self, tli: TimeLineId) -> Result<Vec<HistoryEntry>> {
        if tli <= 1 {
            return Ok(Vec::new());
        }
        let name = WalFileName::History { tli };
        let data = self.read(&name)?;
        parse_history(&data, &name.to_string())
    }
}

/// How much of the following segment is read to complete a crossing record on arrival.
const SIBLING_PREFIX: usize = 1 << 20;

/// The first [`SIBLING_PREFIX`] bytes of `path`, zero-padded to `size`. Zeros read as the
/// end of WAL, so a record continuing beyond the prefix just leaves the index pending. The
/// padding comes from a zeroed allocation (untouched pages cost nothing), which matters:
/// first-touch page faults were the largest cost of reading a whole 16 MiB neighbour.
fn read_prefix_zero_padded(path: &Path, size: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let size = usize::try_from(size).ok()?;
    let mut buf = vec![0u8; size];
    let n = SIBLING_PREFIX.min(size);
    fs::File::open(path)
        .ok()?
        .read_exact(buf.get_mut(..n)?)
        .ok()?;
    Some(buf)
}

/// Parses a timeline history file: `parentTLI<TAB>X/X<TAB>reason` lines; blank lines and
/// `#` comments are ignored.
pub fn parse_history(data: &[u8], what: &str) -> Result<Vec<HistoryEntry>> {
    let text = std::str::from_utf8(data)
        .map_err(|_| Error::corruption(format!("{what}: history file is not text")))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let bad = || Error::corruption(format!("{what}: line {}: \"{line}\" is invalid", i + 1));
        let tli: TimeLineId = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let switchpoint: Lsn = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        out.push(HistoryEntry { tli, switchpoint });
    }
    Ok(out)
}

pub fn run_show_archive(args: ShowArgs) -> Result<i32> {
    show::run(args)
}

/// Starts `c` as a detached background process (own session, no stdio) and never waits for
/// it: it outlives its caller, reparented to init, which reaps it.
pub(crate) fn spawn_detached(mut c: std::process::Command, what: &str) {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; the closure touches no Rust state.
    unsafe {
        c.pre_exec(|| {
            nix::unistd::setsid().map_err(io::Error::from)?;
            Ok(())
        });
    }
    match c.spawn() {
        Ok(child) => drop(child),
        Err(e) => log::warn!("could not start the {what}: {e}"),
    }
}

/// Threads a background worker uses: the machine's cores, 1 to 4.
pub(crate) fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 4)
}

/// Opens (creating) a lock file and takes its exclusive lock without waiting; `None` when
/// another process holds it.
pub(crate) fn try_lock_file(p: &Path) -> Result<Option<fs::File>> {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .ctx("open lock file", p)?;
    Ok(fs2::FileExt::try_lock_exclusive(&f).ok().map(|_| f))
}

/// The content of lock file `p` while some process holds its lock; `None` when none does.
pub(crate) fn lock_holder(p: &Path) -> Option<String> {
    let f = fs::File::open(p).ok()?;
    if fs2::FileExt::try_lock_shared(&f).is_ok() {
        let _ = fs2::FileExt::unlock(&f);
        return None;
    }
    Some(fs::read_to_string(p).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_parsing() {
        let h = b"1\t0/3000000\tno recovery target specified\n\n# c\n2\t1/A0\tbefore 2000-01-01\n";
        let e = parse_history(h, "00000003.history").unwrap();
        assert_eq!(
            e,
            vec![
                HistoryEntry {
                    tli: 1,
                    switchpoint: Lsn(0x300_0000)
                },
                HistoryEntry {
                    tli: 2,
                    switchpoint: Lsn(0x1_0000_00A0)
                }
            ]
        );
        assert!(parse_history(b"x\ty\n", "h").is_err());
    }
}
