//! Which blocks a PAGE backup copies: the union of the block indexes of every archived WAL
//! segment from the parent's start LSN to this backup's start LSN, across timelines.

use crate::archive::{HistoryEntry, IndexState, WalArchive};
use crate::backup::meta::{self, BackupMeta, Mode, Status};
use crate::error::{Error, Result};
use crate::index::merge::{merge, ChangeMap};
use crate::index::SegmentIndex;
use crate::types::{Lsn, TimeLineId, WalFileName};

/// The timeline PostgreSQL reads segment `segno` from, given the history of `cur`: the
/// newest timeline that began at or before that segment (the segment holding a switchpoint
/// comes from the new timeline, which holds a copy of the old timeline's part).
pub fn timeline_of_segment(
    history: &[HistoryEntry],
    cur: TimeLineId,
    segno: u64,
    seg_size: u32,
) -> TimeLineId {
    // history: ancestors oldest first, each with the LSN where it ended.
    let mut tli = history.first().map_or(cur, |h| h.tli);
    for (i, h) in history.iter().enumerate() {
        let next = history.get(i + 1).map_or(cur, |n| n.tli);
        if h.switchpoint.segno(seg_size) <= segno {
            tli = next;
        }
    }
    tli
}

/// Whether a backup on timeline `tli` starting at `start` lies on the history of the
/// current timeline `cur` (whose ancestors are `history`).
pub fn on_history(history: &[HistoryEntry], cur: TimeLineId, tli: TimeLineId, start: Lsn) -> bool {
    if tli == cur {
        return true;
    }
    history
        .iter()
        .any(|h| h.tli == tli && start < h.switchpoint)
}

/// The parent of a PAGE or DELTA backup on timeline `tli` (whose ancestors are `history`):
/// `explicit` when given (it must be OK and on that history), else the newest OK backup of
/// the same system on that history. `list` is oldest first.
pub fn choose_parent<'a>(
    list: &'a [BackupMeta],
    explicit: Option<&str>,
    history: &[HistoryEntry],
    tli: TimeLineId,
    system_id: u64,
    mode: Mode,
) -> Result<&'a BackupMeta> {
    match explicit {
        Some(pid) => {
            let p = meta::find(list, pid)?;
            if p.effective_status() != Status::Ok {
                return Err(Error::invalid(format!(
                    "backup {pid} has status {}; only OK backups can be parents",
                    p.effective_status()
                )));
            }
            if !on_history(history, tli, p.timeline, p.start_lsn) {
                return Err(Error::invalid(format!(
                    "backup {pid} (timeline {}, start {}) is not on the history of timeline {tli}",
                    p.timeline, p.start_lsn
                )));
            }
            Ok(p)
        }
        None => list
            .iter()
            .rev()
            .find(|b| {
                b.effective_status() == Status::Ok
                    && b.system_id == system_id
                    && on_history(history, tli, b.timeline, b.start_lsn)
            })
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no OK backup on the history of timeline {tli} to be the parent of a {mode} backup; take a FULL backup"
                ))
            }),
    }
}

/// Builds the change map over `[from, to]` for the current timeline `cur`.
pub fn change_map(
    archive: &WalArchive,
    history: &[HistoryEntry],
    cur: TimeLineId,
    from: Lsn,
    to: Lsn,
    seg_size: u32,
) -> Result<ChangeMap> {
    change_map_with_tail(archive, history, cur, from, to, seg_size, None)
}

/// [`change_map`] whose last segment (the one holding `to`) is not archived yet but was
/// indexed from streamed bytes up to `to` (`tail`, see
/// [`crate::backup::stream::index_tail`]): a standby cannot finish that segment.
pub fn change_map_with_tail(
    archive: &WalArchive,
    history: &[HistoryEntry],
    cur: TimeLineId,
    from: Lsn,
    to: Lsn,
    seg_size: u32,
    mut tail: Option<SegmentIndex>,
) -> Result<ChangeMap> {
    let mut indexes: Vec<SegmentIndex> = Vec::new();
    let first = from.segno(seg_size);
    let last = to.segno(seg_size);
    for segno in first..=last {
        if segno == last {
            if let Some(ix) = tail.take() {
                indexes.push(ix);
                continue;
            }
        }
        let tli = timeline_of_segment(history, cur, segno, seg_size);
        let name = WalFileName::segment(tli, segno, seg_size);
        let mut state = archive.index_state(tli, segno)?;
        if !matches!(state, IndexState::Indexed(_)) {
            if matches!(state, IndexState::NotArchived) {
                return Err(Error::not_found(format!(
                    "WAL segment {name} is not in the archive: a PAGE backup needs every segment \
                     from the parent's start {from} to {to}; take a DELTA or FULL backup instead"
                )));
            }
            // The one write a backup makes into the archive: rebuilding a segment's missing
            // block index, through the archive's own (create-only) index write path.
            state = archive.ensure_index(tli, segno)?;
        }
        match state {
            IndexState::Indexed(ix) => indexes.push(ix),
            IndexState::Pending(_) => {
                return Err(Error::corruption(format!(
                    "the block index of WAL segment {name} is incomplete (its last record \
                     continues into a segment that is not archived); take a DELTA or FULL backup"
                )))
            }
            IndexState::Missing(why) => {
                return Err(Error::corruption(format!(
                "WAL segment {name} has no usable block index ({why}); take a DELTA or FULL backup"
            )))
            }
            IndexState::NotArchived => {
                return Err(Error::not_found(format!(
                    "WAL segment {name} is not in the archive; take a DELTA or FULL backup"
                )))
            }
        }
    }
    let map = merge(indexes.iter());
    map.check_complete()?;
    if map.wal_level_minimal {
        return Err(Error::invalid(format!(
            "WAL between {from} and {to} was written with wal_level=minimal: changes may be \
             missing from WAL; take a FULL backup"
        )));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_follow_the_timeline_history() {
        let seg = 16 << 20;
        // tli 1 ended at 0/3800100 (segment 3), tli 2 ended at 0/6000000 (segment 6 start)
        let h = [
            HistoryEntry {
                tli: 1,
                switchpoint: Lsn(0x380_0100),
            },
            HistoryEntry {
                tli: 2,
                switchpoint: Lsn(0x600_0000),
            },
        ];
        assert_eq!(timeline_of_segment(&h, 3, 2, seg), 1);
        assert_eq!(timeline_of_segment(&h, 3, 3, seg), 2);
        assert_eq!(timeline_of_segment(&h, 3, 5, seg), 2);
        assert_eq!(timeline_of_segment(&h, 3, 6, seg), 3);
        assert_eq!(timeline_of_segment(&[], 1, 6, seg), 1);
        assert!(on_history(&h, 3, 1, Lsn(0x100_0000)));
        assert!(!on_history(&h, 3, 1, Lsn(0x400_0000)));
        assert!(on_history(&h, 3, 3, Lsn(0x700_0000)));
        assert!(!on_history(&h, 3, 4, Lsn(0x100)));
    }
}
