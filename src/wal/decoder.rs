//! The streaming WAL decoder: page headers, record reassembly, CRC, end-of-WAL detection.
//!
//! Bytes go in with [`WalStreamDecoder::feed_bytes`] (any chunking) and records come out of
//! [`WalStreamDecoder::poll_decode`]; `Ok(None)` means "feed more", unless
//! [`WalStreamDecoder::end_of_wal`] says the WAL ended. [`WalStreamDecoder::decode_all`]
//! does the same over a borrowed buffer without copying it (the path used for whole
//! segments).
//!
//! End of WAL is not an error: reading stops, like `pg_waldump`, at the first position that
//! is not a valid record, and [`EndOfWal`] says why. [`EndReason::is_clean`] separates the
//! normal ends (zeros, a recycled page, a stale record whose `xl_prev` does not chain) from
//! the suspicious ones (a CRC mismatch or an invalid header on a record that chains
//! correctly): callers that read complete archived segments treat the latter as corruption
//! (the indexer does). Structural errors in a record whose CRC is valid, unknown page
//! magic, a page of another system or timeline going backwards are `Err`s naming the LSN.
//!
//! Records that lie on one page are decoded in place; only records that cross a page
//! boundary are copied, once, into a reassembly buffer that grows geometrically (a 60 MB
//! record costs one copy plus amortised growth).

#![deny(clippy::indexing_slicing)]

use crate::error::{Error, Result};
use crate::types::{valid_segment_size, Lsn, PgVersion, TimeLineId};
use crate::wal::record::{
    decode_record, le_u32, le_u64, record_crc, rmgr, xlog_info, BlockRef, DecodedRecord,
    RecordMeta, MAX_RECORD_LEN, SIZE_OF_XLOG_RECORD,
};
use crate::wal::version::{table, VersionTable};
use crate::wal::{
    parse_page_header, PageHeader, SIZE_OF_LONG_PHD, SIZE_OF_SHORT_PHD, XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLP_LONG_HEADER,
};

/// Stream parameters, learnt from the first long page header or given up front.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalParams {
    pub version: PgVersion,
    pub seg_size: u32,
    pub page_size: u32,
    pub system_id: u64,
}

/// Why decoding stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// Zeros where a record or page header should be: never-written space.
    Zeroed,
    /// A page whose `xlp_pageaddr` is not its own position: an old page of a recycled
    /// segment.
    StalePage { found: Lsn },
    /// A record header that does not chain to the previous record (`xl_prev`), or that
    /// cannot be a record: leftover bytes of a recycled segment.
    StaleRecord { detail: String },
    /// A record whose header chains correctly but whose CRC does not match: a torn write
    /// at the very end of WAL, or corruption.
    CrcMismatch { expected: u32, computed: u32 },
    /// A record header that chains correctly but is otherwise invalid.
    InvalidRecord { detail: String },
    /// The caller stopped [`WalStreamDecoder::decode_all`] early.
    Stopped,
}

impl EndReason {
    /// Whether this is how WAL normally ends (zeros or recycled leftovers). The others mean
    /// the last record is damaged: a torn write after a crash, or corruption.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            EndReason::Zeroed
                | EndReason::StalePage { .. }
                | EndReason::StaleRecord { .. }
                | EndReason::Stopped
        )
    }
}

/// Where and why decoding stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndOfWal {
    /// Position of the first byte that is not valid WAL (a record or page start).
    pub lsn: Lsn,
    pub reason: EndReason,
}

impl std::fmt::Display for EndOfWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            EndReason::Zeroed => write!(f, "end of WAL at {} (zeroed space)", self.lsn),
            EndReason::StalePage { found } => write!(
                f,
                "end of WAL at {}: page address is {found} (a recycled page)",
                self.lsn
            ),
            EndReason::StaleRecord { detail } => {
                write!(f, "end of WAL at {}: {detail}", self.lsn)
            }
            EndReason::CrcMismatch { expected, computed } => write!(
                f,
                "incorrect CRC of the WAL record at {}: stored {expected:08X}, computed {computed:08X}",
                self.lsn
            ),
            EndReason::InvalidRecord { detail } => {
                write!(f, "invalid WAL record at {}: {detail}", self.lsn)
            }
            EndReason::Stopped => write!(f, "decoding stopped at {}", self.lsn),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The next byte starts a record (or a page header, at a page boundary).
    RecordStart,
    /// Skipping the tail of a record that began before the start position.
    SkipContinuation {
        remaining: u32,
    },
    /// Copying a page-crossing record into `rec`.
    InRecord,
    /// After `XLOG_SWITCH`: the rest of the segment is unused.
    SkipToSegmentEnd,
    Ended,
}

/// Where the bytes of a decoded record are.
enum Src {
    /// `tot_len` bytes in the input, at this offset.
    Input(usize),
    /// In the reassembly buffer.
    Rec,
}

enum Step {
    NeedMore,
    Ended,
    /// A record is complete; its description is in `meta`.
    Record(Src),
}

/// A sans-IO streaming decoder for PostgreSQL 13–18 WAL.
pub struct WalStreamDecoder {
    params: Option<WalParams>,
    vt: Option<&'static VersionTable>,
    /// Copies of the parameters' sizes (0 until known), read on every step.
    page_size: u64,
    seg_size: u64,
    blcksz: u32,
    /// Stream position of the next unconsumed byte.
    lsn: Lsn,
    start_lsn: Lsn,
    inbuf: Vec<u8>,
    inpos: usize,
    state: State,
    /// Start of the last record returned; `None` right after a (re)start.
    prev_lsn: Option<Lsn>,
    last_tli: TimeLineId,
    /// The page whose header has been consumed (the page start LSN).
    header_done: Option<Lsn>,
    /// Alignment padding still to skip before the next record.
    pad: usize,
    /// Whether the next page header is the first one seen (a mismatch is then an error).
    first_page: bool,
    rec: Vec<u8>,
    rec_lsn: Lsn,
    rec_tot: u32,
    rec_hdr_checked: bool,
    blocks: Vec<BlockRef>,
    meta: RecordMeta,
    end: Option<EndOfWal>,
    records: u64,
}

impl WalStreamDecoder {
    /// A decoder starting at a segment boundary; segment size, page size, version and
    /// system identifier are taken from the first long page header. If that page begins
    /// with the continuation of an earlier record, those bytes are skipped.
    pub fn new(start_lsn: Lsn) -> WalStreamDecoder {
        WalStreamDecoder {
            params: None,
            vt: None,
            page_size: 0,
            seg_size: 0,
            blcksz: 8192,
            lsn: start_lsn,
            start_lsn,
            inbuf: Vec::new(),
            inpos: 0,
            state: State::RecordStart,
            prev_lsn: None,
            last_tli: 0,
            header_done: None,
            pad: 0,
            first_page: true,
            rec: Vec::new(),
            rec_lsn: Lsn(0),
            rec_tot: 0,
            rec_hdr_checked: false,
            blocks: Vec::with_capacity(33),
            meta: RecordMeta::default(),
            end: None,
            records: 0,
        }
    }

    /// A decoder starting anywhere: at a page boundary (a continuation is then skipped) or
    /// at the start of a record inside a page, with known stream parameters.
    pub fn with_params(start_lsn: Lsn, params: WalParams) -> Result<WalStreamDecoder> {
        if !valid_segment_size(params.seg_size)
            || !params.page_size.is_power_of_two()
            || params.page_size < 1024
            || params.page_size > params.seg_size
        {
            return Err(Error::invalid(format!(
                "invalid WAL parameters: segment size {}, page size {}",
                params.seg_size, params.page_size
            )));
        }
        let mut d = WalStreamDecoder::new(start_lsn);
        d.params = Some(params);
        d.vt = Some(table(params.version));
        d.page_size = params.page_size as u64;
        d.seg_size = params.seg_size as u64;
        let off = start_lsn.0 % params.page_size as u64;
        if off != 0 {
            if off < SIZE_OF_SHORT_PHD as u64 || !start_lsn.0.is_multiple_of(8) {
                return Err(Error::invalid(format!(
                    "{start_lsn} is not a possible record start"
                )));
            }
            d.header_done = Some(Lsn(start_lsn.0 - off));
            d.first_page = false;
        }
        Ok(d)
    }

    /// Size of database pages (`BLCKSZ`), used to check full-page-image headers.
    pub fn set_block_size(&mut self, blcksz: u32) {
        self.blcksz = blcksz;
    }

    pub fn params(&self) -> Option<WalParams> {
        self.params
    }

    /// Stream position of the next byte the decoder wants.
    pub fn position(&self) -> Lsn {
        self.lsn
    }

    pub fn start_lsn(&self) -> Lsn {
        self.start_lsn
    }

    /// Why the WAL ended, once it has.
    pub fn end_of_wal(&self) -> Option<&EndOfWal> {
        self.end.as_ref()
    }

    /// Start of the record being reassembled, if one is only partly received.
    pub fn partial_record_lsn(&self) -> Option<Lsn> {
        match self.state {
            State::InRecord => Some(self.rec_lsn),
            _ => None,
        }
    }

    /// Number of records returned so far.
    pub fn records_decoded(&self) -> u64 {
        self.records
    }

    /// Appends bytes of the stream (continuing where the previous call stopped).
    pub fn feed_bytes(&mut self, data: &[u8]) {
        if self.state == State::Ended {
            return;
        }
        if self.inpos > 0 {
            self.inbuf.drain(..self.inpos);
            self.inpos = 0;
        }
        self.inbuf.extend_from_slice(data);
    }

    /// The next record, `Ok(None)` when more bytes are needed or the WAL ended.
    pub fn poll_decode(&mut self) -> Result<Option<DecodedRecord<'_>>> {
        let buf = std::mem::take(&mut self.inbuf);
        let mut pos = self.inpos;
        let r = self.step(&buf, &mut pos);
        self.inbuf = buf;
        self.inpos = pos;
        match r? {
            Step::NeedMore | Step::Ended => Ok(None),
            Step::Record(Src::Input(at)) => {
                let bytes = self
                    .inbuf
                    .get(at..at + self.meta.tot_len as usize)
                    .unwrap_or(&[]);
                Ok(Some(DecodedRecord::from_meta(
                    &self.meta,
                    bytes,
                    &self.blocks,
                )))
            }
            Step::Record(Src::Rec) => Ok(Some(DecodedRecord::from_meta(
                &self.meta,
                &self.rec,
                &self.blocks,
            ))),
        }
    }

    /// Decodes every record in `data` (the continuation of the stream), calling `f` for
    /// each; `f` returns `Ok(false)` to stop (the decoder then ends with
    /// [`EndReason::Stopped`]). Bytes of an incomplete trailing record are kept for the
    /// next call. Records are decoded in place when `data` is the whole rest of the input.
    pub fn decode_all(
        &mut self,
        data: &[u8],
        mut f: impl FnMut(&DecodedRecord<'_>) -> Result<bool>,
    ) -> Result<()> {
        if self.state == State::Ended {
            return Ok(());
        }
        if self.inpos < self.inbuf.len() {
            self.feed_bytes(data);
            loop {
                let rec = match self.poll_decode()? {
                    Some(r) => r,
                    None => return Ok(()),
                };
                if !f(&rec)? {
                    let lsn = rec.end_lsn;
                    self.stop(lsn);
                    return Ok(());
                }
            }
        }
        self.inbuf.clear();
        self.inpos = 0;
        let mut pos = 0usize;
        loop {
            match self.step(data, &mut pos)? {
                Step::NeedMore => {
                    self.inbuf.extend_from_slice(data.get(pos..).unwrap_or(&[]));
                    return Ok(());
                }
                Step::Ended => return Ok(()),
                Step::Record(src) => {
                    let tot = self.meta.tot_len as usize;
                    let rec = match src {
                        Src::Input(at) => DecodedRecord::from_meta(
                            &self.meta,
                            data.get(at..at + tot).unwrap_or(&[]),
                            &self.blocks,
                        ),
                        Src::Rec => DecodedRecord::from_meta(&self.meta, &self.rec, &self.blocks),
                    };
                    if !f(&rec)? {
                        let lsn = rec.end_lsn;
                        self.stop(lsn);
                        return Ok(());
                    }
                }
            }
        }
    }

    fn stop(&mut self, lsn: Lsn) {
        self.state = State::Ended;
        self.end = Some(EndOfWal {
            lsn,
            reason: EndReason::Stopped,
        });
        self.inbuf = Vec::new();
        self.inpos = 0;
    }

    fn finish(&mut self, lsn: Lsn, reason: EndReason) -> Result<Step> {
        self.state = State::Ended;
        self.end = Some(EndOfWal { lsn, reason });
        Ok(Step::Ended)
    }

    fn corrupt(&self, lsn: Lsn, what: impl std::fmt::Display) -> Error {
        Error::corruption(format!("invalid WAL at {lsn}: {what}"))
    }

    /// Advances over `input[*pos..]` until a record is complete, more input is needed, or
    /// the WAL ends. `input[*pos]` is the byte at `self.lsn`.
    fn step(&mut self, input: &[u8], pos: &mut usize) -> Result<Step> {
        loop {
            if self.state == State::Ended {
                return Ok(Step::Ended);
            }
            let avail = input.len().saturating_sub(*pos);
            if self.pad > 0 {
                let n = self.pad.min(avail);
                *pos += n;
                self.lsn.0 += n as u64;
                self.pad -= n;
                if self.pad > 0 {
                    return Ok(Step::NeedMore);
                }
                continue;
            }
            if self.state == State::SkipToSegmentEnd {
                let seg = self.seg_size.max(1);
                let left = (seg - self.lsn.0 % seg) % seg;
                if left == 0 {
                    self.state = State::RecordStart;
                    continue;
                }
                let n = (left as usize).min(avail);
                *pos += n;
                self.lsn.0 += n as u64;
                if (n as u64) < left {
                    return Ok(Step::NeedMore);
                }
                self.state = State::RecordStart;
                continue;
            }
            let page_size = self.page_size;
            // Sizes are powers of two: masks, not divisions, on this hot path.
            let at_page_start = page_size == 0 || self.lsn.0 & (page_size - 1) == 0;
            if at_page_start && self.header_done != Some(self.lsn) {
                match self.page_header(input, pos)? {
                    Some(s) => return Ok(s),
                    None => continue,
                }
            }
            let page_size = self.page_size;
            if page_size == 0 {
                return Err(self.corrupt(self.lsn, "no page header read yet"));
            }
            let page_left = (page_size - (self.lsn.0 & (page_size - 1))) as usize;
            let input_here = input.get(*pos..).unwrap_or(&[]);
            match self.state {
                State::SkipContinuation { remaining } => {
                    let n = (remaining as usize).min(page_left).min(avail);
                    if n == 0 {
                        return Ok(Step::NeedMore);
                    }
                    *pos += n;
                    self.lsn.0 += n as u64;
                    let remaining = remaining - n as u32;
                    if remaining == 0 {
                        self.state = State::RecordStart;
                        self.pad = (self.lsn.align8().0 - self.lsn.0) as usize;
                    } else {
                        self.state = State::SkipContinuation { remaining };
                    }
                }
                State::RecordStart => {
                    if avail < 4 {
                        return Ok(Step::NeedMore);
                    }
                    let tot = le_u32(input_here, 0).unwrap_or(0);
                    if tot == 0 {
                        return self.finish(self.lsn, EndReason::Zeroed);
                    }
                    if page_left >= SIZE_OF_XLOG_RECORD {
                        if avail < SIZE_OF_XLOG_RECORD {
                            return Ok(Step::NeedMore);
                        }
                        if let Some(reason) = self.check_header(input_here, self.lsn) {
                            return self.finish(self.lsn, reason);
                        }
                    } else if (tot as usize) < SIZE_OF_XLOG_RECORD {
                        return self.finish(
                            self.lsn,
                            EndReason::StaleRecord {
                                detail: format!("invalid record length {tot}"),
                            },
                        );
                    }
                    let t = tot as usize;
                    if t <= page_left {
                        // The whole record is on this page: decode it in place.
                        if avail < t {
                            return Ok(Step::NeedMore);
                        }
                        let start = *pos;
                        let lsn = self.lsn;
                        let end = Lsn(lsn.0 + t as u64);
                        // Skip the alignment padding now when it is there (it never
                        // crosses a page).
                        let pad = (end.align8().0 - end.0) as usize;
                        let now = pad.min(avail - t);
                        *pos += t + now;
                        self.lsn.0 = end.0 + now as u64;
                        self.pad = pad - now;
                        let bytes = input.get(start..start + t).unwrap_or(&[]);
                        return self.complete(bytes, lsn, end, Src::Input(start));
                    }
                    if self.rec.capacity() > (64 << 20) {
                        self.rec = Vec::new();
                    }
                    self.rec.clear();
                    self.rec_lsn = self.lsn;
                    self.rec_tot = tot;
                    self.rec_hdr_checked = page_left >= SIZE_OF_XLOG_RECORD;
                    self.state = State::InRecord;
                }
                State::InRecord => {
                    let want = (self.rec_tot as usize - self.rec.len()).min(page_left);
                    let n = want.min(avail);
                    if n == 0 {
                        return Ok(Step::NeedMore);
                    }
                    self.rec
                        .extend_from_slice(input_here.get(..n).unwrap_or(&[]));
                    *pos += n;
                    self.lsn.0 += n as u64;
                    if !self.rec_hdr_checked && self.rec.len() >= SIZE_OF_XLOG_RECORD {
                        self.rec_hdr_checked = true;
                        let rec = std::mem::take(&mut self.rec);
                        let bad = self.check_header(&rec, self.rec_lsn);
                        self.rec = rec;
                        if let Some(reason) = bad {
                            return self.finish(self.rec_lsn, reason);
                        }
                    }
                    if self.rec.len() == self.rec_tot as usize {
                        self.state = State::RecordStart;
                        self.pad = (self.lsn.align8().0 - self.lsn.0) as usize;
                        let rec = std::mem::take(&mut self.rec);
                        let r = self.complete(&rec, self.rec_lsn, self.lsn, Src::Rec);
                        self.rec = rec;
                        return r;
                    }
                }
                State::SkipToSegmentEnd | State::Ended => {}
            }
        }
    }

    /// Validates the fixed header of the record at `lsn` (`ValidXLogRecordHeader`).
    /// `None` if it is valid, else why reading stops there.
    #[inline]
    fn check_header(&self, h: &[u8], lsn: Lsn) -> Option<EndReason> {
        let tot = le_u32(h, 0)?;
        let prev = Lsn(le_u64(h, 8)?);
        let rmid = *h.get(17)?;
        let chains = match self.prev_lsn {
            Some(p) => prev == p,
            None => prev < lsn,
        };
        if !chains {
            return Some(EndReason::StaleRecord {
                detail: format!(
                    "record with incorrect prev-link {prev}{}",
                    match self.prev_lsn {
                        Some(p) => format!(" (expected {p})"),
                        None => String::new(),
                    }
                ),
            });
        }
        if (tot as usize) < SIZE_OF_XLOG_RECORD || tot > MAX_RECORD_LEN {
            return Some(EndReason::InvalidRecord {
                detail: format!("invalid record length {tot}"),
            });
        }
        let custom_ok = self.vt.is_some_and(|v| v.custom_rmgrs);
        if rmid > rmgr::MAX_BUILTIN && !(custom_ok && rmid >= rmgr::MIN_CUSTOM) {
            return Some(EndReason::InvalidRecord {
                detail: format!("invalid resource manager ID {rmid}"),
            });
        }
        None
    }

    /// A record's bytes are all there: check its CRC and decode it.
    #[inline]
    fn complete(&mut self, bytes: &[u8], lsn: Lsn, end_lsn: Lsn, src: Src) -> Result<Step> {
        let expected = le_u32(bytes, 20).unwrap_or(0);
        let computed = record_crc(bytes).unwrap_or(!expected);
        if computed != expected {
            self.pad = 0;
            return self.finish(lsn, EndReason::CrcMismatch { expected, computed });
        }
        let vt = match self.vt {
            Some(v) => v,
            None => return Err(self.corrupt(lsn, "record before any page header")),
        };
        decode_record(
            bytes,
            lsn,
            end_lsn,
            vt,
            self.blcksz,
            &mut self.blocks,
            &mut self.meta,
        )?;
        self.prev_lsn = Some(lsn);
        self.records += 1;
        if self.meta.rmid == rmgr::XLOG && self.meta.info & 0xF0 == xlog_info::SWITCH {
            self.state = State::SkipToSegmentEnd;
            self.pad = 0;
        }
        Ok(Step::Record(src))
    }

    /// Reads and checks the page header at `self.lsn` (a page boundary). `Some(step)` to
    /// return to the caller, `None` to go on.
    fn page_header(&mut self, input: &[u8], pos: &mut usize) -> Result<Option<Step>> {
        let here = input.get(*pos..).unwrap_or(&[]);
        let seg_start = match self.params {
            Some(p) => self.lsn.0.is_multiple_of(p.seg_size as u64),
            None => true,
        };
        let need = if seg_start {
            SIZE_OF_LONG_PHD
        } else {
            SIZE_OF_SHORT_PHD
        };
        if here.len() < SIZE_OF_SHORT_PHD {
            return Ok(Some(Step::NeedMore));
        }
        if here.iter().take(SIZE_OF_SHORT_PHD).all(|&b| b == 0) {
            if self.first_page {
                return Err(self.corrupt(self.lsn, "the first page is all zeros"));
            }
            return self.finish(self.lsn, EndReason::Zeroed).map(Some);
        }
        let h: PageHeader =
            parse_page_header(here).ok_or_else(|| self.corrupt(self.lsn, "short page header"))?;
        let long = h.info & XLP_LONG_HEADER != 0;
        if long && here.len() < SIZE_OF_LONG_PHD {
            return Ok(Some(Step::NeedMore));
        }
        // Learn the stream parameters from the first long header.
        if self.params.is_none() {
            let lh = crate::wal::read_long_header(here)
                .map_err(|e| e.context(format!("WAL page at {}", self.lsn)))?;
            if !self.lsn.0.is_multiple_of(lh.seg_size as u64) {
                return Err(Error::invalid(format!(
                    "decoding must start at a segment boundary; {} is not one for {} byte segments",
                    self.lsn, lh.seg_size
                )));
            }
            let version = PgVersion::from_page_magic(lh.magic).ok_or_else(|| {
                self.corrupt(self.lsn, format!("unknown page magic {:#06X}", lh.magic))
            })?;
            self.params = Some(WalParams {
                version,
                seg_size: lh.seg_size,
                page_size: lh.page_size,
                system_id: lh.system_id,
            });
            self.vt = Some(table(version));
            self.page_size = lh.page_size as u64;
            self.seg_size = lh.seg_size as u64;
        }
        let p = match self.params {
            Some(p) => p,
            None => return Err(self.corrupt(self.lsn, "no stream parameters")),
        };
        if h.magic != p.version.page_magic() {
            return Err(self.corrupt(
                self.lsn,
                format!(
                    "page magic {:#06X} is not PostgreSQL {}'s {:#06X}",
                    h.magic,
                    p.version,
                    p.version.page_magic()
                ),
            ));
        }
        if h.info & !crate::wal::XLP_ALL_FLAGS != 0 {
            return Err(self.corrupt(self.lsn, format!("invalid page info bits {:#06X}", h.info)));
        }
        if h.pageaddr != self.lsn {
            if self.first_page {
                return Err(self.corrupt(
                    self.lsn,
                    format!(
                        "page address is {}: these bytes are not the WAL at this position",
                        h.pageaddr
                    ),
                ));
            }
            return self
                .finish(self.lsn, EndReason::StalePage { found: h.pageaddr })
                .map(Some);
        }
        if long != seg_start {
            return Err(self.corrupt(
                self.lsn,
                if seg_start {
                    "the first page of a segment lacks the long header"
                } else {
                    "long page header in the middle of a segment"
                },
            ));
        }
        if need > here.len() {
            return Ok(Some(Step::NeedMore));
        }
        if long {
            let lh = crate::wal::read_long_header(here)
                .map_err(|e| e.context(format!("WAL page at {}", self.lsn)))?;
            if lh.system_id != p.system_id {
                return Err(self.corrupt(
                    self.lsn,
                    format!(
                        "WAL file is from a different database system: identifier {}, expected {}",
                        lh.system_id, p.system_id
                    ),
                ));
            }
            if lh.seg_size != p.seg_size || lh.page_size != p.page_size {
                return Err(self.corrupt(
                    self.lsn,
                    format!(
                        "segment size {} / page size {} differ from the stream's {} / {}",
                        lh.seg_size, lh.page_size, p.seg_size, p.page_size
                    ),
                ));
            }
        }
        if h.tli < self.last_tli {
            return Err(self.corrupt(
                self.lsn,
                format!(
                    "timeline {} goes back (previous page: {})",
                    h.tli, self.last_tli
                ),
            ));
        }
        let first = self.first_page;
        let page_lsn = self.lsn;
        let contrec = h.info & XLP_FIRST_IS_CONTRECORD != 0;
        let overwrite = h.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0;
        match self.state {
            State::RecordStart if contrec => {
                if first && h.rem_len == 0 {
                    // Nothing to skip.
                } else if first {
                    self.state = State::SkipContinuation {
                        remaining: h.rem_len,
                    };
                } else {
                    return Err(self.corrupt(
                        page_lsn,
                        "page continues a record, but the previous record ended before it",
                    ));
                }
            }
            State::RecordStart => {}
            State::SkipContinuation { remaining } => {
                if overwrite {
                    self.state = State::RecordStart;
                    self.prev_lsn = None;
                } else if !contrec || h.rem_len != remaining {
                    return Err(self.corrupt(
                        page_lsn,
                        format!(
                            "continuation of {remaining} bytes expected, page has flags {:#06X} and remaining length {}",
                            h.info, h.rem_len
                        ),
                    ));
                }
            }
            State::InRecord => {
                if overwrite {
                    // The record was never completed; PostgreSQL wrote an
                    // XLOG_OVERWRITE_CONTRECORD here after a crash. Drop it and restart.
                    log::debug!(
                        "record at {} was overwritten at {page_lsn}; dropping it",
                        self.rec_lsn
                    );
                    self.rec.clear();
                    self.state = State::RecordStart;
                    self.prev_lsn = None;
                } else {
                    let left = self.rec_tot - self.rec.len() as u32;
                    if !contrec || h.rem_len != left {
                        return Err(self.corrupt(
                            page_lsn,
                            format!(
                                "record at {} expects a continuation of {left} bytes, page has flags {:#06X} and remaining length {}",
                                self.rec_lsn, h.info, h.rem_len
                            ),
                        ));
                    }
                }
            }
            State::SkipToSegmentEnd | State::Ended => {}
        }
        let hl = if long {
            SIZE_OF_LONG_PHD
        } else {
            SIZE_OF_SHORT_PHD
        };
        *pos += hl;
        self.lsn.0 += hl as u64;
        self.header_done = Some(page_lsn);
        self.first_page = false;
        self.last_tli = h.tli;
        Ok(None)
    }
}
