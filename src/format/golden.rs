//! Golden tests of the on-disk formats: fixed inputs whose encodings are checked in here,
//! so that a change of any format shows up as a failing test (then bump the format's
//! version and keep reading the old one, or update the bytes on purpose).
//!
//! Where an encoding has parts that may legitimately change with the LZ4 library (the
//! compressed blocks), the deterministic parts (headers, trailers, checksums) are compared
//! byte for byte and a checked-in blob must still decode.
//!
//! Tests already next to the code are not repeated here: `index` (round trip, `golden_v1`,
//! flipped bytes, unknown version, fuzzing), `segment` (round trip, flipped bytes, unknown
//! format), `manifest` (round trip, golden text, flipped byte, unknown version) and
//! `incfile` (round trip, golden empty file, flipped byte, unknown version).

use super::{incfile, manifest, segment};
use crate::ErrorKind;

/// Prints `b` as a Rust array, for updating a golden on purpose.
fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("0x{x:02x}, ")).collect()
}

// ---- segment: an archived WAL file ----

/// The original bytes of the golden archived file.
fn segment_data() -> Vec<u8> {
    b"walnut golden segment: the same bytes, again and again, again and again.\n".repeat(4)
}

fn segment_meta() -> segment::FileMeta {
    segment::FileMeta {
        format: 1,
        name: "000000010000000000000001".into(),
        size: 292,
        crc32c: 2_056_484_549,
        system_id: 7_300_112_233_445_566,
        archived_at: 1_700_000_000,
    }
}

/// The metadata header: a skippable frame (magic 0x184D2A5A, length 131) holding the JSON.
const SEGMENT_HEADER_JSON: &str = "{\"format\":1,\"name\":\"000000010000000000000001\",\
     \"size\":292,\"crc32c\":2056484549,\"system_id\":7300112233445566,\
     \"archived_at\":1700000000}";

/// The LZ4 frame header walnut writes for 292 bytes: magic 0x184D2204, FLG (version 1,
/// independent blocks, content size, content checksum), BD (64 KiB blocks), content size
/// 292 (u64), header checksum.
const SEGMENT_FRAME_HEAD: [u8; 15] = [
    0x04, 0x22, 0x4d, 0x18, 0x6c, 0x40, 0x24, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02,
];

/// The frame's end: EndMark, then the xxh32 of the content.
const SEGMENT_FRAME_TAIL: [u8; 8] = [0x00, 0x00, 0x00, 0x00, 0x02, 0xeb, 0x78, 0x81];

/// A whole archived file as walnut wrote it (lz4_flex 0.11).
#[rustfmt::skip]
const SEGMENT_BLOB: [u8; 234] = [
    0x5a, 0x2a, 0x4d, 0x18, 0x83, 0x00, 0x00, 0x00, 0x7b, 0x22, 0x66, 0x6f,
    0x72, 0x6d, 0x61, 0x74, 0x22, 0x3a, 0x31, 0x2c, 0x22, 0x6e, 0x61, 0x6d,
    0x65, 0x22, 0x3a, 0x22, 0x30, 0x30, 0x30, 0x30, 0x30, 0x30, 0x30, 0x31,
    0x30, 0x30, 0x30, 0x30, 0x30, 0x30, 0x30, 0x30, 0x30, 0x30, 0x30, 0x30,
    0x30, 0x30, 0x30, 0x31, 0x22, 0x2c, 0x22, 0x73, 0x69, 0x7a, 0x65, 0x22,
    0x3a, 0x32, 0x39, 0x32, 0x2c, 0x22, 0x63, 0x72, 0x63, 0x33, 0x32, 0x63,
    0x22, 0x3a, 0x32, 0x30, 0x35, 0x36, 0x34, 0x38, 0x34, 0x35, 0x34, 0x39,
    0x2c, 0x22, 0x73, 0x79, 0x73, 0x74, 0x65, 0x6d, 0x5f, 0x69, 0x64, 0x22,
    0x3a, 0x37, 0x33, 0x30, 0x30, 0x31, 0x31, 0x32, 0x32, 0x33, 0x33, 0x34,
    0x34, 0x35, 0x35, 0x36, 0x36, 0x2c, 0x22, 0x61, 0x72, 0x63, 0x68, 0x69,
    0x76, 0x65, 0x64, 0x5f, 0x61, 0x74, 0x22, 0x3a, 0x31, 0x37, 0x30, 0x30,
    0x30, 0x30, 0x30, 0x30, 0x30, 0x30, 0x7d, 0x04, 0x22, 0x4d, 0x18, 0x6c,
    0x40, 0x24, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x44, 0x00,
    0x00, 0x00, 0xf2, 0x21, 0x77, 0x61, 0x6c, 0x6e, 0x75, 0x74, 0x20, 0x67,
    0x6f, 0x6c, 0x64, 0x65, 0x6e, 0x20, 0x73, 0x65, 0x67, 0x6d, 0x65, 0x6e,
    0x74, 0x3a, 0x20, 0x74, 0x68, 0x65, 0x20, 0x73, 0x61, 0x6d, 0x65, 0x20,
    0x62, 0x79, 0x74, 0x65, 0x73, 0x2c, 0x20, 0x61, 0x67, 0x61, 0x69, 0x6e,
    0x20, 0x61, 0x6e, 0x64, 0x0a, 0x00, 0x0d, 0x11, 0x00, 0x2f, 0x2e, 0x0a,
    0x49, 0x00, 0xc2, 0x60, 0x67, 0x61, 0x69, 0x6e, 0x2e, 0x0a, 0x00, 0x00,
    0x00, 0x00, 0x02, 0xeb, 0x78, 0x81,
];

#[test]
fn segment_golden_header_and_frame_ends() {
    let data = segment_data();
    let meta = segment_meta();
    assert_eq!(
        (data.len() as u64, crc32c::crc32c(&data)),
        (meta.size, meta.crc32c)
    );
    let mut want = vec![0x5a, 0x2a, 0x4d, 0x18];
    want.extend_from_slice(&(SEGMENT_HEADER_JSON.len() as u32).to_le_bytes());
    want.extend_from_slice(SEGMENT_HEADER_JSON.as_bytes());
    assert_eq!(SEGMENT_HEADER_JSON.len(), 0x83);
    let header = segment::header(&meta).unwrap();
    assert_eq!(header, want, "\n{}", hex(&header));

    let enc = segment::encode(&meta, &data).unwrap();
    let frame = enc.get(header.len()..).unwrap();
    assert!(frame.starts_with(&SEGMENT_FRAME_HEAD), "\n{}", hex(frame));
    assert!(frame.ends_with(&SEGMENT_FRAME_TAIL), "\n{}", hex(frame));
    assert_eq!(segment::decode(&enc, "golden").unwrap(), (meta, data));
}

#[test]
fn segment_golden_blob_decodes() {
    assert!(SEGMENT_BLOB.starts_with(&segment::header(&segment_meta()).unwrap()));
    let (meta, data) = segment::decode(&SEGMENT_BLOB, "golden.lz4").unwrap();
    assert_eq!(meta, segment_meta());
    assert_eq!(data, segment_data());
    let (meta, at) = segment::decode_meta(&SEGMENT_BLOB, "golden.lz4").unwrap();
    assert_eq!((meta, at), (segment_meta(), 8 + 0x83));
}

#[test]
fn segment_golden_blob_with_a_flipped_byte_fails() {
    // Every byte after the metadata header: LZ4's own checks or the CRC-32C catch it, or
    // the bit does not matter (the match-length bits of a block's last token, which has
    // literals only) and the content is intact. Never damaged content.
    let data = segment_data();
    let mut harmless = 0;
    for i in 8 + 0x83..SEGMENT_BLOB.len() {
        let mut bad = SEGMENT_BLOB;
        if let Some(b) = bad.get_mut(i) {
            *b ^= 0x01;
        }
        match segment::decode(&bad, "golden.lz4") {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Corruption, "byte {i}: {e}");
                assert!(e.message().starts_with("golden.lz4: "), "byte {i}: {e}");
            }
            Ok((_, d)) => {
                assert_eq!(d, data, "byte {i}: damaged content served");
                harmless += 1;
            }
        }
    }
    assert!(harmless <= 1, "{harmless} flipped bytes went unnoticed");
    // Content changed consistently with LZ4's checksum but not with the header's CRC.
    let mut other = data.clone();
    if let Some(b) = other.get_mut(10) {
        *b = b'G';
    }
    let forged = segment::encode(&segment_meta(), &other).unwrap();
    let e = segment::decode(&forged, "golden.lz4").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corruption, "{e}");
}

#[test]
fn segment_unknown_format_in_the_golden_blob_is_refused() {
    let mut bad = SEGMENT_BLOB;
    // `"format":1` is at bytes 8..18 of the file; make it 7.
    let at = 8 + SEGMENT_HEADER_JSON.find("1,").unwrap();
    if let Some(b) = bad.get_mut(at) {
        *b = b'7';
    }
    let e = segment::decode(&bad, "golden.lz4").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corruption);
    assert!(
        e.message()
            .contains("golden.lz4: unknown archive file format 7 (this walnut reads 1)"),
        "{e}"
    );
}

// ---- incfile: an incremental data file ----

/// Block size of the golden incremental files: small, so that the files fit here (the
/// format takes any block size; real files use the cluster's, 8192 by default).
const BS: u32 = 64;

/// An uncompressed file: page 1 = bytes 0..64, file of 3 blocks, no limit. Fully
/// deterministic.
#[rustfmt::skip]
const INC_PLAIN: [u8; 104] = [
    // magic "WNINCR\r\n", version 1, reserved, block size 64
    0x57, 0x4e, 0x49, 0x4e, 0x43, 0x52, 0x0d, 0x0a, 0x01, 0x00, 0x00, 0x00,
    0x40, 0x00, 0x00, 0x00,
    // record: block 1, 64 stored bytes, the page
    0x01, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00,
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b,
    0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17,
    0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x21, 0x22, 0x23,
    0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e, 0x2f,
    0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x3b,
    0x3c, 0x3d, 0x3e, 0x3f,
    // trailer: 1 block, file of 3 blocks, no limit, CRC-32C of everything before
    0x01, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0xff, 0xf5, 0x7c, 0x16, 0xa0,
];

/// A compressed file as walnut wrote it (lz4_flex 0.11): block 2 all zeros (LZ4, 12
/// bytes), block 5 noise (stored whole: compression would not save), file of 8 blocks,
/// limit 6.
#[rustfmt::skip]
const INC_COMPRESSED: [u8; 124] = [
    0x57, 0x4e, 0x49, 0x4e, 0x43, 0x52, 0x0d, 0x0a, 0x01, 0x00, 0x00, 0x00,
    0x40, 0x00, 0x00, 0x00,
    0x02, 0x00, 0x00, 0x00, 0x0c, 0x00, 0x00, 0x00,
    0x1f, 0x00, 0x01, 0x00, 0x26, 0x60, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x05, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00,
    0x00, 0xbb, 0x77, 0x33, 0xef, 0xab, 0x66, 0x22, 0xde, 0x9a, 0x56, 0x11,
    0xcd, 0x89, 0x45, 0x01, 0xbc, 0x78, 0x34, 0xf0, 0xac, 0x67, 0x23, 0xdf,
    0x9b, 0x57, 0x12, 0xce, 0x8a, 0x46, 0x02, 0xbd, 0x79, 0x35, 0xf1, 0xad,
    0x68, 0x24, 0xe0, 0x9c, 0x58, 0x13, 0xcf, 0x8b, 0x47, 0x03, 0xbe, 0x7a,
    0x36, 0xf2, 0xae, 0x69, 0x25, 0xe1, 0x9d, 0x59, 0x14, 0xd0, 0x8c, 0x48,
    0x04, 0xbf, 0x7b, 0x37,
    0x02, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00,
    0x91, 0x80, 0x63, 0x00,
];

fn noisy_page() -> Vec<u8> {
    (0..BS)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

type Pages = Vec<(u32, Vec<u8>)>;

/// Decodes a whole incremental file with the format's I/O-free parts (header, record
/// headers, pages, trailer) and checks its CRC-32C, as any reader must.
fn inc_decode(b: &[u8]) -> crate::Result<(incfile::IncInfo, Pages)> {
    let what = "golden.winc";
    let bad = |m: &str| crate::Error::corruption(format!("{what}: {m}"));
    let (covered, crc) = b.split_last_chunk::<4>().ok_or_else(|| bad("too short"))?;
    let (head, mut rest) = covered
        .split_at_checked(incfile::HEADER_LEN)
        .ok_or_else(|| bad("too short"))?;
    incfile::check_header(head, what, BS)?;
    if crc32c::crc32c(covered) != u32::from_le_bytes(*crc) {
        return Err(bad("checksum mismatch"));
    }
    let trailer_fields = incfile::TRAILER_LEN - 4;
    let mut pages = Vec::new();
    while rest.len() > trailer_fields {
        let at = (b.len() - 4 - rest.len()) as u64;
        let (rh, body) = rest
            .split_at_checked(incfile::RECORD_HEADER_LEN)
            .ok_or_else(|| bad("truncated record"))?;
        let left = (body.len() - trailer_fields) as u64;
        let (blkno, slen) = incfile::parse_record_header(rh, left, what, at, BS)?;
        let (stored, next) = body.split_at(slen);
        let mut page = vec![0u8; BS as usize];
        incfile::decode_page(stored, &mut page, what, blkno)?;
        pages.push((blkno, page));
        rest = next;
    }
    let mut t = rest.to_vec();
    t.extend_from_slice(crc);
    Ok((incfile::parse_trailer(&t), pages))
}

#[test]
fn incfile_golden_bytes_of_a_plain_file() {
    let mut w = incfile::IncWriter::new(Vec::new(), BS, false).unwrap();
    let page: Vec<u8> = (0..BS as u8).collect();
    w.add(1, &page).unwrap();
    let (b, n, crc) = w.finish_with_crc(3, None).unwrap();
    assert_eq!(b, INC_PLAIN, "\n{}", hex(&b));
    assert_eq!((n, crc), (104, 0xa016_7cf5));
    let (info, pages) = inc_decode(&INC_PLAIN).unwrap();
    assert_eq!(
        info,
        incfile::IncInfo {
            nblocks: 1,
            file_blocks: 3,
            limit_block: None
        }
    );
    assert_eq!(pages, vec![(1, page)]);
    // A file whose records all hold whole pages can be addressed by record number.
    assert_eq!(incfile::whole_page_file_size(1, BS), 104);
    assert_eq!(incfile::record_offset(0, BS), 16);
}

#[test]
fn incfile_golden_compressed_blob_decodes() {
    let (info, pages) = inc_decode(&INC_COMPRESSED).unwrap();
    assert_eq!(
        info,
        incfile::IncInfo {
            nblocks: 2,
            file_blocks: 8,
            limit_block: Some(6)
        }
    );
    assert_eq!(pages, vec![(2, vec![0; BS as usize]), (5, noisy_page())]);
    // The writer's deterministic parts: header, record headers, the page kept whole,
    // trailer fields and the CRC of whatever it wrote.
    let mut w = incfile::IncWriter::new(Vec::new(), BS, true).unwrap();
    w.add(2, &[0; BS as usize]).unwrap();
    w.add(5, &noisy_page()).unwrap();
    let (b, _) = w.finish(8, Some(6)).unwrap();
    assert!(
        b.starts_with(INC_COMPRESSED.get(..20).unwrap()),
        "\n{}",
        hex(&b)
    );
    let tail = |f: &[u8]| f.get(f.len() - 88..f.len() - 4).map(<[u8]>::to_vec);
    assert_eq!(tail(&b), tail(&INC_COMPRESSED), "\n{}", hex(&b));
    assert_eq!(inc_decode(&b).unwrap(), (info, pages));
}

#[test]
fn incfile_golden_with_a_flipped_byte_fails_the_checksum() {
    for i in 0..INC_COMPRESSED.len() {
        let mut bad = INC_COMPRESSED;
        if let Some(b) = bad.get_mut(i) {
            *b ^= 0x04;
        }
        let e = inc_decode(&bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption, "byte {i}: {e}");
    }
}

#[test]
fn incfile_unknown_version_is_refused_by_name() {
    let mut bad = INC_PLAIN;
    bad[8] = 9;
    let e = incfile::check_header(&bad, "base/5/16384.winc", BS).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corruption);
    assert_eq!(
        e.message(),
        "base/5/16384.winc: incremental file format version 9 is not supported \
         (this walnut reads version 1)"
    );
    let e = incfile::check_header(&INC_PLAIN, "f", 8192).unwrap_err();
    assert!(e.message().contains("block size 64, expected 8192"), "{e}");
    let e = incfile::check_header(&INC_PLAIN[..10], "f", BS).unwrap_err();
    assert!(e.message().contains("bad magic"), "{e}");
}

// ---- manifest: a backup's file list ----

/// A version 2 manifest with a fixed END checksum.
const MANIFEST_V2: &str = "WALNUT-MANIFEST 2\n\
{\"path\":\"base\",\"storage\":\"dir\",\"size\":0,\"stored_size\":0,\"crc32c\":0}\n\
{\"path\":\"base/5/16384\",\"storage\":\"incremental\",\"size\":16384,\"stored_size\":8240,\"crc32c\":3735928559,\"changed_blocks\":1,\"file_blocks\":2,\"limit_block\":2}\n\
END 2 a5d68b25\n";

fn manifest_entries() -> Vec<manifest::FileEntry> {
    vec![
        manifest::FileEntry::dir("base".into()),
        manifest::FileEntry {
            path: "base/5/16384".into(),
            storage: manifest::Storage::Incremental,
            size: 16384,
            stored_size: 8240,
            crc32c: 0xdead_beef,
            changed_blocks: Some(1),
            file_blocks: Some(2),
            limit_block: Some(2),
            lz4_frames: None,
        },
    ]
}

fn manifest_read(b: &[u8]) -> crate::Result<Vec<manifest::FileEntry>> {
    let mut v = Vec::new();
    manifest::read(b, "backups/X/manifest", |e| {
        v.push(e);
        Ok(())
    })?;
    Ok(v)
}

#[test]
fn manifest_golden_with_a_fixed_checksum() {
    let mut w = manifest::ManifestWriter::new(Vec::new(), true).unwrap();
    for e in manifest_entries() {
        w.add(&e).unwrap();
    }
    let text = String::from_utf8(w.finish().unwrap()).unwrap();
    assert_eq!(text, MANIFEST_V2);
    assert_eq!(
        manifest_read(MANIFEST_V2.as_bytes()).unwrap(),
        manifest_entries()
    );
}
