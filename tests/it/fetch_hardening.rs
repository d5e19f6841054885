//! Issue 8, the WAL archive side: "not archived" only when truly absent, panics and bad
//! `instance.json` are fatal to recovery, leftovers of killed fetches are removed, a stalled
//! pusher holds nobody, a deleted catalog is never recreated, `--help` exits 0, and a
//! segment of another cluster is never served.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::archive::{archived_segments, fetch, fname, make_segments, push, show_json, wait_for};
use super::env::{stderr, wait_promoted};
use super::harness::*;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn archive_of(cat: &Path) -> walnut::archive::WalArchive {
    let catalog = walnut::catalog::Catalog::open(cat).unwrap();
    walnut::archive::WalArchive::open(&catalog, "db").unwrap()
}

/// Asserts walnut-fetch exited 200 (fatal to recovery) naming `what`, and wrote nothing.
fn assert_fatal(out: &Output, what: &str, dest: &Path, case: &str) {
    assert_eq!(
        out.status.code(),
        Some(walnut::EXIT_FETCH_FATAL),
        "{case}: {out:?}"
    );
    let e = stderr(out);
    assert!(e.contains(what), "{case}: stderr does not name {what}: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{case}: not one line: {e}");
    assert!(!dest.exists(), "{case}: something was written to %p");
}

/// Exit 1 only for a name that is definitely absent: an unreadable timeline directory, a
/// timeline "directory" that is a file, a missing archive directory, a symlinked segment or
/// timeline directory are all fatal (200), for the segment, its `.partial` candidate and
/// `.history` files alike; `show --archive` flags them and the read API the backups use
/// (index_state, read_opt) reports them as errors, not as absent.
#[test]
fn fetch_says_absent_only_when_definitely_absent() {
    let dir = pg_tempdir("fh-absent");
    let (segs, cat) = archived_segments(dir.path(), "x", 3);
    let wal = cat.join("instances/db/wal");
    let tli1 = wal.join("00000001");
    let dest = pg_mkdir(&dir.path().join("rec/pg_wal")).join("RECOVERYXLOG");
    let seg = fname(&segs[1]);
    let absent_seg = "0000000100000000000000F0";

    // truly absent: 1
    assert_eq!(fetch(&cat, absent_seg, &dest).status.code(), Some(1));
    assert_eq!(
        fetch(&cat, "00000002.history", &dest).status.code(),
        Some(1)
    );

    // a timeline directory the fetching user cannot read: 200 for present and absent names
    chmod(&tli1, 0o000);
    let out = fetch(&cat, &seg, &dest);
    chmod(&tli1, 0o755);
    assert_fatal(
        &out,
        &seg,
        &dest,
        "unreadable timeline dir, archived segment",
    );
    chmod(&tli1, 0o000);
    let out = fetch(&cat, absent_seg, &dest);
    chmod(&tli1, 0o755);
    assert_fatal(
        &out,
        absent_seg,
        &dest,
        "unreadable timeline dir, absent segment",
    );
    // the same through show --archive (as the cluster owner): not a clean report
    chmod(&tli1, 0o000);
    let out = walnut(&[
        "show",
        "-B",
        cat.to_str().unwrap(),
        "--instance",
        "db",
        "--archive",
    ]);
    chmod(&tli1, 0o755);
    assert!(
        !out.status.success(),
        "show of an unreadable archive: {out:?}"
    );

    // an unreadable archive directory: a history file is not "absent" either
    chmod(&wal, 0o000);
    let out = fetch(&cat, "00000002.history", &dest);
    chmod(&wal, 0o755);
    assert_fatal(
        &out,
        "00000002.history",
        &dest,
        "unreadable archive dir, history",
    );

    // a timeline "directory" that is a file (ENOTDIR), for a history file
    std::fs::write(wal.join("00000002"), b"not a directory").unwrap();
    let out = fetch(&cat, "00000002.history", &dest);
    assert_fatal(&out, "00000002.history", &dest, "timeline dir is a file");
    std::fs::remove_file(wal.join("00000002")).unwrap();

    // the archive directory itself missing: damage, not absence
    let moved = cat.join("instances/db/wal-moved");
    std::fs::rename(&wal, &moved).unwrap();
    let out = fetch(&cat, absent_seg, &dest);
    std::fs::rename(&moved, &wal).unwrap();
    assert_fatal(&out, absent_seg, &dest, "archive directory missing");

    // a segment that is a symlink (to an intact copy elsewhere): damage, never served
    let lz4 = tli1.join(format!("{seg}.lz4"));
    let elsewhere = dir.path().join("elsewhere.lz4");
    std::fs::rename(&lz4, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &lz4).unwrap();
    let out = fetch(&cat, &seg, &dest);
    assert_fatal(&out, &seg, &dest, "symlinked segment");
    show_flags_corrupt(&cat, &seg);
    let ar = archive_of(&cat);
    let name: walnut::WalFileName = seg.parse().unwrap();
    let segno = name.segno(1 << 20).unwrap();
    assert!(ar.is_archived(&name).is_err());
    assert!(ar.read_opt(&name).is_err());
    assert!(
        ar.index_state(1, segno).is_err(),
        "PAGE planning must not see a symlinked segment as archived or absent"
    );
    std::fs::remove_file(&lz4).unwrap();
    std::fs::rename(&elsewhere, &lz4).unwrap();

    // a symlinked timeline directory: damage too
    let tli_moved = wal.join("t1-real");
    std::fs::rename(&tli1, &tli_moved).unwrap();
    std::os::unix::fs::symlink(&tli_moved, &tli1).unwrap();
    let out = fetch(&cat, &seg, &dest);
    std::fs::remove_file(&tli1).unwrap();
    std::fs::rename(&tli_moved, &tli1).unwrap();
    assert_fatal(&out, &seg, &dest, "symlinked timeline dir");

    // .partial fallback: the segment is absent but the partial's name is damaged: 200
    let p = "0000000100000000000000F1";
    std::fs::create_dir(tli1.join(format!("{p}.partial.lz4"))).unwrap();
    let out = fetch(&cat, p, &dest);
    assert_fatal(&out, p, &dest, "damaged .partial candidate");
    std::fs::remove_dir(tli1.join(format!("{p}.partial.lz4"))).unwrap();

    // and everything intact again is served
    ok(fetch(&cat, &seg, &dest), "fetch after repair");
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&segs[1]).unwrap());
}

/// Segments `first..=last` (by name) of a stopped cluster's pg_wal.
fn wal_names_between(pg_wal: &Path, first: &str, last: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pg_wal)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.as_str() >= first && n.as_str() <= last)
        .collect();
    v.sort();
    v
}

/// A cluster (1 MiB segments, checksums) archiving into DIR/cat.
fn archiving_cluster(dir: &Path, name: &str) -> (Pg, PathBuf) {
    let mut pg = Pg::init(&pg_bin(), dir, name, &["-k", "--wal-segsize=1"]);
    let cat_dir = pg_mkdir(&dir.join(format!("{name}-c")));
    let cat = catalog_for(&cat_dir, &pg);
    pg.append_conf(&format!(
        "archive_mode = on\narchive_command = '{} -B {} --instance db %p %f'\nwal_keep_size = '1GB'\ncheckpoint_timeout = '1h'",
        walnut_bin("walnut-archive").display(),
        cat.display()
    ));
    pg.start();
    (pg, cat)
}

fn walfile_now(pg: &Pg) -> String {
    pg.psql("postgres", "select pg_walfile_name(pg_current_wal_lsn())")
}

fn switch_archived(pg: &Pg, cat: &Path) -> String {
    switch_and_wait_in_catalog(pg, cat).to_string()
}

fn full_backup(pg: &Pg, cat: &Path) -> String {
    let conn = pg.conn_args();
    let mut args = vec!["backup", "-B", cat.to_str().unwrap(), "--instance", "db"];
    args.extend(["-b", "full"]);
    args.extend(conn.iter().map(String::as_str));
    ok(walnut(&args), "full backup").trim().to_string()
}

fn restore_to(cat: &Path, target: &Path) {
    ok(
        walnut(&[
            "restore",
            "-B",
            cat.to_str().unwrap(),
            "--instance",
            "db",
            "-D",
            target.to_str().unwrap(),
        ]),
        "restore",
    );
}

/// `show --archive --verify` is not clean and lists `seg` as corrupt.
fn show_flags_corrupt(cat: &Path, seg: &str) {
    let (clean, report) = show_json(cat, true);
    assert!(!clean, "{report}");
    assert!(
        report["timelines"][0]["corrupt"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c[0].as_str() == Some(seg)),
        "{report}"
    );
}

/// The server restored at `target`, set up to run beside the others without archiving.
fn restored_server(dir: &Path, target: &Path) -> Pg {
    let sock = pg_mkdir(&dir.join("r-sock"));
    let r = Pg::existing(&pg_bin(), target, &sock);
    r.append_conf("archive_mode = off");
    r
}

/// Asserts that recovery stopped (`exited`, walnut-fetch exited 200) instead of ending and
/// promoting; returns the server log.
fn recovery_stopped(r: &mut Pg, exited: bool, what: &str) -> String {
    let log = r.server_log();
    assert!(exited, "{what} and promoted:\n{log}");
    r.set_running(false);
    assert!(log.contains("exit code 200"), "{log}");
    log
}

/// Starts the restored server again, waits until it has recovered everything and promoted,
/// checks that `t` has all `rows` and stops it.
fn recovers_all(r: &mut Pg, rows: &str) {
    r.start();
    wait_promoted(r);
    assert_eq!(r.psql("postgres", "select count(*) from t"), rows);
    r.stop();
}

/// Waits until the restored server has exited by itself (recovery FATAL) or has promoted;
/// returns whether it exited.
fn wait_exit_or_promotion(r: &Pg, secs: u64) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        let log = r.server_log();
        if log.contains("archive recovery complete") || log.contains("selected new timeline ID") {
            return false;
        }
        if !r.data.join("postmaster.pid").exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "restored server neither stopped nor promoted in {secs} s\n{}",
        r.server_log()
    );
}

/// The data loss: a restore whose archive timeline directory the server cannot
/// read must not end recovery early and promote with part of the data (walnut-fetch used to
/// answer "not archived"). Recovery stops (exit 200); once the directory is readable again,
/// the same restore completes with every row.
#[test]
fn unreadable_timeline_dir_stops_recovery_instead_of_promoting() {
    let dir = pg_tempdir("fh-eacces");
    let (mut pg, cat) = archiving_cluster(dir.path(), "a");
    pg.psql("postgres", "create table t(i int)");
    pg.psql("postgres", "insert into t select generate_series(1, 10000)");
    let first = walfile_now(&pg);
    full_backup(&pg, &cat);
    let last = walfile_now(&pg);
    switch_archived(&pg, &cat);
    for _ in 0..2 {
        pg.psql("postgres", "insert into t select generate_series(1, 10000)");
        switch_archived(&pg, &cat);
    }
    pg.stop();

    let target = dir.path().join("restored");
    restore_to(&cat, &target);
    // What pg_basebackup -X would leave: the backup's own WAL in pg_wal. Recovery then
    // reaches consistency without the archive, and an answer "not archived" for everything
    // after it ends recovery early.
    for n in wal_names_between(&pg.data.join("pg_wal"), &first, &last) {
        std::fs::copy(
            pg.data.join("pg_wal").join(&n),
            target.join("pg_wal").join(&n),
        )
        .unwrap();
    }
    chown_pg(&target.join("pg_wal"));
    let mut r = restored_server(dir.path(), &target);
    let tli1 = cat.join("instances/db/wal/00000001");
    chmod(&tli1, 0o000);
    r.start_nowait();
    let exited = wait_exit_or_promotion(&r, 120);
    chmod(&tli1, 0o755);
    let log = recovery_stopped(&mut r, exited, "recovery ended early");
    assert!(log.contains("walnut-fetch: FATAL"), "{log}");

    // readable again: the same restore recovers everything
    recovers_all(&mut r, "30000");
}

/// A bad `instance.json` is a clear corruption error (wal_segment_size 0 used to divide by
/// zero and exit 101, which PostgreSQL reads as "not found"); a panic exits 200 in
/// walnut-fetch and 1 in walnut-archive, with a one-line message.
#[test]
fn bad_instance_json_and_panics_are_fatal_not_absent() {
    let dir = pg_tempdir("fh-instance");
    let cat = dir.path().join("cat");
    ok(walnut(&["init", "-B", cat.to_str().unwrap()]), "init");
    let idir = pg_mkdir(&cat.join("instances/db"));
    pg_mkdir(&idir.join("wal"));
    let good = serde_json::json!({
        "name": "db", "system_id": 7_000_000_000_000_000_001u64, "pg_major": 15,
        "wal_segment_size": 16777216, "wal_page_size": 8192, "block_size": 8192,
        "relseg_size": 131072, "data_checksums": true, "pgdata": "/nonexistent/pgdata",
        "host": null, "port": null, "user": null, "dbname": null
    });
    let dest = pg_mkdir(&dir.path().join("pg_wal")).join("RECOVERYXLOG");
    let seg = "000000010000000000000001";
    let write = |v: &serde_json::Value| {
        std::fs::write(idir.join("instance.json"), v.to_string()).unwrap();
        chown_pg(&idir);
    };
    write(&good);
    assert_eq!(fetch(&cat, seg, &dest).status.code(), Some(1));
    for (field, bad) in [
        ("wal_segment_size", serde_json::json!(0)),
        ("wal_segment_size", serde_json::json!(3 << 20)),
        ("wal_segment_size", serde_json::json!(1u64 << 31)),
        ("wal_page_size", serde_json::json!(0)),
        ("block_size", serde_json::json!(1000)),
        ("relseg_size", serde_json::json!(0)),
        ("pg_major", serde_json::json!(9)),
        ("system_id", serde_json::json!(0)),
        ("name", serde_json::json!("other")),
        ("pgdata", serde_json::json!("relative/dir")),
    ] {
        let mut v = good.clone();
        v[field] = bad.clone();
        write(&v);
        let case = format!("{field} = {bad}");
        let out = fetch(&cat, seg, &dest);
        assert_fatal(&out, "instance.json", &dest, &case);
        assert!(stderr(&out).contains(field), "{case}: {}", stderr(&out));
        let out = push(&cat, &dest, seg, &[]);
        assert_eq!(out.status.code(), Some(1), "{case}: {out:?}");
        assert!(stderr(&out).contains("instance.json"), "{case}: {out:?}");
    }
    write(&good);

    // a panic anywhere in walnut-fetch is fatal to recovery, never 101
    let mut c = as_pg(walnut_bin("walnut-fetch"));
    c.env("WALNUT_TEST_PANIC", "1")
        .arg("-B")
        .arg(&cat)
        .args(["--instance", "db", seg])
        .arg(&dest);
    let out = run(&mut c);
    assert_fatal(&out, "panic", &dest, "walnut-fetch panic");
    let mut c = as_pg(walnut_bin("walnut-archive"));
    c.env("WALNUT_TEST_PANIC", "1")
        .arg("-B")
        .arg(&cat)
        .args(["--instance", "db"])
        .arg(&dest)
        .arg(seg);
    let out = run(&mut c);
    assert_eq!(out.status.code(), Some(1), "walnut-archive panic: {out:?}");
    assert!(stderr(&out).contains("panic"), "{out:?}");
}

/// Temp files of a killed walnut-fetch (16 MiB each in pg_wal) are removed by the next
/// fetch that reads the archive and by `--cleanup`; nothing else is touched.
#[test]
fn killed_fetch_leftovers_are_removed() {
    let dir = pg_tempdir("fh-temps");
    let (segs, cat) = archived_segments(dir.path(), "x", 2);
    let pg_wal = pg_mkdir(&dir.path().join("rec/pg_wal"));
    let dest = pg_wal.join("RECOVERYXLOG");
    // a killed fetch's file (pid 2147483646 never runs), and files that must stay: other
    // names, and a temp file whose writer (this test) is alive
    let stale = [
        ".RECOVERYXLOG.walnut-tmp.2147483646.1796000000000000000",
        ".RECOVERYHISTORY.walnut-tmp.2147483645.17",
    ];
    let keep = [
        ".RECOVERYXLOG.walnut-tmp.notapid.1".to_string(),
        "RECOVERYXLOG.walnut-tmp.2147483646.1".to_string(),
        "000000010000000000000009".to_string(),
        format!(".RECOVERYXLOG.walnut-tmp.{}.1", std::process::id()),
    ];
    let plant = || {
        for n in stale {
            std::fs::write(pg_wal.join(n), vec![0u8; 1 << 20]).unwrap();
        }
        for n in &keep {
            std::fs::write(pg_wal.join(n), b"keep").unwrap();
        }
        chown_pg(&pg_wal);
    };
    let check = |what: &str| {
        for n in stale {
            assert!(!pg_wal.join(n).exists(), "{what}: {n} left behind");
        }
        for n in &keep {
            assert!(pg_wal.join(n).exists(), "{what}: {n} removed");
        }
    };
    plant();
    ok(fetch(&cat, &fname(&segs[0]), &dest), "fetch");
    check("next fetch");
    plant();
    let mut c = as_pg(walnut_bin("walnut-fetch"));
    c.arg("-B")
        .arg(&cat)
        .args(["--instance", "db", "--cleanup", "RECOVERYXLOG"])
        .arg(&dest);
    ok(run(&mut c), "--cleanup");
    check("--cleanup");
}

/// A child process killed (SIGKILL works on a stopped one too) when dropped, so a failing
/// test never leaves a stopped pusher behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Copies segments into a fake pg_wal with `.ready` status files (as root).
fn ready_pg_wal(dir: &Path, segs: &[PathBuf]) -> PathBuf {
    let pg_wal = dir.join("pgd/pg_wal");
    std::fs::create_dir_all(pg_wal.join("archive_status")).unwrap();
    for s in segs {
        std::fs::copy(s, pg_wal.join(fname(s))).unwrap();
        std::fs::write(
            pg_wal
                .join("archive_status")
                .join(format!("{}.ready", fname(s))),
            "",
        )
        .unwrap();
    }
    pg_wal
}

/// Starts the background pusher directly (as the running user), its caller archiving `own`.
fn spawn_pusher(cat: &Path, pg_wal: &Path, own: &str, ahead: &str) -> Reaped {
    let child = Command::new(walnut_bin("walnut-archive"))
        .arg("-B")
        .arg(cat)
        .args(["--instance", "db", "--look-ahead", ahead, "--background"])
        .arg(pg_wal.join(own))
        .arg(own)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pusher");
    Reaped(child)
}

/// A call with look-ahead, as PostgreSQL makes it (but as the running user).
fn archive_call(cat: &Path, pg_wal: &Path, name: &str) -> Output {
    run(Command::new(walnut_bin("walnut-archive"))
        .arg("-B")
        .arg(cat)
        .args(["--instance", "db", "--look-ahead", "2"])
        .arg(pg_wal.join(name))
        .arg(name))
}

/// A stopped background pusher (SIGSTOP) holds its lock but makes no progress: the next
/// calls push their segment themselves within seconds (not after 60 s), durably; once it
/// resumes, it exits and identical content pushed again is still success.
#[test]
fn stalled_pusher_does_not_hold_later_calls() {
    let dir = pg_tempdir("fh-stall");
    let (pg, segs) = make_segments(dir.path(), "x", 6);
    let cat = catalog_for(dir.path(), &pg);
    let pg_wal = ready_pg_wal(dir.path(), &segs);
    let names: Vec<String> = segs.iter().map(|s| fname(s)).collect();
    let spool = pg_wal.join("walnut-spool");
    let mut pusher = spawn_pusher(&cat, &pg_wal, &names[0], "2");
    for n in &names[1..=2] {
        assert!(
            wait_for(&spool.join(format!("{n}.ok")), 30),
            "{n} not acknowledged"
        );
    }
    // its pid, from its lock file
    let lock = std::fs::read_to_string(spool.join(".look-ahead.lock")).unwrap();
    let pid: i32 = lock
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in the pusher's lock file: {lock:?}"));
    assert_eq!(pid, pusher.0.id() as i32);
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();

    let ar = archive_of(&cat);
    for (i, limit) in [(3, 12), (4, 3)] {
        let t0 = Instant::now();
        ok(
            archive_call(&cat, &pg_wal, &names[i]),
            "call beside a stalled pusher",
        );
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(limit),
            "{}: took {took:?} beside a stalled pusher",
            names[i]
        );
        let got = ar.read(&names[i].parse().unwrap()).unwrap();
        assert!(
            got == std::fs::read(&segs[i]).unwrap(),
            "{} content",
            names[i]
        );
    }
    // an acknowledged one is still taken at once
    ok(archive_call(&cat, &pg_wal, &names[1]), "acknowledged call");

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let t0 = Instant::now();
    while pusher.0.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "pusher did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in &names[3..=4] {
        ok(archive_call(&cat, &pg_wal, n), "identical content again");
    }
}

/// A detached pusher whose catalog is deleted while it runs, and any call against a deleted
/// catalog, never recreate the catalog's directories.
#[test]
fn deleted_catalog_is_never_recreated() {
    let dir = pg_tempdir("fh-deleted");
    let (pg, segs) = make_segments(dir.path(), "x", 6);
    let cat = catalog_for(dir.path(), &pg);
    let pg_wal = ready_pg_wal(dir.path(), &segs);
    let names: Vec<String> = segs.iter().map(|s| fname(s)).collect();
    let spool = pg_wal.join("walnut-spool");
    // look-ahead 1: it pushes names[1], then waits for the acknowledgement to be consumed;
    // the catalog is deleted and the acknowledgement consumed (it lives in pg_wal), so the
    // pusher goes on to the next segment
    let mut pusher = spawn_pusher(&cat, &pg_wal, &names[0], "1");
    let ack = spool.join(format!("{}.ok", names[1]));
    assert!(wait_for(&ack, 30));
    for _ in 0..20 {
        if std::fs::remove_dir_all(&cat).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_file(&ack).unwrap();
    let t0 = Instant::now();
    while pusher.0.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "pusher did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!cat.exists(), "the pusher recreated the deleted catalog");
    // calls after the deletion, plain and as a pusher
    let out = archive_call(&cat, &pg_wal, &names[3]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let mut p = spawn_pusher(&cat, &pg_wal, &names[3], "4");
    let _ = p.0.wait();
    assert!(!cat.exists(), "a call recreated the deleted catalog");
}

/// `--help` and `--version` exit 0 in every binary; real usage errors keep their codes.
#[test]
fn help_and_version_exit_zero() {
    for (bin, usage_code) in [
        ("walnut", 2),
        ("walnut-archive", 1),
        ("walnut-fetch", walnut::EXIT_FETCH_FATAL),
    ] {
        for arg in ["--help", "--version"] {
            let out = run(Command::new(walnut_bin(bin)).arg(arg));
            assert_eq!(out.status.code(), Some(0), "{bin} {arg}: {out:?}");
            assert!(!out.stdout.is_empty(), "{bin} {arg}: no output");
        }
        for args in [&["--no-such-option"][..], &["-B"][..]] {
            let out = run(Command::new(walnut_bin(bin)).args(args));
            assert_eq!(
                out.status.code(),
                Some(usage_code),
                "{bin} {args:?}: {out:?}"
            );
        }
    }
}

/// A segment of another cluster copied into the catalog under the right name is never
/// served (walnut-fetch exits 200 naming it, so recovery stops instead of ending at it and
/// promoting), `show --archive --verify` flags it, a PAGE backup across it fails naming it;
/// a file with this cluster's archive header but foreign WAL, or another segment's WAL under
/// this name, is refused the same way.
#[test]
fn foreign_segment_is_never_served() {
    let dir = pg_tempdir("fh-foreign");
    let (mut a, cat_a) = archiving_cluster(dir.path(), "a");
    a.psql("postgres", "create table t(i int)");
    a.psql("postgres", "insert into t select generate_series(1, 10000)");
    full_backup(&a, &cat_a);
    a.psql("postgres", "insert into t select generate_series(1, 10000)");
    let victim = switch_archived(&a, &cat_a);
    a.psql("postgres", "insert into t select generate_series(1, 10000)");
    let next = switch_archived(&a, &cat_a);

    // cluster B archives its own segment of the same name
    let (mut b, cat_b) = archiving_cluster(dir.path(), "b");
    b.psql("postgres", "create table u(i int)");
    loop {
        b.psql("postgres", "insert into u select generate_series(1, 100)");
        let s = switch_archived(&b, &cat_b);
        if s >= victim {
            break;
        }
    }
    b.stop();
    let tli = |c: &Path| c.join("instances/db/wal/00000001");
    let dest = pg_mkdir(&dir.path().join("rec/pg_wal")).join("RECOVERYXLOG");
    let victim_lz4 = tli(&cat_a).join(format!("{victim}.lz4"));
    let own_copy = dir.path().join("own.lz4");
    std::fs::copy(&victim_lz4, &own_copy).unwrap();
    let vname: walnut::WalFileName = victim.parse().unwrap();

    // (1) this cluster's archive header, B's WAL: the page header gives it away
    let ar_a = archive_of(&cat_a);
    let b_wal = archive_of(&cat_b).read(&vname).unwrap();
    let meta = walnut::format::segment::FileMeta {
        format: 1,
        name: victim.clone(),
        size: b_wal.len() as u64,
        crc32c: crc32c::crc32c(&b_wal),
        system_id: ar_a.config().system_id,
        archived_at: 1,
    };
    std::fs::write(
        &victim_lz4,
        walnut::format::segment::encode(&meta, &b_wal).unwrap(),
    )
    .unwrap();
    assert_fatal(
        &fetch(&cat_a, &victim, &dest),
        &victim,
        &dest,
        "foreign WAL",
    );
    // (2) another segment of this cluster under the victim's name
    let other = archive_of(&cat_a).read(&next.parse().unwrap()).unwrap();
    let meta = walnut::format::segment::FileMeta {
        size: other.len() as u64,
        crc32c: crc32c::crc32c(&other),
        ..meta
    };
    std::fs::write(
        &victim_lz4,
        walnut::format::segment::encode(&meta, &other).unwrap(),
    )
    .unwrap();
    assert_fatal(
        &fetch(&cat_a, &victim, &dest),
        &victim,
        &dest,
        "wrong segment",
    );

    // (3) B's archived file as it is (and its index)
    std::fs::copy(tli(&cat_b).join(format!("{victim}.lz4")), &victim_lz4).unwrap();
    std::fs::copy(
        tli(&cat_b).join(format!("{victim}.idx")),
        tli(&cat_a).join(format!("{victim}.idx")),
    )
    .unwrap();
    chown_pg(&tli(&cat_a));
    assert_fatal(&fetch(&cat_a, &victim, &dest), &victim, &dest, "B's file");
    show_flags_corrupt(&cat_a, &victim);
    // B's index is never merged: it reads as not this segment's
    let segno = vname.segno(1 << 20).unwrap();
    let st = ar_a.index_state(1, segno).unwrap();
    assert!(
        matches!(st, walnut::archive::IndexState::Missing(ref why) if why.contains("not this segment's")),
        "{st:?}"
    );
    // a PAGE backup across it fails, naming it
    let conn = a.conn_args();
    let mut args = vec!["backup", "-B", cat_a.to_str().unwrap(), "--instance", "db"];
    args.extend(["-b", "page"]);
    args.extend(conn.iter().map(String::as_str));
    let out = walnut(&args);
    assert!(
        !out.status.success(),
        "PAGE backup across a foreign segment: {out:?}"
    );
    assert!(stderr(&out).contains(&victim), "{}", stderr(&out));
    a.stop();

    // restore the FULL: recovery must stop at the foreign segment, not promote
    let target = dir.path().join("restored");
    restore_to(&cat_a, &target);
    let mut r = restored_server(dir.path(), &target);
    r.start_nowait();
    let exited = wait_exit_or_promotion(&r, 120);
    let log = recovery_stopped(&mut r, exited, "recovery ended at the foreign segment");
    assert!(log.contains(&victim), "{log}");

    // with the real segment back, the restore completes
    std::fs::copy(&own_copy, &victim_lz4).unwrap();
    recovers_all(&mut r, "30000");
}
