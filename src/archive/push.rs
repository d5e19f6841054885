//! `walnut-archive`: archive_command. One call archives `%p` (and, with look-ahead, pushes
//! other `.ready` segments ahead in parallel and acknowledges them in a spool).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::WalArchive;
use crate::catalog::Catalog;
use crate::durable::{self, Replace};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::segment::FileMeta;
use crate::index::SegmentIndex;
use crate::repo::Durability;
use crate::types::{PgVersion, WalFileName};

/// Directory name of the look-ahead spool inside `pg_wal` (the default of `--spool-dir`).
pub const SPOOL_DIR: &str = "walnut-spool";

/// What `walnut-archive` is asked to do (built from its command line by `crate::cli`).
#[derive(Clone, Debug)]
pub struct PushOptions {
    /// Where the catalog is.
    pub catalog: crate::repo::CatalogLocation,
    pub instance: String,
    /// With a backlog, a background pusher archives up to this many segments ahead of
    /// PostgreSQL's calls; 0 disables.
    pub look_ahead: usize,
    /// Run as the background pusher (`name` is the segment its caller archives).
    pub background: bool,
    /// The look-ahead spool (local working state); `None`: `<pg_wal>/walnut-spool`.
    pub spool_dir: Option<PathBuf>,
    /// `%p`: path of the file, relative to PGDATA (the archiver's working directory).
    pub path: PathBuf,
    /// `%f`.
    pub name: WalFileName,
}

/// How a push ended (all of them mean "durable in the archive").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// Written now.
    Archived,
    /// Already archived with identical content.
    AlreadyArchived,
    /// Pushed earlier by the background pusher, acknowledgement verified.
    Acknowledged,
}

/// A look-ahead acknowledgement: written only once the segment is durable in the archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Ack {
    name: String,
    size: u64,
    crc32c: u32,
    compressed_size: u64,
    /// The `pg_wal` directory the segment was read from (absolute); an acknowledgement is
    /// only used by calls for that directory (a primary and a standby may share a spool).
    #[serde(default)]
    source: Option<PathBuf>,
}

/// Runs `walnut-archive`: `Ok` only once the file is durable in the archive (`None` for
/// the background pusher, which reports per segment in its spool).
pub fn run(opts: &PushOptions) -> Result<Option<PushOutcome>> {
    let catalog = Catalog::open_at(&opts.catalog)?;
    // crash tests only (inert unless a kill is armed): every write a crash point
    let catalog = crate::lifecycle::crashpoint::catalog(&catalog).unwrap_or(catalog);
    let ar = WalArchive::open(&catalog, &opts.instance)?;
    let name = opts.name;
    if opts.background {
        let pg_wal = parent_of(&opts.path);
        let spool = spool_of(opts, &absolute_dir(&pg_wal));
        background_pusher(&ar, &pg_wal, &spool, &name, opts.look_ahead.max(1))?;
        return Ok(None);
    }
    let outcome = archive_with_look_ahead(&ar, opts, &name)?;
    log::debug!("{name}: {outcome:?}");
    Ok(Some(outcome))
}

/// The look-ahead spool of a `pg_wal` directory.
fn spool_of(opts: &PushOptions, pg_wal: &Path) -> PathBuf {
    match &opts.spool_dir {
        Some(d) => std::path::absolute(d).unwrap_or_else(|_| d.clone()),
        None => pg_wal.join(SPOOL_DIR),
    }
}

/// Creates the spool directory when missing: one level, below a parent that exists (never
/// `pg_wal` itself).
fn ensure_spool_dir(spool: &Path) -> Result<()> {
    match fs::create_dir(spool) {
        Ok(()) => durable::fsync_dir(&parent_of(spool)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && spool.is_dir() => Ok(()),
        Err(e) => Err(Error::io("create directory", spool, e)),
    }
}

/// How long a call waits for the background pusher to acknowledge its segment before
/// archiving it itself, at most: a backstop only; what normally decides is the pusher's
/// progress ([`PUSHER_STALL`]).
const ACK_WAIT: Duration = Duration::from_secs(60);
/// A running pusher that has shown no progress for this long is treated as stalled
/// (stopped, hung on I/O): calls push their segment themselves instead of waiting.
const PUSHER_STALL: Duration = Duration::from_secs(5);
/// How often an idle pusher (waiting for PostgreSQL to consume acknowledgements) still
/// stamps its progress, to show it is alive.
const PROGRESS_STAMP: Duration = Duration::from_millis(250);
/// How long the background pusher waits for PostgreSQL to consume acknowledgements when
/// it is N segments ahead, before it exits.
const AHEAD_IDLE: Duration = Duration::from_secs(2);

/// Archives `%p` as `name`. With look-ahead on and a backlog, the other `.ready` segments
/// are pushed by one detached background pusher (started here when none runs), and this
/// call takes a verified acknowledgement instead of pushing again.
fn archive_with_look_ahead(
    ar: &WalArchive,
    args: &PushOptions,
    name: &WalFileName,
) -> Result<PushOutcome> {
    let src = &args.path;
    if !name.is_segment() {
        return push_file(ar, src, name);
    }
    let pg_wal = absolute_dir(&parent_of(src));
    let spool = spool_of(args, &pg_wal);
    if args.look_ahead == 0 {
        // No waiting and no pusher, but an acknowledgement already there is still used.
        return match take_ack(ar, &ack_path(&spool, name), &pg_wal, src, name) {
            Ok(true) => Ok(PushOutcome::Acknowledged),
            Ok(false) => push_file(ar, src, name),
            Err(e) => {
                log::warn!("{name}: look-ahead acknowledgement not usable ({e}); pushing it");
                push_file(ar, src, name)
            }
        };
    }
    // Look-ahead is an optimisation: any trouble with its spool means a plain push.
    let running = match wait_for_ack(ar, &spool, &pg_wal, src, name) {
        Ok(AckWait::Acknowledged) => return Ok(PushOutcome::Acknowledged),
        Ok(AckWait::PushIt { pusher_running }) => pusher_running,
        Err(e) => {
            log::warn!("{name}: look-ahead acknowledgement not usable ({e}); pushing it");
            None
        }
    };
    let running = running.unwrap_or_else(|| pusher_running(&spool));
    if !running && !ready_segments(&pg_wal, &spool, name, 1).is_empty() {
        spawn_pusher(args, &pg_wal, &spool, name);
    }
    push_file(ar, src, name)
}

/// How waiting for an acknowledgement ended.
enum AckWait {
    Acknowledged,
    /// Push it yourself; whether a background pusher runs, when the wait found out.
    PushIt {
        pusher_running: Option<bool>,
    },
}

/// Takes this call's acknowledgement, waiting for it while a background pusher runs that
/// will push the segment.
fn wait_for_ack(
    ar: &WalArchive,
    spool: &Path,
    pg_wal: &Path,
    src: &Path,
    name: &WalFileName,
) -> Result<AckWait> {
    let ack = ack_path(spool, name);
    let failed = failed_path(spool, name);
    let deadline = Instant::now() + ACK_WAIT;
    let mut next_lock_check = Instant::now();
    let taken = |ok: bool, pusher_running: Option<bool>| {
        if ok {
            AckWait::Acknowledged
        } else {
            AckWait::PushIt { pusher_running }
        }
    };
    loop {
        if ack.exists() {
            return take_ack(ar, &ack, pg_wal, src, name).map(|ok| taken(ok, None));
        }
        if failed.exists() {
            let _ = fs::remove_file(&failed);
            return Ok(taken(false, None));
        }
        if Instant::now() >= next_lock_check {
            // Not running, or running for our own segment (it never pushes that one).
            match pusher_state(spool) {
                PusherState::Idle => {
                    return take_ack(ar, &ack, pg_wal, src, name).map(|ok| taken(ok, Some(false)))
                }
                PusherState::Running(own) if own == name.to_string() => {
                    return Ok(taken(false, Some(true)))
                }
                PusherState::Running(_) => {}
            }
            // Judged by its progress, not by a fixed wait: a stopped or hung pusher would
            // otherwise hold every call for ACK_WAIT.
            if let Some(idle) = pusher_stalled(spool) {
                log::warn!(
                    "{name}: the background pusher has made no progress for {:.1}s; pushing it",
                    idle.as_secs_f64()
                );
                return Ok(taken(false, Some(true)));
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "{name}: the background pusher did not acknowledge it within {}s; pushing it",
                    ACK_WAIT.as_secs()
                );
                return Ok(taken(false, Some(true)));
            }
            next_lock_check = Instant::now() + Duration::from_millis(20);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

enum PusherState {
    Idle,
    /// Running; the segment its caller archives itself.
    Running(String),
}

fn lock_path(spool: &Path) -> PathBuf {
    spool.join(".look-ahead.lock")
}

/// The pusher's lock file holds `<own segment>\n<pid>\n`; its mtime is the pusher's
/// progress stamp (see [`stamp_progress`]).
fn pusher_state(spool: &Path) -> PusherState {
    match super::lock_holder(&lock_path(spool)) {
        None => PusherState::Idle,
        Some(s) => PusherState::Running(s.lines().next().unwrap_or_default().to_string()),
    }
}

/// How long the running pusher has shown no progress, when that is more than
/// [`PUSHER_STALL`]; `None` while it progresses (or cannot be judged: then the wait's
/// backstop applies).
fn pusher_stalled(spool: &Path) -> Option<Duration> {
    let stamp = fs::metadata(lock_path(spool))
        .and_then(|m| m.modified())
        .ok()?;
    // A stamp in the future (clock stepped back) reads as fresh.
    let idle = stamp.elapsed().ok()?;
    (idle > PUSHER_STALL).then_some(idle)
}

/// Records progress: the lock file's mtime (one `futimens`).
fn stamp_progress(lock: &fs::File) {
    let _ = lock.set_modified(SystemTime::now());
}

fn pusher_running(spool: &Path) -> bool {
    matches!(pusher_state(spool), PusherState::Running(_))
}

/// Starts the detached background pusher (own session, no stdio), never waiting for it.
fn spawn_pusher(args: &PushOptions, pg_wal: &Path, spool: &Path, own: &WalFileName) {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut c = std::process::Command::new(exe);
    args.catalog.pass_to(&mut c);
    c.arg("--instance")
        .arg(&args.instance)
        .arg("--look-ahead")
        .arg(args.look_ahead.to_string());
    if args.spool_dir.is_some() {
        c.arg("--spool-dir").arg(spool);
    }
    c.arg("--background")
        .arg(pg_wal.join(own.to_string()))
        .arg(own.to_string());
    super::spawn_detached(c, "background pusher");
}

/// The background pusher: archives the `.ready` segments of `pg_wal` other than `own` (which
/// its caller archives), oldest first, on all cores, at most `ahead` acknowledged-but-not-yet
/// consumed or in flight; writes a durable acknowledgement after each (or a `.failed` marker,
/// so the call for it archives it itself and reports the error). Exits when nothing is left,
/// or when PostgreSQL has not consumed an acknowledgement for [`AHEAD_IDLE`].
fn background_pusher(
    ar: &WalArchive,
    pg_wal: &Path,
    spool: &Path,
    own: &WalFileName,
    ahead: usize,
) -> Result<()> {
    ensure_spool_dir(spool)?;
    let spool = spool.to_path_buf();
    let lock_p = lock_path(&spool);
    // The caller may be probing the lock right now: retry briefly before giving up.
    let t0 = Instant::now();
    let mut lock = loop {
        if let Some(l) = super::try_lock_file(&lock_p)? {
            break l;
        }
        if t0.elapsed() > Duration::from_millis(200) {
            return Ok(()); // another pusher runs
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    {
        use std::io::{Seek, Write};
        lock.set_len(0).ctx("truncate", &lock_p)?;
        lock.seek(std::io::SeekFrom::Start(0))
            .ctx("seek", &lock_p)?;
        lock.write_all(format!("{own}\n{}\n", std::process::id()).as_bytes())
            .ctx("write", &lock_p)?;
    }
    stamp_progress(&lock);
    let _ = durable::remove_stale_temps(&spool);
    clean_stale_acks(&spool, pg_wal);

    struct State {
        queue: std::collections::VecDeque<WalFileName>,
        in_flight: HashSet<WalFileName>,
        acked: Vec<WalFileName>,
        failed: HashSet<WalFileName>,
        last_progress: Instant,
        last_stamp: Instant,
        done: bool,
    }
    let state = Mutex::new(State {
        queue: Default::default(),
        in_flight: HashSet::new(),
        acked: Vec::new(),
        failed: HashSet::new(),
        last_progress: Instant::now(),
        last_stamp: Instant::now(),
        done: false,
    });
    // Progress the waiting calls can see: the lock file's mtime, and when it was last set.
    let stamp = |st: &mut State| {
        stamp_progress(&lock);
        st.last_stamp = Instant::now();
    };
    let next_job = || -> Option<WalFileName> {
        loop {
            {
                let mut st = state.lock().ok()?;
                if st.done {
                    return None;
                }
                // Alive and scheduling: callers waiting for an acknowledgement see it.
                if st.last_stamp.elapsed() >= PROGRESS_STAMP {
                    stamp(&mut st);
                }
                let before = st.acked.len();
                st.acked.retain(|n| ack_path(&spool, n).exists());
                if st.acked.len() < before {
                    st.last_progress = Instant::now();
                }
                if st.acked.len() + st.in_flight.len() < ahead {
                    if st.queue.is_empty() {
                        let skip: HashSet<WalFileName> = st
                            .in_flight
                            .iter()
                            .chain(st.acked.iter())
                            .chain(st.failed.iter())
                            .copied()
                            .collect();
                        st.queue = ready_segments(pg_wal, &spool, own, 4 * ahead)
                            .into_iter()
                            .filter(|n| !skip.contains(n))
                            .collect();
                        if st.queue.is_empty() && st.in_flight.is_empty() {
                            st.done = true; // the backlog is gone
                            return None;
                        }
                    }
                    if let Some(n) = st.queue.pop_front() {
                        st.in_flight.insert(n);
                        stamp(&mut st);
                        return Some(n);
                    }
                } else if st.in_flight.is_empty() && st.last_progress.elapsed() > AHEAD_IDLE {
                    st.done = true; // nobody consumes our acknowledgements
                    return None;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let finish = |n: WalFileName, acked: bool| {
        if let Ok(mut st) = state.lock() {
            st.in_flight.remove(&n);
            if acked {
                st.acked.push(n);
            } else {
                st.failed.insert(n);
            }
            st.last_progress = Instant::now();
            stamp(&mut st);
        }
    };
    let workers = super::worker_threads();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while let Some(n) = next_job() {
                    let src = pg_wal.join(n.to_string());
                    match push_file(ar, &src, &n).and_then(|_| write_ack(ar, &spool, pg_wal, &n)) {
                        Ok(()) => finish(n, true),
                        Err(e) => {
                            // The call for it pushes it itself and reports the error.
                            let _ = fs::write(failed_path(&spool, &n), format!("{e}\n"));
                            finish(n, false);
                        }
                    }
                }
            });
        }
    });
    drop(lock);
    Ok(())
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn absolute_dir(d: &Path) -> PathBuf {
    fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf())
}

/// Up to `max` segments of `pg_wal` (other than `own`) with a `.ready` status file and no
/// acknowledgement yet, oldest first.
fn ready_segments(pg_wal: &Path, spool: &Path, own: &WalFileName, max: usize) -> Vec<WalFileName> {
    let status = pg_wal.join("archive_status");
    let Ok(rd) = fs::read_dir(&status) else {
        return Vec::new();
    };
    let mut names: Vec<WalFileName> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".ready"))
                .filter(|n| n.len() == 24)
                .and_then(|n| n.parse::<WalFileName>().ok())
        })
        .filter(|n| n.is_segment() && n != own)
        .collect();
    // The archiver's order: by file name (timeline, then position).
    names.sort_by_cached_key(|n| n.to_string());
    names
        .into_iter()
        .filter(|n| !ack_path(spool, n).exists())
        .take(max)
        .collect()
}

fn ack_path(spool: &Path, name: &WalFileName) -> PathBuf {
    spool.join(format!("{name}.ok"))
}

fn failed_path(spool: &Path, name: &WalFileName) -> PathBuf {
    spool.join(format!("{name}.failed"))
}

fn write_ack(ar: &WalArchive, spool: &Path, pg_wal: &Path, name: &WalFileName) -> Result<()> {
    let meta = ar.read_meta(name)?;
    let compressed_size = ar.stored_size(name)?.ok_or_else(|| {
        Error::not_found(format!(
            "{name} is not in the archive ({})",
            ar.data_path(name).display()
        ))
    })?;
    let ack = Ack {
        name: name.to_string(),
        size: meta.size,
        crc32c: meta.crc32c,
        compressed_size,
        source: Some(pg_wal.to_path_buf()),
    };
    let mut json = serde_json::to_vec(&ack)?;
    json.push(b'\n');
    durable::write_file(&ack_path(spool, name), &json, Replace::Yes)
}

/// Whether the acknowledgement at `p` still matches the archive (file present, same
/// compressed size, same size and CRC in its header), the source's size and directory.
/// The acknowledgement is consumed either way.
fn take_ack(
    ar: &WalArchive,
    p: &Path,
    pg_wal: &Path,
    src: &Path,
    name: &WalFileName,
) -> Result<bool> {
    let bytes = match fs::read(p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("read", p, e)),
    };
    // Not durable on purpose: an acknowledgement that comes back after a crash is checked
    // against the archive again, like any other.
    let _ = fs::remove_file(p);
    let ack: Ack = serde_json::from_slice(&bytes)
        .map_err(|e| Error::corruption(format!("{}: {e}", p.display())))?;
    Ok(ack.name == name.to_string()
        && ack.source.as_deref().is_none_or(|s| s == pg_wal)
        && ar.stored_size(name).ok().flatten() == Some(ack.compressed_size)
        && fs::metadata(src).map(|m| m.len()).ok() == Some(ack.size)
        && ar
            .read_meta(name)
            .map(|m| m.size == ack.size && m.crc32c == ack.crc32c)
            .unwrap_or(false))
}

/// Removes acknowledgements nobody will ask for: this `pg_wal`'s whose segment is no longer
/// `.ready` (archived by a call itself, or gone), other directories' after a day, and
/// `.failed` markers after an hour.
fn clean_stale_acks(spool: &Path, pg_wal: &Path) {
    let Ok(rd) = fs::read_dir(spool) else { return };
    let status = pg_wal.join("archive_status");
    let age = |p: &Path| {
        fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default()
    };
    for e in rd.filter_map(|e| e.ok()) {
        let p = e.path();
        let fname = e.file_name().to_string_lossy().into_owned();
        let stale = if let Some(seg) = fname.strip_suffix(".ok") {
            let source = fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<Ack>(&b).ok())
                .and_then(|a| a.source);
            match source {
                Some(s) if s == pg_wal => !status.join(format!("{seg}.ready")).exists(),
                _ => age(&p) > Duration::from_secs(24 * 3600),
            }
        } else if fname.ends_with(".failed") {
            age(&p) > Duration::from_secs(3600)
        } else {
            false
        };
        if stale {
            log::info!("removing stale look-ahead entry {}", p.display());
            let _ = fs::remove_file(&p);
        }
    }
}

/// Archives one file durably (see the module docs of [`crate::archive`]).
pub fn push_file(ar: &WalArchive, src: &Path, name: &WalFileName) -> Result<PushOutcome> {
    check_name_fits(ar, name)?;
    let data = crate::repo::mapped::FileBytes::open(src)?;
    push_data(ar, &data, name, Some(src), true)
}

/// Archives bytes already in memory (e.g. streamed by `walnut receive`) exactly as
/// [`push_file`] archives a file: the same checks, compression, create-only commit and
/// index on arrival. Same content already archived is success, different content an error
/// ([`ErrorKind::Conflict`]).
pub fn push_bytes(ar: &WalArchive, data: &[u8], name: &WalFileName) -> Result<PushOutcome> {
    check_name_fits(ar, name)?;
    push_data(ar, data, name, None, true)
}

/// [`push_bytes`] without indexing: for a caller that indexes the segments it stores as
/// one decoded stream and stores their indexes itself (`walnut receive`, through
/// [`WalArchive::index_and_store`]), so that no segment is decoded twice.
///
/// Its frames carry no LZ4 content checksum ([`crate::format::segment::compress_frame_fast`]:
/// the header's CRC-32C guards the content) and are compressed into `scratch`, buffers the
/// caller keeps from segment to segment (no fresh output buffers, no input copies).
pub(crate) fn push_bytes_unindexed(
    ar: &WalArchive,
    data: &[u8],
    name: &WalFileName,
    scratch: &mut FrameScratch,
) -> Result<PushOutcome> {
    check_name_fits(ar, name)?;
    push_data_with(ar, data, name, None, false, Some(scratch))
}

/// Output buffers for the two LZ4 frames of a segment, reused from one push to the next.
#[derive(Default)]
pub(crate) struct FrameScratch {
    first: Vec<u8>,
    second: Vec<u8>,
}

fn check_name_fits(ar: &WalArchive, name: &WalFileName) -> Result<()> {
    let seg_size = ar.seg_size();
    if !name.fits_segment_size(seg_size) {
        return Err(Error::invalid(format!(
            "{name}: not a valid name for {} MiB segments",
            seg_size >> 20
        )));
    }
    Ok(())
}

/// The body of [`push_file`] and [`push_bytes`]: `src` is the file the bytes came from
/// (its sibling in `pg_wal` may complete the index of a crossing last record), `None`
/// for bytes from elsewhere. `index`: whether a segment is indexed here.
fn push_data(
    ar: &WalArchive,
    data: &[u8],
    name: &WalFileName,
    src: Option<&Path>,
    index: bool,
) -> Result<PushOutcome> {
    push_data_with(ar, data, name, src, index, None)
}

/// [`push_data`]; with `scratch`, the frames are [`FrameScratch`]'s fast ones.
fn push_data_with(
    ar: &WalArchive,
    data: &[u8],
    name: &WalFileName,
    src: Option<&Path>,
    index: bool,
    scratch: Option<&mut FrameScratch>,
) -> Result<PushOutcome> {
    let t0 = std::time::Instant::now();
    let seg_size = ar.seg_size();
    let from = match src {
        Some(p) => format!("\"{}\"", p.display()),
        None => "streamed".to_string(),
    };
    match name {
        WalFileName::Segment { .. } => {
            if data.len() as u64 != seg_size as u64 {
                return Err(Error::invalid(format!(
                    "{name} ({from}): size {} is not the instance's WAL segment size {seg_size}",
                    data.len()
                )));
            }
            check_header(ar, name, data, &from)?;
        }
        WalFileName::Partial { .. } => {
            if data.len() as u64 > seg_size as u64 {
                return Err(Error::invalid(format!(
                    "{name}: size {} exceeds the WAL segment size {seg_size}",
                    data.len()
                )));
            }
            check_header(ar, name, data, &from)?;
        }
        WalFileName::History { .. } | WalFileName::Backup { .. } => {}
    }
    // The repository creates the timeline directory when missing (never the catalog's
    // own), writes through a temp file in its small `.tmp/` and tidies temps of killed runs.
    let key = ar.data_key(name);
    let segno = name.segno(seg_size).filter(|_| index && name.is_segment());
    // A local store looks first (a stat), sparing a duplicate push the compression. A
    // remote one does not spend a round trip on it: the create-only commit below finds an
    // existing object anyway (a conflict), and duplicates are rare.
    if ar.repo().local_root().is_some() && ar.repo().head(&key)?.is_some() {
        return already_archived(ar, name, data, segno, None);
    }

    let meta = FileMeta {
        format: 1,
        name: name.to_string(),
        size: data.len() as u64,
        crc32c: 0,
        system_id: ar.config().system_id,
        archived_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    // The CPU costs run in parallel: indexing on one thread, the second half's LZ4 frame on
    // another, CRC + the first half's frame on this one. The object is written as soon as
    // its frames are ready; the index (needed only after the write) goes on meanwhile.
    let bytes: &[u8] = data;
    let what = name.to_string();
    let (first, second) = bytes.split_at(bytes.len() / 2);
    // A one-shot push compresses into fresh buffers of the frames' bound, allocated zeroed
    // (fresh zero pages: only the pages the frames fill are ever touched) rather than into
    // a growing vector; `walnut receive` passes buffers it reuses.
    let mut own_scratch;
    let scratch = match scratch {
        Some(s) => s,
        None => {
            own_scratch = FrameScratch {
                first: vec![0u8; crate::format::segment::fast_frame_bound(first.len())],
                second: vec![0u8; crate::format::segment::fast_frame_bound(second.len())],
            };
            &mut own_scratch
        }
    };
    let mut t_cpu = std::time::Duration::ZERO;
    let (written, built): (Result<Result<()>>, Option<Result<SegmentIndex>>) =
        std::thread::scope(|s| {
            let ix = segno.map(|segno| {
                s.spawn(move || match src {
                    Some(src) => ar.build_index_on_arrival(name.tli(), segno, bytes, src),
                    None => ar.build_index(name.tli(), segno, bytes, None),
                })
            });
            let what2 = what.clone();
            let mut meta = meta;
            let FrameScratch {
                first: buf1,
                second: buf2,
            } = scratch;
            use crate::format::segment::compress_frame_fast;
            let second_frame =
                s.spawn(move || compress_frame_fast(second, buf2, &what2).map(|n| &buf2[..n]));
            meta.crc32c = crc32c::crc32c(bytes);
            let enc = compress_frame_fast(first, buf1, &what).and_then(|n1| {
                let f2 = second_frame.join().unwrap_or_else(|_| {
                    Err(Error::invalid(format!(
                        "{what}: compression thread panicked"
                    )))
                })?;
                Ok((crate::format::segment::header(&meta)?, &buf1[..n1], f2))
            });
            t_cpu = t0.elapsed();
            let written = enc.map(|parts| write_parts(ar, &key, &parts));
            let built = ix.map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::corruption(format!(
                        "{name}: the WAL decoder panicked"
                    )))
                })
            });
            (written, built)
        });
    let outcome = match written? {
        Ok(()) => PushOutcome::Archived,
        // Archived before (a repeated push) or meanwhile (a concurrent one): compare.
        Err(e) if e.kind() == ErrorKind::Conflict => {
            return already_archived(ar, name, data, segno, built);
        }
        Err(e) => return Err(e.context(format!("archiving {name}"))),
    };
    if let Some(segno) = segno {
        let t_write = t0.elapsed();
        // Storing this index and looking at the previous segment's touch different objects:
        // both at once (on object storage each is a round trip).
        std::thread::scope(|s| {
            if segno > 0 {
                s.spawn(|| ar.complete_pending(name.tli(), segno - 1, Some((segno, data))));
            }
            ar.index_and_store(name.tli(), segno, data, built);
        });
        let t_index = t0.elapsed();
        log::debug!(
            "{name}: read+compress {:?}, durable write (and the index, meanwhile) {:?}, index store and previous segment {:?}",
            t_cpu,
            t_write - t_cpu,
            t_index - t_write,
        );
    }
    Ok(outcome)
}

/// `name` is archived already: identical content is success, anything else an error.
///
/// A repeated push is how a killed one shows: PostgreSQL runs archive_command again for the
/// segment whose run failed or was killed. So it finishes what that run may have left
/// undone ([`WalArchive::heal_after_repeated_push`]: temp files, this segment's index,
/// the previous segment's pending one), which a first push does as it goes. Never failing
/// the push for it (indexing never makes archiving fail). `built`: this segment's index
/// if computed.
fn already_archived(
    ar: &WalArchive,
    name: &WalFileName,
    data: &[u8],
    segno: Option<u64>,
    built: Option<Result<SegmentIndex>>,
) -> Result<PushOutcome> {
    let out = compare_existing(ar, name, data)?;
    ar.heal_after_repeated_push(name, segno, data, built);
    Ok(out)
}

/// Writes header + frames durably under `key`, create-only, without assembling them in
/// memory first.
fn write_parts(ar: &WalArchive, key: &str, (head, f1, f2): &Parts) -> Result<()> {
    use std::io::Write;
    let mut w = ar.repo().create(key)?;
    for part in [&head[..], f1, f2] {
        if let Err(e) = w.write_all(part) {
            return Err(Error::io("write", Path::new(&w.describe()), e));
        }
    }
    w.commit(Durability::Now)
}

/// An encoded file in parts: the metadata header and the two LZ4 frames.
type Parts<'a> = (Vec<u8>, &'a [u8], &'a [u8]);

/// The archive already holds `name`: identical content is success, anything else an error.
fn compare_existing(ar: &WalArchive, name: &WalFileName, data: &[u8]) -> Result<PushOutcome> {
    let dest = ar.data_path(name);
    match ar.read(name) {
        Ok(old) if old == data => {
            log::info!("{name} is already archived with identical content");
            Ok(PushOutcome::AlreadyArchived)
        }
        Ok(_) => Err(Error::conflict(format!(
            "{name} is already archived (\"{}\") with DIFFERENT content; refusing to overwrite \
             it. Two clusters may be archiving into the same instance.",
            dest.display()
        ))),
        Err(e) => Err(Error::conflict(format!(
            "{name} is already archived but the archived copy cannot be verified ({e}); \
             refusing to overwrite it. Check and remove \"{}\" by hand.",
            dest.display()
        ))),
    }
}

/// Checks that a segment belongs to the instance: page magic of its major version, system
/// identifier, segment size, and that its first page is where the name says.
pub(crate) fn check_header(
    ar: &WalArchive,
    name: &WalFileName,
    data: &[u8],
    from: &str,
) -> Result<()> {
    let cfg = ar.config();
    let h =
        crate::wal::read_long_header(data).map_err(|e| e.context(format!("{name} ({from})")))?;
    if let Some(v) = PgVersion::from_major(cfg.pg_major) {
        if h.magic != v.page_magic() {
            return Err(Error::invalid(format!(
                "{name}: WAL page magic {:#06x} is not PostgreSQL {}'s ({:#06x})",
                h.magic,
                cfg.pg_major,
                v.page_magic()
            )));
        }
    }
    if h.system_id != cfg.system_id {
        return Err(Error::invalid(format!(
            "{name}: database system identifier {} in its page header is not instance \"{}\"'s \
             ({}); refusing WAL of another cluster",
            h.system_id, cfg.name, cfg.system_id
        )));
    }
    if h.seg_size != cfg.wal_segment_size {
        return Err(Error::invalid(format!(
            "{name}: segment size {} in its page header is not the instance's {}",
            h.seg_size, cfg.wal_segment_size
        )));
    }
    if let Some(start) = name.start_lsn(cfg.wal_segment_size) {
        if h.pageaddr != start {
            return Err(Error::invalid(format!(
                "{name}: first page address {} does not match the file name (expected {start})",
                h.pageaddr
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_segments_are_other_unacknowledged_segments_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let pg_wal = d.path().join("pg_wal");
        let status = pg_wal.join("archive_status");
        let spool = d.path().join("spool");
        fs::create_dir_all(&status).unwrap();
        fs::create_dir_all(&spool).unwrap();
        for n in [
            "000000010000000000000003.ready",
            "000000010000000000000005.ready",
            "000000010000000000000004.ready",
            "000000010000000000000001.ready",
            "000000010000000000000002.ready",
            "000000010000000000000006.done",
            "00000002.history.ready",
            "000000010000000000000007.partial.ready",
            "000000010000000000000008.ready",
        ] {
            fs::write(status.join(n), "").unwrap();
        }
        let own: WalFileName = "000000010000000000000002".parse().unwrap();
        let names = |max| -> Vec<String> {
            ready_segments(&pg_wal, &spool, &own, max)
                .iter()
                .map(|n| n.to_string())
                .collect()
        };
        assert_eq!(
            names(3),
            [
                "000000010000000000000001",
                "000000010000000000000003",
                "000000010000000000000004"
            ]
        );
        fs::write(spool.join("000000010000000000000003.ok"), "{}").unwrap();
        assert_eq!(
            names(9),
            [
                "000000010000000000000001",
                "000000010000000000000004",
                "000000010000000000000005",
                "000000010000000000000008"
            ]
        );
        assert!(ready_segments(&d.path().join("x"), &spool, &own, 3).is_empty());
    }
}
