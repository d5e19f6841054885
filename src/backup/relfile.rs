//! What a path inside a data directory is: excluded, a relation data file (which fork,
//! which segment), or any other file. Paths are "logical": relative to PGDATA with `/`
//! separators, tablespaces as `pg_tblspc/<oid>/<PG_version_dir>/...`.

use crate::index::{RelFork, FSM_FORKNUM, INIT_FORKNUM, MAIN_FORKNUM, VM_FORKNUM};

/// Tablespace OIDs of `base/` and `global/`.
pub const DEFAULTTABLESPACE_OID: u32 = 1663;
pub const GLOBALTABLESPACE_OID: u32 = 1664;

/// Top-level directories whose contents are not backed up (the directory itself is).
const EXCLUDE_DIR_CONTENTS: &[&str] = &[
    "pg_wal",
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Top-level files never backed up.
const EXCLUDE_TOP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    // A standby's: a backup of a standby restores as a standalone server (restore writes
    // its own signal file), and a copied standby.signal makes it wait for WAL forever.
    "standby.signal",
    "recovery.signal",
];

/// Whether a directory entry is excluded anywhere in the tree.
pub fn excluded_name(name: &str) -> bool {
    name.starts_with("pgsql_tmp") || name.starts_with("pg_internal.init") || name == ".DS_Store"
}

/// Whether the top-level entry `name` is excluded as a file.
pub fn excluded_top_file(name: &str) -> bool {
    EXCLUDE_TOP_FILES.contains(&name)
}

/// Whether the top-level directory `name` is kept empty. `pg_wal/archive_status` (and
/// `pg_wal/summaries`, 17+) are recreated empty by the caller.
pub fn excluded_dir_contents(name: &str) -> bool {
    EXCLUDE_DIR_CONTENTS.contains(&name)
}

/// A parsed relation file name: `<relnumber>[_fsm|_vm|_init][.<segno>]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelFileName {
    pub rel: u32,
    pub fork: u8,
    pub segno: u32,
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a relation file name; `None` for anything else (`PG_VERSION`, `pg_filenode.map`).
pub fn parse_rel_file_name(name: &str) -> Option<RelFileName> {
    let (stem, segno) = match name.split_once('.') {
        Some((stem, seg)) => (stem, digits(seg)?),
        None => (name, 0),
    };
    let (rel, fork) = match stem.split_once('_') {
        Some((rel, "fsm")) => (rel, FSM_FORKNUM),
        Some((rel, "vm")) => (rel, VM_FORKNUM),
        Some((rel, "init")) => (rel, INIT_FORKNUM),
        Some(_) => return None,
        None => (stem, MAIN_FORKNUM),
    };
    let rel = digits(rel)?;
    if rel == 0 {
        return None;
    }
    Some(RelFileName { rel, fork, segno })
}

/// Temporary relation files `t<backend>_<rel>[...]`.
pub fn is_temp_relation(name: &str) -> bool {
    match name.strip_prefix('t').and_then(|r| r.split_once('_')) {
        Some((backend, rest)) => {
            digits(backend).is_some() && rest.split(['_', '.']).next().and_then(digits).is_some()
        }
        None => false,
    }
}

/// The database directory a logical directory path denotes, as (spc, db):
/// `global` → (1664, 0), `base/<db>` → (1663, db), `pg_tblspc/<spc>/<PG_x>/<db>` → (spc, db).
pub fn db_dir(dir: &str) -> Option<(u32, u32)> {
    let parts: Vec<&str> = dir.split('/').collect();
    match parts.as_slice() {
        ["global"] => Some((GLOBALTABLESPACE_OID, 0)),
        ["base", db] => Some((DEFAULTTABLESPACE_OID, digits(db)?)),
        ["pg_tblspc", spc, ver, db] if ver.starts_with("PG_") => Some((digits(spc)?, digits(db)?)),
        _ => None,
    }
}

/// A relation data file located in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelFile {
    pub fork: RelFork,
    /// Segment number of the file (`.N` suffix).
    pub segno: u32,
}

/// Classifies a logical file path as a relation file.
pub fn rel_file(path: &str) -> Option<RelFile> {
    let (dir, name) = path.rsplit_once('/')?;
    let (spc, db) = db_dir(dir)?;
    let r = parse_rel_file_name(name)?;
    Some(RelFile {
        fork: RelFork {
            spc,
            db,
            rel: r.rel,
            fork: r.fork,
        },
        segno: r.segno,
    })
}

/// Block range `[first, first + relseg)` of the whole fork covered by segment file `segno`.
pub fn segment_first_block(segno: u32, relseg_size: u32) -> u64 {
    segno as u64 * relseg_size as u64
}

/// The part of a fork-wide block number set that falls in segment file `segno`, as
/// file-relative block numbers below `file_blocks`.
pub fn blocks_in_segment(
    fork_blocks: impl Iterator<Item = u32>,
    segno: u32,
    relseg_size: u32,
    file_blocks: u32,
) -> Vec<u32> {
    let first = segment_first_block(segno, relseg_size);
    let end = first + relseg_size as u64;
    fork_blocks
        .filter(|&b| (b as u64) >= first && (b as u64) < end)
        .map(|b| (b as u64 - first) as u32)
        .filter(|&b| b < file_blocks)
        .collect()
}

/// A fork-wide limit block, made relative to segment file `segno` (0..=relseg_size).
pub fn limit_in_segment(limit: u32, segno: u32, relseg_size: u32) -> u32 {
    let first = segment_first_block(segno, relseg_size);
    (limit as u64).saturating_sub(first).min(relseg_size as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_file_names() {
        assert_eq!(
            parse_rel_file_name("16384"),
            Some(RelFileName {
                rel: 16384,
                fork: 0,
                segno: 0
            })
        );
        assert_eq!(
            parse_rel_file_name("16384_vm.3"),
            Some(RelFileName {
                rel: 16384,
                fork: 2,
                segno: 3
            })
        );
        assert_eq!(parse_rel_file_name("16384_init").map(|r| r.fork), Some(3));
        for bad in [
            "PG_VERSION",
            "pg_filenode.map",
            "16384_foo",
            "16384.",
            "x1",
            "0",
            "",
        ] {
            assert_eq!(parse_rel_file_name(bad), None, "{bad}");
        }
        assert!(is_temp_relation("t3_16384"));
        assert!(is_temp_relation("t3_16384_fsm.1"));
        assert!(!is_temp_relation("16384"));
        assert!(!is_temp_relation("tx_1"));
    }

    #[test]
    fn paths_to_forks() {
        let r = rel_file("base/5/16384.2").unwrap();
        assert_eq!(
            r.fork,
            RelFork {
                spc: 1663,
                db: 5,
                rel: 16384,
                fork: 0
            }
        );
        assert_eq!(r.segno, 2);
        let g = rel_file("global/1262").unwrap();
        assert_eq!((g.fork.spc, g.fork.db), (1664, 0));
        let t = rel_file("pg_tblspc/16400/PG_15_202209061/5/16401_fsm").unwrap();
        assert_eq!((t.fork.spc, t.fork.db, t.fork.fork), (16400, 5, 1));
        assert!(rel_file("base/5/PG_VERSION").is_none());
        assert!(rel_file("pg_xact/0000").is_none());
        assert!(rel_file("base/16384").is_none());
    }

    /// Multi-segment relation files (> 1 GiB) are too slow to create in integration tests;
    /// the segment arithmetic they rely on is tested here.
    #[test]
    fn segment_math_for_multi_segment_files() {
        let relseg = 131072;
        let fork_blocks = [0u32, 5, 131071, 131072, 131073, 262143, 262144, 400000];
        assert_eq!(
            blocks_in_segment(fork_blocks.iter().copied(), 0, relseg, relseg),
            vec![0, 5, 131071]
        );
        assert_eq!(
            blocks_in_segment(fork_blocks.iter().copied(), 1, relseg, relseg),
            vec![0, 1, 131071]
        );
        // a shorter last segment drops blocks past its end
        assert_eq!(
            blocks_in_segment(fork_blocks.iter().copied(), 3, relseg, 10),
            Vec::<u32>::new()
        );
        assert_eq!(
            blocks_in_segment(fork_blocks.iter().copied(), 2, relseg, 10),
            vec![0]
        );
        assert_eq!(limit_in_segment(0, 1, relseg), 0);
        assert_eq!(limit_in_segment(131072 + 7, 0, relseg), relseg);
        assert_eq!(limit_in_segment(131072 + 7, 1, relseg), 7);
        assert_eq!(limit_in_segment(131072 + 7, 2, relseg), 0);
        assert_eq!(segment_first_block(3, relseg), 393216);
    }
}
