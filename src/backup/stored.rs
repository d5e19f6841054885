//! Reading a backup's stored objects through the catalog's store: its manifest and the
//! trailers of its incremental files. (The formats are in [`crate::format`], I/O-free.)

use std::collections::HashMap;

use crate::backup::meta::BackupMeta;
use crate::error::{Error, Result};
use crate::format::blockcrc::{self, FileCrcs};
use crate::format::incfile::{self, IncInfo, HEADER_LEN, TRAILER_LEN};
use crate::format::manifest::{self, FileEntry, Storage, FILE_NAME};
use crate::repo::Repo;

/// How an object is named in messages.
pub fn what(repo: &dyn Repo, key: &str) -> String {
    format!("{}/{key}", repo.location())
}

/// Reads the manifest of the backup at `backup_key`, calling `f` per entry (see
/// [`manifest::read`]); returns the number of entries.
pub fn read_manifest(
    repo: &dyn Repo,
    backup_key: &str,
    f: impl FnMut(FileEntry) -> Result<()>,
) -> Result<u64> {
    let key = format!("{backup_key}/{FILE_NAME}");
    let blob = repo.get(&key)?;
    manifest::read(&blob[..], &what(repo, &key), f)
}

/// The manifest of the backup at `backup_key`, in memory.
pub fn manifest_entries(repo: &dyn Repo, backup_key: &str) -> Result<Vec<FileEntry>> {
    let mut v = Vec::new();
    read_manifest(repo, backup_key, |e| {
        v.push(e);
        Ok(())
    })?;
    Ok(v)
}

/// Reads only the header and trailer of the incremental file at `key` (not
/// checksum-verified: [`incfile::read_stream`] verifies), with two ranged reads.
pub fn inc_info(repo: &dyn Repo, key: &str, block_size: u32) -> Result<IncInfo> {
    let w = what(repo, key);
    let len = repo
        .head(key)?
        .ok_or_else(|| Error::not_found(format!("{w}: not found")))?
        .size;
    if len < (HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(Error::corruption(format!(
            "{w}: incremental file too short ({len} bytes)"
        )));
    }
    let h = repo.get_range(key, 0, HEADER_LEN as u64)?;
    incfile::check_header(&h, &w, block_size)?;
    let t = repo.get_range(key, len - TRAILER_LEN as u64, TRAILER_LEN as u64)?;
    Ok(incfile::parse_trailer(&t))
}

/// The block checksums of backup `b` (`None` when its backup.json names no such object),
/// `entries` its manifest. The object backup.json names must exist and be whole (size and
/// CRC as recorded, its own checksum); its size is bounded by what the manifest's files
/// can need before it is read; it may name only files of the manifest, stored as it says
/// (whole and uncompressed, or incremental of whole-page records), and each file's list
/// must combine into the manifest's CRC of the stored file. Anything else is an error
/// naming the object.
pub fn block_crcs(
    repo: &dyn Repo,
    b: &BackupMeta,
    entries: &[&FileEntry],
) -> Result<Option<HashMap<String, FileCrcs>>> {
    let Some(r) = b.block_crcs else {
        return Ok(None);
    };
    let bs = b.block_size;
    let key = format!("{}/{}", b.key()?, blockcrc::FILE_NAME);
    let what = what(repo, &key);
    let bound: u64 = entries
        .iter()
        .map(|e| 7 + e.path.len() as u64 + 8 * (e.size / bs.max(1) as u64 + 1))
        .sum::<u64>()
        + (blockcrc::HEADER_LEN + blockcrc::TRAILER_LEN) as u64;
    if r.size > bound {
        return Err(Error::corruption(format!(
            "{what}: backup.json says {} bytes, more than the block checksums of the backup's files can take ({bound})",
            r.size
        )));
    }
    let blob = match repo.get(&key) {
        Ok(b) => b,
        Err(e) if e.kind() == crate::ErrorKind::NotFound => {
            return Err(Error::corruption(format!(
                "{what}: missing, but backup {}'s backup.json says it has block checksums",
                b.id
            )))
        }
        Err(e) => return Err(e),
    };
    let files = blockcrc::parse(&blob, &what, bs, &r)?;
    let by_path: HashMap<&str, &FileEntry> =
        entries.iter().map(|e| (e.path.as_str(), *e)).collect();
    let shift = blockcrc::Shift::new(bs as usize);
    for (path, fc) in &files {
        let Some(e) = by_path.get(path.as_str()) else {
            return Err(Error::corruption(format!(
                "{what}: names \"{path}\", which is not a file of backup {}",
                b.id
            )));
        };
        let ok = match (e.storage, fc) {
            (Storage::Full, FileCrcs::Whole(c)) => {
                e.stored_size == e.size && blockcrc::check_whole(c, e.size, bs, &shift, e.crc32c)
            }
            (Storage::Incremental, FileCrcs::Inc(recs)) => match e.file_blocks {
                Some(fb) => {
                    e.changed_blocks == Some(recs.len() as u32)
                        && e.stored_size == incfile::whole_page_file_size(recs.len() as u32, bs)
                        && blockcrc::check_incremental(
                            recs,
                            bs,
                            fb,
                            e.limit_block,
                            &shift,
                            e.crc32c,
                        )
                }
                None => false,
            },
            _ => false,
        };
        if !ok {
            return Err(Error::corruption(format!(
                "{what}: the block checksums of \"{path}\" do not match its manifest entry (size and CRC of the stored file, backup {})",
                b.id
            )));
        }
    }
    Ok(Some(files))
}
