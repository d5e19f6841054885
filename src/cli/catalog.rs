//! `walnut init` and `walnut add-instance`: their options and their runs.

use std::path::PathBuf;

use clap::Args;

use super::{CatalogArgs, ConnArgs};
use crate::catalog;
use crate::error::Result;

#[derive(Args, Debug, Clone)]
pub struct InitArgs {
    #[command(flatten)]
    pub catalog: CatalogArgs,
}

#[derive(Args, Debug, Clone)]
pub struct AddInstanceArgs {
    #[command(flatten)]
    pub catalog: CatalogArgs,
    #[arg(long)]
    pub instance: String,
    /// Data directory of the instance.
    #[arg(short = 'D', long = "pgdata", env = "PGDATA")]
    pub pgdata: PathBuf,
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub fn run_init(args: InitArgs) -> Result<i32> {
    let cat = args.catalog.init()?;
    log::info!("catalog initialised at \"{}\"", cat.root().display());
    Ok(0)
}

/// Reads `PGDATA/global/pg_control` and records what the archive and backups need to know
/// about the instance. Connection options not given fall back to PGHOST, PGPORT, PGUSER and
/// PGDATABASE, as in libpq.
pub fn run_add_instance(args: AddInstanceArgs) -> Result<i32> {
    let cat = args.catalog.open()?;
    catalog::check_instance_name(&args.instance)?;
    let cfg = catalog::add_instance(&cat, &args.instance, &args.pgdata, &args.conn.params())?;
    log::info!(
        "instance \"{}\" added: system id {}, PostgreSQL {}, {} MiB WAL segments, data checksums {}",
        cfg.name,
        cfg.system_id,
        cfg.pg_major,
        cfg.wal_segment_size >> 20,
        if cfg.data_checksums { "on" } else { "off" }
    );
    Ok(0)
}
