//! PostgreSQL 17+ WAL summary files (`pg_wal/summaries/*.summary`): which blocks of which
//! relation forks the WAL of one LSN range touched, written by the server's WAL summarizer
//! (`src/backend/postmaster/walsummarizer.c`) in the block-reference-table format of
//! `src/common/blkreftable.c`. Walnut reads them for `backup -b summary`
//! ([`crate::backup::summary`]); it never writes them (the encoder exists for tests).
//!
//! ```text
//! File name: TTTTTTTT SSSSSSSS SSSSSSSS EEEEEEEE EEEEEEEE .summary   (upper-case hex)
//!            timeline, start LSN (hi, lo), end LSN (hi, lo): the WAL [start, end)
//!
//! Format (integers in the server's byte order: little-endian on every platform walnut
//! supports): {
//!   magic   u32 = 0x652B137B
//!   entry*  { spc_oid u32, db_oid u32, rel_number u32, fork i32 (0 main, 1 fsm, 2 vm,
//!             3 init), limit_block u32 (0xFFFFFFFF: none), nchunks u32 }   24 bytes
//!           usage   u16 × nchunks     uint16s stored for chunk i (0..=4096)
//!           chunks  for each chunk with usage > 0:
//!                     usage < 4096: usage × u16, block offsets within the chunk, unsorted
//!                     usage = 4096: 8192-byte bitmap, bit j of u16 word i = block i·16+j
//!           (chunk i covers blocks i·65536 .. i·65536+65535)
//!   end     24 zero bytes (an all-zero entry)
//!   crc32c  u32: CRC-32C of every byte before it
//! }
//! ```
//! The server sorts entries by (spc, db, rel, fork); walnut does not rely on it. An entry with `rel_number` 0 is a database
//! sentinel (`CREATE DATABASE ... STRATEGY FILE_COPY`, `DROP DATABASE`): its files changed
//! with no block references. The limit block is the smallest length the fork had in the
//! range (0: created or dropped; else the truncation target); blocks at or above it listed
//! in the entry were written after the relation was re-extended.
//!
//! The file carries no version number: the magic is the format's only identifier, and an
//! unknown magic is refused as not a summary file.

#![deny(clippy::indexing_slicing)]

use crate::error::{Error, Result};
use crate::index::BlockSet;
use crate::types::{Lsn, TimeLineId};

/// `BLOCKREFTABLE_MAGIC`.
pub const MAGIC: u32 = 0x652B_137B;
/// `BLOCKS_PER_CHUNK`.
pub const BLOCKS_PER_CHUNK: u32 = 1 << 16;
/// `MAX_ENTRIES_PER_CHUNK`: a chunk with this usage is a bitmap.
pub const MAX_ENTRIES_PER_CHUNK: u16 = 4096;
const ENTRY_LEN: usize = 24;
/// `InvalidBlockNumber`: the entry has no limit block.
const NO_LIMIT: u32 = u32::MAX;
/// Highest valid fork number (`INIT_FORKNUM`).
const MAX_FORK: i32 = 3;

/// What a summary file's name says: the WAL `[start, end)` of timeline `tli`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SummaryName {
    pub tli: TimeLineId,
    pub start: Lsn,
    pub end: Lsn,
}

impl SummaryName {
    /// Parses `TTTTTTTTSSSSSSSSSSSSSSSSEEEEEEEEEEEEEEEE.summary` (40 upper-case hex digits,
    /// as the server writes them); anything else (`temp.summary`, stray files) is None.
    pub fn parse(name: &str) -> Option<SummaryName> {
        let hex = name.strip_suffix(".summary")?;
        if hex.len() != 40
            || !hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))
        {
            return None;
        }
        let part = |a: usize, b: usize| hex.get(a..b).and_then(|s| u64::from_str_radix(s, 16).ok());
        let tli = part(0, 8)? as TimeLineId;
        let start = (part(8, 16)? << 32) | part(16, 24)?;
        let end = (part(24, 32)? << 32) | part(32, 40)?;
        if tli == 0 || end < start {
            return None;
        }
        Some(SummaryName {
            tli,
            start: Lsn(start),
            end: Lsn(end),
        })
    }

    pub fn file_name(&self) -> String {
        format!(
            "{:08X}{:08X}{:08X}{:08X}{:08X}.summary",
            self.tli,
            self.start.0 >> 32,
            self.start.0 as u32,
            self.end.0 >> 32,
            self.end.0 as u32
        )
    }
}

/// One relation fork of a summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SummaryEntry {
    pub spc: u32,
    pub db: u32,
    /// 0: the whole database `(spc, db)` (see the module docs).
    pub rel: u32,
    pub fork: u8,
    /// The smallest length of the fork in the range, when it was created, dropped or
    /// truncated in it.
    pub limit_block: Option<u32>,
    /// The blocks WAL records referenced.
    pub blocks: BlockSet,
}

/// A checked little-endian cursor over the file's bytes.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .pos
            .checked_add(n)
            .and_then(|end| self.b.get(self.pos..end))
            .ok_or_else(|| {
                Error::corruption(format!(
                    "WAL summary file \"{}\" is truncated: {n} bytes needed at offset {}, the \
                     file's contents end at {}",
                    self.what,
                    self.pos,
                    self.b.len()
                ))
            })?;
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(s);
        Ok(u32::from_le_bytes(a))
    }

    fn u16s(&mut self, n: usize) -> Result<impl Iterator<Item = u16> + 'a> {
        let s = self.take(n * 2)?;
        Ok(s.chunks_exact(2).map(|c| {
            let mut a = [0u8; 2];
            a.copy_from_slice(c);
            u16::from_le_bytes(a)
        }))
    }
}

/// Decodes a whole summary file; `what` names it in errors. The CRC is checked first: a
/// damaged or truncated file is a Corruption error naming it, never a shorter list.
pub fn decode(bytes: &[u8], what: &str) -> Result<Vec<SummaryEntry>> {
    let bad = |m: String| Error::corruption(format!("WAL summary file \"{what}\": {m}"));
    if bytes.len() < 4 + ENTRY_LEN + 4 {
        return Err(bad(format!(
            "truncated: {} bytes, a summary has at least {}",
            bytes.len(),
            4 + ENTRY_LEN + 4
        )));
    }
    let body_len = bytes.len() - 4;
    let (body, crc) = (bytes.get(..body_len), bytes.get(body_len..));
    let (Some(body), Some(crc)) = (body, crc) else {
        return Err(bad("truncated".into()));
    };
    let mut stored = [0u8; 4];
    stored.copy_from_slice(crc);
    let stored = u32::from_le_bytes(stored);
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(bad(format!(
            "checksum mismatch (stored {stored:08X}, computed {computed:08X}): the file is \
             damaged or truncated"
        )));
    }
    let mut c = Cursor {
        b: body,
        pos: 0,
        what,
    };
    let magic = c.u32()?;
    if magic != MAGIC {
        return Err(bad(format!(
            "wrong magic number 0x{magic:08X} (a WAL summary has 0x{MAGIC:08X})"
        )));
    }
    let mut out: Vec<SummaryEntry> = Vec::new();
    loop {
        let at = c.pos;
        let spc = c.u32()?;
        let db = c.u32()?;
        let rel = c.u32()?;
        let fork = c.u32()? as i32;
        let limit = c.u32()?;
        let nchunks = c.u32()?;
        if (spc, db, rel, fork, limit, nchunks) == (0, 0, 0, 0, 0, 0) {
            break;
        }
        if !(0..=MAX_FORK).contains(&fork) {
            return Err(bad(format!("entry at offset {at} has fork number {fork}")));
        }
        // chunk i starts at block i·65536: at most 65536 chunks fit block numbers
        if nchunks > BLOCKS_PER_CHUNK {
            return Err(bad(format!("entry at offset {at} has {nchunks} chunks")));
        }
        let usage: Vec<u16> = c.u16s(nchunks as usize)?.collect();
        let mut blocks = BlockSet::new();
        for (i, &u) in usage.iter().enumerate() {
            let base = i as u32 * BLOCKS_PER_CHUNK;
            if u == 0 {
                continue;
            }
            if u > MAX_ENTRIES_PER_CHUNK {
                return Err(bad(format!(
                    "entry at offset {at}: chunk {i} has usage {u} (at most {MAX_ENTRIES_PER_CHUNK})"
                )));
            }
            let words = c.u16s(u as usize)?;
            if u == MAX_ENTRIES_PER_CHUNK {
                add_bitmap(&mut blocks, base, words);
            } else {
                for off in words {
                    blocks.insert(base + off as u32);
                }
            }
        }
        blocks.normalize();
        let e = SummaryEntry {
            spc,
            db,
            rel,
            fork: fork as u8,
            limit_block: (limit != NO_LIMIT).then_some(limit),
            blocks,
        };
        out.push(e);
    }
    if c.pos != body.len() {
        return Err(bad(format!(
            "{} bytes after the end marker at offset {}",
            body.len() - c.pos,
            c.pos - ENTRY_LEN
        )));
    }
    Ok(out)
}

/// Adds the set bits of a chunk bitmap (runs of set bits become ranges).
fn add_bitmap(blocks: &mut BlockSet, base: u32, words: impl Iterator<Item = u16>) {
    let mut run: Option<u32> = None;
    let mut bit = 0u32;
    for w in words {
        for j in 0..16 {
            let set = w & (1 << j) != 0;
            match (set, run) {
                (true, None) => run = Some(bit),
                (false, Some(first)) => {
                    blocks.insert_range(base + first..=base + bit - 1);
                    run = None;
                }
                _ => {}
            }
            bit += 1;
        }
    }
    if let Some(first) = run {
        blocks.insert_range(base + first..=base + bit - 1);
    }
}

/// Encodes entries as the server would (arrays below 4096 blocks per chunk, bitmaps from
/// there on; trailing empty chunks trimmed). For tests and fixtures: walnut never writes
/// summaries into a data directory. Entries are written in the order given.
pub fn encode(entries: &[SummaryEntry]) -> Vec<u8> {
    let mut out = MAGIC.to_le_bytes().to_vec();
    for e in entries {
        let mut chunks: Vec<Vec<u16>> = Vec::new();
        for b in e.blocks.iter() {
            let i = (b / BLOCKS_PER_CHUNK) as usize;
            if chunks.len() <= i {
                chunks.resize(i + 1, Vec::new());
            }
            if let Some(c) = chunks.get_mut(i) {
                c.push((b % BLOCKS_PER_CHUNK) as u16);
            }
        }
        for v in [e.spc, e.db, e.rel, e.fork as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&e.limit_block.unwrap_or(NO_LIMIT).to_le_bytes());
        out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
        let payload = |c: &Vec<u16>| -> Vec<u16> {
            if c.len() < MAX_ENTRIES_PER_CHUNK as usize {
                return c.clone();
            }
            let mut bm = vec![0u16; MAX_ENTRIES_PER_CHUNK as usize];
            for &off in c {
                if let Some(w) = bm.get_mut(off as usize / 16) {
                    *w |= 1 << (off % 16);
                }
            }
            bm
        };
        let payloads: Vec<Vec<u16>> = chunks.iter().map(payload).collect();
        for p in &payloads {
            out.extend_from_slice(&(p.len() as u16).to_le_bytes());
        }
        for p in &payloads {
            for w in p {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
    }
    out.extend_from_slice(&[0u8; ENTRY_LEN]);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn entry(spc: u32, db: u32, rel: u32, fork: u8, limit: Option<u32>, b: &[u32]) -> SummaryEntry {
        SummaryEntry {
            spc,
            db,
            rel,
            fork,
            limit_block: limit,
            blocks: BlockSet::from_blocks(b.iter().copied()),
        }
    }

    #[test]
    fn names_round_trip_and_strays_are_not_summaries() {
        let n = SummaryName {
            tli: 2,
            start: Lsn(0x1_0000_0028),
            end: Lsn(0x1_0300_0060),
        };
        let s = n.file_name();
        assert_eq!(s, "0000000200000001000000280000000103000060.summary");
        assert_eq!(SummaryName::parse(&s), Some(n));
        for bad in [
            "temp.summary",
            "0000000200000001000000280000000103000060",
            "000000020000000100000028000000010300006g.summary",
            "000000020000000100000028000000010300006a.summary",
            // end before start
            "000000020000000200000028000000010300006A.summary",
            "000000000000000100000028000000010300006A.summary",
        ] {
            assert_eq!(SummaryName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn round_trip_with_arrays_bitmaps_limits_and_sentinels() {
        let mut many: Vec<u32> = (0..5000).map(|i| 65536 + i * 3).collect();
        many.push(200_000);
        many.extend([7, 3, 65535]);
        let entries = vec![
            entry(1663, 0, 0, 0, Some(0), &[]),
            entry(1663, 5, 16384, 0, None, &many),
            entry(1663, 5, 16384, 2, Some(2), &[0, 1]),
            entry(1663, 5, 16390, 3, Some(0), &[]),
            entry(16400, 5, 16401, 0, Some(10), &[2, 11, 12]),
        ];
        let bytes = encode(&entries);
        let got = decode(&bytes, "x.summary").unwrap();
        assert_eq!(got, entries);
        // chunk 1 (5000 entries) is stored as a bitmap: 8192 bytes, not 10000
        assert!(
            bytes.len() < 4 + 5 * 24 + 8192 + 4 * 2 + 20 * 2 + 200,
            "{}",
            bytes.len()
        );
    }

    /// An empty summary, as the server writes for a quiet range: magic, end marker, CRC.
    #[test]
    fn golden_bytes() {
        let empty = encode(&[]);
        let mut want = vec![0x7B, 0x13, 0x2B, 0x65];
        want.extend([0u8; 24]);
        let crc = crc32c::crc32c(&want);
        want.extend(crc.to_le_bytes());
        assert_eq!(empty, want);
        assert_eq!(decode(&want, "e").unwrap(), vec![]);
        // one entry: rel 16384 main, limit none, blocks 1 and 3 (one array chunk)
        let one = encode(&[entry(1663, 5, 16384, 0, None, &[3, 1])]);
        let hex: String = one[..4 + 24 + 2 + 4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "7b132b65\
             7f060000050000000040000000000000ffffffff01000000\
             0200\
             01000300"
        );
    }

    #[test]
    fn damage_truncation_and_bad_magic_are_corruption_naming_the_file() {
        let bytes = encode(&[entry(1663, 5, 16384, 0, None, &[1, 2, 3])]);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            let e = decode(&b, "pg_wal/summaries/X.summary").unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Corruption, "{e}");
            assert!(e.to_string().contains("pg_wal/summaries/X.summary"), "{e}");
        }
        for n in 0..bytes.len() {
            let e = decode(&bytes[..n], "t.summary").unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Corruption, "{e}");
            assert!(e.to_string().contains("t.summary"), "{e}");
        }
        // a valid CRC over a wrong magic: refused as not a summary
        let mut b = bytes.clone();
        b[0] = 0;
        let n = b.len() - 4;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        let e = decode(&b, "m.summary").unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }

    /// Structural damage that still carries a valid CRC (a writer bug, not bit rot).
    #[test]
    fn structure_is_checked_behind_a_valid_crc() {
        let recrc = |mut b: Vec<u8>| {
            let n = b.len() - 4;
            let crc = crc32c::crc32c(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let good = encode(&[entry(1663, 5, 16384, 0, None, &[1])]);
        // fork 7
        let mut b = good.clone();
        b[4 + 12] = 7;
        assert!(decode(&recrc(b), "f")
            .unwrap_err()
            .to_string()
            .contains("fork"));
        // usage 5000
        let mut b = good.clone();
        b[28..30].copy_from_slice(&5000u16.to_le_bytes());
        assert!(decode(&recrc(b), "u").is_err());
        // bytes after the end marker
        let mut b = good.clone();
        b.splice(b.len() - 4..b.len() - 4, [1u8, 2]);
        assert!(decode(&recrc(b), "t")
            .unwrap_err()
            .to_string()
            .contains("after the end marker"));
    }

    /// Real files from PostgreSQL 18.6 decode to exactly what its `pg_walsummary -i` lists
    /// (one line per block, plus a `limit` line per fork with a limit block).
    #[test]
    fn real_pg18_summaries_decode_as_pg_walsummary_lists_them() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/summaries");
        let mut seen = (0, 0, 0);
        for name in [
            "0000000100000000010CAA5000000000016E0198",
            "0000000100000000017933F80000000001832810",
            "0000000100000000018328100000000001832910",
        ] {
            let bytes = std::fs::read(dir.join(format!("{name}.summary"))).unwrap();
            let text = std::fs::read_to_string(dir.join(format!("{name}.walsummary.txt"))).unwrap();
            assert!(SummaryName::parse(&format!("{name}.summary")).is_some());
            let mut want: Vec<SummaryEntry> = Vec::new();
            for line in text.lines() {
                // "TS 1663, DB 5, REL 16384, FORK main: block 3" or "...: limit 400"
                let (rel, what) = line.split_once(": ").unwrap();
                let f: Vec<&str> = rel.split([' ', ',']).filter(|s| !s.is_empty()).collect();
                let fork = match f[7] {
                    "main" => 0,
                    "fsm" => 1,
                    "vm" => 2,
                    "init" => 3,
                    other => panic!("fork {other}"),
                };
                let (spc, db, rel) = (
                    f[1].parse().unwrap(),
                    f[3].parse().unwrap(),
                    f[5].parse().unwrap(),
                );
                if want
                    .last()
                    .is_none_or(|e| (e.spc, e.db, e.rel, e.fork) != (spc, db, rel, fork))
                {
                    want.push(SummaryEntry {
                        spc,
                        db,
                        rel,
                        fork,
                        ..Default::default()
                    });
                }
                let e = want.last_mut().unwrap();
                let (kind, n) = what.split_once(' ').unwrap();
                let n: u32 = n.parse().unwrap();
                match kind {
                    "block" => e.blocks.insert(n),
                    "limit" => e.limit_block = Some(n),
                    other => panic!("{other}"),
                }
            }
            for e in &mut want {
                e.blocks.normalize();
            }
            let got = decode(&bytes, name).unwrap();
            // entries with neither blocks nor a limit print nothing
            let got: Vec<SummaryEntry> = got
                .into_iter()
                .filter(|e| !e.blocks.is_empty() || e.limit_block.is_some())
                .collect();
            assert_eq!(got.len(), want.len(), "{name}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g, w, "{name}");
                seen.0 += g.blocks.len();
                seen.1 += g.limit_block.is_some() as usize;
                seen.2 += (g.rel == 0) as usize;
            }
        }
        // the fixtures hold blocks, limit blocks (a truncation) and a database sentinel
        assert!(seen.0 > 900 && seen.1 >= 2 && seen.2 == 1, "{seen:?}");
    }
}
