//! Backup metadata (`backups/ID/backup.json`) and the list of an instance's backups.
//!
//! A backup directory holds:
//! ```text
//! backups/ID/backup.json      BackupMeta (status RUNNING first, OK written last)
//! backups/ID/manifest         every directory and file (see manifest.rs)
//! backups/ID/database/...     the files: whole, whole LZ4 (.lz4) or incremental (.winc)
//! backups/ID/backup_label     from pg_backup_stop
//! backups/ID/tablespace_map   from pg_backup_stop, when there are tablespaces
//! ```
//! `status` is the commit record: a backup is usable only when it says OK, which is written
//! after every other file of the backup and the WAL it needs are durable.
//!
//! ```text
//! backup.json, format 2 (UTF-8): {
//!   body     BackupMeta as pretty-printed JSON, without its closing "\n}"
//!   trailer  ",\n  \"crc32c\": \"<8 lowercase hex digits>\"\n}\n"   CRC-32C of the body
//! }
//! ```
//! The whole is still one JSON object that other tools can read. Format 1 files, written
//! before the checksum existed, have no `crc32c` member and are read unchecked; a format 2
//! file without a valid trailer is refused as damaged.
//!
//! backup.json is untrusted input. Its `id` and `instance` (and `parent_id`) must be plain
//! names ([`safepath::check_name`]), and a backup is listed only when its `id` is the name of
//! its directory and its `instance` the instance it is listed under: the id decides where
//! [`BackupMeta::save`] writes, so it must never point anywhere else. Everything below the
//! catalog root is opened without following symbolic links: a backup directory, an instance
//! directory or a `backups` directory that is a symlink is refused, not read (only the `-B`
//! path itself may be a link, as the operator gave it).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;

use nix::libc;

use crate::catalog::Catalog;
use crate::durable;
use crate::error::{Error, IoContext, Result};
use crate::safepath;
use crate::types::{Lsn, TimeLineId};

pub const META_FILE: &str = "backup.json";
pub const META_FORMAT: u32 = 2;
/// The format before backup.json had a checksum: still read.
const META_FORMAT_NO_CRC: u32 = 1;
const CRC_KEY: &[u8] = b",\n  \"crc32c\": \"";
const CRC_END: &[u8] = b"\"\n}\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    Full,
    Page,
    Delta,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Full => "FULL",
            Mode::Page => "PAGE",
            Mode::Delta => "DELTA",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Running,
    Ok,
    Error,
    Corrupt,
    Orphan,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Running => "RUNNING",
            Status::Ok => "OK",
            Status::Error => "ERROR",
            Status::Corrupt => "CORRUPT",
            Status::Orphan => "ORPHAN",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMeta {
    pub format: u32,
    pub id: String,
    pub instance: String,
    pub mode: Mode,
    pub status: Status,
    pub parent_id: Option<String>,
    pub timeline: TimeLineId,
    pub start_lsn: Lsn,
    pub stop_lsn: Option<Lsn>,
    /// Parent's start LSN (incremental backups): the changed-block range starts there.
    pub parent_start_lsn: Option<Lsn>,
    /// UTC, "YYYY-MM-DD HH:MM:SS+00".
    pub start_time: String,
    pub end_time: Option<String>,
    /// Server time after the backup stopped: the earliest recovery_target_time this backup
    /// can reach.
    pub recovery_time: Option<String>,
    /// Unix seconds of `recovery_time`.
    pub recovery_epoch: Option<i64>,
    /// The next transaction id when the backup stopped (`pg_snapshot_xmax`): transactions
    /// from this one on committed after the backup's consistency point.
    pub recovery_xid: Option<u64>,
    pub data_bytes: u64,
    pub files: u64,
    pub compress: String,
    pub pg_major: u32,
    pub system_id: u64,
    pub block_size: u32,
    pub relseg_size: u32,
    pub wal_segment_size: u32,
    pub data_checksums: bool,
    /// Process that runs the backup while RUNNING (a RUNNING backup whose process is gone
    /// is shown as ERROR).
    pub pid: Option<u32>,
    pub error: Option<String>,
}

impl BackupMeta {
    pub fn dir(&self, catalog: &Catalog) -> PathBuf {
        catalog.backups_dir(&self.instance).join(&self.id)
    }

    /// Writes backup.json atomically and durably into the backup's own directory, which
    /// must exist (created by the backup, or the one the metadata was listed from: see
    /// [`list`]). The id and instance are checked to be plain names, and the directory is
    /// opened without following links and written through its descriptor, so a hostile id
    /// or a directory swapped for a symlink can never make this write elsewhere.
    pub fn save(&self, catalog: &Catalog) -> Result<()> {
        let rel = backup_rel(&self.instance, &self.id)?;
        let dir = safepath::open_dir_under(catalog.root(), &rel)?;
        write_at(&dir, &self.dir(catalog), META_FILE, &encode(self)?)
    }

    /// The status to show and to decide on: RUNNING without a live process is ERROR.
    pub fn effective_status(&self) -> Status {
        if self.status == Status::Running {
            let alive = self.pid.is_some_and(|p| {
                p == std::process::id()
                    || nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), None).is_ok()
            });
            if !alive {
                return Status::Error;
            }
        }
        self.status
    }
}

/// backup.json's bytes (see the module docs for the layout).
pub fn encode(m: &BackupMeta) -> Result<Vec<u8>> {
    let json = serde_json::to_vec_pretty(m)?;
    let body = json
        .strip_suffix(b"\n}")
        .ok_or_else(|| Error::invalid("backup metadata did not serialize as an object"))?;
    let mut out = body.to_vec();
    out.extend_from_slice(CRC_KEY);
    out.extend_from_slice(format!("{:08x}", crc32c::crc32c(body)).as_bytes());
    out.extend_from_slice(CRC_END);
    Ok(out)
}

/// Parses backup.json's bytes; `what` names the file in errors. Ids and the instance name
/// that are not plain names are refused as corruption.
pub fn decode(b: &[u8], what: &str) -> Result<BackupMeta> {
    let bad = |m: String| Error::corruption(format!("{what}: {m}"));
    let trailer_len = CRC_KEY.len() + 8 + CRC_END.len();
    let trailer = b
        .len()
        .checked_sub(trailer_len)
        .map(|at| (&b[..at], &b[at..]))
        .filter(|(_, t)| t.starts_with(CRC_KEY) && t.ends_with(CRC_END));
    if let Some((body, t)) = trailer {
        let hex = &t[CRC_KEY.len()..CRC_KEY.len() + 8];
        let stored = std::str::from_utf8(hex)
            .ok()
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| bad("bad checksum field".into()))?;
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(bad(format!(
                "backup metadata checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            )));
        }
    }
    let m: BackupMeta = serde_json::from_slice(b).map_err(|e| bad(e.to_string()))?;
    match (m.format, trailer.is_some()) {
        (META_FORMAT, true) | (META_FORMAT_NO_CRC, false) => {
            check_names(&m, what)?;
            Ok(m)
        }
        (META_FORMAT, false) => Err(bad(
            "backup metadata has no valid checksum trailer (damaged or truncated)".into(),
        )),
        (f, _) => Err(bad(format!(
            "backup metadata format {f} is not supported (this walnut reads {META_FORMAT_NO_CRC} and {META_FORMAT})"
        ))),
    }
}

/// Checks the names in metadata just read: `id`, `instance` and `parent_id` become path
/// components, so each must be one plain name.
fn check_names(m: &BackupMeta, what: &str) -> Result<()> {
    safepath::check_name(&m.id, &format!("{what}: id"))?;
    safepath::check_name(&m.instance, &format!("{what}: instance"))?;
    if let Some(p) = &m.parent_id {
        safepath::check_name(p, &format!("{what}: parent_id"))?;
    }
    Ok(())
}

/// backup.json larger than this is not ours (a real one is under 2 KiB).
const MAX_META_BYTES: u64 = 1 << 20;

fn read_meta(f: File, path: &Path) -> Result<BackupMeta> {
    let mut b = Vec::new();
    f.take(MAX_META_BYTES + 1)
        .read_to_end(&mut b)
        .ctx("read", path)?;
    let what = path.display().to_string();
    if b.len() as u64 > MAX_META_BYTES {
        return Err(Error::corruption(format!(
            "{what}: larger than {MAX_META_BYTES} bytes: not backup metadata"
        )));
    }
    decode(&b, &what)
}

/// Loads a backup.json by path. The file itself must not be a symlink and must be a regular
/// file (its directory is the caller's to trust; [`load_in`] checks it too).
pub fn load(path: &Path) -> Result<BackupMeta> {
    let (dir, name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(d), Some(n)) => (d, n),
        _ => {
            return Err(Error::invalid(format!(
                "\"{}\" is not a backup metadata path",
                path.display()
            )))
        }
    };
    read_meta(safepath::open_under(dir, name)?, path)
}

/// A backup directory relative to the catalog root, from checked names.
fn backup_rel(instance: &str, id: &str) -> Result<String> {
    safepath::check_name(instance, "instance name")?;
    safepath::check_name(id, "backup id")?;
    Ok(format!("instances/{instance}/backups/{id}"))
}

/// Loads the metadata of backup `id` of `instance`: opened below the catalog root without
/// following links, and refused unless it says it is that backup of that instance.
pub fn load_in(catalog: &Catalog, instance: &str, id: &str) -> Result<BackupMeta> {
    let rel = backup_rel(instance, id)?;
    let path = catalog.root().join(&rel).join(META_FILE);
    let m = read_meta(
        safepath::open_under(catalog.root(), &format!("{rel}/{META_FILE}"))?,
        &path,
    )?;
    if m.id != id || m.instance != instance {
        return Err(Error::corruption(format!(
            "{}: says it is backup {:?} of instance {:?}, but it is stored as backup {id:?} of instance {instance:?}",
            path.display(),
            m.id,
            m.instance
        )));
    }
    Ok(m)
}

/// Every backup of an instance, oldest first (by start LSN, then id). Backups that cannot be
/// read or are refused (see [`scan`]) are skipped with a warning.
pub fn list(catalog: &Catalog, instance: &str) -> Result<Vec<BackupMeta>> {
    let (v, skipped) = scan(catalog, instance)?;
    for err in skipped {
        log::warn!("skipping backup: {err}");
    }
    Ok(v)
}

/// Every readable backup of an instance, oldest first, and an error for each backup
/// directory that was skipped: a symlink, a name that is not a plain name, a backup.json
/// that cannot be read, is damaged, or names another backup or instance. A directory
/// without backup.json (a backup being created) is not a backup and is left out silently.
/// An instance or `backups` directory that is a symlink is an error, as is one that cannot
/// be read; a missing one has no backups.
pub fn scan(catalog: &Catalog, instance: &str) -> Result<(Vec<BackupMeta>, Vec<Error>)> {
    crate::catalog::check_instance_name(instance)?;
    let rel = format!("instances/{instance}/backups");
    let dir = catalog.backups_dir(instance);
    let mut v = Vec::new();
    let mut skipped = Vec::new();
    match safepath::open_dir_under(catalog.root(), &rel) {
        Ok(_) => {}
        Err(e) if e.kind() == crate::ErrorKind::NotFound => return Ok((v, skipped)),
        Err(e) => return Err(e),
    }
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((v, skipped)),
        Err(e) => return Err(Error::io("read directory", &dir, e)),
    };
    for e in rd {
        let e = e.ctx("read directory", &dir)?;
        let path = e.path();
        // file_type() does not follow links
        let ft = e.file_type().ctx("stat", &path)?;
        if ft.is_symlink() {
            skipped.push(Error::corruption(format!(
                "\"{}\" is a symbolic link; a backup must be a real directory (refused, not read)",
                path.display()
            )));
            continue;
        }
        if !ft.is_dir() {
            continue;
        }
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            skipped.push(Error::corruption(format!(
                "\"{}\": backup directory name is not UTF-8",
                path.display()
            )));
            continue;
        };
        match load_in(catalog, instance, &name) {
            Ok(m) => v.push(m),
            Err(err) if err.kind() == crate::ErrorKind::NotFound => {}
            Err(err) => skipped.push(err),
        }
    }
    v.sort_by(|a, b| (a.start_lsn, &a.start_time, &a.id).cmp(&(b.start_lsn, &b.start_time, &b.id)));
    Ok((v, skipped))
}

/// Writes `name` in the directory open as `dir` (shown as `dir_path`) durably and
/// atomically: a new temp file (never following a link), fsync, rename over `name`, fsync
/// the directory. All through the descriptor, so the directory cannot be swapped meanwhile.
fn write_at(dir: &File, dir_path: &Path, name: &str, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = format!(".{name}.walnut-tmp.{}.{nanos}", std::process::id());
    let tmp_path = dir_path.join(&tmp);
    let path = dir_path.join(name);
    let c = |s: &str| {
        std::ffi::CString::new(s).map_err(|_| Error::invalid(format!("name {s:?} contains NUL")))
    };
    let (ctmp, cname) = (c(&tmp)?, c(name)?);
    // SAFETY: valid descriptor, NUL-terminated name, plain flags and mode.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            ctmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(Error::io(
            "create",
            &tmp_path,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    let mut f = unsafe { File::from_raw_fd(fd) };
    let unlink_tmp = || {
        // SAFETY: valid descriptor and NUL-terminated name.
        unsafe { libc::unlinkat(dir.as_raw_fd(), ctmp.as_ptr(), 0) };
    };
    let written = f
        .write_all(data)
        .ctx("write", &tmp_path)
        .and_then(|()| f.sync_all().ctx("fsync", &tmp_path));
    drop(f);
    if let Err(e) = written {
        unlink_tmp();
        return Err(e);
    }
    // SAFETY: valid descriptors and NUL-terminated names.
    let r = unsafe {
        libc::renameat(
            dir.as_raw_fd(),
            ctmp.as_ptr(),
            dir.as_raw_fd(),
            cname.as_ptr(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        unlink_tmp();
        return Err(Error::io("rename into", &path, e));
    }
    dir.sync_all().ctx("fsync directory", dir_path)
}

pub fn find<'a>(list: &'a [BackupMeta], id: &str) -> Result<&'a BackupMeta> {
    list.iter()
        .find(|b| b.id == id)
        .ok_or_else(|| Error::not_found(format!("backup {id} not found")))
}

/// The chain of `id`: the backup itself, then its parent, ... down to the FULL backup.
pub fn chain<'a>(list: &'a [BackupMeta], id: &str) -> Result<Vec<&'a BackupMeta>> {
    let mut out = vec![find(list, id)?];
    while let Some(p) = out.last().and_then(|b| b.parent_id.clone()) {
        if out.len() > 10_000 {
            return Err(Error::corruption(format!("backup chain of {id} loops")));
        }
        let parent = find(list, &p).map_err(|_| {
            Error::not_found(format!("backup {id} needs parent {p}, which is missing"))
        })?;
        out.push(parent);
    }
    if out.last().map(|b| b.mode) != Some(Mode::Full) {
        return Err(Error::corruption(format!(
            "backup chain of {id} does not end in a FULL backup"
        )));
    }
    Ok(out)
}

/// Whether `b` descends from `ancestor` (or is it).
pub fn descends_from(list: &[BackupMeta], b: &BackupMeta, ancestor: &str) -> bool {
    let mut cur = Some(b);
    let mut steps = 0;
    while let Some(c) = cur {
        if c.id == ancestor {
            return true;
        }
        steps += 1;
        if steps > 10_000 {
            return false;
        }
        cur = c
            .parent_id
            .as_deref()
            .and_then(|p| list.iter().find(|x| x.id == p));
    }
    false
}

/// Unix seconds to "YYYY-MM-DD HH:MM:SS+00".
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}+00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Parses "YYYY-MM-DD[ T]HH:MM:SS[.frac][Z|UTC|+HH[:MM]|-HH[:MM]]" (UTC when no zone) to
/// Unix seconds (fraction dropped, rounded down).
pub fn parse_time(s: &str) -> Result<i64> {
    let bad = || {
        Error::invalid(format!(
            "cannot parse time '{s}' (expected YYYY-MM-DD HH:MM:SS[+TZ])"
        ))
    };
    let s = s.trim();
    let date = s.get(0..10).ok_or_else(bad)?;
    let mut dp = date.split('-');
    let y: i64 = dp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let mo: u32 = dp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let d: u32 = dp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let rest = s.get(10..).ok_or_else(bad)?.trim_start_matches([' ', 'T']);
    let hms = rest.get(0..8).ok_or_else(bad)?;
    let mut tp = hms.split(':');
    let h: i64 = tp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let mi: i64 = tp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let se: i64 = tp.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let mut zone = rest.get(8..).ok_or_else(bad)?;
    if let Some(z) = zone.strip_prefix('.') {
        zone = z.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let zone = zone.trim();
    let offset = match zone {
        "" | "Z" | "UTC" | "GMT" => 0,
        z if z.starts_with('+') || z.starts_with('-') => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let body = &z[1..];
            let (hh, mm) = match body.split_once(':') {
                Some((a, b)) => (a, b),
                None if body.len() == 4 => (&body[0..2], &body[2..4]),
                None => (body, "0"),
            };
            let hh: i64 = hh.parse().map_err(|_| bad())?;
            let mm: i64 = mm.parse().map_err(|_| bad())?;
            sign * (hh * 3600 + mm * 60)
        }
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    Ok(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset)
}

/// How many suffixed ids (`BASE-2`, `BASE-3`, ...) are tried before giving up.
const MAX_ID_SUFFIX: u32 = 10_000;

/// A new backup id and its directory, created here: the start time in base 36 (as
/// pg_probackup does), made unique by a `-N` suffix. The directory is made create-only
/// (`mkdir`, never "create if missing"), so concurrent backups that start in the same second
/// each get their own: whoever loses the race on a name gets `EEXIST` and tries the next.
/// Ids stay valid names and sort by start time as before (the suffix only breaks ties).
pub fn new_id(catalog: &Catalog, instance: &str, now: i64) -> Result<(String, PathBuf)> {
    let parent = catalog.backups_dir(instance);
    let base = base36(now.max(0) as u64);
    for k in 1..=MAX_ID_SUFFIX {
        let id = if k == 1 {
            base.clone()
        } else {
            format!("{base}-{k}")
        };
        let dir = parent.join(&id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                durable::fsync_dir(&parent)?;
                return Ok((id, dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("create directory", &dir, e)),
        }
    }
    Err(Error::conflict(format!(
        "no free backup id in \"{}\": {base} and {MAX_ID_SUFFIX} suffixed ids are taken",
        parent.display()
    )))
}

/// `n` in upper-case base 36.
fn base36(mut n: u64) -> String {
    let mut s = Vec::new();
    loop {
        let digit = (n % 36) as u32;
        s.push(
            std::char::from_digit(digit, 36)
                .unwrap_or('0')
                .to_ascii_uppercase(),
        );
        n /= 36;
        if n == 0 {
            break;
        }
    }
    s.iter().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BackupMeta {
        BackupMeta {
            format: META_FORMAT,
            id: "TOZ6BJ".into(),
            instance: "db".into(),
            mode: Mode::Page,
            status: Status::Ok,
            parent_id: Some("TOZ6AG".into()),
            timeline: 1,
            start_lsn: Lsn(0x1_0000_0028),
            stop_lsn: Some(Lsn(0x1_0000_0100)),
            parent_start_lsn: Some(Lsn(0x28)),
            start_time: "2026-11-23 18:33:31+00".into(),
            end_time: None,
            recovery_time: None,
            recovery_epoch: None,
            recovery_xid: Some(771),
            data_bytes: 8192,
            files: 1,
            compress: "none".into(),
            pg_major: 15,
            system_id: 7,
            block_size: 8192,
            relseg_size: 131072,
            wal_segment_size: 1 << 24,
            data_checksums: true,
            pid: None,
            error: None,
        }
    }

    #[test]
    fn meta_round_trip_and_golden_bytes() {
        let m = sample();
        let b = encode(&m).unwrap();
        assert_eq!(decode(&b, "t").unwrap(), m);
        // still one JSON object, for other tools
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["crc32c"], "f4c28f34");
        let golden = r#"{
  "format": 2,
  "id": "TOZ6BJ",
  "instance": "db",
  "mode": "PAGE",
  "status": "OK",
  "parent_id": "TOZ6AG",
  "timeline": 1,
  "start_lsn": "1/28",
  "stop_lsn": "1/100",
  "parent_start_lsn": "0/28",
  "start_time": "2026-11-23 18:33:31+00",
  "end_time": null,
  "recovery_time": null,
  "recovery_epoch": null,
  "recovery_xid": 771,
  "data_bytes": 8192,
  "files": 1,
  "compress": "none",
  "pg_major": 15,
  "system_id": 7,
  "block_size": 8192,
  "relseg_size": 131072,
  "wal_segment_size": 16777216,
  "data_checksums": true,
  "pid": null,
  "error": null,
  "crc32c": "f4c28f34"
}
"#;
        assert_eq!(String::from_utf8(b).unwrap(), golden);
        let body = golden.split(",\n  \"crc32c\"").next().unwrap();
        assert_eq!(crc32c::crc32c(body.as_bytes()), 0xf4c28f34);
    }

    #[test]
    fn meta_flipped_byte_is_refused_naming_the_file() {
        let good = encode(&sample()).unwrap();
        for pos in 0..good.len() {
            let mut b = good.clone();
            b[pos] ^= 0x01;
            let e = decode(&b, "/cat/backups/X/backup.json").unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corruption, "byte {pos}: {e}");
            assert!(
                e.to_string().contains("/cat/backups/X/backup.json"),
                "byte {pos}: {e}"
            );
        }
        let e = decode(&good[..good.len() - 30], "f").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corruption, "{e}");
    }

    #[test]
    fn meta_format_1_without_checksum_is_still_read() {
        let m = BackupMeta {
            format: 1,
            ..sample()
        };
        let mut old = serde_json::to_vec_pretty(&m).unwrap();
        old.push(b'\n');
        assert_eq!(decode(&old, "f").unwrap(), m);
        // but a format 2 file must carry its checksum
        let mut no_crc = serde_json::to_vec_pretty(&sample()).unwrap();
        no_crc.push(b'\n');
        let e = decode(&no_crc, "f").unwrap_err();
        assert!(e.to_string().contains("no valid checksum"), "{e}");
    }

    #[test]
    fn meta_unknown_format_is_refused_clearly() {
        let m = BackupMeta {
            format: 9,
            ..sample()
        };
        let e = decode(&encode(&m).unwrap(), "f").unwrap_err();
        assert!(e.to_string().contains("format 9 is not supported"), "{e}");
    }

    /// Ids are created create-only: the same second gives `BASE`, `BASE-2`, ... and a name
    /// someone else holds (a directory or even a file) is skipped, never shared.
    #[test]
    fn new_id_creates_a_directory_of_its_own() {
        let d = tempfile::tempdir().unwrap();
        let catalog = Catalog::init(&d.path().join("cat")).unwrap();
        std::fs::create_dir_all(catalog.backups_dir("db")).unwrap();
        let now = 1_795_458_811;
        let (a, da) = new_id(&catalog, "db", now).unwrap();
        assert_eq!(a, "TOYWVV");
        assert_eq!(u64::from_str_radix(&a, 36).unwrap(), now as u64);
        assert!(da.is_dir());
        std::fs::write(catalog.backups_dir("db").join("TOYWVV-2"), b"x").unwrap();
        let (b, db) = new_id(&catalog, "db", now).unwrap();
        assert_eq!(b, "TOYWVV-3");
        assert!(db.is_dir());
        let (c, _) = new_id(&catalog, "db", now + 1).unwrap();
        assert_eq!(c, "TOYWVW");
        // concurrently: every caller gets its own directory
        let ids: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16)
                .map(|_| s.spawn(|| new_id(&catalog, "db", now + 100).unwrap().0))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let uniq: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(uniq.len(), 16, "{ids:?}");
        // a directory that cannot be created is an error, not a shared id
        let e = new_id(&catalog, "nosuch", now).unwrap_err();
        assert!(e.to_string().contains("nosuch"), "{e}");
    }

    #[test]
    fn times() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00+00");
        assert_eq!(format_utc(1_795_458_811), "2026-11-23 18:33:31+00");
        assert_eq!(parse_time("2026-11-23 18:33:31+00").unwrap(), 1_795_458_811);
        assert_eq!(
            parse_time("2026-11-23 19:33:31.123456+01").unwrap(),
            1_795_458_811
        );
        assert_eq!(parse_time("2026-11-23T18:33:31Z").unwrap(), 1_795_458_811);
        assert_eq!(
            parse_time("2026-11-23 13:33:31-05:00").unwrap(),
            1_795_458_811
        );
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01 00:00:00").is_err());
    }

    #[test]
    fn meta_with_unsafe_names_is_refused() {
        for m in [
            BackupMeta {
                id: "../../x".into(),
                ..sample()
            },
            BackupMeta {
                id: "a/b".into(),
                ..sample()
            },
            BackupMeta {
                instance: "../db".into(),
                ..sample()
            },
            BackupMeta {
                parent_id: Some("../../y".into()),
                ..sample()
            },
            BackupMeta {
                format: 1,
                id: "..".into(),
                ..sample()
            },
        ] {
            let b = if m.format == 1 {
                serde_json::to_vec_pretty(&m).unwrap()
            } else {
                encode(&m).unwrap()
            };
            let e = decode(&b, "/cat/backups/X/backup.json").unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corruption, "{m:?}: {e}");
            assert!(e.to_string().contains("/cat/backups/X/backup.json"), "{e}");
        }
    }

    /// A catalog with instance "db" and the given backups written as they are.
    fn catalog_with(d: &Path, backups: &[(&str, &BackupMeta)]) -> Catalog {
        let root = d.join("cat");
        let c = Catalog::init(&root).unwrap();
        let bdir = c.backups_dir("db");
        std::fs::create_dir_all(&bdir).unwrap();
        for (dir, m) in backups {
            std::fs::create_dir(bdir.join(dir)).unwrap();
            std::fs::write(bdir.join(dir).join(META_FILE), encode(m).unwrap()).unwrap();
        }
        c
    }

    fn meta(id: &str) -> BackupMeta {
        BackupMeta {
            id: id.into(),
            mode: Mode::Full,
            parent_id: None,
            ..sample()
        }
    }

    #[test]
    fn list_refuses_symlinks_and_mismatched_ids() {
        let d = tempfile::tempdir().unwrap();
        let other = BackupMeta {
            instance: "other".into(),
            ..meta("C")
        };
        let c = catalog_with(
            d.path(),
            &[("A", &meta("A")), ("B", &meta("../../x")), ("C", &other)],
        );
        let bdir = c.backups_dir("db");
        // format 1 (no checksum) is still listed
        let mut old = serde_json::to_vec_pretty(&BackupMeta {
            format: 1,
            ..meta("OLD")
        })
        .unwrap();
        old.push(b'\n');
        std::fs::create_dir(bdir.join("OLD")).unwrap();
        std::fs::write(bdir.join("OLD").join(META_FILE), old).unwrap();
        // a backup directory that is a symlink to a real backup elsewhere
        let elsewhere = d.path().join("elsewhere/L");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join(META_FILE), encode(&meta("L")).unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, bdir.join("L")).unwrap();
        // a backup.json that is a symlink
        std::fs::create_dir(bdir.join("S")).unwrap();
        std::fs::write(d.path().join("s.json"), encode(&meta("S")).unwrap()).unwrap();
        std::os::unix::fs::symlink(d.path().join("s.json"), bdir.join("S").join(META_FILE))
            .unwrap();
        // a directory without backup.json yet, and a stray file: not backups, no complaint
        std::fs::create_dir(bdir.join("NEW")).unwrap();
        std::fs::write(bdir.join(".x.walnut-tmp.1.2"), b"").unwrap();

        let (v, skipped) = scan(&c, "db").unwrap();
        let ids: Vec<&str> = v.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["A", "OLD"], "{skipped:?}");
        let text: Vec<String> = skipped.iter().map(|e| e.to_string()).collect();
        assert_eq!(skipped.len(), 4, "{text:?}");
        assert!(skipped
            .iter()
            .all(|e| e.kind() == crate::ErrorKind::Corruption));
        for needle in ["backups/B", "backups/C", "backups/L", "backups/S"] {
            assert!(
                text.iter().any(|t| t.contains(needle)),
                "{needle}: {text:?}"
            );
        }
        assert_eq!(list(&c, "db").unwrap().len(), 2);
        assert!(load_in(&c, "db", "B").is_err());
        assert!(load_in(&c, "db", "../db/backups/A").is_err());
        assert_eq!(load_in(&c, "db", "A").unwrap(), meta("A"));

        // an instance directory (or its backups directory) that is a symlink is an error
        let moved = d.path().join("moved-db");
        std::fs::rename(c.instance_dir("db"), &moved).unwrap();
        std::os::unix::fs::symlink(&moved, c.instance_dir("db")).unwrap();
        let e = list(&c, "db").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corruption, "{e}");
        std::fs::remove_file(c.instance_dir("db")).unwrap();
        std::fs::create_dir(c.instance_dir("db")).unwrap();
        std::os::unix::fs::symlink(moved.join("backups"), c.backups_dir("db")).unwrap();
        assert!(list(&c, "db").is_err());
        // no backups directory at all: no backups
        std::fs::remove_file(c.backups_dir("db")).unwrap();
        assert!(list(&c, "db").unwrap().is_empty());
    }

    #[test]
    fn save_writes_only_into_the_backups_own_directory() {
        let d = tempfile::tempdir().unwrap();
        let c = catalog_with(d.path(), &[("A", &meta("A"))]);
        let mut m = load_in(&c, "db", "A").unwrap();
        m.status = Status::Corrupt;
        m.save(&c).unwrap();
        assert_eq!(load_in(&c, "db", "A").unwrap().status, Status::Corrupt);
        let names: Vec<_> = std::fs::read_dir(c.backups_dir("db").join("A"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [META_FILE], "no temp file left");

        // an id that leaves the directory is refused before anything is written
        let before = tree(d.path());
        for bad in [meta("../../x"), meta("..")] {
            let e = bad.save(&c).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corruption, "{e}");
        }
        let bad_inst = BackupMeta {
            instance: "../../..".into(),
            ..meta("A")
        };
        assert!(bad_inst.save(&c).is_err());
        // a backup directory replaced by a symlink is not written through
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, c.backups_dir("db").join("Z")).unwrap();
        assert!(meta("Z").save(&c).is_err());
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        // a missing backup directory is not created
        assert!(meta("NOPE").save(&c).is_err());
        std::fs::remove_dir(&elsewhere).unwrap();
        std::fs::remove_file(c.backups_dir("db").join("Z")).unwrap();
        assert_eq!(tree(d.path()), before);
    }

    /// Every path below `d` with its length.
    fn tree(d: &Path) -> Vec<(PathBuf, u64)> {
        let mut v = Vec::new();
        let mut stack = vec![d.to_path_buf()];
        while let Some(p) = stack.pop() {
            let md = std::fs::symlink_metadata(&p).unwrap();
            v.push((p.clone(), md.len()));
            if md.is_dir() {
                for e in std::fs::read_dir(&p).unwrap() {
                    stack.push(e.unwrap().path());
                }
            }
        }
        v.sort();
        v
    }
}
