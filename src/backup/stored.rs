//! Reading a backup's stored objects through the catalog's store: its manifest and the
//! trailers of its incremental files. (The formats are in [`crate::format`], I/O-free.)

use crate::error::{Error, Result};
use crate::format::incfile::{self, IncInfo, HEADER_LEN, TRAILER_LEN};
use crate::format::manifest::{self, FileEntry, FILE_NAME};
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
