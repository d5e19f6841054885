//! The union of the indexes of a range of segments: one changed-block map for a backup.
//!
//! # Semantics
//! Per relation fork, the map holds the **union** of the changed blocks and the **minimum**
//! limit block (a fork created or dropped anywhere in the range has limit 0). This is how
//! PostgreSQL merges WAL summaries for `pg_basebackup --incremental` (WAL-FORMAT §3.4).
//!
//! # Why order does not matter, and why that is safe
//! Union and minimum are commutative and associative, so the map is the same whatever order
//! the indexes come in, and merging already-merged maps gives the same result. Losing the
//! order loses information: "truncated to 10, then blocks 10..20 rewritten" and "blocks
//! 10..20 rewritten, then truncated to 10" merge to the same entry (limit 10, blocks
//! 10..20). That is safe because a backup acts on the entry conservatively: it copies every
//! listed block *and* every block at or above the limit, and restore never takes a block at
//! or above the limit from an older backup (WAL-FORMAT §3.9 item 3: `old_source_limit =
//! min(size, limit)`). Both orders therefore lead to the file's current contents being
//! copied from the limit upwards; the map is a superset of what changed, never a subset.
//! Blocks at or above a lower limit are kept (PostgreSQL drops them) only because keeping
//! them costs nothing: they are copied anyway.
//!
//! # What the map cannot know
//! - Changes with no WAL: a `wal_level=minimal` period ([`ChangeMap::wal_level_minimal`]),
//!   unlogged relations, and blocks extended but never written (zero pages). The last are
//!   why restore must zero-fill, never take older data, at or above the limit.
//! - Segments missing from the range ([`ChangeMap::gaps`]) or indexes still waiting for
//!   their next segment ([`ChangeMap::pending_segments`]). [`ChangeMap::check_complete`]
//!   refuses both.
//! - Policy: FSM and VM forks should be copied whole regardless of the map (WAL-FORMAT §3.9
//!   items 1 and 2); that is the backup planner's decision, not the map's.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::index::{BlockSet, ForkChange, RelFork, SegmentIndex};
use crate::types::Lsn;

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
    /// Segment numbers of merged indexes that were `pending`: the record that begins at
    /// their end is missing from the map.
    pub pending_segments: Vec<u64>,
    /// Ranges of segment numbers (first, last, inclusive) missing between consecutive
    /// indexes. Indexes that repeat or go back (the same segment on two timelines) are not
    /// gaps: repeating only adds blocks.
    pub gaps: Vec<(u64, u64)>,
    /// Lowest and highest segment number merged.
    pub segno_range: Option<(u64, u64)>,
    /// Lowest start and highest end LSN of the merged indexes.
    pub lsn_range: Option<(Lsn, Lsn)>,
    /// System identifiers seen; more than one means indexes of different clusters.
    pub system_ids: BTreeSet<u64>,
}

/// What changed in one relation segment file (`<rel>[_<fork>][.<N>]`), in block numbers
/// relative to the start of that file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileChange {
    /// Copy the file whole: its database was created or dropped in the range, or the fork's
    /// limit block is at or below the file's first block (the fork was created, dropped, or
    /// truncated below this file). Then nothing may come from an older backup.
    pub whole: bool,
    /// Changed blocks inside the file, relative to its first block.
    pub blocks: BlockSet,
    /// Relative limit block, clamped to `0..=relseg_size`: blocks at or above it may never
    /// be taken from an older backup. `None`: the fork was neither truncated, created nor
    /// dropped in the range.
    pub limit: Option<u32>,
}

impl FileChange {
    /// The number of leading blocks restore may take from an older backup, for a file that
    /// is `size_blocks` long now: `min(size, limit)` (WAL-FORMAT §3.9). Blocks from there
    /// to the end must come from this backup, or be zero pages.
    pub fn old_source_limit(&self, size_blocks: u32) -> u32 {
        if self.whole {
            return 0;
        }
        self.limit.map_or(size_blocks, |l| l.min(size_blocks))
    }

    /// The blocks a backup must copy from a file that is `size_blocks` long now: the changed
    /// blocks below the size, plus every block from the old-source limit to the end.
    pub fn blocks_to_copy(&self, size_blocks: u32) -> BlockSet {
        let mut out = self.blocks.slice(0, size_blocks);
        let from = self.old_source_limit(size_blocks);
        if from < size_blocks {
            out.insert_range(from..=size_blocks - 1);
        }
        out
    }
}

impl ChangeMap {
    /// The change of one fork, if anything happened to it in the range.
    pub fn fork(&self, key: &RelFork) -> Option<&ForkChange> {
        self.forks.get(key)
    }

    /// Whether every file of database `db` in tablespace `spc` must be taken whole (the
    /// database was created, by file copy or WAL-logged, or dropped in the range).
    pub fn whole_db(&self, spc: u32, db: u32) -> bool {
        self.whole_dbs.contains(&(spc, db))
    }

    /// The changes that fall in segment file `.file_segno` of a fork (blocks
    /// `file_segno × relseg_size ..` up to the next file), relative to that file.
    /// `relseg_size` is `RELSEG_SIZE` in blocks (131072 for 1 GiB files of 8 KiB pages).
    pub fn blocks_for_file(&self, key: &RelFork, file_segno: u32, relseg_size: u32) -> FileChange {
        let start = file_segno as u64 * relseg_size as u64;
        if self.whole_db(key.spc, key.db) {
            return FileChange {
                whole: true,
                blocks: BlockSet::new(),
                limit: Some(0),
            };
        }
        let Some(fc) = self.forks.get(key) else {
            return FileChange::default();
        };
        let limit = fc
            .limit_block
            .map(|l| (l as u64).saturating_sub(start).min(relseg_size as u64) as u32);
        if limit == Some(0) {
            return FileChange {
                whole: true,
                blocks: BlockSet::new(),
                limit,
            };
        }
        let blocks = fc.blocks.shifted_slice(start, relseg_size as u64);
        FileChange {
            whole: false,
            blocks,
            limit,
        }
    }

    /// Reasons the map may miss changes, one sentence each; empty when it is complete.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.wal_level_minimal {
            p.push("WAL from a wal_level=minimal period is in the range".to_string());
        }
        for &(a, b) in &self.gaps {
            p.push(if a == b {
                format!("segment {a:X} is missing from the index")
            } else {
                format!("segments {a:X} to {b:X} are missing from the index")
            });
        }
        for s in &self.pending_segments {
            p.push(format!(
                "the index of segment {s:X} still waits for the next segment"
            ));
        }
        if self.system_ids.len() > 1 {
            p.push(format!(
                "indexes of {} different database systems were merged",
                self.system_ids.len()
            ));
        }
        p
    }

    /// Fails, listing [`ChangeMap::problems`], unless the map can be trusted for an
    /// incremental backup. A pending *last* segment is harmless when the backup's range
    /// ends before its missing record begins; callers that know so may check
    /// [`ChangeMap::problems`] themselves.
    pub fn check_complete(&self) -> Result<()> {
        let p = self.problems();
        if p.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "the WAL index cannot be trusted for an incremental backup: {}",
                p.join("; ")
            )))
        }
    }
}

/// Blocks of one fork while merging.
///
/// - `Bitmap`: one bit per block from the smallest to the largest block any index lists
///   for the fork. Adding a set costs O(its runs); turning the bitmap back into runs costs
///   O(span / 64 + runs). Used when the span is not much bigger than the runs added (see
///   [`BITMAP_BYTES_PER_RUN`]), which is the normal case: hot relations are revisited.
/// - `Stack`: sets of decreasing size, merged like a binary counter, so that adding many
///   small sets costs O(n log k) rather than the O(n × k) of folding each into one big set
///   (a linear union walks the whole big set). Used for forks whose blocks are few and far
///   apart, where a bitmap would waste memory.
enum Blocks {
    Bitmap { base: u32, words: Vec<u64> },
    Stack(Vec<BlockSet>),
}

/// A fork's bitmap may use this many bytes per run added to it (plus
/// [`BITMAP_MIN_BYTES`]): twice what merely holding each added run once would cost.
const BITMAP_BYTES_PER_RUN: u64 = 16;
const BITMAP_MIN_BYTES: u64 = 64 << 10;

impl Blocks {
    fn new(shape: &Shape) -> Blocks {
        match shape.bounds {
            Some((lo, hi))
                if (hi - lo) as u64 / 8 <= BITMAP_MIN_BYTES + BITMAP_BYTES_PER_RUN * shape.runs =>
            {
                Blocks::Bitmap {
                    base: lo,
                    words: vec![0; ((hi - lo) / 64) as usize + 1],
                }
            }
            _ => Blocks::Stack(Vec::new()),
        }
    }

    fn add(&mut self, blocks: &BlockSet) {
        if blocks.is_empty() {
            return;
        }
        match self {
            Blocks::Bitmap { base, words } => {
                for r in blocks.ranges() {
                    // The pre-pass saw these blocks, so they lie in base..=base + span.
                    set_bits(words, r.start() - *base, r.end() - *base);
                }
            }
            Blocks::Stack(levels) => {
                let mut cur = blocks.clone();
                cur.normalize();
                while let Some(top) = levels.last() {
                    if top.run_count() > 2 * cur.run_count() {
                        break;
                    }
                    if let Some(mut top) = levels.pop() {
                        top.union_with(&cur);
                        cur = top;
                    }
                }
                levels.push(cur);
            }
        }
    }

    fn finish(self) -> BlockSet {
        match self {
            Blocks::Bitmap { base, words } => bitmap_to_set(base, &words),
            Blocks::Stack(mut levels) => {
                let mut blocks = levels.pop().unwrap_or_default();
                while let Some(mut s) = levels.pop() {
                    s.union_with(&blocks);
                    blocks = s;
                }
                blocks
            }
        }
    }
}

/// Sets bits `first..=last` (offsets from the bitmap's base). Out-of-range bits are
/// ignored (they cannot occur: the bitmap spans every block the pre-pass saw).
fn set_bits(words: &mut [u64], first: u32, last: u32) {
    let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
    let head = u64::MAX << (first % 64);
    let tail = u64::MAX >> (63 - last % 64);
    if fw == lw {
        if let Some(w) = words.get_mut(fw) {
            *w |= head & tail;
        }
        return;
    }
    if let Some(w) = words.get_mut(fw) {
        *w |= head;
    }
    let mid_end = lw.min(words.len());
    if fw + 1 < mid_end {
        words[fw + 1..mid_end].fill(u64::MAX);
    }
    if let Some(w) = words.get_mut(lw) {
        *w |= tail;
    }
}

fn bitmap_to_set(base: u32, words: &[u64]) -> BlockSet {
    let mut set = BlockSet::new();
    for (i, &w) in words.iter().enumerate() {
        let word_start = base as u64 + i as u64 * 64;
        if w == u64::MAX {
            set.insert_range(word_start as u32..=(word_start + 63) as u32);
            continue;
        }
        let (mut w, mut bit) = (w, 0u32);
        while w != 0 {
            let tz = w.trailing_zeros();
            w >>= tz;
            bit += tz;
            let ones = (!w).trailing_zeros().min(64 - bit);
            let first = word_start + bit as u64;
            set.insert_range(first as u32..=(first + ones as u64 - 1) as u32);
            if bit + ones >= 64 {
                break;
            }
            w >>= ones;
            bit += ones;
        }
    }
    set
}

/// What the pre-pass learns about a fork: the bounds of its blocks over all indexes, and
/// how many runs will be added.
#[derive(Default)]
struct Shape {
    bounds: Option<(u32, u32)>,
    runs: u64,
}

/// Per-fork accumulator.
struct Acc {
    blocks: Blocks,
    limit_block: Option<u32>,
    created: bool,
    dropped: bool,
}

/// Unions indexes given in LSN order.
///
/// The order only matters for [`ChangeMap::gaps`]; the changed-block map itself is
/// order-independent (see the module documentation). Two passes: the first learns each
/// fork's block bounds to choose its accumulator, the second adds the blocks.
pub fn merge<'a>(indexes: impl IntoIterator<Item = &'a SegmentIndex>) -> ChangeMap {
    let indexes: Vec<&SegmentIndex> = indexes.into_iter().collect();
    let mut shapes: BTreeMap<RelFork, Shape> = BTreeMap::new();
    for ix in &indexes {
        for (key, fc) in &ix.forks {
            let sh = shapes.entry(*key).or_default();
            if let Some((lo, hi)) = fc.blocks.bounds() {
                sh.bounds = Some(sh.bounds.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
                sh.runs += fc.blocks.run_count() as u64;
            }
        }
    }
    let mut accs: BTreeMap<RelFork, Acc> = shapes
        .iter()
        .map(|(k, sh)| {
            let acc = Acc {
                blocks: Blocks::new(sh),
                limit_block: None,
                created: false,
                dropped: false,
            };
            (*k, acc)
        })
        .collect();

    let mut map = ChangeMap::default();
    let mut prev_segno: Option<u64> = None;
    for ix in indexes {
        map.segments += 1;
        map.wal_level_minimal |= ix.wal_level_minimal;
        if ix.pending {
            map.pending_segments.push(ix.segno);
        }
        if let Some(p) = prev_segno {
            if ix.segno > p + 1 {
                map.gaps.push((p + 1, ix.segno - 1));
            }
        }
        prev_segno = Some(prev_segno.map_or(ix.segno, |p| p.max(ix.segno)));
        map.segno_range = Some(match map.segno_range {
            None => (ix.segno, ix.segno),
            Some((a, b)) => (a.min(ix.segno), b.max(ix.segno)),
        });
        map.lsn_range = Some(match map.lsn_range {
            None => (ix.start_lsn, ix.end_lsn),
            Some((a, b)) => (a.min(ix.start_lsn), b.max(ix.end_lsn)),
        });
        map.system_ids.insert(ix.system_id);

        for (key, fc) in &ix.forks {
            let Some(acc) = accs.get_mut(key) else {
                continue; // unreachable: the pre-pass saw every key
            };
            acc.blocks.add(&fc.blocks);
            if let Some(l) = fc.limit_block {
                acc.limit_block = Some(acc.limit_block.map_or(l, |a| a.min(l)));
            }
            // The builder records limit 0 for these; apply it again in case an index was
            // built without (a superset is safe, a missed creation is not).
            if fc.created || fc.dropped {
                acc.limit_block = Some(0);
            }
            acc.created |= fc.created;
            acc.dropped |= fc.dropped;
        }
        for ev in &ix.db_events {
            map.whole_dbs.insert((ev.spc, ev.db));
        }
    }
    map.forks = accs
        .into_iter()
        .map(|(k, a)| {
            let fc = ForkChange {
                blocks: a.blocks.finish(),
                limit_block: a.limit_block,
                created: a.created,
                dropped: a.dropped,
            };
            (k, fc)
        })
        .collect();
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{DbEvent, DbEventKind};

    fn key(rel: u32, fork: u8) -> RelFork {
        RelFork {
            spc: 1663,
            db: 5,
            rel,
            fork,
        }
    }

    fn seg(segno: u64) -> SegmentIndex {
        SegmentIndex::empty(16, 16 << 20, 8192, 7, 1, segno)
    }

    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    #[test]
    fn union_and_min_limit() {
        let mut a = seg(1);
        a.fork_mut(key(10, 0)).blocks = BlockSet::from_blocks([1, 2, 3]);
        a.fork_mut(key(10, 0)).apply_limit(50);
        let mut b = seg(2);
        b.fork_mut(key(10, 0)).blocks = BlockSet::from_blocks([3, 4, 60]);
        b.fork_mut(key(10, 0)).apply_limit(20);
        b.fork_mut(key(11, 0)).blocks.insert(9);
        let mut c = seg(3);
        c.fork_mut(key(10, 0)).apply_limit(30);
        let m = merge([&a, &b, &c]);
        let f = m.fork(&key(10, 0)).unwrap();
        assert_eq!(f.blocks.to_vec(), vec![1, 2, 3, 4, 60]);
        assert_eq!(f.limit_block, Some(20));
        assert!(!f.created && !f.dropped);
        assert_eq!(m.fork(&key(11, 0)).unwrap().limit_block, None);
        assert!(m.fork(&key(12, 0)).is_none());
        assert_eq!(m.segments, 3);
        assert_eq!(m.segno_range, Some((1, 3)));
        assert!(m.check_complete().is_ok());
        // Order-independent.
        let r = merge([&c, &b, &a]);
        assert_eq!(r.forks, m.forks);
    }

    #[test]
    fn created_then_reextended_and_dropped() {
        // Segment 1 changes blocks 0..100; segment 2 truncates to 0 and recreates
        // (created, limit 0), then writes blocks 0..3; segment 3 extends to 7.
        let mut a = seg(1);
        a.fork_mut(key(20, 0)).blocks = BlockSet::from_ranges([0..=99]);
        let mut b = seg(2);
        let f = b.fork_mut(key(20, 0));
        f.created = true; // deliberately without apply_limit(0): merge must apply it
        f.blocks = BlockSet::from_ranges([0..=3]);
        let mut c = seg(3);
        c.fork_mut(key(20, 0)).blocks = BlockSet::from_ranges([4..=7]);
        // A dropped relation.
        c.fork_mut(key(21, 0)).dropped = true;
        let m = merge([&a, &b, &c]);
        let f = m.fork(&key(20, 0)).unwrap();
        assert!(f.created);
        assert_eq!(f.limit_block, Some(0));
        assert_eq!(f.blocks.len(), 100);
        let d = m.fork(&key(21, 0)).unwrap();
        assert!(d.dropped && d.limit_block == Some(0));
        // Limit 0: every file of the fork is copied whole, nothing comes from older backups.
        let fc = m.blocks_for_file(&key(20, 0), 0, 131_072);
        assert!(fc.whole);
        assert_eq!(fc.old_source_limit(8), 0);
        assert_eq!(fc.blocks_to_copy(8).to_vec(), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn database_events_make_whole_dbs() {
        let mut a = seg(1);
        for (db, kind) in [
            (
                100,
                DbEventKind::CreatedFileCopy {
                    src_spc: 1663,
                    src_db: 1,
                },
            ),
            (101, DbEventKind::CreatedWalLog),
            (102, DbEventKind::Dropped),
        ] {
            a.db_events.push(DbEvent {
                lsn: Lsn(1),
                spc: 1663,
                db,
                kind,
            });
        }
        let m = merge([&a]);
        assert!(m.whole_db(1663, 100) && m.whole_db(1663, 101) && m.whole_db(1663, 102));
        assert!(!m.whole_db(1663, 1) && !m.whole_db(16500, 100));
        let k = RelFork {
            spc: 1663,
            db: 100,
            rel: 1259,
            fork: 0,
        };
        assert!(m.blocks_for_file(&k, 3, 131_072).whole);
    }

    #[test]
    fn blocks_for_file_is_relative_and_applies_the_limit() {
        let rs = 1000;
        let mut a = seg(1);
        let f = a.fork_mut(key(30, 0));
        f.blocks = BlockSet::from_blocks([5, 999, 1000, 1001, 2500, 3999, 4000]);
        f.apply_limit(2600);
        let m = merge([&a]);
        let k = key(30, 0);
        let f0 = m.blocks_for_file(&k, 0, rs);
        assert_eq!(
            (f0.whole, f0.blocks.to_vec(), f0.limit),
            (false, vec![5, 999], Some(1000))
        );
        let f1 = m.blocks_for_file(&k, 1, rs);
        assert_eq!(f1.blocks.to_vec(), vec![0, 1]);
        // File .2 holds the limit: blocks 600.. of it never come from an older backup.
        let f2 = m.blocks_for_file(&k, 2, rs);
        assert_eq!((f2.blocks.to_vec(), f2.limit), (vec![500], Some(600)));
        assert_eq!(f2.old_source_limit(1000), 600);
        assert_eq!(f2.old_source_limit(300), 300);
        let copy = f2.blocks_to_copy(700);
        assert_eq!(copy.len(), 1 + 100);
        assert!(copy.contains(500) && copy.contains(600) && copy.contains(699));
        // Files entirely above the limit are whole.
        let f3 = m.blocks_for_file(&k, 3, rs);
        assert!(f3.whole && f3.blocks.is_empty());
        // Unchanged fork: nothing to copy, everything may come from older backups.
        let u = m.blocks_for_file(&key(31, 0), 0, rs);
        assert_eq!(u, FileChange::default());
        assert_eq!(u.old_source_limit(77), 77);
        assert!(u.blocks_to_copy(77).is_empty());
        // Extreme file numbers do not overflow.
        let far = m.blocks_for_file(&k, u32::MAX, 131_072);
        assert!(far.whole);
        let zero = m.blocks_for_file(&key(31, 0), 2, 0);
        assert!(zero.blocks.is_empty() && !zero.whole);
    }

    #[test]
    fn gaps_pending_minimal_and_foreign_are_reported() {
        let a = seg(1);
        let mut b = seg(4);
        b.pending = true;
        let mut c = seg(5);
        c.wal_level_minimal = true;
        c.system_id = 8;
        let m = merge([&a, &b, &c]);
        assert_eq!(m.gaps, vec![(2, 3)]);
        assert_eq!(m.pending_segments, vec![4]);
        assert!(m.wal_level_minimal);
        let e = m.check_complete().unwrap_err().to_string();
        for s in [
            "minimal",
            "segments 2 to 3",
            "segment 4 still waits",
            "2 different",
        ] {
            assert!(e.contains(s), "{s}: {e}");
        }
        // The same segment on two timelines is not a gap.
        let m = merge([&seg(1), &seg(2), &seg(2), &seg(3)]);
        assert!(m.gaps.is_empty());
    }

    /// The stacked accumulator gives exactly the naive union, in any order.
    #[test]
    fn many_segments_match_naive_union() {
        let mut st = 99u64;
        let mut segs = Vec::new();
        for s in 0..300 {
            let mut ix = seg(s);
            // Spans: bitmap mode (100, 10k, 50, 3, the top of the block range), stack mode
            // (2^30 with ~30k runs in all).
            for f in 0..6u32 {
                let fc = ix.fork_mut(key(f, 0));
                let span = [100u64, 10_000, 1 << 30, 50, 3, 300][f as usize];
                for _ in 0..(xorshift(&mut st) % 200) {
                    let b = (xorshift(&mut st) % span) as u32;
                    if f == 5 {
                        fc.blocks.insert_range(u32::MAX - b..=u32::MAX - b / 2);
                    } else {
                        fc.blocks.insert(b);
                    }
                }
                if xorshift(&mut st).is_multiple_of(50) {
                    fc.apply_limit((xorshift(&mut st) % span) as u32);
                }
            }
            segs.push(ix);
        }
        let m = merge(segs.iter());
        for f in 0..6u32 {
            let mut naive = BlockSet::new();
            let mut limit: Option<u32> = None;
            for ix in &segs {
                let fc = &ix.forks[&key(f, 0)];
                naive.union_with(&fc.blocks);
                limit = match (limit, fc.limit_block) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            let got = m.fork(&key(f, 0)).unwrap();
            assert_eq!(got.blocks, naive);
            assert_eq!(got.limit_block, limit);
        }
        let rev = merge(segs.iter().rev());
        assert_eq!(rev.forks, m.forks);
    }
}
