//! `walnut verify-restore`: its options (checked before anything is written), the call
//! into [`crate::verify_restore`], the output and the exit code (0 passed, 1 failed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::cli::backup::{parse_recovery, BarProgress, RecoveryArgs};
use crate::cli::{InstanceArgs, OutputFormat};
use crate::error::Result;
use crate::restore::RecoveryTarget;
use crate::verify_restore::{self, VerifyOptions, VerifyReport};

#[derive(Args, Debug, Clone)]
pub struct VerifyRestoreArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Backup to verify (default: the newest valid backup that can reach the target).
    #[arg(short = 'i', long = "backup-id")]
    pub backup_id: Option<String>,
    /// Recovery target (default: the backup's consistency point, i.e.
    /// --recovery-target immediate).
    #[command(flatten)]
    pub recovery: RecoveryArgs,
    /// Scratch directory (absent or empty; default: a new one in the temp directory). Kept
    /// when the drill fails, removed when it passes.
    #[arg(short = 'D', long = "directory")]
    pub dir: Option<PathBuf>,
    /// Give up after this long (e.g. 30m, 2h, 90s): the server is stopped and the run
    /// fails.
    #[arg(long = "max-time", value_name = "DURATION")]
    pub max_time: Option<String>,
    /// PostgreSQL's binary directory (default: found for the backup's major version).
    #[arg(long = "pg-bin", value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// OS user the server runs as when walnut runs as root.
    #[arg(long = "os-user", default_value = "postgres")]
    pub os_user: String,
    /// Database role to connect as (default: the instance's, else postgres).
    #[arg(short = 'U', long = "username")]
    pub db_user: Option<String>,
    #[arg(short = 'j', long = "jobs", default_value_t = 1)]
    pub jobs: usize,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

pub fn run(a: VerifyRestoreArgs) -> Result<i32> {
    // options first
    let mut recovery = parse_recovery(&a.recovery)?;
    let target_given = a.recovery.recovery_target.is_some()
        || a.recovery.recovery_target_time.is_some()
        || a.recovery.recovery_target_xid.is_some()
        || a.recovery.recovery_target_lsn.is_some()
        || a.recovery.recovery_target_name.is_some();
    if !target_given {
        recovery.target = RecoveryTarget::Immediate;
    }
    if a.recovery.recovery_target_action.is_some() {
        return Err(crate::Error::invalid(
            "verify-restore always promotes the copy (its checks need a writable server): --recovery-target-action is not an option here",
        ));
    }
    let max_time = match &a.max_time {
        Some(s) => Some(Duration::from_secs(
            crate::lifecycle::records::parse_duration(s)? as u64,
        )),
        None => None,
    };
    let opts = VerifyOptions {
        backup_id: a.backup_id.clone(),
        recovery,
        dir: a.dir.clone(),
        max_time,
        pg_bin: a.pg_bin.clone(),
        os_user: Some(a.os_user.clone()),
        db_user: a.db_user.clone(),
        jobs: a.jobs,
        progress: Arc::new(BarProgress::new()),
    };
    let catalog = a.instance.catalog.open()?;
    let rep = verify_restore::run(&catalog, &a.instance.instance, &opts)?;
    match a.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rep)?),
        OutputFormat::Text => print!("{}", render(&rep)),
    }
    if !rep.success {
        eprintln!(
            "walnut: error: verify-restore of backup {} FAILED: {}{}",
            rep.backup_id,
            rep.error
                .clone()
                .or_else(|| rep.failures.first().cloned())
                .unwrap_or_default(),
            if rep.kept {
                format!("; the scratch directory \"{}\" is kept", rep.directory)
            } else {
                String::new()
            }
        );
    }
    Ok(if rep.success { 0 } else { 1 })
}

/// The report as text.
pub fn render(r: &VerifyReport) -> String {
    let mut s = format!(
        "verify-restore of backup {} ({}): {} in {:.1} s, recovery target {}\n",
        r.backup_id,
        r.instance,
        if r.success { "PASSED" } else { "FAILED" },
        r.duration_seconds,
        r.recovery_target
    );
    for st in &r.steps {
        s.push_str(&format!(
            "  {:<18} {:<4} {:>8.1} s{}\n",
            st.name,
            if st.ok { "ok" } else { "FAIL" },
            st.seconds,
            st.detail
                .as_ref()
                .map(|d| format!("  {d}"))
                .unwrap_or_default()
        ));
    }
    for d in &r.databases {
        s.push_str(&format!(
            "  database {:<16} {} indexes checked ({:.1} s), {} tables counted, {} rows ({:.1} s){}\n",
            d.name,
            d.indexes_checked,
            d.amcheck_seconds,
            d.tables_counted,
            d.rows,
            d.count_seconds,
            if d.failures.is_empty() {
                String::new()
            } else {
                format!(", {} FAILURES", d.failures.len())
            }
        ));
    }
    for f in &r.failures {
        s.push_str(&format!("  FAIL {f}\n"));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("  ERROR {e}\n"));
    }
    s.push_str(&format!(
        "  directory {}{}\n",
        r.directory,
        if r.kept { " (kept)" } else { " (removed)" }
    ));
    s
}
