//! `backup -b summary` on real PostgreSQL 17 and 18: a PAGE backup whose change map comes
//! from the server's WAL summaries.
//!
//! Per version: FULL, then pgbench and DDL (create table, truncate, VACUUM truncation and
//! re-extension, drop, CREATE DATABASE by WAL_LOG and by FILE_COPY, vacuum), then a summary
//! backup restored to a restore point made right after it (pg_dumpall equal to the
//! primary's, amcheck). For the WAL between the two backups, the summaries' change map is
//! compared with walnut's own index: it must be a superset. Then a summary file is deleted
//! and the next summary backup must fail, naming the gap. PostgreSQL 17 first runs with
//! summarize_wal off (refused before anything is written); 15 refuses `-b summary`. With
//! `--stream` on 18, a summary backup needs no archive at all.
use std::time::{Duration, Instant};

use walnut::index::{FSM_FORKNUM, VM_FORKNUM};
use walnut::Lsn;

use super::backup::amcheck_all;
use super::env::{fails_with, same_dump, wait_paused, Env};
use super::harness::*;
use super::matrix::{pg18_tools, report, say};

#[test]
fn summary_backup_pg18() {
    let Some(pg18) = pg18_tools() else {
        return;
    };
    let t0 = Instant::now();
    scenario(&pg18, &pg18, "sum-pg18");
    report(&pg18, "summary backup scenario OK", t0);
}

#[test]
fn summary_backup_pg17() {
    let Some((_, version)) = NPM_VERSIONS.iter().find(|(m, _)| *m == 17) else {
        return;
    };
    let server = match npm_server(17, version) {
        Ok(s) => s,
        Err(e) => {
            say(&format!("summary: PG17 {version}: SKIPPED: {e}"));
            return;
        }
    };
    let Some(tools) = pg18_tools() else {
        return;
    };
    let t0 = Instant::now();
    scenario(&server, &tools, "sum-pg17");
    report(&server, "summary backup scenario OK", t0);
}

#[test]
fn summary_backup_is_refused_on_pg15() {
    let env = Env::new("sum-pg15");
    let full = env.backup1("full");
    fails_with(
        env.backup1_cmd("summary"),
        "-b summary on PostgreSQL 15",
        &["PostgreSQL 17", "PostgreSQL 15", "-b page"],
    );
    let rows = env.show();
    assert_eq!(rows.len(), 1, "nothing written: {rows:?}");
    assert_eq!(rows[0]["id"], full.as_str());
}

/// With `--stream`, a summary backup needs no archive at all: its change map comes from
/// the summaries and its WAL from the stream. PG18, `archive_mode = off`; restored with
/// `--recovery-target immediate` to the primary's contents at the backup's end.
#[test]
fn summary_stream_backup_needs_no_archive_pg18() {
    let Some(pg18) = pg18_tools() else {
        return;
    };
    let env = Env::on(
        "sum-stream",
        &pg18,
        Some(&pg18),
        "summarize_wal = on\narchive_mode = off",
    );
    let pg = &env.pg;
    pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    pg.psql("postgres", "checkpoint");
    let redo = sql_lsn(pg, "select redo_lsn from pg_control_checkpoint()");
    wait_summarized(pg, redo);
    ok(env.backup_cmd("full", &["--stream"]), "FULL --stream");
    pg.pgbench(&["-t", "300", "-n", "postgres"]);
    pg.psql(
        "postgres",
        "create table s as select g from generate_series(1, 10000) g",
    );
    let id = ok(env.backup_cmd("summary", &["--stream"]), "summary --stream")
        .trim()
        .to_string();
    let dump = Env::dumpall(pg);
    let row = env.row(&id);
    assert_eq!(
        (row["source"].as_str(), row["stream"].as_bool()),
        (Some("summary"), Some(true)),
        "{row}"
    );
    assert_eq!(
        pg.psql("postgres", "select archived_count from pg_stat_archiver"),
        "0",
        "nothing was archived"
    );
    let mut r = env.restore_and_start(
        "r-stream",
        &[
            "-i",
            &id,
            "--recovery-target",
            "immediate",
            "--recovery-target-action",
            "promote",
        ],
        false,
    );
    super::env::wait_promoted(&r);
    same_dump(
        &Env::dumpall(&r),
        &dump,
        "PG18: FULL + summary --stream, no archive",
    );
    r.stop();
}

fn sql_lsn(pg: &Pg, sql: &str) -> Lsn {
    pg.psql("postgres", sql).parse().unwrap()
}

/// Waits until the summarizer has summarized the WAL up to `lsn`.
fn wait_summarized(pg: &Pg, lsn: Lsn) {
    let t0 = Instant::now();
    while sql_lsn(
        pg,
        "select summarized_lsn from pg_get_wal_summarizer_state()",
    ) < lsn
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the summarizer did not reach {lsn}\n{}",
            pg.server_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scenario(server: &Server, tools: &Server, name: &str) {
    let major = server.major;
    let off_first = major == 17;
    let conf = if off_first {
        "summarize_wal = off"
    } else {
        "summarize_wal = on"
    };
    let env = Env::on(name, server, Some(tools), conf);
    let pg = &env.pg;
    if off_first {
        fails_with(
            env.backup1_cmd("summary"),
            "-b summary with summarize_wal off",
            &["summarize_wal = on"],
        );
        assert!(env.show().is_empty(), "nothing written");
        pg.psql("postgres", "alter system set summarize_wal = on");
        pg.psql("postgres", "select pg_reload_conf()");
        let t0 = Instant::now();
        while pg.psql("postgres", "show summarize_wal") != "on" {
            assert!(t0.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    pg.psql("postgres", "create extension amcheck");
    pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    pg.psql(
        "postgres",
        "create table t_trunc (id int primary key, pad text) with (fillfactor = 20)",
    );
    pg.psql(
        "postgres",
        "insert into t_trunc select g, repeat('x', 200) from generate_series(1, 20000) g",
    );
    pg.psql(
        "postgres",
        "create table t_drop as select g from generate_series(1, 5000) g",
    );
    pg.psql("postgres", "checkpoint");
    let redo = sql_lsn(pg, "select redo_lsn from pg_control_checkpoint()");
    wait_summarized(pg, redo);
    let full = env.backup1("full");

    // the WAL the summary backup's change map covers
    pg.pgbench(&["-t", "300", "-n", "postgres"]);
    pg.psql("postgres", "select pg_switch_wal()");
    for sql in [
        "create table t_new as select g, md5(g::text) as h from generate_series(1, 5000) g",
        "truncate pgbench_history",
        "delete from t_trunc where id > 5000",
        "vacuum t_trunc",
        "insert into t_trunc select g, 'again' from generate_series(5001, 6000) g",
        "drop table t_drop",
        "create database db_wal",
        "create database db_fc strategy file_copy",
        "update pgbench_accounts set abalance = abalance + 1 where aid % 10 = 0",
        "vacuum freeze pgbench_accounts",
    ] {
        pg.psql("postgres", sql);
    }
    pg.psql(
        "db_fc",
        "create table fc as select g from generate_series(1, 3000) g",
    );
    pg.psql(
        "db_wal",
        "create table w as select g from generate_series(1, 3000) g",
    );
    pg.psql("postgres", "select pg_switch_wal()");
    pg.pgbench(&["-t", "300", "-n", "postgres"]);

    let sum = env.backup1("summary");
    let dump = Env::dumpall(pg);
    pg.psql(
        "postgres",
        "select pg_create_restore_point('after_summary')",
    );
    env.switch_and_wait(pg);

    let row = env.row(&sum);
    assert_eq!(row["mode"], "PAGE", "{row}");
    assert_eq!(row["source"], "summary", "{row}");
    assert_eq!(row["parent_id"], full.as_str(), "{row}");
    assert_eq!(env.row(&full)["source"], serde_json::Value::Null);
    let json = std::fs::read_to_string(env.backup_dir(&sum).join("backup.json")).unwrap();
    assert!(json.contains("\"source\": \"summary\""), "{json}");
    let (fbytes, sbytes) = (
        env.row(&full)["data_bytes"].as_u64().unwrap(),
        row["data_bytes"].as_u64().unwrap(),
    );
    assert!(
        sbytes < fbytes,
        "the summary backup copied changed blocks only: {sbytes} of {fbytes} bytes"
    );
    let table = ok(
        walnut(&["show", "-B", env.cat(), "--instance", "db"]),
        "show",
    );
    assert!(table.contains("PAGE(summary)"), "{table}");
    ok(env.validate(&["-i", &sum]), "validate the summary backup");

    compare_with_index(&env, &full, &sum);

    let mut r = env.restore_and_start(
        "r-sum",
        &[
            "-i",
            &sum,
            "--recovery-target-name",
            "after_summary",
            "--recovery-target-action",
            "pause",
        ],
        false,
    );
    wait_paused(&r);
    same_dump(
        &Env::dumpall(&r),
        &dump,
        &format!("PG{major}: FULL + summary backup restored"),
    );
    amcheck_all(&r, &["postgres"]);
    assert_eq!(r.psql("db_fc", "select count(*) from fc"), "3000");
    assert_eq!(
        r.psql("postgres", "select count(*), max(id) from t_trunc"),
        "6000|6000"
    );
    r.stop();

    gap_is_fatal(&env, &sum);
}

/// For the WAL between the FULL's start and the summary backup's start, the summaries'
/// change map holds every block walnut's index holds (compared over the segments wholly
/// inside that range: the index's unit is the segment).
fn compare_with_index(env: &Env, full: &str, sum: &str) {
    let pg = &env.pg;
    let lsn = |id: &str| -> Lsn { env.row(id)["start_lsn"].as_str().unwrap().parse().unwrap() };
    let (a, b) = (lsn(full), lsn(sum));
    let seg = 1u32 << 20;
    let smap = walnut::backup::summary::change_map(&pg.data, &[], 1, a, b).unwrap();
    let (first, last) = (a.segno(seg) + 1, b.segno(seg) - 1);
    assert!(last > first + 3, "too little WAL between {a} and {b}");
    let imap = walnut::backup::plan::change_map(
        &env.archive(),
        &[],
        1,
        Lsn(first * seg as u64),
        Lsn((last + 1) * seg as u64 - 1),
        seg,
    )
    .unwrap();
    let (mut blocks, mut limits, mut vm_fsm_only_in_index) = (0u64, 0u64, 0u64);
    for (k, fc) in &imap.forks {
        if smap.whole_db(k.spc, k.db) {
            continue;
        }
        let s = smap.fork(k);
        let slimit = s.and_then(|s| s.limit_block);
        let covered =
            |b: u32| s.is_some_and(|s| s.blocks.contains(b)) || slimit.is_some_and(|l| l <= b);
        if k.fork == VM_FORKNUM || k.fork == FSM_FORKNUM {
            // copied whole by every PAGE backup; the summarizer missed VM references
            // before 17.7/18.6 (WAL-FORMAT §3.9)
            vm_fsm_only_in_index += fc.blocks.iter().filter(|&b| !covered(b)).count() as u64;
            continue;
        }
        for blk in fc.blocks.iter() {
            assert!(
                covered(blk),
                "{k:?} block {blk} is in walnut's index but not in the WAL summaries \
                 (summary entry {s:?})"
            );
            blocks += 1;
        }
        if let Some(l) = fc.limit_block {
            assert!(
                slimit.is_some_and(|sl| sl <= l),
                "{k:?}: walnut's index has limit block {l}, the summaries {slimit:?}"
            );
            limits += 1;
        }
    }
    for &(spc, db) in &imap.whole_dbs {
        // a database created by WAL_LOG: the summaries have each of its files created
        assert!(
            smap.whole_db(spc, db)
                || smap
                    .forks
                    .iter()
                    .any(|(k, f)| k.spc == spc && k.db == db && f.limit_block == Some(0)),
            "database ({spc}, {db}) is whole in walnut's index but not in the summaries"
        );
    }
    let fc_oid: u32 = pg
        .psql(
            "postgres",
            "select oid from pg_database where datname = 'db_fc'",
        )
        .parse()
        .unwrap();
    assert!(
        smap.whole_db(1663, fc_oid),
        "the FILE_COPY database's sentinel"
    );
    let trunc: u32 = pg
        .psql("postgres", "select pg_relation_filenode('t_trunc')")
        .parse()
        .unwrap();
    let key = walnut::index::RelFork {
        spc: 1663,
        db: pg
            .psql(
                "postgres",
                "select oid from pg_database where datname = 'postgres'",
            )
            .parse()
            .unwrap(),
        rel: trunc,
        fork: 0,
    };
    assert!(
        smap.fork(&key).and_then(|f| f.limit_block).is_some(),
        "the VACUUM truncation of t_trunc is a limit block in the summaries"
    );
    assert!(
        blocks > 1000 && limits > 5,
        "{blocks} blocks, {limits} limits"
    );
    say(&format!(
        "summary: WAL {a}..{b}: summaries hold all {blocks} main/init blocks and {limits} \
         limit blocks of walnut's index; {vm_fsm_only_in_index} VM/FSM blocks only in the \
         index (copied whole anyway)"
    ));
}

/// A summary missing from the range fails the next summary backup, naming the gap.
fn gap_is_fatal(env: &Env, parent: &str) {
    let pg = &env.pg;
    let from: Lsn = env.row(parent)["start_lsn"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    for _ in 0..2 {
        pg.pgbench(&["-t", "100", "-n", "postgres"]);
        pg.psql("postgres", "checkpoint");
        let redo = sql_lsn(pg, "select redo_lsn from pg_control_checkpoint()");
        wait_summarized(pg, redo);
    }
    let victim = pg.psql(
        "postgres",
        &format!(
            "select tli, start_lsn, end_lsn from pg_available_wal_summaries() \
             where start_lsn >= '{from}' order by start_lsn limit 1"
        ),
    );
    let f: Vec<&str> = victim.split('|').collect();
    let name = walnut::format::summary::SummaryName {
        tli: f[0].parse().unwrap(),
        start: f[1].parse().unwrap(),
        end: f[2].parse().unwrap(),
    };
    let path = pg.data.join("pg_wal/summaries").join(name.file_name());
    std::fs::remove_file(&path).unwrap();
    let before = env.show().len();
    let e = fails_with(
        env.backup1_cmd("summary"),
        "summary backup over a deleted summary",
        &["gap", "timeline 1", &name.end.to_string()],
    );
    assert_eq!(
        env.show().len(),
        before,
        "refused before anything was written"
    );
    say(&format!(
        "summary: {}",
        e.trim().lines().last().unwrap_or("")
    ));
}
