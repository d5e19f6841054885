//! One archived file: a small JSON metadata header in an LZ4 *skippable frame*, followed by
//! one or more standard LZ4 frames whose concatenated contents are the original bytes
//! (walnut-archive writes two, compressed in parallel).
//!
//! ```text
//! Format: {
//!   skippable frame: magic 0x184D2A5A u32 LE | length u32 LE | FileMeta as JSON (length bytes)
//!   LZ4 frame(s):    magic 0x184D2204 | FLG/BD (independent 64 KiB blocks, content size,
//!                    content checksum) | content size u64 | HC | blocks ... | EndMark
//!                    | xxh32 of the frame's content
//! }
//! ```
//!
//! Why this shape:
//! - `lz4 -d NAME.lz4 NAME` restores the original with the stock `lz4` tool: it skips
//!   skippable frames and checks the frame's content checksum, so an operator needs nothing
//!   from walnut in an emergency; `head -c 300 NAME.lz4` shows the metadata.
//! - The checksum (CRC-32C of the original bytes, plus its size) lives *inside* the file
//!   that becomes visible by one atomic no-replace rename, so an archived file is never
//!   visible without its checksum, and there is no sidecar that could disagree with it.
//! - Two independent checks guard every read: LZ4's xxh32 content checksum (verified while
//!   decoding) and our CRC-32C + size from the header.

#![deny(clippy::indexing_slicing)]

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// LZ4 skippable frame magic (0x184D2A50..0x184D2A5F); 0xA for "archive".
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5A;
/// Upper bound for the metadata header, so a corrupt length cannot make us allocate much.
const MAX_META_LEN: u32 = 64 * 1024;

/// Metadata stored at the head of every archived file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Format version of this layout.
    pub format: u32,
    /// File name as PostgreSQL gave it (`%f`).
    pub name: String,
    /// Size of the original bytes.
    pub size: u64,
    /// CRC-32C of the original bytes.
    pub crc32c: u32,
    /// Database system identifier of the instance that archived the file.
    pub system_id: u64,
    /// When it was archived (seconds since the Unix epoch).
    pub archived_at: u64,
}

/// Encodes an archived file: metadata header + LZ4 frame of `data`.
pub fn encode(meta: &FileMeta, data: &[u8]) -> Result<Vec<u8>> {
    let frame = compress_frame(data, &meta.name)?;
    assemble(meta, &[frame])
}

/// One LZ4 frame (content size + content checksum) holding `data`. Several frames
/// concatenated decode as their concatenation (`lz4 -d` and our reader), which lets a caller
/// compress the parts of a segment on several threads.
pub fn compress_frame(data: &[u8], what: &str) -> Result<Vec<u8>> {
    let info = lz4_flex::frame::FrameInfo::new()
        .content_size(Some(data.len() as u64))
        .content_checksum(true)
        .block_size(lz4_flex::frame::BlockSize::Max64KB);
    let mut enc =
        lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::with_capacity(data.len() / 6));
    enc.write_all(data)
        .map_err(|e| Error::invalid(format!("{what}: LZ4 compression failed: {e}")))?;
    enc.finish()
        .map_err(|e| Error::invalid(format!("{what}: LZ4 compression failed: {e}")))
}

/// The file bytes: metadata header followed by the frames, in order.
pub fn assemble(meta: &FileMeta, frames: &[Vec<u8>]) -> Result<Vec<u8>> {
    let mut out = header(meta)?;
    for f in frames {
        out.extend_from_slice(f);
    }
    Ok(out)
}

/// The metadata header (skippable frame) alone; the frames follow it in the file.
pub fn header(meta: &FileMeta) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(meta)?;
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Parses only the metadata header; returns it and the offset of the LZ4 frame.
/// `what` (a path) goes into error messages.
pub fn decode_meta(bytes: &[u8], what: &str) -> Result<(FileMeta, usize)> {
    let word = |off: usize| -> Result<u32> {
        bytes
            .get(off..off + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| Error::corruption(format!("{what}: truncated archive header")))
    };
    let magic = word(0)?;
    if magic != SKIPPABLE_MAGIC {
        return Err(Error::corruption(format!(
            "{what}: not a walnut archive file (header magic {magic:#010x})"
        )));
    }
    let len = word(4)?;
    if len > MAX_META_LEN {
        return Err(Error::corruption(format!(
            "{what}: metadata length {len} is implausible"
        )));
    }
    let end = 8 + len as usize;
    let json = bytes
        .get(8..end)
        .ok_or_else(|| Error::corruption(format!("{what}: truncated metadata header")))?;
    let meta: FileMeta = serde_json::from_slice(json)
        .map_err(|e| Error::corruption(format!("{what}: metadata header: {e}")))?;
    if meta.format != 1 {
        return Err(Error::corruption(format!(
            "{what}: unknown archive file format {} (this walnut reads 1)",
            meta.format
        )));
    }
    Ok((meta, end))
}

/// Decodes and verifies an archived file: LZ4 content checksum, size and CRC-32C.
pub fn decode(bytes: &[u8], what: &str) -> Result<(FileMeta, Vec<u8>)> {
    let (meta, off) = decode_meta(bytes, what)?;
    let mut rest = bytes.get(off..).unwrap_or_default();
    let cap = usize::try_from(meta.size).unwrap_or(0).min(1 << 30);
    let mut out = Vec::with_capacity(cap);
    // One or more concatenated frames; the decoder stops at each frame's end.
    while !rest.is_empty() {
        let before = rest.len();
        let mut dec = lz4_flex::frame::FrameDecoder::new(rest);
        dec.read_to_end(&mut out)
            .map_err(|e| Error::corruption(format!("{what}: LZ4 data is damaged: {e}")))?;
        rest = dec.into_inner();
        if rest.len() >= before || out.len() as u64 > meta.size {
            return Err(Error::corruption(format!(
                "{what}: LZ4 data is damaged (trailing bytes)"
            )));
        }
    }
    if out.len() as u64 != meta.size {
        return Err(Error::corruption(format!(
            "{what}: decompressed to {} bytes, header says {}",
            out.len(),
            meta.size
        )));
    }
    let crc = crc32c::crc32c(&out);
    if crc != meta.crc32c {
        return Err(Error::corruption(format!(
            "{what}: CRC-32C mismatch (stored {:08x}, computed {crc:08x})",
            meta.crc32c
        )));
    }
    Ok((meta, out))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn meta_for(data: &[u8]) -> FileMeta {
        FileMeta {
            format: 1,
            name: "000000010000000000000001".into(),
            size: data.len() as u64,
            crc32c: crc32c::crc32c(data),
            system_id: 42,
            archived_at: 1,
        }
    }

    #[test]
    fn round_trip() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let m = meta_for(&data);
        let enc = encode(&m, &data).unwrap();
        assert!(enc.len() < data.len());
        let (m2, d2) = decode(&enc, "x").unwrap();
        assert_eq!(m2, m);
        assert_eq!(d2, data);
        let (m3, _) = decode_meta(&enc, "x").unwrap();
        assert_eq!(m3, m);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 13) as u8).collect();
        let enc = encode(&meta_for(&data), &data).unwrap();
        for i in (0..enc.len()).step_by(3) {
            let mut bad = enc.clone();
            bad[i] ^= 0x10;
            match decode(&bad, "f") {
                Err(e) => assert_eq!(e.kind(), crate::ErrorKind::Corruption, "byte {i}: {e}"),
                // a flip inside the JSON may still parse (e.g. archived_at digit): then the
                // content must be intact
                Ok((_, d)) => assert_eq!(d, data, "byte {i}"),
            }
        }
        assert!(decode(&enc[..enc.len() - 1], "f").is_err());
        assert!(decode(&[], "f").is_err());
    }

    #[test]
    fn several_frames_decode_as_one() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 97) as u8).collect();
        let m = meta_for(&data);
        let (a, b) = data.split_at(123_457);
        let enc = assemble(
            &m,
            &[
                compress_frame(a, "a").unwrap(),
                compress_frame(b, "b").unwrap(),
            ],
        )
        .unwrap();
        assert_eq!(decode(&enc, "x").unwrap().1, data);
    }

    #[test]
    fn unknown_format_is_refused() {
        let data = b"hello".to_vec();
        let mut m = meta_for(&data);
        m.format = 2;
        let enc = encode(&m, &data).unwrap();
        let e = decode(&enc, "f").unwrap_err();
        assert!(e.message().contains("unknown archive file format 2"), "{e}");
    }
}
