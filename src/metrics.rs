//! The metrics behind `walnut metrics`: the catalog's state in Prometheus' text format, for
//! node_exporter's textfile collector (or any scraper reading a file). [`run`] returns the
//! text; `crate::cli::metrics` parses the options and writes it.
//!
//! The names follow the Prometheus conventions (base units, `_seconds`, `_bytes`,
//! `_timestamp_seconds` for points in time) as `pgbackrest_exporter` and WAL-G do. Every
//! sample carries `instance`; per-mode, per-status and per-kind samples carry `mode`,
//! `status` and `kind`, whose values are lower case. There are no timestamps (the textfile
//! collector refuses them) and the output ends with a newline.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::archive::WalArchive;
use crate::backup::meta::{self, BackupMeta, Mode, Status};
use crate::catalog::{Catalog, InstanceConfig};
use crate::error::{Error, Result};
use crate::server::ConnParams;
use crate::types::{Lsn, WalFileName};

/// What to collect.
#[derive(Clone, Debug, Default)]
pub struct MetricsOptions {
    /// Only this instance (all of the catalog's when `None`).
    pub instance: Option<String>,
    /// Ask each server for its WAL position with these settings (unset fields: each
    /// instance's stored ones); `None`: do not connect (no `walnut_archive_lag_bytes`).
    pub conn: Option<ConnParams>,
}

/// One metric family: help text, type and samples (labels, value).
struct Family {
    help: &'static str,
    kind: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

/// The families, in output order, with their help text.
const FAMILIES: [(&str, &str, &str); 18] = [
    ("walnut_backup_last_success_timestamp_seconds", "gauge", "End time of the newest successful backup of each mode (Unix seconds)."),
    ("walnut_backup_last_duration_seconds", "gauge", "Duration of the newest successful backup of each mode."),
    ("walnut_backup_last_size_bytes", "gauge", "Bytes of data in the newest successful backup of each mode."),
    ("walnut_backups", "gauge", "Number of backups in the catalog, by status."),
    ("walnut_archive_last_segment_timestamp_seconds", "gauge", "When the newest WAL segment was archived (Unix seconds)."),
    ("walnut_archive_lag_bytes", "gauge", "Bytes of WAL between the end of the newest archived segment and the server's current WAL position (only when the server could be reached)."),
    ("walnut_archive_segments", "gauge", "Number of WAL segments in the archive."),
    ("walnut_archive_segments_unindexed", "gauge", "Archived WAL segments without a usable block index (PAGE backups cannot use them)."),
    ("walnut_archive_gaps", "gauge", "Runs of missing segments inside the archived WAL of a timeline."),
    ("walnut_pitr_earliest_timestamp_seconds", "gauge", "Earliest time a restore can reach: the consistency point of the oldest valid backup (Unix seconds)."),
    ("walnut_pitr_latest_timestamp_seconds", "gauge", "Latest commit time found in the archived WAL (Unix seconds)."),
    ("walnut_verify_last_success", "gauge", "1 when the newest verification run of this kind succeeded, 0 when it failed."),
    ("walnut_verify_last_timestamp_seconds", "gauge", "When the newest verification run of this kind ended (Unix seconds)."),
    ("walnut_backup_verify_last_success", "gauge", "1 when the newest verify-restore drill of the backup passed, 0 when it failed (backups with a drill only)."),
    ("walnut_backup_verify_last_timestamp_seconds", "gauge", "When the newest verify-restore drill of the backup ended (Unix seconds)."),
    ("walnut_backup_verify_last_duration_seconds", "gauge", "How long the newest verify-restore drill of the backup took."),
    ("walnut_catalog_bytes", "gauge", "Bytes stored for the instance in the catalog (backups, WAL archive, indexes)."),
    ("walnut_server_up", "gauge", "1 when the server could be reached for walnut_archive_lag_bytes, 0 when not."),
];

/// The names of every metric `walnut metrics` can write.
pub const METRIC_NAMES: [&str; FAMILIES.len()] = {
    let mut n = [""; FAMILIES.len()];
    let mut i = 0;
    while i < FAMILIES.len() {
        n[i] = FAMILIES[i].0;
        i += 1;
    }
    n
};

/// Metric families being collected.
struct Out {
    families: BTreeMap<&'static str, Family>,
}

impl Out {
    fn new() -> Out {
        let families = FAMILIES
            .iter()
            .map(|&(name, kind, help)| {
                (
                    name,
                    Family {
                        help,
                        kind,
                        samples: Vec::new(),
                    },
                )
            })
            .collect();
        Out { families }
    }

    fn add(&mut self, name: &str, labels: Vec<(&'static str, String)>, value: f64) {
        let f = self
            .families
            .get_mut(name)
            .unwrap_or_else(|| panic!("metric {name} is not declared in FAMILIES"));
        f.samples.push((labels, value));
    }

    /// The text format; families without samples are left out.
    fn render(&self) -> String {
        let mut s = String::new();
        for (name, _, _) in FAMILIES {
            let f = &self.families[name];
            if f.samples.is_empty() {
                continue;
            }
            let _ = writeln!(s, "# HELP {name} {}", f.help);
            let _ = writeln!(s, "# TYPE {name} {}", f.kind);
            for (labels, v) in &f.samples {
                let l: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let _ = writeln!(s, "{name}{{{}}} {}", l.join(","), number(*v));
            }
        }
        s
    }
}

/// A label value escaped as the text format wants (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Whole numbers without a fraction; others as Rust prints them.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// The metrics of `opts.instance` (or of every instance) of `catalog`, as text.
pub fn run(catalog: &Catalog, opts: &MetricsOptions) -> Result<String> {
    let names = match &opts.instance {
        Some(i) => vec![i.clone()],
        None => catalog.instances()?,
    };
    collect(catalog, &names, opts.conn.as_ref())
}

/// The metrics of `instances` as text; with `conn`, each server is asked for its WAL
/// position.
pub fn collect(
    catalog: &Catalog,
    instances: &[String],
    conn: Option<&ConnParams>,
) -> Result<String> {
    let mut out = Out::new();
    for name in instances {
        let cfg = catalog.instance(name)?;
        instance_metrics(&mut out, catalog, &cfg, conn)?;
    }
    Ok(out.render())
}

fn mode_label(m: Mode) -> &'static str {
    match m {
        Mode::Full => "full",
        Mode::Page => "page",
        Mode::Delta => "delta",
    }
}

fn status_label(s: Status) -> &'static str {
    match s {
        Status::Running => "running",
        Status::Ok => "ok",
        Status::Error => "error",
        Status::Corrupt => "corrupt",
        Status::Orphan => "orphan",
    }
}

fn instance_metrics(
    out: &mut Out,
    catalog: &Catalog,
    cfg: &InstanceConfig,
    conn: Option<&ConnParams>,
) -> Result<()> {
    let inst = || ("instance", cfg.name.clone());
    let backups = meta::list(catalog, &cfg.name)?;
    backup_metrics(out, &cfg.name, &backups)?;
    for b in &backups {
        // a damaged record is damage: reported, never read as "not verified"
        if let Some(v) = crate::verify_restore::latest(catalog, &cfg.name, &b.id)? {
            let l = vec![inst(), ("backup_id", b.id.clone())];
            out.add(
                "walnut_backup_verify_last_success",
                l.clone(),
                if v.success { 1.0 } else { 0.0 },
            );
            out.add(
                "walnut_backup_verify_last_timestamp_seconds",
                l.clone(),
                v.end_epoch as f64,
            );
            out.add(
                "walnut_backup_verify_last_duration_seconds",
                l,
                v.duration_seconds,
            );
        }
    }

    let ar = WalArchive::open(catalog, &cfg.name)?;
    let scan = scan_archive(catalog.repo(), &cfg.name, &ar)?;
    if let Some(t) = scan.last_archived_at {
        out.add(
            "walnut_archive_last_segment_timestamp_seconds",
            vec![inst()],
            t as f64,
        );
    }
    if let Some(c) = conn {
        match current_wal_lsn(c, cfg) {
            Ok(lsn) => {
                out.add("walnut_server_up", vec![inst()], 1.0);
                let end = scan.newest_end.unwrap_or(0);
                out.add(
                    "walnut_archive_lag_bytes",
                    vec![inst()],
                    lsn.0.saturating_sub(end) as f64,
                );
            }
            Err(e) => {
                log::warn!(
                    "instance \"{}\": no walnut_archive_lag_bytes: {e}",
                    cfg.name
                );
                out.add("walnut_server_up", vec![inst()], 0.0);
            }
        }
    }
    out.add(
        "walnut_archive_segments",
        vec![inst()],
        scan.segments as f64,
    );
    out.add(
        "walnut_archive_segments_unindexed",
        vec![inst()],
        scan.unindexed as f64,
    );
    out.add("walnut_archive_gaps", vec![inst()], scan.gaps as f64);
    if let Some(us) = scan.latest_commit {
        // PostgreSQL timestamps count microseconds from 2000-01-01 00:00:00 UTC.
        let unix = us.div_euclid(1_000_000) + PG_EPOCH_OFFSET;
        out.add(
            "walnut_pitr_latest_timestamp_seconds",
            vec![inst()],
            unix as f64,
        );
    }

    for kind in crate::verify_record::KINDS {
        // verify-restore has no runs until it exists; its metrics appear with its records.
        if let Some(r) = crate::verify_record::latest(catalog, &cfg.name, kind)? {
            let labels = vec![inst(), ("kind", kind.to_string())];
            out.add(
                "walnut_verify_last_success",
                labels.clone(),
                if r.success { 1.0 } else { 0.0 },
            );
            out.add(
                "walnut_verify_last_timestamp_seconds",
                labels,
                r.time as f64,
            );
        }
    }
    out.add(
        "walnut_catalog_bytes",
        vec![inst()],
        prefix_bytes(catalog.repo(), &Catalog::instance_key(&cfg.name))? as f64,
    );
    Ok(())
}

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_OFFSET: i64 = 946_684_800;

/// How far back from a timeline's newest segment to look for the latest commit time
/// (segments with no commit, e.g. after `walnut check`'s switches, have none).
const COMMIT_LOOKBACK: usize = 256;

/// What the metrics need from the WAL archive.
#[derive(Debug, Default)]
struct ArchiveScan {
    segments: u64,
    /// Segments without an index file.
    unindexed: u64,
    gaps: u64,
    /// When the newest segment of any timeline was archived (Unix seconds).
    last_archived_at: Option<u64>,
    /// End LSN of the newest segment of the newest timeline.
    newest_end: Option<u64>,
    /// Newest commit time in the indexes (PostgreSQL microseconds).
    latest_commit: Option<i64>,
}

/// Scans the archive from its directory listings, reading only the newest segment's
/// header and the newest indexes of each timeline: the timer runs it every minute, so it
/// must not read every archived file (`walnut show --archive` does that, and also finds
/// damaged index files, which count as indexed here).
fn scan_archive(
    repo: &dyn crate::repo::Repo,
    instance: &str,
    ar: &WalArchive,
) -> Result<ArchiveScan> {
    let seg_size = ar.seg_size();
    let mut scan = ArchiveScan::default();
    // Listed through the repository: a directory or a bucket alike.
    let wal = Catalog::wal_key(instance);
    let mut tlis: Vec<u32> = repo
        .list(&wal)?
        .prefixes
        .iter()
        .filter(|n| n.len() == 8)
        .filter_map(|n| u32::from_str_radix(n, 16).ok())
        .collect();
    tlis.sort_unstable();
    for tli in tlis {
        let mut segs: BTreeMap<u64, WalFileName> = BTreeMap::new();
        let mut indexed: std::collections::BTreeSet<u64> = Default::default();
        for o in repo.list(&format!("{wal}/{tli:08X}"))?.objects {
            let f = o.name;
            let (stem, is_index) = match (
                f.strip_suffix(".lz4"),
                crate::archive::index_object_stem(&f),
            ) {
                (Some(s), _) => (s, false),
                (_, Some(s)) => (s, true),
                _ => continue,
            };
            let Ok(n) = stem.parse::<WalFileName>() else {
                continue;
            };
            let Some(segno) = n
                .segno(seg_size)
                .filter(|_| n.is_segment() && n.tli() == tli)
            else {
                continue;
            };
            if is_index {
                indexed.insert(segno);
            } else {
                segs.insert(segno, n);
            }
        }
        scan.segments += segs.len() as u64;
        scan.unindexed += segs.keys().filter(|s| !indexed.contains(s)).count() as u64;
        scan.gaps += segs
            .keys()
            .zip(segs.keys().skip(1))
            .filter(|(a, b)| **b > **a + 1)
            .count() as u64;
        let Some((&last, name)) = segs.iter().next_back() else {
            continue;
        };
        let at = ar.read_meta(name)?.archived_at;
        scan.last_archived_at = scan.last_archived_at.max(Some(at));
        // Timelines are in ascending order: the last one with segments is the newest.
        scan.newest_end = Some((last + 1) * u64::from(seg_size));
        for &segno in segs.keys().rev().take(COMMIT_LOOKBACK) {
            if let crate::archive::IndexState::Indexed(ix)
            | crate::archive::IndexState::Pending(ix) = ar.index_state(tli, segno)?
            {
                if let Some(t) = ix.last_commit_time {
                    scan.latest_commit = scan.latest_commit.max(Some(t));
                    break;
                }
            }
        }
    }
    Ok(scan)
}

/// Per-mode newest successful backup, counts by status, and the earliest PITR point.
fn backup_metrics(out: &mut Out, instance: &str, backups: &[BackupMeta]) -> Result<()> {
    let inst = || ("instance", instance.to_string());
    let mut counts: BTreeMap<&str, u64> = [
        Status::Ok,
        Status::Running,
        Status::Error,
        Status::Corrupt,
        Status::Orphan,
    ]
    .iter()
    .map(|s| (status_label(*s), 0))
    .collect();
    // Newest successful backup per mode, by end time.
    let mut newest: BTreeMap<&str, (i64, i64, u64)> = BTreeMap::new();
    let mut earliest: Option<i64> = None;
    for b in backups {
        let status = b.effective_status();
        *counts.entry(status_label(status)).or_default() += 1;
        if status != Status::Ok {
            continue;
        }
        let Some(end) = b.end_time.as_deref() else {
            continue;
        };
        let end = meta::parse_time(end)?;
        let start = meta::parse_time(&b.start_time)?;
        let m = mode_label(b.mode);
        if newest.get(m).is_none_or(|(e, _, _)| end >= *e) {
            newest.insert(m, (end, end - start, b.data_bytes));
        }
        if let Some(r) = b.recovery_epoch {
            earliest = Some(earliest.map_or(r, |e| e.min(r)));
        }
    }
    for (m, (end, dur, bytes)) in newest {
        let l = vec![inst(), ("mode", m.to_string())];
        out.add(
            "walnut_backup_last_success_timestamp_seconds",
            l.clone(),
            end as f64,
        );
        out.add("walnut_backup_last_duration_seconds", l.clone(), dur as f64);
        out.add("walnut_backup_last_size_bytes", l, bytes as f64);
    }
    for (s, n) in counts {
        out.add(
            "walnut_backups",
            vec![inst(), ("status", s.to_string())],
            n as f64,
        );
    }
    if let Some(e) = earliest {
        out.add(
            "walnut_pitr_earliest_timestamp_seconds",
            vec![inst()],
            e as f64,
        );
    }
    Ok(())
}

/// The server's current WAL position (on a standby, the last WAL received).
fn current_wal_lsn(conn: &ConnParams, cfg: &InstanceConfig) -> Result<Lsn> {
    let mut s = crate::server::connect(conn, cfg)?;
    let sysid = s.system_identifier()?;
    if sysid != cfg.system_id {
        return Err(Error::server(format!(
            "server's system identifier {sysid} is not instance \"{}\"'s {}",
            cfg.name, cfg.system_id
        )));
    }
    let row = s.client().query_one(
        "select (case when pg_is_in_recovery() then pg_last_wal_receive_lsn() \
         else pg_current_wal_lsn() end)::text",
        &[],
    )?;
    let v: Option<String> = row.get(0);
    v.ok_or_else(|| Error::server("the standby has received no WAL"))?
        .parse()
}

/// Total size of the objects below `prefix`, listed through the repository (a directory
/// or a bucket alike). Damaged entries (links, devices) are not objects and count nothing.
fn prefix_bytes(repo: &dyn crate::repo::Repo, prefix: &str) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec![prefix.to_string()];
    while let Some(p) = stack.pop() {
        let l = repo.list(&p)?;
        total += l.objects.iter().map(|o| o.size).sum::<u64>();
        stack.extend(l.prefixes.iter().map(|n| crate::repo::join(&p, n)));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_has_help_type_labels_and_a_final_newline() {
        let mut o = Out::new();
        o.add(
            "walnut_backups",
            vec![("instance", "a\"b".into()), ("status", "ok".into())],
            3.0,
        );
        o.add(
            "walnut_archive_lag_bytes",
            vec![("instance", "x".into())],
            0.5,
        );
        let t = o.render();
        assert!(t.contains("# TYPE walnut_backups gauge\n"));
        assert!(t.contains("walnut_backups{instance=\"a\\\"b\",status=\"ok\"} 3\n"));
        assert!(t.contains("walnut_archive_lag_bytes{instance=\"x\"} 0.5\n"));
        assert!(t.ends_with('\n'));
        assert!(
            !t.contains("walnut_catalog_bytes"),
            "empty families are left out"
        );
    }

    #[test]
    fn every_family_is_declared_once() {
        let mut names: Vec<&str> = FAMILIES.iter().map(|f| f.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len());
    }
}
