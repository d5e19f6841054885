//! `walnut verify-restore`: the restore drill. "An untested backup is no backup."
//!
//! 1. Restores a backup (through [`crate::restore::restore`]) into a scratch directory (or
//!    one given), its tablespaces mapped below it.
//! 2. Starts the instance's PostgreSQL major on it, as the cluster's OS user when run as
//!    root, listening only on a Unix socket in a private directory (mode 0700), with its
//!    own `pg_hba.conf` (local trust: nobody else can reach the socket), `archive_mode=off`
//!    (a drill never archives into the real catalog), no synchronous standbys and no
//!    primary_conninfo. Recovery stops at the backup's consistency point
//!    (`recovery_target=immediate`) or at the target given, and the copy is promoted.
//! 3. In every database that accepts connections: `CREATE EXTENSION IF NOT EXISTS
//!    amcheck` (it is a scratch copy), `bt_index_check(index, heapallindexed => true)` on
//!    every valid B-tree index, and `SELECT count(*)` on every table and populated
//!    materialized view.
//! 4. Stops the server cleanly and, when the cluster has data checksums, runs
//!    `pg_checksums --check`.
//!
//! Every failure names the relation and its file (`pg_relation_filepath`). On success the
//! scratch directory is removed; on failure it is kept and named. `--max-time` bounds the
//! whole run: when it passes, the server is stopped and the run fails (a restore already
//! running in its thread finishes writing into the kept directory in the background of a
//! library caller; the CLI exits). The result is recorded in the catalog as a dated,
//! append-only record of the backup:
//! ```text
//! instances/NAME/backups/ID/verify/<YYYYMMDDTHHMMSSZ>[-n].json   VerifyReport (JSON)
//! ```
//! plus the instance-level `verify-restore` record of [`crate::verify_record`];
//! `walnut show` and `walnut metrics` read them.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backup::meta::{self, BackupMeta};
use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::progress::Progress;
use crate::restore::{Recovery, RecoveryAction, RecoveryTarget, RestoreOptions};

/// The directory of a backup's verification records.
pub const VERIFY_DIR: &str = "verify";
const RECORD_FORMAT: u32 = 1;
/// A record is a few kilobytes (a few hundred failures at most are kept).
const MAX_RECORD: u64 = 4 << 20;
const MAX_FAILURES: usize = 200;

/// What `verify-restore` does: plain options, checked by [`run`] before anything is written.
pub struct VerifyOptions {
    pub backup_id: Option<String>,
    /// Where recovery stops; `Latest` is the end of the archive. The CLI passes
    /// `Immediate` when no target is given.
    pub recovery: Recovery,
    /// The scratch directory (must be absent or empty); default: a new one in the
    /// system's temp directory.
    pub dir: Option<PathBuf>,
    pub max_time: Option<Duration>,
    /// PostgreSQL's binary directory (default: found for the backup's major).
    pub pg_bin: Option<PathBuf>,
    /// The OS user the server runs as when walnut runs as root (default `postgres`).
    pub os_user: Option<String>,
    /// The database role to connect as (default: the instance's, else `postgres`).
    pub db_user: Option<String>,
    pub jobs: usize,
    pub progress: Arc<dyn Progress>,
}

/// One step of the drill.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Step {
    pub name: String,
    pub ok: bool,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What was checked in one database.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DbReport {
    pub name: String,
    pub indexes_checked: u64,
    pub tables_counted: u64,
    pub rows: u64,
    pub amcheck_seconds: f64,
    pub count_seconds: f64,
    pub failures: Vec<String>,
}

/// The result of one drill (also the record stored in the catalog).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VerifyReport {
    pub format: u32,
    pub instance: String,
    pub backup_id: String,
    pub success: bool,
    /// When the drill started and ended (UTC) and its Unix end time.
    pub start_time: String,
    pub end_time: String,
    pub end_epoch: i64,
    pub duration_seconds: f64,
    pub recovery_target: String,
    pub pg_bin: String,
    /// The scratch directory, and whether it was kept (on failure).
    pub directory: String,
    pub kept: bool,
    pub data_checksums: bool,
    pub steps: Vec<Step>,
    pub databases: Vec<DbReport>,
    /// Every problem found, each naming the relation and its file where there is one.
    pub failures: Vec<String>,
    /// The error that stopped the drill, if one did.
    pub error: Option<String>,
}

impl VerifyReport {
    fn fail(&mut self, msg: String) {
        if self.failures.len() < MAX_FAILURES {
            self.failures.push(msg);
        }
    }
}

fn now_secs() -> i64 {
    crate::lifecycle::records::now_secs()
}

/// A clock with the `--max-time` budget.
#[derive(Clone, Copy)]
struct Deadline {
    start: Instant,
    max: Option<Duration>,
}

impl Deadline {
    fn remaining(&self) -> Option<Duration> {
        self.max.map(|m| m.saturating_sub(self.start.elapsed()))
    }

    fn check(&self, during: &str) -> Result<()> {
        match (self.max, self.remaining()) {
            (Some(m), Some(r)) if r.is_zero() => Err(Error::invalid(format!(
                "--max-time {} s exceeded during {during}",
                m.as_secs()
            ))),
            _ => Ok(()),
        }
    }

    fn expired(&self) -> bool {
        self.remaining().is_some_and(|r| r.is_zero())
    }
}

/// The OS identity the server runs as: `None` when we are not root (we run it ourselves).
#[derive(Clone)]
struct OsUser {
    name: String,
    uid: u32,
    gid: u32,
}

fn os_user(name: Option<&str>) -> Result<Option<OsUser>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let name = name.unwrap_or("postgres");
    let u = nix::unistd::User::from_name(name)
        .map_err(|e| Error::invalid(format!("cannot look up OS user \"{name}\": {e}")))?
        .ok_or_else(|| {
            Error::invalid(format!(
                "OS user \"{name}\" does not exist (PostgreSQL refuses to run as root; give --os-user)"
            ))
        })?;
    Ok(Some(OsUser {
        name: name.to_string(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    }))
}

/// A command that runs as `user` when given (we are root), else as ourselves.
fn command(prog: &Path, user: Option<&OsUser>) -> Command {
    let mut c = Command::new(prog);
    if let Some(u) = user {
        c.uid(u.uid).gid(u.gid);
        c.env("USER", &u.name).env("LOGNAME", &u.name);
    }
    c.stdin(Stdio::null());
    c
}

/// The major version `DIR/postgres --version` reports.
fn bin_major(dir: &Path) -> Option<u32> {
    let out = Command::new(dir.join("postgres"))
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    // "postgres (PostgreSQL) 15.8 (Debian 15.8-1)"
    let v = s.split(')').nth(1)?.split_whitespace().next()?;
    v.split('.').next()?.parse().ok()
}

/// PostgreSQL's binary directory for `major`: the one given (checked), else pg_config's,
/// the Debian and RPM layouts, then the PATH — the first whose `postgres` is that major.
pub fn find_pg_bin(given: Option<&Path>, major: u32) -> Result<PathBuf> {
    if let Some(d) = given {
        return match bin_major(d) {
            Some(m) if m == major => Ok(d.to_path_buf()),
            Some(m) => Err(Error::invalid(format!(
                "--pg-bin \"{}\" holds PostgreSQL {m}, the backup is of PostgreSQL {major}",
                d.display()
            ))),
            None => Err(Error::invalid(format!(
                "--pg-bin \"{}\": no runnable postgres there",
                d.display()
            ))),
        };
    }
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            cands.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    cands.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    cands.push(PathBuf::from(format!("/usr/pgsql-{major}/bin")));
    if let Some(path) = std::env::var_os("PATH") {
        cands.extend(std::env::split_paths(&path));
    }
    for c in &cands {
        if c.join("postgres").is_file() && bin_major(c) == Some(major) {
            return Ok(c.clone());
        }
    }
    Err(Error::not_found(format!(
        "no PostgreSQL {major} server binaries found (pg_config, /usr/lib/postgresql/{major}/bin, /usr/pgsql-{major}/bin, PATH); give --pg-bin"
    )))
}

/// The tablespaces of backup `b`: (oid, original location), from its manifest-covered
/// `tablespace_map` (checked against its CRC), else the copy beside the manifest.
fn tablespaces(catalog: &Catalog, b: &BackupMeta) -> Result<Vec<(String, String)>> {
    let repo = catalog.repo();
    let bkey = b.key()?;
    let entries = crate::backup::stored::manifest_entries(repo, &bkey)?;
    let what = format!("tablespace_map of backup {}", b.id);
    let bytes = match entries
        .iter()
        .find(|e| e.path == crate::restore::plan::SPCMAP_ENTRY)
    {
        Some(e) => {
            let key = format!("{bkey}/{}", e.stored_path());
            let data = repo.get(&key)?.to_vec();
            if crc32c::crc32c(&data) != e.crc32c {
                return Err(Error::corruption(format!(
                    "{}: does not match its checksum",
                    crate::backup::stored::what(repo, &key)
                )));
            }
            data
        }
        None => match repo.get(&format!("{bkey}/tablespace_map")) {
            Ok(d) => d.to_vec(),
            Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        },
    };
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::corruption(format!("{what}: not UTF-8 text")))?;
    crate::restore::plan::parse_tablespace_map(&text, &what)
}

/// Picks the backup: the given one, or the newest OK one that can reach the target (for a
/// named restore point: one that stops before the point, found in the indexes).
fn choose<'a>(
    catalog: &Catalog,
    instance: &str,
    list: &'a [BackupMeta],
    opts: &VerifyOptions,
) -> Result<&'a BackupMeta> {
    let (target, _) = crate::restore::plan::check_recovery(&opts.recovery)?;
    let point = match &opts.recovery.target {
        RecoveryTarget::Name(n) if opts.backup_id.is_none() => {
            crate::archive::WalArchive::open(catalog, instance)?.find_restore_point(n)?
        }
        _ => None,
    };
    let chain = crate::restore::choose_backup_on(list, opts.backup_id.as_deref(), &target, |b| {
        point.is_none_or(|(_, lsn)| b.stop_lsn.is_some_and(|s| s <= lsn))
    })?;
    chain
        .first()
        .copied()
        .ok_or_else(|| Error::not_found("no backup to verify"))
}

fn target_text(r: &RecoveryTarget) -> String {
    match r {
        RecoveryTarget::Latest => "latest".into(),
        RecoveryTarget::Immediate => "immediate".into(),
        RecoveryTarget::Time { text, .. } => format!("time {text}"),
        RecoveryTarget::Xid { xid, .. } => format!("xid {xid}"),
        RecoveryTarget::Lsn { lsn, .. } => format!("lsn {lsn}"),
        RecoveryTarget::Name(n) => format!("name {n}"),
    }
}

/// The scratch directory: the given one (absent or empty; created), else a new one in the
/// temp directory. Returns it and whether we created it.
fn make_workdir(given: Option<&Path>, id: &str) -> Result<(PathBuf, bool)> {
    if let Some(d) = given {
        let d = std::path::absolute(d).ctx("resolve", d)?;
        match std::fs::read_dir(&d) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(Error::invalid(format!(
                        "-D \"{}\" is not empty: give a new or empty directory",
                        d.display()
                    )));
                }
                return Ok((d, false));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&d).ctx("create directory", &d)?;
                return Ok((d, true));
            }
            Err(e) => return Err(Error::io("read directory", &d, e)),
        }
    }
    let base = std::env::temp_dir();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for n in 0..100u32 {
        let d = base.join(format!(
            "walnut-verify-{id}-{}-{:08x}",
            std::process::id(),
            nanos.wrapping_add(n)
        ));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok((d, true)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("create directory", &d, e)),
        }
    }
    Err(Error::conflict(format!(
        "cannot create a scratch directory in \"{}\"",
        base.display()
    )))
}

/// Gives everything below `root` (not following links) to `u`.
fn chown_tree(root: &Path, u: &OsUser) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(u.uid), Some(u.gid)).ctx("chown", &p)?;
        let md = std::fs::symlink_metadata(&p).ctx("stat", &p)?;
        if md.is_dir() {
            for e in std::fs::read_dir(&p).ctx("read directory", &p)? {
                stack.push(e.ctx("read directory", &p)?.path());
            }
        }
    }
    Ok(())
}

/// A free TCP port number (the server listens only on its Unix socket, whose name carries
/// the number; a free one keeps it apart from any server of this host anyway).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::io("bind", Path::new("127.0.0.1:0"), e))?;
    let p = l
        .local_addr()
        .map_err(|e| Error::io("bind", Path::new("127.0.0.1:0"), e))?
        .port();
    Ok(p)
}

/// The scratch server: the postmaster is our child (started directly, no pg_ctl), so it
/// is stopped by its PID, and on drop too.
struct Server {
    child: Child,
    sock: PathBuf,
    port: u16,
    log: PathBuf,
    user: String,
}

impl Server {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The end of the server log, for messages.
    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(8)..].join(" | ")
    }

    fn signal(&self, s: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, s);
    }

    /// Fast shutdown (SIGINT), waited for up to `wait`; then immediate (SIGQUIT). Returns
    /// whether the fast shutdown completed (a clean stop).
    fn stop(&mut self, wait: Duration) -> bool {
        if !self.running() {
            return false;
        }
        self.signal(nix::sys::signal::Signal::SIGINT);
        let t0 = Instant::now();
        while t0.elapsed() < wait {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
        false
    }

    fn kill(&mut self) {
        if self.running() {
            self.signal(nix::sys::signal::Signal::SIGQUIT);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if !self.running() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn connect(&self, db: &str, timeout: Option<Duration>) -> Result<postgres::Client> {
        let mut c = postgres::Config::new();
        c.host_path(&self.sock)
            .port(self.port)
            .user(&self.user)
            .dbname(db)
            .application_name("walnut verify-restore")
            .connect_timeout(Duration::from_secs(10));
        if let Some(t) = timeout {
            // the rest of --max-time bounds every statement
            c.options(&format!(
                "-c statement_timeout={}",
                t.as_millis().clamp(1, i32::MAX as u128)
            ));
        }
        c.connect(postgres::NoTls).map_err(|e| {
            Error::server(format!(
                "could not connect to the scratch server (socket {}, port {}, database \"{db}\", user \"{}\"): {e}",
                self.sock.display(),
                self.port,
                self.user
            ))
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The message of a database error (without the crate's "db error: " prefix).
fn db_msg(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.severity(), d.message()),
        None => e.to_string(),
    }
}

/// Runs the drill; the report says whether it passed. Errors are only for options that
/// cannot be used (nothing was written then); a drill that fails after it began is a
/// report with `success: false` (and a kept directory).
pub fn run(catalog: &Catalog, instance: &str, opts: &VerifyOptions) -> Result<VerifyReport> {
    let dl = Deadline {
        start: Instant::now(),
        max: opts.max_time,
    };
    let start_secs = now_secs();
    // every check before the first write
    let cfg = catalog.instance(instance)?;
    crate::restore::plan::check_recovery(&opts.recovery)?;
    let list = meta::list(catalog, instance)?;
    let b = choose(catalog, instance, &list, opts)?.clone();
    let bin = find_pg_bin(opts.pg_bin.as_deref(), b.pg_major)?;
    let user = os_user(opts.os_user.as_deref())?;
    let spcs = tablespaces(catalog, &b)?;
    let db_user = opts
        .db_user
        .clone()
        .or_else(|| cfg.user.clone())
        .unwrap_or_else(|| "postgres".to_string());
    let (work, created) = make_workdir(opts.dir.as_deref(), &b.id)?;

    let mut rep = VerifyReport {
        format: RECORD_FORMAT,
        instance: instance.to_string(),
        backup_id: b.id.clone(),
        start_time: meta::format_utc(start_secs),
        recovery_target: target_text(&opts.recovery.target),
        pg_bin: bin.display().to_string(),
        directory: work.display().to_string(),
        ..Default::default()
    };
    let r = drill(
        catalog,
        instance,
        opts,
        &b,
        &bin,
        user.as_ref(),
        &spcs,
        &db_user,
        &work,
        dl,
        &mut rep,
    );
    if let Err(e) = r {
        rep.error = Some(e.to_string());
    }
    rep.success = rep.error.is_none() && rep.failures.is_empty();
    let end = now_secs();
    rep.end_time = meta::format_utc(end);
    rep.end_epoch = end;
    rep.duration_seconds = dl.start.elapsed().as_secs_f64();
    if rep.success {
        let removed = if created {
            std::fs::remove_dir_all(&work)
        } else {
            clear_dir(&work)
        };
        if let Err(e) = removed {
            log::warn!(
                "could not remove scratch directory \"{}\": {e}",
                work.display()
            );
            rep.kept = true;
        }
    } else if !work.join("data").exists() {
        // the restore refused before writing anything: nothing to keep
        let _ = if created {
            std::fs::remove_dir_all(&work)
        } else {
            clear_dir(&work)
        };
        rep.kept = false;
    } else {
        rep.kept = true;
    }
    if let Err(e) = record(catalog, &rep) {
        log::warn!("could not record this verify-restore run in the catalog: {e}");
    }
    let detail = serde_json::json!({
        "backup_id": rep.backup_id,
        "duration_seconds": rep.duration_seconds,
        "failures": rep.failures,
        "error": rep.error,
    });
    if let Err(e) =
        crate::verify_record::record(catalog, instance, "verify-restore", rep.success, detail)
    {
        log::warn!("could not record this verify-restore run for monitoring: {e}");
    }
    Ok(rep)
}

fn clear_dir(d: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(d)? {
        let p = e?.path();
        if std::fs::symlink_metadata(&p)?.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// Times `f` as step `name`.
fn step<T>(
    rep: &mut VerifyReport,
    name: &str,
    f: impl FnOnce(&mut VerifyReport) -> Result<T>,
) -> Result<T> {
    let t0 = Instant::now();
    log::info!("verify-restore: {name}");
    let r = f(rep);
    rep.steps.push(Step {
        name: name.to_string(),
        ok: r.is_ok(),
        seconds: t0.elapsed().as_secs_f64(),
        detail: r.as_ref().err().map(|e| e.to_string()),
    });
    r
}

#[allow(clippy::too_many_arguments)]
fn drill(
    catalog: &Catalog,
    instance: &str,
    opts: &VerifyOptions,
    b: &BackupMeta,
    bin: &Path,
    user: Option<&OsUser>,
    spcs: &[(String, String)],
    db_user: &str,
    work: &Path,
    dl: Deadline,
    rep: &mut VerifyReport,
) -> Result<()> {
    let data = work.join("data");
    let sock = work.join("sock");
    let log = work.join("postgres.log");
    // restore, in a thread so that --max-time can stop waiting for it
    step(rep, "restore", |_| {
        let mappings: Vec<(PathBuf, PathBuf)> = spcs
            .iter()
            .map(|(oid, path)| (PathBuf::from(path), work.join("tablespaces").join(oid)))
            .collect();
        let mut recovery = opts.recovery.clone();
        recovery.action = Some(RecoveryAction::Promote);
        let ropts = RestoreOptions {
            backup_id: Some(b.id.clone()),
            target: data.clone(),
            jobs: opts.jobs.max(1),
            mappings,
            recovery,
            force: false,
            progress: opts.progress.clone(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let cat = catalog.clone();
        let inst = instance.to_string();
        std::thread::spawn(move || {
            let _ = tx.send(crate::restore::restore(&cat, &inst, &ropts));
        });
        let r = match dl.remaining() {
            Some(t) => match rx.recv_timeout(t) {
                Ok(r) => r,
                Err(_) => {
                    return dl.check("the restore").and(Err(Error::invalid(
                        "--max-time exceeded during the restore",
                    )))
                }
            },
            None => rx
                .recv()
                .map_err(|_| Error::invalid("the restore thread ended without a result"))?,
        };
        r.map(|_| ())
    })?;
    dl.check("the restore")?;

    // the server's own files
    std::fs::create_dir_all(&sock).ctx("create directory", &sock)?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o700)).ctx("chmod", &sock)?;
    let hba = work.join("walnut_hba.conf");
    std::fs::write(
        &hba,
        "# walnut verify-restore: only the private socket, only local\nlocal all all trust\n",
    )
    .ctx("write", &hba)?;
    let ident = work.join("walnut_ident.conf");
    std::fs::write(&ident, "").ctx("write", &ident)?;
    // Debian-style clusters keep postgresql.conf outside the data directory: the backup
    // has none then, and the server needs one.
    let conf = data.join("postgresql.conf");
    if !conf.exists() {
        std::fs::write(&conf, "# written by walnut verify-restore\n").ctx("write", &conf)?;
    }
    std::fs::File::create(&log).ctx("create", &log)?;
    if let Some(u) = user {
        chown_tree(work, u)?;
    }
    let control = crate::pgcontrol::ControlFile::read_from_pgdata(&data)?;
    rep.data_checksums = control.data_checksums();

    // start and recover
    let port = free_port()?;
    let mut srv = step(rep, "start and recover", |_| {
        let logf = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .ctx("open", &log)?;
        let logf2 = logf.try_clone().ctx("open", &log)?;
        let mut c = command(&bin.join("postgres"), user);
        c.arg("-D").arg(&data);
        let settings: Vec<(&str, String)> = vec![
            ("port", port.to_string()),
            ("listen_addresses", String::new()),
            ("unix_socket_directories", sock.display().to_string()),
            ("unix_socket_permissions", "0700".into()),
            ("hba_file", hba.display().to_string()),
            ("ident_file", ident.display().to_string()),
            ("archive_mode", "off".into()),
            ("synchronous_standby_names", String::new()),
            ("primary_conninfo", String::new()),
            ("primary_slot_name", String::new()),
            ("ssl", "off".into()),
            ("logging_collector", "off".into()),
            ("cluster_name", "walnut-verify".into()),
        ];
        for (k, v) in settings {
            c.arg("-c").arg(format!("{k}={v}"));
        }
        c.stdout(logf).stderr(logf2);
        // its own process group: a terminal's ^C reaches walnut, which stops it
        c.process_group(0);
        let child = c
            .spawn()
            .map_err(|e| Error::io("start", &bin.join("postgres"), e))?;
        let mut srv = Server {
            child,
            sock: sock.clone(),
            port,
            log: log.clone(),
            user: db_user.to_string(),
        };
        wait_promoted(&mut srv, dl)?;
        Ok(srv)
    })?;

    // the checks
    let r = step(rep, "amcheck and count", |rep| check_all(&srv, dl, rep));
    let stop_wait = dl.remaining().unwrap_or(Duration::from_secs(300));
    let clean = step(rep, "stop", |_| {
        if srv.stop(stop_wait) {
            Ok(())
        } else {
            Err(Error::server(format!(
                "the scratch server did not shut down cleanly: {}",
                srv.log_tail()
            )))
        }
    });
    r?;
    clean?;
    dl.check("the stop")?;
    if rep.data_checksums {
        step(rep, "pg_checksums", |rep| {
            pg_checksums(bin, user, &data, dl, rep)
        })?;
    } else {
        rep.steps.push(Step {
            name: "pg_checksums".into(),
            ok: true,
            seconds: 0.0,
            detail: Some("skipped: the cluster has no data checksums".into()),
        });
    }
    Ok(())
}

/// Waits until the server accepts connections and has left recovery (promoted).
fn wait_promoted(srv: &mut Server, dl: Deadline) -> Result<()> {
    loop {
        if !srv.running() {
            return Err(Error::server(format!(
                "the scratch server stopped during recovery: {}",
                srv.log_tail()
            )));
        }
        if dl.expired() {
            srv.kill();
            return dl.check("recovery");
        }
        if let Ok(mut c) = srv
            .connect("postgres", None)
            .or_else(|_| srv.connect("template1", None))
        {
            if let Ok(row) = c.query_one("select pg_is_in_recovery()", &[]) {
                let rec: bool = row.get(0);
                if !rec {
                    return Ok(());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn check_all(srv: &Server, dl: Deadline, rep: &mut VerifyReport) -> Result<()> {
    // Test hook: the checks wait for the deadline, so that --max-time can be tested on a
    // drill that would otherwise finish within a second.
    if std::env::var_os("WALNUT_TEST_VERIFY_HOLD").is_some() && dl.max.is_some() {
        while !dl.expired() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // a failure once the budget is spent (a statement timeout: every statement is bounded
    // by what is left of it) is the budget's: said as such, not as the server's error
    let over = |e: Error| match dl.check("the checks") {
        Err(d) => d,
        Ok(()) => e,
    };
    let mut c = srv
        .connect("postgres", dl.remaining())
        .or_else(|_| srv.connect("template1", dl.remaining()))
        .map_err(over)?;
    let dbs: Vec<String> = c
        .query(
            "select datname from pg_database where datallowconn order by datname",
            &[],
        )
        .map_err(|e| over(e.into()))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(c);
    for db in dbs {
        dl.check(&format!("the checks of database \"{db}\""))?;
        let mut d = DbReport {
            name: db.clone(),
            ..Default::default()
        };
        let r = check_db(srv, dl, &mut d);
        if let Err(e) = r {
            d.failures.push(format!("database \"{db}\": {e}"));
        }
        for f in &d.failures {
            rep.fail(f.clone());
        }
        rep.databases.push(d);
    }
    dl.check("the checks")
}

fn check_db(srv: &Server, dl: Deadline, d: &mut DbReport) -> Result<()> {
    let db = d.name.clone();
    let mut c = srv.connect(&db, dl.remaining())?;
    let t0 = Instant::now();
    c.batch_execute("create extension if not exists amcheck")
        .map_err(|e| {
            Error::server(format!(
                "database \"{db}\": create extension amcheck: {}",
                db_msg(&e)
            ))
        })?;
    let idx = c.query(
        "select i.indexrelid, quote_ident(n.nspname) || '.' || quote_ident(ic.relname), \
                coalesce(pg_relation_filepath(i.indexrelid), '?'), \
                quote_ident(tn.nspname) || '.' || quote_ident(tc.relname), \
                coalesce(pg_relation_filepath(i.indrelid), '?') \
         from pg_index i \
         join pg_class ic on ic.oid = i.indexrelid \
         join pg_am a on a.oid = ic.relam \
         join pg_namespace n on n.oid = ic.relnamespace \
         join pg_class tc on tc.oid = i.indrelid \
         join pg_namespace tn on tn.oid = tc.relnamespace \
         where a.amname = 'btree' and i.indisvalid and i.indisready \
           and ic.relpersistence <> 't' and ic.relkind = 'i' \
         order by i.indexrelid",
        &[],
    )?;
    for row in idx {
        if dl.expired() {
            break;
        }
        let oid: u32 = row.get(0);
        let name: String = row.get(1);
        let file: String = row.get(2);
        let table: String = row.get(3);
        let tfile: String = row.get(4);
        match c.execute(
            "select bt_index_check(index => $1::oid::regclass, heapallindexed => true)",
            &[&oid],
        ) {
            Ok(_) => d.indexes_checked += 1,
            Err(e) => d.failures.push(format!(
                "amcheck: database \"{db}\": index {name} (file {file}) of table {table} (file {tfile}): {}",
                db_msg(&e)
            )),
        }
    }
    d.amcheck_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let tables = c.query(
        "select quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
                coalesce(pg_relation_filepath(c.oid), '?') \
         from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where c.relkind in ('r', 'm') and c.relpersistence <> 't' \
           and (c.relkind <> 'm' or c.relispopulated) \
         order by c.oid",
        &[],
    )?;
    for row in tables {
        if dl.expired() {
            break;
        }
        let name: String = row.get(0);
        let file: String = row.get(1);
        match c.query_one(&format!("select count(*) from only {name}"), &[]) {
            Ok(r) => {
                let n: i64 = r.get(0);
                d.rows += n.max(0) as u64;
                d.tables_counted += 1;
            }
            Err(e) => d.failures.push(format!(
                "count: database \"{db}\": table {name} (file {file}): {}",
                db_msg(&e)
            )),
        }
    }
    d.count_seconds = t1.elapsed().as_secs_f64();
    Ok(())
}

/// `pg_checksums --check` on the stopped copy; every failure line names its file and block.
fn pg_checksums(
    bin: &Path,
    user: Option<&OsUser>,
    data: &Path,
    dl: Deadline,
    rep: &mut VerifyReport,
) -> Result<()> {
    let prog = bin.join("pg_checksums");
    let mut c = command(&prog, user);
    c.arg("--check").arg("-D").arg(data);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| Error::io("run", &prog, e))?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().ctx("wait for", &prog)? {
            break st;
        }
        if dl.remaining().is_some_and(|r| r.is_zero()) {
            let _ = child.kill();
            let _ = child.wait();
            return dl.check("pg_checksums");
        }
        if t0.elapsed() > Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(100));
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if status.success() {
        return Ok(());
    }
    let mut n = 0;
    for l in err.lines() {
        if l.contains("checksum verification failed") {
            rep.fail(format!(
                "pg_checksums: {}",
                l.trim_start_matches("pg_checksums: error: ")
            ));
            n += 1;
        }
    }
    if n == 0 {
        return Err(Error::server(format!(
            "pg_checksums --check failed ({status}): {}{}",
            err.trim(),
            out.trim()
        )));
    }
    Ok(())
}

fn verify_dir(instance: &str, id: &str) -> Result<String> {
    Ok(format!("{}/{VERIFY_DIR}", meta::backup_key(instance, id)?))
}

/// Writes the report as a new dated record of its backup.
pub fn record(catalog: &Catalog, rep: &VerifyReport) -> Result<()> {
    let dir = verify_dir(&rep.instance, &rep.backup_id)?;
    let mut json = serde_json::to_vec_pretty(rep)?;
    json.push(b'\n');
    let repo = catalog.repo();
    let st = meta::stamp(rep.end_epoch);
    for n in 0..1000u32 {
        let name = if n == 0 {
            format!("{st}.json")
        } else {
            format!("{st}-{n}.json")
        };
        match repo.put_new(&format!("{dir}/{name}"), &json) {
            Err(e) if e.kind() == ErrorKind::Conflict => continue,
            other => return other,
        }
    }
    Err(Error::conflict(format!(
        "{}/{dir}: 1000 records in one second",
        repo.location()
    )))
}

/// The newest verify-restore record of backup `id`, if any. One that cannot be read or
/// parsed is an error (damage is never "not verified").
pub fn latest(catalog: &Catalog, instance: &str, id: &str) -> Result<Option<VerifyReport>> {
    let dir = verify_dir(instance, id)?;
    let repo = catalog.repo();
    let Some((st, n)) = repo
        .list(&dir)?
        .objects
        .iter()
        .filter_map(|o| meta::parse_record_name(&o.name))
        .max()
    else {
        return Ok(None);
    };
    let name = if n == 0 {
        format!("{st}.json")
    } else {
        format!("{st}-{n}.json")
    };
    let key = format!("{dir}/{name}");
    let what = || format!("{}/{key}", repo.location());
    if repo.head(&key)?.is_some_and(|h| h.size > MAX_RECORD) {
        return Err(Error::corruption(format!(
            "{}: larger than {MAX_RECORD} bytes",
            what()
        )));
    }
    let bytes = repo.get(&key)?;
    let rep: VerifyReport = serde_json::from_slice(&bytes)
        .map_err(|e| Error::corruption(format!("{}: {e}", what())))?;
    if rep.backup_id != id || rep.instance != instance {
        return Err(Error::corruption(format!(
            "{}: record of backup {} of \"{}\" in the wrong place",
            what(),
            rep.backup_id,
            rep.instance
        )));
    }
    Ok(Some(rep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_new_files_and_the_newest_wins() {
        let repo = crate::repo::MemRepo::new().refusing_delete();
        let cat = Catalog::with_repo(Path::new("/mem"), std::sync::Arc::new(repo));
        assert_eq!(latest(&cat, "db", "B1").unwrap(), None);
        let mut r = VerifyReport {
            format: RECORD_FORMAT,
            instance: "db".into(),
            backup_id: "B1".into(),
            success: true,
            end_epoch: 1_800_000_000,
            ..Default::default()
        };
        record(&cat, &r).unwrap();
        r.success = false;
        r.failures.push("amcheck: x".into());
        record(&cat, &r).unwrap();
        let files = cat
            .repo()
            .list("instances/db/backups/B1/verify")
            .unwrap()
            .objects;
        assert_eq!(files.len(), 2, "one file per record, none rewritten");
        let got = latest(&cat, "db", "B1").unwrap().unwrap();
        assert!(!got.success);
        assert_eq!(got.failures, vec!["amcheck: x".to_string()]);
        assert!(record(
            &cat,
            &VerifyReport {
                backup_id: "../x".into(),
                instance: "db".into(),
                ..Default::default()
            }
        )
        .is_err());
    }

    #[test]
    fn a_record_in_the_wrong_place_is_damage() {
        let repo = crate::repo::MemRepo::new();
        let cat = Catalog::with_repo(Path::new("/mem"), std::sync::Arc::new(repo));
        let r = VerifyReport {
            instance: "db".into(),
            backup_id: "B2".into(),
            ..Default::default()
        };
        let json = serde_json::to_vec(&r).unwrap();
        cat.repo()
            .put_new(
                "instances/db/backups/B1/verify/20261129T101010Z.json",
                &json,
            )
            .unwrap();
        let e = latest(&cat, "db", "B1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption);
    }

    #[test]
    fn the_deadline_expires() {
        let d = Deadline {
            start: Instant::now() - Duration::from_secs(5),
            max: Some(Duration::from_secs(1)),
        };
        assert!(d.expired());
        assert!(d.check("x").unwrap_err().to_string().contains("--max-time"));
        let none = Deadline {
            start: Instant::now(),
            max: None,
        };
        assert!(!none.expired() && none.check("x").is_ok());
    }
}
