//! `walnut-fetch`: restore_command, with a verified prefetch spool.
//!
//! - Segments and `.history` files are served from the archive after full verification
//!   (LZ4 content checksum, size, CRC-32C) and written to `%p` atomically.
//! - `.partial`: PostgreSQL asks for full segment names only. When the full segment is not
//!   archived but `<name>.partial` is, its content is served under the full name. A
//!   `.partial` is full-size and its bytes up to the timeline switch are exactly the WAL of
//!   the old timeline, so recovery *on that timeline* (e.g. `recovery_target_timeline`
//!   pointing at it, or a standby of a primary that was lost) can replay up to the last
//!   record it holds and then ends there, which is the true end of that timeline; recovery
//!   following a later timeline never asks for the old timeline's name of that segment
//!   (it asks for the newer timeline's name first). Without it such a recovery would stop one
//!   segment early. Serving is logged.
//! - The segment `walnut receive` is filling (its spool's `<segment>.partial`, default
//!   spool of a local catalog only) is served, zero-padded, for its segment name when
//!   neither the name nor its `.partial` is archived: a restore to "latest" gets the
//!   streamed tail (see [`crate::receive`]).
//! - Absent: exit 1 (PostgreSQL: "not available"), only when the name and every candidate
//!   for it (`.partial`) are definitely absent: `ENOENT` in a readable timeline directory.
//!   Present but damaged (checksums, a link or non-regular file, another cluster's system
//!   identifier or another segment's name in its headers), an unreadable directory, any I/O
//!   error, a bad `instance.json`, even a panic: exit [`crate::EXIT_FETCH_FATAL`], so
//!   recovery stops loudly instead of ending early at a wrong point. Nothing is written to
//!   `%p` then.
//! - Temp files of a killed fetch (`pg_wal/.RECOVERYXLOG.walnut-tmp.PID.N`) are removed by
//!   the next fetch that reads the archive, by the prefetch worker and by `--cleanup`.
//! - Prefetch: a request for segment N starts (when none is running) one detached background
//!   worker that fetches, verifies and decompresses N+1, N+2, ... on all cores into
//!   `pg_wal/walnut-prefetch/`, with a `.json` checksum written after each file, keeping at
//!   most K entries that recovery has not consumed yet (it slides forward as recovery takes
//!   them, and exits at the end of the archive or when recovery stops asking). Its lock file
//!   says which segments it has claimed; a request for one of them waits for it instead of
//!   fetching it a second time. A request served from the spool re-verifies the file first
//!   (mapped, CRC-32C) and moves it into place. Entries outside the window of a new worker
//!   (older, too far ahead, other timeline) are removed. `walnut-fetch --cleanup` (the
//!   `recovery_end_command` that `walnut restore` writes) removes the spool.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::WalArchive;
use crate::catalog::Catalog;
use crate::durable::{self, Replace};
use crate::error::{Error, IoContext, Result};
use crate::types::WalFileName;

/// Directory name of the prefetch spool inside `pg_wal` (the default of `--spool-dir`).
pub const PREFETCH_DIR: &str = "walnut-prefetch";
/// In the spool: tells the worker to stop (written by `--cleanup`).
const STOP_FILE: &str = ".stop";

/// What `walnut-fetch` is asked to do (built from its command line by `crate::cli`).
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Where the catalog is.
    pub catalog: crate::repo::CatalogLocation,
    pub instance: String,
    /// Prefetch the next K segments in the background; 0 disables.
    pub prefetch: u64,
    /// Run as the background prefetch worker.
    pub prefetch_worker: bool,
    /// Remove the prefetch spool and exit (`recovery_end_command`).
    pub cleanup: bool,
    /// The prefetch spool (local working state); `None`: `<pg_wal>/walnut-prefetch`.
    pub spool_dir: Option<PathBuf>,
    /// `%f` (`None` only with `cleanup`).
    pub name: Option<WalFileName>,
    /// `%p`; `None`: `pg_wal/RECOVERYXLOG`.
    pub dest: Option<PathBuf>,
}

/// What a fetch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchOutcome {
    /// `%p` written from the archive.
    Restored,
    /// `%p` written from a verified prefetched copy.
    FromPrefetch,
    /// The file is not in the archive.
    NotInArchive,
    /// `--cleanup`: the prefetch spool was removed.
    Cleaned,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SpoolMeta {
    name: String,
    size: u64,
    crc32c: u32,
}

/// Writes a file to `dest` from the archive (what walnut-fetch does), verified.
pub fn fetch_to(archive: &WalArchive, name: &WalFileName, dest: &Path) -> Result<()> {
    let data = archive.read(name)?;
    durable::write_file(dest, &data, Replace::Yes)
}

/// Runs `walnut-fetch`; returns the outcome (the cli maps it to an exit code).
pub fn run(args: &FetchOptions) -> Result<FetchOutcome> {
    let catalog = Catalog::open_at(&args.catalog)?;
    let ar = WalArchive::open(&catalog, &args.instance)?;
    let dest = args
        .dest
        .clone()
        .unwrap_or_else(|| Path::new("pg_wal").join("RECOVERYXLOG"));
    let spool = spool_dir(args, &dest);
    if args.cleanup {
        remove_spool(&spool)?;
        remove_stale_fetch_temps(&dest);
        return Ok(FetchOutcome::Cleaned);
    }
    let name = args
        .name
        .ok_or_else(|| Error::invalid("walnut-fetch needs %f and %p (or --cleanup)"))?;
    if args.prefetch_worker {
        prefetch_worker(&ar, &name, &dest, &spool, args.prefetch)?;
        return Ok(FetchOutcome::Restored);
    }
    let t0 = std::time::Instant::now();
    let out = fetch_with_spool(&ar, &name, &dest, &spool)?;
    log::debug!("{name}: {out:?} in {:?}", t0.elapsed());
    if args.prefetch > 0
        && name.is_segment()
        && out != FetchOutcome::NotInArchive
        && worker_state(&spool).is_none()
    {
        spawn_prefetch(args, &name, &dest, &spool);
    }
    Ok(out)
}

/// Removes the prefetch spool once recovery has ended: tells a running worker to stop,
/// waits for it (it finishes the segments in flight), then removes every entry.
fn remove_spool(spool: &Path) -> Result<()> {
    if !spool.is_dir() {
        return Ok(());
    }
    let stop = spool.join(STOP_FILE);
    fs::write(&stop, b"").ctx("write", &stop)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker_state(spool).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::remove_dir_all(spool).ctx("remove", spool)?;
    log::info!("removed the prefetch spool \"{}\"", spool.display());
    Ok(())
}

/// Serves `name` into `dest`: from the default prefetch spool when a verified copy is
/// there, else from the archive (falling back to `<name>.partial` for a segment).
pub fn fetch(ar: &WalArchive, name: &WalFileName, dest: &Path) -> Result<FetchOutcome> {
    fetch_with_spool(ar, name, dest, &pg_wal_dir(dest).join(PREFETCH_DIR))
}

/// [`fetch`] with the prefetch spool `spool`.
pub fn fetch_with_spool(
    ar: &WalArchive,
    name: &WalFileName,
    dest: &Path,
    spool: &Path,
) -> Result<FetchOutcome> {
    if name.is_segment() {
        let spool = spool.to_path_buf();
        wait_for_prefetch(&spool, name, ar.seg_size());
        if let Some(verified) = take_from_spool(&spool, name) {
            // The spool file was written durably by the worker and just verified; moving it
            // into place (same directory tree, pg_wal) spares copying 16 MiB again. If the
            // worker removed it meanwhile, the archive is used.
            match fs::rename(&verified, dest) {
                Ok(()) => return Ok(FetchOutcome::FromPrefetch),
                Err(e) => {
                    log::debug!("{name}: prefetched copy vanished ({e}); reading the archive")
                }
            }
        }
    }
    // "Not archived" only when every candidate name is definitely absent; any error reading
    // one (an unreadable directory, a link, damage, another cluster's file) is fatal.
    let data = match ar.read_opt(name)? {
        Some(d) => d,
        None => match *name {
            WalFileName::Segment { tli, log, seg } => {
                let partial = WalFileName::Partial { tli, log, seg };
                match ar.read_opt(&partial)? {
                    Some(d) => {
                        log::info!("{name} is not archived; serving {partial} in its place");
                        d
                    }
                    None => match from_receive_spool(ar, name)? {
                        Some(d) => d,
                        None => return Ok(FetchOutcome::NotInArchive),
                    },
                }
            }
            _ => return Ok(FetchOutcome::NotInArchive),
        },
    };
    // Reading the archive costs a decompression, which dwarfs listing pg_wal: tidy up temp
    // files of killed runs here (a fetch served from the spool skips it; the prefetch
    // worker does it when it starts).
    remove_stale_fetch_temps(dest);
    durable::write_file(dest, &data, Replace::Yes)?;
    Ok(FetchOutcome::Restored)
}

/// The segment `walnut receive` is filling, when it is `name` (zero-padded to a segment,
/// as PostgreSQL expects of a `.partial`), so that recovery to "latest" gets the streamed
/// tail. The spool of a local catalog is looked at: the default one, or the one a receiver
/// with another `--spool-dir` recorded (`crate::receive::spool_in_use`). When it is not
/// there, the archive is asked once more: the receiver archives a completed segment before
/// it removes the spool file, so a segment completed meanwhile is found there.
fn from_receive_spool(ar: &WalArchive, name: &WalFileName) -> Result<Option<Vec<u8>>> {
    let Some(spool) = crate::receive::spool_in_use(ar)? else {
        return Ok(None);
    };
    if let Some(d) = crate::receive::serve_partial(ar, &spool, name)? {
        log::info!(
            "{name} is not archived; serving the segment walnut receive is filling (\"{}\")",
            spool.display()
        );
        return Ok(Some(d));
    }
    if !spool.exists() {
        return Ok(None);
    }
    ar.read_opt(name)
}

/// Removes walnut's temp files left in `dest`'s directory (`pg_wal`) by a killed fetch (a
/// 16 MiB `.RECOVERYXLOG.walnut-tmp.PID.N` each): only walnut's own temp names whose writer
/// no longer runs. Failures are only logged: tidying up must not fail a fetch.
fn remove_stale_fetch_temps(dest: &Path) {
    let dir = pg_wal_dir(dest);
    match durable::remove_stale_temps(&dir) {
        Ok(0) => {}
        Ok(n) => log::info!(
            "removed {n} temp file(s) left in \"{}\" by killed runs",
            dir.display()
        ),
        Err(e) => log::warn!("could not tidy up temp files: {e}"),
    }
}

/// The directory of a destination `%p` (`pg_wal`).
fn pg_wal_dir(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The prefetch spool: `--spool-dir`, else `walnut-prefetch` beside the destination `%p`
/// (which lives in `pg_wal`).
fn spool_dir(args: &FetchOptions, dest: &Path) -> PathBuf {
    match &args.spool_dir {
        Some(d) => std::path::absolute(d).unwrap_or_else(|_| d.clone()),
        None => pg_wal_dir(dest).join(PREFETCH_DIR),
    }
}

/// The path of a verified prefetched copy of `name` (its checksum entry is consumed);
/// `None` when there is none or it fails verification (then it is discarded and the
/// archive is used).
fn take_from_spool(spool: &Path, name: &WalFileName) -> Option<PathBuf> {
    let data_p = spool.join(name.to_string());
    let meta_p = spool.join(format!("{name}.json"));
    let meta: SpoolMeta = serde_json::from_slice(&fs::read(&meta_p).ok()?).ok()?;
    // Mapped, not read: verifying needs no copy of the 16 MiB.
    let data = crate::repo::mapped::FileBytes::open(&data_p).ok();
    let _ = fs::remove_file(&meta_p);
    let data = data?;
    if meta.name == name.to_string()
        && data.len() as u64 == meta.size
        && crc32c::crc32c(&data) == meta.crc32c
    {
        Some(data_p)
    } else {
        let _ = fs::remove_file(&data_p);
        log::warn!("prefetched copy of {name} failed verification; reading the archive");
        None
    }
}

/// Starts the detached prefetch worker (own session, no stdio), never waiting for it.
fn spawn_prefetch(args: &FetchOptions, name: &WalFileName, dest: &Path, spool: &Path) {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut c = Command::new(exe);
    args.catalog.pass_to(&mut c);
    c.arg("--instance")
        .arg(&args.instance)
        .arg("--prefetch")
        .arg(args.prefetch.to_string());
    if args.spool_dir.is_some() {
        c.arg("--spool-dir").arg(spool);
    }
    c.arg("--prefetch-worker").arg(name.to_string()).arg(dest);
    super::spawn_detached(c, "prefetch worker");
}

/// How long a request waits for the prefetch worker to finish the segment it is fetching.
const PREFETCH_WAIT: Duration = Duration::from_secs(10);
/// How long the worker waits for recovery to consume a full spool before it exits.
const PREFETCH_IDLE: Duration = Duration::from_secs(2);

/// What a running prefetch worker does: timeline, first segment of its run, next segment
/// it will claim (everything in `first..next` is fetched or being fetched).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WorkerState {
    tli: u32,
    first: u64,
    next: u64,
}

impl WorkerState {
    const LEN: usize = 8 + 1 + 16 + 1 + 16 + 1;

    fn encode(&self) -> String {
        format!("{:08X} {:016X} {:016X}\n", self.tli, self.first, self.next)
    }

    fn decode(s: &str) -> Option<WorkerState> {
        let mut it = s.split_whitespace();
        let tli = u32::from_str_radix(it.next()?, 16).ok()?;
        let first = u64::from_str_radix(it.next()?, 16).ok()?;
        let next = u64::from_str_radix(it.next()?, 16).ok()?;
        Some(WorkerState { tli, first, next })
    }
}

fn lock_path(spool: &Path) -> PathBuf {
    spool.join(".lock")
}

/// The state of the running worker; `None` when none runs.
fn worker_state(spool: &Path) -> Option<WorkerState> {
    // Running; an unreadable state (being rewritten) reads as "covers nothing".
    super::lock_holder(&lock_path(spool)).map(|s| {
        WorkerState::decode(&s).unwrap_or(WorkerState {
            tli: 0,
            first: 0,
            next: 0,
        })
    })
}

/// Waits while the worker is fetching `name` and its spool entry is not complete yet, so
/// that a request never fetches the same segment a second time beside the worker.
fn wait_for_prefetch(spool: &Path, name: &WalFileName, seg_size: u32) {
    let Some(segno) = name.segno(seg_size) else {
        return;
    };
    let meta_p = spool.join(format!("{name}.json"));
    let deadline = Instant::now() + PREFETCH_WAIT;
    let mut next_check = Instant::now();
    while !meta_p.exists() && Instant::now() < deadline {
        if Instant::now() >= next_check {
            match worker_state(spool) {
                Some(w) if w.tli == name.tli() && (w.first..w.next).contains(&segno) => {}
                _ => return,
            }
            next_check = Instant::now() + Duration::from_millis(20);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The background worker: keeps the spool filled with the segments after N on N's
/// timeline, at most `k` ahead of what recovery has consumed, on all cores. Exits at the
/// end of the archive, on the first segment it cannot fetch (the request for it reports
/// why), or when recovery has not consumed anything for [`PREFETCH_IDLE`].
fn prefetch_worker(
    ar: &WalArchive,
    name: &WalFileName,
    dest: &Path,
    spool: &Path,
    k: u64,
) -> Result<()> {
    let seg_size = ar.seg_size();
    let segno = name
        .segno(seg_size)
        .ok_or_else(|| Error::invalid(format!("{name}: not a segment")))?;
    let spool = spool.to_path_buf();
    // One level only: never create pg_wal (or the parent of --spool-dir) itself.
    match fs::create_dir(&spool) {
        Ok(()) => durable::fsync_dir(&pg_wal_dir(&spool))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io("create directory", &spool, e)),
    }
    let Some(lock) = super::try_lock_file(&lock_path(&spool))? else {
        return Ok(()); // another worker is filling the spool
    };
    remove_stale_fetch_temps(dest);
    let tli = name.tli();
    let window: Vec<WalFileName> = (segno + 1..=segno + k)
        .map(|s| WalFileName::segment(tli, s, seg_size))
        .collect();
    clean_spool(&spool, &window)?;
    struct Run {
        /// Lowest segment not yet known consumed.
        lo: u64,
        next: u64,
        in_flight: HashSet<u64>,
        stop: bool,
        last_progress: Instant,
    }
    let run = Mutex::new(Run {
        lo: segno + 1,
        next: segno + 1,
        in_flight: HashSet::new(),
        stop: false,
        last_progress: Instant::now(),
    });
    let publish = |next: u64| {
        use std::os::unix::fs::FileExt;
        let st = WorkerState {
            tli,
            first: segno + 1,
            next,
        };
        let _ = lock.write_all_at(st.encode().as_bytes(), 0);
    };
    let _ = lock.set_len(WorkerState::LEN as u64);
    publish(segno + 1);
    let entry = |s: u64| WalFileName::segment(tli, s, seg_size);
    let claim = || -> Option<u64> {
        loop {
            {
                let mut r = run.lock().ok()?;
                if r.stop || spool.join(STOP_FILE).exists() {
                    return None;
                }
                // Entries disappear as recovery consumes them, oldest first.
                while r.lo < r.next
                    && !r.in_flight.contains(&r.lo)
                    && !spool.join(format!("{}.json", entry(r.lo))).exists()
                {
                    r.lo += 1;
                    r.last_progress = Instant::now();
                }
                if r.next - r.lo < k {
                    let s = r.next;
                    // The end of the archive, for now; or an error, which the request for
                    // that segment reports.
                    if !ar.is_archived(&entry(s)).unwrap_or(false) {
                        r.stop = true;
                        return None;
                    }
                    r.next += 1;
                    r.in_flight.insert(s);
                    publish(r.next);
                    return Some(s);
                }
                if r.in_flight.is_empty() && r.last_progress.elapsed() > PREFETCH_IDLE {
                    r.stop = true;
                    return None;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let fetch_one = |s: u64| -> Result<()> {
        let n = entry(s);
        let data_p = spool.join(n.to_string());
        let meta_p = spool.join(format!("{n}.json"));
        if meta_p.exists() && data_p.exists() {
            return Ok(());
        }
        let data = ar.read(&n)?;
        durable::write_file(&data_p, &data, Replace::Yes)?;
        let meta = SpoolMeta {
            name: n.to_string(),
            size: data.len() as u64,
            crc32c: crc32c::crc32c(&data),
        };
        durable::write_file(&meta_p, &serde_json::to_vec(&meta)?, Replace::Yes)
    };
    let workers = super::worker_threads();
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| {
                while let Some(s) = claim() {
                    let r = fetch_one(s);
                    if let Ok(mut g) = run.lock() {
                        g.in_flight.remove(&s);
                        g.last_progress = Instant::now();
                        // Corrupt files are left for the request to report (exit 200).
                        if r.is_err() {
                            g.stop = true;
                        }
                    }
                }
            });
        }
    });
    Ok(())
}

/// Removes spool entries outside `window` (and temp files of dead writers).
fn clean_spool(spool: &Path, window: &[WalFileName]) -> Result<()> {
    let _ = durable::remove_stale_temps(spool);
    let keep: Vec<String> = window.iter().map(|n| n.to_string()).collect();
    for e in fs::read_dir(spool).ctx("read directory", spool)? {
        let e = e.ctx("read directory", spool)?;
        let fname = e.file_name().to_string_lossy().into_owned();
        if fname.starts_with('.') {
            continue;
        }
        let stem = fname.strip_suffix(".json").unwrap_or(&fname);
        if !keep.iter().any(|k| k == stem) {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(())
}
