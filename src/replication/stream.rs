//! A physical replication stream (CopyBoth mode) as a poll API.
//!
//! The consumer calls [`ReplicationStream::next_event`] in a loop; the stream answers the
//! server's `replyRequested` keepalives at once and sends a status update at least every
//! [`ReplicationStream::status_interval`] (10 s) while it waits, so an idle consumer never
//! meets `wal_sender_timeout`. The flush position the server sees is only ever what the
//! consumer reported through [`ReplicationStream::report_flushed`], which it must call only
//! after the bytes are fsynced: a slot's `restart_lsn` follows it, and the server may then
//! remove the WAL before it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::conn::{ConnState, Frame, QueryResult, ReplConnection, ServerError};
use super::msg::{self, PgTime, ServerCopyData, StatusUpdate};
use crate::error::{Error, Result};
use crate::types::{Lsn, TimeLineId};

/// How long the end of a stream (the server's result after CopyDone) may take.
const END_TIMEOUT: Duration = Duration::from_secs(60);

/// What the stream produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// WAL bytes at `start..start + bytes.len()`; `wal_end` is the server's end of WAL.
    Data {
        start: Lsn,
        wal_end: Lsn,
        server_time: PgTime,
        bytes: Bytes,
    },
    /// A keepalive (already answered if it asked for a reply).
    Keepalive {
        wal_end: Lsn,
        server_time: PgTime,
        reply_requested: bool,
    },
    /// The streamed timeline ended at `switchpoint`; continue on `next_tli` from there.
    /// The connection is ready for commands again.
    EndOfTimeline {
        next_tli: TimeLineId,
        switchpoint: Lsn,
    },
    /// The server ended the stream without a timeline switch (it is shutting down, after
    /// sending all its WAL). The connection is about to close.
    ServerClosed,
    /// Nothing arrived within the timeout.
    Timeout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Streaming,
    Ended,
}

/// A running `START_REPLICATION`, borrowing its connection until the end.
pub struct ReplicationStream<'c> {
    conn: &'c mut ReplConnection,
    state: State,
    pending: Option<Event>,
    tli: TimeLineId,
    received: Lsn,
    written: Lsn,
    flushed: Lsn,
    server_wal_end: Lsn,
    last_server_time: Option<PgTime>,
    last_status: Option<Instant>,
    /// Longest time between two status updates (default 10 s).
    pub status_interval: Duration,
}

/// The `(next_tli, next_tli_startpos)` row that ends a historic timeline, if present.
pub(crate) fn next_timeline(
    res: &[QueryResult],
    endpoint: &str,
) -> Result<Option<(TimeLineId, Lsn)>> {
    let Some(row) = res
        .iter()
        .find(|r| r.columns.len() >= 2 && !r.rows.is_empty())
        .and_then(|r| r.rows.first())
    else {
        return Ok(None);
    };
    let field = |i: usize| -> Result<String> {
        row.get(i)
            .and_then(|v| v.as_ref())
            .and_then(|b| std::str::from_utf8(b).ok())
            .map(|s| s.to_string())
            .ok_or_else(|| {
                Error::server(format!(
                    "server at {endpoint} sent an invalid end-of-timeline row"
                ))
            })
    };
    let tli_s = field(0)?;
    let tli: TimeLineId = tli_s.parse().ok().filter(|t| *t > 0).ok_or_else(|| {
        Error::server(format!(
            "server at {endpoint} sent an invalid next timeline '{tli_s}'"
        ))
    })?;
    let pos: Lsn = field(1)?.parse()?;
    Ok(Some((tli, pos)))
}

impl<'c> ReplicationStream<'c> {
    pub(crate) fn new(
        conn: &'c mut ReplConnection,
        start: Lsn,
        tli: TimeLineId,
        ended: Option<(TimeLineId, Lsn)>,
    ) -> ReplicationStream<'c> {
        let (state, pending) = match ended {
            Some((next_tli, switchpoint)) => (
                State::Ended,
                Some(Event::EndOfTimeline {
                    next_tli,
                    switchpoint,
                }),
            ),
            None => (State::Streaming, None),
        };
        ReplicationStream {
            conn,
            state,
            pending,
            tli,
            received: start,
            written: Lsn::INVALID,
            flushed: Lsn::INVALID,
            server_wal_end: Lsn::INVALID,
            last_server_time: None,
            last_status: None,
            status_interval: Duration::from_secs(10),
        }
    }

    /// The timeline being streamed.
    pub fn timeline(&self) -> TimeLineId {
        self.tli
    }

    /// End of the WAL received so far (the start position before any data).
    pub fn received(&self) -> Lsn {
        self.received
    }

    /// The flush position last reported by the consumer.
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// The server's end of WAL, as of its last message.
    pub fn server_wal_end(&self) -> Lsn {
        self.server_wal_end
    }

    /// The send time of the server's last XLogData or keepalive (its clock).
    pub fn last_server_time(&self) -> Option<PgTime> {
        self.last_server_time
    }

    fn check_reported(&self, lsn: Lsn, what: &str) -> Result<()> {
        if lsn > self.received {
            return Err(Error::invalid(format!(
                "cannot report {lsn} as {what}: only {} was received",
                self.received
            )));
        }
        Ok(())
    }

    /// Records that WAL up to `lsn` is written (not necessarily durable). Never moves back.
    pub fn report_written(&mut self, lsn: Lsn) -> Result<()> {
        self.check_reported(lsn, "written")?;
        self.written = self.written.max(lsn);
        Ok(())
    }

    /// Records that WAL up to `lsn` is durable (fsynced). Call it only after the fsync:
    /// the server lets a slot release WAL up to here. Never moves back. The server hears
    /// of it with the next status update; call [`Self::send_status`] to tell it at once
    /// (a synchronous standby does).
    pub fn report_flushed(&mut self, lsn: Lsn) -> Result<()> {
        self.check_reported(lsn, "flushed")?;
        self.flushed = self.flushed.max(lsn);
        self.written = self.written.max(lsn);
        Ok(())
    }

    /// Sends a standby status update now: written, flushed, no apply position (walnut
    /// replays nothing), and the current time.
    pub fn send_status(&mut self) -> Result<()> {
        if self.state != State::Streaming {
            return Ok(());
        }
        let s = StatusUpdate {
            write: self.written,
            flush: self.flushed,
            apply: Lsn::INVALID,
            time: PgTime::now(),
            reply_requested: false,
        };
        msg::put_copy_data(&s.encode(), self.conn.wbuf());
        self.conn.flush_wbuf()?;
        self.last_status = Some(Instant::now());
        log::trace!(
            "status update to {}: write {} flush {}",
            self.conn.endpoint(),
            s.write,
            s.flush
        );
        Ok(())
    }

    fn status_due(&self) -> Option<Instant> {
        self.last_status.map(|t| t + self.status_interval)
    }

    /// Waits up to `timeout` for the next event. Status updates go out as they fall due
    /// meanwhile, and the first one at once.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Event> {
        if let Some(e) = self.pending.take() {
            return Ok(e);
        }
        if self.state != State::Streaming {
            return Err(Error::invalid(format!(
                "the replication stream from {} has ended",
                self.conn.endpoint()
            )));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if self.status_due().is_none_or(|t| t <= now) {
                if let Err(e) = self.send_status() {
                    self.state = State::Ended;
                    return Err(e);
                }
            }
            let wake = match self.status_due() {
                Some(t) => t.min(deadline),
                None => deadline,
            };
            let frame = match self.conn.read_frame(Some(wake)) {
                Ok(f) => f,
                Err(e) => {
                    self.state = State::Ended;
                    return Err(e);
                }
            };
            match frame {
                None if Instant::now() >= deadline => return Ok(Event::Timeout),
                None => continue,
                Some(f) => {
                    if let Some(ev) = self.on_frame(f)? {
                        return Ok(ev);
                    }
                }
            }
        }
    }

    fn on_frame(&mut self, f: Frame) -> Result<Option<Event>> {
        let m = match f {
            Frame::Msg(m) => m,
            Frame::CopyBoth => return Err(self.fail("a second CopyBothResponse")),
        };
        match m {
            Message::CopyData(body) => self.on_copy_data(body.into_bytes()).map(Some),
            Message::CopyDone => self.on_server_copy_done().map(Some),
            Message::CommandComplete(_) => {
                // walsender's WalSndDone: "COPY 0" and exit, at shutdown.
                self.state = State::Ended;
                self.conn.state = ConnState::Broken;
                Ok(Some(Event::ServerClosed))
            }
            Message::ErrorResponse(e) => {
                self.state = State::Ended;
                self.conn.state = ConnState::Broken;
                let during = format!("streaming timeline {} at {}", self.tli, self.received);
                Err(ServerError::from_fields(e.fields()).into_error(self.conn.endpoint(), &during))
            }
            Message::NoticeResponse(n) => {
                let n = ServerError::from_fields(n.fields());
                log::info!("server at {}: {}", self.conn.endpoint(), n.message);
                Ok(None)
            }
            Message::ParameterStatus(_) => Ok(None),
            _ => Err(self.fail("an unexpected message")),
        }
    }

    fn fail(&mut self, what: &str) -> Error {
        self.state = State::Ended;
        self.conn.state = ConnState::Broken;
        self.conn.unexpected(&format!("streaming ({what})"))
    }

    fn on_copy_data(&mut self, payload: Bytes) -> Result<Event> {
        match msg::parse_server_copy_data(payload)? {
            ServerCopyData::XLogData {
                start,
                wal_end,
                send_time,
                data,
            } => {
                // The walsender sends contiguous WAL from the requested start; anything else
                // would put bytes at the wrong place in a segment.
                if start != self.received {
                    let e = self.conn.proto(format!(
                        "XLogData at {start}, expected {} (timeline {})",
                        self.received, self.tli
                    ));
                    self.state = State::Ended;
                    self.conn.state = ConnState::Broken;
                    return Err(e);
                }
                self.received = Lsn(start.0 + data.len() as u64);
                self.server_wal_end = self.server_wal_end.max(wal_end);
                self.last_server_time = Some(send_time);
                Ok(Event::Data {
                    start,
                    wal_end,
                    server_time: send_time,
                    bytes: data,
                })
            }
            ServerCopyData::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            } => {
                self.server_wal_end = self.server_wal_end.max(wal_end);
                self.last_server_time = Some(send_time);
                if reply_requested {
                    self.send_status()?;
                }
                Ok(Event::Keepalive {
                    wal_end,
                    server_time: send_time,
                    reply_requested,
                })
            }
        }
    }

    /// The server finished the timeline: answer CopyDone and read the next-timeline row.
    fn on_server_copy_done(&mut self) -> Result<Event> {
        frontend::copy_done(self.conn.wbuf());
        self.conn.flush_wbuf()?;
        self.state = State::Ended;
        let res = self.drain_results()?;
        match next_timeline(&res, self.conn.endpoint())? {
            Some((next_tli, switchpoint)) => Ok(Event::EndOfTimeline {
                next_tli,
                switchpoint,
            }),
            None => Ok(Event::ServerClosed),
        }
    }

    /// Reads what follows the copy until ReadyForQuery, skipping CopyData still in flight.
    fn drain_results(&mut self) -> Result<Vec<QueryResult>> {
        let deadline = Instant::now() + END_TIMEOUT;
        loop {
            match self.conn.read_frame(Some(deadline))? {
                Some(Frame::Msg(Message::CopyData(_))) | Some(Frame::Msg(Message::CopyDone)) => {}
                Some(Frame::Msg(Message::NoticeResponse(_))) => {}
                Some(Frame::Msg(m)) => return self.conn.read_results("START_REPLICATION", Some(m)),
                Some(Frame::CopyBoth) => return Err(self.fail("CopyBothResponse at the end")),
                None => {
                    self.conn.state = ConnState::Broken;
                    return Err(Error::server(format!(
                        "server at {} did not end the stream within {} s",
                        self.conn.endpoint(),
                        END_TIMEOUT.as_secs()
                    )));
                }
            }
        }
    }

    /// Ends the stream from our side (CopyDone) and returns the connection to commands.
    /// If the server had already ended a historic timeline, its next timeline is returned.
    pub fn stop(mut self) -> Result<Option<(TimeLineId, Lsn)>> {
        if let Some(Event::EndOfTimeline {
            next_tli,
            switchpoint,
        }) = self.pending.take()
        {
            return Ok(Some((next_tli, switchpoint)));
        }
        if self.state != State::Streaming {
            return Ok(None);
        }
        // One last status so the server has the latest flush position.
        self.send_status()?;
        frontend::copy_done(self.conn.wbuf());
        self.conn.flush_wbuf()?;
        self.state = State::Ended;
        let res = self.drain_results()?;
        next_timeline(&res, self.conn.endpoint())
    }
}

impl Drop for ReplicationStream<'_> {
    fn drop(&mut self) {
        // Dropped mid-stream: the connection is inside CopyBoth and cannot run commands.
        if self.state == State::Streaming {
            self.conn.state = ConnState::Broken;
        } else if self.conn.state == ConnState::Streaming {
            self.conn.state = ConnState::Ready;
        }
    }
}
