//! Backups from a standby whose primary is busy, on PostgreSQL 15 and 18, and a standby
//! promoted while a backup of it runs.
//!
//! - `standby_backups_on_a_busy_primary_pg15` / `_pg18`: pgbench runs on the primary
//!   throughout; FULL and PAGE from the standby, with `--stream` and without it (the
//!   primary archives into the catalog), each finishing promptly; each restores to a
//!   restore point made on the primary afterwards, `pg_dumpall` equal to the primary's.
//! - `promotion_during_a_standby_backup_fails_it`: the backup is held (SIGSTOP) after it
//!   started, the standby is promoted, the backup resumes: it fails naming the promotion,
//!   `show` says ERROR, and a backup of the promoted server afterwards works.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::env::*;
use super::harness::*;
use super::stream_standby::{backup, caught_up, restore_promoted, show, stream_flags};

fn primary_on(server: &Server, tools: Option<&Server>, dir: &Path) -> (Pg, PathBuf) {
    let pg = Pg::init_on(server, tools, dir, "primary", &["-k", "--wal-segsize=1"]);
    let cat = catalog_for(dir, &pg);
    pg.append_conf(&format!(
        "wal_keep_size = '256MB'\ncheckpoint_timeout = '1h'\nmax_wal_size = '1GB'\n\
         archive_mode = on\narchive_command = '{} -B {} --instance db %p %f'\n",
        walnut_bin("walnut-archive").display(),
        cat.display()
    ));
    (pg, cat)
}

/// A streaming standby of `p` in `dir/name`; started and caught up.
fn standby_named(p: &Pg, dir: &Path, name: &str, conf: &str) -> Pg {
    let data = dir.join(name);
    run_ok(
        p.client("pg_basebackup")
            .arg("-D")
            .arg(&data)
            .arg("-R")
            .arg("-X")
            .arg("stream")
            .arg("-c")
            .arg("fast"),
    );
    let sock = pg_mkdir(&dir.join(format!("{name}-sock")));
    let mut s = p.existing_like(&data, &sock);
    s.append_conf(&format!("hot_standby = on\n{conf}"));
    s.start();
    caught_up(p, &s);
    s
}

/// A second handle on a running server (dropping it stops nothing).
fn handle(p: &Pg) -> Pg {
    let mut h = p.existing_like(&p.data, &p.sock);
    h.port = p.port;
    h
}

fn busy_scenario(server: &Server, tools: Option<&Server>, name: &str) {
    let dir = pg_tempdir(name);
    let (mut p, cat) = primary_on(server, tools, dir.path());
    p.start();
    p.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    let mut s = standby_named(&p, dir.path(), "standby", "");
    let sdata = s.data.to_str().unwrap().to_string();

    // pgbench on the primary for as long as the backups run
    let stop = Arc::new(AtomicBool::new(false));
    let bench = {
        let h = handle(&p);
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rounds = 0u32;
            while !stop.load(Ordering::SeqCst) {
                h.pgbench(&["-c", "2", "-t", "100", "-n", "postgres"]);
                rounds += 1;
            }
            rounds
        })
    };
    let mut ids = Vec::new();
    for (mode, stream) in [
        ("full", true),
        ("page", true),
        ("full", false),
        ("page", false),
    ] {
        let mut extra = vec!["--pgdata", sdata.as_str(), "--archive-timeout", "120"];
        if stream {
            extra.push("--stream");
        }
        let t0 = Instant::now();
        let id = backup(&cat, &s, mode, &extra);
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "{mode} (stream {stream}) from the standby of a busy primary took {:?}",
            t0.elapsed()
        );
        ids.push((id, stream, format!("r-{mode}-{stream}")));
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = bench.join().expect("pgbench thread");
    assert!(rounds >= 1, "pgbench never ran during the backups");
    let flags = stream_flags(&cat);
    for (id, stream, _) in &ids {
        assert!(flags.contains(&(id.clone(), *stream)), "{flags:?}");
    }

    p.pgbench(&["-t", "100", "-n", "postgres"]);
    p.psql("postgres", "select pg_create_restore_point('after_busy')");
    let dump = Env::dumpall(&p);
    switch_and_wait_in_catalog(&p, &cat);
    s.stop();
    for (id, _, rname) in &ids {
        let mut r = restore_promoted(
            &cat,
            &p,
            dir.path(),
            rname,
            id,
            &["--recovery-target-name", "after_busy"],
        );
        same_dump(&Env::dumpall(&r), &dump, rname);
        r.stop();
    }
    p.stop();
}

#[test]
fn standby_backups_on_a_busy_primary_pg15() {
    busy_scenario(&Server::debian15(), None, "st-busy15");
}

#[test]
fn standby_backups_on_a_busy_primary_pg18() {
    let Some(pg18) = super::matrix::pg18_tools() else {
        return;
    };
    busy_scenario(&pg18, Some(&pg18), "st-busy18");
    super::matrix::say(
        "stream_standby: PG18 standby FULL/PAGE, with and without --stream, on a busy primary: OK",
    );
}

/// The walnut process: the spawned one, or its child when the harness runs it under
/// `runuser` (as the postgres user).
fn walnut_pid(spawned: u32) -> i32 {
    if !is_root() {
        return spawned as i32;
    }
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|v| v.parse().ok());
        if ppid == Some(spawned) {
            if let Ok(pid) = e.file_name().to_string_lossy().parse() {
                return pid;
            }
        }
    }
    panic!("no child of runuser {spawned}");
}

fn started_backups(cat: &Path) -> Vec<String> {
    let dir = cat.join("instances/db/backups");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.path().join("backup.started").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Committed objects in a backup's directory besides its claim (`backup.started`).
fn stored_files(cat: &Path, id: &str) -> usize {
    let dir = cat.join("instances/db/backups").join(id);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            !n.starts_with('.') && n != "backup.started"
        })
        .count()
}

#[test]
fn promotion_during_a_standby_backup_fails_it() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let dir = pg_tempdir("st-promote");
    let server = Server::debian15();
    let (mut p, cat) = primary_on(&server, None, dir.path());
    p.start();
    p.pgbench(&["-i", "-s", "10", "-q", "postgres"]);
    // hold the backup right after it claimed its id (before pg_backup_start), or once it
    // copies files (after pg_backup_start): both promotions must fail it
    for (stream, copying) in [(true, true), (false, true), (false, false)] {
        let name = format!("standby-{stream}-{copying}");
        // the promoted standby must not archive into the instance: two promotions would
        // both claim timeline 2
        let mut s = standby_named(&p, dir.path(), &name, "archive_mode = off");
        let before = started_backups(&cat);
        let mut a: Vec<String> = [
            "backup",
            "-B",
            cat.to_str().unwrap(),
            "--instance",
            "db",
            "-b",
            "full",
            "-j",
            "1",
            "--pgdata",
            s.data.to_str().unwrap(),
            "--archive-timeout",
            "30",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if stream {
            a.push("--stream".into());
        }
        a.extend(s.conn_args());
        let mut child = as_pg(walnut_bin("walnut"))
            .args(&a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn walnut backup");
        // hold the backup once it has started (its backup.started is written after
        // pg_backup_start), promote the standby, then let the backup go on
        let t0 = Instant::now();
        let id = loop {
            let now = started_backups(&cat);
            if let Some(id) = now.iter().find(|i| !before.contains(i)) {
                if !copying || stored_files(&cat, id) > 0 {
                    break id.clone();
                }
            }
            assert!(
                child.try_wait().expect("try_wait").is_none(),
                "the backup ended before it could be held"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "backup never started"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let pid = walnut_pid(child.id());
        kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the backup finished before the promotion"
        );
        assert_eq!(
            s.psql("postgres", "select pg_promote(true, 60)"),
            "t",
            "promotion"
        );
        kill(Pid::from_raw(pid), Signal::SIGCONT).expect("SIGCONT");
        // runuser stops itself when its child stops (job control): resume it too
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
        let out = child.wait_with_output().expect("wait for walnut backup");
        let e = stderr(&out);
        assert!(
            !out.status.success(),
            "a backup of a standby promoted mid-way must fail (stream {stream}, copying {copying})\n{e}"
        );
        assert!(
            e.contains("promot"),
            "the error should name the promotion (stream {stream}, copying {copying}):\n{e}"
        );
        let row = show(&cat)
            .into_iter()
            .find(|b| b["id"] == id.as_str())
            .expect("the failed backup is listed");
        assert_eq!(row["status"], "ERROR", "{row}");
        s.stop();
        // the instance is not wedged: the next backup (of the primary) works
        let ok_id = backup(&cat, &p, "full", &[]);
        assert!(show(&cat)
            .iter()
            .any(|b| b["id"] == ok_id.as_str() && b["status"] == "OK"));
    }
    p.stop();
}
