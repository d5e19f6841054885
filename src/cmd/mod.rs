//! Subcommands that are thin glue over the library modules.
pub mod docs;
pub mod wal_index;
