//! The walsender's commands on a [`ReplConnection`]: `IDENTIFY_SYSTEM`, `SHOW`,
//! `TIMELINE_HISTORY`, the physical slot commands and `START_REPLICATION`.

use std::time::Instant;

use bytes::Bytes;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::conn::{ConnState, Frame, ReplConnection, COMMAND_TIMEOUT};
use super::stream::ReplicationStream;
use crate::error::{Error, Result};
use crate::types::{Lsn, TimeLineId, WalFileName};

/// `IDENTIFY_SYSTEM`'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: u64,
    pub timeline: TimeLineId,
    /// The current WAL flush position (on a standby: its replay position).
    pub xlogpos: Lsn,
    /// Always `None` on a physical replication connection.
    pub dbname: Option<String>,
}

/// A timeline history file as the server has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineHistory {
    pub name: WalFileName,
    pub content: Vec<u8>,
}

/// What `CREATE_REPLICATION_SLOT` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatedSlot {
    pub name: String,
    /// For a physical slot the server reports `0/0` here (`None`); the reserved start is
    /// in `pg_replication_slots.restart_lsn` or `READ_REPLICATION_SLOT`.
    pub consistent_point: Option<Lsn>,
}

/// `READ_REPLICATION_SLOT`'s answer for an existing slot (PostgreSQL 15+).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotState {
    pub slot_type: String,
    pub restart_lsn: Option<Lsn>,
    pub restart_tli: Option<TimeLineId>,
}

/// Checks a slot name the way PostgreSQL does (`ReplicationSlotValidateName`): 1 to 63
/// characters of `a-z`, `0-9` and `_`. Names are therefore never quoted.
pub fn check_slot_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid replication slot name '{name}': use 1 to 63 of a-z, 0-9 and _"
        )))
    }
}

/// The `CREATE_REPLICATION_SLOT` command for a physical slot. PostgreSQL 15 introduced the
/// parenthesised option list (`(RESERVE_WAL)`); 13 and 14 know only the bare keyword.
/// (15 to 18 still accept the bare form, but it is documented as deprecated.)
pub fn create_slot_command(
    name: &str,
    temporary: bool,
    reserve_wal: bool,
    server_major: u32,
) -> String {
    let temp = if temporary { " TEMPORARY" } else { "" };
    let opts = match (reserve_wal, server_major >= 15) {
        (false, _) => "",
        (true, true) => " (RESERVE_WAL)",
        (true, false) => " RESERVE_WAL",
    };
    format!("CREATE_REPLICATION_SLOT {name}{temp} PHYSICAL{opts}")
}

/// A memory size as `SHOW` prints it: "16MB", "1GB", "512kB" or plain bytes.
fn parse_size(v: &str) -> Option<u32> {
    let digits = v.bytes().take_while(|b| b.is_ascii_digit()).count();
    let n: u64 = v.get(..digits)?.parse().ok()?;
    let mult: u64 = match v.get(digits..)?.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    u32::try_from(n.checked_mul(mult)?).ok()
}

fn text(v: &Option<Bytes>, what: &str) -> Result<String> {
    match v {
        Some(b) => String::from_utf8(b.to_vec())
            .map_err(|_| Error::server(format!("{what}: not UTF-8 text"))),
        None => Err(Error::server(format!("{what}: unexpected NULL"))),
    }
}

fn opt_text(v: &Option<Bytes>, what: &str) -> Result<Option<String>> {
    match v {
        Some(_) => text(v, what).map(Some),
        None => Ok(None),
    }
}

impl ReplConnection {
    fn one_row(&mut self, sql: &str, ncols: usize) -> Result<Vec<Option<Bytes>>> {
        let res = self.simple_query(sql)?;
        let row = res
            .into_iter()
            .find(|r| !r.columns.is_empty())
            .and_then(|r| r.rows.into_iter().next());
        match row {
            Some(r) if r.len() >= ncols => Ok(r),
            _ => Err(Error::server(format!(
                "server at {} answered \"{sql}\" without the expected row of {ncols} columns",
                self.endpoint
            ))),
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub fn identify_system(&mut self) -> Result<SystemIdentity> {
        let sql = "IDENTIFY_SYSTEM";
        let r = self.one_row(sql, 4)?;
        let sysid = text(&r[0], "IDENTIFY_SYSTEM systemid")?;
        let tli = text(&r[1], "IDENTIFY_SYSTEM timeline")?;
        let pos = text(&r[2], "IDENTIFY_SYSTEM xlogpos")?;
        let bad = |what: &str, v: &str| {
            Error::server(format!(
                "server at {}: IDENTIFY_SYSTEM returned an invalid {what} '{v}'",
                self.endpoint
            ))
        };
        Ok(SystemIdentity {
            system_id: sysid.parse().map_err(|_| bad("systemid", &sysid))?,
            timeline: tli
                .parse()
                .ok()
                .filter(|t| *t > 0)
                .ok_or_else(|| bad("timeline", &tli))?,
            xlogpos: pos.parse().map_err(|_| bad("xlogpos", &pos))?,
            dbname: opt_text(&r[3], "IDENTIFY_SYSTEM dbname")?,
        })
    }

    /// `SHOW name` (the walsender accepts `SHOW` since PostgreSQL 10).
    pub fn show(&mut self, name: &str) -> Result<String> {
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(Error::invalid(format!("invalid setting name '{name}'")));
        }
        let sql = format!("SHOW {name}");
        let r = self.one_row(&sql, 1)?;
        text(&r[0], &sql)
    }

    /// The server's WAL segment size in bytes (`SHOW wal_segment_size`, e.g. "16MB").
    pub fn wal_segment_size(&mut self) -> Result<u32> {
        let v = self.show("wal_segment_size")?;
        parse_size(&v)
            .filter(|s| crate::types::valid_segment_size(*s))
            .ok_or_else(|| {
                Error::server(format!(
                    "server at {} reports an invalid wal_segment_size '{v}'",
                    self.endpoint
                ))
            })
    }

    /// `TIMELINE_HISTORY tli`. A timeline without a history file (timeline 1, or one the
    /// server does not have) is an error of kind `NotFound`.
    pub fn timeline_history(&mut self, tli: TimeLineId) -> Result<TimelineHistory> {
        if tli == 0 {
            return Err(Error::invalid("timeline 0 does not exist"));
        }
        let sql = format!("TIMELINE_HISTORY {tli}");
        let r = self.one_row(&sql, 2)?;
        let name = text(&r[0], "TIMELINE_HISTORY filename")?;
        let want = WalFileName::History { tli };
        if name != want.to_string() {
            return Err(Error::server(format!(
                "server at {} answered {sql} with file \"{name}\", expected \"{want}\"",
                self.endpoint
            )));
        }
        let content = r[1]
            .as_ref()
            .ok_or_else(|| Error::server(format!("{sql}: NULL content")))?
            .to_vec();
        Ok(TimelineHistory {
            name: want,
            content,
        })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] PHYSICAL [RESERVE_WAL]`, in the syntax of
    /// the server's version. A temporary slot lives until this connection ends.
    pub fn create_physical_slot(
        &mut self,
        name: &str,
        temporary: bool,
        reserve_wal: bool,
    ) -> Result<CreatedSlot> {
        check_slot_name(name)?;
        let sql = create_slot_command(name, temporary, reserve_wal, self.server_major);
        let r = self.one_row(&sql, 2)?;
        let got = text(&r[0], "CREATE_REPLICATION_SLOT slot_name")?;
        let cp = opt_text(&r[1], "CREATE_REPLICATION_SLOT consistent_point")?;
        let consistent_point = match cp {
            Some(s) => Some(s.parse::<Lsn>()?).filter(|l| *l != Lsn::INVALID),
            None => None,
        };
        Ok(CreatedSlot {
            name: got,
            consistent_point,
        })
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]`; without `wait` a slot in use is an error.
    pub fn drop_slot(&mut self, name: &str, wait: bool) -> Result<()> {
        check_slot_name(name)?;
        let sql = format!(
            "DROP_REPLICATION_SLOT {name}{}",
            if wait { " WAIT" } else { "" }
        );
        self.simple_query(&sql).map(|_| ())
    }

    /// `READ_REPLICATION_SLOT name` (PostgreSQL 15+): `None` if the slot does not exist.
    pub fn read_slot(&mut self, name: &str) -> Result<Option<SlotState>> {
        check_slot_name(name)?;
        if self.server_major != 0 && self.server_major < 15 {
            return Err(Error::invalid(format!(
                "READ_REPLICATION_SLOT needs PostgreSQL 15 or later; server at {} is {}",
                self.endpoint, self.server_major
            )));
        }
        let sql = format!("READ_REPLICATION_SLOT {name}");
        let r = self.one_row(&sql, 3)?;
        let Some(slot_type) = opt_text(&r[0], "slot_type")? else {
            return Ok(None);
        };
        let restart_lsn = match opt_text(&r[1], "restart_lsn")? {
            Some(s) => Some(s.parse::<Lsn>()?),
            None => None,
        };
        let restart_tli = match opt_text(&r[2], "restart_tli")? {
            Some(s) => Some(
                s.parse::<TimeLineId>()
                    .map_err(|_| Error::server(format!("{sql}: invalid restart_tli '{s}'")))?,
            ),
            None => None,
        };
        Ok(Some(SlotState {
            slot_type,
            restart_lsn,
            restart_tli,
        }))
    }

    /// `START_REPLICATION [SLOT s] PHYSICAL start TIMELINE tli`.
    ///
    /// When `start` is exactly the end of `tli` (a switch point), the server answers with
    /// the next timeline at once, without streaming: the stream's first event is then
    /// [`super::Event::EndOfTimeline`].
    pub fn start_replication(
        &mut self,
        slot: Option<&str>,
        start: Lsn,
        tli: TimeLineId,
    ) -> Result<ReplicationStream<'_>> {
        self.check_ready()?;
        if tli == 0 {
            return Err(Error::invalid("timeline 0 does not exist"));
        }
        let slot_part = match slot {
            Some(s) => {
                check_slot_name(s)?;
                format!("SLOT {s} ")
            }
            None => String::new(),
        };
        let sql = format!("START_REPLICATION {slot_part}PHYSICAL {start} TIMELINE {tli}");
        frontend::query(&sql, &mut self.wbuf).map_err(|e| Error::invalid(format!("{sql}: {e}")))?;
        self.flush_wbuf()?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            match self.read_frame(Some(deadline))? {
                Some(Frame::CopyBoth) => {
                    self.state = ConnState::Streaming;
                    return Ok(ReplicationStream::new(self, start, tli, None));
                }
                Some(Frame::Msg(Message::NoticeResponse(n))) => self.log_notice(n.fields()),
                Some(Frame::Msg(Message::ParameterStatus(p))) => self.remember_param(&p),
                Some(Frame::Msg(m)) => {
                    // No CopyBoth: an error, or the next-timeline row at once.
                    let res = self.read_results(&sql, Some(m))?;
                    let next = super::stream::next_timeline(&res, &self.endpoint)?;
                    let Some(next) = next else {
                        return Err(Error::server(format!(
                            "server at {} answered \"{sql}\" without streaming",
                            self.endpoint
                        )));
                    };
                    return Ok(ReplicationStream::new(self, start, tli, Some(next)));
                }
                None => {
                    self.state = ConnState::Broken;
                    return Err(Error::server(format!(
                        "server at {} did not answer \"{sql}\" within {} s",
                        self.endpoint,
                        COMMAND_TIMEOUT.as_secs()
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_command_syntax_by_version() {
        assert_eq!(
            create_slot_command("s1", true, true, 15),
            "CREATE_REPLICATION_SLOT s1 TEMPORARY PHYSICAL (RESERVE_WAL)"
        );
        assert_eq!(
            create_slot_command("s1", false, true, 14),
            "CREATE_REPLICATION_SLOT s1 PHYSICAL RESERVE_WAL"
        );
        assert_eq!(
            create_slot_command("s1", false, false, 18),
            "CREATE_REPLICATION_SLOT s1 PHYSICAL"
        );
    }

    #[test]
    fn slot_names() {
        assert!(check_slot_name("walnut_receive_2").is_ok());
        for bad in ["", "Walnut", "a-b", "a b", "x;DROP", &"a".repeat(64)] {
            assert!(check_slot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("512kB"), Some(512 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("16 TB"), None);
        assert_eq!(parse_size("MB"), None);
    }
}
