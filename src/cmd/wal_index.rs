//! `walnut wal-index [--format json] SEGMENT_FILE...`
use std::path::PathBuf;

use clap::Args;

use crate::cli::OutputFormat;
use crate::error::{Error, Result};

#[derive(Args, Debug, Clone)]
pub struct WalIndexArgs {
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Consecutive WAL segment files, decoded as one stream.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn run(_args: WalIndexArgs) -> Result<i32> {
    Err(Error::invalid("wal-index is not implemented yet"))
}
