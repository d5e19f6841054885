//! Streamed WAL → whole segments (sans-IO).
//!
//! The walsender sends WAL in pieces of any size, at any offset. `SegmentAssembler` puts
//! them together and hands out each segment once it is complete, with its name, and shows
//! the incomplete tail (the future `<segment>.partial`). It always holds its current
//! segment from the segment's first byte, so a segment it hands out is whole: streaming
//! therefore starts at a segment boundary, or a resumed `.partial` supplies the bytes
//! before the resume point.

use crate::error::{Error, Result};
use crate::types::{valid_segment_size, Lsn, TimeLineId, WalFileName};

/// Alignment of the segment's bytes in the assembler's buffers: a page, so that they can
/// be written to an `O_DIRECT` file as they are (`walnut receive`'s spool), with no
/// staging copy.
pub const BUFFER_ALIGN: usize = 4096;

/// A segment that is complete: [`Self::data`] is the segment's bytes (segment size).
#[derive(Clone, Debug)]
pub struct CompleteSegment {
    pub name: WalFileName,
    /// The segment's bytes are `buf[off..]`, page-aligned ([`BUFFER_ALIGN`]).
    buf: Vec<u8>,
    off: usize,
}

/// Equal when the name and the bytes are (wherever they sit in their buffers).
impl PartialEq for CompleteSegment {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.data() == other.data()
    }
}

impl Eq for CompleteSegment {}

impl CompleteSegment {
    /// The segment's bytes.
    pub fn data(&self) -> &[u8] {
        self.buf.get(self.off..).unwrap_or_default()
    }

    /// The buffer, for [`SegmentAssembler::recycle`].
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

/// An empty buffer for a segment of `seg_size` bytes, holding zeros up to the first
/// [`BUFFER_ALIGN`]-aligned address (where the segment's bytes start); that offset.
fn aligned_buffer(mut buf: Vec<u8>, seg_size: u32) -> (Vec<u8>, usize) {
    buf.clear();
    let cap = seg_size as usize + BUFFER_ALIGN;
    buf.reserve_exact(cap);
    let off = buf.as_ptr().align_offset(BUFFER_ALIGN).min(BUFFER_ALIGN);
    buf.resize(off, 0);
    (buf, off)
}

/// The incomplete segment being filled: `bytes` from the segment's start up to `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialTail<'a> {
    /// The `.partial` name of the segment.
    pub name: WalFileName,
    pub end: Lsn,
    pub bytes: &'a [u8],
}

#[derive(Debug)]
pub struct SegmentAssembler {
    tli: TimeLineId,
    seg_size: u32,
    segno: u64,
    /// The current segment's bytes are `buf[off..]` (see [`aligned_buffer`]).
    buf: Vec<u8>,
    off: usize,
    /// A segment-sized buffer handed back by the consumer, for the next segment.
    spare: Option<Vec<u8>>,
}

fn check_size(seg_size: u32) -> Result<()> {
    if valid_segment_size(seg_size) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid WAL segment size {seg_size}: a power of two from 1 MiB to 1 GiB"
        )))
    }
}

impl SegmentAssembler {
    /// Starts empty at `start`, which must be the first byte of a segment.
    pub fn new(tli: TimeLineId, seg_size: u32, start: Lsn) -> Result<SegmentAssembler> {
        check_size(seg_size)?;
        if tli == 0 {
            return Err(Error::invalid("timeline 0 does not exist"));
        }
        if start.segment_offset(seg_size) != 0 {
            return Err(Error::invalid(format!(
                "streaming into segments must start at a segment boundary, not at {start}"
            )));
        }
        let (buf, off) = aligned_buffer(Vec::new(), seg_size);
        Ok(SegmentAssembler {
            tli,
            seg_size,
            segno: start.segno(seg_size),
            buf,
            off,
            spare: None,
        })
    }

    /// Resumes a partial segment: `name` (a segment or `.partial` name) and its first
    /// `bytes.len()` bytes, which must be shorter than a segment. Streaming continues at
    /// [`Self::position`].
    pub fn resume(name: WalFileName, seg_size: u32, bytes: Vec<u8>) -> Result<SegmentAssembler> {
        check_size(seg_size)?;
        let segno = match name {
            WalFileName::Segment { .. } | WalFileName::Partial { .. }
                if name.fits_segment_size(seg_size) && name.tli() != 0 =>
            {
                name.segno(seg_size)
            }
            _ => None,
        }
        .ok_or_else(|| Error::invalid(format!("cannot resume streaming into \"{name}\"")))?;
        if bytes.len() >= seg_size as usize {
            return Err(Error::invalid(format!(
                "partial segment \"{name}\" has {} bytes, not fewer than the segment size {seg_size}",
                bytes.len()
            )));
        }
        let (mut buf, off) = aligned_buffer(Vec::new(), seg_size);
        buf.extend_from_slice(&bytes);
        Ok(SegmentAssembler {
            tli: name.tli(),
            seg_size,
            segno,
            buf,
            off,
            spare: None,
        })
    }

    /// Hands back the buffer of a [`CompleteSegment`] the consumer is done with: the next
    /// segment is assembled in it, sparing an allocation (and the page faults of a fresh
    /// 16 MiB buffer) per segment.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() >= self.seg_size as usize + BUFFER_ALIGN {
            self.spare = Some(buf);
        }
    }

    /// An empty aligned buffer for the next segment, and its offset.
    fn fresh_buffer(&mut self) -> (Vec<u8>, usize) {
        aligned_buffer(self.spare.take().unwrap_or_default(), self.seg_size)
    }

    /// The current segment's bytes so far.
    fn bytes(&self) -> &[u8] {
        self.buf.get(self.off..).unwrap_or_default()
    }

    pub fn timeline(&self) -> TimeLineId {
        self.tli
    }

    pub fn segment_size(&self) -> u32 {
        self.seg_size
    }

    /// The LSN the next pushed bytes must start at.
    pub fn position(&self) -> Lsn {
        Lsn(self.segno * self.seg_size as u64 + self.bytes().len() as u64)
    }

    /// Adds WAL bytes starting at `start` (= [`Self::position`]); returns the segments this
    /// completed, oldest first.
    pub fn push(&mut self, start: Lsn, mut bytes: &[u8]) -> Result<Vec<CompleteSegment>> {
        if start != self.position() {
            return Err(Error::invalid(format!(
                "streamed WAL at {start} does not follow {} (timeline {})",
                self.position(),
                self.tli
            )));
        }
        let mut done = Vec::new();
        while !bytes.is_empty() {
            let room = self.seg_size as usize - self.bytes().len();
            let n = room.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.bytes().len() == self.seg_size as usize {
                let (fresh, off) = self.fresh_buffer();
                let buf = std::mem::replace(&mut self.buf, fresh);
                done.push(CompleteSegment {
                    name: WalFileName::segment(self.tli, self.segno, self.seg_size),
                    buf,
                    off: std::mem::replace(&mut self.off, off),
                });
                self.segno += 1;
            }
        }
        Ok(done)
    }

    /// The incomplete segment (possibly empty).
    pub fn partial(&self) -> PartialTail<'_> {
        let WalFileName::Segment { tli, log, seg } =
            WalFileName::segment(self.tli, self.segno, self.seg_size)
        else {
            unreachable!("WalFileName::segment makes segment names")
        };
        PartialTail {
            name: WalFileName::Partial { tli, log, seg },
            end: self.position(),
            bytes: self.bytes(),
        }
    }

    /// At the end of a timeline (the stream's `EndOfTimeline`): checks that everything up
    /// to `switchpoint` arrived, returns the old timeline's last incomplete segment (the
    /// `.partial` PostgreSQL also keeps; `None` if the switch is at a segment boundary), and
    /// restarts at the beginning of the switch point's segment on `next_tli`, where
    /// streaming must resume (as `pg_receivewal` does: the new timeline's first segment
    /// holds the old timeline's WAL before the switch point too).
    pub fn switch_timeline(
        &mut self,
        next_tli: TimeLineId,
        switchpoint: Lsn,
    ) -> Result<Option<(WalFileName, Vec<u8>)>> {
        if switchpoint != self.position() {
            return Err(Error::invalid(format!(
                "timeline {} ended at {switchpoint}, but WAL was received up to {}",
                self.tli,
                self.position()
            )));
        }
        if next_tli <= self.tli {
            return Err(Error::invalid(format!(
                "next timeline {next_tli} is not after timeline {}",
                self.tli
            )));
        }
        let tail = if self.bytes().is_empty() {
            None
        } else {
            let name = self.partial().name;
            let tail = self.bytes().to_vec();
            self.buf.truncate(self.off);
            Some((name, tail))
        };
        self.tli = next_tli;
        Ok(tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u32 = 1 << 20;

    fn wal(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
            .collect()
    }

    /// Feeds `data` (starting at segment 3) in chunks of `chunk` bytes.
    fn feed(data: &[u8], chunk: usize) -> (Vec<CompleteSegment>, Vec<u8>, Lsn) {
        let start = Lsn(3 * SEG as u64);
        let mut a = SegmentAssembler::new(1, SEG, start).unwrap();
        let mut out = Vec::new();
        let mut at = start;
        for c in data.chunks(chunk) {
            out.extend(a.push(at, c).unwrap());
            at = Lsn(at.0 + c.len() as u64);
        }
        assert_eq!(a.position(), at);
        let p = a.partial();
        (out, p.bytes.to_vec(), p.end)
    }

    #[test]
    fn every_chunking_gives_the_same_segments() {
        let data = wal(2 * SEG as usize + 12345, 7);
        let whole = feed(&data, data.len());
        assert_eq!(whole.0.len(), 2);
        assert_eq!(
            whole.0[0].name.to_string(),
            "000000010000000000000003",
            "names follow the segment number"
        );
        assert_eq!(whole.0[1].name.to_string(), "000000010000000000000004");
        assert_eq!(whole.0[0].data(), &data[..SEG as usize]);
        assert_eq!(whole.0[1].data(), &data[SEG as usize..2 * SEG as usize]);
        for s in &whole.0 {
            assert_eq!(s.data().as_ptr() as usize % BUFFER_ALIGN, 0, "aligned");
        }
        assert_eq!(whole.1, data[2 * SEG as usize..]);
        for chunk in [1usize << 17, 8192, 50, 7] {
            assert_eq!(feed(&data, chunk), whole, "chunk {chunk}");
        }
        let a = SegmentAssembler::new(1, SEG, Lsn(3 * SEG as u64)).unwrap();
        assert_eq!(
            a.partial().name.to_string(),
            "000000010000000000000003.partial"
        );
    }

    #[test]
    fn gaps_overlaps_and_mid_segment_starts_are_refused() {
        assert!(SegmentAssembler::new(1, SEG, Lsn(SEG as u64 + 8)).is_err());
        assert!(SegmentAssembler::new(1, 12345, Lsn(0)).is_err());
        assert!(SegmentAssembler::new(0, SEG, Lsn(0)).is_err());
        let mut a = SegmentAssembler::new(1, SEG, Lsn(0)).unwrap();
        a.push(Lsn(0), &[1; 100]).unwrap();
        let e = a.push(Lsn(101), &[1; 10]).unwrap_err();
        assert!(e.message().contains("0/65"), "{e}");
        assert!(a.push(Lsn(99), &[1; 10]).is_err());
        assert_eq!(a.position(), Lsn(100));
    }

    #[test]
    fn recycled_buffers_are_reused() {
        let mut a = SegmentAssembler::new(1, SEG, Lsn(0)).unwrap();
        let data = wal(3 * SEG as usize, 5);
        let s = SEG as usize;
        let first = a.push(Lsn(0), &data[..s]).unwrap().remove(0);
        let ptr = first.data().as_ptr();
        a.recycle(first.into_buffer());
        // The segment after the next one is assembled in the recycled buffer.
        a.push(Lsn(SEG as u64), &data[s..2 * s]).unwrap();
        let third = a
            .push(Lsn(2 * SEG as u64), &data[2 * s..])
            .unwrap()
            .remove(0);
        assert_eq!(third.data().as_ptr(), ptr, "the recycled buffer was reused");
        assert_eq!(third.data(), &data[2 * s..]);
        // A buffer too small for a segment is not taken.
        a.recycle(Vec::with_capacity(10));
        a.push(Lsn(3 * SEG as u64), &[7; 100]).unwrap();
        assert_eq!(a.partial().bytes, &[7; 100]);
    }

    #[test]
    fn resume_continues_a_partial() {
        let data = wal(SEG as usize + 10, 3);
        let name: WalFileName = "000000020000000100000005.partial".parse().unwrap();
        let mut a = SegmentAssembler::resume(name, SEG, data[..1000].to_vec()).unwrap();
        let base = 0x1_0000_0000u64 + 5 * SEG as u64;
        assert_eq!(a.position(), Lsn(base + 1000));
        assert_eq!(a.timeline(), 2);
        let done = a.push(Lsn(base + 1000), &data[1000..]).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].name.to_string(), "000000020000000100000005");
        assert_eq!(done[0].data(), &data[..SEG as usize]);
        assert_eq!(a.partial().bytes, &data[SEG as usize..]);
        // A "partial" of a whole segment, or a history file, cannot be resumed.
        assert!(SegmentAssembler::resume(name, SEG, vec![0; SEG as usize]).is_err());
        let h: WalFileName = "00000002.history".parse().unwrap();
        assert!(SegmentAssembler::resume(h, SEG, Vec::new()).is_err());
    }

    #[test]
    fn timeline_switch_keeps_the_old_tail_and_restarts_the_segment() {
        let mut a = SegmentAssembler::new(1, SEG, Lsn(0)).unwrap();
        let data = wal(SEG as usize + 500, 9);
        a.push(Lsn(0), &data).unwrap();
        assert!(a.switch_timeline(2, Lsn(SEG as u64 + 499)).is_err());
        assert!(a.switch_timeline(1, Lsn(SEG as u64 + 500)).is_err());
        let (name, tail) = a
            .switch_timeline(2, Lsn(SEG as u64 + 500))
            .unwrap()
            .unwrap();
        assert_eq!(name.to_string(), "000000010000000000000001.partial");
        assert_eq!(tail, &data[SEG as usize..]);
        assert_eq!(a.timeline(), 2);
        assert_eq!(a.position(), Lsn(SEG as u64));
        let done = a.push(Lsn(SEG as u64), &vec![0; SEG as usize]).unwrap();
        assert_eq!(done[0].name.to_string(), "000000020000000000000001");
        // A switch exactly at a segment boundary leaves no tail.
        assert_eq!(a.switch_timeline(3, Lsn(2 * SEG as u64)).unwrap(), None);
        assert_eq!(a.position(), Lsn(2 * SEG as u64));
    }
}
