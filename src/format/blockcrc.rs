//! A backup's block checksums: the CRC-32C of every block of the files it stores
//! uncompressed, so that a checksum-mode incremental restore can tell which blocks of an
//! existing data directory differ without reading the backup's blocks that are equal.
//!
//! ```text
//! Format (integers little-endian): {
//!   header  { magic: [u8; 8] = "WNBCRC\r\n", version: u16 = 1, flags: u16 = 0,
//!             block_size: u32 }                                               16 bytes
//!   records { path_len: u16, path: [u8; path_len] (a manifest path, UTF-8),
//!             kind: u8 (0: whole file, 1: incremental file), count: u32,
//!             whole: crc32c: u32 of each block (the last one may be short) * count
//!             incremental: { blkno: u32, crc32c: u32 of the page } * count, in record order }*
//!   trailer { nfiles: u32, crc32c: u32 of every byte before it }               8 bytes
//! }
//! ```
//! One object per backup (`block_crcs`), written before `backup.json`, which records its
//! size and trailer CRC ([`BlockCrcsRef`]): a completed backup that says it has one always
//! has it, and a missing or damaged one is an error, never "absent".
//!
//! The object is untrusted input: [`parse`] checks its own CRC first and bounds every length
//! and count; [`check_whole`] and [`check_incremental`] tie a file's list to the manifest's
//! CRC of the stored file (CRC-32C is linear: the CRCs of a file's blocks combine into the
//! file's CRC; an incremental file's CRC also covers its header, record headers and trailer,
//! all known from the manifest). So a forged or damaged list is caught unless the manifest
//! is forged with it.

#![deny(clippy::indexing_slicing)]

use std::collections::HashMap;
use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::incfile;

pub const MAGIC: &[u8; 8] = b"WNBCRC\r\n";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
pub const TRAILER_LEN: usize = 8;
/// The object's name in a backup directory.
pub const FILE_NAME: &str = "block_crcs";
/// The longest path a record may hold.
pub const MAX_PATH: usize = 4096;

const KIND_WHOLE: u8 = 0;
const KIND_INC: u8 = 1;

/// What `backup.json` records of the object: its size and its trailer CRC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCrcsRef {
    pub size: u64,
    pub crc32c: u32,
}

/// The block CRCs of one stored file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileCrcs {
    /// A whole file: the CRC of each block, the last one of the file's tail when short.
    Whole(Vec<u32>),
    /// An incremental file: (block, CRC of the page) of each record, in record order.
    Inc(Vec<(u32, u32)>),
}

/// Streams the object into `W`.
pub struct Writer<W: Write> {
    out: W,
    crc: u32,
    bytes: u64,
    nfiles: u32,
    buf: Vec<u8>,
}

impl<W: Write> Writer<W> {
    pub fn new(mut out: W, block_size: u32) -> std::io::Result<Writer<W>> {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&block_size.to_le_bytes());
        out.write_all(&h)?;
        Ok(Writer {
            out,
            crc: crc32c::crc32c(&h),
            bytes: HEADER_LEN as u64,
            nfiles: 0,
            buf: Vec::new(),
        })
    }

    fn record(&mut self, path: &str, kind: u8, count: usize, body: &[u8]) -> std::io::Result<()> {
        if path.len() > MAX_PATH || count > u32::MAX as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("block checksums of \"{path}\": path or count too long"),
            ));
        }
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        b.extend_from_slice(&(path.len() as u16).to_le_bytes());
        b.extend_from_slice(path.as_bytes());
        b.push(kind);
        b.extend_from_slice(&(count as u32).to_le_bytes());
        b.extend_from_slice(body);
        self.out.write_all(&b)?;
        self.crc = crc32c::crc32c_append(self.crc, &b);
        self.bytes += b.len() as u64;
        self.nfiles += 1;
        self.buf = b;
        Ok(())
    }

    /// The CRCs of every block of the whole file `path`.
    pub fn add_whole(&mut self, path: &str, crcs: &[u32]) -> std::io::Result<()> {
        let body: Vec<u8> = crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
        self.record(path, KIND_WHOLE, crcs.len(), &body)
    }

    /// The (block, CRC) of every record of the incremental file `path`.
    pub fn add_inc(&mut self, path: &str, recs: &[(u32, u32)]) -> std::io::Result<()> {
        let body: Vec<u8> = recs
            .iter()
            .flat_map(|(b, c)| b.to_le_bytes().into_iter().chain(c.to_le_bytes()))
            .collect();
        self.record(path, KIND_INC, recs.len(), &body)
    }

    /// Writes the trailer; returns the writer and what `backup.json` records.
    pub fn finish(mut self) -> std::io::Result<(W, BlockCrcsRef)> {
        let n = self.nfiles.to_le_bytes();
        self.out.write_all(&n)?;
        let crc = crc32c::crc32c_append(self.crc, &n);
        self.out.write_all(&crc.to_le_bytes())?;
        Ok((
            self.out,
            BlockCrcsRef {
                size: self.bytes + TRAILER_LEN as u64,
                crc32c: crc,
            },
        ))
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(*b.get(at..at + 2)?.first_chunk()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(*b.get(at..at + 4)?.first_chunk()?))
}

/// Parses the object (`what` names it in errors) of a backup with `block_size`, which
/// `backup.json` describes as `r`. Every length is bounded by the object's size; the
/// caller checks the paths and counts against the manifest.
pub fn parse(
    b: &[u8],
    what: &str,
    block_size: u32,
    r: &BlockCrcsRef,
) -> Result<HashMap<String, FileCrcs>> {
    let bad = |m: String| Error::corruption(format!("{what}: {m}"));
    if b.len() as u64 != r.size {
        return Err(bad(format!(
            "{} bytes where backup.json says {}",
            b.len(),
            r.size
        )));
    }
    if b.len() < HEADER_LEN + TRAILER_LEN {
        return Err(bad("too short".into()));
    }
    let body_end = b.len() - 4;
    let stored = u32_at(b, body_end).ok_or_else(|| bad("too short".into()))?;
    let computed = crc32c::crc32c(b.get(..body_end).unwrap_or_default());
    if stored != computed || stored != r.crc32c {
        return Err(bad(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x}, backup.json {:08x})",
            r.crc32c
        )));
    }
    if b.get(..8) != Some(&MAGIC[..]) {
        return Err(bad("not a walnut block checksum file (bad magic)".into()));
    }
    if u16_at(b, 8) != Some(VERSION) || u16_at(b, 10) != Some(0) {
        return Err(bad("unsupported version".into()));
    }
    if u32_at(b, 12) != Some(block_size) {
        return Err(bad(format!("block size is not {block_size}")));
    }
    let recs_end = b.len() - TRAILER_LEN;
    let nfiles = u32_at(b, recs_end).ok_or_else(|| bad("too short".into()))?;
    let mut out = HashMap::new();
    let mut at = HEADER_LEN;
    while at < recs_end {
        let trunc = || bad(format!("truncated record at byte {at}"));
        let plen = u16_at(b, at).ok_or_else(trunc)? as usize;
        if plen == 0 || plen > MAX_PATH {
            return Err(bad(format!("bad path length {plen} at byte {at}")));
        }
        let path = b.get(at + 2..at + 2 + plen).ok_or_else(trunc)?;
        let path = std::str::from_utf8(path)
            .map_err(|_| bad(format!("path at byte {at} is not UTF-8")))?
            .to_string();
        let kind = *b.get(at + 2 + plen).ok_or_else(trunc)?;
        let count = u32_at(b, at + 3 + plen).ok_or_else(trunc)? as usize;
        let data = at + 7 + plen;
        let width = match kind {
            KIND_WHOLE => 4,
            KIND_INC => 8,
            k => return Err(bad(format!("\"{path}\": unknown kind {k}"))),
        };
        // bounded by the object's size before anything is allocated
        let len = count
            .checked_mul(width)
            .filter(|&l| l <= recs_end.saturating_sub(data))
            .ok_or_else(trunc)?;
        let body = b.get(data..data + len).ok_or_else(trunc)?;
        let f = if kind == KIND_WHOLE {
            FileCrcs::Whole(
                body.chunks_exact(4)
                    .map(|c| u32_at(c, 0).unwrap_or_default())
                    .collect(),
            )
        } else {
            FileCrcs::Inc(
                body.chunks_exact(8)
                    .map(|c| {
                        (
                            u32_at(c, 0).unwrap_or_default(),
                            u32_at(c, 4).unwrap_or_default(),
                        )
                    })
                    .collect(),
            )
        };
        if out.insert(path.clone(), f).is_some() {
            return Err(bad(format!("\"{path}\" listed twice")));
        }
        at = data + len;
    }
    if out.len() as u64 != nfiles as u64 {
        return Err(bad(format!(
            "trailer says {nfiles} files, found {}",
            out.len()
        )));
    }
    Ok(out)
}

/// The block CRCs of a whole file fed in pieces of any length (a stored file streamed
/// through a writer): the CRC of each `block_size` bytes, the last one of the tail when
/// short, as [`Writer::add_whole`] takes them.
pub struct WholeCrcs {
    block_size: usize,
    cur: u32,
    fill: usize,
    crcs: Vec<u32>,
}

impl WholeCrcs {
    pub fn new(block_size: u32) -> WholeCrcs {
        WholeCrcs {
            block_size: (block_size as usize).max(1),
            cur: 0,
            fill: 0,
            crcs: Vec::new(),
        }
    }

    /// The next bytes of the file.
    pub fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            let k = (self.block_size - self.fill).min(b.len());
            let (head, rest) = b.split_at(k);
            self.cur = crc32c::crc32c_append(self.cur, head);
            self.fill += k;
            if self.fill == self.block_size {
                self.crcs.push(self.cur);
                self.cur = 0;
                self.fill = 0;
            }
            b = rest;
        }
    }

    /// The CRC of every block of the file.
    pub fn finish(mut self) -> Vec<u32> {
        if self.fill > 0 {
            self.crcs.push(self.cur);
        }
        self.crcs
    }
}

/// Multiplication of a CRC by x^(8 len) mod P (the shift of `crc32c_combine`), by table.
pub struct Shift {
    t: [[u32; 256]; 4],
}

impl Shift {
    /// The shift over `len` bytes.
    pub fn new(len: usize) -> Shift {
        let mut t = [[0u32; 256]; 4];
        for (k, row) in t.iter_mut().enumerate() {
            for (v, cell) in row.iter_mut().enumerate() {
                *cell = crc32c::crc32c_combine((v as u32) << (8 * k), 0, len);
            }
        }
        Shift { t }
    }

    /// `crc32c_combine(a, b, len)`.
    #[inline]
    #[allow(clippy::indexing_slicing)] // a byte indexes a table of 256 entries
    pub fn combine(&self, a: u32, b: u32) -> u32 {
        let [t0, t1, t2, t3] = &self.t;
        let [a0, a1, a2, a3] = a.to_le_bytes();
        t0[a0 as usize] ^ t1[a1 as usize] ^ t2[a2 as usize] ^ t3[a3 as usize] ^ b
    }
}

/// Whether the block CRCs `crcs` of a whole file of `size` bytes combine into `file_crc`
/// (the manifest's CRC of the stored file). `shift` is [`Shift::new`] of the block size.
pub fn check_whole(crcs: &[u32], size: u64, block_size: u32, shift: &Shift, file_crc: u32) -> bool {
    let bs = block_size.max(1) as u64;
    if crcs.len() as u64 != size.div_ceil(bs) {
        return false;
    }
    let full = (size / bs) as usize;
    let mut acc = 0u32;
    for (i, &c) in crcs.iter().enumerate() {
        acc = if i < full {
            shift.combine(acc, c)
        } else {
            crc32c::crc32c_combine(acc, c, (size % bs) as usize)
        };
    }
    acc == file_crc
}

/// Whether the page CRCs `recs` of an incremental file whose records all hold a whole page
/// give its trailer CRC `trailer_crc` (what the manifest records), with the header,
/// record headers and trailer the manifest describes.
pub fn check_incremental(
    recs: &[(u32, u32)],
    block_size: u32,
    file_blocks: u32,
    limit_block: Option<u32>,
    shift: &Shift,
    trailer_crc: u32,
) -> bool {
    let mut h = [0u8; incfile::HEADER_LEN];
    h[0..8].copy_from_slice(incfile::MAGIC);
    h[8..10].copy_from_slice(&incfile::VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&block_size.to_le_bytes());
    let mut acc = crc32c::crc32c(&h);
    let mut last: Option<u32> = None;
    for &(b, c) in recs {
        if last.is_some_and(|l| l >= b) {
            return false;
        }
        last = Some(b);
        let mut rh = [0u8; 8];
        rh[0..4].copy_from_slice(&b.to_le_bytes());
        rh[4..8].copy_from_slice(&block_size.to_le_bytes());
        acc = shift.combine(crc32c::crc32c_append(acc, &rh), c);
    }
    let mut t = [0u8; 12];
    t[0..4].copy_from_slice(&(recs.len() as u32).to_le_bytes());
    t[4..8].copy_from_slice(&file_blocks.to_le_bytes());
    t[8..12].copy_from_slice(&limit_block.unwrap_or(u32::MAX).to_le_bytes());
    crc32c::crc32c_append(acc, &t) == trailer_crc
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn page(seed: u8, bs: usize) -> Vec<u8> {
        (0..bs)
            .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
            .collect()
    }

    #[test]
    fn whole_crcs_of_pieces_match_block_crcs() {
        let bs = 8192usize;
        let mut file = Vec::new();
        for i in 0..5u8 {
            file.extend(page(i + 1, bs));
        }
        file.extend(page(9, bs)[..1000].to_vec());
        let want: Vec<u32> = file.chunks(bs).map(crc32c::crc32c).collect();
        for piece in [1usize, 7, 4096, 8192, 8193, 1 << 20] {
            let mut w = WholeCrcs::new(bs as u32);
            for c in file.chunks(piece) {
                w.feed(c);
            }
            let got = w.finish();
            assert_eq!(got, want, "pieces of {piece}");
            let shift = Shift::new(bs);
            assert!(check_whole(
                &got,
                file.len() as u64,
                bs as u32,
                &shift,
                crc32c::crc32c(&file)
            ));
        }
        assert!(WholeCrcs::new(bs as u32).finish().is_empty());
    }

    #[test]
    fn shift_matches_combine() {
        let s = Shift::new(8192);
        for (a, b) in [
            (0u32, 0u32),
            (1, 2),
            (0xdead_beef, 0x1234_5678),
            (u32::MAX, 7),
        ] {
            assert_eq!(s.combine(a, b), crc32c::crc32c_combine(a, b, 8192));
        }
    }

    #[test]
    fn lists_tie_to_the_stored_files_crc() {
        let bs = 8192usize;
        let s = Shift::new(bs);
        // a whole file with a short tail
        let mut file = Vec::new();
        for i in 1..=3 {
            file.extend(page(i, bs));
        }
        file.extend(page(9, 100));
        let crcs: Vec<u32> = file.chunks(bs).map(crc32c::crc32c).collect();
        let fcrc = crc32c::crc32c(&file);
        assert!(check_whole(&crcs, file.len() as u64, bs as u32, &s, fcrc));
        let mut forged = crcs.clone();
        forged[1] ^= 1;
        assert!(!check_whole(
            &forged,
            file.len() as u64,
            bs as u32,
            &s,
            fcrc
        ));
        assert!(!check_whole(
            &crcs[..3],
            file.len() as u64,
            bs as u32,
            &s,
            fcrc
        ));
        // an incremental file
        let mut w = incfile::IncWriter::new(Vec::new(), bs as u32, false).unwrap();
        let mut recs = Vec::new();
        for (b, seed) in [(2u32, 5u8), (7, 6), (8, 7)] {
            let p = page(seed, bs);
            w.add(b, &p).unwrap();
            recs.push((b, crc32c::crc32c(&p)));
        }
        let (_, _, tcrc) = w.finish_with_crc(10, Some(9)).unwrap();
        assert!(check_incremental(&recs, bs as u32, 10, Some(9), &s, tcrc));
        assert!(!check_incremental(&recs, bs as u32, 10, None, &s, tcrc));
        let mut forged = recs.clone();
        forged[2].1 ^= 0x100;
        assert!(!check_incremental(
            &forged,
            bs as u32,
            10,
            Some(9),
            &s,
            tcrc
        ));
    }

    #[test]
    fn round_trip_and_damage() {
        let mut w = Writer::new(Vec::new(), 8192).unwrap();
        w.add_whole("base/5/1", &[1, 2, 3]).unwrap();
        w.add_inc("base/5/2", &[(4, 5), (9, 10)]).unwrap();
        let (b, r) = w.finish().unwrap();
        assert_eq!(r.size, b.len() as u64);
        let m = parse(&b, "x", 8192, &r).unwrap();
        assert_eq!(m["base/5/1"], FileCrcs::Whole(vec![1, 2, 3]));
        assert_eq!(m["base/5/2"], FileCrcs::Inc(vec![(4, 5), (9, 10)]));
        // every single-byte change is refused, and so is another block size
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x40;
            let e = parse(&d, "x", 8192, &r).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corruption, "{e}");
        }
        assert!(parse(&b, "x", 4096, &r).is_err());
        // a consistent object that backup.json does not describe
        let mut w = Writer::new(Vec::new(), 8192).unwrap();
        w.add_whole("base/5/1", &[1, 2, 4]).unwrap();
        let (b2, r2) = w.finish().unwrap();
        assert!(parse(&b2, "x", 8192, &r2).is_ok());
        let e = parse(&b2, "x", 8192, &r).unwrap_err().to_string();
        assert!(e.starts_with("x: "), "{e}");
        // a huge count is bounded by the object, not allocated
        let mut d = b.clone();
        let at = HEADER_LEN + 2 + "base/5/1".len() + 1;
        d[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let n = d.len() - 4;
        let c = crc32c::crc32c(&d[..n]);
        d[n..].copy_from_slice(&c.to_le_bytes());
        let r3 = BlockCrcsRef {
            size: d.len() as u64,
            crc32c: c,
        };
        assert!(parse(&d, "x", 8192, &r3).is_err());
    }
}
