//! Reading `global/pg_control` (`ControlFileData`, `src/include/catalog/pg_control.h`) for
//! PostgreSQL 13–18.
//!
//! Layout on x86-64/ARM64 (MAXALIGN 8), identical in 13–18 up to `data_checksum_version`:
//! ```text
//! Format: {
//!     0 system_identifier u64 | 8 pg_control_version u32 | 12 catalog_version_no u32
//!    16 state u32 | (pad) | 24 time i64 | 32 checkPoint u64
//!    40 checkPointCopy: { redo u64, ThisTimeLineID u32, PrevTimeLineID u32,
//!                         fullPageWrites bool, [17+: wal_level i32 @ +20], ... } (88 bytes)
//!   128 unloggedLSN u64 | 136 minRecoveryPoint u64 | 144 minRecoveryPointTLI u32 | (pad)
//!   152 backupStartPoint u64 | 160 backupEndPoint u64 | 168 backupEndRequired bool
//!   172 wal_level i32 | 176 wal_log_hints bool | 180 MaxConnections .. 196 max_locks_per_xact
//!   200 track_commit_timestamp bool | 204 maxAlign u32 | 208 floatFormat f64
//!   216 blcksz u32 | 220 relseg_size u32 | 224 xlog_blcksz u32 | 228 xlog_seg_size u32
//!   232 nameDataLen .. 244 loblksize | 248 float8ByVal bool | 252 data_checksum_version u32
//!   13–17: 256 mock_authentication_nonce[32] | 288 crc u32
//!   18:    256 default_char_signedness bool | 257 nonce[32] | 292 crc u32
//! }
//! ```
//! The CRC-32C covers every byte before `crc`; a match confirms both the file and the layout.

#![deny(clippy::indexing_slicing)]

use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::types::{Lsn, TimeLineId};

/// The fields walnut uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlFile {
    pub system_id: u64,
    pub pg_control_version: u32,
    pub catalog_version: u32,
    pub state: DbState,
    /// Last checkpoint record.
    pub checkpoint: Lsn,
    /// REDO start of the last checkpoint.
    pub redo: Lsn,
    pub timeline: TimeLineId,
    pub prev_timeline: TimeLineId,
    pub min_recovery_point: Lsn,
    pub min_recovery_point_tli: TimeLineId,
    pub backup_start_point: Lsn,
    pub backup_end_point: Lsn,
    pub backup_end_required: bool,
    /// 0 minimal, 1 replica, 2 logical.
    pub wal_level: i32,
    pub wal_log_hints: bool,
    pub block_size: u32,
    pub relseg_size: u32,
    pub wal_page_size: u32,
    pub wal_segment_size: u32,
    /// 0 when data checksums are off.
    pub data_checksum_version: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbState {
    Startup,
    Shutdowned,
    ShutdownedInRecovery,
    Shutdowning,
    InCrashRecovery,
    InArchiveRecovery,
    InProduction,
    Unknown(u32),
}

impl DbState {
    fn from_u32(v: u32) -> DbState {
        match v {
            0 => DbState::Startup,
            1 => DbState::Shutdowned,
            2 => DbState::ShutdownedInRecovery,
            3 => DbState::Shutdowning,
            4 => DbState::InCrashRecovery,
            5 => DbState::InArchiveRecovery,
            6 => DbState::InProduction,
            other => DbState::Unknown(other),
        }
    }

    /// Whether the cluster was shut down cleanly (a backup of it needs no WAL replay).
    pub fn is_shut_down(self) -> bool {
        matches!(self, DbState::Shutdowned | DbState::ShutdownedInRecovery)
    }
}

impl ControlFile {
    pub fn data_checksums(&self) -> bool {
        self.data_checksum_version != 0
    }

    /// Reads `PGDATA/global/pg_control`.
    pub fn read_from_pgdata(pgdata: &Path) -> Result<ControlFile> {
        let path = pgdata.join("global").join("pg_control");
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::invalid(format!(
                    "\"{}\" is not a PostgreSQL data directory (no global/pg_control)",
                    pgdata.display()
                ))
            } else {
                Error::io("read", &path, e)
            }
        })?;
        ControlFile::parse(&bytes, &path.display().to_string())
    }

    /// Parses pg_control bytes; `what` names the file in errors.
    pub fn parse(b: &[u8], what: &str) -> Result<ControlFile> {
        let u32_at = |off: usize| -> Result<u32> {
            b.get(off..off + 4)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| Error::corruption(format!("{what}: file too short for pg_control")))
        };
        let u64_at = |off: usize| -> Result<u64> {
            b.get(off..off + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| Error::corruption(format!("{what}: file too short for pg_control")))
        };
        let bool_at = |off: usize| -> Result<bool> {
            b.get(off)
                .map(|&v| v != 0)
                .ok_or_else(|| Error::corruption(format!("{what}: file too short for pg_control")))
        };
        let version = u32_at(8)?;
        let crc_off = match version {
            1300 | 1700 => 288,
            1800 => 292,
            v => {
                return Err(Error::invalid(format!(
                    "{what}: unsupported pg_control version {v} (walnut reads PostgreSQL 13–18)"
                )))
            }
        };
        let stored = u32_at(crc_off)?;
        let computed = crc32c::crc32c(b.get(..crc_off).unwrap_or_default());
        if stored != computed {
            return Err(Error::corruption(format!(
                "{what}: pg_control checksum mismatch (stored {stored:08X}, computed {computed:08X})"
            )));
        }
        Ok(ControlFile {
            system_id: u64_at(0)?,
            pg_control_version: version,
            catalog_version: u32_at(12)?,
            state: DbState::from_u32(u32_at(16)?),
            checkpoint: Lsn(u64_at(32)?),
            redo: Lsn(u64_at(40)?),
            timeline: u32_at(48)?,
            prev_timeline: u32_at(52)?,
            min_recovery_point: Lsn(u64_at(136)?),
            min_recovery_point_tli: u32_at(144)?,
            backup_start_point: Lsn(u64_at(152)?),
            backup_end_point: Lsn(u64_at(160)?),
            backup_end_required: bool_at(168)?,
            wal_level: u32_at(172)? as i32,
            wal_log_hints: bool_at(176)?,
            block_size: u32_at(216)?,
            relseg_size: u32_at(220)?,
            wal_page_size: u32_at(224)?,
            wal_segment_size: u32_at(228)?,
            data_checksum_version: u32_at(252)?,
        })
    }
}

/// Reads the major version from `PGDATA/PG_VERSION` ("15\n").
pub fn read_pg_version_file(pgdata: &Path) -> Result<u32> {
    let p = pgdata.join("PG_VERSION");
    let s = std::fs::read_to_string(&p).ctx("read", &p)?;
    s.trim().parse::<u32>().map_err(|_| {
        Error::invalid(format!(
            "{}: unexpected content {:?}",
            p.display(),
            s.trim()
        ))
    })
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// A synthetic 13–17 layout with a correct CRC.
    fn synthetic(version: u32) -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[0..8].copy_from_slice(&0x1234_5678_9ABC_DEF0u64.to_le_bytes());
        b[8..12].copy_from_slice(&version.to_le_bytes());
        b[16..20].copy_from_slice(&6u32.to_le_bytes());
        b[40..48].copy_from_slice(&0x0100_0028u64.to_le_bytes());
        b[48..52].copy_from_slice(&3u32.to_le_bytes());
        b[216..220].copy_from_slice(&8192u32.to_le_bytes());
        b[220..224].copy_from_slice(&131072u32.to_le_bytes());
        b[224..228].copy_from_slice(&8192u32.to_le_bytes());
        b[228..232].copy_from_slice(&(16u32 << 20).to_le_bytes());
        b[252..256].copy_from_slice(&1u32.to_le_bytes());
        let crc_off = if version == 1800 { 292 } else { 288 };
        let crc = crc32c::crc32c(&b[..crc_off]);
        b[crc_off..crc_off + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn parses_and_checks_crc() {
        for v in [1300, 1700, 1800] {
            let b = synthetic(v);
            let c = ControlFile::parse(&b, "t").unwrap();
            assert_eq!(c.system_id, 0x1234_5678_9ABC_DEF0);
            assert_eq!(c.timeline, 3);
            assert_eq!(c.redo, Lsn(0x0100_0028));
            assert_eq!(c.wal_segment_size, 16 << 20);
            assert!(c.data_checksums());
            assert_eq!(c.state, DbState::InProduction);
            let mut bad = b.clone();
            bad[100] ^= 1;
            assert_eq!(
                ControlFile::parse(&bad, "t").unwrap_err().kind(),
                crate::ErrorKind::Corruption
            );
        }
        assert!(ControlFile::parse(&[0u8; 20], "t").is_err());
        let mut unknown = synthetic(1300);
        unknown[8..12].copy_from_slice(&1200u32.to_le_bytes());
        assert!(ControlFile::parse(&unknown, "t")
            .unwrap_err()
            .to_string()
            .contains("unsupported pg_control version 1200"));
    }
}
