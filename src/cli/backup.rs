//! `walnut backup`, `restore`, `show` and `validate`: their options (parsed and checked here,
//! before anything is read or written), the calls into the library, and the output.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;

use crate::backup::show::{self, BackupRow};
use crate::backup::validate::{self, Outcome, Report};
use crate::backup::{meta, take, Mode};
use crate::cli::{ConnArgs, InstanceArgs, OutputFormat, ShowArgs};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::restore::{Recovery, RecoveryAction, RecoveryTarget, TimelineTarget};
use crate::types::{Lsn, TimeLineId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Full,
    Page,
    Delta,
    /// PAGE with the change map from PostgreSQL 17+'s WAL summaries (summarize_wal = on).
    Summary,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Full => Mode::Full,
            ModeArg::Page | ModeArg::Summary => Mode::Page,
            ModeArg::Delta => Mode::Delta,
        }
    }
}

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
    pub mode: ModeArg,
    /// Parallel copy threads.
    #[arg(short = 'j', long = "jobs", default_value_t = 1)]
    pub jobs: usize,
    /// Compression of stored files.
    #[arg(long, value_enum, default_value_t = Compress::None)]
    pub compress: Compress,
    /// Parent backup for PAGE/DELTA (default: newest OK backup on this timeline's history).
    #[arg(long)]
    pub parent: Option<String>,
    /// Seconds to wait for the WAL the backup needs to be archived (or, with --stream,
    /// streamed).
    #[arg(long, default_value_t = 300)]
    pub archive_timeout: u64,
    /// STREAM backup: stream the WAL from the backup's start to its stop into the backup
    /// (from a temporary replication slot), so that it restores with no archive.
    #[arg(long)]
    pub stream: bool,
    /// The data directory to copy, for this run (default: the instance's registered one),
    /// e.g. a standby's; its system identifier must be the instance's.
    #[arg(short = 'D', long = "pgdata")]
    pub pgdata: Option<PathBuf>,
    /// Print the files and bytes a FULL or PAGE backup would store now (from the block
    /// indexes), without starting a backup or writing anything.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// Output of --dry-run.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// The recovery options as given; [`parse_recovery`] checks them.
#[derive(Args, Debug, Clone, Default)]
pub struct RecoveryArgs {
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
    #[command(flatten)]
    pub recovery: RecoveryArgs,
    /// Restore into a non-empty directory, removing its contents.
    #[arg(long)]
    pub force: bool,
    /// Restore into an existing data directory of this cluster, writing only the blocks
    /// that differ: checksum compares every block, lsn keeps blocks older than the point
    /// where the directory and the backup diverged (needs data checksums, a clean shutdown).
    #[arg(long, value_enum, conflicts_with = "force")]
    pub incremental_mode: Option<IncrementalModeArg>,
    /// Restore only this database (repeatable); template0, template1 and postgres are
    /// always restored. The others become sparse zero files: drop them after recovery.
    #[arg(long = "db-include", conflicts_with = "db_exclude")]
    pub db_include: Vec<String>,
    /// Do not restore this database (repeatable); drop it after recovery.
    #[arg(long = "db-exclude")]
    pub db_exclude: Vec<String>,
    /// Print the restore plan (chain, tablespaces, bytes to write, WAL, target, checks) and
    /// change nothing; exits 0 only if the restore would succeed.
    #[arg(long, visible_alias = "dry-run")]
    pub plan: bool,
    /// Output format of --plan.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IncrementalModeArg {
    Checksum,
    Lsn,
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

/// Progress as an `indicatif` bar on a terminal, else a log line every 10 s.
pub struct BarProgress {
    bar: Mutex<Option<indicatif::ProgressBar>>,
    what: Mutex<String>,
    total: AtomicU64,
    done: AtomicU64,
    last_log: Mutex<Instant>,
}

impl BarProgress {
    pub fn new() -> BarProgress {
        BarProgress {
            bar: Mutex::new(None),
            what: Mutex::new(String::new()),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            last_log: Mutex::new(Instant::now()),
        }
    }
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for BarProgress {
    fn start(&self, what: &str, total: u64) {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(what.to_string());
            b
        });
        if let Ok(mut g) = self.bar.lock() {
            *g = bar;
        }
        if let Ok(mut w) = self.what.lock() {
            *w = what.to_string();
        }
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Ok(g) = self.bar.try_lock() {
            if let Some(b) = &*g {
                b.inc(n);
                return;
            }
        }
        if let Ok(mut last) = self.last_log.try_lock() {
            if last.elapsed() >= Duration::from_secs(10) {
                *last = Instant::now();
                let what = self.what.lock().map(|w| w.clone()).unwrap_or_default();
                log::info!(
                    "{what}: {} of {} MiB",
                    done >> 20,
                    self.total.load(Ordering::Relaxed) >> 20
                );
            }
        }
    }

    fn finish(&self) {
        if let Ok(g) = self.bar.lock() {
            if let Some(b) = &*g {
                b.finish_and_clear();
            }
        }
    }
}

pub fn run_backup(a: BackupArgs) -> Result<i32> {
    let catalog = a.instance.catalog.open()?;
    let opts = take::BackupOptions {
        mode: a.mode.into(),
        jobs: a.jobs.max(1),
        compress: a.compress == Compress::Lz4,
        parent: a.parent,
        archive_timeout: Duration::from_secs(a.archive_timeout),
        stream: a.stream,
        pgdata: a.pgdata,
        summary: a.mode == ModeArg::Summary,
        conn: a.conn.params(),
        progress: Arc::new(BarProgress::new()),
    };
    if a.dry_run {
        let d = take::dry_run(&catalog, &a.instance.instance, &opts)?;
        match a.format {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&d)?),
            OutputFormat::Text => println!(
                "{} backup now{}: {} files, {} ({} bytes){}; WAL {} .. {} ({} segments decoded from pg_wal)",
                d.mode,
                d.parent_id
                    .as_ref()
                    .map(|p| format!(" (parent {p})"))
                    .unwrap_or_default(),
                d.files,
                human_bytes(d.data_bytes),
                d.data_bytes,
                if d.compressed {
                    ", before compression"
                } else {
                    ""
                },
                d.from_lsn.as_deref().unwrap_or("-"),
                d.to_lsn,
                d.segments_from_pg_wal
            ),
        }
        return Ok(0);
    }
    let m = take::take_backup(&catalog, &a.instance.instance, &opts)?;
    println!("{}", m.id);
    Ok(0)
}

/// Parses and checks the recovery options: at most one target, each value well-formed and
/// free of control characters (they become lines of postgresql.auto.conf), `inclusive` only
/// with a time, xid or LSN.
pub fn parse_recovery(a: &RecoveryArgs) -> Result<Recovery> {
    let given = [
        ("--recovery-target-time", &a.recovery_target_time),
        ("--recovery-target-xid", &a.recovery_target_xid),
        ("--recovery-target-lsn", &a.recovery_target_lsn),
        ("--recovery-target-name", &a.recovery_target_name),
        ("--recovery-target", &a.recovery_target),
    ];
    let set: Vec<&str> = given
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| *k)
        .collect();
    if set.len() > 1 {
        return Err(Error::invalid(format!(
            "give at most one recovery target ({} were given)",
            set.join(", ")
        )));
    }
    let others = [
        ("--recovery-target-timeline", &a.recovery_target_timeline),
        ("--recovery-target-action", &a.recovery_target_action),
    ];
    for (k, v) in given.iter().chain(others.iter()) {
        if let Some(v) = v {
            if v.chars().any(char::is_control) {
                return Err(Error::invalid(format!(
                    "{k} {v:?} contains a control character"
                )));
            }
        }
    }
    let inclusive = a.recovery_target_inclusive;
    let target = if let Some(t) = &a.recovery_target_time {
        RecoveryTarget::Time {
            epoch: meta::parse_time(t)?,
            text: t.trim().to_string(),
            inclusive,
        }
    } else if let Some(x) = &a.recovery_target_xid {
        let xid: u64 = x.trim().parse().map_err(|_| {
            Error::invalid(format!(
                "invalid --recovery-target-xid '{x}': expected a transaction id (a number)"
            ))
        })?;
        RecoveryTarget::Xid { xid, inclusive }
    } else if let Some(l) = &a.recovery_target_lsn {
        let lsn: Lsn = l.parse()?;
        RecoveryTarget::Lsn { lsn, inclusive }
    } else {
        if inclusive.is_some() {
            return Err(Error::invalid(
                "--recovery-target-inclusive applies only to --recovery-target-time, -xid or -lsn",
            ));
        }
        if let Some(n) = &a.recovery_target_name {
            // PostgreSQL's limit: MAXFNAMELEN (64) including the terminating NUL.
            if n.is_empty() || n.len() >= 64 {
                return Err(Error::invalid(format!(
                    "invalid --recovery-target-name {n:?}: 1 to 63 bytes"
                )));
            }
            RecoveryTarget::Name(n.clone())
        } else {
            match a.recovery_target.as_deref() {
                None | Some("latest") => RecoveryTarget::Latest,
                Some("immediate") => RecoveryTarget::Immediate,
                Some(o) => {
                    return Err(Error::invalid(format!(
                        "invalid --recovery-target '{o}': immediate or latest"
                    )))
                }
            }
        }
    };
    let timeline = match a.recovery_target_timeline.as_deref() {
        None => None,
        Some("current") => Some(TimelineTarget::Current),
        Some("latest") => Some(TimelineTarget::Latest),
        Some(t) => match t.parse::<TimeLineId>() {
            Ok(n) if n >= 1 => Some(TimelineTarget::Id(n)),
            _ => {
                return Err(Error::invalid(format!(
                    "invalid --recovery-target-timeline '{t}': a timeline number, current or latest"
                )))
            }
        },
    };
    let action = match a.recovery_target_action.as_deref() {
        None => None,
        Some("pause") => Some(RecoveryAction::Pause),
        Some("promote") => Some(RecoveryAction::Promote),
        Some("shutdown") => Some(RecoveryAction::Shutdown),
        Some(o) => {
            return Err(Error::invalid(format!(
                "invalid --recovery-target-action '{o}': pause, promote or shutdown"
            )))
        }
    };
    Ok(Recovery {
        target,
        timeline,
        action,
    })
}

fn parse_mappings(given: &[String]) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut mappings = Vec::new();
    for m in given {
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
    Ok(mappings)
}

pub fn run_restore(a: RestoreArgs) -> Result<i32> {
    // Options first: nothing is read or written before they parse.
    let mappings = parse_mappings(&a.mappings)?;
    let recovery = parse_recovery(&a.recovery)?;
    let target = std::path::absolute(&a.pgdata).map_err(|e| Error::io("resolve", &a.pgdata, e))?;
    let catalog = a.instance.catalog.open()?;
    let opts = crate::restore::RestoreOptions {
        backup_id: a.backup_id,
        target,
        jobs: a.jobs.max(1),
        mappings,
        recovery,
        force: a.force,
        progress: Arc::new(BarProgress::new()),
    };
    let power = crate::restore::power::PowerOptions {
        incremental: a.incremental_mode.map(|m| match m {
            IncrementalModeArg::Checksum => crate::restore::incremental::IncrementalMode::Checksum,
            IncrementalModeArg::Lsn => crate::restore::incremental::IncrementalMode::Lsn,
        }),
        db_include: a.db_include,
        db_exclude: a.db_exclude,
    };
    if a.plan {
        let opts = crate::restore::RestoreOptions {
            progress: Arc::new(crate::progress::NoProgress),
            ..opts
        };
        let rep =
            crate::restore::power::plan_report(&catalog, &a.instance.instance, &opts, &power)?;
        match a.format {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rep)?),
            OutputFormat::Text => print!("{}", crate::restore::power::render_plan(&rep)),
        }
        return Ok(if rep.ok { 0 } else { 1 });
    }
    let rep = crate::restore::power::restore_with(&catalog, &a.instance.instance, &opts, &power)?;
    if power.incremental.is_some() {
        // lsn mode's route first, on a line of its own (the detail is in the log and in
        // `--plan`)
        if let Some(r) = &rep.lsn_route {
            println!(
                "lsn route {} ({} blocks kept without reading the destination; {} bytes of the destination read)",
                r.route, rep.blocks_kept_unread, rep.dest_bytes_read
            );
        }
        println!(
            "backup {} restored incrementally ({}) into \"{}\": {} of {} bytes written, {} files removed, {} blocks kept unread",
            rep.backup_id,
            rep.kind,
            opts.target.display(),
            rep.bytes_written,
            rep.bytes_total,
            rep.files_removed,
            rep.blocks_kept
        );
    }
    if !rep.excluded_databases.is_empty() {
        log::warn!(
            "databases with oids {:?} were not restored (sparse zero files): drop them after recovery",
            rep.excluded_databases
        );
    }
    log::info!(
        "backup {} restored into \"{}\"; start the server to recover",
        rep.backup_id,
        opts.target.display()
    );
    Ok(0)
}

pub fn run_show(a: ShowArgs) -> Result<i32> {
    let catalog = a.catalog.open()?;
    let rows = show::rows(&catalog, a.instance.as_deref(), a.backup_id.as_deref())?;
    match a.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        OutputFormat::Text => print!("{}", show_table(&rows)),
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
    let catalog = a.instance.catalog.open()?;
    let report = validate::validate(&catalog, &a.instance.instance, &opts)?;
    print!("{}", render_validate(&report));
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

/// The validate report as text: one line per backup, then the WAL and a summary.
pub fn render_validate(r: &Report) -> String {
    let mut s = String::new();
    for b in &r.backups {
        let (word, why) = match &b.outcome {
            Outcome::Valid => ("valid", String::new()),
            Outcome::Corrupt(m) => ("CORRUPT", m.clone()),
            Outcome::Orphan(m) => ("ORPHAN", m.clone()),
            Outcome::Unreadable(m) => ("could not be read (status unchanged)", m.clone()),
            Outcome::Skipped(m) => ("skipped", m.clone()),
        };
        let change = if b.before != b.after {
            format!(" [{} -> {}]", b.before, b.after)
        } else {
            String::new()
        };
        let why = if why.is_empty() {
            why
        } else {
            format!(": {why}")
        };
        s.push_str(&format!(
            "backup {} {:<5} {:<8} {word}{change}{why}\n",
            b.id,
            b.mode.to_string(),
            b.after.to_string()
        ));
    }
    for d in &r.damaged {
        s.push_str(&format!("{d}\n"));
    }
    if let Some(w) = &r.wal {
        for p in &w.problems {
            s.push_str(&format!("{p}\n"));
        }
    }
    for e in &r.record_errors {
        s.push_str(&format!("{e}\n"));
    }
    let count = |f: fn(&Outcome) -> bool| r.backups.iter().filter(|b| f(&b.outcome)).count();
    s.push_str(&format!(
        "{} backups: {} valid, {} CORRUPT, {} ORPHAN, {} could not be read, {} skipped; {} damaged backup directories",
        r.backups.len(),
        count(|o| matches!(o, Outcome::Valid)),
        count(|o| matches!(o, Outcome::Corrupt(_))),
        count(|o| matches!(o, Outcome::Orphan(_))),
        count(|o| matches!(o, Outcome::Unreadable(_))),
        count(|o| matches!(o, Outcome::Skipped(_))),
        r.damaged.len()
    ));
    if let Some(w) = &r.wal {
        s.push_str(&format!(
            "; WAL: {} segments verified, {} problems",
            w.segments_checked,
            w.problems.len()
        ));
    }
    s.push('\n');
    s.push_str(if r.success() {
        "validate: OK\n"
    } else {
        "validate: FAILED\n"
    });
    s
}

fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", U[i])
    }
}

/// The backups as an aligned text table.
/// The PITR window on the backup's own timeline ("LSN (time)"), and how many later
/// timelines it reaches too.
fn pitr_cell(r: &BackupRow) -> String {
    let Some(h) = r.pitr.iter().find(|h| h.timeline == r.timeline) else {
        return "-".into();
    };
    let mut s = match &h.to_time {
        Some(t) => format!("{} ({t})", h.to_lsn),
        None => h.to_lsn.clone(),
    };
    let more = r.pitr.len() - 1;
    if more > 0 {
        s.push_str(&format!(" +{more} TLI"));
    }
    s
}

pub fn show_table(rows: &[BackupRow]) -> String {
    let header = [
        "Instance",
        "ID",
        "Mode",
        "WAL",
        "Status",
        "Parent",
        "TLI",
        "Start LSN",
        "Stop LSN",
        "Start time",
        "Recovery time",
        "Data",
        "Files",
        "Pinned until",
        "Verified",
        "PITR until",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        cells.push(vec![
            r.instance.clone(),
            r.id.clone(),
            match r.source.as_deref() {
                Some("summary") => format!("{}(summary)", r.mode),
                _ => r.mode.clone(),
            },
            if r.stream { "STREAM" } else { "ARCHIVE" }.to_string(),
            r.status.clone(),
            r.parent_id.clone().unwrap_or_else(|| "-".into()),
            r.timeline.to_string(),
            r.start_lsn.clone(),
            r.stop_lsn.clone().unwrap_or_else(|| "-".into()),
            r.start_time.clone(),
            r.recovery_time.clone().unwrap_or_else(|| "-".into()),
            human_bytes(r.data_bytes),
            r.files.to_string(),
            r.expire_time.clone().unwrap_or_else(|| "-".into()),
            match (&r.verify_restore, &r.verify_restore_time) {
                (Some(v), Some(t)) => format!("{v} {t}"),
                _ => "-".into(),
            },
            pitr_cell(r),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| cells.iter().map(|row| row[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> RecoveryArgs {
        RecoveryArgs::default()
    }

    #[test]
    fn recovery_options_are_parsed_once_and_checked() {
        let ok = |r: RecoveryArgs| parse_recovery(&r).unwrap().target;
        assert_eq!(
            ok(RecoveryArgs {
                recovery_target_xid: Some(" 1234 ".into()),
                ..rt()
            }),
            RecoveryTarget::Xid {
                xid: 1234,
                inclusive: None
            }
        );
        assert_eq!(
            ok(RecoveryArgs {
                recovery_target_lsn: Some("0/16B3748".into()),
                recovery_target_inclusive: Some(false),
                ..rt()
            }),
            RecoveryTarget::Lsn {
                lsn: Lsn(0x16B3748),
                inclusive: Some(false)
            }
        );
        assert_eq!(ok(rt()), RecoveryTarget::Latest);
        assert_eq!(
            ok(RecoveryArgs {
                recovery_target: Some("immediate".into()),
                ..rt()
            }),
            RecoveryTarget::Immediate
        );
        let r = parse_recovery(&RecoveryArgs {
            recovery_target_name: Some("p".into()),
            recovery_target_timeline: Some("3".into()),
            recovery_target_action: Some("promote".into()),
            ..rt()
        })
        .unwrap();
        assert_eq!(r.target, RecoveryTarget::Name("p".into()));
        assert_eq!(r.timeline, Some(TimelineTarget::Id(3)));
        assert_eq!(r.action, Some(RecoveryAction::Promote));
        let bad = [
            RecoveryArgs {
                recovery_target_time: Some("yesterday".into()),
                ..rt()
            },
            RecoveryArgs {
                recovery_target_xid: Some("12a".into()),
                ..rt()
            },
            RecoveryArgs {
                recovery_target_lsn: Some("16B3748".into()),
                ..rt()
            },
            RecoveryArgs {
                recovery_target_name: Some(String::new()),
                ..rt()
            },
            RecoveryArgs {
                recovery_target_name: Some("x".repeat(64)),
                ..rt()
            },
            RecoveryArgs {
                recovery_target_name: Some("a\nrestore_command='x'".into()),
                ..rt()
            },
            RecoveryArgs {
                recovery_target_timeline: Some("0".into()),
                ..rt()
            },
            RecoveryArgs {
                recovery_target_timeline: Some("newest".into()),
                ..rt()
            },
            RecoveryArgs {
                recovery_target_action: Some("explode".into()),
                ..rt()
            },
            RecoveryArgs {
                recovery_target: Some("now".into()),
                ..rt()
            },
            RecoveryArgs {
                recovery_target_xid: Some("5".into()),
                recovery_target_name: Some("p".into()),
                ..rt()
            },
            RecoveryArgs {
                recovery_target_name: Some("p".into()),
                recovery_target_inclusive: Some(true),
                ..rt()
            },
        ];
        for r in bad {
            assert!(parse_recovery(&r).is_err(), "{r:?}");
        }
    }
}
