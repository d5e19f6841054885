//! `walnut-archive`, `walnut-fetch` and `walnut show --archive`: their options (clap),
//! converted once into the library's plain option types, their output and exit codes.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, Parser};

use super::{InstanceArgs, OutputFormat, ShowArgs};
use crate::archive::fetch::{FetchOptions, FetchOutcome};
use crate::archive::push::PushOptions;
use crate::archive::show::ArchiveReport;
use crate::archive::WalArchive;
use crate::error::{Error, Result};
use crate::types::WalFileName;
use crate::EXIT_FETCH_FATAL;

/// Options of `walnut-archive`.
#[derive(Args, Debug, Clone)]
pub struct PushArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// With a backlog (other `.ready` segments), a background pusher archives up to N
    /// segments ahead of PostgreSQL's calls and acknowledges each in a spool once it is
    /// durable, so the calls for them return at once; 0 disables.
    #[arg(long = "look-ahead", default_value_t = 8)]
    pub look_ahead: usize,
    /// The look-ahead spool, local working state on this host (default
    /// `pg_wal/walnut-spool`, beside `%p`).
    #[arg(long = "spool-dir")]
    pub spool_dir: Option<PathBuf>,
    /// Internal: run as the background pusher (`%f` is the segment its caller archives).
    #[arg(long = "background", hide = true)]
    pub background: bool,
    /// `%p`: path of the file, relative to PGDATA (the archiver's working directory).
    pub path: PathBuf,
    /// `%f`: file name.
    pub name: String,
}

impl PushArgs {
    /// The library's options (parses `%f`).
    pub fn options(&self) -> Result<PushOptions> {
        Ok(PushOptions {
            catalog: self.instance.catalog.location()?,
            instance: self.instance.instance.clone(),
            look_ahead: self.look_ahead,
            background: self.background,
            spool_dir: self.spool_dir.clone(),
            path: self.path.clone(),
            name: self.name.parse()?,
        })
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "walnut-archive",
    version,
    about = "archive_command: walnut-archive -B DIR --instance NAME %p %f"
)]
pub struct PushCli {
    #[command(flatten)]
    pub args: PushArgs,
}

/// Options of `walnut-fetch`.
#[derive(Args, Debug, Clone)]
pub struct FetchArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Prefetch the next K segments in the background; 0 disables.
    #[arg(long, default_value_t = 8)]
    pub prefetch: u64,
    /// The prefetch spool, local working state on this host (default
    /// `pg_wal/walnut-prefetch`, beside `%p`); not the directory of walnut-archive's
    /// `--spool-dir`.
    #[arg(long = "spool-dir")]
    pub spool_dir: Option<PathBuf>,
    /// Internal: run as the background prefetch worker.
    #[arg(long = "prefetch-worker", hide = true)]
    pub prefetch_worker: bool,
    /// Remove the prefetch spool and exit (`recovery_end_command`; run in PGDATA, or give
    /// `%f %p` of any file in the `pg_wal` concerned).
    #[arg(long)]
    pub cleanup: bool,
    /// `%f`: the file PostgreSQL asks for.
    #[arg(required_unless_present = "cleanup")]
    pub name: Option<String>,
    /// `%p`: where to write it, relative to PGDATA (the working directory).
    #[arg(required_unless_present = "cleanup")]
    pub dest: Option<PathBuf>,
}

impl FetchArgs {
    /// The library's options (parses `%f`, except with `--cleanup`, which ignores it).
    pub fn options(&self) -> Result<FetchOptions> {
        let name = match (&self.name, self.cleanup) {
            (Some(n), false) => Some(n.parse::<WalFileName>()?),
            _ => None,
        };
        Ok(FetchOptions {
            catalog: self.instance.catalog.location()?,
            instance: self.instance.instance.clone(),
            prefetch: self.prefetch,
            prefetch_worker: self.prefetch_worker,
            cleanup: self.cleanup,
            spool_dir: self.spool_dir.clone(),
            name,
            dest: self.dest.clone(),
        })
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "walnut-fetch",
    version,
    about = "restore_command: walnut-fetch -B DIR --instance NAME %f %p"
)]
pub struct FetchCli {
    #[command(flatten)]
    pub args: FetchArgs,
}

/// `walnut-archive`'s main: exit 0 only when the file is durable in the archive (also
/// `--help`, `--version`); 1 on any failure, a usage error or a panic.
pub fn main_archive() -> i32 {
    super::init_logging();
    let cli: PushCli = super::parse_or_exit(1);
    let name = cli.args.name.clone();
    // Panics caught inside (a WAL decoder thread's, which only costs the index) are
    // reported as warnings there; one that reaches main fails the call with exit 1.
    let result = super::catch_panics("walnut-archive", name.clone(), move || {
        crate::archive::push::run(&cli.args.options()?)
    });
    match result {
        Some(Ok(_)) => 0,
        Some(Err(e)) => {
            eprintln!("walnut-archive: ERROR: {name}: {e}");
            1
        }
        // The hook printed what panicked.
        None => 1,
    }
}

/// `walnut-fetch`'s main: exit 0 when written and verified (also `--help`, `--version`);
/// 1 when not in the archive (only when definitely absent); [`EXIT_FETCH_FATAL`] on
/// corruption, any other error, a usage error or a panic.
pub fn main_fetch() -> i32 {
    super::init_logging();
    let cli: FetchCli = super::parse_or_exit(EXIT_FETCH_FATAL);
    let name = cli.args.name.clone().unwrap_or_else(|| "--cleanup".into());
    let result = super::catch_panics("walnut-fetch: FATAL", name.clone(), move || {
        crate::archive::fetch::run(&cli.args.options()?)
    });
    match result {
        Some(Ok(FetchOutcome::NotInArchive)) => {
            log::info!("{name} is not in the archive");
            1
        }
        Some(Ok(_)) => 0,
        Some(Err(e)) => {
            eprintln!("walnut-fetch: FATAL: {name}: {e}");
            EXIT_FETCH_FATAL
        }
        // The hook printed what panicked.
        None => EXIT_FETCH_FATAL,
    }
}

/// `walnut show --archive`: prints the report; exit 1 when a file is corrupt or unreadable.
pub fn run_show(args: ShowArgs) -> Result<i32> {
    let instance = args
        .instance
        .clone()
        .ok_or_else(|| Error::invalid("show --archive needs --instance"))?;
    let since = match args.since.as_deref() {
        None => crate::archive::show::Since::All,
        Some(s) if s.contains('/') => crate::archive::show::Since::Lsn(s.trim().parse()?),
        Some(s) => crate::archive::show::Since::Time(crate::backup::meta::parse_time(s)?),
    };
    let catalog = args.catalog.open()?;
    let ar = WalArchive::open(&catalog, &instance)?;
    if args.churn {
        return show_churn(&args, &catalog, &ar, &instance, since);
    }
    let r = crate::archive::show::report(&ar, &instance, args.verify)?;
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        OutputFormat::Text => print!("{}", render_text(&r)),
    }
    let corrupt = r
        .timelines
        .iter()
        .any(|t| !t.corrupt.is_empty() || !t.unreadable.is_empty());
    Ok(if corrupt { 1 } else { 0 })
}

/// `show --archive --churn`.
fn show_churn(
    args: &ShowArgs,
    catalog: &crate::catalog::Catalog,
    ar: &WalArchive,
    instance: &str,
    since: crate::archive::show::Since,
) -> Result<i32> {
    let cfg = catalog.instance(instance)?;
    let mut r = crate::archive::show::churn(ar, instance, since, cfg.block_size)?;
    if args.limit > 0 {
        r.relations.truncate(args.limit);
    }
    if !args.no_connect {
        if let Err(e) = crate::archive::show::churn_names(&mut r, &args.conn.params(), &cfg) {
            log::warn!("no relation names (OIDs shown): {e}");
        }
    }
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        OutputFormat::Text => {
            let mut s = String::new();
            let _ = writeln!(
                s,
                "Churn of instance {} since {}: {} segments read{}",
                r.instance,
                r.since.as_deref().unwrap_or("the oldest archived WAL"),
                r.segments_read,
                if r.segments_unindexed.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} without a usable index NOT counted",
                        r.segments_unindexed.len()
                    )
                }
            );
            let _ = writeln!(
                s,
                "{:>12}  {:>10}  {:>8}  relation",
                "changed MiB", "blocks", "segments"
            );
            for c in &r.relations {
                let name = match (&c.database, &c.schema, &c.relation) {
                    (Some(d), Some(sc), Some(n)) => format!(
                        "{d}.{sc}.{n}{}{}",
                        c.kind
                            .as_ref()
                            .filter(|k| *k != "table")
                            .map(|k| format!(" ({k}"))
                            .unwrap_or_default(),
                        match (&c.kind, &c.of_table) {
                            (Some(k), Some(t)) if k != "table" => format!(" of {t})"),
                            (Some(k), None) if k != "table" => ")".to_string(),
                            _ => String::new(),
                        }
                    ),
                    (d, _, _) => format!(
                        "{} relfilenode {} (tablespace {}){}",
                        d.clone()
                            .unwrap_or_else(|| format!("database oid {}", c.database_oid)),
                        c.relfilenode,
                        c.tablespace_oid,
                        if c.dropped { ", dropped" } else { "" }
                    ),
                };
                let _ = writeln!(
                    s,
                    "{:>12}  {:>10}  {:>8}  {name}",
                    mib(c.changed_bytes),
                    c.changed_blocks,
                    c.segments
                );
            }
            print!("{s}");
        }
    }
    Ok(0)
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

/// Renders the report as a text table.
pub fn render_text(r: &ArchiveReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "WAL archive of instance {} (system id {}, {} MiB segments){}",
        r.instance,
        r.system_id,
        r.wal_segment_size >> 20,
        if r.verified { ", verified" } else { "" }
    );
    let _ = writeln!(
        s,
        "{:>8}  {:<24}  {:<24}  {:>8}  {:>5}  {:>10}  {:>10}  {:>7}  {:>7}  {:>7}  {:>7}  latest restorable time",
        "TLI", "first", "last", "segments", "gaps", "orig MiB", "stored MiB", "indexed", "pending", "missing", "corrupt"
    );
    for t in &r.timelines {
        let _ = writeln!(
            s,
            "{:>8}  {:<24}  {:<24}  {:>8}  {:>5}  {:>10}  {:>10}  {:>7}  {:>7}  {:>7}  {:>7}  {}",
            t.timeline,
            t.first_segment.as_deref().unwrap_or("-"),
            t.last_segment.as_deref().unwrap_or("-"),
            t.segments,
            t.gaps.len(),
            mib(t.original_bytes),
            mib(t.compressed_bytes),
            t.indexed,
            t.pending,
            t.index_missing.len(),
            t.corrupt.len(),
            t.latest_restorable_time.as_deref().unwrap_or("-")
        );
    }
    for t in &r.timelines {
        for (a, b) in &t.gaps {
            let _ = writeln!(s, "timeline {}: GAP {a} .. {b}", t.timeline);
        }
        for (n, why) in &t.index_missing {
            let _ = writeln!(s, "timeline {}: index missing for {n}: {why}", t.timeline);
        }
        for (n, why) in &t.corrupt {
            let _ = writeln!(s, "timeline {}: CORRUPT {n}: {why}", t.timeline);
        }
        for (n, why) in &t.unreadable {
            let _ = writeln!(s, "timeline {}: UNREADABLE {n}: {why}", t.timeline);
        }
        for n in &t.partial_files {
            let _ = writeln!(s, "timeline {}: partial {n}", t.timeline);
        }
        for p in &t.restore_points {
            let _ = writeln!(
                s,
                "timeline {}: restore point \"{}\" at {} ({})",
                t.timeline, p.name, p.lsn, p.time
            );
        }
    }
    if let Some(rc) = &r.receiver {
        let _ = writeln!(
            s,
            "receiver: slot {}, timeline {}, flushed {}, server at {}, lag {}, last message {}{}, {}{}",
            rc.slot,
            rc.timeline,
            rc.flushed_lsn,
            rc.server_wal_end,
            rc.lag_bytes.map_or("-".to_string(), |b| format!("{b} bytes")),
            rc.last_message_time.as_deref().unwrap_or("-"),
            rc.last_message_age_seconds
                .map_or(String::new(), |a| format!(" ({a:.1} s ago)")),
            if rc.running { "running" } else { "not running" },
            if rc.synchronous { ", synchronous" } else { "" }
        );
    }
    s
}
