//! `walnut receive`: its options (clap), converted into the library's
//! [`crate::receive::ReceiveOptions`].

use std::path::PathBuf;

use clap::Args;

use super::{ConnArgs, InstanceArgs};
use crate::receive::{ReceiveOptions, DEFAULT_APPLICATION_NAME, DEFAULT_SLOT};

/// Options of `walnut receive`.
#[derive(Args, Debug, Clone)]
pub struct ReceiveArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Permanent physical replication slot (created with RESERVE_WAL when absent).
    #[arg(long, default_value = DEFAULT_SLOT)]
    pub slot: String,
    /// application_name of the replication connection (what synchronous_standby_names
    /// names).
    #[arg(long = "application-name", default_value = DEFAULT_APPLICATION_NAME)]
    pub application_name: String,
    /// Local directory for the segment being filled and the status file (default
    /// `<catalog>/instances/NAME/wal/.receive`, local catalogs only). Another directory is
    /// recorded in the archive's `.receive-spool` (local catalogs), where walnut-fetch and
    /// show --archive find it.
    #[arg(long = "spool-dir")]
    pub spool_dir: Option<PathBuf>,
    /// Report flush as soon as the WAL is fsynced, to serve as a synchronous standby.
    #[arg(long)]
    pub synchronous: bool,
}

impl ReceiveArgs {
    pub fn options(&self) -> crate::Result<ReceiveOptions> {
        Ok(ReceiveOptions {
            catalog: self.instance.catalog.location()?,
            instance: self.instance.instance.clone(),
            conn: self.conn.params(),
            slot: self.slot.clone(),
            application_name: self.application_name.clone(),
            spool_dir: self.spool_dir.clone(),
            synchronous: self.synchronous,
        })
    }
}

/// Runs the receiver until SIGTERM or SIGINT.
pub fn run(args: ReceiveArgs) -> crate::Result<i32> {
    let opts = args.options()?;
    crate::receive::install_signal_handlers()?;
    crate::receive::run(&opts)?;
    Ok(0)
}
