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
//! - Absent: exit 1 (PostgreSQL: "not available"). Present but damaged, or any error that
//!   prevents an answer: exit [`crate::EXIT_FETCH_FATAL`], so recovery stops loudly instead
//!   of ending early at a wrong point. Nothing is written to `%p` then.
//! - Prefetch: a request for segment N starts (when none is running) a detached background
//!   process that fetches, verifies and decompresses N+1..N+K into
//!   `pg_wal/walnut-prefetch/`, with a `.json` checksum written after each file. A request
//!   served from the spool re-verifies the file first. Entries outside the window of the
//!   current request (older, too far ahead, other timeline) are removed, so the spool holds
//!   at most K segments.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::{Args, Parser};
use serde::{Deserialize, Serialize};

use super::WalArchive;
use crate::catalog::Catalog;
use crate::cli::InstanceArgs;
use crate::durable::{self, Replace};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::types::WalFileName;

/// Directory name of the prefetch spool inside `pg_wal`.
pub const PREFETCH_DIR: &str = "walnut-prefetch";

/// Options of `walnut-fetch`.
#[derive(Args, Debug, Clone)]
pub struct FetchArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Prefetch the next K segments in the background; 0 disables.
    #[arg(long, default_value_t = 8)]
    pub prefetch: u64,
    /// Internal: run as the background prefetch worker.
    #[arg(long = "prefetch-worker", hide = true)]
    pub prefetch_worker: bool,
    /// `%f`: the file PostgreSQL asks for.
    pub name: String,
    /// `%p`: where to write it, relative to PGDATA (the working directory).
    pub dest: PathBuf,
}

#[derive(Parser, Debug)]
#[command(
    name = "walnut-fetch",
    version,
    about = "restore_command: walnut-fetch -B DIR --instance NAME %f %p"
)]
pub struct FetchCli {
    #[command(flatten)]
    pub args: FetchArgs,
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

/// Runs `walnut-fetch`; returns the outcome (the binary maps it to an exit code).
pub fn run(args: FetchArgs) -> Result<FetchOutcome> {
    let catalog = Catalog::open(&args.instance.catalog.catalog)?;
    let ar = WalArchive::open(&catalog, &args.instance.instance)?;
    let name: WalFileName = args.name.parse()?;
    if args.prefetch_worker {
        prefetch_worker(&ar, &name, &args.dest, args.prefetch)?;
        return Ok(FetchOutcome::Restored);
    }
    let out = fetch(&ar, &name, &args.dest)?;
    if args.prefetch > 0 && name.is_segment() && out != FetchOutcome::NotInArchive {
        spawn_prefetch(&args, &name);
    }
    Ok(out)
}

/// Serves `name` into `dest`: from the prefetch spool when a verified copy is there, else
/// from the archive (falling back to `<name>.partial` for a segment).
pub fn fetch(ar: &WalArchive, name: &WalFileName, dest: &Path) -> Result<FetchOutcome> {
    if name.is_segment() {
        if let Some(verified) = take_from_spool(&spool_dir(dest), name) {
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
    let wanted = if ar.contains(name) {
        *name
    } else {
        match *name {
            WalFileName::Segment { tli, log, seg } => {
                let partial = WalFileName::Partial { tli, log, seg };
                if ar.contains(&partial) {
                    log::info!("{name} is not archived; serving {partial} in its place");
                    partial
                } else {
                    return Ok(FetchOutcome::NotInArchive);
                }
            }
            _ => return Ok(FetchOutcome::NotInArchive),
        }
    };
    match ar.read(&wanted) {
        Ok(data) => {
            durable::write_file(dest, &data, Replace::Yes)?;
            Ok(FetchOutcome::Restored)
        }
        // Vanished between the check and the read (it never is removed by walnut, but an
        // operator may): absence, not corruption.
        Err(e) if e.kind() == ErrorKind::NotFound && !ar.contains(&wanted) => {
            Ok(FetchOutcome::NotInArchive)
        }
        Err(e) => Err(e),
    }
}

/// The spool directory for a destination `%p` (which lives in `pg_wal`).
fn spool_dir(dest: &Path) -> PathBuf {
    let pg_wal = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    pg_wal.join(PREFETCH_DIR)
}

/// The path of a verified prefetched copy of `name` (its checksum entry is consumed);
/// `None` when there is none or it fails verification (then it is discarded and the
/// archive is used).
fn take_from_spool(spool: &Path, name: &WalFileName) -> Option<PathBuf> {
    let data_p = spool.join(name.to_string());
    let meta_p = spool.join(format!("{name}.json"));
    let meta: SpoolMeta = serde_json::from_slice(&fs::read(&meta_p).ok()?).ok()?;
    let data = fs::read(&data_p).ok();
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
fn spawn_prefetch(args: &FetchArgs, name: &WalFileName) {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut c = Command::new(exe);
    c.arg("-B")
        .arg(&args.instance.catalog.catalog)
        .arg("--instance")
        .arg(&args.instance.instance)
        .arg("--prefetch")
        .arg(args.prefetch.to_string())
        .arg("--prefetch-worker")
        .arg(name.to_string())
        .arg(&args.dest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe; the closure touches no Rust state.
        unsafe {
            c.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
    }
    match c.spawn() {
        // Not waited for: it outlives us, reparented to init, which reaps it.
        Ok(child) => drop(child),
        Err(e) => log::warn!("could not start the prefetch worker: {e}"),
    }
}

/// The background worker: fills the spool with segments N+1..N+K of N's timeline.
fn prefetch_worker(ar: &WalArchive, name: &WalFileName, dest: &Path, k: u64) -> Result<()> {
    let seg_size = ar.seg_size();
    let segno = name
        .segno(seg_size)
        .ok_or_else(|| Error::invalid(format!("{name}: not a segment")))?;
    let spool = spool_dir(dest);
    durable::create_dir_all_durable(&spool)?;
    let lock_p = spool.join(".lock");
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_p)
        .ctx("open lock file", &lock_p)?;
    if fs2::FileExt::try_lock_exclusive(&lock).is_err() {
        return Ok(()); // another worker is filling the spool
    }
    let window: Vec<WalFileName> = (segno + 1..=segno + k)
        .map(|s| WalFileName::segment(name.tli(), s, seg_size))
        .collect();
    clean_spool(&spool, &window)?;
    for n in &window {
        let data_p = spool.join(n.to_string());
        let meta_p = spool.join(format!("{n}.json"));
        if meta_p.exists() && data_p.exists() {
            continue;
        }
        if !ar.contains(n) {
            break; // end of the archive (for now)
        }
        // Corrupt files are left for the foreground to report (exit 200).
        let Ok(data) = ar.read(n) else { break };
        durable::write_file(&data_p, &data, Replace::Yes)?;
        let meta = SpoolMeta {
            name: n.to_string(),
            size: data.len() as u64,
            crc32c: crc32c::crc32c(&data),
        };
        durable::write_file(&meta_p, &serde_json::to_vec(&meta)?, Replace::Yes)?;
    }
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
