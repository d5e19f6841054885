//! `walnut receive`: a long-running WAL receiver (like `pg_receivewal`) that streams WAL
//! over the replication protocol into the instance's archive, in the archive's format and
//! indexed on arrival, beside or instead of `walnut-archive`.
//!
//! - A permanent physical slot (`--slot`, default `walnut_receive`), created with
//!   `RESERVE_WAL` when absent; `application_name` `walnut_receive` so that
//!   `synchronous_standby_names` can name it.
//! - Start: the slot's `restart_lsn` (PostgreSQL 15+: `READ_REPLICATION_SLOT`, with its
//!   timeline), or the local in-progress segment when it is further (it always is, unless
//!   the spool was lost: the slot only moves to what was fsynced here). On older servers
//!   with no local state: the segment of the server's current position.
//! - Completed segments are stored exactly as `walnut-archive` stores them
//!   ([`crate::archive::push::push_bytes`]): create-only, the same content again is
//!   success, different content an error that stops the receiver. It is therefore safe to
//!   run beside `walnut-archive` for the same instance.
//! - The segment being filled is local working state, not catalog content: it lives in the
//!   receive spool (`--spool-dir`; default `<catalog>/instances/NAME/wal/.receive/`, a
//!   dot-directory that never lists as catalog content) as `<segment>.partial`, holding the
//!   bytes received so far (not padded). It is written and fsynced before any flush
//!   position covering it is reported. `walnut-fetch` serves it (zero-padded to a segment)
//!   when recovery asks for that segment and nothing is archived under the name.
//! - Timeline switches: the stream's end of timeline is followed; the new timeline's
//!   `.history` is fetched (`TIMELINE_HISTORY`) and stored, the old timeline's last segment
//!   is stored as `<segment>.partial` (zero-padded to a segment, as PostgreSQL's own), and
//!   streaming continues on the new timeline from the start of the switch segment.
//! - `--synchronous`: flush is reported as soon as each batch of XLogData is fsynced, so the
//!   receiver can be a synchronous standby. Without it, flush is reported every 200 ms and
//!   on each segment completion; a crash of the primary then loses at most what was not yet
//!   reported (and, with asynchronous commit on the server, what it had not sent).
//! - Connection loss: reconnects with back-off (1 s doubling to 30 s). SIGTERM/SIGINT: the
//!   received bytes are fsynced, a final status update is sent, and it exits 0.
//! - `status.json` in the spool (pid, slot, timeline, flushed LSN, server WAL end, time of
//!   the last message) is rewritten freely; `show --archive` reports it.
//! - SIGKILL at any point: the spool's `.partial` holds only bytes that were received, and a
//!   completed segment is archived before its spool file is removed. A restart resumes the
//!   `.partial` (a full-size one is archived first), or re-streams from the slot.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::archive::push::{self, PushOutcome};
use crate::archive::WalArchive;
use crate::catalog::Catalog;
use crate::durable;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::replication::{Event, ReplConfig, ReplConnection, SegmentAssembler};
use crate::server::ConnParams;
use crate::types::{Lsn, TimeLineId, WalFileName};

/// Name of the default receive spool inside the archive directory of a local catalog.
pub const RECEIVE_DIR: &str = ".receive";
/// The status file in the spool.
pub const STATUS_FILE: &str = "status.json";
/// The lock file held by the running receiver.
const LOCK_FILE: &str = ".receive.lock";
/// Default slot name.
pub const DEFAULT_SLOT: &str = "walnut_receive";
/// Default `application_name`.
pub const DEFAULT_APPLICATION_NAME: &str = "walnut_receive";

/// How often flush is reported without `--synchronous` (and the status file rewritten).
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Back-off after a lost connection: from the first to the last, doubling.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// In synchronous mode, at most this many bytes are gathered before an fsync.
const SYNC_BATCH_BYTES: usize = 4 << 20;

/// What `walnut receive` is asked to do (built from its command line by `crate::cli`).
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub catalog: crate::repo::CatalogLocation,
    pub instance: String,
    pub conn: ConnParams,
    pub slot: String,
    pub application_name: String,
    /// The receive spool; `None`: `<archive>/.receive` of a local catalog.
    pub spool_dir: Option<PathBuf>,
    pub synchronous: bool,
}

/// The receiver's status file (local state in its spool).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReceiverStatus {
    pub pid: u32,
    pub slot: String,
    pub timeline: TimeLineId,
    /// Everything before this LSN is durable (archived or fsynced in the spool).
    pub flushed_lsn: String,
    /// The server's end of WAL as of its last message.
    pub server_wal_end: String,
    /// When the last message from the server arrived (ISO 8601 UTC, this host's clock).
    pub last_message_time: Option<String>,
    /// The same, Unix seconds (for computing the lag).
    pub last_message_unix: Option<f64>,
    /// `streaming`, `reconnecting` or `stopped`.
    pub state: String,
    pub synchronous: bool,
}

/// Set by SIGTERM and SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the SIGTERM/SIGINT handlers that end [`run`] cleanly.
pub fn install_signal_handlers() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &act) }
            .map_err(|e| Error::invalid(format!("cannot install a {sig} handler: {e}")))?;
    }
    Ok(())
}

fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// The receive spool for these options.
pub fn spool_dir(ar: &WalArchive, opts: &ReceiveOptions) -> Result<PathBuf> {
    match &opts.spool_dir {
        Some(d) => Ok(std::path::absolute(d).unwrap_or_else(|_| d.clone())),
        None => ar.receive_spool().ok_or_else(|| {
            Error::invalid(
                "the catalog is not a local directory: give walnut receive a local --spool-dir",
            )
        }),
    }
}

/// Reads a receiver's status file in `spool`; `None` when there is none.
pub fn read_status(spool: &Path) -> Result<Option<ReceiverStatus>> {
    let p = spool.join(STATUS_FILE);
    match fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::corruption(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", &p, e)),
    }
}

/// Whether a receiver holds the lock of `spool` now.
pub fn is_running(spool: &Path) -> bool {
    crate::archive::lock_holder(&spool.join(LOCK_FILE)).is_some()
}

/// The in-progress segment in `spool` (`<segment>.partial`), for `walnut-fetch`: its bytes
/// zero-padded to a segment, when it is `name`'s and holds at least a page header and
/// passes the archive's header checks; `None` when there is none (or it is empty). A file
/// that is there but cannot be read, is not a regular file or fails the checks is an error.
pub fn serve_partial(ar: &WalArchive, spool: &Path, name: &WalFileName) -> Result<Option<Vec<u8>>> {
    let WalFileName::Segment { tli, log, seg } = *name else {
        return Ok(None);
    };
    let partial = WalFileName::Partial { tli, log, seg };
    let p = spool.join(partial.to_string());
    let meta = match fs::symlink_metadata(&p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("stat", &p, e)),
    };
    if !meta.file_type().is_file() {
        return Err(Error::corruption(format!(
            "\"{}\" is not a regular file",
            p.display()
        )));
    }
    let mut data = match fs::read(&p) {
        Ok(d) => d,
        // Completed and removed meanwhile: the caller looks in the archive again.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &p, e)),
    };
    let seg_size = ar.seg_size() as usize;
    if data.len() > seg_size {
        return Err(Error::corruption(format!(
            "\"{}\" has {} bytes, more than a segment ({seg_size})",
            p.display(),
            data.len()
        )));
    }
    if data.len() < crate::wal::SIZE_OF_LONG_PHD {
        return Ok(None);
    }
    push::check_header(ar, &partial, &data, &format!("\"{}\"", p.display()))?;
    data.resize(seg_size, 0);
    Ok(Some(data))
}

/// Runs the receiver until SIGTERM/SIGINT (or a fatal error).
pub fn run(opts: &ReceiveOptions) -> Result<()> {
    crate::replication::check_slot_name(&opts.slot)?;
    let catalog = Catalog::open_at(&opts.catalog)?;
    let ar = WalArchive::open(&catalog, &opts.instance)?;
    let spool = spool_dir(&ar, opts)?;
    match fs::create_dir(&spool) {
        Ok(()) => durable::fsync_dir(spool.parent().unwrap_or(Path::new(".")))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && spool.is_dir() => {}
        Err(e) => return Err(Error::io("create directory", &spool, e)),
    }
    let lock_p = spool.join(LOCK_FILE);
    let Some(mut lock) = crate::archive::try_lock_file(&lock_p)? else {
        return Err(Error::refused(format!(
            "another walnut receive runs with the spool \"{}\"",
            spool.display()
        )));
    };
    lock.set_len(0).ctx("truncate", &lock_p)?;
    lock.write_all(format!("{}\n", std::process::id()).as_bytes())
        .ctx("write", &lock_p)?;

    let cfg = repl_config(&ar, opts);
    let mut r = Receiver {
        ar: &ar,
        spool,
        opts,
        status: ReceiverStatus {
            pid: std::process::id(),
            slot: opts.slot.clone(),
            synchronous: opts.synchronous,
            ..Default::default()
        },
        cur: None,
    };
    let mut backoff = BACKOFF_FIRST;
    loop {
        if stop_requested() {
            break;
        }
        let t0 = Instant::now();
        match r.session(&cfg) {
            Ok(()) => {
                if stop_requested() {
                    break;
                }
                log::info!("the server at {} ended the stream", cfg.endpoint());
            }
            Err(e) if fatal(&e) => {
                r.set_state("stopped");
                return Err(e);
            }
            Err(e) => log::warn!("receiving from {}: {e}", cfg.endpoint()),
        }
        // A session that ran for a while resets the back-off.
        if t0.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_FIRST;
        }
        r.set_state("reconnecting");
        log::info!("reconnecting in {} s", backoff.as_secs());
        let until = Instant::now() + backoff;
        while Instant::now() < until && !stop_requested() {
            std::thread::sleep(Duration::from_millis(50));
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    r.set_state("stopped");
    log::info!("stopped at {}", r.status.flushed_lsn);
    Ok(())
}

/// Errors that stop the receiver instead of a reconnection: different content in the
/// archive, another cluster, bad options, damage.
fn fatal(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Conflict | ErrorKind::Refused | ErrorKind::Corruption
    )
}

/// Connection settings: the options, then PG* variables, then the instance's.
fn repl_config(ar: &WalArchive, opts: &ReceiveOptions) -> ReplConfig {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let c = ar.config();
    let p = ConnParams {
        host: opts
            .conn
            .host
            .clone()
            .or_else(|| env("PGHOST"))
            .or_else(|| c.host.clone()),
        port: opts
            .conn
            .port
            .or_else(|| env("PGPORT").and_then(|s| s.parse().ok()))
            .or(c.port),
        user: opts
            .conn
            .user
            .clone()
            .or_else(|| env("PGUSER"))
            .or_else(|| c.user.clone()),
        dbname: None,
    };
    let mut cfg = ReplConfig::from_params(&p);
    cfg.application_name = opts.application_name.clone();
    cfg
}

/// The open spool file of the segment being filled.
struct SpoolFile {
    name: WalFileName,
    path: PathBuf,
    file: fs::File,
    len: usize,
    /// Bytes written since the last fsync.
    dirty: bool,
}

struct Receiver<'a> {
    ar: &'a WalArchive,
    spool: PathBuf,
    opts: &'a ReceiveOptions,
    status: ReceiverStatus,
    cur: Option<SpoolFile>,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Unix seconds as ISO 8601 UTC.
pub fn unix_to_iso(secs: f64) -> String {
    const PG_EPOCH_UNIX: f64 = 946_684_800.0;
    crate::archive::show::pg_time_to_iso(((secs - PG_EPOCH_UNIX) * 1e6) as i64)
}

impl Receiver<'_> {
    fn write_status(&self) {
        let p = self.spool.join(STATUS_FILE);
        let tmp = self.spool.join(format!("{STATUS_FILE}.tmp"));
        let res = serde_json::to_vec_pretty(&self.status)
            .map_err(std::io::Error::other)
            .and_then(|b| fs::write(&tmp, b))
            .and_then(|_| fs::rename(&tmp, &p));
        if let Err(e) = res {
            log::warn!("could not write the status file \"{}\": {e}", p.display());
        }
    }

    fn set_state(&mut self, s: &str) {
        self.status.state = s.to_string();
        self.write_status();
    }

    fn spool_path(&self, name: &WalFileName) -> PathBuf {
        self.spool.join(name.to_string())
    }

    /// The local in-progress segment, if any: the newest `.partial` in the spool whose
    /// header passes the checks (others are set aside as `.bad`, local state only).
    fn local_partial(&self) -> Result<Option<(WalFileName, Vec<u8>)>> {
        let mut found: Vec<WalFileName> = Vec::new();
        let rd = fs::read_dir(&self.spool).ctx("list", &self.spool)?;
        for e in rd {
            let e = e.ctx("list", &self.spool)?;
            if let Some(n) = e
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<WalFileName>().ok())
            {
                if matches!(n, WalFileName::Partial { .. }) {
                    found.push(n);
                }
            }
        }
        // Oldest first: by position, then timeline.
        let seg = self.ar.seg_size();
        found.sort_by_key(|n| (n.segno(seg), n.tli()));
        let Some(newest) = found.pop() else {
            return Ok(None);
        };
        for old in found {
            // Left by a run killed between creating the next file and removing this one,
            // or at a timeline switch: such a file's content is archived already.
            let p = self.spool_path(&old);
            log::info!("removing the superseded spool file \"{}\"", p.display());
            durable::remove_file(&p)?;
        }
        let p = self.spool_path(&newest);
        let data = fs::read(&p).ctx("read", &p)?;
        if data.len() > seg as usize {
            return Err(Error::corruption(format!(
                "spool file \"{}\" is longer than a segment",
                p.display()
            )));
        }
        if data.len() >= crate::wal::SIZE_OF_LONG_PHD {
            if let Err(e) =
                push::check_header(self.ar, &newest, &data, &format!("\"{}\"", p.display()))
            {
                let bad = p.with_extension("partial.bad");
                log::warn!(
                    "spool file unusable ({e}); set aside as \"{}\", streaming from the slot",
                    bad.display()
                );
                fs::rename(&p, &bad).ctx("rename", &p)?;
                return Ok(None);
            }
        }
        Ok(Some((newest, data)))
    }

    /// One connection: identify, slot, start position, stream (following timeline
    /// switches) until stopped or the connection ends.
    fn session(&mut self, cfg: &ReplConfig) -> Result<()> {
        let mut conn = ReplConnection::connect(cfg)?;
        let id = conn.identify_system()?;
        let icfg = self.ar.config();
        if id.system_id != icfg.system_id {
            return Err(Error::refused(format!(
                "the server at {} has database system identifier {}, not instance \"{}\"'s ({})",
                conn.endpoint(),
                id.system_id,
                icfg.name,
                icfg.system_id
            )));
        }
        let seg = conn.wal_segment_size()?;
        if seg != self.ar.seg_size() {
            return Err(Error::refused(format!(
                "the server at {} has {seg}-byte WAL segments, the instance {}",
                conn.endpoint(),
                self.ar.seg_size()
            )));
        }
        let slot_pos = self.ensure_slot(&mut conn)?;
        let mut asm = self.start_position(slot_pos, &id)?;
        self.store_history(&mut conn, asm.timeline())?;
        self.open_spool_file(&asm)?;
        loop {
            let tli = asm.timeline();
            log::info!(
                "streaming timeline {tli} from {} (slot {})",
                asm.position(),
                self.opts.slot
            );
            let end = self.stream(&mut conn, &mut asm)?;
            let Some((next_tli, switchpoint)) = end else {
                return Ok(());
            };
            log::info!("timeline {tli} ended at {switchpoint}; following timeline {next_tli}");
            self.sync_spool()?;
            self.store_history(&mut conn, next_tli)?;
            if let Some((pname, mut bytes)) = asm.switch_timeline(next_tli, switchpoint)? {
                bytes.resize(seg as usize, 0);
                self.store_partial(&pname, &bytes)?;
            }
            let old = self.cur.take();
            self.open_spool_file(&asm)?;
            if let Some(old) = old {
                durable::remove_file(&old.path)?;
            }
        }
    }

    /// Creates the slot when absent; its restart position and timeline when known.
    fn ensure_slot(&self, conn: &mut ReplConnection) -> Result<Option<(Lsn, Option<TimeLineId>)>> {
        let slot = &self.opts.slot;
        if conn.server_major() >= 15 {
            if let Some(s) = conn.read_slot(slot)? {
                if s.slot_type != "physical" {
                    return Err(Error::refused(format!(
                        "replication slot \"{slot}\" is a {} slot, not a physical one",
                        s.slot_type
                    )));
                }
                return Ok(s.restart_lsn.map(|l| (l, s.restart_tli)));
            }
            log::info!("creating the physical replication slot \"{slot}\"");
            conn.create_physical_slot(slot, false, true)?;
            return Ok(conn
                .read_slot(slot)?
                .and_then(|s| s.restart_lsn.map(|l| (l, s.restart_tli))));
        }
        // Before 15 there is no READ_REPLICATION_SLOT: create it unless it exists, and
        // read its position from pg_replication_slots over a normal connection.
        match conn.create_physical_slot(slot, false, true) {
            Ok(_) => log::info!("created the physical replication slot \"{slot}\""),
            Err(e) if e.message().contains("already exists") => {}
            Err(e) => return Err(e),
        }
        match self.slot_from_sql() {
            Ok(Some(l)) => {
                let tli = self.timeline_of(conn, l)?;
                Ok(Some((l, Some(tli))))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                log::warn!("could not read slot \"{slot}\" from pg_replication_slots: {e}");
                Ok(None)
            }
        }
    }

    /// `restart_lsn` of the slot from `pg_replication_slots` (servers before 15).
    fn slot_from_sql(&self) -> Result<Option<Lsn>> {
        let mut sess = crate::server::connect(&self.opts.conn, self.ar.config())?;
        let rows = sess.client().query(
            "select restart_lsn::text from pg_replication_slots \
             where slot_name = $1 and slot_type = 'physical'",
            &[&self.opts.slot],
        )?;
        match rows.first().and_then(|r| r.get::<_, Option<String>>(0)) {
            Some(s) => Ok(Some(s.parse()?)),
            None => Ok(None),
        }
    }

    /// The timeline of the server's history that `lsn` lies on.
    fn timeline_of(&self, conn: &mut ReplConnection, lsn: Lsn) -> Result<TimeLineId> {
        let id = conn.identify_system()?;
        if id.timeline <= 1 {
            return Ok(id.timeline);
        }
        let h = conn.timeline_history(id.timeline)?;
        let entries = crate::archive::parse_history(&h.content, &h.name.to_string())?;
        Ok(entries
            .iter()
            .find(|e| lsn < e.switchpoint)
            .map_or(id.timeline, |e| e.tli))
    }

    /// Where streaming starts: the local `.partial` when it is at or after the slot's
    /// segment, else the slot's restart segment (or the server's current one).
    fn start_position(
        &mut self,
        slot_pos: Option<(Lsn, Option<TimeLineId>)>,
        id: &crate::replication::SystemIdentity,
    ) -> Result<SegmentAssembler> {
        let seg = self.ar.seg_size();
        let seg_start = |l: Lsn| Lsn(l.0 - l.segment_offset(seg));
        let mut local = self.local_partial()?;
        // A full-size spool file: the run was killed between its last write and archiving
        // it. Archive it now (the same content again is success).
        if let Some((name, data)) = &local {
            if data.len() == seg as usize {
                let WalFileName::Partial { tli, log, seg: s } = *name else {
                    unreachable!("local_partial returns .partial names")
                };
                let full = WalFileName::Segment { tli, log, seg: s };
                self.store_segment(&full, data)?;
                let next = Lsn(full.start_lsn(seg).map(|l| l.0).unwrap_or(0) + seg as u64);
                durable::remove_file(&self.spool_path(name))?;
                local = None;
                if slot_pos.is_none_or(|(l, _)| next >= seg_start(l)) {
                    return SegmentAssembler::new(tli, seg, next);
                }
            }
        }
        if let Some((name, data)) = local {
            let start = name.start_lsn(seg).unwrap_or(Lsn(0));
            match slot_pos {
                Some((l, _)) if start < seg_start(l) => {
                    log::warn!(
                        "the spool's {name} is behind the slot's restart position {l}; \
                         discarding it and streaming from the slot"
                    );
                    durable::remove_file(&self.spool_path(&name))?;
                }
                _ => {
                    log::info!("resuming {name} at {} bytes", data.len());
                    return SegmentAssembler::resume(name, seg, data);
                }
            }
        }
        // (restart_tli is known on 15+, and looked up in the history before.)
        let (pos, tli) = match slot_pos {
            Some((l, t)) => (l, t.unwrap_or(id.timeline)),
            None => (id.xlogpos, id.timeline),
        };
        SegmentAssembler::new(tli, seg, seg_start(pos))
    }

    /// Stores `tli`'s history file (timeline 1 has none).
    fn store_history(&self, conn: &mut ReplConnection, tli: TimeLineId) -> Result<()> {
        if tli <= 1 {
            return Ok(());
        }
        let name = WalFileName::History { tli };
        if self.ar.is_archived(&name)? {
            return Ok(());
        }
        let h = conn.timeline_history(tli)?;
        push::push_bytes(self.ar, &h.content, &h.name)?;
        log::info!("stored {}", h.name);
        Ok(())
    }

    fn store_segment(&self, name: &WalFileName, data: &[u8]) -> Result<()> {
        match push::push_bytes(self.ar, data, name)? {
            PushOutcome::AlreadyArchived => log::info!("{name} was archived already"),
            _ => log::debug!("stored {name}"),
        }
        Ok(())
    }

    /// Stores the old timeline's last segment as `.partial`. PostgreSQL's own `.partial`
    /// (archived by a promoted standby) holds the same WAL up to the switch point but may
    /// differ after it: one that agrees on our bytes up to the switch is fine.
    fn store_partial(&self, name: &WalFileName, padded: &[u8]) -> Result<()> {
        match push::push_bytes(self.ar, padded, name) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::Conflict => {
                let used = padded.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
                let old = self.ar.read(name)?;
                if old.get(..used) == padded.get(..used) {
                    log::info!("{name} was archived already with the same WAL");
                    Ok(())
                } else {
                    Err(e)
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Creates (or opens, when resuming) the spool file of the assembler's segment and
    /// makes it hold exactly the assembler's bytes.
    fn open_spool_file(&mut self, asm: &SegmentAssembler) -> Result<()> {
        let part = asm.partial();
        let path = self.spool_path(&part.name);
        if let Some(c) = &self.cur {
            if c.name == part.name && c.len == part.bytes.len() {
                return Ok(());
            }
        }
        let existed = path.exists();
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx("open", &path)?;
        file.set_len(0).ctx("truncate", &path)?;
        file.write_all(part.bytes).ctx("write", &path)?;
        file.sync_data().ctx("fsync", &path)?;
        if !existed {
            durable::fsync_dir(&self.spool)?;
        }
        self.cur = Some(SpoolFile {
            name: part.name,
            path,
            file,
            len: part.bytes.len(),
            dirty: false,
        });
        Ok(())
    }

    /// Appends what the assembler holds beyond the spool file's length.
    fn append_spool(&mut self, asm: &SegmentAssembler) -> Result<()> {
        let part = asm.partial();
        let Some(c) = self.cur.as_mut().filter(|c| c.name == part.name) else {
            return self.open_spool_file(asm);
        };
        if let Some(more) = part.bytes.get(c.len..) {
            if !more.is_empty() {
                c.file
                    .seek(SeekFrom::Start(c.len as u64))
                    .ctx("seek", &c.path)?;
                c.file.write_all(more).ctx("write", &c.path)?;
                c.len += more.len();
                c.dirty = true;
            }
        }
        Ok(())
    }

    fn sync_spool(&mut self) -> Result<()> {
        if let Some(c) = self.cur.as_mut() {
            if c.dirty {
                c.file.sync_data().ctx("fsync", &c.path)?;
                c.dirty = false;
            }
        }
        Ok(())
    }

    /// Handles streamed bytes: completed segments are archived (durable) before the spool
    /// file moves on to the next segment.
    fn on_data(&mut self, asm: &mut SegmentAssembler, start: Lsn, bytes: &[u8]) -> Result<bool> {
        let done = asm.push(start, bytes)?;
        let completed = !done.is_empty();
        for s in &done {
            self.store_segment(&s.name, &s.data)?;
        }
        if completed {
            let old = self.cur.take();
            self.open_spool_file(asm)?;
            if let Some(old) = old {
                durable::remove_file(&old.path)?;
            }
        } else {
            self.append_spool(asm)?;
        }
        Ok(completed)
    }

    /// Streams one timeline; `Some((next_tli, switchpoint))` at its end, `None` when
    /// stopped or the server closed the stream.
    fn stream(
        &mut self,
        conn: &mut ReplConnection,
        asm: &mut SegmentAssembler,
    ) -> Result<Option<(TimeLineId, Lsn)>> {
        let tli = asm.timeline();
        let mut st = conn.start_replication(Some(&self.opts.slot), asm.position(), tli)?;
        // Everything before the start is durable here already.
        st.report_flushed(asm.position())?;
        st.send_status()?;
        self.status.timeline = tli;
        self.status.flushed_lsn = asm.position().to_string();
        self.status.state = "streaming".into();
        self.write_status();
        let mut last_flush = Instant::now();
        loop {
            if stop_requested() {
                self.sync_spool()?;
                st.report_flushed(asm.position())?;
                self.status.flushed_lsn = asm.position().to_string();
                let next = st.stop()?;
                self.write_status();
                return Ok(next);
            }
            let mut flush_now = false;
            let mut batch = 0usize;
            let mut timeout = Duration::from_millis(500);
            // Gather what is already there (zero wait after the first event), then fsync
            // once for the batch.
            loop {
                let ev = st.next_event(timeout)?;
                match ev {
                    Event::Data { start, bytes, .. } => {
                        self.note_message(st.server_wal_end());
                        if self.on_data(asm, start, &bytes)? {
                            flush_now = true;
                        }
                        batch += bytes.len();
                        if self.opts.synchronous {
                            flush_now = true;
                        }
                        if batch >= SYNC_BATCH_BYTES {
                            break;
                        }
                        timeout = Duration::ZERO;
                    }
                    Event::Keepalive { .. } => {
                        self.note_message(st.server_wal_end());
                        if batch == 0 {
                            break;
                        }
                    }
                    Event::Timeout => break,
                    Event::EndOfTimeline {
                        next_tli,
                        switchpoint,
                    } => return Ok(Some((next_tli, switchpoint))),
                    Event::ServerClosed => {
                        self.sync_spool()?;
                        return Ok(None);
                    }
                }
            }
            if flush_now || last_flush.elapsed() >= FLUSH_INTERVAL {
                self.sync_spool()?;
                st.report_flushed(asm.position())?;
                st.send_status()?;
                last_flush = Instant::now();
                self.status.flushed_lsn = asm.position().to_string();
                self.write_status_throttled();
            }
        }
    }

    fn note_message(&mut self, wal_end: Lsn) {
        let now = now_unix();
        self.status.last_message_unix = Some(now);
        self.status.last_message_time = Some(unix_to_iso(now));
        self.status.server_wal_end = wal_end.to_string();
    }

    /// Rewrites the status file at most every 200 ms (synchronous mode flushes far more
    /// often than that).
    fn write_status_throttled(&mut self) {
        static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
        let due = match LAST.lock() {
            Ok(mut g) => {
                let due = g.is_none_or(|t| t.elapsed() >= Duration::from_millis(200));
                if due {
                    *g = Some(Instant::now());
                }
                due
            }
            Err(_) => true,
        };
        if due {
            self.write_status();
        }
    }
}
