//! `walnut show --archive`: what the archive holds, per timeline, as one report struct
//! (`crate::cli` renders it as a text table or as JSON).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{IndexState, WalArchive};
use crate::error::{Error, ErrorKind, Result};
use crate::types::{TimeLineId, WalFileName};

#[derive(Clone, Debug, Default, Serialize)]
pub struct ArchiveReport {
    pub instance: String,
    pub system_id: u64,
    pub wal_segment_size: u32,
    /// Whether every file was decompressed and checked (`--verify`).
    pub verified: bool,
    pub timelines: Vec<TimelineReport>,
    /// `walnut receive`'s position, when its status file is in the default receive spool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver: Option<ReceiverReport>,
}

/// What `walnut receive` last recorded in its status file (local state).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReceiverReport {
    pub slot: String,
    pub timeline: TimeLineId,
    pub flushed_lsn: String,
    pub server_wal_end: String,
    /// Bytes the server had that were not flushed here yet, as of the last message.
    pub lag_bytes: Option<u64>,
    pub last_message_time: Option<String>,
    /// Seconds since the last message from the server.
    pub last_message_age_seconds: Option<f64>,
    pub synchronous: bool,
    pub pid: u32,
    /// Whether a receiver holds the spool's lock now.
    pub running: bool,
    /// `streaming`, `reconnecting` or `stopped`, as last recorded.
    pub state: String,
}

/// The receiver's report from the default receive spool of `ar`, when there is one.
pub fn receiver_report(ar: &WalArchive) -> Option<ReceiverReport> {
    let spool = ar.receive_spool()?;
    let st = match crate::receive::read_status(&spool) {
        Ok(s) => s?,
        Err(e) => {
            log::warn!("walnut receive's status: {e}");
            return None;
        }
    };
    let lsn = |s: &str| s.parse::<crate::types::Lsn>().ok();
    let lag_bytes = match (lsn(&st.server_wal_end), lsn(&st.flushed_lsn)) {
        (Some(end), Some(f)) => Some(end.0.saturating_sub(f.0)),
        _ => None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    Some(ReceiverReport {
        running: crate::receive::is_running(&spool),
        slot: st.slot,
        timeline: st.timeline,
        flushed_lsn: st.flushed_lsn,
        server_wal_end: st.server_wal_end,
        lag_bytes,
        last_message_time: st.last_message_time,
        last_message_age_seconds: st.last_message_unix.map(|t| (now - t).max(0.0)),
        synchronous: st.synchronous,
        pid: st.pid,
        state: st.state,
    })
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
        receiver: receiver_report(ar),
    };
    // An unreadable archive is an error, never an empty one.
    let top = ar.listing(None)?;
    let mut tlis: Vec<TimeLineId> = ar.timelines()?;
    // A timeline "directory" that is a link (or not a directory): reported, never followed.
    let mut damaged_tlis: Vec<(TimeLineId, String)> = top
        .damaged
        .iter()
        .chain(top.objects.iter().map(|o| &o.name))
        .filter(|n| n.len() == 8)
        .filter_map(|n| u32::from_str_radix(n, 16).ok().map(|t| (t, n.clone())))
        .collect();
    tlis.extend(damaged_tlis.iter().map(|(t, _)| *t));
    tlis.sort_unstable();
    tlis.dedup();
    for tli in tlis {
        if let Some(i) = damaged_tlis.iter().position(|(t, _)| *t == tli) {
            let (_, n) = damaged_tlis.swap_remove(i);
            out.timelines.push(TimelineReport {
                timeline: tli,
                corrupt: vec![(
                    n.clone(),
                    format!(
                        "\"{}\" is a link or not a directory",
                        ar.dir().join(&n).display()
                    ),
                )],
                ..Default::default()
            });
            continue;
        }
        let listing = ar.listing(Some(tli))?;
        let mut sizes: BTreeMap<WalFileName, u64> = BTreeMap::new();
        let mut names: Vec<WalFileName> = Vec::new();
        for o in &listing.objects {
            if let Some(n) = o.name.strip_suffix(".lz4").and_then(|s| s.parse().ok()) {
                names.push(n);
                sizes.insert(n, o.size);
            }
        }
        // A link or other odd file under a file's name: reported as damaged by its read.
        for d in &listing.damaged {
            if let Some(n) = d.strip_suffix(".lz4").and_then(|s| s.parse().ok()) {
                names.push(n);
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
            t.compressed_bytes += sizes.get(n).copied().unwrap_or(0);
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
