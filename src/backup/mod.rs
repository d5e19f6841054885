//! Backups (FULL / PAGE / DELTA), restore, show and validate.
//!
//! The data's path: data directory → [`take`] (checks, started marker, parent from
//! [`plan`]) → [`copy`] (walk, page verification via [`page`], per-file decision from the
//! [`copy::CopyPlan`], incremental files for changed pages) → the catalog's store (manifest,
//! [`meta`]); the store → [`stored`] readers → [`crate::restore`] → data directory.
//! Options come in plain structs (the cli parses them); progress goes to an injected
//! [`crate::progress::Progress`]; nothing here prints.
//!
//! Choices worth knowing:
//! - A PAGE backup whose WAL range has a segment that is not archived, or whose block index
//!   is missing or incomplete, **fails** with a message naming the segment and suggesting
//!   DELTA or FULL; it never silently falls back.
//! - `_vm`, `_fsm` and `_init` forks, non-relation files, files new since the parent and
//!   files of databases created or dropped in the range are always copied whole.

pub mod copy;
pub mod meta;
pub mod page;
pub mod plan;
pub mod relfile;
pub mod show;
pub mod stored;
pub mod stream;
pub mod summary;
pub mod take;
pub mod validate;

pub use meta::{BackupMeta, Mode, Status};
