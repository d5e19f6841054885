//! The on-disk formats of the catalog, each with its magic, version and checksum:
//! [`manifest`] (a backup's file list), [`incfile`] (an incremental data file),
//! [`index`] (a WAL segment's block index) and [`segment`] (an archived WAL file's header and
//! LZ4 frames).
pub mod blockcrc;
#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod golden;
pub mod incfile;
pub mod index;
pub mod manifest;
pub mod segment;
pub mod summary;
