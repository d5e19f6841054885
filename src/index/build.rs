//! From WAL bytes to per-segment [`SegmentIndex`]es.
//!
//! [`StreamIndexer`] decodes consecutive segments as one stream and attributes every record
//! to the segment where it begins; [`index_segment`] indexes one segment, asking for the
//! following ones only to finish the record that crosses its end.

use std::collections::{HashMap, VecDeque};

use crate::error::{Error, Result};
use crate::index::{
    DbEvent, DbEventKind, ForkChange, OtherEvent, RelFork, SegmentIndex, FSM_FORKNUM, INIT_FORKNUM,
    MAIN_FORKNUM, VM_FORKNUM,
};
use crate::types::{Lsn, TimeLineId, WalFileName};
use crate::wal::{
    read_long_header, DecodedRecord, LongPageHeader, RelEvent, RelFileLocator, WalStreamDecoder,
};

/// Supplies the bytes of the segment `segno` on the same timeline, or `Ok(None)` when it is
/// not (yet) available. Used to complete a record that crosses a segment's end.
pub type NextSegment<'a> = dyn FnMut(u64) -> Result<Option<Vec<u8>>> + 'a;

/// `SMGR_TRUNCATE_*` flags.
const SMGR_TRUNCATE_HEAP: u32 = 0x1;
const SMGR_TRUNCATE_VM: u32 = 0x2;
const SMGR_TRUNCATE_FSM: u32 = 0x4;

/// Heap blocks covered by one visibility-map page (`HEAPBLOCKS_PER_PAGE`) for 8 kB pages.
pub const HEAPBLOCKS_PER_VM_PAGE: u32 = 32672;

/// Builds the index of one segment from its bytes.
///
/// - `tli` and `segno` come from the file name (page headers may carry an older TLI after a
///   promotion); `data` must be exactly one segment.
/// - Records that begin in the segment are attributed to it. If the last one crosses into
///   following segments, `next` is asked for them; if one is unavailable the index is
///   returned with `pending = true` and without that record.
/// - Errors: corrupt or foreign WAL (bad magic, bad CRC before the end of WAL, wrong
///   pageaddr) is an error naming the LSN; a zeroed tail is the normal end of WAL.
pub fn index_segment(
    tli: TimeLineId,
    segno: u64,
    data: &[u8],
    next: &mut NextSegment<'_>,
) -> Result<SegmentIndex> {
    let mut ix = StreamIndexer::new(tli);
    ix.stop_after_segno = Some(segno);
    ix.feed_segment(segno, data)?;
    // PostgreSQL archives only complete segments: WAL runs to the segment's end or to an
    // XLOG_SWITCH. A "clean" end of WAL inside the segment (zeros, a stale page or record)
    // therefore means a damaged or truncated file, and an index built from it would miss
    // every change after that point: a subset, which is data loss. Refuse it.
    let seg_size = read_long_header(data)?.seg_size;
    let early_end = ix
        .end_of_wal()
        .filter(|e| e.reason != crate::wal::EndReason::Stopped && e.lsn.segno(seg_size) == segno);
    let mut k = segno;
    while ix.partial_record_segno() == Some(segno) {
        k += 1;
        match next(k)? {
            Some(d) => ix.feed_segment(k, &d)?,
            None => break,
        }
    }
    let all = ix.finish()?;
    let idx = all
        .into_iter()
        .find(|s| s.segno == segno)
        .ok_or_else(|| Error::corruption(format!("segment {segno} produced no index")))?;
    match early_end {
        Some(end) if !idx.switched => Err(Error::corruption(format!(
            "WAL segment {}: {end}, before the end of the segment and with no WAL switch: \
             the file is damaged or incomplete, so its block index would miss changes",
            WalFileName::segment(tli, segno, seg_size)
        ))),
        _ => Ok(idx),
    }
}

/// A multiply-rotate hasher for [`RelFork`] keys (a few u32 writes): SipHash showed up in
/// profiles. Keys come from CRC-checked WAL, so hash flooding is not a concern.
#[derive(Default, Clone, Copy)]
struct ForkHasher(u64);

impl ForkHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for ForkHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.add(b as u64);
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(n as u64);
    }
    fn write_u32(&mut self, n: u32) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type ForkMap = HashMap<RelFork, usize, std::hash::BuildHasherDefault<ForkHasher>>;

const CACHE: usize = 64;

/// Blocks below this go to a per-fork bitmap (at most 128 KiB), so that the many repeated
/// references of a segment cost a bit-set and the result comes out sorted; higher ones
/// (relations over 8 GiB) are pushed and sorted.
const BITMAP_BLOCKS: u32 = 1 << 20;

/// One fork's changes while a segment is being indexed.
#[derive(Default, Clone)]
struct ForkAcc {
    change: ForkChange,
    bits: Vec<u64>,
    high: Vec<u32>,
}

impl ForkAcc {
    #[inline]
    fn add_block(&mut self, blkno: u32) {
        if blkno < BITMAP_BLOCKS {
            let w = (blkno >> 6) as usize;
            if w >= self.bits.len() {
                self.bits.resize(w + 1, 0);
            }
            self.bits[w] |= 1u64 << (blkno & 63);
        } else {
            self.high.push(blkno);
        }
    }

    fn finish(mut self) -> ForkChange {
        for (w, &word) in self.bits.iter().enumerate() {
            let mut x = word;
            while x != 0 {
                let b = x.trailing_zeros();
                self.change.blocks.insert((w as u32) << 6 | b);
                x &= x - 1;
            }
        }
        self.high.sort_unstable();
        self.high.dedup();
        for &b in &self.high {
            self.change.blocks.insert(b);
        }
        self.change.blocks.normalize();
        self.change
    }
}

/// A segment's index under construction: forks are kept in a vector with a hash map and a
/// one-entry cache in front, since consecutive block references mostly hit the same fork.
#[derive(Clone)]
struct SegmentBuilder {
    idx: SegmentIndex,
    forks: Vec<(RelFork, ForkAcc)>,
    map: ForkMap,
    cache: [Option<(RelFork, usize)>; CACHE],
    saw_record: bool,
}

impl SegmentBuilder {
    fn new(h: &LongPageHeader, tli: TimeLineId, segno: u64) -> SegmentBuilder {
        let pg_major = h.version().map_or(0, |v| v.major());
        SegmentBuilder {
            idx: SegmentIndex::empty(pg_major, h.seg_size, h.page_size, h.system_id, tli, segno),
            forks: Vec::new(),
            map: ForkMap::default(),
            cache: [None; CACHE],
            saw_record: false,
        }
    }

    #[inline]
    fn fork(&mut self, key: RelFork) -> &mut ForkAcc {
        // A small direct-mapped cache in front of the hash map: a segment touches few
        // relation forks, and they alternate record by record.
        let slot = (key.rel ^ (key.rel >> 7) ^ ((key.fork as u32) << 3)) as usize & (CACHE - 1);
        let i = match self.cache[slot] {
            Some((k, i)) if k == key => i,
            _ => {
                let i = match self.map.get(&key) {
                    Some(&i) => i,
                    None => {
                        self.forks.push((key, ForkAcc::default()));
                        let i = self.forks.len() - 1;
                        self.map.insert(key, i);
                        i
                    }
                };
                self.cache[slot] = Some((key, i));
                i
            }
        };
        &mut self.forks[i].1
    }

    fn add(&mut self, r: &DecodedRecord<'_>) {
        if !self.saw_record {
            self.saw_record = true;
            self.idx.start_lsn = r.lsn;
        }
        self.idx.records += 1;
        self.idx.end_lsn = r.end_lsn;
        for b in r.blocks {
            self.fork(key(b.rel, b.fork)).add_block(b.blkno);
        }
        let ev = match r.event {
            Some(e) => e,
            None => return,
        };
        let lsn = r.lsn;
        match ev {
            RelEvent::SmgrCreate { rel, fork } => {
                let f = &mut self.fork(key(*rel, *fork)).change;
                f.created = true;
                f.apply_limit(0);
            }
            RelEvent::SmgrTruncate { rel, blkno, flags } => {
                if flags & SMGR_TRUNCATE_HEAP != 0 {
                    self.fork(key(*rel, MAIN_FORKNUM))
                        .change
                        .apply_limit(*blkno);
                }
                if flags & SMGR_TRUNCATE_VM != 0 {
                    // The VM keeps ceil(blkno / HEAPBLOCKS_PER_PAGE) pages, and the last kept
                    // one has its tail bits cleared (WAL-logged only with checksums or
                    // wal_log_hints). Flooring puts that page at or above the limit, so it
                    // is never taken from an older backup: a safe superset.
                    self.fork(key(*rel, VM_FORKNUM))
                        .change
                        .apply_limit(blkno / HEAPBLOCKS_PER_VM_PAGE);
                }
                if flags & SMGR_TRUNCATE_FSM != 0 {
                    // FSM forks are copied whole anyway; 0 is the safe choice.
                    self.fork(key(*rel, FSM_FORKNUM)).change.apply_limit(0);
                }
            }
            RelEvent::DbCreateFileCopy {
                db,
                spc,
                src_db,
                src_spc,
            } => self.idx.db_events.push(DbEvent {
                lsn,
                spc: *spc,
                db: *db,
                kind: DbEventKind::CreatedFileCopy {
                    src_spc: *src_spc,
                    src_db: *src_db,
                },
            }),
            RelEvent::DbCreateWalLog { db, spc } => self.idx.db_events.push(DbEvent {
                lsn,
                spc: *spc,
                db: *db,
                kind: DbEventKind::CreatedWalLog,
            }),
            RelEvent::DbDrop { db, spcs } => {
                for spc in spcs {
                    self.idx.db_events.push(DbEvent {
                        lsn,
                        spc: *spc,
                        db: *db,
                        kind: DbEventKind::Dropped,
                    });
                }
            }
            RelEvent::XactEnd {
                xact_time,
                xid,
                rels,
                ..
            } => {
                for rel in rels {
                    for fork in [MAIN_FORKNUM, FSM_FORKNUM, VM_FORKNUM, INIT_FORKNUM] {
                        let f = &mut self.fork(key(*rel, fork)).change;
                        f.dropped = true;
                        f.apply_limit(0);
                    }
                }
                self.idx.last_commit_time = Some(*xact_time);
                if *xid != 0 {
                    self.idx.last_xid = Some(*xid);
                }
            }
            RelEvent::RelmapUpdate { db, spc, .. } => {
                self.idx.other_events.push(OtherEvent::RelmapUpdate {
                    lsn,
                    spc: *spc,
                    db: *db,
                })
            }
            RelEvent::TablespaceCreate { spc, .. } => self
                .idx
                .other_events
                .push(OtherEvent::TablespaceCreate { lsn, spc: *spc }),
            RelEvent::TablespaceDrop { spc } => self
                .idx
                .other_events
                .push(OtherEvent::TablespaceDrop { lsn, spc: *spc }),
            RelEvent::WalLevel { wal_level, .. } => {
                if *wal_level == 0 {
                    self.idx.wal_level_minimal = true;
                }
                self.idx.other_events.push(OtherEvent::WalLevel {
                    lsn,
                    wal_level: *wal_level,
                });
            }
            RelEvent::RestorePoint { time, name } => {
                self.idx.other_events.push(OtherEvent::RestorePoint {
                    lsn,
                    name: name.clone(),
                    time: *time,
                })
            }
            RelEvent::Switch => {
                self.idx.switched = true;
                // Nothing else lives in this segment: it is covered to its end.
                let seg = self.idx.seg_size as u64;
                self.idx.end_lsn = Lsn((self.idx.segno + 1) * seg);
            }
        }
    }

    fn finish(self) -> SegmentIndex {
        let mut idx = self.idx;
        for (k, f) in self.forks {
            idx.forks.insert(k, f.finish());
        }
        idx
    }
}

#[inline]
fn key(rel: RelFileLocator, fork: u8) -> RelFork {
    RelFork {
        spc: rel.spc,
        db: rel.db,
        rel: rel.rel,
        fork,
    }
}

/// Indexes consecutive segments decoded as one stream, one [`SegmentIndex`] per segment.
///
/// Feed whole segments in order with [`StreamIndexer::feed_segment`]; finished indexes come
/// out of [`StreamIndexer::take_finished`] as soon as no later record can belong to them,
/// and [`StreamIndexer::finish`] returns the rest (the last one `pending` if its final
/// record is incomplete).
pub struct StreamIndexer {
    tli: TimeLineId,
    dec: Option<WalStreamDecoder>,
    open: VecDeque<SegmentBuilder>,
    finished: Vec<SegmentIndex>,
    next_segno: Option<u64>,
    /// Stop decoding once a record begins after this segment (for [`index_segment`]).
    stop_after_segno: Option<u64>,
}

impl StreamIndexer {
    pub fn new(tli: TimeLineId) -> StreamIndexer {
        StreamIndexer {
            tli,
            dec: None,
            open: VecDeque::new(),
            finished: Vec::new(),
            next_segno: None,
            stop_after_segno: None,
        }
    }

    /// Stop decoding once a record begins after segment `segno`: indexes of later segments
    /// are then incomplete (used to index one segment and finish its last record only).
    pub fn stop_after(&mut self, segno: u64) {
        self.stop_after_segno = Some(segno);
    }

    /// The segment after the last one fed.
    pub fn next_segno(&self) -> Option<u64> {
        self.next_segno
    }

    /// Where and why decoding stopped, if the WAL ended in what was fed.
    pub fn end_of_wal(&self) -> Option<crate::wal::EndOfWal> {
        self.dec.as_ref().and_then(|d| d.end_of_wal()).cloned()
    }

    /// Segment in which the incomplete last record began, if any.
    pub fn partial_record_segno(&self) -> Option<u64> {
        let d = self.dec.as_ref()?;
        let p = d.params()?;
        d.partial_record_lsn().map(|l| l.segno(p.seg_size))
    }

    /// Decodes one whole segment, `segno` (from the file name), following the previous one.
    pub fn feed_segment(&mut self, segno: u64, data: &[u8]) -> Result<()> {
        let h = read_long_header(data)?;
        let name = WalFileName::segment(self.tli, segno, h.seg_size).to_string();
        let ctx = |e: Error| e.context(format!("WAL segment {name}"));
        if data.len() != h.seg_size as usize {
            return Err(ctx(Error::corruption(format!(
                "file is {} bytes, the segment size is {}",
                data.len(),
                h.seg_size
            ))));
        }
        self.begin_segment(segno, &h, &name)?;
        self.decode_chunk(data, h.seg_size).map_err(ctx)?;
        self.end_segment(segno, h.seg_size, &name)
    }

    /// [`Self::feed_segment`] reading the segment from `file` in pieces, and only as far
    /// as its WAL goes: once the WAL ended (at the first invalid or zeroed record header,
    /// as in a whole segment), the rest is not read. The result is the whole segment's: the
    /// decoder never looks past where it stops. `file` must hold `seg_size` bytes.
    pub fn feed_segment_file(
        &mut self,
        segno: u64,
        file: &std::fs::File,
        path: &std::path::Path,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        const PIECE: usize = 1 << 20;
        let mut buf = vec![0u8; PIECE];
        let read = |buf: &mut [u8], off: u64| -> Result<()> {
            file.read_exact_at(buf, off)
                .map_err(|e| Error::io("read", path, e))
        };
        // the first piece holds the long header (a segment is at least 1 MiB)
        read(&mut buf, 0)?;
        let h = read_long_header(&buf)?;
        let name = WalFileName::segment(self.tli, segno, h.seg_size).to_string();
        let ctx = |e: Error| e.context(format!("WAL segment {name}"));
        let seg_size = h.seg_size as u64;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        if len != seg_size || seg_size < PIECE as u64 {
            return Err(ctx(Error::corruption(format!(
                "file is {len} bytes, the segment size is {seg_size}"
            ))));
        }
        self.begin_segment(segno, &h, &name)?;
        let mut off = 0u64;
        loop {
            self.decode_chunk(&buf, h.seg_size).map_err(ctx)?;
            off += PIECE as u64;
            let ended = self.dec.as_ref().is_some_and(|d| d.end_of_wal().is_some());
            if ended || off >= seg_size {
                break;
            }
            let n = PIECE.min((seg_size - off) as usize);
            buf.truncate(n);
            read(&mut buf, off)?;
        }
        self.end_segment(segno, h.seg_size, &name)
    }

    /// The checks and set-up of a segment about to be decoded (see [`Self::feed_segment`]).
    fn begin_segment(&mut self, segno: u64, h: &LongPageHeader, name: &str) -> Result<()> {
        let ctx = |e: Error| e.context(format!("WAL segment {name}"));
        if h.segno() != segno {
            return Err(ctx(Error::corruption(format!(
                "file holds segment {} (page address {}), not {segno}",
                WalFileName::segment(self.tli, h.segno(), h.seg_size),
                h.pageaddr
            ))));
        }
        if let Some(n) = self.next_segno {
            if n != segno {
                return Err(ctx(Error::invalid(format!(
                    "segments are not consecutive: expected {}",
                    WalFileName::segment(self.tli, n, h.seg_size)
                ))));
            }
        }
        if let Some(p) = self.dec.as_ref().and_then(|d| d.params()) {
            if p.system_id != h.system_id || p.seg_size != h.seg_size {
                return Err(ctx(Error::corruption(format!(
                    "system identifier {} / segment size {} differ from the previous segment's {} / {}",
                    h.system_id, h.seg_size, p.system_id, p.seg_size
                ))));
            }
        }
        let ended = self.dec.as_ref().is_some_and(|d| d.end_of_wal().is_some());
        if ended {
            if let Some(end) = self.dec.as_ref().and_then(|d| d.end_of_wal()) {
                log::warn!("{name}: decoding restarts at this segment after {end}");
            }
            self.close_all();
            self.dec = None;
        }
        let seg_start = Lsn(segno * h.seg_size as u64);
        self.dec
            .get_or_insert_with(|| WalStreamDecoder::new(seg_start));
        self.open.push_back(SegmentBuilder::new(h, self.tli, segno));
        self.next_segno = Some(segno + 1);
        Ok(())
    }

    /// Decodes the next bytes of the segment begun (errors without the segment's name).
    fn decode_chunk(&mut self, data: &[u8], seg_size: u32) -> Result<()> {
        let Some(dec) = self.dec.as_mut() else {
            return Err(Error::invalid("no segment begun"));
        };
        let seg_shift = seg_size.trailing_zeros();
        let open = &mut self.open;
        let stop = self.stop_after_segno;
        dec.decode_all(data, |r| {
            let s = r.lsn.0 >> seg_shift;
            if stop.is_some_and(|x| s > x) {
                return Ok(false);
            }
            // Records begin in the newest segments; search from the back.
            let newest = open.back_mut().filter(|b| b.idx.segno == s);
            let found = match newest {
                Some(b) => Some(b),
                None => open.iter_mut().rev().find(|b| b.idx.segno == s),
            };
            match found {
                Some(b) => b.add(r),
                None => {
                    return Err(Error::corruption(format!(
                        "record at {} lies outside the segments fed",
                        r.lsn
                    )))
                }
            }
            Ok(true)
        })
    }

    /// The end of a segment's bytes (see [`Self::feed_segment`]).
    fn end_segment(&mut self, segno: u64, seg_size: u32, name: &str) -> Result<()> {
        let ctx = |e: Error| e.context(format!("WAL segment {name}"));
        let Some(dec) = self.dec.as_mut() else {
            return Err(Error::invalid("no segment begun"));
        };
        if let Some(end) = dec.end_of_wal() {
            if !end.reason.is_clean() {
                return Err(ctx(Error::corruption(end.to_string())));
            }
            if end.lsn.segno(seg_size) == segno && end.reason != crate::wal::EndReason::Stopped {
                log::debug!("{name}: {end}");
            }
        }
        // Segments before the one holding the next record start can get no more records.
        let keep_from = match dec.partial_record_lsn() {
            Some(l) => l.segno(seg_size),
            None => segno,
        };
        if dec.end_of_wal().is_none() {
            while self.open.front().is_some_and(|b| b.idx.segno < keep_from) {
                if let Some(b) = self.open.pop_front() {
                    self.finished.push(b.finish());
                }
            }
        }
        Ok(())
    }

    fn close_all(&mut self) {
        while let Some(b) = self.open.pop_front() {
            self.finished.push(b.finish());
        }
    }

    /// The index of segment `segno` as it stands, while it is still open (`None` once it
    /// was finished, or if it was never fed): `pending` (with the end of the bytes decoded
    /// as its end) when the last record decoded began in it and is incomplete, as
    /// [`Self::finish`] would return it, but without ending the stream. A WAL receiver
    /// stores it when the segment arrives and the complete one when the next has come.
    pub fn snapshot(&self, segno: u64) -> Option<SegmentIndex> {
        let b = self.open.iter().find(|b| b.idx.segno == segno)?;
        let mut idx = b.clone().finish();
        if self.partial_record_segno() == Some(segno) {
            if let Some(d) = &self.dec {
                idx.pending = true;
                idx.end_lsn = d.position();
            }
        }
        Some(idx)
    }

    /// Indexes that can no longer change, in segment order.
    pub fn take_finished(&mut self) -> Vec<SegmentIndex> {
        std::mem::take(&mut self.finished)
    }

    /// Ends the stream: returns every index not yet taken. The segment where an incomplete
    /// record began is `pending`, its end LSN the end of the bytes decoded.
    pub fn finish(mut self) -> Result<Vec<SegmentIndex>> {
        if let Some(d) = &self.dec {
            if let (Some(p), Some(l)) = (d.params(), d.partial_record_lsn()) {
                let s = l.segno(p.seg_size);
                let pos = d.position();
                for b in self.open.iter_mut() {
                    if b.idx.segno == s {
                        b.idx.pending = true;
                        b.idx.end_lsn = pos;
                    }
                }
            }
        }
        self.close_all();
        Ok(self.finished)
    }
}
