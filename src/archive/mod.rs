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
//!       <segment>.idx                     its block index (crate::format::index)
//!       <segment>.idx-missing             JSON {"reason": ...}: archived, but not indexable
//!       <segment>.partial.lz4             last, incomplete segment of a timeline
//!       <segment>.OOOOOOOO.backup.lz4     backup history file
//!       TTTTTTTT.history.lz4              timeline history file (never overwritten)
//!   spool/push/                           look-ahead acknowledgements
//!     <segment>.ok                        JSON {name, size, crc32c, compressed_size, source}
//!     <segment>.failed                    the background pusher failed on it (error text)
//!     .look-ahead.lock                    held by the one background pusher; holds the
//!                                         name its caller archives itself and its pid;
//!                                         its mtime is the pusher's progress stamp
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
pub mod push;
pub mod show;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, InstanceConfig};
use crate::cli::ShowArgs;
use crate::durable::{self, Replace};
use crate::error::{Error, IoContext, Result};
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
    /// The catalog's marker file: directories are created only while it exists.
    marker: PathBuf,
}

impl WalArchive {
    pub fn open(catalog: &Catalog, instance: &str) -> Result<WalArchive> {
        let cfg = catalog.instance(instance)?;
        Ok(WalArchive {
            dir: catalog.wal_dir(instance),
            spool: catalog.instance_dir(instance).join("spool"),
            marker: catalog.root().join(crate::catalog::CATALOG_MARKER),
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

    /// Creates the look-ahead spool if missing (see [`ensure_dir`](Self::ensure_dir)).
    pub(crate) fn ensure_spool_dir(&self) -> Result<PathBuf> {
        self.ensure_dir(&self.spool)?;
        let d = self.spool_dir();
        self.ensure_dir(&d)?;
        Ok(d)
    }

    /// Creates directory `d` of the archive (a timeline's, its `.tmp`, the spool) when it is
    /// missing: one level only, below a parent that exists, and only while the catalog's
    /// marker exists. A process that outlived its catalog (a detached pusher whose catalog
    /// was deleted) thus never recreates it. The common case, `d` exists, costs one stat.
    pub(crate) fn ensure_dir(&self, d: &Path) -> Result<()> {
        if d.is_dir() {
            return Ok(());
        }
        if !self.marker.is_file() {
            return Err(Error::not_found(format!(
                "the catalog of \"{}\" is gone (no \"{}\"); not recreating it",
                d.display(),
                self.marker.display()
            )));
        }
        match fs::create_dir(d) {
            Ok(()) => durable::fsync_dir(d.parent().unwrap_or(Path::new("."))),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => Ok(()),
            Err(e) => Err(Error::io("create directory", d, e)),
        }
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
                // Without following links, like every read of the archive.
                let fname = f.file_name().to_string_lossy().into_owned();
                let Ok(Some(bytes)) = self.read_small_opt(tli, &fname) else {
                    continue;
                };
                let Ok(ix) = crate::format::index::decode(&bytes, &path.display().to_string())
                else {
                    continue;
                };
                if ix.system_id != self.cfg.system_id {
                    continue; // another cluster's index
                }
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
        let t = self.tli_dir(tli);
        let d = t.join(".tmp");
        if !d.is_dir() {
            self.ensure_dir(&t)?;
            self.ensure_dir(&d)?;
        }
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

    /// Path of `name`'s archived file relative to the archive directory.
    fn rel_path(name: &WalFileName, ext: &str) -> String {
        format!("{:08X}/{name}{ext}", name.tli())
    }

    /// Opens the archived file of `name`: `Ok(None)` only when it is definitely absent
    /// (`ENOENT` in a readable directory). A symlink or other non-regular file, an
    /// unreadable timeline directory or any I/O error is an error, never "absent".
    fn open_archived(&self, name: &WalFileName) -> Result<Option<fs::File>> {
        crate::safepath::open_under_if_exists(&self.dir, &Self::rel_path(name, ".lz4"))
    }

    /// Whether a file (segment, .history, .partial, .backup) is archived: `Ok(false)` only
    /// when it is definitely absent (see [`open_archived`](Self::open_archived)).
    pub fn is_archived(&self, name: &WalFileName) -> Result<bool> {
        self.open_archived(name).map(|f| f.is_some())
    }

    /// Reads, decompresses and verifies an archived file. Corruption is
    /// `ErrorKind::Corruption`; absence is `ErrorKind::NotFound`.
    pub fn read(&self, name: &WalFileName) -> Result<Vec<u8>> {
        self.read_with_meta(name).map(|(_, d)| d)
    }

    pub(crate) fn read_with_meta(
        &self,
        name: &WalFileName,
    ) -> Result<(crate::format::segment::FileMeta, Vec<u8>)> {
        self.read_opt_with_meta(name)?.ok_or_else(|| {
            Error::not_found(format!(
                "{name} is not in the archive ({})",
                self.data_path(name).display()
            ))
        })
    }

    /// Reads and verifies an archived file; `Ok(None)` only when it is definitely absent.
    /// Besides the checksums, the file must be `name`'s and this instance's: the name and
    /// system identifier in its header and, for a segment, in its WAL page header.
    pub(crate) fn read_opt_with_meta(
        &self,
        name: &WalFileName,
    ) -> Result<Option<(crate::format::segment::FileMeta, Vec<u8>)>> {
        use std::io::Read;
        let Some(mut f) = self.open_archived(name)? else {
            return Ok(None);
        };
        let p = self.data_path(name);
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).ctx("read", &p)?;
        let what = p.display().to_string();
        let (meta, data) = crate::format::segment::decode(&bytes, &what)?;
        self.check_meta(&meta, name, &what)?;
        self.check_wal_header(name, &data, &what)?;
        Ok(Some((meta, data)))
    }

    /// The archive header must name `name` and this instance's system.
    fn check_meta(
        &self,
        meta: &crate::format::segment::FileMeta,
        name: &WalFileName,
        what: &str,
    ) -> Result<()> {
        if meta.name != name.to_string() {
            return Err(Error::corruption(format!(
                "{name}: {what}: header names \"{}\", expected {name}",
                meta.name
            )));
        }
        if meta.system_id != self.cfg.system_id {
            return Err(Error::corruption(format!(
                "{name}: {what}: archived by database system {}, not instance \"{}\"'s ({}): \
                 a file of another cluster",
                meta.system_id, self.cfg.name, self.cfg.system_id
            )));
        }
        Ok(())
    }

    /// A segment's (or `.partial`'s) first page header must carry this instance's system
    /// identifier and segment size, and the address its name says.
    fn check_wal_header(&self, name: &WalFileName, data: &[u8], what: &str) -> Result<()> {
        if !matches!(
            name,
            WalFileName::Segment { .. } | WalFileName::Partial { .. }
        ) {
            return Ok(());
        }
        let h =
            crate::wal::read_long_header(data).map_err(|e| e.context(format!("{name}: {what}")))?;
        let mut bad = None;
        if h.system_id != self.cfg.system_id {
            bad = Some(format!(
                "WAL of database system {}, not instance \"{}\"'s ({}): a segment of another cluster",
                h.system_id, self.cfg.name, self.cfg.system_id
            ));
        } else if h.seg_size != self.cfg.wal_segment_size {
            bad = Some(format!(
                "segment size {} in its page header, the instance has {}",
                h.seg_size, self.cfg.wal_segment_size
            ));
        } else if let Some(start) = name.start_lsn(self.cfg.wal_segment_size) {
            if h.pageaddr != start {
                bad = Some(format!(
                    "its first page is at {}, the name says {start}",
                    h.pageaddr
                ));
            }
        }
        match bad {
            Some(why) => Err(Error::corruption(format!("{name}: {what}: {why}"))),
            None => Ok(()),
        }
    }

    /// Like [`read`](Self::read) but `Ok(None)` when definitely absent.
    pub fn read_opt(&self, name: &WalFileName) -> Result<Option<Vec<u8>>> {
        Ok(self.read_opt_with_meta(name)?.map(|(_, d)| d))
    }

    /// Reads only the metadata header of an archived file (cheap: a few hundred bytes) and
    /// checks that it is `name`'s and this instance's.
    pub fn read_meta(&self, name: &WalFileName) -> Result<crate::format::segment::FileMeta> {
        use std::io::Read;
        let p = self.data_path(name);
        let f = self.open_archived(name)?.ok_or_else(|| {
            Error::not_found(format!("{name} is not in the archive ({})", p.display()))
        })?;
        let mut head = Vec::with_capacity(512);
        f.take(64 * 1024 + 8)
            .read_to_end(&mut head)
            .ctx("read", &p)?;
        let what = p.display().to_string();
        let (meta, _) = crate::format::segment::decode_meta(&head, &what)?;
        self.check_meta(&meta, name, &what)?;
        Ok(meta)
    }

    /// Reads a small file of the archive beside the segments (an index, a marker) without
    /// following links; `Ok(None)` only when definitely absent.
    fn read_small_opt(&self, tli: TimeLineId, file: &str) -> Result<Option<Vec<u8>>> {
        use std::io::Read;
        let rel = format!("{tli:08X}/{file}");
        let Some(mut f) = crate::safepath::open_under_if_exists(&self.dir, &rel)? else {
            return Ok(None);
        };
        let mut v = Vec::new();
        f.read_to_end(&mut v).ctx("read", &self.dir.join(&rel))?;
        Ok(Some(v))
    }

    /// Why a decoded index is not segment `segno` of timeline `tli` of this instance (an
    /// index copied from elsewhere); `None` when it is.
    fn foreign_index(&self, ix: &SegmentIndex, tli: TimeLineId, segno: u64) -> Option<String> {
        if ix.system_id != self.cfg.system_id {
            Some(format!(
                "the index is of database system {}, not {}",
                ix.system_id, self.cfg.system_id
            ))
        } else if ix.timeline != tli || ix.segno != segno || ix.seg_size != self.seg_size() {
            Some(format!(
                "the index describes timeline {} segment {:X} ({} byte segments)",
                ix.timeline, ix.segno, ix.seg_size
            ))
        } else {
            None
        }
    }

    /// The index state of segment `segno` on timeline `tli`.
    pub fn index_state(&self, tli: TimeLineId, segno: u64) -> Result<IndexState> {
        let name = self.segment_name(tli, segno);
        if !self.is_archived(&name)? {
            return Ok(IndexState::NotArchived);
        }
        let ip = self.index_path(tli, segno);
        if let Some(bytes) = self.read_small_opt(tli, &format!("{name}.idx"))? {
            // A damaged or foreign index reads as missing: ensure_index rebuilds it from the
            // (verified) segment, so PAGE never merges an index that is not this segment's.
            return Ok(
                match crate::format::index::decode(&bytes, &ip.display().to_string()) {
                    Ok(ix) => match self.foreign_index(&ix, tli, segno) {
                        Some(why) => IndexState::Missing(format!(
                            "index file {} is not this segment's: {why}",
                            ip.display()
                        )),
                        None if ix.pending => IndexState::Pending(ix),
                        None => IndexState::Indexed(ix),
                    },
                    Err(e) => IndexState::Missing(format!("index file unreadable: {e}")),
                },
            );
        }
        let mp = self.missing_path(tli, segno);
        match self.read_small_opt(tli, &format!("{name}.idx-missing"))? {
            Some(bytes) => {
                let reason = serde_json::from_slice::<MissingMarker>(&bytes)
                    .map(|m| m.reason)
                    .unwrap_or_else(|e| format!("marker {} unreadable: {e}", mp.display()));
                Ok(IndexState::Missing(reason))
            }
            None => Ok(IndexState::Missing(
                "not indexed yet (archiving was interrupted before indexing)".into(),
            )),
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
                if pending
                    && self
                        .is_archived(&self.segment_name(tli, segno + 1))
                        .unwrap_or(false)
                {
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
                if let Ok(old) = crate::format::index::decode(&bytes, "") {
                    if !old.pending && self.foreign_index(&old, tli, segno).is_none() {
                        return Ok(());
                    }
                }
            }
        }
        durable::write_file_in(
            &ip,
            &self.tmp_dir(tli)?,
            &crate::format::index::encode(ix),
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
