//! Merging a day's worth of segment indexes, and the size of the index files.
//!
//! `cargo bench --bench merge` (a plain `main`, `harness = false`). Prints, for each
//! workload: encoded bytes per segment (and as a share of a 16 MiB segment), encode and
//! decode time per segment, and the time to merge 1,000 segment indexes.
//!
//! Workloads (per 16 MiB segment, modelled on WAL-FORMAT §7.2):
//! - `pgbench`: random updates of a 10 GiB table (6,000 blocks) and its index (3,000),
//!   an append-only history table (200 consecutive blocks, moving on each segment), small
//!   hot tables, VM pages, and ~45 catalog forks with a few blocks each: ~10k blocks over
//!   ~50 forks.
//! - `sparse-1TiB`: 15,000 random blocks of a 1 TiB table plus the same small forks; the
//!   union never saturates, so the merged map reaches ~15 million runs (worst case).

use std::time::Instant;

use walnut::format::index::{decode, encode};
use walnut::index::merge::merge;
use walnut::index::{RelFork, SegmentIndex, MAIN_FORKNUM, VM_FORKNUM};

const SEGMENTS: u64 = 1000;
const SEG_SIZE: u32 = 16 << 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u32 {
        (self.next() % n) as u32
    }
}

fn rel(rel: u32, fork: u8) -> RelFork {
    RelFork {
        spc: 1663,
        db: 16384,
        rel,
        fork,
    }
}

fn segment(rng: &mut Rng, segno: u64, big_table_blocks: u64, big_table_hits: u32) -> SegmentIndex {
    let mut ix = SegmentIndex::empty(16, SEG_SIZE, 8192, 7_300_000_000_000_000_001, 1, segno);
    ix.records = 20_000;
    let big = ix.fork_mut(rel(16397, MAIN_FORKNUM));
    let mut vm = Vec::new();
    for _ in 0..big_table_hits {
        let b = rng.below(big_table_blocks);
        big.blocks.insert(b);
        if rng.next().is_multiple_of(8) {
            vm.push(b / 32672);
        }
    }
    let vmf = ix.fork_mut(rel(16397, VM_FORKNUM));
    for b in vm {
        vmf.blocks.insert(b);
    }
    let idx = ix.fork_mut(rel(16405, MAIN_FORKNUM));
    for _ in 0..3000 {
        idx.blocks.insert(rng.below(274_000));
    }
    let hist = ix.fork_mut(rel(16400, MAIN_FORKNUM));
    let base = segno as u32 * 200;
    hist.blocks.insert_range(base..=base + 199);
    for (r, n) in [(16391u32, 100u32), (16394, 10), (16403, 30), (16407, 3)] {
        let f = ix.fork_mut(rel(r, MAIN_FORKNUM));
        for _ in 0..n {
            f.blocks.insert(rng.below(n as u64));
        }
    }
    for c in 0..45u32 {
        let f = ix.fork_mut(rel(1247 + c * 3, MAIN_FORKNUM));
        for _ in 0..(1 + rng.below(20)) {
            f.blocks.insert(rng.below(200));
        }
    }
    if segno.is_multiple_of(97) {
        ix.fork_mut(rel(16397, MAIN_FORKNUM))
            .apply_limit(big_table_blocks as u32 - 1000);
    }
    for f in ix.forks.values_mut() {
        f.blocks.normalize();
    }
    ix
}

fn run(name: &str, big_table_blocks: u64, big_table_hits: u32, naive: bool) {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let segs: Vec<SegmentIndex> = (1..=SEGMENTS)
        .map(|s| segment(&mut rng, s, big_table_blocks, big_table_hits))
        .collect();
    let blocks: usize = segs
        .iter()
        .flat_map(|s| s.forks.values())
        .map(|f| f.blocks.len())
        .sum();
    let forks: usize = segs.iter().map(|s| s.forks.len()).sum();

    let t = Instant::now();
    let files: Vec<Vec<u8>> = segs.iter().map(encode).collect();
    let enc = t.elapsed();
    let bytes: usize = files.iter().map(|f| f.len()).sum();
    let t = Instant::now();
    let decoded: Vec<SegmentIndex> = files
        .iter()
        .map(|f| decode(f, "bench").expect("decodes"))
        .collect();
    let dec = t.elapsed();
    assert_eq!(decoded.len(), segs.len());

    let t = Instant::now();
    let map = merge(decoded.iter());
    let mt = t.elapsed();
    let merged_blocks: usize = map.forks.values().map(|f| f.blocks.len()).sum();
    let merged_runs: usize = map.forks.values().map(|f| f.blocks.run_count()).sum();

    let per_seg = bytes as f64 / SEGMENTS as f64;
    println!("== {name}");
    println!(
        "   {SEGMENTS} segment indexes: {:.0} blocks and {:.0} forks per segment on average",
        blocks as f64 / SEGMENTS as f64,
        forks as f64 / SEGMENTS as f64
    );
    println!(
        "   index file: {per_seg:.0} bytes per segment ({:.3}% of 16 MiB WAL, {:.2} bytes/block)",
        per_seg * 100.0 / SEG_SIZE as f64,
        bytes as f64 / blocks as f64
    );
    println!(
        "   encode {:.1} µs, decode {:.1} µs per segment index",
        enc.as_secs_f64() * 1e6 / SEGMENTS as f64,
        dec.as_secs_f64() * 1e6 / SEGMENTS as f64
    );
    println!(
        "   merge of {SEGMENTS}: {:.1} ms -> {} forks, {merged_blocks} blocks in {merged_runs} runs",
        mt.as_secs_f64() * 1e3,
        map.forks.len()
    );
    if naive {
        // For comparison: folding each index into one set with union_with.
        let t = Instant::now();
        let mut acc = walnut::index::BlockSet::new();
        for s in &decoded {
            if let Some(f) = s.forks.get(&rel(16397, MAIN_FORKNUM)) {
                acc.union_with(&f.blocks);
            }
        }
        println!(
            "   (naive left fold of the big table only: {:.1} ms, {} blocks)",
            t.elapsed().as_secs_f64() * 1e3,
            acc.len()
        );
    }
}

fn main() {
    // pgbench scale 1000-ish: 10 GiB table = 1.31 M blocks.
    run(
        "pgbench (10 GiB table, ~10k blocks/segment)",
        1_310_720,
        6000,
        true,
    );
    // 1 TiB table = 134 M blocks.
    run(
        "sparse-1TiB (~18k blocks/segment)",
        134_217_728,
        15_000,
        false,
    );
}
