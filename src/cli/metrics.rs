//! `walnut metrics`: its options and where the text goes (the metrics themselves are
//! [`crate::metrics`]).
//!
//! With `--output FILE`, the text is written to a temporary file in FILE's directory and
//! renamed over FILE, so the collector never reads half a file (the temporary name starts
//! with a dot and does not end in `.prom`, so the collector ignores it).

use std::path::PathBuf;

use clap::Args;

use crate::cli::{CatalogArgs, ConnArgs};
use crate::durable::{self, Replace};
use crate::error::Result;
use crate::metrics::MetricsOptions;

#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    #[command(flatten)]
    pub catalog: CatalogArgs,
    /// Only this instance (all of the catalog's when omitted).
    #[arg(long)]
    pub instance: Option<String>,
    /// Write to this file (atomically) instead of standard output; node_exporter reads
    /// `*.prom` files from its --collector.textfile.directory.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Do not connect to the servers (no walnut_archive_lag_bytes).
    #[arg(long)]
    pub no_connect: bool,
    /// Connection options for walnut_archive_lag_bytes (default: each instance's stored ones).
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub fn run(a: MetricsArgs) -> Result<i32> {
    let catalog = a.catalog.open()?;
    let opts = MetricsOptions {
        instance: a.instance.clone(),
        conn: (!a.no_connect).then(|| a.conn.params()),
    };
    let text = crate::metrics::run(&catalog, &opts)?;
    match &a.output {
        Some(p) => durable::write_file(p, text.as_bytes(), Replace::Yes)?,
        None => print!("{text}"),
    }
    Ok(0)
}
