//! `walnut set-config`, `show-config`, `delete`, `merge` and `set-backup`: clap structs and the
//! rendering of the library's lifecycle reports.

use clap::Args;

use crate::backup::meta;
use crate::cli::{InstanceArgs, OutputFormat};
use crate::error::{Error, Result};
use crate::lifecycle::merge::{self, MergeOptions, MergeReport};
use crate::lifecycle::records::{self, PinChange, Settings};
use crate::lifecycle::{self, DeleteOptions, DeleteReport, Target};

/// Retention settings (each optional; 0 unsets in set-config).
#[derive(Args, Debug, Clone, Default)]
pub struct RetentionArgs {
    /// Keep this many newest valid FULL backups and everything depending on them.
    #[arg(long = "retention-redundancy")]
    pub redundancy: Option<u32>,
    /// Keep what restores to any moment of the last DAYS days.
    #[arg(long = "retention-window", value_name = "DAYS")]
    pub window: Option<u32>,
    /// Keep point-in-time recovery from the N newest valid backups (WAL purge).
    #[arg(long = "wal-depth")]
    pub wal_depth: Option<u32>,
}

impl RetentionArgs {
    fn settings(&self) -> Settings {
        Settings {
            retention_redundancy: self.redundancy,
            retention_window: self.window,
            wal_depth: self.wal_depth,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct SetConfigArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ShowConfigArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Args, Debug, Clone)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Delete this backup and its incremental descendants.
    #[arg(short = 'i', long = "backup-id", conflicts_with = "expired")]
    pub backup_id: Option<String>,
    /// Delete what the retention policy expires.
    #[arg(long)]
    pub expired: bool,
    /// With --expired: merge expired ancestors of kept incremental backups into them
    /// instead of keeping them.
    #[arg(long = "merge-expired", requires = "expired")]
    pub merge_expired: bool,
    /// Purge the WAL (and its indexes) that no kept backup needs.
    #[arg(long = "delete-wal")]
    pub delete_wal: bool,
    /// Print the plan and change nothing.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// Settings for this run only (over the stored ones).
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// "Now", for tests of the window and pins (a time as in --expire-time).
    #[arg(long = "now", hide = true)]
    pub now: Option<String>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// The PAGE or DELTA backup to merge with its ancestors into one FULL backup.
    #[arg(short = 'i', long = "backup-id")]
    pub backup_id: String,
    /// Files merged at once.
    #[arg(short = 'j', long = "jobs", default_value_t = merge::DEFAULT_JOBS)]
    pub jobs: usize,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Args, Debug, Clone)]
pub struct SetBackupArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    #[arg(short = 'i', long = "backup-id")]
    pub backup_id: String,
    /// Pin for this long from now (30d, 12h, 90m); 0 unpins.
    #[arg(long, conflicts_with = "expire_time")]
    pub ttl: Option<String>,
    /// Pin until this time (YYYY-MM-DD HH:MM:SS[+TZ]).
    #[arg(long = "expire-time")]
    pub expire_time: Option<String>,
    /// A note shown with the backup ("" removes it).
    #[arg(long)]
    pub note: Option<String>,
}

pub fn run_set_config(a: SetConfigArgs) -> Result<i32> {
    let change = a.retention.settings();
    if change == Settings::default() {
        return Err(Error::invalid(
            "set-config: give at least one of --retention-redundancy, --retention-window, --wal-depth",
        ));
    }
    let catalog = a.instance.catalog.open()?;
    let s = records::set_settings(&catalog, &a.instance.instance, &change)?;
    print!("{}", render_settings(&a.instance.instance, &s));
    Ok(0)
}

pub fn run_show_config(a: ShowConfigArgs) -> Result<i32> {
    let catalog = a.instance.catalog.open()?;
    let s = records::load_settings(&catalog, &a.instance.instance)?;
    match a.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        OutputFormat::Text => print!("{}", render_settings(&a.instance.instance, &s)),
    }
    Ok(0)
}

fn render_settings(instance: &str, s: &Settings) -> String {
    let v = |x: Option<u32>| x.map_or("-".to_string(), |n| n.to_string());
    format!(
        "instance             {instance}\nretention-redundancy {}\nretention-window     {}\nwal-depth            {}\n",
        v(s.retention_redundancy),
        v(s.retention_window),
        v(s.wal_depth)
    )
}

pub fn run_delete(a: DeleteArgs) -> Result<i32> {
    // Options first: nothing is read or written before they parse.
    let target = match (&a.backup_id, a.expired) {
        (Some(id), _) => Target::Id(id.clone()),
        (None, true) => Target::Expired,
        (None, false) if a.delete_wal => Target::None,
        (None, false) => {
            return Err(Error::invalid(
                "delete: give -i ID, --expired or --delete-wal",
            ))
        }
    };
    let now = match &a.now {
        Some(t) => meta::parse_time(t)?,
        None => records::now_secs(),
    };
    let opts = DeleteOptions {
        target,
        settings: a.retention.settings(),
        delete_wal: a.delete_wal,
        dry_run: a.dry_run,
        now,
        merge_expired: a.merge_expired,
    };
    let catalog = a.instance.catalog.open()?;
    let r = lifecycle::delete(&catalog, &a.instance.instance, &opts)?;
    match a.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        OutputFormat::Text => print!("{}", render_delete(&r)),
    }
    if let Some(why) = &r.wal_skipped {
        log::warn!("no WAL purged: {why}");
    }
    Ok(0)
}

/// The delete report as text: each backup with its fate, then the WAL ranges.
pub fn render_delete(r: &DeleteReport) -> String {
    let mut s = String::new();
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    for d in &r.backups {
        let fate = if d.keep { "keep" } else { verb };
        s.push_str(&format!(
            "{fate:<12} {} {} {} TLI {} {} ({})\n",
            d.id, d.mode, d.status, d.timeline, d.start_lsn, d.reason
        ));
    }
    for m in &r.merged {
        s.push_str(&render_merge_line(m, r.dry_run));
    }
    for l in &r.leftovers {
        s.push_str(&format!("removed leftover of an interrupted delete: {l}\n"));
    }
    for t in &r.wal {
        for range in &t.ranges {
            s.push_str(&format!("{verb} WAL {range}\n"));
        }
        s.push_str(&format!(
            "{verb} {} WAL objects on timeline {:08X}\n",
            t.objects.len(),
            t.timeline
        ));
    }
    if let Some(w) = &r.wal_skipped {
        s.push_str(&format!("no WAL purged: {w}\n"));
    }
    s
}

pub fn run_set_backup(a: SetBackupArgs) -> Result<i32> {
    let now = records::now_secs();
    let expire = match (&a.ttl, &a.expire_time) {
        (Some(t), _) => {
            let secs = records::parse_duration(t)?;
            Some((secs > 0).then_some(now + secs))
        }
        (None, Some(t)) => Some(Some(meta::parse_time(t)?)),
        (None, None) => None,
    };
    if expire.is_none() && a.note.is_none() {
        return Err(Error::invalid(
            "set-backup: give --ttl, --expire-time or --note",
        ));
    }
    let change = PinChange {
        expire,
        note: a.note.clone(),
    };
    let catalog = a.instance.catalog.open()?;
    let p = records::set_pin(&catalog, &a.instance.instance, &a.backup_id, &change)?;
    println!(
        "backup {}: {}{}",
        a.backup_id,
        match &p.expire_time {
            Some(t) if p.pinned_at(now) => format!("pinned until {t}"),
            _ => "not pinned".to_string(),
        },
        p.note
            .as_deref()
            .map(|n| format!(", note: {n}"))
            .unwrap_or_default()
    );
    Ok(0)
}

pub fn run_merge(a: MergeArgs) -> Result<i32> {
    crate::safepath::check_name(&a.backup_id, "backup id")?;
    let opts = MergeOptions {
        id: a.backup_id.clone(),
        now: records::now_secs(),
        jobs: a.jobs.max(1),
    };
    let catalog = a.instance.catalog.open()?;
    let r = merge::merge(&catalog, &a.instance.instance, &opts)?;
    match a.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        OutputFormat::Text => {
            print!("{}", render_merge_line(&r, false));
            for id in &r.removed {
                println!("removed {id}");
            }
        }
    }
    Ok(0)
}

/// One merge as text.
fn render_merge_line(m: &MergeReport, dry_run: bool) -> String {
    let p = &m.plan;
    let mut s = match (&m.merged_id, dry_run, m.already_merged) {
        (Some(id), _, true) => format!(
            "backup {} was merged into FULL backup {id} already (an interrupted merge, finished)\n",
            p.target
        ),
        (Some(id), _, false) => format!(
            "merged {} into new FULL backup {id}: {} files ({} linked unchanged), {} MiB ({} MiB written) in {:.1} s; replaces {}\n",
            p.chain.join(" <- "),
            m.files,
            m.linked_files,
            m.bytes_written >> 20,
            m.bytes_written.saturating_sub(m.linked_bytes) >> 20,
            m.seconds,
            p.replaces.join(", ")
        ),
        (None, _, _) => format!(
            "{} merge {} into a new FULL backup, replacing {}\n",
            if dry_run { "would" } else { "will" },
            p.chain.join(" <- "),
            p.replaces.join(", ")
        ),
    };
    for (id, why) in &p.kept {
        s.push_str(&format!("  keeps {id} ({why})\n"));
    }
    s
}
