//! `walnut show --archive`: what the archive holds, per timeline, from one set of structs
//! printed as a text table or as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;

use serde::Serialize;

use super::{IndexState, WalArchive};
use crate::catalog::Catalog;
use crate::cli::{OutputFormat, ShowArgs};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::types::{TimeLineId, WalFileName};

#[derive(Clone, Debug, Default, Serialize)]
pub struct ArchiveReport {
    pub instance: String,
    pub system_id: u64,
    pub wal_segment_size: u32,
    /// Whether every file was decompressed and checked (`--verify`).
    pub verified: bool,
    pub timelines: Vec<TimelineReport>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TimelineReport {
    pub timeline: TimeLineId,
    pub first_segment: Option<String>,
    pub last_segment: Option<String>,
    pub segments: u64,
    /// Ranges of missing segments between first and last: (first missing, last missing).
    pub gaps: Vec<(String, String)>,
    pub partial_files: Vec<String>,
    pub backup_files: Vec<String>,
    pub history_file: bool,
    /// Original bytes of all files of the timeline.
    pub original_bytes: u64,
    /// Bytes on disk of the archived (compressed) files.
    pub compressed_bytes: u64,
    pub indexed: u64,
    pub pending: u64,
    /// Segments with no usable index, with the reason.
    pub index_missing: Vec<(String, String)>,
    /// Files whose header (or, with --verify, content) fails verification: damaged, a
    /// link or non-regular file, or another cluster's or another segment's file.
    pub corrupt: Vec<(String, String)>,
    /// Files that could not be read (I/O errors, permissions): neither absent nor known
    /// damaged.
    pub unreadable: Vec<(String, String)>,
    /// Commit time of the last commit/abort record in the indexes (ISO 8601 UTC).
    pub latest_restorable_time: Option<String>,
}

impl TimelineReport {
    /// Files as [`corrupt`](Self::corrupt) or [`unreadable`](Self::unreadable) by the
    /// kind of error.
    fn problem(&mut self, n: &WalFileName, e: Error) {
        let entry = (n.to_string(), e.to_string());
        match e.kind() {
            ErrorKind::Corruption | ErrorKind::NotFound => self.corrupt.push(entry),
            _ => self.unreadable.push(entry),
        }
    }
}

/// Builds the report; `verify` decompresses and checks every file.
pub fn report(ar: &WalArchive, instance: &str, verify: bool) -> Result<ArchiveReport> {
    let cfg = ar.config();
    let seg_size = cfg.wal_segment_size;
    let mut out = ArchiveReport {
        instance: instance.to_string(),
        system_id: cfg.system_id,
        wal_segment_size: seg_size,
        verified: verify,
        timelines: Vec::new(),
    };
    let mut tlis: Vec<TimeLineId> = Vec::new();
    // An unreadable archive is an error, never an empty one.
    for e in fs::read_dir(ar.dir()).ctx("read directory", ar.dir())? {
        let e = e.ctx("read directory", ar.dir())?;
        let n = e.file_name().to_string_lossy().into_owned();
        // A timeline directory that is a link is listed: each of its files then reports
        // as damaged (they are read without following links).
        let kind = e.file_type().ctx("stat", &e.path())?;
        if n.len() == 8 && (kind.is_dir() || kind.is_symlink()) {
            if let Ok(t) = u32::from_str_radix(&n, 16) {
                tlis.push(t);
            }
        }
    }
    tlis.sort_unstable();
    for tli in tlis {
        let dir = ar.tli_dir(tli);
        let mut names: Vec<WalFileName> = Vec::new();
        for e in fs::read_dir(&dir).ctx("read directory", &dir)? {
            let e = e.ctx("read directory", &dir)?;
            let f = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = f.strip_suffix(".lz4") {
                if let Ok(n) = stem.parse::<WalFileName>() {
                    names.push(n);
                }
            }
        }
        names.sort();
        let mut t = TimelineReport {
            timeline: tli,
            ..Default::default()
        };
        let mut segnos: BTreeMap<u64, WalFileName> = BTreeMap::new();
        let mut last_commit: Option<i64> = None;
        for n in &names {
            let p = ar.data_path(n);
            t.compressed_bytes += fs::symlink_metadata(&p).map(|m| m.len()).unwrap_or(0);
            let meta = if verify {
                ar.read_with_meta(n).map(|(m, _)| m)
            } else {
                ar.read_meta(n)
            };
            match meta {
                Ok(m) => t.original_bytes += m.size,
                Err(e) => t.problem(n, e),
            }
            match n {
                WalFileName::Segment { .. } => {
                    if let Some(s) = n.segno(seg_size) {
                        segnos.insert(s, *n);
                        let state = match ar.index_state(tli, s) {
                            Ok(st) => st,
                            Err(e) => {
                                t.problem(n, e);
                                continue;
                            }
                        };
                        match state {
                            IndexState::Indexed(ix) => {
                                t.indexed += 1;
                                last_commit = last_commit.max(ix.last_commit_time);
                            }
                            IndexState::Pending(ix) => {
                                t.pending += 1;
                                last_commit = last_commit.max(ix.last_commit_time);
                            }
                            IndexState::Missing(r) => t.index_missing.push((n.to_string(), r)),
                            IndexState::NotArchived => {}
                        }
                    }
                }
                WalFileName::Partial { .. } => t.partial_files.push(n.to_string()),
                WalFileName::Backup { .. } => t.backup_files.push(n.to_string()),
                WalFileName::History { .. } => t.history_file = true,
            }
        }
        t.segments = segnos.len() as u64;
        t.first_segment = segnos.values().next().map(|n| n.to_string());
        t.last_segment = segnos.values().next_back().map(|n| n.to_string());
        let mut prev: Option<u64> = None;
        for &s in segnos.keys() {
            if let Some(p) = prev {
                if s > p + 1 {
                    t.gaps.push((
                        WalFileName::segment(tli, p + 1, seg_size).to_string(),
                        WalFileName::segment(tli, s - 1, seg_size).to_string(),
                    ));
                }
            }
            prev = Some(s);
        }
        t.latest_restorable_time = last_commit.map(pg_time_to_iso);
        out.timelines.push(t);
    }
    Ok(out)
}

/// PostgreSQL timestamp (µs since 2000-01-01 00:00:00 UTC) as ISO 8601 UTC.
pub fn pg_time_to_iso(us: i64) -> String {
    const PG_EPOCH_UNIX: i64 = 946_684_800;
    let secs = us.div_euclid(1_000_000) + PG_EPOCH_UNIX;
    let micros = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
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
    }
    s
}

pub fn run(args: ShowArgs) -> Result<i32> {
    let instance = args
        .instance
        .clone()
        .ok_or_else(|| Error::invalid("show --archive needs --instance"))?;
    let catalog = Catalog::open(&args.catalog.catalog)?;
    let ar = WalArchive::open(&catalog, &instance)?;
    let r = report(&ar, &instance, args.verify)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_epoch_times() {
        assert_eq!(pg_time_to_iso(0), "2000-01-01T00:00:00.000000Z");
        // 2026-11-23 19:49:03.5 UTC = unix 1795463343.5
        let us = (1_795_463_343i64 - 946_684_800) * 1_000_000 + 500_000;
        assert_eq!(pg_time_to_iso(us), "2026-11-23T19:49:03.500000Z");
        assert_eq!(pg_time_to_iso(-1), "1999-12-31T23:59:59.999999Z");
    }
}
