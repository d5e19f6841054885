//! `walnut validate`: re-reads every stored file of a backup and its chain against the
//! manifest checksums and checks that the WAL from start to stop is archived. A failing
//! backup becomes CORRUPT and every backup that depends on it ORPHAN.

use std::fs::File;
use std::io::{BufReader, Read};

use crate::archive::WalArchive;
use crate::catalog::Catalog;
use crate::error::{Error, IoContext, Result};
use crate::types::{Lsn, WalFileName};

use super::incfile;
use super::manifest::{self, Storage};
use super::meta::{self, BackupMeta, Status};

/// Checks one backup's own files and WAL; returns the first problem found.
pub fn check_backup(catalog: &Catalog, archive: &WalArchive, b: &BackupMeta) -> Result<()> {
    if b.effective_status() == Status::Running || b.effective_status() == Status::Error {
        return Err(Error::invalid(format!(
            "backup {} has status {}",
            b.id,
            b.effective_status()
        )));
    }
    let dir = b.dir(catalog);
    let mpath = dir.join("manifest");
    let f = File::open(&mpath).ctx("open", &mpath)?;
    let mut buf = vec![0u8; 1 << 20];
    manifest::read(BufReader::new(f), &mpath.display().to_string(), |e| {
        if e.storage == Storage::Dir {
            return Ok(());
        }
        let p = dir.join(e.stored_path());
        let mut f = File::open(&p).ctx("open", &p)?;
        let mut crc = 0u32;
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf).ctx("read", &p)?;
            if k == 0 {
                break;
            }
            crc = crc32c::crc32c_append(crc, &buf[..k]);
            n += k as u64;
        }
        // An incremental file ends with its own CRC: the whole file's CRC is then the
        // residue, and the manifest holds that trailer CRC (the last 4 bytes).
        let crc_ok = if e.storage == Storage::Incremental && n < 4 {
            false
        } else if e.storage == Storage::Incremental {
            let mut t = [0u8; 4];
            {
                use std::io::{Seek, SeekFrom};
                f.seek(SeekFrom::End(-4)).ctx("seek", &p)?;
                f.read_exact(&mut t).ctx("read", &p)?;
            }
            crc == incfile::WHOLE_FILE_RESIDUE
                && incfile::manifest_crc_ok(e.crc32c, u32::from_le_bytes(t))
        } else {
            crc == e.crc32c
        };
        if !crc_ok || n != e.stored_size {
            return Err(Error::corruption(format!(
                "backup {}: file \"{}\" does not match its checksum ({} bytes, crc {crc:08x}; manifest says {} bytes, crc {:08x})",
                b.id, e.path, n, e.stored_size, e.crc32c
            )));
        }
        if e.storage == Storage::Incremental {
            let f = File::open(&p).ctx("open", &p)?;
            incfile::read_stream(
                BufReader::new(f),
                n,
                &p.display().to_string(),
                b.block_size,
                |_, _| Ok(()),
            )?;
        }
        Ok(())
    })?;
    if let Some(stop) = b.stop_lsn {
        let seg = b.wal_segment_size;
        let last = Lsn(stop.0.saturating_sub(1)).segno(seg);
        for segno in b.start_lsn.segno(seg)..=last {
            let name = WalFileName::segment(b.timeline, segno, seg);
            if !archive.is_archived(&name)? {
                return Err(Error::not_found(format!(
                    "backup {}: WAL segment {name} (needed from start {} to stop {stop}) is not in the archive",
                    b.id, b.start_lsn
                )));
            }
        }
    } else {
        return Err(Error::invalid(format!("backup {} has no stop LSN", b.id)));
    }
    Ok(())
}

/// Validates `id`'s chain (or every backup); marks CORRUPT / ORPHAN. Returns the
/// problems found (empty: all valid).
pub fn validate(catalog: &Catalog, instance: &str, id: Option<&str>) -> Result<Vec<String>> {
    let archive = WalArchive::open(catalog, instance)?;
    let list = meta::list(catalog, instance)?;
    let targets: Vec<&BackupMeta> = match id {
        Some(i) => {
            let mut c = meta::chain(&list, i)?;
            c.reverse();
            c
        }
        None => list.iter().collect(),
    };
    let mut problems = Vec::new();
    let mut corrupt: Vec<String> = Vec::new();
    for b in targets {
        if corrupt.iter().any(|c| meta::descends_from(&list, b, c)) {
            continue;
        }
        if matches!(b.effective_status(), Status::Error | Status::Running) {
            continue;
        }
        match check_backup(catalog, &archive, b) {
            Ok(()) => {
                if matches!(b.status, Status::Corrupt | Status::Orphan) {
                    problems.push(format!(
                        "backup {} stays {} (validate it again after repair is not supported)",
                        b.id, b.status
                    ));
                } else {
                    log::info!("backup {} is valid", b.id);
                }
            }
            Err(e) => {
                log::error!("{e}");
                problems.push(e.to_string());
                let mut m = b.clone();
                m.status = Status::Corrupt;
                m.error = Some(e.to_string());
                m.save(catalog)?;
                corrupt.push(b.id.clone());
            }
        }
    }
    // descendants of corrupt backups
    for b in &list {
        if corrupt.contains(&b.id) {
            continue;
        }
        if let Some(c) = corrupt.iter().find(|c| meta::descends_from(&list, b, c)) {
            if b.status == Status::Ok {
                let mut m = b.clone();
                m.status = Status::Orphan;
                m.error = Some(format!("parent backup {c} is corrupt"));
                m.save(catalog)?;
                problems.push(format!(
                    "backup {} is ORPHAN (its chain includes corrupt backup {c})",
                    b.id
                ));
            }
        }
    }
    Ok(problems)
}
