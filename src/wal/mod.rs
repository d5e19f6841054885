//! Sans-IO WAL decoder (PostgreSQL 13–18). Push bytes in, get records out; files, pipes and
//! archives stay outside. All knowledge of the WAL layout lives in this module.

use crate::error::{Error, Result};
use crate::types::{Lsn, TimeLineId};

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

/// Parses and checks the long page header at the start of a segment: known page magic,
/// the long-header flag, a valid segment size and WAL page size. The caller checks the
/// system identifier and the expected `pageaddr`.
pub fn read_long_header(_segment_start: &[u8]) -> Result<LongPageHeader> {
    Err(Error::invalid("read_long_header is not implemented yet"))
}
