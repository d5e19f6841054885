//! Subcommands that are thin glue over the library modules.
pub mod wal_index;
