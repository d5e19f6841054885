//! walnut: a PostgreSQL backup and WAL-archive suite that indexes every WAL segment when it
//! is archived, so that incremental backups copy only the blocks that changed.
//!
//! The data's path through the crate:
//! - WAL bytes → [`wal`] (sans-IO decoder) → [`index`] (per-segment block index) → [`archive`]
//!   (durable, compressed, verified WAL archive: `walnut-archive`, `walnut-fetch`);
//! - data directory → [`backup`] (FULL / PAGE / DELTA) → [`catalog`];
//! - catalog → restore plan → data directory.
//!
//! # Exit codes (a contract)
//! - `walnut-archive`: 0 only when the file is durable in the archive (or was already there
//!   with identical content); 1 on any failure, so PostgreSQL keeps the segment and retries.
//! - `walnut-fetch`: 0 when `%p` was written and verified; 1 only when the file and every
//!   candidate name are definitely absent (`ENOENT` in a readable directory; recovery then
//!   ends normally); [`EXIT_FETCH_FATAL`] when the file is present but corrupt or foreign, or
//!   on any other error, usage error or panic that must stop recovery: PostgreSQL treats
//!   statuses above 125 as fatal, so recovery never proceeds past a damaged segment.
//! - `walnut`: 0 on success, 1 on error, 2 on bad usage.

pub mod archive;
pub mod backup;
pub mod catalog;
pub(crate) mod check;
pub mod cli;
pub(crate) mod durable;
pub mod error;
pub mod format;
pub mod index;
pub(crate) mod lifecycle;
pub mod metrics;
pub mod pgcontrol;
pub(crate) mod progress;
pub(crate) mod receive;
pub mod replication;
pub mod repo;
pub(crate) mod restore;
pub(crate) mod safepath;
pub(crate) mod server;
pub mod types;
pub(crate) mod verify_record;
pub mod verify_restore;
pub mod wal;

pub use error::{Error, ErrorKind, Result};
pub use types::{Lsn, PgVersion, TimeLineId, WalFileName};
// The library's plain option types, for callers that drive it without the CLI.
pub use progress::{NoProgress, Progress};
pub use restore::{restore, Recovery, RecoveryTarget, RestoreOptions};
pub use server::ConnParams;

/// `walnut-fetch` exit status for "present but corrupt" and other errors that must stop
/// recovery (PostgreSQL treats a `restore_command` status above 125 as fatal).
pub const EXIT_FETCH_FATAL: i32 = 200;
