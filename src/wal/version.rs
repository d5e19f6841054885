//! What differs between PostgreSQL majors, as data (WAL-FORMAT.md §2.10).
//!
//! The page, record and block-reference layout is the same in 13–18; only these few numbers
//! and offsets move. Everything version-dependent in the decoder reads this table.

#![deny(clippy::indexing_slicing)]

use crate::types::PgVersion;

/// Per-major facts the decoder needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionTable {
    pub version: PgVersion,
    /// `BKPIMAGE_APPLY`: 0x04 in 13–14, 0x02 in 15+.
    pub bimg_apply: u8,
    /// Any bit meaning "image is compressed": `IS_COMPRESSED` 0x02 in 13–14; PGLZ 0x04,
    /// LZ4 0x08, ZSTD 0x10 in 15+.
    pub bimg_compressed_mask: u8,
    /// `XLOG_DBASE_DROP`: 0x10 in 13–14, 0x20 in 15+.
    pub dbase_drop: u8,
    /// `XLOG_DBASE_CREATE_WAL_LOG` (15+).
    pub dbase_create_wal_log: Option<u8>,
    /// `XLR_BLOCK_ID_TOPLEVEL_XID` (252) exists (14+).
    pub has_toplevel_xid: bool,
    /// Custom resource managers 128–255 are valid (15+).
    pub custom_rmgrs: bool,
    /// Offset of `wal_level` in `CheckPoint` (17+).
    pub checkpoint_wal_level: Option<usize>,
    /// Offset of `wal_level` in `xl_end_of_recovery` (17+).
    pub end_of_recovery_wal_level: Option<usize>,
    /// `XLOG_CHECKPOINT_REDO` (0xE0, 17+), whose main data is an int32 `wal_level`.
    pub has_checkpoint_redo: bool,
    /// Size of one `xl_xact_stats_item` (15+: 12 bytes; 18: 16 bytes).
    pub xact_stats_item: Option<usize>,
}

const V13: VersionTable = VersionTable {
    version: PgVersion::V13,
    bimg_apply: 0x04,
    bimg_compressed_mask: 0x02,
    dbase_drop: 0x10,
    dbase_create_wal_log: None,
    has_toplevel_xid: false,
    custom_rmgrs: false,
    checkpoint_wal_level: None,
    end_of_recovery_wal_level: None,
    has_checkpoint_redo: false,
    xact_stats_item: None,
};

const V14: VersionTable = VersionTable {
    version: PgVersion::V14,
    has_toplevel_xid: true,
    ..V13
};

const V15: VersionTable = VersionTable {
    version: PgVersion::V15,
    bimg_apply: 0x02,
    bimg_compressed_mask: 0x04 | 0x08 | 0x10,
    dbase_drop: 0x20,
    dbase_create_wal_log: Some(0x10),
    custom_rmgrs: true,
    xact_stats_item: Some(12),
    ..V14
};

const V16: VersionTable = VersionTable {
    version: PgVersion::V16,
    ..V15
};

const V17: VersionTable = VersionTable {
    version: PgVersion::V17,
    checkpoint_wal_level: Some(20),
    end_of_recovery_wal_level: Some(16),
    has_checkpoint_redo: true,
    ..V16
};

const V18: VersionTable = VersionTable {
    version: PgVersion::V18,
    xact_stats_item: Some(16),
    ..V17
};

/// The table of one major version.
pub fn table(v: PgVersion) -> &'static VersionTable {
    match v {
        PgVersion::V13 => &V13,
        PgVersion::V14 => &V14,
        PgVersion::V15 => &V15,
        PgVersion::V16 => &V16,
        PgVersion::V17 => &V17,
        PgVersion::V18 => &V18,
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn tables_follow_the_spec() {
        for v in PgVersion::ALL {
            assert_eq!(table(v).version, v);
        }
        assert_eq!(table(PgVersion::V14).dbase_drop, 0x10);
        assert_eq!(table(PgVersion::V15).dbase_drop, 0x20);
        assert_eq!(table(PgVersion::V14).bimg_apply, 0x04);
        assert_eq!(table(PgVersion::V15).bimg_apply, 0x02);
        assert!(!table(PgVersion::V13).has_toplevel_xid);
        assert!(table(PgVersion::V14).has_toplevel_xid);
        assert_eq!(table(PgVersion::V16).checkpoint_wal_level, None);
        assert_eq!(table(PgVersion::V17).checkpoint_wal_level, Some(20));
        assert_eq!(table(PgVersion::V17).xact_stats_item, Some(12));
        assert_eq!(table(PgVersion::V18).xact_stats_item, Some(16));
    }
}
