//! Crash-safe file writing: the only place that creates files meant to persist.
//!
//! The protocol, and why each step is there:
//! 1. Write into a *unique* temporary file in the same directory as the target (same
//!    filesystem, so the rename is atomic; unique, so two writers never share a temp file).
//! 2. `fsync` the file: the data must be on disk before any name points at it.
//! 3. Rename over (or, with [`Replace::No`], link without replacing) the final name. A reader
//!    sees either nothing or the whole file, never a prefix.
//! 4. `fsync` the directory: the rename itself must survive a power loss.
//!
//! A failed `fsync` is returned as an error and never retried: after a failed fsync the
//! kernel may have dropped the dirty pages, so a retry that succeeds proves nothing.
//!
//! Temp files are named `.<final>.walnut-tmp.<pid>.<nanos>`; [`remove_stale_temps`] deletes
//! those whose writer process no longer exists, so a SIGKILLed run leaves nothing that a later
//! run could mistake for a finished file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, ErrorKind, IoContext, Result};

const TMP_MARK: &str = ".walnut-tmp.";

/// What to do when the final name already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replace {
    /// Atomically replace it.
    Yes,
    /// Fail with [`ErrorKind::Conflict`], leaving the existing file untouched.
    No,
}

fn temp_path_for(path: &Path, dir: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("\"{}\" has no file name", path.display())))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(dir.join(format!(
        ".{}{TMP_MARK}{}.{nanos}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync a directory, so that entries created, renamed or removed in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).ctx("open directory", dir)?;
    f.sync_all().ctx("fsync directory", dir)
}

/// Creates `dir` and any missing parents, fsyncing each parent whose entries changed.
pub fn create_dir_all_durable(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir_all_durable(parent)?;
        }
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(Error::io("create directory", dir, e)),
    }
    fsync_dir(parent_dir(dir))
}

/// A file being written that becomes visible under its final name only on [`commit`].
/// Dropping it uncommitted removes the temp file.
///
/// [`commit`]: DurableFile::commit
pub struct DurableFile {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl DurableFile {
    pub fn create(path: &Path) -> Result<DurableFile> {
        DurableFile::create_in(path, parent_dir(path))
    }

    /// Like [`DurableFile::create`], with the temp file in `tmp_dir`, which must be on the
    /// same filesystem as `path` (rename and link are atomic only within one filesystem).
    /// Lets a large directory keep its temp files in a small one, so that tidying up stale
    /// temp files never has to list the large directory.
    pub fn create_in(path: &Path, tmp_dir: &Path) -> Result<DurableFile> {
        let tmp = temp_path_for(path, tmp_dir)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .ctx("create", &tmp)?;
        Ok(DurableFile {
            file: Some(file),
            tmp,
            path: path.to_path_buf(),
        })
    }

    pub fn file(&mut self) -> &mut File {
        // The Option is only None after commit, which consumes self.
        self.file.as_mut().expect("DurableFile used after commit")
    }

    /// Puts the file under its final name **without** fsyncing it or its directory.
    ///
    /// For trees of thousands of files (a backup's data, a restore) where two fsyncs per
    /// file would dominate: the caller must [`FsSync::sync`] every filesystem it wrote to
    /// (with handles opened before writing) before it writes the record that declares the
    /// tree complete (a backup's OK
    /// status, a restore's `pg_control`). Until then a crash may leave the tree with files
    /// missing or short, which is harmless because nothing yet claims it is whole.
    pub fn commit_deferred(mut self, replace: Replace) -> Result<()> {
        let file = self.file.take().expect("DurableFile committed twice");
        drop(file);
        match replace {
            Replace::Yes => fs::rename(&self.tmp, &self.path).ctx("rename into", &self.path),
            Replace::No => rename_noreplace(&self.tmp, &self.path),
        }
    }

    /// fsync, rename into place, fsync the directory.
    pub fn commit(mut self, replace: Replace) -> Result<()> {
        let file = self.file.take().expect("DurableFile committed twice");
        file.sync_all().ctx("fsync", &self.tmp)?;
        drop(file);
        match replace {
            Replace::Yes => fs::rename(&self.tmp, &self.path).ctx("rename into", &self.path)?,
            Replace::No => rename_noreplace(&self.tmp, &self.path)?,
        }
        fsync_dir(parent_dir(&self.path))
    }
}

impl Write for DurableFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Drop for DurableFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        } else if self.tmp.exists() {
            // commit failed after close (rename error): do not leave the temp file behind.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Renames `from` to `to` unless `to` exists. Uses a hard link + unlink, which is atomic
/// with respect to the final name on every POSIX filesystem walnut supports.
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    match fs::hard_link(from, to) {
        Ok(()) => {
            let _ = fs::remove_file(from);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let _ = fs::remove_file(from);
            Err(Error::new(
                ErrorKind::Conflict,
                format!("\"{}\" already exists", to.display()),
            ))
        }
        Err(e) => {
            let _ = fs::remove_file(from);
            Err(Error::io("link into", to, e))
        }
    }
}

/// Writes `data` to `path` durably (see the module docs).
pub fn write_file(path: &Path, data: &[u8], replace: Replace) -> Result<()> {
    write_file_in(path, parent_dir(path), data, replace)
}

/// [`write_file`] with the temp file in `tmp_dir` (see [`DurableFile::create_in`]).
pub fn write_file_in(path: &Path, tmp_dir: &Path, data: &[u8], replace: Replace) -> Result<()> {
    let mut f = DurableFile::create_in(path, tmp_dir)?;
    f.file().write_all(data).ctx("write", &f.tmp.clone())?;
    f.commit(replace)
}

/// A handle that makes everything written to one filesystem durable with `syncfs(2)`:
/// file data, and the directory entries created by renames and links.
///
/// Open it **before** writing: the kernel reports a writeback error to `syncfs` only if it
/// happened after the descriptor was opened (Linux 5.8+ errseq semantics), so a handle
/// opened at the end could miss an EIO from background writeback during the copy.
#[derive(Debug)]
pub struct FsSync {
    file: File,
    path: PathBuf,
}

impl FsSync {
    pub fn open(path: &Path) -> Result<FsSync> {
        Ok(FsSync {
            file: File::open(path).ctx("open", path)?,
            path: path.to_path_buf(),
        })
    }

    /// Flushes the whole filesystem; a failure is final (never retry a failed sync).
    pub fn sync(&self) -> Result<()> {
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&self.file))
            .map_err(|e| Error::io("syncfs", &self.path, io::Error::from(e)))
    }
}

/// Asks the kernel to start writing back `len` bytes of `file` from `offset`, without
/// waiting for them (`sync_file_range(SYNC_FILE_RANGE_WRITE)`).
///
/// Only a hint, never a durability step: it makes no promise about metadata, and durability
/// still comes from [`FsSync::sync`] or `sync_all`. Its use is to overlap writeback with the
/// rest of a long copy. Left alone, the kernel keeps up to `dirty_background_ratio` of memory
/// dirty (gigabytes), so a restore would write nearly everything at its final syncfs, after
/// all reading is done. Errors are ignored: a writeback failure is reported by the later
/// `syncfs`/`fsync` (errseq), which is where it must fail the operation.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    sync_range(file, offset, len, nix::libc::SYNC_FILE_RANGE_WRITE);
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Writes back `len` bytes of `file` from `offset` and waits for them
/// (`sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`), so that the pages are clean and
/// can be dropped from the page cache. Not a durability step either (no metadata, no device
/// cache flush); errors are left to the later `syncfs`/`fsync`, as for [`start_writeback`].
pub fn wait_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    sync_range(
        file,
        offset,
        len,
        nix::libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | nix::libc::SYNC_FILE_RANGE_WRITE
            | nix::libc::SYNC_FILE_RANGE_WAIT_AFTER,
    );
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// `sync_file_range(2)` with `flags`; errors ignored (see [`start_writeback`]).
#[cfg(target_os = "linux")]
fn sync_range(file: &File, offset: u64, len: u64, flags: std::os::raw::c_uint) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a descriptor that `file` keeps open; no memory passed.
    let _ = unsafe { nix::libc::sync_file_range(file.as_raw_fd(), offset as _, len as _, flags) };
}

/// Removes a file and makes the removal durable. Missing files are not an error.
pub fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(parent_dir(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

#[cfg(test)]
/// Whether a directory entry name is one of our temp files, exactly as [`temp_path_for`]
/// makes them: `.<final>.walnut-tmp.<pid>.<nanos>`.
pub fn is_temp_name(name: &str) -> bool {
    temp_writer_pid(name).is_some()
}

/// The writer's pid in one of our temp file names; `None` for any other name.
fn temp_writer_pid(name: &str) -> Option<i32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (head, rest) = name.rsplit_once(TMP_MARK)?;
    let (pid, nanos) = rest.split_once('.')?;
    if head.len() < 2 || !head.starts_with('.') || !digits(pid) || !digits(nanos) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` exists (`EPERM`: it does, owned by another user).
fn process_exists(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

/// Removes temp files in `dir` left by writers that no longer run. Returns how many.
pub fn remove_stale_temps(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("read directory", dir, e)),
    };
    for entry in rd {
        let entry = entry.ctx("read directory", dir)?;
        let name = entry.file_name();
        let Some(pid) = temp_writer_pid(&name.to_string_lossy()) else {
            continue;
        };
        // Only files: a directory or link of that name is not ours to remove.
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && !process_exists(pid) && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_and_noreplace() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_file(&p, b"one", Replace::No).unwrap();
        let e = write_file(&p, b"two", Replace::No).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(fs::read(&p).unwrap(), b"one");
        write_file(&p, b"three", Replace::Yes).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"three");
        // no temp files left behind
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn deferred_commit_then_syncfs() {
        let d = tempfile::tempdir().unwrap();
        let sync = FsSync::open(d.path()).unwrap();
        let p = d.path().join("f");
        let mut f = DurableFile::create(&p).unwrap();
        f.write_all(b"data").unwrap();
        f.commit_deferred(Replace::No).unwrap();
        let mut g = DurableFile::create(&p).unwrap();
        g.write_all(b"other").unwrap();
        assert_eq!(
            g.commit_deferred(Replace::No).unwrap_err().kind(),
            ErrorKind::Conflict
        );
        sync.sync().unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"data");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn temp_file_in_another_directory() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join(".tmp");
        fs::create_dir(&tmp).unwrap();
        let p = d.path().join("f");
        write_file_in(&p, &tmp, b"one", Replace::No).unwrap();
        assert_eq!(
            write_file_in(&p, &tmp, b"two", Replace::No)
                .unwrap_err()
                .kind(),
            ErrorKind::Conflict
        );
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
    }

    #[test]
    fn uncommitted_file_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        {
            let mut f = DurableFile::create(&p).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn stale_temps_of_dead_writers_are_removed() {
        let d = tempfile::tempdir().unwrap();
        // pid 0x7ffffffe is never a live process
        let stale = d.path().join(format!(".x{TMP_MARK}2147483646.1"));
        fs::write(&stale, b"junk").unwrap();
        let live = d
            .path()
            .join(format!(".y{TMP_MARK}{}.1", std::process::id()));
        fs::write(&live, b"mine").unwrap();
        assert_eq!(remove_stale_temps(d.path()).unwrap(), 1);
        assert!(!stale.exists());
        assert!(live.exists());
        // only walnut's exact temp names, never other files
        for other in [
            format!("x{TMP_MARK}2147483646.1"),
            format!(".{TMP_MARK}2147483646.1"),
            format!(".x{TMP_MARK}2147483646"),
            format!(".x{TMP_MARK}2147483646.1.gz"),
            format!(".x{TMP_MARK}abc.1"),
            ".RECOVERYXLOG".to_string(),
        ] {
            fs::write(d.path().join(&other), b"keep").unwrap();
            assert!(!is_temp_name(&other), "{other}");
        }
        fs::create_dir(d.path().join(format!(".dir{TMP_MARK}2147483646.1"))).unwrap();
        assert_eq!(remove_stale_temps(d.path()).unwrap(), 0);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 8);
        assert!(is_temp_name(&format!(".RECOVERYXLOG{TMP_MARK}12.345")));
    }
}
