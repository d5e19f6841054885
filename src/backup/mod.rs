//! Backups (FULL / PAGE / DELTA), restore, show and validate.
use clap::Args;

use crate::cli::{InstanceArgs, ShowArgs};
use crate::error::{Error, Result};

#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
}

pub fn run_backup(_a: BackupArgs) -> Result<i32> {
    Err(Error::invalid("backup is not implemented yet"))
}
pub fn run_restore(_a: RestoreArgs) -> Result<i32> {
    Err(Error::invalid("restore is not implemented yet"))
}
pub fn run_show(_a: ShowArgs) -> Result<i32> {
    Err(Error::invalid("show is not implemented yet"))
}
pub fn run_validate(_a: ValidateArgs) -> Result<i32> {
    Err(Error::invalid("validate is not implemented yet"))
}
