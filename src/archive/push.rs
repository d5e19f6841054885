//! `walnut-archive`: archive_command. One call archives `%p` (and, with look-ahead, pushes
//! other `.ready` segments ahead in parallel and acknowledges them in a spool).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Parser};
use serde::{Deserialize, Serialize};

use super::store::{self, FileMeta};
use super::WalArchive;
use crate::catalog::Catalog;
use crate::cli::InstanceArgs;
use crate::durable::{self, Replace};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::index::SegmentIndex;
use crate::types::{PgVersion, WalFileName};

/// Options of `walnut-archive`.
#[derive(Args, Debug, Clone)]
pub struct PushArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Push up to N other `.ready` segments ahead in parallel (acknowledged in a spool, so
    /// later calls for them return at once); 0 disables.
    #[arg(long = "look-ahead", default_value_t = 8)]
    pub look_ahead: usize,
    /// `%p`: path of the file, relative to PGDATA (the archiver's working directory).
    pub path: PathBuf,
    /// `%f`: file name.
    pub name: String,
}

#[derive(Parser, Debug)]
#[command(
    name = "walnut-archive",
    version,
    about = "archive_command: walnut-archive -B DIR --instance NAME %p %f"
)]
pub struct PushCli {
    #[command(flatten)]
    pub args: PushArgs,
}

/// How a push ended (all of them mean "durable in the archive").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// Written now.
    Archived,
    /// Already archived with identical content.
    AlreadyArchived,
    /// Pushed earlier by a look-ahead run, acknowledgement verified.
    Acknowledged,
}

/// A look-ahead acknowledgement: written only once the segment is durable in the archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Ack {
    name: String,
    size: u64,
    crc32c: u32,
    compressed_size: u64,
}

/// Runs `walnut-archive`; returns the exit code (0 only when durable).
pub fn run(args: PushArgs) -> Result<i32> {
    let catalog = Catalog::open(&args.instance.catalog.catalog)?;
    let ar = WalArchive::open(&catalog, &args.instance.instance)?;
    let name: WalFileName = args.name.parse()?;
    let outcome = archive_with_look_ahead(&ar, &args.path, &name, args.look_ahead)?;
    log::debug!("{name}: {outcome:?}");
    Ok(0)
}

/// Archives `src` as `name`; with `look_ahead > 0` also pushes up to that many other
/// `.ready` segments found in `src`'s `archive_status` directory.
pub fn archive_with_look_ahead(
    ar: &WalArchive,
    src: &Path,
    name: &WalFileName,
    look_ahead: usize,
) -> Result<PushOutcome> {
    if name.is_segment() {
        match check_ack(ar, src, name) {
            Ok(true) => return Ok(PushOutcome::Acknowledged),
            Ok(false) => {}
            Err(e) => log::warn!(
                "{name}: look-ahead acknowledgement not usable ({e}); re-checking the archive"
            ),
        }
    }
    let ahead = if look_ahead > 0 && name.is_segment() {
        ready_segments(src, name, look_ahead)
    } else {
        Vec::new()
    };
    if ahead.is_empty() {
        return push_file(ar, src, name);
    }
    // One look-ahead runner at a time; others just archive their own file. Look-ahead is
    // an optimisation: if its spool is unusable, archive our own file the plain way.
    let spool = ar.spool_dir();
    let _lock = match lock_spool(&spool) {
        Ok(Some(l)) => l,
        Ok(None) => return push_file(ar, src, name),
        Err(e) => {
            log::warn!("look-ahead disabled for this call: {e}");
            return push_file(ar, src, name);
        }
    };
    let _ = durable::remove_stale_temps(&spool);
    let pg_wal = parent_of(src);
    let mut jobs: Vec<(PathBuf, WalFileName)> = vec![(src.to_path_buf(), *name)];
    jobs.extend(ahead.into_iter().map(|n| (pg_wal.join(n.to_string()), n)));
    let next = AtomicUsize::new(0);
    let own: Mutex<Option<Result<PushOutcome>>> = Mutex::new(None);
    let threads = 2.min(jobs.len());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((path, n)) = jobs.get(i) else { break };
                let r = push_file(ar, path, n);
                if i == 0 {
                    if let Ok(mut g) = own.lock() {
                        *g = Some(r);
                    }
                    continue;
                }
                match r.and_then(|_| write_ack(ar, n)) {
                    Ok(()) => log::debug!("{n}: pushed ahead"),
                    Err(e) => log::warn!("{n}: look-ahead push failed (will be retried): {e}"),
                }
            });
        }
    });
    own.into_inner().ok().flatten().unwrap_or_else(|| {
        Err(Error::invalid(format!(
            "{name}: look-ahead worker vanished"
        )))
    })
}

/// Takes the look-ahead lock; `None` when another process holds it.
fn lock_spool(spool: &Path) -> Result<Option<fs::File>> {
    durable::create_dir_all_durable(spool)?;
    let lock_path = spool.join(".look-ahead.lock");
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .ctx("open lock file", &lock_path)?;
    Ok(fs2::FileExt::try_lock_exclusive(&lock).ok().map(|_| lock))
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Up to `max` segments (other than `own`, newer than it) with a `.ready` status file and
/// no acknowledgement yet, oldest first.
fn ready_segments(src: &Path, own: &WalFileName, max: usize) -> Vec<WalFileName> {
    let status = parent_of(src).join("archive_status");
    let Ok(rd) = fs::read_dir(&status) else {
        return Vec::new();
    };
    let own_s = own.to_string();
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".ready"))
                .map(str::to_string)
        })
        .filter(|n| n.len() == 24 && *n > own_s)
        .collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|n| n.parse::<WalFileName>().ok())
        .filter(|n| n.is_segment())
        .take(max)
        .collect()
}

fn ack_path(ar: &WalArchive, name: &WalFileName) -> PathBuf {
    ar.spool_dir().join(format!("{name}.ok"))
}

fn write_ack(ar: &WalArchive, name: &WalFileName) -> Result<()> {
    let meta = ar.read_meta(name)?;
    let p = ar.data_path(name);
    let compressed_size = fs::metadata(&p).ctx("stat", &p)?.len();
    let ack = Ack {
        name: name.to_string(),
        size: meta.size,
        crc32c: meta.crc32c,
        compressed_size,
    };
    let mut json = serde_json::to_vec(&ack)?;
    json.push(b'\n');
    durable::write_file(&ack_path(ar, name), &json, Replace::Yes)
}

/// Whether `name` was pushed ahead and its acknowledgement still matches the archive (file
/// present, same compressed size, same size and CRC in its header) and the source's size.
/// The acknowledgement is consumed.
fn check_ack(ar: &WalArchive, src: &Path, name: &WalFileName) -> Result<bool> {
    let p = ack_path(ar, name);
    let bytes = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("read", &p, e)),
    };
    let ack: Ack = match serde_json::from_slice(&bytes) {
        Ok(a) => a,
        Err(e) => {
            let _ = durable::remove_file(&p);
            return Err(Error::corruption(format!("{}: {e}", p.display())));
        }
    };
    let data = ar.data_path(name);
    let ok = ack.name == name.to_string()
        && fs::metadata(&data).map(|m| m.len()).ok() == Some(ack.compressed_size)
        && fs::metadata(src).map(|m| m.len()).ok() == Some(ack.size)
        && ar
            .read_meta(name)
            .map(|m| m.size == ack.size && m.crc32c == ack.crc32c)
            .unwrap_or(false);
    durable::remove_file(&p)?;
    Ok(ok)
}

/// Archives one file durably (see the module docs of [`crate::archive`]).
pub fn push_file(ar: &WalArchive, src: &Path, name: &WalFileName) -> Result<PushOutcome> {
    let t0 = std::time::Instant::now();
    let seg_size = ar.seg_size();
    if !name.fits_segment_size(seg_size) {
        return Err(Error::invalid(format!(
            "{name}: not a valid name for {} MiB segments",
            seg_size >> 20
        )));
    }
    let data = super::mapped::FileBytes::open(src)?;
    match name {
        WalFileName::Segment { .. } => {
            if data.len() as u64 != seg_size as u64 {
                return Err(Error::invalid(format!(
                    "{name} (\"{}\"): size {} is not the instance's WAL segment size {seg_size}",
                    src.display(),
                    data.len()
                )));
            }
            check_header(ar, name, &data, src)?;
        }
        WalFileName::Partial { .. } => {
            if data.len() as u64 > seg_size as u64 {
                return Err(Error::invalid(format!(
                    "{name}: size {} exceeds the WAL segment size {seg_size}",
                    data.len()
                )));
            }
            check_header(ar, name, &data, src)?;
        }
        WalFileName::History { .. } | WalFileName::Backup { .. } => {}
    }
    let tli_dir = ar.tli_dir(name.tli());
    durable::create_dir_all_durable(&tli_dir)?;
    // Temp files of killed runs have unique names and never look finished; tidy them up.
    // They live in a small directory of their own, so this never lists the timeline's.
    let tmp_dir = ar.tmp_dir(name.tli())?;
    let _ = durable::remove_stale_temps(&tmp_dir);

    let dest = ar.data_path(name);
    let segno = name.segno(seg_size).filter(|_| name.is_segment());
    if dest.exists() {
        let out = compare_existing(ar, name, &data)?;
        if let Some(segno) = segno {
            if !ar.index_path(name.tli(), segno).exists()
                && !ar.missing_path(name.tli(), segno).exists()
            {
                ar.index_and_store(name.tli(), segno, &data, None);
            }
        }
        return Ok(out);
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
    // The three CPU costs run in parallel: indexing on one thread, the second half's LZ4
    // frame on another, CRC + the first half's frame on this one.
    let bytes: &[u8] = &data;
    let what = name.to_string();
    type Parts = (Vec<u8>, Vec<u8>, Vec<u8>);
    let (encoded, built): (Result<Parts>, Option<Result<SegmentIndex>>) = std::thread::scope(|s| {
        let ix = segno
            .map(|segno| s.spawn(move || ar.build_index_on_arrival(name.tli(), segno, bytes, src)));
        let (first, second) = bytes.split_at(bytes.len() / 2);
        let what2 = what.clone();
        let second_frame = s.spawn(move || store::compress_frame(second, &what2));
        let mut meta = meta;
        meta.crc32c = crc32c::crc32c(bytes);
        let enc = store::compress_frame(first, &what).and_then(|f1| {
            let f2 = second_frame.join().unwrap_or_else(|_| {
                Err(Error::invalid(format!(
                    "{what}: compression thread panicked"
                )))
            })?;
            Ok((store::header(&meta)?, f1, f2))
        });
        let built = ix.map(|h| {
            h.join().unwrap_or_else(|_| {
                Err(Error::corruption(format!(
                    "{name}: the WAL decoder panicked"
                )))
            })
        });
        (enc, built)
    });
    let encoded = encoded?;
    let t_cpu = t0.elapsed();
    let outcome = match write_parts(&dest, &tmp_dir, &encoded) {
        Ok(()) => PushOutcome::Archived,
        // Someone archived the same name meanwhile (a concurrent push): compare.
        Err(e) if e.kind() == ErrorKind::Conflict => compare_existing(ar, name, &data)?,
        Err(e) => return Err(e.context(format!("archiving {name}"))),
    };
    if let Some(segno) = segno {
        let t_write = t0.elapsed();
        ar.index_and_store(name.tli(), segno, &data, built);
        let t_index = t0.elapsed();
        if segno > 0 {
            ar.complete_pending(name.tli(), segno - 1, Some((segno, &data)));
        }
        log::debug!(
            "{name}: read+compress+index {:?}, durable write {:?}, index store {:?}, previous segment {:?}",
            t_cpu,
            t_write - t_cpu,
            t_index - t_write,
            t0.elapsed() - t_index
        );
    }
    Ok(outcome)
}

/// Writes header + frames durably under `dest` without assembling them in memory first.
fn write_parts(
    dest: &Path,
    tmp_dir: &Path,
    (head, f1, f2): &(Vec<u8>, Vec<u8>, Vec<u8>),
) -> Result<()> {
    use std::io::Write;
    let mut f = durable::DurableFile::create_in(dest, tmp_dir)?;
    for part in [head, f1, f2] {
        f.write_all(part).ctx("write", dest)?;
    }
    f.commit(Replace::No)
}

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
fn check_header(ar: &WalArchive, name: &WalFileName, data: &[u8], src: &Path) -> Result<()> {
    let cfg = ar.config();
    let h = crate::wal::read_long_header(data)
        .map_err(|e| e.context(format!("{name} (\"{}\")", src.display())))?;
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
    fn ready_segments_are_newer_segments_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let status = d.path().join("pg_wal/archive_status");
        fs::create_dir_all(&status).unwrap();
        for n in [
            "000000010000000000000003.ready",
            "000000010000000000000005.ready",
            "000000010000000000000004.ready",
            "000000010000000000000001.ready",
            "000000010000000000000006.done",
            "00000002.history.ready",
            "000000010000000000000007.partial.ready",
            "000000010000000000000008.ready",
        ] {
            fs::write(status.join(n), "").unwrap();
        }
        let own: WalFileName = "000000010000000000000002".parse().unwrap();
        let src = d.path().join("pg_wal").join(own.to_string());
        let got: Vec<String> = ready_segments(&src, &own, 3)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            got,
            [
                "000000010000000000000003",
                "000000010000000000000004",
                "000000010000000000000005"
            ]
        );
        assert!(ready_segments(&d.path().join("x/y"), &own, 3).is_empty());
    }
}
