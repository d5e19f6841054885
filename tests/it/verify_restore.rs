//! `walnut verify-restore` against a real PostgreSQL 15: a good backup passes (as root and
//! as the cluster owner), a page damaged before a backup that cannot see it fails naming
//! the file (amcheck catches it), --max-time fails and keeps the directory, and `show` and
//! `metrics` report the recorded result.
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use super::env::{stderr, stdout, Env};
use super::harness::*;

fn verify(env: &Env, extra: &[&str]) -> Output {
    let mut args = vec!["verify-restore", "-B", env.cat(), "--instance", "db"];
    args.extend_from_slice(extra);
    walnut(&args)
}

/// The same, run by root (the server then runs as `postgres`), when we are root.
fn verify_as_root(env: &Env, extra: &[&str]) -> Output {
    let mut c = Command::new(walnut_bin("walnut"));
    c.args(["verify-restore", "-B", env.cat(), "--instance", "db"]);
    c.args(extra);
    run(&mut c)
}

fn metric(env: &Env, name: &str, id: &str) -> Option<f64> {
    let text = ok(
        walnut(&[
            "metrics",
            "-B",
            env.cat(),
            "--instance",
            "db",
            "--no-connect",
        ]),
        "metrics",
    );
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k.starts_with(&format!("{name}{{")) && k.contains(&format!("backup_id=\"{id}\"")))
            .then(|| v.parse().unwrap())
    })
}

fn some_data(pg: &Pg) {
    pg.psql(
        "postgres",
        "create table t (id int primary key, v text) with (autovacuum_enabled = off); \
         insert into t select g, repeat('x', 40) || g from generate_series(1, 20000) g; \
         create index t_v on t (v)",
    );
    pg.psql("postgres", "vacuum analyze t");
    pg.psql("postgres", "create database other");
    pg.psql(
        "other",
        "create table o (a int); insert into o select generate_series(1, 100); create index on o (a)",
    );
}

/// A good backup passes: every database's indexes checked and tables counted,
/// pg_checksums clean, the scratch directory removed, and the result in show and metrics.
#[test]
fn verify_restore_passes_on_a_good_backup() {
    let env = Env::new("vr-ok");
    some_data(&env.pg);
    // a tablespace: the drill maps it below its scratch directory
    env.tablespace_on(&env.pg, "vr_ts");
    env.pg.psql(
        "postgres",
        "create table in_ts (a int primary key) tablespace vr_ts; \
         insert into in_ts select generate_series(1, 500)",
    );
    let id = env.backup("full", &[]);
    let out = if is_root() {
        verify_as_root(&env, &["--format", "json"])
    } else {
        verify(&env, &["--format", "json"])
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["success"], true);
    assert_eq!(v["backup_id"], id.as_str());
    assert_eq!(v["recovery_target"], "immediate");
    assert_eq!(v["data_checksums"], true);
    let dbs = v["databases"].as_array().unwrap();
    let pgdb = dbs.iter().find(|d| d["name"] == "postgres").unwrap();
    assert!(pgdb["indexes_checked"].as_u64().unwrap() >= 2, "{pgdb}");
    assert!(pgdb["rows"].as_u64().unwrap() >= 20500, "{pgdb}");
    let other = dbs.iter().find(|d| d["name"] == "other").unwrap();
    assert!(other["indexes_checked"].as_u64().unwrap() >= 1, "{other}");
    assert!(dbs.iter().all(|d| d["name"] != "template0"));
    let steps: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "restore",
            "start and recover",
            "amcheck and count",
            "stop",
            "pg_checksums"
        ]
    );
    assert!(v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["ok"] == true));
    let dir = v["directory"].as_str().unwrap();
    assert_eq!(v["kept"], false);
    assert!(!Path::new(dir).exists(), "scratch dir {dir} removed");

    // show and metrics report the record (root wrote it: give the catalog back to its
    // owner, who runs show and metrics here)
    chown_pg(&env.cat);
    let row = env.row(&id);
    assert_eq!(row["verify_restore"], "PASSED", "{row}");
    assert!(row["verify_restore_time"].is_string());
    let text = ok(
        walnut(&["show", "-B", env.cat(), "--instance", "db"]),
        "show",
    );
    assert!(
        text.contains("Verified") && text.contains("PASSED"),
        "{text}"
    );
    assert_eq!(
        metric(&env, "walnut_backup_verify_last_success", &id),
        Some(1.0)
    );
    assert!(metric(&env, "walnut_backup_verify_last_timestamp_seconds", &id).unwrap() > 1.7e9);
    // the record is a new dated file under the backup
    let recs: Vec<String> = std::fs::read_dir(env.backup_dir(&id).join("verify"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    assert_eq!(recs.len(), 1, "{recs:?}");
    // the primary is untouched: no new timeline was archived by the drill
    assert!(!env.cat.join("instances/db/wal/00000002").exists());
}

/// A leaf page of an index zeroed in the source before the backup: the backup accepts it
/// (a zero page is valid, and the manifest's checksums match what was stored), restore
/// and recovery keep it, and amcheck fails the drill naming the index's file. The
/// directory is kept; show and metrics say FAILED.
#[test]
fn verify_restore_fails_naming_the_file_of_a_damaged_index() {
    let mut env = Env::new("vr-bad");
    some_data(&env.pg);
    let file = env
        .pg
        .psql("postgres", "select pg_relation_filepath('t_pkey')");
    env.pg.psql("postgres", "checkpoint");
    env.pg.stop();
    let path = env.pg.data.join(&file);
    let mut b = std::fs::read(&path).unwrap();
    assert!(b.len() >= 3 * 8192);
    b[8192..2 * 8192].fill(0);
    std::fs::write(&path, &b).unwrap();
    env.pg.start();
    let id = env.backup("full", &[]);
    assert_eq!(env.status(&id), "OK");
    assert!(
        env.validate(&["-i", &id]).status.success(),
        "validate cannot see it"
    );

    let scratch = env.path("drill");
    let out = verify(&env, &["-D", scratch.to_str().unwrap(), "--format", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let e = stderr(&out);
    assert!(e.contains(&file), "names the file {file}: {e}");
    assert!(
        e.contains("is kept") && e.contains(scratch.to_str().unwrap()),
        "{e}"
    );
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["success"], false);
    assert_eq!(v["kept"], true);
    let f = v["failures"].as_array().unwrap();
    assert!(
        f.iter().any(|x| {
            let s = x.as_str().unwrap();
            s.starts_with("amcheck") && s.contains("t_pkey") && s.contains(&file)
        }),
        "{f:?}"
    );
    assert!(
        scratch.join("data/PG_VERSION").exists(),
        "the directory is kept"
    );
    assert!(
        !scratch.join("data/postmaster.pid").exists(),
        "the server was stopped"
    );

    assert_eq!(env.row(&id)["verify_restore"], "FAILED");
    assert_eq!(
        metric(&env, "walnut_backup_verify_last_success", &id),
        Some(0.0)
    );
}

/// --max-time: the run fails saying so, the server is stopped, the directory kept.
#[test]
fn verify_restore_max_time_fails_and_keeps_the_directory() {
    let env = Env::new("vr-time");
    some_data(&env.pg);
    let id = env.backup("full", &[]);
    let scratch = env.path("slow");
    // the drill of this small cluster takes about a second: the hook holds the checks
    let mut c = as_pg(walnut_bin("walnut"));
    c.env("WALNUT_TEST_VERIFY_HOLD", "1");
    c.args(["verify-restore", "-B", env.cat(), "--instance", "db"]);
    let out = run(c.args([
        "-i",
        &id,
        "-D",
        scratch.to_str().unwrap(),
        "--max-time",
        "1s",
    ]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let e = stderr(&out);
    assert!(e.contains("--max-time"), "{e}");
    assert!(e.contains(scratch.to_str().unwrap()), "{e}");
    assert!(scratch.exists());
    std::thread::sleep(std::time::Duration::from_secs(1));
    if let Ok(pid) = std::fs::read_to_string(scratch.join("data/postmaster.pid")) {
        let pid: i32 = pid.lines().next().unwrap().trim().parse().unwrap();
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
            "the scratch server {pid} still runs"
        );
    }
    assert_eq!(env.row(&id)["verify_restore"], "FAILED");
    // bad usage: a target action is refused before anything is written
    let out = verify(&env, &["--recovery-target-action", "pause"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("promotes"));
}

/// A heap page damaged in the stored backup, its manifest forged to match: restore and
/// recovery cannot see it (the stored file matches its manifest checksum; WAL replay does
/// not touch the page), and the drill fails naming the relation's file, through
/// pg_checksums (and the server's own checksum check on count(*)).
#[test]
fn verify_restore_catches_a_damaged_page_behind_a_forged_manifest() {
    let env = Env::new("vr-forge");
    env.pg.psql(
        "postgres",
        "create table plain (a int, b text) with (autovacuum_enabled = off); \
         insert into plain select g, repeat('y', 100) from generate_series(1, 5000) g",
    );
    env.pg.psql("postgres", "checkpoint");
    let rel = env
        .pg
        .psql("postgres", "select pg_relation_filepath('plain')");
    let id = env.backup("full", &[]);
    let bdir = env.backup_dir(&id);
    let stored = bdir.join(format!("database/{rel}"));
    let mut b = std::fs::read(&stored).unwrap();
    b[3 * 8192 + 8000] ^= 0xff;
    std::fs::write(&stored, &b).unwrap();
    let mpath = bdir.join("manifest");
    let entries = super::env::manifest_entries(&mpath).unwrap();
    let mut w = walnut::format::manifest::ManifestWriter::new(Vec::new(), false).unwrap();
    let mut forged = false;
    for mut e in entries {
        if e.path == rel {
            e.crc32c = crc32c::crc32c(&b);
            forged = true;
        }
        w.add(&e).unwrap();
    }
    assert!(forged);
    std::fs::write(&mpath, w.finish().unwrap()).unwrap();

    let out = verify(&env, &["--format", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let f: Vec<&str> = v["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(
        f.iter()
            .any(|x| x.starts_with("pg_checksums") && x.contains(&rel)),
        "{f:?}\n{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(&rel), "{}", stderr(&out));
    assert_eq!(v["kept"], true);
}
