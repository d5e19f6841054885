//! lsn mode without reading the destination: what the destination changed after the
//! divergence point X, from the block indexes of its own WAL (the pg_rewind reasoning).
//!
//! When the destination (an old primary, or a promoted copy) archived its WAL into the same
//! catalog instance, the set D of blocks it changed after X is the union of the block
//! indexes of its WAL from X's segment to its end of WAL (the shutdown checkpoint at
//! `pg_control`'s `checkPoint`), plus what is still only in its local `pg_wal`. Any page
//! with an LSN at or above X was modified by a record at or above X, which references the
//! block (hint-bit-only changes are WAL-logged as FPI_FOR_HINT with data checksums, which
//! lsn mode requires), so a block outside D holds what the shared history held at X: D is a
//! superset of the pages the page scan would refuse.
//!
//! [`decide`] picks the route before any write. Everything it cannot prove leads to the
//! page-scan route (today's per-page check), with the reason; it never refuses a restore.
//! It trusts the archive's complete block indexes ([`IndexState::Indexed`]) and indexes
//! local (or archived) segment bytes itself where an index is missing or pending; a local
//! segment that is also archived must have the archived segment's CRC-32C; local WAL must
//! carry the instance's system identifier, a timeline of the destination's history and
//! its own page address, and decode without a gap up to and past the shutdown checkpoint.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::archive::{parse_history, HistoryEntry, IndexState, WalArchive};
use crate::backup::plan::timeline_of_segment;
use crate::error::{IoContext, Result};
use crate::index::build::StreamIndexer;
use crate::index::merge::{merge, ChangeMap};
use crate::index::SegmentIndex;
use crate::pgcontrol::{ControlFile, DbState};
use crate::types::{Lsn, TimeLineId, WalFileName};

/// `WAL_LEVEL_REPLICA` in `pg_control`.
const WAL_LEVEL_REPLICA: i32 = 1;

/// How lsn mode decides which destination blocks to keep.
#[derive(Clone, Debug)]
pub enum Route {
    /// Blocks the destination's WAL does not name after X are kept without reading them.
    WalIndex(DestChanges),
    /// Every kept page is read and checked (data checksum, LSN below X); the reason says
    /// why the WAL index could not be used.
    PageScan(String),
}

impl Route {
    pub fn name(&self) -> &'static str {
        match self {
            Route::WalIndex(_) => "wal-index",
            Route::PageScan(_) => "page-scan",
        }
    }

    /// One line: the route and why.
    pub fn detail(&self) -> String {
        match self {
            Route::WalIndex(d) => format!(
                "wal-index: the destination's WAL from {} to its end {} ({} segments: {} by archived indexes, {} decoded) names {} relation forks and {} blocks changed after the divergence point",
                d.from, d.end, d.segments, d.archived_indexes, d.decoded, d.map.forks.len(), d.changed_blocks()
            ),
            Route::PageScan(why) => format!("page-scan: {why}"),
        }
    }

    pub fn changes(&self) -> Option<&ChangeMap> {
        match self {
            Route::WalIndex(d) => Some(&d.map),
            Route::PageScan(_) => None,
        }
    }
}

/// What the destination changed after the divergence point.
#[derive(Clone, Debug)]
pub struct DestChanges {
    pub map: ChangeMap,
    /// The divergence point.
    pub from: Lsn,
    /// The end of the last record decoded (past the shutdown checkpoint).
    pub end: Lsn,
    pub segments: u64,
    /// Segments whose complete archived index was used.
    pub archived_indexes: u64,
    /// Segments decoded here (local pg_wal or archived bytes).
    pub decoded: u64,
}

impl DestChanges {
    fn changed_blocks(&self) -> usize {
        self.map.forks.values().map(|f| f.blocks.len()).sum()
    }
}

/// The route summary a report carries.
#[derive(Clone, Debug, Serialize)]
pub struct RouteReport {
    pub route: String,
    pub detail: String,
}

impl From<&Route> for RouteReport {
    fn from(r: &Route) -> Self {
        RouteReport {
            route: r.name().to_string(),
            detail: r.detail(),
        }
    }
}

/// The route for an lsn-mode restore into `target` whose divergence point is `x` (the lsn
/// pre-flight checks passed). Never fails: anything doubtful is the page-scan route.
pub fn decide(target: &Path, archive: Option<&WalArchive>, x: Lsn) -> Route {
    let Some(archive) = archive else {
        return Route::PageScan("the instance's WAL archive cannot be opened".into());
    };
    let r = match try_decide(target, archive, x) {
        Ok(Ok(d)) => Route::WalIndex(d),
        Ok(Err(why)) => Route::PageScan(why),
        Err(e) => Route::PageScan(e.to_string()),
    };
    log::info!("lsn mode route: {}", r.detail());
    r
}

/// One segment of the destination's WAL in range.
struct Seg {
    segno: u64,
    name: WalFileName,
    local: Option<PathBuf>,
    state: IndexState,
}

/// `Ok(Err(why))`: a reason to fall back; `Err`: an error, also a reason to fall back.
fn try_decide(
    target: &Path,
    archive: &WalArchive,
    x: Lsn,
) -> Result<std::result::Result<DestChanges, String>> {
    let cfg = archive.config();
    let control = ControlFile::read_from_pgdata(target)?;
    if control.system_id != cfg.system_id {
        return Ok(Err(format!(
            "the destination's system identifier {} is not the instance's {}",
            control.system_id, cfg.system_id
        )));
    }
    if control.state != DbState::Shutdowned {
        return Ok(Err(format!(
            "the destination's pg_control state is {:?}, not shut down: its end of WAL is not its checkpoint",
            control.state
        )));
    }
    if control.wal_level < WAL_LEVEL_REPLICA {
        return Ok(Err(format!(
            "the destination ran with wal_level {} (minimal): some changes are not in its WAL",
            control.wal_level
        )));
    }
    let seg_size = control.wal_segment_size;
    if seg_size != cfg.wal_segment_size || seg_size == 0 {
        return Ok(Err(format!(
            "the destination's WAL segment size {seg_size} is not the instance's {}",
            cfg.wal_segment_size
        )));
    }
    let end = control.checkpoint;
    if x > end {
        return Ok(Err(format!(
            "the divergence point {x} is past the destination's checkpoint {end}"
        )));
    }
    // the destination's history, byte-identical to the catalog's
    let dest_tli = control.timeline;
    let history: Vec<HistoryEntry> = if dest_tli > 1 {
        let hname = WalFileName::History { tli: dest_tli };
        let local = target.join("pg_wal").join(hname.to_string());
        let lb = std::fs::read(&local).ctx("read", &local)?;
        match archive.read_opt(&hname)? {
            None => {
                return Ok(Err(format!(
                    "the history file {hname} of the destination's timeline is not in the archive: the destination did not archive into this instance"
                )))
            }
            Some(ab) if ab != lb => {
                return Ok(Err(format!(
                    "the destination's {hname} differs from the archived one: another timeline of the same number"
                )))
            }
            Some(_) => {}
        }
        parse_history(&lb, &local.display().to_string())?
    } else {
        Vec::new()
    };
    let tlis: Vec<TimeLineId> = history
        .iter()
        .map(|h| h.tli)
        .chain(std::iter::once(dest_tli))
        .collect();
    let first = x.segno(seg_size);
    let last = end.segno(seg_size);
    let mut segs = Vec::new();
    for segno in first..=last {
        let tli = timeline_of_segment(&history, dest_tli, segno, seg_size);
        let name = WalFileName::segment(tli, segno, seg_size);
        let path = target.join("pg_wal").join(name.to_string());
        let local = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.len() == seg_size as u64 => Some(path),
            Ok(_) => {
                return Ok(Err(format!(
                    "\"{}\" is not a regular file of {seg_size} bytes",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(crate::error::Error::io("stat", &path, e)),
        };
        if segno == last && local.is_none() {
            // PostgreSQL keeps the segment of its last checkpoint: without it the
            // destination's own WAL would not anchor the archived segments
            return Ok(Err(format!(
                "WAL segment {name} holding the destination's checkpoint {end} is not in its pg_wal"
            )));
        }
        let state = archive.index_state(tli, segno)?;
        if local.is_none() && matches!(state, IndexState::NotArchived) {
            return Ok(Err(format!(
                "WAL segment {name} of the destination is neither in its pg_wal nor in the archive"
            )));
        }
        segs.push(Seg {
            segno,
            name,
            local,
            state,
        });
    }
    // the same segment in both places must have the same content (cheap: the archived
    // object's header carries the CRC-32C of the original bytes)
    for s in &segs {
        if let (Some(p), false) = (&s.local, matches!(s.state, IndexState::NotArchived)) {
            let meta = archive.read_meta(&s.name)?;
            let data = std::fs::read(p).ctx("read", p)?;
            if meta.size != data.len() as u64 || meta.crc32c != crc32c::crc32c(&data) {
                return Ok(Err(format!(
                    "the destination's WAL segment {} differs from the archived one",
                    s.name
                )));
            }
        }
    }
    // archived complete indexes while they last; from the first segment without one, the
    // bytes of every segment to the end are decoded here (so that a record crossing into a
    // segment is decoded with the segment it begins in)
    let mut indexes: Vec<SegmentIndex> = Vec::new();
    let mut indexer: Option<StreamIndexer> = None;
    let (mut archived_indexes, mut decoded) = (0u64, 0u64);
    for s in &segs {
        if indexer.is_none() {
            if let IndexState::Indexed(ix) = &s.state {
                if ix.system_id != cfg.system_id || ix.segno != s.segno {
                    return Ok(Err(format!(
                        "the archived index of {} is not this segment's",
                        s.name
                    )));
                }
                indexes.push(ix.clone());
                archived_indexes += 1;
                continue;
            }
        }
        // a local segment is read only as far as its WAL goes: the last one, holding the
        // shutdown checkpoint, mostly is not WAL (16 MiB read cold: ~15 ms of a restore)
        let (file, data) = match &s.local {
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(p)
                    .ctx("open", p)?;
                let mut head = vec![0u8; crate::wal::SIZE_OF_LONG_PHD];
                f.read_exact_at(&mut head, 0).ctx("read", p)?;
                (Some((f, p)), head)
            }
            None => (None, archive.read(&s.name)?),
        };
        let h = crate::wal::read_long_header(&data)?;
        if h.system_id != cfg.system_id {
            return Ok(Err(format!(
                "WAL segment {} belongs to database system {}, not the instance's {}",
                s.name, h.system_id, cfg.system_id
            )));
        }
        if !tlis.contains(&h.tli) {
            return Ok(Err(format!(
                "WAL segment {} was written on timeline {}, not on the destination's history {tlis:?}",
                s.name, h.tli
            )));
        }
        let ix = indexer.get_or_insert_with(|| StreamIndexer::new(dest_tli));
        let fed = match &file {
            Some((f, p)) => ix.feed_segment_file(s.segno, f, p),
            None => ix.feed_segment(s.segno, &data),
        };
        if let Err(e) = fed {
            return Ok(Err(format!("decoding {}: {e}", s.name)));
        }
        decoded += 1;
        if s.segno != last {
            if let Some(eow) = ix.end_of_wal() {
                return Ok(Err(format!(
                    "the WAL of {} ends at {eow}, before the destination's checkpoint {end}",
                    s.name
                )));
            }
        }
        indexes.extend(ix.take_finished());
    }
    if let Some(ix) = indexer {
        indexes.extend(ix.finish()?);
    }
    let Some(tail) = indexes.iter().find(|i| i.segno == last) else {
        return Ok(Err(format!(
            "no index of the segment holding the destination's checkpoint {end}"
        )));
    };
    if tail.pending || tail.end_lsn <= end {
        return Ok(Err(format!(
            "the destination's WAL read ends at {} (pending {}), not past its shutdown checkpoint {end}",
            tail.end_lsn, tail.pending
        )));
    }
    let dest_end = tail.end_lsn;
    if let Some(why) = discontinuity(&indexes, cfg.wal_page_size as u64, seg_size as u64) {
        return Ok(Err(why));
    }
    let map = merge(indexes.iter());
    if let Err(e) = map.check_complete() {
        return Ok(Err(e.to_string()));
    }
    if map.wal_level_minimal {
        return Ok(Err(
            "WAL written with wal_level=minimal is in the range".into()
        ));
    }
    if map.system_ids.iter().any(|&s| s != cfg.system_id) {
        return Ok(Err(
            "an index of another database system is in the range".into()
        ));
    }
    if map.segno_range != Some((first, last)) {
        return Ok(Err(format!(
            "the indexes cover segments {:?}, not {first:X} to {last:X}",
            map.segno_range
        )));
    }
    Ok(Ok(DestChanges {
        map,
        from: x,
        end: dest_end,
        segments: last - first + 1,
        archived_indexes,
        decoded,
    }))
}

/// Where the record after one ending at `end` begins: 8-byte aligned, past the page header
/// when that falls on a page boundary (the long header at a segment's start).
fn next_record_start(end: Lsn, page: u64, seg: u64) -> Lsn {
    let e = end.0.div_ceil(8) * 8;
    if page > 0 && e.is_multiple_of(page) {
        Lsn(e + if seg > 0 && e.is_multiple_of(seg) {
            40
        } else {
            24
        })
    } else {
        Lsn(e)
    }
}

/// The indexes (archived ones and those decoded here) must chain: each segment's first
/// record begins where the record before it ended. A segment of another WAL stream with the
/// same name (two copies promoted to the same timeline number) breaks the chain.
fn discontinuity(indexes: &[SegmentIndex], page: u64, seg: u64) -> Option<String> {
    let mut sorted: Vec<&SegmentIndex> = indexes.iter().collect();
    sorted.sort_by_key(|i| i.segno);
    let mut prev: Option<&SegmentIndex> = None;
    for i in sorted {
        if i.records == 0 {
            // a record spanning the whole segment: the next one chains to the record before
            if prev.is_some_and(|p| p.end_lsn.segno(seg as u32) > i.segno) {
                continue;
            }
            return Some(format!(
                "no record begins in WAL segment {:X} of timeline {}",
                i.segno, i.timeline
            ));
        }
        if let Some(p) = prev {
            let want = next_record_start(p.end_lsn, page, seg);
            if i.start_lsn != want {
                return Some(format!(
                    "WAL segment {:X}'s first record is at {}, the record before it ends at {}: the segments are not one WAL stream",
                    i.segno, i.start_lsn, p.end_lsn
                ));
            }
        }
        prev = Some(i);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ix(segno: u64, start: u64, end: u64, records: u64) -> SegmentIndex {
        let mut i = SegmentIndex::empty(15, 1 << 20, 8192, 1, 1, segno);
        i.start_lsn = Lsn(start);
        i.end_lsn = Lsn(end);
        i.records = records;
        i
    }

    #[test]
    fn next_record_starts_after_alignment_and_page_headers() {
        let (page, seg) = (8192, 1 << 20);
        assert_eq!(
            next_record_start(Lsn(0x100_0101), page, seg),
            Lsn(0x100_0108)
        );
        assert_eq!(
            next_record_start(Lsn(0x100_0108), page, seg),
            Lsn(0x100_0108)
        );
        // a page boundary: past the short header; a segment boundary: past the long one
        assert_eq!(
            next_record_start(Lsn(0x100_1FFA), page, seg),
            Lsn(0x100_2018)
        );
        assert_eq!(
            next_record_start(Lsn(0x1FF_FFF9), page, seg),
            Lsn(0x200_0028)
        );
    }

    /// Segments chain when each first record begins where the one before ended; a segment
    /// of another stream (same name, other content) breaks the chain; a segment in which no
    /// record begins is fine only inside a record spanning it.
    #[test]
    fn indexes_must_chain() {
        let (page, seg) = (8192, 1 << 20);
        let a = ix(1, 0x10_0028, 0x20_0050, 10); // last record crosses into 2
        let b = ix(2, 0x20_0050, 0x2F_0000, 10);
        assert_eq!(discontinuity(&[a.clone(), b.clone()], page, seg), None);
        let foreign = ix(2, 0x20_0060, 0x2F_0000, 10);
        let why = discontinuity(&[a.clone(), foreign], page, seg).unwrap();
        assert!(why.contains("not one WAL stream"), "{why}");
        // a record spanning segment 2 entirely
        let long = ix(1, 0x10_0028, 0x30_0100, 10);
        let empty = ix(2, 0x20_0000, 0x20_0000, 0);
        let c = ix(3, 0x30_0100, 0x3F_0000, 4);
        assert_eq!(discontinuity(&[long, empty.clone(), c], page, seg), None);
        assert!(discontinuity(&[empty], page, seg).is_some());
        // order does not matter
        assert_eq!(discontinuity(&[b, a], page, seg), None);
    }

    const SEG: u32 = 1 << 20;
    const SYSID: u64 = 7_000_000_000_000_000_001;

    /// A PostgreSQL 15 `pg_control` with a correct CRC.
    fn control(state: u32, checkpoint: Lsn, wal_level: u32) -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &SYSID.to_le_bytes());
        put(8, &1300u32.to_le_bytes());
        put(16, &state.to_le_bytes());
        put(32, &checkpoint.0.to_le_bytes());
        put(40, &checkpoint.0.to_le_bytes());
        put(48, &1u32.to_le_bytes());
        put(172, &wal_level.to_le_bytes());
        put(216, &8192u32.to_le_bytes());
        put(220, &131072u32.to_le_bytes());
        put(224, &8192u32.to_le_bytes());
        put(228, &SEG.to_le_bytes());
        put(252, &1u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..288]);
        b[288..292].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn heap_rec(n: u32) -> crate::wal::synth::SynthRecord {
        crate::wal::synth::SynthRecord {
            rmid: 10,
            info: 0x00,
            xid: 700 + n,
            blocks: vec![crate::wal::synth::SynthBlock {
                rel: crate::wal::record::RelFileLocator {
                    spc: 1663,
                    db: 5,
                    rel: 16384,
                },
                blkno: n,
                data: vec![n as u8; 100],
                ..Default::default()
            }],
            main_data: vec![1, 2, 3],
        }
    }

    /// The route on a synthetic destination: segments 3 and 4 archived (and gone from
    /// pg_wal), 5 (holding the "checkpoint", the last record) only local. Its blocks are
    /// the union; each doubt is the page scan with its reason.
    #[test]
    fn route_on_synthetic_wal() {
        use crate::wal::synth::SynthWal;
        let mut w = SynthWal::new(crate::types::PgVersion::V15, SEG, 8192, 3);
        w.system_id = SYSID;
        let mut n = 0;
        let mut last = Lsn(0);
        while w.pos().0 < 5 * u64::from(SEG) + 20_000 {
            last = w.push(&heap_rec(n));
            n += 1;
        }
        w.zero_to_segment_end();
        let b = w.bytes().to_vec();
        let seg = |k: usize| b[k * SEG as usize..(k + 1) * SEG as usize].to_vec();
        let repo = crate::repo::MemRepo::new();
        let cat = crate::catalog::Catalog::with_repo(Path::new("/mem"), std::sync::Arc::new(repo));
        cat.save_instance(&crate::catalog::InstanceConfig {
            name: "db".into(),
            system_id: SYSID,
            pg_major: 15,
            wal_segment_size: SEG,
            wal_page_size: 8192,
            block_size: 8192,
            relseg_size: 131072,
            data_checksums: true,
            pgdata: "/pgdata".into(),
            host: None,
            port: None,
            user: None,
            dbname: None,
        })
        .unwrap();
        let ar = WalArchive::open(&cat, "db").unwrap();
        for k in [0usize, 1] {
            let name = WalFileName::segment(1, 3 + k as u64, SEG);
            crate::archive::push::push_bytes(&ar, &seg(k), &name).unwrap();
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("global")).unwrap();
        std::fs::create_dir_all(d.path().join("pg_wal")).unwrap();
        let pgc = d.path().join("global/pg_control");
        let seg5 = d.path().join("pg_wal/000000010000000000000005");
        std::fs::write(&seg5, seg(2)).unwrap();
        let x = Lsn(3 * u64::from(SEG) + 0x1000);
        let route = |state: u32, wl: u32| {
            std::fs::write(&pgc, control(state, last, wl)).unwrap();
            decide(d.path(), Some(&ar), x)
        };
        let r = route(1, 1);
        let map = r.changes().unwrap_or_else(|| panic!("{}", r.detail()));
        let key = crate::index::RelFork {
            spc: 1663,
            db: 5,
            rel: 16384,
            fork: 0,
        };
        let blocks = &map.fork(&key).unwrap().blocks;
        assert_eq!(blocks.len(), n as usize, "every record's block");
        // 4 is pending (its last record continues into 5, not archived): decoded with 5
        assert!(
            r.detail().contains("1 by archived indexes, 2 decoded"),
            "{}",
            r.detail()
        );
        // not shut down; wal_level minimal
        assert!(route(6, 1).detail().contains("not shut down"));
        assert!(route(1, 0).detail().contains("minimal"));
        // segment 4 also local but different; then identical: fine
        let seg4 = d.path().join("pg_wal/000000010000000000000004");
        let mut other = seg(1);
        other[SEG as usize / 2] ^= 1;
        std::fs::write(&seg4, &other).unwrap();
        let r = route(1, 1);
        assert!(
            r.detail().contains("differs from the archived one"),
            "{}",
            r.detail()
        );
        std::fs::write(&seg4, seg(1)).unwrap();
        assert_eq!(route(1, 1).name(), "wal-index");
        // the checkpoint's segment gone from pg_wal
        std::fs::remove_file(&seg5).unwrap();
        let r = route(1, 1);
        assert!(
            r.detail().contains("is not in its pg_wal"),
            "{}",
            r.detail()
        );
        // a foreign segment 5 (another system's WAL)
        let mut f = SynthWal::new(crate::types::PgVersion::V15, SEG, 8192, 5);
        f.system_id = SYSID + 1;
        for i in 0..10 {
            f.push(&heap_rec(i));
        }
        f.zero_to_segment_end();
        std::fs::write(&seg5, f.bytes()).unwrap();
        let r = route(1, 1);
        assert_eq!(r.name(), "page-scan");
        assert!(r.detail().contains("database system"), "{}", r.detail());
    }

    #[test]
    fn no_archive_is_the_page_scan() {
        let d = tempfile::tempdir().unwrap();
        let r = decide(d.path(), None, Lsn(0x100));
        assert_eq!(r.name(), "page-scan");
        assert!(r.changes().is_none());
        assert!(r.detail().contains("archive"), "{}", r.detail());
    }
}
