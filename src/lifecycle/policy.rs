//! The pure planning of retention: which backups a policy keeps, and which WAL objects no
//! kept backup needs. Nothing here reads or writes the catalog, so every rule is unit-tested
//! over synthetic catalogs.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::archive::HistoryEntry;
use crate::backup::meta::{self, BackupMeta, Mode, Status};
use crate::error::{Error, Result};
use crate::types::{Lsn, TimeLineId};

use super::records::{Pin, Settings};

/// What happens to one backup, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub mode: String,
    pub status: String,
    pub timeline: TimeLineId,
    pub start_lsn: String,
    pub keep: bool,
    pub reason: String,
}

fn valid(b: &BackupMeta) -> bool {
    b.effective_status() == Status::Ok
}

/// When a backup can first be restored to: its recovery time, else its end, else its start.
fn recovery_epoch(b: &BackupMeta) -> Option<i64> {
    b.recovery_epoch
        .or_else(|| b.end_time.as_deref().and_then(|t| meta::parse_time(t).ok()))
        .or_else(|| meta::parse_time(&b.start_time).ok())
}

/// Index of the first backup redundancy `n` keeps (the `n`th newest valid FULL); 0 (keep
/// all) when fewer than `n` valid FULL backups exist.
fn redundancy_boundary(list: &[BackupMeta], n: u32) -> usize {
    let mut count = 0;
    for (i, b) in list.iter().enumerate().rev() {
        if b.mode == Mode::Full && valid(b) {
            count += 1;
            if count >= n {
                return i;
            }
        }
    }
    0
}

/// Index of the first backup window `days` keeps: the newest valid FULL whose recovery time
/// is at or before `now - days`; 0 (keep all) when there is none.
fn window_boundary(list: &[BackupMeta], days: u32, now: i64) -> usize {
    let threshold = now - i64::from(days) * 86400;
    list.iter()
        .enumerate()
        .rev()
        .find(|(_, b)| {
            b.mode == Mode::Full && valid(b) && recovery_epoch(b).is_some_and(|t| t <= threshold)
        })
        .map_or(0, |(i, _)| i)
}

/// The retention decision for every backup of `list` (oldest first, as
/// [`meta::scan`] sorts), under `policy` at time `now`.
///
/// Redundancy N keeps the N newest valid FULL backups and everything after the oldest of
/// them; window D keeps the newest valid FULL whose recovery time is at or before now − D
/// and everything after it; with both, a backup goes only when both let it go. Then a
/// pinned or RUNNING backup stays, and every ancestor of a kept backup stays.
pub fn plan_expired(
    list: &[BackupMeta],
    pins: &HashMap<String, Pin>,
    policy: &Settings,
    now: i64,
) -> Result<Vec<Decision>> {
    if policy.retention_redundancy.is_none() && policy.retention_window.is_none() {
        return Err(Error::invalid(
            "no retention policy: give --retention-redundancy or --retention-window, or store them with set-config",
        ));
    }
    let red = policy
        .retention_redundancy
        .map(|n| redundancy_boundary(list, n));
    let win = policy
        .retention_window
        .map(|d| window_boundary(list, d, now));
    let mut keep: Vec<Option<String>> = list
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let by_red = red.map(|r| i >= r);
            let by_win = win.map(|w| i >= w);
            if by_red == Some(true) {
                Some("within redundancy".to_string())
            } else if by_win == Some(true) {
                Some("within window".to_string())
            } else if pins.get(&b.id).is_some_and(|p| p.pinned_at(now)) {
                Some("pinned".to_string())
            } else if b.effective_status() == Status::Running {
                Some("running".to_string())
            } else {
                None
            }
        })
        .collect();
    // Ancestors of kept backups stay (walk each kept backup's chain).
    let index: HashMap<&str, usize> = list
        .iter()
        .enumerate()
        .map(|(i, b)| (b.id.as_str(), i))
        .collect();
    for i in (0..list.len()).rev() {
        if keep[i].is_none() {
            continue;
        }
        let mut cur = list[i].parent_id.as_deref();
        let mut steps = 0;
        while let Some(p) = cur {
            let Some(&j) = index.get(p) else { break };
            steps += 1;
            if steps > list.len() {
                break;
            }
            if keep[j].is_none() {
                keep[j] = Some(format!("ancestor of kept {}", list[i].id));
            }
            cur = list[j].parent_id.as_deref();
        }
    }
    Ok(list
        .iter()
        .zip(keep)
        .map(|(b, k)| Decision {
            id: b.id.clone(),
            mode: b.mode.to_string(),
            status: b.effective_status().to_string(),
            timeline: b.timeline,
            start_lsn: b.start_lsn.to_string(),
            keep: k.is_some(),
            reason: k.unwrap_or_else(|| "expired".to_string()),
        })
        .collect())
}

/// `delete -i ID`: the backup and its descendants, newest first (the order they go in).
/// Refused when one of them is RUNNING or pinned.
pub fn plan_delete_id(
    list: &[BackupMeta],
    pins: &HashMap<String, Pin>,
    id: &str,
    now: i64,
) -> Result<Vec<String>> {
    meta::find(list, id)?;
    let mut out = Vec::new();
    for b in list.iter().rev() {
        if !meta::descends_from(list, b, id) {
            continue;
        }
        if b.effective_status() == Status::Running {
            return Err(Error::refused(format!(
                "backup {} is RUNNING; it cannot be deleted (with {id}) while it runs",
                b.id
            )));
        }
        if let Some(p) = pins.get(&b.id).filter(|p| p.pinned_at(now)) {
            return Err(Error::refused(format!(
                "backup {} is pinned until {}; unpin it first (set-backup -i {} --ttl 0)",
                b.id,
                p.expire_time.as_deref().unwrap_or("?"),
                b.id
            )));
        }
        out.push(b.id.clone());
    }
    Ok(out)
}

/// A kept backup as the WAL purge sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalKeeper {
    pub id: String,
    pub tli: TimeLineId,
    pub start: Lsn,
    /// `None`: unknown (the backup never finished): everything from `start` stays.
    pub stop: Option<Lsn>,
    /// Point-in-time recovery from this backup must stay possible: WAL from its start on
    /// its timeline and every timeline that branches off its line after it stays.
    pub pitr: bool,
}

/// The kept backups with their WAL needs, or `Err(reason)` when nothing may be purged:
/// fewer valid backups exist than the policy names.
///
/// With `wal_depth` N the PITR anchor is the Nth newest valid unpinned kept backup (pins
/// count for nothing here); without it, the oldest kept backup. Backups from the anchor on
/// keep PITR; older kept ones keep exactly their start–stop range.
pub fn wal_keepers(
    list: &[BackupMeta],
    decisions: &[Decision],
    pins: &HashMap<String, Pin>,
    policy: &Settings,
    now: i64,
) -> std::result::Result<Vec<WalKeeper>, String> {
    let kept: Vec<&BackupMeta> = list
        .iter()
        .filter(|b| decisions.iter().any(|d| d.id == b.id && d.keep))
        .collect();
    if kept.is_empty() {
        return Err("no backup is kept".into());
    }
    if let Some(n) = policy.retention_redundancy {
        let fulls = list
            .iter()
            .filter(|b| b.mode == Mode::Full && valid(b))
            .count();
        if fulls < n as usize {
            return Err(format!(
                "{fulls} valid FULL backups exist, fewer than the redundancy of {n}"
            ));
        }
    }
    let anchor = match policy.wal_depth {
        Some(n) => {
            let counted: Vec<usize> = kept
                .iter()
                .enumerate()
                .filter(|(_, b)| valid(b) && !pins.get(&b.id).is_some_and(|p| p.pinned_at(now)))
                .map(|(i, _)| i)
                .collect();
            if counted.len() < n as usize {
                return Err(format!(
                    "{} valid unpinned backups exist, fewer than the WAL depth of {n}",
                    counted.len()
                ));
            }
            counted[counted.len() - n as usize]
        }
        None => 0,
    };
    Ok(kept
        .iter()
        .enumerate()
        .map(|(i, b)| WalKeeper {
            id: b.id.clone(),
            tli: b.timeline,
            start: b.start_lsn,
            stop: b.stop_lsn,
            pitr: i >= anchor,
        })
        .collect())
}

/// What the WAL purge removes on one timeline.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TimelinePurge {
    pub timeline: TimeLineId,
    /// Object names (within the timeline's prefix), in the order they go: oldest segment
    /// first, a segment's index objects before its data.
    pub objects: Vec<String>,
    /// The purged segment ranges, "FIRST-LAST" segment names.
    pub ranges: Vec<String>,
}

/// Timeline `t`'s lineage: `(ancestor tli, where it ended)` oldest first, from `histories`.
fn lineage(histories: &BTreeMap<TimeLineId, Vec<HistoryEntry>>, t: TimeLineId) -> &[HistoryEntry] {
    histories.get(&t).map_or(&[], |v| v.as_slice())
}

/// Whether timeline `t` continues the line of `k` past `k.start`: `t` is `k`'s timeline, or
/// descends from it through a switch at or after `k.start`.
fn continues(
    histories: &BTreeMap<TimeLineId, Vec<HistoryEntry>>,
    t: TimeLineId,
    k: &WalKeeper,
) -> bool {
    t == k.tli
        || lineage(histories, t)
            .iter()
            .any(|h| h.tli == k.tli && h.switchpoint >= k.start)
}

/// Parses an archive object name: `Some((tli, Some(segno)))` for a segment's objects
/// (data, partial, backup history, index objects), `Some((tli, None))` for a timeline
/// history file, `None` for anything else (left alone).
fn classify(name: &str, seg_size: u32) -> Option<(TimeLineId, Option<u64>)> {
    let hex8 = |s: &str| {
        (s.len() == 8 && s.bytes().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    if let Some(t) = name.strip_suffix(".history.lz4") {
        return hex8(t).map(|t| (t, None));
    }
    let (tli, log, seg) = (
        hex8(name.get(0..8)?)?,
        hex8(name.get(8..16)?)?,
        hex8(name.get(16..24)?)?,
    );
    let rest = name.get(24..)?;
    let known = rest == ".lz4"
        || rest == ".partial.lz4"
        || [".idx", ".idx-pending", ".idx-rebuilt", ".idx-missing"].contains(&rest)
        || (rest.ends_with(".backup.lz4") && rest.len() == ".XXXXXXXX.backup.lz4".len());
    if !known {
        return None;
    }
    let per = crate::types::segments_per_xlogid(seg_size);
    Some((tli, Some(u64::from(log) * per + u64::from(seg))))
}

/// Order of a segment's objects when purged: index objects first, the data last, so that a
/// crash never leaves an index without its segment.
fn purge_rank(name: &str) -> u8 {
    if name.contains(".idx") {
        0
    } else if name.ends_with(".backup.lz4") || name.ends_with(".partial.lz4") {
        1
    } else {
        2
    }
}

/// The WAL objects no kept backup needs, per timeline (`files`: each timeline's object
/// names; `histories`: each timeline's parsed history, read from the archive). Keeps, on
/// each timeline `t`:
/// - every segment at or after the start of a PITR keeper whose line `t` continues;
/// - every keeper's own start–stop segments on its timeline (to the end when unknown);
/// - the history file of every timeline on one line with a keeper's timeline.
///
/// Timelines are related only through `histories`, never by their numbers.
pub fn plan_wal(
    seg_size: u32,
    histories: &BTreeMap<TimeLineId, Vec<HistoryEntry>>,
    files: &BTreeMap<TimeLineId, Vec<String>>,
    keepers: &[WalKeeper],
) -> Vec<TimelinePurge> {
    let seg = |l: Lsn| l.segno(seg_size);
    let mut out = Vec::new();
    for (&t, names) in files {
        // the lowest segment from which everything stays, and exact ranges below it
        let keep_from = keepers
            .iter()
            .filter(|k| k.pitr && continues(histories, t, k))
            .map(|k| seg(k.start))
            .min();
        let ranges: Vec<(u64, u64)> = keepers
            .iter()
            .filter(|k| k.tli == t)
            .map(|k| (seg(k.start), k.stop.map_or(u64::MAX, seg)))
            .collect();
        // a keeper's timeline and those it descends through; for PITR keepers also the
        // timelines their restore to "latest" continues into
        let history_kept = keepers.iter().any(|k| {
            t == k.tli
                || lineage(histories, k.tli).iter().any(|h| h.tli == t)
                || (k.pitr && continues(histories, t, k))
        });
        let mut doomed: Vec<(u64, u8, &String)> = Vec::new();
        for name in names {
            match classify(name, seg_size) {
                Some((ft, _)) if ft != t => {} // a foreign name: left alone
                Some((_, None)) if !history_kept => doomed.push((u64::MAX, 0, name)),
                Some((_, None)) => {}
                Some((_, Some(s))) => {
                    let kept = keep_from.is_some_and(|f| s >= f)
                        || ranges.iter().any(|&(a, b)| s >= a && s <= b);
                    if !kept {
                        doomed.push((s, purge_rank(name), name));
                    }
                }
                None => {}
            }
        }
        if doomed.is_empty() {
            continue;
        }
        doomed.sort();
        let mut p = TimelinePurge {
            timeline: t,
            ..Default::default()
        };
        let segs: BTreeSet<u64> = doomed
            .iter()
            .map(|d| d.0)
            .filter(|&s| s != u64::MAX)
            .collect();
        let mut run: Option<(u64, u64)> = None;
        let name = |s| crate::types::WalFileName::segment(t, s, seg_size).to_string();
        for s in segs {
            run = match run {
                Some((a, b)) if b + 1 == s => Some((a, s)),
                Some((a, b)) => {
                    p.ranges.push(format!("{}-{}", name(a), name(b)));
                    Some((s, s))
                }
                None => Some((s, s)),
            };
        }
        if let Some((a, b)) = run {
            p.ranges.push(format!("{}-{}", name(a), name(b)));
        }
        p.objects = doomed.into_iter().map(|d| d.2.clone()).collect();
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u32 = 16 << 20;
    const DAY: i64 = 86400;
    const NOW: i64 = 100 * DAY;

    /// A backup on timeline `tli`, starting in segment `start_seg`, stopping one segment
    /// later, recovery time `day` days after the epoch.
    fn b(
        id: &str,
        mode: Mode,
        parent: Option<&str>,
        tli: u32,
        start_seg: u64,
        day: i64,
    ) -> BackupMeta {
        BackupMeta {
            format: 2,
            timeline: tli,
            start_lsn: Lsn(start_seg * SEG as u64 + 40),
            stop_lsn: Some(Lsn((start_seg + 1) * SEG as u64 + 100)),
            start_time: meta::format_utc(day * DAY - 60),
            end_time: Some(meta::format_utc(day * DAY)),
            recovery_time: Some(meta::format_utc(day * DAY)),
            recovery_epoch: Some(day * DAY),
            wal_segment_size: SEG,
            ..meta::test_meta(id, mode, parent)
        }
    }

    fn month() -> Vec<BackupMeta> {
        use Mode::*;
        vec![
            b("F1", Full, None, 1, 10, 70),
            b("P1", Page, Some("F1"), 1, 20, 71),
            b("F2", Full, None, 1, 30, 80),
            b("P2", Page, Some("F2"), 1, 40, 81),
            b("F3", Full, None, 1, 50, 90),
            b("P3", Delta, Some("F3"), 1, 60, 91),
        ]
    }

    fn pol(r: Option<u32>, w: Option<u32>, d: Option<u32>) -> Settings {
        Settings {
            retention_redundancy: r,
            retention_window: w,
            wal_depth: d,
        }
    }

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter().filter(|x| x.keep).map(|x| x.id.as_str()).collect()
    }

    fn plan(list: &[BackupMeta], p: Settings) -> Vec<Decision> {
        plan_expired(list, &HashMap::new(), &p, NOW).unwrap()
    }

    #[test]
    fn redundancy_keeps_n_valid_fulls_and_dependents() {
        let l = month();
        assert_eq!(kept(&plan(&l, pol(Some(1), None, None))), ["F3", "P3"]);
        assert_eq!(
            kept(&plan(&l, pol(Some(2), None, None))),
            ["F2", "P2", "F3", "P3"]
        );
        // fewer valid FULLs than N: everything stays
        assert_eq!(kept(&plan(&l, pol(Some(4), None, None))).len(), 6);
    }

    #[test]
    fn an_invalid_full_never_counts() {
        let mut l = month();
        l[4].status = Status::Error; // F3
                                     // the newest valid FULL is F2: F2 and everything after it stays
        assert_eq!(
            kept(&plan(&l, pol(Some(1), None, None))),
            ["F2", "P2", "F3", "P3"]
        );
        l[4].status = Status::Corrupt;
        assert_eq!(
            kept(&plan(&l, pol(Some(1), None, None))),
            ["F2", "P2", "F3", "P3"]
        );
    }

    #[test]
    fn window_keeps_the_newest_full_at_or_before_the_boundary() {
        let l = month();
        // now - 15 days = day 85: F2 (day 80) is the newest FULL at or before it
        assert_eq!(
            kept(&plan(&l, pol(None, Some(15), None))),
            ["F2", "P2", "F3", "P3"]
        );
        // exactly at the boundary counts: now - 20 = day 80
        assert_eq!(
            kept(&plan(&l, pol(None, Some(20), None))),
            ["F2", "P2", "F3", "P3"]
        );
        // every backup older than the window: the newest FULL still stays (PITR to now - D)
        assert_eq!(kept(&plan(&l, pol(None, Some(1), None))), ["F3", "P3"]);
        // no FULL that old: everything stays
        assert_eq!(kept(&plan(&l, pol(None, Some(60), None))).len(), 6);
    }

    #[test]
    fn both_policies_delete_only_what_both_delete() {
        let l = month();
        // redundancy 1 would keep F3.., window 15 keeps F2..: the union is kept
        assert_eq!(
            kept(&plan(&l, pol(Some(1), Some(15), None))),
            ["F2", "P2", "F3", "P3"]
        );
        assert_eq!(kept(&plan(&l, pol(Some(3), Some(1), None))).len(), 6);
    }

    #[test]
    fn no_policy_is_an_error() {
        assert!(plan_expired(&month(), &HashMap::new(), &pol(None, None, None), NOW).is_err());
    }

    #[test]
    fn ancestors_of_kept_backups_stay() {
        use Mode::*;
        // a PAGE of F1 taken after F2: it keeps F1
        let mut l = month();
        l.insert(3, b("P1b", Page, Some("P1"), 1, 35, 80));
        let d = plan(&l, pol(Some(2), None, None));
        assert_eq!(kept(&d), ["F1", "P1", "F2", "P1b", "P2", "F3", "P3"]);
        assert!(d[0].reason.contains("ancestor of kept P1b"));
    }

    #[test]
    fn pinned_and_running_backups_and_their_ancestors_stay() {
        let mut l = month();
        let mut pins = HashMap::new();
        pins.insert(
            "P1".to_string(),
            Pin {
                expire_epoch: Some(NOW + 10),
                ..Default::default()
            },
        );
        pins.insert(
            "P2".to_string(),
            Pin {
                expire_epoch: Some(NOW - 10), // expired pin
                ..Default::default()
            },
        );
        let d = plan_expired(&l, &pins, &pol(Some(1), None, None), NOW).unwrap();
        assert_eq!(kept(&d), ["F1", "P1", "F3", "P3"]);
        l[3].status = Status::Running;
        let d = plan_expired(&l, &HashMap::new(), &pol(Some(1), None, None), NOW).unwrap();
        assert_eq!(kept(&d), ["F2", "P2", "F3", "P3"]);
    }

    #[test]
    fn delete_id_takes_descendants_newest_first_and_refuses_running_or_pinned() {
        let mut l = month();
        assert_eq!(
            plan_delete_id(&l, &HashMap::new(), "F2", NOW).unwrap(),
            ["P2", "F2"]
        );
        assert_eq!(
            plan_delete_id(&l, &HashMap::new(), "P3", NOW).unwrap(),
            ["P3"]
        );
        assert!(plan_delete_id(&l, &HashMap::new(), "nope", NOW).is_err());
        let mut pins = HashMap::new();
        pins.insert(
            "P2".to_string(),
            Pin {
                expire_epoch: Some(NOW + 1),
                ..Default::default()
            },
        );
        assert!(plan_delete_id(&l, &pins, "F2", NOW).is_err());
        l[3].status = Status::Running;
        let e = plan_delete_id(&l, &HashMap::new(), "F2", NOW).unwrap_err();
        assert!(e.to_string().contains("RUNNING"), "{e}");
    }

    fn seg_names(tli: u32, from: u64, to: u64) -> Vec<String> {
        let mut v = Vec::new();
        for s in from..=to {
            let n = crate::types::WalFileName::segment(tli, s, SEG).to_string();
            v.push(format!("{n}.lz4"));
            v.push(format!("{n}.idx"));
        }
        v
    }

    fn seg_of(name: &str) -> u64 {
        classify(name, SEG).unwrap().1.unwrap()
    }

    fn wal_plan(
        l: &[BackupMeta],
        p: Settings,
        files: &BTreeMap<u32, Vec<String>>,
        h: &BTreeMap<u32, Vec<HistoryEntry>>,
    ) -> std::result::Result<Vec<TimelinePurge>, String> {
        let d = plan(l, p.clone());
        let k = wal_keepers(l, &d, &HashMap::new(), &p, NOW)?;
        Ok(plan_wal(SEG, h, files, &k))
    }

    #[test]
    fn wal_before_the_oldest_kept_backup_goes_with_its_index() {
        let l = month();
        let files = BTreeMap::from([(1, seg_names(1, 5, 70))]);
        let p = wal_plan(&l, pol(Some(1), None, None), &files, &BTreeMap::new()).unwrap();
        assert_eq!(p.len(), 1);
        // F3 starts in segment 50: 5..=49 go, index objects before their segment
        let segs: BTreeSet<u64> = p[0].objects.iter().map(|n| seg_of(n)).collect();
        assert_eq!(segs, (5..50).collect());
        assert_eq!(p[0].objects.len(), 45 * 2);
        assert!(p[0].objects[0].ends_with(".idx") && p[0].objects[1].ends_with(".lz4"));
        assert_eq!(
            p[0].ranges,
            ["000000010000000000000005-000000010000000000000031"]
        );
    }

    #[test]
    fn wal_depth_keeps_pitr_from_the_nth_newest_and_exact_ranges_before() {
        let l = month();
        let files = BTreeMap::from([(1, seg_names(1, 5, 70))]);
        // redundancy 2 keeps F2 P2 F3 P3; depth 2 anchors at F3 (the 2nd newest valid)
        let p = wal_plan(&l, pol(Some(2), None, Some(2)), &files, &BTreeMap::new()).unwrap();
        let segs: BTreeSet<u64> = p[0].objects.iter().map(|n| seg_of(n)).collect();
        let mut want: BTreeSet<u64> = (5..50).collect();
        for s in [30, 31, 40, 41] {
            want.remove(&s); // F2 and P2 keep exactly start..=stop
        }
        assert_eq!(segs, want);
    }

    #[test]
    fn purge_nothing_while_fewer_backups_than_the_policy_names() {
        let l = month();
        let files = BTreeMap::from([(1, seg_names(1, 5, 70))]);
        assert!(wal_plan(&l, pol(Some(4), None, None), &files, &BTreeMap::new()).is_err());
        assert!(wal_plan(&l, pol(Some(1), None, Some(3)), &files, &BTreeMap::new()).is_err());
        // pins count for nothing in the depth
        let d = plan(&l, pol(Some(1), None, Some(2)));
        let mut pins = HashMap::new();
        pins.insert(
            "F3".to_string(),
            Pin {
                expire_epoch: Some(NOW + 1),
                ..Default::default()
            },
        );
        assert!(wal_keepers(&l, &d, &pins, &pol(Some(1), None, Some(2)), NOW).is_err());
    }

    #[test]
    fn timelines_follow_the_history_not_their_numbers() {
        use Mode::*;
        // timeline 3 branched off 1 at segment 45; timeline 2 branched off 1 at segment 20
        // (an abandoned branch). Kept: F3 on timeline 3 (redundancy 1); its restore to
        // latest needs nothing of 1 or 2, but F2 (kept by depth via redundancy 2) is on 1.
        let l = vec![
            b("F1", Full, None, 1, 10, 70),
            b("F2", Full, None, 1, 30, 80),
            b("F3", Full, None, 3, 50, 90),
        ];
        let h = BTreeMap::from([
            (
                2,
                vec![HistoryEntry {
                    tli: 1,
                    switchpoint: Lsn(20 * SEG as u64),
                }],
            ),
            (
                3,
                vec![HistoryEntry {
                    tli: 1,
                    switchpoint: Lsn(45 * SEG as u64 + 8),
                }],
            ),
        ]);
        let t1 = seg_names(1, 5, 48);
        let mut t2 = seg_names(2, 20, 25);
        t2.push("00000002.history.lz4".into());
        let mut t3 = seg_names(3, 45, 55);
        t3.push("00000003.history.lz4".into());
        let files = BTreeMap::from([(1, t1), (2, t2), (3, t3)]);
        let p = wal_plan(&l, pol(Some(2), None, None), &files, &h).unwrap();
        let by: BTreeMap<u32, &TimelinePurge> = p.iter().map(|x| (x.timeline, x)).collect();
        // timeline 1: F2 is the PITR anchor: 30.. stays (its line continues into 3)
        let s1: BTreeSet<u64> = by[&1]
            .objects
            .iter()
            .filter_map(|n| classify(n, SEG)?.1)
            .collect();
        assert_eq!(s1, (5..30).collect());
        // timeline 2 branched before F2: nothing kept needs it, history included
        assert_eq!(by[&2].objects.len(), 6 * 2 + 1);
        // timeline 3 continues F2's line after F2's start: all of it stays, with its history
        assert!(!by.contains_key(&3));
        // with the timeline numbers swapped (3 abandoned, 2 live) the result follows suit
        let h2 = BTreeMap::from([
            (
                3,
                vec![HistoryEntry {
                    tli: 1,
                    switchpoint: Lsn(20 * SEG as u64),
                }],
            ),
            (
                2,
                vec![HistoryEntry {
                    tli: 1,
                    switchpoint: Lsn(45 * SEG as u64 + 8),
                }],
            ),
        ]);
        let mut l2 = l.clone();
        l2[2].timeline = 2;
        let files2 = BTreeMap::from([
            (1, seg_names(1, 5, 48)),
            (2, seg_names(2, 45, 55)),
            (3, seg_names(3, 20, 25)),
        ]);
        let p2 = wal_plan(&l2, pol(Some(2), None, None), &files2, &h2).unwrap();
        let by2: BTreeMap<u32, &TimelinePurge> = p2.iter().map(|x| (x.timeline, x)).collect();
        assert!(!by2.contains_key(&2));
        assert_eq!(by2[&3].objects.len(), 6 * 2);
    }

    #[test]
    fn a_timeline_switch_a_kept_backup_restores_through_stays() {
        use Mode::*;
        // F2 on timeline 1 is kept; timeline 2 branched off 1 at segment 40, after F2's
        // start: restore of F2 to latest reads 1 from 30 to the switch, then 2.
        let l = vec![
            b("F1", Full, None, 1, 10, 70),
            b("F2", Full, None, 1, 30, 80),
        ];
        let h = BTreeMap::from([(
            2,
            vec![HistoryEntry {
                tli: 1,
                switchpoint: Lsn(40 * SEG as u64 + 8),
            }],
        )]);
        let mut t2 = seg_names(2, 40, 44);
        t2.push("00000002.history.lz4".into());
        let files = BTreeMap::from([(1, seg_names(1, 5, 41)), (2, t2)]);
        let p = wal_plan(&l, pol(Some(1), None, None), &files, &h).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].timeline, 1);
        let s: BTreeSet<u64> = p[0]
            .objects
            .iter()
            .filter_map(|n| classify(n, SEG)?.1)
            .collect();
        assert_eq!(s, (5..30).collect());
    }

    #[test]
    fn classify_names() {
        assert_eq!(
            classify("000000010000000000000005.lz4", SEG),
            Some((1, Some(5)))
        );
        assert_eq!(
            classify("000000010000000100000005.idx-pending", SEG),
            Some((1, Some(256 + 5)))
        );
        assert_eq!(
            classify("000000010000000000000005.00000028.backup.lz4", SEG),
            Some((1, Some(5)))
        );
        assert_eq!(classify("00000002.history.lz4", SEG), Some((2, None)));
        assert_eq!(classify("000000010000000000000005.tmp", SEG), None);
        assert_eq!(classify("README", SEG), None);
    }
}
