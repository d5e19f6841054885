//! The repository layer: the only code that touches the catalog's storage.
//!
//! A catalog is a set of *objects* named by keys (`instances/db/wal/00000001/…lz4`), as on
//! object storage. [`Repo`] is the narrow interface every catalog read and write goes
//! through; the data directory, the restore target and `pg_wal` stay local and outside it.
//!
//! The rules every implementation keeps:
//! - **Create-only.** [`Repo::put_new`] and [`Repo::create`] never replace an object: an
//!   existing key is [`ErrorKind::Conflict`] and leaves it untouched. An object is visible
//!   under its key only complete (and, unless deferred, durable).
//! - **Append-only catalog.** Nothing is rewritten; [`Repo::delete`] is for the explicit
//!   lifecycle commands only. A store may refuse it ([`ErrorKind::Refused`]).
//! - **Clear error kinds**, so callers can branch: absent ([`ErrorKind::NotFound`], only
//!   when the object is *definitely* not there), unavailable ([`ErrorKind::Io`],
//!   [`ErrorKind::StorageFull`]: retrying may help), damaged ([`ErrorKind::Corruption`]: a
//!   link, a non-regular file, a short object), refused ([`ErrorKind::Refused`]).
//! - Keys are `/`-separated relative paths checked by [`check_key`]; no component starts
//!   with `.` (those names are the store's own: temp files, lock files).
//!
//! Implementations: [`local::LocalRepo`] (a directory, built on [`crate::durable`]) and
//! [`mem::MemRepo`] (memory, for unit tests; it can also refuse deletes, as a WORM bucket).

pub mod local;
pub mod location;
pub mod mapped;
pub mod mem;
pub mod s3;

use std::io::Write;
use std::ops::Deref;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

pub use local::LocalRepo;
pub use location::{CatalogLocation, S3Settings};
pub use mem::MemRepo;
pub use s3::{S3Config, S3Repo};

/// One object in a listing or a [`Repo::head`] answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's name within the listed prefix (its last key component).
    pub name: String,
    pub size: u64,
}

/// The immediate children of a prefix, as an S3 listing with delimiter `/` gives them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Objects directly under the prefix, sorted by name.
    pub objects: Vec<ObjectInfo>,
    /// Names of the sub-prefixes ("directories") directly under it, sorted.
    pub prefixes: Vec<String>,
    /// Names that are neither (a symlink or a device in a local store): damage the caller
    /// reports, sorted.
    pub damaged: Vec<String>,
}

/// An object's bytes: memory-mapped where the store can, else owned.
pub enum Blob {
    Mapped(mapped::FileBytes),
    Owned(Vec<u8>),
}

impl Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Blob::Mapped(m) => m,
            Blob::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} bytes)", self.len())
    }
}

impl Blob {
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Blob::Mapped(m) => m.to_vec(),
            Blob::Owned(v) => v,
        }
    }
}

/// When a committed object must be durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Durable when `commit` returns.
    Now,
    /// Visible at once, durable only after the next [`Repo::barrier`]: for trees of many
    /// objects (a backup's files) whose completeness a later record declares.
    Deferred,
}

/// An object being written; it becomes visible under its key only on [`ObjectWriter::commit`].
/// Dropping it uncommitted discards it.
pub trait ObjectWriter: Write + Send {
    /// Makes the object visible under its key, create-only ([`ErrorKind::Conflict`] when
    /// the key exists, and the existing object stays).
    fn commit(self: Box<Self>, durability: Durability) -> Result<()>;
    /// Where the bytes go locally, for error messages.
    fn describe(&self) -> String;
}

/// A held lock; released on drop.
pub struct RepoLock {
    _held: Box<dyn Send>,
}

impl RepoLock {
    pub fn new(held: Box<dyn Send>) -> RepoLock {
        RepoLock { _held: held }
    }
}

impl std::fmt::Debug for RepoLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepoLock")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// The storage interface of a catalog (see the module docs for the rules).
pub trait Repo: Send + Sync + std::fmt::Debug {
    /// Where the repository is, for messages: a directory path or an URL.
    fn location(&self) -> String;
    /// Writes a small object, create-only, durable when it returns `Ok`.
    fn put_new(&self, key: &str, data: &[u8]) -> Result<()> {
        let mut w = self.create(key)?;
        let what = w.describe();
        w.write_all(data)
            .map_err(|e| Error::io("write", Path::new(&what), e))?;
        w.commit(Durability::Now)
    }
    /// Whether [`Repo::put_new`] and [`ObjectWriter::commit`] are atomic create-only even
    /// against a concurrent writer of the same key (S3 with conditional create honoured),
    /// so that a caller needs no lock of its own to never overwrite. `false` unless the
    /// store says so (then callers lock).
    fn atomic_create(&self) -> bool {
        false
    }
    /// Starts writing an object of any size (see [`ObjectWriter`]).
    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>>;
    /// The whole object. [`ErrorKind::NotFound`] only when it is definitely absent.
    fn get(&self, key: &str) -> Result<Blob>;
    /// `len` bytes from `offset`; a range past the end is [`ErrorKind::Corruption`] (the
    /// caller asked for what its metadata promised).
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// `Ok(None)` only when the object is definitely absent.
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;
    /// The immediate children of `prefix` (a key prefix naming a "directory"; `""` is the
    /// root). A prefix with nothing under it lists empty.
    fn list(&self, prefix: &str) -> Result<Listing>;
    /// Removes an object (lifecycle commands only). Absent is success.
    fn delete(&self, key: &str) -> Result<()>;
    /// Removes objects (lifecycle commands only); absent is success. Durable as a whole
    /// when it returns; after a crash meanwhile any subset may be gone (a store may batch:
    /// the local one syncs each directory once, not once per object).
    fn delete_batch(&self, keys: &[String]) -> Result<()> {
        keys.iter().try_for_each(|k| self.delete(k))
    }
    /// Takes the lock named `key` (not an object: it never lists). With `wait` false, `None`
    /// when another holder has it.
    fn lock(&self, key: &str, mode: LockMode, wait: bool) -> Result<Option<RepoLock>>;
    /// Makes every object committed with [`Durability::Deferred`] so far durable.
    fn barrier(&self) -> Result<()>;
    /// Makes the objects `keys`, committed with [`Durability::Deferred`], durable (their
    /// bytes and their names): a group of small records that must all be durable before
    /// the next step costs one wait instead of one per object. The default is a
    /// [`Repo::barrier`].
    fn sync_objects(&self, keys: &[String]) -> Result<()> {
        let _ = keys;
        self.barrier()
    }
    /// The object as an open local file, for a store whose objects are files: positional
    /// reads with readahead hints, as restore's throughput needs. `None` for other stores
    /// (callers use [`Repo::get_range`]). Opened with the same checks as [`Repo::get`].
    fn open_file(&self, key: &str) -> Result<Option<std::fs::File>> {
        check_key(key, false)?;
        Ok(None)
    }
    /// The local directory, for a store that is one: lets restore refuse targets that
    /// overlap the catalog. `None` for remote stores.
    fn local_root(&self) -> Option<&Path> {
        None
    }
    /// Removes what killed writers left under `prefix` (a local store's temp files whose
    /// writer process no longer runs, [`crate::durable::remove_stale_temps`]'s rule; never
    /// a running writer's); returns how many. A local store does this by itself on its
    /// first write into a directory per process; this is for a caller that learns a
    /// previous run died (a repeated push) and may write nothing itself. Stores that leave
    /// nothing behind do nothing.
    fn tidy_temps(&self, prefix: &str) -> Result<usize> {
        check_prefix(prefix)?;
        Ok(0)
    }
    /// Makes `to` a new object with exactly `from`'s bytes, create-only
    /// ([`ErrorKind::Conflict`] when `to` exists; `from` absent is [`ErrorKind::NotFound`]).
    /// Durable as a [`Durability::Deferred`] commit: at the next [`Repo::barrier`].
    ///
    /// For `merge`, whose new FULL backup holds many files unchanged from the backups it
    /// replaces. Sound only because no object is ever rewritten in place: a store may make
    /// `to` share `from`'s storage (a local store hard-links it), and removing either
    /// later removes a name, never the other's bytes. The default streams a copy
    /// ([`copy_object`]).
    fn link_copy(&self, from: &str, to: &str) -> Result<Copied> {
        copy_object(self, from, to)
    }
}

/// What [`Repo::link_copy`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copied {
    /// The object's bytes.
    pub size: u64,
    /// `true` when `to` shares `from`'s storage (nothing read or written); `false` when
    /// the bytes were copied.
    pub linked: bool,
    /// CRC-32C of the bytes, when they were read (a copy); `None` for a link.
    pub crc32c: Option<u32>,
}

/// Reads object `key` front to back, handing each piece to `each`; returns its bytes. A
/// local store's file is read through `buf` (its pages let go behind the read when it is
/// large: it is read once); another store's by ranges of 8 MiB.
pub fn read_pieces<R: Repo + ?Sized>(
    repo: &R,
    key: &str,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    /// Bytes per ranged read; and the size from which a read file's pages are dropped.
    const PIECE: u64 = 8 << 20;
    let what = format!("{}/{key}", repo.location());
    let mut n = 0u64;
    match repo.open_file(key)? {
        Some(mut f) => {
            use std::io::Read;
            loop {
                let k = match f.read(buf) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::io("read", Path::new(&what), e)),
                };
                n += k as u64;
                each(buf.get(..k).unwrap_or_default())?;
            }
            if n >= PIECE {
                use std::os::fd::AsRawFd;
                let _ = nix::fcntl::posix_fadvise(
                    f.as_raw_fd(),
                    0,
                    0,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                );
            }
        }
        None => {
            let len = repo
                .head(key)?
                .ok_or_else(|| Error::not_found(format!("{what}: not found")))?
                .size;
            while n < len {
                let b = repo.get_range(key, n, (len - n).min(PIECE))?;
                n += b.len() as u64;
                each(&b)?;
            }
        }
    }
    Ok(n)
}

/// [`Repo::link_copy`] as a streamed copy: `from` read in pieces ([`read_pieces`]) into a
/// new object `to`, committed deferred.
pub fn copy_object<R: Repo + ?Sized>(repo: &R, from: &str, to: &str) -> Result<Copied> {
    check_key(from, false)?;
    check_key(to, false)?;
    let mut out = repo.create(to)?;
    let dest = out.describe();
    let mut crc = 0u32;
    let mut buf = vec![0u8; 8 << 20];
    let n = read_pieces(repo, from, &mut buf, |b| {
        crc = crc32c::crc32c_append(crc, b);
        out.write_all(b)
            .map_err(|e| Error::io("write", Path::new(&dest), e))
    })?;
    out.commit(Durability::Deferred)?;
    Ok(Copied {
        size: n,
        linked: false,
        crc32c: Some(crc),
    })
}

/// Checks a key: a normalised relative `/` path ([`crate::safepath::check_rel_path`]) whose
/// components are plain names not starting with `.`. For a lock key the last component may
/// start with `.`.
pub fn check_key(key: &str, lock: bool) -> Result<()> {
    crate::safepath::check_rel_path(key, "catalog key")?;
    let n = key.split('/').count();
    for (i, c) in key.split('/').enumerate() {
        if c.starts_with('.') && !(lock && i + 1 == n) {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("catalog key {key:?}: component {c:?} starts with '.'"),
            ));
        }
    }
    Ok(())
}

/// Checks a listing prefix: `""` or a valid key.
pub fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        Ok(())
    } else {
        check_key(prefix, false)
    }
}

/// `a/b` joined: the key of `name` under `prefix`.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

/// Puts `data` at `key` unless it is there already with the same bytes: `Ok(true)` when
/// written, `Ok(false)` when identical bytes were there; different bytes are
/// [`ErrorKind::Conflict`]. The create-only way to make a write idempotent.
pub fn put_or_same(repo: &dyn Repo, key: &str, data: &[u8]) -> Result<bool> {
    match repo.put_new(key, data) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::Conflict => {
            let have = repo.get(key)?;
            if *have == *data {
                Ok(false)
            } else {
                Err(Error::conflict(format!(
                    "{}: {key} exists with different content",
                    repo.location()
                )))
            }
        }
        Err(e) => Err(e),
    }
}

#[cfg(any(test, feature = "test-synth"))]
pub mod conformance {
    //! The same behaviour asked of every implementation: the unit tests run it on the local
    //! and memory stores, tests/it on S3 servers.
    use super::*;

    pub fn run(r: &dyn Repo) {
        // create-only
        r.put_new("a/b/c", b"one").unwrap();
        let e = r.put_new("a/b/c", b"two").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        assert_eq!(&*r.get("a/b/c").unwrap(), b"one");
        assert!(put_or_same(r, "a/b/c", b"one").is_ok());
        assert_eq!(
            put_or_same(r, "a/b/c", b"x").unwrap_err().kind(),
            ErrorKind::Conflict
        );
        // absent is NotFound / None
        assert_eq!(r.get("a/b/zz").unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(r.get("q/r").unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(r.head("a/b/zz").unwrap(), None);
        assert_eq!(
            r.head("a/b/c").unwrap(),
            Some(ObjectInfo {
                name: "c".into(),
                size: 3
            })
        );
        // ranges
        r.put_new("a/big", &(0..=255u8).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(r.get_range("a/big", 10, 3).unwrap(), vec![10, 11, 12]);
        assert_eq!(
            r.get_range("a/big", 250, 10).unwrap_err().kind(),
            ErrorKind::Corruption
        );
        // streamed, uncommitted writers leave nothing
        let mut w = r.create("a/s").unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        assert_eq!(r.head("a/s").unwrap(), None);
        let mut w = r.create("a/s").unwrap();
        w.write_all(b"whole").unwrap();
        w.commit(Durability::Deferred).unwrap();
        r.barrier().unwrap();
        assert_eq!(&*r.get("a/s").unwrap(), b"whole");
        // listing: immediate children only, sorted
        let l = r.list("a").unwrap();
        let names: Vec<_> = l.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["big", "s"]);
        assert_eq!(l.prefixes, ["b"]);
        assert_eq!(r.list("").unwrap().prefixes, ["a"]);
        assert_eq!(r.list("nothing/here").unwrap(), Listing::default());
        // bad keys
        for k in ["", "/a", "a/../b", "a//b", "a/.hidden", "a/"] {
            assert!(r.put_new(k, b"x").is_err(), "{k:?} accepted");
            assert!(r.get(k).is_err(), "{k:?} accepted");
        }
        // link_copy: the same bytes under a new key, create-only; the source's later
        // removal leaves the copy whole
        r.put_new("l/src", b"linked bytes").unwrap();
        let c = r.link_copy("l/src", "l/deeper/dst").unwrap();
        assert_eq!(c.size, 12);
        assert_eq!(&*r.get("l/deeper/dst").unwrap(), b"linked bytes");
        r.put_new("l/other", b"x").unwrap();
        let e = r.link_copy("l/other", "l/deeper/dst").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        assert_eq!(&*r.get("l/deeper/dst").unwrap(), b"linked bytes");
        let e = r.link_copy("l/absent", "l/dst2").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert_eq!(r.head("l/dst2").unwrap(), None);
        assert!(r.link_copy("l/src", "l/.hidden").is_err());
        r.barrier().unwrap();
        r.delete("l/src").unwrap();
        assert_eq!(&*r.get("l/deeper/dst").unwrap(), b"linked bytes");
        // locks
        let l1 = r.lock("a/.lock", LockMode::Exclusive, false).unwrap();
        assert!(l1.is_some());
        drop(l1);
        assert!(r
            .lock("a/.lock", LockMode::Shared, false)
            .unwrap()
            .is_some());
    }
}
