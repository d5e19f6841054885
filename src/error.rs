//! The crate's one error type.
//!
//! Every error says what it is about (a file, an LSN, a path) in its message, and carries a
//! [`ErrorKind`] that the binaries map to exit codes. `Corruption` is kept apart from `Io` so
//! that `walnut-fetch` can tell "damaged" from "unavailable", and `StorageFull` is detected
//! through `ENOSPC`, never by matching message text.

use std::fmt;
use std::io;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// An I/O error other than a full disk.
    Io,
    /// ENOSPC / EDQUOT: the disk is full.
    StorageFull,
    /// Bytes that fail a checksum, a magic or a structural check.
    Corruption,
    /// A file or object that was asked for does not exist.
    NotFound,
    /// Bad input from the user: arguments, paths, configuration.
    Invalid,
    /// Something exists with different content (e.g. a WAL segment archived twice).
    Conflict,
    /// The PostgreSQL server refused, or is in a state we cannot work with.
    Server,
    /// The store or the catalog refuses the operation on purpose (a delete on a WORM
    /// store, a restore into a running cluster): retrying will not help.
    Refused,
}

#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Error {
        Error {
            kind,
            msg: msg.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.msg
    }

    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::Invalid, msg)
    }

    pub fn corruption(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::Corruption, msg)
    }

    pub fn not_found(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, msg)
    }

    pub fn conflict(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conflict, msg)
    }

    pub fn refused(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::Refused, msg)
    }

    pub fn server(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::Server, msg)
    }

    /// An I/O error about `path`, while doing `op` ("open", "fsync", ...).
    pub fn io(op: &str, path: &Path, e: io::Error) -> Error {
        let kind = if is_storage_full(&e) {
            ErrorKind::StorageFull
        } else if e.kind() == io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io
        };
        let what = if kind == ErrorKind::StorageFull {
            " (disk full)"
        } else {
            ""
        };
        Error::new(
            kind,
            format!("could not {op} \"{}\": {e}{what}", path.display()),
        )
    }

    /// Prefixes the message with more context, keeping the kind.
    pub fn context(self, ctx: impl fmt::Display) -> Error {
        Error {
            kind: self.kind,
            msg: format!("{ctx}: {}", self.msg),
        }
    }
}

/// Whether an I/O error means the disk (or quota) is full.
pub fn is_storage_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc_enospc) if libc_enospc == nix::libc::ENOSPC || libc_enospc == nix::libc::EDQUOT)
        || e.kind() == io::ErrorKind::StorageFull
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        let msg = match e.as_db_error() {
            Some(db) => format!("server error: {}: {}", db.severity(), db.message()),
            None => format!("server connection: {e}"),
        };
        Error::new(ErrorKind::Server, msg)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error::corruption(format!("invalid JSON: {e}"))
    }
}

/// Adds path context to `io::Result`s: `fs::read(p).ctx("read", p)?`.
pub trait IoContext<T> {
    fn ctx(self, op: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}
