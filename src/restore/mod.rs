//! Restoring a backup chain into a data directory, with recovery settings.
//!
//! A restore is plan-then-execute: [`plan::plan`] reads and checks everything (options and
//! recovery target, the chain and every manifest of it, the tablespace map, every
//! destination directory, see [`dirs`]) and writes nothing; [`execute`] writes. So a bad
//! option, a hostile catalog or a dangerous destination is refused with the filesystem as
//! it was.
//!
//! Every block is written once, from the newest backup of the chain that holds it. The
//! truncation rule (WAL-FORMAT §3.9): a block at or above the smallest limit block (or
//! recorded length) of any newer backup is never taken from an older one; if the newer
//! backups do not hold it, it is a zero page. `global/pg_control` is written last, so an
//! interrupted restore never leaves a startable data directory.
//!
//! Each file is rebuilt by rebuild.rs; files larger than a chunk (32 MiB) are split into
//! chunks that all restore threads share, and checked whole once their last chunk is done.
//!
//! Restore creates everything it writes itself, below roots it checked: directories with
//! [`safepath::create_dirs_under`] (no link followed below the root), files under a fresh
//! exclusive temp name renamed (or linked) into place, so a link is never written through.

pub mod destwal;
pub mod dirs;
pub mod incremental;
pub mod partial;
pub mod plan;
pub mod power;
pub mod rebuild;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::catalog::Catalog;
use crate::durable::{self, DurableFile, Replace};
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;
use crate::safepath;

use crate::backup::meta::{self, BackupMeta, Status};
use crate::format::incfile;
use crate::format::manifest::{FileEntry, Storage};
use plan::{Plan, Target};

/// Where recovery stops (parsed and checked by the caller, before anything is written).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum RecoveryTarget {
    /// The end of the archive (PostgreSQL's default: no target setting).
    #[default]
    Latest,
    /// As soon as the backup is consistent.
    Immediate,
    /// A time: `text` as given (it is what recovery_target_time gets), `epoch` its Unix
    /// seconds (to choose the backup).
    Time {
        text: String,
        epoch: i64,
        inclusive: Option<bool>,
    },
    Xid {
        xid: u64,
        inclusive: Option<bool>,
    },
    Lsn {
        lsn: crate::types::Lsn,
        inclusive: Option<bool>,
    },
    /// A restore point (1 to 63 bytes, no control characters).
    Name(String),
}

/// recovery_target_action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryAction {
    Pause,
    Promote,
    Shutdown,
}

impl RecoveryAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryAction::Pause => "pause",
            RecoveryAction::Promote => "promote",
            RecoveryAction::Shutdown => "shutdown",
        }
    }
}

/// recovery_target_timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimelineTarget {
    Current,
    Latest,
    Id(crate::types::TimeLineId),
}

impl std::fmt::Display for TimelineTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimelineTarget::Current => f.write_str("current"),
            TimelineTarget::Latest => f.write_str("latest"),
            TimelineTarget::Id(n) => write!(f, "{n}"),
        }
    }
}

/// The recovery settings of a restore.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Recovery {
    pub target: RecoveryTarget,
    pub timeline: Option<TimelineTarget>,
    pub action: Option<RecoveryAction>,
}

pub struct RestoreOptions {
    pub backup_id: Option<String>,
    pub target: PathBuf,
    pub jobs: usize,
    /// `-T OLD=NEW`, both absolute; each OLD must be a tablespace of the backup.
    pub mappings: Vec<(PathBuf, PathBuf)>,
    pub recovery: Recovery,
    /// Allows deleting the contents of `target` (and of tablespace destinations given by
    /// `-T`), never of anything else.
    pub force: bool,
    /// Where the copy reports its progress.
    pub progress: Arc<dyn Progress>,
}

/// Picks the backup to restore for a parsed target: the given one, or the newest OK backup
/// that can reach it (its whole chain OK); without an id, a backup must also satisfy
/// `reaches` (e.g. end before a named restore point, on its timeline's history).
pub fn choose_backup_on<'a>(
    list: &'a [BackupMeta],
    id: Option<&str>,
    target: &Target,
    reaches: impl Fn(&BackupMeta) -> bool,
) -> Result<Vec<&'a BackupMeta>> {
    let usable = |b: &BackupMeta| -> Result<Vec<&'a BackupMeta>> {
        let chain = meta::chain(list, &b.id)?;
        for c in &chain {
            let st = c.effective_status();
            if st != Status::Ok {
                return Err(Error::invalid(format!(
                    "backup {} has status {st}{}; it cannot be restored",
                    c.id,
                    if c.id != b.id {
                        format!(" (parent of {})", b.id)
                    } else {
                        String::new()
                    }
                )));
            }
        }
        Ok(chain)
    };
    if let Some(id) = id {
        return usable(meta::find(list, id)?);
    }
    for b in list.iter().rev() {
        let reach = match *target {
            Target::Time(t) => b.recovery_epoch.is_some_and(|r| r <= t),
            Target::Xid(x) => b.recovery_xid.is_some_and(|r| r <= x),
            Target::Lsn(l) => b.stop_lsn.is_some_and(|s| s <= l),
            Target::None | Target::Immediate | Target::Name(_) => true,
        } && reaches(b);
        if reach {
            if let Ok(chain) = usable(b) {
                return Ok(chain);
            }
        }
    }
    Err(Error::not_found(
        "no valid backup can reach the recovery target".to_string(),
    ))
}

fn quote_conf(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Rewrites postgresql.auto.conf text: removes old lines for the settings we set, then
/// appends ours.
/// Merges the recovery settings into the restored `postgresql.auto.conf` (only its
/// absence means "nothing to merge") and writes `recovery.signal`.
pub(crate) fn write_recovery_settings(target: &Path, settings: &[(&str, String)]) -> Result<()> {
    let auto = target.join("postgresql.auto.conf");
    let existing = match std::fs::read_to_string(&auto) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io("read", &auto, e)),
    };
    durable::write_file(
        &auto,
        recovery_conf(&existing, settings).as_bytes(),
        Replace::Yes,
    )?;
    durable::write_file(&target.join("recovery.signal"), b"", Replace::Yes)
}

pub fn recovery_conf(existing: &str, settings: &[(&str, String)]) -> String {
    let keys: Vec<&str> = settings.iter().map(|(k, _)| *k).collect();
    let mut out = String::new();
    for line in existing.lines() {
        let key = line
            .trim_start()
            .split(['=', ' ', '\t'])
            .next()
            .unwrap_or("");
        let drop_it = keys.contains(&key)
            || key.starts_with("recovery_target")
            || key == "restore_command"
            || key == "recovery_end_command";
        if !drop_it {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# recovery settings added by walnut restore\n");
    for (k, v) in settings {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out
}

struct Restorer<'a> {
    catalog: &'a Catalog,
    chain: Vec<&'a BackupMeta>,
    /// Manifests of the older backups (index 1.. of the chain), by path.
    older: Vec<HashMap<String, FileEntry>>,
    target: PathBuf,
    tablespaces: HashMap<String, PathBuf>,
    progress: Arc<dyn Progress>,
    /// Blocks per chunk and per window (see rebuild.rs); small in tests.
    chunk_blocks: u32,
    window_blocks: u32,
}

impl Restorer<'_> {
    /// Where a logical path goes; `None` for `pg_tblspc/<oid>` of a tablespace.
    fn dest(&self, logical: &str) -> Result<Option<PathBuf>> {
        Ok(self.dest_rel(logical).map(|(root, rel)| root.join(rel)))
    }

    /// Where a backup's manifest entry says an incremental file stands: from the manifest
    /// when it records it (every backup written by this walnut), else from the trailer
    /// (checked against the trailer's checksum when the file is read).
    fn inc_info(&self, b: &BackupMeta, e: &FileEntry) -> Result<incfile::IncInfo> {
        if let (Some(file_blocks), Some(nblocks)) = (e.file_blocks, e.changed_blocks) {
            return Ok(incfile::IncInfo {
                nblocks,
                file_blocks,
                limit_block: e.limit_block,
            });
        }
        let key = format!("{}/{}", b.key()?, e.stored_path());
        crate::backup::stored::inc_info(self.catalog.repo(), &key, b.block_size)
    }

    fn source(&self, b: &BackupMeta, e: &FileEntry, cap: u32) -> Result<rebuild::Source> {
        let stored = match e.storage {
            Storage::Full => rebuild::Stored::Plain,
            Storage::FullLz4 => rebuild::Stored::Lz4 {
                frames: e.lz4_frames.clone(),
            },
            Storage::Incremental => {
                let info = self.inc_info(b, e)?;
                rebuild::Stored::Inc {
                    info,
                    whole_pages: e.stored_size
                        == incfile::whole_page_file_size(info.nblocks, b.block_size),
                }
            }
            Storage::Dir => return Err(Error::invalid(format!("\"{}\" is a directory", e.path))),
        };
        Ok(rebuild::Source {
            repo: self.catalog.repo_arc(),
            key: format!("{}/{}", b.key()?, e.stored_path()),
            backup: b.id.clone(),
            stored,
            size: e.size,
            stored_size: e.stored_size,
            crc32c: e.crc32c,
            cap,
        })
    }

    /// The sources of a file of the newest backup, newest first, each with its `cap`: a
    /// block at or above the smallest limit block (or length) of any newer backup is never
    /// taken from an older one. Older backups are consulted until one holds the file whole,
    /// lacks it, or can supply nothing (cap 0).
    fn plan(&self, e: &FileEntry) -> Result<rebuild::Plan> {
        let newest = self.chain[0];
        let bs = newest.block_size;
        let (shape, sources) = match e.storage {
            Storage::Incremental => {
                let first = self.source(newest, e, u32::MAX)?;
                let rebuild::Stored::Inc { info, .. } = first.stored else {
                    return Err(Error::invalid("not an incremental file"));
                };
                let len = info.file_blocks;
                let mut sources = vec![rebuild::Source { cap: len, ..first }];
                let mut cap = len.min(info.limit_block.unwrap_or(u32::MAX));
                for (i, older) in self.chain.iter().enumerate().skip(1) {
                    if cap == 0 {
                        break;
                    }
                    let Some(oe) = self.older[i - 1].get(&e.path) else {
                        break;
                    };
                    if oe.storage == Storage::Dir {
                        break;
                    }
                    let s = self.source(older, oe, cap)?;
                    match s.stored {
                        rebuild::Stored::Inc { info: oi, .. } => {
                            cap = cap
                                .min(oi.file_blocks)
                                .min(oi.limit_block.unwrap_or(u32::MAX));
                            sources.push(s);
                        }
                        _ => {
                            sources.push(s);
                            break;
                        }
                    }
                }
                (rebuild::Shape::Blocks(len), sources)
            }
            _ => (
                rebuild::Shape::Copy,
                vec![self.source(newest, e, u32::MAX)?],
            ),
        };
        Ok(rebuild::Plan::new(
            shape,
            sources,
            bs,
            self.chunk_blocks,
            self.window_blocks,
        ))
    }

    /// Restores one file in the calling thread (its chunks in `order`, every one exactly
    /// once); returns the verified result, not yet under its final name.
    fn restore_entry_in(
        &self,
        e: &FileEntry,
        order: impl Fn(u32) -> Vec<u32>,
    ) -> Result<Option<DurableFile>> {
        let Some(dest) = self.dest(&e.path)? else {
            return Ok(None);
        };
        if e.storage == Storage::Dir {
            return Ok(None);
        }
        // the parent was made by create_dirs, below a checked root, without links
        let plan = self.plan(e)?;
        let mut out = DurableFile::create(&dest)?;
        let file = out.file().try_clone().ctx("open", &dest)?;
        let mut parts = vec![Vec::new(); plan.chunks as usize];
        for k in order(plan.chunks) {
            let slot = parts
                .get_mut(k as usize)
                .ok_or_else(|| Error::invalid(format!("no chunk {k}")))?;
            *slot = rebuild::run_chunk(&plan, k, &file, &dest, &*self.progress)?;
        }
        rebuild::finish(&plan, &parts, &file, &dest)?;
        Ok(Some(out))
    }

    fn restore_entry(&self, e: &FileEntry) -> Result<Option<DurableFile>> {
        self.restore_entry_in(e, |n| (0..n).collect())
    }
}

/// The files of a backup chain as restore rebuilds them, for `walnut merge`, which writes
/// them into a new FULL backup instead of a data directory: the same sources and the same
/// truncation rule ([`Restorer::plan`]).
pub(crate) struct ChainFiles<'a> {
    r: Restorer<'a>,
}

impl<'a> ChainFiles<'a> {
    /// `chain` newest first; `older[i]` the files of `chain[i + 1]` by path (no directories).
    pub(crate) fn new(
        catalog: &'a Catalog,
        chain: Vec<&'a BackupMeta>,
        older: Vec<HashMap<String, FileEntry>>,
    ) -> ChainFiles<'a> {
        let bs = chain.first().map_or(8192, |b| b.block_size.max(1)) as u64;
        ChainFiles {
            r: Restorer {
                catalog,
                chain,
                older,
                target: PathBuf::new(),
                tablespaces: HashMap::new(),
                progress: Arc::new(crate::progress::NoProgress),
                chunk_blocks: (rebuild::CHUNK_BYTES / bs) as u32,
                window_blocks: (rebuild::WINDOW_BYTES / bs) as u32,
            },
        }
    }

    /// How file `e` of the newest backup is rebuilt.
    pub(crate) fn plan(&self, e: &FileEntry) -> Result<rebuild::Plan> {
        self.r.plan(e)
    }
}

/// A file restored in chunks by several threads: the first chunk to run creates the result,
/// the last one to finish verifies it and puts it in place.
struct SharedFile<'e> {
    entry: &'e FileEntry,
    chunks: u32,
    state: Mutex<SharedState>,
}

#[derive(Default)]
struct SharedState {
    out: Option<(DurableFile, Arc<File>)>,
    parts: Vec<Option<Vec<rebuild::Part>>>,
    done: u32,
}

enum Task {
    /// A file restored whole by one thread.
    Whole(usize),
    /// Chunk `k` of a shared file.
    Chunk(usize, u32),
}

impl Restorer<'_> {
    fn run_chunk_task(&self, sf: &SharedFile<'_>, k: u32) -> Result<()> {
        let e = sf.entry;
        let dest = self
            .dest(&e.path)?
            .ok_or_else(|| Error::invalid(format!("\"{}\" has no destination", e.path)))?;
        let plan = self.plan(e)?;
        let file = {
            let mut st = sf
                .state
                .lock()
                .map_err(|_| Error::invalid("a restore thread panicked"))?;
            if st.out.is_none() {
                let mut df = DurableFile::create(&dest)?;
                let f = Arc::new(df.file().try_clone().ctx("open", &dest)?);
                st.out = Some((df, f));
                st.parts = vec![None; sf.chunks as usize];
            }
            match &st.out {
                Some((_, f)) => f.clone(),
                None => return Err(Error::invalid("no output file")),
            }
        };
        let parts = rebuild::run_chunk(&plan, k, &file, &dest, &*self.progress)?;
        let complete = {
            let mut st = sf
                .state
                .lock()
                .map_err(|_| Error::invalid("a restore thread panicked"))?;
            if let Some(slot) = st.parts.get_mut(k as usize) {
                *slot = Some(parts);
            }
            st.done += 1;
            if st.done == sf.chunks {
                let all: Option<Vec<_>> = std::mem::take(&mut st.parts).into_iter().collect();
                st.out.take().zip(all)
            } else {
                None
            }
        };
        if let Some(((df, _), parts)) = complete {
            rebuild::finish(&plan, &parts, &file, &dest)?;
            df.commit_deferred(Replace::No)?;
        }
        Ok(())
    }
}

/// Path of `walnut-fetch` next to the running executable.
fn fetch_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::invalid(format!("cannot find own executable: {e}")))?;
    let dir = exe
        .parent()
        .ok_or_else(|| Error::invalid("executable has no directory"))?;
    Ok(dir.join("walnut-fetch"))
}

/// The settings restore writes: restore_command, recovery_end_command, then the plan's.
fn recovery_settings(
    catalog: &Catalog,
    instance: &str,
    plan: &Plan<'_>,
) -> Result<Vec<(&'static str, String)>> {
    let fetch = fetch_binary()?;
    let location = match catalog.fetch_args() {
        Some(a) => a.to_string(),
        None => {
            let cat_abs = std::fs::canonicalize(catalog.root()).ctx("resolve", catalog.root())?;
            format!("-B {}", cat_abs.display())
        }
    };
    let fetch_cmd = format!("{} {location} --instance {}", fetch.display(), instance);
    let mut settings: Vec<(&'static str, String)> = vec![
        ("restore_command", quote_conf(&format!("{fetch_cmd} %f %p"))),
        // removes walnut-fetch's prefetch spool from pg_wal once recovery is over
        (
            "recovery_end_command",
            quote_conf(&format!("{fetch_cmd} --cleanup")),
        ),
    ];
    settings.extend(plan.settings.iter().cloned());
    Ok(settings)
}

/// Restores; returns the restored backup's id. Nothing is written until every check of
/// the plan phase passed.
pub fn restore(catalog: &Catalog, instance: &str, opts: &RestoreOptions) -> Result<String> {
    let list = meta::list(catalog, instance)?;
    let plan = plan::plan(catalog, instance, &list, opts)?;
    // the chain is locked for use until the restore ends: a delete or merge of it is
    // refused meanwhile (and one that came first makes this fail here, before any write)
    let _chain_lock =
        crate::lifecycle::locks::use_chain(catalog, instance, &plan.chain, false, "restore")?;
    let settings = recovery_settings(catalog, instance, &plan)?;
    let id = plan.chain[0].id.clone();
    execute(catalog, plan, &settings, opts.jobs, &opts.progress)?;
    Ok(id)
}

/// Creates a destination root the operator (or the checked tablespace map) named, with its
/// parents, and gives it mode 0700 through the opened directory.
fn make_root(p: &Path) -> Result<()> {
    durable::create_dir_all_durable(p)?;
    let f = safepath::open_dir_under(p, "")?;
    f.set_permissions(std::fs::Permissions::from_mode(0o700))
        .ctx("chmod", p)
}

fn is_file(e: &FileEntry) -> bool {
    match e.storage {
        Storage::Full | Storage::FullLz4 | Storage::Incremental => true,
        Storage::Dir => false,
    }
}

/// The execute phase: writes what the plan says, pg_control last.
fn execute(
    catalog: &Catalog,
    plan: Plan<'_>,
    settings: &[(&str, String)],
    jobs: usize,
    progress: &Arc<dyn Progress>,
) -> Result<()> {
    let newest = plan.chain[0];
    let target = &plan.target;
    let new_map = plan.tablespace_map();
    // what the operator allowed to be cleared, then the roots
    if plan.clear_target {
        dirs::clear(target)?;
    }
    for t in plan.tablespaces.iter().filter(|t| t.clear) {
        dirs::clear(&t.dest)?;
    }
    make_root(target)?;
    for t in &plan.tablespaces {
        make_root(&t.dest)?;
    }
    let total: u64 = plan.entries.iter().map(|e| e.size).sum();
    progress.start(&format!("restore {}", newest.id), total);
    let r = Restorer {
        catalog,
        chain: plan.chain.clone(),
        older: plan.older,
        target: target.clone(),
        tablespaces: plan
            .tablespaces
            .iter()
            .map(|t| (t.oid.clone(), t.dest.clone()))
            .collect(),
        progress: progress.clone(),
        chunk_blocks: (rebuild::CHUNK_BYTES / newest.block_size.max(1) as u64) as u32,
        window_blocks: (rebuild::WINDOW_BYTES / newest.block_size.max(1) as u64) as u32,
    };
    let entries = plan.entries;
    // Files are put in place without per-file fsyncs; one syncfs per filesystem written to
    // (handles opened before any write, see durable::FsSync) runs before pg_control.
    let mut fs_syncs = vec![durable::FsSync::open(target)?];
    for d in r.tablespaces.values() {
        fs_syncs.push(durable::FsSync::open(d)?);
    }
    r.create_dirs(&entries)?;
    let (sparse, files): (Vec<&FileEntry>, Vec<&FileEntry>) = entries
        .iter()
        .filter(|e| is_file(e) && e.path != "global/pg_control")
        .partition(|e| partial::is_excluded(&e.path, &plan.excluded_dbs));
    power::create_sparse(&r, &sparse)?;
    r.restore_files(&files, jobs)?;
    r.create_other_entries(&entries)?;
    // pg_control: prepared under a temp name, renamed into place at the very end.
    let pc = entries
        .iter()
        .find(|e| e.path == "global/pg_control")
        .ok_or_else(|| {
            Error::corruption(format!("backup {} has no global/pg_control", newest.id))
        })?;
    let pc_file = r
        .restore_entry(pc)?
        .ok_or_else(|| Error::corruption("pg_control has no destination"))?;

    durable::write_file(
        &target.join("backup_label"),
        &plan.backup_label,
        Replace::Yes,
    )?;
    if !new_map.is_empty() {
        durable::write_file(
            &target.join("tablespace_map"),
            new_map.as_bytes(),
            Replace::Yes,
        )?;
    }
    write_recovery_settings(target, settings)?;
    for f in &fs_syncs {
        f.sync()?;
    }
    // pg_control last: until it is in place the directory cannot start.
    pc_file.commit(Replace::Yes)?;
    durable::fsync_dir(target)?;
    r.progress.finish();
    Ok(())
}

impl Restorer<'_> {
    /// Where a logical path goes, as (root, path below it); `None` for `pg_tblspc/<oid>`
    /// of a tablespace (PostgreSQL makes that link from tablespace_map).
    fn dest_rel<'p>(&self, logical: &'p str) -> Option<(&Path, &'p str)> {
        if let Some(rest) = logical.strip_prefix("pg_tblspc/") {
            let (oid, tail) = match rest.split_once('/') {
                Some((o, t)) => (o, Some(t)),
                None => (rest, None),
            };
            if let Some(loc) = self.tablespaces.get(oid) {
                return tail.map(|t| (loc.as_path(), t));
            }
        }
        Some((self.target.as_path(), logical))
    }

    /// Creates every directory of the manifest and every parent of a file, below its root
    /// and without following links ([`safepath::create_dirs_under`]).
    fn create_dirs(&self, entries: &[FileEntry]) -> Result<()> {
        let mut want: BTreeSet<(&Path, &str)> = BTreeSet::new();
        for e in entries {
            let Some((root, rel)) = self.dest_rel(&e.path) else {
                continue;
            };
            if e.storage == Storage::Dir {
                want.insert((root, rel));
            } else if let Some((parent, _)) = rel.rsplit_once('/') {
                want.insert((root, parent));
            }
        }
        for (root, rel) in want {
            safepath::create_dirs_under(root, rel, 0o700)?;
        }
        Ok(())
    }

    /// Entries that are neither directories nor files (none yet; symlinks will be): the
    /// one place that creates them, after every directory and file, so that nothing is
    /// ever written through them.
    fn create_other_entries(&self, entries: &[FileEntry]) -> Result<()> {
        for e in entries {
            match e.storage {
                Storage::Dir | Storage::Full | Storage::FullLz4 | Storage::Incremental => {}
            }
        }
        Ok(())
    }

    /// Restores `files` on `jobs` threads; the first error stops every thread.
    fn restore_files(&self, files: &[&FileEntry], jobs: usize) -> Result<()> {
        // Big files first, so that the end of the restore is small files, and a big file
        // split into chunks is shared by all threads.
        let mut order: Vec<usize> = (0..files.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(files[i].size));
        let mut shared = Vec::new();
        let mut tasks = Vec::with_capacity(files.len());
        for i in order {
            let chunks = if files[i].size > rebuild::CHUNK_BYTES {
                self.plan(files[i])
                    .map_err(|err| err.context(format!("restoring \"{}\"", files[i].path)))?
                    .chunks
            } else {
                1
            };
            if chunks > 1 {
                for k in 0..chunks {
                    tasks.push(Task::Chunk(shared.len(), k));
                }
                shared.push(SharedFile {
                    entry: files[i],
                    chunks,
                    state: Mutex::new(SharedState::default()),
                });
            } else {
                tasks.push(Task::Whole(i));
            }
        }
        let next = AtomicUsize::new(0);
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..jobs.max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(task) = tasks.get(i) else { break };
                    if first_err.lock().map(|g| g.is_some()).unwrap_or(true) {
                        break;
                    }
                    let (e, res) = match *task {
                        Task::Whole(f) => (
                            files[f],
                            self.restore_entry(files[f]).and_then(|o| {
                                o.map_or(Ok(()), |df| df.commit_deferred(Replace::No))
                            }),
                        ),
                        Task::Chunk(sf, k) => {
                            (shared[sf].entry, self.run_chunk_task(&shared[sf], k))
                        }
                    };
                    if let Err(err) = res {
                        let err = err.context(format!("restoring \"{}\"", e.path));
                        if let Ok(mut g) = first_err.lock() {
                            g.get_or_insert(err);
                        }
                        break;
                    }
                });
            }
        });
        match first_err.into_inner().ok().flatten() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A backup's directory in a local test catalog (the tests write stored files there).
#[cfg(test)]
fn bdir(catalog: &Catalog, b: &BackupMeta) -> PathBuf {
    catalog.root().join(b.key().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_settings_replace_older_lines() {
        let old = "# Do not edit\nwork_mem = '4MB'\nrestore_command = 'cp x'\nrecovery_target_time = '2020-01-01'\n";
        let s = recovery_conf(
            old,
            &[
                ("restore_command", "'walnut-fetch %f %p'".into()),
                ("recovery_target_name", "'p1'".into()),
            ],
        );
        assert!(s.contains("work_mem = '4MB'"));
        assert!(!s.contains("cp x"));
        assert!(!s.contains("2020-01-01"));
        assert!(s.contains("restore_command = 'walnut-fetch %f %p'\nrecovery_target_name = 'p1'\n"));
        assert_eq!(quote_conf("it's"), "'it''s'");
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use crate::backup::meta::Mode;
    use crate::format::incfile::IncWriter;
    use crate::format::manifest;

    const BS: usize = 8192;

    fn page(tag: u8) -> Vec<u8> {
        vec![tag; BS]
    }

    fn meta(id: &str, mode: Mode, parent: Option<&str>) -> BackupMeta {
        meta::test_meta(id, mode, parent)
    }

    fn inc(
        catalog: &Catalog,
        b: &BackupMeta,
        pages: &[(u32, u8)],
        file_blocks: u32,
        limit: Option<u32>,
    ) -> FileEntry {
        inc_with(catalog, b, pages, file_blocks, limit, false)
    }

    fn inc_with(
        catalog: &Catalog,
        b: &BackupMeta,
        pages: &[(u32, u8)],
        file_blocks: u32,
        limit: Option<u32>,
        compress: bool,
    ) -> FileEntry {
        let mut w = IncWriter::new(Vec::new(), BS as u32, compress).unwrap();
        for &(n, tag) in pages {
            w.add(n, &page(tag)).unwrap();
        }
        let (bytes, _, crc) = w.finish_with_crc(file_blocks, limit).unwrap();
        let e = FileEntry {
            path: "base/5/100".into(),
            storage: Storage::Incremental,
            size: file_blocks as u64 * BS as u64,
            stored_size: bytes.len() as u64,
            crc32c: crc,
            changed_blocks: Some(pages.len() as u32),
            file_blocks: Some(file_blocks),
            limit_block: limit,
            lz4_frames: None,
        };
        let key = format!("{}/{}", b.key().unwrap(), e.stored_path());
        catalog.repo().put_new(&key, &bytes).unwrap();
        e
    }

    fn fe_template(size: u64) -> FileEntry {
        FileEntry {
            path: "base/5/100".into(),
            storage: Storage::Full,
            size,
            stored_size: size,
            crc32c: 0,
            changed_blocks: None,
            file_blocks: None,
            limit_block: None,
            lz4_frames: None,
        }
    }

    /// Chunk and window sizes (in blocks) and chunk orders every rebuild is tried with:
    /// one pass, and splits at every block boundary, run forwards and backwards.
    const SPLITS: [(u32, u32, bool); 6] = [
        (1024, 128, false),
        (1, 1, false),
        (1, 1, true),
        (2, 1, true),
        (3, 2, false),
        (4, 4, true),
    ];

    fn restorer<'a>(
        catalog: &'a Catalog,
        chain: Vec<&'a BackupMeta>,
        older_entries: &[FileEntry],
        target: &Path,
        (chunk_blocks, window_blocks): (u32, u32),
    ) -> Restorer<'a> {
        // restore creates the parents of files up front (create_dirs)
        std::fs::create_dir_all(target.join("base/5")).unwrap();
        Restorer {
            catalog,
            chain,
            older: older_entries
                .iter()
                .map(|e| HashMap::from([(e.path.clone(), e.clone())]))
                .collect(),
            target: target.to_path_buf(),
            tablespaces: HashMap::new(),
            progress: std::sync::Arc::new(crate::progress::NoProgress),
            chunk_blocks,
            window_blocks,
        }
    }

    /// Rebuilds base/5/100 from `chain` (newest first) with every split of [`SPLITS`] and
    /// returns its pages' tags (the same for all of them).
    fn rebuild(
        catalog: &Catalog,
        chain: Vec<&BackupMeta>,
        entries: Vec<FileEntry>,
        target: &Path,
    ) -> Vec<u8> {
        let mut results = Vec::new();
        for (chunk, window, backwards) in SPLITS {
            let t = target.join(format!("c{chunk}w{window}{backwards}"));
            let r = restorer(catalog, chain.clone(), &entries[1..], &t, (chunk, window));
            let bytes = rebuilt(&r, &entries[0], backwards, &t);
            assert_eq!(bytes.len() % BS, 0);
            let tags: Vec<u8> = bytes
                .chunks(BS)
                .map(|p| {
                    assert!(p.iter().all(|&b| b == p[0]), "a page mixes sources");
                    p[0]
                })
                .collect();
            results.push(tags);
        }
        for r in &results[1..] {
            assert_eq!(r, &results[0], "a split changed the result");
        }
        results.swap_remove(0)
    }

    /// An incremental file swapped for another well-formed one of the same size (its own
    /// trailer CRC is right) is refused: the manifest holds each file's trailer CRC. A
    /// manifest written before that (whole-file CRC, the residue) still restores.
    #[test]
    fn swapped_incremental_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let catalog = Catalog::init(&d.path().join("cat")).unwrap();
        let (f, fe) = full_backup(&catalog, &[1, 2]);
        let p1 = meta("P1", Mode::Page, Some("F"));
        let e1 = inc(&catalog, &p1, &[(1, 20)], 2, None);
        let p2 = meta("P2", Mode::Page, Some("P1"));
        let e2 = inc(&catalog, &p2, &[(1, 21)], 2, None);
        let attempt = |e: &FileEntry, t: &str| {
            let r = restorer(
                &catalog,
                vec![&p2, &p1, &f],
                &[e1.clone(), fe.clone()],
                &d.path().join(t),
                (1024, 128),
            );
            r.restore_entry_in(e, |n| (0..n).collect()).map(|_| ())
        };
        assert!(attempt(&e2, "ok").is_ok());
        let legacy = FileEntry {
            crc32c: incfile::WHOLE_FILE_RESIDUE,
            ..e2.clone()
        };
        assert!(attempt(&legacy, "legacy").is_ok());
        let p2_path = super::bdir(&catalog, &p2).join(e2.stored_path());
        std::fs::copy(super::bdir(&catalog, &p1).join(e1.stored_path()), &p2_path).unwrap();
        let err = attempt(&e2, "swapped").unwrap_err().to_string();
        assert!(err.contains("manifest checksum"), "{err}");
    }

    /// WAL-FORMAT §3.9: after a truncation to 2 blocks, blocks 2.. never come from the
    /// FULL backup even though it holds them; unlisted blocks are zero pages. Each block is
    /// taken from the newest backup that holds it, and the file has the newest length.
    #[test]
    fn truncation_rule_and_newest_first() {
        let d = tempfile::tempdir().unwrap();
        let catalog = Catalog::init(&d.path().join("cat")).unwrap();
        let f = meta("F", Mode::Full, None);
        let full_bytes: Vec<u8> = [1u8, 2, 3, 4].iter().flat_map(|&t| page(t)).collect();
        let fe = FileEntry {
            path: "base/5/100".into(),
            storage: Storage::Full,
            size: full_bytes.len() as u64,
            stored_size: full_bytes.len() as u64,
            crc32c: crc32c::crc32c(&full_bytes),
            changed_blocks: None,
            file_blocks: None,
            limit_block: None,
            lz4_frames: None,
        };
        let fp = super::bdir(&catalog, &f).join(fe.stored_path());
        std::fs::create_dir_all(fp.parent().unwrap()).unwrap();
        std::fs::write(&fp, &full_bytes).unwrap();
        // PAGE 1: truncated to 2, then extended to 6 with block 2 written
        let p1 = meta("P1", Mode::Page, Some("F"));
        let e1 = inc(&catalog, &p1, &[(2, 20)], 6, Some(2));
        let t1 = d.path().join("t1");
        assert_eq!(
            rebuild(&catalog, vec![&p1, &f], vec![e1.clone(), fe.clone()], &t1),
            vec![1, 2, 20, 0, 0, 0]
        );
        // PAGE 2: block 4 written, block 0 rewritten, no truncation
        let p2 = meta("P2", Mode::Page, Some("P1"));
        let e2 = inc(&catalog, &p2, &[(0, 30), (4, 31)], 6, None);
        let t2 = d.path().join("t2");
        assert_eq!(
            rebuild(
                &catalog,
                vec![&p2, &p1, &f],
                vec![e2.clone(), e1.clone(), fe.clone()],
                &t2
            ),
            vec![30, 2, 20, 0, 31, 0]
        );
        // PAGE 3: shorter than its parent (truncated to 3 at copy time, no limit recorded in
        // its own range): blocks past 3 are gone
        let p3 = meta("P3", Mode::Delta, Some("P2"));
        let e3 = inc(&catalog, &p3, &[], 3, None);
        let t3 = d.path().join("t3");
        assert_eq!(
            rebuild(
                &catalog,
                vec![&p3, &p2, &p1, &f],
                vec![e3.clone(), e2.clone(), e1.clone(), fe.clone()],
                &t3
            ),
            vec![30, 2, 20]
        );
        // the same chain over an LZ4-compressed FULL
        let fz = meta("FZ", Mode::Full, None);
        let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
        std::io::Write::write_all(&mut enc, &full_bytes).unwrap();
        let z = enc.finish().unwrap();
        let fze = FileEntry {
            storage: Storage::FullLz4,
            stored_size: z.len() as u64,
            crc32c: crc32c::crc32c(&z),
            ..fe_template(full_bytes.len() as u64)
        };
        let zp = super::bdir(&catalog, &fz).join(fze.stored_path());
        std::fs::create_dir_all(zp.parent().unwrap()).unwrap();
        std::fs::write(&zp, &z).unwrap();
        let t4 = d.path().join("t4");
        assert_eq!(
            rebuild(
                &catalog,
                vec![&p3, &p2, &p1, &fz],
                vec![e3.clone(), e2.clone(), e1.clone(), fze],
                &t4
            ),
            vec![30, 2, 20]
        );
        let (e3_ok, fe_ok) = (e3, fe);
        // A damaged FULL beneath the chain is refused, even where the damage lies in a block
        // no newer backup lets it supply: the whole stored file is checked against its
        // manifest checksum.
        let mut bytes = std::fs::read(&fp).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&fp, &bytes).unwrap();
        for (chunk, window, _) in SPLITS {
            let r = restorer(
                &catalog,
                vec![&p3, &p2, &p1, &f],
                &[e2.clone(), e1.clone(), fe_ok.clone()],
                &d.path().join(format!("t5-{chunk}-{window}")),
                (chunk, window),
            );
            let err = r.restore_entry(&e3_ok).map(|_| ()).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Corruption, "{err}");
            assert!(err.to_string().contains("manifest checksum"), "{err}");
            assert!(err.to_string().contains(&fp.display().to_string()), "{err}");
        }
    }

    fn store(catalog: &Catalog, b: &BackupMeta, e: &FileEntry, bytes: &[u8]) -> PathBuf {
        let key = format!("{}/{}", b.key().unwrap(), e.stored_path());
        let p = catalog.root().join(&key);
        match catalog.repo().put_new(&key, bytes) {
            // a test replacing a stored file (local catalogs only)
            Err(e) if e.kind() == crate::ErrorKind::Conflict => std::fs::write(&p, bytes).unwrap(),
            r => r.unwrap(),
        }
        p
    }

    /// Restores entry `e` with `r`, chunks in order or `backwards`, and returns the file.
    fn rebuilt(r: &Restorer, e: &FileEntry, backwards: bool, target: &Path) -> Vec<u8> {
        let out = r
            .restore_entry_in(e, |n| {
                if backwards {
                    (0..n).rev().collect()
                } else {
                    (0..n).collect()
                }
            })
            .unwrap()
            .unwrap();
        out.commit(Replace::Yes).unwrap();
        std::fs::read(target.join("base/5/100")).unwrap()
    }

    /// FULL backup "F" holding base/5/100 uncompressed, one page per tag.
    fn full_backup(catalog: &Catalog, tags: &[u8]) -> (BackupMeta, FileEntry) {
        let f = meta("F", Mode::Full, None);
        let full: Vec<u8> = tags.iter().flat_map(|&t| page(t)).collect();
        let fe = FileEntry {
            crc32c: crc32c::crc32c(&full),
            ..fe_template(full.len() as u64)
        };
        store(catalog, &f, &fe, &full);
        (f, fe)
    }

    /// Incremental files with LZ4-compressed pages cannot be entered at a block: they are
    /// read in one pass, whatever the chunk size, with the same result.
    #[test]
    fn compressed_incrementals_rebuild_in_one_pass() {
        let d = tempfile::tempdir().unwrap();
        let catalog = Catalog::init(&d.path().join("cat")).unwrap();
        compressed_incrementals_on(&catalog, d.path());
        // the same from a store that is not a local directory: ranged reads
        let mem = Catalog::with_repo(
            Path::new("/mem"),
            std::sync::Arc::new(crate::repo::MemRepo::new()),
        );
        let d2 = tempfile::tempdir().unwrap();
        compressed_incrementals_on(&mem, d2.path());
    }

    fn compressed_incrementals_on(catalog: &Catalog, dir: &Path) {
        let d = dir;
        let (f, fe) = full_backup(catalog, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let p1 = meta("P1", Mode::Page, Some("F"));
        let e1 = inc_with(catalog, &p1, &[(1, 11), (5, 15), (9, 19)], 10, None, true);
        assert!(e1.stored_size < 3 * BS as u64, "pages were not compressed");
        let p2 = meta("P2", Mode::Page, Some("P1"));
        let e2 = inc_with(catalog, &p2, &[(0, 20), (5, 25)], 10, Some(7), true);
        let r = restorer(
            catalog,
            vec![&p2, &p1, &f],
            &[e1.clone(), fe.clone()],
            d,
            (1, 1),
        );
        assert_eq!(r.plan(&e2).unwrap().chunks, 1);
        assert_eq!(
            rebuild(catalog, vec![&p2, &p1, &f], vec![e2, e1, fe], &d.join("t")),
            vec![20, 11, 3, 4, 5, 25, 7, 0, 0, 0]
        );
    }

    /// Damage anywhere in an incremental file fails the rebuild, naming the stored file,
    /// however the file is split: a page, a block number, the trailer, a truncation.
    #[test]
    fn damaged_incremental_is_refused_in_every_split() {
        let d = tempfile::tempdir().unwrap();
        let catalog = Catalog::init(&d.path().join("cat")).unwrap();
        let (f, fe) = full_backup(&catalog, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let p1 = meta("P1", Mode::Page, Some("F"));
        let e1 = inc(
            &catalog,
            &p1,
            &[(1, 11), (2, 12), (5, 15), (6, 16)],
            8,
            None,
        );
        let path = super::bdir(&catalog, &p1).join(e1.stored_path());
        let good = std::fs::read(&path).unwrap();
        let rec = 8 + BS;
        let damage: Vec<(&str, Vec<u8>)> = vec![
            ("page byte", {
                let mut b = good.clone();
                b[16 + 2 * rec + 8 + 100] ^= 0x10;
                b
            }),
            ("block number", {
                let mut b = good.clone();
                b[16 + 2 * rec] ^= 0x01;
                b
            }),
            ("block order", {
                let mut b = good.clone();
                b[16 + rec] = 7;
                b
            }),
            ("trailer", {
                let mut b = good.clone();
                let n = b.len();
                b[n - 12] ^= 0x01;
                b
            }),
            ("truncation", good[..good.len() - rec].to_vec()),
        ];
        for (what, bytes) in damage {
            std::fs::write(&path, &bytes).unwrap();
            for (chunk, window, _) in SPLITS {
                let r = restorer(
                    &catalog,
                    vec![&p1, &f],
                    std::slice::from_ref(&fe),
                    &d.path().join(format!("t-{chunk}-{window}")),
                    (chunk, window),
                );
                let err = r.restore_entry(&e1).map(|_| ()).unwrap_err();
                assert_eq!(err.kind(), crate::ErrorKind::Corruption, "{what}: {err}");
                assert!(
                    err.to_string().contains(&path.display().to_string()),
                    "{what}: {err}"
                );
            }
        }
        std::fs::write(&path, &good).unwrap();
        assert_eq!(
            rebuild(&catalog, vec![&p1, &f], vec![e1, fe], &d.path().join("ok")),
            vec![1, 11, 12, 4, 5, 15, 16, 8]
        );
    }

    /// A file the newest backup holds whole is copied byte for byte, also when its length
    /// is not a whole number of blocks and whatever the split; plain and LZ4; damage fails.
    #[test]
    fn whole_files_are_copied_exactly_in_every_split() {
        let d = tempfile::tempdir().unwrap();
        let catalog = Catalog::init(&d.path().join("cat")).unwrap();
        let f = meta("F", Mode::Full, None);
        let data: Vec<u8> = (0..(5 * BS + 1234) as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        let plain = FileEntry {
            crc32c: crc32c::crc32c(&data),
            ..fe_template(data.len() as u64)
        };
        let pp = store(&catalog, &f, &plain, &data);
        let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let z = enc.finish().unwrap();
        let lz = FileEntry {
            storage: Storage::FullLz4,
            stored_size: z.len() as u64,
            crc32c: crc32c::crc32c(&z),
            ..fe_template(data.len() as u64)
        };
        let zp = store(&catalog, &f, &lz, &z);
        for (e, p) in [(&plain, &pp), (&lz, &zp)] {
            for (chunk, window, backwards) in SPLITS {
                let t = d.path().join(format!("{:?}-{chunk}-{window}", e.storage));
                let r = restorer(&catalog, vec![&f], &[], &t, (chunk, window));
                assert_eq!(rebuilt(&r, e, backwards, &t), data);
            }
            let good = std::fs::read(p).unwrap();
            let mut bad = good.clone();
            bad[good.len() / 2] ^= 0x04;
            std::fs::write(p, &bad).unwrap();
            for (chunk, window, _) in SPLITS {
                let t = d
                    .path()
                    .join(format!("bad-{:?}-{chunk}-{window}", e.storage));
                let r = restorer(&catalog, vec![&f], &[], &t, (chunk, window));
                let err = r.restore_entry(e).map(|_| ()).unwrap_err();
                assert_eq!(err.kind(), crate::ErrorKind::Corruption, "{err}");
                assert!(err.to_string().contains(&p.display().to_string()), "{err}");
            }
            // a longer file fails too, even though its first stored_size bytes are intact
            let mut longer = good.clone();
            longer.push(0);
            std::fs::write(p, &longer).unwrap();
            let r = restorer(&catalog, vec![&f], &[], &d.path().join("long"), (1, 1));
            assert!(r.restore_entry(e).is_err());
            std::fs::write(p, &good).unwrap();
        }
    }

    fn lz4_framed(data: &[u8], frame_bytes: u64) -> (Vec<u8>, manifest::Lz4Frames) {
        let mut w = crate::backup::copy::Lz4FrameWriter::new(Vec::new(), frame_bytes);
        std::io::Write::write_all(&mut w, data).unwrap();
        let (z, stored) = w.finish().unwrap();
        (
            z,
            manifest::Lz4Frames {
                frame_bytes,
                stored,
            },
        )
    }

    /// A compressed whole file stored as LZ4 frames is decoded frame by frame on separate
    /// chunks, as a copy and beneath incremental files, with the same result as one pass;
    /// frames whose manifest description does not match the file fail.
    #[test]
    fn lz4_frames_restore_in_chunks() {
        let d = tempfile::tempdir().unwrap();
        let catalog = Catalog::init(&d.path().join("cat")).unwrap();
        let f = meta("F", Mode::Full, None);
        // a copy: 5 blocks and a bit, frames of 2 blocks
        let data: Vec<u8> = (0..(5 * BS + 1234) as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 23) as u8)
            .collect();
        let (z, frames) = lz4_framed(&data, 2 * BS as u64);
        assert_eq!(frames.stored.len(), 3);
        let e = FileEntry {
            storage: Storage::FullLz4,
            stored_size: z.len() as u64,
            crc32c: crc32c::crc32c(&z),
            lz4_frames: Some(frames.clone()),
            ..fe_template(data.len() as u64)
        };
        let zp = store(&catalog, &f, &e, &z);
        let r = restorer(&catalog, vec![&f], &[], d.path(), (1024, 128));
        assert_eq!(r.plan(&e).unwrap().chunks, 3);
        for (chunk, window, backwards) in SPLITS {
            let t = d.path().join(format!("copy-{chunk}-{window}-{backwards}"));
            let r = restorer(&catalog, vec![&f], &[], &t, (chunk, window));
            assert_eq!(rebuilt(&r, &e, backwards, &t), data);
        }
        // frame lengths that do not match the file: decoding fails or lands elsewhere
        let mut swapped = frames.clone();
        swapped.stored.swap(0, 1);
        let lying = FileEntry {
            lz4_frames: Some(swapped),
            ..e.clone()
        };
        if frames.stored[0] != frames.stored[1] {
            let r = restorer(&catalog, vec![&f], &[], &d.path().join("lie"), (1, 1));
            let err = r.restore_entry(&lying).map(|_| ()).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Corruption, "{err}");
            assert!(err.to_string().contains(&zp.display().to_string()), "{err}");
        }
        // frames of 3 blocks described as 2: each chunk decodes the wrong length
        let (z3, f3) = lz4_framed(&data, 3 * BS as u64);
        let e3 = FileEntry {
            stored_size: z3.len() as u64,
            crc32c: crc32c::crc32c(&z3),
            lz4_frames: Some(manifest::Lz4Frames {
                frame_bytes: 2 * BS as u64,
                stored: vec![f3.stored[0], f3.stored[1], 0],
            }),
            ..e.clone()
        };
        store(&catalog, &f, &e3, &z3);
        let r = restorer(&catalog, vec![&f], &[], &d.path().join("lie3"), (1, 1));
        assert_eq!(r.plan(&e3).unwrap().chunks, 3);
        let err = r.restore_entry(&e3).map(|_| ()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corruption, "{err}");

        // beneath a chain: the FULL of truncation_rule_and_newest_first in frames of 1 and
        // 2 blocks
        let full_bytes: Vec<u8> = [1u8, 2, 3, 4].iter().flat_map(|&t| page(t)).collect();
        for frame_blocks in [1u64, 2] {
            let fz = meta(&format!("FZ{frame_blocks}"), Mode::Full, None);
            let (z, frames) = lz4_framed(&full_bytes, frame_blocks * BS as u64);
            let fze = FileEntry {
                storage: Storage::FullLz4,
                stored_size: z.len() as u64,
                crc32c: crc32c::crc32c(&z),
                lz4_frames: Some(frames),
                ..fe_template(full_bytes.len() as u64)
            };
            store(&catalog, &fz, &fze, &z);
            let p1 = meta(&format!("P1-{frame_blocks}"), Mode::Page, Some(&fz.id));
            let e1 = inc(&catalog, &p1, &[(2, 20)], 6, Some(2));
            let p2 = meta(&format!("P2-{frame_blocks}"), Mode::Page, Some(&p1.id));
            let e2 = inc(&catalog, &p2, &[(0, 30), (4, 31)], 6, None);
            let r = restorer(
                &catalog,
                vec![&p2, &p1, &fz],
                &[e1.clone(), fze.clone()],
                d.path(),
                (1024, 128),
            );
            assert!(r.plan(&e2).unwrap().chunks > 1);
            assert_eq!(
                rebuild(
                    &catalog,
                    vec![&p2, &p1, &fz],
                    vec![e2, e1.clone(), fze.clone()],
                    &d.path().join(format!("chain{frame_blocks}"))
                ),
                vec![30, 2, 20, 0, 31, 0]
            );
            // a FULL longer than the result: the frames past it are read for the checksum
            let p3 = meta(&format!("P3-{frame_blocks}"), Mode::Page, Some(&fz.id));
            let e3 = inc(&catalog, &p3, &[(0, 40)], 2, None);
            assert_eq!(
                rebuild(
                    &catalog,
                    vec![&p3, &fz],
                    vec![e3, fze],
                    &d.path().join(format!("short{frame_blocks}"))
                ),
                vec![40, 2]
            );
        }
    }

    /// Writes the block checksums object of backup `b` (its files `entries` with the page
    /// tags each block holds) and records it in `b`.
    fn write_crcs(catalog: &Catalog, b: &mut BackupMeta, files: &[(&FileEntry, Vec<(u32, u8)>)]) {
        let mut w = crate::format::blockcrc::Writer::new(Vec::new(), BS as u32).unwrap();
        for (e, pages) in files {
            let crcs: Vec<(u32, u32)> = pages
                .iter()
                .map(|&(n, t)| (n, crc32c::crc32c(&page(t))))
                .collect();
            match e.storage {
                Storage::Full => w
                    .add_whole(&e.path, &crcs.iter().map(|c| c.1).collect::<Vec<_>>())
                    .unwrap(),
                _ => w.add_inc(&e.path, &crcs).unwrap(),
            }
        }
        let (bytes, r) = w.finish().unwrap();
        let key = format!(
            "{}/{}",
            b.key().unwrap(),
            crate::format::blockcrc::FILE_NAME
        );
        catalog.repo().put_new(&key, &bytes).unwrap();
        b.block_crcs = Some(r);
    }

    /// Checksum mode with block checksums over destinations longer, shorter, empty and
    /// partly equal: the result is what a fresh restore rebuilds (truncation and limit
    /// rules included), only differing blocks are written, a dry run counts the same bytes,
    /// and equal blocks are kept unread. Local and ranged (non-local) stores.
    #[test]
    fn checksum_mode_by_block_checksums_equals_rebuild() {
        let d = tempfile::tempdir().unwrap();
        let local = Catalog::init(&d.path().join("cat")).unwrap();
        let mem = Catalog::with_repo(
            Path::new("/mem"),
            std::sync::Arc::new(crate::repo::MemRepo::new()),
        );
        for (ci, catalog) in [local, mem].iter().enumerate() {
            let (mut f, fe) = full_backup(catalog, &[1, 2, 3, 4]);
            let mut p1 = meta("P1", Mode::Page, Some("F"));
            let e1 = inc(catalog, &p1, &[(2, 20)], 6, Some(2));
            let mut p2 = meta("P2", Mode::Page, Some("P1"));
            let e2 = inc(catalog, &p2, &[(0, 30), (4, 31)], 6, None);
            write_crcs(
                catalog,
                &mut f,
                &[(&fe, vec![(0, 1), (1, 2), (2, 3), (3, 4)])],
            );
            write_crcs(catalog, &mut p1, &[(&e1, vec![(2, 20)])]);
            write_crcs(catalog, &mut p2, &[(&e2, vec![(0, 30), (4, 31)])]);
            let want: Vec<u8> = [30u8, 2, 20, 0, 31, 0]
                .iter()
                .flat_map(|&t| page(t))
                .collect();
            let dests: [Vec<u8>; 5] = [
                [30u8, 9, 20, 7, 31, 5, 5, 5]
                    .iter()
                    .flat_map(|&t| page(t))
                    .collect(),
                page(1),
                Vec::new(),
                vec![0u8; 6 * BS],
                want.clone(),
            ];
            for (di, dest) in dests.iter().enumerate() {
                let mut written = Vec::new();
                for dry in [true, false] {
                    let t = d.path().join(format!("t{ci}-{di}-{dry}"));
                    let r = restorer(
                        catalog,
                        vec![&p2, &p1, &f],
                        &[e1.clone(), fe.clone()],
                        &t,
                        (2, 1),
                    );
                    std::fs::write(t.join("base/5/100"), dest).unwrap();
                    let older: Vec<HashMap<String, FileEntry>> = r.older.clone();
                    let crcs = incremental::load_crcs(
                        catalog,
                        &r.chain,
                        std::slice::from_ref(&e2),
                        &older,
                    )
                    .unwrap();
                    let no = |_: &str| false;
                    let ip = incremental::InPlace {
                        r: &r,
                        mode: incremental::IncrementalMode::Checksum,
                        x: None,
                        start_of: HashMap::new(),
                        relseg_size: 131072,
                        jobs: 2,
                        dry,
                        sparse: &no,
                        written: Default::default(),
                        kept: Default::default(),
                        rewritten: Default::default(),
                        created: Default::default(),
                        crcs: Some(crcs),
                        changes: None,
                        kept_unread: Default::default(),
                        dest_read: Default::default(),
                    };
                    ip.sync_files(&[&e2], 2, &[]).unwrap();
                    let got = std::fs::read(t.join("base/5/100")).unwrap();
                    if dry {
                        assert_eq!(&got, dest, "dry run wrote ({ci}, {di})");
                    } else {
                        assert_eq!(got, want, "result ({ci}, {di})");
                    }
                    written.push(ip.written.load(std::sync::atomic::Ordering::Relaxed));
                    if di == 4 {
                        assert_eq!(written[written.len() - 1], 0, "nothing differs");
                        assert_eq!(ip.kept.load(std::sync::atomic::Ordering::Relaxed), 6);
                    }
                }
                assert_eq!(written[0], written[1], "dry and real counts ({ci}, {di})");
            }
        }
    }
}
