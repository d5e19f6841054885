//! From WAL bytes to per-segment [`SegmentIndex`]es.

use crate::error::{Error, Result};
use crate::index::SegmentIndex;
use crate::types::TimeLineId;

/// Supplies the bytes of the segment `segno` on the same timeline, or `Ok(None)` when it is
/// not (yet) available. Used to complete a record that crosses a segment's end.
pub type NextSegment<'a> = dyn FnMut(u64) -> Result<Option<Vec<u8>>> + 'a;

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
    _tli: TimeLineId,
    _segno: u64,
    _data: &[u8],
    _next: &mut NextSegment<'_>,
) -> Result<SegmentIndex> {
    Err(Error::invalid("index_segment is not implemented yet"))
}
