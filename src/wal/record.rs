//! One reassembled WAL record: its header, block references and special events
//! (WAL-FORMAT.md §2.1, §2.4–2.8, §3.1–3.2).

#![deny(clippy::indexing_slicing)]

use crate::error::{Error, Result};
use crate::types::Lsn;
use crate::wal::version::VersionTable;

pub const SIZE_OF_XLOG_RECORD: usize = 24;
/// Largest record PostgreSQL can read back (`AllocSizeIsValid`; 16+ refuses to insert more
/// than 1020 MiB).
pub const MAX_RECORD_LEN: u32 = 0x3FFF_FFFF;

pub const XLR_SPECIAL_REL_UPDATE: u8 = 0x01;
pub const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

const BKPBLOCK_FORK_MASK: u8 = 0x0F;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_HAS_DATA: u8 = 0x20;
const BKPBLOCK_WILL_INIT: u8 = 0x40;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;

/// Resource manager ids (identical 13–18).
pub mod rmgr {
    pub const XLOG: u8 = 0;
    pub const XACT: u8 = 1;
    pub const SMGR: u8 = 2;
    pub const DBASE: u8 = 4;
    pub const TBLSPC: u8 = 5;
    pub const RELMAP: u8 = 7;
    pub const HEAP: u8 = 10;
    /// `RM_MAX_BUILTIN_ID` (LogicalMessage) in 13–18.
    pub const MAX_BUILTIN: u8 = 21;
    pub const MIN_CUSTOM: u8 = 128;
}

/// XLOG rmgr opcodes (`pg_control.h`).
pub mod xlog_info {
    pub const CHECKPOINT_SHUTDOWN: u8 = 0x00;
    pub const CHECKPOINT_ONLINE: u8 = 0x10;
    pub const SWITCH: u8 = 0x40;
    pub const PARAMETER_CHANGE: u8 = 0x60;
    pub const RESTORE_POINT: u8 = 0x70;
    pub const END_OF_RECOVERY: u8 = 0x90;
    pub const CHECKPOINT_REDO: u8 = 0xE0;
}

/// `RelFileNode` (13–15) / `RelFileLocator` (16+): 12 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelFileLocator {
    pub spc: u32,
    pub db: u32,
    pub rel: u32,
}

/// One block reference of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    pub block_id: u8,
    pub rel: RelFileLocator,
    /// 0 main, 1 fsm, 2 vm, 3 init.
    pub fork: u8,
    pub blkno: u32,
    pub has_image: bool,
    pub has_data: bool,
    pub will_init: bool,
    /// The image must be restored at redo (`BKPIMAGE_APPLY`); false for images logged only
    /// for `wal_consistency_checking`.
    pub apply_image: bool,
    /// The image is compressed (pglz, lz4 or zstd); images are never decompressed here.
    pub image_compressed: bool,
    pub image_len: u16,
    pub hole_offset: u16,
    pub hole_length: u16,
    pub data_len: u16,
}

/// Kind of a transaction-end record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XactKind {
    Commit,
    Abort,
    CommitPrepared,
    AbortPrepared,
}

/// Which record carried a `wal_level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalLevelSource {
    Checkpoint,
    EndOfRecovery,
    ParameterChange,
    CheckpointRedo,
}

/// A record whose effect on relation files (or on backups) is not, or not only, expressed
/// by its block references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelEvent {
    /// `XLOG_SMGR_CREATE`: an empty fork file is created.
    SmgrCreate {
        rel: RelFileLocator,
        fork: u8,
    },
    /// `XLOG_SMGR_TRUNCATE`: `flags` has `SMGR_TRUNCATE_HEAP` 1, `_VM` 2, `_FSM` 4.
    SmgrTruncate {
        rel: RelFileLocator,
        blkno: u32,
        flags: u32,
    },
    /// `XLOG_DBASE_CREATE` (≤14) / `CREATE_FILE_COPY` (15+): a directory copy without WAL.
    DbCreateFileCopy {
        db: u32,
        spc: u32,
        src_db: u32,
        src_spc: u32,
    },
    /// `XLOG_DBASE_CREATE_WAL_LOG` (15+).
    DbCreateWalLog {
        db: u32,
        spc: u32,
    },
    /// `XLOG_DBASE_DROP`: the database directory in each listed tablespace is removed.
    DbDrop {
        db: u32,
        spcs: Vec<u32>,
    },
    /// Commit/abort (also of prepared transactions), with the relations it unlinks.
    XactEnd {
        kind: XactKind,
        /// PostgreSQL epoch microseconds.
        xact_time: i64,
        /// The two-phase xid for prepared transactions, else the record's xid (may be 0).
        xid: u32,
        rels: Vec<RelFileLocator>,
    },
    /// `XLOG_RELMAP_UPDATE`: `pg_filenode.map` of (spc, db) rewritten; db 0 = global.
    RelmapUpdate {
        db: u32,
        spc: u32,
        nbytes: u32,
    },
    TablespaceCreate {
        spc: u32,
        path: String,
    },
    TablespaceDrop {
        spc: u32,
    },
    /// 0 minimal, 1 replica, 2 logical.
    WalLevel {
        wal_level: u32,
        source: WalLevelSource,
    },
    RestorePoint {
        time: i64,
        name: String,
    },
    /// `XLOG_SWITCH`: the rest of the segment is unused.
    Switch,
}

/// Everything about a record except where its bytes live (kept in the decoder and
/// overwritten per record, so that nothing large moves per record).
#[derive(Debug, Default)]
pub(crate) struct RecordMeta {
    pub lsn: Lsn,
    pub end_lsn: Lsn,
    pub tot_len: u32,
    pub xid: u32,
    pub prev: Lsn,
    pub info: u8,
    pub rmid: u8,
    pub main_data_len: u32,
    pub toplevel_xid: Option<u32>,
    pub origin: Option<u16>,
    pub event: Option<RelEvent>,
}

/// A decoded record, borrowing its block references and main data from the decoder.
#[derive(Debug)]
pub struct DecodedRecord<'a> {
    /// Start of the record.
    pub lsn: Lsn,
    /// First byte after the record (page headers counted; not aligned). For `XLOG_SWITCH`
    /// this is the end of the record itself, not of the segment.
    pub end_lsn: Lsn,
    pub tot_len: u32,
    pub xid: u32,
    pub prev: Lsn,
    pub info: u8,
    pub rmid: u8,
    pub blocks: &'a [BlockRef],
    pub main_data: &'a [u8],
    pub toplevel_xid: Option<u32>,
    pub origin: Option<u16>,
    pub event: Option<&'a RelEvent>,
}

impl<'a> DecodedRecord<'a> {
    pub(crate) fn from_meta(
        meta: &'a RecordMeta,
        record: &'a [u8],
        blocks: &'a [BlockRef],
    ) -> DecodedRecord<'a> {
        let len = record.len();
        let main_data = record
            .get(len.saturating_sub(meta.main_data_len as usize)..)
            .unwrap_or(&[]);
        DecodedRecord {
            lsn: meta.lsn,
            end_lsn: meta.end_lsn,
            tot_len: meta.tot_len,
            xid: meta.xid,
            prev: meta.prev,
            info: meta.info,
            rmid: meta.rmid,
            blocks,
            main_data,
            toplevel_xid: meta.toplevel_xid,
            origin: meta.origin,
            event: meta.event.as_ref(),
        }
    }

    /// The rmgr-specific opcode bits (`xl_info & 0xF0`).
    pub fn opcode(&self) -> u8 {
        self.info & 0xF0
    }
}

/// Little-endian reads at fixed offsets that fail instead of panicking.
#[inline]
pub(crate) fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(s.try_into().ok()?))
}

#[inline]
pub(crate) fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

#[inline]
pub(crate) fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

fn rel_at(b: &[u8], at: usize) -> Option<RelFileLocator> {
    Some(RelFileLocator {
        spc: le_u32(b, at)?,
        db: le_u32(b, at + 4)?,
        rel: le_u32(b, at + 8)?,
    })
}

/// CRC-32C of a whole record, in PostgreSQL's order: the bytes after the header first,
/// then header bytes 0..20 (everything before `xl_crc`).
#[inline]
pub fn record_crc(record: &[u8]) -> Option<u32> {
    let body = record.get(SIZE_OF_XLOG_RECORD..)?;
    let head = record.get(..20)?;
    Some(crc_append(crc_append(0, body), head))
}

/// CRC-32C of `data` continuing `crc` (as `crc32c::crc32c_append`). Most records are
/// tens of bytes, where the crate's three-way-parallel setup costs more than the CRC
/// itself; short inputs take a plain SSE4.2 loop instead.
#[inline]
pub fn crc_append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if data.len() <= 256 && std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU has SSE4.2, checked just above.
            return unsafe { crc_short_sse42(crc, data) };
        }
    }
    crc32c::crc32c_append(crc, data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn crc_short_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u16, _mm_crc32_u32, _mm_crc32_u64, _mm_crc32_u8};
    let mut c = (!crc) as u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        c = _mm_crc32_u64(c, u64::from_le_bytes(a));
    }
    let mut c = c as u32;
    let mut rest = words.remainder();
    if let Some((w, r)) = rest.split_first_chunk::<4>() {
        c = _mm_crc32_u32(c, u32::from_le_bytes(*w));
        rest = r;
    }
    if let Some((w, r)) = rest.split_first_chunk::<2>() {
        c = _mm_crc32_u16(c, u16::from_le_bytes(*w));
        rest = r;
    }
    if let Some(&b) = rest.first() {
        c = _mm_crc32_u8(c, b);
    }
    !c
}

fn bad(lsn: Lsn, what: impl std::fmt::Display) -> Error {
    Error::corruption(format!("invalid WAL record at {lsn}: {what}"))
}

/// Decodes the block headers of a CRC-checked record (`DecodeXLogRecord`), filling `blocks`.
/// A forward reader over record bytes; every read is checked.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    #[inline]
    fn u8(&mut self) -> Option<u8> {
        let (&x, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(x)
    }
    #[inline]
    fn u16(&mut self) -> Option<u16> {
        let (h, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_le_bytes(*h))
    }
    #[inline]
    fn u32(&mut self) -> Option<u32> {
        let (h, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*h))
    }
    #[inline]
    fn rel(&mut self) -> Option<RelFileLocator> {
        let (h, rest) = self.0.split_first_chunk::<12>()?;
        self.0 = rest;
        Some(RelFileLocator {
            spc: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            db: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
            rel: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
        })
    }
}

/// Decodes the block headers of a CRC-checked record (`DecodeXLogRecord`), filling `blocks`
/// and `out`.
pub(crate) fn decode_record(
    record: &[u8],
    lsn: Lsn,
    end_lsn: Lsn,
    vt: &VersionTable,
    blcksz: u32,
    blocks: &mut Vec<BlockRef>,
    out: &mut RecordMeta,
) -> Result<()> {
    blocks.clear();
    let short = || bad(lsn, "record is too short for its block headers");
    let (head, body) = record
        .split_first_chunk::<SIZE_OF_XLOG_RECORD>()
        .ok_or_else(short)?;
    let tot_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let xid = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let prev = Lsn(le_u64(head, 8).ok_or_else(short)?);
    let info = head[16];
    let rmid = head[17];
    let mut c = Cur(body);
    let mut datatotal: u64 = 0;
    let mut main_data_len: u32 = 0;
    let mut max_block_id: i32 = -1;
    let mut last_rel: Option<RelFileLocator> = None;
    let mut toplevel_xid = None;
    let mut origin = None;
    while (c.0.len() as u64) > datatotal {
        let block_id = c.u8().ok_or_else(short)?;
        match block_id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_data_len = c.u8().ok_or_else(short)? as u32;
                datatotal += main_data_len as u64;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_data_len = c.u32().ok_or_else(short)?;
                datatotal += main_data_len as u64;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => {
                origin = Some(c.u16().ok_or_else(short)?);
            }
            XLR_BLOCK_ID_TOPLEVEL_XID if vt.has_toplevel_xid => {
                toplevel_xid = Some(c.u32().ok_or_else(short)?);
            }
            id if id <= XLR_MAX_BLOCK_ID => {
                if (id as i32) <= max_block_id {
                    return Err(bad(lsn, format!("out-of-order block_id {id}")));
                }
                max_block_id = id as i32;
                let fork_flags = c.u8().ok_or_else(short)?;
                let data_len = c.u16().ok_or_else(short)?;
                let has_image = fork_flags & BKPBLOCK_HAS_IMAGE != 0;
                let has_data = fork_flags & BKPBLOCK_HAS_DATA != 0;
                if has_data != (data_len > 0) {
                    return Err(bad(
                        lsn,
                        format!("BKPBLOCK_HAS_DATA does not match data length {data_len}"),
                    ));
                }
                datatotal += data_len as u64;
                let (mut image_len, mut hole_offset, mut hole_length) = (0u16, 0u16, 0u16);
                let (mut apply_image, mut image_compressed) = (false, false);
                if has_image {
                    image_len = c.u16().ok_or_else(short)?;
                    hole_offset = c.u16().ok_or_else(short)?;
                    let bimg_info = c.u8().ok_or_else(short)?;
                    apply_image = bimg_info & vt.bimg_apply != 0;
                    image_compressed = bimg_info & vt.bimg_compressed_mask != 0;
                    let has_hole = bimg_info & BKPIMAGE_HAS_HOLE != 0;
                    if image_compressed {
                        if has_hole {
                            hole_length = c.u16().ok_or_else(short)?;
                        }
                    } else {
                        hole_length = blcksz.saturating_sub(image_len as u32) as u16;
                    }
                    datatotal += image_len as u64;
                    let len = image_len as u32;
                    let ok = if has_hole {
                        hole_offset != 0 && hole_length != 0 && len != blcksz
                    } else {
                        hole_offset == 0 && hole_length == 0 && (image_compressed || len == blcksz)
                    } && !(image_compressed && len == blcksz);
                    if !ok {
                        return Err(bad(
                            lsn,
                            format!(
                                "inconsistent image of block_id {id}: length {len}, hole offset {hole_offset}, hole length {hole_length}, bimg_info {bimg_info:#x}"
                            ),
                        ));
                    }
                }
                let rel = if fork_flags & BKPBLOCK_SAME_REL != 0 {
                    last_rel.ok_or_else(|| {
                        bad(
                            lsn,
                            format!(
                                "BKPBLOCK_SAME_REL on block_id {id} without a previous relation"
                            ),
                        )
                    })?
                } else {
                    let r = c.rel().ok_or_else(short)?;
                    last_rel = Some(r);
                    r
                };
                let blkno = c.u32().ok_or_else(short)?;
                // Built in one go: filling a stack copy field by field and then moving it
                // into the vector stalled on store forwarding.
                blocks.push(BlockRef {
                    block_id: id,
                    rel,
                    fork: fork_flags & BKPBLOCK_FORK_MASK,
                    blkno,
                    has_image,
                    has_data,
                    will_init: fork_flags & BKPBLOCK_WILL_INIT != 0,
                    apply_image,
                    image_compressed,
                    image_len,
                    hole_offset,
                    hole_length,
                    data_len,
                });
            }
            other => return Err(bad(lsn, format!("invalid block_id {other}"))),
        }
    }
    if c.0.len() as u64 != datatotal {
        return Err(bad(
            lsn,
            format!(
                "block headers announce {datatotal} payload bytes, {} remain",
                c.0.len()
            ),
        ));
    }
    let main = record
        .get(record.len() - main_data_len as usize..)
        .ok_or_else(short)?;
    out.event = if rmid <= rmgr::RELMAP || info & XLR_SPECIAL_REL_UPDATE != 0 {
        parse_event(lsn, rmid, info, xid, main, vt)?
    } else {
        None
    };
    out.lsn = lsn;
    out.end_lsn = end_lsn;
    out.tot_len = tot_len;
    out.xid = xid;
    out.prev = prev;
    out.info = info;
    out.rmid = rmid;
    out.main_data_len = main_data_len;
    out.toplevel_xid = toplevel_xid;
    out.origin = origin;
    Ok(())
}

fn short_main(lsn: Lsn, what: &str) -> Error {
    bad(lsn, format!("main data of {what} record is too short"))
}

/// Models the records that change relation files beyond their block references, and the
/// few others a backup cares about. A record flagged `XLR_SPECIAL_REL_UPDATE` that is not
/// modelled here is an error: skipping it could lose a file change.
fn parse_event(
    lsn: Lsn,
    rmid: u8,
    info: u8,
    xid: u32,
    main: &[u8],
    vt: &VersionTable,
) -> Result<Option<RelEvent>> {
    let op = info & 0xF0;
    let special = info & XLR_SPECIAL_REL_UPDATE != 0;
    let ev = match rmid {
        rmgr::XLOG => match op {
            xlog_info::SWITCH => Some(RelEvent::Switch),
            xlog_info::CHECKPOINT_SHUTDOWN | xlog_info::CHECKPOINT_ONLINE => {
                match vt.checkpoint_wal_level {
                    Some(off) => Some(RelEvent::WalLevel {
                        wal_level: le_u32(main, off)
                            .ok_or_else(|| short_main(lsn, "checkpoint"))?,
                        source: WalLevelSource::Checkpoint,
                    }),
                    None => None,
                }
            }
            xlog_info::END_OF_RECOVERY => match vt.end_of_recovery_wal_level {
                Some(off) => Some(RelEvent::WalLevel {
                    wal_level: le_u32(main, off)
                        .ok_or_else(|| short_main(lsn, "end-of-recovery"))?,
                    source: WalLevelSource::EndOfRecovery,
                }),
                None => None,
            },
            xlog_info::PARAMETER_CHANGE => Some(RelEvent::WalLevel {
                wal_level: le_u32(main, 20).ok_or_else(|| short_main(lsn, "parameter-change"))?,
                source: WalLevelSource::ParameterChange,
            }),
            xlog_info::CHECKPOINT_REDO if vt.has_checkpoint_redo => Some(RelEvent::WalLevel {
                wal_level: le_u32(main, 0).ok_or_else(|| short_main(lsn, "checkpoint-redo"))?,
                source: WalLevelSource::CheckpointRedo,
            }),
            xlog_info::RESTORE_POINT => {
                let time = le_u64(main, 0).ok_or_else(|| short_main(lsn, "restore-point"))? as i64;
                let name = main.get(8..).unwrap_or(&[]);
                let name = name.split(|&c| c == 0).next().unwrap_or(&[]);
                Some(RelEvent::RestorePoint {
                    time,
                    name: String::from_utf8_lossy(name).into_owned(),
                })
            }
            _ => None,
        },
        rmgr::SMGR => match op {
            0x10 => {
                let rel = rel_at(main, 0).ok_or_else(|| short_main(lsn, "smgr create"))?;
                let fork = le_u32(main, 12).ok_or_else(|| short_main(lsn, "smgr create"))?;
                if fork > 3 {
                    return Err(bad(lsn, format!("smgr create of invalid fork {fork}")));
                }
                Some(RelEvent::SmgrCreate {
                    rel,
                    fork: fork as u8,
                })
            }
            0x20 => {
                let e = || short_main(lsn, "smgr truncate");
                Some(RelEvent::SmgrTruncate {
                    blkno: le_u32(main, 0).ok_or_else(e)?,
                    rel: rel_at(main, 4).ok_or_else(e)?,
                    flags: le_u32(main, 16).ok_or_else(e)?,
                })
            }
            other => {
                return Err(bad(
                    lsn,
                    format!("unknown storage (smgr) opcode {other:#04x}"),
                ))
            }
        },
        rmgr::DBASE => {
            let e = || short_main(lsn, "database");
            if op == 0x00 {
                Some(RelEvent::DbCreateFileCopy {
                    db: le_u32(main, 0).ok_or_else(e)?,
                    spc: le_u32(main, 4).ok_or_else(e)?,
                    src_db: le_u32(main, 8).ok_or_else(e)?,
                    src_spc: le_u32(main, 12).ok_or_else(e)?,
                })
            } else if Some(op) == vt.dbase_create_wal_log {
                Some(RelEvent::DbCreateWalLog {
                    db: le_u32(main, 0).ok_or_else(e)?,
                    spc: le_u32(main, 4).ok_or_else(e)?,
                })
            } else if op == vt.dbase_drop {
                let db = le_u32(main, 0).ok_or_else(e)?;
                let n = le_u32(main, 4).ok_or_else(e)? as usize;
                if n > main.len() / 4 {
                    return Err(e());
                }
                let mut spcs = Vec::with_capacity(n);
                for i in 0..n {
                    spcs.push(le_u32(main, 8 + 4 * i).ok_or_else(e)?);
                }
                Some(RelEvent::DbDrop { db, spcs })
            } else {
                return Err(bad(
                    lsn,
                    format!(
                        "unknown database opcode {op:#04x} for PostgreSQL {}",
                        vt.version
                    ),
                ));
            }
        }
        rmgr::TBLSPC => match op {
            0x00 => {
                let spc = le_u32(main, 0).ok_or_else(|| short_main(lsn, "tablespace"))?;
                let path = main.get(4..).unwrap_or(&[]);
                let path = path.split(|&c| c == 0).next().unwrap_or(&[]);
                Some(RelEvent::TablespaceCreate {
                    spc,
                    path: String::from_utf8_lossy(path).into_owned(),
                })
            }
            0x10 => Some(RelEvent::TablespaceDrop {
                spc: le_u32(main, 0).ok_or_else(|| short_main(lsn, "tablespace"))?,
            }),
            _ => None,
        },
        rmgr::RELMAP if op == 0x00 => {
            let e = || short_main(lsn, "relmap");
            Some(RelEvent::RelmapUpdate {
                db: le_u32(main, 0).ok_or_else(e)?,
                spc: le_u32(main, 4).ok_or_else(e)?,
                nbytes: le_u32(main, 8).ok_or_else(e)?,
            })
        }
        rmgr::XACT => {
            let kind = match op & 0x70 {
                0x00 => Some(XactKind::Commit),
                0x20 => Some(XactKind::Abort),
                0x30 => Some(XactKind::CommitPrepared),
                0x40 => Some(XactKind::AbortPrepared),
                _ => None,
            };
            match kind {
                Some(kind) => Some(parse_xact_end(lsn, kind, info, xid, main, vt)?),
                None => None,
            }
        }
        _ => None,
    };
    if special && ev.is_none() {
        return Err(bad(
            lsn,
            format!(
                "record of resource manager {rmid} with info {info:#04x} is flagged XLR_SPECIAL_REL_UPDATE but is not understood; refusing to index it"
            ),
        ));
    }
    Ok(ev)
}

const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILENODES: u32 = 1 << 2;
const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;
const XLOG_XACT_HAS_INFO: u8 = 0x80;

/// Parses commit/abort main data (WAL-FORMAT.md §3.2) up to the two-phase xid.
fn parse_xact_end(
    lsn: Lsn,
    kind: XactKind,
    info: u8,
    xid: u32,
    main: &[u8],
    vt: &VersionTable,
) -> Result<RelEvent> {
    let e = || short_main(lsn, "transaction");
    let xact_time = le_u64(main, 0).ok_or_else(e)? as i64;
    let mut pos = 8usize;
    let mut rels = Vec::new();
    let mut out_xid = xid;
    if info & XLOG_XACT_HAS_INFO != 0 {
        let xinfo = le_u32(main, pos).ok_or_else(e)?;
        pos += 4;
        if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
            pos += 8;
        }
        if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
            let n = le_u32(main, pos).ok_or_else(e)? as usize;
            pos = pos
                .checked_add(4 + n.checked_mul(4).ok_or_else(e)?)
                .ok_or_else(e)?;
        }
        if xinfo & XACT_XINFO_HAS_RELFILENODES != 0 {
            let n = le_u32(main, pos).ok_or_else(e)? as usize;
            pos += 4;
            if n > main.len() / 12 {
                return Err(e());
            }
            rels.reserve(n);
            for _ in 0..n {
                rels.push(rel_at(main, pos).ok_or_else(e)?);
                pos += 12;
            }
        }
        // Only needed to reach the two-phase xid.
        if xinfo & XACT_XINFO_HAS_TWOPHASE != 0 {
            if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
                let item = vt.xact_stats_item.ok_or_else(|| {
                    bad(
                        lsn,
                        format!(
                            "dropped-stats flag in a PostgreSQL {} transaction record",
                            vt.version
                        ),
                    )
                })?;
                let n = le_u32(main, pos).ok_or_else(e)? as usize;
                pos = pos
                    .checked_add(4 + n.checked_mul(item).ok_or_else(e)?)
                    .ok_or_else(e)?;
            }
            if xinfo & XACT_XINFO_HAS_INVALS != 0
                && matches!(kind, XactKind::Commit | XactKind::CommitPrepared)
            {
                let n = le_u32(main, pos).ok_or_else(e)? as usize;
                pos = pos
                    .checked_add(4 + n.checked_mul(16).ok_or_else(e)?)
                    .ok_or_else(e)?;
            }
            out_xid = le_u32(main, pos).ok_or_else(e)?;
        }
    }
    Ok(RelEvent::XactEnd {
        kind,
        xact_time,
        xid: out_xid,
        rels,
    })
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod crc_tests {
    #[test]
    fn short_crc_equals_the_crate() {
        let data: Vec<u8> = (0..600u32).map(|i| (i * 7919 % 251) as u8).collect();
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 20, 34, 100, 255, 256, 257, 500] {
                let d = &data[start..start + len];
                assert_eq!(super::crc_append(0, d), crc32c::crc32c(d));
                assert_eq!(
                    super::crc_append(0x1234_5678, d),
                    crc32c::crc32c_append(0x1234_5678, d)
                );
            }
        }
    }
}
