//! Restoring a backup chain into a data directory, with recovery settings.
//!
//! Every block is written once, from the newest backup of the chain that holds it. The
//! truncation rule (WAL-FORMAT §3.9): a block at or above the smallest limit block (or
//! recorded length) of any newer backup is never taken from an older one; if the newer
//! backups do not hold it, it is a zero page. `global/pg_control` is written last, so an
//! interrupted restore never leaves a startable data directory.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::catalog::Catalog;
use crate::durable::{self, DurableFile, Replace};
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;
use crate::types::Lsn;

use super::copy::read_full;
use super::incfile;
use super::manifest::{self, FileEntry, Storage};
use super::meta::{self, BackupMeta, Status};

/// Recovery target settings (at most one target).
#[derive(Clone, Debug, Default)]
pub struct RecoveryTarget {
    pub time: Option<String>,
    pub xid: Option<String>,
    pub lsn: Option<String>,
    pub name: Option<String>,
    /// "immediate" or "latest".
    pub target: Option<String>,
    pub inclusive: Option<bool>,
    pub timeline: Option<String>,
    pub action: Option<String>,
    /// LSN of the named restore point when known (from the block indexes): only used to
    /// choose a backup that ends before it.
    pub point_lsn: Option<Lsn>,
}

pub struct RestoreOptions {
    pub backup_id: Option<String>,
    pub target: PathBuf,
    pub jobs: usize,
    pub mappings: Vec<(PathBuf, PathBuf)>,
    pub recovery: RecoveryTarget,
    pub force: bool,
}

/// Picks the backup to restore: the given one, or the newest OK backup that can reach the
/// target. Its whole chain must be OK.
pub fn choose_backup<'a>(
    list: &'a [BackupMeta],
    id: Option<&str>,
    rt: &RecoveryTarget,
) -> Result<Vec<&'a BackupMeta>> {
    let usable = |b: &BackupMeta| -> Result<Vec<&'a BackupMeta>> {
        let chain = meta::chain(list, &b.id)?;
        for c in &chain {
            let st = c.effective_status();
            if st != Status::Ok {
                return Err(Error::invalid(format!(
                    "backup {} has status {st}{}; it cannot be restored",
                    c.id,
                    if c.id != b.id {
                        format!(" (parent of {})", b.id)
                    } else {
                        String::new()
                    }
                )));
            }
        }
        Ok(chain)
    };
    if let Some(id) = id {
        return usable(meta::find(list, id)?);
    }
    let time = rt.time.as_deref().map(meta::parse_time).transpose()?;
    let xid: Option<u64> = match rt.xid.as_deref() {
        Some(x) => Some(
            x.trim()
                .parse()
                .map_err(|_| Error::invalid(format!("invalid xid '{x}'")))?,
        ),
        None => None,
    };
    let lsn: Option<Lsn> = rt.lsn.as_deref().map(str::parse).transpose()?;
    for b in list.iter().rev() {
        let reach = time.is_none_or(|t| b.recovery_epoch.is_some_and(|r| r <= t))
            && xid.is_none_or(|x| b.recovery_xid.is_some_and(|r| r <= x))
            && lsn.is_none_or(|l| b.stop_lsn.is_some_and(|s| s <= l))
            && rt
                .point_lsn
                .is_none_or(|l| b.stop_lsn.is_some_and(|s| s <= l));
        if reach {
            if let Ok(chain) = usable(b) {
                return Ok(chain);
            }
        }
    }
    Err(Error::not_found(
        "no valid backup can reach the recovery target".to_string(),
    ))
}

fn dir_is_empty(p: &Path) -> Result<bool> {
    match std::fs::read_dir(p) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(Error::io("read directory", p, e)),
    }
}

fn check_no_postmaster(target: &Path) -> Result<()> {
    let pidfile = target.join("postmaster.pid");
    if let Ok(s) = std::fs::read_to_string(&pidfile) {
        if let Some(pid) = s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()) {
            if pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
                return Err(Error::invalid(format!(
                    "a server (pid {pid}) is running in \"{}\"; stop it first",
                    target.display()
                )));
            }
        }
    }
    Ok(())
}

fn clear_dir(p: &Path) -> Result<()> {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd {
            let e = e.ctx("read directory", p)?;
            let path = e.path();
            let ft = e.file_type().ctx("stat", &path)?;
            if ft.is_dir() {
                std::fs::remove_dir_all(&path).ctx("remove", &path)?;
            } else {
                std::fs::remove_file(&path).ctx("remove", &path)?;
            }
        }
        durable::fsync_dir(p)?;
    }
    Ok(())
}

/// Parses `tablespace_map` lines "<oid> <path>" (14+: `\` escapes).
pub fn parse_tablespace_map(s: &str) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for line in s.lines() {
        if let Some((oid, path)) = line.split_once(' ') {
            let mut out = String::new();
            let mut esc = false;
            for c in path.chars() {
                if esc {
                    out.push(c);
                    esc = false;
                } else if c == '\\' {
                    esc = true;
                } else {
                    out.push(c);
                }
            }
            v.push((oid.to_string(), out));
        }
    }
    v
}

fn quote_conf(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Rewrites postgresql.auto.conf text: removes old lines for the settings we set, then
/// appends ours.
pub fn recovery_conf(existing: &str, settings: &[(&str, String)]) -> String {
    let keys: Vec<&str> = settings.iter().map(|(k, _)| *k).collect();
    let mut out = String::new();
    for line in existing.lines() {
        let key = line
            .trim_start()
            .split(['=', ' ', '\t'])
            .next()
            .unwrap_or("");
        let drop_it = keys.contains(&key)
            || key.starts_with("recovery_target")
            || key == "restore_command"
            || key == "recovery_end_command";
        if !drop_it {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# recovery settings added by walnut restore\n");
    for (k, v) in settings {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out
}

struct Restorer<'a> {
    catalog: &'a Catalog,
    chain: Vec<&'a BackupMeta>,
    /// Manifests of the older backups (index 1.. of the chain), by path.
    older: Vec<HashMap<String, FileEntry>>,
    target: PathBuf,
    tablespaces: HashMap<String, PathBuf>,
    progress: Progress,
}

impl Restorer<'_> {
    /// Where a logical path goes; `None` for `pg_tblspc/<oid>` itself (PostgreSQL makes
    /// the symlink from tablespace_map).
    fn dest(&self, logical: &str) -> Result<Option<PathBuf>> {
        if let Some(rest) = logical.strip_prefix("pg_tblspc/") {
            let (oid, tail) = match rest.split_once('/') {
                Some((o, t)) => (o, Some(t)),
                None => (rest, None),
            };
            if let Some(loc) = self.tablespaces.get(oid) {
                return Ok(tail.map(|t| loc.join(t)));
            }
        }
        Ok(Some(self.target.join(logical)))
    }

    fn stored(&self, b: &BackupMeta, e: &FileEntry) -> PathBuf {
        b.dir(self.catalog).join(e.stored_path())
    }

    /// Writes a whole stored file into `out`.
    fn write_full(&self, b: &BackupMeta, e: &FileEntry, out: &mut DurableFile) -> Result<()> {
        let src = self.stored(b, e);
        let f = File::open(&src).ctx("open", &src)?;
        let mut crc_r = CrcReader {
            inner: BufReader::with_capacity(1 << 20, f),
            crc: 0,
            n: 0,
        };
        let mut buf = vec![0u8; 1 << 20];
        let dest = out.path().to_path_buf();
        {
            let mut r: Box<dyn Read + '_> = if e.storage == Storage::FullLz4 {
                Box::new(lz4_flex::frame::FrameDecoder::new(&mut crc_r))
            } else {
                Box::new(&mut crc_r)
            };
            loop {
                let n = read_full(&mut r, &mut buf)
                    .map_err(|err| Error::corruption(format!("{}: {err}", src.display())))?;
                if n == 0 {
                    break;
                }
                std::io::Write::write_all(out, &buf[..n]).ctx("write", &dest)?;
                self.progress.inc(n as u64);
            }
        }
        if crc_r.crc != e.crc32c || crc_r.n != e.stored_size {
            return Err(Error::corruption(format!(
                "{}: stored file does not match its manifest checksum (backup {})",
                src.display(),
                b.id
            )));
        }
        Ok(())
    }

    /// Rebuilds an incremental file from the chain.
    fn write_incremental(&self, e: &FileEntry, out: &mut DurableFile) -> Result<()> {
        let bs = self.chain[0].block_size as usize;
        let newest = self.chain[0];
        let src = self.stored(newest, e);
        let info = incfile::read_info(&src, &src.display().to_string(), bs as u32)?;
        let len = info.file_blocks;
        let mut written = vec![false; len as usize];
        let dest = out.path().to_path_buf();
        let file = out.file().try_clone().ctx("open", &dest)?;
        // Pages arrive in increasing block order per source; consecutive ones are gathered
        // into one write of up to RUN_MAX bytes instead of one pwrite per 8 KiB page.
        const RUN_MAX: usize = 1 << 20;
        let mut run: (u32, Vec<u8>) = (0, Vec::with_capacity(RUN_MAX));
        let flush = |run: &mut (u32, Vec<u8>)| -> Result<()> {
            if !run.1.is_empty() {
                file.write_all_at(&run.1, run.0 as u64 * bs as u64)
                    .ctx("write", &dest)?;
                self.progress.inc(run.1.len() as u64);
                run.1.clear();
            }
            Ok(())
        };
        let mut put = |b: u32, page: &[u8], cap: u32| -> Result<()> {
            if b < cap && !written[b as usize] {
                let contiguous = run.0 as u64 + (run.1.len() / bs) as u64 == b as u64;
                if !contiguous || run.1.len() + page.len() > RUN_MAX {
                    flush(&mut run)?;
                    run.0 = b;
                }
                run.1.extend_from_slice(page);
                written[b as usize] = true;
            }
            Ok(())
        };
        let read_inc = |path: &Path,
                        put: &mut dyn FnMut(u32, &[u8]) -> Result<()>|
         -> Result<incfile::IncInfo> {
            let f = File::open(path).ctx("open", path)?;
            let flen = f.metadata().ctx("stat", path)?.len();
            incfile::read_stream(
                BufReader::with_capacity(1 << 20, f),
                flen,
                &path.display().to_string(),
                bs as u32,
                |b, p| put(b, p),
            )
        };
        read_inc(&src, &mut |b, p| put(b, p, len))?;
        let mut cap = len.min(info.limit_block.unwrap_or(u32::MAX));
        for (i, older) in self.chain.iter().enumerate().skip(1) {
            if cap == 0 {
                break;
            }
            let Some(oe) = self.older[i - 1].get(&e.path) else {
                break;
            };
            match oe.storage {
                Storage::Dir => break,
                Storage::Incremental => {
                    let p = self.stored(older, oe);
                    let oi = read_inc(&p, &mut |b, pg| put(b, pg, cap))?;
                    cap = cap
                        .min(oi.file_blocks)
                        .min(oi.limit_block.unwrap_or(u32::MAX));
                }
                Storage::Full | Storage::FullLz4 => {
                    // Read the whole stored file, also past `cap`, so that its manifest
                    // checksum is verified like every other file read from a backup.
                    let p = self.stored(older, oe);
                    let f = File::open(&p).ctx("open", &p)?;
                    let mut crc_r = CrcReader {
                        inner: BufReader::with_capacity(1 << 20, f),
                        crc: 0,
                        n: 0,
                    };
                    {
                        let mut r: Box<dyn Read + '_> = if oe.storage == Storage::FullLz4 {
                            Box::new(lz4_flex::frame::FrameDecoder::new(&mut crc_r))
                        } else {
                            Box::new(&mut crc_r)
                        };
                        let mut page = vec![0u8; bs];
                        let n_blocks = ((oe.size / bs as u64) as u32).min(cap);
                        for b in 0..n_blocks {
                            let n = read_full(&mut r, &mut page).map_err(|err| {
                                Error::corruption(format!("{}: {err}", p.display()))
                            })?;
                            if n < bs {
                                break;
                            }
                            put(b, &page, cap)?;
                        }
                        std::io::copy(&mut r, &mut std::io::sink())
                            .map_err(|err| Error::corruption(format!("{}: {err}", p.display())))?;
                    }
                    if crc_r.crc != oe.crc32c || crc_r.n != oe.stored_size {
                        return Err(Error::corruption(format!(
                            "{}: stored file does not match its manifest checksum (backup {})",
                            p.display(),
                            older.id
                        )));
                    }
                    break;
                }
            }
        }
        flush(&mut run)?;
        out.file()
            .set_len(len as u64 * bs as u64)
            .ctx("truncate", &dest)?;
        Ok(())
    }

    fn restore_entry(&self, e: &FileEntry) -> Result<Option<DurableFile>> {
        let Some(dest) = self.dest(&e.path)? else {
            return Ok(None);
        };
        if e.storage == Storage::Dir {
            return Ok(None);
        }
        if let Some(parent) = dest.parent() {
            durable::create_dir_all_durable(parent)?;
        }
        let mut out = DurableFile::create(&dest)?;
        match e.storage {
            Storage::Incremental => self.write_incremental(e, &mut out)?,
            _ => self.write_full(self.chain[0], e, &mut out)?,
        }
        Ok(Some(out))
    }
}

struct CrcReader<R: Read> {
    inner: R,
    crc: u32,
    n: u64,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

/// Path of `walnut-fetch` next to the running executable.
fn fetch_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::invalid(format!("cannot find own executable: {e}")))?;
    let dir = exe
        .parent()
        .ok_or_else(|| Error::invalid("executable has no directory"))?;
    Ok(dir.join("walnut-fetch"))
}

/// Restores; returns the restored backup's id.
pub fn restore(catalog: &Catalog, instance: &str, opts: &RestoreOptions) -> Result<String> {
    catalog.instance(instance)?;
    let list = meta::list(catalog, instance)?;
    // A named restore point: find its LSN in the block indexes, so that the backup chosen
    // ends before it (a later backup could never reach it).
    let mut recovery = opts.recovery.clone();
    if let (None, Some(name), None) = (&opts.backup_id, &recovery.name, &recovery.lsn) {
        let found = crate::archive::WalArchive::open(catalog, instance)
            .and_then(|a| a.find_restore_point(name));
        match found {
            Ok(Some((tli, lsn))) => {
                log::info!("restore point \"{name}\" is at {lsn} on timeline {tli}");
                recovery.point_lsn = Some(lsn);
            }
            Ok(None) => log::warn!(
                "restore point \"{name}\" is not in the block indexes; choosing the newest backup"
            ),
            Err(e) => log::warn!("could not look up restore point \"{name}\": {e}"),
        }
    }
    let chain = choose_backup(&list, opts.backup_id.as_deref(), &recovery)?;
    let newest = chain[0];
    let target = &opts.target;
    check_no_postmaster(target)?;
    if !dir_is_empty(target)? {
        if !opts.force {
            return Err(Error::invalid(format!(
                "restore target \"{}\" is not empty (use --force to overwrite it)",
                target.display()
            )));
        }
        clear_dir(target)?;
    }
    // tablespaces
    let bdir = newest.dir(catalog);
    let spcmap = std::fs::read_to_string(bdir.join("tablespace_map")).unwrap_or_default();
    let mut tablespaces = HashMap::new();
    let mut new_map = String::new();
    for (oid, path) in parse_tablespace_map(&spcmap) {
        let mut dest = PathBuf::from(&path);
        for (old, new) in &opts.mappings {
            if Path::new(&path) == old {
                dest = new.clone();
            }
        }
        check_no_postmaster(&dest)?;
        if !dir_is_empty(&dest)? {
            if !opts.force {
                return Err(Error::invalid(format!(
                    "tablespace {oid} location \"{}\" is not empty (map it elsewhere with -T OLD=NEW, or use --force)",
                    dest.display()
                )));
            }
            clear_dir(&dest)?;
        }
        durable::create_dir_all_durable(&dest)?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o700))
            .ctx("chmod", &dest)?;
        let esc = dest
            .display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('\n', "\\\n")
            .replace('\r', "\\\r");
        new_map.push_str(&format!("{oid} {esc}\n"));
        tablespaces.insert(oid, dest);
    }
    durable::create_dir_all_durable(target)?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o700))
        .ctx("chmod", target)?;

    let entries = manifest::read_file(&bdir.join("manifest"))?;
    let mut older = Vec::new();
    for b in chain.iter().skip(1) {
        let mut m = HashMap::new();
        for e in manifest::read_file(&b.dir(catalog).join("manifest"))? {
            if e.storage != Storage::Dir {
                m.insert(e.path.clone(), e);
            }
        }
        older.push(m);
    }
    let total: u64 = entries.iter().map(|e| e.size).sum();
    let r = Restorer {
        catalog,
        chain: chain.clone(),
        older,
        target: target.clone(),
        tablespaces,
        progress: Progress::new(&format!("restore {}", newest.id), total),
    };
    // Files are put in place without per-file fsyncs; one syncfs per filesystem written to
    // (handles opened before any write, see durable::FsSync) runs before pg_control.
    let mut fs_syncs = vec![durable::FsSync::open(target)?];
    for d in r.tablespaces.values() {
        fs_syncs.push(durable::FsSync::open(d)?);
    }
    for e in entries.iter().filter(|e| e.storage == Storage::Dir) {
        if let Some(d) = r.dest(&e.path)? {
            durable::create_dir_all_durable(&d)?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
                .ctx("chmod", &d)?;
        }
    }
    let files: Vec<&FileEntry> = entries
        .iter()
        .filter(|e| e.storage != Storage::Dir && e.path != "global/pg_control")
        .collect();
    let next = AtomicUsize::new(0);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(e) = files.get(i) else { break };
                if first_err.lock().map(|g| g.is_some()).unwrap_or(true) {
                    break;
                }
                let res = r
                    .restore_entry(e)
                    .and_then(|o| o.map_or(Ok(()), |df| df.commit_deferred(Replace::No)))
                    .map_err(|err| err.context(format!("restoring \"{}\"", e.path)));
                if let Err(err) = res {
                    if let Ok(mut g) = first_err.lock() {
                        g.get_or_insert(err);
                    }
                    break;
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    // pg_control: prepared under a temp name, renamed into place at the very end.
    let pc = entries
        .iter()
        .find(|e| e.path == "global/pg_control")
        .ok_or_else(|| {
            Error::corruption(format!("backup {} has no global/pg_control", newest.id))
        })?;
    let pc_file = r
        .restore_entry(pc)?
        .ok_or_else(|| Error::corruption("pg_control has no destination"))?;

    durable::write_file(
        &target.join("backup_label"),
        &std::fs::read(bdir.join("backup_label")).ctx("read", &bdir.join("backup_label"))?,
        Replace::Yes,
    )?;
    if !new_map.is_empty() {
        durable::write_file(
            &target.join("tablespace_map"),
            new_map.as_bytes(),
            Replace::Yes,
        )?;
    }
    let fetch = fetch_binary()?;
    let cat_abs =
        std::fs::canonicalize(catalog.root()).unwrap_or_else(|_| catalog.root().to_path_buf());
    let fetch_cmd = format!(
        "{} -B {} --instance {}",
        fetch.display(),
        cat_abs.display(),
        instance
    );
    let mut settings: Vec<(&str, String)> = vec![
        ("restore_command", quote_conf(&format!("{fetch_cmd} %f %p"))),
        // removes walnut-fetch's prefetch spool from pg_wal once recovery is over
        (
            "recovery_end_command",
            quote_conf(&format!("{fetch_cmd} --cleanup")),
        ),
    ];
    let rt = &opts.recovery;
    let n_targets = [&rt.time, &rt.xid, &rt.lsn, &rt.name, &rt.target]
        .iter()
        .filter(|t| t.is_some())
        .count();
    if n_targets > 1 {
        return Err(Error::invalid("give at most one recovery target"));
    }
    if let Some(t) = &rt.time {
        settings.push(("recovery_target_time", quote_conf(t)));
    }
    if let Some(t) = &rt.xid {
        settings.push(("recovery_target_xid", quote_conf(t)));
    }
    if let Some(t) = &rt.lsn {
        settings.push(("recovery_target_lsn", quote_conf(t)));
    }
    if let Some(t) = &rt.name {
        settings.push(("recovery_target_name", quote_conf(t)));
    }
    if let Some(t) = &rt.target {
        if t == "immediate" {
            settings.push(("recovery_target", quote_conf(t)));
        }
    }
    if let Some(i) = rt.inclusive {
        settings.push((
            "recovery_target_inclusive",
            quote_conf(if i { "on" } else { "off" }),
        ));
    }
    if let Some(t) = &rt.timeline {
        settings.push(("recovery_target_timeline", quote_conf(t)));
    }
    if let Some(a) = &rt.action {
        settings.push(("recovery_target_action", quote_conf(a)));
    }
    let auto = target.join("postgresql.auto.conf");
    let existing = std::fs::read_to_string(&auto).unwrap_or_default();
    durable::write_file(
        &auto,
        recovery_conf(&existing, &settings).as_bytes(),
        Replace::Yes,
    )?;
    durable::write_file(&target.join("recovery.signal"), b"", Replace::Yes)?;
    for f in &fs_syncs {
        f.sync()?;
    }
    // pg_control last: until it is in place the directory cannot start.
    pc_file.commit(Replace::Yes)?;
    durable::fsync_dir(target)?;
    r.progress.finish();
    Ok(newest.id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_settings_replace_older_lines() {
        let old = "# Do not edit\nwork_mem = '4MB'\nrestore_command = 'cp x'\nrecovery_target_time = '2020-01-01'\n";
        let s = recovery_conf(
            old,
            &[
                ("restore_command", "'walnut-fetch %f %p'".into()),
                ("recovery_target_name", "'p1'".into()),
            ],
        );
        assert!(s.contains("work_mem = '4MB'"));
        assert!(!s.contains("cp x"));
        assert!(!s.contains("2020-01-01"));
        assert!(s.contains("restore_command = 'walnut-fetch %f %p'\nrecovery_target_name = 'p1'\n"));
        assert_eq!(quote_conf("it's"), "'it''s'");
    }

    #[test]
    fn tablespace_map_unescapes() {
        let v = parse_tablespace_map("16400 /srv/ts one\n16401 /a\\\\b\n");
        assert_eq!(
            v,
            vec![
                ("16400".into(), "/srv/ts one".into()),
                ("16401".into(), "/a\\b".into())
            ]
        );
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use crate::backup::incfile::IncWriter;
    use crate::backup::meta::Mode;

    const BS: usize = 8192;

    fn page(tag: u8) -> Vec<u8> {
        vec![tag; BS]
    }

    fn meta(id: &str, mode: Mode, parent: Option<&str>) -> BackupMeta {
        BackupMeta {
            format: meta::META_FORMAT,
            id: id.into(),
            instance: "db".into(),
            mode,
            status: Status::Ok,
            parent_id: parent.map(Into::into),
            timeline: 1,
            start_lsn: Lsn(0),
            stop_lsn: Some(Lsn(1)),
            parent_start_lsn: None,
            start_time: String::new(),
            end_time: None,
            recovery_time: None,
            recovery_epoch: None,
            recovery_xid: None,
            data_bytes: 0,
            files: 0,
            compress: "none".into(),
            pg_major: 15,
            system_id: 1,
            block_size: BS as u32,
            relseg_size: 131072,
            wal_segment_size: 1 << 24,
            data_checksums: true,
            pid: None,
            error: None,
        }
    }

    fn inc(
        catalog: &Catalog,
        b: &BackupMeta,
        pages: &[(u32, u8)],
        file_blocks: u32,
        limit: Option<u32>,
    ) -> FileEntry {
        let mut w = IncWriter::new(Vec::new(), BS as u32, false).unwrap();
        for &(n, tag) in pages {
            w.add(n, &page(tag)).unwrap();
        }
        let (bytes, _) = w.finish(file_blocks, limit).unwrap();
        let e = FileEntry {
            path: "base/5/100".into(),
            storage: Storage::Incremental,
            size: file_blocks as u64 * BS as u64,
            stored_size: bytes.len() as u64,
            crc32c: crc32c::crc32c(&bytes),
            changed_blocks: Some(pages.len() as u32),
            file_blocks: Some(file_blocks),
            limit_block: limit,
        };
        let p = b.dir(catalog).join(e.stored_path());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
        e
    }

    fn fe_template(size: u64) -> FileEntry {
        FileEntry {
            path: "base/5/100".into(),
            storage: Storage::Full,
            size,
            stored_size: size,
            crc32c: 0,
            changed_blocks: None,
            file_blocks: None,
            limit_block: None,
        }
    }

    /// Rebuilds base/5/100 from `chain` (newest first) and returns its pages' tags.
    fn rebuild(
        catalog: &Catalog,
        chain: Vec<&BackupMeta>,
        entries: Vec<FileEntry>,
        target: &Path,
    ) -> Vec<u8> {
        let older = entries[1..]
            .iter()
            .map(|e| HashMap::from([(e.path.clone(), e.clone())]))
            .collect();
        let r = Restorer {
            catalog,
            chain,
            older,
            target: target.to_path_buf(),
            tablespaces: HashMap::new(),
            progress: Progress::hidden(),
        };
        let out = r.restore_entry(&entries[0]).unwrap().unwrap();
        out.commit(Replace::Yes).unwrap();
        let bytes = std::fs::read(target.join("base/5/100")).unwrap();
        assert_eq!(bytes.len() % BS, 0);
        bytes
            .chunks(BS)
            .map(|p| {
                assert!(p.iter().all(|&b| b == p[0]), "a page mixes sources");
                p[0]
            })
            .collect()
    }

    /// WAL-FORMAT §3.9: after a truncation to 2 blocks, blocks 2.. never come from the
    /// FULL backup even though it holds them; unlisted blocks are zero pages. Each block is
    /// taken from the newest backup that holds it, and the file has the newest length.
    #[test]
    fn truncation_rule_and_newest_first() {
        let d = tempfile::tempdir().unwrap();
        let catalog = Catalog::init(&d.path().join("cat")).unwrap();
        let f = meta("F", Mode::Full, None);
        let full_bytes: Vec<u8> = [1u8, 2, 3, 4].iter().flat_map(|&t| page(t)).collect();
        let fe = FileEntry {
            path: "base/5/100".into(),
            storage: Storage::Full,
            size: full_bytes.len() as u64,
            stored_size: full_bytes.len() as u64,
            crc32c: crc32c::crc32c(&full_bytes),
            changed_blocks: None,
            file_blocks: None,
            limit_block: None,
        };
        let fp = f.dir(&catalog).join(fe.stored_path());
        std::fs::create_dir_all(fp.parent().unwrap()).unwrap();
        std::fs::write(&fp, &full_bytes).unwrap();
        // PAGE 1: truncated to 2, then extended to 6 with block 2 written
        let p1 = meta("P1", Mode::Page, Some("F"));
        let e1 = inc(&catalog, &p1, &[(2, 20)], 6, Some(2));
        let t1 = d.path().join("t1");
        assert_eq!(
            rebuild(&catalog, vec![&p1, &f], vec![e1.clone(), fe.clone()], &t1),
            vec![1, 2, 20, 0, 0, 0]
        );
        // PAGE 2: block 4 written, block 0 rewritten, no truncation
        let p2 = meta("P2", Mode::Page, Some("P1"));
        let e2 = inc(&catalog, &p2, &[(0, 30), (4, 31)], 6, None);
        let t2 = d.path().join("t2");
        assert_eq!(
            rebuild(
                &catalog,
                vec![&p2, &p1, &f],
                vec![e2.clone(), e1.clone(), fe.clone()],
                &t2
            ),
            vec![30, 2, 20, 0, 31, 0]
        );
        // PAGE 3: shorter than its parent (truncated to 3 at copy time, no limit recorded in
        // its own range): blocks past 3 are gone
        let p3 = meta("P3", Mode::Delta, Some("P2"));
        let e3 = inc(&catalog, &p3, &[], 3, None);
        let t3 = d.path().join("t3");
        assert_eq!(
            rebuild(
                &catalog,
                vec![&p3, &p2, &p1, &f],
                vec![e3.clone(), e2.clone(), e1.clone(), fe.clone()],
                &t3
            ),
            vec![30, 2, 20]
        );
        // the same chain over an LZ4-compressed FULL
        let fz = meta("FZ", Mode::Full, None);
        let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
        std::io::Write::write_all(&mut enc, &full_bytes).unwrap();
        let z = enc.finish().unwrap();
        let fze = FileEntry {
            storage: Storage::FullLz4,
            stored_size: z.len() as u64,
            crc32c: crc32c::crc32c(&z),
            ..fe_template(full_bytes.len() as u64)
        };
        let zp = fz.dir(&catalog).join(fze.stored_path());
        std::fs::create_dir_all(zp.parent().unwrap()).unwrap();
        std::fs::write(&zp, &z).unwrap();
        let t4 = d.path().join("t4");
        assert_eq!(
            rebuild(
                &catalog,
                vec![&p3, &p2, &p1, &fz],
                vec![e3.clone(), e2.clone(), e1.clone(), fze],
                &t4
            ),
            vec![30, 2, 20]
        );
        let (e3_ok, fe_ok) = (e3, fe);
        // A damaged FULL beneath the chain is refused, even where the damage lies in a block
        // no newer backup lets it supply: the whole stored file is checked against its
        // manifest checksum.
        let mut bytes = std::fs::read(&fp).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&fp, &bytes).unwrap();
        let r = Restorer {
            catalog: &catalog,
            chain: vec![&p3, &p2, &p1, &f],
            older: [&e2, &e1, &fe_ok]
                .iter()
                .map(|e| HashMap::from([(e.path.clone(), (*e).clone())]))
                .collect(),
            target: d.path().join("t5"),
            tablespaces: HashMap::new(),
            progress: Progress::hidden(),
        };
        let err = r.restore_entry(&e3_ok).map(|_| ()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corruption, "{err}");
        assert!(err.to_string().contains("manifest checksum"), "{err}");
    }
}
