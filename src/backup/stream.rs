//! STREAM backups: the WAL a backup needs, streamed over the replication protocol while
//! the copy runs, so that the backup restores without any archive.
//!
//! A temporary physical slot is created (on the backup's own replication connection)
//! before `pg_backup_start`, so the server keeps every segment from then on. Streaming
//! starts at the beginning of the start segment (or earlier, for a PAGE backup whose
//! parent's WAL is not all in the archive: see [`StreamJob::from`]) on the start timeline
//! and runs until the stop LSN has been received: the stop LSN is where the last record
//! the backup needs *ends*, so on a standby of an idle primary, where no record may ever
//! start there, the stream still finishes.
//!
//! Every complete segment goes two ways:
//! - into the backup, as the file `pg_wal/<segment>` of its manifest (create-only,
//!   checksummed and compressed like every stored file), so restore puts it in place;
//! - into the instance's archive, through the archive's push path (which indexes it;
//!   same content already there is success), so PAGE backups work without
//!   `archive_command`.
//!
//! The last, incomplete segment (the one holding the stop LSN when the server has not
//! switched, as on a standby) goes only into the backup, zero-padded to a whole segment as
//! `pg_receivewal` pre-sizes its `.partial` files: recovery reads up to the stop LSN and
//! finds the end of WAL after it. It never goes to the archive, where the complete
//! segment of the same name will arrive later.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::archive::WalArchive;
use crate::error::{Error, Result};
use crate::format::manifest::FileEntry;
use crate::replication::{Event, ReplConnection, SegmentAssembler};
use crate::repo::Repo;
use crate::types::{Lsn, TimeLineId, WalFileName};

use super::copy::store_bytes;

/// What the backup and its stream thread share.
#[derive(Default)]
pub struct StreamShared {
    /// The stop LSN once the backup has stopped (0 before).
    pub stop: AtomicU64,
    /// Set by the backup when it fails: the stream ends at once.
    pub abort: AtomicBool,
    /// Set by the stream thread when it fails (the backup stops waiting for it).
    pub failed: AtomicBool,
    /// A PAGE backup from a standby asks for the streamed bytes of its start segment up to
    /// this LSN (0: no request) while the segment is still incomplete.
    pub tail_request: AtomicU64,
    /// The answer: the segment number and its bytes from its start (at least up to the
    /// requested LSN).
    pub tail: Mutex<Option<(u64, Vec<u8>)>>,
}

impl StreamShared {
    /// The answer to a tail request, once there is one.
    pub fn take_tail(&self) -> Option<(u64, Vec<u8>)> {
        self.tail.lock().ok().and_then(|mut t| t.take())
    }
}

/// The block index of segment `segno` of `tli` from its first bytes `data`, covering the
/// records that begin before `to` (a record boundary: the backup's start LSN, a redo
/// point). Bytes from `to` on are zeroed, so decoding ends cleanly there; records from
/// `to` on are the backup's own WAL and need not be in a change map.
pub fn index_tail(
    tli: TimeLineId,
    segno: u64,
    data: &[u8],
    to: Lsn,
    seg_size: u32,
) -> Result<crate::index::SegmentIndex> {
    let name = WalFileName::segment(tli, segno, seg_size);
    let upto = to.segment_offset(seg_size) as usize;
    if to.segno(seg_size) != segno || data.len() < upto {
        return Err(Error::invalid(format!(
            "{name}: {} streamed bytes do not reach {to}",
            data.len()
        )));
    }
    let mut buf = vec![0u8; seg_size as usize];
    buf[..upto].copy_from_slice(&data[..upto]);
    let mut ix = crate::index::build::StreamIndexer::new(tli);
    ix.stop_after(segno);
    ix.feed_segment(segno, &buf)?;
    let mut all = ix.finish()?;
    let idx = all
        .iter()
        .position(|s| s.segno == segno)
        .map(|i| all.swap_remove(i))
        .ok_or_else(|| Error::corruption(format!("{name}: streamed WAL produced no index")))?;
    if idx.pending {
        return Err(Error::corruption(format!(
            "{name}: a record crosses the start LSN {to} (it is not a record boundary)"
        )));
    }
    Ok(idx)
}

/// One stream: where it starts, and where its segments go.
pub struct StreamJob<'a> {
    /// The replication connection holding the temporary slot.
    pub conn: ReplConnection,
    pub slot: String,
    pub tli: TimeLineId,
    /// A segment boundary: the start segment's, or an earlier one when a PAGE backup fills
    /// the archive's gap since its parent from the server's `pg_wal`.
    pub from: Lsn,
    /// Segments from this one on go into the backup (the start segment).
    pub first_in_backup: u64,
    pub seg_size: u32,
    pub repo: &'a dyn Repo,
    /// The backup's key.
    pub key: String,
    pub compress: bool,
    pub archive: &'a WalArchive,
    /// How long to wait, after the stop, for the WAL up to the stop LSN.
    pub timeout: Duration,
}

/// The manifest entries of the streamed files, and where the stream ended.
pub struct StreamOutcome {
    pub entries: Vec<FileEntry>,
    pub end: Lsn,
}

/// Runs the stream until the stop LSN (see the module docs); sets `shared.failed` on error.
pub fn run(job: StreamJob<'_>, shared: &StreamShared) -> Result<StreamOutcome> {
    let r = stream(job, shared);
    if r.is_err() {
        shared.failed.store(true, Ordering::SeqCst);
    }
    r
}

fn stream(mut job: StreamJob<'_>, shared: &StreamShared) -> Result<StreamOutcome> {
    let mut entries = Vec::new();
    if job.tli > 1 {
        // Recovery to the backup's end needs the history of its timeline.
        let h = job.conn.timeline_history(job.tli)?;
        entries.push(store_bytes(
            job.repo,
            &job.key,
            &format!("pg_wal/{}", h.name),
            &h.content,
            job.compress,
        )?);
        push(job.archive, &h.name, &h.content)?;
    }
    let mut asm = SegmentAssembler::new(job.tli, job.seg_size, job.from)?;
    let endpoint = job.conn.endpoint().to_string();
    let slot = job.slot.clone();
    let mut st = job
        .conn
        .start_replication(Some(&slot), job.from, job.tli)
        .map_err(|e| {
            e.context(format!(
                "streaming WAL from {} on timeline {} from {endpoint}",
                job.from, job.tli
            ))
        })?;
    let mut stopped_at: Option<Instant> = None;
    loop {
        if shared.abort.load(Ordering::SeqCst) {
            return Err(Error::invalid("WAL streaming ended: the backup failed"));
        }
        let stop = Lsn(shared.stop.load(Ordering::SeqCst));
        if stop.0 != 0 {
            if asm.position() >= stop {
                break;
            }
            let t0 = *stopped_at.get_or_insert_with(Instant::now);
            if t0.elapsed() > job.timeout {
                return Err(Error::not_found(format!(
                    "the WAL up to the stop LSN {stop} was not streamed from {endpoint} within {} s (received up to {})",
                    job.timeout.as_secs(),
                    asm.position()
                )));
            }
        }
        answer_tail_request(&asm, job.seg_size, shared);
        match st.next_event(Duration::from_millis(100))? {
            Event::Data { start, bytes, .. } => {
                for seg in asm.push(start, &bytes)? {
                    let segno = seg.name.segno(job.seg_size).unwrap_or(0);
                    if segno >= job.first_in_backup {
                        entries.push(store_bytes(
                            job.repo,
                            &job.key,
                            &format!("pg_wal/{}", seg.name),
                            seg.data(),
                            job.compress,
                        )?);
                    }
                    push(job.archive, &seg.name, seg.data())?;
                    st.report_flushed(Lsn((segno + 1) * job.seg_size as u64))?;
                }
            }
            Event::Keepalive { .. } | Event::Timeout => {}
            Event::EndOfTimeline {
                next_tli,
                switchpoint,
            } => {
                return Err(Error::server(format!(
                    "timeline {} ended at {switchpoint} during the backup (the server was promoted; next timeline {next_tli}): take the backup again",
                    job.tli
                )))
            }
            Event::ServerClosed => {
                return Err(Error::server(format!(
                    "{endpoint} closed the WAL stream at {} during the backup (shut down?)",
                    asm.position()
                )))
            }
        }
    }
    let end = asm.position();
    let tail = asm.partial();
    if !tail.bytes.is_empty() {
        let mut data = tail.bytes.to_vec();
        data.resize(job.seg_size as usize, 0);
        let name = WalFileName::segment(job.tli, end.segno(job.seg_size), job.seg_size);
        entries.push(store_bytes(
            job.repo,
            &job.key,
            &format!("pg_wal/{name}"),
            &data,
            job.compress,
        )?);
    }
    st.stop()?;
    Ok(StreamOutcome { entries, end })
}

/// Answers a pending tail request once the stream has passed its LSN: with the bytes of
/// the incomplete segment holding it, or (the segment is complete, so already pushed to
/// the archive) by withdrawing it.
fn answer_tail_request(asm: &SegmentAssembler, seg_size: u32, shared: &StreamShared) {
    let want = Lsn(shared.tail_request.load(Ordering::SeqCst));
    if want.0 == 0 || asm.position() < want {
        return;
    }
    let segno = want.segno(seg_size);
    let tail = asm.partial();
    if tail.end.segno(seg_size) == segno && tail.end.segment_offset(seg_size) != 0 {
        if let Ok(mut t) = shared.tail.lock() {
            *t = Some((segno, tail.bytes.to_vec()));
        }
    }
    shared.tail_request.store(0, Ordering::SeqCst);
}

/// Stores `data` as `name` in the archive unless it is there already (same content is
/// success, different content an error), through the archive's push path, which indexes
/// it. The push path reads a file, so the bytes go through a private temp file.
// MERGE NOTE: helper RECEIVE adds `archive::push::push_bytes(ar, name, data)`; this
// becomes a call to it.
fn push(ar: &WalArchive, name: &WalFileName, data: &[u8]) -> Result<()> {
    crate::archive::push::push_bytes(ar, data, name)
        .map(|_| ())
        .map_err(|e| e.context(format!("archiving streamed {name}")))
}
