//! The WAL archive: `walnut-archive` (archive_command), `walnut-fetch` (restore_command) and
//! `show --archive`, plus the read API that backups use.
//!
//! Every read and write of the archive goes through the catalog's repository
//! ([`crate::repo`]) by key; the paths below are those of a local catalog.
//!
//! # Layout
//!
//! Everything is readable with standard tools in an emergency: data files are standard LZ4
//! frames (`lz4 -d`), metadata is JSON.
//!
//! ```text
//! CATALOG/instances/NAME/
//!   wal/                                  the archive (key Catalog::wal_key)
//!     .index.lock                         repository lock serialising index writes
//!     TTTTTTTT/                           one directory per timeline (8 hex digits)
//!       <segment>.lz4                     archived segment (see below)
//!       <segment>.idx                     its complete block index (crate::format::index)
//!       <segment>.idx-pending             its pending index (see "Append-only" below)
//!       <segment>.idx-rebuilt             a complete index written where <segment>.idx exists
//!                                         but cannot be used (see below)
//!       <segment>.idx-missing             JSON {"reason": ...}: archived, but not indexable
//!       <segment>.partial.lz4             last, incomplete segment of a timeline
//!       <segment>.OOOOOOOO.backup.lz4     backup history file
//!       TTTTTTTT.history.lz4              timeline history file (never overwritten)
//!     .receive/                           `walnut receive`'s default spool (local working
//!                                         state, never listed as catalog content; see
//!                                         crate::receive): <segment>.partial being filled,
//!                                         status.json, .receive.lock
//!     .receive-spool                      the path of a receive spool elsewhere
//!                                         (`--spool-dir`; local state, crate::receive)
//! PGDATA/pg_wal/walnut-spool/             walnut-archive's look-ahead spool (local working
//!                                         state, not catalog content; --spool-dir)
//!   <segment>.ok                          JSON {name, size, crc32c, compressed_size, source}
//!   <segment>.failed                      the background pusher failed on it (error text)
//!   .look-ahead.lock                      held by the one background pusher; holds the
//!                                         name its caller archives itself and its pid;
//!                                         its mtime is the pusher's progress stamp
//! PGDATA/pg_wal/walnut-prefetch/          walnut-fetch's prefetch spool (at most K entries;
//!                                         --spool-dir)
//!   <segment>                             decompressed, verified segment
//!   <segment>.json                        {name, size, crc32c}, written after the data
//! ```
//!
//! An archived `*.lz4` file is a small JSON header in an LZ4 *skippable frame* (original
//! name, size, CRC-32C, system id) followed by LZ4 frames (two halves compressed in parallel)
//! with content sizes, and xxh32 content checksums in those of `walnut-archive` (`walnut
//! receive` leaves them out: the CRC-32C, verified on every read, guards the content; see
//! [`crate::format::segment`]).
//! `lz4 -d F.lz4 F` restores the original and checks it; `head -c 300 F.lz4` shows the header.
//!
//! # Guarantees
//! - A file appears under its final name only complete, fsynced, with its checksum inside
//!   (the repository's create-only commit: a unique temp file in the timeline's `.tmp/`,
//!   fsync, a no-replace link, a directory fsync). `walnut-archive` exits 0 only after that.
//! - A name is never overwritten: the same content offered again is success, different
//!   content is an error ([`crate::ErrorKind::Conflict`]) that leaves the archive untouched.
//! - Indexing never makes archiving fail: a segment that cannot be decoded is stored, and an
//!   `.idx-missing` marker records why (reported by `show --archive`; a PAGE backup across it
//!   then refuses, asking for DELTA or FULL).
//! - `walnut-fetch` verifies every byte before writing `%p`; corruption is exit 200, fatal
//!   to recovery, never "not found".
//!
//! # Append-only
//! No object of the archive is ever rewritten or deleted (only lifecycle commands delete).
//! The state of a segment's index is derived from the objects that exist:
//! - An index is *pending* when its last record continues into a segment not yet archived.
//!   It is stored as `<segment>.idx-pending`. When that next segment arrives (whichever of
//!   the two writers comes second notices), the complete index is created as
//!   `<segment>.idx`; the pending object is ignored from then on.
//! - The reader's rule, first match wins: a usable (decodable, this segment's, complete)
//!   `<segment>.idx`; a usable `<segment>.idx-rebuilt`; a pending `<segment>.idx` (written
//!   by walnut 0.x, which rewrote pending indexes in place) or `<segment>.idx-pending`; a
//!   damaged or foreign index object (reads as *missing*, with the reason); the
//!   `.idx-missing` marker; nothing (missing, "not indexed yet").
//! - `<segment>.idx-rebuilt` exists because an `.idx` that cannot be used cannot be replaced:
//!   a pending `.idx` of the previous release is completed there, and
//!   [`WalArchive::repair_missing_index`] rebuilds a damaged or foreign `.idx` there (from
//!   the verified segment). There is one such key: a damaged `.idx-rebuilt` stays missing
//!   (PAGE refuses across it; DELTA and FULL do not need it).
//! - `.idx-missing` is create-only and written only while no index object exists; an index
//!   stored later wins over it.

pub mod fetch;
pub mod push;
pub mod show;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, InstanceConfig};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::index::SegmentIndex;
use crate::repo::{Blob, Listing, LockMode, Repo};
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

/// Key suffixes of a segment's index objects (see the module docs).
const IDX: &str = ".idx";
const IDX_PENDING: &str = ".idx-pending";
const IDX_REBUILT: &str = ".idx-rebuilt";
const IDX_MISSING: &str = ".idx-missing";

/// The segment name an index object's file name (`<segment>.idx`, `.idx-pending`,
/// `.idx-rebuilt`) is for; `None` for any other name (`.idx-missing` is a marker, not an
/// index). For cheap scans that count indexed segments without reading them.
pub fn index_object_stem(file: &str) -> Option<&str> {
    [IDX, IDX_PENDING, IDX_REBUILT]
        .iter()
        .find_map(|s| file.strip_suffix(s))
}

/// What a segment's index objects say, before the reader's rule picks one.
enum Found {
    Complete(SegmentIndex),
    Pending(SegmentIndex),
    /// An index object exists but cannot be used (damaged, foreign): why.
    Damaged(String),
    /// Only the `.idx-missing` marker: its reason.
    Marker(String),
    Nothing,
}

/// Read (and write) access to one instance's WAL archive.
pub struct WalArchive {
    cfg: InstanceConfig,
    repo: Arc<dyn Repo>,
    /// Key prefix of the archive (`instances/NAME/wal`).
    prefix: String,
    /// The catalog's root, to name keys in messages.
    root: PathBuf,
    /// `root` joined with `prefix` (see [`WalArchive::dir`]).
    dir: PathBuf,
}

impl WalArchive {
    pub fn open(catalog: &Catalog, instance: &str) -> Result<WalArchive> {
        let cfg = catalog.instance(instance)?;
        let ar = WalArchive {
            repo: catalog.repo_arc(),
            prefix: Catalog::wal_key(instance),
            root: catalog.root().to_path_buf(),
            dir: catalog.root().join(Catalog::wal_key(instance)),
            cfg,
        };
        ar.check_archive_dir(instance)?;
        Ok(ar)
    }

    /// In a store with directories, `add-instance` created the archive's: a missing one is
    /// damage (a moved or deleted archive), so that nothing below reads as "absent" then.
    /// Object stores have no empty prefixes; there an empty archive lists empty.
    fn check_archive_dir(&self, instance: &str) -> Result<()> {
        if self.repo.local_root().is_none() {
            return Ok(());
        }
        let l = self.repo.list(&Catalog::instance_key(instance))?;
        if l.prefixes.iter().any(|p| p == "wal") {
            return Ok(());
        }
        let why = if l.damaged.iter().any(|p| p == "wal") {
            "is a symbolic link or not a directory (no link below the catalog root is followed)"
        } else {
            "is missing"
        };
        Err(Error::corruption(format!(
            "the WAL archive directory \"{}\" {why}",
            self.dir().display()
        )))
    }

    /// The default spool of `walnut receive` (local working state, see [`crate::receive`]):
    /// `<archive>/.receive` in a local catalog (a dot-name, never listed as catalog
    /// content); `None` for a catalog that is not a local directory.
    pub fn receive_spool(&self) -> Option<PathBuf> {
        self.repo
            .local_root()
            .map(|_| self.dir.join(crate::receive::RECEIVE_DIR))
    }

    /// The instance's configuration (system id, segment size, ...).
    pub fn config(&self) -> &InstanceConfig {
        &self.cfg
    }

    pub fn seg_size(&self) -> u32 {
        self.cfg.wal_segment_size
    }

    /// The store the archive lives in.
    pub(crate) fn repo(&self) -> &dyn Repo {
        &*self.repo
    }

    /// The archive's local directory (`CATALOG/instances/NAME/wal`): for messages, and for
    /// tests that damage files on purpose. Reads and writes go through the repository.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where key `key` is, for messages.
    pub(crate) fn describe(&self, key: &str) -> String {
        self.root.join(key).display().to_string()
    }

    /// Key of timeline `tli`'s prefix.
    fn tli_key(&self, tli: TimeLineId) -> String {
        format!("{}/{tli:08X}", self.prefix)
    }

    /// Key of the archived (compressed) file of `name`.
    pub(crate) fn data_key(&self, name: &WalFileName) -> String {
        format!("{}/{name}.lz4", self.tli_key(name.tli()))
    }

    /// Local path of the archived file of `name` (for messages and tests).
    pub fn data_path(&self, name: &WalFileName) -> PathBuf {
        self.root.join(self.data_key(name))
    }

    fn segment_name(&self, tli: TimeLineId, segno: u64) -> WalFileName {
        WalFileName::segment(tli, segno, self.seg_size())
    }

    /// Key of one of a segment's index objects (`suffix`: [`IDX`], [`IDX_PENDING`], ...).
    fn index_key(&self, tli: TimeLineId, segno: u64, suffix: &str) -> String {
        let n = self.segment_name(tli, segno);
        format!("{}/{n}{suffix}", self.tli_key(tli))
    }

    /// The archive's immediate children (`tli` `None`: the timeline prefixes) or timeline
    /// `tli`'s files. A damaged entry (a link, a device) is in [`Listing::damaged`].
    pub fn listing(&self, tli: Option<TimeLineId>) -> Result<Listing> {
        match tli {
            None => self.repo.list(&self.prefix),
            Some(t) => self.repo.list(&self.tli_key(t)),
        }
    }

    /// The timelines that have a prefix in the archive, ascending.
    pub fn timelines(&self) -> Result<Vec<TimeLineId>> {
        let mut v: Vec<TimeLineId> = self
            .listing(None)?
            .prefixes
            .iter()
            .filter(|n| n.len() == 8)
            .filter_map(|n| u32::from_str_radix(n, 16).ok())
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// `Ok(None)` only when the object at `key` is definitely absent.
    fn get_opt(&self, key: &str) -> Result<Option<Blob>> {
        match self.repo.get(key) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The newest restore point named `name` (`pg_create_restore_point`) recorded in the
    /// block indexes of any timeline, with its timeline and LSN. Reads only the small index
    /// objects, never WAL: for each segment the index the reader's rule picks (see the
    /// module docs). A damaged or foreign index is an error, never "not found": it may hold
    /// the point.
    pub fn find_restore_point(&self, name: &str) -> Result<Option<(TimeLineId, Lsn)>> {
        let mut best: Option<(TimeLineId, Lsn)> = None;
        for tli in self.timelines()? {
            let l = self.listing(Some(tli))?;
            let mut segnos: Vec<u64> = l
                .objects
                .iter()
                .filter_map(|o| index_object_stem(&o.name))
                .filter_map(|stem| stem.parse::<WalFileName>().ok())
                .filter(|n| n.is_segment() && n.tli() == tli)
                .filter_map(|n| n.segno(self.seg_size()))
                .collect();
            segnos.dedup();
            for segno in segnos {
                let ix = match self.find_index(tli, segno)? {
                    Found::Complete(ix) | Found::Pending(ix) => ix,
                    Found::Damaged(why) => {
                        return Err(Error::corruption(format!(
                            "looking for restore point \"{name}\": segment {}: {why}",
                            self.segment_name(tli, segno)
                        )))
                    }
                    Found::Marker(_) | Found::Nothing => continue,
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

    /// Whether a file (segment, .history, .partial, .backup) is archived: `Ok(false)` only
    /// when it is definitely absent. A link, a non-regular file, an unreadable directory or
    /// any I/O error is an error, never "absent".
    pub fn is_archived(&self, name: &WalFileName) -> Result<bool> {
        Ok(self.repo.head(&self.data_key(name))?.is_some())
    }

    /// The stored (compressed) size of `name`'s archived file; `None` when absent.
    pub(crate) fn stored_size(&self, name: &WalFileName) -> Result<Option<u64>> {
        Ok(self.repo.head(&self.data_key(name))?.map(|o| o.size))
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
        let key = self.data_key(name);
        let Some(bytes) = self.get_opt(&key)? else {
            return Ok(None);
        };
        let what = self.describe(&key);
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
        let key = self.data_key(name);
        let what = self.describe(&key);
        let size = self
            .repo
            .head(&key)?
            .ok_or_else(|| Error::not_found(format!("{name} is not in the archive ({what})")))?
            .size;
        let head = self.repo.get_range(&key, 0, size.min(64 * 1024 + 8))?;
        let (meta, _) = crate::format::segment::decode_meta(&head, &what)?;
        self.check_meta(&meta, name, &what)?;
        Ok(meta)
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

    /// Reads the index object `suffix` of a segment: `None` when absent, else the decoded
    /// index of this segment or why it cannot be used (damaged, foreign).
    fn read_index_object(
        &self,
        tli: TimeLineId,
        segno: u64,
        suffix: &str,
    ) -> Result<Option<std::result::Result<SegmentIndex, String>>> {
        let key = self.index_key(tli, segno, suffix);
        let Some(bytes) = self.get_opt(&key)? else {
            return Ok(None);
        };
        let what = self.describe(&key);
        Ok(Some(match crate::format::index::decode(&bytes, &what) {
            Ok(ix) => match self.foreign_index(&ix, tli, segno) {
                Some(why) => Err(format!("index file {what} is not this segment's: {why}")),
                None => Ok(ix),
            },
            Err(e) => Err(format!("index file unreadable: {e}")),
        }))
    }

    /// The reader's rule over a segment's index objects (see the module docs).
    fn find_index(&self, tli: TimeLineId, segno: u64) -> Result<Found> {
        let mut pending = None;
        let mut damaged = None;
        match self.read_index_object(tli, segno, IDX)? {
            Some(Ok(ix)) if !ix.pending => return Ok(Found::Complete(ix)),
            Some(Ok(ix)) => pending = Some(ix), // a pending .idx of the previous release
            Some(Err(why)) => damaged = Some(why),
            None => {}
        }
        match self.read_index_object(tli, segno, IDX_REBUILT)? {
            Some(Ok(ix)) if !ix.pending => return Ok(Found::Complete(ix)),
            Some(Ok(_)) => {
                damaged.get_or_insert_with(|| {
                    format!(
                        "{} holds a pending index",
                        self.describe(&self.index_key(tli, segno, IDX_REBUILT))
                    )
                });
            }
            Some(Err(why)) => damaged = Some(why),
            None => {}
        }
        if let Some(ix) = pending {
            return Ok(Found::Pending(ix));
        }
        if let Some(why) = damaged {
            return Ok(Found::Damaged(why));
        }
        match self.read_index_object(tli, segno, IDX_PENDING)? {
            Some(Ok(ix)) => return Ok(Found::Pending(ix)),
            Some(Err(why)) => return Ok(Found::Damaged(why)),
            None => {}
        }
        let key = self.index_key(tli, segno, IDX_MISSING);
        Ok(match self.get_opt(&key)? {
            Some(bytes) => Found::Marker(
                serde_json::from_slice::<MissingMarker>(&bytes)
                    .map(|m| m.reason)
                    .unwrap_or_else(|e| format!("marker {} unreadable: {e}", self.describe(&key))),
            ),
            None => Found::Nothing,
        })
    }

    /// The index state of segment `segno` on timeline `tli`.
    pub fn index_state(&self, tli: TimeLineId, segno: u64) -> Result<IndexState> {
        if !self.is_archived(&self.segment_name(tli, segno))? {
            return Ok(IndexState::NotArchived);
        }
        // A damaged or foreign index reads as missing: PAGE never merges an index that is
        // not this segment's.
        Ok(match self.find_index(tli, segno)? {
            Found::Complete(ix) => IndexState::Indexed(ix),
            Found::Pending(ix) => IndexState::Pending(ix),
            Found::Damaged(why) | Found::Marker(why) => IndexState::Missing(why),
            Found::Nothing => IndexState::Missing(
                "not indexed yet (archiving was interrupted before indexing)".into(),
            ),
        })
    }

    /// The one place outside `walnut-archive` that writes into the archive: a PAGE backup
    /// planning across a segment whose index is missing (archiving was interrupted before
    /// indexing, or its `.idx` is damaged or foreign) or pending rebuilds it from the
    /// verified segment and stores it, create-only, as `walnut-archive` would have (and
    /// completes a pending index of the segment before). Returns the state afterwards.
    pub fn repair_missing_index(&self, tli: TimeLineId, segno: u64) -> Result<IndexState> {
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

    /// The former name of [`repair_missing_index`](Self::repair_missing_index), kept for
    /// its callers.
    pub fn ensure_index(&self, tli: TimeLineId, segno: u64) -> Result<IndexState> {
        self.repair_missing_index(tli, segno)
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
            if s == segno + 1 && std::fs::metadata(&sibling).is_ok_and(|m| m.len() == seg_size) {
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

    /// Completes `segno`'s index if it is pending: the complete index becomes a new object
    /// (see the module docs), the pending one stays and is ignored from then on.
    pub(crate) fn complete_pending(&self, tli: TimeLineId, segno: u64, next: Option<(u64, &[u8])>) {
        // Only a stored pending index of an archived segment is completed here. No index at
        // all means its writer is still at work (it re-checks for segno+1 after storing a
        // pending index, see index_and_store) or was killed (repair_missing_index rebuilds
        // it when a backup needs it). The index objects are looked at first: almost always
        // a complete one is there, and that answers without asking for the segment.
        let name = self.segment_name(tli, segno);
        let pending = match self.find_index(tli, segno) {
            Ok(Found::Pending(_)) => self.is_archived(&name),
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        };
        match pending {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                log::warn!("index state of segment {segno:X}: {e}");
                return;
            }
        }
        match self.read(&name) {
            Ok(data) => match self.build_index(tli, segno, &data, next) {
                Ok(ix) if ix.pending => {} // still pending: nothing new to store
                Ok(ix) => {
                    if let Err(e) = self.store_index(tli, segno, &ix) {
                        log::warn!("segment {name}: could not store its index: {e}");
                    }
                }
                Err(e) => {
                    log::warn!("segment {name} could not be indexed: {e}");
                    self.store_missing(tli, segno, &e.to_string());
                }
            },
            Err(e) => log::warn!("re-indexing {name}: {e}"),
        }
    }

    /// After a repeated push of `name` (archived already, same bytes `data`): finishes what
    /// a killed earlier run may have left, as that run would have. Never fails (a repeated
    /// push is success once the content compares equal); problems are logged.
    /// - Temp files of dead writers in the file's directory are removed: a run killed
    ///   between linking an object and unlinking its temp file, or while writing an object
    ///   that a later run found complete, leaves one, and a repeated push may write nothing.
    /// - `segno` (`Some` when this push indexes): the segment's own index, when it has none
    ///   (killed before indexing) or when it is pending and the next segment is archived
    ///   (killed before completing it); then the previous segment's pending index, which
    ///   the first push completes in parallel with storing its own.
    ///
    /// Only repeated pushes pay for this (a directory listing of the small `.tmp/` and a
    /// look at two index objects): a first push writes, and the store tidies on a
    /// process's first write into a directory.
    pub(crate) fn heal_after_repeated_push(
        &self,
        name: &WalFileName,
        segno: Option<u64>,
        data: &[u8],
        built: Option<Result<SegmentIndex>>,
    ) {
        let dir = self.tli_key(name.tli());
        match self.repo.tidy_temps(&dir) {
            Ok(0) => {}
            Ok(n) => log::info!(
                "{name}: removed {n} temp file(s) of killed runs in {}",
                self.describe(&dir)
            ),
            Err(e) => log::warn!("{name}: tidying temp files of killed runs: {e}"),
        }
        let Some(segno) = segno else {
            return;
        };
        let tli = name.tli();
        match self.find_index(tli, segno) {
            Ok(Found::Nothing) => self.index_and_store(tli, segno, data, built),
            Ok(Found::Pending(_)) => {
                if self
                    .is_archived(&self.segment_name(tli, segno + 1))
                    .unwrap_or(false)
                {
                    self.complete_pending(tli, segno, None);
                }
            }
            Ok(_) => {}
            Err(e) => log::warn!("{name}: index state: {e}"),
        }
        if segno > 0 {
            self.complete_pending(tli, segno - 1, Some((segno, data)));
        }
    }

    /// Takes the archive's index lock (a repository lock, never an object).
    fn lock_index(&self) -> Result<crate::repo::RepoLock> {
        let key = format!("{}/.index.lock", self.prefix);
        self.repo
            .lock(&key, LockMode::Exclusive, true)?
            .ok_or_else(|| {
                Error::io(
                    "lock",
                    &self.root.join(&key),
                    io::ErrorKind::WouldBlock.into(),
                )
            })
    }

    /// Creates `key` with `data` unless it exists (create-only: an existing object is left
    /// as it is, whoever wrote it).
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<()> {
        match self.repo.put_new(key, data) {
            Err(e) if e.kind() == ErrorKind::Conflict => {
                log::debug!("{}: exists already; left as it is", self.describe(key));
                Ok(())
            }
            r => r,
        }
    }

    /// Stores an index, create-only, under the index lock: a complete one as `.idx` (or
    /// `.idx-rebuilt` when an unusable `.idx` is in the way), a pending one as
    /// `.idx-pending`; nothing when a complete index exists already.
    ///
    /// A complete index on a store whose create-only writes are atomic is first offered as
    /// `.idx` without the lock (on S3 the lock is a lease: three requests more): created,
    /// it is done; there already, the locked rule below decides.
    fn store_index(&self, tli: TimeLineId, segno: u64, ix: &SegmentIndex) -> Result<()> {
        let bytes = crate::format::index::encode(ix);
        let idx = self.index_key(tli, segno, IDX);
        if !ix.pending && self.repo.atomic_create() {
            match self.repo.put_new(&idx, &bytes) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Conflict => {}
                Err(e) => return Err(e),
            }
        }
        let _lock = self.lock_index()?;
        if ix.pending {
            return match self.find_index(tli, segno)? {
                Found::Complete(_) | Found::Pending(_) => Ok(()),
                _ => self.put_if_absent(&self.index_key(tli, segno, IDX_PENDING), &bytes),
            };
        }
        if self.repo.head(&idx)?.is_none() {
            return self.put_if_absent(&idx, &bytes);
        }
        match self.find_index(tli, segno)? {
            Found::Complete(_) => Ok(()),
            _ => self.put_if_absent(&self.index_key(tli, segno, IDX_REBUILT), &bytes),
        }
    }

    /// Writes the `.idx-missing` marker (create-only) unless an index object exists.
    fn store_missing(&self, tli: TimeLineId, segno: u64, reason: &str) {
        let res = (|| -> Result<()> {
            let _lock = self.lock_index()?;
            for s in [IDX, IDX_PENDING, IDX_REBUILT] {
                if self.repo.head(&self.index_key(tli, segno, s))?.is_some() {
                    return Ok(());
                }
            }
            let mut json = serde_json::to_vec(&MissingMarker {
                reason: reason.to_string(),
            })?;
            json.push(b'\n');
            self.put_if_absent(&self.index_key(tli, segno, IDX_MISSING), &json)
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

    use crate::repo::MemRepo;
    use crate::types::PgVersion;
    use crate::wal::record::RelFileLocator;
    use crate::wal::synth::{SynthBlock, SynthRecord, SynthWal};

    const SEG: u32 = 1 << 20;
    const SYSID: u64 = 7_000_000_000_000_000_001;

    fn heap_rec(n: u32) -> SynthRecord {
        SynthRecord {
            rmid: 10,
            info: 0x00,
            xid: 700 + n,
            blocks: vec![SynthBlock {
                rel: RelFileLocator {
                    spc: 1663,
                    db: 5,
                    rel: 16384,
                },
                blkno: n,
                data: vec![n as u8; 100],
                ..Default::default()
            }],
            main_data: vec![1, 2, 3],
        }
    }

    /// Segments 3, 4 and 5 of a synthetic stream: 3 holds a restore point "p1" and ends in a
    /// record that continues into 4 (so 3 alone indexes as pending); 4 ends in a record
    /// continuing into 5.
    fn segments() -> (Vec<Vec<u8>>, Lsn) {
        let mut w = SynthWal::new(PgVersion::V15, SEG, 8192, 3);
        w.system_id = SYSID;
        for i in 0..20 {
            w.push(&heap_rec(i));
        }
        let mut rp = 0i64.to_le_bytes().to_vec();
        let mut name = b"p1".to_vec();
        name.resize(64, 0);
        rp.extend_from_slice(&name);
        let rp_lsn = w.push(&SynthRecord {
            rmid: 0,
            info: 0x70,
            main_data: rp,
            ..Default::default()
        });
        let mut n = 100;
        while w.pos().0 < 6 * u64::from(SEG) + 4096 {
            w.push(&heap_rec(n));
            n += 1;
        }
        w.zero_to_segment_end();
        let b = w.bytes();
        let seg = |k: usize| b[k * SEG as usize..(k + 1) * SEG as usize].to_vec();
        (vec![seg(0), seg(1), seg(2)], rp_lsn)
    }

    fn config() -> InstanceConfig {
        InstanceConfig {
            name: "db".into(),
            system_id: SYSID,
            pg_major: 15,
            wal_segment_size: SEG,
            wal_page_size: 8192,
            block_size: 8192,
            relseg_size: 131072,
            data_checksums: true,
            pgdata: "/pgdata".into(),
            host: None,
            port: None,
            user: None,
            dbname: None,
        }
    }

    /// A catalog in memory whose store refuses deletes (as a WORM bucket).
    fn mem_archive() -> (MemRepo, WalArchive) {
        let repo = MemRepo::new().refusing_delete();
        let cat = Catalog::with_repo(Path::new("/mem"), Arc::new(repo.clone()));
        cat.save_instance(&config()).unwrap();
        (repo, WalArchive::open(&cat, "db").unwrap())
    }

    fn name(segno: u64) -> WalFileName {
        WalFileName::segment(1, segno, SEG)
    }

    /// Puts segment `segno`'s bytes into a fresh directory (alone: no sibling to complete a
    /// crossing record from) and pushes it.
    fn push(ar: &WalArchive, segno: u64, data: &[u8]) -> Result<push::PushOutcome> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(name(segno).to_string());
        std::fs::write(&p, data).unwrap();
        push::push_file(ar, &p, &name(segno))
    }

    fn wal_keys(repo: &MemRepo) -> Vec<String> {
        repo.keys()
            .into_iter()
            .filter_map(|k| {
                k.strip_prefix("instances/db/wal/00000001/")
                    .map(str::to_string)
            })
            .collect()
    }

    /// `walnut receive`'s path: bytes in memory are stored as a file would be, beside a
    /// file push of the same name (same content: success; different: conflict).
    #[test]
    fn push_bytes_stores_like_push_file_and_meets_it_create_only() {
        let (segs, _) = segments();
        let (repo, ar) = mem_archive();
        let (frepo, far) = mem_archive();
        assert_eq!(
            push::push_bytes(&ar, &segs[0], &name(3)).unwrap(),
            push::PushOutcome::Archived
        );
        assert_eq!(
            push(&far, 3, &segs[0]).unwrap(),
            push::PushOutcome::Archived
        );
        assert_eq!(wal_keys(&repo), wal_keys(&frepo));
        assert_eq!(ar.read(&name(3)).unwrap(), segs[0]);
        assert!(matches!(
            ar.index_state(1, 3).unwrap(),
            IndexState::Pending(_)
        ));
        // a file push of the same segment after it: success, nothing new
        assert_eq!(
            push(&ar, 3, &segs[0]).unwrap(),
            push::PushOutcome::AlreadyArchived
        );
        // the next segment by file, then by bytes: stored once, 3's index completed
        assert_eq!(push(&ar, 4, &segs[1]).unwrap(), push::PushOutcome::Archived);
        assert_eq!(
            push::push_bytes(&ar, &segs[1], &name(4)).unwrap(),
            push::PushOutcome::AlreadyArchived
        );
        assert!(matches!(
            ar.index_state(1, 3).unwrap(),
            IndexState::Indexed(_)
        ));
        let mut other = segs[1].clone();
        other[100] ^= 1;
        let e = push::push_bytes(&ar, &other, &name(4)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        // the same checks as a file: another cluster's WAL, a wrong size
        let mut foreign = segs[2].clone();
        foreign[24] ^= 1; // system identifier in the long page header
        assert!(push::push_bytes(&ar, &foreign, &name(5)).is_err());
        assert!(push::push_bytes(&ar, &segs[2][..1000], &name(5)).is_err());
        assert!(!ar.is_archived(&name(5)).unwrap());
    }

    #[test]
    fn push_is_create_only_and_a_pending_index_is_completed_by_a_new_object() {
        let (segs, rp_lsn) = segments();
        let (repo, ar) = mem_archive();
        assert!(matches!(
            ar.index_state(1, 3).unwrap(),
            IndexState::NotArchived
        ));
        assert_eq!(push(&ar, 3, &segs[0]).unwrap(), push::PushOutcome::Archived);
        assert!(matches!(
            ar.index_state(1, 3).unwrap(),
            IndexState::Pending(_)
        ));
        assert_eq!(
            wal_keys(&repo),
            [
                "000000010000000000000003.idx-pending",
                "000000010000000000000003.lz4"
            ]
        );
        // the same content again is success; different content a conflict, nothing written
        assert_eq!(
            push(&ar, 3, &segs[0]).unwrap(),
            push::PushOutcome::AlreadyArchived
        );
        let mut other = segs[0].clone();
        other[SEG as usize - 10] ^= 1;
        let e = push(&ar, 3, &other).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        assert!(e.to_string().contains("DIFFERENT"), "{e}");
        // the next segment completes 3's index as a new object; the pending one stays
        assert_eq!(push(&ar, 4, &segs[1]).unwrap(), push::PushOutcome::Archived);
        match ar.index_state(1, 3).unwrap() {
            IndexState::Indexed(ix) => assert!(!ix.pending),
            s => panic!("{s:?}"),
        }
        assert!(matches!(
            ar.index_state(1, 4).unwrap(),
            IndexState::Pending(_)
        ));
        assert_eq!(
            wal_keys(&repo),
            [
                "000000010000000000000003.idx",
                "000000010000000000000003.idx-pending",
                "000000010000000000000003.lz4",
                "000000010000000000000004.idx-pending",
                "000000010000000000000004.lz4",
            ]
        );
        // read back, verified; the restore point is found in the indexes
        assert_eq!(ar.read(&name(3)).unwrap(), segs[0]);
        assert_eq!(ar.read_meta(&name(4)).unwrap().size, u64::from(SEG));
        assert!(ar.read_opt(&name(9)).unwrap().is_none());
        assert_eq!(ar.find_restore_point("p1").unwrap(), Some((1, rp_lsn)));
        assert_eq!(ar.find_restore_point("nope").unwrap(), None);
        // fetch: served, or absent (exit 1) only when the name and its .partial are absent
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("RECOVERYXLOG");
        let out = fetch::fetch(&ar, &name(3), &dest).unwrap();
        assert_eq!(out, fetch::FetchOutcome::Restored);
        assert_eq!(std::fs::read(&dest).unwrap(), segs[0]);
        let out = fetch::fetch(&ar, &name(9), &dest).unwrap();
        assert_eq!(out, fetch::FetchOutcome::NotInArchive);
    }

    #[test]
    fn a_pending_idx_of_the_previous_release_is_completed_beside_it() {
        let (segs, _) = segments();
        let (repo, ar) = mem_archive();
        // as walnut 0.x left it: the segment and a pending index under `.idx`
        let meta = crate::format::segment::FileMeta {
            format: 1,
            name: name(3).to_string(),
            size: u64::from(SEG),
            crc32c: crc32c::crc32c(&segs[0]),
            system_id: SYSID,
            archived_at: 1,
        };
        let lz4 = crate::format::segment::encode(&meta, &segs[0]).unwrap();
        repo.put_new(&ar.data_key(&name(3)), &lz4).unwrap();
        let pending = ar.build_index(1, 3, &segs[0], None).unwrap();
        assert!(pending.pending);
        repo.put_new(
            &ar.index_key(1, 3, IDX),
            &crate::format::index::encode(&pending),
        )
        .unwrap();
        assert!(matches!(
            ar.index_state(1, 3).unwrap(),
            IndexState::Pending(_)
        ));
        push(&ar, 4, &segs[1]).unwrap();
        assert!(matches!(
            ar.index_state(1, 3).unwrap(),
            IndexState::Indexed(_)
        ));
        assert!(repo
            .keys()
            .iter()
            .any(|k| k.ends_with("000000010000000000000003.idx-rebuilt")));
    }

    #[test]
    fn damaged_indexes_read_as_missing_and_are_errors_for_restore_points() {
        let (segs, _) = segments();
        let (repo, ar) = mem_archive();
        // a damaged .idx for 3: never rewritten in place, and it wins over the pending
        // index stored beside it, and over the arrival of 4
        repo.put_new(&ar.index_key(1, 3, IDX), b"garbage").unwrap();
        push(&ar, 3, &segs[0]).unwrap();
        push(&ar, 4, &segs[1]).unwrap();
        match ar.index_state(1, 3).unwrap() {
            IndexState::Missing(why) => assert!(why.contains("unreadable"), "{why}"),
            s => panic!("{s:?}"),
        }
        let e = ar.find_restore_point("p1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption, "{e}");
        assert!(e.to_string().contains("000000010000000000000003"), "{e}");
        // the named repair path rebuilds it from the verified segment, beside the damage
        assert!(matches!(
            ar.repair_missing_index(1, 3).unwrap(),
            IndexState::Indexed(_)
        ));
        assert_eq!(&*repo.get(&ar.index_key(1, 3, IDX)).unwrap(), b"garbage");
        assert!(ar.find_restore_point("p1").unwrap().is_some());
    }

    #[test]
    fn the_missing_marker_is_create_only_and_an_index_wins_over_it() {
        let (segs, _) = segments();
        let (repo, ar) = mem_archive();
        push(&ar, 4, &segs[1]).unwrap();
        ar.store_missing(1, 4, "first");
        ar.store_missing(1, 4, "second");
        assert!(
            repo.get(&ar.index_key(1, 4, IDX_MISSING)).is_err(),
            "marker beside an index"
        );
        // an undecodable segment: the marker records why, once
        let mut bad = segs[0].clone();
        for b in &mut bad[8192..] {
            *b = 0xFF;
        }
        let e = ar.build_index(1, 3, &bad, None).unwrap_err();
        ar.index_and_store(1, 3, &bad, Some(Err(e)));
        ar.store_missing(1, 3, "again");
        let marker = repo.get(&ar.index_key(1, 3, IDX_MISSING)).unwrap();
        assert!(!String::from_utf8_lossy(&marker).contains("again"));
        // an index stored later wins over the marker
        let ix = ar.build_index(1, 3, &segs[0], Some((4, &segs[1]))).unwrap();
        ar.store_index(1, 3, &ix).unwrap();
        assert!(matches!(
            ar.index_state(1, 3).unwrap(),
            IndexState::NotArchived
        ));
        repo.put_new(&ar.data_key(&name(3)), b"x").unwrap();
        assert!(matches!(
            ar.index_state(1, 3).unwrap(),
            IndexState::Indexed(_)
        ));
    }

    /// A repeated push (PostgreSQL re-runs archive_command for a segment whose run was
    /// killed) finishes the indexes a killed run left undone: its own, and the previous
    /// segment's pending one (which the killed run was completing in parallel).
    #[test]
    fn a_repeated_push_completes_the_indexes_a_killed_push_left() {
        let (segs, _) = segments();
        let (_, ar) = mem_archive();
        push(&ar, 3, &segs[0]).unwrap();
        // 4 and 5 stored, then killed before any index work: 3 pending, 4 and 5 without
        let mut scratch = push::FrameScratch::default();
        for (segno, data) in [(4, &segs[1]), (5, &segs[2])] {
            push::push_bytes_unindexed(&ar, data, &name(segno), &mut scratch).unwrap();
        }
        assert!(matches!(
            ar.index_state(1, 3).unwrap(),
            IndexState::Pending(_)
        ));
        assert!(matches!(
            ar.index_state(1, 4).unwrap(),
            IndexState::Missing(_)
        ));
        // the repeated push of 4: its own index, and 3's completed
        assert_eq!(
            push(&ar, 4, &segs[1]).unwrap(),
            push::PushOutcome::AlreadyArchived
        );
        for segno in [3, 4] {
            let st = ar.index_state(1, segno).unwrap();
            assert!(matches!(st, IndexState::Indexed(_)), "{segno}: {st:?}");
        }
        // 5 killed after storing its own index, before completing 4's pending one (4
        // indexed alone first: pending)
        let (_, ar) = mem_archive();
        push(&ar, 3, &segs[0]).unwrap();
        push(&ar, 4, &segs[1]).unwrap();
        assert!(matches!(
            ar.index_state(1, 4).unwrap(),
            IndexState::Pending(_)
        ));
        push::push_bytes_unindexed(&ar, &segs[2], &name(5), &mut scratch).unwrap();
        ar.index_and_store(1, 5, &segs[2], None);
        assert!(matches!(
            ar.index_state(1, 4).unwrap(),
            IndexState::Pending(_)
        ));
        let before = ar.index_state(1, 5).unwrap();
        assert_eq!(
            push(&ar, 5, &segs[2]).unwrap(),
            push::PushOutcome::AlreadyArchived
        );
        let st = ar.index_state(1, 4).unwrap();
        assert!(matches!(st, IndexState::Indexed(_)), "4: {st:?}");
        // 5's own index untouched
        assert_eq!(
            format!("{before:?}"),
            format!("{:?}", ar.index_state(1, 5).unwrap())
        );
        // the repeated push of a pending segment whose successor is archived completes it
        let (_, ar) = mem_archive();
        push(&ar, 3, &segs[0]).unwrap();
        push::push_bytes_unindexed(&ar, &segs[1], &name(4), &mut scratch).unwrap();
        assert!(matches!(
            ar.index_state(1, 3).unwrap(),
            IndexState::Pending(_)
        ));
        push(&ar, 3, &segs[0]).unwrap();
        assert!(matches!(
            ar.index_state(1, 3).unwrap(),
            IndexState::Indexed(_)
        ));
    }

    /// A push killed between linking an object and unlinking its temp file (or while
    /// writing one that a later run found complete) leaves the temp file; the repeated push,
    /// which writes nothing, removes it (only a dead writer's).
    #[test]
    fn a_repeated_push_removes_temp_files_of_dead_writers() {
        use crate::repo::LocalRepo;
        let (segs, _) = segments();
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("instances/db/wal")).unwrap();
        // each WalArchive on its own LocalRepo: a process of its own for the tidying rule
        let open = || {
            let repo = Arc::new(LocalRepo::open(d.path()).unwrap());
            let cat = Catalog::with_repo(d.path(), repo);
            WalArchive::open(&cat, "db").unwrap()
        };
        {
            let repo = Arc::new(LocalRepo::open(d.path()).unwrap());
            Catalog::with_repo(d.path(), repo)
                .save_instance(&config())
                .unwrap();
        }
        push(&open(), 3, &segs[0]).unwrap();
        push(&open(), 4, &segs[1]).unwrap();
        let tli = d.path().join("instances/db/wal/00000001");
        let idx = tli.join("000000010000000000000004.idx-pending");
        assert!(idx.is_file());
        // a dead process's pid
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = tli.join(format!(
            ".tmp/.000000010000000000000004.idx-pending.walnut-tmp.{dead}.17"
        ));
        std::fs::hard_link(&idx, &stale).unwrap();
        let live = tli.join(format!(
            ".tmp/.000000010000000000000004.idx.walnut-tmp.{}.18",
            std::process::id()
        ));
        std::fs::write(&live, b"being written").unwrap();
        assert_eq!(
            push(&open(), 4, &segs[1]).unwrap(),
            push::PushOutcome::AlreadyArchived
        );
        assert!(!stale.exists(), "a dead writer's temp file is left");
        assert!(live.exists(), "a running writer's temp file was removed");
        assert!(idx.is_file());
        assert!(matches!(ar_state(&open(), 4), IndexState::Pending(_)));
    }

    fn ar_state(ar: &WalArchive, segno: u64) -> IndexState {
        ar.index_state(1, segno).unwrap()
    }

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
