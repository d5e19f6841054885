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
//!   bytes received so far (not padded). It is written (in 1 MiB pieces, and in full at
//!   each flush) and fsynced before any flush position covering it is reported. Whole
//!   4 KiB blocks are written with `O_DIRECT` straight from the assembler's page-aligned
//!   buffers (the unaligned rest through the page cache, before the fsync): the spool is
//!   read back only after a crash, and filling fresh page-cache pages with every byte of
//!   WAL was a third of the receiver's CPU. The file never holds a byte that was not
//!   received. Where `O_DIRECT` is refused (tmpfs, ...) the page cache is used.
//!   `walnut-fetch` serves it (zero-padded to a segment) when recovery asks for that
//!   segment and nothing is archived under the name. A spool other than the default, with
//!   a local catalog, is recorded in the archive's [`SPOOL_POINTER`] for `walnut-fetch` and
//!   `show --archive` ([`spool_in_use`]).
//! - A completed segment's spool file is written to its full size and handed, with the
//!   segment's bytes, to a store thread (at most [`STORE_QUEUE`] waiting): it archives the
//!   segment as `walnut-archive` does (same format, but LZ4 frames without xxh32 content
//!   checksums, compressed in place into reused buffers: the header's CRC-32C, which every
//!   read verifies over the whole content, guards them; see [`crate::format::segment`]),
//!   decoding it meanwhile with one decoder for the whole stream (each index stored pending at the segment's arrival, complete when the next
//!   has come; no segment is read back), then removes the spool file. The receive loop
//!   never waits for the archive; what it reports flushed is fsynced in the spool.
//! - Timeline switches: the stream's end of timeline is followed; the new timeline's
//!   `.history` is fetched (`TIMELINE_HISTORY`) and stored, the old timeline's last segment
//!   is stored as `<segment>.partial` (zero-padded to a segment, as PostgreSQL's own), and
//!   streaming continues on the new timeline from the start of the switch segment.
//! - `--synchronous`: flush is reported as soon as each batch of XLogData is fsynced, so the
//!   receiver can be a synchronous standby. Without it, flush is reported every 200 ms; a
//!   crash of the primary then loses at most what was not yet reported (and, with
//!   asynchronous commit on the server, what it had not sent).
//! - Connection loss: reconnects with back-off (1 s doubling to 30 s). SIGTERM/SIGINT: the
//!   received bytes are fsynced, a final status update is sent, and it exits 0.
//! - `status.json` in the spool (pid, slot, timeline, flushed LSN, server WAL end, time of
//!   the last message) is rewritten freely; `show --archive` reports it.
//! - SIGKILL at any point: the spool's `.partial` holds only bytes that were received, and a
//!   completed segment is archived before its spool file is removed. A restart archives
//!   the full-size spool files (completed, not archived yet), then resumes the newest
//!   `.partial`, or re-streams from the slot.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::archive::push::{self, PushOutcome};
use crate::archive::WalArchive;
use crate::catalog::Catalog;
use crate::durable;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::index::build::StreamIndexer;
use crate::index::SegmentIndex;
use crate::replication::{CompleteSegment, Event, ReplConfig, ReplConnection, SegmentAssembler};
use crate::server::ConnParams;
use crate::types::{Lsn, TimeLineId, WalFileName};

/// Name of the default receive spool inside the archive directory of a local catalog.
pub const RECEIVE_DIR: &str = ".receive";
/// The status file in the spool.
pub const STATUS_FILE: &str = "status.json";
/// In a local catalog's archive directory: names the spool of a receiver started with a
/// `--spool-dir` other than the default (a dot-name: local state, never catalog content).
pub const SPOOL_POINTER: &str = ".receive-spool";
/// The lock file held by the running receiver.
const LOCK_FILE: &str = ".receive.lock";
/// Default slot name.
pub const DEFAULT_SLOT: &str = "walnut_receive";
/// Default `application_name`.
pub const DEFAULT_APPLICATION_NAME: &str = "walnut_receive";

/// How often flush is reported without `--synchronous`.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// How often the status file is rewritten while streaming, at most.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How many completed segments may wait for the store thread (each holds a segment-sized
/// buffer, and its full spool file stays until it is archived); beyond that the receive
/// loop waits for it. Fewer for large segments: at most [`STORE_QUEUE_BYTES`] wait.
const STORE_QUEUE: usize = 2;
const STORE_QUEUE_BYTES: usize = 64 << 20;
/// The spool file is written when this much is unwritten, and at each flush.
const SPOOL_WRITE: usize = 1 << 20;
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

/// The spool that `walnut-fetch` and `show --archive` look at: the one the archive's
/// [`SPOOL_POINTER`] names (written by a receiver started with another `--spool-dir`),
/// else the default; `None` for a catalog that is not a local directory (its receiver's
/// spool is on whichever host runs it: the catalog records no local paths). A pointer
/// that is not a regular file or names no absolute path is an error: the spool it meant
/// may hold the newest WAL, so it is never taken for absent.
pub fn spool_in_use(ar: &WalArchive) -> Result<Option<PathBuf>> {
    let Some(default) = ar.receive_spool() else {
        return Ok(None);
    };
    let p = ar.dir().join(SPOOL_POINTER);
    let meta = match fs::symlink_metadata(&p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(default)),
        Err(e) => return Err(Error::io("stat", &p, e)),
    };
    let bad = |why: &str| {
        Error::corruption(format!(
            "\"{}\" (where walnut receive records its --spool-dir) {why}",
            p.display()
        ))
    };
    if !meta.file_type().is_file() || meta.len() > 4096 {
        return Err(bad("is not a small regular file"));
    }
    let text = fs::read(&p).ctx("read", &p)?;
    let text = String::from_utf8(text).map_err(|_| bad("is not UTF-8"))?;
    let dir = PathBuf::from(text.trim_end_matches('\n'));
    if !dir.is_absolute() || text.trim_end_matches('\n').contains('\n') {
        return Err(bad("does not hold one absolute path"));
    }
    Ok(Some(dir))
}

/// Records where this receiver's spool is, for [`spool_in_use`]: a non-default spool of a
/// local catalog is named in the archive's [`SPOOL_POINTER`]; the default one removes it.
fn record_spool(ar: &WalArchive, spool: &Path) -> Result<()> {
    let Some(default) = ar.receive_spool() else {
        return Ok(());
    };
    let p = ar.dir().join(SPOOL_POINTER);
    if spool == default {
        return durable::remove_file(&p);
    }
    let Some(text) = spool.to_str().map(|s| format!("{s}\n")) else {
        log::warn!(
            "the spool \"{}\" is not a UTF-8 path: walnut-fetch and show will not find it",
            spool.display()
        );
        return Ok(());
    };
    if fs::read(&p).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(());
    }
    durable::write_file(&p, text.as_bytes(), durable::Replace::Yes)?;
    log::info!(
        "recorded the spool \"{}\" in \"{}\" for walnut-fetch and show",
        spool.display(),
        p.display()
    );
    Ok(())
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
    record_spool(&ar, &spool)?;

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
        completed: Vec::new(),
        dir_dirty: false,
        store: None,
        last_status_write: None,
        bounce: Bounce::default(),
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
    /// The same file opened with `O_DIRECT` (`None` where the file system refuses it):
    /// whole aligned blocks go through it, see [`SpoolFile::append`].
    direct: Option<fs::File>,
    len: usize,
    /// Bytes written since the last fsync.
    dirty: bool,
}

struct Receiver<'a> {
    ar: &'a WalArchive,
    spool: PathBuf,
    opts: &'a ReceiveOptions,
    status: ReceiverStatus,
    /// The spool file of the segment being filled.
    cur: Option<SpoolFile>,
    /// Spool files of completed segments not fsynced yet (the store thread may have
    /// archived and removed them meanwhile: fsyncing an unlinked file is harmless).
    completed: Vec<SpoolFile>,
    /// Files were created in the spool since its last fsync.
    dir_dirty: bool,
    /// The store thread of the current session.
    store: Option<StoreLink>,
    last_status_write: Option<Instant>,
    /// Staging for the spool's `O_DIRECT` writes.
    bounce: Bounce,
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
            let p = self.spool_path(&old);
            // A completed segment that the store thread had not archived yet (a full-size
            // file; its bytes were received in full): archive it now. Any other older file
            // is the last one of a timeline, archived as .partial at the switch.
            let full = fs::symlink_metadata(&p)
                .is_ok_and(|m| m.file_type().is_file() && m.len() == u64::from(seg));
            if let (true, WalFileName::Partial { tli, log, seg: s }) = (full, old) {
                let data = fs::read(&p).ctx("read", &p)?;
                let name = WalFileName::Segment { tli, log, seg: s };
                log::info!("archiving {name} from the spool");
                self.store_segment(&name, &data)?;
            } else {
                log::info!("removing the superseded spool file \"{}\"", p.display());
            }
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

    /// One connection, with its store thread: streams until stopped or the connection
    /// ends, then lets the store thread archive what it was given (or stop at its first
    /// error) before returning.
    fn session(&mut self, cfg: &ReplConfig) -> Result<()> {
        let ar = self.ar;
        std::thread::scope(|s| {
            let depth = STORE_QUEUE.min(STORE_QUEUE_BYTES / ar.seg_size() as usize);
            let (tx, jobs) = mpsc::sync_channel::<StoreJob>(depth);
            let (reply_tx, rx) = mpsc::channel();
            let worker = s.spawn(move || store_thread(ar, jobs, reply_tx));
            self.store = Some(StoreLink { tx, rx });
            let res = self.session_stream(cfg);
            let mut stored = Ok(());
            if let Some(link) = self.store.take() {
                drop(link.tx);
                for r in link.rx.iter() {
                    if let StoreReply::Failed(e) = r {
                        stored = Err(e);
                    }
                }
            }
            if worker.join().is_err() {
                stored = Err(Error::invalid("walnut receive: the store thread panicked"));
            }
            match (res, stored) {
                (Err(e), Err(se)) if !fatal(&e) && fatal(&se) => Err(se),
                (Err(e), _) => Err(e),
                (Ok(()), r) => r,
            }
        })
    }

    /// One connection: identify, slot, start position, stream (following timeline
    /// switches) until stopped or the connection ends.
    fn session_stream(&mut self, cfg: &ReplConfig) -> Result<()> {
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
            self.sync_spool(&asm)?;
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
    /// makes it hold exactly the assembler's bytes. It is fsynced (and a new entry in the
    /// spool directory with it) by the next [`Self::sync_spool`], before any flush position
    /// covering it is reported.
    fn open_spool_file(&mut self, asm: &SegmentAssembler) -> Result<()> {
        let part = asm.partial();
        if let Some(c) = &self.cur {
            if c.name == part.name && c.len == part.bytes.len() {
                return Ok(());
            }
        }
        let mut c = self.create_spool_file(part.name)?;
        c.file.write_all(part.bytes).ctx("write", &c.path)?;
        c.len = part.bytes.len();
        c.dirty = true;
        self.cur = Some(c);
        Ok(())
    }

    /// Creates `name`'s spool file, or empties it when it exists.
    fn create_spool_file(&mut self, name: WalFileName) -> Result<SpoolFile> {
        let path = self.spool_path(&name);
        let existed = path.exists();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx("open", &path)?;
        file.set_len(0).ctx("truncate", &path)?;
        if !existed {
            self.dir_dirty = true;
        }
        let direct = open_direct(&path);
        Ok(SpoolFile {
            name,
            path,
            file,
            direct,
            len: 0,
            dirty: true,
        })
    }

    /// Appends what the assembler holds beyond the spool file's length, once that is at
    /// least `min` bytes: the spool is written in large pieces (the bytes are in the
    /// assembler meanwhile), not one small write per message.
    fn append_spool(&mut self, asm: &SegmentAssembler, min: usize) -> Result<()> {
        let part = asm.partial();
        let Some(c) = self.cur.as_mut().filter(|c| c.name == part.name) else {
            return self.open_spool_file(asm);
        };
        if part.bytes.len().saturating_sub(c.len) >= min.max(1) {
            c.append(part.bytes, min == 0, &mut self.bounce)?;
        }
        Ok(())
    }

    /// Makes everything received durable in the spool: writes what the assembler holds
    /// beyond the spool file, then fsyncs the completed segments' files not yet fsynced,
    /// the current one, and the directory when files were created in it.
    fn sync_spool(&mut self, asm: &SegmentAssembler) -> Result<()> {
        self.append_spool(asm, 0)?;
        for c in std::mem::take(&mut self.completed) {
            c.file.sync_data().ctx("fsync", &c.path)?;
        }
        if let Some(c) = self.cur.as_mut() {
            if c.dirty {
                c.file.sync_data().ctx("fsync", &c.path)?;
                c.dirty = false;
            }
        }
        if self.dir_dirty {
            durable::fsync_dir(&self.spool)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Handles streamed bytes. A completed segment's spool file is written to its end and
    /// handed, with the segment's bytes, to the store thread, which archives and indexes it
    /// and then removes the file; the next segment gets a new spool file. The stream never
    /// waits for the archive: the completed file is fsynced with the next flush, like the
    /// partial one, so what is reported flushed is durable here either way.
    fn on_data(&mut self, asm: &mut SegmentAssembler, start: Lsn, bytes: &[u8]) -> Result<()> {
        let done = asm.push(start, bytes)?;
        if done.is_empty() {
            return self.append_spool(asm, SPOOL_WRITE);
        }
        for seg in done {
            let path = self.complete_spool_file(&seg)?;
            self.hand_over(asm, seg, path)?;
        }
        self.open_spool_file(asm)
    }

    /// Writes a completed segment's spool file to its full size; it waits in
    /// `self.completed` for its fsync. Returns its path.
    fn complete_spool_file(&mut self, seg: &CompleteSegment) -> Result<PathBuf> {
        let WalFileName::Segment { tli, log, seg: s } = seg.name else {
            return Err(Error::invalid(format!("{} is not a segment", seg.name)));
        };
        let pname = WalFileName::Partial { tli, log, seg: s };
        let mut c = match self.cur.take() {
            Some(c) if c.name == pname => c,
            other => {
                // (Not reached: the spool file always follows the assembler's segment.)
                if let Some(o) = other {
                    self.completed.push(o);
                }
                self.create_spool_file(pname)?
            }
        };
        c.append(seg.data(), true, &mut self.bounce)?;
        let path = c.path.clone();
        self.completed.push(c);
        Ok(path)
    }

    /// Queues a completed segment for the store thread (waiting while it is
    /// [`STORE_QUEUE`] segments behind).
    fn hand_over(
        &mut self,
        asm: &mut SegmentAssembler,
        seg: CompleteSegment,
        spool_file: PathBuf,
    ) -> Result<()> {
        self.poll_store(asm)?;
        let Some(link) = self.store.as_mut() else {
            return Err(Error::invalid("walnut receive: no store thread"));
        };
        if link.tx.send(StoreJob { seg, spool_file }).is_err() {
            // The store thread ended: it says why.
            return match link.rx.recv() {
                Ok(StoreReply::Failed(e)) => Err(e),
                _ => Err(Error::invalid("walnut receive: the store thread ended")),
            };
        }
        Ok(())
    }

    /// Takes the store thread's answers: buffers to reuse, or its error.
    fn poll_store(&mut self, asm: &mut SegmentAssembler) -> Result<()> {
        let Some(link) = self.store.as_mut() else {
            return Ok(());
        };
        loop {
            match link.rx.try_recv() {
                Ok(StoreReply::Stored(buf)) => asm.recycle(buf),
                Ok(StoreReply::Failed(e)) => return Err(e),
                Err(_) => return Ok(()),
            }
        }
    }

    /// Streams one timeline; `Some((next_tli, switchpoint))` at its end, `None` when
    /// stopped or the server closed the stream.
    fn stream(
        &mut self,
        conn: &mut ReplConnection,
        asm: &mut SegmentAssembler,
    ) -> Result<Option<(TimeLineId, Lsn)>> {
        let tli = asm.timeline();
        // Everything before the start is durable here already (or archived).
        self.sync_spool(asm)?;
        let mut st = conn.start_replication(Some(&self.opts.slot), asm.position(), tli)?;
        st.report_flushed(asm.position())?;
        st.send_status()?;
        self.status.timeline = tli;
        self.status.flushed_lsn = asm.position().to_string();
        self.status.state = "streaming".into();
        self.write_status();
        let mut last_flush = Instant::now();
        loop {
            if stop_requested() {
                self.sync_spool(asm)?;
                st.report_flushed(asm.position())?;
                self.status.flushed_lsn = asm.position().to_string();
                let next = st.stop()?;
                self.write_status();
                return Ok(next);
            }
            self.poll_store(asm)?;
            let mut batch = 0usize;
            let mut timeout = Duration::from_millis(500);
            // Gather what is already there (zero wait after the first event), then fsync
            // once for the batch.
            loop {
                let ev = st.next_event(timeout)?;
                match ev {
                    Event::Data { start, bytes, .. } => {
                        self.note_message(st.server_wal_end());
                        self.on_data(asm, start, &bytes)?;
                        batch += bytes.len();
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
                        self.sync_spool(asm)?;
                        return Ok(None);
                    }
                }
            }
            // Synchronous: every batch is fsynced and reported at once. Otherwise every
            // FLUSH_INTERVAL, which bounds the flush lag without an fsync per message.
            let due = if self.opts.synchronous {
                batch > 0
            } else {
                last_flush.elapsed() >= FLUSH_INTERVAL
            };
            if due && asm.position() > st.flushed() {
                self.sync_spool(asm)?;
                st.report_flushed(asm.position())?;
                st.send_status()?;
                last_flush = Instant::now();
                self.status.flushed_lsn = asm.position().to_string();
                self.write_status_throttled();
            } else if due {
                last_flush = Instant::now();
            }
        }
    }

    fn note_message(&mut self, wal_end: Lsn) {
        let now = now_unix();
        self.status.last_message_unix = Some(now);
        self.status.last_message_time = Some(unix_to_iso(now));
        self.status.server_wal_end = wal_end.to_string();
    }

    /// Rewrites the status file at most every [`STATUS_INTERVAL`] (flushes come far more
    /// often than that).
    fn write_status_throttled(&mut self) {
        if self
            .last_status_write
            .is_none_or(|t| t.elapsed() >= STATUS_INTERVAL)
        {
            self.last_status_write = Some(Instant::now());
            self.write_status();
        }
    }
}

/// Alignment of `O_DIRECT` writes (file offsets, lengths and memory): a page, which
/// covers every logical block size.
const DIRECT_ALIGN: usize = crate::replication::BUFFER_ALIGN;

/// Opens `path` for `O_DIRECT` writes; `None` where that is refused (tmpfs, some network
/// file systems): the spool is then written through the page cache only.
fn open_direct(path: &Path) -> Option<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            log::debug!(
                "\"{}\": no O_DIRECT ({e}); writing through the page cache",
                path.display()
            );
            None
        }
    }
}

/// A page-aligned staging buffer for `O_DIRECT` writes (the assembler's buffers are not
/// aligned), allocated once per receiver.
struct Bounce {
    buf: Vec<u8>,
    off: usize,
}

impl Default for Bounce {
    fn default() -> Bounce {
        let buf = vec![0u8; SPOOL_WRITE + DIRECT_ALIGN];
        let off = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Bounce { buf, off }
    }
}

impl Bounce {
    fn get(&mut self, n: usize) -> &mut [u8] {
        &mut self.buf[self.off..self.off + n.min(SPOOL_WRITE)]
    }
}

impl SpoolFile {
    /// Writes `whole[self.len..]` (`whole`: the segment's bytes from its start) at the
    /// file's end. Whole aligned blocks go through the `O_DIRECT` descriptor: a spool
    /// file is written once and read back only after a crash, and writing it through the
    /// page cache made up a third of the receiver's CPU (every page freshly allocated, then
    /// copied into). The unaligned rest is written through the page cache when `tail`
    /// (before an fsync), else left for the next call, which rewrites its block directly.
    /// The file never holds a byte beyond what was received: a crash leaves a prefix.
    fn append(&mut self, whole: &[u8], tail: bool, bounce: &mut Bounce) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let end = whole.len();
        if end <= self.len {
            return Ok(());
        }
        if let Some(d) = &self.direct {
            let stop = end & !(DIRECT_ALIGN - 1);
            let mut at = self.len & !(DIRECT_ALIGN - 1);
            while at < stop {
                let n = (stop - at).min(SPOOL_WRITE);
                let Some(src) = whole.get(at..at + n) else {
                    break;
                };
                // The assembler's buffers are aligned: straight from them; else staged.
                let buf = if src.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
                    src
                } else {
                    let b = bounce.get(n);
                    b.copy_from_slice(src);
                    b
                };
                if let Err(e) = d.write_all_at(buf, at as u64) {
                    // Written up to somewhere in at..at + n: the page cache takes over from
                    // self.len, rewriting those bytes (the same ones).
                    log::debug!(
                        "\"{}\": O_DIRECT write failed ({e}); writing through the page cache",
                        self.path.display()
                    );
                    self.direct = None;
                    break;
                }
                at += n;
                self.len = self.len.max(at);
                self.dirty = true;
            }
        }
        if self.len < end && (tail || self.direct.is_none()) {
            let more = whole.get(self.len..).unwrap_or_default();
            self.file
                .write_all_at(more, self.len as u64)
                .ctx("write", &self.path)?;
            self.len = end;
            self.dirty = true;
        }
        Ok(())
    }
}

/// A completed segment for the store thread, with its (full-size) spool file, which the
/// thread removes once the segment is archived.
struct StoreJob {
    seg: CompleteSegment,
    spool_file: PathBuf,
}

enum StoreReply {
    /// Archived and indexed; the segment's buffer comes back for reuse.
    Stored(Vec<u8>),
    /// The thread stopped at this error; the segments after it stay in the spool (a new
    /// session archives them first).
    Failed(Error),
}

/// The receive loop's end of the store thread's channels.
struct StoreLink {
    tx: mpsc::SyncSender<StoreJob>,
    rx: mpsc::Receiver<StoreReply>,
}

/// The store thread: archives each completed segment (compressed, create-only, durable:
/// [`push::push_bytes_unindexed`]) while decoding it into the stream's block index (one
/// decoder for the whole stream, so a record that crosses into the next segment is decoded
/// once, and no archived segment is read back), stores the indexes once the segment is
/// durable, and removes the spool file.
fn store_thread(
    ar: &WalArchive,
    jobs: mpsc::Receiver<StoreJob>,
    replies: mpsc::Sender<StoreReply>,
) {
    let mut ix = StreamIndex::default();
    let mut scratch = push::FrameScratch::default();
    for job in jobs {
        let res = store_streamed(ar, &mut ix, &mut scratch, &job.seg).and_then(|()| {
            // No directory fsync: should the removal be lost, a restart archives the file
            // again, which is success (the same content).
            match fs::remove_file(&job.spool_file) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io("remove", &job.spool_file, e)),
            }
        });
        let reply = match res {
            Ok(()) => StoreReply::Stored(job.seg.into_buffer()),
            Err(e) => StoreReply::Failed(e),
        };
        let failed = matches!(reply, StoreReply::Failed(_));
        if replies.send(reply).is_err() || failed {
            break;
        }
    }
}

/// Archives one completed segment and stores the indexes it finishes.
fn store_streamed(
    ar: &WalArchive,
    ix: &mut StreamIndex,
    scratch: &mut push::FrameScratch,
    seg: &CompleteSegment,
) -> Result<()> {
    let seg_size = ar.seg_size();
    let tli = seg.name.tli();
    let segno = seg
        .name
        .segno(seg_size)
        .ok_or_else(|| Error::invalid(format!("{} is not a segment", seg.name)))?;
    let (stored, (indexes, fresh)) = std::thread::scope(|s| {
        let decode = s.spawn(|| ix.feed(seg_size, tli, segno, seg.data()));
        let stored = push::push_bytes_unindexed(ar, seg.data(), &seg.name, scratch);
        let indexes = decode.join().unwrap_or_else(|_| {
            (
                vec![(
                    segno,
                    Err(Error::corruption(format!(
                        "{}: the WAL decoder panicked",
                        seg.name
                    ))),
                )],
                true,
            )
        });
        (stored, indexes)
    });
    match stored? {
        PushOutcome::AlreadyArchived => log::info!("{} was archived already", seg.name),
        _ => log::debug!("stored {}", seg.name),
    }
    // Indexes only once the segment is durable, as walnut-archive stores them.
    for (n, built) in indexes {
        ar.index_and_store(tli, n, &[], Some(built));
    }
    if fresh && segno > 0 {
        // The previous segment's index may be pending since an earlier run (or was left
        // pending by walnut-archive): this segment completes it.
        ar.complete_pending(tli, segno - 1, Some((segno, seg.data())));
    }
    Ok(())
}

/// The block index of the received stream: one [`StreamIndexer`] fed every completed
/// segment in order. A segment's index is stored when it arrives, pending if its last
/// record continues into the next segment, and complete once that record is decoded.
#[derive(Default)]
struct StreamIndex {
    cur: Option<StreamIndexer>,
    tli: TimeLineId,
    /// Segments whose complete index was stored already (at their arrival).
    complete: Vec<u64>,
}

impl StreamIndex {
    /// Decodes segment `segno` of `tli`: the indexes to store now, oldest first (an error
    /// for a segment that cannot be indexed: an `.idx-missing` marker), and whether decoding
    /// started afresh at this segment (not following the previous one).
    fn feed(
        &mut self,
        seg_size: u32,
        tli: TimeLineId,
        segno: u64,
        data: &[u8],
    ) -> (Vec<(u64, Result<SegmentIndex>)>, bool) {
        let follows = self.tli == tli
            && self
                .cur
                .as_ref()
                .is_some_and(|i| i.next_segno() == Some(segno));
        if !follows {
            self.cur = None;
            self.tli = tli;
            self.complete.clear();
        }
        let ix = self.cur.get_or_insert_with(|| StreamIndexer::new(tli));
        let mut out = Vec::new();
        if let Err(e) = ix.feed_segment(segno, data) {
            self.cur = None;
            out.push((segno, Err(e)));
            return (out, !follows);
        }
        for f in ix.take_finished() {
            if !self.complete.contains(&f.segno) {
                out.push((f.segno, Ok(f)));
            }
        }
        // As index_segment: a segment whose WAL ends early, with no WAL switch, is damaged
        // (its index would miss the changes after that point).
        let snap = ix.snapshot(segno);
        let early_end = ix.end_of_wal().filter(|e| {
            e.reason != crate::wal::EndReason::Stopped && e.lsn.segno(seg_size) == segno
        });
        match (early_end, snap) {
            (Some(end), s) if !s.as_ref().is_some_and(|s| s.switched) => {
                self.cur = None;
                out.push((
                    segno,
                    Err(Error::corruption(format!(
                        "WAL segment {}: {end}, before the end of the segment and with no WAL \
                         switch: the file is damaged or incomplete, so its block index would \
                         miss changes",
                        WalFileName::segment(tli, segno, seg_size)
                    ))),
                ));
            }
            (_, Some(s)) => {
                if !s.pending {
                    self.complete.retain(|n| n + 4 > segno);
                    self.complete.push(segno);
                }
                out.push((segno, Ok(s)));
            }
            (_, None) => out.push((
                segno,
                Err(Error::corruption(format!(
                    "WAL segment {}: decoding produced no index",
                    WalFileName::segment(tli, segno, seg_size)
                ))),
            )),
        }
        (out, !follows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::build::index_segment;
    use crate::wal::synth::{SynthBlock, SynthRecord, SynthWal};
    use crate::wal::RelFileLocator;

    const SEG: u32 = 1 << 20;

    fn heap(n: u32, len: usize) -> SynthRecord {
        SynthRecord {
            rmid: 10,
            info: 0x00,
            xid: 700 + n,
            blocks: vec![SynthBlock {
                rel: RelFileLocator {
                    spc: 1663,
                    db: 5,
                    rel: 16384 + n % 3,
                },
                fork: 0,
                blkno: n,
                data: vec![n as u8; len],
                ..Default::default()
            }],
            main_data: vec![1, 2, 3],
        }
    }

    /// Segments 3 to 6: records crossing from 3 into 4 and from 4 into 5 (a big one), a
    /// segment that ends exactly after a record would be rare, so 5 and 6 just continue.
    fn wal() -> Vec<Vec<u8>> {
        let mut w = SynthWal::new(crate::types::PgVersion::V15, SEG, 8192, 3);
        let mut i = 0;
        while w.pos().0 < 4 * SEG as u64 - 5000 {
            w.push(&heap(i, 1 + (i as usize * 37) % 3000));
            i += 1;
        }
        w.push(&SynthRecord {
            rmid: 21,
            info: 0x00,
            xid: 1,
            blocks: Vec::new(),
            main_data: vec![0x5A; 3 * SEG as usize / 2],
        });
        while w.pos().0 < 7 * SEG as u64 + 100 {
            w.push(&heap(i, 1 + (i as usize * 53) % 2000));
            i += 1;
        }
        let b = w.bytes();
        (0..4)
            .map(|k| b[k * SEG as usize..(k + 1) * SEG as usize].to_vec())
            .collect()
    }

    /// Spool writes: whole aligned blocks through O_DIRECT (straight from an aligned
    /// source, staged from an unaligned one), the rest through the page cache only when
    /// asked (before an fsync); the file always holds exactly a prefix of what was given.
    #[test]
    fn spool_appends_hold_a_prefix() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * SPOOL_WRITE as u32 + 5000)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        // An aligned copy, as the assembler's buffers are.
        let mut store = vec![0u8; data.len() + DIRECT_ALIGN];
        let off = store.as_ptr().align_offset(DIRECT_ALIGN);
        store[off..off + data.len()].copy_from_slice(&data);
        let aligned = &store[off..off + data.len()];
        for (k, src) in [aligned, &data[..]].into_iter().enumerate() {
            let path = d.path().join(format!("s{k}.partial"));
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            let direct = open_direct(&path);
            let mut c = SpoolFile {
                name: "000000010000000000000001.partial".parse().unwrap(),
                path: path.clone(),
                file,
                direct,
                len: 0,
                dirty: false,
            };
            let mut bounce = Bounce::default();
            let mut end = 0;
            for (i, step) in [100, 4000, 5000, SPOOL_WRITE + 77, 8192, 3 * SPOOL_WRITE]
                .into_iter()
                .enumerate()
            {
                end = (end + step).min(src.len());
                let tail = i % 2 == 1;
                c.append(&src[..end], tail, &mut bounce).unwrap();
                let on_disk = fs::read(&path).unwrap();
                assert_eq!(on_disk.len(), c.len, "step {i}");
                assert_eq!(on_disk, &data[..c.len], "step {i}: a prefix");
                if tail || c.direct.is_none() {
                    assert_eq!(c.len, end, "step {i}: all written");
                } else {
                    assert!(end - c.len < DIRECT_ALIGN, "step {i}: only a tail left");
                }
            }
            c.append(src, true, &mut bounce).unwrap();
            assert_eq!(fs::read(&path).unwrap(), data);
        }
    }

    /// The receiver's stream index stores, for every segment, a pending index at its
    /// arrival and then exactly the index the archive path (`index_segment` with the next
    /// segments at hand) builds; a segment that does not follow restarts decoding.
    #[test]
    fn stream_index_matches_the_archive_path() {
        let segs = wal();
        let seg = |n: u64| segs[(n - 3) as usize].clone();
        let want = |n: u64| {
            let mut next = |k: u64| Ok((k <= 6).then(|| seg(k)));
            index_segment(1, n, &seg(n), &mut next).unwrap()
        };
        let mut ix = StreamIndex::default();
        let mut stored: Vec<(u64, SegmentIndex)> = Vec::new();
        for n in 3..=6 {
            let (out, fresh) = ix.feed(SEG, 1, n, &seg(n));
            assert_eq!(fresh, n == 3);
            stored.extend(out.into_iter().map(|(k, r)| (k, r.unwrap())));
        }
        for n in 3..=5 {
            let complete: Vec<_> = stored
                .iter()
                .filter(|(k, s)| *k == n && !s.pending)
                .collect();
            assert_eq!(complete.len(), 1, "one complete index of {n}");
            assert_eq!(complete[0].1, want(n), "segment {n}");
        }
        // Segment 6's last record continues into 7: pending, as the archive path says.
        let mut none = |_: u64| Ok(None);
        let six = index_segment(1, 6, &seg(6), &mut none).unwrap();
        assert!(six.pending);
        assert_eq!(stored.last().unwrap(), &(6, six));
        // A gap: decoding starts afresh, and that is reported.
        let (out, fresh) = ix.feed(SEG, 1, 5, &seg(5));
        assert!(fresh);
        assert!(out.iter().all(|(k, r)| *k == 5 && r.is_ok()));
        // Damage: the segment gets an error (an .idx-missing marker), the next starts afresh.
        let mut bad = seg(6);
        bad[SEG as usize / 2..].fill(0);
        let (out, _) = ix.feed(SEG, 1, 6, &bad);
        assert!(matches!(out.last(), Some((6, Err(_)))), "{out:?}");
        assert!(ix.cur.is_none());
    }
}
