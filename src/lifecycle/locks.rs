//! The lifecycle locks: who may remove a backup or WAL while others use them.
//!
//! All are [`Repo::lock`] locks (flock locally, so a dead holder's lock is simply gone; on
//! object storage a lease with an expiry, see [`crate::repo::S3Repo`]):
//!
//! | lock                               | shared by                     | exclusive by               |
//! |------------------------------------|-------------------------------|----------------------------|
//! | `<instance>/.lifecycle.lock`       | validate, set-backup (wait)   | delete, merge (no wait)    |
//! | `<instance>/.wal.lock`             | backup, for its run (wait)    | delete --delete-wal (no wait: the purge is skipped) |
//! | `<backup>/.use`                    | restore (no wait), backup on its parent chain (wait) | delete, merge, of every backup they remove (no wait: refused) |
//! | `<backup>/.running`                | —                             | the backup's taker; delete, merge (no wait: refused) |
//!
//! A user of a backup takes its `.use` lock shared and then checks that the backup still
//! has the status it planned with ([`use_chain`]); a remover takes it exclusively and only
//! then marks the backup "being deleted". So either the user sees the mark and stops, or
//! the remover finds the lock held and refuses: a backup in use is never removed.

use crate::backup::meta::{self, BackupMeta};
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::repo::{LockMode, RepoLock};

/// Test hook: a restore or backup sleeps this many seconds after locking its chain, so
/// tests can run a delete against it.
pub const PAUSE_ENV: &str = "WALNUT_TEST_PAUSE_AFTER_LOCK";

fn instance_lock(instance: &str, name: &str) -> String {
    format!("{}/{name}", Catalog::instance_key(instance))
}

/// Held locks, released on drop.
#[derive(Debug, Default)]
pub struct Held(#[allow(dead_code)] Vec<RepoLock>);

/// The instance's lifecycle lock, exclusively and without waiting (delete, merge): two of
/// them never interleave, and none runs during a validate or set-backup. `what` names the
/// command for the error.
pub fn lifecycle_exclusive(catalog: &Catalog, instance: &str, what: &str) -> Result<RepoLock> {
    let key = instance_lock(instance, ".lifecycle.lock");
    catalog
        .repo()
        .lock(&key, LockMode::Exclusive, false)?
        .ok_or_else(|| {
            Error::conflict(format!(
                "{what}: another delete or merge, a validate or a set-backup of instance \"{instance}\" is running (lock {}/{key}); nothing done",
                catalog.repo().location()
            ))
        })
}

/// The instance's lifecycle lock, shared, waiting for a running delete or merge (validate,
/// set-backup).
pub fn lifecycle_shared(catalog: &Catalog, instance: &str) -> Result<RepoLock> {
    let key = instance_lock(instance, ".lifecycle.lock");
    catalog
        .repo()
        .lock(&key, LockMode::Shared, true)?
        .ok_or_else(|| Error::conflict(format!("lock {key} not granted")))
}

/// The instance's WAL lock, shared, for a backup's whole run: the WAL it needs (from its
/// parent's start, then its own) is not purged meanwhile. Waits for a purge in progress.
pub fn wal_shared(catalog: &Catalog, instance: &str) -> Result<RepoLock> {
    let key = instance_lock(instance, ".wal.lock");
    catalog
        .repo()
        .lock(&key, LockMode::Shared, true)?
        .ok_or_else(|| Error::conflict(format!("lock {key} not granted")))
}

/// The instance's WAL lock, exclusively without waiting (the purge); `None` while a backup
/// runs.
pub fn wal_exclusive(catalog: &Catalog, instance: &str) -> Result<Option<RepoLock>> {
    let key = instance_lock(instance, ".wal.lock");
    catalog.repo().lock(&key, LockMode::Exclusive, false)
}

/// Locks every backup of `chain` (newest first, as [`meta::chain`] gives it) shared for
/// use, then checks that each still has the status it was planned with (a delete marks a
/// backup only after locking it exclusively). With `wait` a running delete of one of them
/// is waited for (and the check then fails if it went); without, it is an error at once.
pub fn use_chain(
    catalog: &Catalog,
    instance: &str,
    chain: &[&BackupMeta],
    wait: bool,
    what: &str,
) -> Result<Held> {
    let repo = catalog.repo();
    let mut held = Vec::new();
    for b in chain {
        let key = format!("{}/.use", b.key()?);
        match repo.lock(&key, LockMode::Shared, wait)? {
            Some(l) => held.push(l),
            None => {
                return Err(Error::conflict(format!(
                    "{what}: backup {} is being deleted or merged (lock {}/{key} is held)",
                    b.id,
                    repo.location()
                )))
            }
        }
    }
    for b in chain {
        let now = match meta::load_in(catalog, instance, &b.id) {
            Ok(m) => m.effective_status(),
            Err(e) if e.kind() == crate::error::ErrorKind::NotFound => {
                return Err(Error::conflict(format!(
                    "{what}: backup {} was deleted meanwhile",
                    b.id
                )))
            }
            Err(e) => return Err(e),
        };
        if now != b.effective_status() {
            return Err(Error::conflict(format!(
                "{what}: backup {} changed from {} to {now} meanwhile (deleted or merged?)",
                b.id,
                b.effective_status()
            )));
        }
    }
    if let Some(s) = std::env::var(PAUSE_ENV)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        log::info!("{PAUSE_ENV}: pausing {s} s with the chain locked");
        std::thread::sleep(std::time::Duration::from_secs(s));
    }
    Ok(Held(held))
}

/// Locks `b` for removal (delete, merge): its `.running` and `.use` locks exclusively,
/// without waiting. Refused while its taker runs, or while a restore, a backup (on it as a
/// parent) or another remover uses it.
pub fn remove(catalog: &Catalog, b: &BackupMeta, what: &str) -> Result<Held> {
    let repo = catalog.repo();
    let key = b.key()?;
    let mut held = Vec::new();
    for (name, why) in [
        (".running", "is being taken (its taker runs)"),
        (
            ".use",
            "is in use (being restored, or the parent of a running backup)",
        ),
    ] {
        let k = format!("{key}/{name}");
        match repo.lock(&k, LockMode::Exclusive, false)? {
            Some(l) => held.push(l),
            None => {
                return Err(Error::refused(format!(
                    "{what}: backup {} {why} (lock {}/{k} is held); nothing deleted",
                    b.id,
                    repo.location()
                )))
            }
        }
    }
    Ok(Held(held))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::meta::{test_meta, Mode};
    use crate::repo::MemRepo;
    use std::path::Path;
    use std::sync::Arc;

    fn setup() -> (Catalog, BackupMeta) {
        let catalog = Catalog::with_repo(Path::new("/mem"), Arc::new(MemRepo::new()));
        let m = test_meta("A", Mode::Full, None);
        meta::save_complete(&catalog, &m).unwrap();
        (catalog, m)
    }

    #[test]
    fn a_used_backup_cannot_be_removed_and_a_removed_one_cannot_be_used() {
        let (catalog, m) = setup();
        let used = use_chain(&catalog, "db", &[&m], false, "restore").unwrap();
        let e = remove(&catalog, &m, "delete").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Refused, "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
        drop(used);
        let rm = remove(&catalog, &m, "delete").unwrap();
        let e = use_chain(&catalog, "db", &[&m], false, "restore").unwrap_err();
        assert!(e.to_string().contains("being deleted"), "{e}");
        // the remover marks it; a user that locks afterwards sees the change
        meta::record_status(&catalog, "db", "A", meta::Status::Error, None, "delete").unwrap();
        drop(rm);
        let e = use_chain(&catalog, "db", &[&m], false, "restore").unwrap_err();
        assert!(e.to_string().contains("meanwhile"), "{e}");
    }

    #[test]
    fn lifecycle_commands_exclude_each_other() {
        let (catalog, _) = setup();
        let d = lifecycle_exclusive(&catalog, "db", "delete").unwrap();
        assert!(lifecycle_exclusive(&catalog, "db", "merge").is_err());
        drop(d);
        let v = lifecycle_shared(&catalog, "db").unwrap();
        assert!(lifecycle_exclusive(&catalog, "db", "delete").is_err());
        drop(v);
        let w = wal_shared(&catalog, "db").unwrap();
        assert!(wal_exclusive(&catalog, "db").unwrap().is_none());
        drop(w);
        assert!(wal_exclusive(&catalog, "db").unwrap().is_some());
    }
}
