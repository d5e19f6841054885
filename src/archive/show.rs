//! `walnut show --archive`: what the archive holds, per timeline, as one report struct
//! (`crate::cli` renders it as a text table or as JSON).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{IndexState, WalArchive};
use crate::error::{Error, ErrorKind, Result};
use crate::types::{Lsn, TimeLineId, WalFileName};

#[derive(Clone, Debug, Default, Serialize)]
pub struct ArchiveReport {
    pub instance: String,
    pub system_id: u64,
    pub wal_segment_size: u32,
    /// Whether every file was decompressed and checked (`--verify`).
    pub verified: bool,
    pub timelines: Vec<TimelineReport>,
    /// `walnut receive`'s position, when its status file is in the receive spool (the
    /// default one or the one the receiver recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver: Option<ReceiverReport>,
}

/// What `walnut receive` last recorded in its status file (local state).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReceiverReport {
    /// The receive spool the status was read from.
    pub spool: String,
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

/// The receiver's report from the receive spool of `ar` (the default one, or the one a
/// receiver recorded: `crate::receive::spool_in_use`), when there is one.
pub fn receiver_report(ar: &WalArchive) -> Option<ReceiverReport> {
    let spool = match crate::receive::spool_in_use(ar) {
        Ok(s) => s?,
        Err(e) => {
            log::warn!("walnut receive's spool: {e}");
            return None;
        }
    };
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
        spool: spool.display().to_string(),
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
    /// Named restore points (`pg_create_restore_point`) recorded in the block indexes of
    /// this timeline's segments, in LSN order. Read from the indexes, not from WAL: every
    /// index format version records them, so none is missed while every segment is
    /// indexed (segments in `index_missing` are not searched).
    pub restore_points: Vec<RestorePointReport>,
}

/// A named restore point.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RestorePointReport {
    pub name: String,
    pub lsn: String,
    /// When it was created (ISO 8601 UTC).
    pub time: String,
}

fn restore_points(
    ix: &crate::index::SegmentIndex,
) -> impl Iterator<Item = RestorePointReport> + '_ {
    ix.other_events.iter().filter_map(|e| match e {
        crate::index::OtherEvent::RestorePoint { lsn, name, time } => Some(RestorePointReport {
            name: name.clone(),
            lsn: lsn.to_string(),
            time: pg_time_to_iso(*time),
        }),
        _ => None,
    })
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
                                t.restore_points.extend(restore_points(&ix));
                            }
                            IndexState::Pending(ix) => {
                                t.pending += 1;
                                last_commit = last_commit.max(ix.last_commit_time);
                                t.restore_points.extend(restore_points(&ix));
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

/// The window a backup can be restored to on one timeline: from its consistency point
/// to the end of the WAL that can be replayed after it without a gap or a segment
/// without a usable block index (the first such segment is named in `ends`).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Horizon {
    /// The timeline recovery follows (`recovery_target_timeline`): the backup's own, or a
    /// later one whose history branches off after the backup's consistency point.
    pub timeline: TimeLineId,
    /// The backup's consistency point (stop LSN) and time (its recovery_time).
    pub from_lsn: String,
    pub from_time: Option<String>,
    /// The end of the last replayable record.
    pub to_lsn: String,
    /// The latest commit time recorded in the indexes of that WAL (the latest
    /// recovery_target_time known to be reachable), "YYYY-MM-DD HH:MM:SS+00".
    pub to_time: Option<String>,
    /// Why the window ends there.
    pub ends: String,
}

/// PostgreSQL's epoch in Unix seconds.
/// The PostgreSQL epoch (2000-01-01 UTC) in Unix seconds.
pub(crate) const PG_EPOCH_UNIX: i64 = 946_684_800;

/// How far back from a window's last segment to look for its latest commit time.
const COMMIT_LOOKBACK: u64 = 256;

/// The PITR windows of each backup (OK backups with a stop LSN), by backup id: one for
/// its own timeline and one for each later timeline that branches off after its
/// consistency point and whose own segments the walk reaches.
///
/// Cheap enough for every `show`: which segments are archived and which have an index
/// object comes from the directory listings; only the last segment of each window (for
/// its end) and the few before it that have no commit (for the latest commit time) are
/// read. A damaged index file inside a window is found by `show --archive`, not here.
pub fn horizons(
    ar: &WalArchive,
    backups: &[crate::backup::meta::BackupMeta],
) -> Result<BTreeMap<String, Vec<Horizon>>> {
    use std::collections::BTreeSet;
    let seg_size = ar.seg_size();
    let tlis = ar.timelines()?;
    // per timeline: archived segments, and those with an index object
    let mut archived: BTreeMap<TimeLineId, BTreeSet<u64>> = BTreeMap::new();
    let mut indexed: BTreeMap<TimeLineId, BTreeSet<u64>> = BTreeMap::new();
    for &tli in &tlis {
        let a = archived.entry(tli).or_default();
        let x = indexed.entry(tli).or_default();
        for o in ar.listing(Some(tli))?.objects {
            let (stem, is_index) = match (
                o.name.strip_suffix(".lz4"),
                super::index_object_stem(&o.name),
            ) {
                (Some(s), _) => (s, false),
                (_, Some(s)) => (s, true),
                _ => continue,
            };
            let Ok(n) = stem.parse::<WalFileName>() else {
                continue;
            };
            if let (true, Some(sn)) = (n.is_segment() && n.tli() == tli, n.segno(seg_size)) {
                if is_index {
                    x.insert(sn);
                } else {
                    a.insert(sn);
                }
            }
        }
    }
    let mut histories: BTreeMap<TimeLineId, Vec<super::HistoryEntry>> = BTreeMap::new();
    for &tli in &tlis {
        match ar.timeline_history(tli) {
            Ok(h) => {
                histories.insert(tli, h);
            }
            Err(e) => {
                log::warn!("timeline {tli}: no usable history file, no PITR window on it: {e}")
            }
        }
    }
    // (end LSN, last commit time) of a segment's index, read once
    type EndAndCommit = Option<(Lsn, Option<i64>)>;
    let mut cache: std::collections::HashMap<(TimeLineId, u64), EndAndCommit> = Default::default();
    let mut read = |tli: TimeLineId, segno: u64| -> Option<(Lsn, Option<i64>)> {
        *cache
            .entry((tli, segno))
            .or_insert_with(|| match ar.index_state(tli, segno) {
                Ok(IndexState::Indexed(ix)) | Ok(IndexState::Pending(ix)) => {
                    Some((ix.end_lsn, ix.last_commit_time))
                }
                _ => None,
            })
    };
    let mut out = BTreeMap::new();
    for b in backups {
        if b.effective_status() != crate::backup::meta::Status::Ok {
            continue;
        }
        let Some(stop) = b.stop_lsn else { continue };
        let mut windows = Vec::new();
        for (&cur, history) in &histories {
            let own = cur == b.timeline;
            if !own && !crate::backup::plan::on_history(history, cur, b.timeline, stop) {
                continue;
            }
            let tli_of = |segno: u64| {
                crate::backup::plan::timeline_of_segment(history, cur, segno, seg_size)
            };
            // PostgreSQL reads the segment holding the last byte before `stop` first.
            let first = Lsn(stop.0.saturating_sub(1)).segno(seg_size);
            let last_any = history
                .iter()
                .map(|h| h.tli)
                .chain([cur])
                .filter_map(|t| archived.get(&t).and_then(|s| s.iter().next_back().copied()))
                .max()
                .unwrap_or(0);
            let has = |m: &BTreeMap<TimeLineId, BTreeSet<u64>>, t: TimeLineId, s: u64| {
                m.get(&t).is_some_and(|set| set.contains(&s))
            };
            let mut segno = first;
            let ends = loop {
                let tli = tli_of(segno);
                let name = WalFileName::segment(tli, segno, seg_size);
                if !has(&archived, tli, segno) {
                    break if segno > last_any {
                        format!("end of the archive (next segment {name})")
                    } else {
                        format!("gap: segment {name} is not in the archive")
                    };
                }
                if !has(&indexed, tli, segno) {
                    break format!("segment {name} has no block index");
                }
                segno += 1;
            };
            if segno == first {
                // not even the stop segment: the window is the consistency point alone
                windows.push(Horizon {
                    timeline: cur,
                    from_lsn: stop.to_string(),
                    from_time: b.recovery_time.clone(),
                    to_lsn: stop.to_string(),
                    to_time: None,
                    ends,
                });
                continue;
            }
            let last = segno - 1;
            if !own && tli_of(last) != cur {
                continue; // the same window as on the parent timeline
            }
            let to = match read(tli_of(last), last) {
                Some((end, _)) => end.max(stop),
                None => Lsn((last + 1) * u64::from(seg_size)),
            };
            let mut to_commit = None;
            let mut s = last;
            while s >= first && last - s < COMMIT_LOOKBACK {
                if let Some((_, Some(c))) = read(tli_of(s), s) {
                    to_commit = Some(c);
                    break;
                }
                if s == 0 {
                    break;
                }
                s -= 1;
            }
            windows.push(Horizon {
                timeline: cur,
                from_lsn: stop.to_string(),
                from_time: b.recovery_time.clone(),
                to_lsn: to.to_string(),
                to_time: to_commit.map(|us: i64| {
                    crate::backup::meta::format_utc(us.div_euclid(1_000_000) + PG_EPOCH_UNIX)
                }),
                ends,
            });
        }
        out.insert(b.id.clone(), windows);
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

/// Where `show --archive --churn` starts counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// Every archived segment.
    All,
    /// Segments whose WAL ends after this LSN.
    Lsn(Lsn),
    /// Per timeline, from the first segment with a commit at or after this time (Unix
    /// seconds).
    Time(i64),
}

/// One relation's churn: distinct blocks the WAL changed (all forks), as bytes.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ChurnRow {
    pub tablespace_oid: u32,
    pub database_oid: u32,
    pub relfilenode: u32,
    /// Names, when the server could be asked.
    pub database: Option<String>,
    pub schema: Option<String>,
    pub relation: Option<String>,
    /// "table", "index", "toast", ... and for an index or TOAST table the table it serves.
    pub kind: Option<String>,
    pub of_table: Option<String>,
    pub changed_blocks: u64,
    pub changed_bytes: u64,
    /// Segments whose index lists the relation.
    pub segments: u64,
    /// Created or dropped in the range.
    pub created: bool,
    pub dropped: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ChurnReport {
    pub instance: String,
    pub since: Option<String>,
    pub block_size: u32,
    pub segments_read: u64,
    /// Archived segments in the range without a usable index (their changes are not
    /// counted).
    pub segments_unindexed: Vec<String>,
    /// Whether the server answered for names.
    pub names: bool,
    pub relations: Vec<ChurnRow>,
}

/// The relations the archived WAL changed most since `since`, from the block indexes
/// (distinct blocks per relation, all forks, × `block_size`), largest first.
pub fn churn(
    ar: &WalArchive,
    instance: &str,
    since: Since,
    block_size: u32,
) -> Result<ChurnReport> {
    use crate::index::{BlockSet, RelFork};
    let seg_size = ar.seg_size();
    let mut agg: std::collections::HashMap<RelFork, (BlockSet, u64, bool, bool)> =
        Default::default();
    let mut rep = ChurnReport {
        instance: instance.to_string(),
        since: match since {
            Since::All => None,
            Since::Lsn(l) => Some(l.to_string()),
            Since::Time(t) => Some(crate::backup::meta::format_utc(t)),
        },
        block_size,
        ..Default::default()
    };
    let since_pg_us = match since {
        Since::Time(t) => Some((t - PG_EPOCH_UNIX).saturating_mul(1_000_000)),
        _ => None,
    };
    for tli in ar.timelines()? {
        let mut segnos: Vec<u64> = ar
            .listing(Some(tli))?
            .objects
            .iter()
            .filter_map(|o| o.name.strip_suffix(".lz4")?.parse::<WalFileName>().ok())
            .filter(|n| n.is_segment())
            .filter_map(|n| n.segno(seg_size))
            .collect();
        segnos.sort_unstable();
        let mut started = since_pg_us.is_none();
        for segno in segnos {
            if let Since::Lsn(l) = since {
                if Lsn((segno + 1) * u64::from(seg_size)) <= l {
                    continue;
                }
            }
            let name = WalFileName::segment(tli, segno, seg_size);
            let ix = match ar.index_state(tli, segno) {
                Ok(IndexState::Indexed(ix)) | Ok(IndexState::Pending(ix)) => ix,
                Ok(IndexState::NotArchived) => continue,
                Ok(IndexState::Missing(_)) | Err(_) => {
                    if started {
                        rep.segments_unindexed.push(name.to_string());
                    }
                    continue;
                }
            };
            if !started {
                match (ix.last_commit_time, since_pg_us) {
                    (Some(c), Some(s)) if c >= s => started = true,
                    _ => continue,
                }
            }
            rep.segments_read += 1;
            for (k, f) in &ix.forks {
                let e = agg.entry(*k).or_default();
                e.0.union_with(&f.blocks);
                e.1 += 1;
                e.2 |= f.created;
                e.3 |= f.dropped;
            }
        }
    }
    let mut rels: BTreeMap<(u32, u32, u32), ChurnRow> = BTreeMap::new();
    for (k, (blocks, segs, created, dropped)) in agg {
        let r = rels
            .entry((k.spc, k.db, k.rel))
            .or_insert_with(|| ChurnRow {
                tablespace_oid: k.spc,
                database_oid: k.db,
                relfilenode: k.rel,
                ..Default::default()
            });
        r.changed_blocks += blocks.len() as u64;
        r.segments = r.segments.max(segs);
        r.created |= created;
        r.dropped |= dropped;
    }
    let mut v: Vec<ChurnRow> = rels
        .into_values()
        .map(|mut r| {
            r.changed_bytes = r.changed_blocks * u64::from(block_size);
            r
        })
        .collect();
    v.sort_by(|a, b| {
        b.changed_bytes
            .cmp(&a.changed_bytes)
            .then((a.database_oid, a.relfilenode).cmp(&(b.database_oid, b.relfilenode)))
    });
    rep.relations = v;
    Ok(rep)
}

/// Fills in database, schema and relation names from the server (connection settings as
/// `backup` takes them). Relations the server no longer has keep their OIDs only.
pub fn churn_names(
    rep: &mut ChurnReport,
    conn: &crate::server::ConnParams,
    cfg: &crate::catalog::InstanceConfig,
) -> Result<()> {
    let mut s = crate::server::connect(conn, cfg)?;
    let sysid = s.system_identifier()?;
    if sysid != cfg.system_id {
        return Err(Error::server(format!(
            "the server's system identifier {sysid} is not instance \"{}\"'s {}",
            cfg.name, cfg.system_id
        )));
    }
    let dbs: Vec<(u32, String, u32)> = s
        .client()
        .query(
            "select oid, datname, dattablespace from pg_database where datallowconn",
            &[],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    drop(s);
    type Names = std::collections::HashMap<(u32, u32), (String, String, String, Option<String>)>;
    let query = "select pg_relation_filenode(c.oid), c.reltablespace, c.relisshared, n.nspname, c.relname, \
                 case c.relkind when 'r' then 'table' when 'i' then 'index' when 't' then 'toast' \
                   when 'm' then 'materialized view' when 'S' then 'sequence' when 'p' then 'partitioned table' \
                   when 'I' then 'partitioned index' else c.relkind::text end, \
                 coalesce(quote_ident(tn.nspname) || '.' || quote_ident(t.relname), \
                          quote_ident(on_.nspname) || '.' || quote_ident(o.relname)) \
                 from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                 left join pg_index i on i.indexrelid = c.oid \
                 left join pg_class t on t.oid = i.indrelid \
                 left join pg_namespace tn on tn.oid = t.relnamespace \
                 left join pg_class o on o.reltoastrelid = c.oid and c.relkind = 't' \
                 left join pg_namespace on_ on on_.oid = o.relnamespace \
                 where pg_relation_filenode(c.oid) is not null";
    let mut shared: Names = Default::default();
    let mut named = false;
    for (oid, datname, dattbs) in &dbs {
        let wanted = rep
            .relations
            .iter()
            .any(|r| r.database_oid == *oid || (r.database_oid == 0 && shared.is_empty()));
        if !wanted {
            continue;
        }
        let p = crate::server::ConnParams {
            dbname: Some(datname.clone()),
            ..conn.clone()
        };
        let mut c = match crate::server::connect(&p, cfg) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("database \"{datname}\": no names: {e}");
                continue;
            }
        };
        let mut names: Names = Default::default();
        for r in c.client().query(query, &[])? {
            let node: u32 = r.get(0);
            let tbs: u32 = r.get(1);
            let is_shared: bool = r.get(2);
            let v = (
                r.get::<_, String>(3),
                r.get::<_, String>(4),
                r.get::<_, String>(5),
                r.get::<_, Option<String>>(6),
            );
            if is_shared {
                shared.insert((1664, node), v);
            } else {
                names.insert((if tbs == 0 { *dattbs } else { tbs }, node), v);
            }
        }
        named = true;
        for r in rep.relations.iter_mut().filter(|r| r.database_oid == *oid) {
            r.database = Some(datname.clone());
            if let Some((sch, rel, kind, of)) = names.get(&(r.tablespace_oid, r.relfilenode)) {
                r.schema = Some(sch.clone());
                r.relation = Some(rel.clone());
                r.kind = Some(kind.clone());
                r.of_table = of.clone();
            }
        }
    }
    for r in rep.relations.iter_mut().filter(|r| r.database_oid == 0) {
        if let Some((sch, rel, kind, of)) = shared.get(&(r.tablespace_oid, r.relfilenode)) {
            r.schema = Some(sch.clone());
            r.relation = Some(rel.clone());
            r.kind = Some(kind.clone());
            r.of_table = of.clone();
        }
    }
    rep.names = named;
    Ok(())
}
