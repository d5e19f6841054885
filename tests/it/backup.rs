//! Backups, restores, show and validate against real PostgreSQL 15 clusters with data
//! checksums on, archiving through walnut-archive and recovering through walnut-fetch.
use std::time::{Duration, Instant};

use super::env::*;
use super::harness::*;

/// amcheck on every btree index the restored server can read.
pub(crate) fn amcheck_all(pg: &Pg, dbs: &[&str]) {
    for db in dbs {
        let n = pg.psql(
            db,
            "select count(bt_index_check(c.oid)) from pg_index i join pg_class c on c.oid = i.indexrelid \
             join pg_am a on a.oid = c.relam where a.amname = 'btree' and c.relpersistence = 'p' and i.indisvalid",
        );
        assert!(n.parse::<u64>().unwrap() > 0, "no index checked in {db}");
    }
}

pub(crate) fn pg_checksums_ok(pg: &Pg) {
    let out = run(pg
        .cmd("pg_checksums")
        .arg("--check")
        .arg("-D")
        .arg(&pg.data));
    assert!(
        out.status.success(),
        "pg_checksums failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

/// FULL backup of a small cluster, restored to a restore point: same data, checksums and
/// btree indexes intact; `show` lists the backup as OK with its fields.
#[test]
fn full_backup_restore_and_show() {
    let env = Env::new("bk-full");
    let pg = &env.pg;
    pg.psql("postgres", "create extension amcheck");
    pg.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    pg.psql("postgres", "create unlogged table ul(i int primary key); insert into ul select generate_series(1,1000)");
    let id = env.backup("full", &[]);
    pg.pgbench(&["-t", "200", "-n", "postgres"]);
    let dump = Env::dumpall(pg);
    pg.psql("postgres", "select pg_create_restore_point('after_full')");
    env.switch_and_wait(pg);

    let rows = env.show();
    assert_eq!(rows.len(), 1);
    let b = &rows[0];
    assert_eq!(b["id"], id.as_str());
    assert_eq!(b["mode"], "FULL");
    assert_eq!(b["status"], "OK");
    assert_eq!(b["timeline"], 1);
    assert!(b["parent_id"].is_null());
    for k in [
        "start_lsn",
        "stop_lsn",
        "start_time",
        "end_time",
        "recovery_time",
    ] {
        assert!(b[k].is_string(), "{k} missing: {b}");
    }
    assert!(b["data_bytes"].as_u64().unwrap() > 20 << 20);
    assert!(b["files"].as_u64().unwrap() > 500);
    let table = ok(walnut(&["show", "-B", env.cat()]), "show text");
    assert!(
        table.contains(&id) && table.contains("FULL") && table.contains("OK"),
        "{table}"
    );

    // the restored data directory holds no WAL, no postmaster.pid, only the init fork of
    // the unlogged table
    let mut r = env.restore_and_start(
        "r-full",
        &[
            "-i",
            &id,
            "--recovery-target-name",
            "after_full",
            "--recovery-target-action",
            "pause",
        ],
        false,
    );
    wait_paused(&r);
    same_dump(&Env::dumpall(&r), &dump, "FULL restore");
    amcheck_all(&r, &["postgres"]);
    // the unlogged table: only its init fork (and the index's) were backed up
    let ul = pg.psql("postgres", "select pg_relation_filepath('ul')");
    let manifest =
        std::fs::read_to_string(env.cat.join(format!("instances/db/backups/{id}/manifest")))
            .unwrap();
    assert!(
        manifest.contains(&format!("\"path\":\"{ul}_init\"")),
        "{ul}_init not in the manifest"
    );
    assert!(
        !manifest.contains(&format!("\"path\":\"{ul}\"")),
        "{ul} should not be backed up"
    );
    assert!(!manifest.contains("\"path\":\"postmaster.pid\""));
    assert!(!manifest.contains("\"path\":\"pg_wal/0000"));
    assert!(manifest.contains("\"path\":\"pg_wal/archive_status\""));
    r.stop();
    pg_checksums_ok(&r);

    // a non-empty target is refused
    let again = env.restore_cmd(&r.data, &["-i", &id]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("not empty"), "{}", stderr(&again));
}

/// Compressed FULL and PAGE of a cluster whose biggest table file spans several 32 MiB LZ4
/// frames: the manifest (version 2) lists the frames, the stored file decodes with the stock
/// `lz4 -d`, and a restore of the chain (frames decoded on several threads) gives the same
/// data, with checksums and indexes intact.
#[test]
fn compressed_chain_with_lz4_frames_restores() {
    let env = Env::new("bk-lz4-frames");
    let pg = &env.pg;
    pg.psql("postgres", "create extension amcheck");
    pg.pgbench(&["-i", "-s", "6", "-q", "postgres"]);
    pg.psql("postgres", "checkpoint");
    let rel = pg.psql(
        "postgres",
        "select pg_relation_filepath('pgbench_accounts')",
    );
    let full = env.backup("full", &["--compress", "lz4"]);
    let bdir = env.cat.join(format!("instances/db/backups/{full}"));
    let manifest = std::fs::read_to_string(bdir.join("manifest")).unwrap();
    assert!(
        manifest.starts_with("WALNUT-MANIFEST 2\n"),
        "{manifest:.40}"
    );
    let entry: serde_json::Value = manifest
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["path"] == rel.as_str())
        .expect("accounts file in the manifest");
    let frames = entry["lz4_frames"]["stored"].as_array().expect("frames");
    assert!(frames.len() >= 2, "{entry}");
    let stored = bdir.join(format!("database/{rel}.lz4"));
    let out = run(std::process::Command::new("lz4")
        .args(["-d", "-c"])
        .arg(&stored));
    assert!(out.status.success(), "lz4 -d {}", stored.display());
    assert_eq!(out.stdout.len() as u64, entry["size"].as_u64().unwrap());
    assert_eq!(
        crc32c::crc32c(&std::fs::read(&stored).unwrap()),
        entry["crc32c"].as_u64().unwrap() as u32
    );

    pg.pgbench(&["-t", "300", "-n", "postgres"]);
    let page = env.backup("page", &["--compress", "lz4"]);
    let dump = Env::dumpall(pg);
    pg.psql("postgres", "select pg_create_restore_point('after_page')");
    env.switch_and_wait(pg);
    let mut r = env.restore_and_start(
        "r-lz4",
        &[
            "-i",
            &page,
            "--recovery-target-name",
            "after_page",
            "--recovery-target-action",
            "pause",
        ],
        false,
    );
    wait_paused(&r);
    same_dump(&Env::dumpall(&r), &dump, "compressed FULL+PAGE restore");
    amcheck_all(&r, &["postgres"]);
    r.stop();
    pg_checksums_ok(&r);
}

/// One restore point: a backup, the restore point made after it, the dump at that point.
struct Point {
    id: String,
    rp: String,
    dump: String,
    tt_count: String,
    /// Size and content digest of the relation past 1 GiB (in `bigdb`).
    big: String,
}

/// The relation of more than one segment file: its size (so the number and length of its
/// segment files) and a digest of its rows.
const BIG_DIGEST: &str = "select pg_relation_size('big') || ' ' || count(*) || ' ' || \
     md5(string_agg(i::text || pad, ',' order by i)) from big";

fn mark(env: &Env, id: String, rp: &str) -> Point {
    let pg = &env.pg;
    let dump = Env::dumpall(pg);
    let tt_count = pg.psql("postgres", "select count(*) from tt");
    let big = pg.psql("bigdb", BIG_DIGEST);
    pg.psql(
        "postgres",
        &format!("select pg_create_restore_point('{rp}')"),
    );
    Point {
        id,
        rp: rp.to_string(),
        dump,
        tt_count,
        big,
    }
}

/// FULL, PAGE, PAGE, DELTA over pgbench and DDL (truncating VACUUM, TRUNCATE, VACUUM FULL,
/// CREATE DATABASE with both strategies, DROP DATABASE, a tablespace, SET TABLESPACE,
/// unlogged tables, VACUUM FULL pg_class, truncate-then-extend, a relation past 1 GiB that
/// shrinks below it and grows back); every backup restored to
/// the restore point made right after it gives the same dump, passes pg_checksums and
/// amcheck, and deleted rows do not come back.
#[test]
fn page_and_delta_chain_restores_every_point() {
    // PG15 is the matrix's Debian entry: the full scenario, with 18's pg_dumpall as the
    // oracle when it can be downloaded (else Debian's own, said in the output).
    let tools = super::matrix::pg18_tools();
    let server = Server::debian15();
    let t0 = Instant::now();
    chain_scenario(&server, tools.as_ref(), "bk-chain", "");
    super::matrix::report(&server, "full scenario OK", t0);
}

/// The full scenario of the version matrix, on `server` with client programs from `tools`.
/// Besides the restore point of each backup, every backup is also restored to "latest"
/// (the end of the archive), and must equal the primary's final state.
pub(crate) fn chain_scenario(server: &Server, tools: Option<&Server>, name: &str, conf: &str) {
    let env = Env::on(name, server, tools, conf);
    let pg = &env.pg;
    pg.psql("postgres", "create extension amcheck");
    pg.psql("template1", "create extension amcheck");
    pg.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    let ts = env.tablespace_on(pg, "ts1");
    pg.psql(
        "postgres",
        "create table tt(i int, pad text) with (autovacuum_enabled = off); \
         insert into tt select g, repeat('x', 200) from generate_series(1, 20000) g; create index on tt(i)",
    );
    pg.psql(
        "postgres",
        "create table trunc_me(i int); insert into trunc_me select generate_series(1, 5000)",
    );
    pg.psql("postgres", "create table vf(i int primary key, t text); insert into vf select g, md5(g::text) from generate_series(1, 5000) g");
    pg.psql("postgres", "create unlogged table ul(i int primary key); insert into ul select generate_series(1, 1000)");
    pg.psql("postgres", "create database dropme");
    pg.psql("dropme", "create table d(i int); insert into d values (1)");
    // past 1 GiB: one ~450-byte row per 8 KiB page (fillfactor 10), 135,000 pages, so the
    // relation has a second segment file of 3,928 blocks
    pg.psql("postgres", "create database bigdb");
    pg.psql(
        "bigdb",
        "create table big(i int, pad text) with (fillfactor = 10, autovacuum_enabled = off); \
         insert into big select g, repeat(md5(g::text), 13) from generate_series(1, 135000) g",
    );
    assert_eq!(
        pg.psql(
            "bigdb",
            "select pg_relation_size('big') > 1024 * 1024 * 1024"
        ),
        "t"
    );

    let mut points = Vec::new();
    let b1 = env.backup("full", &[]);
    pg.pgbench(&["-t", "300", "-n", "postgres"]);
    pg.psql("postgres", "delete from tt where i > 15000");
    pg.psql("postgres", "vacuum tt");
    pg.psql("postgres", "truncate trunc_me");
    pg.psql(
        "postgres",
        "insert into trunc_me select generate_series(1, 100)",
    );
    pg.psql("postgres", "vacuum full vf");
    pg.psql("postgres", "create database d_wal strategy wal_log");
    pg.psql("postgres", "create database d_copy strategy file_copy");
    pg.psql("postgres", "drop database dropme");
    pg.psql(
        "postgres",
        "alter table pgbench_branches set tablespace ts1",
    );
    pg.psql(
        "d_wal",
        "create table x(i int primary key); insert into x select generate_series(1, 3000)",
    );
    pg.psql(
        "d_copy",
        "create table y(i int primary key); insert into y select generate_series(1, 3000)",
    );
    pg.psql("postgres", "vacuum full pg_class");
    // changes in both segment files of big
    pg.psql(
        "bigdb",
        "update big set pad = upper(pad) where i % 997 = 0 or i > 134500",
    );
    pg.psql(
        "postgres",
        "insert into ul select generate_series(1001, 2000)",
    );
    points.push(mark(&env, b1.clone(), "rp1"));

    let b2 = env.backup("page", &[]);
    pg.pgbench(&["-t", "300", "-n", "postgres"]);
    // truncate, then extend again: blocks past the truncation point in older backups hold
    // deleted rows that must not come back
    pg.psql("postgres", "delete from tt where i > 5000");
    pg.psql("postgres", "vacuum tt");
    pg.psql("postgres", "copy tt(i) from program 'seq 30001 31000'");
    pg.psql("postgres", "create table in_ts(i int primary key) tablespace ts1; insert into in_ts select generate_series(1, 2000)");
    pg.psql("d_wal", "update x set i = i + 10000 where i < 100");
    // big shrinks below 1 GiB: its second segment file is cut to nothing
    pg.psql("bigdb", "delete from big where i > 130500");
    pg.psql("bigdb", "vacuum big");
    assert_eq!(
        pg.psql(
            "bigdb",
            "select pg_relation_size('big') < 1024 * 1024 * 1024"
        ),
        "t",
        "vacuum did not truncate big"
    );
    points.push(mark(&env, b2.clone(), "rp2"));

    let b3 = env.backup("page", &[]);
    pg.pgbench(&["-t", "300", "-n", "postgres"]);
    pg.psql("postgres", "update vf set t = 'changed' where i % 7 = 0");
    pg.psql("postgres", "delete from tt where i > 30500");
    pg.psql("postgres", "vacuum tt");
    points.push(mark(&env, b3.clone(), "rp3"));

    // and grows back past 1 GiB before the DELTA (truncate, then extend across the boundary)
    pg.psql(
        "bigdb",
        "insert into big select g, repeat(md5(g::text), 13) from generate_series(200001, 201000) g",
    );
    let b4 = env.backup("delta", &[]);
    pg.pgbench(&["-t", "100", "-n", "postgres"]);
    points.push(mark(&env, b4.clone(), "rp4"));
    let latest = Env::dumpall(pg);
    let latest_big = pg.psql("bigdb", BIG_DIGEST);
    env.switch_and_wait(pg);

    let rows = env.show();
    let by_id = |id: &str| rows.iter().find(|b| b["id"] == id).unwrap().clone();
    assert_eq!(by_id(&b2)["mode"], "PAGE");
    assert_eq!(by_id(&b2)["parent_id"], b1.as_str());
    assert_eq!(by_id(&b3)["parent_id"], b2.as_str());
    assert_eq!(by_id(&b4)["mode"], "DELTA");
    assert_eq!(by_id(&b4)["parent_id"], b3.as_str());
    let full_bytes = by_id(&b1)["data_bytes"].as_u64().unwrap();
    for id in [&b2, &b3, &b4] {
        assert_eq!(env.status(id), "OK");
        let b = by_id(id)["data_bytes"].as_u64().unwrap();
        assert!(
            b < full_bytes,
            "incremental {id} stored {b} bytes, FULL {full_bytes}"
        );
    }

    for (k, p) in points.iter().enumerate() {
        let name = format!("r{k}");
        let newts = env.dir.path().join(format!("ts-{name}"));
        let map = format!("{}={}", ts.display(), newts.display());
        let mut r = env.restore_and_start(
            &name,
            &[
                "-i",
                &p.id,
                "--recovery-target-name",
                &p.rp,
                "--recovery-target-action",
                "pause",
                "-T",
                &map,
            ],
            false,
        );
        wait_paused(&r);
        let dump =
            Env::dumpall(&r).replace(&newts.display().to_string(), &ts.display().to_string());
        same_dump(&dump, &p.dump, &format!("backup {} at {}", p.id, p.rp));
        assert_eq!(
            r.psql("postgres", "select count(*) from tt"),
            p.tt_count,
            "deleted rows came back"
        );
        assert_eq!(
            r.psql("bigdb", BIG_DIGEST),
            p.big,
            "relation past 1 GiB differs"
        );
        let dbs: Vec<&str> = if k == 0 {
            vec!["postgres", "d_wal", "d_copy"]
        } else {
            vec!["postgres", "d_wal"]
        };
        amcheck_all(&r, &dbs);
        r.stop();
        pg_checksums_ok(&r);
        std::fs::remove_dir_all(&r.data).ok();
        std::fs::remove_dir_all(&newts).ok();
    }

    // Every backup to the end of the archive: recovery replays all of it and promotes.
    for (k, p) in points.iter().enumerate() {
        let name = format!("l{k}");
        let newts = env.dir.path().join(format!("ts-{name}"));
        let map = format!("{}={}", ts.display(), newts.display());
        let mut r = env.restore_and_start(&name, &["-i", &p.id, "-T", &map], false);
        wait_promoted(&r);
        let dump =
            Env::dumpall(&r).replace(&newts.display().to_string(), &ts.display().to_string());
        same_dump(&dump, &latest, &format!("backup {} to latest", p.id));
        assert_eq!(
            r.psql("bigdb", BIG_DIGEST),
            latest_big,
            "relation past 1 GiB differs at latest"
        );
        amcheck_all(&r, &["postgres", "d_wal"]);
        r.stop();
        pg_checksums_ok(&r);
        std::fs::remove_dir_all(&r.data).ok();
        std::fs::remove_dir_all(&newts).ok();
    }
}

/// A page whose checksum fails on every read and whose LSN is older than the backup start
/// fails a FULL backup, naming the file and the block; the backup is marked ERROR.
#[test]
fn corrupt_page_fails_full_backup() {
    let mut env = Env::new("bk-corrupt-page");
    env.pg.psql("postgres", "create table c(i int, t text); insert into c select g, md5(g::text) from generate_series(1, 2000) g");
    env.pg.psql("postgres", "checkpoint");
    let rel = env.pg.psql("postgres", "select pg_relation_filepath('c')");
    env.pg.stop();
    let path = env.pg.data.join(&rel);
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() >= 3 * 8192);
    for b in &mut bytes[2 * 8192 + 4000..2 * 8192 + 4016] {
        *b ^= 0x5A;
    }
    std::fs::write(&path, &bytes).unwrap();
    env.pg.start();
    let out = env.backup_cmd("full", &[]);
    fails_with(
        out,
        "FULL of a corrupt cluster",
        &[&format!("file \"{rel}\" block 2"), "checksum"],
    );
    let rows = env.show();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["status"], "ERROR");
}

/// validate: a damaged file in a stored FULL makes it CORRUPT and its PAGE child ORPHAN;
/// restore refuses both; an intact catalog validates cleanly.
#[test]
fn validate_marks_corrupt_and_orphan() {
    let env = Env::new("bk-validate");
    let pg = &env.pg;
    pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let full = env.backup("full", &["--compress", "lz4"]);
    pg.pgbench(&["-t", "100", "-n", "postgres"]);
    let page = env.backup("page", &[]);
    env.switch_and_wait(pg);
    ok(
        walnut(&["validate", "-B", env.cat(), "--instance", "db", "-i", &page]),
        "validate intact chain",
    );
    assert_eq!(env.status(&full), "OK");

    let rel = env.damage_stored(pg, &full, "pgbench_accounts");
    // a restore that meets the damage fails and leaves no startable data directory
    let half = env.dir.path().join("half");
    fails_with(
        env.restore_cmd(&half, &["-i", &full]),
        "restore from a damaged file",
        &[&rel, "checksum"],
    );
    assert!(
        !half.join("global/pg_control").exists(),
        "an interrupted restore left pg_control"
    );
    let out = walnut(&["validate", "-B", env.cat(), "--instance", "db"]);
    fails_with(out, "validate", &[&rel]);
    assert_eq!(env.status(&full), "CORRUPT");
    assert_eq!(env.status(&page), "ORPHAN");
    let target = env.dir.path().join("r");
    fails_with(
        env.restore_cmd(&target, &["-i", &page]),
        "restore of an orphan",
        &["ORPHAN"],
    );
    fails_with(
        env.restore_cmd(&target, &["-i", &full]),
        "restore of a corrupt backup",
        &["CORRUPT"],
    );
}

/// A PAGE backup whose WAL range lacks an archived segment fails, naming the segment and
/// suggesting DELTA; a DELTA backup then works.
#[test]
fn page_backup_with_missing_segment_fails_clearly() {
    let env = Env::new("bk-missing-seg");
    let pg = &env.pg;
    pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let full = env.backup("full", &[]);
    for _ in 0..3 {
        pg.pgbench(&["-t", "100", "-n", "postgres"]);
        env.switch_and_wait(pg);
    }
    let start: walnut::Lsn = env.show()[0]["start_lsn"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let seg = walnut::WalFileName::segment(1, start.segno(1 << 20) + 1, 1 << 20);
    let catalog = walnut::catalog::Catalog::open(&env.cat).unwrap();
    let ar = walnut::archive::WalArchive::open(&catalog, "db").unwrap();
    assert!(ar.is_archived(&seg).unwrap());
    std::fs::remove_file(ar.data_path(&seg)).unwrap();
    let out = env.backup_cmd("page", &[]);
    fails_with(
        out,
        "PAGE with a hole in the archive",
        &[&seg.to_string(), "DELTA"],
    );
    let delta = env.backup("delta", &[]);
    assert_eq!(env.status(&delta), "OK");
    assert_eq!(
        env.show()
            .iter()
            .find(|b| b["id"] == delta.as_str())
            .unwrap()["parent_id"],
        full.as_str()
    );
}

/// Point-in-time restores to a transaction id (inclusive and not) and to a time, with the
/// backup chosen automatically.
#[test]
fn restore_to_xid_and_time_targets() {
    let env = Env::new("bk-pitr");
    let pg = &env.pg;
    pg.psql("postgres", "create table tx(i int, x text)");
    env.backup("full", &[]);
    pg.psql(
        "postgres",
        "insert into tx values (1, txid_current()::text)",
    );
    pg.psql(
        "postgres",
        "insert into tx values (2, txid_current()::text)",
    );
    let x2 = pg.psql("postgres", "select x from tx where i = 2");
    std::thread::sleep(Duration::from_millis(1100));
    let t = pg.psql("postgres", "select clock_timestamp()::text");
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql(
        "postgres",
        "insert into tx values (3, txid_current()::text)",
    );
    env.switch_and_wait(pg);
    let cases: [(&str, Vec<&str>, &str); 3] = [
        (
            "xid-incl",
            vec![
                "--recovery-target-xid",
                &x2,
                "--recovery-target-inclusive",
                "true",
            ],
            "1,2",
        ),
        (
            "xid-excl",
            vec![
                "--recovery-target-xid",
                &x2,
                "--recovery-target-inclusive",
                "false",
            ],
            "1",
        ),
        ("time", vec!["--recovery-target-time", &t], "1,2"),
    ];
    for (name, args, want) in cases {
        let mut a = args.clone();
        a.extend_from_slice(&["--recovery-target-action", "pause"]);
        let mut r = env.restore_and_start(name, &a, false);
        wait_paused(&r);
        assert_eq!(
            r.psql(
                "postgres",
                "select string_agg(i::text, ',' order by i) from tx"
            ),
            want,
            "{name}"
        );
        r.stop();
    }

    // A named restore point between two backups: without -i, restore finds the point's LSN
    // in the block indexes and chooses the backup that ends before it (the newer one could
    // never reach it).
    pg.psql(
        "postgres",
        "select pg_create_restore_point('before_second')",
    );
    pg.psql(
        "postgres",
        "insert into tx values (4, txid_current()::text)",
    );
    env.switch_and_wait(pg);
    env.backup("full", &[]);
    let mut r = env.restore_and_start(
        "named",
        &[
            "--recovery-target-name",
            "before_second",
            "--recovery-target-action",
            "pause",
        ],
        false,
    );
    wait_paused(&r);
    assert_eq!(
        r.psql(
            "postgres",
            "select string_agg(i::text, ',' order by i) from tx"
        ),
        "1,2,3",
        "restore to a named point between two backups"
    );
    r.stop();
}

/// After a point-in-time restore that promotes (timeline 2), a PAGE backup on the new
/// timeline takes the timeline-1 FULL as its parent and restores correctly.
#[test]
fn page_backup_after_promotion_on_new_timeline() {
    let mut env = Env::new("bk-promote");
    env.pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let full = env.backup("full", &[]);
    env.pg.pgbench(&["-t", "200", "-n", "postgres"]);
    env.pg
        .psql("postgres", "select pg_create_restore_point('split')");
    env.pg.pgbench(&["-t", "200", "-n", "postgres"]);
    env.switch_and_wait(&env.pg);
    env.pg.stop();
    // the restored server replaces the old primary and keeps archiving to the catalog
    let mut p2 = env.restore_and_start(
        "primary2",
        &[
            "-i",
            &full,
            "--recovery-target-name",
            "split",
            "--recovery-target-action",
            "promote",
        ],
        true,
    );
    wait_promoted(&p2);
    assert_eq!(
        p2.psql(
            "postgres",
            "select timeline_id from pg_control_checkpoint()"
        ),
        "2"
    );
    // recovery_end_command removed walnut-fetch's prefetch spool (the target was before the
    // archive's end, so the spool held segments recovery never asked for)
    assert!(
        p2.server_log().contains("removed the prefetch spool"),
        "recovery_end_command did not run\n{}",
        p2.server_log()
    );
    assert!(!p2.data.join("pg_wal/walnut-prefetch").exists());
    p2.pgbench(&["-t", "200", "-n", "postgres"]);
    p2.psql(
        "postgres",
        "create table after_promote(i int); insert into after_promote values (42)",
    );
    let out = env.backup_cmd_on(&p2, "page", &[]);
    let page = ok(out, "PAGE on timeline 2").trim().to_string();
    let dump = Env::dumpall(&p2);
    p2.psql("postgres", "select pg_create_restore_point('tl2')");
    env.switch_and_wait(&p2);
    let row = env
        .show()
        .into_iter()
        .find(|b| b["id"] == page.as_str())
        .unwrap();
    assert_eq!(row["timeline"], 2);
    assert_eq!(row["parent_id"], full.as_str());
    let mut r = env.restore_and_start(
        "r-tl2",
        &[
            "-i",
            &page,
            "--recovery-target-name",
            "tl2",
            "--recovery-target-action",
            "pause",
        ],
        false,
    );
    wait_paused(&r);
    same_dump(&Env::dumpall(&r), &dump, "PAGE on timeline 2");
    r.stop();
    pg_checksums_ok(&r);
    p2.stop();
}

/// Refusals: an incremental backup with no FULL to build on, a server whose
/// archive_command does not archive to this catalog and instance, and a restore over the
/// data directory of a running server even with --force.
#[test]
fn backup_and_restore_refuse_misconfiguration() {
    let env = Env::new("bk-refuse");
    let pg = &env.pg;
    fails_with(
        env.backup_cmd("page", &[]),
        "PAGE without FULL",
        &["no OK backup", "FULL"],
    );
    let full = env.backup("full", &[]);
    fails_with(
        env.restore_cmd(&pg.data, &["-i", &full, "--force"]),
        "restore over a running server",
        &["is running"],
    );
    // Another cluster, archiving into this instance's catalog, is still not this instance.
    let mut other = Pg::init(
        &pg_bin(),
        env.dir.path(),
        "other",
        &["-k", "--wal-segsize=1"],
    );
    other.append_conf(&format!(
        "archive_mode = on\narchive_command = '{} -B {} --instance db %p %f'",
        walnut_bin("walnut-archive").display(),
        env.cat()
    ));
    other.start();
    fails_with(
        env.backup_cmd_on(&other, "full", &[]),
        "FULL of a cluster with a foreign system identifier",
        &["system identifier"],
    );
    other.stop();
    pg.psql("postgres", "alter system set archive_command = 'true'");
    pg.psql("postgres", "select pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(300));
    fails_with(
        env.backup_cmd("full", &[]),
        "FULL with a foreign archive_command",
        &["archive_command", "walnut-archive"],
    );
}

/// A server running with wal_level=minimal (so no archiving either) is refused before any
/// backup is recorded, with a message that names the setting and what it must be.
#[test]
fn backup_refuses_wal_level_minimal() {
    let mut env = Env::new("bk-minimal");
    env.pg.stop();
    // wal_level=minimal needs archiving and WAL senders off; these lines override Env's.
    env.pg
        .append_conf("wal_level = minimal\narchive_mode = off\nmax_wal_senders = 0");
    env.pg.start();
    assert_eq!(env.pg.psql("postgres", "show wal_level"), "minimal");
    for mode in ["full", "page", "delta"] {
        fails_with(
            env.backup_cmd(mode, &[]),
            &format!("{mode} backup with wal_level=minimal"),
            &["wal_level is 'minimal'", "'replica' or 'logical'"],
        );
    }
    assert!(env.show().is_empty(), "a refused backup was recorded");
}

/// A data directory rolled back behind the catalog's newest backup (a filesystem snapshot
/// put back: same system identifier, same timeline, older LSN) is refused as "an instance
/// from the past": a PAGE on top of the newer parent would mix two histories.
#[test]
fn instance_from_the_past_is_refused() {
    let mut env = Env::new("bk-past");
    env.pg.psql("postgres", "create table p(i int)");
    env.pg.stop();
    let snapshot = env.dir.path().join("snapshot");
    run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&env.pg.data)
            .arg(&snapshot),
    );
    env.pg.start();
    env.pg.psql(
        "postgres",
        "insert into p select generate_series(1, 100000)",
    );
    env.backup("full", &[]);
    env.pg.stop();
    std::fs::remove_dir_all(&env.pg.data).unwrap();
    run_ok(
        std::process::Command::new("mv")
            .arg(&snapshot)
            .arg(&env.pg.data),
    );
    env.pg.start();
    fails_with(
        env.backup_cmd("page", &[]),
        "PAGE of a data directory older than its parent",
        &["instance from the past"],
    );
}

/// A restore killed at any point leaves a directory that cannot start: pg_control is put in
/// place last, so until then the server refuses the directory (invariant 4: no half-written
/// result that looks complete).
#[test]
fn killed_restore_leaves_a_directory_that_cannot_start() {
    let env = Env::new("bk-killed-restore");
    env.pg.pgbench(&["-i", "-s", "8", "-q", "postgres"]);
    let full = env.backup("full", &[]);
    let mut killed = 0;
    for (i, delay_ms) in [5u64, 30, 80, 150, 300].into_iter().enumerate() {
        let target = pg_mkdir(&env.dir.path().join(format!("killed{i}")));
        // As root, setpriv execs walnut directly (runuser would fork), so the child's pid
        // is walnut's own.
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                "--reuid",
                PG_OS_USER,
                "--regid",
                PG_OS_USER,
                "--init-groups",
            ]);
            c.arg(walnut_bin("walnut"));
            c
        } else {
            std::process::Command::new(walnut_bin("walnut"))
        };
        let mut child = cmd
            .args([
                "restore",
                "-B",
                env.cat(),
                "--instance",
                "db",
                "-i",
                &full,
                "-j",
                "2",
                "-D",
            ])
            .arg(&target)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn walnut restore");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let finished = child.try_wait().expect("try_wait").is_some();
        if !finished {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill walnut restore");
        }
        let status = child.wait().expect("wait");
        if finished || status.success() {
            continue;
        }
        killed += 1;
        assert!(
            !target.join("global/pg_control").exists(),
            "a restore killed after {delay_ms} ms left global/pg_control in place"
        );
        // And PostgreSQL indeed refuses it.
        let mut c = as_pg(pg_bin().join("pg_ctl"));
        c.arg("-D").arg(&target).args(["-w", "-t", "20", "-o"]);
        c.arg(format!("-p {} -k {}", next_port(), env.pg.sock.display()));
        c.arg("-l").arg(target.with_extension("log")).arg("start");
        let out = run(&mut c);
        if out.status.success() {
            let mut stop = as_pg(pg_bin().join("pg_ctl"));
            stop.arg("-D")
                .arg(&target)
                .args(["-m", "immediate", "stop"]);
            run(&mut stop);
            panic!("a restore killed after {delay_ms} ms left a directory that starts");
        }
    }
    assert!(
        killed >= 2,
        "only {killed} restores were killed mid-way; raise the scale"
    );
}
