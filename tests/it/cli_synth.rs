//! The test-only WAL synthesiser (`walnut::wal::synth`, behind the `test-synth` feature)
//! reaches the integration tests through the crate's dev-dependency on itself, and
//! `walnut wal-index` indexes what it writes.
use std::path::PathBuf;

use walnut::types::PgVersion;
use walnut::wal::record::RelFileLocator;
use walnut::wal::synth::{SynthBlock, SynthRecord, SynthWal};

use super::harness::*;

const SEG: u32 = 16 << 20;

#[test]
fn wal_index_reads_a_synthesised_segment() {
    let rel = RelFileLocator {
        spc: 1663,
        db: 5,
        rel: 16384,
    };
    let mut w = SynthWal::new(PgVersion::V15, SEG, 8192, 1);
    for n in [3u32, 4, 9] {
        w.push(&SynthRecord {
            rmid: 10,
            info: 0x00,
            xid: 700 + n,
            blocks: vec![SynthBlock {
                rel,
                fork: 0,
                blkno: n,
                data: vec![n as u8; 40],
                ..Default::default()
            }],
            main_data: vec![1, 2, 3],
        });
    }
    w.zero_to_segment_end();
    let dir = pg_tempdir("synth");
    let file: PathBuf = dir.path().join("000000010000000000000001");
    std::fs::write(&file, w.bytes()).unwrap();

    let out = walnut(&["wal-index", "--format", "json", file.to_str().unwrap()]);
    let text = ok(out, "wal-index");
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["segment"], "000000010000000000000001");
    assert_eq!(v["records"], 3);
    assert_eq!(
        v["blocks"],
        serde_json::json!([
            [1663, 5, 16384, 0, 3],
            [1663, 5, 16384, 0, 4],
            [1663, 5, 16384, 0, 9]
        ])
    );
}
