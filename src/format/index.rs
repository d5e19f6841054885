//! On-disk encoding of a [`SegmentIndex`]: one small file per WAL segment, written by the
//! archive command when the segment arrives and read by backups.
//!
//! Design points:
//! - **Integrity first.** A checksum trailer (CRC-32C, as WAL itself uses) covers every byte
//!   before it, and it sits at the end of the file in *every* version, so a damaged file is
//!   reported as damaged before its version is even looked at. A file whose checksum holds but
//!   whose version is unknown is refused with a message that names the version.
//! - **Compact block sets.** Each fork's blocks are written as a list of items, each a single
//!   block, a run of consecutive blocks, or a bitmap; the encoder picks bitmaps for stretches
//!   where they are smaller than the equivalent items. One million consecutive blocks take
//!   5 bytes; random sparse blocks about one varint gap each; dense irregular regions one bit
//!   per block.
//! - **Hostile input.** [`decode`] never panics: every read goes through a bounds-checked
//!   cursor. Nothing is preallocated from a length field; in-memory size is bounded by a
//!   small constant times the input size (a block set is kept as runs, and one input byte
//!   yields at most four runs).

#![deny(clippy::indexing_slicing)]

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::index::{BlockSet, DbEvent, DbEventKind, ForkChange, OtherEvent, RelFork, SegmentIndex};
use crate::types::Lsn;

/// The first four bytes of every block index file ("WaLnut Block Index").
pub const MAGIC: [u8; 4] = *b"WLBI";
/// The version [`encode`] writes and the only one [`decode`] reads.
pub const VERSION: u16 = 1;
/// magic + version + reserved + body_len.
const HEADER_LEN: usize = 12;
const TRAILER_LEN: usize = 4;

// SegmentIndex flags.
const F_PENDING: u8 = 1;
const F_SWITCHED: u8 = 2;
const F_WAL_LEVEL_MINIMAL: u8 = 4;
const F_HAS_COMMIT_TIME: u8 = 8;
const F_HAS_XID: u8 = 16;
const F_ALL: u8 = 31;

// Per-fork flags.
const FK_CREATED: u8 = 1;
const FK_DROPPED: u8 = 2;
const FK_HAS_LIMIT: u8 = 4;
const FK_SAME_DB: u8 = 8;
const FK_ALL: u8 = 15;

// Block set item kinds (low two bits of the item head).
const ITEM_SINGLE: u64 = 0;
const ITEM_RUN: u64 = 1;
const ITEM_BITMAP: u64 = 2;

/// How many runs past the best bitmap end so far the encoder keeps looking for a better one.
/// A dense region grows one bitmap for as long as that keeps paying; a pattern where no
/// bitmap pays costs O(runs × this) to plan.
const BITMAP_LOOKAHEAD: usize = 128;
/// Stop looking ahead once a bitmap is this many bytes worse than the best seen.
const BITMAP_SLACK: i64 = 24;

/// Encodes an index into its file bytes.
//
// Format (version 1; all integers little-endian; "v" is an unsigned LEB128 varint of at
// most 10 bytes, "z" a zigzag-encoded signed varint):
// {
//   magic:    [u8; 4] = "WLBI"
//   version:  u16     = 1
//   reserved: u16     = 0
//   body_len: u32     = number of body bytes that follow
//   body: {
//     pg_major v | seg_size v | wal_page_size v | system_id u64 | timeline v | segno v
//     start_lsn v | end_lsn v | records v
//     flags u8: 1 pending, 2 switched, 4 wal_level_minimal,
//               8 last_commit_time follows, 16 last_xid follows (other bits must be 0)
//     [last_commit_time z] [last_xid v]
//     nforks v, nforks × fork, in strictly increasing (spc, db, rel, fork) order: {
//       fflags u8: 1 created, 2 dropped, 4 limit_block follows,
//                  8 same spc and db as the previous fork (then they are omitted)
//       [spc v, db v] | rel v | forknum u8 | [limit_block v]
//       blocks: { nitems v, nitems × item }, items in increasing block order: {
//         head v = gap << 2 | kind, where gap = first block of the item minus the block
//                  after the previous item's last (minus 0 for the first item)
//         kind 0: one block
//         kind 1: a run: len - 2 v (len >= 2 consecutive blocks)
//         kind 2: a bitmap: nbits v (>= 1), then ceil(nbits / 8) bytes; bit i (LSB first
//                 in each byte) set = block first + i is in the set; the item covers
//                 exactly nbits blocks; padding bits must be 0
//       }
//     }
//     ndb v, ndb × db_event: { lsn v | spc v | db v | kind u8:
//       0 created by file copy (then src_spc v, src_db v) | 1 created, WAL-logged | 2 dropped }
//     nother v, nother × other_event: { tag u8 | lsn v | ...
//       0 relmap update: spc v, db v | 1 tablespace create: spc v | 2 tablespace drop: spc v
//       3 wal_level: wal_level v | 4 restore point: name_len v, name (UTF-8), time z }
//   }
//   crc: u32 = CRC-32C of every preceding byte, magic included
// }
pub fn encode(index: &SegmentIndex) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    put_v(&mut body, index.pg_major as u64);
    put_v(&mut body, index.seg_size as u64);
    put_v(&mut body, index.wal_page_size as u64);
    body.extend_from_slice(&index.system_id.to_le_bytes());
    put_v(&mut body, index.timeline as u64);
    put_v(&mut body, index.segno);
    put_v(&mut body, index.start_lsn.0);
    put_v(&mut body, index.end_lsn.0);
    put_v(&mut body, index.records);
    let mut flags = 0;
    if index.pending {
        flags |= F_PENDING;
    }
    if index.switched {
        flags |= F_SWITCHED;
    }
    if index.wal_level_minimal {
        flags |= F_WAL_LEVEL_MINIMAL;
    }
    if index.last_commit_time.is_some() {
        flags |= F_HAS_COMMIT_TIME;
    }
    if index.last_xid.is_some() {
        flags |= F_HAS_XID;
    }
    body.push(flags);
    if let Some(t) = index.last_commit_time {
        put_z(&mut body, t);
    }
    if let Some(x) = index.last_xid {
        put_v(&mut body, x as u64);
    }

    put_v(&mut body, index.forks.len() as u64);
    let mut prev: Option<RelFork> = None;
    for (key, change) in &index.forks {
        let same_db = prev.is_some_and(|p| p.spc == key.spc && p.db == key.db);
        let mut ff = 0;
        if change.created {
            ff |= FK_CREATED;
        }
        if change.dropped {
            ff |= FK_DROPPED;
        }
        if change.limit_block.is_some() {
            ff |= FK_HAS_LIMIT;
        }
        if same_db {
            ff |= FK_SAME_DB;
        }
        body.push(ff);
        if !same_db {
            put_v(&mut body, key.spc as u64);
            put_v(&mut body, key.db as u64);
        }
        put_v(&mut body, key.rel as u64);
        body.push(key.fork);
        if let Some(l) = change.limit_block {
            put_v(&mut body, l as u64);
        }
        encode_blocks(&mut body, &change.blocks);
        prev = Some(*key);
    }

    put_v(&mut body, index.db_events.len() as u64);
    for ev in &index.db_events {
        put_v(&mut body, ev.lsn.0);
        put_v(&mut body, ev.spc as u64);
        put_v(&mut body, ev.db as u64);
        match ev.kind {
            DbEventKind::CreatedFileCopy { src_spc, src_db } => {
                body.push(0);
                put_v(&mut body, src_spc as u64);
                put_v(&mut body, src_db as u64);
            }
            DbEventKind::CreatedWalLog => body.push(1),
            DbEventKind::Dropped => body.push(2),
        }
    }

    put_v(&mut body, index.other_events.len() as u64);
    for ev in &index.other_events {
        match ev {
            OtherEvent::RelmapUpdate { lsn, spc, db } => {
                body.push(0);
                put_v(&mut body, lsn.0);
                put_v(&mut body, *spc as u64);
                put_v(&mut body, *db as u64);
            }
            OtherEvent::TablespaceCreate { lsn, spc } => {
                body.push(1);
                put_v(&mut body, lsn.0);
                put_v(&mut body, *spc as u64);
            }
            OtherEvent::TablespaceDrop { lsn, spc } => {
                body.push(2);
                put_v(&mut body, lsn.0);
                put_v(&mut body, *spc as u64);
            }
            OtherEvent::WalLevel { lsn, wal_level } => {
                body.push(3);
                put_v(&mut body, lsn.0);
                put_v(&mut body, *wal_level as u64);
            }
            OtherEvent::RestorePoint { lsn, name, time } => {
                body.push(4);
                put_v(&mut body, lsn.0);
                put_v(&mut body, name.len() as u64);
                body.extend_from_slice(name.as_bytes());
                put_z(&mut body, *time);
            }
        }
    }

    // A body over 4 GiB would need more WAL records than any segment can hold (a 1 GiB
    // segment cannot reference 2^32 distinct items); saturating keeps encode total, and the
    // resulting file would fail to decode rather than decode wrongly.
    let body_len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes and verifies index file bytes; `what` (a path) goes into error messages.
///
/// Checks, in order: length (at least header and trailer), magic, checksum, version,
/// body length, then the body's structure. Every failure is [`crate::ErrorKind::Corruption`]
/// and names `what`.
pub fn decode(bytes: &[u8], what: &str) -> Result<SegmentIndex> {
    // The checked split also proves the length: header, body (maybe empty), trailer.
    let split = bytes
        .split_last_chunk::<TRAILER_LEN>()
        .and_then(|(covered, trailer)| {
            Some((covered, covered.split_first_chunk::<HEADER_LEN>()?, trailer))
        });
    let Some((covered, (header, body), trailer)) = split else {
        return Err(Error::corruption(format!(
            "block index file {what} is too short ({} bytes, at least {} needed): truncated",
            bytes.len(),
            HEADER_LEN + TRAILER_LEN
        )));
    };
    let [m0, m1, m2, m3, v0, v1, r0, r1, l0, l1, l2, l3] = *header;
    if [m0, m1, m2, m3] != MAGIC {
        return Err(Error::corruption(format!(
            "{what} is not a walnut block index file (bad magic {:02x?})",
            [m0, m1, m2, m3]
        )));
    }
    let stored = u32::from_le_bytes(*trailer);
    let computed = crc32c::crc32c(covered);
    let body_len = u32::from_le_bytes([l0, l1, l2, l3]) as u64;
    if stored != computed {
        let expect = HEADER_LEN as u64 + body_len + TRAILER_LEN as u64;
        let hint = if expect != bytes.len() as u64 {
            format!(
                " (file is {} bytes, header says {expect}: truncated?)",
                bytes.len()
            )
        } else {
            String::new()
        };
        return Err(Error::corruption(format!(
            "checksum mismatch in block index file {what}: stored {stored:08x}, \
             computed {computed:08x}{hint}"
        )));
    }
    let version = u16::from_le_bytes([v0, v1]);
    if version != VERSION {
        return Err(Error::corruption(format!(
            "unsupported index format version {version} in {what} (this walnut reads \
             version {VERSION})"
        )));
    }
    let reserved = u16::from_le_bytes([r0, r1]);
    if reserved != 0 {
        return Err(Error::corruption(format!(
            "block index file {what}: reserved header field is {reserved}, expected 0"
        )));
    }
    if body.len() as u64 != body_len {
        return Err(Error::corruption(format!(
            "block index file {what}: header says {body_len} body bytes, found {}",
            body.len()
        )));
    }
    let mut r = Reader {
        buf: body,
        pos: 0,
        what,
    };
    let index = decode_body(&mut r)?;
    if r.pos != body.len() {
        return Err(r.err(format!(
            "{} unexpected bytes after the body",
            body.len() - r.pos
        )));
    }
    Ok(index)
}

fn decode_body(r: &mut Reader<'_>) -> Result<SegmentIndex> {
    let pg_major = r.v32("pg_major")?;
    let seg_size = r.v32("seg_size")?;
    let wal_page_size = r.v32("wal_page_size")?;
    let system_id = r.u64_le("system_id")?;
    let timeline = r.v32("timeline")?;
    let segno = r.v("segno")?;
    let start_lsn = Lsn(r.v("start_lsn")?);
    let end_lsn = Lsn(r.v("end_lsn")?);
    let records = r.v("records")?;
    let flags = r.u8("flags")?;
    if flags & !F_ALL != 0 {
        return Err(r.err(format!("unknown flags {flags:#04x}")));
    }
    let last_commit_time = if flags & F_HAS_COMMIT_TIME != 0 {
        Some(r.z("last_commit_time")?)
    } else {
        None
    };
    let last_xid = if flags & F_HAS_XID != 0 {
        Some(r.v32("last_xid")?)
    } else {
        None
    };

    let nforks = r.v("fork count")?;
    let mut forks = BTreeMap::new();
    let mut prev: Option<RelFork> = None;
    for _ in 0..nforks {
        let ff = r.u8("fork flags")?;
        if ff & !FK_ALL != 0 {
            return Err(r.err(format!("unknown fork flags {ff:#04x}")));
        }
        let (spc, db) = if ff & FK_SAME_DB != 0 {
            match prev {
                Some(p) => (p.spc, p.db),
                None => return Err(r.err("first fork refers to a previous fork".into())),
            }
        } else {
            (r.v32("tablespace")?, r.v32("database")?)
        };
        let key = RelFork {
            spc,
            db,
            rel: r.v32("relfilenode")?,
            fork: r.u8("fork number")?,
        };
        if prev.is_some_and(|p| p >= key) {
            return Err(r.err(format!(
                "relation forks out of order ({}/{}/{} fork {})",
                key.spc, key.db, key.rel, key.fork
            )));
        }
        let limit_block = if ff & FK_HAS_LIMIT != 0 {
            Some(r.v32("limit block")?)
        } else {
            None
        };
        let blocks = decode_blocks(r)?;
        forks.insert(
            key,
            ForkChange {
                blocks,
                limit_block,
                created: ff & FK_CREATED != 0,
                dropped: ff & FK_DROPPED != 0,
            },
        );
        prev = Some(key);
    }

    let ndb = r.v("database event count")?;
    let mut db_events = Vec::new();
    for _ in 0..ndb {
        let lsn = Lsn(r.v("database event LSN")?);
        let spc = r.v32("tablespace")?;
        let db = r.v32("database")?;
        let kind = match r.u8("database event kind")? {
            0 => DbEventKind::CreatedFileCopy {
                src_spc: r.v32("source tablespace")?,
                src_db: r.v32("source database")?,
            },
            1 => DbEventKind::CreatedWalLog,
            2 => DbEventKind::Dropped,
            k => return Err(r.err(format!("unknown database event kind {k}"))),
        };
        db_events.push(DbEvent { lsn, spc, db, kind });
    }

    let nother = r.v("event count")?;
    let mut other_events = Vec::new();
    for _ in 0..nother {
        let tag = r.u8("event tag")?;
        let lsn = Lsn(r.v("event LSN")?);
        let ev = match tag {
            0 => OtherEvent::RelmapUpdate {
                lsn,
                spc: r.v32("tablespace")?,
                db: r.v32("database")?,
            },
            1 => OtherEvent::TablespaceCreate {
                lsn,
                spc: r.v32("tablespace")?,
            },
            2 => OtherEvent::TablespaceDrop {
                lsn,
                spc: r.v32("tablespace")?,
            },
            3 => OtherEvent::WalLevel {
                lsn,
                wal_level: r.v32("wal_level")?,
            },
            4 => {
                let len = r.v("restore point name length")?;
                let raw = r.bytes(len, "restore point name")?;
                let name = std::str::from_utf8(raw)
                    .map_err(|_| r.err("restore point name is not UTF-8".into()))?
                    .to_string();
                OtherEvent::RestorePoint {
                    lsn,
                    name,
                    time: r.z("restore point time")?,
                }
            }
            t => return Err(r.err(format!("unknown event tag {t}"))),
        };
        other_events.push(ev);
    }

    Ok(SegmentIndex {
        pg_major,
        seg_size,
        wal_page_size,
        system_id,
        timeline,
        segno,
        start_lsn,
        end_lsn,
        pending: flags & F_PENDING != 0,
        records,
        switched: flags & F_SWITCHED != 0,
        forks,
        db_events,
        other_events,
        wal_level_minimal: flags & F_WAL_LEVEL_MINIMAL != 0,
        last_commit_time,
        last_xid,
    })
}

/// One encoded block-set item (see the format comment on [`encode`]).
enum Item {
    Single(u32),
    Run(u32, u32),
    /// First and last block covered, and the runs it holds.
    Bitmap(u32, u32, std::ops::Range<usize>),
}

fn item_cost(next: u64, first: u32, last: u32) -> i64 {
    let gap = first as u64 - next;
    if first == last {
        v_len((gap << 2) | ITEM_SINGLE) as i64
    } else {
        (v_len((gap << 2) | ITEM_RUN) + v_len((last - first) as u64 - 1)) as i64
    }
}

fn bitmap_cost(next: u64, first: u32, last: u32) -> i64 {
    let gap = first as u64 - next;
    let nbits = (last - first) as u64 + 1;
    (v_len((gap << 2) | ITEM_BITMAP) + v_len(nbits)) as i64 + nbits.div_ceil(8) as i64
}

/// Chooses items for the set's runs: greedily, from each run, the bitmap (over that run and
/// some following ones) that saves the most bytes against single/run items, if any does.
fn plan_items(runs: &[(u32, u32)]) -> Vec<Item> {
    let mut items = Vec::new();
    // The block after the previous item's last (what gaps are measured from).
    let mut next: u64 = 0;
    let mut i = 0;
    while let Some(&(first, first_last)) = runs.get(i) {
        let (mut best_j, mut best_last, mut best_saving) = (i, first_last, 0i64);
        let mut items_cost = 0i64;
        let mut cursor = next;
        for (j, &(f, l)) in runs.iter().enumerate().skip(i) {
            items_cost += item_cost(cursor, f, l);
            cursor = l as u64 + 1;
            let saving = items_cost - bitmap_cost(next, first, l);
            if saving > best_saving {
                (best_j, best_last, best_saving) = (j, l, saving);
            } else if saving < best_saving - BITMAP_SLACK || j - best_j > BITMAP_LOOKAHEAD {
                break;
            }
        }
        if best_saving > 0 {
            items.push(Item::Bitmap(first, best_last, i..best_j + 1));
            next = best_last as u64 + 1;
            i = best_j + 1;
        } else {
            let (f, l) = (first, first_last);
            items.push(if f == l {
                Item::Single(f)
            } else {
                Item::Run(f, l)
            });
            next = l as u64 + 1;
            i += 1;
        }
    }
    items
}

fn encode_blocks(out: &mut Vec<u8>, set: &BlockSet) {
    let runs: Vec<(u32, u32)> = set.ranges().map(|r| (*r.start(), *r.end())).collect();
    let items = plan_items(&runs);
    put_v(out, items.len() as u64);
    let mut next: u64 = 0;
    for item in items {
        match item {
            Item::Single(b) => {
                put_v(out, ((b as u64 - next) << 2) | ITEM_SINGLE);
                next = b as u64 + 1;
            }
            Item::Run(f, l) => {
                put_v(out, ((f as u64 - next) << 2) | ITEM_RUN);
                put_v(out, (l - f) as u64 - 1);
                next = l as u64 + 1;
            }
            Item::Bitmap(f, l, held) => {
                put_v(out, ((f as u64 - next) << 2) | ITEM_BITMAP);
                let nbits = (l - f) as u64 + 1;
                put_v(out, nbits);
                let start = out.len();
                out.resize(start + nbits.div_ceil(8) as usize, 0);
                let bitmap = out.get_mut(start..).unwrap_or_default();
                for &(rf, rl) in runs.get(held).unwrap_or_default() {
                    for b in rf..=rl {
                        let bit = (b - f) as usize;
                        if let Some(byte) = bitmap.get_mut(bit / 8) {
                            *byte |= 1 << (bit % 8);
                        }
                    }
                }
                next = l as u64 + 1;
            }
        }
    }
}

fn decode_blocks(r: &mut Reader<'_>) -> Result<BlockSet> {
    let nitems = r.v("block item count")?;
    let mut set = BlockSet::new();
    let mut next: u64 = 0;
    for _ in 0..nitems {
        let head = r.v("block item")?;
        let first = next
            .checked_add(head >> 2)
            .filter(|&f| f <= u32::MAX as u64)
            .ok_or_else(|| r.err("block number out of range".into()))?;
        let last = match head & 3 {
            ITEM_SINGLE => first,
            ITEM_RUN => first
                .checked_add(r.v("run length")?)
                .and_then(|l| l.checked_add(1))
                .filter(|&l| l <= u32::MAX as u64)
                .ok_or_else(|| r.err("block run out of range".into()))?,
            ITEM_BITMAP => {
                let nbits = r.v("bitmap length")?;
                let last = first
                    .checked_add(nbits)
                    .and_then(|e| e.checked_sub(1))
                    .filter(|&l| nbits > 0 && l <= u32::MAX as u64)
                    .ok_or_else(|| r.err("bitmap out of range".into()))?;
                let bits = r.bytes(nbits.div_ceil(8), "bitmap")?;
                let pad = (nbits % 8) as u32;
                if pad != 0 && bits.last().is_some_and(|&b| b >> pad != 0) {
                    return Err(r.err("bitmap padding bits are set".into()));
                }
                bitmap_into(&mut set, first as u32, bits);
                last
            }
            _ => return Err(r.err(format!("unknown block item kind {}", head & 3))),
        };
        if head & 3 != ITEM_BITMAP {
            set.insert_range(first as u32..=last as u32);
        }
        next = last + 1;
    }
    Ok(set)
}

/// Adds the runs of set bits of `bits` (bit i = block `first + i`) to `set`.
fn bitmap_into(set: &mut BlockSet, first: u32, bits: &[u8]) {
    let mut run_start: Option<u32> = None;
    let mut b = first;
    for (i, &byte) in bits.iter().enumerate() {
        if byte == 0xFF && run_start.is_some() || byte == 0 && run_start.is_none() {
            b = first.wrapping_add(((i + 1) * 8) as u32);
            continue;
        }
        for bit in 0..8 {
            let on = byte & (1 << bit) != 0;
            match (on, run_start) {
                (true, None) => run_start = Some(b),
                (false, Some(s)) => {
                    set.insert_range(s..=b.wrapping_sub(1));
                    run_start = None;
                }
                _ => {}
            }
            b = b.wrapping_add(1);
        }
    }
    if let Some(s) = run_start {
        // Padding bits are 0 and the item ends at or before u32::MAX, so the run's last
        // block is the last set bit, b - 1 (b may have wrapped past u32::MAX to 0).
        set.insert_range(s..=b.wrapping_sub(1));
    }
}

fn v_len(mut x: u64) -> usize {
    let mut n = 1;
    while x >= 0x80 {
        x >>= 7;
        n += 1;
    }
    n
}

fn put_v(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn put_z(out: &mut Vec<u8>, x: i64) {
    put_v(out, ((x << 1) ^ (x >> 63)) as u64);
}

/// A bounds-checked cursor over the body: every read returns a `Corruption` error naming
/// the file, the field and the body offset instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: String) -> Error {
        Error::corruption(format!(
            "corrupt block index file {}: {msg} (body offset {})",
            self.what, self.pos
        ))
    }

    fn bytes(&mut self, n: u64, field: &str) -> Result<&'a [u8]> {
        let buf: &'a [u8] = self.buf;
        let rest = buf.get(self.pos..).unwrap_or_default();
        let Some((s, _)) = usize::try_from(n)
            .ok()
            .and_then(|n| rest.split_at_checked(n))
        else {
            return Err(self.err(format!(
                "{field}: needs {n} bytes, only {} left (truncated body)",
                rest.len()
            )));
        };
        self.pos += s.len();
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let b = self.bytes(N as u64, field)?;
        // `bytes` gave exactly N bytes.
        Ok(b.try_into().unwrap_or([0; N]))
    }

    fn u8(&mut self, field: &str) -> Result<u8> {
        let [b] = self.array(field)?;
        Ok(b)
    }

    fn u64_le(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn v(&mut self, field: &str) -> Result<u64> {
        let mut x: u64 = 0;
        for i in 0..10 {
            let b = self.u8(field)?;
            if i == 9 && b > 1 {
                return Err(self.err(format!("{field}: varint overflows 64 bits")));
            }
            x |= ((b & 0x7F) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err(self.err(format!("{field}: varint longer than 10 bytes")))
    }

    fn v32(&mut self, field: &str) -> Result<u32> {
        let x = self.v(field)?;
        u32::try_from(x).map_err(|_| self.err(format!("{field}: {x} does not fit in 32 bits")))
    }

    fn z(&mut self, field: &str) -> Result<i64> {
        let x = self.v(field)?;
        Ok(((x >> 1) as i64) ^ -((x & 1) as i64))
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn key(spc: u32, db: u32, rel: u32, fork: u8) -> RelFork {
        RelFork { spc, db, rel, fork }
    }

    /// A small index that uses every field and every event variant.
    fn small_index() -> SegmentIndex {
        let mut ix = SegmentIndex::empty(15, 16 << 20, 8192, 0x7300_1122_3344_5566, 1, 0x21);
        ix.start_lsn = Lsn(0x2100_0028);
        ix.end_lsn = Lsn(0x21FF_FFD8);
        ix.records = 12_345;
        ix.switched = true;
        ix.last_commit_time = Some(-1);
        ix.last_xid = Some(742);
        let f = ix.fork_mut(key(1663, 5, 16384, 0));
        for b in [0, 1, 2, 3, 7, 100] {
            f.blocks.insert(b);
        }
        let f = ix.fork_mut(key(1663, 5, 16384, 2));
        f.apply_limit(1);
        ix.fork_mut(key(1663, 5, 16390, 0)).created = true;
        ix.fork_mut(key(1663, 5, 16390, 0)).apply_limit(0);
        let f = ix.fork_mut(key(1664, 0, 1262, 0));
        f.dropped = true;
        f.apply_limit(0);
        f.blocks.insert(0);
        ix.db_events.push(DbEvent {
            lsn: Lsn(0x2100_1000),
            spc: 1663,
            db: 16400,
            kind: DbEventKind::CreatedFileCopy {
                src_spc: 1663,
                src_db: 1,
            },
        });
        ix.db_events.push(DbEvent {
            lsn: Lsn(0x2100_2000),
            spc: 1663,
            db: 16401,
            kind: DbEventKind::CreatedWalLog,
        });
        ix.db_events.push(DbEvent {
            lsn: Lsn(0x2100_3000),
            spc: 16500,
            db: 16402,
            kind: DbEventKind::Dropped,
        });
        ix.other_events = vec![
            OtherEvent::RelmapUpdate {
                lsn: Lsn(0x2100_4000),
                spc: 1664,
                db: 0,
            },
            OtherEvent::TablespaceCreate {
                lsn: Lsn(0x2100_5000),
                spc: 16500,
            },
            OtherEvent::TablespaceDrop {
                lsn: Lsn(0x2100_6000),
                spc: 16500,
            },
            OtherEvent::WalLevel {
                lsn: Lsn(0x2100_7000),
                wal_level: 1,
            },
            OtherEvent::RestorePoint {
                lsn: Lsn(0x2100_8000),
                name: "avant-mise à jour".into(),
                time: 838_000_000_000_000,
            },
        ];
        ix
    }

    fn roundtrip(ix: &SegmentIndex) -> Vec<u8> {
        let bytes = encode(ix);
        let back = decode(&bytes, "test.idx").unwrap();
        assert_eq!(&back, ix);
        // The encoding is canonical: re-encoding what was decoded gives the same bytes.
        assert_eq!(encode(&back), bytes);
        bytes
    }

    #[test]
    fn roundtrip_small_and_empty() {
        roundtrip(&small_index());
        let mut e = SegmentIndex::empty(13, 1 << 30, 8192, 0, 1, 0);
        roundtrip(&e);
        e.pending = true;
        e.wal_level_minimal = true;
        e.last_commit_time = Some(i64::MIN);
        e.last_xid = Some(u32::MAX);
        e.system_id = u64::MAX;
        e.end_lsn = Lsn(u64::MAX);
        e.records = u64::MAX;
        e.fork_mut(key(u32::MAX, u32::MAX, u32::MAX, u8::MAX))
            .blocks
            .insert(u32::MAX);
        e.fork_mut(key(0, 0, 0, 0)).limit_block = Some(u32::MAX);
        e.other_events.push(OtherEvent::RestorePoint {
            lsn: Lsn(1),
            name: String::new(),
            time: i64::MAX,
        });
        roundtrip(&e);
    }

    /// Golden bytes of version 1. If this fails, the format changed: bump [`VERSION`] (and
    /// keep reading version 1) or update these bytes on purpose.
    #[test]
    fn golden_v1() {
        #[rustfmt::skip]
        let expected: &[u8] = &[
            // magic "WLBI", version 1, reserved, body_len 178
            0x57, 0x4c, 0x42, 0x49, 0x01, 0x00, 0x00, 0x00, 0xb2, 0x00, 0x00, 0x00,
            // pg_major 15, seg_size 16 MiB, page 8192, system_id, tli 1, segno 0x21
            0x0f, 0x80, 0x80, 0x80, 0x08, 0x80, 0x40,
            0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, 0x73, 0x01, 0x21,
            // start_lsn, end_lsn, records 12345, flags (switched, time, xid), time -1, xid 742
            0xa8, 0x80, 0x80, 0x88, 0x02, 0xd8, 0xff, 0xff, 0x8f, 0x02, 0xb9, 0x60, 0x1a,
            0x01, 0xe6, 0x05,
            // 4 forks: 1663/5/16384 main, blocks {0-3 run, 7 single, 100 single}
            0x04, 0x00, 0xff, 0x0c, 0x05, 0x80, 0x80, 0x01, 0x00, 0x03, 0x01, 0x02, 0x0c, 0xf0,
            0x02,
            // (same db) 16384 vm, limit 1, no blocks
            0x0c, 0x80, 0x80, 0x01, 0x02, 0x01, 0x00,
            // (same db) 16390 main, created, limit 0, no blocks
            0x0d, 0x86, 0x80, 0x01, 0x00, 0x00, 0x00,
            // 1664/0/1262 main, dropped, limit 0, block 0
            0x06, 0x80, 0x0d, 0x00, 0xee, 0x09, 0x00, 0x00, 0x01, 0x00,
            // 3 db events: file copy from 1663/1, WAL-logged create, drop
            0x03, 0x80, 0xa0, 0x80, 0x88, 0x02, 0xff, 0x0c, 0x90, 0x80, 0x01, 0x00, 0xff, 0x0c,
            0x01,
            0x80, 0xc0, 0x80, 0x88, 0x02, 0xff, 0x0c, 0x91, 0x80, 0x01, 0x01,
            0x80, 0xe0, 0x80, 0x88, 0x02, 0xf4, 0x80, 0x01, 0x92, 0x80, 0x01, 0x02,
            // 5 other events: relmap, tablespace create, drop, wal_level, restore point
            0x05, 0x00, 0x80, 0x80, 0x81, 0x88, 0x02, 0x80, 0x0d, 0x00,
            0x01, 0x80, 0xa0, 0x81, 0x88, 0x02, 0xf4, 0x80, 0x01,
            0x02, 0x80, 0xc0, 0x81, 0x88, 0x02, 0xf4, 0x80, 0x01,
            0x03, 0x80, 0xe0, 0x81, 0x88, 0x02, 0x01,
            0x04, 0x80, 0x80, 0x82, 0x88, 0x02, 0x12, 0x61, 0x76, 0x61, 0x6e, 0x74, 0x2d, 0x6d,
            0x69, 0x73, 0x65, 0x20, 0xc3, 0xa0, 0x20, 0x6a, 0x6f, 0x75, 0x72,
            0x80, 0x80, 0x93, 0xc5, 0x82, 0x8a, 0xfd, 0x02,
            // CRC-32C
            0xf7, 0x40, 0xd3, 0x40,
        ];
        let bytes = roundtrip(&small_index());
        let hex: String = bytes.iter().map(|b| format!("0x{b:02x}, ")).collect();
        assert_eq!(bytes, expected, "\n{hex}");
    }

    #[test]
    fn big_sets_stay_small() {
        let mut ix = SegmentIndex::empty(16, 16 << 20, 8192, 1, 1, 1);
        // 1,000,000 consecutive blocks.
        let full = ix.fork_mut(key(1663, 5, 20000, 0));
        for b in 0..1_000_000 {
            full.blocks.insert(b);
        }
        let one_fork = encode(&ix).len();
        // 2,000,000 more blocks: every block but one in 50 of a 2,040,816-block fork
        // (dense irregular: bitmap), and 20,000 random blocks of a 32 TiB fork (sparse).
        let dense = ix.fork_mut(key(1663, 5, 20001, 0));
        for b in 0..2_040_816u32 {
            if b % 50 != 7 {
                dense.blocks.insert(b);
            }
        }
        let mut st = 42;
        let sparse = ix.fork_mut(key(1663, 5, 20002, 0));
        for _ in 0..20_000 {
            sparse
                .blocks
                .insert((xorshift(&mut st) % u32::MAX as u64) as u32);
        }
        sparse.blocks.normalize();
        let bytes = roundtrip(&ix);
        let total: usize = ix.forks.values().map(|f| f.blocks.len()).sum();
        assert!(total > 3_000_000);
        // One fork with a million blocks: the fixed fields plus a handful of bytes.
        assert!(one_fork < 64, "{one_fork} bytes");
        // Dense: 2,040,816 bits is 255,102 bytes; runs of 49 would cost ~3 bytes each, more.
        // Sparse: 20,000 gaps of ~2^18.6 blocks: 3 bytes each.
        assert!(
            bytes.len() < 255_200 + 60_000 + 100,
            "{} bytes",
            bytes.len()
        );
    }

    #[test]
    fn bitmap_and_runs_chosen_per_region() {
        // A dense irregular region (bitmap), a long run, then sparse singles: all in one fork.
        let mut set = BlockSet::new();
        for b in (0..4096).filter(|b| b % 3 != 0) {
            set.insert(b);
        }
        set.insert_range(10_000..=2_000_000);
        for b in (3_000_000..3_100_000).step_by(997) {
            set.insert(b);
        }
        let mut ix = SegmentIndex::empty(17, 16 << 20, 8192, 1, 1, 1);
        ix.fork_mut(key(1663, 5, 1, 0)).blocks = set;
        let n = roundtrip(&ix).len();
        // bitmap 512 bytes + run ~6 + 101 singles × 2 + fixed fields.
        assert!(n < 512 + 6 + 101 * 2 + 80, "{n} bytes");
    }

    #[test]
    fn random_sets_roundtrip() {
        let mut st = 7u64;
        for round in 0..300 {
            let mut ix = SegmentIndex::empty(14, 16 << 20, 8192, 1, 1, round);
            for f in 0..(xorshift(&mut st) % 6) {
                let span =
                    [40u64, 1000, 1 << 20, u32::MAX as u64 + 1][(xorshift(&mut st) % 4) as usize];
                let fc = ix.fork_mut(key(1663, (f % 2) as u32, f as u32, (f % 4) as u8));
                for _ in 0..(xorshift(&mut st) % 500) {
                    let b = (xorshift(&mut st) % span) as u32;
                    if xorshift(&mut st).is_multiple_of(5) {
                        fc.blocks
                            .insert_range(b..=b.saturating_add((xorshift(&mut st) % 70) as u32));
                    } else {
                        fc.blocks.insert(b);
                    }
                }
            }
            roundtrip(&ix);
        }
    }

    #[test]
    fn flipped_byte_anywhere_fails_checksum() {
        let bytes = encode(&small_index());
        for pos in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut b = bytes.clone();
                b[pos] ^= flip;
                let e = decode(&b, "pos.idx").unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Corruption);
                assert!(e.message().contains("pos.idx"), "{e}");
                if pos < 4 {
                    assert!(e.message().contains("bad magic"), "{e}");
                } else {
                    assert!(e.message().contains("checksum mismatch"), "byte {pos}: {e}");
                }
            }
        }
    }

    #[test]
    fn unknown_version_is_refused_clearly() {
        let mut b = encode(&small_index());
        b[4..6].copy_from_slice(&2u16.to_le_bytes());
        let n = b.len();
        let crc = crc32c::crc32c(&b[..n - 4]);
        b[n - 4..].copy_from_slice(&crc.to_le_bytes());
        let e = decode(&b, "future.idx").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption);
        assert!(
            e.message()
                .contains("unsupported index format version 2 in future.idx"),
            "{e}"
        );
    }

    #[test]
    fn truncated_file_is_an_error() {
        let bytes = encode(&small_index());
        for len in 0..bytes.len() {
            let e = decode(&bytes[..len], "short.idx").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corruption);
            assert!(e.message().contains("short.idx"), "{e}");
            if len >= 4 {
                assert!(e.message().contains("truncated"), "{len}: {e}");
            }
        }
        // A body that is short but carries a valid checksum (a buggy writer) is still caught
        // by the structure checks.
        let mut b = bytes[..HEADER_LEN + 5].to_vec();
        b[8..12].copy_from_slice(&5u32.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let e = decode(&b, "short.idx").unwrap_err();
        assert!(e.message().contains("truncated body"), "{e}");
    }

    /// Random mutations, with the checksum fixed up so that the body parser sees them: no
    /// panic, and whatever decodes re-encodes and decodes to the same index.
    #[test]
    fn fuzz_mutations_never_panic() {
        let mut base = small_index();
        let f = base.fork_mut(key(1663, 5, 17000, 0));
        for b in (0..3000).filter(|b| b % 3 != 0) {
            f.blocks.insert(b);
        }
        f.blocks.insert_range(5000..=9000);
        let seed_bytes = encode(&base);
        let mut st = 0xDEAD_BEEF_u64;
        let mut decoded = 0;
        for _ in 0..20_000 {
            let mut b = seed_bytes.clone();
            let n_mut = 1 + xorshift(&mut st) % 4;
            for _ in 0..n_mut {
                let body_end = b.len() - TRAILER_LEN;
                match xorshift(&mut st) % 4 {
                    0 | 1 => {
                        let p = HEADER_LEN + (xorshift(&mut st) as usize % (body_end - HEADER_LEN));
                        b[p] = xorshift(&mut st) as u8;
                    }
                    2 => {
                        let p = HEADER_LEN + (xorshift(&mut st) as usize % (body_end - HEADER_LEN));
                        b.remove(p);
                    }
                    _ => {
                        let p = HEADER_LEN + (xorshift(&mut st) as usize % (body_end - HEADER_LEN));
                        b.insert(p, xorshift(&mut st) as u8);
                    }
                }
            }
            let body_len = (b.len() - HEADER_LEN - TRAILER_LEN) as u32;
            b[8..12].copy_from_slice(&body_len.to_le_bytes());
            let n = b.len();
            let crc = crc32c::crc32c(&b[..n - 4]);
            b[n - 4..].copy_from_slice(&crc.to_le_bytes());
            match decode(&b, "fuzz.idx") {
                Ok(ix) => {
                    decoded += 1;
                    assert_eq!(decode(&encode(&ix), "re.idx").unwrap(), ix);
                }
                Err(e) => assert_eq!(e.kind(), ErrorKind::Corruption),
            }
        }
        // Also: fully random bytes behind a valid header.
        for _ in 0..5_000 {
            let len = (xorshift(&mut st) % 200) as usize;
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&0u16.to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            b.extend((0..len).map(|_| xorshift(&mut st) as u8));
            let crc = crc32c::crc32c(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            if let Ok(ix) = decode(&b, "rand.idx") {
                assert_eq!(decode(&encode(&ix), "re.idx").unwrap(), ix);
            }
        }
        assert!(
            decoded > 0,
            "no mutation decoded: the test exercises nothing"
        );
    }

    /// A corrupt length field can claim 2^64 items or bytes: decoding must fail fast,
    /// without allocating for the claim.
    #[test]
    fn huge_claimed_lengths_do_not_allocate() {
        let mut ix = SegmentIndex::empty(15, 16 << 20, 8192, 1, 1, 1);
        ix.other_events.push(OtherEvent::RestorePoint {
            lsn: Lsn(1),
            name: "x".into(),
            time: 0,
        });
        let bytes = encode(&ix);
        // Replace the name length (1) by u64::MAX as a 10-byte varint.
        let pos = bytes.len() - TRAILER_LEN - 3;
        assert_eq!(&bytes[pos..pos + 2], &[1, b'x']);
        let mut b = bytes[..pos].to_vec();
        b.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]);
        b.extend_from_slice(&bytes[pos + 1..bytes.len() - TRAILER_LEN]);
        let body_len = (b.len() - HEADER_LEN) as u32;
        b[8..12].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let e = decode(&b, "huge.idx").unwrap_err();
        assert!(e.message().contains("truncated body"), "{e}");
    }
}
