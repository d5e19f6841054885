//! Sans-IO WAL decoder (PostgreSQL 13–18). Push bytes in, get records out; files, pipes and
//! archives stay outside. All knowledge of the WAL layout lives in this module.
//!
//! - [`decoder`]: pages, record reassembly across pages and segments, CRC-32C, end of WAL;
//! - [`record`]: block references and the special records modelled as [`RelEvent`]s;
//! - [`version`]: the few numbers that differ between majors.

#![deny(clippy::indexing_slicing)]

pub mod decoder;
pub mod record;
pub mod version;

use crate::error::{Error, Result};
use crate::types::{valid_segment_size, Lsn, PgVersion, TimeLineId};

pub use decoder::{EndOfWal, EndReason, WalParams, WalStreamDecoder};
pub use record::{BlockRef, DecodedRecord, RelEvent, RelFileLocator, WalLevelSource, XactKind};

/// `SizeOfXLogShortPHD`.
pub const SIZE_OF_SHORT_PHD: usize = 24;
/// `SizeOfXLogLongPHD`.
pub const SIZE_OF_LONG_PHD: usize = 40;

pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
pub const XLP_LONG_HEADER: u16 = 0x0002;
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
/// Every flag a valid page may carry (0x0007 before the Nov 2021 minors; accepting 0x0008
/// everywhere is harmless because no older writer sets it).
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// The short page header at the start of every page (`XLogPageHeaderData`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHeader {
    pub magic: u16,
    pub info: u16,
    pub tli: TimeLineId,
    pub pageaddr: Lsn,
    pub rem_len: u32,
}

/// Parses the 24-byte short page header (no checks); `None` if `b` is too short.
pub fn parse_page_header(b: &[u8]) -> Option<PageHeader> {
    Some(PageHeader {
        magic: record::le_u16(b, 0)?,
        info: record::le_u16(b, 2)?,
        tli: record::le_u32(b, 4)?,
        pageaddr: Lsn(record::le_u64(b, 8)?),
        rem_len: record::le_u32(b, 16)?,
    })
}

/// The long page header at the start of every segment (`XLogLongPageHeaderData`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongPageHeader {
    pub magic: u16,
    pub info: u16,
    pub tli: TimeLineId,
    pub pageaddr: Lsn,
    pub rem_len: u32,
    pub system_id: u64,
    pub seg_size: u32,
    pub page_size: u32,
}

impl LongPageHeader {
    /// The major version that wrote the segment (checked by [`read_long_header`]).
    pub fn version(&self) -> Option<PgVersion> {
        PgVersion::from_page_magic(self.magic)
    }

    /// Absolute segment number of the segment this header starts.
    pub fn segno(&self) -> u64 {
        self.pageaddr.segno(self.seg_size)
    }
}

/// Parses and checks the long page header at the start of a segment: known page magic,
/// the long-header flag, a valid segment size and WAL page size. The caller checks the
/// system identifier and the expected `pageaddr`.
pub fn read_long_header(segment_start: &[u8]) -> Result<LongPageHeader> {
    let b = segment_start;
    let short = || {
        Error::corruption(format!(
            "WAL segment header is truncated: {} bytes, need {SIZE_OF_LONG_PHD}",
            b.len()
        ))
    };
    let h = parse_page_header(b).ok_or_else(short)?;
    let lh = LongPageHeader {
        magic: h.magic,
        info: h.info,
        tli: h.tli,
        pageaddr: h.pageaddr,
        rem_len: h.rem_len,
        system_id: record::le_u64(b, 24).ok_or_else(short)?,
        seg_size: record::le_u32(b, 32).ok_or_else(short)?,
        page_size: record::le_u32(b, 36).ok_or_else(short)?,
    };
    if PgVersion::from_page_magic(lh.magic).is_none() {
        return Err(Error::corruption(format!(
            "unknown WAL page magic {:#06X} (not PostgreSQL 13–18 WAL)",
            lh.magic
        )));
    }
    if lh.info & XLP_LONG_HEADER == 0 || lh.info & !XLP_ALL_FLAGS != 0 {
        return Err(Error::corruption(format!(
            "first page of a WAL segment has page info {:#06X}, not a long header",
            lh.info
        )));
    }
    if !valid_segment_size(lh.seg_size) {
        return Err(Error::corruption(format!(
            "invalid WAL segment size {} in the long page header",
            lh.seg_size
        )));
    }
    if !lh.page_size.is_power_of_two() || !(1024..=65536).contains(&lh.page_size) {
        return Err(Error::corruption(format!(
            "invalid WAL page size {} in the long page header",
            lh.page_size
        )));
    }
    if !lh.pageaddr.0.is_multiple_of(lh.seg_size as u64) {
        return Err(Error::corruption(format!(
            "page address {} of a segment's first page is not a segment boundary",
            lh.pageaddr
        )));
    }
    if lh.tli == 0 {
        return Err(Error::corruption("timeline 0 in a WAL page header"));
    }
    Ok(lh)
}

#[cfg(any(test, feature = "test-synth"))]
#[allow(clippy::indexing_slicing)] // test-only code
pub mod synth;
#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests;
