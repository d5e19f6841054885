//! Newtypes for PostgreSQL concepts, parsed once.
//!
//! A value of these types exists only if it parsed, so nothing downstream
//! slices a short string or guesses at a segment number.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A WAL position (`XLogRecPtr`): a byte offset in the WAL stream, page headers included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    /// Segment number of the segment that holds this position.
    pub fn segno(self, seg_size: u32) -> u64 {
        self.0 / seg_size as u64
    }

    /// Offset of this position inside its segment.
    pub fn segment_offset(self, seg_size: u32) -> u64 {
        self.0 % seg_size as u64
    }

    /// Offset of this position inside its WAL page.
    pub fn page_offset(self, page_size: u32) -> u64 {
        self.0 % page_size as u64
    }

    /// The next 8-byte aligned position (MAXALIGN on every supported platform).
    pub fn align8(self) -> Lsn {
        Lsn((self.0 + 7) & !7)
    }

    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Lsn> {
        let bad = || Error::invalid(format!("invalid LSN '{s}': expected X/Y in hexadecimal"));
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A timeline id (`TimeLineID`). Timeline 0 does not exist.
pub type TimeLineId = u32;

/// Number of segments per "xlogid" (the middle 8 hex digits of a segment name).
pub fn segments_per_xlogid(seg_size: u32) -> u64 {
    0x1_0000_0000u64 / seg_size as u64
}

/// Whether `seg_size` is a WAL segment size PostgreSQL accepts: a power of two, 1 MiB to 1 GiB.
pub fn valid_segment_size(seg_size: u32) -> bool {
    seg_size.is_power_of_two() && (1 << 20..=1 << 30).contains(&seg_size)
}

/// The name of a file PostgreSQL hands to `archive_command` or asks of `restore_command`.
///
/// Segment numbers are kept in the name's own two halves (`log`, `seg`); converting them to
/// an absolute segment number needs the segment size, which the name does not carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WalFileName {
    /// `TTTTTTTTLLLLLLLLSSSSSSSS`
    Segment { tli: TimeLineId, log: u32, seg: u32 },
    /// `TTTTTTTTLLLLLLLLSSSSSSSS.partial`: the last, incomplete segment of a timeline.
    Partial { tli: TimeLineId, log: u32, seg: u32 },
    /// `TTTTTTTT.history`
    History { tli: TimeLineId },
    /// `TTTTTTTTLLLLLLLLSSSSSSSS.OOOOOOOO.backup`: a backup history file.
    Backup {
        tli: TimeLineId,
        log: u32,
        seg: u32,
        offset: u32,
    },
}

fn hex8(s: &str) -> Option<u32> {
    if s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

fn parse_segment_part(s: &str) -> Option<(u32, u32, u32)> {
    if s.len() != 24 {
        return None;
    }
    Some((
        hex8(s.get(0..8)?)?,
        hex8(s.get(8..16)?)?,
        hex8(s.get(16..24)?)?,
    ))
}

impl WalFileName {
    /// A segment name from a timeline and an absolute segment number.
    pub fn segment(tli: TimeLineId, segno: u64, seg_size: u32) -> WalFileName {
        let per = segments_per_xlogid(seg_size);
        WalFileName::Segment {
            tli,
            log: (segno / per) as u32,
            seg: (segno % per) as u32,
        }
    }

    pub fn tli(&self) -> TimeLineId {
        match *self {
            WalFileName::Segment { tli, .. }
            | WalFileName::Partial { tli, .. }
            | WalFileName::History { tli }
            | WalFileName::Backup { tli, .. } => tli,
        }
    }

    /// Absolute segment number, for names that denote a segment (full, partial or backup).
    pub fn segno(&self, seg_size: u32) -> Option<u64> {
        match *self {
            WalFileName::Segment { log, seg, .. }
            | WalFileName::Partial { log, seg, .. }
            | WalFileName::Backup { log, seg, .. } => {
                Some(log as u64 * segments_per_xlogid(seg_size) + seg as u64)
            }
            WalFileName::History { .. } => None,
        }
    }

    /// Checks the `seg` half against the segment size (e.g. 0x100 is invalid for 16 MiB).
    pub fn fits_segment_size(&self, seg_size: u32) -> bool {
        match *self {
            WalFileName::Segment { seg, .. }
            | WalFileName::Partial { seg, .. }
            | WalFileName::Backup { seg, .. } => (seg as u64) < segments_per_xlogid(seg_size),
            WalFileName::History { .. } => true,
        }
    }

    pub fn is_segment(&self) -> bool {
        matches!(self, WalFileName::Segment { .. })
    }

    /// Start LSN of the segment this name denotes.
    pub fn start_lsn(&self, seg_size: u32) -> Option<Lsn> {
        self.segno(seg_size).map(|s| Lsn(s * seg_size as u64))
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WalFileName::Segment { tli, log, seg } => write!(f, "{tli:08X}{log:08X}{seg:08X}"),
            WalFileName::Partial { tli, log, seg } => {
                write!(f, "{tli:08X}{log:08X}{seg:08X}.partial")
            }
            WalFileName::History { tli } => write!(f, "{tli:08X}.history"),
            WalFileName::Backup {
                tli,
                log,
                seg,
                offset,
            } => write!(f, "{tli:08X}{log:08X}{seg:08X}.{offset:08X}.backup"),
        }
    }
}

impl FromStr for WalFileName {
    type Err = Error;
    fn from_str(s: &str) -> Result<WalFileName> {
        let bad = || Error::invalid(format!("'{s}' is not a WAL file name"));
        if let Some(stem) = s.strip_suffix(".history") {
            let tli = hex8(stem).ok_or_else(bad)?;
            return Ok(WalFileName::History { tli });
        }
        if let Some(stem) = s.strip_suffix(".partial") {
            let (tli, log, seg) = parse_segment_part(stem).ok_or_else(bad)?;
            return Ok(WalFileName::Partial { tli, log, seg });
        }
        if let Some(stem) = s.strip_suffix(".backup") {
            let (seg_part, off) = stem.split_once('.').ok_or_else(bad)?;
            let (tli, log, seg) = parse_segment_part(seg_part).ok_or_else(bad)?;
            let offset = hex8(off).ok_or_else(bad)?;
            return Ok(WalFileName::Backup {
                tli,
                log,
                seg,
                offset,
            });
        }
        let (tli, log, seg) = parse_segment_part(s).ok_or_else(bad)?;
        if tli == 0 {
            return Err(bad());
        }
        Ok(WalFileName::Segment { tli, log, seg })
    }
}

/// PostgreSQL major versions whose WAL walnut reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PgVersion {
    V13,
    V14,
    V15,
    V16,
    V17,
    V18,
}

impl PgVersion {
    pub const ALL: [PgVersion; 6] = [
        PgVersion::V13,
        PgVersion::V14,
        PgVersion::V15,
        PgVersion::V16,
        PgVersion::V17,
        PgVersion::V18,
    ];

    pub fn major(self) -> u32 {
        match self {
            PgVersion::V13 => 13,
            PgVersion::V14 => 14,
            PgVersion::V15 => 15,
            PgVersion::V16 => 16,
            PgVersion::V17 => 17,
            PgVersion::V18 => 18,
        }
    }

    pub fn from_major(major: u32) -> Option<PgVersion> {
        PgVersion::ALL.into_iter().find(|v| v.major() == major)
    }

    /// `XLOG_PAGE_MAGIC` of the released major (see WAL-FORMAT.md §1.4).
    pub fn page_magic(self) -> u16 {
        match self {
            PgVersion::V13 => 0xD106,
            PgVersion::V14 => 0xD10D,
            PgVersion::V15 => 0xD110,
            PgVersion::V16 => 0xD113,
            PgVersion::V17 => 0xD116,
            PgVersion::V18 => 0xD118,
        }
    }

    pub fn from_page_magic(magic: u16) -> Option<PgVersion> {
        PgVersion::ALL.into_iter().find(|v| v.page_magic() == magic)
    }
}

impl fmt::Display for PgVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.major())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("/1".parse::<Lsn>().is_err());
        assert!("1/123456789".parse::<Lsn>().is_err());
        assert_eq!(Lsn(0x1000_0007).align8(), Lsn(0x1000_0008));
    }

    #[test]
    fn wal_file_names() {
        let seg: WalFileName = "000000010000000200000003".parse().unwrap();
        assert_eq!(seg.segno(16 << 20), Some(2 * 256 + 3));
        assert_eq!(WalFileName::segment(1, 515, 16 << 20), seg);
        assert_eq!(seg.to_string(), "000000010000000200000003");
        let p: WalFileName = "000000010000000200000003.partial".parse().unwrap();
        assert!(matches!(p, WalFileName::Partial { .. }));
        let h: WalFileName = "0000000A.history".parse().unwrap();
        assert_eq!(h, WalFileName::History { tli: 10 });
        assert_eq!(h.to_string(), "0000000A.history");
        let b: WalFileName = "000000010000000000000002.00000028.backup".parse().unwrap();
        assert_eq!(b.to_string(), "000000010000000000000002.00000028.backup");
        for bad in [
            "",
            "0000000100000002000000",
            "00000001000000020000000G",
            "x.history",
            "RECOVERYXLOG",
        ] {
            assert!(bad.parse::<WalFileName>().is_err(), "{bad}");
        }
        assert!(!"000000010000000000000100"
            .parse::<WalFileName>()
            .unwrap()
            .fits_segment_size(16 << 20));
    }

    #[test]
    fn versions() {
        for v in PgVersion::ALL {
            assert_eq!(PgVersion::from_page_magic(v.page_magic()), Some(v));
            assert_eq!(PgVersion::from_major(v.major()), Some(v));
        }
    }
}
