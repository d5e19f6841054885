//! The shared fixture: a cluster (1 MiB WAL segments, by default with data checksums)
//! archiving through walnut-archive into a fresh catalog, with the walnut commands the tests
//! run against it, and the small checks they share.
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use super::harness::*;

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts `out` failed and its stderr names every needle; returns the stderr.
pub(crate) fn fails_with(out: Output, what: &str, needles: &[&str]) -> String {
    let e = stderr(&out);
    assert!(!out.status.success(), "{what} should fail\n{e}");
    for n in needles {
        assert!(e.contains(n), "{what}: error should mention {n:?}:\n{e}");
    }
    e
}

/// A cluster (checksums on, 1 MiB WAL segments) archiving into a fresh catalog.
pub(crate) struct Env {
    // Fields drop in order: the server must stop before its directory is removed.
    pub(crate) pg: Pg,
    pub(crate) cat: PathBuf,
    pub(crate) dir: tempfile::TempDir,
}

impl Env {
    pub(crate) fn new(name: &str) -> Env {
        Self::on(name, &Server::debian15(), None, "")
    }

    /// The same on another server version, with client programs from `tools` and extra
    /// settings in postgresql.conf.
    pub(crate) fn on(name: &str, server: &Server, tools: Option<&Server>, conf: &str) -> Env {
        Self::init(name, server, tools, &["-k"], conf)
    }

    /// A PostgreSQL 15 cluster with these initdb arguments (no checksums unless they hold
    /// `-k`) and extra settings in postgresql.conf.
    pub(crate) fn with(name: &str, initdb: &[&str], conf: &str) -> Env {
        Self::init(name, &Server::debian15(), None, initdb, conf)
    }

    fn init(
        name: &str,
        server: &Server,
        tools: Option<&Server>,
        initdb: &[&str],
        conf: &str,
    ) -> Env {
        let dir = pg_tempdir(name);
        let mut args = initdb.to_vec();
        args.push("--wal-segsize=1");
        let mut pg = Pg::init_on(server, tools, dir.path(), "primary", &args);
        let cat = catalog_for(dir.path(), &pg);
        pg.append_conf(&format!(
            "archive_mode = on\narchive_command = '{} -B {} --instance db %p %f'\nmax_wal_size = '1GB'\ncheckpoint_timeout = '1h'\n{conf}",
            walnut_bin("walnut-archive").display(),
            cat.display()
        ));
        pg.start();
        Env { pg, cat, dir }
    }

    pub(crate) fn cat(&self) -> &str {
        self.cat.to_str().unwrap()
    }

    /// `name` in the fixture's temp directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn backups_dir(&self) -> PathBuf {
        self.cat.join("instances/db/backups")
    }

    pub(crate) fn backup_dir(&self, id: &str) -> PathBuf {
        self.backups_dir().join(id)
    }

    pub(crate) fn archive(&self) -> walnut::archive::WalArchive {
        let catalog = walnut::catalog::Catalog::open(&self.cat).unwrap();
        walnut::archive::WalArchive::open(&catalog, "db").unwrap()
    }

    /// `walnut backup -b MODE EXTRA...` of `pg` (one worker unless EXTRA says otherwise).
    pub(crate) fn backup_args_on(&self, pg: &Pg, mode: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["backup", "-B", self.cat(), "--instance", "db", "-b", mode]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        args.extend(pg.conn_args());
        args
    }

    fn run_backup_on(&self, pg: &Pg, mode: &str, extra: &[&str]) -> Output {
        let a = self.backup_args_on(pg, mode, extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        walnut(&a)
    }

    /// A backup with two workers.
    pub(crate) fn backup_cmd(&self, mode: &str, extra: &[&str]) -> Output {
        self.backup_cmd_on(&self.pg, mode, extra)
    }

    /// A backup of `pg` with two workers.
    pub(crate) fn backup_cmd_on(&self, pg: &Pg, mode: &str, extra: &[&str]) -> Output {
        let mut a = vec!["-j", "2"];
        a.extend_from_slice(extra);
        self.run_backup_on(pg, mode, &a)
    }

    pub(crate) fn backup(&self, mode: &str, extra: &[&str]) -> String {
        ok(self.backup_cmd(mode, extra), &format!("{mode} backup"))
            .trim()
            .to_string()
    }

    /// A backup of `pg` with one worker (the default).
    pub(crate) fn backup1_cmd_on(&self, pg: &Pg, mode: &str) -> Output {
        self.run_backup_on(pg, mode, &[])
    }

    pub(crate) fn backup1_cmd(&self, mode: &str) -> Output {
        self.backup1_cmd_on(&self.pg, mode)
    }

    /// A backup of `pg` with one worker; returns its id.
    pub(crate) fn backup1_on(&self, pg: &Pg, mode: &str) -> String {
        ok(self.backup1_cmd_on(pg, mode), &format!("{mode} backup"))
            .trim()
            .to_string()
    }

    pub(crate) fn backup1(&self, mode: &str) -> String {
        self.backup1_on(&self.pg, mode)
    }

    pub(crate) fn show(&self) -> Vec<serde_json::Value> {
        let out = ok(
            walnut(&[
                "show",
                "-B",
                self.cat(),
                "--instance",
                "db",
                "--format",
                "json",
            ]),
            "show",
        );
        serde_json::from_str::<serde_json::Value>(&out)
            .expect("show json")
            .as_array()
            .expect("array")
            .clone()
    }

    /// The `show` row of backup `id` (null when there is none).
    pub(crate) fn row(&self, id: &str) -> serde_json::Value {
        self.show()
            .into_iter()
            .find(|b| b["id"] == id)
            .unwrap_or(serde_json::Value::Null)
    }

    /// The status of backup `id` ("" when there is no such backup).
    pub(crate) fn status(&self, id: &str) -> String {
        match self.row(id) {
            serde_json::Value::Null => String::new(),
            row => row["status"].as_str().unwrap().to_string(),
        }
    }

    /// `walnut VERB -B <catalog> --instance db EXTRA...`, as the cluster owner.
    pub(crate) fn cmd(&self, verb: &str, extra: &[&str]) -> Output {
        let mut args = vec![verb, "-B", self.cat(), "--instance", "db"];
        args.extend_from_slice(extra);
        walnut(&args)
    }

    pub(crate) fn validate(&self, extra: &[&str]) -> Output {
        self.cmd("validate", extra)
    }

    pub(crate) fn restore_cmd(&self, target: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "restore",
            "-B",
            self.cat(),
            "--instance",
            "db",
            "-D",
            target.to_str().unwrap(),
            "-j",
            "2",
        ];
        args.extend_from_slice(extra);
        walnut(&args)
    }

    /// Restores, sets the restored server up to run beside the primary, starts it and
    /// waits until recovery is paused at the target.
    pub(crate) fn restore_and_start(&self, name: &str, extra: &[&str], archive: bool) -> Pg {
        let target = self.path(name);
        ok(self.restore_cmd(&target, extra), &format!("restore {name}"));
        let sock = pg_mkdir(&self.path(&format!("{name}-sock")));
        let mut r = self.pg.existing_like(&target, &sock);
        if !archive {
            r.append_conf("archive_mode = off");
        }
        r.start();
        r
    }

    /// Tablespace `name` of `pg` in directory `name` of the fixture; returns the directory.
    pub(crate) fn tablespace_on(&self, pg: &Pg, name: &str) -> PathBuf {
        let ts = pg_mkdir(&self.path(name));
        pg.psql(
            "postgres",
            &format!("create tablespace {name} location '{}'", ts.display()),
        );
        ts
    }

    /// Flips one bit in the middle of backup `id`'s stored copy of `table` (in database
    /// postgres of `pg`); returns the relation's path (as the errors name it).
    pub(crate) fn damage_stored(&self, pg: &Pg, id: &str, table: &str) -> String {
        let rel = pg.psql(
            "postgres",
            &format!("select pg_relation_filepath('{table}')"),
        );
        let stored = self.backup_dir(id).join(format!("database/{rel}.lz4"));
        let mut b = std::fs::read(&stored).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x01;
        std::fs::write(&stored, &b).unwrap();
        rel
    }

    /// Switches WAL on `pg` and waits until the finished segment is in the catalog's
    /// archive; returns it. (The harness's wait compares `last_archived_wal`, which after a
    /// backup can be an older segment's `.backup` file and then waits for the next
    /// archival.)
    pub(crate) fn switch_and_wait(&self, pg: &Pg) -> walnut::WalFileName {
        switch_and_wait_in_catalog(pg, &self.cat)
    }

    /// `pg_dumpall` without unlogged data, without `bigdb` (the >1 GiB relation, checked
    /// by a digest instead) and without the random `\restrict` keys.
    pub(crate) fn dumpall(pg: &Pg) -> String {
        let out = run_ok(
            pg.client("pg_dumpall")
                .arg("--no-unlogged-table-data")
                .arg("--exclude-database=bigdb"),
        );
        out.lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Asserts two dumps are equal, showing the first difference only.
pub(crate) fn same_dump(got: &str, want: &str, what: &str) {
    if got == want {
        return;
    }
    let g: Vec<&str> = got.lines().collect();
    let w: Vec<&str> = want.lines().collect();
    let i = g
        .iter()
        .zip(&w)
        .position(|(a, b)| a != b)
        .unwrap_or(g.len().min(w.len()));
    panic!(
        "{what}: dumps differ at line {} (restored {} lines, expected {}):\nrestored: {:?}\nexpected: {:?}",
        i + 1,
        g.len(),
        w.len(),
        g.get(i),
        w.get(i)
    );
}

/// Waits (up to 120 s) until recovery on `pg` is paused at its target.
pub(crate) fn wait_paused(pg: &Pg) {
    let t0 = Instant::now();
    // pg_get_wal_replay_pause_state() is 14+; on 13 a pause request only shows once paused.
    let sql = if pg.psql("postgres", "show server_version_num").as_str() >= "140000" {
        "select pg_get_wal_replay_pause_state()"
    } else {
        "select case when pg_is_wal_replay_paused() then 'paused' else 'not paused' end"
    };
    loop {
        let s = pg.psql("postgres", sql);
        if s == "paused" {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "recovery did not pause at the target (state {s})\n{}",
            pg.server_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until a restored server has replayed the archive to its end and been promoted.
pub(crate) fn wait_promoted(pg: &Pg) {
    let t0 = Instant::now();
    while pg.psql("postgres", "select pg_is_in_recovery()") != "f" {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "recovery did not end\n{}",
            pg.server_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The entries of a backup's manifest file (tests read the local catalog directly).
pub(crate) fn manifest_entries(
    path: &Path,
) -> walnut::Result<Vec<walnut::format::manifest::FileEntry>> {
    let f = std::fs::File::open(path).map_err(|e| walnut::Error::io("open", path, e))?;
    let mut v = Vec::new();
    walnut::format::manifest::read(
        std::io::BufReader::new(f),
        &path.display().to_string(),
        |e| {
            v.push(e);
            Ok(())
        },
    )?;
    Ok(v)
}
