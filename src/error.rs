//! The crate's one error type.
//!
//! Every error says what it is about (a file, an LSN, a path) in its message, and carries a
//! [`ErrorKind`] that callers branch on and the binaries map to exit codes. `Corruption` is
//! kept apart from `Io` so that `walnut-fetch` can tell "damaged" from "unavailable", and
//! `StorageFull` is detected through `ENOSPC`, never by matching message text.
//!
//! # Kinds, as callers see them
//!
//! - absent: [`NotFound`](ErrorKind::NotFound), definitely not there
//!   ([`Error::is_absent`]);
//! - unavailable: [`Io`](ErrorKind::Io) and [`StorageFull`](ErrorKind::StorageFull), could
//!   not be read or written now, may work on a retry ([`Error::is_unavailable`],
//!   [`Error::is_retryable`]);
//! - damaged: [`Corruption`](ErrorKind::Corruption), present but failing a checksum, magic
//!   or structural check; never served, and never reported as absent ([`Error::is_damaged`]);
//! - invalid input: [`Invalid`](ErrorKind::Invalid), the user's arguments, paths or
//!   configuration ([`Error::is_invalid`]);
//! - refused: [`Refused`](ErrorKind::Refused), the store or the catalog refuses on purpose
//!   (a delete on a WORM store, a restore into a running cluster); a retry will not help
//!   ([`Error::is_refused`]);
//! - conflict: [`Conflict`](ErrorKind::Conflict), something exists with different content
//!   ([`Error::is_conflict`]);
//! - server: [`Server`](ErrorKind::Server), PostgreSQL refused or is in a state we cannot
//!   work with.
//!
//! An error keeps what caused it (an [`io::Error`], a `postgres::Error`, a JSON error) as
//! its [`std::error::Error::source`]. The message already includes the cause's text, so
//! printing the message alone loses nothing.

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

/// A cause kept by an [`Error`].
type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    source: Option<Source>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Error {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    /// Keeps `source` as this error's cause ([`std::error::Error::source`]); the message
    /// is not changed.
    pub fn with_source(mut self, source: impl Into<Source>) -> Error {
        self.source = Some(source.into());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Absent: the thing asked for definitely does not exist ([`ErrorKind::NotFound`]).
    pub fn is_absent(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    /// Unavailable: an I/O failure or a full disk ([`ErrorKind::Io`],
    /// [`ErrorKind::StorageFull`]).
    pub fn is_unavailable(&self) -> bool {
        matches!(self.kind, ErrorKind::Io | ErrorKind::StorageFull)
    }

    /// Whether the same operation may succeed later without anyone changing its input:
    /// the unavailable kinds. Damaged, absent, invalid, refused and conflicting results
    /// stay what they are.
    pub fn is_retryable(&self) -> bool {
        self.is_unavailable()
    }

    /// Damaged: present but failing a check ([`ErrorKind::Corruption`]).
    pub fn is_damaged(&self) -> bool {
        self.kind == ErrorKind::Corruption
    }

    /// Invalid input from the user ([`ErrorKind::Invalid`]).
    pub fn is_invalid(&self) -> bool {
        self.kind == ErrorKind::Invalid
    }

    /// Refused on purpose by the store or the catalog ([`ErrorKind::Refused`]).
    pub fn is_refused(&self) -> bool {
        self.kind == ErrorKind::Refused
    }

    /// Something exists with different content ([`ErrorKind::Conflict`]).
    pub fn is_conflict(&self) -> bool {
        self.kind == ErrorKind::Conflict
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
        .with_source(e)
    }

    /// Prefixes the message with more context, keeping the kind and the source.
    pub fn context(self, ctx: impl fmt::Display) -> Error {
        Error {
            msg: format!("{ctx}: {}", self.msg),
            ..self
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

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        let msg = match e.as_db_error() {
            Some(db) => format!("server error: {}: {}", db.severity(), db.message()),
            None => format!("server connection: {e}"),
        };
        Error::new(ErrorKind::Server, msg).with_source(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error::corruption(format!("invalid JSON: {e}")).with_source(e)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn io_errors_keep_their_source_and_message() {
        let e = Error::io(
            "open",
            Path::new("/x/y"),
            io::Error::from_raw_os_error(nix::libc::EACCES),
        );
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.is_unavailable() && e.is_retryable() && !e.is_absent());
        assert!(e.message().starts_with("could not open \"/x/y\": "));
        let src = e.source().expect("the io::Error is kept");
        let io = src.downcast_ref::<io::Error>().expect("an io::Error");
        assert_eq!(io.raw_os_error(), Some(nix::libc::EACCES));
        // Context changes the message, not the kind or the source.
        let e = e.context("segment 000000010000000000000001");
        assert!(e
            .message()
            .starts_with("segment 000000010000000000000001: could not open"));
        assert!(e.source().is_some() && e.is_retryable());
    }

    #[test]
    fn kinds_classify() {
        let nf = Error::io("stat", Path::new("/a"), io::ErrorKind::NotFound.into());
        assert!(nf.is_absent() && !nf.is_retryable() && nf.source().is_some());
        let full = Error::io(
            "write",
            Path::new("/a"),
            io::Error::from_raw_os_error(nix::libc::ENOSPC),
        );
        assert_eq!(full.kind(), ErrorKind::StorageFull);
        assert!(full.is_unavailable() && full.is_retryable());
        assert!(full.message().ends_with("(disk full)"));
        let bad = Error::corruption("x");
        assert!(bad.is_damaged() && !bad.is_retryable() && !bad.is_absent());
        assert!(Error::invalid("x").is_invalid());
        assert!(Error::refused("x").is_refused() && !Error::refused("x").is_retryable());
        assert!(Error::conflict("x").is_conflict());
        assert!(Error::server("x").source().is_none());
    }

    #[test]
    fn json_errors_keep_their_source() {
        let j = serde_json::from_str::<u32>("nope").unwrap_err();
        let e = Error::from(j);
        assert!(e.is_damaged());
        assert!(e.message().starts_with("invalid JSON: "));
        assert!(e
            .source()
            .and_then(|s| s.downcast_ref::<serde_json::Error>())
            .is_some());
    }
}
