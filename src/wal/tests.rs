//! Decoder edge cases on synthetic WAL laid out exactly as PostgreSQL lays it out.

use super::synth::{SynthBlock, SynthRecord, SynthWal};
use super::*;
use crate::index::build::{index_segment, StreamIndexer};
use crate::types::{Lsn, PgVersion};

const SEG: u32 = 1 << 20;
const PAGE: u32 = 8192;

fn rel(n: u32) -> RelFileLocator {
    RelFileLocator {
        spc: 1663,
        db: 5,
        rel: n,
    }
}

fn heap_rec(n: u32, data_len: usize) -> SynthRecord {
    SynthRecord {
        rmid: 10,
        info: 0x00,
        xid: 700 + n,
        blocks: vec![SynthBlock {
            rel: rel(16384),
            fork: 0,
            blkno: n,
            data: vec![n as u8; data_len],
            ..Default::default()
        }],
        main_data: vec![1, 2, 3],
    }
}

/// (lsn, end, rmid, info, blocks, main data) of every record.
type Summary = Vec<(Lsn, Lsn, u8, u8, Vec<BlockRef>, Vec<u8>)>;

fn decode_chunks(start: Lsn, bytes: &[u8], chunk: usize) -> (Summary, Option<EndOfWal>) {
    let mut d = WalStreamDecoder::new(start);
    let mut out = Vec::new();
    let mut keep = |r: &DecodedRecord| {
        out.push((
            r.lsn,
            r.end_lsn,
            r.rmid,
            r.info,
            r.blocks.to_vec(),
            r.main_data.to_vec(),
        ))
    };
    if chunk == 0 {
        d.decode_all(bytes, |r| {
            keep(r);
            Ok(true)
        })
        .unwrap();
    } else {
        for c in bytes.chunks(chunk) {
            d.feed_bytes(c);
            while let Some(r) = d.poll_decode().unwrap() {
                keep(&r);
            }
        }
    }
    (out, d.end_of_wal().cloned())
}

fn sample_stream(v: PgVersion) -> (SynthWal, Vec<Lsn>) {
    let mut w = SynthWal::new(v, SEG, PAGE, 3);
    let mut lsns = Vec::new();
    for i in 0..50 {
        lsns.push(w.push(&heap_rec(i, 1 + (i as usize * 37) % 300)));
    }
    // A record with two images and a same-relation block: crosses pages.
    lsns.push(w.push(&SynthRecord {
        rmid: 0,
        info: 0xB0,
        xid: 0,
        blocks: vec![
            SynthBlock {
                rel: rel(1),
                blkno: 9,
                image: true,
                ..Default::default()
            },
            SynthBlock {
                rel: rel(1),
                fork: 2,
                blkno: 10,
                image: true,
                will_init: true,
                ..Default::default()
            },
        ],
        main_data: Vec::new(),
    }));
    // A record larger than the segment's remaining space: crosses into the next segment.
    lsns.push(w.push(&SynthRecord {
        rmid: 21,
        info: 0x00,
        xid: 1,
        blocks: Vec::new(),
        main_data: vec![0x5A; 5 * SEG as usize / 2],
    }));
    for i in 0..20 {
        lsns.push(w.push(&heap_rec(100 + i, 40)));
    }
    w.zero_to_page_end();
    (w, lsns)
}

/// Indexes one segment with the streaming indexer, which (unlike `index_segment`, the
/// archive path) accepts a segment still being written: WAL ending in zeros mid-segment.
fn stream_index(segno: u64, data: &[u8]) -> crate::index::SegmentIndex {
    let mut ix = StreamIndexer::new(1);
    ix.feed_segment(segno, data).unwrap();
    ix.finish().unwrap().remove(0)
}

#[test]
fn every_chunking_gives_the_same_records() {
    for v in [PgVersion::V13, PgVersion::V15, PgVersion::V18] {
        let (w, lsns) = sample_stream(v);
        let (whole, end) = decode_chunks(w.start, w.bytes(), 0);
        assert_eq!(whole.iter().map(|r| r.0).collect::<Vec<_>>(), lsns);
        assert_eq!(end.unwrap().reason, EndReason::Zeroed);
        for chunk in [1, 7, 50, 8192, 1 << 20] {
            let (got, end) = decode_chunks(w.start, w.bytes(), chunk);
            assert_eq!(got, whole, "chunk {chunk}");
            assert!(end.unwrap().reason.is_clean());
        }
        let fpi = &whole[50];
        assert_eq!(fpi.4.len(), 2);
        assert!(fpi.4[0].has_image && fpi.4[0].apply_image && !fpi.4[0].image_compressed);
        assert_eq!(
            (fpi.4[1].rel, fpi.4[1].fork, fpi.4[1].blkno),
            (rel(1), 2, 10)
        );
        assert!(fpi.4[1].will_init);
        assert_eq!(whole[51].5.len(), 5 * SEG as usize / 2);
        assert_eq!(whole[7].4[0].data_len as usize, 1 + 7 * 37);
        assert_eq!(whole[7].5, vec![1, 2, 3]);
    }
}

#[test]
fn starting_mid_record_skips_the_continuation() {
    let (w, lsns) = sample_stream(PgVersion::V16);
    // Segment 4 begins inside the 1.5 MB record, segment 5 too (its tail).
    let seg5 = 5 * SEG as usize - w.start.0 as usize;
    let (got, _) = decode_chunks(Lsn(5 * SEG as u64), &w.bytes()[seg5..], 0);
    let want: Vec<Lsn> = lsns
        .iter()
        .copied()
        .filter(|l| l.0 >= 5 * SEG as u64)
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), want);
    let seg4 = 4 * SEG as usize - w.start.0 as usize;
    let (got4, _) = decode_chunks(Lsn(4 * SEG as u64), &w.bytes()[seg4..], 3);
    assert_eq!(got4.iter().map(|r| r.0).collect::<Vec<_>>(), want);
}

#[test]
fn index_segment_pending_and_complete() {
    let (mut w, lsns) = sample_stream(PgVersion::V15);
    w.zero_to_segment_end();
    let b = w.bytes().to_vec();
    let seg = |n: u64| b[(n as usize - 3) * SEG as usize..(n as usize - 2) * SEG as usize].to_vec();
    let mut none = |_: u64| Ok(None);
    let alone = index_segment(1, 3, &seg(3), &mut none).unwrap();
    assert!(alone.pending);
    assert_eq!(alone.records, 51);
    let mut next = |n: u64| Ok(Some(seg(n)));
    let full = index_segment(1, 3, &seg(3), &mut next).unwrap();
    assert!(!full.pending);
    assert_eq!(full.records, 52);
    assert_eq!(full.start_lsn, lsns[0]);
    let k = |r: u32, f: u8| crate::index::RelFork {
        spc: 1663,
        db: 5,
        rel: r,
        fork: f,
    };
    assert_eq!(full.forks[&k(16384, 0)].blocks.len(), 50);
    assert_eq!(full.forks[&k(1, 2)].blocks.to_vec(), vec![10]);
    // Segment 4 lies wholly inside the big record; segment 5 holds its end and 20 more.
    let s4 = index_segment(1, 4, &seg(4), &mut next).unwrap();
    assert_eq!((s4.records, s4.pending), (0, false));
    // Segment 5 is still being written (zeros after its last record, no switch): an
    // archived segment never looks like that, so index_segment refuses it rather than
    // returning an index that could miss changes. The streaming indexer reads it.
    let e = index_segment(1, 5, &seg(5), &mut none).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Corruption);
    assert!(e.to_string().contains("000000010000000000000005"), "{e}");
    let mut ix5 = StreamIndexer::new(1);
    ix5.feed_segment(5, &seg(5)).unwrap();
    let s5 = ix5.finish().unwrap().remove(0);
    assert_eq!((s5.records, s5.pending), (20, false));
    // The streaming indexer agrees.
    let mut ix = StreamIndexer::new(1);
    let mut all = Vec::new();
    for n in 3..=5 {
        ix.feed_segment(n, &seg(n)).unwrap();
        all.extend(ix.take_finished());
    }
    all.extend(ix.finish().unwrap());
    assert_eq!(all, vec![full, s4, s5]);
}

#[test]
fn overwritten_continuation_is_dropped() {
    let mut w = SynthWal::new(PgVersion::V15, SEG, PAGE, 1);
    let a = w.push(&heap_rec(1, 100));
    let aborted = w.push_aborted(&heap_rec(2, 20_000));
    // The page after the cut starts with XLOG_OVERWRITE_CONTRECORD.
    let mut ow = Vec::new();
    ow.extend_from_slice(&aborted.0.to_le_bytes());
    ow.extend_from_slice(&0i64.to_le_bytes());
    let o = w.push(&SynthRecord {
        rmid: 0,
        info: 0xD0,
        main_data: ow,
        ..Default::default()
    });
    let c = w.push(&heap_rec(3, 10));
    w.zero_to_page_end();
    for chunk in [0, 1, 100] {
        let (got, end) = decode_chunks(w.start, w.bytes(), chunk);
        assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), vec![a, o, c]);
        assert_eq!(end.unwrap().reason, EndReason::Zeroed);
    }
}

#[test]
fn bad_crc_and_stale_tails() {
    let mut w = SynthWal::new(PgVersion::V15, SEG, PAGE, 1);
    w.push(&heap_rec(1, 10));
    let b = w.push(&heap_rec(2, 10));
    w.push(&heap_rec(3, 10));
    // A flipped payload byte of a record that chains correctly: CRC mismatch, not clean.
    let mut bad = w.bytes().to_vec();
    let off = (b.0 - w.start.0) as usize + 30;
    bad[off] ^= 0x40;
    let (got, end) = decode_chunks(w.start, &bad, 0);
    assert_eq!(got.len(), 1);
    let end = end.unwrap();
    assert!(matches!(end.reason, EndReason::CrcMismatch { .. }));
    assert_eq!(end.lsn, b);
    assert!(!end.reason.is_clean());
    let mut seg = bad.clone();
    seg.resize(SEG as usize, 0);
    let mut none = |_: u64| Ok(None);
    let err = index_segment(1, 1, &seg, &mut none).unwrap_err();
    assert!(err.to_string().contains(&b.to_string()), "{err}");

    // A stale record (wrong xl_prev) after the last valid one: a clean end.
    let mut w2 = SynthWal::new(PgVersion::V15, SEG, PAGE, 1);
    w2.push(&heap_rec(1, 10));
    let last = w2.push(&heap_rec(2, 10));
    let stale = heap_rec(9, 10).encode(PgVersion::V15, Lsn(0x123_4560));
    let at = w2.push_encoded(&stale);
    let (got, end) = decode_chunks(w2.start, w2.bytes(), 0);
    assert_eq!(got.last().unwrap().0, last);
    let end = end.unwrap();
    assert_eq!(end.lsn, at);
    assert!(matches!(end.reason, EndReason::StaleRecord { .. }));
    let mut seg = w2.bytes().to_vec();
    seg.resize(SEG as usize, 0);
    assert!(index_segment(1, 1, &seg, &mut none).is_err());
    let ix = stream_index(1, &seg);
    assert_eq!(ix.records, 2);

    // A stale page (old pageaddr) where the next page should be: a clean end.
    let mut w3 = SynthWal::new(PgVersion::V15, SEG, PAGE, 1);
    w3.push(&heap_rec(1, 10));
    w3.push_aborted(&heap_rec(2, 20_000));
    let mut bytes = w3.bytes().to_vec();
    let mut page = vec![0u8; PAGE as usize];
    page[..2].copy_from_slice(&PgVersion::V15.page_magic().to_le_bytes());
    page[4] = 1;
    page[8..16].copy_from_slice(&(0x42u64 * PAGE as u64).to_le_bytes());
    bytes.extend_from_slice(&page);
    let (got, end) = decode_chunks(w3.start, &bytes, 0);
    assert_eq!(got.len(), 1);
    let end = end.unwrap();
    assert!(matches!(end.reason, EndReason::StalePage { .. }), "{end}");
    assert_eq!(end.lsn, Lsn(w3.start.0 + PAGE as u64));
}

#[test]
fn unknown_flagged_records_are_errors() {
    for (v, rmid, info) in [
        (PgVersion::V15, 10u8, 0x71u8), // heap, unknown effect, flagged
        (PgVersion::V16, 130, 0x01),    // custom rmgr, flagged
        (PgVersion::V14, 2, 0x30),      // smgr, unknown opcode
        (PgVersion::V15, 4, 0x30),      // dbase, unknown opcode
    ] {
        let mut w = SynthWal::new(v, SEG, PAGE, 1);
        w.push(&SynthRecord {
            rmid,
            info,
            main_data: vec![0; 32],
            ..Default::default()
        });
        let mut d = WalStreamDecoder::new(w.start);
        d.feed_bytes(w.bytes());
        let e = d.poll_decode().unwrap_err();
        assert!(e.to_string().contains("0/100"), "{e}");
    }
    // A custom rmgr without the flag is indexed by its block references (15+).
    let mut w = SynthWal::new(PgVersion::V15, SEG, PAGE, 1);
    let mut r = heap_rec(4, 5);
    r.rmid = 200;
    w.push(&r);
    let (got, _) = decode_chunks(w.start, w.bytes(), 0);
    assert_eq!(got[0].4[0].blkno, 4);
    // ...but 13 and 14 have no custom rmgrs: the WAL ends there, not cleanly.
    let mut w = SynthWal::new(PgVersion::V14, SEG, PAGE, 1);
    w.push(&r);
    let (got, end) = decode_chunks(w.start, w.bytes(), 0);
    assert!(got.is_empty());
    assert!(matches!(
        end.unwrap().reason,
        EndReason::InvalidRecord { .. }
    ));
}

fn event_of(v: PgVersion, rmid: u8, info: u8, main: Vec<u8>) -> Option<RelEvent> {
    let mut w = SynthWal::new(v, SEG, PAGE, 1);
    w.push(&SynthRecord {
        rmid,
        info,
        xid: 77,
        main_data: main,
        ..Default::default()
    });
    let mut d = WalStreamDecoder::new(w.start);
    d.feed_bytes(w.bytes());
    let r = d.poll_decode().unwrap().unwrap();
    r.event.cloned()
}

fn le(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn special_records_per_version() {
    // DROP DATABASE moved from 0x10 (13–14) to 0x20 (15+); 0x10 became CREATE_WAL_LOG.
    let drop = le(&[16400, 2, 1663, 16500]);
    assert_eq!(
        event_of(PgVersion::V14, 4, 0x10 | 1, drop.clone()),
        Some(RelEvent::DbDrop {
            db: 16400,
            spcs: vec![1663, 16500]
        })
    );
    assert_eq!(
        event_of(PgVersion::V15, 4, 0x20 | 1, drop),
        Some(RelEvent::DbDrop {
            db: 16400,
            spcs: vec![1663, 16500]
        })
    );
    assert_eq!(
        event_of(PgVersion::V15, 4, 0x10, le(&[16401, 1663])),
        Some(RelEvent::DbCreateWalLog {
            db: 16401,
            spc: 1663
        })
    );
    assert_eq!(
        event_of(PgVersion::V13, 4, 0x01, le(&[16402, 1663, 1, 1663])),
        Some(RelEvent::DbCreateFileCopy {
            db: 16402,
            spc: 1663,
            src_db: 1,
            src_spc: 1663
        })
    );
    assert_eq!(
        event_of(PgVersion::V15, 2, 0x21, le(&[863, 1663, 5, 16414, 7])),
        Some(RelEvent::SmgrTruncate {
            rel: RelFileLocator {
                spc: 1663,
                db: 5,
                rel: 16414
            },
            blkno: 863,
            flags: 7
        })
    );
    // Commit (13: unflagged) with xinfo: dbinfo, 1 subxact, 2 relations, two-phase.
    let mut commit = 1234567i64.to_le_bytes().to_vec();
    commit.extend(le(&[(1 << 0) | (1 << 1) | (1 << 2) | (1 << 4), 5, 1663]));
    commit.extend(le(&[1, 901, 2, 1663, 5, 16384, 1663, 5, 16390]));
    commit.extend(le(&[4242]));
    assert_eq!(
        event_of(PgVersion::V13, 1, 0x30 | 0x80, commit),
        Some(RelEvent::XactEnd {
            kind: XactKind::CommitPrepared,
            xact_time: 1234567,
            xid: 4242,
            rels: vec![
                RelFileLocator {
                    spc: 1663,
                    db: 5,
                    rel: 16384
                },
                RelFileLocator {
                    spc: 1663,
                    db: 5,
                    rel: 16390
                }
            ]
        })
    );
    // Abort with dropped stats (18: 16-byte items) before the two-phase xid.
    let mut abort = 99i64.to_le_bytes().to_vec();
    abort.extend(le(&[(1 << 2) | (1 << 8) | (1 << 4), 1, 1663, 5, 1]));
    abort.extend(le(&[1, 1, 5, 7, 0]));
    abort.extend(le(&[555]));
    match event_of(PgVersion::V18, 1, 0x40 | 0x80 | 1, abort) {
        Some(RelEvent::XactEnd {
            kind, xid, rels, ..
        }) => {
            assert_eq!(kind, XactKind::AbortPrepared);
            assert_eq!(xid, 555);
            assert_eq!(rels.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    // wal_level: checkpoints only in 17+, parameter change always.
    let mut ckpt = vec![0u8; 88];
    ckpt[20] = 1;
    assert_eq!(event_of(PgVersion::V16, 0, 0x10, ckpt.clone()), None);
    assert_eq!(
        event_of(PgVersion::V17, 0, 0x10, ckpt),
        Some(RelEvent::WalLevel {
            wal_level: 1,
            source: WalLevelSource::Checkpoint
        })
    );
    let mut pc = vec![0u8; 28];
    pc[20] = 0;
    assert_eq!(
        event_of(PgVersion::V13, 0, 0x60, pc),
        Some(RelEvent::WalLevel {
            wal_level: 0,
            source: WalLevelSource::ParameterChange
        })
    );
    assert_eq!(
        event_of(PgVersion::V17, 0, 0xE0, le(&[2])),
        Some(RelEvent::WalLevel {
            wal_level: 2,
            source: WalLevelSource::CheckpointRedo
        })
    );
    let mut rp = 5i64.to_le_bytes().to_vec();
    rp.extend_from_slice(b"before_upgrade\0\0\0");
    assert_eq!(
        event_of(PgVersion::V15, 0, 0x70, rp),
        Some(RelEvent::RestorePoint {
            time: 5,
            name: "before_upgrade".into()
        })
    );
}

/// A complete segment whose middle was zeroed (a damaged file) must not yield an index that
/// silently stops there: that would be a subset of the changes.
#[test]
fn zeroed_middle_of_an_archived_segment_is_refused() {
    let mut w = SynthWal::new(PgVersion::V15, SEG, PAGE, 1);
    while w.pos().0 < 2 * SEG as u64 + 100 {
        w.push(&heap_rec(1, 2000));
    }
    let mut seg1 = w.bytes()[..SEG as usize].to_vec();
    let mut none = |_: u64| Ok(None);
    assert!(index_segment(1, 1, &seg1, &mut none).is_ok());
    let mid = (SEG / 2) as usize;
    seg1[mid..mid + PAGE as usize].fill(0);
    let e = index_segment(1, 1, &seg1, &mut none).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Corruption);
    assert!(
        e.to_string().contains("before the end of the segment"),
        "{e}"
    );
}

#[test]
fn switch_skips_to_the_next_segment() {
    let mut w = SynthWal::new(PgVersion::V15, SEG, PAGE, 1);
    w.push(&heap_rec(1, 10));
    let sw = w.push(&SynthRecord {
        rmid: 0,
        info: 0x40,
        ..Default::default()
    });
    w.zero_to_segment_end();
    let next = w.push(&heap_rec(2, 10));
    let (got, _) = decode_chunks(w.start, w.bytes(), 0);
    assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>()[1..], [sw, next]);
    let seg1 = &w.bytes()[..SEG as usize];
    let mut none = |_: u64| Ok(None);
    let ix = index_segment(1, 1, seg1, &mut none).unwrap();
    assert!(ix.switched && !ix.pending);
    assert_eq!(ix.end_lsn, Lsn(2 * SEG as u64));
}

#[test]
fn foreign_or_misplaced_pages_are_errors() {
    let mut w = SynthWal::new(PgVersion::V15, SEG, PAGE, 1);
    w.push(&heap_rec(1, 10));
    w.zero_to_segment_end();
    // Fed as if it were segment 2: the page address says otherwise.
    let mut d = WalStreamDecoder::new(Lsn(2 * SEG as u64));
    d.feed_bytes(w.bytes());
    assert!(d.poll_decode().is_err());
    let mut none = |_: u64| Ok(None);
    assert!(index_segment(1, 2, w.bytes(), &mut none).is_err());
    // Unknown magic.
    let mut b = w.bytes().to_vec();
    b[0] = 0x99;
    let mut d = WalStreamDecoder::new(w.start);
    d.feed_bytes(&b);
    assert!(d.poll_decode().is_err());
    // A short file is not a segment.
    assert!(index_segment(1, 1, &w.bytes()[..4096], &mut none).is_err());
}

/// xorshift64: a deterministic PRNG for mutation tests.
pub(crate) struct XorShift(pub u64);
impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Random byte flips, truncations and chunkings of valid WAL never panic.
#[test]
fn mutated_wal_never_panics() {
    let (w, _) = sample_stream(PgVersion::V15);
    let base = &w.bytes()[..(3 * PAGE as usize)];
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..3000 {
        let mut b = base.to_vec();
        let flips = 1 + rng.next() % 8;
        for _ in 0..flips {
            let i = (rng.next() % b.len() as u64) as usize;
            b[i] ^= 1 << (rng.next() % 8);
        }
        let cut = (rng.next() % b.len() as u64) as usize;
        b.truncate(b.len() - cut / 4);
        let chunk = 1 + (rng.next() % 600) as usize;
        let mut d = WalStreamDecoder::new(w.start);
        for c in b.chunks(chunk) {
            d.feed_bytes(c);
            while let Ok(Some(_)) = d.poll_decode() {}
        }
        let mut none = |_: u64| Ok(None);
        let _ = index_segment(1, 3, &b, &mut none);
    }
}

/// Index rules on special records: truncation limits per fork, creates, drops of all
/// forks, database events, wal_level=minimal, commit time and xid.
#[test]
fn index_rules_for_special_records() {
    let mut w = SynthWal::new(PgVersion::V16, SEG, PAGE, 1);
    let ev = |rmid: u8, info: u8, xid: u32, main: Vec<u8>| SynthRecord {
        rmid,
        info,
        xid,
        main_data: main,
        ..Default::default()
    };
    // Truncate 1663/5/16414 to 70000 blocks, all forks.
    w.push(&ev(2, 0x21, 0, le(&[70000, 1663, 5, 16414, 7])));
    // Create the init fork of 1663/5/16500.
    w.push(&ev(2, 0x11, 0, le(&[1663, 5, 16500, 3])));
    w.push(&heap_rec(3, 10));
    // Commit dropping 1663/5/16384 at time 42.
    let mut commit = 42i64.to_le_bytes().to_vec();
    commit.extend(le(&[1 << 2, 1, 1663, 5, 16384]));
    w.push(&ev(1, 0x80 | 0x01, 901, commit));
    // CREATE DATABASE (file copy) then DROP DATABASE in two tablespaces.
    w.push(&ev(4, 0x01, 0, le(&[16600, 1663, 1, 1663])));
    w.push(&ev(4, 0x21, 0, le(&[16600, 2, 1663, 16700])));
    // wal_level=minimal announced by a parameter change.
    w.push(&ev(0, 0x60, 0, vec![0u8; 28]));
    w.zero_to_segment_end();
    let ix = stream_index(1, w.bytes());
    let k = |r: u32, f: u8| crate::index::RelFork {
        spc: 1663,
        db: 5,
        rel: r,
        fork: f,
    };
    assert_eq!(ix.records, 7);
    assert_eq!(ix.forks[&k(16414, 0)].limit_block, Some(70000));
    assert_eq!(ix.forks[&k(16414, 2)].limit_block, Some(70000 / 32672));
    assert_eq!(ix.forks[&k(16414, 1)].limit_block, Some(0));
    let init = &ix.forks[&k(16500, 3)];
    assert!(init.created && init.limit_block == Some(0));
    for f in 0..4 {
        let d = &ix.forks[&k(16384, f)];
        assert!(d.dropped && d.limit_block == Some(0), "fork {f}");
    }
    assert_eq!(ix.forks[&k(16384, 0)].blocks.to_vec(), vec![3]);
    assert_eq!(ix.last_commit_time, Some(42));
    assert_eq!(ix.last_xid, Some(901));
    assert_eq!(ix.db_events.len(), 3);
    assert!(matches!(
        ix.db_events[0].kind,
        crate::index::DbEventKind::CreatedFileCopy { src_db: 1, .. }
    ));
    assert_eq!(
        ix.db_events[1..].iter().map(|e| e.spc).collect::<Vec<_>>(),
        vec![1663, 16700]
    );
    assert!(ix.wal_level_minimal);
}

/// A segment read from its file in 1 MiB pieces, only as far as its WAL goes, indexes as
/// the whole segment does: WAL ending in the first piece, in a later one (a record
/// crossing a piece boundary), and filling the segment (continuing in the next one).
#[test]
fn segment_file_in_pieces_indexes_as_the_whole_segment() {
    use std::io::Write;
    const SEG4: u32 = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        (std::fs::File::open(&p).unwrap(), p)
    };
    // records of 3000 bytes and 60 KiB: some cross the 1 MiB piece boundaries
    for (case, n) in [("short", 5u32), ("crossing", 40), ("full", 150)] {
        let mut w = SynthWal::new(PgVersion::V15, SEG4, PAGE, 2);
        for i in 0..n {
            w.push(&heap_rec(i, if i % 2 == 0 { 3000 } else { 60 << 10 }));
        }
        w.zero_to_segment_end();
        let bytes = w.bytes().to_vec();
        let segs: Vec<&[u8]> = bytes.chunks(SEG4 as usize).collect();
        let mut whole = StreamIndexer::new(1);
        let mut pieces = StreamIndexer::new(1);
        for (k, seg) in segs.iter().enumerate() {
            let segno = 2 + k as u64;
            whole.feed_segment(segno, seg).unwrap();
            let (f, p) = write(&format!("{case}-{k}"), seg);
            pieces.feed_segment_file(segno, &f, &p).unwrap();
            assert_eq!(whole.end_of_wal(), pieces.end_of_wal(), "{case} {k}");
            // where the WAL ends within its segment: in the first piece, in a later one
            let at = whole.end_of_wal().map(|e| e.lsn.0 % SEG4 as u64);
            match case {
                "short" => assert!(at.is_some_and(|a| a < 1 << 20), "{at:?}"),
                "crossing" => assert!(at.is_some_and(|a| a > 1 << 20), "{at:?}"),
                _ => {}
            }
            assert_eq!(whole.take_finished(), pieces.take_finished(), "{case} {k}");
        }
        let (a, b) = (whole.finish().unwrap(), pieces.finish().unwrap());
        assert!(!a.is_empty(), "{case}");
        assert_eq!(a, b, "{case}");
        assert_eq!(
            segs.len() > 1,
            case == "full",
            "{case}: {} segments",
            segs.len()
        );
    }
    // a file shorter than its segment is an error, never a short index
    let mut w = SynthWal::new(PgVersion::V15, SEG4, PAGE, 2);
    w.push(&heap_rec(1, 100));
    w.zero_to_segment_end();
    let (f, p) = write("short-file", &w.bytes()[..SEG4 as usize - 8192]);
    let err = StreamIndexer::new(1)
        .feed_segment_file(2, &f, &p)
        .unwrap_err();
    assert!(err.to_string().contains("segment size"), "{err}");
}
