//! On-disk encoding of a [`SegmentIndex`] (magic, version, lengths, checksum trailer).

use crate::error::{Error, Result};
use crate::index::SegmentIndex;

/// Encodes an index into its file bytes.
pub fn encode(_index: &SegmentIndex) -> Vec<u8> {
    Vec::new()
}

/// Decodes and verifies index file bytes; `what` (a path) goes into error messages.
pub fn decode(_bytes: &[u8], what: &str) -> Result<SegmentIndex> {
    Err(Error::invalid(format!(
        "{what}: index decoding is not implemented yet"
    )))
}
