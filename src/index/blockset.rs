//! A set of block numbers (`u32`), kept as sorted runs of consecutive blocks.
//!
//! Representation: a sorted list of disjoint, non-adjacent inclusive runs `[first, last]`,
//! plus a list of blocks inserted out of order and not yet folded in (`pending`).
//!
//! - Runs make dense sets tiny: a relation whose blocks 0..1,000,000 all changed is one run of
//!   8 bytes, not 4 MB. It also means a decoded set costs memory in proportion to the bytes it
//!   was decoded from, never to a length a corrupt file claims.
//! - Building is append-then-normalise: [`BlockSet::insert`] extends the last run or starts a
//!   new one when blocks arrive in increasing order (the common case while decoding one
//!   record stream), and otherwise just pushes onto `pending`. [`BlockSet::normalize`] sorts
//!   `pending` once and folds it in, which is much cheaper than keeping a tree while decoding
//!   a segment with hundreds of thousands of block references.
//! - Readers that take `&self` work on a normalised copy when something is pending; callers
//!   that read repeatedly should call `normalize` first.
//! - [`BlockSet::union_with`] is a linear merge of two run lists (O(runs)), with fast paths
//!   for an empty side and for a set that lies entirely after this one.

use std::borrow::Cow;
use std::ops::RangeInclusive;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An inclusive run of consecutive blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    first: u32,
    last: u32,
}

impl Run {
    fn len(self) -> u64 {
        (self.last - self.first) as u64 + 1
    }
}

#[derive(Clone, Debug, Default)]
pub struct BlockSet {
    /// Sorted, disjoint and non-adjacent (`runs[i].last + 1 < runs[i + 1].first`).
    runs: Vec<Run>,
    /// Blocks inserted out of order, unsorted, possibly duplicated or already in `runs`.
    pending: Vec<u32>,
}

impl PartialEq for BlockSet {
    fn eq(&self, other: &Self) -> bool {
        self.canonical_runs() == other.canonical_runs()
    }
}
impl Eq for BlockSet {}

/// Pushes a run onto a sorted run list, coalescing it with the last run when they overlap
/// or touch. `run.first` must be >= the first block of the last run.
fn push_run(runs: &mut Vec<Run>, run: Run) {
    if let Some(last) = runs.last_mut() {
        debug_assert!(run.first >= last.first);
        if last.last == u32::MAX || run.first <= last.last + 1 {
            if run.last > last.last {
                last.last = run.last;
            }
            return;
        }
    }
    runs.push(run);
}

/// Runs from sorted, de-duplicated blocks.
fn runs_from_sorted(blocks: &[u32]) -> Vec<Run> {
    let mut runs = Vec::new();
    for &b in blocks {
        push_run(&mut runs, Run { first: b, last: b });
    }
    runs
}

/// The union of two canonical run lists, in one linear pass.
fn union_runs(a: &[Run], b: &[Run]) -> Vec<Run> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].first <= b[j].first {
            push_run(&mut out, a[i]);
            i += 1;
        } else {
            push_run(&mut out, b[j]);
            j += 1;
        }
    }
    for &r in a[i..].iter().chain(&b[j..]) {
        push_run(&mut out, r);
    }
    out
}

impl BlockSet {
    pub fn new() -> BlockSet {
        BlockSet::default()
    }

    pub fn insert(&mut self, block: u32) {
        if self.pending.is_empty() {
            match self.runs.last_mut() {
                None => {}
                Some(last) if block >= last.first && block <= last.last => return,
                Some(last) if last.last != u32::MAX && block == last.last + 1 => {
                    last.last = block;
                    return;
                }
                Some(last) if block > last.last => {}
                Some(_) => {
                    self.pending.push(block);
                    return;
                }
            }
            self.runs.push(Run {
                first: block,
                last: block,
            });
        } else {
            self.pending.push(block);
        }
    }

    /// Adds every block of `first..=last`.
    pub fn insert_range(&mut self, range: RangeInclusive<u32>) {
        let (first, last) = (*range.start(), *range.end());
        if first > last {
            return;
        }
        self.normalize();
        let run = Run { first, last };
        match self.runs.last() {
            Some(l) if l.first > first => {
                self.runs = union_runs(&self.runs, &[run]);
            }
            _ => push_run(&mut self.runs, run),
        }
    }

    /// Folds out-of-order insertions into the runs; call before reading if built with
    /// `insert` in no particular order.
    pub fn normalize(&mut self) {
        if !self.pending.is_empty() {
            let mut p = std::mem::take(&mut self.pending);
            p.sort_unstable();
            p.dedup();
            let new = runs_from_sorted(&p);
            self.runs = union_runs(&self.runs, &new);
        }
    }

    fn canonical_runs(&self) -> Cow<'_, [Run]> {
        if self.pending.is_empty() {
            Cow::Borrowed(&self.runs)
        } else {
            let mut c = self.clone();
            c.normalize();
            Cow::Owned(c.runs)
        }
    }

    /// All blocks, ascending. Allocates 4 bytes per block: prefer [`BlockSet::ranges`] for
    /// sets that may be large.
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }

    /// Number of blocks (not runs).
    pub fn len(&self) -> usize {
        self.canonical_runs().iter().map(|r| r.len() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.pending.is_empty()
    }

    /// Number of runs of consecutive blocks (a measure of the set's size in memory and on
    /// disk).
    pub fn run_count(&self) -> usize {
        self.canonical_runs().len()
    }

    pub fn contains(&self, block: u32) -> bool {
        if self.pending.contains(&block) {
            return true;
        }
        let i = self.runs.partition_point(|r| r.last < block);
        self.runs.get(i).is_some_and(|r| r.first <= block)
    }

    /// The smallest and largest block, if any.
    pub fn bounds(&self) -> Option<(u32, u32)> {
        let runs = self.canonical_runs();
        Some((runs.first()?.first, runs.last()?.last))
    }

    /// Adds every block of `other`.
    pub fn union_with(&mut self, other: &BlockSet) {
        let theirs = other.canonical_runs();
        if theirs.is_empty() {
            return;
        }
        self.normalize();
        if self.runs.is_empty() {
            self.runs = theirs.into_owned();
            return;
        }
        match self.runs.last() {
            // Entirely after us (e.g. an append-only relation growing segment by segment).
            Some(l) if theirs[0].first > l.last => {
                for &r in theirs.iter() {
                    push_run(&mut self.runs, r);
                }
            }
            _ => self.runs = union_runs(&self.runs, &theirs),
        }
    }

    /// Iterates over the blocks in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges().flatten()
    }

    /// Iterates over the maximal runs of consecutive blocks, in increasing order.
    pub fn ranges(&self) -> impl Iterator<Item = RangeInclusive<u32>> + '_ {
        let runs = self.canonical_runs();
        (0..runs.len()).map(move |i| runs[i].first..=runs[i].last)
    }

    /// The blocks in `lo..hi`, ascending, as a new set.
    pub fn slice(&self, lo: u32, hi: u32) -> BlockSet {
        if lo >= hi {
            return BlockSet::new();
        }
        let runs = self.canonical_runs();
        let start = runs.partition_point(|r| r.last < lo);
        let mut out = Vec::new();
        for r in &runs[start..] {
            if r.first >= hi {
                break;
            }
            out.push(Run {
                first: r.first.max(lo),
                last: r.last.min(hi - 1),
            });
        }
        BlockSet {
            runs: out,
            pending: Vec::new(),
        }
    }

    /// The blocks in `start..start + len`, shifted down by `start` (e.g. the blocks of one
    /// relation segment file, relative to the file). Bounds beyond `u32` are fine.
    pub fn shifted_slice(&self, start: u64, len: u64) -> BlockSet {
        if len == 0 {
            return BlockSet::new();
        }
        let runs = self.canonical_runs();
        let end = start.saturating_add(len); // exclusive
        let from = runs.partition_point(|r| (r.last as u64) < start);
        let mut out = Vec::new();
        for r in &runs[from..] {
            if r.first as u64 >= end {
                break;
            }
            out.push(Run {
                first: ((r.first as u64).max(start) - start) as u32,
                last: ((r.last as u64).min(end - 1) - start) as u32,
            });
        }
        BlockSet {
            runs: out,
            pending: Vec::new(),
        }
    }

    /// Number of blocks in `lo..hi`.
    pub fn count_in(&self, lo: u32, hi: u32) -> u64 {
        self.slice(lo, hi).runs.iter().map(|r| r.len()).sum()
    }

    /// Builds a set from sorted or unsorted blocks.
    pub fn from_blocks(blocks: impl IntoIterator<Item = u32>) -> BlockSet {
        let mut s = BlockSet::new();
        for b in blocks {
            s.insert(b);
        }
        s.normalize();
        s
    }

    /// Builds a set from ranges in any order (empty ranges are ignored).
    pub fn from_ranges(ranges: impl IntoIterator<Item = RangeInclusive<u32>>) -> BlockSet {
        let mut runs: Vec<Run> = ranges
            .into_iter()
            .filter(|r| r.start() <= r.end())
            .map(|r| Run {
                first: *r.start(),
                last: *r.end(),
            })
            .collect();
        runs.sort_unstable_by_key(|r| r.first);
        let mut out = Vec::with_capacity(runs.len());
        for r in runs {
            push_run(&mut out, r);
        }
        BlockSet {
            runs: out,
            pending: Vec::new(),
        }
    }
}

/// Serialised (e.g. in `--format json` output) as a list of `[first, last]` runs, so that a
/// million consecutive blocks print as one pair.
impl Serialize for BlockSet {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let runs = self.canonical_runs();
        s.collect_seq(runs.iter().map(|r| [r.first, r.last]))
    }
}

impl<'de> Deserialize<'de> for BlockSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<BlockSet, D::Error> {
        let pairs = Vec::<[u32; 2]>::deserialize(d)?;
        if let Some(p) = pairs.iter().find(|p| p[0] > p[1]) {
            return Err(serde::de::Error::custom(format!(
                "block run [{}, {}] is reversed",
                p[0], p[1]
            )));
        }
        Ok(BlockSet::from_ranges(
            pairs.into_iter().map(|p| p[0]..=p[1]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic PRNG (xorshift64*), for tests that need many random sets.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    #[test]
    fn insert_normalise_union() {
        let mut s = BlockSet::new();
        for b in [5, 5, 3, 9, 3, 0] {
            s.insert(b);
        }
        assert_eq!(s.to_vec(), vec![0, 3, 5, 9]);
        assert!(s.contains(9) && !s.contains(4));
        s.union_with(&BlockSet::from_blocks([4, 9, 100]));
        assert_eq!(s.to_vec(), vec![0, 3, 4, 5, 9, 100]);
        assert_eq!(s.len(), 6);
        assert_eq!(s.run_count(), 4);
    }

    #[test]
    fn runs_coalesce_and_extremes() {
        let mut s = BlockSet::new();
        for b in 0..1_000_000 {
            s.insert(b);
        }
        assert_eq!(s.run_count(), 1);
        assert_eq!(s.len(), 1_000_000);
        s.insert(u32::MAX);
        s.insert(u32::MAX - 1);
        s.insert(u32::MAX);
        assert_eq!(s.run_count(), 2);
        assert!(s.contains(u32::MAX) && s.contains(999_999) && !s.contains(1_000_000));
        assert_eq!(s.bounds(), Some((0, u32::MAX)));
        let mut t = BlockSet::from_ranges([10..=20, 0..=3, 4..=5, RangeInclusive::new(30, 29)]);
        assert_eq!(t.ranges().collect::<Vec<_>>(), vec![0..=5, 10..=20]);
        t.insert_range(6..=9);
        assert_eq!(t.ranges().collect::<Vec<_>>(), vec![0..=20]);
        t.insert_range(u32::MAX - 5..=u32::MAX);
        t.insert_range(22..=22);
        assert_eq!(t.run_count(), 3);
        assert_eq!(t.slice(5, 23).to_vec().len(), 16 + 1);
        assert_eq!(t.count_in(0, 21), 21);
        assert_eq!(t.count_in(21, 22), 0);
        let top = t.shifted_slice(u32::MAX as u64 - 2, 100);
        assert_eq!(top.to_vec(), vec![0, 1, 2]);
        assert_eq!(t.shifted_slice(4, 3).to_vec(), vec![0, 1, 2]);
        assert!(t.shifted_slice(u32::MAX as u64 + 1, 10).is_empty());
        // Empty and reversed bounds.
        assert!(t.shifted_slice(3, 0).is_empty() && t.slice(5, 3).is_empty());
        assert!(t.slice(7, 7).is_empty() && t.count_in(9, 0) == 0);
    }

    /// Every operation agrees with a plain sorted vector, on random inputs.
    #[test]
    fn matches_sorted_vec_model() {
        let mut st = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..200 {
            let span = [16u64, 300, 70_000][round % 3];
            let mut a = BlockSet::new();
            let mut b = BlockSet::new();
            let mut model: Vec<u32> = Vec::new();
            for _ in 0..(xorshift(&mut st) % 400) {
                let x = (xorshift(&mut st) % span) as u32;
                a.insert(x);
                model.push(x);
            }
            for _ in 0..(xorshift(&mut st) % 400) {
                let x = (xorshift(&mut st) % span) as u32;
                if xorshift(&mut st).is_multiple_of(4) {
                    let y = x.saturating_add((xorshift(&mut st) % 50) as u32);
                    b.insert_range(x..=y);
                    model.extend(x..=y);
                } else {
                    b.insert(x);
                    model.push(x);
                }
            }
            // Read before normalising: readers must see pending blocks.
            let probe = (xorshift(&mut st) % span) as u32;
            let mut am: Vec<u32> = a.to_vec();
            am.dedup();
            assert_eq!(a.contains(probe), am.binary_search(&probe).is_ok());
            a.union_with(&b);
            model.sort_unstable();
            model.dedup();
            assert_eq!(a.to_vec(), model);
            assert_eq!(a.len(), model.len());
            let mut c = b.clone();
            c.union_with(&a);
            assert_eq!(c, a);
            let json = serde_json::to_string(&a).unwrap();
            let back: BlockSet = serde_json::from_str(&json).unwrap();
            assert_eq!(back, a);
        }
    }
}
