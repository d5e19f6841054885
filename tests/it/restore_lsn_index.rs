//! lsn-mode incremental restore by the destination's own WAL index (issue 13, the
//! wal-index route): after a failover, the old primary (which archived into the same
//! catalog, its last segments only in its pg_wal) is re-seeded from the promoted side's
//! PAGE reading almost nothing of itself; whatever cannot be proven falls back to the page
//! scan, with its reason, and every result equals a full restore's.
use std::path::{Path, PathBuf};

use super::env::*;
use super::harness::*;
use super::restore_incremental::{bytes_written, incremental};

fn cp_a(from: &Path, to: &Path) {
    run_ok(std::process::Command::new("cp").arg("-a").arg(from).arg(to));
}

/// The route `--plan --format json` reports for an lsn restore of `id` into `dir`.
fn planned_route(env: &Env, dir: &Path, id: &str) -> (String, String) {
    let out = ok(
        incremental(env, dir, "lsn", &["-i", id, "--plan", "--format", "json"]),
        "lsn plan",
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &v["lsn_route"];
    (
        r["route"].as_str().unwrap_or("").to_string(),
        r["detail"].as_str().unwrap_or("").to_string(),
    )
}

/// Runs the lsn restore; returns (route, blocks kept unread, destination bytes read, bytes
/// written, bytes total).
fn lsn_restore(env: &Env, dir: &Path, id: &str) -> (String, u64, u64, u64, u64) {
    let out = ok(incremental(env, dir, "lsn", &["-i", id]), "lsn restore");
    eprintln!("lsn restore into {}: {}", dir.display(), out.trim());
    let first = out.lines().next().unwrap();
    // "lsn route R (N blocks kept without reading the destination; M bytes of the destination read)"
    let w: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(w[0..2], ["lsn", "route"], "{first}");
    let unread: u64 = w[3].trim_start_matches('(').parse().unwrap();
    let read: u64 = w[10].parse().unwrap();
    let (written, total) = bytes_written(out.lines().nth(1).unwrap());
    (w[2].to_string(), unread, read, written, total)
}

/// Starts a restored directory (no archiving), waits for the end of recovery and returns
/// its dump; with `check`, pg_amcheck and pg_checksums must be clean.
fn started_dump(env: &Env, dir: &Path, name: &str, check: bool) -> String {
    let sock = pg_mkdir(&env.path(&format!("{name}-sock")));
    let mut r = env.pg.existing_like(dir, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_promoted(&r);
    let dump = Env::dumpall(&r);
    if check {
        super::restore_incremental::check_clean(&mut r, name);
    } else {
        r.stop();
    }
    dump
}

/// Every path below `root`, relative to it.
fn paths(root: &Path) -> Vec<PathBuf> {
    super::restore_incremental::snapshot(root)
        .into_keys()
        .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
        .collect()
}

/// The segment before `name` (1 MiB segments: 4096 a log file).
fn prev_segment(name: &str) -> String {
    let tli = &name[..8];
    let log = u32::from_str_radix(&name[8..16], 16).unwrap();
    let seg = u32::from_str_radix(&name[16..24], 16).unwrap();
    let (log, seg) = if seg == 0 {
        (log - 1, 0xFFF)
    } else {
        (log, seg - 1)
    };
    format!("{tli}{log:08X}{seg:08X}")
}

/// Segments of `dir`'s pg_wal still waiting to be archived, in order.
fn ready_segments(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("pg_wal/archive_status"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_suffix(".ready")
                .filter(|s| s.len() == 24)
                .map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

/// Failover: the primary P takes a FULL; a copy C of it is promoted (timeline 2), archives
/// into the same catalog, changes and takes a PAGE. The old primary P went on changing
/// (archiving at first, then with a failing archive_command so that its last segments are
/// only in its pg_wal) and was stopped cleanly. The lsn restore of C's PAGE into P takes
/// the wal-index route, reads under a tenth of P and gives the full restore's dump, clean
/// amcheck and checksums. Then the fallbacks, on copies of P: a local-only segment removed,
/// a local segment that differs from the archived one: each the page-scan route, with its
/// reason, and the same dump.
#[test]
fn lsn_restore_by_the_destinations_wal_index() {
    let mut env = Env::new("rlsn-idx");
    env.pg.pgbench(&["-i", "-s", "5", "-q", "postgres"]);
    env.pg.psql("postgres", "checkpoint");
    let full = env.backup1("full");

    // C: the FULL restored and promoted, archiving into the same catalog
    let cdir = env.path("c");
    ok(
        env.restore_cmd(
            &cdir,
            &[
                "-i",
                &full,
                "--recovery-target",
                "immediate",
                "--recovery-target-action",
                "promote",
            ],
        ),
        "restore C",
    );
    let csock = pg_mkdir(&env.path("c-sock"));
    let mut c = env.pg.existing_like(&cdir, &csock);
    c.start();
    wait_promoted(&c);

    // P, unaware, goes on: archived first, then only in its pg_wal
    env.pg.pgbench(&["-n", "-t", "450", "-c", "1", "postgres"]);
    env.pg.psql(
        "postgres",
        "create table only_on_old_primary as select 1 as i",
    );
    // forks replaced, dropped and truncated, a database created and one dropped: those
    // files get the page scan (or are not in the backup), inside the wal-index route
    env.pg.psql("postgres", "truncate pgbench_history");
    env.pg
        .psql("postgres", "delete from pgbench_tellers where tid > 10");
    env.pg.psql("postgres", "vacuum pgbench_tellers");
    env.pg.psql("postgres", "create database extra");
    env.pg.psql("postgres", "drop database extra");
    env.pg.psql("postgres", "create database extra2");
    env.switch_and_wait(&env.pg);
    env.pg
        .psql("postgres", "alter system set archive_command = 'false'");
    env.pg.psql("postgres", "select pg_reload_conf()");
    for _ in 0..3 {
        env.pg.pgbench(&["-n", "-t", "100", "-c", "1", "postgres"]);
        env.pg.psql("postgres", "select pg_switch_wal()");
    }
    env.pg.pgbench(&["-n", "-t", "50", "-c", "1", "postgres"]);
    env.pg.stop();
    let ready = ready_segments(&env.pg.data);
    assert!(ready.len() >= 3, "local-only segments of P: {ready:?}");

    // C changes and takes the PAGE
    c.pgbench(&["-n", "-t", "300", "-c", "1", "postgres"]);
    c.psql(
        "postgres",
        "create table after_failover as select generate_series(1, 1000) i",
    );
    let page = env.backup1_on(&c, "page");
    env.switch_and_wait(&c);
    c.stop();

    let image = env.path("image");
    cp_a(&env.pg.data, &image);
    let pdir = env.pg.data.clone();

    // the full restore, the reference
    let fdir = env.path("full");
    ok(env.restore_cmd(&fdir, &["-i", &page]), "full restore");
    let want_paths = paths(&fdir);
    let want = started_dump(&env, &fdir, "full", false);
    std::fs::remove_dir_all(&fdir).unwrap();

    // the wal-index route
    let (route, detail) = planned_route(&env, &pdir, &page);
    assert_eq!(route, "wal-index", "{detail}");
    let (route, unread, read, written, total) = lsn_restore(&env, &pdir, &page);
    assert_eq!(route, "wal-index");
    assert!(unread > 5000, "{unread} blocks kept unread");
    assert!(
        read * 10 < total,
        "{read} bytes of the destination read, of {total}"
    );
    assert!(written * 4 < total, "{written} of {total} bytes written");
    // what the backup lacks (the old primary's WAL segments, database extra2) is gone
    assert_eq!(paths(&pdir), want_paths, "files after the lsn restore");
    let got = started_dump(&env, &pdir, "lsn", true);
    same_dump(&got, &want, "wal-index route");
    assert!(!got.contains("only_on_old_primary"));

    // fallback: a segment only in the destination's pg_wal is gone
    let d1 = env.path("fb-missing");
    cp_a(&image, &d1);
    std::fs::remove_file(d1.join("pg_wal").join(&ready[0])).unwrap();
    let (route, detail) = planned_route(&env, &d1, &page);
    assert_eq!(route, "page-scan", "{detail}");
    assert!(
        detail.contains(&ready[0]) && detail.contains("neither in its pg_wal nor in the archive"),
        "{detail}"
    );
    let (route, unread, ..) = lsn_restore(&env, &d1, &page);
    assert_eq!((route.as_str(), unread), ("page-scan", 0));
    same_dump(
        &started_dump(&env, &d1, "fb-missing", false),
        &want,
        "missing local segment",
    );
    std::fs::remove_dir_all(&d1).unwrap();

    // fallback: a local segment whose content differs from the archived one
    let d2 = env.path("fb-differs");
    cp_a(&image, &d2);
    let archived = prev_segment(&ready[0]);
    let name: walnut::WalFileName = archived.parse().unwrap();
    let mut bytes = env.archive().read(&name).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let local: PathBuf = d2.join("pg_wal").join(&archived);
    std::fs::write(&local, &bytes).unwrap();
    chown_pg(&local);
    let (route, detail) = planned_route(&env, &d2, &page);
    assert_eq!(route, "page-scan", "{detail}");
    assert!(
        detail.contains(&archived) && detail.contains("differs from the archived one"),
        "{detail}"
    );
    let (route, ..) = lsn_restore(&env, &d2, &page);
    assert_eq!(route, "page-scan");
    same_dump(
        &started_dump(&env, &d2, "fb-differs", false),
        &want,
        "differing local segment",
    );
}

/// The promoted copy archived nothing (archive_mode off, the bench's old setup): its
/// timeline's history is not in the catalog, so the page-scan route, with that reason,
/// and the source's dump.
#[test]
fn lsn_restore_falls_back_when_the_copy_archived_nothing() {
    let env = Env::new("rlsn-noarch");
    env.pg.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    env.pg.psql("postgres", "checkpoint");
    let full = env.backup1("full");
    let copy = super::restore_incremental::promoted_copy(&env, &full, "copy", |pg| {
        pg.pgbench(&["-n", "-t", "200", "-c", "1", "postgres"]);
    });
    env.pg.pgbench(&["-n", "-t", "200", "-c", "1", "postgres"]);
    let page = env.backup1("page");
    env.switch_and_wait(&env.pg);
    let want = Env::dumpall(&env.pg);
    let (route, detail) = planned_route(&env, &copy.data, &page);
    assert_eq!(route, "page-scan", "{detail}");
    assert!(
        detail.contains("00000002.history") && detail.contains("not in the archive"),
        "{detail}"
    );
    let (route, unread, ..) = lsn_restore(&env, &copy.data, &page);
    assert_eq!((route.as_str(), unread), ("page-scan", 0));
    same_dump(
        &started_dump(&env, &copy.data, "noarch", true),
        &want,
        "page-scan route",
    );
}

/// Roll-back: the primary itself, ahead of its PAGE on the same timeline and stopped
/// cleanly, restored in lsn mode to the PAGE's consistency point: the pages it changed
/// after the PAGE's start are not kept (by its WAL index, or by the page scan when its last
/// segment is gone), and the dump is the PAGE's.
#[test]
fn lsn_roll_back_of_the_same_cluster() {
    let mut env = Env::new("rlsn-back");
    env.pg.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    env.pg.psql("postgres", "checkpoint");
    let _full = env.backup1("full");
    env.pg.pgbench(&["-n", "-t", "200", "-c", "1", "postgres"]);
    let page = env.backup1("page");
    env.switch_and_wait(&env.pg);
    // after the PAGE: changes, some archived, the last only in pg_wal
    env.pg.pgbench(&["-n", "-t", "300", "-c", "1", "postgres"]);
    env.pg
        .psql("postgres", "create table after_page as select 1 as i");
    env.switch_and_wait(&env.pg);
    env.pg.pgbench(&["-n", "-t", "100", "-c", "1", "postgres"]);
    env.pg.stop();
    let image = env.path("image");
    cp_a(&env.pg.data, &image);
    let target = [
        "--recovery-target",
        "immediate",
        "--recovery-target-action",
        "promote",
    ];

    let fdir = env.path("full");
    let mut a = vec!["-i", page.as_str()];
    a.extend_from_slice(&target);
    ok(env.restore_cmd(&fdir, &a), "full restore");
    let want = started_dump(&env, &fdir, "full", false);
    assert!(!want.contains("after_page"));
    std::fs::remove_dir_all(&fdir).unwrap();

    let run_lsn = |dir: &Path| {
        let mut a = vec!["-i", page.as_str()];
        a.extend_from_slice(&target);
        let out = ok(incremental(&env, dir, "lsn", &a), "lsn roll-back");
        eprintln!("{}", out.trim());
        out.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .to_string()
    };
    let pdir = env.pg.data.clone();
    assert_eq!(run_lsn(&pdir), "wal-index");
    same_dump(
        &started_dump(&env, &pdir, "lsn-back", true),
        &want,
        "roll-back by the wal-index route",
    );
    // the page scan: the checkpoint's segment gone from pg_wal
    let d = env.path("scan");
    cp_a(&image, &d);
    let ctl = run_ok(env.pg.cmd("pg_controldata").arg("-D").arg(&d));
    let redo_wal = ctl
        .lines()
        .find(|l| l.starts_with("Latest checkpoint's REDO WAL file:"))
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    std::fs::remove_file(d.join("pg_wal").join(&redo_wal)).unwrap();
    assert_eq!(run_lsn(&d), "page-scan");
    same_dump(
        &started_dump(&env, &d, "scan-back", false),
        &want,
        "roll-back by the page scan",
    );
}

/// A copy restored from an older FULL and promoted past a newer FULL's start keeps, until
/// its first checkpoint, a redo pointer older than that FULL's start: hint bits it sets
/// then may not be logged. lsn mode refuses it before any write ("redo pointer at
/// promotion", checksum mode offered); checksum mode restores it to the PAGE's content. A
/// copy restored from the newer FULL passes the same check.
#[test]
fn lsn_refuses_a_copy_promoted_from_an_older_backup() {
    let env = Env::new("rlsn-redo");
    env.pg.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    env.pg.psql("postgres", "checkpoint");
    let full1 = env.backup1("full");
    env.pg.pgbench(&["-n", "-t", "200", "-c", "1", "postgres"]);
    let full2 = env.backup1("full");
    let past_full2 = env.pg.psql("postgres", "select pg_current_wal_lsn()");
    env.pg.pgbench(&["-n", "-t", "200", "-c", "1", "postgres"]);
    env.switch_and_wait(&env.pg);
    // the copy: FULL1 recovered past FULL2's start, promoted, changed, stopped cleanly
    let dir = env.path("old-copy");
    ok(
        env.restore_cmd(
            &dir,
            &[
                "-i",
                &full1,
                "--recovery-target-lsn",
                past_full2.trim(),
                "--recovery-target-action",
                "promote",
            ],
        ),
        "restore the copy from FULL1",
    );
    let sock = pg_mkdir(&env.path("old-copy-sock"));
    let mut copy = env.pg.existing_like(&dir, &sock);
    copy.append_conf("archive_mode = off");
    copy.start();
    wait_promoted(&copy);
    copy.pgbench(&["-n", "-t", "100", "-c", "1", "postgres"]);
    copy.stop();
    let page = env.backup1("page");
    env.switch_and_wait(&env.pg);
    let want = Env::dumpall(&env.pg);
    let before = super::restore_incremental::snapshot(&dir);
    super::restore_incremental::refused_unchanged(
        incremental(&env, &dir, "lsn", &["-i", &page]),
        &dir,
        &before,
        &[
            "redo pointer at promotion",
            "backup_label.old",
            "--incremental-mode checksum",
        ],
        "copy of an older FULL",
    );
    ok(
        incremental(&env, &dir, "checksum", &["-i", &page]),
        "checksum restore of the refused copy",
    );
    same_dump(
        &started_dump(&env, &dir, "redo-cks", true),
        &want,
        "checksum mode over the refused copy",
    );
    // a copy of FULL2 itself, promoted at its consistency point: the check passes
    let copy2 = super::restore_incremental::promoted_copy(&env, &full2, "copy2", |pg| {
        pg.pgbench(&["-n", "-t", "100", "-c", "1", "postgres"]);
    });
    let out = ok(
        incremental(&env, &copy2.data, "lsn", &["-i", &page, "--plan"]),
        "plan over a copy of FULL2",
    );
    assert!(
        out.lines()
            .any(|l| l.contains("redo pointer at promotion") && l.contains("backup_label.old")),
        "{out}"
    );
}
