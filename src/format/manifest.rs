//! The backup manifest: one line per directory and file of a backup.
//!
//! ```text
//! Format (text, one record per line, '\n'-terminated): {
//!   "WALNUT-MANIFEST <version>"              magic and version (1 or 2)
//!   <FileEntry as one-line JSON>*            in the order they were written
//!   "END <entries> <crc32c as 8 hex digits>" entry count; CRC-32C of every byte before it
//! }
//! ```
//! Written and read as a stream, so a backup of millions of files never holds its file list
//! in memory to write it.
//!
//! Version 2 (compressed backups): `full_lz4` files may be stored as several LZ4 frames
//! (`lz4_frames`). A reader of version 1 would stop at the end of the first frame, so such
//! manifests say 2, and a walnut that reads only 1 refuses them clearly. Uncompressed
//! backups still write 1.
//!
//! The manifest is untrusted input (whoever can write the catalog can write it): every entry
//! is checked as it is read ([`check_entry`]), so no reader ever joins an absolute, `..` or
//! otherwise unnormalised path to a directory. Entries are logical paths relative to PGDATA;
//! one below `pg_tblspc/` must name a tablespace by its numeric OID.

#![deny(clippy::indexing_slicing)]

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::safepath;

pub const MAGIC_LINE: &str = "WALNUT-MANIFEST";
/// The manifest's name in a backup directory.
pub const FILE_NAME: &str = "manifest";
/// The newest version; [`ManifestWriter::new`] writes 1 unless asked for frames.
pub const VERSION: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// A directory (no content).
    Dir,
    /// The file as is.
    Full,
    /// The whole file LZ4-compressed: one frame, or (see [`Lz4Frames`]) a sequence of frames
    /// of a fixed decoded size. Either way `lz4 -d` gives the file.
    FullLz4,
    /// An incremental file (see `incfile`).
    Incremental,
}

/// One directory or file of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Logical path relative to PGDATA (`pg_tblspc/<oid>/...` for tablespaces).
    pub path: String,
    pub storage: Storage,
    /// Bytes of the source file when it was copied.
    #[serde(default)]
    pub size: u64,
    /// Bytes stored in the backup.
    #[serde(default)]
    pub stored_size: u64,
    /// CRC-32C of the stored bytes.
    #[serde(default)]
    pub crc32c: u32,
    /// Incremental files: pages stored, the file's length in blocks and the limit block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_blocks: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_blocks: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_block: Option<u32>,
    /// `FullLz4` files stored as more than one frame (absent in backups from before frames,
    /// which hold one): lets a restore decode the frames on several threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lz4_frames: Option<Lz4Frames>,
}

/// The frames of a `FullLz4` file: frame `k` holds decoded bytes
/// `k * frame_bytes .. (k + 1) * frame_bytes` (the last one the rest) and takes `stored[k]`
/// bytes of the stored file, from the sum of the ones before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lz4Frames {
    pub frame_bytes: u64,
    pub stored: Vec<u64>,
}

impl FileEntry {
    pub fn dir(path: String) -> FileEntry {
        FileEntry {
            path,
            storage: Storage::Dir,
            size: 0,
            stored_size: 0,
            crc32c: 0,
            changed_blocks: None,
            file_blocks: None,
            limit_block: None,
            lz4_frames: None,
        }
    }

    /// Where the content is stored, relative to the backup directory.
    pub fn stored_path(&self) -> String {
        stored_path(&self.path, self.storage)
    }
}

pub fn stored_path(path: &str, storage: Storage) -> String {
    match storage {
        Storage::Dir | Storage::Full => format!("database/{path}"),
        Storage::FullLz4 => format!("database/{path}.lz4"),
        Storage::Incremental => format!("database/{path}.winc"),
    }
}

/// Streams entries into a writer.
pub struct ManifestWriter<W: Write> {
    out: W,
    crc: u32,
    n: u64,
}

impl<W: Write> ManifestWriter<W> {
    /// `lz4_frames`: entries may carry [`Lz4Frames`] (version 2); else version 1.
    pub fn new(mut out: W, lz4_frames: bool) -> std::io::Result<ManifestWriter<W>> {
        let version = if lz4_frames { VERSION } else { 1 };
        let first = format!("{MAGIC_LINE} {version}\n");
        out.write_all(first.as_bytes())?;
        Ok(ManifestWriter {
            out,
            crc: crc32c::crc32c(first.as_bytes()),
            n: 0,
        })
    }

    pub fn add(&mut self, e: &FileEntry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.crc = crc32c::crc32c_append(self.crc, &line);
        self.n += 1;
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        let last = format!("END {} {:08x}\n", self.n, self.crc);
        self.out.write_all(last.as_bytes())?;
        Ok(self.out)
    }
}

#[allow(clippy::explicit_counter_loop)]
/// Reads a manifest, calling `f` per entry; verifies version, count and CRC. Entries are
/// delivered before the CRC is known to match: callers must discard work on error.
pub fn read(
    r: impl BufRead,
    what: &str,
    mut f: impl FnMut(FileEntry) -> Result<()>,
) -> Result<u64> {
    let bad = |m: String| Error::corruption(format!("{what}: {m}"));
    let mut lines = r.split(b'\n');
    let first = lines
        .next()
        .ok_or_else(|| bad("empty manifest".into()))?
        .map_err(|e| bad(e.to_string()))?;
    let first_s = String::from_utf8_lossy(&first);
    let version = first_s
        .strip_prefix(MAGIC_LINE)
        .map(str::trim)
        .ok_or_else(|| bad("not a walnut manifest (bad magic)".into()))?;
    if version != "1" && version != VERSION.to_string() {
        return Err(bad(format!(
            "manifest format version {version} is not supported (this walnut reads versions 1 to {VERSION})"
        )));
    }
    let mut crc = crc32c::crc32c(&first);
    crc = crc32c::crc32c_append(crc, b"\n");
    let mut n = 0u64;
    for line in lines {
        let line = line.map_err(|e| bad(e.to_string()))?;
        if let Some(rest) = line.strip_prefix(b"END ") {
            let rest = String::from_utf8_lossy(rest);
            let mut it = rest.split_whitespace();
            let count: u64 = it
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("bad END line".into()))?;
            let stored = it
                .next()
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .ok_or_else(|| bad("bad END line".into()))?;
            if stored != crc {
                return Err(bad(format!(
                    "checksum mismatch (stored {stored:08x}, computed {crc:08x})"
                )));
            }
            if count != n {
                return Err(bad(format!("END says {count} entries, found {n}")));
            }
            return Ok(n);
        }
        crc = crc32c::crc32c_append(crc, &line);
        crc = crc32c::crc32c_append(crc, b"\n");
        let e: FileEntry =
            serde_json::from_slice(&line).map_err(|e| bad(format!("entry {}: {e}", n + 1)))?;
        n += 1;
        check_entry(&e, &format!("{what}: entry {n}"))?;
        f(e)?;
    }
    Err(bad("truncated (no END line)".into()))
}

/// Checks one entry read from a manifest: its path must be a normalised relative path (see
/// [`safepath::check_rel_path`]), and one below `pg_tblspc/` must start with a numeric OID.
/// Refused entries are corruption; `what` names the manifest and the entry.
pub fn check_entry(e: &FileEntry, what: &str) -> Result<()> {
    safepath::check_rel_path(&e.path, what)?;
    if let Some(rest) = e.path.strip_prefix("pg_tblspc/") {
        let oid = rest.split('/').next().unwrap_or("");
        if oid.is_empty() || oid.len() > 10 || !oid.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::corruption(format!(
                "{what}: unsafe path {:?}: a tablespace entry must start with pg_tblspc/<numeric oid>",
                e.path
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn sample() -> Vec<FileEntry> {
        vec![
            FileEntry::dir("base".into()),
            FileEntry {
                path: "base/5/16384".into(),
                storage: Storage::Incremental,
                size: 16384,
                stored_size: 8240,
                crc32c: 0xdeadbeef,
                changed_blocks: Some(1),
                file_blocks: Some(2),
                limit_block: Some(2),
                lz4_frames: None,
            },
            FileEntry {
                path: "base/5/16385".into(),
                storage: Storage::FullLz4,
                size: 80 << 20,
                stored_size: 300,
                crc32c: 0xfeedf00d,
                changed_blocks: None,
                file_blocks: None,
                limit_block: None,
                lz4_frames: Some(Lz4Frames {
                    frame_bytes: 32 << 20,
                    stored: vec![100, 100, 100],
                }),
            },
        ]
    }

    fn write(entries: &[FileEntry]) -> Vec<u8> {
        let mut w = ManifestWriter::new(Vec::new(), true).unwrap();
        for e in entries {
            w.add(e).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_back(b: &[u8]) -> Result<Vec<FileEntry>> {
        let mut v = Vec::new();
        read(b, "m", |e| {
            v.push(e);
            Ok(())
        })?;
        Ok(v)
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(read_back(&write(&s)).unwrap(), s);
    }

    #[test]
    fn golden() {
        let mut w = ManifestWriter::new(Vec::new(), false).unwrap();
        w.add(&sample()[0]).unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        let body = "WALNUT-MANIFEST 1\n{\"path\":\"base\",\"storage\":\"dir\",\"size\":0,\"stored_size\":0,\"crc32c\":0}\n";
        assert_eq!(
            text,
            format!("{body}END 1 {:08x}\n", crc32c::crc32c(body.as_bytes()))
        );
        assert_eq!(read_back(text.as_bytes()).unwrap(), sample()[..1]);
        // version 2, with a file stored as LZ4 frames
        let mut w = ManifestWriter::new(Vec::new(), true).unwrap();
        w.add(&sample()[2]).unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        let body = "WALNUT-MANIFEST 2\n{\"path\":\"base/5/16385\",\"storage\":\"full_lz4\",\"size\":83886080,\"stored_size\":300,\"crc32c\":4277006349,\"lz4_frames\":{\"frame_bytes\":33554432,\"stored\":[100,100,100]}}\n";
        assert_eq!(
            text,
            format!("{body}END 1 {:08x}\n", crc32c::crc32c(body.as_bytes()))
        );
        assert_eq!(read_back(text.as_bytes()).unwrap(), sample()[2..]);
    }

    #[test]
    fn flipped_byte_fails() {
        let good = write(&sample());
        let pos = good.iter().position(|&c| c == b'1').unwrap() + 30;
        let mut b = good.clone();
        b[pos] ^= 0x01;
        assert_eq!(
            read_back(&b).unwrap_err().kind(),
            crate::ErrorKind::Corruption
        );
        // a truncated manifest is refused too
        assert!(read_back(&good[..good.len() - 20]).is_err());
    }

    #[test]
    fn unknown_version() {
        let mut b = write(&sample());
        b[16] = b'7';
        let e = read_back(&b).unwrap_err();
        assert!(e.to_string().contains("version 7 is not supported"), "{e}");
    }

    #[test]
    fn unsafe_paths_are_refused_when_read() {
        let file = |p: &str| FileEntry {
            path: p.into(),
            storage: Storage::Full,
            size: 1,
            stored_size: 1,
            crc32c: 0,
            changed_blocks: None,
            file_blocks: None,
            limit_block: None,
            lz4_frames: None,
        };
        for bad in [
            file("/etc/cron.d/x"),
            file("../../x"),
            file("base/../../x"),
            file("base//1"),
            file("./PG_VERSION"),
            file(""),
            file("pg_tblspc/abc/PG_15/1/2"),
            file("pg_tblspc//x"),
            FileEntry::dir("/tmp/victim".into()),
            FileEntry::dir("pg_tblspc/..".into()),
        ] {
            let b = write(&[sample()[0].clone(), bad.clone()]);
            let e = read_back(&b).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corruption, "{bad:?}: {e}");
            assert!(e.to_string().contains("entry 2"), "{e}");
            assert!(e.to_string().contains(&format!("{:?}", bad.path)), "{e}");
        }
        for good in [
            "PG_VERSION",
            "pg_tblspc",
            "pg_tblspc/16400",
            "pg_tblspc/16400/PG_15_202209061/5/16401",
            "base/5/16384.1",
        ] {
            read_back(&write(&[file(good)])).unwrap();
        }
    }
}
