//! The per-segment block index: what one WAL segment changed in relation files.
//!
//! The invariant: **a superset is safe, a subset is data loss.** An index may list blocks
//! that did not change; it must never miss one. Changes that WAL does not express as block
//! references (truncation, creation, drops, database copies) are kept as limit blocks and
//! events, so that a backup built from indexes copies whatever those changes touched.
//!
//! Submodules:
//! - [`blockset`]: compact sets of block numbers;
//! - `build`: from decoded WAL records to a [`SegmentIndex`];
//! - `format`: the on-disk encoding (magic, version, checksum trailer);
//! - `merge`: the union of the indexes of a range of segments into a [`ChangeMap`].

pub mod blockset;
pub mod build;
pub mod merge;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::{Lsn, TimeLineId};
pub use blockset::BlockSet;

/// Fork numbers, as in `src/include/common/relpath.h`.
pub const MAIN_FORKNUM: u8 = 0;
pub const FSM_FORKNUM: u8 = 1;
pub const VM_FORKNUM: u8 = 2;
pub const INIT_FORKNUM: u8 = 3;

/// One fork of one relation: the key of every per-file change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RelFork {
    /// Tablespace OID (1663 pg_default, 1664 pg_global, else a user tablespace).
    pub spc: u32,
    /// Database OID; 0 for shared relations.
    pub db: u32,
    /// relfilenode / relfilenumber.
    pub rel: u32,
    /// 0 main, 1 fsm, 2 vm, 3 init.
    pub fork: u8,
}

/// What happened to one relation fork within the covered LSN range.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkChange {
    /// Blocks referenced by WAL records (modified, or initialised).
    pub blocks: BlockSet,
    /// The smallest length (in blocks) the fork had at any point of the range, when that is
    /// known to be less than "unchanged": the truncation target, or 0 when the fork was
    /// created or dropped. Blocks at or above it must never be taken from an older backup.
    pub limit_block: Option<u32>,
    /// An smgr create record for this fork was seen.
    pub created: bool,
    /// The relation was dropped (commit/abort with relations to unlink).
    pub dropped: bool,
}

impl ForkChange {
    /// Lowers the limit block to `limit` if that is smaller.
    pub fn apply_limit(&mut self, limit: u32) {
        self.limit_block = Some(self.limit_block.map_or(limit, |l| l.min(limit)));
    }
}

/// A database-level change: every relation file of `(spc, db)` must be taken whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbEvent {
    pub lsn: Lsn,
    pub spc: u32,
    pub db: u32,
    pub kind: DbEventKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DbEventKind {
    /// `XLOG_DBASE_CREATE` (≤14) / `XLOG_DBASE_CREATE_FILE_COPY` (15+): files copied at the
    /// filesystem level, with no WAL for their contents.
    CreatedFileCopy { src_spc: u32, src_db: u32 },
    /// `XLOG_DBASE_CREATE_WAL_LOG` (15+): contents follow as ordinary WAL.
    CreatedWalLog,
    /// `XLOG_DBASE_DROP`, once per listed tablespace.
    Dropped,
}

/// Other records that matter to a backup or to a DBA but change no relation blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtherEvent {
    /// `XLOG_RELMAP_UPDATE`: `pg_filenode.map` of (spc, db) rewritten (db 0: global).
    RelmapUpdate {
        lsn: Lsn,
        spc: u32,
        db: u32,
    },
    TablespaceCreate {
        lsn: Lsn,
        spc: u32,
    },
    TablespaceDrop {
        lsn: Lsn,
        spc: u32,
    },
    /// A checkpoint, end-of-recovery or parameter-change record carried this `wal_level`
    /// (0 minimal, 1 replica, 2 logical).
    WalLevel {
        lsn: Lsn,
        wal_level: u32,
    },
    /// `XLOG_RESTORE_POINT` (`pg_create_restore_point`).
    RestorePoint {
        lsn: Lsn,
        name: String,
        time: i64,
    },
}

/// The index of one WAL segment.
///
/// A record belongs to the segment in which it *begins* (as `pg_waldump` attributes it). If
/// the last record beginning here continues into the next segment and that segment was not
/// available when the index was built, `pending` is true and the changes of that record are
/// not yet included: the index must be rebuilt when the next segment arrives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentIndex {
    /// PostgreSQL major version (from the page magic).
    pub pg_major: u32,
    /// `wal_segment_size` in bytes.
    pub seg_size: u32,
    /// `XLOG_BLCKSZ`, the WAL page size.
    pub wal_page_size: u32,
    pub system_id: u64,
    pub timeline: TimeLineId,
    /// Absolute segment number.
    pub segno: u64,
    /// Start LSN of the first record that begins in this segment (the segment start if none).
    pub start_lsn: Lsn,
    /// End LSN of the last record that begins in this segment (when not pending), else the
    /// end of the decoded bytes.
    pub end_lsn: Lsn,
    /// The last record beginning here is incomplete: its changes are missing from this index.
    pub pending: bool,
    /// Number of records that begin in this segment (complete ones).
    pub records: u64,
    /// An `XLOG_SWITCH` record ended the segment early.
    pub switched: bool,
    pub forks: BTreeMap<RelFork, ForkChange>,
    pub db_events: Vec<DbEvent>,
    pub other_events: Vec<OtherEvent>,
    /// WAL from a `wal_level=minimal` period was seen: some relation changes may not be in
    /// WAL at all, so no incremental backup may span this segment.
    pub wal_level_minimal: bool,
    /// Timestamp (PostgreSQL epoch: microseconds since 2000-01-01 UTC) of the last
    /// commit/abort record, and the xid of the last record that had one.
    pub last_commit_time: Option<i64>,
    pub last_xid: Option<u32>,
}

impl SegmentIndex {
    /// An empty index for a segment, before any record is added.
    pub fn empty(
        pg_major: u32,
        seg_size: u32,
        wal_page_size: u32,
        system_id: u64,
        timeline: TimeLineId,
        segno: u64,
    ) -> SegmentIndex {
        let start = Lsn(segno * seg_size as u64);
        SegmentIndex {
            pg_major,
            seg_size,
            wal_page_size,
            system_id,
            timeline,
            segno,
            start_lsn: start,
            end_lsn: start,
            pending: false,
            records: 0,
            switched: false,
            forks: BTreeMap::new(),
            db_events: Vec::new(),
            other_events: Vec::new(),
            wal_level_minimal: false,
            last_commit_time: None,
            last_xid: None,
        }
    }

    pub fn fork_mut(&mut self, key: RelFork) -> &mut ForkChange {
        self.forks.entry(key).or_default()
    }
}
