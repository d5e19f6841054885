//! The incremental data file: the changed pages of one relation segment file.
//!
//! Written as a stream (pages are appended as they are read, so the block list need not be
//! known in advance), read as a stream (restore applies pages in file order).
//!
//! ```text
//! Format (integers little-endian): {
//!   header  { magic: [u8; 8] = "WNINCR\r\n", version: u16 = 1, flags: u16 = 0,
//!             block_size: u32 }                                               16 bytes
//!   records { blkno: u32, stored_len: u32, data: [u8; stored_len] }*
//!             stored_len == block_size: the page as is; smaller: LZ4 block of the page
//!   trailer { nblocks: u32, file_blocks: u32, limit_block: u32 (u32::MAX: none),
//!             crc32c: u32 of every byte before it }                           16 bytes
//! }
//! ```
//! `blkno` is relative to the segment file; blocks are strictly increasing. `file_blocks` is
//! the length of the file (in blocks) when it was copied; `limit_block` is the truncation
//! rule's bound: blocks at or above it must never come from an older backup.

#![deny(clippy::indexing_slicing)]

use std::io::{Read, Write};

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"WNINCR\r\n";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
pub const TRAILER_LEN: usize = 16;
/// `blkno` and `stored_len` before each record's data.
pub const RECORD_HEADER_LEN: usize = 8;
const NO_LIMIT: u32 = u32::MAX;

/// What the trailer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IncInfo {
    pub nblocks: u32,
    pub file_blocks: u32,
    pub limit_block: Option<u32>,
}

/// Streams an incremental file into `W`.
pub struct IncWriter<W: Write> {
    out: W,
    crc: u32,
    block_size: u32,
    compress: bool,
    nblocks: u32,
    last: Option<u32>,
    bytes: u64,
    scratch: Vec<u8>,
}

impl<W: Write> IncWriter<W> {
    pub fn new(mut out: W, block_size: u32, compress: bool) -> std::io::Result<IncWriter<W>> {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&block_size.to_le_bytes());
        out.write_all(&h)?;
        Ok(IncWriter {
            out,
            crc: crc32c::crc32c(&h),
            block_size,
            compress,
            nblocks: 0,
            last: None,
            bytes: HEADER_LEN as u64,
            scratch: Vec::new(),
        })
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.out.write_all(b)?;
        self.crc = crc32c::crc32c_append(self.crc, b);
        self.bytes += b.len() as u64;
        Ok(())
    }

    /// Appends one page; block numbers must increase.
    pub fn add(&mut self, blkno: u32, page: &[u8]) -> std::io::Result<()> {
        if page.len() != self.block_size as usize || self.last.is_some_and(|l| l >= blkno) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("incremental page {blkno} out of order or of wrong size"),
            ));
        }
        let data: Vec<u8> = if self.compress {
            let c = lz4_flex::block::compress(page);
            if c.len() < page.len() {
                c
            } else {
                page.to_vec()
            }
        } else {
            Vec::new()
        };
        let stored: &[u8] = if self.compress { &data } else { page };
        let mut rec = std::mem::take(&mut self.scratch);
        rec.clear();
        rec.extend_from_slice(&blkno.to_le_bytes());
        rec.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        self.put(&rec)?;
        self.scratch = rec;
        self.put(stored)?;
        self.nblocks += 1;
        self.last = Some(blkno);
        Ok(())
    }

    /// Pages added so far.
    pub fn nblocks(&self) -> u32 {
        self.nblocks
    }

    /// Writes the trailer; returns the inner writer and the number of bytes written.
    pub fn finish(self, file_blocks: u32, limit_block: Option<u32>) -> std::io::Result<(W, u64)> {
        self.finish_with_crc(file_blocks, limit_block)
            .map(|(w, n, _)| (w, n))
    }

    /// [`Self::finish`], also giving the trailer's CRC-32C (of every byte before it): what the
    /// manifest records for an incremental file (see [`manifest_crc_ok`]).
    pub fn finish_with_crc(
        mut self,
        file_blocks: u32,
        limit_block: Option<u32>,
    ) -> std::io::Result<(W, u64, u32)> {
        let mut t = [0u8; TRAILER_LEN];
        t[0..4].copy_from_slice(&self.nblocks.to_le_bytes());
        t[4..8].copy_from_slice(&file_blocks.to_le_bytes());
        t[8..12].copy_from_slice(&limit_block.unwrap_or(NO_LIMIT).to_le_bytes());
        self.put(&t[0..12])?;
        let crc = self.crc;
        t[12..16].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(&t[12..16])?;
        self.bytes += 4;
        Ok((self.out, self.bytes, crc))
    }
}

/// The CRC-32C of any byte string followed by its own CRC-32C (little-endian): the same for
/// every well-formed incremental file, so useless as the manifest's checksum of one.
pub const WHOLE_FILE_RESIDUE: u32 = 0x4867_4BC7;

/// Whether a manifest's checksum `entry_crc` matches an incremental file whose trailer CRC
/// (of every byte before it, already verified against the bytes) is `trailer_crc`. The
/// manifest records the trailer CRC, which binds the entry to this very file; manifests
/// written before that recorded the whole file's CRC, which is always
/// [`WHOLE_FILE_RESIDUE`], and are accepted as they are.
pub fn manifest_crc_ok(entry_crc: u32, trailer_crc: u32) -> bool {
    entry_crc == trailer_crc || entry_crc == WHOLE_FILE_RESIDUE
}

fn u32_le(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = off.checked_add(4).and_then(|end| b.get(off..end)) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

/// Size of a file of `nblocks` records that all hold a whole page (every file written
/// without compression). Only in such a file can a record be found by its index:
/// [`record_offset`].
pub fn whole_page_file_size(nblocks: u32, block_size: u32) -> u64 {
    (HEADER_LEN + TRAILER_LEN) as u64
        + nblocks as u64 * (RECORD_HEADER_LEN as u64 + block_size as u64)
}

/// Byte offset of record `i` in a file whose records all hold a whole page.
pub fn record_offset(i: u32, block_size: u32) -> u64 {
    HEADER_LEN as u64 + i as u64 * (RECORD_HEADER_LEN as u64 + block_size as u64)
}

/// Parses a record header: (blkno, stored_len). `left` is how many body bytes follow the
/// header; the length is checked against it and the block size.
pub fn parse_record_header(
    rh: &[u8],
    left: u64,
    what: &str,
    at: u64,
    block_size: u32,
) -> Result<(u32, usize)> {
    let blkno = u32_le(rh, 0);
    let slen = u32_le(rh, 4) as usize;
    if rh.len() < RECORD_HEADER_LEN
        || slen == 0
        || slen > block_size as usize
        || (slen as u64) > left
    {
        return Err(Error::corruption(format!(
            "{what}: bad record length {slen} at byte {at}"
        )));
    }
    Ok((blkno, slen))
}

/// Expands a record's stored bytes into `out` (one page).
pub fn decode_page(stored: &[u8], out: &mut [u8], what: &str, blkno: u32) -> Result<()> {
    if stored.len() == out.len() {
        out.copy_from_slice(stored);
        return Ok(());
    }
    let got = lz4_flex::block::decompress_into(stored, out)
        .map_err(|e| Error::corruption(format!("{what}: block {blkno}: {e}")))?;
    if got != out.len() {
        return Err(Error::corruption(format!(
            "{what}: block {blkno} decompressed to {got} bytes"
        )));
    }
    Ok(())
}

/// Checks magic, version and block size of a header.
pub fn check_header(h: &[u8], what: &str, block_size: u32) -> Result<()> {
    let Some((&head, _)) = h.split_first_chunk::<HEADER_LEN>() else {
        return Err(Error::corruption(format!(
            "{what}: not a walnut incremental file (bad magic)"
        )));
    };
    let [m0, m1, m2, m3, m4, m5, m6, m7, v0, v1, _, _, _, _, _, _] = head;
    if [m0, m1, m2, m3, m4, m5, m6, m7] != *MAGIC {
        return Err(Error::corruption(format!(
            "{what}: not a walnut incremental file (bad magic)"
        )));
    }
    let version = u16::from_le_bytes([v0, v1]);
    if version != VERSION {
        return Err(Error::corruption(format!(
            "{what}: incremental file format version {version} is not supported (this walnut reads version {VERSION})"
        )));
    }
    let bs = u32_le(h, 12);
    if bs != block_size {
        return Err(Error::corruption(format!(
            "{what}: block size {bs}, expected {block_size}"
        )));
    }
    Ok(())
}

/// The trailer's fields (its checksum, bytes 12..16, is the caller's to check).
pub fn parse_trailer(t: &[u8]) -> IncInfo {
    let limit = u32_le(t, 8);
    IncInfo {
        nblocks: u32_le(t, 0),
        file_blocks: u32_le(t, 4),
        limit_block: (limit != NO_LIMIT).then_some(limit),
    }
}

/// Reads a whole incremental stream of `len` bytes, calling `page(blkno, bytes)` for each
/// page, and verifies structure and checksum. A checksum failure is reported after the
/// pages were delivered: callers must treat their output as garbage on error.
#[allow(clippy::indexing_slicing)] // I/O; leaves this module (issue 9)
pub fn read_stream(
    mut r: impl Read,
    len: u64,
    what: &str,
    block_size: u32,
    mut page: impl FnMut(u32, &[u8]) -> Result<()>,
) -> Result<IncInfo> {
    let io = |e: std::io::Error| Error::corruption(format!("{what}: {e}"));
    if len < (HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(Error::corruption(format!(
            "{what}: incremental file too short ({len} bytes)"
        )));
    }
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(io)?;
    check_header(&h, what, block_size)?;
    let mut crc = crc32c::crc32c(&h);
    let mut pos = HEADER_LEN as u64;
    let body_end = len - TRAILER_LEN as u64;
    let mut buf = vec![0u8; block_size as usize];
    let mut out = vec![0u8; block_size as usize];
    let mut n = 0u32;
    let mut last: Option<u32> = None;
    while pos < body_end {
        let mut rh = [0u8; 8];
        if body_end - pos < 8 {
            return Err(Error::corruption(format!(
                "{what}: truncated record at byte {pos}"
            )));
        }
        r.read_exact(&mut rh).map_err(io)?;
        crc = crc32c::crc32c_append(crc, &rh);
        let blkno = u32_le(&rh, 0);
        let slen = u32_le(&rh, 4) as usize;
        pos += 8;
        if slen == 0 || slen > block_size as usize || (slen as u64) > body_end - pos {
            return Err(Error::corruption(format!(
                "{what}: bad record length {slen} at byte {}",
                pos - 8
            )));
        }
        if last.is_some_and(|l| l >= blkno) {
            return Err(Error::corruption(format!(
                "{what}: block {blkno} out of order"
            )));
        }
        last = Some(blkno);
        r.read_exact(&mut buf[..slen]).map_err(io)?;
        crc = crc32c::crc32c_append(crc, &buf[..slen]);
        pos += slen as u64;
        if slen == block_size as usize {
            page(blkno, &buf)?;
        } else {
            let got = lz4_flex::block::decompress_into(&buf[..slen], &mut out)
                .map_err(|e| Error::corruption(format!("{what}: block {blkno}: {e}")))?;
            if got != block_size as usize {
                return Err(Error::corruption(format!(
                    "{what}: block {blkno} decompressed to {got} bytes"
                )));
            }
            page(blkno, &out)?;
        }
        n += 1;
    }
    let mut t = [0u8; TRAILER_LEN];
    r.read_exact(&mut t).map_err(io)?;
    crc = crc32c::crc32c_append(crc, &t[0..12]);
    let stored = u32_le(&t, 12);
    if stored != crc {
        return Err(Error::corruption(format!(
            "{what}: checksum mismatch (stored {stored:08x}, computed {crc:08x})"
        )));
    }
    let info = parse_trailer(&t);
    if info.nblocks != n {
        return Err(Error::corruption(format!(
            "{what}: trailer says {} blocks, found {n}",
            info.nblocks
        )));
    }
    Ok(info)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        let mut p = vec![fill; 8192];
        p[0] = 1;
        p
    }

    fn build(compress: bool) -> Vec<u8> {
        let mut w = IncWriter::new(Vec::new(), 8192, compress).unwrap();
        w.add(3, &page(7)).unwrap();
        let mut noisy = vec![0u8; 8192];
        for (i, b) in noisy.iter_mut().enumerate() {
            *b = (i.wrapping_mul(2654435761) >> 13) as u8;
        }
        w.add(9, &noisy).unwrap();
        let (out, n) = w.finish(12, Some(10)).unwrap();
        assert_eq!(n as usize, out.len());
        out
    }

    type Pages = Vec<(u32, Vec<u8>)>;

    fn read_all(b: &[u8]) -> Result<(IncInfo, Pages)> {
        let mut pages = Vec::new();
        let info = read_stream(b, b.len() as u64, "t", 8192, |n, p| {
            pages.push((n, p.to_vec()));
            Ok(())
        })?;
        Ok((info, pages))
    }

    #[test]
    fn round_trip_plain_and_compressed() {
        for compress in [false, true] {
            let b = build(compress);
            let (info, pages) = read_all(&b).unwrap();
            assert_eq!(
                info,
                IncInfo {
                    nblocks: 2,
                    file_blocks: 12,
                    limit_block: Some(10)
                }
            );
            assert_eq!(pages.len(), 2);
            assert_eq!((pages[0].0, &pages[0].1), (3, &page(7)));
            assert_eq!(pages[1].0, 9);
        }
        assert!(build(true).len() < build(false).len());
    }

    #[test]
    fn golden_bytes_of_an_empty_file() {
        let w = IncWriter::new(Vec::new(), 8192, false).unwrap();
        let (b, _) = w.finish(5, None).unwrap();
        let head: [u8; 28] = [
            b'W', b'N', b'I', b'N', b'C', b'R', b'\r', b'\n', 1, 0, 0, 0, 0, 0x20, 0,
            0, // header
            0, 0, 0, 0, 5, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, // nblocks, file_blocks, no limit
        ];
        assert_eq!(&b[..28], &head);
        assert_eq!(b.len(), 32);
        let crc = crc32c::crc32c(&head);
        assert_eq!(&b[28..], &crc.to_le_bytes());
        let (info, pages) = read_all(&b).unwrap();
        assert_eq!(info.limit_block, None);
        assert!(pages.is_empty());
    }

    #[test]
    fn flipped_byte_fails_the_checksum() {
        let good = build(false);
        for pos in [20usize, 5000, good.len() - 10] {
            let mut b = good.clone();
            b[pos] ^= 0x40;
            let e = read_all(&b).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corruption, "byte {pos}: {e}");
        }
    }

    #[test]
    fn unknown_version_is_refused_clearly() {
        let mut b = build(false);
        b[8] = 2;
        let e = read_all(&b).unwrap_err();
        assert!(e.to_string().contains("version 2 is not supported"), "{e}");
    }

    #[test]
    fn out_of_order_blocks_are_refused_on_write() {
        let mut w = IncWriter::new(Vec::new(), 8192, false).unwrap();
        w.add(5, &page(1)).unwrap();
        assert!(w.add(5, &page(1)).is_err());
        assert!(w.add(6, &[0u8; 10]).is_err());
    }

    #[test]
    fn whole_file_crc_is_the_residue() {
        for body in [&b""[..], b"x", b"WNINCR\r\n and some more bytes"] {
            let mut f = body.to_vec();
            f.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
            assert_eq!(crc32c::crc32c(&f), WHOLE_FILE_RESIDUE);
        }
        assert!(manifest_crc_ok(7, 7));
        assert!(manifest_crc_ok(WHOLE_FILE_RESIDUE, 7));
        assert!(!manifest_crc_ok(8, 7));
    }
}
