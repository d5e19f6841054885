//! [`LocalRepo`]: a catalog in a local directory, one file per object.
//!
//! - Reads go through [`crate::safepath`]: no symlink below the root is followed, and an
//!   object must be a regular file (anything else is damage, never absence).
//! - Writes go through [`crate::durable`]: a unique temp file in `.tmp/` beside the object
//!   (a small directory, so tidying stale temps never lists a large one), fsync, a
//!   no-replace link under the final name, fsync of the directory.
//! - Directories are created on demand, without following links, and only while the guard
//!   object (the catalog marker) exists: a deleted catalog is never recreated piecemeal.
//! - Locks are `flock`s on dot-named files, which never appear in listings.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{
    check_key, check_prefix, Blob, Durability, Listing, LockMode, ObjectInfo, ObjectWriter, Repo,
    RepoLock,
};
use crate::durable::{self, DurableFile, FsSync, Replace};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::safepath;

const TMP_DIR: &str = ".tmp";
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

    fn base_name(key: &str) -> &str {
        key.rsplit('/').next().unwrap_or(key)
    }

    /// Opens the barrier's handle, before the first deferred write (see [`FsSync`]).
    fn sync_handle(&self) -> Result<()> {
        let mut s = self.sync.lock().map_err(|_| Error::invalid("poisoned"))?;
        if s.is_none() {
            *s = Some(FsSync::open(&self.root)?);
        }
        Ok(())
    }

    /// Opens (creating when missing) the directory of `key`'s parent, without links.
    fn ensure_parent(&self, key: &str) -> Result<PathBuf> {
        let parent = Self::parent_key(key);
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

    fn tmp_dir(&self, dir: &Path) -> Result<PathBuf> {
        let t = dir.join(TMP_DIR);
        // not fsynced into `dir`: nothing durable ever lives in it (an object is durable
        // under its final name, whose directory is fsynced), and a crash that loses it
        // loses only temp files
        match fs::create_dir(&t) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create directory", &t, e)),
        }
        let first = self
            .tidied
            .lock()
            .map(|mut s| s.insert(t.clone()))
            .unwrap_or(false);
        if first {
            let _ = durable::remove_stale_temps(&t);
        }
        Ok(t)
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

struct LocalWriter {
    file: DurableFile,
    what: String,
    /// Bytes written, and up to where writeback was started.
    written: u64,
    hinted: u64,
}

/// A large object's writeback is started every this many bytes ([`durable::start_writeback`],
/// a hint): the disk writes while the writer reads and computes, so the barrier or fsync
/// at the end has little left to wait for.
const WRITEBACK_BYTES: u64 = 8 << 20;

impl LocalWriter {
    fn wrote(&mut self, n: usize) {
        self.written += n as u64;
        if self.written - self.hinted >= WRITEBACK_BYTES {
            durable::start_writeback(self.file.file(), self.hinted, self.written - self.hinted);
            self.hinted = self.written;
        }
    }
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.wrote(n);
        Ok(n)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)?;
        self.wrote(buf.len());
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl ObjectWriter for LocalWriter {
    fn commit(self: Box<Self>, durability: Durability) -> Result<()> {
        match durability {
            Durability::Now => self.file.commit(Replace::No),
            Durability::Deferred => self.file.commit_deferred(Replace::No),
        }
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
        let dir = self.ensure_parent(key)?;
        let tmp = self.tmp_dir(&dir)?;
        let path = self.root.join(key);
        self.sync_handle()?;
        Ok(Box::new(LocalWriter {
            what: path.display().to_string(),
            file: DurableFile::create_in(&path, &tmp)?,
            written: 0,
            hinted: 0,
        }))
    }

    fn get(&self, key: &str) -> Result<Blob> {
        check_key(key, false)?;
        let f = safepath::open_under(&self.root, key)?;
        Ok(Blob::Mapped(super::mapped::FileBytes::from_file(
            f,
            &self.root.join(key),
        )?))
    }

    fn open_file(&self, key: &str) -> Result<Option<File>> {
        check_key(key, false)?;
        safepath::open_under(&self.root, key).map(Some)
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        check_key(key, false)?;
        let path = self.root.join(key);
        let f = safepath::open_under(&self.root, key)?;
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
        let Some(f) = safepath::open_under_if_exists(&self.root, key)? else {
            return Ok(None);
        };
        let size = f.metadata().ctx("stat", &self.root.join(key))?.len();
        Ok(Some(ObjectInfo {
            name: key.rsplit('/').next().unwrap_or(key).to_string(),
            size,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Listing> {
        check_prefix(prefix)?;
        let dir = self.root.join(prefix);
        let d = match safepath::open_dir_under(&self.root, prefix) {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Listing::default()),
            Err(e) => return Err(e),
        };
        drop(d);
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
        // The parent must be a real directory below the root.
        let parent = Self::parent_key(key);
        match safepath::open_dir_under(&self.root, parent) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        match fs::remove_file(&path) {
            Ok(()) => durable::fsync_dir(&self.root.join(parent)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &path, e)),
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
            match safepath::open_dir_under(&self.root, parent) {
                Ok(f) => {
                    work.extend(names.iter().map(|n| (dirs.len(), *n)));
                    dirs.push((parent, f));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
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
            safepath::open_under(&self.root, key)?
                .sync_all()
                .ctx("fsync", &self.root.join(key))
        })?;
        let parents: Vec<&str> = parents.into_iter().collect();
        par_each(&parents, IO_THREADS, |p| {
            safepath::open_dir_under(&self.root, p)?
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

    fn tidy_temps(&self, prefix: &str) -> Result<usize> {
        check_prefix(prefix)?;
        // the directory a real one below the root (no link followed), its `.tmp` a real
        // directory: temp names are removed only there
        match safepath::open_dir_under(&self.root, prefix) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        }
        let t = self.root.join(prefix).join(TMP_DIR);
        match fs::symlink_metadata(&t) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(Error::corruption(format!(
                    "\"{}\" is not a directory",
                    t.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io("stat", &t, e)),
        }
        // tidied now: this process's first write there need not list it again
        if let Ok(mut s) = self.tidied.lock() {
            s.insert(t.clone());
        }
        durable::remove_stale_temps(&t)
    }

    /// A hard link: `to`'s name is made in its (created when missing) directory for the
    /// inode `from` names, nothing read or written. `from` is opened as every read opens
    /// an object (no link in any component, a regular file); the link is made relative to
    /// directory handles opened without following links, and the new name is then checked
    /// to be that very inode (a name swapped meanwhile is removed again and refused).
    /// The new entry is durable at the next barrier (a filesystem-wide `syncfs`, which
    /// covers directory entries; the bytes were durable already). A filesystem without
    /// hard links between these directories (EXDEV, EPERM, EMLINK, EOPNOTSUPP) gets the
    /// streamed copy instead.
    fn link_copy(&self, from: &str, to: &str) -> Result<super::Copied> {
        use nix::errno::Errno;
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        check_key(from, false)?;
        check_key(to, false)?;
        let from_path = self.root.join(from);
        let to_path = self.root.join(to);
        let src = safepath::open_under(&self.root, from)?;
        let md = src.metadata().ctx("stat", &from_path)?;
        let src_dir = safepath::open_dir_under(&self.root, Self::parent_key(from))?;
        self.ensure_parent(to)?;
        let dst_dir = safepath::open_dir_under(&self.root, Self::parent_key(to))?;
        self.sync_handle()?;
        let (from_name, to_name) = (Self::base_name(from), Self::base_name(to));
        match nix::unistd::linkat(
            Some(src_dir.as_raw_fd()),
            from_name,
            Some(dst_dir.as_raw_fd()),
            to_name,
            nix::fcntl::AtFlags::empty(),
        ) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("\"{}\" already exists", to_path.display()),
                ))
            }
            Err(Errno::ENOENT) => {
                return Err(Error::not_found(format!(
                    "\"{}\": not found",
                    from_path.display()
                )))
            }
            Err(Errno::EXDEV | Errno::EPERM | Errno::EMLINK | Errno::EOPNOTSUPP) => {
                drop(src);
                return super::copy_object(self, from, to);
            }
            Err(e) => return Err(Error::io("link into", &to_path, io::Error::from(e))),
        }
        let made = nix::sys::stat::fstatat(
            Some(dst_dir.as_raw_fd()),
            to_name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        let same = made.as_ref().is_ok_and(|st| {
            st.st_ino == md.ino()
                && st.st_dev == md.dev()
                && (st.st_mode & nix::libc::S_IFMT) == nix::libc::S_IFREG
        });
        if !same {
            let _ = nix::unistd::unlinkat(
                Some(dst_dir.as_raw_fd()),
                to_name,
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
            return Err(Error::corruption(format!(
                "\"{}\" changed while it was linked to \"{}\" (refused)",
                from_path.display(),
                to_path.display()
            )));
        }
        Ok(super::Copied {
            size: md.len(),
            linked: true,
            crc32c: None,
        })
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

    /// link_copy makes a hard link (the same inode, nothing copied), create-only, never
    /// through a symbolic link; the source's removal leaves the new object whole.
    #[test]
    fn link_copy_links_the_same_file_and_refuses_links() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let r = LocalRepo::open(d.path()).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        r.put_new("b/1/database/base/5/16384", &data).unwrap();
        let c = r
            .link_copy("b/1/database/base/5/16384", "b/2/database/base/5/16384")
            .unwrap();
        assert_eq!(
            c,
            super::super::Copied {
                size: data.len() as u64,
                linked: true,
                crc32c: None
            }
        );
        let (a, b) = (
            d.path().join("b/1/database/base/5/16384"),
            d.path().join("b/2/database/base/5/16384"),
        );
        assert_eq!(
            fs::metadata(&a).unwrap().ino(),
            fs::metadata(&b).unwrap().ino()
        );
        assert_eq!(&*r.get("b/2/database/base/5/16384").unwrap(), &data[..]);
        // create-only: an existing object stays as it was
        r.put_new("b/3/x", b"other").unwrap();
        let e = r
            .link_copy("b/1/database/base/5/16384", "b/3/x")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        assert_eq!(&*r.get("b/3/x").unwrap(), b"other");
        // a symbolic link as the source, or in its path, is refused and nothing is made
        std::os::unix::fs::symlink(&a, d.path().join("b/1/link")).unwrap();
        let e = r.link_copy("b/1/link", "b/3/y").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption, "{e}");
        std::os::unix::fs::symlink(d.path().join("b/1"), d.path().join("b/4")).unwrap();
        let e = r
            .link_copy("b/4/database/base/5/16384", "b/3/z")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption, "{e}");
        // nor is a symbolic link followed on the destination's side
        assert!(r.link_copy("b/3/x", "b/4/new").is_err());
        assert!(!d.path().join("b/1/new").exists());
        assert_eq!(r.list("b/3").unwrap().objects.len(), 1);
        // the source's removal leaves the copy whole
        r.barrier().unwrap();
        r.delete("b/1/database/base/5/16384").unwrap();
        assert_eq!(&*r.get("b/2/database/base/5/16384").unwrap(), &data[..]);
        assert_eq!(fs::metadata(&b).unwrap().nlink(), 1);
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
