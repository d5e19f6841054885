//! Backups (FULL / PAGE / DELTA), restore, show and validate.
//!
//! The data's path: data directory → [`take`] (checks, parent, start) → [`copy`] (walk,
//! page verification via [`page`], per-file FULL / PAGE ([`plan`]) / DELTA decision,
//! [`incfile`] for changed pages) → catalog ([`manifest`], [`meta`]); catalog → [`restore`]
//! → data directory with recovery settings.
//!
//! Choices worth knowing:
//! - A PAGE backup whose WAL range has a segment that is not archived, or whose block index
//!   is missing or incomplete, **fails** with a message naming the segment and suggesting
//!   DELTA or FULL; it never silently falls back.
//! - `_vm`, `_fsm` and `_init` forks, non-relation files, files new since the parent and
//!   files of databases created or dropped in the range are always copied whole.

pub mod copy;
pub mod meta;
pub mod page;
pub mod plan;
pub mod relfile;
pub mod show;
pub mod take;
pub mod validate;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::catalog::Catalog;
use crate::cli::{ConnArgs, InstanceArgs, OutputFormat, ShowArgs};
use crate::error::{Error, Result};

pub use meta::{BackupMeta, Mode, Status};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    Lz4,
    None,
}

#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Backup mode.
    #[arg(short = 'b', long = "backup-mode", value_enum)]
    pub mode: Mode,
    /// Parallel copy threads.
    #[arg(short = 'j', long = "jobs", default_value_t = 1)]
    pub jobs: usize,
    /// Compression of stored files.
    #[arg(long, value_enum, default_value_t = Compress::None)]
    pub compress: Compress,
    /// Parent backup for PAGE/DELTA (default: newest OK backup on this timeline's history).
    #[arg(long)]
    pub parent: Option<String>,
    /// Seconds to wait for the WAL the backup needs to be archived.
    #[arg(long, default_value_t = 300)]
    pub archive_timeout: u64,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Target data directory.
    #[arg(short = 'D', long = "pgdata")]
    pub pgdata: PathBuf,
    /// Backup to restore (default: newest valid backup that can reach the target).
    #[arg(short = 'i', long = "backup-id")]
    pub backup_id: Option<String>,
    #[arg(short = 'j', long = "jobs", default_value_t = 1)]
    pub jobs: usize,
    /// Relocate a tablespace: OLD=NEW.
    #[arg(short = 'T', long = "tablespace-mapping")]
    pub mappings: Vec<String>,
    #[arg(long)]
    pub recovery_target_time: Option<String>,
    #[arg(long)]
    pub recovery_target_xid: Option<String>,
    #[arg(long)]
    pub recovery_target_lsn: Option<String>,
    #[arg(long)]
    pub recovery_target_name: Option<String>,
    /// immediate or latest.
    #[arg(long, value_parser = ["immediate", "latest"])]
    pub recovery_target: Option<String>,
    #[arg(long)]
    pub recovery_target_inclusive: Option<bool>,
    /// A timeline id, current or latest.
    #[arg(long)]
    pub recovery_target_timeline: Option<String>,
    #[arg(long, value_parser = ["pause", "promote", "shutdown"])]
    pub recovery_target_action: Option<String>,
    /// Restore into a non-empty directory, removing its contents.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Validate this backup and its chain (default: every backup).
    #[arg(short = 'i', long = "backup-id")]
    pub backup_id: Option<String>,
    /// Also verify every archived WAL segment from the backups to the newest archived one
    /// (or to the recovery target), reporting gaps.
    #[arg(long)]
    pub wal: bool,
    /// With --wal: check WAL up to this LSN.
    #[arg(long, requires = "wal", conflicts_with_all = ["recovery_target_time", "recovery_target_name"])]
    pub recovery_target_lsn: Option<String>,
    /// With --wal: check WAL up to the first commit after this time (from the block indexes).
    #[arg(long, requires = "wal", conflicts_with = "recovery_target_name")]
    pub recovery_target_time: Option<String>,
    /// With --wal: check WAL up to this restore point (from the block indexes).
    #[arg(long, requires = "wal")]
    pub recovery_target_name: Option<String>,
}

pub fn run_backup(a: BackupArgs) -> Result<i32> {
    let catalog = Catalog::open(&a.instance.catalog.catalog)?;
    let opts = take::BackupOptions {
        mode: a.mode,
        jobs: a.jobs.max(1),
        compress: a.compress == Compress::Lz4,
        parent: a.parent,
        archive_timeout: Duration::from_secs(a.archive_timeout),
        conn: a.conn.params(),
    };
    let m = take::take_backup(&catalog, &a.instance.instance, &opts)?;
    println!("{}", m.id);
    Ok(0)
}

pub fn run_restore(a: RestoreArgs) -> Result<i32> {
    let catalog = Catalog::open(&a.instance.catalog.catalog)?;
    let mut mappings = Vec::new();
    for m in &a.mappings {
        let (old, new) = m
            .split_once('=')
            .ok_or_else(|| Error::invalid(format!("tablespace mapping '{m}' is not OLD=NEW")))?;
        let (old, new) = (PathBuf::from(old), PathBuf::from(new));
        for p in [&old, &new] {
            if !p.is_absolute() {
                return Err(Error::invalid(format!(
                    "tablespace mapping '{m}': \"{}\" is not an absolute path",
                    p.display()
                )));
            }
        }
        mappings.push((old, new));
    }
    let opts = crate::restore::RestoreOptions {
        backup_id: a.backup_id,
        target: std::path::absolute(&a.pgdata).map_err(|e| Error::io("resolve", &a.pgdata, e))?,
        jobs: a.jobs.max(1),
        mappings,
        recovery: crate::restore::RecoveryTarget {
            time: a.recovery_target_time,
            xid: a.recovery_target_xid,
            lsn: a.recovery_target_lsn,
            name: a.recovery_target_name,
            target: a.recovery_target,
            inclusive: a.recovery_target_inclusive,
            timeline: a.recovery_target_timeline,
            action: a.recovery_target_action,
        },
        force: a.force,
    };
    let id = crate::restore::restore(&catalog, &a.instance.instance, &opts)?;
    log::info!(
        "backup {id} restored into \"{}\"; start the server to recover",
        opts.target.display()
    );
    Ok(0)
}

pub fn run_show(a: ShowArgs) -> Result<i32> {
    let catalog = Catalog::open(&a.catalog.catalog)?;
    let rows = show::rows(&catalog, a.instance.as_deref(), a.backup_id.as_deref())?;
    match a.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        OutputFormat::Text => print!("{}", show::table(&rows)),
    }
    Ok(0)
}

pub fn run_validate(a: ValidateArgs) -> Result<i32> {
    // Options first: nothing is read or written before they parse.
    let target = match (
        &a.recovery_target_lsn,
        &a.recovery_target_time,
        &a.recovery_target_name,
    ) {
        (Some(l), _, _) => validate::WalTarget::Lsn(l.parse()?),
        (_, Some(t), _) => validate::WalTarget::Time(meta::parse_time(t)?),
        (_, _, Some(n)) => validate::WalTarget::Name(n.clone()),
        _ => validate::WalTarget::Latest,
    };
    let opts = validate::ValidateOptions {
        backup_id: a.backup_id,
        wal: a.wal,
        target,
    };
    let catalog = Catalog::open(&a.instance.catalog.catalog)?;
    let report = validate::validate(&catalog, &a.instance.instance, &opts)?;
    print!("{}", validate::render_text(&report));
    let problems = validate::problems(&report);
    for p in &problems {
        eprintln!("walnut: {p}");
    }
    let (success, checked, failed) = (report.success(), report.checked(), report.failed());
    crate::verify_record::record_validate(
        &catalog,
        &a.instance.instance,
        opts.backup_id.as_deref(),
        success,
        &problems,
    );
    log::info!("validate: {checked} checked, {failed} failed");
    Ok(if success { 0 } else { 1 })
}
