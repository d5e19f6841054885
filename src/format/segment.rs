//! One archived file: a small JSON metadata header in an LZ4 *skippable frame*, followed by
//! one or more standard LZ4 frames whose concatenated contents are the original bytes
//! (walnut-archive writes two, compressed in parallel).
//!
//! ```text
//! Format: {
//!   skippable frame: magic 0x184D2A5A u32 LE | length u32 LE | FileMeta as JSON (length bytes)
//!   LZ4 frame(s):    magic 0x184D2204 | FLG/BD (independent 64 KiB blocks, content size,
//!                    content checksum or not) | content size u64 | HC | blocks ... | EndMark
//!                    [| xxh32 of the frame's content]
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
//! - Every read checks our CRC-32C + size from the header over the whole content
//!   ([`decode`] always does, whatever the frames carry). `walnut-archive` and
//!   `walnut receive` write segments' frames without LZ4's optional xxh32 content checksum
//!   ([`compress_frame_fast`]: the CRC-32C alone guards them, as it guards every file; the
//!   xxh32 pass cost about 5% of a push's CPU). Files archived by earlier versions, and
//!   small files ([`encode`]), carry it, verified while decoding as a second check; `lz4 -d`
//!   and all walnut versions read both kinds, since the content checksum is optional in
//!   the LZ4 frame format.

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

/// LZ4 frame format: block maximum size of the frames [`compress_frame_fast`] writes.
const FAST_BLOCK: usize = 64 << 10;
/// Header of such a frame: magic, FLG, BD, content size (u64), HC.
const FAST_HEADER: usize = 4 + 2 + 8 + 1;

/// The room [`compress_frame_fast`] needs in its output buffer for `len` bytes of input.
pub fn fast_frame_bound(len: usize) -> usize {
    let blocks = len.div_ceil(FAST_BLOCK).max(1);
    FAST_HEADER + blocks * 4 + lz4_flex::block::get_maximum_output_size(FAST_BLOCK) * blocks + 4
}

/// One LZ4 frame holding `data`, written into `out` (which is grown to
/// [`fast_frame_bound`] when shorter, and never shrunk, so that a buffer reused for every
/// segment is not zeroed again); returns the frame's length at the start of `out`.
/// Independent 64 KiB blocks compressed straight from `data` into `out`, a content size,
/// and no content checksum: no copy of the input and no xxh32 pass over it (the header's
/// CRC-32C guards the content, see the module documentation). Decodes as
/// [`compress_frame`]'s frames do, with `lz4 -d` too.
pub fn compress_frame_fast(data: &[u8], out: &mut Vec<u8>, what: &str) -> Result<usize> {
    let need = fast_frame_bound(data.len());
    if out.len() < need {
        out.resize(need, 0);
    }
    let short = || Error::invalid(format!("{what}: LZ4 output buffer too small"));
    // FLG: version 01, independent blocks, content size; BD: 64 KiB blocks.
    let size = (data.len() as u64).to_le_bytes();
    let mut desc = [0b0110_1000, 0b0100_0000, 0, 0, 0, 0, 0, 0, 0, 0];
    for (d, s) in desc.iter_mut().skip(2).zip(size) {
        *d = s;
    }
    let hc = (xxh32_short(&desc) >> 8) as u8;
    let mut pos = 0;
    let put = |out: &mut Vec<u8>, pos: &mut usize, b: &[u8]| -> Result<()> {
        out.get_mut(*pos..*pos + b.len())
            .ok_or_else(short)?
            .copy_from_slice(b);
        *pos += b.len();
        Ok(())
    };
    put(out, &mut pos, &0x184D_2204u32.to_le_bytes())?;
    put(out, &mut pos, &desc)?;
    put(out, &mut pos, &[hc])?;
    for block in data.chunks(FAST_BLOCK) {
        let dst = out.get_mut(pos + 4..).ok_or_else(short)?;
        let n = lz4_flex::block::compress_into(block, dst)
            .map_err(|e| Error::invalid(format!("{what}: LZ4 compression failed: {e}")))?;
        if n < block.len() {
            put(out, &mut pos, &(n as u32).to_le_bytes())?;
            pos += n;
        } else {
            // Incompressible: stored as is (the high bit of the size says so).
            put(
                out,
                &mut pos,
                &(block.len() as u32 | 0x8000_0000).to_le_bytes(),
            )?;
            put(out, &mut pos, block)?;
        }
    }
    put(out, &mut pos, &0u32.to_le_bytes())?;
    Ok(pos)
}

/// xxh32 (seed 0) of fewer than 16 bytes: the LZ4 frame descriptor's header checksum.
fn xxh32_short(b: &[u8]) -> u32 {
    const P1: u32 = 2_654_435_761;
    const P2: u32 = 2_246_822_519;
    const P3: u32 = 3_266_489_917;
    const P4: u32 = 668_265_263;
    const P5: u32 = 374_761_393;
    debug_assert!(b.len() < 16);
    let mut h = P5.wrapping_add(b.len() as u32);
    let mut words = b.chunks_exact(4);
    for w in &mut words {
        let v = w.try_into().map(u32::from_le_bytes).unwrap_or(0);
        h = h
            .wrapping_add(v.wrapping_mul(P3))
            .rotate_left(17)
            .wrapping_mul(P4);
    }
    for &x in words.remainder() {
        h = h
            .wrapping_add(u32::from(x).wrapping_mul(P5))
            .rotate_left(11)
            .wrapping_mul(P1);
    }
    h ^= h >> 15;
    h = h.wrapping_mul(P2);
    h ^= h >> 13;
    h = h.wrapping_mul(P3);
    h ^ (h >> 16)
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

    /// Frames without a content checksum, written straight from the input: they decode
    /// (the LZ4 header checksum is right, incompressible blocks are stored), several in one
    /// file and in a reused buffer, and damage is still caught (by the CRC-32C).
    #[test]
    fn fast_frames_decode_and_damage_is_caught() {
        let mut data: Vec<u8> = (0..300_000u32).map(|i| (i % 97) as u8).collect();
        // an incompressible stretch
        let mut x = 12345u32;
        for b in data.iter_mut().skip(70_000).take(70_000) {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (x >> 16) as u8;
        }
        let m = meta_for(&data);
        let (a, b) = data.split_at(150_001);
        let mut buf = Vec::new();
        let mut frames = Vec::new();
        for part in [a, b, &[][..]] {
            let n = compress_frame_fast(part, &mut buf, "t").unwrap();
            frames.push(buf[..n].to_vec());
        }
        let enc = assemble(&m, &frames).unwrap();
        assert_eq!(decode(&enc, "x").unwrap().1, data);
        // no content checksum: FLG bit 2 clear
        assert_eq!(frames[0][4] & 0b100, 0);
        for i in (8 + 100..enc.len()).step_by(997) {
            let mut bad = enc.clone();
            bad[i] ^= 0x20;
            match decode(&bad, "f") {
                Err(e) => assert_eq!(e.kind(), crate::ErrorKind::Corruption, "byte {i}: {e}"),
                Ok((_, d)) => assert_eq!(d, data, "byte {i}"),
            }
        }
    }

    /// `lz4 -d` (the stock tool, when installed) restores a file of fast frames.
    #[test]
    fn fast_frames_decode_with_the_lz4_tool() {
        let Ok(dir) = std::env::var("CARGO_TARGET_TMPDIR").or_else(|_| {
            std::env::temp_dir()
                .to_str()
                .map(String::from)
                .ok_or(std::env::VarError::NotPresent)
        }) else {
            return;
        };
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut buf = Vec::new();
        let n = compress_frame_fast(&data, &mut buf, "t").unwrap();
        let enc = assemble(&meta_for(&data), &[buf[..n].to_vec()]).unwrap();
        let p = std::path::Path::new(&dir).join(format!("walnut-fast-{}.lz4", std::process::id()));
        std::fs::write(&p, &enc).unwrap();
        let out = std::process::Command::new("lz4")
            .arg("-dc")
            .arg(&p)
            .output();
        let _ = std::fs::remove_file(&p);
        let Ok(out) = out else {
            return; // no lz4 tool here
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, data);
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
