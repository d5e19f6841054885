//! `backup -b summary`: the change map of a PAGE backup built from PostgreSQL 17+'s WAL
//! summaries (`pg_wal/summaries/*.summary`, [`crate::format::summary`]) instead of from
//! walnut's own block index. The copy and every later step are exactly PAGE's.
//!
//! Rules on top of the summaries (PostgreSQL's summaries and `pg_combinebackup` have known
//! gaps, see WAL-FORMAT §3.9 and RESEARCH §3.3):
//! - the server must be 17+ with `summarize_wal = on`, checked before anything is written;
//! - the backup waits (up to `--archive-timeout`) until the summarizer has passed its start
//!   LSN (`pg_get_wal_summarizer_state()`), as `pg_basebackup --incremental` does;
//! - the summaries on each timeline of the history must cover the parent's start to this
//!   backup's start with no gap (overlaps only add blocks); a gap is fatal;
//! - per fork, the union of the blocks and the **minimum** limit block: from the limit on,
//!   every block is copied and none is ever taken from an older backup (the index's
//!   truncation rule, [`crate::index::merge::FileChange`]);
//! - a relation-number-0 entry (a database created by file copy, or dropped) makes every
//!   file of that database whole, in every tablespace;
//! - VM and FSM forks are copied whole, as in every PAGE backup ([`super::copy`] copies only
//!   main forks by blocks), which covers the summarizer's VM bugs.
//!
//! The files are read straight from the data directory, CRC checked.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::archive::HistoryEntry;
use crate::error::{Error, IoContext, Result};
use crate::format::summary::{self, SummaryName};
use crate::index::merge::ChangeMap;
use crate::index::RelFork;
use crate::server::Session;
use crate::types::{Lsn, TimeLineId};

/// `pg_default`'s OID: database directories under `base/`.
const DEFAULTTABLESPACE_OID: u32 = 1663;

/// Refuses servers that cannot give summaries: older than 17, or `summarize_wal` off.
pub fn check_server(sess: &mut Session) -> Result<()> {
    if sess.major < 17 {
        return Err(Error::invalid(format!(
            "-b summary needs PostgreSQL 17 or later (WAL summaries); the server is \
             PostgreSQL {}: use -b page (walnut's WAL index) or -b delta",
            sess.major
        )));
    }
    let on = sess.setting("summarize_wal")?;
    if on != "on" {
        return Err(Error::invalid(format!(
            "-b summary needs summarize_wal = on (it is '{on}'): set it (a reload is \
             enough), wait for a checkpoint and take a FULL or PAGE backup first; or use \
             -b page or -b delta"
        )));
    }
    Ok(())
}

/// The summarizer's progress (`pg_get_wal_summarizer_state()`).
#[derive(Clone, Copy, Debug)]
struct SummarizerState {
    summarized: Lsn,
    pending: Lsn,
    pid: Option<i32>,
}

fn summarizer_state(sess: &mut Session) -> Result<SummarizerState> {
    let r = sess.client().query_one(
        "select summarized_lsn::text, pending_lsn::text, summarizer_pid \
         from pg_get_wal_summarizer_state()",
        &[],
    )?;
    let lsn = |i: usize| -> Result<Lsn> {
        let s: Option<String> = r.get(i);
        s.map_or(Ok(Lsn::INVALID), |s| s.parse())
    };
    Ok(SummarizerState {
        summarized: lsn(0)?,
        pending: lsn(1)?,
        pid: r.get(2),
    })
}

/// Waits until the summarizer has summarized the WAL up to `start` (this backup's start
/// LSN: the summary ending at its redo point is written), at most `timeout`.
pub fn wait_summarized(sess: &mut Session, start: Lsn, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    let mut said = false;
    loop {
        let st = summarizer_state(sess)?;
        if st.summarized >= start {
            return Ok(());
        }
        if t0.elapsed() >= timeout {
            let why = if st.pid.is_none() {
                " (the WAL summarizer is not running: is summarize_wal on?)"
            } else {
                ""
            };
            return Err(Error::server(format!(
                "the WAL summarizer did not reach the backup's start LSN {start} within {} s: \
                 it has summarized up to {} and read up to {}{why}",
                timeout.as_secs(),
                st.summarized,
                st.pending
            )));
        }
        if !said && t0.elapsed() >= Duration::from_secs(2) {
            log::info!(
                "waiting for the WAL summarizer to pass the start LSN {start} (at {})",
                st.summarized
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The check before anything is written: the summaries already on disk must cover the WAL
/// from `parent_start` up to what the summarizer has summarized so far, with no gap (the
/// backup's own start is known only once it has started; [`change_map`] checks the whole
/// range again then). A gap found here can only persist.
pub fn precheck(
    sess: &mut Session,
    pgdata: &Path,
    history: &[HistoryEntry],
    cur: TimeLineId,
    parent_start: Lsn,
) -> Result<()> {
    let st = summarizer_state(sess)?;
    if st.summarized <= parent_start {
        return Ok(()); // nothing to check yet
    }
    let files = list(pgdata)?;
    select(&files, history, cur, parent_start, st.summarized).map(|_| ())
}

/// The summaries in `pgdata/pg_wal/summaries`, by name (files that are not summaries, such
/// as `temp.summary`, are ignored).
pub fn list(pgdata: &Path) -> Result<Vec<SummaryName>> {
    let dir = pgdata.join("pg_wal").join("summaries");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(format!(
                "\"{}\" does not exist: the server has written no WAL summary (PostgreSQL \
                 17+ with summarize_wal = on)",
                dir.display()
            )))
        }
        Err(e) => return Err(Error::io("read directory", &dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.ctx("read directory", &dir)?;
        if let Some(n) = ent.file_name().to_str().and_then(SummaryName::parse) {
            out.push(n);
        }
    }
    out.sort();
    Ok(out)
}

/// The WAL range of each timeline of the history that lies in `[from, to)`: `(tli, a, b)`
/// with `a < b`, oldest first. `history` holds the ancestors of `cur`, oldest first, each
/// with the LSN where it ended.
fn timeline_ranges(
    history: &[HistoryEntry],
    cur: TimeLineId,
    from: Lsn,
    to: Lsn,
) -> Vec<(TimeLineId, Lsn, Lsn)> {
    let mut out = Vec::new();
    let mut begin = Lsn(0);
    let spans = history
        .iter()
        .map(|h| (h.tli, h.switchpoint))
        .chain(std::iter::once((cur, Lsn(u64::MAX))));
    for (tli, end) in spans {
        let (a, b) = (begin.max(from), end.min(to));
        if a < b {
            out.push((tli, a, b));
        }
        begin = end;
    }
    out
}

/// The summaries needed for `[from, to)` on the history of `cur`: every summary of each
/// timeline overlapping that timeline's part of the range. Fails, naming the missing WAL,
/// unless they cover it with no gap.
pub fn select(
    files: &[SummaryName],
    history: &[HistoryEntry],
    cur: TimeLineId,
    from: Lsn,
    to: Lsn,
) -> Result<Vec<SummaryName>> {
    let mut out = Vec::new();
    for (tli, a, b) in timeline_ranges(history, cur, from, to) {
        let mut mine: Vec<&SummaryName> = files
            .iter()
            .filter(|f| f.tli == tli && f.end > a && f.start < b)
            .collect();
        mine.sort();
        let mut covered = a;
        for f in mine {
            if f.start > covered {
                return Err(gap(tli, covered, f.start, from));
            }
            covered = covered.max(f.end);
            out.push(*f);
        }
        if covered < b {
            return Err(gap(tli, covered, b, from));
        }
    }
    Ok(out)
}

fn gap(tli: TimeLineId, a: Lsn, b: Lsn, from: Lsn) -> Error {
    Error::not_found(format!(
        "the WAL summaries in pg_wal/summaries have a gap: no summary covers the WAL of \
         timeline {tli} from {a} to {b} (a summary backup needs every summary from its \
         parent's start {from} on; were they removed by wal_summary_keep_time, or was \
         summarize_wal off?): take a PAGE (walnut's WAL index), DELTA or FULL backup"
    ))
}

/// The change map of `[from, to)` on the history of `cur`, from the summaries in `pgdata`
/// (see the module docs for the rules).
pub fn change_map(
    pgdata: &Path,
    history: &[HistoryEntry],
    cur: TimeLineId,
    from: Lsn,
    to: Lsn,
) -> Result<ChangeMap> {
    let files = list(pgdata)?;
    let chosen = select(&files, history, cur, from, to)?;
    let dir = pgdata.join("pg_wal").join("summaries");
    let mut map = ChangeMap::default();
    let mut sentinel_dbs = std::collections::BTreeSet::new();
    for name in &chosen {
        let path = dir.join(name.file_name());
        let bytes = std::fs::read(&path).ctx("read", &path)?;
        let entries = summary::decode(&bytes, &path.display().to_string())?;
        log::debug!(
            "WAL summary {} ({} relation forks)",
            name.file_name(),
            entries.len()
        );
        for e in entries {
            if e.rel == 0 {
                map.whole_dbs.insert((e.spc, e.db));
                sentinel_dbs.insert(e.db);
                continue;
            }
            let fc = map.forks.entry(RelFork {
                spc: e.spc,
                db: e.db,
                rel: e.rel,
                fork: e.fork,
            });
            let fc = fc.or_default();
            fc.blocks.union_with(&e.blocks);
            if let Some(l) = e.limit_block {
                fc.apply_limit(l);
            }
        }
        map.lsn_range = Some(match map.lsn_range {
            None => (name.start, name.end),
            Some((a, b)) => (a.min(name.start), b.max(name.end)),
        });
    }
    // "The whole database": its directory in every tablespace, not only the one the
    // sentinel names (a conservative superset).
    if !sentinel_dbs.is_empty() {
        let spcs = tablespaces(pgdata)?;
        for &db in &sentinel_dbs {
            if db == 0 {
                continue;
            }
            map.whole_dbs.insert((DEFAULTTABLESPACE_OID, db));
            for &spc in &spcs {
                map.whole_dbs.insert((spc, db));
            }
        }
    }
    map.segments = chosen.len() as u64;
    log::info!(
        "change map from {} WAL summaries ({} to {}): {} relation forks, {} whole databases",
        chosen.len(),
        from,
        to,
        map.forks.len(),
        map.whole_dbs.len()
    );
    Ok(map)
}

/// The OIDs of the tablespaces linked in `pgdata/pg_tblspc`.
fn tablespaces(pgdata: &Path) -> Result<Vec<u32>> {
    let dir = pgdata.join("pg_tblspc");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read directory", &dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.ctx("read directory", &dir)?;
        if let Some(oid) = ent.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(oid);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::summary::{encode, SummaryEntry};
    use crate::index::BlockSet;

    fn n(tli: TimeLineId, a: u64, b: u64) -> SummaryName {
        SummaryName {
            tli,
            start: Lsn(a),
            end: Lsn(b),
        }
    }

    #[test]
    fn summaries_must_cover_each_timeline_without_gaps() {
        let files = [
            n(1, 0x10, 0x100),
            n(1, 0x100, 0x200),
            n(1, 0x200, 0x300),
            n(2, 0x250, 0x400),
            n(2, 0x400, 0x500),
            n(3, 0x100, 0x900), // not on the history
        ];
        // timeline 1 ended at 0x250
        let h = [HistoryEntry {
            tli: 1,
            switchpoint: Lsn(0x250),
        }];
        let got = select(&files, &h, 2, Lsn(0x120), Lsn(0x400)).unwrap();
        assert_eq!(
            got,
            vec![n(1, 0x100, 0x200), n(1, 0x200, 0x300), n(2, 0x250, 0x400)]
        );
        // the start of the range inside the first summary; a range ending inside one
        let got = select(&files, &[], 1, Lsn(0x20), Lsn(0x150)).unwrap();
        assert_eq!(got, vec![n(1, 0x10, 0x100), n(1, 0x100, 0x200)]);
        // a gap in the middle
        let holes = [n(1, 0x10, 0x100), n(1, 0x180, 0x300)];
        let e = select(&holes, &[], 1, Lsn(0x20), Lsn(0x200)).unwrap_err();
        assert!(e.to_string().contains("0/100 to 0/180"), "{e}");
        // nothing before the parent's start (summarize_wal turned on later)
        let e = select(&files, &[], 1, Lsn(0x8), Lsn(0x200)).unwrap_err();
        assert!(e.to_string().contains("timeline 1 from 0/8 to 0/10"), "{e}");
        // not yet summarized up to the end
        let e = select(&files, &h, 2, Lsn(0x120), Lsn(0x600)).unwrap_err();
        assert!(
            e.to_string().contains("timeline 2 from 0/500 to 0/600"),
            "{e}"
        );
        // the old timeline's part must be there too
        let e = select(&files[2..], &h, 2, Lsn(0x120), Lsn(0x400)).unwrap_err();
        assert!(e.to_string().contains("timeline 1 from 0/120"), "{e}");
        // overlaps are fine (a superset)
        let over = [n(1, 0x10, 0x180), n(1, 0x100, 0x300)];
        assert_eq!(
            select(&over, &[], 1, Lsn(0x20), Lsn(0x200)).unwrap().len(),
            2
        );
    }

    fn entry(db: u32, rel: u32, fork: u8, limit: Option<u32>, b: &[u32]) -> SummaryEntry {
        SummaryEntry {
            spc: 1663,
            db,
            rel,
            fork,
            limit_block: limit,
            blocks: BlockSet::from_blocks(b.iter().copied()),
        }
    }

    #[test]
    fn change_map_unions_blocks_keeps_the_minimum_limit_and_whole_databases() {
        let dir = tempfile::tempdir().unwrap();
        let sdir = dir.path().join("pg_wal/summaries");
        std::fs::create_dir_all(&sdir).unwrap();
        std::fs::create_dir_all(dir.path().join("pg_tblspc/16500")).unwrap();
        let write = |name: SummaryName, e: &[SummaryEntry]| {
            std::fs::write(sdir.join(name.file_name()), encode(e)).unwrap();
        };
        write(
            n(1, 0x1000, 0x2000),
            &[
                entry(5, 16384, 0, None, &[1, 2, 200]),
                entry(5, 16390, 0, Some(40), &[3]),
            ],
        );
        write(
            n(1, 0x2000, 0x3000),
            &[
                entry(5, 16384, 0, Some(100), &[7]),
                entry(5, 16390, 0, Some(50), &[60]),
                entry(16400, 0, 0, Some(0), &[]),
            ],
        );
        std::fs::write(sdir.join("temp.summary"), b"partial").unwrap();
        let m = change_map(dir.path(), &[], 1, Lsn(0x1800), Lsn(0x2800)).unwrap();
        let f = |rel: u32| {
            m.fork(&RelFork {
                spc: 1663,
                db: 5,
                rel,
                fork: 0,
            })
            .unwrap()
            .clone()
        };
        assert_eq!(f(16384).blocks.to_vec(), vec![1, 2, 7, 200]);
        assert_eq!(f(16384).limit_block, Some(100));
        assert_eq!(f(16390).limit_block, Some(40));
        // the truncation rule: blocks from the limit on are copied, none from older backups
        let fc = m.blocks_for_file(
            &RelFork {
                spc: 1663,
                db: 5,
                rel: 16384,
                fork: 0,
            },
            0,
            131072,
        );
        assert_eq!(fc.old_source_limit(300), 100);
        assert_eq!(fc.blocks_to_copy(120).len(), 3 + 20);
        assert!(m.whole_db(1663, 16400));
        assert!(
            m.whole_db(16500, 16400),
            "every tablespace of a sentinel's database"
        );
        assert!(!m.whole_db(1663, 5));
        assert_eq!(m.segments, 2);

        // a damaged summary fails the map, naming the file
        let p = sdir.join(n(1, 0x2000, 0x3000).file_name());
        let mut b = std::fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&p, b).unwrap();
        let e = change_map(dir.path(), &[], 1, Lsn(0x1800), Lsn(0x2800)).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corruption);
        assert!(
            e.to_string().contains(&n(1, 0x2000, 0x3000).file_name()),
            "{e}"
        );
        // a missing one is a gap
        std::fs::remove_file(&p).unwrap();
        let e = change_map(dir.path(), &[], 1, Lsn(0x1800), Lsn(0x2800)).unwrap_err();
        assert!(e.to_string().contains("gap"), "{e}");
    }
}
