//! Test hook for crash tests: with `WALNUT_TEST_KILL_AT=N` the process sends itself
//! SIGKILL at the Nth crash point, as a power cut or `kill -9` would stop it. Unset:
//! nothing happens.
//!
//! The crash points of `delete` and `merge` are their catalog writes and deletes: both run
//! on [`catalog`], whose store counts every commit, `put_new`, `link_copy` and `delete` (one counter per
//! process, so `delete --merge-expired` counts its merges' writes and its own removals in
//! one sequence). While a kill is armed, batch deletes go one object at a time (each a
//! crash point), so a test can stop a command between any two removals.
//!
//! `walnut-archive` runs on [`catalog`] too. Its writes happen on two threads at once (the
//! segment's own index, the previous segment's pending index), so their order is not fixed:
//! `WALNUT_TEST_KILL_BEFORE=TEXT` kills at the first crash point whose name (`put KEY`,
//! `commit KEY`, `delete KEY`) contains TEXT instead. On a local store a `put` is killed
//! with its temp file written, as a kill in the middle of the write leaves it.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::catalog::Catalog;
use crate::error::Result;
use crate::repo::{Blob, Durability, Listing, LockMode, ObjectInfo, ObjectWriter, Repo, RepoLock};

pub const KILL_ENV: &str = "WALNUT_TEST_KILL_AT";
/// Kill at the first crash point whose name contains this variable's value.
pub const KILL_BEFORE_ENV: &str = "WALNUT_TEST_KILL_BEFORE";

static COUNT: AtomicU64 = AtomicU64::new(0);
static AT: OnceLock<Option<u64>> = OnceLock::new();
static BEFORE: OnceLock<Option<String>> = OnceLock::new();

fn before() -> Option<&'static str> {
    BEFORE
        .get_or_init(|| {
            std::env::var(KILL_BEFORE_ENV)
                .ok()
                .filter(|s| !s.is_empty())
        })
        .as_deref()
}

fn at() -> Option<u64> {
    *AT.get_or_init(|| {
        std::env::var(KILL_ENV)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|&n| n > 0)
    })
}

/// Whether a kill is armed.
pub fn armed() -> bool {
    at().is_some() || before().is_some()
}

fn kill(why: &str, what: &str) -> ! {
    log::warn!("{why}: SIGKILL before {what}");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    std::process::abort();
}

/// Counts one crash point; `what` names it in the log line written before the kill.
pub fn hit(what: &str) {
    if let Some(b) = before() {
        if what.contains(b) {
            kill(&format!("{KILL_BEFORE_ENV}={b}"), what);
        }
    }
    let Some(at) = at() else {
        return;
    };
    let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    if n == at {
        kill(&format!("{KILL_ENV}={at}"), what);
    }
}

/// `catalog` as a lifecycle command uses it: with a kill armed, through a store that makes
/// each write and delete a crash point ([`hit`]); else `catalog` itself.
pub fn catalog(catalog: &Catalog) -> Option<Catalog> {
    if !armed() {
        return None;
    }
    Some(Catalog::with_repo(
        catalog.root(),
        Arc::new(Killable {
            inner: catalog.repo_arc(),
        }),
    ))
}

/// A store that counts writes and deletes as crash points. It keeps the trait's
/// one-by-one `delete_batch`, so a batch is as many crash points as objects.
#[derive(Debug)]
struct Killable {
    inner: Arc<dyn Repo>,
}

struct KillWriter {
    inner: Box<dyn ObjectWriter>,
    key: String,
}

impl Write for KillWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl ObjectWriter for KillWriter {
    fn commit(self: Box<Self>, durability: Durability) -> Result<()> {
        hit(&format!("commit {}", self.key));
        self.inner.commit(durability)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl Repo for Killable {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put_new(&self, key: &str, data: &[u8]) -> Result<()> {
        if self.inner.local_root().is_none() {
            hit(&format!("put {key}"));
            return self.inner.put_new(key, data);
        }
        // a local store's put: the temp file written, then the kill (see the module docs)
        let mut w = self.inner.create(key)?;
        let what = w.describe();
        w.write_all(data)
            .map_err(|e| crate::error::Error::io("write", Path::new(&what), e))?;
        hit(&format!("put {key}"));
        w.commit(Durability::Now)
    }
    fn tidy_temps(&self, prefix: &str) -> Result<usize> {
        self.inner.tidy_temps(prefix)
    }
    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        Ok(Box::new(KillWriter {
            inner: self.inner.create(key)?,
            key: key.to_string(),
        }))
    }
    fn get(&self, key: &str) -> Result<Blob> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.inner.head(key)
    }
    fn list(&self, prefix: &str) -> Result<Listing> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<()> {
        hit(&format!("delete {key}"));
        self.inner.delete(key)
    }
    fn lock(&self, key: &str, mode: LockMode, wait: bool) -> Result<Option<RepoLock>> {
        self.inner.lock(key, mode, wait)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn sync_objects(&self, keys: &[String]) -> Result<()> {
        self.inner.sync_objects(keys)
    }
    fn open_file(&self, key: &str) -> Result<Option<std::fs::File>> {
        self.inner.open_file(key)
    }
    fn local_root(&self) -> Option<&Path> {
        self.inner.local_root()
    }
    fn link_copy(&self, from: &str, to: &str) -> Result<crate::repo::Copied> {
        hit(&format!("link {to}"));
        self.inner.link_copy(from, to)
    }
}
