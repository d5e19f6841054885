//! The WAL archive: `walnut-archive` (archive_command), `walnut-fetch` (restore_command) and
//! `show --archive`.
use crate::cli::ShowArgs;
use crate::error::{Error, Result};

pub fn run_show_archive(_args: ShowArgs) -> Result<i32> {
    Err(Error::invalid("show --archive is not implemented yet"))
}
