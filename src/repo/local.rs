//! [`LocalRepo`]: a catalog in a local directory, one file per object.
//!
//! - Reads go through [`crate::safepath`]: no symlink below the root is followed, and an
//!   object must be a regular file (anything else is damage, never absence).
//! - Writes follow [`crate::durable`]'s protocol: a unique temp file in `.tmp/` beside the
//!   object (a small directory, so tidying stale temps never lists a large one), created
//!   with `O_EXCL`, fsync, a no-replace `linkat` under the final name, fsync of the directory
//!   (the fsyncs as the [`Durability`] asks).
//! - Directories are created on demand, without following links, and only while the guard
//!   object (the catalog marker) exists: a deleted catalog is never recreated piecemeal.
//! - Per-object cost: the catalog root is opened once per repository and kept; reads open
//!   `root/key` with one `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` relative to it.
//!   A writer's parent directory and its `.tmp` are opened once (safely, as above) and kept
//!   in a small cache, and the temp file, link, unlink and fsync are done relative to those
//!   handles: no path walk, no stat, no mkdir per object. A kept handle is, if anything,
//!   safer than a path: swapping an ancestor for a link later cannot redirect it. Absence
//!   below a kept handle is re-checked with freshly opened ones (a catalog replaced under a
//!   running process is seen), and a kept directory that was removed is reopened.
//! - Locks are `flock`s on dot-named files, which never appear in listings.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::libc;

use super::{
    check_key, check_prefix, Blob, Durability, Listing, LockMode, ObjectInfo, ObjectWriter, Repo,
    RepoLock,
};
use crate::durable::{self, FsSync};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::safepath;

const TMP_DIR: &str = ".tmp";
/// At most this many directories' handles are kept (two descriptors each); when full, the
/// cache starts over.
const DIR_CACHE_MAX: usize = 128;

/// The opened directory of a parent key and of its `.tmp`.
#[derive(Debug)]
struct DirFds {
    dir: OwnedFd,
    tmp: OwnedFd,
}
/// Threads of a batch of removals or fsyncs (they wait on the disk, not the CPU).
const IO_THREADS: usize = 8;

/// Runs `f` on every item, on up to `threads` threads; the first error is returned (the
/// other threads stop taking items).
fn par_each<T: Sync>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<()> + Sync,
) -> Result<()> {
    if items.len() <= 1 {
        return items.iter().try_for_each(f);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|sc| {
        for _ in 0..threads.min(items.len()) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                if let Err(e) = f(item) {
                    if let Ok(mut g) = first_err.lock() {
                        g.get_or_insert(e);
                    }
                    next.store(items.len(), std::sync::atomic::Ordering::Relaxed);
                    break;
                }
            });
        }
    });
    match first_err.into_inner() {
        Ok(Some(e)) => Err(e),
        Ok(None) => Ok(()),
        Err(_) => Err(Error::invalid("poisoned")),
    }
}

#[derive(Debug)]
pub struct LocalRepo {
    root: PathBuf,
    /// Directories are created only while this object exists (`None`: always).
    guard: Option<String>,
    /// Refuse [`Repo::delete`] (a WORM store, for tests of the append-only rule).
    refuse_delete: bool,
    /// `.tmp` directories already tidied by this process.
    tidied: Mutex<HashSet<PathBuf>>,
    sync: Mutex<Option<FsSync>>,
    /// The root directory, opened once (see the module docs).
    rootfd: Mutex<Option<Arc<OwnedFd>>>,
    /// Parent key -> its opened directory and `.tmp`.
    dirs: Mutex<HashMap<String, Arc<DirFds>>>,
    /// This process's id, for temp names (taken once, not per object).
    pid: u32,
}

impl LocalRepo {
    /// A repository rooted at the existing directory `root`.
    pub fn open(root: &Path) -> Result<LocalRepo> {
        let md = fs::metadata(root).ctx("open catalog directory", root)?;
        if !md.is_dir() {
            return Err(Error::invalid(format!(
                "\"{}\" is not a directory",
                root.display()
            )));
        }
        Ok(LocalRepo {
            root: root.to_path_buf(),
            guard: None,
            refuse_delete: false,
            tidied: Mutex::new(HashSet::new()),
            sync: Mutex::new(None),
            rootfd: Mutex::new(None),
            dirs: Mutex::new(HashMap::new()),
            pid: std::process::id(),
        })
    }

    /// Creates directories only while `key` exists.
    pub fn with_guard(mut self, key: &str) -> LocalRepo {
        self.guard = Some(key.to_string());
        self
    }

    /// Refuses deletes (as an Object Lock / WORM bucket would).
    pub fn refusing_delete(mut self, refuse: bool) -> LocalRepo {
        self.refuse_delete = refuse;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The local path of `key` (for messages and for the few local-only operations, such
    /// as restore's overlap checks). Reads and writes go through the trait.
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn parent_key(key: &str) -> &str {
        key.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
    }

    /// The kept handle of the root directory (opened on first use).
    fn root_fd(&self) -> Result<Arc<OwnedFd>> {
        let mut g = self.rootfd.lock().map_err(|_| Error::invalid("poisoned"))?;
        if let Some(fd) = &*g {
            return Ok(fd.clone());
        }
        let fd = Arc::new(safepath::open_root(&self.root)?);
        *g = Some(fd.clone());
        Ok(fd)
    }

    /// Opens the root again (it may have been replaced) and keeps the new handle.
    fn fresh_root_fd(&self) -> Result<Arc<OwnedFd>> {
        let fd = Arc::new(safepath::open_root(&self.root)?);
        *self.rootfd.lock().map_err(|_| Error::invalid("poisoned"))? = Some(fd.clone());
        Ok(fd)
    }

    /// Opens `key` for reading below the kept root: a link, a non-regular file or an
    /// escape is corruption; `Ok(None)` only when a freshly opened root says it is absent
    /// too (as [`safepath::open_under_if_exists`]).
    fn open_read(&self, key: &str) -> Result<Option<(File, fs::Metadata)>> {
        let fd = self.root_fd()?;
        if let Some(f) = safepath::open_at_if_exists(&fd, &self.root, key)? {
            return Ok(Some(f));
        }
        let fd = self.fresh_root_fd()?;
        safepath::open_at_if_exists(&fd, &self.root, key)
    }

    /// Opens the directory `prefix` below the kept root (links refused); `Ok(None)` only
    /// when a freshly opened root says it is absent too.
    fn open_dir_read(&self, prefix: &str) -> Result<Option<OwnedFd>> {
        let fd = self.root_fd()?;
        match safepath::open_dir_at(&fd, &self.root, prefix) {
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            r => return r.map(Some),
        }
        let fd = self.fresh_root_fd()?;
        match safepath::open_dir_at(&fd, &self.root, prefix) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            r => r.map(Some),
        }
    }

    /// [`LocalRepo::open_read`] where absence is [`ErrorKind::NotFound`].
    fn open_existing(&self, key: &str) -> Result<(File, fs::Metadata)> {
        match self.open_read(key)? {
            Some(f) => Ok(f),
            None => Err(Error::not_found(format!(
                "\"{}\" does not exist",
                self.root.join(key).display()
            ))),
        }
    }

    /// The kept handles of `parent` (a parent key) and its `.tmp`, opening (and creating,
    /// while the guard exists) them on first use.
    fn dir_fds(&self, parent: &str) -> Result<Arc<DirFds>> {
        if let Some(d) = self
            .dirs
            .lock()
            .map_err(|_| Error::invalid("poisoned"))?
            .get(parent)
        {
            return Ok(d.clone());
        }
        let d = Arc::new(self.open_dir_fds(parent)?);
        let mut m = self.dirs.lock().map_err(|_| Error::invalid("poisoned"))?;
        if m.len() >= DIR_CACHE_MAX {
            m.clear();
        }
        m.insert(parent.to_string(), d.clone());
        Ok(d)
    }

    fn forget_dir(&self, parent: &str) {
        if let Ok(mut m) = self.dirs.lock() {
            m.remove(parent);
        }
    }

    fn open_dir_fds(&self, parent: &str) -> Result<DirFds> {
        let fd = self.root_fd()?;
        let dir = match safepath::open_dir_at(&fd, &self.root, parent) {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // missing (or the kept root is stale): create it the slow, checked way
                let fd = self.fresh_root_fd()?;
                self.ensure_parent_dir(parent)?;
                safepath::open_dir_at(&fd, &self.root, parent)?
            }
            Err(e) => return Err(e),
        };
        let tmp_path = self.root.join(parent).join(TMP_DIR);
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        let tmp = match safepath::open_in(&dir, TMP_DIR, flags, &tmp_path) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // not fsynced into `dir`: nothing durable ever lives in it (an object is
                // durable under its final name, whose directory is fsynced), and a crash
                // that loses it loses only temp files; mode 0777 less the umask, as
                // before
                let c = CString::new(TMP_DIR).map_err(|_| Error::invalid("NUL"))?;
                // SAFETY: valid descriptor and NUL-terminated name.
                let r = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o777) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::AlreadyExists {
                        return Err(Error::io("create directory", &tmp_path, e));
                    }
                }
                safepath::open_in(&dir, TMP_DIR, flags, &tmp_path)?
            }
            Err(e) => return Err(e),
        };
        let first = self
            .tidied
            .lock()
            .map(|mut s| s.insert(tmp_path.clone()))
            .unwrap_or(false);
        if first {
            let _ = durable::remove_stale_temps(&tmp_path);
        }
        Ok(DirFds { dir, tmp })
    }

    /// Opens (creating when missing) the directory of `key`'s parent, without links.
    fn ensure_parent(&self, key: &str) -> Result<PathBuf> {
        self.ensure_parent_dir(Self::parent_key(key))
    }

    /// Opens (creating when missing) the directory `parent` (a key prefix), without links.
    fn ensure_parent_dir(&self, parent: &str) -> Result<PathBuf> {
        let dir = self.root.join(parent);
        if parent.is_empty() || dir.is_dir() {
            // is_dir follows links: verify without following them.
            safepath::open_dir_under(&self.root, parent)?;
            return Ok(dir);
        }
        if let Some(g) = &self.guard {
            if self.head(g)?.is_none() {
                return Err(Error::not_found(format!(
                    "the catalog \"{}\" is gone (no {g}); not recreating \"{}\"",
                    self.root.display(),
                    dir.display()
                )));
            }
        }
        // Create each missing level durably (its parent's entry fsynced).
        let mut cur = String::new();
        for c in parent.split('/') {
            let next = super::join(&cur, c);
            let p = self.root.join(&next);
            match fs::symlink_metadata(&p) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    return Err(Error::corruption(format!(
                        "\"{}\" is not a directory",
                        p.display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    safepath::create_dirs_under(&self.root, &next, 0o750)?;
                    durable::fsync_dir(&self.root.join(&cur))?;
                }
                Err(e) => return Err(Error::io("stat", &p, e)),
            }
            cur = next;
        }
        Ok(dir)
    }

    fn lock_file(&self, key: &str) -> Result<File> {
        let dir = self.ensure_parent(key)?;
        let name = key.rsplit('/').next().unwrap_or(key);
        let p = dir.join(name);
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .custom_flags_nofollow()
            .open(&p)
            .ctx("open lock file", &p)
    }
}

/// Takes an `flock` on the open lock file `f` (`path` names it in errors): `None` when
/// `wait` is false and another holder has it. Shared by the stores whose locks are local.
pub(crate) fn flock(f: File, path: &Path, mode: LockMode, wait: bool) -> Result<Option<RepoLock>> {
    let r = match (mode, wait) {
        (LockMode::Exclusive, true) => fs2::FileExt::lock_exclusive(&f),
        (LockMode::Exclusive, false) => fs2::FileExt::try_lock_exclusive(&f),
        (LockMode::Shared, true) => fs2::FileExt::lock_shared(&f),
        (LockMode::Shared, false) => fs2::FileExt::try_lock_shared(&f),
    };
    match r {
        Ok(()) => Ok(Some(RepoLock::new(Box::new(f)))),
        Err(e) if !wait && e.raw_os_error() == fs2::lock_contended_error().raw_os_error() => {
            Ok(None)
        }
        Err(e) => Err(Error::io("lock", path, e)),
    }
}

/// `O_NOFOLLOW` on an `OpenOptions` (a lock file must not be a link).
trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, nix::libc::O_NOFOLLOW)
    }
}

/// A temp file in a kept `.tmp`, linked under its final name in the kept directory on
/// commit (never replacing anything); removed when dropped uncommitted.
struct LocalWriter {
    file: Option<File>,
    dirs: Arc<DirFds>,
    tmp_name: CString,
    name: CString,
    /// The final path and the temp file's, for messages.
    what: String,
    tmp_path: PathBuf,
    /// Bytes written, and up to where writeback was started.
    written: u64,
    hinted: u64,
}

/// Makes temp names unique within the process even when two share a clock reading.
static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl LocalWriter {
    fn file(&mut self) -> io::Result<&mut File> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("object writer used after commit"))
    }

    fn unlink_tmp(&self) {
        // SAFETY: valid descriptor and NUL-terminated name.
        unsafe {
            libc::unlinkat(self.dirs.tmp.as_raw_fd(), self.tmp_name.as_ptr(), 0);
        }
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            self.unlink_tmp();
        }
    }
}

/// A large object's writeback is started every this many bytes ([`durable::start_writeback`],
/// a hint): the disk writes while the writer reads and computes, so the barrier or fsync
/// at the end has little left to wait for.
const WRITEBACK_BYTES: u64 = 8 << 20;

impl LocalWriter {
    fn wrote(&mut self, n: usize) {
        self.written += n as u64;
        if self.written - self.hinted >= WRITEBACK_BYTES {
            if let Some(f) = &self.file {
                durable::start_writeback(f, self.hinted, self.written - self.hinted);
            }
            self.hinted = self.written;
        }
    }
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file()?.write(buf)?;
        self.wrote(n);
        Ok(n)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file()?.write_all(buf)?;
        self.wrote(buf.len());
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file()?.flush()
    }
}

impl ObjectWriter for LocalWriter {
    fn commit(mut self: Box<Self>, durability: Durability) -> Result<()> {
        let Some(file) = self.file.take() else {
            return Err(Error::invalid(format!("\"{}\" committed twice", self.what)));
        };
        let now = durability == Durability::Now;
        // the bytes on disk before any name points at them (Deferred: the caller's barrier)
        let synced = if now {
            file.sync_all().ctx("fsync", &self.tmp_path)
        } else {
            Ok(())
        };
        drop(file);
        if let Err(e) = synced {
            self.unlink_tmp();
            return Err(e);
        }
        // link without replacing: an existing object is never touched
        // SAFETY: valid descriptors and NUL-terminated names.
        let r = unsafe {
            libc::linkat(
                self.dirs.tmp.as_raw_fd(),
                self.tmp_name.as_ptr(),
                self.dirs.dir.as_raw_fd(),
                self.name.as_ptr(),
                0,
            )
        };
        let linked = if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
        self.unlink_tmp();
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("\"{}\" already exists", self.what),
                ))
            }
            Err(e) => return Err(Error::io("link into", Path::new(&self.what), e)),
        }
        if now {
            // the new name durable
            // SAFETY: plain fsync of a descriptor we hold.
            if unsafe { libc::fsync(self.dirs.dir.as_raw_fd()) } < 0 {
                let e = io::Error::last_os_error();
                let dir = Path::new(&self.what).parent().unwrap_or(Path::new("/"));
                return Err(Error::io("fsync directory", dir, e));
            }
        }
        Ok(())
    }
    fn describe(&self) -> String {
        self.what.clone()
    }
}

impl Repo for LocalRepo {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        check_key(key, false)?;
        let parent = Self::parent_key(key);
        let name = key.rsplit('/').next().unwrap_or(key);
        let path = self.root.join(key);
        safepath::check_name_component(name, &path)?;
        {
            // Open the barrier's handle before the first deferred write (see FsSync).
            let mut s = self.sync.lock().map_err(|_| Error::invalid("poisoned"))?;
            if s.is_none() {
                *s = Some(FsSync::open(&self.root)?);
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            + u128::from(TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        // the name durable::remove_stale_temps recognises: .<final>.walnut-tmp.<pid>.<n>
        let tmp_name = format!(".{name}.walnut-tmp.{}.{nanos}", self.pid);
        let tmp_path = self.root.join(parent).join(TMP_DIR).join(&tmp_name);
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        let mut dirs = self.dir_fds(parent)?;
        let fd = match safepath::open_in(&dirs.tmp, &tmp_name, flags, &tmp_path) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // the kept directory was removed since: open (or create) it again
                self.forget_dir(parent);
                dirs = self.dir_fds(parent)?;
                safepath::open_in(&dirs.tmp, &tmp_name, flags, &tmp_path)?
            }
            r => r?,
        };
        let cname = |s: &str| {
            CString::new(s).map_err(|_| Error::invalid(format!("key {key:?} contains NUL")))
        };
        Ok(Box::new(LocalWriter {
            file: Some(File::from(fd)),
            tmp_name: cname(&tmp_name)?,
            name: cname(name)?,
            dirs,
            what: path.display().to_string(),
            tmp_path,
            written: 0,
            hinted: 0,
        }))
    }

    fn get(&self, key: &str) -> Result<Blob> {
        check_key(key, false)?;
        let (f, md) = self.open_existing(key)?;
        Ok(Blob::Mapped(super::mapped::FileBytes::from_file_len(
            f,
            md.len(),
            &self.root.join(key),
        )?))
    }

    fn open_file(&self, key: &str) -> Result<Option<File>> {
        check_key(key, false)?;
        self.open_existing(key).map(|(f, _)| Some(f))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        check_key(key, false)?;
        let path = self.root.join(key);
        let (f, _) = self.open_existing(key)?;
        let n = usize::try_from(len)
            .map_err(|_| Error::invalid(format!("\"{}\": range too large", path.display())))?;
        let mut buf = vec![0u8; n];
        match f.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::corruption(format!(
                "\"{}\": shorter than {} bytes at offset {offset}",
                path.display(),
                len
            ))),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        check_key(key, false)?;
        let Some((_, md)) = self.open_read(key)? else {
            return Ok(None);
        };
        let size = md.len();
        Ok(Some(ObjectInfo {
            name: key.rsplit('/').next().unwrap_or(key).to_string(),
            size,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Listing> {
        check_prefix(prefix)?;
        let dir = self.root.join(prefix);
        if self.open_dir_read(prefix)?.is_none() {
            return Ok(Listing::default());
        }
        let mut out = Listing::default();
        for ent in fs::read_dir(&dir).ctx("list", &dir)? {
            let ent = ent.ctx("list", &dir)?;
            let Some(name) = ent.file_name().to_str().map(str::to_string) else {
                return Err(Error::corruption(format!(
                    "\"{}\": a name that is not UTF-8: {:?}",
                    dir.display(),
                    ent.file_name()
                )));
            };
            if name.starts_with('.') {
                continue;
            }
            let ft = ent.file_type().ctx("stat", &ent.path())?;
            if ft.is_dir() {
                out.prefixes.push(name);
            } else if ft.is_file() {
                let size = ent.metadata().ctx("stat", &ent.path())?.len();
                out.objects.push(ObjectInfo { name, size });
            } else {
                out.damaged.push(name);
            }
        }
        out.objects.sort_by(|a, b| a.name.cmp(&b.name));
        out.prefixes.sort();
        out.damaged.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        check_key(key, false)?;
        let path = self.root.join(key);
        if self.refuse_delete {
            return Err(Error::refused(format!(
                "\"{}\": this catalog refuses deletes",
                path.display()
            )));
        }
        // The parent must be a real directory below the root; the name is removed
        // relative to it.
        let parent = Self::parent_key(key);
        let Some(dir) = self.open_dir_read(parent)? else {
            return Ok(());
        };
        let name = key.rsplit('/').next().unwrap_or(key);
        match nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) => File::from(dir)
                .sync_all()
                .ctx("fsync directory", &self.root.join(parent)),
            Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(Error::io("remove", &path, io::Error::from(e))),
        }
    }

    fn delete_batch(&self, keys: &[String]) -> Result<()> {
        // every key checked before anything goes
        let mut groups: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for key in keys {
            check_key(key, false)?;
            if self.refuse_delete {
                return Err(Error::refused(format!(
                    "\"{}\": this catalog refuses deletes",
                    self.root.join(key).display()
                )));
            }
            let name = key.rsplit('/').next().unwrap_or(key);
            groups.entry(Self::parent_key(key)).or_default().push(name);
        }
        // each parent opened once, as a real directory below the root (absent: nothing
        // to remove there); the names are removed relative to that handle
        let mut dirs: Vec<(&str, File)> = Vec::new();
        let mut work: Vec<(usize, &str)> = Vec::new();
        for (parent, names) in &groups {
            if let Some(f) = self.open_dir_read(parent)? {
                work.extend(names.iter().map(|n| (dirs.len(), *n)));
                dirs.push((parent, File::from(f)));
            }
        }
        let changed: Vec<std::sync::atomic::AtomicBool> =
            dirs.iter().map(|_| Default::default()).collect();
        par_each(&work, IO_THREADS, |&(d, name)| {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&dirs[d].1);
            match nix::unistd::unlinkat(Some(fd), name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
                Ok(()) => {
                    changed[d].store(true, std::sync::atomic::Ordering::Relaxed);
                    Ok(())
                }
                Err(nix::errno::Errno::ENOENT) => Ok(()),
                Err(e) => Err(Error::io(
                    "remove",
                    &self.root.join(dirs[d].0).join(name),
                    io::Error::from(e),
                )),
            }
        })?;
        // one fsync per directory makes the whole batch durable; concurrent fsyncs share
        // the filesystem's journal commits
        let touched: Vec<usize> = (0..dirs.len())
            .filter(|&d| changed[d].load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        par_each(&touched, IO_THREADS, |&d| {
            dirs[d]
                .1
                .sync_all()
                .ctx("fsync directory", &self.root.join(dirs[d].0))
        })
    }

    fn sync_objects(&self, keys: &[String]) -> Result<()> {
        let mut parents = std::collections::BTreeSet::new();
        for key in keys {
            check_key(key, false)?;
            parents.insert(Self::parent_key(key));
        }
        // each object's bytes, then the names in each directory, many at once (concurrent
        // fsyncs share the filesystem's journal commits)
        par_each(keys, IO_THREADS, |key| {
            self.open_existing(key)?
                .0
                .sync_all()
                .ctx("fsync", &self.root.join(key))
        })?;
        let parents: Vec<&str> = parents.into_iter().collect();
        let fd = self.root_fd()?;
        par_each(&parents, IO_THREADS, |p| {
            File::from(safepath::open_dir_at(&fd, &self.root, p)?)
                .sync_all()
                .ctx("fsync directory", &self.root.join(p))
        })
    }

    fn lock(&self, key: &str, mode: LockMode, wait: bool) -> Result<Option<RepoLock>> {
        check_key(key, true)?;
        let f = self.lock_file(key)?;
        let path = self.root.join(key);
        flock(f, &path, mode, wait)
    }

    fn barrier(&self) -> Result<()> {
        let s = self.sync.lock().map_err(|_| Error::invalid("poisoned"))?;
        match &*s {
            Some(fs) => fs.sync(),
            None => Ok(()),
        }
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_repo_keeps_the_rules() {
        let d = tempfile::tempdir().unwrap();
        let r = LocalRepo::open(d.path()).unwrap();
        super::super::conformance::run(&r);
        // temp files and locks never list
        assert!(d.path().join("a/.tmp").is_dir());
        assert!(r
            .list("a")
            .unwrap()
            .objects
            .iter()
            .all(|o| o.name != ".lock"));
    }

    #[test]
    fn links_and_odd_files_are_damage_not_absence() {
        let d = tempfile::tempdir().unwrap();
        let r = LocalRepo::open(d.path()).unwrap();
        r.put_new("x/real", b"1").unwrap();
        std::os::unix::fs::symlink(d.path().join("x/real"), d.path().join("x/link")).unwrap();
        assert_eq!(r.get("x/link").unwrap_err().kind(), ErrorKind::Corruption);
        assert_eq!(r.head("x/link").unwrap_err().kind(), ErrorKind::Corruption);
        std::os::unix::fs::symlink(d.path().join("x"), d.path().join("y")).unwrap();
        assert_eq!(r.get("y/real").unwrap_err().kind(), ErrorKind::Corruption);
        assert!(r.put_new("y/new", b"1").is_err());
        assert!(!d.path().join("x/new").exists());
        assert_eq!(r.list("x").unwrap().damaged, ["link"]);
    }

    /// The kept handles: a parent swapped for a link after the first write does not
    /// redirect later writes out of the catalog; a removed directory is made again; no
    /// temp file is left behind by a commit, a conflict or a dropped writer; an existing
    /// object is never replaced.
    #[test]
    fn kept_handles_stay_inside_and_create_only() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("cat");
        let away = outer.path().join("away");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&away).unwrap();
        let r = LocalRepo::open(&root).unwrap();
        r.put_new("b/x/one", b"1").unwrap();
        // swap b/x for a link to a directory outside the catalog
        fs::rename(root.join("b/x"), root.join("b/x.old")).unwrap();
        std::os::unix::fs::symlink(&away, root.join("b/x")).unwrap();
        let _ = r.put_new("b/x/two", b"2");
        assert_eq!(
            fs::read_dir(&away).unwrap().count(),
            0,
            "wrote through a link"
        );
        // reads never follow it either
        assert_eq!(r.get("b/x/one").unwrap_err().kind(), ErrorKind::Corruption);
        // a fresh repository refuses the link outright
        let r2 = LocalRepo::open(&root).unwrap();
        assert!(r2.put_new("b/x/three", b"3").is_err());
        assert_eq!(fs::read_dir(&away).unwrap().count(), 0);

        // a kept directory removed behind the repository's back is made again
        r.put_new("c/d/one", b"1").unwrap();
        fs::remove_dir_all(root.join("c/d")).unwrap();
        r.put_new("c/d/two", b"2").unwrap();
        assert_eq!(fs::read(root.join("c/d/two")).unwrap(), b"2");
        // the removed object is absent (re-checked below a freshly opened root)
        assert!(r.head("c/d/one").unwrap().is_none());

        // create-only, and .tmp tidy after commit, conflict and drop
        assert_eq!(
            r.put_new("c/d/two", b"other").unwrap_err().kind(),
            ErrorKind::Conflict
        );
        assert_eq!(fs::read(root.join("c/d/two")).unwrap(), b"2");
        let mut w = r.create("c/d/three").unwrap();
        w.write_all(b"x").unwrap();
        drop(w);
        assert!(r.head("c/d/three").unwrap().is_none());
        let mut w = r.create("c/d/four").unwrap();
        w.write_all(b"4444").unwrap();
        w.commit(Durability::Deferred).unwrap();
        assert_eq!(r.head("c/d/four").unwrap().unwrap().size, 4);
        assert_eq!(fs::read_dir(root.join("c/d/.tmp")).unwrap().count(), 0);
        // a `.tmp` that is a link is refused, not followed
        fs::create_dir_all(root.join("e")).unwrap();
        std::os::unix::fs::symlink(&away, root.join("e/.tmp")).unwrap();
        assert!(r.put_new("e/x", b"1").is_err());
        assert_eq!(fs::read_dir(&away).unwrap().count(), 0);
    }

    #[test]
    fn guard_and_refused_delete() {
        let d = tempfile::tempdir().unwrap();
        let r = LocalRepo::open(d.path()).unwrap().with_guard("marker");
        assert_eq!(
            r.put_new("i/w/x", b"1").unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert!(!d.path().join("i").exists());
        r.put_new("marker", b"m").unwrap();
        r.put_new("i/w/x", b"1").unwrap();
        r.delete("i/w/x").unwrap();
        r.delete("i/w/x").unwrap();
        let worm = LocalRepo::open(d.path()).unwrap().refusing_delete(true);
        worm.put_new("i/w/y", b"1").unwrap();
        assert_eq!(worm.delete("i/w/y").unwrap_err().kind(), ErrorKind::Refused);
        assert!(worm.head("i/w/y").unwrap().is_some());
    }
}
