//! Rebuilding one file of a restore from the stored files of its backup chain, in block
//! ranges ("chunks") that several threads can work on at once.
//!
//! A [`Plan`] lists the file's sources, newest first: incremental files, then at most one
//! whole file. Block `b` of the result comes from the newest source that holds it below that
//! source's `cap` (the truncation rule, see restore.rs); a block no source may supply is a
//! zero page, left as a hole. A chunk goes window by window (1 MiB of the result): the oldest
//! source is read straight into the window, each newer one overwrites the blocks it holds,
//! and every run of supplied blocks is written with one `pwrite`. So each block is written
//! once, and every stored file is read sequentially in long reads.
//!
//! Verification is unchanged by the split: each chunk reads a disjoint byte range of every
//! source, and the ranges of all chunks together cover each stored file exactly, from its
//! first byte to its last, including bytes no block is taken from. Each chunk returns the
//! CRC-32C of its ranges ([`Part`]); [`finish`] combines them in file order
//! (`crc32c_combine`) and checks the result against the manifest (and an incremental file's
//! own trailer) before the file may be put in place.
//!
//! A file is split only when every source can be entered at a given block: an uncompressed
//! whole file (at a byte offset) and an incremental file whose records all hold a whole page
//! (record `i` at a fixed offset, found by binary search over the sorted block numbers).
//! LZ4 files and incremental files with compressed pages are read in one pass, one chunk.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::durable;
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;
use crate::repo::Repo;
use std::sync::Arc;

use crate::format::incfile::{self, IncInfo};
use crate::format::manifest::Lz4Frames;

/// Bytes of the result per chunk: long sequential reads, yet a 1 GiB segment file is shared
/// evenly between threads.
pub const CHUNK_BYTES: u64 = 32 << 20;
/// Bytes of the result assembled in memory before they are written.
pub const WINDOW_BYTES: u64 = 1 << 20;
/// Read buffer of an incremental source.
const READ_BUF: usize = 1 << 20;

/// How a source is stored.
#[derive(Clone, Debug)]
pub enum Stored {
    /// The whole file as is.
    Plain,
    /// The whole file LZ4-compressed; `frames` when stored as frames of a fixed decoded
    /// size (manifest.rs).
    Lz4 { frames: Option<Lz4Frames> },
    /// An incremental file; `info` as the manifest (or the trailer) says; `whole_pages`
    /// when every record holds a whole page.
    Inc { info: IncInfo, whole_pages: bool },
}

/// One stored file that supplies blocks.
#[derive(Clone, Debug)]
pub struct Source {
    /// The catalog's store and the stored file's key (built from checked names and a
    /// checked manifest entry).
    pub repo: Arc<dyn Repo>,
    pub key: String,
    pub backup: String,
    pub stored: Stored,
    /// Manifest: bytes of the file (decoded), and bytes and CRC-32C of the stored file.
    pub size: u64,
    pub stored_size: u64,
    pub crc32c: u32,
    /// Blocks at or above `cap` are never taken from this source.
    pub cap: u32,
}

impl Source {
    /// The stored file's place, for messages.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("{}/{}", self.repo.location(), self.key))
    }

    /// Opens the stored object for positional reads (see [`Obj`]).
    pub fn open(&self) -> Result<Obj> {
        match self.repo.open_file(&self.key)? {
            // A local store's object is a file below its root (no symbolic link below the
            // root, a regular file): one descriptor per chunk and readahead hints.
            Some(f) => {
                let len = f.metadata().ctx("stat", &self.path())?.len();
                Ok(Obj::File(f, len))
            }
            None => {
                let len = self
                    .repo
                    .head(&self.key)?
                    .ok_or_else(|| {
                        Error::not_found(format!("{}: not found", self.path().display()))
                    })?
                    .size;
                Ok(Obj::Ranged {
                    repo: self.repo.clone(),
                    key: self.key.clone(),
                    len,
                })
            }
        }
    }
}

/// A stored object open for positional reads: a file of a local store, or ranged gets of
/// any other.
pub enum Obj {
    File(File, u64),
    Ranged {
        repo: Arc<dyn Repo>,
        key: String,
        len: u64,
    },
}

impl Obj {
    fn len(&self) -> u64 {
        match self {
            Obj::File(_, n) | Obj::Ranged { len: n, .. } => *n,
        }
    }

    /// Up to `buf.len()` bytes at `off` (fewer only at the end).
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        match self {
            Obj::File(f, _) => f.read_at(buf, off),
            Obj::Ranged { repo, key, len } => {
                let n = (buf.len() as u64).min(len.saturating_sub(off)) as usize;
                if n == 0 {
                    return Ok(0);
                }
                let b = repo
                    .get_range(key, off, n as u64)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                buf[..n].copy_from_slice(&b);
                Ok(n)
            }
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.read_at(&mut buf[got..], off + got as u64) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A readahead hint for `[offset, offset + len)` (local files only).
    pub fn will_need(&self, offset: u64, len: u64) {
        if let Obj::File(f, _) = self {
            will_need(f, offset, len);
        }
    }

    /// Drops `[offset, offset + len)` from the page cache (local files only; a hint).
    fn drop_cached(&self, offset: u64, len: u64) {
        if let Obj::File(f, _) = self {
            use std::os::fd::AsRawFd;
            let _ = nix::fcntl::posix_fadvise(
                f.as_raw_fd(),
                offset.min(i64::MAX as u64) as _,
                len.min(i64::MAX as u64) as _,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
    }
}

/// Blocks `blk..blk + n` of a plain whole stored file, read in one piece (an lsn-mode
/// incremental restore takes single blocks or short runs from a FULL it otherwise never
/// reads, see incremental.rs). The stored file's checksum cannot cover them: the caller
/// checks every page itself.
pub fn read_plain_blocks(
    obj: &Obj,
    src: &Source,
    blk: u32,
    n: u32,
    bs: u32,
    buf: &mut [u8],
) -> Result<()> {
    if !matches!(src.stored, Stored::Plain) {
        return Err(Error::invalid(format!(
            "{}: not a plain stored file",
            src.path().display()
        )));
    }
    let off = blk as u64 * bs as u64;
    let len = n as u64 * bs as u64;
    if off + len > obj.len().min(src.size) {
        return Err(Error::corruption(format!(
            "{}: block {} is beyond the stored file",
            src.path().display(),
            blk as u64 + n as u64 - 1
        )));
    }
    obj.read_exact_at(&mut buf[..len as usize], off)
        .ctx("read", &src.path())
}

/// Bytes `off..off + buf.len()` of a stored file (a checksum-mode incremental restore reads
/// only the blocks that differ, see incremental.rs); refused past the stored file's end.
/// Nothing checks them here: the caller checks each block against its block checksum.
pub fn read_stored_at(obj: &Obj, src: &Source, off: u64, buf: &mut [u8]) -> Result<()> {
    if off.saturating_add(buf.len() as u64) > obj.len().min(src.stored_size) {
        return Err(Error::corruption(format!(
            "{}: byte {} is beyond the stored file (backup {})",
            src.path().display(),
            off.saturating_add(buf.len() as u64),
            src.backup
        )));
    }
    obj.read_exact_at(buf, off).ctx("read", &src.path())
}

/// Sequential reads of an [`Obj`] from a position.
pub struct ObjReader {
    obj: Obj,
    pos: u64,
}

impl Read for ObjReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.obj.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// The newest backup holds the file whole: the result is its bytes, all of them.
    Copy,
    /// Blocks `0..n` rebuilt from the sources.
    Blocks(u32),
}

/// How one file is rebuilt.
#[derive(Clone, Debug)]
pub struct Plan {
    pub shape: Shape,
    /// Newest first. A `Copy` has exactly one.
    pub sources: Vec<Source>,
    pub block_size: u32,
    pub chunk_blocks: u32,
    pub window_blocks: u32,
    pub chunks: u32,
}

impl Plan {
    /// Builds a plan; `chunk_blocks` and `window_blocks` are at least 1. A source stored
    /// as LZ4 frames sets the chunk size to its frame size, or keeps the file in one chunk
    /// when its frames do not fit (not whole blocks, or not one per chunk).
    pub fn new(
        shape: Shape,
        sources: Vec<Source>,
        block_size: u32,
        chunk_blocks: u32,
        window_blocks: u32,
    ) -> Plan {
        let bs = block_size.max(1) as u64;
        let mut chunk_blocks = chunk_blocks.max(1);
        let mut splittable = true;
        for s in &sources {
            match &s.stored {
                Stored::Plain => {}
                Stored::Inc { whole_pages, .. } => splittable &= *whole_pages,
                Stored::Lz4 { frames: None } => splittable = false,
                Stored::Lz4 { frames: Some(f) } => {
                    let fb = f.frame_bytes / bs;
                    if fb == 0 || f.frame_bytes % bs != 0 || fb > u32::MAX as u64 {
                        splittable = false;
                    } else {
                        chunk_blocks = fb as u32;
                    }
                }
            }
        }
        let blocks = match shape {
            Shape::Copy => sources.first().map_or(0, |s| s.size.div_ceil(bs)),
            Shape::Blocks(n) => n as u64,
        };
        let mut chunks = if splittable {
            blocks
                .div_ceil(chunk_blocks as u64)
                .clamp(1, u32::MAX as u64) as u32
        } else {
            1
        };
        // Chunk k decodes frame k: every frame must start a chunk, and the last chunk holds
        // the last frame.
        for s in &sources {
            if let Stored::Lz4 { frames: Some(f) } = &s.stored {
                let needed = s.size.div_ceil(f.frame_bytes.max(1)).max(1);
                let fits = f.frame_bytes / bs == chunk_blocks as u64
                    && f.stored.len() as u64 == needed
                    && f.stored.iter().sum::<u64>() == s.stored_size
                    && (shape != Shape::Copy || chunks as u64 == needed);
                if !fits {
                    chunks = 1;
                }
            }
        }
        let window_blocks = window_blocks.clamp(1, chunk_blocks);
        Plan {
            shape,
            sources,
            block_size,
            chunk_blocks,
            window_blocks,
            chunks,
        }
    }

    /// Blocks `lo..hi` of chunk `k`; `hi` is `None` for the last chunk of a copy (it runs to
    /// the end of the stored file).
    fn range(&self, k: u32) -> (u32, Option<u32>) {
        let lo = k.saturating_mul(self.chunk_blocks);
        let last = k + 1 >= self.chunks;
        match (self.shape, last) {
            (Shape::Blocks(n), true) => (lo, Some(n.max(lo))),
            (Shape::Copy, true) => (lo, None),
            (_, false) => (lo, Some(lo.saturating_add(self.chunk_blocks))),
        }
    }
}

/// What one chunk read of one source: the CRC-32C and length of its byte range, records
/// seen (incremental), and the trailer (the last chunk of an incremental file).
#[derive(Clone, Debug, Default)]
pub struct Part {
    crc: u32,
    len: u64,
    records: u32,
    trailer: Option<[u8; incfile::TRAILER_LEN]>,
}

fn what(p: &Path) -> String {
    p.display().to_string()
}

/// Reads a byte range `[start, end)` of a file through a buffer, keeping the CRC-32C of every
/// byte loaded. Each load is one `pread` of up to [`READ_BUF`] bytes.
struct RangeReader {
    file: Obj,
    path: PathBuf,
    start: u64,
    /// Next offset to load.
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    at: usize,
    len: usize,
    crc: u32,
}

impl RangeReader {
    fn new(file: Obj, path: &Path, start: u64, end: u64) -> RangeReader {
        let cap = READ_BUF.min(end.saturating_sub(start).max(1) as usize);
        RangeReader {
            file,
            path: path.to_path_buf(),
            start,
            pos: start,
            end: end.max(start),
            buf: vec![0u8; cap.max(incfile::RECORD_HEADER_LEN + (64 << 10))],
            at: 0,
            len: 0,
            crc: 0,
        }
    }

    /// Offset of the next byte `take` returns.
    fn consumed(&self) -> u64 {
        self.pos - (self.len - self.at) as u64
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.len - self.at < n {
            self.buf.copy_within(self.at..self.len, 0);
            self.len -= self.at;
            self.at = 0;
            while self.len < n {
                let want = ((self.buf.len() - self.len) as u64).min(self.end - self.pos) as usize;
                if want == 0 || n > self.buf.len() {
                    return Err(Error::corruption(format!(
                        "{}: truncated at byte {}",
                        what(&self.path),
                        self.consumed()
                    )));
                }
                let got = loop {
                    match self
                        .file
                        .read_at(&mut self.buf[self.len..self.len + want], self.pos)
                    {
                        Ok(g) => break g,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Error::io("read", &self.path, e)),
                    }
                };
                if got == 0 {
                    return Err(Error::corruption(format!(
                        "{}: unexpected end of file at byte {}",
                        what(&self.path),
                        self.pos
                    )));
                }
                self.crc = crc32c::crc32c_append(self.crc, &self.buf[self.len..self.len + got]);
                self.pos += got as u64;
                self.len += got;
            }
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
}

/// One chunk's view of an incremental file: its records for blocks `lo..hi` (the last chunk:
/// `lo..`, then the trailer).
struct IncReader {
    r: RangeReader,
    what: String,
    block_size: u32,
    /// Where this range's records end.
    body_end: u64,
    /// Offset of the stored checksum (last chunk only).
    crc_at: Option<u64>,
    lo: u32,
    hi: Option<u32>,
    next: Option<(u32, usize)>,
    last: Option<u32>,
    records: u32,
    whole_pages: bool,
}

/// First record index in `0..n` whose block is at or above `blk` (records sorted by block;
/// all records hold a whole page). Corrupt, unsorted data gives some index; the chunks
/// check every record they read against their own block range.
fn first_record_at(f: &Obj, path: &Path, n: u32, bs: u32, blk: u32) -> Result<u32> {
    let (mut lo, mut hi) = (0u32, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, incfile::record_offset(mid, bs))
            .ctx("read", path)?;
        if u32::from_le_bytes(b) < blk {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

impl IncReader {
    fn open(plan: &Plan, src: &Source, k: u32) -> Result<IncReader> {
        let Stored::Inc { info, whole_pages } = src.stored else {
            return Err(Error::invalid("not an incremental source"));
        };
        let bs = plan.block_size;
        let path = src.path();
        let w = what(&path);
        let f = src.open()?;
        let flen = f.len();
        let min = (incfile::HEADER_LEN + incfile::TRAILER_LEN) as u64;
        if flen < min {
            return Err(Error::corruption(format!(
                "{w}: incremental file too short ({flen} bytes)"
            )));
        }
        let (lo, hi) = plan.range(k);
        let first = k == 0;
        let last = k + 1 >= plan.chunks;
        let (start, end, body_end) = if plan.chunks == 1 {
            (0, flen - 4, flen - incfile::TRAILER_LEN as u64)
        } else {
            let n = info.nblocks;
            if flen != incfile::whole_page_file_size(n, bs) {
                return Err(Error::corruption(format!(
                    "{w}: {flen} bytes, but {n} whole-page records take {} (backup {})",
                    incfile::whole_page_file_size(n, bs),
                    src.backup
                )));
            }
            let r_lo = if first {
                0
            } else {
                first_record_at(&f, &path, n, bs, lo)?
            };
            let r_hi = match (last, hi) {
                (false, Some(h)) => first_record_at(&f, &path, n, bs, h)?,
                _ => n,
            };
            if r_hi < r_lo {
                return Err(Error::corruption(format!("{w}: blocks out of order")));
            }
            let start = if first {
                0
            } else {
                incfile::record_offset(r_lo, bs)
            };
            if last {
                (start, flen - 4, flen - incfile::TRAILER_LEN as u64)
            } else {
                let e = incfile::record_offset(r_hi, bs);
                (start, e, e)
            }
        };
        f.will_need(start, end - start);
        let mut r = RangeReader::new(f, &path, start, end);
        if first {
            let h = r.take(incfile::HEADER_LEN)?;
            incfile::check_header(h, &w, bs)?;
        }
        Ok(IncReader {
            r,
            what: w,
            block_size: bs,
            body_end,
            crc_at: last.then_some(flen - 4),
            lo,
            hi: if last { None } else { hi },
            next: None,
            last: None,
            records: 0,
            whole_pages: plan.chunks > 1 && whole_pages,
        })
    }

    fn peek(&mut self) -> Result<Option<(u32, usize)>> {
        if self.next.is_none() {
            let at = self.r.consumed();
            if at >= self.body_end {
                return Ok(None);
            }
            let w = &self.what;
            if self.body_end - at < incfile::RECORD_HEADER_LEN as u64 {
                return Err(Error::corruption(format!(
                    "{w}: truncated record at byte {at}"
                )));
            }
            let left = self.body_end - at - incfile::RECORD_HEADER_LEN as u64;
            let bs = self.block_size;
            let rh = self.r.take(incfile::RECORD_HEADER_LEN)?;
            let (blkno, slen) = incfile::parse_record_header(rh, left, w, at, bs)?;
            if self.whole_pages && slen != bs as usize {
                return Err(Error::corruption(format!(
                    "{w}: record at byte {at} holds {slen} bytes, not a whole page"
                )));
            }
            if self.last.is_some_and(|l| l >= blkno) {
                return Err(Error::corruption(format!(
                    "{w}: block {blkno} out of order"
                )));
            }
            if blkno < self.lo || self.hi.is_some_and(|h| blkno >= h) {
                return Err(Error::corruption(format!(
                    "{w}: block {blkno} out of order (record at byte {at})"
                )));
            }
            self.last = Some(blkno);
            self.next = Some((blkno, slen));
        }
        Ok(self.next)
    }

    /// Applies the records for blocks below `w_hi` to the window starting at `w_lo`.
    fn apply(
        &mut self,
        w_lo: u32,
        w_hi: u32,
        cap: u32,
        buf: &mut [u8],
        filled: &mut [bool],
    ) -> Result<()> {
        let bs = self.block_size as usize;
        while let Some((b, slen)) = self.peek()? {
            if b >= w_hi {
                break;
            }
            self.next = None;
            self.records += 1;
            let stored = self.r.take(slen)?;
            // b >= w_lo: records are sorted and the windows before consumed every lower one
            if b < cap && b >= w_lo {
                let j = (b - w_lo) as usize;
                incfile::decode_page(stored, &mut buf[j * bs..(j + 1) * bs], &self.what, b)?;
                filled[j] = true;
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Part> {
        // records past the result's length (last chunk only): read for the checksum
        while self.peek()?.is_some() {
            if let Some((_, slen)) = self.next.take() {
                self.records += 1;
                self.r.take(slen)?;
            }
        }
        let mut trailer = None;
        if let Some(crc_at) = self.crc_at {
            let mut t = [0u8; incfile::TRAILER_LEN];
            t[..12].copy_from_slice(self.r.take(12)?);
            self.r
                .file
                .read_exact_at(&mut t[12..], crc_at)
                .ctx("read", &self.r.path)?;
            trailer = Some(t);
        }
        if self.r.consumed() != self.r.end {
            return Err(Error::corruption(format!(
                "{}: unexpected bytes at {}",
                what(&self.r.path),
                self.r.consumed()
            )));
        }
        Ok(Part {
            crc: self.r.crc,
            len: self.r.end - self.r.start,
            records: self.records,
            trailer,
        })
    }
}

/// One chunk's view of a whole stored file: bytes from the chunk's first block to its end
/// (the last chunk: to the end of the file).
enum WholeReader {
    Plain {
        file: Obj,
        path: PathBuf,
        pos: u64,
        end: Option<u64>,
        eof: bool,
        crc: u32,
        len: u64,
    },
    Lz4 {
        dec: Box<Lz4Decoder>,
        path: PathBuf,
        /// Decoded offset reached, and where this range must end.
        pos: u64,
        end: u64,
    },
}

type Lz4Decoder =
    lz4_flex::frame::FrameDecoder<CrcReader<std::io::Take<std::io::BufReader<ObjReader>>>>;

impl WholeReader {
    fn open(plan: &Plan, src: &Source, k: u32) -> Result<WholeReader> {
        let path = src.path();
        let f = src.open()?;
        let bs = plan.block_size as u64;
        let (lo, hi) = plan.range(k);
        let last = k + 1 >= plan.chunks;
        Ok(match &src.stored {
            Stored::Lz4 { frames } => {
                // One frame: the whole file in one chunk. Frames: chunk k decodes frame k
                // (the last chunk also any frames after it), see Plan::new.
                let (offset, stored_len, pos, end) = match frames {
                    Some(fr) if plan.chunks > 1 => {
                        let k = k as usize;
                        let offset: u64 = fr.stored.iter().take(k).sum();
                        let from = (k as u64).saturating_mul(fr.frame_bytes).min(src.size);
                        if last {
                            (offset, u64::MAX, from, src.size)
                        } else {
                            let n = fr.stored.get(k).copied().unwrap_or(0);
                            let to = from.saturating_add(fr.frame_bytes).min(src.size);
                            (offset, n, from, to)
                        }
                    }
                    _ => (0, u64::MAX, 0, src.size),
                };
                f.will_need(
                    offset,
                    stored_len.min(src.stored_size.saturating_sub(offset)),
                );
                let f = ObjReader {
                    obj: f,
                    pos: offset,
                };
                WholeReader::Lz4 {
                    dec: Box::new(lz4_flex::frame::FrameDecoder::new(CrcReader {
                        inner: std::io::Read::take(
                            std::io::BufReader::with_capacity(READ_BUF, f),
                            stored_len,
                        ),
                        crc: 0,
                        n: 0,
                    })),
                    path: path.clone(),
                    pos,
                    end,
                }
            }
            _ => {
                let from = lo as u64 * bs;
                let to = match (last, hi) {
                    (false, Some(h)) => h as u64 * bs,
                    _ => src.stored_size,
                };
                f.will_need(from, to.saturating_sub(from));
                WholeReader::Plain {
                    file: f,
                    path: path.clone(),
                    pos: lo as u64 * bs,
                    end: if last {
                        None
                    } else {
                        hi.map(|h| h as u64 * bs)
                    },
                    eof: false,
                    crc: 0,
                    len: 0,
                }
            }
        })
    }

    /// Reads the next bytes, up to file (or decoded) offset `upto`, into `buf`; returns how
    /// many (0 at the end of the range).
    fn read(&mut self, buf: &mut [u8], upto: u64) -> Result<usize> {
        match self {
            WholeReader::Plain {
                file,
                path,
                pos,
                end,
                eof,
                crc,
                len,
            } => {
                let lim = upto.min(end.unwrap_or(u64::MAX));
                if *eof || *pos >= lim {
                    return Ok(0);
                }
                let want = (buf.len() as u64).min(lim - *pos) as usize;
                let mut got = 0;
                while got < want {
                    match file.read_at(&mut buf[got..want], *pos + got as u64) {
                        Ok(0) => {
                            *eof = true;
                            break;
                        }
                        Ok(g) => got += g,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Error::io("read", path, e)),
                    }
                }
                *crc = crc32c::crc32c_append(*crc, &buf[..got]);
                *pos += got as u64;
                *len += got as u64;
                Ok(got)
            }
            WholeReader::Lz4 { dec, path, pos, .. } => {
                let want = (buf.len() as u64).min(upto.saturating_sub(*pos)) as usize;
                let mut got = 0;
                while got < want {
                    let n = read_frames(dec, &mut buf[got..want])
                        .map_err(|e| Error::corruption(format!("{}: {e}", what(path))))?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                *pos += got as u64;
                Ok(got)
            }
        }
    }

    /// Reads the rest of the range (for the checksum only).
    fn finish(mut self) -> Result<Part> {
        if let WholeReader::Plain { .. } = self {
            thread_local! {
                // reused: most calls find nothing left to read, and a fresh zeroed
                // megabyte per file cost more than a small file's copy
                static SCRATCH: std::cell::RefCell<Vec<u8>> =
                    const { std::cell::RefCell::new(Vec::new()) };
            }
            let mut scratch = SCRATCH.with(|c| c.take());
            scratch.resize(READ_BUF, 0);
            while self.read(&mut scratch, u64::MAX)? > 0 {}
            SCRATCH.with(|c| *c.borrow_mut() = scratch);
        }
        Ok(match self {
            WholeReader::Plain { crc, len, .. } => Part {
                crc,
                len,
                ..Part::default()
            },
            WholeReader::Lz4 {
                mut dec,
                path,
                pos,
                end,
            } => {
                let mut rest = 0u64;
                let mut scratch = vec![0u8; 64 << 10];
                loop {
                    let n = read_frames(&mut dec, &mut scratch)
                        .map_err(|e| Error::corruption(format!("{}: {e}", what(&path))))?;
                    if n == 0 {
                        break;
                    }
                    rest += n as u64;
                }
                if pos + rest != end {
                    return Err(Error::corruption(format!(
                        "{}: decodes to byte {} where the manifest says {end}",
                        what(&path),
                        pos + rest
                    )));
                }
                let c = dec.get_ref();
                Part {
                    crc: c.crc,
                    len: c.n,
                    ..Part::default()
                }
            }
        })
    }
}

/// Reads decoded bytes across LZ4 frame boundaries: `FrameDecoder::read` returns 0 at the
/// end of each frame, so 0 means the end only when the read consumed no input.
pub fn read_frames<R: Read>(
    dec: &mut lz4_flex::frame::FrameDecoder<CrcReader<R>>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    loop {
        let before = dec.get_ref().n;
        let n = match dec.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        if n > 0 || buf.is_empty() || dec.get_ref().n == before {
            return Ok(n);
        }
    }
}

/// Counts and CRCs the bytes read through it.
pub struct CrcReader<R: Read> {
    pub inner: R,
    pub crc: u32,
    pub n: u64,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

enum Reader {
    Whole(WholeReader),
    Inc(IncReader),
}

impl Reader {
    /// The stored byte the reader reads next (before any read: where its range starts).
    fn start(&self) -> u64 {
        match self {
            Reader::Whole(WholeReader::Plain { pos, .. }) => *pos,
            Reader::Whole(WholeReader::Lz4 { dec, .. }) => {
                let take = &dec.get_ref().inner;
                take.get_ref().get_ref().pos
            }
            Reader::Inc(ir) => ir.r.start,
        }
    }
}

/// Asks the kernel to start reading `[offset, offset + len)` of `f` now (a hint: errors are
/// ignored). A chunk starts reading in the middle of a file, where readahead would first
/// have to see a few sequential reads before it reads far enough ahead.
fn will_need(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        offset.min(i64::MAX as u64) as _,
        len.min(i64::MAX as u64) as _,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    );
}

/// Bytes of the result a chunk leaves in flight before it waits for their writeback.
const SETTLE_LAG: u64 = 8 << 20;

/// Once the result written up to `written` is more than [`SETTLE_LAG`] past `settled`, waits
/// for the writeback of the older part (started by `write_at`) and drops it from the page
/// cache; returns the new `settled`. Without it a restore leaves gigabytes dirty for the
/// final syncfs (writing little while it reads) and fills memory with pages it never reads
/// again, and taking fresh pages is costly (markedly so in a VM whose free memory goes back
/// to the host). Only memory management: durability still comes from the final syncfs, which
/// also reports any writeback error (errseq, descriptor opened before writing).
fn settle(out: &File, settled: u64, written: u64) -> u64 {
    if written < settled + 2 * SETTLE_LAG {
        return settled;
    }
    let upto = written - SETTLE_LAG;
    durable::wait_writeback(out, settled, upto - settled);
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::posix_fadvise(
        out.as_raw_fd(),
        settled.min(i64::MAX as u64) as _,
        (upto - settled).min(i64::MAX as u64) as _,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    upto
}

fn write_at(out: &File, dest: &Path, data: &[u8], off: u64) -> Result<()> {
    out.write_all_at(data, off).ctx("write", dest)?;
    durable::start_writeback(out, off, data.len() as u64);
    Ok(())
}

/// Where a chunk's result goes: the caller's file (a fresh restore) or an existing file
/// rewritten in place where it differs (an incremental restore, see incremental.rs).
pub trait Sink {
    /// `data` is the result at byte `off`: whole blocks, except the tail of a copy.
    fn put(&mut self, data: &[u8], off: u64) -> Result<()>;
    /// Blocks `first..first + n` of the result are zero pages (no source supplies them).
    fn zeros(&mut self, first: u32, n: u32) -> Result<()>;
}

/// A fresh file: every supplied run written, zero pages left as holes.
struct FileSink<'a> {
    out: &'a File,
    dest: &'a Path,
    settled: u64,
}

impl Sink for FileSink<'_> {
    fn put(&mut self, data: &[u8], off: u64) -> Result<()> {
        write_at(self.out, self.dest, data, off)?;
        self.settled = settle(self.out, self.settled, off + data.len() as u64);
        Ok(())
    }

    fn zeros(&mut self, _first: u32, _n: u32) -> Result<()> {
        Ok(())
    }
}

/// Runs chunk `k` of `plan`, writing into `out` (the result being built at `dest`); returns
/// one [`Part`] per source, for [`finish`].
pub fn run_chunk(
    plan: &Plan,
    k: u32,
    out: &File,
    dest: &Path,
    progress: &dyn Progress,
) -> Result<Vec<Part>> {
    let (lo, _) = plan.range(k);
    let mut sink = FileSink {
        out,
        dest,
        settled: lo as u64 * plan.block_size as u64,
    };
    run_chunk_to(plan, k, &mut sink, progress)
}

/// [`run_chunk`] into any [`Sink`]: every block of the chunk's range reaches it once, as
/// data or as a zero page, in order.
pub fn run_chunk_to(
    plan: &Plan,
    k: u32,
    sink: &mut dyn Sink,
    progress: &dyn Progress,
) -> Result<Vec<Part>> {
    let opened = open_chunk(plan, k)?;
    run_opened(plan, opened, sink, progress)
}

/// Every chunk of `plan` in order into one [`Sink`] (the whole result, block after block),
/// on the calling thread; returns the parts for [`verify`]. Chunk `k + 1`'s sources are
/// opened (so their readahead starts) before chunk `k` runs: the disk reads ahead across
/// chunk boundaries. With `drop_behind`, what each chunk read of a local source is dropped
/// from the page cache once read (for a reader that never reads it again: its pages are
/// reused at once instead of fresh ones taken, costly in a VM that gives free memory back).
pub fn run_all_to(
    plan: &Plan,
    sink: &mut dyn Sink,
    progress: &dyn Progress,
    drop_behind: bool,
) -> Result<Vec<Vec<Part>>> {
    let mut parts = Vec::with_capacity(plan.chunks as usize);
    // (a file of one chunk has little to drop: not worth opening its sources once more)
    let behind = if drop_behind && plan.chunks > 1 {
        Some(
            plan.sources
                .iter()
                .map(Source::open)
                .collect::<Result<Vec<_>>>()?,
        )
    } else {
        None
    };
    let mut next = Some(open_chunk(plan, 0)?);
    for k in 0..plan.chunks {
        let this = next
            .take()
            .ok_or_else(|| Error::invalid(format!("chunk {k} not opened")))?;
        if k + 1 < plan.chunks {
            next = Some(open_chunk(plan, k + 1)?);
        }
        parts.push(run_opened(plan, this, sink, progress)?);
        if let Some(objs) = &behind {
            // everything of each source below where the next chunk starts reading (all of
            // it after the last chunk)
            for (i, o) in objs.iter().enumerate() {
                match next.as_ref().and_then(|n| n.starts.get(i)) {
                    Some(&upto) => o.drop_cached(0, upto),
                    None => o.drop_cached(0, 0),
                }
            }
        }
    }
    Ok(parts)
}

/// A chunk whose sources are open (and hinted to the kernel for readahead).
pub struct OpenChunk {
    k: u32,
    readers: Vec<Reader>,
    /// Per source (a copy: its one source), the stored byte where this chunk reads first.
    starts: Vec<u64>,
}

/// Opens the sources of chunk `k` of `plan`.
pub fn open_chunk(plan: &Plan, k: u32) -> Result<OpenChunk> {
    let mut readers = Vec::with_capacity(plan.sources.len());
    if plan.shape == Shape::Copy {
        let src = plan
            .sources
            .first()
            .ok_or_else(|| Error::invalid("a copy without a source"))?;
        readers.push(Reader::Whole(WholeReader::open(plan, src, k)?));
    } else {
        for s in &plan.sources {
            readers.push(match s.stored {
                Stored::Inc { .. } => Reader::Inc(IncReader::open(plan, s, k)?),
                _ => Reader::Whole(WholeReader::open(plan, s, k)?),
            });
        }
    }
    let starts = readers.iter().map(Reader::start).collect();
    Ok(OpenChunk { k, readers, starts })
}

/// Runs an opened chunk into `sink`.
fn run_opened(
    plan: &Plan,
    opened: OpenChunk,
    sink: &mut dyn Sink,
    progress: &dyn Progress,
) -> Result<Vec<Part>> {
    let OpenChunk { k, mut readers, .. } = opened;
    let bs = plan.block_size as usize;
    let (lo, hi) = plan.range(k);
    let wb = plan.window_blocks as usize;
    // a window, or less for a small file (a restore runs this for every file)
    let span = match hi {
        Some(h) => h.saturating_sub(lo) as u64,
        None => plan.sources.first().map_or(wb as u64, |s| {
            s.size.div_ceil(bs.max(1) as u64).saturating_sub(lo as u64)
        }),
    };
    let mut buf = vec![0u8; (wb as u64).min(span.max(1)) as usize * bs];
    if plan.shape == Shape::Copy {
        let Some(Reader::Whole(mut r)) = readers.pop() else {
            return Err(Error::invalid("a copy without a source"));
        };
        let mut off = lo as u64 * bs as u64;
        loop {
            let n = r.read(&mut buf, u64::MAX)?;
            if n == 0 {
                break;
            }
            sink.put(&buf[..n], off)?;
            progress.inc(n as u64);
            off += n as u64;
        }
        return Ok(vec![r.finish()?]);
    }
    let hi = hi.unwrap_or(lo);
    let mut filled = vec![false; wb];
    let mut w_lo = lo;
    while w_lo < hi {
        let w_hi = w_lo.saturating_add(wb as u32).min(hi);
        let nb = (w_hi - w_lo) as usize;
        filled[..nb].fill(false);
        // oldest first: each newer source overwrites what it holds
        for (s, r) in plan.sources.iter().zip(readers.iter_mut()).rev() {
            match r {
                Reader::Whole(w) => {
                    let n = w.read(&mut buf[..nb * bs], w_hi as u64 * bs as u64)?;
                    for (j, f) in filled.iter_mut().enumerate().take(n / bs) {
                        *f = w_lo + (j as u32) < s.cap;
                    }
                }
                Reader::Inc(ir) => ir.apply(w_lo, w_hi, s.cap, &mut buf, &mut filled)?,
            }
        }
        let mut j = 0;
        while j < nb {
            let want = filled[j];
            let run = filled[j..nb].iter().take_while(|&&f| f == want).count();
            if want {
                let off = (w_lo as u64 + j as u64) * bs as u64;
                sink.put(&buf[j * bs..(j + run) * bs], off)?;
            } else {
                sink.zeros(w_lo + j as u32, run as u32)?;
            }
            j += run;
        }
        progress.inc((nb * bs) as u64);
        w_lo = w_hi;
    }
    let mut parts = Vec::with_capacity(readers.len());
    for r in readers {
        parts.push(match r {
            Reader::Whole(w) => w.finish()?,
            Reader::Inc(ir) => ir.finish()?,
        });
    }
    Ok(parts)
}

/// After every chunk of `plan` ran (`parts[k]` from chunk `k`): checks every source against
/// its manifest checksum (and an incremental file against its trailer), then gives the
/// result its length. Nothing may use the result before this succeeds.
pub fn finish(plan: &Plan, parts: &[Vec<Part>], out: &File, dest: &Path) -> Result<()> {
    verify(plan, parts, dest)?;
    if let Shape::Blocks(n) = plan.shape {
        out.set_len(n as u64 * plan.block_size as u64)
            .ctx("truncate", dest)?;
    }
    Ok(())
}

/// The checks of [`finish`] alone: every source against its manifest checksum (and an
/// incremental file against its trailer).
pub fn verify(plan: &Plan, parts: &[Vec<Part>], dest: &Path) -> Result<()> {
    if parts.len() != plan.chunks as usize {
        return Err(Error::invalid(format!(
            "{}: {} of {} chunks done",
            dest.display(),
            parts.len(),
            plan.chunks
        )));
    }
    for (i, src) in plan.sources.iter().enumerate() {
        let w = what(&src.path());
        let (mut crc, mut len, mut records, mut trailer) = (0u32, 0u64, 0u32, None);
        for chunk in parts {
            let p = chunk
                .get(i)
                .ok_or_else(|| Error::invalid(format!("{w}: a chunk lacks this source")))?;
            if p.len > 0 {
                crc = crc32c::crc32c_combine(crc, p.crc, p.len as usize);
            }
            len += p.len;
            records = records.saturating_add(p.records);
            trailer = p.trailer.or(trailer);
        }
        let mismatch = || {
            Error::corruption(format!(
                "{w}: stored file does not match its manifest checksum (backup {})",
                src.backup
            ))
        };
        match src.stored {
            Stored::Plain | Stored::Lz4 { .. } => {
                if len != src.stored_size || crc != src.crc32c {
                    return Err(mismatch());
                }
            }
            Stored::Inc { info, .. } => {
                let t = trailer.ok_or_else(|| Error::corruption(format!("{w}: no trailer")))?;
                let stored = u32::from_le_bytes([t[12], t[13], t[14], t[15]]);
                if stored != crc {
                    return Err(Error::corruption(format!(
                        "{w}: checksum mismatch (stored {stored:08x}, computed {crc:08x})"
                    )));
                }
                if len + 4 != src.stored_size || !incfile::manifest_crc_ok(src.crc32c, crc) {
                    return Err(mismatch());
                }
                let got = incfile::parse_trailer(&t);
                if got.nblocks != records {
                    return Err(Error::corruption(format!(
                        "{w}: trailer says {} blocks, found {records}",
                        got.nblocks
                    )));
                }
                if got.file_blocks != info.file_blocks || got.limit_block != info.limit_block {
                    return Err(Error::corruption(format!(
                        "{w}: trailer ({} blocks, limit {:?}) disagrees with the manifest ({} blocks, limit {:?}) (backup {})",
                        got.file_blocks, got.limit_block, info.file_blocks, info.limit_block, src.backup
                    )));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc_parts_combine_to_the_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = crc32c::crc32c(&data);
        for cuts in [vec![0usize, 10_000], vec![0, 1, 4096, 9999, 10_000]] {
            let mut crc = 0u32;
            for w in cuts.windows(2) {
                let part = &data[w[0]..w[1]];
                crc = crc32c::crc32c_combine(crc, crc32c::crc32c(part), part.len());
            }
            assert_eq!(crc, whole);
        }
    }

    /// Stored files are opened below their backup directory without following links: a
    /// stored file that is a symlink, or a `database/base` that is one, is refused and
    /// nothing of the link's target is read.
    #[test]
    fn stored_files_behind_symlinks_are_refused() {
        use super::*;
        let d = tempfile::tempdir().unwrap();
        let bdir = d.path().join("B1");
        std::fs::create_dir_all(bdir.join("database/base/5")).unwrap();
        let page = vec![7u8; 8192];
        std::fs::write(bdir.join("database/base/5/1"), &page).unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, vec![9u8; 8192]).unwrap();
        std::os::unix::fs::symlink(&secret, bdir.join("database/base/5/2")).unwrap();
        // a second backup whose database/base is a link to the first one's
        let b2 = d.path().join("B2");
        std::fs::create_dir_all(b2.join("database")).unwrap();
        std::os::unix::fs::symlink(bdir.join("database/base"), b2.join("database/base")).unwrap();
        let repo: Arc<dyn Repo> = Arc::new(crate::repo::LocalRepo::open(d.path()).unwrap());
        let src = |dir: &Path, rel: &str| Source {
            repo: repo.clone(),
            key: format!("{}/{rel}", dir.file_name().unwrap().to_str().unwrap()),
            backup: "B".into(),
            stored: Stored::Plain,
            size: 8192,
            stored_size: 8192,
            crc32c: crc32c::crc32c(&page),
            cap: u32::MAX,
        };
        let restore = |s: Source| -> Result<Vec<u8>> {
            let plan = Plan::new(Shape::Copy, vec![s], 8192, 16, 4);
            let dest = d.path().join("out");
            let out = File::create(&dest).unwrap();
            let parts = run_chunk(&plan, 0, &out, &dest, &crate::progress::NoProgress)?;
            finish(&plan, &[parts], &out, &dest)?;
            Ok(std::fs::read(&dest).unwrap())
        };
        assert_eq!(restore(src(&bdir, "database/base/5/1")).unwrap(), page);
        for (dir, rel) in [(&bdir, "database/base/5/2"), (&b2, "database/base/5/1")] {
            let e = restore(src(dir, rel)).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corruption, "{rel}: {e}");
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        let e = crate::backup::stored::inc_info(&*repo, "B1/database/base/5/2", 8192).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corruption, "{e}");
    }
}
