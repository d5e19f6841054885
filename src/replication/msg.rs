//! The walsender's own messages, which `postgres-protocol` does not model: the
//! CopyBothResponse that opens streaming, and the payloads carried inside CopyData
//! (XLogData, primary keepalive, standby status update).
//!
//! Layouts (all integers big-endian; times are microseconds since 2000-01-01 UTC):
//! ```text
//! CopyBothResponse 'W' len:i32 format:i8 ncols:i16 colformat:i16*ncols
//! XLogData         'w' start:u64 end:u64 sendtime:i64 data...
//! Keepalive        'k' end:u64 sendtime:i64 reply_requested:u8
//! Status update    'r' write:u64 flush:u64 apply:u64 clienttime:i64 reply_requested:u8
//! ```
//! (PostgreSQL `src/backend/replication/walsender.c`, `XLogWalRcvSendReply` in
//! `walreceiver.c`.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::types::Lsn;

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;

/// A timestamp as the server sends it: microseconds since 2000-01-01 UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PgTime(pub i64);

impl PgTime {
    pub fn now() -> PgTime {
        PgTime::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> PgTime {
        let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS);
        match t.duration_since(pg_epoch) {
            Ok(d) => PgTime(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => PgTime(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }

    pub fn to_system(self) -> SystemTime {
        let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS);
        if self.0 >= 0 {
            pg_epoch + Duration::from_micros(self.0 as u64)
        } else {
            pg_epoch - Duration::from_micros(self.0.unsigned_abs())
        }
    }
}

/// One payload inside a CopyData message from the walsender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerCopyData {
    /// WAL bytes starting at `start`; `wal_end` is the server's current end of WAL.
    XLogData {
        start: Lsn,
        wal_end: Lsn,
        send_time: PgTime,
        data: Bytes,
    },
    /// A keepalive: `wal_end` is the server's end of WAL; when `reply_requested` the server
    /// wants a status update now (it is half-way to `wal_sender_timeout`).
    Keepalive {
        wal_end: Lsn,
        send_time: PgTime,
        reply_requested: bool,
    },
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

/// Parses a CopyData payload from the walsender (zero-copy for the WAL bytes).
pub fn parse_server_copy_data(payload: Bytes) -> Result<ServerCopyData> {
    let bad = |what: &str| {
        Error::server(format!(
            "malformed replication message: {what} ({} bytes)",
            payload.len()
        ))
    };
    match payload.first() {
        Some(b'w') => {
            const HDR: usize = 1 + 8 + 8 + 8;
            if payload.len() < HDR {
                return Err(bad("XLogData shorter than its header"));
            }
            let start = be_u64(&payload, 1).ok_or_else(|| bad("XLogData"))?;
            let end = be_u64(&payload, 9).ok_or_else(|| bad("XLogData"))?;
            let time = be_u64(&payload, 17).ok_or_else(|| bad("XLogData"))?;
            if start.checked_add((payload.len() - HDR) as u64).is_none() {
                return Err(bad("XLogData past the end of the WAL address space"));
            }
            Ok(ServerCopyData::XLogData {
                start: Lsn(start),
                wal_end: Lsn(end),
                send_time: PgTime(time as i64),
                data: payload.slice(HDR..),
            })
        }
        Some(b'k') => {
            if payload.len() != 1 + 8 + 8 + 1 {
                return Err(bad("keepalive of the wrong length"));
            }
            let end = be_u64(&payload, 1).ok_or_else(|| bad("keepalive"))?;
            let time = be_u64(&payload, 9).ok_or_else(|| bad("keepalive"))?;
            Ok(ServerCopyData::Keepalive {
                wal_end: Lsn(end),
                send_time: PgTime(time as i64),
                reply_requested: payload[17] != 0,
            })
        }
        Some(&t) => Err(bad(&format!("unknown type byte {:?}", t as char))),
        None => Err(bad("empty CopyData")),
    }
}

/// A standby status update: what the client has written, flushed (fsynced) and applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    pub write: Lsn,
    pub flush: Lsn,
    pub apply: Lsn,
    pub time: PgTime,
    pub reply_requested: bool,
}

impl StatusUpdate {
    /// The 34-byte payload, to be sent inside a CopyData message.
    pub fn encode(&self) -> [u8; 34] {
        let mut b = [0u8; 34];
        b[0] = b'r';
        b[1..9].copy_from_slice(&self.write.0.to_be_bytes());
        b[9..17].copy_from_slice(&self.flush.0.to_be_bytes());
        b[17..25].copy_from_slice(&self.apply.0.to_be_bytes());
        b[25..33].copy_from_slice(&self.time.0.to_be_bytes());
        b[33] = self.reply_requested as u8;
        b
    }
}

/// Appends a frontend CopyData message holding `payload` to `out`.
pub fn put_copy_data(payload: &[u8], out: &mut BytesMut) {
    out.put_u8(b'd');
    out.put_i32(4 + payload.len() as i32);
    out.put_slice(payload);
}

/// Checks a CopyBothResponse body (after tag and length): binary format, no columns
/// expected for physical replication but any count is tolerated if the body is consistent.
pub fn check_copy_both(body: &[u8]) -> Result<()> {
    let bad = || Error::server("malformed CopyBothResponse from the server".to_string());
    if body.len() < 3 {
        return Err(bad());
    }
    let ncols = u16::from_be_bytes([body[1], body[2]]) as usize;
    if body.len() != 3 + 2 * ncols {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xlogdata_is_parsed_without_copying_the_wal() {
        let mut p = vec![b'w'];
        p.extend_from_slice(&0x1_0000_0028u64.to_be_bytes());
        p.extend_from_slice(&0x1_0000_1000u64.to_be_bytes());
        p.extend_from_slice(&777i64.to_be_bytes());
        p.extend_from_slice(b"abc");
        let m = parse_server_copy_data(Bytes::from(p)).unwrap();
        assert_eq!(
            m,
            ServerCopyData::XLogData {
                start: Lsn(0x1_0000_0028),
                wal_end: Lsn(0x1_0000_1000),
                send_time: PgTime(777),
                data: Bytes::from_static(b"abc"),
            }
        );
        // A header cut short is an error, not a panic.
        for n in 0..25 {
            let mut p = vec![b'w'];
            p.resize(n.max(1), 0);
            assert!(parse_server_copy_data(Bytes::from(p)).is_err(), "{n}");
        }
    }

    #[test]
    fn keepalive_and_unknown_types() {
        let mut p = vec![b'k'];
        p.extend_from_slice(&0x5000u64.to_be_bytes());
        p.extend_from_slice(&(-3i64).to_be_bytes());
        p.push(1);
        let m = parse_server_copy_data(Bytes::from(p.clone())).unwrap();
        assert_eq!(
            m,
            ServerCopyData::Keepalive {
                wal_end: Lsn(0x5000),
                send_time: PgTime(-3),
                reply_requested: true
            }
        );
        p.push(0);
        assert!(parse_server_copy_data(Bytes::from(p)).is_err());
        assert!(parse_server_copy_data(Bytes::from_static(b"x123")).is_err());
        assert!(parse_server_copy_data(Bytes::new()).is_err());
    }

    #[test]
    fn status_update_layout() {
        let s = StatusUpdate {
            write: Lsn(0x0102_0304_0506_0708),
            flush: Lsn(0x10),
            apply: Lsn(0),
            time: PgTime(0x0A0B),
            reply_requested: true,
        };
        let b = s.encode();
        assert_eq!(b[0], b'r');
        assert_eq!(&b[1..9], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[9..17], &[0, 0, 0, 0, 0, 0, 0, 0x10]);
        assert_eq!(&b[17..25], &[0; 8]);
        assert_eq!(&b[25..33], &[0, 0, 0, 0, 0, 0, 0x0A, 0x0B]);
        assert_eq!(b[33], 1);
        let mut out = BytesMut::new();
        put_copy_data(&b, &mut out);
        assert_eq!(&out[..5], &[b'd', 0, 0, 0, 38]);
        assert_eq!(&out[5..], &b[..]);
    }

    #[test]
    fn pg_time_round_trip() {
        let t = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS + 5);
        assert_eq!(PgTime::from_system(t), PgTime(5_000_000));
        assert_eq!(PgTime(5_000_000).to_system(), t);
        assert_eq!(PgTime::from_system(UNIX_EPOCH).to_system(), UNIX_EPOCH);
    }

    #[test]
    fn copy_both_body() {
        assert!(check_copy_both(&[0, 0, 0]).is_ok());
        assert!(check_copy_both(&[0, 0, 1, 0, 0]).is_ok());
        assert!(check_copy_both(&[0, 0, 1]).is_err());
        assert!(check_copy_both(&[0]).is_err());
    }
}
