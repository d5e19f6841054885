//! Which directories a restore may write: checked before anything is written.
//!
//! Restore deletes and writes whole directory trees, usually as root, at paths that come
//! partly from the catalog (a backup's `tablespace_map`). Each destination (`-D` and every
//! tablespace location) is refused, whatever the options, when it
//! - is `/`, the catalog, inside the catalog or contains it;
//! - holds a running postmaster anywhere below it, or lies inside the data directory of a
//!   running server;
//! - overlaps the instance's registered data directory or one of its tablespaces while that
//!   server runs;
//! - overlaps another destination of the same restore.
//!
//! A destination that is not empty is refused too, unless the operator said it may be
//! cleared: `--force` for `-D`; for a tablespace, only an explicit `-T` naming it *and*
//! `--force` (`--force` alone never clears a location taken from the backup).
//!
//! "Empty" allows a `lost+found` directory (a fresh mount point), which is kept.
//!
//! A server is running when its `postmaster.pid` names a live process. A pid file that
//! cannot be read or parsed is an error, never "not running".

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// The directory a fresh filesystem has at its root; left alone by restore.
pub const LOST_FOUND: &str = "lost+found";

/// What a destination looks like before the restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirState {
    Missing,
    /// Empty, or holding only `lost+found`.
    Empty,
    NonEmpty,
}

/// Makes `p` absolute and resolves the links of its longest existing prefix; the rest must
/// be plain names. Used to compare destinations with the catalog and with each other.
pub fn resolve(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).ctx("resolve", p)?;
    let mut existing = abs.clone();
    let mut tail = Vec::new();
    loop {
        match std::fs::canonicalize(&existing) {
            Ok(c) => {
                let mut out = c;
                for t in tail.iter().rev() {
                    out.push(t);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let name = match existing.components().next_back() {
                    Some(Component::Normal(n)) => n.to_os_string(),
                    _ => {
                        return Err(Error::invalid(format!(
                            "\"{}\": '..' or '.' in a part of the path that does not exist",
                            p.display()
                        )))
                    }
                };
                tail.push(name);
                if !existing.pop() {
                    return Err(Error::io("resolve", p, e));
                }
            }
            Err(e) => return Err(Error::io("resolve", &existing, e)),
        }
    }
}

/// Whether one of two resolved paths is the other or inside it.
pub fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The PID of the live postmaster whose `postmaster.pid` is in `dir`, if any.
pub fn live_postmaster(dir: &Path) -> Result<Option<i32>> {
    let pidfile = dir.join("postmaster.pid");
    let text = match std::fs::read(&pidfile) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(
                Error::io("read", &pidfile, e).context("cannot tell whether a server is running")
            )
        }
    };
    let first = String::from_utf8_lossy(&text);
    let pid = first
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i64>().ok())
        .map(i64::unsigned_abs)
        .filter(|&p| p > 0 && p <= i32::MAX as u64)
        .ok_or_else(|| {
            Error::invalid(format!(
                "cannot tell whether a server is running: \"{}\" does not start with a process id",
                pidfile.display()
            ))
        })? as i32;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        // EPERM: the process exists, it just belongs to another user.
        Ok(()) | Err(nix::errno::Errno::EPERM) => Ok(Some(pid)),
        Err(nix::errno::Errno::ESRCH) => Ok(None),
        Err(e) => Err(Error::io(
            "check the process named in",
            &pidfile,
            std::io::Error::from(e),
        )),
    }
}

/// The first directory at or below `dir` (real directories only, links are not followed)
/// that holds a live postmaster.
fn postmaster_below(dir: &Path) -> Result<Option<(PathBuf, i32)>> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Some(pid) = live_postmaster(&d)? {
            return Ok(Some((d, pid)));
        }
        for e in std::fs::read_dir(&d).ctx("read directory", &d)? {
            let e = e.ctx("read directory", &d)?;
            if e.file_type().ctx("stat", &e.path())?.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(None)
}

/// The state of `dir`; a non-directory is refused.
pub fn state(dir: &Path) -> Result<(DirState, Option<String>)> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((DirState::Missing, None)),
        Err(e) => return Err(Error::io("stat", dir, e)),
        Ok(_) => {}
    }
    // The operator's path may be a link to a directory: follow it here.
    let md = std::fs::metadata(dir).ctx("stat", dir)?;
    if !md.is_dir() {
        return Err(Error::invalid(format!(
            "\"{}\" is not a directory",
            dir.display()
        )));
    }
    for e in std::fs::read_dir(dir).ctx("read directory", dir)? {
        let e = e.ctx("read directory", dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == LOST_FOUND && e.file_type().ctx("stat", &e.path())?.is_dir() {
            continue;
        }
        return Ok((DirState::NonEmpty, Some(name)));
    }
    Ok((DirState::Empty, None))
}

/// The instance's registered data directory and, while its server runs, its tablespaces.
pub struct Registered {
    pub pgdata: PathBuf,
    /// The postmaster's PID when it runs.
    pub pid: Option<i32>,
    /// Resolved tablespace locations (only read while the server runs).
    pub tablespaces: Vec<PathBuf>,
}

impl Registered {
    pub fn probe(pgdata: &Path) -> Result<Registered> {
        let pid = live_postmaster(pgdata)?;
        let mut tablespaces = Vec::new();
        if pid.is_some() {
            let d = pgdata.join("pg_tblspc");
            match std::fs::read_dir(&d) {
                Ok(rd) => {
                    for e in rd {
                        let e = e.ctx("read directory", &d)?;
                        tablespaces.push(resolve(&e.path())?);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("read directory", &d, e)),
            }
        }
        Ok(Registered {
            pgdata: resolve(pgdata)?,
            pid,
            tablespaces,
        })
    }
}

/// What a destination is and what the operator allowed for it.
pub struct Dest<'a> {
    /// "target directory" or "tablespace 16400 location".
    pub what: String,
    /// The path as given or as found in tablespace_map.
    pub path: &'a Path,
    /// The operator allowed its contents to be deleted.
    pub may_clear: bool,
    /// The refusal to give when it is not empty and may not be cleared.
    pub not_empty_hint: String,
}

/// Checks one destination (see the module docs); returns its state.
/// `catalog` is the catalog's local directory, resolved (`None` for a store that is not a
/// local directory: nothing to overlap).
pub fn check(
    d: &Dest<'_>,
    catalog: Option<&Path>,
    instance: &str,
    reg: &Registered,
) -> Result<DirState> {
    let path = d.path;
    let r = resolve(path)?;
    let refuse = |why: String| {
        Err(Error::invalid(format!(
            "refusing to restore into {} \"{}\": {why}",
            d.what,
            path.display()
        )))
    };
    if r.parent().is_none() {
        return refuse("it is the root directory".into());
    }
    if let Some(catalog) = catalog.filter(|c| overlaps(&r, c)) {
        return refuse(format!(
            "it {} the catalog \"{}\"",
            if r.starts_with(catalog) {
                "is or lies inside"
            } else {
                "contains"
            },
            catalog.display()
        ));
    }
    if let Some(pid) = reg.pid {
        let live = std::iter::once(&reg.pgdata).chain(&reg.tablespaces);
        for l in live {
            if overlaps(&r, l) {
                return refuse(format!(
                    "it overlaps \"{}\", used by the server of instance \"{instance}\" (pid {pid}), which is running; stop it first or restore elsewhere",
                    l.display()
                ));
            }
        }
    }
    for a in r.ancestors().skip(1) {
        if let Some(pid) = live_postmaster(a)? {
            return refuse(format!(
                "it lies inside \"{}\", the data directory of a server (pid {pid}) that is running",
                a.display()
            ));
        }
    }
    let (st, example) = state(&r)?;
    if st == DirState::NonEmpty {
        if let Some((dir, pid)) = postmaster_below(&r)? {
            return refuse(format!(
                "a server (pid {pid}) is running in \"{}\"; stop it first",
                dir.display()
            ));
        }
        if !d.may_clear {
            return Err(Error::invalid(format!(
                "{} \"{}\" is not empty (it holds \"{}\"); {}",
                d.what,
                path.display(),
                example.unwrap_or_default(),
                d.not_empty_hint
            )));
        }
    }
    Ok(st)
}

/// Removes everything in `p` except a top-level `lost+found` directory (links are removed,
/// never followed).
pub fn clear(p: &Path) -> Result<()> {
    for e in std::fs::read_dir(p).ctx("read directory", p)? {
        let e = e.ctx("read directory", p)?;
        let path = e.path();
        let ft = e.file_type().ctx("stat", &path)?;
        if ft.is_dir() {
            if e.file_name() == LOST_FOUND {
                continue;
            }
            std::fs::remove_dir_all(&path).ctx("remove", &path)?;
        } else {
            std::fs::remove_file(&path).ctx("remove", &path)?;
        }
    }
    crate::durable::fsync_dir(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_follows_existing_prefix_only() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("ln")).unwrap();
        let canon = std::fs::canonicalize(&real).unwrap();
        assert_eq!(
            resolve(&d.path().join("ln/new/x")).unwrap(),
            canon.join("new/x")
        );
        assert!(resolve(&d.path().join("ln/new/../x")).is_err());
        assert!(overlaps(&canon, &canon.join("a")));
        assert!(!overlaps(&canon.join("a"), &canon.join("ab")));
    }

    #[test]
    fn pid_files() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(live_postmaster(d.path()).unwrap(), None);
        let me = std::process::id() as i32;
        std::fs::write(d.path().join("postmaster.pid"), format!("{me}\n/x\n")).unwrap();
        assert_eq!(live_postmaster(d.path()).unwrap(), Some(me));
        std::fs::write(d.path().join("postmaster.pid"), "garbage\n").unwrap();
        assert!(live_postmaster(d.path()).is_err());
        std::fs::write(d.path().join("postmaster.pid"), "").unwrap();
        assert!(live_postmaster(d.path()).is_err());
        // a pid file that is a directory cannot be read: an error, not "not running"
        std::fs::remove_file(d.path().join("postmaster.pid")).unwrap();
        std::fs::create_dir(d.path().join("postmaster.pid")).unwrap();
        assert!(live_postmaster(d.path()).is_err());
    }

    #[test]
    fn lost_found_counts_as_empty() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(state(&d.path().join("no")).unwrap().0, DirState::Missing);
        std::fs::create_dir(d.path().join(LOST_FOUND)).unwrap();
        assert_eq!(state(d.path()).unwrap().0, DirState::Empty);
        std::fs::write(d.path().join("f"), b"x").unwrap();
        assert_eq!(state(d.path()).unwrap().0, DirState::NonEmpty);
        clear(d.path()).unwrap();
        assert!(d.path().join(LOST_FOUND).is_dir());
        assert_eq!(state(d.path()).unwrap().0, DirState::Empty);
    }
}
