//! Paths read from the catalog are untrusted input.
//!
//! Whoever can write the catalog (the postgres OS user can: `archive_command` writes into it)
//! must not be able to make `validate` or `restore`, which often run as root, read or write
//! anything outside the catalog and the restore target. So:
//! - every path that comes from catalog content (manifest entries, `backup.json` ids,
//!   `tablespace_map`, index file names) is checked to be a normalised relative path before
//!   it is joined to anything ([`check_rel_path`], [`check_name`]);
//! - stored files are opened component by component with `O_NOFOLLOW`, so a symlink anywhere
//!   below the catalog root (a `database/base` that points elsewhere, a stored file that is a
//!   link to `/etc/shadow`) is refused, and only regular files and real directories are
//!   accepted ([`open_under`], [`open_dir_under`]);
//! - the restore side creates its directories the same way ([`create_dirs_under`]), so it
//!   never follows a link that someone planted in the target.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::libc;

use crate::error::{Error, Result};

/// Checks that `p` is a normalised relative path: not empty, not absolute, no `.`, `..` or
/// empty components, no trailing slash, no NUL. `what` names the source for the error
/// ("manifest entry", "tablespace_map", ...).
pub fn check_rel_path(p: &str, what: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::corruption(format!(
            "{what}: unsafe path {p:?}: {why}"
        )))
    };
    if p.is_empty() {
        return bad("empty");
    }
    if p.len() > 4096 {
        return bad("too long");
    }
    if p.contains('\0') {
        return bad("contains NUL");
    }
    if p.starts_with('/') {
        return bad("absolute");
    }
    for c in p.split('/') {
        match c {
            "" => return bad("empty component (leading, trailing or doubled '/')"),
            "." | ".." => return bad("'.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
/// Like [`check_rel_path`], and the first component must be one of `tops`.
pub fn check_rel_path_under(p: &str, tops: &[&str], what: &str) -> Result<()> {
    check_rel_path(p, what)?;
    let first = p.split('/').next().unwrap_or("");
    if !tops.contains(&first) {
        return Err(Error::corruption(format!(
            "{what}: unsafe path {p:?}: must be under one of {tops:?}"
        )));
    }
    Ok(())
}

/// Checks that `s` is one plain file-name component (a backup id, an instance name, an index
/// file name): ASCII letters, digits, `_`, `-` and `.`, not `.` or `..`, at most 255 bytes.
pub fn check_name(s: &str, what: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::corruption(format!("{what}: unsafe name {s:?}")))
    }
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::invalid(format!("path {:?} contains NUL", p.display())))
}

fn openat(dir: Option<&OwnedFd>, name: &Path, flags: i32, full: &Path) -> Result<OwnedFd> {
    let c = cstr(name)?;
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; `dirfd` is either
    // AT_FDCWD or a descriptor we own; the flags and mode are plain integers.
    let fd = unsafe { libc::openat(dirfd, c.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(open_error(std::io::Error::last_os_error(), full));
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_error(e: std::io::Error, full: &Path) -> Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => Error::corruption(format!(
            "\"{}\" is a symbolic link, where a real file or directory is required",
            full.display()
        )),
        Some(libc::ENOTDIR) => Error::corruption(format!(
            "\"{}\": a component is not a directory",
            full.display()
        )),
        Some(libc::EXDEV) => Error::corruption(format!(
            "\"{}\" leads outside its directory",
            full.display()
        )),
        _ => Error::io("open", full, e),
    }
}

/// Set once openat2 turned out to be unavailable (old kernel, seccomp filter).
static NO_OPENAT2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Opens `rel` below the directory `dir` in one `openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS)` call: the kernel refuses a link in any component, as the walk in
/// [`walk_dirs`] does, for two path lookups instead of one `openat` and `close` per
/// component (restore and validate open every stored file). `None` when openat2 is not
/// available, or gave up on a concurrent rename (EAGAIN): the caller then walks.
fn openat2_beneath(dir: &OwnedFd, rel: &str, flags: i32, full: &Path) -> Option<Result<OwnedFd>> {
    use std::sync::atomic::Ordering;
    if NO_OPENAT2.load(Ordering::Relaxed) {
        return None;
    }
    let c = match cstr(Path::new(rel)) {
        Ok(c) => c,
        Err(e) => return Some(Err(e)),
    };
    // SAFETY: open_how is a plain C struct; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid descriptor, NUL-terminated path and a pointer to `how` with its size,
    // all outliving the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EINVAL) | Some(libc::E2BIG) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
                None
            }
            Some(libc::EAGAIN) => None,
            _ => Some(Err(open_error(e, full))),
        };
    }
    // SAFETY: `fd` was just returned by openat2 and is owned by nobody else.
    Some(Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// Opens the directory `root` itself (following links in `root`, which the operator gave)
/// and then each component of `rel` without following links.
fn walk_dirs(root: &Path, rel: &Path) -> Result<OwnedFd> {
    let rootfd = openat(None, root, libc::O_RDONLY | libc::O_DIRECTORY, root)?;
    walk_dirs_from(rootfd, root, rel)
}

/// From the opened directory `start` (`root`'s), each component of `rel` without following
/// links; every one must be a real directory.
fn walk_dirs_from(start: OwnedFd, root: &Path, rel: &Path) -> Result<OwnedFd> {
    let mut cur = start;
    let mut full = root.to_path_buf();
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(Error::corruption(format!(
                "unsafe path component in \"{}\"",
                rel.display()
            )));
        };
        full.push(name);
        cur = openat(
            Some(&cur),
            Path::new(name),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            &full,
        )?;
    }
    Ok(cur)
}

/// Opens `root/rel` for reading. `root` is trusted (the catalog root or a backup directory
/// the caller built from checked names); no component of `rel` may be a symlink, every
/// intermediate one must be a real directory and the last a regular file. `rel` must pass
/// [`check_rel_path`]. A missing file is [`ErrorKind::NotFound`](crate::ErrorKind); a link
/// or a non-regular file is corruption.
pub fn open_under(root: &Path, rel: &str) -> Result<File> {
    check_rel_path(rel, "stored file")?;
    let rootfd = openat(None, root, libc::O_RDONLY | libc::O_DIRECTORY, root)?;
    open_below(&rootfd, root, rel)
}

/// Like [`open_under`], but `Ok(None)` when the file is *definitely* absent: `ENOENT` for a
/// component below `root`, looked up in a directory that was itself opened for reading. Any
/// other failure (a missing or unreadable `root` or directory, `EIO`, a link, a non-regular
/// file) is an error, so that damage is never mistaken for absence.
pub fn open_under_if_exists(root: &Path, rel: &str) -> Result<Option<File>> {
    check_rel_path(rel, "stored file")?;
    // `root` itself must open: a missing root is damage, not absence.
    let rootfd = openat(None, root, libc::O_RDONLY | libc::O_DIRECTORY, root)?;
    match open_below(&rootfd, root, rel) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == crate::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the checked relative path `rel` below the opened directory `rootfd` (`root`'s):
/// one `openat2` that refuses links and escapes, or a component walk with `O_NOFOLLOW` where
/// the kernel lacks it. `ENOENT` anywhere below `rootfd` is [`ErrorKind::NotFound`](crate::ErrorKind);
/// a link or a non-regular file is corruption.
fn open_below(rootfd: &OwnedFd, root: &Path, rel: &str) -> Result<File> {
    let full = root.join(rel);
    let (parent, name) = match rel.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", rel),
    };
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let fd = match openat2_beneath(rootfd, rel, flags, &full) {
        Some(r) => r?,
        None => {
            let start = rootfd.try_clone().map_err(|e| Error::io("dup", root, e))?;
            let dir = walk_dirs_from(start, root, Path::new(parent))?;
            openat(Some(&dir), Path::new(name), flags, &full)?
        }
    };
    let f = File::from(fd);
    let md = f.metadata().map_err(|e| Error::io("stat", &full, e))?;
    if !md.file_type().is_file() {
        return Err(Error::corruption(format!(
            "\"{}\" is not a regular file",
            full.display()
        )));
    }
    // Back to blocking reads (O_NONBLOCK only kept a FIFO from hanging the open).
    // SAFETY: plain fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

/// Opens the directory `root/rel` (empty `rel`: `root` itself) without following links below
/// `root`; a link or a non-directory is corruption.
pub fn open_dir_under(root: &Path, rel: &str) -> Result<File> {
    if !rel.is_empty() {
        check_rel_path(rel, "stored directory")?;
    }
    Ok(File::from(walk_dirs(root, Path::new(rel))?))
}

/// Creates the directories `root/rel` (each missing component with `mode`) without following
/// links below `root`: an existing component must be a real directory. Returns the last one
/// opened. `root` must exist.
pub fn create_dirs_under(root: &Path, rel: &str, mode: u32) -> Result<File> {
    if rel.is_empty() {
        return open_dir_under(root, "");
    }
    check_rel_path(rel, "directory to create")?;
    let mut cur = openat(None, root, libc::O_RDONLY | libc::O_DIRECTORY, root)?;
    let mut full = root.to_path_buf();
    for name in rel.split('/') {
        full.push(name);
        let c = cstr(Path::new(name))?;
        // SAFETY: valid descriptor and NUL-terminated name.
        let r = unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(Error::io("create directory", &full, e));
            }
        }
        cur = openat(
            Some(&cur),
            Path::new(name),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            &full,
        )?;
    }
    Ok(File::from(cur))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn rel_paths() {
        for ok in [
            "base/1/123",
            "PG_VERSION",
            "pg_tblspc/16400/PG_15_x/5/16401",
        ] {
            check_rel_path(ok, "t").unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            "a//b",
            "a/",
            ".",
            "a\0b",
        ] {
            assert!(check_rel_path(bad, "t").is_err(), "{bad:?}");
        }
        check_rel_path_under("database/base/1", &["database"], "t").unwrap();
        assert!(check_rel_path_under("other/base/1", &["database"], "t").is_err());
    }

    #[test]
    fn names() {
        check_name("QZ1A2B-20261129", "id").unwrap();
        for bad in ["", ".", "..", "a/b", "../x", "a b", "x\0"] {
            assert!(check_name(bad, "id").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn open_refuses_links() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("database/base")).unwrap();
        std::fs::write(root.join("database/base/1"), b"x").unwrap();
        std::fs::write(d.path().join("secret"), b"s").unwrap();
        open_under(root, "database/base/1").unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), root.join("database/base/2")).unwrap();
        let e = open_under(root, "database/base/2").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption, "{e}");
        std::os::unix::fs::symlink(root.join("database"), root.join("db2")).unwrap();
        let e = open_under(root, "db2/base/1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption, "{e}");
        let e = open_under(root, "database/base/9").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        let e = open_under(root, "database/base").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption, "{e}");
        assert!(open_under(root, "../secret").is_err());
        open_dir_under(root, "database/base").unwrap();
        assert!(open_dir_under(root, "db2").is_err());

        // absent only when a readable directory says so
        assert!(open_under_if_exists(root, "database/base/9")
            .unwrap()
            .is_none());
        assert!(open_under_if_exists(root, "nodir/x").unwrap().is_none());
        assert!(open_under_if_exists(root, "database/base/1")
            .unwrap()
            .is_some());
        for damaged in [
            "database/base/2",
            "db2/base/1",
            "database/base",
            "database/base/1/x",
        ] {
            let e = open_under_if_exists(root, damaged).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corruption, "{damaged}: {e}");
        }
        assert!(open_under_if_exists(&root.join("missing-root"), "x").is_err());
        create_dirs_under(root, "t/a/b", 0o700).unwrap();
        assert!(root.join("t/a/b").is_dir());
        std::os::unix::fs::symlink(d.path(), root.join("t/link")).unwrap();
        assert!(create_dirs_under(root, "t/link/x", 0o700).is_err());
        assert!(!d.path().join("x").exists());
    }

    /// The same refusals when openat2 is not there (old kernels, seccomp): the walk.
    #[test]
    fn open_refuses_links_without_openat2() {
        use std::sync::atomic::Ordering;
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("database/base")).unwrap();
        std::fs::write(root.join("database/base/1"), b"x").unwrap();
        std::fs::write(d.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), root.join("database/base/2")).unwrap();
        std::os::unix::fs::symlink(root.join("database"), root.join("db2")).unwrap();
        for no_openat2 in [false, true] {
            NO_OPENAT2.store(no_openat2, Ordering::Relaxed);
            open_under(root, "database/base/1").unwrap();
            for (rel, kind) in [
                ("database/base/2", ErrorKind::Corruption),
                ("db2/base/1", ErrorKind::Corruption),
                ("database/base", ErrorKind::Corruption),
                ("database/base/1/x", ErrorKind::Corruption),
                ("database/base/9", ErrorKind::NotFound),
            ] {
                let e = open_under(root, rel).unwrap_err();
                assert_eq!(e.kind(), kind, "{no_openat2} {rel}: {e}");
            }
        }
        NO_OPENAT2.store(false, Ordering::Relaxed);
    }

    #[test]
    #[ignore]
    fn open_under_cost() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("database/base/16384")).unwrap();
        let names: Vec<String> = (0..2000)
            .map(|i| format!("database/base/16384/{i}"))
            .collect();
        for n in &names {
            std::fs::write(root.join(n), b"x").unwrap();
        }
        let t = std::time::Instant::now();
        for n in &names {
            std::fs::File::open(root.join(n)).unwrap();
        }
        let plain = t.elapsed();
        let t = std::time::Instant::now();
        for n in &names {
            open_under(root, n).unwrap();
        }
        eprintln!(
            "File::open {plain:?}, open_under {:?} for 2000 files",
            t.elapsed()
        );
    }
}
