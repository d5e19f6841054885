//! The union of the indexes of a range of segments: one changed-block map for a backup.

use std::collections::{BTreeMap, BTreeSet};

use crate::index::{ForkChange, RelFork, SegmentIndex};

/// Everything that changed in relation files over an LSN range.
#[derive(Clone, Debug, Default)]
pub struct ChangeMap {
    /// Per relation fork: the union of changed blocks and the smallest limit block.
    pub forks: BTreeMap<RelFork, ForkChange>,
    /// (spc, db) pairs created or dropped in the range: take every file in them whole.
    pub whole_dbs: BTreeSet<(u32, u32)>,
    /// A `wal_level=minimal` period was seen: the map is not trustworthy.
    pub wal_level_minimal: bool,
    pub segments: u64,
}

/// Unions indexes given in LSN order.
pub fn merge<'a>(_indexes: impl IntoIterator<Item = &'a SegmentIndex>) -> ChangeMap {
    ChangeMap::default()
}
