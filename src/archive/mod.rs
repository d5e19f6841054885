//! The WAL archive: `walnut-archive` (archive_command), `walnut-fetch` (restore_command) and
//! `show --archive`, plus the read API that backups use.

use std::path::Path;

use crate::catalog::Catalog;
use crate::cli::ShowArgs;
use crate::error::{Error, Result};
use crate::index::SegmentIndex;
use crate::types::{Lsn, TimeLineId, WalFileName};

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

/// Read access to one instance's WAL archive.
pub struct WalArchive {
    _private: (),
}

impl WalArchive {
    pub fn open(_catalog: &Catalog, _instance: &str) -> Result<WalArchive> {
        Err(Error::invalid("WalArchive is not implemented yet"))
    }

    /// Whether a file (segment, .history, .partial, .backup) is archived.
    pub fn contains(&self, _name: &WalFileName) -> bool {
        false
    }

    /// Reads, decompresses and verifies an archived file. Corruption is
    /// `ErrorKind::Corruption`; absence is `ErrorKind::NotFound`.
    pub fn read(&self, _name: &WalFileName) -> Result<Vec<u8>> {
        Err(Error::invalid("WalArchive::read is not implemented yet"))
    }

    /// The index state of segment `segno` on timeline `tli`.
    pub fn index_state(&self, _tli: TimeLineId, _segno: u64) -> Result<IndexState> {
        Err(Error::invalid(
            "WalArchive::index_state is not implemented yet",
        ))
    }

    /// Indexes an archived segment now (and completes pending neighbours) and returns its
    /// state afterwards. Used by backups for segments archived but not yet indexed.
    pub fn ensure_index(&self, _tli: TimeLineId, _segno: u64) -> Result<IndexState> {
        Err(Error::invalid(
            "WalArchive::ensure_index is not implemented yet",
        ))
    }

    /// The parsed history of timeline `tli` (empty for timeline 1): the timelines it
    /// descends from, each with the LSN where it ended.
    pub fn timeline_history(&self, _tli: TimeLineId) -> Result<Vec<HistoryEntry>> {
        Err(Error::invalid(
            "WalArchive::timeline_history is not implemented yet",
        ))
    }
}

/// Writes a file to `dest` from the archive (what walnut-fetch does), verified.
pub fn fetch_to(_archive: &WalArchive, _name: &WalFileName, _dest: &Path) -> Result<()> {
    Err(Error::invalid("fetch_to is not implemented yet"))
}

pub fn run_show_archive(_args: ShowArgs) -> Result<i32> {
    Err(Error::invalid("show --archive is not implemented yet"))
}
