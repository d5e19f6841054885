//! A small WAL *writer* for tests and fuzzing: lays records out on pages exactly as
//! PostgreSQL does (MAXALIGN starts, page headers, continuation flags, CRC-32C), so that
//! edge cases real servers rarely produce on demand (overwritten continuations, bad CRCs,
//! stale tails, custom resource managers) can be built byte for byte.

use crate::types::{Lsn, PgVersion};
use crate::wal::record::{RelFileLocator, SIZE_OF_XLOG_RECORD};
use crate::wal::{
    SIZE_OF_LONG_PHD, SIZE_OF_SHORT_PHD, XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLP_LONG_HEADER,
};

/// One block reference to encode.
#[derive(Clone, Debug, Default)]
pub struct SynthBlock {
    pub rel: RelFileLocator,
    pub fork: u8,
    pub blkno: u32,
    pub data: Vec<u8>,
    /// A full 8192-byte image without a hole.
    pub image: bool,
    pub will_init: bool,
}

/// One record to encode.
#[derive(Clone, Debug, Default)]
pub struct SynthRecord {
    pub rmid: u8,
    pub info: u8,
    pub xid: u32,
    pub blocks: Vec<SynthBlock>,
    pub main_data: Vec<u8>,
}

impl SynthRecord {
    /// The record's bytes, with `xl_prev` and a correct CRC.
    pub fn encode(&self, version: PgVersion, prev: Lsn) -> Vec<u8> {
        let apply = if version >= PgVersion::V15 {
            0x02
        } else {
            0x04
        };
        let mut hdrs = Vec::new();
        let mut payload = Vec::new();
        let mut last_rel = None;
        for (i, b) in self.blocks.iter().enumerate() {
            let mut flags = b.fork & 0x0F;
            if b.image {
                flags |= 0x10;
            }
            if !b.data.is_empty() {
                flags |= 0x20;
            }
            if b.will_init {
                flags |= 0x40;
            }
            if last_rel == Some(b.rel) {
                flags |= 0x80;
            }
            hdrs.push(i as u8);
            hdrs.push(flags);
            hdrs.extend_from_slice(&(b.data.len() as u16).to_le_bytes());
            if b.image {
                hdrs.extend_from_slice(&8192u16.to_le_bytes());
                hdrs.extend_from_slice(&0u16.to_le_bytes());
                hdrs.push(apply);
                payload.extend(std::iter::repeat_n(0xA5u8, 8192));
            }
            if last_rel != Some(b.rel) {
                hdrs.extend_from_slice(&b.rel.spc.to_le_bytes());
                hdrs.extend_from_slice(&b.rel.db.to_le_bytes());
                hdrs.extend_from_slice(&b.rel.rel.to_le_bytes());
                last_rel = Some(b.rel);
            }
            hdrs.extend_from_slice(&b.blkno.to_le_bytes());
            payload.extend_from_slice(&b.data);
        }
        if !self.main_data.is_empty() {
            if self.main_data.len() < 256 {
                hdrs.push(255);
                hdrs.push(self.main_data.len() as u8);
            } else {
                hdrs.push(254);
                hdrs.extend_from_slice(&(self.main_data.len() as u32).to_le_bytes());
            }
            payload.extend_from_slice(&self.main_data);
        }
        let tot = SIZE_OF_XLOG_RECORD + hdrs.len() + payload.len();
        let mut r = Vec::with_capacity(tot);
        r.extend_from_slice(&(tot as u32).to_le_bytes());
        r.extend_from_slice(&self.xid.to_le_bytes());
        r.extend_from_slice(&prev.0.to_le_bytes());
        r.push(self.info);
        r.push(self.rmid);
        r.extend_from_slice(&[0, 0]);
        r.extend_from_slice(&[0, 0, 0, 0]);
        r.extend_from_slice(&hdrs);
        r.extend_from_slice(&payload);
        let crc = crate::wal::record::record_crc(&r).unwrap_or(0);
        r[20..24].copy_from_slice(&crc.to_le_bytes());
        r
    }
}

/// A WAL stream under construction, starting at a segment boundary.
pub struct SynthWal {
    pub version: PgVersion,
    pub seg_size: u32,
    pub page_size: u32,
    pub system_id: u64,
    pub tli: u32,
    pub start: Lsn,
    buf: Vec<u8>,
    prev: Lsn,
    /// Flags to add to the next page header written (e.g. overwrite-contrecord).
    next_page_flags: u16,
}

impl SynthWal {
    pub fn new(version: PgVersion, seg_size: u32, page_size: u32, start_segno: u64) -> SynthWal {
        SynthWal {
            version,
            seg_size,
            page_size,
            system_id: 7_000_000_000_000_000_001,
            tli: 1,
            start: Lsn(start_segno * seg_size as u64),
            buf: Vec::new(),
            prev: Lsn(0),
            next_page_flags: 0,
        }
    }

    /// Position of the next byte to be written.
    pub fn pos(&self) -> Lsn {
        Lsn(self.start.0 + self.buf.len() as u64)
    }

    /// The stream's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Mutable access for tests that damage bytes.
    pub fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    fn page_header(&mut self, rem_len: u32) {
        let lsn = self.pos();
        let long = lsn.0.is_multiple_of(self.seg_size as u64);
        let mut info: u16 = if rem_len > 0 {
            XLP_FIRST_IS_CONTRECORD
        } else {
            0
        };
        info |= std::mem::take(&mut self.next_page_flags);
        if long {
            info |= XLP_LONG_HEADER;
        }
        self.buf
            .extend_from_slice(&self.version.page_magic().to_le_bytes());
        self.buf.extend_from_slice(&info.to_le_bytes());
        self.buf.extend_from_slice(&self.tli.to_le_bytes());
        self.buf.extend_from_slice(&lsn.0.to_le_bytes());
        self.buf.extend_from_slice(&rem_len.to_le_bytes());
        self.buf.extend_from_slice(&[0, 0, 0, 0]);
        if long {
            self.buf.extend_from_slice(&self.system_id.to_le_bytes());
            self.buf.extend_from_slice(&self.seg_size.to_le_bytes());
            self.buf.extend_from_slice(&self.page_size.to_le_bytes());
        }
        debug_assert!(
            self.buf.len() as u64 % self.page_size as u64
                == if long {
                    SIZE_OF_LONG_PHD
                } else {
                    SIZE_OF_SHORT_PHD
                } as u64
        );
    }

    fn at_page_start(&self) -> bool {
        self.pos().0.is_multiple_of(self.page_size as u64)
    }

    /// Writes record bytes, stopping after `limit` bytes (to model a record cut short).
    fn lay_out(&mut self, rec: &[u8], limit: usize) {
        let pad = (self.pos().align8().0 - self.pos().0) as usize;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        if self.at_page_start() {
            self.page_header(0);
        }
        let mut done = 0;
        while done < rec.len().min(limit) {
            if self.at_page_start() {
                self.page_header((rec.len() - done) as u32);
            }
            let page_left = (self.page_size as u64 - self.pos().0 % self.page_size as u64) as usize;
            let n = page_left.min(rec.len().min(limit) - done);
            self.buf.extend_from_slice(&rec[done..done + n]);
            done += n;
        }
    }

    /// Appends a record; returns its start LSN.
    pub fn push(&mut self, r: &SynthRecord) -> Lsn {
        let bytes = r.encode(self.version, self.prev);
        self.push_encoded(&bytes)
    }

    /// Appends already encoded record bytes (their `xl_prev` and CRC as given).
    pub fn push_encoded(&mut self, bytes: &[u8]) -> Lsn {
        let pad = (self.pos().align8().0 - self.pos().0) as usize;
        let mut start = Lsn(self.pos().0 + pad as u64);
        if start.0.is_multiple_of(self.page_size as u64) {
            start.0 += if start.0.is_multiple_of(self.seg_size as u64) {
                SIZE_OF_LONG_PHD
            } else {
                SIZE_OF_SHORT_PHD
            } as u64;
        }
        self.lay_out(bytes, usize::MAX);
        self.prev = start;
        start
    }

    /// Writes the first page's worth of a record and stops, as a crash would; the next
    /// page gets `XLP_FIRST_IS_OVERWRITE_CONTRECORD`. Returns the aborted record's start.
    pub fn push_aborted(&mut self, r: &SynthRecord) -> Lsn {
        let bytes = r.encode(self.version, self.prev);
        let pad = (self.pos().align8().0 - self.pos().0) as usize;
        let start = Lsn(self.pos().0 + pad as u64);
        let page_left = (self.page_size as u64 - start.0 % self.page_size as u64) as usize;
        assert!(bytes.len() > page_left, "record must cross a page");
        self.lay_out(&bytes, page_left);
        self.next_page_flags = XLP_FIRST_IS_OVERWRITE_CONTRECORD;
        self.prev = start;
        start
    }

    /// Pads with zeros to the end of the current segment.
    pub fn zero_to_segment_end(&mut self) {
        let seg = self.seg_size as u64;
        let end = self.pos().0.div_ceil(seg) * seg;
        let n = (end - self.pos().0) as usize;
        self.buf.extend(std::iter::repeat_n(0u8, n));
    }

    /// Pads with zeros to the end of the current page.
    pub fn zero_to_page_end(&mut self) {
        let p = self.page_size as u64;
        let end = self.pos().0.div_ceil(p) * p;
        let n = (end - self.pos().0) as usize;
        self.buf.extend(std::iter::repeat_n(0u8, n));
    }
}
