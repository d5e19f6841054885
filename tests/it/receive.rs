//! `walnut receive` against a real PostgreSQL 15 (1 MiB segments).
//!
//! - `receive_synchronous_*`: a FULL backup, then archive_mode=off (the receiver is the
//!   only WAL path), a synchronous standby; pgbench plus a client that records every acknowledged commit;
//!   the primary stopped with `-m immediate`; a restore to "latest" has every acknowledged
//!   row (the tail comes from the receive spool through walnut-fetch).
//! - `receive_asynchronous_*`: the same without `--synchronous`: what was flushed before
//!   the crash is there.
//! - `receive_sigkill_*`: SIGKILL at several points, restarts: every archived segment equals
//!   the server's file, no gaps, `show --archive --verify` clean, the receiver in its JSON.
//! - `receive_follows_a_promotion`: the `.history` and the old timeline's `.partial` are
//!   stored, streaming continues on timeline 2.
//! - `receive_beside_walnut_archive`: segments both deliver are stored once, no conflicts.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use walnut::{Lsn, WalFileName};

use super::env::{stdout, wait_promoted, Env};
use super::harness::*;

/// A running `walnut receive` (spawned directly as the cluster owner, so its PID is its
/// own); killed by that PID when dropped.
struct Receiver {
    child: Option<Child>,
    spool: PathBuf,
    log: PathBuf,
    args: Vec<String>,
}

impl Receiver {
    fn start(env: &Env, extra: &[&str]) -> Receiver {
        let mut args: Vec<String> = ["receive", "-B", env.cat(), "--instance", "db"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(env.pg.conn_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        let spool = match extra.iter().position(|a| *a == "--spool-dir") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => env.cat.join("instances/db/wal/.receive"),
        };
        let mut r = Receiver {
            child: None,
            spool,
            log: env.path("receive.log"),
            args,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut c = Command::new(walnut_bin("walnut"));
        c.args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if is_root() {
            let u = nix::unistd::User::from_name("postgres").unwrap().unwrap();
            c.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
        self.child = Some(c.spawn().expect("spawn walnut receive"));
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> Option<serde_json::Value> {
        let b = std::fs::read(self.spool.join("status.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    fn flushed(&self) -> Lsn {
        self.status()
            .and_then(|s| s["flushed_lsn"].as_str().and_then(|l| l.parse().ok()))
            .unwrap_or(Lsn(0))
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, sig);
        }
    }

    /// Waits until it streams with its pid in the status file (up to 60 s).
    fn wait_streaming(&mut self) {
        let pid = self.child.as_ref().unwrap().id() as u64;
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.status() {
                if s["state"] == "streaming" && s["pid"].as_u64() == Some(pid) {
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("walnut receive exited with {st}\n{}", self.log_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "walnut receive does not stream\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until everything before `lsn` is flushed (up to 120 s).
    fn wait_flushed(&self, lsn: Lsn) {
        let t0 = Instant::now();
        while self.flushed() < lsn {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "walnut receive did not flush {lsn} (at {})\n{}",
                self.flushed(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM: must exit 0 within 30 s.
    fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut c = self.child.take().expect("running");
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "walnut receive exited {st}\n{}",
                    self.log_text()
                );
                return;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("walnut receive ignored SIGTERM\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn immediate_stop(pg: &mut Pg) {
    let mut c = pg.cmd("pg_ctl");
    c.arg("-D")
        .arg(&pg.data)
        .args(["-m", "immediate", "-w", "stop"]);
    run_ok(&mut c);
    pg.set_running(false);
}

/// A client inserting 1, 2, 3, ... into `acked`, one transaction each, recording the last
/// one the server acknowledged, until stopped or the server goes away.
fn inserter(pg: &Pg, stop: Arc<AtomicBool>, acked: Arc<AtomicI64>) -> std::thread::JoinHandle<()> {
    let sock = pg.sock.clone();
    let port = pg.port;
    std::thread::spawn(move || {
        let mut client = postgres::Config::new()
            .host_path(&sock)
            .port(port)
            .user("postgres")
            .dbname("postgres")
            .connect(postgres::NoTls)
            .expect("connect the inserter");
        let mut i: i64 = 1;
        while !stop.load(Ordering::SeqCst) {
            match client.execute("insert into acked values ($1)", &[&i]) {
                Ok(_) => acked.store(i, Ordering::SeqCst),
                Err(_) => return,
            }
            i += 1;
        }
    })
}

/// Restores the newest backup to "latest" beside the (stopped) primary, starts it and
/// waits until recovery ended.
fn restore_latest(env: &Env, name: &str) -> Pg {
    let target = env.path(name);
    ok(env.restore_cmd(&target, &[]), "restore to latest");
    let sock = pg_mkdir(&env.path(&format!("{name}-sock")));
    let mut r = env.pg.existing_like(&target, &sock);
    r.append_conf("archive_mode = off\nsynchronous_standby_names = ''");
    r.start();
    // As wait_promoted, but a failed recovery shows the restored server's log.
    let t0 = Instant::now();
    loop {
        let out = r.psql_output("postgres", "select pg_is_in_recovery()");
        if out.status.success() && stdout(&out).trim() == "f" {
            return r;
        }
        assert!(
            out.status.success() && t0.elapsed() < Duration::from_secs(300),
            "the restored server did not finish recovery: {}\n{}",
            super::env::stderr(&out),
            r.server_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count(pg: &Pg, sql: &str) -> i64 {
    pg.psql("postgres", sql).parse().unwrap()
}

/// pgbench for 30 s with the receiver as the only WAL path, then a crash of the primary.
fn crash_scenario(tag: &str, synchronous: bool) {
    crash_scenario_in(tag, synchronous, false);
}

/// [`crash_scenario`]; with `own_spool` the receiver's spool is a directory outside the
/// catalog (`--spool-dir`), which walnut-fetch (and `show --archive`) must find by the
/// pointer the receiver records: the tail of the WAL is only there.
pub(super) fn crash_scenario_in(tag: &str, synchronous: bool, own_spool: bool) {
    let conf = if synchronous {
        "synchronous_standby_names = 'walnut_receive'\nwal_keep_size = '1GB'\n"
    } else {
        "wal_keep_size = '1GB'\n"
    };
    let mut env = Env::with(tag, &["-k"], conf);
    let spool = pg_mkdir(&env.path("own-spool"));
    let spool_s = spool.to_str().unwrap().to_string();
    let mut extra: Vec<&str> = Vec::new();
    if synchronous {
        extra.push("--synchronous");
    }
    if own_spool {
        extra.extend(["--spool-dir", spool_s.as_str()]);
    }
    let mut rx = Receiver::start(&env, &extra);
    rx.wait_streaming();
    if synchronous {
        let t0 = Instant::now();
        while env.pg.psql(
            "postgres",
            "select coalesce(string_agg(application_name || ':' || sync_state, ','), '') from pg_stat_replication",
        ) != "walnut_receive:sync"
        {
            assert!(t0.elapsed() < Duration::from_secs(30), "not a synchronous standby");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    env.pg.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    env.pg
        .psql("postgres", "create table acked(v bigint primary key)");
    // A FULL backup (backups check that walnut-archive is the archive_command), then the
    // receiver becomes the only WAL path: archiving is turned off.
    env.backup("full", &[]);
    env.pg.append_conf("archive_mode = off");
    env.pg.stop();
    env.pg.start();
    assert_eq!(env.pg.psql("postgres", "show archive_mode"), "off");

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicI64::new(0));
    let ins = inserter(&env.pg, stop.clone(), acked.clone());
    env.pg.pgbench(&["-n", "-c", "2", "-T", "30", "postgres"]);
    // What was durable here before the crash must survive it.
    let before = acked.load(Ordering::SeqCst);
    let lsn: Lsn = env
        .pg
        .psql("postgres", "select pg_current_wal_flush_lsn()")
        .parse()
        .unwrap();
    rx.wait_flushed(lsn);
    std::thread::sleep(Duration::from_secs(2));
    immediate_stop(&mut env.pg);
    let last = acked.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    ins.join().unwrap();
    assert!(
        last > before && before > 100,
        "the inserter ran ({before}, {last})"
    );
    rx.stop();
    let status = rx.status().unwrap();
    assert_eq!(status["state"], "stopped");
    let default_spool = env.cat.join("instances/db/wal/.receive");
    if own_spool {
        // The tail is in the own spool only; show finds the receiver there.
        let tail_files = |d: &std::path::Path| {
            std::fs::read_dir(d)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
                        .count()
                })
                .unwrap_or(0)
        };
        assert_eq!(tail_files(&spool), 1, "the own spool holds the tail");
        assert_eq!(
            tail_files(&default_spool),
            0,
            "nothing in the default spool"
        );
        let (_, j) = show_archive(&env);
        assert_eq!(j["receiver"]["spool"], spool_s.as_str(), "{j}");
        assert_eq!(j["receiver"]["state"], "stopped", "{j}");
    } else {
        assert!(!env.cat.join("instances/db/wal/.receive-spool").exists());
    }

    eprintln!("acknowledged {last}, {before} before the last flush");
    let r = restore_latest(&env, "restored");
    let want = if synchronous { last } else { before };
    assert_eq!(
        count(&r, &format!("select count(*) from acked where v <= {want}")),
        want,
        "every row acknowledged up to {want} is restored (acknowledged {last}, {before} \
         before the last reported flush)\n{}",
        rx.log_text()
    );
    let max = count(&r, "select coalesce(max(v), 0) from acked");
    assert!(max <= last + 1, "restored {max}, acknowledged {last}");
    drop(r);
    if own_spool {
        // A pointer that names no absolute path is damage: walnut-fetch stops recovery (200)
        // rather than call the segment absent.
        let seg = env.archive().seg_size();
        let tail: Lsn = status["flushed_lsn"].as_str().unwrap().parse().unwrap();
        let name = WalFileName::segment(1, tail.segno(seg), seg);
        let fetch = || {
            let mut c = as_pg(walnut_bin("walnut-fetch"));
            c.args(["-B", env.cat(), "--instance", "db", "--prefetch", "0"])
                .arg(name.to_string())
                .arg(env.path("fetched"));
            run(&mut c)
        };
        let out = fetch();
        assert!(out.status.success(), "{}", super::env::stderr(&out));
        let pointer = env.cat.join("instances/db/wal/.receive-spool");
        std::fs::write(&pointer, "relative/spool\n").unwrap();
        let out = fetch();
        assert_eq!(out.status.code(), Some(200), "{}", super::env::stderr(&out));
    }
}

#[test]
fn receive_synchronous_loses_no_acknowledged_commit() {
    crash_scenario("recv-sync", true);
}

#[test]
fn receive_asynchronous_loses_at_most_the_unflushed_tail() {
    crash_scenario("recv-async", false);
}

/// The archived segments of timeline 1, in order.
fn archived_segments(env: &Env, tli: u32) -> Vec<WalFileName> {
    let ar = env.archive();
    let l = ar.listing(Some(tli)).unwrap();
    let mut v: Vec<WalFileName> = l
        .objects
        .iter()
        .filter_map(|o| o.name.strip_suffix(".lz4").and_then(|n| n.parse().ok()))
        .filter(|n: &WalFileName| n.is_segment())
        .collect();
    v.sort();
    v
}

/// Every archived segment of `tli` equals the server's file; no gaps.
fn check_against_pg_wal(env: &Env, tli: u32) -> usize {
    let ar = env.archive();
    let segs = archived_segments(env, tli);
    let seg = ar.seg_size();
    for w in segs.windows(2) {
        assert_eq!(
            w[0].segno(seg).unwrap() + 1,
            w[1].segno(seg).unwrap(),
            "gap between {} and {}",
            w[0],
            w[1]
        );
    }
    for n in &segs {
        let disk = std::fs::read(env.pg.data.join("pg_wal").join(n.to_string()))
            .unwrap_or_else(|e| panic!("{n} in pg_wal: {e}"));
        assert!(
            ar.read(n).unwrap() == disk,
            "archived {n} differs from pg_wal"
        );
    }
    segs.len()
}

fn show_archive(env: &Env) -> (bool, serde_json::Value) {
    let out = walnut(&[
        "show",
        "-B",
        env.cat(),
        "--instance",
        "db",
        "--archive",
        "--verify",
        "--format",
        "json",
    ]);
    let v = serde_json::from_str(&stdout(&out)).expect("show json");
    (out.status.success(), v)
}

fn switch(pg: &Pg) -> (WalFileName, Lsn) {
    let s = pg.psql(
        "postgres",
        "select pg_walfile_name(l) || ' ' || l from (select pg_switch_wal() l) s",
    );
    let mut it = s.split(' ');
    (
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().parse().unwrap(),
    )
}

#[test]
fn receive_sigkill_at_any_point_loses_nothing() {
    let env = Env::with(
        "recv-kill",
        &["-k"],
        "archive_mode = off\nwal_keep_size = '1GB'\n",
    );
    let mut rx = Receiver::start(&env, &[]);
    rx.wait_streaming();
    env.pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let pg_args = {
        let mut c = env.pg.client("pgbench");
        c.args(["-n", "-c", "2", "-T", "4", "postgres"]);
        c
    };
    let mut pg_args = Some(pg_args);
    for round in 0..6 {
        let mut bench = pg_args.take().unwrap();
        let h = std::thread::spawn(move || {
            let _ = bench.output();
            bench
        });
        match round % 3 {
            // mid-stream, at a time
            0 => std::thread::sleep(Duration::from_millis(1500)),
            // right after a segment completes in the archive
            1 => {
                let n0 = archived_segments(&env, 1).len();
                let t0 = Instant::now();
                while archived_segments(&env, 1).len() == n0
                    && t0.elapsed() < Duration::from_secs(4)
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            // right at startup
            _ => {
                rx.kill9();
                rx.spawn();
                std::thread::sleep(Duration::from_millis(30));
            }
        }
        rx.kill9();
        pg_args = Some(h.join().unwrap());
        rx.spawn();
        rx.wait_streaming();
    }
    let (last, end) = switch(&env.pg);
    rx.wait_flushed(end);
    let ar = env.archive();
    assert!(ar.is_archived(&last).unwrap(), "{last} archived");
    let n = check_against_pg_wal(&env, 1);
    assert!(n >= 8, "only {n} segments streamed");
    let (clean, v) = show_archive(&env);
    assert!(clean, "show --archive --verify: {v}");
    assert_eq!(v["receiver"]["slot"], "walnut_receive");
    assert!(
        v["receiver"]["flushed_lsn"]
            .as_str()
            .unwrap()
            .parse::<Lsn>()
            .unwrap()
            >= end
    );
    assert!(v["receiver"]["last_message_time"].is_string());
    let t = &v["timelines"][0];
    assert_eq!(t["gaps"].as_array().unwrap().len(), 0);
    assert_eq!(t["index_missing"].as_array().unwrap().len(), 0, "{t}");
    // the text output shows it too
    let text = ok(
        walnut(&["show", "-B", env.cat(), "--instance", "db", "--archive"]),
        "show",
    );
    assert!(text.contains("receiver: slot walnut_receive"), "{text}");
    // WAL in the segment being filled, then a clean stop.
    env.pg.psql(
        "postgres",
        "create table z as select generate_series(1, 1000) i",
    );
    let tail: Lsn = env
        .pg
        .psql("postgres", "select pg_current_wal_flush_lsn()")
        .parse()
        .unwrap();
    rx.wait_flushed(tail);
    rx.stop();
    let log = rx.log_text();
    eprintln!("{log}");
    assert!(log.contains("resuming"), "a .partial was resumed\n{log}");
    fetch_serves_the_spool(&env, &rx, tail);
}

/// walnut-fetch serves the receive spool's `.partial` under its segment name, zero-padded;
/// a spool file that is a link is fatal (200), a name in neither place absent (1).
fn fetch_serves_the_spool(env: &Env, rx: &Receiver, tail: Lsn) {
    let seg = env.archive().seg_size();
    let name = WalFileName::segment(1, tail.segno(seg), seg);
    assert!(!env.archive().is_archived(&name).unwrap());
    let dest = env.path("fetched");
    let fetch = |n: &WalFileName| {
        let mut c = as_pg(walnut_bin("walnut-fetch"));
        c.args(["-B", env.cat(), "--instance", "db", "--prefetch", "0"])
            .arg(n.to_string())
            .arg(&dest);
        run(&mut c)
    };
    let out = fetch(&name);
    assert!(out.status.success(), "{}", super::env::stderr(&out));
    let got = std::fs::read(&dest).unwrap();
    assert_eq!(got.len(), seg as usize);
    let k = tail.segment_offset(seg) as usize;
    let disk = std::fs::read(env.pg.data.join("pg_wal").join(name.to_string())).unwrap();
    assert_eq!(got[..k], disk[..k], "the received bytes");
    let end = rx.flushed();
    assert_eq!(end.segno(seg), tail.segno(seg));
    let e = end.segment_offset(seg) as usize;
    assert_eq!(got[..e], disk[..e], "everything received");
    assert!(got[e..].iter().all(|b| *b == 0), "zero-padded");
    let next = WalFileName::segment(1, tail.segno(seg) + 1, seg);
    assert_eq!(fetch(&next).status.code(), Some(1), "absent");
    let p = rx.spool.join(format!("{name}.partial"));
    let moved = env.path("moved.partial");
    std::fs::rename(&p, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &p).unwrap();
    assert_eq!(fetch(&name).status.code(), Some(200), "a link is fatal");
}

#[test]
fn receive_follows_a_promotion() {
    let mut env = Env::with(
        "recv-promote",
        &["-k"],
        "archive_mode = off\nwal_keep_size = '1GB'\n",
    );
    let mut rx = Receiver::start(&env, &[]);
    rx.wait_streaming();
    env.pg.psql(
        "postgres",
        "create table t(i int); insert into t select generate_series(1, 50000)",
    );
    let (_, end) = switch(&env.pg);
    env.pg
        .psql("postgres", "insert into t values (1); checkpoint");
    rx.wait_flushed(end);
    // A standby-style promotion of the same cluster to timeline 2.
    env.pg.stop();
    let signal = env.pg.data.join("standby.signal");
    std::fs::write(&signal, "").unwrap();
    chown_pg(&signal);
    env.pg.start();
    let mut c = env.pg.cmd("pg_ctl");
    c.arg("-D").arg(&env.pg.data).args(["-w", "promote"]);
    run_ok(&mut c);
    wait_promoted(&env.pg);
    env.pg
        .psql("postgres", "insert into t select generate_series(1, 20000)");
    let (last, end2) = switch(&env.pg);
    assert_eq!(last.tli(), 2);
    rx.wait_flushed(end2);
    let ar = env.archive();
    assert!(ar.is_archived(&last).unwrap(), "{last}\n{}", rx.log_text());
    let h = WalFileName::History { tli: 2 };
    assert_eq!(
        ar.read(&h).unwrap(),
        std::fs::read(env.pg.data.join("pg_wal/00000002.history")).unwrap()
    );
    let history = ar.timeline_history(2).unwrap();
    let sp = history[0].switchpoint;
    let seg = ar.seg_size();
    if sp.segment_offset(seg) != 0 {
        let WalFileName::Segment { log, seg: s, .. } = WalFileName::segment(1, sp.segno(seg), seg)
        else {
            unreachable!()
        };
        let p = WalFileName::Partial {
            tli: 1,
            log,
            seg: s,
        };
        let data = ar.read(&p).unwrap();
        let disk = std::fs::read(
            env.pg
                .data
                .join("pg_wal")
                .join(WalFileName::segment(2, sp.segno(seg), seg).to_string()),
        )
        .unwrap();
        let k = sp.segment_offset(seg) as usize;
        assert_eq!(
            data[..k],
            disk[..k],
            "the old timeline's tail is the new segment's head"
        );
    }
    check_against_pg_wal(&env, 2);
    assert_eq!(rx.status().unwrap()["timeline"], 2);
    let (clean, v) = show_archive(&env);
    assert!(clean, "{v}");
    rx.stop();
    let log = rx.log_text();
    eprintln!("{log}");
    assert!(log.contains("following timeline 2"), "{log}");
}

#[test]
fn receive_beside_walnut_archive_stores_each_segment_once() {
    let env = Env::with("recv-both", &["-k"], "wal_keep_size = '1GB'\n");
    let mut rx = Receiver::start(&env, &[]);
    rx.wait_streaming();
    env.pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    env.pg.pgbench(&["-n", "-c", "2", "-T", "5", "postgres"]);
    let (last, end) = switch(&env.pg);
    env.pg.wait_archived(&last.to_string());
    rx.wait_flushed(end);
    let n = check_against_pg_wal(&env, 1);
    assert!(n >= 3);
    assert_eq!(
        env.pg
            .psql("postgres", "select failed_count from pg_stat_archiver"),
        "0",
        "walnut-archive never failed"
    );
    let log = rx.log_text();
    assert!(
        log.contains("was archived already"),
        "both delivered some segment\n{log}"
    );
    assert!(!log.contains("DIFFERENT"), "{log}");
    let (clean, v) = show_archive(&env);
    assert!(clean, "{v}");
    // still running after meeting walnut-archive's segments
    assert!(rx.child.as_mut().unwrap().try_wait().unwrap().is_none());
    rx.stop();
}

/// PostgreSQL 14 (no READ_REPLICATION_SLOT): the slot's position comes from
/// pg_replication_slots. With the spool lost, a restart streams from the slot: no gap.
#[test]
fn receive_pg14_starts_from_the_slot() {
    let Some(tools) = super::matrix::pg18_tools() else {
        return;
    };
    let (major, version) = NPM_VERSIONS.iter().find(|(m, _)| *m == 14).unwrap();
    let server = match npm_server(*major, version) {
        Ok(s) => s,
        Err(e) => {
            super::matrix::say(&format!("receive: PG14 SKIPPED: {e}"));
            return;
        }
    };
    let env = Env::on(
        "recv-pg14",
        &server,
        Some(&tools),
        "archive_mode = off\nwal_keep_size = '1GB'\n",
    );
    let mut rx = Receiver::start(&env, &[]);
    rx.wait_streaming();
    env.pg.psql(
        "postgres",
        "create table t(i int); insert into t select generate_series(1, 30000)",
    );
    let (_, end) = switch(&env.pg);
    rx.wait_flushed(end);
    rx.kill9();
    // the spool is lost: only the slot knows where to go on
    std::fs::remove_dir_all(&rx.spool).unwrap();
    env.pg
        .psql("postgres", "insert into t select generate_series(1, 30000)");
    rx.spawn();
    rx.wait_streaming();
    let (last, end) = switch(&env.pg);
    rx.wait_flushed(end);
    assert!(env.archive().is_archived(&last).unwrap());
    let n = check_against_pg_wal(&env, 1);
    assert!(n >= 4, "{n}");
    rx.stop();
    let log = rx.log_text();
    eprintln!("{log}");
    assert_eq!(log.matches("streaming timeline 1 from").count(), 2, "{log}");
}
